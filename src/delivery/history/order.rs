//! The ordering of one organization's durable events on one replica, as plain state.
//!
//! Everything here is synchronous and does no I/O: the caller (`history`) holds the
//! stream's lock, feeds in what happened (an event arrived on the bus, the store answered
//! a read), emits the events this hands back, in the order given, and performs the reads
//! it asks for. Keeping the decisions apart from the tasks, locks and sockets is what lets
//! the tests below try every interleaving of arrivals, gap fills and replays.
//!
//! The rules: the cursor is the last sequence number delivered; an event right after it is
//! delivered at once, one ahead of it waits (and a fill reads the gap from the store), one
//! at or behind it was delivered already and is dropped. A replaying client reads the
//! store up to the cursor and switches to live events when it has reached it, under the
//! same lock, so nothing falls between the two.

use std::collections::BTreeMap;

use crate::protocol::Message;

/// One organization's durable events on this replica: the cursor and what waits ahead.
#[derive(Debug)]
pub(super) struct Order {
    /// The last sequence number delivered; `None` until read from the store.
    cursor: Option<u64>,
    /// Events that arrived ahead of the cursor.
    pending: BTreeMap<u64, Message>,
    /// The highest sequence number known to exist.
    known_last: u64,
    /// Whether a fill is running (one at a time).
    filling: bool,
    /// Most events one fill may read; further behind, the stream skips ahead.
    replay_max: u64,
    /// Whether a socket joined before the first cursor was read (the store was out of
    /// reach): it cannot know where its stream starts, so the first cursor comes with a
    /// resync.
    blind: bool,
}

/// What a fill must do next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FillStep {
    /// Nothing is missing: the fill is over.
    Done,
    /// Read the first cursor (the store's last sequence number).
    Init,
    /// Read the events after `from`, up to `to`.
    Read { from: u64, to: u64 },
    /// More than `replay_max` are missing: skip to `to` (clients resync).
    TooFar { to: u64 },
}

/// What a replaying client must do next, given the cursor.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReplayStep {
    /// It has everything up to the cursor: it switches to live events now.
    CaughtUp,
    /// Read the events after `from`, up to `to` (the cursor).
    Read { from: u64, to: u64 },
    /// More than `replay_max` behind the cursor `latest`.
    TooFar { latest: u64 },
    /// The cursor is unknown yet, or behind the client: wait for it to move.
    Wait,
}

impl Order {
    /// A stream whose first fill (reading the cursor) starts now.
    pub(super) fn new(replay_max: u64) -> Self {
        Self {
            cursor: None,
            pending: BTreeMap::new(),
            known_last: 0,
            filling: true,
            replay_max,
            blind: false,
        }
    }

    /// A socket joins the stream.
    pub(super) fn joined(&mut self) {
        self.blind |= self.cursor.is_none();
    }

    pub(super) fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    /// A (verified) event from the bus. Events to deliver are appended to `out`; `true`
    /// means a fill must be started.
    pub(super) fn arrive(&mut self, msg: Message, out: &mut Vec<Message>) -> bool {
        let seq = msg.seq.expect("durable events have a sequence number");
        self.known_last = self.known_last.max(seq);
        match self.cursor {
            Some(cursor) if seq <= cursor => false, // delivered already (read back, or twice)
            Some(cursor) if seq == cursor + 1 && self.pending.is_empty() => {
                self.deliver(msg, out);
                false
            }
            _ => {
                self.pending.insert(seq, msg);
                self.drain(out);
                self.start_fill_if(!self.pending.is_empty())
            }
        }
    }

    /// The store's last sequence number, from a periodic check: `true` means a fill must be
    /// started (the stream is behind, or has no cursor yet).
    pub(super) fn known(&mut self, last: u64) -> bool {
        self.known_last = self.known_last.max(last);
        let behind = self.cursor.is_none_or(|c| c < self.known_last);
        self.start_fill_if(behind)
    }

    fn start_fill_if(&mut self, needed: bool) -> bool {
        if needed && !self.filling {
            self.filling = true;
            return true;
        }
        false
    }

    /// The next step of the running fill (events that became deliverable go to `out`).
    /// After `Done`, the fill is over.
    pub(super) fn fill_step(&mut self, out: &mut Vec<Message>) -> FillStep {
        self.drain(out);
        let target = self.target();
        match self.cursor {
            Some(cursor) if cursor >= target => {
                self.filling = false;
                FillStep::Done
            }
            None => FillStep::Init,
            Some(cursor) if target - cursor > self.replay_max => FillStep::TooFar { to: target },
            Some(cursor) => FillStep::Read {
                from: cursor,
                to: target,
            },
        }
    }

