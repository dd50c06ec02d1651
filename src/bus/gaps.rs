//! Counting what this replica's subscriptions missed of other replicas' publishes.
//!
//! A replica cannot see another replica's subscriptions, so when a subscription is lost (a
//! failover, a killed connection, a slot that moved) the replicas that published meanwhile
//! are answered 200 for messages this one never received. Each replica numbers its
//! ephemeral publishes per organization ([`Stamps`]); each subscriber follows every
//! publisher's numbering for the organizations it holds ([`Gaps`]) and counts the numbers
//! that never arrive in `fanout_bus_missed_total`.
//!
//! Two things make the numbering less than exact, and both are resolved toward counting
//! less, never more:
//! - publishes go out on several connections at once, so numbers may arrive out of order:
//!   a number is counted missed only when it has not arrived [`REORDER_GRACE`] after a later
//!   one did, or [`WINDOW`] numbers later;
//! - a publish that failed may or may not have reached Redis: the publisher starts a new
//!   epoch (numbering again from 1), and nothing is counted across epochs, except numbers
//!   of the new epoch below the first one seen.
//!
//! A number that arrives a second time is one publish delivered twice: the Redis client
//! retries a command whose connection broke (a master failing over), and the first attempt
//! may have reached the subscribers already. The stamp names the publish, so the second
//! arrival is counted in `fanout_bus_duplicates_total` and dropped, never delivered again.
//!
//! An organization that this replica stops holding is forgotten: what is published while
//! nobody here listens is not missed. A subscriber still reading a message from before an
//! organization left and came back can take it for the new subscription's first; the cost
//! is a miscount in that rare case, never a lost or duplicated delivery.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ops::metrics;
use crate::protocol::{OrgId, Stamp};

/// How long a later number may arrive before an earlier one, on different connections.
pub const REORDER_GRACE: Duration = Duration::from_secs(1);
/// How many numbers behind the highest one arrived are still awaited.
const WINDOW: u64 = 64;
/// A publisher not heard from for an organization in this long is forgotten (it was a
/// replica that went away, most often).
const IDLE: Duration = Duration::from_secs(600);

/// This replica's numbering of its ephemeral publishes, per organization.
pub struct Stamps {
    origin: u64,
    next: Mutex<HashMap<OrgId, (u32, u64)>>,
}

impl Stamps {
    pub fn new() -> Self {
        Self {
            origin: rand::random(),
            next: Mutex::new(HashMap::new()),
        }
    }

    /// The stamp of the next message published for `org`.
    pub fn next(&self, org: &OrgId) -> Stamp {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let (epoch, n) = match next.get_mut(org) {
            Some(slot) => {
                slot.1 += 1;
                *slot
            }
            None => *next.entry(org.clone()).or_insert((0, 1)),
        };
        Stamp {
            origin: self.origin,
            epoch,
            n,
        }
    }

    /// The publish of `stamp` failed: whether it reached Redis is unknown, so the next
    /// publish for its organization starts a new epoch.
    pub fn failed(&self, org: &OrgId, stamp: Stamp) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = next.get_mut(org)
            && slot.0 == stamp.epoch
        {
            *slot = (stamp.epoch.wrapping_add(1), 0);
        }
    }
}

/// Every publisher's numbering, as this replica's subscriptions received it, for the
/// organizations it holds.
#[derive(Default)]
pub struct Gaps {
    orgs: Mutex<HashMap<OrgId, HashMap<u64, Stream>>>,
}

/// One publisher's numbering for one organization, as received.
#[derive(Debug)]
struct Stream {
    epoch: u32,
    /// The highest number received in this epoch.
    high: u64,
    /// Bit `i`: number `high - i` was received.
    seen: u64,
    /// Bit `i`: number `high - i` is awaited (a later one arrived before it).
    awaited: u64,
    /// `high` when the awaited numbers were last settled: those at or below it have been
    /// awaited since at least then.
    mark: u64,
    settled: Instant,
    last: Instant,
}

/// What [`Stream::receive`] found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Found {
    /// Numbers now given up on.
    missed: u64,
    duplicate: bool,
}

impl Stream {
    /// The first message seen of a publisher: nothing before it is awaited.
    fn first(stamp: Stamp, now: Instant) -> Self {
        Self {
            epoch: stamp.epoch,
            high: stamp.n,
            seen: 1,
            awaited: 0,
            mark: stamp.n,
            settled: now,
            last: now,
        }
    }

