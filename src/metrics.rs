//! Counters kept per shard and summed when `/metrics` is read.
//!
//! Each shard writes only its own `ShardMetrics` (relaxed atomics on a cache line nobody else
//! writes), so counting costs no contention; any shard may read all of them for a scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
}

impl Rejection {
    pub const ALL: [Rejection; 8] = [
        Rejection::Invalid,
        Rejection::TooLarge,
        Rejection::Unauthorized,
        Rejection::RateLimited,
        Rejection::Overloaded,
        Rejection::Sampled,
        Rejection::Discarded,
        Rejection::IssueLimit,
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
        }
    }
}

/// The status codes the server answers with; anything else lands in `other`.
const STATUSES: [u16; 18] = [
    101, 200, 201, 202, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429, 431, 500, 501, 503,
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
}

impl Metrics {
    pub fn new(shard_count: usize) -> Metrics {
        let shards = (0..shard_count)
            .map(|_| Arc::new(ShardMetrics::default()))
            .collect();
        Metrics {
            shards: Arc::new(shards),
        }
    }

    fn sum(&self, read: impl Fn(&ShardMetrics) -> u64) -> u64 {
        self.shards.iter().map(|m| read(m)).sum()
    }

    /// Prometheus text exposition of every counter, summed over shards (loop lag per shard).
    pub fn render(&self, store: &Store, limits: &Limits) -> String {
        self.render_values(limits, store.stats(), store.healthy())
    }

