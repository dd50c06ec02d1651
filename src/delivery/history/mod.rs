//! Durable events, in order and without gaps, live and on reconnect.
//!
//! The bus gives no ordering across publishers and no guarantee of delivery: two replicas
//! commit an organization's events 5 and 6 in that order but may publish them the other way
//! round, and anything published while this replica was not subscribed is gone. So each
//! replica keeps, per organization it holds sockets of, a *stream*: the last sequence
//! number it delivered (the cursor) and the events that arrived ahead of it. An event
//! that arrives in order is delivered at once; one that arrives early waits a moment for
//! the missing ones, which are then read back from the store. The same read-back runs when
//! the bus reconnects and every few seconds, so a publish that failed after its commit is
//! delivered too.
//!
//! Replay uses the same cursor. A client that connects with `lastSeq` joins its rooms and
//! a per-organization *replay room*, which durable broadcasts leave out. It is sent what it
//! missed from the store up to the cursor, and leaves the replay room when it has caught
//! up, under the stream's lock, so the next live event is exactly the next one: the seam has
//! no gap and no duplicate. Ephemeral messages are not held back: they have no order to keep.
//!
//! When the gap is too large (`FANOUT_REPLAY_MAX`), already deleted by retention, or the
//! store is unreachable, the client gets `resync-required` and refetches over REST.
//!
//! The decisions (what to deliver, what waits, what to read) are plain state in
//! [`order`]; this module runs them: the tasks, the locks, the store reads, the sockets.

mod order;
mod slots;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};
use tokio::sync::watch;

use super::rooms::Rooms;
use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::presence::Presence;
use crate::protocol::{Message, Meta, OrgId, UserId};
use crate::retry::{Backoff, RateLimit};
use crate::store::Store;
use crate::store::events::CHUNK;
use crate::tasks::{Policy, Tasks};
use order::{FillStep, Order, ReplayStep};
use slots::Slots;

/// How long an event that arrived early waits for the ones before it to arrive on their
/// own before they are read from the store.
const GAP_WAIT: Duration = Duration::from_millis(50);
/// How long the store may stay unreachable while events wait for a gap to be filled;
/// then they are delivered anyway and the organization's clients told to resync.
const FILL_GIVE_UP: Duration = Duration::from_secs(3);
/// How often the streams are compared with the store's last sequence numbers.
const TAIL_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Longest a replay may take, including waiting for a slow client's queue.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a first socket waits for its stream's first cursor (the first fill gives up
/// after `FILL_GIVE_UP` anyway).
const SETTLE_WAIT: Duration = Duration::from_secs(4);
/// At most one warning per this interval about envelopes dropped for their signature.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long a client ahead of this replica (it saw events another replica delivered
/// first) waits for this replica to catch up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// How replays are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    /// `FANOUT_REPLAY_MAX`: most events replayed to one client.
    pub max_events: u64,
    /// `FANOUT_REPLAY_CONCURRENCY`: replay reads at once (`None`: unbounded).
    pub concurrency: Option<usize>,
}

pub(super) struct History {
    store: Store,
    rooms: Arc<Rooms>,
    tasks: Tasks,
    replay_max: u64,
    /// `FANOUT_REPLAY_CONCURRENCY`: replay reads at once, shared fairly; `None`: unbounded.
    slots: Option<Slots>,
    streams: Mutex<HashMap<OrgId, Arc<Stream>>>,
    /// Warnings about durable envelopes dropped for their signature, at most one per period.
    warn: Mutex<RateLimit>,
}

/// Where a joining client's replay starts.
pub struct Seam {
    stream: Arc<Stream>,
    last_seq: u64,
}

