//! The pairing registry: which devices may attach as nodes, and who is waiting.
//!
//! A device the gateway does not know becomes a *pending request* when it connects; an operator
//! approves, rejects or later revokes it (`clawmesh devices ...`). The registry lives in the
//! state database, so it survives restarts and crashes (each change is one transaction).
//! Pending requests expire [`PENDING_TTL`] after the device last retried. The shapes follow the
//! classic OpenClaw protocol's `device.pair.*` records.

use std::time::{Duration, SystemTime};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// Shortest id prefix that selects a device (`nodes invoke --node 3fa2c1`): shorter ones
/// would match many devices of a large fleet, and collide with short names.
pub const MIN_ID_PREFIX: usize = 6;

/// Most paired devices [`Registry::paired_selected`] returns per kind of match (exact name,
/// id prefix): an ambiguous selector's error lists them; more would only lengthen it.
pub const SELECTED_MAX: usize = 16;

/// Most records taken from one exchange: far above any real fleet's devices; a peer cannot
/// make us write without bound.
pub const MAX_SYNC_RECORDS: usize = 100_000;

/// Most devices (paired and revoked together) in one page of [`Registry::page`]: a paired
/// device is about 700 bytes of JSON (more with a tailnet identity), so a page stays near
/// 10 MB, well under the 32 MiB frame limit, at any fleet size.
pub const MAX_PAGE: usize = 10_000;

/// The tailnet node a paired device's metadata names (`$.tailnet.nodeId`), as the expression
/// index `paired_by_tailnet_node` in the schema computes it: the lookup must spell it the same
/// way to use the index. `json_valid` first: a peer's malformed metadata must not fail a write.
macro_rules! tailnet_node_expr {
    () => {
        "CASE WHEN json_valid(meta) THEN json_extract(meta, '$.tailnet.nodeId') END"
    };
}

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
    /// Why the device waits, when something other than "nobody approved it yet" decided
    /// (e.g. `tailscaled unreachable`), shown in `devices list`.
    pub reason: String,
    /// The tailnet identity whois gave for the connection, if any (shown, never trusted
    /// beyond what the gateway's own policy decided).
    pub tailnet: Option<serde_json::Value>,
    /// Region of the gateway where the request waits: kept in the pairing record, it is the
    /// node's `region` when the node has no label of its own, wherever it attaches later.
    pub region: Option<String>,
}

/// Who approved a paired device: `devices approve` (an operator) or the tailnet policy.
pub const APPROVED_BY_OPERATOR: &str = "operator";
/// The tailnet vouched for the device (`gateway.auth.allowTailscale`).
pub const APPROVED_BY_TAILSCALE: &str = "tailscale";

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
    /// Why it waits beyond "not approved yet" (tailscaled unreachable, tailnet identity not
    /// allowed, another key bound to the same tailnet node, ...); empty otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What the tailnet said about the connection, if it was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tailnet: Option<serde_json::Value>,
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
    /// How it was admitted: [`APPROVED_BY_OPERATOR`] or [`APPROVED_BY_TAILSCALE`].
    pub approved_by: String,
    /// For a tailnet admission, the identity the tailnet vouched for: `login` or `tags`,
    /// `node` (MagicDNS name), `nodeId` (stable id), `ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tailnet: Option<serde_json::Value>,
    /// Region of the gateway where it was paired (see [`DeviceMeta::region`]).
    pub region: Option<String>,
}

/// A revoked device, for `devices list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedDevice {
    /// Device id (hex).
    pub device_id: String,
    /// Name it had when revoked (may be empty for old records).
    pub name: String,
    /// Revocation time, RFC 3339.
    pub revoked_at: String,
    /// Who revoked it: `operator` or `tailscale`.
    pub revoked_by: String,
    /// Why.
    pub reason: String,
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
    /// Revoked devices (tombstones), newest first.
    pub revoked: Vec<RevokedDevice>,
}

/// One page of the paired and revoked devices, in public key order (see [`Registry::page`]).
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Approved devices of this page.
    pub paired: Vec<PairedDevice>,
    /// Revoked devices (tombstones) of this page.
    pub revoked: Vec<RevokedDevice>,
    /// Where the next page starts (the last device's key, base64url), if any device follows.
    pub next: Option<String>,
}

