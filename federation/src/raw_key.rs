//! Raw public keys (RFC 7250): how a device key is presented and checked in TLS 1.3.
//!
//! Every peer presents its ed25519 device key itself, as a SubjectPublicKeyInfo, instead of a
//! certificate: there is no CA, no name and no date that could mean anything, so a certificate
//! would only be a wrapper to unwrap. rustls negotiates the certificate type (raw public keys
//! both ways, or the handshake fails), webpki checks the handshake signature against the key
//! (`verify_tls13_signature_with_raw_key`), and RustCrypto's `spki` decoder (through
//! `ed25519-dalek`'s `DecodePublicKey`) reads the key: it insists on the id-Ed25519 algorithm
//! with no parameters and refuses trailing bytes. Nothing here walks DER by hand.
//!
//! The verifiers prove only that the peer holds the key it presented; which keys are trusted is
//! decided after the handshake, where the peer's role and the pinned keys are known (pinned
//! gateway, paired node, the gateway's own key for the local CLI, or a token-authenticated
//! operator).

use std::sync::Arc;

use ed25519_dalek::pkcs8::DecodePublicKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature_with_raw_key, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{DeviceIdentity, IdentityError, PublicKey};
use crate::legacy;

/// Errors building or reading raw public keys.
#[derive(Debug, thiserror::Error)]
pub enum RawKeyError {
    /// rustls could not load the device key for signing.
    #[error("loading the device key for TLS: {0}")]
    Load(String),
    /// The presented key is not an ed25519 SubjectPublicKeyInfo.
    #[error("not a clawmesh device key: {0}")]
    NotDeviceKey(String),
    /// The identity could not be exported.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The device key as rustls presents it: the SubjectPublicKeyInfo as the only "certificate"
/// entry, and the signer over the private key.
pub fn certified_key(identity: &DeviceIdentity) -> Result<Arc<CertifiedKey>, RawKeyError> {
    let pkcs8 = PrivatePkcs8KeyDer::from(identity.pkcs8_der()?);
    let signer = rustls::crypto::ring::sign::any_eddsa_type(&pkcs8)
        .map_err(|e| RawKeyError::Load(e.to_string()))?;
    let spki = signer
        .public_key()
        .ok_or_else(|| RawKeyError::Load("signer has no public key".into()))?;
    let spki = CertificateDer::from(spki.as_ref().to_vec());
    Ok(Arc::new(CertifiedKey::new(vec![spki], signer)))
}

/// Reads the ed25519 key out of a DER SubjectPublicKeyInfo (what a peer presents).
pub fn public_key_of(spki: &[u8]) -> Result<PublicKey, RawKeyError> {
    let key = ed25519_dalek::VerifyingKey::from_public_key_der(spki)
        .map_err(|e| RawKeyError::NotDeviceKey(e.to_string()))?;
    PublicKey::from_bytes(key.as_bytes()).map_err(|e| RawKeyError::NotDeviceKey(e.to_string()))
}

/// The TLS verifier for both sides of a clawmesh QUIC connection: raw ed25519 keys only.
#[derive(Debug)]
pub struct DeviceKeyVerifier {
    /// webpki's signature algorithms from the ring provider (the project's one provider).
    algorithms: WebPkiSupportedAlgorithms,
}

impl Default for DeviceKeyVerifier {
    fn default() -> Self {
        DeviceKeyVerifier {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl DeviceKeyVerifier {
    fn check_key(spki: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        public_key_of(spki.as_ref())
            .map(|_| ())
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn check_signature(
        &self,
        message: &[u8],
        spki: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoSignatureSchemesInCommon,
            ));
        }
        Self::check_key(spki)?;
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

impl ServerCertVerifier for DeviceKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check_key(end_entity).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for DeviceKeyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check_key(end_entity).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// QUIC is TLS 1.3 only: a TLS 1.2 signature never reaches a device-key check.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// A shared verifier instance.
pub fn verifier() -> Arc<DeviceKeyVerifier> {
    Arc::new(DeviceKeyVerifier::default())
}

/// The server side's key: always the device key, except to a client that offers only the
/// previous wire version's ALPN (a `clawmesh/1` gateway or CLI). That client cannot take a raw
/// public key, so the handshake is refused here, before certificate types are compared, with a
/// refusal [`legacy::is_refused_old_peer`] recognises, so the log can name the cause.
#[derive(Debug)]
pub struct DeviceKeyResolver {
    key: Arc<CertifiedKey>,
}

impl DeviceKeyResolver {
    /// Serves `key` (from [`certified_key`]).
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        DeviceKeyResolver { key }
    }
}

impl ResolvesServerCert for DeviceKeyResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if legacy::offers_only_old_alpn(hello.alpn()) {
            return None;
        }
        Some(self.key.clone())
    }

    fn only_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::EncodePublicKey;
    use rcgen::PublicKeyData;

    fn spki_of(id: &DeviceIdentity) -> Vec<u8> {
        certified_key(id).unwrap().cert[0].as_ref().to_vec()
    }

    #[test]
    fn presents_and_reads_back_the_device_key() {
        let id = DeviceIdentity::ephemeral();
        let spki = spki_of(&id);
        assert_eq!(public_key_of(&spki).unwrap(), id.public_key());
        // rustls/ring and RustCrypto encode the same SubjectPublicKeyInfo.
        let dalek = ed25519_dalek::VerifyingKey::from_bytes(&id.public_key().0)
            .unwrap()
            .to_public_key_der()
            .unwrap();
        assert_eq!(dalek.as_bytes(), spki.as_slice());
    }

    #[test]
    fn rejects_garbage_truncation_and_trailing_bytes_without_panic() {
        let spki = spki_of(&DeviceIdentity::ephemeral());
        for cut in 0..spki.len() {
            assert!(public_key_of(&spki[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = spki.clone();
        longer.push(0);
        assert!(public_key_of(&longer).is_err());
        assert!(public_key_of(&[0xff; 64]).is_err());
        assert!(public_key_of(&[]).is_err());
        // Flip bytes one at a time: may parse or not, must never panic, and a change in the
        // header (before the 32 key bytes) must never parse.
        for i in 0..spki.len() {
            let mut d = spki.clone();
            d[i] ^= 0x5a;
            let r = public_key_of(&d);
            if i < spki.len() - 32 {
                assert!(r.is_err(), "flipped header byte {i} accepted");
            }
        }
    }

    #[test]
    fn rejects_other_key_types_and_whole_certificates() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(public_key_of(&kp.subject_public_key_info()).is_err());
        // A clawmesh/1 peer's X.509 certificate is not a raw key, even though it holds one.
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["clawmesh".into()])
            .unwrap()
            .self_signed(&ed)
            .unwrap();
        assert!(public_key_of(cert.der().as_ref()).is_err());
        assert!(public_key_of(&ed.subject_public_key_info()).is_ok());
    }
}
