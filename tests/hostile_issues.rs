//! A client with the public ingest key cannot make the server hold unbounded issue memory:
//! titles are cut to 1,024 bytes, fingerprints are kept as a 16-byte hash, and a project has at
//! most `--max-issues-per-project` issues. Old stores are migrated so their issues keep grouping.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The most the server's resident memory may grow over its baseline with 1,000 issues opened by
/// events of a megabyte each (each issue held a megabyte title and twice the megabyte key before).
const RSS_GROWTH_MAX: u64 = 150 * 1024 * 1024;
/// The largest issues page (100 issues) allowed.
const PAGE_BYTES_MAX: usize = 1024 * 1024;
const TITLE_BYTES_MAX: usize = 1024;
/// Events with unique megabyte messages, each opening an issue.
const BIG_EVENTS: usize = 1_000;
/// Message bytes: the 1 MiB body limit less room for the JSON around it.
const BIG_MESSAGE_BYTES: usize = 1024 * 1024 - 64;

/// A message of `BIG_MESSAGE_BYTES` whose first characters make it unique.
fn big_message(n: usize) -> String {
    let mut message = format!("Big failure number {n:05} ");
    message.push_str(filler());
    message
}

/// The event of `big_message(n)`, written directly: escaping a megabyte per event through
/// `serde_json` would take the test longer than the server takes to ingest it.
fn big_event(n: usize) -> String {
    format!(r#"{{"message":"{}"}}"#, big_message(n))
}

fn filler() -> &'static str {
    static FILLER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FILLER.get_or_init(|| "x".repeat(BIG_MESSAGE_BYTES - 25))
}

/// Walks every issues page of the project (limit=100); checks each answer's size and returns
/// the issues.
fn walk_issues(server: &Server, project: &Project) -> Vec<Value> {
    let mut issues = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/projects/{}/issues?limit=100", project.id);
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let reply = server.request("GET", &path, Some(&project.dashboard_key), None);
        assert_eq!(reply.status, 200);
        assert!(
            reply.body.len() < PAGE_BYTES_MAX,
            "an issues page of {} bytes",
            reply.body.len()
        );
        let page = reply.json();
        issues.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return issues,
        }
    }
}

fn check_titles(issues: &[Value]) {
    assert_eq!(issues.len(), BIG_EVENTS + 1, "one issue per unique message");
    for issue in issues {
        let title = issue["title"].as_str().unwrap();
        assert!(
            title.len() <= TITLE_BYTES_MAX,
            "a title of {} bytes",
            title.len()
        );
        if let Some(number) = title.strip_prefix("Big failure number ") {
            let n: usize = number[..5].parse().unwrap();
            assert!(big_message(n).starts_with(title));
            assert_eq!(title.len(), TITLE_BYTES_MAX, "cut no shorter than needed");
        } else {
            assert_eq!(title, "warm-up");
        }
    }
}

