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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};
use tokio::sync::watch;

use super::Delivery;
use crate::ops::metrics;
use crate::presence::Presence;
use crate::protocol::{Message, Meta, OrgId, UserId};
use crate::retry::{Backoff, RateLimit};
use crate::store::Store;
use crate::store::events::CHUNK;

/// How long an event that arrived early waits for the ones before it to arrive on their
/// own before they are read from the store.
const GAP_WAIT: Duration = Duration::from_millis(50);
/// How long the store may stay unreachable while events wait for a gap to be filled;
/// then they are delivered anyway and the organization's clients told to resync.
const FILL_GIVE_UP: Duration = Duration::from_secs(3);
/// How often the streams are compared with the store's last sequence numbers.
pub(super) const TAIL_CHECK_EVERY: Duration = Duration::from_secs(5);
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

pub(super) struct History {
    store: Store,
    replay_max: u64,
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
    /// The last sequence number delivered to the room; `None` until read from the store.
    cursor: Option<u64>,
    /// Events that arrived ahead of the cursor.
    pending: BTreeMap<u64, Message>,
    /// The highest sequence number known to exist.
    known_last: u64,
    /// Whether a task is filling the gap (one per stream).
    filling: bool,
    /// Set when the stream was forgotten: nothing may be emitted through it any more.
    closed: bool,
    /// Set when a durable event was dropped because the store (and so the key that
    /// verifies it) was not reached yet: the first cursor then comes with a resync.
    unverified: bool,
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

impl History {
    pub(super) fn new(store: Store, replay_max: u64) -> Self {
        Self {
            store,
            replay_max,
            streams: Mutex::new(HashMap::new()),
            warn: Mutex::new(RateLimit::new(WARN_EVERY)),
        }
    }

    fn stream(&self, org: &OrgId) -> Option<Arc<Stream>> {
        self.streams.lock().unwrap().get(org).cloned()
    }