    /// The exposition text for the given storage counters and health.
    fn render_values(&self, limits: &Limits, stats: StoreStats, storage_up: bool) -> String {
        let mut out = String::with_capacity(4096);
        let gauges = [
            (
                "mesher_connections_limit",
                "Open connections allowed (--max-connections).",
                limits.connections.limit(),
            ),
            (
                "mesher_http_pending_body_bytes",
                "Bytes held by request bodies still arriving.",
                limits.pending_body_bytes.used(),
            ),
            (
                "mesher_http_pending_body_bytes_limit",
                "Bytes request bodies still arriving may hold (--max-pending-body-bytes).",
                limits.pending_body_bytes.limit(),
            ),
        ];
        for (name, help, value) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "mesher_connections_accepted_total",
            "counter",
            "TCP connections accepted, per shard.",
        );
        for (shard, m) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "mesher_connections_accepted_total{{shard=\"{shard}\"}} {}",
                m.conns_accepted.load(Relaxed)
            );
        }
        header(
            &mut out,
            "mesher_connections_open",
            "gauge",
            "Open connections by kind.",
        );
        for kind in ConnKind::ALL {
            let _ = writeln!(
                out,
                "mesher_connections_open{{kind=\"{}\"}} {}",
                kind.as_str(),
                self.sum(|m| m.open(kind))
            );
        }
        header(
            &mut out,
            "mesher_connections_closed_total",
            "counter",
            "Closed connections by reason.",
        );
        for reason in CloseReason::ALL {
            let _ = writeln!(
                out,
                "mesher_connections_closed_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.sum(|m| m.conns_closed[reason as usize].load(Relaxed))
            );
        }
        header(
            &mut out,
            "mesher_http_responses_total",
            "counter",
            "HTTP responses by status.",
        );
        for (index, status) in STATUSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "mesher_http_responses_total{{status=\"{status}\"}} {}",
                self.sum(|m| m.responses[index].load(Relaxed))
            );
        }
        let _ = writeln!(
            out,
            "mesher_http_responses_total{{status=\"other\"}} {}",
            self.sum(|m| m.responses[STATUSES.len()].load(Relaxed))
        );
        header(
            &mut out,
            "mesher_events_accepted_total",
            "counter",
            "Events accepted (202 accepted).",
        );
        let _ = writeln!(
            out,
            "mesher_events_accepted_total {}",
            self.sum(|m| m.events_accepted.load(Relaxed))
        );
        header(
            &mut out,
            "mesher_events_rejected_total",
            "counter",
            "Events not stored, by reason.",
        );
        for why in Rejection::ALL {
            let _ = writeln!(
                out,
                "mesher_events_rejected_total{{reason=\"{}\"}} {}",
                why.as_str(),
                self.sum(|m| m.events_rejected[why as usize].load(Relaxed))
            );
        }
        type Read = fn(&ShardMetrics) -> u64;
        let counters: [(&str, &str, Read); 7] = [
            (
                "mesher_connections_refused_total",
                "Connections answered 503 because --max-connections were open.",
                |m| m.conns_refused.load(Relaxed),
            ),
            (
                "mesher_http_bodies_refused_total",
                "Request bodies answered 503 because --max-pending-body-bytes were held.",
                |m| m.bodies_refused.load(Relaxed),
            ),
            (
                "mesher_stream_messages_sent_total",
                "Stream messages written to subscribers.",
                |m| m.stream_messages_sent.load(Relaxed),
            ),
            (
                "mesher_stream_messages_dropped_total",
                "Stream messages dropped for slow subscribers.",
                |m| m.stream_messages_dropped.load(Relaxed),
            ),
            (
                "mesher_stream_slow_disconnects_total",
                "Stream subscribers disconnected for taking nothing.",
                |m| m.stream_slow_disconnects.load(Relaxed),
            ),
            (
                "mesher_stream_subscriptions",
                "Stream subscriptions held in shard memory.",
                |m| m.stream_subscriptions.load(Relaxed),
            ),
            (
                "mesher_mesh_backlog_messages",
                "Cross-shard messages waiting for room in a full queue.",
                |m| m.mesh_backlog.load(Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {}", self.sum(read));
        }
        header(
            &mut out,
            "mesher_loop_lag_microseconds",
            "gauge",
            "Reactor loop lag at the last tick, per shard.",
        );
        for (shard, m) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "mesher_loop_lag_microseconds{{shard=\"{shard}\"}} {}",
                m.loop_lag_us.load(Relaxed)
            );
        }
        header(
            &mut out,
            "mesher_loop_lag_max_microseconds",
            "gauge",
            "Largest reactor loop lag seen, per shard.",
        );
        for (shard, m) in self.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "mesher_loop_lag_max_microseconds{{shard=\"{shard}\"}} {}",
                m.loop_lag_max_us.load(Relaxed)
            );
        }
        let store_values: [(&str, &str, &str, u64); 8] = [
            (
                "mesher_storage_queue_events",
                "gauge",
                "Events waiting to be written.",
                stats.queue_depth_events,
            ),
            (
                "mesher_storage_queue_bytes",
                "gauge",
                "Bytes of event JSON waiting to be written.",
                stats.queue_depth_bytes,
            ),
            (
                "mesher_storage_batches_total",
                "counter",
                "Storage transactions committed.",
                stats.batches_committed,
            ),
            (
                "mesher_storage_rows_total",
                "counter",
                "Rows committed.",
                stats.rows_committed,
            ),
            (
                "mesher_storage_commit_failures_total",
                "counter",
                "Failed storage commits (retried).",
                stats.commit_failures,
            ),
            (
                "mesher_storage_flush_latency_microseconds_sum",
                "counter",
                "Time spent in commits.",
                stats.flush_latency_us_sum,
            ),
            (
                "mesher_storage_flush_latency_microseconds_count",
                "counter",
                "Commits timed.",
                stats.flush_latency_us_count,
            ),
            (
                "mesher_storage_batch_rows_sum",
                "counter",
                "Rows over all batches (divide by batches for the mean size).",
                stats.batch_rows_sum,
            ),
        ];
        for (name, kind, help, value) in store_values {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "mesher_storage_up",
            "gauge",
            "1 while storage commits succeed.",
        );
        let _ = writeln!(out, "mesher_storage_up {}", storage_up as u8);
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::limits::Budget;

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
        // Written once by the hand-laid renderer this module had before it was table-driven.
        assert_eq!(text, include_str!("../tests/fixtures/metrics.txt"));
    }
}
