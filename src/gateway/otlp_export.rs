//! OTLP/HTTP export: the collector (the current primary) sends what its store holds to an
//! OpenTelemetry endpoint (`POST <endpoint>/v1/logs`, `Content-Type: application/x-protobuf`),
//! for fleets whose logs outgrow one collector (Loki 3, an OpenTelemetry Collector, Vector).
//!
//! Driven by a durable cursor in the store (`Collector::export_cursor("otlp")`), never by an
//! in-memory queue: each round reads the next `batchSize` records after the cursor, posts
//! them, and moves the cursor only after a 2xx answer. A failed post is retried from the
//! store with backoff (0.5 s doubling to 30 s), however long the endpoint is down; records
//! the store's own limits remove meanwhile are counted there (`store_dropped`). After a
//! restart the export resumes at the cursor; after a failover the new primary exports from
//! its own store's cursor. A receiver may therefore get a batch twice (the gateway died
//! between the receiver's answer and the cursor write; a new primary re-exports records the
//! old one had sent): every log record carries `clawmesh.origin` and `clawmesh.seq`, the key
//! to drop such duplicates by.
//!
//! Settings (shared config, applied live): `logging.export.otlp.endpoint` (a base URL such as
//! `http://otel:4318`, or the full `.../v1/logs`), `logging.export.otlp.headers` (an object of
//! extra request headers, e.g. an authorization), `logging.export.otlp.batchSize` (records per
//! request, default 1000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clawmesh_federation::logs::collector::{Collector, Query};
use clawmesh_federation::logs::otlp;
use clawmesh_federation::mesh::Mesh;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The export's name in the store (its cursor's key).
pub const EXPORT_NAME: &str = "otlp";

/// Records per request unless `logging.export.otlp.batchSize` says otherwise: about 200 KB of
/// protobuf for typical lines, well inside receivers' default body limits (4 MiB and up).
pub const DEFAULT_BATCH: usize = 1000;

/// `logging.export.otlp.*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The URL records are posted to (`.../v1/logs`); `None`: no export.
    pub url: Option<String>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Records per request.
    pub batch_size: usize,
}

impl OtlpSettings {
    /// Reads the settings from shared-config values looked up by `get`; an invalid value is
    /// reported and leaves the export off (or at the default for `batchSize`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<Value>) -> (OtlpSettings, Vec<String>) {
        let mut warnings = Vec::new();
        let url = match get("logging.export.otlp.endpoint") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.starts_with("http://") || s.starts_with("https://") => {
                let base = s.trim_end_matches('/');
                Some(if base.ends_with("/v1/logs") {
                    base.to_string()
                } else {
                    format!("{base}/v1/logs")
                })
            }
            Some(other) => {
                warnings.push(format!(
                    "logging.export.otlp.endpoint must be an http:// or https:// URL, not {other}; export off"
                ));
                None
            }
        };
        let mut headers = Vec::new();
        match get("logging.export.otlp.headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    match v {
                        Value::String(v) => headers.push((k, v)),
                        other => warnings.push(format!(
                            "logging.export.otlp.headers.{k} must be a string, not {other}; left out"
                        )),
                    }
                }
            }
            Some(other) => warnings.push(format!(
                "logging.export.otlp.headers must be an object of strings, not {other}"
            )),
        }
        let batch_size = match get("logging.export.otlp.batchSize") {
            None | Some(Value::Null) => DEFAULT_BATCH,
            // 1 to 100 000: the store answers at most 100 000 records per read.
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| (1..=100_000).contains(&n)) => {
                n.as_u64().unwrap_or(DEFAULT_BATCH as u64) as usize
            }
            Some(other) => {
                warnings.push(format!(
                    "logging.export.otlp.batchSize must be 1 to 100000, not {other}; using {DEFAULT_BATCH}"
                ));
                DEFAULT_BATCH
            }
        };
        (
            OtlpSettings {
                url,
                headers,
                batch_size,
            },
            warnings,
        )
    }
}

/// Counters of the export, for status.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Records the endpoint accepted.
    pub exported: AtomicU64,
    /// Requests that failed (each retried).
    pub failures: AtomicU64,
}

/// Starts the export loop; it idles until settings with an endpoint arrive on `settings` and
/// while this gateway is not the primary.
pub fn spawn(
    mesh: Mesh,
    collector: Collector,
    settings: watch::Receiver<OtlpSettings>,
) -> Arc<ExportStats> {
    let stats = Arc::new(ExportStats::default());
    tokio::spawn(run(mesh, collector, settings, stats.clone()));
    stats
}

/// First retry after a failed post; doubled after each failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Retries of a long outage every 30 s: little load on a down endpoint, yet a recovered one
/// is found within half a minute.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One request may take 30 s (a large batch to a slow endpoint); longer is a failure, retried.
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one read waits for new records before looking at the settings and the primary
/// again.
const IDLE_WAIT: Duration = Duration::from_secs(2);

async fn run(
    mesh: Mesh,
    collector: Collector,
    mut settings: watch::Receiver<OtlpSettings>,
    stats: Arc<ExportStats>,
) {
    // reqwest with rustls-no-provider needs a process-wide provider; ring is the project's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder().timeout(POST_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            warn!("OTLP export off: cannot build an HTTP client: {e}");
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let cfg = settings.borrow_and_update().clone();
        let Some(url) = cfg.url.clone() else {
            if settings.changed().await.is_err() {
                return;
            }
            continue;
        };
        if mesh.primary_key() != Some(mesh.key()) {
            // Only the collector exports; a gateway that becomes primary starts here.
            tokio::select! {
                _ = tokio::time::sleep(IDLE_WAIT) => {}
                r = settings.changed() => if r.is_err() { return },
            }
            continue;
        }
        match export_once(&client, &collector, &url, &cfg).await {
            Ok(0) => {}
            Ok(n) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(url = %url, retry_in = ?backoff, "OTLP export: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    r = settings.changed() => if r.is_err() { return },
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Posts the next batch after the cursor; returns how many records the endpoint took.
async fn export_once(
    client: &reqwest::Client,
    collector: &Collector,
    url: &str,
    cfg: &OtlpSettings,
) -> Result<u64, String> {
    let c = collector.clone();
    let cursor = tokio::task::spawn_blocking(move || c.export_cursor(EXPORT_NAME))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let reply = collector
        .query(&Query {
            after_id: Some(cursor),
            limit: cfg.batch_size,
            wait_ms: IDLE_WAIT.as_millis() as u64,
            ..Query::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let Some(last) = reply.records.last().map(|s| s.id) else {
        return Ok(0);
    };
    let n = reply.records.len() as u64;
    let body = otlp::encode(&reply.records);
    let mut req = client
        .post(url)
        .header("Content-Type", "application/x-protobuf")
        .body(body);
    for (k, v) in &cfg.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.send().await.map_err(|e| format!("post failed: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!(
            "endpoint answered {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    let c = collector.clone();
    tokio::task::spawn_blocking(move || c.set_export_cursor(EXPORT_NAME, last))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    debug!(records = n, upto = last, "OTLP export: batch accepted");
    if cursor == 0 {
        info!(url = %url, "OTLP export started");
    }
    Ok(n)
}
