//! A gateway's running consensus: the openraft `Raft` over the mesh, the shared config it
//! replicates, and the policies around it.
//!
//! - **Bootstrap.** The configured primary initializes a one-voter group the first time it
//!   starts; every other gateway waits to be added by the leader.
//! - **Membership.** The leader adds every mesh member as a learner (they receive every
//!   entry), and makes the first [`ReplicaConfig::max_voters`] members (or the configured
//!   [`ReplicaConfig::voters`]) voters once they have caught up. Forgotten gateways are
//!   removed. Two device ids with the same raft node id are refused, loudly.
//! - **Primary = leader.** The leader is reported to the mesh, whose `gateway status` shows it
//!   as the primary. The configured primary is the *preferred* leader: when another voter leads
//!   and the preferred one has been reachable and caught up for a hold-off, the leader stops
//!   accepting writes and sending heartbeats, and asks the preferred one to stand; it is elected
//!   as soon as the followers' leader lease lapses (openraft has no leadership transfer in 0.9;
//!   this is the same effect, built on its lease and `trigger().elect()`).
//! - **Writes** go to the leader (forwarded over the mesh from any gateway) and return once
//!   committed on a majority of voters. A gateway that can see no majority of voters refuses at
//!   once, saying so; a leader that has not heard from a majority within the lease refuses too.
//!   During an election writes are retried until [`ReplicaConfig::write_timeout`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::election::{self, LocalView, PreVoteReply, PreVoteRequest};
use super::group_commit::{GroupCommit, Proposal, Propose, QueueError};
use super::network::{self, MeshNetwork};
use super::types::{node_id_of, Command, GatewayNode, NodeId, TypeConfig};
use super::{ConsensusStoreError, SqliteStateMachine};
use crate::identity::PublicKey;
use crate::mesh::{Mesh, PeerService};
use crate::rpc::{self, BoxFuture, CallError};
use crate::store::Store;
use crate::wire::{Request, WireError};

/// Method: a client write forwarded to the leader.
pub const METHOD_WRITE: &str = "raft.write";
/// Method: the leader asks the preferred primary to call an election.
pub const METHOD_HANDOFF: &str = "raft.handoff";

/// How settings of the consensus are chosen.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Whether this gateway is the configured (preferred) primary.
    pub preferred: bool,
    /// Names of the voting gateways; empty: the first [`Self::max_voters`] members.
    pub voters: Vec<String>,
    /// How many voters at most when [`Self::voters`] is empty.
    pub max_voters: usize,
    /// The mesh health interval: raft timings derive from it (see [`Timings`]).
    pub health_interval: Duration,
    /// A raft heartbeat chosen by the operator, instead of one derived from the interval.
    pub heartbeat: Option<Duration>,
    /// How long a write may wait for a leader and a majority before it is refused.
    pub write_timeout: Duration,
    /// Deflate large raft payloads (`gateway.sync.compression`).
    pub compression: bool,
    /// Entries per append-entries message at most (`gateway.sync.batchSize`).
    pub batch_size: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so a remote that far behind still gets
    /// deltas rather than the snapshot.
    pub keep_log: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            preferred: false,
            voters: Vec::new(),
            max_voters: 5,
            health_interval: Duration::from_secs(1),
            heartbeat: None,
            write_timeout: Duration::from_secs(5),
            compression: true,
            batch_size: 100,
            snapshot_every: 5000,
            keep_log: 2000,
        }
    }
}

/// Raft timings derived from the health interval `h`, or from a configured heartbeat
/// (`gateway.federation.heartbeat`): heartbeat `h/3` but at least [`MIN_HEARTBEAT`], election
/// timeout from 2 to 2.5 heartbeats.
///
/// openraft gives each append-entries RPC one heartbeat interval to complete, so the heartbeat
/// must exceed the slowest link's round trip plus a follower's fsync: the 400 ms floor keeps
/// intercontinental links (a real Tokyo-Frankfurt round trip is about 250 ms) working whatever
/// the interval. A follower calls an election `lease + timeout` after the last heartbeat
/// (openraft's lease is the longest timeout), that is after at least 4.5 heartbeats of silence,
/// so a dead leader is replaced within 1.8 to 2.4 s plus a vote round trip at a 1 s interval:
/// under the federation's 3 s goal.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// Shortest election timeout.
    pub election_min: Duration,
    /// Longest election timeout (also openraft's leader lease).
    pub election_max: Duration,
}

impl Timings {
    /// Timings for a health interval.
    pub fn for_interval(h: Duration) -> Timings {
        let ms = h.as_millis().clamp(100, 60_000) as u64;
        Self::for_heartbeat(Duration::from_millis(ms / 3))
    }

    /// Timings for a heartbeat (raised to [`MIN_HEARTBEAT`]).
    pub fn for_heartbeat(heartbeat: Duration) -> Timings {
        let hb = (heartbeat.as_millis() as u64).clamp(MIN_HEARTBEAT.as_millis() as u64, 60_000);
        Timings {
            heartbeat: Duration::from_millis(hb),
            election_min: Duration::from_millis(hb * 2),
            election_max: Duration::from_millis(hb * 5 / 2),
        }
    }
}

/// The shortest raft heartbeat: openraft's per-RPC deadline, so above the slowest WAN round
/// trip plus an fsync.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(400);

/// Why a consensus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    /// Fewer than a majority of voters are reachable: writes are refused.
    #[error("no majority: {reachable} of {voters} voting gateways reachable from {name} ({detail}); config writes are refused until a majority is back, while nodes, invokes and health keep working")]
    NoQuorum {
        /// This gateway.
        name: String,
        /// Voters reachable (this one included).
        reachable: usize,
        /// Voters in the group.
        voters: usize,
        /// Which voters are missing.
        detail: String,
    },
    /// An election is under way, or the leader is unknown.
    #[error("no primary elected right now ({0}); retry shortly")]
    NoLeader(String),
    /// A passing condition (leader moving, link flapping): retry.
    #[error("{0}")]
    Unavailable(String),
    /// The write was sent but not acknowledged by a majority in time; it may still commit.
    #[error("write not acknowledged by a majority within {0:?}; it may still be applied once the voters are back: check with `clawmesh config get`")]
    NotAcknowledged(Duration),
    /// This gateway is not (yet) in the raft group.
    #[error("this gateway has not been added to the federation's consensus yet ({0})")]
    NotMember(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The other gateway refused.
    #[error("{}", .0.message)]
    Remote(WireError),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] ConsensusStoreError),
    /// The raft node stopped (storage error, shutdown).
    #[error("consensus stopped: {0}")]
    Fatal(String),
}

