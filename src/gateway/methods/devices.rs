//! `device.pair.*`: approving, rejecting and revoking devices, shared with every gateway.
//!
//! Paired devices are replicated (every gateway has every decision). A pending request waits
//! where the device asked, so the listing asks every reachable gateway for its own, each row
//! saying where it waits (`gateway`), and an approval or rejection of a request waiting
//! elsewhere is carried out there (its region goes into the pairing record there).

use std::time::Duration;

use clawmesh_federation::pairing::{
    parse_cursor, Page, PairedDevice, PairingError, RevokedDevice, MAX_PAGE,
};
use clawmesh_federation::rpc::{Caller, CallerKind};
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use super::{bad, pairing_err, str_param, Methods};
use crate::gateway::scopes;

/// The details code of "no such pending request here".
const NOT_FOUND: &str = "NO_PENDING_REQUEST_HERE";

fn not_found(e: &WireError) -> bool {
    e.details.as_deref().is_some_and(|d| d.contains(NOT_FOUND))
}

/// Deadline for asking another gateway about its pending requests: a WAN round trip with room
/// to spare; a gateway that does not answer is listed as unreachable, not waited for.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads `limit` (1 to [`MAX_PAGE`], default [`MAX_PAGE`]) and `after` (a page cursor) from
/// `device.pair.list` params.
fn page_params(params: &Value) -> Result<(usize, Option<[u8; 32]>), WireError> {
    let limit = match params.get("limit") {
        None | Some(Value::Null) => MAX_PAGE,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_PAGE as u64).contains(&n) => n as usize,
            _ => {
                return Err(bad(format!(
                    "invalid device.pair.list params: limit must be a whole number from 1 to {MAX_PAGE}, not {v}"
                )))
            }
        },
    };
    let after = match params.get("after") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_str().and_then(parse_cursor) {
            Some(c) => Some(c),
            None => {
                return Err(bad(format!(
                    "invalid device.pair.list params: after must be the `next` of the previous page (a device key, base64url), not {v}"
                )))
            }
        },
    };
    Ok((limit, after))
}

/// One answer of `device.pair.list`: the pending requests, one page of the paired and revoked
/// devices (none when another gateway asked), and the gateways that did not answer (first
/// page only).
#[derive(Clone)]
struct PairListing {
    pending: Vec<Value>,
    page: Option<Page>,
    unreachable: Option<Vec<String>>,
}

/// The wire shape of a [`PairListing`]: one definition for both the value and the text.
#[derive(serde::Serialize)]
struct PairListingWire<'a> {
    pending: &'a [Value],
    paired: &'a [PairedDevice],
    revoked: &'a [RevokedDevice],
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<&'a String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unreachable: Option<&'a Vec<String>>,
}

impl PairListing {
    fn wire(&self) -> PairListingWire<'_> {
        let page = self.page.as_ref();
        PairListingWire {
            pending: &self.pending,
            paired: page.map_or(&[], |p| &p.paired),
            revoked: page.map_or(&[], |p| &p.revoked),
            next: page.and_then(|p| p.next.as_ref()),
            unreachable: self.unreachable.as_ref(),
        }
    }

    /// The answer as a JSON value (the WebSocket front door embeds one).
    fn into_value(self) -> Result<Value, WireError> {
        serde_json::to_value(self.wire()).map_err(encode_err)
    }

    /// The same answer written as text directly from the records (see
    /// [`Methods::pair_list_text`]).
    fn to_text(&self) -> Result<String, WireError> {
        serde_json::to_string(&self.wire()).map_err(encode_err)
    }
}

fn encode_err(e: serde_json::Error) -> WireError {
    WireError::new("UNAVAILABLE", format!("cannot encode the device list: {e}"))
}

impl Methods {
    /// `device.pair.list|approve|reject|remove`: the pairing registry, for operators.
    pub(super) async fn devices_method(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        // A request from another gateway is about this gateway's own requests only.
        let forwarded = matches!(caller.kind, CallerKind::Gateway { .. });
        match method {
            "device.pair.list" => self
                .pair_listing(caller, forwarded, &params)
                .await?
                .into_value(),
            "device.pair.approve" | "device.pair.reject" if !forwarded => {
                match self.devices_local(caller, method, &params) {
                    // Not waiting here: where it waits, it is decided.
                    Err(e) if not_found(&e) => self.pair_elsewhere(caller, method, params).await,
                    r => r,
                }
            }
            _ => self.devices_local(caller, method, &params),
        }
    }

    /// `device.pair.list` as response text, for the QUIC front door: the page's devices are
    /// written straight from their records, never held as a JSON tree (a page of 10 000
    /// devices as a tree is tens of MB of small allocations; as text, about 7 MB).
    pub(super) async fn pair_list_text(
        &self,
        caller: &Caller,
        params: &Value,
    ) -> Result<String, WireError> {
        let forwarded = matches!(caller.kind, CallerKind::Gateway { .. });
        self.pair_listing(caller, forwarded, params)
            .await?
            .to_text()
    }

