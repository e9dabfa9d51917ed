//! The cluster: servers that share one room directory, kept in NATS JetStream key-value
//! (`--cluster nats://…`). A room lives on one node; the directory says which.
//!
//! - **Rooms** (bucket `downbeat-rooms`, key `<tenant>.<code>`): a node claims a code with
//!   `create`, which succeeds only if no live entry holds the key, so one code never has two
//!   owners, however many nodes create rooms at once. Codes are therefore unique across the
//!   cluster. The entry names its node and a lease (a wall-clock deadline); the node renews
//!   it by compare-and-set on the revision it last wrote, about three times a lease, and
//!   deletes it (by revision) when the room closes. A renewal refused for its revision means
//!   another node took the key over: this node lost the room and must stop acting for it.
//!   A claim on a key whose lease ran out (its node died) takes it over by revision.
//! - **Nodes** (bucket `downbeat-nodes`, key the node id): where each node is reached (HTTP,
//!   WebTransport, WebSocket URLs, the certificate hashes to pin) and its lease, renewed with
//!   the rooms'.
//! - **Moves**: a hello for a room this node does not hold is answered with where the
//!   directory says it lives ([`Cluster::locate`]), and the client connects there.
//! - **Watches**: each node watches both buckets and keeps what it saw (`View`): the live
//!   nodes (their addresses, leases and usage) and every room's holder and lease. Listing
//!   nodes and finding orphaned rooms read that view, not the directory; a room this node
//!   holds that another node's write takes over is noticed as the write arrives, not at the
//!   next renewal ([`Cluster::lost_rooms`]). Decisions that must be exact (a claim, a
//!   takeover, a lookup for a hello) still read and write the directory by revision.
//! - **Takeovers are spread**: of the live nodes, the one that ranks first for a room's key
//!   (rendezvous hashing) sweeps it up when its node's lease runs out; any node does once it
//!   has been orphaned for another lease, and a member's hello takes it up wherever it
//!   arrives.
//!
//! Leases are compared with the hosts' wall clocks, which the nodes of one cluster keep
//! synchronized (chrony); a lease of a few seconds tolerates milliseconds of skew. How well
//! they agree is measured, not trusted: each node answers clock requests on
//! `downbeat.clock.<node id>` with its wall clock as it received and as it answered, and
//! measures every other node with the engine's own estimator (four timestamps, the same
//! exchange clients use with the server), exported in `/metrics` and shown in the inspector.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use downbeat_engine::clock::{self, Estimator, Sample};
use downbeat_protocol::{BoundedString, BoundedVec, ClientNanos, Moved, ServerNanos};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::identity::PublishedHashes;
use crate::sel::unix_ms_now;

/// The room directory's bucket.
pub const ROOMS_BUCKET: &str = "downbeat-rooms";
/// The nodes' bucket.
pub const NODES_BUCKET: &str = "downbeat-nodes";

/// Why the cluster could not be reached or used.
#[derive(Debug, thiserror::Error)]
#[error("the cluster's NATS server: {0}")]
pub struct ClusterError(String);

impl ClusterError {
    fn of(what: &str, e: impl std::fmt::Display) -> Self {
        Self(format!("{what}: {e}"))
    }
}

/// Where a node is reached, as the nodes' bucket holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// The node's id (`--node-id`).
    pub id: String,
    /// Its API (`--public-http-url`).
    pub http_url: String,
    /// Its WebTransport endpoint.
    pub webtransport_url: String,
    /// Its WebSocket endpoint.
    pub websocket_url: String,
    /// Its development certificates' SHA-256 hashes, hex (empty with production ones).
    pub certificate_hashes: Vec<String>,
    /// Until when the entry holds without a renewal (Unix ms).
    pub lease_until_ms: i64,
    /// What each school has open on the node, by tenant id, as of its last renewal: the other
    /// nodes add it up to hold each school's limits across the cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub usage: BTreeMap<String, TenantUsage>,
}

/// One school's rooms and sessions on a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    /// Rooms open.
    pub rooms: u32,
    /// Sessions open (members seated, or saying hello).
    pub sessions: u32,
}

impl NodeEntry {
    /// Where a client goes to reach a room on this node.
    pub fn moved(&self) -> Moved {
        let hashes: Vec<[u8; 32]> = self
            .certificate_hashes
            .iter()
            .filter_map(|h| hex::decode(h).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()))
            .take(2)
            .collect();
        Moved {
            webtransport_url: BoundedString::truncating(&self.webtransport_url),
            websocket_url: BoundedString::truncating(&self.websocket_url),
            certificate_hashes: BoundedVec::try_from_vec(hashes).unwrap_or_default(),
        }
    }
}

