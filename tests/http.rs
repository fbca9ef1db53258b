//! HTTP/1.1 behaviour of the server core (PROTOCOL.md sections 1 and 7), over raw sockets where
//! the exact bytes matter and with a real HTTP client elsewhere.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Reads until the peer closes: true for a clean end of stream (or a reset after it), false if
/// the peer sent more bytes or the read timed out.
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

/// Sends raw bytes on a fresh connection and reads one response.
fn exchange(server: &Server, bytes: &[u8]) -> (u16, String, Vec<u8>) {
    let mut stream = server.connect();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    send_raw(&mut stream, bytes);
    read_response(&mut stream)
        .unwrap_or_else(|| panic!("no response to {:?}", String::from_utf8_lossy(bytes)))
}

/// A connection that has sent `head` (and what follows it in the string), waiting at most
/// 5 s for each answer: shorter than the server's request timeout, so an answer that waits for
/// a body that never comes fails the test.
fn send_head(server: &Server, head: &str) -> TcpStream {
    let mut stream = server.connect();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    send_raw(&mut stream, head.as_bytes());
    stream
}

fn json_body(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    })
}

/// The error text of an error response, checking the body is exactly `{"error": STRING}`.
fn error_text(body: &[u8]) -> String {
    let value = json_body(body);
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {value}"));
    assert_eq!(object.len(), 1, "error body has only `error`: {value}");
    object["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error is a string: {value}"))
        .to_string()
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

fn health_request() -> &'static [u8] {
    b"GET /health HTTP/1.1\r\nHost: mesher\r\n\r\n"
}

