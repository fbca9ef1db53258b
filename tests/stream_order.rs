//! Stream ordering and backpressure edges of PROTOCOL.md section 6: the first message is the
//! issue count whatever arrives during the upgrade, a slow but steady reader is never cut off as
//! stalled, and an oversized /ingest message is counted as rejected.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1024 * 1024;

// ---- 3. Oversized /ingest messages are counted ----

const FIN: u8 = 0x80;
const OP_TEXT: u8 = 0x1;
const OP_CONTINUATION: u8 = 0x0;
const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A masked client frame header announcing `len` payload bytes.
fn masked_head(first: u8, len: usize) -> Vec<u8> {
    let mut head = vec![first];
    if len < 126 {
        head.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        head.push(0x80 | 126);
        head.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        head.push(0x80 | 127);
        head.extend_from_slice(&(len as u64).to_be_bytes());
    }
    head.extend_from_slice(&MASK);
    head
}

fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = masked_head(first, payload.len());
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    bytes
}

/// Reads to the close frame and returns its code.
fn close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let (first, payload) = read_frame(stream).expect("a close frame");
        if first & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[test]
fn oversized_ingest_message_is_counted_as_too_large() {
    let server = Server::start();
    let project = server.project("Big Frames");
    let path = format!("/ingest?key={}", project.ingest_key);
    let mut metrics = MetricsConn::open(&server);
    let name = "mesher_events_rejected_total{reason=\"too_large\"}";
    assert_eq!(metrics.value(name), 0.0);

    // Announced over the limit in one frame header.
    let mut socket = server.raw_ws(&path);
    send_raw(&mut socket, &masked_head(FIN | OP_TEXT, MIB + 1));
    assert_eq!(close_code(&mut socket), 1009);
    assert!(
        wait_until(Duration::from_secs(5), || metrics.value(name) == 1.0),
        "one oversized message, one rejection"
    );

    // Over the limit only once fragments add up.
    let mut socket = server.raw_ws(&path);
    let first = [br#"{"message":""#.as_slice(), &vec![b'a'; 600 * 1024]].concat();
    send_raw(&mut socket, &masked_frame(OP_TEXT, &first));
    send_raw(&mut socket, &masked_head(FIN | OP_CONTINUATION, 600 * 1024));
    assert_eq!(close_code(&mut socket), 1009);
    assert!(
        wait_until(Duration::from_secs(5), || metrics.value(name) == 2.0),
        "two oversized messages, two rejections"
    );

    // A message within the limit is not counted.
    let mut socket = server.raw_ws(&path);
    send_raw(
        &mut socket,
        &masked_frame(FIN | OP_TEXT, br#"{"message":"small"}"#),
    );
    let (_, reply) = read_frame(&mut socket).expect("a reply");
    assert_eq!(
        serde_json::from_slice::<Value>(&reply).unwrap()["status"],
        "accepted"
    );
    assert_eq!(metrics.value(name), 2.0);
}
