//! What hostile or broken clients see on the WebSocket endpoints and at ingest: malformed
//! handshakes and frames, JSON numbers beyond 64 bits, unclear JSON errors, oversized stream
//! filters, and input that arrives after the server decided to close a connection.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const FIN: u8 = 0x80;
const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn stream_path(project: &Project) -> String {
    format!(
        "/stream/projects/{}?key={}",
        project.id, project.dashboard_key
    )
}

fn ingest_path(project: &Project) -> String {
    format!("/ingest?key={}", project.ingest_key)
}

fn text_frame(text: &str) -> Vec<u8> {
    masked_frame(FIN | OP_TEXT, text.as_bytes())
}

/// Reads frames up to the close frame and returns its code.
fn close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let (first, payload) = read_frame(stream).expect("a close frame before the end");
        if first & 0x0f == OP_CLOSE {
            assert!(payload.len() >= 2, "close frame carries a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// The next text frame as JSON, skipping control frames.
fn next_text(stream: &mut TcpStream) -> Value {
    loop {
        let (first, payload) = read_frame(stream).expect("a text frame");
        match first & 0x0f {
            OP_TEXT => return serde_json::from_slice(&payload).expect("JSON text frame"),
            OP_CLOSE => panic!("closed: {payload:?}"),
            _ => continue,
        }
    }
}

/// A raw upgrade request with this `Sec-WebSocket-Key`: (status, head, body).
fn handshake(server: &Server, path: &str, key: &str) -> (u16, String, Vec<u8>) {
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    );
    read_response(&mut stream).expect("an answer to the upgrade")
}

#[test]
fn a_key_that_is_not_base64_of_16_bytes_is_refused_with_400() {
    let server = Server::start();
    let project = server.project("bad-keys");
    for path in [stream_path(&project), ingest_path(&project)] {
        for key in [
            "x",
            "not base64 at all",
            "dGhlIHNhbXBsZSBub25j",         // base64 of 15 bytes
            "dGhlIHNhbXBsZSBub25jZQxx",     // no padding: 18 bytes
            "dGhlIHNhbXBsZSBub25jZSE/Pw==", // base64 of 20 bytes
            "dGhlIHNhbXBsZSBub25j*Q==",
        ] {
            let (status, head, body) = handshake(&server, &path, key);
            assert_eq!(status, 400, "{path} with key {key:?}: {head}");
            let body: Value = serde_json::from_slice(&body).expect("JSON error body");
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("sec-websocket-key")),
                "{body}"
            );
        }
        let (status, head, _) = handshake(&server, &path, SAMPLE_KEY);
        assert_eq!(status, 101, "{path}: {head}");
    }
}

