//! The gateway's logs: its spool, the hand-off every log call of this process goes through,
//! the shipper to the primary, the collector it serves while it is the primary, and the audit
//! trail of `node.invoke`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use clawmesh_federation::logs::audit::{AuditWriter, AUDIT_CAPACITY};
use clawmesh_federation::logs::collector::{Collector, Query, QueryReply};
use clawmesh_federation::logs::layer::{start_writer, Handoff, HANDOFF_CAPACITY};
use clawmesh_federation::logs::record::{Audit, Entry};
use clawmesh_federation::logs::service::{self, LogService, MeshRouter};
use clawmesh_federation::logs::ship::{ShipConfig, Shipper};
use clawmesh_federation::logs::spool::{Lag, Spool};
use clawmesh_federation::mesh::Mesh;
use clawmesh_federation::wire::WireError;
use tokio::sync::watch;

use super::otlp_export::{self, OtlpSettings};
use super::settings::RemoteLogs;

/// Records a node may send in one `node.logs` request: a node flushes every second, so this
/// is a burst of 10 000 lines a second from one node; more is refused, not queued.
pub const MAX_NODE_BATCH: usize = 10_000;

/// The running log machinery of one gateway; cheap to clone.
#[derive(Clone)]
pub struct GatewayLogs {
    spool: Spool,
    collector: Collector,
    handoff: Handoff,
    audit: AuditWriter,
    mesh: Mesh,
    _shipper: Option<Arc<Shipper>>,
    otlp: Arc<watch::Sender<OtlpSettings>>,
}

impl GatewayLogs {
    /// Opens the spool and the store in `state_dir`, starts the writer, serves `logs.*` to
    /// other gateways, and (unless `logging.remote.enabled` is false) sends this process's
    /// log events to the spool and ships them to the primary.
    pub fn start(state_dir: &Path, mesh: &Mesh, remote: &RemoteLogs) -> Result<GatewayLogs> {
        let name = mesh.config().name.clone();
        let spool = Spool::open(state_dir, remote.spool).context("opening the log spool")?;
        let collector =
            Collector::open(state_dir, remote.store).context("opening the log store")?;
        let handoff = start_writer(spool.clone(), &name, HANDOFF_CAPACITY)
            .context("starting the log writer")?;
        let audit = AuditWriter::start(spool.clone(), &name, AUDIT_CAPACITY)
            .context("starting the audit writer")?;
        mesh.attach_log_service(Arc::new(LogService::new(mesh.clone(), collector.clone())));
        let shipper = if remote.enabled {
            crate::logging::attach_spool(handoff.clone());
            let cfg = ShipConfig {
                interval: remote.batch_interval,
                ..ShipConfig::new(&name)
            };
            Some(Arc::new(Shipper::spawn(
                spool.clone(),
                Arc::new(MeshRouter::new(mesh.clone(), collector.clone())),
                cfg,
            )))
        } else {
            None
        };
        let (otlp, otlp_rx) = watch::channel(OtlpSettings::default());
        otlp_export::spawn(mesh.clone(), collector.clone(), otlp_rx);
        Ok(GatewayLogs {
            spool,
            collector,
            handoff,
            audit,
            mesh: mesh.clone(),
            _shipper: shipper,
            otlp: Arc::new(otlp),
        })
    }

    /// This gateway's shipping lag: records spooled and not yet acknowledged by the collector,
    /// and the time of the oldest (status `logShipping`, the metric `log shipping lag`).
    pub fn shipping_lag(&self) -> Result<Lag, clawmesh_federation::logs::LogError> {
        self.spool.lag()
    }

    /// Applies `logging.export.otlp.*` (the export runs while this gateway is the primary).
    pub fn set_otlp(&self, s: OtlpSettings) {
        self.otlp.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s;
            changed
        });
    }

    /// Hands an audit record to the audit writer (its own bounded queue, not the log
    /// hand-off, whatever the log level); never waits. A full queue drops and counts it
    /// (see [`clawmesh_federation::logs::audit`]).
    pub fn audit(&self, a: Audit) {
        self.audit.offer(a);
    }

    /// Audit records dropped by a full audit queue since the start (`/metrics`).
    pub fn audit_dropped(&self) -> u64 {
        self.audit.dropped()
    }

    /// Waits (at most `deadline`) until every audit record handed over so far is in the
    /// spool: the gateway's stop calls it, so no answered invoke loses its record.
    pub async fn flush_audit(&self, deadline: std::time::Duration) -> bool {
        self.audit.flush(deadline).await
    }

    /// The spool's counts (records held, unacknowledged: the shipping lag in records) and
    /// the shipper's counters, if this gateway ships (for `/metrics`).
    pub fn shipping_stats(
        &self,
    ) -> (
        Option<clawmesh_federation::logs::spool::SpoolStats>,
        Option<Arc<clawmesh_federation::logs::ship::ShipStats>>,
    ) {
        (
            self.spool.stats().ok(),
            self._shipper.as_ref().map(|s| s.stats().clone()),
        )
    }

    /// How far behind this gateway's log shipping is: the age of its oldest record no collector
    /// has acknowledged (zero when everything is acknowledged); `None` when it does not ship
    /// (`logging.remote.enabled: false`) or the spool cannot be read.
    pub fn shipping_lag_age(&self) -> Option<std::time::Duration> {
        self._shipper.as_ref()?;
        let oldest = self.spool.oldest_unacked_ms().ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis() as u64;
        Some(std::time::Duration::from_millis(
            oldest.map_or(0, |t| now.saturating_sub(t)),
        ))
    }

    /// Takes records a node sent (`node.logs`); `lost` counts what the node's own hand-off
    /// dropped.
    pub fn from_node(&self, node: &str, entries: Vec<Entry>, lost: u64) {
        self.handoff.count_lost(node, lost);
        for mut e in entries {
            e.node = Some(node.to_string());
            // A node's audit records are not trusted: the gateway writes its own.
            e.audit = None;
            if e.level == clawmesh_federation::logs::record::Level::Audit {
                e.level = clawmesh_federation::logs::record::Level::Info;
            }
            self.handoff.offer(e);
        }
    }

    /// Answers `logs.query` from the primary's store; also names the gateway that answered.
    pub async fn query(&self, q: &Query) -> Result<(String, QueryReply), WireError> {
        service::query(&self.mesh, &self.collector, q)
            .await
            .map_err(|e| {
                let mut w = WireError::new("UNAVAILABLE", e.to_string());
                w.retryable = true;
                w
            })
    }
}