impl ConsensusError {
    /// Whether the same write may succeed if tried again shortly.
    pub fn retryable(&self) -> bool {
        match self {
            ConsensusError::NoLeader(_) | ConsensusError::Unavailable(_) => true,
            ConsensusError::Remote(w) => w.retryable,
            _ => false,
        }
    }

    /// The error as sent to callers (classic codes: `UNAVAILABLE`, `INVALID_REQUEST`).
    pub fn to_wire(&self) -> WireError {
        if let ConsensusError::Remote(w) = self {
            return w.clone();
        }
        let code = match self {
            ConsensusError::Invalid(_) => "INVALID_REQUEST",
            ConsensusError::NoQuorum { .. } => "NO_QUORUM",
            _ => "UNAVAILABLE",
        };
        let mut w = WireError::new(code, self.to_string());
        w.retryable = self.retryable() || matches!(self, ConsensusError::NoQuorum { .. });
        w
    }
}

/// A write acknowledged by a majority.
#[derive(Debug, Clone)]
pub struct WriteAck {
    /// The revision (log index) of the write.
    pub revision: u64,
    /// The gateway that led when it committed.
    pub leader: String,
}

/// The consensus as seen from this gateway, for `gateway status` and `config show`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsensusStatus {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// Current raft term.
    pub term: u64,
    /// The leader (primary), if known.
    pub leader: Option<String>,
    /// Voting gateways.
    pub voters: Vec<String>,
    /// Non-voting gateways (receive every change).
    pub learners: Vec<String>,
    /// Voters reachable from here (this one included).
    pub reachable_voters: usize,
    /// Whether a majority of voters is reachable.
    pub quorum: bool,
    /// Index of the last entry applied here: the shared config's revision.
    pub applied: u64,
    /// Index of the last entry in the local log.
    pub last_log: u64,
    /// Index of the last entry known committed here: on the leader, the highest index a
    /// majority of voters holds; elsewhere the applied index (openraft 0.9 does not publish a
    /// follower's commit index, and a follower applies what it learns is committed at once).
    pub commit: u64,
    /// Index of the last entry covered by the local snapshot, if one was built or received.
    pub snapshot: Option<u64>,
    /// Index of the last entry removed from the local log (covered by the snapshot).
    pub purged: Option<u64>,
    /// Whether the raft group has been formed here.
    pub initialized: bool,
    /// Why the consensus stopped, if it did.
    pub error: Option<String>,
}

/// See [`ConsensusStatus::commit`].
fn commit_index(m: &openraft::RaftMetrics<NodeId, GatewayNode>, voters: &[NodeId]) -> u64 {
    let applied = m.last_applied.map_or(0, |l| l.index);
    let Some(repl) = m.replication.as_ref().filter(|_| !voters.is_empty()) else {
        return applied;
    };
    let mut matched: Vec<u64> = voters
        .iter()
        .map(|v| {
            if *v == m.id {
                m.last_log_index.unwrap_or(0)
            } else {
                repl.get(v).copied().flatten().map_or(0, |l| l.index)
            }
        })
        .collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    // The majority-th highest: held by at least a majority of voters.
    matched
        .get(voters.len() / 2)
        .copied()
        .unwrap_or(applied)
        .max(applied)
}

struct Inner {
    /// The raft node; replaced (under `promoting`) only by a forced promotion.
    raft: RwLock<Raft<TypeConfig>>,
    raft_config: Arc<openraft::Config>,
    store: Store,
    promoting: tokio::sync::Mutex<()>,
    id: NodeId,
    key: PublicKey,
    name: String,
    mesh: Mesh,
    sm: SqliteStateMachine,
    /// A reader of the durable raft log (for pre-votes).
    log: super::SqliteLogStore,
    cfg: ReplicaConfig,
    timings: Timings,
    handing_off: AtomicBool,
    /// Revision applied here, for components that follow the shared config.
    applied: watch::Sender<u64>,
    /// When this gateway last granted a pre-vote (it then holds back its own candidacy).
    granted_prevote: Mutex<Option<Instant>>,
    /// Collision warnings already logged (so each is logged once).
    collisions: Mutex<BTreeSet<NodeId>>,
    /// The leader's group commit: writes made or forwarded here while this gateway leads.
    group: GroupCommit<EntryError>,
}

/// Why a group-committed entry failed (every write in it gets this).
#[derive(Debug, Clone)]
enum EntryError {
    /// Leadership moved before the entry committed: retried by the writer, at the new leader.
    NoLeader(String),
    /// No majority acknowledged the entry within the write timeout; it may still commit.
    NotAcknowledged(Duration),
    /// The raft node stopped.
    Fatal(String),
}

impl From<EntryError> for ConsensusError {
    fn from(e: EntryError) -> Self {
        match e {
            EntryError::NoLeader(m) => ConsensusError::NoLeader(m),
            EntryError::NotAcknowledged(d) => ConsensusError::NotAcknowledged(d),
            EntryError::Fatal(m) => ConsensusError::Fatal(m),
        }
    }
}

/// The group commit's proposer: one entry through the current raft node (it may be replaced by
/// a forced promotion), waited for until committed and applied, at most the write timeout.
///
/// When the entry is in the leader's log: openraft 0.9 does not say, but its core appends the
/// entries it is handed one by one, in order, each durably before the next message, and
/// publishes its last log index in its metrics. So the entry is appended at the latest when
/// that index reaches one past the highest index expected for earlier proposals (or the index
/// when this one was made). Blank and membership entries only move that earlier, and a
/// refused proposal leaves the next one waiting for its commit instead: either way only the
/// grouping is affected, never an acknowledgement.
fn entry_proposer(inner: std::sync::Weak<Inner>) -> Propose<EntryError> {
    let expected = Arc::new(Mutex::new(0u64));
    Arc::new(move |cmd| {
        let inner = inner.clone();
        let expected = expected.clone();
        Box::pin(async move {
            let Some(inner) = inner.upgrade() else {
                return failed_proposal(EntryError::Fatal("the consensus stopped".into()));
            };
            let raft = inner.raft.read().unwrap_or_else(|p| p.into_inner()).clone();
            let timeout = inner.cfg.write_timeout;
            drop(inner);
            let mut metrics = raft.metrics();
            let last = metrics.borrow().last_log_index.unwrap_or(0);
            let at = {
                let mut e = expected.lock().unwrap_or_else(|p| p.into_inner());
                *e = (*e).max(last) + 1;
                *e
            };
            let rx = match raft.client_write_ff(cmd).await {
                Ok(rx) => rx,
                Err(e) => return failed_proposal(EntryError::Fatal(e.to_string())),
            };
            let committed = Box::pin(async move {
                // Bounded: a leader that loses its majority mid-entry would otherwise hold the
                // entry (and its writes) forever.
                match tokio::time::timeout(timeout, rx).await {
                    Err(_) => Err(EntryError::NotAcknowledged(timeout)),
                    Ok(Err(_)) => Err(EntryError::NoLeader(
                        "the raft node dropped the write (leadership or shutdown)".into(),
                    )),
                    Ok(Ok(Ok(resp))) => Ok(resp.data.revision),
                    Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => Err(EntryError::NoLeader(
                        format!("leadership moved to {:?}", f.leader_node.map(|n| n.name)),
                    )),
                    Ok(Ok(Err(e))) => Err(EntryError::Fatal(e.to_string())),
                }
            });
            let appended = Box::pin(async move {
                let _ = metrics
                    .wait_for(|m| m.last_log_index.is_some_and(|i| i >= at))
                    .await;
            });
            Proposal {
                committed,
                appended,
            }
        })
    })
}

