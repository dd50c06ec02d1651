//! The tests' Socket.IO v5 client (Engine.IO v4, WebSocket transport only, on the protocol
//! of [`crate::socketio`]), enough to play a dashboard: connect with a token, receive events,
//! emit with an acknowledgement.
//!
//! A background task owns the WebSocket: it answers Engine.IO pings (`2` → `3`) so a client
//! stays connected however long a test takes, and turns frames into [`Packet`]s on a
//! channel, so that a test awaits what it expects with a timeout. [`SlowClient`] is the
//! opposite: a dashboard that stops reading, with a tiny TCP receive window, to play a
//! slow consumer.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::QUICK;
use crate::socketio::{self, Frame, Ws};

/// What a client can observe.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// `42["name",data]`.
    Event(String, Value),
    /// `42["name",data,{"seq":n}]`: a durable event and its sequence number.
    Durable(String, Value, u64),
    /// `43<id>[...]`: the arguments of the acknowledgement.
    Ack(u64, Value),
    /// `41`: the server disconnected this Socket.IO socket.
    Disconnect,
    /// `44{...}`: the server refused the namespace connection.
    ConnectError(Value),
    /// The WebSocket (and so the Engine.IO session) ended; the text says how.
    Closed(String),
}

enum Outgoing {
    Text(String),
    Close,
}

pub struct Client {
    /// The Engine.IO session id from the open packet.
    pub sid: String,
    incoming: mpsc::UnboundedReceiver<Packet>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    /// Packets received while waiting for an acknowledgement, delivered next.
    stash: VecDeque<Packet>,
    next_ack: u64,
    pump: JoinHandle<()>,
    leaving: bool,
}

impl Client {
    /// Connects and sends the Socket.IO CONNECT packet with `auth` as its payload (`40` alone
    /// when `None`). Returns at once: the server's answer is the next packet.
    pub async fn connect(addr: SocketAddr, auth: Option<Value>) -> Self {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let (mut ws, sid) = handshake(tcp, addr).await;
        ws.send(Message::text(socketio::connect(auth.as_ref())))
            .await
            .expect("sending CONNECT");
        let (in_tx, incoming) = mpsc::unbounded_channel();
        let (outgoing, out_rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(ws, out_rx, in_tx));
        Self {
            sid,
            incoming,
            outgoing,
            stash: VecDeque::new(),
            next_ack: 1,
            pump,
            leaving: false,
        }
    }

    /// Connects with `{"token": token}` as the CONNECT payload.
    pub async fn with_token(addr: SocketAddr, token: &str) -> Self {
        Self::connect(addr, Some(json!({ "token": token }))).await
    }

    /// Connects with `token` and waits for `auth-success`; returns the client and its payload.
    pub async fn authenticated(addr: SocketAddr, token: &str) -> (Self, Value) {
        let mut client = Self::with_token(addr, token).await;
        let ack = client.expect("auth-success", QUICK).await;
        (client, ack)
    }

    /// Connects with `auth` and expects the refusal every refused client gets: `auth-error`
    /// `{"error": message}`, then a Socket.IO DISCONNECT (`41`).
    pub async fn refused(addr: SocketAddr, auth: Option<Value>, message: &str) -> Self {
        let mut client = Self::connect(addr, auth.clone()).await;
        match client.next(QUICK).await {
            Some(Packet::Event(name, data)) if name == "auth-error" => {
                assert_eq!(data, json!({ "error": message }), "auth {auth:?}");
            }
            other => panic!("auth {auth:?}: expected auth-error, got {other:?}"),
        }
        client.expect_disconnect(QUICK).await;
        client
    }