    /// Every pending request of the federation (this gateway's and every reachable one's,
    /// each with `gateway`: where it waits) and one page of the paired and revoked devices
    /// (`limit`, at most [`MAX_PAGE`], the default; `after`: the previous page's `next`). The
    /// pending requests come with the first page only, so paging lists every request and
    /// device once; a gateway asked by another answers with its pending requests only.
    async fn pair_listing(
        &self,
        caller: &Caller,
        forwarded: bool,
        params: &Value,
    ) -> Result<PairListing, WireError> {
        let me = self.gateway_name();
        let pending = |first: bool| -> Result<Vec<Value>, WireError> {
            let mut pending = if first {
                serde_json::to_value(self.inner.pairing.pending().map_err(pairing_err)?)
                    .map_err(|e| WireError::new("UNAVAILABLE", e.to_string()))?
            } else {
                json!([])
            };
            for p in pending.as_array_mut().into_iter().flatten() {
                p["gateway"] = json!(me);
            }
            Ok(match pending {
                Value::Array(a) => a,
                _ => Vec::new(),
            })
        };
        if forwarded {
            return Ok(PairListing {
                pending: pending(true)?,
                page: None,
                unreachable: None,
            });
        }
        let (limit, after) = page_params(params)?;
        let page = self
            .inner
            .pairing
            .page(after.as_ref(), limit)
            .map_err(pairing_err)?;
        let mut listing = PairListing {
            pending: pending(after.is_none())?,
            page: Some(page),
            unreachable: None,
        };
        if after.is_some() {
            return Ok(listing);
        }
        let others: Vec<String> = self
            .mesh()?
            .members()
            .into_iter()
            .map(|m| m.name)
            .filter(|n| *n != me)
            .collect();
        let answers =
            futures_util::future::join_all(others.iter().map(|g| {
                self.call_gateway(caller, g, "device.pair.list", json!({}), PEER_TIMEOUT)
            }))
            .await;
        let mut unreachable = Vec::new();
        for (g, answer) in others.iter().zip(answers) {
            match answer {
                Ok(v) => {
                    let theirs = v["pending"].as_array().cloned().unwrap_or_default();
                    for p in theirs {
                        if !listing
                            .pending
                            .iter()
                            .any(|q| q["requestId"] == p["requestId"])
                        {
                            listing.pending.push(p);
                        }
                    }
                }
                Err(_) => unreachable.push(g.clone()),
            }
        }
        listing.unreachable = Some(unreachable);
        Ok(listing)
    }

    /// Approves or rejects a request waiting at another gateway: the first gateway that has
    /// it decides.
    async fn pair_elsewhere(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        let me = self.gateway_name();
        let sel = str_param(&params, "requestId", method)?.to_string();
        let others: Vec<String> = self
            .mesh()?
            .members()
            .into_iter()
            .map(|m| m.name)
            .filter(|n| *n != me)
            .collect();
        let mut unreachable = Vec::new();
        for g in &others {
            match self
                .call_gateway(caller, g, method, params.clone(), PEER_TIMEOUT)
                .await
            {
                Ok(mut v) => {
                    v["gateway"] = json!(g);
                    return Ok(v);
                }
                Err(super::Failure::Remote(e)) if not_found(&e) => {}
                Err(super::Failure::Remote(e)) => return Err(e),
                Err(super::Failure::Transport(e)) => {
                    unreachable.push(format!("{g} ({})", e.message))
                }
            }
        }
        let mut e = bad(format!("no pending request matches {sel:?} on any gateway"));
        if !unreachable.is_empty() {
            e.message
                .push_str(&format!("; not asked: {}", unreachable.join(", ")));
        }
        Err(e)
    }