fn event_request(key: &str, body: &str) -> String {
    format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::start();
    let project = server.project("Keep Alive");
    let mut stream = server.connect();
    for round in 0..3 {
        send_raw(&mut stream, health_request());
        let (status, head, body) =
            read_response(&mut stream).expect("health answered on the same connection");
        assert_eq!(status, 200, "round {round}: {head}");
        assert_ne!(
            header_value(&head, "connection").as_deref(),
            Some("close"),
            "{head}"
        );
        assert_eq!(json_body(&body), json!({"status": "ok", "storage": "ok"}));

        send_raw(
            &mut stream,
            event_request(
                &project.ingest_key,
                &format!(r#"{{"message":"keep {round}"}}"#),
            )
            .as_bytes(),
        );
        let (status, _, body) =
            read_response(&mut stream).expect("event answered on the same connection");
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json_body(&body)["status"], "accepted");
    }
    // Everything above went over one connection: accepted are the project creation, this socket
    // and the scrape itself.
    let accepted = server.metric("mesher_connections_accepted_total{shard=\"0\"}")
        + server.metric("mesher_connections_accepted_total{shard=\"1\"}");
    assert!(accepted <= 4.0, "{accepted} connections accepted");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start();
    let project = server.project("Pipeline");
    let create = r#"{"name":"Second"}"#;
    let mut batch = Vec::new();
    batch.extend_from_slice(health_request());
    batch.extend_from_slice(b"GET /no/such/path HTTP/1.1\r\nHost: mesher\r\n\r\n");
    batch.extend_from_slice(
        event_request(&project.ingest_key, r#"{"message":"first pipelined"}"#).as_bytes(),
    );
    batch.extend_from_slice(b"DELETE /api/v1/projects HTTP/1.1\r\nHost: mesher\r\n\r\n");
    batch.extend_from_slice(
        format!(
            "POST /api/v1/projects HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {}\r\n\r\n{create}",
            create.len()
        )
        .as_bytes(),
    );
    batch.extend_from_slice(
        event_request(&project.ingest_key, r#"{"message":"second pipelined"}"#).as_bytes(),
    );
    batch.extend_from_slice(b"GET /metrics HTTP/1.1\r\nHost: mesher\r\n\r\n");
    batch.extend_from_slice(health_request());

    let mut stream = server.connect();
    send_raw(&mut stream, &batch); // one write: every request arrives before any answer
    let mut statuses = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..8 {
        let (status, _, body) =
            read_response(&mut stream).expect("every pipelined request is answered");
        statuses.push(status);
        bodies.push(body);
    }
    assert_eq!(statuses, [200, 404, 202, 405, 201, 202, 200, 200]);
    assert_eq!(json_body(&bodies[4])["name"], "Second");
    let first = json_body(&bodies[2]);
    let second = json_body(&bodies[5]);
    assert_ne!(first["event_id"], second["event_id"]);
    assert!(String::from_utf8_lossy(&bodies[6]).contains("mesher_events_accepted_total"));
    // Each pipelined body went to its own request.
    let (status, issue) = server.get(
        &format!("/api/v1/issues/{}", second["issue_id"].as_str().unwrap()),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200);
    assert_eq!(issue["title"], "second pipelined");
    // The connection is still usable afterwards.
    send_raw(&mut stream, health_request());
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(200));
}

#[test]
fn connection_close_is_honoured() {
    let server = Server::start();
    for request in [
        &b"GET /health HTTP/1.1\r\nHost: mesher\r\nConnection: close\r\n\r\n"[..],
        b"GET /health HTTP/1.1\r\nHost: mesher\r\nconnection: Close\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nHost: mesher\r\nConnection: close\r\n\r\n",
        // HTTP/1.0 without keep-alive closes too.
        b"GET /health HTTP/1.0\r\n\r\n",
    ] {
        let mut stream = server.connect();
        send_raw(&mut stream, request);
        let (status, head, _) = read_response(&mut stream).expect("answered before closing");
        assert!(status == 200 || status == 404, "{head}");
        assert_eq!(
            header_value(&head, "connection")
                .map(|v| v.to_ascii_lowercase())
                .as_deref(),
            Some("close"),
            "{head}"
        );
        assert!(
            closed_by_peer(&mut stream),
            "server closes after {:?}",
            String::from_utf8_lossy(request)
        );
    }
}

#[test]
fn chunked_request_bodies_are_accepted() {
    let server = Server::start();
    let project = server.project("Chunked");
    let body = r#"{"message":"héllo wörld from chunks","level":"warning","tags":{"environment":"production"}}"#.as_bytes();
    // Three chunks, cut inside a multi-byte character, with an extension and a trailer.
    let (a, rest) = body.split_at(13);
    let (b, c) = rest.split_at(30);
    let mut pieces: Vec<Vec<u8>> = vec![format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        project.ingest_key
    )
    .into_bytes()];
    for (index, chunk) in [a, b, c].into_iter().enumerate() {
        let size = if index == 1 {
            format!("{:X};note=middle\r\n", chunk.len())
        } else {
            format!("{:x}\r\n", chunk.len())
        };
        let (size_start, size_end) = size.as_bytes().split_at(1);
        pieces.push(size_start.to_vec());
        pieces.push(size_end.to_vec());
        let (half, other_half) = chunk.split_at(chunk.len() / 2);
        pieces.push(half.to_vec());
        pieces.push([other_half, b"\r\n"].concat());
    }
    pieces.push(b"0\r\nX-Trailer: done\r\n".to_vec());
    pieces.push(b"\r\n".to_vec());

    let mut stream = server.connect();
    for piece in &pieces {
        send_raw(&mut stream, piece);
        std::thread::sleep(Duration::from_millis(15));
    }
    let (status, _, reply) = read_response(&mut stream).expect("chunked event answered");
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&reply));
    let reply = json_body(&reply);
    assert_eq!(reply["status"], "accepted");

    // The body arrived whole: the issue carries the exact message.
    let (status, issue) = server.get(
        &format!("/api/v1/issues/{}", reply["issue_id"].as_str().unwrap()),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200, "{issue}");
    assert_eq!(issue["title"], "héllo wörld from chunks");
    assert_eq!(issue["level"], "warning");

    // The connection is framed correctly after the body: a second chunked request, then a plain one.
    let second = br#"{"message":"second"}"#;
    let mut request = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAUTHORIZATION: Bearer {}\r\nTRANSFER-ENCODING: Chunked\r\n\r\n{:x}\r\n",
        project.ingest_key,
        second.len()
    )
    .into_bytes();
    request.extend_from_slice(second);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    request.extend_from_slice(health_request());
    send_raw(&mut stream, &request);
    let (status, _, reply) = read_response(&mut stream).expect("second chunked event answered");
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&reply));
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(200));
}

