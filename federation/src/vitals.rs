//! Host vitals: how the machine under a gateway or a node is doing (load average, CPU use,
//! memory use, disk use of the filesystem holding the state dir, uptime), read from `/proc`
//! and `statvfs(3)`, never from a spawned command.
//!
//! A [`Vitals`] is small and fixed in shape (no strings, no lists): at most
//! [`MAX_ENCODED`] bytes in postcard, so it rides in the health datagrams every
//! [`VITALS_EVERY`] pings ([`crate::wire::Datagram::Vitals`]). A gateway relays the vitals of
//! its nodes to the other gateways ([`crate::wire::Event::NodeVitals`]), so any gateway can
//! show (and export) the whole federation's.
//!
//! The JSON shape, used by `gateway.status` (each gateway's `vitals`) and `node.list` (each
//! node's `vitals`), is [`Vitals::to_json`]; `null` where none are known (a classic WebSocket
//! node, an older peer, a peer not heard from yet).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::identity::DeviceId;

/// Vitals go out with every third health ping (and with the first). At the default 10 s
/// interval that is every 30 s: alarms are about minutes of high CPU and Prometheus scrapes
/// every 15 to 60 s, so a finer grain would add bytes and no decisions; a coarser one would
/// make a CPU average lag an alarm's window.
pub const VITALS_EVERY: u64 = 3;

/// Largest postcard encoding of a [`Vitals`] (every varint at its widest, every option set):
/// a single datagram, far under QUIC's 1200-byte minimum datagram size.
pub const MAX_ENCODED: usize = 96;

/// Two readings closer than this share one: several links asking in the same tick get the
/// same answer, and `/proc/stat` counts in 10 ms ticks, so a CPU share over less than a
/// second would be coarse.
const MIN_RESAMPLE: Duration = Duration::from_secs(1);

/// Most node vitals one gateway relays in one event: its node bound
/// ([`crate::directory::MAX_NODES_PER_GATEWAY`]).
pub const MAX_RELAYED: usize = crate::directory::MAX_NODES_PER_GATEWAY;

/// A capacity and how much of it is used and available, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Total size.
    pub total_kib: u64,
    /// In use.
    pub used_kib: u64,
    /// Available to an ordinary process (memory: `MemAvailable`; disk: blocks free to
    /// non-root users).
    pub available_kib: u64,
}

impl Capacity {
    /// The share in use, in percent, as `free -h` and `df -h` would put it: memory
    /// `used / total`; disk `used / (used + available)` (root's reserve not counted).
    pub fn used_pct(&self, disk: bool) -> Option<f64> {
        let whole = if disk {
            self.used_kib.saturating_add(self.available_kib)
        } else {
            self.total_kib
        };
        (whole > 0).then(|| round1(self.used_kib as f64 * 100.0 / whole as f64))
    }
}

/// One reading of a host's vitals. Every part is optional: a host without `/proc` (or a
/// state dir on a filesystem that refuses `statvfs`) reports what it can.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vitals {
    /// Load averages over 1, 5 and 15 minutes, in hundredths.
    pub load_centi: Option<[u32; 3]>,
    /// Online CPUs (to read the load against).
    pub cpus: u16,
    /// Busy share of all CPUs since the previous reading, in tenths of a percent (0..=1000).
    pub cpu_permille: Option<u16>,
    /// Memory (`MemTotal`, `MemAvailable`).
    pub mem: Option<Capacity>,
    /// The filesystem holding the state dir.
    pub disk: Option<Capacity>,
    /// Seconds since the host booted.
    pub uptime_s: Option<u64>,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

impl Vitals {
    /// CPU use in percent.
    pub fn cpu_pct(&self) -> Option<f64> {
        self.cpu_permille.map(|p| f64::from(p) / 10.0)
    }

    /// Memory use in percent.
    pub fn mem_pct(&self) -> Option<f64> {
        self.mem.and_then(|m| m.used_pct(false))
    }

    /// Disk use in percent.
    pub fn disk_pct(&self) -> Option<f64> {
        self.disk.and_then(|d| d.used_pct(true))
    }

    /// Load averages (1, 5, 15 minutes).
    pub fn load(&self) -> Option<[f64; 3]> {
        self.load_centi.map(|l| l.map(|c| f64::from(c) / 100.0))
    }

