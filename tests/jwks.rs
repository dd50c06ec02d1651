//! Tokens verified with keys from a JWKS endpoint (`JWT_JWKS_URL`) that rotates them, served
//! here by a local HTTP server the test controls.
//!
//! A replica is ready once it holds a first set; a token signed with a key the backend just
//! added is accepted at once (the set is fetched again for its `kid`); a key the endpoint
//! dropped stops verifying after the next scheduled fetch; an endpoint that fails keeps the
//! last good set in force, reported by `/readyz` and the metrics; and tokens naming made-up
//! `kid`s cause at most one fetch per `JWT_JWKS_MIN_REFRESH`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use fanout_testkit::*;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const INVALID: &str = "Invalid or expired token";

/// A signing key of the backend, named by its `kid`.
struct SigningKey {
    kid: &'static str,
    key: EncodingKey,
}

impl SigningKey {
    fn generate(kid: &'static str) -> Self {
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        Self {
            kid,
            key: EncodingKey::from_ec_der(der.as_ref()),
        }
    }

    fn jwk(&self) -> Value {
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&self.key, Algorithm::ES256).unwrap())
                .unwrap();
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk
    }

    fn token(&self, org: &str, user: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.into());
        let claims = json!({
            "userId": user,
            "organizationId": org,
            "role": "member",
            "exp": now_secs() + 600,
        });
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The identity provider's JWKS endpoint: what it answers, and how often it was asked.
#[derive(Clone)]
struct Endpoint {
    answer: Arc<Mutex<(StatusCode, String)>>,
    hits: Arc<AtomicUsize>,
    url: String,
}

impl Endpoint {
    async fn start() -> Self {
        let answer = Arc::new(Mutex::new((StatusCode::SERVICE_UNAVAILABLE, String::new())));
        let hits = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let app = Router::new()
            .route(
                "/.well-known/jwks.json",
                get(|State(e): State<Endpoint>| async move {
                    e.hits.fetch_add(1, Ordering::SeqCst);
                    e.answer.lock().unwrap().clone()
                }),
            )
            .with_state(Endpoint {
                answer: answer.clone(),
                hits: hits.clone(),
                url: url.clone(),
            });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { answer, hits, url }
    }

    fn serve(&self, keys: &[&SigningKey]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
        *self.answer.lock().unwrap() = (StatusCode::OK, json!({ "keys": keys }).to_string());
    }

