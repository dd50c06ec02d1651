//! One HTTP/1.1 request to a peer: fetching `JWT_JWKS_URL`, and `fanout publish` posting to
//! a replica's ingest API; and the TLS client every outgoing connection of fanout's own uses
//! (here, and the cluster bus's `rediss://` connections).
//!
//! hyper's client and tokio-rustls (the system's roots, ring) are already in the build for
//! the listeners and `rediss://`. reqwest would bring a second TLS crypto provider (aws-lc),
//! and with two, rustls no longer picks one by itself: the `rediss://` connections that rely
//! on that would fail. A request is one connection, closed after its answer: both callers
//! send one request now and then.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where requests go: the URL's scheme, host and port, checked once.
#[derive(Clone)]
pub struct Peer {
    url: Uri,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// What a peer answered.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Peer {
    /// `url` must be `http://` or `https://` with a host; the message says what is wrong.
    pub fn new(url: &str) -> Result<Self, String> {
        let parsed: Uri = url
            .trim()
            .parse()
            .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
        let tls = match parsed.scheme_str() {
            Some("https") => Some(tls_connector("https://")?),
            Some("http") => None,
            _ => return Err(format!("{url:?} must start with https:// or http://")),
        };
        if parsed.host().is_none_or(str::is_empty) {
            return Err(format!("{url:?} has no host"));
        }
        Ok(Self { url: parsed, tls })
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// Sends one request to `path` (or the URL's own path when `None`), reads an answer of
    /// at most `max_bytes` within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        path: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Answer, String> {
        tokio::time::timeout(
            timeout,
            self.exchange(method, path, headers, body, max_bytes),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }

    async fn exchange(
        &self,
        method: Method,
        path: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
        max_bytes: usize,
    ) -> Result<Answer, String> {
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        let host = self.url.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self
            .url
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| fail("cannot connect", &e))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| fail("bad host name", &e))?;
                Box::new(
                    tls.connect(name, tcp)
                        .await
                        .map_err(|e| fail("TLS handshake failed", &e))?,
                )
            }
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| fail("HTTP handshake failed", &e))?;
        let connection = tokio::spawn(connection);
        let path = path.unwrap_or_else(|| self.url.path_and_query().map_or("/", |p| p.as_str()));
        let authority = self.url.authority().map_or(host, |a| a.as_str());
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::USER_AGENT, "fanout");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| fail("cannot build the request", &e))?;
        let result = async {
            let answer = sender
                .send_request(request)
                .await
                .map_err(|e| fail("request failed", &e))?;
            let status = answer.status();
            let body = Limited::new(answer.into_body(), max_bytes)
                .collect()
                .await
                .map_err(|e| fail("cannot read the answer", &e))?;
            Ok(Answer {
                status,
                body: body.to_bytes(),
            })
        }
        .await;
        connection.abort();
        result
    }
}

/// A connection's byte stream: TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TLS client verified against the system's roots (or `SSL_CERT_FILE` /
/// `SSL_CERT_DIR`), as the `redis` crate's connections are: for `https://` here, and for the
/// cluster bus's own `rediss://` connections. `scheme` names the URLs it is for in the error.
pub fn tls_connector(scheme: &str) -> Result<tokio_rustls::TlsConnector, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "no trusted root certificate found for {scheme} (install ca-certificates, or set SSL_CERT_FILE to the CA that signed the server's certificate){}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join("; "))
            }
        ));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
