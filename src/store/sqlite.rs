//! The embedded default backend: one SQLite file in WAL mode. Ids are 16-byte blobs, times are
//! integer microseconds since the Unix epoch.

use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_void, CString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::time::Duration;

use rusqlite::{ffi, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::{
    recent_since_us, retention_cutoff_us, Backend, BatchRows, Change, EventRow, IssueRow, KeyRow,
    Migration, ProjectRow, RecentEvent, Scope, Snapshot, StoreError, StoreErrorKind,
    RECENT_EVENTS_SCAN_MAX,
};

const BACKEND: &str = "sqlite";
const FILE_NAME: &str = "mesher.sqlite3";
/// How long a statement waits for another connection's lock (an operator's sqlite3 shell)
/// before failing; the writer then retries the whole batch.
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// Events per multi-row INSERT: 6 parameters each stays far below SQLite's 32766-variable
/// limit, and larger statements gain nothing measurable.
const EVENT_ROWS_PER_INSERT: usize = 100;
/// Bytes per database page, the largest SQLite allows.
const PAGE_SIZE: i64 = 65_536;
/// WAL pages after which a commit checkpoints them into the database file (SQLite's own
/// default: 64 MiB of WAL at this page size).
const CHECKPOINT_PAGES: c_int = 1000;
/// SQLite's own page cache, in KiB: room for the B-tree pages inserts keep coming back to
/// (interior pages, the index, issues), since the kernel's copy of the file is let go.
const CACHE_KIB: i64 = 32 * 1024;
/// Cached prepared statements: the few fixed ones below plus headroom for reads.
const STATEMENT_CACHE_CAPACITY: usize = 32;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: "
CREATE TABLE projects (
    id BLOB PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    created_at_us INTEGER NOT NULL,
    rate_limit_per_minute INTEGER NOT NULL CHECK (rate_limit_per_minute >= 0),
    sample_rate REAL NOT NULL CHECK (sample_rate >= 0 AND sample_rate <= 1),
    retention_days INTEGER NOT NULL CHECK (retention_days >= 0)
) STRICT;
CREATE TABLE api_keys (
    id BLOB PRIMARY KEY NOT NULL,
    project_id BLOB NOT NULL REFERENCES projects (id),
    scope TEXT NOT NULL CHECK (scope IN ('ingest', 'dashboard')),
    label TEXT,
    key_hash TEXT NOT NULL UNIQUE,
    revoked INTEGER NOT NULL CHECK (revoked IN (0, 1)),
    created_at_us INTEGER NOT NULL
) STRICT;
CREATE INDEX api_keys_project_id ON api_keys (project_id);
CREATE TABLE issues (
    id BLOB PRIMARY KEY NOT NULL,
    project_id BLOB NOT NULL REFERENCES projects (id),
    fingerprint TEXT NOT NULL,
    title TEXT NOT NULL,
    level TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('unresolved', 'resolved', 'archived', 'discarded')),
    event_count INTEGER NOT NULL CHECK (event_count >= 0),
    first_seen_us INTEGER NOT NULL,
    last_seen_us INTEGER NOT NULL,
    UNIQUE (project_id, fingerprint)
) STRICT;
-- No key and no foreign keys on events: every index and check costs each insert, the writer
-- only inserts fresh ids. One index serves reads by issue and, through the project's issues,
-- retention by project and time.
CREATE TABLE events (
    id BLOB NOT NULL,
    project_id BLOB NOT NULL,
    issue_id BLOB NOT NULL,
    level TEXT NOT NULL,
    received_at_us INTEGER NOT NULL,
    payload TEXT NOT NULL
) STRICT;
CREATE INDEX events_issue_id_received_at ON events (issue_id, received_at_us DESC);
",
    },
    Migration {
        version: 2,
        name: "ascending events index",
        // A new event of an issue now lands at the end of the issue's range. In the descending
        // index it landed at the start, where the B-tree kept rebalancing the same pages: a
        // third of the writer's work. Reads scan the index backwards, newest first.
        sql: "
DROP INDEX events_issue_id_received_at;
CREATE INDEX events_issue_received_at_id ON events (issue_id, received_at_us, id);
",
    },
    Migration {
        version: FINGERPRINT_HASH_VERSION,
        name: "issues keyed by fingerprint hash",
        // `add_fingerprint_hashes` has filled `fingerprint_hash` of every row before this runs.
        // The table is rebuilt: SQLite cannot drop the unique constraint on the key itself.
        sql: "
CREATE TABLE issues_by_hash (
    id BLOB PRIMARY KEY NOT NULL,
    project_id BLOB NOT NULL REFERENCES projects (id),
    fingerprint_hash BLOB NOT NULL CHECK (length(fingerprint_hash) = 16),
    title TEXT NOT NULL,
    level TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('unresolved', 'resolved', 'archived', 'discarded')),
    event_count INTEGER NOT NULL CHECK (event_count >= 0),
    first_seen_us INTEGER NOT NULL,
    last_seen_us INTEGER NOT NULL,
    UNIQUE (project_id, fingerprint_hash)
) STRICT;
INSERT INTO issues_by_hash (id, project_id, fingerprint_hash, title, level, status, event_count,
    first_seen_us, last_seen_us)
SELECT id, project_id, fingerprint_hash, title, level, status, event_count, first_seen_us,
    last_seen_us
