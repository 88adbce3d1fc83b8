//! The node rows the alert rules evaluate, kept up to date per change instead of read from
//! every node at every evaluation.
//!
//! The alert duty evaluates its rules twice a second. Reading every attached node's row each
//! time (the `node.list` index of the whole federation, parsed) cost O(nodes) per
//! evaluation: at 100 000 nodes, 300 MB of a 430 MB heap peak. [`AlertRows`] instead keeps,
//! per attached node, what a rule reads (name, attachment, session, host vitals), updated
//!
//! - from the node registry's change set (`crate::gateway::node_changes`) at each evaluation:
//!   only the nodes that attached, left or reattached since the last one are read again; all
//!   of them once only after the change log overflowed (counted as `clawmesh_alert_full_reads`);
//! - from each node's vitals as they arrive (`Liveness::with_vitals_hook`), queued in a
//!   bounded inbox and applied at the next evaluation (a full inbox means one full read).
//!
//! It also keeps which nodes are *hot*: some vital above the lowest threshold of the CPU,
//! memory and disk rules in force. A node below every threshold cannot make a rule fire, so
//! the document handed to the rules holds only hot local nodes, nodes of other gateways with
//! relayed vitals (as before: O(remote nodes with vitals), this gateway has no change set of
//! theirs), and paired nodes attached nowhere (kept per change too, rebuilt only when the
//! paired devices or another gateway's directory change). Evaluating the rules over those
//! rows is O(alerting nodes), not O(fleet). The rows are in node id order, the order of the
//! `node.list` document they replace, so the conditions come out in the same order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use clawmesh_federation::directory::{self, AttachOrder, Claim, DirVersion};
use clawmesh_federation::health::Status;
use clawmesh_federation::identity::{DeviceId, PublicKey};
use clawmesh_federation::mesh::Mesh;
use clawmesh_federation::pairing::PairedBrief;
use clawmesh_federation::vitals::Received;
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use crate::alerts_config::{Rule, RuleKind};
use crate::gateway::node_changes::{Changes, Cursor, FullReads};
use crate::gateway::registry::{AlertBrief, NodeRegistry};

/// The lowest threshold per vital of the rules in force (`None`: no rule on it): a node whose
/// vitals are all at or below these cannot make a threshold rule fire.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bar {
    cpu: Option<f64>,
    mem: Option<f64>,
    disk: Option<f64>,
}

impl Bar {
    /// The bar of `rules`.
    pub fn of(rules: &[Rule]) -> Bar {
        let mut bar = Bar::default();
        for r in rules {
            let slot = match r.kind {
                RuleKind::Cpu => &mut bar.cpu,
                RuleKind::Memory => &mut bar.mem,
                RuleKind::Disk => &mut bar.disk,
                _ => continue,
            };
            *slot = Some(slot.map_or(r.above, |a: f64| a.min(r.above)));
        }
        bar
    }

    /// Whether a reading is above the bar on some vital.
    fn hot(&self, r: Option<&Received>) -> bool {
        let Some(v) = r.map(|r| r.vitals) else {
            return false;
        };
        let above =
            |bar: Option<f64>, x: Option<f64>| matches!((bar, x), (Some(b), Some(x)) if x > b);
        above(self.cpu, v.cpu_pct())
            || above(self.mem, v.mem_pct())
            || above(self.disk, v.disk_pct())
    }
}

/// One gateway's directory as the unclaimed set was built from it: key, name, version, size.
type RemoteKey = (PublicKey, String, Option<DirVersion>, usize);

/// Paired nodes attached nowhere, and what that was worked out from.
struct Unclaimed {
    paired: Arc<PairedBrief>,
    remotes: Vec<RemoteKey>,
    /// Node id → display name.
    ids: BTreeMap<DeviceId, String>,
}