#[test]
fn chunked_body_over_the_route_limit_is_refused() {
    let server = Server::start();
    let project = server.project("Chunked Limit");
    // One chunk announced at 2 MB: more than an event may be, whatever follows.
    let mut stream = send_head(&server, &format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n1E8480\r\n",
            project.ingest_key
        ));
    let (status, _, body) = read_response(&mut stream).expect("answered without the chunk's data");
    assert_eq!(status, 413);
    assert_eq!(error_text(&body), "payload too large");
}

#[test]
fn header_names_are_case_insensitive() {
    let server = Server::start();
    let project = server.project("Case");
    let body = r#"{"message":"case insensitive"}"#;
    let key = &project.ingest_key;
    for auth in [
        format!("AUTHORIZATION: Bearer {key}"),
        format!("authorization: {key}"),
        format!("x-SeNtRy-AuTh: Sentry sentry_key={key}, sentry_version=7"),
        format!("X-SENTRY-AUTH: {key}"),
    ] {
        let request = format!(
            "POST /api/v1/events HTTP/1.1\r\nHOST: mesher\r\n{auth}\r\ncontent-TYPE: application/json\r\nCONTENT-LENGTH: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, _, reply) = exchange(&server, request.as_bytes());
        assert_eq!(status, 202, "{auth}: {}", String::from_utf8_lossy(&reply));
        assert_eq!(json_body(&reply)["status"], "accepted");
    }
    // The same header with a key that does not exist is read too, and refused.
    let request = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAUTHORIZATION: Bearer mshr_{}\r\nContent-Length: {}\r\n\r\n{body}",
        "0".repeat(48),
        body.len()
    );
    let (status, _, reply) = exchange(&server, request.as_bytes());
    assert_eq!(status, 401);
    assert_eq!(error_text(&reply), "unauthorized");
    let (status, list) = server.get(
        &format!("/api/v1/projects/{}/issues", project.id),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["event_count"], 4, "{list}");
}

