//! A loopback UDP relay that simulates WAN latency, loss and partitions.
//!
//! The kernel of the machines this project runs on has no `netem`, so the
//! delay and loss between gateways (e.g. Tokyo, Beijing, Frankfurt in
//! `clawmesh demo`) are simulated by forwarding every UDP datagram through
//! this relay. QUIC (quinn) runs through it, so datagrams are forwarded
//! byte-for-byte and in order per direction.
//!
//! # Model
//!
//! * A *site* is a named endpoint with a *real* address (where its own UDP
//!   socket listens) and a *public* address allocated by the relay on
//!   `127.0.0.1:<ephemeral>`. Peers send to the public address and the relay
//!   forwards to the real address.
//! * A site's process uses one UDP socket to listen and to dial, so when a
//!   datagram from source `S` reaches site `X`'s public port and `S` is site
//!   `Y`'s real address, the pair `{Y, X}` settings apply. Other sources use
//!   `X`'s default settings.
//! * Per `(source, destination site)` flow the relay opens an upstream socket
//!   (NAT-like): datagrams are sent from it to `X`'s real address and replies
//!   arriving on it are sent back, after the same one-way delay, from `X`'s
//!   public socket to `S`.
//! * Each flow direction is a FIFO drained by one task, which keeps order
//!   because the delay of a direction is constant until changed.
//!
//! The relay only ever binds and sends to loopback addresses: site targets
//! that are not loopback are rejected.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::RngExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Receive buffer size: the largest possible UDP payload fits in 65 535
/// bytes, so no datagram is ever truncated by the relay.
const MAX_DATAGRAM: usize = 65_535;

/// Default per-direction queue length. Like a router buffer, it absorbs
/// bursts while datagrams wait out their delay but bounds memory: 4096 QUIC
/// packets (~1.5 kB each) are ~6 MiB, far above one bandwidth-delay product
/// of a test link, so QUIC's congestion control never hits it by accident.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;

/// Default maximum number of concurrent flows. Each flow costs one socket
/// and three tasks; a demo or test uses a handful, so 1024 only guards
/// against leaking file descriptors when something sprays many sources.
pub const DEFAULT_MAX_FLOWS: usize = 1024;

/// Default idle time after which a flow is closed. 60 s is longer than
/// quinn's default idle timeout plus keep-alives, so a live QUIC connection
/// never loses its NAT mapping, while dead flows still release their socket.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest accepted round-trip time. Anything longer would exceed the flow
/// idle timeout and every sensible QUIC timeout, and it keeps
/// `Instant + rtt / 2` far from overflowing.
pub const MAX_RTT: Duration = Duration::from_secs(60);

/// Pause after a failed `recv_from`, so a socket that keeps failing does not
/// turn its receive loop into a busy loop.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(5);

/// Settings of a path between two sites (symmetric), or the default settings
/// of a site for sources that are not a known site.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathSettings {
    /// Round-trip latency; half of it is applied in each direction.
    pub rtt: Duration,
    /// Probability (0.0..=1.0) that a datagram is dropped, applied
    /// independently to each datagram in each direction.
    pub loss: f64,
    /// Drop everything on this path (used to simulate partitions).
    pub blocked: bool,
}

impl PathSettings {
    /// Settings with the given round-trip time, no loss, not blocked.
    pub fn with_rtt(rtt: Duration) -> Self {
        PathSettings {
            rtt,
            ..PathSettings::default()
        }
    }

    /// Checks the settings are usable: `loss` within 0.0..=1.0 and `rtt` at
    /// most [`MAX_RTT`].
    fn validate(&self) -> Result<(), RelayError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(RelayError::InvalidSettings(format!(
                "loss must be within 0.0..=1.0, got {}",
                self.loss
            )));
        }
        if self.rtt > MAX_RTT {
            return Err(RelayError::InvalidSettings(format!(
                "rtt must be at most {MAX_RTT:?}, got {:?}",
                self.rtt
            )));
        }
        Ok(())
    }
}

/// Errors returned by the relay API.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Binding or configuring a socket failed.
    #[error("relay I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// No site with this name was added.
    #[error("unknown site: {0}")]
    UnknownSite(String),
    /// A site with this name already exists.
    #[error("site already exists: {0}")]
    DuplicateSite(String),
    /// The real address is already the target of another site; sources are
    /// identified by their real address, so it must be unique.
    #[error("address {addr} is already the target of site {site}")]
    DuplicateTarget {
        /// The address that was requested.
        addr: SocketAddr,
        /// The site that already uses it.
        site: String,
    },
    /// Targets must be loopback: the relay never sends anywhere else.
    #[error("target {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    /// Loss outside 0.0..=1.0 or RTT above [`MAX_RTT`].
    #[error("invalid path settings: {0}")]
    InvalidSettings(String),
    /// The relay was shut down.
    #[error("relay is shut down")]
    Closed,
}

/// Tunables of a relay; [`RelayConfig::default`] gives the documented
/// defaults. Tests use smaller values to exercise the bounds quickly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    /// Datagrams queued per flow direction before new ones are dropped.
    pub queue_capacity: usize,
    /// Concurrent flows before datagrams opening a new flow are dropped.
    pub max_flows: usize,
    /// A flow without traffic in either direction for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_flows: DEFAULT_MAX_FLOWS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// One end of a traffic direction in the statistics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A registered site, by name.
    Site(String),
    /// A source that is not a known site's real address (e.g. a CLI client).
    External,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Site(name) => f.write_str(name),
            Peer::External => f.write_str("<external>"),
        }
    }
}

