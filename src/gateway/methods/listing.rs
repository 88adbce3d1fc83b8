//! `node.list` at fleet size: every node of the federation (100 000 and more) listed in node
//! id order, a page at a time if asked, at a cost that grows with the page, not the fleet.
//!
//! # The index
//!
//! The gateway keeps the federation's directory resolved (one claim per node, see
//! `directory::resolve`) and sorted by node id between calls, with each row's unchanging part
//! already written as JSON text ([`Index`]). A page is then a binary search for the cursor, a
//! range of rows copied out, and the live fields appended to each (`connected` and the
//! gateway's health, as of this call; host vitals, looked up for the page's nodes only).
//!
//! The index is keyed by what it was built from: every other gateway's directory version
//! (with its key, name, liveness and size), the local registry's generation (bumped on every
//! attach and detach) and the paired devices (their cached brief, compared by `Arc`). When any
//! of these changes, the next listing builds a new index, copying the rows of nodes whose
//! announcement is the same `Arc` as before (the mesh replaces a node's `Arc` when it
//! changes) and writing only the others. An index nobody has used for [`IDLE`] is dropped, so
//! the memory does not stay up after a listing.
//!
//! # The cursor
//!
//! Node ids order the listing: a page ends at a node id (`next`) and the next page starts
//! after it (`after`). A node attaching or leaving between two pages neither shifts nor repeats
//! the others: a node that attaches with an id after the cursor is listed on a later page, one
//! before the cursor is not (it appears in the next listing from the start), and one that
//! leaves before its page is reached is not listed. Each page reflects the federation at the
//! moment it was built; a whole listing is not a snapshot of one instant.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clawmesh_federation::directory::{self, Claim, DirVersion, NodeSummary};
use clawmesh_federation::health::Status;
use clawmesh_federation::identity::{DeviceId, PublicKey};
use clawmesh_federation::mesh::RemoteDirectoryView;
use clawmesh_federation::pairing::{BriefDevice, PairedBrief};
use clawmesh_federation::vitals::Received;
use clawmesh_federation::wire::WireError;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::Value;

use super::{bad, now_ms, pairing_err, Methods};
use crate::gateway::registry::{self, NodeInfo};

/// What a caller asked of `node.list`.
#[derive(Debug, Clone, Default)]
pub(super) struct ListParams {
    /// Every node of the federation, not only those paired or attached here.
    pub all: bool,
    /// At most this many rows (`None`: all).
    pub limit: Option<usize>,
    /// Only nodes whose id sorts after this one (the previous page's `next`).
    pub after: Option<String>,
}

impl ListParams {
    /// Reads `all`, `limit` and `after` from `node.list` params.
    pub fn parse(params: &Value) -> Result<ListParams, WireError> {
        let all = params.get("all").and_then(Value::as_bool).unwrap_or(false);
        let limit = match params.get("limit") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                _ => {
                    return Err(bad(format!(
                    "invalid node.list params: limit must be a whole number of at least 1, not {v}"
                )))
                }
            },
        };
        let after = match params.get("after") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.trim().to_ascii_lowercase()),
            Some(v) => {
                return Err(bad(format!(
                    "invalid node.list params: after must be a node id (the `next` of the previous page), not {v}"
                )))
            }
        };
        Ok(ListParams { all, limit, after })
    }
}

/// A node's labels: its own, and `region` from its pairing record when it has none.
struct Labels<'a> {
    own: &'a [(String, String)],
    region: Option<&'a str>,
}

impl Serialize for Labels<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.own {
            m.serialize_entry(k, v)?;
        }
        if let Some(r) = self
            .region
            .filter(|_| !self.own.iter().any(|(k, _)| k == "region"))
        {
            m.serialize_entry("region", r)?;
        }
        m.end()
    }
}

/// The unchanging part of one row of `node.list` (the same fields as the rows of
/// `node.describe`); the live ones ([`Tail`] and `vitals`) are written per page.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Row<'a> {
    node_id: &'a str,
    display_name: &'a str,
    platform: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    caps: &'a [String],
    commands: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_mode: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_family: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_env: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_ip: Option<Cow<'a, str>>,
    paired: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected_at_ms: Option<u64>,
    transport: Option<&'a str>,
    local: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    attach: Option<String>,
    labels: Labels<'a>,
    approval_state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    approved_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approved_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tailnet: Option<&'a Value>,
}

/// How long an unused index is kept. A script paging through the fleet asks for its next page
/// within milliseconds, so 10 s spans a whole listing; after that the index's memory (about
/// half a kilobyte per node) is given back rather than kept for a listing that may not come.
const IDLE: Duration = Duration::from_secs(10);

/// Where a node's listed claim comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Origin {
    /// Attached here.
    Local,
    /// Announced by the index's `remotes[i]`.
    Remote(usize),
    /// Paired and claimed by no gateway: listed as not connected.
    Unclaimed,
}

