//! The budgets of the fair-use rate limits: one token bucket per key (governor's GCRA), with
//! a burst of one second's worth, then the rate.
//!
//! Ingest keys (`FANOUT_INGEST_RATE`), client hosts (`FANOUT_HANDSHAKE_RATE_PER_HOST`) and
//! REST users (`FANOUT_REST_RATE_PER_USER`) each get one of these. Everything over a budget
//! is refused with a `Retry-After` of the wait this computes ([`crate::retry::retry_after_secs`]),
//! never queued: a refusal costs the replica less than the work it refuses. Per replica, like
//! every limit here: behind a load balancer a key's fleet-wide budget is the rate times the
//! replicas it reaches.
//!
//! The keys seen lately are kept in a map; whoever sends many keys (a scan of addresses,
//! tokens of many users) only grows it until the next sweep, which forgets every key whose
//! budget is full again.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Sweep the map once per this many checks.
const SWEEP_EVERY: u64 = 4096;

pub struct Budgets<K: Hash + Eq + Clone> {
    per_second: NonZeroU32,
    limiter: DefaultKeyedRateLimiter<K>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> Budgets<K> {
    /// `per_second` per key, in bursts of up to one second's worth.
    pub fn new(per_second: NonZeroU32) -> Self {
        Self {
            per_second,
            limiter: RateLimiter::hashmap(Quota::per_second(per_second)),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    pub fn per_second(&self) -> u32 {
        self.per_second.get()
    }

    /// Takes one from `key`'s budget, or says how long until there is one.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Keys kept (those seen since the last sweep).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_a_budget_of_its_own() {
        let budgets = Budgets::new(NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            assert_eq!(budgets.check(&"a"), Ok(()));
        }
        let wait = budgets.check(&"a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(334),
            "{wait:?}"
        );
        assert_eq!(budgets.check(&"b"), Ok(()));
    }

    #[test]
    fn keys_whose_budget_is_full_again_are_forgotten() {
        let budgets = Budgets::new(NonZeroU32::new(1_000_000).unwrap());
        for n in 0..SWEEP_EVERY - 1 {
            budgets.check(&n).unwrap();
        }
        assert_eq!(budgets.len(), SWEEP_EVERY as usize - 1);
        // A microsecond per key: by the sweep, every one is full again.
        std::thread::sleep(Duration::from_millis(5));
        budgets.check(&u64::MAX).unwrap();
        assert!(budgets.len() <= 1, "{} keys kept", budgets.len());
    }
}
