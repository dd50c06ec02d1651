//! Local delivery: what arrives from the bus, to the sockets of this replica.
//!
//! [`Delivery`] is the bus's [`Sink`]. An ephemeral message goes straight to its room
//! ([`rooms`]: one encode per message, bounded per-socket queues, slow-consumer eviction).
//! A durable event (one with a sequence number) goes through [`history`] when the replica
//! has a store: it delivers events in sequence order, fills gaps from the store, and
//! replays missed events to reconnecting clients, through the same rooms.

mod history;
mod rooms;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;

use history::History;
pub use history::{ReplayLimits, Seam};
pub use rooms::Rooms;

use crate::bus::Sink;
use crate::presence::Presence;
use crate::protocol::{Message, OrgId, UserId, user_room};
use crate::store::Store;
use crate::tasks::Tasks;
use crate::transport::Transports;

pub struct Delivery {
    rooms: Arc<Rooms>,
    presence: Arc<Presence>,
    history: Option<Arc<History>>,
}

impl Delivery {
    pub fn new(io: SocketIo, presence: Arc<Presence>, transports: Transports) -> Self {
        Self {
            rooms: Arc::new(Rooms::new(io, presence.clone(), transports)),
            presence,
            history: None,
        }
    }

    /// With a store: durable events are delivered in sequence order and can be replayed;
    /// a task checks every few seconds that the bus missed nothing.
    pub fn with_history(mut self, store: Store, replay: ReplayLimits, tasks: &Tasks) -> Self {
        let history = Arc::new(History::new(
            store,
            self.rooms.clone(),
            replay,
            tasks.clone(),
        ));
        history.watch_tails();
        self.history = Some(history);
        self
    }

    /// Every message received for this replica's sockets.
    pub async fn dispatch(&self, mut msg: Message) {
        match &self.history {
            Some(history) if msg.seq.is_some() => history.on_event(msg).await,
            _ => {
                // Without a history a `seq` means nothing here: clients never see one as
                // `meta`.
                msg.seq = None;
                self.deliver_now(&msg).await;
            }
        }
    }

    /// Emits `msg` to its room now, whatever its sequence number.
    pub async fn deliver_now(&self, msg: &Message) {
        self.rooms.emit(msg, None).await;
    }

    /// Puts an authenticated socket in its rooms. With a store and a `last_seq`, the
    /// socket is held back from live durable events until [`Delivery::replay`] has sent
    /// what it missed: the returned [`Seam`] is where that replay starts.
    pub async fn join(
        &self,
        socket: &SocketRef,
        org: &OrgId,
        user: &UserId,
        last_seq: Option<u64>,
    ) -> Option<Seam> {
        let rooms = vec![org.room(), user_room(org, user)];
        match &self.history {
            Some(history) => history.join(socket, org, rooms, last_seq).await,
            None => {
                socket.join(rooms);
                None
            }
        }
    }

    /// Sends a joining socket the durable events after its seam, then lets live ones
    /// through: in order, none twice, none missing (or `resync-required`).
    pub async fn replay(&self, socket: &SocketRef, user: &UserId, seam: Seam) {
        if let Some(history) = &self.history {
            history.replay(socket, user, seam).await;
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
    pub fn left(&self, org: &OrgId) {
        if let Some(history) = &self.history {
            history.left(self.presence.clone(), org.clone());
        }
    }
}

impl Sink for Delivery {
    fn deliver(self: Arc<Self>, msg: Message) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.dispatch(msg).await })
    }

    /// Events published while the bus was down are read back from the store.
    fn reconnected(self: Arc<Self>) {
        if let Some(history) = &self.history {
            history.bus_reconnected();
        }
    }
}
