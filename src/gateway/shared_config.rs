//! The federation's shared config as one gateway sees it: which synced keys it applies
//! (`gateway.sync.*`), how they meet its own `clawmesh.json` (`gateway.sync.overrideLocal`),
//! and the effective value of every key with where it came from.
//!
//! The shared config itself is replicated by the consensus
//! ([`clawmesh_federation::consensus::Replica`]): a document of dotted keys to JSON values,
//! each with the revision (raft log index) that last wrote it. This module only decides what a
//! gateway makes of it; it never writes.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{json, Value};

use crate::config::FileConfig;

/// Longest key accepted in the shared config.
pub const MAX_KEY_LEN: usize = 256;
/// Most dotted segments in a key.
pub const MAX_KEY_DEPTH: usize = 16;
/// Largest JSON value of one key (the whole write must also fit a raft entry).
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// The sections a remote can choose to apply (`gateway.sync.syncModels` / `syncSkills` /
/// `syncSecurity`); every other key is always applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `models.*`
    Models,
    /// `skills.*`
    Skills,
    /// `security.*`
    Security,
    /// Everything else (channels, agents, logging, failover, ...).
    Other,
}

impl Section {
    /// The section of a dotted key: its first segment.
    pub fn of(key: &str) -> Section {
        // The tailnet admission policy is security policy: a gateway that does not apply
        // synced security keys keeps its own.
        if is_tailnet_policy(key) {
            return Section::Security;
        }
        match key.split('.').next().unwrap_or_default() {
            "models" => Section::Models,
            "skills" => Section::Skills,
            "security" => Section::Security,
            _ => Section::Other,
        }
    }

    /// The section's name as shown.
    pub fn name(self) -> &'static str {
        match self {
            Section::Models => "models",
            Section::Skills => "skills",
            Section::Security => "security",
            Section::Other => "other",
        }
    }
}

/// What this gateway applies of the shared config (`gateway.sync.*` in its `clawmesh.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    /// Apply `models.*` (`syncModels`, default true).
    pub models: bool,
    /// Apply `skills.*` (`syncSkills`, default true).
    pub skills: bool,
    /// Apply `security.*` (`syncSecurity`, default true).
    pub security: bool,
    /// Synced keys win over this gateway's own keys (`overrideLocal`, default false: local
    /// keys win, for regional customization).
    pub override_local: bool,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy {
            models: true,
            skills: true,
            security: true,
            override_local: false,
        }
    }
}

impl SyncPolicy {
    /// Reads `gateway.sync.*` from the config file.
    pub fn from_file(file: &FileConfig) -> Result<SyncPolicy> {
        let d = SyncPolicy::default();
        Ok(SyncPolicy {
            models: file.bool("gateway.sync.syncModels")?.unwrap_or(d.models),
            skills: file.bool("gateway.sync.syncSkills")?.unwrap_or(d.skills),
            security: file
                .bool("gateway.sync.syncSecurity")?
                .unwrap_or(d.security),
            override_local: file
                .bool("gateway.sync.overrideLocal")?
                .unwrap_or(d.override_local),
        })
    }

    /// Whether keys of `section` are applied here; if not, the flag that excludes them.
    pub fn excludes(&self, section: Section) -> Option<&'static str> {
        match section {
            Section::Models if !self.models => Some("gateway.sync.syncModels is false"),
            Section::Skills if !self.skills => Some("gateway.sync.syncSkills is false"),
            Section::Security if !self.security => Some("gateway.sync.syncSecurity is false"),
            _ => None,
        }
    }

    /// As JSON, for `config show`.
    pub fn to_json(self) -> Value {
        json!({
            "syncModels": self.models,
            "syncSkills": self.skills,
            "syncSecurity": self.security,
            "overrideLocal": self.override_local,
        })
    }
}

/// Checks a key before it is written to the shared config: dotted segments of letters,
/// digits, `_` and `-`, and not one of the per-gateway keys (identity, addresses, secrets,
/// the sync policy itself), which only that gateway's `clawmesh.json` may set.
pub fn check_key(key: &str) -> std::result::Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "config keys are 1 to {MAX_KEY_LEN} characters, not {}",
            key.len()
        ));
    }
    let segments: Vec<&str> = key.split('.').collect();
    if segments.len() > MAX_KEY_DEPTH {
        return Err(format!(
            "config key {key:?} has more than {MAX_KEY_DEPTH} segments"
        ));
    }
    for s in &segments {
        if s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "config key {key:?}: segments are letters, digits, '_' and '-', separated by single dots"
            ));
        }
    }
    let per_gateway = match segments[0] {
        "gateway" => segments.get(1) != Some(&"failover") && !is_tailnet_policy(key),
        "node" | "$schema" => true,
        _ => false,
    };
    if per_gateway {
        return Err(format!(
            "{key} is per-gateway: set it in that gateway's clawmesh.json (of the gateway.* keys only gateway.failover.*, gateway.auth.allowTailscale and gateway.auth.tailscale.* are shared)"
        ));
    }
    Ok(())
}

