//! Helpers the benchmark examples share: Ctrl-C and bounded waits, latency statistics, `/proc`
//! readings (CPU, memory, process trees), waiting for a quiet machine, child processes that
//! are always stopped, bounded CLI runs, the machine description, the `clawmesh` binary and its
//! commands, the classic OpenClaw stack, and the in-process WAN relay.
//!
//! Each bench includes it with
//!
//! ```text
//! #[path = "support/mod.rs"]
//! #[allow(dead_code)]
//! mod support;
//! ```
//!
//! (cargo does not build a directory without `main.rs` as an example). A bench that includes
//! it defines `const BENCH: &str` at its root, its example name (`bench_consensus`): the
//! environment variables read here are `BENCH_CONSENSUS_QUIET_SECS`, `…_LOG` and `…_KEEP`, and
//! temp dirs and log headers carry the name.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clawmesh::sim::relay::WanRelay;
use futures_util::future::LocalBoxFuture;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The bench's environment variable `BENCH_<NAME>_<what>` (e.g. `BENCH_CONSENSUS_KEEP`).
pub fn bench_env(what: &str) -> String {
    format!("{}_{what}", crate::BENCH.to_uppercase())
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C and interruptible sleeps

/// Set on Ctrl-C: every wait and loop checks it and unwinds (which stops the processes).
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Fails with "interrupted" once Ctrl-C was pressed.
pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sets [`STOP`] on Ctrl-C, from a thread of its own (so it works whatever runtime, if any,
/// the bench drives): the bench then stops at its next check, stops its processes and removes
/// its temp dirs on the way out.
pub fn install_ctrl_c() {
    std::thread::spawn(|| {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("interrupted: stopping");
                    STOP.store(true, Ordering::Relaxed);
                }
            });
        }
    });
}

/// Longest slice of an interruptible sleep: how late a Ctrl-C may be noticed.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

/// Sleeps `d` (async) in slices of at most 50 ms against one deadline, failing early on
/// Ctrl-C. The deadline is absolute, so the slicing adds no drift: a measured window (an idle
/// window of bytes on the wire) is `d` long as with one sleep.
pub async fn sleep(d: Duration) -> Result<()> {
    let end = tokio::time::Instant::now() + d;
    loop {
        check_stop()?;
        let now = tokio::time::Instant::now();
        if now >= end {
            return Ok(());
        }
        tokio::time::sleep_until(end.min(now + SLEEP_SLICE)).await;
    }
}

/// [`sleep`] for code that runs outside an async runtime (blocks the thread).
pub fn sleep_blocking(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(SLEEP_SLICE));
    }
}

/// Polls `f` every `every` until it returns `Some`, or fails after `deadline` (with the last
/// error `f` returned, if any): every wait for a state the bench cannot drive itself is
/// bounded this way, each caller saying why its deadline.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, every: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let t = Instant::now();
    let mut last_err = None;
    loop {
        check_stop()?;
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if t.elapsed() > deadline {
            return Err(not_within(what, deadline, last_err));
        }
        sleep(every).await?;
    }
}

/// [`poll`] with a blocking `f`, outside an async runtime.
pub fn poll_blocking<T>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let t = Instant::now();
    let mut last_err = None;
    loop {
        check_stop()?;
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if t.elapsed() > deadline {
            return Err(not_within(what, deadline, last_err));
        }
        std::thread::sleep(every);
    }
}

/// The error of a poll that ran out of time.
fn not_within(what: &str, deadline: Duration, last_err: Option<anyhow::Error>) -> anyhow::Error {
    match last_err {
        Some(e) => e.context(format!("{what}: not within {deadline:?}")),
        None => anyhow!("{what}: not within {deadline:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Lat {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank quantiles: the ceil(p·n)-th smallest sample (`scripts/bench-classic.mjs` does
/// the same, so the classic baselines compare). Sorts `v`.
pub fn lat_stats(v: &mut [Duration]) -> Result<Lat> {
    if v.is_empty() {
        bail!("no samples");
    }
    v.sort_unstable();
    let n = v.len();
    let q = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1].as_secs_f64() * 1e3;
    let total: f64 = v.iter().map(Duration::as_secs_f64).sum();
    Ok(Lat {
        n,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        max: v[n - 1].as_secs_f64() * 1e3,
        mean: total / n as f64 * 1e3,
    })
}

/// Milliseconds for a report: `–` for NaN (not measured), `small_decimals` decimals below
/// 10 ms, one above.
pub fn ms_text(v: f64, small_decimals: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 10.0 {
        format!("{v:.small_decimals$} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// kB as MB with one decimal.
pub fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// /proc

/// /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
pub const TICKS_PER_SEC: f64 = 100.0;

/// Fields of `/proc/PID/stat` after the command name; index 0 is field 3 (state).
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Field `field` of `/proc/PID/stat` (numbered as in proc(5)), from [`stat_fields`].
pub fn stat_u64(f: &[String], field: usize) -> Option<u64> {
    f.get(field - 3)?.parse().ok()
}

/// Sum of the given `/proc/PID/stat` fields, 0 for a process that is gone.
fn stat_sum(pid: i32, fields: &[usize]) -> u64 {
    stat_fields(pid)
        .map(|f| fields.iter().filter_map(|&i| stat_u64(&f, i)).sum())
        .unwrap_or(0)
}

/// utime + stime of a live process, in ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    stat_sum(pid, &[14, 15])
}

/// utime + stime + cutime + cstime (the last two: reaped children such as CLI runs), in ticks.
pub fn cpu_ticks_with_reaped(pid: i32) -> u64 {
    stat_sum(pid, &[14, 15, 16, 17])
}

/// cutime + cstime of this process: CPU of children it has waited for, in ticks.
pub fn reaped_children_ticks() -> u64 {
    stat_sum(std::process::id() as i32, &[16, 17])
}

/// Start time (field 22): tells a process from a later one that reused its pid.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid).and_then(|f| stat_u64(&f, 22))
}

/// Every live process's children, from one scan of `/proc`.
fn children_map() -> HashMap<i32, Vec<i32>> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| stat_u64(&f, 4)) {
                children.entry(ppid as i32).or_default().push(p);
            }
        }
    }
    children
}

