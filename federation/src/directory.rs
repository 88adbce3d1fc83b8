//! The node directory: which nodes are attached to which gateway, federation-wide.
//!
//! Every gateway announces its own nodes over the mesh whenever one attaches or leaves (and in
//! full on every new link), so any gateway can list every node of the federation and route a
//! request to the gateway holding it.

use serde::{Deserialize, Serialize};

use crate::identity::DeviceId;

/// Nodes one gateway announces: more would be a flood, not a fleet.
pub const MAX_NODES_PER_GATEWAY: usize = 50_000;

/// One node as the federation sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Device id.
    pub id: DeviceId,
    /// Display name.
    pub name: String,
    /// Labels such as `region=fra`.
    pub labels: Vec<(String, String)>,
    /// Commands it offers.
    pub commands: Vec<String>,
    /// `quic` or `ws`.
    pub transport: String,
    /// Platform.
    pub platform: String,
    /// Address it connected from (IP).
    pub ip: String,
    /// Software version.
    pub version: String,
}

/// A gateway's announcement of its nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDirectory {
    /// Bumped on every change by the announcing gateway.
    pub version: u64,
    /// Its attached nodes.
    pub nodes: Vec<NodeSummary>,
}

impl NodeSummary {
    /// Whether the node carries `key=value`.
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.iter().any(|(k, v)| k == key && v == value)
    }
}
