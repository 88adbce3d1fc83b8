//! clawmesh-federation: what makes separate gateways one federation.
//!
//! - [`identity`]: the ed25519 device key and device id of every peer;
//! - [`raw_key`] and [`endpoint`]: QUIC with device keys as TLS raw public keys, mutual auth;
//!   [`legacy`]: a clear error for peers that still speak `clawmesh/1`;
//! - [`secret`]: constant-time comparison of secrets and MACs;
//! - [`frame`] and [`wire`]: the postcard wire protocol, length-prefixed and bounded;
//! - [`handshake`]: the hello exchange and join-token proofs;
//! - [`rpc`]: request/reply streams and the handler interface of the method table;
//! - [`mesh`]: membership, the full mesh of gateway links, redial and [`health`];
//! - [`pairing`]: the registry of approved and pending devices, replicated between gateways;
//! - [`directory`]: which node is attached to which gateway;
//! - [`logs`]: the log spool, shipping to the primary, the collector and the audit trail;
//! - [`consensus`]: the openraft log store and state machine (shared config) over SQLite;
//! - [`vitals`]: host vitals (load, CPU, memory, disk, uptime) carried in the health traffic;
//! - [`store`]: the SQLite state database; [`backoff`]: redial timing.
//!
//! This crate knows nothing of the CLI; the `clawmesh` binary builds on it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod consensus;
pub mod directory;
pub mod endpoint;
pub mod frame;
pub mod handshake;
pub mod health;
pub mod identity;
pub mod legacy;
pub mod liveness;
pub mod logs;
pub mod mesh;
pub mod pairing;
pub mod raw_key;
pub mod rpc;
pub mod secret;
pub mod store;
pub mod vitals;
pub mod wire;

/// This crate's version, reported to peers in the hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
