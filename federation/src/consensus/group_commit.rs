//! Group commit of the leader's writes: writes that arrive while earlier entries are being
//! appended and replicated wait, and go into the next raft entry together.
//!
//! # Why
//!
//! openraft 0.9 does not batch client writes: every `client_write` becomes its own log entry,
//! and the raft core appends each one on its own (one SQLite transaction, fsynced, before the
//! next message is handled). With many writers the leader's fsyncs are the bottleneck (64
//! writers over a 45 ms path: ~3 ms of fsync per entry, so ~340 writes/s, whatever the
//! network allows). Replication already carries many entries per append-entries request, and
//! the followers and the state machine already apply many entries per transaction; the cost
//! per entry is on the leader's append path. One entry per group turns N fsyncs into one.
//!
//! # How
//!
//! [`GroupCommit`] holds a bounded queue of writes. Whenever fewer than [`MAX_APPENDING`]
//! proposed entries wait for the leader's log append, the writes queued at that moment (at
//! least one) become one entry: a write alone is proposed as itself (the same entry as before
//! group commit), several as a [`Command::Group`]. So a lone write is never delayed, and
//! under load the writes that arrive while the leader's log is busy form the next entry.
//! An entry stops counting against [`MAX_APPENDING`] once the leader has appended it, not once
//! it commits: replication carries every appended entry in the next append-entries request,
//! so waiting for the commit would only make writers wait a round longer for their turn
//! (measured: four round trips per write instead of two over a 45 ms path). Entries appended
//! and not yet committed are bounded separately ([`MAX_UNCOMMITTED`]).
//!
//! The fast path ([`GroupCommit::write`]): when no write is queued and both slots are free, a
//! write is proposed and awaited from the writer's own task, without the queue's two task
//! hand-offs, so a lone write costs what it cost before group commit. Entries reach the leader
//! one at a time under one lock, so a queued write is never overtaken by a later one.
//!
//! # Guarantees (the same as one entry per write)
//!
//! - A write is acknowledged only when its entry is committed and applied (the proposer's
//!   result); if the entry fails (leader lost, timeout, stopped), every write in it gets that
//!   error, never an acknowledgement.
//! - Each write gets its own result: the entry's revision. Writes inside one group touch
//!   disjoint config keys (a write whose key is already in the forming group waits for the
//!   next entry), so the value a writer set is exactly the value of its key at that revision,
//!   as when it had an entry of its own. Writes are applied in the order they were queued.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::types::Command;

/// Entries proposed and not yet appended to the leader's log, at most. openraft appends each
/// entry on its own (one fsynced transaction); with two, one entry is being appended while the
/// next waits right behind it, so the disk never idles, and every write arriving meanwhile
/// joins the entry after those (more would only split the same writes into smaller entries
/// and spend more fsyncs on them).
pub const MAX_APPENDING: usize = 2;

/// Entries proposed and not yet committed, at most (each holds up to [`MAX_GROUP_WRITES`]
/// writes): a leader whose followers fall behind stops taking new entries here instead of
/// piling up its log; the writes wait in the queue, bounded by [`MAX_QUEUED`].
pub const MAX_UNCOMMITTED: usize = 64;

/// Writes in one entry at most. At 10 000 writes/s and a ~50 ms round a group holds ~500
/// writes; 1 024 leaves twice that, while keeping one entry's apply transaction short
/// (a few milliseconds) and the per-entry fan-out of results bounded.
pub const MAX_GROUP_WRITES: usize = 1024;

/// Bytes of keys and values in one entry at most (a single write bigger than this still goes
/// alone, as before): keeps an append-entries request of [`MAX_GROUP_WRITES`] small writes
/// well under the frame bound, and a follower's fsync of one entry short.
pub const MAX_GROUP_BYTES: usize = 1024 * 1024;

/// Writes waiting for an entry at most. About two full groups per slot; a write beyond this
/// is refused at once (retryable, counted in [`GroupCommit::refused`]) rather than queued
/// for longer than a few rounds.
pub const MAX_QUEUED: usize = 4 * MAX_GROUP_WRITES;

