//! The audit trail's writer: a bounded channel drained by one thread that stores the queued
//! audit records in one spool transaction per batch.
//!
//! A `node.invoke` hands its record over with [`AuditWriter::offer`] and goes on: it never
//! waits for the disk, a thread or a lock held by the disk (the record was never awaited
//! before either: it was written by a blocking task of its own, one SQLite transaction per
//! invoke, on the invoke's path). When the channel is full the record is dropped and counted
//! ([`AuditWriter::dropped`], and as `overflow_dropped` of the gateway's origin in the spool,
//! so `clawmesh logs` shows it); the invoke still goes on.
//!
//! The writer sleeps while nothing is queued. The first record after a quiet spell wakes it;
//! it then waits [`LINGER`] so that the records of the invokes meanwhile join the batch
//! without waking it again (under load an invoke costs a channel push, not a thread wake), and
//! appends up to [`WRITE_BATCH`] records in one transaction, in the order they were offered.
//!
//! Durability: a record is in the spool at most [`LINGER`] plus one transaction after its
//! invoke answered. [`AuditWriter::flush`] returns once everything offered before it is
//! stored; the gateway calls it when it stops (SIGINT/SIGTERM), so a stop loses no record of
//! an invoke it answered. A process killed outright loses what was still queued (at most the
//! last [`LINGER`]), as it lost a record whose blocking task had not run before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use super::record::{audit_line, now_ms, Audit, Entry, Level};
use super::spool::Spool;

/// Records queued between the invokes and the writer at most: 16 384 (a few MB) is over a
/// second of invokes at the benchmark's sequential rate, and far more than a [`LINGER`] of
/// them at any rate a gateway reaches, so only a disk that stalls for seconds makes it drop.
pub const AUDIT_CAPACITY: usize = 16_384;

/// Records appended per transaction at most: one transaction holds the spool briefly, and
/// a full channel drains in two.
pub const WRITE_BATCH: usize = 8_192;

/// How long the writer waits after the first record of a batch for more: 5 ms is short next
/// to any human or shipping interval (5 s), and long enough that invokes arriving every few
/// hundred microseconds share one transaction and one wake-up.
pub const LINGER: Duration = Duration::from_millis(5);

enum Msg {
    Record(u64, Box<Audit>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
    unreported: Arc<AtomicU64>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Record(ts, a) => write!(f, "Record({ts}, {})", a.key),
            Msg::Flush(_) => f.write_str("Flush"),
        }
    }
}

/// The receiving side before its thread runs (see [`AuditWriter::channel`]).
pub struct AuditQueue {
    rx: mpsc::Receiver<Msg>,
    unreported: Arc<AtomicU64>,
}

impl AuditWriter {
    /// Starts the writer thread storing into `spool` under origin `gateway`, with room for
    /// `capacity` queued records.
    pub fn start(spool: Spool, gateway: &str, capacity: usize) -> std::io::Result<AuditWriter> {
        let (w, q) = AuditWriter::channel(capacity);
        q.run(spool, gateway)?;
        Ok(w)
    }

