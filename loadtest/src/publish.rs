//! Publishers: where messages enter the system under test, paced and numbered.
//!
//! Each organization is owned by exactly one publisher, which numbers its messages 0, 1, 2, ...
//! for the whole run and waits for each publish's answer before sending the next. So each
//! organization's messages enter the system in order, and after a step the publisher knows
//! exactly how many it sent to each organization: loss is "expected minus received", with
//! nothing estimated. A failed publish does not consume its number.
//!
//! Sends follow a schedule of evenly spaced instants, not a burst per timer tick, and the
//! publishers' schedules are offset from each other so that together they send evenly too
//! (in unison, 8 publishers would turn a rate into bursts of 8 messages). A publisher
//! that falls behind sends late messages at once, but drops the part of its schedule that is
//! more than [`MAX_LAG`] old, so a saturated system shows as a lower achieved rate rather
//! than as a catch-up burst.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use crate::http::HttpClient;
use crate::message::{BodyWriter, now_us, org_name, redis_envelope};

/// How far behind its schedule a publisher may run before it skips sends.
pub(crate) const MAX_LAG: Duration = Duration::from_millis(50);

/// Waits for the send scheduled at `due`. A sender more than [`MAX_LAG`] late skips the
/// sends it missed (counted in `skipped`, `due` moved past them) and returns false: the
/// caller re-checks its schedule instead of sending.
pub(crate) async fn keep_pace(due: &mut Instant, interval: Duration, skipped: &mut u64) -> bool {
    let now = Instant::now();
    if *due > now {
        tokio::time::sleep_until(*due).await;
    } else if now - *due > MAX_LAG {
        let missed = ((now - *due - MAX_LAG).as_secs_f64() / interval.as_secs_f64())
            .ceil()
            .max(1.0) as u32;
        *skipped += missed as u64;
        *due += interval * missed;
        return false;
    }
    true
}
/// fanout's default channel prefix (`FANOUT_REDIS_PREFIX`).
const CHANNEL_PREFIX: &str = "fanout:org:";

/// Where publishers send.
#[derive(Debug, Clone)]
pub enum Target {
    /// `PUBLISH fanout:org:<org> <envelope>` to this Redis.
    Redis(SocketAddr),
    /// `SPUBLISH fanout:org:<org> <envelope>` to the master owning the channel's slot: the
    /// slot ranges `(first, last, master)` of a Redis Cluster.
    Cluster(Vec<(u16, u16, SocketAddr)>),
    /// `POST /executions/update` to these internal listeners (publisher `p` uses `urls[p % n]`).
    Http { urls: Vec<SocketAddr>, key: String },
}

impl Target {
    /// `redis://HOST:PORT` or a comma-separated list of `http://HOST:PORT`.
    pub fn parse(spec: &str, ingest_key: Option<&str>) -> anyhow::Result<Self> {
        if spec.starts_with("redis://") {
            return Ok(Self::Redis(crate::net::parse_addr(spec)?));
        }
        let key = ingest_key
            .context("--ingest-key is required to publish over HTTP")?
            .to_string();
        Ok(Self::Http {
            urls: crate::net::parse_addrs(spec)?,
            key,
        })
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Self::Redis(_) => "Redis",
            Self::Cluster(_) => "Redis Cluster",
            Self::Http { .. } => "HTTP",
        }
    }
}

/// What a publisher did during one step.
#[derive(Debug, Default)]
pub struct StepSent {
    /// Messages sent (answered with success) per owned organization index.
    pub per_org: Vec<(usize, u64)>,
    pub sent: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Scheduled sends dropped because the publisher ran more than `MAX_LAG` late.
    pub skipped: u64,
    /// Redis PUBLISH answers that reached no subscriber.
    pub no_receivers: u64,
}

struct Owned {
    index: usize,
    name: String,
    next_seq: u64,
}

enum Sink {
    Redis(RedisConn),
    /// One connection per master, and for each owned organization the index of its master.
    Cluster(Vec<RedisConn>, Vec<usize>),
    Http(HttpClient, String),
}

