//! Several nodes as one Mesher (PROTOCOL section 10): real server processes sharing one
//! PostgreSQL schema and one NATS server.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The NATS the test script found or started.
fn nats_url() -> String {
    std::env::var("MESHER_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `count` nodes on one fresh schema and `nats`; the first starts alone so that it applies
/// the migrations.
fn start_nodes(count: usize, nats: &str, extra: &[&str]) -> Vec<Server> {
    let url = fresh_schema_url();
    (0..count)
        .map(|index| {
            let node_id = format!("node-{index}");
            let mut args = vec!["--nats-url", nats, "--node-id", &node_id];
            args.extend(extra);
            Server::start_on_database(&url, &args)
        })
        .collect()
}

/// The messages a dashboard gets after its first, until it has `events` events.
fn read_events(ws: &mut Ws, events: usize) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut seen = 0;
    while seen < events {
        let message = next_json(ws);
        if message["type"] == "event" {
            seen += 1;
        }
        messages.push(message);
    }
    messages
}

/// What must be identical between dashboards: each message's type, offset and subject.
fn shape(message: &Value) -> Value {
    json!({
        "type": message["type"],
        "offset": message["offset"],
        "event_id": message["event_id"],
        "issue_id": message["issue_id"],
        "action": message["action"],
        "count": message["count"],
        "event_count": message["issue"]["event_count"],
    })
}

/// Waits (up to 1 s, PROTOCOL section 10) until every node knows the project.
fn wait_known(nodes: &[Server], project: &Project) {
    let path = format!("/api/v1/projects/{}/issues", project.id);
    for node in nodes {
        let known = wait_until(Duration::from_secs(1), || {
            node.get(&path, Some(&project.dashboard_key)).0 == 200
        });
        assert!(known, "node {} learns of the project within 1 s", node.addr);
    }
}

fn accepted_event_id(reply: &(u16, Value)) -> Option<String> {
    (reply.0 == 202).then(|| reply.1["event_id"].as_str().unwrap().to_string())
}

#[test]
fn three_nodes_act_as_one_mesher() {
    let nodes = start_nodes(3, &nats_url(), &[]);
    let project = nodes[0].project("shop");
    // The project (created through node 0) reaches the others.
    wait_known(&nodes, &project);
    // A dashboard on each node, connected before anything happens.
    let mut dashboards: Vec<(Ws, Value)> = nodes.iter().map(|n| n.subscribe(&project)).collect();
    for (_, first) in &dashboards {
        assert_eq!(first["type"], "issue_count", "{first}");
        assert!(first["epoch"].is_string(), "{first}");
    }
    let epoch = dashboards[0].1["epoch"].clone();
    assert!(dashboards.iter().all(|(_, first)| first["epoch"] == epoch));
    let posted_total = 300;
    let readers: Vec<_> = dashboards
        .drain(..)
        .map(|(mut ws, _)| thread::spawn(move || read_events(&mut ws, posted_total)))
        .collect();

    // 30 fingerprints, 10 events each, posted round-robin to the three nodes.
    let mut posted = 0;
    for round in 0..10 {
        for fingerprint in 0..30 {
            let node = &nodes[posted % 3];
            let event = json!({
                "message": format!("failure {fingerprint}"),
                "level": "error",
                "fingerprint": [format!("fp-{fingerprint}")],
                "tags": {"round": round.to_string()},
            });
            let (status, body) = node.event(&project.ingest_key, &event);
            assert_eq!(status, 202, "{body}");
            posted += 1;
        }
    }
    // Every node sees the same 30 issues, 10 events each.
    for node in &nodes {
        let issues = node.all_issues(&project);
        assert_eq!(issues.len(), 30, "issues through {}", node.addr);
        assert!(
            issues.iter().all(|issue| issue["event_count"] == 10),
            "{issues:?}"
        );
    }
    // Every dashboard got the same messages, in the same order, with the same offsets.
    assert_eq!(posted, posted_total);
    let sequences: Vec<Vec<Value>> = readers
        .into_iter()
        .map(|reader| reader.join().unwrap().iter().map(shape).collect())
        .collect();
    // Events and issue messages: the same on every node, in the same order, with the same
    // offsets. A count waiting unsent is replaced by a newer one (PROTOCOL section 6), so
    // counts are compared by what they say last.
    let (counts, others): (Vec<Vec<Value>>, Vec<Vec<Value>>) = sequences
        .iter()
        .map(|messages| {
            messages
                .iter()
                .cloned()
                .partition(|m| m["type"] == "issue_count")
        })
        .unzip();
    assert_eq!(others[0].len(), posted + 30, "events and issues created");
    let offsets: Vec<u64> = others[0]
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[1] > w[0]), "offsets only grow");
    assert_eq!(others[1], others[0], "node 1's dashboard");
    assert_eq!(others[2], others[0], "node 2's dashboard");
    for counts in &counts {
        let said: Vec<u64> = counts
            .iter()
            .map(|m| m["count"].as_u64().unwrap())
            .collect();
        assert!(said.windows(2).all(|w| w[1] > w[0]), "{said:?}");
        assert_eq!(said.last(), Some(&30));
    }

    // No issue was ever made twice: the database holds exactly 30.
    let mut store = nodes[0].store_reader();
    let StoreReader::Postgres(client) = &mut store else {
        unreachable!("nodes share PostgreSQL")
    };
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT fingerprint_hash) FROM issues",
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (30, 30));
    store.assert_event_rows(posted as u64);
    // Exactly one node took the project over; the others forwarded to it and mirrored it.
    let metric = |node: &Server, name: &str| node.metric(name);
    let taken: f64 = nodes
        .iter()
        .map(|n| {
            metric(
                n,
                "mesher_cluster_ownership_changes_total{change=\"taken\"}",
            )
        })
        .sum();
    assert_eq!(taken, 1.0, "one owner for the project");
    let forwarded: f64 = nodes
        .iter()
        .map(|n| {
            metric(
                n,
                "mesher_cluster_forwarded_requests_total{outcome=\"answered\"}",
            )
        })
        .sum();
    assert!(
        forwarded >= 200.0,
        "two thirds of the posts went to the owner: {forwarded}"
    );
    let mirrored: f64 = nodes
        .iter()
        .map(|n| metric(n, "mesher_cluster_mirrored_messages_total"))
        .sum();
    assert!(
        mirrored >= 2.0 * 360.0,
        "two mirrors got every message: {mirrored}"
    );
    assert!(nodes
        .iter()
        .all(|n| metric(n, "mesher_nats_sent_bytes_total") > 0.0));

    // The project's rate limit holds across nodes: one owner counts for all.
    let limited = nodes[1].project("limited");
    wait_known(&nodes, &limited);
    nodes[2].set_project(&limited, json!({"rate_limit_per_minute": 20}));
    thread::sleep(Duration::from_secs(1));
    let mut accepted = 0;
    for index in 0..45 {
        let (status, body) = nodes[index % 3].event(&limited.ingest_key, &json!({"message": "x"}));
        match status {
            202 => accepted += 1,
            429 => {}
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(
        accepted, 20,
        "the limit of 20 per minute across three nodes"
    );

    // Another project's issue is 403 through every node, owner or not; an unknown one 404.
    let issue_id = nodes[0].all_issues(&project)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let unknown = uuid::Uuid::new_v4();
    for node in &nodes {
        let (status, body) = node.get(
            &format!("/api/v1/issues/{issue_id}"),
            Some(&limited.dashboard_key),
        );
        assert_eq!(status, 403, "{body} through {}", node.addr);
        let (status, body) = node.get(
            &format!("/api/v1/issues/{unknown}"),
            Some(&limited.dashboard_key),
        );
        assert_eq!(status, 404, "{body} through {}", node.addr);
    }
}

/// Messages until (and with) the first one `done` says is the last.
fn read_until(ws: &mut Ws, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut messages = Vec::new();
    loop {
        let message = next_json(ws);
        let last = done(&message);
        messages.push(message);
        if last {
            return messages;
        }
    }
}

/// A dashboard of a project owned by another node resumes there as on the owner: at the
/// upgrade or by a `subscribe` with `since`, the owner's history replays exactly what it
/// missed, then live messages follow with no gap; an unknown epoch does not recover.
#[test]
fn a_dashboard_resumes_on_a_node_that_does_not_own_the_project() {
    let nodes = start_nodes(2, &nats_url(), &[]);
    let project = nodes[0].project("resume");
    wait_known(&nodes, &project);
    // Node 0 takes the project over with its first event.
    let (status, body) = nodes[0].event(&project.ingest_key, &json!({"message": "first"}));
    assert_eq!(status, 202, "{body}");
    let (mut ws, welcome) = nodes[1].subscribe(&project);
    let epoch = welcome["epoch"].as_str().unwrap().to_string();
    let post = |node: &Server, n: usize| {
        // The first event's issue: no issue or count message between the events.
        let (status, body) = node.event(&project.ingest_key, &json!({"message": "first", "n": n}));
        assert_eq!(status, 202, "{body}");
    };
    post(&nodes[0], 0);
    let seen = read_until(&mut ws, |m| m["type"] == "event");
    let last_seen = seen.last().unwrap()["offset"].as_u64().unwrap();
    drop(ws);
    // Missed while away: five events, posted through both nodes.
    for n in 1..=5 {
        post(&nodes[n % 2], n);
    }
    let missed: Vec<u64> = (last_seen + 1..=last_seen + 5).collect();
    let stream_path = format!(
        "/stream/projects/{}?key={}",
        project.id, project.dashboard_key
    );
    let mut at_upgrade = nodes[1]
        .ws(&format!("{stream_path}&since={epoch}:{last_seen}"))
        .unwrap();
    let mut by_subscribe = nodes[1].ws(&stream_path).unwrap();
    for ws in [&mut at_upgrade, &mut by_subscribe] {
        let welcome = next_json(ws);
        assert_eq!(welcome["epoch"], epoch.as_str(), "{welcome}");
        assert_eq!(welcome["offset"], last_seen + 5, "{welcome}");
    }
    let subscribe = json!({"type": "subscribe", "filters": {},
        "since": {"epoch": epoch, "offset": last_seen}});
    by_subscribe
        .send(tungstenite::Message::text(subscribe.to_string()))
        .unwrap();
    assert_eq!(next_json(&mut by_subscribe)["type"], "filters_updated");
    for ws in [&mut at_upgrade, &mut by_subscribe] {
        let mut replay = read_until(ws, |m| m["type"] == "resumed");
        let resumed = replay.pop().unwrap();
        assert_eq!(
            resumed,
            json!({"type": "resumed", "recovered": true, "replayed": 5, "offset": last_seen + 5})
        );
        let offsets: Vec<u64> = replay
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, missed, "{replay:?}");
        let ns: Vec<u64> = replay
            .iter()
            .map(|m| m["data"]["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, [1, 2, 3, 4, 5]);
    }
    // Live from there on, with the next offset.
    post(&nodes[0], 6);
    for ws in [&mut at_upgrade, &mut by_subscribe] {
        let live = next_of_type(ws, "event");
        assert_eq!(live["offset"], last_seen + 6, "{live}");
        assert_eq!(live["data"]["n"], 6, "{live}");
    }
    // Another epoch (a restarted owner's, say) does not recover: reload over the REST API.
    let mut stale = nodes[1]
        .ws(&format!("{stream_path}&since=older:{last_seen}"))
        .unwrap();
    next_json(&mut stale);
    let resumed = next_of_type(&mut stale, "resumed");
    assert_eq!(
        resumed,
        json!({"type": "resumed", "recovered": false, "epoch": epoch, "offset": last_seen + 6})
    );
}

/// The owner publishes a project's stream over NATS only while another node mirrors it: a
/// mirror renews its interest, so its dashboard gets every message long past the first lease;
/// a project no other node watches costs no NATS traffic once the lease after its takeover
/// has lapsed, while its dashboards on the owner get everything.
#[test]
fn streams_are_published_only_while_another_node_mirrors_them() {
    let nodes = start_nodes(2, &nats_url(), &[]);
    let watched = nodes[0].project("mirrored");
    let unwatched = nodes[0].project("not mirrored");
    wait_known(&nodes, &watched);
    wait_known(&nodes, &unwatched);
    let post = |project: &Project, n: u64| {
        let (status, body) = nodes[0].event(&project.ingest_key, &json!({"message": "m", "n": n}));
        assert_eq!(status, 202, "{body}");
    };
    // Node 0 takes both over.
    post(&watched, 0);
    post(&unwatched, 0);
    let (mut ws, _) = nodes[1].subscribe(&watched);
    // Past the lease that follows a takeover (30 s): the mirror's renewals keep it going.
    let mut last_offset = None;
    for n in 1..=17 {
        post(&watched, n);
        let event = next_of_type(&mut ws, "event");
        assert_eq!(event["data"]["n"], n, "{event}");
        let offset = event["offset"].as_u64().unwrap();
        if let Some(last) = last_offset {
            assert_eq!(offset, last + 1, "no gap");
        }
        last_offset = Some(offset);
        thread::sleep(Duration::from_secs(2));
    }
    let published = "mesher_cluster_published_messages_total";
    let before = nodes[0].metric(published);
    for n in 1..=10 {
        post(&unwatched, n);
    }
    assert_eq!(
        nodes[0].metric(published),
        before,
        "nobody else watches: nothing published"
    );
    // A dashboard on the owner gets its messages all the same, still without NATS.
    let (mut local, _) = nodes[0].subscribe(&unwatched);
    post(&unwatched, 11);
    assert_eq!(next_of_type(&mut local, "event")["data"]["n"], 11);
    assert_eq!(nodes[0].metric(published), before);
    post(&watched, 18);
    assert_eq!(
        next_of_type(&mut ws, "event")["offset"],
        last_offset.unwrap() + 1
    );
    assert_eq!(nodes[0].metric(published), before + 1.0);
}

#[test]
fn a_key_revoked_on_one_node_is_refused_by_another_within_a_second() {
    let nodes = start_nodes(3, &nats_url(), &[]);
    let project = nodes[0].project("keys");
    let (status, key) = nodes[0].post(
        &format!("/api/v1/projects/{}/keys", project.id),
        Some(ADMIN_TOKEN),
        &json!({"scope": "dashboard", "label": "wall"}),
    );
    assert_eq!(status, 201, "{key}");
    let plain = key["key"].as_str().unwrap().to_string();
    let issues_path = format!("/api/v1/projects/{}/issues", project.id);
    assert!(wait_until(Duration::from_secs(1), || {
        nodes[2].get(&issues_path, Some(&plain)).0 == 200
    }));
    let mut stream = nodes[2]
        .ws(&format!("/stream/projects/{}?key={plain}", project.id))
        .unwrap();
    assert_eq!(next_json(&mut stream)["type"], "issue_count");

    let (status, body) = nodes[0].post(
        &format!("/api/v1/keys/{}/revoke", key["id"].as_str().unwrap()),
        Some(ADMIN_TOKEN),
        &json!({}),
    );
    assert_eq!(status, 200, "{body}");
    let revoked_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || {
            nodes[2].get(&issues_path, Some(&plain)).0 == 401
        }),
        "node 2 refuses the key within 1 s"
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    // The stream opened with it on node 2 is closed (1008).
    loop {
        match stream.read() {
            Ok(tungstenite::Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
                break;
            }
            Ok(_) => continue,
            Err(error) => panic!("closed without a close frame: {error}"),
        }
    }
}

/// Posts events to `node` until `stop`, recording the ids answered 202 and every status with
/// the time its request was sent.
fn post_until(
    node: &Server,
    key: &str,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<String>>>,
    statuses: Arc<Mutex<Vec<(Instant, u16)>>>,
) -> thread::JoinHandle<()> {
    let url = node.url("/api/v1/events");
    let key = format!("Bearer {key}");
    thread::spawn(move || {
        let agent = http_agent();
        let mut index = 0u64;
        while !stop.load(Ordering::Relaxed) {
            index += 1;
            let body = json!({"message": format!("load {}", index % 7), "level": "error"});
            let headers = [
                ("authorization", key.as_str()),
                ("content-type", "application/json"),
            ];
            let sent_at = Instant::now();
            let status = match try_http_exchange(
                &agent,
                "POST",
                &url,
                &headers,
                Some(body.to_string().as_bytes()),
            ) {
                Ok(reply) => {
                    if reply.status == 202 {
                        let id = reply.json()["event_id"].as_str().unwrap().to_string();
                        accepted.lock().unwrap().push(id);
                    }
                    reply.status
                }
                Err(_) => 0,
            };
            statuses.lock().unwrap().push((sent_at, status));
            thread::sleep(Duration::from_millis(5));
        }
    })
}

#[test]
fn the_owner_killed_under_load_loses_no_acknowledged_event() {
    let mut nodes = start_nodes(3, &nats_url(), &["--ack", "durable"]);
    let project = nodes[0].project("failover");
    // Node 0 takes the project over with the first event.
    let first = nodes[0].event(&project.ingest_key, &json!({"message": "first"}));
    let mut acknowledged = vec![accepted_event_id(&first).expect("first event accepted")];
    wait_known(&nodes, &project);
    let mut dashboards: Vec<(Ws, Value)> =
        nodes[1..].iter().map(|n| n.subscribe(&project)).collect();
    let old_epoch = dashboards[0].1["epoch"].clone();
    assert_eq!(dashboards[1].1["epoch"], old_epoch);

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let posters: Vec<_> = nodes[1..]
        .iter()
        .map(|node| {
            post_until(
                node,
                &project.ingest_key,
                stop.clone(),
                accepted.clone(),
                statuses.clone(),
            )
        })
        .collect();
    // A Sentry event the owner took, with the id the SDK gave it.
    let sentry_event = json!({"event_id": "5e1f0000000000000000000000000001", "message": "sdk"});
    let send_sentry = |node: &Server| {
        let auth = format!("Sentry sentry_key={}, sentry_version=7", project.ingest_key);
        node.request_with(
            "POST",
            &format!("/api/{}/store/", project.number),
            &[("x-sentry-auth", &auth)],
            Some(sentry_event.to_string().as_bytes()),
        )
    };
    let reply = send_sentry(&nodes[0]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    nodes[0].signal(libc::SIGKILL);
    thread::sleep(Duration::from_secs(4));
    // Posts on the surviving nodes succeed again well within 15 s.
    let recovered = wait_until(Duration::from_secs(15), || {
        statuses
            .lock()
            .unwrap()
            .iter()
            .any(|(at, status)| *at > killed_at + Duration::from_secs(1) && *status == 202)
    });
    assert!(recovered, "posts succeed again after the owner died");
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for poster in posters {
        poster.join().unwrap();
    }
    let after_kill: Vec<(Instant, u16)> = statuses
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at > killed_at)
        .copied()
        .collect();
    assert!(
        after_kill.iter().all(|(_, s)| *s == 202 || *s == 503),
        "while the project changes hands, posts are answered 503 with Retry-After, never an \
         error: {after_kill:?}"
    );
    let (taken_at, _) = *after_kill
        .iter()
        .find(|(_, s)| *s == 202)
        .expect("a post after the kill succeeded");
    let late: Vec<u16> = after_kill
        .iter()
        .filter(|(at, _)| *at > taken_at + Duration::from_secs(1))
        .map(|(_, s)| *s)
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|s| *s == 202),
        "once taken over, every post succeeds: {late:?}"
    );
    eprintln!(
        "first post accepted {:?} after the kill",
        taken_at.duration_since(killed_at)
    );
    // Every event answered 202 is in PostgreSQL.
    acknowledged.extend(accepted.lock().unwrap().iter().cloned());
    let mut store = nodes[1].store_reader();
    let stored = store.event_ids();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing: {missing:?}",
        missing.len()
    );
    // The SDK's retry through another node after the takeover is still known as one.
    let reply = send_sentry(&nodes[1]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let duplicates: f64 = nodes[1..]
        .iter()
        .map(|node| node.metric("mesher_events_rejected_total{reason=\"duplicate\"}"))
        .sum();
    assert_eq!(duplicates, 1.0, "the new owner remembered the id");
    // The dashboards on the surviving nodes go on, after a new epoch.
    for (ws, _) in &mut dashboards {
        let mut new_epoch = None;
        while new_epoch.is_none() {
            let message = next_json(ws);
            if message["type"] == "issue_count" && message["epoch"].is_string() {
                new_epoch = Some(message["epoch"].clone());
            }
        }
        assert_ne!(new_epoch.unwrap(), old_epoch);
        assert_eq!(next_of_type(ws, "event")["type"], "event");
    }
    // Past the lease that follows the takeover: the new owner learned of the surviving mirror.
    thread::sleep(Duration::from_secs(6));
    let (status, body) = nodes[1].event(&project.ingest_key, &json!({"message": "later"}));
    assert_eq!(status, 202, "{body}");
    for (ws, _) in &mut dashboards {
        loop {
            let event = next_of_type(ws, "event");
            if event["data"]["message"] == "later" {
                break;
            }
        }
    }
    let _ = nodes.remove(0).wait(Duration::from_secs(5));
}

