//! Counters kept per shard and summed when `/metrics` is read.
//!
//! Each shard writes only its own `ShardMetrics` (relaxed atomics on a cache line nobody else
//! writes), so counting costs no contention; any shard may read all of them for a scrape.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::conn::limits::Limits;
use crate::store::{Store, StoreStats};

/// Why a connection ended; each reason is its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Normal,
    RequestTimeout,
    IdleTimeout,
    BadRequest,
    ProtocolError,
    SlowClient,
    PongTimeout,
    IoError,
    Shutdown,
    /// Answered 503 and closed: too many connections, or no room for its request body.
    Refused,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Normal,
        CloseReason::RequestTimeout,
        CloseReason::IdleTimeout,
        CloseReason::BadRequest,
        CloseReason::ProtocolError,
        CloseReason::SlowClient,
        CloseReason::PongTimeout,
        CloseReason::IoError,
        CloseReason::Shutdown,
        CloseReason::Refused,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::RequestTimeout => "request_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BadRequest => "bad_request",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::SlowClient => "slow_client",
            CloseReason::PongTimeout => "pong_timeout",
            CloseReason::IoError => "io_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Refused => "refused",
        }
    }
}

/// Kinds of connection, by what the connection turned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnKind {
    Http,
    Stream,
    IngestSocket,
}

impl ConnKind {
    pub const ALL: [ConnKind; 3] = [ConnKind::Http, ConnKind::Stream, ConnKind::IngestSocket];
    pub fn as_str(self) -> &'static str {
        match self {
            ConnKind::Http => "http",
            ConnKind::Stream => "stream",
            ConnKind::IngestSocket => "ingest_ws",
        }
    }
}

/// Why an event was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    Invalid,
    TooLarge,
    Unauthorized,
    RateLimited,
    Overloaded,
    Sampled,
    Discarded,
    IssueLimit,
    /// An event id the project took within the dedupe window (an SDK's retry).
    Duplicate,
}

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::Invalid,
        Rejection::TooLarge,
        Rejection::Unauthorized,
        Rejection::RateLimited,
        Rejection::Overloaded,
        Rejection::Sampled,
        Rejection::Discarded,
        Rejection::IssueLimit,
        Rejection::Duplicate,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Invalid => "invalid",
            Rejection::TooLarge => "too_large",
            Rejection::Unauthorized => "unauthorized",
            Rejection::RateLimited => "rate_limited",
            Rejection::Overloaded => "overloaded",
            Rejection::Sampled => "sampled",
            Rejection::Discarded => "discarded",
            Rejection::IssueLimit => "issue_limit",
            Rejection::Duplicate => "duplicate",
        }
    }
}

/// Envelope item types counted by name (PROTOCOL 8); every other type is counted as `other`
/// (the last), so clients cannot grow the label set without bound.
pub const SENTRY_ITEM_TYPES: [&str; 16] = [
    "event",
    "transaction",
    "session",
    "sessions",
    "client_report",
    "attachment",
    "user_report",
    "check_in",
    "profile",
    "profile_chunk",
    "replay_event",
    "replay_recording",
    "span",
    "log",
    "statsd",
    "other",
];

/// `Content-Encoding` names of the Sentry request bodies the server decodes.
pub const SENTRY_ENCODINGS: [&str; 5] = ["identity", "gzip", "deflate", "br", "zstd"];

/// Why a Sentry request (`/api/N/envelope/`, `/api/N/store/`) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SentryRejection {
    UnknownProject,
    Unauthorized,
    Forbidden,
    UnsupportedEncoding,
    TooLarge,
    CorruptBody,
    InvalidEnvelope,
    InvalidEvent,
    RateLimited,
    Overloaded,
}

impl SentryRejection {
    pub const ALL: [SentryRejection; 10] = [
        SentryRejection::UnknownProject,
        SentryRejection::Unauthorized,
        SentryRejection::Forbidden,
        SentryRejection::UnsupportedEncoding,
        SentryRejection::TooLarge,
        SentryRejection::CorruptBody,
        SentryRejection::InvalidEnvelope,
        SentryRejection::InvalidEvent,
        SentryRejection::RateLimited,
        SentryRejection::Overloaded,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SentryRejection::UnknownProject => "unknown_project",
            SentryRejection::Unauthorized => "unauthorized",
            SentryRejection::Forbidden => "forbidden",
            SentryRejection::UnsupportedEncoding => "unsupported_encoding",
            SentryRejection::TooLarge => "too_large",
            SentryRejection::CorruptBody => "corrupt_body",
            SentryRejection::InvalidEnvelope => "invalid_envelope",
            SentryRejection::InvalidEvent => "invalid_event",
            SentryRejection::RateLimited => "rate_limited",
            SentryRejection::Overloaded => "overloaded",
        }
    }
}

