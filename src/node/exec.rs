//! `system.run`: run an approved argv on the node.
//!
//! Params (classic shape, camelCase):
//! `{"command": [argv...], "cwd"?: string, "env"?: {k: v}, "timeoutMs"?: u64}`.
//! Unknown fields (`rawCommand`, `agentId`, `sessionKey`, `approved`,
//! `approvalDecision`, `runId`, `suppressNotifyOnExit`, ...) are accepted and
//! ignored; in particular `approved`/`approvalDecision` do not bypass the exec
//! approvals on a clawmesh node.
//!
//! Result: `{"exitCode": i32|null, "timedOut": bool, "success": bool,
//! "stdout": string, "stderr": string, "error": string|null,
//! "stdoutTruncated": bool, "stderrTruncated": bool}`.
//!
//! # How a command runs
//!
//! - No shell. `argv[0]` is resolved with the *node process's* `PATH`
//!   (never a `PATH` from the request: overriding it is refused, see below),
//!   or, when it contains `/`, relative to the request's `cwd`. The resolved
//!   path is canonicalized, checked against the exec approvals
//!   ([`system_run`]), and that exact canonical path is executed, so what was
//!   approved is what runs (short of someone replacing the file in between,
//!   which needs write access to an approved location). The child still sees
//!   the original `argv[0]`, so multi-call binaries behave normally.
//! - stdin is `/dev/null`. stdout and stderr are read concurrently and
//!   capped ([`ExecLimits::max_output`] bytes each, 1 MiB by default); the
//!   excess is read and discarded so the child never blocks on a full pipe,
//!   and the stream is marked truncated. Output is decoded as UTF-8 lossily
//!   (a character cut by the cap is dropped rather than mangled).
//! - The child leads its own process group, and the run owns that group:
//!   when the run ends (exit, timeout, cancellation, or the future being
//!   dropped) every process still in the group is killed, so
//!   `sh -c 'sleep 100 & sleep 100'` leaves nothing behind. On timeout and
//!   explicit cancellation the group gets `SIGTERM`, then `SIGKILL` after
//!   [`ExecLimits::kill_grace`]; a dropped future sends `SIGKILL` at once
//!   (a destructor cannot wait). A normal run lasts until the leader has
//!   exited *and* both pipes are closed (background children still writing
//!   keep the run going, as in the classic host), then the rest of the group
//!   is killed. A process that leaves the group (`setsid`) escapes this; the
//!   run then stops waiting for its output after a short bound.
//! - On Linux the leader's exit is observed with `waitid(WNOWAIT)` on a
//!   tokio blocking-pool thread (one per running command), so the leader
//!   stays unreaped until the group has been killed and the group id cannot
//!   be recycled under us. Elsewhere the leader is reaped first and the
//!   leftover kill follows immediately.
//! - Timeout: `timeoutMs` if given and non-zero, else
//!   [`ExecLimits::default_timeout`], else [`ExecLimits::max_timeout`];
//!   always capped at `max_timeout` (30 min by default), so no run is
//!   unbounded. On timeout: `timedOut: true`, `success: false`, `exitCode:
//!   null`, `error: "command timed out after N ms"`.
//! - A command that cannot be started (not found, permission, bad `cwd`) is
//!   a result, not an error: `success: false`, `exitCode: null`, `error:
//!   "spawn /usr/bin/x: No such file or directory"`. Death by signal gives
//!   `exitCode: null` and an `error` naming the signal. `success` means exit
//!   code 0 and not timed out.
//!
//! # Environment
//!
//! The child inherits the node's environment; `env` from the request is
//! added on top. Overrides that change what code runs rather than what it
//! does are refused with `INVALID_REQUEST` (the classic host drops them; an
//! explicit refusal tells the operator instead of silently running something
//! else): `PATH` (resolution boundary), dynamic loader variables (`LD_*`,
//! `DYLD_*`), shell startup/function injection (`BASH_ENV`, `ENV`,
//! `BASH_FUNC_*`, `SHELLOPTS`, `PS4`, `IFS`, ...), interpreter startup hooks
//! (`NODE_OPTIONS`, `PYTHONPATH`, `PERL5OPT`, `RUBYOPT`, `JAVA_TOOL_OPTIONS`,
//! ...) and git's command/config injection (`GIT_SSH_COMMAND`,
//! `GIT_CONFIG_*`, ...). See [`is_blocked_env_override`].
//!
//! # Errors
//!
//! [`ExecError::code`]: `INVALID_REQUEST` for malformed params, `UNAVAILABLE`
//! for refusals by the exec approvals (classic `SYSTEM_RUN_DENIED`) and for
//! an unusable approvals file.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use super::approvals::{ApprovalsError, Denied, ExecApprovals};
use super::which::{find_executable, node_path};
use super::CODE_INVALID_REQUEST;

