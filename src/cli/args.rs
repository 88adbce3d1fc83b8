//! The command line's grammar: every command, subcommand and flag (clap derive). Parsing only;
//! what each command does lives in its own file beside this one.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::gateway::Bind;

/// How `--node` picks nodes, shown in the help of every command that takes it.
pub const NODE_SELECTOR_HELP: &str = "Node: id, id prefix (4+ chars), name, IP, \
gateway/name (a node attached to that gateway), or label=value such as region=fra \
(one healthy match; `nodes invoke --all` takes every match, and `*` every node)";

/// How a pairing request or device is named on the command line.
pub const DEVICE_SELECTOR_HELP: &str =
    "Request id, device id, id prefix (4+ chars) or name, as `devices list` shows them";

/// clawmesh: one federation of AI-agent gateways across regions, over QUIC.
#[derive(Debug, Parser)]
#[command(
    name = "clawmesh",
    version,
    about,
    long_about = None,
    after_help = "Examples:\n  clawmesh gateway run --name tokyo --primary\n  clawmesh gateway status --all\n  clawmesh nodes invoke --node fra-box --command system.run --params '{\"command\":[\"uptime\"]}'\n\nExit codes: 0 ok, 1 unhealthy (--check), 2 error, 124 timed out, 126 refused by exec approvals,\n127 not started, 130/143 cancelled by Ctrl-C/SIGTERM; `nodes invoke` of system.run exits with\nthe remote command's status, as ssh does."
)]
pub struct Cli {
    /// State dir (key, config, database); else CLAWMESH_STATE_DIR, else ~/.clawmesh.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub state_dir: Option<PathBuf>,
    /// Log filter (e.g. debug, clawmesh_federation=trace); else RUST_LOG.
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        help_heading = "Global options"
    )]
    pub log: Option<String>,
    /// Log line format: text (colour only on a terminal, and never with NO_COLOR) or json
    /// (one object per line, for log shippers).
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        default_value = "text",
        value_parser = ["text", "json"],
        help_heading = "Global options"
    )]
    pub log_format: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run or inspect gateways.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// This peer's device identity.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// Run a node host: the hands that run approved commands for the gateway.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Nodes attached to a gateway: status, describe, invoke.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Device pairing on a gateway: list, approve, reject, revoke.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Exec approvals of a node: what system.run may run there.
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
    /// The federation's shared config: get, set, unset, import, show [--effective].
    #[command(subcommand)]
    Config(crate::cli::config::ConfigCmd),
    /// Start a Tokyo / Beijing / Frankfurt federation on this machine and show it working.
    Demo(DemoArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  clawmesh completions bash > /etc/bash_completion.d/clawmesh\n  clawmesh completions zsh > \"${fpath[1]}/_clawmesh\"\n  clawmesh completions fish > ~/.config/fish/completions/clawmesh.fish"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    #[command(after_help = "Example:\n  clawmesh man > /usr/local/share/man/man1/clawmesh.1")]
    Man,
    /// What mDNS and the tailnet see right now (source, name, federation match, address),
    /// without joining anything: the first thing to run on a new machine.
    Discover(crate::cli::discover::DiscoverArgs),
    /// Logs of every region from the primary's collector, and the audit trail of node.invoke.
    Logs(LogsArgs),
    /// Alerts firing now and resolved recently (alerts.rules, evaluated by the primary);
    /// exit 1 while any fires.
    #[command(
        after_help = "Examples:\n  clawmesh alerts\n  clawmesh alerts --json\n  clawmesh config set alerts.rules '[{\"kind\": \"cpu\", \"above\": 80, \"for\": \"5m\"}]'\n  clawmesh config set alerts.webhooks '[{\"url\": \"https://hooks.slack.com/services/T/B/X\", \"format\": \"slack\"}]'"
    )]
    Alerts(AlertsArgs),
}

/// Flags of `clawmesh alerts`.
#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// Print JSON (the evaluator's book: firing, resolved, webhook counters).
    #[arg(long)]
    pub json: bool,
    /// Where to ask.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Flags of `clawmesh logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Every gateway and node of the federation, merged in time order (default: this gateway).
    #[arg(long)]
    pub all: bool,
    /// Only this gateway (its own records and its nodes').
    #[arg(long, value_name = "NAME")]
    pub gateway: Option<String>,
    /// Only this node.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// This level or more severe: error, warn, info, debug, trace (audit records always show).
    #[arg(long)]
    pub level: Option<String>,
    /// Only records of the last DURATION (10m, 2h, 1d).
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Only records whose message contains TEXT.
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Only the audit trail (who ran what, where).
    #[arg(long)]
    pub audit: bool,
    /// Keep printing new records as they arrive (across a failover of the primary).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// The newest N records (before following).
    #[arg(long, short = 'n', default_value_t = 200)]
    pub lines: usize,
    /// Where to ask.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `clawmesh node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Connect to a gateway and serve its commands (waits for pairing approval if needed).
    Run(NodeRunArgs),
}

