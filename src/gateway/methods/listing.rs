//! `node.list` at fleet size: every node of the federation (100 000 and more) listed without
//! building a JSON tree per node, in node id order, a page at a time if asked.
//!
//! The rows are typed and borrow from what the gateway already holds (its own sessions, the
//! other gateways' announcements, shared with the mesh, and the cached brief of the paired
//! devices), and are written straight into the response text. Node ids order the listing, so
//! a page ends at a node id and the next page starts after it (`after`, the cursor): a node
//! attaching or leaving between two pages neither shifts nor repeats the others.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use clawmesh_federation::directory::{self, Claim, NodeSummary};
use clawmesh_federation::health::Status;
use clawmesh_federation::identity::DeviceId;
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

/// One gateway's announcement as a listing shows it.
struct Remote {
    gateway: String,
    status: &'static str,
    live: bool,
    last_seen: Option<String>,
    latency_ms: Option<f64>,
    nodes: Vec<Arc<NodeSummary>>,
    /// Its nodes' host vitals, as it last relayed them.
    vitals: HashMap<DeviceId, Received>,
}

/// Where a node's winning claim came from.
enum Source {
    /// Attached here: index into the local sessions.
    Local(usize),
    /// Announced by another gateway: index into the remotes, and the node.
    Remote(usize, Arc<NodeSummary>),
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

/// One row of `node.list` (the same fields as the rows of `node.describe`).
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
    connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected_at_ms: Option<u64>,
    transport: Option<&'a str>,
    gateway: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_last_seen: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_latency_ms: Option<f64>,
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
    /// Host vitals (`null` for a node that sends none, such as a classic node).
    vitals: Option<Value>,
}

/// One entry of the listing before paging: a node someone claims, or a paired node nobody
/// claims (listed as not connected).
enum Entry<'a> {
    Claimed(Claim<Source>),
    Unclaimed(&'a BriefDevice),
}

/// Everything a listing reads, taken once (sessions, announcements, paired devices).
struct Sources {
    gateway: String,
    local: Vec<(NodeInfo, &'static str)>,
    /// The host vitals of the nodes attached here.
    local_vitals: HashMap<DeviceId, Received>,
    remotes: Vec<Remote>,
    paired: Arc<PairedBrief>,
}

/// The `node.list` document: `ts`, the page of `nodes`, and `next` (the cursor for the next
/// page, `null` on the last).
#[derive(Serialize)]
struct Page<'a> {
    ts: u64,
    nodes: Vec<Row<'a>>,
    next: Option<&'a str>,
}

