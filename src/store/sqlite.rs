//! The embedded default backend: one SQLite file in WAL mode. Ids are 16-byte blobs, times are
//! integer microseconds since the Unix epoch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{ffi, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::{
    retention_cutoff_us, Backend, BatchRows, Change, EventRow, IssueRow, KeyRow, Migration,
    ProjectRow, Scope, Snapshot, StoreError, StoreErrorKind,
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
/// Cached prepared statements: the few fixed ones below plus headroom for reads.
const STATEMENT_CACHE_CAPACITY: usize = 32;

const MIGRATIONS: &[Migration] = &[Migration {
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
}];

const UPSERT_PROJECT: &str = "
INSERT INTO projects (id, name, slug, created_at_us, rate_limit_per_minute, sample_rate,
    retention_days)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
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

const UPSERT_ISSUE: &str = "
INSERT INTO issues (id, project_id, fingerprint, title, level, status, event_count,
    first_seen_us, last_seen_us)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT (id) DO UPDATE SET project_id = excluded.project_id,
    fingerprint = excluded.fingerprint, title = excluded.title, level = excluded.level,
    status = excluded.status, event_count = excluded.event_count,
    first_seen_us = excluded.first_seen_us, last_seen_us = excluded.last_seen_us";

const EVENT_COLUMNS: usize = 6;

