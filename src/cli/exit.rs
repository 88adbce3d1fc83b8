//! The CLI's exit codes, as scripts see them (listed in README.md, "Exit codes").
//!
//! Like `ssh`, `nodes invoke` of `system.run` exits with the remote command's own status,
//! so `clawmesh nodes invoke ... && next` behaves like running the command locally. The codes
//! clawmesh adds follow the shell's conventions (`timeout(1)`'s 124, the shell's 126/127,
//! 128+signal).

use serde_json::Value;

/// Success.
pub const OK: i32 = 0;
/// `gateway status --check` found a gateway that is not healthy.
pub const UNHEALTHY: i32 = 1;
/// Any other error: bad input, unreachable gateway, refused request, unknown node.
pub const ERROR: i32 = 2;
/// The command (or the gateway waiting for it) timed out, as `timeout(1)` exits.
pub const TIMED_OUT: i32 = 124;
/// The node's exec approvals refused the command (`SYSTEM_RUN_DENIED`/`_DISABLED`).
pub const REFUSED: i32 = 126;
/// The command could not be started on the node (not found, not executable, bad cwd).
pub const NOT_STARTED: i32 = 127;
/// The operator pressed Ctrl-C (128 + SIGINT); the request was cancelled.
pub const INTERRUPTED: i32 = 130;
/// The CLI got SIGTERM (128 + SIGTERM); the request was cancelled.
pub const TERMINATED: i32 = 143;
/// stdout was closed under the CLI (`clawmesh ... | head`): 128 + SIGPIPE, and no message.
pub const BROKEN_PIPE: i32 = 141;

/// An error that carries its machine-readable code and exit status (the gateway's wire code,
/// or one of the CLI's own: `CANCELLED`, `UNREACHABLE`, `TIMEOUT`).
#[derive(Debug, thiserror::Error)]
#[error("{shown}")]
pub struct Failure {
    /// Machine-readable code, e.g. `TIMEOUT`, `INVALID_REQUEST`, `UNAVAILABLE`.
    pub code: String,
    /// The message without the code.
    pub message: String,
    /// What a person reads (the code and the message).
    pub shown: String,
    /// The exit status.
    pub exit: i32,
    /// Extra fields for `--json` (e.g. the gateway that answered).
    pub details: Option<Value>,
}

impl Failure {
    /// A failure with this code and message; the exit status follows from both.
    pub fn new(code: &str, message: impl Into<String>) -> Failure {
        let message = message.into();
        let shown = if message.starts_with(code) {
            message.clone()
        } else {
            format!("{code}: {message}")
        };
        let message = message
            .strip_prefix(code)
            .and_then(|m| m.strip_prefix(": "))
            .map(str::to_string)
            .unwrap_or(message);
        Failure {
            exit: for_error(code, &message),
            code: code.to_string(),
            message,
            shown,
            details: None,
        }
    }

    /// The same failure with another exit status.
    pub fn with_exit(mut self, exit: i32) -> Failure {
        self.exit = exit;
        self
    }
}

/// The exit status of an error with this wire code and message.
pub fn for_error(code: &str, message: &str) -> i32 {
    if code == "TIMEOUT" || message.starts_with("TIMEOUT") {
        TIMED_OUT
    } else if message.contains("SYSTEM_RUN_DENIED") || message.contains("SYSTEM_RUN_DISABLED") {
        REFUSED
    } else if code == "CANCELLED" {
        INTERRUPTED
    } else {
        ERROR
    }
}

/// The exit status of a `system.run` result, as `ssh` would give it: the remote exit code;
/// 128 + N for death by signal N; [`TIMED_OUT`] when it timed out; [`NOT_STARTED`] when it
/// could not start.
pub fn for_system_run(payload: &Value) -> i32 {
    if payload["timedOut"] == true {
        return TIMED_OUT;
    }
    if let Some(code) = payload["exitCode"].as_i64() {
        return i32::try_from(code.rem_euclid(256)).unwrap_or(ERROR);
    }
    let error = payload["error"].as_str().unwrap_or("");
    if let Some(sig) = error
        .strip_prefix("command terminated by signal ")
        .and_then(|r| r.rsplit_once('('))
        .and_then(|(_, n)| n.trim_end_matches(')').parse::<i32>().ok())
    {
        return 128 + sig;
    }
    if payload["success"] == true {
        OK
    } else {
        NOT_STARTED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn system_run_statuses_map_like_ssh() {
        assert_eq!(for_system_run(&json!({"exitCode": 0, "success": true})), 0);
        assert_eq!(for_system_run(&json!({"exitCode": 3, "success": false})), 3);
        assert_eq!(
            for_system_run(&json!({"exitCode": null, "timedOut": true})),
            TIMED_OUT
        );
        assert_eq!(
            for_system_run(
                &json!({"exitCode": null, "error": "command terminated by signal SIGKILL (9)"})
            ),
            137
        );
        assert_eq!(
            for_system_run(&json!({"exitCode": null, "error": "spawn /x: No such file"})),
            NOT_STARTED
        );
        assert_eq!(
            for_error("UNAVAILABLE", "SYSTEM_RUN_DENIED: allowlist miss"),
            REFUSED
        );
        assert_eq!(for_error("TIMEOUT", "node invoke timed out"), TIMED_OUT);
        assert_eq!(for_error("INVALID_REQUEST", "bad"), ERROR);
    }
}
