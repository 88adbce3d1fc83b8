//! Alerts like the seeds' CloudWatch alarms, evaluated by the federation itself.
//!
//! - `book`: firing and recently resolved alerts, and the copy every gateway holds;
//! - `evaluate`: the rules (`alerts.rules`, [`crate::alerts_config`]) against the status and
//!   node documents, with each rule's `for`;
//! - `webhook`: firing and resolved notices to `alerts.webhooks`, bounded queues, retries;
//! - `duty`: which gateway evaluates (the primary) and the loop that does it.
//!
//! `alerts.list` (`clawmesh alerts`) and `alerts.sync` (the evaluator's pushes) are in
//! [`crate::gateway::methods`].

pub mod book;
mod duty;
mod evaluate;
mod webhook;

pub use duty::spawn;