#[test]
fn headers_over_8_kib_get_431() {
    let server = Server::start();
    // A 7 KiB header is fine.
    let fits = format!(
        "GET /health HTTP/1.1\r\nHost: mesher\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(7 * 1024)
    );
    assert_eq!(exchange(&server, fits.as_bytes()).0, 200);
    // Over 8 KiB in one header, and over 8 KiB spread over many headers.
    let one_big = format!(
        "GET /health HTTP/1.1\r\nHost: mesher\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let many: String = (0..100)
        .map(|i| format!("X-Header-{i}: {}\r\n", "b".repeat(90)))
        .collect();
    let many = format!("GET /health HTTP/1.1\r\nHost: mesher\r\n{many}\r\n");
    for request in [one_big, many] {
        let mut stream = server.connect();
        send_raw(&mut stream, request.as_bytes());
        let (status, _, body) = read_response(&mut stream).expect("431 answered");
        assert_eq!(status, 431);
        assert!(!error_text(&body).is_empty());
        assert!(
            closed_by_peer(&mut stream),
            "the connection closes after 431"
        );
    }
}

#[test]
fn body_over_the_route_limit_gets_413_from_content_length_alone() {
    let server = Server::start();
    let project = server.project("Too Large");
    for (path, length) in [
        ("/api/v1/events", 2_000_000),
        ("/api/v1/events", 1024 * 1024 + 1),
        ("/api/v1/events/bulk", 6_000_000),
    ] {
        // Shorter than the server's request timeout: the answer must not wait for the body.
        let mut stream = send_head(&server, &format!(
                "POST {path} HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
                project.ingest_key
            ));
        let (status, _, body) = read_response(&mut stream)
            .unwrap_or_else(|| panic!("{path} {length}: 413 before the body"));
        assert_eq!(status, 413, "{path} {length}");
        assert_eq!(error_text(&body), "payload too large");
    }
    // A body of exactly 1 MiB is within the limit of one event.
    let message = "x".repeat(1024 * 1024 - r#"{"message":""}"#.len());
    let exact = format!(r#"{{"message":"{message}"}}"#);
    assert_eq!(exact.len(), 1024 * 1024);
    let reply = server.request(
        "POST",
        "/api/v1/events",
        Some(&project.ingest_key),
        Some(exact.as_bytes()),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
}

#[test]
fn request_not_complete_in_time_gets_408_and_close() {
    let server = Server::start_with(Backend::Sqlite, &["--request-timeout", "1"]);
    let project = server.project("Late");
    let half_head = b"GET /health HTTP/1.1\r\nHost: mesher\r\n".to_vec();
    let short_body = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\n{{\"message\"",
        project.ingest_key
    )
    .into_bytes();
    let mut slow = Vec::new();
    for request in [half_head, short_body] {
        let mut stream = server.connect();
        send_raw(&mut stream, &request);
        slow.push(stream);
    }
    // A connection that has sent nothing is closed unanswered at the same deadline: it is not
    // kept for the keep-alive timeout.
    let mut silent = server.connect();
    // One that has been answered once may pause longer than the request timeout.
    let mut kept = server.connect();
    send_raw(&mut kept, health_request());
    assert_eq!(read_response(&mut kept).map(|r| r.0), Some(200));
    for mut stream in slow {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (status, head, body) = read_response(&mut stream).expect("408 answered");
        assert_eq!(status, 408, "{head}");
        assert!(!error_text(&body).is_empty());
        assert!(closed_by_peer(&mut stream), "closed after 408");
    }
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed_by_peer(&mut silent), "silent connection closed");
    std::thread::sleep(Duration::from_millis(2500));
    send_raw(&mut kept, health_request());
    assert_eq!(
        read_response(&mut kept).map(|r| r.0),
        Some(200),
        "a pause between requests is not a late request"
    );
}

/// Answers one request on a fresh connection, then waits for the server to close it unasked;
/// returns how long the connection sat idle.
fn idle_time_until_closed(server: &Server) -> Duration {
    let mut stream = server.connect();
    send_raw(&mut stream, health_request());
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(200));
    let started = Instant::now();
    assert!(
        closed_by_peer(&mut stream),
        "idle connection closed without a response"
    );
    let idle_for = started.elapsed();
    assert!(idle_for < Duration::from_secs(10));
    idle_for
}

#[test]
fn idle_keep_alive_connection_closes_after_keepalive_timeout() {
    let server = Server::start_with(Backend::Sqlite, &["--keepalive-timeout", "1"]);
    idle_time_until_closed(&server);
}

#[test]
fn idle_timeout_longer_than_the_request_timeout_is_kept() {
    // The connection's timer is first armed for the request deadline (1 s); it must then wait
    // for the idle deadline (2 s) rather than close the connection at the earlier one.
    let server = Server::start_with(
        Backend::Sqlite,
        &["--request-timeout", "1", "--keepalive-timeout", "2"],
    );
    let idle_for = idle_time_until_closed(&server);
    assert!(
        idle_for >= Duration::from_millis(1500),
        "closed after {idle_for:?}, before the 2 s keep-alive timeout"
    );
}

#[test]
fn bytes_that_are_not_http_get_400_and_close() {
    let server = Server::start();
    let project = server.project("Garbage");
    let chunked = format!(
        "POST /api/v1/events HTTP/1.1\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        project.ingest_key
    );
    let cases: [&[u8]; 7] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x13\x00\x00\r\n\r\n",
        b"HELLO THERE\r\n\r\n",
        b"\x00\x01\x02\x03 garbage\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost mesher\r\n\r\n",
        b"POST /api/v1/events HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        b"POST /api/v1/events HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
        chunked.as_bytes(),
    ];
    for request in cases {
        let mut stream = server.connect();
        send_raw(&mut stream, request);
        let (status, _, body) = read_response(&mut stream)
            .unwrap_or_else(|| panic!("400 answered to {:?}", String::from_utf8_lossy(request)));
        assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(request));
        assert!(!error_text(&body).is_empty());
        assert!(
            closed_by_peer(&mut stream),
            "closed after {:?}",
            String::from_utf8_lossy(request)
        );
    }
    // The server still serves.
    assert_eq!(server.get("/health", None).0, 200);
}

#[test]
fn unknown_path_is_404_and_wrong_method_is_405() {
    let server = Server::start();
    for path in [
        "/nope",
        "/api/v1/nothing",
        "/api/v2/events",
        "/healthz",
        // "/" is the live page (PROTOCOL section 11); nothing else is served beside its files.
        "/favicon.ico",
        "/app.jsx",
    ] {
        let reply = server.request("GET", path, None, None);
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.json(), json!({"error": "not found"}), "{path}");
        assert!(reply
            .header("content-type")
            .unwrap_or("")
            .starts_with("application/json"));
    }
    for (method, path, allowed) in [
        ("GET", "/api/v1/events", "POST"),
        ("DELETE", "/api/v1/projects", "GET"),
        ("POST", "/health", "GET"),
        ("PUT", "/metrics", "GET"),
        ("POST", "/api/v1/issues/abc", "GET"),
        ("POST", "/", "GET"),
    ] {
        let reply = server.request(method, path, None, None);
        assert_eq!(reply.status, 405, "{method} {path}");
        assert!(!error_text(&reply.body).is_empty());
        let allow = reply
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 carries Allow"));
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow}");
    }
}

