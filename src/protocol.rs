//! The wire contract: identifiers, event names and the bus envelope.
//!
//! Everything that crosses a boundary (a JWT claim, an ingest body, a Redis message) is
//! validated here into a small typed value, so the rest of the code never handles a raw
//! string that could name the wrong room. `docs/protocol.md` is the prose version of this
//! module; keep the two in step.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest organization id accepted.
pub const MAX_ORG_ID_LEN: usize = 128;
/// Longest user id accepted.
pub const MAX_USER_ID_LEN: usize = 256;
/// Longest event name accepted.
pub const MAX_EVENT_LEN: usize = 64;

/// Event names that Socket.IO or its clients reserve: emitting them would confuse the client.
const RESERVED_EVENTS: &[&str] = &[
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// Why an identifier or event name was refused. The message names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("is missing")]
    Missing,
    #[error("must be a string or a non-negative integer")]
    WrongType,
    #[error("must not be empty")]
    Empty,
    #[error("is longer than {0} characters")]
    TooLong(usize),
    #[error("may only contain {0}")]
    BadChars(&'static str),
    #[error("is reserved ({0})")]
    Reserved(&'static str),
}

/// An organization id: 1-128 characters of `[A-Za-z0-9._-]`.
///
/// The colon is excluded on purpose: room and channel names are built as `org:{id}` and
/// `user:{org}:{user}`, and a colon in the org id would let two pairs share a room name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgId(Arc<str>);

/// A user id: 1-256 characters, no control characters. Unique only within its organization.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(Arc<str>);

/// A server-to-client event name: 1-64 characters of `[A-Za-z0-9._:-]`, not reserved.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventName(Arc<str>);

/// Ids arrive as JSON strings or integers (some backends use numeric ids); both normalise
/// to the decimal string form.
fn id_text(value: &serde_json::Value) -> Result<String, InvalidId> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) if n.is_u64() => Ok(n.to_string()),
        serde_json::Value::Null => Err(InvalidId::Missing),
        _ => Err(InvalidId::WrongType),
    }
}

