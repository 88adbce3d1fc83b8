//! `node.*` and a node's exec approvals: listing, resolving and invoking nodes anywhere.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clawmesh_federation::directory::{self, Claim, NodeSummary};
use clawmesh_federation::health::Status;
use clawmesh_federation::identity::DeviceId;
use clawmesh_federation::logs::record::{Audit, Outcome};
use clawmesh_federation::pairing::{PairedDevice, MIN_ID_PREFIX};
use clawmesh_federation::rpc::{CallError, Caller, CallerKind};
use clawmesh_federation::wire::WireError;
use futures_util::StreamExt as _;
use serde_json::{json, Value};

use super::{
    bad, now_ms, pairing_err, str_param, Methods, DEFAULT_INVOKE_TIMEOUT, FORWARD_MARGIN,
    MAX_INVOKE_TIMEOUT,
};
use crate::gateway::registry::{self, NodeInfo, NodeLink};
use crate::node_protocol::{wall_ns, TIMING_KEY};

/// Invokes in flight during a fan-out (`node.invoke` with `all`): enough to reach 100 nodes in
/// a couple of round trips without opening hundreds of streams at once.
const FANOUT_CONCURRENCY: usize = 64;

impl Methods {
    /// `node.list`, `node.describe`, `node.invoke` and the exec approvals of a node.
    pub(super) async fn nodes_method(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        match method {
            "node.list" => {
                // The text is what the mesh's front door sends; the WebSocket front door
                // embeds a value.
                let text = self.node_list_text(&params)?;
                serde_json::from_str(&text)
                    .map_err(|e| bad(format!("cannot encode the node list: {e}")))
            }
            "node.describe" => {
                let sel = str_param(&params, "nodeId", method)?;
                let entries = self.selector_entries(sel, true)?;
                let mut e = registry::resolve(sel, &entries)?.clone();
                e["ts"] = json!(now_ms());
                Ok(e)
            }
            "node.invoke" => {
                let forwarded = matches!(caller.kind, CallerKind::Gateway { .. });
                let who = self.who(caller, &params);
                self.node_invoke(params, forwarded, &who).await
            }
            "exec.approvals.node.get" | "exec.approvals.node.set" => {
                let sel = str_param(&params, "nodeId", method)?.to_string();
                let (command, inner) = if method.ends_with(".get") {
                    ("system.execApprovals.get", json!({}))
                } else {
                    let file = params.get("file").cloned().ok_or_else(|| {
                        bad(format!(
                            "invalid {method} params: must have required property 'file'"
                        ))
                    })?;
                    let mut p = json!({"file": file});
                    if let Some(h) = params.get("baseHash") {
                        p["baseHash"] = h.clone();
                    }
                    ("system.execApprovals.set", p)
                };
                let key = clawmesh_federation::pairing::uuid_v4();
                let r = self
                    .invoke_on(&sel, command, inner, DEFAULT_INVOKE_TIMEOUT, &key)
                    .await?;
                Ok(r["payload"].clone())
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }

    /// Every claim on a node this gateway knows (its own sessions, and every other gateway's
    /// announcement), as listing rows. Labels are the node's own, with `region` from
    /// `paired_region` (the region of the gateway where it was paired, from its pairing
    /// record) when it has none: failing over does not change it.
    fn node_claims(&self, paired_region: &HashMap<String, String>) -> Vec<Claim<Value>> {
        let gateway = self.gateway_name();
        let mut claims = Vec::new();
        let vitals: HashMap<DeviceId, _> = self
            .inner
            .nodes
            .vitals()
            .into_iter()
            .map(|(id, _, v)| (id, v))
            .collect();
        for (info, transport) in self.inner.nodes.list() {
            let region = paired_region.get(&info.node_id.to_string());
            let v = vitals.get(&info.node_id).map(|v| v.to_json());
            claims.push(local_claim(&info, transport, &gateway, region, v));
        }
        let Some(mesh) = self.inner.mesh.get() else {
            return claims;
        };
        let latency: HashMap<String, Option<f64>> = mesh
            .status()
            .gateways
            .iter()
            .map(|g| (g.name.clone(), g.latency.map(|d| d.as_secs_f64() * 1000.0)))
            .collect();
        for r in mesh.remote_nodes() {
            let at = Holder {
                gateway: &r.gateway,
                status: r.status,
                last_seen: r.last_seen,
                latency: latency.get(&r.gateway).cloned().flatten(),
            };
            for n in &r.nodes {
                let region = paired_region.get(&n.id.to_string());
                let v = r.vitals.get(&n.id).map(|v| v.to_json());
                claims.push(remote_claim(n, &at, region, v));
            }
        }
        claims
    }

    /// Nodes this gateway can name, each once, where it is: the one resolution of "where is
    /// node N" ([`directory::resolve`]: a live gateway's claim over an offline one's, then the
    /// newest attachment). With `federation`, every node of the federation; without, the nodes
    /// paired with the federation and those attached here, a node attached elsewhere shown
    /// there. Reads every node and every paired device: for label selectors and fan-outs; a
    /// selector by id, IP, name or id prefix takes [`Self::selector_entries`].
    pub(super) fn node_entries(&self, federation: bool) -> Result<Vec<Value>, WireError> {
        let gateway = self.gateway_name();
        let paired = self.inner.pairing.paired_all().map_err(pairing_err)?;
        let paired_region: HashMap<String, String> = paired
            .iter()
            .filter_map(|p| Some((p.device_id.clone(), p.region.clone()?)))
            .collect();
        let paired_ids: HashSet<&str> = paired.iter().map(|p| p.device_id.as_str()).collect();
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for c in directory::resolve(self.node_claims(&paired_region)) {
            let mut row = c.item;
            let id = c.node.to_string();
            // Without `federation`: nodes attached here, and paired nodes wherever they are.
            if !federation && !c.local && !paired_ids.contains(id.as_str()) {
                continue;
            }
            row["paired"] = json!(paired_ids.contains(id.as_str()) || !c.local);
            seen.insert(id);
            out.push(row);
        }
        for p in paired.iter().filter(|p| p.role == "node") {
            if seen.contains(&p.device_id) {
                continue;
            }
            out.push(paired_row(p, federation, &gateway));
        }
        // How each paired node was admitted (pairing records are federation-wide, so this
        // also covers nodes attached to other gateways).
        let admitted: HashMap<&str, _> = paired.iter().map(|p| (p.device_id.as_str(), p)).collect();
        for row in &mut out {
            let p = row["nodeId"]
                .as_str()
                .and_then(|id| admitted.get(id))
                .copied();
            admitted_by(row, p);
        }
        Ok(out)
    }

    /// The rows [`Self::node_entries`] has for the nodes selector `sel` can mean by exact id,
    /// IP, name (without case) or id prefix, and no others: what [`registry::resolve`] needs
    /// to pick one, or to say which ones make `sel` ambiguous. The paired devices come from
    /// the pairing registry's indexes ([`Registry::paired_selected`](clawmesh_federation::pairing::Registry::paired_selected),
    /// `paired_by_id`), the nodes attached here and announced by other gateways are compared
    /// in place; each candidate's row is then built alone, by id. So `node.describe` and
    /// `node.invoke` by name or prefix cost the same at 10 or 100 000 paired devices (before,
    /// every paired device was read and turned into a row, 2 to 9 s at 100 000).
    pub(super) fn selector_entries(
        &self,
        sel: &str,
        federation: bool,
    ) -> Result<Vec<Value>, WireError> {
        let sel = sel.trim();
        let wanted = Wanted::new(sel);
        let mut ids: Vec<DeviceId> = self
            .inner
            .nodes
            .ids_where(|i| wanted.matches(&i.node_id, &i.name, &registry::ip_of(&i.remote)));
        let mesh = self.inner.mesh.get();
        if let Some(m) = mesh {
            ids.extend(m.remote_node_ids_where(|n| wanted.matches(&n.id, &n.name, &n.ip)));
        }
        let mut paired: HashMap<String, PairedDevice> = self
            .inner
            .pairing
            .paired_selected(sel)
            .map_err(pairing_err)?
            .into_iter()
            .map(|p| (p.device_id.clone(), p))
            .collect();
        ids.extend(paired.keys().filter_map(|id| DeviceId::parse(id)));
        ids.sort_unstable();
        ids.dedup();
        let gateway = self.gateway_name();
        // The other gateways' last-seen times and latencies, read once if a candidate is
        // announced by one of them.
        let mut gateways: Option<HashMap<String, Seen>> = None;
        let mut out = Vec::new();
        for id in ids {
            let hex = id.to_string();
            let p = match paired.remove(&hex) {
                Some(p) => Some(p),
                None => self.inner.pairing.paired_by_id(&hex).map_err(pairing_err)?,
            };
            let region = p.as_ref().and_then(|p| p.region.as_ref());
            let mut claims = Vec::new();
            if let Some((info, transport)) = self.inner.nodes.info(&id) {
                let v = self.inner.nodes.vitals_of(&[id]).pop().flatten();
                claims.push(local_claim(
                    &info,
                    transport,
                    &gateway,
                    region,
                    v.map(|v| v.to_json()),
                ));
            }
            if let Some(m) = mesh {
                for (g, status, n) in m.remote_claims_of(&id) {
                    let known = gateways.get_or_insert_with(|| {
                        m.status()
                            .gateways
                            .iter()
                            .map(|s| {
                                let latency = s.latency.map(|d| d.as_secs_f64() * 1000.0);
                                (s.name.clone(), (s.last_seen, latency))
                            })
                            .collect()
                    });
                    let (last_seen, latency) = known.get(&g).copied().unwrap_or_default();
                    let at = Holder {
                        gateway: &g,
                        status,
                        last_seen,
                        latency,
                    };
                    let v = m.relayed_vitals(&g, &[id]).pop().flatten();
                    claims.push(remote_claim(&n, &at, region, v.map(|v| v.to_json())));
                }
            }
            let mut row = match directory::resolve(claims).into_iter().next() {
                Some(c) => {
                    // Without `federation`: nodes attached here, and paired nodes wherever
                    // they are (as in `node_entries`).
                    if !federation && !c.local && p.is_none() {
                        continue;
                    }
                    let mut row = c.item;
                    row["paired"] = json!(p.is_some() || !c.local);
                    row
                }
                None => match p.as_ref().filter(|p| p.role == "node") {
                    Some(p) => paired_row(p, federation, &gateway),
                    None => continue,
                },
            };
            admitted_by(&mut row, p.as_ref());
            out.push(row);
        }
        Ok(out)
    }

    /// The rows [`Self::select`] needs for `sel`: only the candidates of an id, IP, name or id
    /// prefix ([`Self::selector_entries`], by index); every node for a label selector,
    /// `gateway/name`, or `*` ([`Self::node_entries`]).
    fn entries_for(&self, sel: &str, all: bool, federation: bool) -> Result<Vec<Value>, WireError> {
        let sel = sel.trim();
        if (all && sel == "*") || sel.contains('=') || sel.contains('/') {
            self.node_entries(federation)
        } else {
            self.selector_entries(sel, federation)
        }
    }

    /// The nodes a selector means: `id`, `name`, `ip`, id prefix, `gateway/name`, or
    /// `label=value` (one healthy match, local first, then the nearest gateway; with `all`,
    /// every connected match; `*` with `all` is every connected node).
    pub(super) fn select<'a>(
        &self,
        sel: &str,
        entries: &'a [Value],
        all: bool,
    ) -> Result<Vec<&'a Value>, WireError> {
        let sel = sel.trim();
        let live = |e: &&Value| e["connected"] == true;
        let rank = |e: &&Value| {
            let local = if e["local"] == true { 0 } else { 1 };
            let lat = e["gatewayLatencyMs"].as_f64().unwrap_or(f64::MAX);
            (local, (lat * 1000.0) as u64)
        };
        if all && sel == "*" {
            return Ok(entries.iter().filter(live).collect());
        }
        if let Some((k, v)) = sel.split_once('=').filter(|_| !sel.contains('/')) {
            let mut hits: Vec<&Value> = entries
                .iter()
                .filter(live)
                .filter(|e| e["labels"][k.trim()] == v.trim())
                .collect();
            if hits.is_empty() {
                return Err(bad(format!(
                    "no connected node has the label {k}={v} (see `clawmesh nodes status --all`)"
                )));
            }
            hits.sort_by_key(rank);
            if !all {
                hits.truncate(1);
            }
            return Ok(hits);
        }
        if let Some((gw, name)) = sel.split_once('/') {
            let scoped: Vec<Value> = entries
                .iter()
                .filter(|e| e["gateway"] == gw)
                .cloned()
                .collect();
            if scoped.is_empty() {
                return Err(bad(format!(
                    "no node attached to gateway {gw:?} (see `clawmesh nodes status --all`)"
                )));
            }
            let one = registry::resolve(name, &scoped)?;
            let id = one["nodeId"].clone();
            return Ok(entries
                .iter()
                .filter(|e| e["nodeId"] == id)
                .take(1)
                .collect());
        }
        let one = registry::resolve(sel, entries)?;
        if all {
            let id = one["nodeId"].clone();
            return Ok(entries.iter().filter(|e| e["nodeId"] == id).collect());
        }
        Ok(vec![one])
    }

