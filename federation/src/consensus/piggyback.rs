//! Entries ride on the commit-index update: the leader's append-entries requests to one
//! follower, arranged so that a round trip spent on an update of the commit index also carries
//! the entries that wait.
//!
//! # Why
//!
//! openraft 0.9 keeps one append-entries request in flight per follower. When a round of
//! entries commits, its core first tells every replication task the new commit index and only
//! then (after saving the commit index) hands it the next range of entries; the task, woken by
//! the first message, sends the commit index alone in an empty request and the next entries
//! wait a whole round trip behind it. Under load every write then waits about three round
//! trips (the round in flight, the commit-only request, its own round) instead of one and a
//! half (measured over a 45 ms path: p50 147-160 ms a write).
//!
//! # How
//!
//! [`FollowerAcks`] sits in the network client of one follower ([`super::network`]):
//!
//! - An empty request (a heartbeat or a commit-index update) is sent with the entries that
//!   follow the follower's acknowledged match in the leader's log, if there are any (at most
//!   [`PiggybackLimits`]), taken only from this leader's own term ([`plan`]). openraft gets the
//!   answer it expects for the empty request (success means the request's `prev_log_id`
//!   matched), and [`FollowerAcks`] remembers how far the follower acknowledged.
//! - A request with entries that the follower has already acknowledged (the next range openraft
//!   hands over is usually exactly what rode on the commit-index update) is answered at once
//!   from that acknowledgement ([`FollowerAcks::answer_early`]): success when the follower holds
//!   all of it, a partial success up to what it holds otherwise, so openraft sends only the rest.
//!
//! # Why this is safe
//!
//! A success given to openraft never claims more than the follower itself acknowledged: an
//! acknowledgement is recorded only from the follower's own success answer to a request that
//! carried those entries under the same vote, and a follower answers only once the entries are
//! on its disk. Within one leader's term the leader never removes entries from its own log and
//! a follower never drops entries it matched from that leader (it truncates only entries that
//! conflict with a leader's), so "the follower holds the leader's entry at index i" stays true
//! for the rest of the term, and by the log-matching property it holds every entry before i.
//! Errors (timeout, unreachable, a lost answer) record nothing. A conflict or a higher vote
//! clears what was recorded and is passed on to openraft as the answer to the request it sent
//! (a conflict makes openraft look for the match lower, never higher), so vote and conflict
//! handling are unchanged. Acknowledgements are per vote: a new leader, or this one again in a
//! later term, starts from nothing. The only thing an early answer skips is telling the
//! follower the commit index of that moment, which the next request (sent right after the
//! commit that the answer allows) carries.

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::EntryPayload;

use super::types::{Entry, LogId, NodeId, TypeConfig, Vote};

/// The request type of the leader's log replication.
pub type AppendRequest = AppendEntriesRequest<TypeConfig>;

/// The answer to [`AppendRequest`].
pub type AppendResponse = AppendEntriesResponse<NodeId>;

/// How many entries may ride on one empty request, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PiggybackLimits {
    /// Entries, at most: openraft's own `max_payload_entries`, so a piggybacked request is no
    /// bigger than a request openraft builds itself.
    pub entries: u64,
    /// Bytes of config keys and values ([`super::Command::weight`]), at most.
    pub bytes: usize,
}

/// Bytes of commands riding on one empty request, at most: four full group-commit entries
/// ([`super::group_commit::MAX_GROUP_BYTES`] each); keeps the request well under the 32 MiB
/// frame bound even after base64, whatever `max_payload_entries` says.
pub const PIGGYBACK_BYTES: usize = 4 * super::group_commit::MAX_GROUP_BYTES;

/// What one follower acknowledged under the current vote.
#[derive(Debug, Default, Clone)]
pub struct FollowerAcks {
    acked: Option<(Vote, LogId)>,
}

impl FollowerAcks {
    /// The highest log id the follower acknowledged under `vote`.
    pub fn acked(&self, vote: &Vote) -> Option<LogId> {
        match &self.acked {
            Some((v, id)) if v == vote => Some(*id),
            _ => None,
        }
    }