#[derive(Default)]
struct Rows {
    /// Where the rows are in the registry's change log (`None`: never read).
    cursor: Option<Cursor>,
    /// Every attached node.
    nodes: HashMap<DeviceId, AlertBrief>,
    /// The bar `hot` was computed for.
    bar: Bar,
    /// Attached nodes above the bar.
    hot: BTreeSet<DeviceId>,
    unclaimed: Option<Unclaimed>,
}

impl Rows {
    fn rate(&mut self, id: DeviceId) {
        if self
            .nodes
            .get(&id)
            .is_some_and(|b| self.bar.hot(b.vitals.as_ref()))
        {
            self.hot.insert(id);
        } else {
            self.hot.remove(&id);
        }
    }
}

/// Vitals readings waiting to be applied to the rows: a node's session hands its reading
/// over here (a short lock) rather than wait for the rows' lock, which an evaluation holds
/// while it reads the change set.
#[derive(Default)]
struct Inbox {
    readings: Vec<(DeviceId, u64, Received)>,
    /// Readings were dropped (the inbox was full): the next evaluation reads every node.
    overflowed: bool,
}

/// Readings the inbox holds between two evaluations (about 100 bytes each: 1.6 MB at most).
/// A native node sends vitals every 6 health intervals, so 50 000 nodes at the default 10 s
/// interval send about 830 a second: this covers about 20 s between evaluations (they run
/// every 0.5 to a few s). A gateway not on duty stops filling it at the bound and reads every
/// node once when it takes the duty.
const INBOX_MAX: usize = 16_384;

/// The alert rules' view of the attached nodes, kept per change (see the module
/// documentation).
#[derive(Default)]
pub struct AlertRows {
    rows: Mutex<Rows>,
    inbox: Mutex<Inbox>,
}

impl std::fmt::Debug for AlertRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AlertRows")
    }
}

/// One row of the document, before it is written as JSON.
struct Out {
    id: DeviceId,
    name: String,
    gateway: Option<String>,
    connected: bool,
    vitals: Option<Received>,
}

impl AlertRows {
    fn lock(&self) -> MutexGuard<'_, Rows> {
        // Every update is a few map operations; a poisoned lock still holds consistent rows.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node's vitals arrived (its session's `Liveness` hook): queued for the next
    /// evaluation (see [`Inbox`]).
    pub fn on_vitals(&self, node: DeviceId, session: u64, r: Received) {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if inbox.overflowed {
            return;
        }
        if inbox.readings.len() >= INBOX_MAX {
            inbox.overflowed = true;
            inbox.readings = Vec::new();
            return;
        }
        inbox.readings.push((node, session, r));
    }

