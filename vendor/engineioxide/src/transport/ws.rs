//! The ws transport module is responsible for handling websocket connections
//! The only public function is [`new_req`] which is used to upgrade a http request to a websocket connection
//!
//! Other functions are used internally to drive the websocket connection (one task per
//! connection, see [`run`]) and to handle upgrade from polling to ws

use std::{cell::RefCell, pin::Pin, sync::Arc, task::Poll, time::Duration};

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, request::Parts};
use smallvec::smallvec;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::{Instant, Sleep},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message, Utf8Bytes,
        handshake::derive_accept_key,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tokio_util::future::FutureExt as _;

use engineioxide_core::{Packet, ProtocolVersion, Sid, Str, TransportType};

use crate::{
    DisconnectReason, Socket, body::ResponseBody, config::EngineIoConfig, engine::EngineIo,
    errors::Error, handler::EngineIoHandler, outbox::Batch, transport::make_open_packet,
};

/// Create a response for websocket upgrade
fn ws_response<B>(ws_key: &HeaderValue) -> Response<ResponseBody<B>> {
    let derived = derive_accept_key(ws_key.as_bytes());
    let sec = derived.parse::<HeaderValue>().unwrap();
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )
        .header(http::header::SEC_WEBSOCKET_ACCEPT, sec)
        .body(ResponseBody::empty_response())
        .unwrap() // we are only using constants
}

/// Upgrade a websocket request to create a websocket connection.
///
/// If a sid is provided in the query it means that is is upgraded from an existing HTTP polling request.
/// In this case the http polling request is closed and the SID is kept for the websocket
pub fn new_req<R: Send + 'static, B, H: EngineIoHandler>(
    engine: Arc<EngineIo<H>>,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req: Request<R>,
) -> Result<Response<ResponseBody<B>>, Error> {
    let (parts, body) = req.into_parts();
    let req = Request::from_parts(parts.clone(), body);

    let ws_key = parts
        .headers
        .get("Sec-WebSocket-Key")
        .ok_or(Error::InvalidWebSocketKey)?
        .clone();

    tokio::spawn(async move {
        let conn = hyper::upgrade::on(req)
            .await
            .map(hyper_util::rt::TokioIo::new);

        let res = match conn {
            Ok(conn) => on_init(engine.clone(), conn, protocol, sid, parts).await,
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("ws upgrade error: {}", _e);
                return;
            }
        };

        match res {
            Ok(_) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed")
            }
            Err(Error::MultipleWebsocketRequests) => {}
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed with error: {_e}");
                if let Some(sid) = sid {
                    engine.close_session(sid, DisconnectReason::TransportError);
                }
            }
        }
    });

    Ok(ws_response(&ws_key))
}

/// Handle a websocket connection upgrade
///
/// Sends an open packet if it is not an upgrade from a polling request
///
/// Read packets from the websocket and handle them, it will block until the connection is closed
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", name = "init_websocket", skip(engine, conn, req_data))
)]
pub async fn on_init<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(engine.config.ws_read_buffer_size)
        .max_message_size(Some(engine.config.ws_max_message_size))
        .max_frame_size(Some(engine.config.ws_max_frame_size));

    let ws_init = move || WebSocketStream::from_raw_socket(conn, Role::Server, Some(ws_config));
    // A session opened on WebSocket runs its heartbeat in the connection's task; one opened by
    // polling already has its heartbeat task.
    let heartbeat = sid.is_none();
    let (socket, ws) = if let Some(sid) = sid {
        match engine.get_socket(sid) {
            None => return Err(Error::UnknownSessionID(sid)),
            Some(socket) if socket.is_ws() => return Err(Error::MultipleWebsocketRequests),
            Some(socket) => {
                let mut ws = ws_init().await;

                let upgrade_fut = upgrade_handshake::<H, S>(&socket, &mut ws);
                match tokio::time::timeout(engine.config.upgrade_timeout, upgrade_fut)
                    .with_cancellation_token(&socket.cancellation_token)
                    .await
                {
                    Some(Ok(res)) => res?,
                    Some(Err(_)) => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "ws upgrade timed out, closing session");
                        engine.close_session(socket.id, DisconnectReason::TransportError);
                        return Err(Error::Upgrade);
                    }
                    None => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "socket is being closed");
                        return Err(Error::Upgrade);
                    }
                }
                (socket, ws)
            }
        }
    } else {
        let socket = engine.create_session(protocol, TransportType::Websocket, req_data, false);

        #[cfg(feature = "tracing")]
        tracing::debug!("new websocket connection");

        let mut ws = ws_init().await;
        if let Err(e) = init_handshake(socket.id, &mut ws, &engine.config).await {
            // The session exists only for this connection: it must not outlive it.
            engine.close_session(socket.id, DisconnectReason::TransportError);
            return Err(e);
        }
        (socket, ws)
    };
    // The connection gets a task of its own, whose future holds only what the connection
    // needs: this task's state (the upgrade, the handshake's request head, the future of this
    // function) is freed now instead of living as long as the connection.
    tokio::spawn(run(engine, socket, ws, heartbeat));
    Ok(())
}

