//! Command line and environment configuration of `mesher serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "mesher",
    version,
    about = "Mesher: ingest and live-stream server for error events",
    long_about = "Mesher receives error events from SDKs, groups them into issues, stores them \
                  (SQLite by default, PostgreSQL with --database-url) and streams every event and \
                  issue change to the dashboards watching a project over WebSocket."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(Config),
}

/// When a 202 is sent for an accepted event.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckMode {
    /// After the event is grouped, streamed and queued for storage (written within the flush interval).
    Received,
    /// After the storage commit that holds the event.
    Durable,
}

/// `--stream-buffer` is the capacity of a connection's ring, so it has the ring's bound.
pub const STREAM_BUFFER_MAX: u32 = crate::conn::ring::CAPACITY_MAX as u32;
/// The drain tick runs on the shard's timer wheel, so it can be no finer than the wheel's tick
/// (`shard::TICK_MS`, which is checked to equal it).
pub const DRAIN_INTERVAL_MS_MIN: u64 = 10;
pub const DRAIN_INTERVAL_MS_MAX: u64 = 10_000;
/// Bounds of the timeouts given in seconds (stall, ping, pong, request).
pub const TIMEOUT_S_MIN: u64 = 1;
pub const TIMEOUT_S_MAX: u64 = 3_600;
/// An idle keep-alive connection may be kept up to a day.
pub const KEEPALIVE_TIMEOUT_S_MAX: u64 = 86_400;
pub const FLUSH_INTERVAL_MS_MIN: u64 = 1;
pub const FLUSH_INTERVAL_MS_MAX: u64 = 60_000;

const MS_PER_S: u64 = 1_000;

/// Timeouts are given in seconds on the command line and held in milliseconds, the unit of
/// the timer wheel: this is the one place they are converted.
fn s_to_ms(seconds: u64) -> u64 {
    seconds * MS_PER_S
}

/// Most messages `--stream-history` may keep per project.
pub const STREAM_HISTORY_MAX: usize = 1_000_000;
/// `--stream-history` default: a few minutes of a busy project's stream.
pub const STREAM_HISTORY_DEFAULT: usize = 1_000;
/// `--stream-history-bytes` default: 4 MiB per project.
pub const STREAM_HISTORY_BYTES_DEFAULT: usize = 4 * 1024 * 1024;
/// A history older than a day helps no dashboard: it reloads over the API.
pub const STREAM_HISTORY_TTL_S_MAX: u64 = 86_400;

/// 256 MiB: room for ~250 one-MiB events or ~50 full bulk requests arriving at once, a small
/// share of a server's memory.
pub const PENDING_BODY_BYTES_DEFAULT: usize = 256 * 1024 * 1024;

