//! What the gateway counts as it happens, for `/metrics` ([`crate::gateway::metrics`]):
//! invokes by command and outcome with their latency, and shared-config writes by outcome.
//! Everything else `/metrics` shows is read at scrape time from where it already lives.
//!
//! The counters belong to the gateway (one [`Instruments`] per method table, registered in
//! the gateway's own registry): no globals, so two gateways in one process (tests, the demo)
//! never mix their numbers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use clawmesh_federation::consensus::replica::ConsensusError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Distinct command names given a series of their own. Commands are named by callers, so
/// without a bound a caller inventing names would grow the scrape without end; past it they
/// count as `other` (and the overflow is counted).
pub const MAX_COMMANDS: usize = 64;

/// Invoke latency buckets: 1 ms doubling to about 65 s, the span from a `system.which` on
/// loopback to a long `system.run` near its default timeout.
fn invoke_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The gateway's event counters.
#[derive(Debug)]
pub struct Instruments {
    invokes: Family<Labels, Counter>,
    invoke_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    config_writes: Family<Labels, Counter>,
    commands: Mutex<std::collections::HashSet<String>>,
    commands_overflow: Counter,
    /// Bumped by every counted event (tests and benchmarks read it).
    events: AtomicU64,
}

impl Default for Instruments {
    fn default() -> Self {
        Instruments {
            invokes: Family::default(),
            invoke_seconds: Family::new_with_constructor(invoke_buckets),
            config_writes: Family::default(),
            commands: Mutex::default(),
            commands_overflow: Counter::default(),
            events: AtomicU64::new(0),
        }
    }
}

impl Instruments {
    /// Adds the counters to the gateway's registry.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "clawmesh_invokes",
            "Node invokes run by this gateway, by command and outcome (ok, refused, timeout, cancelled, error)",
            self.invokes.clone(),
        );
        r.register(
            "clawmesh_invoke_duration_seconds",
            "Time from dispatch to the node's answer, by command",
            self.invoke_seconds.clone(),
        );
        r.register(
            "clawmesh_invoke_commands_overflow",
            "Invokes counted under command=\"other\" because too many distinct commands were seen",
            self.commands_overflow.clone(),
        );
        r.register(
            "clawmesh_config_writes",
            "Shared-config writes through this gateway, by outcome",
            self.config_writes.clone(),
        );
    }

    /// The command as a label value: its own name for the first [`MAX_COMMANDS`] seen.
    fn command_label(&self, command: &str) -> String {
        let mut seen = self.commands.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(command) {
            return command.to_string();
        }
        if seen.len() < MAX_COMMANDS {
            seen.insert(command.to_string());
            return command.to_string();
        }
        self.commands_overflow.inc();
        "other".into()
    }

    /// One invoke ended with `outcome` after `elapsed`.
    pub fn invoke_done(&self, command: &str, outcome: &str, elapsed: Duration) {
        let command = self.command_label(command);
        self.invokes
            .get_or_create(&vec![
                ("command", command.clone()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        self.invoke_seconds
            .get_or_create(&vec![("command", command)])
            .observe(elapsed.as_secs_f64());
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// One shared-config write ended with `outcome` (`ok` or the error's kind).
    pub fn config_write(&self, outcome: &str) {
        self.config_writes
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// Events counted so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// The outcome label of a shared-config write.
pub fn write_outcome<T>(r: &Result<T, ConsensusError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(ConsensusError::NoQuorum { .. }) => "no_quorum",
        Err(ConsensusError::NoLeader(_)) => "no_leader",
        Err(ConsensusError::NotAcknowledged(_)) => "not_acknowledged",
        Err(ConsensusError::Invalid(_)) => "invalid",
        Err(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_are_bounded() {
        let i = Instruments::default();
        for n in 0..MAX_COMMANDS + 10 {
            i.invoke_done(&format!("cmd.{n}"), "ok", Duration::from_millis(3));
        }
        i.invoke_done("cmd.0", "error", Duration::from_millis(3));
        assert_eq!(i.commands_overflow.get(), 10);
        let other = vec![("command", "other".to_string()), ("outcome", "ok".into())];
        assert_eq!(i.invokes.get(&other).map(|c| c.get()), Some(10));
        assert_eq!(i.events(), MAX_COMMANDS as u64 + 11);
    }
}
