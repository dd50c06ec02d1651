//! Local delivery: one bus message to the sockets of this replica.
//!
//! A message is handed to socketioxide as one room broadcast, which encodes the Socket.IO
//! packet once and gives every socket a reference-counted copy: the cost per socket is a
//! queue push, not a serialisation. Each socket's queue is bounded (`FANOUT_SOCKET_BUFFER`);
//! a socket whose queue is full is a slow consumer: it loses its transport so that its
//! client reconnects, instead of slowing or growing the replica.
//!
//! Durable events (those with a sequence number) go through [`history`] first when the
//! replica has a store: it delivers them in sequence order, fills gaps from the store, and
//! replays missed events to reconnecting clients.

mod history;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Serialize;
use socketioxide::extract::SocketRef;
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo};

use history::History;
pub use history::Seam;

use crate::bus::Sink;
use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::presence::Presence;
use crate::protocol::{Message, Meta, OrgId, UserId, now_ms, user_room};
use crate::store::Store;
use crate::transport::Transports;

pub struct Delivery {
    io: SocketIo,
    presence: Arc<Presence>,
    transports: Transports,
    history: Option<History>,
}

/// Marks a socket already evicted, so it is counted once.
#[derive(Clone)]
struct Evicted;

impl Delivery {
    pub fn new(io: SocketIo, presence: Arc<Presence>, transports: Transports) -> Self {
        Self {
            io,
            presence,
            transports,
            history: None,
        }
    }

    /// With a store: durable events are delivered in sequence order and can be replayed.
    pub fn with_history(mut self, store: Store, replay_max: u64) -> Self {
        self.history = Some(History::new(store, replay_max));
        self
    }

    /// Entry point of the bus: every message received for this replica's sockets.
    pub async fn dispatch(self: &Arc<Self>, mut msg: Message) {
        if self.history.is_some() && msg.seq.is_some() {
            self.sequenced(msg).await;
        } else {
            // Without a history a `seq` means nothing here: clients never see one as `meta`.
            msg.seq = None;
            self.deliver_now(&msg).await;
        }
    }

    /// Emits `msg` to its room now, whatever its sequence number.
    pub async fn deliver_now(&self, msg: &Message) {
        self.emit_to_room(msg, None).await;
    }

    /// Emits `msg` to its room, leaving out the sockets in `except` (clients still being
    /// replayed to). A durable event carries its sequence number as a second argument.
    async fn emit_to_room(&self, msg: &Message, except: Option<String>) {
        let targets = match &msg.user {
            Some(user) => self.presence.user_sockets(&msg.org, user),
            None => self.presence.org_sockets(&msg.org),
        };
        if targets == 0 {
            return;
        }
        let room = msg.room();
        let mut to = self.io.to(room.clone());
        if let Some(except) = except {
            to = to.except(except);
        }
        let result = match msg.seq {
            Some(seq) => {
                to.emit(msg.event.as_str(), &(&*msg.data, Meta { seq }))
                    .await
            }
            None => to.emit(msg.event.as_str(), &*msg.data).await,
        };
        let failed = match result {
            Ok(()) => 0,
            Err(BroadcastError::Socket(errors)) => {
                let full = errors
                    .iter()
                    .filter(|e| matches!(e, SocketError::InternalChannelFull))
                    .count();
                if full > 0 {
                    ::metrics::counter!(metrics::DROPPED, "reason" => "slow_consumer")
                        .increment(full as u64);
                    self.evict_backlogged(room);
                }
                errors.len()
            }
            Err(e) => {
                ::metrics::counter!(metrics::DROPPED, "reason" => "encode")
                    .increment(targets as u64);
                tracing::error!(org = %msg.org, event = %msg.event, "broadcast failed: {e}");
                targets
            }
        };
        ::metrics::counter!(metrics::DELIVERED).increment(targets.saturating_sub(failed) as u64);
        if let Some(ts) = msg.ts_ms {
            let latency = now_ms().saturating_sub(ts) as f64 / 1000.0;
            ::metrics::histogram!(metrics::LATENCY).record(latency);
        }
    }

    /// Finds the sockets of `room` whose queue is full and closes their transport.
    fn evict_backlogged(&self, room: String) {
        for socket in self.io.to(room).sockets() {
            if is_backlogged(&socket) {
                // Stop feeding it now; the disconnect handler runs when the transport closes.
                self.evict(&socket, "send buffer full");
            }
        }
    }
}

