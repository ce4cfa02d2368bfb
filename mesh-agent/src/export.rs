//! Opt-in export of flow records as JSON lines to a file (`--flow-export`), for log shippers
//! such as Fluent Bit or Vector: one [`Flow`] per line, appended as records arrive; when the
//! file would grow past `max_bytes` it is rotated (`<file>.1` is the newest old file, at most
//! `keep` are kept), as logrotate's `copytruncate`-free rename scheme does.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use crate::flows::Flow;

/// Why the export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("flow export {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The export file. See the module docs.
pub struct Export {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl Export {
    /// Opens `path` for appending (creating it and its directory).
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> Result<Self, ExportError> {
        let err = |source| ExportError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            keep,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> Result<(), std::io::Error> {
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }

    /// Appends one line per record, rotating first when a line would pass the size limit.
    pub fn write(&mut self, records: &[Flow]) -> Result<(), ExportError> {
        let path = self.path.clone();
        let err = |source| ExportError::Io {
            path: path.clone(),
            source,
        };
        for r in records {
            let mut line = serde_json::to_vec(r).map_err(|e| err(e.into()))?;
            line.push(b'\n');
            if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
                self.rotate().map_err(err)?;
            }
            self.file.write_all(&line).map_err(err)?;
            self.size += line.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use wiremesh_bpf::FlowEvent;

    use super::*;
    use crate::flows::{FlowTable, Names};

    #[test]
    fn lines_are_appended_and_rotated_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/flows.jsonl");
        let records = FlowTable::new(4)
            .ingest_at(
                &[FlowEvent {
                    packets: 1,
                    protocol: 6,
                    verdict: 1,
                    hook: 1,
                    ..FlowEvent::default()
                }],
                &Names::default(),
                1_000,
            )
            .records;
        let line_len = serde_json::to_vec(&records[0]).unwrap().len() as u64 + 1;
        let mut export = Export::open(&path, line_len * 2, 2).unwrap();
        for _ in 0..7 {
            export.write(&records).unwrap();
        }
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        // 7 lines, 2 per file: the current file has 1, .1 and .2 have 2 each, the oldest went.
        assert_eq!(lines(&path), 1);
        assert_eq!(lines(&export.rotated(1)), 2);
        assert_eq!(lines(&export.rotated(2)), 2);
        assert!(!export.rotated(3).exists());
        let parsed: Flow =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(parsed, records[0]);

        // Reopening continues the current file's size.
        let export = Export::open(&path, line_len * 2, 2).unwrap();
        assert_eq!(export.size, line_len);
    }
}