/// A proposal that failed before it reached the raft node.
fn failed_proposal(e: EntryError) -> Proposal<EntryError> {
    Proposal {
        committed: Box::pin(std::future::ready(Err(e))),
        appended: Box::pin(std::future::ready(())),
    }
}

/// A gateway's consensus handle; cheap to clone.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("name", &self.inner.name)
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// Opens the raft storage in `store`, starts the raft node over `mesh`'s links and its
    /// background policies, and plugs its RPC service into the mesh.
    pub async fn start(
        mesh: Mesh,
        store: Store,
        cfg: ReplicaConfig,
    ) -> Result<Replica, ConsensusError> {
        let key = mesh.key();
        let name = mesh.config().name.clone();
        let id = node_id_of(&key.device_id().0);
        let timings = match cfg.heartbeat {
            Some(hb) => Timings::for_heartbeat(hb),
            None => Timings::for_interval(cfg.health_interval),
        };
        let config = openraft::Config {
            cluster_name: "clawmesh".into(),
            heartbeat_interval: timings.heartbeat.as_millis() as u64,
            election_timeout_min: timings.election_min.as_millis() as u64,
            election_timeout_max: timings.election_max.as_millis() as u64,
            // A snapshot chunk or a long batch over a slow WAN link takes a while.
            install_snapshot_timeout: 10_000,
            // Elections are decided by the gateway after a pre-vote (see `election`): a voter
            // that stalled and resumed must not raise the term while the primary is healthy.
            enable_elect: false,
            max_payload_entries: cfg.batch_size.max(1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every.max(10)),
            max_in_snapshot_log_to_keep: cfg.keep_log,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Invalid(format!("raft settings: {e}")))?;
        let raft_config = Arc::new(config);
        let s = store.clone();
        let sm = tokio::task::spawn_blocking(move || SqliteStateMachine::open(s))
            .await
            .map_err(|e| ConsensusError::Fatal(e.to_string()))??;
        let raft = build_raft(id, &raft_config, &mesh, cfg.compression, &store, &sm).await?;
        let s = store.clone();
        let log = tokio::task::spawn_blocking(move || super::SqliteLogStore::open(s))
            .await
            .map_err(|e| ConsensusError::Fatal(e.to_string()))??;
        let applied = watch::channel(sm_revision(&sm).await?).0;
        let replica = Replica {
            inner: Arc::new_cyclic(|weak| Inner {
                group: GroupCommit::start(entry_proposer(weak.clone())),
                raft: RwLock::new(raft),
                raft_config,
                store,
                promoting: tokio::sync::Mutex::new(()),
                id,
                key,
                name,
                mesh: mesh.clone(),
                sm,
                log,
                cfg,
                timings,
                handing_off: AtomicBool::new(false),
                applied,
                granted_prevote: Mutex::new(None),
                collisions: Mutex::new(BTreeSet::new()),
            }),
        };
        mesh.attach_peer_service(Arc::new(replica.clone()));
        let mut members = replica.inner.sm.members();
        let adopt = mesh.clone();
        tokio::spawn(async move {
            loop {
                let latest = members.borrow_and_update().clone();
                if let Some(m) = latest {
                    adopt.adopt_replicated(m);
                }
                if members.changed().await.is_err() {
                    return;
                }
            }
        });
        if replica.inner.cfg.preferred && !replica.initialized().await {
            let me = replica.self_node();
            info!(gateway = %me.name, "forming the federation's consensus group");
            match replica.raft().initialize(BTreeMap::from([(id, me)])).await {
                Ok(()) => {}
                Err(RaftError::APIError(e)) => debug!("already initialized: {e}"),
                Err(e) => return Err(ConsensusError::Fatal(e.to_string())),
            }
        }
        let driver = replica.clone();
        tokio::spawn(async move { driver.drive().await });
        let watcher = replica.clone();
        tokio::spawn(async move { watcher.watch_leader().await });
        Ok(replica)
    }

    /// The raft node (a clone of the handle).
    fn raft(&self) -> Raft<TypeConfig> {
        self.inner
            .raft
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn self_node(&self) -> GatewayNode {
        GatewayNode {
            name: self.inner.name.clone(),
            addr: self.inner.mesh.config().advertise.clone(),
            key: self.inner.key.0,
        }
    }

    async fn initialized(&self) -> bool {
        self.raft().is_initialized().await.unwrap_or(false)
    }

    /// The raft timings in force.
    pub fn timings(&self) -> Timings {
        self.inner.timings
    }

    /// The value (JSON text) and revision of a shared config key, as applied here.
    pub async fn get(&self, key: &str) -> Result<Option<(String, u64)>, ConsensusError> {
        let sm = self.inner.sm.clone();
        let key = key.to_owned();
        blocking(move || sm.get(&key)).await
    }

    /// Every shared config key: (key, JSON text, revision), in key order, as applied here.
    pub async fn all(&self) -> Result<Vec<(String, String, u64)>, ConsensusError> {
        let sm = self.inner.sm.clone();
        blocking(move || sm.all()).await
    }

    /// The revision applied here.
    pub fn revision(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// Pairing decisions applied here from the log that changed the local registry.
    pub fn pairing_changes(
        &self,
    ) -> tokio::sync::broadcast::Receiver<crate::pairing::PairingRecord> {
        self.inner.sm.pairing_changes()
    }

    /// Proposes pairing decisions made here, so every gateway (also one that is offline now)
    /// gets them from the log. Retried in the background while no majority is reachable, for
    /// up to [`PAIRING_RETRY_FOR`]; meanwhile the direct exchange between linked gateways
    /// already carries them.
    pub fn propose_pairing(&self, records: Vec<crate::pairing::PairingRecord>) {
        let this = self.clone();
        tokio::spawn(async move {
            let give_up = Instant::now() + PAIRING_RETRY_FOR;
            let mut pause = Duration::from_millis(200);
            loop {
                match this.write(Command::Pairing(records.clone())).await {
                    Ok(ack) => {
                        debug!(revision = ack.revision, "pairing decision replicated");
                        return;
                    }
                    Err(e) if Instant::now() < give_up => {
                        debug!("pairing decision not replicated yet: {e}");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => {
                        warn!("pairing decision not replicated through the log: {e}; linked gateways have it from the direct exchange");
                        return;
                    }
                }
            }
        });
    }

    /// Follows the revision applied here: changes whenever an entry is applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.applied.subscribe()
    }

    /// Waits until revision `at_least` is applied here, up to `timeout`.
    pub async fn wait_applied(&self, at_least: u64, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= at_least))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The consensus as seen from here.
    pub fn status(&self) -> ConsensusStatus {
        let m = self.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let name_of = |id: &NodeId| {
            membership
                .get_node(id)
                .map(|n| n.name.clone())
                .unwrap_or_else(|| format!("{id:016x}"))
        };
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let reachable = self.reachable_voters(&m);
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        ConsensusStatus {
            role: role.into(),
            term: m.current_term,
            leader: self.effective_leader(&m).map(|l| name_of(&l)),
            voters: voters.iter().map(name_of).collect(),
            learners: membership.learner_ids().map(|l| name_of(&l)).collect(),
            reachable_voters: reachable,
            quorum: !voters.is_empty() && reachable * 2 > voters.len(),
            applied: m.last_applied.map_or(0, |l| l.index),
            last_log: m.last_log_index.unwrap_or(0),
            commit: commit_index(&m, &voters),
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
            initialized: m.membership_config.log_id().is_some(),
            error: m.running_state.as_ref().err().map(|e| e.to_string()),
        }
    }

    /// The leader this gateway believes in, except a leader (this one) that has not heard
    /// from a majority within twice the lease, or whose mesh links reach no majority of
    /// voters: cut off from the others, it is not the federation's primary any more, whatever
    /// its own raft state says.
    fn effective_leader(&self, m: &openraft::RaftMetrics<NodeId, GatewayNode>) -> Option<NodeId> {
        if m.state == ServerState::Leader {
            let voters = m.membership_config.membership().voter_ids().count();
            let lease = (self.inner.timings.election_max * 2).as_millis() as u64;
            if voters > 1
                && (m.millis_since_quorum_ack.is_none_or(|ms| ms > lease)
                    || self.reachable_voters(m) * 2 <= voters)
            {
                return None;
            }
        }
        m.current_leader
    }

    fn reachable_voters(&self, m: &openraft::RaftMetrics<NodeId, GatewayNode>) -> usize {
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter(|id| {
                membership
                    .get_node(id)
                    .is_some_and(|n| self.inner.mesh.is_reachable(&PublicKey(n.key)))
            })
            .count()
    }

    /// Proposes `cmd` (forwarding it to the leader if this gateway does not lead) and waits
    /// until a majority of voters has it durably. Retries while a leader is being elected, up
    /// to the write timeout.
    pub async fn write(&self, cmd: Command) -> Result<WriteAck, ConsensusError> {
        cmd.check()
            .map_err(|e| ConsensusError::Invalid(format!("value is not valid JSON: {e}")))?;
        let deadline = Instant::now() + self.inner.cfg.write_timeout;
        loop {
            match self.write_once(&cmd, deadline, true).await {
                Err(e) if e.retryable() && Instant::now() + RETRY_PAUSE < deadline => {
                    debug!("write retried: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                r => return r,
            }
        }
    }

    async fn write_once(
        &self,
        cmd: &Command,
        deadline: Instant,
        may_forward: bool,
    ) -> Result<WriteAck, ConsensusError> {
        let m = self.raft().metrics().borrow().clone();
        if let Err(e) = &m.running_state {
            return Err(ConsensusError::Fatal(e.to_string()));
        }
        let membership = m.membership_config.membership().clone();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        if voters.is_empty() {
            return Err(ConsensusError::NotMember(
                "no voters known here; is the primary reachable?".into(),
            ));
        }
        let reachable = self.reachable_voters(&m);
        if reachable * 2 <= voters.len() {
            let missing: Vec<String> = voters
                .iter()
                .filter_map(|id| membership.get_node(id))
                .filter(|n| !self.inner.mesh.is_reachable(&PublicKey(n.key)))
                .map(|n| n.name.clone())
                .collect();
            return Err(ConsensusError::NoQuorum {
                name: self.inner.name.clone(),
                reachable,
                voters: voters.len(),
                detail: format!("unreachable: {}", missing.join(", ")),
            });
        }
        let leader = m.current_leader;
        match leader {
            Some(l) if l == self.inner.id => self.write_local(cmd, &m, deadline).await,
            Some(l) if may_forward => {
                let node = membership
                    .get_node(&l)
                    .cloned()
                    .ok_or_else(|| ConsensusError::NoLeader("leader not in membership".into()))?;
                self.forward(cmd, &node, deadline).await
            }
            Some(_) => Err(ConsensusError::Unavailable(format!(
                "{} is not the primary any more",
                self.inner.name
            ))),
            None => Err(ConsensusError::NoLeader(format!("term {}", m.current_term))),
        }
    }

    async fn write_local(
        &self,
        cmd: &Command,
        m: &openraft::RaftMetrics<NodeId, GatewayNode>,
        deadline: Instant,
    ) -> Result<WriteAck, ConsensusError> {
        if self.inner.handing_off.load(Ordering::Acquire) {
            return Err(ConsensusError::Unavailable(format!(
                "{} is handing the primary role back to the preferred primary; retry shortly",
                self.inner.name
            )));
        }
        let voters = m.membership_config.membership().voter_ids().count();
        let lease = self.inner.timings.election_max * 2;
        match m.millis_since_quorum_ack {
            // Just elected: the first heartbeat round is not acknowledged yet. Retried.
            None if voters > 1 => {
                return Err(ConsensusError::NoLeader(format!(
                    "{} was just elected and waits for its first acknowledgement from a majority",
                    self.inner.name
                )));
            }
            Some(ms) if voters > 1 && ms > lease.as_millis() as u64 => {
                return Err(ConsensusError::NoQuorum {
                    name: self.inner.name.clone(),
                    reachable: self.reachable_voters(m),
                    voters,
                    detail: format!("no acknowledgement from a majority for {ms} ms"),
                });
            }
            _ => {}
        }
        // Into the leader's next entry (group commit); bounded by the caller's deadline: the
        // entry itself is bounded by the write timeout, a caller may have less left.
        let write = self.inner.group.write(cmd.clone());
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, write).await {
            Err(_) => Err(ConsensusError::NotAcknowledged(
                self.inner.cfg.write_timeout,
            )),
            Ok(Err(e @ QueueError::Full)) => Err(ConsensusError::Unavailable(e.to_string())),
            Ok(Err(e @ QueueError::Stopped)) => Err(ConsensusError::Fatal(e.to_string())),
            Ok(Ok(Ok(revision))) => Ok(WriteAck {
                revision,
                leader: self.inner.name.clone(),
            }),
            Ok(Ok(Err(e))) => Err(e.into()),
        }
    }

    async fn forward(
        &self,
        cmd: &Command,
        leader: &GatewayNode,
        deadline: Instant,
    ) -> Result<WriteAck, ConsensusError> {
        let Some(conn) = self.inner.mesh.connection_by_key(&PublicKey(leader.key)) else {
            return Err(ConsensusError::Unavailable(format!(
                "the primary {} is not reachable from {}",
                leader.name, self.inner.name
            )));
        };
        let params =
            network::encode(cmd, false).map_err(|e| ConsensusError::Invalid(e.to_string()))?;
        let wait = deadline.saturating_duration_since(Instant::now());
        // A leader that dies mid-request leaves the call waiting for the link's idle timeout;
        // give up as soon as this gateway learns of another leader (or of none) and retry
        // there. The write may have committed before the old leader died: a repeated set or
        // unset of the same key is harmless.
        let mut metrics = self.raft().metrics();
        let leader_id = node_id_of(&PublicKey(leader.key).device_id().0);
        let moved = metrics.wait_for(|m| m.current_leader != Some(leader_id));
        let call = rpc::call(&conn, METHOD_WRITE, params, 1, wait);
        let result = tokio::select! {
            r = call => r,
            _ = moved => {
                return Err(ConsensusError::NoLeader(format!(
                    "the primary {} changed while the write was in flight",
                    leader.name
                )));
            }
        };
        match result {
            Ok(text) => {
                let revision: u64 = network::decode(&text).map_err(|e| {
                    ConsensusError::Unavailable(format!("bad reply from {}: {e}", leader.name))
                })?;
                Ok(WriteAck {
                    revision,
                    leader: leader.name.clone(),
                })
            }
            Err(CallError::Remote(w)) => Err(ConsensusError::Remote(w)),
            Err(CallError::Timeout { .. }) => Err(ConsensusError::NotAcknowledged(
                self.inner.cfg.write_timeout,
            )),
            Err(e) => Err(ConsensusError::Unavailable(format!(
                "forwarding to the primary {} failed: {e}",
                leader.name
            ))),
        }
    }

    /// Makes this gateway the primary without a majority: the voter set is re-formed from the
    /// gateways reachable from here. For an operator who knowingly overrides quorum (the
    /// unreachable voters' un-replicated writes, if any, are lost when they rejoin).
    pub async fn promote_force(&self) -> Result<Vec<String>, ConsensusError> {
        let _one = self.inner.promoting.lock().await;
        let raft = self.raft();
        let m = raft.metrics().borrow().clone();
        if self.effective_leader(&m) == Some(self.inner.id) {
            return Err(ConsensusError::Invalid(format!(
                "{} is already the primary",
                self.inner.name
            )));
        }
        let membership = m.membership_config.membership().clone();
        let nodes: BTreeMap<NodeId, GatewayNode> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        if !nodes.contains_key(&self.inner.id) {
            return Err(ConsensusError::NotMember(
                "this gateway is not in the raft membership".into(),
            ));
        }
        let voters: BTreeSet<NodeId> = membership
            .voter_ids()
            .filter(|id| {
                nodes
                    .get(id)
                    .is_some_and(|n| self.inner.mesh.is_reachable(&PublicKey(n.key)))
            })
            .chain([self.inner.id])
            .collect();
        let names: Vec<String> = voters
            .iter()
            .filter_map(|id| nodes.get(id).map(|n| n.name.clone()))
            .collect();
        warn!(voters = ?names, "forced promotion: re-forming the voter set without a majority");
        raft.shutdown()
            .await
            .map_err(|e| ConsensusError::Fatal(format!("stopping raft: {e}")))?;
        let log = super::SqliteLogStore::open(self.inner.store.clone())?;
        let log_id = super::recovery::force_voters(&log, self.inner.id, voters, nodes).await?;
        info!(%log_id, "forced membership written; restarting raft");
        let fresh = build_raft(
            self.inner.id,
            &self.inner.raft_config,
            &self.inner.mesh,
            self.inner.cfg.compression,
            &self.inner.store,
            &self.inner.sm,
        )
        .await?;
        *self.inner.raft.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        let driver = self.clone();
        tokio::spawn(async move { driver.drive().await });
        if let Err(e) = fresh.trigger().elect().await {
            warn!("cannot stand for election: {e}");
        }
        Ok(names)
    }

    /// What this gateway knows for a pre-vote: its role, how long since it heard a leader or
    /// a majority, and its last log id. `None` once the raft node has stopped.
    async fn local_view(&self, with_log: bool) -> Option<LocalView> {
        let raft = self.raft();
        let m = raft.metrics().borrow().clone();
        let (committed, since_contact) = raft
            .with_raft_state(|st| {
                (
                    st.vote_ref().is_committed(),
                    st.vote_last_modified().map(|t| t.elapsed()),
                )
            })
            .await
            .ok()?;
        // The durable log: what a vote compares (openraft appends before acknowledging). Read
        // only when needed: the election timer checks the silence often.
        let last_log = if with_log {
            let mut log = self.inner.log.clone();
            openraft::storage::RaftLogStorage::get_log_state(&mut log)
                .await
                .ok()?
                .last_log_id
        } else {
            None
        };
        let leading = m.state == ServerState::Leader;
        Some(LocalView {
            leading,
            since_quorum_ack: m.millis_since_quorum_ack.map(Duration::from_millis),
            following: committed && !leading,
            since_contact,
            last_log,
        })
    }

    async fn serve_prevote(&self, req: &PreVoteRequest) -> PreVoteReply {
        let Some(view) = self.local_view(true).await else {
            return PreVoteReply {
                granted: false,
                reason: "consensus stopped".into(),
            };
        };
        match election::grant(req, &view, self.inner.timings.election_max) {
            Ok(()) => {
                // Another voter is about to stand: give it a head start instead of standing
                // at the same moment (a split vote costs a whole extra timeout).
                if let Ok(mut at) = self.inner.granted_prevote.lock() {
                    *at = Some(Instant::now());
                }
                PreVoteReply {
                    granted: true,
                    reason: String::new(),
                }
            }
            Err(reason) => PreVoteReply {
                granted: false,
                reason,
            },
        }
    }

    /// Asks the `others` voters whether they would vote for this gateway now; returns how many
    /// said yes and why the others did not.
    async fn prevote(&self, others: &[GatewayNode], req: &PreVoteRequest) -> (usize, Vec<String>) {
        let mut refusals = Vec::new();
        let params = match network::encode(req, false) {
            Ok(p) => p,
            Err(e) => return (0, vec![e.to_string()]),
        };
        let mut calls = tokio::task::JoinSet::new();
        for node in others {
            let Some(conn) = self.inner.mesh.connection_by_key(&PublicKey(node.key)) else {
                refusals.push(format!("{}: no link", node.name));
                continue;
            };
            let (params, name) = (params.clone(), node.name.clone());
            // One heartbeat, openraft's deadline for every raft RPC: above the slowest round
            // trip, and short enough that a dead voter does not delay the election.
            let wait = self.inner.timings.heartbeat;
            calls.spawn(async move {
                let r = rpc::call(&conn, election::METHOD_PREVOTE, params, 0, wait).await;
                (name, r)
            });
        }
        let mut granted = 0;
        while let Some(joined) = calls.join_next().await {
            let Ok((name, r)) = joined else { continue };
            match r.map(|text| network::decode::<PreVoteReply>(&text)) {
                Ok(Ok(reply)) if reply.granted => granted += 1,
                Ok(Ok(reply)) => refusals.push(format!("{name}: {}", reply.reason)),
                Ok(Err(e)) => refusals.push(format!("{name}: {e}")),
                Err(e) => refusals.push(format!("{name}: {e}")),
            }
        }
        (granted, refusals)
    }

    /// The election timer (openraft's own is off, see [`election`]): a voter that has heard no
    /// leader for the lease plus its election timeout asks the other voters for a pre-vote, and
    /// stands for election only with a majority.
    async fn watch_leader(self) {
        let t = self.inner.timings;
        let lease = t.election_max;
        // A quarter of the spread of the random timeouts: coarser, and two voters' different
        // timeouts would fall into the same tick and split the vote.
        let spread = t.election_max.saturating_sub(t.election_min) * 2;
        let mut tick = tokio::time::interval((spread / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        let mut threshold =
            election::silence_threshold(lease, t.election_min, t.election_min + spread);
        let mut next_round = Instant::now();
        loop {
            tick.tick().await;
            let raft = self.raft();
            let m = raft.metrics().borrow().clone();
            if m.state == ServerState::Shutdown || m.running_state.is_err() {
                if self.inner.promoting.try_lock().is_ok() {
                    return;
                }
                continue;
            }
            let membership = m.membership_config.membership().clone();
            let is_voter = membership.voter_ids().any(|v| v == self.inner.id);
            if m.state == ServerState::Leader || !is_voter || Instant::now() < next_round {
                continue;
            }
            let Some(view) = self.local_view(false).await else {
                continue;
            };
            let silent = view.since_contact.unwrap_or_else(|| started.elapsed());
            let granted_lately = self
                .inner
                .granted_prevote
                .lock()
                .ok()
                .and_then(|at| *at)
                .is_some_and(|at| at.elapsed() < t.election_min);
            // A follower of a known leader waits out the lease too (the others refuse votes
            // until it lapses); a candidate or a voter that never followed only its timeout.
            let needed = if view.following {
                threshold
            } else {
                threshold.saturating_sub(lease)
            };
            if silent < needed || granted_lately {
                continue;
            }
            let Some(view) = self.local_view(true).await else {
                continue;
            };
            threshold = election::silence_threshold(lease, t.election_min, t.election_min + spread);
            next_round = Instant::now() + threshold.saturating_sub(lease);
            let others: Vec<GatewayNode> = membership
                .voter_ids()
                .filter(|v| *v != self.inner.id)
                .filter_map(|v| membership.get_node(&v).cloned())
                .collect();
            let req = PreVoteRequest {
                term: m.current_term,
                last_log: view.last_log,
            };
            let (granted, refusals) = self.prevote(&others, &req).await;
            let voters = others.len() + 1;
            if !election::majority(granted + 1, voters) {
                debug!(
                    term = m.current_term,
                    silent_ms = silent.as_millis() as u64,
                    "pre-vote lost ({} of {voters}): {}",
                    granted + 1,
                    refusals.join("; ")
                );
                continue;
            }
            info!(
                term = m.current_term,
                silent_ms = silent.as_millis() as u64,
                "no primary heard; pre-vote won ({} of {voters}): standing for election",
                granted + 1
            );
            if let Err(e) = raft.trigger().elect().await {
                warn!("cannot stand for election: {e}");
            }
        }
    }

    /// Stops the raft node (the state stays on disk).
    pub async fn shutdown(&self) {
        let _ = self.raft().shutdown().await;
    }

    /// The background policies: report the leader, follow applied revisions, and (on the
    /// leader) keep the membership in line with the mesh and hand the role to the preferred
    /// primary.
    async fn drive(self) {
        let mut metrics = self.raft().metrics();
        let mut tick = tokio::time::interval(self.inner.timings.heartbeat * 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut preferred_ready_since: Option<Instant> = None;
        loop {
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            let m = metrics.borrow_and_update().clone();
            if m.running_state.is_err() || m.state == ServerState::Shutdown {
                // A clean stop (shutdown of the gateway) is not worth a warning.
                match &m.running_state {
                    Ok(()) | Err(openraft::error::Fatal::Stopped) => debug!("consensus stopped"),
                    Err(e) => warn!("consensus stopped: {e}"),
                }
                self.inner.mesh.set_leader(None);
                return;
            }
            let membership = m.membership_config.membership();
            let leader_key = self
                .effective_leader(&m)
                .and_then(|l| membership.get_node(&l))
                .map(|n| PublicKey(n.key));
            if membership.voter_ids().next().is_none() {
                // Not in the group yet (a remote waiting to be added): the configured primary
                // is the best answer until the leader's first message arrives.
                self.inner.mesh.clear_leader();
            } else {
                self.inner.mesh.set_leader(leader_key);
            }
            let applied = m.last_applied.map_or(0, |l| l.index);
            self.inner.applied.send_if_modified(|r| {
                let changed = *r != applied;
                *r = applied;
                changed
            });
            if m.state != ServerState::Leader || self.inner.handing_off.load(Ordering::Acquire) {
                preferred_ready_since = None;
                continue;
            }
            if let Err(e) = self.reconcile(&m).await {
                debug!("membership change deferred: {e}");
            }
            self.replicate_members().await;
            match self.preferred_ready(&m) {
                Some(node) => {
                    let since = *preferred_ready_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.inner.timings.election_max * 3 {
                        preferred_ready_since = None;
                        self.hand_off(node).await;
                    }
                }
                None => preferred_ready_since = None,
            }
        }
    }

    /// On the leader: puts the mesh's member list into the log when it is newer than the one
    /// there, so the pinned gateway keys are replicated state like the rest.
    async fn replicate_members(&self) {
        let current = self.inner.mesh.membership();
        let logged = self
            .inner
            .sm
            .members()
            .borrow()
            .as_ref()
            .map_or(0, |m| m.epoch);
        if current.epoch <= logged || current.members.is_empty() {
            return;
        }
        let epoch = current.epoch;
        // One attempt, no retries: the driver tries again on its next tick.
        let deadline = Instant::now() + self.inner.timings.election_max * 2;
        match self
            .write_once(&Command::Members(current), deadline, false)
            .await
        {
            Ok(ack) => debug!(epoch, revision = ack.revision, "member list replicated"),
            Err(e) => debug!(epoch, "member list not replicated yet: {e}"),
        }
    }

    /// The preferred primary, if it is another voter, reachable, and fully caught up.
    fn preferred_ready(
        &self,
        m: &openraft::RaftMetrics<NodeId, GatewayNode>,
    ) -> Option<GatewayNode> {
        if self.inner.cfg.preferred {
            return None;
        }
        let preferred = self.inner.mesh.members().into_iter().find(|x| x.primary)?;
        let id = node_id_of(&preferred.key.device_id().0);
        let membership = m.membership_config.membership();
        if !membership.voter_ids().any(|v| v == id) || !self.inner.mesh.is_reachable(&preferred.key)
        {
            return None;
        }
        // Caught up within a few entries (steady writes keep a follower a round trip behind);
        // writes stop during the handoff, so it has everything before it stands.
        let matched = m.replication.as_ref()?.get(&id)?.as_ref()?.index;
        let last = m.last_log_index.unwrap_or(0);
        (matched + LAG_FOR_VOTER >= last).then(|| membership.get_node(&id).cloned())?
    }

    /// Stops writes and heartbeats so the followers' lease lapses, and asks `to` to stand.
    async fn hand_off(&self, to: GatewayNode) {
        let Some(conn) = self.inner.mesh.connection_by_key(&PublicKey(to.key)) else {
            return;
        };
        info!(to = %to.name, "handing the primary role back to the preferred primary");
        self.inner.handing_off.store(true, Ordering::Release);
        self.raft().runtime_config().heartbeat(false);
        let t = self.inner.timings;
        let asked = rpc::call(&conn, METHOD_HANDOFF, String::new(), 0, t.election_max).await;
        if let Err(e) = asked {
            warn!(to = %to.name, "handoff refused: {e}");
        } else {
            // Bounded: the preferred primary stands after one lease; if it has not won within
            // three more, this gateway resumes leading.
            let mut metrics = self.raft().metrics();
            let _ = tokio::time::timeout(
                t.election_max * 4,
                metrics.wait_for(|m| m.state != ServerState::Leader),
            )
            .await;
        }
        self.raft().runtime_config().heartbeat(true);
        self.inner.handing_off.store(false, Ordering::Release);
    }

    /// One membership step on the leader: add a missing learner, remove a forgotten gateway,
    /// or move the voter set towards the wanted one. One change per call (openraft allows one
    /// membership change in flight).
    async fn reconcile(
        &self,
        m: &openraft::RaftMetrics<NodeId, GatewayNode>,
    ) -> Result<(), ConsensusError> {
        let membership = m.membership_config.membership().clone();
        if membership.get_joint_config().len() > 1 {
            return Ok(());
        }
        let members = self.inner.mesh.members();
        let mut desired: BTreeMap<NodeId, GatewayNode> = BTreeMap::new();
        let mut order: Vec<NodeId> = Vec::new();
        for mem in &members {
            let id = node_id_of(&mem.key.device_id().0);
            if let Some(existing) = desired.get(&id) {
                if existing.key != mem.key.0
                    && self.inner.collisions.lock().is_ok_and(|mut c| c.insert(id))
                {
                    warn!(
                        first = %existing.name, second = %mem.name, node_id = id,
                        "two gateways share raft node id {id:016x}; {} is left out of the consensus (give it a new device key)",
                        mem.name
                    );
                }
                continue;
            }
            desired.insert(
                id,
                GatewayNode {
                    name: mem.name.clone(),
                    addr: mem.addr.clone(),
                    key: mem.key.0,
                },
            );
            order.push(id);
        }
        // A membership change waits for a majority of the old and the new voters: bounded like a
        // write, so a voter that died mid-change does not stall this driver.
        let wait = self.inner.cfg.write_timeout;
        let change = |changes: ChangeMembers<NodeId, GatewayNode>, retain: bool| async move {
            tokio::time::timeout(wait, self.raft().change_membership(changes, retain))
                .await
                .map_err(|_| ConsensusError::NotAcknowledged(wait))?
                .map(|_| ())
                .map_err(|e| ConsensusError::Unavailable(e.to_string()))
        };
        for (id, node) in &desired {
            match membership.get_node(id) {
                None => {
                    info!(gateway = %node.name, "adding gateway to the consensus as a learner");
                    return tokio::time::timeout(
                        wait,
                        self.raft().add_learner(*id, node.clone(), false),
                    )
                    .await
                    .map_err(|_| ConsensusError::NotAcknowledged(wait))?
                    .map(|_| ())
                    .map_err(|e| ConsensusError::Unavailable(e.to_string()));
                }
                Some(known) if known != node => {
                    return change(
                        ChangeMembers::SetNodes(BTreeMap::from([(*id, node.clone())])),
                        true,
                    )
                    .await;
                }
                Some(_) => {}
            }
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let gone: BTreeSet<NodeId> = membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !desired.contains_key(id) && *id != self.inner.id)
            .collect();
        if !gone.is_empty() {
            info!(?gone, "removing forgotten gateways from the consensus");
            let gone_voters: BTreeSet<NodeId> = gone.intersection(&voters).copied().collect();
            if !gone_voters.is_empty() {
                return change(ChangeMembers::RemoveVoters(gone_voters), false).await;
            }
            return change(ChangeMembers::RemoveNodes(gone), false).await;
        }
        let wanted: Vec<NodeId> = if self.inner.cfg.voters.is_empty() {
            order
                .iter()
                .copied()
                .take(self.inner.cfg.max_voters.max(1))
                .collect()
        } else {
            order
                .iter()
                .copied()
                .filter(|id| {
                    desired
                        .get(id)
                        .is_some_and(|n| self.inner.cfg.voters.contains(&n.name))
                })
                .collect()
        };
        let last = m.last_log_index.unwrap_or(0);
        let caught_up = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id))
                .and_then(|x| x.as_ref())
                .is_some_and(|matched| matched.index + LAG_FOR_VOTER >= last)
        };
        let target: BTreeSet<NodeId> = wanted
            .iter()
            .copied()
            .filter(|id| voters.contains(id) || caught_up(id))
            .collect();
        if !target.is_empty() && target != voters && target.contains(&self.inner.id) {
            info!(?target, "changing the voting gateways");
            return change(ChangeMembers::ReplaceAllVoters(target), true).await;
        }
        Ok(())
    }

    async fn serve_write(&self, params: &str) -> Result<String, WireError> {
        let cmd: Command = network::decode(params)
            .map_err(|e| WireError::new("INVALID_REQUEST", e.to_string()))?;
        cmd.check().map_err(|e| {
            WireError::new("INVALID_REQUEST", format!("value is not valid JSON: {e}"))
        })?;
        let deadline = Instant::now() + self.inner.cfg.write_timeout;
        let ack = self
            .write_once(&cmd, deadline, false)
            .await
            .map_err(|e| e.to_wire())?;
        reply(&ack.revision, false)
    }

    async fn serve_handoff(&self, from: PublicKey) -> Result<String, WireError> {
        let m = self.raft().metrics().borrow().clone();
        let leader_key = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.key));
        if leader_key != Some(from.0) {
            return Err(WireError::new(
                "INVALID_REQUEST",
                "only the current primary can hand its role over",
            ));
        }
        let raft = self.raft().clone();
        let t = self.inner.timings;
        tokio::spawn(async move {
            // The followers refuse votes until the leader's lease (the longest election
            // timeout) has lapsed since its last heartbeat; stand just after that, before
            // their own election timers fire.
            tokio::time::sleep(t.election_max + t.heartbeat).await;
            if let Err(e) = raft.trigger().elect().await {
                warn!("cannot stand for election: {e}");
            }
        });
        Ok(String::new())
    }
}