/// `pid` and its descendants in `children`, at most 10 000 (a bound on a runaway tree).
fn tree_in(children: &HashMap<i32, Vec<i32>>, pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 10_000 {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// `pid` and all its live descendants.
pub fn tree(pid: i32) -> Vec<i32> {
    tree_in(&children_map(), pid)
}

/// This process and all its live descendants.
pub fn my_tree() -> Vec<i32> {
    tree(std::process::id() as i32)
}

/// `/proc/PID/status` field in kB (or a plain count such as `Threads`).
pub fn status_field(pid: i32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Memory and descriptors of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kb: u64,
    pub hwm_kb: u64,
    pub anon_kb: u64,
    pub threads: u64,
    pub fds: usize,
}

/// [`Mem`] of a live process; an error once it is gone.
pub fn mem_of(pid: i32) -> Result<Mem> {
    let rss_kb = status_field(pid, "VmRSS").ok_or_else(|| anyhow!("pid {pid} is gone"))?;
    Ok(Mem {
        rss_kb,
        hwm_kb: status_field(pid, "VmHWM").unwrap_or(0),
        anon_kb: status_field(pid, "RssAnon").unwrap_or(0),
        threads: status_field(pid, "Threads").unwrap_or(0),
        fds: fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
    })
}

/// Sum of VmRSS over a process tree, in kB, and how many processes it has.
pub fn tree_rss_kb(pid: i32) -> (u64, usize) {
    let t = tree(pid);
    let n = t.len();
    (
        t.into_iter().filter_map(|p| status_field(p, "VmRSS")).sum(),
        n,
    )
}

/// (busy, total) jiffies of all CPUs from the first line of /proc/stat (idle + iowait = idle).
pub fn machine_jiffies() -> (u64, u64) {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// The 1-minute load average (NaN if unreadable).
pub fn loadavg1() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them.
pub fn loadavg3() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// A quiet machine

/// Quiet machine: 1-minute load average below this...
pub const QUIET_LOAD: f64 = 0.7;
/// ...or less than this share of the CPUs busy outside this benchmark.
pub const QUIET_FOREIGN: f64 = 0.10;

/// CPU ticks used by this benchmark's process tree, per pid (so exited ones drop out).
fn tree_ticks() -> HashMap<i32, u64> {
    my_tree()
        .into_iter()
        .map(|p| (p, cpu_ticks_with_reaped(p)))
        .collect()
}

/// A sample for measuring the CPU share used outside this benchmark.
pub struct CpuMark {
    jiffies: (u64, u64),
    mine: HashMap<i32, u64>,
}

impl CpuMark {
    /// Samples the machine's jiffies and this benchmark's process tree now.
    pub fn now() -> CpuMark {
        CpuMark {
            jiffies: machine_jiffies(),
            mine: tree_ticks(),
        }
    }

    /// Share of all CPUs busy with other processes since `self` (0..1).
    pub fn foreign_since(&self) -> f64 {
        let now = CpuMark::now();
        let total = now.jiffies.1.saturating_sub(self.jiffies.1);
        if total == 0 {
            return 0.0;
        }
        let busy = now.jiffies.0.saturating_sub(self.jiffies.0);
        let mine: u64 = now
            .mine
            .iter()
            .map(|(p, t)| t.saturating_sub(self.mine.get(p).copied().unwrap_or(*t)))
            .sum();
        (busy.saturating_sub(mine) as f64 / total as f64).clamp(0.0, 1.0)
    }
}

/// How busy the machine was around one measured phase.
#[derive(Debug, Clone, Copy)]
pub struct Quiet {
    pub waited: Duration,
    pub load_start: f64,
    pub foreign_start: f64,
    pub load_end: f64,
    pub foreign_during: f64,
}

/// Waits until the machine is quiet ([`QUIET_LOAD`] or [`QUIET_FOREIGN`], sampled over 2 s),
/// at most `max` (`BENCH_<NAME>_QUIET_SECS` overrides it): a busy machine skews every
/// figure, but a bench must end, so it measures anyway after that and says so. Returns the
/// mark for the phase (see [`end_quiet`]).
pub async fn wait_quiet(what: &str, max: Duration) -> Result<(Quiet, CpuMark)> {
    let max = std::env::var(bench_env("QUIET_SECS"))
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(max);
    let t = Instant::now();
    let mut logged = false;
    loop {
        let mark = CpuMark::now();
        sleep(Duration::from_secs(2)).await?;
        let foreign = mark.foreign_since();
        let load = loadavg1();
        let quiet = load < QUIET_LOAD || foreign < QUIET_FOREIGN;
        if quiet || t.elapsed() >= max {
            if !quiet {
                eprintln!(
                    "  {what}: machine still busy after {:.0} s (load {load:.2}, {:.0} % CPU \
                     outside this run); measuring anyway",
                    t.elapsed().as_secs_f64(),
                    foreign * 100.0
                );
            }
            return Ok((
                Quiet {
                    waited: t.elapsed(),
                    load_start: load,
                    foreign_start: foreign,
                    load_end: f64::NAN,
                    foreign_during: f64::NAN,
                },
                CpuMark::now(),
            ));
        }
        if !logged {
            eprintln!(
                "  {what}: waiting for a quiet machine (load {load:.2}, {:.0} % CPU outside this \
                 run)",
                foreign * 100.0
            );
            logged = true;
        }
    }
}

/// Completes `q` at the end of its phase: load average now, foreign CPU share since `mark`.
pub fn end_quiet(mut q: Quiet, mark: &CpuMark) -> Quiet {
    q.load_end = loadavg1();
    q.foreign_during = mark.foreign_since();
    q
}

/// One line on how busy the machine was around a phase, for the report.
pub fn quiet_text(q: &Quiet) -> String {
    format!(
        "load {:.2} → {:.2}; CPU outside this run {:.0} % before, {:.0} % during; waited {:.0} s",
        q.load_start,
        q.load_end,
        q.foreign_start * 100.0,
        q.foreign_during * 100.0,
        q.waited.as_secs_f64()
    )
}

// ---------------------------------------------------------------------------------------------
// Processes

/// How long a dropped [`Proc`] gets between SIGTERM and SIGKILL: a gateway's orderly shutdown
/// (bounded consensus shutdown, QUIC close) and a Node.js process's exit fit well inside; one
/// that takes longer hangs, and the bench must not.
const DROP_GRACE: Duration = Duration::from_secs(15);

/// A child process (and whatever descendants it starts), stopped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// Set once the process has exited (or cannot be waited for).
    done: Option<Option<ExitStatus>>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `log` (created afresh).
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> Result<Proc> {
        let f = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        Proc::spawn_to(name, cmd, log, f)
    }

    /// Spawns `cmd` with stdout and stderr appended to `log` after a line naming the start (a
    /// restarted gateway keeps one log).
    pub fn spawn_appending(name: &str, cmd: Command, log: &Path) -> Result<Proc> {
        let mut f = fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        writeln!(
            f,
            "=== {}: starting {name} at {} ===",
            crate::BENCH,
            humantime::format_rfc3339_millis(SystemTime::now())
        )?;
        Proc::spawn_to(name, cmd, log, f)
    }

    /// Spawns `cmd` with no stdin and stdout and stderr into `f` (the open `log`).
    fn spawn_to(name: &str, mut cmd: Command, log: &Path, f: fs::File) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawning {name} ({cmd:?})"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            done: None,
        })
    }

    /// Its pid (not reused while the child is not reaped).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether it has exited (reaping it if so; one that cannot be waited for counts as gone).
    pub fn exited(&mut self) -> bool {
        if self.done.is_none() {
            match self.child.try_wait() {
                Ok(Some(s)) => self.done = Some(Some(s)),
                Ok(None) => {}
                Err(_) => self.done = Some(None),
            }
        }
        self.done.is_some()
    }

    /// Fails with the log tail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if self.exited() {
            let status = match self.done {
                Some(Some(s)) => format!(" ({s})"),
                _ => String::new(),
            };
            bail!("{} exited early{status}:\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// SIGKILL at once and reap (the process alone, not its descendants): a crash.
    pub fn sigkill(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            self.done = Some(self.child.wait().ok());
        }
    }

    /// SIGTERM to the process and its descendants; SIGKILL to what is left after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        stop_all(std::slice::from_mut(self), grace);
    }

    /// The last 20 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// How often `needle` occurs in its log.
    pub fn log_count(&self, needle: &str) -> usize {
        fs::read_to_string(&self.log)
            .map(|t| t.matches(needle).count())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(DROP_GRACE);
    }
}

