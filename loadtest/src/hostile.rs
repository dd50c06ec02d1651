//! `fanout-loadtest hostile`: what anonymous clients can make a replica spend, measured.
//!
//! The attacks of the hostile-input review and of the fair-use limits, each against a fresh
//! replica (in-process bus, nothing else running), on loopback, for one or several builds
//! side by side:
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
//! - `frames`: six *authenticated* clients each sending tiny Socket.IO events as fast as
//!   they can, while a member of another organization receives 100 messages/s: its delivery
//!   latency before and during the flood, the replica's CPU, how long the flooders stay
//!   connected; with the packet budget (`FANOUT_MAX_PACKETS_PER_SECOND`, default 100) and
//!   without it (`0`), alternating, on a fresh replica each time.
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
    /// Rounds of `frames` (each runs the budget on, then off, or the other way round).
    pub rounds: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Oversize,
    Flood,
    Descriptors,
    Sids,
    Frames,
}

#[derive(Serialize, Default)]
pub struct Report {
    pub oversize: Vec<Oversize>,
    pub flood: Vec<Flood>,
    pub descriptors: Vec<Descriptors>,
    pub sids: Vec<Sids>,
    pub frames: Vec<Frames>,
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
                Scenario::Frames => {
                    for round in 0..opts.rounds {
                        // Alternate which variant goes first, so that drift favours neither.
                        let mut budgets = [Some(PACKET_BUDGET), None];
                        if round % 2 == 1 {
                            budgets.reverse();
                        }
                        for budget in budgets {
                            report
                                .frames
                                .push(frames(label, bin, port, budget, round + 1).await?);
                        }
                    }
                }
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
    env: &[(&str, &str)],
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
    for (key, value) in env {
        builder = builder.env(key, value);
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
    let proc = replica(&format!("oversize-{label}"), bin, port, None, &[]).await?;
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
    let proc = replica(&format!("flood-{label}"), bin, port, None, &[]).await?;
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
        &[],
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
    let proc = replica(&format!("sids-{label}"), bin, port, None, &[]).await?;
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

/// The packet budget measured: fanout's default `FANOUT_MAX_PACKETS_PER_SECOND`.
const PACKET_BUDGET: u32 = 100;
const FLOODERS: usize = 6;
/// The flooders' frame: a Socket.IO event no handler listens to (13 bytes on the wire, with
/// the WebSocket header and mask).
const TINY_FRAME: &str = "42[\"f\"]";
/// Its size on the wire: 2 bytes of header, 4 of mask, 7 of payload.
const TINY_FRAME_WIRE_BYTES: u64 = 13;
const VICTIM_RATE: f64 = 100.0;
const BEFORE: Duration = Duration::from_secs(5);
const DURING: Duration = Duration::from_secs(10);

#[derive(Serialize)]
pub struct Frames {
    pub build: String,
    /// `FANOUT_MAX_PACKETS_PER_SECOND`, or none (`0`: off).
    pub budget: Option<u32>,
    pub round: usize,
    pub flooders: usize,
    /// Frames the flooders wrote before their connection closed (or the flood ended): all
    /// of them reached the server when it never closed them; with a budget, the server read
    /// at most its burst plus its rate times the time to the close, the rest died in buffers.
    pub frames_sent: u64,
    /// Frames written per second over the flood, summed over the flooders, when none was
    /// closed.
    pub frames_per_s: Option<f64>,
    /// Frames the server read: for flooders still connected at the end, those written less
    /// those still queued (`/proc/net/tcp`: the client's send queue, the server's receive
    /// queue); none when a flooder was closed (the server then read at most its budget:
    /// its burst plus its rate times the time to the close).
    pub frames_read: Option<u64>,
    pub frames_read_per_s: Option<f64>,
    pub flooders_closed: usize,
    /// Flood start to the close frame, per closed flooder: median and slowest (ms).
    pub close_ms_median: Option<f64>,
    pub close_ms_max: Option<f64>,
    /// The close the flooders received, e.g. `1008 too many packets`.
    pub close_reason: Option<String>,
    /// `fanout_connections_refused_total{reason="packet_rate"}` at the end.
    pub refused_packet_rate: f64,
    /// The victim's delivery latency (send → receive, ms) for messages sent before the flood
    /// and during it; messages sent during it and never received.
    pub victim_before_p50_ms: Option<f64>,
    pub victim_before_p99_ms: Option<f64>,
    pub victim_during_p50_ms: Option<f64>,
    pub victim_during_p99_ms: Option<f64>,
    pub victim_lost: u64,
    /// The replica's CPU (cores) before and during the flood.
    pub cpu_before: f64,
    pub cpu_during: f64,
}

/// One flooder: authenticated, then at `start` writes tiny frames as fast as it can until
/// the server closes it or `stop`.
struct Flooder {
    sent: u64,
    /// When the server closed the connection (the close frame, or the first failed write if
    /// that came first), and how.
    closed: Option<(Instant, String)>,
    /// Of `sent`, bytes still queued when the flood stopped (the client's send queue and the
    /// server's receive queue), for a flooder still connected: what the server had not read.
    queued_bytes: Option<u64>,
}

/// The bytes queued on a loopback connection from `client_port` to `server_port`: unsent or
/// unacknowledged at the client (`tx_queue`) and received but not read by the server
/// (`rx_queue`), from `/proc/net/tcp`.
fn queued_bytes(client_port: u16, server_port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
    let mut total = 0;
    let mut seen = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |i: usize| {
            f.get(i)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        };
        let Some((tx, rx)) = f.get(4).and_then(|q| q.split_once(':')) else {
            continue;
        };
        let (tx, rx) = (
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        );
        if port(1) == Some(client_port) && port(2) == Some(server_port) {
            total += tx;
            seen += 1;
        } else if port(1) == Some(server_port) && port(2) == Some(client_port) {
            total += rx;
            seen += 1;
        }
    }
    (seen == 2).then_some(total)
}

async fn flooder(
    public: SocketAddr,
    token: String,
    start: Arc<tokio::sync::Barrier>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Flooder> {
    use fanout_testkit::socketio;
    let tcp = TcpStream::connect(public).await?;
    let mut ws = socketio::upgrade(tcp, public, None).await?;
    socketio::read_open(&mut ws).await?;
    let auth = serde_json::json!({ "token": token });
    ws.send(Message::text(socketio::connect(Some(&auth))))
        .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().starts_with("42[\"auth-success\"") => break,
            Some(Ok(Message::Text(t))) if t.as_str().starts_with("42[\"auth-error\"") => {
                anyhow::bail!("flooder refused: {t}")
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("flooder closed before auth-success: {other:?}"),
        }
    }
    let client_port = ws.get_ref().local_addr()?.port();
    let (mut sink, mut stream) = ws.split();
    let closed = Arc::new(AtomicBool::new(false));
    let reader = {
        let closed = closed.clone();
        tokio::spawn(async move {
            // Pings are not answered: the flood is shorter than the ping timeout.
            let how = loop {
                match stream.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        break frame.map_or("close without a code".to_string(), |f| {
                            format!("{} {}", u16::from(f.code), f.reason)
                        });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("error: {e}"),
                    None => break "end of stream".to_string(),
                }
            };
            closed.store(true, Ordering::Relaxed);
            (Instant::now(), how)
        })
    };
    start.wait().await;
    let mut sent = 0u64;
    let mut failed: Option<(Instant, String)> = None;
    'flood: while !closed.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            if let Err(e) = sink.feed(Message::text(TINY_FRAME)).await {
                failed = Some((Instant::now(), format!("write failed: {e}")));
                break 'flood;
            }
            sent += 1;
        }
        if let Err(e) = sink.flush().await {
            failed = Some((Instant::now(), format!("write failed: {e}")));
            break;
        }
    }
    if failed.is_none() && !closed.load(Ordering::Relaxed) {
        // Still connected at the end of the flood: what has the server not read yet?
        let queued_bytes = queued_bytes(client_port, public.port());
        reader.abort();
        return Ok(Flooder {
            sent,
            closed: None,
            queued_bytes,
        });
    }
    // Closed: by the close frame, or a write failed first (the frame may never come).
    let frame = tokio::time::timeout(Duration::from_secs(2), reader)
        .await
        .ok()
        .and_then(Result::ok);
    let closed = match (frame, failed) {
        (Some(frame), Some(write)) if write.0 < frame.0 => Some((write.0, frame.1)),
        (Some(frame), _) => Some(frame),
        (None, write) => write,
    };
    Ok(Flooder {
        sent,
        closed,
        queued_bytes: None,
    })
}

