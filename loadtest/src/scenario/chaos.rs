//! The load of `chaos`: durable ingest and reconnecting members, checked event by event.
//!
//! The faults themselves are the caller's (`chaos.rs` owns the processes); this module only
//! runs the load around them and keeps the books, so that what a fault did can be read from
//! the load alone:
//!
//! - **Members**: every member of an organization is a Socket.IO client with a token of its
//!   own. It first connects with `lastSeq: 0` before the first event exists, so every
//!   event of its organization is owed to it. It then keeps leaving (dropping its TCP
//!   connection after a random session) and coming back to a random replica with `lastSeq`
//!   = the highest `seq` it has received; when its replica dies it comes back at once. A
//!   member that cannot connect (its replica is down) tries another random one.
//! - **Publishers**: paced (open loop) `POST /executions/update` over keep-alive
//!   connections, each publisher owning some organizations and sending to every replica in
//!   turn, as a load balancer would; every answer is kept with its send and answer times,
//!   replica and class (200, 503, other status, connection error, timeout), and the `seq`
//!   and body number of a 200.
//!
//! Exactness is checked per member over its whole life, across reconnections: each `seq`
//! at most once (a second delivery is a *duplicate*), each in order (one that is not the
//! previous + 1 is *out of order*), never another organization's body (*foreign*), every
//! `seq` answered 200 received (*missing* otherwise) with the body that was answered with
//! that `seq` (*mismatched* otherwise). An organization's `seq`s are 1, 2, 3, … without gaps
//! whatever was answered, so a `seq` below a member's highest that it never received is a
//! *hole*, even when its publisher never saw the 200 (the replica died after the commit).
//!
//! `resync-required` ends the member's connection at once, unread frames with it, and it
//! comes back with the same `lastSeq`, which is what a client that would rather wait for its
//! replay than refetch does; each one is counted by reason (the caller judges them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fanout_testkit::token::Minter;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Conn, OPEN_TIMEOUT};
use crate::http::HttpClient;
use crate::message::{BodyWriter, now_us, org_name, parse_body};
use crate::publish::keep_pace;

/// A request unanswered for this long counts as timed out (and its connection is dropped).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the catch-up watch looks at the members.
const WATCH_EVERY: Duration = Duration::from_millis(20);

pub struct Params {
    /// Public listeners, one per replica; they keep their addresses across restarts.
    pub public: Vec<SocketAddr>,
    /// Internal listeners (ingest), in the same order.
    pub ingest: Vec<SocketAddr>,
    pub secret: String,
    pub ingest_key: String,
    pub orgs: usize,
    pub members: usize,
    pub events_per_s: u64,
    pub publishers: usize,
    pub payload_bytes: usize,
    /// A member's sessions last a random time in this range.
    pub session: (Duration, Duration),
}

/// What an ingest request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Ok,
    Unavailable,
    OtherStatus,
    ConnectionError,
    Timeout,
}

/// One ingest request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Milliseconds since the load started.
    pub sent_ms: u32,
    pub done_ms: u32,
    pub replica: u8,
    pub class: Class,
    pub org: u32,
    /// The body number (`s`) sent, and for a 200 the `seq` answered.
    pub s: u64,
    pub seq: Option<u64>,
    /// A 200 `"published": false`: committed, the bus did not take it.
    pub unpublished: bool,
    /// For any other answer: the status and body, or the error.
    pub detail: Option<String>,
}

/// One member's life.
#[derive(Debug, Default)]
pub struct MemberOut {
    pub org: usize,
    /// By `seq`: the body number received + 1, 0 if never received.
    pub got: Vec<u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub foreign: u64,
    pub malformed: u64,
    pub without_seq: u64,
    /// `(reason, ms since the load started)`.
    pub resyncs: Vec<(String, u32)>,
    pub sessions: u64,
    /// Connections the server ended (its replica died, or it closed them), with when.
    pub forced: Vec<u32>,
    pub voluntary: u64,
    pub connect_failures: u64,
    pub first_connect_error: Option<String>,
    pub first_forced: Option<String>,
}

/// What the load's tasks share with the caller while it runs.
struct Shared {
    t0: Instant,
    org_of: Vec<usize>,
    /// Per member: the highest `seq` received.
    highest: Vec<AtomicU64>,
    /// Per organization: the highest `seq` answered 200 so far.
    answered: Vec<AtomicU64>,
    /// Per replica: send time (ms + 1, 0 for never) of the latest request answered 200.
    last_ok_sent: Vec<AtomicU64>,
    ready: AtomicUsize,
}

impl Shared {
    fn ms(&self) -> u32 {
        self.t0.elapsed().as_millis() as u32
    }
}