/// One node of the index.
struct Item {
    id: DeviceId,
    origin: Origin,
    /// Listed without `all`: attached here, or paired.
    mine: bool,
    /// The unchanging part of its row, in [`Index::rows`].
    row: Range<usize>,
    /// The announcement the row was written from: a rebuild reuses the row while the gateway
    /// still announces this very `Arc` (the mesh replaces it when the node changes).
    node: Option<Arc<NodeSummary>>,
}

/// One remote directory as a key sees it: gateway key, name, live, version, size.
type RemoteKey = (PublicKey, String, bool, Option<DirVersion>, usize);

/// What an index was built from (besides the paired devices, compared by `Arc`): when any of
/// it changes, the next listing builds a new index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Key {
    gateway: String,
    /// The local registry's generation (bumped on every attach and detach).
    local: u64,
    remotes: Vec<RemoteKey>,
}

impl Key {
    fn of(gateway: &str, local: u64, remotes: &[RemoteDirectoryView]) -> Key {
        Key {
            gateway: gateway.to_string(),
            local,
            remotes: remotes
                .iter()
                .map(|r| {
                    (
                        r.key,
                        r.gateway.clone(),
                        r.status != Status::Offline,
                        r.at,
                        r.len,
                    )
                })
                .collect(),
        }
    }
}