    fn receive(&mut self, stamp: Stamp, now: Instant) -> Found {
        let mut found = Found::default();
        self.last = now;
        if stamp.epoch != self.epoch {
            // Epochs only grow (wrapping): an older one is a late arrival of what was
            // already given up on.
            if stamp.epoch.wrapping_sub(self.epoch) > u32::MAX / 2 {
                return found;
            }
            // A new epoch: what was awaited of the old one is ambiguous (its publisher
            // failed a publish), dropped uncounted. Every number of the new one below
            // this is awaited.
            self.epoch = stamp.epoch;
            (self.high, self.seen, self.awaited, self.mark) = (0, 0, 0, 0);
        }
        if stamp.n > self.high {
            let shift = stamp.n - self.high;
            // Numbers between the old high and this one are now awaited; awaited numbers
            // pushed out of the window, and any that never fit in it, are given up on.
            if shift >= WINDOW {
                found.missed += u64::from(self.awaited.count_ones()) + (shift - WINDOW);
                self.seen = 1;
                self.awaited = !1;
            } else {
                found.missed += u64::from((self.awaited >> (WINDOW - shift)).count_ones());
                self.seen = (self.seen << shift) | 1;
                self.awaited = (self.awaited << shift) | (((1u64 << shift) - 1) & !1);
            }
            self.high = stamp.n;
        } else {
            let behind = self.high - stamp.n;
            if behind < WINDOW {
                let bit = 1u64 << behind;
                if self.awaited & bit != 0 {
                    self.awaited &= !bit;
                    self.seen |= bit;
                } else if self.seen & bit != 0 {
                    found.duplicate = true;
                }
                // Otherwise it was given up on already, or is older than the first seen.
            }
        }
        found.missed += self.settle(now);
        found
    }

    /// Gives up on the numbers awaited for at least [`REORDER_GRACE`]: those at or below
    /// the mark of the last settling, if it was that long ago. Answers how many.
    fn settle(&mut self, now: Instant) -> u64 {
        if now.duration_since(self.settled) < REORDER_GRACE {
            return 0;
        }
        let since = self.high - self.mark.min(self.high);
        let old = if since >= WINDOW { 0 } else { !0u64 << since };
        let missed = u64::from((self.awaited & old).count_ones());
        self.awaited &= !old;
        (self.mark, self.settled) = (self.high, now);
        missed
    }
}

impl Gaps {
    /// A message of `org` with `stamp` arrived on a subscription. `true`: that publish
    /// arrived before, and this copy must not be delivered.
    pub fn receive(&self, org: &OrgId, stamp: Stamp) -> bool {
        self.receive_at(org, stamp, Instant::now())
    }

    fn receive_at(&self, org: &OrgId, stamp: Stamp, now: Instant) -> bool {
        let found = {
            let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
            let streams = match orgs.get_mut(org) {
                Some(streams) => streams,
                None => orgs.entry(org.clone()).or_default(),
            };
            match streams.get_mut(&stamp.origin) {
                Some(stream) => stream.receive(stamp, now),
                None => {
                    streams.insert(stamp.origin, Stream::first(stamp, now));
                    Found::default()
                }
            }
        };
        count(found.missed);
        if found.duplicate {
            ::metrics::counter!(metrics::BUS_DUPLICATES).increment(1);
        }
        found.duplicate
    }

    /// Counts the numbers awaited for longer than [`REORDER_GRACE`], and forgets
    /// publishers idle for long. Called every probe interval by the subscription task.
    pub fn settle(&self) {
        self.settle_at(Instant::now());
    }

    fn settle_at(&self, now: Instant) {
        let mut missed = 0;
        {
            let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
            orgs.retain(|_, streams| {
                streams.retain(|_, stream| {
                    missed += stream.settle(now);
                    now.duration_since(stream.last) < IDLE
                });
                !streams.is_empty()
            });
        }
        count(missed);
    }

    /// This replica no longer holds `org`: what is published for it is not missed here.
    pub fn forget(&self, org: &OrgId) {
        self.orgs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(org);
    }
}

