//! The live project stream (PROTOCOL.md section 6) against a real `--shards 2` server, with
//! subscribers spread over both shards.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// Subscribers each test opens per project; more are opened until both shards have some.
const SUBSCRIBERS_MIN: usize = 4;

fn stream_path(project: &Project) -> String {
    format!(
        "/stream/projects/{}?key={}",
        project.id, project.dashboard_key
    )
}

/// An `issue_count` as compared by these tests: without its offset (see `without_offset`).
fn count_message(project: &Project, count: u64) -> Value {
    json!({"type": "issue_count", "project_id": project.id, "count": count})
}

/// A stream message without its `offset`, which must be there (the order of offsets is checked
/// by `check_sequence`).
fn without_offset(message: &Value) -> Value {
    assert!(message["offset"].is_u64(), "no offset in {message}");
    let mut message = message.clone();
    message.as_object_mut().unwrap().remove("offset");
    message
}

/// The first message without its `epoch` and `offset` (the last offset produced), which it must
/// carry.
fn welcome(first: &Value) -> Value {
    assert!(
        first["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "no epoch in {first}"
    );
    let mut message = without_offset(first);
    message.as_object_mut().unwrap().remove("epoch");
    message
}

/// What a subscriber must receive next.
#[derive(Clone, Debug)]
enum Expect {
    Created {
        issue_id: Value,
        title: String,
        level: String,
    },
    Regressed {
        issue_id: Value,
    },
    Event {
        reply: Value,
        data: Value,
    },
    Status {
        action: &'static str,
        issue_id: Value,
    },
    Count(Value),
}

fn check(message: &Value, expected: &Expect) {
    match expected {
        Expect::Created {
            issue_id,
            title,
            level,
        } => {
            assert_eq!(
                (&message["type"], &message["action"]),
                (&json!("issue"), &json!("created")),
                "{message}"
            );
            assert_eq!(&message["issue_id"], issue_id, "{message}");
            let issue = &message["issue"];
            assert_eq!(&issue["id"], issue_id, "{message}");
            assert_eq!(issue["title"], json!(title), "{message}");
            assert_eq!(issue["level"], json!(level), "{message}");
            assert_eq!(issue["status"], "unresolved", "{message}");
            assert_eq!(issue["event_count"], 1, "{message}");
        }
        Expect::Regressed { issue_id } => {
            assert_eq!(
                (&message["type"], &message["action"]),
                (&json!("issue"), &json!("regressed")),
                "{message}"
            );
            assert_eq!(&message["issue_id"], issue_id, "{message}");
            assert_eq!(&message["issue"]["id"], issue_id, "{message}");
            assert_eq!(message["issue"]["status"], "unresolved", "{message}");
        }
        Expect::Event { reply, data } => {
            let wanted = json!({
                "type": "event",
                "event_id": reply["event_id"],
                "issue_id": reply["issue_id"],
                "data": data,
            });
            assert_eq!(without_offset(message), wanted);
        }
        Expect::Status { action, issue_id } => {
            // The whole issue, in its state after the change.
            assert_eq!(
                (&message["type"], &message["action"], &message["issue_id"]),
                (&json!("issue"), &json!(action), issue_id),
                "{message}"
            );
            let issue = &message["issue"];
            assert_eq!(&issue["id"], issue_id, "{message}");
            assert_eq!(issue["status"], json!(action), "{message}");
            for field in ["title", "level", "first_seen", "last_seen"] {
                assert!(issue[field].is_string(), "{field} in {message}");
            }
            assert!(issue["event_count"].as_u64() >= Some(1), "{message}");
        }
        Expect::Count(wanted) => assert_eq!(&without_offset(message), wanted),
    }
}

fn check_all(subscribers: &mut [(Ws, Value)], expected: &[Expect]) {
    for (index, (ws, _)) in subscribers.iter_mut().enumerate() {
        check_sequence(ws, expected, &format!("subscriber {index}"));
    }
}

/// Reads one subscriber's messages against `expected`, in order. At most one `issue_count` waits
/// per client and a newer one replaces it (at the newer one's place), so an expected count may be
/// missing when a later count follows; nothing else may be missing, extra or out of order.
fn check_sequence(ws: &mut Ws, expected: &[Expect], who: &str) {
    let mut position = 0;
    let mut last_offset = 0;
    while position < expected.len() {
        let message = next_json(ws);
        if let Some(offset) = message["offset"].as_u64() {
            assert!(
                offset > last_offset,
                "{who}: offset {offset} after {last_offset}: {message}"
            );
            last_offset = offset;
        }
        let comparable = match message["offset"].is_u64() {
            true => without_offset(&message),
            false => message.clone(),
        };
        while let Expect::Count(count) = &expected[position] {
            let superseded = &comparable != count
                && expected[position + 1..]
                    .iter()
                    .any(|e| matches!(e, Expect::Count(_)));
            if !superseded {
                break;
            }
            position += 1;
        }
        let wanted = &expected[position];
        if let Err(panic) = std::panic::catch_unwind(|| check(&message, wanted)) {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{who}, expected message {position}: got {message}, wanted {wanted:?}: {reason}"
            );
        }
        position += 1;
    }
}

