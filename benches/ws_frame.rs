//! WebSocket frames: encoding a server text frame and decoding a masked client frame.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesher::ws::codec::{encode_text, Decoder, Message, MESSAGE_BYTES_MAX};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

const PAYLOAD_BYTES: usize = 512;

/// A JSON stream message padded to PAYLOAD_BYTES.
fn payload() -> Vec<u8> {
    let mut json =
        br#"{"type":"event","event_id":"0190a5b2-7c1e-7d3a-9f00-000000000001","data":{"message":""#
            .to_vec();
    let tail = br#""}}"#;
    json.resize(PAYLOAD_BYTES - tail.len(), b'x');
    json.extend_from_slice(tail);
    json
}

fn masked_client_frame(payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        mask: Some([0x37, 0xfa, 0x21, 0x3d]),
        ..FrameHeader::default()
    };
    let mut frame = Vec::new();
    Frame::from_payload(header, tungstenite::Bytes::copy_from_slice(payload))
        .format(&mut frame)
        .unwrap();
    frame
}

fn bench_ws_frame(c: &mut Criterion) {
    let payload = payload();
    let mut group = c.benchmark_group("ws_frame");
    group.throughput(Throughput::Bytes(PAYLOAD_BYTES as u64));
    group.bench_function(format!("encode_text_{PAYLOAD_BYTES}b"), |b| {
        b.iter(|| encode_text(black_box(&payload)))
    });

    let frame = masked_client_frame(&payload);
    // One decoder, as on a connection: it is back in its initial state after each message.
    let mut decoder = Decoder::new(MESSAGE_BYTES_MAX);
    group.bench_function(format!("decode_masked_text_{PAYLOAD_BYTES}b"), |b| {
        b.iter(|| {
            let (message, used) = decoder.decode(black_box(&frame)).unwrap().unwrap();
            debug_assert!(matches!(message, Message::Text(_)) && used == frame.len());
            message
        })
    });
    group.finish();
}

criterion_group!(benches, bench_ws_frame);
criterion_main!(benches);
