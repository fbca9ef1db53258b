//! The `mixed` scenario, the load of a soak test: every ingest path and the live stream at once,
//! at modest rates, for `--duration` seconds. It checks two promises at the end:
//!
//! - every event the server accepted can be looked up in storage: the id of each one goes to
//!   `--accepted-ids` (one per line) for the caller to compare with the `events` table;
//! - every stream subscriber is told about every event it should have had: each event a
//!   fast, unfiltered reference subscriber of the project saw between a subscriber's first and
//!   last received event, and that passes the subscriber's filter, was either received or
//!   inside a `dropped` range the server announced (PROTOCOL sections 6 and 9).
//!
//! Every 10 s it samples the server (RSS, open files, CPU, loop lag, storage queue) to stdout
//! and `--samples` (JSON lines), so that a caller can tell whether resources stay flat.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::frame::{encode_client_frame, FrameReader, Message, OPCODE_PONG, OPCODE_TEXT};
use crate::http::{parse_response, push_post, push_post_raw, Response};
use crate::resume::offset_in;
use crate::scan::{self, Dialect, Kind};
use crate::sentry::{Dsn, Envelopes};
use crate::subscriber::{connect, connect_client, upgrade, PortPlan, SLOW_RCVBUF_BYTES};
use crate::sys::{monotonic_us, parse_stat_cpu_s, parse_status_rss_kib};
use crate::target::{create_mesher_projects, Endpoint, Project};

// Rates: the machine the soak runs on has 2 cores shared by the server, PostgreSQL and this
// client. Every event of a project goes to its ~1,250 subscribers, so 100 events/s are already
// ~125,000 deliveries/s for this client to read; beyond that the client, not the server, sets
// the pace (and starves the server of CPU). `--rate` sets the total on a bigger machine.

/// Events per second over all ingest paths, unless `--rate` says otherwise.
pub const DEFAULT_EVENTS_PER_S: f64 = 100.0;
/// Shares of the total per ingest path.
const SINGLE_SHARE: f64 = 0.4;
const BULK_SHARE: f64 = 0.2;
const WS_INGEST_SHARE: f64 = 0.2;
const SENTRY_SHARE: f64 = 0.2;
/// Keep-alive connections posting single events to `/api/v1/events`, one request at a time
/// each: enough of them that a slow answer (a storage outage, loop lag) does not lower the
/// rate.
const SINGLE_CONNECTIONS: usize = 4;
/// Events per `/api/v1/events/bulk` request (one connection).
const BULK_EVENTS: usize = 10;
/// WebSocket `/ingest` connections, one per project (the key at the upgrade decides it).
const WS_INGEST_CONNECTIONS: usize = 4;
/// Connections posting Sentry envelopes (gzip, one ~4.7 KB event each).
const SENTRY_CONNECTIONS: usize = 2;
/// The project that receives every Sentry envelope and holds every slow subscriber: the big
/// Sentry events make its stream heavy enough (~100 KB/s at the default rate) that a slow
/// subscriber's pause overflows what the server holds for it, so drops get exercised.
const HOT_PROJECT: usize = 0;
/// Native events of a project spread over this many fingerprints, so issues repeat (status
/// changes pick among them) without growing without bound.
const ISSUES_PER_PROJECT: u64 = 8;
/// Levels of native events in turn; subscribers filter on the first one or the first two.
const LEVELS: [&str; 4] = ["error", "warning", "info", "error"];

/// Shares of the subscribers: every `SLOW_EVERY`th reads slowly (5%), every
/// `NEVER_READ_EVERY`th never reads after the welcome (1%), every `FILTERED_EVERY`th of the
/// others subscribes with a `level` filter.
const SLOW_EVERY: usize = 20;
const NEVER_READ_EVERY: usize = 100;
const FILTERED_EVERY: usize = 3;
/// Slow subscribers read for `SLOW_READ`, then stop reading for `SLOW_PAUSE`: long enough to
/// overflow what the server holds for them (its 100-event buffer and a 256 KiB socket send
/// buffer, about 3.5 s of the hot project's stream), shorter than the server's 10 s pong timeout
/// (a ping sent during the pause is answered when reading resumes) and 30 s stall timeout, so
/// the server must drop events for them but never disconnect them.
const SLOW_READ: Duration = Duration::from_secs(3);
const SLOW_PAUSE: Duration = Duration::from_secs(5);
/// Receive buffer of slow subscribers. With 4 KiB the server holds their backlog and drops
/// (16 KiB let them catch up, so nothing was dropped); on a busy client a few fall more than
/// 10 s behind and are closed for a late pong, then resume like any dashboard.
const SLOW_RCVBUF: u32 = SLOW_RCVBUF_BYTES;
/// Subscribers dropping their socket and resuming with `?since=`, per second.
const RECONNECTS_PER_S: f64 = 10.0;
/// Issue status changes per second (resolve), and how long after a resolve the same issue is
/// unresolved again.
const STATUS_CHANGES_PER_S: f64 = 1.0;
const UNRESOLVE_AFTER: Duration = Duration::from_secs(5);

/// Server samples this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Upgrades in flight at once while subscribers connect (the server's accept backlog).
const HANDSHAKES_IN_FLIGHT: usize = 64;
/// Read buffer of a subscriber (grows for bursts such as a replay).
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// A request, upgrade or WebSocket answer not done in this long counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failure, a connection waits this long before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Subscribers compare what they got with the reference this often, so what they keep for
/// the check stays bounded however long the run.
const RESOLVE_EVERY_US: u64 = 2_000_000;
/// After publishing, subscribers keep reading this long so the last deliveries arrive
/// (longer than a slow subscriber's pause).
const DRAIN: Duration = Duration::from_secs(10);
/// Subscribers must report within this long after being told to stop.
const TEARDOWN: Duration = Duration::from_secs(20);
/// Failures kept verbatim for the report.
const ERROR_SAMPLES_MAX: usize = 10;
/// Subscribers that did not add up, listed in the report.
const UNACCOUNTED_LISTED_MAX: usize = 20;

pub struct MixedOptions {
    pub endpoint: Endpoint,
    pub admin_token: String,
    pub duration_s: f64,
    pub projects: usize,
    pub subscribers: usize,
    pub server_pid: Option<u32>,
    pub accepted_ids: Option<PathBuf>,
    pub samples: Option<PathBuf>,
    pub setup_timeout_s: f64,
    pub events_per_s: f64,
}

/// How the server answered what was sent, per ingest path.
#[derive(Default)]
struct PathCounts {
    accepted: AtomicU64,
    /// 429 / 503 (rate limit, storage queue full): allowed answers that store nothing.
    refused: AtomicU64,
    /// Anything else: an unexpected status or body, a broken connection, a timeout.
    failed: AtomicU64,
}

