//! Grouping, the issue lifecycle and the issues API (PROTOCOL sections 4 and 5), each test on
//! SQLite and PostgreSQL.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{json, Value};

on_both_backends!(
    grouping_follows_the_four_rules,
    titles_and_levels_come_from_the_first_event,
    lifecycle_regression_archive_discard,
    issue_routes_refuse_unknown_malformed_and_foreign_ids,
    listing_filters_and_cursor_pagination,
    issue_events_newest_first_with_limit,
    event_timestamps_set_first_and_last_seen,
);

/// Sends one event and returns its issue id.
fn issue_of(server: &Server, project: &Project, event: Value) -> String {
    let (status, body) = server.event(&project.ingest_key, &event);
    assert_eq!(status, 202, "{event}: {body}");
    assert_eq!(body["status"], "accepted", "{body}");
    body["issue_id"].as_str().unwrap().to_string()
}

fn get_issue(server: &Server, project: &Project, id: &str) -> Value {
    let (status, issue) = server.get(
        &format!("/api/v1/issues/{id}"),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200, "{issue}");
    issue
}

fn action(server: &Server, project: &Project, id: &str, name: &str) -> (u16, Value) {
    server.post(
        &format!("/api/v1/issues/{id}/{name}"),
        Some(&project.dashboard_key),
        &json!({}),
    )
}