/// How many batches the connection task writes in one wake-up before it yields to the
/// runtime, so that a socket with a steady stream of packets cannot starve the others.
const WRITE_BATCHES_PER_WAKE_UP: usize = 16;

/// Why the connection task stopped driving the connection.
enum End {
    /// The session was closed (by the engine, the handler, or a close packet just handled).
    Closed,
    /// The client ended the connection, or a read or write failed.
    Failed(Option<Error>),
}

/// Drives one WebSocket connection in one task: it reads the client's packets, writes the
/// [`Socket`]'s outbox, and (for a session opened on WebSocket) runs the heartbeat.
///
/// The upstream engine ran three tasks per connection (reader, writer, heartbeat), with the
/// stream split behind a lock between the first two and the writer re-arming a three-way
/// `select!` at each wake-up. Here one future polls each source with the task's waker, so an
/// idle connection costs one task, and a wake-up drains the whole outbox into the stream with
/// one flush.
async fn run<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    socket: Arc<Socket<H::Data>>,
    mut ws: WebSocketStream<S>,
    heartbeat: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (engine, socket) = (&engine, &socket);
    // A polling request that was in progress during the upgrade may still hold the lock.
    let lock = socket.internal_rx.lock();
    let Some(_transport) = lock
        .with_cancellation_token(&socket.cancellation_token)
        .await
    else {
        #[cfg(feature = "tracing")]
        tracing::debug!(sid = %socket.id, "session closed before starting the ws transport");
        return;
    };

    // In a block of its own, so that its state is not kept beside the close's below.
    let end = {
        let mut heartbeat = heartbeat.then(|| Heartbeat::new(socket.protocol, &engine.config));
        let timer = tokio::time::sleep_until(
            heartbeat
                .as_ref()
                .map_or_else(tokio::time::Instant::now, |h| h.first_deadline()),
        );
        tokio::pin!(timer);
        let mut unflushed = false;

        std::future::poll_fn(|cx| {
            // The session ended (`EngineIo::close_session` interrupts the outbox).
            if socket.outbox.is_interrupted() {
                return Poll::Ready(End::Closed);
            }

            if let Some(heartbeat) = &mut heartbeat {
                while timer.as_mut().poll(cx).is_ready() {
                    if let Err(e) = heartbeat.on_timer(socket, timer.as_mut()) {
                        return Poll::Ready(End::Failed(Some(e)));
                    }
                }
            }

            // Read everything the client sent.
            loop {
                match ws.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(msg))) => {
                        if !socket.take_inbound() {
                            return Poll::Ready(End::Failed(Some(Error::TooManyPackets)));
                        }
                        match on_message(engine, socket, msg, heartbeat.as_mut(), timer.as_mut()) {
                            Ok(true) => {}
                            Ok(false) => return Poll::Ready(End::Closed),
                            Err(e) => return Poll::Ready(End::Failed(Some(e))),
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(End::Failed(Some(e.into()))),
                    Poll::Ready(None) => return Poll::Ready(End::Failed(None)),
                    Poll::Pending => break,
                }
            }

            // Write what is queued, as long as the stream takes it.
            let mut yielded = true;
            for _ in 0..WRITE_BATCHES_PER_WAKE_UP {
                match ws.poll_ready_unpin(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(End::Failed(Some(e.into()))),
                    Poll::Pending => {
                        // The stream is full: the outbox is not polled, but the end of the
                        // session must still wake this task.
                        if socket.outbox.register(cx) {
                            return Poll::Ready(End::Closed);
                        }
                        yielded = false;
                        break;
                    }
                }
                match socket.outbox.poll_take(cx) {
                    Poll::Ready(Some(batch)) => {
                        if let Err(e) = feed(&mut ws, socket.protocol, batch) {
                            return Poll::Ready(End::Failed(Some(e.into())));
                        }
                        unflushed = true;
                    }
                    Poll::Ready(None) => return Poll::Ready(End::Closed),
                    Poll::Pending => {
                        yielded = false;
                        break;
                    }
                }
            }
            if unflushed {
                match ws.poll_flush_unpin(cx) {
                    Poll::Ready(Ok(())) => unflushed = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(End::Failed(Some(e.into()))),
                    Poll::Pending => {}
                }
            }
            if yielded {
                // The write budget ran out with packets still queued: come back after the others.
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    };

    // A client closed for its budget is told why, in the close frame.
    let close_frame = matches!(end, End::Failed(Some(Error::TooManyPackets))).then(|| CloseFrame {
        code: CloseCode::Policy,
        reason: "too many packets".into(),
    });
    match end {
        End::Closed => {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = %socket.id, "socket is closing");
        }
        End::Failed(e) => {
            let reason = e
                .as_ref()
                .and_then(Option::<DisconnectReason>::from)
                .unwrap_or(DisconnectReason::TransportClose);
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = %socket.id, ?e, "ws transport ended");
            engine.close_session(socket.id, reason);
        }
    }

    // Send what was queued before the close (the close packet among it), then close the
    // stream. A client that does not take it within the ping timeout is gone.
    let close = async {
        let batch = std::future::poll_fn(|cx| match socket.outbox.poll_take(cx) {
            Poll::Ready(batch) => Poll::Ready(batch),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        if let Some(batch) = batch {
            feed(&mut ws, socket.protocol, batch).ok();
        }
        #[cfg(feature = "tracing")]
        tracing::trace!(sid = %socket.id, "ws closing flush");
        ws.flush().await.ok();
        ws.close(close_frame).await.ok();
    };
    tokio::time::timeout(engine.config.ping_timeout, close)
        .await
        .ok();
}

/// Hands a batch of packets to the WebSocket stream (buffered; written by the next flush).
fn feed<S>(
    ws: &mut WebSocketStream<S>,
    protocol: ProtocolVersion,
    batch: Batch,
) -> Result<(), tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for packet in batch.into_packets().flatten() {
        let msg = match packet {
            Packet::Binary(bin) | Packet::BinaryV3(bin) => {
                if protocol == ProtocolVersion::V3 {
                    // v3 protocol requires packet type as the first byte.
                    // This requires a new buffer. This is OK as it is only for the V3 protocol.
                    let mut buff = Vec::with_capacity(bin.len() + 1);
                    buff.push(0x04);
                    buff.extend(bin);
                    Message::Binary(buff.into())
                } else {
                    Message::Binary(bin)
                }
            }
            // A Noop Packet maybe sent by the server to upgrade from a polling connection
            // In the case that the packet was not poll in time it will remain in the buffer and therefore
            // it should be discarded here
            Packet::Noop => continue,
            Packet::Message(msg) => Message::Text(framed(msg)),
            packet => Message::Text(String::from(packet).into()),
        };
        // The stream takes every message (it buffers them); back-pressure is its
        // `poll_ready`, checked before each batch.
        ws.start_send_unpin(msg)?;
    }
    Ok(())
}

