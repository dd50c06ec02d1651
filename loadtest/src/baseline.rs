//! The raw baseline: the machine's speed of light for this workload.
//!
//! The least a server must do to fan messages out to WebSockets: accept a connection, read
//! its organization from the query string (no Socket.IO framing, no token), and write every
//! message of that organization to it. A published body is turned into a frame payload
//! once (a reference-counted `Utf8Bytes` shared by every socket); each socket has a bounded
//! queue drained by its own task, which writes as many queued frames as it can before one
//! flush; a socket whose queue is full is dropped (the same slow-consumer policy as fanout).
//! Publishing is the same HTTP ingest as fanout's internal listener, minus the bus.
//!
//! It is one process without Redis: the fleet dimension (replicas, cross-replica delivery)
//! does not apply to it, so it bounds what fanout could reach on this machine, not a design
//! fanout could adopt.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames queued per socket before it counts as a slow consumer (fanout's default).
const SOCKET_QUEUE: usize = 1024;
/// Frames written per flush at most.
const BATCH: usize = 64;

pub struct Options {
    pub listen: SocketAddr,
    pub internal_listen: SocketAddr,
    /// Bearer key required by the ingest endpoint, if any.
    pub ingest_key: Option<String>,
}

#[derive(Default)]
struct Hub {
    orgs: RwLock<HashMap<Box<str>, Vec<Member>>>,
    next_id: AtomicU64,
}

struct Member {
    id: u64,
    tx: mpsc::Sender<Utf8Bytes>,
}

impl Hub {
    fn join(&self, org: &str) -> (u64, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut orgs = self.orgs.write().expect("hub lock");
        orgs.entry(org.into()).or_default().push(Member { id, tx });
        (id, rx)
    }

    fn leave(&self, org: &str, ids: &[u64]) {
        let mut orgs = self.orgs.write().expect("hub lock");
        if let Some(members) = orgs.get_mut(org) {
            members.retain(|m| !ids.contains(&m.id));
            if members.is_empty() {
                orgs.remove(org);
            }
        }
    }

    /// Queues `frame` for every socket of `org`; drops the sockets whose queue is full.
    fn broadcast(&self, org: &str, frame: Utf8Bytes) {
        let mut slow = Vec::new();
        {
            let orgs = self.orgs.read().expect("hub lock");
            let Some(members) = orgs.get(org) else { return };
            for m in members {
                if let Err(mpsc::error::TrySendError::Full(_)) = m.tx.try_send(frame.clone()) {
                    slow.push(m.id);
                }
            }
        }
        if !slow.is_empty() {
            // Dropping its sender ends the socket's task, which closes the connection.
            self.leave(org, &slow);
        }
    }
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let public = listen(opts.listen, 4096)
        .with_context(|| format!("cannot listen on --listen {}", opts.listen))?;
    let internal = TcpListener::bind(opts.internal_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on --internal-listen {}",
                opts.internal_listen
            )
        })?;
    let hub = Arc::new(Hub::default());
    let ingest = Router::new()
        .route("/executions/update", post(update))
        .route("/readyz", get(|| async { "ready" }))
        .route("/healthz", get(|| async { "ok" }))
        .with_state((hub.clone(), Arc::new(opts.ingest_key)));
    tokio::spawn(async move { axum::serve(internal, ingest).await });
    println!(
        "baseline listening public={} internal={}",
        opts.listen, opts.internal_listen
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = public.accept() => match accepted {
                Ok((tcp, _)) => {
                    tokio::spawn(serve_socket(hub.clone(), tcp));
                }
                // Out of descriptors and the like: keep serving the connections we have.
                Err(e) => {
                    eprintln!("baseline: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// A listener with a backlog that absorbs connection storms (`TcpListener::bind` uses 128).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn serve_socket(hub: Arc<Hub>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let mut org: Option<String> = None;
    // The callback's type is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
        org = req.uri().query().and_then(org_from_query);
        match org {
            Some(_) => Ok(res),
            None => {
                let mut err = ErrorResponse::new(Some("missing ?org=".into()));
                *err.status_mut() = StatusCode::BAD_REQUEST;
                Err(err)
            }
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 * 1024);
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await
    else {
        return;
    };
    let Some(org) = org else { return };
    let (id, mut rx) = hub.join(&org);
    if ws.send(Message::text(r#"{"ready":true}"#)).await.is_ok() {
        loop {
            tokio::select! {
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    if ws.feed(Message::Text(frame)).await.is_err() { break }
                    let mut batch = 1;
                    while batch < BATCH {
                        let Ok(frame) = rx.try_recv() else { break };
                        if ws.feed(Message::Text(frame)).await.is_err() { break }
                        batch += 1;
                    }
                    if ws.flush().await.is_err() { break }
                }
                incoming = ws.next() => match incoming {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
    hub.leave(&org, &[id]);
}

fn org_from_query(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("org="))
        .filter(|o| !o.is_empty())
        .map(str::to_string)
}

#[derive(Deserialize)]
struct Target<'a> {
    #[serde(rename = "organizationId", borrow)]
    org: &'a str,
}

type IngestState = (Arc<Hub>, Arc<Option<String>>);

async fn update(
    State((hub, key)): State<IngestState>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let json = [(header::CONTENT_TYPE, "application/json")];
    if let Some(key) = key.as_deref() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key) {
            return (
                StatusCode::UNAUTHORIZED,
                json,
                r#"{"error":"missing or unknown ingest key"}"#,
            );
        }
    }
    let org = match serde_json::from_slice::<Target>(&body) {
        Ok(t) => t.org.to_string(),
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                json,
                r#"{"error":"body must be a JSON object with a string organizationId"}"#,
            );
        }
    };
    let Ok(frame) = Utf8Bytes::try_from(body) else {
        return (
            StatusCode::BAD_REQUEST,
            json,
            r#"{"error":"body is not UTF-8"}"#,
        );
    };
    hub.broadcast(&org, frame);
    (StatusCode::OK, json, r#"{"status":"broadcasted"}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_comes_from_the_query() {
        assert_eq!(org_from_query("org=org-3").as_deref(), Some("org-3"));
        assert_eq!(org_from_query("a=1&org=x").as_deref(), Some("x"));
        assert_eq!(org_from_query("org="), None);
        assert_eq!(org_from_query("a=1"), None);
    }

    #[tokio::test]
    async fn broadcast_reaches_the_org_only_and_drops_slow_sockets() {
        let hub = Hub::default();
        let (_, mut a) = hub.join("o1");
        let (_, mut b) = hub.join("o2");
        hub.broadcast("o1", Utf8Bytes::from_static("m"));
        assert_eq!(a.recv().await.unwrap().as_str(), "m");
        assert!(b.try_recv().is_err());
        for _ in 0..=SOCKET_QUEUE {
            hub.broadcast("o1", Utf8Bytes::from_static("m"));
        }
        // Full queue: the socket was dropped from the hub, its queue ends after the backlog.
        let mut n = 0;
        while a.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, SOCKET_QUEUE);
    }
}