/// What another node needs to take a room over, kept in the room's directory entry and
/// written before any change that matters for it is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomState {
    /// The subject of the teacher who created the room.
    pub owner: String,
    /// The room's name.
    pub name: String,
    /// The SEL room session's id, which the new node carries on.
    pub sel_id: String,
    /// When the room was created (Unix ms).
    pub created_at_ms: i64,
    /// The owner's co-teachers (subjects).
    pub co_teachers: Vec<String>,
    /// The engine's [`downbeat_engine::room::Handover`]: postcard, then base64.
    pub room: String,
}

/// A room's entry: which node holds it, until when, and what a takeover needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RoomEntry {
    node: String,
    lease_until_ms: i64,
    /// `None` only between a claim and the room's first write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<RoomState>,
}

/// A room this node holds: the revision it last wrote and the state it last wrote (or
/// means to write at the next renewal, if a write did not go through).
#[derive(Debug)]
struct Held {
    revision: u64,
    state: Option<RoomState>,
}

/// Why a room's entry was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another node holds the room now: this node must stop acting for it.
    #[error("another node holds this room now")]
    Lost,
    /// The directory did not answer in time; nothing is known to have changed.
    #[error("the cluster's room directory cannot be reached: {0}")]
    Unreachable(String),
}

/// Why this node did not take a room over.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The directory could not be read or written.
    #[error(transparent)]
    Directory(#[from] ClusterError),
    /// This node's clock is too far from the others' for a timeline to move here unchanged.
    #[error("{0}")]
    Clock(String),
}

/// How long one write to the directory may take before it counts as unreachable.
const WRITE_PATIENCE: Duration = Duration::from_secs(2);

/// Room leases renewed at once: a pass over a node's rooms takes a few round trips to NATS,
/// not one per room, so a busy node's renewals stay well inside the lease.
const RENEWALS_IN_FLIGHT: usize = 64;

/// A room's entry as this node's watch last saw it (the engine's state left in the
/// directory).
#[derive(Clone, Debug)]
struct Seen {
    node: String,
    lease_until_ms: i64,
    /// `None` between a claim and the room's first write.
    about: Option<About>,
}

/// Who runs a room and what it is called, from its entry.
#[derive(Clone, Debug)]
struct About {
    owner: String,
    co_teachers: Vec<String>,
    name: String,
    created_at_ms: i64,
}

/// A room another node holds, as this node's watch last saw its entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomElsewhere {
    /// Its code, as the directory keys it (no dash).
    pub code: String,
    /// Its name.
    pub name: String,
    /// When it was made (Unix ms).
    pub created_at_ms: i64,
    /// The node that holds it.
    pub node: String,
}

/// What this node's watches saw of the directory: the nodes' entries and the rooms' holders,
/// by key. Deleted entries are dropped; a lapsed lease stays until its entry changes.
#[derive(Debug, Default)]
struct View {
    nodes: HashMap<String, NodeEntry>,
    rooms: HashMap<String, Seen>,
}

/// Where the directory says a room is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// Another live node holds it.
    Elsewhere(NodeEntry),
    /// Nobody acts for it and this node may take it over: its node's lease ran out, or it was
    /// handed to this node.
    Orphaned,
    /// No such room, this node holds it, or its node is not reachable.
    Nowhere,
}

impl Located {
    /// The node to go to, if another live node holds the room.
    pub fn elsewhere(self) -> Option<NodeEntry> {
        match self {
            Self::Elsewhere(node) => Some(node),
            Self::Orphaned | Self::Nowhere => None,
        }
    }
}

/// This node's membership in the cluster.
#[derive(Debug)]
pub struct Cluster {
    client: async_nats::Client,
    /// The other nodes' wall clocks against this one's, by node id.
    clocks: Mutex<HashMap<String, Estimator>>,
    node: Mutex<NodeEntry>,
    rooms: kv::Store,
    nodes: kv::Store,
    lease: Duration,
    /// The certificate hashes the node's entry publishes (`None`: as given).
    hashes: Option<Arc<PublishedHashes>>,
    /// The room keys this node holds. Each has its own lock, so a room's writes (its state,
    /// its renewals, its hand-over) go out one at a time, each on the revision the last one
    /// got.
    held: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Held>>>>,
    /// The most a node's clock may be off the others' (as measured) for it to take rooms over.
    clock_bound: Mutex<Duration>,
    /// Each school's rooms and sessions on the other live nodes, summed, as their entries
    /// said at this node's last renewal.
    elsewhere: Mutex<HashMap<String, TenantUsage>>,
    /// What the watches saw.
    view: Mutex<View>,
    /// Rooms this node lost (another node's write took them over), not yet collected.
    lost: Mutex<Vec<(String, String)>>,
    /// Wakes [`Self::lost_rooms`]'s waiter.
    lost_wake: tokio::sync::Notify,
    /// The watch task, stopped when the cluster is dropped.
    watch: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            watch.abort();
        }
    }
}

