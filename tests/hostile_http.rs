//! The HTTP layer against hostile clients: memory follows bytes received, not bytes announced;
//! keys are checked before a body is read; pending bodies and connections are bounded; escaped
//! slashes stay in their segment; error answers survive the close that follows them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// This test process may open as many files as its hard limit allows.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a struct of ours.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

fn post_head(path: &str, key: Option<&str>, length: usize) -> Vec<u8> {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    format!("POST {path} HTTP/1.1\r\nHost: mesher\r\n{auth}Content-Length: {length}\r\n\r\n")
        .into_bytes()
}

/// An event body of exactly `length` bytes.
fn event_of_length(length: usize) -> Vec<u8> {
    let frame = json!({"message": "big", "extra": {"pad": ""}}).to_string();
    let pad = "x".repeat(length - frame.len());
    let body = json!({"message": "big", "extra": {"pad": pad}}).to_string();
    assert_eq!(body.len(), length);
    body.into_bytes()
}

/// Reads to the end of the stream: true for a clean end (no reset, no more bytes).
fn ends_cleanly(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).is_ok() && rest.is_empty()
}

/// The head of an answer that has no body whatever its content-length says (the answer to HEAD).
fn read_head_only(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "answer head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn announced_bodies_hold_no_memory_before_their_bytes_arrive() {
    raise_file_limit();
    let server = Server::start_with(Backend::Sqlite, &["--request-timeout", "120"]);
    let project = server.project("Announced");
    let mut metrics = MetricsConn::open(&server);
    // Warm up: a few requests of each kind, then let the allocator settle.
    for _ in 0..20 {
        server.event(&project.ingest_key, &json!({"message": "warm"}));
    }
    std::thread::sleep(Duration::from_millis(500));
    let baseline = server.rss_bytes();
    let mut held = Vec::new();
    for index in 0..2000 {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        let path = if index % 2 == 0 {
            "/api/v1/events/bulk"
        } else {
            "/api/v1/events"
        };
        let length = if index % 2 == 0 { 5 << 20 } else { 1 << 20 };
        stream
            .write_all(&post_head(path, Some(&project.ingest_key), length))
            .unwrap();
        held.push(stream);
    }
    assert!(
        wait_until(Duration::from_secs(30), || metrics
            .value("mesher_connections_open{kind=\"http\"}")
            >= 2001.0),
        "all 2,000 connections are open"
    );
    std::thread::sleep(Duration::from_millis(500));
    let grown = server.rss_bytes().saturating_sub(baseline);
    assert!(
        grown < 100 << 20,
        "2,000 announced bodies grew RSS by {} MB",
        grown >> 20
    );
    assert_eq!(metrics.value("mesher_http_pending_body_bytes"), 0.0);
    drop(held);
    // The server still serves everyone else.
    let (status, _) = server.event(&project.ingest_key, &json!({"message": "after"}));
    assert_eq!(status, 202);
}

#[test]
fn keys_are_checked_before_the_body_is_read() {
    let server = Server::start();
    let project = server.project("Keyless");
    let cases = [
        (None, 401, "/api/v1/events"),
        (
            Some("mshr_000000000000000000000000000000000000000000000000"),
            401,
            "/api/v1/events",
        ),
        (
            Some(project.dashboard_key.as_str()),
            403,
            "/api/v1/events/bulk",
        ),
        (
            Some(project.ingest_key.as_str()),
            403,
            "/api/v1/issues/x/resolve",
        ),
        (Some(project.ingest_key.as_str()), 403, "/api/v1/projects"),
        (Some("not-the-admin-token"), 401, "/api/v1/projects"),
    ];
    for (key, expected, path) in cases {
        let mut stream = server.connect();
        // The head announces a body (within the route's limit) and none of it is sent: the
        // answer cannot wait for it.
        let length = if path.starts_with("/api/v1/events") {
            1 << 20
        } else {
            60_000
        };
        send_raw(&mut stream, &post_head(path, key, length));
        let (status, head, _) = read_response(&mut stream).expect("answered before the body");
        assert_eq!(status, expected, "{path} with {key:?}: {head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(ends_cleanly(&mut stream));
    }
    // A chunked body is refused the same way.
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        b"POST /api/v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n",
    );
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(401));
    // A valid key still gets its body read and its event accepted, sent in pieces.
    let body = event_of_length(300_000);
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        &post_head("/api/v1/events", Some(&project.ingest_key), body.len()),
    );
    for piece in body.chunks(50_000) {
        send_raw(&mut stream, piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(202));
}

