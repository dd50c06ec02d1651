//! Ingest bodies (`ingest::decode`): what a worker's HTTP body becomes, on each route.

use axum::response::IntoResponse;
use bolero::TypeGenerator;
use fanout::ingest::{self, Route};
use fanout::protocol::{BusKey, ENVELOPE_OVERHEAD, EventName, Message, OrgId, Stamp, UserId};
use serde_json::{Value, json};

use crate::inputs::{ID_ALPHABET, Json, text};

const ROUTES: [Route; 3] = [Route::ExecutionUpdate, Route::ExecutionLog, Route::Publish];

/// Any body on each route: an accepted one makes a valid message whose envelope every
/// subscriber accepts (its size bounded by the body's); a refused one is a 400 with a
/// message.
#[test]
fn ingest_bodies() {
    bolero::check!().for_each(|body: &[u8]| {
        for route in ROUTES {
            match ingest::decode(route, body) {
                Ok(msg) => accepted(route, body, &msg),
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    assert_eq!(e.into_response().status(), 400, "{route:?}");
                }
            }
        }
    });
}

fn accepted(route: Route, body: &[u8], msg: &Message) {
    let text = std::str::from_utf8(body).expect("accepted bodies are UTF-8");
    let fields: Value = serde_json::from_str(text).expect("accepted bodies are JSON");
    assert_eq!(OrgId::parse(msg.org.as_str()).as_ref(), Ok(&msg.org));
    assert_eq!(
        OrgId::from_json(&fields["organizationId"]).as_ref(),
        Ok(&msg.org)
    );
    assert!(msg.via_ingest);
    assert!(msg.seq.is_none() && msg.sig.is_none() && msg.stamp.is_none());
    match route {
        Route::ExecutionUpdate | Route::ExecutionLog => {
            let event = match route {
                Route::ExecutionUpdate => "execution-updated",
                _ => "execution-log",
            };
            assert_eq!(msg.event.as_str(), event);
            assert!(msg.user.is_none());
            // The body is the data, byte for byte (but the whitespace around it).
            let json_whitespace = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
            assert_eq!(msg.data.get(), text.trim_matches(json_whitespace));
        }
        Route::Publish => {
            assert_eq!(
                EventName::parse(msg.event.as_str()).as_ref(),
                Ok(&msg.event)
            );
            assert_eq!(msg.event.as_str(), fields["event"]);
            if let Some(user) = &msg.user {
                assert_eq!(UserId::parse(user.as_str()).as_ref(), Ok(user));
            }
            // `data` as the worker wrote it, a part of the body.
            let data: Value = serde_json::from_str(msg.data.get()).unwrap();
            assert_eq!(data, fields["data"]);
            assert!(msg.data.get().len() < body.len());
        }
    }
    // What this replica publishes for it (durable or stamped: the largest envelope) fits
    // the limit every subscriber reads envelopes with, whatever the body's size and depth.
    let mut published = msg.clone();
    published.seq = Some(u64::MAX);
    published.sig = BusKey::new(&[7; 32]).unwrap().sign(&published);
    published.stamp = Some(Stamp {
        origin: u64::MAX,
        epoch: u32::MAX,
        n: u64::MAX,
    });
    let envelope = published.to_envelope();
    assert!(
        envelope.len() <= body.len() + ENVELOPE_OVERHEAD,
        "a body of {} bytes published as {}",
        body.len(),
        envelope.len()
    );
    let limit = body.len() + ENVELOPE_OVERHEAD;
    if let Err(e) = Message::from_envelope(msg.org.clone(), &envelope, limit) {
        panic!("accepted on {route:?}, refused by subscribers: {e}");
    }
    // With a history, the projection's own checks: a 400 or a projection, never a panic.
    if let Err(e) = ingest::projection(msg) {
        assert_eq!(e.into_response().status(), 400);
    }
}

#[derive(Debug, TypeGenerator)]
struct Publish {
    org: Vec<u8>,
    numeric_org: Option<u64>,
    event: Vec<u8>,
    data: Json,
    user: Option<Vec<u8>>,
}

/// A `POST /v1/publish` body made from parts: accepted exactly when each part is valid,
/// and then the message carries those parts; refused with the name of the first bad one.
#[test]
fn ingest_publish_round_trip() {
    bolero::check!().with_type::<Publish>().for_each(|p| {
        let org = match p.numeric_org {
            Some(n) => json!(n),
            None => json!(text(&p.org, ID_ALPHABET)),
        };
        let event = text(&p.event, ID_ALPHABET);
        let data = p.data.value();
        let user = p.user.as_ref().map(|u| text(u, ID_ALPHABET));
        let mut body = json!({"organizationId": org, "event": event, "data": data});
        if let Some(user) = &user {
            body["userId"] = json!(user);
        }
        let body = serde_json::to_vec(&body).unwrap();
        let expected_org = OrgId::from_json(&org);
        let expected_event = EventName::parse(&event);
        let expected_user = user.as_deref().map(UserId::parse).transpose();
        match ingest::decode(Route::Publish, &body) {
            Ok(msg) => {
                assert_eq!(Ok(&msg.org), expected_org.as_ref());
                assert_eq!(Ok(&msg.event), expected_event.as_ref());
                assert_eq!(Ok(&msg.user), expected_user.as_ref());
                // Byte for byte as the body wrote it.
                assert_eq!(msg.data.get(), data.to_string());
            }
            Err(e) => {
                let field = if expected_org.is_err() {
                    "organizationId"
                } else if expected_event.is_err() {
                    "event"
                } else {
                    assert!(expected_user.is_err(), "refused a valid body: {e}");
                    "userId"
                };
                assert!(e.to_string().contains(field), "{e}");
            }
        }
    });
}