#[derive(Parser, Debug, Clone)]
pub struct Config {
    /// Address to serve HTTP and WebSocket on; repeat for more than one.
    #[arg(
        long = "listen",
        env = "MESHER_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:8080"
    )]
    pub listen: Vec<SocketAddr>,

    /// PostgreSQL URL (postgres://user@host:port/db). Without it the embedded SQLite store is used.
    #[arg(long, env = "MESHER_DATABASE_URL")]
    pub database_url: Option<String>,

    /// NATS server joining this node to others that share its PostgreSQL (PROTOCOL section
    /// 10). Needs `--database-url`.
    #[arg(long, env = "MESHER_NATS_URL")]
    pub nats_url: Option<String>,

    /// This node's name among the others (default: host name and port).
    #[arg(long, env = "MESHER_NODE_ID")]
    pub node_id: Option<String>,

    /// Directory of the embedded SQLite store and of the generated admin token.
    #[arg(long, env = "MESHER_DATA_DIR", default_value = "./mesher-data")]
    pub data_dir: PathBuf,

    /// Reactor threads, one io_uring event loop each (default: number of cores).
    #[arg(long, env = "MESHER_SHARDS")]
    pub shards: Option<usize>,

    /// Token for the management API; generated and stored in the data directory when absent.
    #[arg(long, env = "MESHER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// When ingest answers 202: `received` (queued) or `durable` (after the commit).
    #[arg(long, env = "MESHER_ACK", value_enum, default_value = "received")]
    pub ack: AckMode,

    /// Messages that may wait per stream connection before the oldest event is dropped.
    #[arg(long, env = "MESHER_STREAM_BUFFER", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=i64::from(STREAM_BUFFER_MAX)))]
    pub stream_buffer: u32,

    /// Period of the drain tick that writes waiting stream messages, in milliseconds (rounded
    /// up to a multiple of the 10 ms timer tick).
    #[arg(long, env = "MESHER_DRAIN_INTERVAL_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(DRAIN_INTERVAL_MS_MIN..=DRAIN_INTERVAL_MS_MAX))]
    pub drain_interval_ms: u64,

    /// Stream messages each project keeps for clients that resume after a reconnect (0: none).
    #[arg(long, env = "MESHER_STREAM_HISTORY", default_value_t = STREAM_HISTORY_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=STREAM_HISTORY_MAX as u64))]
    pub stream_history: usize,

    /// Seconds a stream message is kept for resumes.
    #[arg(long = "stream-history-ttl", env = "MESHER_STREAM_HISTORY_TTL", value_name = "STREAM_HISTORY_TTL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(TIMEOUT_S_MIN..=STREAM_HISTORY_TTL_S_MAX).map(s_to_ms))]
    // Held in milliseconds (`s_to_ms`).
    pub stream_history_ttl_ms: u64,

    /// Bytes of stream frames each project keeps for resumes.
    #[arg(long, env = "MESHER_STREAM_HISTORY_BYTES", default_value_t = STREAM_HISTORY_BYTES_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new())]
    pub stream_history_bytes: usize,

    /// Seconds a stream client may take nothing while messages wait before it is disconnected.
    #[arg(long = "stall-timeout", env = "MESHER_STALL_TIMEOUT", value_name = "STALL_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(TIMEOUT_S_MIN..=TIMEOUT_S_MAX).map(s_to_ms))]
    // Held in milliseconds (`s_to_ms`).
    pub stall_timeout_ms: u64,

    /// Seconds between server pings on WebSocket connections.
    #[arg(long = "ping-interval", env = "MESHER_PING_INTERVAL", value_name = "PING_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(TIMEOUT_S_MIN..=TIMEOUT_S_MAX).map(s_to_ms))]
    // Held in milliseconds (`s_to_ms`).
    pub ping_interval_ms: u64,

    /// Seconds a WebSocket client has to answer a ping before it is closed.
    #[arg(long = "pong-timeout", env = "MESHER_PONG_TIMEOUT", value_name = "PONG_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(TIMEOUT_S_MIN..=TIMEOUT_S_MAX).map(s_to_ms))]
    // Held in milliseconds (`s_to_ms`).
    pub pong_timeout_ms: u64,

    /// Seconds a started HTTP request may take to arrive completely before 408.
    #[arg(long = "request-timeout", env = "MESHER_REQUEST_TIMEOUT", value_name = "REQUEST_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(TIMEOUT_S_MIN..=TIMEOUT_S_MAX).map(s_to_ms))]
    // Held in milliseconds (`s_to_ms`).
    pub request_timeout_ms: u64,

    /// Seconds an idle keep-alive connection is kept open.
    #[arg(long = "keepalive-timeout", env = "MESHER_KEEPALIVE_TIMEOUT", value_name = "KEEPALIVE_TIMEOUT", default_value_t = 75, value_parser = clap::value_parser!(u64).range(TIMEOUT_S_MIN..=KEEPALIVE_TIMEOUT_S_MAX).map(s_to_ms))]
    // Held in milliseconds (`s_to_ms`).
    pub keepalive_timeout_ms: u64,

    /// Storage flush interval in milliseconds: accepted events are written at least this often.
    #[arg(long, env = "MESHER_FLUSH_INTERVAL_MS", default_value_t = crate::store::FLUSH_INTERVAL_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(FLUSH_INTERVAL_MS_MIN..=FLUSH_INTERVAL_MS_MAX))]
    pub flush_interval_ms: u64,

    /// Events per storage transaction at most.
    #[arg(long, env = "MESHER_BATCH_EVENTS", default_value_t = crate::store::BATCH_EVENTS_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_events: usize,

    /// Open connections at most, of every kind; one more is answered 503 and closed
    /// (default: the open-file limit less a reserve for storage and listeners).
    #[arg(long, env = "MESHER_MAX_CONNECTIONS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: Option<usize>,

    /// Bytes that request bodies still arriving may hold together; a body that would pass it
    /// is answered 503 and its connection closed.
    #[arg(long, env = "MESHER_MAX_PENDING_BODY_BYTES", default_value_t = PENDING_BODY_BYTES_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_pending_body_bytes: usize,

    /// Issues a project may have: each is held in memory. An event that would open one more is
    /// refused with 422; events of existing issues are still accepted.
    #[arg(long, env = "MESHER_MAX_ISSUES_PER_PROJECT", default_value_t = crate::issues::MAX_ISSUES_PER_PROJECT_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_issues_per_project: usize,

    /// Events that may wait for storage before ingest answers 503.
    #[arg(long, env = "MESHER_QUEUE_EVENTS", default_value_t = crate::store::QUEUE_EVENTS_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub queue_events: usize,

    /// Bytes of event JSON that may wait for storage before ingest answers 503.
    #[arg(long, env = "MESHER_QUEUE_BYTES", default_value_t = crate::store::QUEUE_BYTES_DEFAULT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub queue_bytes: usize,
}

impl Config {
    pub fn shard_count(&self) -> usize {
        self.shards.filter(|n| *n > 0).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Config {
        let argv = ["mesher", "serve"].iter().chain(args);
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Serve(config) => config,
        }
    }

    #[test]
    fn timeouts_given_in_seconds_are_held_in_milliseconds() {
        let defaults = serve(&[]);
        assert_eq!(defaults.stall_timeout_ms, 30_000);
        assert_eq!(defaults.ping_interval_ms, 30_000);
        assert_eq!(defaults.pong_timeout_ms, 10_000);
        assert_eq!(defaults.request_timeout_ms, 10_000);
        assert_eq!(defaults.keepalive_timeout_ms, 75_000);
        assert_eq!(defaults.stream_history_ttl_ms, 300_000);
        assert_eq!(defaults.stream_history, 1_000);
        assert_eq!(defaults.stream_history_bytes, 4 * 1024 * 1024);
        let set = serve(&["--stall-timeout", "2", "--keepalive-timeout", "86400"]);
        assert_eq!(set.stall_timeout_ms, 2_000);
        assert_eq!(set.keepalive_timeout_ms, 86_400_000);
    }
}
