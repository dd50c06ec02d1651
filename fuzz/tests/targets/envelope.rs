//! The Redis envelope decoder (`Message::from_envelope`): what anyone who can PUBLISH to
//! Redis sends every replica, and `BusKey`, the signature that makes a durable `seq`
//! believable.

use bolero::TypeGenerator;
use fanout::protocol::{
    BusKey, EnvelopeError, EventName, MAX_JSON_DEPTH, Message, OrgId, Stamp, UserId, json_depth,
};
use serde_json::value::RawValue;

use crate::inputs::{ID_ALPHABET, Json, text};

/// The size limit the targets decode with (the default `FANOUT_MAX_PAYLOAD_BYTES`).
const LIMIT: usize = 65_536;

/// The key the corpus's signed envelopes were made with.
pub const KEY: [u8; 32] = *b"fanout-fuzz-bus-key-of-32-bytes!";

fn org() -> OrgId {
    OrgId::parse("acme").unwrap()
}

/// Anything on an organization's channel: accepted envelopes meet every rule and survive
/// their own encoding; refused ones are an error with a message and a metric label.
#[test]
fn envelope_bytes() {
    let key = BusKey::new(&KEY).unwrap();
    bolero::check!().for_each(|payload: &[u8]| {
        match Message::from_envelope(org(), payload, LIMIT) {
            Ok(msg) => accepted(payload, &msg, &key),
            Err(e) => refused(payload, &e),
        }
    });
}

fn accepted(payload: &[u8], msg: &Message, key: &BusKey) {
    // The organization comes from the channel, never from the payload.
    assert_eq!(msg.org, org());
    assert_eq!(
        EventName::parse(msg.event.as_str()).as_ref(),
        Ok(&msg.event)
    );
    if let Some(user) = &msg.user {
        assert_eq!(UserId::parse(user.as_str()).as_ref(), Ok(user));
    }
    assert!(msg.seq.is_none_or(|seq| seq > 0));
    assert!(msg.stamp.is_none_or(|stamp| stamp.n > 0));
    assert!(
        msg.ts_ms
            .is_none_or(|ts| ts > 0 && ts < 1_000_000_000_000_000)
    );
    // `data` is JSON (by its grammar: a number out of f64's range, which serde_json's
    // Value refuses, is passed on as written), within the depth limit, a part of the payload.
    serde_json::from_str::<Box<RawValue>>(msg.data.get()).expect("data is JSON");
    assert!(json_depth(msg.data.get()) < MAX_JSON_DEPTH);
    assert!(msg.data.get().len() <= payload.len());

    // Encoding keeps every part, and at most grows a number written short (`"ts":1e14`)
    // or a numeric `userId` (quoted): the encoding is bounded by the payload.
    let encoded = msg.to_envelope();
    assert!(
        encoded.len() <= payload.len() + 17,
        "{} bytes re-encoded as {}",
        payload.len(),
        encoded.len()
    );
    let again = Message::from_envelope(org(), &encoded, usize::MAX).expect("re-decodes");
    same(msg, &again);

    // A signature is believed only if it is the key's own for exactly these parts.
    if key.verify(msg) {
        assert_eq!(key.sign(msg), msg.sig);
        let mut forged = msg.clone();
        forged.seq = msg.seq.map(|s| s.wrapping_add(1).max(1));
        assert!(!key.verify(&forged));
    }
}

fn refused(payload: &[u8], e: &EnvelopeError) {
    assert!(!e.to_string().is_empty());
    let reasons = [
        "too_large",
        "invalid_json",
        "bad_event",
        "bad_user_id",
        "bad_seq",
        "bad_sig",
        "bad_stamp",
        "too_deep",
    ];
    assert!(reasons.contains(&e.reason()), "{e:?}");
    if payload.len() > LIMIT {
        assert_eq!(e.reason(), "too_large");
    }
}

fn same(a: &Message, b: &Message) {
    assert_eq!(a.org, b.org);
    assert_eq!(a.event, b.event);
    assert_eq!(a.data.get(), b.data.get());
    assert_eq!(a.ts_ms, b.ts_ms);
    assert_eq!(a.user, b.user);
    assert_eq!(a.via_ingest, b.via_ingest);
    assert_eq!(a.seq, b.seq);
    assert_eq!(a.sig, b.sig);
    assert_eq!(a.stamp, b.stamp);
}

/// The parts of an envelope, near the rules: most make a valid message.
#[derive(Debug, TypeGenerator)]
struct Parts {
    event: Vec<u8>,
    data: Json,
    user: Option<Vec<u8>>,
    numeric_user: Option<u64>,
    ts: Option<u64>,
    seq: Option<u64>,
    stamp: Option<(u64, u32, u64)>,
    via_ingest: bool,
    signed: bool,
    tamper: Option<u8>,
}

/// decode(encode(m)) == m for every message fanout can make, signed or not; a signature
/// covers every part of it.
#[test]
fn envelope_round_trip() {
    let key = BusKey::new(&KEY).unwrap();
    bolero::check!().with_type::<Parts>().for_each(|p| {
        // Generated text that breaks the rules falls back to a valid value.
        let event = EventName::parse(&text(&p.event, ID_ALPHABET))
            .unwrap_or_else(|_| EventName::parse("execution-log").unwrap());
        let user = match (&p.user, p.numeric_user) {
            (Some(chars), _) => UserId::parse(&text(chars, ID_ALPHABET)).ok(),
            (None, Some(n)) => Some(UserId::parse(&n.to_string()).unwrap()),
            (None, None) => None,
        };
        let data = RawValue::from_string(p.data.value().to_string()).unwrap();
        let mut msg = Message {
            org: org(),
            event,
            data,
            ts_ms: p.ts.map(|t| t % 1_000_000_000_000_000).filter(|t| *t > 0),
            user,
            via_ingest: p.via_ingest,
            seq: p.seq.filter(|s| *s > 0),
            sig: None,
            stamp: p
                .stamp
                .and_then(|(origin, epoch, n)| (n > 0).then_some(Stamp { origin, epoch, n })),
        };
        if p.signed {
            msg.sig = key.sign(&msg);
        }
        let encoded = msg.to_envelope();
        let again = Message::from_envelope(org(), &encoded, encoded.len()).expect("decodes");
        same(&msg, &again);
        assert_eq!(key.verify(&again), p.signed && msg.seq.is_some());
        // Any change to the signed parts breaks the signature.
        if let (Some(byte), true) = (p.tamper, key.verify(&again)) {
            let mut forged = again.clone();
            let data = forged.data.get().to_string();
            let tampered = format!("[{data},{byte}]");
            forged.data = RawValue::from_string(tampered).unwrap();
            assert!(!key.verify(&forged));
        }
    });
}
