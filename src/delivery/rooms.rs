//! Emitting to the sockets of a room: the one way delivery and history reach sockets.
//!
//! A message is handed to socketioxide as one room broadcast, which encodes the Socket.IO
//! packet once and gives every socket a reference-counted copy: the cost per socket is a
//! queue push, not a serialisation. Each socket's queue is bounded (`FANOUT_SOCKET_BUFFER`);
//! a socket whose queue is full is a slow consumer: it loses its transport so that its
//! client reconnects, instead of slowing or growing the replica.

use std::sync::Arc;

use serde::Serialize;
use socketioxide::extract::SocketRef;
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo};

use crate::ops::metrics;
use crate::presence::Presence;
use crate::protocol::{Message, Meta, now_ms};
use crate::transport::Transports;

pub struct Rooms {
    io: SocketIo,
    presence: Arc<Presence>,
    transports: Transports,
}

/// Marks a socket already evicted, so it is counted once.
#[derive(Clone)]
struct Evicted;

impl Rooms {
    pub fn new(io: SocketIo, presence: Arc<Presence>, transports: Transports) -> Self {
        Self {
            io,
            presence,
            transports,
        }
    }

    /// Emits `msg` to its room, leaving out the sockets in `except` (clients still being
    /// replayed to). A durable event carries its sequence number as a second argument.
    pub async fn emit(&self, msg: &Message, except: Option<String>) {
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

    /// Emits a control event (not a message of the bus) to `room`, leaving out `except`.
    pub async fn broadcast(
        &self,
        room: String,
        except: Option<String>,
        event: &str,
        data: &impl Serialize,
    ) {
        let mut to = self.io.to(room);
        if let Some(except) = except {
            to = to.except(except);
        }
        let _ = to.emit(event, data).await;
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

    /// Closes the transport of a socket that cannot keep up.
    pub fn evict(&self, socket: &SocketRef, why: &str) {
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