/// Reads a page cursor (the `next` of a previous page): 32 bytes of base64. Only an order
/// position, so the bytes need not be a valid curve point.
pub fn parse_cursor(text: &str) -> Option<[u8; 32]> {
    crate::identity::decode_base64_lenient(text)?
        .try_into()
        .ok()
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
CREATE INDEX IF NOT EXISTS paired_by_name ON paired_devices(name);
CREATE INDEX IF NOT EXISTS pending_by_device ON pending_devices(device_id);
CREATE INDEX IF NOT EXISTS pending_by_name ON pending_devices(name);
DROP INDEX IF EXISTS paired_by_name_nocase;
-- The expression must stay the very one PAIRED_SELECTED compares, or the index goes unused
-- (a test reads the query plan).
CREATE INDEX IF NOT EXISTS paired_by_trimmed_name ON paired_devices(
    trim(name, char(32, 9, 10, 11, 12, 13)) COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS pending_by_refreshed ON pending_devices(refreshed_at_ms);
CREATE INDEX IF NOT EXISTS paired_by_tailnet_node ON paired_devices(
    CASE WHEN json_valid(meta) THEN json_extract(meta, '$.tailnet.nodeId') END);
CREATE TABLE IF NOT EXISTS paired_generation (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO paired_generation(id, generation) VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS paired_generation_insert AFTER INSERT ON paired_devices
    BEGIN UPDATE paired_generation SET generation = generation + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS paired_generation_update AFTER UPDATE ON paired_devices
    BEGIN UPDATE paired_generation SET generation = generation + 1 WHERE id = 0; END;
CREATE TRIGGER IF NOT EXISTS paired_generation_delete AFTER DELETE ON paired_devices
    BEGIN UPDATE paired_generation SET generation = generation + 1 WHERE id = 0; END;
CREATE TABLE IF NOT EXISTS revoked_devices (
    public_key BLOB PRIMARY KEY,
    revoked_at_ms INTEGER NOT NULL
);
";

/// The registry over a state database.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Store,
    /// The last [`PairedBrief`] built, with the `paired_generation` it was built at (every
    /// change of `paired_devices`, by this registry, the replicated log or a merge, bumps it
    /// through a trigger).
    brief: Arc<Mutex<Option<CachedBrief>>>,
}

/// A [`PairedBrief`] with the `paired_generation` it was built at.
type CachedBrief = (i64, Arc<PairedBrief>);

/// What a node listing needs of one paired device.
#[derive(Debug, Clone)]
pub struct BriefDevice {
    /// Device id (hex).
    pub device_id: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Platform.
    pub platform: String,
    /// Classic client id.
    pub client_id: String,
    /// Classic client mode.
    pub client_mode: String,
    /// Device family.
    pub device_family: String,
    /// Region of the gateway where it was paired.
    pub region: Option<String>,
    /// When it was approved (RFC 3339).
    pub approved_at: String,
    /// Who admitted it (`operator`, `tailscale`).
    pub approved_by: String,
    /// The tailnet identity that vouched for it, if any.
    pub tailnet: Option<serde_json::Value>,
}

/// Every paired device, sorted by device id, for listings at fleet size: built once per change
/// of the paired devices and shared (see [`Registry::paired_brief`]).
#[derive(Debug, Default)]
pub struct PairedBrief {
    /// The devices, by device id.
    pub devices: Vec<BriefDevice>,
}

impl PairedBrief {
    /// The paired device with this id, if any.
    pub fn get(&self, device_id: &str) -> Option<&BriefDevice> {
        self.devices
            .binary_search_by(|d| d.device_id.as_str().cmp(device_id))
            .ok()
            .map(|i| &self.devices[i])
    }
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

/// Reads a [`PendingRow`] (the columns of `pending_cols!`, in that order).
fn pending_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PendingRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn meta_json(m: &DeviceMeta) -> String {
    let mut v = serde_json::json!({
        "deviceFamily": m.device_family,
        "clientId": m.client_id,
        "clientMode": m.client_mode,
        "region": m.region,
    });
    if !m.reason.is_empty() {
        v["reason"] = serde_json::json!(m.reason);
    }
    if let Some(t) = &m.tailnet {
        v["tailnet"] = t.clone();
    }
    v.to_string()
}

/// Adds what later versions keep in old tables: the revocation's metadata (who, why).
fn migrate(c: &rusqlite::Connection) -> rusqlite::Result<()> {
    let has_meta: bool = c
        .prepare("SELECT 1 FROM pragma_table_info('revoked_devices') WHERE name = 'meta'")?
        .exists([])?;
    if !has_meta {
        c.execute_batch("ALTER TABLE revoked_devices ADD COLUMN meta TEXT NOT NULL DEFAULT '{}'")?;
    }
    Ok(())
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

/// The columns of a pending request, as [`PendingRow`] reads them.
macro_rules! pending_cols {
    () => {
        "request_id, public_key, name, role, addr, platform, requested_at_ms, refreshed_at_ms, meta"
    };
}

/// Unexpired pending requests whose request id (primary key), device id or name
/// (`pending_by_device`, `pending_by_name`) is `?1`.
const PENDING_EXACT: &str = concat!(
    "SELECT ",
    pending_cols!(),
    " FROM pending_devices WHERE request_id = ?1 AND refreshed_at_ms >= ?2
     UNION SELECT ",
    pending_cols!(),
    " FROM pending_devices WHERE device_id = ?1 AND refreshed_at_ms >= ?2
     UNION SELECT ",
    pending_cols!(),
    " FROM pending_devices WHERE name = ?1 AND refreshed_at_ms >= ?2
     LIMIT ?3"
);

/// Unexpired pending requests whose device id or request id starts with `?1` (`?2` is `?1`
/// followed by the largest character): two index ranges.
const PENDING_PREFIX: &str = concat!(
    "SELECT ",
    pending_cols!(),
    " FROM pending_devices
        WHERE device_id >= ?1 AND device_id < ?2 AND refreshed_at_ms >= ?3
     UNION SELECT ",
    pending_cols!(),
    " FROM pending_devices
        WHERE request_id >= ?1 AND request_id < ?2 AND refreshed_at_ms >= ?3
     LIMIT ?4"
);

/// The keys of paired devices whose metadata names tailnet node `?1` (the expression index
/// `paired_by_tailnet_node`).
const PAIRED_BY_TAILNET_NODE: &str = concat!(
    "SELECT public_key FROM paired_devices WHERE ",
    tailnet_node_expr!(),
    " = ?1 LIMIT ?2"
);

/// A key's revocation tombstone (primary key).
const REVOKED_BY_KEY: &str =
    "SELECT revoked_at_ms, meta FROM revoked_devices WHERE public_key = ?1";

/// Paired devices after key `?1`, in key order, at most `?2` (a primary key range).
const PAIRED_PAGE: &str =
    "SELECT public_key, name, role, platform, approved_at_ms, meta FROM paired_devices
     WHERE public_key > ?1 ORDER BY public_key LIMIT ?2";

/// Revoked devices after key `?1`, in key order, at most `?2` (a primary key range).
const REVOKED_PAGE: &str = "SELECT public_key, revoked_at_ms, meta FROM revoked_devices
     WHERE public_key > ?1 ORDER BY public_key LIMIT ?2";

/// A device's tokens (primary key prefix).
const TOKENS_OF: &str = "SELECT role, created_at_ms FROM device_tokens WHERE device_id = ?1";

/// A paired device by key (primary key).
const PAIRED_BY_KEY: &str =
    "SELECT name, role, platform, approved_at_ms, meta FROM paired_devices WHERE public_key = ?1";

/// Paired devices whose device id (unique index) or name (`paired_by_name`) is `?1`.
const PAIRED_EXACT: &str = "SELECT public_key FROM paired_devices WHERE device_id = ?1
     UNION SELECT public_key FROM paired_devices WHERE name = ?1 LIMIT ?2";

/// Paired devices whose id starts with `?1` (a range on the device id index).
const PAIRED_PREFIX: &str =
    "SELECT public_key FROM paired_devices WHERE device_id >= ?1 AND device_id < ?2
     ORDER BY device_id LIMIT ?3";

/// Another paired device under name `?1` (`paired_by_name`).
const NAME_CLASH: &str =
    "SELECT public_key FROM paired_devices WHERE name = ?1 AND device_id != ?2 LIMIT 1";

/// Expired pending requests (`pending_by_refreshed`: a range, not a scan).
const PENDING_EXPIRE: &str = "DELETE FROM pending_devices WHERE refreshed_at_ms < ?1";

/// A key's pending request for a role (`pending_by_key`).
const PENDING_OF_KEY: &str =
    "SELECT request_id FROM pending_devices WHERE public_key = ?1 AND role = ?2";

/// A device's retry: the request's time and what it says about itself (primary key).
const PENDING_REFRESH: &str = "UPDATE pending_devices SET refreshed_at_ms = ?2, name = ?3, addr = ?4, platform = ?5, meta = ?6
     WHERE request_id = ?1";

/// A new pending request.
const PENDING_INSERT: &str = "INSERT INTO pending_devices(request_id, public_key, device_id, name, role, addr, platform, requested_at_ms, refreshed_at_ms, meta)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)";

/// The requests beyond the newest `?1` ([`MAX_PENDING`]): `pending_by_refreshed` walked from
/// the newest, so it reads at most [`MAX_PENDING`] + 1 index entries and sorts nothing.
const PENDING_TRIM: &str = "DELETE FROM pending_devices WHERE request_id IN (
     SELECT request_id FROM pending_devices ORDER BY refreshed_at_ms DESC LIMIT -1 OFFSET ?1)";

/// One pending request (primary key).
const PENDING_BY_ID: &str = concat!(
    "SELECT ",
    pending_cols!(),
    " FROM pending_devices WHERE request_id = ?1"
);

/// A device's token for one role (primary key).
const TOKEN_OF_ROLE: &str =
    "SELECT token, created_at_ms FROM device_tokens WHERE device_id = ?1 AND role = ?2";

/// Whether a device id is paired (unique index).
const IS_PAIRED: &str = "SELECT 1 FROM paired_devices WHERE device_id = ?1";

/// A paired device by device id (unique index).
const PAIRED_BY_ID: &str = "SELECT public_key FROM paired_devices WHERE device_id = ?1";

/// Paired devices a node selector `?1` (trimmed) names exactly: its device id (unique index)
/// or its name without ASCII whitespace at either end, compared without ASCII case
/// (`paired_by_trimmed_name`, an index on that very expression: a name stored as `" box "`
/// is found by `box`, as the gateway's other selector paths trim names), at most `?2`.
const PAIRED_SELECTED: &str = "SELECT public_key FROM paired_devices WHERE device_id = ?1
     UNION SELECT public_key FROM paired_devices
     WHERE trim(name, char(32, 9, 10, 11, 12, 13)) = ?1 COLLATE NOCASE LIMIT ?2";

/// A paired device's federation record by key, with its token (primary keys).
const RECORD_BY_KEY: &str = "SELECT p.name, p.role, p.platform, p.approved_at_ms, p.meta, t.token, t.created_at_ms
     FROM paired_devices p LEFT JOIN device_tokens t ON t.device_id = p.device_id AND t.role = p.role
     WHERE p.public_key = ?1";

impl Registry {
    /// Opens the registry, creating its tables if needed.
    pub fn open(store: Store) -> Result<Registry, PairingError> {
        store.with_conn(|c| {
            c.execute_batch(SCHEMA)?;
            migrate(c)
        })?;
        Ok(Registry {
            store,
            brief: Arc::new(Mutex::new(None)),
        })
    }

    /// Every paired device in brief, by device id. Cached: rebuilt only when the paired
    /// devices changed since the last call (one indexed read tells), so listing 100 000 nodes
    /// does not read 100 000 rows every time.
    pub fn paired_brief(&self) -> Result<Arc<PairedBrief>, PairingError> {
        let generation: i64 = self.store.with_conn(|c| {
            c.query_row(
                "SELECT generation FROM paired_generation WHERE id = 0",
                [],
                |r| r.get(0),
            )
        })?;
        let mut cache = self.brief.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, b)) = cache.as_ref() {
            if *g == generation {
                return Ok(b.clone());
            }
        }
        let rows: Vec<(String, String, String, String, i64, String)> =
            self.store.with_conn(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT device_id, name, role, platform, approved_at_ms, meta
                     FROM paired_devices ORDER BY device_id",
                )?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })?;
        let devices = rows
            .into_iter()
            .map(|(device_id, name, role, platform, at, meta)| {
                let meta: serde_json::Value = serde_json::from_str(&meta).unwrap_or_default();
                BriefDevice {
                    device_id,
                    name,
                    role,
                    platform,
                    client_id: meta_field(&meta, "clientId"),
                    client_mode: meta_field(&meta, "clientMode"),
                    device_family: meta_field(&meta, "deviceFamily"),
                    region: meta_region(&meta),
                    approved_at: rfc3339(at.max(0) as u64),
                    approved_by: match meta_field(&meta, "approvedBy") {
                        b if b.is_empty() => APPROVED_BY_OPERATOR.to_string(),
                        b => b,
                    },
                    tailnet: meta.get("tailnet").filter(|t| !t.is_null()).cloned(),
                }
            })
            .collect();
        let brief = Arc::new(PairedBrief { devices });
        *cache = Some((generation, brief.clone()));
        Ok(brief)
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
            reason: meta_field(&meta, "reason"),
            tailnet: meta.get("tailnet").filter(|t| !t.is_null()).cloned(),
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
            approved_by: match meta_field(&meta, "approvedBy") {
                b if b.is_empty() => APPROVED_BY_OPERATOR.to_string(),
                b => b,
            },
            tailnet: meta.get("tailnet").filter(|t| !t.is_null()).cloned(),
            region: meta_region(&meta),
        }
    }

    fn token_summaries(&self, device_id: &str) -> Result<Vec<serde_json::Value>, PairingError> {
        let rows: Vec<(String, i64)> = self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(TOKENS_OF)?;
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
            c.prepare_cached(TOKEN_OF_ROLE)?
                .query_row(params![id, role], |r| Ok((r.get(0)?, r.get(1)?)))
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
        // Every statement of this path is prepared once per connection (`prepare_cached`) and
        // is an index search (`pending_by_refreshed`, `pending_by_key`, primary keys): a new
        // key costs the same at 10 or 100 000 paired devices.
        let row = self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.prepare_cached(PENDING_EXPIRE)?.execute([cutoff])?;
            let existing: Option<String> = tx
                .prepare_cached(PENDING_OF_KEY)?
                .query_row(params![kb, role], |r| r.get(0))
                .optional()?;
            let request_id = match existing {
                Some(id) => {
                    tx.prepare_cached(PENDING_REFRESH)?
                        .execute(params![id, now as i64, name, addr, platform, meta])?;
                    id
                }
                None => {
                    let id = uuid_v4();
                    tx.prepare_cached(PENDING_INSERT)?.execute(params![
                        id, kb, device_id, name, role, addr, platform, now as i64, meta
                    ])?;
                    tx.prepare_cached(PENDING_TRIM)?
                        .execute([MAX_PENDING as i64])?;
                    id
                }
            };
            let row = tx
                .prepare_cached(PENDING_BY_ID)?
                .query_row([&request_id], pending_row)?;
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
            c.prepare_cached(PAIRED_BY_KEY)?
                .query_row([kb], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
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
            revoked: self.revoked_all()?,
        })
    }

    /// Every revocation tombstone, newest first.
    pub fn revoked_all(&self) -> Result<Vec<RevokedDevice>, PairingError> {
        let rows: Vec<(Vec<u8>, i64, String)> = self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT public_key, revoked_at_ms, meta FROM revoked_devices ORDER BY revoked_at_ms DESC",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, at, meta)| Some(Self::revoked_from(&Self::key_of(&k)?, at, &meta)))
            .collect())
    }

    /// The revocation tombstone of a key, if it is revoked: (who, why). One read by key.
    pub fn revocation(&self, key: &PublicKey) -> Result<Option<(String, String)>, PairingError> {
        let kb = key.0.to_vec();
        let row: Option<(i64, String)> = self.store.with_conn(|c| {
            c.prepare_cached(REVOKED_BY_KEY)?
                .query_row([kb], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })?;
        Ok(row.map(|(at, meta)| {
            let r = Self::revoked_from(key, at, &meta);
            (r.revoked_by, r.reason)
        }))
    }

    fn revoked_from(key: &PublicKey, at: i64, meta: &str) -> RevokedDevice {
        let meta: serde_json::Value = serde_json::from_str(meta).unwrap_or_default();
        RevokedDevice {
            device_id: key.device_id().to_string(),
            name: meta_field(&meta, "name"),
            revoked_at: rfc3339(at.max(0) as u64),
            revoked_by: match meta_field(&meta, "revokedBy") {
                b if b.is_empty() => APPROVED_BY_OPERATOR.to_string(),
                b => b,
            },
            reason: meta_field(&meta, "reason"),
        }
    }

    /// One page of the paired and revoked devices together, in public key order, starting
    /// after `after` (a [`Page::next`]); at most `limit` devices (clamped to 1..=[`MAX_PAGE`]).
    /// Two range reads on the tables' primary keys: a page costs the same at any fleet size,
    /// and every device is on exactly one page.
    pub fn page(&self, after: Option<&[u8; 32]>, limit: usize) -> Result<Page, PairingError> {
        let limit = limit.clamp(1, MAX_PAGE);
        // An empty blob sorts before every key.
        let from: Vec<u8> = after.map(|a| a.to_vec()).unwrap_or_default();
        // One more than the page: tells whether another page follows.
        let want = (limit + 1) as i64;
        type PairedRow = (Vec<u8>, String, String, String, i64, String);
        type RevokedRow = (Vec<u8>, i64, String);
        let (paired, revoked): (Vec<PairedRow>, Vec<RevokedRow>) = self.store.with_conn(|c| {
            let paired = c
                .prepare_cached(PAIRED_PAGE)?
                .query_map(params![from, want], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let revoked = c
                .prepare_cached(REVOKED_PAGE)?
                .query_map(params![from, want], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok((paired, revoked))
        })?;
        let mut out = Page {
            paired: Vec::new(),
            revoked: Vec::new(),
            next: None,
        };
        let (mut p, mut r) = (
            paired.into_iter().peekable(),
            revoked.into_iter().peekable(),
        );
        let mut last: Option<Vec<u8>> = None;
        for _ in 0..limit {
            let take_paired = match (p.peek(), r.peek()) {
                (Some(a), Some(b)) => a.0 <= b.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_paired {
                let Some((k, name, role, platform, at, meta)) = p.next() else {
                    break;
                };
                if let Some(key) = Self::key_of(&k) {
                    let tokens = self.token_summaries(&key.device_id().to_string())?;
                    out.paired.push(Self::paired_from(
                        &key, name, role, platform, at, &meta, tokens,
                    ));
                }
                last = Some(k);
            } else {
                let Some((k, at, meta)) = r.next() else {
                    break;
                };
                if let Some(key) = Self::key_of(&k) {
                    out.revoked.push(Self::revoked_from(&key, at, &meta));
                }
                last = Some(k);
            }
        }
        if p.peek().is_some() || r.peek().is_some() {
            use base64::Engine as _;
            out.next = last.map(|k| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k));
        }
        Ok(out)
    }

    /// Pairs `key` at once because the tailnet vouched for it (`approvedBy: tailscale`),
    /// keeping the tailnet `identity` in the record; issues its device token and clears any
    /// pending request or tombstone. The caller shares the record with the federation.
    pub fn approve_tailnet(
        &self,
        key: &PublicKey,
        m: &DeviceMeta,
        identity: &serde_json::Value,
    ) -> Result<PairedDevice, PairingError> {
        let now = now_ms();
        let device_id = key.device_id().to_string();
        let meta = serde_json::json!({
            "deviceFamily": m.device_family, "clientId": m.client_id, "clientMode": m.client_mode,
            "approvedBy": APPROVED_BY_TAILSCALE, "tailnet": identity,
        })
        .to_string();
        let kb = key.0.to_vec();
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO paired_devices(public_key, device_id, name, role, platform, approved_at_ms, meta)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(public_key) DO UPDATE SET name = excluded.name, role = excluded.role,
                    platform = excluded.platform, approved_at_ms = excluded.approved_at_ms, meta = excluded.meta",
                params![kb, device_id, m.name, m.role, m.platform, now as i64, meta],
            )?;
            Self::issue_token(&tx, &device_id, &m.role, now)?;
            tx.execute("DELETE FROM pending_devices WHERE public_key = ?1", [&kb])?;
            tx.execute("DELETE FROM revoked_devices WHERE public_key = ?1", [&kb])?;
            tx.commit()
        })?;
        self.paired(key)?
            .ok_or_else(|| PairingError::NotFound(device_id))
    }

    /// The paired device the tailnet admitted for tailnet node `node_id` (its stable id), if
    /// any: one tailnet node binds one device key.
    pub fn tailnet_binding(&self, node_id: &str) -> Result<Option<PairedDevice>, PairingError> {
        // By the expression index on the metadata's tailnet node id, not a read of every
        // paired device. Several rows only if an operator approved keys the tailnet once
        // vouched for; a handful is enough to find the tailnet's own.
        const CANDIDATES: i64 = 8;
        let keys: Vec<Vec<u8>> = self.store.with_conn(|c| {
            c.prepare_cached(PAIRED_BY_TAILNET_NODE)?
                .query_map(params![node_id, CANDIDATES], |r| r.get(0))?
                .collect::<Result<Vec<_>, _>>()
        })?;
        for k in keys {
            let Some(key) = Self::key_of(&k) else {
                continue;
            };
            if let Some(p) = self.paired(&key)? {
                if p.approved_by == APPROVED_BY_TAILSCALE {
                    return Ok(Some(p));
                }
            }
        }
        Ok(None)
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
        let sel = selector.trim();
        let cutoff = now_ms().saturating_sub(PENDING_TTL.as_millis() as u64) as i64;
        // Exact request id (primary key), device id and name (indexes), then prefixes of the
        // device and request ids (index ranges): enough rows to say "ambiguous".
        const CANDIDATES: i64 = 8;
        let rows: Vec<PendingRow> = self.store.with_conn(|c| {
            let row = pending_row;
            let exact = c
                .prepare_cached(PENDING_EXACT)?
                .query_map(params![sel, cutoff, CANDIDATES], row)?
                .collect::<Result<Vec<_>, _>>()?;
            if !exact.is_empty() || sel.len() < 6 {
                return Ok(exact);
            }
            let upper = format!("{sel}{}", char::MAX);
            c.prepare_cached(PENDING_PREFIX)?
                .query_map(params![sel, upper, cutoff, CANDIDATES], row)?
                .collect::<Result<Vec<_>, _>>()
        })?;
        let found: Vec<PendingRequest> = rows.into_iter().filter_map(Self::pending_from).collect();
        pick(
            sel,
            found,
            |p| {
                [&p.request_id, &p.device_id, &p.name]
                    .iter()
                    .any(|f| f.as_str() == sel)
            },
            |p| p.device_id.starts_with(sel) || p.request_id.starts_with(sel),
            |p| format!("{} ({})", p.name, &p.device_id[..12]),
        )
    }

    /// The one paired device `selector` names (device id, name, or id prefix), by indexed
    /// lookups: the cost does not grow with the number of paired devices.
    fn find_paired(&self, selector: &str) -> Result<PairedDevice, PairingError> {
        let sel = selector.trim();
        // Exact matches (device id: unique index; name: `paired_by_name`), then id prefixes (a
        // range on the device id index). Enough rows to say "ambiguous" with a few candidates.
        const CANDIDATES: i64 = 8;
        let keys: Vec<Vec<u8>> = self.store.with_conn(|c| {
            let mut stmt = c.prepare_cached(PAIRED_EXACT)?;
            let exact = stmt
                .query_map(params![sel, CANDIDATES], |r| r.get(0))?
                .collect::<Result<Vec<Vec<u8>>, _>>()?;
            if !exact.is_empty() || sel.len() < 6 {
                return Ok(exact);
            }
            let mut stmt = c.prepare_cached(PAIRED_PREFIX)?;
            let upper = format!("{sel}{}", char::MAX);
            let hits = stmt
                .query_map(params![sel, upper, CANDIDATES], |r| r.get(0))?
                .collect::<Result<Vec<Vec<u8>>, _>>()?;
            Ok(hits)
        })?;
        let found = self.paired_of_keys(keys)?;
        pick(
            sel,
            found,
            |p| p.device_id == sel || p.name == sel,
            |p| p.device_id.starts_with(sel),
            |p| format!("{} ({})", p.name, &p.device_id[..12]),
        )
    }

    /// The paired devices of `keys` (public keys as stored), in that order; a key no longer
    /// paired, or not a valid key, is skipped.
    fn paired_of_keys(&self, keys: Vec<Vec<u8>>) -> Result<Vec<PairedDevice>, PairingError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(d) = Self::key_of(&k).map(|k| self.paired(&k)).transpose()? {
                out.extend(d);
            }
        }
        Ok(out)
    }

    /// The paired device with device id `device_id` (hex), if any: one search of the unique
    /// index, whatever the number of paired devices.
    pub fn paired_by_id(&self, device_id: &str) -> Result<Option<PairedDevice>, PairingError> {
        let key: Option<Vec<u8>> = self.store.with_conn(|c| {
            c.prepare_cached(PAIRED_BY_ID)?
                .query_row([device_id], |r| r.get(0))
                .optional()
        })?;
        match key.as_deref().and_then(Self::key_of) {
            Some(k) => self.paired(&k),
            None => Ok(None),
        }
    }

    /// The paired devices a node selector (`clawmesh nodes invoke --node SEL`, `node.describe`)
    /// could mean: the device whose id is `selector`; those whose name is `selector` without
    /// regard to case; and, for a selector of at least [`MIN_ID_PREFIX`] characters, those
    /// whose id starts with it. At most [`SELECTED_MAX`] of each kind (enough to name the
    /// candidates of an ambiguous selector), by index searches: the cost does not grow with
    /// the number of paired devices. The caller picks among them (the gateway's node
    /// resolution: id, then IP, then name, then prefix, connected nodes first).
    ///
    /// Names are compared without ASCII whitespace at either end, by `paired_by_trimmed_name`
    /// (SQLite's `NOCASE`: ASCII letters only). A selector with non-ASCII characters is
    /// compared by Unicode lower case against the cached brief of every paired device instead
    /// (one pass over it; rebuilt only when the paired devices changed), so `ÉTÉ` still finds
    /// `été`.
    pub fn paired_selected(&self, selector: &str) -> Result<Vec<PairedDevice>, PairingError> {
        let sel = selector.trim();
        if sel.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys: Vec<Vec<u8>> = self.store.with_conn(|c| {
            let mut keys = c
                .prepare_cached(PAIRED_SELECTED)?
                .query_map(params![sel, SELECTED_MAX as i64 + 1], |r| r.get(0))?
                .collect::<Result<Vec<Vec<u8>>, _>>()?;
            if sel.len() >= MIN_ID_PREFIX {
                let upper = format!("{sel}{}", char::MAX);
                let hits = c
                    .prepare_cached(PAIRED_PREFIX)?
                    .query_map(params![sel, upper, SELECTED_MAX as i64], |r| r.get(0))?
                    .collect::<Result<Vec<Vec<u8>>, _>>()?;
                keys.extend(hits);
            }
            Ok(keys)
        })?;
        let mut out = Vec::new();
        if !sel.is_ascii() {
            let want = sel.to_lowercase();
            let brief = self.paired_brief()?;
            let ids: Vec<&str> = brief
                .devices
                .iter()
                .filter(|d| d.name.trim().to_lowercase() == want)
                .take(SELECTED_MAX)
                .map(|d| d.device_id.as_str())
                .collect();
            for id in ids {
                out.extend(self.paired_by_id(id)?);
            }
        }
        keys.sort_unstable();
        keys.dedup();
        out.extend(self.paired_of_keys(keys)?);
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out.dedup_by(|a, b| a.device_id == b.device_id);
        Ok(out)
    }

    /// A paired device named `name` other than `device_id`, if any (indexed; for refusing a
    /// second device under a name that selects nodes).
    pub fn paired_name_clash(
        &self,
        name: &str,
        device_id: &str,
    ) -> Result<Option<PairedDevice>, PairingError> {
        let key: Option<Vec<u8>> = self.store.with_conn(|c| {
            c.query_row(NAME_CLASH, params![name, device_id], |r| r.get(0))
                .optional()
        })?;
        match key.as_deref().and_then(Self::key_of) {
            Some(k) => self.paired(&k),
            None => Ok(None),
        }
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
        self.revoke_device(p, APPROVED_BY_OPERATOR, "revoked by an operator")
    }

    /// Revokes `key` because the tailnet no longer vouches for it (`revokedBy: tailscale`,
    /// with `reason`); `None` if it is not paired.
    pub fn revoke_tailnet(
        &self,
        key: &PublicKey,
        reason: &str,
    ) -> Result<Option<PairedDevice>, PairingError> {
        match self.paired(key)? {
            Some(p) => Ok(Some(self.revoke_device(
                p,
                APPROVED_BY_TAILSCALE,
                reason,
            )?)),
            None => Ok(None),
        }
    }

    fn revoke_device(
        &self,
        p: PairedDevice,
        by: &str,
        reason: &str,
    ) -> Result<PairedDevice, PairingError> {
        let meta =
            serde_json::json!({"name": p.name, "revokedBy": by, "reason": reason}).to_string();
        self.store.with_conn(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM paired_devices WHERE device_id = ?1",
                [&p.device_id],
            )?;
            if let Ok(key) = PublicKey::from_base64(&p.public_key) {
                tx.execute(
                    "INSERT INTO revoked_devices(public_key, revoked_at_ms, meta) VALUES (?1, ?2, ?3)
                     ON CONFLICT(public_key) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms, meta = excluded.meta",
                    params![key.0.to_vec(), now_ms().max(1) as i64, meta],
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
        Ok(self.store.with_conn(|c| read_record(c, key))?)
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
                c.prepare_cached(IS_PAIRED)?
                    .query_row([s], |_| Ok(()))
                    .optional()
            })?
            .is_some())
    }
}

