//! The last `MeshEncryption default` spec this node applied, kept in the agent's state dir so
//! that losing the object never lowers protection (issue 13, finding 8).
//!
//! Deleting the object (a CRD uninstall, a mistaken `kubectl delete`) is not an explicit change:
//! the agent keeps applying the last spec it saw, across restarts, until an object says
//! otherwise (`enabled: false` or `mode: Disabled` are explicit and are remembered like any
//! other spec). A node that never saw the object stays off. The status condition
//! `SettingsApplied=False` with reason [`REASON_REMEMBERED`] says when a remembered spec is in
//! force.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use wiremesh_crds::{MESH_ENCRYPTION_NAME, MeshEncryption, MeshEncryptionSpec};

/// File in the state dir holding the last spec as JSON.
pub const FILE_NAME: &str = "meshencryption-last.json";

/// Condition reason while the object is gone and the remembered spec applies.
pub const REASON_REMEMBERED: &str = "MeshEncryptionMissing";

/// Why the remembered spec could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// See the module docs.
#[derive(Debug)]
pub struct SettingsMemory {
    path: PathBuf,
    last: Mutex<Option<MeshEncryptionSpec>>,
}

impl SettingsMemory {
    /// Reads the remembered spec from `state_dir` (none when the file does not exist).
    pub fn open(state_dir: &Path) -> Result<Self, SettingsError> {
        let path = state_dir.join(FILE_NAME);
        let last = match std::fs::read(&path) {
            Ok(bytes) => {
                Some(
                    serde_json::from_slice(&bytes).map_err(|source| SettingsError::Parse {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(SettingsError::Read { path, source }),
        };
        Ok(Self {
            path,
            last: Mutex::new(last),
        })
    }

    /// The spec to apply: `live` (remembered when it differs from the last one), else the
    /// remembered spec. The flag says whether the remembered spec stands in for a missing
    /// object.
    pub fn effective(
        &self,
        live: Option<Arc<MeshEncryption>>,
    ) -> (Option<Arc<MeshEncryption>>, bool) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match live {
            Some(object) => {
                if last.as_ref() != Some(&object.spec) {
                    match self.persist(&object.spec) {
                        Ok(()) => {
                            tracing::info!(path = %self.path.display(), "remembered MeshEncryption spec")
                        }
                        Err(error) => {
                            tracing::warn!(%error, "could not remember the MeshEncryption spec")
                        }
                    }
                    *last = Some(object.spec.clone());
                }
                (Some(object), false)
            }
            None => match last.as_ref() {
                Some(spec) => (
                    Some(Arc::new(MeshEncryption::new(
                        MESH_ENCRYPTION_NAME,
                        spec.clone(),
                    ))),
                    true,
                ),
                None => (None, false),
            },
        }
    }

    fn persist(&self, spec: &MeshEncryptionSpec) -> Result<(), SettingsError> {
        let error = |source| SettingsError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(spec).expect("a spec serializes");
        let mut file = std::fs::File::create(&tmp).map_err(error)?;
        file.write_all(&bytes).map_err(error)?;
        file.sync_all().map_err(error)?;
        std::fs::rename(&tmp, &self.path).map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use wiremesh_crds::EncryptionMode;

    use super::*;

    fn object(mode: EncryptionMode) -> Arc<MeshEncryption> {
        Arc::new(MeshEncryption::new(
            MESH_ENCRYPTION_NAME,
            MeshEncryptionSpec {
                enabled: true,
                mode,
                ..MeshEncryptionSpec::default()
            },
        ))
    }

    #[test]
    fn a_deleted_object_keeps_the_last_mode_across_restarts() {
        // Issue 13, finding 8: on main a missing object meant "mesh off", so deleting it dropped
        // a Strict cluster to plaintext.
        let dir = tempfile::tempdir().unwrap();
        let memory = SettingsMemory::open(dir.path()).unwrap();
        assert_eq!(
            memory.effective(None),
            (None, false),
            "fresh node stays off"
        );
        let (spec, remembered) = memory.effective(Some(object(EncryptionMode::Strict)));
        assert!(!remembered);
        assert_eq!(spec.unwrap().spec.mode, EncryptionMode::Strict);

        let (spec, remembered) = memory.effective(None);
        assert!(remembered);
        let spec = spec.unwrap();
        assert!(spec.spec.steers_traffic());
        assert_eq!(spec.spec.mode, EncryptionMode::Strict);

        // A restarted agent with no object.
        let restarted = SettingsMemory::open(dir.path()).unwrap();
        let (spec, remembered) = restarted.effective(None);
        assert!(remembered);
        assert_eq!(spec.unwrap().spec.mode, EncryptionMode::Strict);

        // An explicit change is remembered too.
        restarted.effective(Some(object(EncryptionMode::Disabled)));
        let (spec, _) = SettingsMemory::open(dir.path()).unwrap().effective(None);
        assert!(!spec.unwrap().spec.steers_traffic());
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_silence() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = SettingsMemory::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }
}
