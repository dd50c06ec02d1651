//! The message bus between publishers and the replicas that hold sockets.
//!
//! Three implementations behind one small type: an in-process bus for a single replica (dev
//! mode, or `FANOUT_BUS=memory`: never a silent fallback), Redis pub/sub for a fleet
//! (`redis.rs`), and Redis Cluster sharded pub/sub (`cluster/`), which spreads the channels
//! over the masters. With Redis, a published message
//! is *only* sent to Redis, and every replica (including the publishing one) delivers what
//! arrives on its subscriptions: that is what makes delivery exactly-once per socket.
//!
//! Subscriptions follow presence: a replica is subscribed to `{prefix}org:{id}` exactly
//! while it holds a socket of that organization (see `redis.rs` for how races are closed).

mod cluster;
mod gaps;
mod gate;
mod inbound;
mod master;
mod memory;
mod probe;
mod redis;

use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use cluster::ClusterSettings;
pub use master::RedisTarget;

use crate::presence::Presence;
use crate::protocol::{Message, OrgId};
use crate::tasks::Tasks;

/// Why the bus could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BusSetupError {
    #[error("invalid REDIS_URL or REDIS_CLUSTER_URLS: {0}")]
    InvalidUrl(String),
}

/// Why a message could not be handed to the bus. The ingest API answers 503 with it.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("Redis is unreachable ({0}); the message was not published, retry later")]
    Unavailable(String),
    #[error(
        "the bus is re-subscribing after a Redis outage; the message was not published, retry shortly"
    )]
    Resubscribing,
}

/// What the bus delivers to: every message that arrives for this replica's sockets. The bus
/// knows nothing else of the replica, so a backend is a transport between publishers and
/// a sink, and a sink can be anything that takes messages (a test's recorder, say).
pub trait Sink: Send + Sync + 'static {
    /// A message for the sockets of this replica.
    fn deliver(self: Arc<Self>, msg: Message) -> BoxFuture<'static, ()>;
    /// The bus was cut off and is back: whatever was published meanwhile never arrived.
    fn reconnected(self: Arc<Self>);
}

pub struct Bus {
    inner: Inner,
}

enum Inner {
    Memory(memory::MemoryBus),
    Redis(redis::RedisBus),
    Cluster(cluster::ClusterBus),
}

/// Settings of the Redis bus.
pub struct RedisSettings {
    /// One Redis, or the master the sentinels name.
    pub target: RedisTarget,
    pub prefix: String,
    pub max_payload_bytes: usize,
    /// Interval of the liveness probe through the subscription connection.
    pub probe_interval: std::time::Duration,
}

impl Bus {
    /// The in-process bus: publishing delivers straight to this replica's sockets.
    pub fn memory(sink: Arc<dyn Sink>) -> Self {
        Self {
            inner: Inner::Memory(memory::MemoryBus::new(sink)),
        }
    }

    /// The Redis bus. Starts the subscriber task, which connects (and reconnects) by itself:
    /// a Redis that is down at start is not an error, only "not ready".
    pub fn redis(
        settings: RedisSettings,
        presence: Arc<Presence>,
        sink: Arc<dyn Sink>,
        tasks: &Tasks,
    ) -> Result<Self, BusSetupError> {
        Ok(Self {
            inner: Inner::Redis(redis::RedisBus::start(settings, presence, sink, tasks)?),
        })
    }

    /// The Redis Cluster bus: sharded pub/sub. Starts the task that keeps a subscriber
    /// connection to every master; a cluster that is down at start is only "not ready".
    pub fn cluster(
        settings: ClusterSettings,
        presence: Arc<Presence>,
        sink: Arc<dyn Sink>,
        tasks: &Tasks,
    ) -> Result<Self, BusSetupError> {
        Ok(Self {
            inner: Inner::Cluster(cluster::ClusterBus::start(settings, presence, sink, tasks)?),
        })
    }

    /// Publishes to every replica holding sockets of `msg.org`. `Ok` means the bus has
    /// the message (Redis acknowledged the PUBLISH) while this replica's subscriptions were
    /// all in place, not that any socket was there for it.
    pub async fn publish(&self, msg: Message) -> Result<(), BusError> {
        match &self.inner {
            Inner::Memory(m) => {
                m.publish(msg).await;
                Ok(())
            }
            Inner::Redis(r) => r.publish(msg).await,
            Inner::Cluster(c) => c.publish(msg).await,
        }
    }

    /// Publishes `batch` in order: one round trip to Redis however many messages.
    pub async fn publish_batch(&self, batch: &[Message]) -> Result<(), BusError> {
        match &self.inner {
            Inner::Memory(m) => {
                for msg in batch {
                    m.publish(msg.clone()).await;
                }
                Ok(())
            }
            Inner::Redis(r) => r.publish_batch(batch).await,
            Inner::Cluster(c) => c.publish_batch(batch).await,
        }
    }

    /// Called after a socket of `org` was counted in presence: resolves once this replica
    /// receives `org`'s messages (at once with the memory bus, or when Redis is down, in
    /// which case the subscription is made on reconnect).
    pub async fn joined(&self, org: &OrgId) {
        if let Some(gate) = self.gate() {
            gate.joined(org).await;
        }
    }

    /// Called after the last socket of `org` left presence.
    pub fn left(&self, org: &OrgId) {
        if let Some(gate) = self.gate() {
            gate.left(org);
        }
    }

    /// What `/readyz` calls it: `memory`, `redis`, `redis-sentinel` or `redis-cluster`.
    pub fn name(&self) -> &'static str {
        match &self.inner {
            Inner::Memory(_) => "memory",
            Inner::Redis(r) => r.name(),
            Inner::Cluster(_) => "redis-cluster",
        }
    }

    /// False while a Redis subscription is not in place.
    pub fn is_up(&self) -> bool {
        self.gate().is_none_or(gate::Gate::is_up)
    }

    /// The subscriptions of a Redis bus; none for the in-process one.
    fn gate(&self) -> Option<&gate::Gate> {
        match &self.inner {
            Inner::Memory(_) => None,
            Inner::Redis(r) => Some(r.gate()),
            Inner::Cluster(c) => Some(c.gate()),
        }
    }
}