    /// The next packet, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Packet> {
        if let Some(p) = self.stash.pop_front() {
            return Some(p);
        }
        self.recv(timeout).await
    }

    async fn recv(&mut self, timeout: Duration) -> Option<Packet> {
        match tokio::time::timeout(timeout, self.incoming.recv()).await {
            Ok(Some(p)) => Some(p),
            Ok(None) => Some(Packet::Closed("connection already closed".into())),
            Err(_) => None,
        }
    }

    /// The next event as `(name, data)`; panics if the next packet is not an event.
    pub async fn next_event(&mut self, timeout: Duration) -> (String, Value) {
        let (name, data, _) = self.next_durable(timeout).await;
        (name, data)
    }

    /// The next event as `(name, data, seq)` (`seq` only for durable events); panics if the
    /// next packet is not an event.
    pub async fn next_durable(&mut self, timeout: Duration) -> (String, Value, Option<u64>) {
        match self.next(timeout).await {
            Some(Packet::Event(name, data)) => (name, data, None),
            Some(Packet::Durable(name, data, seq)) => (name, data, Some(seq)),
            Some(other) => panic!("expected an event, got {other:?}"),
            None => panic!("no event within {timeout:?}"),
        }
    }

    /// Waits for the next packet and checks that it is `event`; returns its data.
    pub async fn expect(&mut self, event: &str, timeout: Duration) -> Value {
        match self.next(timeout).await {
            Some(Packet::Event(name, data) | Packet::Durable(name, data, _)) if name == event => {
                data
            }
            Some(other) => panic!("expected event {event:?}, got {other:?}"),
            None => panic!("expected event {event:?}, got nothing within {timeout:?}"),
        }
    }

    /// Waits for a Socket.IO DISCONNECT (`41`) as the next packet.
    pub async fn expect_disconnect(&mut self, timeout: Duration) {
        match self.next(timeout).await {
            Some(Packet::Disconnect) => {}
            Some(other) => panic!("expected a DISCONNECT packet (41), got {other:?}"),
            None => panic!("expected a DISCONNECT packet (41), got nothing within {timeout:?}"),
        }
    }

    /// Collects the events received before `marker`, which must arrive within `timeout`.
    /// Panics if the connection ends first.
    pub async fn events_until(&mut self, marker: &str, timeout: Duration) -> Vec<(String, Value)> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Packet::Event(name, _) | Packet::Durable(name, _, _)) if name == marker => {
                    return seen;
                }
                Some(Packet::Event(name, data) | Packet::Durable(name, data, _)) => {
                    seen.push((name, data))
                }
                Some(other) => panic!(
                    "got {other:?} while waiting for {marker:?}; before it: {}",
                    summary(&seen)
                ),
                None => panic!(
                    "no {marker:?} within {timeout:?}; before it: {}",
                    summary(&seen)
                ),
            }
        }
    }

    /// Waits until the transport is closed; returns what arrived before.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Vec<Packet> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Packet::Closed(_)) => return seen,
                Some(p) => seen.push(p),
                None => panic!("connection still open after {timeout:?}; received {seen:?}"),
            }
        }
    }

    /// Emits `42["event",data]`.
    pub fn emit(&self, event: &str, data: Value) {
        self.send_raw(socketio::event(event, &data, None));
    }

    /// Emits `42<id>["event",data]` and waits for `43<id>[...]`; returns the ack's arguments.
    /// Packets that arrive meanwhile are kept for [`Client::next`].
    pub async fn emit_with_ack(&mut self, event: &str, data: Value, timeout: Duration) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        self.send_raw(socketio::event(event, &data, Some(id)));
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(Packet::Ack(got, args)) if got == id => return args,
                Some(p @ Packet::Closed(_)) => panic!("closed while waiting for ack {id}: {p:?}"),
                Some(p) => self.stash.push_back(p),
                None => panic!("no ack {id} for {event:?} within {timeout:?}"),
            }
        }
    }

    /// Sends one raw Engine.IO text frame.
    pub fn send_raw(&self, text: String) {
        let _ = self.outgoing.send(Outgoing::Text(text));
    }

    /// Leaves like a browser tab closing politely: Socket.IO DISCONNECT, then WebSocket close.
    pub fn disconnect(mut self) {
        self.leaving = true;
        let _ = self
            .outgoing
            .send(Outgoing::Text(socketio::DISCONNECT.into()));
        let _ = self.outgoing.send(Outgoing::Close);
    }
}

impl Drop for Client {
    /// A client dropped without [`Client::disconnect`] drops its TCP connection, like a lost
    /// network; after `disconnect`, the pump sends the queued packets and then closes.
    fn drop(&mut self) {
        if !self.leaving {
            self.pump.abort();
        }
    }
}

/// A short description of received events, for failure messages.
fn summary(events: &[(String, Value)]) -> String {
    let shown: Vec<String> = events
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(|(name, data)| {
            let data = data.to_string();
            let cut = data.char_indices().nth(80).map_or(data.len(), |(i, _)| i);
            format!("{name} {}", &data[..cut])
        })
        .collect();
    format!(
        "{} event(s), the last: [{}]",
        events.len(),
        shown.join(", ")
    )
}

/// Opens the WebSocket and reads the Engine.IO open packet, each within [`QUICK`]; returns
/// the stream and the sid.
async fn handshake(tcp: TcpStream, addr: SocketAddr) -> (Ws, String) {
    let mut ws = tokio::time::timeout(QUICK, socketio::upgrade(tcp, addr, None))
        .await
        .unwrap_or_else(|_| panic!("WebSocket handshake with {addr} timed out"))
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    let sid = tokio::time::timeout(QUICK, socketio::read_open(&mut ws))
        .await
        .expect("no Engine.IO open packet")
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    (ws, sid)
}

