//! The queue of packets waiting to be sent to one client: a bounded FIFO of [`PacketBuf`]s, a
//! slot for the latest volatile packet, and the waker of the transport that drains them.
//!
//! It replaces a tokio `mpsc` channel, a `watch` channel and their `Arc`ed shared states.
//! A bounded `mpsc` channel allocates its first block of 32 slots when it is created
//! (about 5.4 KiB with `PacketBuf`), and keeps it for the connection's life, so an idle
//! connection paid for a queue it never used. Here the queue is a `VecDeque` that holds no
//! memory while empty: the WebSocket writer takes the whole queue at each wake-up
//! ([`Outbox::poll_take`]), which leaves an empty deque behind and drops the drained one once
//! written. Most dashboard connections are idle most of the time, so most of them hold no
//! queue memory at all.
//!
//! Semantics kept from the channels it replaces:
//! * at most `capacity` packets are queued or reserved ([`Outbox::try_push`] and
//!   [`Outbox::try_reserve`] answer [`TrySendError::Full`] beyond that);
//! * a volatile packet replaces the previous one that has not been sent yet, and is sent
//!   after the packets queued before it was drained;
//! * once closed, nothing more is accepted ([`TrySendError::Closed`]) and [`Outbox::closed`]
//!   resolves.
use std::{
    collections::VecDeque,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use engineioxide_core::PacketBuf;
use tokio::sync::{Notify, mpsc::error::TrySendError};

pub(crate) struct Outbox {
    capacity: usize,
    state: Mutex<State>,
    /// Mirrors `State::closed`, so that [`Outbox::is_closed`] does not take the lock.
    closed: AtomicBool,
    /// Set when the session ends ([`Outbox::interrupt`]): the transport stops taking new
    /// work once it has drained what is queued.
    interrupted: AtomicBool,
    /// Wakes the tasks waiting in [`Outbox::closed`].
    on_close: Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<PacketBuf>,
    /// Permits handed out by [`Outbox::try_reserve`] and not used yet.
    reserved: usize,
    /// Boxed: a `PacketBuf` is 176 bytes, and most sockets never get a volatile packet.
    volatile: Option<Box<PacketBuf>>,
    closed: bool,
    /// The transport task draining the outbox, if it is waiting for packets.
    waker: Option<Waker>,
}

/// What the writer takes from the outbox at one wake-up.
#[derive(Default)]
pub(crate) struct Batch {
    pub queue: VecDeque<PacketBuf>,
    pub volatile: Option<PacketBuf>,
}

impl Batch {
    /// The packets in the order they are to be sent: the queue, then the volatile packet.
    pub fn into_packets(self) -> impl Iterator<Item = PacketBuf> {
        self.queue.into_iter().chain(self.volatile)
    }
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::new(State::default()),
            closed: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
            on_close: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, but a poisoned lock must not take the
        // connection down with it: its state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues packets if there is room, and wakes the transport.
    // The refused packets go back to the caller, as `mpsc::Sender::try_send` gives them back.
    #[allow(clippy::result_large_err)]
    pub fn try_push(&self, packets: PacketBuf) -> Result<(), TrySendError<PacketBuf>> {
        let mut state = self.lock();
        if state.closed {
            return Err(TrySendError::Closed(packets));
        }
        if state.queue.len() + state.reserved >= self.capacity {
            return Err(TrySendError::Full(packets));
        }
        state.queue.push_back(packets);
        wake(state);
        Ok(())
    }

    /// Queues packets whatever the queue's length (the engine's own control packets, which
    /// must not be refused by a full queue). Returns false if the outbox is closed.
    pub fn push_unbounded(&self, packets: PacketBuf) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.queue.push_back(packets);
        wake(state);
        true
    }

    /// Reserves room for one push, to be made with [`Outbox::push_reserved`] or given back
    /// with [`Outbox::release`].
    pub fn try_reserve(&self) -> Result<(), TrySendError<()>> {
        let mut state = self.lock();
        if state.closed {
            return Err(TrySendError::Closed(()));
        }
        if state.queue.len() + state.reserved >= self.capacity {
            return Err(TrySendError::Full(()));
        }
        state.reserved += 1;
        Ok(())
    }

    /// Uses a reservation. Packets pushed after the outbox closed are dropped, as a closed
    /// channel's permit would have dropped them.
    pub fn push_reserved(&self, packets: PacketBuf) {
        let mut state = self.lock();
        state.reserved -= 1;
        if state.closed {
            return;
        }
        state.queue.push_back(packets);
        wake(state);
    }

    /// Gives back an unused reservation.
    pub fn release(&self) {
        self.lock().reserved -= 1;
    }

    /// Replaces the pending volatile packet. Returns false if the outbox is closed.
    pub fn set_volatile(&self, packets: PacketBuf) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.volatile = Some(Box::new(packets));
        wake(state);
        true
    }

    /// Takes everything queued, leaving the outbox empty (and holding no memory).
    /// `Ready(None)` once the outbox is closed or interrupted, and drained; `Pending` (with
    /// the task's waker kept) while there is nothing to send.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        let mut state = self.lock();
        if !state.queue.is_empty() || state.volatile.is_some() {
            return Poll::Ready(Some(Batch {
                queue: std::mem::take(&mut state.queue),
                volatile: state.volatile.take().map(|p| *p),
            }));
        }
        // Read under the lock that `interrupt` takes after setting it: either this sees
        // it, or `interrupt` finds the waker registered below.
        if state.closed || self.is_interrupted() {
            return Poll::Ready(None);
        }
        register(&mut state, cx);
        Poll::Pending
    }

    /// Keeps the task's waker, for a transport that waits on something else (its stream)
    /// but must still learn of an interruption. Returns whether it was interrupted.
    pub fn register(&self, cx: &mut Context<'_>) -> bool {
        let mut state = self.lock();
        register(&mut state, cx);
        self.is_interrupted()
    }

    /// Tells the transport draining the outbox that the session ended, and wakes it: a
    /// flag and a wake-up, where a cancellation future polled at every wake-up of every
    /// connection cost a lock each time.
    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::Release);
        wake(self.lock());
    }

    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Acquire)
    }

    /// Takes the oldest packet (then the volatile one), for the polling transport which sends
    /// as many as fit in one payload. Same readiness as [`Outbox::poll_take`].
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<PacketBuf>> {
        let mut state = self.lock();
        if let Some(packets) = state.queue.pop_front() {
            if state.queue.is_empty() {
                // Give the memory back: the polling transport drains one packet at a time.
                state.queue = VecDeque::new();
            }
            return Poll::Ready(Some(packets));
        }
        if let Some(packets) = state.volatile.take() {
            return Poll::Ready(Some(*packets));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        register(&mut state, cx);
        Poll::Pending
    }

    /// Closes the outbox: nothing more is accepted, what is queued can still be drained.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.closed.store(true, Ordering::Release);
        wake(state);
        self.on_close.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the outbox is closed.
    pub async fn closed(&self) {
        loop {
            let notified = self.on_close.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

fn register(state: &mut State, cx: &mut Context<'_>) {
    match &state.waker {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => state.waker = Some(cx.waker().clone()),
    }
}

/// Wakes the waiting transport, outside the lock.
fn wake(mut state: MutexGuard<'_, State>) {
    let waker = state.waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Outbox")
            .field("capacity", &self.capacity)
            .field("queued", &state.queue.len())
            .field("reserved", &state.reserved)
            .field("volatile", &state.volatile.is_some())
            .field("closed", &state.closed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, task::Wake};

    use engineioxide_core::{Packet, Str};
    use smallvec::smallvec;

    use super::*;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn msg(s: &'static str) -> PacketBuf {
        smallvec![Packet::Message(Str::from(s))]
    }

    fn texts(batch: Batch) -> Vec<String> {
        batch
            .into_packets()
            .flatten()
            .map(|p| match p {
                Packet::Message(s) => s.to_string(),
                p => format!("{p:?}"),
            })
            .collect()
    }

    #[test]
    fn bounded_by_queued_and_reserved_packets() {
        let outbox = Outbox::new(2);
        outbox.try_push(msg("a")).unwrap();
        outbox.try_reserve().unwrap();
        assert!(matches!(
            outbox.try_push(msg("b")),
            Err(TrySendError::Full(_))
        ));
        assert!(matches!(outbox.try_reserve(), Err(TrySendError::Full(()))));
        outbox.release();
        outbox.try_push(msg("b")).unwrap();
        assert!(
            outbox.push_unbounded(msg("c")),
            "control packets ignore the bound"
        );
    }

    #[test]
    fn take_drains_in_order_then_the_volatile_packet_and_leaves_no_memory() {
        let outbox = Outbox::new(8);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(outbox.poll_take(&mut cx).is_pending());

        outbox.try_push(msg("a")).unwrap();
        assert!(
            flag.0.load(Ordering::SeqCst),
            "a push wakes the waiting writer"
        );
        outbox.set_volatile(msg("v1"));
        outbox.set_volatile(msg("v2"));
        outbox.try_reserve().unwrap();
        outbox.push_reserved(msg("b"));

        let Poll::Ready(Some(batch)) = outbox.poll_take(&mut cx) else {
            panic!("packets are queued")
        };
        assert_eq!(texts(batch), ["a", "b", "v2"]);
        assert_eq!(outbox.lock().queue.capacity(), 0);
        assert!(outbox.poll_take(&mut cx).is_pending());
    }

    #[test]
    fn pop_takes_one_packet_at_a_time() {
        let outbox = Outbox::new(8);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        outbox.set_volatile(msg("v"));
        outbox.try_push(msg("a")).unwrap();
        outbox.try_push(msg("b")).unwrap();
        let mut popped = Vec::new();
        while let Poll::Ready(Some(p)) = outbox.poll_pop(&mut cx) {
            popped.extend(p);
        }
        assert_eq!(popped.len(), 3);
        assert!(matches!(&popped[2], Packet::Message(s) if s.as_str() == "v"));
        assert_eq!(outbox.lock().queue.capacity(), 0);
    }

    #[test]
    fn an_interruption_wakes_the_writer_which_drains_then_stops() {
        let outbox = Outbox::new(8);
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(outbox.poll_take(&mut cx).is_pending());
        outbox.interrupt();
        assert!(
            flag.0.load(Ordering::SeqCst),
            "the interruption wakes the writer"
        );
        assert!(matches!(outbox.poll_take(&mut cx), Poll::Ready(None)));

        // Packets queued before the writer ran are still drained.
        let outbox = Outbox::new(8);
        outbox.try_push(msg("close")).unwrap();
        outbox.interrupt();
        let Poll::Ready(Some(batch)) = outbox.poll_take(&mut cx) else {
            panic!("what was queued is still drained")
        };
        assert_eq!(texts(batch), ["close"]);
        assert!(matches!(outbox.poll_take(&mut cx), Poll::Ready(None)));
        assert!(
            outbox.register(&mut cx),
            "register reports the interruption"
        );
    }

    #[tokio::test]
    async fn close_refuses_new_packets_keeps_queued_ones_and_resolves_closed() {
        let outbox = Arc::new(Outbox::new(8));
        outbox.try_push(msg("a")).unwrap();
        outbox.try_reserve().unwrap();
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.closed().await }
        });
        outbox.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("closed() resolves")
            .unwrap();
        assert!(outbox.is_closed());
        assert!(matches!(
            outbox.try_push(msg("b")),
            Err(TrySendError::Closed(_))
        ));
        assert!(!outbox.set_volatile(msg("v")));
        outbox.push_reserved(msg("dropped"));

        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let Poll::Ready(Some(batch)) = outbox.poll_take(&mut cx) else {
            panic!("queued packets survive the close")
        };
        assert_eq!(texts(batch), ["a"]);
        assert!(matches!(outbox.poll_take(&mut cx), Poll::Ready(None)));
    }
}
