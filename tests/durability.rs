//! What a 202 promises (PROTOCOL section 4): nothing lost at SIGTERM, nothing acknowledged lost at
//! a crash with `--ack durable`, state kept across restarts, and a PostgreSQL restart survived.
//! Counts are read from the store directly, not only through the API.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

on_both_backends!(
    every_accepted_event_is_stored_at_sigterm,
    durable_acks_survive_a_crash_under_load,
    restart_keeps_grouping_status_keys_and_settings,
);

/// Events sent before SIGTERM.
const EVENTS_BEFORE_SIGTERM: usize = 500;
/// Acknowledged events after which the server is killed in the middle of the load.
const ACKED_BEFORE_KILL: usize = 200;
/// Client threads of the loads.
const CLIENT_THREADS: usize = 3;
/// Distinct messages (issues) of the loads.
const LOAD_ISSUES: usize = 5;
/// Longest a test waits for something it expects (a load to progress, storage to come back).
const WAIT_LIMIT: Duration = Duration::from_secs(40);

/// Restarts the server (SIGTERM, then the same store) and checks that the project's issues read
/// the same as before; `what` names the check. Returns the restarted server and those issues.
fn restart_unchanged(server: Server, project: &Project, what: &str) -> (Server, Vec<Value>) {
    let before = server.all_issues(project);
    let server = server.restart();
    assert_eq!(server.all_issues(project), before, "{what}");
    (server, before)
}

fn ingest_url(server: &Server) -> String {
    server.url("/api/v1/events")
}

/// One event on a keep-alive agent: Some((status, body)) or None when the connection failed.
fn send(agent: &ureq::Agent, url: &str, key: &str, event: &Value) -> Option<(u16, Value)> {
    let reply = send_for_reply(agent, url, key, event)?;
    Some((reply.status, reply.json()))
}

/// One event; the whole reply, headers included, or None when the exchange failed.
fn send_for_reply(agent: &ureq::Agent, url: &str, key: &str, event: &Value) -> Option<HttpReply> {
    let auth = format!("Bearer {key}");
    let body = event.to_string();
    try_http_exchange(
        agent,
        "POST",
        url,
        &[("authorization", &auth)],
        Some(body.as_bytes()),
    )
    .ok()
}

fn every_accepted_event_is_stored_at_sigterm(backend: Backend) {
    let mut server = Server::start_with(backend, &[]);
    let project = server.project("Flush On Exit");
    let url = ingest_url(&server);
    let bulk_url = server.url("/api/v1/events/bulk");
    let per_thread = EVENTS_BEFORE_SIGTERM / 2;
    let threads: Vec<_> = (0..2)
        .map(|thread| {
            let (url, bulk_url, key) = (url.clone(), bulk_url.clone(), project.ingest_key.clone());
            std::thread::spawn(move || {
                let agent = http_agent();
                let mut ids = Vec::new();
                // Single events, then one full bulk request.
                let bulk_events = 100;
                for i in 0..per_thread - bulk_events {
                    let event = json!({"message": format!("flush {}", i % LOAD_ISSUES), "extra": {"thread": thread, "i": i}});
                    let (status, body) = send(&agent, &url, &key, &event).expect("server answers");
                    assert_eq!(status, 202, "{body}");
                    ids.push(body["event_id"].as_str().unwrap().to_string());
                }
                let bulk: Vec<Value> = (0..bulk_events).map(|i| json!({"message": format!("bulk {}", i % LOAD_ISSUES)})).collect();
                let auth = format!("Bearer {key}");
                let body = Value::Array(bulk).to_string();
                let reply = http_exchange(&agent, "POST", &bulk_url, &[("authorization", &auth)], Some(body.as_bytes()));
                assert_eq!(reply.status, 202);
                for result in reply.json()["results"].as_array().unwrap() {
                    ids.push(result["event_id"].as_str().unwrap().to_string());
                }
                ids
            })
        })
        .collect();
    let accepted: HashSet<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(
        accepted.len(),
        EVENTS_BEFORE_SIGTERM,
        "event ids are unique"
    );

    assert!(server.terminate().success(), "clean exit: {}", server.log());
    let mut store = server.store_reader();
    assert_eq!(
        store.event_rows(),
        EVENTS_BEFORE_SIGTERM as u64,
        "exactly the accepted events, once each"
    );
    assert_eq!(store.event_ids(), accepted);
}

