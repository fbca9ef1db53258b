//! What differs between the servers under test: how a project maps to a channel, the subscribe
//! path, and the publish request. Everything else (event body, read loop, counting) is shared so
//! that figures compare.

use std::net::SocketAddr;

use crate::http::{parse_response, push_post, push_post_raw};
use crate::pusher;
use crate::scan::Dialect;
use crate::sentry::{Dsn, Envelopes};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    Mesher,
    Nchan,
    Sockudo,
    /// Bugsink, a self-hosted Sentry-protocol error tracker (the `sentry` scenario only).
    Bugsink,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Mesher => "mesher",
            TargetKind::Nchan => "nchan",
            TargetKind::Sockudo => "sockudo",
            TargetKind::Bugsink => "bugsink",
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            TargetKind::Mesher => Dialect::Mesher,
            TargetKind::Nchan | TargetKind::Bugsink => Dialect::Raw,
            TargetKind::Sockudo => Dialect::Pusher,
        }
    }
}

/// The level that filtered subscribers ask for.
pub const FILTER_LEVEL: &str = "error";
/// Suffix of the peer channel that carries only `FILTER_LEVEL` events (peers have no filters,
/// so a filtered subscription becomes a second channel the publisher also posts those events to).
const FILTERED_CHANNEL_SUFFIX: &str = "-err";

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Value of the Host header.
    pub host: String,
}

impl Endpoint {
    /// Accepts `http://host:port`, `ws://host:port` or `host:port` (a path is ignored).
    pub async fn resolve(url: &str) -> std::io::Result<Endpoint> {
        let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority = without_scheme.split('/').next().unwrap_or("");
        let host = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(host.as_str())
            .await?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| std::io::Error::other(format!("cannot resolve {host}")))?;
        Ok(Endpoint { addr, host })
    }
}

#[derive(Clone, Debug)]
pub struct Project {
    /// Mesher: the project UUID; peers: the channel name.
    pub id: String,
    /// Mesher only.
    pub ingest_key: String,
    pub dashboard_key: String,
    /// Mesher: the project's Sentry DSN (`http://INGEST_KEY@HOST/NUMBER`).
    pub dsn: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PusherApp {
    pub id: String,
    pub key: String,
    pub secret: String,
}

pub struct Routes {
    pub kind: TargetKind,
    pub endpoint: Endpoint,
    pub projects: Vec<Project>,
    pub app: PusherApp,
    /// Publish `FILTER_LEVEL` events to the filtered peer channel too.
    pub filtered_channels: bool,
    /// Mesher: `Authorization` header line per project.
    auth_headers: Vec<String>,
    /// The `sentry` scenario: every publish is a Sentry envelope to this project.
    sentry: Option<SentryRoute>,
    /// Where subscribers connect, round-robin (several Mesher nodes); `endpoint` by default.
    stream_endpoints: Vec<Endpoint>,
}

/// Where Sentry envelopes go and what they hold.
struct SentryRoute {
    dsn: Dsn,
    path: String,
    headers: String,
    envelopes: Envelopes,
    /// The events go as plain JSON to Mesher's native endpoint instead of in envelopes.
    native: bool,
}

/// Appends the benchmark event: the same JSON for every target, padded to `event_bytes`.
pub fn push_event(out: &mut Vec<u8>, level: &str, sent_us: u64, event_bytes: usize) {
    let start = out.len();
    out.extend_from_slice(b"{\"message\":\"bench\",\"level\":\"");
    out.extend_from_slice(level.as_bytes());
    out.extend_from_slice(b"\",\"environment\":\"bench\",\"sent_us\":");
    out.extend_from_slice(sent_us.to_string().as_bytes());
    out.extend_from_slice(b",\"pad\":\"");
    const TAIL: &[u8] = b"\"}";
    let pad = event_bytes.saturating_sub(out.len() - start + TAIL.len());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(TAIL);
}

impl Routes {
    pub fn new(
        kind: TargetKind,
        endpoint: Endpoint,
        projects: Vec<Project>,
        app: PusherApp,
        filtered_channels: bool,
    ) -> Routes {
        let auth_headers = projects
            .iter()
            .map(|p| format!("Authorization: Bearer {}\r\n", p.ingest_key))
            .collect();
        Routes {
            kind,
            endpoint,
            projects,
            app,
            filtered_channels,
            auth_headers,
            sentry: None,
            stream_endpoints: Vec::new(),
        }
    }

