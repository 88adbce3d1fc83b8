//! The node directory: which nodes are attached to which gateway, federation-wide.
//!
//! Every gateway announces its own nodes over the mesh, so any gateway can list every node of
//! the federation and route a request to the gateway holding it.
//!
//! # Deltas, versions and resync
//!
//! A gateway's directory has a [`DirVersion`]: an `epoch` (the gateway's random boot id, new at
//! every start, so a restarted gateway's count starting over is never mistaken for old news)
//! and a `version` bumped once per announced change. On every new link the gateway sends its
//! whole directory once ([`NodeDirectory`], a snapshot); after that only what changed
//! ([`DirectoryDelta`]: the nodes that attached or changed, and the ids that left), so the
//! bytes per change do not depend on how many nodes the gateway holds. A receiver applies a
//! delta only on top of the version it is based on ([`RemoteDirectory::apply_delta`]); one it
//! already has is ignored, and one that skips a version (a delta dropped from a full queue, a
//! snapshot never received, a different epoch) is a gap: the receiver asks for a snapshot
//! once. Every health ping on a link carries the sender's [`DirVersion`] too, so a receiver
//! that missed the *last* change (no later delta to reveal the gap) notices at the next ping
//! but one ([`RemoteDirectory::on_ping`]: a ping overtaking a delta still in flight is not a
//! gap).
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

use std::collections::BTreeMap;
use std::sync::Arc;

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

/// Where a gateway's directory is in its history (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirVersion {
    /// The announcing gateway's boot id: new at every start of that gateway.
    pub epoch: u64,
    /// Changes announced since that start (0: none yet).
    pub version: u64,
}

impl std::fmt::Display for DirVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}.{}", self.epoch, self.version)
    }
}

/// A gateway's whole directory (a snapshot): sent once on every new link, and when a peer
/// asks because it fell behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDirectory {
    /// The version this snapshot is.
    pub at: DirVersion,
    /// Its attached nodes.
    pub nodes: Vec<NodeSummary>,
}

/// One announced change of a gateway's directory: applies on top of `at.version - 1` of the
/// same epoch only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryDelta {
    /// The version this delta makes.
    pub at: DirVersion,
    /// Nodes that attached, or whose summary changed (a reattachment, new commands).
    pub upserts: Vec<NodeSummary>,
    /// Nodes that left.
    pub removed: Vec<DeviceId>,
}

/// This gateway's own directory: the nodes it announces and the version they are at.
#[derive(Debug, Clone)]
pub struct LocalDirectory {
    at: DirVersion,
    nodes: BTreeMap<DeviceId, NodeSummary>,
}

impl LocalDirectory {
    /// An empty directory of this start of the gateway (`epoch`: its boot id).
    pub fn new(epoch: u64) -> Self {
        LocalDirectory {
            at: DirVersion { epoch, version: 0 },
            nodes: BTreeMap::new(),
        }
    }

    /// The version announced last.
    pub fn at(&self) -> DirVersion {
        self.at
    }

    /// Replaces the nodes with `nodes` (at most [`MAX_NODES_PER_GATEWAY`]; more are not
    /// announced) and returns the change as the next delta, or `None` when nothing changed
    /// (the version stays).
    pub fn update(&mut self, nodes: Vec<NodeSummary>) -> Option<DirectoryDelta> {
        let mut next: BTreeMap<DeviceId, NodeSummary> = BTreeMap::new();
        for n in nodes.into_iter().take(MAX_NODES_PER_GATEWAY) {
            next.insert(n.id, n);
        }
        let removed: Vec<DeviceId> = self
            .nodes
            .keys()
            .filter(|id| !next.contains_key(id))
            .copied()
            .collect();
        let upserts: Vec<NodeSummary> = next
            .values()
            .filter(|n| self.nodes.get(&n.id) != Some(*n))
            .cloned()
            .collect();
        self.nodes = next;
        self.next_delta(upserts, removed)
    }

