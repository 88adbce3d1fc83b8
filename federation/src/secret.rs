//! Constant-time comparison of secrets, on `subtle` (the dalek and RustCrypto primitive).
//!
//! Every comparison of a secret in the project goes through here or through the `hmac` crate's
//! `verify_slice` (the join and welcome proofs, [`crate::handshake`]): join tokens, operator
//! tokens, the classic bridge's shared token or password, device tokens. A hand-written XOR
//! fold looks constant-time but the optimiser may turn it into an early exit; `subtle` keeps
//! its comparisons opaque to the optimiser on purpose.

use subtle::{Choice, ConstantTimeEq};

/// True when the two secrets are equal. Time does not depend on the content; it does depend
/// on the lengths (they differ, or they are compared), which tokens of a fixed format do not
/// hide anyway.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// True when `candidate` equals any of `secrets`. Every secret is compared (no early exit on a
/// match), so the time does not say which one matched either.
pub fn equals_any<'a>(secrets: impl IntoIterator<Item = &'a String>, candidate: &str) -> bool {
    secrets
        .into_iter()
        .fold(Choice::from(0), |found, s| {
            found | s.as_bytes().ct_eq(candidate.as_bytes())
        })
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_content_and_length() {
        assert!(secrets_equal("abc", "abc"));
        assert!(secrets_equal("", ""));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
        assert!(!secrets_equal("abcd", "abc"));
        assert!(!secrets_equal("", "a"));
    }

    #[test]
    fn any_of_several() {
        let secrets = vec!["one".to_string(), "two".to_string()];
        assert!(equals_any(&secrets, "one"));
        assert!(equals_any(&secrets, "two"));
        assert!(!equals_any(&secrets, "three"));
        assert!(!equals_any(&secrets, "tw"));
        assert!(!equals_any(&Vec::<String>::new(), ""));
    }
}
