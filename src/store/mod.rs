//! Storage: the rows the server keeps, the `Backend` trait with its SQLite and PostgreSQL
//! implementations, and `Store`, the handle to the batch writer thread.
//!
//! # Layout
//! - `mod.rs`: row types, `Change`, `StoreError`, the `Backend` trait, the openers.
//! - `writer.rs`: `Store`, a cloneable non-blocking handle for the reactors, and the writer
//!   thread that groups submitted changes into one transaction per batch, retries failed
//!   commits with backoff and fires the acks after the commit that holds them.
//! - `sqlite.rs`: the embedded default (one file in the data directory).
//! - `postgres.rs`: PostgreSQL, events COPYed into day partitions.
//!
//! Backends run only on the writer thread (and on the starting thread before it, and on a
//! short-lived thread of a node reading the directory again after NATS came back), never on a
//! reactor: every method blocks.

mod postgres;
mod sqlite;
mod writer;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use uuid::Uuid;

use crate::now_us;

pub use writer::{
    Ack, Overloaded, ProjectRows, Store, StoreStats, WriterConfig, BATCH_EVENTS_DEFAULT,
    FLUSH_INTERVAL_MS_DEFAULT, QUEUE_BYTES_DEFAULT, QUEUE_EVENTS_DEFAULT,
};

/// Retention a new project gets, in days.
pub const RETENTION_DAYS_DEFAULT: u32 = 90;

const MICROS_PER_DAY: i64 = 86_400_000_000;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProjectRow {
    pub id: Uuid,
    /// PROTOCOL 8: a positive integer the database assigned at creation
    /// (`Backend::next_project_number`), never reused; Sentry DSNs name the project by it.
    pub number: i64,
    pub name: String,
    pub slug: String,
    pub created_at_us: i64,
    /// 0 = unlimited.
    pub rate_limit_per_minute: u32,
    /// Share of events kept, 0..=1.
    pub sample_rate: f64,
    /// Events older than this are deleted by `Backend::maintain`; 0 = kept forever.
    pub retention_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    Ingest,
    Dashboard,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Dashboard => "dashboard",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "ingest" => Some(Scope::Ingest),
            "dashboard" => Some(Scope::Dashboard),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyRow {
    pub id: Uuid,
    pub project_id: Uuid,
    pub scope: Scope,
    pub label: Option<String>,
    /// Lowercase hex SHA-256 of the plain key; the plain key is never stored.
    pub key_hash: String,
    pub revoked: bool,
    pub created_at_us: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IssueRow {
    pub id: Uuid,
    pub project_id: Uuid,
    /// The hash of the grouping key (`ingest::fingerprint::hash`); the key itself is not kept.
    pub fingerprint: crate::ingest::fingerprint::FingerprintHash,
    pub title: String,
    pub level: String,
    pub status: String,
    pub event_count: u64,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub id: Uuid,
    pub project_id: Uuid,
    pub issue_id: Uuid,
    /// Borrowed from the level names when the row is written, owned when it is read back.
    pub level: Cow<'static, str>,
    pub received_at_us: i64,
    /// The event JSON as the client sent it.
    pub payload: Payload,
}

/// An event's JSON text as stored: its own string, or, while the event is streamed, the bytes of
/// its stream frame that embed it verbatim. Then the text is held once, in the frame that the
/// subscribers' rings, the project's history and the store queue share.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(bytes::Bytes);

impl Payload {
    /// `shared` (bytes of a stream frame) when they hold `text` exactly, else a copy of `text`.
    pub fn shared_or_copied(shared: bytes::Bytes, text: &str) -> Payload {
        if *shared == *text.as_bytes() {
            Payload(shared)
        } else {
            debug_assert!(false, "the frame does not embed the event");
            Payload::from(text.to_owned())
        }
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor takes the bytes of a `str` (or bytes equal to one).
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl From<String> for Payload {
    fn from(text: String) -> Payload {
        Payload(bytes::Bytes::from(text))
    }
}

impl std::ops::Deref for Payload {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Everything the server keeps in memory, read once at start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub projects: Vec<ProjectRow>,
    pub keys: Vec<KeyRow>,
    pub issues: Vec<IssueRow>,
    /// Events of the dedupe window (`RECENT_EVENT_IDS_TTL_US`), so an SDK's retry after a restart is
    /// known as one.
    pub recent_events: Vec<RecentEvent>,
}

/// How long a project remembers the id of an event it took (PROTOCOL 8): SDKs send an event
/// again when they are not sure it arrived, and the copy must not count twice. The store
/// reads the ids of this window back when it loads projects, so the memory outlives a restart
/// and a takeover by another node.
pub const RECENT_EVENT_IDS_TTL_US: i64 = 5 * 60 * 1_000_000;
/// Most event ids one project remembers (and the store reads back): about 40 bytes each, so
/// at most ~700 KiB for a project that sends ids, nothing for one that does not (but for the
/// window read at a start, which expires). Past it the oldest id is forgotten first, so at
/// more than ~55 events per second the window is shorter than five minutes; retries come
/// within seconds.
pub const RECENT_EVENT_IDS_MAX: usize = 16_384;
/// Most rows SQLite looks at for every project's (the newest by insertion order), so a
/// start after a burst stays quick.
const RECENT_EVENTS_SCAN_MAX: usize = 262_144;

/// Where the dedupe window starts now: events received after it are read back.
fn recent_since_us() -> i64 {
    now_us() - RECENT_EVENT_IDS_TTL_US
}

/// An event received within the dedupe window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecentEvent {
    pub project_id: Uuid,
    pub id: Uuid,
    pub received_at_us: i64,
}

/// One row to write. Project, Key and Issue carry the full row and upsert it by id; Event is
/// inserted.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Project(ProjectRow),
    Key(KeyRow),
    Issue(IssueRow),
    Event(EventRow),
}

impl Change {
    pub fn is_event(&self) -> bool {
        matches!(self, Change::Event(_))
    }
}

/// What went wrong, as far as the caller must act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// A unique constraint refused a row (duplicate slug, key hash or issue fingerprint).
    Conflict,
    /// The database refused the rows themselves; the same rows fail the same way again.
    Rejected,
    /// The database is unreachable or failed for a reason that may pass: retry.
    Unavailable,
    /// The writer thread has stopped; nothing more is accepted.
    Closed,
}

/// A storage failure with its context: which backend, which operation, and the cause.
#[derive(Debug, Clone)]
pub struct StoreError {
    backend: &'static str,
    operation: &'static str,
    kind: StoreErrorKind,
    cause: String,
}

impl StoreError {
    pub fn new(
        backend: &'static str,
        operation: &'static str,
        kind: StoreErrorKind,
        cause: impl fmt::Display,
    ) -> StoreError {
        StoreError {
            backend,
            operation,
            kind,
            cause: cause.to_string(),
        }
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn operation(&self) -> &'static str {
        self.operation
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    pub fn cause(&self) -> &str {
        &self.cause
    }

    /// A unique constraint refused a row: a duplicate slug answers 409.
    pub fn is_conflict(&self) -> bool {
        self.kind == StoreErrorKind::Conflict
    }

    /// Retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} store: {} failed: {}",
            self.backend, self.operation, self.cause
        )
    }
}

