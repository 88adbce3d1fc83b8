//! Opening a WebSocket to the OpenClaw gateway: plain `ws://`, or `wss://` with the leaf
//! certificate's SHA-256 pinned (OpenClaw's own `--tls-fingerprint` rule: with a pin, no CA
//! check), no permessage-deflate (the classic gateway does not negotiate it).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use super::UpstreamError;

/// A byte stream under the WebSocket: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open WebSocket to the OpenClaw gateway.
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Deadline for TCP connect, TLS and the WebSocket upgrade together: the classic client's own
/// handshake budget is 15 s; a gateway that has not upgraded by then is retried with backoff.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest frame read from the OpenClaw gateway: its own `policy.maxPayload` (25 MiB), which
/// it also uses for its clients' sockets.
const MAX_FRAME: usize = 25 * 1024 * 1024;

/// Opens the WebSocket to `url`, pinning `pin` for `wss://`.
pub async fn open(url: &str, pin: Option<[u8; 32]>) -> Result<Ws, UpstreamError> {
    tokio::time::timeout(DIAL_TIMEOUT, open_inner(url, pin))
        .await
        .map_err(|_| UpstreamError::Dial(format!("{url}: no WebSocket within {DIAL_TIMEOUT:?}")))?
}

async fn open_inner(url: &str, pin: Option<[u8; 32]>) -> Result<Ws, UpstreamError> {
    let dial = |e: String| UpstreamError::Dial(format!("{url}: {e}"));
    let request = url.into_client_request().map_err(|e| dial(e.to_string()))?;
    let uri = request.uri().clone();
    let tls = uri.scheme_str() == Some("wss");
    let host = uri
        .host()
        .ok_or_else(|| dial("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| dial(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if tls {
        let pin = pin.ok_or_else(|| {
            dial("wss:// needs the gateway's certificate fingerprint (gateway.upstream.tlsFingerprint or --upstream-tls-fingerprint)".into())
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| dial(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
            .with_no_client_auth();
        let name = ServerName::try_from(host.clone()).map_err(|e| dial(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| dial(format!("TLS: {e}")))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let mut cfg = WebSocketConfig::default();
    cfg.max_message_size = Some(MAX_FRAME);
    cfg.max_frame_size = Some(MAX_FRAME);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, io, Some(cfg))
        .await
        .map_err(|e| dial(e.to_string()))?;
    Ok(ws)
}

/// Accepts exactly the certificate whose SHA-256 is the pin; handshake signatures are still
/// checked with the certificate's key.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "upstream certificate fingerprint {} does not match the pinned one",
                hex::encode(got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