    /// What a fill reads up to: just before the first waiting event, or what is known.
    fn target(&self) -> u64 {
        match self.pending.first_key_value() {
            Some((first, _)) => first - 1,
            None => self.known_last,
        }
    }

    /// The store's last sequence number, read by `FillStep::Init`. Sockets already here
    /// receive the events that arrived since they joined (those waiting). `Some(to)` when
    /// some joined before any cursor could be read: the caller tells the clients to resync
    /// up to `to`, then calls [`Order::skip_to`] with it.
    pub(super) fn init(&mut self, last: u64, out: &mut Vec<Message>) -> Option<u64> {
        self.known_last = self.known_last.max(last);
        if self.cursor.is_some() {
            return None;
        }
        let first_pending = self.pending.first_key_value().map(|(s, _)| s - 1);
        let cursor = first_pending.map_or(last, |p| p.min(last));
        if std::mem::take(&mut self.blind) {
            return Some(cursor);
        }
        self.cursor = Some(cursor);
        self.drain(out);
        None
    }

    /// Events read by `FillStep::Read`, in sequence order: those that continue the cursor
    /// are delivered. Returns how many.
    pub(super) fn filled(&mut self, events: Vec<Message>, out: &mut Vec<Message>) -> usize {
        let mut delivered = 0;
        for msg in events {
            if self.cursor.is_some_and(|c| msg.seq == Some(c + 1)) {
                self.deliver(msg, out);
                delivered += 1;
            }
        }
        delivered
    }

    /// The store has nothing beyond `last`: waiting events after it name numbers that were
    /// never given out (forged, or a reset history). They are dropped; returns how many.
    pub(super) fn store_last(&mut self, last: u64) -> usize {
        let forged = self.pending.split_off(&(last + 1));
        self.known_last = last;
        forged.len()
    }

    /// Moves the cursor to `to` (what lies between is not delivered: the caller tells the
    /// clients to resync), then delivers what waits after it. Returns where it was.
    pub(super) fn skip_to(&mut self, to: u64, out: &mut Vec<Message>) -> u64 {
        let from = self.cursor.unwrap_or(0);
        self.blind = false;
        self.cursor = Some(to);
        self.drain(out);
        from
    }

    /// The store stayed unreachable during a whole fill: returns where the stream skips
    /// to (the caller tells the clients to resync and calls [`Order::skip_to`]). With a
    /// cursor, past the gap; without one, to just before the first waiting event, since
    /// what came before it is unknown. `None`: nothing waits and no cursor was ever read;
    /// the fill ends, and the next event or check starts another.
    pub(super) fn give_up(&mut self) -> Option<u64> {
        match (self.cursor, self.pending.first_key_value()) {
            (Some(_), _) => Some(self.target()),
            (None, Some((&first, _))) => Some(first - 1),
            (None, None) => {
                self.filling = false;
                None
            }
        }
    }

    /// What a replaying client that has everything up to `from` must do next.
    pub(super) fn replay_step(&self, from: u64) -> ReplayStep {
        match self.cursor {
            Some(cursor) if cursor == from => ReplayStep::CaughtUp,
            Some(cursor) if cursor > from && cursor - from > self.replay_max => {
                ReplayStep::TooFar { latest: cursor }
            }
            Some(cursor) if cursor > from => ReplayStep::Read { from, to: cursor },
            _ => ReplayStep::Wait,
        }
    }

    fn deliver(&mut self, msg: Message, out: &mut Vec<Message>) {
        self.cursor = msg.seq;
        out.push(msg);
    }