    /// The stream of `org`, created (and its cursor read from the store) on first use.
    fn open(&self, delivery: &Arc<Delivery>, org: &OrgId) -> Arc<Stream> {
        let mut streams = self.streams.lock().unwrap();
        if let Some(stream) = streams.get(org) {
            return stream.clone();
        }
        let stream = Arc::new(Stream {
            org: org.clone(),
            state: tokio::sync::Mutex::new(State {
                cursor: None,
                pending: BTreeMap::new(),
                known_last: 0,
                filling: true,
                closed: false,
                unverified: false,
            }),
            cursor: watch::Sender::new(None),
            settled: watch::Sender::new(false),
            replaying: AtomicUsize::new(0),
        });
        streams.insert(org.clone(), stream.clone());
        tokio::spawn(delivery.clone().fill(stream.clone()));
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
        &self,
        delivery: &Arc<Delivery>,
        socket: &SocketRef,
        org: &OrgId,
        mut rooms: Vec<String>,
        last_seq: Option<u64>,
    ) -> Option<Seam> {
        // The caller is counted in presence, so the stream cannot be closed from here on;
        // one closed just before (its last socket left as this one came) is replaced.
        let stream = loop {
            let stream = self.open(delivery, org);
            if !stream.state.lock().await.closed {
                break stream;
            }
        };
        // The first socket of a stream waits for its cursor: read later, the cursor could
        // already count an event committed after this socket's `auth-success` that the bus
        // has not brought yet, and that event would then be dropped as delivered.
        let mut settled = stream.settled.subscribe();
        let _ = tokio::time::timeout(SETTLE_WAIT, settled.wait_for(|done| *done)).await;
        let _state = stream.state.lock().await;
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

    /// A delivered durable event from the bus.
    pub(super) async fn on_event(&self, delivery: &Arc<Delivery>, msg: Message) {
        let Some(stream) = self.stream(&msg.org) else {
            return; // no socket of this organization here
        };
        let seq = msg.seq.expect("durable events have a sequence number");
        // A `seq` moves the cursor: it is believed only when signed with the history's key.
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
                    seq,
                    suppressed_since_last = suppressed,
                    "durable event dropped ({reason}): a \"seq\" is only believed with the signature of a replica of this history; workers publishing straight to Redis must not set one"
                );
            }
            if key.is_none() {
                stream.state.lock().await.unverified = true;
            }
            return;
        }
        let mut state = stream.state.lock().await;
        if state.closed {
            return;
        }
        state.known_last = state.known_last.max(seq);
        match state.cursor {
            Some(cursor) if seq <= cursor => {} // already delivered (read back, or twice)
            Some(cursor) if seq == cursor + 1 && state.pending.is_empty() => {
                delivery.emit_durable(&stream, &mut state, &msg).await;
            }
            _ => {
                state.pending.insert(seq, msg);
                delivery.drain(&stream, &mut state).await;
                if !state.pending.is_empty() && !state.filling {
                    state.filling = true;
                    tokio::spawn(delivery.clone().fill(stream.clone()));
                }
            }
        }
    }

    /// Compares every stream's cursor with the store and starts filling where behind, or
    /// where no cursor was read yet.
    pub(super) async fn check_tails(&self, delivery: &Arc<Delivery>) {
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
            if state.closed {
                continue;
            }
            state.known_last = state.known_last.max(known);
            // A stream without a cursor (the store was down when it opened) gets one now.
            let behind = state.cursor.is_none_or(|c| c < state.known_last);
            if behind && !state.filling {
                state.filling = true;
                tokio::spawn(delivery.clone().fill(stream.clone()));
            }
        }
    }

    pub(super) async fn replay(
        &self,
        delivery: &Delivery,
        socket: &SocketRef,
        user: &UserId,
        seam: Seam,
    ) {
        let stream = seam.stream.clone();
        let last_seq = seam.last_seq;
        let org = &stream.org;
        let deadline = Instant::now() + REPLAY_TIMEOUT;
        let mut sent = 0u64;
        let mut from = last_seq;
        let mut checked_ahead = false;
        let outcome = loop {
            let cursor = {
                let state = stream.state.lock().await;
                match state.cursor {
                    Some(cursor) if cursor == from => {
                        socket.leave(replay_room(org));
                        break Ok(());
                    }
                    Some(cursor) if cursor > from && cursor - from > self.replay_max => {
                        break Err((state, Resync::TooFarBehind, cursor));
                    }
                    cursor => cursor,
                }
            };
            match cursor {
                Some(cursor) if cursor > from => {
                    let range = match self.store.range(org, from, cursor, Some(user)).await {
                        Ok(range) => range,
                        Err(e) => {
                            tracing::warn!(%org, "replay failed: {e}");
                            break Err((stream.state.lock().await, Resync::Unavailable, cursor));
                        }
                    };
                    if range.first_retained.is_none_or(|first| first > from + 1) {
                        break Err((stream.state.lock().await, Resync::Expired, cursor));
                    }
                    let last = range.events.last().and_then(|m| m.seq);
                    tracing::debug!(sid = %socket.id, %org, from, cursor, events = range.events.len(), "replaying");
                    for msg in &range.events {
                        match send_patiently(socket, msg, deadline).await {
                            Sent::Queued => sent += 1,
                            Sent::Gone => return,
                            Sent::TooSlow => {
                                delivery.evict(socket, "too slow to take its replay");
                                return;
                            }
                        }
                    }
                    // A full chunk may stop short of the cursor; otherwise every event up
                    // to the cursor that is meant for this user has been sent.
                    from = if range.events.len() as i64 == CHUNK {
                        last.unwrap_or(cursor)
                    } else {
                        cursor
                    };
                }
                _ => {
                    // The cursor is unknown yet, or behind the client (it saw events that
                    // another replica delivered first). A client ahead of the store itself
                    // names events that do not exist.
                    let mut watch = stream.cursor.subscribe();
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
                        let cursor = state.cursor.unwrap_or(0);
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

/// What a fill step found.
enum Step {
    /// The stream's first cursor.
    Init(u64),
    /// Events after the cursor, and the oldest retained.
    Events(crate::store::events::Range),
    TooFar,
}

impl Delivery {
    /// Delivers `msg`, the event right after the cursor, and advances the cursor.
    async fn emit_durable(&self, stream: &Stream, state: &mut State, msg: &Message) {
        let except =
            (stream.replaying.load(Ordering::Acquire) > 0).then(|| replay_room(&stream.org));
        self.emit_to_room(msg, except).await;
        state.cursor = msg.seq;
        stream.cursor.send_replace(state.cursor);
    }

    /// Delivers the pending events that now follow the cursor; drops those behind it.
    async fn drain(&self, stream: &Stream, state: &mut State) {
        let Some(mut cursor) = state.cursor else {
            return;
        };
        while let Some(entry) = state.pending.first_entry() {
            let seq = *entry.key();
            if seq <= cursor {
                entry.remove();
            } else if seq == cursor + 1 {
                let msg = entry.remove();
                self.emit_durable(stream, state, &msg).await;
                cursor = seq;
            } else {
                break;
            }
        }
    }

    /// Sends `resync-required` to the organization's clients (those still replaying get
    /// their own) and moves the cursor to `to`.
    async fn skip_to(&self, stream: &Stream, state: &mut State, why: Resync, to: u64) {
        let from = state.cursor.unwrap_or(0);
        ::metrics::counter!(metrics::RESYNCS, "reason" => why.reason()).increment(1);
        tracing::warn!(org = %stream.org, from, to, reason = why.reason(), "events skipped; clients told to resync");
        let mut target = self.io.to(stream.org.room());
        if stream.replaying.load(Ordering::Acquire) > 0 {
            target = target.except(replay_room(&stream.org));
        }
        let _ = target
            .emit(
                "resync-required",
                &json!({"reason": why.reason(), "lastSeq": from, "latestSeq": to}),
            )
            .await;
        state.cursor = Some(to);
        stream.cursor.send_replace(state.cursor);
        self.drain(stream, state).await;
    }

    /// Brings the stream's cursor up to what is known to exist: reads the first cursor,
    /// then whatever the bus has not delivered. One task per stream at a time.
    async fn fill(self: Arc<Self>, stream: Arc<Stream>) {
        let history = self
            .history
            .as_ref()
            .expect("only streams of a history fill");
        // However this fill ends (panics included), joining sockets stop waiting for it.
        struct Settle<'a>(&'a Stream);
        impl Drop for Settle<'_> {
            fn drop(&mut self) {
                self.0.settled.send_replace(true);
            }
        }
        let _settle = Settle(&stream);
        if stream.state.lock().await.cursor.is_some() {
            // Give events that are merely out of order the chance to arrive by themselves.
            tokio::time::sleep(GAP_WAIT).await;
        }
        let started = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let (cursor, target) = {
                let mut state = stream.state.lock().await;
                if state.closed {
                    return;
                }
                self.drain(&stream, &mut state).await;
                let target = match state.pending.first_key_value() {
                    Some((first, _)) => first - 1,
                    None => state.known_last,
                };
                match state.cursor {
                    Some(cursor) if cursor >= target => {
                        state.filling = false;
                        return;
                    }
                    cursor => (cursor, target),
                }
            };
            let step = match cursor {
                None => history.store.last_seq(&stream.org).await.map(Step::Init),
                Some(cursor) if target - cursor > history.replay_max => Ok(Step::TooFar),
                Some(cursor) => history
                    .store
                    .range(&stream.org, cursor, target, None)
                    .await
                    .map(Step::Events),
            };
            let mut state = stream.state.lock().await;
            if state.closed {
                return;
            }
            match step {
                Ok(Step::Init(last)) => {
                    state.known_last = state.known_last.max(last);
                    if state.cursor.is_none() {
                        // Sockets already here receive what arrived since they joined.
                        let first_pending = state.pending.first_key_value().map(|(s, _)| s - 1);
                        let cursor = first_pending.map_or(last, |p| p.min(last));
                        state.cursor = Some(cursor);
                        stream.cursor.send_replace(state.cursor);
                        stream.settled.send_replace(true);
                        if std::mem::take(&mut state.unverified) {
                            // Events were dropped unverified before the store was reached:
                            // the clients here cannot know which, so they refetch.
                            self.skip_to(&stream, &mut state, Resync::Unavailable, cursor)
                                .await;
                        }
                    }
                }
                Ok(Step::TooFar) => {
                    self.skip_to(&stream, &mut state, Resync::TooFarBehind, target)
                        .await;
                }
                Ok(Step::Events(range)) => {
                    let read = range.events.len();
                    for msg in range.events {
                        if state.cursor.is_some_and(|c| msg.seq == Some(c + 1)) {
                            ::metrics::counter!(metrics::GAP_FILLS).increment(1);
                            self.emit_durable(&stream, &mut state, &msg).await;
                        }
                    }
                    let cursor = state.cursor.unwrap_or(0);
                    if read < CHUNK as usize && cursor < target {
                        // The store does not have them: deleted by retention, or numbers
                        // that were never given out (a forged `seq` on the bus).
                        match history.store.last_seq(&stream.org).await {
                            Ok(last) if last < target => {
                                let forged = state.pending.split_off(&(last + 1));
                                if !forged.is_empty() {
                                    ::metrics::counter!(metrics::MALFORMED, "reason" => "unknown_seq")
                                        .increment(forged.len() as u64);
                                }
                                state.known_last = last;
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
                Err(e) => {
                    if started.elapsed() > FILL_GIVE_UP {
                        match state.cursor {
                            Some(_) => {
                                self.skip_to(&stream, &mut state, Resync::Unavailable, target)
                                    .await
                            }
                            None => {
                                if let Some((&first, _)) = state.pending.first_key_value() {
                                    state.cursor = Some(first - 1);
                                    stream.cursor.send_replace(state.cursor);
                                } else {
                                    // Nothing waits: try again with the next event.
                                    state.filling = false;
                                    return;
                                }
                            }
                        }
                    } else {
                        tracing::debug!(org = %stream.org, "gap fill failed ({e}); retrying");
                        drop(state);
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
    }
}
