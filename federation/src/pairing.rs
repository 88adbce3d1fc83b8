//! The pairing registry: which devices may attach as nodes, and who is waiting.
//!
//! A device the gateway does not know becomes a *pending request* when it connects; an operator
//! approves, rejects or later revokes it (`clawmesh devices ...`). The registry lives in the
//! state database, so it survives restarts and crashes (each change is one transaction).
//! Pending requests expire [`PENDING_TTL`] after the device last retried. The shapes follow the
//! classic OpenClaw protocol's `device.pair.*` records.

use std::time::{Duration, SystemTime};

use std::collections::HashMap;

use rand::RngExt as _;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::identity::{DeviceId, PublicKey};
use crate::store::{Store, StoreError};

/// How long a pending request lives after the device's last retry (the classic
/// `DEVICE_PAIRING_PENDING_TTL_MS`).
pub const PENDING_TTL: Duration = Duration::from_secs(300);

/// Most pending requests kept: a flood of unknown devices cannot grow the table without bound;
/// beyond this the oldest request is dropped.
pub const MAX_PENDING: usize = 1024;

/// Most records taken from one exchange: far above any real fleet's devices; a peer cannot
/// make us write without bound.
pub const MAX_SYNC_RECORDS: usize = 100_000;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    /// Nothing matches the selector.
    #[error("no device or pending request matches {0:?} (see `clawmesh devices list`)")]
    NotFound(String),
    /// Several devices match.
    #[error(
        "{selector:?} matches several devices: {candidates}; use the full device id or request id"
    )]
    Ambiguous {
        /// What was asked.
        selector: String,
        /// What matched.
        candidates: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a connecting device says about itself (native hello or classic `connect`).
#[derive(Debug, Clone, Default)]
pub struct DeviceMeta {
    /// Display name.
    pub name: String,
    /// Role asked for (`node`, `operator`).
    pub role: String,
    /// Where it connected from.
    pub addr: String,
    /// Platform (`linux`).
    pub platform: String,
    /// Device family (`Linux`), classic clients only.
    pub device_family: String,
    /// Client id (`node-host`, `clawmesh-node`).
    pub client_id: String,
    /// Client mode (`node`, `cli`).
    pub client_mode: String,
    /// Region of the gateway where the request waits: kept in the pairing record, it is the
    /// node's `region` when the node has no label of its own, wherever it attaches later.
    pub region: Option<String>,
}

pub use crate::wire::PairingRecord;

/// A device waiting for approval.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRequest {
    /// Request id (UUID), what `devices approve` takes.
    pub request_id: String,
    /// Region of the gateway where it waits (see [`DeviceMeta::region`]).
    pub region: Option<String>,
    /// Device id (hex).
    pub device_id: String,
    /// Public key, base64url.
    pub public_key: String,
    /// Name the device gave.
    pub name: String,
    /// Role asked for (`node`, `operator`).
    pub role: String,
    /// Where it connected from.
    pub addr: String,
    /// Platform it reported.
    pub platform: String,
    /// First request time, RFC 3339.
    pub requested_at: String,
    /// Last retry time, RFC 3339.
    pub refreshed_at: String,
    /// Key fingerprint to compare with `clawmesh identity show` on the device.
    pub fingerprint: String,
    /// Classic: display name.
    pub display_name: String,
    /// Classic: device family.
    pub device_family: String,
    /// Classic: client id.
    pub client_id: String,
    /// Classic: client mode.
    pub client_mode: String,
    /// Classic: roles asked for.
    pub roles: Vec<String>,
    /// Classic: scopes asked for.
    pub scopes: Vec<String>,
    /// Classic: never a silent (auto) approval here.
    pub silent: bool,
    /// Classic: not a repair of an existing pairing.
    pub is_repair: bool,
    /// Classic: last request time, ms since the epoch.
    pub ts: u64,
    /// Classic: the address it connected from.
    pub remote_ip: String,
    #[serde(skip)]
    refreshed_ms: u64,
}

