//! `config.get|show|set|unset` and `gateway.promote`: the shared config as operators see it.

use std::collections::BTreeMap;

use clawmesh_federation::consensus::Command;
use clawmesh_federation::wire::WireError;
use serde_json::{json, Value};

use super::{bad, str_param, Methods};
use crate::gateway::shared_config;

/// Bytes of keys and values in one config write at most: a raft entry well inside a frame.
const MAX_CONFIG_WRITE: usize = 8 * 1024 * 1024;

impl Methods {
    /// `config.get|show|set|unset` and `gateway.promote`.
    pub(super) async fn config_method(
        &self,
        method: &str,
        params: Value,
    ) -> Result<Value, WireError> {
        let sh = self.shared()?;
        match method {
            "config.get" => {
                let key = str_param(&params, "key", method)?;
                let (entries, ignored) = self.effective_keys(&[key]).await?;
                let synced = sh.replica.get(key).await.map_err(|e| e.to_wire())?;
                let mut doc = json!({
                    "key": key,
                    "revision": sh.replica.revision(),
                    "synced": synced.as_ref().map(|(v, r)| json!({
                        "value": shared_config::shown(key, &serde_json::from_str(v).unwrap_or(Value::Null)),
                        "revision": r,
                    })),
                    "local": sh.local.get(key).map(|v| shared_config::shown(key, v)),
                });
                match shared_config::lookup(&entries, key) {
                    Some(e) => {
                        let one = shared_config::effective_json(std::slice::from_ref(e), &[]);
                        doc["effective"] = one["entries"][0].clone();
                        doc["found"] = json!(true);
                    }
                    None => {
                        doc["found"] = json!(false);
                        if let Some(i) = ignored.iter().find(|i| i.key == key) {
                            doc["notApplied"] = json!(i.reason);
                        }
                    }
                }
                Ok(doc)
            }
            "config.show" => {
                let eff = params
                    .get("effective")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let mut doc = json!({
                    "gateway": self.gateway_name(),
                    "revision": sh.replica.revision(),
                    "consensus": sh.replica.status(),
                    "sync": sh.policy.to_json(),
                });
                if eff {
                    let (entries, ignored) = self.effective_config().await?;
                    let v = shared_config::effective_json(&entries, &ignored);
                    doc["entries"] = v["entries"].clone();
                    doc["notApplied"] = v["notApplied"].clone();
                } else {
                    let rows = sh.replica.all().await.map_err(|e| e.to_wire())?;
                    doc["entries"] = rows
                        .iter()
                        .map(|(k, v, r)| {
                            let value = serde_json::from_str(v).unwrap_or(Value::Null);
                            json!({"key": k, "value": shared_config::shown(k, &value), "revision": r, "section": shared_config::Section::of(k).name()})
                        })
                        .collect();
                }
                Ok(doc)
            }
            "config.set" | "config.unset" => {
                let mut changes: Vec<(String, Option<String>)> = Vec::new();
                if method == "config.set" {
                    if let Some(values) = params.get("values").and_then(Value::as_object) {
                        for (k, v) in values {
                            crate::config_schema::check(k, v).map_err(bad)?;
                            changes.push((k.clone(), Some(v.to_string())));
                        }
                    } else {
                        let key = str_param(&params, "key", method)?;
                        let value = params.get("value").ok_or_else(|| {
                            bad("invalid config.set params: must have required property 'value'")
                        })?;
                        crate::config_schema::check(key, value).map_err(bad)?;
                        changes.push((key.to_string(), Some(value.to_string())));
                    }
                } else if let Some(keys) = params.get("keys").and_then(Value::as_array) {
                    for k in keys {
                        let k = k
                            .as_str()
                            .ok_or_else(|| bad("invalid config.unset params: keys are strings"))?;
                        changes.push((k.to_string(), None));
                    }
                } else {
                    changes.push((str_param(&params, "key", method)?.to_string(), None));
                }
                if changes.is_empty() {
                    return Err(bad(format!("{method}: nothing to change")));
                }
                if method == "config.unset" {
                    // Unsetting a key that is not set writes nothing (no revision is spent)
                    // and says which keys those were.
                    let mut absent = Vec::new();
                    let mut present = Vec::new();
                    for (k, v) in changes {
                        shared_config::check_key(&k).map_err(bad)?;
                        if sh.replica.get(&k).await.map_err(|e| e.to_wire())?.is_some() {
                            present.push((k, v));
                        } else {
                            absent.push(k);
                        }
                    }
                    if present.is_empty() {
                        return Ok(json!({
                            "revision": sh.replica.revision(),
                            "primary": sh.replica.status().leader,
                            "keys": 0,
                            "notSet": absent,
                        }));
                    }
                    changes = present;
                }
                let mut size = 0;
                for (k, v) in &changes {
                    shared_config::check_key(k).map_err(bad)?;
                    let len = v.as_ref().map_or(0, String::len);
                    if len > shared_config::MAX_VALUE_LEN {
                        return Err(bad(format!(
                            "value of {k} is {len} bytes; at most {} per key",
                            shared_config::MAX_VALUE_LEN
                        )));
                    }
                    size += k.len() + len;
                }
                if size > MAX_CONFIG_WRITE {
                    return Err(bad(format!(
                        "one config write carries at most {MAX_CONFIG_WRITE} bytes, not {size}; split it"
                    )));
                }
                let n = changes.len();
                let cmd = if n == 1 {
                    let (key, value) = changes.remove(0);
                    Command::SetConfig { key, value }
                } else {
                    Command::SetConfigBatch(changes)
                };
                let written: Vec<String> = match &cmd {
                    Command::SetConfig { key, .. } => vec![key.clone()],
                    Command::SetConfigBatch(c) => c.iter().map(|(k, _)| k.clone()).collect(),
                    _ => Vec::new(),
                };
                let result = sh.replica.write(cmd).await;
                self.instruments()
                    .config_write(crate::gateway::instruments::write_outcome(&result));
                let ack = result.map_err(|e| e.to_wire())?;
                tracing::info!(revision = ack.revision, keys = n, primary = %ack.leader, "shared config written");
                // Keys this gateway pins by a flag or its file (unless the sync policy lets
                // the shared value win): the write is stored but not in force here.
                let pinned: Vec<Value> = if sh.policy.override_local {
                    Vec::new()
                } else {
                    written
                        .iter()
                        .filter(|k| sh.local.contains_key(*k))
                        .map(|k| json!({"key": k, "source": if sh.flags.contains(k) { "flag" } else { "file" }}))
                        .collect()
                };
                Ok(
                    json!({"revision": ack.revision, "primary": ack.leader, "keys": n, "shadowedHere": pinned, "gateway": self.gateway_name()}),
                )
            }
            "gateway.promote" => {
                if params.get("force").and_then(Value::as_bool) != Some(true) {
                    return Err(bad(
                        "gateway.promote overrides quorum and needs force: true (`clawmesh gateway promote --force`)",
                    ));
                }
                let voters = sh.replica.promote_force().await.map_err(|e| e.to_wire())?;
                tracing::warn!(?voters, "promoted by an operator, overriding quorum");
                Ok(json!({"gateway": self.gateway_name(), "voters": voters}))
            }
            other => Err(bad(format!("unknown method: {other}"))),
        }
    }

