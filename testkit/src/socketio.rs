//! The Socket.IO v5 wire protocol as a client speaks it over Engine.IO v4, WebSocket
//! transport only (no polling, no upgrade): the handshake, and the text frames both ways.
//!
//! Two clients are built on it, and share only this: what must agree with the server.
//! The tests' [`crate::Client`] runs a task and two channels per connection and parses every
//! event into JSON, so that a test can await what it expects with a timeout. The load
//! generator's connection must cost little enough for tens of thousands to run at once: one
//! task each, owned by the caller, no channels, a small read buffer, frames read as borrowed
//! text and event bodies never parsed on the hot path. Neither can take the other's shape
//! without losing what it exists for, so the kit holds the protocol and each keeps its
//! connection loop. [`decode`] therefore borrows from the frame and parses no JSON.

use std::fmt;
use std::net::SocketAddr;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

pub type Ws = WebSocketStream<TcpStream>;

/// The Engine.IO pong, the answer to a [`Frame::Ping`].
pub const PONG: &str = "3";
/// The Socket.IO DISCONNECT of the default namespace.
pub const DISCONNECT: &str = "41";

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The WebSocket upgrade failed (or the connection broke while reading the open packet).
    WebSocket(tungstenite::Error),
    /// The connection ended before the open packet.
    Closed(String),
    /// The first text frame was not an Engine.IO open packet with a session id.
    NotOpen(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WebSocket(e) => write!(f, "WebSocket handshake: {e}"),
            Self::Closed(how) => write!(f, "closed before the Engine.IO open packet ({how})"),
            Self::NotOpen(text) => write!(f, "expected an Engine.IO open packet, got {text:?}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// The WebSocket upgrade to `/socket.io/` on `tcp`, connected to `addr`.
pub async fn upgrade(
    tcp: TcpStream,
    addr: SocketAddr,
    config: Option<WebSocketConfig>,
) -> Result<Ws, HandshakeError> {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    client_async_with_config(url, tcp, config)
        .await
        .map(|(ws, _)| ws)
        .map_err(HandshakeError::WebSocket)
}

/// Reads the Engine.IO open packet, the server's first frame; returns the session id.
pub async fn read_open(ws: &mut Ws) -> Result<String, HandshakeError> {
    let text = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => break text,
            Some(Ok(Message::Close(frame))) => {
                return Err(HandshakeError::Closed(format!("close frame {frame:?}")));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(HandshakeError::WebSocket(e)),
            None => return Err(HandshakeError::Closed("end of stream".into())),
        }
    };
    let sid = match decode(text.as_str()) {
        Frame::Open(body) => serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|open| Some(open["sid"].as_str()?.to_string())),
        _ => None,
    };
    sid.ok_or_else(|| HandshakeError::NotOpen(text.to_string()))
}

/// One Engine.IO text frame, as far as a client cares; payloads are borrowed JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `0{…}`: the Engine.IO open packet.
    Open(&'a str),
    /// `1`: the server closes the Engine.IO session.
    Close,
    /// `2`: answer with [`PONG`], or the server ends the session.
    Ping,
    /// `40{…}`: the namespace accepted the CONNECT.
    Connected,
    /// `41`: the server disconnected this socket.
    Disconnect,
    /// `42[…]` or `42<id>[…]`: an event; `args` is the JSON array `["name", data, …]`.
    Event { id: Option<u64>, args: &'a str },
    /// `43<id>[…]`: an acknowledgement and its arguments.
    Ack { id: Option<u64>, args: &'a str },
    /// `44{…}`: the namespace refused the CONNECT.
    ConnectError(&'a str),
    /// Anything else (pong, noop, binary attachments).
    Other,
}

/// What one text frame is.
pub fn decode(text: &str) -> Frame<'_> {
    match text {
        "1" => return Frame::Close,
        "2" => return Frame::Ping,
        _ => {}
    }
    if let Some(open) = text.strip_prefix('0') {
        return Frame::Open(open);
    }
    let Some(sio) = text.strip_prefix('4') else {
        return Frame::Other;
    };
    let kind = match sio.as_bytes().first() {
        Some(&kind @ b'0'..=b'4') => kind,
        _ => return Frame::Other,
    };
    // After the (ASCII) type: an optional numeric id, then the JSON payload.
    let rest = &sio[1..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (id, body) = rest.split_at(digits);
    let id = id.parse().ok();
    match kind {
        b'0' => Frame::Connected,
        b'1' => Frame::Disconnect,
        b'2' => Frame::Event { id, args: body },
        b'3' => Frame::Ack { id, args: body },
        b'4' => Frame::ConnectError(body),
        _ => Frame::Other,
    }
}

/// The CONNECT packet: `40`, with `auth` as its payload if given (`{"token": …}`).
pub fn connect(auth: Option<&Value>) -> String {
    match auth {
        Some(auth) => format!("40{auth}"),
        None => "40".to_string(),
    }
}

/// An event, `42["name",data]`, or `42<id>["name",data]` when it asks for an
/// acknowledgement.
pub fn event(name: &str, data: &Value, ack: Option<u64>) -> String {
    let args = json!([name, data]);
    match ack {
        Some(id) => format!("42{id}{args}"),
        None => format!("42{args}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_without_parsing_their_payload() {
        assert_eq!(decode("0{\"sid\":\"a\"}"), Frame::Open("{\"sid\":\"a\"}"));
        assert_eq!(decode("1"), Frame::Close);
        assert_eq!(decode("2"), Frame::Ping);
        assert_eq!(decode("3"), Frame::Other);
        assert_eq!(decode("40{\"sid\":\"b\"}"), Frame::Connected);
        assert_eq!(decode("41"), Frame::Disconnect);
        assert_eq!(
            decode("42[\"e\",{\"a\":1}]"),
            Frame::Event {
                id: None,
                args: "[\"e\",{\"a\":1}]"
            }
        );
        assert_eq!(
            decode("4217[\"e\"]"),
            Frame::Event {
                id: Some(17),
                args: "[\"e\"]"
            }
        );
        assert_eq!(
            decode("433[{\"ok\":true}]"),
            Frame::Ack {
                id: Some(3),
                args: "[{\"ok\":true}]"
            }
        );
        assert_eq!(
            decode("44{\"message\":\"m\"}"),
            Frame::ConnectError("{\"message\":\"m\"}")
        );
        assert_eq!(decode("4"), Frame::Other);
        assert_eq!(decode("4é"), Frame::Other);
        assert_eq!(decode(""), Frame::Other);
    }

    #[test]
    fn packets_encode() {
        assert_eq!(connect(None), "40");
        assert_eq!(connect(Some(&json!({"token": "t"}))), "40{\"token\":\"t\"}");
        assert_eq!(event("e", &json!({"a": 1}), None), "42[\"e\",{\"a\":1}]");
        assert_eq!(event("e", &json!(null), Some(4)), "424[\"e\",null]");
    }
}