/// Level of a stream event as a bit, so that a filter is a mask of bits.
fn level_bit(level: &[u8]) -> u8 {
    match level {
        b"fatal" | b"critical" => 1 << 1,
        b"error" => 1 << 2,
        b"warning" | b"warn" => 1 << 3,
        b"info" => 1 << 4,
        b"debug" => 1 << 5,
        _ => 1 << 6,
    }
}

/// What a project's reference subscriber saw: the level bit of each event by offset (0: not an
/// event, or not seen), and the highest event offset so far.
#[derive(Default)]
struct ReferenceLog {
    levels: Vec<u8>,
    seen_up_to: u64,
    dropped: u64,
}

/// The issues seen, as a set (to add each once) and a list (to pick from): id and project index.
type KnownIssues = (HashSet<String>, Vec<(String, usize)>);

struct Shared {
    endpoint: Endpoint,
    projects: Vec<Project>,
    /// Publishing stops at this monotonic time, set once subscribers are connected.
    end_us: AtomicU64,
    single: PathCounts,
    bulk: PathCounts,
    ws_ingest: PathCounts,
    sentry: PathCounts,
    accepted_ids: Mutex<Vec<String>>,
    /// Issues answered for native events (id, project index), for status changes.
    issues: Mutex<KnownIssues>,
    error_samples: Mutex<Vec<String>>,
    references: Vec<RwLock<ReferenceLog>>,
    subscribers_ready: AtomicU64,
    setup_failed: AtomicU64,
    reconnects: AtomicU64,
    recovered: AtomicU64,
    not_recovered: AtomicU64,
    /// Connections of reading subscribers that the server closed or broke (they resume).
    unexpected_closes: AtomicU64,
    /// Of those, the slow subscribers' (a pong later than the server's timeout, when the
    /// client itself is too busy to catch up in its reading phase).
    slow_closes: AtomicU64,
    status_ok: AtomicU64,
    status_failed: AtomicU64,
    next_event: AtomicU64,
    handshakes: Semaphore,
    ports: PortPlan,
}

impl Shared {
    fn accepted_total(&self) -> u64 {
        [&self.single, &self.bulk, &self.ws_ingest, &self.sentry]
            .iter()
            .map(|c| c.accepted.load(Ordering::Relaxed))
            .sum()
    }

    fn note_error(&self, what: String) {
        let mut samples = self.error_samples.lock().unwrap();
        if samples.len() < ERROR_SAMPLES_MAX {
            samples.push(what);
        }
    }

    fn record_accepted(&self, counts: &PathCounts, event_id: &str, issue: Option<(&str, usize)>) {
        counts.accepted.fetch_add(1, Ordering::Relaxed);
        self.accepted_ids.lock().unwrap().push(event_id.to_owned());
        if let Some((issue_id, project)) = issue {
            let mut issues = self.issues.lock().unwrap();
            if issues.0.insert(issue_id.to_owned()) {
                issues.1.push((issue_id.to_owned(), project));
            }
        }
    }

    /// Books one native answer body (`{"status":"accepted","event_id","issue_id"}`, or the
    /// same inside a bulk `results` array); returns whether it was an acceptance.
    fn record_native(&self, counts: &PathCounts, answer: &Value, project: usize) -> bool {
        match (answer["event_id"].as_str(), answer["issue_id"].as_str()) {
            (Some(event_id), issue) => {
                self.record_accepted(counts, event_id, issue.map(|i| (i, project)));
                true
            }
            _ => false,
        }
    }

    /// A native event: unique message and sequence number, one of a few fingerprints.
    fn native_event(&self, path: &str) -> (String, usize) {
        let seq = self.next_event.fetch_add(1, Ordering::Relaxed);
        let project = (seq % self.projects.len() as u64) as usize;
        let level = LEVELS[(seq / self.projects.len() as u64 % LEVELS.len() as u64) as usize];
        let event = json!({
            "message": format!("soak {path} event {seq}"),
            "level": level,
            "environment": "soak",
            "fingerprint": format!("soak-{}", seq % ISSUES_PER_PROJECT),
            "tags": {"path": path},
            "soak_seq": seq,
        });
        (event.to_string(), project)
    }
}

/// One keep-alive HTTP/1.1 connection, opened again after any failure.
struct HttpConn {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl HttpConn {
    fn new() -> HttpConn {
        HttpConn {
            stream: None,
            buf: Vec::new(),
        }
    }

    async fn request(&mut self, endpoint: &Endpoint, request: &[u8]) -> Result<Response, String> {
        let exchange = async {
            if self.stream.is_none() {
                self.buf.clear();
                self.stream = Some(
                    connect(endpoint.addr, None, None)
                        .await
                        .map_err(|e| format!("connect: {e}"))?,
                );
            }
            let stream = self.stream.as_mut().expect("connected above");
            stream
                .write_all(request)
                .await
                .map_err(|e| format!("write: {e}"))?;
            loop {
                if let Some((response, used)) =
                    parse_response(&self.buf).map_err(|e| format!("response: {e}"))?
                {
                    self.buf.drain(..used);
                    return Ok(response);
                }
                let mut chunk = [0u8; 8192];
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed before the answer".to_string());
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err("no answer in time".to_string()),
        };
        if !matches!(&result, Ok(response) if !response.close) {
            self.stream = None;
        }
        result
    }
}

/// Sleeps until the next of a steady series of ticks; false once publishing is over.
async fn next_tick(interval: &mut tokio::time::Interval, shared: &Shared) -> bool {
    interval.tick().await;
    monotonic_us() < shared.end_us.load(Ordering::Relaxed)
}

fn ticker(per_s: f64) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s));
    // After a slow answer (a storage outage), carry on at the rate instead of catching up
    // in a burst.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// Books a refusal or a failure for a non-accepting HTTP answer.