/// What a frame means to a test, if anything: events are parsed here.
fn packet(frame: Frame<'_>) -> Option<Packet> {
    let json = |body: &str| serde_json::from_str::<Value>(body).unwrap_or(Value::Null);
    Some(match frame {
        Frame::Event { args, .. } => {
            let args = json(args);
            let name = args[0].as_str().unwrap_or_default().to_string();
            let data = args.get(1).cloned().unwrap_or(Value::Null);
            match args.get(2).and_then(|meta| meta["seq"].as_u64()) {
                Some(seq) => Packet::Durable(name, data, seq),
                None => Packet::Event(name, data),
            }
        }
        Frame::Ack { id, args } => Packet::Ack(id.unwrap_or(0), json(args)),
        Frame::ConnectError(body) => Packet::ConnectError(json(body)),
        Frame::Disconnect => Packet::Disconnect,
        _ => return None,
    })
}

async fn pump(
    mut ws: Ws,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    incoming: mpsc::UnboundedSender<Packet>,
) {
    let why = loop {
        tokio::select! {
            out = outgoing.recv() => match out {
                Some(Outgoing::Text(text)) => {
                    if let Err(e) = ws.send(Message::text(text)).await {
                        break format!("send failed: {e}");
                    }
                }
                Some(Outgoing::Close) | None => {
                    let _ = ws.close(None).await;
                    return;
                }
            },
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => match socketio::decode(text.as_str()) {
                    Frame::Ping => {
                        if let Err(e) = ws.send(Message::text(socketio::PONG)).await {
                            break format!("pong failed: {e}");
                        }
                    }
                    frame => {
                        if let Some(p) = packet(frame) {
                            let _ = incoming.send(p);
                        }
                    }
                },
                Some(Ok(Message::Close(frame))) => break format!("close frame {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("read error: {e}"),
                None => break "end of stream".to_string(),
            },
        }
    };
    let _ = incoming.send(Packet::Closed(why));
}

/// A dashboard that stopped reading: a tiny receive buffer, and nothing read after
/// `auth-success`, so whatever the server sends piles up on the server side.
pub struct SlowClient {
    ws: Ws,
}

/// What a [`SlowClient`] finds when it finally reads.
#[derive(Debug)]
pub struct Drained {
    /// Events read before the connection ended.
    pub events: usize,
    /// Whether a Socket.IO DISCONNECT (`41`) was among them.
    pub disconnect_packet: bool,
    /// How the connection ended, or `None` if it was still open at the deadline.
    pub closed: Option<String>,
}

impl SlowClient {
    pub async fn connect(addr: SocketAddr, token: &str, recv_buffer: u32) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(recv_buffer).unwrap();
        let tcp = socket
            .connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let (mut ws, _) = handshake(tcp, addr).await;
        ws.send(Message::text(socketio::connect(Some(
            &json!({ "token": token }),
        ))))
        .await
        .unwrap();
        let deadline = Instant::now() + QUICK;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, ws.next())
                .await
                .expect("no auth-success for the slow client")
                .expect("slow client closed before auth-success")
                .unwrap();
            if let Message::Text(text) = frame {
                match packet(socketio::decode(text.as_str())) {
                    Some(Packet::Event(name, _)) if name == "auth-success" => break,
                    Some(p) => panic!("slow client got {p:?} before auth-success"),
                    None => {}
                }
            }
        }
        Self { ws }
    }

    /// Reads everything until the connection ends or `timeout` passes.
    pub async fn drain(mut self, timeout: Duration) -> Drained {
        let deadline = Instant::now() + timeout;
        let mut drained = Drained {
            events: 0,
            disconnect_packet: false,
            closed: None,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => return drained,
                Ok(frame) => frame,
            };
            match frame {
                Some(Ok(Message::Text(text))) => match socketio::decode(text.as_str()) {
                    Frame::Event { .. } => drained.events += 1,
                    Frame::Disconnect => drained.disconnect_packet = true,
                    _ => {}
                },
                Some(Ok(Message::Close(frame))) => {
                    drained.closed = Some(format!("close frame {frame:?}"));
                    return drained;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drained.closed = Some(format!("read error: {e}"));
                    return drained;
                }
                None => {
                    drained.closed = Some("end of stream".into());
                    return drained;
                }
            }
        }
    }
}