impl std::error::Error for StoreError {}

/// A storage engine. Every method blocks; only the writer thread (and `Store::start` before it)
/// calls them.
pub trait Backend: Send + 'static {
    /// "sqlite" or "postgres".
    fn name(&self) -> &'static str;
    /// Applies the versioned migrations not yet recorded in `schema_migrations`; idempotent.
    fn migrate(&mut self) -> Result<(), StoreError>;
    fn load(&mut self) -> Result<Snapshot, StoreError>;
    /// Projects and keys only, as `load` reads them (a node catching up on directory changes
    /// it may have missed).
    fn directory(&mut self) -> Result<Snapshot, StoreError> {
        let mut snapshot = self.load()?;
        snapshot.issues.clear();
        snapshot.recent_events.clear();
        Ok(snapshot)
    }
    /// One project's issues, as `load` reads them.
    fn project_issues(&mut self, project_id: Uuid) -> Result<Vec<IssueRow>, StoreError> {
        let mut issues = self.load()?.issues;
        issues.retain(|issue| issue.project_id == project_id);
        Ok(issues)
    }
    /// Writes the whole batch in one transaction: all of it or nothing. Upserts of the same id
    /// within the batch keep the last row.
    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError>;
    /// Events received after `since_us`, oldest first: of one project or of every one, at most
    /// `RECENT_EVENT_IDS_MAX` (the newest) per project.
    fn recent_events(
        &mut self,
        project_id: Option<Uuid>,
        since_us: i64,
    ) -> Result<Vec<RecentEvent>, StoreError>;
    /// Whether any project has an issue with this id.
    fn has_issue(&mut self, issue_id: Uuid) -> Result<bool, StoreError>;
    /// The newest `limit` events of an issue, newest first.
    fn latest_events(&mut self, issue_id: Uuid, limit: usize) -> Result<Vec<EventRow>, StoreError>;
    fn count_events(&mut self, project_id: Option<Uuid>) -> Result<u64, StoreError>;
    /// A project number never handed out before (nor after), taken from the database's own
    /// sequence: unique across every server sharing the database, gaps allowed.
    fn next_project_number(&mut self) -> Result<i64, StoreError>;
    /// Housekeeping: day partitions ahead (PostgreSQL) and per-project retention.
    fn maintain(&mut self, now_us: i64) -> Result<(), StoreError>;
    fn ping(&mut self) -> Result<(), StoreError>;
    /// A fresh connection after a failure (PostgreSQL); a no-op for SQLite.
    fn reconnect(&mut self) -> Result<(), StoreError>;
}