/// A node that loses its lock connection while alive (a PostgreSQL hiccup) keeps the other
/// nodes waiting until the store has what it took: the node taking over then finds every event
/// and issue there, and no fingerprint gets a second issue.
#[test]
fn a_node_that_loses_its_lock_hands_over_only_what_is_stored() {
    let nodes = start_nodes(2, &nats_url(), &[]);
    let project = nodes[0].project("handover");
    wait_known(&nodes, &project);
    let post = |node: &Server, fingerprint: &str| {
        node.event(
            &project.ingest_key,
            &json!({"message": fingerprint, "fingerprint": [fingerprint]}),
        )
    };
    // Node 0 takes the project over, and its first issue is stored.
    assert_eq!(post(&nodes[0], "first").0, 202);
    let url = nodes[0].database_url.clone().unwrap();
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        db.query_one("SELECT count(*) FROM issues", &[])
            .unwrap()
            .get::<_, i64>(0)
            == 1
    }));
    // Node 0's writes wait behind a lock the test holds; five events of a new issue queue.
    let mut blocker = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut hold = blocker.transaction().unwrap();
    hold.batch_execute("LOCK TABLE issues IN EXCLUSIVE MODE")
        .unwrap();
    for _ in 0..5 {
        assert_eq!(post(&nodes[0], "queued").0, 202);
    }
    // Node 0's lock connection ends (the project's advisory lock with it).
    let key = uuid::Uuid::parse_str(&project.id).unwrap().as_u64_pair().1 as i64;
    let terminated: bool = db
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'
             AND ((classid::int8 << 32) | objid::int8) = $1",
            &[&key],
        )
        .unwrap()
        .get(0);
    assert!(terminated);
    thread::sleep(Duration::from_secs(2));
    // Meanwhile node 1 is told to come back later, not given the project without those rows.
    let (status, body) = post(&nodes[1], "queued");
    assert_eq!(status, 503, "{body}");
    hold.commit().unwrap();
    // Once node 0's rows are written, node 1 takes over and counts on from them.
    let accepted = wait_until(Duration::from_secs(15), || {
        post(&nodes[1], "queued").0 == 202
    });
    assert!(accepted, "node 1 takes the project over");
    let issues = nodes[1].all_issues(&project);
    let counts: Vec<(String, u64)> = issues
        .iter()
        .map(|i| {
            (
                i["title"].as_str().unwrap().to_string(),
                i["event_count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.contains(&("queued".to_string(), 6)), "{counts:?}");
    let mut store = nodes[1].store_reader();
    store.assert_event_rows(7);
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT fingerprint_hash) FROM issues",
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2, 2));
}

