//! Flow history that outlives the agent: flow records aggregated per flow and time bucket (one
//! minute) in an embedded redb database under the state dir (`<state-dir>/flows.redb`), with a
//! retention period and a bound on the number of records (the oldest buckets go first; both
//! evictions are counted), plus the periods the agent was recording ("coverage"), so a reader can
//! tell a quiet period from one with no agent running.
//!
//! redb rather than SQLite: pure Rust (no C toolchain, no bundled SQLite to keep patched), ACID
//! and crash-safe copy-on-write B-trees with a stable file format, MVCC so `/flows` queries never
//! block the writer, and the only access pattern needed is a range scan over
//! `(bucket, flow id)` keys. Records are JSON values: the same [`Flow`] the API serves (addresses
//! as strings, so IPv4 records written before IPv6 flows existed read as they are).
//!
//! Keys: the bucket start (8 bytes, big-endian), the source and destination addresses (4 bytes
//! each for IPv4, 16 for IPv6), the ports (2 + 2) and protocol, verdict, hook: 23 bytes for an
//! IPv4 flow (the layout agents wrote before IPv6 flows, so their records merge with new ones),
//! 47 for an IPv6 flow (the lengths keep the families apart).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::flows::{Flow, FlowId};

/// Width of a time bucket.
pub const BUCKET_SECS: u64 = 60;

/// The file name under the state dir.
pub const FILE_NAME: &str = "flows.redb";

/// `(bucket start, flow id)` -> JSON [`Flow`] aggregated over the bucket.
const FLOWS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("flows");
/// Recording periods: start (Unix seconds) -> last heartbeat.
const COVERAGE: TableDefinition<'_, u64, u64> = TableDefinition::new("coverage");

/// Why the history could not be opened, written or read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("flow history {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("flow history {path}: record {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Limits of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Records older than this are deleted.
    pub retention: Duration,
    /// At most this many (flow, bucket) records; the oldest buckets are deleted beyond it.
    pub max_records: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(30 * 24 * 3600),
            max_records: 500_000,
        }
    }
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Records written (new or merged).
    pub written: u64,
    /// Records deleted because they were older than the retention.
    pub expired: u64,
    /// Records deleted to stay within `max_records`.
    pub evicted: u64,
    /// Records held afterwards.
    pub records: u64,
}

/// A period the agent was recording, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Period {
    pub from: u64,
    pub to: u64,
}

/// A raw (key, value) row of the flows table.
type Row = (Vec<u8>, Vec<u8>);

/// The flow history of this node. See the module docs.
pub struct History {
    db: Database,
    path: PathBuf,
    limits: Limits,
    /// Records not yet written, by key.
    pending: Mutex<BTreeMap<Vec<u8>, Flow>>,
    /// Start of this process's recording period.
    started: u64,
}

fn key(bucket: u64, id: &FlowId) -> Vec<u8> {
    let (src, dst, sport, dport, proto, verdict, hook) = *id;
    let mut k = Vec::with_capacity(47);
    k.extend_from_slice(&bucket.to_be_bytes());
    for ip in [src, dst] {
        match ip {
            std::net::IpAddr::V4(a) => k.extend_from_slice(&a.octets()),
            std::net::IpAddr::V6(a) => k.extend_from_slice(&a.octets()),
        }
    }
    k.extend_from_slice(&sport.to_be_bytes());
    k.extend_from_slice(&dport.to_be_bytes());
    k.extend_from_slice(&[proto, verdict, hook]);
    k
}

fn bucket_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_be_bytes(b)
}

/// Adds `r` to the aggregate `into` of the same flow and bucket.
fn merge(into: &mut Flow, r: &Flow) {
    into.packets += r.packets;
    into.bytes += r.bytes;
    into.first_seen = into.first_seen.min(r.first_seen);
    if r.last_seen >= into.last_seen {
        into.last_seen = r.last_seen;
        into.time = r.time.clone();
    }
}

