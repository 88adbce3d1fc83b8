//! Requests and replies over QUIC: one bidirectional stream per request.
//!
//! [`call`] is the client side; [`serve`] runs the server side of a connection, handing each
//! request to a [`Handler`]. A stream per request means a slow invoke never blocks a status
//! query behind it, and a vanished peer fails every pending call at once (the connection's
//! error reaches each stream).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::Connection;
use tracing::{debug, Instrument};

use crate::frame::{self, FrameError, MAX_FRAME};
use crate::identity::PublicKey;
use crate::wire::{Request, Response, WireError};

/// A boxed future returned by handlers.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Errors of a call. `peer` is the address, or, once the caller has named it with
/// [`CallError::naming`], `gateway frankfurt (10.2.0.1:18789)`: every error about a lost link
/// or route says which gateway.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection or stream failed (peer gone, reset).
    #[error("{peer}: connection lost: {reason}")]
    Transport {
        /// Who.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The reply did not decode.
    #[error("{peer}: bad reply: {source}")]
    Frame {
        /// Who.
        peer: String,
        /// Why.
        source: FrameError,
    },
    /// No reply within the deadline.
    #[error("{peer}: no reply within {timeout:?}")]
    Timeout {
        /// Who.
        peer: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The remote answered with an error.
    #[error("{0}")]
    Remote(WireError),
}

impl CallError {
    /// The same error, with the peer called `who` (`gateway frankfurt`) before its address.
    pub fn naming(self, who: &str) -> CallError {
        let name = |peer: String| format!("{who} ({peer})");
        match self {
            CallError::Transport { peer, reason } => CallError::Transport {
                peer: name(peer),
                reason,
            },
            CallError::Frame { peer, source } => CallError::Frame {
                peer: name(peer),
                source,
            },
            CallError::Timeout { peer, timeout } => CallError::Timeout {
                peer: name(peer),
                timeout,
            },
            remote => remote,
        }
    }

    /// The error as the classic protocol shapes it, for relaying to the original caller.
    pub fn to_wire(&self) -> WireError {
        match self {
            CallError::Remote(e) => e.clone(),
            // Timeouts and lost connections: the caller may retry (the peer may be back, or
            // the node may have moved to another gateway).
            _ => {
                let mut e = WireError::new("UNAVAILABLE", self.to_string());
                e.retryable = true;
                e
            }
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique request id, for correlating replies and logs across hops.
pub fn next_request_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Sends `method(params)` on a new stream and waits for the reply.
pub async fn call(
    conn: &Connection,
    method: &str,
    params: String,
    hops: u8,
    timeout: Duration,
) -> Result<String, CallError> {
    let req = Request {
        id: next_request_id(),
        method: method.to_string(),
        params,
        hops,
    };
    call_request(conn, req, timeout).await
}

/// Sends a prepared request and waits for the reply.
pub async fn call_request(
    conn: &Connection,
    req: Request,
    timeout: Duration,
) -> Result<String, CallError> {
    let peer = conn.remote_address().to_string();
    let span = tracing::debug_span!("call", %peer, req_id = req.id, method = %req.method);
    let fut = async {
        let transport = |e: &dyn std::fmt::Display| CallError::Transport {
            peer: peer.clone(),
            reason: e.to_string(),
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(&e))?;
        frame::write_frame(&mut send, &req, MAX_FRAME)
            .await
            .map_err(|e| transport(&e))?;
        send.finish().map_err(|e| transport(&e))?;
        let resp: Option<Response> =
            frame::read_frame(&mut recv, MAX_FRAME)
                .await
                .map_err(|source| match source {
                    FrameError::Io(e) => transport(&e),
                    source => CallError::Frame {
                        peer: peer.clone(),
                        source,
                    },
                })?;
        let resp = resp.ok_or_else(|| transport(&"stream closed before the reply"))?;
        take_end_if_here(&mut recv);
        if resp.id != req.id {
            return Err(CallError::Frame {
                peer: peer.clone(),
                source: FrameError::Malformed(format!(
                    "reply id {} for request {}",
                    resp.id, req.id
                )),
            });
        }
        resp.result.map_err(CallError::Remote)
    };
    match tokio::time::timeout(timeout, fut.instrument(span)).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Timeout {
            peer: conn.remote_address().to_string(),
            timeout,
        }),
    }
}

/// Reads the end of a request or reply stream if it is already here, without waiting.
///
/// Each side finishes its stream right after its one frame, so the end nearly always arrives
/// in the same packet as the frame's last bytes, but [`frame::read_frame`] stops at the
/// frame's length. A `quinn::RecvStream` dropped before its end was read asks the peer to
/// stop sending (a spurious STOP_SENDING for data it already has, which the peer may answer
/// with a RESET_STREAM) and wakes the connection's driver: extra frames and wake-ups on every
/// hop of every call. Reading the end first spares them. An end not here yet (Pending), an
/// error, or bytes after the frame (ignored, as before) leave the stream to be stopped when
/// dropped, as before.
fn take_end_if_here(recv: &mut quinn::RecvStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let _ = tokio::io::AsyncRead::poll_read(std::pin::Pin::new(recv), &mut cx, &mut buf);
}

/// Who sent a request: known after the handshake, attached to every request it makes.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key the peer proved (None for a classic operator that authenticated with a shared
    /// token and no device identity).
    pub key: Option<PublicKey>,
    /// What it is.
    pub kind: CallerKind,
    /// Its address.
    pub remote: std::net::SocketAddr,
}

/// The kind of peer behind a request.
#[derive(Debug, Clone)]
pub enum CallerKind {
    /// A gateway of the federation (forwarded or internal requests).
    Gateway {
        /// Its name.
        name: String,
    },
    /// An operator with granted scopes.
    Operator {
        /// Granted scopes.
        scopes: Vec<String>,
        /// Client name.
        client: String,
    },
    /// A node host.
    Node {
        /// Its name.
        name: String,
    },
}

/// Serves requests: the gateway's method table implements this.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request; the result becomes the reply.
    fn handle(&self, caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>>;
}

/// Serves every request stream of `conn` until it closes.
pub async fn serve(conn: Connection, caller: Caller, handler: Arc<dyn Handler>) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(peer = %caller.remote, "request loop ends: {e}");
                return;
            }
        };
        let caller = caller.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let req: Request = match frame::read_frame(&mut recv, MAX_FRAME).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    debug!(peer = %caller.remote, "bad request frame: {e}");
                    // Tell the peer what was wrong; id 0 since we could not read theirs.
                    let resp = Response {
                        id: 0,
                        result: Err(WireError::new(
                            "INVALID_REQUEST",
                            format!("malformed request: {e}"),
                        )),
                    };
                    let _ = frame::write_frame(&mut send, &resp, MAX_FRAME).await;
                    let _ = send.finish();
                    return;
                }
            };
            take_end_if_here(&mut recv);
            let id = req.id;
            let span = tracing::debug_span!("request", peer = %caller.remote, req_id = id, method = %req.method);
            // A caller that gives up (timeout, cancel) stops the stream: drop the handler, which
            // cancels its work (a running command's process group is killed).
            let stopped = send.stopped();
            let result = tokio::select! {
                r = handler.handle(caller, req).instrument(span) => r,
                _ = stopped => {
                    debug!(req_id = id, "request cancelled by the caller");
                    return;
                }
            };
            let mut resp = Response { id, result };
            let bytes = match frame::encode(&resp, MAX_FRAME) {
                Ok(b) => b,
                Err(e) => {
                    resp.result = Err(WireError::new(
                        "UNAVAILABLE",
                        format!("reply could not be sent: {e}"),
                    ));
                    match frame::encode(&resp, MAX_FRAME) {
                        Ok(b) => b,
                        Err(_) => return,
                    }
                }
            };

            if send.write_all(&bytes).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{self, TransportOptions};
    use crate::identity::DeviceIdentity;

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, _caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
            Box::pin(async move {
                if req.params == "fail" {
                    return Err(WireError::new("INVALID_REQUEST", "asked to fail"));
                }
                Ok(format!("{}:{}", req.method, req.params))
            })
        }
    }

    /// Calls answered and failed over real QUIC leave no stream half-stopped: no
    /// STOP_SENDING or RESET_STREAM either way (each side reads the end its peer sent with the
    /// frame), and a call after each still works on the same connection.
    #[tokio::test]
    async fn calls_read_each_stream_to_its_end_and_stop_none() {
        let opts = TransportOptions::default();
        let (a, b) = (DeviceIdentity::ephemeral(), DeviceIdentity::ephemeral());
        let server = endpoint::bind(&a, "127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let client = endpoint::bind(&b, "127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let addr = server.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let conn = endpoint::accept(server.accept().await.unwrap())
                .await
                .unwrap();
            let caller = Caller {
                key: None,
                kind: CallerKind::Gateway { name: "t".into() },
                remote: conn.remote_address(),
            };
            serve(conn.clone(), caller, Arc::new(Echo)).await;
            conn.stats()
        });
        let conn = endpoint::dial(&client, addr, Duration::from_secs(10))
            .await
            .unwrap();
        let wait = Duration::from_secs(10);
        for i in 0..20 {
            let r = call(&conn, "m", i.to_string(), 0, wait).await.unwrap();
            assert_eq!(r, format!("m:{i}"));
        }
        let e = call(&conn, "m", "fail".into(), 0, wait).await.unwrap_err();
        assert!(
            matches!(e, CallError::Remote(ref w) if w.code == "INVALID_REQUEST"),
            "{e}"
        );
        assert_eq!(call(&conn, "m", "x".into(), 0, wait).await.unwrap(), "m:x");
        // Let the last acknowledgements and any stop frames arrive.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mine = conn.stats();
        conn.close(0u32.into(), b"done");
        let theirs = tokio::time::timeout(wait, serving).await.unwrap().unwrap();
        for (who, s) in [("client", &mine), ("server", &theirs)] {
            assert_eq!(s.frame_tx.stop_sending, 0, "{who} sent STOP_SENDING");
            assert_eq!(s.frame_tx.reset_stream, 0, "{who} sent RESET_STREAM");
        }
        assert_eq!(mine.frame_rx.stop_sending, 0);
    }

    #[test]
    fn errors_name_the_gateway_and_its_address() {
        let e = CallError::Transport {
            peer: "127.0.0.1:18789".into(),
            reason: "timed out".into(),
        }
        .naming("gateway frankfurt");
        assert_eq!(
            e.to_string(),
            "gateway frankfurt (127.0.0.1:18789): connection lost: timed out"
        );
        let t = CallError::Timeout {
            peer: "127.0.0.1:1".into(),
            timeout: Duration::from_secs(2),
        }
        .naming("gateway tokyo");
        assert_eq!(
            t.to_string(),
            "gateway tokyo (127.0.0.1:1): no reply within 2s"
        );
        // A remote error is the remote's own words.
        let r = CallError::Remote(WireError::new("INVALID_REQUEST", "nope")).naming("gateway x");
        assert_eq!(r.to_string(), "INVALID_REQUEST: nope");
    }
}
