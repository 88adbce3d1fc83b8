//! Delivery of alert notices to the configured webhooks: one bounded queue and one task per
//! webhook, in order, retried with backoff until delivered, refused for good (a 4xx other than
//! 408/429), or older than the retry window. What a full queue or the window drops is counted
//! in the [`AlertBook`]'s webhook counters.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawmesh_federation::backoff::Backoff;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::book::{Alert, AlertBook};
use crate::alerts_config::{Format, Webhook};

/// Notices queued per webhook: a burst of a whole region's alerts fits; beyond it the oldest
/// go first (the newest state matters most), counted as `droppedFull`.
pub const MAX_QUEUE: usize = 256;

/// How long a notice is retried: a receiver down for maintenance gets it when it is back;
/// one down for longer than this gets the current state from `clawmesh alerts`.
pub const RETRY_WINDOW: Duration = Duration::from_secs(3600);

/// One attempt's deadline: a slow receiver across a continent with room to spare; a hung one
/// cannot hold the queue.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Retry backoff: quick for a receiver restarting, capped so a long outage costs one attempt
/// every 30 s.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// A firing or resolved notice.
#[derive(Debug, Clone)]
pub struct Notice {
    /// `firing` or `resolved`.
    pub status: &'static str,
    /// The alert.
    pub alert: Alert,
    /// The gateway that sends it.
    pub sender: String,
    queued: Instant,
}

impl Notice {
    /// A notice queued now.
    pub fn new(status: &'static str, alert: Alert, sender: &str) -> Self {
        Notice {
            status,
            alert,
            sender: sender.to_string(),
            queued: Instant::now(),
        }
    }

    /// The request body in `format`.
    pub fn body(&self, format: Format) -> Value {
        let a = &self.alert;
        match format {
            Format::Json => json!({
                "status": self.status,
                "alert": a,
                "gateway": self.sender,
                "text": self.text(),
            }),
            Format::Slack => json!({"text": self.text()}),
        }
    }

    fn text(&self) -> String {
        let a = &self.alert;
        let since = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(a.since_ms),
        );
        match self.status {
            "firing" => format!(
                ":red_circle: FIRING [{}] {} (since {since}, from {})",
                a.rule, a.summary, self.sender
            ),
            _ => format!(
                ":large_green_circle: RESOLVED [{}] {} (firing since {since}, from {})",
                a.rule, a.summary, self.sender
            ),
        }
    }
}

struct Queue {
    hook: Webhook,
    items: Arc<(Mutex<VecDeque<Notice>>, Notify)>,
    task: JoinHandle<()>,
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The webhooks in force and their queues.
pub struct Webhooks {
    client: reqwest::Client,
    book: Arc<AlertBook>,
    queues: Vec<Queue>,
}

impl Webhooks {
    /// No webhooks yet; `book` receives the counters.
    pub fn new(book: Arc<AlertBook>) -> Result<Self, reqwest::Error> {
        // reqwest is built without a crypto provider: rustls uses ring, the project's one
        // (an error only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("clawmesh/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Webhooks {
            client,
            book,
            queues: Vec::new(),
        })
    }

    /// Makes `hooks` the webhooks in force: queues of unchanged webhooks keep what they hold,
    /// removed ones stop (their pending notices are dropped), new ones start empty.
    pub fn set(&mut self, hooks: &[Webhook]) {
        let before = self.queues.len();
        self.queues.retain(|q| hooks.contains(&q.hook));
        let kept = self.queues.len();
        for h in hooks {
            if self.queues.iter().any(|q| &q.hook == h) {
                continue;
            }
            let items = Arc::new((Mutex::new(VecDeque::new()), Notify::new()));
            let task = tokio::spawn(deliver(
                self.client.clone(),
                h.clone(),
                items.clone(),
                self.book.clone(),
            ));
            self.queues.push(Queue {
                hook: h.clone(),
                items,
                task,
            });
        }
        if before != kept || kept != self.queues.len() {
            info!(webhooks = self.queues.len(), "alert webhooks set");
        }
        let urls: Vec<String> = hooks.iter().map(|h| h.url.clone()).collect();
        self.book.retain_webhooks(&urls);
    }

    /// Queues `n` for every webhook.
    pub fn send(&self, n: &Notice) {
        for q in &self.queues {
            let (items, notify) = &*q.items;
            let mut items = items.lock().unwrap_or_else(|p| p.into_inner());
            if items.len() >= MAX_QUEUE {
                items.pop_front();
                self.book
                    .webhook_counters(&q.hook.url, |c| c.dropped_full += 1);
            }
            items.push_back(n.clone());
            let len = items.len() as u64;
            self.book.webhook_counters(&q.hook.url, |c| c.queued = len);
            notify.notify_one();
        }
    }
}

/// What one attempt came to.
enum Outcome {
    Delivered,
    /// Worth another try (connection refused, timeout, 5xx, 408, 429).
    Retry(String),
    /// The receiver refused this notice for good (another 4xx).
    Refused(String),
}

async fn attempt(client: &reqwest::Client, hook: &Webhook, n: &Notice) -> Outcome {
    let body = n.body(hook.format).to_string();
    let mut req = client
        .post(&hook.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    for (k, v) in &hook.headers {
        req = req.header(k, v);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 429) => {
            Outcome::Refused(format!("HTTP {}", r.status()))
        }
        Ok(r) => Outcome::Retry(format!("HTTP {}", r.status())),
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

async fn deliver(
    client: reqwest::Client,
    hook: Webhook,
    items: Arc<(Mutex<VecDeque<Notice>>, Notify)>,
    book: Arc<AlertBook>,
) {
    let (queue, notify) = &*items;
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let url = hook.url.as_str();
    loop {
        let head = queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .cloned();
        let Some(n) = head else {
            notify.notified().await;
            continue;
        };
        let outcome = attempt(&client, &hook, &n).await;
        let done = match &outcome {
            Outcome::Delivered => {
                debug!(%url, alert = %n.alert.id, status = n.status, "alert notice delivered");
                book.webhook_counters(url, |c| c.delivered += 1);
                backoff.reset();
                true
            }
            Outcome::Refused(why) => {
                warn!(%url, alert = %n.alert.id, "alert notice refused by the webhook ({why}); not retried");
                book.webhook_counters(url, |c| c.refused += 1);
                true
            }
            Outcome::Retry(why) if n.queued.elapsed() > RETRY_WINDOW => {
                warn!(%url, alert = %n.alert.id, "alert notice given up after {RETRY_WINDOW:?}: {why}");
                book.webhook_counters(url, |c| c.dropped_expired += 1);
                true
            }
            Outcome::Retry(why) => {
                debug!(%url, alert = %n.alert.id, "alert notice not delivered, retrying: {why}");
                book.webhook_counters(url, |c| c.retries += 1);
                false
            }
        };
        if done {
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            // The head may have been dropped by a full queue meanwhile: remove this notice
            // only if it is still first.
            if q.front()
                .is_some_and(|f| f.alert.id == n.alert.id && f.status == n.status)
            {
                q.pop_front();
            }
            let len = q.len() as u64;
            book.webhook_counters(url, |c| c.queued = len);
        } else {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}
