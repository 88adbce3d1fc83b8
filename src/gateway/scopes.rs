//! Operator roles and scopes, as in the classic OpenClaw protocol.
//!
//! `operator.admin` satisfies every scope; `operator.write` satisfies `operator.read`; nothing
//! else is implied. A request outside the caller's scopes is refused naming the missing scope.

use clawmesh_federation::wire::WireError;

/// Full control, including pairing approval of nodes and config writes.
pub const ADMIN: &str = "operator.admin";
/// Read state: status, lists, descriptions.
pub const READ: &str = "operator.read";
/// Act: invoke commands on nodes.
pub const WRITE: &str = "operator.write";
/// Approve or reject device pairing.
pub const PAIRING: &str = "operator.pairing";
/// Manage exec approvals.
pub const APPROVALS: &str = "operator.approvals";

/// Every operator scope, granted to a token holder that asks for none in particular.
pub const ALL: &[&str] = &[ADMIN, READ, WRITE, PAIRING, APPROVALS];

/// Whether `granted` satisfies `required`.
pub fn satisfies(granted: &[String], required: &str) -> bool {
    granted
        .iter()
        .any(|g| g == ADMIN || g == required || (g == WRITE && required == READ))
}

/// The classic error for a missing scope.
pub fn missing(required: &str) -> WireError {
    let mut e = WireError::new("FORBIDDEN", format!("missing scope: {required}"));
    e.details = Some(
        serde_json::json!({
            "code": "MISSING_SCOPE",
            "missingScope": required,
            "requiredScopes": [required],
        })
        .to_string(),
    );
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implications() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(satisfies(&s(&[ADMIN]), PAIRING));
        assert!(satisfies(&s(&[WRITE]), READ));
        assert!(!satisfies(&s(&[READ]), WRITE));
        assert!(!satisfies(&s(&[PAIRING]), READ));
        assert!(missing(WRITE).message.contains("operator.write"));
    }
}
