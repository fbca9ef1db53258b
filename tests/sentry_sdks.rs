//! Real Sentry SDKs against the real server (PROTOCOL 8): small applications using the
//! unmodified Python SDK (with and without the `brotli` package) and Node SDK, configured with
//! the DSN that project creation answered, checked through the REST API, the stream and
//! `/metrics`.
//!
//! The SDKs are installed under `target/sdks/` by `scripts/sdks.sh` (which `scripts/test.sh`
//! sources); run these tests through it, or source it first.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Longest an SDK application may run (it flushes with a 20 s timeout of its own).
const APP_TIMEOUT: Duration = Duration::from_secs(60);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sentry_sdk")
        .join(name)
}

/// An installed SDK path: the variable `scripts/sdks.sh` exports, else its default place.
fn sdk_path(variable: &str, default_under_sdks: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/sdks")
                .join(default_under_sdks)
        });
    assert!(
        path.exists(),
        "{} is missing: run the tests through scripts/test.sh, or `source scripts/sdks.sh` first",
        path.display()
    );
    path
}

fn python_with_brotli() -> PathBuf {
    sdk_path(
        "MESHER_TEST_SENTRY_PYTHON_BROTLI",
        "python-brotli/bin/python",
    )
}

fn python_without_brotli() -> PathBuf {
    sdk_path("MESHER_TEST_SENTRY_PYTHON_GZIP", "python-gzip/bin/python")
}

/// Runs a command to its end (bounded), failing the test with its output if it fails.
fn run(mut command: Command) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start the SDK application");
    let deadline = Instant::now() + APP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{command:?} ran longer than {APP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "{command:?} failed ({status}):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn run_python(python: &Path, dsn: &str, scenario: &[&str]) {
    let mut command = Command::new(python);
    command.arg(fixture("app.py")).arg(dsn).args(scenario);
    run(command);
}

fn run_node(dsn: &str) {
    let modules = sdk_path("MESHER_TEST_SENTRY_NODE_MODULES", "node/node_modules");
    let mut command = Command::new("node");
    command
        .arg(fixture("app.js"))
        .arg(dsn)
        .env("NODE_PATH", modules);
    run(command);
}

/// Each issue's title and event count, in the order given.
fn event_counts<T>(issues: &[(String, u64, T)]) -> Vec<(&str, u64)> {
    issues
        .iter()
        .map(|(title, count, _)| (title.as_str(), *count))
        .collect()
}

