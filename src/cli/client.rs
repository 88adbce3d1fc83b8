//! The operator client: how the CLI reaches a gateway.
//!
//! On the gateway's own machine the CLI finds the gateway through the state dir
//! (`gateway.json`) and proves it is the local admin by presenting the gateway's own device key
//! (only someone who can read the 0600 key file can). From anywhere else, `--url` and `--token`
//! name the gateway and the operator token, and the CLI uses a throw-away key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clawmesh_federation::endpoint::{self, TransportOptions};
use clawmesh_federation::handshake;
use clawmesh_federation::identity::{DeviceIdentity, KEY_FILE};
use clawmesh_federation::rpc::{self, CallError};
use clawmesh_federation::wire::{HelloRole, OperatorHello, WireError};
use quinn::{Connection, Endpoint, VarInt};
use serde_json::Value;

use crate::state_dir::Runtime;

/// How long the operator client waits without a packet from its gateway before it gives up
/// the connection (see [`Client::connect`]).
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the CLI waits for a gateway to answer the QUIC handshake: a gateway on another
/// continent answers within a second; a dead one never does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which gateway to talk to.
#[derive(Debug, Clone)]
pub enum Target {
    /// The gateway running with this state dir.
    Local(PathBuf),
    /// A gateway at a URL, with an operator token.
    Url {
        /// `quic://host:port`.
        url: String,
        /// Operator token.
        token: Option<String>,
    },
}

impl Target {
    /// From the CLI's `--url` / `--token` and state dir.
    pub fn from_flags(url: Option<String>, token: Option<String>, state_dir: &Path) -> Target {
        match url {
            Some(url) => Target::Url {
                url,
                token: token.or_else(|| std::env::var("CLAWMESH_TOKEN").ok()),
            },
            None => Target::Local(state_dir.to_path_buf()),
        }
    }
}

/// An error from a call: transport or the gateway's own error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error.
    #[error("{}", .0.message)]
    Remote(WireError),
    /// Could not talk to it.
    #[error("{0:#}")]
    Transport(anyhow::Error),
}

/// A connected operator session.
pub struct Client {
    endpoint: Endpoint,
    conn: Connection,
    /// What was dialed, for error messages.
    pub described: String,
}

impl Client {
    /// Connects and completes the operator hello.
    pub async fn connect(target: &Target) -> Result<Client> {
        let (addr, identity, token, described) = match target {
            Target::Local(dir) => {
                let rt = Runtime::read(dir)?;
                let addr: SocketAddr = rt.quic.parse().with_context(|| {
                    format!(
                        "bad address {:?} in {}",
                        rt.quic,
                        dir.join(crate::state_dir::RUNTIME_FILE).display()
                    )
                })?;
                let identity = DeviceIdentity::load(&dir.join(KEY_FILE))?;
                (
                    addr,
                    identity,
                    None,
                    format!(
                        "gateway {} at {addr} (state dir {})",
                        rt.name,
                        dir.display()
                    ),
                )
            }
            Target::Url { url, token } => {
                let u = clawmesh_discovery::PeerUrl::parse(url, crate::DEFAULT_PORT)?;
                let addr = clawmesh_federation::mesh::resolve(&u.authority())
                    .await
                    .map_err(|e| anyhow!(e))?;
                (
                    addr,
                    DeviceIdentity::ephemeral(),
                    token.clone(),
                    format!("gateway at {url}"),
                )
            }
        };
        // A gateway that dies mid-call sends nothing more: with a keep-alive every second, its
        // silence fails the call after the idle timeout instead of the whole call timeout (a
        // live gateway acknowledges the keep-alives even while a long invoke runs).
        let opts = TransportOptions {
            idle_timeout: CLIENT_IDLE_TIMEOUT,
            keep_alive: Duration::from_secs(1),
            ..TransportOptions::default()
        };
        let ep = endpoint::client(&identity, addr, &opts)?;
        let conn = endpoint::dial(&ep, addr, CONNECT_TIMEOUT)
            .await
            .map_err(|e| anyhow!("cannot reach {described}: {e}"))?;
        let hello = handshake::hello(
            crate::VERSION,
            0,
            HelloRole::Operator(OperatorHello {
                client: "clawmesh-cli".into(),
                token,
                scopes: Vec::new(),
            }),
        );
        handshake::send_hello(&conn, &hello)
            .await
            .map_err(|e| anyhow!("{described}: {e}"))?;
        Ok(Client {
            endpoint: ep,
            conn,
            described,
        })
    }

    /// Calls a method and returns its JSON result.
    pub async fn call(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        match rpc::call(&self.conn, method, params.to_string(), 0, timeout).await {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                ClientError::Transport(anyhow!("bad JSON from {}: {e}", self.described))
            }),
            Err(CallError::Remote(e)) => Err(ClientError::Remote(e)),
            Err(e) => Err(ClientError::Transport(anyhow!("{}: {e}", self.described))),
        }
    }

    /// Closes the session politely.
    pub async fn close(self) {
        self.conn.close(VarInt::from_u32(0), b"done");
        // The close frame leaves at once; waiting out QUIC's whole draining period (about
        // 80 ms on loopback) would only delay the CLI's exit. A few ms let the packet go out.
        let _ = tokio::time::timeout(Duration::from_millis(5), self.endpoint.wait_idle()).await;
    }

    /// Closes the session because the operator gave up: the close frame (application code 1,
    /// "cancelled") tells the gateway to drop every request of this session at once. Waits
    /// a little longer than [`Client::close`]: a packet from the gateway still in flight gets
    /// the close repeated in answer, so a lost first copy does not leave the gateway waiting
    /// out its idle timeout.
    pub async fn cancel(self) {
        self.conn.close(VarInt::from_u32(1), b"cancelled");
        // 200 ms: several LAN round trips for that, yet short enough that Ctrl-C still
        // feels immediate.
        let _ = tokio::time::timeout(Duration::from_millis(200), self.endpoint.wait_idle()).await;
    }
}

/// One call on a fresh connection.
pub async fn call_once(
    target: &Target,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let client = Client::connect(target)
        .await
        .map_err(ClientError::Transport)?;
    let r = client.call(method, params, timeout).await;
    client.close().await;
    r
}
