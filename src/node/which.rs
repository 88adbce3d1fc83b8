//! `system.which`: find executables on the node without running anything.
//!
//! Params `{"bins": ["git", "./tool", "/usr/bin/env"]}`, result
//! `{"bins": {"git": "/usr/bin/git", ...}}` holding only the names that were
//! found (the classic shape: a missing name is absent, not `null`).
//!
//! - A bare name is looked up in the node process's own `PATH` (never a
//!   `PATH` from the request: the node's environment is the one commands
//!   run with). Empty and relative `PATH` entries are skipped, so a `PATH`
//!   containing `.` cannot make a file in the working directory pass for a
//!   system binary.
//! - A name containing `/` is checked as a path (relative to the node's
//!   working directory for `system.which`; [`find_executable`] takes the base
//!   directory explicitly so `system.run` can resolve relative to its `cwd`).
//! - "Executable" means: a regular file (after following symlinks) with at
//!   least one execute permission bit. No process is spawned and the file
//!   is never opened, so asking about a binary cannot run it.
//!
//! The same resolver is used by [`super::exec`] to turn `argv[0]` into the
//! absolute path that is checked against the exec approvals and executed.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CODE_INVALID_REQUEST;

/// Most names one `system.which` request may ask about. Why: each name costs
/// one stat per `PATH` entry; the bound keeps one request from making the
/// node walk the filesystem for an unbounded list.
pub const MAX_BINS: usize = 256;

/// Search path used when the node process has no `PATH` at all. Why: this is
/// what the C library's `execvp` falls back to, so resolution matches what a
/// plain exec on the node would have found.
pub const DEFAULT_PATH: &str = "/usr/bin:/bin";

/// Parameters of `system.which` (`{"bins": [...]}`); unknown fields are
/// ignored so classic callers can send extra keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhichParams {
    /// Names (or paths, if they contain `/`) to look up.
    pub bins: Vec<String>,
}

/// Result of `system.which`: name asked -> absolute path found. Names that
/// were not found are absent, as in the classic node host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhichResult {
    /// Found names and their absolute paths.
    pub bins: BTreeMap<String, String>,
}

/// Why a `system.which` request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WhichError {
    /// The params did not have the `{"bins": [string...]}` shape.
    #[error("invalid system.which params: {0}")]
    InvalidParams(String),
    /// More names than [`MAX_BINS`] were asked for.
    #[error("system.which: too many bins ({count}); at most {max} per request")]
    TooManyBins {
        /// How many names the request held.
        count: usize,
        /// The limit, [`MAX_BINS`].
        max: usize,
    },
}

impl WhichError {
    /// Classic error code for this error; all of them are caller mistakes,
    /// hence `INVALID_REQUEST`.
    pub fn code(&self) -> &'static str {
        CODE_INVALID_REQUEST
    }
}

impl WhichParams {
    /// Decode the JSON params of a `system.which` request, so the transport
    /// layer gets a coded error instead of a serde error.
    pub fn from_value(value: serde_json::Value) -> Result<Self, WhichError> {
        serde_json::from_value(value).map_err(|e| WhichError::InvalidParams(e.to_string()))
    }
}

/// Handle `system.which` with the node process's `PATH` and working
/// directory, the environment commands actually run in.
pub fn which(params: &WhichParams) -> Result<WhichResult, WhichError> {
    let cwd = std::env::current_dir().ok();
    which_in(params, &node_path(), cwd.as_deref())
}

/// Handle `system.which` against an explicit search path and base directory
/// (for names containing `/`). Exists so tests and callers that manage their
/// own environment do not have to mutate the process environment.
pub fn which_in(
    params: &WhichParams,
    path_var: &OsStr,
    base_dir: Option<&Path>,
) -> Result<WhichResult, WhichError> {
    if params.bins.len() > MAX_BINS {
        return Err(WhichError::TooManyBins {
            count: params.bins.len(),
            max: MAX_BINS,
        });
    }
    let mut bins = BTreeMap::new();
    for name in &params.bins {
        if let Some(found) = find_executable(name, path_var, base_dir) {
            // A path that is not valid UTF-8 cannot be reported faithfully in
            // JSON; leaving it out is the honest answer ("not usable").
            if let Some(s) = found.to_str() {
                bins.insert(name.clone(), s.to_owned());
            }
        }
    }
    Ok(WhichResult { bins })
}

/// The node process's search path (`PATH`, or [`DEFAULT_PATH`] when unset).
/// Why a function: both `system.which` and `system.run` must resolve names
/// through exactly the same path.
pub fn node_path() -> OsString {
    std::env::var_os("PATH").unwrap_or_else(|| OsString::from(DEFAULT_PATH))
}