struct Stream {
    org: OrgId,
    /// Taken by every delivery of a durable event, and by a replay when it leaves the
    /// replay room: so leaving happens between two events, never during one.
    state: tokio::sync::Mutex<State>,
    /// The cursor, for clients waiting for this replica to reach their `lastSeq`.
    cursor: watch::Sender<Option<u64>>,
    /// Set once the first fill is over: the cursor was read from the store, or the store
    /// could not be reached. A socket joins only then (see [`History::join`]).
    settled: watch::Sender<bool>,
    /// Clients in the replay room; while there are none, broadcasts need no `except`.
    /// Incremented before a client joins the room, decremented when its [`Seam`] is
    /// dropped, which is after it left the room (or after it is gone).
    replaying: AtomicUsize,
}

impl Drop for Seam {
    fn drop(&mut self) {
        self.stream.replaying.fetch_sub(1, Ordering::AcqRel);
    }
}

struct State {
    order: Order,
    /// Set when the stream was forgotten: nothing may be emitted through it any more.
    closed: bool,
}

/// Why a client is told to resync; the label of `fanout_resyncs_total`.
#[derive(Clone, Copy)]
enum Resync {
    TooFarBehind,
    Expired,
    Unavailable,
    UnknownSeq,
    InvalidLastSeq,
}

impl Resync {
    fn reason(self) -> &'static str {
        match self {
            Self::TooFarBehind => "too_far_behind",
            Self::Expired => "expired",
            Self::Unavailable => "history_unavailable",
            Self::UnknownSeq => "unknown_seq",
            Self::InvalidLastSeq => "invalid_last_seq",
        }
    }
}

fn replay_room(org: &OrgId) -> String {
    format!("replay:{org}")
}

impl Stream {
    /// The replay room, when broadcasts must leave it out.
    fn except(&self) -> Option<String> {
        (self.replaying.load(Ordering::Acquire) > 0).then(|| replay_room(&self.org))
    }
}

impl History {
    pub(super) fn new(store: Store, rooms: Arc<Rooms>, replay: ReplayLimits, tasks: Tasks) -> Self {
        Self {
            store,
            rooms,
            tasks,
            replay_max: replay.max_events,
            slots: replay.concurrency.map(Slots::new),
            streams: Mutex::new(HashMap::new()),
            warn: Mutex::new(RateLimit::new(WARN_EVERY)),
        }
    }

    fn stream(&self, org: &OrgId) -> Option<Arc<Stream>> {
        self.streams.lock().unwrap().get(org).cloned()
    }

    /// The stream of `org`, created (and its cursor read from the store) on first use.
    fn open(self: &Arc<Self>, org: &OrgId) -> Arc<Stream> {
        let mut streams = self.streams.lock().unwrap();
        if let Some(stream) = streams.get(org) {
            return stream.clone();
        }
        let stream = Arc::new(Stream {
            org: org.clone(),
            state: tokio::sync::Mutex::new(State {
                order: Order::new(self.replay_max),
                closed: false,
            }),
            cursor: watch::Sender::new(None),
            settled: watch::Sender::new(false),
            replaying: AtomicUsize::new(0),
        });
        streams.insert(org.clone(), stream.clone());
        self.start_fill(&stream);
        stream
    }

    /// Forgets `org`'s stream once no socket of it is left, and closes it: a task still
    /// holding it (a gap fill waiting on the store, say) must not emit into the room that a
    /// fresh stream's sockets will join. Closing takes the stream's lock, so it waits for
    /// an emission in progress, and every emission checks `closed` under that lock.
    /// Presence is checked under the streams lock, which `open` takes too: a socket
    /// admitted meanwhile either keeps this stream alive or opens a fresh one after it.
    pub(super) async fn close_if_unused(&self, presence: &Presence, org: &OrgId) {
        let Some(stream) = self.stream(org) else {
            return;
        };
        let mut state = stream.state.lock().await;
        let mut streams = self.streams.lock().unwrap();
        let current = streams.get(org).is_some_and(|s| Arc::ptr_eq(s, &stream));
        if current && presence.org_sockets(org) == 0 {
            streams.remove(org);
            state.closed = true;
        }
    }

