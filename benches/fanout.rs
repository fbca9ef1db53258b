//! Fan-out of one published message to N local subscribers: filter check and ring push of a
//! shared frame per subscriber (the per-delivery work a shard does before any socket write).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mesher::conn::ring::Ring;
use mesher::ingest::event::Level;
use mesher::stream::{deliver_to, event_message, Attributes, Filters};
use uuid::Uuid;

fn fanout(c: &mut Criterion) {
    let payload = format!(
        r#"{{"message":"bench","level":"error","pad":"{}"}}"#,
        "x".repeat(440)
    );
    let attributes = Attributes {
        level: Level::Error,
        environment: Some(Arc::from("production")),
    };
    let message = event_message(
        1,
        Uuid::now_v7(),
        Uuid::now_v7(),
        payload.as_bytes(),
        attributes,
    );
    let items = [message];
    let error_only = Filters::parse(Some(&serde_json::json!({"level": "error"}))).unwrap();
    let info_only = Filters::parse(Some(&serde_json::json!({"level": "info"}))).unwrap();
    let mut group = c.benchmark_group("fanout");
    for subscribers in [10usize, 100, 1000] {
        // Half the subscribers filter the message out, as in the `filters` scenario.
        let mut rings: Vec<(Ring<Bytes>, Filters)> = (0..subscribers)
            .map(|n| {
                (
                    Ring::new(100),
                    if n % 2 == 0 {
                        Filters::default()
                    } else {
                        error_only.clone()
                    },
                )
            })
            .collect();
        rings[0].1 = info_only.clone();
        let mut out = Vec::with_capacity(128);
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    for (ring, filters) in rings.iter_mut() {
                        deliver_to(ring, filters, &items);
                        // The writer takes what waits; keep rings from filling so the push path is measured.
                        if ring.len() >= 64 {
                            out.clear();
                            ring.drain_into(&mut out, 64);
                        }
                    }
                })
            },
        );
    }
    group.finish();

    // One filter check against environment lists of growing length, the message's environment
    // not among them (every name is looked at when the list is scanned).
    let mut group = c.benchmark_group("environment_filter");
    for values in [1usize, 8, 9, 100] {
        let names: Vec<String> = (0..values).map(|n| format!("env-{n}")).collect();
        let filters = Filters::parse(Some(&serde_json::json!({ "environment": names }))).unwrap();
        group.bench_with_input(BenchmarkId::from_parameter(values), &values, |b, _| {
            b.iter(|| filters.matches(std::hint::black_box(&items[0])))
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
