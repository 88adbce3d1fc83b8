//! Simulation of the world a federation lives in, for the demo, the tests and the benchmarks.
//!
//! - [`relay`]: a UDP relay on loopback that gives each path between two peers a WAN's latency,
//!   jitter and loss, and can cut it (partitions), so a Tokyo/Beijing/Frankfurt federation runs
//!   on one machine without netem.
//!
//! Nothing here is used by a gateway or a node in production.

pub mod relay;
