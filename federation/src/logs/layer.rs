//! The hand-off from code that logs to the spool: a tracing [`Layer`] and a bounded channel
//! drained by one writer thread.
//!
//! The caller's thread formats the event and offers it to the channel (`try_send`); it never
//! waits for the disk. When the channel is full the record is counted (`overflow_dropped` of
//! its origin) and the caller goes on. The writer thread takes whatever is queued, up to
//! [`WRITE_BATCH`] at a time, and appends it to the spool in one transaction. Records still in
//! the channel when the process is killed are lost; everything the writer appended is not.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use super::record::{now_ms, Entry, Level};
use super::spool::{origin_of, Spool};

/// Entries queued between the callers and the writer at most: 65 536 absorbs a burst of a
/// quarter second at the benchmark's rate while the disk catches up. The channel holds boxed
/// entries: std's bounded channel allocates and writes every slot when it is made, so a slot
/// of a whole [`Entry`] (about 270 bytes, its audit record inline) cost every gateway 17 MB
/// of resident memory before any log line; a box is 8 bytes (1 MB for the slots), and the
/// entries themselves take memory only while they wait.
pub const HANDOFF_CAPACITY: usize = 65_536;

/// Entries the writer appends per transaction at most: large enough that the fsync-free WAL
/// commit is amortised, small enough that one transaction holds the spool briefly.
pub const WRITE_BATCH: usize = 8_192;

#[derive(Debug, Default)]
struct Overflow {
    own: AtomicU64,
    nodes: Mutex<HashMap<String, u64>>,
}

/// The sending side of the hand-off; cheap to clone.
#[derive(Debug, Clone)]
pub struct Handoff {
    tx: SyncSender<Box<Entry>>,
    overflow: Arc<Overflow>,
    offered: Arc<AtomicU64>,
}

impl Handoff {
    /// Offers one entry without waiting; a full channel counts it against its origin.
    pub fn offer(&self, e: Entry) {
        self.offered.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Box::new(e)) {
            Ok(()) => {}
            Err(TrySendError::Full(e)) | Err(TrySendError::Disconnected(e)) => match e.node {
                None => {
                    self.overflow.own.fetch_add(1, Ordering::Relaxed);
                }
                Some(node) => {
                    let mut m = self
                        .overflow
                        .nodes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    *m.entry(node).or_default() += 1;
                }
            },
        }
    }

    /// Takes the count of entries the channel had no room for since the last call (all
    /// origins together).
    pub fn take_overflow(&self) -> u64 {
        let nodes: u64 = std::mem::take(
            &mut *self
                .overflow
                .nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
        .values()
        .sum();
        self.overflow.own.swap(0, Ordering::Relaxed) + nodes
    }

    /// Entries offered so far (accepted or not).
    pub fn offered(&self) -> u64 {
        self.offered.load(Ordering::Relaxed)
    }

    /// Counts `n` records of `node` that were lost before they reached this gateway (the
    /// node's own hand-off overflowed).
    pub fn count_lost(&self, node: &str, n: u64) {
        if n > 0 {
            let mut m = self
                .overflow
                .nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *m.entry(node.to_string()).or_default() += n;
        }
    }
}

/// A hand-off without a spool: what callers offer waits in the returned receiver (a node
/// host drains it and sends the entries to its gateway).
pub fn channel(capacity: usize) -> (Handoff, mpsc::Receiver<Box<Entry>>) {
    let (tx, rx) = mpsc::sync_channel::<Box<Entry>>(capacity);
    (
        Handoff {
            tx,
            overflow: Arc::new(Overflow::default()),
            offered: Arc::new(AtomicU64::new(0)),
        },
        rx,
    )
}

/// Starts the writer thread for `spool`, numbering entries under `gateway`; returns the
/// hand-off that callers (the [`SpoolLayer`], node sessions, the audit trail) offer to.
pub fn start_writer(spool: Spool, gateway: &str, capacity: usize) -> std::io::Result<Handoff> {
    let (tx, rx) = mpsc::sync_channel::<Box<Entry>>(capacity);
    let overflow = Arc::new(Overflow::default());
    let ov = overflow.clone();
    let gateway = gateway.to_string();
    std::thread::Builder::new()
        .name("log-spool".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(WRITE_BATCH);
            loop {
                // Wake at least once a second so overflow counts reach the spool while idle.
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(e) => buf.push(*e),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                while buf.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(e) => buf.push(*e),
                        Err(_) => break,
                    }
                }
                if !buf.is_empty() {
                    if let Err(e) = spool.append(&gateway, std::mem::take(&mut buf)) {
                        // Not through tracing: that would feed this thread its own failure.
                        eprintln!("log spool append failed: {e}");
                    }
                }
                let own = ov.own.swap(0, Ordering::Relaxed);
                let nodes =
                    std::mem::take(&mut *ov.nodes.lock().unwrap_or_else(|p| p.into_inner()));
                let _ = spool.add_overflow(&gateway, own);
                for (n, c) in nodes {
                    let _ = spool.add_overflow(&origin_of(&gateway, Some(&n)), c);
                }
            }
        })?;
    Ok(Handoff {
        tx,
        overflow,
        offered: Arc::new(AtomicU64::new(0)),
    })
}