    /// Applies `changes` (per node: its summary now, or `None`: it left) and returns what
    /// differs from what was announced last as the next delta, or `None` when nothing does
    /// (the version stays). The cost is per change, not per node held: the caller passes
    /// only the nodes that changed (the registry's change log), not the whole list as
    /// [`Self::update`] takes. A node id given twice counts once, its last entry. A new node
    /// past [`MAX_NODES_PER_GATEWAY`] is not announced (as with `update`; it is announced at
    /// its next change once there is room, or at the next full `update`).
    pub fn apply(
        &mut self,
        changes: impl IntoIterator<Item = (DeviceId, Option<NodeSummary>)>,
    ) -> Option<DirectoryDelta> {
        let last: BTreeMap<DeviceId, Option<NodeSummary>> = changes.into_iter().collect();
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for (id, now) in last {
            match now {
                Some(n) => {
                    let known = self.nodes.get(&id);
                    if known == Some(&n)
                        || (known.is_none() && self.nodes.len() >= MAX_NODES_PER_GATEWAY)
                    {
                        continue;
                    }
                    self.nodes.insert(id, n.clone());
                    upserts.push(n);
                }
                None => {
                    if self.nodes.remove(&id).is_some() {
                        removed.push(id);
                    }
                }
            }
        }
        self.next_delta(upserts, removed)
    }

    /// The next delta, holding `upserts` and `removed`, or `None` when both are empty (the
    /// version stays).
    fn next_delta(
        &mut self,
        upserts: Vec<NodeSummary>,
        removed: Vec<DeviceId>,
    ) -> Option<DirectoryDelta> {
        if upserts.is_empty() && removed.is_empty() {
            return None;
        }
        self.at.version += 1;
        Some(DirectoryDelta {
            at: self.at,
            upserts,
            removed,
        })
    }

    /// How many nodes are announced.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is announced.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The whole directory at its current version.
    pub fn snapshot(&self) -> NodeDirectory {
        NodeDirectory {
            at: self.at,
            nodes: self.nodes.values().cloned().collect(),
        }
    }
}

/// Health pings to wait for a snapshot asked for before asking again: a snapshot of 50 000
/// nodes is a few MB, seconds on a slow WAN path; asking every other ping would send several.
pub const REASK_PINGS: u32 = 10;

/// What [`RemoteDirectory::apply_delta`] did with a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was the next version: applied.
    Applied,
    /// This version (or a later one) is already here: ignored.
    Stale,
    /// It skips versions or is of another epoch: not applied; ask the gateway for a snapshot
    /// (`true`: this is the first sign of the gap, so ask now; `false`: asked already).
    Gap(bool),
}

/// Another gateway's directory as this gateway knows it.
#[derive(Debug, Clone, Default)]
pub struct RemoteDirectory {
    /// The version held (`None`: nothing received from this gateway yet).
    at: Option<DirVersion>,
    /// Shared, so a listing takes the nodes without copying them.
    nodes: BTreeMap<DeviceId, Arc<NodeSummary>>,
    /// A snapshot was asked for (or a new link's is on its way) and has not arrived yet.
    asked: bool,
    /// Pings seen since then: a big snapshot on a slow path takes a while, so it is asked
    /// for again only after [`REASK_PINGS`].
    pings_since_asked: u32,
    /// The version a ping announced while this directory was behind it: if the next ping
    /// finds it still behind that version, a change was lost (see [`Self::on_ping`]).
    lag_seen: Option<DirVersion>,
    /// Nodes not kept because the gateway announced more than [`MAX_NODES_PER_GATEWAY`].
    pub dropped: u64,
}

impl RemoteDirectory {
    /// The version held, if any.
    pub fn at(&self) -> Option<DirVersion> {
        self.at
    }