pub struct Publisher {
    id: usize,
    orgs: Vec<Owned>,
    sink: Sink,
    body: BodyWriter,
    scratch: String,
}

impl Publisher {
    /// A publisher owning the organizations `orgs` (indices), connected to `target`.
    pub async fn connect(
        id: usize,
        orgs: Vec<usize>,
        target: &Target,
        payload_bytes: usize,
    ) -> anyhow::Result<Self> {
        let sink = match target {
            Target::Redis(addr) => {
                let mut conn = RedisConn::new(*addr, "PUBLISH");
                conn.connect().await?;
                Sink::Redis(conn)
            }
            Target::Cluster(ranges) => {
                let mut conns = Vec::new();
                for (_, _, addr) in ranges {
                    let mut conn = RedisConn::new(*addr, "SPUBLISH");
                    conn.connect().await?;
                    conns.push(conn);
                }
                let owner = |index: &usize| {
                    let slot = fanout_testkit::RedisCluster::slot(&format!(
                        "{CHANNEL_PREFIX}{}",
                        org_name(*index)
                    ));
                    ranges
                        .iter()
                        .position(|(first, last, _)| (*first..=*last).contains(&slot))
                        .context("a slot no master owns")
                };
                let owners = orgs.iter().map(owner).collect::<anyhow::Result<Vec<_>>>()?;
                Sink::Cluster(conns, owners)
            }
            Target::Http { urls, key } => {
                Sink::Http(HttpClient::new(urls[id % urls.len()]), key.clone())
            }
        };
        Ok(Self {
            id,
            orgs: orgs
                .into_iter()
                .map(|index| Owned {
                    index,
                    name: org_name(index),
                    next_seq: 0,
                })
                .collect(),
            sink,
            body: BodyWriter::new(payload_bytes),
            scratch: String::new(),
        })
    }

    pub fn id(&self) -> usize {
        self.id
    }

    /// How many organizations this publisher owns.
    pub fn owned(&self) -> usize {
        self.orgs.len()
    }

