//! A node started without `--gateway` finds gateways with mDNS: the gateways of its own
//! federation when it has the join token (their federation id must match), else any clawmesh
//! gateway on the LAN (pairing approval on the gateway still decides whether it may attach).

use std::time::Duration;

use anyhow::Result;
use clawmesh_discovery::mdns::{Interfaces, Mdns};
use clawmesh_discovery::{Discovery, DiscoveryConfig, Event, FederationId, PeerUrl};
use tracing::info;

/// After the first gateway answers, others answering the same query arrive within a few
/// milliseconds; this short grace collects them as fallbacks without delaying the attach.
const GRACE: Duration = Duration::from_millis(300);

/// How often the node says it is still looking: a node waiting for a gateway to come up on
/// the LAN must not look hung, nor fill the log.
const REMIND: Duration = Duration::from_secs(30);

/// Waits until mDNS shows at least one gateway (of the token's federation, if a token is
/// given); returns their addresses, first found first.
pub async fn gateways(token: Option<&str>) -> Result<Vec<PeerUrl>> {
    let federation = token.map(FederationId::from_token);
    let mdns = Mdns::new(&Interfaces::All)?;
    let (d, mut rx) = Discovery::start(DiscoveryConfig {
        mdns: Some(mdns.clone()),
        federation: federation.clone(),
        ..Default::default()
    })?;
    match &federation {
        Some(f) => {
            info!(federation = %f, "no --gateway: looking for this federation's gateways with mDNS")
        }
        None => info!("no --gateway and no token: looking for any clawmesh gateway with mDNS"),
    }
    let mut found: Vec<PeerUrl> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let wait = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx.recv()).await,
            None => tokio::time::timeout(REMIND, rx.recv()).await,
        };
        match wait {
            Ok(Some(Event::Found(c))) => {
                info!(name = ?c.name, addr = %c.url, "found a gateway with mDNS");
                for u in c.urls() {
                    if !found.contains(u) {
                        found.push(u.clone());
                    }
                }
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + GRACE);
            }
            Ok(Some(Event::Lost { .. })) => {}
            Ok(None) => break,
            Err(_) if deadline.is_some() => break,
            Err(_) => info!("still looking for a gateway with mDNS (pass --gateway to name one)"),
        }
    }
    drop(d);
    mdns.shutdown();
    Ok(found)
}