/// Everything an index is built from, read once.
struct Inputs {
    key: Key,
    local: Vec<(NodeInfo, &'static str)>,
    remotes: Vec<RemoteDirectoryView>,
    paired: Arc<PairedBrief>,
}

/// The federation's directory resolved (one claim per node) and sorted by node id, with each
/// row's unchanging part written out: a page is a range of it plus the live fields.
struct Index {
    key: Key,
    paired: Arc<PairedBrief>,
    items: Vec<Item>,
    /// The rows' unchanging parts, back to back (each without its closing brace).
    rows: String,
    /// The gateway names of [`Origin::Remote`].
    remotes: Vec<String>,
}

/// A claim's listing data: local session index, or the announcing gateway and node.
enum Src {
    Local(usize),
    Remote(usize, Arc<NodeSummary>),
}

impl Index {
    /// Resolves and sorts `inp`, writing each row's unchanging part; rows of `old` whose
    /// announcement and paired devices did not change are copied, not written again.
    fn build(inp: Inputs, old: Option<&Index>) -> Result<Index, WireError> {
        let Inputs {
            key,
            local,
            remotes,
            paired,
        } = inp;
        let gateway = key.gateway.clone();
        let total: usize = local.len() + remotes.iter().map(|r| r.nodes.len()).sum::<usize>();
        let mut claims = Vec::with_capacity(total);
        for (i, (info, _)) in local.iter().enumerate() {
            claims.push(Claim {
                node: info.node_id,
                gateway: gateway.clone(),
                live: true,
                local: true,
                order: info.attach,
                item: Src::Local(i),
            });
        }
        for (gi, r) in remotes.iter().enumerate() {
            let live = r.status != Status::Offline;
            for n in &r.nodes {
                claims.push(Claim {
                    node: n.id,
                    gateway: r.gateway.clone(),
                    live,
                    local: false,
                    order: n.attach,
                    item: Src::Remote(gi, n.clone()),
                });
            }
        }
        let mut won = directory::resolve(claims);
        won.sort_unstable_by_key(|c| c.node);
        // Paired nodes nobody claims, merged in id order.
        let mut unclaimed: Vec<(DeviceId, &BriefDevice)> = Vec::new();
        for d in paired.devices.iter().filter(|d| d.role == "node") {
            match DeviceId::parse(&d.device_id) {
                Some(id) => {
                    if won.binary_search_by(|c| c.node.cmp(&id)).is_err() {
                        unclaimed.push((id, d));
                    }
                }
                None => {
                    tracing::debug!(device = %d.device_id, "paired node id is not a device id; not listed")
                }
            }
        }
        unclaimed.sort_unstable_by_key(|u| u.0);
        let reuse = old.filter(|o| Arc::ptr_eq(&o.paired, &paired));
        let mut rows = String::with_capacity(match reuse {
            Some(o) => o.rows.len() + o.rows.len() / 8,
            None => total.saturating_mul(400),
        });
        let mut items = Vec::with_capacity(won.len() + unclaimed.len());
        let mut oi = 0usize;
        let mut wi = won.into_iter().peekable();
        let mut ui = unclaimed.into_iter().peekable();
        loop {
            let take_won = match (wi.peek(), ui.peek()) {
                (Some(c), Some(u)) => c.node < u.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let begin = rows.len();
            let item = if take_won {
                let Some(c) = wi.next() else { break };
                let id = c.node;
                let hex = id.to_string();
                let pd = paired.get(&hex);
                let mine = c.local || pd.is_some();
                match c.item {
                    Src::Local(i) => {
                        let (info, transport) = &local[i];
                        push_row(&mut rows, &local_row(&hex, info, transport, pd))?;
                        Item {
                            id,
                            origin: Origin::Local,
                            mine,
                            row: begin..rows.len(),
                            node: None,
                        }
                    }
                    Src::Remote(gi, n) => {
                        // The old index's row for this node, if written from this announcement.
                        let mut kept = None;
                        if let Some(o) = reuse {
                            while oi < o.items.len() && o.items[oi].id < id {
                                oi += 1;
                            }
                            if let Some(it) = o.items.get(oi).filter(|it| it.id == id) {
                                if it.node.as_ref().is_some_and(|m| Arc::ptr_eq(m, &n)) {
                                    kept = Some(&o.rows[it.row.clone()]);
                                }
                            }
                        }
                        match kept {
                            Some(text) => rows.push_str(text),
                            None => push_row(&mut rows, &remote_row(&hex, &n, pd))?,
                        }
                        Item {
                            id,
                            origin: Origin::Remote(gi),
                            mine,
                            row: begin..rows.len(),
                            node: Some(n),
                        }
                    }
                }
            } else {
                let Some((id, d)) = ui.next() else { break };
                push_row(&mut rows, &unclaimed_row(d))?;
                Item {
                    id,
                    origin: Origin::Unclaimed,
                    mine: true,
                    row: begin..rows.len(),
                    node: None,
                }
            };
            items.push(item);
        }
        rows.shrink_to_fit();
        Ok(Index {
            key,
            paired,
            items,
            rows,
            remotes: remotes.into_iter().map(|r| r.gateway).collect(),
        })
    }

    /// The page `p` asks for as response text. `live[i]` is `remotes[i]`'s health now;
    /// `vitals` looks up the host vitals of a page's nodes per origin.
    fn page(
        &self,
        p: &ListParams,
        live: &[GatewayLive],
        vitals: &VitalsOf<'_>,
    ) -> Result<String, WireError> {
        let start = match &p.after {
            Some(a) => self
                .items
                .partition_point(|it| cmp_id(&it.id, a) != std::cmp::Ordering::Greater),
            None => 0,
        };
        let limit = p.limit.unwrap_or(usize::MAX);
        let mut picked: Vec<usize> = Vec::new();
        let mut more = false;
        for (i, it) in self.items.iter().enumerate().skip(start) {
            if p.all || it.mine {
                if picked.len() == limit {
                    more = true;
                    break;
                }
                picked.push(i);
            }
        }
        // Host vitals change all the time: looked up for this page's nodes only.
        let mut wanted: HashMap<Origin, (Vec<usize>, Vec<DeviceId>)> = HashMap::new();
        for (k, &i) in picked.iter().enumerate() {
            let it = &self.items[i];
            if it.origin != Origin::Unclaimed {
                let w = wanted.entry(it.origin).or_default();
                w.0.push(k);
                w.1.push(it.id);
            }
        }
        let mut vit: Vec<Option<Received>> = vec![None; picked.len()];
        for (origin, (at, ids)) in &wanted {
            for (k, v) in at.iter().zip(vitals(*origin, ids)) {
                vit[*k] = v;
            }
        }
        let gateway = self.key.gateway.as_str();
        let local_tail = tail_text(&Tail {
            connected: true,
            gateway: Some(gateway),
            gateway_status: Some("healthy"),
            gateway_last_seen: None,
            gateway_latency_ms: Some(0.0),
        })?;
        let unclaimed_tail = tail_text(&Tail {
            connected: false,
            gateway: (!p.all).then_some(gateway),
            gateway_status: None,
            gateway_last_seen: None,
            gateway_latency_ms: None,
        })?;
        let mut remote_tails = Vec::with_capacity(self.remotes.len());
        for (i, name) in self.remotes.iter().enumerate() {
            // A gateway without a health reading is shown offline.
            let l = live.get(i);
            remote_tails.push(tail_text(&Tail {
                connected: l.is_some_and(|l| l.live),
                gateway: Some(name),
                gateway_status: Some(l.map_or("offline", |l| l.status)),
                gateway_last_seen: l.and_then(|l| l.last_seen.as_deref()),
                gateway_latency_ms: l.and_then(|l| l.latency_ms),
            })?);
        }
        let bytes: usize = picked.iter().map(|&i| self.items[i].row.len() + 160).sum();
        let mut out = String::with_capacity(bytes + 128);
        out.push_str("{\"ts\":");
        out.push_str(&now_ms().to_string());
        out.push_str(",\"nodes\":[");
        for (k, &i) in picked.iter().enumerate() {
            let it = &self.items[i];
            if k > 0 {
                out.push(',');
            }
            out.push_str(&self.rows[it.row.clone()]);
            out.push(',');
            out.push_str(match it.origin {
                Origin::Local => &local_tail,
                Origin::Remote(g) => remote_tails
                    .get(g)
                    .map(String::as_str)
                    .unwrap_or("\"connected\":false,\"gateway\":null"),
                Origin::Unclaimed => &unclaimed_tail,
            });
            out.push_str(",\"vitals\":");
            match &vit[k] {
                Some(v) => out.push_str(&v.to_json().to_string()),
                None => out.push_str("null"),
            }
            out.push('}');
        }
        out.push_str("],\"next\":");
        match picked.last().filter(|_| more) {
            Some(&i) => {
                out.push('"');
                out.push_str(&self.items[i].id.to_string());
                out.push('"');
            }
            None => out.push_str("null"),
        }
        out.push('}');
        Ok(out)
    }
}

/// Orders a node id against a cursor (lowercase hex) as their text would order.
fn cmp_id(id: &DeviceId, cursor: &str) -> std::cmp::Ordering {
    let mut buf = [0u8; 64];
    match hex::encode_to_slice(id.0, &mut buf) {
        Ok(()) => buf.as_slice().cmp(cursor.as_bytes()),
        Err(_) => id.to_string().as_bytes().cmp(cursor.as_bytes()),
    }
}

/// Looks up the host vitals of a page's nodes of one origin, in the order asked.
type VitalsOf<'a> = dyn Fn(Origin, &[DeviceId]) -> Vec<Option<Received>> + 'a;

/// One remote gateway's health for a page's rows.
struct GatewayLive {
    live: bool,
    status: &'static str,
    last_seen: Option<String>,
    latency_ms: Option<f64>,
}

/// The live fields of a row (where its gateway is and how it is), written per page.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tail<'a> {
    connected: bool,
    gateway: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_last_seen: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_latency_ms: Option<f64>,
}

/// A tail's fields without the braces, to follow a row's unchanging part.
fn tail_text(t: &Tail<'_>) -> Result<String, WireError> {
    let s = serde_json::to_string(t).map_err(|e| bad(format!("cannot encode a row: {e}")))?;
    Ok(s.strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or("")
        .to_string())
}

/// Appends a row's unchanging part without its closing brace (the live fields follow).
fn push_row(rows: &mut String, row: &Row<'_>) -> Result<(), WireError> {
    let s = serde_json::to_string(row).map_err(|e| bad(format!("cannot encode a row: {e}")))?;
    rows.push_str(s.strip_suffix('}').unwrap_or(&s));
    Ok(())
}

fn local_row<'a>(
    hex: &'a str,
    info: &'a NodeInfo,
    transport: &'a str,
    pd: Option<&'a BriefDevice>,
) -> Row<'a> {
    Row {
        node_id: hex,
        display_name: &info.name,
        platform: &info.platform,
        version: Some(&info.version),
        caps: &info.caps,
        commands: &info.commands,
        client_id: Some(&info.client_id),
        client_mode: Some(&info.client_mode),
        device_family: Some(&info.device_family),
        path_env: info.path_env.as_deref(),
        remote_ip: Some(Cow::Owned(registry::ip_of(&info.remote))),
        paired: pd.is_some(),
        connected_at_ms: Some(
            info.connected_at
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        ),
        transport: Some(transport),
        local: true,
        attach: Some(info.attach.to_string()),
        labels: Labels {
            own: &info.labels,
            region: pd.and_then(|d| d.region.as_deref()),
        },
        approval_state: "approved",
        approved_at: None,
        approved_by: pd.map(|d| d.approved_by.as_str()),
        tailnet: pd.and_then(|d| d.tailnet.as_ref()),
    }
}

