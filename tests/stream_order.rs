//! Stream ordering and backpressure edges of PROTOCOL.md section 6: the first message is the
//! issue count whatever arrives during the upgrade, a slow but steady reader is never cut off as
//! stalled, and an oversized /ingest message is counted as rejected.

mod common;

use std::collections::HashSet;
use std::io::{self, BufReader, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
const EVENTS_PER_ISSUE: u64 = 10;

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
    // Offsets increase from the welcome's (the last offset produced before it) on.
    let mut last_offset = first["offset"].as_u64().expect("offset");
    for message in &log[1..] {
        if let Some(offset) = message["offset"].as_u64() {
            assert!(
                offset > last_offset,
                "{who}: offset {offset} after {last_offset}: {message}"
            );
            last_offset = offset;
        }
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

// ---- 2. A slow but steady reader stays ----

/// What the slow client reads at a time, and how often.
const SLOW_READ_BYTES: usize = 1024;
const SLOW_READ_EVERY: Duration = Duration::from_millis(100);
const SLOW_RUN: Duration = Duration::from_secs(20);
/// The slow client's receive buffer: small, so the backlog sits on the server's side.
const SLOW_RECV_BUFFER_BYTES: usize = 4096;

/// A socket read at most `SLOW_READ_BYTES` per `SLOW_READ_EVERY` until `throttled` is cleared.
struct Throttled {
    stream: TcpStream,
    throttled: bool,
    next_read: Instant,
}

impl Read for Throttled {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.throttled {
            return self.stream.read(buf);
        }
        let now = Instant::now();
        if self.next_read > now {
            std::thread::sleep(self.next_read - now);
        }
        self.next_read += SLOW_READ_EVERY;
        let take = buf.len().min(SLOW_READ_BYTES);
        self.stream.read(&mut buf[..take])
    }
}

/// A raw stream client (a plain socket, to control how fast it reads).
struct SlowClient {
    reader: BufReader<Throttled>,
}

impl SlowClient {
    fn open(server: &Server, path: &str) -> SlowClient {
        let stream = upgrade_with_receive_buffer(
            server,
            path,
            SLOW_RECV_BUFFER_BYTES,
            Duration::from_secs(30),
        );
        let throttled = Throttled {
            stream,
            throttled: true,
            next_read: Instant::now(),
        };
        SlowClient {
            reader: BufReader::with_capacity(SLOW_READ_BYTES, throttled),
        }
    }

    /// The next text message; Err when the server ended the connection.
    fn next_text(&mut self) -> Result<Value, String> {
        loop {
            let mut head = [0u8; 2];
            self.reader
                .read_exact(&mut head)
                .map_err(|e| format!("read: {e}"))?;
            let length = match head[1] & 0x7f {
                126 => {
                    let mut bytes = [0u8; 2];
                    self.reader
                        .read_exact(&mut bytes)
                        .map_err(|e| e.to_string())?;
                    u16::from_be_bytes(bytes) as usize
                }
                127 => {
                    let mut bytes = [0u8; 8];
                    self.reader
                        .read_exact(&mut bytes)
                        .map_err(|e| e.to_string())?;
                    u64::from_be_bytes(bytes) as usize
                }
                short => short as usize,
            };
            let mut payload = vec![0u8; length];
            self.reader
                .read_exact(&mut payload)
                .map_err(|e| format!("read: {e}"))?;
            match head[0] & 0x0f {
                0x1 => return Ok(serde_json::from_slice(&payload).expect("JSON message")),
                0x8 => return Err(format!("closed by the server: {payload:?}")),
                _ => continue,
            }
        }
    }
}

#[test]
fn slow_steady_reader_is_not_cut_off_as_stalled() {
    let server = Server::start_with(
        Backend::Sqlite,
        &["--stall-timeout", "3", "--ping-interval", "600"],
    );
    let project = server.project("Slow Reader");
    let agent = http_agent();
    let event = |seq: u64| json!({"message": "steady", "level": "error", "seq": seq, "padding": "p".repeat(600)});
    // The issue exists first, so the stream carries only events.
    assert_eq!(
        post_event(&agent, &server, &project.ingest_key, &event(0)),
        202
    );
    let mut client = SlowClient::open(&server, &stream_path(&project));
    let first = client.next_text().expect("first message");
    assert_eq!(first["type"], "issue_count", "{first}");

    let sent = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let (received, dropped, last_seq) = std::thread::scope(|scope| {
        scope.spawn(|| {
            let agent = http_agent();
            let started = Instant::now();
            let mut seq = 0;
            while started.elapsed() < SLOW_RUN {
                seq += 1;
                let status = post_event(&agent, &server, &project.ingest_key, &event(seq));
                assert_eq!(status, 202);
                sent.store(seq, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut received = 0u64;
        let mut dropped = 0u64;
        let mut last_seq = 0u64;
        loop {
            if done.load(Ordering::SeqCst) {
                // Everything is published: read the rest at full speed.
                client.reader.get_mut().throttled = false;
                if last_seq == sent.load(Ordering::SeqCst) {
                    break;
                }
            }
            let message = client.next_text().unwrap_or_else(|error| {
                panic!("a steady reader was cut off after {received} events: {error}")
            });
            match message["type"].as_str() {
                Some("event") => {
                    let seq = message["data"]["seq"].as_u64().unwrap();
                    assert!(seq > last_seq, "event {seq} after {last_seq}");
                    last_seq = seq;
                    received += 1;
                }
                Some("dropped") => dropped += message["count"].as_u64().unwrap(),
                _ => panic!("unexpected {message}"),
            }
        }
        (received, dropped, last_seq)
    });
    let sent = sent.load(Ordering::SeqCst);
    eprintln!("slow reader: {sent} sent, {received} received, {dropped} dropped");
    assert_eq!(last_seq, sent, "the newest event arrives");
    assert_eq!(
        received + dropped,
        sent,
        "every event received or counted dropped"
    );
    assert!(dropped > 0, "the reader was slow enough to lose events");
    let mut metrics = MetricsConn::open(&server);
    assert_eq!(metrics.value("mesher_stream_slow_disconnects_total"), 0.0);
}

// ---- 3. Oversized /ingest messages are counted ----

const FIN: u8 = 0x80;
const OP_TEXT: u8 = 0x1;
const OP_CONTINUATION: u8 = 0x0;

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