impl Sink for Delivery {
    fn deliver(self: Arc<Self>, msg: Message) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.dispatch(msg).await })
    }

    /// Events published while the bus was down are read back from the store.
    fn reconnected(self: Arc<Self>) {
        if self.history.is_some() {
            tokio::spawn(self.check_tails());
        }
    }
}

impl Delivery {
    /// Puts an authenticated socket in its rooms. With a store and a `last_seq`, the
    /// socket is held back from live durable events until [`Delivery::replay`] has sent
    /// what it missed: the returned [`Seam`] is where that replay starts.
    pub async fn join(
        self: &Arc<Self>,
        socket: &SocketRef,
        org: &OrgId,
        user: &UserId,
        last_seq: Option<u64>,
    ) -> Option<Seam> {
        let rooms = vec![org.room(), user_room(org, user)];
        match &self.history {
            Some(history) => history.join(self, socket, org, rooms, last_seq).await,
            None => {
                socket.join(rooms);
                None
            }
        }
    }

    /// Sends a joining socket the durable events after its seam, then lets live ones
    /// through: in order, none twice, none missing (or `resync-required`).
    pub async fn replay(self: &Arc<Self>, socket: &SocketRef, user: &UserId, seam: Seam) {
        if let Some(history) = &self.history {
            history.replay(self, socket, user, seam).await;
        }
    }

    /// Whether durable events are ordered and replayed here (the replica has a store).
    pub fn has_history(&self) -> bool {
        self.history.is_some()
    }

    /// Tells a client its `auth.lastSeq` is unusable: it gets `resync-required`.
    pub fn invalid_last_seq(&self, socket: &SocketRef) {
        if self.history.is_some() {
            history::invalid_last_seq(socket);
        }
    }

    /// Called when the last socket of `org` left this replica.
    pub fn left(self: &Arc<Self>, org: &OrgId) {
        if self.history.is_some() {
            let (delivery, org) = (self.clone(), org.clone());
            tokio::spawn(async move {
                if let Some(history) = &delivery.history {
                    history.close_if_unused(&delivery.presence, &org).await;
                }
            });
        }
    }

    /// Checks, every few seconds, that no committed event was missed by the bus (a failed
    /// publish leaves no trace on the receiving side).
    pub fn watch_tails(self: &Arc<Self>, shutdown: Shutdown) {
        if self.history.is_none() {
            return;
        }
        let delivery = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(history::TAIL_CHECK_EVERY);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = every.tick() => delivery.clone().check_tails().await,
                    _ = shutdown.wait() => return,
                }
            }
        });
    }

    async fn check_tails(self: Arc<Self>) {
        if let Some(history) = &self.history {
            history.check_tails(&self).await;
        }
    }

    async fn sequenced(self: &Arc<Self>, msg: Message) {
        if let Some(history) = &self.history {
            history.on_event(self, msg).await;
        }
    }

    /// Closes the transport of a socket that cannot keep up.
    fn evict(&self, socket: &SocketRef, why: &str) {
        if socket.extensions.insert(Evicted).is_none() {
            ::metrics::counter!(metrics::SLOW_CONSUMERS).increment(1);
            tracing::warn!(sid = %socket.id, "slow consumer: {why}, closing its transport");
            socket.leave_all();
            if !self.transports.close(socket) {
                let _ = socket.clone().disconnect();
            }
        }
    }
}

/// Whether `socket`'s send queue is full, without sending anything.
///
/// socketioxide reserves a queue slot before it serialises an emit's payload, and reports
/// a full queue as `InternalChannelFull`. A payload that refuses to serialise therefore
/// probes the queue with no side effect: full gives `InternalChannelFull`, otherwise the
/// reserved slot is released with a serialisation error. The slow-consumer integration
/// test fails if a socketioxide upgrade changes that order.
fn is_backlogged(socket: &SocketRef) -> bool {
    struct Probe;
    impl Serialize for Probe {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("queue probe"))
        }
    }
    matches!(
        socket.emit("probe", &Probe),
        Err(SendError::Socket(SocketError::InternalChannelFull))
    )
}