impl OrgId {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId::Empty);
        }
        if s.len() > MAX_ORG_ID_LEN {
            return Err(InvalidId::TooLong(MAX_ORG_ID_LEN));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(InvalidId::BadChars("letters, digits, '.', '_' and '-'"));
        }
        Ok(Self(s.into()))
    }

    pub fn from_json(value: &serde_json::Value) -> Result<Self, InvalidId> {
        Self::parse(&id_text(value)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Socket.IO room every authenticated socket of this organization joins.
    pub fn room(&self) -> String {
        format!("org:{}", self.0)
    }
}

impl UserId {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId::Empty);
        }
        if s.chars().count() > MAX_USER_ID_LEN {
            return Err(InvalidId::TooLong(MAX_USER_ID_LEN));
        }
        if s.chars().any(char::is_control) {
            return Err(InvalidId::BadChars("printable characters"));
        }
        Ok(Self(s.into()))
    }

    pub fn from_json(value: &serde_json::Value) -> Result<Self, InvalidId> {
        Self::parse(&id_text(value)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A task (execution) id: the same rules as a user id, since the REST API addresses
/// executions by it and PostgreSQL stores it as text (which cannot hold a NUL).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TaskId(Arc<str>);

impl TaskId {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        UserId::parse(s).map(|id| Self(id.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The room of one user's sockets within one organization.
pub fn user_room(org: &OrgId, user: &UserId) -> String {
    format!("user:{}:{}", org.0, user.0)
}

impl EventName {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId::Empty);
        }
        if s.len() > MAX_EVENT_LEN {
            return Err(InvalidId::TooLong(MAX_EVENT_LEN));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(InvalidId::BadChars(
                "letters, digits, '.', '_', ':' and '-'",
            ));
        }
        // Case-insensitively: a dashboard that lowercases event names must not mistake one.
        if RESERVED_EVENTS.iter().any(|r| r.eq_ignore_ascii_case(s)) {
            return Err(InvalidId::Reserved("a Socket.IO event"));
        }
        if s.len() >= 5 && s[..5].eq_ignore_ascii_case("auth-") {
            return Err(InvalidId::Reserved("auth-* events come from fanout only"));
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    )*};
}
display_as_str!(OrgId, UserId, EventName, TaskId);

/// One message for the sockets of an organization (or of one user in it).
///
/// `data` stays raw JSON from the moment it is accepted until Socket.IO encodes it, so a
/// message is parsed once and never re-serialised on its way through the bus.
#[derive(Debug, Clone)]
pub struct Message {
    pub org: OrgId,
    pub event: EventName,
    pub data: Box<RawValue>,
    /// Publish time in milliseconds since the Unix epoch, for the latency metric.
    pub ts_ms: Option<u64>,
    /// When set, only this user's sockets in `org` receive the message.
    pub user: Option<UserId>,
    /// Whether the message entered through this service's HTTP ingest (vs. a direct
    /// Redis PUBLISH by a worker). Only used to label metrics.
    pub via_ingest: bool,
    /// The organization-wide sequence number of a durable event (committed to the history
    /// before it was published); `None` for ephemeral messages.
    pub seq: Option<u64>,
    /// A durable event's signature by the replica that committed it (see [`BusKey`]).
    pub sig: Option<Signature>,
    /// Which replica published an ephemeral message, and its place in that replica's
    /// numbering for the organization: how a subscriber counts what it missed.
    pub stamp: Option<Stamp>,
}

/// A replica's number on an ephemeral message it published: `origin` is the replica (drawn
/// at random when it starts), `epoch` starts again at each publish it failed, and `n` counts
/// the organization's messages from 1 within an epoch. A subscriber that sees `n` skip has
/// missed what lies between; after a failed publish, numbers in flight are ambiguous, so
/// a new epoch starts and nothing is counted across it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub origin: u64,
    pub epoch: u32,
    pub n: u64,
}

impl Stamp {
    /// `"{origin:016x}:{epoch}:{n}"`, as in the envelope's `"stamp"`.
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let (origin, epoch, n) = (parts.next()?, parts.next()?, parts.next()?);
        // One spelling per stamp: lowercase hex, decimal digits without sign or leading
        // zeros.
        let lower_hex = |t: &str| t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let decimal = |t: &str| {
            !t.is_empty()
                && t.bytes().all(|b| b.is_ascii_digit())
                && (t == "0" || !t.starts_with('0'))
        };
        if parts.next().is_some()
            || origin.len() != 16
            || !lower_hex(origin)
            || !decimal(epoch)
            || !decimal(n)
        {
            return None;
        }
        Some(Self {
            origin: u64::from_str_radix(origin, 16).ok()?,
            epoch: epoch.parse().ok()?,
            n: n.parse().ok().filter(|n| *n > 0)?,
        })
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}:{}", self.origin, self.epoch, self.n)
    }
}

/// Deepest nesting of arrays and objects accepted in a message, its body or envelope object
/// included: serde_json's own limit, which HTTP ingest meets when it parses a body, applied
/// to bus envelopes too.
pub const MAX_JSON_DEPTH: usize = 127;

/// The most an envelope fanout publishes adds to the ingest body it carries: the envelope's
/// own fields (`event`, `ts`, `src`, a durable event's `seq` and `sig`, an ephemeral one's
/// `stamp`) around a body that is all of `data` (`POST /executions/update`), 230 bytes at
/// their longest. Subscribers read envelopes up to `FANOUT_MAX_PAYLOAD_BYTES` plus this, so
/// that every body ingest accepts reaches them (the fuzz target `ingest_bodies` holds the
/// bound).
pub const ENVELOPE_OVERHEAD: usize = 256;

/// How deeply `json` nests arrays and objects. `json` must be valid JSON: brackets inside
/// strings are skipped, nothing else is checked.
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The key durable envelopes are signed with (HMAC-SHA256), shared by the replicas of one
/// history through the database (`bus_key`, made by migration 4).
///
/// Why: anyone who can PUBLISH to Redis can put an envelope on an organization's channel,
/// and a durable event's `seq` moves the receiving replica's cursor. Unsigned, one forged
/// `seq` far ahead would make the replica skip to it and then drop every real event below
/// it. A replica believes a `seq` only with a valid signature: only a replica that
/// committed the event to the database holding the key can make one.
#[derive(Clone)]
pub struct BusKey(Arc<[u8]>);