/// An approved device.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PairedDevice {
    /// Device id (hex).
    pub device_id: String,
    /// Public key, base64url.
    pub public_key: String,
    /// Name.
    pub name: String,
    /// Approved role.
    pub role: String,
    /// Platform.
    pub platform: String,
    /// Approval time, RFC 3339.
    pub approved_at: String,
    /// Key fingerprint.
    pub fingerprint: String,
    /// Classic: display name.
    pub display_name: String,
    /// Classic: device family.
    pub device_family: String,
    /// Classic: client id.
    pub client_id: String,
    /// Classic: client mode.
    pub client_mode: String,
    /// Classic: approved roles.
    pub roles: Vec<String>,
    /// Classic: approved scopes.
    pub scopes: Vec<String>,
    /// Classic: who approved (`owner`).
    pub approved_via: String,
    /// Classic: approval time in ms.
    pub approved_at_ms: u64,
    /// Classic: creation time in ms.
    pub created_at_ms: u64,
    /// Classic: tokens held (values never listed).
    pub tokens: Vec<serde_json::Value>,
    /// Region of the gateway where it was paired (see [`DeviceMeta::region`]).
    pub region: Option<String>,
}

/// What the registry says about a connecting device.
#[derive(Debug, Clone)]
pub enum Admission {
    /// Paired: let it in.
    Paired(PairedDevice),
    /// Not paired: this request waits for an operator.
    Pending(PendingRequest),
}

/// Both lists, for `devices list`.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Waiting devices, oldest first.
    pub pending: Vec<PendingRequest>,
    /// Approved devices.
    pub paired: Vec<PairedDevice>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A short, readable key fingerprint: the device id's first 16 hex characters in groups of 4.
