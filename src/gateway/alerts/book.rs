//! The alert book: which alerts fire now and which resolved recently, as the evaluating
//! gateway keeps it and every other gateway holds a copy of it (pushed by the evaluator with
//! `alerts.sync`). The copy is what a new primary starts from, so alerts already firing do not
//! fire again after a failover.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Resolved alerts kept for `clawmesh alerts` and the status page: the recent past, not a
/// history (webhook receivers keep that).
const MAX_RESOLVED: usize = 50;

/// Firing alerts kept at most: a federation with every node disconnected still fits; beyond
/// it, new alerts are counted (`overflow`) and not tracked.
pub const MAX_FIRING: usize = 20_000;

/// One alert: a rule whose condition holds for one subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// Stable identity: `rule/subject` (e.g. `gateway-offline/berlin`).
    pub id: String,
    /// The rule's name.
    pub rule: String,
    /// The rule's kind (`gateway-offline`, `cpu`, ...).
    pub kind: String,
    /// What it is about: a gateway name, `gateway/node`, or `federation`.
    pub subject: String,
    /// One line for people.
    pub summary: String,
    /// The measured value, for threshold rules.
    pub value: Option<f64>,
    /// When it started firing (ms since the epoch).
    pub since_ms: u64,
    /// When it resolved, once it has.
    pub resolved_ms: Option<u64>,
}

/// The book's contents, as synced between gateways.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Contents {
    /// Firing alerts by id.
    pub firing: BTreeMap<String, Alert>,
    /// Recently resolved alerts, newest last.
    pub resolved: VecDeque<Alert>,
    /// The gateway that evaluated them.
    pub evaluator: Option<String>,
    /// When the evaluator last updated them (ms since the epoch).
    pub updated_ms: u64,
}

/// The book, shared by the evaluator, the methods and the status page.
#[derive(Default)]
pub struct AlertBook {
    contents: Mutex<Contents>,
    on_duty: AtomicBool,
    /// Alerts not tracked because [`MAX_FIRING`] were already firing.
    overflow: AtomicU64,
    /// Webhook counters, per webhook URL: (delivered, retried, dropped, refused).
    webhooks: Mutex<BTreeMap<String, WebhookCounters>>,
}

/// What a webhook's queue has done, for `clawmesh alerts --json`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookCounters {
    /// Notices delivered (2xx).
    pub delivered: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Notices dropped because the queue was full (oldest first).
    pub dropped_full: u64,
    /// Notices given up because they waited longer than the retry window.
    pub dropped_expired: u64,
    /// Notices the receiver refused for good (a 4xx other than 408/429).
    pub refused: u64,
    /// Notices waiting now.
    pub queued: u64,
}