impl Sources {
    /// The page `p` asks for, serialized.
    fn page_text(&self, p: &ListParams) -> Result<String, WireError> {
        let mut claims = Vec::new();
        for (i, (info, _)) in self.local.iter().enumerate() {
            claims.push(Claim {
                node: info.node_id,
                gateway: self.gateway.clone(),
                live: true,
                local: true,
                order: info.attach,
                item: Source::Local(i),
            });
        }
        for (gi, r) in self.remotes.iter().enumerate() {
            for n in &r.nodes {
                claims.push(Claim {
                    node: n.id,
                    gateway: r.gateway.clone(),
                    live: r.live,
                    local: false,
                    order: n.attach,
                    item: Source::Remote(gi, n.clone()),
                });
            }
        }
        let mut entries: Vec<(String, Entry<'_>)> = directory::resolve(claims)
            .into_iter()
            .map(|c| (c.node.to_string(), Entry::Claimed(c)))
            .filter(|(id, e)| match e {
                // Without `all`: nodes attached here, and paired nodes wherever they are.
                Entry::Claimed(c) => p.all || c.local || self.paired.get(id).is_some(),
                Entry::Unclaimed(_) => true,
            })
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let claimed = entries.len();
        for d in self.paired.devices.iter().filter(|d| d.role == "node") {
            let seen = entries[..claimed]
                .binary_search_by(|(id, _)| id.as_str().cmp(&d.device_id))
                .is_ok();
            if !seen {
                entries.push((d.device_id.clone(), Entry::Unclaimed(d)));
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let start = match &p.after {
            Some(a) => entries.partition_point(|(id, _)| id.as_str() <= a.as_str()),
            None => 0,
        };
        let end = match p.limit {
            Some(n) => start.saturating_add(n).min(entries.len()),
            None => entries.len(),
        };
        let page = &entries[start..end];
        let next = (end < entries.len())
            .then(|| page.last().map(|(id, _)| id.as_str()))
            .flatten();
        let rows: Vec<Row<'_>> = page.iter().map(|(id, e)| self.row(id, e, p.all)).collect();
        serde_json::to_string(&Page {
            ts: now_ms(),
            nodes: rows,
            next,
        })
        .map_err(|e| bad(format!("cannot encode the node list: {e}")))
    }

    fn row<'a>(&'a self, id: &'a str, e: &'a Entry<'a>, all: bool) -> Row<'a> {
        let paired = self.paired.get(id);
        let region = paired.and_then(|d| d.region.as_deref());
        let approved_by = paired.map(|d| d.approved_by.as_str());
        let tailnet = paired.and_then(|d| d.tailnet.as_ref());
        match e {
            Entry::Claimed(c) => match &c.item {
                Source::Local(i) => {
                    let (info, transport) = &self.local[*i];
                    Row {
                        node_id: id,
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
                        paired: paired.is_some(),
                        connected: true,
                        connected_at_ms: Some(
                            info.connected_at
                                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                                .map(|d| d.as_millis() as u64)
                                .unwrap_or(0),
                        ),
                        transport: Some(transport),
                        gateway: Some(&self.gateway),
                        gateway_status: Some("healthy"),
                        gateway_last_seen: None,
                        gateway_latency_ms: Some(0.0),
                        local: true,
                        attach: Some(info.attach.to_string()),
                        labels: Labels {
                            own: &info.labels,
                            region,
                        },
                        approval_state: "approved",
                        approved_at: None,
                        approved_by,
                        tailnet,
                        vitals: self.local_vitals.get(&info.node_id).map(Received::to_json),
                    }
                }
                Source::Remote(gi, n) => {
                    let r = &self.remotes[*gi];
                    Row {
                        node_id: id,
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
                        connected: r.live,
                        connected_at_ms: None,
                        transport: Some(&n.transport),
                        gateway: Some(&r.gateway),
                        gateway_status: Some(r.status),
                        gateway_last_seen: r.last_seen.as_deref(),
                        gateway_latency_ms: r.latency_ms,
                        local: false,
                        attach: Some(n.attach.to_string()),
                        labels: Labels {
                            own: &n.labels,
                            region,
                        },
                        approval_state: "approved",
                        approved_at: None,
                        approved_by,
                        tailnet,
                        vitals: r.vitals.get(&n.id).map(Received::to_json),
                    }
                }
            },
            Entry::Unclaimed(d) => Row {
                node_id: id,
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
                connected: false,
                connected_at_ms: None,
                transport: None,
                gateway: (!all).then_some(self.gateway.as_str()),
                gateway_status: None,
                gateway_last_seen: None,
                gateway_latency_ms: None,
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
                vitals: None,
            },
        }
    }
}

impl Methods {
    /// `node.list` as response text: the page `params` asks for (see the module
    /// documentation).
    pub(super) fn node_list_text(&self, params: &Value) -> Result<String, WireError> {
        let started = std::time::Instant::now();
        let p = ListParams::parse(params)?;
        let paired = self.inner.pairing.paired_brief().map_err(pairing_err)?;
        let mut remotes = Vec::new();
        if let Some(mesh) = self.inner.mesh.get() {
            let latency: HashMap<String, Option<f64>> = mesh
                .status()
                .gateways
                .iter()
                .map(|g| (g.name.clone(), g.latency.map(|d| d.as_secs_f64() * 1000.0)))
                .collect();
            for r in mesh.remote_nodes() {
                remotes.push(Remote {
                    latency_ms: latency.get(&r.gateway).cloned().flatten(),
                    live: r.status != Status::Offline,
                    status: r.status.as_str(),
                    last_seen: r
                        .last_seen
                        .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                    gateway: r.gateway,
                    nodes: r.nodes,
                    vitals: r.vitals,
                });
            }
        }
        let sources = Sources {
            gateway: self.gateway_name(),
            local: self.inner.nodes.list(),
            local_vitals: self
                .inner
                .nodes
                .vitals()
                .into_iter()
                .map(|(id, _, v)| (id, v))
                .collect(),
            remotes,
            paired,
        };
        let text = sources.page_text(&p)?;
        // Read by `examples/bench_fleet.rs` (the listing's cost at the gateway).
        tracing::debug!(
            micros = started.elapsed().as_micros() as u64,
            bytes = text.len(),
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

    fn sources(announced: &[u8], paired: &[u8]) -> Sources {
        Sources {
            gateway: "tokyo".into(),
            local: vec![],
            local_vitals: HashMap::new(),
            remotes: vec![Remote {
                gateway: "frankfurt".into(),
                status: "healthy",
                live: true,
                last_seen: None,
                latency_ms: Some(1.0),
                nodes: announced.iter().map(|i| node(*i)).collect(),
                vitals: HashMap::new(),
            }],
            paired: brief(paired),
        }
    }

    fn page(s: &Sources, all: bool, limit: Option<usize>, after: Option<&str>) -> Value {
        let p = ListParams {
            all,
            limit,
            after: after.map(str::to_string),
        };
        serde_json::from_str(&s.page_text(&p).unwrap()).unwrap()
    }

    fn ids(v: &Value) -> Vec<String> {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["displayName"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn pages_follow_the_cursor_and_cover_everything_once() {
        // 1..=20 announced elsewhere, 15..=25 paired: 21..=25 are paired and nowhere.
        let announced: Vec<u8> = (1..=20).collect();
        let paired: Vec<u8> = (15..=25).collect();
        let s = sources(&announced, &paired);
        let whole = page(&s, true, None, None);
        assert_eq!(whole["next"], Value::Null);
        assert_eq!(ids(&whole).len(), 25);
        let mut got = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = page(&s, true, Some(7), after.as_deref());
            got.extend(ids(&p));
            match p["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
        }
        assert_eq!(got, ids(&whole));
        // Without `all`: only the paired ones (announced or not), 15..=25.
        let mine = page(&s, false, None, None);
        assert_eq!(ids(&mine).len(), 11);
        let row = &mine["nodes"][0];
        assert_eq!(row["labels"]["region"], "fra");
        assert_eq!(row["approvedBy"], "operator");
        // A paired node attached nowhere is listed, not connected, at no gateway with `all`.
        let last = &whole["nodes"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["displayName"], "n25");
        assert_eq!(last["connected"], false);
        assert_eq!(last["gateway"], Value::Null);
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
