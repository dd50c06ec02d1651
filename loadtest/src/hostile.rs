//! `fanout-loadtest hostile`: what anonymous clients can make a replica spend, measured.
//!
//! Three attacks of the hostile-input review, each against a fresh replica (in-process bus,
//! nothing else running), on loopback, for one or several builds side by side:
//! - `oversize`: unauthenticated WebSockets that each send a CONNECT whose token is three
//!   unfinished 15 MB fragments. Memory: before, peak, and after the sockets are gone.
//! - `flood`: keep-alive connections looping on the Engine.IO polling handshake (never
//!   authenticating) until a number of handshakes were answered. Memory: before, peak, after
//!   the flood and again after a pause; handshakes accepted and refused, and their rate.
//! - `descriptors`: the replica under a descriptor limit of 1,100 and 1,150 idle TCP
//!   connections to its public port: does the internal listener (readiness, ingest) answer,
//!   how fast is a new client refused, how many `accept` errors.
//! - `sids`: polling requests naming random (unknown) Engine.IO session ids, on keep-alive
//!   connections: memory before and after (what fanout remembers per named session).
//!
//! Memory is the replica's resident set (`VmRSS`), sampled every 50 ms.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fanout_testkit::Replica;
use fanout_testkit::process::Logs;
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::http::HttpClient;
use crate::procs;
use crate::report::{Table, num};

/// The ingest key and JWT secret the replicas run with.
const INGEST_KEY: &str = "hostile-ingest-key";
const SECRET: &str = "hostile-secret-0123456789abcdef0123456789";

pub struct Options {
    /// Builds to measure, each with a label: `(label, binary)`.
    pub builds: Vec<(String, PathBuf)>,
    pub scenarios: Vec<Scenario>,
    /// Handshakes of the flood.
    pub handshakes: u64,
    pub base_port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Oversize,
    Flood,
    Descriptors,
    Sids,
}

#[derive(Serialize, Default)]
pub struct Report {
    pub oversize: Vec<Oversize>,
    pub flood: Vec<Flood>,
    pub descriptors: Vec<Descriptors>,
    pub sids: Vec<Sids>,
}

#[derive(Serialize)]
pub struct Sids {
    pub build: String,
    pub requests: u64,
    pub requests_per_s: f64,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
}

#[derive(Serialize)]
pub struct Oversize {
    pub build: String,
    pub sockets: usize,
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_after_mib: f64,
    /// Bytes the sockets managed to send before the server cut them off (all of it: 45 MB
    /// each, when it never did).
    pub sent_mib_per_socket: f64,
    pub seconds: f64,
}

#[derive(Serialize)]
pub struct Flood {
    pub build: String,
    pub connections: usize,
    pub accepted: u64,
    pub refused: u64,
    pub handshakes_per_s: f64,
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_after_mib: f64,
    /// After a 15 s pause (pending sessions of the fixed build time out in 10 s).
    pub rss_settled_mib: f64,
}

#[derive(Serialize)]
pub struct Descriptors {
    pub build: String,
    pub idle_connections: usize,
    /// `/readyz` on the internal listener: status (0: no answer) and time.
    pub readyz_status: u16,
    pub readyz_ms: f64,
    /// One ingest publish: status (0: no answer) and time.
    pub ingest_status: u16,
    pub ingest_ms: f64,
    /// A new public client: what it got, and how long it took.
    pub new_client: String,
    pub new_client_ms: f64,
    pub accept_errors: String,
}

pub async fn run(opts: Options) -> anyhow::Result<Report> {
    fanout_testkit::raise_nofile_limit(65_536);
    let mut report = Report::default();
    for scenario in &opts.scenarios {
        for (i, (label, bin)) in opts.builds.iter().enumerate() {
            let port = opts.base_port + 10 * i as u16;
            eprintln!("== {scenario:?}: {label}");
            match scenario {
                Scenario::Oversize => report.oversize.push(oversize(label, bin, port).await?),
                Scenario::Flood => report
                    .flood
                    .push(flood(label, bin, port, opts.handshakes).await?),
                Scenario::Descriptors => report
                    .descriptors
                    .push(descriptors(label, bin, port).await?),
                Scenario::Sids => report.sids.push(sids(label, bin, port).await?),
            }
        }
    }
    Ok(report)
}