    /// Who is behind a `node.invoke`, for the audit trail: the operator (device or token
    /// client) and the gateway of entry; a forwarded request carries both from its entry.
    fn who(&self, caller: &Caller, params: &Value) -> Who {
        match &caller.kind {
            CallerKind::Gateway { name } => Who {
                caller: params["audit"]["caller"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("gateway:{name}")),
                entry: params["audit"]["entryGateway"]
                    .as_str()
                    .unwrap_or(name)
                    .to_string(),
            },
            CallerKind::Operator { client, .. } => Who {
                caller: match &caller.key {
                    Some(k) => format!("device:{} ({client})", k.device_id().short()),
                    None => format!("token:{client}"),
                },
                entry: self.gateway_name(),
            },
            CallerKind::Node { name } => Who {
                caller: format!("node:{name}"),
                entry: self.gateway_name(),
            },
        }
    }

    pub(super) async fn node_invoke(
        &self,
        params: Value,
        forwarded: bool,
        who: &Who,
    ) -> Result<Value, WireError> {
        let sel = str_param(&params, "nodeId", "node.invoke")?.to_string();
        let command = str_param(&params, "command", "node.invoke")?.to_string();
        // The entry gateway sends a node's exec approvals requests here as `node.invoke` for the
        // holder (after checking the caller's scope for `exec.approvals.node.*`).
        if command.starts_with("system.execApprovals.") && !forwarded {
            return Err(bad(format!(
                "node.invoke does not run {command}; use exec.approvals.node.get/set (clawmesh approvals get|set --node)"
            )));
        }
        let timeout = match params.get("timeoutMs") {
            None | Some(Value::Null) => DEFAULT_INVOKE_TIMEOUT,
            Some(v) => match v.as_u64() {
                Some(ms) => Duration::from_millis(ms).min(MAX_INVOKE_TIMEOUT),
                None => {
                    return Err(bad(
                        "invalid node.invoke params: timeoutMs must be a non-negative integer",
                    ))
                }
            },
        };
        // Classic clients must send one; it reaches the node unchanged.
        let key = str_param(&params, "idempotencyKey", "node.invoke")?.to_string();
        // Taken out, not copied: the rest of `params` is read below.
        let mut params = params;
        let inner = params
            .get_mut("params")
            .map(Value::take)
            .unwrap_or(Value::Null);
        let inner = if inner.is_null() { json!({}) } else { inner };
        let all = params.get("all").and_then(Value::as_bool).unwrap_or(false);
        // Hop times for a benchmark: the gateway's receive time (from the request handler),
        // or now when the request came through another front door.
        let timing = match params.get("timing") {
            Some(Value::Bool(true)) => Some(wall_ns()),
            Some(v) => v.as_u64(),
            None => None,
        };
        // Fast path: an exact id needs no federation-wide listing: a node attached here, or one
        // another gateway announced.
        if !all {
            if let Some(entry) = self.exact_entry(&sel, forwarded) {
                return self
                    .invoke_entry(
                        &entry,
                        &command,
                        inner,
                        timeout,
                        &key,
                        forwarded,
                        Some(who),
                        timing,
                    )
                    .await;
            }
        }
        // A forwarded fan-out names its nodes by id (one request per holder gateway).
        let targets: Vec<Value> = match params.get("nodeIds").and_then(Value::as_array) {
            Some(ids) if forwarded => ids
                .iter()
                .filter_map(Value::as_str)
                .filter_map(|id| self.exact_entry(id, true))
                .collect(),
            _ => {
                let entries = self.entries_for(&sel, all, !forwarded)?;
                self.select(&sel, &entries, all)?
                    .into_iter()
                    .cloned()
                    .collect()
            }
        };
        if !all {
            let target = targets
                .into_iter()
                .next()
                .ok_or_else(|| bad(format!("unknown node: {sel}")))?;
            return self
                .invoke_entry(
                    &target,
                    &command,
                    inner,
                    timeout,
                    &key,
                    forwarded,
                    Some(who),
                    timing,
                )
                .await;
        }
        // Fan-out: local nodes directly (at most FANOUT_CONCURRENCY in flight); the nodes of
        // each other gateway in one forwarded request, which that gateway fans out itself, so
        // a hundred remote nodes cost one round trip, not one per node.
        let me = self.gateway_name();
        let mut by_gateway: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        let mut local = Vec::new();
        for t in targets {
            match t["gateway"].as_str() {
                Some(g) if !forwarded && g != me => {
                    by_gateway.entry(g.to_string()).or_default().push(t)
                }
                _ => local.push(t),
            }
        }
        let remote = futures_util::future::join_all(by_gateway.into_iter().map(|(g, nodes)| {
            let (command, inner, key) = (command.clone(), inner.clone(), key.clone());
            async move {
                self.forward_fanout(&g, nodes, &command, inner, timeout, &key, who)
                    .await
            }
        }));
        let local_results = futures_util::stream::iter(local.into_iter().map(|t| {
            let (command, inner, key) = (command.clone(), inner.clone(), key.clone());
            async move {
                let r = self.invoke_entry(&t, &command, inner, timeout, &key, forwarded, Some(who), None).await;
                let mut row = json!({"nodeId": t["nodeId"], "displayName": t["displayName"], "gateway": t["gateway"]});
                match r {
                    Ok(v) => {
                        row["ok"] = json!(true);
                        row["payload"] = v["payload"].clone();
                    }
                    Err(e) => {
                        row["ok"] = json!(false);
                        row["error"] = json!({"code": e.code, "message": e.message});
                    }
                }
                row
            }
        }))
        .buffer_unordered(FANOUT_CONCURRENCY)
        .collect::<Vec<Value>>();
        let (mut results, remote) = futures_util::future::join(local_results, remote).await;
        results.extend(remote.into_iter().flatten());
        let failed = results.iter().filter(|r| r["ok"] != true).count();
        Ok(
            json!({"ok": true, "command": command, "count": results.len(), "failed": failed, "results": results}),
        )
    }

