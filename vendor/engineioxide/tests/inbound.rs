//! A session opened by a request carrying an `InboundLimit` may send that many packets per
//! second (in bursts of one second's worth), on either transport; past it, it is closed:
//! its WebSocket with code 1008 and a reason, its polling request with 429, and the handler
//! hears of it, as does the limit's `on_exceeded`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use engineioxide::{
    InboundLimit, Str,
    config::EngineIoConfig,
    handler::EngineIoHandler,
    service::EngineIoService,
    socket::{DisconnectReason, Socket},
};
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{
    Message, handshake::client::generate_key, protocol::Role, protocol::frame::coding::CloseCode,
};
use tower_service::Service;

mod fixture;
use fixture::StreamImpl;

const BUDGET: u32 = 20;
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct MyHandler {
    disconnect_tx: mpsc::UnboundedSender<DisconnectReason>,
    messages: Arc<AtomicUsize>,
}

impl EngineIoHandler for MyHandler {
    type Data = ();
    fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
    fn on_disconnect(&self, _: Arc<Socket<()>>, reason: DisconnectReason) {
        self.disconnect_tx.send(reason).unwrap();
    }
    fn on_message(self: &Arc<Self>, _: Str, _: Arc<Socket<()>>) {
        self.messages.fetch_add(1, Ordering::Relaxed);
    }
    fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
}

struct Setup {
    svc: EngineIoService<MyHandler>,
    disconnects: mpsc::UnboundedReceiver<DisconnectReason>,
    messages: Arc<AtomicUsize>,
    exceeded: Arc<AtomicUsize>,
    limit: InboundLimit,
}

fn setup() -> Setup {
    let (disconnect_tx, disconnects) = mpsc::unbounded_channel();
    let messages = Arc::new(AtomicUsize::new(0));
    let exceeded = Arc::new(AtomicUsize::new(0));
    let counter = exceeded.clone();
    let config = EngineIoConfig::builder()
        .ping_interval(Duration::from_secs(60))
        .ping_timeout(Duration::from_secs(60))
        .build();
    let handler = MyHandler {
        disconnect_tx,
        messages: messages.clone(),
    };
    Setup {
        svc: EngineIoService::with_config(Arc::new(handler), config),
        disconnects,
        messages,
        exceeded,
        limit: InboundLimit {
            per_second: NonZeroU32::new(BUDGET).unwrap(),
            on_exceeded: Some(Arc::new(move |_| {
                counter.fetch_add(1, Ordering::Relaxed);
            })),
        },
    }
}

#[tokio::test]
async fn a_websocket_over_its_budget_is_closed_with_a_reason() {
    let mut s = setup();
    let (tx, rx) = mpsc::unbounded_channel();
    let (tx1, rx1) = mpsc::unbounded_channel();
    let mut parts = Request::builder()
        .method("GET")
        .header("Host", "127.0.0.1")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key())
        .uri("ws://127.0.0.1/engine.io/?EIO=4&transport=websocket")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    parts.extensions.insert(s.limit.clone());
    tokio::spawn(s.svc.ws_init(
        StreamImpl::new(tx, rx1),
        engineioxide::ProtocolVersion::V4,
        None,
        parts,
    ));
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        StreamImpl::new(tx1, rx),
        Role::Client,
        Default::default(),
    )
    .await;
    let open = ws.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with("0{"), "{open:?}");

    for n in 0..BUDGET * 3 {
        ws.send(Message::text(format!("4m{n}"))).await.unwrap();
    }
    let reason = tokio::time::timeout(TIMEOUT, s.disconnects.recv())
        .await
        .expect("the session was not closed")
        .unwrap();
    assert_eq!(reason, DisconnectReason::PacketParsingError);
    assert_eq!(s.exceeded.load(Ordering::Relaxed), 1);
    // The budget's worth was handled (a second's burst, and what refilled meanwhile), the
    // rest was not.
    let handled = s.messages.load(Ordering::Relaxed) as u32;
    assert!((BUDGET..BUDGET * 2).contains(&handled), "{handled} handled");
    let close = tokio::time::timeout(TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("no close frame");
    let frame = close.expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "too many packets");
}

#[tokio::test]
async fn a_polling_client_over_its_budget_is_answered_429_and_closed() {
    let mut s = setup();
    let open = Request::builder()
        .method("GET")
        .uri("http://127.0.0.1/engine.io/?EIO=4&transport=polling")
        .extension(s.limit.clone())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = s.svc.call(open).await.unwrap().into_body().collect().await;
    let body = String::from_utf8(body.unwrap().to_bytes().to_vec()).unwrap();
    let sid = body
        .split("\"sid\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("an open packet")
        .to_string();

    // One POST of three budgets' worth of packets.
    let payload = (0..BUDGET * 3)
        .map(|n| format!("4m{n}"))
        .collect::<Vec<_>>()
        .join("\u{1e}");
    let post = Request::builder()
        .method("POST")
        .uri(format!(
            "http://127.0.0.1/engine.io/?EIO=4&transport=polling&sid={sid}"
        ))
        .body(Full::new(Bytes::from(payload)))
        .unwrap();
    let status = s.svc.call(post).await.unwrap().status();
    assert_eq!(status, 429);
    let reason = tokio::time::timeout(TIMEOUT, s.disconnects.recv())
        .await
        .expect("the session was not closed")
        .unwrap();
    assert_eq!(reason, DisconnectReason::PacketParsingError);
    assert_eq!(s.exceeded.load(Ordering::Relaxed), 1);
    let handled = s.messages.load(Ordering::Relaxed) as u32;
    assert!((BUDGET..BUDGET * 2).contains(&handled), "{handled} handled");
}

#[tokio::test]
async fn without_a_limit_a_session_has_no_budget() {
    let (disconnect_tx, mut disconnects) = mpsc::unbounded_channel();
    let messages = Arc::new(AtomicUsize::new(0));
    let handler = MyHandler {
        disconnect_tx,
        messages: messages.clone(),
    };
    let mut svc = EngineIoService::with_config(
        Arc::new(handler),
        EngineIoConfig::builder()
            .ping_interval(Duration::from_secs(60))
            .ping_timeout(Duration::from_secs(60))
            .build(),
    );
    let mut ws = fixture::create_ws_connection(&mut svc).await;
    ws.next().await.unwrap().unwrap();
    for n in 0..BUDGET * 10 {
        ws.send(Message::text(format!("4m{n}"))).await.unwrap();
    }
    ws.send(Message::text("4last")).await.unwrap();
    tokio::time::timeout(TIMEOUT, async {
        while messages.load(Ordering::Relaxed) < (BUDGET * 10 + 1) as usize {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every message handled");
    assert!(disconnects.try_recv().is_err());
}
