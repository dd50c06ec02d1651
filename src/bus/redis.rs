//! Redis pub/sub: one channel per organization, subscribed only while needed.
//!
//! Publishing goes through a small connection pool. Subscribing is owned by a single task
//! (the *subscriber*) that holds the one pub/sub connection and is the only code that sends
//! SUBSCRIBE or UNSUBSCRIBE. Gateways never subscribe themselves; they update presence and
//! then send the org id to the subscriber, which decides from the *current* presence count
//! what the subscription must be. Because every decision reads presence after the change
//! that triggered it, and requests are handled in order, no interleaving of joins and
//! leaves can leave the replica unsubscribed from an org it holds sockets of. A join
//! carries a reply channel, answered only after the batch that contains it is applied, so a
//! socket is told `auth-success` only once its organization's messages reach this replica.
//!
//! On connection loss the subscriber reconnects with capped exponential backoff and jitter
//! and re-subscribes every organization presence still holds (a full resync, so requests
//! lost while down do not matter).
//!
//! A connection can also die without closing: a half-open TCP connection, a proxy that
//! stops forwarding, a server that dropped the subscription. So the subscriber proves its
//! subscription alive by using it: every `FANOUT_BUS_PROBE_INTERVAL` it PINGs the connection
//! and PUBLISHes a numbered probe to a channel of its own (`{prefix}probe:{random id}`),
//! through the same pool as real messages. A probe that Redis took but that does not come
//! back within one interval, or that Redis says reached no subscriber, tears the connection
//! down: the replica turns unready and re-subscribes everything on a new one.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use redis::AsyncCommands;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::gaps::Gaps;
use super::gate::{Gate, Request};
use super::inbound::Inbound;
use super::master::Master;
use super::probe::{self, Probe};
use super::{BusError, BusSetupError, RedisSettings, Sink};
use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::presence::Presence;
use crate::protocol::{Message, OrgId};
use crate::retry::{RateLimit, Retry};
use crate::tasks::{Policy, Tasks};

/// Bound on any single Redis command, so a half-open connection is noticed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short: while one replica waits out its backoff after a failover, the others already
/// deliver again, and its members miss what they get. Jitter spreads the reconnections.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this interval while the subscriber cannot connect.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// Channels per SUBSCRIBE command when re-subscribing or applying a batch.
const CHUNK: usize = 1000;

pub struct RedisBus {
    master: Arc<Master>,
    prefix: String,
    /// Its generation counts the subscriber sessions that came up so far: a change means
    /// the subscriptions were lost and made again meanwhile.
    gate: Gate,
}

fn channel(prefix: &str, org: &OrgId) -> String {
    format!("{prefix}org:{org}")
}

/// The answer to a check a tick started. Checks run beside the session's loop, so a slow
/// answer never holds up joins and leaves.
enum Check {
    /// The PING of the subscription connection.
    Ping(Result<(), String>),
    /// Probe `n` was PUBLISHed: to how many subscribers, says Redis.
    Sent(u64, Result<i64, String>),
}

impl RedisBus {
    pub fn start(
        settings: RedisSettings,
        presence: Arc<Presence>,
        sink: Arc<dyn Sink>,
        tasks: &Tasks,
    ) -> Result<Self, BusSetupError> {
        let master = Arc::new(Master::new(settings.target)?);
        let (gate, rx) = Gate::new(presence.clone(), None);
        ::metrics::gauge!(metrics::REDIS_UP).set(0.0);
        ::metrics::gauge!(metrics::REDIS_SUBSCRIPTIONS).set(0.0);
        // Restarted when it fails: presence says what to subscribe to, and requests wait
        // in their channel for the next incarnation.
        let requests = Arc::new(tokio::sync::Mutex::new(rx));
        let prefix = settings.prefix.clone();
        let (max_payload, up_flag, session_count) = (
            settings.max_payload_bytes,
            gate.up.clone(),
            gate.generation.clone(),
        );
        let gaps = gate.gaps.clone();
        let probe_channel = format!("{}probe:{:016x}", settings.prefix, rand::random::<u64>());
        let (shared_master, probe_interval) = (master.clone(), settings.probe_interval);
        tasks.spawn("redis-subscriber", Policy::Restart, move |shutdown| {
            let subscriber = Subscriber {
                master: shared_master.clone(),
                prefix: prefix.clone(),
                probe_channel: probe_channel.clone(),
                probe_interval,
                max_payload,
                presence: presence.clone(),
                sink: sink.clone(),
                gaps: gaps.clone(),
                up: up_flag.clone(),
                sessions: session_count.clone(),
                shutdown,
                subscribed: HashSet::new(),
            };
            let requests = requests.clone();
            async move { subscriber.run(&mut *requests.lock().await).await }
        });
        Ok(Self {
            master,
            prefix: settings.prefix,
            gate,
        })
    }

