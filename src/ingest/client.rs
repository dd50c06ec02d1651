//! `fanout publish`: the ingest API's client for operators and scripts, so that publishing
//! one event needs no curl line with a hand-escaped body.
//!
//! Everything is checked before anything is sent, with the rules the replica applies
//! ([`crate::protocol`]), so a typo is an error naming its flag rather than a 400 to
//! decode; then the replica's answer is shown as it came: 200 with its `status` (and `seq`
//! when the replica keeps a history), or the status and `error` of a refusal.

use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::ops::http::Peer;
use crate::protocol::{EventName, OrgId, UserId};

/// The longest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// One event to publish, checked.
pub struct PublishRequest {
    pub peer: Peer,
    pub key: String,
    pub org: OrgId,
    pub event: EventName,
    pub data: Box<RawValue>,
    pub user: Option<UserId>,
    pub timeout: Duration,
}

/// How a publish ended, for the exit code and what is printed.
pub enum Outcome {
    /// 2xx: the answer's body.
    Accepted(Value),
    /// Refused: the status and the `error` text (or the body as it came).
    Refused(StatusCode, String),
}

impl PublishRequest {
    /// The body of `POST /v1/publish`.
    pub fn body(&self) -> String {
        let mut body = json!({
            "organizationId": self.org.as_str(),
            "event": self.event.as_str(),
        });
        if let Some(user) = &self.user {
            body["userId"] = json!(user.as_str());
        }
        // `data` goes as written (key order included), like the ingest API passes it on.
        let mut text = body.to_string();
        text.pop();
        format!("{text},\"data\":{}}}", self.data.get())
    }

    /// Sends it; `Err` when no answer came (the replica unreachable, a timeout).
    pub async fn send(&self) -> Result<Outcome, String> {
        let authorization = format!("Bearer {}", self.key);
        let answer = self
            .peer
            .send(
                Method::POST,
                Some("/v1/publish"),
                &[
                    ("content-type", "application/json"),
                    ("authorization", &authorization),
                ],
                Bytes::from(self.body()),
                MAX_ANSWER,
                self.timeout,
            )
            .await?;
        let json: Option<Value> = serde_json::from_slice(&answer.body).ok();
        if answer.status.is_success() {
            return Ok(Outcome::Accepted(json.unwrap_or(Value::Null)));
        }
        let error = json
            .as_ref()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).trim().to_owned());
        Ok(Outcome::Refused(answer.status, error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_carries_data_as_written() {
        let req = PublishRequest {
            peer: Peer::new("http://127.0.0.1:1").unwrap(),
            key: "k".into(),
            org: OrgId::parse("acme").unwrap(),
            event: EventName::parse("execution-updated").unwrap(),
            data: RawValue::from_string(r#"{"z":1,"a":[true]}"#.into()).unwrap(),
            user: Some(UserId::parse("u1").unwrap()),
            timeout: Duration::from_secs(1),
        };
        let body = req.body();
        assert!(body.ends_with(r#""data":{"z":1,"a":[true]}}"#), "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["organizationId"], "acme");
        assert_eq!(v["userId"], "u1");
        assert_eq!(v["event"], "execution-updated");
    }
}