/// Flags of `node run`.
#[derive(Debug, Args)]
pub struct NodeRunArgs {
    /// Gateway to attach to (quic://host:port); repeat for fallbacks, tried in order
    /// (config: node.gateways or gateway.remote.url).
    #[arg(long = "gateway", value_name = "quic://HOST:PORT")]
    pub gateways: Vec<String>,
    /// Display name (config: node.name; default: hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Gateway token, if the gateway asks for one (config: gateway.remote.token).
    #[arg(long, env = "CLAWMESH_NODE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Label KEY=VALUE, e.g. region=fra; repeatable (config: node.labels).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Override the exec approvals level: deny, allowlist or full (full: a lab, not production).
    #[arg(long)]
    pub security: Option<String>,
    /// With no --gateway, do not look for gateways with mDNS (also OPENCLAW_DISABLE_BONJOUR=1).
    #[arg(long)]
    pub no_mdns: bool,
}

/// `clawmesh nodes ...`
#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// Known, paired and connected nodes.
    #[command(
        after_help = "Examples:\n  clawmesh nodes status\n  clawmesh nodes status --all --json\n  clawmesh nodes status --all --limit 500 --after <next cursor of the previous page>"
    )]
    Status {
        /// Every node of the federation, with the gateway it is attached to.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// At most N nodes (in node id order); the output ends with the cursor of the next page.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Only nodes after this cursor (the `next` of the previous page: a node id).
        /// A cursor is a base64url key and may begin with `-`: taken as a value, not a flag.
        #[arg(long, value_name = "CURSOR", allow_hyphen_values = true)]
        after: Option<String>,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Everything the gateway knows about one node.
    #[command(
        after_help = "Examples:\n  clawmesh nodes describe --node web-1\n  clawmesh nodes describe --node frankfurt/web-1 --json"
    )]
    Describe {
        /// Which node ([`NODE_SELECTOR_HELP`]).
        #[arg(help = NODE_SELECTOR_HELP, value_name = "NODE", required_unless_present = "node_flag")]
        node: Option<String>,
        /// The same as the positional NODE (as `nodes invoke --node`).
        #[arg(long = "node", value_name = "NODE", conflicts_with = "node", help = NODE_SELECTOR_HELP)]
        node_flag: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Run a command on a node (system.run, system.which, ...), on any gateway of the federation.
    #[command(
        after_help = "Examples:\n  clawmesh nodes invoke --node web-1 --command system.run --params '{\"command\":[\"uptime\"]}'\n  clawmesh nodes invoke --node region=fra --all --command system.which --params '{\"bins\":[\"git\"]}'\n  clawmesh nodes invoke --node web-1 --command system.run --params @req.json\n\nsystem.run exits with the remote command's status (as ssh does); 124 when it timed out,\n126 when the node's exec approvals refused it. Ctrl-C cancels it on the node."
    )]
    Invoke {
        /// Which node ([`NODE_SELECTOR_HELP`]).
        #[arg(long, help = NODE_SELECTOR_HELP)]
        node: String,
        /// Run on every matching node and print one result per node.
        #[arg(long)]
        all: bool,
        /// Command, e.g. system.which.
        #[arg(long)]
        command: String,
        /// Command params: JSON, @FILE (read the file) or - (read stdin), as curl does.
        #[arg(long, default_value = "{}", value_name = "JSON|@FILE|-")]
        params: String,
        /// Milliseconds before the gateway gives up (and tells the node to cancel).
        #[arg(long, default_value_t = 30_000)]
        timeout: u64,
        /// Print {"ok","nodeId","command","payload"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
}