    pub(super) async fn join(
        self: &Arc<Self>,
        socket: &SocketRef,
        org: &OrgId,
        mut rooms: Vec<String>,
        last_seq: Option<u64>,
    ) -> Option<Seam> {
        // The caller is counted in presence, so the stream cannot be closed from here on;
        // one closed just before (its last socket left as this one came) is replaced.
        let stream = loop {
            let stream = self.open(org);
            if !stream.state.lock().await.closed {
                break stream;
            }
        };
        // The first socket of a stream waits for its cursor: read later, the cursor could
        // already count an event committed after this socket's `auth-success` that the bus
        // has not brought yet, and that event would then be dropped as delivered.
        let mut settled = stream.settled.subscribe();
        let _ = tokio::time::timeout(SETTLE_WAIT, settled.wait_for(|done| *done)).await;
        let mut state = stream.state.lock().await;
        state.order.joined();
        let seam = last_seq.map(|last_seq| {
            rooms.push(replay_room(org));
            stream.replaying.fetch_add(1, Ordering::AcqRel);
            Seam {
                stream: stream.clone(),
                last_seq,
            }
        });
        socket.join(rooms);
        seam
    }

    /// A durable event from the bus.
    pub(super) async fn on_event(self: &Arc<Self>, msg: Message) {
        let Some(stream) = self.stream(&msg.org) else {
            return; // no socket of this organization here
        };
        // A `seq` moves the cursor: it is believed only when signed with the history's
        // key. Without the key (the store was never reached), the stream has no cursor
        // yet, and its sockets resync when it gets one (`Order::joined`).
        let key = self.store.bus_key();
        if !key.is_some_and(|key| key.verify(&msg)) {
            let reason = match (key, msg.sig) {
                (None, _) => "unverified_seq",
                (Some(_), None) => "unsigned_seq",
                (Some(_), Some(_)) => "bad_signature",
            };
            ::metrics::counter!(metrics::MALFORMED, "reason" => reason).increment(1);
            if let Some(suppressed) = self.warn.lock().unwrap().check() {
                tracing::warn!(
                    org = %msg.org,
                    seq = msg.seq,
                    suppressed_since_last = suppressed,
                    "durable event dropped ({reason}): a \"seq\" is only believed with the signature of a replica of this history; workers publishing straight to Redis must not set one"
                );
            }
            return;
        }
        let mut state = stream.state.lock().await;
        if state.closed {
            return;
        }
        let mut out = Vec::new();
        if state.order.arrive(msg, &mut out) {
            self.start_fill(&stream);
        }
        self.emit(&stream, &state, out).await;
    }

    /// Compares every stream's cursor with the store and starts filling where behind, or
    /// where no cursor was read yet.
    async fn check_tails(self: &Arc<Self>) {
        let streams: Vec<Arc<Stream>> = self.streams.lock().unwrap().values().cloned().collect();
        if streams.is_empty() {
            return;
        }
        let orgs: Vec<&str> = streams.iter().map(|s| s.org.as_str()).collect();
        let last = match self.store.last_seqs(&orgs).await {
            Ok(last) => last,
            Err(e) => {
                tracing::debug!("tail check skipped: {e}");
                return;
            }
        };
        for stream in streams {
            let known = last.get(stream.org.as_str()).copied().unwrap_or(0);
            let mut state = stream.state.lock().await;
            if !state.closed && state.order.known(known) {
                self.start_fill(&stream);
            }
        }
    }

    fn start_fill(self: &Arc<Self>, stream: &Arc<Stream>) {
        self.tasks
            .spawn_short("gap-fill", self.clone().fill(stream.clone()));
    }

    /// Reads back, now, whatever the bus may have lost (it reconnected).
    pub(super) fn bus_reconnected(self: &Arc<Self>) {
        let history = self.clone();
        self.tasks
            .spawn_short("tail-check", async move { history.check_tails().await });
    }