FROM issues;
DROP TABLE issues;
ALTER TABLE issues_by_hash RENAME TO issues;
",
    },
    Migration {
        version: 4,
        name: "project numbers",
        // Projects from before get numbers in creation order. `project_numbers` is the
        // sequence: AUTOINCREMENT never hands out a number again, even once its row is gone,
        // and it starts after the numbers given here.
        sql: "
ALTER TABLE projects ADD COLUMN number INTEGER CHECK (number > 0);
UPDATE projects SET number = (
    SELECT count(*) FROM projects AS earlier
    WHERE earlier.created_at_us < projects.created_at_us
        OR (earlier.created_at_us = projects.created_at_us AND earlier.id <= projects.id)
);
CREATE UNIQUE INDEX projects_number ON projects (number);
CREATE TABLE project_numbers (number INTEGER PRIMARY KEY AUTOINCREMENT) STRICT;
INSERT INTO project_numbers (number) SELECT max(number) FROM projects HAVING count(*) > 0;
",
    },
];

/// The version that replaces an issue's grouping key by its hash (`ingest::fingerprint::hash`).
const FINGERPRINT_HASH_VERSION: i64 = 3;

/// First step of the fingerprint hash migration, which SQL alone cannot do (SQLite has no
/// SHA-256): every stored key gets its hash, so old issues keep grouping the events of new ones.
fn add_fingerprint_hashes(transaction: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    transaction.execute_batch("ALTER TABLE issues ADD COLUMN fingerprint_hash BLOB")?;
    let mut select = transaction.prepare("SELECT id, fingerprint FROM issues")?;
    let mut update =
        transaction.prepare("UPDATE issues SET fingerprint_hash = ?2 WHERE id = ?1")?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let id: Vec<u8> = row.get(0)?;
        let key: String = row.get(1)?;
        update.execute(rusqlite::params![
            id,
            crate::ingest::fingerprint::hash(&key)
        ])?;
    }
    Ok(())
}

/// A project's number is fixed when it is created; an update leaves it be.
const UPSERT_PROJECT: &str = "
INSERT INTO projects (id, name, slug, created_at_us, rate_limit_per_minute, sample_rate,
    retention_days, number)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, slug = excluded.slug,
    created_at_us = excluded.created_at_us,
    rate_limit_per_minute = excluded.rate_limit_per_minute,
    sample_rate = excluded.sample_rate, retention_days = excluded.retention_days";

const UPSERT_KEY: &str = "
INSERT INTO api_keys (id, project_id, scope, label, key_hash, revoked, created_at_us)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
ON CONFLICT (id) DO UPDATE SET project_id = excluded.project_id, scope = excluded.scope,
    label = excluded.label, key_hash = excluded.key_hash, revoked = excluded.revoked,
    created_at_us = excluded.created_at_us";

/// An issue's project and fingerprint are fixed when it is created, so an update leaves them
/// alone: setting them, even to the same values, makes SQLite rewrite both of the issue's index
/// entries and check the project's key, journalling every page that touches (three times the
/// work of the whole update with thousands of live issues).
const UPSERT_ISSUE: &str = "
INSERT INTO issues (id, project_id, fingerprint_hash, title, level, status, event_count,
    first_seen_us, last_seen_us)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT (id) DO UPDATE SET title = excluded.title, level = excluded.level,
    status = excluded.status, event_count = excluded.event_count,
    first_seen_us = excluded.first_seen_us, last_seen_us = excluded.last_seen_us";

const LATEST_EVENTS: &str = "
SELECT id, project_id, issue_id, level, received_at_us, payload
FROM events WHERE issue_id = ?1
ORDER BY received_at_us DESC, id DESC LIMIT ?2";

const EVENT_COLUMNS: usize = 6;

pub(super) struct SqliteBackend {
    /// Prepared at the first commit, once the schema exists. Declared before the connection so
    /// that the statements are finalized first.
    event_inserts: Option<EventInserts>,
    connection: Connection,
    path: PathBuf,
    /// The database file, for telling the kernel which of its pages we no longer need.
    /// Declared after the connection, whose checkpoint hook uses its descriptor.
    _database_file: File,
}

impl SqliteBackend {
    pub(super) fn open(data_dir: &Path) -> Result<SqliteBackend, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| {
            let cause = format!("{}: {error}", data_dir.display());
            StoreError::new(
                BACKEND,
                "create data directory",
                StoreErrorKind::Unavailable,
                cause,
            )
        })?;
        let path = data_dir.join(FILE_NAME);
        let connection = Connection::open(&path).map_err(|error| {
            let cause = format!("{}: {error}", path.display());
            StoreError::new(BACKEND, "open", classify(&error), cause)
        })?;
        let configure = || -> rusqlite::Result<()> {
            connection.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
            // Events are ~1 KiB rows: large pages mean far fewer B-tree splits, WAL frames and
            // checkpoint copies per row (a third of the writer's CPU at the default 4 KiB).
            // Takes effect only on a new file, before WAL mode fixes the page size.
            connection.pragma_update(None, "page_size", PAGE_SIZE)?;
            let mode: String =
                connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode");
            }
            // NORMAL in WAL mode: a commit survives a crash of the process; only a power loss
            // can take the last commits back.
            connection.pragma_update(None, "synchronous", "NORMAL")?;
            connection.pragma_update(None, "foreign_keys", "ON")?;
            connection.pragma_update(None, "cache_size", -CACHE_KIB)?;
            connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
            Ok(())
        };
        configure().map_err(|error| sqlite_error("configure connection", error))?;
        let database_file = File::open(&path).map_err(|error| {
            let cause = format!("{}: {error}", path.display());
            StoreError::new(BACKEND, "open", StoreErrorKind::Unavailable, cause)
        })?;
        // SAFETY: the hook's context is the descriptor of `database_file`, which the backend
        // closes only after the connection (field order); the hook runs on the connection's
        // own thread, inside its commits.
        unsafe {
            let fd = database_file.as_raw_fd() as isize as *mut c_void;
            ffi::sqlite3_wal_hook(connection.handle(), Some(checkpoint_and_release), fd);
        }
        Ok(SqliteBackend {
            event_inserts: None,
            connection,
            path,
            _database_file: database_file,
        })
    }

    fn applied_versions(&self) -> rusqlite::Result<Vec<i64>> {
        let mut statement = self
            .connection
            .prepare("SELECT version FROM schema_migrations ORDER BY version")?;
        let versions = statement.query_map([], |row| row.get(0))?;
        versions.collect()
    }
}