/// The embedded default: `data_dir/mesher.sqlite3` (the directory is created if missing).
pub fn open_sqlite(data_dir: &Path) -> Result<Box<dyn Backend>, StoreError> {
    Ok(Box::new(sqlite::SqliteBackend::open(data_dir)?))
}

/// PostgreSQL at `url` (`postgres://user@host:port/db?options=-csearch_path%3Dschema`).
pub fn open_postgres(url: &str) -> Result<Box<dyn Backend>, StoreError> {
    Ok(Box::new(postgres::PostgresBackend::open(url)?))
}

/// One schema version: applied in its own transaction and recorded in `schema_migrations`
/// (PostgreSQL applies all pending versions in one).
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// The rows of one batch grouped by table, upserts deduplicated by id: the last row wins (each
/// is a full snapshot) at the place of the first, so a batch never touches a row twice.
struct BatchRows<'a> {
    projects: Vec<&'a ProjectRow>,
    keys: Vec<&'a KeyRow>,
    issues: Vec<&'a IssueRow>,
    events: Vec<&'a EventRow>,
}

impl<'a> BatchRows<'a> {
    fn group(batch: &'a [Change]) -> BatchRows<'a> {
        let mut rows = BatchRows {
            projects: Vec::new(),
            keys: Vec::new(),
            issues: Vec::new(),
            events: Vec::with_capacity(batch.len()),
        };
        let mut project_at = HashMap::new();
        let mut key_at = HashMap::new();
        let mut issue_at = HashMap::new();
        for change in batch {
            match change {
                Change::Project(row) => keep_last(&mut rows.projects, &mut project_at, row.id, row),
                Change::Key(row) => keep_last(&mut rows.keys, &mut key_at, row.id, row),
                Change::Issue(row) => keep_last(&mut rows.issues, &mut issue_at, row.id, row),
                Change::Event(row) => rows.events.push(row),
            }
        }
        debug_assert_eq!(rows.issues.len(), issue_at.len());
        rows
    }
}

fn keep_last<'a, T>(
    rows: &mut Vec<&'a T>,
    index_of: &mut HashMap<Uuid, usize>,
    id: Uuid,
    row: &'a T,
) {
    match index_of.get(&id) {
        Some(&index) => rows[index] = row,
        None => {
            index_of.insert(id, rows.len());
            rows.push(row);
        }
    }
}

/// Events received before this instant are past the retention; None keeps them forever.
fn retention_cutoff_us(now_us: i64, retention_days: u32) -> Option<i64> {
    if retention_days == 0 {
        return None;
    }
    Some(now_us.saturating_sub(i64::from(retention_days).saturating_mul(MICROS_PER_DAY)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(id: Uuid, title: &str) -> IssueRow {
        IssueRow {
            id,
            project_id: Uuid::nil(),
            fingerprint: crate::ingest::fingerprint::hash(title),
            title: title.to_string(),
            level: "error".to_string(),
            status: "unresolved".to_string(),
            event_count: 1,
            first_seen_us: 0,
            last_seen_us: 0,
        }
    }

    #[test]
    fn scope_round_trips_and_rejects_unknown() {
        for scope in [Scope::Ingest, Scope::Dashboard] {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("admin"), None);
        assert_eq!(Scope::parse("Ingest"), None);
    }

    #[test]
    fn batch_rows_keep_the_last_upsert_at_the_first_place() {
        let first = Uuid::from_u128(1);
        let second = Uuid::from_u128(2);
        let batch = vec![
            Change::Issue(issue(first, "a1")),
            Change::Issue(issue(second, "b1")),
            Change::Issue(issue(first, "a2")),
            Change::Issue(issue(first, "a3")),
        ];
        let rows = BatchRows::group(&batch);
        let titles: Vec<&str> = rows.issues.iter().map(|row| row.title.as_str()).collect();
        assert_eq!(titles, ["a3", "b1"]);
        assert!(rows.projects.is_empty() && rows.keys.is_empty() && rows.events.is_empty());
    }

    #[test]
    fn retention_zero_keeps_forever() {
        assert_eq!(retention_cutoff_us(10 * MICROS_PER_DAY, 0), None);
        assert_eq!(
            retention_cutoff_us(10 * MICROS_PER_DAY, 3),
            Some(7 * MICROS_PER_DAY)
        );
        assert_eq!(retention_cutoff_us(i64::MIN + 1, u32::MAX), Some(i64::MIN));
    }

    #[test]
    fn error_display_names_backend_operation_and_cause() {
        let error = StoreError::new(
            "sqlite",
            "commit",
            StoreErrorKind::Conflict,
            "UNIQUE failed",
        );
        assert_eq!(
            error.to_string(),
            "sqlite store: commit failed: UNIQUE failed"
        );
        assert!(error.is_conflict());
        assert!(!error.is_retryable());
    }
}
