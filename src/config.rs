//! `clawmesh.json`: the peer's own config file in the state dir.
//!
//! It accepts the key names OpenClaw users already write (`gateway.mode`, `gateway.primaryUrl`,
//! `gateway.nodeName`, `gateway.authToken`, `gateway.remote.*`, `gateway.sync.*`,
//! `gateway.failover.*`, `logging.remote.*`, ...). Keys clawmesh does not know are reported,
//! never silently dropped, and a value of the wrong type is an error naming the key.
//! `"{{NAME}}"` placeholders (as in OpenClaw's secret templates) are read from the environment
//! variable `NAME`. Command-line flags win over the file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Keys clawmesh understands. A trailing `.*` accepts any subtree (free-form sections such as
/// model providers, whose shape belongs to the agent runtime, not to clawmesh).
const KNOWN_KEYS: &[&str] = &[
    "$schema",
    "gateway.mode",
    "gateway.name",
    "gateway.nodeName",
    "gateway.region",
    "gateway.primaryUrl",
    "gateway.port",
    "gateway.bind",
    "gateway.advertise",
    "gateway.authToken",
    "gateway.syncInterval",
    "gateway.remote.enabled",
    "gateway.remote.listenPort",
    "gateway.remote.authToken",
    "gateway.remote.url",
    "gateway.remote.token",
    "gateway.remote.tlsFingerprint",
    "gateway.remote.tls.enabled",
    "gateway.remote.tls.cert",
    "gateway.remote.tls.key",
    "gateway.tls.enabled",
    "gateway.tls.cert",
    "gateway.tls.key",
    "gateway.tls.auto",
    "gateway.auth.mode",
    "gateway.auth.token",
    "gateway.auth.password",
    "gateway.auth.allowTailscale",
    "gateway.auth.tailscale.nodeTags",
    "gateway.auth.tailscale.nodeUsers",
    "gateway.auth.tailscale.operatorUsers",
    "gateway.auth.tailscale.operatorTags",
    "gateway.auth.tailscale.operatorScopes",
    "gateway.auth.tailscale.recheckInterval",
    "gateway.sync.interval",
    "gateway.sync.syncModels",
    "gateway.sync.syncSkills",
    "gateway.sync.syncSecurity",
    "gateway.sync.overrideLocal",
    "gateway.sync.compression",
    "gateway.sync.deltaSync",
    "gateway.sync.batchSize",
    "gateway.federation.voters",
    "gateway.federation.maxVoters",
    "gateway.federation.writeTimeout",
    "gateway.federation.snapshotEvery",
    "gateway.federation.keepLog",
    "gateway.federation.heartbeat",
    "gateway.discovery.mdns",
    "gateway.discovery.tailnet",
    "gateway.discovery.tailnetTags",
    "gateway.discovery.tailnetHosts",
    "gateway.discovery.tailnetSocket",
    "gateway.upstream.url",
    "gateway.upstream.token",
    "gateway.upstream.tlsFingerprint",
    "gateway.upstream.nodes",
    "gateway.upstream.autoApprove",
    "gateway.failover.enabled",
    "gateway.failover.healthCheckInterval",
    "gateway.failover.unhealthyThreshold",
    "gateway.failover.fallbackNode",
    "gateway.localProviders.*",
    "gateway.localChannels.*",
    "gateway.nodes.*",
    "gateway.tailscale.*",
    "logging.level",
    "logging.remote.enabled",
    "logging.remote.endpoint",
    "logging.remote.batchInterval",
    "logging.spool.maxBytes",
    "logging.spool.maxAge",
    "logging.spool.retainAcked",
    "logging.store.maxBytes",
    "logging.store.maxAge",
    "node.name",
    "node.gateways",
    "node.labels.*",
    "node.security",
    "models.*",
    "skills.*",
    "security.*",
    "channels.*",
    "agents.*",
];