fn big_unique_messages_keep_memory_and_pages_bounded(backend: Backend) {
    // The default acknowledgement: megabyte payloads may wait for storage, up to the queue's
    // byte bound (64 MiB), beside what the issues hold.
    let server = Server::start_with(backend, &[]);
    let project = server.project("Big messages");
    let (status, warm_up) = server.event(&project.ingest_key, &json!({"message": "warm-up"}));
    assert_eq!(status, 202, "{warm_up}");
    let baseline = server.rss_bytes();

    let agent = http_agent();
    let url = server.url("/api/v1/events");
    let bearer = format!("Bearer {}", project.ingest_key);
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let mut first_issue_id = String::new();
    for n in 0..BIG_EVENTS {
        let body = big_event(n);
        assert!(body.len() <= 1024 * 1024);
        // A storage queue at its byte bound answers 503 with Retry-After; an SDK sends again.
        let reply = loop {
            let reply = http_exchange(&agent, "POST", &url, &headers, Some(body.as_bytes()));
            if reply.status != 503 {
                break reply;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(reply.status, 202, "event {n}: {:?}", reply.json());
        if n == 0 {
            first_issue_id = reply.json()["issue_id"].as_str().unwrap().to_string();
        }
    }
    let grown = server.rss_bytes().saturating_sub(baseline);
    eprintln!(
        "{backend:?}: resident memory {} MiB at start, +{} MiB with {BIG_EVENTS} issues",
        baseline >> 20,
        grown >> 20
    );
    assert!(
        grown < RSS_GROWTH_MAX,
        "resident memory grew {} MiB with {BIG_EVENTS} issues",
        grown >> 20
    );
    check_titles(&walk_issues(&server, &project));

    let server = server.restart();
    let reloaded = server.rss_bytes().saturating_sub(baseline);
    eprintln!("{backend:?}: +{} MiB after the restart", reloaded >> 20);
    assert!(
        reloaded < RSS_GROWTH_MAX,
        "resident memory after the restart is {} MiB over the first baseline",
        reloaded >> 20
    );
    check_titles(&walk_issues(&server, &project));
    // The same key after the restart still finds its issue.
    let body = big_event(0);
    let reply = http_exchange(
        &http_agent(),
        "POST",
        &server.url("/api/v1/events"),
        &headers,
        Some(body.as_bytes()),
    );
    assert_eq!(reply.status, 202);
    assert_eq!(reply.json()["issue_id"], first_issue_id.as_str());
}

fn titles_are_cut_at_a_character_boundary(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Wide characters");
    // 1 + 2 * 600 bytes: the 1,024th byte is the first half of a character.
    let message = format!("a{}", "é".repeat(600));
    let (status, body) = server.event(&project.ingest_key, &json!({ "message": message }));
    assert_eq!(status, 202, "{body}");
    let server = server.restart();
    let issues = server.all_issues(&project);
    let title = issues[0]["title"].as_str().unwrap();
    assert_eq!(title.len(), TITLE_BYTES_MAX - 1);
    assert!(message.starts_with(title));
}

fn issue_limit(server: &Server) -> f64 {
    server.metric("mesher_events_rejected_total{reason=\"issue_limit\"}")
}

/// The answer to an event past a limit of 5 issues; `index` in a bulk request or array frame.
fn server_error_at(index: Option<usize>) -> Value {
    let at = index.map(|i| format!("index {i}: ")).unwrap_or_default();
    json!({
        "error": format!(
            "issue limit reached: {at}the project has its maximum of 5 issues; \
             events of existing issues are still accepted"
        )
    })
}

fn assert_refused_at_the_limit(reply: (u16, Value), index: Option<usize>) {
    let (status, body) = reply;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body, server_error_at(index));
}

fn new_issues_past_the_limit_are_refused(backend: Backend) {
    let server = Server::start_with(backend, &["--max-issues-per-project", "5"]);
    let project = server.project("Capped");
    let other = server.project("Other");
    let key = &project.ingest_key;
    let mut ids = Vec::new();
    for n in 0..5 {
        let (status, body) = server.event(key, &json!({ "message": format!("failure {n}") }));
        assert_eq!(status, 202, "{body}");
        ids.push(body["issue_id"].as_str().unwrap().to_string());
    }
    assert_refused_at_the_limit(server.event(key, &json!({"message": "failure 5"})), None);
    assert_eq!(issue_limit(&server), 1.0);

    // An event of an existing issue still counts.
    let (status, body) = server.event(key, &json!({"message": "FAILURE 3"}));
    assert_eq!(
        (status, body["issue_id"].as_str()),
        (202, Some(ids[3].as_str()))
    );
    // A bulk request with a new issue past the limit is refused whole, naming the event.
    let bulk = json!([{"message": "failure 1"}, {"message": "failure 6"}]);
    assert_refused_at_the_limit(
        server.post("/api/v1/events/bulk", Some(key), &bulk),
        Some(1),
    );
    assert_eq!(
        issue_limit(&server),
        3.0,
        "both events of the bulk request counted"
    );
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(key),
        &json!([{"message": "failure 1"}, {"message": "failure 2"}]),
    );
    assert_eq!(status, 202, "{body}");
    // The ingest socket answers its frames the same way.
    let mut socket = server
        .ws(&format!("/ingest?key={key}"))
        .expect("ingest socket");
    let mut frame = |event: Value| {
        socket
            .send(tungstenite::Message::text(event.to_string()))
            .unwrap();
        next_json(&mut socket)
    };
    assert_eq!(
        frame(json!([{"message": "failure 6"}])),
        server_error_at(Some(0))
    );
    assert_eq!(
        frame(json!({"message": "failure 6"})),
        server_error_at(None)
    );
    let accepted = frame(json!({"message": "failure 0"}));
    assert_eq!(accepted["issue_id"].as_str(), Some(ids[0].as_str()));
    assert_eq!(issue_limit(&server), 5.0);
    // Another project has its own limit.
    let (status, _) = server.event(&other.ingest_key, &json!({"message": "failure 5"}));
    assert_eq!(status, 202);

    let counts = |server: &Server| -> Vec<(String, u64)> {
        let mut issues: Vec<(String, u64)> = server
            .all_issues(&project)
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_string(),
                    i["event_count"].as_u64().unwrap(),
                )
            })
            .collect();
        issues.sort();
        issues
    };
    let mut expected: Vec<(String, u64)> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id.clone(), [2, 2, 2, 2, 1][n]))
        .collect();
    expected.sort();
    assert_eq!(counts(&server), expected, "refused events were not counted");
    let mut store = server.store_reader();
    store.assert_event_rows(5 + 1 + 2 + 1 + 1);

    let server = server.restart();
    assert_refused_at_the_limit(server.event(key, &json!({"message": "failure 7"})), None);
    let (status, body) = server.event(key, &json!({"message": "failure 4"}));
    assert_eq!(
        (status, body["issue_id"].as_str()),
        (202, Some(ids[4].as_str()))
    );
    assert_eq!(counts(&server).len(), 5);
}

