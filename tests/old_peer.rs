//! `clawmesh/2` against peers that still speak `clawmesh/1` (device keys in self-signed X.509
//! certificates, ALPN `clawmesh/1`): the handshake fails both ways, and the new side says why
//! in its log and its error ("speaks clawmesh/1 (an older clawmesh); upgrade it"). The old side
//! is emulated here at the TLS level, which is where the two versions differ: a quinn endpoint
//! with an rcgen certificate and the old ALPN, as the old `cert.rs` built it.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clawmesh_federation::endpoint::{self, EndpointError, TransportOptions};
use clawmesh_federation::identity::DeviceIdentity;
use clawmesh_federation::wire::OLD_ALPN;
use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

const ADVICE: &str = "speaks clawmesh/1 (an older clawmesh); upgrade it";

/// The old verifier's contract: any certificate whose key made the handshake signature.
#[derive(Debug)]
struct AnyCert(WebPkiSupportedAlgorithms);

impl AnyCert {
    fn new() -> Arc<Self> {
        Arc::new(AnyCert(
            rustls::crypto::ring::default_provider().signature_verification_algorithms,
        ))
    }
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for AnyCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2".into()))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A self-signed ed25519 X.509 certificate, as `clawmesh/1` presented.
fn old_cert() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["clawmesh".into()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der())),
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client with an X.509 device certificate offering `alpn`.
fn old_client(alpn: &[u8]) -> quinn::Endpoint {
    let (cert, key) = old_cert();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(AnyCert::new())
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    ep
}

/// A server with an X.509 device certificate speaking `alpn`, client certificates required;
/// accepts connections and holds them until dropped.
fn old_server(alpn: &[u8]) -> (quinn::Endpoint, tokio::task::JoinHandle<()>) {
    let (cert, key) = old_cert();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(AnyCert::new())
        .with_single_cert(vec![cert], key)
        .unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let qs = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let ep = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(qs)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let accepting = ep.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = accepting.accept().await {
            if let Ok(conn) = incoming.await {
                held.push(conn);
            }
        }
    });
    (ep, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clawmesh1_dialer_is_refused_and_the_gateway_says_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tokyo");
    let mut gw = Gw::spawn(&dir, &["--name", "tokyo", "--primary", "--token", "tok"]);
    let addr: SocketAddr = gw.wait_ready().parse().unwrap();

    // An old gateway or CLI: X.509 certificate, ALPN clawmesh/1.
    let old = old_client(OLD_ALPN);
    let local = old.local_addr().unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        old.connect(addr, "clawmesh").unwrap(),
    )
    .await;
    assert!(
        matches!(r, Ok(Err(_))),
        "an old peer must be refused: {r:?}"
    );
    let want = format!("{local} {ADVICE}");
    assert!(
        wait_until(Duration::from_secs(5), || gw.log_text().contains(&want)),
        "gateway log does not say {want:?}:\n{}",
        gw.log_text()
    );

    // An X.509 certificate under the new ALPN is refused too, and not called an old clawmesh.
    let x509 = old_client(b"clawmesh/2");
    let local = x509.local_addr().unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        x509.connect(addr, "clawmesh").unwrap(),
    )
    .await;
    assert!(
        matches!(r, Ok(Err(_))),
        "an X.509 peer must be refused: {r:?}"
    );
    let needle = format!("TLS/QUIC handshake with {local} failed");
    assert!(
        wait_until(Duration::from_secs(5), || gw.log_text().contains(&needle)),
        "gateway log does not say {needle:?}:\n{}",
        gw.log_text()
    );
    assert!(!gw.log_text().contains(&format!("{local} {ADVICE}")));

    // The gateway still serves current clients.
    assert!(status(&dir).is_some(), "gateway.status after the old peers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_clawmesh1_peer_says_upgrade() {
    let (old, _task) = old_server(OLD_ALPN);
    let old_addr = old.local_addr().unwrap();

    // The library: a distinct error, whose text names the cause.
    let id = DeviceIdentity::ephemeral();
    let ep = endpoint::client(&id, old_addr, &TransportOptions::default()).unwrap();
    let err = endpoint::dial(&ep, old_addr, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, EndpointError::OldPeer { addr } if addr == old_addr),
        "{err:?}"
    );
    assert!(err.to_string().contains(ADVICE), "{err}");

    // Anything else that refuses our ALPN is not called an old clawmesh.
    let (h3, _h3_task) = old_server(b"h3");
    let h3_addr = h3.local_addr().unwrap();
    let err = endpoint::dial(&ep, h3_addr, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::Connect { .. }), "{err:?}");

    // A new gateway told to join the old one says so in its log (and keeps retrying, so a
    // rolling upgrade of the primary lets it in later).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("beijing");
    let join = format!("quic://{old_addr}");
    let gw = Gw::spawn(
        &dir,
        &["--name", "beijing", "--join", &join, "--token", "tok"],
    );
    let want = format!("{old_addr} {ADVICE}");
    assert!(
        wait_until(Duration::from_secs(15), || gw.log_text().contains(&want)),
        "joining gateway's log does not say {want:?}:\n{}",
        gw.log_text()
    );
}