fn remote_row<'a>(hex: &'a str, n: &'a NodeSummary, pd: Option<&'a BriefDevice>) -> Row<'a> {
    Row {
        node_id: hex,
        display_name: &n.name,
        platform: &n.platform,
        version: Some(&n.version),
        caps: &[],
        commands: &n.commands,
        client_id: None,
        client_mode: None,
        device_family: None,
        path_env: None,
        remote_ip: Some(Cow::Borrowed(&n.ip)),
        paired: true,
        connected_at_ms: None,
        transport: Some(&n.transport),
        local: false,
        attach: Some(n.attach.to_string()),
        labels: Labels {
            own: &n.labels,
            region: pd.and_then(|d| d.region.as_deref()),
        },
        approval_state: "approved",
        approved_at: None,
        approved_by: pd.map(|d| d.approved_by.as_str()),
        tailnet: pd.and_then(|d| d.tailnet.as_ref()),
    }
}

fn unclaimed_row(d: &BriefDevice) -> Row<'_> {
    Row {
        node_id: &d.device_id,
        display_name: &d.name,
        platform: &d.platform,
        version: None,
        caps: &[],
        commands: &[],
        client_id: Some(&d.client_id),
        client_mode: Some(&d.client_mode),
        device_family: Some(&d.device_family),
        path_env: None,
        remote_ip: None,
        paired: true,
        connected_at_ms: None,
        transport: None,
        local: false,
        attach: None,
        labels: Labels {
            own: &[],
            region: d.region.as_deref(),
        },
        approval_state: "approved",
        approved_at: Some(&d.approved_at),
        approved_by: Some(&d.approved_by),
        tailnet: d.tailnet.as_ref(),
    }
}