/// Counters of the Sentry endpoints.
#[derive(Default)]
pub struct SentryMetrics {
    pub envelopes: AtomicU64,
    pub store_requests: AtomicU64,
    items: [AtomicU64; SENTRY_ITEM_TYPES.len()],
    bodies: [AtomicU64; SENTRY_ENCODINGS.len()],
    pub decompressed_bytes: AtomicU64,
    rejections: [AtomicU64; SentryRejection::ALL.len()],
}

impl SentryMetrics {
    /// One envelope item of `item_type` (a name of `SENTRY_ITEM_TYPES`; others count as `other`).
    pub fn item(&self, item_type: &str) {
        let index = SENTRY_ITEM_TYPES
            .iter()
            .position(|known| *known == item_type)
            .unwrap_or(SENTRY_ITEM_TYPES.len() - 1);
        self.items[index].fetch_add(1, Relaxed);
    }

    /// A body decoded from `encoding` (a name of `SENTRY_ENCODINGS`) into `decoded_bytes`;
    /// only compressed bodies add to the decompressed bytes.
    pub fn body(&self, encoding: &str, decoded_bytes: usize) {
        if let Some(index) = SENTRY_ENCODINGS.iter().position(|e| *e == encoding) {
            self.bodies[index].fetch_add(1, Relaxed);
            if index > 0 {
                self.decompressed_bytes
                    .fetch_add(decoded_bytes as u64, Relaxed);
            }
        }
    }

    pub fn rejected(&self, why: SentryRejection) {
        self.rejections[why as usize].fetch_add(1, Relaxed);
    }
}

/// The status codes the server answers with; anything else lands in `other`.
const STATUSES: [u16; 20] = [
    101, 200, 201, 202, 204, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 431, 500, 501,
    503,
];

#[derive(Default)]
pub struct ShardMetrics {
    pub conns_accepted: AtomicU64,
    conns_open: [AtomicU64; 3],
    conns_closed: [AtomicU64; CloseReason::ALL.len()],
    responses: [AtomicU64; STATUSES.len() + 1],
    pub events_accepted: AtomicU64,
    events_rejected: [AtomicU64; Rejection::ALL.len()],
    pub stream_messages_sent: AtomicU64,
    pub stream_messages_dropped: AtomicU64,
    pub stream_slow_disconnects: AtomicU64,
    pub stream_subscriptions: AtomicU64,
    /// Connections answered 503 because `--max-connections` were open.
    pub conns_refused: AtomicU64,
    /// Request bodies answered 503 because `--max-pending-body-bytes` were held.
    pub bodies_refused: AtomicU64,
    pub loop_lag_us: AtomicU64,
    pub loop_lag_max_us: AtomicU64,
    pub mesh_backlog: AtomicU64,
    pub sentry: SentryMetrics,
    /// Stream subscribers closed with 1013: more distinct issues waited than a client may have.
    pub stream_too_slow_closes: AtomicU64,
    /// Resumes that recovered (the client got what it missed) and those that did not.
    pub stream_resumes_recovered: AtomicU64,
    pub stream_resumes_not_recovered: AtomicU64,
    /// Messages sent again by resumes that recovered.
    pub stream_replayed_messages: AtomicU64,
    /// Bytes of frames the histories of this shard's projects hold.
    pub stream_history_bytes: AtomicU64,
}