/// Read size for the output pipes. Why: 64 KiB is a Linux pipe's default
/// capacity, so one read usually empties the pipe.
const READ_CHUNK: usize = 64 * 1024;

/// How long to wait, after the final `SIGKILL`, for the pipes to close and
/// the leader to be reaped. Why: a killed group normally finishes in
/// milliseconds; the bound only matters when a process escaped the group
/// (`setsid`) while holding a pipe, and must not hold the run open forever.
const POST_KILL_WAIT: Duration = Duration::from_secs(2);

/// Environment variables a request may not override (compared
/// case-insensitively). Why: each one changes which code runs — command
/// resolution, shell start-up, interpreter start-up hooks, git's helper
/// commands — which would turn an allowlisted program into arbitrary code.
const BLOCKED_ENV_KEYS: &[&str] = &[
    "PATH",
    "IFS",
    "ENV",
    "BASH_ENV",
    "BASHOPTS",
    "SHELLOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "GCONV_PATH",
    "HOSTALIASES",
    "NODE_OPTIONS",
    "NODE_PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "RUBYLIB",
    "RUBYOPT",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_EXEC_PATH",
    "GIT_CONFIG",
    "SSLKEYLOGFILE",
    "OPENSSL_CONF",
];

/// Prefixes of environment variables a request may not override (see
/// [`BLOCKED_ENV_KEYS`]): dynamic loaders, exported shell functions, git
/// config injection.
const BLOCKED_ENV_PREFIXES: &[&str] = &["LD_", "DYLD_", "BASH_FUNC_", "GIT_CONFIG_"];

/// Bounds for one `system.run`, set by the node's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecLimits {
    /// Bytes kept per stream (stdout and stderr each); the rest is read and
    /// discarded. Default 1 MiB: enough for any human-read output, small
    /// enough that a chatty command cannot balloon the node or the reply.
    pub max_output: usize,
    /// Timeout when the request gives none (`None`: use `max_timeout`).
    /// Default `None`.
    pub default_timeout: Option<Duration>,
    /// Upper bound on any run, whatever the request asks. Default 30 min:
    /// long enough for builds and backups, short enough that a forgotten
    /// command does not hold the node's resources indefinitely.
    pub max_timeout: Duration,
    /// Time between `SIGTERM` and `SIGKILL` on timeout or cancellation.
    /// Default 500 ms: lets well-behaved programs clean up, while keeping a
    /// timed-out run's end close to its deadline.
    pub kill_grace: Duration,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits {
            max_output: 1024 * 1024,
            default_timeout: None,
            max_timeout: Duration::from_secs(30 * 60),
            kill_grace: Duration::from_millis(500),
        }
    }
}

/// Params of `system.run` (classic shape; unknown fields ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunParams {
    /// The argv; `command[0]` is the program (no shell involved).
    pub command: Vec<String>,
    /// Working directory (relative ones are relative to the node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Variables added to the node's environment for this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Timeout in ms; absent or 0 means the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl RunParams {
    /// Decode the JSON params of a `system.run` request into a coded error
    /// on failure.
    pub fn from_value(value: serde_json::Value) -> Result<Self, ExecError> {
        serde_json::from_value(value).map_err(|e| ExecError::InvalidRequest(e.to_string()))
    }
}

/// Result of `system.run` (classic shape plus the truncation flags).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    /// Exit code; `null` when the command did not exit normally (spawn
    /// failure, signal, timeout, cancellation).
    pub exit_code: Option<i32>,
    /// Whether the run hit its timeout.
    pub timed_out: bool,
    /// Exit code 0 and not timed out.
    pub success: bool,
    /// Captured stdout (lossy UTF-8, capped).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8, capped).
    pub stderr: String,
    /// What went wrong when the command did not exit normally.
    pub error: Option<String>,
    /// Whether stdout exceeded the cap.
    pub stdout_truncated: bool,
    /// Whether stderr exceeded the cap.
    pub stderr_truncated: bool,
}

impl RunResult {
    /// A run that did not produce an exit code, with the reason.
    fn failed(error: String) -> Self {
        RunResult {
            error: Some(error),
            ..RunResult::default()
        }
    }
}