/// The default of [`Cluster::set_clock_bound`].
pub const DEFAULT_CLOCK_BOUND: Duration = Duration::from_millis(1);

/// The directory key of `code` in `tenant`.
fn key(tenant: &str, code: &str) -> String {
    format!("{tenant}.{code}")
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

impl Cluster {
    /// Connects to the NATS server at `url`, makes sure both buckets exist, registers `node`
    /// (its lease from now) and starts watching the directory (until the cluster is dropped).
    pub async fn connect(url: &str, node: NodeEntry, lease: Duration) -> Result<Arc<Self>, ClusterError> {
        Self::connect_with(url, node, lease, None).await
    }

    /// [`Self::connect`], publishing the certificate hashes `hashes` holds at each renewal.
    pub(crate) async fn connect_with(
        url: &str,
        node: NodeEntry,
        lease: Duration,
        hashes: Option<Arc<PublishedHashes>>,
    ) -> Result<Arc<Self>, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("downbeat {}", node.id))
            .connect(url)
            .await
            .map_err(|e| ClusterError::of("connecting", e))?;
        let js = jetstream::new(client.clone());
        let rooms = bucket(&js, ROOMS_BUCKET).await?;
        let nodes = bucket(&js, NODES_BUCKET).await?;
        let cluster = Self {
            client,
            clocks: Mutex::new(HashMap::new()),
            node: Mutex::new(node),
            rooms,
            nodes,
            lease,
            hashes,
            held: Mutex::new(HashMap::new()),
            clock_bound: Mutex::new(DEFAULT_CLOCK_BOUND),
            elsewhere: Mutex::new(HashMap::new()),
            view: Mutex::new(View::default()),
            lost: Mutex::new(Vec::new()),
            lost_wake: tokio::sync::Notify::new(),
            watch: Mutex::new(None),
        };
        cluster.renew_node().await?;
        let cluster = Arc::new(cluster);
        // The watches replay every entry first, then follow; until they have, the view is
        // filled from one listing of the nodes, so a node knows the others from its start.
        let (node_watch, room_watch) = cluster.watches().await?;
        cluster.load_nodes().await?;
        let task = tokio::spawn(Self::keep_watching(Arc::downgrade(&cluster), node_watch, room_watch));
        *cluster.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task.abort_handle());
        info!(node = %cluster.node_id(), "joined the cluster");
        Ok(cluster)
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Both buckets' watches, each replaying every key's last entry, then following.
    async fn watches(&self) -> Result<(kv::Watch, kv::Watch), ClusterError> {
        let watch = |e| ClusterError::of("watching the directory", e);
        let nodes = self.nodes.watch_with_history(">").await.map_err(watch)?;
        let rooms = self.rooms.watch_with_history(">").await.map_err(watch)?;
        Ok((nodes, rooms))
    }

    /// Reads every node's entry into the view.
    async fn load_nodes(&self) -> Result<(), ClusterError> {
        use futures_util::TryStreamExt as _;
        let read = |e: &dyn std::fmt::Display| ClusterError::of("listing the nodes", e);
        let ids: Vec<String> =
            self.nodes.keys().await.map_err(|e| read(&e))?.try_collect().await.map_err(|e| read(&e))?;
        for id in ids {
            if let Some(entry) = self.nodes.entry(&id).await.map_err(|e| read(&e))? {
                self.saw_node(&entry);
            }
        }
        Ok(())
    }

    /// Follows both watches while the cluster lives; a watch that ends or fails (NATS went
    /// away) is made again after a second, replaying what changed meanwhile.
    async fn keep_watching(cluster: std::sync::Weak<Self>, mut nodes: kv::Watch, mut rooms: kv::Watch) {
        use futures_util::StreamExt as _;
        loop {
            let failed = loop {
                let entry = tokio::select! {
                    entry = nodes.next() => entry,
                    entry = rooms.next() => entry,
                };
                let Some(cluster) = cluster.upgrade() else { return };
                match entry {
                    Some(Ok(entry)) if entry.bucket == NODES_BUCKET => cluster.saw_node(&entry),
                    Some(Ok(entry)) => cluster.saw_room(&entry),
                    Some(Err(e)) => break e.to_string(),
                    None => break "the watch ended".to_owned(),
                }
            };
            warn!(error = %failed, "watching the cluster's directory stopped; watching again in a second");
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(cluster) = cluster.upgrade() else { return };
                match cluster.watches().await {
                    Ok(watches) => {
                        (nodes, rooms) = watches;
                        break;
                    }
                    Err(e) => debug!(error = %e, "the directory cannot be watched yet"),
                }
            }
        }
    }

    /// A node's entry changed.
    fn saw_node(&self, entry: &kv::Entry) {
        let mut view = self.view();
        match serde_json::from_slice::<NodeEntry>(&entry.value) {
            Ok(node) if entry.operation == kv::Operation::Put => {
                view.nodes.insert(entry.key.clone(), node);
            }
            _ => {
                view.nodes.remove(&entry.key);
            }
        }
    }

    /// A room's entry changed. If this node holds it and the entry is another node's write
    /// after this node's last one, the room was taken over: this node stops holding it and
    /// [`Self::lost_rooms`] reports it. (A hand-over this node wrote has this node's
    /// revision; a write of this node's in flight meets the new revision and fails by
    /// itself.)
    fn saw_room(&self, entry: &kv::Entry) {
        let seen =
            serde_json::from_slice::<RoomEntry>(&entry.value).ok().filter(|_| entry.operation == kv::Operation::Put);
        let taker = match seen {
            Some(room) => {
                let taker = room.node.clone();
                let about = room.state.map(|s| About {
                    owner: s.owner,
                    co_teachers: s.co_teachers,
                    name: s.name,
                    created_at_ms: s.created_at_ms,
                });
                let seen = Seen { node: room.node, lease_until_ms: room.lease_until_ms, about };
                self.view().rooms.insert(entry.key.clone(), seen);
                Some(taker)
            }
            None => {
                self.view().rooms.remove(&entry.key);
                None
            }
        };
        if taker.is_none_or(|t| t == self.node_id()) {
            return;
        }
        let Some(slot) = self.slot(&entry.key) else { return };
        let Ok(held) = slot.try_lock() else { return };
        if held.revision >= entry.revision {
            return;
        }
        drop(held);
        warn!(key = %entry.key, "another node took this room over; this node stops acting for it");
        self.give_up(&entry.key, &slot);
    }

    /// Stops holding `key` (if `slot` is still its holding) and reports it lost: another node
    /// holds it now.
    fn give_up(&self, key: &str, slot: &Arc<tokio::sync::Mutex<Held>>) {
        self.forget(key, slot);
        self.lose(key);
    }

    /// Reports `key` lost.
    fn lose(&self, key: &str) {
        if let Some((tenant, code)) = key.split_once('.') {
            self.lost
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((tenant.to_owned(), code.to_owned()));
            self.lost_wake.notify_one();
        }
    }

    /// The rooms this node lost since the last call, `(tenant, code)` each: another node
    /// holds them now, and this node must stop acting for them. Waits until there is one.
    pub async fn lost_rooms(&self) -> Vec<(String, String)> {
        loop {
            let lost = std::mem::take(&mut *self.lost.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            if !lost.is_empty() {
                return lost;
            }
            self.lost_wake.notified().await;
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Held>>>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hold(&self, key: String, revision: u64, state: Option<RoomState>) {
        self.held().insert(key, Arc::new(tokio::sync::Mutex::new(Held { revision, state })));
    }

    fn slot(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<Held>>> {
        self.held().get(key).cloned()
    }

    /// Sets the most this node's clock may be off the others' for it to take rooms over.
    pub fn set_clock_bound(&self, bound: Duration) {
        *self.clock_bound.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = bound;
    }

    /// Whether this node holds the room `code` of `tenant` in the directory.
    pub fn holds(&self, tenant: &str, code: &str) -> bool {
        self.held().contains_key(&key(tenant, code))
    }

    fn me(&self) -> MutexGuard<'_, NodeEntry> {
        self.node.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets what this node's entry says each school has open here, from its next renewal.
    pub fn publish_usage(&self, usage: BTreeMap<String, TenantUsage>) {
        self.me().usage = usage;
    }

    /// What `tenant` has open on the other live nodes, as their entries said at this node's
    /// last renewal (about a third of a lease ago at most).
    pub fn elsewhere(&self, tenant: &str) -> TenantUsage {
        let elsewhere = self.elsewhere.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        elsewhere.get(tenant).copied().unwrap_or_default()
    }

    /// Adds up the other live nodes' usage (`nodes`, as just listed).
    fn count_elsewhere(&self, nodes: &[NodeEntry]) {
        let me = self.node_id();
        let mut sum: HashMap<String, TenantUsage> = HashMap::new();
        for (tenant, usage) in nodes.iter().filter(|n| n.id != me).flat_map(|n| &n.usage) {
            let total = sum.entry(tenant.clone()).or_default();
            total.rooms = total.rooms.saturating_add(usage.rooms);
            total.sessions = total.sessions.saturating_add(usage.sessions);
        }
        *self.elsewhere.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = sum;
    }

    /// This node's id.
    pub fn node_id(&self) -> String {
        self.me().id.clone()
    }

    /// How long an entry holds without renewal.
    pub const fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_until(&self) -> i64 {
        unix_ms_now().saturating_add(i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX))
    }

    fn room_entry(&self, state: Option<RoomState>) -> RoomEntry {
        RoomEntry { node: self.node_id(), lease_until_ms: self.lease_until(), state }
    }

    /// Claims `code` of `tenant` for this node: true if it is now this node's, false if a
    /// live entry of another node holds it.
    pub async fn claim(&self, tenant: &str, code: &str) -> Result<bool, ClusterError> {
        let key = key(tenant, code);
        match self.rooms.create(&key, encode(&self.room_entry(None))).await {
            Ok(revision) => {
                self.hold(key, revision, None);
                return Ok(true);
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(ClusterError::of("claiming a room", e)),
        }
        // Held already: by a live node, or by one whose lease ran out (it died), whose entry
        // is taken over by the revision seen, so two claimers cannot both win it.
        let Some(entry) = self.rooms.entry(&key).await.map_err(|e| ClusterError::of("reading a room", e))? else {
            return Ok(false);
        };
        let live = serde_json::from_slice::<RoomEntry>(&entry.value).is_ok_and(|e| e.lease_until_ms >= unix_ms_now());
        if entry.operation == kv::Operation::Put && live {
            return Ok(false);
        }
        let taken = self.take(&key, entry.revision, None).await.map_err(|e| ClusterError::of("claiming a room", e))?;
        if taken {
            info!(key, "claimed a code whose node's lease had run out");
        }
        Ok(taken)
    }

    /// Writes this node's entry for `key` (with `state`) over the one read at `revision`, and
    /// holds the key: `false` if the entry changed since (another node took it first), so of
    /// two nodes taking one entry only one wins.
    async fn take(&self, key: &str, revision: u64, state: Option<RoomState>) -> Result<bool, kv::UpdateError> {
        let value = encode(&self.room_entry(state.clone()));
        match self.rooms.update(key, value, revision).await {
            Ok(revision) => {
                self.hold(key.to_owned(), revision, state);
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives `code` of `tenant` up (the room closed): its entry is deleted if it is still
    /// the one this node wrote.
    pub async fn release(&self, tenant: &str, code: &str) {
        let key = key(tenant, code);
        let Some(slot) = self.held().remove(&key) else { return };
        let revision = slot.lock().await.revision;
        if let Err(e) = self.rooms.delete_expect_revision(&key, Some(revision)).await {
            debug!(key, error = %e, "a closed room's directory entry was not deleted (taken over, or NATS unreachable)");
        }
    }

    /// Where the directory says the room `code` of `tenant` is, read now (not from the
    /// view: a room claimed a moment ago elsewhere must be found).
    pub async fn locate(&self, tenant: &str, code: &str) -> Result<Located, ClusterError> {
        let read = |e| ClusterError::of("reading the directory", e);
        let key = key(tenant, code);
        if self.slot(&key).is_some() {
            return Ok(Located::Nowhere);
        }
        let Some(entry) = self.rooms.entry(&key).await.map_err(read)? else { return Ok(Located::Nowhere) };
        let room = match serde_json::from_slice::<RoomEntry>(&entry.value) {
            Ok(room) if entry.operation == kv::Operation::Put => room,
            _ => return Ok(Located::Nowhere),
        };
        let now = unix_ms_now();
        let me = self.node_id();
        if room.state.is_some() && (room.lease_until_ms < now || room.node == me) {
            return Ok(Located::Orphaned);
        }
        if room.node == me || room.lease_until_ms < now {
            return Ok(Located::Nowhere);
        }
        let Some(node) = self.nodes.entry(&room.node).await.map_err(read)? else { return Ok(Located::Nowhere) };
        Ok(serde_json::from_slice::<NodeEntry>(&node.value)
            .ok()
            .filter(|n| node.operation == kv::Operation::Put && n.lease_until_ms >= now)
            .map_or(Located::Nowhere, Located::Elsewhere))
    }

    /// The rooms of `tenant` that `teacher` owns or co-teaches on other nodes, as the watch saw
    /// them (a room whose node died is listed until another node takes it over, which lists
    /// it then). Newest first.
    pub fn rooms_run_by(&self, tenant: &str, teacher: &str) -> Vec<RoomElsewhere> {
        let me = self.node_id();
        let prefix = format!("{tenant}.");
        let mut rooms: Vec<RoomElsewhere> = self
            .view()
            .rooms
            .iter()
            .filter(|(key, seen)| key.starts_with(&prefix) && seen.node != me)
            .filter_map(|(key, seen)| {
                let about = seen.about.as_ref()?;
                let runs = about.owner == teacher || about.co_teachers.iter().any(|c| c == teacher);
                runs.then(|| RoomElsewhere {
                    code: key[prefix.len()..].to_owned(),
                    name: about.name.clone(),
                    created_at_ms: about.created_at_ms,
                    node: seen.node.clone(),
                })
            })
            .collect();
        rooms.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| a.code.cmp(&b.code)));
        rooms
    }

    /// Every node whose lease holds now (this one included), by id, as the watch saw them.
    pub fn nodes(&self) -> Vec<NodeEntry> {
        let now = unix_ms_now();
        let mut nodes: Vec<NodeEntry> =
            self.view().nodes.values().filter(|n| n.lease_until_ms >= now).cloned().collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// Renews this node's entry, with the certificate hashes it pins now.
    async fn renew_node(&self) -> Result<(), ClusterError> {
        let entry = {
            let mut me = self.me();
            if let Some(hashes) = &self.hashes {
                me.certificate_hashes = hashes.get().iter().map(|h| hex::encode(h.sha256)).collect();
            }
            me.lease_until_ms = self.lease_until();
            me.clone()
        };
        self.nodes.put(&entry.id, encode(&entry)).await.map_err(|e| ClusterError::of("registering the node", e))?;
        Ok(())
    }

    /// Renews this node's entry and every room it holds. A room whose renewal is refused for
    /// its revision was taken over: [`Self::lost_rooms`] reports it.
    pub async fn renew(&self) {
        if let Err(e) = self.renew_node().await {
            warn!(error = %e, "renewing the node's lease failed");
        }
        // The other nodes' usage, for the schools' limits across the cluster, as the watch
        // saw their entries (a node that died drops out once its lease runs out).
        self.count_elsewhere(&self.nodes());
        let held: Vec<(String, Arc<tokio::sync::Mutex<Held>>)> =
            self.held().iter().map(|(k, slot)| (k.clone(), slot.clone())).collect();
        use futures_util::StreamExt as _;
        futures_util::stream::iter(held)
            .for_each_concurrent(RENEWALS_IN_FLIGHT, |(key, slot)| async move {
                let mut held = slot.lock().await;
                let entry = self.room_entry(held.state.clone());
                match self.write(&key, &mut held, entry).await {
                    Ok(()) => {}
                    Err(WriteError::Lost) => {
                        drop(held);
                        self.give_up(&key, &slot);
                    }
                    Err(e) => warn!(key, error = %e, "renewing a room's lease failed; retrying at the next beat"),
                }
            })
            .await;
    }

    /// Writes `entry` for `key` on the revision `held` last got.
    async fn write(&self, key: &str, held: &mut Held, entry: RoomEntry) -> Result<(), WriteError> {
        let update = self.rooms.update(key, encode(&entry), held.revision);
        match tokio::time::timeout(WRITE_PATIENCE, update).await {
            Ok(Ok(revision)) => {
                held.revision = revision;
                Ok(())
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                warn!(key, "another node holds this room now; this node stops acting for it");
                Err(WriteError::Lost)
            }
            Ok(Err(e)) => Err(WriteError::Unreachable(e.to_string())),
            Err(_) => Err(WriteError::Unreachable(format!("no answer within {WRITE_PATIENCE:?}"))),
        }
    }

    /// Stops holding `key` (if `slot` is still its holding).
    fn forget(&self, key: &str, slot: &Arc<tokio::sync::Mutex<Held>>) {
        let mut held = self.held();
        if held.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            held.remove(key);
        }
    }

    /// Writes the room's `state` to its entry (renewing its lease), on the revision this node
    /// last wrote. [`WriteError::Lost`]: another node took it over, and this node no longer
    /// holds it. [`WriteError::Unreachable`]: not known to be written; the next renewal
    /// writes it.
    pub async fn write_state(&self, tenant: &str, code: &str, state: RoomState) -> Result<(), WriteError> {
        let key = key(tenant, code);
        let Some(slot) = self.slot(&key) else { return Err(WriteError::Lost) };
        let mut held = slot.lock().await;
        held.state = Some(state.clone());
        let result = self.write(&key, &mut held, self.room_entry(Some(state))).await;
        if matches!(result, Err(WriteError::Lost)) {
            drop(held);
            self.forget(&key, &slot);
        }
        result
    }

    /// Hands the room over to node `to`: its entry names that node (with a fresh lease) and
    /// `state`, written on this node's last revision. Once it is, this node no longer holds
    /// the room; `to` takes it up when its members come, or on its next sweep.
    pub async fn hand_over(&self, tenant: &str, code: &str, to: &str, state: RoomState) -> Result<(), WriteError> {
        let key = key(tenant, code);
        let Some(slot) = self.slot(&key) else { return Err(WriteError::Lost) };
        let mut held = slot.lock().await;
        let entry = RoomEntry { node: to.to_owned(), lease_until_ms: self.lease_until(), state: Some(state) };
        let result = self.write(&key, &mut held, entry).await;
        if !matches!(result, Err(WriteError::Unreachable(_))) {
            drop(held);
            self.forget(&key, &slot);
        }
        result
    }

    /// Takes the room `code` of `tenant` over if it is this node's to take: its entry names
    /// this node but no room here holds it (handed over to this node), or its node's lease
    /// ran out (that node died or was paused). Written by the revision read, so of several
    /// nodes trying at once one wins. The state to resume, or `None` if the room is live
    /// elsewhere, gone, or another node won it.
    pub async fn adopt(&self, tenant: &str, code: &str) -> Result<Option<RoomState>, AdoptError> {
        let key = key(tenant, code);
        if self.slot(&key).is_some() {
            return Ok(None);
        }
        let read = |e| ClusterError::of("reading the directory", e);
        let Some(entry) = self.rooms.entry(&key).await.map_err(read)? else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let Ok(room) = serde_json::from_slice::<RoomEntry>(&entry.value) else { return Ok(None) };
        let me = self.node_id();
        let lapsed = room.lease_until_ms < unix_ms_now();
        let Some(state) = room.state.filter(|_| lapsed || room.node == me) else { return Ok(None) };
        self.check_clock()?;
        let taken = self
            .take(&key, entry.revision, Some(state.clone()))
            .await
            .map_err(|e| ClusterError::of("taking a room over", e))?;
        if !taken {
            return Ok(None);
        }
        info!(key, from = %room.node, lapsed, "took a room over");
        Ok(Some(state))
    }

    /// The rooms this node should take over now, as the watch saw the directory: entries
    /// that name it but no room here holds (handed over to it), and entries whose lease ran
    /// out and that rank this node first among the live nodes (`rank`), or that ran out a
    /// whole lease ago (the first node did not take them). `(tenant, code)` each.
    pub fn orphans(&self) -> Vec<(String, String)> {
        let (me, now) = (self.node_id(), unix_ms_now());
        let lease = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let live: Vec<String> = self.nodes().into_iter().map(|n| n.id).collect();
        let candidates: Vec<(String, Seen)> = self
            .view()
            .rooms
            .iter()
            .filter(|(_, seen)| seen.about.is_some() && (seen.node == me || seen.lease_until_ms < now))
            .map(|(key, seen)| (key.clone(), seen.clone()))
            .collect();
        candidates
            .into_iter()
            .filter(|(key, seen)| {
                self.slot(key).is_none()
                    && (seen.node == me
                        || seen.lease_until_ms.saturating_add(lease) < now
                        || first_for(key, &live).is_none_or(|first| first == me))
            })
            .filter_map(|(key, _)| key.split_once('.').map(|(t, c)| (t.to_owned(), c.to_owned())))
            .collect()
    }

    /// Whether this node's clock is close enough to the others' (as measured) to take a room
    /// over: a timeline moves between nodes unchanged, so the clocks' difference would move
    /// every beat by as much.
    fn check_clock(&self) -> Result<(), AdoptError> {
        let bound = *self.clock_bound.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bound_micros = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX);
        match self.clock_offsets().into_iter().max_by_key(|o| o.offset_micros.unsigned_abs()) {
            Some(worst) if worst.offset_micros.unsigned_abs() > bound_micros => Err(AdoptError::Clock(format!(
                "this node's clock is {} µs off node {}'s, beyond the cluster's bound of {bound_micros} µs; \
                 it takes no room over until the hosts' clocks agree (check chrony)",
                worst.offset_micros, worst.node
            ))),
            _ => Ok(()),
        }
    }
}

/// How well `node` ranks for `key` (rendezvous hashing: FNV-1a over both, then mixed): the
/// same on every node and every version, so the live nodes agree which of them takes a room
/// over without a word, and a node's death moves only its own rooms.
fn rank(node: &str, key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain([0]).chain(key.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix (splitmix64's), so keys that differ in their last byte spread too.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Of `nodes`, the one that ranks first for the directory key `key`.
fn first_for<'a>(key: &str, nodes: &'a [String]) -> Option<&'a str> {
    nodes.iter().max_by_key(|n| rank(n, key)).map(String::as_str)
}

/// Of the node ids `nodes`, the one that takes the room `code` of `tenant` over when its
/// node's lease runs out (unless a member's hello reaches another node first).
pub fn taker_of<'a>(tenant: &str, code: &str, nodes: &'a [String]) -> Option<&'a str> {
    first_for(&key(tenant, code), nodes)
}

/// The subject a node answers clock requests on.
fn clock_subject(node: &str) -> String {
    format!("downbeat.clock.{node}")
}

/// The host's wall clock in ns since the Unix epoch (the cluster's shared time base).
fn wall_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Another node's clock as this one measured it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClockOffset {
    /// The other node.
    pub node: String,
    /// Its wall clock minus this one's, in µs.
    pub offset_micros: i64,
    /// The estimate's standard error, in µs (path asymmetry aside: half the round trip
    /// bounds that).
    pub uncertainty_micros: u64,
    /// The smallest round trip seen, in µs.
    pub rtt_micros: u64,
}

impl Cluster {
    /// Answers other nodes' clock requests until shutdown: each reply holds this node's wall
    /// clock when the request arrived and when the reply left (two big-endian u64, ns).
    pub async fn serve_clock(&self) -> Result<(), ClusterError> {
        use futures_util::StreamExt as _;
        let mut requests = self
            .client
            .subscribe(clock_subject(&self.node_id()))
            .await
            .map_err(|e| ClusterError::of("answering clock requests", e))?;
        while let Some(request) = requests.next().await {
            let t1 = wall_nanos();
            let Some(reply) = request.reply else { continue };
            let mut payload = Vec::with_capacity(16);
            payload.extend_from_slice(&t1.to_be_bytes());
            payload.extend_from_slice(&wall_nanos().to_be_bytes());
            if let Err(e) = self.client.publish(reply, payload.into()).await {
                debug!(error = %e, "a clock reply was not sent");
            }
        }
        Ok(())
    }

    /// Answers clock requests and measures the other nodes' clocks about three times a lease,
    /// publishing the figures in `stats`, until the task is dropped.
    pub(crate) async fn run_clock(self: Arc<Self>, stats: Arc<crate::stats::Stats>) {
        let measure = async {
            let mut beat = tokio::time::interval(self.lease / 3);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                if let Err(e) = self.measure_clocks().await {
                    warn!(error = %e, "measuring the other nodes' clocks failed");
                }
                let offsets = self.clock_offsets();
                stats.cluster_clock_peers.set(offsets.len() as u64);
                let max = |f: fn(&ClockOffset) -> u64| offsets.iter().map(f).max().unwrap_or(0);
                stats.cluster_clock_offset_max_micros.set(max(|o| o.offset_micros.unsigned_abs()));
                stats.cluster_clock_uncertainty_max_micros.set(max(|o| o.uncertainty_micros));
            }
        };
        let serve = async {
            if let Err(e) = self.serve_clock().await {
                warn!(error = %e, "this node does not answer clock requests");
            }
        };
        tokio::join!(measure, serve);
    }

    /// Measures every other live node's clock once: one exchange each, all at once, each
    /// within half a second.
    pub async fn measure_clocks(&self) -> Result<(), ClusterError> {
        let me = self.node_id();
        let others: Vec<NodeEntry> = self.nodes().into_iter().filter(|n| n.id != me).collect();
        let exchanges = others.into_iter().map(|node| async move {
            let t0 = wall_nanos();
            let asked = self.client.request(clock_subject(&node.id), Bytes::new());
            let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_millis(500), asked).await else {
                debug!(node = %node.id, "no clock reply in time");
                return;
            };
            let t3 = wall_nanos();
            let Ok(stamps) = <[u8; 16]>::try_from(&reply.payload[..]) else { return };
            let t1 = u64::from_be_bytes(stamps[..8].try_into().unwrap_or_default());
            let t2 = u64::from_be_bytes(stamps[8..].try_into().unwrap_or_default());
            let sample = Sample::from_timestamps(ClientNanos(t0), ServerNanos(t1), ServerNanos(t2), ClientNanos(t3));
            if let Some(sample) = sample {
                let mut clocks = self.clocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                clocks.entry(node.id).or_insert_with(|| Estimator::new(clock::Config::default())).add_sample(sample);
            }
        });
        futures_util::future::join_all(exchanges).await;
        Ok(())
    }

    /// The other nodes' clocks as measured so far, by node id.
    pub fn clock_offsets(&self) -> Vec<ClockOffset> {
        let now = ClientNanos(wall_nanos());
        let clocks = self.clocks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut offsets: Vec<ClockOffset> = clocks
            .iter()
            .filter_map(|(node, estimator)| {
                let e = estimator.estimate(now)?;
                Some(ClockOffset {
                    node: node.clone(),
                    offset_micros: e.offset_nanos / 1_000,
                    uncertainty_micros: e.uncertainty_nanos / 1_000,
                    rtt_micros: e.rtt_nanos / 1_000,
                })
            })
            .collect();
        offsets.sort_by(|a, b| a.node.cmp(&b.node));
        offsets
    }
}

/// The bucket `name`, made if it does not exist yet (the same settings on every node).
async fn bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, ClusterError> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = kv::Config { bucket: name.to_owned(), history: 1, ..Default::default() };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another node made it meanwhile.
        Err(e) => js.get_key_value(name).await.map_err(|_| ClusterError::of("making the bucket", e)),
    }
}