/// Whether `key` is part of the tailnet admission policy (`gateway.auth.allowTailscale`,
/// `gateway.auth.tailscale.*`): shared, unlike the rest of `gateway.auth.*` (secrets).
pub fn is_tailnet_policy(key: &str) -> bool {
    key == "gateway.auth.allowTailscale" || key.starts_with("gateway.auth.tailscale.")
}

/// Whether a key holds a secret whose value `config show` must not print.
pub fn is_secret(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    last == "key"
        || ["token", "password", "apikey", "secret"]
            .iter()
            .any(|s| last.ends_with(s))
}

/// Where an effective value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// This gateway's `clawmesh.json`.
    Local,
    /// A command-line flag of this gateway (`gateway run --health-interval ...`).
    Flag,
    /// The shared config, written at this revision.
    Synced(u64),
}

impl Source {
    fn label(&self) -> String {
        match self {
            Source::Local => "file".into(),
            Source::Flag => "flag".into(),
            Source::Synced(r) => format!("synced r{r}"),
        }
    }
}

/// One key of the effective config.
#[derive(Debug, Clone)]
pub struct Effective {
    /// Dotted key.
    pub key: String,
    /// The value in force here.
    pub value: Value,
    /// Where it comes from.
    pub source: Source,
    /// The value it hides, if both sides set the key.
    pub shadowed: Option<(Source, Value)>,
}

/// A synced key this gateway does not apply, and why.
#[derive(Debug, Clone)]
pub struct Ignored {
    /// Dotted key.
    pub key: String,
    /// Its revision.
    pub revision: u64,
    /// Why (the sync flag).
    pub reason: &'static str,
}

/// The effective config: local keys and synced keys merged under `policy`.
pub fn effective(
    local: &BTreeMap<String, Value>,
    synced: &[(String, String, u64)],
    policy: SyncPolicy,
) -> (Vec<Effective>, Vec<Ignored>) {
    let mut out: BTreeMap<String, Effective> = local
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Effective {
                    key: k.clone(),
                    value: v.clone(),
                    source: Source::Local,
                    shadowed: None,
                },
            )
        })
        .collect();
    let mut ignored = Vec::new();
    for (key, text, revision) in synced {
        if let Some(reason) = policy.excludes(Section::of(key)) {
            ignored.push(Ignored {
                key: key.clone(),
                revision: *revision,
                reason,
            });
            continue;
        }
        // Values were checked as JSON before they were proposed; a value that still does not
        // parse is shown as text rather than hidden.
        let value: Value =
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()));
        let synced_src = Source::Synced(*revision);
        match out.get_mut(key) {
            Some(e) if policy.override_local => {
                let local = std::mem::replace(&mut e.value, value);
                e.shadowed = Some((Source::Local, local));
                e.source = synced_src;
            }
            Some(e) => e.shadowed = Some((synced_src, value)),
            None => {
                out.insert(
                    key.clone(),
                    Effective {
                        key: key.clone(),
                        value,
                        source: synced_src,
                        shadowed: None,
                    },
                );
            }
        }
    }
    (out.into_values().collect(), ignored)
}

/// Marks the local entries set by command-line flags as [`Source::Flag`] (also where they
/// shadow a synced value), so an operator sees that a flag pins the key on this gateway.
pub fn mark_flags(entries: &mut [Effective], flags: &std::collections::BTreeSet<String>) {
    for e in entries.iter_mut().filter(|e| flags.contains(&e.key)) {
        if e.source == Source::Local {
            e.source = Source::Flag;
        }
        if let Some((src @ Source::Local, _)) = &mut e.shadowed {
            *src = Source::Flag;
        }
    }
}

/// Hides a secret value for display.
pub fn shown(key: &str, value: &Value) -> Value {
    if is_secret(key) && !value.is_null() {
        Value::String("********".into())
    } else {
        value.clone()
    }
}