/// The kept index and when it was last used, under one lock so the sweeper and a listing
/// agree on whether it is idle.
struct Kept {
    index: Option<Arc<Index>>,
    used: Instant,
    /// A sweeper task is waiting to drop the index once idle.
    sweeping: bool,
    /// Indexes built (read by tests: an unchanged federation builds none).
    builds: u64,
}

/// `node.list`'s index between calls: rebuilt only when a gateway's directory version, the
/// local registry's generation or the paired devices change, and dropped after [`IDLE`].
pub(super) struct ListingCache {
    kept: Mutex<Kept>,
}

impl Default for ListingCache {
    fn default() -> Self {
        ListingCache {
            kept: Mutex::new(Kept {
                index: None,
                used: Instant::now(),
                sweeping: false,
                builds: 0,
            }),
        }
    }
}

impl ListingCache {
    fn lock(&self) -> MutexGuard<'_, Kept> {
        // The kept index is replaced whole; a poisoned lock still holds a consistent one.
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The index for `key` and `paired`: the kept one if built from them, else one built from
    /// `load()` (reusing the kept one's unchanged rows). Also whether a sweeper must start.
    fn index(
        &self,
        key: &Key,
        paired: &Arc<PairedBrief>,
        load: impl FnOnce() -> Result<Inputs, WireError>,
    ) -> Result<(Arc<Index>, bool), WireError> {
        let mut kept = self.lock();
        kept.used = Instant::now();
        let start_sweeper = !std::mem::replace(&mut kept.sweeping, true);
        if let Some(ix) = &kept.index {
            if ix.key == *key && Arc::ptr_eq(&ix.paired, paired) {
                return Ok((ix.clone(), start_sweeper));
            }
        }
        let old = kept.index.take();
        let ix = Arc::new(Index::build(load()?, old.as_deref())?);
        drop(old);
        kept.builds += 1;
        kept.index = Some(ix.clone());
        Ok((ix, start_sweeper))
    }

    /// Drops the index if unused for `idle` (`None`: done, the index is gone); else how long
    /// until it would be idle.
    fn forget_if_idle(&self, idle: Duration) -> Option<Duration> {
        let mut kept = self.lock();
        let unused = kept.used.elapsed();
        if unused >= idle || kept.index.is_none() {
            let old = kept.index.take();
            kept.sweeping = false;
            drop(kept);
            drop(old);
            None
        } else {
            Some(idle - unused)
        }
    }

    /// Starts the task that drops the index once it has been idle for [`IDLE`].
    fn start_sweeper(cache: &Arc<ListingCache>) {
        let weak = Arc::downgrade(cache);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime (a unit test): the index stays until the next listing replaces it.
            cache.lock().sweeping = false;
            return;
        };
        rt.spawn(async move {
            let mut wait = IDLE;
            loop {
                tokio::time::sleep(wait).await;
                let Some(c) = weak.upgrade() else { return };
                match c.forget_if_idle(IDLE) {
                    None => {
                        tracing::debug!("node.list index dropped after being idle");
                        return;
                    }
                    Some(left) => wait = left,
                }
            }
        });
    }
}

impl Methods {
    /// `node.list` as response text: the page `params` asks for (see the module
    /// documentation).
    pub(super) fn node_list_text(&self, params: &Value) -> Result<String, WireError> {
        self.node_list_page(&ListParams::parse(params)?)
    }

