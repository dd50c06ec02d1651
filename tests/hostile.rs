//! What an anonymous client, a forger on the bus, or a fault can do to a replica, and the
//! limits that stop it. One test per defect of the hostile-input review; each fails on a
//! build without its fix (run the suite with `FANOUT_BIN` naming such a build to see it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fanout_testkit::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::{WebSocketStream, client_async};

/// The Engine.IO `maxPayload` of a replica with the default `FANOUT_MAX_PAYLOAD_BYTES`.
const MAX_PAYLOAD: usize = 135_168;

/// A raw WebSocket to the Engine.IO endpoint, after the open packet.
async fn raw_ws(addr: SocketAddr) -> WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = client_async(url.as_str(), tcp).await.unwrap();
    let open = ws.next().await.unwrap().unwrap();
    let open: Value = serde_json::from_str(&open.to_text().unwrap()[1..]).unwrap();
    assert_eq!(open["maxPayload"], MAX_PAYLOAD, "{open}");
    ws
}

/// Reads until the server ends the connection; panics if it does not within `timeout`, or
/// if it sends a Socket.IO packet (the server must not have parsed what was sent).
async fn expect_cut_off(ws: &mut WebSocketStream<TcpStream>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("the connection is still open after {timeout:?}"),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => {
                ws.send(Message::text("3")).await.ok();
            }
            Ok(Some(Ok(other))) => panic!("expected the connection to end, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn websocket_messages_over_max_payload_close_the_connection_before_and_after_auth() {
    let r = Replica::builder().start().await;

    // One message over the limit, before authentication: a CONNECT with a huge token.
    let mut ws = raw_ws(r.public).await;
    let big = format!("40{{\"token\":\"{}\"}}", "x".repeat(MAX_PAYLOAD));
    ws.send(Message::text(big)).await.unwrap();
    expect_cut_off(&mut ws, QUICK).await;

    // Unfinished fragments adding up to more than the limit: cut off without the last one,
    // so nothing beyond the limit is ever buffered.
    let mut ws = raw_ws(r.public).await;
    let chunk = "x".repeat(16 * 1024);
    let mut sent = 0;
    let first = Frame::message(
        format!("40{{\"token\":\"{chunk}"),
        OpCode::Data(Data::Text),
        false,
    );
    ws.send(Message::Frame(first)).await.unwrap();
    while sent <= MAX_PAYLOAD {
        let more = Frame::message(chunk.clone(), OpCode::Data(Data::Continue), false);
        if ws.send(Message::Frame(more)).await.is_err() {
            break; // already cut off
        }
        sent += chunk.len();
    }
    expect_cut_off(&mut ws, QUICK).await;

    // After authentication, the same limit.
    let (client, _) = Client::authenticated(r.public, &valid_token("acme", "alice")).await;
    let mut client = client;
    client.emit("anything", json!("y".repeat(MAX_PAYLOAD)));
    client.expect_closed(QUICK).await;

    // What fits is still read: a refresh of the maximum size gets its (negative) answer.
    let mut ok = r.login("acme", "bob").await;
    let padding = "z".repeat(MAX_PAYLOAD - 200);
    let ack = ok
        .emit_with_ack("auth-refresh", json!({ "token": padding }), QUICK)
        .await;
    assert_eq!(ack[0]["ok"], false, "{ack}");
}

/// `GET /socket.io/?EIO=4&transport=polling` on `http`: the status, and the body.
async fn polling_handshake(http: &reqwest::Client, addr: SocketAddr) -> (u16, String) {
    let resp = http
        .get(format!("http://{addr}/socket.io/?EIO=4&transport=polling"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[tokio::test]
async fn pending_sessions_are_bounded_in_number_and_lifetime() {
    let r = Replica::builder()
        .env("FANOUT_MAX_PENDING_SESSIONS", 20)
        .env("FANOUT_HANDSHAKE_TIMEOUT", "1s")
        .start()
        .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for i in 0..20 {
        let (status, body) = polling_handshake(&http, r.public).await;
        assert_eq!(status, 200, "handshake {i}: {body}");
    }
    // The 21st, over WebSocket or polling, is refused fast and told to retry.
    let (status, body) = polling_handshake(&http, r.public).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(r.metric("fanout_pending_sessions", &[]).await, 20.0);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["error"],
        "too many connections are authenticating on this replica; retry shortly"
    );
    let tcp = TcpStream::connect(r.public).await.unwrap();
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", r.public);
    let refused = client_async(url.as_str(), tcp).await;
    assert!(
        refused.is_err(),
        "a WebSocket handshake was accepted over the cap"
    );
    assert_eq!(
        r.metric(
            "fanout_connections_refused_total",
            &[("reason", "max_pending")]
        )
        .await,
        2.0
    );
    // None of them sends its CONNECT: each is closed after FANOUT_HANDSHAKE_TIMEOUT.
    r.wait_metric("fanout_pending_sessions", &[], |v| v == 0.0)
        .await;
    assert_eq!(polling_handshake(&http, r.public).await.0, 200);

    // Authenticated sessions do not count: far more than the cap log in, one after another.
    let mut clients = Vec::new();
    for i in 0..40 {
        clients.push(r.login("acme", &format!("u{i}")).await);
    }
    assert!(r.metric("fanout_pending_sessions", &[]).await <= 1.0);
}

/// Whether the server closes `tcp` within `timeout` (a read ends, or fails).
async fn closed_within(tcp: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn half_sent_requests_and_idle_connections_are_closed_on_both_listeners() {
    let r = Replica::builder()
        .env("FANOUT_HEADER_READ_TIMEOUT", "1s")
        .start()
        .await;
    for addr in [r.public, r.internal] {
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /socket.io/?EIO=4&transport=pol")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        assert!(
            closed_within(&mut half, SOON).await,
            "{addr}: half a request line"
        );
        assert!(
            closed_within(&mut idle, SOON).await,
            "{addr}: an idle connection"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{addr}: closed after {:?}",
            started.elapsed()
        );
    }
    assert!(
        r.metric(
            "fanout_connections_refused_total",
            &[("reason", "header_timeout")]
        )
        .await
            >= 2.0
    );
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_are_refused_fast_and_readiness_says_so() {
    let mut r = Replica::builder()
        .env("FANOUT_MAX_CONNECTIONS", 8)
        .env("FANOUT_HEADER_READ_TIMEOUT", "60s")
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(r.public).await.unwrap());
    }
    r.wait_metric("fanout_public_connections", &[], |v| v == 8.0)
        .await;
    let started = Instant::now();
    let mut refused = TcpStream::connect(r.public).await.unwrap();
    let mut answer = String::new();
    refused.read_to_string(&mut answer).await.unwrap();
    assert!(
        started.elapsed() < QUICK,
        "refused after {:?}",
        started.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("connection limit"), "{answer}");
    let ready = r.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(
        ready.json["reason"]
            .as_str()
            .unwrap()
            .contains("FANOUT_MAX_CONNECTIONS=8"),
        "{ready:?}"
    );
    // The internal listener is not capped: ingest and metrics answer.
    r.publish("acme", "still-up", json!(1)).await;
    assert_eq!(
        r.metric(
            "fanout_connections_refused_total",
            &[("reason", "max_connections")]
        )
        .await,
        1.0
    );
    drop(held);
    r.wait_ready().await;
    r.login("acme", "alice").await;
}

#[tokio::test]
async fn with_the_descriptor_limit_reached_the_internal_listener_still_answers() {
    // As reproduced with `prlimit --nofile=1100` and 1,150 idle TCP sockets.
    raise_nofile_limit(2_048);
    let r = Replica::builder()
        .descriptor_limit(1100)
        .env("FANOUT_HEADER_READ_TIMEOUT", "60s")
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..1150 {
        match TcpStream::connect(r.public).await {
            Ok(tcp) => held.push(tcp),
            Err(e) => panic!("connect: {e}"),
        }
    }
    // The cap (1100 less its reserve) was reached, and the rest were refused, not queued.
    let open = r
        .wait_metric("fanout_public_connections", &[], |v| v >= 800.0)
        .await;
    assert!(open < 1100.0, "{open} public connections");
    r.wait_metric(
        "fanout_connections_refused_total",
        &[("reason", "max_connections")],
        |v| v == 1150.0 - open,
    )
    .await;
    let ready = r.get("/readyz").await.expect("/readyz answers");
    assert_eq!(ready.status, 503, "{ready:?}");
    let started = Instant::now();
    r.publish("acme", "ingest-still-works", json!(1)).await;
    assert!(started.elapsed() < QUICK);
    assert_eq!(r.metric("fanout_accept_errors_total", &[]).await, 0.0);
}

/// A replica with a history (its own Redis and database).
async fn durable() -> (RedisServer, TestDb, Replica) {
    let redis = RedisServer::start().await;
    let db = TestDb::create().await;
    let r = Replica::builder()
        .redis(&redis)
        .database(&db)
        .start_with_store()
        .await;
    (redis, db, r)
}

async fn post_update(r: &Replica, task: &str) -> u64 {
    let body = json!({"organizationId": "acme", "taskId": task, "status": "RUNNING"});
    let reply = r.post("/executions/update", &body).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json["seq"].as_u64().unwrap()
}

#[tokio::test]
async fn a_forged_seq_on_the_bus_is_dropped_and_never_blocks_real_events() {
    let (redis, _db, r) = durable().await;
    let mut alice = r.login("acme", "alice").await;
    assert_eq!(post_update(&r, "t1").await, 1);
    assert_eq!(alice.next_durable(QUICK).await.2, Some(1));

    // Far ahead, unsigned; then right after the cursor, with a signature that is not one.
    let forged = [
        json!({"event": "execution-updated", "data": {"forged": true}, "seq": 5_000_000}),
        json!({"event": "execution-updated", "data": {"forged": true}, "seq": 2,
               "sig": "00".repeat(32)}),
    ];
    for envelope in &forged {
        assert_eq!(
            redis.publish("fanout:org:acme", envelope.to_string()).await,
            1
        );
    }
    // Real events go on (Redis delivers them after the forged ones), for the client already
    // there and for a new one.
    assert_eq!(post_update(&r, "t2").await, 2);
    let (_, data, seq) = alice.next_durable(QUICK).await;
    assert_eq!((seq, &data["taskId"]), (Some(2), &json!("t2")), "{data}");
    let mut bob = r.login("acme", "bob").await;
    assert_eq!(post_update(&r, "t3").await, 3);
    for client in [&mut alice, &mut bob] {
        let (_, data, seq) = client.next_durable(QUICK).await;
        assert_eq!((seq, &data["taskId"]), (Some(3), &json!("t3")), "{data}");
    }
    assert!(alice.next(Duration::from_millis(300)).await.is_none());
    for reason in ["unsigned_seq", "bad_signature"] {
        let dropped = r
            .metric("fanout_malformed_messages_total", &[("reason", reason)])
            .await;
        assert_eq!(dropped, 1.0, "{reason}");
    }
    assert!(
        r.stderr().contains("durable event dropped (unsigned_seq)"),
        "{}",
        r.stderr()
    );
}

#[tokio::test]
async fn without_a_history_an_envelope_seq_is_not_forwarded_as_meta() {
    let redis = RedisServer::start().await;
    let r = Replica::on(&redis, "ephemeral").await;
    let mut alice = r.login("acme", "alice").await;
    let envelope = json!({"event": "execution-log", "data": {"n": 1}, "seq": 7});
    redis.publish("fanout:org:acme", envelope.to_string()).await;
    assert_eq!(
        alice.next(QUICK).await,
        Some(Packet::Event("execution-log".into(), json!({"n": 1})))
    );
}

#[tokio::test]
async fn ingest_refuses_while_the_bus_is_resubscribing_after_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let mut r = Replica::builder()
        .redis(&redis)
        .env("RUST_LOG", "info")
        .start()
        .await;
    let mut alice = r.login("acme", "alice").await;
    redis.stop();
    r.wait_readyz(503).await;
    // Down long enough for the subscriber's backoff to grow past a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart().await;

    // Publish until the replica is ready again, and a little longer.
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut ready_at = None;
    for n in 0.. {
        let body = json!({"organizationId": "acme", "event": "n", "data": n});
        let reply = r.post("/v1/publish", &body).await;
        match reply.status {
            200 => accepted.push(n),
            503 => refused += 1,
            other => panic!("unexpected {other}: {reply:?}"),
        }
        if ready_at.is_none() && r.readyz().await == Some(200) {
            ready_at = Some(n);
        }
        if ready_at.is_some_and(|at| n >= at + 20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every message answered 200 arrives: none was accepted while nobody listened.
    let mut got = Vec::new();
    while got.len() < accepted.len() {
        match alice.next(QUICK).await {
            Some(Packet::Event(name, n)) if name == "n" => got.push(n.as_u64().unwrap()),
            other => panic!(
                "after {} of {} accepted messages ({refused} refused): {other:?}",
                got.len(),
                accepted.len()
            ),
        }
    }
    assert_eq!(got, accepted, "{refused} refused");
    // Each refusal is not a WARN line of its own.
    let warnings = r.stderr().matches("ingest refused a message").count();
    assert!(warnings <= 3, "{warnings} warnings for {refused} refusals");
}

#[tokio::test]
async fn a_refused_socket_loses_its_transport_within_a_second() {
    let r = Replica::builder().start().await;
    // A client that keeps answering pings, over WebSocket.
    let mut ws = Client::with_token(r.public, "not-a-token").await;
    assert_eq!(
        ws.expect("auth-error", QUICK).await,
        json!({"error": "Invalid or expired token"})
    );
    ws.expect_disconnect(QUICK).await;
    let started = Instant::now();
    ws.expect_closed(Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_millis(1500));

    // Over long-polling: after auth-error, the session is refused.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (_, open) = polling_handshake(&http, r.public).await;
    let sid = serde_json::from_str::<Value>(&open[1..]).unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!(
        "http://{}/socket.io/?EIO=4&transport=polling&sid={sid}",
        r.public
    );
    let post = http
        .post(&url)
        .body("40{\"token\":\"bad\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    // Polls until the auth-error arrives (an Engine.IO ping may come first).
    let mut polled = String::new();
    while !polled.contains("auth-error") {
        let poll = http.get(&url).send().await.unwrap();
        assert_eq!(poll.status(), 200, "{polled}");
        polled.push_str(&poll.text().await.unwrap());
    }
    let refused = eventually(
        "the session to be refused",
        Duration::from_secs(1),
        || async {
            let resp = http.get(&url).send().await.ok()?;
            (resp.status() == 400).then_some(resp.text().await.unwrap())
        },
    )
    .await;
    assert!(refused.contains("Session ID unknown"), "{refused}");
}

#[tokio::test]
async fn nbf_is_checked_and_a_distant_exp_does_not_wrap() {
    let r = Replica::builder().start().await;
    let claims = |nbf: u64, exp: u64| {
        token_with(&json!({
            "organizationId": "acme", "userId": "alice", "role": "member",
            "nbf": nbf, "exp": exp,
        }))
    };
    let later = now_secs() + 600;
    let mut early = Client::with_token(r.public, &claims(later, later + 3600)).await;
    assert_eq!(
        early.expect("auth-error", QUICK).await,
        json!({"error": "Invalid or expired token"})
    );
    assert_eq!(
        r.metric("fanout_auth_failures_total", &[("reason", "not_yet_valid")])
            .await,
        1.0
    );
    // auth-refresh checks it too.
    let mut alice = r.login("acme", "alice").await;
    let ack = alice
        .emit_with_ack(
            "auth-refresh",
            json!({"token": claims(later, later + 3600)}),
            QUICK,
        )
        .await;
    assert_eq!(ack[0]["ok"], false, "{ack}");

    // exp * 1000 would overflow u64: the session lasts, instead of ending at once.
    let far = u64::MAX / 1000 + 1;
    let (mut forever, _) = Client::authenticated(r.public, &claims(now_secs() - 10, far)).await;
    assert!(forever.next(Duration::from_millis(1500)).await.is_none());
    let ack = alice
        .emit_with_ack(
            "auth-refresh",
            json!({"token": claims(now_secs() - 10, far)}),
            QUICK,
        )
        .await;
    assert_eq!(ack[0]["ok"], true, "{ack}");
    assert!(alice.next(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn reserved_event_names_are_refused_whatever_their_case() {
    let r = Replica::builder().start().await;
    for event in ["AUTH-SUCCESS", "Auth-Error", "CONNECT", "Disconnect"] {
        let body = json!({"organizationId": "acme", "event": event, "data": 1});
        let reply = r.post("/v1/publish", &body).await;
        assert_eq!(reply.status, 400, "{event}: {reply:?}");
        assert!(
            reply.json["error"].as_str().unwrap().contains("reserved"),
            "{reply:?}"
        );
    }
}

#[tokio::test]
async fn envelopes_from_redis_meet_the_json_depth_limit_of_http_ingest() {
    let redis = RedisServer::start().await;
    let r = Replica::on(&redis, "depth").await;
    let mut alice = r.login("acme", "alice").await;
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // HTTP ingest: 127 levels of data (128 with the body object) are refused by serde_json.
    for (depth, status) in [(127, 400), (126, 200)] {
        let body = format!(
            r#"{{"organizationId":"acme","event":"deep","data":{}}}"#,
            nested(depth)
        );
        let reply = r.post_raw("/v1/publish", body, Some(INGEST_KEY)).await;
        assert_eq!(reply.status, status, "data {depth} levels deep: {reply:?}");
    }
    assert_eq!(
        alice.expect("deep", QUICK).await,
        serde_json::from_str::<Value>(&nested(126)).unwrap()
    );
    // The same data straight into Redis: the envelope object is a level, as the body is.
    let envelope = |depth: usize| format!(r#"{{"event":"deep","data":{}}}"#, nested(depth));
    redis.publish("fanout:org:acme", envelope(127)).await;
    redis.publish("fanout:org:acme", envelope(126)).await;
    assert_eq!(
        alice.expect("deep", QUICK).await,
        serde_json::from_str::<Value>(&nested(126)).unwrap()
    );
    assert_eq!(
        r.metric("fanout_malformed_messages_total", &[("reason", "too_deep")])
            .await,
        1.0
    );
    // The update routes broadcast the body itself as the data, one level deeper in the
    // envelope: a body that could not travel is refused (it was accepted, then dropped by
    // every subscriber as too deep).
    let update = |depth: usize| {
        format!(
            r#"{{"organizationId":"acme","taskId":"t1","status":"RUNNING","x":{}}}"#,
            nested(depth)
        )
    };
    for (depth, status) in [(126, 400), (125, 200)] {
        let reply = r
            .post_raw("/executions/update", update(depth), Some(INGEST_KEY))
            .await;
        assert_eq!(
            reply.status,
            status,
            "body {} levels deep: {reply:?}",
            depth + 1
        );
    }
    assert_eq!(
        alice.expect("execution-updated", QUICK).await,
        serde_json::from_str::<Value>(&update(125)).unwrap()
    );
}

#[tokio::test]
async fn a_body_of_the_largest_size_reaches_subscribers_in_its_envelope() {
    let redis = RedisServer::start().await;
    let r = Replica::on(&redis, "largest").await;
    let mut alice = r.login("acme", "alice").await;
    // FANOUT_MAX_PAYLOAD_BYTES (65536) exactly: ingest takes it, and the envelope around it
    // is larger. Subscribers dropped it as too large while the worker had its 200.
    let frame = r#"{"organizationId":"acme","taskId":"t1","log":""}"#;
    let body = frame.replace(
        r#""log":"""#,
        &format!(r#""log":"{}""#, "x".repeat(65_536 - frame.len())),
    );
    assert_eq!(body.len(), 65_536);
    let reply = r
        .post_raw("/executions/log", body.clone(), Some(INGEST_KEY))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        alice.expect("execution-log", QUICK).await,
        serde_json::from_str::<Value>(&body).unwrap()
    );
    assert_eq!(
        r.metric(
            "fanout_malformed_messages_total",
            &[("reason", "too_large")]
        )
        .await,
        0.0
    );
}

/// A door in front of the test PostgreSQL: while shut, connections through it are dropped at
/// once (as with PostgreSQL down); once opened, they are forwarded.
struct Door {
    url: String,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Door {
    /// A shut door to `db`; `url` is the `DATABASE_URL` that goes through it.
    async fn shut(db: &TestDb) -> Self {
        use std::str::FromStr;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let config = tokio_postgres::Config::from_str(db.url()).unwrap();
        let target = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => {
                format!("{host}:{}", config.get_ports().first().unwrap_or(&5432))
            }
            other => panic!("the test PostgreSQL is not on TCP: {other:?}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(false));
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !gate.load(Ordering::Acquire) {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let user = config.get_user().unwrap_or("postgres");
        let password = config
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        let url = format!(
            "postgres://{user}{password}@127.0.0.1:{port}/{}?connect_timeout=1",
            config.get_dbname().unwrap()
        );
        Self { url, open }
    }

    fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Release);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_events_a_replica_cannot_verify_yet_are_dropped_then_its_clients_resync() {
    let (redis, db, a) = durable().await;
    // B shares Redis and the database, but cannot reach the database yet: it has no key to
    // verify signatures with.
    let door = Door::shut(&db).await;
    let b = Replica::builder()
        .name("b")
        .redis(&redis)
        .database_url(&door.url)
        .start()
        .await;
    let mut bob = b.login("acme", "bob").await;
    assert_eq!(post_update(&a, "t1").await, 1);
    b.wait_metric(
        "fanout_malformed_messages_total",
        &[("reason", "unverified_seq")],
        |v| v == 1.0,
    )
    .await;
    assert!(bob.next(Duration::from_millis(300)).await.is_none());

    // An outage longer than a gap fill keeps retrying (3 s): B's periodic tail check, not
    // that fill, finds the database back. Then its clients are told they may have missed
    // something, and live events flow again, verified.
    tokio::time::sleep(Duration::from_secs(4)).await;
    door.open();
    b.wait_store_up().await;
    let resync = bob.expect("resync-required", SOON).await;
    assert_eq!(resync["reason"], "history_unavailable", "{resync}");
    assert_eq!(resync["latestSeq"], 1, "{resync}");
    assert_eq!(post_update(&a, "t2").await, 2);
    let (_, data, seq) = bob.next_durable(QUICK).await;
    assert_eq!((seq, &data["taskId"]), (Some(2), &json!("t2")), "{data}");
}