fn accepted(server: &Server, project: &Project, event: &Value) -> Value {
    let (status, reply) = server.event(&project.ingest_key, event);
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["status"], "accepted", "{reply}");
    reply
}

fn set_status(server: &Server, project: &Project, issue_id: &Value, action: &str) -> u64 {
    let path = format!("/api/v1/issues/{}/{action}", issue_id.as_str().unwrap());
    let (status, reply) = server.post(&path, Some(&project.dashboard_key), &json!({}));
    assert_eq!(status, 200, "{action}: {reply}");
    assert_eq!(reply["status"], "ok", "{reply}");
    reply["affected"].as_u64().expect("affected")
}

/// The messages a brand-new issue's first event produces.
fn new_issue(reply: &Value, event: &Value, level: &str, count: Value) -> Vec<Expect> {
    vec![
        Expect::Created {
            issue_id: reply["issue_id"].clone(),
            title: event["message"].as_str().unwrap().to_string(),
            level: level.to_string(),
        },
        Expect::Event {
            reply: reply.clone(),
            data: event.clone(),
        },
        Expect::Count(count),
    ]
}

fn subscriptions_become(server: &Server, live: usize) {
    let mut metrics = MetricsConn::open(server);
    let settled = wait_until(Duration::from_secs(10), || {
        metrics.value("mesher_stream_subscriptions") == live as f64
    });
    assert!(
        settled,
        "mesher_stream_subscriptions stays at {} with {live} live",
        metrics.value("mesher_stream_subscriptions")
    );
}

