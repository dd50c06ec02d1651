//! JWT claims (`auth::Verifier`): any token string a client sends, and correctly signed
//! tokens whose claims are anything at all.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bolero::TypeGenerator;
use fanout::auth::{AuthError, Identity, Verifier, VerifierConfig, VerifyKey};
use fanout::protocol::{OrgId, UserId, now_ms};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Map, Value, json};

use crate::inputs::{ID_ALPHABET, Json, text};

/// The secret the corpus's tokens are signed with.
pub const SECRET: &[u8] = b"fanout-fuzz-secret-long-enough-for-hs256";

fn verifier() -> Verifier {
    Verifier::new(VerifierConfig {
        key: VerifyKey::Secret(SECRET.to_vec()),
        algorithm: Algorithm::HS256,
        issuer: None,
        audience: None,
        leeway_seconds: 0,
        previous_secret: None,
    })
    .unwrap()
}

fn now() -> u64 {
    now_ms() / 1000
}

/// An accepted token's identity meets the protocol's rules; a refused one has a reason,
/// a message, and tells the client one of the two messages of the contract.
fn outcome(result: &Result<Identity, AuthError>) {
    match result {
        Ok(id) => {
            assert_eq!(OrgId::parse(id.org.as_str()).as_ref(), Ok(&id.org));
            assert_eq!(OrgId::from_json(&id.raw_org).as_ref(), Ok(&id.org));
            assert_eq!(UserId::parse(id.user.as_str()).as_ref(), Ok(&id.user));
            assert_eq!(UserId::from_json(&id.raw_user).as_ref(), Ok(&id.user));
            assert!(!id.role.is_empty());
            assert!(
                id.exp.saturating_add(1) >= now(),
                "accepted an expired token: {id:?}"
            );
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(matches!(
                e.client_message(),
                "Authentication required" | "Invalid or expired token"
            ));
        }
    }
}

/// Any string as the `auth.token` of a handshake (or a REST bearer token).
#[test]
fn jwt_token_strings() {
    // The verifier holds locks (for JWT_JWKS_URL's keys, unused here); a panic in a check
    // ends the target, so nothing observes them afterwards.
    let v = std::panic::AssertUnwindSafe(verifier());
    bolero::check!().for_each(|bytes: &[u8]| {
        let token = String::from_utf8_lossy(bytes).into_owned();
        let result = v.verify(Some(&Value::String(token)));
        outcome(&result);
    });
}

/// `header.payload` signed with the verifier's secret, as the backend would.
fn signed(payload: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
    let key = EncodingKey::from_secret(SECRET);
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{input}.{signature}")
}

/// A correctly signed token whose payload is any bytes: never a panic, never refused for
/// its signature or algorithm, and accepted only with a valid identity.
#[test]
fn jwt_signed_payload_bytes() {
    // The verifier holds locks (for JWT_JWKS_URL's keys, unused here); a panic in a check
    // ends the target, so nothing observes them afterwards.
    let v = std::panic::AssertUnwindSafe(verifier());
    bolero::check!().for_each(|payload: &[u8]| {
        let result = v.verify(Some(&Value::String(signed(payload))));
        outcome(&result);
        if let Err(e) = &result {
            assert!(
                matches!(
                    e,
                    AuthError::Malformed(_)
                        | AuthError::BadClaim { .. }
                        | AuthError::Expired
                        | AuthError::NotYetValid
                ),
                "{e:?}"
            );
        }
    });
}

#[derive(Debug, TypeGenerator)]
enum Id {
    Text(Vec<u8>),
    Number(u64),
    Other(Json),
    Missing,
}

#[derive(Debug, TypeGenerator)]
enum Time {
    /// This many seconds (plus one) from now.
    Ahead(u32),
    /// This many seconds (plus two) ago.
    Ago(u32),
    Other(Json),
    Missing,
}

#[derive(Debug, TypeGenerator)]
struct Claims {
    user: Id,
    org: Id,
    role: Option<Json>,
    exp: Time,
    nbf: Time,
    extra: Vec<(Vec<u8>, Json)>,
    /// Bit i set: claim i (user, organization, role, exp, nbf) takes a valid value instead,
    /// so that about one token in eight is valid and acceptance is exercised too.
    valid: u8,
}