/// Creates the pairing tables if needed (for the consensus state machine, which applies
/// replicated pairing decisions into them).
pub(crate) fn ensure_schema(c: &rusqlite::Connection) -> rusqlite::Result<()> {
    c.execute_batch(SCHEMA)?;
    migrate(c)
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
    let mut stmt =
        c.prepare_cached("SELECT public_key, revoked_at_ms, meta FROM revoked_devices")?;
    let revoked: Vec<(Vec<u8>, i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
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
    for (k, at, meta) in revoked {
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
            meta,
            token: None,
        });
    }
    Ok(out)
}

/// One device's record (paired or revoked), read on `c` by its key (indexed).
pub(crate) fn read_record(
    c: &rusqlite::Connection,
    key: &PublicKey,
) -> rusqlite::Result<Option<PairingRecord>> {
    let kb = key.0.to_vec();
    let mut stmt = c.prepare_cached(RECORD_BY_KEY)?;
    type Row = (
        String,
        String,
        String,
        i64,
        String,
        Option<String>,
        Option<i64>,
    );
    let paired: Option<Row> = stmt
        .query_row([&kb], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .optional()?;
    if let Some((name, role, platform, at, meta, token, token_at)) = paired {
        return Ok(Some(PairingRecord {
            key: *key,
            approved: true,
            changed_at_ms: at.max(0) as u64,
            name,
            role,
            platform,
            meta,
            token: token.map(|t| (t, token_at.unwrap_or(0).max(0) as u64)),
        }));
    }
    let mut stmt =
        c.prepare_cached("SELECT revoked_at_ms, meta FROM revoked_devices WHERE public_key = ?1")?;
    let revoked: Option<(i64, String)> = stmt
        .query_row([&kb], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(revoked.map(|(at, meta)| PairingRecord {
        key: *key,
        approved: false,
        changed_at_ms: at.max(0) as u64,
        name: String::new(),
        role: String::new(),
        platform: String::new(),
        meta,
        token: None,
    }))
}

/// Merges `records` on `c` (the caller commits): for each device the newest decision wins, a
/// revocation wins a tie. Deterministic, so every gateway applying the same records in the
/// same order ends in the same state. Returns the records that changed something.
pub(crate) fn apply_records(
    c: &rusqlite::Connection,
    records: &[PairingRecord],
) -> rusqlite::Result<Vec<PairingRecord>> {
    // Only the devices of the batch are read (indexed), not every record: merging one
    // decision costs the same at 10 or 100 000 paired devices.
    let mut mine: HashMap<PublicKey, Option<PairingRecord>> = HashMap::new();
    let mut changed = Vec::new();
    for r in records.iter().take(MAX_SYNC_RECORDS) {
        if let std::collections::hash_map::Entry::Vacant(e) = mine.entry(r.key) {
            e.insert(read_record(c, &r.key)?);
        }
        if let Some(Some(m)) = mine.get(&r.key) {
            let newer = r.changed_at_ms > m.changed_at_ms
                || (r.changed_at_ms == m.changed_at_ms && !r.approved && m.approved);
            if !newer {
                continue;
            }
        }
        let kb = r.key.0.to_vec();
        let id = r.key.device_id().to_string();
        if r.approved {
            c.prepare_cached("INSERT INTO paired_devices(public_key, device_id, name, role, platform, approved_at_ms, meta)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(public_key) DO UPDATE SET name = excluded.name, role = excluded.role,
                    platform = excluded.platform, approved_at_ms = excluded.approved_at_ms, meta = excluded.meta")?.execute(params![kb, id, r.name, r.role, r.platform, r.changed_at_ms as i64, r.meta],
            )?;
            if let Some((token, at)) = &r.token {
                c.prepare_cached("INSERT INTO device_tokens(device_id, role, token, created_at_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(device_id, role) DO UPDATE SET token = excluded.token, created_at_ms = excluded.created_at_ms")?.execute(params![id, r.role, token, *at as i64],
                )?;
            }
            c.prepare_cached("DELETE FROM revoked_devices WHERE public_key = ?1")?
                .execute([&kb])?;
            c.prepare_cached("DELETE FROM pending_devices WHERE public_key = ?1")?
                .execute([&kb])?;
        } else {
            c.prepare_cached("DELETE FROM paired_devices WHERE public_key = ?1")?
                .execute([&kb])?;
            c.prepare_cached("DELETE FROM device_tokens WHERE device_id = ?1")?
                .execute([&id])?;
            c.prepare_cached("INSERT INTO revoked_devices(public_key, revoked_at_ms, meta) VALUES (?1, ?2, ?3)
                 ON CONFLICT(public_key) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms, meta = excluded.meta")?.execute(params![kb, r.changed_at_ms as i64, r.meta],
            )?;
        }
        // Later records of the same batch compare against this one.
        mine.insert(r.key, Some(r.clone()));
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

    /// Every lookup that approve, reject, revoke, admission (native and classic, with the
    /// tailnet's checks) and a federation merge make, and a listing page: none reads a whole
    /// table (no `SCAN` in SQLite's plan; a page needs no sort).
    #[test]
    fn lookups_are_index_searches_not_scans() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _reg = Registry::open(store.clone()).unwrap();
        let queries = [
            ("pending exact", PENDING_EXACT),
            ("pending prefix", PENDING_PREFIX),
            ("tailnet binding", PAIRED_BY_TAILNET_NODE),
            ("revocation", REVOKED_BY_KEY),
            ("paired page", PAIRED_PAGE),
            ("revoked page", REVOKED_PAGE),
            ("tokens", TOKENS_OF),
            ("paired by key", PAIRED_BY_KEY),
            ("paired exact", PAIRED_EXACT),
            ("paired prefix", PAIRED_PREFIX),
            ("name clash", NAME_CLASH),
            ("record", RECORD_BY_KEY),
            ("pending expiry", PENDING_EXPIRE),
            ("pending of key", PENDING_OF_KEY),
            ("pending refresh", PENDING_REFRESH),
            ("pending by id", PENDING_BY_ID),
            ("token of role", TOKEN_OF_ROLE),
            ("is paired", IS_PAIRED),
            ("paired by id", PAIRED_BY_ID),
            ("paired selected", PAIRED_SELECTED),
        ];
        store
            .with_conn(|c| {
                let plan = |sql: &str| -> rusqlite::Result<Vec<String>> {
                    let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                    // Unbound parameters would be refused; the plan does not depend on them.
                    let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
                    let steps = stmt
                        .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))?
                        .collect();
                    steps
                };
                let reads_all = |p: &[String]| {
                    p.iter()
                        .any(|s| s.starts_with("SCAN") || s.contains("FOR ORDER BY"))
                };
                // The check sees a scan when there is one.
                assert!(reads_all(&plan(
                    "SELECT public_key FROM paired_devices WHERE platform = ?1"
                )?));
                for (what, sql) in queries {
                    let p = plan(sql)?;
                    assert!(!p.is_empty(), "{what}: no plan");
                    assert!(!reads_all(&p), "{what} reads a whole table or sorts: {p:?}");
                }
                // The name of a node selector goes through the trimmed, case-blind index.
                let p = plan(PAIRED_SELECTED)?;
                assert!(
                    p.iter().any(|s| s.contains("paired_by_trimmed_name")),
                    "{p:?}"
                );
                // Trimming to MAX_PENDING walks the time index from the newest (at most
                // MAX_PENDING + 1 entries, whatever else the database holds) and sorts nothing.
                let p = plan(PENDING_TRIM)?;
                assert!(
                    p.iter().all(|s| !s.contains("TEMP B-TREE")
                        && (!s.starts_with("SCAN") || s.contains("pending_by_refreshed"))),
                    "pending trim: {p:?}"
                );
                Ok(())
            })
            .unwrap();
    }

    /// The indexed lookups answer what a read of every row answers: tailnet bindings,
    /// revocations, pending selectors, and pages that cover every paired and revoked device
    /// exactly once.
    #[test]
    fn indexed_lookups_answer_as_a_full_read_and_pages_cover_every_device_once() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        let mut keys = Vec::new();
        for i in 0..30 {
            let k = DeviceIdentity::ephemeral().public_key();
            if i % 3 == 0 {
                let id = serde_json::json!({"nodeId": format!("node{i}"), "node": format!("n{i}.ts.net")});
                reg.approve_tailnet(&k, &meta(&format!("t{i}"), "x"), &id)
                    .unwrap();
            } else {
                let Admission::Pending(p) = reg.admit(&k, &meta(&format!("d{i}"), "x")).unwrap()
                else {
                    panic!()
                };
                reg.approve(&p.request_id).unwrap();
            }
            if i % 5 == 0 {
                reg.revoke(&k.device_id().to_string()).unwrap();
            }
            keys.push(k);
        }
        let waiting: Vec<PendingRequest> = (0..6)
            .map(|i| {
                let k = DeviceIdentity::ephemeral().public_key();
                keys.push(k);
                let Admission::Pending(p) = reg.admit(&k, &meta(&format!("w{i}"), "x")).unwrap()
                else {
                    panic!()
                };
                p
            })
            .collect();
        // An operator-approved device whose metadata names a tailnet node is no binding.
        let all = reg.paired_all().unwrap();
        let revoked = reg.revoked_all().unwrap();
        for i in 0..32 {
            let node = format!("node{i}");
            let scanned = all.iter().find(|p| {
                p.approved_by == APPROVED_BY_TAILSCALE
                    && p.tailnet.as_ref().and_then(|t| t.get("nodeId"))
                        == Some(&serde_json::json!(node))
            });
            assert_eq!(
                reg.tailnet_binding(&node).unwrap().as_ref(),
                scanned,
                "{node}"
            );
        }
        assert!(reg.tailnet_binding("node3").unwrap().is_some());
        for k in &keys {
            let id = k.device_id().to_string();
            let scanned = revoked
                .iter()
                .find(|r| r.device_id == id)
                .map(|r| (r.revoked_by.clone(), r.reason.clone()));
            assert_eq!(reg.revocation(k).unwrap(), scanned);
        }
        // Pending: by request id, device id, name and prefixes; the same request each time.
        for p in &waiting {
            for sel in [
                p.request_id.as_str(),
                p.device_id.as_str(),
                p.name.as_str(),
                &p.device_id[..10],
                &p.request_id[..13],
            ] {
                assert_eq!(
                    reg.find_pending(sel).unwrap().request_id,
                    p.request_id,
                    "{sel}"
                );
            }
        }
        assert!(matches!(
            reg.find_pending("d1"),
            Err(PairingError::NotFound(_))
        ));
        // Pages of every size cover every paired and revoked device exactly once.
        let mut want: Vec<String> = all
            .iter()
            .map(|p| p.device_id.clone())
            .chain(revoked.iter().map(|r| r.device_id.clone()))
            .collect();
        want.sort();
        assert_eq!(want.len(), 30);
        for limit in [1, 4, 7, 29, 30, 31, MAX_PAGE] {
            let mut seen = Vec::new();
            let mut after: Option<[u8; 32]> = None;
            let mut pages = 0;
            loop {
                let page = reg.page(after.as_ref(), limit).unwrap();
                pages += 1;
                let n = page.paired.len() + page.revoked.len();
                assert!(n <= limit && n > 0, "page of {n} at limit {limit}");
                seen.extend(page.paired.iter().map(|p| p.device_id.clone()));
                seen.extend(page.revoked.iter().map(|r| r.device_id.clone()));
                // A paged device is the same record a full read gives.
                for p in &page.paired {
                    assert_eq!(Some(p), all.iter().find(|q| q.device_id == p.device_id));
                }
                for r in &page.revoked {
                    assert_eq!(Some(r), revoked.iter().find(|q| q.device_id == r.device_id));
                }
                match page.next {
                    Some(n) => after = Some(parse_cursor(&n).unwrap()),
                    None => break,
                }
            }
            seen.sort();
            assert_eq!(seen, want, "limit {limit}");
            assert_eq!(pages, 30usize.div_ceil(limit), "limit {limit}");
        }
    }

    #[test]
    fn revoke_selectors_and_records_use_indexed_lookups_with_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        let keys: Vec<PublicKey> = (0..40)
            .map(|_| DeviceIdentity::ephemeral().public_key())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            let Admission::Pending(p) = reg.admit(k, &meta(&format!("n{i}"), "x")).unwrap() else {
                panic!()
            };
            reg.approve(&p.request_id).unwrap();
        }
        // One record, read by key, is the one of the full exchange.
        let all = reg.records().unwrap();
        for k in &keys {
            let one = reg.record(k).unwrap().unwrap();
            assert_eq!(Some(&one), all.iter().find(|r| r.key == *k));
        }
        assert!(reg
            .record(&DeviceIdentity::ephemeral().public_key())
            .unwrap()
            .is_none());
        // A name clash is found, and the device itself is no clash.
        let id0 = keys[0].device_id().to_string();
        assert!(reg.paired_name_clash("n0", &id0).unwrap().is_none());
        assert_eq!(
            reg.paired_name_clash("n0", "other")
                .unwrap()
                .unwrap()
                .device_id,
            id0
        );
        // Exact id, exact name, unique prefix; a short or unknown one is not found.
        assert_eq!(reg.find_paired(&id0).unwrap().name, "n0");
        assert_eq!(
            reg.find_paired("n1").unwrap().device_id,
            keys[1].device_id().to_string()
        );
        let id2 = keys[2].device_id().to_string();
        assert_eq!(reg.find_paired(&id2[..16]).unwrap().name, "n2");
        assert!(matches!(
            reg.find_paired(&id2[..4]),
            Err(PairingError::NotFound(_))
        ));
        assert!(matches!(
            reg.find_paired("ffffffffffffz"),
            Err(PairingError::NotFound(_))
        ));
        // Two devices under one name: the name is ambiguous.
        let Admission::Pending(p) = reg
            .admit(
                &DeviceIdentity::ephemeral().public_key(),
                &meta("twin", "x"),
            )
            .unwrap()
        else {
            panic!()
        };
        reg.approve(&p.request_id).unwrap();
        let Admission::Pending(p) = reg
            .admit(
                &DeviceIdentity::ephemeral().public_key(),
                &meta("twin", "x"),
            )
            .unwrap()
        else {
            panic!()
        };
        reg.approve(&p.request_id).unwrap();
        assert!(matches!(
            reg.find_paired("twin"),
            Err(PairingError::Ambiguous { .. })
        ));
        // Revoke by prefix, and the revocation is the key's record.
        let r = reg.revoke(&id2[..12]).unwrap();
        assert_eq!(r.name, "n2");
        assert!(!reg.record(&keys[2]).unwrap().unwrap().approved);
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

    #[test]
    fn tailnet_approval_binding_and_revocation_travel_with_their_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        let k = DeviceIdentity::ephemeral().public_key();
        let identity = serde_json::json!({"tags": ["tag:clawmesh-node"], "node": "n1.ts.net", "nodeId": "nABC", "ip": "100.64.0.20"});
        // A pending request first, with the reason the tailnet gave.
        let mut m = meta("n1", "100.64.0.20:1");
        m.reason = "tailscaled unreachable".into();
        let Admission::Pending(p) = reg.admit(&k, &m).unwrap() else {
            panic!()
        };
        assert_eq!(p.reason, "tailscaled unreachable");
        let d = reg
            .approve_tailnet(&k, &meta("n1", "x"), &identity)
            .unwrap();
        assert_eq!(d.approved_by, APPROVED_BY_TAILSCALE);
        assert_eq!(d.tailnet.as_ref(), Some(&identity));
        assert!(
            reg.pending().unwrap().is_empty(),
            "approval clears the request"
        );
        assert!(reg.device_token(&k.device_id(), "node").unwrap().is_some());
        assert_eq!(
            reg.tailnet_binding("nABC").unwrap().map(|p| p.public_key),
            Some(k.to_base64url())
        );
        assert!(reg.tailnet_binding("nOther").unwrap().is_none());
        // Another gateway learns how it was admitted.
        let dir2 = tempfile::tempdir().unwrap();
        let other = Registry::open(Store::open(dir2.path()).unwrap()).unwrap();
        other.apply(&reg.records().unwrap()).unwrap();
        assert_eq!(other.paired(&k).unwrap().unwrap().approved_by, "tailscale");
        // Revoked by the tailnet, with the reason, everywhere.
        std::thread::sleep(std::time::Duration::from_millis(5));
        reg.revoke_tailnet(&k, "tag removed").unwrap().unwrap();
        assert_eq!(
            reg.revocation(&k).unwrap(),
            Some(("tailscale".to_string(), "tag removed".to_string()))
        );
        other.apply(&reg.records().unwrap()).unwrap();
        let r = other.list().unwrap().revoked;
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].name.as_str(), r[0].reason.as_str()),
            ("n1", "tag removed")
        );
        // An operator's revocation says so.
        let k2 = DeviceIdentity::ephemeral().public_key();
        reg.approve_tailnet(&k2, &meta("n2", "x"), &identity)
            .unwrap();
        reg.revoke(&k2.device_id().to_string()).unwrap();
        assert_eq!(reg.revocation(&k2).unwrap().unwrap().0, "operator");
    }

    /// What a node selector means among the paired devices, by index, is what a read of
    /// every paired device says: exact id, name without case (ASCII by the index, beyond
    /// ASCII by the brief), id prefixes of at least 6 characters; twins come back together.
    #[test]
    fn paired_selected_answers_as_a_full_read() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(Store::open(dir.path()).unwrap()).unwrap();
        let names: Vec<String> = (0..40)
            .map(|i| match i {
                0 | 1 => "Twin".to_string(),
                2 => "Été-box".to_string(),
                // Stored with whitespace at the ends: found by the trimmed name.
                3 => "  Padded-Box\t".to_string(),
                4 => " Été-pad ".to_string(),
                i => format!("Web-{i}"),
            })
            .collect();
        for n in &names {
            let Admission::Pending(p) = reg
                .admit(&DeviceIdentity::ephemeral().public_key(), &meta(n, "x"))
                .unwrap()
            else {
                panic!()
            };
            reg.approve(&p.request_id).unwrap();
        }
        let all = reg.paired_all().unwrap();
        let id5 = all[5].device_id.clone();
        let mut selectors: Vec<String> = vec![
            "twin".into(),
            "TWIN".into(),
            " web-7 ".into(),
            "WEB-12".into(),
            "été-BOX".into(),
            "ÉTÉ-box".into(),
            "padded-box".into(),
            " PADDED-BOX ".into(),
            "été-PAD".into(),
            "web".into(),
            "nobody".into(),
            id5.clone(),
            id5[..6].to_string(),
            id5[..5].to_string(),
            id5[..20].to_string(),
        ];
        selectors.extend(all.iter().map(|d| d.device_id[..1].to_string()));
        selectors.extend(all.iter().map(|d| d.device_id[..7].to_string()));
        for sel in &selectors {
            let t = sel.trim();
            let mut want: Vec<&str> = all
                .iter()
                .filter(|d| {
                    d.device_id == t
                        || d.name.trim().to_lowercase() == t.to_lowercase()
                        || (t.len() >= MIN_ID_PREFIX && d.device_id.starts_with(t))
                })
                .map(|d| d.device_id.as_str())
                .collect();
            want.sort();
            let got = reg.paired_selected(sel).unwrap();
            let got: Vec<&str> = got.iter().map(|d| d.device_id.as_str()).collect();
            assert_eq!(got, want, "{sel:?}");
        }
        assert_eq!(reg.paired_selected("twin").unwrap().len(), 2);
        assert_eq!(
            reg.paired_selected("padded-box").unwrap()[0].name,
            "  Padded-Box\t"
        );
        assert_eq!(reg.paired_selected("été-box").unwrap()[0].name, "Été-box");
        assert_eq!(reg.paired_by_id(&id5).unwrap().as_ref(), Some(&all[5]));
        assert!(reg.paired_by_id("00").unwrap().is_none());
    }

    /// A state dir written before the selector and expiry indexes opens: they are added, and
    /// lookups use them.
    #[test]
    fn a_database_without_the_new_indexes_opens_and_gains_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let k = DeviceIdentity::ephemeral().public_key();
        let old_schema = SCHEMA
            .replace(
                "CREATE INDEX IF NOT EXISTS paired_by_trimmed_name ON paired_devices(\n    trim(name, char(32, 9, 10, 11, 12, 13)) COLLATE NOCASE);",
                "CREATE INDEX IF NOT EXISTS paired_by_name_nocase ON paired_devices(name COLLATE NOCASE);",
            )
            .replace(
                "CREATE INDEX IF NOT EXISTS pending_by_refreshed ON pending_devices(refreshed_at_ms);",
                "",
            );
        assert_ne!(old_schema, SCHEMA);
        store
            .with_conn(|c| {
                c.execute_batch(&old_schema)?;
                c.execute(
                    "INSERT INTO paired_devices(public_key, device_id, name, role, platform, approved_at_ms)
                     VALUES (?1, ?2, 'Old-Node', 'node', 'linux', 5)",
                    params![k.0.to_vec(), k.device_id().to_string()],
                )?;
                c.execute(
                    "INSERT INTO pending_devices(request_id, public_key, device_id, name, role, addr, platform, requested_at_ms, refreshed_at_ms)
                     VALUES ('r1', x'00', 'd', 'n', 'node', 'a', 'p', 1, 1)",
                    [],
                )?;
                Ok(())
            })
            .unwrap();
        let count = |s: &Store| -> i64 {
            s.with_conn(|c| {
                c.query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'index'
                     AND name IN ('paired_by_trimmed_name', 'pending_by_refreshed')",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap()
        };
        let has_old_index = |s: &Store| -> bool {
            s.with_conn(|c| {
                c.query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'paired_by_name_nocase'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .unwrap()
                == 1
        };
        assert_eq!(count(&store), 0);
        assert!(has_old_index(&store), "the session-7 index is there before");
        let reg = Registry::open(store.clone()).unwrap();
        assert_eq!(count(&store), 2);
        assert!(!has_old_index(&store), "the index it replaces is dropped");
        let found = reg.paired_selected("old-node").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].device_id, k.device_id().to_string());
        // The long-expired request goes on the next admission; the device is still paired.
        let Admission::Pending(_) = reg
            .admit(&DeviceIdentity::ephemeral().public_key(), &meta("new", "x"))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(reg.pending().unwrap().len(), 1);
        assert!(reg.is_paired(&k.device_id()).unwrap());
        // Opening again changes nothing.
        drop(reg);
        Registry::open(store.clone()).unwrap();
        assert_eq!(count(&store), 2);
    }

    #[test]
    fn old_revocation_table_gains_its_meta_column() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .with_conn(|c| {
                c.execute_batch(
                    "CREATE TABLE revoked_devices (public_key BLOB PRIMARY KEY, revoked_at_ms INTEGER NOT NULL);
                     INSERT INTO revoked_devices VALUES (x'00', 5);",
                )
            })
            .unwrap();
        let reg = Registry::open(store).unwrap();
        assert!(
            reg.records().unwrap().is_empty(),
            "a bad old key is skipped"
        );
        assert!(reg.revoked_all().unwrap().is_empty());
    }
}