/// The effective config as JSON (secrets hidden).
pub fn effective_json(entries: &[Effective], ignored: &[Ignored]) -> Value {
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = json!({
                "key": e.key,
                "value": shown(&e.key, &e.value),
                "source": e.source.label(),
                "section": Section::of(&e.key).name(),
            });
            if let Source::Synced(r) = e.source {
                v["revision"] = json!(r);
            }
            if let Some((src, val)) = &e.shadowed {
                v["shadowed"] = json!({"source": src.label(), "value": shown(&e.key, val)});
            }
            v
        })
        .collect();
    let ignored: Vec<Value> = ignored
        .iter()
        .map(|i| json!({"key": i.key, "revision": i.revision, "reason": i.reason}))
        .collect();
    json!({"entries": entries, "notApplied": ignored})
}

/// The value in force for `key` (e.g. for components that follow the shared config live).
pub fn lookup<'a>(entries: &'a [Effective], key: &str) -> Option<&'a Effective> {
    entries
        .binary_search_by(|e| e.key.as_str().cmp(key))
        .ok()
        .map(|i| &entries[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn synced(rows: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
        rows.iter()
            .map(|(k, v, r)| (k.to_string(), v.to_string(), *r))
            .collect()
    }

    #[test]
    fn shipped_deploy_configs_have_valid_sync_policies() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy");
        for name in ["tokyo", "beijing", "frankfurt"] {
            let path = dir.join(format!("{name}.clawmesh.json"));
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replace("{{CLAWMESH_TOKEN}}", "t");
            let cfg = FileConfig::parse(&text, Some(path.clone())).unwrap();
            SyncPolicy::from_file(&cfg).unwrap();
        }
    }

    #[test]
    fn local_wins_unless_override() {
        let l = local(&[("models.default", json!("ernie-4.0"))]);
        let s = synced(&[("models.default", "\"gpt-5\"", 7), ("channels.x", "1", 8)]);
        let (e, ign) = effective(&l, &s, SyncPolicy::default());
        assert!(ign.is_empty());
        let m = lookup(&e, "models.default").unwrap();
        assert_eq!(m.value, json!("ernie-4.0"));
        assert_eq!(m.source, Source::Local);
        assert_eq!(m.shadowed, Some((Source::Synced(7), json!("gpt-5"))));
        assert_eq!(lookup(&e, "channels.x").unwrap().source, Source::Synced(8));

        let p = SyncPolicy {
            override_local: true,
            ..SyncPolicy::default()
        };
        let (e, _) = effective(&l, &s, p);
        let m = lookup(&e, "models.default").unwrap();
        assert_eq!(m.value, json!("gpt-5"));
        assert_eq!(m.source, Source::Synced(7));
        assert_eq!(m.shadowed, Some((Source::Local, json!("ernie-4.0"))));
    }

    #[test]
    fn sections_can_be_excluded() {
        let s = synced(&[
            ("models.default", "\"gpt-5\"", 3),
            ("skills.web", "true", 4),
            ("security.exec", "\"deny\"", 5),
            ("logging.level", "\"debug\"", 6),
        ]);
        let p = SyncPolicy {
            models: false,
            security: false,
            ..SyncPolicy::default()
        };
        let (e, ign) = effective(&BTreeMap::new(), &s, p);
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["logging.level", "skills.web"]);
        assert_eq!(ign.len(), 2);
        assert!(ign[0].reason.contains("syncModels"));
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("models.providers.openai.baseUrl").is_ok());
        assert!(check_key("gateway.failover.healthCheckInterval").is_ok());
        assert!(check_key("gateway.port")
            .unwrap_err()
            .contains("per-gateway"));
        assert!(check_key("gateway.sync.overrideLocal").is_err());
        // The tailnet admission policy is shared (as security); the rest of gateway.auth is not.
        assert!(check_key("gateway.auth.allowTailscale").is_ok());
        assert!(check_key("gateway.auth.tailscale.nodeTags").is_ok());
        assert!(check_key("gateway.auth.token").is_err());
        assert_eq!(
            Section::of("gateway.auth.tailscale.operatorUsers"),
            Section::Security
        );
        assert!(check_key("node.name").is_err());
        assert!(check_key("").is_err());
        assert!(check_key("a..b").is_err());
        assert!(check_key("a b").is_err());
        assert!(check_key(&"a.".repeat(20)).is_err());
        assert!(check_key(&"x".repeat(300)).is_err());
    }

    #[test]
    fn secrets_are_hidden() {
        assert!(is_secret("models.providers.qianfan.apiKey"));
        assert!(is_secret("channels.slack.token"));
        assert!(is_secret("gateway.authToken"));
        assert!(!is_secret("models.default"));
        assert!(!is_secret("skills.keyboard"));
        assert_eq!(shown("x.password", &json!("p")), json!("********"));
    }
}
