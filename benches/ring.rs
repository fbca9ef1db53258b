//! Per-connection ring buffer: the fan-out hot path pushes one shared frame into every
//! subscriber's ring, and the writer drains it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesher::conn::ring::{Kind, Push, Ring};
use std::hint::black_box;
use std::sync::Arc;

/// The server's default `--stream-buffer`.
const STREAM_BUFFER: usize = 100;

fn frame() -> Arc<[u8]> {
    Arc::from(vec![0x81u8; 256])
}

fn push_pop(c: &mut Criterion) {
    let frame = frame();
    let mut group = c.benchmark_group("ring");

    group.throughput(Throughput::Elements(1));
    group.bench_function("push_pop_one", |b| {
        let mut ring = Ring::new(STREAM_BUFFER);
        b.iter(|| {
            ring.push(frame.clone(), Kind::Event, 1);
            black_box(ring.pop())
        });
    });

    group.throughput(Throughput::Elements(STREAM_BUFFER as u64));
    group.bench_function("fill_then_drain", |b| {
        let mut ring = Ring::new(STREAM_BUFFER);
        let mut out = Vec::with_capacity(STREAM_BUFFER);
        b.iter(|| {
            for _ in 0..STREAM_BUFFER {
                ring.push(frame.clone(), Kind::Event, 1);
            }
            ring.drain_into(&mut out, STREAM_BUFFER);
            black_box(&out);
            out.clear();
        });
    });
    group.finish();
}

/// A ring with `controls` replies, then `events` events, waiting.
fn filled(frame: &Arc<[u8]>, controls: usize, events: usize) -> Ring<Arc<[u8]>> {
    let mut ring = Ring::new(STREAM_BUFFER);
    for _ in 0..controls {
        ring.push(frame.clone(), Kind::Control, 0);
    }
    for _ in 0..events {
        ring.push(frame.clone(), Kind::Event, 1);
    }
    ring
}

fn push_full(c: &mut Criterion) {
    let frame = frame();
    let mut group = c.benchmark_group("ring_full");
    group.throughput(Throughput::Elements(1));

    // The oldest event first in the ring, then (the worst realistic case) behind half a ring of
    // replies, which wait ahead of the events and are never dropped.
    for (name, controls) in [
        ("drop_oldest_event_at_head", 0),
        ("drop_oldest_event_behind_control", STREAM_BUFFER / 2),
    ] {
        group.bench_function(name, |b| {
            let mut ring = filled(&frame, controls, STREAM_BUFFER);
            b.iter(|| {
                let outcome = ring.push(frame.clone(), Kind::Event, 1);
                debug_assert_eq!(outcome, Push::DroppedOldest);
                black_box(outcome)
            });
        });
    }

    group.bench_function("replace_count", |b| {
        let mut ring = filled(&frame, 0, STREAM_BUFFER - 1);
        b.iter(|| black_box(ring.push(frame.clone(), Kind::Count, 1)));
    });

    // A client that is behind with thousands of issues waiting: each new state of one of them
    // replaces the waiting one.
    group.bench_function("replace_issue_among_5000", |b| {
        let mut ring = Ring::new(STREAM_BUFFER);
        for issue in 0..5_000u128 {
            ring.push(frame.clone(), Kind::Issue(issue), 1);
        }
        let mut issue = 0u128;
        b.iter(|| {
            issue = (issue + 1) % 5_000;
            black_box(ring.push(frame.clone(), Kind::Issue(issue), 1))
        });
    });
    group.finish();
}

criterion_group!(benches, push_pop, push_full);
criterion_main!(benches);