/// How long a pairing decision is retried while no majority is reachable.
pub const PAIRING_RETRY_FOR: Duration = Duration::from_secs(600);

/// Pause between attempts of a write while a leader is elected or moves.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A learner this many entries behind may become a voter (it catches up within a heartbeat).
const LAG_FOR_VOTER: u64 = 64;

impl PeerService for Replica {
    fn handle(&self, from: PublicKey, req: Request) -> BoxFuture<Result<String, WireError>> {
        let this = self.clone();
        Box::pin(async move {
            let raft = &this.raft();
            let bad = |e: network::PayloadError| WireError::new("INVALID_REQUEST", e.to_string());
            let compress = this.inner.cfg.compression;
            match req.method.as_str() {
                network::METHOD_APPEND => {
                    let rpc = network::decode(&req.params).map_err(bad)?;
                    reply(&raft.append_entries(rpc).await, compress)
                }
                network::METHOD_VOTE => {
                    let rpc = network::decode(&req.params).map_err(bad)?;
                    reply(&raft.vote(rpc).await, compress)
                }
                network::METHOD_SNAPSHOT => {
                    let rpc = network::decode(&req.params).map_err(bad)?;
                    reply(&raft.install_snapshot(rpc).await, compress)
                }
                METHOD_WRITE => this.serve_write(&req.params).await,
                METHOD_HANDOFF => this.serve_handoff(from).await,
                election::METHOD_PREVOTE => {
                    let req = network::decode(&req.params).map_err(bad)?;
                    reply(&this.serve_prevote(&req).await, false)
                }
                other => Err(WireError::new(
                    "INVALID_REQUEST",
                    format!("unknown consensus method {other}"),
                )),
            }
        })
    }
}

