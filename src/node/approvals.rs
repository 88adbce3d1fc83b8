//! Exec approvals: which commands this node agrees to run.
//!
//! # The file
//!
//! `exec-approvals.json` in the node's state dir, compatible in spirit and
//! in key names with the classic OpenClaw file:
//!
//! ```json
//! {
//!   "version": 1,
//!   "defaults": { "security": "allowlist" },
//!   "allowlist": [ { "pattern": "/usr/bin/uptime", "id": "...", "addedAt": 1730000000000 } ],
//!   "agents": { "*": { "allowlist": [ { "pattern": "/usr/bin/uname" } ] } }
//! }
//! ```
//!
//! - `defaults.security` is the level: `deny` (nothing runs), `allowlist`
//!   (only matching commands run) or `full` (everything runs). When the file
//!   is absent, or the key is, the level is `allowlist` with an empty list:
//!   nothing runs until an operator allows it.
//! - The allowlist honoured by the node is the top-level `allowlist` (what
//!   clawmesh writes) plus `agents["*"].allowlist` (what the classic
//!   `openclaw approvals allowlist add --agent "*"` writes). A clawmesh node
//!   runs commands for operators, not for agents: `agentId` in a request is
//!   not authenticated by the node, so per-agent sections other than `"*"`,
//!   and per-agent `security`/`ask` keys, are kept in the file but not
//!   consulted. The classic `ask`/`askFallback` prompt flow does not exist
//!   on a headless clawmesh node, and `approved: true` in a `system.run`
//!   request does not bypass the allowlist.
//! - Unknown keys, at every level, are preserved on rewrite.
//! - A file that cannot be read or parsed is an error, never silently
//!   replaced by defaults: while it is corrupt nothing runs.
//!
//! # Matching
//!
//! [`Policy::check`] matches the canonical path of the program (the
//! resolved `argv[0]` with every symlink resolved), so `./uptime`, a copy in
//! `/tmp`, a symlink to a copy, or a `PATH` trick cannot pass for
//! `/usr/bin/uptime`. Patterns are absolute paths (`~/` is expanded with
//! the node's `HOME`) with glob wildcards:
//!
//! - Globs are matched by `globset` (ripgrep's matcher) with
//!   `literal_separator` on: `*` any run of bytes within one path segment,
//!   `?` one byte of a segment (one ASCII character; a multi-byte character
//!   is not matched by one `?`), `[abc]`, `[a-z]`, `[!a]` and
//!   `[[:digit:]]` one byte of a set, `{a,b}` either glob, `\` escapes the
//!   next character (`[*]` works too). `**` as a whole segment crosses
//!   segments: `/opt/**` is everything below `/opt`, `/opt/**/bin/rg` has
//!   zero or more directories in the middle; `**` inside a segment (`/opt/a**`)
//!   is two `*`s and stays within the segment. Matching is case-sensitive
//!   (the classic host lowercases both sides; on a case-sensitive
//!   filesystem that could allow a different file). A pattern that is not a
//!   valid glob (an unclosed `[`) is refused by `set` and never matches.
//! - Changed from the matcher clawmesh carried before `globset` (deliberately,
//!   each change narrows or adds syntax): `**` inside a segment no longer
//!   crosses `/`; `?` is one byte, not one character; `[`, `{` and `\` are
//!   syntax (they were literal characters).
//! - Paths are canonical before they are matched, so they never contain `.`
//!   or `..` segments: a `..` written after the first wildcard never matches;
//!   one written before it is resolved with the directory prefix (below).
//! - A program whose canonical path is not UTF-8 never matches a glob (and a
//!   pattern, being JSON text, cannot name it literally): under `allowlist`
//!   it does not run.
//! - A pattern without glob syntax (none of `*?[{\`) is a literal path and
//!   is canonicalized too, so `/bin/echo` allows `/usr/bin/echo` on usr-merged systems where
//!   `/bin -> /usr/bin`, and a literal pattern naming a symlink (such as an
//!   `/etc/alternatives` link) allows what it points to at check time.
//! - For a glob, the directory prefix before the first wildcard is
//!   canonicalized (so `/bin/*` also means `/usr/bin/*` when `/bin` is a
//!   symlink). The wildcard part is matched against the canonical program
//!   path, so a symlink inside an allowed directory that points elsewhere is
//!   not allowed by the glob: list its target, or the link as a literal.
//! - Allowing a shell or an interpreter (`/bin/sh`, `python3`) allows
//!   everything it can be told to do; the allowlist gates programs, not
//!   arguments.
//!
//! # Refusals
//!
//! As in the classic node host, a refusal has code `UNAVAILABLE` and a
//! message starting with `SYSTEM_RUN_DENIED: allowlist miss` (or
//! `SYSTEM_RUN_DISABLED: security=deny`), followed by what to run to allow
//! it, e.g. `clawmesh approvals allow --node <node> /tmp/x/uptime`.
//!
//! # `system.execApprovals.get` / `set`
//!
//! `get` returns `{"path", "exists", "hash", "file"}` where `hash` is the
//! SHA-256 (hex) of the file's bytes, or of the empty string when the file
//! is absent (the classic value). `set` takes `{"file", "baseHash"}` and,
//! like the classic host, requires `baseHash` to equal the current hash
//! whenever the file exists (optimistic concurrency: get, edit, set); when
//! the file is absent a `baseHash` is optional but must match if given.
//! Writes are atomic (temp file in the same dir, fsync, rename, fsync dir)
//! with mode 0600. Concurrent `set`s within the node process are
//! serialized; the node is expected to be the file's only writer.
//!
//! The operator side (`clawmesh approvals allow|deny|set`) edits the file
//! fetched with `get` through [`allow_pattern`], [`remove_pattern`] and
//! [`set_security`], then sends it back with `set` and the fetched hash.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{CODE_INVALID_REQUEST, CODE_UNAVAILABLE};

/// Name of the approvals file inside the node's state dir (the classic
/// name, so operators find it where they expect it).
pub const APPROVALS_FILE_NAME: &str = "exec-approvals.json";

/// The only file format version understood (the classic `version: 1`).
pub const APPROVALS_VERSION: u64 = 1;

/// Agent key whose allowlist applies to every request (classic `"*"`).
pub const WILDCARD_AGENT: &str = "*";

/// Largest approvals file read, 1 MiB. Why: the file is a short list of
/// patterns read on every `system.run`; anything this large is corruption or
/// abuse and must not make each run read and hash megabytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Most allowlist entries accepted by `set` and by the helpers. Why: each
/// run checks every entry; a bounded list keeps the check cheap and the file
/// reviewable.
pub const MAX_ALLOWLIST_ENTRIES: usize = 4096;

/// Longest pattern accepted, in characters. Why: compiling a glob into
/// `globset`'s automaton costs its length; 4096 is `PATH_MAX` on Linux, no
/// real path pattern is longer.
pub const MAX_PATTERN_LEN: usize = 4096;

/// Placeholder used in refusal messages when the node's name is unknown.
const NODE_PLACEHOLDER: &str = "<node>";

/// Chunk size for reading the approvals file. Why: small and fixed, the
/// whole file is bounded by [`MAX_FILE_BYTES`] anyway.
const READ_CHUNK: usize = 8192;

pub use crate::node_protocol::Security;

