//! `status`, `health`, `gateway.*` and `gateway.call`: the federation and its gateways.

use std::time::Duration;

use clawmesh_federation::rpc::Caller;
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use super::{bad, now_ms, str_param, Failure, Methods, FORWARD_MARGIN, MAX_INVOKE_TIMEOUT};

impl Methods {
    /// `status`, `gateway.status`, `gateway.identity` and `gateway.forget`.
    pub(super) fn gateway_method(&self, method: &str, params: Value) -> Result<Value, WireError> {
        match method {
            "status" | "gateway.status" => {
                let all = params.get("all").and_then(Value::as_bool).unwrap_or(true);
                let mut doc = crate::gateway::status::to_json(&self.mesh()?.status(), all);
                if let Some(sh) = self.inner.shared.get() {
                    doc["consensus"] = json!(sh.replica.status());
                }
                if let (Some(extra), Some(gws)) =
                    (self.inner.front_doors.get(), doc["gateways"].as_array_mut())
                {
                    for g in gws.iter_mut().filter(|g| g["isSelf"] == true) {
                        g["wsUrl"] = extra["wsUrl"].clone();
                        g["tlsFingerprint"] = extra["tlsFingerprint"].clone();
                    }
                }
                // This gateway's log shipping lag (only the gateway itself knows its spool).
                if let (Some(logs), Some(gws)) =
                    (self.inner.logs.get(), doc["gateways"].as_array_mut())
                {
                    if let Ok(lag) = logs.shipping_lag() {
                        let v = crate::gateway::status::shipping_lag_json(&lag, now_ms());
                        for g in gws.iter_mut().filter(|g| g["isSelf"] == true) {
                            g["logShipping"] = v.clone();
                        }
                    }
                }
                doc["nodes"] = json!(self.inner.nodes.len());
                // What the node directory sent (deltas, snapshots) and asked for (gaps).
                let d = self.mesh()?.directory_stats();
                doc["directory"] = json!({
                    "epoch": format!("{:016x}", d.at.epoch),
                    "version": d.at.version,
                    "deltasSent": d.deltas_sent,
                    "deltaBytes": d.delta_bytes,
                    "snapshotsSent": d.snapshots_sent,
                    "snapshotBytes": d.snapshot_bytes,
                    "resyncsAsked": d.resyncs_asked,
                    "dropped": d.dropped,
                });
                Ok(doc)
            }
            "gateway.identity" => {
                let mesh = self.mesh()?;
                Ok(json!({
                    "deviceId": mesh.key().device_id().to_string(),
                    "publicKey": mesh.key().to_base64url(),
                    "name": mesh.config().name,
                }))
            }
            "gateway.forget" => {
                let name = str_param(&params, "name", method)?;
                let mesh = self.mesh()?;
                let m = mesh.forget(name).map_err(|e| {
                    // Name the primary, so the operator knows where to run it.
                    let st = mesh.status();
                    match &st.primary {
                        Some(p) if e.to_string().contains("only the primary") => {
                            let addr = st
                                .gateways
                                .iter()
                                .find(|g| &g.name == p)
                                .map_or("its address", |g| g.addr.as_str());
                            bad(format!(
                                "{e}: the primary is {p} (`clawmesh gateway forget {name} --url quic://{addr}`)"
                            ))
                        }
                        _ => bad(e.to_string()),
                    }
                })?;
                Ok(json!({"name": m.name, "deviceId": m.key.device_id().to_string()}))
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }

    /// `gateway.call {gateway, method, params}`: runs any method on the named gateway. Scopes
    /// are checked here, where the caller entered; the target trusts its federation peer. Work
    /// for an offline gateway goes to the fallback gateway when one is configured.
    pub(super) async fn gateway_call(
        &self,
        caller: &Caller,
        params: Value,
    ) -> Result<Value, WireError> {
        let target = str_param(&params, "gateway", "gateway.call")?.to_string();
        let method = str_param(&params, "method", "gateway.call")?.to_string();
        if method == "gateway.call" {
            return Err(bad("gateway.call cannot call gateway.call"));
        }
        let inner = params.get("params").cloned().unwrap_or_else(|| json!({}));
        Self::check_access(caller, &method)?;
        let me = self.gateway_name();
        if target == me {
            return Box::pin(self.run_method(caller, &method, inner)).await;
        }
        let mesh = self.mesh()?;
        let timeout = Duration::from_millis(
            params
                .get("timeoutMs")
                .and_then(Value::as_u64)
                .unwrap_or(30_000),
        )
        .min(MAX_INVOKE_TIMEOUT);
        let status = mesh.status();
        let Some(row) = status.gateways.iter().find(|g| g.name == target) else {
            return Err(bad(format!("no gateway named {target:?} in this federation (see `clawmesh gateway status --all`)")));
        };
        let configured = self
            .inner
            .fallback
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fallback = match configured.as_deref() {
            Some("primary") => status.primary.clone(),
            Some(f) => Some(f.to_string()),
            None => None,
        }
        .filter(|f| *f != target);
        let seen = row
            .last_seen
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
            .unwrap_or_else(|| "never".into());
        let offline_error = |why: &str| {
            let mut e = WireError::new(
                "UNAVAILABLE",
                format!("gateway {target} is {why} (last seen {seen}) and no fallback is configured (gateway.failover.fallbackNode)"),
            );
            e.details = Some(
                json!({"code":"GATEWAY_OFFLINE","gateway":target,"lastSeen":seen}).to_string(),
            );
            e.retryable = true;
            e
        };
        let reachable = mesh.connection_to(&target).is_some()
            && row.status != clawmesh_federation::health::Status::Offline;
        let (served_by, mut result) = if reachable {
            match self
                .call_gateway(caller, &target, &method, inner.clone(), timeout)
                .await
            {
                Ok(v) => (target.clone(), v),
                // The target vanished mid-request: the fallback serves it, if there is one.
                Err(Failure::Transport(e)) => match &fallback {
                    Some(f) => {
                        tracing::info!(gateway = %target, fallback = %f, %method, "gateway lost mid-request; using the fallback");
                        (
                            f.clone(),
                            self.call_gateway(caller, f, &method, inner, timeout)
                                .await
                                .map_err(Failure::into_wire)?,
                        )
                    }
                    None => return Err(e),
                },
                Err(Failure::Remote(e)) => return Err(e),
            }
        } else {
            match &fallback {
                Some(f) => {
                    tracing::info!(offline = %target, fallback = %f, %method, "gateway offline; using the fallback");
                    (
                        f.clone(),
                        self.call_gateway(caller, f, &method, inner, timeout)
                            .await
                            .map_err(Failure::into_wire)?,
                    )
                }
                None => return Err(offline_error("offline")),
            }
        };
        if served_by != target {
            if let Value::Object(m) = &mut result {
                m.insert("servedBy".into(), json!(served_by));
                m.insert("fallbackFor".into(), json!(target));
            }
        }
        Ok(result)
    }

    /// Runs `method` on gateway `name` (here when it is this one), telling a transport failure
    /// (the gateway went away) from the gateway's own answer.
    pub(super) async fn call_gateway(
        &self,
        caller: &Caller,
        name: &str,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        if name == self.gateway_name() {
            return Box::pin(self.run_method(caller, method, params))
                .await
                .map_err(Failure::Remote);
        }
        let mesh = self.mesh().map_err(Failure::Remote)?;
        let conn = mesh.connection_to(name).ok_or_else(|| {
            Failure::Transport(WireError::new(
                "UNAVAILABLE",
                format!(
                    "gateway {name} is not reachable from {}",
                    self.gateway_name()
                ),
            ))
        })?;
        match clawmesh_federation::rpc::call(
            &conn,
            method,
            params.to_string(),
            1,
            timeout + FORWARD_MARGIN,
        )
        .await
        {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Failure::Remote(WireError::new(
                    "UNAVAILABLE",
                    format!("bad reply from gateway {name}: {e}"),
                ))
            }),
            Err(clawmesh_federation::rpc::CallError::Remote(e)) => Err(Failure::Remote(e)),
            Err(e) => Err(Failure::Transport(
                e.naming(&format!("gateway {name}")).to_wire(),
            )),
        }
    }

