//! The process as an operator sees it (PROTOCOL.md section 1): shutdown on SIGTERM, what survives
//! it, the command line and the generated admin token.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

/// The binary started by hand, for what the shared harness always sets (an admin token, flags).
struct Process {
    child: Child,
    log: Arc<Mutex<String>>,
    listening: std::sync::mpsc::Receiver<SocketAddr>,
    /// The threads copying the child's stderr and stdout into `log`.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Process {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = mesher_command();
        command
            .args(args)
            .stdout(Stdio::piped())
            .envs(env.iter().copied());
        let mut child = command.spawn().expect("start mesher");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, listening) = std::sync::mpsc::channel();
        let mut readers = Vec::new();
        for output in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let sink = log.clone();
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    if let Some(addr) = line.strip_prefix("mesher listening on http://") {
                        let _ = tx.send(addr.trim().parse().unwrap());
                    }
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }));
        }
        Process {
            child,
            log,
            listening,
            readers,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listening
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("mesher did not start: {}", self.log()))
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The exit status, or None if it still runs after `limit`.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers take the last lines: they end with the child's output.
                let read_by = Instant::now() + Duration::from_secs(5);
                while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < read_by {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn terminate(&mut self) -> ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(Duration::from_secs(30))
            .expect("exits after SIGTERM")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mesher-lifecycle-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn serve_args(data_dir: &Path) -> Vec<String> {
    [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([data_dir.display().to_string()])
    .collect()
}

fn create_project_status(addr: SocketAddr, token: &str, name: &str) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = ureq::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/api/v1/projects"))
        .header("authorization", format!("Bearer {token}"))
        .body(json!({ "name": name }).to_string().into_bytes())
        .unwrap();
    agent.run(request).expect("HTTP exchange").status().as_u16()
}

/// Reads unmasked server frames up to the close frame; its code, after checking the stream ends.
fn raw_close_code(stream: &mut TcpStream) -> u16 {
    loop {
        let (first, payload) =
            read_frame(stream).expect("a close frame before the end of the stream");
        if first & 0x0f == 0x8 {
            assert!(payload.len() >= 2);
            let mut rest = [0u8; 1];
            let end = stream.read(&mut rest);
            assert!(
                matches!(end, Ok(0)) || end.is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
                "end after close"
            );
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// Reads a tungstenite client to the server's close frame; its code.
fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
            Ok(Message::Close(None)) => panic!("close frame without a code"),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

#[test]
fn sigterm_closes_every_websocket_with_1001_and_exits_0() {
    let mut server = Server::start();
    let project = server.project("Shutdown");
    let mut streams: Vec<Ws> = (0..3).map(|_| server.subscribe(&project).0).collect();
    let mut ingests: Vec<Ws> = (0..2)
        .map(|_| {
            server
                .ws(&format!("/ingest?key={}", project.ingest_key))
                .unwrap()
        })
        .collect();
    for ingest in &mut ingests {
        ingest
            .send(Message::text(r#"{"message":"before shutdown"}"#))
            .unwrap();
        assert_eq!(next_json(ingest)["status"], "accepted");
    }
    let mut idle_http = server.connect();
    send_raw(
        &mut idle_http,
        b"GET /health HTTP/1.1\r\nHost: mesher\r\n\r\n",
    );
    assert_eq!(read_response(&mut idle_http).map(|r| r.0), Some(200));
    // Hand-made stream clients that never answer a close, the last ones opened just as the
    // signal comes (their first message may still be on its way).
    let mut raws: Vec<TcpStream> = (0..6)
        .map(|_| {
            server.raw_ws(&format!(
                "/stream/projects/{}?key={}",
                project.id, project.dashboard_key
            ))
        })
        .collect();

    server.signal(libc::SIGTERM);
    for ws in streams.iter_mut().chain(ingests.iter_mut()) {
        assert_eq!(close_code(ws), u16::from(CloseCode::Away));
    }
    // Each gets the close frame, nothing after it, and the end of the stream.
    for raw in &mut raws {
        assert_eq!(raw_close_code(raw), 1001);
    }
    let mut byte = [0u8; 1];
    idle_http
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        matches!(idle_http.read(&mut byte), Ok(0)),
        "idle keep-alive connection closed"
    );
    // Clients finish the closing handshake (tungstenite answers while reading); the raw ones
    // just go away.
    drop(raws);
    for ws in streams.iter_mut().chain(ingests.iter_mut()) {
        while ws.read().is_ok() {}
    }
    let status = server
        .wait(Duration::from_secs(30))
        .expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}: {}", server.log());
}

/// Events of four fingerprints over HTTP, bulk and the ingest socket, SIGTERM at once, then a
/// restart on the same store: every accepted event is counted.
fn accepted_events_survive_sigterm(backend: Backend) {
    const GROUPS: usize = 4;
    // No timed flush before the signal: only the shutdown flush can save them.
    let server = Server::start_with(backend, &["--flush-interval-ms", "60000"]);
    let project = server.project("Durable");
    let mut expected = [0u64; GROUPS];
    for i in 0..20 {
        let group = i % GROUPS;
        let (status, body) = server.event(
            &project.ingest_key,
            &json!({"message": format!("http {i}"), "fingerprint": format!("group-{group}")}),
        );
        assert_eq!(status, 202, "{body}");
        expected[group] += 1;
    }
    // A one-element array fingerprint joins to the same string: the same four issues.
    let bulk: Vec<Value> =
        (0..10).map(|i| json!({"message": format!("bulk {i}"), "fingerprint": [format!("group-{}", i % GROUPS)]})).collect();
    for i in 0..10 {
        expected[i % GROUPS] += 1;
    }
    let (status, body) = server.post(
        "/api/v1/events/bulk",
        Some(&project.ingest_key),
        &Value::Array(bulk),
    );
    assert_eq!(status, 202, "{body}");
    let mut ws = server
        .ws(&format!("/ingest?key={}", project.ingest_key))
        .unwrap();
    for i in 0..5 {
        ws.send(Message::text(
            json!({"message": format!("socket {i}"), "fingerprint": "group-0"}).to_string(),
        ))
        .unwrap();
        assert_eq!(next_json(&mut ws)["status"], "accepted");
        expected[0] += 1;
    }
    drop(ws);
    let server = server.restart();

    let (status, list) = server.get(
        &format!("/api/v1/projects/{}/issues?limit=100", project.id),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200, "{list}");
    let issues = list["data"].as_array().unwrap();
    assert_eq!(issues.len(), GROUPS, "{list}");
    let total: u64 = issues
        .iter()
        .map(|issue| issue["event_count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 35, "{list}");
    let mut counts: Vec<u64> = issues
        .iter()
        .map(|issue| issue["event_count"].as_u64().unwrap())
        .collect();
    counts.sort_unstable();
    let mut wanted = expected.to_vec();
    wanted.sort_unstable();
    assert_eq!(counts, wanted, "{list}");
    // The events themselves were stored, not just the counts.
    let biggest = issues
        .iter()
        .max_by_key(|issue| issue["event_count"].as_u64())
        .unwrap();
    let (status, events) = server.get(
        &format!(
            "/api/v1/issues/{}/events?limit=100",
            biggest["id"].as_str().unwrap()
        ),
        Some(&project.dashboard_key),
    );
    assert_eq!(status, 200, "{events}");
    assert_eq!(
        events["data"].as_array().map(|d| d.len() as u64),
        biggest["event_count"].as_u64(),
        "{events}"
    );
    // The stream's issue count agrees after the restart.
    let (_ws, first) = server.subscribe(&project);
    assert_eq!(first["count"], GROUPS as u64);
}

#[test]
fn accepted_events_survive_sigterm_sqlite() {
    accepted_events_survive_sigterm(Backend::Sqlite);
}

#[test]
fn accepted_events_survive_sigterm_postgres() {
    accepted_events_survive_sigterm(Backend::Postgres);
}

#[test]
fn help_mentions_every_flag() {
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_mesher"))
            .args(args)
            .output()
            .expect("run mesher");
        assert!(output.status.success(), "{args:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let top = run(&["--help"]);
    assert!(top.contains("serve"), "{top}");
    let serve = run(&["serve", "--help"]);
    for flag in [
        "listen",
        "database-url",
        "data-dir",
        "shards",
        "admin-token",
        "ack",
        "stream-buffer",
        "drain-interval-ms",
        "stall-timeout",
        "ping-interval",
        "pong-timeout",
        "request-timeout",
        "keepalive-timeout",
        "flush-interval-ms",
        "batch-events",
        "queue-events",
        "max-issues-per-project",
    ] {
        assert!(
            serve.contains(&format!("--{flag}")),
            "--{flag} in:\n{serve}"
        );
        let variable = format!("MESHER_{}", flag.to_ascii_uppercase().replace('-', "_"));
        assert!(serve.contains(&variable), "{variable} in:\n{serve}");
    }
}

#[test]
fn bad_flag_values_exit_non_zero_with_a_clear_message() {
    let data_dir = temp_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    // (flags, environment, words the error must name)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    // Most errors name the flag and its value.
    let named: [&[&str]; 7] = [
        &["--shards", "abc"],
        &["--listen", "nowhere"],
        &["--ack", "sometimes"],
        &["--request-timeout", "0"],
        &["--queue-events", "0"],
        &["--batch-events", "0"],
        &["--no-such-flag"],
    ];
    let mut cases: Vec<Case> = named
        .iter()
        .map(|flags| (flags.to_vec(), vec![], flags.to_vec()))
        .collect();
    cases.extend([
        (vec!["--stream-buffer", "-5"], vec![], vec!["-5"]),
        (
            vec![],
            vec![("MESHER_MAX_ISSUES_PER_PROJECT", "0")],
            vec!["--max-issues-per-project", "0"],
        ),
        (vec![], vec![("MESHER_SHARDS", "many")], vec!["many"]),
        (vec!["--listen", &taken_addr], vec![], vec![&taken_addr]),
        (
            vec!["--database-url", "postgres://nobody@127.0.0.1:1/none"],
            vec![],
            vec!["storage"],
        ),
    ]);
    let data_dir_text = data_dir.display().to_string();
    for (extra, env, mentions) in cases {
        let mut args = vec!["serve", "--data-dir", &data_dir_text, "--admin-token", "t"];
        if !extra.contains(&"--listen") {
            args.extend(["--listen", "127.0.0.1:0"]);
        }
        args.extend(&extra);
        let mut process = Process::spawn(&args, &env);
        let status = process.wait(Duration::from_secs(20));
        let log = process.log();
        let status = status.unwrap_or_else(|| panic!("{extra:?} {env:?}: still running:\n{log}"));
        assert!(!status.success(), "{extra:?} {env:?}: exit {status:?}");
        for text in mentions {
            assert!(
                log.contains(text),
                "{extra:?} {env:?}: message names {text:?}:\n{log}"
            );
        }
        assert!(
            !log.contains("panicked"),
            "{extra:?}: a message, not a panic:\n{log}"
        );
    }
    drop(taken);
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[test]
fn admin_token_is_generated_once_and_stored_in_the_data_dir() {
    let data_dir = temp_dir();
    let args = serve_args(&data_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let mut first = Process::spawn(&args, &[]);
    let addr = first.addr();
    let token =
        std::fs::read_to_string(data_dir.join("admin-token")).expect("admin-token in the data dir");
    let token = token.trim().to_string();
    assert!(token.len() >= 32, "a long random token: {token:?}");
    assert!(
        first.log().contains(&token),
        "printed at first start:\n{}",
        first.log()
    );
    assert_eq!(create_project_status(addr, &token, "First"), 201);
    assert_eq!(create_project_status(addr, "wrong-token", "Nope"), 401);
    assert!(first.terminate().success());

    // The second start reads the same token.
    let mut second = Process::spawn(&args, &[]);
    let addr = second.addr();
    assert_eq!(
        std::fs::read_to_string(data_dir.join("admin-token"))
            .unwrap()
            .trim(),
        token
    );
    assert_eq!(create_project_status(addr, &token, "Second"), 201);
    assert!(second.terminate().success());

    // Another data dir gets another token.
    let other_dir = temp_dir();
    let other_args = serve_args(&other_dir);
    let other_args: Vec<&str> = other_args.iter().map(String::as_str).collect();
    let mut other = Process::spawn(&other_args, &[]);
    let addr = other.addr();
    let other_token = std::fs::read_to_string(other_dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(other_token, token);
    assert_eq!(create_project_status(addr, &token, "Foreign"), 401);
    assert!(other.terminate().success());
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_dir_all(&other_dir);
}

#[test]
fn flags_can_come_from_the_environment() {
    let data_dir = temp_dir();
    let data_dir_text = data_dir.display().to_string();
    let mut process = Process::spawn(
        &["serve"],
        &[
            ("MESHER_LISTEN", "127.0.0.1:0"),
            ("MESHER_DATA_DIR", &data_dir_text),
            ("MESHER_SHARDS", "1"),
            ("MESHER_ADMIN_TOKEN", "from-the-environment"),
        ],
    );
    let addr = process.addr();
    assert_eq!(
        create_project_status(addr, "from-the-environment", "Env"),
        201
    );
    // The store went where MESHER_DATA_DIR says.
    assert!(std::fs::read_dir(&data_dir).unwrap().next().is_some());
    assert!(
        !data_dir.join("admin-token").exists(),
        "a given token is not generated"
    );
    assert!(process.terminate().success());
    let _ = std::fs::remove_dir_all(&data_dir);
}