/// The approvals file, typed where the node needs it, with every other key
/// kept in `extra` maps so a rewrite preserves what it does not understand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalsFile {
    /// Format version; must be [`APPROVALS_VERSION`].
    pub version: u64,
    /// Node-wide settings (`security`, plus classic keys kept as extras).
    #[serde(default)]
    pub defaults: Defaults,
    /// The clawmesh allowlist.
    #[serde(default)]
    pub allowlist: Vec<AllowlistEntry>,
    /// Classic per-agent sections; only `"*"`'s allowlist is honoured.
    /// (`Option` so that an `"agents": {}` written by a classic tool
    /// survives a rewrite.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<BTreeMap<String, AgentApprovals>>,
    /// Unknown top-level keys (e.g. the classic `socket`), preserved.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The `defaults` object of the approvals file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Defaults {
    /// The node's exec security level; absent means `allowlist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<Security>,
    /// Other keys (classic `ask`, `askFallback`, ...), preserved.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One classic per-agent section (`agents.<id>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentApprovals {
    /// The agent's allowlist (honoured only for [`WILDCARD_AGENT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowlist: Option<Vec<AllowlistEntry>>,
    /// Other keys (`security`, `ask`, ...), preserved but not consulted.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowlistEntry {
    /// Absolute path or glob of the programs allowed (see module doc).
    pub pattern: String,
    /// Optional stable id (classic entries carry a UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When the entry was added, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_at: Option<u64>,
    /// Other keys (classic `lastUsedAt`, ...), preserved.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for ApprovalsFile {
    /// The file a node behaves as if it had when none exists: `allowlist`
    /// with an empty list, i.e. nothing runs until an operator allows it.
    fn default() -> Self {
        ApprovalsFile {
            version: APPROVALS_VERSION,
            defaults: Defaults {
                security: Some(Security::Allowlist),
                extra: Map::new(),
            },
            allowlist: Vec::new(),
            agents: None,
            extra: Map::new(),
        }
    }
}

impl ApprovalsFile {
    /// Decode a file from JSON, checking the version first so an unknown
    /// version gets a clear message rather than a field error.
    pub fn from_value(value: Value) -> Result<Self, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| "the approvals file must be a JSON object".to_string())?;
        match obj.get("version") {
            Some(v) if v.as_u64() == Some(APPROVALS_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "unsupported version {v}; this node understands version {APPROVALS_VERSION}"
                ))
            }
            None => return Err(format!("missing \"version\": {APPROVALS_VERSION}")),
        }
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    /// The level the file sets (`allowlist` when `defaults.security` is absent).
    pub fn security(&self) -> Security {
        self.defaults.security.unwrap_or(Security::Allowlist)
    }

    /// The entries the node honours: the top-level list, then `agents["*"]`.
    pub fn honoured_entries(&self) -> impl Iterator<Item = &AllowlistEntry> {
        self.allowlist.iter().chain(
            self.agents
                .iter()
                .filter_map(|agents| agents.get(WILDCARD_AGENT))
                .flat_map(|a| a.allowlist.iter().flatten()),
        )
    }

    /// Check what `set` must refuse: invalid patterns and oversized lists.
    /// Entries of agent sections the node ignores are checked too, so a file
    /// accepted here never carries a pattern that would silently not work.
    pub fn validate(&self) -> Result<(), ApprovalsError> {
        let all: Vec<&AllowlistEntry> = self
            .allowlist
            .iter()
            .chain(
                self.agents
                    .iter()
                    .flat_map(|agents| agents.values())
                    .flat_map(|a| a.allowlist.iter().flatten()),
            )
            .collect();
        if all.len() > MAX_ALLOWLIST_ENTRIES {
            return Err(ApprovalsError::InvalidFile(format!(
                "{} allowlist entries; at most {MAX_ALLOWLIST_ENTRIES}",
                all.len()
            )));
        }
        all.iter().try_for_each(|e| validate_pattern(&e.pattern))
    }

    /// The bytes written to disk: pretty JSON and a final newline, so the
    /// file is pleasant to read and diff by hand.
    pub fn to_json_bytes(&self) -> Result<Vec<u8>, ApprovalsError> {
        let mut bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| ApprovalsError::InvalidFile(e.to_string()))?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}

/// Reply of `system.execApprovals.get` and `system.execApprovals.set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalsSnapshot {
    /// Where the file lives on the node.
    pub path: String,
    /// Whether the file exists (when not, `file` is the default).
    pub exists: bool,
    /// SHA-256 hex of the file's bytes (of the empty string when absent);
    /// pass it back as `baseHash` to `set`.
    pub hash: String,
    /// The file's content.
    pub file: ApprovalsFile,
}

/// Params of `system.execApprovals.set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetParams {
    /// The complete new file.
    pub file: Value,
    /// The `hash` of the snapshot the new file was derived from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_hash: Option<String>,
}

impl SetParams {
    /// Decode the JSON params of a `set` request into a coded error on failure.
    pub fn from_value(value: Value) -> Result<Self, ApprovalsError> {
        serde_json::from_value(value).map_err(|e| ApprovalsError::InvalidParams(e.to_string()))
    }
}

/// Errors of the approvals file and of `system.execApprovals.*`.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalsError {
    /// Reading or writing the file failed.
    #[error("cannot {action} exec approvals file {}: {source}", .path.display())]
    Io {
        /// What was being done ("read", "write", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file on disk cannot be used; nothing runs until it is replaced.
    #[error(
        "exec approvals file {} is corrupt: {reason}; nothing runs until it is fixed \
         (replace it with clawmesh approvals set, baseHash {hash})",
        .path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// Its current hash, so it can be replaced through `set`.
        hash: String,
    },
    /// The params of a `set` request are malformed.
    #[error("invalid system.execApprovals.set params: {0}")]
    InvalidParams(String),
    /// A file given to `set` (or to a helper) is not a valid approvals file.
    #[error("invalid exec approvals file: {0}")]
    InvalidFile(String),
    /// An allowlist pattern is unusable.
    #[error("invalid allowlist pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// Why it is refused.
        reason: String,
    },
    /// `set` without `baseHash` while the file exists (classic message).
    #[error("exec approvals base hash required; reload and retry")]
    BaseHashRequired,
    /// `set` with a `baseHash` that is not the current one (classic message).
    #[error("exec approvals changed; reload and retry")]
    Changed,
}

impl ApprovalsError {
    /// Classic error code: `UNAVAILABLE` when the node's file is unusable,
    /// `INVALID_REQUEST` when the request must change.
    pub fn code(&self) -> &'static str {
        match self {
            ApprovalsError::Io { .. } | ApprovalsError::Corrupt { .. } => CODE_UNAVAILABLE,
            ApprovalsError::InvalidParams(_)
            | ApprovalsError::InvalidFile(_)
            | ApprovalsError::InvalidPattern { .. }
            | ApprovalsError::BaseHashRequired
            | ApprovalsError::Changed => CODE_INVALID_REQUEST,
        }
    }
}

