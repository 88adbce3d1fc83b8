//! The `clawmesh` command line: the grammar ([`args`]), the dispatch of a parsed command
//! ([`run`]), and one file per command family. It is the only part that prints for people,
//! and it may use every other part of the crate ([`crate::gateway`], [`crate::node`],
//! [`crate::sim`]); none of them uses it.

pub mod approvals;
pub mod args;
pub mod client;
pub mod config;
pub mod demo;
pub mod devices;
pub mod discover;
pub mod logs;
pub mod node;
pub mod nodes;
pub mod status;

pub use args::{Cli, Command};

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use comfy_table::presets::UTF8_FULL;
use comfy_table::Table;
use serde_json::{json, Value};

use crate::config::FileConfig;
use crate::gateway::{self, GatewaySettings, RunFlags};
use crate::logging;
use crate::state_dir;
use args::*;
use client::{ClientError, Target};

/// Exit code when `--check` finds a gateway that is not healthy.
pub const EXIT_UNHEALTHY: i32 = 1;
/// Exit code for errors (unreachable gateway, bad input, refused request).
pub const EXIT_ERROR: i32 = 2;

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    let state_dir = state_dir::resolve(cli.state_dir.as_deref())?;
    match cli.command {
        Command::Gateway(GatewayCmd::Run(a)) => {
            logging::init(cli.log.as_deref(), logging::DEFAULT_LOG);
            let file = FileConfig::load(&state_dir)?;
            let flags = RunFlags {
                name: a.name,
                region: a.region,
                bind: a.bind,
                port: a.port,
                advertise: a.advertise,
                primary: a.primary,
                join: a.join,
                token: a.token,
                health_interval: a.health_interval,
                unhealthy_threshold: a.unhealthy_threshold,
                tls: match (a.tls.as_deref(), a.tls_cert, a.tls_key) {
                    (Some("auto"), _, _) => Some(crate::bridge::tls::TlsSource::Auto),
                    (Some(other), _, _) => {
                        return Err(anyhow!(
                            "--tls takes `auto` (or use --tls-cert and --tls-key), not {other:?}"
                        ))
                    }
                    (None, Some(cert), Some(key)) => {
                        Some(crate::bridge::tls::TlsSource::Files { cert, key })
                    }
                    _ => None,
                },
                no_mdns: a.no_mdns,
                tailnet: a.tailnet,
            };
            let settings = GatewaySettings::resolve(state_dir, flags, &file)?;
            gateway::run(settings).await?;
            Ok(0)
        }
        Command::Gateway(GatewayCmd::Status(a)) => {
            logging::init(cli.log.as_deref(), "warn");
            let target = Target::from_flags(a.target.url, a.target.token, &state_dir);
            let doc = call(
                &target,
                "gateway.status",
                json!({"all": a.all}),
                Duration::from_secs(10),
            )
            .await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", crate::cli::status::render_table(&doc));
            }
            if a.check && !crate::cli::status::all_healthy(&doc) {
                return Ok(EXIT_UNHEALTHY);
            }
            Ok(0)
        }
        Command::Gateway(GatewayCmd::Call(a)) => {
            logging::init(cli.log.as_deref(), "warn");
            let params: Value = serde_json::from_str(&a.params)
                .with_context(|| format!("--params is not valid JSON: {}", a.params))?;
            let target = Target::from_flags(a.target.url, a.target.token, &state_dir);
            let (method, params) = match &a.gateway {
                Some(g) => (
                    "gateway.call".to_string(),
                    json!({"gateway": g, "method": a.method, "params": params, "timeoutMs": a.timeout}),
                ),
                None => (a.method.clone(), params),
            };
            let doc = call(
                &target,
                &method,
                params,
                Duration::from_millis(a.timeout) + Duration::from_secs(5),
            )
            .await?;
            if a.json {
                println!("{}", serde_json::to_string(&doc)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            Ok(0)
        }
        Command::Gateway(GatewayCmd::Forget { name, target: t }) => {
            logging::init(cli.log.as_deref(), "warn");
            let target = Target::from_flags(t.url, t.token, &state_dir);
            let doc = call(
                &target,
                "gateway.forget",
                json!({"name": name}),
                Duration::from_secs(10),
            )
            .await?;
            println!(
                "forgot gateway {} (device {}); it can rejoin with the token",
                doc["name"].as_str().unwrap_or("?"),
                doc["deviceId"].as_str().unwrap_or("?")
            );
            Ok(0)
        }
        Command::Gateway(GatewayCmd::Promote { force, target: t }) => {
            logging::init(cli.log.as_deref(), "warn");
            if !force {
                return Err(anyhow!(
                    "promote overrides the quorum of voting gateways; pass --force if that is what you want"
                ));
            }
            let target = Target::from_flags(t.url, t.token, &state_dir);
            let doc = call(
                &target,
                "gateway.promote",
                json!({"force": true}),
                Duration::from_secs(30),
            )
            .await?;
            println!(
                "{} forced to primary; voters now: {}",
                doc["gateway"].as_str().unwrap_or("?"),
                doc["voters"]
                    .as_array()
                    .map(|v| v
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
            Ok(0)
        }
        Command::Config(cmd) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::config::run(cmd, &state_dir).await
        }
        Command::Identity(IdentityCmd::Show { json }) => {
            logging::init(cli.log.as_deref(), "warn");
            let (id, _) =
                clawmesh_federation::identity::DeviceIdentity::load_or_create(&state_dir)?;
            if json {
                println!(
                    "{}",
                    json!({"deviceId": id.device_id().to_string(), "publicKey": id.public_key().to_base64url()})
                );
            } else {
                println!("device id:  {}", id.device_id());
                println!("public key: {}", id.public_key().to_base64url());
                println!(
                    "key file:   {}",
                    state_dir
                        .join(clawmesh_federation::identity::KEY_FILE)
                        .display()
                );
            }
            Ok(0)
        }
        Command::Node(NodeCmd::Run(a)) => {
            logging::init(cli.log.as_deref(), logging::DEFAULT_LOG);
            let file = FileConfig::load(&state_dir)?;
            let settings = crate::cli::node::node_settings(state_dir, a, &file)?;
            crate::node::run::run(settings).await?;
            Ok(0)
        }
        Command::Nodes(cmd) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::nodes::nodes(cmd, &state_dir).await
        }
        Command::Devices(cmd) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::devices::devices(cmd, &state_dir).await
        }
        Command::Approvals(cmd) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::approvals::approvals(cmd, &state_dir).await
        }
        Command::Logs(a) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::logs::logs(a, &state_dir).await
        }
        Command::Demo(a) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::demo::run(a.health_interval).await?;
            Ok(0)
        }
        Command::Discover(a) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::discover::run(a, &state_dir).await
        }
    }
}

/// Calls one method, turning a gateway error into a message with its classic code.
pub async fn call(
    target: &Target,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value> {
    client::call_once(target, method, params, timeout)
        .await
        .map_err(|e| match e {
            ClientError::Remote(w) if w.message.starts_with(&w.code) => anyhow!("{}", w.message),
            ClientError::Remote(w) => anyhow!("{}: {}", w.code, w.message),
            ClientError::Transport(e) => e,
        })
}

/// Request timeout for listing and pairing calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a command sends its request: `--url`/`--token`, else the local gateway.
fn target(t: TargetArgs, state_dir: &Path) -> Target {
    Target::from_flags(t.url, t.token, state_dir)
}

/// A table in the CLI's style, with this header.
fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL);
    t.set_header(header.iter().map(|h| h.to_string()));
    t
}
