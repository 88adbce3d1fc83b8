//! A bounded log of which nodes changed in the node registry, so a periodic job (the
//! directory announcement, the alert rows) does work in proportion to the change, not the
//! fleet.
//!
//! Every attach, detach and disconnect of [`crate::gateway::registry::NodeRegistry`] appends
//! the node's id ([`ChangeLog::record`], after the registry's map changed). A consumer keeps a
//! [`Cursor`] (the sequence number it has read up to) and asks for what changed since
//! ([`ChangeLog::since`]): the distinct ids, each to be read again from the registry. The log
//! keeps the last [`CAPACITY`] ids only; a consumer that fell further behind (or that starts
//! without a cursor) gets [`Changes::Overflowed`] and must read the whole registry once, then
//! continues from the cursor it was given.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use clawmesh_federation::identity::DeviceId;

/// Ids the log keeps (32 bytes each: 512 KiB). A consumer runs every 50 ms to a few seconds
/// (the directory follower, the alert duty at most every 500 ms × its cost spacing); 16 384
/// changes in that time is a mass reconnect of a large fleet, where one full read is about
/// as cheap as replaying the ids one by one anyway. Small enough that it never matters
/// beside the nodes' own state (tens of KB each).
pub const CAPACITY: usize = 16_384;

/// Where a consumer is in the log: the sequence number of the next change it has not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor(u64);

/// What changed since a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// These nodes (each once, in the order of their first change) changed: read each again.
    Ids(Vec<DeviceId>),
    /// The log no longer holds everything since the cursor (or there was none): read every
    /// node once.
    Overflowed,
}

#[derive(Debug, Default)]
struct Log {
    /// Sequence number of `ids[0]`.
    first: u64,
    ids: VecDeque<DeviceId>,
}

impl Log {
    fn next(&self) -> u64 {
        self.first + self.ids.len() as u64
    }
}

/// How often the change log's consumers had to read every node (a first read, or a log that
/// overflowed under them): exposed on `/metrics`, so a fleet whose changes outrun the log is
/// visible.
#[derive(Debug, Default)]
pub struct FullReads {
    /// Full diffs of the local directory (`clawmesh_directory_full_diffs`).
    pub directory: AtomicU64,
    /// Full reads of the alert rows (`clawmesh_alert_full_reads`).
    pub alerts: AtomicU64,
}

impl FullReads {
    /// Counts one full read in `counter`.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The registry's change log (see the module documentation).
#[derive(Debug, Default)]
pub struct ChangeLog {
    log: Mutex<Log>,
}

impl ChangeLog {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // Each update is one push or one read; a poisoned log is still consistent.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `node` changed (call after the change is visible in the registry).
    pub fn record(&self, node: DeviceId) {
        let mut log = self.lock();
        if log.ids.len() == CAPACITY {
            log.ids.pop_front();
            log.first += 1;
        }
        log.ids.push_back(node);
    }

    /// What changed since `cursor` (`None`: a consumer's first read, always
    /// [`Changes::Overflowed`]), and the cursor to pass next time.
    pub fn since(&self, cursor: Option<Cursor>) -> (Changes, Cursor) {
        let log = self.lock();
        let next = Cursor(log.next());
        let Some(Cursor(at)) = cursor else {
            return (Changes::Overflowed, next);
        };
        if at < log.first {
            return (Changes::Overflowed, next);
        }
        let skip = usize::try_from(at - log.first).unwrap_or(usize::MAX);
        let mut seen = HashSet::new();
        let ids = log
            .ids
            .iter()
            .skip(skip)
            .filter(|id| seen.insert(**id))
            .copied()
            .collect();
        (Changes::Ids(ids), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> DeviceId {
        let mut d = DeviceId([0; 32]);
        d.0[..4].copy_from_slice(&i.to_be_bytes());
        d
    }

    #[test]
    fn a_first_read_is_a_full_read_then_changes_follow_the_cursor() {
        let log = ChangeLog::default();
        log.record(id(1));
        let (c, cur) = log.since(None);
        assert_eq!(c, Changes::Overflowed);
        // Nothing since: an empty set, the same cursor.
        let (c, cur2) = log.since(Some(cur));
        assert_eq!(c, Changes::Ids(vec![]));
        assert_eq!(cur, cur2);
        log.record(id(2));
        log.record(id(3));
        let (c, cur3) = log.since(Some(cur2));
        assert_eq!(c, Changes::Ids(vec![id(2), id(3)]));
        assert_eq!(log.since(Some(cur3)).0, Changes::Ids(vec![]));
        // An older cursor still reads from where it was.
        assert_eq!(log.since(Some(cur2)).0, Changes::Ids(vec![id(2), id(3)]));
    }

    #[test]
    fn ids_are_deduplicated_in_first_change_order() {
        let log = ChangeLog::default();
        let (_, cur) = log.since(None);
        for i in [5, 1, 5, 2, 1, 5] {
            log.record(id(i));
        }
        assert_eq!(
            log.since(Some(cur)).0,
            Changes::Ids(vec![id(5), id(1), id(2)])
        );
    }

    #[test]
    fn the_log_is_bounded_and_a_consumer_behind_it_overflows() {
        let log = ChangeLog::default();
        let (_, start) = log.since(None);
        for i in 0..CAPACITY as u32 {
            log.record(id(i));
        }
        // Exactly at the bound: everything is still there.
        match log.since(Some(start)).0 {
            Changes::Ids(ids) => assert_eq!(ids.len(), CAPACITY),
            Changes::Overflowed => panic!("the log holds CAPACITY ids"),
        }
        let (_, mid) = log.since(Some(start));
        log.record(id(u32::MAX));
        assert_eq!(log.lock().ids.len(), CAPACITY);
        // One more: the oldest is gone, so a consumer at the start overflows...
        assert_eq!(log.since(Some(start)).0, Changes::Overflowed);
        // ...while one that kept up reads only the new change.
        assert_eq!(log.since(Some(mid)).0, Changes::Ids(vec![id(u32::MAX)]));
        // After an overflow the consumer continues from the cursor it was given.
        let (_, after) = log.since(Some(start));
        log.record(id(7));
        assert_eq!(log.since(Some(after)).0, Changes::Ids(vec![id(7)]));
    }
}