/// Encodes the reply to a consensus request.
fn reply<T: serde::Serialize>(value: &T, compress: bool) -> Result<String, WireError> {
    network::encode(value, compress).map_err(|e| WireError::new("UNAVAILABLE", e.to_string()))
}

/// Opens the raft log in `store` (checking every stored entry first) and starts a raft node
/// on it and `sm` over `mesh`.
async fn build_raft(
    id: NodeId,
    config: &Arc<openraft::Config>,
    mesh: &Mesh,
    compression: bool,
    store: &Store,
    sm: &SqliteStateMachine,
) -> Result<Raft<TypeConfig>, ConsensusError> {
    let s = store.clone();
    let log = tokio::task::spawn_blocking(move || super::SqliteLogStore::open(s))
        .await
        .map_err(|e| ConsensusError::Fatal(e.to_string()))??;
    let entries = log.verify().await?;
    sm_revision(sm).await?;
    debug!(entries, "raft log verified");
    let network = MeshNetwork::new(
        mesh.clone(),
        compression,
        log.clone(),
        config.max_payload_entries,
    );
    Raft::new(id, config.clone(), network, log, sm.clone())
        .await
        .map_err(|e| ConsensusError::Fatal(e.to_string()))
}

async fn sm_revision(sm: &SqliteStateMachine) -> Result<u64, ConsensusError> {
    let sm = sm.clone();
    blocking(move || sm.revision()).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConsensusStoreError> + Send + 'static,
) -> Result<T, ConsensusError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ConsensusError::Fatal(e.to_string()))?
        .map_err(ConsensusError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_meet_the_failover_goal() {
        let t = Timings::for_interval(Duration::from_secs(1));
        // Replacement within one heartbeat + lease + the longest timeout: under 3 s with room
        // for a vote round trip.
        assert!(t.heartbeat + t.election_max * 2 <= Duration::from_millis(2500));
        // A 250 ms intercontinental round trip fits one heartbeat, at any interval, and an
        // election needs at least 4.5 heartbeats of silence.
        for h in [50, 300, 500, 1000, 10_000] {
            let t = Timings::for_interval(Duration::from_millis(h));
            assert!(t.heartbeat >= Duration::from_millis(400));
            assert!(t.election_min < t.election_max);
            // (4.49: integer milliseconds round down.)
            assert!(
                (t.election_max + t.election_min).as_secs_f64() >= t.heartbeat.as_secs_f64() * 4.49
            );
        }
        assert_eq!(
            Timings::for_heartbeat(Duration::from_millis(1000)).election_max,
            Duration::from_millis(2500)
        );
    }
}