#[test]
fn a_64_bit_length_with_the_top_bit_set_closes_with_1002() {
    let server = Server::start();
    let project = server.project("top-bit");
    for path in [stream_path(&project), ingest_path(&project)] {
        let mut stream = server.raw_ws(&path);
        let mut frame = vec![FIN | OP_TEXT, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        frame.extend_from_slice(&CLIENT_MASK);
        send_raw(&mut stream, &frame);
        assert_eq!(close_code(&mut stream), 1002, "{path}");
    }
}

/// A socket that upgrades on `path` and reads nothing more unless asked: its receive buffer is
/// tiny, so the server's writes back up after a few kilobytes.
fn non_reading_client(server: &Server, path: &str) -> TcpStream {
    upgrade_with_receive_buffer(server, path, 4096, Duration::from_secs(10))
}

/// Writes `frame` `count` times in large writes until the server stops taking them.
fn flood(stream: &mut TcpStream, frame: &[u8], count: usize) {
    let batch: Vec<u8> = frame.repeat(1000);
    for _ in 0..count / 1000 {
        if stream.write_all(&batch).is_err() {
            return;
        }
    }
}

/// Waits until the metric has risen above `before`, then a little longer for any late rise.
fn settled_rise(metrics: &mut MetricsConn, name: &str, before: f64) -> f64 {
    assert!(
        wait_until(Duration::from_secs(30), || metrics.value(name) > before),
        "{name} never rose"
    );
    std::thread::sleep(Duration::from_millis(1500));
    metrics.value(name) - before
}

/// Starts a server with `flags` and one project, then floods the path `path` gives for it with
/// `count` copies of `frame` from a client that reads nothing: the server cuts the client off, and
/// once only.
fn cut_off_once(
    flags: &[&str],
    path: fn(&Project) -> String,
    frame: &[u8],
    count: usize,
) -> (Server, Project) {
    let server = Server::start_with(Backend::Sqlite, flags);
    let project = server.project("slow-client");
    let mut metrics = MetricsConn::open(&server);
    let name = "mesher_stream_slow_disconnects_total";
    let before = metrics.value(name);
    let mut client = non_reading_client(&server, &path(&project));
    flood(&mut client, frame, count);
    assert_eq!(settled_rise(&mut metrics, name, before), 1.0);
    (server, project)
}

#[test]
fn a_slow_stream_client_is_cut_off_once_and_its_buffered_frames_are_not_handled() {
    // Each subscribe is answered; unread answers fill the kernel buffers and then the ring, and
    // the client is cut off with megabytes of subscribes still unread by the server.
    let subscribe = text_frame(r#"{"type":"subscribe","filters":{"level":"error"}}"#);
    cut_off_once(&["--stream-buffer", "10"], stream_path, &subscribe, 100_000);
}

#[test]
fn a_slow_ingest_client_is_cut_off_once_and_its_buffered_events_are_not_ingested() {
    // The server stops reading from an ingest client whose answers back up, so it is the stall
    // timeout that cuts it off. Every event is answered; once the answers back up the client is
    // cut off. Each buffered frame handled after that would be ingested unanswered and found slow
    // again.
    let event = text_frame(r#"{"message":"flood"}"#);
    let sent = 100_000;
    let (server, project) = cut_off_once(&["--stall-timeout", "2"], ingest_path, &event, sent);
    let ingested = wait_for_event_total(&server, &project);
    assert!(ingested < sent as u64, "the flood was cut off");
}

#[test]
fn frames_after_a_protocol_error_are_not_ingested() {
    let server = Server::start();
    let project = server.project("after-error");
    let mut client = server.raw_ws(&ingest_path(&project));
    // Five events, an unmasked frame (a protocol error), then five more, in one write.
    let event = text_frame(r#"{"message":"before the error"}"#);
    let mut bytes = event.repeat(5);
    bytes.extend_from_slice(&[FIN | OP_TEXT, 2, b'{', b'}']);
    bytes.extend_from_slice(&text_frame(r#"{"message":"after the error"}"#).repeat(5));
    send_raw(&mut client, &bytes);
    for _ in 0..5 {
        assert_eq!(next_text(&mut client)["status"], "accepted");
    }
    assert_eq!(close_code(&mut client), 1002);
    assert_eq!(wait_for_event_total(&server, &project), 5);
    let titles: Vec<Value> = server
        .all_issues(&project)
        .iter()
        .map(|issue| issue["title"].clone())
        .collect();
    assert_eq!(titles, ["before the error"]);
}

/// The project's event total once it has stopped changing.
fn wait_for_event_total(server: &Server, project: &Project) -> u64 {
    let mut last = u64::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let total = server.event_total(project);
        if total == last {
            return total;
        }
        last = total;
    }
}

#[test]
fn a_filter_with_too_many_or_too_long_values_is_refused_and_the_old_one_stays() {
    let server = Server::start();
    let project = server.project("big-filters");
    let (mut ws, _) = server.subscribe(&project);
    // The reply to a subscribe, past any stream messages before it.
    let subscribe = |ws: &mut Ws, filters: Value| {
        let text = json!({"type": "subscribe", "filters": filters}).to_string();
        ws.send(tungstenite::Message::text(text)).unwrap();
        loop {
            let reply = next_json(ws);
            if matches!(reply["type"].as_str(), Some("filters_updated" | "error")) {
                return reply;
            }
        }
    };
    let reply = subscribe(&mut ws, json!({"environment": "production"}));
    assert_eq!(reply["type"], "filters_updated", "{reply}");

    let many: Vec<String> = (0..101).map(|i| format!("env-{i}")).collect();
    let reply = subscribe(&mut ws, json!({ "environment": many }));
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("at most 100"),
        "{reply}"
    );
    let reply = subscribe(&mut ws, json!({ "environment": ["ok", "x".repeat(257)] }));
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("at most 256"),
        "{reply}"
    );

    // The connection is open and `production` still filters.
    for environment in ["staging", "production"] {
        let (status, body) = server.event(
            &project.ingest_key,
            &json!({"message": format!("from {environment}"), "environment": environment}),
        );
        assert_eq!(status, 202, "{body}");
    }
    let event = next_of_type(&mut ws, "event");
    assert_eq!(event["data"]["environment"], "production", "{event}");

    let most: Vec<String> = (0..100).map(|i| format!("env-{i}")).collect();
    let reply = subscribe(&mut ws, json!({ "environment": most }));
    assert_eq!(reply["type"], "filters_updated", "{reply}");
    let (status, body) = server.event(
        &project.ingest_key,
        &json!({"message": "from env-99", "environment": "env-99"}),
    );
    assert_eq!(status, 202, "{body}");
    let event = next_of_type(&mut ws, "event");
    assert_eq!(event["data"]["environment"], "env-99", "{event}");
}

/// Numbers beyond 64-bit integers and `f64`, all valid JSON.
fn wide_numbers() -> Vec<String> {
    vec![
        "18446744073709551616".to_owned(),
        "-9223372036854775809".to_owned(),
        format!("4{}", "2".repeat(399)),
        "1e999".to_owned(),
        "-1E+400".to_owned(),
    ]
}

/// The raw text of the next `event` message (its numbers may be beyond what a JSON library
/// reads).
fn next_event_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("a stream message") {
            tungstenite::Message::Text(text) if text.starts_with(r#"{"type":"event""#) => {
                return text.to_string()
            }
            _ => continue,
        }
    }
}

/// The raw body of the events API for the issue of an ingest answer.
fn stored_events_text(server: &Server, project: &Project, answer: &Value) -> String {
    let issue_id = answer["issue_id"].as_str().expect("issue_id");
    let path = format!("/api/v1/issues/{issue_id}/events");
    let mut text = String::new();
    wait_until(Duration::from_secs(10), || {
        let reply = server.request("GET", &path, Some(&project.dashboard_key), None);
        assert_eq!(reply.status, 200);
        text = String::from_utf8(reply.body).unwrap();
        text.contains(r#""data""#) && !text.contains(r#""data":[]"#)
    });
    text
}

on_both_backends!(numbers_beyond_64_bits_are_accepted_and_kept_as_sent);

fn numbers_beyond_64_bits_are_accepted_and_kept_as_sent(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("wide-numbers");
    let (mut ws, _) = server.subscribe(&project);
    let [big, small, long, huge, tiny] = <[String; 5]>::try_from(wide_numbers()).unwrap();
    let post = |path: &str, body: &str| {
        let reply = server.request(
            "POST",
            path,
            Some(&project.ingest_key),
            Some(body.as_bytes()),
        );
        (reply.status, reply.json())
    };

    // One event: its bytes as sent, in the stream and in storage.
    let single = format!(
        r#"{{"message":"wide single","extra":{{"a":{big},"b":[{small},[{huge}]],"c":{long}}},"other":{tiny}}}"#
    );
    let (status, answer) = post("/api/v1/events", &single);
    assert_eq!(status, 202, "{answer}");
    let streamed = next_event_text(&mut ws);
    assert!(
        streamed.ends_with(&format!(r#""data":{single}}}"#)),
        "{streamed}"
    );
    let stored = stored_events_text(&server, &project, &answer);
    assert!(stored.contains(&single), "{stored}");

    // Bulk: each element's JSON as sent, spacing included.
    let wide_element = format!(r#"{{ "message" : "wide bulk", "n" : [ {big} , {huge} ] }}"#);
    let bulk = format!(r#"[{wide_element}, {{"message":"plain bulk","x":1.5}}]"#);
    let (status, answer) = post("/api/v1/events/bulk", &bulk);
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer["results"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    let streamed = next_event_text(&mut ws);
    assert!(
        streamed.ends_with(&format!(r#""data":{wide_element}}}"#)),
        "{streamed}"
    );
    let streamed = next_event_text(&mut ws);
    assert!(streamed.contains("plain bulk"), "{streamed}");
    let stored = stored_events_text(&server, &project, &answer["results"][0]);
    assert!(stored.contains(&wide_element), "{stored}");

    // A WebSocket ingest frame, single and array.
    let mut ingest = server.ws(&ingest_path(&project)).unwrap();
    let frame = format!(r#"{{"message":"wide frame","v":{small}}}"#);
    ingest
        .send(tungstenite::Message::text(frame.clone()))
        .unwrap();
    assert_eq!(next_json(&mut ingest)["status"], "accepted");
    assert!(next_event_text(&mut ws).ends_with(&format!(r#""data":{frame}}}"#)));
    let frame = format!(r#"[{{"message":"wide frame array","v":{long}}}]"#);
    ingest.send(tungstenite::Message::text(frame)).unwrap();
    assert_eq!(next_json(&mut ingest)["status"], "accepted");
    assert!(next_event_text(&mut ws).contains(&format!(r#""v":{long}}}"#)));

    // A timestamp beyond any range is still refused for what it is.
    let (status, answer) = post(
        "/api/v1/events",
        &format!(r#"{{"message":"m","timestamp":{huge}}}"#),
    );
    assert_eq!(status, 400);
    assert_eq!(
        answer["error"],
        "invalid event: timestamp out of range (years 0000 to 9999)"
    );
}

#[test]
fn invalid_json_is_answered_with_what_is_wrong_and_where() {
    let server = Server::start();
    let project = server.project("json-errors");
    let cases = [
        (
            r#"{"message":"x"} garbage"#,
            "trailing characters at byte 16",
        ),
        (
            "NaN",
            "unexpected character 'N' at byte 0, expected a value",
        ),
        (
            r#"{"message":NaN}"#,
            "unexpected character 'N' at byte 11, expected a value",
        ),
        (
            r#"{"message":"x",}"#,
            "unexpected character '}' at byte 15, expected a string key",
        ),
        (
            r#"{"message":"x"#,
            "unterminated string starting at byte 11",
        ),
        ("", "unexpected end of input at byte 0, expected a value"),
    ];
    let mut ingest = server.ws(&ingest_path(&project)).unwrap();
    for (body, detail) in cases {
        let expected = format!("invalid JSON: {detail}");
        let reply = server.request(
            "POST",
            "/api/v1/events",
            Some(&project.ingest_key),
            Some(body.as_bytes()),
        );
        assert_eq!(reply.status, 400, "{body}");
        assert_eq!(reply.json()["error"], expected.as_str(), "{body}");
        if !body.is_empty() {
            ingest.send(tungstenite::Message::text(body)).unwrap();
            assert_eq!(next_json(&mut ingest)["error"], expected.as_str(), "{body}");
        }
    }
    let reply = server.request(
        "POST",
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        Some(br#"[{"message":"a"},{"message":"b"} ]]"#),
    );
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json()["error"],
        "invalid JSON: trailing characters at byte 34"
    );
}

#[test]
fn an_ingest_client_that_sends_many_frames_at_once_and_reads_gets_every_answer() {
    let server = Server::start();
    let project = server.project("pipelined");
    let frames = 500;
    let event = text_frame(r#"{"message":"pipelined"}"#);
    // Several connections, so that some land on the shard that owns the project, where ingest
    // never waits for another shard.
    let connections = 6;
    for connection in 0..connections {
        let mut client = server.raw_ws(&ingest_path(&project));
        send_raw(&mut client, &event.repeat(frames));
        for index in 0..frames {
            let answer = next_text(&mut client);
            assert_eq!(
                answer["status"], "accepted",
                "connection {connection}, answer {index}: {answer}"
            );
        }
    }
    assert_eq!(
        wait_for_event_total(&server, &project),
        (connections * frames) as u64
    );
}