    pub(super) async fn invoke_on(
        &self,
        sel: &str,
        command: &str,
        params: Value,
        timeout: Duration,
        idempotency_key: &str,
    ) -> Result<Value, WireError> {
        let entries = self.entries_for(sel, false, true)?;
        let target = self
            .select(sel, &entries, false)?
            .into_iter()
            .next()
            .cloned();
        let target = target.ok_or_else(|| bad(format!("unknown node: {sel}")))?;
        self.invoke_entry(
            &target,
            command,
            params,
            timeout,
            idempotency_key,
            false,
            None,
            None,
        )
        .await
    }

    /// Runs `command` on the node `entry` names: here if it is attached here, else forwarded
    /// once over QUIC to the gateway holding it (never further). With `who`, the gateway that
    /// runs it leaves an audit record.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn invoke_entry(
        &self,
        entry: &Value,
        command: &str,
        params: Value,
        timeout: Duration,
        idempotency_key: &str,
        forwarded: bool,
        who: Option<&Who>,
        timing: Option<u64>,
    ) -> Result<Value, WireError> {
        let node_id = entry["nodeId"].as_str().unwrap_or_default().to_string();
        let name = entry["displayName"]
            .as_str()
            .unwrap_or(&node_id)
            .to_string();
        let link =
            DeviceId::parse(&node_id).and_then(|id| self.inner.nodes.for_invoke(&id, command));
        let holder = entry["gateway"].as_str().unwrap_or_default().to_string();
        // The resolution decided where the node is: a session still open here but older than
        // its attachment elsewhere is stale (this gateway has not noticed yet).
        if !forwarded && !holder.is_empty() && holder != self.gateway_name() {
            return self
                .forward_invoke(
                    entry,
                    &holder,
                    &node_id,
                    &name,
                    command,
                    params,
                    timeout,
                    idempotency_key,
                    who,
                )
                .await;
        }
        let link = match link {
            Some(Ok(link)) => link,
            Some(Err(offered)) => {
                let mut e = bad(format!("node command not allowed: {command} is not declared by node {name} (it offers: {offered})"));
                e.details = Some(
                    json!({"reason":"command not declared by node","command":command}).to_string(),
                );
                return Err(e);
            }
            None => {
                let mut e = WireError::new(
                    "UNAVAILABLE",
                    format!(
                        "node not connected: {name} ({}) is paired but not attached to gateway {}",
                        &node_id[..node_id.len().min(12)],
                        self.gateway_name()
                    ),
                );
                e.details = Some(json!({"code":"NOT_CONNECTED","nodeError":{"code":"NOT_CONNECTED","message":"node not connected"},"nodeCommandDispatched":false}).to_string());
                e.retryable = true;
                return Err(e);
            }
        };
        let started = Instant::now();
        // Dropped unfinished (the caller went away): recorded as cancelled.
        let audit = AuditGuard::new(
            &self.inner.instruments,
            self.inner.logs.get(),
            who,
            &name,
            command,
            &params,
            idempotency_key,
        );
        let mut params = params;
        // A native node adds its own receive and reply times when asked.
        if let (Some(_), NodeLink::Quic(_), Value::Object(m)) = (timing, &link, &mut params) {
            m.insert(TIMING_KEY.into(), Value::Bool(true));
        }
        let sent = timing.map(|_| wall_ns());
        let span = tracing::info_span!("invoke", node = %name, %command);
        let result = tracing::Instrument::instrument(
            link.invoke(command, &params, timeout, idempotency_key),
            span,
        )
        .await;
        let reply_received = timing.map(|_| wall_ns());
        match result {
            Ok(mut text) => {
                let mut payload: Value =
                    serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
                let node_times = match (timing, &mut payload) {
                    (Some(_), Value::Object(m)) => m.remove(TIMING_KEY),
                    _ => None,
                };
                if node_times.is_some() {
                    text = payload.to_string();
                }
                let outcome = if payload["timedOut"] == true {
                    Outcome::Timeout
                } else {
                    Outcome::Ok
                };
                audit.finish(outcome, payload["exitCode"].as_i64().map(|c| c as i32));
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "invoke ok"
                );
                let mut reply = json!({
                    "ok": true,
                    "nodeId": node_id,
                    "command": command,
                    "payload": payload,
                    "payloadJSON": text,
                });
                if let Some(received) = timing {
                    let node = node_times.unwrap_or(Value::Null);
                    reply["timing"] = json!({
                        "gatewayReceivedNs": received,
                        "nodeSentNs": sent,
                        "nodeReceivedNs": node["receivedNs"],
                        "nodeRepliedNs": node["repliedNs"],
                        "replyReceivedNs": reply_received,
                        "gatewayRepliedNs": wall_ns(),
                    });
                }
                Ok(reply)
            }
            Err(e) => {
                let outcome = match &e {
                    CallError::Timeout { .. } => Outcome::Timeout,
                    CallError::Remote(w) if w.message.contains("SYSTEM_RUN_DENIED") => {
                        Outcome::Refused
                    }
                    _ => Outcome::Error,
                };
                audit.finish(outcome, None);
                Err(registry::invoke_error(e, &name, timeout))
            }
        }
    }

    /// The entry for an exact node id without listing every node: the winner of its claims
    /// (the same resolution as [`Self::node_entries`]); for forwarded requests, which only
    /// serve local nodes, only a session here.
    pub(super) fn exact_entry(&self, sel: &str, local_only: bool) -> Option<Value> {
        let id = DeviceId::parse(sel)?;
        let me = self.gateway_name();
        let row = |name: &str, gateway: &str| json!({"nodeId": sel, "displayName": name, "gateway": gateway});
        if local_only {
            return Some(row(&self.inner.nodes.brief(&id)?.0, &me));
        }
        // By index: this gateway's session and the other gateways' announcements of this one
        // node, resolved like every listing; nothing else of the fleet is read.
        let mut claims = Vec::new();
        if let Some((name, attach)) = self.inner.nodes.brief(&id) {
            claims.push(Claim {
                node: id,
                gateway: me.clone(),
                live: true,
                local: true,
                order: attach,
                item: row(&name, &me),
            });
        }
        if let Some(mesh) = self.inner.mesh.get() {
            for (gateway, status, n) in mesh.remote_claims_of(&id) {
                claims.push(Claim {
                    node: id,
                    live: status != clawmesh_federation::health::Status::Offline,
                    local: false,
                    order: n.attach,
                    item: row(&n.name, &gateway),
                    gateway,
                });
            }
        }
        if claims.len() == 1 {
            return claims.pop().map(|c| c.item);
        }
        directory::resolve(claims)
            .into_iter()
            .next()
            .map(|c| c.item)
    }

    /// Sends one fan-out request for all of `nodes` to the gateway holding them; one result
    /// row per node, errors included.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward_fanout(
        &self,
        gateway: &str,
        nodes: Vec<Value>,
        command: &str,
        params: Value,
        timeout: Duration,
        key: &str,
        who: &Who,
    ) -> Vec<Value> {
        let fail = |nodes: &[Value], e: &WireError| -> Vec<Value> {
            nodes
                .iter()
                .map(|t| json!({"nodeId": t["nodeId"], "displayName": t["displayName"], "gateway": t["gateway"], "ok": false, "error": {"code": e.code, "message": e.message}}))
                .collect()
        };
        let conn = match self.mesh().map(|m| m.connection_to(gateway)) {
            Ok(Some(c)) => c,
            Ok(None) => {
                let e = WireError::new("UNAVAILABLE", format!("gateway {gateway} is offline"));
                return fail(&nodes, &e);
            }
            Err(e) => return fail(&nodes, &e),
        };
        let ids: Vec<Value> = nodes.iter().map(|t| t["nodeId"].clone()).collect();
        let req = json!({
            "nodeId": "*",
            "nodeIds": ids,
            "all": true,
            "command": command,
            "params": params,
            "timeoutMs": timeout.as_millis() as u64,
            "idempotencyKey": key,
            "audit": who.to_json(),
        });
        match clawmesh_federation::rpc::call(
            &conn,
            "node.invoke",
            req.to_string(),
            1,
            timeout + FORWARD_MARGIN,
        )
        .await
        {
            Ok(text) => match serde_json::from_str::<Value>(&text) {
                Ok(v) => v["results"].as_array().cloned().unwrap_or_default(),
                Err(e) => fail(
                    &nodes,
                    &WireError::new(
                        "UNAVAILABLE",
                        format!("bad reply from gateway {gateway}: {e}"),
                    ),
                ),
            },
            Err(e) => fail(&nodes, &e.naming(&format!("gateway {gateway}")).to_wire()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn forward_invoke(
        &self,
        entry: &Value,
        holder: &str,
        node_id: &str,
        name: &str,
        command: &str,
        params: Value,
        timeout: Duration,
        idempotency_key: &str,
        who: Option<&Who>,
    ) -> Result<Value, WireError> {
        let mesh = self.mesh()?;
        let Some(conn) = mesh.connection_to(holder) else {
            let seen = entry["gatewayLastSeen"].as_str().unwrap_or("never");
            let mut e = WireError::new(
                "UNAVAILABLE",
                format!("node {name} is attached to gateway {holder}, which is offline (last seen {seen})"),
            );
            e.details = Some(json!({"code":"GATEWAY_OFFLINE","gateway":holder,"lastSeen":entry["gatewayLastSeen"]}).to_string());
            e.retryable = true;
            return Err(e);
        };
        let mut req = json!({
            "nodeId": node_id,
            "command": command,
            "params": params,
            "timeoutMs": timeout.as_millis() as u64,
            "idempotencyKey": idempotency_key,
        });
        if let Some(w) = who {
            req["audit"] = w.to_json();
        }
        let span = tracing::info_span!("forward", gateway = %holder, node = %name, %command);
        // The holder enforces `timeout`; allow one more round trip for its answer.
        let wait = timeout + FORWARD_MARGIN;
        match tracing::Instrument::instrument(
            clawmesh_federation::rpc::call(&conn, "node.invoke", req.to_string(), 1, wait),
            span,
        )
        .await
        {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                WireError::new(
                    "UNAVAILABLE",
                    format!("bad reply from gateway {holder}: {e}"),
                )
            }),
            Err(clawmesh_federation::rpc::CallError::Remote(e)) => Err(e),
            Err(e) => {
                let mut w = WireError::new(
                    "UNAVAILABLE",
                    format!(
                        "{} (node {name} is attached there)",
                        e.naming(&format!("gateway {holder}"))
                    ),
                );
                w.retryable = true;
                Err(w)
            }
        }
    }
}