    /// Publishes one ephemeral message, only while this replica's subscriptions are all in
    /// place: after a Redis restart, Redis takes a PUBLISH again before the subscriber has
    /// re-subscribed, and a message published then reaches no one (its publisher must be
    /// told to retry). Nor is it accepted when the subscriptions were lost while it was
    /// being published, or when Redis says it reached no subscriber while this replica
    /// holds sockets of the organization (the pool is on another node than the subscriber,
    /// as after a failover).
    pub async fn publish(&self, msg: Message) -> Result<(), BusError> {
        self.gate.publish(msg, |msg| self.publish_now(msg)).await
    }

    /// PUBLISHes `msg`; answers how many subscribers Redis says received it.
    async fn publish_now(&self, msg: Message) -> Result<i64, BusError> {
        let channel = channel(&self.prefix, &msg.org);
        let payload = msg.to_envelope();
        let mut conn = self
            .master
            .pool()?
            .get()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, conn.publish::<_, _, i64>(channel, payload))
            .await
        {
            Ok(Ok(receivers)) => Ok(receivers),
            Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
            Err(_) => Err(BusError::Unavailable(format!(
                "PUBLISH took longer than {COMMAND_TIMEOUT:?}"
            ))),
        }
    }

    /// Publishes `batch` in order, in one round trip (a pipeline of PUBLISH commands).
    pub async fn publish_batch(&self, batch: &[Message]) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        for msg in batch {
            pipe.publish(channel(&self.prefix, &msg.org), msg.to_envelope())
                .ignore();
        }
        let mut conn = self
            .master
            .pool()?
            .get()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut *conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(e.to_string())),
            Err(_) => Err(BusError::Unavailable(format!(
                "PUBLISH of {} messages took longer than {COMMAND_TIMEOUT:?}",
                batch.len()
            ))),
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// `redis` or `redis-sentinel`.
    pub fn name(&self) -> &'static str {
        self.master.name()
    }
}

struct Subscriber {
    /// Where the master is; its pool sends the probes.
    master: Arc<Master>,
    prefix: String,
    /// This replica's own channel, where its probes come back.
    probe_channel: String,
    probe_interval: Duration,
    max_payload: usize,
    presence: Arc<Presence>,
    sink: Arc<dyn Sink>,
    /// What the subscriptions missed of what was published (shared with the gate).
    gaps: Arc<Gaps>,
    up: Arc<AtomicBool>,
    sessions: Arc<AtomicU64>,
    shutdown: Shutdown,
    /// Channels Redis has confirmed, as org ids. Only this task touches it.
    subscribed: HashSet<OrgId>,
}

