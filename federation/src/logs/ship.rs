//! Shipping: batches from the spool to the current collector, acknowledged after the
//! collector's durable write.
//!
//! The loop wakes every batch interval (`logging.remote.batchInterval`, default 5 s) or as
//! soon as a full batch is waiting, asks the [`Router`] where the collector is now, and:
//!
//! - on a new collector (another primary, or the same one with a new store id), asks for its
//!   [`Cursor`] and sends everything the spool still holds beyond it, acknowledged or not:
//!   that is the backfill that lets a new primary show what the old one had stored;
//! - sends batches in spool order, one at a time, each acknowledged before the next
//!   (`Ack` comes after the collector's commit), and marks them acknowledged in the spool;
//! - after any failure (link drop, timeout, collector killed) forgets the cursor and asks
//!   again: the collector's highest stored sequence numbers are the resume point, and
//!   whatever is sent twice is dropped there by (origin, seq).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use super::collector::{Ack, Batch, Collector, Cursor};
use super::record::now_ms;
use super::spool::Spool;
use crate::rpc::BoxFuture;

/// Why a batch or cursor request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShipError {
    /// The collector could not be reached or did not answer.
    #[error("collector {collector} unreachable: {reason}")]
    Unreachable {
        /// Which.
        collector: String,
        /// Why.
        reason: String,
    },
    /// The collector refused (not the primary any more, store error).
    #[error("collector {collector} refused: {reason}")]
    Refused {
        /// Which.
        collector: String,
        /// Why.
        reason: String,
    },
}

/// How long a collector holds a pipelined batch whose predecessor has not been stored yet:
/// the predecessor left at most a few batch times earlier on the same link, so 10 s means it
/// is lost, and the shipper resumes from the cursor.
pub const ORDER_WAIT: Duration = Duration::from_secs(10);

/// Where batches go: the local store or a remote gateway.
pub trait Destination: Send + Sync + 'static {
    /// What the collector holds.
    fn cursor(&self) -> BoxFuture<Result<Cursor, ShipError>>;
    /// Stores a batch; answers after it is durable.
    fn push(&self, batch: Batch) -> BoxFuture<Result<Ack, ShipError>>;
}

/// Says where the collector is right now.
pub trait Router: Send + Sync + 'static {
    /// The collector's name and a way to reach it (`None`: no primary known right now).
    fn route(&self) -> Option<(String, Arc<dyn Destination>)>;
}

/// This gateway's own store, when it is the primary.
#[derive(Debug, Clone)]
pub struct LocalDestination(pub Collector);

impl Destination for LocalDestination {
    fn cursor(&self) -> BoxFuture<Result<Cursor, ShipError>> {
        let c = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || c.cursor())
                .await
                .map_err(|e| refused_local(e.to_string()))?
                .map_err(|e| refused_local(e.to_string()))
        })
    }

    fn push(&self, batch: Batch) -> BoxFuture<Result<Ack, ShipError>> {
        let c = self.0.clone();
        Box::pin(async move {
            c.ingest_in_order(batch, ORDER_WAIT)
                .await
                .map_err(|e| refused_local(e.to_string()))
        })
    }
}

fn refused_local(reason: String) -> ShipError {
    ShipError::Refused {
        collector: "local store".into(),
        reason,
    }
}

/// Shipping settings.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// This gateway's name.
    pub gateway: String,
    /// Time between batches (`logging.remote.batchInterval`).
    pub interval: Duration,
    /// Records per batch at most.
    pub max_records: usize,
    /// Record bytes per batch at most.
    pub max_bytes: usize,
}

impl ShipConfig {
    /// The defaults for `gateway`: 5 s interval (the seed's `batchInterval`), batches of at
    /// most 16 384 records or 2 MiB.
    pub fn new(gateway: &str) -> ShipConfig {
        ShipConfig {
            gateway: gateway.to_string(),
            interval: Duration::from_millis(5000),
            // 16 384 records: a stop-and-wait batch across a 90 ms round trip then carries
            // well over 100 000 records a second; more only grows the reply latency.
            max_records: 16_384,
            // 2 MiB of postcard: with base64 growth and no compression still inside the
            // 4 MiB frame bound.
            max_bytes: 2 << 20,
        }
    }
}