/// The project's issues by title, with their event counts.
fn issues_by_title(server: &Server, project: &Project) -> Vec<(String, u64, String)> {
    let mut issues: Vec<(String, u64, String)> = server
        .all_issues(project)
        .iter()
        .map(|issue| {
            (
                issue["title"].as_str().unwrap().to_string(),
                issue["event_count"].as_u64().unwrap(),
                issue["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    issues.sort();
    issues
}

/// The stored events of an issue, newest first, as the events API returns them.
fn stored_events(server: &Server, project: &Project, issue_id: &str) -> Vec<Value> {
    let (status, body) = server.get(
        &format!("/api/v1/issues/{issue_id}/events"),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().unwrap().clone()
}

/// A stream subscriber with an environment filter in effect.
fn subscriber_for(server: &Server, project: &Project, environment: &str) -> Ws {
    let (mut ws, first) = server.subscribe(project);
    assert_eq!(first["type"], "issue_count", "{first}");
    let subscribe = json!({"type": "subscribe", "filters": {"environment": environment}});
    ws.send(tungstenite::Message::text(subscribe.to_string()))
        .unwrap();
    let reply = next_json(&mut ws);
    assert_eq!(reply["type"], "filters_updated", "{reply}");
    ws
}

fn sentry_metric(server: &Server, name: &str) -> f64 {
    server.metric(name)
}

/// The Python SDK, as an application uses it: exceptions and log messages grouped by Sentry's
/// rules, environment, release and tags kept, the stream in order and filterable by
/// environment, brotli bodies.
fn python_sdk_events_group_stream_and_keep_their_fields(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Python Shop");
    assert!(
        project
            .dsn
            .ends_with(&format!("@{}/{}", server.addr, project.number)),
        "{}",
        project.dsn
    );
    let mut production = subscriber_for(&server, &project, "production");
    let mut staging = subscriber_for(&server, &project, "staging");

    run_python(&python_with_brotli(), &project.dsn, &["grouping"]);

    // Two ZeroDivisionErrors from one place, one ValueError, KeyError('a') and ('b') from one
    // place, and one log template with two users: four issues.
    let issues = issues_by_title(&server, &project);
    let summary = event_counts(&issues);
    assert_eq!(
        summary,
        [
            ("KeyError: 'a'", 2),
            (
                "ValueError: invalid literal for int() with base 10: 'not a number'",
                1
            ),
            ("ZeroDivisionError: division by zero", 2),
            ("user bob not found", 2),
        ],
        "{issues:?}"
    );

    // What the application set is in the stored event as it sent it.
    let zero_division = &issues[2].2;
    let events = stored_events(&server, &project, zero_division);
    assert_eq!(events.len(), 2);
    for event in &events {
        let data = &event["data"];
        assert_eq!(data["environment"], "production", "{data}");
        assert_eq!(data["release"], "shop@1.2.3", "{data}");
        assert_eq!(data["tags"]["tenant"], "acme", "{data}");
        assert_eq!(data["platform"], "python", "{data}");
        // The event is stored under the id the SDK gave it.
        let sent_id = data["event_id"].as_str().unwrap();
        assert_eq!(event["id"].as_str().unwrap().replace('-', ""), sent_id);
    }
    let logged = stored_events(&server, &project, &issues[3].2);
    let templates: Vec<&Value> = logged.iter().map(|e| &e["data"]["logentry"]).collect();
    assert!(
        templates
            .iter()
            .all(|t| t["message"] == "user %s not found"),
        "{templates:?}"
    );

    // The production dashboard saw, in order, for each new issue: issue created, its event,
    // the new count; and each later event of a known issue alone.
    let expected = [
        ("issue", "ZeroDivisionError: division by zero"),
        ("event", ""),
        ("issue_count", "1"),
        ("event", ""),
        (
            "issue",
            "ValueError: invalid literal for int() with base 10: 'not a number'",
        ),
        ("event", ""),
        ("issue_count", "2"),
        ("issue", "KeyError: 'a'"),
        ("event", ""),
        ("issue_count", "3"),
        ("event", ""),
        ("issue", "user bob not found"),
        ("event", ""),
        ("issue_count", "4"),
        ("event", ""),
    ];
    let mut current_issue = String::new();
    let mut previous_kind = "";
    let mut streamed_events = Vec::new();
    for (kind, detail) in expected {
        let message = next_json(&mut production);
        assert_eq!(message["type"], kind, "expected {kind} {detail}: {message}");
        match kind {
            "issue" => {
                assert_eq!(message["action"], "created", "{message}");
                assert_eq!(message["issue"]["title"], detail, "{message}");
                current_issue = message["issue_id"].as_str().unwrap().to_string();
            }
            "issue_count" => assert_eq!(message["count"].to_string(), detail, "{message}"),
            _ => {
                assert_eq!(message["data"]["environment"], "production");
                if previous_kind == "issue" {
                    // The event that opened the issue comes right after it.
                    assert_eq!(message["issue_id"], current_issue.as_str(), "{message}");
                }
                streamed_events.push(message);
            }
        }
        previous_kind = kind;
    }
    // The streamed `data` is the event JSON as sent: the same document that was stored.
    let first = &streamed_events[0];
    let stored = events
        .iter()
        .find(|event| event["id"] == first["event_id"])
        .expect("the first streamed event is stored");
    assert_eq!(first["data"], stored["data"]);

    // The staging dashboard's filter let no event or issue message through; the counts are
    // not filtered.
    staging
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(tungstenite::Message::Text(text)) = staging.read() {
        let message: Value = serde_json::from_str(&text).unwrap();
        seen.push(message["type"].as_str().unwrap().to_string());
    }
    assert_eq!(
        seen, ["issue_count"; 4],
        "the staging dashboard got {seen:?}"
    );

    // With `brotli` importable the SDK compresses with it, every envelope.
    let envelopes = sentry_metric(&server, "mesher_sentry_envelopes_total");
    assert!(envelopes >= 7.0, "{envelopes} envelopes");
    assert_eq!(
        sentry_metric(&server, "mesher_sentry_bodies_total{encoding=\"br\"}"),
        envelopes
    );
    assert_eq!(
        sentry_metric(&server, "mesher_sentry_items_total{type=\"event\"}"),
        7.0
    );
    assert!(sentry_metric(&server, "mesher_sentry_decompressed_bytes_total") > 7000.0);
}

/// Without the `brotli` package the SDK sends gzip, which arrives just as well.
fn python_sdk_without_brotli_sends_gzip(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Gzip Shop");
    run_python(&python_without_brotli(), &project.dsn, &["one"]);
    let issues = issues_by_title(&server, &project);
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(
        (issues[0].0.as_str(), issues[0].1),
        ("ZeroDivisionError: division by zero", 1)
    );
    let envelopes = sentry_metric(&server, "mesher_sentry_envelopes_total");
    assert!(envelopes >= 1.0);
    assert_eq!(
        sentry_metric(&server, "mesher_sentry_bodies_total{encoding=\"gzip\"}"),
        envelopes
    );
    assert_eq!(
        sentry_metric(&server, "mesher_sentry_bodies_total{encoding=\"br\"}"),
        0.0
    );
}

/// A project limited to one event a minute: the SDK gets one 429 with `X-Sentry-Rate-Limits`,
/// then keeps the rest of its events to itself instead of sending them.
fn python_sdk_backs_off_after_a_rate_limit(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Limited Shop");
    server.set_project(&project, json!({"rate_limit_per_minute": 1}));
    let captures = 20;
    run_python(
        &python_with_brotli(),
        &project.dsn,
        &["flood", &captures.to_string()],
    );
    let limited = sentry_metric(
        &server,
        "mesher_sentry_rejections_total{reason=\"rate_limited\"}",
    );
    let sent = sentry_metric(&server, "mesher_sentry_items_total{type=\"event\"}");
    assert_eq!(limited, 1.0, "one 429, after which the SDK stops sending");
    // One accepted, one refused: unless a new minute began between the two, which lets one
    // more through before the 429.
    assert!(
        (2.0..=3.0).contains(&sent),
        "{sent} of {captures} events sent"
    );
    let stored = server.event_total(&project);
    assert!((1..=2).contains(&stored), "{stored} events stored");
}

/// The Node SDK (key in the query string, a chunked body without Content-Type): errors thrown
/// at one place are one issue, another type another; environment, release and tags are kept.
fn node_sdk_events_group_and_keep_their_fields(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Node Shop");
    run_node(&project.dsn);
    let issues = issues_by_title(&server, &project);
    let summary = event_counts(&issues);
    assert_eq!(
        summary,
        [
            ("RangeError: Invalid array length", 1),
            (
                "TypeError: Cannot read properties of null (reading 'name')",
                2
            ),
        ],
        "{issues:?}"
    );
    for event in stored_events(&server, &project, &issues[1].2) {
        let data = &event["data"];
        assert_eq!(data["environment"], "production", "{data}");
        assert_eq!(data["release"], "shop@1.2.3", "{data}");
        assert_eq!(data["tags"]["tenant"], "acme", "{data}");
        assert_eq!(data["platform"], "node", "{data}");
    }
    assert_eq!(
        sentry_metric(&server, "mesher_sentry_items_total{type=\"event\"}"),
        3.0
    );
}

on_both_backends!(
    python_sdk_events_group_stream_and_keep_their_fields,
    python_sdk_without_brotli_sends_gzip,
    python_sdk_backs_off_after_a_rate_limit,
    node_sdk_events_group_and_keep_their_fields,
);
