//! Test support: start the real `mesher` binary on port 0 and talk to it over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Which store a test server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

/// The PostgreSQL the tests use: DATABASE_URL, else the local server's `test` database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A fresh schema for one test server, so tests sharing the PostgreSQL server run in parallel.
pub fn fresh_schema_url() -> String {
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut client = postgres::Client::connect(&database_url(), postgres::NoTls)
        .expect("PostgreSQL for tests (DATABASE_URL or 127.0.0.1:5432/test) must answer");
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .expect("create schema");
    let separator = if database_url().contains('?') {
        '&'
    } else {
        '?'
    };
    format!(
        "{}{separator}options=-csearch_path%3D{schema}",
        database_url()
    )
}

pub struct Server {
    pub addr: SocketAddr,
    pub child: Child,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub log: Arc<Mutex<String>>,
    args: Vec<String>,
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesher-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Server {
    /// SQLite store, two shards.
    pub fn start() -> Server {
        Server::start_with(Backend::Sqlite, &[])
    }

    pub fn start_with(backend: Backend, extra: &[&str]) -> Server {
        let data_dir = temp_dir();
        let database_url = (backend == Backend::Postgres).then(fresh_schema_url);
        let mut args: Vec<String> = vec!["--shards".into(), "2".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(data_dir, database_url, args, "127.0.0.1:0".parse().unwrap())
    }

    fn spawn(
        data_dir: PathBuf,
        database_url: Option<String>,
        args: Vec<String>,
        listen: SocketAddr,
    ) -> Server {
        let mut command = mesher_command();
        command
            .arg("serve")
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--admin-token")
            .arg(ADMIN_TOKEN)
            .args(&args)
            .stdout(Stdio::null());
        if let Some(url) = &database_url {
            command.arg("--database-url").arg(url);
        }
        let mut child = command.spawn().expect("start mesher");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("mesher listening on http://") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(rest.trim().to_string());
                    }
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("mesher did not start: {}", log.lock().unwrap());
            }
        };
        Server {
            addr,
            child,
            data_dir,
            database_url,
            log,
            args,
        }
    }

    /// Stops with SIGTERM and starts again on the same store (a new port).
    pub fn restart(mut self) -> Server {
        assert!(self.terminate().success(), "clean shutdown");
        let data_dir = self.data_dir.clone();
        let url = self.database_url.clone();
        let args = self.args.clone();
        std::mem::forget(self);
        Server::spawn(data_dir, url, args, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts again on the same store once the server has been stopped (a new port).
    pub fn restart_stopped(self) -> Server {
        let data_dir = self.data_dir.clone();
        let url = self.database_url.clone();
        let args = self.args.clone();
        std::mem::forget(self);
        Server::spawn(data_dir, url, args, "127.0.0.1:0".parse().unwrap())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(30))
            .expect("server exits after SIGTERM")
    }

    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Creates a project; returns (id, ingest_key, dashboard_key).
    pub fn project(&self, name: &str) -> Project {
        let (status, body) = self.post(
            "/api/v1/projects",
            Some(ADMIN_TOKEN),
            &serde_json::json!({ "name": name }),
        );
        assert_eq!(status, 201, "create project: {body}");
        Project {
            id: body["id"].as_str().unwrap().to_string(),
            slug: body["slug"].as_str().unwrap().to_string(),
            ingest_key: body["ingest_key"].as_str().unwrap().to_string(),
            dashboard_key: body["dashboard_key"].as_str().unwrap().to_string(),
            number: body["number"].as_i64().expect("project number"),
            dsn: body["dsn"].as_str().expect("project DSN").to_string(),
        }
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let r = self.request("GET", path, key, None);
        (r.status, r.json())
    }

    pub fn post(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let r = self.request("POST", path, key, Some(body.to_string().as_bytes()));
        (r.status, r.json())
    }

    pub fn patch(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let r = self.request("PATCH", path, key, Some(body.to_string().as_bytes()));
        (r.status, r.json())
    }

    /// One request with a real HTTP client (ureq), any status accepted.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
    ) -> HttpReply {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let bearer = key.map(|key| format!("Bearer {key}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(bearer) = &bearer {
            headers.insert(0, ("authorization", bearer.as_str()));
        }
        http_exchange(&agent, method, &self.url(path), &headers, body)
    }

    /// PATCHes a project's settings with the admin token; the answer must be 200.
    pub fn set_project(&self, project: &Project, settings: Value) -> Value {
        let (status, body) = self.patch(
            &format!("/api/v1/projects/{}", project.slug),
            Some(ADMIN_TOKEN),
            &settings,
        );
        assert_eq!(status, 200, "{settings}: {body}");
        body
    }

    pub fn event(&self, key: &str, event: &Value) -> (u16, Value) {
        self.post("/api/v1/events", Some(key), event)
    }

    pub fn metric(&self, name: &str) -> f64 {
        let r = self.request("GET", "/metrics", None, None);
        metric_in(&String::from_utf8(r.body).unwrap(), name)
    }

    /// The server's resident memory once settled: the least of a few readings, so a passing
    /// burst (a request body, a storage batch) does not count.
    pub fn rss_bytes(&self) -> u64 {
        (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(100));
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
                let kib: u64 = status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                    .expect("VmRSS");
                kib * 1024
            })
            .min()
            .unwrap()
    }

    /// Raw TCP to the server.
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// Opens a WebSocket by hand and returns the raw socket after the 101.
    pub fn raw_ws(&self, path: &str) -> TcpStream {
        let mut stream = self.connect();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        send_raw(
            &mut stream,
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                self.addr
            )
            .as_bytes(),
        );
        let (status, head, _) = read_response(&mut stream).expect("upgrade answered");
        assert_eq!(status, 101, "{head}");
        // RFC 6455 section 1.3: the accept value for this sample key.
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        stream
    }

    /// A WebSocket client (tungstenite) on `path`.
    pub fn ws(&self, path: &str) -> Result<Ws, tungstenite::Error> {
        let stream = self.connect();
        let (socket, _) = tungstenite::client(self.ws_url(path), stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => unreachable!("blocking socket"),
        })?;
        Ok(socket)
    }

    /// A stream subscriber that has read its first message (the issue count).
    pub fn subscribe(&self, project: &Project) -> (Ws, Value) {
        let mut ws = self
            .ws(&format!(
                "/stream/projects/{}?key={}",
                project.id, project.dashboard_key
            ))
            .unwrap();
        let first = next_json(&mut ws);
        (ws, first)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

pub type Ws = tungstenite::WebSocket<TcpStream>;

#[derive(Clone, Debug)]
pub struct Project {
    pub id: String,
    pub slug: String,
    pub ingest_key: String,
    pub dashboard_key: String,
    /// PROTOCOL 8: the project's number and the Sentry DSN shown at creation.
    pub number: i64,
    pub dsn: String,
}

pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The next text message as JSON (pings answered by tungstenite on the way).
pub fn next_json(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("websocket message") {
            tungstenite::Message::Text(text) => {
                return serde_json::from_str(&text).expect("JSON message")
            }
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Reads messages until one of `type` arrives (bounded by the socket's read timeout).
pub fn next_of_type(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let message = next_json(ws);
        if message["type"] == kind {
            return message;
        }
    }
}

/// One raw HTTP/1.1 response read from a stream: (status, headers, body).
pub fn read_response(stream: &mut TcpStream) -> Option<(u16, String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    Some((status, head, body))
}

pub fn send_raw(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).unwrap();
}

/// A kept-alive HTTP connection for `/metrics`, so reading metrics opens no new connection and the
/// per-shard accept counters count only the connections a test makes on purpose.
pub struct MetricsConn {
    stream: TcpStream,
}

impl MetricsConn {
    pub fn open(server: &Server) -> MetricsConn {
        MetricsConn {
            stream: server.connect(),
        }
    }

    pub fn text(&mut self) -> String {
        send_raw(
            &mut self.stream,
            b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n",
        );
        let (status, _, body) = read_response(&mut self.stream).expect("metrics response");
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    }

    /// The sum of the samples named exactly `name` (labels included, e.g. `x{shard="0"}`).
    pub fn value(&mut self, name: &str) -> f64 {
        metric_in(&self.text(), name)
    }

    /// Connections accepted by shard 0 and shard 1.
    pub fn accepted_by_shard(&mut self) -> (f64, f64) {
        let text = self.text();
        (
            metric_in(&text, "mesher_connections_accepted_total{shard=\"0\"}"),
            metric_in(&text, "mesher_connections_accepted_total{shard=\"1\"}"),
        )
    }
}

pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

/// Most stream connections a test opens while waiting for both shards to get one; the kernel
/// spreads connections over the SO_REUSEPORT listeners by hash, so 40 all on one shard is ~2^-39.
pub const SPREAD_ATTEMPTS_MAX: usize = 40;

/// Opens at least `count` WebSocket subscribers on `path` (each with its first message read) and
/// more until both shards of a `--shards 2` server accepted at least one of them.
pub fn subscribers_on_both_shards(server: &Server, path: &str, count: usize) -> Vec<(Ws, Value)> {
    let mut metrics = MetricsConn::open(server);
    let before = metrics.accepted_by_shard();
    let mut subscribers = Vec::new();
    loop {
        let mut ws = server.ws(path).expect("stream upgrade");
        let first = next_json(&mut ws);
        subscribers.push((ws, first));
        let now = metrics.accepted_by_shard();
        let (on_0, on_1) = (now.0 - before.0, now.1 - before.1);
        assert_eq!(
            (on_0 + on_1) as usize,
            subscribers.len(),
            "only the subscribers connected meanwhile"
        );
        if subscribers.len() >= count && on_0 >= 1.0 && on_1 >= 1.0 {
            return subscribers;
        }
        assert!(
            subscribers.len() < SPREAD_ATTEMPTS_MAX,
            "every subscriber landed on one shard"
        );
    }
}

/// Polls `condition` until it holds or `limit` passes; false on timeout.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- Helpers of the ingest, issues and durability tests ----

/// A raw-SQL view of a server's store, opened from the test side (server running or stopped).
pub enum StoreReader {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl StoreReader {
    /// Every stored event id, as hyphenated UUID text.
    pub fn event_ids(&mut self) -> std::collections::HashSet<String> {
        match self {
            StoreReader::Sqlite(connection) => {
                let mut statement = connection.prepare("SELECT id FROM events").unwrap();
                let rows = statement
                    .query_map([], |row| row.get::<_, Vec<u8>>(0))
                    .unwrap()
                    .map(|bytes| uuid::Uuid::from_slice(&bytes.unwrap()).unwrap().to_string());
                rows.collect()
            }
            StoreReader::Postgres(client) => client
                .query("SELECT id::text FROM events", &[])
                .unwrap()
                .iter()
                .map(|row| row.get::<_, String>(0))
                .collect(),
        }
    }

    /// Stored events per issue id (hyphenated UUID text).
    pub fn events_by_issue(&mut self) -> std::collections::HashMap<String, u64> {
        match self {
            StoreReader::Sqlite(connection) => {
                let mut statement = connection
                    .prepare("SELECT issue_id, count(*) FROM events GROUP BY issue_id")
                    .unwrap();
                let rows = statement
                    .query_map([], |row| {
                        Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
                    })
                    .unwrap()
                    .map(|row| {
                        let (id, count) = row.unwrap();
                        (
                            uuid::Uuid::from_slice(&id).unwrap().to_string(),
                            count as u64,
                        )
                    });
                rows.collect()
            }
            StoreReader::Postgres(client) => client
                .query(
                    "SELECT issue_id::text, count(*) FROM events GROUP BY issue_id",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1) as u64))
                .collect(),
        }
    }

    /// Moves a stored event's receive time `days` back, as if it had come in then.
    pub fn backdate_event(&mut self, event_id: &str, days: i32) {
        let changed = match self {
            StoreReader::Sqlite(connection) => connection
                .execute(
                    "UPDATE events SET received_at_us = received_at_us - ?2 * 86400000000 WHERE id = ?1",
                    rusqlite::params![uuid::Uuid::parse_str(event_id).unwrap().as_bytes().to_vec(), days],
                )
                .unwrap() as u64,
            StoreReader::Postgres(client) => client
                .execute(
                    "UPDATE events SET received_at = received_at - $2::int4 * interval '1 day' WHERE id::text = $1",
                    &[&event_id, &days],
                )
                .unwrap(),
        };
        assert_eq!(changed, 1, "event {event_id} is stored");
    }

    /// Waits (up to 10 s) until the store holds exactly `expected` event rows.
    pub fn assert_event_rows(&mut self, expected: u64) {
        let settled = wait_until(Duration::from_secs(10), || self.event_rows() == expected);
        assert!(
            settled,
            "{} event rows stored, {expected} expected",
            self.event_rows()
        );
    }

    /// Stored events (rows, duplicates included).
    pub fn event_rows(&mut self) -> u64 {
        match self {
            StoreReader::Sqlite(connection) => connection
                .query_row("SELECT count(*) FROM events", [], |row| {
                    row.get::<_, i64>(0)
                })
                .unwrap() as u64,
            StoreReader::Postgres(client) => client
                .query_one("SELECT count(*) FROM events", &[])
                .unwrap()
                .get::<_, i64>(0) as u64,
        }
    }
}

impl Server {
    /// Starts on a given PostgreSQL URL (not a fresh schema), e.g. a test's own cluster.
    pub fn start_on_database(url: &str, extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec!["--shards".into(), "2".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(
            temp_dir(),
            Some(url.to_string()),
            args,
            "127.0.0.1:0".parse().unwrap(),
        )
    }

    /// Stops with SIGTERM and starts again on the same store with other flags (`--shards 2` kept).
    pub fn restart_with(mut self, extra: &[&str]) -> Server {
        assert!(self.terminate().success(), "clean shutdown: {}", self.log());
        let data_dir = self.data_dir.clone();
        let url = self.database_url.clone();
        let mut args: Vec<String> = vec!["--shards".into(), "2".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        std::mem::forget(self);
        Server::spawn(data_dir, url, args, "127.0.0.1:0".parse().unwrap())
    }

    /// SIGKILL (a crash) unless it has already exited, then starts again on the same store with
    /// the same flags.
    pub fn kill_and_restart(mut self) -> Server {
        if self.child.try_wait().unwrap().is_none() {
            self.signal(libc::SIGKILL);
        }
        self.wait(Duration::from_secs(30))
            .expect("server dies on SIGKILL");
        let data_dir = self.data_dir.clone();
        let url = self.database_url.clone();
        let args = self.args.clone();
        std::mem::forget(self);
        Server::spawn(data_dir, url, args, "127.0.0.1:0".parse().unwrap())
    }

    /// Opens the server's store directly: `<data_dir>/mesher.sqlite3` or its `database_url`.
    pub fn store_reader(&self) -> StoreReader {
        match &self.database_url {
            Some(url) => StoreReader::Postgres(
                postgres::Client::connect(url, postgres::NoTls).expect("connect to the store"),
            ),
            None => {
                let connection = rusqlite::Connection::open(self.data_dir.join("mesher.sqlite3"))
                    .expect("open the SQLite store");
                connection.busy_timeout(Duration::from_secs(10)).unwrap();
                StoreReader::Sqlite(connection)
            }
        }
    }

    /// One request with exactly these headers (no key added), on a new connection; any status.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpReply {
        http_exchange(&http_agent(), method, &self.url(path), headers, body)
    }
}

/// A ureq agent that keeps connections alive and takes any status.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// One exchange on `agent` (reusing its connections); Err when the connection failed.
pub fn try_http_exchange(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpReply, ureq::Error> {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(body.map(|b| b.to_vec()).unwrap_or_default())
        .unwrap();
    let mut response = agent.run(request)?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response.body_mut().read_to_vec()?;
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

pub fn http_exchange(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpReply {
    try_http_exchange(agent, method, url, headers, body).expect("HTTP exchange")
}

impl Server {
    /// Every issue of the project (one page of 100, asserted to be all), newest `last_seen` first.
    pub fn all_issues(&self, project: &Project) -> Vec<Value> {
        let (status, list) = self.get(
            &format!("/api/v1/projects/{}/issues?limit=100", project.id),
            Some(&project.dashboard_key),
        );
        assert_eq!(status, 200, "{list}");
        assert_eq!(
            list["has_more"], false,
            "more than one page of issues: {list}"
        );
        list["data"].as_array().expect("data array").clone()
    }

    /// The sum of `event_count` over every issue of the project.
    pub fn event_total(&self, project: &Project) -> u64 {
        self.all_issues(project)
            .iter()
            .map(|issue| issue["event_count"].as_u64().unwrap())
            .sum()
    }
}

/// Generates `on_sqlite::NAME` and `on_postgres::NAME` tests, each calling `NAME(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[test] fn $name() { super::$name(super::Backend::Sqlite) } )*
        }
        mod on_postgres {
            $( #[test] fn $name() { super::$name(super::Backend::Postgres) } )*
        }
    };
}

/// One server frame: (first byte, payload), or None at the end of the stream.
pub fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    match stream.read_exact(&mut head) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return None
        }
        Err(e) => panic!("reading a frame: {e}"),
    }
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).unwrap();
            u16::from_be_bytes(ext) as usize
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext).unwrap();
            u64::from_be_bytes(ext) as usize
        }
        short => short as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    Some((head[0], payload))
}