    /// Checks, every few seconds, that no committed event was missed by the bus (a failed
    /// publish leaves no trace on the receiving side). Restarted if it fails: it keeps no
    /// state.
    pub(super) fn watch_tails(self: &Arc<Self>) {
        let history = self.clone();
        self.tasks
            .spawn("tail-watch", Policy::Restart, move |shutdown: Shutdown| {
                let history = history.clone();
                async move {
                    let mut every = tokio::time::interval(TAIL_CHECK_EVERY);
                    every.tick().await;
                    loop {
                        tokio::select! {
                            _ = every.tick() => history.check_tails().await,
                            _ = shutdown.wait() => return,
                        }
                    }
                }
            });
    }

    /// Forgets `org`'s stream if no socket of it is left (see [`History::close_if_unused`]).
    pub(super) fn left(self: &Arc<Self>, presence: Arc<Presence>, org: OrgId) {
        let history = self.clone();
        self.tasks.spawn_short("stream-close", async move {
            history.close_if_unused(&presence, &org).await
        });
    }

    pub(super) async fn replay(&self, socket: &SocketRef, user: &UserId, seam: Seam) {
        let stream = seam.stream.clone();
        let last_seq = seam.last_seq;
        let org = &stream.org;
        let deadline = Instant::now() + REPLAY_TIMEOUT;
        let mut sent = 0u64;
        let mut from = last_seq;
        let mut checked_ahead = false;
        let outcome = loop {
            let step = {
                let state = stream.state.lock().await;
                let step = state.order.replay_step(from);
                match step {
                    ReplayStep::CaughtUp => {
                        socket.leave(replay_room(org));
                        break Ok(());
                    }
                    ReplayStep::TooFar { latest } => {
                        break Err((state, Resync::TooFarBehind, latest));
                    }
                    step => step,
                }
            };
            match step {
                ReplayStep::Read { from: after, to } => {
                    let slot = match &self.slots {
                        Some(slots) => Some(slots.acquire(org).await),
                        None => None,
                    };
                    let read = self.store.range(org, after, to, Some(user)).await;
                    drop(slot);
                    let range = match read {
                        Ok(range) => range,
                        Err(e) => {
                            tracing::warn!(%org, "replay failed: {e}");
                            break Err((stream.state.lock().await, Resync::Unavailable, to));
                        }
                    };
                    if range.first_retained.is_none_or(|first| first > after + 1) {
                        break Err((stream.state.lock().await, Resync::Expired, to));
                    }
                    let last = range.events.last().and_then(|m| m.seq);
                    tracing::debug!(sid = %socket.id, %org, after, to, events = range.events.len(), "replaying");
                    for msg in &range.events {
                        match send_patiently(socket, msg, deadline).await {
                            Sent::Queued => sent += 1,
                            Sent::Gone => return,
                            Sent::TooSlow => {
                                self.rooms.evict(socket, "too slow to take its replay");
                                return;
                            }
                        }
                    }
                    // A full chunk may stop short of the cursor; otherwise every event up
                    // to the cursor that is meant for this user has been sent.
                    from = if range.events.len() as i64 == CHUNK {
                        last.unwrap_or(to)
                    } else {
                        to
                    };
                }
                _ => {
                    // The cursor is unknown yet, or behind the client (it saw events that
                    // another replica delivered first). A client ahead of the store itself
                    // names events that do not exist.
                    let mut watch = stream.cursor.subscribe();
                    let cursor = *watch.borrow();
                    if cursor.is_none() {
                        let known = watch.wait_for(Option::is_some);
                        if tokio::time::timeout(CATCH_UP_WAIT, known).await.is_err() {
                            break Err((stream.state.lock().await, Resync::Unavailable, 0));
                        }
                        continue;
                    }
                    if !checked_ahead {
                        checked_ahead = true;
                        match self.store.last_seq(org).await {
                            Ok(last) if last < from => {
                                break Err((stream.state.lock().await, Resync::UnknownSeq, last));
                            }
                            Ok(_) => {}
                            Err(_) => {
                                break Err((
                                    stream.state.lock().await,
                                    Resync::Unavailable,
                                    cursor.unwrap_or(0),
                                ));
                            }
                        }
                    }
                    let caught_up = watch.wait_for(|c| c.is_some_and(|c| c >= from));
                    if tokio::time::timeout(CATCH_UP_WAIT, caught_up)
                        .await
                        .is_err()
                        || Instant::now() > deadline
                    {
                        let state = stream.state.lock().await;
                        let cursor = state.order.cursor().unwrap_or(0);
                        break Err((state, Resync::Unavailable, cursor));
                    }
                }
            }
        };
        match outcome {
            Ok(()) => {
                if sent > 0 || last_seq > 0 {
                    ::metrics::counter!(metrics::REPLAYS).increment(1);
                    ::metrics::counter!(metrics::REPLAYED_EVENTS).increment(sent);
                }
                tracing::debug!(sid = %socket.id, %org, last_seq, sent, "replayed");
            }
            Err((_state, why, latest)) => {
                // Under the lock: the client hears `resync-required` before any live event
                // that follows `latest`.
                resync(socket, why, last_seq, latest);
                socket.leave(replay_room(org));
            }
        }
        drop(seam);
    }

