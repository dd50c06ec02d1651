//! How every task that retries a peer waits and complains: capped exponential backoff with
//! jitter, and rate-limited warnings.
//!
//! The Redis subscriber, the store's migration and health probe, and retention all retry a
//! peer that may be down for a long time: [`Retry`] is that loop's one mechanism, so every
//! such loop backs off the same way, stops at shutdown, and no outage can flood the logs.
//! [`Backoff`] and [`RateLimit`] are its parts, for the places that need only one. And what
//! fanout tells a client it refused for a while: [`retry_after_secs`].

use std::fmt::Display;
use std::time::{Duration, Instant};

use crate::ops::shutdown::Shutdown;

/// Failures of one peer, retried: each failure waits a capped, jittered backoff (or ends at
/// shutdown) and is logged, as a warning at most once per period (with how many failed
/// meanwhile), else at debug level.
pub struct Retry {
    what: &'static str,
    backoff: Backoff,
    warn: RateLimit,
    failures: u64,
}

impl Retry {
    /// `what` names the operation in the log ("cannot {what}: ...; retrying").
    pub fn new(what: &'static str, min: Duration, max: Duration, warn_every: Duration) -> Self {
        Self {
            what,
            backoff: Backoff::new(min, max),
            warn: RateLimit::new(warn_every),
            failures: 0,
        }
    }

    /// Records a failure, logs it, and waits; `false` when shutdown came first.
    pub async fn failed(&mut self, error: impl Display, shutdown: &Shutdown) -> bool {
        self.failures += 1;
        let delay = self.backoff.next_delay();
        match self.warn.check() {
            Some(suppressed) => tracing::warn!(
                failures = self.failures,
                suppressed_since_last = suppressed,
                "cannot {}: {error}; retrying in {delay:?}",
                self.what
            ),
            None => tracing::debug!("cannot {}: {error}; retrying in {delay:?}", self.what),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.wait() => false,
        }
    }

    /// Records a success: the next failure waits the shortest backoff again. Returns how
    /// many failures came before it.
    pub fn succeeded(&mut self) -> u64 {
        self.backoff.reset();
        std::mem::take(&mut self.failures)
    }
}

/// Capped exponential backoff with "equal jitter": half of each step fixed, half random,
/// so replicas that lost a peer together do not retry in lockstep.
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            attempt: 0,
        }
    }

    /// Starts again from `min` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Retries so far since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let step = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt += 1;
        let half = step / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// Allows one event per period and counts the ones it held back.
pub struct RateLimit {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(held back since the last allowed one)` when this one may be logged.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.period)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A `Retry-After` header's value for a wait: whole seconds, rounded up, at least 1 (a
/// client told 0 would retry at once).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    whole.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let first = b.next_delay();
        assert!(first >= min / 2 && first <= min, "{first:?}");
        for _ in 0..30 {
            let d = b.next_delay();
            assert!(d <= max, "{d:?}");
        }
        let late: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(late.iter().all(|d| *d >= max / 2));
        assert!(
            late.iter().any(|d| *d != late[0]),
            "jitter varies the delay"
        );
        assert_eq!(b.attempt(), 51);
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn one_event_per_period_and_a_count_of_the_rest() {
        let mut limit = RateLimit::new(Duration::from_secs(60));
        assert_eq!(limit.check(), Some(0));
        for _ in 0..99 {
            assert_eq!(limit.check(), None);
        }
        limit.last = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(limit.check(), Some(99));
    }
}
