//! Health of one peer as seen from here: round-trip times and missed pings.
//!
//! A ping goes out on every link each health interval. A ping whose pong has not come back by
//! the next tick counts as missed; after `unhealthy_threshold` misses in a row the peer is
//! offline. Any pong resets the count. The peer keeps its last-seen time while offline.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// How many recent round trips are kept for the median and p99 shown in status.
const RTT_WINDOW: usize = 64;

/// Health settings (`gateway.failover.healthCheckInterval` / `unhealthyThreshold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between pings.
    pub interval: Duration,
    /// Missed pings in a row before a peer is offline.
    pub unhealthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_millis(10_000),
            unhealthy_threshold: 3,
        }
    }
}

/// The health verdict shown by `gateway status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Link up, answering every ping.
    Healthy,
    /// Link up but missing pings, or reporting part of the mesh unreachable.
    Degraded,
    /// Link down, or `unhealthy_threshold` pings missed in a row.
    Offline,
}

impl Status {
    /// Lowercase name, as in the JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Offline => "offline",
        }
    }
}

/// Everything known about one peer's health.
#[derive(Debug, Clone)]
pub struct PeerHealth {
    link_up: bool,
    missed: u32,
    outstanding: Option<(u64, Instant)>,
    last_seen: Option<SystemTime>,
    /// Recent round trips in microseconds (4 bytes each, not a 16-byte `Duration`: a gateway
    /// keeps one window per attached node; a round trip over 71 minutes is stored as 71 min).
    rtts: VecDeque<u32>,
}

impl Default for PeerHealth {
    fn default() -> Self {
        PeerHealth {
            link_up: false,
            missed: 0,
            outstanding: None,
            last_seen: None,
            rtts: VecDeque::with_capacity(RTT_WINDOW),
        }
    }
}

impl PeerHealth {
    /// A link to the peer came up: it is alive now.
    pub fn link_up(&mut self) {
        self.link_up = true;
        self.missed = 0;
        self.outstanding = None;
        self.last_seen = Some(SystemTime::now());
    }

    /// The link went down.
    pub fn link_down(&mut self) {
        self.link_up = false;
        self.outstanding = None;
    }

    /// A ping with `seq` is about to be sent. If the previous one is still unanswered, it
    /// counts as missed.
    pub fn ping_sent(&mut self, seq: u64, now: Instant) {
        if self.outstanding.is_some() {
            self.missed = self.missed.saturating_add(1);
        }
        self.outstanding = Some((seq, now));
    }

    /// A pong arrived; returns the round trip if it answers the outstanding ping.
    pub fn pong(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        let (want, sent) = self.outstanding?;
        if want != seq {
            return None;
        }
        let rtt = now.saturating_duration_since(sent);
        self.outstanding = None;
        self.missed = 0;
        self.last_seen = Some(SystemTime::now());
        if self.rtts.len() == RTT_WINDOW {
            self.rtts.pop_front();
        }
        self.rtts
            .push_back(u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX));
        Some(rtt)
    }

    /// The verdict under `cfg`.
    pub fn status(&self, cfg: &HealthConfig) -> Status {
        if !self.link_up || self.missed >= cfg.unhealthy_threshold {
            Status::Offline
        } else if self.missed > 0 {
            Status::Degraded
        } else {
            Status::Healthy
        }
    }

    /// Missed pings in a row.
    pub fn missed(&self) -> u32 {
        self.missed
    }

    /// Whether a link is up.
    pub fn is_link_up(&self) -> bool {
        self.link_up
    }

    /// When the peer last answered (or linked).
    pub fn last_seen(&self) -> Option<SystemTime> {
        self.last_seen
    }

    /// Latest round trip.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.rtts.back().map(|&us| micros(us))
    }

    /// Median of the recent round trips.
    pub fn median_rtt(&self) -> Option<Duration> {
        percentile(&self.rtts, 50)
    }

    /// 99th percentile of the recent round trips.
    pub fn p99_rtt(&self) -> Option<Duration> {
        percentile(&self.rtts, 99)
    }
}

fn micros(us: u32) -> Duration {
    Duration::from_micros(u64::from(us))
}

fn percentile(samples: &VecDeque<u32>, p: usize) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<u32> = samples.iter().copied().collect();
    v.sort_unstable();
    let idx = ((v.len() - 1) * p) / 100;
    v.get(idx).map(|&us| micros(us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_after_threshold_missed_pings() {
        let cfg = HealthConfig {
            interval: Duration::from_millis(100),
            unhealthy_threshold: 3,
        };
        let mut h = PeerHealth::default();
        assert_eq!(h.status(&cfg), Status::Offline);
        h.link_up();
        let t = Instant::now();
        h.ping_sent(1, t);
        assert_eq!(
            h.pong(1, t + Duration::from_millis(5)),
            Some(Duration::from_millis(5))
        );
        assert_eq!(h.status(&cfg), Status::Healthy);
        h.ping_sent(2, t);
        h.ping_sent(3, t);
        assert_eq!(h.status(&cfg), Status::Degraded);
        h.ping_sent(4, t);
        h.ping_sent(5, t);
        assert_eq!(h.status(&cfg), Status::Offline);
        assert!(h.last_seen().is_some());
        // A stale pong does not revive it; the right one does.
        assert_eq!(h.pong(2, t), None);
        assert!(h.pong(5, t).is_some());
        assert_eq!(h.status(&cfg), Status::Healthy);
        h.link_down();
        assert_eq!(h.status(&cfg), Status::Offline);
    }
}
