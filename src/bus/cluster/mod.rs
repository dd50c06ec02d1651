//! Redis Cluster: sharded pub/sub. An organization's channel (`{prefix}org:{id}`, the same
//! name as with one Redis) lives in the hash slot of its name; it is published with
//! `SPUBLISH` and subscribed with `SSUBSCRIBE` at the master that owns that slot, so the
//! pub/sub load spreads over the masters instead of every message reaching every node.
//!
//! Publishing goes through the `redis` crate's cluster connection, which follows `MOVED`
//! and `ASK`. Subscribing does not: one task (the *manager*) owns one connection per master
//! ([`node`]) and is the only code that subscribes. It decides every organization's
//! subscription from the current presence and slot map, one channel per `SSUBSCRIBE`, so a
//! command never spans two slots (never CROSSSLOT) and a channel is subscribed at one
//! master at a time (never twice, so no duplicates). A subscription is lost when a slot
//! moves (the master sends `sunsubscribe`), when a master dies or is replaced, or when a
//! connection goes silent; each is noticed (the event, the closed connection, the probe
//! that does not come back), the slot map is read again and the channel subscribed at its
//! new owner. Meanwhile the replica is unready and ingest refuses ephemeral messages, and
//! afterwards the history (if any) reads back what was missed, as with one Redis.
//!
//! Each master connection also carries a probe channel of its own, whose slot that master
//! owns: every `FANOUT_BUS_PROBE_INTERVAL` the manager PINGs the connection and
//! `SPUBLISH`es a numbered probe there, and tears the connection down if the probe does
//! not come back.

mod node;
mod slots;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::sync::{OnceCell, mpsc, oneshot};
use tokio::time::Instant;

use self::node::{Auth, Event, NodeConn, Wiring};
use self::slots::{Node, SLOTS, SlotHealth, SlotMap, slot};
use super::gaps::Gaps;
use super::gate::{Gate, Request};
use super::inbound::Inbound;
use super::probe::{self, Probe};
use super::{BusError, BusSetupError, Sink};
use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::presence::Presence;
use crate::protocol::{Message, OrgId};
use crate::retry::{RateLimit, Retry};
use crate::tasks::{Policy, Tasks};

/// Bound on any single Redis command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short: while one replica waits out its backoff after a failover, the others already
/// deliver again, and its members miss what they get. Jitter spreads the reconnections.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const WARN_EVERY: Duration = Duration::from_secs(30);
/// The slot map is read again at least this often, so that masters added to the cluster
/// get their connection (and their probe) even when nothing moved.
const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// Settings of the cluster bus.
pub struct ClusterSettings {
    /// Seed nodes (`redis://host:port`), any of which answers with the whole cluster.
    pub seeds: Vec<String>,
    pub prefix: String,
    pub max_payload_bytes: usize,
    pub probe_interval: Duration,
}

fn channel(prefix: &str, org: &OrgId) -> String {
    format!("{prefix}org:{org}")
}

/// The cluster connection of the publishers, made on first use (a cluster that is down at
/// start is not an error, only "not ready") and then kept: it reconnects by itself.
struct Publisher {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl Publisher {
    async fn conn(&self) -> Result<ClusterConnection, String> {
        let connect = async {
            match tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_connection()).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no cluster connection within {CONNECT_TIMEOUT:?}")),
            }
        };
        self.conn.get_or_try_init(|| connect).await.cloned()
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let mut conn = self.conn().await?;
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
        }
    }
}

pub struct ClusterBus {
    publisher: Arc<Publisher>,
    prefix: String,
    /// Its generation is bumped whenever a subscription was lost: a publish that saw it
    /// change was not delivered everywhere here.
    gate: Gate,
}