/// Why a `system.run` request was not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The params are malformed (empty argv, NUL bytes, forbidden env).
    #[error("invalid system.run params: {0}")]
    InvalidRequest(String),
    /// The exec approvals refuse the program.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The approvals file cannot be used (nothing runs until it is fixed).
    #[error(transparent)]
    Approvals(#[from] ApprovalsError),
}

impl ExecError {
    /// Classic error code: `INVALID_REQUEST` for bad params, `UNAVAILABLE`
    /// for refusals (as the classic host answers `SYSTEM_RUN_DENIED`) and an
    /// unusable approvals file.
    pub fn code(&self) -> &'static str {
        match self {
            ExecError::InvalidRequest(_) => CODE_INVALID_REQUEST,
            ExecError::Denied(d) => d.code(),
            ExecError::Approvals(e) => e.code(),
        }
    }
}

/// True when a request may not set `key` in the child's environment (see
/// the module doc). Public so operator tools can warn before sending.
pub fn is_blocked_env_override(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    BLOCKED_ENV_KEYS.contains(&upper.as_str())
        || BLOCKED_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// Handle `system.run` for an operator: load the exec approvals, resolve
/// `argv[0]`, check it, run it.
///
/// Order: params are validated first (`INVALID_REQUEST`); a `deny` level
/// refuses before anything touches the filesystem; a program that cannot be
/// resolved is reported as a spawn failure result; a resolved program not
/// allowed by the policy is refused (`UNAVAILABLE`, `SYSTEM_RUN_DENIED`).
/// The approvals file is read synchronously (it is small and local).
pub async fn system_run(
    params: RunParams,
    approvals: &ExecApprovals,
    limits: &ExecLimits,
    cancel: impl Future<Output = ()>,
) -> Result<RunResult, ExecError> {
    let prepared = validate(params, limits)?;
    let policy = approvals.policy()?;
    policy.check_enabled()?;
    let program = match resolve(&prepared) {
        Ok(p) => p,
        Err(msg) => return Ok(RunResult::failed(msg)),
    };
    if let Err(denied) = policy.check(&program) {
        tracing::info!(program = %program.display(), "system.run refused by exec approvals");
        return Err(denied.into());
    }
    Ok(execute(&program, prepared, limits, cancel).await)
}

/// Run a command WITHOUT consulting the exec approvals: for callers that
/// already decided (and for tests). Operator requests go through
/// [`system_run`].
///
/// `cancel` ends the run early when it completes (e.g. `async { let _ =
/// rx.await; }` with a `tokio::sync::oneshot` receiver; note that this form
/// also cancels when the sender is dropped). Dropping the returned future
/// kills the command's process group too.
pub async fn run(
    params: RunParams,
    limits: &ExecLimits,
    cancel: impl Future<Output = ()>,
) -> Result<RunResult, ExecError> {
    let prepared = validate(params, limits)?;
    let program = match resolve(&prepared) {
        Ok(p) => p,
        Err(msg) => return Ok(RunResult::failed(msg)),
    };
    Ok(execute(&program, prepared, limits, cancel).await)
}

/// Validated params.
#[derive(Debug)]
struct Prepared {
    /// `command[0]`, as given.
    argv0: String,
    /// `command[1..]`.
    args: Vec<String>,
    cwd: Option<PathBuf>,
    env: BTreeMap<String, String>,
    timeout: Duration,
}

/// Check the params and compute the effective timeout.
fn validate(params: RunParams, limits: &ExecLimits) -> Result<Prepared, ExecError> {
    let invalid = |m: String| ExecError::InvalidRequest(m);
    if let Some(i) = params.command.iter().position(|a| a.contains('\0')) {
        return Err(invalid(format!("command[{i}] contains a NUL byte")));
    }
    let mut argv = params.command.into_iter();
    let argv0 = match argv.next() {
        None => {
            return Err(invalid(
                "command is empty; expected an argv array such as [\"uptime\"]".into(),
            ))
        }
        Some(a0) if a0.is_empty() => return Err(invalid("command[0] is empty".into())),
        Some(a0) => a0,
    };
    let cwd = match params.cwd.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(c) if c.contains('\0') => return Err(invalid("cwd contains a NUL byte".into())),
        Some(c) => Some(PathBuf::from(c)),
    };
    let env = params.env.unwrap_or_default();
    for (k, v) in &env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(invalid(format!("invalid env variable name {k:?}")));
        }
        if v.contains('\0') {
            return Err(invalid(format!("env variable {k} contains a NUL byte")));
        }
    }
    let blocked: Vec<&str> = env
        .keys()
        .map(String::as_str)
        .filter(|k| is_blocked_env_override(k))
        .collect();
    if !blocked.is_empty() {
        return Err(invalid(format!(
            "env override not allowed: {} (these change which code runs; PATH is the node's own)",
            blocked.join(", ")
        )));
    }
    let requested = params
        .timeout_ms
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .or(limits.default_timeout)
        .unwrap_or(limits.max_timeout);
    Ok(Prepared {
        argv0,
        args: argv.collect(),
        cwd,
        env,
        timeout: requested.min(limits.max_timeout),
    })
}

