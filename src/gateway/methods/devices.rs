//! `device.pair.*`: approving, rejecting and revoking devices, shared with every gateway.

use clawmesh_federation::rpc::{Caller, CallerKind};
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use super::{bad, pairing_err, str_param, Methods};
use crate::gateway::scopes;

impl Methods {
    /// `device.pair.list|approve|reject|remove`: the pairing registry, for operators.
    pub(super) fn devices_method(
        &self,
        caller: &Caller,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        match method {
            "device.pair.list" => {
                serde_json::to_value(self.inner.pairing.list().map_err(pairing_err)?)
                    .map_err(|e| WireError::new("UNAVAILABLE", e.to_string()))
            }
            "device.pair.approve" => {
                let sel = str_param(&params, "requestId", method)?;
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
                let pending = self.inner.pairing.find_pending(sel).map_err(pairing_err)?;
                let clash = self
                    .inner
                    .pairing
                    .paired_all()
                    .map_err(pairing_err)?
                    .into_iter()
                    .find(|d| d.name == pending.name && d.device_id != pending.device_id);
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
                let device = self.inner.pairing.approve(sel).map_err(pairing_err)?;
                tracing::info!(device = %device.device_id, name = %device.name, "device approved");
                self.publish_pairing(&device.public_key);
                Ok(json!({"requestId": sel, "device": device}))
            }
            "device.pair.reject" => {
                let sel = str_param(&params, "requestId", method)?;
                let p = self.inner.pairing.reject(sel).map_err(pairing_err)?;
                Ok(json!({"requestId": p.request_id, "deviceId": p.device_id}))
            }
            "device.pair.remove" => {
                let sel = str_param(&params, "deviceId", method)?;
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
    pub(super) fn publish_pairing(&self, public_key: &str) {
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