    /// An answer to `rpc` from what the follower already acknowledged, without sending it;
    /// `None` when the request must travel. Only requests with entries whose range starts
    /// below the acknowledged match are answered: success if the follower holds the last
    /// entry, else a partial success at the acknowledged entry (openraft then sends the rest).
    pub fn answer_early(&self, rpc: &AppendRequest) -> Option<AppendResponse> {
        let last = rpc.entries.last()?.log_id;
        let acked = self.acked(&rpc.vote)?;
        if Some(acked) <= rpc.prev_log_id {
            return None;
        }
        if acked.index >= last.index {
            return Some(AppendEntriesResponse::Success);
        }
        // Inside the range: the entry at that index must be the acknowledged one (the same log),
        // or nothing is claimed.
        rpc.entries
            .iter()
            .any(|e| e.log_id == acked)
            .then_some(AppendEntriesResponse::PartialSuccess(Some(acked)))
    }

    /// Records the follower's answer `resp` to `sent` (the request as it travelled).
    pub fn record(&mut self, sent: &AppendRequest, resp: &AppendResponse) {
        let matched = match resp {
            AppendEntriesResponse::Success => {
                sent.entries.last().map(|e| e.log_id).or(sent.prev_log_id)
            }
            AppendEntriesResponse::PartialSuccess(m) => *m,
            AppendEntriesResponse::Conflict | AppendEntriesResponse::HigherVote(_) => {
                self.acked = None;
                return;
            }
        };
        let Some(matched) = matched else { return };
        match &mut self.acked {
            Some((v, id)) if *v == sent.vote => *id = (*id).max(matched),
            other => *other = Some((sent.vote, matched)),
        }
    }
}

/// Where the entries to piggyback on an empty request start: after the later of the request's
/// `prev_log_id` and the follower's acknowledged match. `None` when nothing should ride (the
/// request has entries, or the vote is not a committed leader's).
pub fn piggyback_after(acks: &FollowerAcks, rpc: &AppendRequest) -> Option<Option<LogId>> {
    if !rpc.entries.is_empty() || !rpc.vote.is_committed() {
        return None;
    }
    Some(rpc.prev_log_id.max(acks.acked(&rpc.vote)))
}

/// The request to send for the empty request `rpc`, given `read`: the leader's entries from
/// the index after `after` on (as [`piggyback_after`] chose). Keeps the contiguous run of this
/// leader's own entries right after `after`, within `limits`; `None` if there is none (send
/// `rpc` as it is).
pub fn plan(
    rpc: &AppendRequest,
    after: Option<LogId>,
    read: Vec<Entry>,
    limits: PiggybackLimits,
) -> Option<AppendRequest> {
    let leader = *rpc.vote.leader_id();
    let first = after.map_or(0, |l| l.index + 1);
    let mut bytes = 0usize;
    let mut entries = Vec::new();
    for (next, e) in (first..).zip(read) {
        let weight = match &e.payload {
            EntryPayload::Normal(cmd) => cmd.weight(),
            EntryPayload::Blank => 0,
            EntryPayload::Membership(_) => 4096,
        };
        // Contiguous, this leader's own, within the bounds (the first entry always fits the
        // byte bound: one entry is never bigger than openraft would send alone).
        if e.log_id.index != next
            || e.log_id.leader_id != leader
            || entries.len() as u64 >= limits.entries
            || (!entries.is_empty() && bytes + weight > limits.bytes)
        {
            break;
        }
        bytes += weight;
        entries.push(e);
    }
    if entries.is_empty() {
        return None;
    }
    Some(AppendEntriesRequest {
        vote: rpc.vote,
        prev_log_id: after,
        leader_commit: rpc.leader_commit,
        entries,
    })
}