    /// The JSON of `gateway.status` and `node.list`: `ageMs` is how long ago the reading was
    /// taken, as far as this gateway knows.
    pub fn to_json(&self, age: Duration) -> Value {
        let load = self.load();
        json!({
            "load1": load.map(|l| l[0]),
            "load5": load.map(|l| l[1]),
            "load15": load.map(|l| l[2]),
            "cpus": self.cpus,
            "cpuPct": self.cpu_pct(),
            "memPct": self.mem_pct(),
            "memTotalBytes": self.mem.map(|m| m.total_kib.saturating_mul(1024)),
            "memAvailableBytes": self.mem.map(|m| m.available_kib.saturating_mul(1024)),
            "diskPct": self.disk_pct(),
            "diskTotalBytes": self.disk.map(|d| d.total_kib.saturating_mul(1024)),
            "diskAvailableBytes": self.disk.map(|d| d.available_kib.saturating_mul(1024)),
            "uptimeS": self.uptime_s,
            "ageMs": u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// Vitals as received, with when (for their age).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The reading.
    pub vitals: Vitals,
    /// When the reading was taken, on this host's monotonic clock (arrival minus the age the
    /// sender reported).
    pub at: Instant,
}

impl Received {
    /// A reading that arrived now and was `age` old on arrival.
    pub fn now(vitals: Vitals, age: Duration) -> Self {
        let now = Instant::now();
        Received {
            vitals,
            at: now.checked_sub(age).unwrap_or(now),
        }
    }

    /// How old the reading is.
    pub fn age(&self) -> Duration {
        self.at.elapsed()
    }

    /// [`Vitals::to_json`] with this reading's age.
    pub fn to_json(&self) -> Value {
        self.vitals.to_json(self.age())
    }
}

/// One node's vitals as its gateway relays them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeVitals {
    /// The node.
    pub node: DeviceId,
    /// Its last reading.
    pub vitals: Vitals,
    /// How old the reading was when relayed, in ms.
    pub age_ms: u32,
}

/// Cumulative CPU time from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// All time (user through steal; guest time is already inside user).
    pub total: u64,
    /// Idle and I/O wait.
    pub idle: u64,
}

impl CpuTimes {
    /// Busy share between `earlier` and `self`, in tenths of a percent; `None` when no time
    /// passed (or the counters went backwards).
    pub fn busy_permille_since(&self, earlier: &CpuTimes) -> Option<u16> {
        let total = self.total.checked_sub(earlier.total)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        if total == 0 {
            return None;
        }
        let busy = total.saturating_sub(idle);
        u16::try_from(busy.saturating_mul(1000) / total).ok()
    }
}

/// The three load averages of `/proc/loadavg`, in hundredths.
pub fn parse_loadavg(text: &str) -> Option<[u32; 3]> {
    let mut it = text.split_ascii_whitespace().map(centi);
    Some([it.next()??, it.next()??, it.next()??])
}

/// `"1.25"` as 125; load averages have two decimals.
fn centi(s: &str) -> Option<u32> {
    let x: f64 = s.parse().ok()?;
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    // Bounded: a load of 42 million would saturate, not wrap.
    Some((x * 100.0).round().min(f64::from(u32::MAX)) as u32)
}

/// The aggregate `cpu` line of `/proc/stat`, and how many `cpuN` lines follow it.
pub fn parse_stat(text: &str) -> Option<(CpuTimes, u16)> {
    let mut times = None;
    let mut cpus: u16 = 0;
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        match f.next() {
            Some("cpu") => {
                let v: Vec<u64> = f.take(8).map(|x| x.parse().unwrap_or(0)).collect();
                let at = |i: usize| v.get(i).copied().unwrap_or(0);
                // user nice system idle iowait irq softirq steal
                let total = v.iter().fold(0u64, |a, x| a.saturating_add(*x));
                times = Some(CpuTimes {
                    total,
                    idle: at(3).saturating_add(at(4)),
                });
            }
            Some(name) if name.starts_with("cpu") => cpus = cpus.saturating_add(1),
            _ => {}
        }
    }
    times.map(|t| (t, cpus))
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo` (in kB, which the kernel means as KiB).
pub fn parse_meminfo(text: &str) -> Option<Capacity> {
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let mut f = line.split_ascii_whitespace();
        let slot = match f.next() {
            Some("MemTotal:") => &mut total,
            Some("MemAvailable:") => &mut available,
            _ => continue,
        };
        *slot = f.next().and_then(|v| v.parse::<u64>().ok());
    }
    let (total_kib, available_kib) = (total?, available?);
    Some(Capacity {
        total_kib,
        used_kib: total_kib.saturating_sub(available_kib),
        available_kib: available_kib.min(total_kib),
    })
}

/// Whole seconds since boot, from `/proc/uptime`.
pub fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_ascii_whitespace().next()?;
    let secs: f64 = first.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs as u64)
}

/// Size, use and room of the filesystem holding `path`.
// The block counts are u32 on some 32-bit targets (a Raspberry Pi node), u64 here.
#[allow(clippy::useless_conversion)]
pub fn disk_of(path: &Path) -> Option<Capacity> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let unit = u64::from(s.fragment_size()).max(1);
    let kib = |blocks: u64| blocks.saturating_mul(unit) / 1024;
    let (blocks, free, avail) = (
        u64::from(s.blocks()),
        u64::from(s.blocks_free()),
        u64::from(s.blocks_available()),
    );
    Some(Capacity {
        total_kib: kib(blocks),
        used_kib: kib(blocks.saturating_sub(free)),
        available_kib: kib(avail),
    })
}

struct SamplerState {
    proc_root: PathBuf,
    disk_path: PathBuf,
    prev_cpu: Option<CpuTimes>,
    last: Option<(Instant, Vitals)>,
}

impl SamplerState {
    fn read(&self, name: &str) -> Option<String> {
        // These files are a few hundred bytes to a few KiB; the kernel builds them on read.
        std::fs::read_to_string(self.proc_root.join(name)).ok()
    }

    fn sample(&mut self) -> Vitals {
        let stat = self.read("stat").and_then(|t| parse_stat(&t));
        let cpu_permille = match (&stat, &self.prev_cpu) {
            (Some((now, _)), Some(prev)) => now.busy_permille_since(prev),
            _ => None,
        };
        if let Some((now, _)) = stat {
            self.prev_cpu = Some(now);
        }
        Vitals {
            load_centi: self.read("loadavg").and_then(|t| parse_loadavg(&t)),
            cpus: stat.map(|(_, n)| n).unwrap_or(0),
            cpu_permille,
            mem: self.read("meminfo").and_then(|t| parse_meminfo(&t)),
            disk: disk_of(&self.disk_path),
            uptime_s: self.read("uptime").and_then(|t| parse_uptime(&t)),
        }
    }
}

/// This host's vitals, read on demand (at most once a second, see `MIN_RESAMPLE`); CPU use
/// is the share since the previous reading. Cheap to clone: one sampler per process.
#[derive(Clone)]
pub struct VitalsSampler {
    inner: Arc<Mutex<SamplerState>>,
}

impl std::fmt::Debug for VitalsSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VitalsSampler")
    }
}

impl VitalsSampler {
    /// A sampler of this host, with disk use of the filesystem holding `state_dir`. Takes a
    /// first CPU reading now, so the first vitals sent already carry a CPU share.
    pub fn new(state_dir: &Path) -> Self {
        Self::with_proc_root(Path::new("/proc"), state_dir)
    }

    /// A sampler reading `proc_root` instead of `/proc` (tests use fixtures).
    pub fn with_proc_root(proc_root: &Path, state_dir: &Path) -> Self {
        let st = SamplerState {
            proc_root: proc_root.to_path_buf(),
            disk_path: state_dir.to_path_buf(),
            prev_cpu: None,
            last: None,
        };
        let prev_cpu = st.read("stat").and_then(|t| parse_stat(&t)).map(|s| s.0);
        VitalsSampler {
            inner: Arc::new(Mutex::new(SamplerState { prev_cpu, ..st })),
        }
    }

    /// The current vitals: the last reading if it is under a second old, a new one otherwise.
    pub fn current(&self) -> Vitals {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = st.last {
            if at.elapsed() < MIN_RESAMPLE {
                return v;
            }
        }
        let v = st.sample();
        st.last = Some((Instant::now(), v));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_1: &str = "cpu  1000 0 500 8000 500 0 0 0 0 0\n\
        cpu0 500 0 250 4000 250 0 0 0 0 0\n\
        cpu1 500 0 250 4000 250 0 0 0 0 0\n\
        intr 12345\nctxt 999\n";
    const STAT_2: &str = "cpu  1600 0 700 8700 500 0 0 0 0 0\n\
        cpu0 800 0 350 4350 250 0 0 0 0 0\n\
        cpu1 800 0 350 4350 250 0 0 0 0 0\n";
    const MEMINFO: &str = "MemTotal:        8000000 kB\n\
        MemFree:          100000 kB\n\
        MemAvailable:    2000000 kB\n\
        Buffers:           10000 kB\n";

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_loadavg("0.52 1.07 12.30 2/345 6789\n"),
            Some([52, 107, 1230])
        );
        assert_eq!(parse_loadavg("0.5 nope 1"), None);
        assert_eq!(parse_loadavg(""), None);
        let (t1, cpus) = parse_stat(STAT_1).unwrap();
        assert_eq!(cpus, 2);
        assert_eq!(
            t1,
            CpuTimes {
                total: 10_000,
                idle: 8_500
            }
        );
        let (t2, _) = parse_stat(STAT_2).unwrap();
        // 1500 ticks passed, 700 of them idle: 800/1500 busy.
        assert_eq!(t2.busy_permille_since(&t1), Some(533));
        assert_eq!(t1.busy_permille_since(&t2), None, "counters never go back");
        assert_eq!(t1.busy_permille_since(&t1), None, "no time, no share");
        assert_eq!(parse_stat("intr 1\n"), None);
        let mem = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(mem.total_kib, 8_000_000);
        assert_eq!(mem.used_kib, 6_000_000);
        assert_eq!(mem.used_pct(false), Some(75.0));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350_735));
        assert_eq!(parse_uptime("-1 2"), None);
        assert_eq!(parse_uptime("garbage"), None);
    }

    #[test]
    fn disk_percent_is_dfs() {
        // df: used / (used + available), root's reserve left out.
        let d = Capacity {
            total_kib: 1000,
            used_kib: 450,
            available_kib: 500,
        };
        assert_eq!(d.used_pct(true), Some(47.4));
        assert_eq!(Capacity::default().used_pct(true), None);
    }

    #[test]
    fn sampler_reads_a_fixture_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("stat"), STAT_1).unwrap();
        std::fs::write(root.join("loadavg"), "0.25 0.50 0.75 1/2 3\n").unwrap();
        std::fs::write(root.join("meminfo"), MEMINFO).unwrap();
        std::fs::write(root.join("uptime"), "42.9 1.0\n").unwrap();
        let s = VitalsSampler::with_proc_root(root, root);
        std::fs::write(root.join("stat"), STAT_2).unwrap();
        let v = s.current();
        assert_eq!(v.load_centi, Some([25, 50, 75]));
        assert_eq!(v.cpus, 2);
        assert_eq!(v.cpu_permille, Some(533));
        assert_eq!(v.mem_pct(), Some(75.0));
        assert_eq!(v.uptime_s, Some(42));
        let disk = v.disk.expect("statvfs of a temp dir");
        assert!(disk.total_kib > 0 && disk.used_kib <= disk.total_kib);
        // Within a second, the same reading.
        assert_eq!(s.current(), v);
        let j = v.to_json(Duration::from_millis(1500));
        assert_eq!(j["load1"], 0.25);
        assert_eq!(j["cpuPct"], 53.3);
        assert_eq!(j["memPct"], 75.0);
        assert_eq!(j["memTotalBytes"], 8_192_000_000u64);
        assert_eq!(j["uptimeS"], 42);
        assert_eq!(j["ageMs"], 1500);
        // A root without the files: nothing made up.
        let empty = tempfile::tempdir().unwrap();
        let v = VitalsSampler::with_proc_root(empty.path(), empty.path()).current();
        assert_eq!(
            (v.load_centi, v.cpu_permille, v.mem, v.uptime_s),
            (None, None, None, None)
        );
        assert!(v.to_json(Duration::ZERO)["cpuPct"].is_null());
    }

    #[test]
    fn encoding_is_bounded() {
        let widest = Capacity {
            total_kib: u64::MAX,
            used_kib: u64::MAX,
            available_kib: u64::MAX,
        };
        let v = Vitals {
            load_centi: Some([u32::MAX; 3]),
            cpus: u16::MAX,
            cpu_permille: Some(u16::MAX),
            mem: Some(widest),
            disk: Some(widest),
            uptime_s: Some(u64::MAX),
        };
        let bytes = postcard::to_allocvec(&v).unwrap();
        assert!(bytes.len() <= MAX_ENCODED, "{} bytes", bytes.len());
        let back: Vitals = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, v);
        // A real host's reading is a few dozen bytes.
        let here = VitalsSampler::new(Path::new("/")).current();
        assert!(postcard::to_allocvec(&here).unwrap().len() <= MAX_ENCODED);
    }
}
