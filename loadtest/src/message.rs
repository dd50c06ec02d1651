//! The one message body every system is fed, and the little parsing a client does of it.
//!
//! A body names its organization (so a client can tell a delivery meant for another one:
//! an isolation failure), its publisher, the step it belongs to, a per-organization sequence
//! number (so loss and duplicates are counted exactly), and its send time in microseconds
//! (so latency needs no bookkeeping at the publisher). It is padded to a fixed size.
//! Clients parse it with borrowed fields only: no allocation per delivery.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// The Socket.IO event every system emits for a published body.
pub const EVENT: &str = "execution-updated";

/// Microseconds since the Unix epoch: comparable between publisher and clients, which
/// share the machine's clock.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The name of organization `index`.
pub fn org_name(index: usize) -> String {
    format!("org-{index}")
}

/// The fields a client checks.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Body<'a> {
    #[serde(rename = "organizationId")]
    pub org: &'a str,
    /// Step index.
    pub k: u32,
    /// Sequence number within the organization, from 0 for the whole run.
    pub s: u64,
    /// Send time, µs since the epoch.
    pub t: u64,
}

pub fn parse_body(bytes: &[u8]) -> Option<Body<'_>> {
    serde_json::from_slice(bytes).ok()
}

/// The body of a Socket.IO `execution-updated` event frame, without parsing it, and the
/// sequence number of a durable event, which fanout sends as a third element:
/// `42["execution-updated",{..}]` or `42["execution-updated",{..},{"seq":N}]`.
///
/// The split is unambiguous because the body is a JSON object: an object cannot end with
/// `,{"seq":N}`, so that suffix can only be the third element.
pub fn socketio_event(frame: &str) -> Option<(&str, Option<u64>)> {
    let inner = frame
        .strip_prefix("42[\"execution-updated\",")?
        .strip_suffix(']')?;
    const META: &str = ",{\"seq\":";
    if let Some(cut) = inner.rfind(META)
        && let Some(digits) = inner[cut + META.len()..].strip_suffix('}')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(seq) = digits.parse()
    {
        return Some((&inner[..cut], Some(seq)));
    }
    Some((inner, None))
}

/// Writes bodies of a fixed size into one reused buffer.
pub struct BodyWriter {
    size: usize,
    buf: String,
}

impl BodyWriter {
    /// Bodies of `size` bytes (or the unpadded minimum, ~130 bytes, if larger).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            buf: String::with_capacity(size.max(256)),
        }
    }

    pub fn write(
        &mut self,
        org: &str,
        publisher: usize,
        step: u32,
        seq: u64,
        sent_us: u64,
    ) -> &str {
        self.buf.clear();
        let _ = write!(
            self.buf,
            r#"{{"organizationId":"{org}","taskId":"t-{publisher}-{seq}","status":"RUNNING","p":{publisher},"k":{step},"s":{seq},"t":{sent_us},"pad":""#
        );
        let pad = self.size.saturating_sub(self.buf.len() + 2);
        self.buf.extend(std::iter::repeat_n('x', pad));
        self.buf.push_str("\"}");
        &self.buf
    }
}

/// The Redis envelope fanout's subscribers accept for `body`.
pub fn redis_envelope(out: &mut String, body: &str, ts_ms: u64) {
    out.clear();
    let _ = write!(out, r#"{{"event":"{EVENT}","data":{body},"ts":{ts_ms}}}"#);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_requested_size_and_parse_back() {
        let mut w = BodyWriter::new(200);
        let body = w
            .write("org-17", 3, 2, 12345, 1_764_150_000_000_000)
            .to_string();
        assert_eq!(body.len(), 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["organizationId"], "org-17");
        assert_eq!(v["status"], "RUNNING");
        assert_eq!(
            parse_body(body.as_bytes()).unwrap(),
            Body {
                org: "org-17",
                k: 2,
                s: 12345,
                t: 1_764_150_000_000_000
            }
        );
        // Too small a size: no padding, still valid.
        let small = BodyWriter::new(10).write("o", 0, 0, 0, 0).to_string();
        assert!(parse_body(small.as_bytes()).is_some());
    }

    #[test]
    fn socketio_frames_give_their_body_and_seq() {
        assert_eq!(
            socketio_event(r#"42["execution-updated",{"a":1}]"#),
            Some((r#"{"a":1}"#, None))
        );
        assert_eq!(
            socketio_event(r#"42["execution-updated",{"a":1},{"seq":42}]"#),
            Some((r#"{"a":1}"#, Some(42)))
        );
        // A body that merely contains the marker keeps it.
        assert_eq!(
            socketio_event(r#"42["execution-updated",{"a":[0,{"seq":5}]}]"#),
            Some((r#"{"a":[0,{"seq":5}]}"#, None))
        );
        assert_eq!(socketio_event(r#"42["auth-success",{"a":1}]"#), None);
        assert_eq!(socketio_event("2"), None);
    }

    #[test]
    fn envelopes_wrap_the_body() {
        let mut out = String::new();
        redis_envelope(&mut out, r#"{"a":1}"#, 7);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["event"], EVENT);
        assert_eq!(v["data"]["a"], 1);
        assert_eq!(v["ts"], 7);
    }
}
