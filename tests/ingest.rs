//! Management, keys and ingest (PROTOCOL sections 2 to 4), each test on SQLite and PostgreSQL.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

on_both_backends!(
    management_projects_keys_and_settings,
    every_key_form_is_read,
    keys_are_refused_by_scope_and_project,
    single_events_are_validated,
    bulk_is_all_or_nothing,
    payload_limits_from_content_length,
    websocket_ingest_answers_every_frame,
    rate_limit_answers_429_with_retry_after,
    sampling_keeps_its_share,
    full_storage_queue_answers_503_and_loses_nothing,
    retention_days_removes_older_events,
);

/// Revocation must hold on every shard: this many fresh connections spread over both.
const FRESH_CONNECTIONS: usize = 8;
/// PROTOCOL section 4 limits.
const EVENT_BODY_BYTES_MAX: usize = 1024 * 1024;
const BULK_BODY_BYTES_MAX: usize = 5 * 1024 * 1024;
const BULK_EVENTS_MAX: usize = 100;

fn keys_of(body: &Value) -> BTreeSet<String> {
    body.as_object()
        .expect("JSON object")
        .keys()
        .cloned()
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn is_uuid(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
}

fn has_key_format(key: &Value, prefix: &str) -> bool {
    let Some(key) = key.as_str() else {
        return false;
    };
    key.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 48 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error string in {body}"))
}

fn assert_accepted(status: u16, body: &Value) {
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        keys_of(body),
        names(&["status", "event_id", "issue_id"]),
        "{body}"
    );
    assert_eq!(body["status"], "accepted");
    assert!(
        is_uuid(&body["event_id"]) && is_uuid(&body["issue_id"]),
        "{body}"
    );
}

