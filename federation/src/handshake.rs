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

/// The proof MAC, keyed by the token, over a label and both device keys.
fn proof_mac(
    token: &str,
    label: &[u8],
    dialer: &PublicKey,
    acceptor: &PublicKey,
) -> Option<hmac::Hmac<Sha256>> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(token.as_bytes()).ok()?;
    mac.update(label);
    mac.update(&dialer.0);
    mac.update(&acceptor.0);
    Some(mac)
}

/// Label of the joining gateway's proof.
const JOIN_LABEL: &[u8] = b"clawmesh-join-v1";
/// Label of the accepting gateway's answer.
const WELCOME_LABEL: &[u8] = b"clawmesh-welcome-v1";

fn proof(token: &str, label: &[u8], dialer: &PublicKey, acceptor: &PublicKey) -> [u8; 32] {
    match proof_mac(token, label, dialer, acceptor) {
        Some(mac) => mac.finalize().into_bytes().into(),
        None => [0u8; 32],
    }
}

/// Checks a proof with the `hmac` crate's constant-time `verify_slice`.
fn verify(
    token: &str,
    label: &[u8],
    dialer: &PublicKey,
    acceptor: &PublicKey,
    proof: &[u8; 32],
) -> bool {
    proof_mac(token, label, dialer, acceptor).is_some_and(|mac| mac.verify_slice(proof).is_ok())
}

/// The joining gateway's proof of the token.
pub fn join_proof(token: &str, dialer: &PublicKey, acceptor: &PublicKey) -> [u8; 32] {
    proof(token, JOIN_LABEL, dialer, acceptor)
}

/// The accepting gateway's answer proof.
pub fn welcome_proof(token: &str, dialer: &PublicKey, acceptor: &PublicKey) -> [u8; 32] {
    proof(token, WELCOME_LABEL, dialer, acceptor)
}

/// True when `proof` is the joining gateway's proof of `token` (constant time).
pub fn verify_join_proof(
    token: &str,
    dialer: &PublicKey,
    acceptor: &PublicKey,
    proof: &[u8; 32],
) -> bool {
    verify(token, JOIN_LABEL, dialer, acceptor, proof)
}

/// True when `proof` is the accepting gateway's answer for `token` (constant time).
pub fn verify_welcome_proof(
    token: &str,
    dialer: &PublicKey,
    acceptor: &PublicKey,
    proof: &[u8; 32],
) -> bool {
    verify(token, WELCOME_LABEL, dialer, acceptor, proof)
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
        assert!(verify_join_proof("s3cret", &a, &b, &p));
        assert!(!verify_join_proof("s3cret!", &a, &b, &p));
        assert!(!verify_join_proof("s3cret", &b, &a, &p));
        assert!(!verify_welcome_proof("s3cret", &a, &b, &p));
        let w = welcome_proof("s3cret", &a, &b);
        assert!(verify_welcome_proof("s3cret", &a, &b, &w));
        assert!(!verify_join_proof("s3cret", &a, &b, &w));
        let mut flipped = p;
        flipped[31] ^= 1;
        assert!(!verify_join_proof("s3cret", &a, &b, &flipped));
    }
}
