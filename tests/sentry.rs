//! The Sentry-compatible endpoints over raw HTTP (PROTOCOL 8), for what SDKs rarely send:
//! hand-written envelopes, every body encoding, compression bombs, wrong keys and numbers,
//! retries, rate limits, CORS, and project numbers across the API. Both stores.

mod common;

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PYTHON_EXCEPTION: &str = include_str!("fixtures/sentry/python_exception.json");
const PYTHON_EXCEPTION_ID: &str = "0f3e5ac3e8bb4c1e9c4bd61e3aa8c2a1";
const MIB: usize = 1024 * 1024;
/// PROTOCOL 8: the decoded envelope and the body as sent are each at most this.
const ENVELOPE_BYTES_MAX: usize = 20 * MIB;

fn sentry_auth(key: &str) -> String {
    format!("Sentry sentry_key={key}, sentry_version=7, sentry_client=handmade/1.0")
}

fn envelope_path(project: &Project) -> String {
    format!("/api/{}/envelope/", project.number)
}

fn store_path(project: &Project) -> String {
    format!("/api/{}/store/", project.number)
}

/// POSTs `body` to `path` with the Sentry auth header of `key` and the extra headers.
fn post(
    server: &Server,
    path: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let auth = key.map(sentry_auth);
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(auth) = &auth {
        headers.push(("x-sentry-auth", auth));
    }
    server.request_with("POST", path, &headers, Some(body))
}

fn event(id: &str, message: &str) -> String {
    json!({"event_id": id, "level": "error", "platform": "python", "message": message}).to_string()
}

fn id(n: u32) -> String {
    format!("{n:032x}")
}

