//! Tailnet-backed admission (`gateway.auth.allowTailscale`): a node or operator that connects
//! from a tailnet address is looked up with tailscaled's LocalAPI `whois` on the connection's
//! own source `ip:port`, and its tailnet identity (tags, or the owning user's login) is matched
//! against the federation's policy (`gateway.auth.tailscale.*`).
//!
//! - Only whois on the real source address counts: no header or client field is ever read for
//!   identity (a forged `tailscale-user-login` is just another header).
//! - A tagged device's `LoginName` is the pseudo-user `tagged-devices`; it never counts as a
//!   user. Taggedness comes from `Node.Tags`, as tailscale itself decides it.
//! - Fails closed: tailscaled unreachable, logged out, whois 404 or slow means "the tailnet does
//!   not vouch", and the device takes the normal pending path with the reason shown.
//! - One tailnet node binds one device key: the same node showing another key waits for an
//!   operator.
//! - Revocation follows the tailnet: attached devices the tailnet admitted are looked up again
//!   every `recheckInterval`; one whose identity stops matching is revoked and disconnected.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use clawmesh_discovery::localapi::{LocalApi, LocalApiError, WhoIs};
use clawmesh_discovery::tsaddr;
use clawmesh_federation::identity::PublicKey;
use clawmesh_federation::pairing::{
    DeviceMeta, PairedDevice, PairingError, Registry, APPROVED_BY_OPERATOR, APPROVED_BY_TAILSCALE,
};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::gateway::scopes;

/// Default re-check interval of tailnet-admitted devices: a removed tag or device disconnects
/// within a minute, while a gateway with thousands of tailnet nodes makes a few whois calls a
/// second at most.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(60);

/// Shortest and longest re-check intervals accepted: below 100 ms the loop would spin on
/// tailscaled; above a day revocation would no longer follow the tailnet in any useful sense.
const RECHECK_RANGE_MS: (u64, u64) = (100, 86_400_000);

/// One whois gets this long at admission: tailscaled answers from memory in milliseconds, so
/// 2 s means a wedged daemon, and a joining node should hear "pending" rather than hang.
const WHOIS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a whois answer is reused: a reconnect storm (hundreds of nodes after a gateway
/// restart) costs one whois per address per 10 s instead of one per connection. Short enough
/// that a tag change is seen within seconds at admission; the periodic re-check never uses the
/// cache.
const CACHE_TTL: Duration = Duration::from_secs(10);

/// A failure to reach tailscaled is remembered only this long: the daemon may be back at once,
/// but a storm against a dead socket should not open thousands of connections.
const CACHE_TTL_DOWN: Duration = Duration::from_secs(1);

/// Most cached addresses: far above one gateway's tailnet peers; a flood from many source
/// addresses cannot grow the cache without bound (expired entries go first, then the oldest).
const CACHE_MAX: usize = 4096;

/// Most whois calls in flight at once: tailscaled's socket serves them one by one anyway; the
/// rest wait for a slot (each bounded by [`WHOIS_TIMEOUT`]).
const MAX_CONCURRENT_WHOIS: usize = 16;

/// The shared-config keys of the policy.
pub const POLICY_KEYS: &[&str] = &[
    "gateway.auth.allowTailscale",
    "gateway.auth.tailscale.nodeTags",
    "gateway.auth.tailscale.nodeUsers",
    "gateway.auth.tailscale.operatorUsers",
    "gateway.auth.tailscale.operatorTags",
    "gateway.auth.tailscale.operatorScopes",
    "gateway.auth.tailscale.recheckInterval",
];

/// Who the tailnet may admit (`gateway.auth.allowTailscale` and `gateway.auth.tailscale.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailnetPolicy {
    /// `allowTailscale`: off means no whois is ever made.
    pub allow: bool,
    /// Tags whose devices are admitted as nodes (`tag:clawmesh-node`).
    pub node_tags: Vec<String>,
    /// Users whose (untagged) devices are admitted as nodes.
    pub node_users: Vec<String>,
    /// Users admitted as operators without a token.
    pub operator_users: Vec<String>,
    /// Tags whose devices are admitted as operators without a token.
    pub operator_tags: Vec<String>,
    /// Scopes such operators get (default `operator.read`).
    pub operator_scopes: Vec<String>,
    /// How often attached tailnet-admitted devices are looked up again.
    pub recheck: Duration,
}

impl Default for TailnetPolicy {
    fn default() -> Self {
        TailnetPolicy {
            allow: false,
            node_tags: Vec::new(),
            node_users: Vec::new(),
            operator_users: Vec::new(),
            operator_tags: Vec::new(),
            operator_scopes: vec![scopes::READ.to_string()],
            recheck: DEFAULT_RECHECK,
        }
    }
}