/// Puts the store's issues table back as it was before fingerprints were hashed: the key itself
/// in a `fingerprint` column (every issue gets `key`), a `title` of `title`, the migration unrecorded.
fn store_as_before_hashing(server: &Server, key: &str, title: &str) {
    match server.store_reader() {
        StoreReader::Sqlite(connection) => connection
            .execute_batch(&format!(
                "CREATE TABLE issues_old (
                    id BLOB PRIMARY KEY NOT NULL,
                    project_id BLOB NOT NULL REFERENCES projects (id),
                    fingerprint TEXT NOT NULL,
                    title TEXT NOT NULL,
                    level TEXT NOT NULL,
                    status TEXT NOT NULL
                        CHECK (status IN ('unresolved', 'resolved', 'archived', 'discarded')),
                    event_count INTEGER NOT NULL CHECK (event_count >= 0),
                    first_seen_us INTEGER NOT NULL,
                    last_seen_us INTEGER NOT NULL,
                    UNIQUE (project_id, fingerprint)
                ) STRICT;
                INSERT INTO issues_old SELECT id, project_id, '{key}', '{title}', level, status,
                    event_count, first_seen_us, last_seen_us FROM issues;
                DROP TABLE issues;
                ALTER TABLE issues_old RENAME TO issues;
                DELETE FROM schema_migrations WHERE version = 3;"
            ))
            .unwrap(),
        StoreReader::Postgres(mut client) => client
            .batch_execute(&format!(
                "ALTER TABLE issues ADD COLUMN fingerprint text;
                UPDATE issues SET fingerprint = '{key}', title = '{title}';
                ALTER TABLE issues ALTER COLUMN fingerprint SET NOT NULL;
                DROP INDEX issues_project_id_fingerprint_hash;
                ALTER TABLE issues DROP COLUMN fingerprint_hash;
                CREATE UNIQUE INDEX issues_project_id_fingerprint
                    ON issues (project_id, md5(fingerprint));
                DELETE FROM schema_migrations WHERE version = 2;"
            ))
            .unwrap(),
    }
}

