//! clawmesh: one federation of AI-agent gateways across regions.
//!
//! The `clawmesh` binary is a thin shell over this library: [`cli`] parses and dispatches;
//! [`gateway`] runs a gateway (mesh + [`methods`] table); [`client`] is the operator side the
//! CLI uses; [`status`] renders the federation view; [`config`] reads `clawmesh.json`; [`shared_config`] merges it with the federation's
//! replicated config ([`config_cli`] is `clawmesh config`);
//! [`state_dir`] finds the state dir and the running gateway; [`relay`] simulates WAN latency
//! on loopback for [`demo`] and the tests. [`nodes`] is the gateway's registry of attached
//! nodes; [`node_run`] is the node host process, serving the commands of [`node_host`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bridge;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod logging;
pub mod node;
pub mod node_protocol;
pub mod sim;
pub mod state_dir;

/// Software version, reported in status and hellos.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default port: the classic OpenClaw gateway's, UDP for QUIC (TCP for the WebSocket bridge).
pub const DEFAULT_PORT: u16 = 18789;
