//! Event decoding hot path: what every ingested event costs before grouping.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mesher::ingest::event::{parse_event, write_json, Document, Fields, EVENT_DEPTH_MAX};
use mesher::ingest::fingerprint::fingerprint;
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
    let fields = Fields::of(document.root());
    group.bench_function("fingerprint_10_frames", |b| {
        b.iter(|| fingerprint(black_box(&fields)))
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

criterion_group!(benches, event_benches);
criterion_main!(benches);
