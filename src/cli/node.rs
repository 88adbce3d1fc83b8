//! `clawmesh node run`: the node host's settings, from flags over `clawmesh.json`.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clawmesh_discovery::PeerUrl;
use serde_json::Value;

use crate::cli::args::NodeRunArgs;
use crate::config::FileConfig;
use crate::node::approvals::Security;
use crate::node::run::NodeSettings;

fn parse_label(l: &str) -> Result<(String, String)> {
    let (k, v) = l
        .split_once('=')
        .ok_or_else(|| anyhow!("label {l:?} must be KEY=VALUE, e.g. region=fra"))?;
    if k.trim().is_empty() {
        bail!("label {l:?} has an empty key");
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// Merges `node run` flags over the config file.
pub fn node_settings(
    state_dir: PathBuf,
    a: NodeRunArgs,
    file: &FileConfig,
) -> Result<NodeSettings> {
    for k in &file.unknown {
        tracing::warn!("unknown key {k} in clawmesh.json (ignored)");
    }
    let urls = if !a.gateways.is_empty() {
        a.gateways
    } else if let Some(list) = file.strings("node.gateways")? {
        list
    } else {
        file.str("gateway.remote.url")?.into_iter().collect()
    };
    let gateways = urls
        .iter()
        .map(|u| {
            PeerUrl::parse(u, crate::DEFAULT_PORT).with_context(|| format!("gateway URL {u:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut labels = Vec::new();
    if let Some(obj) = file_labels(file)? {
        labels.extend(obj);
    }
    for l in &a.labels {
        let (k, v) = parse_label(l)?;
        labels.retain(|(x, _)| *x != k);
        labels.push((k, v));
    }
    let security = match a.security.or(file.str("node.security")?) {
        Some(s) => Some(
            s.parse::<Security>()
                .map_err(|e| anyhow!("--security: {e}"))?,
        ),
        None => None,
    };
    Ok(NodeSettings {
        state_dir,
        gateways,
        name: a.name.or(file.str("node.name")?).unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "node".into())
        }),
        token: a.token.or(file.str("gateway.remote.token")?),
        labels,
        security,
        mdns: !a.no_mdns && !crate::gateway::discovery::bonjour_disabled(),
    })
}

fn file_labels(file: &FileConfig) -> Result<Option<Vec<(String, String)>>> {
    // node.labels is an object of strings; read it through the typed accessors per key.
    let Some(path) = &file.path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text)?;
    let Some(obj) = v.pointer("/node/labels").and_then(Value::as_object) else {
        return Ok(None);
    };
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(anyhow!("node.labels.{k} must be a string, got {other}")),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
