//! Stream ordering and backpressure edges of PROTOCOL.md section 6: the first message is the
//! issue count whatever arrives during the upgrade, a slow but steady reader is never cut off as
//! stalled, and an oversized /ingest message is counted as rejected.

mod common;

use std::collections::HashSet;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

const MIB: usize = 1024 * 1024;

fn stream_path(project: &Project) -> String {
    format!(
        "/stream/projects/{}?key={}",
        project.id, project.dashboard_key
    )
}

fn post_event(agent: &ureq::Agent, server: &Server, key: &str, event: &Value) -> u16 {
    let body = event.to_string();
    let auth = format!("Bearer {key}");
    http_exchange(
        agent,
        "POST",
        &server.url("/api/v1/events"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Some(body.as_bytes()),
    )
    .status
}

// ---- 1. The first message is the issue count ----

/// Subscribers connecting while events pour in.
const BURST_SUBSCRIBERS: usize = 40;
/// Burst events per new issue, so issues (and counts) keep changing without flooding clients
/// with issue messages, which are never dropped.
const EVENTS_PER_ISSUE: u64 = 50;

/// Everything one subscriber received, in order; a pong is logged as `{"type":"<pong>"}`. Reads
/// until the sentinel event and the message after it.
fn burst_subscriber(server: &Server, path: &str, ready: &AtomicUsize) -> Vec<Value> {
    let mut ws = server.ws(path).expect("stream upgrade");
    // Right after the upgrade, before the server can have sent anything.
    let subscribe = json!({"type": "subscribe", "filters": {"level": "error"}});
    ws.send(Message::text(subscribe.to_string())).unwrap();
    ws.send(Message::Ping(b"order".to_vec().into())).unwrap();
    ready.fetch_add(1, Ordering::SeqCst);
    let mut log = Vec::new();
    let mut sentinel_seen = false;
    loop {
        let message = match ws.read() {
            Ok(message) => message,
            Err(error) => panic!("subscriber read failed ({error}) after {log:?}"),
        };
        let value = match message {
            Message::Text(text) => serde_json::from_str::<Value>(&text).expect("JSON message"),
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"order");
                json!({"type": "<pong>"})
            }
            Message::Ping(_) => continue,
            other => panic!("unexpected message {other:?} after {log:?}"),
        };
        let is_sentinel = value["type"] == "event" && value["data"]["message"] == "sentinel";
        log.push(value);
        if sentinel_seen {
            return log;
        }
        sentinel_seen = is_sentinel;
    }
}

/// Section 6's per-client order rules on one subscriber's log (no issue is resolved meanwhile,
/// and every new issue's first event passes the filters, so every count a client gets is the
/// count it was welcomed with plus the `created` messages it got before it).
fn check_order(log: &[Value], final_count: u64, who: &str) {
    let first = &log[0];
    assert_eq!(
        first["type"],
        "issue_count",
        "{who}: first message {first}, then {:?}",
        &log[1..log.len().min(6)]
    );
    let welcome = first["count"].as_u64().expect("count");
    let mut created = 0;
    let mut filtered = false;
    let mut pongs = 0;
    let mut event_issues = HashSet::new();
    for message in &log[1..] {
        match message["type"].as_str().unwrap() {
            "filters_updated" => {
                assert!(!filtered, "{who}: a second filters_updated");
                assert_eq!(message["filters"], json!({"level": "error"}), "{who}");
                filtered = true;
            }
            "<pong>" => pongs += 1,
            "issue" => {
                assert_eq!(message["action"], "created", "{who}: {message}");
                let issue_id = message["issue_id"].as_str().unwrap();
                assert!(
                    !event_issues.contains(issue_id),
                    "{who}: issue {issue_id} created after one of its events"
                );
                if filtered {
                    assert_eq!(message["issue"]["level"], "error", "{who}: {message}");
                }
                created += 1;
            }
            "event" => {
                if filtered {
                    assert_eq!(message["data"]["level"], "error", "{who}: {message}");
                }
                event_issues.insert(message["issue_id"].as_str().unwrap().to_owned());
            }
            "issue_count" => assert_eq!(
                message["count"].as_u64(),
                Some(welcome + created),
                "{who}: a count out of order (welcomed with {welcome}, {created} created before)"
            ),
            "dropped" => {}
            _ => panic!("{who}: unexpected {message}"),
        }
    }
    assert!(filtered, "{who}: no filters_updated");
    assert_eq!(pongs, 1, "{who}: pongs");
    let last = log.last().unwrap();
    assert_eq!(
        (&last["type"], last["count"].as_u64()),
        (&json!("issue_count"), Some(final_count)),
        "{who}: the count after the last event is current"
    );
}

#[test]
fn first_message_is_issue_count_whatever_arrives_during_the_upgrade() {
    let server = Server::start();
    let project = server.project("Order Shop");
    let agent = http_agent();
    let noise = json!({"message": "noise", "level": "info", "environment": "production"});
    assert_eq!(
        post_event(&agent, &server, &project.ingest_key, &noise),
        202
    );
    let path = stream_path(&project);

    let stop = AtomicBool::new(false);
    let ready = AtomicUsize::new(0);
    let logs = std::thread::scope(|scope| {
        let publisher = scope.spawn(|| {
            let agent = http_agent();
            let mut issues = HashSet::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let event = if seq.is_multiple_of(3) {
                    noise.clone()
                } else {
                    let message = format!("burst {}", seq / EVENTS_PER_ISSUE);
                    json!({"message": message, "level": "error", "environment": "production", "seq": seq})
                };
                let status = post_event(&agent, &server, &project.ingest_key, &event);
                assert_eq!(status, 202, "{event}");
                issues.insert(event["message"].as_str().unwrap().to_owned());
            }
            (seq, issues.len() as u64)
        });
        let subscribers: Vec<_> = (0..BURST_SUBSCRIBERS)
            .map(|_| scope.spawn(|| burst_subscriber(&server, &path, &ready)))
            .collect();
        assert!(
            wait_until(Duration::from_secs(30), || ready.load(Ordering::SeqCst)
                == BURST_SUBSCRIBERS),
            "subscribers did not connect"
        );
        // Let the last welcomes and their events reach the clients.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        let (events, issues) = publisher.join().unwrap();
        eprintln!("{events} events over {issues} issues during the upgrades");
        let sentinel =
            json!({"message": "sentinel", "level": "error", "environment": "production"});
        assert_eq!(
            post_event(&agent, &server, &project.ingest_key, &sentinel),
            202
        );
        let logs: Vec<Vec<Value>> = subscribers.into_iter().map(|s| s.join().unwrap()).collect();
        (logs, issues + 1)
    });
    let (logs, final_count) = logs;
    for (index, log) in logs.iter().enumerate() {
        check_order(log, final_count, &format!("subscriber {index}"));
    }
}

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