/// The text of a message packet (`"4"` + the message), framed once per broadcast rather than
/// once per recipient.
///
/// A broadcast hands each of its sockets a clone of one `Str`, and their connections are
/// written by the runtime's few worker threads, so each thread keeps the last message it
/// framed, keyed by the message's bytes: their address and length. The kept clone holds those
/// bytes alive, so a message with the same key is the same bytes, never a reuse of freed
/// memory. A message sent to one socket only misses, at the cost of a reference count.
fn framed(msg: Str) -> Utf8Bytes {
    thread_local! {
        static LAST: RefCell<Option<(Str, Utf8Bytes)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some((key, frame)) = last.as_ref()
            && key.as_ptr() == msg.as_ptr()
            && key.len() == msg.len()
        {
            return frame.clone();
        }
        let frame = Utf8Bytes::from(String::from(Packet::Message(msg.clone())));
        *last = Some((msg, frame.clone()));
        frame
    })
}

/// Handles one message from the client. `Ok(false)` when the session is now closed.
fn on_message<H: EngineIoHandler>(
    engine: &Arc<EngineIo<H>>,
    socket: &Arc<Socket<H::Data>>,
    msg: Message,
    heartbeat: Option<&mut Heartbeat>,
    timer: Pin<&mut Sleep>,
) -> Result<bool, Error> {
    match msg {
        Message::Text(msg) => match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
            Packet::Close => {
                #[cfg(feature = "tracing")]
                tracing::debug!("[sid={}] closing session", socket.id);
                engine.close_session(socket.id, DisconnectReason::TransportClose);
                return Ok(false);
            }
            Packet::Pong | Packet::Ping => match heartbeat {
                Some(heartbeat) => heartbeat.on_signal(socket, timer)?,
                None => socket.heartbeat.notify_one(),
            },
            Packet::Message(msg) => engine.handler.on_message(msg, socket.clone()),
            p => return Err(Error::BadPacket(p)),
        },
        Message::Binary(mut data) => {
            if socket.protocol == ProtocolVersion::V3 && !data.is_empty() {
                // The first byte is the message type, which we don't need.
                data = data.split_off(1);
            }
            engine.handler.on_binary(data, socket.clone());
        }
        Message::Close(_) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("websocket closed, closing session");
            engine.close_session(socket.id, DisconnectReason::TransportClose);
            return Ok(false);
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = ?socket.id, "unexpected ws message");
        }
    }
    Ok(true)
}