#[test]
fn first_message_is_the_unresolved_count_on_every_path() {
    let server = Server::start();
    let project = server.project("Count Shop");
    let key = &project.dashboard_key;
    let paths = [
        format!("/stream/projects/{}?key={key}", project.id),
        format!("/ws/stream/projects/{}?key={key}", project.id),
        format!("/stream/projects/{}?key={key}", project.slug),
        format!("/ws/stream/projects/{}?token={key}", project.slug),
    ];
    for path in &paths {
        let mut ws = server.ws(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            welcome(&next_json(&mut ws)),
            count_message(&project, 0),
            "{path}"
        );
    }

    // Four issues: one resolved, one archived, one with two events -> two unresolved.
    let replies: Vec<Value> = (0..4)
        .map(|i| {
            accepted(
                &server,
                &project,
                &json!({"message": format!("count issue {i}")}),
            )
        })
        .collect();
    accepted(&server, &project, &json!({"message": "count issue 3"}));
    assert_eq!(
        set_status(&server, &project, &replies[0]["issue_id"], "resolve"),
        1
    );
    assert_eq!(
        set_status(&server, &project, &replies[1]["issue_id"], "archive"),
        1
    );
    for path in &paths {
        let subscribers = subscribers_on_both_shards(&server, path, 2);
        for (_, first) in &subscribers {
            assert_eq!(welcome(first), count_message(&project, 2), "{path}");
        }
    }

    // Nothing is kept for closed subscribers, whether they closed cleanly or just vanished.
    subscriptions_become(&server, 0);
    let mut subscribers = subscribers_on_both_shards(&server, &paths[0], SUBSCRIBERS_MIN);
    subscriptions_become(&server, subscribers.len());
    let (mut polite, _) = subscribers.pop().unwrap();
    polite.close(None).unwrap();
    while polite.read().is_ok() {}
    subscriptions_become(&server, subscribers.len());
    drop(subscribers.pop());
    subscriptions_become(&server, subscribers.len());
    // The rest still work.
    let reply = accepted(
        &server,
        &project,
        &json!({"message": "count issue 3", "after": "closes"}),
    );
    check_all(
        &mut subscribers,
        &[Expect::Event {
            reply,
            data: json!({"message": "count issue 3", "after": "closes"}),
        }],
    );
    drop(subscribers);
    subscriptions_become(&server, 0);
}

#[test]
fn events_and_status_changes_reach_every_subscriber_in_order() {
    let server = Server::start();
    let project = server.project("Order Shop");
    let mut subscribers =
        subscribers_on_both_shards(&server, &stream_path(&project), SUBSCRIBERS_MIN);
    for (_, first) in &subscribers {
        assert_eq!(welcome(first), count_message(&project, 0));
    }
    let mut expected = Vec::new();

    // A new issue: created, event (verbatim, unknown fields too), count.
    let a1 = json!({
        "message": "Checkout failed",
        "level": "warning",
        "environment": "production",
        "tags": {"release": "shop@1.2", "browser": "Firefox"},
        "custom": {"nested": [1, "two", null, true, 2.5]},
        "odd_field": "kept \"quoted\" \u{e9} \n <b>",
    });
    let r1 = accepted(&server, &project, &a1);
    let issue_a = r1["issue_id"].clone();
    expected.extend(new_issue(&r1, &a1, "warning", count_message(&project, 1)));

    // The same issue again: only the event (the count did not change).
    let a2 = json!({"message": "Checkout failed", "level": "warning", "attempt": 2});
    let r2 = accepted(&server, &project, &a2);
    assert_eq!(r2["issue_id"], issue_a);
    assert_ne!(r2["event_id"], r1["event_id"]);
    expected.push(Expect::Event {
        reply: r2,
        data: a2,
    });

    let b1 = json!({"message": "Payment declined", "exception": {"type_name": "CardError", "value": "declined"}});
    let r_b1 = accepted(&server, &project, &b1);
    let issue_b = r_b1["issue_id"].clone();
    expected.extend(new_issue(&r_b1, &b1, "error", count_message(&project, 2)));

    // Resolve, then a regression.
    assert_eq!(set_status(&server, &project, &issue_a, "resolve"), 1);
    expected.push(Expect::Status {
        action: "resolved",
        issue_id: issue_a.clone(),
    });
    expected.push(Expect::Count(count_message(&project, 1)));
    assert_eq!(set_status(&server, &project, &issue_a, "resolve"), 0);
    let a3 = json!({"message": "Checkout failed", "level": "warning", "attempt": 3});
    let r3 = accepted(&server, &project, &a3);
    assert_eq!(r3["issue_id"], issue_a);
    expected.push(Expect::Regressed {
        issue_id: issue_a.clone(),
    });
    expected.push(Expect::Event {
        reply: r3,
        data: a3,
    });
    expected.push(Expect::Count(count_message(&project, 2)));

    // Archive: an archived issue keeps streaming its events and does not count.
    assert_eq!(set_status(&server, &project, &issue_a, "archive"), 1);
    expected.push(Expect::Status {
        action: "archived",
        issue_id: issue_a.clone(),
    });
    expected.push(Expect::Count(count_message(&project, 1)));
    assert_eq!(set_status(&server, &project, &issue_a, "archive"), 0);
    let a4 = json!({"message": "Checkout failed", "level": "warning", "attempt": 4});
    let r4 = accepted(&server, &project, &a4);
    expected.push(Expect::Event {
        reply: r4,
        data: a4,
    });

    assert_eq!(set_status(&server, &project, &issue_a, "unresolve"), 1);
    expected.push(Expect::Status {
        action: "unresolved",
        issue_id: issue_a.clone(),
    });
    expected.push(Expect::Count(count_message(&project, 2)));
    assert_eq!(set_status(&server, &project, &issue_a, "unresolve"), 0);

    // Discard: the issue's later events are not streamed.
    assert_eq!(set_status(&server, &project, &issue_b, "discard"), 1);
    expected.push(Expect::Status {
        action: "discarded",
        issue_id: issue_b.clone(),
    });
    expected.push(Expect::Count(count_message(&project, 1)));
    assert_eq!(set_status(&server, &project, &issue_b, "discard"), 0);
    let (status, reply) = server.event(&project.ingest_key, &b1);
    assert_eq!(
        (status, &reply["status"]),
        (202, &json!("discarded")),
        "{reply}"
    );

    // A last new issue proves nothing else came in between.
    let c1 = json!({"message": "Marker", "level": "info"});
    let r_c1 = accepted(&server, &project, &c1);
    expected.extend(new_issue(&r_c1, &c1, "info", count_message(&project, 2)));

    check_all(&mut subscribers, &expected);
}

