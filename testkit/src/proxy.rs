//! A TCP proxy in front of a Redis that can make its pub/sub connections go silent.
//!
//! A subscription can die without its connection closing: a NAT or a load balancer that
//! forgets the flow, a proxy that stops forwarding. Nothing a test can ask of Redis does
//! that (`CLIENT KILL` closes the socket), so this proxy does it on purpose: once
//! [`Proxy::silence_subscribers`] is called, it stops forwarding anything the server sends
//! on the connections that sent `SUBSCRIBE`, while the connection stays open and the other
//! connections (the publishers') keep working. It is how a test proves that a replica's
//! liveness probe, not a closed socket, finds the dead subscription.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Proxy {
    addr: SocketAddr,
    silent: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().unwrap();
        let (silent, _) = watch::channel(false);
        let tx = silent.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let silent = tx.subscribe();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, silent).await;
                    }
                });
            }
        });
        Self {
            addr,
            silent,
            accept,
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// From now on, what the server sends to a subscriber connection (old or new) is held
    /// back; the connection stays open.
    pub fn silence_subscribers(&self) {
        self.silent.send_replace(true);
    }

    /// Forwards everything again (what was held back is sent then).
    pub fn resume(&self) {
        self.silent.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies both ways until either side closes. Server-to-client bytes wait while the
/// connection is a subscriber's and the proxy is silent.
async fn relay(client: TcpStream, server: TcpStream, mut silent: watch::Receiver<bool>) {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let subscriber = Arc::new(AtomicBool::new(false));
    let seen = subscriber.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if contains_ignore_case(&buf[..n], b"SUBSCRIBE") {
                seen.store(true, Ordering::Release);
            }
            if server_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if subscriber.load(Ordering::Acquire)
                && silent.wait_for(|silent| !silent).await.is_err()
            {
                break;
            }
            if client_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    // Either direction ending ends both: the halves are dropped, closing the sockets.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