/// Resolve `argv[0]` to the canonical path that will be checked and run;
/// `Err` is the spawn-failure message for the result.
fn resolve(prepared: &Prepared) -> Result<PathBuf, String> {
    let argv0 = &prepared.argv0;
    let node_cwd = std::env::current_dir().ok();
    let base = match &prepared.cwd {
        None => node_cwd,
        Some(c) if c.is_absolute() => Some(c.clone()),
        Some(c) => node_cwd.map(|n| n.join(c)),
    };
    if let (Some(cwd), Some(base)) = (&prepared.cwd, &base) {
        match std::fs::metadata(base) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("invalid cwd {}: Not a directory", cwd.display())),
            Err(e) => return Err(format!("invalid cwd {}: {}", cwd.display(), describe(&e))),
        }
    }
    let found = if argv0.contains('/') {
        let p = Path::new(argv0);
        match (p.is_absolute(), &base) {
            (true, _) => p.to_path_buf(),
            (false, Some(b)) => b.join(p),
            (false, None) => return Err(format!("spawn {argv0}: cannot resolve relative path")),
        }
    } else {
        find_executable(argv0, &node_path(), base.as_deref()).ok_or_else(|| {
            format!("spawn {argv0}: No such file or directory (not found in the node's PATH)")
        })?
    };
    std::fs::canonicalize(&found).map_err(|e| format!("spawn {argv0}: {}", describe(&e)))
}

/// The OS error text without Rust's " (os error N)" suffix.
fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    Cancelled,
}

/// What has finished so far: the pipes, and the leader (`Some(status)` when
/// it was already reaped, `Some(None)` when it exited but is still waiting
/// to be reaped).
#[derive(Debug, Default)]
struct Progress {
    pipes_done: bool,
    leader: Option<Option<ExitStatus>>,
}

/// Kills the process group with `SIGKILL` when dropped while armed, so a
/// dropped run future does not leave its command running.
struct GroupGuard {
    pgid: Pid,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Send `signal` to the group; a group that no longer exists is fine.
fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid = pgid.as_raw(), %signal, error = %e, "killpg failed"),
    }
}