impl ClusterBus {
    pub fn start(
        settings: ClusterSettings,
        presence: Arc<Presence>,
        sink: Arc<dyn Sink>,
        tasks: &Tasks,
    ) -> Result<Self, BusSetupError> {
        let infos = settings
            .seeds
            .iter()
            .map(|url| redis::IntoConnectionInfo::into_connection_info(url.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BusSetupError::InvalidUrl(e.to_string()))?;
        let tls = settings
            .seeds
            .iter()
            .any(|url| url.starts_with("rediss://"));
        let auth = Auth {
            tls: tls
                .then(|| crate::ops::http::tls_connector("rediss://"))
                .transpose()
                .map_err(BusSetupError::InvalidUrl)?,
            ..infos
                .first()
                .map(|info| Auth {
                    username: info.redis_settings().username().map(str::to_string),
                    password: info.redis_settings().password().map(str::to_string),
                    tls: None,
                })
                .unwrap_or_default()
        };
        let client = ClusterClient::builder(infos)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(COMMAND_TIMEOUT)
            .build()
            .map_err(|e| BusSetupError::InvalidUrl(e.to_string()))?;
        let publisher = Arc::new(Publisher {
            client,
            conn: OnceCell::new(),
        });
        let health = Arc::new(SlotHealth::new(&settings.prefix));
        let (gate, rx) = Gate::new(presence.clone(), Some(health.clone()));
        ::metrics::gauge!(metrics::REDIS_UP).set(0.0);
        ::metrics::gauge!(metrics::REDIS_SUBSCRIPTIONS).set(0.0);
        let requests = Arc::new(tokio::sync::Mutex::new(rx));
        let replica = format!("{:016x}", rand::random::<u64>());
        let (shared_up, shared_losses, shared_publisher) =
            (gate.up.clone(), gate.generation.clone(), publisher.clone());
        let prefix = settings.prefix.clone();
        let gaps = gate.gaps.clone();
        let (max_payload, probe_interval) = (settings.max_payload_bytes, settings.probe_interval);
        // Restarted when it fails: presence says what to subscribe to.
        tasks.spawn(
            "redis-cluster-subscriber",
            Policy::Restart,
            move |shutdown| {
                let (events_tx, events) = mpsc::unbounded_channel();
                let manager = Manager {
                    publisher: shared_publisher.clone(),
                    prefix: prefix.clone(),
                    replica: replica.clone(),
                    auth: auth.clone(),
                    max_payload,
                    probe_interval,
                    presence: presence.clone(),
                    sink: sink.clone(),
                    gaps: gaps.clone(),
                    health: health.clone(),
                    up: shared_up.clone(),
                    losses: shared_losses.clone(),
                    shutdown,
                    map: SlotMap::default(),
                    nodes: HashMap::new(),
                    next_id: 0,
                    orgs: HashMap::new(),
                    waiters: HashMap::new(),
                    recovering: HashSet::new(),
                    health_inputs: None,
                    // At the first start presence is empty; after a restart of this task, what
                    // it held was not received meanwhile.
                    lost_any: !presence.orgs().is_empty(),
                    events_tx,
                    events,
                    warn: RateLimit::new(WARN_EVERY),
                };
                let requests = requests.clone();
                async move { manager.run(&mut *requests.lock().await).await }
            },
        );
        Ok(Self {
            publisher,
            prefix: settings.prefix,
            gate,
        })
    }

    /// Publishes one ephemeral message with `SPUBLISH`, only while this replica's
    /// subscriptions are all in place ([`Gate::publish`]). Redis answers how many
    /// subscribers the master had for it: none while this replica holds sockets of the
    /// organization means that its own subscription missed it (a slot being migrated, whose
    /// publishes the new owner takes before the subscriptions move).
    pub async fn publish(&self, msg: Message) -> Result<(), BusError> {
        let send = |msg: Message| async move {
            let mut cmd = redis::cmd("SPUBLISH");
            cmd.arg(channel(&self.prefix, &msg.org))
                .arg(msg.to_envelope());
            self.publisher
                .query::<i64>(&cmd)
                .await
                .map_err(BusError::Unavailable)
        };
        self.gate.publish(msg, send).await
    }

    /// Publishes `batch` in order per organization: one pipeline per slot (a pipeline
    /// goes to one master), the slots in parallel.
    pub async fn publish_batch(&self, batch: &[Message]) -> Result<(), BusError> {
        let mut by_slot: HashMap<u16, redis::Pipeline> = HashMap::new();
        for msg in batch {
            let name = channel(&self.prefix, &msg.org);
            by_slot
                .entry(slot(name.as_bytes()))
                .or_insert_with(redis::pipe)
                .cmd("SPUBLISH")
                .arg(name)
                .arg(msg.to_envelope())
                .ignore();
        }
        let conn = self.publisher.conn().await.map_err(BusError::Unavailable)?;
        let sends = by_slot.into_values().map(|pipe| {
            let mut conn = conn.clone();
            async move {
                match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut conn)).await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
                    Err(_) => Err(BusError::Unavailable(format!(
                        "SPUBLISH took longer than {COMMAND_TIMEOUT:?}"
                    ))),
                }
            }
        });
        futures_util::future::try_join_all(sends).await.map(drop)
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