impl TailnetPolicy {
    /// The policy from a key lookup (the effective config, or `clawmesh.json`); a key of the
    /// wrong type keeps its default and is reported in the returned warnings.
    pub fn from_lookup(get: impl Fn(&str) -> Option<Value>) -> (TailnetPolicy, Vec<String>) {
        let mut p = TailnetPolicy::default();
        let mut warnings = Vec::new();
        let strings = |key: &str, warnings: &mut Vec<String>| -> Option<Vec<String>> {
            let v = get(key)?;
            match v.as_array().map(|a| {
                a.iter()
                    .map(|x| x.as_str().map(|s| s.trim().to_string()))
                    .collect::<Option<Vec<String>>>()
            }) {
                Some(Some(list)) => Some(list),
                _ => {
                    warnings.push(format!("{key} must be a list of strings, not {v}"));
                    None
                }
            }
        };
        match get("gateway.auth.allowTailscale") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => p.allow = b,
            Some(other) => warnings.push(format!(
                "gateway.auth.allowTailscale must be true or false, not {other}"
            )),
        }
        if let Some(v) = strings("gateway.auth.tailscale.nodeTags", &mut warnings) {
            p.node_tags = v;
        }
        if let Some(v) = strings("gateway.auth.tailscale.nodeUsers", &mut warnings) {
            p.node_users = v;
        }
        if let Some(v) = strings("gateway.auth.tailscale.operatorUsers", &mut warnings) {
            p.operator_users = v;
        }
        if let Some(v) = strings("gateway.auth.tailscale.operatorTags", &mut warnings) {
            p.operator_tags = v;
        }
        if let Some(v) = strings("gateway.auth.tailscale.operatorScopes", &mut warnings) {
            let (known, unknown): (Vec<String>, Vec<String>) = v
                .into_iter()
                .partition(|s| scopes::ALL.contains(&s.as_str()));
            if !unknown.is_empty() {
                warnings.push(format!(
                    "gateway.auth.tailscale.operatorScopes: unknown scopes {unknown:?} ignored"
                ));
            }
            p.operator_scopes = known;
        }
        if let Some(v) = get("gateway.auth.tailscale.recheckInterval") {
            match v.as_u64() {
                Some(ms) if (RECHECK_RANGE_MS.0..=RECHECK_RANGE_MS.1).contains(&ms) => {
                    p.recheck = Duration::from_millis(ms)
                }
                _ => warnings.push(format!(
                    "gateway.auth.tailscale.recheckInterval must be {} to {} ms, not {v}",
                    RECHECK_RANGE_MS.0, RECHECK_RANGE_MS.1
                )),
            }
        }
        (p, warnings)
    }

    fn matches(tags: &[String], users: &[String], id: &TailnetIdentity) -> bool {
        match &id.login {
            // A tagged device: only its tags count, never its pseudo-user.
            None => id.tags.iter().any(|t| tags.contains(t)),
            Some(login) => users.iter().any(|u| u.eq_ignore_ascii_case(login)),
        }
    }

    /// Whether the tailnet identity may be a node.
    pub fn admits_node(&self, id: &TailnetIdentity) -> bool {
        self.allow && Self::matches(&self.node_tags, &self.node_users, id)
    }

    /// The scopes an operator with this identity gets, if the policy admits it: the policy's
    /// scopes, narrowed to `requested` when the client asked for particular ones.
    pub fn operator_scopes(
        &self,
        id: &TailnetIdentity,
        requested: &[String],
    ) -> Option<Vec<String>> {
        if !self.allow || !Self::matches(&self.operator_tags, &self.operator_users, id) {
            return None;
        }
        if requested.is_empty() {
            return Some(self.operator_scopes.clone());
        }
        Some(
            requested
                .iter()
                .filter(|r| scopes::satisfies(&self.operator_scopes, r))
                .cloned()
                .collect(),
        )
    }
}

/// What whois says about a connection, reduced to what admission needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailnetIdentity {
    /// The owning user's login; `None` for a tagged device (its `tagged-devices` pseudo-user
    /// is not a user).
    pub login: Option<String>,
    /// Control-approved tags.
    pub tags: Vec<String>,
    /// MagicDNS name without the trailing dot (`node-sg-1.example.ts.net`).
    pub node: String,
    /// Stable node id (`n...CNTRL`), what binds a device key.
    pub node_id: String,
    /// The tailnet address the connection came from.
    pub ip: IpAddr,
}

