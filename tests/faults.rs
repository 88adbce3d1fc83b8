//! Faults in the rare orders of events (issue 11), with real gateway processes behind the UDP
//! delay relay:
//!
//! - a voter frozen (SIGSTOP) for 3.5 s and resumed does not start a new term while the
//!   primary is healthy: no flapping;
//!
//! The tests of this file run one at a time (each starts several gateways).

mod common;

#[path = "common/faults.rs"]
mod faults;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use faults::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The term `dir`'s gateway is in.
fn term(dir: &std::path::Path) -> Option<u64> {
    consensus(dir)["term"].as_u64()
}

#[test]
fn a_stalled_voter_does_not_depose_a_healthy_primary() {
    let _serial = serial();
    let mut c = Cluster::start(3, 300);
    let tokyo = c.dir(0).to_path_buf();
    assert_eq!(primary(&tokyo).as_deref(), Some("tokyo"), "{}", c.report());
    let before = term(&tokyo).expect("tokyo answers");
    let mut samples = Vec::new();
    for round in 0..3 {
        // Beijing twice, then Frankfurt: either follower may be the one that stalls.
        let victim = if round < 2 { 1 } else { 2 };
        c.pause(victim);
        let paused = Instant::now();
        while paused.elapsed() < Duration::from_millis(3500) {
            samples.push(primary(&tokyo));
            std::thread::sleep(Duration::from_millis(300));
        }
        c.resume(victim);
        let back = common::wait_until(Duration::from_secs(20), || {
            samples.push(primary(&tokyo));
            c.converged()
        });
        assert!(back, "round {round}: no convergence: {}", c.report());
        for i in 0..3 {
            assert_eq!(
                term(c.dir(i)),
                Some(before),
                "round {round}: {} moved to another term after {} stalled: {}",
                c.name(i),
                c.name(victim),
                c.report()
            );
        }
    }
    let answered: Vec<&String> = samples.iter().flatten().collect();
    assert!(!answered.is_empty());
    let others: Vec<&&String> = answered.iter().filter(|p| p.as_str() != "tokyo").collect();
    assert!(
        others.is_empty(),
        "tokyo was not the primary in {} of {} samples: {others:?}",
        others.len(),
        answered.len()
    );
}