/// Runs after every commit in place of SQLite's automatic checkpoint, with the same threshold
/// and mode, and then lets go of the kernel's cached copy of the database file.
///
/// Events are written once and seldom read, and the file only grows: every page a checkpoint
/// writes would otherwise take a fresh page of memory, and the file would crowd everything
/// else out of the page cache. The checkpoint has synced the file (synchronous = NORMAL), so
/// its pages are clean and dropping them is cheap; the kernel reuses that memory for the next
/// checkpoint's pages. What inserts read again stays in SQLite's own cache (`CACHE_KIB`).
unsafe extern "C" fn checkpoint_and_release(
    fd: *mut c_void,
    db: *mut ffi::sqlite3,
    database: *const c_char,
    wal_pages: c_int,
) -> c_int {
    if wal_pages >= CHECKPOINT_PAGES {
        // PASSIVE, as the automatic checkpoint: it never waits for a reader, and whatever it
        // could not copy now the next one will. Its errors are the next commit's to report.
        // SAFETY: SQLite calls the hook with its open connection and the database's name.
        let code = unsafe {
            ffi::sqlite3_wal_checkpoint_v2(
                db,
                database,
                ffi::SQLITE_CHECKPOINT_PASSIVE,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        if code == ffi::SQLITE_OK {
            // SAFETY: plain system call on the backend's open descriptor (see `open`).
            unsafe { libc::posix_fadvise(fd as isize as c_int, 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    ffi::SQLITE_OK
}

/// `OR FAIL`: a failing row leaves the rows before it in place, so SQLite keeps no statement
/// journal for each multi-row INSERT. Any failure rolls the whole batch back anyway.
fn insert_events_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR FAIL INTO events (id, project_id, issue_id, level, received_at_us, payload) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..EVENT_COLUMNS {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("?{}", row * EVENT_COLUMNS + column + 1));
        }
        sql.push(')');
    }
    sql
}

impl Backend for SqliteBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let operation = "migrate";
        self.connection
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version INTEGER PRIMARY KEY NOT NULL,
                    name TEXT NOT NULL,
                    applied_at_us INTEGER NOT NULL
                ) STRICT",
            )
            .map_err(|error| sqlite_error(operation, error))?;
        let applied = self
            .applied_versions()
            .map_err(|error| sqlite_error(operation, error))?;
        let known_max = MIGRATIONS.last().map_or(0, |migration| migration.version);
        if let Some(&newest) = applied.last() {
            if newest > known_max {
                let cause = format!(
                    "{}: schema version {newest} is newer than this server knows ({known_max})",
                    self.path.display()
                );
                return Err(StoreError::new(
                    BACKEND,
                    operation,
                    StoreErrorKind::Rejected,
                    cause,
                ));
            }
        }
        for migration in MIGRATIONS {
            if applied.contains(&migration.version) {
                continue;
            }
            let transaction = self
                .connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|error| sqlite_error(operation, error))?;
            // Another process may have applied it while this one waited for the lock.
            let already: Option<i64> = transaction
                .query_row(
                    "SELECT version FROM schema_migrations WHERE version = ?1",
                    [migration.version],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|error| sqlite_error(operation, error))?;
            if already.is_none() {
                let prepared = match migration.version {
                    FINGERPRINT_HASH_VERSION => add_fingerprint_hashes(&transaction),
                    _ => Ok(()),
                };
                prepared
                    .and_then(|()| transaction.execute_batch(migration.sql))
                    .and_then(|()| {
                        transaction.execute(
                            "INSERT INTO schema_migrations (version, name, applied_at_us)
                             VALUES (?1, ?2, ?3)",
                            rusqlite::params![migration.version, migration.name, super::now_us()],
                        )
                    })
                    .map_err(|error| sqlite_error(operation, error))?;
            }
            transaction
                .commit()
                .map_err(|error| sqlite_error(operation, error))?;
            tracing::info!(
                path = %self.path.display(),
                version = migration.version,
                name = migration.name,
                "applied schema migration"
            );
        }
        Ok(())
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let load = || -> rusqlite::Result<Snapshot> {
            let connection = &self.connection;
            let projects = all_rows(
                connection,
                "SELECT id, name, slug, created_at_us, rate_limit_per_minute, sample_rate,
                    retention_days, number
                 FROM projects ORDER BY created_at_us, id",
                |row| {
                    Ok(ProjectRow {
                        id: Uuid::from_bytes(row.get(0)?),
                        name: row.get(1)?,
                        slug: row.get(2)?,
                        created_at_us: row.get(3)?,
                        rate_limit_per_minute: row.get(4)?,
                        sample_rate: row.get(5)?,
                        retention_days: row.get(6)?,
                        number: row.get(7)?,
                    })
                },
            )?;
            let keys = all_rows(
                connection,
                "SELECT id, project_id, scope, label, key_hash, revoked, created_at_us
                 FROM api_keys ORDER BY created_at_us, id",
                |row| {
                    let scope_text: String = row.get(2)?;
                    let scope = Scope::parse(&scope_text).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            format!("unknown key scope {scope_text:?}").into(),
                        )
                    })?;
                    Ok(KeyRow {
                        id: Uuid::from_bytes(row.get(0)?),
                        project_id: Uuid::from_bytes(row.get(1)?),
                        scope,
                        label: row.get(3)?,
                        key_hash: row.get(4)?,
                        revoked: row.get(5)?,
                        created_at_us: row.get(6)?,
                    })
                },
            )?;
            let issues = all_rows(
                connection,
                "SELECT id, project_id, fingerprint_hash, title, level, status, event_count,
                    first_seen_us, last_seen_us
                 FROM issues ORDER BY first_seen_us, id",
                |row| {
                    Ok(IssueRow {
                        id: Uuid::from_bytes(row.get(0)?),
                        project_id: Uuid::from_bytes(row.get(1)?),
                        fingerprint: row.get(2)?,
                        title: row.get(3)?,
                        level: row.get(4)?,
                        status: row.get(5)?,
                        event_count: row.get(6)?,
                        first_seen_us: row.get(7)?,
                        last_seen_us: row.get(8)?,
                    })
                },
            )?;
            Ok(Snapshot {
                projects,
                keys,
                issues,
                recent_events: Vec::new(),
            })
        };
        let mut snapshot = load().map_err(|error| sqlite_error("load", error))?;
        snapshot.recent_events = self.recent_events(None, recent_since_us())?;
        Ok(snapshot)
    }

    fn recent_events(
        &mut self,
        project_id: Option<Uuid>,
        since_us: i64,
    ) -> Result<Vec<RecentEvent>, StoreError> {
        // Rows are numbered in insertion order: the newest are a range of rowids, read without
        // a scan of the table.
        let scan_max = RECENT_EVENTS_SCAN_MAX as i64;
        let project = project_id.map(|id| id.as_bytes().to_vec());
        let read = || -> rusqlite::Result<Vec<RecentEvent>> {
            self.connection
                .prepare(
                    "SELECT project_id, id, received_at_us FROM events
                     WHERE rowid > (SELECT coalesce(max(rowid), 0) FROM events) - ?1
                       AND received_at_us > ?2 AND (?3 IS NULL OR project_id = ?3)
                     ORDER BY received_at_us, rowid",
                )?
                .query_map(rusqlite::params![scan_max, since_us, project], |row| {
                    Ok(RecentEvent {
                        project_id: Uuid::from_bytes(row.get(0)?),
                        id: Uuid::from_bytes(row.get(1)?),
                        received_at_us: row.get(2)?,
                    })
                })?
                .collect()
        };
        read().map_err(|error| sqlite_error("recent events", error))
    }

    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError> {
        let rows = BatchRows::group(batch);
        if self.event_inserts.is_none() {
            self.event_inserts = Some(EventInserts {
                many: EventInsert::prepare(&self.connection, EVENT_ROWS_PER_INSERT)?,
                one: EventInsert::prepare(&self.connection, 1)?,
            });
        }
        let inserts = self.event_inserts.as_mut().expect("prepared above");
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|error| sqlite_error("begin", error))?;
        upsert_all(
            &transaction,
            UPSERT_PROJECT,
            "upsert projects",
            &rows.projects,
            |upsert, project| {
                upsert.execute(rusqlite::params![
                    project.id.as_bytes(),
                    project.name,
                    project.slug,
                    project.created_at_us,
                    project.rate_limit_per_minute,
                    project.sample_rate,
                    project.retention_days,
                    project.number,
                ])
            },
        )?;
        upsert_all(
            &transaction,
            UPSERT_KEY,
            "upsert api keys",
            &rows.keys,
            |upsert, key| {
                upsert.execute(rusqlite::params![
                    key.id.as_bytes(),
                    key.project_id.as_bytes(),
                    key.scope.as_str(),
                    key.label,
                    key.key_hash,
                    key.revoked,
                    key.created_at_us,
                ])
            },
        )?;
        upsert_all(
            &transaction,
            UPSERT_ISSUE,
            "upsert issues",
            &rows.issues,
            |upsert, issue| {
                let event_count = i64::try_from(issue.event_count).unwrap_or(i64::MAX);
                upsert.execute(rusqlite::params![
                    issue.id.as_bytes(),
                    issue.project_id.as_bytes(),
                    issue.fingerprint,
                    issue.title,
                    issue.level,
                    issue.status,
                    event_count,
                    issue.first_seen_us,
                    issue.last_seen_us,
                ])
            },
        )?;
        let mut chunks = rows.events.chunks_exact(EVENT_ROWS_PER_INSERT);
        for chunk in chunks.by_ref() {
            inserts
                .many
                .execute(chunk)
                .map_err(|error| sqlite_error("insert events", error))?;
        }
        for event in chunks.remainder() {
            inserts
                .one
                .execute(std::slice::from_ref(event))
                .map_err(|error| sqlite_error("insert events", error))?;
        }
        transaction
            .commit()
            .map_err(|error| sqlite_error("commit", error))
    }

    fn latest_events(&mut self, issue_id: Uuid, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        let read = || -> rusqlite::Result<Vec<EventRow>> {
            let mut statement = self.connection.prepare_cached(LATEST_EVENTS)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows =
                statement.query_map(rusqlite::params![issue_id.as_bytes(), limit], |row| {
                    Ok(EventRow {
                        id: Uuid::from_bytes(row.get(0)?),
                        project_id: Uuid::from_bytes(row.get(1)?),
                        issue_id: Uuid::from_bytes(row.get(2)?),
                        level: Cow::Owned(row.get(3)?),
                        received_at_us: row.get(4)?,
                        payload: row.get::<_, String>(5)?.into(),
                    })
                })?;
            rows.collect()
        };
        read().map_err(|error| sqlite_error("latest events", error))
    }

    fn has_issue(&mut self, issue_id: Uuid) -> Result<bool, StoreError> {
        self.connection
            .query_row(
                "SELECT 1 FROM issues WHERE id = ?1",
                [issue_id.as_bytes()],
                |_| Ok(()),
            )
            .optional()
            .map(|row| row.is_some())
            .map_err(|error| sqlite_error("has issue", error))
    }

    fn count_events(&mut self, project_id: Option<Uuid>) -> Result<u64, StoreError> {
        let count: rusqlite::Result<i64> = match project_id {
            Some(project_id) => self.connection.query_row(
                "SELECT count(*) FROM events WHERE issue_id IN (SELECT id FROM issues WHERE project_id = ?1)",
                [project_id.as_bytes()],
                |row| row.get(0),
            ),
            None => self
                .connection
                .query_row("SELECT count(*) FROM events", [], |row| row.get(0)),
        };
        let count = count.map_err(|error| sqlite_error("count events", error))?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    fn next_project_number(&mut self) -> Result<i64, StoreError> {
        let operation = "next project number";
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|error| sqlite_error(operation, error))?;
        // Only the newest row is kept: AUTOINCREMENT remembers the largest number given in
        // `sqlite_sequence`, so the table stays one row long and nothing is handed out twice.
        let number = transaction
            .query_row(
                "INSERT INTO project_numbers DEFAULT VALUES RETURNING number",
                [],
                |row| row.get::<_, i64>(0),
            )
            .and_then(|number| {
                transaction.execute("DELETE FROM project_numbers WHERE number < ?1", [number])?;
                Ok(number)
            })
            .map_err(|error| sqlite_error(operation, error))?;
        transaction
            .commit()
            .map_err(|error| sqlite_error(operation, error))?;
        Ok(number)
    }

    fn maintain(&mut self, now_us: i64) -> Result<(), StoreError> {
        let operation = "retention";
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|error| sqlite_error(operation, error))?;
        let retention: Vec<([u8; 16], u32)> = {
            let mut statement = transaction
                .prepare("SELECT id, retention_days FROM projects")
                .map_err(|error| sqlite_error(operation, error))?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(|error| sqlite_error(operation, error))?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(|error| sqlite_error(operation, error))?
        };
        let mut deleted = 0;
        for (project_id, retention_days) in retention {
            let Some(cutoff_us) = retention_cutoff_us(now_us, retention_days) else {
                continue;
            };
            deleted += transaction
                .execute(
                    "DELETE FROM events WHERE issue_id IN (SELECT id FROM issues WHERE project_id = ?1) AND received_at_us < ?2",
                    rusqlite::params![project_id, cutoff_us],
                )
                .map_err(|error| sqlite_error(operation, error))?;
        }
        transaction
            .commit()
            .map_err(|error| sqlite_error(operation, error))?;
        if deleted > 0 {
            tracing::info!(deleted, "deleted events past their project's retention");
        }
        Ok(())
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        self.connection
            .query_row("SELECT 1", [], |row| row.get::<_, i64>(0))
            .map(drop)
            .map_err(|error| sqlite_error("ping", error))
    }

    fn reconnect(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

struct EventInserts {
    /// `INSERT INTO events ... VALUES (..), (..)` with `EVENT_ROWS_PER_INSERT` rows.
    many: EventInsert,
    /// The same for one row, for the remainder of a batch.
    one: EventInsert,
}

/// A prepared multi-row event INSERT whose parameters point at the batch's own bytes
/// (`SQLITE_STATIC`). Bound the usual way, SQLite copies every id, level and payload into an
/// allocation of its own first, which was the largest part of the writer's work.
struct EventInsert {
    db: *mut ffi::sqlite3,
    statement: NonNull<ffi::sqlite3_stmt>,
    rows: usize,
}

// SAFETY: the statement belongs to the backend's connection and moves between threads with it,
// never used by two threads at once, as rusqlite's `Connection` (which is `Send`) is.
unsafe impl Send for EventInsert {}

impl EventInsert {
    fn prepare(connection: &Connection, rows: usize) -> Result<EventInsert, StoreError> {
        let sql = CString::new(insert_events_sql(rows)).expect("the SQL has no NUL");
        // SAFETY: the handle is only used while the backend, which owns both the connection
        // and this statement, lives; the statement is finalized first (field order).
        let db = unsafe { connection.handle() };
        let mut statement = std::ptr::null_mut();
        // SAFETY: `sql` is NUL-terminated and `statement` is a valid out pointer.
        let code = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut statement,
                std::ptr::null_mut(),
            )
        };
        check(db, code).map_err(|error| sqlite_error("prepare event insert", error))?;
        let statement = NonNull::new(statement).expect("a prepared statement is not null");
        Ok(EventInsert {
            db,
            statement,
            rows,
        })
    }

    /// Inserts exactly `self.rows` events.
    fn execute(&mut self, events: &[&EventRow]) -> rusqlite::Result<()> {
        assert_eq!(
            events.len(),
            self.rows,
            "an event insert takes a fixed row count"
        );
        let statement = self.statement.as_ptr();
        for (row, event) in events.iter().enumerate() {
            let first = c_int::try_from(row * EVENT_COLUMNS + 1).expect("few parameters");
            // SAFETY: every parameter is bound again before each step, so SQLite reads these
            // bytes only in the step below, while `events` is borrowed; no bound value is read
            // after it (no tracing, the statement is reset, not re-run).
            let codes = unsafe {
                [
                    bind_bytes(statement, first, event.id.as_bytes()),
                    bind_bytes(statement, first + 1, event.project_id.as_bytes()),
                    bind_bytes(statement, first + 2, event.issue_id.as_bytes()),
                    bind_text(statement, first + 3, &event.level),
                    ffi::sqlite3_bind_int64(statement, first + 4, event.received_at_us),
                    bind_text(statement, first + 5, &event.payload),
                ]
            };
            for code in codes {
                check(self.db, code)?;
            }
        }
        // SAFETY: the statement is prepared and every parameter bound.
        let stepped = unsafe { ffi::sqlite3_step(statement) };
        // SAFETY: as above; reset returns the step's error code again if it failed.
        let reset = unsafe { ffi::sqlite3_reset(statement) };
        if stepped == ffi::SQLITE_DONE {
            return Ok(());
        }
        check(self.db, reset)?;
        check(self.db, stepped)
    }
}