/// An entry handed to the leader: what it resolves to, and when it is in the leader's log.
pub struct Proposal<E> {
    /// Resolves with the entry's revision once it is committed and applied, or its error.
    pub committed: BoxFuture<Result<u64, E>>,
    /// Resolves once the leader's log holds the entry durably (or may resolve later, or never:
    /// only the grouping waits for it, never an acknowledgement).
    pub appended: BoxFuture<()>,
}

/// A boxed future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Hands one entry to the leader, in order: entries are appended in the order their
/// proposals complete (the grouping task awaits each before the next).
pub type Propose<E> = Arc<dyn Fn(Command) -> BoxFuture<Proposal<E>> + Send + Sync>;

/// A queued write and where its result goes.
struct Queued<E> {
    cmd: Command,
    reply: oneshot::Sender<Result<u64, E>>,
}

/// Why a write was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue is full ([`MAX_QUEUED`] writes waiting).
    #[error("the primary has {MAX_QUEUED} config writes waiting to be committed; retry shortly")]
    Full,
    /// The group commit stopped (the consensus is shutting down).
    #[error("the consensus is shutting down")]
    Stopped,
}

/// Counters of the group commit (for logs, status and benchmarks).
#[derive(Debug, Default)]
pub struct Counters {
    /// Entries proposed.
    pub entries: AtomicU64,
    /// Writes proposed (in those entries).
    pub writes: AtomicU64,
    /// Writes refused because the queue was full.
    pub refused: AtomicU64,
}

/// The leader's group commit: a queue of writes and the task that turns them into entries.
pub struct GroupCommit<E> {
    tx: mpsc::Sender<Queued<E>>,
    counters: Arc<Counters>,
    shared: Arc<Shared<E>>,
}

/// What the grouping task and the fast path share.
struct Shared<E> {
    /// Hands entries to the leader; held while one is handed, so entries reach the leader
    /// one at a time and in the order they took this lock.
    propose: tokio::sync::Mutex<Propose<E>>,
    /// Entries proposed and not yet appended ([`MAX_APPENDING`] permits).
    appending: Arc<Semaphore>,
    /// Entries proposed and not yet committed ([`MAX_UNCOMMITTED`] permits).
    uncommitted: Arc<Semaphore>,
    /// Writes queued and not yet proposed (in the channel or taken by the grouping task):
    /// while any wait, a new write queues behind them instead of taking the fast path.
    pending: AtomicUsize,
}