/// A refused `system.run`. Not a transport failure: the node is up, it
/// just will not run this. Messages follow the classic prefixes and say how
/// to allow the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The level is `deny`.
    SecurityDeny {
        /// Node name for the suggested command.
        node: String,
        /// Whether the level comes from the node's start flag.
        forced: bool,
    },
    /// The level is `allowlist` and no pattern matches the program.
    AllowlistMiss {
        /// The canonical program path that was refused.
        path: PathBuf,
        /// Node name for the suggested command.
        node: String,
    },
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::SecurityDeny { node, forced } => {
                write!(
                    f,
                    "SYSTEM_RUN_DISABLED: security=deny: command denied: exec security is \"deny\" \
                     on this node; "
                )?;
                if *forced {
                    write!(
                        f,
                        "the node was started with --security deny; restart it without that flag"
                    )
                } else {
                    write!(
                        f,
                        "set it with: clawmesh approvals set --node {node} --security allowlist|full"
                    )
                }
            }
            Denied::AllowlistMiss { path, node } => write!(
                f,
                "SYSTEM_RUN_DENIED: allowlist miss: command denied: {} is not in the exec \
                 allowlist (security=allowlist); allow it with: clawmesh approvals allow --node \
                 {node} {}",
                path.display(),
                shell_quote(&path.to_string_lossy())
            ),
        }
    }
}

impl std::error::Error for Denied {}

impl Denied {
    /// Classic error code of a refusal (`UNAVAILABLE`, as the classic host
    /// answers `SYSTEM_RUN_DENIED`).
    pub fn code(&self) -> &'static str {
        CODE_UNAVAILABLE
    }
}

/// The decision state loaded from the file: level plus compiled patterns.
/// Load one per request (through [`ExecApprovals::policy`]) so edits apply
/// to the next run.
#[derive(Debug, Clone)]
pub struct Policy {
    security: Security,
    forced: bool,
    rules: Vec<Rule>,
    node: String,
}

impl Policy {
    /// Build the policy of `file`, with an optional start-flag override of
    /// the level. Unusable patterns (a classic bare name, a relative path)
    /// are logged and never match: fail closed.
    pub fn from_file(
        file: &ApprovalsFile,
        override_security: Option<Security>,
        node: &str,
    ) -> Self {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let mut rules = Vec::new();
        for entry in file.honoured_entries() {
            match Rule::compile(&entry.pattern, home.as_deref()) {
                Ok(rule) => rules.push(rule),
                Err(why) => tracing::warn!(
                    pattern = %entry.pattern,
                    "exec allowlist pattern {why}; it never matches"
                ),
            }
        }
        Policy {
            security: override_security.unwrap_or_else(|| file.security()),
            forced: override_security.is_some(),
            rules,
            node: node.to_string(),
        }
    }

    /// A policy that does not depend on any file (start flag `full`/`deny`).
    pub fn fixed(security: Security, node: &str) -> Self {
        Policy {
            security,
            forced: true,
            rules: Vec::new(),
            node: node.to_string(),
        }
    }

    /// The effective level.
    pub fn security(&self) -> Security {
        self.security
    }

    /// Refuse early when the level is `deny`, before the program is even
    /// resolved, so a denied node does not probe its filesystem for callers.
    pub fn check_enabled(&self) -> Result<(), Denied> {
        if self.security == Security::Deny {
            return Err(Denied::SecurityDeny {
                node: self.node.clone(),
                forced: self.forced,
            });
        }
        Ok(())
    }

    /// Decide whether the program at `argv0_resolved` may run.
    ///
    /// The path is canonicalized here (symlinks resolved) before matching,
    /// whatever the caller did; a relative or nonexistent path is refused
    /// under `allowlist`.
    pub fn check(&self, argv0_resolved: &Path) -> Result<(), Denied> {
        self.check_enabled()?;
        if self.security == Security::Full {
            return Ok(());
        }
        let miss = |path: PathBuf| Denied::AllowlistMiss {
            path,
            node: self.node.clone(),
        };
        if !argv0_resolved.is_absolute() {
            return Err(miss(argv0_resolved.to_path_buf()));
        }
        let canonical =
            fs::canonicalize(argv0_resolved).map_err(|_| miss(argv0_resolved.to_path_buf()))?;
        match self.matching_pattern(&canonical) {
            Some(_) => Ok(()),
            None => Err(miss(canonical)),
        }
    }

    /// The first pattern matching an already canonical path, for logs.
    pub fn matching_pattern(&self, canonical: &Path) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| r.matches(canonical))
            .map(|r| r.pattern.as_str())
    }
}

/// One compiled allowlist pattern.
#[derive(Debug, Clone)]
struct Rule {
    pattern: String,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    /// Equal to any of these paths (as written, and canonicalized).
    Literal(Vec<PathBuf>),
    /// Matched by any of these globs (as written, and with the directory
    /// prefix canonicalized).
    Glob(Vec<globset::GlobMatcher>),
}

impl Rule {
    /// Compile a pattern; the error says why it can never match.
    fn compile(pattern: &str, home: Option<&Path>) -> Result<Rule, String> {
        let expanded = expand_tilde(pattern.trim(), home)
            .ok_or_else(|| "needs HOME, and the node has none".to_string())?;
        if !expanded.starts_with('/') || expanded.contains('\0') {
            return Err("is not an absolute path".into());
        }
        let matcher = if is_glob(&expanded) {
            let mut globs = vec![compile_glob(&expanded)?];
            if let Some(canon) = canonical_glob_prefix(&expanded) {
                if canon != expanded {
                    globs.push(compile_glob(&canon)?);
                }
            }
            Matcher::Glob(globs)
        } else {
            let mut paths = vec![PathBuf::from(&expanded)];
            if let Ok(canon) = fs::canonicalize(&expanded) {
                paths.push(canon);
            }
            Matcher::Literal(paths)
        };
        Ok(Rule {
            pattern: pattern.to_string(),
            matcher,
        })
    }

    fn matches(&self, canonical: &Path) -> bool {
        match &self.matcher {
            Matcher::Literal(paths) => paths.iter().any(|p| p == canonical),
            Matcher::Glob(globs) => match canonical.to_str() {
                Some(s) => globs.iter().any(|g| g.is_match(s)),
                // A non-UTF-8 path can only be allowed by a literal pattern.
                None => false,
            },
        }
    }
}

/// `~` and `~/rest` become `$HOME` and `$HOME/rest`; other text is unchanged.
/// `None` when the pattern needs `HOME` and the node has none.
fn expand_tilde(pattern: &str, home: Option<&Path>) -> Option<String> {
    if pattern == "~" || pattern.starts_with("~/") {
        let home = home?.to_str()?;
        return Some(format!("{}{}", home.trim_end_matches('/'), &pattern[1..]));
    }
    Some(pattern.to_string())
}

/// Rewrite a glob with its literal directory prefix canonicalized
/// (`/bin/e*` -> `/usr/bin/e*` when `/bin -> /usr/bin`). `None` when the
/// prefix does not exist.
fn canonical_glob_prefix(glob: &str) -> Option<String> {
    let first_wild = glob.find(GLOB_META)?;
    let slash = glob[..first_wild].rfind('/')?;
    let dir = if slash == 0 { "/" } else { &glob[..slash] };
    let canon = fs::canonicalize(dir).ok()?;
    let canon = canon.to_str()?;
    let rest = &glob[slash..];
    Some(if canon == "/" {
        rest.to_string()
    } else {
        format!("{canon}{rest}")
    })
}

/// The characters that make a pattern a glob (`globset`'s syntax); a
/// pattern without any is a literal path.
const GLOB_META: [char; 5] = ['*', '?', '[', '{', '\\'];

/// True when `pattern` uses glob syntax.
fn is_glob(pattern: &str) -> bool {
    pattern.contains(GLOB_META)
}