impl ShardMetrics {
    pub fn opened(&self, kind: ConnKind) {
        self.conns_open[kind as usize].fetch_add(1, Relaxed);
    }
    pub fn changed_kind(&self, from: ConnKind, to: ConnKind) {
        self.conns_open[from as usize].fetch_sub(1, Relaxed);
        self.conns_open[to as usize].fetch_add(1, Relaxed);
    }
    pub fn closed(&self, kind: ConnKind, reason: CloseReason) {
        self.conns_open[kind as usize].fetch_sub(1, Relaxed);
        self.conns_closed[reason as usize].fetch_add(1, Relaxed);
    }
    pub fn responded(&self, status: u16) {
        let index = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.responses[index].fetch_add(1, Relaxed);
    }
    pub fn rejected(&self, why: Rejection, events: u64) {
        self.events_rejected[why as usize].fetch_add(events, Relaxed);
    }
    pub fn open(&self, kind: ConnKind) -> u64 {
        self.conns_open[kind as usize].load(Relaxed)
    }
}

/// All shards' counters, readable from any shard.
#[derive(Clone)]
pub struct Metrics {
    pub shards: Arc<Vec<Arc<ShardMetrics>>>,
    pub cluster: Arc<ClusterMetrics>,
}

/// Counters of a node that runs as one of several (PROTOCOL section 10); shown only then.
#[derive(Default)]
pub struct ClusterMetrics {
    pub enabled: AtomicBool,
    pub nats_connected: AtomicBool,
    /// Requests sent to the owner on another node: answered, and answered 503 for want of one.
    pub forwarded_answered: AtomicU64,
    pub forwarded_unavailable: AtomicU64,
    /// Requests of other nodes this node served as the owner.
    pub served: AtomicU64,
    /// Projects this node took ownership of, and lost with its lock connection.
    pub ownership_taken: AtomicU64,
    pub ownership_lost: AtomicU64,
    /// Stream messages published for other nodes' mirrors of projects this node owns.
    pub published_messages: AtomicU64,
    /// Stream frames received from owners on other nodes, and gaps found in them.
    pub mirrored_messages: AtomicU64,
    pub mirror_gaps: AtomicU64,
    pub nats_in_bytes: AtomicU64,
    pub nats_out_bytes: AtomicU64,
}

impl Metrics {
    pub fn new(shard_count: usize) -> Metrics {
        let shards = (0..shard_count)
            .map(|_| Arc::new(ShardMetrics::default()))
            .collect();
        Metrics {
            shards: Arc::new(shards),
            cluster: Arc::default(),
        }
    }

