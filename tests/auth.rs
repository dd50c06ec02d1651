//! Authentication of dashboards: the token in the CONNECT packet decides whether a socket
//! is admitted and to which organization; a session ends when its token expires unless
//! `auth-refresh` extended it.
//!
//! Clients see exactly two refusal messages (`Authentication required`, `Invalid or
//! expired token`), always followed by a Socket.IO DISCONNECT; the detailed reason only
//! goes to metrics.

use std::time::Duration;

use fanout_testkit::*;
use serde_json::{Value, json};

fn claims(org: Value, user: Value, exp: u64) -> Value {
    json!({"organizationId": org, "userId": user, "role": "admin", "exp": exp})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_is_greeted_with_its_identity() {
    let r = Replica::builder().start().await;
    let exp = now_secs() + 600;

    let (_alice, hello) = Client::authenticated(
        r.public,
        &token_with(&claims(json!("acme"), json!("alice"), exp)),
    )
    .await;
    assert_eq!(
        hello,
        json!({"message": "Connected to organization channel", "organizationId": "acme", "userId": "alice", "role": "admin"})
    );
    // Numeric ids are echoed as the token carries them.
    let (_numeric, hello) =
        Client::authenticated(r.public, &token_with(&claims(json!(42), json!(7), exp))).await;
    assert_eq!(
        (hello["organizationId"].clone(), hello["userId"].clone()),
        (json!(42), json!(7))
    );
    // A token copied with its HTTP scheme still works.
    let bearer = format!("Bearer {}", valid_token("acme", "bob"));
    let (mut bob, _) = Client::authenticated(r.public, &bearer).await;
    // The organization comes from the token, whatever else the client sends.
    let auth = json!({"token": valid_token("acme", "carol"), "organizationId": "globex"});
    let mut carol = Client::connect(r.public, Some(auth)).await;
    assert_eq!(
        carol.expect("auth-success", QUICK).await["organizationId"],
        json!("acme")
    );
    let mut globex = r.login("globex", "dave").await;

    r.publish("acme", "for-acme", json!(1)).await;
    r.publish("globex", "marker", Value::Null).await;
    assert_eq!(bob.expect("for-acme", QUICK).await, json!(1));
    assert_eq!(carol.expect("for-acme", QUICK).await, json!(1));
    assert_eq!(globex.events_until("marker", QUICK).await, vec![]);
    assert_eq!(r.metric("fanout_connections", &[]).await, 5.0);
}

/// Connects with `auth` and checks the refusal: `auth-error` with `message`, then `41`.
async fn assert_refused(r: &Replica, auth: Option<Value>, message: &str) -> Client {
    Client::refused(r.public, auth, message).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_refused() {
    let r = Replica::builder().start().await;
    for auth in [
        None,
        Some(json!({})),
        Some(json!({"token": ""})),
        Some(json!({"token": null})),
        Some(json!({"tok": "x"})),
    ] {
        assert_refused(&r, auth, "Authentication required").await;
    }
    let m = r.metrics().await;
    assert_eq!(
        m.get("fanout_auth_failures_total", &[("reason", "missing_token")]),
        5.0
    );
    assert_eq!(m.get("fanout_connections", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_token_is_refused_and_receives_nothing() {
    let r = Replica::builder().start().await;
    let mut member = r.login("acme", "member").await;
    let exp = now_secs() + 600;
    let good = claims(json!("acme"), json!("mallory"), exp);

    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg_none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(good.to_string())
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &good,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut no_org = good.clone();
    no_org.as_object_mut().unwrap().remove("organizationId");
    let cases: Vec<(Value, &str)> = vec![
        (json!("garbage"), "malformed"),
        (json!(12), "malformed"),
        (json!(sign(&good, "some-other-secret")), "bad_signature"),
        (
            json!(token_with(&claims(
                json!("acme"),
                json!("mallory"),
                now_secs() - 10
            ))),
            "expired",
        ),
        (json!(hs512), "wrong_algorithm"),
        // `none` is not even an algorithm the header parser knows.
        (json!(alg_none), "malformed"),
        (json!(token_with(&no_org)), "bad_claims"),
        (
            json!(token_with(&claims(json!("a:b"), json!("u"), exp))),
            "bad_claims",
        ),
        (
            json!(token_with(&claims(json!("acme"), json!(""), exp))),
            "bad_claims",
        ),
    ];
    let mut refused = Vec::new();
    for (token, _) in &cases {
        refused.push(
            assert_refused(
                &r,
                Some(json!({ "token": token })),
                "Invalid or expired token",
            )
            .await,
        );
    }

    r.publish("acme", "secret", json!("for members only")).await;
    assert_eq!(
        member.expect("secret", QUICK).await,
        json!("for members only")
    );
    for client in &mut refused {
        // The member's copy arrived, so a leaked copy would have been sent by now.
        if let Some(Packet::Event(name, data)) = client.next(Duration::from_millis(100)).await {
            panic!("a refused socket received {name:?} {data}");
        }
    }
    let m = r.metrics().await;
    for reason in [
        "malformed",
        "bad_signature",
        "expired",
        "wrong_algorithm",
        "bad_claims",
    ] {
        let expected = cases.iter().filter(|(_, r)| *r == reason).count() as f64;
        assert_eq!(
            m.get("fanout_auth_failures_total", &[("reason", reason)]),
            expected,
            "{reason}"
        );
    }
    assert_eq!(m.get("fanout_connections", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leeway_tolerates_a_recently_expired_token() {
    let r = Replica::builder()
        .env("JWT_LEEWAY_SECONDS", 30)
        .start()
        .await;
    Client::authenticated(r.public, &token("acme", "late", now_secs() - 5)).await;
    let too_late = token("acme", "late", now_secs() - 120);
    assert_refused(
        &r,
        Some(json!({ "token": too_late })),
        "Invalid or expired token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let redis = RedisServer::start().await;
    let r = Replica::on(&redis, "a").await;
    let (mut client, _) =
        Client::authenticated(r.public, &token("acme", "alice", now_secs() + 2)).await;
    assert_eq!(redis.channels("fanout:org:*").await, ["fanout:org:acme"]);

    assert_eq!(
        client.expect("auth-error", Duration::from_secs(6)).await,
        json!({"error": "Token expired"})
    );
    client.expect_disconnect(QUICK).await;
    assert_eq!(
        r.metric(
            "fanout_auth_failures_total",
            &[("reason", "session_expired")]
        )
        .await,
        1.0
    );
    r.wait_metric("fanout_connections", &[], |v| v == 0.0).await;
    eventually("the org channel to be released", SOON, || async {
        redis
            .channels("fanout:org:*")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_refresh_extends_the_session() {
    let r = Replica::builder().start().await;
    let exp = now_secs() + 2;
    let short = token("acme", "alice", exp);
    // Both sessions end at the same deadline unless refreshed.
    let (mut canary, _) = Client::authenticated(r.public, &short).await;
    let (mut refreshed, _) = Client::authenticated(r.public, &short).await;

    let refusals = [
        (
            json!({"token": valid_token("globex", "alice")}),
            "Token is for another organization or user",
        ),
        (
            json!({"token": valid_token("acme", "bob")}),
            "Token is for another organization or user",
        ),
        (json!({"token": "garbage"}), "Invalid or expired token"),
        (
            json!({"token": sign(&json!({"organizationId": "acme", "userId": "alice", "role": "r", "exp": now_secs() + 600}), "wrong")}),
            "Invalid or expired token",
        ),
        (json!({}), "Authentication required"),
    ];
    for (payload, error) in refusals {
        let ack = refreshed
            .emit_with_ack("auth-refresh", payload.clone(), QUICK)
            .await;
        assert_eq!(
            ack,
            json!([{"ok": false, "error": error}]),
            "refresh with {payload}"
        );
    }
    let later = now_secs() + 600;
    let ack = refreshed
        .emit_with_ack(
            "auth-refresh",
            json!({"token": token("acme", "alice", later)}),
            QUICK,
        )
        .await;
    assert_eq!(ack, json!([{"ok": true, "exp": later}]));

    // The canary's end proves the old deadline has passed.
    assert_eq!(
        canary.expect("auth-error", Duration::from_secs(6)).await,
        json!({"error": "Token expired"})
    );
    canary.expect_disconnect(QUICK).await;
    r.publish("acme", "marker", Value::Null).await;
    assert_eq!(refreshed.events_until("marker", QUICK).await, vec![]);
    let m = r.metrics().await;
    assert_eq!(
        m.get(
            "fanout_auth_failures_total",
            &[("reason", "refresh_mismatch")]
        ),
        2.0
    );
    assert_eq!(
        m.get(
            "fanout_auth_failures_total",
            &[("reason", "refresh_rejected")]
        ),
        3.0
    );
    r.wait_metric("fanout_connections", &[], |v| v == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rs256_replica_accepts_only_tokens_signed_with_the_private_key() {
    let public = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa_public.pem");
    let r = Replica::builder()
        .unset("JWT_SECRET")
        .env("JWT_PUBLIC_KEY", public)
        .start()
        .await;
    let claims = claims(json!("acme"), json!("alice"), now_secs() + 600);
    let private =
        jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("keys/rsa_private.pem")).unwrap();
    let rs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &private,
    )
    .unwrap();
    let (_, hello) = Client::authenticated(r.public, &rs256).await;
    assert_eq!(hello["organizationId"], json!("acme"));

    // HS256 keyed with the public key's text: the classic algorithm confusion.
    let forged = sign(&claims, include_str!("keys/rsa_public.pem"));
    assert_refused(
        &r,
        Some(json!({ "token": forged })),
        "Invalid or expired token",
    )
    .await;
    assert_eq!(
        r.metric(
            "fanout_auth_failures_total",
            &[("reason", "wrong_algorithm")]
        )
        .await,
        1.0
    );
}

/// Backends put more than ids in their tokens. Client messages larger than the replica's
/// 1 KiB WebSocket read buffer (a refresh carrying an 8 KiB token) must still be read whole.
#[tokio::test]
async fn large_client_messages_are_read_whole() {
    let r = Replica::builder().start().await;
    let permissions: Vec<String> = (0..400).map(|i| format!("permission-{i:04}")).collect();
    let big = |exp: u64| {
        token_with(&json!({
            "organizationId": "acme",
            "userId": "alice",
            "role": "member",
            "exp": exp,
            "permissions": permissions,
        }))
    };
    assert!(big(0).len() > 8 * 1024);
    let (mut client, _) = Client::authenticated(r.public, &big(now_secs() + 60)).await;
    let later = now_secs() + 600;
    let ack = client
        .emit_with_ack("auth-refresh", json!({"token": big(later)}), QUICK)
        .await;
    assert_eq!(ack, json!([{"ok": true, "exp": later}]));
    r.publish("acme", "after", json!(1)).await;
    assert_eq!(client.expect("after", QUICK).await, json!(1));
}

/// Rotating an HMAC secret without a flag day: the backend signs with the new secret
/// (`JWT_SECRET`) while tokens it signed with the old one (`JWT_SECRET_PREVIOUS`) stay valid
/// until they expire, on sockets, `auth-refresh` and REST alike. Each acceptance by the old
/// secret is counted, so operators see when it can go; a third secret is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_hmac_secret_stays_valid_during_a_rotation() {
    const NEW: &str = "the-new-secret-the-backend-signs-with-now";
    let r = Replica::builder()
        .env("JWT_SECRET", NEW)
        .env("JWT_SECRET_PREVIOUS", SECRET)
        .start()
        .await;
    let exp = now_secs() + 600;
    let claims = |user: &str| claims(json!("acme"), json!(user), exp);
    let previous_count = || async { r.metric("fanout_auth_previous_secret_total", &[]).await };

    // Signed with the previous secret (the harness's default): admitted, and counted.
    let (mut old, hello) = Client::authenticated(r.public, &token_with(&claims("alice"))).await;
    assert_eq!(hello["userId"], json!("alice"));
    assert_eq!(previous_count().await, 1.0);
    // Signed with the new one: admitted, not counted.
    let (mut new, _) = Client::authenticated(r.public, &sign(&claims("bob"), NEW)).await;
    assert_eq!(previous_count().await, 1.0);
    r.publish("acme", "tick", json!(1)).await;
    assert_eq!(old.expect("tick", QUICK).await, json!(1));
    assert_eq!(new.expect("tick", QUICK).await, json!(1));

    // The old session refreshes onto a token of the new secret.
    let later = exp + 600;
    let fresh = sign(&self::claims(json!("acme"), json!("alice"), later), NEW);
    let ack = old
        .emit_with_ack("auth-refresh", json!({ "token": fresh }), QUICK)
        .await;
    assert_eq!(ack, json!([{"ok": true, "exp": later}]));

    // A third secret is refused as ever.
    assert_refused(
        &r,
        Some(json!({ "token": sign(&claims("mallory"), "some-other-secret-entirely-0123") })),
        "Invalid or expired token",
    )
    .await;
    assert_eq!(previous_count().await, 1.0);
}
