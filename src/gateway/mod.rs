//! The gateway: the brain of a region, one peer of the federation.
//!
//! - `settings`: flags over `clawmesh.json` over defaults; `listen`: bind address and ports;
//! - `lifecycle`: the process from start to stop ([`run`]);
//! - `admission`: who may come in over QUIC (operators, nodes, pending devices);
//! - [`discovery`]: advertised with mDNS, finding the federation by mDNS and the tailnet;
//! - [`alerts`]: the primary evaluates `alerts.rules` and notifies `alerts.webhooks`;
//! - `logs`: the log spool, shipping to the primary, the collector and the audit trail;
//! - `followers`: shared-config keys applied live, the node directory announced, revocations;
//! - [`methods`]: the operator method table, one file per family, behind every front door;
//! - [`page`]: the status page at `/` and its JSON feed;
//! - [`registry`]: the nodes attached here, whatever their transport;
//! - [`scopes`]: operator scopes; [`shared_config`]: the replicated config under the sync policy;
//! - [`status`]: the federation status document served by `status` and `gateway.status`;
//! - [`tailnet_auth`]: nodes and operators the tailnet vouches for (`gateway.auth.allowTailscale`).
//!
//! A gateway never imports the CLI ([`crate::cli`]); the classic front door is [`crate::bridge`].

mod admission;
pub mod alerts;
pub mod discovery;
mod followers;
pub mod instruments;
mod lifecycle;
mod listen;
mod logs;
pub mod methods;
pub mod metrics;
pub mod node_changes;
mod otlp_export;
pub mod page;
pub mod registry;
pub mod scopes;
mod settings;
pub mod shared_config;
pub mod status;
pub mod tailnet_auth;

pub use followers::EXEC_DEFAULT_KEY;
pub use lifecycle::run;
pub use logs::GatewayLogs;
pub use settings::{Bind, GatewaySettings, RemoteLogs, RunFlags};