/// Datagram counters of one direction (or a sum of directions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams delivered after their delay.
    pub forwarded: u64,
    /// Payload bytes of the delivered datagrams (what went "on the wire").
    pub bytes: u64,
    /// Datagrams dropped by the simulated loss.
    pub dropped_loss: u64,
    /// Datagrams dropped because the path was blocked (partition).
    pub dropped_blocked: u64,
    /// Datagrams dropped because the direction's queue was full.
    pub dropped_queue: u64,
    /// Datagrams dropped because the destination site has no target yet.
    pub dropped_no_target: u64,
    /// Datagrams dropped because the flow limit was reached.
    pub dropped_flow_limit: u64,
    /// Datagrams whose final `send_to` failed.
    pub send_errors: u64,
}

impl Counters {
    /// Total datagrams dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss
            + self.dropped_blocked
            + self.dropped_queue
            + self.dropped_no_target
            + self.dropped_flow_limit
            + self.send_errors
    }

    /// Adds `other` into `self` (saturating).
    fn add(&mut self, other: &Counters) {
        self.forwarded = self.forwarded.saturating_add(other.forwarded);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.dropped_loss = self.dropped_loss.saturating_add(other.dropped_loss);
        self.dropped_blocked = self.dropped_blocked.saturating_add(other.dropped_blocked);
        self.dropped_queue = self.dropped_queue.saturating_add(other.dropped_queue);
        self.dropped_no_target = self
            .dropped_no_target
            .saturating_add(other.dropped_no_target);
        self.dropped_flow_limit = self
            .dropped_flow_limit
            .saturating_add(other.dropped_flow_limit);
        self.send_errors = self.send_errors.saturating_add(other.send_errors);
    }
}

/// Counters of traffic going from `from` to `to` through the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionStats {
    /// Sender of the datagrams.
    pub from: Peer,
    /// Receiver of the datagrams.
    pub to: Peer,
    /// What happened to them.
    pub counters: Counters,
}

/// Per-site view of the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteStats {
    /// Site name.
    pub name: String,
    /// Address peers send to.
    pub public: SocketAddr,
    /// Real address datagrams are forwarded to, if known.
    pub target: Option<SocketAddr>,
    /// Sum of every direction towards this site.
    pub received: Counters,
    /// Sum of every direction from this site.
    pub sent: Counters,
}

/// Snapshot of the relay's counters, so tests can measure what went on the
/// wire and what was dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// One entry per direction that saw at least one datagram.
    pub directions: Vec<DirectionStats>,
    /// One entry per site, sorted by name.
    pub sites: Vec<SiteStats>,
    /// Flows currently open.
    pub flows: usize,
}

impl RelayStats {
    /// Counters of the direction `from` -> `to` (zero if it saw nothing).
    pub fn direction(&self, from: &Peer, to: &Peer) -> Counters {
        self.directions
            .iter()
            .find(|d| &d.from == from && &d.to == to)
            .map(|d| d.counters)
            .unwrap_or_default()
    }

    /// Counters of the direction from site `from` to site `to`.
    pub fn between(&self, from: &str, to: &str) -> Counters {
        self.direction(&Peer::Site(from.to_owned()), &Peer::Site(to.to_owned()))
    }

    /// Counters of both directions between sites `a` and `b`, summed.
    pub fn pair(&self, a: &str, b: &str) -> Counters {
        let mut sum = self.between(a, b);
        if a != b {
            sum.add(&self.between(b, a));
        }
        sum
    }

    /// The statistics of one site.
    pub fn site(&self, name: &str) -> Option<&SiteStats> {
        self.sites.iter().find(|s| s.name == name)
    }

    /// Sum of all directions.
    pub fn total(&self) -> Counters {
        let mut sum = Counters::default();
        for d in &self.directions {
            sum.add(&d.counters);
        }
        sum
    }
}

/// Handle to a running relay. Cloning is cheap; the relay stops when
/// [`WanRelay::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct WanRelay {
    handle: Arc<Handle>,
}

impl fmt::Debug for WanRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WanRelay").finish_non_exhaustive()
    }
}

/// Owned by the user-facing clones only (tasks hold `Shared`), so dropping
/// the last `WanRelay` runs `Drop` and stops the tasks.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Aborting is enough here: each task's future (and its sockets) is
        // dropped by the runtime shortly after.
        let mut tasks = self.shared.close();
        tasks.abort_all();
    }
}

/// State shared by the handle and every task.
struct Shared {
    config: RelayConfig,
    /// Reference for the flows' last-activity timestamps (stored as
    /// milliseconds since `epoch` in an atomic).
    epoch: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    closed: bool,
    sites: HashMap<Arc<str>, Site>,
    /// Real address -> site name, to identify sources.
    by_real: HashMap<SocketAddr, Arc<str>>,
    /// Settings per unordered site pair (key sorted).
    paths: HashMap<(Arc<str>, Arc<str>), PathSettings>,
    /// One-way cuts: datagrams from the first site to the second are dropped.
    cuts: HashSet<(Arc<str>, Arc<str>)>,
    counters: HashMap<(PeerKey, PeerKey), Arc<DirCounters>>,
    /// Open flows by (source address, destination site).
    flows: HashMap<(SocketAddr, Arc<str>), Flow>,
    next_flow_id: u64,
    /// Every task of the relay, so shutdown can stop and await them all.
    tasks: JoinSet<()>,
}