    fn sum(&self, read: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|m| read(m).load(Relaxed)).sum()
    }

    /// One counter of each shard, with the shard's index.
    fn per_shard(
        &self,
        read: fn(&ShardMetrics) -> &AtomicU64,
    ) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.shards
            .iter()
            .map(move |m| read(m).load(Relaxed))
            .enumerate()
    }

    /// Prometheus text exposition of every counter, summed over shards (loop lag per shard).
    pub fn render(&self, store: &Store, limits: &Limits) -> String {
        self.render_values(limits, store.stats(), store.healthy())
    }

    /// The exposition for the given storage counters and health: each family's name and help,
    /// then its samples.
    fn render_values(&self, limits: &Limits, stats: StoreStats, storage_up: bool) -> String {
        let mut text = Exposition {
            out: String::with_capacity(4096),
            name: "",
        };
        let (connections, body_bytes) = (&limits.connections, &limits.pending_body_bytes);
        text.gauge(
            "mesher_connections_limit",
            "Open connections allowed (--max-connections).",
        )
        .value(connections.limit() as u64);
        text.gauge(
            "mesher_http_pending_body_bytes",
            "Bytes held by request bodies still arriving.",
        )
        .value(body_bytes.used() as u64);
        text.gauge(
            "mesher_http_pending_body_bytes_limit",
            "Bytes request bodies still arriving may hold (--max-pending-body-bytes).",
        )
        .value(body_bytes.limit() as u64);
        text.counter(
            "mesher_connections_accepted_total",
            "TCP connections accepted, per shard.",
        )
        .labelled("shard", self.per_shard(|m| &m.conns_accepted));
        text.gauge("mesher_connections_open", "Open connections by kind.")
            .labelled(
                "kind",
                ConnKind::ALL.map(|k| (k.as_str(), self.sum(|m| &m.conns_open[k as usize]))),
            );
        text.counter(
            "mesher_connections_closed_total",
            "Closed connections by reason.",
        )
        .labelled(
            "reason",
            CloseReason::ALL.map(|r| (r.as_str(), self.sum(|m| &m.conns_closed[r as usize]))),
        );
        let responses = |index: usize| self.sum(|m| &m.responses[index]);
        text.counter("mesher_http_responses_total", "HTTP responses by status.")
            .labelled(
                "status",
                STATUSES
                    .iter()
                    .enumerate()
                    .map(|(i, status)| (status, responses(i))),
            )
            .labelled("status", [("other", responses(STATUSES.len()))]);
        text.counter(
            "mesher_events_accepted_total",
            "Events accepted (202 accepted).",
        )
        .value(self.sum(|m| &m.events_accepted));
        text.counter(
            "mesher_events_rejected_total",
            "Events not stored, by reason.",
        )
        .labelled(
            "reason",
            Rejection::ALL.map(|r| (r.as_str(), self.sum(|m| &m.events_rejected[r as usize]))),
        );
        text.counter(
            "mesher_connections_refused_total",
            "Connections answered 503 because --max-connections were open.",
        )
        .value(self.sum(|m| &m.conns_refused));
        text.counter(
            "mesher_http_bodies_refused_total",
            "Request bodies answered 503 because --max-pending-body-bytes were held.",
        )
        .value(self.sum(|m| &m.bodies_refused));
        text.counter(
            "mesher_stream_messages_sent_total",
            "Stream messages written to subscribers.",
        )
        .value(self.sum(|m| &m.stream_messages_sent));
        text.counter(
            "mesher_stream_messages_dropped_total",
            "Stream messages dropped for slow subscribers.",
        )
        .value(self.sum(|m| &m.stream_messages_dropped));
        text.counter(
            "mesher_stream_slow_disconnects_total",
            "Stream subscribers disconnected for taking nothing.",
        )
        .value(self.sum(|m| &m.stream_slow_disconnects));
        text.gauge(
            "mesher_stream_subscriptions",
            "Stream subscriptions held in shard memory.",
        )
        .value(self.sum(|m| &m.stream_subscriptions));
        text.counter(
            "mesher_stream_too_slow_closes_total",
            "Stream subscribers closed with 1013 because too many distinct issues waited for them.",
        )
        .value(self.sum(|m| &m.stream_too_slow_closes));
        text.counter(
            "mesher_stream_resumes_total",
            "Stream resumes by outcome: recovered (what was missed was sent) or not.",
        )
        .labelled(
            "outcome",
            [
                ("recovered", self.sum(|m| &m.stream_resumes_recovered)),
                (
                    "not_recovered",
                    self.sum(|m| &m.stream_resumes_not_recovered),
                ),
            ],
        );
        text.counter(
            "mesher_stream_replayed_messages_total",
            "Stream messages sent again by resumes that recovered.",
        )
        .value(self.sum(|m| &m.stream_replayed_messages));
        text.gauge(
            "mesher_stream_history_bytes",
            "Bytes of stream frames kept in project histories for resumes.",
        )
        .value(self.sum(|m| &m.stream_history_bytes));
        text.gauge(
            "mesher_mesh_backlog_messages",
            "Cross-shard messages waiting for room in a full queue.",
        )
        .value(self.sum(|m| &m.mesh_backlog));
        text.gauge(
            "mesher_loop_lag_microseconds",
            "Reactor loop lag at the last tick, per shard.",
        )
        .labelled("shard", self.per_shard(|m| &m.loop_lag_us));
        text.gauge(
            "mesher_loop_lag_max_microseconds",
            "Largest reactor loop lag seen, per shard.",
        )
        .labelled("shard", self.per_shard(|m| &m.loop_lag_max_us));
        text.gauge(
            "mesher_storage_queue_events",
            "Events waiting to be written.",
        )
        .value(stats.queue_depth_events);
        text.gauge(
            "mesher_storage_queue_bytes",
            "Bytes of event JSON waiting to be written.",
        )
        .value(stats.queue_depth_bytes);
        text.counter(
            "mesher_storage_batches_total",
            "Storage transactions committed.",
        )
        .value(stats.batches_committed);
        text.counter("mesher_storage_rows_total", "Rows committed.")
            .value(stats.rows_committed);
        text.counter(
            "mesher_storage_commit_failures_total",
            "Failed storage commits (retried).",
        )
        .value(stats.commit_failures);
        text.counter(
            "mesher_storage_flush_latency_microseconds_sum",
            "Time spent in commits.",
        )
        .value(stats.flush_latency_us_sum);
        text.counter(
            "mesher_storage_flush_latency_microseconds_count",
            "Commits timed.",
        )
        .value(stats.flush_latency_us_count);
        text.counter(
            "mesher_storage_batch_rows_sum",
            "Rows over all batches (divide by batches for the mean size).",
        )
        .value(stats.batch_rows_sum);
        text.gauge("mesher_storage_up", "1 while storage commits succeed.")
            .value(storage_up as u64);
        self.render_sentry(&mut text);
        if self.cluster.enabled.load(Relaxed) {
            self.render_cluster(&mut text);
        }
        text.out
    }

    fn render_cluster(&self, text: &mut Exposition) {
        let cluster = &self.cluster;
        text.gauge("mesher_nats_up", "1 while the NATS connection is up.")
            .value(cluster.nats_connected.load(Relaxed) as u64);
        text.counter(
            "mesher_cluster_forwarded_requests_total",
            "Requests sent to the project's owner on another node, by outcome.",
        )
        .labelled(
            "outcome",
            [
                ("answered", cluster.forwarded_answered.load(Relaxed)),
                ("unavailable", cluster.forwarded_unavailable.load(Relaxed)),
            ],
        );
        text.counter(
            "mesher_cluster_served_requests_total",
            "Requests of other nodes served by this node as the project's owner.",
        )
        .value(cluster.served.load(Relaxed));
        text.counter(
            "mesher_cluster_ownership_changes_total",
            "Projects this node took ownership of, and lost with its lock connection.",
        )
        .labelled(
            "change",
            [
                ("taken", cluster.ownership_taken.load(Relaxed)),
                ("lost", cluster.ownership_lost.load(Relaxed)),
            ],
        );
        text.counter(
            "mesher_cluster_published_messages_total",
            "Stream messages published for other nodes' mirrors (only while one watches).",
        )
        .value(cluster.published_messages.load(Relaxed));
        text.counter(
            "mesher_cluster_mirrored_messages_total",
            "Stream messages received from owners on other nodes.",
        )
        .value(cluster.mirrored_messages.load(Relaxed));
        text.counter(
            "mesher_cluster_mirror_gaps_total",
            "Gaps in a mirrored stream (messages NATS lost); its subscribers were told to resume.",
        )
        .value(cluster.mirror_gaps.load(Relaxed));
        text.counter(
            "mesher_nats_received_bytes_total",
            "Bytes received from NATS.",
        )
        .value(cluster.nats_in_bytes.load(Relaxed));
        text.counter("mesher_nats_sent_bytes_total", "Bytes sent to NATS.")
            .value(cluster.nats_out_bytes.load(Relaxed));
    }

    fn render_sentry(&self, text: &mut Exposition) {
        text.counter(
            "mesher_sentry_envelopes_total",
            "Sentry envelopes read (POST /api/N/envelope/).",
        )
        .value(self.sum(|m| &m.sentry.envelopes));
        text.counter(
            "mesher_sentry_store_requests_total",
            "Sentry store bodies read (POST /api/N/store/).",
        )
        .value(self.sum(|m| &m.sentry.store_requests));
        text.counter(
            "mesher_sentry_items_total",
            "Sentry envelope items by type; only event items are stored.",
        )
        .labelled(
            "type",
            SENTRY_ITEM_TYPES
                .iter()
                .enumerate()
                .map(|(i, name)| (name, self.sum(|m| &m.sentry.items[i]))),
        );
        text.counter(
            "mesher_sentry_bodies_total",
            "Sentry request bodies decoded, by Content-Encoding.",
        )
        .labelled(
            "encoding",
            SENTRY_ENCODINGS
                .iter()
                .enumerate()
                .map(|(i, name)| (name, self.sum(|m| &m.sentry.bodies[i]))),
        );
        text.counter(
            "mesher_sentry_decompressed_bytes_total",
            "Bytes of compressed Sentry bodies after decompression.",
        )
        .value(self.sum(|m| &m.sentry.decompressed_bytes));
        text.counter(
            "mesher_sentry_rejections_total",
            "Sentry requests refused, by reason.",
        )
        .labelled(
            "reason",
            SentryRejection::ALL
                .map(|r| (r.as_str(), self.sum(|m| &m.sentry.rejections[r as usize]))),
        );
    }
}