/// HMAC-SHA256 of an envelope's parts: written as 64 hex digits in `sig`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; 32]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.to_hex())
    }
}

impl Signature {
    fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl BusKey {
    /// A key of at least 32 bytes.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        (bytes.len() >= 32).then(|| Self(bytes.into()))
    }

    fn mac(&self, msg: &Message, seq: u64) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC takes keys of any length");
        // Length-prefixed parts: no two different envelopes have the same input.
        let user = msg.user.as_ref().map_or("", UserId::as_str);
        for part in [
            b"fanout-envelope-v1".as_slice(),
            msg.org.as_str().as_bytes(),
            msg.event.as_str().as_bytes(),
            &[u8::from(msg.user.is_some())],
            user.as_bytes(),
            &seq.to_be_bytes(),
            msg.data.get().as_bytes(),
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// Signs a durable event (one with a `seq`).
    pub fn sign(&self, msg: &Message) -> Option<Signature> {
        use hmac::Mac;
        let seq = msg.seq?;
        Some(Signature(self.mac(msg, seq).finalize().into_bytes().into()))
    }

    /// Whether `msg` carries a valid signature of its `seq` and content (compared in
    /// constant time).
    pub fn verify(&self, msg: &Message) -> bool {
        use hmac::Mac;
        match (msg.seq, msg.sig) {
            (Some(seq), Some(sig)) => self.mac(msg, seq).verify_slice(&sig.0).is_ok(),
            _ => false,
        }
    }
}

/// The second Socket.IO argument of a durable event: `socket.on(event, (data, meta) => ...)`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Meta {
    pub seq: u64,
}

/// Why a bus envelope was refused; the label of `fanout_malformed_messages_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("envelope is not a JSON object with \"event\" and \"data\": {0}")]
    Json(String),
    #[error("bad \"event\": {0}")]
    Event(InvalidId),
    #[error("bad \"userId\": {0}")]
    User(InvalidId),
    #[error("bad \"seq\": must be a positive integer")]
    Seq,
    #[error("bad \"sig\": must be 64 hex digits")]
    Sig,
    #[error("bad \"stamp\": must be \"{{16 hex digits}}:{{epoch}}:{{n > 0}}\"")]
    Stamp,
    #[error("envelope nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
}

impl EnvelopeError {
    /// A bounded label value for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Json(_) => "invalid_json",
            Self::Event(_) => "bad_event",
            Self::User(_) => "bad_user_id",
            Self::Seq => "bad_seq",
            Self::Sig => "bad_sig",
            Self::Stamp => "bad_stamp",
            Self::TooDeep => "too_deep",
        }
    }
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(borrow)]
    event: &'a RawValue,
    data: Box<RawValue>,
    #[serde(default)]
    ts: Option<f64>,
    #[serde(default, rename = "userId")]
    user_id: Option<serde_json::Value>,
    #[serde(default)]
    src: Option<&'a str>,
    #[serde(default)]
    seq: Option<serde_json::Value>,
    #[serde(default)]
    sig: Option<&'a str>,
    #[serde(default)]
    stamp: Option<&'a str>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    event: &'a str,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<u64>,
    #[serde(rename = "userId", skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    src: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stamp: Option<String>,
}

/// Marks envelopes written by fanout's own ingest, so that metrics can tell them from
/// workers' direct publishes.
const SRC_INGEST: &str = "http";