/// SIGTERM to every process and its descendants at once (so they shut down in parallel), then
/// SIGKILL to whatever is left after `grace`. A pid is only signalled while it is still the
/// process first seen (same start time), never a later process that reused it.
pub fn stop_all(procs: &mut [Proc], grace: Duration) {
    let children = children_map();
    let pids: Vec<Vec<(i32, Option<u64>)>> = procs
        .iter_mut()
        .map(|p| {
            if p.exited() {
                Vec::new()
            } else {
                tree_in(&children, p.pid())
                    .into_iter()
                    .map(|q| (q, start_time(q)))
                    .collect()
            }
        })
        .collect();
    let same = |(p, st): &(i32, Option<u64>)| st.is_some() && start_time(*p) == *st;
    for p in pids.iter().flatten().filter(|p| same(p)) {
        let _ = kill(Pid::from_raw(p.0), Signal::SIGTERM);
    }
    let t = Instant::now();
    loop {
        let roots_done = procs.iter_mut().all(|p| p.exited());
        if roots_done && !pids.iter().flatten().any(same) {
            return;
        }
        if t.elapsed() > grace {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (p, tree) in procs.iter_mut().zip(&pids) {
        let left: Vec<_> = tree.iter().filter(|q| same(q)).collect();
        if p.exited() && left.is_empty() {
            continue;
        }
        for q in left {
            let _ = kill(Pid::from_raw(q.0), Signal::SIGKILL);
        }
        p.sigkill();
        eprintln!("warning: {} did not stop within {grace:?}; killed", p.name);
    }
}

/// Runs a command to completion within `timeout` (stdout/stderr through files in `scratch`,
/// so a chatty command cannot block on a full pipe); returns (status, stdout, stderr). On
/// timeout or Ctrl-C the command and its descendants are killed.
pub fn run_bounded(
    mut cmd: Command,
    scratch: &Path,
    timeout: Duration,
) -> Result<(ExitStatus, String, String)> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let k = SEQ.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("cmd-{k}.out"));
    let err_path = scratch.join(format!("cmd-{k}.err"));
    let described = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawning {described}"))?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t.elapsed() > timeout || STOP.load(Ordering::Relaxed) {
            // Its descendants too (npm, node): they would otherwise outlive us.
            for p in tree(child.id() as i32).into_iter().rev() {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            let _ = child.wait();
            check_stop()?;
            bail!("{described} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    Ok((status, out, err))
}

/// Like [`run_bounded`], but a failure exit is an error; returns stdout.
pub fn run_ok(cmd: Command, scratch: &Path, timeout: Duration) -> Result<String> {
    let described = format!("{cmd:?}");
    let (status, out, err) = run_bounded(cmd, scratch, timeout)?;
    if !status.success() {
        bail!(
            "{described} failed ({status}): {}{}",
            err.trim(),
            out.trim()
        );
    }
    Ok(out)
}

/// Runs a CLI command to completion within `timeout` (async; killed if the wait is dropped or
/// times out); a failure exit is an error; returns stdout.
pub async fn run_cli(cmd: Command, timeout: Duration) -> Result<String> {
    let described = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| anyhow!("clawmesh {described} did not finish within {timeout:?}"))??;
    if !out.status.success() {
        bail!(
            "clawmesh {described} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A free TCP port on 127.0.0.1 (free when asked; a classic gateway binds it right after).
pub fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// Machine

/// What a benchmark ran on: CPUs, memory, kernel, rustc; every bench's report starts with it.
fn machine_base() -> Vec<(&'static str, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    vec![
        ("nproc", nproc),
        ("CPU", model),
        ("memory", mem),
        ("kernel", kernel),
        ("rustc", rustc),
    ]
}

/// The short commit of the source tree, "+ uncommitted changes" if tracked files differ.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match (
        git(&["rev-parse", "--short", "HEAD"]),
        git(&["status", "--porcelain", "--untracked-files=no"]),
    ) {
        (Some(c), Some(st)) if st.is_empty() => c,
        (Some(c), Some(_)) => format!("{c} + uncommitted changes"),
        _ => "?".into(),
    }
}

/// The current UTC time to the second.
pub fn now_utc() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The machine table of a report: CPUs, memory, kernel, rustc, commit, date.
pub fn machine() -> Vec<(&'static str, String)> {
    let mut m = machine_base();
    m.push(("clawmesh commit (source tree at run time)", commit()));
    m.push(("date (UTC)", now_utc()));
    m
}

/// The machine table with the load average at the start in place of the commit.
pub fn machine_with_load() -> Vec<(&'static str, String)> {
    let mut m = machine_base();
    m.push(("load average at start", loadavg3()));
    m.push(("date (UTC)", now_utc()));
    m
}

// ---------------------------------------------------------------------------------------------
// clawmesh

/// Where the `clawmesh` binary is: `CLAWMESH_BIN`, else beside this example's directory.
pub fn clawmesh_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CLAWMESH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("cannot locate the target dir from {}", exe.display()))?;
    let bin = profile_dir.join("clawmesh");
    if !bin.is_file() {
        bail!(
            "{} not found: run `cargo build --release --bin clawmesh` first (with the same \
             CARGO_TARGET_DIR), or set CLAWMESH_BIN",
            bin.display()
        );
    }
    if exe.to_string_lossy().contains("/debug/") {
        eprintln!("warning: this is a debug build; run with --release for meaningful numbers");
    }
    Ok(bin)
}