fn management_projects_keys_and_settings(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let admin = Some(ADMIN_TOKEN);

    let (status, shop) = server.post("/api/v1/projects", admin, &json!({"name": "My Shop!"}));
    assert_eq!(status, 201, "{shop}");
    for field in ["id", "name", "slug", "ingest_key", "dashboard_key"] {
        assert!(shop.get(field).is_some(), "{field} missing in {shop}");
    }
    assert!(is_uuid(&shop["id"]), "{shop}");
    assert_eq!(shop["name"], "My Shop!");
    assert_eq!(shop["slug"], "my-shop", "slug defaults from the name");
    assert!(has_key_format(&shop["ingest_key"], "mshr_"), "{shop}");
    assert!(has_key_format(&shop["dashboard_key"], "mshd_"), "{shop}");
    let shop_id = shop["id"].as_str().unwrap().to_string();

    let (status, other) = server.post(
        "/api/v1/projects",
        admin,
        &json!({"name": "Other", "slug": "custom-slug"}),
    );
    assert_eq!(status, 201, "{other}");
    assert_eq!(other["slug"], "custom-slug");
    assert_ne!(other["id"], shop["id"]);
    assert_ne!(other["ingest_key"], shop["ingest_key"]);

    for duplicate in [
        json!({"name": "my shop"}),
        json!({"name": "Third", "slug": "custom-slug"}),
    ] {
        let (status, body) = server.post("/api/v1/projects", admin, &duplicate);
        assert_eq!(status, 409, "duplicate slug {duplicate}: {body}");
        error_of(&body);
    }

    let (status, list) = server.get("/api/v1/projects", admin);
    assert_eq!(status, 200, "{list}");
    let data = list["data"].as_array().expect("data array");
    assert_eq!(data.len(), 2, "refused creations create nothing: {list}");
    for (created, name) in [(&shop, "My Shop!"), (&other, "Other")] {
        let entry = data
            .iter()
            .find(|p| p["id"] == created["id"])
            .unwrap_or_else(|| panic!("{created} not listed"));
        assert_eq!(entry["name"], name);
        assert_eq!(entry["slug"], created["slug"]);
        let created_at = entry["created_at"].as_str().expect("created_at string");
        time::OffsetDateTime::parse(created_at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("created_at {created_at:?} is not RFC 3339: {e}"));
        assert!(
            entry.get("ingest_key").is_none() && entry.get("dashboard_key").is_none(),
            "keys are shown once: {entry}"
        );
    }

    let project = Project {
        id: shop_id.clone(),
        slug: "my-shop".into(),
        ingest_key: shop["ingest_key"].as_str().unwrap().into(),
        dashboard_key: shop["dashboard_key"].as_str().unwrap().into(),
        number: shop["number"].as_i64().unwrap(),
        dsn: shop["dsn"].as_str().unwrap().into(),
    };

    // The admin token is required: missing or wrong is 401; a valid project key lacks the
    // scope, 403.
    let guarded: [(&str, String, Option<Value>); 5] = [
        ("GET", "/api/v1/projects".into(), None),
        (
            "POST",
            "/api/v1/projects".into(),
            Some(json!({"name": "Sneaky"})),
        ),
        (
            "POST",
            format!("/api/v1/projects/{shop_id}/keys"),
            Some(json!({"scope": "ingest"})),
        ),
        (
            "POST",
            format!("/api/v1/keys/{}/revoke", uuid::Uuid::new_v4()),
            None,
        ),
        (
            "PATCH",
            "/api/v1/projects/my-shop".into(),
            Some(json!({"sample_rate": 0})),
        ),
    ];
    for (method, path, body) in &guarded {
        for key in [
            None,
            Some("wrong-token"),
            Some(project.ingest_key.as_str()),
            Some(project.dashboard_key.as_str()),
        ] {
            let body_bytes = body.as_ref().map(|b| b.to_string().into_bytes());
            let reply = server.request(method, path, key, body_bytes.as_deref());
            let project_key = key.is_some_and(|k| k.starts_with("mshr_") || k.starts_with("mshd_"));
            let (status, error) = match project_key {
                true => (403, "forbidden"),
                false => (401, "unauthorized"),
            };
            assert_eq!(reply.status, status, "{method} {path} with {key:?}");
            assert_eq!(reply.json(), json!({ "error": error }));
        }
    }
    let (_, list) = server.get("/api/v1/projects", admin);
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        2,
        "refused requests changed nothing"
    );

    // Keys of both scopes, the project named by slug and by id.
    let (status, ingest) = server.post(
        "/api/v1/projects/my-shop/keys",
        admin,
        &json!({"scope": "ingest", "label": "ci"}),
    );
    assert_eq!(status, 201, "{ingest}");
    // An ingest key's answer also carries the Sentry DSN that holds it (PROTOCOL 8).
    assert_eq!(
        keys_of(&ingest),
        names(&["id", "key", "scope", "label", "dsn"]),
        "{ingest}"
    );
    assert_eq!(
        ingest["dsn"],
        format!(
            "http://{}@{}/{}",
            ingest["key"].as_str().unwrap(),
            server.addr,
            shop["number"]
        )
    );
    assert!(is_uuid(&ingest["id"]));
    assert!(has_key_format(&ingest["key"], "mshr_"), "{ingest}");
    assert_eq!(
        (&ingest["scope"], &ingest["label"]),
        (&json!("ingest"), &json!("ci"))
    );
    let (status, dashboard) = server.post(
        &format!("/api/v1/projects/{shop_id}/keys"),
        admin,
        &json!({"scope": "dashboard"}),
    );
    assert_eq!(status, 201, "{dashboard}");
    assert_eq!(
        keys_of(&dashboard),
        names(&["id", "key", "scope", "label"]),
        "{dashboard}"
    );
    assert!(has_key_format(&dashboard["key"], "mshd_"), "{dashboard}");
    assert_eq!(dashboard["scope"], "dashboard");
    assert!(dashboard["label"].is_null(), "{dashboard}");
    for bad in [json!({"scope": "admin"}), json!({}), json!({"scope": 1})] {
        let (status, body) = server.post("/api/v1/projects/my-shop/keys", admin, &bad);
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = server.post(
        "/api/v1/projects/no-such-project/keys",
        admin,
        &json!({"scope": "ingest"}),
    );
    assert_eq!(status, 404);

    let new_ingest = ingest["key"].as_str().unwrap();
    let new_dashboard = dashboard["key"].as_str().unwrap();
    let issues_path = format!("/api/v1/projects/{shop_id}/issues");
    let (status, body) = server.event(new_ingest, &json!({"message": "from the new key"}));
    assert_accepted(status, &body);
    let (status, _) = server.get(&issues_path, Some(new_dashboard));
    assert_eq!(status, 200);

    // Revocation is effective on every shard as soon as the 200 is back.
    for key in [&ingest, &dashboard] {
        let (status, body) = server.post(
            &format!("/api/v1/keys/{}/revoke", key["id"].as_str().unwrap()),
            admin,
            &json!({}),
        );
        assert_eq!((status, body), (200, json!({"status": "ok"})));
    }
    for _ in 0..FRESH_CONNECTIONS {
        let (status, body) = server.event(new_ingest, &json!({"message": "revoked"}));
        assert_eq!(
            (status, body),
            (401, json!({"error": "unauthorized"})),
            "revoked ingest key"
        );
        let (status, body) = server.get(&issues_path, Some(new_dashboard));
        assert_eq!(
            (status, body),
            (401, json!({"error": "unauthorized"})),
            "revoked dashboard key"
        );
    }
    assert_eq!(
        server.event_total(&project),
        1,
        "no event of the revoked key was stored"
    );
    let (status, body) = server.event(
        &project.ingest_key,
        &json!({"message": "default key still works"}),
    );
    assert_accepted(status, &body);
    let (status, _) = server.post(
        &format!("/api/v1/keys/{}/revoke", uuid::Uuid::new_v4()),
        admin,
        &json!({}),
    );
    assert_eq!(status, 404, "unknown key id");
    let (status, _) = server.post("/api/v1/keys/not-a-uuid/revoke", admin, &json!({}));
    assert_eq!(status, 400, "malformed key id");

    // Settings, by slug and by id; invalid values are refused and change nothing.
    let (status, body) = server.patch(
        "/api/v1/projects/my-shop",
        admin,
        &json!({"rate_limit_per_minute": 1000, "sample_rate": 1, "retention_days": 30}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.patch(
        &format!("/api/v1/projects/{shop_id}"),
        admin,
        &json!({"sample_rate": 0.5}),
    );
    assert_eq!(status, 200, "{body}");
    for bad in [
        json!({"sample_rate": 1.5}),
        json!({"sample_rate": -0.1}),
        json!({"sample_rate": "all"}),
        json!({"rate_limit_per_minute": -1}),
        json!({"rate_limit_per_minute": 2.5}),
        json!({"rate_limit_per_minute": "many"}),
        json!({"retention_days": -3}),
        json!({"retention_days": "forever"}),
        json!({"sample_rate": 0, "retention_days": "forever"}),
    ] {
        let (status, body) = server.patch("/api/v1/projects/my-shop", admin, &bad);
        assert_eq!(status, 400, "{bad}: {body}");
        error_of(&body);
    }
    let reply = server.request(
        "PATCH",
        "/api/v1/projects/my-shop",
        admin,
        Some(b"{not json"),
    );
    assert_eq!(reply.status, 400);
    assert!(
        error_of(&reply.json()).starts_with("invalid JSON"),
        "{}",
        reply.json()
    );
    let (status, _) = server.patch(
        "/api/v1/projects/no-such-project",
        admin,
        &json!({"sample_rate": 1}),
    );
    assert_eq!(status, 404);
    // The refused PATCH with sample_rate 0 did not apply, and 0.5 keeps about half: of 400
    // events, the kept count is 200 +- 10 (one standard deviation); outside 140..=260 has odds
    // below 1e-8, while a server ignoring the rate keeps 400 and one applying 0 keeps none.
    let mut accepted = 0;
    for round in 0..4 {
        let events: Vec<Value> = (0..100)
            .map(|i| json!({"message": format!("sampled {round} {i}")}))
            .collect();
        let (status, body) = server.post(
            "/api/v1/events/bulk",
            Some(&project.ingest_key),
            &Value::Array(events),
        );
        assert_eq!(status, 202, "{body}");
        accepted += body["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|result| result.get("event_id").is_some())
            .count();
    }
    assert!(
        (140..=260).contains(&accepted),
        "sample_rate 0.5 kept {accepted} of 400 events"
    );
}

fn every_key_form_is_read(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Forms");
    let unknown = format!("mshr_{}", "0".repeat(48));
    type Form = fn(&str) -> (Vec<(&'static str, String)>, String);
    let forms: [(&str, Form); 7] = [
        ("Authorization: Bearer", |k| {
            (
                vec![("authorization", format!("Bearer {k}"))],
                String::new(),
            )
        }),
        ("Authorization: KEY", |k| {
            (vec![("authorization", k.to_string())], String::new())
        }),
        ("X-Sentry-Auth: KEY", |k| {
            (vec![("x-sentry-auth", k.to_string())], String::new())
        }),
        ("X-Sentry-Auth: Sentry", |k| {
            let value = format!("Sentry sentry_version=7, sentry_client=raven-js/3.27.0, sentry_key={k}, sentry_timestamp=1");
            (vec![("x-sentry-auth", value)], String::new())
        }),
        ("?key=", |k| (vec![], format!("?key={k}"))),
        ("?token=", |k| (vec![], format!("?token={k}"))),
        ("?sentry_key=", |k| (vec![], format!("?sentry_key={k}"))),
    ];
    let mut accepted = 0;
    for (name, form) in forms {
        let send = |key: &str| {
            let (headers, query) = form(key);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let body = json!({"message": format!("via {name}")}).to_string();
            let reply = server.request_with(
                "POST",
                &format!("/api/v1/events{query}"),
                &headers,
                Some(body.as_bytes()),
            );
            (reply.status, reply.json())
        };
        let (status, body) = send(&project.ingest_key);
        assert_accepted(status, &body);
        accepted += 1;
        assert_eq!(
            send(&project.dashboard_key),
            (403, json!({"error": "forbidden"})),
            "{name}: dashboard key"
        );
        assert_eq!(
            send(&unknown),
            (401, json!({"error": "unauthorized"})),
            "{name}: unknown key"
        );

        let list = |key: &str| {
            let (headers, query) = form(key);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let reply = server.request_with(
                "GET",
                &format!("/api/v1/projects/{}/issues{query}", project.slug),
                &headers,
                None,
            );
            (reply.status, reply.json())
        };
        let (status, body) = list(&project.dashboard_key);
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["data"].as_array().unwrap().len(), accepted, "{name}");
        assert_eq!(
            list(&project.ingest_key),
            (403, json!({"error": "forbidden"})),
            "{name}: ingest key on issues"
        );
    }

    // Header names are case-insensitive (written raw so no client lowercases them).
    for header in [
        "AUTHORIZATION: Bearer",
        "X-SENTRY-AUTH:",
        "x-SeNtRy-AuTh: Sentry sentry_key=",
    ] {
        let body = json!({"message": "shouting"}).to_string();
        let separator = if header.ends_with('=') { "" } else { " " };
        let request = format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: test\r\n{header}{separator}{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            project.ingest_key,
            body.len()
        );
        let mut stream = server.connect();
        send_raw(&mut stream, request.as_bytes());
        let (status, _, body) = read_response(&mut stream).expect("a response");
        assert_eq!(status, 202, "{header}: {}", String::from_utf8_lossy(&body));
    }

    // Several forms at once: the first place in PROTOCOL order decides, the rest are ignored.
    let key = project.ingest_key.as_str();
    let bearer_unknown = format!("Bearer {unknown}");
    let sentry_unknown = format!("Sentry sentry_key={unknown}");
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Headers, String, u16); 4] = [
        (
            &[("authorization", &bearer_unknown)],
            format!("?key={key}"),
            401,
        ),
        (
            &[("authorization", key), ("x-sentry-auth", &sentry_unknown)],
            String::new(),
            202,
        ),
        (&[("x-sentry-auth", &unknown)], format!("?key={key}"), 401),
        (
            &[("x-sentry-auth", key)],
            format!("?key={unknown}&token={unknown}"),
            202,
        ),
    ];
    for (headers, query, expected) in cases {
        let reply = server.request_with(
            "POST",
            &format!("/api/v1/events{query}"),
            headers,
            Some(br#"{"message":"several forms"}"#),
        );
        assert_eq!(reply.status, expected, "{headers:?} {query}");
    }
    assert_eq!(server.event_total(&project), 12);
}

fn keys_are_refused_by_scope_and_project(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let a = server.project("Project A");
    let b = server.project("Project B");
    let (status, body) = server.event(&a.ingest_key, &json!({"message": "a's error"}));
    assert_accepted(status, &body);
    let issue_id = body["issue_id"].as_str().unwrap().to_string();
    let unauthorized = json!({"error": "unauthorized"});
    let forbidden = json!({"error": "forbidden"});

    // Ingest: missing, unknown, garbage, wrong scope.
    let event = json!({"message": "refused"});
    let bulk = json!([{"message": "refused"}]);
    for (path, body) in [("/api/v1/events", &event), ("/api/v1/events/bulk", &bulk)] {
        assert_eq!(
            server.post(path, None, body),
            (401, unauthorized.clone()),
            "{path} without a key"
        );
        let unknown = format!("mshr_{}", "ab".repeat(24));
        assert_eq!(
            server.post(path, Some(&unknown), body),
            (401, unauthorized.clone()),
            "{path} unknown key"
        );
        assert_eq!(
            server.post(path, Some("garbage"), body),
            (401, unauthorized.clone()),
            "{path} garbage key"
        );
        assert_eq!(
            server.post(path, Some(&a.dashboard_key), body),
            (403, forbidden.clone()),
            "{path} dashboard key"
        );
    }
    // The issues API: no key, an ingest key, another project's dashboard key.
    let issue_paths = [
        ("GET", format!("/api/v1/projects/{}/issues", a.id)),
        ("GET", format!("/api/v1/projects/{}/issues", a.slug)),
        ("GET", format!("/api/v1/issues/{issue_id}")),
        ("GET", format!("/api/v1/issues/{issue_id}/events")),
        ("POST", format!("/api/v1/issues/{issue_id}/resolve")),
    ];
    for (method, path) in &issue_paths {
        let reply = server.request(method, path, None, Some(b"{}"));
        assert_eq!(
            (reply.status, reply.json()),
            (401, unauthorized.clone()),
            "{method} {path} without a key"
        );
        for key in [&a.ingest_key, &b.ingest_key, &b.dashboard_key] {
            let reply = server.request(method, path, Some(key), Some(b"{}"));
            assert_eq!(
                (reply.status, reply.json()),
                (403, forbidden.clone()),
                "{method} {path} with {key}"
            );
        }
    }
    // Nothing above changed A: one issue, one event, still unresolved; B has nothing.
    let issues = server.all_issues(&a);
    assert_eq!(issues.len(), 1);
    assert_eq!(
        (
            issues[0]["status"].as_str(),
            issues[0]["event_count"].as_u64()
        ),
        (Some("unresolved"), Some(1))
    );
    assert!(server.all_issues(&b).is_empty());

    // An ingest key never opens a stream.
    match server.ws(&format!("/stream/projects/{}?key={}", a.id, a.ingest_key)) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 403),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("an ingest key opened a stream"),
    }
}

fn single_events_are_validated(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Validation");
    let key = Some(project.ingest_key.as_str());
    let invalid_json: [&[u8]; 4] = [b"{", b"{\"message\": \"x\",}", b"", b"not json"];
    for body in invalid_json {
        let reply = server.request("POST", "/api/v1/events", key, Some(body));
        assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(body));
        let answer = reply.json();
        assert!(error_of(&answer).starts_with("invalid JSON: "), "{answer}");
    }
    let invalid_events = [
        json!({"level": "error"}),
        json!({"message": ""}),
        json!({"message": "", "level": "error"}),
        json!({"message": "x", "level": "critical"}),
        json!({"message": "x", "level": "ERROR"}),
        json!({"message": 42}),
        json!([{"message": "an array"}]),
        json!("just a string"),
        json!(null),
        json!({"tags": {"environment": "production"}}),
    ];
    for event in &invalid_events {
        let (status, body) = server.event(&project.ingest_key, event);
        assert_eq!(status, 400, "{event}: {body}");
        assert!(
            error_of(&body).starts_with("invalid event: "),
            "{event}: {body}"
        );
    }
    let (_, body) = server.event(&project.ingest_key, &json!({"level": "warning"}));
    assert!(
        error_of(&body).contains("message"),
        "names what is missing: {body}"
    );
    let (_, body) = server.event(
        &project.ingest_key,
        &json!({"message": "x", "level": "critical"}),
    );
    assert!(error_of(&body).contains("level"), "names the field: {body}");
    assert!(
        server.all_issues(&project).is_empty(),
        "no refused event was stored"
    );

    let valid = [
        json!({"message": "only a message"}),
        json!({"exception": {"type_name": "ValueError", "value": "bad"}}),
        json!({"message": "full", "level": "fatal", "tags": {"environment": "prod"}, "extra": {"a": [1, 2]},
               "timestamp": "2024-05-01T12:00:00Z", "unknown_field": {"kept": true}}),
        json!({"message": "unix seconds", "level": "debug", "timestamp": 1714564800}),
    ];
    let mut event_ids = BTreeSet::new();
    for event in &valid {
        let (status, body) = server.event(&project.ingest_key, event);
        assert_accepted(status, &body);
        assert!(
            event_ids.insert(body["event_id"].as_str().unwrap().to_string()),
            "event ids are unique"
        );
    }
    let issues = server.all_issues(&project);
    assert_eq!(issues.len(), 4);
    // The event is stored as sent, unknown fields included.
    let full = issues
        .iter()
        .find(|i| i["title"] == "full")
        .expect("the full event's issue");
    let (status, events) = server.get(
        &format!("/api/v1/issues/{}/events", full["id"].as_str().unwrap()),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200);
    assert_eq!(events["data"][0]["data"], valid[2], "{events}");
}