/// Spawn `program` and see the run through (see the module doc).
async fn execute(
    program: &Path,
    prepared: Prepared,
    limits: &ExecLimits,
    cancel: impl Future<Output = ()>,
) -> RunResult {
    let mut cmd = Command::new(program);
    cmd.arg0(&prepared.argv0)
        .args(&prepared.args)
        .envs(&prepared.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(cwd) = &prepared.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return RunResult::failed(format!("spawn {}: {}", program.display(), describe(&e)))
        }
    };
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        let _ = child.start_kill();
        return RunResult::failed(format!("spawn {}: no process id", program.display()));
    };
    let mut guard = GroupGuard { pgid, armed: true };
    tracing::debug!(program = %program.display(), pgid = pgid.as_raw(), "system.run started");

    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut out = Capture::new(limits.max_output);
    let mut err = Capture::new(limits.max_output);
    let (ending, leader) = {
        let pipes = async {
            tokio::join!(drain(stdout, &mut out), drain(stderr, &mut err));
        };
        let leader = leader_exit(&mut child, pgid);
        let deadline = tokio::time::sleep(prepared.timeout);
        tokio::pin!(pipes, leader, deadline, cancel);
        let mut progress = Progress::default();

        let ending = tokio::select! {
            () = settle(pipes.as_mut(), leader.as_mut(), &mut progress) => Ending::Exited,
            () = &mut deadline => Ending::TimedOut,
            () = &mut cancel => Ending::Cancelled,
        };
        if ending != Ending::Exited {
            signal_group(pgid, Signal::SIGTERM);
            let grace = settle(pipes.as_mut(), leader.as_mut(), &mut progress);
            let _ = tokio::time::timeout(limits.kill_grace, grace).await;
        }
        // Whatever is left of the group goes now. The leader has not been
        // reaped yet (Linux), so the group id cannot have been recycled.
        signal_group(pgid, Signal::SIGKILL);
        guard.armed = false;
        let rest = settle(pipes.as_mut(), leader.as_mut(), &mut progress);
        if tokio::time::timeout(POST_KILL_WAIT, rest).await.is_err() {
            tracing::warn!(
                pgid = pgid.as_raw(),
                "system.run: output pipes still open after the group was killed \
                 (a process left the group); returning without the rest"
            );
        }
        (ending, progress.leader)
    };
    let status = match leader {
        Some(Some(status)) => Some(status),
        _ => tokio::time::timeout(POST_KILL_WAIT, child.wait())
            .await
            .ok()
            .and_then(Result::ok),
    };

    let (stdout, stdout_truncated) = out.into_text();
    let (stderr, stderr_truncated) = err.into_text();
    let mut result = RunResult {
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        ..RunResult::default()
    };
    match ending {
        Ending::TimedOut => {
            result.timed_out = true;
            result.error = Some(format!(
                "command timed out after {} ms",
                prepared.timeout.as_millis()
            ));
        }
        Ending::Cancelled => result.error = Some("command cancelled".into()),
        Ending::Exited => match status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => {
                    result.exit_code = Some(code);
                    result.success = code == 0;
                }
                (None, Some(sig)) => {
                    let name = Signal::try_from(sig).map_or("unknown signal", Signal::as_str);
                    result.error = Some(format!("command terminated by signal {name} ({sig})"));
                }
                (None, None) => result.error = Some(format!("command ended abnormally ({s})")),
            },
            None => result.error = Some("command exit status unavailable".into()),
        },
    }
    tracing::debug!(
        program = %program.display(),
        exit_code = ?result.exit_code,
        timed_out = result.timed_out,
        "system.run finished"
    );
    result
}

/// Drive the pipes and the leader until both are done, recording progress
/// in `progress` so the caller can stop (timeout, cancel) and resume.
async fn settle<P, L>(mut pipes: Pin<&mut P>, mut leader: Pin<&mut L>, progress: &mut Progress)
where
    P: Future<Output = ()>,
    L: Future<Output = Option<ExitStatus>>,
{
    while !(progress.pipes_done && progress.leader.is_some()) {
        tokio::select! {
            () = pipes.as_mut(), if !progress.pipes_done => progress.pipes_done = true,
            status = leader.as_mut(), if progress.leader.is_none() => {
                progress.leader = Some(status);
            }
        }
    }
}

/// Resolve when the group leader has exited, without reaping it, so the
/// group id stays reserved until the group is killed. Returns `None` (not
/// reaped) normally; falls back to reaping (`Some(status)`) if `waitid`
/// fails.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
async fn leader_exit(child: &mut Child, pid: Pid) -> Option<ExitStatus> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let observed = tokio::task::spawn_blocking(move || loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(Errno::EINTR) => continue,
            other => return other.is_ok(),
        }
    })
    .await;
    if observed.unwrap_or(false) {
        None
    } else {
        child.wait().await.ok()
    }
}

/// Resolve when the group leader has exited (reaping it: no `WNOWAIT` here).
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
async fn leader_exit(child: &mut Child, _pid: Pid) -> Option<ExitStatus> {
    child.wait().await.ok()
}

/// One output stream's capture: the first `limit` bytes, and whether more
/// came.
struct Capture {
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Capture {
            buf: Vec::new(),
            limit,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.buf.len());
        let take = room.min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if take < data.len() {
            self.truncated = true;
        }
    }

    /// Lossy UTF-8 text and the truncation flag. When the cap cut a
    /// multi-byte character, its partial bytes are dropped.
    fn into_text(self) -> (String, bool) {
        let mut bytes = self.buf;
        if self.truncated {
            let tail_start = bytes.len().saturating_sub(3);
            if let Some(lead) = (tail_start..bytes.len())
                .rev()
                .find(|&i| bytes[i] & 0b1100_0000 != 0b1000_0000)
            {
                if let Err(e) = std::str::from_utf8(&bytes[lead..]) {
                    if e.error_len().is_none() {
                        bytes.truncate(lead + e.valid_up_to());
                    }
                }
            }
        }
        let text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        (text, self.truncated)
    }
}

