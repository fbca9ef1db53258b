//! Event decoding hot path: what every ingested event costs before grouping.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mesher::ingest::document::{write_json, Document, EVENT_DEPTH_MAX};
use mesher::ingest::event::{Level, Raw};
use mesher::ingest::fingerprint;
use mesher::ingest::native::{parse_event, read, Fields};
use mesher::ingest::sentry::{
    decode_body, decode_event_item, parse_envelope, ContentEncoding, ENVELOPE_BYTES_MAX,
};
use mesher::ingest::{decode_bulk, decode_event};

/// About 1 KiB, shaped like a browser SDK's error report with a 10-frame stack trace.
const EVENT_JSON: &str = r#"{"message":"TypeError: Cannot read properties of undefined (reading 'id') at 0x7f3a","level":"error","exception":{"type_name":"TypeError","value":"Cannot read properties of undefined (reading 'id')","module_name":"checkout"},"stacktrace":[{"filename":"app/checkout.js","function_name":"submitOrder","lineno":120,"colno":17,"in_app":true},{"filename":"app/checkout.js","function_name":"onClick","lineno":88,"colno":5,"in_app":true},{"filename":"app/cart.js","function_name":"total","lineno":41,"colno":9,"in_app":true},{"filename":"lib/react-dom.js","function_name":"invokeGuardedCallback","lineno":4070,"colno":14},{"filename":"lib/react-dom.js","function_name":"dispatchEvent","lineno":4102,"colno":3},{"filename":"lib/react-dom.js","function_name":"batchedUpdates","lineno":3971,"colno":12},{"filename":"lib/scheduler.js","function_name":"flushWork","lineno":212,"colno":8},{"filename":"lib/scheduler.js","function_name":"workLoop","lineno":190,"colno":22},{"filename":"lib/scheduler.js","function_name":"performWork","lineno":155,"colno":1},{"filename":"<anonymous>","function_name":"","lineno":1,"colno":1}],"tags":{"environment":"production","release":"shop@2.4.1","browser":"Firefox 128"},"extra":{"cart_items":3,"total":129.9},"user_context":{"id":"u_1842"},"sdk_name":"mesher.javascript","sdk_version":"1.8.0","timestamp":"2024-05-06T07:08:09.123456+02:00"}"#;

fn event_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("event");
    group.throughput(Throughput::Bytes(EVENT_JSON.len() as u64));

    // The parser rewrites its input, so every iteration gets a fresh copy (not timed).
    group.bench_function("parse_event_1k_10_frames", |b| {
        b.iter_batched_ref(
            || EVENT_JSON.as_bytes().to_vec(),
            |body| {
                let event = parse_event(black_box(body)).expect("bench event is valid");
                black_box(&event);
            },
            BatchSize::SmallInput,
        )
    });

    // What a request body costs from its bytes to a checked event, copy for the parser included.
    group.bench_function("decode_event_1k", |b| {
        b.iter_batched(
            || EVENT_JSON.as_bytes().to_vec(),
            |body| black_box(decode_event(black_box(body)).expect("bench event is valid")),
            BatchSize::SmallInput,
        )
    });

    let mut body = EVENT_JSON.as_bytes().to_vec();
    let document = Document::parse(&mut body, EVENT_DEPTH_MAX).expect("bench event is JSON");
    let root = document.root();
    let event = read(&Fields::of(root), Level::Error, None, Raw::Parsed(root));
    group.bench_function("fingerprint_10_frames", |b| {
        b.iter(|| fingerprint::key(black_box(&event)))
    });

    let mut out = Vec::with_capacity(2 * EVENT_JSON.len());
    group.bench_function("write_json_1k", |b| {
        b.iter(|| {
            out.clear();
            write_json(black_box(document.root()), &mut out);
            black_box(out.len())
        })
    });
    group.finish();

    let mut group = c.benchmark_group("bulk");
    group.throughput(Throughput::Elements(100));
    let bulk = format!("[{}]", vec![EVENT_JSON; 100].join(","));
    group.bench_function("decode_bulk_100", |b| {
        b.iter_batched(
            || bulk.as_bytes().to_vec(),
            |body| black_box(decode_bulk(black_box(body)).expect("bench bulk is valid")),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A Flask `KeyError` as sentry-python 2.x reports it: 6 frames with context and vars, request,
/// breadcrumbs, modules.
const SENTRY_PYTHON_EVENT: &str = include_str!("../tests/fixtures/sentry/python_exception.json");

/// The Python event compacted (as SDKs send it, about 4 KiB) in an envelope with a client
/// report, gzip'd as sentry-python sends envelopes.
fn sentry_python_envelope() -> (Vec<u8>, usize) {
    let event: serde_json::Value =
        serde_json::from_str(SENTRY_PYTHON_EVENT).expect("fixture is JSON");
    let event = serde_json::to_string(&event).expect("JSON writes");
    let envelope = format!(
        "{{\"event_id\":\"0f3e5ac3e8bb4c1e9c4bd61e3aa8c2a1\",\"sent_at\":\"2024-05-06T13:08:09.200000Z\",\"trace\":{{\"trace_id\":\"771a43a4192642f0b136d5159a501700\",\"environment\":\"production\",\"release\":\"shop@2.4.1\",\"public_key\":\"0a1b2c3d4e5f\"}}}}\n\
         {{\"type\":\"event\",\"content_type\":\"application/json\",\"length\":{}}}\n{event}\n\
         {{\"type\":\"client_report\"}}\n{{\"timestamp\":1715000889.2,\"discarded_events\":[]}}\n",
        event.len()
    );
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut encoder, envelope.as_bytes()).expect("gzip into memory");
    (encoder.finish().expect("gzip into memory"), envelope.len())
}

fn sentry_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("sentry");
    let (gzipped, envelope_len) = sentry_python_envelope();
    group.throughput(Throughput::Bytes(envelope_len as u64));

    // What an envelope request costs from its compressed body to events ready for the owner.
    group.bench_function("envelope_4k_python_gzip", |b| {
        b.iter_batched(
            || gzipped.clone(),
            |body| {
                let body = decode_body(ContentEncoding::Gzip, black_box(body), ENVELOPE_BYTES_MAX)
                    .expect("bench body is gzip");
                let envelope = parse_envelope(&body).expect("bench envelope is valid");
                for item in envelope.events() {
                    let event = decode_event_item(item.payload).expect("bench event is valid");
                    black_box(&event);
                }
            },
            BatchSize::SmallInput,
        )
    });

    let body = decode_body(ContentEncoding::Gzip, gzipped.clone(), ENVELOPE_BYTES_MAX).unwrap();
    let envelope = parse_envelope(&body).unwrap();
    let payload = envelope.events().next().unwrap().payload;
    group.bench_function("event_4k_python", |b| {
        b.iter(|| black_box(decode_event_item(black_box(payload)).expect("bench event is valid")))
    });
    group.bench_function("gunzip_4k", |b| {
        b.iter_batched(
            || gzipped.clone(),
            |body| decode_body(ContentEncoding::Gzip, black_box(body), ENVELOPE_BYTES_MAX),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, event_benches, sentry_benches);
criterion_main!(benches);
