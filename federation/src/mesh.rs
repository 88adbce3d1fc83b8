//! The gateway mesh: membership, one QUIC link per pair of gateways, redial, and health.
//!
//! Every gateway runs one [`Mesh`]. The primary admits a joining gateway that proves the join
//! token, pins its key, and pushes the member list to every gateway; each gateway then dials
//! every member it has no link to, so the gateways form a full mesh. Both sides of a pair may
//! dial; when two links to the same peer process exist, both sides keep the one with the
//! smaller (dialer key, link nonce), and a link from a restarted peer (new boot id) replaces
//! the old one at once. Each link carries health pings as datagrams, request streams for the
//! method table, and one event stream each way.
//!
//! Connections from operators and nodes arrive on the same endpoint; the mesh does the hello
//! and hands them to the embedding service through [`Admission`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use quinn::{Connection, Endpoint, VarInt};
use rand::RngExt as _;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::directory::{
    Applied, DirVersion, DirectoryDelta, LocalDirectory, NodeSummary, RemoteDirectory,
};
use crate::endpoint::{self, EndpointError};
use crate::frame::{self, MAX_FRAME};
use crate::handshake::{self, HandshakeError};
use crate::health::{HealthConfig, PeerHealth, Status};
use crate::identity::{DeviceId, DeviceIdentity, PublicKey};
use crate::pairing::{PairingRecord, Registry};
use crate::rpc::{self, BoxFuture, Caller, CallerKind, Handler};
use crate::store::{Store, StoreError};
use crate::vitals::{NodeVitals, Received, VitalsSampler};
use crate::wire::{
    Datagram, Event, GatewayHello, Hello, HelloReply, HelloRole, Member, Membership, Refusal,
    RefusalCode, Request, Welcome, WireError, PROTOCOL_VERSION,
};

/// How long a dial may take before it counts as failed: covers a QUIC handshake over the
/// slowest WAN path with a lost packet or two.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the endpoint holds before refusing new ones: a gateway is built for 50 000
/// native nodes (about 38 KB each at the gateway, ~1.9 GB; all share one UDP socket, so no
/// file descriptor each) plus a few dozen peer gateways and operators; beyond this a flood
/// is refused, not queued, which bounds the endpoint's memory near 2.3 GB.
const MAX_CONNECTIONS: usize = 60_000;

/// Events queued for one link's event stream. Events are rare (membership changes) and each
/// membership event is a full snapshot, so a dropped one is repaired by the next.
const EVENT_QUEUE: usize = 64;

/// Pairing records per event in a link-up exchange: a record is at most a few hundred bytes,
/// so an event stays near 1-2 MB, far under the frame limit, whatever the fleet's size.
const SYNC_CHUNK: usize = 5_000;

/// Merged pairing decisions logged one line each; a larger merge is one summary line.
const MERGE_LINES: usize = 10;

/// Redial backoff start and cap: quick to relink after a blip, never more than 30 s apart.
const REDIAL_BASE: Duration = Duration::from_millis(200);
const REDIAL_CAP: Duration = Duration::from_secs(30);

/// How long the larger-keyed gateway of a new pair waits before dialing, so that usually only
/// one of the two dials and no duplicate link is made.
const FIRST_DIAL_GRACE: Duration = Duration::from_millis(300);

/// QUIC close code for a deliberate close (shutdown, duplicate link).
const CLOSE_NORMAL: u32 = 0;
/// QUIC close code for a refused peer.
const CLOSE_REFUSED: u32 = 1;

/// Errors starting or running the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Endpoint setup failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A hello failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The peer at an address is not the one we expected.
    #[error("peer at {addr} presented device {got}, but {name} is pinned to device {want}; refusing the link")]
    KeyMismatch {
        /// Where we dialed.
        addr: SocketAddr,
        /// The member we expected.
        name: String,
        /// Pinned key's device id.
        want: String,
        /// Presented key's device id.
        got: String,
    },
    /// A discovered gateway proved a key other than the one its advertisement claimed.
    #[error("peer at {addr} advertised device {advertised} but proved device {proven}; candidate dropped")]
    AdvertisedKeyMismatch {
        /// Where we dialed.
        addr: SocketAddr,
        /// The advertised key's device id.
        advertised: String,
        /// The proven key's device id.
        proven: String,
    },
    /// The acceptor did not prove it knows the join token.
    #[error(
        "{addr} did not prove it knows the join token; it may be an impostor, refusing to join"
    )]
    BadWelcomeProof {
        /// Where we dialed.
        addr: SocketAddr,
    },
    /// Configuration problem.
    #[error("{0}")]
    Config(String),
}

/// Static settings of this gateway's mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// This gateway's name, unique in the federation.
    pub name: String,
    /// Region label shown in status.
    pub region: Option<String>,
    /// Whether this gateway is configured as the primary.
    pub primary: bool,
    /// The primary to join (first run of a remote), if any.
    pub join: Option<SocketAddr>,
    /// Federation join secret.
    pub token: Option<String>,
    /// Address other gateways should dial to reach this one.
    pub advertise: String,
    /// Health settings.
    pub health: HealthConfig,
    /// Software version string.
    pub software: String,
}

/// What the embedding gateway decides for operators and nodes, and how it serves them.
pub trait Admission: Send + Sync + 'static {
    /// Decides on a non-gateway hello: the caller kind to attach to its requests, or a refusal.
    fn admit(
        &self,
        key: &PublicKey,
        remote: SocketAddr,
        hello: &Hello,
    ) -> Result<CallerKind, Refusal>;
    /// Takes over an admitted operator or node connection (serving its requests).
    fn connected(&self, conn: Connection, caller: Caller, hello: Hello);
}

/// Serves the federation's internal `raft.*` requests from other gateways: the consensus
/// module plugs in here, so its RPCs ride the authenticated mesh links.
pub trait PeerService: Send + Sync + 'static {
    /// Handles one request from the gateway with key `from`.
    fn handle(&self, from: PublicKey, req: Request) -> BoxFuture<Result<String, WireError>>;
}

/// Routes a gateway link's requests: `raft.*` to the [`PeerService`], `logs.*` to the log
/// service, the rest to the method table.
struct LinkHandler {
    mesh: Mesh,
    from: PublicKey,
    methods: Arc<dyn Handler>,
}

impl Handler for LinkHandler {
    fn handle(&self, caller: Caller, req: Request) -> BoxFuture<Result<String, WireError>> {
        let (service, what) = if req.method.starts_with("raft.") {
            (&self.mesh.inner.peer_service, "consensus")
        } else if req.method.starts_with("logs.") {
            (&self.mesh.inner.log_service, "log collection")
        } else {
            return self.methods.handle(caller, req);
        };
        match service.get() {
            Some(s) => s.handle(self.from, req),
            None => Box::pin(async move {
                let mut e = WireError::new(
                    "UNAVAILABLE",
                    format!("{what} is not running on this gateway"),
                );
                e.retryable = true;
                Err(e)
            }),
        }
    }
}

/// Things other gateways told us that the embedding gateway must act on.
#[derive(Debug, Clone)]
pub enum MeshNotice {
    /// A device was revoked elsewhere: disconnect it here too.
    Revoked(DeviceId),
}

/// Notices buffered for a slow subscriber; older ones are dropped (the subscriber then
/// re-checks the registry).
const NOTICE_QUEUE: usize = 256;

/// The nodes of one other gateway, as it last announced them.
#[derive(Debug, Clone)]
pub struct RemoteNodes {
    /// Gateway name.
    pub gateway: String,
    /// Its health as seen from here.
    pub status: Status,
    /// When it last answered.
    pub last_seen: Option<SystemTime>,
    /// Its nodes, in id order (shared with the directory: taking them copies no node).
    pub nodes: Vec<Arc<NodeSummary>>,
    /// Its nodes' host vitals, as it last relayed them.
    pub vitals: HashMap<DeviceId, Received>,
}

/// Another gateway's node directory as a listing cache sees it: enough to tell whether it
/// changed (its key, name, liveness, version and size), and its nodes when asked for.
#[derive(Debug, Clone)]
pub struct RemoteDirectoryView {
    /// The gateway's device key (a member re-added under the same name is another gateway).
    pub key: PublicKey,
    /// Gateway name.
    pub gateway: String,
    /// Its health as seen from here.
    pub status: Status,
    /// When it last answered.
    pub last_seen: Option<SystemTime>,
    /// The directory version held (`None`: nothing received yet).
    pub at: Option<DirVersion>,
    /// How many nodes it announced.
    pub len: usize,
    /// Its nodes in id order (shared, not copied); empty unless asked for.
    pub nodes: Vec<Arc<NodeSummary>>,
}