fn durable_acks_survive_a_crash_under_load(backend: Backend) {
    let server = Server::start_with(backend, &["--ack", "durable"]);
    let project = server.project("Crash");
    let url = ingest_url(&server);
    let acked_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|thread| {
            let (url, key) = (url.clone(), project.ingest_key.clone());
            let (acked_count, stop) = (acked_count.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = http_agent();
                // (event_id, issue_id, message) of every 202.
                let mut acked = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let message = format!("crash {}", (i + thread) % LOAD_ISSUES);
                    i += 1;
                    match send(
                        &agent,
                        &url,
                        &key,
                        &json!({"message": message, "extra": {"thread": thread, "i": i}}),
                    ) {
                        Some((202, body)) => {
                            acked.push((
                                body["event_id"].as_str().unwrap().to_string(),
                                body["issue_id"].as_str().unwrap().to_string(),
                                message,
                            ));
                            acked_count.fetch_add(1, Ordering::Relaxed);
                        }
                        Some((status, body)) => panic!("unexpected {status}: {body}"),
                        // The server is gone.
                        None => break,
                    }
                }
                acked
            })
        })
        .collect();
    let deadline = Instant::now() + WAIT_LIMIT;
    while acked_count.load(Ordering::Relaxed) < ACKED_BEFORE_KILL {
        assert!(Instant::now() < deadline, "the load did not progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.signal(libc::SIGKILL);
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<(String, String, String)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(acked.len() >= ACKED_BEFORE_KILL);

    let server = server.kill_and_restart();
    let mut store = server.store_reader();
    let stored = store.event_ids();
    let lost: Vec<&String> = acked
        .iter()
        .map(|(id, _, _)| id)
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(
        store.event_rows(),
        stored.len() as u64,
        "no event stored twice"
    );

    // Grouping and counts continue: each issue's count is what the store holds for it.
    let issue_of_message: BTreeMap<&str, &str> = acked
        .iter()
        .map(|(_, issue, message)| (message.as_str(), issue.as_str()))
        .collect();
    for (_, issue, message) in &acked {
        assert_eq!(
            issue_of_message[message.as_str()],
            issue,
            "one issue per message"
        );
    }
    let by_issue = store.events_by_issue();
    let issues = server.all_issues(&project);
    assert_eq!(issues.len(), issue_of_message.len());
    for issue in &issues {
        let id = issue["id"].as_str().unwrap();
        assert_eq!(
            issue["event_count"].as_u64(),
            by_issue.get(id).copied(),
            "issue {id}: count and stored events agree"
        );
    }
    for (message, issue_id) in &issue_of_message {
        let before = issues.iter().find(|i| i["id"] == *issue_id).unwrap()["event_count"]
            .as_u64()
            .unwrap();
        let (status, body) = server.event(&project.ingest_key, &json!({"message": message}));
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            body["issue_id"].as_str(),
            Some(*issue_id),
            "{message} lands in its issue after the crash"
        );
        let (_, issue) = server.get(
            &format!("/api/v1/issues/{issue_id}"),
            Some(&project.dashboard_key),
        );
        assert_eq!(issue["event_count"].as_u64(), Some(before + 1));
    }
}

