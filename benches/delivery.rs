//! Local room dispatch: one bus message to the 1,000 or 10,000 sockets an organization has
//! on this replica, through `Delivery::deliver`.
//!
//! This is the per-socket cost of fan-out, and so what bounds deliveries per second per
//! core: the presence lookup, socketioxide's single encoding of the packet, then for every
//! socket of the room a lookup and a push of a reference-counted copy onto its bounded send
//! queue. A room of one socket shows the fixed cost per message (presence, room name,
//! encoding, metrics) apart from the per-socket one. The sockets are real socketioxide
//! sockets without a network (its test harness), so each push is the same queue push, with
//! the same wake of the socket's writer task, as in production; writing to the network is
//! not included. The Prometheus recorder is installed, as in production.
//!
//! Method: a single-threaded runtime, so that nothing drains the queues while a delivery is
//! timed. Two cases per room size and payload:
//! - `idle`: the queues are drained after every message, so every push finds an empty
//!   queue and wakes that socket's writer: a dashboard fleet receiving a message now and
//!   then.
//! - `burst`: 32 messages are delivered back to back before the queues are drained, so most
//!   pushes find the writer already woken: a burst of updates.
//!
//! Draining is not timed. Times are per message; the throughput is in deliveries (one per
//! socket per message). At the end, every socket must have received every message, and the
//! dropped-message counter must be zero.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engineioxide_core::Packet;
use fanout::delivery::Delivery;
use fanout::presence::Presence;
use fanout::protocol::{Message, OrgId, UserId};
use fanout::transport::Transports;
use metrics_exporter_prometheus::PrometheusHandle;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

mod common;
use common::envelopes;

const ORG: &str = "org_01HZX4VZ3C5D7F9G1H3J5K7M9N";
/// The default `FANOUT_SOCKET_BUFFER`.
const SOCKET_BUFFER: usize = 1024;
/// Messages delivered between two drains in the `burst` case.
const BURST: u64 = 32;
/// How long draining may wait for a message before the bench fails as having lost it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `n` connected sockets in the organization's room, and the receiving end of their queues.
struct Room {
    n: usize,
    delivery: Delivery,
    receivers: Vec<mpsc::Receiver<Packet>>,
    /// Dropping these would end the harness tasks that feed the sockets' input.
    _inputs: Vec<mpsc::Sender<Packet>>,
    _io: SocketIo,
}

impl Room {
    async fn connect(n: usize) -> Self {
        let (_svc, io) = SocketIo::builder()
            .max_buffer_size(SOCKET_BUFFER)
            .build_svc();
        let org = OrgId::parse(ORG).unwrap();
        let room = org.room();
        io.ns("/", move |socket: SocketRef| {
            let room = room.clone();
            async move { socket.join(room) }
        });
        // Each harness connection waits 10 ms for its handler: connect them all at once.
        let sockets =
            futures_util::future::join_all((0..n).map(|_| io.new_dummy_sock("/", ()))).await;
        let (inputs, mut receivers): (Vec<_>, Vec<_>) = sockets.into_iter().unzip();
        for rx in &mut receivers {
            match rx.recv().await {
                Some(Packet::Message(m)) if m.starts_with('0') => {}
                other => panic!("expected the CONNECT packet, got {other:?}"),
            }
        }
        assert_eq!(io.to(org.room()).sockets().len(), n, "sockets in the room");

        // The gateway counts each authenticated socket in presence; delivery relies on it.
        let presence = Arc::new(Presence::new());
        for i in 0..n {
            presence.add(&org, &UserId::parse(&format!("usr_{i}")).unwrap());
        }
        let delivery = Delivery::new(io.clone(), presence, Transports::new(usize::MAX));
        Self {
            n,
            delivery,
            receivers,
            _inputs: inputs,
            _io: io,
        }
    }

    /// Delivers `msg` `count` times, timing only that, then drains every queue.
    fn deliver_timed(&mut self, rt: &Runtime, msg: &Message, count: u64) -> Duration {
        let elapsed = rt.block_on(async {
            let start = Instant::now();
            for _ in 0..count {
                self.delivery.deliver_now(msg).await;
            }
            start.elapsed()
        });
        rt.block_on(self.drain(count, None));
        elapsed
    }

    /// Receives exactly `count` messages on every socket (failing if one is missing), and
    /// checks their text when `expected` is given.
    async fn drain(&mut self, count: u64, expected: Option<&str>) {
        let all = async {
            for rx in &mut self.receivers {
                for _ in 0..count {
                    match rx.recv().await {
                        Some(Packet::Message(m)) => {
                            if let Some(expected) = expected {
                                assert_eq!(m.as_str(), expected);
                            }
                        }
                        other => panic!("expected an event, got {other:?}"),
                    }
                }
            }
        };
        tokio::time::timeout(DRAIN_TIMEOUT, all)
            .await
            .expect("a socket did not receive every message: dropped or not delivered");
    }

    /// Checks that no socket holds a message beyond those drained.
    fn assert_empty(&mut self) {
        for rx in &mut self.receivers {
            assert!(rx.try_recv().is_err(), "a socket received an extra message");
        }
    }
}

fn deliver(c: &mut Criterion) {
    let metrics = fanout::ops::metrics::install().expect("metrics recorder");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let messages = envelopes().map(|(name, env)| {
        let msg = Message::from_envelope(OrgId::parse(ORG).unwrap(), &env, 65536).unwrap();
        (name, msg)
    });
    // Deliveries made (one per socket per message), to check against the counters.
    let delivered = Cell::new(0u64);

    let mut group = c.benchmark_group("deliver");
    for n in [1, 1_000, 10_000] {
        let mut room = rt.block_on(Room::connect(n));
        group.throughput(Throughput::Elements(n as u64));
        // A 10,000-socket delivery takes milliseconds, and draining after it much longer.
        let (samples, secs) = if n >= 10_000 { (10, 3) } else { (20, 2) };
        group.sample_size(samples);
        group.measurement_time(Duration::from_secs(secs));
        for (name, msg) in &messages {
            // Once: every socket receives the packet socketioxide encodes for this message.
            rt.block_on(room.delivery.deliver_now(msg));
            // The Socket.IO EVENT packet; the transport adds the Engine.IO message type `4`.
            let expected = format!(r#"2["{}",{}]"#, msg.event, msg.data.get());
            rt.block_on(room.drain(1, Some(&expected)));
            delivered.set(delivered.get() + n as u64);

            for (case, chunk) in [("idle", 1), ("burst", BURST)] {
                let id = BenchmarkId::new(format!("{case}/{name}"), n);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut timed = Duration::ZERO;
                        let mut left = iters;
                        while left > 0 {
                            let count = left.min(chunk);
                            timed += room.deliver_timed(&rt, msg, count);
                            left -= count;
                        }
                        delivered.set(delivered.get() + iters * room.n as u64);
                        timed
                    })
                });
            }
        }
        room.assert_empty();
    }
    group.finish();
    assert_counters(&metrics, delivered.get());
}

/// Every delivery was counted as delivered, none as dropped.
fn assert_counters(metrics: &PrometheusHandle, expected: u64) {
    let text = metrics.render();
    let value = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(|l| {
                let v = l.rsplit(' ').next().unwrap();
                v.parse::<f64>().unwrap() as u64
            })
            .sum()
    };
    assert_eq!(value(fanout::ops::metrics::DROPPED), 0, "dropped messages");
    assert_eq!(
        value(fanout::ops::metrics::DELIVERED),
        expected,
        "delivered messages"
    );
    println!("checked: {expected} deliveries, all received, none dropped");
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500));
    targets = deliver
}
criterion_main!(benches);