/// Removes the environment that would change a clawmesh process's identity, token or logging
/// (the bench passes everything on the command line).
pub fn clawmesh_env(c: &mut Command) -> &mut Command {
    c.env_remove("RUST_LOG")
        .env_remove("CLAWMESH_TOKEN")
        .env_remove("CLAWMESH_NODE_TOKEN")
        .env_remove("CLAWMESH_STATE_DIR")
}

/// `clawmesh --state-dir DIR ARGS...` with the product's default logging
/// (`BENCH_<NAME>_LOG=FILTER` sets every process's log filter, for diagnostics, with
/// `BENCH_<NAME>_KEEP=1` where the bench has it to read the logs afterwards).
pub fn clawmesh_cmd<S: AsRef<OsStr>>(bin: &Path, dir: &Path, args: &[S]) -> Command {
    let mut c = Command::new(bin);
    c.arg("--state-dir").arg(dir);
    if let Ok(filter) = std::env::var(bench_env("LOG")) {
        c.arg("--log").arg(filter);
    }
    c.args(args);
    clawmesh_env(&mut c);
    c
}

/// `gateway.json` of the gateway in `dir` if the process `pid` wrote it (not a previous run's).
pub fn runtime_file(dir: &Path, pid: i32) -> Option<Value> {
    let text = fs::read_to_string(dir.join(clawmesh::state_dir::RUNTIME_FILE)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    (v["pid"] == pid).then_some(v)
}

/// The request id of `name`'s pending pairing request in `clawmesh devices list --json`.
pub fn pending_request(devices_list: &str, name: &str) -> Result<Option<String>> {
    let v: Value = serde_json::from_str(devices_list)?;
    Ok(v["pending"].as_array().and_then(|p| {
        p.iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["requestId"].as_str().map(str::to_string))
    }))
}

