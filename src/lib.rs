//! clawmesh: one federation of AI-agent gateways across regions.
//!
//! The `clawmesh` binary is a thin shell over this library. Every running instance is a peer:
//! a gateway (`clawmesh gateway run`, the brain of a region) or a node (`clawmesh node run`,
//! the hands that run commands). Gateways link over QUIC ([`clawmesh_federation`]) and find
//! each other through [`clawmesh_discovery`].
//!
//! # Layout
//!
//! - [`cli`]: the command line: the grammar ([`cli::args`]), one file per command family, the
//!   operator client ([`cli::client`]), the tables people read, and `clawmesh demo`. Only the
//!   CLI prints for people; it uses everything below, nothing below uses it.
//! - [`gateway`]: a gateway process: settings, listening, admission, the lifecycle, the
//!   followers of the shared config, and the operator method table ([`gateway::methods`],
//!   one file per family of methods) over the node registry ([`gateway::registry`]).
//! - [`bridge`]: the gateway's classic front door, the OpenClaw WebSocket protocol, into the
//!   same method table.
//! - [`node`]: a node host process: pairing, failover between gateways, and the commands it
//!   serves (`system.run`, `system.which`, exec approvals).
//! - [`sim`]: the WAN relay that gives loopback paths a continent's latency, loss and cuts.
//! - Shared by all of them: [`node_protocol`] (what gateways and nodes both say),
//!   [`config`] (`clawmesh.json`), [`config_schema`] (the typed keys), [`alerts_config`] (alert rules and webhooks), [`logging`], [`state_dir`].
//!
//! # The path of one request
//!
//! `clawmesh nodes invoke --node fra-box --command system.run --params '{"command":["uptime"]}'`
//! on Tokyo, for a node attached to Frankfurt:
//!
//! 1. [`cli::args`] parses it; [`cli::nodes`] builds the `node.invoke` params and
//!    [`cli::client`] dials the local gateway (its address and key come from
//!    [`state_dir`]), says hello as an operator and sends one request on one QUIC stream.
//! 2. On Tokyo, `clawmesh_federation::rpc` reads the bounded frame and hands it to
//!    [`gateway::methods::Methods`]: the table checks the caller's scope, and the `nodes`
//!    family resolves `fra-box` in the federation's node directory: it is Frankfurt's.
//! 3. Tokyo forwards the request once over its mesh link to Frankfurt, as a gateway caller;
//!    Frankfurt's table serves it locally: [`gateway::registry`] holds the node's
//!    `NodeLink` (a QUIC session, or a classic WebSocket session from [`bridge`]).
//! 4. On the node, [`node::exec`] checks the exec approvals and runs the argv in its own
//!    process group; the result travels back the same way, and [`cli`] prints it.
//!
//! A classic `openclaw gateway call node.invoke` enters at step 2 through [`bridge`] instead;
//! the rest is the same.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alerts_config;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod config_schema;
pub mod gateway;
pub mod logging;
pub mod node;
pub mod node_protocol;
pub mod sim;
pub mod state_dir;
pub mod upstream;

/// Software version, reported in status and hellos.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default port: the classic OpenClaw gateway's, UDP for QUIC (TCP for the WebSocket bridge).
pub const DEFAULT_PORT: u16 = 18789;