/// The task reading a pub/sub connection: aborted when its session ends, however it ends
/// (a panic included), so that no reader of an old connection keeps delivering.
struct Reader(JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Subscriber {
    async fn run(mut self, requests: &mut mpsc::UnboundedReceiver<Request>) {
        // A previous incarnation may have died while up.
        self.down();
        let mut retry = Retry::new(
            "connect the redis subscriber",
            BACKOFF_MIN,
            BACKOFF_MAX,
            WARN_EVERY,
        );
        let shutdown = self.shutdown.clone();
        loop {
            let connect = async {
                let url = self.master.resolve().await?;
                let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
                match tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
                    Ok(Ok(pubsub)) => Ok((url, pubsub)),
                    Ok(Err(e)) => Err(super::master::explain(e.to_string())),
                    Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
                }
            };
            let failure = tokio::select! {
                _ = shutdown.wait() => return,
                res = connect => res.and_then(|(url, pubsub)| {
                    // Publishers follow the subscriber to the master it found.
                    self.master.use_url(&url).map(|()| pubsub)
                }),
            };
            let pubsub = match failure {
                Ok(pubsub) => pubsub,
                Err(why) => {
                    if !retry.failed(why, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let (mut sink, stream) = pubsub.split();
            let (probes_tx, probes) = mpsc::unbounded_channel();
            let reader = Reader(tokio::spawn(read_loop(
                stream,
                Inbound::new(
                    &self.prefix,
                    self.max_payload,
                    self.sink.clone(),
                    self.gaps.clone(),
                ),
                (self.probe_channel.clone(), probes_tx),
            )));
            let end = self
                .session(&mut sink, requests, reader, probes, &mut retry)
                .await;
            self.down();
            match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(why) => {
                    tracing::error!("redis subscriber connection lost ({why}); reconnecting");
                    if !retry.failed(why, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Not subscribed (any more): ingest refuses ephemeral messages, readiness says so.
    fn down(&mut self) {
        self.up.store(false, Ordering::Release);
        self.subscribed.clear();
        ::metrics::gauge!(metrics::REDIS_UP).set(0.0);
        ::metrics::gauge!(metrics::REDIS_SUBSCRIPTIONS).set(0.0);
    }

    async fn session(
        &mut self,
        sink: &mut PubSubSink,
        requests: &mut mpsc::UnboundedReceiver<Request>,
        mut reader: Reader,
        mut probes: mpsc::UnboundedReceiver<u64>,
        retry: &mut Retry,
    ) -> SessionEnd {
        // Full resync: whatever was requested while down, presence says what is needed now.
        let mut waiting = Vec::new();
        while let Ok(req) = requests.try_recv() {
            waiting.extend(req.applied);
        }
        if let Err(e) = with_timeout(sink.subscribe(self.probe_channel.as_str())).await {
            return SessionEnd::Lost(e);
        }
        let wanted = self.presence.orgs();
        for chunk in wanted.chunks(CHUNK) {
            let chans: Vec<String> = chunk.iter().map(|o| channel(&self.prefix, o)).collect();
            if let Err(e) = with_timeout(sink.subscribe(chans)).await {
                return SessionEnd::Lost(e);
            }
            self.subscribed.extend(chunk.iter().cloned());
        }
        let earlier = self.sessions.fetch_add(1, Ordering::AcqRel);
        self.up.store(true, Ordering::Release);
        ::metrics::gauge!(metrics::REDIS_UP).set(1.0);
        ::metrics::gauge!(metrics::REDIS_SUBSCRIPTIONS).set(self.subscribed.len() as f64);
        if earlier > 0 {
            ::metrics::counter!(metrics::REDIS_RECONNECTS).increment(1);
            // Whatever was published while this replica was not subscribed is in the
            // history (if there is one): read it back now rather than at the next event.
            self.sink.clone().reconnected();
        }
        retry.succeeded();
        tracing::info!(
            channels = self.subscribed.len(),
            "redis subscriber connected"
        );
        for w in waiting {
            let _ = w.send(());
        }

        let mut tick = tokio::time::interval(self.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut probe: Option<Probe> = None;
        let mut checks: FuturesUnordered<BoxFuture<'static, Check>> = FuturesUnordered::new();
        let mut warn = RateLimit::new(WARN_EVERY);
        loop {
            tokio::select! {
                _ = self.shutdown.wait() => break SessionEnd::Shutdown,
                _ = &mut reader.0 => break SessionEnd::Lost("connection closed".into()),
                _ = crate::tasks::fault("redis-subscriber") => panic!("fault injected"),
                req = requests.recv() => {
                    let Some(first) = req else { break SessionEnd::Shutdown };
                    let mut batch = vec![first];
                    while batch.len() < CHUNK {
                        match requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = self.apply(sink, batch).await {
                        break SessionEnd::Lost(e);
                    }
                }
                _ = tick.tick() => {
                    self.gaps.settle();
                    match probe.take() {
                        Some(p) if p.published => {
                            probe::failed("lost");
                            break SessionEnd::Lost(format!(
                                "probe {} did not come back within {:?}; the subscription is dead even if its connection looks open",
                                p.n, self.probe_interval
                            ));
                        }
                        Some(p) => {
                            // Redis has not taken it yet: that says nothing of the
                            // subscription (the PING below does).
                            probe::failed("publish");
                            if let Some(suppressed) = warn.check() {
                                tracing::warn!(suppressed_since_last = suppressed, "bus probe {} not taken by Redis within {:?}", p.n, self.probe_interval);
                            }
                        }
                        None => {}
                    }
                    let mut ping_sink = sink.clone();
                    checks.push(Box::pin(async move {
                        // In subscribe mode Redis answers PING with ["pong", ""].
                        Check::Ping(with_timeout(ping_sink.ping::<redis::Value>()).await.map(drop))
                    }));
                    let next = Probe::next();
                    let n = next.n;
                    probe = Some(next);
                    checks.push(send_probe(self.master.clone(), self.probe_channel.clone(), n));
                }
                Some(check) = checks.next(), if !checks.is_empty() => {
                    let (n, result) = match check {
                        Check::Ping(Ok(())) => continue,
                        Check::Ping(Err(e)) => break SessionEnd::Lost(format!("ping failed: {e}")),
                        Check::Sent(n, result) => (n, result),
                    };
                    let Some(p) = probe.as_mut().filter(|p| p.n == n) else { continue };
                    match result {
                        Ok(0) => {
                            probe::failed("not_subscribed");
                            break SessionEnd::Lost(format!(
                                "Redis says probe {n} reached no subscriber; the subscription is gone"
                            ));
                        }
                        Ok(_) => p.published = true,
                        Err(why) => {
                            probe::failed("publish");
                            probe = None;
                            if let Some(suppressed) = warn.check() {
                                tracing::warn!(suppressed_since_last = suppressed, "bus probe {n} could not be sent: {why}");
                            }
                        }
                    }
                }
                Some(n) = probes.recv() => {
                    if let Some(p) = probe.take_if(|p| p.n == n) {
                        p.back();
                    }
                }
            }
        }
    }

    /// Brings the subscription of every org in `batch` in line with presence, in at most
    /// one SUBSCRIBE and one UNSUBSCRIBE, then answers the batch's waiters.
    async fn apply(&mut self, sink: &mut PubSubSink, batch: Vec<Request>) -> Result<(), String> {
        let orgs: HashSet<&OrgId> = batch.iter().map(|r| &r.org).collect();
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        for org in orgs {
            let wanted = self.presence.org_sockets(org) > 0;
            let have = self.subscribed.contains(org);
            if wanted && !have {
                subscribe.push(org.clone());
            } else if !wanted && have {
                unsubscribe.push(org.clone());
            }
        }
        if !subscribe.is_empty() {
            let chans: Vec<String> = subscribe.iter().map(|o| channel(&self.prefix, o)).collect();
            with_timeout(sink.subscribe(chans)).await?;
            self.subscribed.extend(subscribe);
        }
        if !unsubscribe.is_empty() {
            let chans: Vec<String> = unsubscribe
                .iter()
                .map(|o| channel(&self.prefix, o))
                .collect();
            with_timeout(sink.unsubscribe(chans)).await?;
            for org in &unsubscribe {
                self.subscribed.remove(org);
            }
        }
        ::metrics::gauge!(metrics::REDIS_SUBSCRIPTIONS).set(self.subscribed.len() as f64);
        for req in batch {
            if let Some(tx) = req.applied {
                let _ = tx.send(());
            }
        }
        Ok(())
    }
}

/// PUBLISHes probe `n`; answers how many subscribers Redis says received it.
fn send_probe(master: Arc<Master>, channel: String, n: u64) -> BoxFuture<'static, Check> {
    Box::pin(async move {
        let result = match master.pool() {
            Err(e) => Err(e.to_string()),
            Ok(pool) => match pool.get().await {
                Ok(mut conn) => with_timeout(conn.publish::<_, _, i64>(channel, n)).await,
                Err(e) => Err(e.to_string()),
            },
        };
        Check::Sent(n, result)
    })
}

async fn with_timeout<T>(fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
    }
}

/// Delivers what arrives on the subscriptions. Runs until the connection closes.
async fn read_loop(
    mut stream: PubSubStream,
    mut inbound: Inbound,
    (probe_channel, probes): (String, mpsc::UnboundedSender<u64>),
) {
    while let Some(msg) = stream.next().await {
        let name = msg.get_channel_name();
        if name == probe_channel {
            if let Ok(n) = msg.get_payload::<u64>() {
                let _ = probes.send(n);
            }
            continue;
        }
        inbound.receive(name, msg.get_payload_bytes()).await;
    }
}