    /// Delivers `out` (in order, to the organization's rooms, leaving out clients still
    /// being replayed to) and publishes the cursor. Called under the stream's lock.
    async fn emit(&self, stream: &Stream, state: &State, out: Vec<Message>) {
        if out.is_empty() {
            return;
        }
        let except = stream.except();
        for msg in &out {
            self.rooms.emit(msg, except.clone()).await;
        }
        stream.cursor.send_replace(state.order.cursor());
    }

    /// Sends `resync-required` to the organization's clients (those still replaying get
    /// their own), moves the cursor to `to` and delivers what waited after it.
    async fn skip_to(&self, stream: &Stream, state: &mut State, why: Resync, to: u64) {
        let from = state.order.cursor().unwrap_or(0);
        ::metrics::counter!(metrics::RESYNCS, "reason" => why.reason()).increment(1);
        tracing::warn!(org = %stream.org, from, to, reason = why.reason(), "events skipped; clients told to resync");
        self.rooms
            .broadcast(
                stream.org.room(),
                stream.except(),
                "resync-required",
                &json!({"reason": why.reason(), "lastSeq": from, "latestSeq": to}),
            )
            .await;
        let mut out = Vec::new();
        state.order.skip_to(to, &mut out);
        stream.cursor.send_replace(state.order.cursor());
        self.emit(stream, state, out).await;
    }

