//! The generator's WebSocket client: one small task per connection, tens of thousands of them.
//!
//! Two dialects over the same code. `socketio` plays a dashboard against fanout or the Node
//! peer: Socket.IO v5 over Engine.IO v4, WebSocket transport only (no polling, no upgrade),
//! token in the CONNECT packet, ready at `auth-success`, pings answered. `raw` plays the same
//! dashboard against the baseline: the organization in the query string, ready at
//! `{"ready":true}`, every text frame a message body.
//!
//! It is built for memory and CPU, not features: no per-connection channels or helper
//! tasks, a 4 KiB read buffer instead of tungstenite's 128 KiB default (50,000 connections
//! would otherwise reserve gigabytes), frames handed to the caller as borrowed bytes. That
//! is why it is not the tests' client of `fanout_testkit`, which has a task and channels per
//! connection: the two share the protocol (`fanout_testkit::socketio`: the handshake, the
//! frame types, the CONNECT packet) and nothing else.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fanout_testkit::socketio::{self, Frame, HandshakeError, Ws};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::client_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::message::socketio_event;
use crate::net;

/// Which dialect the servers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// Socket.IO v5 / Engine.IO v4 with a JWT in the CONNECT packet (fanout, the Node peer).
    Socketio,
    /// Plain WebSocket, organization in the query string (the baseline).
    Raw,
}

impl System {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Socketio => "socketio",
            Self::Raw => "raw",
        }
    }
}

/// Why a connection did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("TCP connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Handshake(HandshakeError),
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("closed before ready ({0})")]
    Closed(String),
    #[error("auth-success names organization {got:?}, the token says {want:?}")]
    WrongOrg { got: String, want: String },
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// An open connection, ready to receive its organization's messages.
pub struct Conn {
    ws: Ws,
    system: System,
}

impl Conn {
    /// Connects from `source` to `dst` and waits until the server says the connection is
    /// ready (`auth-success` or `{"ready":true}`). `token` is used by `socketio` only.
    pub async fn open(
        system: System,
        source: Option<Ipv4Addr>,
        dst: SocketAddr,
        org: &str,
        token: &str,
    ) -> Result<Self, OpenError> {
        Self::open_with(system, source, dst, org, token, None).await
    }

    /// [`Conn::open`] for a durable client that resumes its stream: `lastSeq` in the
    /// CONNECT payload, so the server replays every event of `org` after it before the live
    /// ones (`socketio` only).
    pub async fn resume(
        dst: SocketAddr,
        org: &str,
        token: &str,
        last_seq: u64,
    ) -> Result<Self, OpenError> {
        Self::open_with(System::Socketio, None, dst, org, token, Some(last_seq)).await
    }

    async fn open_with(
        system: System,
        source: Option<Ipv4Addr>,
        dst: SocketAddr,
        org: &str,
        token: &str,
        last_seq: Option<u64>,
    ) -> Result<Self, OpenError> {
        let tcp = net::connect(source, dst)
            .await
            .map_err(OpenError::Connect)?;
        let mut conn = match system {
            System::Socketio => {
                let mut ws = socketio::upgrade(tcp, dst, Some(config()))
                    .await
                    .map_err(OpenError::Handshake)?;
                socketio::read_open(&mut ws)
                    .await
                    .map_err(OpenError::Handshake)?;
                Self { ws, system }
            }
            System::Raw => {
                let (ws, _) =
                    client_async_with_config(format!("ws://{dst}/?org={org}"), tcp, Some(config()))
                        .await
                        .map_err(|e| OpenError::Handshake(HandshakeError::WebSocket(e)))?;
                Self { ws, system }
            }
        };
        match system {
            System::Socketio => conn.authenticate(org, token, last_seq).await?,
            System::Raw => conn.await_ready().await?,
        }
        Ok(conn)
    }

    /// Sends the CONNECT with the token and reads until `auth-success`.
    async fn authenticate(
        &mut self,
        org: &str,
        token: &str,
        last_seq: Option<u64>,
    ) -> Result<(), OpenError> {
        let auth = match last_seq {
            Some(n) => serde_json::json!({ "token": token, "lastSeq": n }),
            None => serde_json::json!({ "token": token }),
        };
        self.send(socketio::connect(Some(&auth))).await?;
        loop {
            let text = self.next_text().await?;
            match socketio::decode(&text) {
                Frame::Ping => self.send(socketio::PONG.to_string()).await?,
                Frame::Event { args, .. } if args.starts_with("[\"auth-success\",") => {
                    return check_org(args, org);
                }
                Frame::Event { args, .. } if args.starts_with("[\"auth-error\",") => {
                    return Err(OpenError::Rejected(text));
                }
                Frame::ConnectError(_) => return Err(OpenError::Rejected(text)),
                Frame::Disconnect => {
                    return Err(OpenError::Closed("Socket.IO disconnect".into()));
                }
                // `40{"sid":..}` and anything else before auth-success.
                _ => {}
            }
        }
    }