/// Compiles a path glob with the allowlist's options (see the module doc):
/// wildcards never cross `/`, backslash escapes, case-sensitive.
fn compile_glob(pattern: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("is not a valid glob: {}", e.kind()))
}

/// The node's approvals file and start-flag override: answers
/// `system.execApprovals.get/set` and loads the [`Policy`] for `system.run`.
#[derive(Debug)]
pub struct ExecApprovals {
    path: PathBuf,
    override_security: Option<Security>,
    node_name: String,
    /// Serializes `set` (read hash, compare, write) within the process.
    write_lock: Mutex<()>,
    /// The federation's default level (`security.exec.defaultLevel` of the shared config, sent
    /// by the gateway): used only when neither the start flag nor this node's file sets one.
    federation_default: std::sync::RwLock<Option<Security>>,
}

impl ExecApprovals {
    /// Approvals kept in `state_dir/exec-approvals.json`. `override_security`
    /// is the node's `--security` start flag: when given it replaces the
    /// file's level (`full` and `deny` then ignore the file entirely;
    /// `allowlist` still uses the file's list).
    pub fn new(state_dir: &Path, override_security: Option<Security>) -> Self {
        ExecApprovals {
            path: state_dir.join(APPROVALS_FILE_NAME),
            override_security,
            node_name: NODE_PLACEHOLDER.to_string(),
            write_lock: Mutex::new(()),
            federation_default: std::sync::RwLock::new(None),
        }
    }

    /// Name this node is known by, used in the `clawmesh approvals ...
    /// --node NAME` command suggested by refusals (default `<node>`).
    pub fn with_node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = name.into();
        self
    }

    /// Path of the approvals file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the federation's default level (`None`: no default), as the gateway sends it.
    pub fn set_federation_default(&self, level: Option<Security>) {
        *self
            .federation_default
            .write()
            .unwrap_or_else(|p| p.into_inner()) = level;
    }

    /// The federation's default level, if the gateway sent one.
    pub fn federation_default(&self) -> Option<Security> {
        *self
            .federation_default
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The start-flag override, if any.
    pub fn override_security(&self) -> Option<Security> {
        self.override_security
    }

    /// `system.execApprovals.get`: the current file (or the default when
    /// absent) with its hash. A corrupt file is an error.
    pub fn get(&self) -> Result<ApprovalsSnapshot, ApprovalsError> {
        let current = self.read_current()?;
        let file = match &current.raw {
            None => ApprovalsFile::default(),
            Some(raw) => self.parse(raw, &current.hash)?,
        };
        Ok(ApprovalsSnapshot {
            path: self.path.to_string_lossy().into_owned(),
            exists: current.raw.is_some(),
            hash: current.hash,
            file,
        })
    }

    /// `system.execApprovals.set`: validate the new file, check `baseHash`
    /// against the current file, write atomically, return the new snapshot.
    pub fn set(&self, params: SetParams) -> Result<ApprovalsSnapshot, ApprovalsError> {
        let file = ApprovalsFile::from_value(params.file).map_err(ApprovalsError::InvalidFile)?;
        file.validate()?;
        let bytes = file.to_json_bytes()?;

        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.read_current()?;
        check_base_hash(
            current.raw.is_some(),
            &current.hash,
            params.base_hash.as_deref(),
        )?;
        atomic_write(&self.path, &bytes)?;
        tracing::info!(path = %self.path.display(), security = %file.security(), "exec approvals updated");
        Ok(ApprovalsSnapshot {
            path: self.path.to_string_lossy().into_owned(),
            exists: true,
            hash: sha256_hex(&bytes),
            file,
        })
    }

    /// The policy to decide the next `system.run` with. Reads the file (the
    /// start flags `full`/`deny` do not need it); a corrupt or unreadable
    /// file is an error, so nothing runs until it is fixed.
    pub fn policy(&self) -> Result<Policy, ApprovalsError> {
        if let Some(level @ (Security::Full | Security::Deny)) = self.override_security {
            return Ok(Policy::fixed(level, &self.node_name));
        }
        let current = self.read_current()?;
        let file = match &current.raw {
            None => ApprovalsFile::default(),
            Some(raw) => self.parse(raw, &current.hash)?,
        };
        // The level: start flag, else this node's file, else the federation's default, else
        // allowlist. A node without a file has no level of its own.
        let own = current.raw.as_ref().and(file.defaults.security);
        let level = match (self.override_security, own, self.federation_default()) {
            (Some(flag), _, _) => Some(flag),
            (None, Some(_), _) => None,
            (None, None, Some(default)) => Some(default),
            (None, None, None) => None,
        };
        let mut policy = Policy::from_file(&file, level, &self.node_name);
        policy.forced = self.override_security.is_some();
        Ok(policy)
    }

    /// Read the file (bounded) and hash all of it. The open does not block on
    /// a FIFO and anything but a regular file is refused.
    fn read_current(&self) -> Result<Current, ApprovalsError> {
        let io = |action: &'static str| {
            let path = self.path.clone();
            move |source| ApprovalsError::Io {
                action,
                path,
                source,
            }
        };
        let mut f = match OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Current {
                    raw: None,
                    hash: sha256_hex(b""),
                })
            }
            Err(e) => return Err(io("open")(e)),
        };
        let meta = f.metadata().map_err(io("stat"))?;
        let mut hasher = Sha256::new();
        if !meta.is_file() {
            return Err(ApprovalsError::Corrupt {
                path: self.path.clone(),
                reason: "not a regular file".into(),
                hash: hex(&hasher.finalize()),
            });
        }
        let mut raw = Vec::new();
        let mut total: u64 = 0;
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            let n = match f.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("read")(e)),
            };
            hasher.update(&chunk[..n]);
            total += n as u64;
            if total <= MAX_FILE_BYTES {
                raw.extend_from_slice(&chunk[..n]);
            }
        }
        let hash = hex(&hasher.finalize());
        if total > MAX_FILE_BYTES {
            return Err(ApprovalsError::Corrupt {
                path: self.path.clone(),
                reason: format!("{total} bytes, larger than the {MAX_FILE_BYTES}-byte limit"),
                hash,
            });
        }
        Ok(Current {
            raw: Some(raw),
            hash,
        })
    }

    fn parse(&self, raw: &[u8], hash: &str) -> Result<ApprovalsFile, ApprovalsError> {
        let corrupt = |reason: String| ApprovalsError::Corrupt {
            path: self.path.clone(),
            reason,
            hash: hash.to_string(),
        };
        let value: Value =
            serde_json::from_slice(raw).map_err(|e| corrupt(format!("invalid JSON: {e}")))?;
        ApprovalsFile::from_value(value).map_err(corrupt)
    }
}

/// The file as read: its bytes (`None` when absent) and SHA-256 hex.
struct Current {
    raw: Option<Vec<u8>>,
    hash: String,
}

/// The classic optimistic-concurrency rule for `set`.
fn check_base_hash(exists: bool, current: &str, base: Option<&str>) -> Result<(), ApprovalsError> {
    let base = base.map(str::trim).unwrap_or("");
    if !exists {
        return if base.is_empty() || base == current {
            Ok(())
        } else {
            Err(ApprovalsError::Changed)
        };
    }
    if base.is_empty() {
        return Err(ApprovalsError::BaseHashRequired);
    }
    if base != current {
        return Err(ApprovalsError::Changed);
    }
    Ok(())
}