#[test]
fn pending_bodies_together_stay_under_their_bound() {
    let server = Server::start_with(
        Backend::Sqlite,
        &[
            "--max-pending-body-bytes",
            "1500000",
            "--request-timeout",
            "60",
        ],
    );
    let project = server.project("Pending");
    let mut metrics = MetricsConn::open(&server);
    let body = event_of_length(1_000_000);
    let head = post_head("/api/v1/events", Some(&project.ingest_key), body.len());

    let mut first = server.connect();
    send_raw(&mut first, &head);
    send_raw(&mut first, &body[..800_000]);
    assert!(
        wait_until(Duration::from_secs(10), || metrics
            .value("mesher_http_pending_body_bytes")
            >= 800_000.0),
        "the first body's bytes are held"
    );
    // A second body that would take the total past 1.5 MB is refused, not buffered.
    let mut second = server.connect();
    send_raw(&mut second, &head);
    let _ = second.write_all(&body[..800_000]);
    let (status, reply_head, reply) = read_response(&mut second).expect("503 answered");
    assert_eq!(status, 503, "{reply_head}");
    assert!(reply_head.to_ascii_lowercase().contains("retry-after: 1"));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&reply).unwrap()["error"],
        "overloaded"
    );
    assert!(ends_cleanly(&mut second));
    assert_eq!(metrics.value("mesher_http_bodies_refused_total"), 1.0);
    // The first completes; then the budget is free again for a whole new body.
    send_raw(&mut first, &body[800_000..]);
    assert_eq!(read_response(&mut first).map(|r| r.0), Some(202));
    assert_eq!(metrics.value("mesher_http_pending_body_bytes"), 0.0);
    let mut third = server.connect();
    send_raw(&mut third, &head);
    send_raw(&mut third, &body);
    assert_eq!(read_response(&mut third).map(|r| r.0), Some(202));
}

#[test]
fn connections_over_the_limit_get_503_and_close() {
    let server = Server::start_with(
        Backend::Sqlite,
        &["--max-connections", "20", "--request-timeout", "60"],
    );
    let mut metrics = MetricsConn::open(&server);
    assert_eq!(metrics.value("mesher_connections_limit"), 20.0);
    let mut open: Vec<TcpStream> = (0..19).map(|_| server.connect()).collect();
    assert!(wait_until(Duration::from_secs(10), || metrics
        .value("mesher_connections_open{kind=\"http\"}")
        >= 20.0));
    let mut over = server.connect();
    send_raw(&mut over, b"GET /health HTTP/1.1\r\nHost: mesher\r\n\r\n");
    let (status, head, body) = read_response(&mut over).expect("503 answered");
    assert_eq!(status, 503, "{head}");
    assert!(String::from_utf8_lossy(&body).contains("too many connections"));
    assert!(ends_cleanly(&mut over));
    assert_eq!(metrics.value("mesher_connections_refused_total"), 1.0);
    // A place that frees up is taken by the next connection.
    drop(open.pop());
    assert!(wait_until(Duration::from_secs(10), || metrics
        .value("mesher_connections_open{kind=\"http\"}")
        <= 19.0));
    let mut next = server.connect();
    send_raw(&mut next, b"GET /health HTTP/1.1\r\nHost: mesher\r\n\r\n");
    assert_eq!(read_response(&mut next).map(|r| r.0), Some(200));
}

#[test]
fn a_connection_that_sends_nothing_is_closed_at_the_request_timeout() {
    let server = Server::start_with(Backend::Sqlite, &["--request-timeout", "2"]);
    let mut silent = server.connect();
    let started = Instant::now();
    assert!(ends_cleanly(&mut silent), "closed without an answer");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "closed at the 2 s request timeout, not the 75 s keep-alive timeout"
    );
    // The first request's clock starts at the accept, not at its first byte.
    let mut late = server.connect();
    let accepted = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    send_raw(&mut late, b"GET /health HTTP/1.1\r\n");
    let (status, _, _) = read_response(&mut late).expect("408 answered");
    assert_eq!(status, 408);
    assert!(
        accepted.elapsed() < Duration::from_millis(3400),
        "408 came {:?} after the accept",
        accepted.elapsed()
    );
    // Both are counted once closed (the second after the client has read its answer).
    drop(late);
    let timeouts = "mesher_connections_closed_total{reason=\"request_timeout\"}";
    assert!(wait_until(Duration::from_secs(10), || server
        .metric(timeouts)
        == 2.0));
}