    /// Subscribers connect to these nodes, round-robin, instead of `endpoint`.
    pub fn with_stream_endpoints(mut self, endpoints: Vec<Endpoint>) -> Routes {
        self.stream_endpoints = endpoints;
        self
    }

    /// The node subscriber `index` connects to.
    pub fn stream_endpoint(&self, index: usize) -> &Endpoint {
        match self.stream_endpoints.len() {
            0 => &self.endpoint,
            n => &self.stream_endpoints[index % n],
        }
    }

    /// Every publish becomes a gzip Sentry envelope posted as the DSN says; event ids start
    /// with `run_prefix`.
    /// With `native`, each event goes instead as plain JSON to Mesher's `/api/v1/events`, with
    /// the DSN's key: the same event through the native path.
    pub fn with_sentry(mut self, dsn: Dsn, run_prefix: u64, native: bool) -> Routes {
        let (path, headers) = if native {
            let headers = format!(
                "Authorization: Bearer {}\r\nContent-Type: application/json\r\n",
                dsn.key
            );
            ("/api/v1/events".to_string(), headers)
        } else {
            (dsn.envelope_path(), dsn.headers())
        };
        self.sentry = Some(SentryRoute {
            path,
            headers,
            native,
            envelopes: Envelopes::new(&dsn.key, run_prefix),
            dsn,
        });
        self
    }

    /// Peer channel names for one run: unique, so that no message buffered by an earlier run
    /// is replayed to these subscribers.
    pub fn peer_projects(run_id: &str, count: usize) -> Vec<Project> {
        (0..count)
            .map(|i| Project {
                id: format!("b{run_id}-p{i}"),
                ingest_key: String::new(),
                dashboard_key: String::new(),
                dsn: None,
            })
            .collect()
    }

    /// The WebSocket upgrade path for a subscriber of `project`.
    pub fn subscribe_path(&self, project: usize, filtered: bool) -> String {
        let p = &self.projects[project];
        match self.kind {
            TargetKind::Mesher => format!("/stream/projects/{}?key={}", p.id, p.dashboard_key),
            TargetKind::Nchan => format!("/sub?ch={}", self.peer_channel(project, filtered)),
            TargetKind::Sockudo => format!(
                "/app/{}?protocol=7&client=mesher-load&version=0.1.0&flash=false",
                self.app.key
            ),
            TargetKind::Bugsink => "/".to_string(),
        }
    }

    /// The channel a peer subscriber joins.
    pub fn peer_channel(&self, project: usize, filtered: bool) -> String {
        let name = &self.projects[project].id;
        if filtered {
            format!("{name}{FILTERED_CHANNEL_SUFFIX}")
        } else {
            name.clone()
        }
    }

    /// Appends one publish request, the `seq`th of the run; `scratch` is reused between calls.
    #[allow(clippy::too_many_arguments)]
    pub fn push_publish(
        &self,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        seq: u64,
        project: usize,
        level: &str,
        sent_us: u64,
        event_bytes: usize,
    ) {
        scratch.clear();
        if let Some(sentry) = &self.sentry {
            let now_us = crate::sys::unix_time_us();
            if sentry.native {
                sentry.envelopes.push_event_json(scratch, seq, now_us);
            } else {
                sentry.envelopes.push_body(scratch, seq, now_us);
            }
            push_post_raw(
                out,
                &sentry.dsn.host,
                &sentry.path,
                &sentry.headers,
                scratch,
            );
            return;
        }
        push_event(scratch, level, sent_us, event_bytes);
        let host = &self.endpoint.host;
        let also_filtered = self.filtered_channels && level == FILTER_LEVEL;
        match self.kind {
            TargetKind::Mesher => push_post(
                out,
                host,
                "/api/v1/events",
                &self.auth_headers[project],
                scratch,
            ),
            TargetKind::Nchan | TargetKind::Bugsink => {
                let channel = &self.projects[project].id;
                let target = if also_filtered {
                    format!("/pubm?ch={channel}&ch2={channel}{FILTERED_CHANNEL_SUFFIX}")
                } else {
                    format!("/pub?ch={channel}")
                };
                push_post(out, host, &target, "", scratch);
            }
            TargetKind::Sockudo => {
                let mut body = Vec::with_capacity(scratch.len() + 128);
                body.extend_from_slice(b"{\"name\":\"bench\",\"channels\":[\"");
                body.extend_from_slice(self.peer_channel(project, false).as_bytes());
                if also_filtered {
                    body.extend_from_slice(b"\",\"");
                    body.extend_from_slice(self.peer_channel(project, true).as_bytes());
                }
                body.extend_from_slice(b"\"],\"data\":\"");
                pusher::push_json_string_contents(scratch, &mut body);
                body.extend_from_slice(b"\"}");
                let path = format!("/apps/{}/events", self.app.id);
                let query = pusher::signed_query(
                    &self.app.key,
                    &self.app.secret,
                    &path,
                    &body,
                    crate::sys::unix_time_s(),
                );
                push_post(out, host, &format!("{path}?{query}"), "", &body);
            }
        }
    }