/// Counters of a shipper, for status and benchmarks.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Records acknowledged by a collector.
    pub acked: AtomicU64,
    /// Batches acknowledged.
    pub batches: AtomicU64,
    /// Records the collector already had (resends after faults, backfills).
    pub duplicates: AtomicU64,
    /// Failed attempts (each followed by a fresh cursor).
    pub failures: AtomicU64,
    /// Times the collector changed.
    pub switches: AtomicU64,
}

/// A running shipper.
#[derive(Debug)]
pub struct Shipper {
    stats: Arc<ShipStats>,
    kick: Arc<Notify>,
    interval: watch::Sender<Duration>,
    task: tokio::task::JoinHandle<()>,
}

impl Shipper {
    /// Starts shipping `spool` to wherever `router` says.
    pub fn spawn(spool: Spool, router: Arc<dyn Router>, cfg: ShipConfig) -> Shipper {
        let stats = Arc::new(ShipStats::default());
        let kick = spool.kick_handle(cfg.max_records as u64);
        let (interval, interval_rx) = watch::channel(cfg.interval);
        let task = tokio::spawn(run(
            spool,
            router,
            cfg,
            stats.clone(),
            kick.clone(),
            interval_rx,
        ));
        Shipper {
            stats,
            kick,
            interval,
            task,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ShipStats> {
        &self.stats
    }

    /// Ships now instead of at the next interval (tests, shutdown).
    pub fn flush(&self) {
        self.kick.notify_one();
    }

    /// Changes the batch interval live (a shared-config change).
    pub fn set_interval(&self, d: Duration) {
        self.interval.send_replace(d);
    }

    /// Stops shipping (what is spooled stays for the next start).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the loop is with one collector.
struct Session {
    name: String,
    dest: Arc<dyn Destination>,
    store_id: u64,
    held: HashMap<String, u64>,
    /// Spool position up to which this collector has everything.
    upto: i64,
}

async fn run(
    spool: Spool,
    router: Arc<dyn Router>,
    cfg: ShipConfig,
    stats: Arc<ShipStats>,
    kick: Arc<Notify>,
    mut interval: watch::Receiver<Duration>,
) {
    let mut session: Option<Session> = None;
    let mut last_prune = 0u64;
    loop {
        let wait = *interval.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = kick.notified() => {}
            _ = interval.changed() => continue,
        }
        let now = now_ms();
        // Age limits once a minute: pruning scans the spool, the batches do not.
        if now.saturating_sub(last_prune) >= 60_000 {
            last_prune = now;
            let s = spool.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.prune(now)).await {
                warn!("log spool prune failed: {e}");
            }
        }
        let Some((name, dest)) = router.route() else {
            debug!("no primary known; logs stay in the spool");
            continue;
        };
        if session.as_ref().is_none_or(|s| s.name != name) {
            if session.is_some() {
                stats.switches.fetch_add(1, Ordering::Relaxed);
            }
            session = None;
        }
        if session.is_none() {
            match dest.cursor().await {
                Ok(c) => {
                    debug!(collector = %name, origins = c.held.len(), "log collector cursor");
                    session = Some(Session {
                        name: name.clone(),
                        dest: dest.clone(),
                        store_id: c.store_id,
                        held: c.held.into_iter().collect(),
                        upto: 0,
                    });
                }
                Err(e) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    debug!("log cursor: {e}");
                    continue;
                }
            }
        }
        let Some(sess) = session.as_mut() else {
            continue;
        };
        // The same name may now be a different process or store: always push to what the
        // router says; a store id that changed sends us back to its cursor.
        sess.dest = dest;
        if let Err(e) = ship_all(&spool, sess, &cfg, &stats).await {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            debug!(
                "log shipping to {}: {e}; resuming from its cursor",
                sess.name
            );
            session = None;
            // Retry soon rather than after a full interval: a second is enough for a link
            // to redial or a new leader to be known, and short against a 5 s interval.
            tokio::time::sleep(Duration::from_secs(1).min(wait)).await;
            kick.notify_one();
        }
    }
}

