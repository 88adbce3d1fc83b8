//! The `clawmesh` command line: the grammar ([`args`]), the dispatch of a parsed command
//! ([`run`]), and one file per command family. It is the only part that prints for people,
//! and it may use every other part of the crate ([`crate::gateway`], [`crate::node`],
//! [`crate::sim`]); none of them uses it.

pub mod alerts;
pub mod approvals;
pub mod args;
pub mod client;
pub mod config;
pub mod demo;
pub mod devices;
pub mod discover;
pub mod exit;
pub mod logs;
pub mod node;
pub mod nodes;
pub mod output;
pub mod status;
pub mod vitals;

pub use args::{Cli, Command};

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use crate::config::FileConfig;
use crate::gateway::{self, GatewaySettings, RunFlags};
use crate::logging;
use crate::state_dir;
use args::*;
use client::{Client, ClientError, Target};
use exit::Failure;
use output::Table;

/// Exit code when `--check` finds a gateway that is not healthy.
pub const EXIT_UNHEALTHY: i32 = exit::UNHEALTHY;
/// Exit code for errors (unreachable gateway, bad input, refused request).
pub const EXIT_ERROR: i32 = exit::ERROR;

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    logging::set_json_format(cli.log_format == "json");
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "clawmesh", &mut std::io::stdout());
            return Ok(0);
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            return Ok(0);
        }
        _ => {}
    }
    let state_dir = state_dir::resolve(cli.state_dir.as_deref())?;
    match cli.command {
        Command::Completions { .. } | Command::Man => Ok(0),
        Command::Gateway(GatewayCmd::Run(a)) => {
            let a = *a;
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
                upstream: a.upstream,
                upstream_token: a.upstream_token,
                upstream_tls_fingerprint: a.upstream_tls_fingerprint,
                upstream_nodes: a.upstream_node,
                upstream_auto_approve: a.upstream_auto_approve,
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
            if a.list {
                let methods = gateway::methods::method_scopes();
                if a.json {
                    let list: Vec<Value> = methods
                        .iter()
                        .map(|(m, s)| json!({"method": m, "scope": if *s == "-" { Value::Null } else { json!(s) }}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    let mut t = table(&["Method", "Scope"]);
                    for (m, s) in methods {
                        t.add_row([m, s]);
                    }
                    println!("{t}");
                }
                return Ok(0);
            }
            let method = a.method.unwrap_or_default();
            let params: Value = output::read_params(&a.params)?;
            let target = Target::from_flags(a.target.url, a.target.token, &state_dir);
            let (method, params) = match &a.gateway {
                Some(g) => (
                    "gateway.call".to_string(),
                    json!({"gateway": g, "method": method, "params": params, "timeoutMs": a.timeout}),
                ),
                None => (method.clone(), params),
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
                let fp = clawmesh_federation::pairing::fingerprint(&id.public_key());
                println!(
                    "{}",
                    json!({"deviceId": id.device_id().to_string(), "publicKey": id.public_key().to_base64url(), "fingerprint": fp})
                );
            } else {
                // The fingerprint in the form `devices list` shows, to compare before approving.
                println!(
                    "fingerprint: {}",
                    clawmesh_federation::pairing::fingerprint(&id.public_key())
                );
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
        Command::Alerts(a) => {
            logging::init(cli.log.as_deref(), "warn");
            crate::cli::alerts::alerts(a, &state_dir).await
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

/// Calls one method, turning a gateway error into a [`Failure`] with its classic code and
/// exit status. Ctrl-C or SIGTERM while it runs cancels the request: the request stream is
/// dropped (QUIC STOP_SENDING) and the connection closed at once, so the gateway drops the
/// handler and a running `system.run` on a node has its process group killed; the CLI then
/// exits 130 (or 143).
pub async fn call(
    target: &Target,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value> {
    let cancelled = |exit: i32| {
        Failure::new(
            "CANCELLED",
            format!("{method} cancelled by the operator; the gateway was told to stop it"),
        )
        .with_exit(exit)
    };
    let mut signals = Signals::install();
    let client = tokio::select! {
        c = Client::connect(target) => c.map_err(|e| Failure::new("UNREACHABLE", format!("{e:#}")))?,
        exit = signals.wait() => return Err(cancelled(exit).into()),
    };
    let outcome = tokio::select! {
        r = client.call(method, params, timeout) => Ok(r),
        exit = signals.wait() => Err(exit),
    };
    let r = match outcome {
        Ok(r) => {
            client.close().await;
            r
        }
        Err(exit) => {
            client.cancel().await;
            return Err(cancelled(exit).into());
        }
    };
    r.map_err(|e| match e {
        ClientError::Remote(w) => {
            let hint = w
                .details
                .as_deref()
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .and_then(|d| d["didYouMean"].as_str().map(str::to_string));
            let message = match hint {
                Some(name) => format!(
                    "{} (did you mean {name}? `clawmesh gateway call --list` lists them)",
                    w.message
                ),
                None => w.message,
            };
            Failure::new(&w.code, message).into()
        }
        ClientError::Transport(e) => {
            let text = format!("{e:#}");
            let code = if text.contains("timed out") {
                "TIMEOUT"
            } else {
                "UNREACHABLE"
            };
            Failure::new(code, text).into()
        }
    })
}

/// SIGINT and SIGTERM, caught while a request is in flight so that it can be cancelled.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Waits for either signal; returns the exit status it asks for (never returns when
    /// neither could be installed).
    async fn wait(&mut self) -> i32 {
        let (int, term) = (&mut self.int, &mut self.term);
        tokio::select! {
            Some(()) = async { int.as_mut()?.recv().await } => exit::INTERRUPTED,
            Some(()) = async { term.as_mut()?.recv().await } => exit::TERMINATED,
            else => std::future::pending().await,
        }
    }
}

/// Request timeout for listing and pairing calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a command sends its request: `--url`/`--token`, else the local gateway.
fn target(t: TargetArgs, state_dir: &Path) -> Target {
    Target::from_flags(t.url, t.token, state_dir)
}

/// A table in the CLI's one style ([`output::Table`]).
fn table(header: &[&str]) -> Table {
    Table::new(header)
}