struct Site {
    public: SocketAddr,
    socket: Arc<UdpSocket>,
    real: Option<SocketAddr>,
    default: PathSettings,
}

struct Flow {
    id: u64,
    /// Forward direction queue (source -> site).
    tx: mpsc::Sender<Packet>,
    /// Milliseconds since `Shared::epoch` of the last datagram either way.
    last_activity: Arc<AtomicU64>,
}

/// Internal, cheaply clonable form of [`Peer`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PeerKey {
    Site(Arc<str>),
    External,
}

impl PeerKey {
    fn to_peer(&self) -> Peer {
        match self {
            PeerKey::Site(name) => Peer::Site(name.to_string()),
            PeerKey::External => Peer::External,
        }
    }
}

#[derive(Default)]
struct DirCounters {
    forwarded: AtomicU64,
    bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_blocked: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_no_target: AtomicU64,
    dropped_flow_limit: AtomicU64,
    send_errors: AtomicU64,
}

impl DirCounters {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counters {
        Counters {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped_loss: self.dropped_loss.load(Ordering::Relaxed),
            dropped_blocked: self.dropped_blocked.load(Ordering::Relaxed),
            dropped_queue: self.dropped_queue.load(Ordering::Relaxed),
            dropped_no_target: self.dropped_no_target.load(Ordering::Relaxed),
            dropped_flow_limit: self.dropped_flow_limit.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
        }
    }
}

/// A datagram waiting out its delay in a direction's FIFO.
struct Packet {
    data: Vec<u8>,
    deadline: Instant,
    to: SocketAddr,
    counters: Arc<DirCounters>,
}

/// Which way a datagram travels within a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// From the flow's source to the site.
    Forward,
    /// From the site back to the flow's source.
    Reverse,
}

/// Settings and counters that apply to one datagram.
struct Route {
    settings: PathSettings,
    counters: Arc<DirCounters>,
}

impl State {
    fn label(&self, addr: SocketAddr) -> PeerKey {
        match self.by_real.get(&addr) {
            Some(name) => PeerKey::Site(name.clone()),
            None => PeerKey::External,
        }
    }

    fn counters(&mut self, from: PeerKey, to: PeerKey) -> Arc<DirCounters> {
        self.counters.entry((from, to)).or_default().clone()
    }

    /// Settings and counters for a datagram between `src` and `site`.
    fn route(&mut self, src: SocketAddr, site: &Arc<str>, dir: Dir) -> Route {
        let peer = self.label(src);
        let settings = match &peer {
            PeerKey::Site(other) => {
                let mut settings = self
                    .paths
                    .get(&pair_key(other, site))
                    .copied()
                    .unwrap_or_default();
                let way = match dir {
                    Dir::Forward => (other.clone(), site.clone()),
                    Dir::Reverse => (site.clone(), other.clone()),
                };
                settings.blocked |= self.cuts.contains(&way);
                settings
            }
            PeerKey::External => self.sites.get(site).map(|s| s.default).unwrap_or_default(),
        };
        let here = PeerKey::Site(site.clone());
        let counters = match dir {
            Dir::Forward => self.counters(peer, here),
            Dir::Reverse => self.counters(here, peer),
        };
        Route { settings, counters }
    }

    fn site_name(&self, name: &str) -> Result<Arc<str>, RelayError> {
        self.sites
            .get_key_value(name)
            .map(|(k, _)| k.clone())
            .ok_or_else(|| RelayError::UnknownSite(name.to_owned()))
    }

    /// Spawns a relay task unless the relay is closed. Also reaps finished
    /// tasks so the set does not grow with closed flows.
    fn spawn<F>(&mut self, fut: F) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if self.closed {
            return false;
        }
        while self.tasks.try_join_next().is_some() {}
        self.tasks.spawn(fut);
        true
    }
}

/// Key of the unordered pair `{a, b}`.
fn pair_key(a: &Arc<str>, b: &Arc<str>) -> (Arc<str>, Arc<str>) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

/// Outcome of the loss/blocked checks for one datagram.
fn admit(settings: &PathSettings, counters: &DirCounters) -> bool {
    if settings.blocked {
        DirCounters::bump(&counters.dropped_blocked, 1);
        return false;
    }
    // `random::<f64>()` is in [0, 1): loss 0.0 never drops, 1.0 always does.
    if settings.loss > 0.0 && rand::rng().random::<f64>() < settings.loss {
        DirCounters::bump(&counters.dropped_loss, 1);
        return false;
    }
    true
}

/// When a datagram received now with this RTT must be delivered.
fn deadline(rtt: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(rtt / 2).unwrap_or(now)
}