fn bulk_is_all_or_nothing(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Bulk");
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &json!([{"message": "first"}, {"message": "second", "level": "warning"}, {"message": "FIRST"}]),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(keys_of(&body), names(&["status", "results"]));
    assert_eq!(body["status"], "accepted");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for result in results {
        assert!(
            is_uuid(&result["event_id"]) && is_uuid(&result["issue_id"]),
            "{result}"
        );
    }
    assert_eq!(
        results[0]["issue_id"], results[2]["issue_id"],
        "grouped one by one"
    );
    assert_ne!(results[0]["issue_id"], results[1]["issue_id"]);
    assert_eq!(server.event_total(&project), 3);

    // One bad element (index 2) rejects the whole request.
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &json!([{"message": "new one"}, {"message": "first"}, {"level": "error"}, {"message": "new two"}]),
    );
    assert_eq!(status, 400, "{body}");
    let error = error_of(&body);
    assert!(
        error.starts_with("invalid event: index 2: "),
        "names the index: {error}"
    );
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &json!([{"message": "x", "level": "nope"}]),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body).starts_with("invalid event: index 0: "),
        "{body}"
    );
    let reply = server.request(
        "POST",
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        Some(b"[{\"message\": \"x\"},"),
    );
    assert_eq!(reply.status, 400);
    assert!(error_of(&reply.json()).starts_with("invalid JSON: "));
    for not_an_array in [json!({"message": "an object"}), json!([]), json!("text")] {
        let (status, body) = server.post(
            "/api/v1/events/bulk",
            Some(&project.ingest_key),
            &not_an_array,
        );
        assert_eq!(status, 400, "{not_an_array}: {body}");
    }
    let too_many: Vec<Value> = (0..=BULK_EVENTS_MAX)
        .map(|i| json!({"message": format!("too many {i}")}))
        .collect();
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &Value::Array(too_many),
    );
    assert_eq!(status, 400, "{body}");
    let issues = server.all_issues(&project);
    assert_eq!(
        issues.len(),
        2,
        "nothing of a refused bulk was stored: {issues:?}"
    );
    assert_eq!(server.event_total(&project), 3);

    let full: Vec<Value> = (0..BULK_EVENTS_MAX)
        .map(|i| json!({"message": format!("full {}", i % 4)}))
        .collect();
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &Value::Array(full),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), BULK_EVENTS_MAX);
    assert_eq!(server.all_issues(&project).len(), 6);
    assert_eq!(server.event_total(&project), 3 + BULK_EVENTS_MAX as u64);
    // The store holds exactly the accepted events: none of the refused requests' elements.
    server
        .store_reader()
        .assert_event_rows(3 + BULK_EVENTS_MAX as u64);
}