    /// A writer whose queue is not drained yet: records wait (and a full queue drops) until
    /// [`AuditQueue::run`] starts the thread. For tests of the bound.
    pub fn channel(capacity: usize) -> (AuditWriter, AuditQueue) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let unreported = Arc::new(AtomicU64::new(0));
        (
            AuditWriter {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
                unreported: unreported.clone(),
            },
            AuditQueue { rx, unreported },
        )
    }

    /// Queues one record without waiting; a full queue (or a stopped writer) drops it and
    /// counts it. The record's time is now (the invoke's end).
    pub fn offer(&self, a: Audit) {
        match self.tx.try_send(Msg::Record(now_ms(), Box::new(a))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.unreported.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped because the queue was full, since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Returns once every record offered before this call is stored (or could not be: the
    /// writer reports spool errors on stderr), or after `deadline`; false on the deadline or
    /// a stopped writer.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let (ack, done) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        // `send` waits only while the queue is full, which the writer is draining.
        let queued = tokio::task::spawn_blocking(move || tx.send(Msg::Flush(ack)).is_ok());
        tokio::time::timeout(deadline, async {
            matches!(queued.await, Ok(true)) && done.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

impl AuditQueue {
    /// Starts the writer thread.
    pub fn run(self, spool: Spool, gateway: &str) -> std::io::Result<()> {
        let gateway = gateway.to_string();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || self.drain(&spool, &gateway))?;
        Ok(())
    }

    fn drain(self, spool: &Spool, gateway: &str) {
        let mut batch: Vec<Entry> = Vec::new();
        let mut acks = Vec::new();
        loop {
            // Sleep until there is something; wake once a second anyway so drops are
            // reported while idle.
            let first = match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut next = first;
            if matches!(next, Some(Msg::Record(..))) {
                std::thread::sleep(LINGER);
            }
            while let Some(m) = next.take() {
                match m {
                    Msg::Record(ts_ms, a) => batch.push(Entry {
                        ts_ms,
                        level: Level::Audit,
                        node: None,
                        target: "audit".into(),
                        message: audit_line(&a),
                        audit: Some(*a),
                    }),
                    Msg::Flush(ack) => acks.push(ack),
                }
                if batch.len() >= WRITE_BATCH {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            if !batch.is_empty() {
                if let Err(e) = spool.append(gateway, std::mem::take(&mut batch)) {
                    // Not through tracing: a log call about the spool would go to the spool.
                    eprintln!("audit records not spooled: {e}");
                }
            }
            let lost = self.unreported.swap(0, Ordering::Relaxed);
            if lost > 0 {
                if let Err(e) = spool.add_overflow(gateway, lost) {
                    eprintln!("audit drops not counted in the spool: {e}");
                }
            }
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::record::Outcome;
    use crate::logs::spool::SpoolLimits;
    use std::collections::HashMap;

    fn audit(key: String) -> Audit {
        Audit {
            caller: "token:test".into(),
            entry_gateway: "tokyo".into(),
            node: "n1".into(),
            command: "system.which".into(),
            argv: Vec::new(),
            exit_code: None,
            duration_ms: 0,
            outcome: Outcome::Ok,
            key,
        }
    }

    fn stored(spool: &Spool) -> Vec<(u64, String)> {
        let p = spool
            .pending(0, &HashMap::new(), 1_000_000, 1 << 30)
            .unwrap();
        p.records()
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, r.audit.map(|a| a.key).unwrap_or_default()))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_are_all_stored_in_order_per_sender() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let w = AuditWriter::start(spool.clone(), "tokyo", AUDIT_CAPACITY).unwrap();
        let senders = 8;
        let each = 500;
        let tasks: Vec<_> = (0..senders)
            .map(|s| {
                let w = w.clone();
                tokio::spawn(async move {
                    for i in 0..each {
                        w.offer(audit(format!("{s}-{i}")));
                        if i % 50 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(w.flush(Duration::from_secs(30)).await);
        assert_eq!(w.dropped(), 0);
        let got = stored(&spool);
        assert_eq!(got.len(), senders * each);
        // One origin, numbered 1, 2, 3, ... with no gap.
        for (i, (seq, _)) in got.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
        }
        // Each sender's records in the order it offered them.
        let mut next = vec![0usize; senders];
        for (_, key) in &got {
            let (s, i) = key.split_once('-').unwrap();
            let (s, i): (usize, usize) = (s.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[s], "sender {s} out of order");
            next[s] += 1;
        }
        let r = spool.pending(0, &HashMap::new(), 1, 1 << 30).unwrap();
        let first = &r.records().unwrap()[0];
        assert_eq!(first.level, Level::Audit);
        assert_eq!(first.origin, "tokyo");
        assert!(first.message.contains("system.which on n1"), "{first:?}");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        // No writer yet: the queue fills. A blocking offer would hang this test here.
        let (w, q) = AuditWriter::channel(4);
        for i in 0..10 {
            w.offer(audit(format!("k{i}")));
        }
        assert_eq!(w.dropped(), 6);
        q.run(spool.clone(), "tokyo").unwrap();
        assert!(w.flush(Duration::from_secs(30)).await);
        let keys: Vec<String> = stored(&spool).into_iter().map(|(_, k)| k).collect();
        assert_eq!(keys, ["k0", "k1", "k2", "k3"]);
        let d = spool.drops();
        let own = d.iter().find(|d| d.origin == "tokyo").unwrap();
        assert_eq!(own.overflow_dropped, 6, "{d:?}");
        // Room again once drained.
        w.offer(audit("k10".into()));
        assert!(w.flush(Duration::from_secs(30)).await);
        assert_eq!(stored(&spool).last().unwrap().1, "k10");
        assert_eq!(w.dropped(), 6);
    }

    #[tokio::test]
    async fn flush_waits_for_records_still_lingering() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolLimits::default()).unwrap();
        let w = AuditWriter::start(spool.clone(), "tokyo", 64).unwrap();
        // Offered and flushed at once: the writer is inside its linger (or not yet awake);
        // the flush returns only after the record is stored.
        w.offer(audit("last".into()));
        assert!(w.flush(Duration::from_secs(30)).await);
        assert_eq!(stored(&spool), [(1, "last".to_string())]);
        // A stopped writer: a flush says so instead of hanging.
        let (w2, q2) = AuditWriter::channel(4);
        drop(q2);
        assert!(!w2.flush(Duration::from_secs(5)).await);
        w2.offer(audit("x".into()));
        assert_eq!(w2.dropped(), 1);
    }
}