#[test]
fn projects_never_see_each_others_messages() {
    let server = Server::start();
    let shop = server.project("Shop");
    let blog = server.project("Blog");
    let mut shop_subscribers =
        subscribers_on_both_shards(&server, &stream_path(&shop), SUBSCRIBERS_MIN);
    let mut blog_subscribers =
        subscribers_on_both_shards(&server, &stream_path(&blog), SUBSCRIBERS_MIN);

    let shop_event = json!({"message": "shop broke", "shared": "same text in both"});
    let r_shop = accepted(&server, &shop, &shop_event);
    // Read before the status change: a newer state of an issue replaces one still waiting
    // unsent (PROTOCOL section 6), which a busy machine can leave waiting.
    check_all(
        &mut shop_subscribers,
        &new_issue(&r_shop, &shop_event, "error", count_message(&shop, 1)),
    );
    assert_eq!(
        set_status(&server, &shop, &r_shop["issue_id"], "resolve"),
        1
    );
    let blog_event = json!({"message": "blog broke", "shared": "same text in both"});
    let r_blog = accepted(&server, &blog, &blog_event);
    let shop_marker = json!({"message": "shop marker"});
    let r_shop_marker = accepted(&server, &shop, &shop_marker);

    let mut shop_expected = vec![Expect::Status {
        action: "resolved",
        issue_id: r_shop["issue_id"].clone(),
    }];
    shop_expected.push(Expect::Count(count_message(&shop, 0)));
    shop_expected.extend(new_issue(
        &r_shop_marker,
        &shop_marker,
        "error",
        count_message(&shop, 1),
    ));
    check_all(&mut shop_subscribers, &shop_expected);

    // The blog's first messages are its own event's: nothing of the shop arrived before.
    check_all(
        &mut blog_subscribers,
        &new_issue(&r_blog, &blog_event, "error", count_message(&blog, 1)),
    );
    // And nothing of the shop after: the blog's next messages are its own marker's.
    let blog_marker = json!({"message": "blog marker"});
    let r_blog_marker = accepted(&server, &blog, &blog_marker);
    check_all(
        &mut blog_subscribers,
        &new_issue(
            &r_blog_marker,
            &blog_marker,
            "error",
            count_message(&blog, 2),
        ),
    );
}

