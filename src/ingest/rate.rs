//! The ingest rate of each key (`FANOUT_INGEST_RATE`, messages per second).
//!
//! One worker in a loop (a retry storm, a runaway log stream) would otherwise take the bus's
//! and the history's capacity from every other worker and organization. Over its budget, a
//! key's requests are answered 429 with `Retry-After` (nothing of them was accepted, so a
//! retry cannot duplicate anything) and counted in `fanout_ingest_rate_limited_total{key}`.
//! Each key has its own token bucket (governor's GCRA): a burst of one second's worth, then
//! the rate. Per replica, like every limit here: behind a load balancer a key's fleet-wide
//! budget is the rate times the replicas it reaches.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::auth::KeyId;

pub struct KeyRates {
    per_second: NonZeroU32,
    /// One per key, in the keys' order (`KeyId` 1 is the first).
    limiters: Vec<DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl KeyRates {
    pub fn new(keys: usize, per_second: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second);
        Self {
            per_second,
            limiters: (0..keys).map(|_| RateLimiter::direct(quota)).collect(),
            clock: DefaultClock::default(),
        }
    }

    pub fn per_second(&self) -> u32 {
        self.per_second.get()
    }

    /// Takes one message from `key`'s budget, or says how long until there is one.
    pub fn check(&self, key: KeyId) -> Result<(), Duration> {
        let Some(limiter) = key.0.checked_sub(1).and_then(|i| self.limiters.get(i)) else {
            debug_assert!(false, "no limiter for ingest key {key}");
            return Ok(());
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_a_budget_of_its_own() {
        let rates = KeyRates::new(2, NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            assert_eq!(rates.check(KeyId(1)), Ok(()));
        }
        let wait = rates.check(KeyId(1)).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(334),
            "{wait:?}"
        );
        // The other key's budget is untouched.
        assert_eq!(rates.check(KeyId(2)), Ok(()));
    }
}
