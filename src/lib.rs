//! Mesher: the ingest and live-stream core of an error-monitoring product.
//!
//! # Layout
//!
//! Modules call only downward in this list (no module uses one above it):
//!
//! - `server`: start-up (storage, listeners, shard threads) and signal-driven shutdown; it hands
//!   the runtime the connection loop to run.
//! - `serve`: the connection loops: an HTTP/1.1 connection, and a WebSocket session after an
//!   upgrade (reader and writer over the connection's ring).
//! - `api`: the handlers and the route table: management, ingest (Mesher and Sentry endpoints),
//!   issues, stream upgrades.
//! - `owner`: the owner interface: what a handler asks of a project's owner (ingest, change a
//!   status, list, watch, create), as typed requests and replies, run on the owner shard
//!   directly or through its queue; and the owner side, the only writer of a project's issues,
//!   rate limit, stream offsets and history.
//! - `stream`: stream messages, filters, each shard's subscriber registry, fan-out into
//!   subscribers' rings, and each project's offsets and history of sent frames that
//!   reconnecting clients resume from.
//! - `issues`: grouping and the issue lifecycle of one project.
//! - `ingest`: event decoding (Mesher JSON, Sentry), validation and fingerprinting.
//! - `cluster`: several nodes as one (PROTOCOL section 10): the NATS bridge thread that carries
//!   requests to other nodes' owners, stream frames and directory changes, and the PostgreSQL
//!   lock thread that makes each project's owner exclusive. What arrives is handed to the layers
//!   above through hooks (`Inbound`); the owner interface (`owner::remote`, `owner::mirror`)
//!   uses it for projects owned elsewhere.
//! - `shard`: the runtime: one io_uring reactor per core with its connections, `mesh` queues
//!   between shards (carrying `Run` tasks of the layers above), the timer `wheel` behind every
//!   timeout, the store turn. It runs what it is handed at start (`Hooks`) and never names the
//!   layers above.
//! - `store`: the storage trait, its SQLite and PostgreSQL backends and the batch writer.
//! - `config`, `auth` (keys and each shard's directory), `metrics` (per-shard counters summed
//!   for `/metrics`), `conn` (the slab of connections, each socket's `ring` of frames, shared
//!   bounds), `http` and `ws` (the protocols as bytes: nothing about the product).

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod http;
pub mod ingest;
pub mod issues;
pub mod metrics;
pub mod owner;
pub mod page;
pub mod serve;
pub mod server;
pub mod shard;
pub mod store;
pub mod stream;
pub mod ws;

pub use server::io_uring_error;

/// Wall-clock time in microseconds since the Unix epoch, the unit of every stored timestamp.
pub fn now_us() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

/// A hash map keyed by values the server made or already trusts (ids, known keys): a fast
/// seeded hash. Maps whose keys come from what clients send keep the standard SipHash.
pub type IdMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set form of [`IdMap`].
pub type IdSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
