//! The bounded send side of one classic connection.
//!
//! Everything a connection sends (responses, events, invoke requests, close) goes through one
//! queue drained by a writer task. The queue is bounded in frames and in bytes: a client that
//! does not read its socket fills it, and is closed with 1008 `slow consumer` instead of making
//! the gateway buffer without limit (the classic `policy.maxBufferedBytes`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// Frames queued per connection: hundreds of in-flight responses and events fit; a client
/// stuck that far behind is a slow consumer.
pub const QUEUE_FRAMES: usize = 1024;

/// Bytes queued per connection before it counts as a slow consumer (classic maxBufferedBytes).
pub const MAX_BUFFERED_BYTES: usize = 52_428_800;

/// What the writer task sends.
#[derive(Debug)]
pub enum Outbound {
    /// A text frame.
    Text(String),
    /// A WebSocket ping.
    Ping,
    /// Close with code and reason, then stop.
    Close(u16, String),
}

/// Handle to a connection's send queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Outbound>,
    queued: Arc<AtomicUsize>,
    closing: Arc<AtomicBool>,
}

impl Outbox {
    /// A new queue and its receiving end for the writer task.
    pub fn new() -> (Outbox, mpsc::Receiver<Outbound>, Arc<AtomicUsize>) {
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Outbox {
                tx,
                queued: queued.clone(),
                closing: Arc::new(AtomicBool::new(false)),
            },
            rx,
            queued,
        )
    }

    /// Queues a text frame; a full queue closes the connection as a slow consumer.
    pub fn text(&self, s: String) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            return false;
        }
        let len = s.len();
        if self.queued.load(Ordering::Relaxed) + len > MAX_BUFFERED_BYTES {
            self.close(1008, "slow consumer");
            return false;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        match self.tx.try_send(Outbound::Text(s)) {
            Ok(()) => true,
            Err(_) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                self.close(1008, "slow consumer");
                false
            }
        }
    }

    /// Queues a ping (dropped if the queue is full: the slow-consumer rule will act).
    pub fn ping(&self) {
        let _ = self.tx.try_send(Outbound::Ping);
    }

    /// Closes the connection once what is queued has been sent.
    pub fn close(&self, code: u16, reason: &str) {
        if self.closing.swap(true, Ordering::Relaxed) {
            return;
        }
        let reason = super::frames::close_reason(reason);
        let tx = self.tx.clone();
        // The close must get through even when the queue is full: wait for room off-task.
        tokio::spawn(async move {
            let _ = tx.send(Outbound::Close(code, reason)).await;
        });
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}