impl Drop for EventInsert {
    fn drop(&mut self) {
        // SAFETY: prepared by `prepare`, finalized once, before the connection closes.
        unsafe { ffi::sqlite3_finalize(self.statement.as_ptr()) };
    }
}

/// # Safety
/// `statement` is a live prepared statement and `bytes` stay valid until it is next stepped.
unsafe fn bind_bytes(statement: *mut ffi::sqlite3_stmt, index: c_int, bytes: &[u8]) -> c_int {
    let length = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    ffi::sqlite3_bind_blob64(
        statement,
        index,
        bytes.as_ptr().cast(),
        length,
        ffi::SQLITE_STATIC(),
    )
}

/// # Safety
/// As for [`bind_bytes`].
unsafe fn bind_text(statement: *mut ffi::sqlite3_stmt, index: c_int, text: &str) -> c_int {
    let length = u64::try_from(text.len()).unwrap_or(u64::MAX);
    ffi::sqlite3_bind_text64(
        statement,
        index,
        text.as_ptr().cast(),
        length,
        ffi::SQLITE_STATIC(),
        ffi::SQLITE_UTF8 as u8,
    )
}

/// An SQLite result code as a rusqlite error, with the connection's message.
fn check(db: *mut ffi::sqlite3, code: c_int) -> rusqlite::Result<()> {
    if code == ffi::SQLITE_OK || code == ffi::SQLITE_DONE || code == ffi::SQLITE_ROW {
        return Ok(());
    }
    // SAFETY: `db` is the open connection the failing call ran on; the message is copied
    // before any other call on it.
    let message = unsafe {
        let text = ffi::sqlite3_errmsg(db);
        (!text.is_null()).then(|| {
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        })
    };
    Err(rusqlite::Error::SqliteFailure(
        ffi::Error::new(code),
        message,
    ))
}