    /// The page `p` asks for, as response text.
    fn node_list_page(&self, p: &ListParams) -> Result<String, WireError> {
        let started = Instant::now();
        let paired = self.inner.pairing.paired_brief().map_err(pairing_err)?;
        let gateway = self.gateway_name();
        let mesh = self.inner.mesh.get();
        let light = mesh
            .map(|m| m.remote_directories(false))
            .unwrap_or_default();
        let key = Key::of(&gateway, self.inner.nodes.generation(), &light);
        let cache = &self.inner.listing;
        let (index, start_sweeper) = cache.index(&key, &paired, || {
            // Generation first: nodes attaching meanwhile only make the key older than the
            // content, so the next listing rebuilds once more.
            let local_gen = self.inner.nodes.generation();
            let remotes = mesh.map(|m| m.remote_directories(true)).unwrap_or_default();
            Ok(Inputs {
                key: Key::of(&gateway, local_gen, &remotes),
                local: self.inner.nodes.list(),
                remotes,
                paired: paired.clone(),
            })
        })?;
        if start_sweeper {
            ListingCache::start_sweeper(cache);
        }
        let built = started.elapsed();
        let latency: HashMap<String, Option<f64>> = match mesh {
            Some(m) => m
                .status()
                .gateways
                .iter()
                .map(|g| (g.name.clone(), g.latency.map(|d| d.as_secs_f64() * 1000.0)))
                .collect(),
            None => HashMap::new(),
        };
        // The index's gateways (the same as `light` unless it changed since: then its last
        // known health stands for this page).
        let live: Vec<GatewayLive> = index
            .remotes
            .iter()
            .map(|name| {
                let now = light.iter().find(|r| &r.gateway == name);
                GatewayLive {
                    live: now.is_some_and(|r| r.status != Status::Offline),
                    status: now.map(|r| r.status.as_str()).unwrap_or("offline"),
                    last_seen: now
                        .and_then(|r| r.last_seen)
                        .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                    latency_ms: latency.get(name).cloned().flatten(),
                }
            })
            .collect();
        let nodes = &self.inner.nodes;
        let vitals = |origin: Origin, ids: &[DeviceId]| -> Vec<Option<Received>> {
            match origin {
                Origin::Local => nodes.vitals_of(ids),
                Origin::Remote(g) => match (mesh, index.remotes.get(g)) {
                    (Some(m), Some(name)) => m.relayed_vitals(name, ids),
                    _ => vec![None; ids.len()],
                },
                Origin::Unclaimed => vec![None; ids.len()],
            }
        };
        let text = index.page(p, &live, &vitals)?;
        // Read by `examples/bench_fleet.rs` (the listing's cost at the gateway).
        tracing::debug!(
            micros = started.elapsed().as_micros() as u64,
            index_micros = built.as_micros() as u64,
            bytes = text.len(),
            rows = index.items.len(),
            index_bytes =
                index.rows.capacity() + index.items.capacity() * std::mem::size_of::<Item>(),
            limit = p.limit.unwrap_or(0),
            "node.list built"
        );
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawmesh_federation::directory::AttachOrder;

    fn node(i: u8) -> Arc<NodeSummary> {
        Arc::new(NodeSummary {
            id: DeviceId([i; 32]),
            name: format!("n{i}"),
            labels: vec![],
            commands: vec!["system.which".into()],
            transport: "quic".into(),
            platform: "linux".into(),
            ip: "10.0.0.1".into(),
            version: "1".into(),
            attach: AttachOrder { boot: 1, attach: 1 },
        })
    }

    fn brief(ids: &[u8]) -> Arc<PairedBrief> {
        let mut devices: Vec<BriefDevice> = ids
            .iter()
            .map(|i| BriefDevice {
                device_id: DeviceId([*i; 32]).to_string(),
                name: format!("n{i}"),
                role: "node".into(),
                platform: "linux".into(),
                client_id: String::new(),
                client_mode: String::new(),
                device_family: String::new(),
                region: Some("fra".into()),
                approved_at: String::new(),
                approved_by: "operator".into(),
                tailnet: None,
            })
            .collect();
        devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Arc::new(PairedBrief { devices })
    }

    /// The federation as a listing reads it: this gateway (`tokyo`, no local nodes unless
    /// given) and other gateways with their directory versions and nodes.
    #[derive(Clone)]
    struct World {
        local_gen: u64,
        local: Vec<(NodeInfo, &'static str)>,
        remotes: Vec<RemoteDirectoryView>,
        paired: Arc<PairedBrief>,
    }

    fn remote(
        name: &str,
        key: u8,
        version: u64,
        nodes: Vec<Arc<NodeSummary>>,
    ) -> RemoteDirectoryView {
        RemoteDirectoryView {
            key: PublicKey([key; 32]),
            gateway: name.into(),
            status: Status::Healthy,
            last_seen: None,
            at: Some(DirVersion { epoch: 7, version }),
            len: nodes.len(),
            nodes,
        }
    }

    fn world(announced: &[u8], paired: &[u8]) -> World {
        World {
            local_gen: 0,
            local: vec![],
            remotes: vec![remote(
                "frankfurt",
                1,
                1,
                announced.iter().map(|i| node(*i)).collect(),
            )],
            paired: brief(paired),
        }
    }

    impl World {
        fn light(&self) -> Key {
            Key::of("tokyo", self.local_gen, &self.remotes)
        }

        fn inputs(&self) -> Inputs {
            Inputs {
                key: self.light(),
                local: self.local.clone(),
                remotes: self.remotes.clone(),
                paired: self.paired.clone(),
            }
        }
    }

    fn page_of(ix: &Index, all: bool, limit: Option<usize>, after: Option<&str>) -> Value {
        let p = ListParams {
            all,
            limit,
            after: after.map(str::to_string),
        };
        let live: Vec<GatewayLive> = ix
            .remotes
            .iter()
            .map(|_| GatewayLive {
                live: true,
                status: "healthy",
                last_seen: None,
                latency_ms: Some(1.0),
            })
            .collect();
        let none = |_: Origin, ids: &[DeviceId]| vec![None; ids.len()];
        serde_json::from_str(&ix.page(&p, &live, &none).unwrap()).unwrap()
    }

    fn listing(
        cache: &ListingCache,
        w: &World,
        all: bool,
        limit: Option<usize>,
        after: Option<&str>,
    ) -> Value {
        let (ix, _) = cache
            .index(&w.light(), &w.paired, || Ok(w.inputs()))
            .unwrap();
        page_of(&ix, all, limit, after)
    }

    fn builds(cache: &ListingCache) -> u64 {
        cache.lock().builds
    }

    fn names(v: &Value) -> Vec<String> {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["displayName"].as_str().unwrap().to_string())
            .collect()
    }

    /// Every page of a listing, following `next`.
    fn paged(cache: &ListingCache, w: &World, limit: usize) -> Vec<String> {
        let mut got = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = listing(cache, w, true, Some(limit), after.as_deref());
            got.extend(names(&p));
            match p["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return got,
            }
        }
    }