/// Prometheus text written a family at a time: `counter` or `gauge` writes the family's HELP
/// and TYPE lines, and the samples written after it carry its name.
struct Exposition {
    out: String,
    name: &'static str,
}

impl Exposition {
    fn counter(&mut self, name: &'static str, help: &str) -> &mut Self {
        self.family(name, "counter", help)
    }

    fn gauge(&mut self, name: &'static str, help: &str) -> &mut Self {
        self.family(name, "gauge", help)
    }

    fn family(&mut self, name: &'static str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self.name = name;
        self
    }

    /// The family's only sample, without labels.
    fn value(&mut self, value: u64) {
        let _ = writeln!(self.out, "{} {value}", self.name);
    }

    /// A sample for each value of one label (values chosen by this code: nothing to escape).
    fn labelled(
        &mut self,
        label: &str,
        samples: impl IntoIterator<Item = (impl Display, u64)>,
    ) -> &mut Self {
        for (label_value, value) in samples {
            let _ = writeln!(
                self.out,
                "{}{{{label}=\"{label_value}\"}} {value}",
                self.name
            );
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::limits::Budget;

    #[test]
    fn envelope_items_count_by_known_type_and_the_rest_as_other() {
        let sentry = SentryMetrics::default();
        for item_type in ["event", "client_report", "log", "hologram", "other", ""] {
            sentry.item(item_type);
        }
        let count = |name: &str| {
            let at = SENTRY_ITEM_TYPES.iter().position(|t| *t == name).unwrap();
            sentry.items[at].load(Relaxed)
        };
        assert_eq!(
            (count("event"), count("client_report"), count("log")),
            (1, 1, 1)
        );
        assert_eq!(
            count("other"),
            3,
            "unknown types, `other` itself and the empty type"
        );
    }

    /// Every counter of every shard set to its own value, so that a sample read from the wrong
    /// counter or shard shows in the text.
    fn numbered(shard_count: usize) -> Metrics {
        let metrics = Metrics::new(shard_count);
        let mut next = 0u64;
        let mut set = |counter: &AtomicU64| {
            next += 1;
            counter.store(next, Relaxed);
        };
        for m in metrics.shards.iter() {
            set(&m.conns_accepted);
            m.conns_open.iter().for_each(&mut set);
            m.conns_closed.iter().for_each(&mut set);
            m.responses.iter().for_each(&mut set);
            set(&m.events_accepted);
            m.events_rejected.iter().for_each(&mut set);
            set(&m.stream_messages_sent);
            set(&m.stream_messages_dropped);
            set(&m.stream_slow_disconnects);
            set(&m.stream_subscriptions);
            set(&m.conns_refused);
            set(&m.bodies_refused);
            set(&m.loop_lag_us);
            set(&m.loop_lag_max_us);
            set(&m.mesh_backlog);
            set(&m.sentry.envelopes);
            set(&m.sentry.store_requests);
            m.sentry.items.iter().for_each(&mut set);
            m.sentry.bodies.iter().for_each(&mut set);
            set(&m.sentry.decompressed_bytes);
            m.sentry.rejections.iter().for_each(&mut set);
        }
        // Counters added later are numbered after all the others, so those keep their values.
        for m in metrics.shards.iter() {
            set(&m.stream_too_slow_closes);
            set(&m.stream_resumes_recovered);
            set(&m.stream_resumes_not_recovered);
            set(&m.stream_replayed_messages);
            set(&m.stream_history_bytes);
        }
        metrics
    }

    #[test]
    fn exposition_text_is_unchanged() {
        let limits = Limits {
            connections: Budget::new(1000),
            pending_body_bytes: Budget::new(1 << 20),
        };
        assert!(limits.pending_body_bytes.try_take(4321));
        let stats = StoreStats {
            queue_depth_events: 901,
            queue_depth_bytes: 902,
            batches_committed: 903,
            rows_committed: 904,
            events_committed: 905,
            rows_rejected: 906,
            commit_failures: 907,
            flush_latency_us_sum: 908,
            flush_latency_us_count: 909,
            batch_rows_sum: 910,
        };
        let text = numbered(3).render_values(&limits, stats, true);
        // Written once by the hand-laid renderer this module had before it was table-driven,
        // and extended by each family or label value added since.
        assert_eq!(text, include_str!("../tests/fixtures/metrics.txt"));
    }
}