impl TailnetIdentity {
    fn from_whois(w: &WhoIs, ip: IpAddr) -> TailnetIdentity {
        let tags = w.node.tags.clone().unwrap_or_default();
        let login = (!w.node.is_tagged()
            && !w.user_profile.login_name.is_empty()
            && w.user_profile.login_name != "tagged-devices")
            .then(|| w.user_profile.login_name.clone());
        let node_id = if w.node.stable_id.is_empty() {
            w.node.id.to_string()
        } else {
            w.node.stable_id.clone()
        };
        TailnetIdentity {
            login,
            tags,
            node: w.node.name.trim_end_matches('.').to_string(),
            node_id,
            ip,
        }
    }

    /// As kept in the pairing record and shown by `devices list` / `nodes status`.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"node": self.node, "nodeId": self.node_id, "ip": self.ip.to_string()});
        match &self.login {
            Some(l) => v["login"] = json!(l),
            None => v["tags"] = json!(self.tags),
        }
        v
    }

    /// One line for logs and reasons: `tag:a,tag:b on node (ip)` or `user on node (ip)`.
    pub fn describe(&self) -> String {
        let who = match &self.login {
            Some(l) => l.clone(),
            None => self.tags.join(","),
        };
        format!("{who} on {} ({})", self.node, self.ip)
    }
}

/// The outcome of a whois for one source address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The tailnet knows the address.
    Identity(TailnetIdentity),
    /// tailscaled answered, and the address is not a node of the tailnet (whois 404 while
    /// running): a device removed from the tailnet.
    NotInTailnet(String),
    /// tailscaled cannot vouch: unreachable, logged out, refusing, slow.
    Unavailable(String),
}

impl Lookup {
    /// Why the tailnet did not vouch, for a pending request (`None` for an identity).
    pub fn failure(&self) -> Option<&str> {
        match self {
            Lookup::Identity(_) => None,
            Lookup::NotInTailnet(r) | Lookup::Unavailable(r) => Some(r),
        }
    }
}

/// What the tailnet decides about a connecting node.
#[derive(Debug)]
pub enum NodeVerdict {
    /// Not a tailnet matter (policy off, not a tailnet address, or already paired and still
    /// vouched for): the normal pairing path decides.
    Normal,
    /// Paired now by the tailnet: share the record with the federation and let it in.
    Approved(Box<PairedDevice>),
    /// The tailnet admitted it once and no longer vouches: revoked now (share the record);
    /// it waits as pending with `reason`.
    Revoked(String),
    /// Waits for an operator, with why and what the tailnet said.
    Pending {
        /// Shown in `devices list`.
        reason: String,
        /// The identity whois gave, if any.
        tailnet: Option<Value>,
    },
}

/// The tailnet admission service of one gateway: its policy, tailscaled's LocalAPI and the
/// whois cache.
pub struct TailnetAuth {
    api: LocalApi,
    policy: RwLock<TailnetPolicy>,
    cache: Mutex<HashMap<IpAddr, (Instant, Lookup)>>,
    slots: Semaphore,
}