/// What was sent on a master connection and awaits its answer, oldest first: Redis answers
/// in order, so an error belongs to the oldest command.
#[derive(Debug, PartialEq)]
enum Sent {
    Subscribe(String),
    Unsubscribe(String),
    Ping,
}

/// What the slots' health follows from: each range of the slot map with whether its master's
/// connection is live and probed, and the slots of organizations being subscribed again.
#[derive(PartialEq, Eq)]
struct HealthInputs {
    ranges: Vec<(u16, u16, bool)>,
    recovering: Vec<u16>,
}

struct NodeState {
    id: u64,
    conn: NodeConn,
    sent: VecDeque<Sent>,
    probe_channel: Arc<str>,
    /// The probe channel is subscribed.
    probing: bool,
    probe: Option<Probe>,
    /// When the oldest unanswered PING was sent.
    ping: Option<Instant>,
}

/// Where an organization is subscribed, or being subscribed.
struct Sub {
    node: Node,
    confirmed: bool,
}

/// The answer to a probe's SPUBLISH: (master, its connection, probe number, receivers).
type ProbeSent = (Node, u64, u64, Result<i64, String>);

struct Manager {
    publisher: Arc<Publisher>,
    prefix: String,
    /// This replica's id in its probe channels.
    replica: String,
    auth: Auth,
    max_payload: usize,
    probe_interval: Duration,
    presence: Arc<Presence>,
    sink: Arc<dyn Sink>,
    /// What the subscriptions missed of what was published (shared with the gate).
    gaps: Arc<Gaps>,
    /// Per slot, whether its subscriptions are in place (shared with the gate).
    health: Arc<SlotHealth>,
    /// What `health` was last computed from (see `update_health`); `None` once a slot was
    /// marked down directly.
    health_inputs: Option<HealthInputs>,
    /// Every subscription is in place (readiness).
    up: Arc<AtomicBool>,
    losses: Arc<AtomicU64>,
    shutdown: Shutdown,
    map: SlotMap,
    nodes: HashMap<Node, NodeState>,
    next_id: u64,
    orgs: HashMap<OrgId, Sub>,
    waiters: HashMap<OrgId, Vec<oneshot::Sender<()>>>,
    /// Organizations whose subscription was lost and is not confirmed again yet.
    recovering: HashSet<OrgId>,
    /// Something was lost (or never made) since the last time all was in place.
    lost_any: bool,
    events_tx: mpsc::UnboundedSender<(u64, Event)>,
    events: mpsc::UnboundedReceiver<(u64, Event)>,
    /// Warnings about unreachable masters, at most one per `WARN_EVERY`.
    warn: RateLimit,
}

