//! The node directory: which nodes are attached to which gateway, federation-wide.
//!
//! Every gateway announces its own nodes over the mesh whenever one attaches or leaves (and in
//! full on every new link), so any gateway can list every node of the federation and route a
//! request to the gateway holding it.
//!
//! # One answer to "where is node N"
//!
//! Announcements arrive in any order, and a gateway that died keeps its last one. So two
//! gateways may claim the same node: the one it left (which has not noticed yet, or is offline)
//! and the one it is on now. [`resolve`] picks one claim per node, the same way on every
//! gateway:
//!
//! 1. a claim from a live gateway beats one from an offline gateway (an offline gateway's last
//!    announcement never hides a live attachment);
//! 2. then the newest attachment, by the node's own [`AttachOrder`] (the wall clocks of
//!    different machines are not an ordering; the node's count of its starts and attachments
//!    is);
//! 3. then this gateway's own claim, then the gateway name (so ties resolve identically).

use serde::{Deserialize, Serialize};

use crate::identity::DeviceId;

/// Nodes one gateway announces: more would be a flood, not a fleet.
pub const MAX_NODES_PER_GATEWAY: usize = 50_000;

/// One node as the federation sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Device id.
    pub id: DeviceId,
    /// Display name.
    pub name: String,
    /// Labels such as `region=fra`.
    pub labels: Vec<(String, String)>,
    /// Commands it offers.
    pub commands: Vec<String>,
    /// `quic` or `ws`.
    pub transport: String,
    /// Platform.
    pub platform: String,
    /// Address it connected from (IP).
    pub ip: String,
    /// Software version.
    pub version: String,
    /// Which of the node's attachments this is (newer ones win, see [`resolve`]).
    pub attach: AttachOrder,
}

/// Where an attachment is in the node's own history: a later one compares greater.
///
/// A native node keeps `boot` in its state dir (one more at every start) and counts `attach`
/// from 1 at every start; it sends both in its hello. A classic node has none (zero): any
/// native attachment orders after it, and two of its claims fall through to the next rule.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct AttachOrder {
    /// How many times the node host has started.
    pub boot: u64,
    /// Attachments to a gateway since that start, from 1.
    pub attach: u64,
}

impl std::fmt::Display for AttachOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.boot, self.attach)
    }
}

/// One gateway's claim that a node is attached to it, with what the caller lists about it.
#[derive(Debug, Clone)]
pub struct Claim<T> {
    /// The node.
    pub node: DeviceId,
    /// The claiming gateway.
    pub gateway: String,
    /// Whether that gateway is reachable now (this gateway always is).
    pub live: bool,
    /// Whether the claim is this gateway's own.
    pub local: bool,
    /// The attachment claimed.
    pub order: AttachOrder,
    /// The caller's data for it (a listing row, a summary).
    pub item: T,
}

impl<T> Claim<T> {
    /// Larger wins; see the module documentation. The name compares reversed so that the
    /// smaller name wins a full tie.
    fn rank(&self) -> (bool, AttachOrder, bool, std::cmp::Reverse<&str>) {
        (
            self.live,
            self.order,
            self.local,
            std::cmp::Reverse(self.gateway.as_str()),
        )
    }
}

/// One claim per node, the winner of every node's claims (see the module documentation), in
/// the order each node was first claimed.
pub fn resolve<T>(claims: impl IntoIterator<Item = Claim<T>>) -> Vec<Claim<T>> {
    let mut winners: Vec<Claim<T>> = Vec::new();
    let mut at: std::collections::HashMap<DeviceId, usize> = std::collections::HashMap::new();
    for c in claims {
        match at.get(&c.node) {
            Some(&i) => {
                if c.rank() > winners[i].rank() {
                    winners[i] = c;
                }
            }
            None => {
                at.insert(c.node, winners.len());
                winners.push(c);
            }
        }
    }
    winners
}

/// A gateway's announcement of its nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDirectory {
    /// Bumped on every change by the announcing gateway.
    pub version: u64,
    /// Its attached nodes.
    pub nodes: Vec<NodeSummary>,
}

impl NodeSummary {
    /// Whether the node carries `key=value`.
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.iter().any(|(k, v)| k == key && v == value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(node: u8, gateway: &str, live: bool, order: (u64, u64)) -> Claim<()> {
        Claim {
            node: DeviceId([node; 32]),
            gateway: gateway.into(),
            live,
            local: gateway == "tokyo",
            order: AttachOrder {
                boot: order.0,
                attach: order.1,
            },
            item: (),
        }
    }

    fn winner(claims: Vec<Claim<()>>) -> String {
        let won = resolve(claims);
        assert_eq!(won.len(), 1);
        won[0].gateway.clone()
    }

    #[test]
    fn the_newest_attachment_wins_in_any_order() {
        let old = claim(1, "frankfurt", true, (1, 1));
        let new = claim(1, "beijing", true, (1, 2));
        assert_eq!(winner(vec![old.clone(), new.clone()]), "beijing");
        assert_eq!(winner(vec![new, old]), "beijing");
        // A restarted node's first attachment is newer than any of its previous run.
        let before = claim(1, "frankfurt", true, (3, 9));
        let after = claim(1, "beijing", true, (4, 1));
        assert_eq!(winner(vec![after, before]), "beijing");
    }

    #[test]
    fn an_offline_claim_never_hides_a_live_one() {
        // Even one that looks newer (the offline gateway's announcement is the stale one).
        let offline = claim(1, "frankfurt", false, (2, 5));
        let live = claim(1, "beijing", true, (2, 4));
        assert_eq!(winner(vec![offline.clone(), live.clone()]), "beijing");
        assert_eq!(winner(vec![live, offline]), "beijing");
        // With nothing live, the newest offline claim is the best answer.
        let a = claim(1, "frankfurt", false, (2, 5));
        let b = claim(1, "beijing", false, (2, 4));
        assert_eq!(winner(vec![b, a]), "frankfurt");
    }

    #[test]
    fn ties_resolve_the_same_everywhere() {
        let a = claim(1, "frankfurt", true, (0, 0));
        let b = claim(1, "beijing", true, (0, 0));
        assert_eq!(winner(vec![a.clone(), b.clone()]), "beijing");
        assert_eq!(winner(vec![b, a]), "beijing");
        // The local claim wins a tie of order.
        let local = claim(1, "tokyo", true, (0, 0));
        let remote = claim(1, "beijing", true, (0, 0));
        assert_eq!(winner(vec![remote, local]), "tokyo");
    }

    #[test]
    fn one_claim_per_node_in_first_claim_order() {
        let won = resolve(vec![
            claim(2, "beijing", true, (1, 1)),
            claim(1, "frankfurt", true, (1, 1)),
            claim(2, "frankfurt", true, (1, 2)),
        ]);
        let got: Vec<(u8, &str)> = won
            .iter()
            .map(|c| (c.node.0[0], c.gateway.as_str()))
            .collect();
        assert_eq!(got, vec![(2, "frankfurt"), (1, "frankfurt")]);
    }
}