fn issues_of_an_old_store_keep_grouping(backend: Backend) {
    let mut server = Server::start_with(backend, &[]);
    let project = server.project("Old store");
    let key = &project.ingest_key;
    let (status, body) = server.event(key, &json!({"message": "Old Boom"}));
    assert_eq!(status, 202, "{body}");
    let issue_id = body["issue_id"].as_str().unwrap().to_string();
    let assert_in_old_issue = |server: &Server, message: &str| {
        let (status, body) = server.event(key, &json!({ "message": message }));
        assert_eq!(
            (status, body["issue_id"].as_str()),
            (202, Some(issue_id.as_str())),
            "{message}: {body}"
        );
    };
    assert!(
        server.terminate().success(),
        "clean shutdown: {}",
        server.log()
    );
    let long_title = "t".repeat(5000);
    store_as_before_hashing(&server, "msg:old boom", &long_title);

    // Already stopped: this only starts it again, which migrates the store.
    let server = server.kill_and_restart();
    assert_in_old_issue(&server, "old boom");
    let (status, body) = server.event(key, &json!({"message": "New Boom"}));
    assert_eq!(status, 202);
    assert_ne!(body["issue_id"].as_str(), Some(issue_id.as_str()));
    let (status, old) = server.get(
        &format!("/api/v1/issues/{issue_id}"),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200);
    assert_eq!(old["event_count"], 2);
    assert_eq!(old["title"].as_str(), Some(&long_title[..TITLE_BYTES_MAX]));

    // And again after a restart on the migrated store.
    let server = server.restart();
    assert_in_old_issue(&server, "OLD BOOM");
}

/// Megabyte events that arrive faster than storage takes them wait within the queue's byte
/// bound; past it they are refused (503), not held.
fn megabyte_events_wait_within_the_queue_byte_bound(backend: Backend) {
    let server = Server::start_with(
        backend,
        &["--queue-bytes", "3000000", "--flush-interval-ms", "5000"],
    );
    let project = server.project("Queue bytes");
    let agent = http_agent();
    let url = server.url("/api/v1/events");
    let bearer = format!("Bearer {}", project.ingest_key);
    let headers = [("authorization", bearer.as_str())];
    let send = |n: usize| {
        http_exchange(
            &agent,
            "POST",
            &url,
            &headers,
            Some(big_event(n).as_bytes()),
        )
    };
    assert_eq!(send(0).status, 202);
    assert_eq!(send(1).status, 202);
    // Two megabytes wait for the flush five seconds away; a third would pass 3,000,000 bytes.
    let refused = send(2);
    assert_eq!(refused.status, 503, "{:?}", refused.json());
    assert_eq!(refused.json(), json!({"error": "overloaded"}));
    assert!(refused.header("retry-after").is_some());
    let queued = server.metric("mesher_storage_queue_bytes");
    assert!(
        (2_000_000.0..3_000_000.0).contains(&queued),
        "{queued} bytes queued"
    );
    assert_eq!(
        server.metric("mesher_events_rejected_total{reason=\"overloaded\"}"),
        1.0
    );
    // Once they are written there is room again, and nothing accepted was lost.
    assert!(wait_until(Duration::from_secs(30), || server
        .metric("mesher_storage_queue_bytes")
        == 0.0));
    assert_eq!(send(2).status, 202);
    let mut stored = server.store_reader();
    assert!(wait_until(Duration::from_secs(30), || stored.event_rows() == 3));
}

on_both_backends!(
    megabyte_events_wait_within_the_queue_byte_bound,
    big_unique_messages_keep_memory_and_pages_bounded,
    titles_are_cut_at_a_character_boundary,
    new_issues_past_the_limit_are_refused,
    issues_of_an_old_store_keep_grouping,
);
