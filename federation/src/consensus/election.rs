//! When a gateway may stand for election: PreVote and CheckQuorum on top of openraft 0.9.
//!
//! openraft 0.9 has no PreVote: a follower whose election timer fires (because *it* heard
//! nothing, for instance after being frozen for a few seconds) raises its term at once; its
//! vote requests are refused by the others (their leader lease holds), but the leader's next
//! heartbeat meets the higher term and the leader steps down. A voter that stalls and resumes
//! thus deposes a healthy primary, and a flaky one does it again and again.
//!
//! So openraft's own election timer is off (`enable_elect: false`) and the gateway decides:
//!
//! 1. **Silence.** A voter considers an election only after the lease plus its election
//!    timeout (drawn anew each round, from the shortest timeout to that plus twice the spread
//!    of openraft's timeouts, so that two survivors seldom stand together) without a message
//!    from a leader. A voter that has just granted another's pre-vote holds back for a
//!    timeout: that one is about to win.
//! 2. **Pre-vote.** It then asks every other voter, without changing any term, whether it would
//!    grant a vote now ([`PreVoteRequest`], method `raft.prevote`). A voter says yes only if it
//!    has not heard from a leader within the lease either, is not itself a leader that a
//!    majority acknowledged within the lease, and the candidate's log is at least as complete
//!    as its own: the same conditions openraft applies to a real vote, checked without side
//!    effects ([`grant`]).
//! 3. **Election.** Only with yes from a majority (itself included) does it call
//!    `trigger().elect()`; otherwise it waits another round.
//!
//! A voter that resumes after a stall asks the others, hears that the leader is alive, and
//! stays a follower: the term does not move. A dead or cut-off leader is replaced as fast as
//! before, because the survivors' silence is real and they grant each other's pre-votes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::LogId;

/// Method: would you vote for me now? (No term changes.)
pub const METHOD_PREVOTE: &str = "raft.prevote";

/// A pre-vote request: the candidate's term (not raised) and its last log id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteRequest {
    /// The candidate's current term (a real vote would be for the next one), for the logs.
    pub term: u64,
    /// The candidate's last log id.
    pub last_log: Option<LogId>,
}

/// The answer to a [`PreVoteRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteReply {
    /// Whether a real vote would be granted now.
    pub granted: bool,
    /// Why not, for the logs.
    pub reason: String,
}

/// What a voter knows when it answers a pre-vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalView {
    /// This gateway is the leader.
    pub leading: bool,
    /// On a leader: time since a majority last acknowledged it.
    pub since_quorum_ack: Option<Duration>,
    /// This gateway follows a known leader (its vote is committed).
    pub following: bool,
    /// Time since the leader was last heard from (or a vote was granted), if ever.
    pub since_contact: Option<Duration>,
    /// The last log id here.
    pub last_log: Option<LogId>,
}

/// Whether to grant `req` given `view` and the leader `lease`: `Ok` or why not.
pub fn grant(req: &PreVoteRequest, view: &LocalView, lease: Duration) -> Result<(), String> {
    if view.leading {
        if view.since_quorum_ack.is_some_and(|t| t <= lease) {
            return Err("I am the primary and a majority acknowledges me".into());
        }
    } else if view.following && view.since_contact.is_some_and(|t| t <= lease) {
        return Err(format!(
            "I heard from the primary {} ms ago",
            view.since_contact.unwrap_or_default().as_millis()
        ));
    }
    if req.last_log < view.last_log {
        return Err("your log is behind mine".into());
    }
    Ok(())
}

/// Whether `granted` answers out of `voters` (this one's own yes included) are a majority.
pub fn majority(granted: usize, voters: usize) -> bool {
    voters > 0 && granted * 2 > voters
}

/// A silence threshold for one round: the lease plus a random timeout in `[min, max]`, so two
/// voters that lose the leader together seldom stand together.
pub fn silence_threshold(lease: Duration, min: Duration, max: Duration) -> Duration {
    use rand::RngExt as _;
    let lo = min.as_millis() as u64;
    let hi = (max.as_millis() as u64).max(lo);
    lease + Duration::from_millis(rand::rng().random_range(lo..=hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn follower(contact_ms: u64) -> LocalView {
        LocalView {
            leading: false,
            since_quorum_ack: None,
            following: true,
            since_contact: Some(Duration::from_millis(contact_ms)),
            last_log: log(3, 10),
        }
    }

    const LEASE: Duration = Duration::from_millis(1000);

    #[test]
    fn a_voter_that_hears_the_leader_refuses() {
        let req = PreVoteRequest {
            term: 3,
            last_log: log(3, 10),
        };
        assert!(grant(&req, &follower(200), LEASE).is_err());
        assert!(grant(&req, &follower(1500), LEASE).is_ok());
    }

    #[test]
    fn a_healthy_leader_refuses_a_cut_off_one_grants() {
        let req = PreVoteRequest {
            term: 3,
            last_log: log(3, 10),
        };
        let mut v = follower(0);
        v.leading = true;
        v.following = false;
        v.since_quorum_ack = Some(Duration::from_millis(300));
        assert!(grant(&req, &v, LEASE).is_err());
        v.since_quorum_ack = Some(Duration::from_millis(3000));
        assert!(grant(&req, &v, LEASE).is_ok());
    }

    #[test]
    fn a_shorter_log_is_refused() {
        let v = follower(5000);
        let short = PreVoteRequest {
            term: 3,
            last_log: log(3, 9),
        };
        assert!(grant(&short, &v, LEASE).is_err());
        let older_term = PreVoteRequest {
            term: 3,
            last_log: log(2, 12),
        };
        assert!(grant(&older_term, &v, LEASE).is_err());
        let longer = PreVoteRequest {
            term: 3,
            last_log: log(3, 11),
        };
        assert!(grant(&longer, &v, LEASE).is_ok());
    }

    #[test]
    fn a_voter_that_never_heard_a_leader_grants() {
        let mut v = follower(0);
        v.following = false;
        v.since_contact = None;
        let req = PreVoteRequest {
            term: 3,
            last_log: log(3, 10),
        };
        assert!(grant(&req, &v, LEASE).is_ok());
    }

    #[test]
    fn majorities() {
        assert!(!majority(1, 3));
        assert!(majority(2, 3));
        assert!(majority(1, 1));
        assert!(!majority(2, 4));
        assert!(!majority(0, 0));
    }

    #[test]
    fn thresholds_stay_in_range() {
        let min = Duration::from_millis(800);
        let max = Duration::from_millis(1000);
        for _ in 0..100 {
            let t = silence_threshold(LEASE, min, max);
            assert!(t >= LEASE + min && t <= LEASE + max);
        }
    }
}