/// `clawmesh devices ...`
#[derive(Debug, Subcommand)]
pub enum DevicesCmd {
    /// Pending and paired devices.
    #[command(
        after_help = "Examples:\n  clawmesh devices list\n  clawmesh devices list --limit 500 --after <next cursor of the previous page>\n  clawmesh devices approve 3f9c"
    )]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// At most N paired and revoked devices (in key order; 10 000 at most, the default);
        /// the output ends with the cursor of the next page.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: Option<u64>,
        /// Only devices after this cursor (the `next` of the previous page).
        /// A cursor is a base64url key and may begin with `-`: taken as a value, not a flag.
        #[arg(long, value_name = "CURSOR", allow_hyphen_values = true)]
        after: Option<String>,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Approve a pending device (request id, device id, name, or id prefix).
    Approve {
        /// Which device ([`DEVICE_SELECTOR_HELP`]).
        #[arg(help = DEVICE_SELECTOR_HELP)]
        selector: String,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Reject a pending device.
    Reject {
        /// Which device ([`DEVICE_SELECTOR_HELP`]).
        #[arg(help = DEVICE_SELECTOR_HELP)]
        selector: String,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Revoke a paired device; it is disconnected at once.
    Revoke {
        /// Which device ([`DEVICE_SELECTOR_HELP`]).
        #[arg(help = DEVICE_SELECTOR_HELP)]
        selector: String,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
}

/// `clawmesh approvals ...`
#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// Show a node's exec approvals file.
    Get {
        /// Which node ([`NODE_SELECTOR_HELP`]).
        #[arg(long, help = NODE_SELECTOR_HELP)]
        node: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Set a node's exec security level (deny, allowlist, full).
    Set {
        /// Which node ([`NODE_SELECTOR_HELP`]).
        #[arg(long, help = NODE_SELECTOR_HELP)]
        node: String,
        /// deny, allowlist or full.
        #[arg(long)]
        security: String,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Allow a program (absolute path or glob such as /usr/bin/*) on a node.
    Allow {
        /// Which node ([`NODE_SELECTOR_HELP`]).
        #[arg(long, help = NODE_SELECTOR_HELP)]
        node: String,
        /// Absolute path or glob.
        pattern: String,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Remove a pattern from a node's allowlist.
    Deny {
        /// Which node ([`NODE_SELECTOR_HELP`]).
        #[arg(long, help = NODE_SELECTOR_HELP)]
        node: String,
        /// The pattern to remove.
        pattern: String,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
}

/// `clawmesh identity ...`
#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// Print the device id and public key (creating the key on first use).
    Show {
        /// Print JSON: {"deviceId","publicKey"}.
        #[arg(long)]
        json: bool,
    },
}

/// `clawmesh gateway ...`
#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// Run a gateway (primary or remote) in the foreground.
    #[command(
        after_help = "Examples:\n  clawmesh gateway run --name tokyo --primary --bind lan\n  clawmesh gateway run --name frankfurt --join quic://tokyo.example.com:18789 --token \"$CLAWMESH_TOKEN\""
    )]
    Run(Box<RunArgs>),
    /// Show this gateway, or with --all every gateway of the federation.
    #[command(
        after_help = "Examples:\n  clawmesh gateway status --all\n  clawmesh gateway status --all --check || page-someone"
    )]
    Status(StatusArgs),
    /// Call any operator method on a gateway (`--list` lists them with their scopes).
    #[command(
        after_help = "Examples:\n  clawmesh gateway call --list\n  clawmesh gateway call node.list --params '{\"all\":true}'\n  clawmesh gateway call health --gateway frankfurt"
    )]
    Call(CallArgs),
    /// Remove a gateway from the federation (on the primary): forgets its pinned key.
    #[command(after_help = "Example:\n  clawmesh gateway forget osaka")]
    Forget {
        /// Gateway name.
        name: String,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Make this gateway the primary without a majority of voters (re-forms the voter set from
    /// the gateways it can reach). Only for an operator who knowingly overrides quorum: writes
    /// that only the unreachable voters have are lost when they rejoin.
    Promote {
        /// Required: acknowledges that quorum is overridden.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
}

/// Flags of `gateway run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Gateway name, unique in the federation (config: gateway.nodeName; default: hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Region label shown in status (e.g. ap-northeast-1).
    #[arg(long)]
    pub region: Option<String>,
    /// Listen on: loopback, lan, tailnet, or an IP address [default: loopback].
    #[arg(long, value_name = "WHERE")]
    pub bind: Option<Bind>,
    /// UDP port for QUIC (default 18789; 0 picks a free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// Address other gateways dial to reach this one (host:port), if not the bound one.
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Run as the primary (the default when there is nothing to join).
    #[arg(long, conflicts_with = "join")]
    pub primary: bool,
    /// Join the federation whose primary is at this URL (config: gateway.primaryUrl).
    #[arg(long, value_name = "quic://HOST:PORT")]
    pub join: Option<String>,
    /// Federation join secret (config: gateway.authToken).
    #[arg(long, env = "CLAWMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Milliseconds between health pings (config: gateway.failover.healthCheckInterval)
    /// [default: 10000]. A flag pins this gateway's value: a later fleet-wide `config set`
    /// of the key is shown as shadowed by the flag, not applied here.
    #[arg(long, value_name = "MS")]
    pub health_interval: Option<u64>,
    /// Missed pings before a gateway is offline (config: gateway.failover.unhealthyThreshold)
    /// [default: 3].
    #[arg(long, value_name = "N")]
    pub unhealthy_threshold: Option<u32>,
    /// `auto`: serve the classic bridge over wss:// with a self-signed certificate kept in the
    /// state dir (its SHA-256 fingerprint is printed and shown by `gateway status`).
    #[arg(long, value_name = "auto", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub tls: Option<String>,
    /// PEM certificate chain for wss:// (config: gateway.tls.cert).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for wss:// (config: gateway.tls.key).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Neither advertise nor browse mDNS (config: gateway.discovery.mdns: false; also
    /// OPENCLAW_DISABLE_BONJOUR=1). mDNS is on by default with --bind lan or a LAN IP.
    #[arg(long)]
    pub no_mdns: bool,
    /// Find peers in tailscaled's status (config: gateway.discovery.tailnet; the default with
    /// --bind tailnet), selected by gateway.discovery.tailnetTags / tailnetHosts.
    #[arg(long)]
    pub tailnet: bool,
    /// Lend the federation's nodes to this OpenClaw gateway (ws://HOST:PORT or wss://...):
    /// one classic node host per node (config: gateway.upstream.url).
    #[arg(long, value_name = "ws://HOST:PORT")]
    pub upstream: Option<String>,
    /// The OpenClaw gateway's token (config: gateway.upstream.token).
    #[arg(long, env = "CLAWMESH_UPSTREAM_TOKEN", hide_env_values = true)]
    pub upstream_token: Option<String>,
    /// SHA-256 of the OpenClaw gateway's certificate, pinned for wss://
    /// (config: gateway.upstream.tlsFingerprint).
    #[arg(long, value_name = "SHA256")]
    pub upstream_tls_fingerprint: Option<String>,
    /// Lend only the nodes this selector matches (repeatable; `*`, a name, `key=value`,
    /// `gateway/NAME`) [default: every node] (config: gateway.upstream.nodes).
    #[arg(long, value_name = "SELECTOR")]
    pub upstream_node: Vec<String>,
    /// Approve, in OpenClaw, the pairing of the proxies this gateway creates (and nothing
    /// else) (config: gateway.upstream.autoApprove).
    #[arg(long)]
    pub upstream_auto_approve: bool,
}

/// Where a CLI command sends its request.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// A gateway elsewhere (quic://host:port) instead of the local one.
    #[arg(long, value_name = "quic://HOST:PORT")]
    pub url: Option<String>,
    /// Operator token for --url (else CLAWMESH_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
}

/// Flags of `gateway status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Every gateway of the federation, not only this one.
    #[arg(long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 when any gateway shown is not healthy (for cron and monitoring).
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    /// Target.
    pub target: TargetArgs,
}

/// Flags of `gateway call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Method name (health, status, gateway.status, ...; see --list).
    #[arg(required_unless_present = "list")]
    pub method: Option<String>,
    /// List the methods and the scope each needs, then exit.
    #[arg(long, conflicts_with = "method")]
    pub list: bool,
    /// Params: a JSON object, @FILE (read the file) or - (read stdin), as curl does.
    #[arg(long, default_value = "{}", value_name = "JSON|@FILE|-")]
    pub params: String,
    /// Print the raw JSON result.
    #[arg(long)]
    pub json: bool,
    /// Milliseconds to wait for the reply.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    pub timeout: u64,
    /// Run the method on this gateway of the federation (routed over the mesh).
    #[arg(long, value_name = "NAME")]
    pub gateway: Option<String>,
    #[command(flatten)]
    /// Target.
    pub target: TargetArgs,
}

/// Flags of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Milliseconds between health pings in the demo federation.
    #[arg(long, default_value_t = 500)]
    pub health_interval: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_cursor_beginning_with_a_hyphen_is_a_value_not_a_flag() {
        let cli = Cli::try_parse_from(["clawmesh", "devices", "list", "--after", "-tZ1X"]).unwrap();
        match cli.command {
            Command::Devices(DevicesCmd::List { after, .. }) => {
                assert_eq!(after.as_deref(), Some("-tZ1X"))
            }
            _ => panic!("parsed as another command"),
        }
        let cli = Cli::try_parse_from([
            "clawmesh", "nodes", "status", "--all", "--limit", "2", "--after", "-x_9",
        ])
        .unwrap();
        match cli.command {
            Command::Nodes(NodesCmd::Status { after, .. }) => {
                assert_eq!(after.as_deref(), Some("-x_9"))
            }
            _ => panic!("parsed as another command"),
        }
    }
}