#[test]
fn escaped_slashes_never_reach_another_resource() {
    let server = Server::start();
    let project = server.project("adv");
    let (status, _) = server.event(&project.ingest_key, &json!({"message": "secret"}));
    assert_eq!(status, 202);
    let key = Some(project.dashboard_key.as_str());
    // `adv%2Fissues` is one (unknown) project parameter, not the issue list of `adv`.
    let (status, body) = server.get("/api/v1/projects/adv%2Fissues", key);
    assert_ne!(status, 200, "{body}");
    assert!(body.get("data").is_none(), "{body}");
    let (status, _) = server.patch(
        "/api/v1/projects/adv%2Fissues",
        Some(ADMIN_TOKEN),
        &json!({"sample_rate": 0.5}),
    );
    assert_eq!(status, 404);
    // Escapes inside a parameter are decoded after routing.
    let (status, body) = server.get("/api/v1/projects/%61dv/issues", key);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    // An escape that is not UTF-8 names nothing.
    let (status, _) = server.get("/api/v1/projects/%ff/issues", key);
    assert_eq!(status, 400);
}

#[test]
fn error_answers_are_read_before_the_close() {
    let server = Server::start();
    // A head far over 8 KiB, sent in one go: the server stops reading at 8 KiB and answers.
    let mut huge = b"GET /health HTTP/1.1\r\nHost: mesher\r\n".to_vec();
    while huge.len() < 256 * 1024 {
        huge.extend_from_slice(
            b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    for _ in 0..5 {
        let mut stream = server.connect();
        // Written whole (the server discards what it does not read), then the answer is read.
        stream.write_all(&huge).unwrap();
        let reply = read_response(&mut stream);
        assert_eq!(
            reply.map(|r| r.0),
            Some(431),
            "the 431 arrives, not a reset"
        );
        assert!(ends_cleanly(&mut stream));
    }
    // 100 header lines under 8 KiB are a head real clients send; 101 are too many.
    let lines = |count: usize| -> String { (0..count).map(|i| format!("X-{i}: v\r\n")).collect() };
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        format!("GET /health HTTP/1.1\r\n{}\r\n", lines(99)).as_bytes(),
    );
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(200));
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        format!("GET /health HTTP/1.1\r\n{}\r\n", lines(101)).as_bytes(),
    );
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(431));
}

#[test]
fn head_answers_carry_the_get_length_and_http10_keep_alive_is_said() {
    let server = Server::start();
    let mut stream = server.connect();
    send_raw(&mut stream, b"GET /health HTTP/1.1\r\nHost: mesher\r\n\r\n");
    let (_, _, get_body) = read_response(&mut stream).unwrap();
    send_raw(
        &mut stream,
        b"HEAD /health HTTP/1.1\r\nHost: mesher\r\n\r\n",
    );
    let head = read_head_only(&mut stream);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", get_body.len())),
        "{head}"
    );
    // No body followed the HEAD answer: the next answer starts right after it.
    send_raw(&mut stream, b"GET /health HTTP/1.1\r\nHost: mesher\r\n\r\n");
    assert_eq!(read_response(&mut stream).map(|r| r.2), Some(get_body));

    let mut old = server.connect();
    for _ in 0..2 {
        send_raw(
            &mut old,
            b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        );
        let (status, head, _) = read_response(&mut old).expect("kept alive");
        assert_eq!(status, 200);
        assert!(head.contains("connection: keep-alive\r\n"), "{head}");
    }
    send_raw(&mut old, b"GET /health HTTP/1.0\r\n\r\n");
    let (_, head, _) = read_response(&mut old).unwrap();
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert!(ends_cleanly(&mut old));
}

#[test]
fn oversized_event_requests_are_counted_as_too_large() {
    let server = Server::start();
    let project = server.project("Oversized");
    let too_large = "mesher_events_rejected_total{reason=\"too_large\"}";
    assert_eq!(server.metric(too_large), 0.0);
    // Announced over the limit: refused from the head.
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        &post_head("/api/v1/events", Some(&project.ingest_key), (1 << 20) + 1),
    );
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(413));
    // Chunked past the limit: refused while decoding.
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        format!(
            "POST /api/v1/events HTTP/1.1\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            project.ingest_key
        )
        .as_bytes(),
    );
    let chunk = vec![b' '; 600_000];
    for _ in 0..2 {
        let _ = stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes());
        let _ = stream.write_all(&chunk);
        let _ = stream.write_all(b"\r\n");
    }
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(413));
    assert_eq!(server.metric(too_large), 2.0);
    // A management request over its limit is no event.
    let mut stream = server.connect();
    send_raw(
        &mut stream,
        &post_head("/api/v1/projects", Some(ADMIN_TOKEN), 1 << 20),
    );
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(413));
    assert_eq!(server.metric(too_large), 2.0);
}