/// Replace `path` with `bytes` atomically, mode 0600: temp file in the same
/// directory, fsync, rename over, fsync the directory.
fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), ApprovalsError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let err = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| ApprovalsError::Io {
            action,
            path: p,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err("create the directory of", path))?;
    let tmp = dir.join(format!(
        ".{APPROVALS_FILE_NAME}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let write_tmp = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The create mode is filtered by the umask; make it exactly 0600.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write_tmp() {
        let _ = fs::remove_file(&tmp);
        return Err(err("write", &tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(err("replace", path)(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("sync the directory of", path))
}

/// SHA-256 of `bytes` as lowercase hex (the classic file hash).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Check that a pattern can be stored: non-empty, absolute (or `~/...`),
/// bounded, no NUL.
pub fn validate_pattern(pattern: &str) -> Result<(), ApprovalsError> {
    let invalid = |reason: &str| ApprovalsError::InvalidPattern {
        pattern: pattern.to_string(),
        reason: reason.to_string(),
    };
    let p = pattern.trim();
    if p.is_empty() {
        return Err(invalid("empty"));
    }
    if p.chars().count() > MAX_PATTERN_LEN {
        return Err(invalid("longer than 4096 characters"));
    }
    if p.contains('\0') {
        return Err(invalid("contains a NUL character"));
    }
    if !(p.starts_with('/') || p == "~" || p.starts_with("~/")) {
        return Err(invalid(
            "must be an absolute path or glob (e.g. /usr/bin/uptime, /usr/bin/*)",
        ));
    }
    if is_glob(p) {
        compile_glob(p).map_err(|why| invalid(&why))?;
    }
    Ok(())
}

/// Quote `s` for a POSIX shell when needed, so suggested commands can be
/// pasted as they are.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Operator helper (`clawmesh approvals allow`): add `pattern` to the
/// top-level allowlist of a file fetched with `get` (`Value::Null` stands
/// for "no file yet"). Returns `false` when the pattern is already honoured
/// (top level or `agents["*"]`).
pub fn allow_pattern(file: &mut Value, pattern: &str) -> Result<bool, ApprovalsError> {
    validate_pattern(pattern)?;
    let pattern = pattern.trim();
    let obj = ensure_file_object(file)?;
    let present = |list: Option<&Value>| {
        list.and_then(Value::as_array).is_some_and(|entries| {
            entries
                .iter()
                .any(|e| e.get("pattern").and_then(Value::as_str).map(str::trim) == Some(pattern))
        })
    };
    let wildcard_list = obj
        .get("agents")
        .and_then(|a| a.get(WILDCARD_AGENT))
        .and_then(|a| a.get("allowlist"));
    if present(obj.get("allowlist")) || present(wildcard_list) {
        return Ok(false);
    }
    let list = obj
        .entry("allowlist")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| ApprovalsError::InvalidFile("\"allowlist\" is not an array".into()))?;
    if list.len() >= MAX_ALLOWLIST_ENTRIES {
        return Err(ApprovalsError::InvalidFile(format!(
            "the allowlist already holds {MAX_ALLOWLIST_ENTRIES} entries"
        )));
    }
    let added_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    list.push(serde_json::json!({ "pattern": pattern, "addedAt": added_at }));
    Ok(true)
}

/// Operator helper (`clawmesh approvals deny`): remove every honoured entry
/// whose pattern is `pattern` (top level and `agents["*"]`). Returns how
/// many were removed.
pub fn remove_pattern(file: &mut Value, pattern: &str) -> Result<usize, ApprovalsError> {
    let pattern = pattern.trim();
    let obj = ensure_file_object(file)?;
    let mut removed = 0;
    let mut strip = |list: Option<&mut Value>| {
        if let Some(entries) = list.and_then(Value::as_array_mut) {
            let before = entries.len();
            entries.retain(|e| {
                e.get("pattern").and_then(Value::as_str).map(str::trim) != Some(pattern)
            });
            removed += before - entries.len();
        }
    };
    strip(obj.get_mut("allowlist"));
    strip(
        obj.get_mut("agents")
            .and_then(|a| a.get_mut(WILDCARD_AGENT))
            .and_then(|a| a.get_mut("allowlist")),
    );
    Ok(removed)
}

/// Operator helper (`clawmesh approvals set --security`): set
/// `defaults.security`, keeping every other key.
pub fn set_security(file: &mut Value, security: Security) -> Result<(), ApprovalsError> {
    let obj = ensure_file_object(file)?;
    let defaults = obj
        .entry("defaults")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| ApprovalsError::InvalidFile("\"defaults\" is not an object".into()))?;
    defaults.insert("security".into(), Value::String(security.as_str().into()));
    Ok(())
}

/// The file as a JSON object: `Null` becomes the default file, a missing
/// `version` is filled in; anything else but an object is refused.
fn ensure_file_object(file: &mut Value) -> Result<&mut Map<String, Value>, ApprovalsError> {
    if file.is_null() {
        *file = serde_json::to_value(ApprovalsFile::default())
            .map_err(|e| ApprovalsError::InvalidFile(e.to_string()))?;
    }
    let obj = file.as_object_mut().ok_or_else(|| {
        ApprovalsError::InvalidFile("the approvals file must be a JSON object".into())
    })?;
    obj.entry("version")
        .or_insert_with(|| Value::from(APPROVALS_VERSION));
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(dir: &Path) -> ExecApprovals {
        ExecApprovals::new(dir, None).with_node_name("n1")
    }

    /// Write a file through `set` (so the test also exercises `set`).
    fn set_file(store: &ExecApprovals, file: Value) -> ApprovalsSnapshot {
        let base = store.get().unwrap().hash;
        store
            .set(SetParams {
                file,
                base_hash: Some(base),
            })
            .unwrap()
    }

    fn env_path() -> PathBuf {
        fs::canonicalize("/usr/bin/env").unwrap()
    }

    #[test]
    fn default_denies_everything_with_instructions() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        let snap = approvals.get().unwrap();
        assert!(!snap.exists);
        assert_eq!(snap.hash, sha256_hex(b""));
        assert_eq!(snap.file.security(), Security::Allowlist);
        assert!(snap.file.allowlist.is_empty());

        let policy = approvals.policy().unwrap();
        let err = policy.check(&env_path()).unwrap_err();
        assert_eq!(err.code(), "UNAVAILABLE");
        let msg = err.to_string();
        assert!(
            msg.starts_with("SYSTEM_RUN_DENIED: allowlist miss"),
            "{msg}"
        );
        assert!(
            msg.contains(&format!(
                "{} is not in the exec allowlist (security=allowlist); allow it with: \
                 clawmesh approvals allow --node n1 {}",
                env_path().display(),
                env_path().display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn allowlist_allows_pattern_and_refuses_copies_and_symlink_tricks() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        set_file(
            &approvals,
            json!({"version": 1, "defaults": {"security": "allowlist"},
                   "allowlist": [{"pattern": "/usr/bin/env"}]}),
        );
        let policy = approvals.policy().unwrap();
        assert!(policy.check(Path::new("/usr/bin/env")).is_ok());

        // A copy of the same binary elsewhere (what `./env` resolves to).
        let tricks = tempfile::tempdir().unwrap();
        let copy = tricks.path().join("env");
        fs::copy("/usr/bin/env", &copy).unwrap();
        let err = policy.check(&copy).unwrap_err();
        assert!(
            err.to_string().contains("is not in the exec allowlist"),
            "{err}"
        );
        // A symlink whose name looks right but points at the copy.
        let fake_usr_bin = tricks.path().join("usr/bin");
        fs::create_dir_all(&fake_usr_bin).unwrap();
        std::os::unix::fs::symlink(&copy, fake_usr_bin.join("env")).unwrap();
        assert!(policy.check(&fake_usr_bin.join("env")).is_err());
        // The refusal names the canonical target, not the link.
        match policy.check(&fake_usr_bin.join("env")).unwrap_err() {
            Denied::AllowlistMiss { path, .. } => {
                assert_eq!(path, fs::canonicalize(&copy).unwrap())
            }
            other => panic!("unexpected {other:?}"),
        }
        // A symlink to the real binary is the real binary: allowed.
        let real_link = tricks.path().join("real-env");
        std::os::unix::fs::symlink("/usr/bin/env", &real_link).unwrap();
        assert!(policy.check(&real_link).is_ok());
        // Relative and missing paths are refused.
        assert!(policy.check(Path::new("usr/bin/env")).is_err());
        assert!(policy.check(&tricks.path().join("missing")).is_err());
    }

    #[test]
    fn glob_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        set_file(
            &approvals,
            json!({"version": 1, "allowlist": [{"pattern": "/usr/bin/*"}]}),
        );
        let policy = approvals.policy().unwrap();
        assert!(policy.check(&env_path()).is_ok());
        let sh = fs::canonicalize("/bin/sh").unwrap();
        if sh.parent() == Some(Path::new("/usr/bin")) {
            assert!(policy.check(&sh).is_ok());
        }
        let tricks = tempfile::tempdir().unwrap();
        let copy = tricks.path().join("env");
        fs::copy("/usr/bin/env", &copy).unwrap();
        assert!(policy.check(&copy).is_err());

        let g = |p: &str, t: &str| compile_glob(p).unwrap().is_match(t);
        assert!(g("/usr/bin/*", "/usr/bin/env"));
        assert!(!g("/usr/bin/*", "/usr/bin/sub/env"));
        assert!(g("/usr/**", "/usr/bin/sub/env"));
        assert!(g("/opt/**/bin/rg", "/opt/bin/rg"));
        assert!(g("/opt/**/bin/rg", "/opt/a/b/bin/rg"));
        assert!(!g("/opt/**/bin/rg", "/opt/a/b/xbin/rg"));
        assert!(g("/usr/bin/python3.1?", "/usr/bin/python3.11"));
        assert!(!g("/usr/bin/python3.1?", "/usr/bin/python3.1/"));
        assert!(g("/usr/bin/e*v", "/usr/bin/env"));
        assert!(!g("/usr/bin/env", "/usr/bin/Env"));
        assert!(!g("/usr/bin/e*", "/usr/bin"));
        // No exponential blow-up on adversarial patterns.
        let long = format!("/{}", "a".repeat(2000));
        assert!(!g(&format!("/{}b", "*a".repeat(100)), &long));
    }

    #[test]
    fn glob_semantics_are_globsets_with_separators_kept() {
        let g = |p: &str, t: &str| compile_glob(p).unwrap().is_match(t);
        // `*` and `?` never cross `/`.
        assert!(g("/opt/*", "/opt/tool"));
        assert!(!g("/opt/*", "/opt/a/tool"));
        assert!(!g("/opt/a?b", "/opt/a/b"));
        assert!(!g("/opt/*/tool", "/opt/tool"));
        // `**` as a whole segment crosses segments; inside a segment it is two `*`s
        // (the old matcher let `/opt/a**` cross `/`: narrowed on purpose).
        assert!(g("/opt/**", "/opt/a/b/c"));
        assert!(!g("/opt/**", "/optx/a"));
        assert!(g("/opt/**/rg", "/opt/rg"));
        assert!(g("/opt/**/rg", "/opt/x/y/rg"));
        assert!(g("/opt/a**", "/opt/abc"));
        assert!(!g("/opt/a**", "/opt/a/b"));
        // Character classes, negation, POSIX classes, alternatives, escapes.
        assert!(g("/usr/bin/python3.[0-9]", "/usr/bin/python3.1"));
        assert!(!g("/usr/bin/python3.[0-9]", "/usr/bin/python3.x"));
        assert!(!g("/usr/bin/python3.[0-9]", "/usr/bin/python3.12"));
        assert!(g("/usr/bin/python3.[!0-9]", "/usr/bin/python3.x"));
        assert!(g("/opt/v[[:digit:]]", "/opt/v7"));
        assert!(!g("/opt/[/]x", "/opt//x"));
        assert!(g("/usr/bin/{env,uptime}", "/usr/bin/uptime"));
        assert!(!g("/usr/bin/{env,uptime}", "/usr/bin/uname"));
        assert!(g("/opt/a\\*", "/opt/a*"));
        assert!(!g("/opt/a\\*", "/opt/ab"));
        assert!(g("/opt/a[*]", "/opt/a*"));
        // `?` is one byte: one ASCII character, not one multi-byte one.
        assert!(g("/opt/caf?", "/opt/cafe"));
        assert!(!g("/opt/caf?", "/opt/caf\u{e9}"));
        assert!(g("/opt/caf??", "/opt/caf\u{e9}"));
        // Case-sensitive.
        assert!(!g("/opt/Tool", "/opt/tool"));
        // What is a glob, and what a bad one does.
        assert!(is_glob("/opt/[ab]") && is_glob("/opt/{a,b}") && is_glob("/opt/a\\b"));
        assert!(!is_glob("/usr/bin/env"));
        assert!(compile_glob("/opt/[a").is_err());
        let err = validate_pattern("/opt/[a").unwrap_err();
        assert_eq!(err.code(), "INVALID_REQUEST");
        assert!(err.to_string().contains("not a valid glob"), "{err}");
        assert!(Rule::compile("/opt/[a", None).is_err());
        validate_pattern("/opt/[ab]*").unwrap();
    }

    /// A private tree: `allowed/tool` (a copy of env), `allowed/out-link` (a
    /// symlink to a copy outside), `elsewhere/in-link` (a symlink to
    /// `allowed/tool`), with the glob `allowed/*` allowed.
    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
        policy: Policy,
    }

    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir_all(root.join("allowed")).unwrap();
        fs::create_dir_all(root.join("elsewhere")).unwrap();
        fs::copy("/usr/bin/env", root.join("allowed/tool")).unwrap();
        fs::copy("/usr/bin/env", root.join("elsewhere/other")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere/other"), root.join("allowed/out-link"))
            .unwrap();
        std::os::unix::fs::symlink(root.join("allowed/tool"), root.join("elsewhere/in-link"))
            .unwrap();
        let file = ApprovalsFile::from_value(json!({"version": 1,
            "allowlist": [{"pattern": format!("{}/allowed/*", root.display())}]}))
        .unwrap();
        let policy = Policy::from_file(&file, None, "n");
        Tree {
            _dir: dir,
            root,
            policy,
        }
    }

    #[test]
    fn symlinks_are_judged_by_their_target() {
        let t = tree();
        assert!(t.policy.check(&t.root.join("allowed/tool")).is_ok());
        // A symlink into the allowed directory runs what it points to: allowed.
        assert!(t.policy.check(&t.root.join("elsewhere/in-link")).is_ok());
        // A symlink inside the allowed directory that points out: refused, and the
        // refusal names the real program.
        match t.policy.check(&t.root.join("allowed/out-link")) {
            Err(Denied::AllowlistMiss { path, .. }) => {
                assert_eq!(path, t.root.join("elsewhere/other"))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(t.policy.check(&t.root.join("elsewhere/other")).is_err());
    }

    #[test]
    fn relative_argv0_and_dot_dot_paths() {
        let t = tree();
        // A relative argv[0] is refused, whatever the working directory holds.
        for rel in ["tool", "./tool", "allowed/tool", "../allowed/tool"] {
            assert!(t.policy.check(Path::new(rel)).is_err(), "{rel}");
        }
        // `..` in the program path is resolved before matching.
        let dotted = t.root.join("elsewhere/../allowed/tool");
        assert!(t.policy.check(&dotted).is_ok());
        let escape = t.root.join("allowed/../elsewhere/other");
        assert!(t.policy.check(&escape).is_err());
        // `..` in a pattern: before the first wildcard it is resolved with the
        // directory prefix; after it, it can never match a canonical path.
        let file = |pattern: String| {
            ApprovalsFile::from_value(json!({"version": 1, "allowlist": [{"pattern": pattern}]}))
                .unwrap()
        };
        let before = Policy::from_file(
            &file(format!("{}/elsewhere/../allowed/*", t.root.display())),
            None,
            "n",
        );
        assert!(before.check(&t.root.join("allowed/tool")).is_ok());
        assert!(before.check(&t.root.join("elsewhere/other")).is_err());
        let after = Policy::from_file(
            &file(format!("{}/*/../allowed/tool", t.root.display())),
            None,
            "n",
        );
        assert!(after.check(&t.root.join("allowed/tool")).is_err());
    }

    #[test]
    fn a_non_utf8_program_path_never_matches_a_glob() {
        use std::os::unix::ffi::OsStrExt;
        let t = tree();
        let odd = t
            .root
            .join("allowed")
            .join(std::ffi::OsStr::from_bytes(b"to\xffol"));
        fs::copy("/usr/bin/env", &odd).unwrap();
        match t.policy.check(&odd) {
            Err(Denied::AllowlistMiss { path, .. }) => assert_eq!(path, odd),
            other => panic!("unexpected {other:?}"),
        }
        // Even `**` does not: such a program only runs under `full`.
        let all = Policy::from_file(
            &ApprovalsFile::from_value(json!({"version": 1, "allowlist": [{"pattern": "/**"}]}))
                .unwrap(),
            None,
            "n",
        );
        assert!(all.check(&t.root.join("allowed/tool")).is_ok());
        assert!(all.check(&odd).is_err());
        assert!(Policy::fixed(Security::Full, "n").check(&odd).is_ok());
    }

    #[test]
    fn literal_and_glob_patterns_follow_usr_merge_symlinks() {
        // A private usr-merged layout: root/bin -> usr/bin.
        let root = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(root.path()).unwrap();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        let tool = root.join("usr/bin/tool");
        fs::copy("/usr/bin/env", &tool).unwrap();
        let other = root.join("usr/bin/other");
        fs::copy("/usr/bin/env", &other).unwrap();

        let file = |pattern: String| {
            ApprovalsFile::from_value(json!({"version": 1,
                "allowlist": [{"pattern": pattern}]}))
            .unwrap()
        };
        let literal = Policy::from_file(&file(format!("{}/bin/tool", root.display())), None, "n");
        assert!(literal.check(&tool).is_ok());
        assert!(literal.check(&root.join("bin/tool")).is_ok());
        assert!(literal.check(&other).is_err());

        let glob = Policy::from_file(&file(format!("{}/bin/t*", root.display())), None, "n");
        assert!(glob.check(&tool).is_ok());
        assert!(glob.check(&other).is_err());

        // And the real thing, where the system is usr-merged.
        let bin_echo = Path::new("/bin/echo");
        if bin_echo.exists() && fs::canonicalize(bin_echo).unwrap() != bin_echo {
            let real = Policy::from_file(&file("/bin/echo".into()), None, "n");
            assert!(real.check(&fs::canonicalize(bin_echo).unwrap()).is_ok());
            assert!(real.check(bin_echo).is_ok());
            let real_glob = Policy::from_file(&file("/bin/ec*".into()), None, "n");
            assert!(real_glob
                .check(&fs::canonicalize(bin_echo).unwrap())
                .is_ok());
        }
    }

    #[test]
    fn wildcard_agent_allowlist_is_honoured_other_agents_are_not() {
        let file = ApprovalsFile::from_value(json!({"version": 1,
            "agents": {"*": {"allowlist": [{"pattern": "/usr/bin/env"}]},
                       "main": {"allowlist": [{"pattern": "/usr/bin/*"}], "security": "full"}}}))
        .unwrap();
        let policy = Policy::from_file(&file, None, "n");
        assert!(policy.check(&env_path()).is_ok());
        let sh = fs::canonicalize("/bin/sh").unwrap();
        assert!(policy.check(&sh).is_err());
    }

    #[test]
    fn deny_and_full_levels_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        set_file(
            &approvals,
            json!({"version": 1, "defaults": {"security": "deny"},
                   "allowlist": [{"pattern": "/usr/bin/env"}]}),
        );
        let err = approvals.policy().unwrap().check(&env_path()).unwrap_err();
        assert_eq!(err.code(), "UNAVAILABLE");
        let msg = err.to_string();
        assert!(
            msg.starts_with("SYSTEM_RUN_DISABLED: security=deny"),
            "{msg}"
        );
        assert!(
            msg.contains(
                "exec security is \"deny\" on this node; set it with: clawmesh approvals set \
                 --node n1 --security allowlist|full"
            ),
            "{msg}"
        );

        set_file(
            &approvals,
            json!({"version": 1, "defaults": {"security": "full"}}),
        );
        let policy = approvals.policy().unwrap();
        assert_eq!(policy.security(), Security::Full);
        let tricks = tempfile::tempdir().unwrap();
        let copy = tricks.path().join("anything");
        fs::copy("/usr/bin/env", &copy).unwrap();
        assert!(policy.check(&copy).is_ok());

        // Start-flag overrides win over the file, and full ignores even a
        // corrupt file.
        fs::write(approvals.path(), "{not json").unwrap();
        let forced_full = ExecApprovals::new(dir.path(), Some(Security::Full));
        assert!(forced_full.policy().unwrap().check(&copy).is_ok());
        let forced_deny = ExecApprovals::new(dir.path(), Some(Security::Deny));
        let msg = forced_deny
            .policy()
            .unwrap()
            .check(&copy)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--security deny"), "{msg}");
    }

    #[test]
    fn corrupt_file_is_an_error_never_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        for (content, needle) in [
            ("{not json", "invalid JSON"),
            (r#"{"version": 2}"#, "unsupported version"),
            (r#"{"defaults": {}}"#, "missing \"version\""),
            (
                r#"{"version": 1, "defaults": {"security": "yolo"}}"#,
                "unknown variant",
            ),
            (r#"{"version": 1, "allowlist": [{"id": "x"}]}"#, "pattern"),
        ] {
            fs::write(approvals.path(), content).unwrap();
            let err = approvals.policy().unwrap_err();
            assert_eq!(err.code(), "UNAVAILABLE");
            let msg = err.to_string();
            assert!(msg.contains("is corrupt") && msg.contains(needle), "{msg}");
            assert!(approvals.get().is_err());
            // Untouched on disk.
            assert_eq!(fs::read_to_string(approvals.path()).unwrap(), content);
        }
        // It can be replaced through set with the hash from the error.
        let hash = match approvals.get().unwrap_err() {
            ApprovalsError::Corrupt { hash, .. } => hash,
            other => panic!("unexpected {other:?}"),
        };
        approvals
            .set(SetParams {
                file: json!({"version": 1}),
                base_hash: Some(hash),
            })
            .unwrap();
        assert!(approvals.policy().is_ok());
    }

    #[test]
    fn set_requires_current_base_hash() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        // Absent file: baseHash optional, but must match when given.
        let err = approvals
            .set(SetParams {
                file: json!({"version": 1}),
                base_hash: Some("deadbeef".into()),
            })
            .unwrap_err();
        assert!(matches!(err, ApprovalsError::Changed));
        let first = approvals
            .set(SetParams {
                file: json!({"version": 1}),
                base_hash: None,
            })
            .unwrap();
        assert!(first.exists);
        assert_eq!(first.hash, sha256_hex(&fs::read(approvals.path()).unwrap()));
        assert_eq!(approvals.get().unwrap().hash, first.hash);

        // Existing file: stale or missing baseHash refused.
        let second = approvals
            .set(SetParams {
                file: json!({"version": 1, "defaults": {"security": "full"}}),
                base_hash: Some(first.hash.clone()),
            })
            .unwrap();
        let stale = approvals
            .set(SetParams {
                file: json!({"version": 1, "defaults": {"security": "deny"}}),
                base_hash: Some(first.hash.clone()),
            })
            .unwrap_err();
        assert!(matches!(stale, ApprovalsError::Changed));
        assert_eq!(stale.code(), "INVALID_REQUEST");
        assert_eq!(
            stale.to_string(),
            "exec approvals changed; reload and retry"
        );
        let missing = approvals
            .set(SetParams {
                file: json!({"version": 1}),
                base_hash: None,
            })
            .unwrap_err();
        assert!(matches!(missing, ApprovalsError::BaseHashRequired));
        assert_eq!(approvals.get().unwrap().hash, second.hash);
        assert_eq!(approvals.get().unwrap().file.security(), Security::Full);
    }

    #[test]
    fn set_rejects_invalid_files_and_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        for file in [
            json!({"version": 1, "allowlist": [{"pattern": "uptime"}]}),
            json!({"version": 1, "allowlist": [{"pattern": "  "}]}),
            json!({"version": 1, "agents": {"main": {"allowlist": [{"pattern": "rg"}]}}}),
            json!({"version": 1, "defaults": {"security": "maybe"}}),
            json!({"version": 3}),
            json!(["not", "an", "object"]),
        ] {
            let err = approvals
                .set(SetParams {
                    file: file.clone(),
                    base_hash: None,
                })
                .unwrap_err();
            assert_eq!(err.code(), "INVALID_REQUEST", "{file}: {err}");
        }
        assert!(!approvals.path().exists());
        let err = SetParams::from_value(json!({"baseHash": "x"})).unwrap_err();
        assert_eq!(err.code(), "INVALID_REQUEST");
    }

    #[test]
    fn unknown_keys_are_preserved_and_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = store(dir.path());
        let file = json!({
            "version": 1,
            "socket": {"path": "~/.openclaw/exec-approvals.sock"},
            "defaults": {"security": "allowlist", "ask": "on-miss", "askFallback": "deny"},
            "allowlist": [{"pattern": "/usr/bin/env", "id": "A1", "addedAt": 5, "lastUsedAt": 7}],
            "agents": {"main": {"ask": "always", "allowlist": [{"pattern": "~/bin/x", "lastUsedCommand": "x"}]}},
            "futureKey": [1, 2, 3]
        });
        // An empty classic section survives too.
        let empty_agents = json!({"version": 1, "defaults": {}, "allowlist": [], "agents": {}});
        let snap = set_file(&approvals, empty_agents.clone());
        assert_eq!(serde_json::to_value(&snap.file).unwrap(), empty_agents);
        let snap = set_file(&approvals, file.clone());
        assert_eq!(serde_json::to_value(&snap.file).unwrap(), file);
        let on_disk: Value = serde_json::from_slice(&fs::read(approvals.path()).unwrap()).unwrap();
        assert_eq!(on_disk, file);
        assert_eq!(
            serde_json::to_value(approvals.get().unwrap().file).unwrap(),
            file
        );

        // Edit through the operator helpers and write back: extras survive.
        let mut edited = serde_json::to_value(&snap.file).unwrap();
        assert!(allow_pattern(&mut edited, "/usr/bin/uptime").unwrap());
        set_security(&mut edited, Security::Full).unwrap();
        set_file(&approvals, edited);
        let after = approvals.get().unwrap().file;
        assert_eq!(after.extra["futureKey"], json!([1, 2, 3]));
        assert_eq!(after.defaults.extra["ask"], json!("on-miss"));
        assert_eq!(after.allowlist[0].extra["lastUsedAt"], json!(7));
        let agents = after.agents.as_ref().unwrap();
        assert_eq!(agents["main"].extra["ask"], json!("always"));
        assert_eq!(after.security(), Security::Full);

        let mode = fs::metadata(approvals.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(APPROVALS_FILE_NAME)]);
    }

    #[test]
    fn operator_helpers_edit_the_file_shape() {
        let mut file = Value::Null;
        assert!(allow_pattern(&mut file, "/usr/bin/uptime").unwrap());
        assert!(!allow_pattern(&mut file, " /usr/bin/uptime ").unwrap());
        assert!(allow_pattern(&mut file, "/usr/bin/*").unwrap());
        assert!(allow_pattern(&mut file, "uptime").is_err());
        assert_eq!(file["version"], json!(1));
        assert_eq!(file["allowlist"][0]["pattern"], json!("/usr/bin/uptime"));
        assert!(file["allowlist"][0]["addedAt"].as_u64().unwrap() > 0);

        file["agents"] = json!({"*": {"allowlist": [{"pattern": "/usr/bin/uptime"}]}});
        assert_eq!(remove_pattern(&mut file, "/usr/bin/uptime").unwrap(), 2);
        assert_eq!(remove_pattern(&mut file, "/usr/bin/uptime").unwrap(), 0);
        assert_eq!(file["allowlist"].as_array().unwrap().len(), 1);

        set_security(&mut file, Security::Deny).unwrap();
        assert_eq!(file["defaults"]["security"], json!("deny"));
        let typed = ApprovalsFile::from_value(file.clone()).unwrap();
        assert_eq!(typed.security(), Security::Deny);
        typed.validate().unwrap();

        assert!(set_security(&mut json!([1]), Security::Full).is_err());
        assert_eq!("full".parse::<Security>().unwrap(), Security::Full);
        assert!("FULL".parse::<Security>().is_err());
    }

    #[test]
    fn refusal_quotes_odd_paths() {
        let d = Denied::AllowlistMiss {
            path: PathBuf::from("/tmp/my dir/it's"),
            node: "n".into(),
        };
        assert!(
            d.to_string()
                .ends_with(r"clawmesh approvals allow --node n '/tmp/my dir/it'\''s'"),
            "{d}"
        );
    }
}