/// What a node selector compares, prepared once: every attached and announced node is tested
/// in place (no copy), as [`registry::resolve`] would match its row: exact id, IP, name
/// without case, id prefix of at least [`MIN_ID_PREFIX`] characters.
struct Wanted<'a> {
    sel: &'a str,
    /// `sel` in lower case, for a selector beyond ASCII (an ASCII one is compared without
    /// allocating).
    lower: Option<String>,
}

impl<'a> Wanted<'a> {
    fn new(sel: &'a str) -> Self {
        let sel = sel.trim();
        Wanted {
            sel,
            lower: (!sel.is_ascii()).then(|| sel.to_lowercase()),
        }
    }

    fn matches(&self, id: &DeviceId, name: &str, ip: &str) -> bool {
        // An exact id is the longest prefix.
        let by_id = self.sel.len() >= MIN_ID_PREFIX && id_starts_with(id, self.sel);
        let name = name.trim();
        let by_name = match &self.lower {
            None => name.eq_ignore_ascii_case(self.sel),
            Some(lower) => name.to_lowercase() == *lower,
        };
        by_id || by_name || ip == self.sel
    }
}

/// Whether `id`'s hex form starts with `prefix`, without writing it out.
fn id_starts_with(id: &DeviceId, prefix: &str) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    prefix.len() <= 2 * id.0.len()
        && prefix.bytes().enumerate().all(|(i, c)| {
            let b = id.0[i / 2];
            let nibble = if i % 2 == 0 { b >> 4 } else { b & 0x0f };
            HEX[usize::from(nibble)] == c
        })
}

