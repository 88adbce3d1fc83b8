//! Device identity: the ed25519 key that names a peer on every link.
//!
//! One key per state dir, created on first run, stored as a PKCS#8 PEM file with mode 0600.
//! The device id is the lowercase hex SHA-256 of the raw 32-byte public key, the classic
//! OpenClaw rule, so one device has one id on QUIC and on the classic WebSocket bridge.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the device key inside a state dir.
pub const KEY_FILE: &str = "device.key";

/// Errors while loading, creating or using a device identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file can be read by group or others: a leaked key is a stolen identity.
    #[error("device key {path} has mode {mode:o}, readable by others; run `chmod 600 {path}` (refusing to use it)")]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file exists but is not a PKCS#8 ed25519 key.
    #[error("device key {path} is corrupt ({reason}); restore it from a backup, or move it away to create a new identity (peers that pinned the old key will refuse the new one)")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Reading or writing the key file failed.
    #[error("device key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Bytes presented as a public key are not one.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(String),
}

/// A raw ed25519 public key (32 bytes): what peers pin and what certificates bind.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses raw bytes, refusing anything that is not a valid ed25519 point.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            IdentityError::InvalidPublicKey(format!("{} bytes, want 32", bytes.len()))
        })?;
        VerifyingKey::from_bytes(&arr)
            .map_err(|e| IdentityError::InvalidPublicKey(e.to_string()))?;
        Ok(PublicKey(arr))
    }

    /// Parses base64url (no padding; padded and standard alphabets are accepted too).
    pub fn from_base64(text: &str) -> Result<Self, IdentityError> {
        let bytes = decode_base64_lenient(text)
            .ok_or_else(|| IdentityError::InvalidPublicKey("not base64".into()))?;
        Self::from_bytes(&bytes)
    }

    /// The key as base64url without padding, as the classic protocol writes it.
    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The device id derived from this key.
    pub fn device_id(&self) -> DeviceId {
        DeviceId(Sha256::digest(self.0).into())
    }

    /// Verifies an ed25519 signature over `msg` made with this key.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        let Ok(vk) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        vk.verify(msg, &sig).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64url())
    }
}

/// Decodes base64 in any of the spellings clients use (url-safe or standard, padded or not).
pub fn decode_base64_lenient(text: &str) -> Option<Vec<u8>> {
    let t = text.trim().trim_end_matches('=');
    let normalized: String = t
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    URL_SAFE_NO_PAD.decode(normalized).ok()
}

/// A device id: SHA-256 of the raw public key, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 32]);

impl DeviceId {
    /// Parses the 64-character hex form.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(DeviceId(bytes.try_into().ok()?))
    }

    /// The first 12 hex characters: enough to tell devices apart in logs and tables.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(12);
        s
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.short())
    }
}

/// This peer's device key pair.
pub struct DeviceIdentity {
    signing: SigningKey,
    public: PublicKey,
}

impl fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("device_id", &self.device_id())
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// A fresh key that lives only in memory (CLI calls to a remote gateway, tests).
    pub fn ephemeral() -> Self {
        Self::from_signing(SigningKey::generate(&mut rand::rng()))
    }

    fn from_signing(signing: SigningKey) -> Self {
        let public = PublicKey(signing.verifying_key().to_bytes());
        DeviceIdentity { signing, public }
    }

    /// Loads `<dir>/device.key`, creating the dir (0700) and a new key (0600) on first run.
    ///
    /// Returns the identity and whether it was created now.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), IdentityError> {
        let path = dir.join(KEY_FILE);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        match Self::load(&path) {
            Ok(id) => return Ok((id, false)),
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let identity = Self::ephemeral();
        let pem =
            identity
                .signing
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| IdentityError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        let mut file = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            // Another process created it between our load and create: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok((Self::load(&path)?, false))
            }
            Err(e) => return Err(io(e)),
        };
        file.write_all(pem.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok((identity, true))
    }

    /// Loads an existing key file, refusing it if others can read it or it does not parse.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::InsecurePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        // A key file is a few hundred bytes; refuse to slurp something huge by mistake.
        if meta.len() > 16 * 1024 {
            return Err(IdentityError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("{} bytes, far larger than a key", meta.len()),
            });
        }
        let text = fs::read_to_string(path).map_err(|e| IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let signing = SigningKey::from_pkcs8_pem(&text).map_err(|e| IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a PKCS#8 ed25519 private key: {e}"),
        })?;
        Ok(Self::from_signing(signing))
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        self.public.device_id()
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// The private key as PKCS#8 DER, for building the TLS certificate.
    pub(crate) fn pkcs8_der(&self) -> Result<Vec<u8>, IdentityError> {
        self.signing
            .to_pkcs8_der()
            .map(|d| d.as_bytes().to_vec())
            .map_err(|e| IdentityError::InvalidPublicKey(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_is_sha256_of_raw_key() {
        // Captured from the classic node host (classic-protocol.md section 4).
        let pk = PublicKey::from_base64("99kRZ529MfNZVT0zrTM_ZZ08t9KXVuYddINRAGlOjgc").unwrap();
        assert_eq!(
            pk.device_id().to_string(),
            "9bb348f43a47bd3800fc87d59d65610f73f87ecdd8071cfc1bb78802ffca0e6e"
        );
        let sig = decode_base64_lenient(
            "GdZVL13JKMrMerKxX3m21DdmTsvum3pgwFcwy-GOVRj9FSaOxxTZxG9YYHOMf4u59d7X20WXZzEB0SA-2ZbWCA",
        )
        .unwrap();
        let payload = "v3|9bb348f43a47bd3800fc87d59d65610f73f87ecdd8071cfc1bb78802ffca0e6e|node-host|node|node||1795266984872|test-token-abc123|2b976ddb-56f1-4cc0-90e6-63d480f185ff|linux|linux";
        assert!(pk.verify(payload.as_bytes(), &sig));
        assert!(!pk.verify(b"other", &sig));
    }

    #[test]
    fn create_then_load_same_key_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (a, created) = DeviceIdentity::load_or_create(&state).unwrap();
        assert!(created);
        let mode = fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = DeviceIdentity::load_or_create(&state).unwrap();
        assert!(!created);
        assert_eq!(a.device_id(), b.device_id());
        let sig = a.sign(b"hello");
        assert!(b.public_key().verify(b"hello", &sig));
    }

    #[test]
    fn refuses_readable_and_corrupt_keys() {
        let dir = tempfile::tempdir().unwrap();
        DeviceIdentity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = DeviceIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::InsecurePermissions { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = DeviceIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn device_id_parse_roundtrip() {
        let id = DeviceIdentity::ephemeral().device_id();
        assert_eq!(DeviceId::parse(&id.to_string()), Some(id));
        assert_eq!(id.short().len(), 12);
        assert!(DeviceId::parse("zz").is_none());
    }
}
