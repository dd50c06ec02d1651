//! What arrives on an organization's channel, whichever Redis it comes from: a message for
//! the sink, or something dropped, counted and logged at a limited rate.

use std::sync::Arc;
use std::time::Duration;

use super::Sink;
use super::gaps::Gaps;
use crate::ops::metrics;
use crate::protocol::{ENVELOPE_OVERHEAD, Message, OrgId};
use crate::retry::RateLimit;

/// Reads the envelopes of one subscription connection.
pub struct Inbound {
    /// `{prefix}org:`: what a channel name starts with, before its organization id.
    org_prefix: String,
    max_payload: usize,
    sink: Arc<dyn Sink>,
    gaps: Arc<Gaps>,
    warn: RateLimit,
}

impl Inbound {
    /// `max_payload`: `FANOUT_MAX_PAYLOAD_BYTES`, the largest ingest body; envelopes may be
    /// larger by what fanout's own envelope adds to a body.
    pub fn new(prefix: &str, max_payload: usize, sink: Arc<dyn Sink>, gaps: Arc<Gaps>) -> Self {
        Self {
            org_prefix: format!("{prefix}org:"),
            max_payload: max_payload + ENVELOPE_OVERHEAD,
            sink,
            gaps,
            warn: RateLimit::new(Duration::from_secs(10)),
        }
    }

    /// Hands the envelope `payload`, received on `channel`, to the sink.
    pub async fn receive(&mut self, channel: &str, payload: &[u8]) {
        let Some(org) = channel
            .strip_prefix(self.org_prefix.as_str())
            .and_then(|id| OrgId::parse(id).ok())
        else {
            ::metrics::counter!(metrics::MALFORMED, "reason" => "bad_channel").increment(1);
            if let Some(suppressed) = self.warn.check() {
                tracing::warn!(
                    suppressed_since_last = suppressed,
                    "message on unexpected channel {channel:?} dropped"
                );
            }
            return;
        };
        match Message::from_envelope(org, payload, self.max_payload) {
            Ok(message) => {
                // A publish the Redis client retried across a failover can arrive twice:
                // the second copy is counted and dropped (bus/gaps.rs).
                if let Some(stamp) = message.stamp
                    && self.gaps.receive(&message.org, stamp)
                {
                    return;
                }
                if !message.via_ingest {
                    ::metrics::counter!(metrics::PUBLISHED, "source" => "redis").increment(1);
                }
                self.sink.clone().deliver(message).await;
            }
            Err(e) => {
                ::metrics::counter!(metrics::MALFORMED, "reason" => e.reason()).increment(1);
                if let Some(suppressed) = self.warn.check() {
                    tracing::warn!(
                        suppressed_since_last = suppressed,
                        "malformed message on {channel:?} dropped: {e}"
                    );
                }
            }
        }
    }
}