/// Batches in flight at once. One batch at a time waits a round trip plus both ends' work
/// per batch; four overlap the collector's commit of one with the transfer of the next and
/// the remote's read of a third (the benchmark in docs/BENCHMARKS.md), yet hold at most
/// 4 x 2 MiB of encoded records in memory.
pub const WINDOW: usize = 4;

/// One batch on its way: where it ends in the spool, what it carries, its push.
struct InFlight {
    upto: i64,
    n: u64,
    task: tokio::task::JoinHandle<Result<Option<Ack>, ShipError>>,
}

/// Sends batches until the spool has nothing beyond the session's position: up to
/// [`WINDOW`] batches in flight, acknowledged in spool order (each batch names what the
/// collector must hold before it, so the collector stores them in that order too).
async fn ship_all(
    spool: &Spool,
    sess: &mut Session,
    cfg: &ShipConfig,
    stats: &ShipStats,
) -> Result<(), ShipError> {
    let mut flight: VecDeque<InFlight> = VecDeque::new();
    let res = fill_and_drain(spool, sess, cfg, stats, &mut flight).await;
    // A failure leaves the rest unacknowledged: stop their pushes (the collector dedupes
    // whatever of them it stores anyway).
    for f in flight {
        f.task.abort();
    }
    res
}

async fn fill_and_drain(
    spool: &Spool,
    sess: &mut Session,
    cfg: &ShipConfig,
    stats: &ShipStats,
    flight: &mut VecDeque<InFlight>,
) -> Result<(), ShipError> {
    // Where the next read starts: past everything in flight.
    let mut read_upto = sess.upto;
    // The last sequence number sent per origin: the `prev` of the next batch.
    let mut sent = sess.held.clone();
    let mut exhausted = false;
    loop {
        while !exhausted && flight.len() < WINDOW {
            let s = spool.clone();
            let held = std::mem::take(&mut sess.held);
            let (max_r, max_b) = (cfg.max_records, cfg.max_bytes);
            let (pending, held) = tokio::task::spawn_blocking(move || {
                let p = s.pending(read_upto, &held, max_r, max_b);
                (p, held)
            })
            .await
            .map_err(|e| local_err(sess, e.to_string()))?;
            sess.held = held;
            let pending = pending.map_err(|e| local_err(sess, e.to_string()))?;
            exhausted = !pending.more;
            if pending.bodies.is_empty() && pending.upto == read_upto {
                break;
            }
            read_upto = pending.upto;
            let n = pending.bodies.len() as u64;
            let task = if n == 0 {
                // Everything read was held already: acknowledge the position in turn.
                tokio::spawn(async { Ok(None) })
            } else {
                let mut prev = Vec::with_capacity(pending.origins.len());
                for (o, (_, last)) in &pending.origins {
                    prev.push((o.clone(), sent.get(o).copied().unwrap_or(0)));
                    sent.insert(o.clone(), *last);
                }
                let batch = Batch {
                    gateway: cfg.gateway.clone(),
                    store_id: sess.store_id,
                    records: pending.bodies,
                    prev,
                    drops: spool.drops(),
                };
                let dest = sess.dest.clone();
                tokio::spawn(async move { dest.push(batch).await.map(Some) })
            };
            flight.push_back(InFlight {
                upto: pending.upto,
                n,
                task,
            });
        }
        let Some(front) = flight.pop_front() else {
            // Everything sent is acknowledged: the next round's batches follow it.
            sess.held = sent;
            return Ok(());
        };
        let ack = front
            .task
            .await
            .map_err(|e| local_err(sess, e.to_string()))??;
        if let Some(ack) = &ack {
            if ack.store_id != sess.store_id {
                // A different store answered (its disk was replaced, or the name now
                // belongs to a new process): start over from its cursor.
                return Err(ShipError::Refused {
                    collector: sess.name.clone(),
                    reason: "store changed".into(),
                });
            }
        }
        let s = spool.clone();
        let upto = front.upto;
        tokio::task::spawn_blocking(move || s.ack(upto, now_ms()))
            .await
            .map_err(|e| local_err(sess, e.to_string()))?
            .map_err(|e| local_err(sess, e.to_string()))?;
        sess.upto = upto;
        if let Some(ack) = ack {
            stats.acked.fetch_add(front.n, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .duplicates
                .fetch_add(ack.duplicates, Ordering::Relaxed);
        }
    }
}

fn local_err(sess: &Session, reason: String) -> ShipError {
    ShipError::Refused {
        collector: sess.name.clone(),
        reason: format!("local spool: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::collector::{Query, StoreLimits};
    use crate::logs::record::{Entry, Level};
    use crate::logs::spool::SpoolLimits;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    /// A collector behind a switch that can fail pushes, or lose the ack after storing.
    struct Flaky {
        c: Collector,
        down: AtomicBool,
        lose_ack: AtomicBool,
    }

    impl Destination for Arc<Flaky> {
        fn cursor(&self) -> BoxFuture<Result<Cursor, ShipError>> {
            let me = self.clone();
            Box::pin(async move {
                if me.down.load(Ordering::SeqCst) {
                    return Err(unreach());
                }
                Ok(me.c.cursor().unwrap())
            })
        }
        fn push(&self, batch: Batch) -> BoxFuture<Result<Ack, ShipError>> {
            let me = self.clone();
            Box::pin(async move {
                if me.down.load(Ordering::SeqCst) {
                    return Err(unreach());
                }
                let ack = me.c.ingest_in_order(batch, ORDER_WAIT).await.map_err(|e| {
                    ShipError::Refused {
                        collector: "x".into(),
                        reason: e.to_string(),
                    }
                })?;
                if me.lose_ack.swap(false, Ordering::SeqCst) {
                    return Err(unreach());
                }
                Ok(ack)
            })
        }
    }

    fn unreach() -> ShipError {
        ShipError::Unreachable {
            collector: "x".into(),
            reason: "cut".into(),
        }
    }

    struct Switch(Mutex<Option<(String, Arc<dyn Destination>)>>);
    impl Router for Switch {
        fn route(&self) -> Option<(String, Arc<dyn Destination>)> {
            self.0.lock().unwrap().clone()
        }
    }

    fn entries(n: usize, tag: &str) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                ts_ms: now_ms(),
                level: Level::Info,
                node: None,
                target: "t".into(),
                message: format!("{tag} {i}"),
                audit: None,
            })
            .collect()
    }

    fn seqs(c: &Collector, origin: &str) -> Vec<u64> {
        let mut v: Vec<u64> = c
            .query_now(&Query {
                limit: 100_000,
                ..Query::default()
            })
            .unwrap()
            .records
            .into_iter()
            .filter(|s| s.record.origin == origin)
            .map(|s| s.record.seq)
            .collect();
        v.sort();
        v
    }

    async fn until(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not met within 5 s");
    }

    fn flaky(dir: &std::path::Path) -> Arc<Flaky> {
        Arc::new(Flaky {
            c: Collector::open(dir, StoreLimits::default()).unwrap(),
            down: AtomicBool::new(false),
            lose_ack: AtomicBool::new(false),
        })
    }

    fn cfg() -> ShipConfig {
        ShipConfig {
            interval: Duration::from_millis(20),
            max_records: 7,
            ..ShipConfig::new("tokyo")
        }
    }

    #[tokio::test]
    async fn resumes_after_a_cut_and_a_lost_ack_without_gap_or_duplicate() {
        let (sd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spool = Spool::open(sd.path(), SpoolLimits::default()).unwrap();
        let dest = flaky(cd.path());
        let router = Arc::new(Switch(Mutex::new(Some((
            "primary".into(),
            Arc::new(dest.clone()) as Arc<dyn Destination>,
        )))));
        let shipper = Shipper::spawn(spool.clone(), router, cfg());
        spool.append("tokyo", entries(20, "a")).unwrap();
        until(|| seqs(&dest.c, "tokyo").len() == 20).await;
        // Cut: records pile up in the spool.
        dest.down.store(true, Ordering::SeqCst);
        spool.append("tokyo", entries(30, "b")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(seqs(&dest.c, "tokyo").len(), 20);
        // Heal, but the first ack after it is lost: the batch is stored, then sent again.
        dest.lose_ack.store(true, Ordering::SeqCst);
        dest.down.store(false, Ordering::SeqCst);
        until(|| seqs(&dest.c, "tokyo").len() == 50).await;
        assert_eq!(seqs(&dest.c, "tokyo"), (1..=50).collect::<Vec<_>>());
        until(|| spool.stats().unwrap().unacked == 0).await;
        assert!(shipper.stats().failures.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn a_new_collector_is_backfilled_from_retained_records() {
        let (sd, c1d, c2d) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let spool = Spool::open(sd.path(), SpoolLimits::default()).unwrap();
        let (d1, d2) = (flaky(c1d.path()), flaky(c2d.path()));
        let router = Arc::new(Switch(Mutex::new(Some((
            "one".into(),
            Arc::new(d1.clone()) as Arc<dyn Destination>,
        )))));
        let _shipper = Shipper::spawn(spool.clone(), router.clone(), cfg());
        spool.append("tokyo", entries(25, "a")).unwrap();
        until(|| spool.stats().unwrap().unacked == 0).await;
        // The primary changes (its disk is gone with it): the new one gets everything the
        // spool retains, acknowledged or not.
        *router.0.lock().unwrap() =
            Some(("two".into(), Arc::new(d2.clone()) as Arc<dyn Destination>));
        spool.append("tokyo", entries(5, "b")).unwrap();
        until(|| seqs(&d2.c, "tokyo").len() == 30).await;
        assert_eq!(seqs(&d2.c, "tokyo"), (1..=30).collect::<Vec<_>>());
        // Back to the first: it gets only what it lacks.
        *router.0.lock().unwrap() =
            Some(("one".into(), Arc::new(d1.clone()) as Arc<dyn Destination>));
        spool.append("tokyo", entries(1, "c")).unwrap();
        until(|| seqs(&d1.c, "tokyo").len() == 31).await;
        assert_eq!(seqs(&d1.c, "tokyo"), (1..=31).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_replaced_store_under_the_same_name_is_refilled() {
        let (sd, c1d, c2d) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let spool = Spool::open(sd.path(), SpoolLimits::default()).unwrap();
        let d1 = flaky(c1d.path());
        let router = Arc::new(Switch(Mutex::new(Some((
            "primary".into(),
            Arc::new(d1.clone()) as Arc<dyn Destination>,
        )))));
        let _shipper = Shipper::spawn(spool.clone(), router.clone(), cfg());
        spool.append("tokyo", entries(10, "a")).unwrap();
        until(|| spool.stats().unwrap().unacked == 0).await;
        // Same name, new disk: the first push is refused for its store id, the cursor is
        // asked again, and everything retained is sent.
        let d2 = flaky(c2d.path());
        *router.0.lock().unwrap() = Some((
            "primary".into(),
            Arc::new(d2.clone()) as Arc<dyn Destination>,
        ));
        spool.append("tokyo", entries(2, "b")).unwrap();
        until(|| seqs(&d2.c, "tokyo").len() == 12).await;
        assert_eq!(seqs(&d2.c, "tokyo"), (1..=12).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn spool_drops_reach_the_collector() {
        let (sd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let limits = SpoolLimits {
            max_bytes: 3_000,
            ..SpoolLimits::default()
        };
        let spool = Spool::open(sd.path(), limits).unwrap();
        let dest = flaky(cd.path());
        dest.down.store(true, Ordering::SeqCst);
        let router = Arc::new(Switch(Mutex::new(Some((
            "p".into(),
            Arc::new(dest.clone()) as Arc<dyn Destination>,
        )))));
        let _shipper = Shipper::spawn(spool.clone(), router, cfg());
        spool.append("beijing", entries(200, "x")).unwrap();
        spool.add_overflow("beijing", 3).unwrap();
        let dropped = spool.drops()[0].spool_dropped;
        assert!(dropped > 0);
        dest.down.store(false, Ordering::SeqCst);
        until(|| spool.stats().unwrap().unacked == 0).await;
        let d = dest.c.drops().unwrap();
        assert_eq!(d[0].origin, "beijing");
        assert_eq!(d[0].spool_dropped, dropped);
        assert_eq!(d[0].overflow_dropped, 3);
        let held = seqs(&dest.c, "beijing");
        assert_eq!(held.len() as u64 + dropped, 200);
        // What survived is the newest, without a gap among it.
        assert_eq!(held, ((dropped + 1)..=200).collect::<Vec<_>>());
    }
}