    #[test]
    fn pages_follow_the_cursor_and_cover_everything_once() {
        // 1..=20 announced elsewhere, 15..=25 paired: 21..=25 are paired and nowhere.
        let announced: Vec<u8> = (1..=20).collect();
        let paired: Vec<u8> = (15..=25).collect();
        let w = world(&announced, &paired);
        let cache = ListingCache::default();
        let whole = listing(&cache, &w, true, None, None);
        assert_eq!(whole["next"], Value::Null);
        assert_eq!(names(&whole).len(), 25);
        for limit in [1, 7, 24, 25, 26] {
            assert_eq!(paged(&cache, &w, limit), names(&whole), "limit {limit}");
        }
        // Nothing changed: one index served every page.
        assert_eq!(builds(&cache), 1);
        // Without `all`: only the paired ones (announced or not), 15..=25, also paged.
        let mine = listing(&cache, &w, false, None, None);
        assert_eq!(names(&mine).len(), 11);
        let first = listing(&cache, &w, false, Some(10), None);
        let rest = listing(&cache, &w, false, Some(10), first["next"].as_str());
        assert_eq!(names(&rest), vec!["n25"]);
        assert_eq!(rest["next"], Value::Null);
        let row = &mine["nodes"][0];
        assert_eq!(row["labels"]["region"], "fra");
        assert_eq!(row["approvedBy"], "operator");
        assert_eq!(row["gateway"], "frankfurt");
        assert_eq!(row["gatewayStatus"], "healthy");
        assert_eq!(row["connected"], true);
        assert_eq!(row["vitals"], Value::Null);
        // A paired node attached nowhere is listed, not connected, at no gateway with `all`
        // and at this gateway without.
        let last = whole["nodes"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["displayName"], "n25");
        assert_eq!(last["connected"], false);
        assert_eq!(last["gateway"], Value::Null);
        let last_mine = mine["nodes"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last_mine["gateway"], "tokyo");
        // The ids are in order and the rows are whole JSON objects with every field.
        let ids: Vec<&str> = whole["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["nodeId"].as_str().unwrap())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert_eq!(whole["nodes"][0]["commands"][0], "system.which");
    }

    #[test]
    fn a_change_anywhere_shows_in_the_next_listing() {
        let cache = ListingCache::default();
        let mut w = world(&[1, 2, 3], &[]);
        w.remotes.push(remote("osaka", 2, 1, vec![node(10)]));
        assert_eq!(
            names(&listing(&cache, &w, true, None, None)),
            ["n1", "n2", "n3", "n10"]
        );
        assert_eq!(builds(&cache), 1);

        // A delta on one gateway (new version): node 4 attached there, 2 left.
        w.remotes[0].nodes = vec![node(1), node(3), node(4)];
        w.remotes[0].at = Some(DirVersion {
            epoch: 7,
            version: 2,
        });
        assert_eq!(
            names(&listing(&cache, &w, true, None, None)),
            ["n1", "n3", "n4", "n10"]
        );
        assert_eq!(builds(&cache), 2);

        // The other gateway restarts (new epoch, lower version) with another node.
        w.remotes[1].nodes = vec![node(11)];
        w.remotes[1].len = 1;
        w.remotes[1].at = Some(DirVersion {
            epoch: 8,
            version: 1,
        });
        assert_eq!(
            names(&listing(&cache, &w, true, None, None)),
            ["n1", "n3", "n4", "n11"]
        );

        // A node changes (a newer announcement `Arc`, same id): its row is written again.
        let mut renamed = (*node(3)).clone();
        renamed.name = "n3-renamed".into();
        w.remotes[0].nodes[1] = Arc::new(renamed);
        w.remotes[0].at = Some(DirVersion {
            epoch: 7,
            version: 3,
        });
        assert_eq!(
            names(&listing(&cache, &w, true, None, None)),
            ["n1", "n3-renamed", "n4", "n11"]
        );

        // A gateway goes offline: its claim loses to a live one for the same node.
        w.remotes[1].nodes = vec![node(11), node(4)];
        w.remotes[1].len = 2;
        w.remotes[1].at = Some(DirVersion {
            epoch: 8,
            version: 2,
        });
        w.remotes[0].status = Status::Offline;
        let v = listing(&cache, &w, true, None, None);
        let n4 = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["displayName"] == "n4")
            .unwrap()
            .clone();
        assert_eq!(n4["gateway"], "osaka");

        // A node attaches here (the registry's generation moves).
        let built = builds(&cache);
        let info = NodeInfo {
            node_id: DeviceId([5; 32]),
            key: PublicKey([5; 32]),
            name: "n5".into(),
            remote: "127.0.0.1:4000".into(),
            platform: "linux".into(),
            version: "1".into(),
            commands: vec![],
            labels: vec![],
            attach: AttachOrder { boot: 1, attach: 1 },
            connected_at: std::time::SystemTime::now(),
            client_id: "clawmesh-node".into(),
            client_mode: "node".into(),
            device_family: String::new(),
            caps: vec![],
            path_env: None,
        };
        w.local = vec![(info, "quic")];
        w.local_gen += 1;
        let v = listing(&cache, &w, true, None, None);
        assert!(names(&v).contains(&"n5".to_string()));
        let n5 = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["displayName"] == "n5")
            .unwrap()
            .clone();
        assert_eq!(
            (n5["local"].clone(), n5["gateway"].clone()),
            (Value::Bool(true), Value::from("tokyo"))
        );
        assert_eq!(builds(&cache), built + 1);