impl Message {
    /// Decodes a bus envelope (`{"event", "data", "ts"?, "userId"?, "seq"?, "sig"?,
    /// "stamp"?}`)
    /// received on `org`'s channel. The organization comes from the channel, never from the
    /// payload. A `seq` is decoded but not trusted here: see [`BusKey`].
    pub fn from_envelope(org: OrgId, payload: &[u8], limit: usize) -> Result<Self, EnvelopeError> {
        if payload.len() > limit {
            return Err(EnvelopeError::TooLarge {
                size: payload.len(),
                limit,
            });
        }
        // serde would also accept a JSON array as a struct, positionally: refuse it here.
        if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EnvelopeError::Json("not a JSON object".into()));
        }
        let env: EnvelopeIn<'_> =
            serde_json::from_slice(payload).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        let event: String = serde_json::from_str(env.event.get())
            .map_err(|_| EnvelopeError::Event(InvalidId::WrongType))?;
        let event = EventName::parse(&event).map_err(EnvelopeError::Event)?;
        let user = match env.user_id {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(UserId::from_json(&v).map_err(EnvelopeError::User)?),
        };
        let seq = match env.seq {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_u64().filter(|s| *s > 0).ok_or(EnvelopeError::Seq)?),
        };
        let sig = env
            .sig
            .map(|text| Signature::from_hex(text).ok_or(EnvelopeError::Sig))
            .transpose()?;
        let stamp = env
            .stamp
            .map(|text| Stamp::parse(text).ok_or(EnvelopeError::Stamp))
            .transpose()?;
        // The envelope object is a level, as the body object is for HTTP ingest.
        if json_depth(env.data.get()) + 1 > MAX_JSON_DEPTH {
            return Err(EnvelopeError::TooDeep);
        }
        // A negative, fractional or absurd `ts` is only a latency hint: ignore it.
        let ts_ms = env
            .ts
            .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e15)
            .map(|t| t as u64);
        Ok(Self {
            org,
            event,
            data: env.data,
            ts_ms,
            user,
            via_ingest: env.src == Some(SRC_INGEST),
            seq,
            sig,
            stamp,
        })
    }

    /// Encodes the envelope published on the organization's Redis channel.
    pub fn to_envelope(&self) -> Vec<u8> {
        let out = EnvelopeOut {
            event: self.event.as_str(),
            data: &self.data,
            ts: self.ts_ms,
            user_id: self.user.as_ref().map(UserId::as_str),
            src: self.via_ingest.then_some(SRC_INGEST),
            seq: self.seq,
            sig: self.sig.map(Signature::to_hex),
            stamp: self.stamp.map(|s| s.to_string()),
        };
        serde_json::to_vec(&out).expect("serialising an envelope of valid parts cannot fail")
    }

    /// The Socket.IO room this message is delivered to.
    pub fn room(&self) -> String {
        match &self.user {
            Some(user) => user_room(&self.org, user),
            None => self.org.room(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The status of an execution, as workers send it in updates and as the `executions`
/// table stores it (the PostgreSQL enum `execution_status`, same names). Spelled in
/// uppercase everywhere, so one name means the same thing on the wire and in the database.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    postgres_types::ToSql,
    postgres_types::FromSql,
    utoipa::ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[postgres(name = "execution_status")]
pub enum ExecutionStatus {
    #[postgres(name = "PENDING")]
    Pending,
    #[postgres(name = "RUNNING")]
    Running,
    #[postgres(name = "PASSED")]
    Passed,
    #[postgres(name = "FAILED")]
    Failed,
    #[postgres(name = "ERROR")]
    Error,
    #[postgres(name = "CANCELLED")]
    Cancelled,
}

impl ExecutionStatus {
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Running,
        Self::Passed,
        Self::Failed,
        Self::Error,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Passed => "PASSED",
            Self::Failed => "FAILED",
            Self::Error => "ERROR",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Whether the execution is over: no later status is expected.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

impl fmt::Display for ExecutionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every refusal over HTTP, on both listeners: what to fix, or why nothing was
/// done. One type, so that no route can answer another shape (`docs/protocol.md`, and the
/// OpenAPI document's `Error`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// What to fix (4xx), or why nothing was done (5xx), in a sentence.
    pub error: String,
}

impl ErrorBody {
    pub fn new(error: impl fmt::Display) -> Self {
        Self {
            error: error.to_string(),
        }
    }
}

/// A status name that is not one of [`ExecutionStatus`]; the message lists the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an execution status; expected one of PENDING, RUNNING, PASSED, FAILED, ERROR, CANCELLED"
)]
pub struct UnknownStatus(pub String);

impl std::str::FromStr for ExecutionStatus {
    type Err = UnknownStatus;

    /// Exact, uppercase names only: the same spelling as on the wire and in the database.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn org_ids() {
        assert!(OrgId::parse("acme-1_2.x").is_ok());
        assert_eq!(OrgId::parse(""), Err(InvalidId::Empty));
        assert!(matches!(OrgId::parse("a:b"), Err(InvalidId::BadChars(_))));
        assert!(matches!(OrgId::parse("a b"), Err(InvalidId::BadChars(_))));
        assert!(matches!(OrgId::parse("é"), Err(InvalidId::BadChars(_))));
        assert!(OrgId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(OrgId::parse(&"a".repeat(129)), Err(InvalidId::TooLong(128)));
        assert_eq!(OrgId::from_json(&json!(42)).unwrap().as_str(), "42");
        assert_eq!(OrgId::from_json(&json!(-1)), Err(InvalidId::WrongType));
        assert_eq!(OrgId::from_json(&json!(1.5)), Err(InvalidId::WrongType));
        assert_eq!(OrgId::from_json(&json!(null)), Err(InvalidId::Missing));
        assert_eq!(OrgId::from_json(&json!(["a"])), Err(InvalidId::WrongType));
        assert_eq!(OrgId::parse("acme").unwrap().room(), "org:acme");
    }

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(UserId::parse("a:b c").is_ok());
        assert_eq!(UserId::parse(""), Err(InvalidId::Empty));
        assert!(matches!(UserId::parse("a\nb"), Err(InvalidId::BadChars(_))));
        assert_eq!(
            UserId::parse(&"u".repeat(257)),
            Err(InvalidId::TooLong(256))
        );
        let org = OrgId::parse("o1").unwrap();
        assert_eq!(
            user_room(&org, &UserId::parse("u:1").unwrap()),
            "user:o1:u:1"
        );
    }

    #[test]
    fn event_names() {
        for ok in ["execution-updated", "execution-log", "a", "ns:evt.v1_x"] {
            assert!(EventName::parse(ok).is_ok(), "{ok}");
        }
        assert!(EventName::parse(&"e".repeat(64)).is_ok());
        assert_eq!(
            EventName::parse(&"e".repeat(65)),
            Err(InvalidId::TooLong(64))
        );
        assert_eq!(EventName::parse(""), Err(InvalidId::Empty));
        for bad in ["a b", "a/b", "évent", "a\"b"] {
            assert!(
                matches!(EventName::parse(bad), Err(InvalidId::BadChars(_))),
                "{bad}"
            );
        }
        for reserved in [
            "connect",
            "disconnect",
            "connect_error",
            "disconnecting",
            "newListener",
        ] {
            assert!(matches!(
                EventName::parse(reserved),
                Err(InvalidId::Reserved(_))
            ));
        }
        for auth in [
            "auth-success",
            "auth-error",
            "auth-refresh",
            "auth-x",
            "AUTH-SUCCESS",
            "Auth-Error",
            "CONNECT",
            "Disconnect",
            "newlistener",
        ] {
            assert!(matches!(
                EventName::parse(auth),
                Err(InvalidId::Reserved(_))
            ));
        }
    }

    fn org() -> OrgId {
        OrgId::parse("acme").unwrap()
    }

    #[test]
    fn envelope_round_trip() {
        let raw = br#"{"event":"execution-log","data":{"taskId":"t1","log":"hi"},"ts":1700000000000,"userId":"u1"}"#;
        let msg = Message::from_envelope(org(), raw, 65536).unwrap();
        assert_eq!(msg.event.as_str(), "execution-log");
        assert_eq!(msg.data.get(), r#"{"taskId":"t1","log":"hi"}"#);
        assert_eq!(msg.ts_ms, Some(1_700_000_000_000));
        assert_eq!(msg.user.as_ref().unwrap().as_str(), "u1");
        assert!(!msg.via_ingest);
        assert_eq!(msg.room(), "user:acme:u1");

        let mut ingest = msg.clone();
        ingest.via_ingest = true;
        let again = Message::from_envelope(org(), &ingest.to_envelope(), 65536).unwrap();
        assert!(again.via_ingest);
        assert_eq!(again.data.get(), msg.data.get());
        assert_eq!(again.user, msg.user);
        assert_eq!(again.seq, None);

        let mut durable = msg.clone();
        durable.seq = Some(42);
        let again = Message::from_envelope(org(), &durable.to_envelope(), 65536).unwrap();
        assert_eq!(again.seq, Some(42));

        let mut stamped = msg.clone();
        stamped.stamp = Some(Stamp {
            origin: 0x00ab_cdef_0123_4567,
            epoch: 3,
            n: 17,
        });
        let raw = stamped.to_envelope();
        assert!(String::from_utf8_lossy(&raw).contains(r#""stamp":"00abcdef01234567:3:17""#));
        let again = Message::from_envelope(org(), &raw, 65536).unwrap();
        assert_eq!(again.stamp, stamped.stamp);
    }

    #[test]
    fn envelope_minimal_and_ignored_fields() {
        let msg =
            Message::from_envelope(org(), br#"{"event":"e","data":null,"other":1}"#, 1000).unwrap();
        assert_eq!(msg.data.get(), "null");
        assert_eq!(msg.ts_ms, None);
        assert_eq!(msg.user, None);
        assert_eq!(msg.room(), "org:acme");
        // A nonsensical ts is a hint, not an error.
        let msg =
            Message::from_envelope(org(), br#"{"event":"e","data":1,"ts":-5}"#, 1000).unwrap();
        assert_eq!(msg.ts_ms, None);
    }

    #[test]
    fn envelope_rejections() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "invalid_json"),
            (b"[1,2]", "invalid_json"),
            (br#"{"data":1}"#, "invalid_json"),
            (br#"{"event":"e"}"#, "invalid_json"),
            (br#"{"event":5,"data":1}"#, "bad_event"),
            (br#"{"event":"connect","data":1}"#, "bad_event"),
            (br#"{"event":"e","data":1,"seq":0}"#, "bad_seq"),
            (br#"{"event":"e","data":1,"seq":-3}"#, "bad_seq"),
            (br#"{"event":"e","data":1,"seq":"7"}"#, "bad_seq"),
            (br#"{"event":"auth-success","data":1}"#, "bad_event"),
            (br#"{"event":"bad name","data":1}"#, "bad_event"),
            (br#"{"event":"e","data":1,"userId":""}"#, "bad_user_id"),
            (br#"{"event":"e","data":1,"userId":{}}"#, "bad_user_id"),
            (
                br#"{"event":"e","data":1,"stamp":"00abcdef01234567:0:0"}"#,
                "bad_stamp",
            ),
            (
                br#"{"event":"e","data":1,"stamp":"abcdef01234567:0:1"}"#,
                "bad_stamp",
            ),
            (
                br#"{"event":"e","data":1,"stamp":"00abcdef01234567:01:1"}"#,
                "bad_stamp",
            ),
            (
                br#"{"event":"e","data":1,"stamp":"00abcdef01234567:0:+1"}"#,
                "bad_stamp",
            ),
            (
                br#"{"event":"e","data":1,"stamp":"00ABCDEF01234567:0:1"}"#,
                "bad_stamp",
            ),
            (
                br#"{"event":"e","data":1,"stamp":"00abcdef01234567:0:1:2"}"#,
                "bad_stamp",
            ),
            (br#"{"event":"e","data":1,"stamp":5}"#, "invalid_json"),
        ];
        for (raw, reason) in cases {
            let err = Message::from_envelope(org(), raw, 1000).unwrap_err();
            assert_eq!(err.reason(), *reason, "{}", String::from_utf8_lossy(raw));
        }
        let big = format!(r#"{{"event":"e","data":"{}"}}"#, "x".repeat(100));
        let err = Message::from_envelope(org(), big.as_bytes(), 50).unwrap_err();
        assert_eq!(err.reason(), "too_large");
    }

    #[test]
    fn json_depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth("1"), 0);
        assert_eq!(json_depth("[]"), 1);
        assert_eq!(json_depth(r#"{"a":[1,{"b":[]}],"c":{}}"#), 4);
        let tricky = r#"["[[[[", "\"[[", "\\", {"k]]": "}}"}]"#;
        assert!(serde_json::from_str::<serde_json::Value>(tricky).is_ok());
        assert_eq!(json_depth(tricky), 2);
        let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert_eq!(json_depth(&deep), 127);
    }

    #[test]
    fn envelopes_nest_at_most_as_deep_as_http_bodies() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let envelope = |depth: usize| format!(r#"{{"event":"e","data":{}}}"#, nested(depth));
        assert!(Message::from_envelope(org(), envelope(126).as_bytes(), 10_000).is_ok());
        let err = Message::from_envelope(org(), envelope(127).as_bytes(), 10_000).unwrap_err();
        assert_eq!(err.reason(), "too_deep");
    }

    fn durable(seq: u64) -> Message {
        let mut msg = Message::from_envelope(
            org(),
            br#"{"event":"execution-log","data":{"taskId":"t1","log":"x"},"userId":"u1"}"#,
            1000,
        )
        .unwrap();
        msg.seq = Some(seq);
        msg
    }

    #[test]
    fn a_durable_envelope_is_believed_only_with_its_own_signature() {
        let key = BusKey::new(&[7u8; 32]).unwrap();
        let mut msg = durable(42);
        assert!(!key.verify(&msg), "unsigned");
        msg.sig = key.sign(&msg);
        assert!(key.verify(&msg));
        // The signature survives the envelope, and covers every part of it.
        let again = Message::from_envelope(org(), &msg.to_envelope(), 1000).unwrap();
        assert_eq!(again.sig, msg.sig);
        assert!(key.verify(&again));
        let tampered: [fn(&mut Message); 5] = [
            |m| m.seq = Some(43),
            |m| m.org = OrgId::parse("globex").unwrap(),
            |m| m.user = None,
            |m| m.event = EventName::parse("execution-updated").unwrap(),
            |m| m.data = RawValue::from_string(r#"{"taskId":"t1","log":"y"}"#.into()).unwrap(),
        ];
        for tamper in tampered {
            let mut forged = msg.clone();
            tamper(&mut forged);
            assert!(!key.verify(&forged), "{forged:?}");
        }
        let other = BusKey::new(&[8u8; 32]).unwrap();
        assert!(!other.verify(&msg), "another history's key");
        assert!(
            BusKey::new(&[1u8; 16]).is_none(),
            "keys are 32 bytes or more"
        );
    }

    #[test]
    fn signatures_are_64_hex_digits() {
        let mut msg = durable(1);
        msg.sig = BusKey::new(&[1u8; 32]).unwrap().sign(&msg);
        let text = String::from_utf8(msg.to_envelope()).unwrap();
        let sig = serde_json::from_str::<serde_json::Value>(&text).unwrap()["sig"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(sig.len(), 64);
        assert!(sig.bytes().all(|b| b.is_ascii_hexdigit()));
        for bad in ["00", "zz", &"0".repeat(63), &format!("{}é", "0".repeat(62))] {
            let raw = format!(r#"{{"event":"e","data":1,"seq":1,"sig":"{bad}"}}"#);
            let err = Message::from_envelope(org(), raw.as_bytes(), 1000).unwrap_err();
            assert_eq!(err.reason(), "bad_sig", "{bad}");
        }
    }

    #[test]
    fn execution_status_names() {
        for status in ExecutionStatus::ALL {
            let name = status.as_str();
            assert_eq!(name.parse::<ExecutionStatus>(), Ok(status));
            assert_eq!(status.to_string(), name);
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<ExecutionStatus>(&json).unwrap(),
                status
            );
        }
        assert!(!ExecutionStatus::Running.is_final());
        assert!(ExecutionStatus::Cancelled.is_final());
    }

    #[test]
    fn unknown_execution_status_lists_the_valid_ones() {
        let err = "running".parse::<ExecutionStatus>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"running\" is not an execution status; expected one of PENDING, RUNNING, PASSED, FAILED, ERROR, CANCELLED"
        );
        assert!("DONE".parse::<ExecutionStatus>().is_err());
        assert!(serde_json::from_str::<ExecutionStatus>("\"DONE\"").is_err());
    }
}
