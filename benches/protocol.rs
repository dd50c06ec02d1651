//! Envelope decoding and Socket.IO encoding: the per-message work of a replica, paid once
//! per bus message however many sockets receive it.
//!
//! Every message a replica receives from Redis is decoded by `Message::from_envelope`
//! (validation of event and user id; `data` is kept as raw JSON and never re-parsed), then
//! socketioxide encodes the event packet once (`2["execution-updated",{...}]`, which goes on
//! the wire as the frame `42[...]`) and shares it between the sockets of the room. The
//! encoding is measured with the crates socketioxide uses for it
//! (`socketioxide-parser-common`, same versions), called as `BroadcastOperators::emit` does.
//! Two sizes of a realistic `execution-updated` envelope: a status change (~200 bytes) and
//! one carrying the state of every step (~4 KiB). Throughput is in envelope bytes. The
//! status change is also decoded with the `stamp` a replica's ingest adds (its numbering,
//! for `fanout_bus_missed_total`), to show what reading it costs.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fanout::protocol::{Message, OrgId};
use socketioxide_core::Value as SioValue;
use socketioxide_core::packet::Packet;
use socketioxide_core::parser::Parse;
use socketioxide_parser_common::CommonParser;

mod common;
use common::envelopes;

/// The default `FANOUT_MAX_PAYLOAD_BYTES`.
const LIMIT: usize = 64 * 1024;

/// What socketioxide does in `io.to(room).emit(event, &data)` before it touches a socket:
/// the payload array, then the packet text.
fn encode_event(msg: &Message) -> SioValue {
    let parser = CommonParser;
    let data = parser
        .encode_value(&*msg.data, Some(msg.event.as_str()))
        .expect("raw JSON always encodes");
    parser.encode(Packet::event("/", data))
}

/// The bus parses the organization from the channel name of every message, so the decode
/// measured here includes it.
fn org() -> OrgId {
    OrgId::parse("org_01HZX4VZ3C5D7F9G1H3J5K7M9N").unwrap()
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for (name, env) in envelopes() {
        let msg = Message::from_envelope(org(), &env, LIMIT).unwrap();
        // The Socket.IO EVENT packet; the transport prepends the Engine.IO message type `4`.
        let expected = format!(r#"2["execution-updated",{}]"#, msg.data.get());
        assert_eq!(encode_event(&msg).as_str().unwrap().as_str(), expected);

        group.throughput(Throughput::Bytes(env.len() as u64));
        group.bench_with_input(BenchmarkId::new("decode", name), &env, |b, env| {
            b.iter(|| Message::from_envelope(org(), black_box(env), LIMIT).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("encode", name), &msg, |b, msg| {
            b.iter(|| encode_event(black_box(msg)))
        });
        group.bench_with_input(BenchmarkId::new("decode_encode", name), &env, |b, env| {
            b.iter(|| {
                let msg = Message::from_envelope(org(), black_box(env), LIMIT).unwrap();
                encode_event(&msg)
            })
        });
    }
    let (_, status) = envelopes().into_iter().next().expect("the status change");
    let mut stamped: serde_json::Value = serde_json::from_slice(&status).unwrap();
    stamped["stamp"] = "00abcdef01234567:3:1234567".into();
    let stamped = serde_json::to_vec(&stamped).unwrap();
    assert!(
        Message::from_envelope(org(), &stamped, LIMIT)
            .unwrap()
            .stamp
            .is_some()
    );
    group.throughput(Throughput::Bytes(stamped.len() as u64));
    group.bench_with_input(
        BenchmarkId::new("decode", "status+stamp"),
        &stamped,
        |b, env| b.iter(|| Message::from_envelope(org(), black_box(env), LIMIT).unwrap()),
    );
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = envelope
}
criterion_main!(benches);
