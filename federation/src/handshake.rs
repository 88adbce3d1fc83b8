//! The hello exchange that opens every connection, and the join-token proofs.
//!
//! The join token is never sent: a joining gateway sends an HMAC of the token bound to both
//! device keys, and the primary answers with its own HMAC, so each side learns the other knows
//! the token, and an impostor at the primary's address learns nothing it can replay.

use std::time::Duration;

use hmac::{KeyInit, Mac};
use quinn::Connection;
use sha2::Sha256;

use crate::frame::{self, FrameError, MAX_HELLO_FRAME};
use crate::identity::PublicKey;
use crate::wire::{Hello, HelloReply, Refusal, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// How long a peer has to complete the hello after the TLS handshake: generous for a lossy
/// intercontinental path, short enough that a silent client cannot pin a slot for long.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the hello exchange.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer refused us.
    #[error("refused by {peer}: {}", refusal.message)]
    Refused {
        /// Who refused.
        peer: String,
        /// Their reason.
        refusal: Refusal,
    },
    /// Transport failure.
    #[error("hello with {peer} failed: {reason}")]
    Transport {
        /// Who.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The peer's frames were not a clawmesh hello.
    #[error("{peer} is not a clawmesh peer: {reason}")]
    Protocol {
        /// Who.
        peer: String,
        /// Why.
        reason: String,
    },
    /// No hello within [`HELLO_TIMEOUT`].
    #[error("{peer} sent no hello within {HELLO_TIMEOUT:?}")]
    Timeout {
        /// Who.
        peer: String,
    },
}

fn proof(token: &str, label: &[u8], dialer: &PublicKey, acceptor: &PublicKey) -> [u8; 32] {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(token.as_bytes()) {
        Ok(m) => m,
        Err(_) => return [0u8; 32],
    };
    mac.update(label);
    mac.update(&dialer.0);
    mac.update(&acceptor.0);
    mac.finalize().into_bytes().into()
}

/// The joining gateway's proof of the token.
pub fn join_proof(token: &str, dialer: &PublicKey, acceptor: &PublicKey) -> [u8; 32] {
    proof(token, b"clawmesh-join-v1", dialer, acceptor)
}

/// The accepting gateway's answer proof.
pub fn welcome_proof(token: &str, dialer: &PublicKey, acceptor: &PublicKey) -> [u8; 32] {
    proof(token, b"clawmesh-welcome-v1", dialer, acceptor)
}

/// Compares two proofs in constant time.
pub fn proofs_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Compares two secrets in constant time (length leaks, content does not).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Dialer side: sends `hello`, returns the acceptor's reply (a refusal is an error).
pub async fn send_hello(
    conn: &Connection,
    hello: &Hello,
) -> Result<crate::wire::Welcome, HandshakeError> {
    let peer = conn.remote_address().to_string();
    let transport = |e: &dyn std::fmt::Display| HandshakeError::Transport {
        peer: peer.clone(),
        reason: e.to_string(),
    };
    let fut = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| transport(&e))?;
        frame::write_frame(&mut send, hello, MAX_HELLO_FRAME)
            .await
            .map_err(|e| transport(&e))?;
        send.finish().map_err(|e| transport(&e))?;
        let reply: Option<HelloReply> = frame::read_frame(&mut recv, MAX_HELLO_FRAME)
            .await
            .map_err(|e| match e {
                FrameError::Io(e) => transport(&e),
                e => HandshakeError::Protocol {
                    peer: peer.clone(),
                    reason: e.to_string(),
                },
            })?;
        match reply {
            Some(HelloReply::Welcome(w)) => Ok(w),
            Some(HelloReply::Refused(refusal)) => Err(HandshakeError::Refused {
                peer: peer.clone(),
                refusal,
            }),
            None => Err(transport(&"closed before answering the hello")),
        }
    };
    match tokio::time::timeout(HELLO_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout { peer }),
    }
}

/// Acceptor side: reads the dialer's hello, checking magic and version.
///
/// Returns the hello and the stream to answer on. A bad hello is answered with a refusal
/// before the error is returned, so the dialer sees why.
pub async fn read_hello(conn: &Connection) -> Result<(Hello, quinn::SendStream), HandshakeError> {
    let peer = conn.remote_address().to_string();
    let transport = |e: &dyn std::fmt::Display| HandshakeError::Transport {
        peer: peer.clone(),
        reason: e.to_string(),
    };
    let fut = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| transport(&e))?;
        let hello: Result<Option<Hello>, FrameError> =
            frame::read_frame(&mut recv, MAX_HELLO_FRAME).await;
        let bad = |reason: String| HandshakeError::Protocol {
            peer: peer.clone(),
            reason,
        };
        let hello = match hello {
            Ok(Some(h)) if h.magic == MAGIC => h,
            Ok(Some(_)) => return Err(bad("wrong magic in hello".into())),
            Ok(None) => return Err(bad("stream closed before hello".into())),
            Err(FrameError::Io(e)) => return Err(transport(&e)),
            Err(e) => {
                let _ = reply(
                    &mut send,
                    &HelloReply::Refused(Refusal {
                        code: crate::wire::RefusalCode::BadHello,
                        message: format!("malformed hello: {e}"),
                        retryable: false,
                    }),
                )
                .await;
                return Err(bad(e.to_string()));
            }
        };
        if hello.version < MIN_PROTOCOL_VERSION || hello.min_version > PROTOCOL_VERSION {
            let msg = format!(
                "protocol mismatch: peer speaks {}..={}, we speak {}..={}",
                hello.min_version, hello.version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
            );
            let _ = reply(
                &mut send,
                &HelloReply::Refused(Refusal {
                    code: crate::wire::RefusalCode::Version,
                    message: msg.clone(),
                    retryable: false,
                }),
            )
            .await;
            return Err(bad(msg));
        }
        Ok((hello, send))
    };
    match tokio::time::timeout(HELLO_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout { peer }),
    }
}

/// Writes the reply to a hello and closes the hello stream.
pub async fn reply(send: &mut quinn::SendStream, reply: &HelloReply) -> Result<(), FrameError> {
    frame::write_frame(send, reply, MAX_HELLO_FRAME).await?;
    let _ = send.finish();
    Ok(())
}

/// Our hello with the given role.
pub fn hello(software: &str, boot_id: u64, role: crate::wire::HelloRole) -> Hello {
    Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        software: software.to_string(),
        boot_id,
        role,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceIdentity;

    #[test]
    fn proofs_bind_token_and_both_keys() {
        let a = DeviceIdentity::ephemeral().public_key();
        let b = DeviceIdentity::ephemeral().public_key();
        let p = join_proof("s3cret", &a, &b);
        assert!(proofs_equal(&p, &join_proof("s3cret", &a, &b)));
        assert!(!proofs_equal(&p, &join_proof("s3cret!", &a, &b)));
        assert!(!proofs_equal(&p, &join_proof("s3cret", &b, &a)));
        assert!(!proofs_equal(&p, &welcome_proof("s3cret", &a, &b)));
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
    }
}