/// An envelope: the header line, then each item as (header, payload).
fn envelope(header: &str, items: &[(String, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(header.as_bytes());
    out.push(b'\n');
    for (item_header, payload) in items {
        out.extend_from_slice(item_header.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(payload);
        out.push(b'\n');
    }
    out
}

fn item(kind: &str, payload: &[u8]) -> (String, Vec<u8>) {
    (
        json!({"type": kind, "length": payload.len()}).to_string(),
        payload.to_vec(),
    )
}

fn items(list: &[(String, Vec<u8>)]) -> Vec<(String, &[u8])> {
    list.iter()
        .map(|(header, payload)| (header.clone(), payload.as_slice()))
        .collect()
}

fn assert_cors(reply: &HttpReply) {
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("*"),
        "{:?}",
        reply.headers
    );
    assert_eq!(
        reply.header("access-control-expose-headers"),
        Some("x-sentry-rate-limits, retry-after"),
        "{:?}",
        reply.headers
    );
}

fn assert_answered_id(reply: &HttpReply, expected: &str) {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json(), json!({ "id": expected }));
    assert_cors(reply);
}

fn error_of(reply: &HttpReply) -> String {
    reply.json()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {}", String::from_utf8_lossy(&reply.body)))
        .to_string()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn brotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = brotli::CompressorWriter::new(&mut out, 64 * 1024, 5, 22);
        encoder.write_all(data).unwrap();
    }
    out
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A session, a client report, an attachment (with newlines inside), a transaction and a type
/// no SDK sends yet, beside one event: all accepted, counted by type, only the event stored.
fn items_beside_an_event_are_accepted_and_only_the_event_is_stored(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Items");
    let event_id = id(1);
    let event_json = event(&event_id, "checkout failed");
    let list = [
        item(
            "session",
            br#"{"sid":"7c7b6f3a8e1d4f6b9a2c0d1e2f3a4b5c","status":"ok"}"#,
        ),
        item("event", event_json.as_bytes()),
        item("attachment", b"line one\nline two\n\nend"),
        item("transaction", br#"{"type":"transaction","spans":[]}"#),
        (
            r#"{"type":"client_report"}"#.to_string(),
            br#"{"discarded_events":[]}"#.to_vec(),
        ),
        (
            r#"{"type":"hologram"}"#.to_string(),
            br#"{"from":"the future"}"#.to_vec(),
        ),
    ];
    let body = envelope(
        &json!({"event_id": event_id, "sent_at": "2024-05-06T13:08:09Z"}).to_string(),
        &items(&list),
    );
    let reply = post(
        &server,
        &envelope_path(&project),
        Some(&project.ingest_key),
        &[],
        &body,
    );
    assert_answered_id(&reply, &event_id);

    let issues = server.all_issues(&project);
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0]["title"], "checkout failed");
    assert_eq!(issues[0]["event_count"], 1);
    server.store_reader().assert_event_rows(1);
    for (kind, count) in [
        ("event", 1.0),
        ("session", 1.0),
        ("attachment", 1.0),
        ("transaction", 1.0),
        ("client_report", 1.0),
        ("other", 1.0),
        ("sessions", 0.0),
    ] {
        let name = format!("mesher_sentry_items_total{{type=\"{kind}\"}}");
        assert_eq!(server.metric(&name), count, "{name}");
    }

    // An envelope with no event is answered `{}` and stores nothing.
    let only_session = envelope("{}", &items(&[item("session", br#"{"status":"exited"}"#)]));
    let reply = post(
        &server,
        &envelope_path(&project),
        Some(&project.ingest_key),
        &[],
        &only_session,
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({}));
    assert_cors(&reply);
    assert_eq!(server.metric("mesher_sentry_envelopes_total"), 2.0);
    assert_eq!(server.event_total(&project), 1);
}

/// Items without `length` run to the end of their line, and the last newline is optional.
fn items_without_length_and_without_the_last_newline(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Lengths");
    let first = format!(
        "{{}}\n{{\"type\":\"session\"}}\n{{\"status\":\"ok\"}}\n{{\"type\":\"event\"}}\n{}",
        event(&id(10), "no length, no last newline")
    );
    let second = format!(
        "{{\"event_id\":\"{}\"}}\n{{\"type\":\"event\",\"length\":{}}}\n{}",
        id(11),
        event(&id(11), "a length, no last newline").len(),
        event(&id(11), "a length, no last newline")
    );
    for (body, expected) in [(first, id(10)), (second, id(11))] {
        assert!(!body.ends_with('\n'));
        let reply = post(
            &server,
            &envelope_path(&project),
            Some(&project.ingest_key),
            &[],
            body.as_bytes(),
        );
        assert_answered_id(&reply, &expected);
    }
    let mut titles: Vec<String> = server
        .all_issues(&project)
        .iter()
        .map(|issue| issue["title"].as_str().unwrap().to_string())
        .collect();
    titles.sort();
    assert_eq!(
        titles,
        ["a length, no last newline", "no length, no last newline"]
    );
}

type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>, &'a str);
type Encoder = dyn Fn(&[u8]) -> Vec<u8>;

/// A malformed envelope or body is refused with a 400 that says what was wrong, and the server
/// goes on serving the same connection's neighbours.
fn malformed_envelopes_are_400_saying_why(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Malformed");
    let path = envelope_path(&project);
    let key = Some(project.ingest_key.as_str());
    // (what, body, extra headers, start of the error)
    let cases: [Case; 6] = [
        (
            "length past the end",
            b"{}\n{\"type\":\"event\",\"length\":500}\n{\"message\":\"short\"}\n".to_vec(),
            vec![],
            "invalid envelope: item 0 length 500 goes beyond the end of the body",
        ),
        (
            "header line not JSON",
            b"this is not json\n{\"type\":\"event\"}\n{}\n".to_vec(),
            vec![],
            "invalid envelope: ",
        ),
        (
            "item without type",
            b"{}\n{\"length\":2}\n{}\n".to_vec(),
            vec![],
            "invalid envelope: item 0 header has no type",
        ),
        (
            "event payload not an object",
            b"{}\n{\"type\":\"event\"}\n[1,2,3]\n".to_vec(),
            vec![],
            "invalid event: ",
        ),
        (
            "corrupt gzip",
            b"\x1f\x8b\x08\x00garbage garbage garbage".to_vec(),
            vec![("content-encoding", "gzip")],
            "invalid gzip body: ",
        ),
        (
            "envelope header event_id not an id",
            b"{\"event_id\":\"nope\"}\n".to_vec(),
            vec![],
            "invalid envelope: envelope header event_id",
        ),
    ];
    for (what, body, headers, expected) in cases {
        let reply = post(&server, &path, key, &headers, &body);
        assert_eq!(
            reply.status,
            400,
            "{what}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = error_of(&reply);
        assert!(error.starts_with(expected), "{what}: {error:?}");
        assert_cors(&reply);
    }
    assert_eq!(
        server.metric("mesher_sentry_rejections_total{reason=\"invalid_envelope\"}"),
        4.0
    );
    assert_eq!(
        server.metric("mesher_sentry_rejections_total{reason=\"invalid_event\"}"),
        1.0
    );
    assert_eq!(
        server.metric("mesher_sentry_rejections_total{reason=\"corrupt_body\"}"),
        1.0
    );
    // Still serving.
    let good = envelope(
        "{}",
        &items(&[item("event", event(&id(2), "fine").as_bytes())]),
    );
    assert_answered_id(&post(&server, &path, key, &[], &good), &id(2));
    assert_eq!(server.event_total(&project), 1);
}

/// A gibibyte of zeros, compressed, as each encoding.
fn bombs() -> &'static [(&'static str, Vec<u8>)] {
    static BOMBS: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    BOMBS.get_or_init(|| {
        fn feed(encoder: &mut dyn Write) {
            let zeros = vec![0u8; MIB];
            for _ in 0..1024 {
                encoder.write_all(&zeros).unwrap();
            }
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        feed(&mut gz);
        let mut br = Vec::new();
        {
            let mut encoder = brotli::CompressorWriter::new(&mut br, 64 * 1024, 1, 22);
            feed(&mut encoder);
        }
        let mut zs = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        feed(&mut zs);
        vec![
            ("gzip", gz.finish().unwrap()),
            ("br", br),
            ("zstd", zs.finish().unwrap()),
        ]
    })
}

/// 1 GiB of zeros in a small compressed body: refused with 413 as soon as 20 MiB are decoded,
/// quickly, without the server's memory growing towards the gibibyte. A body announced larger
/// than 20 MiB is refused before it is read.
fn compression_bombs_are_413_quickly_with_memory_flat(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Bombs");
    let path = envelope_path(&project);
    let rss_before = server.rss_bytes();
    for (encoding, bomb) in bombs() {
        assert!(
            bomb.len() < ENVELOPE_BYTES_MAX,
            "{encoding}: {} bytes",
            bomb.len()
        );
        let started = Instant::now();
        let reply = post(
            &server,
            &path,
            Some(&project.ingest_key),
            &[("content-encoding", encoding)],
            bomb,
        );
        let took = started.elapsed();
        assert_eq!(
            reply.status,
            413,
            "{encoding}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(
            error_of(&reply),
            format!("payload too large: over {ENVELOPE_BYTES_MAX} bytes decoded")
        );
        assert_cors(&reply);
        assert!(took < Duration::from_secs(5), "{encoding} took {took:?}");
    }
    // Each refusal decoded at most 20 MiB, which the allocator keeps for a while before it
    // gives it back; inflating any one bomb whole would take a gibibyte.
    let rss_after = server.rss_bytes();
    assert!(
        rss_after < rss_before + 256 * MIB as u64,
        "RSS grew from {} MiB to {} MiB",
        rss_before / MIB as u64,
        rss_after / MIB as u64
    );
    assert_eq!(
        server.metric("mesher_sentry_rejections_total{reason=\"too_large\"}"),
        3.0
    );
    assert_eq!(server.event_total(&project), 0);

    // Announced over the limit: 413 from the head alone, the body never read.
    let mut stream = server.connect();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\nx-sentry-auth: {}\r\ncontent-length: {}\r\n\r\n",
        sentry_auth(&project.ingest_key),
        ENVELOPE_BYTES_MAX + 1
    );
    send_raw(&mut stream, head.as_bytes());
    let (status, reply_head, body) = read_response(&mut stream).expect("413 answered");
    assert_eq!(status, 413, "{reply_head}");
    assert!(
        reply_head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: *"),
        "{reply_head}"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"error": "payload too large"})
    );
}

/// A `Content-Encoding` the server does not decode: 415 naming it. Every one it does decode
/// works for `store` bodies.
fn body_encodings_and_unknown_ones(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Encodings");
    let path = store_path(&project);
    let key = Some(project.ingest_key.as_str());
    let reply = post(
        &server,
        &path,
        key,
        &[("content-encoding", "snappy")],
        event(&id(3), "x").as_bytes(),
    );
    assert_eq!(reply.status, 415);
    assert!(
        error_of(&reply).contains("\"snappy\""),
        "{}",
        error_of(&reply)
    );
    assert_cors(&reply);

    let zlib = |data: &[u8]| {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    };
    let raw_deflate = |data: &[u8]| {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    };
    let encoders: [(&str, &Encoder); 6] = [
        ("identity", &|data: &[u8]| data.to_vec()),
        ("gzip", &gzip),
        ("deflate", &zlib),
        ("deflate", &raw_deflate),
        ("br", &brotli),
        ("zstd", &zstd),
    ];
    for (n, (encoding, encode)) in encoders.iter().enumerate() {
        let event_id = id(100 + n as u32);
        let body = encode(event(&event_id, "encoded").as_bytes());
        let reply = post(
            &server,
            &path,
            key,
            &[("content-encoding", encoding)],
            &body,
        );
        assert_answered_id(&reply, &event_id);
    }
    let issues = server.all_issues(&project);
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0]["event_count"], 6);
    for (encoding, count) in [
        ("identity", 1.0),
        ("gzip", 1.0),
        ("deflate", 2.0),
        ("br", 1.0),
        ("zstd", 1.0),
    ] {
        let name = format!("mesher_sentry_bodies_total{{encoding=\"{encoding}\"}}");
        assert_eq!(server.metric(&name), count, "{name}");
    }
    assert_eq!(server.metric("mesher_sentry_store_requests_total"), 6.0);
}