/// A small SplitMix64: random session lengths and replicas, no crate needed.
struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_u64(salt);
        Self(h.finish())
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(if span == 0 { 0 } else { self.next() % span })
    }
}

/// The load, running.
pub struct Load {
    shared: Arc<Shared>,
    stop_members: watch::Sender<bool>,
    stop_ingest: watch::Sender<bool>,
    members: Vec<JoinHandle<MemberOut>>,
    publishers: Vec<JoinHandle<(Vec<Answer>, u64)>>,
}

/// Everything the load saw.
pub struct Outcome {
    pub members: Vec<MemberOut>,
    pub answers: Vec<Answer>,
    /// Publisher tasks that failed (a panic: a bug of the generator).
    pub lost_publishers: usize,
    pub lost_members: usize,
    /// Sends the publishers skipped because they ran late.
    pub skipped: u64,
}

impl Load {
    /// Connects every member (each with `lastSeq: 0`), waits until all of them are
    /// authenticated, then starts the publishers.
    pub async fn start(p: Params) -> anyhow::Result<Self> {
        anyhow::ensure!(
            p.orgs > 0 && p.members >= p.orgs,
            "need a member in every org"
        );
        anyhow::ensure!(
            p.publishers > 0 && p.publishers <= p.orgs,
            "--publishers must be 1..=orgs (each publisher owns its organizations)"
        );
        let org_of: Vec<usize> = (0..p.members).map(|i| i % p.orgs).collect();
        let shared = Arc::new(Shared {
            t0: Instant::now(),
            highest: (0..p.members).map(|_| AtomicU64::new(0)).collect(),
            answered: (0..p.orgs).map(|_| AtomicU64::new(0)).collect(),
            last_ok_sent: p.ingest.iter().map(|_| AtomicU64::new(0)).collect(),
            org_of: org_of.clone(),
            ready: AtomicUsize::new(0),
        });
        let exp = fanout_testkit::now_secs() + 24 * 3600;
        let secret = p.secret.clone();
        let tokens: Vec<String> = tokio::task::spawn_blocking(move || {
            let minter = Minter::new(&secret);
            org_of
                .iter()
                .enumerate()
                .map(|(i, o)| minter.mint(&org_name(*o), &format!("member-{i}"), exp))
                .collect()
        })
        .await?;
        let (stop_members, stop_rx) = watch::channel(false);
        let public = Arc::new(p.public.clone());
        let members = tokens
            .into_iter()
            .enumerate()
            .map(|(i, token)| {
                tokio::spawn(member(
                    i,
                    token,
                    public.clone(),
                    p.session,
                    shared.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        let deadline = Instant::now() + OPEN_TIMEOUT * 2;
        while shared.ready.load(Ordering::Acquire) < p.members {
            if Instant::now() > deadline {
                let _ = stop_members.send(true);
                anyhow::bail!(
                    "only {} of {} members were authenticated within {:?}",
                    shared.ready.load(Ordering::Acquire),
                    p.members,
                    OPEN_TIMEOUT * 2
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Each replica has read its organizations' first cursors: the members joined.
        let (stop_ingest, stop_ingest_rx) = watch::channel(false);
        let interval = Duration::from_secs_f64(p.publishers as f64 / p.events_per_s.max(1) as f64);
        let ingest = Arc::new(p.ingest.clone());
        let publishers = (0..p.publishers)
            .map(|j| {
                let orgs: Vec<usize> = (0..p.orgs).filter(|o| o % p.publishers == j).collect();
                tokio::spawn(publisher(
                    j,
                    orgs,
                    ingest.clone(),
                    interval,
                    Duration::from_secs_f64(
                        interval.as_secs_f64() * j as f64 / p.publishers as f64,
                    ),
                    p.ingest_key.clone(),
                    p.payload_bytes,
                    shared.clone(),
                    stop_ingest_rx.clone(),
                ))
            })
            .collect();
        Ok(Self {
            shared,
            stop_members,
            stop_ingest,
            members,
            publishers,
        })
    }

    /// The instant the load's clock counts from.
    pub fn t0(&self) -> Instant {
        self.shared.t0
    }

    /// Per organization, the highest `seq` answered 200 so far.
    pub fn answered(&self) -> Vec<u64> {
        self.shared
            .answered
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect()
    }

    /// Whether every member has received `target[org]` (and so, in order, all before it).
    pub fn caught_up(&self, target: &[u64]) -> bool {
        self.shared
            .highest
            .iter()
            .zip(&self.shared.org_of)
            .all(|(h, o)| h.load(Ordering::Acquire) >= target[*o])
    }

    /// Waits until every member has caught up with `target`; the instant, or `None` after
    /// `timeout`.
    pub async fn wait_caught_up(&self, target: &[u64], timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.caught_up(target) {
                return Some(Instant::now());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }

    /// Waits until every replica has answered 200 to a request sent at or after `since`.
    pub async fn wait_ingest_ok(&self, since: Instant, timeout: Duration) -> Option<Instant> {
        let since_ms = since.saturating_duration_since(self.shared.t0).as_millis() as u64;
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .shared
                .last_ok_sent
                .iter()
                .all(|t| t.load(Ordering::Acquire) > since_ms)
            {
                return Some(Instant::now());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }

    /// Stops the publishers and collects their answers (sorted by send time), how many
    /// publisher tasks failed and how many sends were skipped; members keep going.
    pub async fn stop_ingest(&mut self) -> (Vec<Answer>, usize, u64) {
        let _ = self.stop_ingest.send(true);
        let mut answers = Vec::new();
        let (mut lost, mut skipped) = (0, 0);
        for t in self.publishers.drain(..) {
            match t.await {
                Ok((a, s)) => {
                    answers.extend(a);
                    skipped += s;
                }
                Err(_) => lost += 1,
            }
        }
        answers.sort_by_key(|a| a.sent_ms);
        (answers, lost, skipped)
    }

    /// Stops the members and collects what they saw.
    pub async fn finish(mut self) -> Outcome {
        let (answers, lost_publishers, skipped) = self.stop_ingest().await;
        let _ = self.stop_members.send(true);
        let mut members = Vec::new();
        let mut lost_members = 0;
        for t in self.members.drain(..) {
            match t.await {
                Ok(m) => members.push(m),
                Err(_) => lost_members += 1,
            }
        }
        Outcome {
            members,
            answers,
            lost_publishers,
            lost_members,
            skipped,
        }
    }
}

impl MemberOut {
    fn on_body(&mut self, bytes: &[u8], seq: Option<u64>, org: &str, highest: &AtomicU64) {
        let Some(body) = parse_body(bytes) else {
            self.malformed += 1;
            return;
        };
        if body.org != org {
            self.foreign += 1;
            return;
        }
        let Some(n) = seq else {
            self.without_seq += 1;
            return;
        };
        let n_us = n as usize;
        if self.got.len() <= n_us {
            self.got.resize(n_us + 1024, 0);
        }
        if self.got[n_us] != 0 {
            self.duplicates += 1;
            return;
        }
        self.got[n_us] = body.s + 1;
        let high = highest.load(Ordering::Relaxed);
        if n != high + 1 {
            self.out_of_order += 1;
        }
        highest.store(high.max(n), Ordering::Release);
    }
}

async fn member(
    i: usize,
    token: String,
    public: Arc<Vec<SocketAddr>>,
    session: (Duration, Duration),
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> MemberOut {
    let org_index = shared.org_of[i];
    let org = org_name(org_index);
    let mut out = MemberOut {
        org: org_index,
        ..Default::default()
    };
    let mut rng = Rng::seeded(i as u64);
    let mut first = true;
    while !*stop.borrow() {
        let addr = public[rng.below(public.len())];
        let last_seq = shared.highest[i].load(Ordering::Acquire);
        let opened = tokio::time::timeout(OPEN_TIMEOUT, Conn::resume(addr, &org, &token, last_seq))
            .await
            .map_err(|_| format!("not authenticated within {OPEN_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let conn = match opened {
            Ok(conn) => conn,
            Err(e) => {
                out.connect_failures += 1;
                out.first_connect_error.get_or_insert(e);
                let pause = rng.between(Duration::from_millis(20), Duration::from_millis(200));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        out.sessions += 1;
        if first {
            first = false;
            shared.ready.fetch_add(1, Ordering::AcqRel);
        }
        let life = rng.between(session.0, session.1);
        let mut resync: Option<String> = None;
        let ended = {
            let run = conn.run_with_events(
                |bytes, seq| out_on_body(&mut out, bytes, seq, &org, &shared.highest[i]),
                |args| {
                    if args.starts_with("[\"resync-required\"") {
                        resync = Some(args.to_string());
                        false
                    } else {
                        true
                    }
                },
            );
            tokio::select! {
                why = run => Some(why),
                _ = tokio::time::sleep(life) => None,
                _ = stop.changed() => None,
            }
        };
        match (resync, ended) {
            (Some(args), _) => {
                #[derive(Deserialize)]
                struct Resync(serde::de::IgnoredAny, Reason);
                #[derive(Deserialize)]
                struct Reason {
                    reason: String,
                }
                let reason = serde_json::from_str::<Resync>(&args)
                    .map_or_else(|_| format!("unreadable: {args}"), |r| r.1.reason);
                out.resyncs.push((reason, shared.ms()));
            }
            (None, Some(why)) => {
                out.forced.push(shared.ms());
                out.first_forced.get_or_insert(why);
                // Like a client whose replica went away: back at once, elsewhere.
                continue;
            }
            (None, None) => out.voluntary += 1,
        }
        let pause = rng.between(Duration::ZERO, Duration::from_millis(200));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
    out
}

/// [`MemberOut::on_body`] as a free function, so the receive closure borrows `out` alone.
fn out_on_body(out: &mut MemberOut, bytes: &[u8], seq: Option<u64>, org: &str, h: &AtomicU64) {
    out.on_body(bytes, seq, org, h);
}

#[derive(Deserialize)]
struct Reply {
    seq: Option<u64>,
    published: Option<bool>,
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    id: usize,
    orgs: Vec<usize>,
    ingest: Arc<Vec<SocketAddr>>,
    interval: Duration,
    offset: Duration,
    key: String,
    payload_bytes: usize,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> (Vec<Answer>, u64) {
    let mut clients: Vec<HttpClient> = ingest.iter().map(|a| HttpClient::new(*a)).collect();
    let mut body = BodyWriter::new(payload_bytes);
    let mut next_s = vec![0u64; orgs.len()];
    let names: Vec<String> = orgs.iter().map(|o| org_name(*o)).collect();
    let mut answers = Vec::new();
    let mut due = Instant::now() + offset;
    let mut skipped = 0u64;
    let mut turn = id;
    while !*stop.borrow() {
        if !keep_pace(&mut due, interval, &mut skipped).await {
            continue;
        }
        due += interval;
        let slot = turn % orgs.len();
        let replica = turn % clients.len();
        turn += 1;
        let s = next_s[slot];
        next_s[slot] += 1;
        let text = body.write(&names[slot], id, 0, s, now_us());
        let request = Bytes::copy_from_slice(text.as_bytes());
        let sent_ms = shared.ms();
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            clients[replica].request(Method::POST, "/executions/update", request, Some(&key)),
        )
        .await;
        let mut answer = Answer {
            sent_ms,
            done_ms: shared.ms(),
            replica: replica as u8,
            class: Class::Ok,
            org: orgs[slot] as u32,
            s,
            seq: None,
            unpublished: false,
            detail: None,
        };
        answer.class = match result {
            Ok(Ok((status, reply))) if status == StatusCode::OK => {
                if let Ok(r) = serde_json::from_slice::<Reply>(&reply) {
                    answer.seq = r.seq;
                    answer.unpublished = r.published == Some(false);
                }
                if let Some(seq) = answer.seq {
                    shared.answered[orgs[slot]].fetch_max(seq, Ordering::AcqRel);
                }
                shared.last_ok_sent[replica].fetch_max(sent_ms as u64 + 1, Ordering::AcqRel);
                Class::Ok
            }
            Ok(Ok((status, reply))) => {
                answer.detail = Some(format!("{status}: {}", String::from_utf8_lossy(&reply)));
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    Class::Unavailable
                } else {
                    Class::OtherStatus
                }
            }
            Ok(Err(e)) => {
                answer.detail = Some(format!("{e:#}"));
                Class::ConnectionError
            }
            Err(_) => {
                clients[replica] = HttpClient::new(ingest[replica]);
                Class::Timeout
            }
        };
        answers.push(answer);
    }
    (answers, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(org: &str, s: u64) -> String {
        BodyWriter::new(0).write(org, 0, 0, s, 1).to_string()
    }

    #[test]
    fn members_count_repeats_reorderings_and_strangers() {
        let highest = AtomicU64::new(0);
        let mut m = MemberOut::default();
        for (s, seq) in [(0, 1), (1, 2), (1, 2), (3, 4), (2, 3)] {
            m.on_body(body("org-1", s).as_bytes(), Some(seq), "org-1", &highest);
        }
        m.on_body(body("org-2", 9).as_bytes(), Some(5), "org-1", &highest);
        m.on_body(body("org-1", 9).as_bytes(), None, "org-1", &highest);
        m.on_body(b"{", Some(6), "org-1", &highest);
        assert_eq!(m.duplicates, 1);
        // 4 after 2 skipped ahead, 3 after 4 came late.
        assert_eq!(m.out_of_order, 2);
        assert_eq!((m.foreign, m.without_seq, m.malformed), (1, 1, 1));
        assert_eq!(&m.got[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(highest.load(Ordering::Relaxed), 4);
    }
}