/// The parsed config file.
#[derive(Debug, Clone, Default)]
pub struct FileConfig {
    /// Where it was read from (None when absent).
    pub path: Option<PathBuf>,
    root: Value,
    /// Unknown keys, as dotted paths, for a warning at start.
    pub unknown: Vec<String>,
}

impl FileConfig {
    /// Reads `<dir>/clawmesh.json`; a missing file is an empty config.
    pub fn load(dir: &Path) -> Result<FileConfig> {
        let path = dir.join(crate::state_dir::CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
            Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
        };
        Self::parse(&text, Some(path))
    }

    /// Parses config text.
    pub fn parse(text: &str, path: Option<PathBuf>) -> Result<FileConfig> {
        let shown = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        let mut root: Value =
            serde_json::from_str(text).with_context(|| format!("{shown} is not valid JSON"))?;
        if !root.is_object() {
            bail!("{shown}: the top level must be a JSON object");
        }
        substitute_env(&mut root, "").with_context(|| format!("in {shown}"))?;
        for (key, value) in dotted_leaves(&root) {
            crate::config_schema::check(&key, &value).map_err(|e| anyhow!("{shown}: {e}"))?;
        }
        let mut unknown = Vec::new();
        collect_unknown(&root, "", &mut unknown);
        Ok(FileConfig {
            path,
            root,
            unknown,
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        let mut v = &self.root;
        for part in key.split('.') {
            v = v.get(part)?;
        }
        (!v.is_null()).then_some(v)
    }

    fn type_error(&self, key: &str, want: &str, got: &Value) -> anyhow::Error {
        let shown = self
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        anyhow!("{shown}: {key} must be {want}, got {got}")
    }

    /// Every leaf of the file (a value that is not an object) as a dotted key, in key order:
    /// the local side of `config show --effective`.
    pub fn leaves(&self) -> std::collections::BTreeMap<String, Value> {
        let mut out = dotted_leaves(&self.root);
        out.retain(|k, v| {
            !v.is_null() && *v != Value::Object(Default::default()) && k != "$schema"
        });
        out
    }

    /// A string value.
    pub fn str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.type_error(key, "a string", v)),
        }
    }

    /// A non-negative integer value.
    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(v) => Err(self.type_error(key, "a non-negative integer", v)),
        }
    }

    /// A boolean value.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_error(key, "true or false", v)),
        }
    }

    /// A list of strings.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.type_error(key, "a list of strings", v)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(v) => Err(self.type_error(key, "a list of strings", v)),
        }
    }

    /// The first of several keys that is set (aliases such as `gateway.authToken` and
    /// `gateway.remote.authToken`).
    pub fn first_str(&self, keys: &[&str]) -> Result<Option<String>> {
        for k in keys {
            if let Some(v) = self.str(k)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The first of several integer keys that is set.
    pub fn first_u64(&self, keys: &[&str]) -> Result<Option<u64>> {
        for k in keys {
            if let Some(v) = self.u64(k)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

fn is_known(path: &str) -> bool {
    KNOWN_KEYS.iter().any(|k| {
        if let Some(prefix) = k.strip_suffix(".*") {
            path == prefix || path.starts_with(&format!("{prefix}."))
        } else {
            *k == path
        }
    })
}

fn is_known_prefix(path: &str) -> bool {
    KNOWN_KEYS.iter().any(|k| {
        let k = k.strip_suffix(".*").unwrap_or(k);
        k.starts_with(&format!("{path}."))
    })
}

fn collect_unknown(v: &Value, prefix: &str, out: &mut Vec<String>) {
    let Value::Object(map) = v else { return };
    for (k, child) in map {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if is_known(&path) {
            continue;
        }
        if child.is_object() && is_known_prefix(&path) {
            collect_unknown(child, &path, out);
        } else {
            out.push(path);
        }
    }
}

fn substitute_env(v: &mut Value, path: &str) -> Result<()> {
    match v {
        Value::String(s) => {
            let t = s.trim();
            if let Some(name) = t.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")) {
                let name = name.trim();
                match std::env::var(name) {
                    Ok(val) => *s = val,
                    Err(_) => bail!("{path} refers to {{{{{name}}}}}, but the environment variable {name} is not set"),
                }
            }
        }
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                substitute_env(child, &p)?;
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                substitute_env(child, &format!("{path}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Every leaf of a JSON document as a dotted key (`{"models":{"default":"m"}}` gives
/// `models.default`), in key order. A leaf is any value but a non-empty object: arrays, null
/// and `{}` are values of their own.
pub fn dotted_leaves(value: &Value) -> std::collections::BTreeMap<String, Value> {
    fn walk(v: &Value, prefix: &str, out: &mut std::collections::BTreeMap<String, Value>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(v, &key, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(value, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seed_keys_are_known_and_unknown_keys_reported() {
        let c = FileConfig::parse(
            r#"{"gateway":{"mode":"remote","primaryUrl":"https://p:3100","nodeName":"remote-beijing",
                "authToken":"t","syncInterval":30000,
                "failover":{"enabled":true,"healthCheckInterval":10000,"unhealthyThreshold":3,"fallbackNode":"primary"},
                "sync":{"compression":true,"deltaSync":true,"batchSize":100,"overrideLocal":false},
                "localProviders":{"qianfan":{"type":"openai"}},
                "remote":{"authToken":"x","tls":{"enabled":true,"cert":"/c","key":"/k"}},
                "bogus":1, "failover2": {"x":1}},
              "logging":{"remote":{"enabled":true,"batchInterval":5000,"typo":1}},
              "misc":{"a":1}}"#,
            None,
        )
        .unwrap();
        let mut u = c.unknown.clone();
        u.sort();
        assert_eq!(
            u,
            vec![
                "gateway.bogus",
                "gateway.failover2",
                "logging.remote.typo",
                "misc"
            ]
        );
        assert_eq!(c.str("gateway.mode").unwrap().as_deref(), Some("remote"));
        assert_eq!(
            c.u64("gateway.failover.unhealthyThreshold").unwrap(),
            Some(3)
        );
        assert!(c.u64("gateway.mode").is_err());
        assert_eq!(
            c.first_str(&["gateway.nodeName", "gateway.name"])
                .unwrap()
                .as_deref(),
            Some("remote-beijing")
        );
    }

    #[test]
    fn shipped_deploy_configs_are_clean() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy");
        for name in ["tokyo", "beijing", "frankfurt"] {
            let path = dir.join(format!("{name}.clawmesh.json"));
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replace("{{CLAWMESH_TOKEN}}", "t");
            let cfg = FileConfig::parse(&text, Some(path.clone())).unwrap();
            assert!(
                cfg.unknown.is_empty(),
                "{}: {:?}",
                path.display(),
                cfg.unknown
            );
        }
    }

    #[test]
    fn files_flatten_to_dotted_keys() {
        let out = dotted_leaves(&json!({"models":{"default":"m","p":{"x":[1,2]}},"e":{}}));
        assert_eq!(out["models.default"], json!("m"));
        assert_eq!(out["models.p.x"], json!([1, 2]));
        assert_eq!(out["e"], json!({}));
    }

    #[test]
    fn env_placeholders() {
        std::env::set_var("CLAWMESH_TEST_SECRET_X", "s3cret");
        let c = FileConfig::parse(
            r#"{"gateway":{"authToken":"{{CLAWMESH_TEST_SECRET_X}}"}}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            c.str("gateway.authToken").unwrap().as_deref(),
            Some("s3cret")
        );
        let e = FileConfig::parse(
            r#"{"gateway":{"authToken":"{{CLAWMESH_NOPE_NOT_SET}}"}}"#,
            None,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("CLAWMESH_NOPE_NOT_SET"));
        assert!(FileConfig::parse("[1]", None).is_err());
        assert!(FileConfig::parse("{", None).is_err());
    }
}