    fn fail(&self, status: StatusCode, body: &str) {
        *self.answer.lock().unwrap() = (status, body.into());
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn replica(
    endpoint: &Endpoint,
    refresh: &str,
    min_refresh: &str,
) -> fanout_testkit::replica::ReplicaBuilder {
    Replica::builder()
        .unset("JWT_SECRET")
        .env("JWT_JWKS_URL", &endpoint.url)
        .env("JWT_ALGORITHM", "ES256")
        .env("JWT_JWKS_REFRESH", refresh)
        .env("JWT_JWKS_MIN_REFRESH", min_refresh)
}

async fn refreshes(r: &Replica, trigger: &str, result: &str) -> f64 {
    r.metric(
        "fanout_jwks_refreshes_total",
        &[("trigger", trigger), ("result", result)],
    )
    .await
}

async fn wait_refreshes(r: &Replica, trigger: &str, result: &str, at_least: f64) {
    r.wait_metric(
        "fanout_jwks_refreshes_total",
        &[("trigger", trigger), ("result", result)],
        |n| n >= at_least,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_restart() {
    let (a, b) = (SigningKey::generate("a"), SigningKey::generate("b"));
    let idp = Endpoint::start().await;
    idp.serve(&[&a]);
    // `demand` fetches on schedule once an hour, and whenever an unknown kid arrives; `r`
    // every 2 s.
    let demand = replica(&idp, "1h", "0s").start().await;
    let r = replica(&idp, "2s", "0s").start().await;
    let (mut alice, ack) = Client::authenticated(demand.public, &a.token("acme", "alice")).await;
    assert_eq!(ack["organizationId"], json!("acme"));

    // The backend adds b and signs with it at once: accepted without waiting for a schedule.
    idp.serve(&[&a, &b]);
    let (mut bob, _) = Client::authenticated(demand.public, &b.token("acme", "bob")).await;
    assert_eq!(refreshes(&demand, "unknown_kid", "ok").await, 1.0);
    assert_eq!(demand.metric("fanout_jwks_keys", &[]).await, 2.0);
    demand.publish("acme", "tick", json!(1)).await;
    assert_eq!(alice.expect("tick", QUICK).await, json!(1));
    assert_eq!(bob.expect("tick", QUICK).await, json!(1));

    // a is retired: after the next scheduled fetch its tokens are refused, on sockets and
    // REST alike.
    idp.serve(&[&b]);
    let before = refreshes(&r, "schedule", "ok").await;
    wait_refreshes(&r, "schedule", "ok", before + 1.0).await;
    Client::refused(
        r.public,
        Some(json!({ "token": a.token("acme", "carol") })),
        INVALID,
    )
    .await;
    let rest = reqwest::Client::new()
        .get(format!("http://{}/v1/executions", r.public))
        .bearer_auth(a.token("acme", "carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 401);
    assert!(
        r.metric("fanout_auth_failures_total", &[("reason", "unknown_kid")])
            .await
            >= 2.0
    );
    Client::authenticated(r.public, &b.token("acme", "dave")).await;

    // The endpoint fails: b stays in force, and /readyz says the set is stale, still ready.
    idp.fail(StatusCode::INTERNAL_SERVER_ERROR, "oops");
    wait_refreshes(&r, "schedule", "error", 1.0).await;
    let ready = r.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.json["jwks"], json!("stale"), "{ready:?}");
    let reason = ready.json["jwks_reason"].as_str().unwrap();
    assert!(
        reason.contains("500") && reason.contains("stay in force"),
        "{reason}"
    );
    Client::authenticated(r.public, &b.token("acme", "erin")).await;
    // An answer that is not a JWKS is a failure too.
    idp.fail(StatusCode::OK, "<html>login</html>");
    let errors = refreshes(&r, "schedule", "error").await;
    wait_refreshes(&r, "schedule", "error", errors + 1.0).await;
    Client::authenticated(r.public, &b.token("acme", "frank")).await;
    assert_eq!(r.metric("fanout_jwks_keys", &[]).await, 1.0);

    // Back: the set is fresh again.
    idp.serve(&[&b]);
    let oks = refreshes(&r, "schedule", "ok").await;
    wait_refreshes(&r, "schedule", "ok", oks + 1.0).await;
    let ready = r.get("/readyz").await.unwrap();
    assert_eq!(ready.json["jwks"], json!("ok"), "{ready:?}");
    assert!(ready.json.get("jwks_reason").is_none(), "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_a_first_set_is_not_ready_and_refuses_tokens() {
    let a = SigningKey::generate("a");
    let idp = Endpoint::start().await;
    let mut r = replica(&idp, "5m", "0s").spawn().await;
    r.wait_readyz(503).await;
    let ready = r.get("/readyz").await.unwrap();
    let reason = ready.json["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("JWT_JWKS_URL"), "{ready:?}");
    Client::refused(
        r.public,
        Some(json!({ "token": a.token("acme", "alice") })),
        INVALID,
    )
    .await;

    idp.serve(&[&a]);
    r.wait_ready().await;
    Client::authenticated(r.public, &a.token("acme", "alice")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_kids_cannot_make_the_replica_flood_the_endpoint() {
    let a = SigningKey::generate("a");
    let idp = Endpoint::start().await;
    idp.serve(&[&a]);
    let r = replica(&idp, "1h", "1h").start().await;
    let fetched = idp.hits();
    assert_eq!(fetched, 1, "one fetch at start");

    // Twenty tokens for kids nobody published, at once.
    let strangers = (0..20).map(|i| {
        let kid: &'static str = Box::leak(format!("made-up-{i}").into_boxed_str());
        let stranger = SigningKey::generate(kid);
        let addr = r.public;
        async move {
            Client::refused(
                addr,
                Some(json!({ "token": stranger.token("acme", "eve") })),
                INVALID,
            )
            .await
        }
    });
    futures_util::future::join_all(strangers).await;
    assert_eq!(idp.hits(), fetched, "no fetch within JWT_JWKS_MIN_REFRESH");
    assert_eq!(refreshes(&r, "unknown_kid", "skipped").await, 20.0);
    // The known key still works.
    Client::authenticated(r.public, &a.token("acme", "alice")).await;
}
