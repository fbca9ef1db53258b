//! Mesher: the ingest and live-stream core of an error-monitoring product.
//!
//! # Layout
//!
//! - `server`: start-up (storage, listeners, shard threads) and signal-driven shutdown.
//! - `shard`: one io_uring reactor per core; `mesh` carries messages between shards, `owner`
//!   holds the issue state of the projects a shard owns, `wheel` drives every timeout.
//! - `conn`: the per-shard slab of connections (`registry`) and each socket's `ring` of frames.
//! - `http`: request parsing, routing, responses and the HTTP connection loop.
//! - `ws`: WebSocket frame codec and the session (reader and writer) after an upgrade.
//! - `api`: the handlers for management, ingest, issues and stream upgrades.
//! - `ingest`: event decoding, validation and fingerprinting.
//! - `issues`: grouping and the issue lifecycle of one project.
//! - `stream`: stream messages, filters and local fan-out.
//! - `store`: the storage trait, its SQLite and PostgreSQL backends and the batch writer.
//! - `auth`: keys and each shard's directory of projects and keys.
//! - `metrics`: per-shard counters summed for `/metrics`.

pub mod api;
pub mod auth;
pub mod config;
pub mod conn;
pub mod http;
pub mod ingest;
pub mod issues;
pub mod metrics;
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