/// Queues a datagram on a direction's FIFO, counting a drop when it is full.
fn enqueue(tx: &mpsc::Sender<Packet>, packet: Packet) {
    match tx.try_send(packet) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(p)) => {
            DirCounters::bump(&p.counters.dropped_queue, 1);
        }
        // The drain task is gone (relay shutting down): nothing to deliver to.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the state itself
        // stays consistent (every update is a single map operation).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks the relay closed, drops every socket and queue it owns and
    /// hands back the task set for the caller to stop.
    fn close(&self) -> JoinSet<()> {
        let mut state = self.lock();
        state.closed = true;
        state.sites.clear();
        state.by_real.clear();
        state.flows.clear();
        std::mem::take(&mut state.tasks)
    }

    /// Handles one datagram received on `site`'s public socket from `src`.
    fn on_public_datagram(self: &Arc<Self>, site: &Arc<str>, src: SocketAddr, data: &[u8]) {
        let (route, target, flow_tx) = {
            let mut state = self.lock();
            if state.closed {
                return;
            }
            let route = state.route(src, site, Dir::Forward);
            let target = state.sites.get(site).and_then(|s| s.real);
            let flow = state.flows.get(&(src, site.clone())).map(|f| {
                f.last_activity.store(self.now_ms(), Ordering::Relaxed);
                f.tx.clone()
            });
            (route, target, flow)
        };
        let Some(target) = target else {
            DirCounters::bump(&route.counters.dropped_no_target, 1);
            return;
        };
        if !admit(&route.settings, &route.counters) {
            return;
        }
        let tx = match flow_tx {
            Some(tx) => tx,
            None => match self.open_flow(site, src, &route.counters) {
                Some(tx) => tx,
                None => return,
            },
        };
        enqueue(
            &tx,
            Packet {
                data: data.to_vec(),
                deadline: deadline(route.settings.rtt),
                to: target,
                counters: route.counters,
            },
        );
    }

    /// Opens the flow `(src, site)`: an upstream socket plus its three tasks
    /// (forward drain, reverse drain, upstream receive). Returns the forward
    /// queue, or `None` (counted) when the flow cannot be opened.
    fn open_flow(
        self: &Arc<Self>,
        site: &Arc<str>,
        src: SocketAddr,
        counters: &DirCounters,
    ) -> Option<mpsc::Sender<Packet>> {
        let upstream = match bind_loopback_sync() {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::debug!(%src, site = %site, error = %e, "relay: cannot open upstream socket");
                DirCounters::bump(&counters.send_errors, 1);
                return None;
            }
        };
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        if state.flows.len() >= self.config.max_flows {
            DirCounters::bump(&counters.dropped_flow_limit, 1);
            return None;
        }
        let public = state.sites.get(site)?.socket.clone();
        let capacity = self.config.queue_capacity.max(1);
        let (fwd_tx, fwd_rx) = mpsc::channel(capacity);
        let (rev_tx, rev_rx) = mpsc::channel(capacity);
        let last_activity = Arc::new(AtomicU64::new(self.now_ms()));
        let id = state.next_flow_id;
        state.next_flow_id = state.next_flow_id.wrapping_add(1);

        state.spawn(drain(fwd_rx, upstream.clone()));
        state.spawn(drain(rev_rx, public));
        state.spawn(upstream_loop(
            self.clone(),
            FlowCtx {
                id,
                site: site.clone(),
                src,
                upstream,
                rev_tx,
                last_activity: last_activity.clone(),
            },
        ));
        state.flows.insert(
            (src, site.clone()),
            Flow {
                id,
                tx: fwd_tx.clone(),
                last_activity,
            },
        );
        tracing::debug!(%src, site = %site, flow = id, "relay: flow opened");
        Some(fwd_tx)
    }
}

/// What a flow's upstream receive task needs.
struct FlowCtx {
    id: u64,
    site: Arc<str>,
    src: SocketAddr,
    upstream: Arc<UdpSocket>,
    rev_tx: mpsc::Sender<Packet>,
    last_activity: Arc<AtomicU64>,
}

/// Binds a UDP socket on 127.0.0.1:0 without awaiting, so it can be done
/// from synchronous code paths.
fn bind_loopback_sync() -> std::io::Result<UdpSocket> {
    let std_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    std_socket.set_nonblocking(true)?;
    UdpSocket::from_std(std_socket)
}

/// Drains one direction's FIFO: waits until the head's deadline, sends it.
/// Ends when every sender of the queue is gone.
async fn drain(mut rx: mpsc::Receiver<Packet>, socket: Arc<UdpSocket>) {
    while let Some(packet) = rx.recv().await {
        // tokio rounds timers up to its 1 ms tick: a due packet must not wait for it, or a
        // "0 ms" path would add about a millisecond per hop.
        if packet.deadline > Instant::now() {
            tokio::time::sleep_until(packet.deadline).await;
        }
        match socket.send_to(&packet.data, packet.to).await {
            Ok(_) => {
                DirCounters::bump(&packet.counters.forwarded, 1);
                let len = u64::try_from(packet.data.len()).unwrap_or(u64::MAX);
                DirCounters::bump(&packet.counters.bytes, len);
            }
            Err(e) => {
                tracing::debug!(to = %packet.to, error = %e, "relay: send failed");
                DirCounters::bump(&packet.counters.send_errors, 1);
            }
        }
    }
}