    /// The effective config here (local and synced keys merged under the sync policy).
    pub async fn effective_config(
        &self,
    ) -> Result<(Vec<shared_config::Effective>, Vec<shared_config::Ignored>), WireError> {
        let sh = self.shared()?;
        let rows = sh.replica.all().await.map_err(|e| e.to_wire())?;
        let (mut entries, ignored) = shared_config::effective(&sh.local, &rows, sh.policy);
        shared_config::mark_flags(&mut entries, &sh.flags);
        Ok((entries, ignored))
    }

    /// The effective config of only `keys` (one lookup each, not the whole table).
    pub async fn effective_keys(
        &self,
        keys: &[&str],
    ) -> Result<(Vec<shared_config::Effective>, Vec<shared_config::Ignored>), WireError> {
        let sh = self.shared()?;
        let mut rows = Vec::with_capacity(keys.len());
        let mut local = BTreeMap::new();
        for key in keys {
            if let Some((value, revision)) = sh.replica.get(key).await.map_err(|e| e.to_wire())? {
                rows.push((key.to_string(), value, revision));
            }
            if let Some(v) = sh.local.get(*key) {
                local.insert(key.to_string(), v.clone());
            }
        }
        let (mut entries, ignored) = shared_config::effective(&local, &rows, sh.policy);
        shared_config::mark_flags(&mut entries, &sh.flags);
        Ok((entries, ignored))
    }
}
