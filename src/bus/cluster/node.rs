//! One subscriber connection to one master of the cluster, in RESP2, written by hand.
//!
//! Why not the `redis` crate's: its cluster connection re-subscribes a reconnected node with
//! every shard channel of that node in one `SSUBSCRIBE`, which fails with CROSSSLOT as soon
//! as they span two slots, and it forgets a channel on a server's `sunsubscribe` (a slot
//! moved) without subscribing at the new owner. Both lose channels silently. Its
//! single-node connections have no `SSUBSCRIBE` at all. The subset needed here is small:
//! write `SSUBSCRIBE`/`SUNSUBSCRIBE`/`PING` commands, read arrays of bulk strings and
//! integers, and errors.
//!
//! With `rediss://` seeds the connection is TLS (rustls, the system's roots or
//! `SSL_CERT_FILE`), verified against the address the cluster announces for the node.
//!
//! The connection reports what the manager must decide on (confirmations, errors, probes,
//! its end) as [`Event`]s, and hands organization messages to the sink itself, so that a
//! busy manager never delays delivery.

use std::sync::Arc;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::super::inbound::Inbound;

/// What a node connection tells the manager, tagged with the connection's id.
#[derive(Debug)]
pub enum Event {
    /// `ssubscribe` confirmation for a channel.
    Subscribed(String),
    /// `sunsubscribe` for a channel: the answer to ours, or the server's own (a slot moved).
    Unsubscribed(String),
    Pong,
    /// An error answer (`-MOVED 1234 host:port`, `-CROSSSLOT ...`).
    Error(String),
    /// A probe of ours came back on the node's probe channel.
    Probe(u64),
    /// The connection ended (why).
    Closed(String),
}

/// How to open a node connection, from the seed URLs: credentials sent with `AUTH`, and
/// TLS for `rediss://`.
#[derive(Clone, Default)]
pub struct Auth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<tokio_rustls::TlsConnector>,
}

/// A node connection's byte stream: TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Reader = BufReader<ReadHalf<Box<dyn Io>>>;

pub struct NodeConn {
    writer: WriteHalf<Box<dyn Io>>,
    reader: JoinHandle<()>,
}

impl Drop for NodeConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Where the reader sends events, and what it needs to deliver messages.
pub struct Wiring {
    pub id: u64,
    pub events: mpsc::UnboundedSender<(u64, Event)>,
    pub inbound: Inbound,
    /// The node's probe channel: what arrives there is a probe number, not a message.
    pub probe_channel: Arc<str>,
    /// Largest bulk string read into memory; a larger one is skipped.
    pub max_bulk: usize,
}

impl NodeConn {
    /// Connects to `node` (`host:port`) and authenticates.
    pub async fn connect(node: &str, auth: &Auth, wiring: Wiring) -> Result<Self, String> {
        let stream = TcpStream::connect(node)
            .await
            .map_err(|e| format!("cannot connect to {node}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Io> = match &auth.tls {
            None => Box::new(stream),
            Some(tls) => {
                let host = node.rsplit_once(':').map_or(node, |(host, _)| host);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("{node}: {host:?} is not a TLS server name: {e}"))?;
                Box::new(tls.connect(name, stream).await.map_err(|e| {
                    super::super::master::explain(format!("TLS with {node} failed: {e}"))
                })?)
            }
        };
        let (read, mut writer) = tokio::io::split(stream);
        let mut read = BufReader::new(read);
        if let Some(password) = &auth.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &auth.username {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            writer
                .write_all(&encode(&args))
                .await
                .map_err(|e| format!("{node}: {e}"))?;
            match read_frame(&mut read, wiring.max_bulk).await {
                Ok(Frame::Simple(_)) => {}
                Ok(Frame::Error(e)) => return Err(format!("{node} refused AUTH: {e}")),
                Ok(other) => return Err(format!("{node} answered AUTH with {other:?}")),
                Err(e) => return Err(format!("{node}: {e}")),
            }
        }
        Ok(Self {
            writer,
            reader: tokio::spawn(read_loop(read, wiring)),
        })
    }