/// The answer openraft gets for the empty request it asked for, from the follower's answer
/// `resp` to the piggybacked request: a success (the follower matched at least the empty
/// request's `prev_log_id`) or the conflict / higher vote unchanged.
pub fn answer_for_empty(resp: AppendResponse) -> AppendResponse {
    match resp {
        AppendEntriesResponse::PartialSuccess(_) => AppendEntriesResponse::Success,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::types::Command;
    use openraft::{CommittedLeaderId, Entry as RaftEntry};

    const LIMITS: PiggybackLimits = PiggybackLimits {
        entries: 100,
        bytes: PIGGYBACK_BYTES,
    };

    fn id(term: u64, leader: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, leader), index)
    }

    fn entry(term: u64, leader: u64, index: u64) -> Entry {
        RaftEntry {
            log_id: id(term, leader, index),
            payload: EntryPayload::Normal(Command::SetConfig {
                key: format!("k{index}"),
                value: Some("1".into()),
            }),
        }
    }

    /// The leader (term 2, node 1) holds entries 1..=`last` of its own term.
    fn leader_log(last: u64) -> Vec<Entry> {
        (1..=last).map(|i| entry(2, 1, i)).collect()
    }

    fn request(vote: Vote, log: &[Entry], prev: u64, last: u64) -> AppendRequest {
        AppendEntriesRequest {
            vote,
            prev_log_id: (prev > 0).then(|| log[prev as usize - 1].log_id),
            leader_commit: None,
            entries: log[prev as usize..last as usize].to_vec(),
        }
    }

    /// A raft follower's log rules, enough to answer append-entries: a vote, a log of ids.
    struct Follower {
        vote: Vote,
        log: Vec<LogId>,
    }

    impl Follower {
        fn append(&mut self, rpc: &AppendRequest) -> AppendResponse {
            if rpc.vote < self.vote {
                return AppendEntriesResponse::HigherVote(self.vote);
            }
            self.vote = rpc.vote;
            if let Some(prev) = rpc.prev_log_id {
                if self.log.get(prev.index as usize - 1) != Some(&prev) {
                    return AppendEntriesResponse::Conflict;
                }
            }
            for e in &rpc.entries {
                let at = e.log_id.index as usize - 1;
                if self.log.get(at) != Some(&e.log_id) {
                    self.log.truncate(at);
                    self.log.push(e.log_id);
                }
            }
            AppendEntriesResponse::Success
        }

        fn holds(&self, l: LogId) -> bool {
            self.log.get(l.index as usize - 1) == Some(&l)
        }
    }

    /// What the network client does with one request: early answer, piggyback, send (the
    /// follower's answer may be lost: `deliver` false), record, translate.
    fn client(
        acks: &mut FollowerAcks,
        log: &[Entry],
        follower: &mut Follower,
        rpc: AppendRequest,
        deliver: bool,
    ) -> Option<AppendResponse> {
        if let Some(r) = acks.answer_early(&rpc) {
            return Some(r);
        }
        let after = piggyback_after(acks, &rpc);
        let planned = after.and_then(|after| {
            let from = after.map_or(1, |l| l.index + 1) as usize;
            plan(&rpc, after, log[from - 1..].to_vec(), LIMITS)
        });
        let sent = planned.clone().unwrap_or_else(|| rpc.clone());
        let resp = follower.append(&sent);
        if !deliver {
            return None; // a timeout for openraft: nothing recorded
        }
        acks.record(&sent, &resp);
        Some(if planned.is_some() {
            answer_for_empty(resp)
        } else {
            resp
        })
    }

    /// openraft's claim from an answer: the follower matches up to this id.
    fn claimed(rpc: &AppendRequest, resp: &AppendResponse) -> Option<LogId> {
        match resp {
            AppendEntriesResponse::Success => {
                rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id)
            }
            AppendEntriesResponse::PartialSuccess(m) => *m,
            _ => None,
        }
    }

    #[test]
    fn a_commit_only_request_carries_the_waiting_entries_and_the_next_range_is_answered_at_once() {
        let vote = Vote::new_committed(2, 1);
        let log = leader_log(10);
        let mut f = Follower {
            vote,
            log: Vec::new(),
        };
        let mut acks = FollowerAcks::default();
        // Round 1: entries 1..=3 travel as usual.
        let r = client(&mut acks, &log, &mut f, request(vote, &log, 0, 3), true);
        assert_eq!(r, Some(AppendEntriesResponse::Success));
        // The commit-only request (prev = matching 3, no entries) carries 4..=10.
        let hb = request(vote, &log, 3, 3);
        let after = piggyback_after(&acks, &hb).unwrap();
        let planned = plan(&hb, after, log[3..].to_vec(), LIMITS).unwrap();
        assert_eq!(planned.entries.len(), 7);
        assert_eq!(planned.prev_log_id, Some(log[2].log_id));
        let r = client(&mut acks, &log, &mut f, hb, true);
        assert_eq!(r, Some(AppendEntriesResponse::Success));
        assert!(f.holds(log[9].log_id));
        // openraft then hands over 4..=10: answered without a round trip.
        let data = request(vote, &log, 3, 10);
        assert_eq!(
            acks.answer_early(&data),
            Some(AppendEntriesResponse::Success)
        );
        // A range reaching past what was acknowledged: partial success at the acknowledged
        // entry, never beyond.
        let longer = leader_log(12);
        let data = request(vote, &longer, 3, 12);
        assert_eq!(
            acks.answer_early(&data),
            Some(AppendEntriesResponse::PartialSuccess(Some(
                longer[9].log_id
            )))
        );
        // The rest (prev = 10) travels.
        assert_eq!(acks.answer_early(&request(vote, &longer, 10, 12)), None);
    }

    #[test]
    fn a_lost_answer_to_a_commit_only_request_claims_nothing() {
        let vote = Vote::new_committed(2, 1);
        let log = leader_log(6);
        let mut f = Follower {
            vote,
            log: Vec::new(),
        };
        let mut acks = FollowerAcks::default();
        client(&mut acks, &log, &mut f, request(vote, &log, 0, 2), true);
        // The follower appended 3..=6 but its answer was lost (a timeout for openraft).
        assert_eq!(
            client(&mut acks, &log, &mut f, request(vote, &log, 2, 2), false),
            None
        );
        assert_eq!(acks.acked(&vote), Some(log[1].log_id));
        // So the next range travels in full, and its own answer is what counts.
        let data = request(vote, &log, 2, 6);
        assert_eq!(acks.answer_early(&data), None);
        let r = client(&mut acks, &log, &mut f, data, true);
        assert_eq!(r, Some(AppendEntriesResponse::Success));
        assert_eq!(acks.acked(&vote), Some(log[5].log_id));
    }

    #[test]
    fn an_answer_from_an_earlier_request_never_raises_a_later_claim() {
        // Answers recorded out of order (a late answer to an older, shorter request) keep the
        // highest acknowledgement; a lower one never lowers it and never invents a higher one.
        let vote = Vote::new_committed(2, 1);
        let log = leader_log(8);
        let mut acks = FollowerAcks::default();
        acks.record(&request(vote, &log, 0, 8), &AppendEntriesResponse::Success);
        acks.record(&request(vote, &log, 0, 3), &AppendEntriesResponse::Success);
        assert_eq!(acks.acked(&vote), Some(log[7].log_id));
        acks.record(
            &request(vote, &log, 0, 8),
            &AppendEntriesResponse::PartialSuccess(Some(log[4].log_id)),
        );
        assert_eq!(acks.acked(&vote), Some(log[7].log_id));
    }

    #[test]
    fn conflicts_higher_votes_and_a_new_leader_forget_the_acknowledgements() {
        let vote = Vote::new_committed(2, 1);
        let log = leader_log(6);
        let mut acks = FollowerAcks::default();
        acks.record(&request(vote, &log, 0, 6), &AppendEntriesResponse::Success);
        // A later term of the same node, or another leader: nothing carried over.
        let later = Vote::new_committed(3, 1);
        assert_eq!(acks.acked(&later), None);
        let next_term: Vec<Entry> = (1..=6).map(|i| entry(3, 1, i)).collect();
        assert_eq!(acks.answer_early(&request(later, &next_term, 0, 6)), None);
        // A conflict (a follower that lost its log) clears it: the next range travels.
        acks.record(&request(vote, &log, 6, 6), &AppendEntriesResponse::Conflict);
        assert_eq!(acks.answer_early(&request(vote, &log, 2, 6)), None);
        acks.record(&request(vote, &log, 0, 6), &AppendEntriesResponse::Success);
        acks.record(
            &request(vote, &log, 6, 6),
            &AppendEntriesResponse::HigherVote(Vote::new_committed(4, 3)),
        );
        assert_eq!(acks.acked(&vote), None);
    }

    #[test]
    fn a_conflict_or_higher_vote_on_a_piggybacked_request_reaches_openraft_unchanged() {
        let vote = Vote::new_committed(2, 1);
        let log = leader_log(6);
        // The follower already follows a newer leader.
        let mut f = Follower {
            vote: Vote::new_committed(5, 3),
            log: Vec::new(),
        };
        let mut acks = FollowerAcks::default();
        let r = client(&mut acks, &log, &mut f, request(vote, &log, 2, 2), true);
        assert_eq!(r, Some(AppendEntriesResponse::HigherVote(f.vote)));
        // A follower missing the leader's entry 2: conflict, as for the empty request.
        let mut f = Follower {
            vote,
            log: vec![log[0].log_id],
        };
        let r = client(&mut acks, &log, &mut f, request(vote, &log, 2, 2), true);
        assert_eq!(r, Some(AppendEntriesResponse::Conflict));
        assert_eq!(acks.acked(&vote), None);
    }

    #[test]
    fn only_this_leaders_contiguous_entries_ride_within_the_bounds() {
        let vote = Vote::new_committed(3, 1);
        // Entries 3..=4 from an earlier leader, then this leader's own.
        let mut log = leader_log(2);
        log.push(entry(2, 2, 3));
        log.push(entry(2, 2, 4));
        log.extend((5..=9).map(|i| entry(3, 1, i)));
        let hb = request(vote, &log, 2, 2);
        assert!(plan(&hb, hb.prev_log_id, log[2..].to_vec(), LIMITS).is_none());
        let hb = request(vote, &log, 4, 4);
        let p = plan(&hb, hb.prev_log_id, log[4..].to_vec(), LIMITS).unwrap();
        assert_eq!(p.entries.len(), 5);
        // A hole (purged, or a read that starts later): nothing rides.
        assert!(plan(&hb, hb.prev_log_id, log[5..].to_vec(), LIMITS).is_none());
        // The entry bound.
        let two = PiggybackLimits {
            entries: 2,
            ..LIMITS
        };
        assert_eq!(
            plan(&hb, hb.prev_log_id, log[4..].to_vec(), two)
                .unwrap()
                .entries
                .len(),
            2
        );
        // The byte bound: one entry always, then only what fits.
        let tiny = PiggybackLimits { bytes: 1, ..LIMITS };
        assert_eq!(
            plan(&hb, hb.prev_log_id, log[4..].to_vec(), tiny)
                .unwrap()
                .entries
                .len(),
            1
        );
        // Not a committed leader's vote, or a request with entries: nothing rides.
        let uncommitted = Vote::new(3, 1);
        assert_eq!(
            piggyback_after(&FollowerAcks::default(), &request(uncommitted, &log, 4, 4)),
            None
        );
        assert_eq!(
            piggyback_after(&FollowerAcks::default(), &request(vote, &log, 4, 6)),
            None
        );
    }

    #[test]
    fn every_claim_is_held_by_the_follower_whatever_answers_are_lost() {
        // openraft's loop for one follower, with some answers lost and the leader's log growing
        // between requests: every success openraft is given is on the follower.
        let vote = Vote::new_committed(2, 1);
        let full = leader_log(60);
        let mut f = Follower {
            vote,
            log: Vec::new(),
        };
        let mut acks = FollowerAcks::default();
        let mut matching: u64 = 0;
        let mut len: u64 = 1;
        for step in 0u64..200 {
            len = (len + step % 3).min(60);
            let log = &full[..len as usize];
            // Alternate a commit-only request and a data request, as openraft may.
            let rpc = if step % 2 == 0 || matching == len {
                request(vote, log, matching, matching)
            } else {
                request(vote, log, matching, len)
            };
            let deliver = step % 5 != 3;
            let Some(resp) = client(&mut acks, log, &mut f, rpc.clone(), deliver) else {
                continue;
            };
            if let Some(c) = claimed(&rpc, &resp) {
                assert!(f.holds(c), "step {step}: claimed {c} the follower lacks");
                if !rpc.entries.is_empty() {
                    matching = matching.max(c.index);
                }
            }
        }
        assert_eq!(matching, 60);
    }
}