/// Latency histograms of the victim's deliveries, by when the message was sent.
struct Victim {
    before: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    during: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    /// Send times (µs) bounding the flood; messages after it are not counted.
    flood_from: AtomicU64,
    flood_until: AtomicU64,
    received_during: AtomicU64,
}

async fn frames(
    label: &str,
    bin: &Path,
    port: u16,
    budget: Option<u32>,
    round: usize,
) -> anyhow::Result<Frames> {
    use crate::client::{Conn, System};
    use crate::message::{BodyWriter, now_us, parse_body};
    use fanout_testkit::token::Minter;

    let setting = budget.map_or("0".to_string(), |b| b.to_string());
    let variant = budget.map_or("off".to_string(), |b| format!("{b}/s"));
    eprintln!("   round {round}, packet budget {variant}");
    let proc = replica(
        &format!("frames-{label}-{round}-{variant}").replace('/', "-"),
        bin,
        port,
        None,
        &[("FANOUT_MAX_PACKETS_PER_SECOND", &setting)],
    )
    .await?;
    let (public, internal, pid) = (proc.public, proc.internal, proc.pid());
    let minter = Minter::new(SECRET);
    let exp = fanout_testkit::now_secs() + 3600;

    let histogram = || hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let victim = Arc::new(Victim {
        before: std::sync::Mutex::new(histogram()),
        during: std::sync::Mutex::new(histogram()),
        flood_from: AtomicU64::new(u64::MAX),
        flood_until: AtomicU64::new(u64::MAX),
        received_during: AtomicU64::new(0),
    });
    let conn = Conn::open(
        System::Socketio,
        None,
        public,
        "victim",
        &minter.mint("victim", "v", exp),
    )
    .await
    .map_err(|e| anyhow::anyhow!("the victim did not connect: {e}"))?;
    let receiver = {
        let victim = victim.clone();
        tokio::spawn(conn.run(move |body, _| {
            let Some(b) = parse_body(body) else { return };
            let latency = now_us().saturating_sub(b.t).max(1);
            let (from, until) = (
                victim.flood_from.load(Ordering::Relaxed),
                victim.flood_until.load(Ordering::Relaxed),
            );
            if b.t < from {
                let _ = victim.before.lock().expect("not poisoned").record(latency);
            } else if b.t < until {
                let _ = victim.during.lock().expect("not poisoned").record(latency);
                victim.received_during.fetch_add(1, Ordering::Relaxed);
            }
        }))
    };
    let publishing = Arc::new(AtomicBool::new(true));
    let sent_during = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (publishing, sent_during, victim) =
            (publishing.clone(), sent_during.clone(), victim.clone());
        tokio::spawn(async move {
            let mut client = HttpClient::new(internal);
            let mut body = BodyWriter::new(200);
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / VICTIM_RATE));
            let mut n = 0;
            while publishing.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let t = now_us();
                let text = body.write("victim", 0, 0, n, t);
                let request = Bytes::copy_from_slice(text.as_bytes());
                let answer = client
                    .request(
                        Method::POST,
                        "/executions/update",
                        request,
                        Some(INGEST_KEY),
                    )
                    .await;
                let during = (victim.flood_from.load(Ordering::Relaxed)
                    ..victim.flood_until.load(Ordering::Relaxed))
                    .contains(&t);
                if during && answer.is_ok_and(|(status, _)| status.is_success()) {
                    sent_during.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // The flooders connect and authenticate first: the flood is frames, not handshakes.
    let start = Arc::new(tokio::sync::Barrier::new(FLOODERS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::new();
    for f in 0..FLOODERS {
        let token = minter.mint("flood", &format!("f{f}"), exp);
        flooders.push(tokio::spawn(flooder(
            public,
            token,
            start.clone(),
            stop.clone(),
        )));
    }
    // The victim's quiet measurement window.
    let cpu0 = procs::cpu_seconds(Some(pid)).unwrap_or(0.0);
    tokio::time::sleep(BEFORE).await;
    let cpu1 = procs::cpu_seconds(Some(pid)).unwrap_or(0.0);
    victim.flood_from.store(now_us(), Ordering::Relaxed);
    start.wait().await;
    let flood_started = Instant::now();
    tokio::time::sleep(DURING).await;
    victim.flood_until.store(now_us(), Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let cpu2 = procs::cpu_seconds(Some(pid)).unwrap_or(0.0);
    let mut results = Vec::new();
    for f in flooders {
        results.push(f.await??);
    }
    // Every message of the window answered 200 arrives, or counts as lost after 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while victim.received_during.load(Ordering::Relaxed) < sent_during.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publishing.store(false, Ordering::Relaxed);
    let _ = publisher.await;
    receiver.abort();
    let metrics = fanout_testkit::Metrics::new(
        HttpClient::new(internal)
            .request(Method::GET, "/metrics", Bytes::new(), None)
            .await
            .map(|(_, body)| String::from_utf8_lossy(&body).into_owned())
            .unwrap_or_default(),
    );

    let frames_sent: u64 = results.iter().map(|r| r.sent).sum();
    let all_open = results.iter().all(|r| r.closed.is_none());
    let frames_per_s = all_open.then(|| frames_sent as f64 / DURING.as_secs_f64());
    let queued: Option<u64> = results.iter().map(|r| r.queued_bytes).sum();
    let frames_read = queued
        .filter(|_| all_open)
        .map(|q| frames_sent.saturating_sub(q / TINY_FRAME_WIRE_BYTES));
    let frames_read_per_s = frames_read.map(|n| n as f64 / DURING.as_secs_f64());
    let mut close_ms: Vec<f64> = results
        .iter()
        .filter_map(|r| r.closed.as_ref())
        .map(|(at, _)| at.saturating_duration_since(flood_started).as_secs_f64() * 1000.0)
        .collect();
    close_ms.sort_by(f64::total_cmp);
    let ms = |h: &std::sync::Mutex<hdrhistogram::Histogram<u64>>, q: f64| {
        let h = h.lock().expect("not poisoned");
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    };
    let sent = sent_during.load(Ordering::Relaxed);
    Ok(Frames {
        build: label.to_string(),
        budget,
        round,
        flooders: FLOODERS,
        frames_sent,
        frames_per_s,
        frames_read,
        frames_read_per_s,
        flooders_closed: close_ms.len(),
        close_ms_median: close_ms.get(close_ms.len() / 2).copied(),
        close_ms_max: close_ms.last().copied(),
        close_reason: results
            .iter()
            .find_map(|r| r.closed.as_ref().map(|(_, how)| how.clone())),
        refused_packet_rate: metrics.get(
            "fanout_connections_refused_total",
            &[("reason", "packet_rate")],
        ),
        victim_before_p50_ms: ms(&victim.before, 0.5),
        victim_before_p99_ms: ms(&victim.before, 0.99),
        victim_during_p50_ms: ms(&victim.during, 0.5),
        victim_during_p99_ms: ms(&victim.during, 0.99),
        victim_lost: sent.saturating_sub(victim.received_during.load(Ordering::Relaxed)),
        cpu_before: (cpu1 - cpu0) / BEFORE.as_secs_f64(),
        cpu_during: (cpu2 - cpu1) / DURING.as_secs_f64(),
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
    if !report.frames.is_empty() {
        let mut t = Table::new([
            "build",
            "budget",
            "round",
            "frames written",
            "written/s",
            "read by the server",
            "read/s",
            "closed",
            "close ms (median/max)",
            "victim p50/p99 before (ms)",
            "during",
            "lost",
            "CPU before/during (cores)",
        ]);
        for r in &report.frames {
            t.row([
                r.build.clone(),
                r.budget.map_or("off".into(), |b| format!("{b}/s")),
                r.round.to_string(),
                r.frames_sent.to_string(),
                num(r.frames_per_s, 0),
                r.frames_read.map_or_else(
                    || match (r.budget, r.close_ms_max) {
                        (Some(b), Some(ms)) => format!(
                            "≤ {} each (budget)",
                            b as u64 + (b as f64 * ms / 1000.0).ceil() as u64
                        ),
                        _ => "-".to_string(),
                    },
                    |n| n.to_string(),
                ),
                num(r.frames_read_per_s, 0),
                format!("{}/{}", r.flooders_closed, r.flooders),
                format!("{} / {}", num(r.close_ms_median, 1), num(r.close_ms_max, 1)),
                format!(
                    "{} / {}",
                    num(r.victim_before_p50_ms, 2),
                    num(r.victim_before_p99_ms, 2)
                ),
                format!(
                    "{} / {}",
                    num(r.victim_during_p50_ms, 2),
                    num(r.victim_during_p99_ms, 2)
                ),
                r.victim_lost.to_string(),
                format!("{:.2} / {:.2}", r.cpu_before, r.cpu_during),
            ]);
        }
        let reasons: Vec<String> = report
            .frames
            .iter()
            .filter_map(|r| r.close_reason.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        out.push((
            format!(
                "frames: {FLOODERS} authenticated clients writing {TINY_FRAME} as fast as they can for {} s, a member of another organization receiving {VICTIM_RATE} messages/s (close received: {})",
                DURING.as_secs(),
                if reasons.is_empty() { "none".to_string() } else { reasons.join("; ") }
            ),
            t,
        ));
    }
    out
}