/// A subscriber's filters as sent, and what they let through (level, environment).
struct FilterCase {
    /// `subscribe` messages sent in order; the last one decides.
    subscribes: Vec<Value>,
    matches: fn(&str, Option<&str>) -> bool,
}

fn filter_cases() -> Vec<FilterCase> {
    fn all(_: &str, _: Option<&str>) -> bool {
        true
    }
    vec![
        // No subscribe at all.
        FilterCase {
            subscribes: vec![],
            matches: all,
        },
        FilterCase {
            subscribes: vec![json!({"type": "subscribe", "filters": {"level": "error"}})],
            matches: |level, _| level == "error",
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"level": ["fatal", "error"]}}),
            ],
            matches: |level, _| level == "fatal" || level == "error",
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"environment": "production"}}),
            ],
            matches: |_, env| env == Some("production"),
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"environment": ["production", "staging"]}}),
            ],
            matches: |_, env| env == Some("production") || env == Some("staging"),
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"level": "error", "environment": "production"}}),
            ],
            matches: |level, env| level == "error" && env == Some("production"),
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"level": "debug"}}),
                json!({"type": "subscribe", "filters": {"level": ["error", "warning"], "environment": ["production", "dev"]}}),
            ],
            matches: |level, env| {
                (level == "error" || level == "warning")
                    && (env == Some("production") || env == Some("dev"))
            },
        },
        // Cleared by null, by "" and by leaving the filters out.
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"level": "debug", "environment": "dev"}}),
                json!({"type": "subscribe", "filters": {"level": null, "environment": null}}),
            ],
            matches: all,
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"level": "fatal"}}),
                json!({"type": "subscribe", "filters": {"level": "", "environment": ""}}),
            ],
            matches: all,
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"environment": "staging"}}),
                json!({"type": "subscribe"}),
            ],
            matches: all,
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"environment": "staging"}}),
                json!({"type": "subscribe", "filters": {}}),
            ],
            matches: all,
        },
        FilterCase {
            subscribes: vec![
                json!({"type": "subscribe", "filters": {"level": "info"}}),
                json!({"type": "subscribe", "filters": null}),
            ],
            matches: all,
        },
    ]
}

/// A filter value as a set of strings; null, "" and missing are the empty set.
fn filter_set(value: &Value) -> Vec<String> {
    let mut set: Vec<String> = match value {
        Value::String(s) if !s.is_empty() => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => vec![],
    };
    set.sort();
    set
}

fn check_filters_updated(reply: &Value, subscribe: &Value) {
    assert_eq!(reply["type"], "filters_updated", "{reply}");
    assert!(reply["filters"].is_object(), "{reply}");
    for name in ["level", "environment"] {
        assert_eq!(
            filter_set(&reply["filters"][name]),
            filter_set(&subscribe["filters"][name]),
            "{name} in {reply} for {subscribe}"
        );
    }
}