impl TailnetAuth {
    /// A service asking tailscaled at `api`, with `policy` until the shared config says more.
    pub fn new(api: LocalApi, policy: TailnetPolicy) -> TailnetAuth {
        TailnetAuth {
            api,
            policy: RwLock::new(policy),
            cache: Mutex::new(HashMap::new()),
            slots: Semaphore::new(MAX_CONCURRENT_WHOIS),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> TailnetPolicy {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the policy; true if it changed. Cached answers stay valid (they are facts
    /// about the tailnet, not decisions).
    pub fn set_policy(&self, p: TailnetPolicy) -> bool {
        let mut cur = self.policy.write().unwrap_or_else(|p| p.into_inner());
        if *cur == p {
            return false;
        }
        *cur = p;
        true
    }

    /// Whether a connection from `remote` is the tailnet's to judge: the policy is on and the
    /// address is in tailscale's ranges.
    pub fn applies(&self, remote: &SocketAddr) -> bool {
        self.policy().allow && tsaddr::is_tailnet(&remote.ip())
    }

    /// whois for a connection's source, through the cache; `None` when the tailnet has no say
    /// ([`TailnetAuth::applies`] is false).
    pub async fn lookup(&self, remote: SocketAddr) -> Option<Lookup> {
        if !self.applies(&remote) {
            return None;
        }
        let ip = remote.ip().to_canonical();
        if let Some((at, l)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
        {
            let ttl = match l {
                Lookup::Unavailable(_) => CACHE_TTL_DOWN,
                _ => CACHE_TTL,
            };
            if at.elapsed() < ttl {
                return Some(l.clone());
            }
        }
        Some(self.lookup_fresh(remote).await)
    }

    /// whois for `remote` now, bypassing the cache (the periodic re-check), and remembers it.
    pub async fn lookup_fresh(&self, remote: SocketAddr) -> Lookup {
        let ip = remote.ip().to_canonical();
        let l = self.whois(SocketAddr::new(ip, remote.port())).await;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX && !cache.contains_key(&ip) {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                if let Some(oldest) = cache.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k) {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(ip, (Instant::now(), l.clone()));
        l
    }

    async fn whois(&self, remote: SocketAddr) -> Lookup {
        let Ok(_slot) = self.slots.acquire().await else {
            return Lookup::Unavailable("tailnet admission is shutting down".into());
        };
        let r = tokio::time::timeout(WHOIS_TIMEOUT, self.api.whois(remote)).await;
        match r {
            Ok(Ok(w)) => Lookup::Identity(TailnetIdentity::from_whois(&w, remote.ip())),
            Ok(Err(LocalApiError::PeerNotFound)) => {
                // A 404 also means "no netmap": tell a logged-out daemon from a stranger.
                match tokio::time::timeout(WHOIS_TIMEOUT, self.api.status()).await {
                    Ok(Ok(st)) if st.backend_state != "Running" => Lookup::Unavailable(format!(
                        "tailscaled is {} (not logged in): the tailnet cannot vouch for {}",
                        st.backend_state,
                        remote.ip()
                    )),
                    _ => Lookup::NotInTailnet(format!(
                        "tailscale whois: {} is not a node of the tailnet",
                        remote.ip()
                    )),
                }
            }
            Ok(Err(e @ LocalApiError::NotRunning { .. })) => {
                Lookup::Unavailable(format!("tailscaled unreachable: {e}"))
            }
            Ok(Err(e)) => Lookup::Unavailable(format!("tailscale whois failed: {e}")),
            Err(_) => {
                Lookup::Unavailable(format!("tailscale whois timed out after {WHOIS_TIMEOUT:?}"))
            }
        }
    }

    /// Decides on a node with device `key` given the whois `lookup` of its connection
    /// (`None`: not the tailnet's to judge). Pairs it at once when the identity matches the
    /// node policy and no other key holds that tailnet node; revokes a tailnet admission whose
    /// identity stopped matching. Runs off the async workers (it writes the state database).
    pub fn decide_node(
        &self,
        pairing: &Registry,
        key: &PublicKey,
        meta: &DeviceMeta,
        lookup: Option<&Lookup>,
    ) -> Result<NodeVerdict, PairingError> {
        let Some(lookup) = lookup else {
            return Ok(NodeVerdict::Normal);
        };
        let policy = self.policy();
        let paired = pairing.paired(key)?.filter(|p| p.role == meta.role);
        if let Some(p) = &paired {
            if p.approved_by != APPROVED_BY_TAILSCALE {
                return Ok(NodeVerdict::Normal);
            }
            let reason = match lookup {
                Lookup::Identity(id) if policy.admits_node(id) => return Ok(NodeVerdict::Normal),
                Lookup::Identity(id) => format!(
                    "the tailnet no longer vouches: {} is not allowed by gateway.auth.tailscale.nodeTags/nodeUsers",
                    id.describe()
                ),
                Lookup::NotInTailnet(r) => r.clone(),
                // The daemon cannot say either way: the key binding made at admission stands
                // (revocation needs the tailnet's word; new admissions fail closed).
                Lookup::Unavailable(_) => return Ok(NodeVerdict::Normal),
            };
            pairing.revoke_tailnet(key, &reason)?;
            return Ok(NodeVerdict::Revoked(reason));
        }
        let id = match lookup {
            Lookup::Identity(id) => id,
            other => {
                return Ok(NodeVerdict::Pending {
                    reason: other.failure().unwrap_or_default().to_string(),
                    tailnet: None,
                })
            }
        };
        let tailnet = Some(id.to_json());
        if !policy.admits_node(id) {
            return Ok(NodeVerdict::Pending {
                reason: format!(
                    "tailnet identity {} is not allowed by gateway.auth.tailscale.nodeTags/nodeUsers",
                    id.describe()
                ),
                tailnet,
            });
        }
        if let Some((by, why)) = pairing.revocation(key)? {
            if by == APPROVED_BY_OPERATOR {
                return Ok(NodeVerdict::Pending {
                    reason: format!("{why}; only an operator can approve it again"),
                    tailnet,
                });
            }
        }
        if let Some(bound) = pairing.tailnet_binding(&id.node_id)? {
            if bound.public_key != key.to_base64url() {
                warn!(
                    tailnet = %id.describe(),
                    bound = %bound.device_id,
                    device = %key.device_id(),
                    "tailnet node already bound to another device key; this key waits for an operator"
                );
                return Ok(NodeVerdict::Pending {
                    reason: format!(
                        "tailnet node {} is bound to device {} ({}); a different key needs an operator's approval",
                        id.node,
                        &bound.device_id[..16.min(bound.device_id.len())],
                        bound.name
                    ),
                    tailnet,
                });
            }
        }
        let device = pairing.approve_tailnet(key, meta, &id.to_json())?;
        Ok(NodeVerdict::Approved(Box::new(device)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(login: Option<&str>, tags: &[&str]) -> TailnetIdentity {
        TailnetIdentity {
            login: login.map(str::to_string),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            node: "n.example.ts.net".into(),
            node_id: "nX".into(),
            ip: "100.64.0.9".parse().unwrap(),
        }
    }

    fn policy(v: Value) -> TailnetPolicy {
        let (p, w) = TailnetPolicy::from_lookup(|k| {
            let mut cur = &v;
            for part in k.split('.') {
                cur = cur.get(part)?;
            }
            Some(cur.clone())
        });
        assert!(w.is_empty(), "{w:?}");
        p
    }

    #[test]
    fn policy_matches_tags_and_users_never_the_tagged_pseudo_user() {
        let p = policy(
            json!({"gateway": {"auth": {"allowTailscale": true, "tailscale": {
                "nodeTags": ["tag:clawmesh-node"], "nodeUsers": ["alice@example.com", "tagged-devices"],
                "operatorUsers": ["ops@example.com"], "operatorScopes": ["operator.read", "operator.write"],
                "recheckInterval": 500,
            }}}}),
        );
        assert_eq!(p.recheck, Duration::from_millis(500));
        assert!(p.admits_node(&id(None, &["tag:clawmesh-node"])));
        assert!(!p.admits_node(&id(None, &["tag:other"])));
        assert!(p.admits_node(&id(Some("Alice@example.com"), &[])));
        assert!(!p.admits_node(&id(Some("bob@example.com"), &[])));
        // Even listed, `tagged-devices` is not a user: a tagged device has no login.
        assert!(!p.admits_node(&id(None, &[])));
        assert_eq!(
            p.operator_scopes(&id(Some("ops@example.com"), &[]), &[]),
            Some(vec![
                "operator.read".to_string(),
                "operator.write".to_string()
            ])
        );
        assert_eq!(
            p.operator_scopes(
                &id(Some("ops@example.com"), &[]),
                &["operator.admin".into(), "operator.read".into()]
            ),
            Some(vec!["operator.read".to_string()])
        );
        assert_eq!(
            p.operator_scopes(&id(Some("alice@example.com"), &[]), &[]),
            None
        );
        let off = TailnetPolicy { allow: false, ..p };
        assert!(!off.admits_node(&id(None, &["tag:clawmesh-node"])));
    }

    #[test]
    fn bad_policy_values_keep_defaults_and_warn() {
        let (p, w) = TailnetPolicy::from_lookup(|k| match k {
            "gateway.auth.allowTailscale" => Some(json!("yes")),
            "gateway.auth.tailscale.nodeTags" => Some(json!("tag:x")),
            "gateway.auth.tailscale.recheckInterval" => Some(json!(5)),
            _ => None,
        });
        assert_eq!(p, TailnetPolicy::default());
        assert_eq!(w.len(), 3, "{w:?}");
    }

    #[test]
    fn whois_identity_of_fixtures() {
        let sg: WhoIs = serde_json::from_str(include_str!(
            "../../discovery/tests/fixtures/tailscale/whois-node-sg-1.json"
        ))
        .unwrap();
        let i = TailnetIdentity::from_whois(&sg, "100.64.0.20".parse().unwrap());
        assert_eq!(i.login, None, "tagged-devices is not a user");
        assert_eq!(i.tags, vec!["tag:clawmesh-node"]);
        assert!(i.node.starts_with("node-sg-1."));
        let alice: WhoIs = serde_json::from_str(include_str!(
            "../../discovery/tests/fixtures/tailscale/whois-laptop-alice.json"
        ))
        .unwrap();
        let i = TailnetIdentity::from_whois(&alice, "100.64.0.10".parse().unwrap());
        assert_eq!(i.login.as_deref(), Some("alice@example.com"));
        assert!(i.to_json().get("tags").is_none());
    }
}