/// The node id of `name` if it is connected, from `clawmesh nodes status --json`.
pub fn attached_node(nodes_status: &str, name: &str) -> Result<Option<String>> {
    let v: Value = serde_json::from_str(nodes_status)?;
    Ok(v["nodes"].as_array().and_then(|ns| {
        ns.iter()
            .find(|n| n["name"] == name && n["connected"] == true)
            .and_then(|n| n["nodeId"].as_str().map(str::to_string))
    }))
}

/// Deadline of one clawmesh CLI run while pairing: it answers in milliseconds; 20 s covers a
/// loaded machine.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Approves node `name` on the gateway in `gw_dir` with the CLI and waits until it is
/// attached: polls `clawmesh devices list --json` every `every` for its pairing request,
/// runs `clawmesh devices approve`, then polls `clawmesh nodes status --json`; each wait at most
/// `deadline` (the caller's bound: how long its node takes to start and dial). `alive` runs
/// before each poll and fails once a process the pairing needs has exited. Returns the node id.
pub fn approve_node_cli(
    bin: &Path,
    gw_dir: &Path,
    scratch: &Path,
    name: &str,
    (deadline, every): (Duration, Duration),
    mut alive: impl FnMut() -> Result<()>,
) -> Result<String> {
    let cli = |args: &[&str]| run_ok(clawmesh_cmd(bin, gw_dir, args), scratch, CLI_TIMEOUT);
    let req = poll_blocking(
        &format!("pending pairing request of {name}"),
        deadline,
        every,
        || {
            alive()?;
            pending_request(&cli(&["devices", "list", "--json"])?, name)
        },
    )?;
    cli(&["devices", "approve", &req])?;
    poll_blocking(
        &format!("{name} attached after approval"),
        deadline,
        every,
        || {
            alive()?;
            attached_node(&cli(&["nodes", "status", "--json"])?, name)
        },
    )
}

/// A real gateway (`gateway run --name GW_NAME --primary --port 0` in `root/gw`) and a node
/// host (`node run --gateway quic://ADDR --name NODE_NAME --security full` in `root/node`),
/// each command built by `cmd(dir, args)`; the node approved with the CLI and attached.
/// Returns (gateway, node, gateway state dir, node id); both processes are stopped on error.
pub fn start_gateway_and_node(
    bin: &Path,
    root: &Path,
    (gw_name, node_name): (&str, &str),
    cmd: impl Fn(&Path, &[&str]) -> Result<Command>,
) -> Result<(Proc, Proc, PathBuf, String)> {
    let gw_dir = root.join("gw");
    let gw_args = [
        "gateway",
        "run",
        "--name",
        gw_name,
        "--primary",
        "--port",
        "0",
    ];
    let mut gw = Proc::spawn(
        "clawmesh gateway",
        cmd(&gw_dir, &gw_args)?,
        &root.join("gw.log"),
    )?;
    let gw_pid = gw.pid();
    // A start takes well under a second; 20 s covers a loaded machine, and a gateway that
    // exits meanwhile fails at once with its log.
    let addr = poll_blocking(
        "gateway.json",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            gw.ensure_running()?;
            Ok(runtime_file(&gw_dir, gw_pid).and_then(|v| Some(v["quic"].as_str()?.to_string())))
        },
    )?;
    let url = format!("quic://{addr}");
    let node_args = [
        "node",
        "run",
        "--gateway",
        &url,
        "--name",
        node_name,
        "--security",
        "full",
    ];
    let mut node = Proc::spawn(
        "clawmesh node",
        cmd(&root.join("node"), &node_args)?,
        &root.join("node.log"),
    )?;
    // The node starts and dials in well under a second; 30 s covers a loaded machine.
    let node_id = approve_node_cli(
        bin,
        &gw_dir,
        root,
        node_name,
        (Duration::from_secs(30), Duration::from_millis(100)),
        || node.ensure_running(),
    )?;
    Ok((gw, node, gw_dir, node_id))
}