impl History {
    /// Opens (or creates) `<state_dir>/flows.redb`; `now` (Unix seconds) starts this process's
    /// recording period.
    pub fn open(state_dir: &Path, limits: Limits, now: u64) -> Result<Self, HistoryError> {
        let path = state_dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| HistoryError::Db {
            path: path.clone(),
            source: Box::new(e.into()),
        })?;
        let history = Self {
            db,
            path,
            limits,
            pending: Mutex::new(BTreeMap::new()),
            started: now,
        };
        history.write(|_, coverage| {
            coverage.insert(now, now)?;
            Ok(())
        })?;
        Ok(history)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self) -> impl Fn(redb::Error) -> HistoryError + '_ {
        |e| HistoryError::Db {
            path: self.path.clone(),
            source: Box::new(e),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(
            &mut redb::Table<'_, &'static [u8], &'static [u8]>,
            &mut redb::Table<'_, u64, u64>,
        ) -> Result<T, redb::Error>,
    ) -> Result<T, HistoryError> {
        let run = || -> Result<T, redb::Error> {
            let txn = self.db.begin_write()?;
            let out = {
                let mut flows = txn.open_table(FLOWS)?;
                let mut coverage = txn.open_table(COVERAGE)?;
                f(&mut flows, &mut coverage)?
            };
            txn.commit()?;
            Ok(out)
        };
        run().map_err(self.db_err())
    }

    /// Queues records (each with the packets and bytes of one ring-buffer event) for the next
    /// [`History::flush`].
    pub fn add(&self, records: &[Flow]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let k = key(r.last_seen - r.last_seen % BUCKET_SECS, &r.id());
            match pending.get_mut(&k) {
                Some(agg) => merge(agg, r),
                None => {
                    pending.insert(k, r.clone());
                }
            }
        }
    }

    /// Writes the queued records, extends this process's recording period to `now`, and applies
    /// the retention and the size bound.
    pub fn flush(&self, now: u64) -> Result<Flushed, HistoryError> {
        // Held until the write commits, so a query sees each record either queued or written.
        let mut queue = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut *queue);
        let mut encoded = Vec::with_capacity(pending.len());
        for (k, mut r) in pending {
            r.pending_packets = 0;
            r.pending_bytes = 0;
            encoded.push((k, r));
        }
        let path = self.path.clone();
        let limits = self.limits;
        let started = self.started;
        let mut json_error = None;
        let out = self.write(|flows, coverage| {
            let mut done = Flushed::default();
            for (k, r) in &encoded {
                let merged = match flows.get(k.as_slice())? {
                    Some(old) => match serde_json::from_slice::<Flow>(old.value()) {
                        Ok(mut agg) => {
                            merge(&mut agg, r);
                            agg
                        }
                        // A record this build cannot read is replaced, not kept half-merged.
                        Err(_) => r.clone(),
                    },
                    None => r.clone(),
                };
                match serde_json::to_vec(&merged) {
                    Ok(v) => {
                        flows.insert(k.as_slice(), v.as_slice())?;
                        done.written += 1;
                    }
                    Err(e) => json_error = Some(e),
                }
            }
            coverage.insert(started, now)?;
            let cutoff = now.saturating_sub(limits.retention.as_secs());
            let before = flows.len()?;
            flows.retain_in(..cutoff.to_be_bytes().as_slice(), |_, _| false)?;
            coverage.retain(|_, to| to >= cutoff)?;
            let after = flows.len()?;
            done.expired = before - after;
            if after > limits.max_records {
                let excess = after - limits.max_records;
                let mut doomed = Vec::new();
                for item in flows
                    .iter()?
                    .take(usize::try_from(excess).unwrap_or(usize::MAX))
                {
                    doomed.push(item?.0.value().to_vec());
                }
                for k in &doomed {
                    flows.remove(k.as_slice())?;
                }
                done.evicted = doomed.len() as u64;
            }
            done.records = flows.len()?;
            Ok(done)
        })?;
        if let Some(source) = json_error {
            return Err(HistoryError::Json {
                path,
                what: "encode",
                source,
            });
        }
        Ok(out)
    }

    /// The flows recorded between `from` and `to` (Unix seconds, bucket granularity: every
    /// bucket that overlaps the window), aggregated per flow over the window, records queued
    /// for the next flush included; a flow whose record cannot be read is an error (never
    /// silently skipped).
    pub fn query(&self, from: u64, to: u64) -> Result<Vec<Flow>, HistoryError> {
        let lo = from - from % BUCKET_SECS;
        // Held while reading, so a concurrent flush cannot move a record out of the queue
        // before it is visible in the database.
        let queue = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let queued: Vec<Flow> = queue
            .iter()
            .filter(|(k, _)| (lo..=to).contains(&bucket_of(k)))
            .map(|(_, r)| r.clone())
            .collect();
        let read = || -> Result<Vec<Row>, redb::Error> {
            let txn = self.db.begin_read()?;
            let flows = txn.open_table(FLOWS)?;
            let mut out = Vec::new();
            for item in flows.range(lo.to_be_bytes().as_slice()..)? {
                let (k, v) = item?;
                if bucket_of(k.value()) > to {
                    break;
                }
                out.push((k.value().to_vec(), v.value().to_vec()));
            }
            Ok(out)
        };
        let rows = match read() {
            Ok(rows) => rows,
            // Nothing written yet.
            Err(redb::Error::TableDoesNotExist(_)) => Vec::new(),
            Err(e) => return Err(self.db_err()(e)),
        };
        drop(queue);
        let mut by_flow: BTreeMap<FlowId, Flow> = BTreeMap::new();
        let mut decoded = Vec::with_capacity(rows.len() + queued.len());
        for (_, v) in rows {
            decoded.push(serde_json::from_slice::<Flow>(&v).map_err(|source| {
                HistoryError::Json {
                    path: self.path.clone(),
                    what: "decode",
                    source,
                }
            })?);
        }
        decoded.extend(queued);
        for r in decoded {
            match by_flow.get_mut(&r.id()) {
                Some(agg) => merge(agg, &r),
                None => {
                    by_flow.insert(r.id(), r);
                }
            }
        }
        let mut out: Vec<Flow> = by_flow.into_values().collect();
        out.sort_by_key(|f| std::cmp::Reverse(f.last_seen));
        Ok(out)
    }

    /// The periods the agent was recording that overlap `from..=to`, oldest first.
    pub fn coverage(&self, from: u64, to: u64) -> Result<Vec<Period>, HistoryError> {
        let read = || -> Result<Vec<Period>, redb::Error> {
            let txn = self.db.begin_read()?;
            let coverage = txn.open_table(COVERAGE)?;
            let mut out = Vec::new();
            for item in coverage.range(..=to)? {
                let (k, v) = item?;
                let p = Period {
                    from: k.value(),
                    to: v.value(),
                };
                if p.to >= from {
                    out.push(p);
                }
            }
            Ok(out)
        };
        match read() {
            Ok(p) => Ok(p),
            Err(redb::Error::TableDoesNotExist(_)) => Ok(Vec::new()),
            Err(e) => Err(self.db_err()(e)),
        }
    }
}

#[cfg(test)]
mod tests;