#[test]
fn error_bodies_stay_valid_json_when_they_echo_input() {
    let server = Server::start();
    let project = server.project("Escapes");
    let key = &project.ingest_key;
    let nasty = "lo\"u\\d\u{1}\t\u{7f}</script>";
    let cases: Vec<(String, Vec<u8>)> = vec![
        // An invalid event whose error names the bad level.
        (
            "/api/v1/events".into(),
            json!({"message": "m", "level": nasty})
                .to_string()
                .into_bytes(),
        ),
        // A tag key with every kind of character to escape.
        (
            "/api/v1/events".into(),
            json!({"message": "m", "tags": {nasty: 5}})
                .to_string()
                .into_bytes(),
        ),
        // Not JSON at all, with raw control bytes, quotes and backslashes.
        (
            "/api/v1/events".into(),
            b"{\"message\":\"a\x01\\\"b\x02\"\\".to_vec(),
        ),
        ("/api/v1/events".into(), b"\"\\\x00\x1f".to_vec()),
        (
            "/api/v1/events/bulk".into(),
            json!([{"message": "ok"}, {"level": nasty}])
                .to_string()
                .into_bytes(),
        ),
        (
            "/api/v1/events".into(),
            b"\xff\xfe{\"message\":\"not utf-8\"}".to_vec(),
        ),
    ];
    for (path, body) in cases {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let (status, head, reply) = exchange(&server, &request);
        assert_eq!(
            status,
            400,
            "{path} {:?}: {head}",
            String::from_utf8_lossy(&body)
        );
        assert!(header_value(&head, "content-type")
            .unwrap_or_default()
            .starts_with("application/json"));
        let text = error_text(&reply);
        assert!(text.starts_with("invalid"), "{text}");
    }
    // Ids and slugs from the path.
    for path in [
        "/api/v1/issues/%22a%5Cb%01",
        "/api/v1/issues/\"a\\b",
        "/api/v1/projects/%22x%5C/issues",
    ] {
        let (status, _, reply) = exchange(
            &server,
            format!(
                "GET {path} HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {}\r\n\r\n",
                project.dashboard_key
            )
            .as_bytes(),
        );
        assert!((400..500).contains(&status), "{path}: {status}");
        error_text(&reply);
    }
}