#[test]
fn filters_deliver_exactly_the_matching_events() {
    let server = Server::start();
    let project = server.project("Filter Shop");
    let cases = filter_cases();
    // Two subscribers per case, all opened before any filter is set, so cases spread over shards.
    let mut subscribers =
        subscribers_on_both_shards(&server, &stream_path(&project), cases.len() * 2);
    let extra = subscribers.len() - cases.len() * 2;
    let subscribers_of_cases: Vec<_> = subscribers.drain(extra..).collect();
    drop(subscribers);
    let mut subscribers = subscribers_of_cases;
    for (index, (ws, _)) in subscribers.iter_mut().enumerate() {
        for subscribe in &cases[index / 2].subscribes {
            ws.send(Message::text(subscribe.to_string())).unwrap();
            check_filters_updated(&next_json(ws), subscribe);
        }
    }

    // Every level with every way of (not) naming an environment; each event opens its own issue.
    let levels = ["fatal", "error", "warning", "info", "debug"];
    let environments: Vec<(Value, Option<&str>)> = vec![
        (json!({}), None),
        (json!({"environment": "production"}), Some("production")),
        (json!({"environment": "staging"}), Some("staging")),
        (json!({"environment": "dev"}), Some("dev")),
        (json!({"environment": "Production"}), Some("Production")),
        (
            json!({"tags": {"environment": "production"}}),
            Some("production"),
        ),
        (
            json!({"tags": {"environment": "staging", "release": "r1"}}),
            Some("staging"),
        ),
        (
            json!({"environment": "staging", "tags": {"environment": "production"}}),
            Some("staging"),
        ),
        (
            json!({"environment": "production", "tags": {"environment": "dev"}}),
            Some("production"),
        ),
    ];
    let mut sent = Vec::new();
    for level in levels {
        for (fields, environment) in &environments {
            let mut event = fields.clone();
            let n = sent.len();
            event["message"] = json!(format!("filtered event {n}"));
            event["level"] = json!(level);
            event["n"] = json!(n);
            sent.push((event, level, *environment));
        }
    }
    // The marker every filter lets through, last.
    sent.push((
        json!({"message": "filter marker", "level": "error", "environment": "production"}),
        "error",
        Some("production"),
    ));
    let replies: Vec<Value> = sent
        .iter()
        .map(|(event, _, _)| accepted(&server, &project, event))
        .collect();
    // Status and count messages are not filtered: resolving a debug/dev issue reaches everyone.
    let debug_dev = sent
        .iter()
        .position(|(_, level, env)| *level == "debug" && *env == Some("dev"))
        .unwrap();
    let debug_issue = replies[debug_dev]["issue_id"].clone();
    assert_eq!(set_status(&server, &project, &debug_issue, "resolve"), 1);

    for (index, (ws, _)) in subscribers.iter_mut().enumerate() {
        let case = &cases[index / 2];
        let mut expected = Vec::new();
        for (number, ((event, level, environment), reply)) in sent.iter().zip(&replies).enumerate()
        {
            if (case.matches)(level, *environment) {
                expected.push(Expect::Created {
                    issue_id: reply["issue_id"].clone(),
                    title: event["message"].as_str().unwrap().to_string(),
                    level: level.to_string(),
                });
                expected.push(Expect::Event {
                    reply: reply.clone(),
                    data: event.clone(),
                });
            }
            expected.push(Expect::Count(count_message(&project, number as u64 + 1)));
        }
        expected.push(Expect::Status {
            action: "resolved",
            issue_id: debug_issue.clone(),
        });
        expected.push(Expect::Count(count_message(
            &project,
            sent.len() as u64 - 1,
        )));
        check_sequence(ws, &expected, &format!("filters {:?}", case.subscribes));
    }
}

