//! A keep-alive HTTP/1.1 client for one server: publishing, scrapes, hostile requests.
//!
//! One connection, one request at a time, reconnecting when the server closed it. That is
//! exactly what a publisher needs: requests on one connection are answered in order, so an
//! organization published through one client keeps its order end to end. hyper's low-level
//! connection API is enough; a pooled client would only add machinery.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub struct HttpClient {
    addr: SocketAddr,
    host: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            sender: None,
        }
    }

    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_some_and(|s| s.is_closed()) {
            self.sender = None;
        }
        if self.sender.is_none() {
            let tcp = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to http://{}", self.addr))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("set above");
        sender.ready().await?;
        Ok(sender)
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        bearer: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.as_str());
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(key) = bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req.body(Full::new(body))?;
        let result = async {
            let res = self.sender().await?.send_request(req).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        }
        .await;
        if result.is_err() {
            // Next request starts on a fresh connection.
            self.sender = None;
        }
        result.with_context(|| format!("{path} on http://{}", self.addr))
    }
}
