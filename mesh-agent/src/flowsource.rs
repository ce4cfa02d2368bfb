//! Where the agent's flows come from, as of the moment they are asked for.
//!
//! The datapath counts packets per flow in the kernel (`wm_flows`, IPv6: `wm_flows6`) and writes
//! a record to the ring buffer (`wm_events`) at most once a second per flow; an idle flow keeps
//! the rest as a backlog in the map. [`FlowSource`] is the one place that turns ring-buffer
//! records into the flow table, the flow history, the JSON-lines export, the flow metrics and
//! the coverage window. The reader thread feeds it as records arrive
//! ([`FlowSource::run_reader`]); a request ([`FlowSource::live`], [`FlowSource::history`]) first
//! drains whatever the ring holds (a history request also writes the history, so what it
//! answers is on disk), then reads the backlog of both families, so `/flows` (and `meshctl
//! flows`/`meshctl report`, which read it) count every packet the kernel has counted at request
//! time — not as of the reader's last poll or the history's last 2 s flush.
//!
//! Consistency between the two kernel sources: a record moves packets out of the backlog into
//! the ring. The request drains the ring, reads the backlog, and drains again; if the second
//! drain found records (the kernel wrote one in between), their packets may be in the backlog
//! just read, so it reads the backlog again (a few rounds at most: a flow writes a record at
//! most once a second). Packets are never counted twice; a record the kernel is writing at
//! that very instant may be missing from one answer and present in the next.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    coverage::CoverageWindow,
    export::Export,
    flows::{
        Backlog, Event, Flow, FlowTable, Names, SharedFlows, SharedNames, backlog_sums, unix_now,
    },
    history::{BUCKET_SECS, History, HistoryError, Period},
    metrics::{EvictionLabels, Metrics, StageLabels, VerdictLabels},
    status::SharedStatus,
};

/// How often the reader thread writes the flow history and refreshes the coverage metrics.
pub const HISTORY_FLUSH: Duration = Duration::from_secs(2);

/// Most flows the coverage window tracks.
const COVERAGE_CAPACITY: usize = 65_536;

/// Rounds of drain + backlog read before an answer is given as it is.
const CONSISTENT_ROUNDS: usize = 4;

/// The kernel side: the ring buffer and the backlog map (a trait so the request-time logic is
/// tested without a kernel).
pub trait KernelFlows: Send {
    /// The records (both families) in the ring now, without waiting.
    fn read_ready(&mut self) -> Vec<wiremesh_bpf::Flow>;
    /// What each flow (both families) has counted but not written as a record yet.
    fn backlog(&self) -> Result<Backlog, String>;
}

/// The loaded datapath's ring buffer and a handle on its pinned `wm_flows` and `wm_flows6`.
pub struct BpfKernel {
    pub reader: wiremesh_bpf::FlowReader,
    pub backlog: Option<wiremesh_bpf::FlowBacklog>,
}

impl KernelFlows for BpfKernel {
    fn read_ready(&mut self) -> Vec<wiremesh_bpf::Flow> {
        self.reader.read_ready_any()
    }

    fn backlog(&self) -> Result<Backlog, String> {
        match &self.backlog {
            Some(b) => Ok(Backlog {
                v4: b.read().map_err(|e| e.to_string())?,
                v6: b.read6().map_err(|e| e.to_string())?,
            }),
            None => Ok(Backlog::default()),
        }
    }
}

/// See the module docs. Shared as `Arc<FlowSource>` between the steering task, its reader
/// thread and the API server.
pub struct FlowSource {
    table: SharedFlows,
    names: SharedNames,
    metrics: Metrics,
    history: Option<Arc<History>>,
    peer_status: Option<SharedStatus>,
    export: Option<Mutex<Export>>,
    coverage: Mutex<CoverageWindow>,
    /// Held while records go from the kernel into the table, so they go in order.
    kernel: Mutex<Option<Box<dyn KernelFlows>>>,
}

impl FlowSource {
    /// A source with a flow table of `capacity` flows and a coverage window of `window`.
    pub fn new(capacity: usize, window: Duration, metrics: Metrics) -> Self {
        Self {
            table: Arc::new(Mutex::new(FlowTable::new(capacity))),
            names: SharedNames::default(),
            metrics,
            history: None,
            peer_status: None,
            export: None,
            coverage: Mutex::new(CoverageWindow::new(window, COVERAGE_CAPACITY)),
            kernel: Mutex::new(None),
        }
    }

