//! A budget of packets a client may send: a token bucket per session, checked on every
//! packet received, on both transports.
//!
//! Nothing else bounds what a client sends in number, only in size (`max_payload`): one
//! client looping on tiny frames makes its connection's task parse and dispatch them as fast
//! as the socket delivers them, and takes that CPU from everyone else's deliveries. The
//! application sets the budget per session by putting an [`InboundLimit`] in the extensions
//! of the request that opens it (a middleware in front of the engine), so it can differ by
//! route or client; sessions opened without one have no budget. A client over its budget is
//! disconnected: its WebSocket is closed with code 1008 (policy violation) and a reason, a
//! polling request is answered 429, and the session ends with
//! [`DisconnectReason::PacketParsingError`](crate::DisconnectReason).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engineioxide_core::Sid;

/// The packets per second a session may send, in bursts of up to one second's worth; put it
/// in the extensions of the request that opens the session.
#[derive(Clone)]
pub struct InboundLimit {
    /// Packets per second.
    pub per_second: NonZeroU32,
    /// Called once when a session goes over its budget, before it is closed.
    pub on_exceeded: Option<Arc<dyn Fn(Sid) + Send + Sync>>,
}

impl std::fmt::Debug for InboundLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundLimit")
            .field("per_second", &self.per_second)
            .finish_non_exhaustive()
    }
}

/// A session's budget: the generic cell rate algorithm, one instant of state.
pub(crate) struct Inbound {
    limit: InboundLimit,
    /// When the bucket is empty again ("theoretical arrival time").
    tat: Mutex<Instant>,
}

impl Inbound {
    pub(crate) fn new(limit: InboundLimit) -> Self {
        Self {
            limit,
            tat: Mutex::new(Instant::now()),
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(1) / self.limit.per_second.get()
    }

    /// Takes one packet from the budget; `false` when there is none left (and then calls
    /// `on_exceeded`, once per exhaustion).
    pub(crate) fn take(&self, sid: Sid) -> bool {
        let now = Instant::now();
        let interval = self.interval();
        let mut tat = self.tat.lock().unwrap();
        let start = (*tat).max(now);
        // A second's worth of packets may be ahead of now, not more. (Half an interval of
        // slack: `interval` is rounded down to whole nanoseconds, and `per_second` of them
        // must fit in the second.)
        if start + interval > now + Duration::from_secs(1) + interval / 2 {
            drop(tat);
            if let Some(f) = &self.limit.on_exceeded {
                f(sid);
            }
            return false;
        }
        *tat = start + interval;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_burst_of_one_seconds_worth_then_refused_and_told() {
        let exceeded = Arc::new(AtomicUsize::new(0));
        let counter = exceeded.clone();
        let inbound = Inbound::new(InboundLimit {
            per_second: NonZeroU32::new(50).unwrap(),
            on_exceeded: Some(Arc::new(move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            })),
        });
        let sid = Sid::new();
        let taken = (0..200).take_while(|_| inbound.take(sid)).count();
        // 50 per second, a burst of one second's worth (and the first, at once).
        assert!((50..=52).contains(&taken), "{taken} taken");
        assert_eq!(exceeded.load(Ordering::Relaxed), 1);
        assert!(!inbound.take(sid));
        assert_eq!(exceeded.load(Ordering::Relaxed), 2);
    }
}