    /// The gateway's nodes, in id order.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = &Arc<NodeSummary>> {
        self.nodes.values()
    }

    /// How many nodes the gateway announced.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// One node, if the gateway announced it.
    pub fn get(&self, node: &DeviceId) -> Option<&Arc<NodeSummary>> {
        self.nodes.get(node)
    }

    /// Whether the gateway announced no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Takes a snapshot unless this directory already holds that version or a later one of
    /// the same epoch (a snapshot queued before deltas that arrived first); true if taken.
    pub fn apply_snapshot(&mut self, snap: NodeDirectory) -> bool {
        if let Some(at) = self.at {
            if at.epoch == snap.at.epoch && at.version >= snap.at.version {
                self.asked = false;
                return false;
            }
        }
        self.nodes.clear();
        for n in snap.nodes {
            self.insert(n);
        }
        self.at = Some(snap.at);
        self.asked = false;
        self.pings_since_asked = 0;
        self.lag_seen = None;
        true
    }

    /// Applies a delta if it is the next version (see [`Applied`]).
    pub fn apply_delta(&mut self, delta: DirectoryDelta) -> Applied {
        match self.at {
            Some(at) if at.epoch == delta.at.epoch && delta.at.version <= at.version => {
                Applied::Stale
            }
            Some(at) if at.epoch == delta.at.epoch && delta.at.version == at.version + 1 => {
                for id in &delta.removed {
                    self.nodes.remove(id);
                }
                for n in delta.upserts {
                    self.insert(n);
                }
                self.at = Some(delta.at);
                Applied::Applied
            }
            _ => Applied::Gap(self.ask()),
        }
    }

    /// A health ping announced the gateway's version `announced`: true if a snapshot should
    /// be asked for now. Behind at one ping is normal (a delta sent just before the ping may
    /// still be on its way); still behind that same version at the next ping means a change
    /// was lost (or the snapshot of a new link, or a snapshot asked for), so ask. A new epoch
    /// is treated the same way: its snapshot is normally on its way with the new link.
    pub fn on_ping(&mut self, announced: DirVersion) -> bool {
        if self.asked {
            self.pings_since_asked += 1;
            if self.pings_since_asked < REASK_PINGS {
                return false;
            }
        }
        let held = self.at;
        let behind = |v: DirVersion| match held {
            Some(at) => at.epoch != v.epoch || at.version < v.version,
            None => true,
        };
        if !behind(announced) {
            self.lag_seen = None;
            return false;
        }
        match self.lag_seen {
            Some(seen) if behind(seen) => {
                // Ask again even if asked before: that request or its answer may be the
                // change that was lost.
                self.lag_seen = None;
                self.asked = true;
                self.pings_since_asked = 0;
                true
            }
            _ => {
                self.lag_seen = Some(announced);
                false
            }
        }
    }

    /// A new link came up: its snapshot is on its way (pings do not ask for one for a while).
    pub fn expect_snapshot(&mut self) {
        self.asked = true;
        self.pings_since_asked = 0;
        self.lag_seen = None;
    }

    /// Forgets the gateway's directory (it was forgotten by the federation).
    pub fn clear(&mut self) {
        *self = RemoteDirectory::default();
    }

    fn ask(&mut self) -> bool {
        self.pings_since_asked = 0;
        !std::mem::replace(&mut self.asked, true)
    }

    fn insert(&mut self, n: NodeSummary) {
        if self.nodes.len() >= MAX_NODES_PER_GATEWAY && !self.nodes.contains_key(&n.id) {
            self.dropped += 1;
            return;
        }
        self.nodes.insert(n.id, Arc::new(n));
    }
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

    fn summary(node: u8, name: &str) -> NodeSummary {
        NodeSummary {
            id: DeviceId([node; 32]),
            name: name.into(),
            labels: vec![("region".into(), "fra".into())],
            commands: vec!["system.run".into(), "system.which".into()],
            transport: "quic".into(),
            platform: "linux".into(),
            ip: "10.0.0.1".into(),
            version: "1.0.0".into(),
            attach: AttachOrder { boot: 1, attach: 1 },
        }
    }

    fn names(d: &RemoteDirectory) -> Vec<String> {
        d.nodes().map(|n| n.name.clone()).collect()
    }

    #[test]
    fn deltas_carry_only_the_change() {
        let mut local = LocalDirectory::new(7);
        let all: Vec<NodeSummary> = (0..200).map(|i| summary(i, &format!("n{i}"))).collect();
        let first = local.update(all.clone()).unwrap();
        assert_eq!(
            first.at,
            DirVersion {
                epoch: 7,
                version: 1
            }
        );
        assert_eq!(first.upserts.len(), 200);
        // Nothing changed: no delta, no new version.
        assert!(local.update(all.clone()).is_none());
        assert_eq!(local.at().version, 1);
        // One leaves, one attaches, one reattaches (a newer attachment): three entries,
        // whatever the size of the directory.
        let mut next = all.clone();
        next.retain(|n| n.id != DeviceId([5; 32]));
        next.push(summary(250, "new"));
        if let Some(n) = next.iter_mut().find(|n| n.name == "n10") {
            n.attach.attach = 2;
        }
        let d = local.update(next).unwrap();
        assert_eq!(d.at.version, 2);
        assert_eq!(d.removed, vec![DeviceId([5; 32])]);
        let mut up: Vec<&str> = d.upserts.iter().map(|n| n.name.as_str()).collect();
        up.sort();
        assert_eq!(up, vec!["n10", "new"]);
        let snap = local.snapshot();
        assert_eq!(snap.at, d.at);
        assert_eq!(snap.nodes.len(), 200);
    }

    #[test]
    fn applying_changes_announces_only_what_differs() {
        let mut local = LocalDirectory::new(7);
        let all: Vec<NodeSummary> = (0..200).map(|i| summary(i, &format!("n{i}"))).collect();
        local.update(all.clone()).unwrap();
        // A change set naming nodes that did not change (a reattach with the same summary, a
        // detach of a node never announced): nothing to announce, the version stays.
        let same = vec![
            (DeviceId([3; 32]), Some(summary(3, "n3"))),
            (DeviceId([240; 32]), None),
        ];
        assert!(local.apply(same).is_none());
        assert_eq!(local.at().version, 1);
        // One leaves, one attaches, one reattaches, one is named twice (its last entry wins):
        // the delta holds exactly those, whatever the directory's size.
        let mut n10 = summary(10, "n10");
        n10.attach.attach = 2;
        let changes = vec![
            (DeviceId([5; 32]), None),
            (DeviceId([250; 32]), Some(summary(250, "new"))),
            (DeviceId([10; 32]), Some(n10.clone())),
            (DeviceId([20; 32]), None),
            (DeviceId([20; 32]), Some(summary(20, "n20"))),
        ];
        let d = local.apply(changes).unwrap();
        assert_eq!(d.at.version, 2);
        assert_eq!(d.removed, vec![DeviceId([5; 32])]);
        let mut up: Vec<&str> = d.upserts.iter().map(|n| n.name.as_str()).collect();
        up.sort();
        assert_eq!(up, vec!["n10", "new"]);
        // The same state as a full update to the same nodes would reach.
        let mut full = LocalDirectory::new(7);
        let mut next = all;
        next.retain(|n| n.id != DeviceId([5; 32]) && n.id != DeviceId([10; 32]));
        next.push(summary(250, "new"));
        next.push(n10);
        full.update(next);
        assert_eq!(local.snapshot().nodes, full.snapshot().nodes);
        assert_eq!(local.len(), 200);
        // And a remote following the deltas ends up there too.
        let mut remote = RemoteDirectory::default();
        let mut fresh = LocalDirectory::new(9);
        remote.apply_snapshot(fresh.snapshot());
        let d1 = fresh
            .apply(vec![(DeviceId([1; 32]), Some(summary(1, "a")))])
            .unwrap();
        let d2 = fresh
            .apply(vec![
                (DeviceId([2; 32]), Some(summary(2, "b"))),
                (DeviceId([1; 32]), None),
            ])
            .unwrap();
        assert_eq!(remote.apply_delta(d1), Applied::Applied);
        assert_eq!(remote.apply_delta(d2), Applied::Applied);
        assert_eq!(names(&remote), vec!["b"]);
    }

    #[test]
    fn a_remote_follows_deltas_in_order_and_ignores_repeats() {
        let mut local = LocalDirectory::new(1);
        let mut remote = RemoteDirectory::default();
        assert!(remote.apply_snapshot(local.snapshot()));
        let d1 = local
            .update(vec![summary(1, "a"), summary(2, "b")])
            .unwrap();
        let d2 = local.update(vec![summary(2, "b")]).unwrap();
        assert_eq!(remote.apply_delta(d1.clone()), Applied::Applied);
        assert_eq!(remote.apply_delta(d2.clone()), Applied::Applied);
        assert_eq!(names(&remote), vec!["b"]);
        // A repeat (the same delta from a replaced link) changes nothing.
        assert_eq!(remote.apply_delta(d1), Applied::Stale);
        assert_eq!(remote.apply_delta(d2), Applied::Stale);
        assert_eq!(names(&remote), vec!["b"]);
        assert_eq!(remote.at(), Some(local.at()));
    }

    #[test]
    fn a_lost_delta_is_a_gap_asked_once_and_a_snapshot_repairs_it() {
        let mut local = LocalDirectory::new(1);
        let mut remote = RemoteDirectory::default();
        remote.apply_snapshot(local.snapshot());
        let _lost = local.update(vec![summary(1, "a")]).unwrap();
        let d2 = local
            .update(vec![summary(1, "a"), summary(2, "b")])
            .unwrap();
        let d3 = local.update(vec![summary(2, "b")]).unwrap();
        // Version 2 on top of 0: a gap, asked for once, not applied.
        assert_eq!(remote.apply_delta(d2), Applied::Gap(true));
        assert_eq!(remote.apply_delta(d3.clone()), Applied::Gap(false));
        assert!(remote.is_empty());
        assert_eq!(remote.at().map(|a| a.version), Some(0));
        // The snapshot brings it up to date; the late delta is then stale.
        assert!(remote.apply_snapshot(local.snapshot()));
        assert_eq!(names(&remote), vec!["b"]);
        assert_eq!(remote.apply_delta(d3), Applied::Stale);
        // And the next gap is asked for again.
        let _lost = local.update(vec![]).unwrap();
        let d5 = local.update(vec![summary(3, "c")]).unwrap();
        assert_eq!(remote.apply_delta(d5), Applied::Gap(true));
    }

    #[test]
    fn reordered_snapshot_and_deltas_converge() {
        let mut local = LocalDirectory::new(1);
        local.update(vec![summary(1, "a")]);
        let old_snap = local.snapshot();
        let d2 = local
            .update(vec![summary(1, "a"), summary(2, "b")])
            .unwrap();
        let mut remote = RemoteDirectory::default();
        remote.apply_snapshot(local.snapshot());
        // An older snapshot arriving after a newer state never rolls it back.
        assert!(!remote.apply_snapshot(old_snap));
        assert_eq!(names(&remote), vec!["a", "b"]);
        assert_eq!(remote.apply_delta(d2), Applied::Stale);
    }

    #[test]
    fn a_restarted_gateway_starts_a_new_epoch() {
        let mut before = LocalDirectory::new(1);
        before.update(vec![summary(1, "a")]);
        before.update(vec![summary(1, "a"), summary(2, "b")]);
        let mut remote = RemoteDirectory::default();
        remote.apply_snapshot(before.snapshot());
        // The restart counts from 1 again: its version 1 is not old news.
        let mut after = LocalDirectory::new(2);
        let d1 = after.update(vec![summary(3, "c")]).unwrap();
        assert_eq!(d1.at.version, 1);
        assert_eq!(remote.apply_delta(d1), Applied::Gap(true));
        assert!(remote.apply_snapshot(after.snapshot()));
        assert_eq!(names(&remote), vec!["c"]);
        // Nor does the old epoch's late delta apply on the new one.
        let mut old = before.clone();
        let late = old.update(vec![]).unwrap();
        assert!(matches!(remote.apply_delta(late), Applied::Gap(_)));
        assert_eq!(names(&remote), vec!["c"]);
    }

    #[test]
    fn pings_find_a_lost_last_change_but_not_one_in_flight() {
        let mut local = LocalDirectory::new(1);
        let mut remote = RemoteDirectory::default();
        remote.apply_snapshot(local.snapshot());
        assert!(!remote.on_ping(local.at()));
        // A delta in flight when the ping arrives: behind at one ping, caught up by the next.
        let d1 = local.update(vec![summary(1, "a")]).unwrap();
        assert!(!remote.on_ping(local.at()));
        assert_eq!(remote.apply_delta(d1), Applied::Applied);
        assert!(!remote.on_ping(local.at()));
        // The last change lost: no later delta shows the gap, the second ping does.
        let _lost = local.update(vec![]).unwrap();
        assert!(!remote.on_ping(local.at()));
        assert!(remote.on_ping(local.at()));
        // If the snapshot asked for is lost too, it is asked again after REASK_PINGS (a big
        // one may just be slow).
        for _ in 1..REASK_PINGS {
            assert!(!remote.on_ping(local.at()));
        }
        assert!(!remote.on_ping(local.at()));
        assert!(remote.on_ping(local.at()));
        assert!(remote.apply_snapshot(local.snapshot()));
        assert!(remote.is_empty());
        assert!(!remote.on_ping(local.at()));
        // A directory never received (no snapshot yet) is behind any version.
        let mut fresh = RemoteDirectory::default();
        assert!(!fresh.on_ping(local.at()));
        assert!(fresh.on_ping(local.at()));
        // A new link's snapshot is awaited, not asked for again at once.
        let mut linked = RemoteDirectory::default();
        linked.expect_snapshot();
        for _ in 0..REASK_PINGS {
            assert!(!linked.on_ping(local.at()));
        }
        assert!(linked.on_ping(local.at()));
    }

    #[test]
    fn a_delta_of_one_change_is_small_at_any_directory_size() {
        use crate::frame::{encode, MAX_FRAME};
        let mut sizes = Vec::new();
        for n in [10u32, 10_000] {
            let mut local = LocalDirectory::new(1);
            let nodes: Vec<NodeSummary> = (0..n)
                .map(|i| {
                    let mut s = summary(0, &format!("node-{i}"));
                    s.id.0[..4].copy_from_slice(&i.to_be_bytes());
                    s
                })
                .collect();
            local.update(nodes.clone());
            let mut next = nodes;
            next.pop();
            let d = local.update(next).unwrap();
            let bytes = encode(&d, MAX_FRAME).unwrap().len();
            sizes.push(bytes);
        }
        assert_eq!(
            sizes[0], sizes[1],
            "a detach costs the same at 10 and 10 000 nodes"
        );
        assert!(sizes[1] < 1024, "{sizes:?}");
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