fn count(missed: u64) {
    if missed > 0 {
        ::metrics::counter!(metrics::BUS_MISSED).increment(missed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp(epoch: u32, n: u64) -> Stamp {
        Stamp {
            origin: 7,
            epoch,
            n,
        }
    }

    /// Feeds `arrivals` (epoch, n, ms since start) to one stream, then settles long after;
    /// answers (missed, duplicates).
    fn run(arrivals: &[(u32, u64, u64)]) -> (u64, u64) {
        let start = Instant::now();
        let (first, rest) = arrivals.split_first().unwrap();
        let mut stream = Stream::first(stamp(first.0, first.1), start);
        let (mut missed, mut dups) = (0, 0);
        for &(epoch, n, ms) in rest {
            let found = stream.receive(stamp(epoch, n), start + Duration::from_millis(ms));
            missed += found.missed;
            dups += u64::from(found.duplicate);
        }
        missed += stream.settle(start + Duration::from_secs(3600));
        missed += stream.settle(start + Duration::from_secs(7200));
        (missed, dups)
    }

    #[test]
    fn in_order_misses_nothing() {
        let arrivals: Vec<_> = (5..500).map(|n| (0, n, n)).collect();
        assert_eq!(run(&arrivals), (0, 0));
    }

    #[test]
    fn a_gap_is_counted_once_settled() {
        assert_eq!(run(&[(0, 1, 0), (0, 2, 1), (0, 6, 2), (0, 7, 3)]), (3, 0));
        // Far beyond the window, and right at its edge.
        assert_eq!(run(&[(0, 1, 0), (0, 1000, 1)]), (998, 0));
        assert_eq!(run(&[(0, 1, 0), (0, 66, 1)]), (64, 0));
        assert_eq!(run(&[(0, 1, 0), (0, 65, 1)]), (63, 0));
    }

    #[test]
    fn late_arrivals_within_the_grace_are_not_missed() {
        assert_eq!(
            run(&[(0, 1, 0), (0, 3, 1), (0, 2, 500), (0, 4, 600)]),
            (0, 0)
        );
        assert_eq!(
            run(&[(0, 1, 0), (0, 3, 1), (0, 4, 1200), (0, 2, 1300)]),
            (0, 0)
        );
        // Awaited through a whole grace, the late one was given up on: counted, and not
        // taken back when it comes.
        assert_eq!(
            run(&[
                (0, 1, 0),
                (0, 3, 1),
                (0, 4, 1200),
                (0, 5, 2300),
                (0, 2, 2400)
            ]),
            (1, 0)
        );
    }

    #[test]
    fn duplicates_are_counted() {
        assert_eq!(run(&[(0, 1, 0), (0, 2, 1), (0, 2, 2), (0, 3, 3)]), (0, 1));
    }

    #[test]
    fn only_a_second_arrival_is_flagged_for_dropping() {
        let gaps = Gaps::default();
        let org = OrgId::parse("acme").unwrap();
        let now = Instant::now();
        let arrivals = [
            (1, false),
            (3, false),
            (2, false),
            (3, true),
            (1, true),
            (4, false),
        ];
        for (n, duplicate) in arrivals {
            assert_eq!(gaps.receive_at(&org, stamp(0, n), now), duplicate, "{n}");
        }
        // Another publisher's numbers, and another organization's, are their own.
        let other = Stamp {
            origin: 8,
            epoch: 0,
            n: 3,
        };
        assert!(!gaps.receive_at(&org, other, now));
        assert!(!gaps.receive_at(&OrgId::parse("globex").unwrap(), stamp(0, 3), now));
        // A number of a later epoch is a new publish.
        assert!(!gaps.receive_at(&org, stamp(1, 3), now));
    }

    #[test]
    fn a_new_epoch_counts_only_its_own_numbers_below_the_first_seen() {
        // Epoch 0 awaited 3 when the publisher failed: ambiguous, not counted. Epoch 1
        // starts at 4 here: 1..=3 of it were published and never arrived.
        assert_eq!(run(&[(0, 1, 0), (0, 2, 1), (0, 4, 2), (1, 4, 3)]), (3, 0));
        // An arrival of an older epoch is ignored.
        assert_eq!(run(&[(1, 1, 0), (1, 2, 1), (0, 9, 2), (1, 3, 3)]), (0, 0));
    }

    #[test]
    fn a_forgotten_org_starts_afresh_and_idle_publishers_go() {
        let gaps = Gaps::default();
        let org = OrgId::parse("acme").unwrap();
        let now = Instant::now();
        gaps.receive_at(&org, stamp(0, 1), now);
        gaps.forget(&org);
        gaps.receive_at(&org, stamp(0, 50), now);
        let held = |gaps: &Gaps| gaps.orgs.lock().unwrap()[&org][&7].high;
        assert_eq!(held(&gaps), 50);
        gaps.settle_at(now + IDLE);
        assert!(gaps.orgs.lock().unwrap().is_empty());
    }

    #[test]
    fn stamps_number_per_org_and_start_an_epoch_after_a_failure() {
        let stamps = Stamps::new();
        let (a, b) = (OrgId::parse("a").unwrap(), OrgId::parse("b").unwrap());
        let first = stamps.next(&a);
        assert_eq!((first.epoch, first.n), (0, 1));
        assert_eq!(stamps.next(&a).n, 2);
        assert_eq!(stamps.next(&b).n, 1);
        let third = stamps.next(&a);
        let fourth = stamps.next(&a);
        stamps.failed(&a, third);
        // A second failure of the same epoch does not start another one.
        stamps.failed(&a, fourth);
        let next = stamps.next(&a);
        assert_eq!((next.epoch, next.n), (1, 1));
    }

    proptest! {
        /// Whatever the order of arrival within the grace, and whichever numbers are
        /// lost, exactly the lost ones are counted, and none twice.
        #[test]
        fn counts_exactly_the_lost_numbers(
            lost in proptest::collection::btree_set(2u64..300, 0..40),
            chunk in 1usize..40,
            turns in proptest::collection::vec(0usize..40, 1..300),
        ) {
            // Arrival order: the numbers in chunks, each chunk rotated, so none arrives
            // more than a chunk (less than the window) late.
            let mut order: Vec<u64> = (2..300).filter(|n| !lost.contains(n)).collect();
            for (piece, turn) in order.chunks_mut(chunk).zip(turns.iter().cycle()) {
                let len = piece.len();
                piece.rotate_left(turn % len);
            }
            let mut arrivals = vec![(0, 1, 0)];
            arrivals.extend(order.iter().map(|&n| (0, n, 1)));
            let (missed, dups) = run(&arrivals);
            // Numbers after the highest that arrived cannot be known to exist.
            let highest = order.iter().copied().max().unwrap_or(1);
            let expected = lost.iter().filter(|&&n| n < highest).count() as u64;
            prop_assert_eq!((missed, dups), (expected, 0));
        }
    }
}