#[test]
fn expect_100_continue_is_answered() {
    let server = Server::start();
    let project = server.project("Continue");
    let body = r#"{"message":"after continue"}"#;
    let mut stream = send_head(&server, &format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            project.ingest_key,
            body.len()
        ));
    let (status, _, interim) = read_response(&mut stream).expect("100 Continue before the body");
    assert_eq!(status, 100);
    assert!(interim.is_empty());
    send_raw(&mut stream, body.as_bytes());
    let (status, _, reply) = read_response(&mut stream).expect("final answer");
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&reply));

    // A body that will be refused is refused at once instead of invited.
    let mut stream = send_head(&server, &format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: mesher\r\nAuthorization: Bearer {}\r\nExpect: 100-continue\r\nContent-Length: 5000000\r\n\r\n",
            project.ingest_key
        ));
    assert_eq!(read_response(&mut stream).map(|r| r.0), Some(413));
}

#[test]
fn health_reports_storage() {
    for backend in BACKENDS {
        let server = Server::start_with(backend, &[]);
        let reply = server.request("GET", "/health", None, None);
        assert_eq!(reply.status, 200, "{backend:?}");
        assert_eq!(reply.json(), json!({"status": "ok", "storage": "ok"}));
        assert!(reply
            .header("content-type")
            .unwrap_or("")
            .starts_with("application/json"));
        // HEAD answers the same status without a body.
        let reply = server.request("HEAD", "/health", None, None);
        assert_eq!(reply.status, 200);
        assert!(reply.body.is_empty());
    }
}

/// Parses Prometheus text: every sample line is `name{labels} value` with a declared family.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut families = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "labels: {line}"
            );
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| families.contains(*base))
            })
            .unwrap_or(name);
        assert!(
            families.contains(family),
            "{name} has a # TYPE line before it"
        );
        samples.push((series.to_string(), value));
    }
    samples
}

#[test]
fn metrics_expose_the_documented_families() {
    let server = Server::start();
    let project = server.project("Metrics");
    let (_stream, _) = server.subscribe(&project);
    let _ingest = server
        .ws(&format!("/ingest?key={}", project.ingest_key))
        .unwrap();
    assert_eq!(
        server
            .event(&project.ingest_key, &json!({"message": "counted"}))
            .0,
        202
    );
    assert_eq!(
        server
            .event(&project.ingest_key, &json!({"level": "loud"}))
            .0,
        400
    );

    // The accepted event is committed within the flush interval; wait (bounded) for the writer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("mesher_storage_rows_total") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = server.request("GET", "/metrics", None, None);
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "{:?}",
        reply.header("content-type")
    );
    let text = String::from_utf8(reply.body).unwrap();
    let samples = parse_metrics(&text);
    let value = |series: &str| {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{series} in /metrics:\n{text}"))
    };
    assert!(value("mesher_connections_open{kind=\"http\"}") >= 1.0);
    assert_eq!(value("mesher_connections_open{kind=\"stream\"}"), 1.0);
    assert_eq!(value("mesher_connections_open{kind=\"ingest_ws\"}"), 1.0);
    assert!(
        value("mesher_connections_accepted_total{shard=\"0\"}")
            + value("mesher_connections_accepted_total{shard=\"1\"}")
            >= 4.0
    );
    assert_eq!(value("mesher_events_accepted_total"), 1.0);
    assert_eq!(
        value("mesher_events_rejected_total{reason=\"invalid\"}"),
        1.0
    );
    for reason in [
        "rate_limited",
        "overloaded",
        "too_large",
        "unauthorized",
        "issue_limit",
    ] {
        value(&format!(
            "mesher_events_rejected_total{{reason=\"{reason}\"}}"
        ));
    }
    assert!(value("mesher_stream_messages_sent_total") >= 1.0);
    value("mesher_stream_messages_dropped_total");
    value("mesher_stream_slow_disconnects_total");
    value("mesher_storage_queue_events");
    assert!(value("mesher_storage_batches_total") >= 1.0);
    assert!(value("mesher_storage_batch_rows_sum") >= 1.0);
    assert!(value("mesher_storage_flush_latency_microseconds_count") >= 1.0);
    value("mesher_storage_flush_latency_microseconds_sum");
    value("mesher_loop_lag_microseconds{shard=\"0\"}");
    value("mesher_loop_lag_microseconds{shard=\"1\"}");
}