/// One gateway as seen from here, for `gateway status`.
#[derive(Debug, Clone)]
pub struct GatewayStatus {
    /// Name.
    pub name: String,
    /// Region.
    pub region: Option<String>,
    /// Device id.
    pub device_id: DeviceId,
    /// Whether it is the primary.
    pub primary: bool,
    /// Health verdict.
    pub status: Status,
    /// Median recent round trip (zero for self).
    pub latency: Option<Duration>,
    /// 99th percentile recent round trip.
    pub latency_p99: Option<Duration>,
    /// Last time it answered.
    pub last_seen: Option<SystemTime>,
    /// Address.
    pub addr: String,
    /// Software version, once known.
    pub version: Option<String>,
    /// Whether this row is the gateway answering.
    pub is_self: bool,
    /// Pings missed in a row.
    pub missed: u32,
    /// Last dial error, if the link is down.
    pub last_error: Option<String>,
    /// How this gateway found the peer (`static`, `mdns`, `tailnet`), as the embedding
    /// gateway recorded it with [`Mesh::note_found`]; `None` for one learned from the member
    /// list or that joined us, and for self.
    pub found: Option<String>,
    /// Its host vitals: read now for self, the last received for a peer (`None`: none yet,
    /// or a peer too old to send them).
    pub vitals: Option<Received>,
}

/// The federation as seen from this gateway.
#[derive(Debug, Clone)]
pub struct MeshStatus {
    /// This gateway's name.
    pub self_name: String,
    /// The primary's name, if known.
    pub primary: Option<String>,
    /// Membership epoch.
    pub epoch: u64,
    /// Every gateway, self first.
    pub gateways: Vec<GatewayStatus>,
    /// Health settings in force.
    pub health: HealthConfig,
    /// Why this gateway has not joined its federation yet (`None`: it is a member).
    pub not_joined: Option<String>,
}

struct Link {
    id: u64,
    conn: Connection,
    peer_boot: u64,
    /// (dialer key, nonce): the tie-break between two links of the same peer process.
    order: (PublicKey, u64),
    events: mpsc::Sender<Event>,
}

struct Peer {
    health: PeerHealth,
    link: Option<Link>,
    software: Option<String>,
    nodes: RemoteDirectory,
    linked: watch::Sender<bool>,
    dialing: bool,
    last_error: Option<String>,
    /// Its host vitals, from its health datagrams.
    vitals: Option<Received>,
    /// Its nodes' host vitals, as it relays them (bounded by [`crate::vitals::MAX_RELAYED`]).
    node_vitals: HashMap<DeviceId, Received>,
}

impl Peer {
    fn new() -> Self {
        Peer {
            health: PeerHealth::default(),
            link: None,
            software: None,
            nodes: RemoteDirectory::default(),
            linked: watch::channel(false).0,
            dialing: false,
            last_error: None,
            vitals: None,
            node_vitals: HashMap::new(),
        }
    }
}

struct State {
    membership: Membership,
    local_nodes: LocalDirectory,
    peers: HashMap<PublicKey, Peer>,
    next_link_id: u64,
    shutting_down: bool,
    /// The raft leader as last reported by the consensus module (`None`: unknown, or no
    /// consensus attached — then the configured primary is shown as primary).
    leader: Option<Option<PublicKey>>,
    /// How each peer was found (see [`GatewayStatus::found`]).
    found: HashMap<PublicKey, String>,
    /// Why this gateway is not a member yet, while its join is unanswered or failing
    /// (`None` once joined, and for the primary and members).
    not_joined: Option<String>,
}

struct Inner {
    cfg: MeshConfig,
    key: PublicKey,
    endpoint: Endpoint,
    store: Store,
    boot_id: u64,
    handler: Arc<dyn Handler>,
    admission: Arc<dyn Admission>,
    state: Mutex<State>,
    shutdown: watch::Sender<bool>,
    fatal: watch::Sender<Option<String>>,
    pairing: std::sync::OnceLock<Registry>,
    notices: broadcast::Sender<MeshNotice>,
    peer_service: std::sync::OnceLock<Arc<dyn PeerService>>,
    log_service: std::sync::OnceLock<Arc<dyn PeerService>>,
    /// Health settings in force: start from [`MeshConfig::health`], changed live by
    /// [`Mesh::set_health`] (a shared-config change of the interval or threshold).
    health: watch::Sender<HealthConfig>,
    /// This host's vitals, sent with the pings once attached ([`Mesh::attach_vitals`]).
    vitals: std::sync::OnceLock<VitalsSampler>,
    /// What the node directory sent and asked for.
    directory: DirectoryTallies,
}

