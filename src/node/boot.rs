//! The node's own ordering of its attachments: how many times it has started (kept in its state
//! dir, `node-boot`) and how many gateways it has attached to since.
//!
//! When a node moves between gateways, two of them may claim it for a while (the one it left
//! has not noticed yet, or is dead and its last announcement lingers). The federation lists
//! the node where its newest attachment is, and only the node can say which that is: the wall
//! clocks of different machines are no ordering. So the node sends an
//! [`AttachOrder`] in every hello: its start count, read and raised (fsynced) once per start
//! under the node's state dir lock, and a counter raised at every attempt to attach.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use clawmesh_federation::directory::AttachOrder;

/// The file in the node's state dir holding its start count.
pub const BOOT_FILE: &str = "node-boot";

/// Hands out the attach order of every attempt of this node process.
#[derive(Debug)]
pub struct AttachCounter {
    boot: u64,
    attach: AtomicU64,
}

impl AttachCounter {
    /// Raises the start count in `dir` (the caller holds the node's state dir lock) and starts
    /// counting attachments from 1.
    pub fn start(dir: &Path) -> Result<AttachCounter> {
        let path = dir.join(BOOT_FILE);
        let previous = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().with_context(|| {
                format!(
                    "{} is corrupt (not a number: {:?}); remove it to start counting again",
                    path.display(),
                    text.trim()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let boot = previous + 1;
        // Temp file + fsync + rename: a crash leaves the old count or the new one, never a
        // torn file; the new count is on disk before any hello carries it.
        let tmp = dir.join(format!(".{BOOT_FILE}.{}", std::process::id()));
        let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(format!("{boot}\n").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(AttachCounter {
            boot,
            attach: AtomicU64::new(0),
        })
    }

    /// The order of the next attachment attempt.
    pub fn next(&self) -> AttachOrder {
        AttachOrder {
            boot: self.boot,
            attach: self.attach.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_start_and_attempt_orders_after_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let first = AttachCounter::start(dir.path()).unwrap();
        let a = first.next();
        let b = first.next();
        assert!(b > a);
        let second = AttachCounter::start(dir.path()).unwrap();
        let c = second.next();
        assert!(c > b, "{c} after {b}");
        assert_eq!(c, AttachOrder { boot: 2, attach: 1 });
    }

    #[test]
    fn a_corrupt_count_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(BOOT_FILE), "garbage").unwrap();
        let e = AttachCounter::start(dir.path()).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
