//! Liveness of a single connection (a node's): datagram pings, and a close after too many
//! misses, so a peer that vanished without a word (SIGKILL, power loss, cable cut) is noticed
//! within interval × (threshold + 1) and every request pending on it fails at once, instead of
//! waiting for QUIC's 30 s idle timeout.
//!
//! The gateway mesh runs the same ping protocol inside its link task; this module is for
//! connections outside the mesh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, VarInt};

use crate::frame;
use crate::health::{HealthConfig, PeerHealth, Status};
use crate::vitals::{Received, VitalsSampler};
use crate::wire::Datagram;

/// QUIC close code used when a peer stops answering pings.
pub const CLOSE_UNRESPONSIVE: u32 = 4002;

/// Shared view of one monitored connection's health (latency for status tables) and the
/// peer's host vitals, as last received.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    inner: Arc<Mutex<PeerHealth>>,
    vitals: Arc<Mutex<Option<Received>>>,
    hook: Option<VitalsHook>,
}

/// Called with every reading of the peer's vitals as it arrives (see
/// [`Liveness::with_vitals_hook`]).
#[derive(Clone)]
struct VitalsHook(Arc<dyn Fn(Received) + Send + Sync>);

impl std::fmt::Debug for VitalsHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VitalsHook")
    }
}

impl Liveness {
    /// Median recent round trip.
    pub fn latency(&self) -> Option<Duration> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .median_rtt()
    }

    /// The peer's last host vitals, if it sent any.
    pub fn vitals(&self) -> Option<Received> {
        *self.vitals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Also calls `hook` with every reading of the peer's vitals as it arrives (after it is
    /// kept here, outside any lock of this type): a consumer that keeps its own view of many
    /// peers' vitals (the gateway's alert rows) updates one row per reading instead of
    /// reading every peer's vitals again.
    pub fn with_vitals_hook(mut self, hook: impl Fn(Received) + Send + Sync + 'static) -> Self {
        self.hook = Some(VitalsHook(Arc::new(hook)));
        self
    }

    fn set_vitals(&self, r: Received) {
        *self.vitals.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        if let Some(h) = &self.hook {
            (h.0)(r);
        }
    }
}

/// This side's vitals to send with the pings: a reading from `sampler` with the first ping
/// and every `every` pings after it.
#[derive(Debug, Clone)]
pub struct SendVitals {
    /// This host's sampler.
    pub sampler: VitalsSampler,
    /// Pings between two readings sent (at least 1).
    pub every: u64,
}

impl SendVitals {
    /// Whether ping number `seq` (from 1) carries vitals.
    pub fn due(&self, seq: u64) -> bool {
        seq.saturating_sub(1).is_multiple_of(self.every.max(1))
    }
}

/// Pings the peer every interval and closes the connection when it misses `threshold` in a
/// row; sends this host's vitals with the pings when `send` says so, and keeps the peer's in
/// `live`. Returns when the connection is closed (by either side).
pub async fn monitor(
    conn: Connection,
    cfg: HealthConfig,
    live: Liveness,
    send: Option<SendVitals>,
) {
    {
        live.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .link_up();
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let offline = {
                    let mut h = live.inner.lock().unwrap_or_else(|p| p.into_inner());
                    h.ping_sent(seq, Instant::now());
                    h.status(&cfg) == Status::Offline
                };
                if offline {
                    let msg = format!("no answer to {} pings", cfg.unhealthy_threshold);
                    conn.close(VarInt::from_u32(CLOSE_UNRESPONSIVE), msg.as_bytes());
                    return;
                }
                if let Ok(b) = frame::encode_datagram(&Datagram::Ping { seq }) {
                    let _ = conn.send_datagram(b.into());
                }
                if let Some(s) = send.as_ref().filter(|s| s.due(seq)) {
                    if let Ok(b) = frame::encode_datagram(&Datagram::Vitals(s.sampler.current())) {
                        let _ = conn.send_datagram(b.into());
                    }
                }
            }
            dg = conn.read_datagram() => {
                let Ok(bytes) = dg else { return };
                match frame::decode_datagram::<Datagram>(&bytes) {
                    Ok(Datagram::Pong { seq }) => {
                        live.inner.lock().unwrap_or_else(|p| p.into_inner()).pong(seq, Instant::now());
                    }
                    Ok(Datagram::Ping { seq } | Datagram::LinkPing { seq, .. }) => {
                        if let Ok(b) = frame::encode_datagram(&Datagram::Pong { seq }) {
                            let _ = conn.send_datagram(b.into());
                        }
                    }
                    Ok(Datagram::Vitals(v)) => live.set_vitals(Received::now(v, Duration::ZERO)),
                    Err(_) => {}
                }
            }
        }
    }
}

/// Answers the peer's pings until the connection closes.
pub async fn answer(conn: Connection) {
    while let Ok(bytes) = conn.read_datagram().await {
        if let Ok(Datagram::Ping { seq }) = frame::decode_datagram::<Datagram>(&bytes) {
            if let Ok(b) = frame::encode_datagram(&Datagram::Pong { seq }) {
                let _ = conn.send_datagram(b.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_vitals_hook_sees_every_reading_after_it_is_kept() {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let live = Liveness::default();
        let probe = live.clone();
        let live = live.with_vitals_hook(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let r = Received::now(crate::vitals::Vitals::default(), Duration::ZERO);
        live.set_vitals(r);
        live.set_vitals(r);
        assert_eq!(seen.load(Ordering::Relaxed), 2);
        // The reading is kept (shared with clones made before the hook was set).
        assert_eq!(probe.vitals(), Some(r));
    }
}