fn restart_keeps_grouping_status_keys_and_settings(backend: Backend) {
    let server = Server::start_with(backend, &[]);
    let project = server.project("Restarts");
    let sampled = server.project("Sampled Out");
    let events = [("a", 3), ("b", 2), ("c", 1), ("d", 1)];
    let mut ids = BTreeMap::new();
    for (message, times) in events {
        for _ in 0..times {
            let (status, body) = server.event(
                &project.ingest_key,
                &json!({"message": format!("message {message}"), "level": "warning"}),
            );
            assert_eq!(status, 202, "{body}");
            ids.insert(message, body["issue_id"].as_str().unwrap().to_string());
        }
    }
    for (message, verb) in [("b", "resolve"), ("c", "archive"), ("d", "discard")] {
        let (status, _) = server.post(
            &format!("/api/v1/issues/{}/{verb}", ids[message]),
            Some(&project.dashboard_key),
            &json!({}),
        );
        assert_eq!(status, 200);
    }
    let (status, key) = server.post(
        &format!("/api/v1/projects/{}/keys", project.slug),
        Some(ADMIN_TOKEN),
        &json!({"scope": "ingest"}),
    );
    assert_eq!(status, 201);
    let (status, _) = server.post(
        &format!("/api/v1/keys/{}/revoke", key["id"].as_str().unwrap()),
        Some(ADMIN_TOKEN),
        &json!({}),
    );
    assert_eq!(status, 200);
    let (status, _) = server.patch(
        &format!("/api/v1/projects/{}", sampled.slug),
        Some(ADMIN_TOKEN),
        &json!({"sample_rate": 0}),
    );
    assert_eq!(status, 200);

    let (server, before) = restart_unchanged(server, &project, "issues unchanged by a restart");
    let (status, _) = server.event(
        key["key"].as_str().unwrap(),
        &json!({"message": "revoked key"}),
    );
    assert_eq!(status, 401, "a revoked key stays revoked");
    let (status, body) = server.event(&sampled.ingest_key, &json!({"message": "sampled"}));
    assert_eq!(
        (status, body),
        (202, json!({"status": "sampled"})),
        "settings survive"
    );

    let expected = [
        ("a", "unresolved", 4),
        ("b", "unresolved", 3),
        ("c", "archived", 2),
        ("d", "discarded", 1),
    ];
    for (message, status_after, count_after) in expected {
        let (status, body) = server.event(
            &project.ingest_key,
            &json!({"message": format!("MESSAGE {message}"), "level": "fatal"}),
        );
        assert_eq!(status, 202, "{body}");
        if message == "d" {
            assert_eq!(body, json!({"status": "discarded"}));
        } else {
            assert_eq!(
                body["issue_id"].as_str(),
                Some(ids[message].as_str()),
                "same issue after a restart"
            );
        }
        let (_, issue) = server.get(
            &format!("/api/v1/issues/{}", ids[message]),
            Some(&project.dashboard_key),
        );
        assert_eq!(
            (issue["status"].as_str(), issue["event_count"].as_u64()),
            (Some(status_after), Some(count_after)),
            "{message}"
        );
        assert_eq!(issue["level"], "warning", "the first event's level");
        let old = before.iter().find(|i| i["id"] == issue["id"]).unwrap();
        assert_eq!(issue["first_seen"], old["first_seen"]);
    }
    let (server, _) = restart_unchanged(server, &project, "a second restart changes nothing");
    assert_eq!(server.store_reader().event_rows(), 4 + 3 + 2 + 1);
}

// ---- PostgreSQL restarted in the middle of a load ----

/// A PostgreSQL cluster of this test only, from scripts/test-postgres.sh (forced throwaway): the
/// script holds it while our pipe to it is open and removes it when the pipe closes.
struct ThrowawayCluster {
    holder: Child,
    holder_input: Option<ChildStdin>,
    url: String,
    dir: String,
    bin_dir: String,
    port: u16,
}

impl ThrowawayCluster {
    fn create() -> ThrowawayCluster {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres.sh");
        let mut holder = Command::new("bash")
            .arg(script)
            .arg("sh")
            .arg("-c")
            .arg(r#"echo "$DATABASE_URL $MESHER_TEST_PG_THROWAWAY_DIR $MESHER_TEST_PG_BIN_DIR"; exec cat >/dev/null"#)
            .env("MESHER_TEST_PG_FORCE_THROWAWAY", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run scripts/test-postgres.sh");
        let holder_input = holder.stdin.take();
        let stdout = holder.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let parts: Vec<&str> = line.split_whitespace().collect();
        let mut cluster = ThrowawayCluster {
            holder,
            holder_input,
            url: String::new(),
            dir: String::new(),
            bin_dir: String::new(),
            port: 0,
        };
        assert_eq!(
            parts.len(),
            3,
            "scripts/test-postgres.sh did not provide a throwaway cluster: {line:?}"
        );
        cluster.url = parts[0].to_string();
        cluster.dir = parts[1].to_string();
        cluster.bin_dir = parts[2].to_string();
        cluster.port = cluster
            .url
            .rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        cluster
    }

    /// pg_ctl as the cluster's owner (PostgreSQL refuses to run as root).
    fn pg_ctl(&self, args: &[&str]) {
        let pg_ctl = format!("{}/pg_ctl", self.bin_dir);
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--", &pg_ctl]);
            command
        } else {
            Command::new(&pg_ctl)
        };
        let data = format!("{}/data", self.dir);
        let status = command
            .args(["-D", &data])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "pg_ctl {args:?} failed");
    }