/// Read `pipe` to the end into `capture`, discarding what exceeds the cap,
/// so the child never blocks on a full pipe.
async fn drain<R: AsyncRead + Unpin>(pipe: Option<R>, capture: &mut Capture) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) => return,
            Ok(n) => capture.push(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(error = %e, "system.run: output pipe read failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::approvals::{Security, SetParams};
    use std::time::Instant;

    fn params(argv: &[&str]) -> RunParams {
        RunParams {
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..RunParams::default()
        }
    }

    async fn run_ok(p: RunParams) -> RunResult {
        run(p, &ExecLimits::default(), std::future::pending())
            .await
            .unwrap()
    }

    /// Members of process group `pgid` that are still alive (zombies count
    /// as dead: they hold no resources and run no code).
    fn live_group_members(pgid: i32) -> Vec<i32> {
        let mut live = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the parenthesized command: state ppid pgrp ...
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.len() > 2
                && fields[2].parse::<i32>() == Ok(pgid)
                && !matches!(fields[0], "Z" | "X")
            {
                live.push(pid);
            }
        }
        live
    }

    async fn assert_group_gone(pgid: i32, within: Duration) {
        let start = Instant::now();
        loop {
            let live = live_group_members(pgid);
            if live.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < within,
                "process group {pgid} still has live members {live:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn first_line_pid(stdout: &str) -> i32 {
        stdout.lines().next().unwrap().trim().parse().unwrap()
    }

    #[tokio::test]
    async fn captures_stdout_stderr_and_exit_code() {
        let r = run_ok(params(&["sh", "-c", "echo out; echo err >&2; exit 3"])).await;
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        assert_eq!(r.exit_code, Some(3));
        assert!(!r.success);
        assert!(!r.timed_out);
        assert_eq!(r.error, None);

        let ok = run_ok(params(&["sh", "-c", "printf hi"])).await;
        assert!(ok.success);
        assert_eq!(ok.exit_code, Some(0));
        let json = serde_json::to_value(&ok).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"exitCode": 0, "timedOut": false, "success": true,
                "stdout": "hi", "stderr": "", "error": null,
                "stdoutTruncated": false, "stderrTruncated": false})
        );
    }

    #[tokio::test]
    async fn honours_cwd_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = params(&["sh", "-c", "pwd; echo \"$CLAWMESH_T\""]);
        p.cwd = Some(dir.path().to_string_lossy().into_owned());
        p.env = Some(BTreeMap::from([("CLAWMESH_T".into(), "v 1".into())]));
        let r = run_ok(p).await;
        let canon = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(r.stdout, format!("{}\nv 1\n", canon.display()));
        assert!(r.success);

        // A relative program path resolves against cwd.
        std::fs::write(dir.path().join("tool"), "#!/bin/sh\necho tool-ran\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut p = params(&["./tool"]);
        p.cwd = Some(dir.path().to_string_lossy().into_owned());
        assert_eq!(run_ok(p).await.stdout, "tool-ran\n");

        let mut bad = params(&["sh", "-c", "true"]);
        bad.cwd = Some(dir.path().join("missing").to_string_lossy().into_owned());
        let r = run_ok(bad).await;
        assert!(!r.success);
        assert!(r.error.unwrap().contains("No such file or directory"));
    }

    #[tokio::test]
    async fn refuses_dangerous_env_overrides() {
        for key in [
            "LD_PRELOAD",
            "ld_library_path",
            "PATH",
            "DYLD_INSERT_LIBRARIES",
            "BASH_ENV",
        ] {
            let mut p = params(&["true"]);
            p.env = Some(BTreeMap::from([(key.to_string(), "x".to_string())]));
            let err = run(p, &ExecLimits::default(), std::future::pending())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "INVALID_REQUEST");
            assert!(err.to_string().contains(key), "{err}");
        }
        let mut p = params(&["true"]);
        p.env = Some(BTreeMap::from([("A=B".to_string(), "x".to_string())]));
        assert!(run(p, &ExecLimits::default(), std::future::pending())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let limits = ExecLimits {
            kill_grace: Duration::from_millis(200),
            ..ExecLimits::default()
        };
        let mut p = params(&["sh", "-c", "echo $$; sleep 30 & sleep 30; wait"]);
        p.timeout_ms = Some(300);
        let start = Instant::now();
        let r = run(p, &limits, std::future::pending()).await.unwrap();
        let elapsed = start.elapsed();
        assert!(r.timed_out);
        assert!(!r.success);
        assert_eq!(r.exit_code, None);
        assert_eq!(r.error.as_deref(), Some("command timed out after 300 ms"));
        assert!(elapsed < Duration::from_millis(1300), "{elapsed:?}");
        assert_group_gone(first_line_pid(&r.stdout), Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn timeout_escalates_to_sigkill_when_sigterm_is_ignored() {
        let limits = ExecLimits {
            kill_grace: Duration::from_millis(200),
            ..ExecLimits::default()
        };
        // Ignored signals stay ignored across exec: the sleeps ignore TERM too.
        let mut p = params(&[
            "sh",
            "-c",
            "trap '' TERM; echo $$; sleep 30 & sleep 30; wait",
        ]);
        p.timeout_ms = Some(200);
        let start = Instant::now();
        let r = run(p, &limits, std::future::pending()).await.unwrap();
        assert!(r.timed_out);
        assert!(start.elapsed() < Duration::from_millis(1200));
        assert_group_gone(first_line_pid(&r.stdout), Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn cancel_signal_kills_the_group() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = tx.send(());
        });
        let cancel = async {
            let _ = rx.await;
        };
        let start = Instant::now();
        let r = run(
            params(&["sh", "-c", "echo $$; sleep 30 & sleep 30; wait"]),
            &ExecLimits::default(),
            cancel,
        )
        .await
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(r.error.as_deref(), Some("command cancelled"));
        assert!(!r.success && !r.timed_out && r.exit_code.is_none());
        assert_group_gone(first_line_pid(&r.stdout), Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo $$ > '{}'; sleep 30 & sleep 30; wait",
            pidfile.display()
        );
        let limits = ExecLimits::default();
        let fut = run(
            params(&["sh", "-c", &script]),
            &limits,
            std::future::pending(),
        );
        assert!(tokio::time::timeout(Duration::from_millis(400), fut)
            .await
            .is_err());
        let pgid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_group_gone(pgid, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn leftover_background_processes_are_killed_after_exit() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo $$ > '{}'; sleep 30 >/dev/null 2>&1 & echo done",
            pidfile.display()
        );
        let start = Instant::now();
        let r = run_ok(params(&["sh", "-c", &script])).await;
        assert!(r.success, "{r:?}");
        assert_eq!(r.stdout, "done\n");
        assert!(start.elapsed() < Duration::from_secs(2));
        let pgid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_group_gone(pgid, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn output_is_capped_and_drained() {
        let limits = ExecLimits {
            max_output: 1000,
            ..ExecLimits::default()
        };
        let p = params(&[
            "sh",
            "-c",
            "head -c 100000 /dev/zero | tr '\\0' a; head -c 100000 /dev/zero | tr '\\0' b >&2",
        ]);
        let start = Instant::now();
        let r = run(p, &limits, std::future::pending()).await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(r.success, "{r:?}");
        assert_eq!(r.stdout, "a".repeat(1000));
        assert_eq!(r.stderr, "b".repeat(1000));
        assert!(r.stdout_truncated && r.stderr_truncated);

        let small = run_ok(params(&["sh", "-c", "printf 12345"])).await;
        assert!(!small.stdout_truncated);
    }

    #[test]
    fn capture_handles_utf8_at_the_cut_and_invalid_bytes() {
        let mut c = Capture::new(4);
        c.push("abé€".as_bytes()); // a b [c3 a9] [e2 82 ac]: cut after 4 bytes
        assert_eq!(c.into_text(), ("abé".to_string(), true));
        let mut c = Capture::new(5);
        c.push("aé€".as_bytes()); // a [c3 a9] [e2 82 | ac]: partial € dropped
        assert_eq!(c.into_text(), ("aé".to_string(), true));
        let mut c = Capture::new(2);
        c.push("aé".as_bytes()); // cut inside é -> dropped
        assert_eq!(c.into_text(), ("a".to_string(), true));
        let mut c = Capture::new(100);
        c.push(&[b'o', b'k', 0xff, b'!']);
        assert_eq!(c.into_text(), ("ok\u{fffd}!".to_string(), false));
    }

    #[tokio::test]
    async fn spawn_failures_and_bad_params() {
        let r = run_ok(params(&["/nonexistent-clawmesh/x"])).await;
        assert!(!r.success);
        assert_eq!(r.exit_code, None);
        assert_eq!(
            r.error.as_deref(),
            Some("spawn /nonexistent-clawmesh/x: No such file or directory")
        );

        let r = run_ok(params(&["clawmesh-no-such-binary-xyz"])).await;
        assert!(r.error.unwrap().contains("not found in the node's PATH"));

        let dir = tempfile::tempdir().unwrap();
        let noexec = dir.path().join("noexec");
        std::fs::write(&noexec, "#!/bin/sh\n").unwrap();
        let r = run_ok(params(&[noexec.to_str().unwrap()])).await;
        assert!(r.error.unwrap().contains("Permission denied"));

        let err = run(params(&[]), &ExecLimits::default(), std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "INVALID_REQUEST");
        assert!(err.to_string().contains("command is empty"), "{err}");
        assert!(RunParams::from_value(serde_json::json!({"cwd": "/"})).is_err());
    }

    #[tokio::test]
    async fn signal_exit_is_reported() {
        let r = run_ok(params(&["sh", "-c", "kill -KILL $$"])).await;
        assert_eq!(r.exit_code, None);
        assert!(!r.success);
        assert_eq!(
            r.error.as_deref(),
            Some("command terminated by signal SIGKILL (9)")
        );
    }

    #[test]
    fn params_accept_classic_extra_fields() {
        let p = RunParams::from_value(serde_json::json!({
            "command": ["echo", "hi"], "rawCommand": "echo hi", "agentId": "main",
            "sessionKey": "s", "approved": true, "approvalDecision": "allow-once",
            "runId": "r", "suppressNotifyOnExit": true, "timeoutMs": 5000,
            "needsScreenRecording": false
        }))
        .unwrap();
        assert_eq!(p.command, vec!["echo", "hi"]);
        assert_eq!(p.timeout_ms, Some(5000));

        let limits = ExecLimits {
            default_timeout: Some(Duration::from_secs(7)),
            max_timeout: Duration::from_secs(60),
            ..ExecLimits::default()
        };
        let t = |ms| {
            let mut p = params(&["true"]);
            p.timeout_ms = ms;
            validate(p, &limits).unwrap().timeout
        };
        assert_eq!(t(None), Duration::from_secs(7));
        assert_eq!(t(Some(0)), Duration::from_secs(7));
        assert_eq!(t(Some(1500)), Duration::from_millis(1500));
        assert_eq!(t(Some(10_000_000)), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn system_run_applies_exec_approvals() {
        let state = tempfile::tempdir().unwrap();
        let approvals = ExecApprovals::new(state.path(), None).with_node_name("n1");
        let limits = ExecLimits::default();
        let never = std::future::pending::<()>;

        // No file: nothing runs.
        let err = system_run(params(&["env"]), &approvals, &limits, never())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "UNAVAILABLE");
        assert!(
            err.to_string()
                .starts_with("SYSTEM_RUN_DENIED: allowlist miss"),
            "{err}"
        );

        approvals
            .set(SetParams {
                file: serde_json::json!({"version": 1, "allowlist": [{"pattern": "/usr/bin/env"}]}),
                base_hash: None,
            })
            .unwrap();
        let mut p = params(&["env"]);
        p.env = Some(BTreeMap::from([("CLAWMESH_T".into(), "yes".into())]));
        let r = system_run(p, &approvals, &limits, never()).await.unwrap();
        assert!(r.success, "{r:?}");
        assert!(r.stdout.contains("CLAWMESH_T=yes"));

        // A copy of env in the working directory does not pass for it.
        let work = tempfile::tempdir().unwrap();
        std::fs::copy("/usr/bin/env", work.path().join("env")).unwrap();
        let mut p = params(&["./env"]);
        p.cwd = Some(work.path().to_string_lossy().into_owned());
        let err = system_run(p, &approvals, &limits, never())
            .await
            .unwrap_err();
        let canon = std::fs::canonicalize(work.path().join("env")).unwrap();
        assert!(
            err.to_string()
                .contains(&format!("{} is not in the exec allowlist", canon.display())),
            "{err}"
        );

        // sh is not allowed, however it is named.
        assert!(
            system_run(params(&["sh", "-c", "true"]), &approvals, &limits, never())
                .await
                .is_err()
        );

        // deny refuses before resolving; full runs anything, even missing
        // programs reach the spawn failure.
        let deny = ExecApprovals::new(state.path(), Some(Security::Deny));
        let err = system_run(params(&["env"]), &deny, &limits, never())
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("SYSTEM_RUN_DISABLED"), "{err}");
        let full = ExecApprovals::new(state.path(), Some(Security::Full));
        let r = system_run(params(&["sh", "-c", "exit 0"]), &full, &limits, never())
            .await
            .unwrap();
        assert!(r.success);
        let r = system_run(
            params(&["/nonexistent-clawmesh/x"]),
            &full,
            &limits,
            never(),
        )
        .await
        .unwrap();
        assert!(r.error.unwrap().starts_with("spawn "));
    }
}
