//! Peers that speak the previous wire version, `clawmesh/1`, and the clear error they get.
//!
//! `clawmesh/1` presented device keys inside self-signed X.509 certificates; `clawmesh/2`
//! presents them as raw public keys (RFC 7250, see [`crate::raw_key`]). The two cannot finish a
//! TLS handshake with each other, and without help each side would only see a TLS alert
//! number. So:
//!
//! - **accepting** from an old peer: its ClientHello offers only [`OLD_ALPN`]; the server's key
//!   resolver ([`crate::raw_key::DeviceKeyResolver`]) declines it, which rustls reports as an
//!   `access_denied` alert that nothing else in a TLS 1.3 server sends;
//!   [`is_refused_old_peer`] recognises it.
//! - **dialing** an old peer: it answers our ClientHello with `no_application_protocol`; the
//!   dialer then makes one probe handshake that speaks `clawmesh/1` ([`probe`]) and, if that
//!   completes, says so. The probe presents a throwaway key (never the device key), trusts
//!   nothing it learns and closes at once: it only names the cause of the failure.
//!
//! The endpoint turns either into its `OldPeer` error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig};
use quinn::{ConnectionError, Endpoint, TransportErrorCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, DigitallySignedStruct, SignatureScheme};

use crate::wire::{ALPN, OLD_ALPN};

/// How the old peer's refusal is worded everywhere (log and error).
pub const OLD_PEER_ADVICE: &str =
    "speaks clawmesh/1 (an older clawmesh); upgrade it (README: \"Upgrading a federation\")";

/// True when a ClientHello's ALPN list offers [`OLD_ALPN`] and not the current [`ALPN`].
pub fn offers_only_old_alpn<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
    let Some(offered) = alpn else { return false };
    let (mut old, mut current) = (false, false);
    for p in offered {
        old |= p == OLD_ALPN;
        current |= p == ALPN;
    }
    old && !current
}

/// True when our side of a failed accept is the refusal of a `clawmesh/1` client (see the
/// module comment).
pub fn is_refused_old_peer(err: &ConnectionError) -> bool {
    matches!(err, ConnectionError::TransportError(e)
        if e.code == TransportErrorCode::crypto(u8::from(AlertDescription::AccessDenied)))
}

/// True when the peer refused our dial for want of a common ALPN, as a `clawmesh/1` gateway
/// does (any non-clawmesh QUIC server does too; [`probe`] tells them apart).
pub fn is_alpn_refusal(err: &ConnectionError) -> bool {
    matches!(err, ConnectionError::ConnectionClosed(c)
        if c.error_code
            == TransportErrorCode::crypto(u8::from(AlertDescription::NoApplicationProtocol)))
}

/// Errors building the probe (never about the peer).
#[derive(Debug, thiserror::Error)]
#[error("building the clawmesh/1 probe: {0}")]
pub struct ProbeError(String);

/// One `clawmesh/1` handshake to `addr` (as `server_name`) from `ep`: true if the peer
/// completes it (so it is an old clawmesh), false on any failure or after `timeout`.
pub async fn probe(
    ep: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<bool, ProbeError> {
    let config = probe_config(server_name)?;
    let Ok(connecting) = ep.connect_with(config, addr, server_name) else {
        return Ok(false);
    };
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        _ => return Ok(false),
    };
    let old = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == OLD_ALPN);
    conn.close(0u32.into(), b"clawmesh/2 probe");
    Ok(old)
}

/// A `clawmesh/1` client: a self-signed X.509 certificate over a throwaway ed25519 key (the old
/// verifier requires one), ALPN [`OLD_ALPN`], and a verifier that checks only that the server's
/// handshake signature matches its certificate (webpki parses it).
fn probe_config(server_name: &str) -> Result<quinn::ClientConfig, ProbeError> {
    let err = |e: &dyn std::fmt::Display| ProbeError(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| err(&e))?;
    let cert = rcgen::CertificateParams::new(vec![server_name.to_string()])
        .map_err(|e| err(&e))?
        .self_signed(&key)
        .map_err(|e| err(&e))?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyServer {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(&e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert.der().clone()], private)
        .map_err(|e| err(&e))?;
    tls.alpn_protocols = vec![OLD_ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| err(&e))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The probe's verifier: any certificate whose key made the handshake signature. Nothing the
/// probe learns is trusted; it only decides the wording of an error.
#[derive(Debug)]
struct AnyServer {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_old_only_alpn_list_is_old() {
        let check = |list: &[&[u8]]| offers_only_old_alpn(Some(list.iter().copied()));
        assert!(check(&[OLD_ALPN]));
        assert!(check(&[b"h3", OLD_ALPN]));
        assert!(!check(&[ALPN, OLD_ALPN]));
        assert!(!check(&[ALPN]));
        assert!(!check(&[b"h3"]));
        assert!(!check(&[]));
        assert!(!offers_only_old_alpn(None::<std::iter::Empty<&[u8]>>));
    }
}
