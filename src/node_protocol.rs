//! The vocabulary a gateway and a node share: the commands a gateway sends only to nodes and
//! the exec approval levels. Both sides import it from here, so neither imports the other's
//! process code.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What the gateway sends a node to set the federation's default exec level
/// (`security.exec.defaultLevel` of the shared config); not offered to operators.
pub const DEFAULTS_COMMAND: &str = "system.execApprovals.defaults";

/// The params key by which a gateway asks a native node for its hop times (a `node.invoke`
/// with `"timing": true`, which benchmarks send), and the key of the node's answer in the
/// result (`{"receivedNs": .., "repliedNs": ..}`); the gateway removes it before answering.
pub const TIMING_KEY: &str = "clawmeshTiming";

/// Wall clock in ns since the Unix epoch (0 before 1970): the hop times of an invoke, which
/// compare between processes of one host only.
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Exec security level: what the node runs without asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Nothing runs.
    Deny,
    /// Only programs matching an allowlist pattern run.
    Allowlist,
    /// Everything runs (the node's `--security full` start flag, or the file).
    Full,
}

impl Security {
    /// The level's name as written in the file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Deny => "deny",
            Security::Allowlist => "allowlist",
            Security::Full => "full",
        }
    }
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Security {
    type Err = String;

    /// Parse `deny|allowlist|full` (for `--security` flags).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(Security::Deny),
            "allowlist" => Ok(Security::Allowlist),
            "full" => Ok(Security::Full),
            other => Err(format!(
                "unknown exec security {other:?}; expected deny, allowlist or full"
            )),
        }
    }
}