/// Sends only a head with this Content-Length; the answer must come without any body sent.
fn head_only(server: &Server, path: &str, key: &str, content_length: usize) -> (u16, Value) {
    let mut stream = server.connect();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    );
    send_raw(&mut stream, head.as_bytes());
    let (status, _, body) = read_response(&mut stream).expect("an answer before the body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn payload_limits_from_content_length(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Sizes");
    let too_large = json!({"error": "payload too large"});
    let key = &project.ingest_key;
    assert_eq!(
        head_only(&server, "/api/v1/events", key, EVENT_BODY_BYTES_MAX + 1),
        (413, too_large.clone())
    );
    assert_eq!(
        head_only(&server, "/api/v1/events", key, 3 * EVENT_BODY_BYTES_MAX),
        (413, too_large.clone())
    );
    assert_eq!(
        head_only(&server, "/api/v1/events/bulk", key, BULK_BODY_BYTES_MAX + 1),
        (413, too_large.clone())
    );

    // Exactly at the limits is accepted.
    let frame = json!({"message": ""}).to_string();
    let message = "m".repeat(EVENT_BODY_BYTES_MAX - frame.len());
    let body = json!({"message": message}).to_string();
    assert_eq!(body.len(), EVENT_BODY_BYTES_MAX);
    let reply = server.request("POST", "/api/v1/events", Some(key), Some(body.as_bytes()));
    assert_eq!(reply.status, 202, "{}", reply.text());
    // A bulk over 1 MiB (under 5 MiB) is fine for the bulk endpoint.
    let part = "b".repeat(EVENT_BODY_BYTES_MAX / 2);
    let bulk = json!([{"message": part}, {"message": part}, {"message": part}]).to_string();
    assert!(bulk.len() > EVENT_BODY_BYTES_MAX);
    let reply = server.request(
        "POST",
        "/api/v1/events/bulk",
        Some(key),
        Some(bulk.as_bytes()),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(
        server.event_total(&project),
        4,
        "only the events within limits are stored"
    );
}