/// The mask key of the client frames tests write by hand.
pub const CLIENT_MASK: [u8; 4] = [0x1f, 0x2e, 0x3d, 0x4c];

/// A masked client frame header announcing `len` payload bytes (`first`: FIN and opcode).
pub fn masked_head(first: u8, len: usize) -> Vec<u8> {
    let mut head = vec![first];
    if len < 126 {
        head.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        head.push(0x80 | 126);
        head.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        head.push(0x80 | 127);
        head.extend_from_slice(&(len as u64).to_be_bytes());
    }
    head.extend_from_slice(&CLIENT_MASK);
    head
}

/// A whole masked client frame.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = masked_head(first, payload.len());
    bytes.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ CLIENT_MASK[i % 4]),
    );
    bytes
}

/// A WebSocket upgraded by hand on a socket with a small receive buffer (so the server's writes
/// back up after a few kilobytes); returns it right after the 101 head, which is read byte by
/// byte so nothing after it is read ahead.
pub fn upgrade_with_receive_buffer(
    server: &Server,
    path: &str,
    receive_buffer_bytes: usize,
    read_timeout: Duration,
) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(receive_buffer_bytes).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(read_timeout)).unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        server.addr
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("upgrade response");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    stream
}

/// The `mesher` binary with warnings logged to a piped stderr, no stdin, and none of the test
/// run's own `MESHER_*` variables, so only what a test passes configures it.
pub fn mesher_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesher"));
    command
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars() {
        if name.starts_with("MESHER_") {
            command.env_remove(name);
        }
    }
    command
}

impl HttpReply {
    /// The body as text, for failure messages.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