fn book_http_failure(shared: &Shared, counts: &PathCounts, what: &str, response: &Response) {
    if response.status == 429 || response.status == 503 {
        counts.refused.fetch_add(1, Ordering::Relaxed);
    } else {
        counts.failed.fetch_add(1, Ordering::Relaxed);
        shared.note_error(format!(
            "{what}: {} {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        ));
    }
}

async fn run_single(shared: Arc<Shared>, rate: f64) {
    let mut conn = HttpConn::new();
    let mut interval = ticker(rate);
    let mut request = Vec::new();
    while next_tick(&mut interval, &shared).await {
        let (event, project) = shared.native_event("single");
        let auth = format!(
            "Authorization: Bearer {}\r\n",
            shared.projects[project].ingest_key
        );
        request.clear();
        push_post(
            &mut request,
            &shared.endpoint.host,
            "/api/v1/events",
            &auth,
            event.as_bytes(),
        );
        match conn.request(&shared.endpoint, &request).await {
            Ok(response) if response.status == 202 => {
                let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                if !shared.record_native(&shared.single, &answer, project) {
                    book_http_failure(&shared, &shared.single, "single", &response);
                }
            }
            Ok(response) => book_http_failure(&shared, &shared.single, "single", &response),
            Err(e) => {
                shared.single.failed.fetch_add(1, Ordering::Relaxed);
                shared.note_error(format!("single: {e}"));
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

async fn run_bulk(shared: Arc<Shared>, requests_per_s: f64) {
    let mut conn = HttpConn::new();
    let mut interval = ticker(requests_per_s);
    let mut request = Vec::new();
    let mut round = 0usize;
    while next_tick(&mut interval, &shared).await {
        // One request holds events of one project (the key decides the project).
        let project = round % shared.projects.len();
        round += 1;
        let events: Vec<String> = (0..BULK_EVENTS)
            .map(|_| shared.native_event("bulk").0)
            .collect();
        let body = format!("[{}]", events.join(","));
        let auth = format!(
            "Authorization: Bearer {}\r\n",
            shared.projects[project].ingest_key
        );
        request.clear();
        push_post(
            &mut request,
            &shared.endpoint.host,
            "/api/v1/events/bulk",
            &auth,
            body.as_bytes(),
        );
        match conn.request(&shared.endpoint, &request).await {
            Ok(response) if response.status == 202 => {
                let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                let results = answer["results"].as_array().cloned().unwrap_or_default();
                if results.len() != BULK_EVENTS {
                    book_http_failure(&shared, &shared.bulk, "bulk", &response);
                    continue;
                }
                for result in &results {
                    // A per-event outcome other than accepted (sampled, discarded) stores
                    // nothing and is not expected here.
                    if !shared.record_native(&shared.bulk, result, project) {
                        shared.bulk.failed.fetch_add(1, Ordering::Relaxed);
                        shared.note_error(format!("bulk element: {result}"));
                    }
                }
            }
            Ok(response) => {
                book_http_failure(&shared, &shared.bulk, "bulk", &response);
                // A refused request refuses each of its events.
                if response.status == 429 || response.status == 503 {
                    shared
                        .bulk
                        .refused
                        .fetch_add(BULK_EVENTS as u64 - 1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                shared.bulk.failed.fetch_add(1, Ordering::Relaxed);
                shared.note_error(format!("bulk: {e}"));
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Sends one masked text frame.
async fn send_text(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(text.len() + 14);
    encode_client_frame(OPCODE_TEXT, text, rand::random(), &mut frame);
    stream.write_all(&frame).await
}

/// Reads the next text message, answering pings on the way.
async fn next_text(stream: &mut TcpStream, reader: &mut FrameReader) -> Result<Vec<u8>, String> {
    loop {
        let mut pong = None;
        match reader.next_message().map_err(|e| e.to_string())? {
            Some(Message::Text(text)) => return Ok(text.to_vec()),
            Some(Message::Close(code)) => return Err(format!("closed by the server ({code:?})")),
            Some(Message::Ping(payload)) => pong = Some(payload.to_vec()),
            Some(_) => {}
            None => {
                let n = stream
                    .read(reader.spare())
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed".into());
                }
                reader.filled(n);
            }
        }
        if let Some(payload) = pong {
            let mut frame = Vec::new();
            encode_client_frame(OPCODE_PONG, &payload, rand::random(), &mut frame);
            stream
                .write_all(&frame)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
    }
}

/// WebSocket ingest: one project per connection (the key is given at the upgrade), one event
/// per text message, each answered in order.
async fn run_ws_ingest(shared: Arc<Shared>, connection: usize, rate: f64) {
    let project = connection % shared.projects.len();
    let path = format!("/ingest?key={}", shared.projects[project].ingest_key);
    let mut interval = ticker(rate);
    let counts = &shared.ws_ingest;
    let mut open: Option<(TcpStream, FrameReader)> = None;
    while next_tick(&mut interval, &shared).await {
        if open.is_none() {
            let opened = async {
                let mut stream = connect(shared.endpoint.addr, None, None)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let mut reader = FrameReader::with_capacity(READ_BUFFER_BYTES);
                upgrade(&mut stream, &shared.endpoint.host, &path, &mut reader).await?;
                Ok::<_, String>((stream, reader))
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, opened).await {
                Ok(Ok(pair)) => open = Some(pair),
                Ok(Err(e)) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    shared.note_error(format!("ws ingest upgrade: {e}"));
                    continue;
                }
                Err(_) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    shared.note_error("ws ingest upgrade timed out".into());
                    continue;
                }
            }
        }
        let (stream, reader) = open.as_mut().expect("opened above");
        // Each event goes to this connection's project whatever `native_event` picked.
        let (event, _) = shared.native_event("ws");
        let exchange = async {
            send_text(stream, event.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            next_text(stream, reader).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(text)) => {
                let answer: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
                if shared.record_native(counts, &answer, project) {
                    continue;
                }
                let error = answer["error"].as_str().unwrap_or("");
                if error.contains("overloaded") || error.contains("rate limited") {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    shared.note_error(format!("ws ingest: {}", String::from_utf8_lossy(&text)));
                }
            }
            Ok(Err(e)) => {
                // The event's fate is unknown: not booked as accepted, so never looked up.
                counts.failed.fetch_add(1, Ordering::Relaxed);
                shared.note_error(format!("ws ingest: {e}"));
                open = None;
            }
            Err(_) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                shared.note_error("ws ingest answer timed out".into());
                open = None;
            }
        }
    }
}

/// Sentry envelopes to the hot project's DSN; event ids are unique in the run (`run_prefix`
/// shared by the connections, sequence numbers interleaved between them).
async fn run_sentry(shared: Arc<Shared>, connection: usize, run_prefix: u64, rate: f64) {
    let Some(dsn) = shared.projects[HOT_PROJECT]
        .dsn
        .as_deref()
        .and_then(|dsn| Dsn::parse(dsn).ok())
    else {
        shared.note_error("sentry: the project carries no DSN".into());
        return;
    };
    let envelopes = Envelopes::new(&dsn.key, run_prefix);
    let mut conn = HttpConn::new();
    let mut interval = ticker(rate);
    let (mut request, mut body) = (Vec::new(), Vec::new());
    let mut seq = connection as u64;
    while next_tick(&mut interval, &shared).await {
        body.clear();
        envelopes.push_body(&mut body, seq, crate::sys::unix_time_us());
        seq += SENTRY_CONNECTIONS as u64;
        request.clear();
        push_post_raw(
            &mut request,
            &dsn.host,
            &dsn.envelope_path(),
            &dsn.headers(),
            &body,
        );
        match conn.request(&shared.endpoint, &request).await {
            Ok(response) if response.status == 200 => {
                let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                match answer["id"].as_str() {
                    Some(id) => shared.record_accepted(&shared.sentry, id, None),
                    None => book_http_failure(&shared, &shared.sentry, "sentry", &response),
                }
            }
            Ok(response) => book_http_failure(&shared, &shared.sentry, "sentry", &response),
            Err(e) => {
                shared.sentry.failed.fetch_add(1, Ordering::Relaxed);
                shared.note_error(format!("sentry: {e}"));
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Resolves a known issue about once a second and unresolves it `UNRESOLVE_AFTER` later.
async fn run_status_changes(shared: Arc<Shared>) {
    let mut conn = HttpConn::new();
    let mut interval = ticker(STATUS_CHANGES_PER_S);
    let mut resolved: std::collections::VecDeque<(u64, String, usize)> = Default::default();
    let mut request = Vec::new();
    while next_tick(&mut interval, &shared).await {
        let mut changes = Vec::new();
        while let Some((at_us, _, _)) = resolved.front() {
            if monotonic_us() < *at_us {
                break;
            }
            let (_, issue, project) = resolved.pop_front().expect("front exists");
            changes.push(("unresolve", issue, project));
        }
        let pick = {
            let issues = shared.issues.lock().unwrap();
            if issues.1.is_empty() {
                None
            } else {
                Some(issues.1[rand::rng().random_range(0..issues.1.len())].clone())
            }
        };
        if let Some((issue, project)) = pick {
            resolved.push_back((
                monotonic_us() + UNRESOLVE_AFTER.as_micros() as u64,
                issue.clone(),
                project,
            ));
            changes.push(("resolve", issue, project));
        }
        for (action, issue, project) in changes {
            let auth = format!(
                "Authorization: Bearer {}\r\n",
                shared.projects[project].dashboard_key
            );
            request.clear();
            push_post(
                &mut request,
                &shared.endpoint.host,
                &format!("/api/v1/issues/{issue}/{action}"),
                &auth,
                b"",
            );
            match conn.request(&shared.endpoint, &request).await {
                Ok(response) if response.status == 200 => {
                    shared.status_ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(response) => {
                    shared.status_failed.fetch_add(1, Ordering::Relaxed);
                    shared.note_error(format!(
                        "{action}: {} {}",
                        response.status,
                        String::from_utf8_lossy(&response.body)
                    ));
                }
                Err(e) => {
                    shared.status_failed.fetch_add(1, Ordering::Relaxed);
                    shared.note_error(format!("{action}: {e}"));
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Fast and unfiltered, one extra per project: what the others are compared with.
    Reference,
    Fast,
    /// Subscribes to the levels in the mask.
    Filtered(u8),
    Slow,
    /// Reads the welcome, then nothing: the server must disconnect it after its stall timeout.
    NeverRead,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Reference => "reference",
            Role::Fast => "fast",
            Role::Filtered(_) => "filtered",
            Role::Slow => "slow",
            Role::NeverRead => "never_read",
        }
    }

    fn of(index: usize) -> Role {
        if index % NEVER_READ_EVERY == NEVER_READ_EVERY - 1 {
            Role::NeverRead
        } else if index % SLOW_EVERY == SLOW_EVERY / 2 {
            Role::Slow
        } else if index % FILTERED_EVERY == 1 {
            // Half want errors only, half errors and warnings.
            let mask = if index.is_multiple_of(2) {
                level_bit(b"error")
            } else {
                level_bit(b"error") | level_bit(b"warning")
            };
            Role::Filtered(mask)
        } else {
            Role::Fast
        }
    }

    fn subscribe_message(self) -> Option<&'static str> {
        match self {
            Role::Filtered(mask) if mask == level_bit(b"error") => {
                Some(r#"{"type":"subscribe","filters":{"level":"error"}}"#)
            }
            Role::Filtered(_) => {
                Some(r#"{"type":"subscribe","filters":{"level":["error","warning"]}}"#)
            }
            _ => None,
        }
    }

    fn mask(self) -> u8 {
        match self {
            Role::Filtered(mask) => mask,
            _ => u8::MAX,
        }
    }
}

/// One subscriber's delivery accounting, checked against the reference as it goes.
struct Accounting {
    mask: u8,
    /// The last event offset received in the current window.
    last: Option<u64>,
    /// Offsets between two received events, still to be checked against the reference.
    gaps: Vec<(u64, u64)>,
    /// `dropped` ranges announced and possibly still needed for the check.
    dropped: Vec<(u64, u64)>,
    received: u64,
    dropped_ranges: u64,
    /// Events of the reference that passed the filter and fell between two received events:
    /// each must lie in an announced dropped range.
    gap_events: u64,
    missing: u64,
    first_missing: Option<u64>,
    last_resolve_us: u64,
}

impl Accounting {
    fn new(mask: u8) -> Accounting {
        Accounting {
            mask,
            last: None,
            gaps: Vec::new(),
            dropped: Vec::new(),
            received: 0,
            dropped_ranges: 0,
            gap_events: 0,
            missing: 0,
            first_missing: None,
            last_resolve_us: monotonic_us(),
        }
    }

    fn receive(&mut self, offset: u64) {
        self.received += 1;
        match self.last {
            // A replayed event already had (or a duplicate): nothing new to account.
            Some(last) if offset <= last => {}
            Some(last) => {
                if offset > last + 1 {
                    self.gaps.push((last + 1, offset - 1));
                }
                self.last = Some(offset);
            }
            None => self.last = Some(offset),
        }
    }

    /// A resume that could not recover: what came before no longer bounds a gap.
    fn new_window(&mut self) {
        self.last = None;
    }

    /// Checks the gaps the reference has seen past (all of them when `all`); forgets what no
    /// later check needs.
    fn resolve(&mut self, reference: &RwLock<ReferenceLog>, all: bool) {
        self.last_resolve_us = monotonic_us();
        if self.gaps.is_empty() {
            self.prune_dropped();
            return;
        }
        let log = reference.read().unwrap();
        let dropped = &self.dropped;
        let mut kept = Vec::new();
        for &(from, to) in &self.gaps {
            if !all && to > log.seen_up_to {
                kept.push((from, to));
                continue;
            }
            for offset in from..=to {
                let bit = log.levels.get(offset as usize).copied().unwrap_or(0);
                if bit == 0 || bit & self.mask == 0 {
                    continue;
                }
                self.gap_events += 1;
                if !dropped.iter().any(|&(a, b)| a <= offset && offset <= b) {
                    self.missing += 1;
                    self.first_missing.get_or_insert(offset);
                }
            }
        }
        drop(log);
        self.gaps = kept;
        self.prune_dropped();
    }

    fn prune_dropped(&mut self) {
        // Gaps only ever start after `last` or at a kept gap, so ranges below both are done.
        let floor = self
            .gaps
            .iter()
            .map(|g| g.0)
            .min()
            .unwrap_or(u64::MAX)
            .min(self.last.map_or(u64::MAX, |l| l + 1));
        self.dropped.retain(|&(_, to)| to >= floor);
    }
}

struct SubscriberOutcome {
    index: usize,
    project: usize,
    role: Role,
    ready: bool,
    accounting: Accounting,
    /// Never-readers: whether the server had closed the connection by the end.
    closed_by_server: bool,
}

/// Why a subscriber's connection ended.
enum Ended {
    Stop,
    Resume,
    Broken(String),
}

fn text_field_u64(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or(0)
}

/// One stream subscriber for the whole run; connects again (resuming) when asked to or when
/// its connection breaks.
async fn run_subscriber(
    shared: Arc<Shared>,
    index: usize,
    project: usize,
    role: Role,
    mut resume_asks: mpsc::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberOutcome {
    let mut accounting = Accounting::new(role.mask());
    let base_path = format!(
        "/stream/projects/{}?key={}",
        shared.projects[project].id, shared.projects[project].dashboard_key
    );
    let rcvbuf = match role {
        Role::Slow => Some(SLOW_RCVBUF),
        // The smallest buffer: the server's stall detection should not wait for it to fill.
        Role::NeverRead => Some(SLOW_RCVBUF_BYTES),
        _ => None,
    };
    let mut place: Option<(String, u64)> = None;
    let mut ready = false;
    let mut setup_failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        let path = match &place {
            Some((epoch, offset)) => format!("{base_path}&since={epoch}:{offset}"),
            None => base_path.clone(),
        };
        let resuming = place.is_some();
        let opened = async {
            let _permit = shared
                .handshakes
                .acquire()
                .await
                .map_err(|e| e.to_string())?;
            let mut stream =
                connect_client(shared.endpoint.addr, &shared.ports, false, index, rcvbuf)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
            let mut reader = FrameReader::with_capacity(READ_BUFFER_BYTES);
            upgrade(&mut stream, &shared.endpoint.host, &path, &mut reader).await?;
            if let Some(subscribe) = role.subscribe_message() {
                send_text(&mut stream, subscribe.as_bytes())
                    .await
                    .map_err(|e| format!("subscribe: {e}"))?;
            }
            Ok::<_, String>((stream, reader))
        };
        let (mut stream, mut reader) = match tokio::time::timeout(REQUEST_TIMEOUT, opened).await {
            Ok(Ok(pair)) => pair,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => "upgrade timed out".into(),
                };
                setup_failures += 1;
                if !ready {
                    if setup_failures >= 5 {
                        shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                        shared.note_error(format!("subscriber {index}: {why}"));
                        break;
                    }
                } else {
                    shared.note_error(format!("subscriber {index} reconnect: {why}"));
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        setup_failures = 0;
        if role == Role::NeverRead {
            // The welcome arrived with the upgrade or soon after; after it, nothing is read.
            let welcome =
                tokio::time::timeout(REQUEST_TIMEOUT, next_text(&mut stream, &mut reader)).await;
            if !matches!(welcome, Ok(Ok(_))) {
                shared.setup_failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            shared.subscribers_ready.fetch_add(1, Ordering::Relaxed);
            let _ = stop.wait_for(|stopped| *stopped).await;
            let closed_by_server = server_closed(&mut stream).await;
            return SubscriberOutcome {
                index,
                project,
                role,
                ready: true,
                accounting,
                closed_by_server,
            };
        }
        let mut welcomed = false;
        let mut slow_phase_until = monotonic_us() + SLOW_READ.as_micros() as u64;
        let ended = loop {
            // Everything buffered first.
            let mut pong = None;
            let mut broken = None;
            loop {
                let text = match reader.next_message() {
                    Ok(Some(Message::Text(text))) => text,
                    Ok(Some(Message::Ping(payload))) => {
                        pong = Some(payload.to_vec());
                        continue;
                    }
                    Ok(Some(Message::Close(code))) => {
                        broken = Some(format!("closed by the server ({code:?})"));
                        break;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(format!("frame: {e}"));
                        break;
                    }
                };
                if !welcomed {
                    welcomed = true;
                    if place.is_none() {
                        let welcome: Value = serde_json::from_slice(text).unwrap_or(Value::Null);
                        let epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
                        place = Some((epoch, text_field_u64(&welcome, "offset")));
                    }
                    if !ready {
                        ready = true;
                        shared.subscribers_ready.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                match scan::classify(Dialect::Mesher, text) {
                    Kind::Event => {
                        let Some(offset) = offset_in(text) else {
                            continue;
                        };
                        if role == Role::Reference {
                            let event: Value = serde_json::from_slice(text).unwrap_or(Value::Null);
                            let level = event["data"]["level"].as_str().unwrap_or("error");
                            let mut log = shared.references[project].write().unwrap();
                            let at = offset as usize;
                            if log.levels.len() <= at {
                                log.levels.resize(at + 1, 0);
                            }
                            log.levels[at] = level_bit(level.as_bytes());
                            log.seen_up_to = log.seen_up_to.max(offset);
                        }
                        accounting.receive(offset);
                        if let Some((_, last)) = place.as_mut() {
                            *last = (*last).max(offset);
                        }
                    }
                    Kind::Dropped(_) => {
                        let dropped: Value = serde_json::from_slice(text).unwrap_or(Value::Null);
                        let range = (
                            text_field_u64(&dropped, "from_offset"),
                            text_field_u64(&dropped, "to_offset"),
                        );
                        accounting.dropped.push(range);
                        accounting.dropped_ranges += 1;
                        if role == Role::Reference {
                            shared.references[project].write().unwrap().dropped +=
                                range.1.saturating_sub(range.0) + 1;
                        }
                    }
                    Kind::Error => {
                        shared.note_error(format!(
                            "subscriber {index}: {}",
                            String::from_utf8_lossy(text)
                        ));
                    }
                    _ if resuming && scan::find(text, b"\"type\":\"resumed\"").is_some() => {
                        let reply: Value = serde_json::from_slice(text).unwrap_or(Value::Null);
                        if reply["recovered"] == true {
                            shared.recovered.fetch_add(1, Ordering::Relaxed);
                        } else {
                            shared.not_recovered.fetch_add(1, Ordering::Relaxed);
                            accounting.new_window();
                            let epoch = reply["epoch"].as_str().unwrap_or_default().to_owned();
                            place = Some((epoch, text_field_u64(&reply, "offset")));
                        }
                    }
                    _ => {}
                }
            }
            if let Some(payload) = pong {
                let mut frame = Vec::new();
                encode_client_frame(OPCODE_PONG, &payload, rand::random(), &mut frame);
                if let Err(e) = stream.write_all(&frame).await {
                    break Ended::Broken(format!("pong: {e}"));
                }
            }
            if let Some(why) = broken {
                break Ended::Broken(why);
            }
            if monotonic_us() - accounting.last_resolve_us > RESOLVE_EVERY_US {
                accounting.resolve(&shared.references[project], false);
            }
            if role == Role::Slow && monotonic_us() >= slow_phase_until {
                // Stop reading for a while: the server has to hold, then drop, for us.
                tokio::select! {
                    _ = tokio::time::sleep(SLOW_PAUSE) => {}
                    _ = stop.changed() => break Ended::Stop,
                }
                slow_phase_until = monotonic_us() + SLOW_READ.as_micros() as u64;
            }
            tokio::select! {
                read = stream.read(reader.spare()) => match read {
                    Ok(n) if n > 0 => reader.filled(n),
                    Ok(_) => break Ended::Broken("connection closed".into()),
                    Err(e) => break Ended::Broken(format!("read: {e}")),
                },
                ask = resume_asks.recv(), if role != Role::Reference => {
                    if ask.is_some() {
                        break Ended::Resume;
                    }
                }
                _ = stop.changed() => break Ended::Stop,
            }
        };
        match ended {
            Ended::Stop => break,
            Ended::Resume => {
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            Ended::Broken(why) => {
                shared.unexpected_closes.fetch_add(1, Ordering::Relaxed);
                if role == Role::Slow {
                    shared.slow_closes.fetch_add(1, Ordering::Relaxed);
                }
                shared.note_error(format!("subscriber {index} ({}): {why}", role.name()));
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        // Dropping the stream without a close handshake, as a lost network would.
        drop(stream);
    }
    SubscriberOutcome {
        index,
        project,
        role,
        ready,
        accounting,
        closed_by_server: false,
    }
}

/// Whether the server has closed a connection this side never read: reads what is buffered
/// until the end of the stream (closed) or a quiet moment (still open).
async fn server_closed(stream: &mut TcpStream) -> bool {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Asks a random reading, non-reference subscriber to drop its connection and resume, at
/// `RECONNECTS_PER_S`: on schedule, catching up after the client was late (a busy machine
/// delays timers), so the resume load is what was asked for.
async fn run_reconnects(shared: Arc<Shared>, asks: Vec<mpsc::Sender<()>>) {
    /// Picks tried per due resume before giving up until the next tick (a subscriber may
    /// still hold its previous ask).
    const PICKS_MAX: usize = 8;
    if asks.is_empty() {
        return;
    }
    let begin_us = monotonic_us();
    let mut asked = 0u64;
    let mut interval = ticker(RECONNECTS_PER_S);
    while next_tick(&mut interval, &shared).await {
        let due = ((monotonic_us() - begin_us) as f64 / 1e6 * RECONNECTS_PER_S) as u64;
        'due: while asked < due {
            for _ in 0..PICKS_MAX {
                let pick = rand::rng().random_range(0..asks.len());
                if asks[pick].try_send(()).is_ok() {
                    asked += 1;
                    continue 'due;
                }
            }
            break;
        }
    }
}

/// One sample of the server's resources and health.
#[derive(Clone, Copy, Default)]
struct Sample {
    elapsed_s: f64,
    rss_kib: u64,
    open_files: u64,
    cpu_s: f64,
    accepted: u64,
}

fn sample_process(pid: u32) -> Option<(u64, u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((
        parse_status_rss_kib(&status)?,
        open_files,
        parse_stat_cpu_s(&stat, ticks)?,
    ))
}

/// `/metrics`, as text.
async fn fetch_metrics(endpoint: &Endpoint) -> Result<String, String> {
    let mut conn = HttpConn::new();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        endpoint.host
    );
    let response = conn.request(endpoint, request.as_bytes()).await?;
    Ok(String::from_utf8_lossy(&response.body).into_owned())
}

/// The largest value of a metric family over its labels.
fn metric_max(metrics: &str, family: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

async fn run_sampler(
    shared: Arc<Shared>,
    pid: Option<u32>,
    path: Option<PathBuf>,
    start_us: u64,
    mut stop: watch::Receiver<bool>,
) -> Vec<Value> {
    let mut file = path.and_then(|p| match std::fs::File::create(&p) {
        Ok(f) => Some(f),
        Err(e) => {
            eprintln!("mixed: cannot write {}: {e}", p.display());
            None
        }
    });
    let mut previous = Sample::default();
    if let Some((rss_kib, open_files, cpu_s)) = pid.and_then(sample_process) {
        previous = Sample {
            rss_kib,
            open_files,
            cpu_s,
            ..previous
        };
    }
    let mut samples = Vec::new();
    let mut interval = tokio::time::interval(SAMPLE_EVERY);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => break,
        }
        let mut now = Sample {
            elapsed_s: (monotonic_us() - start_us) as f64 / 1e6,
            accepted: shared.accepted_total(),
            ..Sample::default()
        };
        if let Some((rss_kib, open_files, cpu_s)) = pid.and_then(sample_process) {
            now.rss_kib = rss_kib;
            now.open_files = open_files;
            now.cpu_s = cpu_s;
        }
        let metrics = fetch_metrics(&shared.endpoint).await.unwrap_or_default();
        let accepted_in_interval = now.accepted - previous.accepted;
        let cpu_per_event_us = (accepted_in_interval > 0 && pid.is_some())
            .then(|| (now.cpu_s - previous.cpu_s) * 1e6 / accepted_in_interval as f64);
        let line = json!({
            "elapsed_s": round1(now.elapsed_s),
            "rss_kib": now.rss_kib,
            "open_files": now.open_files,
            "cpu_s": round3(now.cpu_s),
            "accepted": now.accepted,
            "accepted_in_interval": accepted_in_interval,
            "cpu_per_event_us": cpu_per_event_us.map(round1),
            "loop_lag_us": metric_max(&metrics, "mesher_loop_lag_microseconds"),
            "loop_lag_max_us": metric_max(&metrics, "mesher_loop_lag_max_microseconds"),
            "storage_queue_events": metric_max(&metrics, "mesher_storage_queue_events"),
            // Stream messages written so far: CPU per event depends on how many of them each
            // event costs, which drops and coalescing for a busy client change.
            "stream_messages_sent": metric_max(&metrics, "mesher_stream_messages_sent_total"),
            "subscribers_ready": shared.subscribers_ready.load(Ordering::Relaxed),
            "reconnects": shared.reconnects.load(Ordering::Relaxed),
            // This client's own CPU: when it nears the machine's cores, rates and latencies
            // are the client's, not the server's.
            "client_cpu_s": round3(crate::sys::own_cpu_s()),
        });
        eprintln!("sample {line}");
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        samples.push(line);
        previous = now;
    }
    samples
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn path_json(counts: &PathCounts) -> Value {
    json!({
        "accepted": counts.accepted.load(Ordering::Relaxed),
        "refused": counts.refused.load(Ordering::Relaxed),
        "failed": counts.failed.load(Ordering::Relaxed),
    })
}

/// Runs the scenario; the report is one JSON object.
pub async fn run(options: MixedOptions) -> Result<Value, String> {
    let run_id = format!(
        "soak{:x}",
        (crate::sys::unix_time_s() << 20) ^ u64::from(std::process::id())
    );
    let projects = tokio::time::timeout(
        Duration::from_secs_f64(options.setup_timeout_s),
        create_mesher_projects(
            &options.endpoint,
            &options.admin_token,
            &run_id,
            options.projects,
        ),
    )
    .await
    .map_err(|_| "project setup timed out".to_string())??;
    let project_count = projects.len();
    let shared = Arc::new(Shared {
        endpoint: options.endpoint.clone(),
        projects,
        end_us: AtomicU64::new(u64::MAX),
        single: PathCounts::default(),
        bulk: PathCounts::default(),
        ws_ingest: PathCounts::default(),
        sentry: PathCounts::default(),
        accepted_ids: Mutex::new(Vec::new()),
        issues: Mutex::new((HashSet::new(), Vec::new())),
        error_samples: Mutex::new(Vec::new()),
        references: (0..project_count)
            .map(|_| RwLock::new(ReferenceLog::default()))
            .collect(),
        subscribers_ready: AtomicU64::new(0),
        setup_failed: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        recovered: AtomicU64::new(0),
        not_recovered: AtomicU64::new(0),
        unexpected_closes: AtomicU64::new(0),
        slow_closes: AtomicU64::new(0),
        status_ok: AtomicU64::new(0),
        status_failed: AtomicU64::new(0),
        next_event: AtomicU64::new(0),
        handshakes: Semaphore::new(HANDSHAKES_IN_FLIGHT),
        ports: PortPlan::new(&[]),
    });

    // Subscribers first (references before the rest), so that they see the run from its start.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subscriber_handles = Vec::new();
    let mut resume_asks = Vec::new();
    let total = options.subscribers + project_count;
    for index in 0..total {
        let (project, role) = if index < project_count {
            (index, Role::Reference)
        } else {
            let i = index - project_count;
            let role = Role::of(i);
            let project = if role == Role::Slow {
                HOT_PROJECT
            } else {
                i % project_count
            };
            (project, role)
        };
        let (ask_tx, ask_rx) = mpsc::channel(1);
        if matches!(role, Role::Fast | Role::Filtered(_)) {
            resume_asks.push(ask_tx);
        }
        subscriber_handles.push(tokio::spawn(run_subscriber(
            shared.clone(),
            index,
            project,
            role,
            ask_rx,
            stop_rx.clone(),
        )));
    }
    let setup_until = monotonic_us() + (options.setup_timeout_s * 1e6) as u64;
    loop {
        let ready = shared.subscribers_ready.load(Ordering::Relaxed);
        let failed = shared.setup_failed.load(Ordering::Relaxed);
        if ready + failed >= total as u64 || monotonic_us() > setup_until {
            eprintln!("mixed: {ready}/{total} subscribers ready, {failed} failed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The run's clock starts once subscribers are in: setup time is not load time.
    let start_us = monotonic_us();
    let end_us = start_us + (options.duration_s * 1e6) as u64;
    shared.end_us.store(end_us, Ordering::Relaxed);
    let sampler = tokio::spawn(run_sampler(
        shared.clone(),
        options.server_pid,
        options.samples.clone(),
        start_us,
        stop_rx.clone(),
    ));
    let mut publishers = Vec::new();
    let rate = options.events_per_s;
    for _ in 0..SINGLE_CONNECTIONS {
        let per_connection = rate * SINGLE_SHARE / SINGLE_CONNECTIONS as f64;
        publishers.push(tokio::spawn(run_single(shared.clone(), per_connection)));
    }
    let bulk_requests_per_s = rate * BULK_SHARE / BULK_EVENTS as f64;
    publishers.push(tokio::spawn(run_bulk(shared.clone(), bulk_requests_per_s)));
    for connection in 0..WS_INGEST_CONNECTIONS {
        let per_connection = rate * WS_INGEST_SHARE / WS_INGEST_CONNECTIONS as f64;
        publishers.push(tokio::spawn(run_ws_ingest(
            shared.clone(),
            connection,
            per_connection,
        )));
    }
    let run_prefix: u64 = rand::random();
    for connection in 0..SENTRY_CONNECTIONS {
        let per_connection = rate * SENTRY_SHARE / SENTRY_CONNECTIONS as f64;
        publishers.push(tokio::spawn(run_sentry(
            shared.clone(),
            connection,
            run_prefix,
            per_connection,
        )));
    }
    publishers.push(tokio::spawn(run_status_changes(shared.clone())));
    publishers.push(tokio::spawn(run_reconnects(shared.clone(), resume_asks)));
    for publisher in publishers {
        let _ = publisher.await;
    }
    eprintln!("mixed: publishing done; draining for {}s", DRAIN.as_secs());
    tokio::time::sleep(DRAIN).await;
    let _ = stop_tx.send(true);

    let mut outcomes = Vec::with_capacity(total);
    let mut lost = 0u64;
    let teardown_until = tokio::time::Instant::now() + TEARDOWN;
    for handle in subscriber_handles {
        let abort = handle.abort_handle();
        match tokio::time::timeout_at(teardown_until, handle).await {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            _ => {
                abort.abort();
                lost += 1;
            }
        }
    }
    let samples = sampler.await.unwrap_or_default();

    // The final check: every gap against everything the references saw.
    let (mut accounted, mut unaccounted, mut gap_events, mut dropped_ranges) =
        (0u64, 0u64, 0u64, 0u64);
    let mut received = 0u64;
    let mut unaccounted_list = Vec::new();
    let (mut never_readers, mut never_readers_closed, mut not_ready) = (0u64, 0u64, 0u64);
    for outcome in &mut outcomes {
        if !outcome.ready {
            not_ready += 1;
            continue;
        }
        if outcome.role == Role::NeverRead {
            never_readers += 1;
            never_readers_closed += u64::from(outcome.closed_by_server);
            continue;
        }
        let project = outcome.project;
        outcome
            .accounting
            .resolve(&shared.references[project], true);
        let a = &outcome.accounting;
        gap_events += a.gap_events;
        received += a.received;
        dropped_ranges += a.dropped_ranges;
        if a.missing == 0 {
            accounted += 1;
        } else {
            unaccounted += 1;
            if unaccounted_list.len() < UNACCOUNTED_LISTED_MAX {
                unaccounted_list.push(json!({
                    "subscriber": outcome.index,
                    "role": outcome.role.name(),
                    "project": project,
                    "missing": a.missing,
                    "first_missing_offset": a.first_missing,
                    "received": a.received,
                }));
            }
        }
    }

    let ids = std::mem::take(&mut *shared.accepted_ids.lock().unwrap());
    if let Some(path) = &options.accepted_ids {
        let mut text = String::with_capacity(ids.len() * 37);
        for id in &ids {
            text.push_str(id);
            text.push('\n');
        }
        std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let reference_drops: u64 = shared
        .references
        .iter()
        .map(|r| r.read().unwrap().dropped)
        .sum();
    let reference_events: u64 = shared
        .references
        .iter()
        .map(|r| r.read().unwrap().levels.iter().filter(|b| **b != 0).count() as u64)
        .sum();
    Ok(json!({
        "scenario": "mixed",
        "duration": options.duration_s,
        "projects": project_count,
        "accepted": ids.len(),
        "single": path_json(&shared.single),
        "bulk": path_json(&shared.bulk),
        "ws_ingest": path_json(&shared.ws_ingest),
        "sentry": path_json(&shared.sentry),
        "status_changes_ok": shared.status_ok.load(Ordering::Relaxed),
        "status_changes_failed": shared.status_failed.load(Ordering::Relaxed),
        "subscribers": options.subscribers,
        "subscribers_ready": shared.subscribers_ready.load(Ordering::Relaxed),
        "subscribers_failed": shared.setup_failed.load(Ordering::Relaxed),
        "subscribers_lost": lost,
        "subscribers_not_ready": not_ready,
        "accounted": accounted,
        "unaccounted": unaccounted,
        "unaccounted_list": unaccounted_list,
        "events_received": received,
        "gap_events_in_dropped_ranges": gap_events,
        "dropped_ranges": dropped_ranges,
        "reference_events": reference_events,
        "reference_dropped": reference_drops,
        "never_readers": never_readers,
        "never_readers_closed_by_server": never_readers_closed,
        "reconnects": shared.reconnects.load(Ordering::Relaxed),
        "resumed_recovered": shared.recovered.load(Ordering::Relaxed),
        "resumed_not_recovered": shared.not_recovered.load(Ordering::Relaxed),
        "unexpected_closes": shared.unexpected_closes.load(Ordering::Relaxed),
        "slow_closes": shared.slow_closes.load(Ordering::Relaxed),
        "error_samples": *shared.error_samples.lock().unwrap(),
        "samples": samples.len(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference that saw events at `offsets` with `level`.
    fn reference(events: &[(u64, &str)]) -> RwLock<ReferenceLog> {
        let mut log = ReferenceLog::default();
        for &(offset, level) in events {
            if log.levels.len() <= offset as usize {
                log.levels.resize(offset as usize + 1, 0);
            }
            log.levels[offset as usize] = level_bit(level.as_bytes());
            log.seen_up_to = log.seen_up_to.max(offset);
        }
        RwLock::new(log)
    }

    #[test]
    fn a_missed_event_is_found_unless_announced_as_dropped() {
        let log = reference(&[(1, "error"), (2, "error"), (4, "error"), (5, "error")]);
        let mut missed = Accounting::new(u8::MAX);
        missed.receive(1);
        missed.receive(5);
        missed.resolve(&log, true);
        assert_eq!((missed.missing, missed.first_missing), (2, Some(2)));

        let mut told = Accounting::new(u8::MAX);
        told.receive(1);
        told.dropped.push((2, 4));
        told.receive(5);
        told.resolve(&log, true);
        assert_eq!((told.missing, told.gap_events), (0, 2));
    }

    #[test]
    fn filtered_out_events_and_other_messages_are_not_owed() {
        // Offset 3 is not an event (an issue_count), 2 is a warning.
        let log = reference(&[(1, "error"), (2, "warning"), (4, "error")]);
        let mut errors_only = Accounting::new(level_bit(b"error"));
        errors_only.receive(1);
        errors_only.receive(4);
        errors_only.resolve(&log, true);
        assert_eq!(errors_only.missing, 0);
    }

    #[test]
    fn gaps_wait_for_the_reference_and_a_new_window_forgets_the_old_bound() {
        let log = reference(&[(1, "error"), (2, "error")]);
        let mut early = Accounting::new(u8::MAX);
        early.receive(1);
        early.receive(9);
        // The reference has not got past 8 yet: nothing is decided.
        early.resolve(&log, false);
        assert_eq!((early.gaps.len(), early.missing), (1, 0));

        let mut resumed = Accounting::new(u8::MAX);
        resumed.receive(1);
        resumed.new_window();
        resumed.receive(9);
        assert!(resumed.gaps.is_empty());
    }

    #[test]
    fn metric_families_are_read_by_their_largest_label() {
        let text = "# HELP x\nmesher_loop_lag_microseconds{shard=\"0\"} 12\n\
                    mesher_loop_lag_microseconds{shard=\"1\"} 40\n\
                    mesher_loop_lag_max_microseconds{shard=\"0\"} 900\n\
                    mesher_storage_queue_events 3\n";
        assert_eq!(metric_max(text, "mesher_loop_lag_microseconds"), Some(40.0));
        assert_eq!(metric_max(text, "mesher_storage_queue_events"), Some(3.0));
        assert_eq!(metric_max(text, "mesher_missing"), None);
    }
}