/// The heartbeat of a session opened on WebSocket, run by its connection task on one timer
/// (a session opened by polling keeps the engine's heartbeat task through an upgrade).
///
/// v4: the server pings every `ping_interval` and expects a pong within `ping_timeout`.
/// v3: the client pings; the server answers, and expects the next ping within
/// `ping_interval + ping_timeout`.
struct Heartbeat {
    protocol: ProtocolVersion,
    interval: Duration,
    timeout: Duration,
    /// v4: when the last ping was sent, while its pong is awaited.
    ping_sent: Option<Instant>,
}

impl Heartbeat {
    fn new(protocol: ProtocolVersion, config: &EngineIoConfig) -> Self {
        Self {
            protocol,
            interval: config.ping_interval,
            timeout: config.ping_timeout,
            ping_sent: None,
        }
    }

    fn first_deadline(&self) -> Instant {
        match self.protocol {
            // One interval after the handshake, as in the reference engine (Node's
            // engine.io), not at once: see the polling heartbeat in `socket.rs`.
            ProtocolVersion::V4 => Instant::now() + self.interval,
            #[cfg(feature = "v3")]
            ProtocolVersion::V3 => Instant::now() + self.interval + self.timeout,
            #[cfg(not(feature = "v3"))]
            ProtocolVersion::V3 => Instant::now() + self.interval,
        }
    }

    /// The timer fired: time to ping, or the client missed its deadline.
    fn on_timer<D: Default + Send + Sync + 'static>(
        &mut self,
        socket: &Socket<D>,
        timer: Pin<&mut Sleep>,
    ) -> Result<(), Error> {
        if self.protocol != ProtocolVersion::V4 || self.ping_sent.is_some() {
            return Err(Error::HeartbeatTimeout);
        }
        #[cfg(feature = "tracing")]
        tracing::trace!(sid = ?socket.id, "emitting ping");
        socket
            .outbox
            .try_push(smallvec![Packet::Ping])
            .map_err(|_| Error::HeartbeatTimeout)?;
        let now = timer.deadline();
        self.ping_sent = Some(now);
        timer.reset(now + self.timeout);
        Ok(())
    }

    /// The client sent a pong (v4) or a ping (v3).
    fn on_signal<D: Default + Send + Sync + 'static>(
        &mut self,
        socket: &Socket<D>,
        timer: Pin<&mut Sleep>,
    ) -> Result<(), Error> {
        match self.protocol {
            ProtocolVersion::V4 => {
                // A pong that was not asked for (some clients send one first) changes nothing.
                if let Some(sent) = self.ping_sent.take() {
                    #[cfg(feature = "tracing")]
                    tracing::trace!(sid = ?socket.id, "pong received");
                    timer.reset(sent + self.interval);
                }
            }
            ProtocolVersion::V3 => {
                socket
                    .outbox
                    .try_push(smallvec![Packet::Pong])
                    .map_err(|_| Error::HeartbeatTimeout)?;
                timer.reset(Instant::now() + self.interval + self.timeout);
            }
        }
        Ok(())
    }
}