// ---------------------------------------------------------------------------------------------
// The classic OpenClaw stack

/// Where the classic stack is installed: `CLASSIC_PREFIX`, else `~/.cache/clawmesh/classic`.
pub fn classic_prefix() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CLASSIC_PREFIX") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set"))?;
    Ok(PathBuf::from(home).join(".cache/clawmesh/classic"))
}

/// Longest run of `scripts/install-classic-client.sh`: the first install fetches Node and
/// openclaw from the npm registry (about a minute on a good link); a registry that is down
/// must not hang the bench.
const CLASSIC_INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// Installs (or finds) the classic stack with `scripts/install-classic-client.sh`; returns
/// (the `openclaw` wrapper, the prefix).
pub fn install_classic(scratch: &Path) -> Result<(PathBuf, PathBuf)> {
    let prefix = classic_prefix()?;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/install-classic-client.sh");
    let mut cmd = Command::new("bash");
    // TMPDIR: the script's `openclaw --version` check would otherwise leave a Node compile
    // cache in /tmp.
    cmd.arg(&script).arg(&prefix).env("TMPDIR", scratch);
    eprintln!(
        "classic: {} {} (about a minute the first time)",
        script.display(),
        prefix.display()
    );
    let out =
        run_ok(cmd, scratch, CLASSIC_INSTALL_TIMEOUT).context("installing the classic stack")?;
    let wrapper = out
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| anyhow!("install-classic-client.sh printed no wrapper path"))?;
    if !wrapper.is_file() {
        bail!("{} missing after install", wrapper.display());
    }
    Ok((wrapper, prefix))
}

/// A classic (`openclaw`, `node`) command with its own HOME, state dir and TMPDIR, and none of
/// the caller's OpenClaw settings.
pub fn classic_cmd(program: &Path, home: &Path, tmpdir: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("HOME", home)
        .env("OPENCLAW_STATE_DIR", home.join(".openclaw"))
        .env("TMPDIR", tmpdir)
        .env_remove("OPENCLAW_GATEWAY_TOKEN")
        .env_remove("OPENCLAW_GATEWAY_PASSWORD")
        .env_remove("OPENCLAW_PROFILE")
        .env_remove("NODE_OPTIONS");
    c
}

