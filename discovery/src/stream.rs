//! One stream of candidates from every enabled source, each tagged with its source: static
//! URLs first, then mDNS and tailnet changes as they happen, on one bounded channel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::candidate::{Candidate, Source};
use crate::fedid::FederationId;
use crate::mdns::{BrowseEvent, Mdns, MdnsError};
use crate::tailnet::{self, TailnetConfig, TailnetEvent, TailnetState};

/// Events queued between the sources and the consumer. Sources wait (never drop) when it is
/// full; 64 covers a LAN's worth of advertisements arriving at once.
const QUEUE: usize = 64;

/// A change in what discovery sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A candidate appeared or changed.
    Found(Box<Candidate>),
    /// A candidate is gone (withdrawn advertisement, tailnet peer offline).
    Lost {
        /// Its source.
        source: Source,
        /// Its [`Candidate::id`].
        id: String,
    },
}

/// What to discover from.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryConfig {
    /// Operator-given candidates, reported first.
    pub statics: Vec<Candidate>,
    /// Browse mDNS with this daemon.
    pub mdns: Option<Mdns>,
    /// Poll the tailnet.
    pub tailnet: Option<TailnetConfig>,
    /// Keep only mDNS candidates advertising this federation (others are counted).
    pub federation: Option<FederationId>,
    /// Our own device key: our own advertisement is not a candidate.
    pub own_key: Option<String>,
}

/// Errors starting discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// mDNS could not start browsing.
    #[error(transparent)]
    Mdns(#[from] MdnsError),
}

/// Running discovery: its tasks stop when this is dropped or the receiver is dropped.
#[derive(Debug)]
pub struct Discovery {
    tasks: Vec<JoinHandle<()>>,
    tailnet_state: watch::Receiver<TailnetState>,
    other_federation: Arc<AtomicU64>,
}

impl Discovery {
    /// Starts every configured source; events arrive on the returned receiver.
    pub fn start(
        config: DiscoveryConfig,
    ) -> Result<(Discovery, mpsc::Receiver<Event>), DiscoveryError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (state_tx, state_rx) = watch::channel(TailnetState::Unknown);
        let other_federation = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();

        let statics = config.statics.clone();
        let static_tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            for c in statics {
                if static_tx.send(Event::Found(Box::new(c))).await.is_err() {
                    return;
                }
            }
        }));

        if let Some(mdns) = &config.mdns {
            let mut browser = mdns.browse()?;
            let tx = tx.clone();
            let fed = config.federation.clone();
            let own = config.own_key.clone();
            let counter = other_federation.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(ev) = browser.next().await {
                    let out = match ev {
                        BrowseEvent::Found(c) => {
                            if own.is_some() && c.device_key == own {
                                continue;
                            }
                            if let Some(f) = &fed {
                                if !c.in_federation(f) || c.federation_id.is_none() {
                                    counter.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(instance = %c.id, fed = ?c.federation_id, "mDNS: another federation's gateway, ignored");
                                    continue;
                                }
                            }
                            Event::Found(c)
                        }
                        BrowseEvent::Lost(id) => Event::Lost {
                            source: Source::Mdns,
                            id,
                        },
                    };
                    if tx.send(out).await.is_err() {
                        return;
                    }
                }
            }));
        }

        if let Some(tn) = config.tailnet {
            let (ttx, mut trx) = mpsc::channel(QUEUE);
            tasks.push(tokio::spawn(tailnet::poll(tn, ttx, state_tx)));
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(ev) = trx.recv().await {
                    let out = match ev {
                        TailnetEvent::Found(c) => Event::Found(c),
                        TailnetEvent::Lost(id) => Event::Lost {
                            source: Source::Tailnet,
                            id,
                        },
                    };
                    if tx.send(out).await.is_err() {
                        return;
                    }
                }
            }));
        }

        Ok((
            Discovery {
                tasks,
                tailnet_state: state_rx,
                other_federation,
            },
            rx,
        ))
    }

    /// The tailnet's current state (`Unknown` when tailnet discovery is off).
    pub fn tailnet_state(&self) -> TailnetState {
        self.tailnet_state.borrow().clone()
    }

    /// A receiver that changes whenever the tailnet state does.
    pub fn watch_tailnet(&self) -> watch::Receiver<TailnetState> {
        self.tailnet_state.clone()
    }

    /// mDNS advertisements of other federations seen and ignored so far.
    pub fn other_federation_seen(&self) -> u64 {
        self.other_federation.load(Ordering::Relaxed)
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