/// Handle to the running mesh; cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("name", &self.inner.cfg.name)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Mesh {
    /// Starts the mesh on an already bound endpoint: accept loop, dial loops, join.
    pub fn start(
        cfg: MeshConfig,
        identity: &DeviceIdentity,
        endpoint: Endpoint,
        store: Store,
        handler: Arc<dyn Handler>,
        admission: Arc<dyn Admission>,
    ) -> Result<Mesh, MeshError> {
        if cfg.name.is_empty() {
            return Err(MeshError::Config("gateway name must not be empty".into()));
        }
        let key = identity.public_key();
        let mut membership = store.membership()?;
        if cfg.primary {
            let me = Member {
                key,
                name: cfg.name.clone(),
                region: cfg.region.clone(),
                addr: cfg.advertise.clone(),
                primary: true,
                joined_at_ms: membership
                    .members
                    .iter()
                    .find(|m| m.key == key)
                    .map(|m| m.joined_at_ms)
                    .unwrap_or_else(now_ms),
            };
            let existing = membership.members.iter().position(|m| m.key == key);
            let changed = match existing {
                Some(i) => membership.members[i] != me,
                None => true,
            };
            if let Some(other) = membership
                .members
                .iter()
                .find(|m| m.key != key && m.name == cfg.name)
            {
                return Err(MeshError::Config(format!(
                    "gateway name {} is already pinned to device {}; choose another --name",
                    other.name,
                    other.key.device_id().short()
                )));
            }
            if changed {
                membership.members.retain(|m| m.key != key);
                for m in membership.members.iter_mut() {
                    m.primary = false;
                }
                membership.members.insert(0, me);
                membership.epoch += 1;
                store.save_membership(&membership)?;
            }
        }
        let mut peers = HashMap::new();
        for m in &membership.members {
            if m.key != key {
                peers.insert(m.key, Peer::new());
            }
        }
        let health = cfg.health;
        let boot_id: u64 = rand::rng().random();
        let inner = Arc::new(Inner {
            cfg,
            key,
            endpoint,
            store,
            boot_id,
            handler,
            admission,
            state: Mutex::new(State {
                membership,
                local_nodes: LocalDirectory::new(boot_id),
                peers,
                next_link_id: 1,
                shutting_down: false,
                leader: None,
                found: HashMap::new(),
                not_joined: None,
            }),
            shutdown: watch::channel(false).0,
            fatal: watch::channel(None).0,
            pairing: std::sync::OnceLock::new(),
            notices: broadcast::channel(NOTICE_QUEUE).0,
            peer_service: std::sync::OnceLock::new(),
            log_service: std::sync::OnceLock::new(),
            health: watch::channel(health).0,
            vitals: std::sync::OnceLock::new(),
            directory: DirectoryTallies::default(),
        });
        let mesh = Mesh { inner };
        let accept = mesh.clone();
        tokio::spawn(async move { accept.accept_loop().await });
        mesh.spawn_dial_loops();
        let is_member = {
            let st = mesh.state();
            st.membership.members.iter().any(|m| m.key == key)
        };
        if let (Some(addr), false) = (mesh.inner.cfg.join, is_member) {
            mesh.state().not_joined = Some(format!("joining through {addr}"));
            let join = mesh.clone();
            tokio::spawn(async move { join.join_loop(addr).await });
        } else if !is_member && !mesh.inner.cfg.primary {
            // A remote without --join joins through discovered gateways (`join_via`).
            mesh.state().not_joined =
                Some("looking for a gateway of this federation (mDNS/tailnet)".into());
        }
        Ok(mesh)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Critical sections never panic midway through an update; a poisoned lock still holds
        // consistent data.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint's bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    /// This gateway's key.
    pub fn key(&self) -> PublicKey {
        self.inner.key
    }

    /// The settings the mesh runs with.
    pub fn config(&self) -> &MeshConfig {
        &self.inner.cfg
    }

    /// Becomes `Some(reason)` when the mesh cannot go on (e.g. the primary refused our join
    /// for good): the gateway should exit with that message.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.inner.fatal.subscribe()
    }

    /// Shares the pairing registry with the federation: decisions made here are sent to every
    /// gateway, and theirs are merged here (newest wins).
    pub fn attach_pairing(&self, registry: Registry) {
        let _ = self.inner.pairing.set(registry);
    }

    /// Notices from the federation (revocations) for the embedding gateway to act on.
    pub fn notices(&self) -> broadcast::Receiver<MeshNotice> {
        self.inner.notices.subscribe()
    }

    /// Sends pairing decisions made here to every linked gateway.
    pub fn publish_pairing(&self, records: Vec<PairingRecord>) {
        self.broadcast(Event::PairingSync(records));
    }

    /// Sends this host's vitals to every linked gateway with the health pings (every
    /// [`crate::vitals::VITALS_EVERY`] intervals), and shows them in [`Mesh::status`].
    pub fn attach_vitals(&self, sampler: VitalsSampler) {
        let _ = self.inner.vitals.set(sampler);
    }

    /// Relays the host vitals of the nodes attached here to every linked gateway (at most
    /// [`crate::vitals::MAX_RELAYED`]).
    pub fn publish_node_vitals(&self, mut vitals: Vec<NodeVitals>) {
        vitals.truncate(crate::vitals::MAX_RELAYED);
        self.broadcast(Event::NodeVitals(vitals));
    }

    /// Replaces the list of nodes attached here and announces what changed to every gateway
    /// (a delta; see [`crate::directory`]).
    pub fn set_local_nodes(&self, nodes: Vec<NodeSummary>) {
        // Versioned and queued under one lock, so every link's queue holds the deltas in
        // version order and a snapshot queued on a new link is never older than a delta
        // queued after it.
        let mut st = self.state();
        let delta = st.local_nodes.update(nodes);
        self.announce_local(&st, delta);
    }

    /// Applies changes of the nodes attached here (per node: its summary now, or `None`: it
    /// left) and announces what differs to every gateway: the cost and the delta's bytes
    /// follow the change, not the number of nodes (see [`LocalDirectory::apply`]).
    pub fn apply_local_changes(
        &self,
        changes: impl IntoIterator<Item = (DeviceId, Option<NodeSummary>)>,
    ) {
        let mut st = self.state();
        let delta = st.local_nodes.apply(changes);
        self.announce_local(&st, delta);
    }

    /// Queues `delta` (if any) on every link, under the state lock it was made under.
    fn announce_local(&self, st: &State, delta: Option<DirectoryDelta>) {
        let Some(delta) = delta else {
            return;
        };
        let ev = Event::DirectoryDelta(delta);
        for p in st.peers.values() {
            if let Some(l) = &p.link {
                if l.events.try_send(ev.clone()).is_err() {
                    // The peer notices the gap (next delta, or its next pings) and asks.
                    self.inner.directory.dropped.inc(0);
                    debug!("event queue full; the peer will ask for a snapshot");
                }
            }
        }
    }

    /// Queues this gateway's whole directory on one link's event queue.
    fn send_snapshot(&self, tx: &mpsc::Sender<Event>) {
        let st = self.state();
        if tx
            .try_send(Event::NodeDirectory(st.local_nodes.snapshot()))
            .is_err()
        {
            // The peer asks again at a later ping.
            self.inner.directory.dropped.inc(0);
        }
    }

    /// What this gateway's node directory has sent and asked for since it started.
    pub fn directory_stats(&self) -> DirectoryStats {
        let c = &self.inner.directory;
        let at = self.state().local_nodes.at();
        DirectoryStats {
            at,
            deltas_sent: c.deltas.count(),
            delta_bytes: c.deltas.bytes(),
            snapshots_sent: c.snapshots.count(),
            snapshot_bytes: c.snapshots.bytes(),
            resyncs_asked: c.resyncs.count(),
            dropped: c.dropped.count(),
        }
    }

    /// `f` of every other gateway that has a peer entry, under one lock.
    fn each_remote<T>(&self, f: impl Fn(&Member, &Peer) -> T) -> Vec<T> {
        let st = self.state();
        st.membership
            .members
            .iter()
            .filter(|m| m.key != self.inner.key)
            .filter_map(|m| Some(f(m, st.peers.get(&m.key)?)))
            .collect()
    }

    /// The nodes of every other gateway, as last announced, with that gateway's health.
    pub fn remote_nodes(&self) -> Vec<RemoteNodes> {
        self.each_remote(|m, p| RemoteNodes {
            gateway: m.name.clone(),
            status: p.health.status(&self.health()),
            last_seen: p.health.last_seen(),
            nodes: p.nodes.nodes().cloned().collect(),
            vitals: p.node_vitals.clone(),
        })
    }

    /// Every other gateway's directory version (and its nodes if `with_nodes`), read under
    /// one lock so the versions describe the nodes returned with them.
    pub fn remote_directories(&self, with_nodes: bool) -> Vec<RemoteDirectoryView> {
        self.each_remote(|m, p| RemoteDirectoryView {
            key: m.key,
            gateway: m.name.clone(),
            status: p.health.status(&self.health()),
            last_seen: p.health.last_seen(),
            at: p.nodes.at(),
            len: p.nodes.len(),
            nodes: if with_nodes {
                p.nodes.nodes().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    /// The host vitals gateway `gateway` relayed for each of `ids` (`None`: none relayed), in
    /// the order asked: a page of a listing looks up only its own rows.
    pub fn relayed_vitals(&self, gateway: &str, ids: &[DeviceId]) -> Vec<Option<Received>> {
        let st = self.state();
        let peer = st
            .membership
            .members
            .iter()
            .find(|m| m.name == gateway && m.key != self.inner.key)
            .and_then(|m| st.peers.get(&m.key));
        match peer {
            Some(p) if !p.node_vitals.is_empty() => ids
                .iter()
                .map(|id| p.node_vitals.get(id).copied())
                .collect(),
            _ => vec![None; ids.len()],
        }
    }

    /// Every other gateway's claim on one node, by index (no copy of any directory): (the
    /// gateway, its health as seen from here, the node as it announced it). What a
    /// `node.invoke` by exact id needs, at a cost that does not grow with the fleet.
    pub fn remote_claims_of(&self, node: &DeviceId) -> Vec<(String, Status, Arc<NodeSummary>)> {
        let st = self.state();
        st.membership
            .members
            .iter()
            .filter(|m| m.key != self.inner.key)
            .filter_map(|m| {
                let p = st.peers.get(&m.key)?;
                let n = p.nodes.get(node)?;
                Some((m.name.clone(), p.health.status(&self.health()), n.clone()))
            })
            .collect()
    }

    /// The ids of the nodes other gateways announced for which `wanted` holds, each once, in
    /// id order: what resolving a node by name or IP needs (the directories have no name
    /// index). One pass under the state lock over the announced nodes, comparing in place:
    /// nothing is copied but the ids that match.
    pub fn remote_node_ids_where(&self, wanted: impl Fn(&NodeSummary) -> bool) -> Vec<DeviceId> {
        let st = self.state();
        let mut out: Vec<DeviceId> = st
            .membership
            .members
            .iter()
            .filter(|m| m.key != self.inner.key)
            .filter_map(|m| st.peers.get(&m.key))
            .flat_map(|p| p.nodes.nodes())
            .filter(|n| wanted(n))
            .map(|n| n.id)
            .collect();
        drop(st);
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The host vitals other gateways relayed for their nodes: (gateway, node, node name,
    /// reading), for nodes still in that gateway's directory.
    pub fn remote_node_vitals(&self) -> Vec<(String, DeviceId, String, Received)> {
        let st = self.state();
        let mut out = Vec::new();
        for m in st
            .membership
            .members
            .iter()
            .filter(|m| m.key != self.inner.key)
        {
            let Some(p) = st.peers.get(&m.key) else {
                continue;
            };
            for n in p.nodes.nodes() {
                if let Some(v) = p.node_vitals.get(&n.id) {
                    out.push((m.name.clone(), n.id, n.name.clone(), *v));
                }
            }
        }
        out
    }

    fn broadcast(&self, ev: Event) {
        let st = self.state();
        for p in st.peers.values() {
            if let Some(l) = &p.link {
                if l.events.try_send(ev.clone()).is_err() {
                    debug!("event queue full; the peer gets a full update on its next link");
                }
            }
        }
    }

    /// Removes a gateway from the federation (primary only): its pinned key is forgotten, its
    /// links are closed, and every gateway adopts the new member list. A rebuilt gateway with a
    /// new key can then join under the same name with the token.
    pub fn forget(&self, name: &str) -> Result<Member, MeshError> {
        if !self.acting_primary(&self.state()) {
            return Err(MeshError::Config(
                "only the primary can forget a gateway; run this on the primary".into(),
            ));
        }
        let removed = {
            let mut st = self.state();
            let Some(pos) = st.membership.members.iter().position(|m| m.name == name) else {
                return Err(MeshError::Config(format!(
                    "no gateway named {name:?} in this federation"
                )));
            };
            if st.membership.members[pos].key == self.inner.key {
                return Err(MeshError::Config("the primary cannot forget itself".into()));
            }
            let m = st.membership.members.remove(pos);
            st.membership.epoch += 1;
            if let Some(p) = st.peers.remove(&m.key) {
                if let Some(l) = p.link {
                    l.conn
                        .close(VarInt::from_u32(CLOSE_REFUSED), b"removed from federation");
                }
            }
            m
        };
        self.persist_membership()?;
        self.broadcast_membership();
        info!(name, device = %removed.key.device_id().short(), "gateway forgotten");
        Ok(removed)
    }

    /// The health settings in force.
    pub fn health(&self) -> HealthConfig {
        *self.inner.health.borrow()
    }

    /// Changes the health interval and threshold of every link, at once (each link restarts
    /// its ping timer). Raft timings keep the interval they started with.
    pub fn set_health(&self, health: HealthConfig) {
        let changed = self.inner.health.send_if_modified(|h| {
            let changed = *h != health;
            *h = health;
            changed
        });
        if changed {
            info!(interval = ?health.interval, threshold = health.unhealthy_threshold, "health settings changed");
        }
    }

    /// Plugs in the service for `raft.*` requests from other gateways (once).
    pub fn attach_peer_service(&self, service: Arc<dyn PeerService>) {
        let _ = self.inner.peer_service.set(service);
    }

    /// Plugs in the service for `logs.*` requests from other gateways (once): shipping to the
    /// collector and queries of it.
    pub fn attach_log_service(&self, service: Arc<dyn PeerService>) {
        let _ = self.inner.log_service.set(service);
    }

    /// The federation's primary as this gateway sees it: the raft leader the consensus
    /// reported, or the configured primary while no consensus has reported (`None`: an
    /// election is under way).
    pub fn primary_key(&self) -> Option<PublicKey> {
        let st = self.state();
        match st.leader {
            Some(leader) => leader,
            None => st
                .membership
                .members
                .iter()
                .find(|m| m.primary)
                .map(|m| m.key),
        }
    }

    /// The name of the member with `key` (this gateway's own name for its own key).
    pub fn member_name(&self, key: &PublicKey) -> Option<String> {
        if *key == self.inner.key {
            return Some(self.inner.cfg.name.clone());
        }
        let st = self.state();
        st.membership
            .members
            .iter()
            .find(|m| m.key == *key)
            .map(|m| m.name.clone())
    }

    /// Reports the raft leader, which `status()` then shows as the primary (`None`: no leader
    /// right now, e.g. during an election or without a majority).
    pub fn set_leader(&self, leader: Option<PublicKey>) {
        self.state().leader = Some(leader);
    }

    /// Forgets the reported raft leader: `status()` shows the configured primary again (for a
    /// gateway whose consensus has not joined the group yet).
    pub fn clear_leader(&self) {
        self.state().leader = None;
    }

    /// Every member of the federation (pinned keys, names, addresses), in join order.
    pub fn members(&self) -> Vec<Member> {
        self.state().membership.members.clone()
    }

    /// Whether the link to the gateway with `key` is up and answering pings (always true for
    /// this gateway itself).
    pub fn is_reachable(&self, key: &PublicKey) -> bool {
        if *key == self.inner.key {
            return true;
        }
        self.peer_reachable(&self.state(), key)
    }

    /// Whether the link to peer `key` is up and answering pings, read from `st`.
    fn peer_reachable(&self, st: &State, key: &PublicKey) -> bool {
        st.peers
            .get(key)
            .is_some_and(|p| p.link.is_some() && p.health.status(&self.health()) != Status::Offline)
    }

    /// The live connection to the gateway with `key`, for raft messages.
    pub fn connection_by_key(&self, key: &PublicKey) -> Option<Connection> {
        let st = self.state();
        st.peers.get(key)?.link.as_ref().map(|l| l.conn.clone())
    }

    /// The live connection to the named gateway, for forwarding requests.
    pub fn connection_to(&self, name: &str) -> Option<Connection> {
        let st = self.state();
        let key = st.membership.members.iter().find(|m| m.name == name)?.key;
        st.peers.get(&key)?.link.as_ref().map(|l| l.conn.clone())
    }

    /// Every gateway and its health, self first.
    pub fn status(&self) -> MeshStatus {
        let cfg = &self.inner.cfg;
        let st = self.state();
        let mut gateways = Vec::new();
        let mut any_down = false;
        let is_primary = |m: &Member| match st.leader {
            Some(leader) => leader == Some(m.key),
            None => m.primary,
        };
        for m in &st.membership.members {
            if m.key == self.inner.key {
                continue;
            }
            let peer = st.peers.get(&m.key);
            let status = peer
                .map(|p| p.health.status(&self.health()))
                .unwrap_or(Status::Offline);
            any_down |= status != Status::Healthy;
            gateways.push(GatewayStatus {
                name: m.name.clone(),
                region: m.region.clone(),
                device_id: m.key.device_id(),
                primary: is_primary(m),
                status,
                latency: peer.and_then(|p| {
                    p.health
                        .is_link_up()
                        .then(|| p.health.median_rtt())
                        .flatten()
                }),
                latency_p99: peer.and_then(|p| p.health.p99_rtt()),
                last_seen: peer.and_then(|p| p.health.last_seen()),
                addr: m.addr.clone(),
                version: peer.and_then(|p| p.software.clone()),
                is_self: false,
                missed: peer.map(|p| p.health.missed()).unwrap_or(0),
                last_error: peer.and_then(|p| {
                    if p.link.is_some() {
                        None
                    } else {
                        p.last_error.clone()
                    }
                }),
                found: st.found.get(&m.key).cloned(),
                vitals: peer.and_then(|p| p.vitals),
            });
        }
        let me = st
            .membership
            .members
            .iter()
            .find(|m| m.key == self.inner.key);
        let self_row = GatewayStatus {
            name: cfg.name.clone(),
            region: cfg.region.clone(),
            device_id: self.inner.key.device_id(),
            primary: match st.leader {
                Some(leader) => leader == Some(self.inner.key),
                None => me.map(|m| m.primary).unwrap_or(cfg.primary),
            },
            status: if any_down {
                Status::Degraded
            } else {
                Status::Healthy
            },
            latency: Some(Duration::ZERO),
            latency_p99: Some(Duration::ZERO),
            last_seen: Some(SystemTime::now()),
            addr: cfg.advertise.clone(),
            version: Some(cfg.software.clone()),
            is_self: true,
            missed: 0,
            last_error: None,
            found: None,
            vitals: self
                .inner
                .vitals
                .get()
                .map(|s| Received::now(s.current(), Duration::ZERO)),
        };
        gateways.insert(0, self_row);
        MeshStatus {
            self_name: cfg.name.clone(),
            primary: st
                .membership
                .members
                .iter()
                .find(|m| is_primary(m))
                .map(|m| m.name.clone()),
            epoch: st.membership.epoch,
            gateways,
            health: self.health(),
            not_joined: st.not_joined.clone(),
        }
    }

    /// Stops the mesh: tells every peer why, closes every link, waits briefly for the closes
    /// to be delivered.
    pub async fn shutdown(&self, reason: &str) {
        let conns: Vec<Connection> = {
            let mut st = self.state();
            st.shutting_down = true;
            st.peers
                .values_mut()
                .filter_map(|p| p.link.take().map(|l| l.conn))
                .collect()
        };
        let _ = self.inner.shutdown.send(true);
        for c in &conns {
            c.close(VarInt::from_u32(CLOSE_NORMAL), reason.as_bytes());
        }
        self.inner
            .endpoint
            .close(VarInt::from_u32(CLOSE_NORMAL), reason.as_bytes());
        // Bounded: the close frames go out in one round trip; a peer that is gone must not
        // hold our exit.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
        info!(reason, "mesh stopped");
    }

    fn spawn_dial_loops(&self) {
        let keys: Vec<PublicKey> = {
            let mut st = self.state();
            if st.shutting_down {
                return;
            }
            let mut keys = Vec::new();
            for (k, p) in st.peers.iter_mut() {
                if !p.dialing {
                    p.dialing = true;
                    keys.push(*k);
                }
            }
            keys
        };
        for k in keys {
            let mesh = self.clone();
            tokio::spawn(async move { mesh.dial_loop(k).await });
        }
    }

    async fn dial_loop(&self, key: PublicKey) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut backoff = Backoff::new(REDIAL_BASE, REDIAL_CAP);
        let mut first = true;
        let span = tracing::info_span!("dial", peer = %key.device_id().short());
        async {
            loop {
                let (mut linked, addr, name) = {
                    let st = self.state();
                    let Some(peer) = st.peers.get(&key) else {
                        return;
                    };
                    let Some(m) = st.membership.members.iter().find(|m| m.key == key) else {
                        return;
                    };
                    (peer.linked.subscribe(), m.addr.clone(), m.name.clone())
                };
                // Wait until there is no link to this peer.
                loop {
                    if *shutdown.borrow() {
                        return;
                    }
                    if !*linked.borrow_and_update() {
                        break;
                    }
                    backoff.reset();
                    first = false;
                    tokio::select! {
                        r = linked.changed() => if r.is_err() { return },
                        _ = shutdown.changed() => return,
                    }
                }
                if first && self.inner.key > key {
                    // When two gateways learn of each other at once, let the one with the
                    // smaller key dial first; the other dials only if no link appears.
                    tokio::select! {
                        _ = tokio::time::sleep(FIRST_DIAL_GRACE) => {},
                        _ = shutdown.changed() => return,
                    }
                    if *linked.borrow() {
                        first = false;
                        continue;
                    }
                }
                if !first {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {},
                        _ = shutdown.changed() => return,
                    }
                    if *linked.borrow() {
                        continue;
                    }
                }
                first = false;
                let target = match resolve(&addr).await {
                    Ok(a) => a,
                    Err(e) => {
                        self.set_last_error(&key, e.clone());
                        debug!(%name, "cannot resolve {addr}: {e}");
                        continue;
                    }
                };
                match self.dial_gateway(target, Some((key, name.clone()))).await {
                    Ok(()) => {}
                    Err(e) => {
                        self.set_last_error(&key, e.to_string());
                        debug!(%name, %target, "dial failed: {e}");
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn set_last_error(&self, key: &PublicKey, err: String) {
        if let Some(p) = self.state().peers.get_mut(key) {
            p.last_error = Some(err);
        }
    }

    async fn join_loop(&self, addr: SocketAddr) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut backoff = Backoff::new(REDIAL_BASE, REDIAL_CAP);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.dial_gateway_claimed(addr, None, None).await {
                Ok(key) => {
                    self.state().not_joined = None;
                    info!(%addr, "joined the federation");
                    self.note_found(key, "static");
                    return;
                }
                Err(MeshError::Handshake(HandshakeError::Refused { refusal, .. }))
                    if !refusal.retryable =>
                {
                    let msg = format!("join refused by {addr}: {}", refusal.message);
                    warn!("{msg}");
                    // send_replace: stored even before anyone subscribed (a plain send to a
                    // channel without receivers is dropped, and the gateway subscribes only
                    // once it is ready, which a fast refusal can beat).
                    self.inner.fatal.send_replace(Some(msg));
                    return;
                }
                Err(e @ MeshError::BadWelcomeProof { .. }) => {
                    warn!("{e}");
                    self.inner.fatal.send_replace(Some(e.to_string()));
                    return;
                }
                Err(e) => {
                    self.state().not_joined = Some(format!("join through {addr} unanswered: {e}"));
                    warn!(%addr, "joining the federation: {e}; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {},
                _ = shutdown.changed() => return,
            }
            // Joined meanwhile through another path (e.g. a member dial loop)?
            let mut st = self.state();
            if st
                .membership
                .members
                .iter()
                .any(|m| m.key == self.inner.key)
            {
                st.not_joined = None;
                return;
            }
        }
    }

    /// Whether this gateway is in the federation's member list (the primary, or joined).
    pub fn is_member(&self) -> bool {
        let key = self.inner.key;
        self.state().membership.members.iter().any(|m| m.key == key)
    }

    /// One join attempt through a discovered gateway at `addr` (mDNS, tailnet). `claimed` is
    /// the key its advertisement claims: discovery only says where to knock, so a gateway that
    /// proves another key is refused ([`MeshError::AdvertisedKeyMismatch`]) before any hello.
    /// The join token proofs apply as for `--join`. Unlike the `--join` loop this does not
    /// retry and never makes a refusal fatal: the caller tries its next candidate.
    pub async fn join_via(
        &self,
        addr: SocketAddr,
        claimed: Option<PublicKey>,
    ) -> Result<PublicKey, MeshError> {
        let r = self.dial_gateway_claimed(addr, None, claimed).await;
        let mut st = self.state();
        let member = st
            .membership
            .members
            .iter()
            .any(|m| m.key == self.inner.key);
        st.not_joined = match &r {
            _ if member => None,
            Ok(_) => None,
            Err(e) => Some(format!("join through discovered {addr} failed: {e}")),
        };
        r
    }

    /// Records how the peer with `key` was found (`static`, `mdns`, `tailnet`), shown by
    /// `gateway status --all`; the first record wins.
    pub fn note_found(&self, key: PublicKey, source: &str) {
        if key != self.inner.key {
            self.state()
                .found
                .entry(key)
                .or_insert_with(|| source.to_string());
        }
    }

    /// Dials a gateway. `expected` is the member we think is there; `None` when joining.
    async fn dial_gateway(
        &self,
        addr: SocketAddr,
        expected: Option<(PublicKey, String)>,
    ) -> Result<(), MeshError> {
        self.dial_gateway_claimed(addr, expected, None)
            .await
            .map(|_| ())
    }

    /// [`Mesh::dial_gateway`], also refusing a peer that proves a key other than `claimed`.
    async fn dial_gateway_claimed(
        &self,
        addr: SocketAddr,
        expected: Option<(PublicKey, String)>,
        claimed: Option<PublicKey>,
    ) -> Result<PublicKey, MeshError> {
        let conn = endpoint::dial(&self.inner.endpoint, addr, DIAL_TIMEOUT).await?;
        let Some(key) = endpoint::peer_key(&conn) else {
            conn.close(VarInt::from_u32(CLOSE_REFUSED), b"no device key");
            return Err(MeshError::Config(format!("{addr} presented no device key")));
        };
        if let Some(claimed) = claimed {
            if claimed != key {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"not the advertised key");
                return Err(MeshError::AdvertisedKeyMismatch {
                    addr,
                    advertised: claimed.device_id().short(),
                    proven: key.device_id().short(),
                });
            }
        }
        if key == self.inner.key {
            conn.close(VarInt::from_u32(CLOSE_REFUSED), b"self");
            return Err(MeshError::Config(format!(
                "{addr} is this gateway itself; check --join"
            )));
        }
        if let Some((want, name)) = &expected {
            if *want != key {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"unexpected device key");
                return Err(MeshError::KeyMismatch {
                    addr,
                    name: name.clone(),
                    want: want.device_id().short(),
                    got: key.device_id().short(),
                });
            }
        }
        let known = self.state().peers.contains_key(&key);
        let proof = match (&self.inner.cfg.token, known) {
            (Some(t), false) => Some(handshake::join_proof(t, &self.inner.key, &key)),
            _ => None,
        };
        let nonce: u64 = rand::rng().random();
        let hello = handshake::hello(
            &self.inner.cfg.software,
            self.inner.boot_id,
            HelloRole::Gateway(GatewayHello {
                name: self.inner.cfg.name.clone(),
                region: self.inner.cfg.region.clone(),
                advertise: self.inner.cfg.advertise.clone(),
                join_proof: proof,
                primary: self.inner.cfg.primary,
                link_nonce: nonce,
            }),
        );
        let welcome = match handshake::send_hello(&conn, &hello).await {
            Ok(w) => w,
            Err(e) => {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"hello failed");
                return Err(e.into());
            }
        };
        if proof.is_some() {
            let ok = match (&welcome.join_proof, &self.inner.cfg.token) {
                (Some(p), Some(t)) => handshake::verify_welcome_proof(t, &self.inner.key, &key, p),
                _ => false,
            };
            if !ok {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"bad welcome proof");
                return Err(MeshError::BadWelcomeProof { addr });
            }
        }
        if let Some(m) = welcome.membership.clone() {
            // On a join, the gateway that admitted us proved it knows the token: its list is
            // the federation's, whether it is the configured primary or the acting one.
            let from = if proof.is_some() { None } else { Some(key) };
            self.adopt_membership(from, m, false);
        }
        self.install_link(
            key,
            conn,
            welcome.boot_id,
            (self.inner.key, nonce),
            Some(welcome.software.clone()),
        );
        // Dial loops start after the link is installed, so none races this link.
        self.spawn_dial_loops();
        Ok(key)
    }

    async fn accept_loop(&self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let incoming = tokio::select! {
                i = self.inner.endpoint.accept() => i,
                _ = shutdown.changed() => return,
            };
            let Some(incoming) = incoming else { return };
            if self.inner.endpoint.open_connections() >= MAX_CONNECTIONS {
                warn!(remote = %incoming.remote_address(), "refusing connection: {MAX_CONNECTIONS} connections open");
                incoming.refuse();
                continue;
            }
            let mesh = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match endpoint::accept(incoming).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(%remote, "refused connection: {e}");
                        return;
                    }
                };
                mesh.handle_connection(conn).await;
            });
        }
    }

    async fn handle_connection(&self, conn: Connection) {
        let remote = conn.remote_address();
        let Some(key) = endpoint::peer_key(&conn) else {
            warn!(%remote, "refused connection: no device key");
            conn.close(VarInt::from_u32(CLOSE_REFUSED), b"device key required");
            return;
        };
        let (hello, mut send) = match handshake::read_hello(&conn).await {
            Ok(h) => h,
            Err(e) => {
                warn!(%remote, device = %key.device_id().short(), "refused connection: {e}");
                close_after_reply(conn, "bad hello").await;
                return;
            }
        };
        if let HelloRole::Gateway(g) = &hello.role {
            let g = g.clone();
            return self.accept_gateway(conn, send, key, &hello, g).await;
        }
        // Admission may touch the state database (pairing): keep it off the async workers so
        // a burst of joining nodes never stalls established links.
        let (admission, h) = (self.inner.admission.clone(), hello.clone());
        let decision = tokio::task::spawn_blocking(move || admission.admit(&key, remote, &h))
            .await
            .unwrap_or_else(|e| {
                Err(Refusal {
                    code: RefusalCode::Unavailable,
                    message: format!("admission failed: {e}"),
                    retryable: true,
                })
            });
        match decision {
            Ok(kind) => {
                if !matches!(kind, CallerKind::Node { .. }) {
                    // An operator may fan requests out: the full stream limit (a node keeps
                    // the small one it was accepted with, see `TransportOptions`).
                    endpoint::grant_streams(&conn);
                }
                let scopes = match &kind {
                    CallerKind::Operator { scopes, .. } => scopes.clone(),
                    _ => Vec::new(),
                };
                // Nodes learn every gateway of the federation, to fail over to.
                let membership = matches!(kind, CallerKind::Node { .. })
                    .then(|| self.state().membership.clone());
                let welcome = self.welcome(None, membership, scopes);
                if handshake::reply(&mut send, &HelloReply::Welcome(welcome))
                    .await
                    .is_err()
                {
                    return;
                }
                let caller = Caller {
                    key: Some(key),
                    kind,
                    remote,
                };
                self.inner.admission.connected(conn, caller, hello);
            }
            Err(refusal) => {
                if refusal.code == RefusalCode::PairingRequired {
                    // The admission logged the pending request already: one line per event.
                    debug!(%remote, device = %key.device_id().short(), "refused: {}", refusal.message);
                } else {
                    warn!(%remote, device = %key.device_id().short(), "refused: {}", refusal.message);
                }
                let _ = handshake::reply(&mut send, &HelloReply::Refused(refusal)).await;
                close_after_reply(conn, "refused").await;
            }
        }
    }

    fn welcome(
        &self,
        join_proof: Option<[u8; 32]>,
        membership: Option<Membership>,
        scopes: Vec<String>,
    ) -> Welcome {
        Welcome {
            version: PROTOCOL_VERSION,
            software: self.inner.cfg.software.clone(),
            boot_id: self.inner.boot_id,
            name: self.inner.cfg.name.clone(),
            region: self.inner.cfg.region.clone(),
            join_proof,
            membership,
            scopes,
            health_interval_ms: self.health().interval.as_millis() as u64,
        }
    }

    /// Decides on a gateway's hello. Only the primary admits new gateways.
    fn admit_gateway(
        &self,
        key: PublicKey,
        g: &GatewayHello,
    ) -> Result<(Option<[u8; 32]>, bool), Refusal> {
        let refuse = |code, message: String, retryable| Refusal {
            code,
            message,
            retryable,
        };
        let mut st = self.state();
        if st.shutting_down {
            return Err(refuse(
                RefusalCode::Unavailable,
                "gateway is shutting down".into(),
                true,
            ));
        }
        if let Some(other) = st
            .membership
            .members
            .iter()
            .find(|m| m.name == g.name && m.key != key)
        {
            return Err(refuse(
                RefusalCode::NameTaken,
                format!(
                    "gateway name {:?} is pinned to device {}, but this device is {}; if {} was rebuilt, remove it first with `clawmesh gateway forget {}` on the primary, or choose another --name",
                    g.name,
                    other.key.device_id().short(),
                    key.device_id().short(),
                    g.name,
                    g.name
                ),
                false,
            ));
        }
        let is_member = st.membership.members.iter().any(|m| m.key == key);
        let welcome_proof = match (&g.join_proof, &self.inner.cfg.token) {
            (Some(_), Some(t)) => Some(handshake::welcome_proof(t, &key, &self.inner.key)),
            _ => None,
        };
        if is_member {
            // Keep the member's address and labels current.
            let mut changed = false;
            if self.acting_primary(&st) {
                if let Some(m) = st.membership.members.iter_mut().find(|m| m.key == key) {
                    if m.addr != g.advertise || m.name != g.name || m.region != g.region {
                        m.addr = g.advertise.clone();
                        m.name = g.name.clone();
                        m.region = g.region.clone();
                        changed = true;
                    }
                }
                if changed {
                    st.membership.epoch += 1;
                }
            }
            return Ok((welcome_proof, changed));
        }
        if !self.acting_primary(&st) {
            let leader = match st.leader {
                Some(Some(k)) => Some(k),
                _ => None,
            };
            let primary = st
                .membership
                .members
                .iter()
                .find(|m| leader.map_or(m.primary, |l| m.key == l))
                .map(|m| format!("{} at {}", m.name, m.addr))
                .unwrap_or_else(|| "the primary".into());
            return Err(refuse(
                RefusalCode::UnknownPeer,
                format!(
                    "device {} is not a member of this federation yet; join through {primary}",
                    key.device_id().short()
                ),
                true,
            ));
        }
        let Some(token) = &self.inner.cfg.token else {
            return Err(refuse(
                RefusalCode::BadToken,
                "this primary has no join token configured (--token / CLAWMESH_TOKEN), so it admits no new gateways".into(),
                false,
            ));
        };
        let Some(proof) = &g.join_proof else {
            return Err(refuse(
                RefusalCode::BadToken,
                "a join token is required to join this federation (--token or CLAWMESH_TOKEN)"
                    .into(),
                false,
            ));
        };
        if !handshake::verify_join_proof(token, &key, &self.inner.key, proof) {
            return Err(refuse(
                RefusalCode::BadToken,
                "join token mismatch: the token given to this gateway is not the federation's"
                    .into(),
                false,
            ));
        }
        st.membership.members.push(Member {
            key,
            name: g.name.clone(),
            region: g.region.clone(),
            addr: g.advertise.clone(),
            primary: false,
            joined_at_ms: now_ms(),
        });
        st.membership.epoch += 1;
        st.peers.entry(key).or_insert_with(Peer::new);
        info!(name = %g.name, device = %key.device_id().short(), "admitted new gateway; key pinned");
        Ok((welcome_proof, true))
    }

    async fn accept_gateway(
        &self,
        conn: Connection,
        mut send: quinn::SendStream,
        key: PublicKey,
        hello: &Hello,
        g: GatewayHello,
    ) {
        let remote = conn.remote_address();
        match self.admit_gateway(key, &g) {
            Ok((proof, changed)) => {
                if changed {
                    if let Err(e) = self.persist_membership() {
                        warn!("cannot persist membership: {e}");
                        let _ = handshake::reply(
                            &mut send,
                            &HelloReply::Refused(Refusal {
                                code: RefusalCode::Unavailable,
                                message: format!("primary cannot persist membership: {e}"),
                                retryable: true,
                            }),
                        )
                        .await;
                        close_after_reply(conn, "refused").await;
                        return;
                    }
                }
                // A member gateway: the full stream limit before it can send a request.
                endpoint::grant_streams(&conn);
                let membership = self.state().membership.clone();
                let welcome = self.welcome(proof, Some(membership), Vec::new());
                if handshake::reply(&mut send, &HelloReply::Welcome(welcome))
                    .await
                    .is_err()
                {
                    return;
                }
                self.install_link(
                    key,
                    conn,
                    hello.boot_id,
                    (key, g.link_nonce),
                    Some(hello.software.clone()),
                );
                self.spawn_dial_loops();
                if changed {
                    self.broadcast_membership();
                }
            }
            Err(refusal) => {
                warn!(%remote, name = %g.name, device = %key.device_id().short(), "refused gateway: {}", refusal.message);
                let _ = handshake::reply(&mut send, &HelloReply::Refused(refusal)).await;
                close_after_reply(conn, "refused").await;
            }
        }
    }

    fn persist_membership(&self) -> Result<(), StoreError> {
        let m = self.state().membership.clone();
        self.inner.store.save_membership(&m)
    }

    fn broadcast_membership(&self) {
        let st = self.state();
        let m = st.membership.clone();
        for p in st.peers.values() {
            if let Some(l) = &p.link {
                if l.events.try_send(Event::Membership(m.clone())).is_err() {
                    debug!("event queue full; membership will be resent on the next change");
                }
            }
        }
    }

    /// Whether this gateway admits and forgets gateways now: it is the configured primary, or
    /// the raft leader (the federation's primary while the configured one is away).
    fn acting_primary(&self, st: &State) -> bool {
        if self.inner.cfg.primary {
            return true;
        }
        if st.leader != Some(Some(self.inner.key)) {
            return false;
        }
        // Only while the configured primary is unreachable: two gateways admitting at once
        // would both write the next epoch.
        !st.membership
            .members
            .iter()
            .filter(|m| m.primary && m.key != self.inner.key)
            .any(|m| self.peer_reachable(st, &m.key))
    }

    /// The member list and its epoch, as this gateway knows it.
    pub fn membership(&self) -> Membership {
        self.state().membership.clone()
    }

    /// Adopts a member list that the federation's raft log committed, if it is newer than
    /// ours (a gateway that was away learns of joins and forgotten gateways this way, even
    /// while the configured primary is down).
    pub fn adopt_replicated(&self, m: Membership) {
        self.adopt_membership(None, m, true);
    }

    /// Adopts a member list from `from` (`None`: from the raft log) if it is the primary's and
    /// newer than ours.
    fn adopt_membership(&self, from: Option<PublicKey>, m: Membership, spawn_dials: bool) {
        // The configured primary owns its list; only the committed log (which may hold a list
        // another gateway admitted while this one was down) overrides it.
        if self.inner.cfg.primary && from.is_some() {
            return;
        }
        let adopted = {
            let mut st = self.state();
            let current_primary = st
                .membership
                .members
                .iter()
                .find(|x| x.primary)
                .map(|x| x.key);
            let sender_primary = m.members.iter().any(|x| Some(x.key) == from && x.primary);
            let authoritative = match (from, current_primary) {
                // From the committed raft log: the primary's list, agreed by a majority.
                (None, _) => true,
                (Some(from), Some(p)) => p == from || sender_primary,
                (Some(_), None) => sender_primary,
            };
            // A committed list also replaces a local one of the same epoch that differs (admitted
            // here while cut off from the majority: the log's history wins).
            let newer = m.epoch > st.membership.epoch
                || (from.is_none() && m.epoch == st.membership.epoch && m != st.membership);
            if !authoritative || !newer {
                false
            } else {
                for mem in &m.members {
                    if mem.key != self.inner.key {
                        st.peers.entry(mem.key).or_insert_with(Peer::new);
                    }
                }
                let keep: Vec<PublicKey> = m.members.iter().map(|x| x.key).collect();
                let removed: Vec<PublicKey> = st
                    .peers
                    .keys()
                    .filter(|k| !keep.contains(k))
                    .copied()
                    .collect();
                for k in removed {
                    if let Some(p) = st.peers.remove(&k) {
                        if let Some(l) = p.link {
                            l.conn
                                .close(VarInt::from_u32(CLOSE_NORMAL), b"removed from federation");
                        }
                    }
                }
                st.membership = m;
                true
            }
        };
        if adopted {
            if let Err(e) = self.persist_membership() {
                warn!("cannot persist membership: {e}");
            }
            if spawn_dials {
                self.spawn_dial_loops();
            }
        }
    }

    fn install_link(
        &self,
        key: PublicKey,
        conn: Connection,
        peer_boot: u64,
        order: (PublicKey, u64),
        software: Option<String>,
    ) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        // Both gateways may dial at once: the second link of the same boot replaces the
        // first quietly, so "link up" is logged once per peer, not once per link.
        let mut duplicate = false;
        let (id, name, is_primary_self) = {
            let mut st = self.state();
            let name = st
                .membership
                .members
                .iter()
                .find(|m| m.key == key)
                .map(|m| m.name.clone())
                .unwrap_or_else(|| key.device_id().short());
            let id = st.next_link_id;
            st.next_link_id += 1;
            let shutting = st.shutting_down;
            let Some(peer) = st.peers.get_mut(&key) else {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"not a member");
                return;
            };
            if shutting {
                conn.close(VarInt::from_u32(CLOSE_NORMAL), b"shutting down");
                return;
            }
            if let Some(existing) = &peer.link {
                if existing.conn.close_reason().is_none() {
                    if existing.peer_boot == peer_boot {
                        if existing.order <= order {
                            debug!(%name, "duplicate link; keeping the existing one");
                            conn.close(VarInt::from_u32(CLOSE_NORMAL), b"duplicate link");
                            return;
                        }
                        debug!(%name, "duplicate link; replacing the existing one");
                        duplicate = true;
                    } else {
                        info!(%name, "peer restarted; replacing its old link");
                    }
                    existing
                        .conn
                        .close(VarInt::from_u32(CLOSE_NORMAL), b"duplicate link");
                }
            }
            peer.link = Some(Link {
                id,
                conn: conn.clone(),
                peer_boot,
                order,
                events: tx.clone(),
            });
            peer.health.link_up();
            peer.nodes.expect_snapshot();
            peer.software = software;
            peer.last_error = None;
            let _ = peer.linked.send(true);
            (id, name, self.inner.cfg.primary)
        };
        if duplicate {
            debug!(peer = %name, remote = %conn.remote_address(), "link up (duplicate replaced)");
        } else {
            info!(peer = %name, remote = %conn.remote_address(), "link up");
        }
        if is_primary_self {
            let m = self.state().membership.clone();
            let _ = tx.try_send(Event::Membership(m));
        }
        self.send_snapshot(&tx);
        if let Some(reg) = self.inner.pairing.get() {
            match reg.records() {
                Ok(r) if !r.is_empty() => {
                    // In chunks, each a frame far under the frame limit, waiting for room in
                    // the link's queue: 100 000 devices are 20 events, none dropped.
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        for chunk in r.chunks(SYNC_CHUNK) {
                            if tx.send(Event::PairingSync(chunk.to_vec())).await.is_err() {
                                return;
                            }
                        }
                    });
                }
                Ok(_) => {}
                Err(e) => warn!("cannot read pairing records to share: {e}"),
            }
        }
        let mesh = self.clone();
        let span = tracing::info_span!("link", peer = %name, link = id);
        tokio::spawn(
            async move {
                mesh.run_link(key, id, conn, rx, name).await;
            }
            .instrument(span),
        );
    }

    async fn run_link(
        &self,
        key: PublicKey,
        id: u64,
        conn: Connection,
        mut events: mpsc::Receiver<Event>,
        name: String,
    ) {
        let caller = Caller {
            key: Some(key),
            kind: CallerKind::Gateway { name: name.clone() },
            remote: conn.remote_address(),
        };
        let handler: Arc<dyn Handler> = Arc::new(LinkHandler {
            mesh: self.clone(),
            from: key,
            methods: self.inner.handler.clone(),
        });
        let serve = tokio::spawn(rpc::serve(conn.clone(), caller, handler));
        let mut health_rx = self.inner.health.subscribe();
        let mut tick = tokio::time::interval(self.health().interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut event_stream: Option<quinn::SendStream> = None;
        let mut vitals_stream: Option<quinn::SendStream> = None;
        let mut vitals_refused = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    let (unresponsive, directory) = {
                        let mut st = self.state();
                        match st.peers.get_mut(&key) {
                            Some(p) if p.link.as_ref().map(|l| l.id) == Some(id) => {
                                p.health.ping_sent(seq, Instant::now());
                                (p.health.status(&self.health()) == Status::Offline, st.local_nodes.at())
                            }
                            _ => break,
                        }
                    };
                    if unresponsive {
                        // Offline by missed pings: close the link so every request pending on
                        // it fails now, and let the dial loops find the peer again.
                        let msg = format!("no answer to {} pings", self.health().unhealthy_threshold);
                        conn.close(VarInt::from_u32(crate::liveness::CLOSE_UNRESPONSIVE), msg.as_bytes());
                        break;
                    }
                    if let Ok(bytes) = frame::encode_datagram(&Datagram::LinkPing { seq, directory }) {
                        let _ = conn.send_datagram(bytes.into());
                    }
                    let due = seq.saturating_sub(1).is_multiple_of(crate::vitals::VITALS_EVERY);
                    if let Some(sampler) = self.inner.vitals.get().filter(|_| due) {
                        if let Ok(b) = frame::encode_datagram(&Datagram::Vitals(sampler.current())) {
                            let _ = conn.send_datagram(b.into());
                        }
                    }
                }
                dg = conn.read_datagram() => {
                    let Ok(bytes) = dg else { break };
                    match frame::decode_datagram::<Datagram>(&bytes) {
                        Ok(Datagram::Ping { seq }) => {
                            if let Ok(b) = frame::encode_datagram(&Datagram::Pong { seq }) {
                                let _ = conn.send_datagram(b.into());
                            }
                        }
                        Ok(Datagram::LinkPing { seq, directory }) => {
                            if let Ok(b) = frame::encode_datagram(&Datagram::Pong { seq }) {
                                let _ = conn.send_datagram(b.into());
                            }
                            self.peer_directory_at(key, id, directory);
                        }
                        Ok(Datagram::Pong { seq }) => {
                            let mut st = self.state();
                            if let Some(p) = st.peers.get_mut(&key) {
                                if p.link.as_ref().map(|l| l.id) == Some(id) {
                                    p.health.pong(seq, Instant::now());
                                }
                            }
                        }
                        Ok(Datagram::Vitals(v)) => {
                            if let Some(p) = self.state().peers.get_mut(&key) {
                                p.vitals = Some(Received::now(v, Duration::ZERO));
                            }
                        }
                        Err(e) => debug!("bad datagram: {e}"),
                    }
                }
                uni = conn.accept_uni() => {
                    let Ok(recv) = uni else { break };
                    let mesh = self.clone();
                    tokio::spawn(async move { mesh.read_events(key, id, recv).await }.in_current_span());
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    if matches!(ev, Event::NodeVitals(_)) {
                        // A stream of its own: a peer too old to know the event drops that
                        // stream, not the one carrying membership and directories.
                        if vitals_stream.is_none() && !vitals_refused {
                            vitals_stream = conn.open_uni().await.ok();
                        }
                        if let Some(s) = vitals_stream.as_mut() {
                            if let Err(e) = frame::write_frame(s, &ev, MAX_FRAME).await {
                                debug!("peer does not take node vitals: {e}");
                                vitals_stream = None;
                                vitals_refused = true;
                            }
                        }
                        continue;
                    }
                    if event_stream.is_none() {
                        match conn.open_uni().await {
                            Ok(s) => event_stream = Some(s),
                            Err(_) => break,
                        }
                    }
                    if let Some(s) = event_stream.as_mut() {
                        let bytes = match frame::encode(&ev, MAX_FRAME) {
                            Ok(b) => b,
                            Err(e) => {
                                warn!("event not sent: {e}");
                                continue;
                            }
                        };
                        match &ev {
                            Event::DirectoryDelta(_) => self.inner.directory.deltas.inc(bytes.len() as u64),
                            Event::NodeDirectory(_) => self.inner.directory.snapshots.inc(bytes.len() as u64),
                            _ => {}
                        }
                        if let Err(e) = s.write_all(&bytes).await {
                            debug!("event stream failed: {e}");
                            break;
                        }
                    }
                }
                changed = health_rx.changed() => {
                    if changed.is_ok() {
                        let interval = health_rx.borrow_and_update().interval;
                        tick = tokio::time::interval(interval);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                _ = conn.closed() => break,
            }
        }
        serve.abort();
        let reason = conn
            .close_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "link task ended".into());
        let mut st = self.state();
        if let Some(p) = st.peers.get_mut(&key) {
            if p.link.as_ref().map(|l| l.id) == Some(id) {
                p.link = None;
                p.health.link_down();
                p.last_error = Some(reason.clone());
                let _ = p.linked.send(false);
                info!(peer = %name, "link down: {reason}");
            }
        }
    }

    async fn read_events(&self, from: PublicKey, link: u64, mut recv: quinn::RecvStream) {
        loop {
            match frame::read_frame::<_, Event>(&mut recv, MAX_FRAME).await {
                Ok(Some(Event::Membership(m))) => self.adopt_membership(Some(from), m, true),
                Ok(Some(Event::Goodbye { reason })) => {
                    info!("peer says goodbye: {reason}");
                }
                Ok(Some(Event::NodeDirectory(snap))) => {
                    let at = snap.at;
                    let mut st = self.state();
                    if let Some(p) = current_link_peer(&mut st, &from, link) {
                        if p.nodes.apply_snapshot(snap) {
                            debug!(at = %at, nodes = p.nodes.len(), "directory snapshot taken");
                        }
                    }
                }
                Ok(Some(Event::DirectoryDelta(delta))) => {
                    let at = delta.at;
                    let ask = {
                        let mut st = self.state();
                        match current_link_peer(&mut st, &from, link) {
                            Some(p) => match p.nodes.apply_delta(delta) {
                                Applied::Gap(ask) => {
                                    debug!(at = %at, have = ?p.nodes.at(), "directory gap");
                                    ask.then(|| p.nodes.at())
                                }
                                Applied::Applied | Applied::Stale => None,
                            },
                            None => None,
                        }
                    };
                    if let Some(have) = ask {
                        self.ask_resync(from, link, have);
                    }
                }
                Ok(Some(Event::DirectoryResync { have })) => {
                    debug!(have = ?have, "peer asks for this gateway's directory");
                    let tx = {
                        let mut st = self.state();
                        current_link_peer(&mut st, &from, link)
                            .and_then(|p| p.link.as_ref().map(|l| l.events.clone()))
                    };
                    if let Some(tx) = tx {
                        self.send_snapshot(&tx);
                    }
                }
                Ok(Some(Event::PairingSync(records))) => {
                    // A merge is a database transaction (thousands of rows in a link-up
                    // exchange): off the async workers, so links' pings and calls go on;
                    // awaited, so this link's events still apply in order.
                    let mesh = self.clone();
                    if let Err(e) =
                        tokio::task::spawn_blocking(move || mesh.merge_pairing(&records)).await
                    {
                        warn!("pairing merge failed: {e}");
                    }
                }
                Ok(Some(Event::NodeVitals(mut list))) => {
                    list.truncate(crate::vitals::MAX_RELAYED);
                    let vitals: HashMap<DeviceId, Received> = list
                        .into_iter()
                        .map(|n| {
                            let age = Duration::from_millis(u64::from(n.age_ms));
                            (n.node, Received::now(n.vitals, age))
                        })
                        .collect();
                    if let Some(p) = self.state().peers.get_mut(&from) {
                        p.node_vitals = vitals;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    debug!("event stream error: {e}");
                    return;
                }
            }
        }
    }
}