pub(super) struct SqliteBackend {
    connection: Connection,
    path: PathBuf,
    /// `INSERT INTO events ... VALUES (..), (..)` with `EVENT_ROWS_PER_INSERT` rows.
    insert_events_many: String,
    /// The same for one row, for the remainder of a batch.
    insert_events_one: String,
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
            connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
            Ok(())
        };
        configure().map_err(|error| sqlite_error("configure connection", error))?;
        Ok(SqliteBackend {
            connection,
            path,
            insert_events_many: insert_events_sql(EVENT_ROWS_PER_INSERT),
            insert_events_one: insert_events_sql(1),
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
                transaction
                    .execute_batch(migration.sql)
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
            let mut snapshot = Snapshot::default();
            let mut statement = self.connection.prepare(
                "SELECT id, name, slug, created_at_us, rate_limit_per_minute, sample_rate,
                    retention_days
                 FROM projects ORDER BY created_at_us, id",
            )?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                snapshot.projects.push(ProjectRow {
                    id: Uuid::from_bytes(row.get(0)?),
                    name: row.get(1)?,
                    slug: row.get(2)?,
                    created_at_us: row.get(3)?,
                    rate_limit_per_minute: row.get(4)?,
                    sample_rate: row.get(5)?,
                    retention_days: row.get(6)?,
                });
            }
            let mut statement = self.connection.prepare(
                "SELECT id, project_id, scope, label, key_hash, revoked, created_at_us
                 FROM api_keys ORDER BY created_at_us, id",
            )?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let scope_text: String = row.get(2)?;
                let scope = Scope::parse(&scope_text).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        format!("unknown key scope {scope_text:?}").into(),
                    )
                })?;
                snapshot.keys.push(KeyRow {
                    id: Uuid::from_bytes(row.get(0)?),
                    project_id: Uuid::from_bytes(row.get(1)?),
                    scope,
                    label: row.get(3)?,
                    key_hash: row.get(4)?,
                    revoked: row.get(5)?,
                    created_at_us: row.get(6)?,
                });
            }
            let mut statement = self.connection.prepare(
                "SELECT id, project_id, fingerprint, title, level, status, event_count,
                    first_seen_us, last_seen_us
                 FROM issues ORDER BY first_seen_us, id",
            )?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                snapshot.issues.push(IssueRow {
                    id: Uuid::from_bytes(row.get(0)?),
                    project_id: Uuid::from_bytes(row.get(1)?),
                    fingerprint: row.get(2)?,
                    title: row.get(3)?,
                    level: row.get(4)?,
                    status: row.get(5)?,
                    event_count: row.get(6)?,
                    first_seen_us: row.get(7)?,
                    last_seen_us: row.get(8)?,
                });
            }
            Ok(snapshot)
        };
        load().map_err(|error| sqlite_error("load", error))
    }

    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError> {
        let rows = BatchRows::group(batch);
        let transaction = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|error| sqlite_error("begin", error))?;
        if !rows.projects.is_empty() {
            let mut upsert = transaction
                .prepare_cached(UPSERT_PROJECT)
                .map_err(|error| sqlite_error("upsert projects", error))?;
            for project in &rows.projects {
                upsert
                    .execute(rusqlite::params![
                        project.id.as_bytes(),
                        project.name,
                        project.slug,
                        project.created_at_us,
                        project.rate_limit_per_minute,
                        project.sample_rate,
                        project.retention_days,
                    ])
                    .map_err(|error| sqlite_error("upsert projects", error))?;
            }
        }
        if !rows.keys.is_empty() {
            let mut upsert = transaction
                .prepare_cached(UPSERT_KEY)
                .map_err(|error| sqlite_error("upsert api keys", error))?;
            for key in &rows.keys {
                upsert
                    .execute(rusqlite::params![
                        key.id.as_bytes(),
                        key.project_id.as_bytes(),
                        key.scope.as_str(),
                        key.label,
                        key.key_hash,
                        key.revoked,
                        key.created_at_us,
                    ])
                    .map_err(|error| sqlite_error("upsert api keys", error))?;
            }
        }
        if !rows.issues.is_empty() {
            let mut upsert = transaction
                .prepare_cached(UPSERT_ISSUE)
                .map_err(|error| sqlite_error("upsert issues", error))?;
            for issue in &rows.issues {
                let event_count = i64::try_from(issue.event_count).unwrap_or(i64::MAX);
                upsert
                    .execute(rusqlite::params![
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
                    .map_err(|error| sqlite_error("upsert issues", error))?;
            }
        }
        let mut chunks = rows.events.chunks_exact(EVENT_ROWS_PER_INSERT);
        for chunk in chunks.by_ref() {
            insert_events(&transaction, &self.insert_events_many, chunk)
                .map_err(|error| sqlite_error("insert events", error))?;
        }
        for event in chunks.remainder() {
            insert_events(
                &transaction,
                &self.insert_events_one,
                std::slice::from_ref(event),
            )
            .map_err(|error| sqlite_error("insert events", error))?;
        }
        transaction
            .commit()
            .map_err(|error| sqlite_error("commit", error))
    }

    fn latest_events(&mut self, issue_id: Uuid, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        let read = || -> rusqlite::Result<Vec<EventRow>> {
            let mut statement = self.connection.prepare_cached(
                "SELECT id, project_id, issue_id, level, received_at_us, payload
                 FROM events WHERE issue_id = ?1
                 ORDER BY received_at_us DESC, id DESC LIMIT ?2",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows =
                statement.query_map(rusqlite::params![issue_id.as_bytes(), limit], |row| {
                    Ok(EventRow {
                        id: Uuid::from_bytes(row.get(0)?),
                        project_id: Uuid::from_bytes(row.get(1)?),
                        issue_id: Uuid::from_bytes(row.get(2)?),
                        level: row.get(3)?,
                        received_at_us: row.get(4)?,
                        payload: row.get(5)?,
                    })
                })?;
            rows.collect()
        };
        read().map_err(|error| sqlite_error("latest events", error))
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

fn insert_events(
    transaction: &rusqlite::Transaction<'_>,
    sql: &str,
    events: &[&EventRow],
) -> rusqlite::Result<()> {
    let mut statement = transaction.prepare_cached(sql)?;
    debug_assert_eq!(statement.parameter_count(), events.len() * EVENT_COLUMNS);
    for (row, event) in events.iter().enumerate() {
        let first = row * EVENT_COLUMNS + 1;
        statement.raw_bind_parameter(first, event.id.as_bytes())?;
        statement.raw_bind_parameter(first + 1, event.project_id.as_bytes())?;
        statement.raw_bind_parameter(first + 2, event.issue_id.as_bytes())?;
        statement.raw_bind_parameter(first + 3, &event.level)?;
        statement.raw_bind_parameter(first + 4, event.received_at_us)?;
        statement.raw_bind_parameter(first + 5, &event.payload)?;
    }
    let inserted = statement.raw_execute()?;
    debug_assert_eq!(inserted, events.len());
    Ok(())
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
