//! Tailnet discovery: poll tailscaled's status, pick the online peers selected by tag or host
//! name, and report them as candidates at their tailnet address on the federation port. A
//! daemon that is absent or logged out is a state with a clear line, polled with backoff.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::candidate::{Candidate, Source};
use crate::localapi::{LocalApi, LocalApiError, Status};
use crate::peer_url::PeerUrl;

/// How often a running tailnet is polled: changes (a peer going offline, a new tagged node)
/// show within this, and one local status call per 5 s costs tailscaled nothing noticeable.
pub const DEFAULT_POLL: Duration = Duration::from_secs(5);

/// The longest wait between polls while tailscaled is absent or logged out: the doubling
/// backoff stops here so a daemon that comes up is noticed within a minute.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Which peers of the tailnet are candidates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// ACL tags (`tag:clawmesh`): a peer carrying any of them is selected.
    pub tags: Vec<String>,
    /// Host names: a peer whose host name, MagicDNS label or MagicDNS name equals one of them
    /// (case-insensitively) is selected.
    pub hosts: Vec<String>,
}

impl Selector {
    /// Whether the selector names nothing, in which case every online peer is a candidate
    /// (discovery only says where to knock; the handshake decides).
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.hosts.is_empty()
    }
}

/// Tailnet discovery settings.
#[derive(Debug, Clone)]
pub struct TailnetConfig {
    /// The LocalAPI client (socket path).
    pub api: LocalApi,
    /// Which peers to select.
    pub selector: Selector,
    /// The federation port to dial on each peer.
    pub port: u16,
    /// Poll interval while running.
    pub poll: Duration,
}

/// What the tailnet looks like from here, for status lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailnetState {
    /// Not polled yet.
    Unknown,
    /// Running; `selected` of `online` online peers are candidates.
    Running {
        /// Candidates.
        selected: usize,
        /// Online peers.
        online: usize,
    },
    /// Logged out; `auth_url` is where to log in (may be empty).
    NeedsLogin {
        /// Login URL.
        auth_url: String,
    },
    /// tailscaled does not answer on its socket.
    NotRunning(String),
    /// Another backend state (`Stopped`, `NeedsMachineAuth`, `Starting`, ...).
    Other(String),
    /// The call failed otherwise (access denied, malformed answer).
    Error(String),
}

impl fmt::Display for TailnetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TailnetState::Unknown => f.write_str("tailnet: not checked yet"),
            TailnetState::Running { selected, online } => write!(
                f,
                "tailnet: running, {selected} of {online} online peers selected"
            ),
            TailnetState::NeedsLogin { auth_url } if auth_url.is_empty() => {
                f.write_str("tailnet: logged out (NeedsLogin); run `tailscale up`")
            }
            TailnetState::NeedsLogin { auth_url } => {
                write!(f, "tailnet: logged out (NeedsLogin); log in at {auth_url}")
            }
            TailnetState::NotRunning(e) => write!(f, "tailnet: {e}"),
            TailnetState::Other(s) => write!(f, "tailnet: tailscaled is {s}, no peers"),
            TailnetState::Error(e) => write!(f, "tailnet: {e}"),
        }
    }
}

/// The state a status answer or error puts us in.
pub fn state_of(result: &Result<Status, LocalApiError>, selected: usize) -> TailnetState {
    match result {
        Ok(s) if s.backend_state == "Running" => TailnetState::Running {
            selected,
            online: s
                .peer
                .as_ref()
                .map(|p| p.values().filter(|p| p.online).count())
                .unwrap_or(0),
        },
        Ok(s) if s.backend_state == "NeedsLogin" => TailnetState::NeedsLogin {
            auth_url: s.auth_url.clone(),
        },
        Ok(s) => TailnetState::Other(s.backend_state.clone()),
        Err(e @ LocalApiError::NotRunning { .. }) => TailnetState::NotRunning(e.to_string()),
        Err(e) => TailnetState::Error(e.to_string()),
    }
}

/// The candidates a status yields: online peers matching `selector`, at their first IPv4
/// tailnet address (else the first) on `port`, keyed by node key. Nothing unless `Running`.
pub fn select(status: &Status, selector: &Selector, port: u16) -> Vec<Candidate> {
    if status.backend_state != "Running" {
        return Vec::new();
    }
    let Some(peers) = &status.peer else {
        return Vec::new();
    };
    let wants = |p: &crate::localapi::PeerStatus| {
        if selector.is_empty() {
            return true;
        }
        let tagged = p
            .tags
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| selector.tags.contains(t));
        let named = selector.hosts.iter().any(|h| {
            h.eq_ignore_ascii_case(&p.host_name)
                || p.dns_label().is_some_and(|l| h.eq_ignore_ascii_case(l))
                || p.magic_dns_name()
                    .is_some_and(|n| h.trim_end_matches('.').eq_ignore_ascii_case(n))
        });
        tagged || named
    };
    peers
        .iter()
        .filter(|(_, p)| p.online && wants(p))
        .filter_map(|(key, p)| {
            let ip = p.dial_ip()?;
            let mut c = Candidate::new(
                Source::Tailnet,
                PeerUrl {
                    host: ip.to_string(),
                    port,
                },
            );
            c.id = key.clone();
            c.name = p
                .dns_label()
                .map(str::to_string)
                .or_else(|| (!p.host_name.is_empty()).then(|| p.host_name.clone()));
            c.dns_name = p.magic_dns_name().map(str::to_string);
            c.tags = p.tags.clone().unwrap_or_default();
            Some(c)
        })
        .collect()
}

/// A change seen by the poller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailnetEvent {
    /// A selected peer appeared or changed.
    Found(Box<Candidate>),
    /// A selected peer went offline, lost its tag, or left (its candidate id).
    Lost(String),
}

/// Polls tailscaled until `events` closes, sending changes and publishing the state. The first
/// poll is immediate; then every `config.poll` while running, and with doubling backoff (up to
/// a minute) while tailscaled is absent or not running, logging only when the state changes.
pub async fn poll(
    config: TailnetConfig,
    events: mpsc::Sender<TailnetEvent>,
    state: watch::Sender<TailnetState>,
) {
    let mut known: BTreeMap<String, Candidate> = BTreeMap::new();
    let mut backoff = config.poll;
    loop {
        let result = config.api.status().await;
        let now: BTreeMap<String, Candidate> = match &result {
            Ok(s) => select(s, &config.selector, config.port)
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let new_state = state_of(&result, now.len());
        let running = matches!(new_state, TailnetState::Running { .. });
        if *state.borrow() != new_state {
            if running {
                tracing::info!("{new_state}");
            } else {
                tracing::warn!("{new_state}");
            }
            state.send_replace(new_state);
        }
        for id in known.keys().filter(|id| !now.contains_key(*id)) {
            if events.send(TailnetEvent::Lost(id.clone())).await.is_err() {
                return;
            }
        }
        for (id, c) in &now {
            if known.get(id) != Some(c)
                && events
                    .send(TailnetEvent::Found(Box::new(c.clone())))
                    .await
                    .is_err()
            {
                return;
            }
        }
        known = now;
        let wait = if running {
            backoff = config.poll;
            config.poll
        } else {
            let w = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            w
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = events.closed() => return,
        }
    }
}