    async fn await_ready(&mut self) -> Result<(), OpenError> {
        loop {
            if self.next_text().await? == r#"{"ready":true}"# {
                return Ok(());
            }
        }
    }

    async fn next_text(&mut self) -> Result<String, OpenError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
                Some(Ok(Message::Close(f))) => {
                    return Err(OpenError::Closed(format!("close frame {f:?}")));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(OpenError::Closed(e.to_string())),
                None => return Err(OpenError::Closed("end of stream".into())),
            }
        }
    }

    async fn send(&mut self, text: String) -> Result<(), OpenError> {
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| OpenError::Closed(format!("send failed: {e}")))
    }

    /// Receives until the connection ends, handing each message body to `on_body` with the
    /// sequence number of a durable event (fanout with a history); answers pings meanwhile.
    /// Returns how the connection ended.
    pub async fn run(self, on_body: impl FnMut(&[u8], Option<u64>)) -> String {
        self.run_with_events(on_body, |_| true).await
    }

    /// [`Conn::run`] that also hands every other event (its arguments, `["name",...]`) to
    /// `on_event`, which ends the run by returning false (the connection is then dropped,
    /// unread frames with it).
    pub async fn run_with_events(
        mut self,
        mut on_body: impl FnMut(&[u8], Option<u64>),
        mut on_event: impl FnMut(&str) -> bool,
    ) -> String {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => match self.system {
                    System::Raw => on_body(text.as_bytes(), None),
                    System::Socketio => {
                        let text = text.as_str();
                        // The hot path first: an event body, without decoding the frame.
                        if let Some((body, seq)) = socketio_event(text) {
                            on_body(body.as_bytes(), seq);
                            continue;
                        }
                        match socketio::decode(text) {
                            Frame::Ping => {
                                if let Err(e) = self.ws.send(Message::text(socketio::PONG)).await {
                                    return format!("pong failed: {e}");
                                }
                            }
                            Frame::Disconnect => {
                                return "disconnected by the server (Socket.IO 41)".into();
                            }
                            Frame::Close => {
                                return "closed by the server (Engine.IO close)".into();
                            }
                            Frame::Event { args, .. } if !on_event(args) => {
                                return "ended by the client".into();
                            }
                            _ => {}
                        }
                    }
                },
                Some(Ok(Message::Close(f))) => return format!("close frame {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("read error: {e}"),
                None => return "end of stream".into(),
            }
        }
    }
}

/// `auth-success` (its arguments, `["auth-success",{..}]`) must name the organization of the
/// token: the first isolation check.
fn check_org(args: &str, want: &str) -> Result<(), OpenError> {
    #[derive(Deserialize)]
    struct AuthSuccess<'a>(serde::de::IgnoredAny, #[serde(borrow)] Payload<'a>);
    #[derive(Deserialize)]
    struct Payload<'a> {
        #[serde(rename = "organizationId")]
        org: &'a str,
    }
    let parsed: Option<AuthSuccess> = serde_json::from_str(args).ok();
    match parsed {
        Some(AuthSuccess(_, p)) if p.org == want => Ok(()),
        Some(AuthSuccess(_, p)) => Err(OpenError::WrongOrg {
            got: p.org.to_string(),
            want: want.to_string(),
        }),
        None => Err(OpenError::Rejected(format!(
            "unreadable auth-success {args:?}"
        ))),
    }
}

/// How long one connection may take to become ready before it counts as failed.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_success_must_name_the_token_org() {
        let frame =
            r#"["auth-success",{"message":"m","organizationId":"org-1","userId":"u","role":"r"}]"#;
        assert!(check_org(frame, "org-1").is_ok());
        assert!(matches!(
            check_org(frame, "org-2"),
            Err(OpenError::WrongOrg { .. })
        ));
        assert!(matches!(
            check_org(r#"["auth-success"]"#, "org-1"),
            Err(OpenError::Rejected(_))
        ));
    }
}