/// Prepares `home` for a classic process: `.openclaw/openclaw.json` holding `config` with file
/// logs into `home/openclaw-file.log` (instead of /tmp/openclaw, which would outlive the run).
pub fn classic_home(home: &Path, mut config: Value) -> Result<()> {
    fs::create_dir_all(home.join(".openclaw"))?;
    config["logging"] = json!({"file": home.join("openclaw-file.log")});
    fs::write(
        home.join(".openclaw/openclaw.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

/// `openclaw gateway run` on 127.0.0.1:`port` with token auth, in its own `home` (the config
/// of `classic-protocol.md` §11; loopback device pairing left at its default, silent).
pub fn classic_gateway_cmd(
    oc: &Path,
    home: &Path,
    tmpdir: &Path,
    port: u16,
    token: &str,
) -> Result<Command> {
    fs::create_dir_all(tmpdir)?;
    classic_home(
        home,
        json!({"gateway": {
            "mode": "local", "port": port, "bind": "loopback",
            "auth": {"mode": "token", "token": token},
        }}),
    )?;
    let mut cmd = classic_cmd(oc, home, tmpdir);
    let port = port.to_string();
    cmd.args(["gateway", "run", "--bind", "loopback", "--port", &port])
        .arg("--allow-unconfigured");
    Ok(cmd)
}

/// `openclaw node run` against the gateway on 127.0.0.1:`port` as `name`, in its own `home`
/// (the token goes in the environment, where the classic node host reads it).
pub fn classic_node_cmd(
    oc: &Path,
    home: &Path,
    tmpdir: &Path,
    port: u16,
    token: &str,
    name: &str,
) -> Result<Command> {
    fs::create_dir_all(tmpdir)?;
    classic_home(home, json!({}))?;
    let mut cmd = classic_cmd(oc, home, tmpdir);
    let port = port.to_string();
    cmd.env("OPENCLAW_GATEWAY_TOKEN", token)
        .args(["node", "run", "--host", "127.0.0.1", "--port", &port])
        .args(["--no-tls", "--display-name", name]);
    Ok(cmd)
}

/// (request id, node id) of the node host `name`'s pending capability request in a classic
/// listing (`node.pair.list` `pending`, or `openclaw nodes pending --json`).
pub fn classic_pending(pending: &Value, name: &str) -> Option<(String, String)> {
    pending.as_array()?.iter().find_map(|p| {
        if p["displayName"] != name {
            return None;
        }
        Some((
            p["requestId"].as_str()?.to_string(),
            p["nodeId"].as_str()?.to_string(),
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Tokio runtimes

/// A tokio runtime flavour: what the benchmark client (or a re-executed gateway) runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    CurrentThread,
    /// With 2 workers, as the `clawmesh` binary runs.
    MultiThread,
}

impl Flavour {
    /// For the report.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::CurrentThread => "current_thread",
            Flavour::MultiThread => "multi_thread (2 workers)",
        }
    }

    /// For a command line.
    pub fn tag(self) -> &'static str {
        match self {
            Flavour::CurrentThread => "current_thread",
            Flavour::MultiThread => "multi_thread",
        }
    }

    /// From [`Flavour::tag`]; anything else is the multi-thread flavour.
    pub fn from_tag(tag: &str) -> Flavour {
        match tag {
            "current_thread" => Flavour::CurrentThread,
            _ => Flavour::MultiThread,
        }
    }

    /// A new runtime of this flavour, with IO and timers.
    pub fn runtime(self) -> Result<tokio::runtime::Runtime> {
        Ok(match self {
            Flavour::CurrentThread => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            Flavour::MultiThread => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process WAN relay

/// The relay's runtime handle (tasks spawned by the relay must live there, not on the
/// client's `current_thread` runtime).
static RELAY_RT: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// Adds a relay site `name` (forwarding to `target`, if known yet); returns its public
/// address. Sites are bound on the relay's own runtime so their tasks run there.
pub async fn add_site(
    relay: &WanRelay,
    name: &str,
    target: Option<SocketAddr>,
) -> Result<SocketAddr> {
    let r = relay.clone();
    let name = name.to_string();
    let h = RELAY_RT
        .get()
        .ok_or_else(|| anyhow!("relay runtime not set"))?
        .spawn(async move { r.add_site(&name, target).await });
    Ok(h.await??)
}

/// Arguments of `clawmesh gateway run` for a gateway behind the relay: `name` in `region` on
/// UDP `port` (0: any), advertising its relay site's `public` address, with the join `token`
/// and `--health-interval health_ms`; joining the primary at `join`, or the primary itself.
pub fn relay_gateway_args(
    (name, region): (&str, &str),
    port: u16,
    public: SocketAddr,
    token: &str,
    health_ms: &str,
    join: Option<SocketAddr>,
) -> Vec<String> {
    let mut args: Vec<String> = ["gateway", "run", "--name", name, "--region", region]
        .into_iter()
        .map(str::to_string)
        .collect();
    args.extend(["--port".into(), port.to_string()]);
    args.extend(["--advertise".into(), public.to_string()]);
    args.extend(["--token".into(), token.to_string()]);
    args.extend(["--health-interval".into(), health_ms.to_string()]);
    match join {
        Some(j) => args.extend(["--join".into(), format!("quic://{j}")]),
        None => args.push("--primary".into()),
    }
    args
}

/// A UDP echo server on 127.0.0.1 (its own thread, blocking socket), for the raw round trip of
/// the relay at a set RTT, beside a direct one.
pub struct Echo {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    /// Binds the echo and starts its thread; it checks for the stop flag every 100 ms.
    pub fn start() -> Result<Echo> {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(Echo {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `n` sequential 100-byte UDP round trips to `target` (which echoes) after `warmup`
/// unmeasured ones, from a blocking thread. Each waits at most 1 s (far above any RTT a
/// bench sets): a lost datagram fails the series rather than hanging it.
pub async fn udp_rtt(target: SocketAddr, n: usize, warmup: usize) -> Result<Lat> {
    tokio::task::spawn_blocking(move || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut lat = Vec::with_capacity(n);
        let mut buf = [0u8; 2048];
        for i in 0..warmup + n {
            check_stop()?;
            let msg = [(i % 251) as u8; 100];
            let t = Instant::now();
            sock.send_to(&msg, target)?;
            loop {
                let (len, _) = sock
                    .recv_from(&mut buf)
                    .with_context(|| format!("no UDP echo from {target}"))?;
                if buf[..len] == msg {
                    break;
                }
            }
            if i >= warmup {
                lat.push(t.elapsed());
            }
        }
        lat_stats(&mut lat)
    })
    .await?
}

/// The machine table, as [`machine`] returns it.
pub type Machine = [(&'static str, String)];

/// `main` of a bench that drives gateways behind the WAN relay: refuses arguments, installs
/// the Ctrl-C handler, starts the relay on a 1-worker runtime of its own and the client on a
/// `current_thread` runtime, runs `run(clawmesh binary, temp dir, relay)`, shuts the relay
/// and the runtimes down (1 s each: their tasks are only sockets), then prints the report with
/// `print(result, machine, start time, seconds)`. The temp dir (`bench-<name>-…`, with every
/// process's log) is removed, or kept with `BENCH_<NAME>_KEEP=1`.
pub fn relay_bench_main<R>(
    run: impl for<'a> FnOnce(&'a Path, &'a Path, &'a WanRelay) -> LocalBoxFuture<'a, Result<R>>,
    print: impl FnOnce(&R, &Machine, &str, f64),
) -> Result<()> {
    if let Some(a) = std::env::args().skip(1).find(|a| a != "--bench") {
        bail!("unknown argument {a:?} (this benchmark takes none)");
    }
    install_ctrl_c();
    let bin = clawmesh_bin()?;
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("relay")
        .enable_all()
        .build()?;
    let _ = RELAY_RT.set(relay_rt.handle().clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{}-", crate::BENCH.replace('_', "-")))
        .tempdir()?;
    let machine = machine();
    let started = now_utc();
    let t = Instant::now();
    let result = rt.block_on(async {
        let relay = relay_rt
            .spawn(WanRelay::start())
            .await?
            .context("starting the relay")?;
        let result = run(&bin, tmp.path(), &relay).await;
        let r2 = relay.clone();
        let _ = relay_rt.spawn(async move { r2.shutdown().await }).await;
        result
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    relay_rt.shutdown_timeout(Duration::from_secs(1));
    if std::env::var_os(bench_env("KEEP")).is_some() {
        eprintln!("logs kept in {}", tmp.keep().display());
    } else if result.is_ok() {
        tmp.close()?;
    } // else dropping `tmp` removes it
    let r = result?;
    print(&r, &machine, &started, t.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Many paired nodes

/// Writes `ids[from..to]` as approved node devices named `name(i)` with `meta` into the state
/// dir `dir` with `Registry::apply` (the federation-sync path) while no gateway runs: how the
/// benches get thousands of nodes admitted (approving them one by one through
/// `devices approve` is its own benchmark).
pub fn seed_paired_nodes(
    dir: &Path,
    ids: &[clawmesh_federation::identity::DeviceIdentity],
    (from, to): (usize, usize),
    name: impl Fn(usize) -> String,
    meta: &str,
) -> Result<()> {
    use clawmesh_federation::pairing::{PairingRecord, Registry};
    let _lock = clawmesh::state_dir::DirLock::acquire(dir)?;
    let registry = Registry::open(clawmesh_federation::store::Store::open(dir)?)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_millis() as u64;
    let records: Vec<PairingRecord> = (from..to)
        .map(|i| PairingRecord {
            key: ids[i].public_key(),
            approved: true,
            changed_at_ms: now,
            name: name(i),
            role: "node".into(),
            platform: "linux".into(),
            meta: meta.to_string(),
            token: None,
        })
        .collect();
    let changed = registry.apply(&records)?;
    if changed.len() != records.len() {
        bail!("seeded {} of {} paired nodes", changed.len(), records.len());
    }
    Ok(())
}

/// One simulated native node on the client endpoint `ep`: the TLS raw-key handshake with
/// `id`'s own key, the node's hello (`name`, offering `system.which`), then the node host's
/// health loop (pings at half the gateway's interval, `sampler`'s vitals with the first ping
/// and every 6th after; never given up from this side: only the gateway decides a node is
/// gone), as `clawmesh node run` does. Each step waits at most `step`.
pub async fn attach_native_node(
    ep: &quinn::Endpoint,
    gateway: SocketAddr,
    id: &clawmesh_federation::identity::DeviceIdentity,
    name: String,
    sampler: &clawmesh_federation::vitals::VitalsSampler,
    step: Duration,
) -> Result<quinn::Connection> {
    use clawmesh_federation::endpoint::{self, TransportOptions, SERVER_NAME};
    use clawmesh_federation::health::HealthConfig;
    use clawmesh_federation::liveness::{self, Liveness, SendVitals};
    use clawmesh_federation::wire::{HelloRole, NodeHello};
    let (_, cc) = endpoint::configs(id, &TransportOptions::default())?;
    let conn = tokio::time::timeout(step, ep.connect_with(cc, gateway, SERVER_NAME)?).await??;
    let hello = clawmesh_federation::handshake::hello(
        clawmesh::VERSION,
        0,
        HelloRole::Node(NodeHello {
            name,
            token: None,
            commands: vec!["system.which".into()],
            labels: Vec::new(),
            platform: "linux".into(),
            attach: clawmesh_federation::directory::AttachOrder { boot: 1, attach: 1 },
        }),
    );
    let welcome = tokio::time::timeout(
        step,
        clawmesh_federation::handshake::send_hello(&conn, &hello),
    )
    .await??;
    let health = HealthConfig {
        interval: Duration::from_millis((welcome.health_interval_ms / 2).max(50)),
        unhealthy_threshold: u32::MAX,
    };
    let send = SendVitals {
        sampler: sampler.clone(),
        every: clawmesh_federation::vitals::VITALS_EVERY * 2,
    };
    tokio::spawn(liveness::monitor(
        conn.clone(),
        health,
        Liveness::default(),
        Some(send),
    ));
    Ok(conn)
}
