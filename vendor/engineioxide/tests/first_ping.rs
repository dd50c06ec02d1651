//! The server's first ping goes out one `ping_interval` after the handshake, as in the
//! reference engine (Node's engine.io), on both transports: a ping at once would cost every
//! new connection a round trip for nothing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use engineioxide::{
    Str,
    config::EngineIoConfig,
    handler::EngineIoHandler,
    service::EngineIoService,
    socket::{DisconnectReason, Socket},
};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

mod fixture;
use fixture::{create_polling_connection, create_ws_connection, send_req_raw};

const INTERVAL: Duration = Duration::from_millis(400);

#[derive(Debug)]
struct MyHandler;

impl EngineIoHandler for MyHandler {
    type Data = ();
    fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
    fn on_disconnect(&self, _: Arc<Socket<()>>, _: DisconnectReason) {}
    fn on_message(self: &Arc<Self>, _: Str, _: Arc<Socket<()>>) {}
    fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
}

fn create_server() -> EngineIoService<MyHandler> {
    let config = EngineIoConfig::builder()
        .ping_interval(INTERVAL)
        .ping_timeout(Duration::from_secs(5))
        .build();
    EngineIoService::with_config(Arc::new(MyHandler), config)
}

#[tokio::test]
async fn ws_first_ping_after_one_interval() {
    let mut svc = create_server();
    let started = Instant::now();
    let mut stream = create_ws_connection(&mut svc).await;
    let open = stream.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with("0{"), "{open:?}");

    let ping = tokio::time::timeout(INTERVAL * 5, stream.next())
        .await
        .expect("no ping within five intervals")
        .unwrap()
        .unwrap();
    assert_eq!(ping, Message::Text("2".into()));
    assert!(
        started.elapsed() >= INTERVAL,
        "the first ping came {:?} after the handshake, before one interval ({INTERVAL:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn polling_first_ping_after_one_interval() {
    let mut svc = create_server();
    let started = Instant::now();
    let sid = create_polling_connection(&mut svc).await;

    // The first poll is held open until there is something to send: the ping.
    let poll = send_req_raw(
        &mut svc,
        format!("transport=polling&sid={sid}"),
        http::Method::GET,
        None,
    );
    let ping = tokio::time::timeout(INTERVAL * 5, poll)
        .await
        .expect("no ping within five intervals");
    assert_eq!(ping, "2");
    assert!(
        started.elapsed() >= INTERVAL,
        "the first ping came {:?} after the handshake, before one interval ({INTERVAL:?})",
        started.elapsed()
    );
}