impl<E> std::fmt::Debug for GroupCommit<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<E: Clone + Send + 'static> GroupCommit<E> {
    /// Starts the grouping task (on the current tokio runtime); it ends when `self` is dropped.
    pub fn start(propose: Propose<E>) -> GroupCommit<E> {
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            propose: tokio::sync::Mutex::new(propose),
            appending: Arc::new(Semaphore::new(MAX_APPENDING)),
            uncommitted: Arc::new(Semaphore::new(MAX_UNCOMMITTED)),
            pending: AtomicUsize::new(0),
        });
        tokio::spawn(run(rx, shared.clone(), counters.clone()));
        GroupCommit {
            tx,
            counters,
            shared,
        }
    }

    /// Writes `cmd` and resolves with its entry's revision once that entry is committed, or
    /// with the entry's error.
    ///
    /// The fast path: when no write waits in the queue and both an append and an uncommitted
    /// slot are free, the write is proposed from the caller's own task as an entry of its own
    /// and awaited there, without the two task hand-offs of the queue (each a wake-up that
    /// waits for a CPU on a loaded machine: measured as +15 ms p50 write visibility at load
    /// 15-18). Otherwise it is queued ([`GroupCommit::submit`]).
    pub async fn write(&self, cmd: Command) -> Result<Result<u64, E>, QueueError> {
        if let Some(path) = self.fast_path().await {
            let (lock, append_slot, commit_slot) = path;
            self.counters.entries.fetch_add(1, Ordering::Relaxed);
            self.counters.writes.fetch_add(1, Ordering::Relaxed);
            let proposal = (*lock)(cmd).await;
            drop(lock);
            // A writer that gives up here (its deadline) frees the slots early; the entry
            // itself is bounded by the write timeout, so the bounds are exceeded by at most
            // the writers that gave up, for at most that long.
            return Ok(settle(proposal, append_slot, commit_slot).await);
        }
        match self.submit(cmd)?.await {
            Ok(result) => Ok(result),
            Err(_) => Err(QueueError::Stopped),
        }
    }

    /// The propose lock and both slots, if a write may skip the queue now.
    async fn fast_path(
        &self,
    ) -> Option<(
        tokio::sync::MutexGuard<'_, Propose<E>>,
        OwnedSemaphorePermit,
        OwnedSemaphorePermit,
    )> {
        let lock = self.shared.propose.try_lock().ok()?;
        // Under the lock no queued write can be proposed meanwhile: one queued before this
        // check keeps this write behind it.
        if self.shared.pending.load(Ordering::Acquire) != 0 {
            return None;
        }
        let commit_slot = self.shared.uncommitted.clone().try_acquire_owned().ok()?;
        let append_slot = self.shared.appending.clone().try_acquire_owned().ok()?;
        Some((lock, append_slot, commit_slot))
    }

    /// Queues `cmd` for the next entry; the receiver resolves with the entry's revision once
    /// it is committed, or with the entry's error.
    pub fn submit(&self, cmd: Command) -> Result<oneshot::Receiver<Result<u64, E>>, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(Queued { cmd, reply }) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(QueueError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                Err(QueueError::Stopped)
            }
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Waits for an entry to commit, freeing its append slot as soon as the leader has appended
/// it and its uncommitted slot when it commits; its result.
async fn settle<E>(
    proposal: Proposal<E>,
    append_slot: OwnedSemaphorePermit,
    commit_slot: OwnedSemaphorePermit,
) -> Result<u64, E> {
    let Proposal {
        mut committed,
        mut appended,
    } = proposal;
    let mut append_slot = Some(append_slot);
    let result = loop {
        tokio::select! {
            r = &mut committed => break r,
            () = &mut appended, if append_slot.is_some() => append_slot = None,
        }
    };
    drop(append_slot);
    drop(commit_slot);
    result
}