/// Browser SDKs: the preflight is answered 204 with what they may send, and every answer, the
/// key given in the query, carries the CORS headers.
fn cors_preflight_and_the_key_in_the_query(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Browser");
    let origin = ("origin", "https://shop.example");
    let reply = server.request_with(
        "OPTIONS",
        &envelope_path(&project),
        &[
            origin,
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type, x-sentry-auth",
            ),
        ],
        None,
    );
    assert_eq!(reply.status, 204);
    assert!(reply.body.is_empty());
    assert_cors(&reply);
    assert!(
        reply
            .header("access-control-allow-methods")
            .is_some_and(|methods| methods.contains("POST")),
        "{:?}",
        reply.headers
    );
    assert_eq!(
        reply.header("access-control-allow-headers"),
        Some("content-type, x-sentry-auth, authorization, content-encoding, sentry-trace, baggage")
    );

    let query = format!(
        "{}?sentry_version=7&sentry_key={}&sentry_client=sentry.javascript.browser%2F8.0.0",
        envelope_path(&project),
        project.ingest_key
    );
    let body = envelope(
        "{}",
        &items(&[item("event", event(&id(4), "in a browser").as_bytes())]),
    );
    let reply = server.request_with(
        "POST",
        &query,
        &[origin, ("content-type", "text/plain;charset=UTF-8")],
        Some(&body),
    );
    assert_answered_id(&reply, &id(4));
    // Refusals carry them too, so the browser can read why.
    let wrong = query.replace(&project.ingest_key, "mshr_unknown");
    let reply = server.request_with("POST", &wrong, &[origin], Some(&body));
    assert_eq!(reply.status, 401);
    assert_cors(&reply);
    // So does a method the Sentry paths do not take; other paths' 405s carry none.
    let reply = server.request_with("GET", &envelope_path(&project), &[origin], None);
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST, OPTIONS"));
    assert_cors(&reply);
    let reply = server.request_with("GET", "/api/v1/events", &[origin], None);
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("access-control-allow-origin"), None);
}

