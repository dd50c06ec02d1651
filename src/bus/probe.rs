//! The liveness probe both Redis buses send through their subscription connections: a
//! number published to a channel of the replica's own, expected back within one interval.
//! This holds the probe in flight and its metrics; each bus decides what a failure tears
//! down.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::ops::metrics;

/// Numbers of the probes, unique in the process: a probe of an earlier connection,
/// arriving late, is never taken for the current one.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// The probe in flight: its number, when it was sent, and whether Redis took it.
pub struct Probe {
    pub n: u64,
    sent: Instant,
    /// Redis answered the PUBLISH: from then on, not coming back means a dead subscription.
    pub published: bool,
}

impl Probe {
    /// The next probe, sent now.
    pub fn next() -> Self {
        Self {
            n: NEXT.fetch_add(1, Ordering::Relaxed),
            sent: Instant::now(),
            published: false,
        }
    }

    /// It came back: its round trip is recorded.
    pub fn back(self) {
        ::metrics::histogram!(metrics::BUS_PROBE_RTT).record(self.sent.elapsed().as_secs_f64());
    }
}

/// Counts a failed probe: `lost`, `not_subscribed` or `publish`.
pub fn failed(reason: &'static str) {
    ::metrics::counter!(metrics::BUS_PROBE_FAILURES, "reason" => reason).increment(1);
}