/// Receives on a site's public socket and dispatches every datagram.
async fn site_loop(shared: Arc<Shared>, site: Arc<str>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, src)) => {
                let data = buf.get(..n).unwrap_or(&[]);
                shared.on_public_datagram(&site, src, data);
            }
            Err(e) => {
                tracing::debug!(site = %site, error = %e, "relay: recv failed");
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Receives replies on a flow's upstream socket and queues them back to the
/// flow's source; closes the flow after the idle timeout.
async fn upstream_loop(shared: Arc<Shared>, flow: FlowCtx) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let idle_ms = u64::try_from(shared.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    loop {
        let last = flow.last_activity.load(Ordering::Relaxed);
        let idle_at = last.saturating_add(idle_ms);
        let now = shared.now_ms();
        if now >= idle_at {
            let mut state = shared.lock();
            let key = (flow.src, flow.site.clone());
            if state.flows.get(&key).is_some_and(|f| f.id == flow.id) {
                state.flows.remove(&key);
            }
            tracing::debug!(src = %flow.src, site = %flow.site, flow = flow.id, "relay: idle flow closed");
            // Returning drops `rev_tx`, so the reverse drain ends too; the
            // forward queue's sender was in the map entry just removed.
            return;
        }
        let wait = Duration::from_millis(idle_at - now);
        tokio::select! {
            received = flow.upstream.recv_from(&mut buf) => match received {
                // Replies are accepted from any (loopback) source, like an
                // endpoint-independent NAT mapping.
                Ok((n, _from)) => {
                    let data = buf.get(..n).unwrap_or(&[]);
                    on_reply(&shared, &flow, data);
                }
                Err(e) => {
                    tracing::debug!(site = %flow.site, error = %e, "relay: upstream recv failed");
                    tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                }
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Handles one reply from the site to the flow's source.
fn on_reply(shared: &Shared, flow: &FlowCtx, data: &[u8]) {
    let route = {
        let mut state = shared.lock();
        if state.closed {
            return;
        }
        state.route(flow.src, &flow.site, Dir::Reverse)
    };
    flow.last_activity.store(shared.now_ms(), Ordering::Relaxed);
    if !admit(&route.settings, &route.counters) {
        return;
    }
    enqueue(
        &flow.rev_tx,
        Packet {
            data: data.to_vec(),
            deadline: deadline(route.settings.rtt),
            to: flow.src,
            counters: route.counters,
        },
    );
}

impl WanRelay {
    /// Starts an empty relay bound on 127.0.0.1, with the default bounds
    /// ([`RelayConfig::default`]). Sites are added with [`WanRelay::add_site`].
    pub async fn start() -> Result<WanRelay, RelayError> {
        Self::start_with(RelayConfig::default()).await
    }

    /// Starts an empty relay with explicit bounds (tests use short idle
    /// timeouts and small queues).
    pub async fn start_with(config: RelayConfig) -> Result<WanRelay, RelayError> {
        let shared = Arc::new(Shared {
            config,
            epoch: Instant::now(),
            state: Mutex::new(State::default()),
        });
        Ok(WanRelay {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Adds a site; returns its public address (`127.0.0.1:<ephemeral>`) that
    /// peers must send to. `real` may be `None` when the site's process is
    /// started later (see [`WanRelay::set_target`]); datagrams to it are
    /// dropped and counted until then.
    pub async fn add_site(
        &self,
        name: &str,
        real: Option<SocketAddr>,
    ) -> Result<SocketAddr, RelayError> {
        if let Some(real) = real {
            check_loopback(real)?;
        }
        {
            let state = self.shared().lock();
            if state.closed {
                return Err(RelayError::Closed);
            }
            if state.sites.contains_key(name) {
                return Err(RelayError::DuplicateSite(name.to_owned()));
            }
        }
        let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let public = socket.local_addr()?;
        let name: Arc<str> = Arc::from(name);

        let mut state = self.shared().lock();
        if state.closed {
            return Err(RelayError::Closed);
        }
        if state.sites.contains_key(&name) {
            return Err(RelayError::DuplicateSite(name.to_string()));
        }
        if let Some(real) = real {
            if let Some(other) = state.by_real.get(&real) {
                return Err(RelayError::DuplicateTarget {
                    addr: real,
                    site: other.to_string(),
                });
            }
            state.by_real.insert(real, name.clone());
        }
        state.sites.insert(
            name.clone(),
            Site {
                public,
                socket: socket.clone(),
                real,
                default: PathSettings::default(),
            },
        );
        state.spawn(site_loop(self.shared().clone(), name.clone(), socket));
        tracing::debug!(site = %name, %public, ?real, "relay: site added");
        Ok(public)
    }

    /// Sets (or changes) the real address datagrams to site `name` are
    /// forwarded to; used when the site's gateway reports its port after
    /// the relay started. The address also identifies the site as a source.
    pub fn set_target(&self, name: &str, real: SocketAddr) -> Result<(), RelayError> {
        check_loopback(real)?;
        let mut state = self.shared().lock();
        if state.closed {
            return Err(RelayError::Closed);
        }
        let key = state.site_name(name)?;
        if let Some(other) = state.by_real.get(&real) {
            if *other != key {
                return Err(RelayError::DuplicateTarget {
                    addr: real,
                    site: other.to_string(),
                });
            }
        }
        let old = state.sites.get_mut(&key).and_then(|s| s.real.replace(real));
        if let Some(old) = old {
            state.by_real.remove(&old);
        }
        state.by_real.insert(real, key);
        tracing::debug!(site = %name, %real, "relay: target set");
        Ok(())
    }

    /// The public address of site `name`, if it exists.
    pub fn public_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared().lock().sites.get(name).map(|s| s.public)
    }

    /// Sets the settings of the (symmetric) path between sites `a` and `b`;
    /// takes effect for datagrams received from now on.
    pub fn set_path(&self, a: &str, b: &str, settings: PathSettings) -> Result<(), RelayError> {
        settings.validate()?;
        let mut state = self.shared().lock();
        if state.closed {
            return Err(RelayError::Closed);
        }
        let a = state.site_name(a)?;
        let b = state.site_name(b)?;
        state.paths.insert(pair_key(&a, &b), settings);
        Ok(())
    }

    /// The current settings of the path between `a` and `b` (zero if never
    /// set).
    pub fn path(&self, a: &str, b: &str) -> Result<PathSettings, RelayError> {
        let state = self.shared().lock();
        let a = state.site_name(a)?;
        let b = state.site_name(b)?;
        Ok(state
            .paths
            .get(&pair_key(&a, &b))
            .copied()
            .unwrap_or_default())
    }

    /// Default for sources that are not a known site, per destination site
    /// (applied to both directions of such flows). Initially zero delay,
    /// zero loss.
    pub fn set_default(&self, site: &str, settings: PathSettings) -> Result<(), RelayError> {
        settings.validate()?;
        let mut state = self.shared().lock();
        if state.closed {
            return Err(RelayError::Closed);
        }
        let key = state.site_name(site)?;
        if let Some(s) = state.sites.get_mut(&key) {
            s.default = settings;
        }
        Ok(())
    }

    /// Blocks (or unblocks) every path between the group and every other
    /// site: a partition. Latency and loss of those paths are kept. Sources
    /// that are not sites are not affected (use [`WanRelay::set_default`]).
    /// Datagrams already queued (in flight) are still delivered, as on a
    /// real link cut behind them.
    pub fn partition(&self, group: &[&str], blocked: bool) -> Result<(), RelayError> {
        let mut state = self.shared().lock();
        if state.closed {
            return Err(RelayError::Closed);
        }
        let inside = group
            .iter()
            .map(|name| state.site_name(name))
            .collect::<Result<HashSet<_>, _>>()?;
        let outside: Vec<Arc<str>> = state
            .sites
            .keys()
            .filter(|k| !inside.contains(*k))
            .cloned()
            .collect();
        for a in &inside {
            for b in &outside {
                state.paths.entry(pair_key(a, b)).or_default().blocked = blocked;
            }
        }
        tracing::debug!(?group, blocked, "relay: partition");
        Ok(())
    }

    /// Cuts (or restores) one direction only: datagrams from site `from` to site `to` are
    /// dropped, the other way still flows (a broken route, an asymmetric firewall rule). The
    /// path's latency, loss and partition state are kept.
    pub fn cut_one_way(&self, from: &str, to: &str, cut: bool) -> Result<(), RelayError> {
        let mut state = self.shared().lock();
        if state.closed {
            return Err(RelayError::Closed);
        }
        let way = (state.site_name(from)?, state.site_name(to)?);
        if cut {
            state.cuts.insert(way);
        } else {
            state.cuts.remove(&way);
        }
        tracing::debug!(from, to, cut, "relay: one-way cut");
        Ok(())
    }

    /// A snapshot of every counter, per direction and per site.
    pub fn stats(&self) -> RelayStats {
        let state = self.shared().lock();
        let mut directions: Vec<DirectionStats> = state
            .counters
            .iter()
            .map(|((from, to), c)| DirectionStats {
                from: from.to_peer(),
                to: to.to_peer(),
                counters: c.snapshot(),
            })
            .collect();
        directions.sort_by(|x, y| (&x.from, &x.to).cmp(&(&y.from, &y.to)));
        let mut sites: Vec<SiteStats> = state
            .sites
            .iter()
            .map(|(name, site)| {
                let me = Peer::Site(name.to_string());
                let mut received = Counters::default();
                let mut sent = Counters::default();
                for d in &directions {
                    if d.to == me {
                        received.add(&d.counters);
                    }
                    if d.from == me {
                        sent.add(&d.counters);
                    }
                }
                SiteStats {
                    name: name.to_string(),
                    public: site.public,
                    target: site.real,
                    received,
                    sent,
                }
            })
            .collect();
        sites.sort_by(|x, y| x.name.cmp(&y.name));
        RelayStats {
            directions,
            sites,
            flows: state.flows.len(),
        }
    }

    /// Stops every task and closes every socket; when it returns nothing of
    /// the relay is running and its ports are free. Later calls on any clone
    /// fail with [`RelayError::Closed`] (or do nothing).
    pub async fn shutdown(&self) {
        let mut tasks = self.shared().close();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        tracing::debug!("relay: shut down");
    }
}

fn check_loopback(addr: SocketAddr) -> Result<(), RelayError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(RelayError::NotLoopback(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    /// Generous slack: tests must not be flaky on a loaded 2-core machine.
    const SLACK: Duration = Duration::from_millis(200);
    const WAIT: Duration = Duration::from_secs(2);

    async fn socket() -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap()
    }

    /// A UDP echo server; returns its address and the task to abort.
    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = socket().await;
        let addr = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    async fn recv(s: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match timeout(within, s.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
            _ => None,
        }
    }

    /// Sends `count` datagrams and returns how many echoes come back.
    async fn echo_count(client: &UdpSocket, to: SocketAddr, count: usize) -> usize {
        for i in 0..count {
            client.send_to(&[i as u8], to).await.unwrap();
        }
        let mut got = 0;
        while recv(client, Duration::from_millis(150)).await.is_some() {
            got += 1;
        }
        got
    }

    #[tokio::test]
    async fn echo_with_latency_keeps_order() {
        let relay = WanRelay::start().await.unwrap();
        let (echo, echo_task) = echo_server().await;
        let client = socket().await;
        relay
            .add_site("a", Some(client.local_addr().unwrap()))
            .await
            .unwrap();
        let pub_b = relay.add_site("b", Some(echo)).await.unwrap();
        assert_eq!(relay.public_addr("b"), Some(pub_b));
        assert!(pub_b.ip().is_loopback());
        let rtt = Duration::from_millis(40);
        relay
            .set_path("a", "b", PathSettings::with_rtt(rtt))
            .unwrap();

        let start = Instant::now();
        client.send_to(b"ping", pub_b).await.unwrap();
        let (data, from) = recv(&client, WAIT).await.unwrap();
        let elapsed = start.elapsed();
        assert_eq!(data, b"ping");
        assert_eq!(from, pub_b, "replies come from the public address");
        assert!(
            elapsed >= rtt,
            "round trip {elapsed:?} shorter than {rtt:?}"
        );
        assert!(elapsed < rtt + SLACK, "round trip {elapsed:?} too long");

        for i in 0u32..100 {
            client.send_to(&i.to_be_bytes(), pub_b).await.unwrap();
        }
        for i in 0u32..100 {
            let (data, _) = recv(&client, WAIT).await.unwrap();
            assert_eq!(data, i.to_be_bytes(), "datagram {i} out of order");
        }

        let stats = relay.stats();
        assert_eq!(stats.between("a", "b").forwarded, 101);
        assert_eq!(stats.between("b", "a").forwarded, 101);
        assert_eq!(stats.between("a", "b").bytes, 4 + 400);
        assert_eq!(stats.pair("a", "b").bytes, 2 * (4 + 400));
        assert_eq!(stats.site("b").unwrap().received.forwarded, 101);
        assert_eq!(stats.site("b").unwrap().target, Some(echo));
        assert_eq!(stats.flows, 1);
        assert_eq!(stats.total().dropped(), 0);
        echo_task.abort();
        relay.shutdown().await;
    }

    #[tokio::test]
    async fn unknown_source_uses_default() {
        let relay = WanRelay::start().await.unwrap();
        let (echo, echo_task) = echo_server().await;
        let client = socket().await; // not a site
        let pub_b = relay.add_site("b", Some(echo)).await.unwrap();
        let rtt = Duration::from_millis(30);
        relay.set_default("b", PathSettings::with_rtt(rtt)).unwrap();
        // A path setting between sites must not apply to unknown sources.
        relay.add_site("a", None).await.unwrap();
        relay
            .set_path(
                "a",
                "b",
                PathSettings {
                    blocked: true,
                    ..PathSettings::default()
                },
            )
            .unwrap();

        let start = Instant::now();
        client.send_to(b"x", pub_b).await.unwrap();
        let (data, from) = recv(&client, WAIT).await.unwrap();
        let elapsed = start.elapsed();
        assert_eq!((data.as_slice(), from), (&b"x"[..], pub_b));
        assert!(elapsed >= rtt && elapsed < rtt + SLACK, "{elapsed:?}");

        relay
            .set_default(
                "b",
                PathSettings {
                    loss: 1.0,
                    ..PathSettings::default()
                },
            )
            .unwrap();
        assert_eq!(echo_count(&client, pub_b, 5).await, 0);
        let stats = relay.stats();
        let inbound = stats.direction(&Peer::External, &Peer::Site("b".into()));
        assert_eq!(inbound.forwarded, 1);
        assert_eq!(inbound.dropped_loss, 5);
        let outbound = stats.direction(&Peer::Site("b".into()), &Peer::External);
        assert_eq!(outbound.forwarded, 1);
        echo_task.abort();
        relay.shutdown().await;
    }

    #[tokio::test]
    async fn loss_and_partition() {
        let relay = WanRelay::start().await.unwrap();
        let (echo, echo_task) = echo_server().await;
        let client = socket().await;
        relay
            .add_site("a", Some(client.local_addr().unwrap()))
            .await
            .unwrap();
        let pub_b = relay.add_site("b", Some(echo)).await.unwrap();
        relay.add_site("c", None).await.unwrap();

        let lossy = PathSettings {
            loss: 1.0,
            ..PathSettings::default()
        };
        relay.set_path("a", "b", lossy).unwrap();
        assert_eq!(echo_count(&client, pub_b, 20).await, 0);
        assert_eq!(relay.stats().between("a", "b").dropped_loss, 20);

        relay.set_path("a", "b", PathSettings::default()).unwrap();
        assert_eq!(echo_count(&client, pub_b, 20).await, 20);

        let rtt = Duration::from_millis(10);
        relay
            .set_path("a", "b", PathSettings::with_rtt(rtt))
            .unwrap();
        relay.partition(&["a"], true).unwrap();
        assert!(relay.path("a", "b").unwrap().blocked);
        assert!(relay.path("a", "c").unwrap().blocked);
        assert!(!relay.path("b", "c").unwrap().blocked);
        assert_eq!(relay.path("a", "b").unwrap().rtt, rtt, "rtt kept");
        assert_eq!(echo_count(&client, pub_b, 10).await, 0);
        assert_eq!(relay.stats().between("a", "b").dropped_blocked, 10);

        relay.partition(&["a"], false).unwrap();
        assert_eq!(echo_count(&client, pub_b, 10).await, 10);
        assert_eq!(relay.stats().between("b", "a").forwarded, 30);

        // One way only: a's datagrams reach b, b's answers are dropped.
        relay.cut_one_way("b", "a", true).unwrap();
        assert_eq!(echo_count(&client, pub_b, 10).await, 0);
        assert_eq!(relay.stats().between("a", "b").forwarded, 40);
        assert_eq!(relay.stats().between("b", "a").dropped_blocked, 10);
        relay.cut_one_way("b", "a", false).unwrap();
        assert_eq!(echo_count(&client, pub_b, 10).await, 10);
        echo_task.abort();
        relay.shutdown().await;
    }

    #[tokio::test]
    async fn no_target_then_set_target() {
        let relay = WanRelay::start().await.unwrap();
        let client = socket().await;
        let pub_b = relay.add_site("b", None).await.unwrap();
        client.send_to(b"early", pub_b).await.unwrap();
        assert!(recv(&client, Duration::from_millis(100)).await.is_none());
        let c = relay
            .stats()
            .direction(&Peer::External, &Peer::Site("b".into()));
        assert_eq!(c.dropped_no_target, 1);
        assert_eq!(relay.stats().flows, 0);

        let (echo, echo_task) = echo_server().await;
        relay.set_target("b", echo).unwrap();
        client.send_to(b"late", pub_b).await.unwrap();
        let (data, from) = recv(&client, WAIT).await.unwrap();
        assert_eq!((data.as_slice(), from), (&b"late"[..], pub_b));
        echo_task.abort();
        relay.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_stops_everything() {
        let relay = WanRelay::start().await.unwrap();
        let (echo, echo_task) = echo_server().await;
        let client = socket().await;
        let pub_b = relay.add_site("b", Some(echo)).await.unwrap();
        let pub_c = relay.add_site("c", None).await.unwrap();
        relay
            .set_default("b", PathSettings::with_rtt(Duration::from_millis(100)))
            .unwrap();
        client.send_to(b"1", pub_b).await.unwrap();
        recv(&client, WAIT).await.unwrap();
        client.send_to(b"in flight", pub_b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;

        let clone = relay.clone();
        relay.shutdown().await;
        // Every task held an `Arc<Shared>`: only the handle's is left, so
        // every task future has been dropped.
        assert_eq!(Arc::strong_count(relay.shared()), 1);
        // Every socket is closed: the public ports can be bound again.
        std::net::UdpSocket::bind(pub_b).unwrap();
        std::net::UdpSocket::bind(pub_c).unwrap();
        assert!(matches!(
            clone.add_site("d", None).await,
            Err(RelayError::Closed)
        ));
        assert!(recv(&client, Duration::from_millis(100)).await.is_none());
        clone.shutdown().await; // idempotent
        echo_task.abort();
    }

    #[tokio::test]
    async fn drop_stops_everything() {
        let relay = WanRelay::start().await.unwrap();
        let pub_b = relay.add_site("b", None).await.unwrap();
        drop(relay);
        // Aborted tasks are dropped by the runtime shortly after.
        let mut rebound = false;
        for _ in 0..100 {
            if std::net::UdpSocket::bind(pub_b).is_ok() {
                rebound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(rebound);
    }

    #[tokio::test]
    async fn idle_flows_close_and_queue_is_bounded() {
        let relay = WanRelay::start_with(RelayConfig {
            queue_capacity: 4,
            max_flows: 1,
            idle_timeout: Duration::from_millis(100),
        })
        .await
        .unwrap();
        let (echo, echo_task) = echo_server().await;
        let client = socket().await;
        let other = socket().await;
        let pub_b = relay.add_site("b", Some(echo)).await.unwrap();
        relay
            .set_default("b", PathSettings::with_rtt(Duration::from_millis(100)))
            .unwrap();
        for i in 0..10u8 {
            client.send_to(&[i], pub_b).await.unwrap();
        }
        // Second source: over the flow limit.
        other.send_to(b"x", pub_b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c = relay
            .stats()
            .direction(&Peer::External, &Peer::Site("b".into()));
        assert!(c.dropped_queue >= 5, "{c:?}");
        assert_eq!(c.dropped_flow_limit, 1);
        assert_eq!(relay.stats().flows, 1);
        let mut got = 0;
        while recv(&client, Duration::from_millis(200)).await.is_some() {
            got += 1;
        }
        assert!((4..=5).contains(&got), "got {got}");
        // After the idle timeout the flow is gone and a new one can open.
        let deadline = Instant::now() + WAIT;
        while relay.stats().flows != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(relay.stats().flows, 0);
        other.send_to(b"y", pub_b).await.unwrap();
        assert!(recv(&other, WAIT).await.is_some());
        echo_task.abort();
        relay.shutdown().await;
    }

    #[tokio::test]
    async fn rejects_bad_input() {
        let relay = WanRelay::start().await.unwrap();
        relay.add_site("a", None).await.unwrap();
        relay.add_site("b", None).await.unwrap();
        assert!(matches!(
            relay.add_site("a", None).await,
            Err(RelayError::DuplicateSite(_))
        ));
        let bad_loss = PathSettings {
            loss: f64::NAN,
            ..PathSettings::default()
        };
        assert!(matches!(
            relay.set_path("a", "b", bad_loss),
            Err(RelayError::InvalidSettings(_))
        ));
        let bad_rtt = PathSettings::with_rtt(Duration::MAX);
        assert!(matches!(
            relay.set_default("a", bad_rtt),
            Err(RelayError::InvalidSettings(_))
        ));
        assert!(matches!(
            relay.set_path("a", "zz", PathSettings::default()),
            Err(RelayError::UnknownSite(_))
        ));
        assert!(matches!(
            relay.partition(&["zz"], true),
            Err(RelayError::UnknownSite(_))
        ));
        assert!(matches!(
            relay.set_target("a", "10.0.0.1:9".parse().unwrap()),
            Err(RelayError::NotLoopback(_))
        ));
        let real: SocketAddr = "127.0.0.1:9".parse().unwrap();
        relay.set_target("a", real).unwrap();
        relay.set_target("a", real).unwrap(); // same site again: fine
        assert!(matches!(
            relay.set_target("b", real),
            Err(RelayError::DuplicateTarget { .. })
        ));
        assert_eq!(relay.public_addr("zz"), None);
        relay.shutdown().await;
    }
}