/// The tracing layer: every event at or above the configured level goes to the hand-off.
///
/// A process installs its subscriber before it knows whether it will be a gateway (and under
/// which name): the layer may start without a hand-off ([`SpoolLayer::unattached`]) and get
/// one later ([`SpoolLayer::attach`]); until then it ignores events at the cost of one load.
#[derive(Debug, Clone)]
pub struct SpoolLayer {
    handoff: Arc<std::sync::OnceLock<Handoff>>,
    max_level: Arc<AtomicU8>,
}

impl SpoolLayer {
    /// A layer that offers events up to `max_level` (e.g. `Info`) to `handoff`.
    pub fn new(handoff: Handoff, max_level: Level) -> SpoolLayer {
        let layer = SpoolLayer::unattached(max_level);
        layer.attach(handoff);
        layer
    }

    /// A layer without a hand-off yet (events are ignored until [`SpoolLayer::attach`]).
    pub fn unattached(max_level: Level) -> SpoolLayer {
        SpoolLayer {
            handoff: Arc::new(std::sync::OnceLock::new()),
            max_level: Arc::new(AtomicU8::new(max_level.as_u8())),
        }
    }

    /// Gives the layer its hand-off (once; a second call is ignored).
    pub fn attach(&self, handoff: Handoff) {
        let _ = self.handoff.set(handoff);
    }

    /// Changes the level live (the shared config's log level).
    pub fn set_level(&self, level: Level) {
        self.max_level.store(level.as_u8(), Ordering::Relaxed);
    }
}

impl<S: Subscriber> Layer<S> for SpoolLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(handoff) = self.handoff.get() else {
            return;
        };
        let meta = event.metadata();
        let level = Level::from_tracing(meta.level());
        if level.as_u8() > self.max_level.load(Ordering::Relaxed) {
            return;
        }
        // The shipping path's own detail would log about every batch it ships.
        if level > Level::Info && meta.target().starts_with("clawmesh_federation::logs") {
            return;
        }
        let mut v = Fields::default();
        event.record(&mut v);
        handoff.offer(Entry {
            ts_ms: now_ms(),
            level,
            node: None,
            target: meta.target().to_string(),
            message: v.text,
            audit: None,
        });
    }
}

/// Renders an event as `message key=value ...`.
#[derive(Default)]
struct Fields {
    text: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text.insert_str(0, value);
        } else {
            let _ = write!(self.text, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let m = format!("{value:?}");
            self.text.insert_str(0, &m);
        } else {
            let _ = write!(self.text, " {}={:?}", field.name(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::spool::SpoolLimits;
    use std::collections::HashMap;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn events_reach_the_spool_and_overflow_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let handoff = start_writer(spool.clone(), "tokyo", 16).unwrap();
        let layer = SpoolLayer::new(handoff.clone(), Level::Info);
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            tracing::info!(peer = "x", "hello");
            tracing::debug!("filtered out");
            // Far more than the channel holds, at once: some overflow.
            for i in 0..10_000 {
                tracing::warn!(i, "burst");
            }
        });
        handoff.count_lost("n1", 4);
        let want = 10_001;
        for _ in 0..300 {
            let held = spool.stats().unwrap().records;
            let d = spool.drops();
            let over: u64 = d
                .iter()
                .filter(|d| d.origin == "tokyo")
                .map(|d| d.overflow_dropped)
                .sum();
            if held + over == want && d.iter().any(|d| d.origin == "tokyo/n1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let p = spool.pending(0, &HashMap::new(), 100_000, 1 << 30).unwrap();
        let p_records = p.records().unwrap();
        assert_eq!(p_records[0].message, "hello peer=x");
        let d = spool.drops();
        let own = d.iter().find(|d| d.origin == "tokyo").unwrap();
        assert_eq!(p_records.len() as u64 + own.overflow_dropped, want, "{d:?}");
        assert!(own.overflow_dropped > 0);
        assert_eq!(
            d.iter()
                .find(|d| d.origin == "tokyo/n1")
                .unwrap()
                .overflow_dropped,
            4
        );
        assert_eq!(handoff.offered(), want);
    }
}