fn ws_text(ws: &mut Ws, text: String) -> Value {
    ws.send(tungstenite::Message::text(text))
        .expect("send a frame");
    next_json(ws)
}

fn websocket_ingest_answers_every_frame(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Socket");
    let (mut dashboard, _) = server.subscribe(&project);

    for refused in [
        format!("?key={}", project.dashboard_key),
        "?key=nope".into(),
        String::new(),
    ] {
        match server.ws(&format!("/ingest{refused}")) {
            Err(tungstenite::Error::Http(response)) => {
                let expected = if refused.contains("mshd_") { 403 } else { 401 };
                assert_eq!(response.status().as_u16(), expected, "/ingest{refused}");
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("/ingest{refused} was upgraded"),
        }
    }

    let mut ws = server
        .ws(&format!("/ingest?key={}", project.ingest_key))
        .expect("upgrade with the ingest key");
    let single = ws_text(
        &mut ws,
        json!({"message": "over the socket", "level": "warning"}).to_string(),
    );
    assert_eq!(
        keys_of(&single),
        names(&["status", "event_id", "issue_id"]),
        "{single}"
    );
    assert_eq!(single["status"], "accepted");
    let issue = next_of_type(&mut dashboard, "event");
    assert_eq!(
        issue["event_id"], single["event_id"],
        "socket events stream like HTTP ones"
    );
    assert_eq!(
        issue["data"],
        json!({"message": "over the socket", "level": "warning"})
    );

    let array = ws_text(
        &mut ws,
        json!([{"message": "over the socket"}, {"message": "second one"}]).to_string(),
    );
    assert_eq!(keys_of(&array), names(&["status", "results"]), "{array}");
    let results = array["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["issue_id"], single["issue_id"]);

    let bad_frames = [
        ("{oops".to_string(), "invalid JSON"),
        (json!({"level": "error"}).to_string(), "invalid event"),
        (
            json!([{"message": "ok"}, {"message": "bad", "level": "loud"}]).to_string(),
            "invalid event",
        ),
        ("42".to_string(), "invalid event"),
    ];
    for (frame, kind) in bad_frames {
        let answer = ws_text(&mut ws, frame.clone());
        assert_eq!(keys_of(&answer), names(&["error"]), "{frame}: {answer}");
        assert!(error_of(&answer).starts_with(kind), "{frame}: {answer}");
    }
    // Still open, and answers keep their order.
    for i in 0..3 {
        ws.send(tungstenite::Message::text(
            json!({"message": format!("pipelined {i}")}).to_string(),
        ))
        .unwrap();
    }
    let mut pipelined = Vec::new();
    for _ in 0..3 {
        let answer = next_json(&mut ws);
        assert_eq!(answer["status"], "accepted", "{answer}");
        pipelined.push(answer["event_id"].clone());
    }
    let mut streamed = Vec::new();
    while streamed.len() < 5 {
        streamed.push(next_of_type(&mut dashboard, "event")["event_id"].clone());
    }
    assert_eq!(
        &streamed[2..],
        &pipelined[..],
        "frames are answered in order"
    );

    // A refusal over the socket has the HTTP body: two events over a limit of one.
    server.set_project(&project, json!({"rate_limit_per_minute": 1}));
    let limited = ws_text(
        &mut ws,
        json!([{"message": "a"}, {"message": "b"}]).to_string(),
    );
    assert_eq!(limited, json!({"error": "rate limited"}));
    ws.close(None).ok();
    assert_eq!(
        server.event_total(&project),
        6,
        "the bad and refused frames stored nothing"
    );

    // Revoking a key closes the ingest sockets opened with it (1008) and refuses new ones.
    let (status, created) = server.post(
        &format!("/api/v1/projects/{}/keys", project.slug),
        Some(ADMIN_TOKEN),
        &json!({"scope": "ingest"}),
    );
    assert_eq!(status, 201, "{created}");
    let key_path = format!("/ingest?key={}", created["key"].as_str().unwrap());
    let mut doomed = server.ws(&key_path).expect("upgrade with the new key");
    let (status, body) = server.post(
        &format!("/api/v1/keys/{}/revoke", created["id"].as_str().unwrap()),
        Some(ADMIN_TOKEN),
        &json!({}),
    );
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    loop {
        match doomed.read() {
            Ok(tungstenite::Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
                break;
            }
            Ok(tungstenite::Message::Ping(_)) => continue,
            other => panic!("expected close 1008, got {other:?}"),
        }
    }
    match server.ws(&key_path) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 401),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a revoked key was upgraded"),
    }
}

