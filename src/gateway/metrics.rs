//! `/metrics`: the gateway in the Prometheus text format (`prometheus-client`), served on the
//! gateway's HTTP port by the bridge router.
//!
//! The registry belongs to the gateway ([`GatewayMetrics`], no globals). It holds the event
//! counters of [`crate::gateway::instruments`] (invokes, config writes) and one collector
//! that reads, at scrape time, what the gateway already keeps: the mesh's links and their
//! health, the consensus, the node registry, the bridge's connections, the log spool, this
//! process (from `/proc/self` and `getrusage`) and the host vitals of every gateway and node
//! of the federation (its own, its links', the ones relayed by other gateways).
//!
//! Series (all gauges unless noted):
//! - `clawmesh_gateway_info{name,region,version}` 1;
//! - `clawmesh_link_up`, `clawmesh_link_health{state}` (1 for the current of healthy,
//!   degraded, offline), `clawmesh_link_rtt_seconds` (median), `clawmesh_link_rtt_p99_seconds`,
//!   `clawmesh_link_missed_pings`, each `{peer}`;
//! - `clawmesh_raft_term`, `clawmesh_raft_leader{leader}` 1, `clawmesh_raft_is_leader`,
//!   `clawmesh_raft_commit_index`, `clawmesh_raft_applied_index`, `clawmesh_raft_last_log_index`,
//!   `clawmesh_raft_voters`, `clawmesh_raft_reachable_voters`, `clawmesh_raft_quorum`,
//!   `clawmesh_config_revision`; counter `clawmesh_config_writes_total{outcome}`;
//! - `clawmesh_nodes_attached{transport}` (quic, ws); counters `clawmesh_invokes_total{command,
//!   outcome}`, histogram `clawmesh_invoke_duration_seconds{command}`;
//! - counters `clawmesh_directory_full_diffs_total` and `clawmesh_alert_full_reads_total`: how
//!   often the directory announcement and the alert rows read every attached node instead of
//!   the registry's change set (`crate::gateway::node_changes`);
//! - `clawmesh_bridge_connections`;
//! - `clawmesh_log_spool_records`, `clawmesh_log_spool_unacked_records` (the shipping lag),
//!   `clawmesh_log_spool_bytes`; counters `clawmesh_log_shipped_records_total`,
//!   `clawmesh_log_ship_failures_total`, `clawmesh_audit_dropped_total` (audit records a full
//!   audit queue dropped);
//! - `process_resident_memory_bytes`, `process_cpu_seconds_total` (counter),
//!   `process_open_fds`, `process_max_fds`;
//! - `clawmesh_host_*{kind,name,id,gateway}` for every gateway (`kind="gateway"`) and native
//!   node (`kind="node"`, `gateway` the one it is attached to): `load1`, `load5`, `load15`,
//!   `cpus`, `cpu_usage_ratio`, `memory_usage_ratio`, `memory_total_bytes`,
//!   `disk_usage_ratio`, `disk_total_bytes`, `uptime_seconds`, `vitals_age_seconds`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use clawmesh_federation::health::Status;
use clawmesh_federation::vitals::{Received, Vitals};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::gateway::instruments::Labels;
use crate::gateway::methods::Methods;

/// The `Content-Type` of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The gateway's registry.
#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
}

impl GatewayMetrics {
    /// A registry over the gateway's method table (its mesh, consensus, nodes, logs and
    /// counters) and the bridge's connection count.
    pub fn new(methods: Methods, bridge_connections: Arc<AtomicUsize>) -> Self {
        let mut registry = Registry::default();
        methods.instruments().register(&mut registry);
        registry.register_collector(Box::new(Scrape {
            methods,
            bridge_connections,
        }));
        GatewayMetrics { registry }
    }