/// When another gateway last answered, and its latency in ms (`gatewayLastSeen`,
/// `gatewayLatencyMs` of its nodes' rows).
type Seen = (Option<SystemTime>, Option<f64>);

/// The gateway holding a remote claim, as a row shows it.
struct Holder<'a> {
    gateway: &'a str,
    status: Status,
    last_seen: Option<SystemTime>,
    latency: Option<f64>,
}

/// A node's labels: its own, with `region` (where it was paired) when it has none.
fn labels_of(own: &[(String, String)], region: Option<&String>) -> serde_json::Map<String, Value> {
    let mut labels: serde_json::Map<String, Value> =
        own.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    if let Some(r) = region {
        labels.entry("region").or_insert_with(|| json!(r));
    }
    labels
}

/// The claim of a node attached here, as its listing row.
fn local_claim(
    info: &NodeInfo,
    transport: &str,
    gateway: &str,
    region: Option<&String>,
    vitals: Option<Value>,
) -> Claim<Value> {
    let row = json!({
        "nodeId": info.node_id.to_string(),
        "displayName": info.name,
        "platform": info.platform,
        "version": info.version,
        "caps": info.caps,
        "commands": info.commands,
        "clientId": info.client_id,
        "clientMode": info.client_mode,
        "deviceFamily": info.device_family,
        "pathEnv": info.path_env,
        "remoteIp": registry::ip_of(&info.remote),
        "paired": true,
        "connected": true,
        "connectedAtMs": info.connected_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "transport": transport,
        "gateway": gateway,
        "gatewayStatus": "healthy",
        "gatewayLatencyMs": 0.0,
        "local": true,
        "attach": info.attach.to_string(),
        "labels": labels_of(&info.labels, region),
        "approvalState": "approved",
        "vitals": vitals,
    });
    Claim {
        node: info.node_id,
        gateway: gateway.to_string(),
        live: true,
        local: true,
        order: info.attach,
        item: row,
    }
}