    pub(super) fn health(&self) -> Result<Value, WireError> {
        let mesh = self.mesh()?;
        let status = mesh.status();
        let me = status.gateways.iter().find(|g| g.is_self);
        Ok(json!({
            "ok": true,
            "ts": now_ms(),
            "durationMs": 0,
            "name": status.self_name,
            "status": me.map(|g| g.status.as_str()).unwrap_or("healthy"),
            "uptimeMs": self.inner.started.elapsed().as_millis() as u64,
            "startedAt": humantime::format_rfc3339_millis(self.inner.started_at).to_string(),
            "version": crate::VERSION,
            "gateways": status.gateways.len(),
            "primary": status.primary,
            "nodes": self.inner.nodes.len(),
        }))
    }

    /// Readiness for `GET /readyz`: ready when the mesh is up, this gateway is a member of
    /// its federation, and the shared config has a quorum view (a primary it can reach with a
    /// majority of voters); with `all`, also when no gateway of the federation is offline.
    /// Returns whether it is ready and a document with the reasons it is not.
    pub fn readiness(&self, all: bool) -> (bool, Value) {
        let mut reasons: Vec<String> = Vec::new();
        let mut doc = json!({"name": Value::Null});
        match self.mesh() {
            Err(e) => reasons.push(format!("not serving yet: {}", e.message)),
            Ok(mesh) => {
                let status = mesh.status();
                doc["name"] = json!(status.self_name);
                if let Some(why) = &status.not_joined {
                    reasons.push(format!("not joined: {why}"));
                }
                if all {
                    for g in status
                        .gateways
                        .iter()
                        .filter(|g| g.status == clawmesh_federation::health::Status::Offline)
                    {
                        reasons.push(format!("gateway {} is offline", g.name));
                    }
                }
            }
        }
        match self.shared() {
            Err(e) => reasons.push(format!("no quorum view: {}", e.message)),
            Ok(sh) => {
                let c = sh.replica.status();
                if !c.quorum {
                    reasons.push(format!(
                        "no quorum view: {} of {} voters reachable",
                        c.reachable_voters,
                        c.voters.len()
                    ));
                } else if c.leader.is_none() {
                    reasons.push("no quorum view: electing a primary".into());
                }
            }
        }
        let ready = reasons.is_empty();
        doc["ready"] = json!(ready);
        doc["reasons"] = json!(reasons);
        (ready, doc)
    }

    /// The `health` document (for `GET /healthz`), or a not-ready note.
    pub fn dispatch_health(&self) -> Value {
        self.health()
            .unwrap_or_else(|e| json!({"ok": false, "error": e.message}))
    }
}