/// The grouping loop: wait for a write, then for room (an uncommitted and an append slot),
/// then take every write already queued that fits (bounds, disjoint keys) and propose them
/// as one entry.
async fn run<E: Clone + Send + 'static>(
    mut rx: mpsc::Receiver<Queued<E>>,
    shared: Arc<Shared<E>>,
    counters: Arc<Counters>,
) {
    let mut held: Option<Queued<E>> = None;
    loop {
        let first = match held.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let Ok(commit_slot) = shared.uncommitted.clone().acquire_owned().await else {
            return;
        };
        let Ok(append_slot) = shared.appending.clone().acquire_owned().await else {
            return;
        };
        let mut keys: HashSet<String> = first.cmd.keys().into_iter().map(str::to_owned).collect();
        let mut bytes = first.cmd.weight();
        let mut group = vec![first];
        while group.len() < MAX_GROUP_WRITES {
            let Ok(next) = rx.try_recv() else { break };
            let next_keys = next.cmd.keys();
            let weight = next.cmd.weight();
            if bytes + weight > MAX_GROUP_BYTES || next_keys.iter().any(|k| keys.contains(*k)) {
                // Waits for the next entry (first in it: the order of writes is kept).
                held = Some(next);
                break;
            }
            keys.extend(next_keys.into_iter().map(str::to_owned));
            bytes += weight;
            group.push(next);
        }
        counters.entries.fetch_add(1, Ordering::Relaxed);
        counters
            .writes
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        let (cmds, replies): (Vec<Command>, Vec<_>) =
            group.into_iter().map(|q| (q.cmd, q.reply)).unzip();
        let n = cmds.len();
        let cmd = if n == 1 {
            cmds.into_iter().next().unwrap_or(Command::Noop)
        } else {
            Command::Group(cmds)
        };
        let proposal = {
            let propose = shared.propose.lock().await;
            let proposal = (*propose)(cmd).await;
            // Proposed: these writes no longer hold the fast path back.
            shared.pending.fetch_sub(n, Ordering::AcqRel);
            proposal
        };
        tokio::spawn(async move {
            let result = settle(proposal, append_slot, commit_slot).await;
            debug!(writes = n, ok = result.is_ok(), "group commit entry done");
            for reply in replies {
                // A writer that gave up (timeout, closed connection) is gone: nothing to tell.
                let _ = reply.send(result.clone());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    fn set(key: &str, value: &str) -> Command {
        Command::SetConfig {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// A fake leader: records every proposed entry, answers with its index after `delay`, or
    /// fails every entry from `fail_from` on.
    struct Fake {
        entries: Mutex<Vec<Command>>,
        delay: Duration,
        fail_from: usize,
    }

    fn fake(delay: Duration, fail_from: usize) -> (Arc<Fake>, Propose<String>) {
        fake_log(delay, fail_from, false)
    }

    /// As [`fake`]; `quick_append`: the log holds each entry at once (only the commit waits).
    fn fake_log(
        delay: Duration,
        fail_from: usize,
        quick_append: bool,
    ) -> (Arc<Fake>, Propose<String>) {
        let f = Arc::new(Fake {
            entries: Mutex::new(Vec::new()),
            delay,
            fail_from,
        });
        let g = f.clone();
        let propose: Propose<String> = Arc::new(move |cmd| {
            let g = g.clone();
            let index = {
                let mut e = g.entries.lock().unwrap();
                e.push(cmd);
                e.len()
            };
            let committed: BoxFuture<Result<u64, String>> = Box::pin(async move {
                tokio::time::sleep(g.delay).await;
                if index > g.fail_from {
                    Err(format!("entry {index} lost"))
                } else {
                    Ok(index as u64)
                }
            });
            // Unless `quick_append`, this fake leader's log takes as long to append as to
            // commit.
            let appended: BoxFuture<()> = if quick_append {
                Box::pin(std::future::ready(()))
            } else {
                Box::pin(std::future::pending())
            };
            Box::pin(async move {
                Proposal {
                    committed,
                    appended,
                }
            })
        });
        (f, propose)
    }

    #[tokio::test]
    async fn a_lone_write_is_its_own_entry() {
        let (f, p) = fake(Duration::from_millis(1), usize::MAX);
        let gc = GroupCommit::start(p);
        let r = gc.submit(set("a", "1")).unwrap().await.unwrap();
        assert_eq!(r, Ok(1));
        assert_eq!(f.entries.lock().unwrap()[0], set("a", "1"));
    }

    #[tokio::test]
    async fn a_lone_write_takes_the_fast_path_and_queued_writes_keep_their_order() {
        let (f, p) = fake_log(Duration::from_millis(20), usize::MAX, true);
        let gc = GroupCommit::start(p);
        // Idle: proposed from the caller's task, as an entry of its own.
        assert_eq!(gc.write(set("a", "1")).await, Ok(Ok(1)));
        // A write queued first (not yet proposed: the grouping task has not run) keeps a
        // later write of the same key behind it, whichever path that one could take.
        let queued = gc.submit(set("b", "1")).unwrap();
        let later = gc.write(set("b", "2")).await.unwrap().unwrap();
        let first = queued.await.unwrap().unwrap();
        assert!(first < later, "{first} {later}");
        assert_eq!(f.entries.lock().unwrap()[2], set("b", "2"));
        assert_eq!(gc.counters().writes.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn concurrent_writes_share_entries_and_each_gets_its_entry() {
        let (f, p) = fake(Duration::from_millis(30), usize::MAX);
        let gc = GroupCommit::start(p);
        let mut waits = Vec::new();
        for i in 0..200 {
            waits.push((i, gc.submit(set(&format!("k{i}"), &i.to_string())).unwrap()));
            if i < 2 {
                // The first two writes each find a free slot: entries of their own.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut revision_of = BTreeMap::new();
        for (i, w) in waits {
            revision_of.insert(i, w.await.unwrap().unwrap());
        }
        let entries = f.entries.lock().unwrap().clone();
        // The 198 writes queued while both slots were busy went into one entry.
        assert_eq!(entries.len(), 3, "{entries:?}");
        // Every write is in exactly the entry whose revision its writer was told, in order.
        let mut seen = Vec::new();
        for (index, e) in entries.iter().enumerate() {
            let writes = match e {
                Command::Group(w) => w.clone(),
                one => vec![one.clone()],
            };
            for w in writes {
                let Command::SetConfig { key, .. } = &w else {
                    panic!("{w:?}")
                };
                let i: usize = key[1..].parse().unwrap();
                assert_eq!(revision_of[&i], index as u64 + 1, "write {i}");
                seen.push(i);
            }
        }
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        assert_eq!(gc.counters().writes.load(Ordering::Relaxed), 200);
    }

    #[tokio::test]
    async fn an_appended_entry_frees_its_slot_before_it_commits() {
        // Commits take 200 ms, appends nothing: five writes spaced 5 ms apart each find a free
        // slot and go out at once as their own entries, none waits for a commit.
        let (f, p) = fake_log(Duration::from_millis(200), usize::MAX, true);
        let gc = GroupCommit::start(p);
        let mut waits = Vec::new();
        for i in 0..5 {
            waits.push(gc.submit(set(&format!("k{i}"), "1")).unwrap());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(f.entries.lock().unwrap().len(), 5);
        for (i, w) in waits.into_iter().enumerate() {
            assert_eq!(w.await.unwrap(), Ok(i as u64 + 1));
        }
    }

    #[tokio::test]
    async fn a_key_is_never_written_twice_in_one_entry() {
        let (f, p) = fake(Duration::from_millis(20), usize::MAX);
        let gc = GroupCommit::start(p);
        let mut waits = Vec::new();
        // Occupy both slots, then queue five writes of one key between others.
        for i in 0..2 {
            waits.push(gc.submit(set(&format!("warm{i}"), "0")).unwrap());
        }
        for i in 0..5 {
            waits.push(gc.submit(set("same", &i.to_string())).unwrap());
            waits.push(gc.submit(set(&format!("other{i}"), "1")).unwrap());
        }
        let mut revisions = Vec::new();
        for w in waits {
            revisions.push(w.await.unwrap().unwrap());
        }
        for e in f.entries.lock().unwrap().iter() {
            let keys = e.keys();
            let unique: HashSet<&str> = keys.iter().copied().collect();
            assert_eq!(unique.len(), keys.len(), "{e:?}");
        }
        // The writes of `same` got increasing revisions, in the order they were queued.
        let same: Vec<u64> = (0..5).map(|i| revisions[2 + 2 * i]).collect();
        assert!(same.windows(2).all(|w| w[0] < w[1]), "{same:?}");
    }

    #[tokio::test]
    async fn a_failed_entry_fails_every_write_in_it_and_acks_none() {
        // The first entry commits, every later one is lost (a leader killed mid-batch).
        let (f, p) = fake(Duration::from_millis(20), 1);
        let gc = GroupCommit::start(p);
        let mut waits = Vec::new();
        for i in 0..50 {
            waits.push(gc.submit(set(&format!("k{i}"), "1")).unwrap());
            if i == 9 {
                // The first ten form the first entry; the other forty the second.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut acked = 0;
        let mut failed = 0;
        for w in waits {
            match w.await.unwrap() {
                Ok(1) => acked += 1,
                Ok(r) => panic!("acked in lost entry {r}"),
                Err(_) => failed += 1,
            }
        }
        let first = &f.entries.lock().unwrap()[0];
        let in_first = first.keys().len();
        assert_eq!((in_first, acked, failed), (10, 10, 40));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_counts() {
        // A leader that never answers: both slots stay taken and the queue fills.
        let (_f, p) = fake(Duration::from_secs(3600), usize::MAX);
        let gc = GroupCommit::start(p);
        let mut kept = Vec::new();
        let mut refused = 0;
        // Whatever the grouping task took into its two entries, at least ten are left over.
        for i in 0..MAX_QUEUED + MAX_APPENDING * MAX_GROUP_WRITES + 10 {
            match gc.submit(set(&format!("k{i}"), "1")) {
                Ok(rx) => kept.push(rx),
                Err(QueueError::Full) => refused += 1,
                Err(e) => panic!("{e}"),
            }
            // Let the grouping task take the first writes into the two slots.
            tokio::task::yield_now().await;
        }
        assert!(refused >= 10, "{refused}");
        assert_eq!(
            gc.counters().refused.load(Ordering::Relaxed),
            refused as u64
        );
    }
}
