//! Verification keys from a JWKS endpoint (`JWT_JWKS_URL`), so the backend rotates its
//! signing key without a restart of any replica.
//!
//! A token names its key with `kid`; the set in force maps each `kid` to a key. The set is
//! fetched in the background every `JWT_JWKS_REFRESH`, and again when a token names a `kid`
//! the set does not have (a key the backend just started signing with), at most once per
//! `JWT_JWKS_MIN_REFRESH` however many such tokens arrive: a stranger sending made-up `kid`s
//! cannot turn the replicas into a flood against the identity provider. Concurrent callers
//! share one fetch. A fetch that fails (unreachable, not 200, not a JWKS, no usable key)
//! keeps the last good set in force: a replica that has verified tokens goes on verifying
//! them through an outage of the identity provider; the failure is logged, counted and
//! shown by `/readyz`. Before the first good set a replica has nothing to verify with, so it
//! is not ready.
//!
//! Only keys for the one configured algorithm are taken (a JWK's `alg`, when present, must
//! name it; `use`, when present, must be `sig`); a key that cannot be used is skipped and
//! logged, never failing the rest of the set. A token without `kid` is verified only when
//! the set holds exactly one key.
//!
//! The fetch is a plain HTTP/1.1 GET ([`crate::ops::http`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::Method;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::AuthError;
use crate::ops::http::Peer;
use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;

/// The most a JWKS document may weigh.
const MAX_BYTES: usize = 1 << 20;
/// A fetch that takes longer fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Before the first good set, how long between attempts, at most.
const FIRST_RETRY_MAX: Duration = Duration::from_secs(30);

/// What `JWT_JWKS_*` configure.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    pub url: String,
    pub refresh: Duration,
    pub min_refresh: Duration,
}

/// Why a JWKS URL cannot be used at all (at start).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

/// Why a fetch failed; the set in force stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(String);

/// What started a fetch (the metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first fetch, and the periodic ones.
    Schedule,
    /// A token named a `kid` the set does not have.
    UnknownKid,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::UnknownKid => "unknown_kid",
        }
    }
}

/// The keys in force.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<DecodingKey>>,
    /// The one key, when the set holds exactly one: for tokens without `kid`.
    only: Option<Arc<DecodingKey>>,
}

/// How the keys are doing, for `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// When the set in force was fetched; `None` before the first good set.
    pub loaded_at: Option<SystemTime>,
    /// The last fetch's error, while fetches fail.
    pub failing: Option<String>,
}

pub struct Jwks {
    peer: Peer,
    algorithm: Algorithm,
    config: JwksConfig,
    keys: RwLock<Arc<KeySet>>,
    health: Mutex<Health>,
    /// Held during a fetch (so callers share one), with when the last fetch started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    /// Checks the URL; fetches nothing yet (the task does, see [`Jwks::run`]).
    pub fn new(config: JwksConfig, algorithm: Algorithm) -> Result<Self, UrlError> {
        let peer = Peer::new(&config.url).map_err(|e| {
            UrlError(format!(
                "{e}; expected e.g. https://login.example.com/.well-known/jwks.json (http:// only inside a trusted network)"
            ))
        })?;
        Ok(Self {
            peer,
            algorithm,
            config,
            keys: RwLock::default(),
            health: Mutex::default(),
            fetching: tokio::sync::Mutex::new(None),
        })
    }

    /// The key a token's `kid` names.
    pub fn key_for(&self, kid: Option<&str>) -> Result<Arc<DecodingKey>, AuthError> {
        let keys = self.keys.read().unwrap().clone();
        match kid {
            Some(kid) => keys.by_kid.get(kid).cloned().ok_or(AuthError::UnknownKey),
            None => keys.only.clone().ok_or_else(|| {
                AuthError::Malformed(
                    "no kid in the header, and JWT_JWKS_URL holds several keys".into(),
                )
            }),
        }
    }

    pub fn health(&self) -> Health {
        self.health.lock().unwrap().clone()
    }