/// The key must be an ingest key of the project the number names: missing or unknown 401,
/// another project's or a dashboard key 403, an unknown number 404. The envelope header's
/// `dsn` may carry the key.
fn keys_and_numbers_decide_401_403_404(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Keys");
    let other = server.project("Other keys");
    let path = envelope_path(&project);
    let body = |n: u32| {
        envelope(
            "{}",
            &items(&[item("event", event(&id(n), "keys").as_bytes())]),
        )
    };
    let cases = [
        (Some(other.ingest_key.as_str()), 403, "forbidden"),
        (Some(project.dashboard_key.as_str()), 403, "forbidden"),
        (
            Some("mshr_000000000000000000000000000000000000000000000000"),
            401,
            "unauthorized",
        ),
        (None, 401, "unauthorized"),
    ];
    for (key, status, error) in cases {
        let reply = post(&server, &path, key, &[], &body(5));
        assert_eq!(reply.status, status, "{key:?}");
        assert_eq!(error_of(&reply), error);
        assert_cors(&reply);
    }
    let unknown = post(
        &server,
        "/api/999999/envelope/",
        Some(&project.ingest_key),
        &[],
        &body(5),
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(error_of(&unknown), "unknown project number 999999");
    let store_without_key = post(
        &server,
        &store_path(&project),
        None,
        &[],
        event(&id(5), "x").as_bytes(),
    );
    assert_eq!(store_without_key.status, 401);

    // The key in the envelope header's DSN, as some SDKs send it.
    let with_dsn = |dsn: &str, n: u32| {
        envelope(
            &json!({ "dsn": dsn, "event_id": id(n) }).to_string(),
            &items(&[item("event", event(&id(n), "from the dsn").as_bytes())]),
        )
    };
    assert_answered_id(
        &post(&server, &path, None, &[], &with_dsn(&project.dsn, 6)),
        &id(6),
    );
    let reply = post(&server, &path, None, &[], &with_dsn(&other.dsn, 7));
    assert_eq!(reply.status, 403);
    let reply = post(
        &server,
        &path,
        None,
        &[],
        &with_dsn("http://nokey.example/1", 8),
    );
    assert_eq!(reply.status, 401);
    // Other section 2 forms work here too.
    let bearer = format!("Bearer {}", project.ingest_key);
    let reply = post(
        &server,
        &path,
        None,
        &[("authorization", &bearer)],
        &body(9),
    );
    assert_answered_id(&reply, &id(9));
    assert_eq!(server.event_total(&project), 2);
    assert_eq!(server.event_total(&other), 0);
    assert_eq!(
        server.metric("mesher_sentry_rejections_total{reason=\"forbidden\"}"),
        3.0
    );
    assert_eq!(
        server.metric("mesher_sentry_rejections_total{reason=\"unknown_project\"}"),
        1.0
    );
}

/// SDKs send an event again when unsure it arrived: within five minutes the same id is
/// answered 200 with that id and counted once.
fn a_repeated_event_id_is_answered_and_counted_once(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Retries");
    let other = server.project("Other retries");
    let key = Some(project.ingest_key.as_str());
    let body = event(&id(20), "sent twice");
    for _ in 0..2 {
        let reply = post(&server, &store_path(&project), key, &[], body.as_bytes());
        assert_answered_id(&reply, &id(20));
    }
    // The id only in the envelope header; dashes allowed.
    let dashed = "00000000-0000-0000-0000-000000000021";
    let event_without_id = json!({"message": "sent twice"}).to_string();
    let with_header_id = envelope(
        &json!({ "event_id": dashed }).to_string(),
        &items(&[item("event", event_without_id.as_bytes())]),
    );
    for _ in 0..2 {
        let reply = post(&server, &envelope_path(&project), key, &[], &with_header_id);
        assert_answered_id(&reply, &id(0x21));
    }
    // The same id in another project is that project's own event.
    let reply = post(
        &server,
        &store_path(&other),
        Some(&other.ingest_key),
        &[],
        body.as_bytes(),
    );
    assert_answered_id(&reply, &id(20));
    assert_eq!(server.event_total(&project), 2);
    assert_eq!(server.event_total(&other), 1);
    server.store_reader().assert_event_rows(3);
    assert_eq!(
        server.metric("mesher_events_rejected_total{reason=\"duplicate\"}"),
        2.0
    );
    let events = server.store_reader().event_ids();
    assert!(
        events.contains("00000000-0000-0000-0000-000000000021"),
        "{events:?}"
    );
    // The window outlives a restart: the ids are read back with the projects.
    let server = server.restart_with(&[]);
    let reply = post(&server, &store_path(&project), key, &[], body.as_bytes());
    assert_answered_id(&reply, &id(20));
    assert_eq!(
        server.metric("mesher_events_rejected_total{reason=\"duplicate\"}"),
        1.0
    );
    server.store_reader().assert_event_rows(3);
}

/// Past the project's per-minute limit: 429 with Retry-After and Sentry's
/// `X-Sentry-Rate-Limits`, readable by browsers.
fn rate_limited_answers_carry_sentry_headers(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Limited");
    server.set_project(&project, json!({"rate_limit_per_minute": 1}));
    let key = Some(project.ingest_key.as_str());
    let mut limited = None;
    for n in 0..3 {
        let reply = post(
            &server,
            &store_path(&project),
            key,
            &[],
            event(&id(30 + n), "x").as_bytes(),
        );
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
        assert_answered_id(&reply, &id(30 + n));
    }
    let reply = limited.expect("a 429 within three events at one a minute");
    assert_eq!(reply.json(), json!({"error": "rate limited"}));
    assert_cors(&reply);
    let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        reply.header("x-sentry-rate-limits"),
        Some(format!("{retry_after}::project").as_str())
    );
    assert_eq!(
        server.metric("mesher_sentry_rejections_total{reason=\"rate_limited\"}"),
        1.0
    );
}