/// Another gateway's claim on node `n`, as its listing row.
fn remote_claim(
    n: &NodeSummary,
    at: &Holder<'_>,
    region: Option<&String>,
    vitals: Option<Value>,
) -> Claim<Value> {
    let live = at.status != Status::Offline;
    let row = json!({
        "nodeId": n.id.to_string(),
        "displayName": n.name,
        "platform": n.platform,
        "version": n.version,
        "caps": [],
        "commands": n.commands,
        "remoteIp": n.ip,
        "paired": true,
        "connected": live,
        "transport": n.transport,
        "gateway": at.gateway,
        "gatewayStatus": at.status.as_str(),
        "gatewayLastSeen": at.last_seen.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        "gatewayLatencyMs": at.latency,
        "local": false,
        "attach": n.attach.to_string(),
        "labels": labels_of(&n.labels, region),
        "approvalState": "approved",
        "vitals": vitals,
    });
    Claim {
        node: n.id,
        gateway: at.gateway.to_string(),
        live,
        local: false,
        order: n.attach,
        item: row,
    }
}

/// The row of a paired node attached nowhere (`gateway` is this one's name without
/// `federation`, as the classic listing shows it).
fn paired_row(p: &PairedDevice, federation: bool, gateway: &str) -> Value {
    let mut labels = serde_json::Map::new();
    if let Some(r) = &p.region {
        labels.insert("region".into(), json!(r));
    }
    json!({
        "nodeId": p.device_id,
        "displayName": p.name,
        "platform": p.platform,
        "clientId": p.client_id,
        "clientMode": p.client_mode,
        "deviceFamily": p.device_family,
        "caps": [],
        "commands": [],
        "paired": true,
        "connected": false,
        "transport": null,
        "gateway": if federation { Value::Null } else { json!(gateway) },
        "local": false,
        "labels": labels,
        "approvedAt": p.approved_at,
        "approvalState": "approved",
    })
}