/// Keeps a fixed per-minute window from rolling over in the middle of a short sequence.
fn away_from_a_minute_boundary() {
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        % 60.0;
    if second > 45.0 {
        std::thread::sleep(Duration::from_secs_f64(60.5 - second));
    }
}

fn rate_limit_answers_429_with_retry_after(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Limited");
    server.set_project(&project, json!({"rate_limit_per_minute": 3}));
    away_from_a_minute_boundary();
    for i in 0..3 {
        let (status, body) = server.event(
            &project.ingest_key,
            &json!({"message": format!("limited {i}")}),
        );
        assert_accepted(status, &body);
    }
    for _ in 0..3 {
        let reply = server.request(
            "POST",
            "/api/v1/events",
            Some(&project.ingest_key),
            Some(br#"{"message":"one too many"}"#),
        );
        assert_eq!(reply.status, 429);
        assert_eq!(reply.json(), json!({"error": "rate limited"}));
        let retry_after: u64 = reply
            .header("retry-after")
            .expect("Retry-After")
            .trim()
            .parse()
            .expect("whole seconds");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    }
    let reply = server.request(
        "POST",
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        Some(br#"[{"message":"bulk too"}]"#),
    );
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json(), json!({"error": "rate limited"}));
    assert!(
        reply.header("retry-after").is_some(),
        "bulk 429 has Retry-After"
    );
    let issues = server.all_issues(&project);
    assert_eq!(issues.len(), 3, "refused events stored nothing: {issues:?}");
    assert_eq!(server.event_total(&project), 3);
    server.store_reader().assert_event_rows(3);
    // Another project is not limited by this one.
    let other = server.project("Unlimited");
    for _ in 0..5 {
        let (status, body) = server.event(&other.ingest_key, &json!({"message": "free"}));
        assert_accepted(status, &body);
    }
}

fn sampling_keeps_its_share(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Sampled");
    let settings = format!("/api/v1/projects/{}", project.id);
    assert_eq!(
        server
            .patch(&settings, Some(ADMIN_TOKEN), &json!({"sample_rate": 0}))
            .0,
        200
    );
    let (mut watcher, first) = server.subscribe(&project);
    assert_eq!(first["count"], 0, "{first}");
    for i in 0..10 {
        let (status, body) = server.event(
            &project.ingest_key,
            &json!({"message": format!("dropped {i}")}),
        );
        assert_eq!((status, body), (202, json!({"status": "sampled"})));
    }
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &json!([{"message": "a"}, {"message": "b"}]),
    );
    assert_eq!(
        (status, body),
        (
            202,
            json!({"status": "accepted", "results": [{"status": "sampled"}, {"status": "sampled"}]})
        )
    );
    assert!(
        server.all_issues(&project).is_empty(),
        "sampled-out events are not stored"
    );

    assert_eq!(
        server
            .patch(&settings, Some(ADMIN_TOKEN), &json!({"sample_rate": 1}))
            .0,
        200
    );
    for i in 0..10 {
        let (status, body) = server.event(
            &project.ingest_key,
            &json!({"message": format!("kept {}", i % 2)}),
        );
        assert_accepted(status, &body);
    }
    assert_eq!(server.event_total(&project), 10);
    // Nothing sampled out reached the stream: its first message is the first kept event's.
    let created = next_json(&mut watcher);
    assert_eq!(
        (
            &created["type"],
            &created["action"],
            &created["issue"]["title"]
        ),
        (&json!("issue"), &json!("created"), &json!("kept 0")),
        "{created}"
    );
    server.store_reader().assert_event_rows(10);
}

