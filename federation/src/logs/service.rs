//! Log collection over the mesh: the `logs.*` requests between gateways.
//!
//! - `logs.cursor` and `logs.push`: a shipper asks the primary what it holds, then sends
//!   batches; only the gateway that is the primary right now answers them, so records never
//!   pile up on a gateway nobody queries (a shipper that asked the wrong one asks again at the
//!   next batch, when its view of the primary has caught up);
//! - `logs.query`: any gateway forwards `clawmesh logs` to the primary it knows.
//!
//! Payloads are postcard, deflated when large, base64 in the request text (the encoding of the
//! raft RPCs, [`crate::consensus::network::encode`]).

use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;

use super::collector::{Batch, Collector, Query, QueryReply};
use super::ship::{Destination, LocalDestination, Router, ShipError, ORDER_WAIT};
use crate::consensus::network::{decode, encode, encode_at};
use crate::identity::PublicKey;
use crate::mesh::{Mesh, PeerService};
use crate::rpc::{self, BoxFuture};
use crate::wire::{Request, WireError};

/// Shipper method: what the collector holds.
pub const METHOD_CURSOR: &str = "logs.cursor";
/// Shipper method: one batch.
pub const METHOD_PUSH: &str = "logs.push";
/// Query method, forwarded to the primary.
pub const METHOD_QUERY: &str = "logs.query";

/// A batch must be stored and acknowledged within this: 30 s covers a 2 MiB batch over a
/// slow WAN path plus an fsync; a collector that takes longer is treated as gone and the
/// batch is sent again (deduplicated) to whoever is primary then.
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// A query waits at most 30 s at the collector (its long-poll bound) plus 10 s for the hops.
const QUERY_TIMEOUT: Duration = Duration::from_secs(40);

/// Serves `logs.*` from other gateways with this gateway's collector.
#[derive(Debug, Clone)]
pub struct LogService {
    mesh: Mesh,
    collector: Collector,
}

impl LogService {
    /// The service over `collector`, answering shipments only while `mesh` says this gateway
    /// is the primary.
    pub fn new(mesh: Mesh, collector: Collector) -> LogService {
        LogService { mesh, collector }
    }

    fn is_primary(&self) -> bool {
        self.mesh.primary_key() == Some(self.mesh.key())
    }
}

fn not_primary() -> WireError {
    let mut e = WireError::new(
        "NOT_PRIMARY",
        "this gateway is not the primary; logs go to the primary",
    );
    e.retryable = true;
    e
}