    /// Fetches the set now, unless another caller is fetching (then waits for that one) or,
    /// for an unknown `kid`, a fetch started less than `JWT_JWKS_MIN_REFRESH` ago.
    pub async fn refresh(&self, trigger: Trigger) {
        let asked = Instant::now();
        let mut last = self.fetching.lock().await;
        if let Some(started) = *last {
            // Someone fetched while this caller waited for the lock: that fetch is as fresh.
            if started >= asked {
                return;
            }
            if trigger == Trigger::UnknownKid && started.elapsed() < self.config.min_refresh {
                ::metrics::counter!(metrics::JWKS_REFRESHES, "trigger" => trigger.label(), "result" => "skipped")
                    .increment(1);
                return;
            }
        }
        *last = Some(Instant::now());
        let result = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .unwrap_or_else(|_| Err(FetchError(format!("no answer within {FETCH_TIMEOUT:?}"))));
        let mut health = self.health.lock().unwrap();
        match result {
            Ok(set) => {
                let n = set.by_kid.len().max(usize::from(set.only.is_some()));
                *self.keys.write().unwrap() = Arc::new(set);
                health.loaded_at = Some(SystemTime::now());
                if health.failing.take().is_some() || trigger == Trigger::UnknownKid {
                    tracing::info!(url = %self.peer.url(), keys = n, trigger = trigger.label(), "JWT_JWKS_URL fetched");
                }
                ::metrics::gauge!(metrics::JWKS_KEYS).set(n as f64);
                ::metrics::gauge!(metrics::JWKS_LOADED_AT)
                    .set(crate::protocol::now_ms() as f64 / 1000.0);
                ::metrics::counter!(metrics::JWKS_REFRESHES, "trigger" => trigger.label(), "result" => "ok")
                    .increment(1);
            }
            Err(e) => {
                tracing::warn!(url = %self.peer.url(), trigger = trigger.label(), "JWT_JWKS_URL not fetched, the keys in force stay: {e}");
                health.failing = Some(e.0);
                ::metrics::counter!(metrics::JWKS_REFRESHES, "trigger" => trigger.label(), "result" => "error")
                    .increment(1);
            }
        }
    }

    /// The refresh task: fetches at once (retrying until a first set is in), then every
    /// `JWT_JWKS_REFRESH`.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut wait = Duration::from_millis(250);
        loop {
            self.refresh(Trigger::Schedule).await;
            let next = if self.health().loaded_at.is_some() {
                self.config.refresh
            } else {
                wait = (wait * 2).min(FIRST_RETRY_MAX).min(self.config.refresh);
                wait
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let body = self.get().await?;
        self.parse(&body)
    }

    /// The usable keys of a JWKS document.
    fn parse(&self, body: &[u8]) -> Result<KeySet, FetchError> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let doc: Document = serde_json::from_slice(body)
            .map_err(|e| FetchError(format!("the answer is not a JWKS document ({e})")))?;
        let mut set = KeySet::default();
        let mut usable = Vec::new();
        let mut skipped = Vec::new();
        for (i, value) in doc.keys.into_iter().enumerate() {
            let kid = value.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
            let name = kid.clone().unwrap_or_else(|| format!("#{i}"));
            match self.usable(value) {
                Ok(key) => usable.push((kid, Arc::new(key))),
                Err(why) => skipped.push(format!("{name}: {why}")),
            }
        }
        if !skipped.is_empty() {
            tracing::debug!(url = %self.peer.url(), "JWT_JWKS_URL keys skipped: {}", skipped.join("; "));
        }
        if usable.is_empty() {
            return Err(FetchError(format!(
                "no key for {:?} in the set{}",
                self.algorithm,
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", skipped.join("; "))
                }
            )));
        }
        if let [(_, key)] = usable.as_slice() {
            set.only = Some(key.clone());
        }
        for (kid, key) in usable {
            if let Some(kid) = kid {
                set.by_kid.insert(kid, key);
            }
        }
        Ok(set)
    }

    /// A JWK as a key for the configured algorithm, or why not.
    fn usable(&self, value: serde_json::Value) -> Result<DecodingKey, String> {
        let jwk: Jwk =
            serde_json::from_value(value).map_err(|e| format!("not a usable JWK ({e})"))?;
        if let Some(use_) = &jwk.common.public_key_use
            && *use_ != PublicKeyUse::Signature
        {
            return Err("its use is not sig".into());
        }
        if let Some(alg) = jwk.common.key_algorithm
            && !same_algorithm(alg, self.algorithm)
        {
            return Err(format!("its alg is {alg:?}, not {:?}", self.algorithm));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
        if !family_fits(&jwk, self.algorithm) {
            return Err(format!("its key type cannot verify {:?}", self.algorithm));
        }
        Ok(key)
    }

    /// `GET` the URL: 200 with a body of at most `MAX_BYTES`, or why not.
    async fn get(&self) -> Result<Bytes, FetchError> {
        let answer = self
            .peer
            .send(
                Method::GET,
                None,
                &[("accept", "application/json")],
                Bytes::new(),
                MAX_BYTES,
                FETCH_TIMEOUT,
            )
            .await
            .map_err(FetchError)?;
        let status = answer.status;
        if status.is_redirection() {
            return Err(FetchError(format!(
                "answered {status}: set JWT_JWKS_URL to the address it redirects to (redirects are not followed)"
            )));
        }
        if status != hyper::StatusCode::OK {
            return Err(FetchError(format!("answered {status}")));
        }
        Ok(answer.body)
    }
}

