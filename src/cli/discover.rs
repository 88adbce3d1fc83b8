//! `clawmesh discover [--json]`: what mDNS and the tailnet see right now, without joining
//! anything. For each candidate: source, name, whether it advertises our federation, address.
//! The tool an operator runs first on a new machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use clawmesh_discovery::mdns::{Interfaces, Mdns};
use clawmesh_discovery::tailnet::TailnetState;
use clawmesh_discovery::{Candidate, Discovery, DiscoveryConfig, Event, FederationId};
use serde_json::{json, Value};

use crate::config::FileConfig;
use crate::gateway::discovery::{bonjour_disabled, DiscoverySettings};
use crate::gateway::Bind;

/// Flags of `discover`.
#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Milliseconds to listen (mDNS answers come within a few hundred).
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub wait: u64,
    /// The federation's join token, to mark which gateways are ours (config:
    /// gateway.authToken). Only its federation id is compared; the token is never sent.
    #[arg(long, env = "CLAWMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Skip mDNS (also OPENCLAW_DISABLE_BONJOUR=1).
    #[arg(long)]
    pub no_mdns: bool,
    /// Skip the tailnet.
    #[arg(long)]
    pub no_tailnet: bool,
}

/// The longest `--wait`: a minute is plenty for any answer; longer is a typo.
const MAX_WAIT_MS: u64 = 60_000;

/// Runs `discover`; returns the exit code.
pub async fn run(a: DiscoverArgs, state_dir: &Path) -> Result<i32> {
    let file = FileConfig::load(state_dir)?;
    let token = match a.token.clone() {
        Some(t) => Some(t),
        None => file.first_str(&["gateway.authToken", "gateway.remote.authToken"])?,
    };
    let ours = token.as_deref().map(FederationId::from_token);
    // Tailnet peers are dialed on the federation port; the config's, else the default.
    let port = file
        .first_u64(&["gateway.port", "gateway.remote.listenPort"])?
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(crate::DEFAULT_PORT);
    let settings = DiscoverySettings::resolve(&Bind::Lan, false, false, &file)?;
    let mdns = if a.no_mdns || bonjour_disabled() {
        None
    } else {
        Some(Mdns::new(&Interfaces::All)?)
    };
    let (d, mut rx) = Discovery::start(DiscoveryConfig {
        mdns: mdns.clone(),
        tailnet: (!a.no_tailnet).then(|| settings.tailnet_config(port)),
        ..Default::default()
    })?;
    let mut seen: BTreeMap<(String, String), Candidate> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(a.wait.min(MAX_WAIT_MS));
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        match ev {
            Event::Found(c) => {
                seen.insert((c.source.to_string(), c.id.clone()), *c);
            }
            Event::Lost { source, id } => {
                seen.remove(&(source.to_string(), id));
            }
        }
    }
    let tailnet = if a.no_tailnet {
        None
    } else {
        Some(d.tailnet_state())
    };
    drop(d);
    if let Some(m) = mdns {
        m.shutdown();
    }
    let rows: Vec<Value> = seen.values().map(|c| row(c, ours.as_ref())).collect();
    let tailnet_line = tailnet.as_ref().map(|t| t.to_string());
    if a.json {
        let doc = json!({
            "federationId": ours.as_ref().map(|f| f.to_string()),
            "candidates": rows,
            "mdns": !(a.no_mdns || bonjour_disabled()),
            "tailnet": tailnet.as_ref().map(state_name),
            "tailnetStatus": tailnet_line,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render(&rows, tailnet_line.as_deref(), ours.as_ref()));
    }
    Ok(0)
}

fn state_name(s: &TailnetState) -> &'static str {
    match s {
        TailnetState::Unknown => "unknown",
        TailnetState::Running { .. } => "running",
        TailnetState::NeedsLogin { .. } => "needsLogin",
        TailnetState::NotRunning(_) => "notRunning",
        TailnetState::Other(_) => "other",
        TailnetState::Error(_) => "error",
    }
}

/// One candidate as JSON. `federation`: `match`, `other`, `none` (advertises none, as a
/// tailnet peer never does), or `unknown` (no token here to compare with).
fn row(c: &Candidate, ours: Option<&FederationId>) -> Value {
    let federation = match (&c.federation_id, ours) {
        (None, _) => "none",
        (Some(_), None) => "unknown",
        (Some(f), Some(o)) if f == o => "match",
        (Some(_), Some(_)) => "other",
    };
    json!({
        "source": c.source.as_str(),
        "name": c.name,
        "addr": c.url.authority(),
        "alternates": c.alternates.iter().map(|u| u.authority()).collect::<Vec<_>>(),
        "federation": federation,
        "federationId": c.federation_id.as_ref().map(|f| f.to_string()),
        "dnsName": c.dns_name,
        "deviceKey": c.device_key,
        "region": c.region,
        "role": c.role,
        "version": c.version,
        "tags": c.tags,
    })
}

fn render(rows: &[Value], tailnet: Option<&str>, ours: Option<&FederationId>) -> String {
    let mut table: Vec<[String; 5]> = vec![[
        "SOURCE".into(),
        "NAME".into(),
        "FEDERATION".into(),
        "ADDRESS".into(),
        "DETAILS".into(),
    ]];
    for r in rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let details = match r["source"].as_str() {
            Some("tailnet") => {
                let tags: Vec<&str> = r["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str())
                    .collect();
                format!("{} {}", s("dnsName"), tags.join(","))
                    .trim()
                    .to_string()
            }
            _ => format!("{} {}", s("region"), s("version"))
                .trim()
                .to_string(),
        };
        table.push([s("source"), s("name"), s("federation"), s("addr"), details]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = match ours {
        Some(f) => format!("Federation id {f} (from the token)\n"),
        None => "No token given: federation ids are shown but not compared (--token)\n".into(),
    };
    if rows.is_empty() {
        out.push_str("  nothing found on mDNS or the tailnet\n");
    } else {
        for r in &table {
            let mut line = String::from("  ");
            for (c, cell) in r.iter().enumerate() {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    if let Some(t) = tailnet {
        out.push_str(t);
        out.push('\n');
    }
    out
}