/// Find `name` the way `execvp` would, without running anything.
///
/// - empty names and names containing NUL are never found;
/// - a name containing `/` is a path: a relative one is joined to
///   `base_dir` (not found when there is no base directory); it is found
///   if it is an executable file;
/// - otherwise every absolute entry of `path_var` is tried in order.
///
/// The returned path is absolute but not canonicalized (symlinks are kept, as
/// `which` shows them); [`super::approvals`] canonicalizes before matching.
pub fn find_executable(name: &str, path_var: &OsStr, base_dir: Option<&Path>) -> Option<PathBuf> {
    if name.is_empty() || name.contains('\0') {
        return None;
    }
    if name.contains('/') {
        let candidate = Path::new(name);
        let absolute = if candidate.is_absolute() {
            candidate.to_path_buf()
        } else {
            base_dir?.join(candidate)
        };
        let absolute = strip_cur_dir(&absolute);
        return is_executable_file(&absolute).then_some(absolute);
    }
    std::env::split_paths(path_var)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

/// True when `path` is (after following symlinks) a regular file with at
/// least one execute bit set. Permission bits only: no `access(2)` and no
/// open, so checking a file has no side effect.
pub fn is_executable_file(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) => meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

/// Drop `.` components (`/a/./b` -> `/a/b`) so reported paths read well;
/// `..` is kept because removing it lexically would be wrong across
/// symlinks.
fn strip_cur_dir(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn make_file(path: &Path, body: &str, mode: u32) {
        std::fs::write(path, body).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn finds_sh_in_node_path_and_omits_missing() {
        let params = WhichParams {
            bins: vec!["sh".into(), "clawmesh-no-such-binary-xyz".into()],
        };
        let result = which(&params).unwrap();
        let sh = result.bins.get("sh").expect("sh found");
        assert!(Path::new(sh).is_absolute(), "{sh}");
        assert!(sh.ends_with("/sh"), "{sh}");
        assert!(!result.bins.contains_key("clawmesh-no-such-binary-xyz"));
        // The classic shape: missing names are absent, not null.
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["bins"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn path_with_slash_is_checked_as_path() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        make_file(&tool, "#!/bin/sh\n", 0o755);
        make_file(&dir.path().join("data"), "x", 0o644);
        std::fs::create_dir(dir.path().join("subdir")).unwrap();

        let params = WhichParams {
            bins: vec![
                "./tool".into(),
                tool.to_str().unwrap().into(),
                "./data".into(),
                "./subdir".into(),
                "./missing".into(),
            ],
        };
        let empty = OsString::new();
        let result = which_in(&params, &empty, Some(dir.path())).unwrap();
        assert_eq!(result.bins["./tool"], tool.to_str().unwrap());
        assert_eq!(result.bins[tool.to_str().unwrap()], tool.to_str().unwrap());
        assert!(!result.bins.contains_key("./data"), "not executable");
        assert!(!result.bins.contains_key("./subdir"), "directory");
        assert!(!result.bins.contains_key("./missing"));
    }

    #[test]
    fn searches_path_in_order_skipping_relative_entries() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        make_file(&a.path().join("tool"), "", 0o644); // not executable: skipped
        make_file(&b.path().join("tool"), "", 0o700);
        let path_var =
            std::env::join_paths([Path::new("."), Path::new(""), a.path(), b.path()]).unwrap();
        let found = find_executable("tool", &path_var, None).unwrap();
        assert_eq!(found, b.path().join("tool"));
    }

    #[test]
    fn no_process_is_spawned() {
        // The probe leaves a marker behind if anything ever executes it.
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let probe = dir.path().join("probe");
        make_file(
            &probe,
            &format!("#!/bin/sh\ntouch '{}'\n", marker.display()),
            0o755,
        );
        let params = WhichParams {
            bins: vec!["probe".into(), "./probe".into()],
        };
        let result = which_in(&params, dir.path().as_os_str(), Some(dir.path())).unwrap();
        assert_eq!(result.bins.len(), 2);
        assert!(!marker.exists(), "which must not run what it finds");
    }

    #[test]
    fn too_many_bins_is_refused() {
        let params = WhichParams {
            bins: vec!["sh".to_string(); MAX_BINS + 1],
        };
        let err = which(&params).unwrap_err();
        assert_eq!(err.code(), "INVALID_REQUEST");
        assert!(err.to_string().contains("too many bins"), "{err}");
        let ok = WhichParams {
            bins: vec!["sh".to_string(); MAX_BINS],
        };
        assert!(which(&ok).is_ok());
    }

    #[test]
    fn params_decode_ignores_unknown_fields_and_rejects_bad_shape() {
        let p = WhichParams::from_value(serde_json::json!({"bins": ["a"], "extra": 1})).unwrap();
        assert_eq!(p.bins, vec!["a".to_string()]);
        let err = WhichParams::from_value(serde_json::json!({"bins": "a"})).unwrap_err();
        assert_eq!(err.code(), "INVALID_REQUEST");
    }
}