/// Send a Engine.IO [`OpenPacket`] to initiate a websocket connection
async fn init_handshake<S>(
    sid: Sid,
    ws: &mut WebSocketStream<S>,
    config: &EngineIoConfig,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let packet = Packet::Open(make_open_packet(TransportType::Websocket, sid, config));
    let packet: String = packet.into();
    ws.send(Message::Text(packet.into())).await?;
    Ok(())
}

/// Upgrade a session from a polling request to a websocket request.
///
/// Before upgrading the session the server should send a NOOP packet to any pending polling request.
///
/// ## Handshake :
/// ```text
/// CLIENT                                                 SERVER
///│                                                      │
///│   GET /engine.io/?EIO=4&transport=websocket&sid=...  │
///│ ───────────────────────────────────────────────────► │
///│  ◄─────────────────────────────────────────────────┘ │
///│            HTTP 101 (WebSocket handshake)            │
///│                                                      │
///│            -----  WebSocket frames -----             │
///│  ─────────────────────────────────────────────────►  │
///│                         2probe                       │ (ping packet)
///│  ◄─────────────────────────────────────────────────  │
///│                         3probe                       │ (pong packet)
///│  ─────────────────────────────────────────────────►  │
///│                         5                            │ (upgrade packet)
///│                                                      │
///│            -----  WebSocket frames -----             │
/// ```
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", skip(socket, ws))
)]
async fn upgrade_handshake<H: EngineIoHandler, S>(
    socket: &Arc<Socket<H::Data>>,
    ws: &mut WebSocketStream<S>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[cfg(feature = "tracing")]
    tracing::debug!("starting websocket connection upgrade");

    // The socket is upgrading, from now on all polling
    // request will return a `Packet::Noop`
    socket.start_upgrade();

    // We send a last Noop request to close a potential waiting polling request.
    if !socket.outbox.push_unbounded(smallvec![Packet::Noop]) {
        return Err(Error::Upgrade);
    }

    // wait for any current polling connection to finish by waiting for the socket to be unlocked
    // All other polling connection will be immediately closed with a NOOP packet.
    let _lock = socket.internal_rx.lock().await;

    // Fetch the next packet from the ws stream, it should be a PingUpgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        _ => Err(Error::Upgrade)?,
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::PingUpgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("received first ping upgrade");
            // Respond with a PongUpgrade packet
            ws.send(Message::Text(String::from(Packet::PongUpgrade).into()))
                .await?;
        }
        p => Err(Error::BadPacket(p))?,
    };

    // Fetch the next packet from the ws stream, it should be an Upgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        Some(Ok(Message::Close(_))) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws stream closed before upgrade");
            Err(Error::Upgrade)?
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!("unexpected ws message before upgrade");
            Err(Error::Upgrade)?
        }
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::Upgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws upgraded successfully")
        }
        p => Err(Error::BadPacket(p))?,
    };

    socket.upgrade_to_websocket();
    Ok(())
}

