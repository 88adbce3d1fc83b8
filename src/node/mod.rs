//! The node host: the "hands" of a clawmesh node.
//!
//! A node runs commands that operators approved and nothing else; it has no
//! AI logic. This module implements the node-side handlers of the classic
//! OpenClaw node commands, with the classic payload shapes, so one operator
//! request works the same against a native clawmesh node and a classic node:
//!
//! - [`exec`]: `system.run`, run an argv (no shell) in its own process group,
//!   with a timeout, cancellation, capped output, and the exec approvals
//!   check in front of it.
//! - [`which`]: `system.which`, find executables in the node's `PATH`
//!   without spawning anything.
//! - [`approvals`]: `system.execApprovals.get` / `system.execApprovals.set`,
//!   the `exec-approvals.json` file in the node's state dir, the
//!   allow/deny decision for `system.run`, and the file helpers used by
//!   `clawmesh approvals allow|deny|set`.
//! - [`boot`]: the node's start count and attach counter, the order of its attachments that
//!   the federation uses to list it where it is now.
//!
//! # Errors
//!
//! Every error type here maps to a classic node error code through a
//! `code()` method ([`CODE_INVALID_REQUEST`] for bad params,
//! [`CODE_UNAVAILABLE`] for runtime failures and refusals) and carries a
//! human message through `Display`. A refused `system.run` is reported the
//! classic way: code `UNAVAILABLE`, message starting with
//! `SYSTEM_RUN_DENIED: allowlist miss` (or `SYSTEM_RUN_DISABLED:
//! security=deny`), followed by a clawmesh explanation of how to allow it.
//! A command that ran and failed (non-zero exit, timeout, spawn failure) is
//! not an error: it is a [`exec::RunResult`] with `success: false`.

pub mod approvals;
pub mod boot;
pub mod exec;
mod find;
pub mod run;
pub mod which;

/// Classic error code for a request whose parameters are wrong: the caller
/// must change the request (empty argv, forbidden env override, too many
/// bins, stale approvals hash, invalid approvals file).
pub const CODE_INVALID_REQUEST: &str = "INVALID_REQUEST";

/// Classic error code for a request the node cannot serve as things stand:
/// a refused command (exec approvals), an unreadable or corrupt approvals
/// file, an I/O failure. The classic node host uses this code for
/// `SYSTEM_RUN_DENIED`, so clawmesh does too.
pub const CODE_UNAVAILABLE: &str = "UNAVAILABLE";