/// A replica of `bin` on `port` (public) and `port + 1` (internal), ready, with an
/// open-file limit of `nofile` if given.
async fn replica(
    name: &str,
    bin: &Path,
    port: u16,
    nofile: Option<u64>,
) -> anyhow::Result<Replica> {
    let mut builder = Replica::builder()
        .name(name)
        .bin(bin)
        .listen(
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], port + 1)),
        )
        .logs(Logs::File(procs::log_dir()))
        .env("JWT_SECRET", SECRET)
        .env("FANOUT_INGEST_KEYS", INGEST_KEY)
        .env("RUST_LOG", "warn");
    if let Some(n) = nofile {
        builder = builder.descriptor_limit(n);
    }
    builder.try_start().await
}

fn mib(kib: Option<u64>) -> f64 {
    kib.unwrap_or(0) as f64 / 1024.0
}

/// Samples a process's RSS every 50 ms until stopped; returns the highest.
struct PeakRss {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl PeakRss {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(procs::rss_kib(Some(pid)).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        });
        Self { stop, task }
    }

    async fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        mib(Some(self.task.await.unwrap_or(0)))
    }
}

const OVERSIZE_SOCKETS: usize = 20;
const FRAGMENT: usize = 15_000_000;

async fn oversize(label: &str, bin: &std::path::Path, port: u16) -> anyhow::Result<Oversize> {
    let proc = replica(&format!("oversize-{label}"), bin, port, None).await?;
    let public = proc.public;
    let before = mib(procs::rss_kib(Some(proc.pid())));
    let peak = PeakRss::start(proc.pid());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..OVERSIZE_SOCKETS {
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(public).await?;
            let url = format!("ws://{public}/socket.io/?EIO=4&transport=websocket");
            let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp).await?;
            ws.next().await; // the open packet
            let fragment = Bytes::from(vec![b'x'; FRAGMENT]);
            let mut sent = 0u64;
            let first = Frame::message(
                Bytes::from_static(b"40{\"token\":\""),
                OpCode::Data(Data::Text),
                false,
            );
            if ws.send(Message::Frame(first)).await.is_ok() {
                for _ in 0..3 {
                    let frame =
                        Frame::message(fragment.clone(), OpCode::Data(Data::Continue), false);
                    if ws.send(Message::Frame(frame)).await.is_err() {
                        break;
                    }
                    sent += FRAGMENT as u64;
                }
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = 0u64;
    for task in tasks {
        sent += task.await?.unwrap_or(0);
    }
    let seconds = started.elapsed().as_secs_f64();
    // The sockets are gone now: give the replica a moment to free what they held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = peak.finish().await;
    let after = mib(procs::rss_kib(Some(proc.pid())));
    Ok(Oversize {
        build: label.to_string(),
        sockets: OVERSIZE_SOCKETS,
        rss_before_mib: before,
        rss_peak_mib: peak,
        rss_after_mib: after,
        sent_mib_per_socket: sent as f64 / OVERSIZE_SOCKETS as f64 / (1 << 20) as f64,
        seconds,
    })
}

const FLOOD_CONNECTIONS: usize = 48;

async fn flood(
    label: &str,
    bin: &std::path::Path,
    port: u16,
    handshakes: u64,
) -> anyhow::Result<Flood> {
    let proc = replica(&format!("flood-{label}"), bin, port, None).await?;
    let public = proc.public;
    let before = mib(procs::rss_kib(Some(proc.pid())));
    let peak = PeakRss::start(proc.pid());
    let (accepted, refused, left) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(handshakes)),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..FLOOD_CONNECTIONS {
        let (accepted, refused, left) = (accepted.clone(), refused.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = HttpClient::new(public);
            while left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                let answer = client
                    .request(
                        Method::GET,
                        "/socket.io/?EIO=4&transport=polling",
                        Bytes::new(),
                        None,
                    )
                    .await;
                match answer {
                    Ok((status, _)) if status.is_success() => &accepted,
                    _ => &refused,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = mib(procs::rss_kib(Some(proc.pid())));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let settled = mib(procs::rss_kib(Some(proc.pid())));
    let peak = peak.finish().await;
    Ok(Flood {
        build: label.to_string(),
        connections: FLOOD_CONNECTIONS,
        accepted: accepted.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        handshakes_per_s: handshakes as f64 / seconds,
        rss_before_mib: before,
        rss_peak_mib: peak,
        rss_after_mib: after,
        rss_settled_mib: settled,
    })
}

const DESCRIPTOR_LIMIT: u64 = 1100;
const IDLE_CONNECTIONS: usize = 1150;

async fn descriptors(label: &str, bin: &std::path::Path, port: u16) -> anyhow::Result<Descriptors> {
    let proc = replica(
        &format!("descriptors-{label}"),
        bin,
        port,
        Some(DESCRIPTOR_LIMIT),
    )
    .await?;
    let (public, internal) = (proc.public, proc.internal);
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(
            TcpStream::connect(public)
                .await
                .context("idle connection")?,
        );
    }
    // Let the replica take them all (or fail trying).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut ops = HttpClient::new(internal);
    let (readyz_status, readyz_ms) = timed(async {
        ops.request(Method::GET, "/readyz", Bytes::new(), None)
            .await
            .map(|(s, b)| (s.as_u16(), b))
    })
    .await;
    let mut ingest = HttpClient::new(internal);
    let body = Bytes::from_static(br#"{"organizationId":"acme","event":"probe","data":1}"#);
    let (ingest_status, ingest_ms) = timed(async {
        ingest
            .request(Method::POST, "/v1/publish", body, Some(INGEST_KEY))
            .await
            .map(|(s, b)| (s.as_u16(), b))
    })
    .await;

    // A new client: an HTTP request on a fresh connection.
    let started = Instant::now();
    let new_client = match tokio::time::timeout(Duration::from_secs(5), async {
        let mut tcp = TcpStream::connect(public).await?;
        use tokio::io::AsyncWriteExt;
        tcp.write_all(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nhost: x\r\n\r\n")
            .await?;
        let mut buf = vec![0u8; 512];
        let n = tcp.read(&mut buf).await?;
        anyhow::Ok(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("closed")
                .to_string(),
        )
    })
    .await
    {
        Ok(Ok(line)) if line.is_empty() => "closed".to_string(),
        Ok(Ok(line)) => line,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "no answer in 5 s".to_string(),
    };
    let new_client_ms = started.elapsed().as_secs_f64() * 1000.0;
    let log = proc.stderr();
    let accept_errors = log.matches("accept failed").count();
    drop(idle);
    Ok(Descriptors {
        build: label.to_string(),
        idle_connections: IDLE_CONNECTIONS,
        readyz_status,
        readyz_ms,
        ingest_status,
        ingest_ms,
        new_client,
        new_client_ms,
        accept_errors: format!("{accept_errors} logged"),
    })
}

const SID_REQUESTS: u64 = 470_000;
const SID_CONNECTIONS: usize = 32;

async fn sids(label: &str, bin: &std::path::Path, port: u16) -> anyhow::Result<Sids> {
    let proc = replica(&format!("sids-{label}"), bin, port, None).await?;
    let public = proc.public;
    let before = mib(procs::rss_kib(Some(proc.pid())));
    let left = Arc::new(AtomicU64::new(SID_REQUESTS));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for connection in 0..SID_CONNECTIONS {
        let left = left.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = HttpClient::new(public);
            let mut n = connection as u64;
            while left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                // A well-formed sid (16 characters of base64url) that no session has.
                n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let sid = format!("{:016x}", n);
                let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
                let _ = client.request(Method::GET, &path, Bytes::new(), None).await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Sids {
        build: label.to_string(),
        requests: SID_REQUESTS,
        requests_per_s: SID_REQUESTS as f64 / seconds,
        rss_before_mib: before,
        rss_after_mib: mib(procs::rss_kib(Some(proc.pid()))),
    })
}

/// Runs `request` with a 5 s bound: its status (0 for no answer or an error), and the time.
async fn timed(
    request: impl std::future::Future<Output = anyhow::Result<(u16, Bytes)>>,
) -> (u16, f64) {
    let started = Instant::now();
    let status = match tokio::time::timeout(Duration::from_secs(5), request).await {
        Ok(Ok((status, _))) => status,
        _ => 0,
    };
    (status, started.elapsed().as_secs_f64() * 1000.0)
}

pub fn tables(report: &Report) -> Vec<(String, Table)> {
    let mut out = Vec::new();
    if !report.oversize.is_empty() {
        let mut t = Table::new([
            "build",
            "sockets",
            "RSS before (MiB)",
            "peak",
            "after",
            "sent per socket (MiB)",
            "seconds",
        ]);
        for r in &report.oversize {
            t.row([
                r.build.clone(),
                r.sockets.to_string(),
                num(Some(r.rss_before_mib), 1),
                num(Some(r.rss_peak_mib), 1),
                num(Some(r.rss_after_mib), 1),
                num(Some(r.sent_mib_per_socket), 2),
                num(Some(r.seconds), 1),
            ]);
        }
        out.push((
            "oversize: unauthenticated WebSockets, each a CONNECT of 3 unfinished 15 MB fragments"
                .into(),
            t,
        ));
    }
    if !report.flood.is_empty() {
        let mut t = Table::new([
            "build",
            "handshakes 200",
            "refused",
            "per s",
            "RSS before (MiB)",
            "peak",
            "after",
            "after 15 s",
        ]);
        for r in &report.flood {
            t.row([
                r.build.clone(),
                r.accepted.to_string(),
                r.refused.to_string(),
                num(Some(r.handshakes_per_s), 0),
                num(Some(r.rss_before_mib), 1),
                num(Some(r.rss_peak_mib), 1),
                num(Some(r.rss_after_mib), 1),
                num(Some(r.rss_settled_mib), 1),
            ]);
        }
        out.push((
            format!(
                "flood: {FLOOD_CONNECTIONS} keep-alive connections looping on the polling handshake"
            ),
            t,
        ));
    }
    if !report.descriptors.is_empty() {
        let mut t = Table::new([
            "build",
            "/readyz",
            "ms",
            "ingest",
            "ms",
            "new client",
            "ms",
            "accept errors",
        ]);
        for r in &report.descriptors {
            t.row([
                r.build.clone(),
                r.readyz_status.to_string(),
                num(Some(r.readyz_ms), 1),
                r.ingest_status.to_string(),
                num(Some(r.ingest_ms), 1),
                r.new_client.clone(),
                num(Some(r.new_client_ms), 1),
                r.accept_errors.clone(),
            ]);
        }
        out.push((
            format!(
                "descriptors: open-file limit {DESCRIPTOR_LIMIT}, {IDLE_CONNECTIONS} idle TCP connections to the public port (status 0: no answer in 5 s)"
            ),
            t,
        ));
    }
    if !report.sids.is_empty() {
        let mut t = Table::new(["build", "requests", "per s", "RSS before (MiB)", "after"]);
        for r in &report.sids {
            t.row([
                r.build.clone(),
                r.requests.to_string(),
                num(Some(r.requests_per_s), 0),
                num(Some(r.rss_before_mib), 1),
                num(Some(r.rss_after_mib), 1),
            ]);
        }
        out.push((
            format!(
                "sids: polling requests naming unknown session ids, on {SID_CONNECTIONS} keep-alive connections"
            ),
            t,
        ));
    }
    out
}