/// Adds how a paired node was admitted (`approvedBy`, and the tailnet identity) to its row.
fn admitted_by(row: &mut Value, p: Option<&PairedDevice>) {
    let Some(p) = p else {
        return;
    };
    row["approvedBy"] = json!(p.approved_by);
    if let Some(t) = &p.tailnet {
        row["tailnet"] = t.clone();
    }
}

/// Who is behind an invoke, carried to the gateway that runs it.
pub(super) struct Who {
    caller: String,
    entry: String,
}

impl Who {
    fn to_json(&self) -> Value {
        json!({"caller": self.caller, "entryGateway": self.entry})
    }
}

/// The audit record of one dispatched invoke: finished with its outcome, or, when dropped
/// unfinished (the caller cancelled, the request stream was stopped), written as cancelled.
struct AuditGuard {
    logs: Option<crate::gateway::logs::GatewayLogs>,
    audit: Option<Audit>,
    started: Instant,
    /// The counters and the command, until counted once.
    metric: Option<(Arc<crate::gateway::instruments::Instruments>, String)>,
}

impl AuditGuard {
    fn new(
        instruments: &Arc<crate::gateway::instruments::Instruments>,
        logs: Option<&crate::gateway::logs::GatewayLogs>,
        who: Option<&Who>,
        node: &str,
        command: &str,
        params: &Value,
        key: &str,
    ) -> AuditGuard {
        let audit = who.map(|w| Audit {
            caller: w.caller.clone(),
            entry_gateway: w.entry.clone(),
            node: node.to_string(),
            command: command.to_string(),
            argv: if command == "system.run" {
                params["command"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| {
                                v.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| v.to_string())
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            },
            exit_code: None,
            duration_ms: 0,
            outcome: Outcome::Cancelled,
            key: key.to_string(),
        });
        AuditGuard {
            logs: logs.cloned(),
            audit,
            started: Instant::now(),
            metric: Some((instruments.clone(), command.to_string())),
        }
    }

    fn finish(mut self, outcome: Outcome, exit_code: Option<i32>) {
        self.write(outcome, exit_code);
    }

    fn write(&mut self, outcome: Outcome, exit_code: Option<i32>) {
        if let Some((m, command)) = self.metric.take() {
            m.invoke_done(&command, outcome.as_str(), self.started.elapsed());
        }
        if let (Some(logs), Some(mut a)) = (self.logs.take(), self.audit.take()) {
            a.outcome = outcome;
            a.exit_code = exit_code;
            a.duration_ms = self.started.elapsed().as_millis() as u64;
            logs.audit(a);
        }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        self.write(Outcome::Cancelled, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place comparison matches a row exactly when `registry::resolve` would: id
    /// prefix (6 or more, lower-case hex as written), exact id, IP, name without case.
    #[test]
    fn a_selector_compared_in_place_matches_as_the_rows_would() {
        for seed in 0u8..20 {
            let id = DeviceId([seed.wrapping_mul(37).wrapping_add(11); 32].map(|b| b ^ seed));
            let hex = id.to_string();
            for n in 0..=hex.len() {
                assert!(id_starts_with(&id, &hex[..n]), "{hex} {n}");
            }
            assert!(!id_starts_with(&id, &format!("{hex}0")));
            let w = Wanted::new(&hex[..6]);
            assert!(w.matches(&id, "x", "1.2.3.4"));
            assert!(!Wanted::new(&hex[..5]).matches(&id, "x", "1.2.3.4"));
            assert!(Wanted::new(&hex).matches(&id, "x", ""));
        }
        let id = DeviceId([0xab; 32]);
        for (sel, name, ip, want) in [
            ("web-1", "WEB-1", "", true),
            (" Web-1 ", "web-1", "", true),
            ("web-1", " web-1", "", true),
            ("web", "web-1", "", false),
            ("ÉTÉ", "été", "", true),
            ("été", "ÉTÉ", "", true),
            ("ete", "été", "", false),
            ("10.0.0.7", "n", "10.0.0.7", true),
            ("10.0.0.7", "n", "10.0.0.70", false),
            ("ababab", "n", "", true),
            ("ABABAB", "n", "", false),
            ("abab", "n", "", false),
        ] {
            let row = json!({"nodeId": id.to_string(), "displayName": name, "remoteIp": ip});
            let resolved = registry::resolve(sel, std::slice::from_ref(&row)).is_ok();
            assert_eq!(
                Wanted::new(sel).matches(&id, name, ip),
                want,
                "{sel:?} {name:?}"
            );
            assert_eq!(resolved, want, "resolve {sel:?} {name:?}");
        }
    }
}