    /// The `node.list {"all":true}`-shaped document (`{"nodes":[...]}`, node id order) with the
    /// rows `rules` can fire on (see the module documentation): the registry's changes since
    /// the last call are read first.
    pub fn document(
        &self,
        registry: &NodeRegistry,
        mesh: Option<&Mesh>,
        paired: Arc<PairedBrief>,
        gateway: &str,
        rules: &[Rule],
    ) -> Value {
        let mut rows = self.lock();
        let inbox = std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        // Readings dropped from a full inbox: every node is read again, vitals included.
        let cursor = rows.cursor.filter(|_| !inbox.overflowed);
        let (changes, next) = registry.changes_since(cursor);
        rows.cursor = Some(next);
        let bar = Bar::of(rules);
        // New rules (or a full read): every node is rated once against the new bar.
        let mut rerate = rows.bar != bar;
        // Readings that arrived since the last evaluation, for the sessions the rows hold;
        // applied before the change set, so a node read from the registry below keeps the
        // newer reading the registry has.
        for (id, session, r) in inbox.readings {
            match rows.nodes.get_mut(&id) {
                Some(b) if b.session == session => b.vitals = Some(r),
                _ => continue,
            }
            if !rerate {
                rows.rate(id);
            }
        }
        let changed: Option<Vec<DeviceId>> = match changes {
            Changes::Ids(ids) => {
                for id in &ids {
                    match registry.alert_brief(id) {
                        Some(b) => {
                            rows.nodes.insert(*id, b);
                        }
                        None => {
                            rows.nodes.remove(id);
                        }
                    }
                    if !rerate {
                        rows.rate(*id);
                    }
                }
                Some(ids)
            }
            Changes::Overflowed => {
                FullReads::count(&registry.full_reads().alerts);
                rows.nodes = registry.alert_briefs().into_iter().collect();
                rerate = true;
                None
            }
        };
        if rerate {
            rows.bar = bar;
            let hot: BTreeSet<DeviceId> = rows
                .nodes
                .iter()
                .filter(|(_, b)| bar.hot(b.vitals.as_ref()))
                .map(|(id, _)| *id)
                .collect();
            rows.hot = hot;
        }
        let needs_disconnected = rules.iter().any(|r| r.kind == RuleKind::NodeDisconnected);
        let needs_vitals = bar != Bar::default();
        let mut out: Vec<Out> = Vec::new();
        if needs_disconnected {
            update_unclaimed(&mut rows, mesh, paired, changed.as_deref());
            if let Some(u) = &rows.unclaimed {
                out.extend(u.ids.iter().map(|(id, name)| Out {
                    id: *id,
                    name: name.clone(),
                    gateway: None,
                    connected: false,
                    vitals: None,
                }));
            }
        }
        let remote_claims =
            |id: &DeviceId| mesh.map(|m| m.remote_claims_of(id)).unwrap_or_default();
        if needs_vitals || needs_disconnected {
            // Hot nodes attached here, unless another gateway's claim on them wins (then its
            // relayed vitals, below, are the row's).
            for id in &rows.hot {
                let Some(b) = rows.nodes.get(id) else {
                    continue;
                };
                let others = remote_claims(id);
                if !others.is_empty() && !local_wins(id, b.attach, gateway, &others) {
                    continue;
                }
                out.push(Out {
                    id: *id,
                    name: b.name.clone(),
                    gateway: Some(gateway.to_string()),
                    connected: true,
                    vitals: b.vitals,
                });
            }
        }
        if let Some(m) = mesh {
            // Other gateways' nodes with relayed vitals: O(those), as before this module.
            let mut relayed: BTreeMap<DeviceId, Vec<(String, Received)>> = BTreeMap::new();
            for (gw, id, _, r) in m.remote_node_vitals() {
                relayed.entry(id).or_default().push((gw, r));
            }
            for (id, readings) in relayed {
                let mut claims: Vec<Claim<Option<(String, Status, String)>>> = Vec::new();
                if let Some(b) = rows.nodes.get(&id) {
                    claims.push(Claim {
                        node: id,
                        gateway: gateway.to_string(),
                        live: true,
                        local: true,
                        order: b.attach,
                        item: None,
                    });
                }
                for (gw, status, n) in m.remote_claims_of(&id) {
                    claims.push(Claim {
                        node: id,
                        gateway: gw.clone(),
                        live: status != Status::Offline,
                        local: false,
                        order: n.attach,
                        item: Some((gw, status, n.name.clone())),
                    });
                }
                let Some(won) = directory::resolve(claims).into_iter().next() else {
                    continue;
                };
                // Attached here: its row is the local one (above, if hot).
                let Some((gw, status, name)) = won.item else {
                    continue;
                };
                let vitals = readings.into_iter().find(|(g, _)| *g == gw).map(|(_, r)| r);
                let connected = status != Status::Offline;
                if connected && !bar.hot(vitals.as_ref()) {
                    continue;
                }
                out.push(Out {
                    id,
                    name,
                    gateway: Some(gw),
                    connected,
                    vitals,
                });
            }
        }
        drop(rows);
        out.sort_by_key(|o| o.id);
        let nodes: Vec<Value> = out
            .into_iter()
            .map(|o| {
                json!({
                    "nodeId": o.id.to_string(),
                    "displayName": o.name,
                    "gateway": o.gateway,
                    "connected": o.connected,
                    "vitals": o.vitals.map(|r| r.to_json()),
                })
            })
            .collect();
        json!({ "nodes": nodes })
    }
}