    /// One scrape, in the Prometheus text format. Reads SQLite (the spool's counts): call it
    /// off the async threads.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// What is read at scrape time.
struct Scrape {
    methods: Methods,
    bridge_connections: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Fmt = Result<(), std::fmt::Error>;

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Clone + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> Fmt {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Fmt {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

/// One gauge family: a series per label set.
fn gauges<'a, V: prometheus_client::encoding::EncodeGaugeValue + 'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (&'a Labels, V)>,
) -> Fmt {
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in series {
        m.encode_family(labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn label(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

fn b(x: bool) -> i64 {
    i64::from(x)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        self.gateway(&mut enc)?;
        self.consensus(&mut enc)?;
        self.nodes_and_logs(&mut enc)?;
        process(&mut enc)?;
        self.hosts(&mut enc)
    }
}

impl Scrape {
    fn gateway(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let Some(mesh) = self.methods.mesh_view() else {
            return Ok(());
        };
        let st = mesh.status();
        let me = st.gateways.iter().find(|g| g.is_self);
        let info = vec![
            ("name", st.self_name.clone()),
            (
                "region",
                me.and_then(|g| g.region.clone()).unwrap_or_default(),
            ),
            ("version", crate::VERSION.to_string()),
        ];
        gauges(
            enc,
            "clawmesh_gateway_info",
            "This gateway: name, region, version",
            [(&info, 1i64)],
        )?;
        let peers: Vec<_> = st
            .gateways
            .iter()
            .filter(|g| !g.is_self)
            .map(|g| (label("peer", g.name.clone()), g))
            .collect();
        gauges(
            enc,
            "clawmesh_link_up",
            "Whether a link to the peer gateway is up",
            peers
                .iter()
                .map(|(l, g)| (l, b(g.status != Status::Offline))),
        )?;
        let states: Vec<(Labels, i64)> = peers
            .iter()
            .flat_map(|(_, g)| {
                [Status::Healthy, Status::Degraded, Status::Offline]
                    .into_iter()
                    .map(move |s| {
                        (
                            vec![("peer", g.name.clone()), ("state", s.as_str().to_string())],
                            b(g.status == s),
                        )
                    })
            })
            .collect();
        gauges(
            enc,
            "clawmesh_link_health",
            "The peer's health verdict: 1 for its current state",
            states.iter().map(|(l, v)| (l, *v)),
        )?;
        gauges(
            enc,
            "clawmesh_link_rtt_seconds",
            "Median recent round trip of the health pings to the peer",
            peers
                .iter()
                .filter_map(|(l, g)| Some((l, g.latency?.as_secs_f64()))),
        )?;
        gauges(
            enc,
            "clawmesh_link_rtt_p99_seconds",
            "99th percentile recent round trip of the health pings to the peer",
            peers
                .iter()
                .filter(|(_, g)| g.status != Status::Offline)
                .filter_map(|(l, g)| Some((l, g.latency_p99?.as_secs_f64()))),
        )?;
        gauges(
            enc,
            "clawmesh_link_missed_pings",
            "Health pings to the peer missed in a row",
            peers.iter().map(|(l, g)| (l, i64::from(g.missed))),
        )
    }

    fn consensus(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let Some(c) = self.methods.consensus_view() else {
            return Ok(());
        };
        let me = self
            .methods
            .mesh_view()
            .map(|m| m.config().name.clone())
            .unwrap_or_default();
        gauge(
            enc,
            "clawmesh_raft_term",
            "Current raft term",
            c.term as i64,
        )?;
        let leader = label("leader", c.leader.clone().unwrap_or_default());
        gauges(
            enc,
            "clawmesh_raft_leader",
            "The raft leader (the federation's primary) as seen here; empty when none",
            [(&leader, 1i64)],
        )?;
        gauge(
            enc,
            "clawmesh_raft_is_leader",
            "Whether this gateway is the primary",
            b(c.leader.as_deref() == Some(me.as_str())),
        )?;
        gauge(
            enc,
            "clawmesh_raft_commit_index",
            "Last entry known committed here",
            c.commit as i64,
        )?;
        gauge(
            enc,
            "clawmesh_raft_applied_index",
            "Last entry applied here",
            c.applied as i64,
        )?;
        gauge(
            enc,
            "clawmesh_raft_last_log_index",
            "Last entry in the local log",
            c.last_log as i64,
        )?;
        gauge(
            enc,
            "clawmesh_raft_voters",
            "Voting gateways",
            c.voters.len() as i64,
        )?;
        gauge(
            enc,
            "clawmesh_raft_reachable_voters",
            "Voting gateways reachable from here, this one included",
            c.reachable_voters as i64,
        )?;
        gauge(
            enc,
            "clawmesh_raft_quorum",
            "Whether a majority of voters is reachable",
            b(c.quorum),
        )?;
        gauge(
            enc,
            "clawmesh_config_revision",
            "The shared config's revision applied here",
            c.applied as i64,
        )
    }

    fn nodes_and_logs(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let (quic, ws) = self.methods.nodes().count_by_transport();
        let (lq, lw) = (label("transport", "quic"), label("transport", "ws"));
        gauges(
            enc,
            "clawmesh_nodes_attached",
            "Nodes attached to this gateway, by transport",
            [(&lq, quic as i64), (&lw, ws as i64)],
        )?;
        let full = self.methods.nodes().full_reads();
        counter(
            enc,
            "clawmesh_directory_full_diffs",
            "Times the local node directory was diffed in full (first run, or more node changes than the registry's change log keeps) instead of per change",
            full.directory.load(Ordering::Relaxed),
        )?;
        counter(
            enc,
            "clawmesh_alert_full_reads",
            "Times the alert rows read every attached node (first run, or more node changes than the registry's change log keeps) instead of per change",
            full.alerts.load(Ordering::Relaxed),
        )?;
        gauge(
            enc,
            "clawmesh_bridge_connections",
            "Open classic WebSocket connections (operators and nodes)",
            self.bridge_connections.load(Ordering::Relaxed) as i64,
        )?;
        let Some(logs) = self.methods.logs_view() else {
            return Ok(());
        };
        counter(
            enc,
            "clawmesh_audit_dropped",
            "Audit records dropped because the audit writer's queue was full",
            logs.audit_dropped(),
        )?;
        let (spool, ship) = logs.shipping_stats();
        if let Some(s) = spool {
            gauge(
                enc,
                "clawmesh_log_spool_records",
                "Log records held in this gateway's spool",
                s.records as i64,
            )?;
            gauge(
                enc,
                "clawmesh_log_spool_unacked_records",
                "Log records not yet acknowledged by the collector: the shipping lag",
                s.unacked as i64,
            )?;
            gauge(
                enc,
                "clawmesh_log_spool_bytes",
                "Log record bytes held in the spool",
                s.bytes as i64,
            )?;
        }
        if let Some(s) = ship {
            counter(
                enc,
                "clawmesh_log_shipped_records",
                "Log records acknowledged by the collector",
                s.acked.load(Ordering::Relaxed),
            )?;
            counter(
                enc,
                "clawmesh_log_ship_failures",
                "Failed shipping attempts",
                s.failures.load(Ordering::Relaxed),
            )?;
        }
        Ok(())
    }

    /// Every host of the federation this gateway knows vitals of.
    fn hosts(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let Some(mesh) = self.methods.mesh_view() else {
            return Ok(());
        };
        let me = mesh.config().name.clone();
        let short = |id: &clawmesh_federation::identity::DeviceId| {
            id.to_string().chars().take(12).collect::<String>()
        };
        let host = |kind: &str, name: String, id: String, gw: String| -> Labels {
            vec![
                ("kind", kind.to_string()),
                ("name", name),
                ("id", id),
                ("gateway", gw),
            ]
        };
        let mut hosts: Vec<(Labels, Received)> = Vec::new();
        for g in mesh.status().gateways {
            if let Some(v) = g.vitals {
                let id = short(&g.device_id);
                hosts.push((host("gateway", g.name.clone(), id, g.name), v));
            }
        }
        for (id, name, v) in self.methods.nodes().vitals() {
            hosts.push((host("node", name, short(&id), me.clone()), v));
        }
        for (gw, id, name, v) in mesh.remote_node_vitals() {
            hosts.push((host("node", name, short(&id), gw), v));
        }
        type Get = fn(&Vitals) -> Option<f64>;
        let series: [(&str, &str, Get); 10] = [
            ("clawmesh_host_load1", "Load average over 1 minute", |v| {
                v.load().map(|l| l[0])
            }),
            ("clawmesh_host_load5", "Load average over 5 minutes", |v| {
                v.load().map(|l| l[1])
            }),
            (
                "clawmesh_host_load15",
                "Load average over 15 minutes",
                |v| v.load().map(|l| l[2]),
            ),
            ("clawmesh_host_cpus", "Online CPUs", |v| {
                (v.cpus > 0).then_some(f64::from(v.cpus))
            }),
            (
                "clawmesh_host_cpu_usage_ratio",
                "Busy share of all CPUs between the last two readings (0 to 1)",
                |v| v.cpu_permille.map(|p| f64::from(p) / 1000.0),
            ),
            (
                "clawmesh_host_memory_usage_ratio",
                "Memory in use (MemTotal - MemAvailable) over MemTotal",
                |v| v.mem_pct().map(|p| p / 100.0),
            ),
            ("clawmesh_host_memory_total_bytes", "MemTotal", |v| {
                v.mem.map(|m| m.total_kib as f64 * 1024.0)
            }),
            (
                "clawmesh_host_disk_usage_ratio",
                "Use of the filesystem holding the state dir, as df counts it (0 to 1)",
                |v| v.disk_pct().map(|p| p / 100.0),
            ),
            (
                "clawmesh_host_disk_total_bytes",
                "Size of the filesystem holding the state dir",
                |v| v.disk.map(|d| d.total_kib as f64 * 1024.0),
            ),
            (
                "clawmesh_host_uptime_seconds",
                "Time since the host booted",
                |v| v.uptime_s.map(|s| s as f64),
            ),
        ];
        for (name, help, get) in series {
            gauges(
                enc,
                name,
                help,
                hosts.iter().filter_map(|(l, r)| Some((l, get(&r.vitals)?))),
            )?;
        }
        gauges(
            enc,
            "clawmesh_host_vitals_age_seconds",
            "How old the host's last reading is, as far as this gateway knows",
            hosts.iter().map(|(l, r)| (l, r.age().as_secs_f64())),
        )
    }
}

/// This process: resident memory, CPU time, open and allowed file descriptors.
fn process(enc: &mut DescriptorEncoder) -> Fmt {
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| vm_rss_bytes(&t))
    {
        gauge(
            enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            rss as i64,
        )?;
    }
    if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let c = ConstCounter::new(secs(u.user_time()) + secs(u.system_time()));
        c.encode(enc.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            c.metric_type(),
        )?)?;
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            enc,
            "process_open_fds",
            "Number of open file descriptors",
            fds.count() as i64,
        )?;
    }
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        gauge(
            enc,
            "process_max_fds",
            "Maximum number of open file descriptors",
            i64::try_from(soft).unwrap_or(i64::MAX),
        )?;
    }
    Ok(())
}

/// `VmRSS` of `/proc/self/status`, in bytes.
pub fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_from_proc_status() {
        let t = "Name:\tclawmesh\nVmPeak:\t  9000 kB\nVmRSS:\t  1234 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(t), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name: x\n"), None);
    }

    #[test]
    fn a_bare_method_table_scrapes() {
        let dir = tempfile::tempdir().unwrap();
        let methods = Methods::bare(dir.path());
        methods
            .instruments()
            .invoke_done("system.run", "ok", std::time::Duration::from_millis(20));
        let m = GatewayMetrics::new(methods, Arc::new(AtomicUsize::new(3)));
        let text = m.encode().unwrap();
        for want in [
            "clawmesh_nodes_attached{transport=\"quic\"} 0",
            "clawmesh_bridge_connections 3",
            "clawmesh_invokes_total{command=\"system.run\",outcome=\"ok\"} 1",
            "clawmesh_invoke_duration_seconds_bucket{command=\"system.run\",le=\"0.032\"} 1",
            "process_open_fds ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
    }
}