    /// Writes commands (each a list of arguments) in one write.
    pub async fn send(&mut self, commands: &[Vec<&[u8]>]) -> Result<(), String> {
        let mut buf = Vec::new();
        for args in commands {
            buf.extend_from_slice(&encode(args));
        }
        self.writer
            .write_all(&buf)
            .await
            .map_err(|e| format!("write failed: {e}"))
    }
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[derive(Debug, PartialEq)]
enum Frame {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: a null bulk string, or one larger than the limit, skipped.
    Bulk(Option<Vec<u8>>),
    Array(Vec<Frame>),
}

async fn read_line(r: &mut Reader) -> Result<String, String> {
    let mut line = Vec::new();
    let n = r
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    if !line.ends_with(b"\r\n") {
        return Err("malformed RESP line".into());
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| "RESP line is not UTF-8".to_string())
}

fn read_frame(
    r: &mut Reader,
    max_bulk: usize,
) -> futures_util::future::BoxFuture<'_, Result<Frame, String>> {
    Box::pin(async move {
        let line = read_line(r).await?;
        let (kind, rest) = line.split_at_checked(1).ok_or("empty RESP line")?;
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| format!("bad RESP length {rest:?}"))
        };
        Ok(match kind {
            "+" => Frame::Simple(rest.to_string()),
            "-" => Frame::Error(rest.to_string()),
            ":" => Frame::Int(number()?),
            "$" => {
                let len = number()?;
                if len < 0 {
                    Frame::Bulk(None)
                } else if len as usize > max_bulk {
                    // Read past it, so the stream stays in step.
                    let skip = len as u64 + 2;
                    let copied = tokio::io::copy(&mut r.take(skip), &mut tokio::io::sink())
                        .await
                        .map_err(|e| e.to_string())?;
                    if copied != skip {
                        return Err("connection closed".into());
                    }
                    Frame::Bulk(None)
                } else {
                    let mut data = vec![0u8; len as usize + 2];
                    r.read_exact(&mut data).await.map_err(|e| e.to_string())?;
                    data.truncate(len as usize);
                    Frame::Bulk(Some(data))
                }
            }
            "*" => {
                let len = number()?;
                let mut items = Vec::with_capacity(len.clamp(0, 16) as usize);
                for _ in 0..len.max(0) {
                    items.push(read_frame(r, max_bulk).await?);
                }
                Frame::Array(items)
            }
            _ => return Err(format!("unexpected RESP type {kind:?}")),
        })
    })
}

async fn read_loop(mut read: Reader, mut w: Wiring) {
    let why = loop {
        let frame = match read_frame(&mut read, w.max_bulk).await {
            Ok(frame) => frame,
            Err(e) => break e,
        };
        let event = match frame {
            Frame::Array(items) => match items.as_slice() {
                [Frame::Bulk(Some(kind)), Frame::Bulk(Some(channel)), payload] => {
                    let channel = String::from_utf8_lossy(channel);
                    match (kind.as_slice(), payload) {
                        (b"smessage", Frame::Bulk(payload)) => {
                            let payload = payload.as_deref().unwrap_or_default();
                            if *channel == *w.probe_channel {
                                match std::str::from_utf8(payload)
                                    .ok()
                                    .and_then(|p| p.parse().ok())
                                {
                                    Some(n) => Event::Probe(n),
                                    None => continue,
                                }
                            } else {
                                w.inbound.receive(&channel, payload).await;
                                continue;
                            }
                        }
                        (b"ssubscribe", _) => Event::Subscribed(channel.into_owned()),
                        (b"sunsubscribe", _) => Event::Unsubscribed(channel.into_owned()),
                        (b"pong", _) => Event::Pong,
                        _ => continue,
                    }
                }
                [Frame::Bulk(Some(kind)), ..] if kind == b"pong" => Event::Pong,
                _ => continue,
            },
            Frame::Simple(s) if s.eq_ignore_ascii_case("pong") => Event::Pong,
            Frame::Error(e) => Event::Error(e),
            _ => continue,
        };
        if w.events.send((w.id, event)).is_err() {
            return;
        }
    };
    let _ = w.events.send((w.id, Event::Closed(why)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays() {
        assert_eq!(
            encode(&[b"SSUBSCRIBE", b"fanout:org:a"]),
            b"*2\r\n$10\r\nSSUBSCRIBE\r\n$12\r\nfanout:org:a\r\n"
        );
    }

    #[tokio::test]
    async fn frames_are_read_with_large_bulks_skipped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"*3\r\n$8\r\nsmessage\r\n$1\r\nc\r\n$20\r\n01234567890123456789\r\n")
                .await
                .unwrap();
            s.write_all(b"-MOVED 1 127.0.0.1:7000\r\n+PONG\r\n:5\r\n*3\r\n$10\r\nssubscribe\r\n$1\r\nc\r\n:1\r\n")
                .await
                .unwrap();
            s
        });
        let stream: Box<dyn Io> = Box::new(TcpStream::connect(addr).await.unwrap());
        let (read, _write) = tokio::io::split(stream);
        let mut read = BufReader::new(read);
        let _server = server.await.unwrap();
        let bulk = |b: &[u8]| Frame::Bulk(Some(b.to_vec()));
        assert_eq!(
            read_frame(&mut read, 10).await.unwrap(),
            Frame::Array(vec![bulk(b"smessage"), bulk(b"c"), Frame::Bulk(None)])
        );
        assert_eq!(
            read_frame(&mut read, 10).await.unwrap(),
            Frame::Error("MOVED 1 127.0.0.1:7000".into())
        );
        assert_eq!(
            read_frame(&mut read, 10).await.unwrap(),
            Frame::Simple("PONG".into())
        );
        assert_eq!(read_frame(&mut read, 10).await.unwrap(), Frame::Int(5));
        assert_eq!(
            read_frame(&mut read, 10).await.unwrap(),
            Frame::Array(vec![bulk(b"ssubscribe"), bulk(b"c"), Frame::Int(1)])
        );
    }
}