    /// Delivers the waiting events that now follow the cursor; drops those behind it.
    fn drain(&mut self, out: &mut Vec<Message>) {
        let Some(mut cursor) = self.cursor else {
            return;
        };
        while let Some(entry) = self.pending.first_entry() {
            let seq = *entry.key();
            if seq <= cursor {
                entry.remove();
            } else if seq == cursor + 1 {
                out.push(entry.remove());
                self.cursor = Some(seq);
                cursor = seq;
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{EventName, OrgId};
    use serde_json::value::RawValue;

    fn event(seq: u64) -> Message {
        Message {
            org: OrgId::parse("acme").unwrap(),
            event: EventName::parse("execution-log").unwrap(),
            data: RawValue::from_string(seq.to_string()).unwrap(),
            ts_ms: None,
            user: None,
            via_ingest: true,
            seq: Some(seq),
            sig: None,
            stamp: None,
        }
    }

    fn seqs(out: &[Message]) -> Vec<u64> {
        out.iter().map(|m| m.seq.unwrap()).collect()
    }

    #[test]
    fn in_order_events_go_straight_through() {
        let mut order = Order::new(1000);
        let mut out = Vec::new();
        assert_eq!(order.fill_step(&mut out), FillStep::Init);
        order.init(0, &mut out);
        assert_eq!(order.fill_step(&mut out), FillStep::Done);
        for seq in 1..=3 {
            assert!(!order.arrive(event(seq), &mut out));
        }
        assert_eq!(seqs(&out), [1, 2, 3]);
        assert_eq!(order.cursor(), Some(3));
        // Twice, or read back: dropped.
        assert!(!order.arrive(event(2), &mut out));
        assert_eq!(seqs(&out), [1, 2, 3]);
    }

    #[test]
    fn an_early_event_waits_for_the_gap_to_be_read() {
        let mut order = Order::new(1000);
        let mut out = Vec::new();
        order.fill_step(&mut out);
        order.init(4, &mut out);
        order.fill_step(&mut out);
        assert!(order.arrive(event(7), &mut out), "a fill starts");
        assert!(!order.arrive(event(8), &mut out), "one fill at a time");
        assert!(out.is_empty());
        assert_eq!(order.fill_step(&mut out), FillStep::Read { from: 4, to: 6 });
        assert_eq!(order.filled(vec![event(5), event(6)], &mut out), 2);
        assert_eq!(order.fill_step(&mut out), FillStep::Done);
        assert_eq!(seqs(&out), [5, 6, 7, 8]);
    }

    #[test]
    fn the_first_cursor_keeps_what_arrived_since_sockets_joined() {
        let mut order = Order::new(1000);
        let mut out = Vec::new();
        assert!(
            !order.arrive(event(11), &mut out),
            "the first fill runs already"
        );
        assert_eq!(order.fill_step(&mut out), FillStep::Init);
        order.init(12, &mut out);
        assert_eq!(order.cursor(), Some(11));
        assert_eq!(seqs(&out), [11]);
        assert_eq!(
            order.fill_step(&mut out),
            FillStep::Read { from: 11, to: 12 }
        );
    }

    #[test]
    fn too_far_behind_skips_and_numbers_never_given_out_are_dropped() {
        let mut order = Order::new(10);
        let mut out = Vec::new();
        order.fill_step(&mut out);
        order.init(0, &mut out);
        order.fill_step(&mut out);
        assert!(order.known(50));
        assert_eq!(order.fill_step(&mut out), FillStep::TooFar { to: 50 });
        assert_eq!(order.skip_to(50, &mut out), 0);
        assert_eq!(order.fill_step(&mut out), FillStep::Done);
        // Forged numbers ahead: the store has none of them.
        assert!(order.arrive(event(5_000_000), &mut out));
        assert_eq!(order.store_last(50), 1);
        assert_eq!(order.fill_step(&mut out), FillStep::Done);
        assert!(!order.arrive(event(51), &mut out));
        assert_eq!(seqs(&out), [51]);
    }

    #[test]
    fn without_the_store_the_first_waiting_event_starts_the_stream() {
        let mut order = Order::new(1000);
        let mut out = Vec::new();
        assert_eq!(order.give_up(), None, "nothing waits: the fill ends");
        assert!(order.arrive(event(8), &mut out));
        order.arrive(event(9), &mut out);
        assert_eq!(order.fill_step(&mut out), FillStep::Init);
        assert_eq!(order.give_up(), Some(7));
        assert_eq!(order.skip_to(7, &mut out), 0);
        assert_eq!(seqs(&out), [8, 9]);
        assert!(!order.arrive(event(11), &mut out), "the fill goes on");
        assert_eq!(
            order.fill_step(&mut out),
            FillStep::Read { from: 9, to: 10 }
        );
        assert_eq!(order.give_up(), Some(10));
    }

    #[test]
    fn replays_read_up_to_the_cursor_then_go_live() {
        let mut order = Order::new(100);
        let mut out = Vec::new();
        assert_eq!(order.replay_step(3), ReplayStep::Wait);
        order.fill_step(&mut out);
        order.init(10, &mut out);
        assert_eq!(order.replay_step(3), ReplayStep::Read { from: 3, to: 10 });
        assert_eq!(order.replay_step(10), ReplayStep::CaughtUp);
        assert_eq!(
            order.replay_step(12),
            ReplayStep::Wait,
            "the client is ahead"
        );
        order.skip_to(500, &mut out);
        assert_eq!(order.replay_step(3), ReplayStep::TooFar { latest: 500 });
    }

    /// A replica's view of a run, in every interleaving the seeds pick: events committed one
    /// by one, a bus that brings them in any order (and loses some), periodic checks of the
    /// store, fill steps (some failing, as while PostgreSQL is down, until a fill gives up),
    /// a small `replay_max` (so streams skip ahead), and clients joining at any moment,
    /// live or replaying from a `lastSeq`. Each client's received stream must be contiguous:
    /// every event after its start, once, in order, except spans it was told to resync
    /// over; and it must include every event committed after it joined (unless within such
    /// a span). At the end, once everything is committed and delivered, every
    /// client has reached the last event.
    mod interleavings {
        use super::*;
        use proptest::prelude::*;
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};

        /// What a client received: an event, or `resync-required` up to a sequence number.
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Got {
            Event(u64),
            Resync(u64),
        }

        struct Client {
            got: Vec<Got>,
            /// The first sequence number it is owed, when known at its join.
            start: Option<u64>,
            /// What was committed when it joined: it is owed every later event.
            committed_at_join: u64,
            /// A replaying client: what it has up to; `None` once live.
            replay: Option<u64>,
        }

        struct World {
            n: u64,
            committed: u64,
            /// Committed events the bus has not brought yet (some will never come).
            in_flight: Vec<u64>,
            store_up: bool,
            order: Order,
            fill_running: bool,
            clients: Vec<Client>,
            rng: rand::rngs::StdRng,
        }

        impl World {
            /// Delivered events go to the live clients (replaying ones are left out, as the
            /// replay room is by the broadcasts).
            fn emit(&mut self, out: &mut Vec<Message>) {
                for msg in out.drain(..) {
                    for c in self.clients.iter_mut().filter(|c| c.replay.is_none()) {
                        c.got.push(Got::Event(msg.seq.unwrap()));
                    }
                }
            }

            fn resync_live(&mut self, to: u64) {
                for c in self.clients.iter_mut().filter(|c| c.replay.is_none()) {
                    c.got.push(Got::Resync(to));
                }
            }

            fn commit(&mut self, lose: bool) {
                if self.committed < self.n {
                    self.committed += 1;
                    if !lose {
                        self.in_flight.push(self.committed);
                    }
                }
            }

            fn bus(&mut self) {
                if self.in_flight.is_empty() {
                    return;
                }
                let i = self.rng.random_range(0..self.in_flight.len());
                let seq = self.in_flight.swap_remove(i);
                let mut out = Vec::new();
                if self.order.arrive(event(seq), &mut out) {
                    self.fill_running = true;
                }
                self.emit(&mut out);
            }

            fn check(&mut self) {
                if self.store_up && self.order.known(self.committed) {
                    self.fill_running = true;
                }
            }

            /// One fill step; a read fails while the store is down, and a failing fill
            /// gives up (as after `FILL_GIVE_UP`).
            fn fill_step(&mut self) {
                if !self.fill_running {
                    return;
                }
                let mut out = Vec::new();
                let step = self.order.fill_step(&mut out);
                self.emit(&mut out);
                match step {
                    FillStep::Done => self.fill_running = false,
                    FillStep::TooFar { to } => {
                        self.resync_live(to);
                        self.order.skip_to(to, &mut out);
                    }
                    _ if !self.store_up => match self.order.give_up() {
                        Some(to) => {
                            self.resync_live(to);
                            self.order.skip_to(to, &mut out);
                        }
                        None => self.fill_running = false,
                    },
                    FillStep::Init => {
                        if let Some(to) = self.order.init(self.committed, &mut out) {
                            self.resync_live(to);
                            self.order.skip_to(to, &mut out);
                        }
                    }
                    FillStep::Read { from, to } => {
                        let events = (from + 1..=to.min(self.committed)).map(event).collect();
                        self.order.filled(events, &mut out);
                    }
                }
                self.emit(&mut out);
            }

            fn join(&mut self, replay_from: Option<u8>) {
                // `join` waits for the first cursor, unless the store cannot be reached.
                while self.order.cursor().is_none() && self.fill_running && self.store_up {
                    self.fill_step();
                }
                self.order.joined();
                let cursor = self.order.cursor();
                let replay = match (replay_from, cursor) {
                    (Some(f), Some(_)) => Some(f as u64 * self.committed / 100),
                    _ => None,
                };
                self.clients.push(Client {
                    got: Vec::new(),
                    start: replay.or(cursor).map(|s| s + 1),
                    committed_at_join: self.committed,
                    replay,
                });
            }

            fn replay(&mut self, i: usize) {
                let Some(from) = self.clients[i].replay else {
                    return;
                };
                let client = &mut self.clients[i];
                match self.order.replay_step(from) {
                    ReplayStep::CaughtUp => client.replay = None,
                    ReplayStep::Read { from, to } => {
                        client.got.extend((from + 1..=to).map(Got::Event));
                        client.replay = Some(to);
                    }
                    ReplayStep::TooFar { latest } => {
                        client.got.push(Got::Resync(latest));
                        client.replay = None;
                    }
                    ReplayStep::Wait => {}
                }
            }
        }

        #[derive(Debug, Clone)]
        enum Action {
            Commit { lose: bool },
            Bus,
            Check,
            Fill,
            StoreDown,
            StoreUp,
            Join { replay_from: Option<u8> },
            Replay(u8),
        }

        fn action() -> impl Strategy<Value = Action> {
            prop_oneof![
                5 => prop::bool::weighted(0.1).prop_map(|lose| Action::Commit { lose }),
                5 => Just(Action::Bus),
                1 => Just(Action::Check),
                4 => Just(Action::Fill),
                1 => Just(Action::StoreDown),
                2 => Just(Action::StoreUp),
                1 => proptest::option::of(0u8..=100).prop_map(|r| Action::Join { replay_from: r }),
                3 => any::<u8>().prop_map(Action::Replay),
            ]
        }

        /// Walks a client's stream: contiguous from its start, each event once, resyncs
        /// jumping ahead; returns the events it was owed but not given (resync spans).
        fn check_client(c: &Client, n: u64) -> Result<(), String> {
            let mut next = c.start;
            let mut skipped = std::collections::BTreeSet::new();
            for got in &c.got {
                match *got {
                    Got::Event(seq) => {
                        if next.is_some_and(|next| seq != next) {
                            return Err(format!("expected {next:?}, got {seq}: {:?}", c.got));
                        }
                        next = Some(seq + 1);
                    }
                    Got::Resync(to) => {
                        let from = next.unwrap_or(1);
                        if to + 1 < from {
                            return Err(format!("resync backwards to {to}: {:?}", c.got));
                        }
                        skipped.extend(from..=to);
                        next = Some(to + 1);
                    }
                }
            }
            if next.is_some_and(|next| next != n + 1) || (next.is_none() && c.start.is_some()) {
                return Err(format!("ended at {next:?}, not {}: {:?}", n + 1, c.got));
            }
            let received: std::collections::BTreeSet<u64> = c
                .got
                .iter()
                .filter_map(|g| match g {
                    Got::Event(s) => Some(*s),
                    Got::Resync(_) => None,
                })
                .collect();
            for seq in c.committed_at_join + 1..=n {
                if !received.contains(&seq) && !skipped.contains(&seq) {
                    return Err(format!(
                        "{seq}, committed after the join, is missing: {:?}",
                        c.got
                    ));
                }
            }
            Ok(())
        }

        proptest! {
            // Failures are reported with their minimal input; nothing is written to disk.
            #![proptest_config(ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::with_cases(1000)
            })]
            #[test]
            fn every_client_gets_every_event_once_in_order_or_a_resync(
                n in 1u64..40,
                replay_max in 3u64..60,
                seed in any::<u64>(),
                actions in proptest::collection::vec(action(), 1..250),
            ) {
                let mut world = World {
                    n,
                    committed: 0,
                    in_flight: Vec::new(),
                    store_up: true,
                    order: Order::new(replay_max),
                    fill_running: true,
                    clients: Vec::new(),
                    rng: rand::rngs::StdRng::seed_from_u64(seed),
                };
                for action in actions {
                    match action {
                        Action::Commit { lose } => world.commit(lose),
                        Action::Bus => world.bus(),
                        Action::Check => world.check(),
                        Action::Fill => world.fill_step(),
                        Action::StoreDown => world.store_up = false,
                        Action::StoreUp => world.store_up = true,
                        Action::Join { replay_from } => world.join(replay_from),
                        Action::Replay(i) if !world.clients.is_empty() => {
                            let i = i as usize % world.clients.len();
                            world.replay(i);
                        }
                        Action::Replay(_) => {}
                    }
                }
                // The end: everything committed and brought, the store up, fills and
                // replays run to completion.
                world.store_up = true;
                while world.committed < n {
                    world.commit(false);
                }
                world.in_flight.shuffle(&mut world.rng);
                while !world.in_flight.is_empty() {
                    world.bus();
                }
                world.check();
                while world.fill_running {
                    world.fill_step();
                }
                for i in 0..world.clients.len() {
                    while world.clients[i].replay.is_some() {
                        world.replay(i);
                    }
                }
                prop_assert_eq!(world.order.cursor(), Some(n));
                for c in &world.clients {
                    if let Err(e) = check_client(c, n) {
                        return Err(TestCaseError::fail(e));
                    }
                }
            }
        }
    }
}