fn full_storage_queue_answers_503_and_loses_nothing(backend: Backend) {
    // The project is made on a normally flushing server: with a one-minute flush, even a
    // management change would wait that long for its commit.
    let server = Server::start_with(backend, &[]);
    let project = server.project("Overloaded");
    let sampled_out = server.project("Sampled out");
    server.set_project(&sampled_out, json!({"sample_rate": 0}));
    let server = server.restart_with(&[
        "--queue-events",
        "5",
        "--flush-interval-ms",
        "60000",
        "--batch-events",
        "1000000",
    ]);
    let mut accepted = BTreeSet::new();
    let mut overloaded = None;
    for i in 0..10 {
        let reply = server.request(
            "POST",
            "/api/v1/events",
            Some(&project.ingest_key),
            Some(
                json!({"message": format!("queued {}", i % 3)})
                    .to_string()
                    .as_bytes(),
            ),
        );
        match reply.status {
            202 => assert!(accepted.insert(reply.json()["event_id"].as_str().unwrap().to_string())),
            503 => {
                overloaded = Some(reply);
                break;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    let reply = overloaded.expect("a 503 within 10 events while nothing is flushed");
    assert_eq!(reply.json(), json!({"error": "overloaded"}));
    let retry_after: u64 = reply
        .header("retry-after")
        .expect("Retry-After")
        .trim()
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    assert!(
        !accepted.is_empty(),
        "the queue held some events before it was full"
    );
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &json!([{"message": "bulk"}]),
    );
    assert_eq!((status, body), (503, json!({"error": "overloaded"})));
    // What would not be stored needs no room: sampling still answers while the queue is full.
    assert_eq!(
        server.event(&sampled_out.ingest_key, &json!({"message": "not kept"})),
        (202, json!({"status": "sampled"}))
    );

    // SIGTERM flushes every accepted event, and only those.
    let server = server.restart_with(&[]);
    assert_eq!(server.event_total(&project), accepted.len() as u64);
    assert_eq!(
        server.store_reader().event_ids(),
        accepted.iter().cloned().collect()
    );
}

fn retention_days_removes_older_events(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Retained");
    let kept_elsewhere = server.project("Retained Elsewhere");
    let mut ids = Vec::new();
    for (project, message) in [
        (&project, "old"),
        (&project, "old"),
        (&project, "new"),
        (&kept_elsewhere, "old"),
    ] {
        let (status, body) = server.event(&project.ingest_key, &json!({"message": message}));
        assert_accepted(status, &body);
        ids.push(body["event_id"].as_str().unwrap().to_string());
    }
    let mut store = server.store_reader();
    store.assert_event_rows(4);
    for (id, days) in [(&ids[0], 10), (&ids[1], 6), (&ids[3], 10)] {
        store.backdate_event(id, days);
    }
    // A new retention applies right away, to that project's events only.
    let body = server.set_project(&project, json!({"retention_days": 5}));
    assert_eq!(body["retention_days"], 5, "{body}");
    store.assert_event_rows(2);
    let left = store.event_ids();
    assert_eq!(left, [ids[2].clone(), ids[3].clone()].into_iter().collect());
    // Issues keep their counts: retention removes stored events, not history.
    assert_eq!(server.event_total(&project), 3);
}