impl Id {
    fn value(&self) -> Option<Value> {
        match self {
            Id::Text(chars) => Some(json!(text(chars, ID_ALPHABET))),
            Id::Number(n) => Some(json!(n)),
            Id::Other(v) => Some(v.value()),
            Id::Missing => None,
        }
    }
}

impl Time {
    fn value(&self, now: u64) -> Option<Value> {
        match self {
            Time::Ahead(s) => Some(json!(now + 1 + u64::from(*s))),
            Time::Ago(s) => Some(json!(now.saturating_sub(2 + u64::from(*s)))),
            Time::Other(v) => Some(v.value()),
            Time::Missing => None,
        }
    }

    /// Whether the value is a whole number of seconds in the past (`exp`) or the future
    /// (`nbf`) by more than the clock can move during the check.
    fn is(&self, ahead: bool, now: u64) -> Option<bool> {
        let seconds = self.value(now)?.as_u64()?;
        if seconds.abs_diff(now) < 2 {
            return None;
        }
        Some((seconds > now) == ahead)
    }
}

/// Correctly signed tokens with structured claims: accepted exactly when the claims meet
/// the rules (ids valid, a role, an `exp` ahead, no `nbf` ahead), then with those claims;
/// refused otherwise, for a reason about the claims.
#[test]
fn jwt_signed_claims() {
    // The verifier holds locks (for JWT_JWKS_URL's keys, unused here); a panic in a check
    // ends the target, so nothing observes them afterwards.
    let v = std::panic::AssertUnwindSafe(verifier());
    bolero::check!().with_type::<Claims>().for_each(|c| {
        let now = now();
        let mut claims = Map::new();
        for (key, value) in &c.extra {
            claims.insert(text(key, ID_ALPHABET), value.value());
        }
        let mut set = |name: &str, value: Option<Value>| match value {
            Some(value) => claims.insert(name.into(), value),
            None => claims.remove(name),
        };
        let valid = |bit: u8| c.valid & (1 << bit) != 0;
        let (user, org, role, exp, nbf) = (
            if valid(0) { &Id::Number(7) } else { &c.user },
            if valid(1) {
                &Id::Text(vec![0, 1, 2])
            } else {
                &c.org
            },
            if valid(2) {
                Some(json!("admin"))
            } else {
                c.role.as_ref().map(Json::value)
            },
            if valid(3) { &Time::Ahead(600) } else { &c.exp },
            if valid(4) { &Time::Missing } else { &c.nbf },
        );
        set("userId", user.value());
        set("organizationId", org.value());
        set("role", role);
        set("exp", exp.value(now));
        set("nbf", nbf.value(now));
        let result = v.verify(Some(&Value::String(signed(
            &serde_json::to_vec(&claims).unwrap(),
        ))));
        outcome(&result);

        let null = Value::Null;
        let org = OrgId::from_json(claims.get("organizationId").unwrap_or(&null));
        let user = UserId::from_json(claims.get("userId").unwrap_or(&null));
        let role = claims
            .get("role")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty());
        let exp_ahead = exp.is(true, now);
        let nbf_ahead = match nbf {
            Time::Missing => Some(false),
            _ => nbf.is(true, now),
        };
        let (Some(exp_ahead), Some(nbf_ahead)) = (exp_ahead, nbf_ahead) else {
            return; // a time the clock could cross, or a non-integer: any outcome is fine
        };
        let valid = org.is_ok() && user.is_ok() && role.is_some() && exp_ahead && !nbf_ahead;
        match &result {
            Ok(id) => {
                assert!(valid, "accepted {claims:?}");
                assert_eq!(Ok(&id.org), org.as_ref());
                assert_eq!(Ok(&id.user), user.as_ref());
                assert_eq!(Some(id.role.as_str()), role);
                assert_eq!(Some(&json!(id.exp)), claims.get("exp"));
            }
            Err(e) => {
                assert!(!valid, "refused {claims:?}: {e:?}");
                let expected = if !exp_ahead {
                    "expired"
                } else if nbf_ahead {
                    "not_yet_valid"
                } else {
                    "bad_claims"
                };
                assert_eq!(e.reason(), expected, "{claims:?}: {e:?}");
            }
        }
    });
}