#[test]
fn connections_spread_over_both_shards() {
    const CONNECTIONS: usize = 200;
    let server = Server::start(); // two shards
    let mut streams: Vec<TcpStream> = (0..CONNECTIONS).map(|_| server.connect()).collect();
    for stream in &mut streams {
        send_raw(stream, health_request());
    }
    for (index, stream) in streams.iter_mut().enumerate() {
        let (status, _, body) =
            read_response(stream).unwrap_or_else(|| panic!("connection {index} answered"));
        assert_eq!(status, 200, "connection {index}");
        assert_eq!(json_body(&body), json!({"status": "ok", "storage": "ok"}));
    }
    let first = server.metric("mesher_connections_accepted_total{shard=\"0\"}");
    let second = server.metric("mesher_connections_accepted_total{shard=\"1\"}");
    assert!(
        first >= 1.0 && second >= 1.0,
        "both shards accept: {first} and {second}"
    );
    assert!(first + second >= CONNECTIONS as f64, "{first} + {second}");
}

/// Reads one response whose whole head and body fit in a few reads: the status, or an error.
fn read_status_fast(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<u16, String> {
    buf.clear();
    let mut chunk = [0u8; 512];
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..head_end]).map_err(|e| e.to_string())?;
            let length: usize = header_value(head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + length {
                return head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad status line: {head}"));
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("closed".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn ten_thousand_keep_alive_connections_on_one_process() {
    const CONNECTIONS: usize = 10_000;
    const THREADS: usize = 4;
    // The test process needs one descriptor per connection; the server inherits the raised limit.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        assert!(
            limit.rlim_cur as usize > CONNECTIONS + 1000,
            "hard file limit {} too low",
            limit.rlim_max
        );
    }
    let server = Server::start();
    let addr = server.addr;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(move || -> (Vec<String>, Vec<TcpStream>) {
                let mut errors = Vec::new();
                let mut streams = Vec::with_capacity(CONNECTIONS / THREADS);
                for _ in 0..CONNECTIONS / THREADS {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(20)) {
                        Ok(stream) => {
                            stream
                                .set_read_timeout(Some(Duration::from_secs(30)))
                                .unwrap();
                            stream.set_nodelay(true).unwrap();
                            streams.push(stream);
                        }
                        Err(e) => errors.push(format!("connect: {e}")),
                    }
                }
                let mut buf = Vec::with_capacity(512);
                for round in 0..2 {
                    for stream in &mut streams {
                        if let Err(e) = stream.write_all(health_request()) {
                            errors.push(format!("round {round} write: {e}"));
                        }
                    }
                    for stream in &mut streams {
                        match read_status_fast(stream, &mut buf) {
                            Ok(200) => {}
                            Ok(status) => errors.push(format!("round {round}: status {status}")),
                            Err(e) => errors.push(format!("round {round} read: {e}")),
                        }
                    }
                }
                (errors, streams)
            })
        })
        .collect();
    let mut errors = Vec::new();
    let mut streams = Vec::new();
    for worker in workers {
        let (worker_errors, worker_streams) = worker.join().unwrap();
        errors.extend(worker_errors);
        streams.extend(worker_streams);
    }
    assert!(
        errors.is_empty(),
        "{} failures, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // All of them are still open at once.
    assert_eq!(streams.len(), CONNECTIONS);
    assert!(server.metric("mesher_connections_open{kind=\"http\"}") >= CONNECTIONS as f64);
    assert_eq!(server.get("/health", None).0, 200);
}