/// Whether this gateway's claim on `id` (attachment `attach`) beats every other gateway's.
fn local_wins(
    id: &DeviceId,
    attach: AttachOrder,
    gateway: &str,
    others: &[(
        String,
        Status,
        Arc<clawmesh_federation::directory::NodeSummary>,
    )],
) -> bool {
    let mine = Claim {
        node: *id,
        gateway: gateway.to_string(),
        live: true,
        local: true,
        order: attach,
        item: true,
    };
    let theirs = others.iter().map(|(gw, status, n)| Claim {
        node: *id,
        gateway: gw.clone(),
        live: *status != Status::Offline,
        local: false,
        order: n.attach,
        item: false,
    });
    directory::resolve(std::iter::once(mine).chain(theirs))
        .first()
        .is_some_and(|c| c.item)
}

/// Brings the set of paired nodes attached nowhere up to date: rebuilt (O(paired devices))
/// when the paired devices or another gateway's directory changed, else only the nodes of
/// this gateway's change set (`changed`; `None`: a full read, rebuild) are looked at again.
fn update_unclaimed(
    rows: &mut Rows,
    mesh: Option<&Mesh>,
    paired: Arc<PairedBrief>,
    changed: Option<&[DeviceId]>,
) {
    let remotes: Vec<RemoteKey> = mesh
        .map(|m| m.remote_directories(false))
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.key, r.gateway, r.at, r.len))
        .collect();
    let claimed_remotely = |id: &DeviceId| mesh.is_some_and(|m| !m.remote_claims_of(id).is_empty());
    let same = rows
        .unclaimed
        .as_ref()
        .is_some_and(|u| Arc::ptr_eq(&u.paired, &paired) && u.remotes == remotes);
    match (same, changed) {
        (true, Some(ids)) => {
            let Rows {
                nodes, unclaimed, ..
            } = rows;
            let Some(u) = unclaimed.as_mut() else { return };
            for id in ids {
                let brief = u
                    .paired
                    .get(&id.to_string())
                    .filter(|d| d.role == "node")
                    .map(|d| d.name.clone());
                match brief {
                    Some(name) if !nodes.contains_key(id) && !claimed_remotely(id) => {
                        u.ids.insert(*id, name);
                    }
                    _ => {
                        u.ids.remove(id);
                    }
                }
            }
        }
        _ => {
            let mut ids = BTreeMap::new();
            for d in paired.devices.iter().filter(|d| d.role == "node") {
                let Some(id) = DeviceId::parse(&d.device_id) else {
                    continue;
                };
                if !rows.nodes.contains_key(&id) && !claimed_remotely(&id) {
                    ids.insert(id, d.name.clone());
                }
            }
            rows.unclaimed = Some(Unclaimed {
                paired,
                remotes,
                ids,
            });
        }
    }
}

impl super::Methods {
    /// The node rows the alert rules evaluate (see [`AlertRows::document`]): what the alert
    /// duty reads at every evaluation, at a cost that follows the changes since the last one
    /// and the nodes that can fire, not the fleet.
    pub fn alerting_rows(&self, rules: &[Rule]) -> Result<Value, WireError> {
        let paired = self
            .inner
            .pairing
            .paired_brief()
            .map_err(super::pairing_err)?;
        let gateway = self.gateway_name();
        Ok(self.inner.alert_rows.document(
            &self.inner.nodes,
            self.inner.mesh.get(),
            paired,
            &gateway,
            rules,
        ))
    }

    /// The alert rows, for the hook each native node's session installs on its `Liveness`.
    pub fn alert_rows(&self) -> &Arc<AlertRows> {
        &self.inner.alert_rows
    }
}