#[test]
fn bad_client_messages_get_an_error_and_the_connection_stays_open() {
    let server = Server::start();
    let project = server.project("Error Shop");
    let mut subscribers = subscribers_on_both_shards(&server, &stream_path(&project), 2);
    let bad: Vec<Message> = vec![
        Message::text("{not json"),
        Message::text("[]"),
        Message::text(r#"{"type":"unsubscribe"}"#),
        Message::text(r#"{"filters":{"level":"error"}}"#),
        Message::binary(br#"{"type":"subscribe","filters":{}}"#.to_vec()),
        Message::text(r#"{"type":"subscribe","filters":{"level":3}}"#),
        Message::text(r#"{"type":"subscribe","filters":{"level":{"is":"error"}}}"#),
        Message::text(r#"{"type":"subscribe","filters":{"level":[1,2]}}"#),
        Message::text(r#"{"type":"subscribe","filters":{"environment":7}}"#),
        Message::text(r#"{"type":"subscribe","filters":{"environment":["production",false]}}"#),
        Message::text(r#"{"type":"subscribe","filters":{"level":"loud"}}"#),
        Message::text(r#"{"type":"subscribe","filters":{"level":["error","LOUD"]}}"#),
        Message::text(r#"{"type":"subscribe","filters":"error"}"#),
    ];
    for (ws, _) in subscribers.iter_mut() {
        for message in &bad {
            ws.send(message.clone()).unwrap();
            let reply = next_json(ws);
            assert_eq!(reply["type"], "error", "{message:?} -> {reply}");
            assert!(
                reply["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{reply}"
            );
            // Still open and still listening.
            let subscribe =
                json!({"type": "subscribe", "filters": {"level": ["error", "warning"]}});
            ws.send(Message::text(subscribe.to_string())).unwrap();
            check_filters_updated(&next_json(ws), &subscribe);
        }
    }
    // And the stream still flows through the last good filters.
    let info = json!({"message": "quiet", "level": "info"});
    let r_info = accepted(&server, &project, &info);
    let error = json!({"message": "loud", "level": "error"});
    let r_error = accepted(&server, &project, &error);
    let mut expected = vec![Expect::Count(count_message(&project, 1))];
    expected.extend(new_issue(
        &r_error,
        &error,
        "error",
        count_message(&project, 2),
    ));
    assert_ne!(r_info["issue_id"], r_error["issue_id"]);
    check_all(&mut subscribers, &expected);
}

/// The status and JSON body of a refused stream handshake.
fn refused(server: &Server, path: &str, authorization: Option<&str>) -> (u16, Value) {
    let mut request = server.ws_url(path).into_client_request().unwrap();
    if let Some(value) = authorization {
        request
            .headers_mut()
            .insert("authorization", value.parse().unwrap());
    }
    match tungstenite::client(request, server.connect()) {
        Ok(_) => panic!("{path} was upgraded"),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let body = response.body().as_deref().unwrap_or_default();
            let body = serde_json::from_slice(body).unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
        Err(other) => panic!("{path}: {other}"),
    }
}

#[test]
fn stream_refusals_come_before_the_upgrade() {
    let server = Server::start();
    let shop = server.project("Auth Shop");
    let blog = server.project("Auth Blog");
    let unauthorized = json!({"error": "unauthorized"});
    let forbidden = json!({"error": "forbidden"});
    let path = |key: &str| format!("/stream/projects/{}?key={key}", shop.id);
    let unknown_key = format!("mshd_{}", "ab".repeat(24));

    assert_eq!(
        refused(&server, &format!("/stream/projects/{}", shop.id), None),
        (401, unauthorized.clone())
    );
    assert_eq!(
        refused(&server, &format!("/ws/stream/projects/{}", shop.slug), None),
        (401, unauthorized.clone())
    );
    assert_eq!(
        refused(&server, &path(&unknown_key), None),
        (401, unauthorized.clone())
    );
    assert_eq!(
        refused(&server, &path("garbage"), None),
        (401, unauthorized.clone())
    );
    assert_eq!(
        refused(
            &server,
            &format!("/stream/projects/{}", shop.id),
            Some(&format!("Bearer {unknown_key}"))
        ),
        (401, unauthorized.clone())
    );
    assert_eq!(
        refused(&server, &path(&shop.ingest_key), None),
        (403, forbidden.clone())
    );
    assert_eq!(
        refused(
            &server,
            &format!("/stream/projects/{}", shop.slug),
            Some(&format!("Bearer {}", shop.ingest_key))
        ),
        (403, forbidden.clone())
    );
    assert_eq!(
        refused(&server, &path(&blog.dashboard_key), None),
        (403, forbidden.clone())
    );
    assert_eq!(
        refused(
            &server,
            &format!("/ws/stream/projects/{}", shop.slug),
            Some(&blog.dashboard_key)
        ),
        (403, forbidden.clone())
    );
    let (status, _) = refused(
        &server,
        &format!(
            "/stream/projects/{}?key={}",
            uuid::Uuid::new_v4(),
            shop.dashboard_key
        ),
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = refused(
        &server,
        &format!(
            "/ws/stream/projects/no-such-shop?key={}",
            shop.dashboard_key
        ),
        None,
    );
    assert_eq!(status, 404);

    // A dashboard key works until it is revoked, then on no shard.
    let (status, created) = server.post(
        &format!("/api/v1/projects/{}/keys", shop.slug),
        Some(ADMIN_TOKEN),
        &json!({"scope": "dashboard", "label": "wall screen"}),
    );
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let mut live = subscribers_on_both_shards(&server, &path(&key), 2);
    for (_, first) in &live {
        assert_eq!(welcome(first), count_message(&shop, 0));
    }
    let (status, body) = server.post(
        &format!("/api/v1/keys/{}/revoke", created["id"].as_str().unwrap()),
        Some(ADMIN_TOKEN),
        &json!({}),
    );
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let mut metrics = MetricsConn::open(&server);
    let before = metrics.accepted_by_shard();
    // PROTOCOL allows a second; the server applies a revocation on every shard before its 200.
    let revoked_everywhere = {
        (0..4).all(|_| {
            let mut request = server.ws_url(&path(&key)).into_client_request().unwrap();
            request
                .headers_mut()
                .insert("x-sentry-auth", key.parse().unwrap());
            match tungstenite::client(request, server.connect()) {
                Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                    r.status().as_u16() == 401
                }
                Ok(_) => false,
                Err(other) => panic!("upgrade with a revoked key: {other:?}"),
            }
        })
    };
    assert!(
        revoked_everywhere,
        "a revoked dashboard key still opens streams"
    );
    // Enough attempts that both shards refused it.
    let mut attempts = 0;
    loop {
        let now = metrics.accepted_by_shard();
        if now.0 > before.0 && now.1 > before.1 {
            break;
        }
        assert_eq!(
            refused(&server, &path(&key), None),
            (401, unauthorized.clone())
        );
        attempts += 1;
        assert!(
            attempts < SPREAD_ATTEMPTS_MAX,
            "every attempt landed on one shard"
        );
    }
    // Subscriptions made before the revocation are not the refusal's business: they still close cleanly.
    for (ws, _) in live.iter_mut() {
        ws.close(None).unwrap();
    }
}

/// Revoking a dashboard key closes the streams opened with it (close 1008) on every shard,
/// and leaves streams opened with other keys alone.
#[test]
fn revoking_a_key_closes_its_open_streams() {
    let server = Server::start();
    let project = server.project("Revoked Streams");
    let (status, key) = server.post(
        &format!("/api/v1/projects/{}/keys", project.id),
        Some(ADMIN_TOKEN),
        &serde_json::json!({"scope": "dashboard"}),
    );
    assert_eq!(status, 201, "{key}");
    let plain = key["key"].as_str().unwrap();
    let path = format!("/stream/projects/{}?key={plain}", project.id);
    let mut doomed: Vec<Ws> = (0..6)
        .map(|_| {
            let mut ws = server.ws(&path).unwrap();
            next_json(&mut ws);
            ws
        })
        .collect();
    let (mut survivor, _) = server.subscribe(&project);
    let (status, _) = server.post(
        &format!("/api/v1/keys/{}/revoke", key["id"].as_str().unwrap()),
        Some(ADMIN_TOKEN),
        &serde_json::json!({}),
    );
    assert_eq!(status, 200);
    for ws in doomed.iter_mut() {
        loop {
            match ws.read() {
                Ok(tungstenite::Message::Close(Some(frame))) => {
                    assert_eq!(u16::from(frame.code), 1008);
                    break;
                }
                Ok(tungstenite::Message::Text(_)) | Ok(tungstenite::Message::Ping(_)) => continue,
                other => panic!("expected close 1008, got {other:?}"),
            }
        }
    }
    let (status, _) = server.event(
        &project.ingest_key,
        &serde_json::json!({"message": "still here"}),
    );
    assert_eq!(status, 202);
    assert_eq!(
        next_of_type(&mut survivor, "event")["data"]["message"],
        "still here"
    );
}