/// Sorts an SQLite failure by what the writer must do about it.
fn classify(error: &rusqlite::Error) -> StoreErrorKind {
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::ConstraintViolation
                if failure.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
                    || failure.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                StoreErrorKind::Conflict
            }
            ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch => {
                StoreErrorKind::Rejected
            }
            _ => StoreErrorKind::Unavailable,
        },
        rusqlite::Error::ToSqlConversionFailure(_)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(..) => StoreErrorKind::Rejected,
        _ => StoreErrorKind::Unavailable,
    }
}

fn sqlite_error(operation: &'static str, error: rusqlite::Error) -> StoreError {
    StoreError::new(BACKEND, operation, classify(&error), error)
}

/// Runs the cached statement `sql` once for each item, as `execute` binds it; `what` names the
/// step in errors.
fn upsert_all<T>(
    transaction: &rusqlite::Transaction<'_>,
    sql: &str,
    what: &'static str,
    items: &[T],
    mut execute: impl FnMut(&mut rusqlite::CachedStatement<'_>, &T) -> rusqlite::Result<usize>,
) -> Result<(), StoreError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut statement = transaction
        .prepare_cached(sql)
        .map_err(|error| sqlite_error(what, error))?;
    for item in items {
        execute(&mut statement, item).map_err(|error| sqlite_error(what, error))?;
    }
    Ok(())
}

