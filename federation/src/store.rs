//! The state database: one SQLite file per state dir (`state.db`).
//!
//! It holds what must survive a restart: the federation's members with their pinned keys, and
//! small metadata. Writes are transactions with `synchronous=FULL`, so an acknowledged change is
//! on disk; a file that is not a database, or fails SQLite's integrity check, is reported as
//! corrupt and never silently replaced.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use crate::identity::PublicKey;
use crate::wire::{Member, Membership};

/// File name of the database inside a state dir.
pub const DB_FILE: &str = "state.db";

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but is not a healthy SQLite database.
    #[error("state database {path} is corrupt ({reason}); restore it from a backup or move it away (this gateway then forgets its pinned peers and must rejoin with the token)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// SQLite's words.
        reason: String,
    },
    /// Any other SQLite error.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// A stored row does not decode.
    #[error("state database {path}: bad row in {table}: {reason}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// Table name.
        table: &'static str,
        /// Why.
        reason: String,
    },
}

/// Prepared statements kept per connection (see [`Store::open`]).
const STATEMENT_CACHE: usize = 128;

/// Handle to the state database; cheap to clone, safe to share.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    public_key BLOB PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    region TEXT,
    addr TEXT NOT NULL,
    is_primary INTEGER NOT NULL,
    joined_at_ms INTEGER NOT NULL
);
";

impl Store {
    /// Opens (creating if needed) `<dir>/state.db` and checks its integrity.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(DB_FILE);
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        };
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(corrupt)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path,
                reason: check,
            });
        }
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .map_err(corrupt)?;
        conn.execute_batch(SCHEMA).map_err(corrupt)?;
        // Statements kept prepared (`prepare_cached`), least recently used dropped: rusqlite's
        // default of 16 is fewer than the modules sharing this connection prepare on their hot
        // paths (pairing admission alone uses a dozen), so they would evict each other and be
        // compiled again on every call. Each is a few KB.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Store {
            inner: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` on the connection (for modules that keep their own tables, such as pairing).
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        f(&mut conn).map_err(|e| self.sql(e))
    }

    /// Reads a metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Writes a metadata value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(|e| self.sql(e))
    }

    /// Loads the persisted membership (epoch 0 and no members on a new state dir).
    pub fn membership(&self) -> Result<Membership, StoreError> {
        let epoch = self
            .meta("membership_epoch")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT public_key, name, region, addr, is_primary, joined_at_ms
                 FROM members ORDER BY joined_at_ms, name",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut members = Vec::new();
        for row in rows {
            let (key, name, region, addr, primary, joined) = row.map_err(|e| self.sql(e))?;
            let key = PublicKey::from_bytes(&key).map_err(|e| StoreError::BadRow {
                path: self.path.clone(),
                table: "members",
                reason: e.to_string(),
            })?;
            members.push(Member {
                key,
                name,
                region,
                addr,
                primary,
                joined_at_ms: joined.max(0) as u64,
            });
        }
        Ok(Membership { epoch, members })
    }

    /// Replaces the persisted membership in one transaction.
    pub fn save_membership(&self, m: &Membership) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        tx.execute("DELETE FROM members", [])
            .map_err(|e| self.sql(e))?;
        for mem in &m.members {
            tx.execute(
                "INSERT INTO members(public_key, name, region, addr, is_primary, joined_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    mem.key.0.to_vec(),
                    mem.name,
                    mem.region,
                    mem.addr,
                    mem.primary,
                    mem.joined_at_ms as i64
                ],
            )
            .map_err(|e| self.sql(e))?;
        }
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('membership_epoch', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [m.epoch.to_string()],
        )
        .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceIdentity;

    #[test]
    fn membership_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.membership().unwrap().members.len(), 0);
        let m = Membership {
            epoch: 3,
            members: vec![Member {
                key: DeviceIdentity::ephemeral().public_key(),
                name: "tokyo".into(),
                region: Some("ap-northeast".into()),
                addr: "127.0.0.1:1".into(),
                primary: true,
                joined_at_ms: 5,
            }],
        };
        store.save_membership(&m).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.membership().unwrap(), m);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), vec![0x42u8; 8192]).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("corrupt"));
    }
}