fn ws_bytes_to_str(bytes: tungstenite::Utf8Bytes) -> Str {
    // SAFETY: the bytes are guaranteed to be valid UTF-8 by the tungstenite parser
    unsafe { Str::from_bytes_unchecked(bytes.into()) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http::Request;
    use tokio::io::DuplexStream;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    #[test]
    fn a_broadcast_message_is_framed_once_and_shared() {
        let msg = Str::from("hello".to_string());
        let first = framed(msg.clone());
        let second = framed(msg.clone());
        assert_eq!(first.as_str(), "4hello");
        assert_eq!(second.as_str(), "4hello");
        assert_eq!(
            first.as_str().as_ptr(),
            second.as_str().as_ptr(),
            "framed twice"
        );
    }

    #[test]
    fn other_messages_are_framed_as_themselves() {
        let msg = Str::from("hello world".to_string());
        assert_eq!(framed(msg.clone()).as_str(), "4hello world");
        // The same first byte, a shorter length: another message.
        assert_eq!(framed(msg.slice(0..5)).as_str(), "4hello");
        // The same text in other bytes.
        assert_eq!(framed(Str::from("hello".to_string())).as_str(), "4hello");
        assert_eq!(framed(Str::from("bye".to_string())).as_str(), "4bye");
        assert_eq!(framed(msg).as_str(), "4hello world");
    }

    #[derive(Debug)]
    struct StubHandler;
    impl EngineIoHandler for StubHandler {
        type Data = ();
        fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
        fn on_disconnect(&self, _: Arc<Socket<()>>, _: DisconnectReason) {}
        fn on_message(self: &Arc<Self>, _: Str, _: Arc<Socket<()>>) {}
        fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
    }

    fn socket() -> Arc<Socket<()>> {
        Arc::new(Socket::new(
            ProtocolVersion::V4,
            TransportType::Websocket,
            &EngineIoConfig::default(),
            Request::<()>::default().into_parts().0,
            Box::new(|_, _| ()),
            false,
        ))
    }

    /// The connection task of `socket`, without a heartbeat.
    fn spawn_run(
        socket: Arc<Socket<()>>,
        ws: WebSocketStream<DuplexStream>,
    ) -> tokio::task::JoinHandle<()> {
        let engine = Arc::new(EngineIo::new(
            Arc::new(StubHandler),
            EngineIoConfig::default(),
        ));
        tokio::spawn(run(engine, socket, ws, false))
    }

    async fn ws_pair() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    #[derive(Debug)]
    struct Sessions(std::sync::Mutex<Vec<(Sid, Option<DisconnectReason>)>>);
    impl EngineIoHandler for Sessions {
        type Data = ();
        fn on_connect(self: Arc<Self>, socket: Arc<Socket<()>>) {
            self.0.lock().unwrap().push((socket.id, None));
        }
        fn on_disconnect(&self, socket: Arc<Socket<()>>, reason: DisconnectReason) {
            self.0.lock().unwrap().push((socket.id, Some(reason)));
        }
        fn on_message(self: &Arc<Self>, _: Str, _: Arc<Socket<()>>) {}
        fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
    }

    /// A session opened on a connection that fails before its open packet is written
    /// exists for nothing else: it is closed, not left in the engine's map.
    #[tokio::test]
    async fn a_session_whose_open_packet_cannot_be_written_is_closed() {
        let handler = Arc::new(Sessions(std::sync::Mutex::new(Vec::new())));
        let engine = Arc::new(EngineIo::new(handler.clone(), EngineIoConfig::default()));
        let (server, client) = tokio::io::duplex(1024);
        drop(client);
        let parts = Request::<()>::default().into_parts().0;
        let res = on_init(engine.clone(), server, ProtocolVersion::V4, None, parts).await;
        assert!(res.is_err(), "the open packet cannot be written");

        let sid = handler.0.lock().unwrap()[0].0;
        assert!(
            engine.get_socket(sid).is_none(),
            "the session was left open"
        );
        let disconnected = async {
            loop {
                if handler.0.lock().unwrap().len() == 2 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(TIMEOUT, disconnected)
            .await
            .expect("the handler hears of the session's end");
        assert_eq!(
            handler.0.lock().unwrap()[1],
            (sid, Some(DisconnectReason::TransportError))
        );
    }

    /// A polling request can still hold the lock at the end of an upgrade.
    #[tokio::test]
    async fn writer_waits_for_the_lock_of_a_polling_request() {
        let socket = socket();
        let (server, mut client) = ws_pair().await;

        let polling = socket.internal_rx.lock().await;
        let writer = spawn_run(socket.clone(), server);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!writer.is_finished(), "the writer should wait for the lock");

        drop(polling);
        socket.emit(Str::from("hello")).unwrap();
        let msg = tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("the writer should send the packet")
            .unwrap()
            .unwrap();
        assert_eq!(msg, Message::text("4hello"));
    }

    #[tokio::test]
    async fn writer_waiting_for_the_lock_stops_with_the_session() {
        let socket = socket();
        let (server, _client) = ws_pair().await;

        let _polling = socket.internal_rx.lock().await;
        let writer = spawn_run(socket.clone(), server);
        tokio::time::sleep(Duration::from_millis(20)).await;

        socket.cancellation_token.cancel();
        tokio::time::timeout(TIMEOUT, writer)
            .await
            .expect("the writer should stop")
            .unwrap();
    }
}