/// Every row `sql` selects, each made by `row`.
fn all_rows<T>(
    connection: &Connection,
    sql: &str,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    connection.prepare(sql)?.query_map([], row)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_insert_numbers_every_parameter_once() {
        assert_eq!(
            insert_events_sql(2),
            "INSERT OR FAIL INTO events (id, project_id, issue_id, level, received_at_us, payload) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6), (?7, ?8, ?9, ?10, ?11, ?12)"
        );
    }

    #[test]
    fn event_insert_reports_sqlite_errors_with_their_message() {
        let connection = Connection::open_in_memory().unwrap();
        let error = EventInsert::prepare(&connection, 1)
            .err()
            .expect("no events table");
        assert!(
            error.to_string().contains("no such table: events"),
            "{error}"
        );

        connection
            .execute_batch(
                "CREATE TABLE events (id BLOB NOT NULL, project_id BLOB NOT NULL,
                    issue_id BLOB NOT NULL, level TEXT NOT NULL, received_at_us INTEGER NOT NULL,
                    payload TEXT NOT NULL CHECK (length(payload) < 5)) STRICT",
            )
            .unwrap();
        let mut insert = EventInsert::prepare(&connection, 1).unwrap();
        let row = |payload: &str| EventRow {
            id: Uuid::now_v7(),
            project_id: Uuid::now_v7(),
            issue_id: Uuid::now_v7(),
            level: "error".into(),
            received_at_us: 7,
            payload: payload.to_owned().into(),
        };
        insert.execute(&[&row("{}")]).unwrap();
        let refused = insert.execute(&[&row("{\"long\":1}")]).unwrap_err();
        assert_eq!(classify(&refused), StoreErrorKind::Rejected);
        assert!(
            refused.to_string().contains("CHECK constraint failed"),
            "{refused}"
        );
        // The statement is usable again after a failure.
        insert.execute(&[&row("[]")]).unwrap();
        let stored: Vec<(String, i64)> = connection
            .prepare("SELECT payload, received_at_us FROM events ORDER BY rowid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(stored, [("{}".to_owned(), 7), ("[]".to_owned(), 7)]);
    }

    #[test]
    fn latest_events_are_read_from_the_index_without_a_sort() {
        let data_dir =
            std::env::temp_dir().join(format!("mesher-sqlite-plan-{}", Uuid::new_v4().simple()));
        let mut backend = SqliteBackend::open(&data_dir).unwrap();
        backend.migrate().unwrap();
        let plan: Vec<String> = backend
            .connection
            .prepare(&format!("EXPLAIN QUERY PLAN {LATEST_EVENTS}"))
            .unwrap()
            .query_map(rusqlite::params![Uuid::nil().as_bytes(), 5], |row| {
                row.get(3)
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        drop(backend);
        let _ = std::fs::remove_dir_all(&data_dir);
        assert_eq!(
            plan,
            ["SEARCH events USING INDEX events_issue_received_at_id (issue_id=?)"]
        );
    }

    #[test]
    fn a_version_2_file_gets_fingerprint_hashes_and_keeps_its_issues() {
        let data_dir =
            std::env::temp_dir().join(format!("mesher-sqlite-v2-{}", Uuid::new_v4().simple()));
        let mut backend = SqliteBackend::open(&data_dir).unwrap();
        let (project_id, issue_id) = (Uuid::now_v7(), Uuid::now_v7());
        backend
            .connection
            .execute_batch(&format!(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY NOT NULL,
                    name TEXT NOT NULL, applied_at_us INTEGER NOT NULL) STRICT;
                 {}{}
                 INSERT INTO schema_migrations VALUES (1, 'initial schema', 0), (2, 'x', 0);",
                MIGRATIONS[0].sql, MIGRATIONS[1].sql
            ))
            .unwrap();
        backend
            .connection
            .execute(
                "INSERT INTO projects VALUES (?1, 'p', 'p', 0, 0, 1.0, 90)",
                [project_id.as_bytes()],
            )
            .unwrap();
        backend
            .connection
            .execute(
                "INSERT INTO issues VALUES (?1, ?2, 'msg:old key', 'Old', 'error', 'resolved',
                    7, 1, 2)",
                [issue_id.as_bytes(), project_id.as_bytes()],
            )
            .unwrap();
        backend.migrate().unwrap();
        let issues = backend.load().unwrap().issues;
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].id, issue_id);
        assert!(backend.has_issue(issue_id).unwrap());
        assert!(!backend.has_issue(project_id).unwrap());
        assert_eq!(
            issues[0].fingerprint,
            crate::ingest::fingerprint::hash("msg:old key")
        );
        assert_eq!(
            (
                issues[0].title.as_str(),
                issues[0].status.as_str(),
                issues[0].event_count
            ),
            ("Old", "resolved", 7)
        );
        // The hash is the issue's unique key now.
        let mut duplicate = issues[0].clone();
        duplicate.id = Uuid::now_v7();
        let error = backend.commit(&[Change::Issue(duplicate)]).unwrap_err();
        assert!(error.is_conflict(), "{error}");
        drop(backend);
        let _ = std::fs::remove_dir_all(&data_dir);
    }

    #[test]
    fn a_version_3_file_numbers_its_projects_in_creation_order() {
        let data_dir =
            std::env::temp_dir().join(format!("mesher-sqlite-v3-{}", Uuid::new_v4().simple()));
        let mut backend = SqliteBackend::open(&data_dir).unwrap();
        let (older, newer) = (Uuid::now_v7(), Uuid::now_v7());
        backend
            .connection
            .execute_batch(&format!(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY NOT NULL,
                    name TEXT NOT NULL, applied_at_us INTEGER NOT NULL) STRICT;
                 {}{}
                 ALTER TABLE issues ADD COLUMN fingerprint_hash BLOB;
                 {}
                 INSERT INTO schema_migrations VALUES (1, 'a', 0), (2, 'b', 0), (3, 'c', 0);",
                MIGRATIONS[0].sql, MIGRATIONS[1].sql, MIGRATIONS[2].sql
            ))
            .unwrap();
        // Inserted newest first: numbers follow creation, not insertion.
        for (id, slug, created_at_us) in [(newer, "newer", 20), (older, "older", 10)] {
            backend
                .connection
                .execute(
                    "INSERT INTO projects VALUES (?1, ?2, ?2, ?3, 0, 1.0, 90)",
                    rusqlite::params![id.as_bytes(), slug, created_at_us],
                )
                .unwrap();
        }
        backend.migrate().unwrap();
        let numbers: Vec<(Uuid, i64)> = backend
            .load()
            .unwrap()
            .projects
            .iter()
            .map(|project| (project.id, project.number))
            .collect();
        assert_eq!(numbers, [(older, 1), (newer, 2)]);
        assert_eq!(backend.next_project_number().unwrap(), 3);
        assert_eq!(backend.next_project_number().unwrap(), 4);
        drop(backend);
        let _ = std::fs::remove_dir_all(&data_dir);
    }

    #[test]
    fn a_version_1_file_is_upgraded_and_keeps_its_events() {
        let data_dir =
            std::env::temp_dir().join(format!("mesher-sqlite-v1-{}", Uuid::new_v4().simple()));
        let mut backend = SqliteBackend::open(&data_dir).unwrap();
        let issue_id = Uuid::now_v7();
        backend
            .connection
            .execute_batch(&format!(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY NOT NULL,
                    name TEXT NOT NULL, applied_at_us INTEGER NOT NULL) STRICT;
                 {}
                 INSERT INTO schema_migrations VALUES (1, 'initial schema', 0);",
                MIGRATIONS[0].sql
            ))
            .unwrap();
        backend
            .connection
            .execute(
                "INSERT INTO events VALUES (?1, ?2, ?3, 'error', 5, '{}')",
                rusqlite::params![
                    Uuid::now_v7().as_bytes(),
                    Uuid::nil().as_bytes(),
                    issue_id.as_bytes()
                ],
            )
            .unwrap();
        backend.migrate().unwrap();
        let indexes: Vec<String> = backend
            .connection
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(indexes, ["events_issue_received_at_id"]);
        let events = backend.latest_events(issue_id, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].received_at_us, 5);
        drop(backend);
        let _ = std::fs::remove_dir_all(&data_dir);
    }

    /// Pages of `file` the kernel holds in its page cache, out of all its pages.
    fn cached_pages(file: &File) -> (usize, usize) {
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let pages = len.div_ceil(page);
        let mut resident = vec![0u8; pages];
        // SAFETY: a read-only shared mapping of a file we hold open, only passed to mincore
        // (which reads nothing through it) and unmapped before returning.
        unsafe {
            let map = libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
            libc::munmap(map, len);
        }
        (resident.iter().filter(|r| *r & 1 == 1).count(), pages)
    }

    #[test]
    fn checkpoints_move_the_wal_into_the_file_and_let_its_cached_pages_go() {
        let data_dir =
            std::env::temp_dir().join(format!("mesher-sqlite-ckpt-{}", Uuid::new_v4().simple()));
        let backend = SqliteBackend::open(&data_dir).unwrap();
        let connection = &backend.connection;
        connection
            .execute_batch("CREATE TABLE filler (b BLOB)")
            .unwrap();
        // 80 MiB in transactions of 8 MiB: past the checkpoint threshold (1000 pages of 64 KiB).
        for _ in 0..10 {
            connection
                .execute_batch(
                    "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n
                     WHERE i < 8) INSERT INTO filler SELECT zeroblob(1048576) FROM n; COMMIT;",
                )
                .unwrap();
        }
        let file = File::open(data_dir.join(FILE_NAME)).unwrap();
        let (cached, pages) = cached_pages(&file);
        let file_bytes = file.metadata().unwrap().len();
        drop(backend);
        let _ = std::fs::remove_dir_all(&data_dir);
        assert!(file_bytes >= 60 << 20, "checkpointed {file_bytes} bytes");
        assert!(cached * 4 < pages, "{cached} of {pages} pages still cached");
    }

    #[test]
    fn unique_violation_is_a_conflict_and_check_violation_is_rejected() {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch("CREATE TABLE t (slug TEXT UNIQUE, n INTEGER CHECK (n >= 0))")
            .unwrap();
        connection
            .execute("INSERT INTO t VALUES ('a', 1)", [])
            .unwrap();
        let duplicate = connection
            .execute("INSERT INTO t VALUES ('a', 1)", [])
            .unwrap_err();
        assert_eq!(classify(&duplicate), StoreErrorKind::Conflict);
        let negative = connection
            .execute("INSERT INTO t VALUES ('b', -1)", [])
            .unwrap_err();
        assert_eq!(classify(&negative), StoreErrorKind::Rejected);
    }
}