    /// The registry of this gateway (a request to approve or reject that does not wait here
    /// fails with [`NOT_FOUND`] in its details).
    fn devices_local(
        &self,
        caller: &Caller,
        method: &str,
        params: &Value,
    ) -> Result<Value, WireError> {
        let not_here = |e: PairingError| {
            let found = !matches!(e, PairingError::NotFound(_));
            let mut w = pairing_err(e);
            if !found {
                w.details = Some(json!({ "code": NOT_FOUND }).to_string());
            }
            w
        };
        match method {
            "device.pair.approve" => {
                let sel = str_param(params, "requestId", method)?;
                if let CallerKind::Operator {
                    scopes: granted, ..
                } = &caller.kind
                {
                    // Approving a node (a non-operator role) also needs admin, as in the classic
                    // protocol: a node can run commands.
                    if !scopes::satisfies(granted, scopes::ADMIN) {
                        let mut e = bad("device pairing approval denied");
                        e.details = Some(
                            json!({"code":"MISSING_SCOPE","missingScope":scopes::ADMIN})
                                .to_string(),
                        );
                        return Err(e);
                    }
                }
                // Names select nodes (`--node web-1`): a second device with a paired name
                // would make the name ambiguous, so it is refused here, not discovered later.
                let pending = self.inner.pairing.find_pending(sel).map_err(not_here)?;
                let clash = self
                    .inner
                    .pairing
                    .paired_name_clash(&pending.name, &pending.device_id)
                    .map_err(pairing_err)?;
                if let (Some(d), false) = (
                    clash,
                    params.get("allowDuplicateName") == Some(&json!(true)),
                ) {
                    return Err(bad(format!(
                        "another device named {} is already paired (device {}); start the new one with another --name, or revoke the old one first (`clawmesh devices revoke {}`)",
                        d.name,
                        &d.device_id[..d.device_id.len().min(16)],
                        &d.device_id[..d.device_id.len().min(16)],
                    )));
                }
                let device = self.inner.pairing.approve(sel).map_err(not_here)?;
                tracing::info!(device = %device.device_id, name = %device.name, "device approved");
                self.publish_pairing(&device.public_key);
                Ok(json!({"requestId": sel, "device": device}))
            }
            "device.pair.reject" => {
                let sel = str_param(params, "requestId", method)?;
                let p = self.inner.pairing.reject(sel).map_err(not_here)?;
                Ok(json!({"requestId": p.request_id, "deviceId": p.device_id}))
            }
            "device.pair.remove" => {
                let sel = str_param(params, "deviceId", method)?;
                let d = self.inner.pairing.revoke(sel).map_err(pairing_err)?;
                self.publish_pairing(&d.public_key);
                let disconnected = clawmesh_federation::identity::DeviceId::parse(&d.device_id)
                    .map(|id| self.inner.nodes.disconnect(&id, "device removed"))
                    .unwrap_or(false);
                tracing::info!(device = %d.device_id, name = %d.name, disconnected, "device revoked");
                Ok(json!({"deviceId": d.device_id, "name": d.name, "disconnected": disconnected}))
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }

    /// Sends one device's pairing decision to every gateway of the federation.
    pub fn publish_pairing(&self, public_key: &str) {
        let (Some(mesh), Ok(key)) = (
            self.inner.mesh.get(),
            clawmesh_federation::identity::PublicKey::from_base64(public_key),
        ) else {
            return;
        };
        match self.inner.pairing.record(&key) {
            Ok(Some(r)) => {
                if let Some(sh) = self.inner.shared.get() {
                    sh.replica.propose_pairing(vec![r.clone()]);
                }
                mesh.publish_pairing(vec![r]);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot share the pairing decision: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_paging_params_get_a_clear_error() {
        for p in [
            json!({"limit": 0}),
            json!({"limit": -1}),
            json!({"limit": "ten"}),
            json!({"limit": 1.5}),
            json!({"limit": MAX_PAGE + 1}),
            json!({"after": 5}),
            json!({"after": "not a cursor"}),
            json!({"after": "AAAA"}),
        ] {
            let e = page_params(&p).expect_err(&p.to_string());
            assert!(
                e.message.starts_with("invalid device.pair.list params: "),
                "{p}: {}",
                e.message
            );
        }
        assert_eq!(page_params(&json!({})).unwrap(), (MAX_PAGE, None));
        let key = [7u8; 32];
        let cursor = clawmesh_federation::identity::PublicKey(key).to_base64url();
        assert_eq!(
            page_params(&json!({"limit": 3, "after": cursor})).unwrap(),
            (3, Some(key))
        );
    }

    /// The listing written as text is the listing as a value, for every shape of answer.
    #[test]
    fn the_listing_as_text_is_the_listing_as_a_value() {
        use clawmesh_federation::identity::DeviceIdentity;
        use clawmesh_federation::pairing::{Admission, DeviceMeta, Registry};
        let dir = tempfile::tempdir().unwrap();
        let reg =
            Registry::open(clawmesh_federation::store::Store::open(dir.path()).unwrap()).unwrap();
        for i in 0..5 {
            let meta = DeviceMeta {
                name: format!("n{i} \"quoted\" é"),
                role: "node".into(),
                ..Default::default()
            };
            let key = DeviceIdentity::ephemeral().public_key();
            let Admission::Pending(p) = reg.admit(&key, &meta).unwrap() else {
                panic!()
            };
            reg.approve(&p.request_id).unwrap();
            if i == 2 {
                reg.revoke(&key.device_id().to_string()).unwrap();
            }
        }
        let pending = vec![json!({"requestId": "r", "gateway": "g"})];
        let first = reg.page(None, 3).unwrap();
        assert!(first.next.is_some());
        let last = reg.page(None, 10).unwrap();
        for listing in [
            PairListing {
                pending: pending.clone(),
                page: Some(first),
                unreachable: Some(vec!["far".into()]),
            },
            PairListing {
                pending: Vec::new(),
                page: Some(last),
                unreachable: None,
            },
            PairListing {
                pending,
                page: None,
                unreachable: None,
            },
        ] {
            let text: Value = serde_json::from_str(&listing.to_text().unwrap()).unwrap();
            assert_eq!(text, listing.clone().into_value().unwrap());
        }
    }
}