impl AlertBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this gateway evaluates the rules now.
    pub fn on_duty(&self) -> bool {
        self.on_duty.load(Ordering::Relaxed)
    }

    /// Records whether this gateway evaluates the rules now.
    pub fn set_on_duty(&self, v: bool) {
        self.on_duty.store(v, Ordering::Relaxed);
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Contents {
        self.lock().clone()
    }

    /// Adopts the evaluator's contents (on every gateway not on duty).
    pub fn adopt(&self, c: Contents) {
        if !self.on_duty() {
            *self.lock() = c;
        }
    }

    /// Adopts `c` even on duty, if it is newer than what this book holds: a gateway taking the
    /// duty pulls the books of the others (it may have just restarted, with an empty book).
    pub fn adopt_newer(&self, c: Contents) -> bool {
        let mut cur = self.lock();
        if c.updated_ms > cur.updated_ms {
            *cur = c;
            true
        } else {
            false
        }
    }

    /// Starts firing `a` (the evaluator); false when the book is full.
    pub fn fire(&self, a: Alert, evaluator: &str, now_ms: u64) -> bool {
        let mut c = self.lock();
        if c.firing.len() >= MAX_FIRING && !c.firing.contains_key(&a.id) {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        c.firing.insert(a.id.clone(), a);
        c.evaluator = Some(evaluator.to_string());
        c.updated_ms = now_ms;
        true
    }

    /// Resolves the alert `id` (the evaluator); returns it with its resolve time.
    pub fn resolve(&self, id: &str, evaluator: &str, now_ms: u64) -> Option<Alert> {
        let mut c = self.lock();
        let mut a = c.firing.remove(id)?;
        a.resolved_ms = Some(now_ms);
        c.resolved.push_back(a.clone());
        while c.resolved.len() > MAX_RESOLVED {
            c.resolved.pop_front();
        }
        c.evaluator = Some(evaluator.to_string());
        c.updated_ms = now_ms;
        Some(a)
    }

    /// Marks the book as current (the evaluator ran), without a change.
    pub fn touch(&self, evaluator: &str, now_ms: u64) {
        let mut c = self.lock();
        c.evaluator = Some(evaluator.to_string());
        c.updated_ms = now_ms;
    }

    /// Ids of the alerts firing now.
    pub fn firing_ids(&self) -> Vec<String> {
        self.lock().firing.keys().cloned().collect()
    }

    /// Updates the counters of the webhook at `url`.
    pub fn webhook_counters(&self, url: &str, f: impl FnOnce(&mut WebhookCounters)) {
        let mut w = self.webhooks.lock().unwrap_or_else(|p| p.into_inner());
        f(w.entry(url.to_string()).or_default());
    }

    /// Forgets the counters of webhooks no longer configured.
    pub fn retain_webhooks(&self, urls: &[String]) {
        let mut w = self.webhooks.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|u, _| urls.contains(u));
    }

    /// The document of `alerts.list`: firing (oldest first), recently resolved (newest
    /// first), who evaluated them and when, and this gateway's webhook counters.
    pub fn to_json(&self, answered_by: &str) -> Value {
        let c = self.contents();
        let mut firing: Vec<&Alert> = c.firing.values().collect();
        firing.sort_by(|a, b| a.since_ms.cmp(&b.since_ms).then(a.id.cmp(&b.id)));
        let resolved: Vec<&Alert> = c.resolved.iter().rev().collect();
        let webhooks = self
            .webhooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(u, n)| {
                let mut v = json!(n);
                v["url"] = json!(u);
                v
            })
            .collect::<Vec<_>>();
        json!({
            "firing": firing,
            "resolved": resolved,
            "evaluator": c.evaluator,
            "updatedMs": c.updated_ms,
            "answeredBy": answered_by,
            "onDuty": self.on_duty(),
            "overflow": self.overflow.load(Ordering::Relaxed),
            "webhooks": webhooks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: &str) -> Alert {
        Alert {
            id: id.into(),
            rule: "gateway-offline".into(),
            kind: "gateway-offline".into(),
            subject: "b".into(),
            summary: "gateway b is offline".into(),
            value: None,
            since_ms: 1,
            resolved_ms: None,
        }
    }

    #[test]
    fn fire_resolve_and_adopt_only_off_duty() {
        let book = AlertBook::default();
        book.set_on_duty(true);
        assert!(book.fire(alert("x/b"), "a", 5));
        assert_eq!(book.firing_ids(), vec!["x/b".to_string()]);
        let r = book.resolve("x/b", "a", 9).unwrap();
        assert_eq!(r.resolved_ms, Some(9));
        assert!(book.resolve("x/b", "a", 10).is_none());
        // On duty, a copy from elsewhere is ignored.
        book.adopt(Contents::default());
        assert_eq!(book.contents().resolved.len(), 1);
        book.set_on_duty(false);
        book.adopt(Contents::default());
        assert!(book.contents().resolved.is_empty());
        for i in 0..(MAX_RESOLVED + 5) {
            book.fire(alert(&format!("y/{i}")), "a", 1);
            book.resolve(&format!("y/{i}"), "a", 2);
        }
        assert_eq!(book.contents().resolved.len(), MAX_RESOLVED);
    }
}
