//! Certificates that bind a device key, and the TLS verifiers that check them.
//!
//! Every peer presents a self-signed X.509 certificate over its own ed25519 device key. There is
//! no CA: the verifiers accept any such certificate whose handshake signature checks out with
//! the key inside it, and the caller then decides whether that key is one it trusts (pinned
//! gateway, paired node, the gateway's own key for the local CLI, or a token-authenticated
//! operator). Raw keys are extracted with a small DER walker that follows the TBSCertificate
//! structure field by field, so a key-shaped byte string elsewhere in the certificate (in a
//! subject name, say) can never be mistaken for the real subject public key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{DeviceIdentity, IdentityError, PublicKey};

/// Errors building or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not build the certificate.
    #[error("building certificate: {0}")]
    Build(String),
    /// The certificate does not carry an ed25519 subject key.
    #[error("certificate is not a clawmesh device certificate: {0}")]
    NotDeviceCert(&'static str),
    /// The identity could not be exported.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The certificate and private key a peer presents on every QUIC connection.
pub struct DeviceCert {
    /// The self-signed certificate.
    pub cert: CertificateDer<'static>,
    /// The matching PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
}

/// Builds the self-signed certificate over the device key.
///
/// The validity window is wide on purpose: trust comes from the pinned key, not from dates,
/// and a peer with a skewed clock must still be able to link.
pub fn device_cert(identity: &DeviceIdentity) -> Result<DeviceCert, CertError> {
    let der = identity.pkcs8_der()?;
    let pkcs8 = PrivatePkcs8KeyDer::from(der.clone());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| CertError::Build(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec!["clawmesh".to_string()])
        .map_err(|e| CertError::Build(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity.device_id().to_string());
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2120, 1, 1);
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| CertError::Build(e.to_string()))?;
    Ok(DeviceCert {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
    })
}

/// One DER TLV: tag, content, and the bytes after it.
fn der_tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), CertError> {
    let bad = CertError::NotDeviceCert("malformed DER");
    let (&tag, rest) = input
        .split_first()
        .ok_or(CertError::NotDeviceCert("truncated DER"))?;
    let (&first, rest) = rest
        .split_first()
        .ok_or(CertError::NotDeviceCert("truncated DER"))?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad);
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(CertError::NotDeviceCert("truncated DER"));
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// Object identifier 1.3.101.112 (id-Ed25519), DER content bytes.
const OID_ED25519: [u8; 3] = [0x2b, 0x65, 0x70];

/// Extracts the ed25519 subject public key from a certificate.
pub fn public_key_of(cert: &[u8]) -> Result<PublicKey, CertError> {
    const SEQ: u8 = 0x30;
    let (tag, certificate, _) = der_tlv(cert)?;
    if tag != SEQ {
        return Err(CertError::NotDeviceCert("certificate is not a SEQUENCE"));
    }
    let (tag, tbs, _) = der_tlv(certificate)?;
    if tag != SEQ {
        return Err(CertError::NotDeviceCert("TBSCertificate is not a SEQUENCE"));
    }
    let mut rest = tbs;
    // Optional [0] EXPLICIT version.
    let (tag, _, after) = der_tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serialNumber, signature, issuer, validity, subject.
    for _ in 0..5 {
        let (_, _, after) = der_tlv(rest)?;
        rest = after;
    }
    let (tag, spki, _) = der_tlv(rest)?;
    if tag != SEQ {
        return Err(CertError::NotDeviceCert(
            "SubjectPublicKeyInfo is not a SEQUENCE",
        ));
    }
    let (tag, alg, after) = der_tlv(spki)?;
    if tag != SEQ {
        return Err(CertError::NotDeviceCert(
            "AlgorithmIdentifier is not a SEQUENCE",
        ));
    }
    let (tag, oid, _) = der_tlv(alg)?;
    if tag != 0x06 || oid != OID_ED25519 {
        return Err(CertError::NotDeviceCert("subject key is not ed25519"));
    }
    let (tag, bits, _) = der_tlv(after)?;
    if tag != 0x03 || bits.len() != 33 || bits[0] != 0 {
        return Err(CertError::NotDeviceCert("malformed ed25519 key bits"));
    }
    PublicKey::from_bytes(&bits[1..]).map_err(|_| CertError::NotDeviceCert("invalid ed25519 key"))
}

/// The TLS verifier for both sides of a clawmesh QUIC connection.
///
/// It proves only that the peer holds the key in its certificate; which keys are trusted is
/// decided after the handshake, where the peer's role and the pinned keys are known.
#[derive(Debug, Default)]
pub struct DeviceKeyVerifier;

impl DeviceKeyVerifier {
    fn check_cert(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        public_key_of(cert.as_ref())
            .map(|_| ())
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn check_signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoSignatureSchemesInCommon,
            ));
        }
        let key =
            public_key_of(cert.as_ref()).map_err(|e| rustls::Error::General(e.to_string()))?;
        if key.verify(message, dss.signature()) {
            Ok(HandshakeSignatureValid::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadSignature,
            ))
        }
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
        Self::check_cert(end_entity).map(|_| ServerCertVerified::assertion())
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
        Self::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
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
        Self::check_cert(end_entity).map(|_| ClientCertVerified::assertion())
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
        Self::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A shared verifier instance.
pub fn verifier() -> Arc<DeviceKeyVerifier> {
    Arc::new(DeviceKeyVerifier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_device_key() {
        let id = DeviceIdentity::ephemeral();
        let dc = device_cert(&id).unwrap();
        assert_eq!(public_key_of(dc.cert.as_ref()).unwrap(), id.public_key());
    }

    #[test]
    fn rejects_garbage_and_truncation_without_panic() {
        let id = DeviceIdentity::ephemeral();
        let dc = device_cert(&id).unwrap();
        let der = dc.cert.as_ref();
        for cut in 0..der.len() {
            assert!(public_key_of(&der[..cut]).is_err());
        }
        assert!(public_key_of(&[0xff; 64]).is_err());
        assert!(public_key_of(&[]).is_err());
        // Flip bytes one at a time: may parse or not, must never panic.
        for i in 0..der.len() {
            let mut d = der.to_vec();
            d[i] ^= 0x5a;
            let _ = public_key_of(&d);
        }
    }

    #[test]
    fn rejects_non_ed25519_certificates() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        assert!(public_key_of(cert.der().as_ref()).is_err());
    }
}