    /// Also writes every record to `history`; the coverage window starts from what the history
    /// holds for it (so a restarted agent's coverage still counts the flows before).
    pub fn with_history(mut self, history: Arc<History>) -> Self {
        let now = unix_now();
        let window = self.lock_coverage().window().as_secs();
        match history.query(now.saturating_sub(window), now) {
            Ok(flows) => self.lock_coverage().add(&flows),
            Err(error) => tracing::warn!(%error, "coverage window: reading the flow history"),
        }
        self.history = Some(history);
        self
    }

    /// Takes each peer's handshake and configured key for the flow evidence from the status
    /// reporter's latest report.
    pub fn with_peer_status(mut self, status: SharedStatus) -> Self {
        self.peer_status = Some(status);
        self
    }

    /// Also appends every record to the JSON-lines export, when there is one.
    pub fn with_export(mut self, export: Option<Export>) -> Self {
        self.export = export.map(Mutex::new);
        self
    }

    /// The names flow records are given (written by the steering task).
    pub fn names(&self) -> &SharedNames {
        &self.names
    }

    /// The flow table.
    pub fn table(&self) -> &SharedFlows {
        &self.table
    }

    fn lock_coverage(&self) -> std::sync::MutexGuard<'_, CoverageWindow> {
        self.coverage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_kernel(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn KernelFlows>>> {
        self.kernel.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads from `kernel` from now on (a reload replaces the previous one).
    pub fn attach(&self, kernel: Box<dyn KernelFlows>) {
        *self.lock_kernel() = Some(kernel);
    }

    /// Adds a batch of ring-buffer records: flow table, metrics, history, export, coverage.
    pub fn ingest<E: Copy + Into<Event>>(&self, events: &[E]) {
        self.ingest_at(events, unix_now());
    }

    fn ingest_at<E: Copy + Into<Event>>(&self, events: &[E], now: u64) {
        if events.is_empty() {
            return;
        }
        let mut names = self.names.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(status) = &self.peer_status {
            add_handshakes(&mut names, status);
        }
        let (ingested, len) = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            (table.ingest_at(events, &names, now), table.len())
        };
        let metrics = &self.metrics;
        for (verdict, n) in ingested.new_flows {
            metrics
                .flows
                .get_or_create(&VerdictLabels { verdict })
                .inc_by(n);
        }
        for (verdict, n) in ingested.packets {
            metrics
                .flow_packets
                .get_or_create(&VerdictLabels { verdict })
                .inc_by(n);
        }
        metrics.flows_evicted.inc_by(ingested.evicted);
        metrics.flow_table_flows.set(len as i64);
        self.lock_coverage().add(&ingested.records);
        if let Some(h) = &self.history {
            h.add(&ingested.records);
        }
        if let Some(export) = &self.export
            && let Err(error) = export
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(&ingested.records)
        {
            tracing::warn!(%error, "exporting flow records");
            metrics
                .ebpf_errors
                .get_or_create(&StageLabels {
                    stage: "flow-export",
                })
                .inc();
        }
    }

    /// Moves whatever the ring holds into the table; returns how many records.
    pub fn drain(&self) -> usize {
        let mut kernel = self.lock_kernel();
        let Some(k) = kernel.as_mut() else { return 0 };
        let events = k.read_ready();
        self.ingest(&events);
        events.len()
    }

    /// Runs `f` with the ring drained and the backlog read consistently (module docs; `None`
    /// without a loaded datapath or when the backlog cannot be read), holding the kernel side
    /// so no record enters the table or the history until `f` returns.
    fn with_drained<T>(&self, f: impl FnOnce(Option<&Backlog>) -> T) -> T {
        let mut kernel = self.lock_kernel();
        let mut backlog = None;
        if let Some(k) = kernel.as_mut() {
            let events = k.read_ready();
            self.ingest(&events);
            for _ in 0..CONSISTENT_ROUNDS {
                match k.backlog() {
                    Ok(read) => backlog = Some(read),
                    Err(error) => {
                        tracing::debug!(%error, "reading the flow backlog");
                        backlog = None;
                        break;
                    }
                }
                let later = k.read_ready();
                if later.is_empty() {
                    break;
                }
                self.ingest(&later);
            }
        }
        let out = f(backlog.as_ref());
        drop(kernel);
        out
    }

    /// The flow table as of now: the ring drained, the backlog added (`pending_*`).
    pub fn live(&self) -> Vec<Flow> {
        self.with_drained(|backlog| {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = backlog {
                table.set_backlog(b);
            }
            table.snapshot()
        })
    }

    /// The flow history between `from` and `to` (see [`History::query`]) as of now: the ring
    /// drained and the history written first, and — when the window reaches the current bucket —
    /// the kernel's backlog added to its flows (`pending_*`; it stays in the pinned map, which
    /// outlives the agent, until the kernel writes it as a record).
    pub fn history(&self, from: u64, to: u64) -> Result<(Vec<Flow>, Vec<Period>), HistoryError> {
        let Some(history) = &self.history else {
            return Ok((Vec::new(), Vec::new()));
        };
        let now = unix_now();
        let flows = self.with_drained(|backlog| {
            // Written first: what a request saw is on disk, so it survives a crash right after.
            self.flush_history(history, now);
            let mut flows = history.query(from, to)?;
            if to >= now - now % BUCKET_SECS
                && let Some(b) = backlog
            {
                add_backlog(&mut flows, b);
            }
            Ok::<_, HistoryError>(flows)
        })?;
        Ok((flows, history.coverage(from, to)?))
    }

    /// Whether the source keeps a history.
    pub fn has_history(&self) -> bool {
        self.history.is_some()
    }

    /// Writes the history's queued records and updates the coverage metrics.
    pub fn flush(&self) {
        let now = unix_now();
        let counts = self.lock_coverage().counts(now);
        self.metrics.set_coverage(&counts);
        if let Some(history) = &self.history {
            self.flush_history(history, now);
        }
    }

    fn flush_history(&self, history: &History, now: u64) {
        match history.flush(now) {
            Ok(done) => {
                let m = &self.metrics;
                m.flow_history_evicted
                    .get_or_create(&EvictionLabels {
                        reason: "retention",
                    })
                    .inc_by(done.expired);
                m.flow_history_evicted
                    .get_or_create(&EvictionLabels { reason: "size" })
                    .inc_by(done.evicted);
                m.flow_history_records.set(done.records as i64);
            }
            Err(error) => {
                tracing::warn!(%error, "writing the flow history");
                self.metrics
                    .ebpf_errors
                    .get_or_create(&StageLabels {
                        stage: "flow-history",
                    })
                    .inc();
            }
        }
    }

    /// The reader thread's loop until `stop`: waits for records on `waiter` (without holding
    /// the reader, so a request can drain meanwhile), drains them, and flushes every
    /// [`HISTORY_FLUSH`] and at the end.
    pub fn run_reader(&self, waiter: wiremesh_bpf::RingWaiter, stop: &AtomicBool) {
        let mut flushed = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if let Err(error) = waiter.wait(Duration::from_millis(200)) {
                tracing::warn!(%error, "waiting for flow records");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            self.drain();
            if flushed.elapsed() >= HISTORY_FLUSH {
                self.flush();
                flushed = Instant::now();
            }
        }
        self.drain();
        self.flush();
    }
}

/// Each peer's configured key fingerprint and last handshake from the status report.
fn add_handshakes(names: &mut Names, status: &SharedStatus) {
    let guard = status.lock().unwrap_or_else(|e| e.into_inner());
    let Some(report) = guard.as_ref() else { return };
    for peer in &report.peers {
        let info = names.peers.entry(peer.node.clone()).or_default();
        info.key_fingerprint = Some(peer.key.clone());
        info.last_handshake = peer.last_handshake;
    }
}

/// Adds the backlog to the flows it belongs to (`packets`/`bytes` and `pending_*`).
fn add_backlog(flows: &mut [Flow], backlog: &Backlog) {
    let sums = backlog_sums(backlog);
    for f in flows {
        if let Some((p, b)) = sums.get(&f.id()) {
            f.pending_packets = *p;
            f.pending_bytes = *b;
            f.packets += p;
            f.bytes += b;
        }
    }
}

#[cfg(test)]
mod tests;
