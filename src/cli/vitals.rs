//! Host vitals as table columns (`gateway status`, `nodes status`): compact cells rendered
//! from the `vitals` object of the status JSON
//! ([`clawmesh_federation::vitals::Vitals::to_json`]).

use serde_json::Value;

/// Column titles, in the order of [`cells`].
pub const HEADERS: [&str; 5] = ["LOAD", "CPU", "MEM", "DISK", "UP"];

/// The five cells for one row: 1-minute load, CPU %, memory %, disk %, uptime. `-` where
/// nothing is known: a classic WebSocket node, an older peer, or `shown` false (an offline
/// gateway or a disconnected node, whose last reading would mislead).
pub fn cells(vitals: &Value, shown: bool) -> [String; 5] {
    let v = vitals.as_object().filter(|_| shown);
    let num = |k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_f64);
    let pct = |k: &str| num(k).map_or("-".to_string(), |x| format!("{x:.0}%"));
    [
        num("load1").map_or("-".to_string(), |x| format!("{x:.2}")),
        pct("cpuPct"),
        pct("memPct"),
        pct("diskPct"),
        num("uptimeS").map_or("-".to_string(), |s| uptime(s as u64)),
    ]
}

/// `45s`, `12m`, `5h12m`, `3d4h`: two units at most.
pub fn uptime(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_are_compact_and_dashes_when_unknown() {
        let v = json!({"load1": 0.5, "cpuPct": 12.34, "memPct": 45.0, "diskPct": null,
                       "uptimeS": 273_600});
        assert_eq!(cells(&v, true), ["0.50", "12%", "45%", "-", "3d4h"]);
        assert_eq!(cells(&v, false), ["-", "-", "-", "-", "-"]);
        assert_eq!(cells(&Value::Null, true), ["-", "-", "-", "-", "-"]);
        assert_eq!(uptime(45), "45s");
        assert_eq!(uptime(18_720), "5h12m");
    }
}
