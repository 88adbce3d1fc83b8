//! Forced promotion: the operator's way out when a majority of voters is gone for good
//! (`clawmesh gateway promote --force`).
//!
//! Raft cannot change its voters without a majority, by design. The classic escape hatch
//! (etcd's `--force-new-cluster`, Consul's `peers.json`) is to rewrite the membership on one
//! survivor, outside the protocol: with the raft node stopped, a membership entry naming only
//! the reachable gateways as voters is appended after the last local entry, in a term above
//! every term seen, and the vote is moved to that term. Restarted, the node campaigns in the
//! new voter set; the reachable voters grant it (its log is the most recent), and it
//! replicates the new membership to them. Entries that only the unreachable voters hold are
//! lost when those rejoin and follow the new primary: that is what "overriding quorum" means,
//! and why the command needs `--force`.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{CommittedLeaderId, EntryPayload, Membership};

use super::log_store::SqliteLogStore;
use super::types::{Entry, GatewayNode, LogId, NodeId, Vote};
use super::ConsensusStoreError;

/// Appends a membership entry with `voters` (the rest of `nodes` stay learners) after the
/// last entry of `log`, in a new term led by `me`, and saves the matching vote. The raft node
/// using `log` must be stopped. Returns the entry's log id.
pub(crate) async fn force_voters(
    log: &SqliteLogStore,
    me: NodeId,
    voters: BTreeSet<NodeId>,
    nodes: BTreeMap<NodeId, GatewayNode>,
) -> Result<LogId, ConsensusStoreError> {
    if !voters.contains(&me) {
        return Err(ConsensusStoreError::encode(
            "forced membership",
            "the promoted gateway must be a voter",
        ));
    }
    let (last, vote) = log.last_and_vote().await?;
    let term = vote
        .map_or(0, |v| v.leader_id().term)
        .max(last.map_or(0, |l| l.leader_id.term))
        + 1;
    let index = last.map_or(0, |l| l.index + 1);
    let log_id = LogId::new(CommittedLeaderId::new(term, me), index);
    let entry = Entry {
        log_id,
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    };
    log.force_append(entry, Vote::new(term, me)).await?;
    Ok(log_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::testing::{gateway, temp_store};
    use openraft::RaftLogReader as _;

    #[tokio::test]
    async fn forced_membership_follows_the_log_in_a_new_term() {
        let (_dir, store) = temp_store();
        let mut log = SqliteLogStore::open(store).unwrap();
        let nodes: BTreeMap<NodeId, GatewayNode> =
            [(1, gateway(1)), (2, gateway(2)), (3, gateway(3))].into();
        let id = force_voters(&log, 2, [2].into(), nodes.clone())
            .await
            .unwrap();
        assert_eq!(id.index, 0);
        assert_eq!(id.leader_id.term, 1);
        let id2 = force_voters(&log, 2, [2, 3].into(), nodes.clone())
            .await
            .unwrap();
        assert_eq!(id2.index, 1);
        assert_eq!(id2.leader_id.term, 2);
        let entries = log.try_get_log_entries(0..2).await.unwrap();
        match &entries[1].payload {
            EntryPayload::Membership(m) => {
                assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![2, 3]);
                assert_eq!(m.learner_ids().collect::<Vec<_>>(), vec![1]);
            }
            other => panic!("{other:?}"),
        }
        assert!(force_voters(&log, 1, [2].into(), nodes).await.is_err());
        assert_eq!(log.verify().await.unwrap(), 2);
    }
}