fn bad(e: impl std::fmt::Display) -> WireError {
    WireError::new("INVALID_REQUEST", e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> WireError {
    let mut w = WireError::new("UNAVAILABLE", e.to_string());
    w.retryable = true;
    w
}

impl PeerService for LogService {
    fn handle(&self, _from: PublicKey, req: Request) -> BoxFuture<Result<String, WireError>> {
        let me = self.clone();
        Box::pin(async move {
            let ships = req.method == METHOD_CURSOR || req.method == METHOD_PUSH;
            if ships && !me.is_primary() {
                return Err(not_primary());
            }
            answer(&me.collector, &req).await
        })
    }
}

/// Answers one `logs.*` request from `collector` (the caller checked that it should).
pub async fn answer(collector: &Collector, req: &Request) -> Result<String, WireError> {
    match req.method.as_str() {
        METHOD_CURSOR => {
            let c = collector.clone();
            let cur = tokio::task::spawn_blocking(move || c.cursor())
                .await
                .map_err(unavailable)?
                .map_err(unavailable)?;
            encode(&cur, true).map_err(unavailable)
        }
        METHOD_PUSH => {
            let batch: Batch = decode(&req.params).map_err(bad)?;
            let ack = collector
                .ingest_in_order(batch, ORDER_WAIT)
                .await
                .map_err(unavailable)?;
            encode(&ack, true).map_err(unavailable)
        }
        METHOD_QUERY => {
            let q: Query = decode(&req.params).map_err(bad)?;
            let reply = collector.query(&q).await.map_err(unavailable)?;
            encode(&reply, true).map_err(unavailable)
        }
        other => Err(WireError::new(
            "INVALID_REQUEST",
            format!("unknown method {other}"),
        )),
    }
}

/// Finds the live connection to a collector (the mesh link to the primary).
pub type ConnFn = Arc<dyn Fn() -> Option<Connection> + Send + Sync>;

/// A collector on another gateway, reached over its mesh link.
#[derive(Clone)]
pub struct RemoteDestination {
    name: String,
    conn: ConnFn,
}

impl std::fmt::Debug for RemoteDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDestination")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RemoteDestination {
    /// The collector `name`, reached over whatever connection `conn` finds at each call.
    pub fn new(name: &str, conn: ConnFn) -> RemoteDestination {
        RemoteDestination {
            name: name.to_string(),
            conn,
        }
    }

    /// The collector on the gateway with `key`, over its mesh link.
    fn on_mesh(mesh: &Mesh, key: PublicKey, name: &str) -> RemoteDestination {
        let mesh = mesh.clone();
        RemoteDestination::new(name, Arc::new(move || mesh.connection_by_key(&key)))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        params: String,
        timeout: Duration,
    ) -> Result<T, ShipError> {
        let unreachable = |reason: String| ShipError::Unreachable {
            collector: self.name.clone(),
            reason,
        };
        let conn = (self.conn)().ok_or_else(|| unreachable("no link".into()))?;
        let text = rpc::call(&conn, method, params, 1, timeout)
            .await
            .map_err(|e| match e {
                rpc::CallError::Remote(w) => ShipError::Refused {
                    collector: self.name.clone(),
                    reason: w.message,
                },
                other => unreachable(other.to_string()),
            })?;
        decode(&text).map_err(|e| ShipError::Refused {
            collector: self.name.clone(),
            reason: e.to_string(),
        })
    }
}

impl Destination for RemoteDestination {
    fn cursor(&self) -> BoxFuture<Result<super::collector::Cursor, ShipError>> {
        let me = self.clone();
        Box::pin(async move { me.call(METHOD_CURSOR, String::new(), PUSH_TIMEOUT).await })
    }

    fn push(&self, batch: Batch) -> BoxFuture<Result<super::collector::Ack, ShipError>> {
        let me = self.clone();
        Box::pin(async move {
            // Deflate level 1: a batch of log lines still shrinks about eightfold, at a
            // fraction of the CPU of the raft payloads' level.
            let params = encode_at(&batch, 1).map_err(|e| ShipError::Refused {
                collector: me.name.clone(),
                reason: e.to_string(),
            })?;
            me.call(METHOD_PUSH, params, PUSH_TIMEOUT).await
        })
    }
}

/// Routes shipments to whoever the mesh says is the primary (this gateway's own store when
/// it is the primary).
#[derive(Debug, Clone)]
pub struct MeshRouter {
    mesh: Mesh,
    local: Collector,
}

impl MeshRouter {
    /// A router over `mesh`, with `local` as this gateway's store.
    pub fn new(mesh: Mesh, local: Collector) -> MeshRouter {
        MeshRouter { mesh, local }
    }
}

impl Router for MeshRouter {
    fn route(&self) -> Option<(String, Arc<dyn Destination>)> {
        let key = self.mesh.primary_key()?;
        let name = self.mesh.member_name(&key)?;
        if key == self.mesh.key() {
            return Some((name, Arc::new(LocalDestination(self.local.clone()))));
        }
        let dest = RemoteDestination::on_mesh(&self.mesh, key, &name);
        Some((name, Arc::new(dest)))
    }
}

/// Answers `clawmesh logs` on any gateway: from the local store on the primary, else from
/// the primary over the mesh. Also says which gateway answered.
pub async fn query(
    mesh: &Mesh,
    local: &Collector,
    q: &Query,
) -> Result<(String, QueryReply), ShipError> {
    let key = mesh.primary_key().ok_or_else(|| ShipError::Unreachable {
        collector: "primary".into(),
        reason: "no primary right now (election under way?)".into(),
    })?;
    let name = mesh.member_name(&key).unwrap_or_else(|| "primary".into());
    if key == mesh.key() {
        let reply = local.query(q).await.map_err(|e| ShipError::Refused {
            collector: name.clone(),
            reason: e.to_string(),
        })?;
        return Ok((name, reply));
    }
    let dest = RemoteDestination::on_mesh(mesh, key, &name);
    let params = encode(q, true).map_err(|e| ShipError::Refused {
        collector: name.clone(),
        reason: e.to_string(),
    })?;
    let reply = dest.call(METHOD_QUERY, params, QUERY_TIMEOUT).await?;
    Ok((name, reply))
}