    /// Whether a publish reply means the event was taken (and will be streamed).
    pub fn accepted(&self, status: u16, body: &[u8]) -> bool {
        if let Some(sentry) = &self.sentry {
            if sentry.native {
                return status == 202 && crate::scan::find(body, b"accepted").is_some();
            }
            // Sentry's answer to a stored (or sampled, or deduplicated) event.
            return status == 200 && crate::scan::find(body, b"\"id\"").is_some();
        }
        match self.kind {
            TargetKind::Mesher => status == 202 && crate::scan::find(body, b"accepted").is_some(),
            TargetKind::Nchan | TargetKind::Sockudo | TargetKind::Bugsink => {
                (200..300).contains(&status)
            }
        }
    }
}

/// Creates `count` Mesher projects with the admin token, over a few keep-alive connections.
pub async fn create_mesher_projects(
    endpoint: &Endpoint,
    admin_token: &str,
    run_id: &str,
    count: usize,
) -> Result<Vec<Project>, String> {
    /// Parallel admin connections: project creation writes to storage, so a few in flight
    /// hide its latency without flooding the server before the measurement.
    const CREATE_CONNECTIONS: usize = 8;
    let workers = CREATE_CONNECTIONS.min(count.max(1));
    let mut handles = Vec::new();
    for worker in 0..workers {
        let endpoint = endpoint.clone();
        let token = admin_token.to_string();
        let run_id = run_id.to_string();
        handles.push(tokio::spawn(async move {
            let mut conn = AdminConn::connect(&endpoint).await?;
            let mut made = Vec::new();
            for index in (worker..count).step_by(workers) {
                let body = format!("{{\"name\":\"bench-{run_id}-{index}\"}}");
                let (status, reply) = conn
                    .post(
                        "/api/v1/projects",
                        &format!("Authorization: Bearer {token}\r\n"),
                        body.as_bytes(),
                    )
                    .await?;
                if status != 201 && status != 200 {
                    return Err(format!(
                        "POST /api/v1/projects: {status} {}",
                        String::from_utf8_lossy(&reply)
                    ));
                }
                let json: serde_json::Value = serde_json::from_slice(&reply)
                    .map_err(|e| format!("project reply is not JSON: {e}"))?;
                let field = |name: &str| {
                    json.get(name)
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| format!("project reply lacks {name}: {json}"))
                };
                made.push((
                    index,
                    Project {
                        id: field("id")?,
                        ingest_key: field("ingest_key")?,
                        dashboard_key: field("dashboard_key")?,
                        dsn: field("dsn").ok(),
                    },
                ));
            }
            Ok::<_, String>(made)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for handle in handles {
        all.extend(handle.await.map_err(|e| e.to_string())??);
    }
    all.sort_by_key(|(index, _)| *index);
    Ok(all.into_iter().map(|(_, p)| p).collect())
}

/// One keep-alive HTTP connection for setup calls.
struct AdminConn {
    stream: tokio::net::TcpStream,
    host: String,
    buf: Vec<u8>,
}

impl AdminConn {
    async fn connect(endpoint: &Endpoint) -> Result<AdminConn, String> {
        let stream = tokio::net::TcpStream::connect(endpoint.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", endpoint.addr))?;
        Ok(AdminConn {
            stream,
            host: endpoint.host.clone(),
            buf: Vec::new(),
        })
    }

    async fn post(
        &mut self,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        /// Setup calls that take longer than this mean the server is not healthy.
        const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
        let mut request = Vec::new();
        push_post(&mut request, &self.host, path, headers, body);
        let exchange = async {
            self.stream
                .write_all(&request)
                .await
                .map_err(|e| e.to_string())?;
            loop {
                if let Some((response, used)) =
                    parse_response(&self.buf).map_err(|e| e.to_string())?
                {
                    self.buf.drain(..used);
                    return Ok((response.status, response.body));
                }
                let mut chunk = [0u8; 4096];
                let n = self
                    .stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed during setup".to_string());
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(ADMIN_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("POST {path} timed out"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(kind: TargetKind) -> Routes {
        Routes::new(
            kind,
            Endpoint {
                addr: "127.0.0.1:1".parse().unwrap(),
                host: "127.0.0.1:1".into(),
            },
            vec![Project {
                id: "P".into(),
                ingest_key: "mshr_k".into(),
                dashboard_key: "mshd_k".into(),
                dsn: None,
            }],
            PusherApp {
                id: "app".into(),
                key: "key".into(),
                secret: "secret".into(),
            },
            true,
        )
    }

    #[test]
    fn event_is_padded_to_the_requested_size_and_valid_json() {
        for size in [0usize, 80, 512, 1024] {
            let mut out = Vec::new();
            push_event(&mut out, "warning", 1234567, size);
            let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(json["sent_us"], 1234567);
            assert_eq!(json["level"], "warning");
            if size >= 100 {
                assert_eq!(out.len(), size);
            }
        }
    }

    fn body_of(request: &[u8]) -> &[u8] {
        let at = crate::scan::find(request, b"\r\n\r\n").unwrap();
        &request[at + 4..]
    }

    #[test]
    fn sockudo_publish_carries_the_event_as_a_string_to_both_channels() {
        let routes = routes(TargetKind::Sockudo);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        routes.push_publish(&mut out, &mut scratch, 0, 0, "error", 99, 512);
        assert!(out.starts_with(b"POST /apps/app/events?auth_key=key&auth_timestamp="));
        let body: serde_json::Value = serde_json::from_slice(body_of(&out)).unwrap();
        assert_eq!(body["channels"], serde_json::json!(["P", "P-err"]));
        let event: serde_json::Value =
            serde_json::from_str(body["data"].as_str().unwrap()).unwrap();
        assert_eq!(event["sent_us"], 99);
        out.clear();
        routes.push_publish(&mut out, &mut scratch, 0, 0, "info", 99, 512);
        let body: serde_json::Value = serde_json::from_slice(body_of(&out)).unwrap();
        assert_eq!(body["channels"], serde_json::json!(["P"]));
    }

    #[test]
    fn nchan_and_mesher_publish_targets() {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        routes(TargetKind::Nchan).push_publish(&mut out, &mut scratch, 0, 0, "error", 1, 100);
        assert!(out.starts_with(b"POST /pubm?ch=P&ch2=P-err HTTP/1.1\r\n"));
        out.clear();
        routes(TargetKind::Nchan).push_publish(&mut out, &mut scratch, 0, 0, "debug", 1, 100);
        assert!(out.starts_with(b"POST /pub?ch=P HTTP/1.1\r\n"));
        out.clear();
        routes(TargetKind::Mesher).push_publish(&mut out, &mut scratch, 0, 0, "error", 1, 100);
        assert!(out.starts_with(b"POST /api/v1/events HTTP/1.1\r\n"));
        assert!(crate::scan::find(&out, b"Authorization: Bearer mshr_k\r\n").is_some());
        assert_eq!(body_of(&out).len(), 100);
    }

    #[test]
    fn subscribe_paths() {
        assert_eq!(
            routes(TargetKind::Mesher).subscribe_path(0, true),
            "/stream/projects/P?key=mshd_k"
        );
        assert_eq!(
            routes(TargetKind::Nchan).subscribe_path(0, true),
            "/sub?ch=P-err"
        );
        assert!(routes(TargetKind::Sockudo)
            .subscribe_path(0, false)
            .starts_with("/app/key?protocol=7"));
    }

    #[test]
    fn acceptance_per_target() {
        let mesher = routes(TargetKind::Mesher);
        assert!(mesher.accepted(202, br#"{"status":"accepted"}"#));
        assert!(!mesher.accepted(202, br#"{"status":"sampled"}"#));
        assert!(!mesher.accepted(503, br#"{"error":"overloaded"}"#));
        assert!(routes(TargetKind::Nchan).accepted(201, b"queued"));
        assert!(!routes(TargetKind::Sockudo).accepted(401, b""));
    }
}