impl Manager {
    async fn run(mut self, requests: &mut mpsc::UnboundedReceiver<Request>) {
        // A previous incarnation may have died with slots up: none is, until connected.
        self.set_up(false);
        self.update_health();
        let mut retry = Retry::new(
            "read the redis cluster's slot map",
            BACKOFF_MIN,
            BACKOFF_MAX,
            WARN_EVERY,
        );
        let mut tick = tokio::time::interval(self.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probes: FuturesUnordered<BoxFuture<'static, ProbeSent>> = FuturesUnordered::new();
        let mut refresh_due = true;
        let mut refreshed = Instant::now();
        let shutdown = self.shutdown.clone();
        loop {
            if refresh_due {
                match self.refresh().await {
                    Ok(()) => {
                        refresh_due = false;
                        refreshed = Instant::now();
                        retry.succeeded();
                    }
                    Err(why) => {
                        if !retry.failed(why, &shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = crate::tasks::fault("redis-cluster-subscriber") => panic!("fault injected"),
                req = requests.recv() => {
                    let Some(first) = req else { return };
                    let mut batch = vec![first];
                    while let Ok(r) = requests.try_recv() {
                        batch.push(r);
                    }
                    for req in batch {
                        if let Some(tx) = req.applied {
                            self.waiters.entry(req.org.clone()).or_default().push(tx);
                        }
                        refresh_due |= self.reconcile(&req.org).await;
                    }
                }
                Some((id, event)) = self.events.recv() => {
                    refresh_due |= self.on_event(id, event).await;
                }
                Some((node, id, n, result)) = probes.next(), if !probes.is_empty() => {
                    refresh_due |= self.on_probe_sent(&node, id, n, result);
                }
                _ = tick.tick() => {
                    self.gaps.settle();
                    refresh_due |= self.on_tick(&mut probes).await;
                    refresh_due |= refreshed.elapsed() >= REFRESH_EVERY;
                }
            }
            self.update_up();
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        ::metrics::gauge!(metrics::REDIS_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Up: every slot has a master, every master a live, probed connection, and nothing
    /// lost is still being made again. The first time all is in place after a loss, the
    /// history reads back what was missed.
    fn update_up(&mut self) {
        let masters = self.map.masters();
        let up = self.map.is_complete()
            && masters
                .iter()
                .all(|m| self.nodes.get(m).is_some_and(|n| n.probing))
            && self.recovering.is_empty();
        if up && self.lost_any {
            self.lost_any = false;
            ::metrics::counter!(metrics::REDIS_RECONNECTS).increment(1);
            self.sink.clone().reconnected();
            tracing::info!(
                masters = masters.len(),
                "redis cluster subscriptions in place"
            );
        }
        if up != self.up.load(Ordering::Acquire) {
            self.set_up(up);
        }
        self.update_health();
        let confirmed = self.orgs.values().filter(|s| s.confirmed).count();
        ::metrics::gauge!(metrics::REDIS_SUBSCRIPTIONS).set(confirmed as f64);
    }

    /// Per slot: up while its master has a live, probed connection and none of its
    /// organizations' subscriptions is being made again. Runs after every event, so it
    /// rewrites the 16,384 slot words only when what they follow from changed.
    fn update_health(&mut self) {
        let ranges = self
            .map
            .ranges()
            .map(|(start, end, node)| {
                let probing = self.nodes.get(node).is_some_and(|n| n.probing);
                (start, end, probing)
            })
            .collect();
        let mut recovering: Vec<u16> = self
            .recovering
            .iter()
            .map(|org| slot(channel(&self.prefix, org).as_bytes()))
            .collect();
        recovering.sort_unstable();
        let inputs = HealthInputs { ranges, recovering };
        if self.health_inputs.as_ref() == Some(&inputs) {
            return;
        }
        let mut up = vec![false; usize::from(SLOTS)];
        for &(start, end, probing) in &inputs.ranges {
            up[usize::from(start)..=usize::from(end)].fill(probing);
        }
        for &s in &inputs.recovering {
            up[usize::from(s)] = false;
        }
        for (s, up) in (0..SLOTS).zip(up) {
            self.health.set(s, up);
        }
        self.health_inputs = Some(inputs);
    }

    /// A subscription that was in place is gone: publishes in flight must not count as
    /// delivered here, and readiness drops until it is made again.
    fn lose(&mut self, org: &OrgId) {
        self.health
            .set(slot(channel(&self.prefix, org).as_bytes()), false);
        self.health_inputs = None;
        self.losses.fetch_add(1, Ordering::AcqRel);
        self.lost_any = true;
        self.recovering.insert(org.clone());
        self.set_up(false);
    }

    /// Reads the slot map, connects to every master without a connection, closes the
    /// connections of nodes that are no longer masters, and puts every organization where
    /// the map says.
    async fn refresh(&mut self) -> Result<(), String> {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let reply: redis::Value = self.publisher.query(&cmd).await?;
        let map = SlotMap::from_cluster_slots(&reply)?;
        if map != self.map {
            tracing::info!(masters = ?map.masters(), complete = map.is_complete(), "redis cluster slot map");
        }
        self.map = map;
        let masters: HashSet<Node> = self.map.masters().into_iter().collect();
        let gone: Vec<Node> = self
            .nodes
            .keys()
            .filter(|n| !masters.contains(*n))
            .cloned()
            .collect();
        for node in gone {
            self.drop_node(&node, "no longer a master");
        }
        for master in &masters {
            if !self.nodes.contains_key(master)
                && let Err(why) = self.connect(master).await
                && let Some(suppressed) = self.warn.check()
            {
                tracing::warn!(node = %master, suppressed_since_last = suppressed, "redis cluster master unreachable: {why}");
            }
        }
        let mut all: HashSet<OrgId> = self.presence.orgs().into_iter().collect();
        all.extend(self.orgs.keys().cloned());
        for org in all {
            self.reconcile(&org).await;
        }
        Ok(())
    }

    /// Opens the connection to `master`, subscribed to its probe channel.
    async fn connect(&mut self, master: &Node) -> Result<(), String> {
        let tag = self
            .map
            .tag_for(master)
            .ok_or_else(|| format!("no slot of {master} found for its probe channel"))?;
        let probe_channel: Arc<str> =
            format!("{}probe:{}:{{{tag}}}", self.prefix, self.replica).into();
        self.next_id += 1;
        let id = self.next_id;
        let wiring = Wiring {
            id,
            events: self.events_tx.clone(),
            inbound: Inbound::new(
                &self.prefix,
                self.max_payload,
                self.sink.clone(),
                self.gaps.clone(),
            ),
            probe_channel: probe_channel.clone(),
            max_bulk: self.max_payload * 2 + 64 * 1024,
        };
        let mut conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            NodeConn::connect(master, &self.auth, wiring),
        )
        .await
        {
            Ok(conn) => conn?,
            Err(_) => return Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
        };
        conn.send(&[vec![b"SSUBSCRIBE", probe_channel.as_bytes()]])
            .await?;
        self.nodes.insert(
            master.clone(),
            NodeState {
                id,
                conn,
                sent: VecDeque::from([Sent::Subscribe(probe_channel.to_string())]),
                probe_channel,
                probing: false,
                probe: None,
                ping: None,
            },
        );
        Ok(())
    }

    /// Closes the connection to `node`: every organization subscribed there is lost.
    fn drop_node(&mut self, node: &Node, why: &str) {
        if self.nodes.remove(node).is_none() {
            return;
        }
        tracing::warn!(%node, "redis cluster subscriber connection closed: {why}");
        for (start, end, _) in self.map.ranges().filter(|(_, _, n)| *n == node) {
            for s in start..=end {
                self.health.set(s, false);
            }
        }
        self.health_inputs = None;
        let here: Vec<(OrgId, bool)> = self
            .orgs
            .iter()
            .filter(|(_, s)| &s.node == node)
            .map(|(o, s)| (o.clone(), s.confirmed))
            .collect();
        for (org, confirmed) in here {
            self.orgs.remove(&org);
            if confirmed {
                self.lose(&org);
            }
        }
        self.lost_any = true;
        self.set_up(false);
    }

    /// Brings `org`'s subscription in line with presence and the slot map. Returns whether
    /// the slot map must be read again (no known master for its slot).
    async fn reconcile(&mut self, org: &OrgId) -> bool {
        let name = channel(&self.prefix, org);
        let wanted = self.presence.org_sockets(org) > 0;
        let owner = self.map.owner(slot(name.as_bytes())).cloned();
        if let Some(sub) = self.orgs.get(org) {
            if wanted && Some(&sub.node) == owner.as_ref() {
                if sub.confirmed {
                    self.answer(org);
                }
                return false;
            }
            let old = sub.node.clone();
            self.orgs.remove(org);
            self.send(&old, Sent::Unsubscribe(name.clone())).await;
        }
        if !wanted {
            self.recovering.remove(org);
            self.answer(org);
            return false;
        }
        match owner.filter(|o| self.nodes.contains_key(o)) {
            Some(node) => {
                self.orgs.insert(
                    org.clone(),
                    Sub {
                        node: node.clone(),
                        confirmed: false,
                    },
                );
                self.send(&node, Sent::Subscribe(name)).await;
                false
            }
            None => {
                // Made at the next refresh; meanwhile the org is not received here.
                self.recovering.insert(org.clone());
                self.lost_any = true;
                true
            }
        }
    }

    /// Sends a command on `node`'s connection; a failed write closes it.
    async fn send(&mut self, node: &Node, what: Sent) {
        let Some(state) = self.nodes.get_mut(node) else {
            return;
        };
        let result = match &what {
            Sent::Subscribe(c) => state.conn.send(&[vec![b"SSUBSCRIBE", c.as_bytes()]]).await,
            Sent::Unsubscribe(c) => {
                state
                    .conn
                    .send(&[vec![b"SUNSUBSCRIBE", c.as_bytes()]])
                    .await
            }
            Sent::Ping => state.conn.send(&[vec![b"PING"]]).await,
        };
        match result {
            Ok(()) => state.sent.push_back(what),
            Err(why) => self.drop_node(node, &why),
        }
    }

    fn answer(&mut self, org: &OrgId) {
        for tx in self.waiters.remove(org).unwrap_or_default() {
            let _ = tx.send(());
        }
    }

    fn org_of(&self, name: &str) -> Option<OrgId> {
        name.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix("org:"))
            .and_then(|id| OrgId::parse(id).ok())
    }

    /// Handles what a master connection said. Returns whether the slot map must be read
    /// again.
    async fn on_event(&mut self, id: u64, event: Event) -> bool {
        let Some(node) = self
            .nodes
            .iter()
            .find(|(_, s)| s.id == id)
            .map(|(n, _)| n.clone())
        else {
            return false; // an earlier connection's
        };
        let state = self.nodes.get_mut(&node).expect("found above");
        match event {
            Event::Subscribed(name) => {
                if state.sent.front() == Some(&Sent::Subscribe(name.clone())) {
                    state.sent.pop_front();
                }
                if *name == *state.probe_channel {
                    state.probing = true;
                    return false;
                }
                let Some(org) = self.org_of(&name) else {
                    return false;
                };
                if let Some(sub) = self.orgs.get_mut(&org).filter(|s| s.node == node) {
                    sub.confirmed = true;
                    self.recovering.remove(&org);
                    self.answer(&org);
                }
                false
            }
            Event::Unsubscribed(name) => {
                if state.sent.front() == Some(&Sent::Unsubscribe(name.clone())) {
                    state.sent.pop_front();
                    return false;
                }
                // Not ours: the master gave the slot away.
                tracing::info!(%node, channel = %name, "redis cluster moved a channel away (sunsubscribe); subscribing at its new owner");
                if *name == *state.probe_channel {
                    self.drop_node(&node, "its probe channel's slot moved away");
                    return true;
                }
                if let Some(org) = self.org_of(&name)
                    && self.orgs.get(&org).is_some_and(|s| s.node == node)
                    && self.orgs.remove(&org).is_some_and(|s| s.confirmed)
                {
                    self.lose(&org);
                }
                true
            }
            Event::Pong => {
                if state.sent.front() == Some(&Sent::Ping) {
                    state.sent.pop_front();
                }
                state.ping = None;
                false
            }
            Event::Error(e) => {
                let failed = state.sent.pop_front();
                tracing::warn!(%node, command = ?failed, "redis cluster refused: {e}");
                match failed {
                    Some(Sent::Subscribe(name)) if *name == *state.probe_channel => {
                        self.drop_node(&node, &format!("probe channel refused: {e}"));
                        true
                    }
                    Some(Sent::Subscribe(name)) => {
                        // MOVED or ASK: the map is out of date (or the slot is moving).
                        if let Some(org) = self.org_of(&name)
                            && self.orgs.get(&org).is_some_and(|s| s.node == node)
                        {
                            self.orgs.remove(&org);
                            self.recovering.insert(org);
                            self.lost_any = true;
                        }
                        true
                    }
                    _ => false,
                }
            }
            Event::Probe(n) => {
                if let Some(p) = state.probe.take_if(|p| p.n == n) {
                    p.back();
                }
                false
            }
            Event::Closed(why) => {
                self.drop_node(&node, &why);
                true
            }
        }
    }

    /// Every interval, on every master connection: judge the last probe, PING, send the
    /// next probe. Returns whether the slot map must be read again.
    async fn on_tick(
        &mut self,
        probes: &mut FuturesUnordered<BoxFuture<'static, ProbeSent>>,
    ) -> bool {
        let mut refresh = !self.up.load(Ordering::Acquire);
        let nodes: Vec<Node> = self.nodes.keys().cloned().collect();
        for node in nodes {
            let state = self.nodes.get_mut(&node).expect("listed above");
            if !state.probing {
                continue;
            }
            match state.probe.take() {
                Some(p) if p.published => {
                    probe::failed("lost");
                    self.drop_node(
                        &node,
                        &format!(
                            "probe {} did not come back within {:?}; the subscription is dead even if its connection looks open",
                            p.n, self.probe_interval
                        ),
                    );
                    refresh = true;
                    continue;
                }
                Some(_) => probe::failed("publish"),
                None => {}
            }
            if state.ping.is_some_and(|t| t.elapsed() > COMMAND_TIMEOUT) {
                self.drop_node(&node, &format!("no PONG within {COMMAND_TIMEOUT:?}"));
                refresh = true;
                continue;
            }
            let (id, probe_channel) = (state.id, state.probe_channel.clone());
            if state.ping.is_none() {
                state.ping = Some(Instant::now());
                self.send(&node, Sent::Ping).await;
            }
            let probe = Probe::next();
            let n = probe.n;
            if let Some(state) = self.nodes.get_mut(&node) {
                state.probe = Some(probe);
            }
            let publisher = self.publisher.clone();
            probes.push(Box::pin(async move {
                let mut cmd = redis::cmd("SPUBLISH");
                cmd.arg(&*probe_channel).arg(n);
                (node, id, n, publisher.query::<i64>(&cmd).await)
            }));
        }
        refresh
    }

    /// Redis's answer to a probe's SPUBLISH. Returns whether the slot map must be read
    /// again.
    fn on_probe_sent(&mut self, node: &Node, id: u64, n: u64, result: Result<i64, String>) -> bool {
        let Some(state) = self.nodes.get_mut(node).filter(|s| s.id == id) else {
            return false;
        };
        let Some(probe) = state.probe.as_mut().filter(|p| p.n == n) else {
            return false;
        };
        match result {
            Ok(0) => {
                probe::failed("not_subscribed");
                self.drop_node(node, &format!("Redis says probe {n} reached no subscriber"));
                true
            }
            Ok(_) => {
                probe.published = true;
                false
            }
            Err(why) => {
                probe::failed("publish");
                state.probe = None;
                tracing::debug!(%node, "bus probe {n} could not be sent: {why}");
                false
            }
        }
    }
}