fn same_algorithm(jwk: KeyAlgorithm, alg: Algorithm) -> bool {
    Algorithm::try_from(jwk).is_ok_and(|a| a == alg)
}

/// Whether the JWK's key type is the one `alg` verifies with.
fn family_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::Algorithm::*;
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    use jsonwebtoken::jwk::EllipticCurve as C;
    match (&jwk.algorithm, alg) {
        (P::RSA(_), RS256 | RS384 | RS512 | PS256 | PS384 | PS512) => true,
        (P::EllipticCurve(p), ES256) => p.curve == C::P256,
        (P::EllipticCurve(p), ES384) => p.curve == C::P384,
        (P::OctetKeyPair(p), EdDSA) => p.curve == C::Ed25519,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwks(alg: Algorithm) -> Jwks {
        let config = JwksConfig {
            url: "http://127.0.0.1:1/jwks".into(),
            refresh: Duration::from_secs(300),
            min_refresh: Duration::from_secs(10),
        };
        Jwks::new(config, alg).unwrap()
    }

    fn rsa_jwk(kid: &str) -> serde_json::Value {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!(
            "../../tests/keys/rsa_private.pem"
        ))
        .unwrap();
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk
    }

    #[test]
    fn urls_are_checked() {
        for (url, expected) in [
            ("ftp://idp/jwks", "must start with https://"),
            ("not a url", "is not a URL"),
            ("/jwks.json", "must start with https://"),
        ] {
            let config = JwksConfig {
                url: url.into(),
                refresh: Duration::from_secs(1),
                min_refresh: Duration::from_secs(1),
            };
            let err = Jwks::new(config, Algorithm::RS256).err().unwrap();
            assert!(err.0.contains(expected), "{url}: {err}");
        }
    }

    #[test]
    fn only_keys_for_the_algorithm_are_taken() {
        let j = jwks(Algorithm::RS256);
        let mut enc = rsa_jwk("enc");
        enc["use"] = json!("enc");
        let mut other_alg = rsa_jwk("ps");
        other_alg["alg"] = json!("PS256");
        let doc = json!({ "keys": [
            rsa_jwk("a"),
            enc,
            other_alg,
            { "kty": "weird", "kid": "w" },
            { "kty": "oct", "k": "c2VjcmV0", "kid": "hmac" },
        ]});
        let set = j.parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.by_kid.keys().collect::<Vec<_>>(), vec!["a"]);
        assert!(
            set.only.is_some(),
            "one usable key serves tokens without kid"
        );

        let two = json!({ "keys": [rsa_jwk("a"), rsa_jwk("b")] });
        let set = j.parse(two.to_string().as_bytes()).unwrap();
        assert_eq!(set.by_kid.len(), 2);
        assert!(set.only.is_none());
    }

    #[test]
    fn a_document_without_a_usable_key_is_an_error() {
        let j = jwks(Algorithm::ES256);
        let err = j
            .parse(json!({ "keys": [rsa_jwk("a")] }).to_string().as_bytes())
            .err()
            .unwrap();
        assert!(err.0.contains("no key for ES256"), "{err}");
        assert!(j.parse(b"<html>").is_err());
        assert!(j.parse(b"{\"keys\": 3}").is_err());
    }

    #[test]
    fn before_a_first_set_every_kid_is_unknown() {
        let j = jwks(Algorithm::RS256);
        assert!(matches!(j.key_for(Some("a")), Err(AuthError::UnknownKey)));
        assert!(matches!(j.key_for(None), Err(AuthError::Malformed(_))));
        assert!(j.health().loaded_at.is_none());
    }
}