    /// Publishes at `rate` messages/s from `start` until `end`, cycling over the owned
    /// organizations; every body is tagged with `step`. `phase` (0..1, in send intervals)
    /// offsets this publisher's schedule so that publishers started together interleave
    /// instead of sending in unison.
    pub async fn run_step(
        mut self,
        step: u32,
        rate: f64,
        phase: f64,
        start: Instant,
        end: Instant,
    ) -> (Self, StepSent) {
        let mut out = StepSent::default();
        let first_seq: Vec<u64> = self.orgs.iter().map(|o| o.next_seq).collect();
        if rate > 0.0 && !self.orgs.is_empty() {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let mut due = start + interval.mul_f64(phase.clamp(0.0, 1.0));
            let mut turn = 0usize;
            let mut failing = 0u32;
            while due < end {
                if !keep_pace(&mut due, interval, &mut out.skipped).await {
                    continue;
                }
                let slot = turn % self.orgs.len();
                turn += 1;
                due += interval;
                match self.publish(slot, step).await {
                    Ok(()) => {
                        self.orgs[slot].next_seq += 1;
                        out.sent += 1;
                        failing = 0;
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                        failing += 1;
                        if failing > 10 {
                            // The server is down or refusing: do not spin.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        } else {
            tokio::time::sleep_until(end).await;
        }
        match &mut self.sink {
            Sink::Redis(r) => out.no_receivers = std::mem::take(&mut r.no_receivers),
            Sink::Cluster(conns, _) => {
                out.no_receivers = conns
                    .iter_mut()
                    .map(|r| std::mem::take(&mut r.no_receivers))
                    .sum();
            }
            Sink::Http(..) => {}
        }
        out.per_org = self
            .orgs
            .iter()
            .zip(first_seq)
            .map(|(o, first)| (o.index, o.next_seq - first))
            .collect();
        (self, out)
    }

    async fn publish(&mut self, slot: usize, step: u32) -> anyhow::Result<()> {
        let org = &self.orgs[slot];
        let sent_us = now_us();
        let body = self
            .body
            .write(&org.name, self.id, step, org.next_seq, sent_us);
        match &mut self.sink {
            Sink::Redis(conn) => {
                redis_envelope(&mut self.scratch, body, sent_us / 1000);
                conn.publish(&org.name, &self.scratch).await
            }
            Sink::Cluster(conns, owners) => {
                redis_envelope(&mut self.scratch, body, sent_us / 1000);
                conns[owners[slot]].publish(&org.name, &self.scratch).await
            }
            Sink::Http(client, key) => {
                let body = Bytes::copy_from_slice(body.as_bytes());
                let (status, answer) = client
                    .request(Method::POST, "/executions/update", body, Some(key))
                    .await?;
                if status != StatusCode::OK {
                    anyhow::bail!(
                        "POST /executions/update answered {status}: {}",
                        String::from_utf8_lossy(&answer)
                    );
                }
                Ok(())
            }
        }
    }
}

/// Just enough RESP to PUBLISH (or SPUBLISH) and read the integer answer.
struct RedisConn {
    addr: SocketAddr,
    /// `PUBLISH`, or `SPUBLISH` for a cluster's master.
    command: &'static str,
    io: Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
    cmd: Vec<u8>,
    line: Vec<u8>,
    no_receivers: u64,
}

impl RedisConn {
    fn new(addr: SocketAddr, command: &'static str) -> Self {
        Self {
            addr,
            command,
            io: None,
            cmd: Vec::new(),
            line: Vec::new(),
            no_receivers: 0,
        }
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to redis://{}", self.addr))?;
        tcp.set_nodelay(true)?;
        let (r, w) = tcp.into_split();
        self.io = Some((BufReader::new(r), w));
        Ok(())
    }

    async fn publish(&mut self, org: &str, payload: &str) -> anyhow::Result<()> {
        if self.io.is_none() {
            self.connect().await?;
        }
        self.cmd.clear();
        let channel_len = CHANNEL_PREFIX.len() + org.len();
        self.cmd.extend_from_slice(
            format!("*3\r\n${}\r\n{}\r\n", self.command.len(), self.command).as_bytes(),
        );
        self.cmd
            .extend_from_slice(format!("${channel_len}\r\n{CHANNEL_PREFIX}{org}\r\n").as_bytes());
        self.cmd
            .extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
        self.cmd.extend_from_slice(payload.as_bytes());
        self.cmd.extend_from_slice(b"\r\n");
        let result = async {
            let (reader, writer) = self.io.as_mut().expect("connected above");
            writer.write_all(&self.cmd).await?;
            self.line.clear();
            if reader.read_until(b'\n', &mut self.line).await? == 0 {
                anyhow::bail!("redis closed the connection");
            }
            parse_integer_reply(&self.line)
        }
        .await;
        match result {
            Ok(0) => {
                self.no_receivers += 1;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.io = None;
                Err(e.context(format!("{} to redis://{}", self.command, self.addr)))
            }
        }
    }
}

fn parse_integer_reply(line: &[u8]) -> anyhow::Result<i64> {
    let text = std::str::from_utf8(line)?.trim_end();
    match text.strip_prefix(':') {
        Some(n) => Ok(n.parse()?),
        None => anyhow::bail!("unexpected answer {text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_replies_parse() {
        assert_eq!(parse_integer_reply(b":2\r\n").unwrap(), 2);
        assert!(parse_integer_reply(b"-ERR wrong\r\n").is_err());
    }

    #[test]
    fn targets_parse() {
        assert!(matches!(
            Target::parse("redis://127.0.0.1:6400", None).unwrap(),
            Target::Redis(_)
        ));
        assert!(Target::parse("http://127.0.0.1:3001", None).is_err());
        match Target::parse("http://127.0.0.1:3001,http://127.0.0.1:3002", Some("k")).unwrap() {
            Target::Http { urls, key } => assert_eq!((urls.len(), key.as_str()), (2, "k")),
            other => panic!("{other:?}"),
        }
    }
}