fn event_ids_of(server: &Server, project: &Project, issue_id: &str, query: &str) -> Vec<String> {
    let (status, body) = server.get(
        &format!("/api/v1/issues/{issue_id}/events{query}"),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

fn grouping_follows_the_four_rules(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Grouping");
    let issue = |event: Value| issue_of(&server, &project, event);
    let frames = |line: u32, column: u32| {
        json!([
            {"filename": "app.js", "function_name": "checkout", "lineno": line, "colno": column, "in_app": true},
            {"filename": "lib.js", "function_name": "pay", "lineno": line + 10, "colno": column, "context_line": "pay()"}
        ])
    };

    // 1. A custom fingerprint wins over everything; an array is joined with "\n".
    let custom = issue(json!({"message": "first text", "fingerprint": "checkout-flow"}));
    assert_eq!(
        issue(
            json!({"message": "other text", "fingerprint": "checkout-flow", "stacktrace": frames(1, 1),
            "exception": {"type_name": "E", "value": "v"}})
        ),
        custom
    );
    let joined = issue(json!({"message": "m", "fingerprint": ["part-a", "part-b"]}));
    assert_eq!(
        issue(json!({"message": "n", "fingerprint": "part-a\npart-b"})),
        joined
    );
    assert_ne!(
        issue(json!({"message": "m", "fingerprint": ["part-a part-b"]})),
        joined
    );
    assert_ne!(
        issue(json!({"message": "first text", "fingerprint": "Checkout-Flow"})),
        custom,
        "custom keys are not normalised"
    );

    // 2. A stack trace: files and functions in order, plus the normalised message.
    let stacked = issue(
        json!({"message": "Card declined at 0xDEAD", "stacktrace": frames(10, 5),
        "exception": {"type_name": "CardError", "value": "one"}}),
    );
    assert_eq!(
        issue(
            json!({"message": "card DECLINED at dead ", "stacktrace": frames(99, 42),
            "exception": {"type_name": "OtherError", "value": "two"}})
        ),
        stacked,
        "line and column numbers and the exception do not count"
    );
    assert_ne!(
        issue(json!({"message": "Card declined at 0xDEAD", "stacktrace": [
        {"filename": "app.js", "function_name": "checkout"}, {"filename": "lib.js", "function_name": "refund"}]})),
        stacked
    );
    assert_ne!(
        issue(json!({"message": "Card declined at 0xDEAD", "stacktrace": [
        {"filename": "lib.js", "function_name": "pay"}, {"filename": "app.js", "function_name": "checkout"}]})),
        stacked,
        "frame order counts"
    );
    assert_ne!(
        issue(json!({"message": "Card accepted", "stacktrace": frames(10, 5)})),
        stacked
    );

    // 3. An exception: type and normalised value; the message does not count.
    let exception = issue(
        json!({"message": "one", "exception": {"type_name": "TypeError", "value": "Bad pointer 0x7F3A"}}),
    );
    assert_eq!(
        issue(
            json!({"message": "two", "exception": {"type_name": "TypeError", "value": "  bad POINTER 7f3a"}})
        ),
        exception
    );
    assert_eq!(
        issue(
            json!({"message": "three", "stacktrace": [], "exception": {"type_name": "TypeError", "value": "bad pointer 0x7f3a"}})
        ),
        exception,
        "an empty stack trace does not count"
    );
    assert_ne!(
        issue(json!({"exception": {"type_name": "RangeError", "value": "Bad pointer 0x7F3A"}})),
        exception
    );
    assert_ne!(
        issue(json!({"exception": {"type_name": "TypeError", "value": "Bad pointer 0x7F3B"}})),
        exception
    );

    // 4. The message alone, normalised: lowercase, every 0x removed, trimmed.
    let message = issue(json!({"message": "Timeout at 0xFF after 0x10 tries"}));
    assert_eq!(
        issue(json!({"message": "  timeout AT ff after 10 TRIES\n"})),
        message
    );
    assert_eq!(
        issue(json!({"message": "TIMEOUT AT 0XFF AFTER 0X10 TRIES", "level": "info"})),
        message
    );
    assert_ne!(
        issue(json!({"message": "Timeout at 0xFE after 0x10 tries"})),
        message
    );
    assert_ne!(
        issue(json!({"message": "Timeout  at 0xFF after 0x10 tries"})),
        message,
        "inner spaces count"
    );

    // The keys are exactly the texts PROTOCOL spells out: a custom fingerprint equal to a
    // derived key lands in that key's issue.
    for (key, expected) in [
        ("app.js|checkout;lib.js|pay:card declined at dead", &stacked),
        ("TypeError:bad pointer 7f3a", &exception),
        ("msg:timeout at ff after 10 tries", &message),
    ] {
        assert_eq!(
            &issue(json!({"message": "spelled out", "fingerprint": key})),
            expected,
            "{key}"
        );
    }

    // The same event in another project is another issue.
    let other = server.project("Grouping Elsewhere");
    assert_ne!(
        issue_of(
            &server,
            &other,
            json!({"message": "Timeout at 0xFF after 0x10 tries"})
        ),
        message
    );

    let issues = server.all_issues(&project);
    let count = |id: &str| {
        issues.iter().find(|i| i["id"] == id).unwrap()["event_count"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(issues.len(), 14, "{issues:?}");
    assert_eq!(
        (
            count(&custom),
            count(&joined),
            count(&stacked),
            count(&exception),
            count(&message)
        ),
        (2, 2, 3, 4, 4)
    );
}

fn titles_and_levels_come_from_the_first_event(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Titles");
    let cases = [
        (
            json!({"message": "Checkout Failed at 0x1F", "level": "warning"}),
            "Checkout Failed at 0x1F",
            "warning",
        ),
        (
            json!({"exception": {"type_name": "KeyError", "value": "'user_id'"}, "level": "fatal"}),
            "KeyError: 'user_id'",
            "fatal",
        ),
        (
            json!({"message": "", "exception": {"type_name": "IOError", "value": "disk full"}}),
            "IOError: disk full",
            "error",
        ),
        (
            json!({"message": "Has a message", "exception": {"type_name": "X", "value": "y"}, "level": "info"}),
            "Has a message",
            "info",
        ),
        (
            json!({"exception": {}, "level": "debug"}),
            "Untitled",
            "debug",
        ),
    ];
    for (event, title, level) in cases {
        let id = issue_of(&server, &project, event.clone());
        let issue = get_issue(&server, &project, &id);
        assert_eq!(
            (issue["title"].as_str(), issue["level"].as_str()),
            (Some(title), Some(level)),
            "{event}: {issue}"
        );
        // A later event of the same issue changes neither.
        let mut later = event.clone();
        later["level"] = json!("fatal");
        if later["message"].as_str().is_some_and(|m| !m.is_empty()) {
            later["message"] = json!(later["message"].as_str().unwrap().to_uppercase());
        }
        assert_eq!(issue_of(&server, &project, later), id);
        let issue = get_issue(&server, &project, &id);
        assert_eq!(
            (issue["title"].as_str(), issue["level"].as_str()),
            (Some(title), Some(level)),
            "after a second event: {issue}"
        );
        assert_eq!(issue["event_count"], 2);
    }
    let kinds: BTreeSet<String> = server
        .all_issues(&project)
        .iter()
        .map(|i| i["level"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.len(), 5);
}

fn lifecycle_regression_archive_discard(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Lifecycle");
    let event = json!({"message": "payment gateway timeout"});
    let id = issue_of(&server, &project, event.clone());
    let state = |server: &Server| {
        let issue = get_issue(server, &project, &id);
        (
            issue["status"].as_str().unwrap().to_string(),
            issue["event_count"].as_u64().unwrap(),
        )
    };
    assert_eq!(state(&server), ("unresolved".into(), 1));
    let affected = |n: u8| (200, json!({"status": "ok", "affected": n}));

    assert_eq!(
        action(&server, &project, &id, "unresolve"),
        affected(0),
        "already unresolved"
    );
    assert_eq!(action(&server, &project, &id, "resolve"), affected(1));
    assert_eq!(action(&server, &project, &id, "resolve"), affected(0));
    assert_eq!(state(&server), ("resolved".into(), 1));
    // Regression: a new event reopens a resolved issue.
    assert_eq!(issue_of(&server, &project, event.clone()), id);
    assert_eq!(state(&server), ("unresolved".into(), 2));

    assert_eq!(action(&server, &project, &id, "archive"), affected(1));
    assert_eq!(action(&server, &project, &id, "archive"), affected(0));
    for _ in 0..2 {
        assert_eq!(issue_of(&server, &project, event.clone()), id);
    }
    assert_eq!(
        state(&server),
        ("archived".into(), 4),
        "archived issues keep counting and stay archived"
    );

    assert_eq!(action(&server, &project, &id, "discard"), affected(1));
    assert_eq!(action(&server, &project, &id, "discard"), affected(0));
    let stored_before = event_ids_of(&server, &project, &id, "?limit=100");
    assert_eq!(stored_before.len(), 4);
    for _ in 0..3 {
        let (status, body) = server.event(&project.ingest_key, &event);
        assert_eq!((status, body), (202, json!({"status": "discarded"})));
    }
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &json!([event.clone(), {"message": "fresh"}]),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["results"][0], json!({"status": "discarded"}), "{body}");
    assert!(body["results"][1]["event_id"].is_string(), "{body}");
    assert_eq!(
        state(&server),
        ("discarded".into(), 4),
        "discarded events are not counted"
    );
    assert_eq!(
        event_ids_of(&server, &project, &id, "?limit=100"),
        stored_before,
        "nor stored"
    );

    // A discarded issue can be brought back; then its events count again.
    assert_eq!(action(&server, &project, &id, "unresolve"), affected(1));
    assert_eq!(issue_of(&server, &project, event.clone()), id);
    assert_eq!(state(&server), ("unresolved".into(), 5));
    assert_eq!(event_ids_of(&server, &project, &id, "?limit=100").len(), 5);
    let statuses: BTreeSet<String> = server
        .all_issues(&project)
        .iter()
        .map(|i| i["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["unresolved".to_string()].into_iter().collect());
}

fn issue_routes_refuse_unknown_malformed_and_foreign_ids(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let a = server.project("Owner");
    let b = server.project("Stranger");
    let id = issue_of(&server, &a, json!({"message": "private"}));
    let unknown = uuid::Uuid::new_v4().to_string();
    let paths = |id: &str| {
        [
            ("GET", format!("/api/v1/issues/{id}")),
            ("GET", format!("/api/v1/issues/{id}/events")),
            ("POST", format!("/api/v1/issues/{id}/resolve")),
            ("POST", format!("/api/v1/issues/{id}/archive")),
            ("POST", format!("/api/v1/issues/{id}/unresolve")),
            ("POST", format!("/api/v1/issues/{id}/discard")),
        ]
    };
    for (method, path) in paths(&unknown) {
        let reply = server.request(method, &path, Some(&a.dashboard_key), Some(b"{}"));
        assert_eq!(reply.status, 404, "{method} {path}");
        assert_eq!(reply.json(), json!({"error": "not found"}));
    }
    for malformed in ["not-a-uuid", "1234", "0195b7a0-0000-7000-8000-00000000000g"] {
        for (method, path) in paths(malformed) {
            let reply = server.request(method, &path, Some(&a.dashboard_key), Some(b"{}"));
            assert_eq!(reply.status, 400, "{method} {path}");
            assert!(reply.json()["error"].is_string());
            // Without a key the answer is 401, whatever the path holds.
            let reply = server.request(method, &path, None, Some(b"{}"));
            assert_eq!(
                (reply.status, reply.json()),
                (401, json!({"error": "unauthorized"})),
                "{method} {path} without a key"
            );
        }
    }
    for (method, path) in paths(&id) {
        let reply = server.request(method, &path, Some(&b.dashboard_key), Some(b"{}"));
        assert_eq!(
            (reply.status, reply.json()),
            (403, json!({"error": "forbidden"})),
            "{method} {path} with B's key"
        );
    }
    let issue = get_issue(&server, &a, &id);
    assert_eq!(
        (issue["status"].as_str(), issue["event_count"].as_u64()),
        (Some("unresolved"), Some(1)),
        "B changed nothing"
    );
    // Listing an unknown project is 404 for any valid key.
    let (status, _) = server.get(
        "/api/v1/projects/no-such-project/issues",
        Some(&a.dashboard_key),
    );
    assert_eq!(status, 404);
}

fn listing_filters_and_cursor_pagination(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Listing");
    let levels = [
        "error", "warning", "fatal", "error", "info", "warning", "error",
    ];
    let ids: Vec<String> = levels
        .iter()
        .enumerate()
        .map(|(i, level)| {
            issue_of(
                &server,
                &project,
                json!({"message": format!("issue number {i}"), "level": level}),
            )
        })
        .collect();
    assert_eq!(action(&server, &project, &ids[1], "resolve").0, 200);
    assert_eq!(action(&server, &project, &ids[3], "archive").0, 200);
    assert_eq!(action(&server, &project, &ids[4], "discard").0, 200);
    let list = |query: &str| {
        let (status, body) = server.get(
            &format!("/api/v1/projects/{}/issues{query}", project.slug),
            Some(&project.dashboard_key),
        );
        assert_eq!(status, 200, "{query}: {body}");
        body
    };
    let ids_of = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    let all = list("");
    assert_eq!(ids_of(&all), newest_first, "newest last_seen first");
    assert_eq!(
        (all["has_more"].clone(), all["next_cursor"].clone()),
        (json!(false), Value::Null)
    );
    for issue in all["data"].as_array().unwrap() {
        let fields: BTreeSet<&str> = issue
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for field in [
            "id",
            "title",
            "level",
            "status",
            "event_count",
            "first_seen",
            "last_seen",
        ] {
            assert!(fields.contains(field), "{field} missing in {issue}");
        }
    }
    let by_id = server.get(
        &format!("/api/v1/projects/{}/issues", project.id),
        Some(&project.dashboard_key),
    );
    assert_eq!(by_id.0, 200);
    assert_eq!(
        ids_of(&by_id.1),
        newest_first,
        "the project by id lists the same"
    );

    let pick = |indexes: &[usize]| -> Vec<String> {
        indexes.iter().rev().map(|&i| ids[i].clone()).collect()
    };
    assert_eq!(ids_of(&list("?status=resolved")), pick(&[1]));
    assert_eq!(ids_of(&list("?status=archived")), pick(&[3]));
    assert_eq!(ids_of(&list("?status=discarded")), pick(&[4]));
    assert_eq!(ids_of(&list("?status=unresolved")), pick(&[0, 2, 5, 6]));
    assert_eq!(ids_of(&list("?level=error")), pick(&[0, 3, 6]));
    assert_eq!(ids_of(&list("?level=warning")), pick(&[1, 5]));
    assert_eq!(ids_of(&list("?level=debug")), Vec::<String>::new());
    assert_eq!(
        ids_of(&list("?status=unresolved&level=error")),
        pick(&[0, 6])
    );
    assert_eq!(
        ids_of(&list("?level=warning&status=resolved&limit=1")),
        pick(&[1])
    );

    for bad in [
        "?limit=0",
        "?limit=101",
        "?limit=-1",
        "?limit=ten",
        "?cursor=garbage",
    ] {
        let (status, body) = server.get(
            &format!("/api/v1/projects/{}/issues{bad}", project.slug),
            Some(&project.dashboard_key),
        );
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    assert_eq!(ids_of(&list("?limit=100")), newest_first);
    assert_eq!(ids_of(&list("?limit=1")), newest_first[..1]);

    // Cursor pagination walks every issue exactly once, newest first.
    let walk = |filter: &str, limit: usize| -> Vec<String> {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..20 {
            let query = match &cursor {
                None => format!("?limit={limit}{filter}"),
                Some(c) => format!("?limit={limit}{filter}&cursor={c}"),
            };
            let page = list(&query);
            let page_ids = ids_of(&page);
            assert!(page_ids.len() <= limit);
            seen.extend(page_ids.clone());
            if page["has_more"] == true {
                assert_eq!(page_ids.len(), limit, "a page that has more is full");
                cursor = Some(
                    page["next_cursor"]
                        .as_str()
                        .expect("next_cursor while has_more")
                        .to_string(),
                );
            } else {
                assert_eq!(page["next_cursor"], Value::Null, "{page}");
                return seen;
            }
        }
        panic!("pagination did not end");
    };
    for limit in [1, 2, 3, 7, 8] {
        assert_eq!(walk("", limit), newest_first, "limit {limit}");
    }
    assert_eq!(walk("&status=unresolved", 3), pick(&[0, 2, 5, 6]));

    // A new event moves its issue to the front; last_seen orders the list.
    assert_eq!(
        issue_of(
            &server,
            &project,
            json!({"message": "issue number 0", "level": "fatal"})
        ),
        ids[0]
    );
    let all = list("");
    assert_eq!(ids_of(&all)[0], ids[0]);
    let last_seen: Vec<time::OffsetDateTime> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            time::OffsetDateTime::parse(
                i["last_seen"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        })
        .collect();
    assert!(last_seen.windows(2).all(|w| w[0] >= w[1]), "{all}");
    let first = &all["data"][0];
    assert_eq!(
        (first["event_count"].as_u64(), first["level"].as_str()),
        (Some(2), Some("error"))
    );
    let parse = |field: &str| {
        time::OffsetDateTime::parse(
            first[field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(parse("first_seen") < parse("last_seen"), "{first}");
    assert_eq!(walk("", 2).len(), 7);
}

fn issue_events_newest_first_with_limit(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Events");
    let mut sent = Vec::new();
    let mut issue_id = String::new();
    for i in 0..6 {
        let event = json!({"message": "repeated failure", "extra": {"attempt": i}, "tags": {"release": "1.0"}});
        let (status, body) = server.event(&project.ingest_key, &event);
        assert_eq!(status, 202, "{body}");
        issue_id = body["issue_id"].as_str().unwrap().to_string();
        sent.push((body["event_id"].as_str().unwrap().to_string(), event));
    }
    issue_of(&server, &project, json!({"message": "another issue"}));
    let newest_first: Vec<String> = sent.iter().rev().map(|(id, _)| id.clone()).collect();
    assert_eq!(event_ids_of(&server, &project, &issue_id, ""), newest_first);
    assert_eq!(
        event_ids_of(&server, &project, &issue_id, "?limit=3"),
        newest_first[..3]
    );
    assert_eq!(
        event_ids_of(&server, &project, &issue_id, "?limit=1"),
        newest_first[..1]
    );
    assert_eq!(
        event_ids_of(&server, &project, &issue_id, "?limit=100"),
        newest_first
    );
    for bad in ["?limit=0", "?limit=101"] {
        let (status, _) = server.get(
            &format!("/api/v1/issues/{issue_id}/events{bad}"),
            Some(&project.dashboard_key),
        );
        assert_eq!(status, 400, "{bad}");
    }
    let (_, body) = server.get(
        &format!("/api/v1/issues/{issue_id}/events?limit=2"),
        Some(&project.dashboard_key),
    );
    for (stored, (id, event)) in body["data"]
        .as_array()
        .unwrap()
        .iter()
        .zip(sent.iter().rev())
    {
        assert_eq!(stored["id"].as_str(), Some(id.as_str()));
        assert_eq!(stored["issue_id"].as_str(), Some(issue_id.as_str()));
        assert_eq!(&stored["data"], event, "the event as sent");
    }
    let issue = get_issue(&server, &project, &issue_id);
    assert_eq!(
        (issue["id"].as_str(), issue["event_count"].as_u64()),
        (Some(issue_id.as_str()), Some(6))
    );
    assert_eq!(issue["title"], "repeated failure");
}

fn event_timestamps_set_first_and_last_seen(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Clocks");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let seen = |server: &Server, id: &str| {
        let issue = get_issue(server, &project, id);
        let at = |field: &str| {
            time::OffsetDateTime::parse(
                issue[field].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
            .unix_timestamp()
        };
        (at("first_seen"), at("last_seen"))
    };
    let hour_ago = time::OffsetDateTime::from_unix_timestamp(now - 3600)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let id = issue_of(
        &server,
        &project,
        json!({"message": "clock", "timestamp": hour_ago}),
    );
    assert_eq!(seen(&server, &id), (now - 3600, now - 3600));
    // Unix seconds; an older event moves first_seen back and leaves last_seen.
    issue_of(
        &server,
        &project,
        json!({"message": "clock", "timestamp": now - 7200}),
    );
    assert_eq!(seen(&server, &id), (now - 7200, now - 3600));
    // A clock far off (a day ahead, 40 days behind) counts as the receive time.
    issue_of(
        &server,
        &project,
        json!({"message": "clock", "timestamp": now - 40 * 86_400}),
    );
    let (first, last) = seen(&server, &id);
    assert_eq!(first, now - 7200);
    assert!(
        (now..now + 30).contains(&last),
        "last_seen {last}, now {now}"
    );
    issue_of(
        &server,
        &project,
        json!({"message": "clock", "timestamp": now + 86_400}),
    );
    let (_, last) = seen(&server, &id);
    assert!(
        (now..now + 30).contains(&last),
        "last_seen {last}, now {now}"
    );
    let before = seen(&server, &id);
    let server = server.restart();
    assert_eq!(seen(&server, &id), before, "kept across a restart");
    assert_eq!(get_issue(&server, &project, &id)["event_count"], 4);
}