/// A dashboard watching the project gets the Sentry event as sent (decompressed), after the
/// issue it opened, and the project's number opens the stream.
fn the_stream_carries_the_sentry_event_as_sent(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Streamed");
    let mut ws = server
        .ws(&format!(
            "/stream/projects/{}?key={}",
            project.number, project.dashboard_key
        ))
        .expect("stream by number");
    assert_eq!(next_json(&mut ws)["type"], "issue_count");
    let body = envelope(
        &json!({"event_id": PYTHON_EXCEPTION_ID}).to_string(),
        &items(&[item("event", PYTHON_EXCEPTION.as_bytes())]),
    );
    let reply = post(
        &server,
        &envelope_path(&project),
        Some(&project.ingest_key),
        &[("content-encoding", "gzip")],
        &gzip(&body),
    );
    assert_answered_id(&reply, PYTHON_EXCEPTION_ID);
    let opened = next_json(&mut ws);
    assert_eq!(opened["type"], "issue");
    assert_eq!(opened["action"], "created");
    assert_eq!(opened["issue"]["title"], "KeyError: 'user_42'");
    let streamed = next_json(&mut ws);
    assert_eq!(streamed["type"], "event");
    assert_eq!(streamed["issue_id"], opened["issue_id"]);
    assert_eq!(
        streamed["event_id"].as_str().unwrap().replace('-', ""),
        PYTHON_EXCEPTION_ID
    );
    let sent: Value = serde_json::from_str(PYTHON_EXCEPTION).unwrap();
    assert_eq!(streamed["data"], sent);
    assert_eq!(next_json(&mut ws)["type"], "issue_count");
}