    fn stop_server(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    fn start_server(&self) {
        let log = format!("{}/server.log", self.dir);
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200",
            self.port, self.dir
        );
        self.pg_ctl(&["-l", &log, "-w", "-t", "60", "-o", &options, "start"]);
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        // Closing the pipe lets the script stop and delete the cluster.
        drop(self.holder_input.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.holder.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.holder.kill();
    }
}

#[test]
fn postgres_restart_mid_load_loses_no_acknowledged_event() {
    let cluster = ThrowawayCluster::create();
    let mut server = Server::start_on_database(
        &cluster.url,
        &["--queue-events", "30", "--flush-interval-ms", "10"],
    );
    let project = server.project("Database Restart");
    let agent = http_agent();
    let url = ingest_url(&server);
    let mut accepted = HashSet::new();
    let mut sequence = 0usize;
    let mut next_event = || {
        sequence += 1;
        json!({"message": format!("restart {}", sequence % LOAD_ISSUES), "extra": {"n": sequence}})
    };
    let health =
        |agent: &ureq::Agent| http_exchange(agent, "GET", &server.url("/health"), &[], None);

    for _ in 0..20 {
        let (status, body) =
            send(&agent, &url, &project.ingest_key, &next_event()).expect("answer");
        assert_eq!(status, 202, "{body}");
        accepted.insert(body["event_id"].as_str().unwrap().to_string());
    }
    assert_eq!(health(&agent).status, 200);

    cluster.stop_server();
    let accepted_before_outage = accepted.len();
    let mut ingest_refused = false;
    let mut health_down = false;
    let deadline = Instant::now() + WAIT_LIMIT;
    while !(ingest_refused && health_down) {
        assert!(
            Instant::now() < deadline,
            "no 503 while the database was down (ingest {ingest_refused}, health {health_down})"
        );
        let reply = send_for_reply(&agent, &url, &project.ingest_key, &next_event())
            .expect("the server answers while the database is down");
        let body = reply.json();
        match reply.status {
            202 => assert!(accepted.insert(body["event_id"].as_str().unwrap().to_string())),
            503 => {
                assert_eq!(body, json!({"error": "overloaded"}));
                let retry_after = reply.header("retry-after").expect("Retry-After on 503");
                assert!(
                    retry_after.trim().parse::<u64>().is_ok_and(|s| s >= 1),
                    "{retry_after}"
                );
                ingest_refused = true;
            }
            other => panic!("unexpected {other}: {body}"),
        }
        let reply = health(&agent);
        if reply.status == 503 {
            assert_ne!(reply.json()["storage"], "ok", "{}", reply.json());
            health_down = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    assert!(
        accepted.len() > accepted_before_outage,
        "the queue took events while the database was down"
    );

    // The server recovers by itself once the database is back.
    cluster.start_server();
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "ingest did not recover after the database came back"
        );
        let (status, body) =
            send(&agent, &url, &project.ingest_key, &next_event()).expect("answer");
        if status == 202 {
            accepted.insert(body["event_id"].as_str().unwrap().to_string());
            if health(&agent).status == 200 {
                break;
            }
        } else {
            assert_eq!(status, 503, "{body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Once the backlog of the outage is written, the queue (30) has room for all of these
    // whatever the database's pace.
    assert!(
        wait_until(WAIT_LIMIT, || server.metric("mesher_storage_queue_events")
            == 0.0),
        "the outage's backlog was not written"
    );
    for _ in 0..20 {
        let (status, body) =
            send(&agent, &url, &project.ingest_key, &next_event()).expect("answer");
        assert_eq!(status, 202, "{body}");
        accepted.insert(body["event_id"].as_str().unwrap().to_string());
    }
    assert_eq!(server.event_total(&project), accepted.len() as u64);

    assert!(server.terminate().success(), "clean exit: {}", server.log());
    let mut store = server.store_reader();
    assert_eq!(
        store.event_ids(),
        accepted,
        "every acknowledged event is stored, and only those"
    );
    assert_eq!(store.event_rows(), accepted.len() as u64, "none twice");
}