pub fn fingerprint(key: &PublicKey) -> String {
    let id = key.device_id().to_string();
    id.as_bytes()
        .chunks(4)
        .take(4)
        .map(|c| String::from_utf8_lossy(c).to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// A random UUID (version 4), as the classic protocol uses for request ids and nonces.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS paired_devices (
    public_key BLOB PRIMARY KEY,
    device_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    platform TEXT NOT NULL,
    approved_at_ms INTEGER NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS pending_devices (
    request_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    addr TEXT NOT NULL,
    platform TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    refreshed_at_ms INTEGER NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS device_tokens (
    device_id TEXT NOT NULL,
    role TEXT NOT NULL,
    token TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, role)
);
CREATE INDEX IF NOT EXISTS pending_by_key ON pending_devices(public_key, role);
CREATE TABLE IF NOT EXISTS revoked_devices (
    public_key BLOB PRIMARY KEY,
    revoked_at_ms INTEGER NOT NULL
);
";

/// The registry over a state database.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Store,
}

type PendingRow = (
    String,
    Vec<u8>,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
);

fn meta_json(m: &DeviceMeta) -> String {
    serde_json::json!({
        "deviceFamily": m.device_family,
        "clientId": m.client_id,
        "clientMode": m.client_mode,
        "region": m.region,
    })
    .to_string()
}

fn meta_region(meta: &serde_json::Value) -> Option<String> {
    meta.get("region")
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

fn meta_field(meta: &serde_json::Value, key: &str) -> String {
    meta.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string()
}

impl Registry {
    /// Opens the registry, creating its tables if needed.
    pub fn open(store: Store) -> Result<Registry, PairingError> {
        store.with_conn(|c| c.execute_batch(SCHEMA))?;
        Ok(Registry { store })
    }

    /// A key read back from our own store: it was validated when it was written, so skip
    /// the curve-point decompression (the costly part of listing thousands of devices).
    fn key_of(bytes: &[u8]) -> Option<PublicKey> {
        Some(PublicKey(bytes.try_into().ok()?))
    }

    fn pending_from(row: PendingRow) -> Option<PendingRequest> {
        let (request_id, key, name, role, addr, platform, requested, refreshed, meta) = row;
        let key = Self::key_of(&key)?;
        let meta: serde_json::Value = serde_json::from_str(&meta).unwrap_or_default();
        Some(PendingRequest {
            request_id,
            region: meta_region(&meta),
            device_id: key.device_id().to_string(),
            public_key: key.to_base64url(),
            display_name: name.clone(),
            name,
            roles: vec![role.clone()],
            scopes: Vec::new(),
            role,
            remote_ip: addr.clone(),
            addr,
            platform,
            requested_at: rfc3339(requested.max(0) as u64),
            refreshed_at: rfc3339(refreshed.max(0) as u64),
            fingerprint: fingerprint(&key),
            refreshed_ms: refreshed.max(0) as u64,
            device_family: meta_field(&meta, "deviceFamily"),
            client_id: meta_field(&meta, "clientId"),
            client_mode: meta_field(&meta, "clientMode"),
            silent: false,
            is_repair: false,
            ts: refreshed.max(0) as u64,
        })
    }

    fn paired_from(
        key: &PublicKey,
        name: String,
        role: String,
        platform: String,
        at: i64,
        meta: &str,
        tokens: Vec<serde_json::Value>,
    ) -> PairedDevice {
        let meta: serde_json::Value = serde_json::from_str(meta).unwrap_or_default();
        let at = at.max(0) as u64;
        PairedDevice {
            device_id: key.device_id().to_string(),
            public_key: key.to_base64url(),
            display_name: name.clone(),
            name,
            roles: vec![role.clone()],
            scopes: Vec::new(),
            role,
            platform,
            approved_at: rfc3339(at),
            fingerprint: fingerprint(key),
            device_family: meta_field(&meta, "deviceFamily"),
            client_id: meta_field(&meta, "clientId"),
            client_mode: meta_field(&meta, "clientMode"),
            approved_via: "owner".into(),
            approved_at_ms: at,
            created_at_ms: at,
            tokens,
            region: meta_region(&meta),
        }
    }

    fn token_summaries(&self, device_id: &str) -> Result<Vec<serde_json::Value>, PairingError> {
        let rows: Vec<(String, i64)> = self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT role, created_at_ms FROM device_tokens WHERE device_id = ?1",
            )?;
            let rows = stmt
                .query_map([device_id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        Ok(rows
            .into_iter()
            .map(|(role, at)| serde_json::json!({"role": role, "scopes": [], "createdAtMs": at}))
            .collect())
    }

    /// The device token of a paired device for `role`, issued on approval (32 random bytes,
    /// base64url): what classic clients present on later connects.
    pub fn device_token(
        &self,
        device_id: &DeviceId,
        role: &str,
    ) -> Result<Option<(String, u64)>, PairingError> {
        let id = device_id.to_string();
        let row: Option<(String, i64)> = self.store.with_conn(|c| {
            c.query_row(
                "SELECT token, created_at_ms FROM device_tokens WHERE device_id = ?1 AND role = ?2",
                params![id, role],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        Ok(row.map(|(t, at)| (t, at.max(0) as u64)))
    }

    fn issue_token(
        c: &rusqlite::Transaction<'_>,
        device_id: &str,
        role: &str,
        now: u64,
    ) -> rusqlite::Result<()> {
        use base64::Engine as _;
        let bytes: [u8; 32] = rand::rng().random();
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        c.execute(
            "INSERT INTO device_tokens(device_id, role, token, created_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(device_id, role) DO UPDATE SET token = excluded.token, created_at_ms = excluded.created_at_ms",
            params![device_id, role, token, now as i64],
        )?;
        Ok(())
    }

    /// Looks a device up when it connects: paired devices get in; others get (or refresh) a
    /// pending request.
    pub fn admit(&self, key: &PublicKey, m: &DeviceMeta) -> Result<Admission, PairingError> {
        let (name, role, addr, platform) = (
            m.name.as_str(),
            m.role.as_str(),
            m.addr.as_str(),
            m.platform.as_str(),
        );
        let meta = meta_json(m);
        if let Some(p) = self.paired(key)? {
            if p.role == role {
                return Ok(Admission::Paired(p));
            }
        }
        let now = now_ms();
        let cutoff = now.saturating_sub(PENDING_TTL.as_millis() as u64) as i64;
        let kb = key.0.to_vec();
        let device_id = key.device_id().to_string();
        let row = self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM pending_devices WHERE refreshed_at_ms < ?1", [cutoff])?;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT request_id FROM pending_devices WHERE public_key = ?1 AND role = ?2",
                    params![kb, role],
                    |r| r.get(0),
                )
                .optional()?;
            let request_id = match existing {
                Some(id) => {
                    tx.execute(
                        "UPDATE pending_devices SET refreshed_at_ms = ?2, name = ?3, addr = ?4, platform = ?5, meta = ?6 WHERE request_id = ?1",
                        params![id, now as i64, name, addr, platform, meta],
                    )?;
                    id
                }
                None => {
                    let id = uuid_v4();
                    tx.execute(
                        "INSERT INTO pending_devices(request_id, public_key, device_id, name, role, addr, platform, requested_at_ms, refreshed_at_ms, meta)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)",
                        params![id, kb, device_id, name, role, addr, platform, now as i64, meta],
                    )?;
                    tx.execute(
                        "DELETE FROM pending_devices WHERE request_id IN (
                            SELECT request_id FROM pending_devices ORDER BY refreshed_at_ms DESC LIMIT -1 OFFSET ?1)",
                        [MAX_PENDING as i64],
                    )?;
                    id
                }
            };
            let row = tx.query_row(
                "SELECT request_id, public_key, name, role, addr, platform, requested_at_ms, refreshed_at_ms, meta
                 FROM pending_devices WHERE request_id = ?1",
                [&request_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)),
            )?;
            tx.commit()?;
            Ok(row)
        })?;
        Self::pending_from(row)
            .map(Admission::Pending)
            .ok_or_else(|| PairingError::NotFound(device_id))
    }

    /// The paired record of a key, if any.
    pub fn paired(&self, key: &PublicKey) -> Result<Option<PairedDevice>, PairingError> {
        let kb = key.0.to_vec();
        let row: Option<(String, String, String, i64, String)> = self.store.with_conn(|c| {
            c.query_row(
                "SELECT name, role, platform, approved_at_ms, meta FROM paired_devices WHERE public_key = ?1",
                [kb],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
        })?;
        match row {
            Some((name, role, platform, at, meta)) => {
                let tokens = self.token_summaries(&key.device_id().to_string())?;
                Ok(Some(Self::paired_from(
                    key, name, role, platform, at, &meta, tokens,
                )))
            }
            None => Ok(None),
        }
    }

    /// Pending (unexpired) and paired devices.
    pub fn list(&self) -> Result<Listing, PairingError> {
        Ok(Listing {
            pending: self.pending()?,
            paired: self.paired_all()?,
        })
    }

    /// Unexpired pending requests, oldest first (at most [`MAX_PENDING`] rows).
    pub fn pending(&self) -> Result<Vec<PendingRequest>, PairingError> {
        let cutoff = now_ms().saturating_sub(PENDING_TTL.as_millis() as u64);
        let rows = self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT request_id, public_key, name, role, addr, platform, requested_at_ms, refreshed_at_ms, meta
                 FROM pending_devices WHERE refreshed_at_ms >= ?1 ORDER BY requested_at_ms",
            )?;
            let rows: Vec<PendingRow> = stmt
                .query_map([cutoff as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?))
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })?;
        Ok(rows.into_iter().filter_map(Self::pending_from).collect())
    }

    /// Every paired device, with its token summaries, in one query.
    pub fn paired_all(&self) -> Result<Vec<PairedDevice>, PairingError> {
        type Row = (
            Vec<u8>,
            String,
            String,
            String,
            i64,
            String,
            Option<String>,
            Option<i64>,
        );
        let rows: Vec<Row> = self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT p.public_key, p.name, p.role, p.platform, p.approved_at_ms, p.meta, t.role, t.created_at_ms
                 FROM paired_devices p LEFT JOIN device_tokens t ON t.device_id = p.device_id
                 ORDER BY p.approved_at_ms, p.device_id",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        let mut out: Vec<PairedDevice> = Vec::new();
        for (k, name, role, platform, at, meta, token_role, token_at) in rows {
            let Some(key) = Self::key_of(&k) else {
                continue;
            };
            let token = token_role.map(|r| serde_json::json!({"role": r, "scopes": [], "createdAtMs": token_at.unwrap_or(0)}));
            if let Some(last) = out
                .last_mut()
                .filter(|d| d.public_key == key.to_base64url())
            {
                last.tokens.extend(token);
                continue;
            }
            out.push(Self::paired_from(
                &key,
                name,
                role,
                platform,
                at,
                &meta,
                token.into_iter().collect(),
            ));
        }
        Ok(out)
    }

    /// The one pending request `selector` names (request id, device id, name, or id prefix),
    /// for checks an operator front end makes before [`Self::approve`].
    pub fn find_pending(&self, selector: &str) -> Result<PendingRequest, PairingError> {
        let all = self.pending()?;
        pick(
            selector,
            all,
            |p| {
                [&p.request_id, &p.device_id, &p.name]
                    .iter()
                    .any(|f| f.as_str() == selector)
            },
            |p| p.device_id.starts_with(selector) || p.request_id.starts_with(selector),
            |p| format!("{} ({})", p.name, &p.device_id[..12]),
        )
    }

    fn find_paired(&self, selector: &str) -> Result<PairedDevice, PairingError> {
        let all = self.paired_all()?;
        pick(
            selector,
            all,
            |p| p.device_id == selector || p.name == selector,
            |p| p.device_id.starts_with(selector),
            |p| format!("{} ({})", p.name, &p.device_id[..12]),
        )
    }

    /// Approves a pending request (by request id, device id, name, or id prefix).
    pub fn approve(&self, selector: &str) -> Result<PairedDevice, PairingError> {
        let p = self.find_pending(selector)?;
        let key = PublicKey::from_base64(&p.public_key)
            .map_err(|_| PairingError::NotFound(selector.to_string()))?;
        let now = now_ms();
        let meta = serde_json::json!({
            "deviceFamily": p.device_family, "clientId": p.client_id, "clientMode": p.client_mode,
            "region": p.region,
        })
        .to_string();
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO paired_devices(public_key, device_id, name, role, platform, approved_at_ms, meta)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(public_key) DO UPDATE SET name = excluded.name, role = excluded.role,
                    platform = excluded.platform, approved_at_ms = excluded.approved_at_ms, meta = excluded.meta",
                params![key.0.to_vec(), p.device_id, p.name, p.role, p.platform, now as i64, meta],
            )?;
            Self::issue_token(&tx, &p.device_id, &p.role, now)?;
            tx.execute("DELETE FROM pending_devices WHERE public_key = ?1", [key.0.to_vec()])?;
            tx.execute("DELETE FROM revoked_devices WHERE public_key = ?1", [key.0.to_vec()])?;
            tx.commit()
        })?;
        self.paired(&key)?
            .ok_or_else(|| PairingError::NotFound(selector.to_string()))
    }

    /// Rejects a pending request; the device may ask again later.
    pub fn reject(&self, selector: &str) -> Result<PendingRequest, PairingError> {
        let p = self.find_pending(selector)?;
        self.store.with_conn(|c| {
            c.execute(
                "DELETE FROM pending_devices WHERE request_id = ?1",
                [&p.request_id],
            )
        })?;
        Ok(p)
    }

    /// Revokes a paired device: it must be approved again to attach.
    pub fn revoke(&self, selector: &str) -> Result<PairedDevice, PairingError> {
        let p = self.find_paired(selector)?;
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM paired_devices WHERE device_id = ?1",
                [&p.device_id],
            )?;
            if let Ok(key) = PublicKey::from_base64(&p.public_key) {
                tx.execute(
                    "INSERT INTO revoked_devices(public_key, revoked_at_ms) VALUES (?1, ?2)
                     ON CONFLICT(public_key) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms",
                    params![key.0.to_vec(), now_ms().max(1) as i64],
                )?;
            }
            tx.execute(
                "DELETE FROM device_tokens WHERE device_id = ?1",
                [&p.device_id],
            )?;
            tx.commit()
        })?;
        Ok(p)
    }

    /// The pairing record of one key (paired or revoked), to send to the other gateways.
    pub fn record(&self, key: &PublicKey) -> Result<Option<PairingRecord>, PairingError> {
        Ok(self.records()?.into_iter().find(|r| r.key == *key))
    }

    /// Every paired and revoked device, for a full exchange when two gateways link.
    pub fn records(&self) -> Result<Vec<PairingRecord>, PairingError> {
        Ok(self.store.with_conn(|c| read_records(c))?)
    }

    /// Merges records from another gateway: for each device the newest decision wins.
    /// Returns the records that changed something here (callers disconnect revoked devices).
    pub fn apply(&self, records: &[PairingRecord]) -> Result<Vec<PairingRecord>, PairingError> {
        Ok(self.store.with_conn(|c| {
            let tx = c.transaction()?;
            let changed = apply_records(&tx, records)?;
            tx.commit()?;
            Ok(changed)
        })?)
    }

    /// Whether a device id is paired (for quick checks on live sessions).
    pub fn is_paired(&self, id: &DeviceId) -> Result<bool, PairingError> {
        let s = id.to_string();
        Ok(self
            .store
            .with_conn(|c| {
                c.query_row(
                    "SELECT 1 FROM paired_devices WHERE device_id = ?1",
                    [s],
                    |_| Ok(()),
                )
                .optional()
            })?
            .is_some())
    }
}