    /// Brings the stream's cursor up to what is known to exist: reads the first cursor,
    /// then whatever the bus has not delivered. One task per stream at a time.
    async fn fill(self: Arc<Self>, stream: Arc<Stream>) {
        // However this fill ends (panics included), joining sockets stop waiting for it.
        struct Settle<'a>(&'a Stream);
        impl Drop for Settle<'_> {
            fn drop(&mut self) {
                self.0.settled.send_replace(true);
            }
        }
        let _settle = Settle(&stream);
        if stream.state.lock().await.order.cursor().is_some() {
            // Give events that are merely out of order the chance to arrive by themselves.
            tokio::time::sleep(GAP_WAIT).await;
        }
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let step = {
                let mut state = stream.state.lock().await;
                if state.closed {
                    return;
                }
                let mut out = Vec::new();
                let step = state.order.fill_step(&mut out);
                self.emit(&stream, &state, out).await;
                step
            };
            let read = match step {
                FillStep::Done => return,
                FillStep::TooFar { to } => {
                    let mut state = stream.state.lock().await;
                    if state.closed {
                        return;
                    }
                    self.skip_to(&stream, &mut state, Resync::TooFarBehind, to)
                        .await;
                    continue;
                }
                FillStep::Init => self.store.last_seq(&stream.org).await.map(Read::Init),
                FillStep::Read { from, to } => self
                    .store
                    .range(&stream.org, from, to, None)
                    .await
                    .map(|range| Read::Events(range, to)),
            };
            let mut state = stream.state.lock().await;
            if state.closed {
                return;
            }
            let mut out = Vec::new();
            match read {
                Ok(Read::Init(last)) => {
                    let resync = state.order.init(last, &mut out);
                    self.emit(&stream, &state, out).await;
                    stream.cursor.send_replace(state.order.cursor());
                    if let Some(to) = resync {
                        // Sockets joined before any cursor could be read (the store was out
                        // of reach): they cannot know what they missed, so they refetch.
                        self.skip_to(&stream, &mut state, Resync::Unavailable, to)
                            .await;
                    }
                    stream.settled.send_replace(true);
                }
                Ok(Read::Events(range, target)) => {
                    let read = range.events.len();
                    let delivered = state.order.filled(range.events, &mut out);
                    ::metrics::counter!(metrics::GAP_FILLS).increment(delivered as u64);
                    self.emit(&stream, &state, out).await;
                    let cursor = state.order.cursor().unwrap_or(0);
                    if read < CHUNK as usize && cursor < target {
                        // The store does not have them: deleted by retention, or numbers
                        // that were never given out (a history reset, say).
                        match self.store.last_seq(&stream.org).await {
                            Ok(last) if last < target => {
                                let dropped = state.order.store_last(last);
                                if dropped > 0 {
                                    ::metrics::counter!(metrics::MALFORMED, "reason" => "unknown_seq")
                                        .increment(dropped as u64);
                                }
                                if cursor < last {
                                    self.skip_to(&stream, &mut state, Resync::Expired, last)
                                        .await;
                                }
                            }
                            Ok(_) => {
                                self.skip_to(&stream, &mut state, Resync::Expired, target)
                                    .await;
                            }
                            Err(_) => {}
                        }
                    }
                }
                Err(e) if started.elapsed() > FILL_GIVE_UP => match state.order.give_up() {
                    Some(to) => {
                        self.skip_to(&stream, &mut state, Resync::Unavailable, to)
                            .await
                    }
                    // Nothing waits: try again with the next event or check.
                    None => {
                        tracing::debug!(org = %stream.org, "gap fill gave up ({e})");
                        return;
                    }
                },
                Err(e) => {
                    tracing::debug!(org = %stream.org, "gap fill failed ({e}); retrying");
                    drop(state);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// What a fill read from the store.
enum Read {
    /// The stream's first cursor.
    Init(u64),
    /// Events after the cursor, and the oldest retained; up to the target.
    Events(crate::store::events::Range, u64),
}

/// Tells a client its history cannot be replayed: it should refetch over REST and carry on
/// from `latestSeq`.
fn resync(socket: &SocketRef, why: Resync, last_seq: u64, latest: u64) {
    ::metrics::counter!(metrics::RESYNCS, "reason" => why.reason()).increment(1);
    let _ = socket.emit(
        "resync-required",
        &json!({"reason": why.reason(), "lastSeq": last_seq, "latestSeq": latest}),
    );
}

/// Tells a client that `auth.lastSeq` is not a sequence number.
pub(super) fn invalid_last_seq(socket: &SocketRef) {
    resync(socket, Resync::InvalidLastSeq, 0, 0);
}

enum Sent {
    Queued,
    Gone,
    TooSlow,
}

/// Sends one replayed event, waiting while the socket's queue is full (a replay can be
/// longer than the queue), until `deadline`.
async fn send_patiently(socket: &SocketRef, msg: &Message, deadline: Instant) -> Sent {
    let seq = msg
        .seq
        .expect("events from the store have a sequence number");
    loop {
        match socket.emit(msg.event.as_str(), &(&*msg.data, Meta { seq })) {
            Ok(()) => return Sent::Queued,
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                if Instant::now() >= deadline {
                    return Sent::TooSlow;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => return Sent::Gone,
        }
    }
}