impl Mesh {
    /// A peer's health ping said which directory version it has announced: ask for a
    /// snapshot if a change was lost (see [`RemoteDirectory::on_ping`]).
    fn peer_directory_at(&self, from: PublicKey, link: u64, announced: DirVersion) {
        let ask = {
            let mut st = self.state();
            match current_link_peer(&mut st, &from, link) {
                Some(p) => p.nodes.on_ping(announced).then(|| p.nodes.at()),
                None => None,
            }
        };
        if let Some(have) = ask {
            debug!(announced = %announced, have = ?have, "directory behind the peer's pings");
            self.ask_resync(from, link, have);
        }
    }

    /// Asks a peer (on its current link) for its whole directory.
    fn ask_resync(&self, from: PublicKey, link: u64, have: Option<DirVersion>) {
        let tx = {
            let mut st = self.state();
            current_link_peer(&mut st, &from, link)
                .and_then(|p| p.link.as_ref().map(|l| l.events.clone()))
        };
        let Some(tx) = tx else { return };
        self.inner.directory.resyncs.inc(0);
        if tx.try_send(Event::DirectoryResync { have }).is_err() {
            // Asked again at a later ping.
            self.inner.directory.dropped.inc(0);
        }
    }

    fn merge_pairing(&self, records: &[PairingRecord]) {
        let Some(reg) = self.inner.pairing.get() else {
            return;
        };
        match reg.apply(records) {
            Ok(changed) => {
                // One line per decision for the usual handful; a link-up exchange of a large
                // fleet is summed up in one line, not 100 000.
                let approved = changed.iter().filter(|r| r.approved).count();
                let quiet = changed.len() > MERGE_LINES;
                if quiet {
                    info!(
                        approved,
                        revoked = changed.len() - approved,
                        "pairing decisions merged from elsewhere in the federation"
                    );
                }
                for r in changed {
                    if r.approved {
                        if !quiet {
                            info!(device = %r.key.device_id().short(), name = %r.name, "pairing approved elsewhere in the federation");
                        }
                    } else {
                        if !quiet {
                            info!(device = %r.key.device_id().short(), "pairing revoked elsewhere in the federation");
                        }
                        let _ = self
                            .inner
                            .notices
                            .send(MeshNotice::Revoked(r.key.device_id()));
                    }
                }
            }
            Err(e) => warn!("cannot merge pairing records: {e}"),
        }
    }
}