/// Numbers: assigned by the database in creation order, never reused (a restart included),
/// in project objects, usable wherever a project is named; DSNs in the answers that show an
/// ingest key, with the request's host; slugs never all digits.
fn project_numbers_and_dsns(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let admin = Some(ADMIN_TOKEN);
    let first = server.project("First");
    let second = server.project("Second");
    assert!(first.number >= 1 && second.number > first.number);
    assert_eq!(
        first.dsn,
        format!(
            "http://{}@{}/{}",
            first.ingest_key, server.addr, first.number
        )
    );

    let (status, body) = server.post(
        "/api/v1/projects",
        admin,
        &json!({"name": "x", "slug": "42"}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.post("/api/v1/projects", admin, &json!({"name": "2024"}));
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["slug"], "project-2024");

    // The Host header names the server in the DSN.
    let created = server.request_with(
        "POST",
        "/api/v1/projects",
        &[
            ("authorization", &format!("Bearer {ADMIN_TOKEN}")),
            ("host", "errors.example.com:9000"),
        ],
        Some(json!({"name": "Hosted"}).to_string().as_bytes()),
    );
    let hosted = created.json();
    assert_eq!(created.status, 201, "{hosted}");
    assert_eq!(
        hosted["dsn"],
        format!(
            "http://{}@errors.example.com:9000/{}",
            hosted["ingest_key"].as_str().unwrap(),
            hosted["number"]
        )
    );

    let (status, list) = server.get("/api/v1/projects", admin);
    assert_eq!(status, 200);
    let numbers: Vec<i64> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_i64().expect("number in project objects"))
        .collect();
    assert_eq!(numbers.len(), 4);
    assert!(
        numbers.windows(2).all(|pair| pair[0] < pair[1]),
        "{numbers:?}"
    );

    // The number names the project in the API: settings, keys, issues.
    let by_number = format!("/api/v1/projects/{}", second.number);
    let (status, patched) = server.patch(&by_number, admin, &json!({"name": "Second, renamed"}));
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["id"], second.id.as_str());
    assert_eq!(patched["number"], second.number);
    let (status, ingest) = server.post(
        &format!("{by_number}/keys"),
        admin,
        &json!({"scope": "ingest", "label": "ci"}),
    );
    assert_eq!(status, 201, "{ingest}");
    let new_key = ingest["key"].as_str().unwrap();
    assert_eq!(
        ingest["dsn"],
        format!("http://{new_key}@{}/{}", server.addr, second.number)
    );
    let (status, dashboard) = server.post(
        &format!("{by_number}/keys"),
        admin,
        &json!({"scope": "dashboard"}),
    );
    assert_eq!(status, 201);
    assert!(dashboard.get("dsn").is_none(), "{dashboard}");
    let body = envelope(
        "{}",
        &items(&[item("event", event(&id(40), "new key").as_bytes())]),
    );
    let reply = post(&server, &envelope_path(&second), Some(new_key), &[], &body);
    assert_answered_id(&reply, &id(40));
    let (status, issues) = server.get(&format!("{by_number}/issues"), Some(&second.dashboard_key));
    assert_eq!(status, 200, "{issues}");
    assert_eq!(issues["data"][0]["title"], "new key");

    // Numbers survive a restart and are not handed out again.
    let largest = *numbers.last().unwrap();
    let server = server.restart();
    let (_, list) = server.get("/api/v1/projects", admin);
    let again: Vec<i64> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_i64().unwrap())
        .collect();
    assert_eq!(again, numbers);
    let later = server.project("Later");
    assert!(later.number > largest, "{} after {largest}", later.number);
    let reply = post(&server, &envelope_path(&second), Some(new_key), &[], &body);
    assert_eq!(reply.status, 200);
}