/// Creates the pairing tables if needed (for the consensus state machine, which applies
/// replicated pairing decisions into them).
pub(crate) fn ensure_schema(c: &rusqlite::Connection) -> rusqlite::Result<()> {
    c.execute_batch(SCHEMA)
}

/// Every paired and revoked device, read on `c` (a transaction derefs to a connection, so
/// callers read inside theirs).
pub(crate) fn read_records(c: &rusqlite::Connection) -> rusqlite::Result<Vec<PairingRecord>> {
    type Row = (
        Vec<u8>,
        String,
        String,
        String,
        i64,
        String,
        Option<String>,
        Option<i64>,
    );
    let mut stmt = c.prepare_cached(
        "SELECT p.public_key, p.name, p.role, p.platform, p.approved_at_ms, p.meta, t.token, t.created_at_ms
         FROM paired_devices p LEFT JOIN device_tokens t ON t.device_id = p.device_id AND t.role = p.role",
    )?;
    let paired: Vec<Row> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = c.prepare_cached("SELECT public_key, revoked_at_ms FROM revoked_devices")?;
    let revoked: Vec<(Vec<u8>, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for (k, name, role, platform, at, meta, token, token_at) in paired {
        let Some(key) = Registry::key_of(&k) else {
            continue;
        };
        out.push(PairingRecord {
            key,
            approved: true,
            changed_at_ms: at.max(0) as u64,
            name,
            role,
            platform,
            meta,
            token: token.map(|t| (t, token_at.unwrap_or(0).max(0) as u64)),
        });
    }
    for (k, at) in revoked {
        let Some(key) = Registry::key_of(&k) else {
            continue;
        };
        out.push(PairingRecord {
            key,
            approved: false,
            changed_at_ms: at.max(0) as u64,
            name: String::new(),
            role: String::new(),
            platform: String::new(),
            meta: "{}".into(),
            token: None,
        });
    }
    Ok(out)
}

/// Merges `records` on `c` (the caller commits): for each device the newest decision wins, a
/// revocation wins a tie. Deterministic, so every gateway applying the same records in the
/// same order ends in the same state. Returns the records that changed something.
pub(crate) fn apply_records(
    c: &rusqlite::Connection,
    records: &[PairingRecord],
) -> rusqlite::Result<Vec<PairingRecord>> {
    let mut mine: HashMap<PublicKey, PairingRecord> =
        read_records(c)?.into_iter().map(|r| (r.key, r)).collect();
    let mut changed = Vec::new();
    for r in records.iter().take(MAX_SYNC_RECORDS) {
        if let Some(m) = mine.get(&r.key) {
            let newer = r.changed_at_ms > m.changed_at_ms
                || (r.changed_at_ms == m.changed_at_ms && !r.approved && m.approved);
            if !newer {
                continue;
            }
        }
        let kb = r.key.0.to_vec();
        let id = r.key.device_id().to_string();
        if r.approved {
            c.execute(
                "INSERT INTO paired_devices(public_key, device_id, name, role, platform, approved_at_ms, meta)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(public_key) DO UPDATE SET name = excluded.name, role = excluded.role,
                    platform = excluded.platform, approved_at_ms = excluded.approved_at_ms, meta = excluded.meta",
                params![kb, id, r.name, r.role, r.platform, r.changed_at_ms as i64, r.meta],
            )?;
            if let Some((token, at)) = &r.token {
                c.execute(
                    "INSERT INTO device_tokens(device_id, role, token, created_at_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(device_id, role) DO UPDATE SET token = excluded.token, created_at_ms = excluded.created_at_ms",
                    params![id, r.role, token, *at as i64],
                )?;
            }
            c.execute("DELETE FROM revoked_devices WHERE public_key = ?1", [&kb])?;
            c.execute("DELETE FROM pending_devices WHERE public_key = ?1", [&kb])?;
        } else {
            c.execute("DELETE FROM paired_devices WHERE public_key = ?1", [&kb])?;
            c.execute("DELETE FROM device_tokens WHERE device_id = ?1", [&id])?;
            c.execute(
                "INSERT INTO revoked_devices(public_key, revoked_at_ms) VALUES (?1, ?2)
                 ON CONFLICT(public_key) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms",
                params![kb, r.changed_at_ms as i64],
            )?;
        }
        // Later records of the same batch compare against this one.
        mine.insert(r.key, r.clone());
        changed.push(r.clone());
    }
    Ok(changed)
}

fn pick<T>(
    selector: &str,
    all: Vec<T>,
    exact: impl Fn(&T) -> bool,
    prefix: impl Fn(&T) -> bool,
    show: impl Fn(&T) -> String,
) -> Result<T, PairingError> {
    let selector = selector.trim();
    let (mut exact_hits, rest): (Vec<T>, Vec<T>) = all.into_iter().partition(|t| exact(t));
    if exact_hits.len() == 1 {
        return exact_hits
            .pop()
            .ok_or_else(|| PairingError::NotFound(selector.into()));
    }
    if exact_hits.len() > 1 {
        return Err(PairingError::Ambiguous {
            selector: selector.into(),
            candidates: exact_hits.iter().map(&show).collect::<Vec<_>>().join(", "),
        });
    }
    if selector.len() < 6 {
        return Err(PairingError::NotFound(selector.into()));
    }
    let mut hits: Vec<T> = rest.into_iter().filter(|t| prefix(t)).collect();
    match hits.len() {
        1 => hits
            .pop()
            .ok_or_else(|| PairingError::NotFound(selector.into())),
        0 => Err(PairingError::NotFound(selector.into())),
        _ => Err(PairingError::Ambiguous {
            selector: selector.into(),
            candidates: hits.iter().map(&show).collect::<Vec<_>>().join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceIdentity;

    fn meta(name: &str, addr: &str) -> DeviceMeta {
        DeviceMeta {
            name: name.into(),
            role: "node".into(),
            addr: addr.into(),
            platform: "linux".into(),
            ..Default::default()
        }
    }

    #[test]
    fn pending_approve_reject_revoke_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        let k1 = DeviceIdentity::ephemeral().public_key();
        let k2 = DeviceIdentity::ephemeral().public_key();
        let Admission::Pending(p1) = reg.admit(&k1, &meta("node-a", "127.0.0.1:1")).unwrap() else {
            panic!("new device must be pending")
        };
        // A retry reuses the same request.
        let Admission::Pending(again) = reg.admit(&k1, &meta("node-a", "127.0.0.1:1")).unwrap()
        else {
            panic!()
        };
        assert_eq!(p1.request_id, again.request_id);
        let Admission::Pending(p2) = reg.admit(&k2, &meta("node-b", "127.0.0.1:2")).unwrap() else {
            panic!()
        };
        assert_eq!(reg.list().unwrap().pending.len(), 2);
        assert!(matches!(
            reg.approve("nope-nope"),
            Err(PairingError::NotFound(_))
        ));
        let d = reg.approve(&p1.request_id).unwrap();
        assert_eq!(d.name, "node-a");
        let (tok, _) = reg.device_token(&k1.device_id(), "node").unwrap().unwrap();
        assert_eq!(tok.len(), 43);
        assert_eq!(d.tokens.len(), 1);
        assert!(matches!(
            reg.admit(&k1, &meta("node-a", "x")).unwrap(),
            Admission::Paired(_)
        ));
        reg.reject("node-b").unwrap();
        assert!(reg.list().unwrap().pending.is_empty());
        let _ = p2;
        // Survives a reopen.
        drop(reg);
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        assert!(reg.is_paired(&k1.device_id()).unwrap());
        let r = reg.revoke(&k1.device_id().to_string()[..10]).unwrap();
        assert_eq!(r.name, "node-a");
        assert!(!reg.is_paired(&k1.device_id()).unwrap());
        assert!(reg.device_token(&k1.device_id(), "node").unwrap().is_none());

        // Replication: another gateway learns the revocation and a later approval.
        let dir2 = tempfile::tempdir().unwrap();
        let other = Registry::open(Store::open(dir2.path()).unwrap()).unwrap();
        let revoked = reg.records().unwrap();
        assert!(revoked.iter().any(|r| r.key == k1 && !r.approved));
        other.apply(&revoked).unwrap();
        assert!(!other.is_paired(&k1.device_id()).unwrap());
        // Revoked: it must ask again.
        let Admission::Pending(p) = reg.admit(&k1, &meta("node-a", "x")).unwrap() else {
            panic!()
        };
        std::thread::sleep(std::time::Duration::from_millis(5));
        reg.approve(&p.request_id).unwrap();
        let changed = other.apply(&reg.records().unwrap()).unwrap();
        assert_eq!(changed.len(), 1);
        assert!(other.is_paired(&k1.device_id()).unwrap());
        assert_eq!(
            other.device_token(&k1.device_id(), "node").unwrap(),
            reg.device_token(&k1.device_id(), "node").unwrap()
        );
        // Applying the same records again changes nothing; an older revocation loses.
        assert!(other.apply(&reg.records().unwrap()).unwrap().is_empty());
        assert!(other.apply(&revoked).unwrap().is_empty());
        assert!(other.is_paired(&k1.device_id()).unwrap());
        assert!(matches!(
            reg.admit(&k1, &meta("node-a", "x")).unwrap(),
            Admission::Paired(_)
        ));
    }
}