/// The peer `key` if `link` is still its link: events read from a replaced link (a restarted
/// peer's old process, a duplicate) must not overwrite what the current one announced.
fn current_link_peer<'a>(st: &'a mut State, key: &PublicKey, link: u64) -> Option<&'a mut Peer> {
    st.peers
        .get_mut(key)
        .filter(|p| p.link.as_ref().map(|l| l.id) == Some(link))
}

/// A count and a byte total, for what the directory sends.
#[derive(Debug, Default)]
struct Tally {
    count: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl Tally {
    fn inc(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.count.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The node directory's counters (see [`Mesh::directory_stats`]).
#[derive(Debug, Default)]
struct DirectoryTallies {
    deltas: Tally,
    snapshots: Tally,
    resyncs: Tally,
    dropped: Tally,
}

/// What this gateway's node directory sent and asked for since it started: deltas and
/// snapshots written to peers (bytes: their frames on the wire), snapshots asked of peers, and
/// events not queued because a link's event queue was full (the peer resyncs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectoryStats {
    /// This gateway's directory version.
    pub at: DirVersion,
    /// Deltas sent (one per linked peer per change).
    pub deltas_sent: u64,
    /// Their bytes.
    pub delta_bytes: u64,
    /// Snapshots sent (new links, peers' requests).
    pub snapshots_sent: u64,
    /// Their bytes.
    pub snapshot_bytes: u64,
    /// Snapshots this gateway asked of its peers (gaps it detected).
    pub resyncs_asked: u64,
    /// Directory events dropped on a full event queue.
    pub dropped: u64,
}

async fn close_after_reply(conn: Connection, reason: &str) {
    // Give the refusal a moment to reach the dialer before the close frame overtakes it; the
    // dialer normally closes first once it has read it.
    let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
    conn.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
}

/// Resolves `host:port` (an IP literal or a DNS name) to one address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?;
    it.next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}