        // A device is paired (a new brief): the paired node shows without `all` too.
        assert!(names(&listing(&cache, &w, false, None, None)) == ["n5"]);
        w.paired = brief(&[11, 40]);
        assert_eq!(
            names(&listing(&cache, &w, false, None, None)),
            ["n5", "n11", "n40"]
        );
        // Nothing changed since: no build.
        let built = builds(&cache);
        listing(&cache, &w, true, Some(2), None);
        assert_eq!(builds(&cache), built);
    }

    #[test]
    fn nodes_attaching_and_leaving_between_pages_shift_nothing() {
        let cache = ListingCache::default();
        let mut w = world(&[10, 20, 30, 40, 50, 60], &[]);
        let first = listing(&cache, &w, true, Some(3), None);
        assert_eq!(names(&first), ["n10", "n20", "n30"]);
        let cursor = first["next"].as_str().unwrap().to_string();
        // Between the pages: 5 attaches (before the cursor), 45 attaches (after it), 40 leaves.
        w.remotes[0].nodes = [5, 10, 20, 30, 45, 50, 60]
            .iter()
            .map(|i| node(*i))
            .collect();
        w.remotes[0].len = 7;
        w.remotes[0].at = Some(DirVersion {
            epoch: 7,
            version: 2,
        });
        let second = listing(&cache, &w, true, Some(3), Some(&cursor));
        // No row repeated or skipped among those still there: 45 is listed, 5 waits for the
        // next listing, 40 is gone.
        assert_eq!(names(&second), ["n45", "n50", "n60"]);
        assert_eq!(second["next"], Value::Null);
        assert_eq!(builds(&cache), 2);
    }

    #[test]
    fn unchanged_rows_are_copied_and_the_index_is_dropped_when_idle() {
        let cache = ListingCache::default();
        let mut w = world(&[1, 2, 3], &[2]);
        let before = listing(&cache, &w, true, None, None);
        // Another gateway's version moves but node 2's announcement is the same `Arc`: its
        // row text is the same; node 1's row changed.
        let mut moved = (*node(1)).clone();
        moved.ip = "10.9.9.9".into();
        w.remotes[0].nodes[0] = Arc::new(moved);
        w.remotes[0].at = Some(DirVersion {
            epoch: 7,
            version: 2,
        });
        let after = listing(&cache, &w, true, None, None);
        assert_eq!(before["nodes"][1], after["nodes"][1]);
        assert_eq!(after["nodes"][0]["remoteIp"], "10.9.9.9");
        assert_eq!(after["nodes"][1]["labels"]["region"], "fra");
        // Idle: kept while recently used, dropped once idle.
        assert!(cache.forget_if_idle(Duration::from_secs(3600)).is_some());
        assert!(cache.lock().index.is_some());
        assert!(cache.forget_if_idle(Duration::ZERO).is_none());
        assert!(cache.lock().index.is_none());
        // The next listing builds it again, with the same rows.
        let built = builds(&cache);
        let again = listing(&cache, &w, true, None, None);
        assert_eq!(again["nodes"], after["nodes"]);
        assert_eq!(builds(&cache), built + 1);
    }

    #[test]
    fn bad_paging_params_are_refused_clearly() {
        for bad in [
            serde_json::json!({"limit": 0}),
            serde_json::json!({"limit": -3}),
            serde_json::json!({"limit": "ten"}),
            serde_json::json!({"after": 5}),
        ] {
            let e = ListParams::parse(&bad).unwrap_err();
            assert!(e.message.starts_with("invalid node.list params"), "{e}");
        }
        let p = ListParams::parse(&serde_json::json!({"limit": 5, "after": "ABC"})).unwrap();
        assert_eq!((p.limit, p.after.as_deref()), (Some(5), Some("abc")));
    }
}