on_both_backends!(
    items_beside_an_event_are_accepted_and_only_the_event_is_stored,
    items_without_length_and_without_the_last_newline,
    malformed_envelopes_are_400_saying_why,
    compression_bombs_are_413_quickly_with_memory_flat,
    body_encodings_and_unknown_ones,
    cors_preflight_and_the_key_in_the_query,
    keys_and_numbers_decide_401_403_404,
    a_repeated_event_id_is_answered_and_counted_once,
    rate_limited_answers_carry_sentry_headers,
    the_stream_carries_the_sentry_event_as_sent,
    project_numbers_and_dsns,
);

/// With `--ack durable`, an event the database refuses for good is answered 503, and its id is
/// not remembered: the SDK's retry is taken again (not answered as a copy of a stored event),
/// and stored once the database takes it.
#[test]
fn a_retry_after_a_refused_commit_is_taken_again() {
    let server = Server::start_with(Backend::Postgres, &["--ack", "durable"]);
    let project = server.project("Refused");
    let mut db = postgres::Client::connect(server.database_url.as_ref().unwrap(), postgres::NoTls)
        .expect("connect to the server's schema");
    // The database itself refuses the rows: a check that fails on the event's payload.
    db.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             RAISE EXCEPTION 'poison refused' USING ERRCODE = 'check_violation';
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW
             WHEN (NEW.payload LIKE '%poison%') EXECUTE FUNCTION refuse_poison();",
    )
    .unwrap();
    let key = Some(project.ingest_key.as_str());
    let body = event(&id(0x30), "poison");
    for _ in 0..2 {
        let reply = post(&server, &store_path(&project), key, &[], body.as_bytes());
        assert_eq!(
            reply.status,
            503,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
    }
    assert_eq!(
        server.metric("mesher_events_rejected_total{reason=\"duplicate\"}"),
        0.0
    );
    db.batch_execute("DROP TRIGGER refuse_poison ON events")
        .unwrap();
    let reply = post(&server, &store_path(&project), key, &[], body.as_bytes());
    assert_answered_id(&reply, &id(0x30));
    let events = server.store_reader().event_ids();
    assert!(
        events.contains("00000000-0000-0000-0000-000000000030"),
        "{events:?}"
    );
    // Now stored, a further copy is one.
    let reply = post(&server, &store_path(&project), key, &[], body.as_bytes());
    assert_answered_id(&reply, &id(0x30));
    server.store_reader().assert_event_rows(1);
}