/// A `nats-server` of this test's own, stopped when dropped.
struct OwnNats(std::process::Child);

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `nats-server` of this test's own, on `port`.
fn own_nats(port: u16) -> OwnNats {
    let binary = std::env::var("MESHER_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let child = std::process::Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server (the test script installs it)");
    assert!(wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    OwnNats(child)
}

#[test]
fn nats_stopped_for_five_seconds_fails_only_what_needs_another_node() {
    let port = free_port();
    let nats = own_nats(port);
    let url = format!("nats://127.0.0.1:{port}");
    let nodes = start_nodes(2, &url, &[]);
    let project = nodes[0].project("outage");
    let event = json!({"message": "through the outage"});
    assert_eq!(
        nodes[0].event(&project.ingest_key, &event).0,
        202,
        "node 0 owns it now"
    );
    assert!(wait_until(Duration::from_secs(1), || nodes[1]
        .event(&project.ingest_key, &event)
        .0
        == 202));

    drop(nats);
    let down_at = Instant::now();
    assert!(wait_until(Duration::from_secs(3), || nodes[1]
        .get("/health", None)
        .0
        == 503));
    let (_, health) = nodes[1].get("/health", None);
    assert_eq!(health["nats"], "down", "{health}");
    // Node 1 needs node 0 for this project: 503 with Retry-After. Node 0 serves it alone.
    let reply = nodes[1].request(
        "POST",
        "/api/v1/events",
        Some(&project.ingest_key),
        Some(event.to_string().as_bytes()),
    );
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.header("retry-after").is_some());
    assert_eq!(nodes[0].event(&project.ingest_key, &event).0, 202);
    let (status, issues) = nodes[0].get(
        &format!("/api/v1/projects/{}/issues", project.id),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200, "{issues}");
    // A key made meanwhile cannot reach node 1 over NATS; node 1 reads it once NATS is back.
    let (status, key) = nodes[0].post(
        &format!("/api/v1/projects/{}/keys", project.id),
        Some(ADMIN_TOKEN),
        &json!({"scope": "ingest", "label": "made during the outage"}),
    );
    assert_eq!(status, 201, "{key}");
    let new_key = key["key"].as_str().unwrap().to_string();

    thread::sleep(Duration::from_secs(5).saturating_sub(down_at.elapsed()));
    let _nats = own_nats(port);
    // Without restarting a node, everything works again.
    assert!(
        wait_until(Duration::from_secs(15), || nodes[1]
            .event(&project.ingest_key, &event)
            .0
            == 202),
        "node 1 reaches the owner again"
    );
    assert_eq!(nodes[1].get("/health", None).0, 200);
    let issues = nodes[1].all_issues(&project);
    assert_eq!(issues.len(), 1);
    assert!(
        wait_until(Duration::from_secs(5), || nodes[1]
            .event(&new_key, &event)
            .0
            == 202),
        "node 1 knows the key made while NATS was down"
    );
}
