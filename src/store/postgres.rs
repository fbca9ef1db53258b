//! PostgreSQL backend (the blocking `postgres` client). Events go in with binary COPY into a
//! table partitioned by day on `received_at`; projects, keys and issues are upserted from arrays
//! (`unnest`), one statement per table per batch. All SQL uses unqualified names, so the tables
//! live in the first schema of the connection's `search_path` (`?options=-csearch_path%3Dname`).
//!
//! The crate is used without its uuid and time features: ids cross the wire as text cast to
//! `uuid`, times as int8 microseconds converted exactly in SQL (`ts_from_us!`, `us_from_ts!`).

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, Config, NoTls, Statement};
use uuid::Uuid;

use super::{
    recent_since_us, retention_cutoff_us, Backend, BatchRows, Change, EventRow, IssueRow, KeyRow,
    Migration, ProjectRow, RecentEvent, Scope, Snapshot, StoreError, StoreErrorKind,
    MICROS_PER_DAY, RECENT_EVENT_IDS_MAX,
};

const BACKEND: &str = "postgres";
/// A connection attempt gives up after this; the writer's backoff then tries again.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Unacknowledged writes fail after this, so a vanished server cannot hang a commit for the
/// kernel's default of many minutes.
const TCP_USER_TIMEOUT_MS: u64 = 30_000;
/// Idle time before TCP keepalive probes, so a dead idle connection is noticed.
const KEEPALIVES_IDLE_MS: u64 = 30_000;
/// How long the liveness check before reusing a connection may take.
const VALIDATE_TIMEOUT_MS: u64 = 2_000;
/// Day partitions exist from today through this many days ahead, so a missed hourly run or a
/// clock near midnight never sends events to the default partition.
const PARTITION_DAYS_AHEAD: i64 = 3;
/// COPY data is handed to the client in chunks of about this size, bounding the memory a large
/// batch needs on top of its rows.
const COPY_CHUNK_BYTES: usize = 256 * 1024;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01), from which binary timestamps
/// count.
const POSTGRES_EPOCH_UNIX_US: i64 = 946_684_800_000_000;
/// Binary COPY header: signature, flags, header extension length.
const COPY_BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
const EVENT_COLUMNS: i16 = 6;

/// SQL for the timestamptz `$x` microseconds after the Unix epoch, exact for every int8 (a
/// single float multiplication would round beyond 2^53 us).
macro_rules! ts_from_us {
    ($x:literal) => {
        concat!(
            "(to_timestamp(0) + (",
            $x,
            " / 1000000) * interval '1 second' + (",
            $x,
            " % 1000000) * interval '1 microsecond')"
        )
    };
}

/// SQL for the microseconds since the Unix epoch of the timestamptz `$x`.
macro_rules! us_from_ts {
    ($x:literal) => {
        concat!("(extract(epoch FROM ", $x, ") * 1000000)::int8")
    };
}

/// An issue row of `SELECT_ISSUES` or `SELECT_PROJECT_ISSUES`.
fn issue_row(row: &postgres::Row, operation: &'static str) -> Result<IssueRow, StoreError> {
    let event_count: i64 = row.get(6);
    Ok(IssueRow {
        id: parse_uuid(row.get(0), operation)?,
        project_id: parse_uuid(row.get(1), operation)?,
        fingerprint: row.get::<_, &[u8]>(2).try_into().map_err(|_| {
            let cause = "an issue's fingerprint_hash is not 16 bytes";
            StoreError::new(BACKEND, operation, StoreErrorKind::Rejected, cause)
        })?,
        title: row.get(3),
        level: row.get(4),
        status: row.get(5),
        event_count: u64::try_from(event_count).unwrap_or(0),
        first_seen_us: row.get(7),
        last_seen_us: row.get(8),
    })
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: "
CREATE TABLE projects (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    slug text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    rate_limit_per_minute bigint NOT NULL CHECK (rate_limit_per_minute >= 0),
    sample_rate double precision NOT NULL CHECK (sample_rate >= 0 AND sample_rate <= 1),
    retention_days bigint NOT NULL CHECK (retention_days >= 0)
);
CREATE TABLE api_keys (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id),
    scope text NOT NULL CHECK (scope IN ('ingest', 'dashboard')),
    label text,
    key_hash text NOT NULL UNIQUE,
    revoked boolean NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX api_keys_project_id ON api_keys (project_id);
CREATE TABLE issues (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id),
    fingerprint text NOT NULL,
    title text NOT NULL,
    level text NOT NULL,
    status text NOT NULL
        CHECK (status IN ('unresolved', 'resolved', 'archived', 'discarded')),
    event_count bigint NOT NULL CHECK (event_count >= 0),
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL
);
-- Fingerprints come from clients and may exceed a btree entry (~2.7 kB): index their digest.
CREATE UNIQUE INDEX issues_project_id_fingerprint ON issues (project_id, md5(fingerprint));
-- No key and no foreign keys on events: every index and check costs each COPYed row, the writer
-- only inserts fresh ids, and reads go by issue or by project and time.
CREATE TABLE events (
    id uuid NOT NULL,
    project_id uuid NOT NULL,
    issue_id uuid NOT NULL,
    level text NOT NULL,
    received_at timestamptz NOT NULL,
    payload text NOT NULL
) PARTITION BY RANGE (received_at);
-- Catches rows of days without a partition, so an insert never fails for a missing day.
CREATE TABLE events_default PARTITION OF events DEFAULT;
CREATE INDEX events_issue_id_received_at ON events (issue_id, received_at DESC);
CREATE INDEX events_project_id_received_at ON events (project_id, received_at);
",
    },
    Migration {
        version: 2,
        name: "issues keyed by fingerprint hash",
        // The hash is `ingest::fingerprint::hash`: the first 16 bytes of the key's SHA-256, so
        // old issues keep grouping the events of new ones.
        sql: "
ALTER TABLE issues ADD COLUMN fingerprint_hash bytea;
UPDATE issues SET fingerprint_hash = substring(sha256(convert_to(fingerprint, 'UTF8')) FROM 1 FOR 16);
ALTER TABLE issues ALTER COLUMN fingerprint_hash SET NOT NULL,
    ADD CONSTRAINT issues_fingerprint_hash_length CHECK (octet_length(fingerprint_hash) = 16);
DROP INDEX issues_project_id_fingerprint;
ALTER TABLE issues DROP COLUMN fingerprint;
CREATE UNIQUE INDEX issues_project_id_fingerprint_hash ON issues (project_id, fingerprint_hash);
",
    },
    Migration {
        version: 3,
        name: "project numbers",
        // Projects from before get numbers in creation order; new ones take theirs from the
        // sequence (`next_project_number`), which never hands a number out twice, whichever
        // server asks.
        sql: "
CREATE SEQUENCE project_numbers AS bigint;
ALTER TABLE projects ADD COLUMN number bigint;
UPDATE projects SET number = ordered.number
FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS number FROM projects) AS ordered
WHERE projects.id = ordered.id;
SELECT setval('project_numbers', max(number)) FROM projects HAVING count(*) > 0;
ALTER TABLE projects ALTER COLUMN number SET NOT NULL,
    ALTER COLUMN number SET DEFAULT nextval('project_numbers'),
    ADD CONSTRAINT projects_number_positive CHECK (number > 0),
    ADD CONSTRAINT projects_number_key UNIQUE (number);
ALTER SEQUENCE project_numbers OWNED BY projects.number;
",
    },
    Migration {
        version: 4,
        name: "cluster id",
        // The id the nodes sharing this database share (PROTOCOL section 10): their NATS
        // subjects are named under it. Made by the first node that runs as one of several.
        sql: "
CREATE TABLE cluster (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id uuid NOT NULL
);
",
    },
];

const UPSERT_PROJECTS: &str = concat!(
    "INSERT INTO projects (id, name, slug, created_at, rate_limit_per_minute, sample_rate,
        retention_days, number)
    SELECT r.id::uuid, r.name, r.slug, ",
    ts_from_us!("r.created_at_us"),
    ", r.rate_limit_per_minute, r.sample_rate, r.retention_days, r.number
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::float8[],
        $7::int8[], $8::int8[]) WITH ORDINALITY
        AS r (id, name, slug, created_at_us, rate_limit_per_minute, sample_rate, retention_days,
            number, position)
    ORDER BY r.position
    ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, slug = EXCLUDED.slug,
        created_at = EXCLUDED.created_at, rate_limit_per_minute = EXCLUDED.rate_limit_per_minute,
        sample_rate = EXCLUDED.sample_rate, retention_days = EXCLUDED.retention_days"
);

const UPSERT_KEYS: &str = concat!(
    "INSERT INTO api_keys (id, project_id, scope, label, key_hash, revoked, created_at)
    SELECT r.id::uuid, r.project_id::uuid, r.scope, r.label, r.key_hash, r.revoked, ",
    ts_from_us!("r.created_at_us"),
    "
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[],
        $7::int8[]) WITH ORDINALITY
        AS r (id, project_id, scope, label, key_hash, revoked, created_at_us, position)
    ORDER BY r.position
    ON CONFLICT (id) DO UPDATE SET project_id = EXCLUDED.project_id, scope = EXCLUDED.scope,
        label = EXCLUDED.label, key_hash = EXCLUDED.key_hash, revoked = EXCLUDED.revoked,
        created_at = EXCLUDED.created_at"
);

/// An issue's project and fingerprint are fixed when it is created; an update leaves them be.
const UPSERT_ISSUES: &str = concat!(
    "INSERT INTO issues (id, project_id, fingerprint_hash, title, level, status, event_count,
        first_seen, last_seen)
    SELECT r.id::uuid, r.project_id::uuid, r.fingerprint_hash, r.title, r.level, r.status,
        r.event_count, ",
    ts_from_us!("r.first_seen_us"),
    ", ",
    ts_from_us!("r.last_seen_us"),
    "
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::text[],
        $7::int8[], $8::int8[], $9::int8[]) WITH ORDINALITY
        AS r (id, project_id, fingerprint_hash, title, level, status, event_count, first_seen_us,
            last_seen_us, position)
    ORDER BY r.position
    ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, level = EXCLUDED.level,
        status = EXCLUDED.status, event_count = EXCLUDED.event_count,
        first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen"
);

const EVENT_EXISTS: &str = concat!(
    "SELECT EXISTS (SELECT 1 FROM events
        WHERE issue_id = $1::text::uuid AND received_at = ",
    ts_from_us!("$2::int8"),
    " AND id = $3::text::uuid)"
);

const COPY_EVENTS: &str = "COPY events (id, project_id, issue_id, level, received_at, payload)
    FROM STDIN (FORMAT binary)";

const SELECT_PROJECTS: &str = concat!(
    "SELECT id::text, name, slug, ",
    us_from_ts!("created_at"),
    ", rate_limit_per_minute, sample_rate, retention_days, number FROM projects
    ORDER BY created_at, id"
);

const SELECT_KEYS: &str = concat!(
    "SELECT id::text, project_id::text, scope, label, key_hash, revoked, ",
    us_from_ts!("created_at"),
    " FROM api_keys ORDER BY created_at, id"
);

const SELECT_ISSUES: &str = concat!(
    "SELECT id::text, project_id::text, fingerprint_hash, title, level, status, event_count, ",
    us_from_ts!("first_seen"),
    ", ",
    us_from_ts!("last_seen"),
    " FROM issues ORDER BY first_seen, id"
);

const SELECT_PROJECT_ISSUES: &str = concat!(
    "SELECT id::text, project_id::text, fingerprint_hash, title, level, status, event_count, ",
    us_from_ts!("first_seen"),
    ", ",
    us_from_ts!("last_seen"),
    " FROM issues WHERE project_id = $1::text::uuid ORDER BY first_seen, id"
);

const SELECT_RECENT_EVENTS: &str = concat!(
    "SELECT id::text, ",
    us_from_ts!("received_at"),
    " FROM events WHERE project_id = $1::text::uuid AND received_at > ",
    ts_from_us!("$2::int8"),
    " ORDER BY received_at DESC LIMIT $3"
);

const SELECT_LATEST_EVENTS: &str = concat!(
    "SELECT id::text, project_id::text, issue_id::text, level, ",
    us_from_ts!("received_at"),
    ", payload FROM events WHERE issue_id = $1::text::uuid
    ORDER BY received_at DESC, id DESC LIMIT $2::int8"
);

const DELETE_EXPIRED_EVENTS: &str = concat!(
    "DELETE FROM events WHERE project_id = $1::text::uuid AND received_at < ",
    ts_from_us!("$2::int8")
);

const SELECT_PARTITIONS: &str = "SELECT child.relname::text FROM pg_inherits
    JOIN pg_class child ON child.oid = pg_inherits.inhrelid
    WHERE pg_inherits.inhparent = 'events'::regclass";

/// Statements of the hot path, prepared once per connection.
#[derive(Clone)]
struct Statements {
    upsert_projects: Statement,
    upsert_keys: Statement,
    upsert_issues: Statement,
    event_exists: Statement,
}

pub(super) struct PostgresBackend {
    config: Config,
    client: Client,
    /// None until first needed after (re)connecting: the tables must exist to prepare them.
    statements: Option<Statements>,
    /// The last commit failed, possibly after the server had committed it (a connection lost
    /// while waiting for the COMMIT reply): check before writing the next batch twice.
    last_commit_failed: bool,
    copy_buffer: Vec<u8>,
}

impl PostgresBackend {
    pub(super) fn open(url: &str) -> Result<PostgresBackend, StoreError> {
        let mut config: Config = url.parse().map_err(|error| {
            StoreError::new(
                BACKEND,
                "parse database URL",
                StoreErrorKind::Rejected,
                error,
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_millis(TCP_USER_TIMEOUT_MS));
        }
        if config.get_application_name().is_none() {
            config.application_name("mesher");
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_millis(KEEPALIVES_IDLE_MS));
        let client = connect(&config)?;
        Ok(PostgresBackend {
            config,
            client,
            statements: None,
            last_commit_failed: false,
            copy_buffer: Vec::new(),
        })
    }

    fn statements(&mut self) -> Result<Statements, StoreError> {
        if let Some(statements) = &self.statements {
            return Ok(statements.clone());
        }
        let mut prepare = |sql: &str| {
            self.client
                .prepare(sql)
                .map_err(|error| pg_error("prepare statements", error))
        };
        let statements = Statements {
            upsert_projects: prepare(UPSERT_PROJECTS)?,
            upsert_keys: prepare(UPSERT_KEYS)?,
            upsert_issues: prepare(UPSERT_ISSUES)?,
            event_exists: prepare(EVENT_EXISTS)?,
        };
        self.statements = Some(statements.clone());
        Ok(statements)
    }

    /// Creates the schema named first in `search_path` when it does not exist yet, so a URL
    /// naming a fresh schema works without manual setup.
    fn ensure_schema(&mut self) -> Result<(), StoreError> {
        let operation = "create schema";
        let current: Option<String> = self
            .client
            .query_one("SELECT current_schema()", &[])
            .map_err(|error| pg_error(operation, error))?
            .get(0);
        if current.is_some() {
            return Ok(());
        }
        let search_path: String = self
            .client
            .query_one("SELECT current_setting('search_path')", &[])
            .map_err(|error| pg_error(operation, error))?
            .get(0);
        let Some(schema) = first_schema(&search_path) else {
            let cause = format!("no schema to create tables in (search_path {search_path:?})");
            return Err(StoreError::new(
                BACKEND,
                operation,
                StoreErrorKind::Rejected,
                cause,
            ));
        };
        let sql = format!("CREATE SCHEMA IF NOT EXISTS {}", quote_identifier(&schema));
        self.client
            .batch_execute(&sql)
            .map_err(|error| pg_error(operation, error))?;
        tracing::info!(schema, "created database schema");
        Ok(())
    }

    /// Today's partition and the next `PARTITION_DAYS_AHEAD` days'.
    fn create_partitions(&mut self, now_us: i64) -> Result<(), StoreError> {
        let operation = "create partitions";
        let existing = self.partition_names(operation)?;
        let today = now_us.div_euclid(MICROS_PER_DAY);
        for day in today..=today + PARTITION_DAYS_AHEAD {
            let Some(partition) = DayPartition::new(day) else {
                continue;
            };
            if existing.contains(&partition.name) {
                continue;
            }
            self.create_partition(&partition)
                .map_err(|error| pg_error(operation, error))?;
            tracing::info!(partition = partition.name, "created events partition");
        }
        Ok(())
    }

    /// Creates a day partition, first moving that day's rows out of the default partition
    /// (PostgreSQL refuses a partition whose rows already sit in the default one).
    fn create_partition(&mut self, partition: &DayPartition) -> Result<(), ::postgres::Error> {
        let DayPartition { name, from, to } = partition;
        let mut transaction = self.client.transaction()?;
        transaction.batch_execute(&format!(
            "CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
            WITH moved AS (
                DELETE FROM events_default
                WHERE received_at >= '{from}' AND received_at < '{to}'
                RETURNING *
            )
            INSERT INTO {name} SELECT * FROM moved;
            ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ('{from}') TO ('{to}');"
        ))?;
        transaction.commit()
    }

    fn partition_names(&mut self, operation: &'static str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client
            .query(SELECT_PARTITIONS, &[])
            .map_err(|error| pg_error(operation, error))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Deletes events past their project's retention: whole day partitions once every project's
    /// retention has passed them, row by row for the rest.
    fn apply_retention(&mut self, now_us: i64) -> Result<(), StoreError> {
        let operation = "retention";
        let rows = self
            .client
            .query("SELECT id::text, retention_days FROM projects", &[])
            .map_err(|error| pg_error(operation, error))?;
        let mut projects = Vec::with_capacity(rows.len());
        for row in &rows {
            let retention_days: i64 = row.get(1);
            projects.push((row.get::<_, String>(0), to_u32(retention_days, operation)?));
        }
        let keeps_forever = projects.iter().any(|(_, days)| *days == 0);
        let longest_days = projects.iter().map(|(_, days)| *days).max();
        if let (false, Some(longest_days)) = (keeps_forever, longest_days) {
            if let Some(cutoff_us) = retention_cutoff_us(now_us, longest_days) {
                self.drop_partitions_before(cutoff_us)?;
            }
        }
        let mut deleted = 0;
        for (project_id, retention_days) in &projects {
            let Some(cutoff_us) = retention_cutoff_us(now_us, *retention_days) else {
                continue;
            };
            deleted += self
                .client
                .execute(DELETE_EXPIRED_EVENTS, &[project_id, &cutoff_us])
                .map_err(|error| pg_error(operation, error))?;
        }
        if deleted > 0 {
            tracing::info!(deleted, "deleted events past their project's retention");
        }
        Ok(())
    }

    fn drop_partitions_before(&mut self, cutoff_us: i64) -> Result<(), StoreError> {
        let operation = "drop expired partitions";
        for name in self.partition_names(operation)? {
            let Some(day) = DayPartition::day_of_name(&name) else {
                continue;
            };
            let day_end_us = (day + 1).saturating_mul(MICROS_PER_DAY);
            if day_end_us > cutoff_us {
                continue;
            }
            self.client
                .batch_execute(&format!("DROP TABLE {name}"))
                .map_err(|error| pg_error(operation, error))?;
            tracing::info!(partition = name, "dropped events partition past retention");
        }
        Ok(())
    }
}

fn connect(config: &Config) -> Result<Client, StoreError> {
    config
        .connect(NoTls)
        .map_err(|error| pg_error("connect", error))
}

impl Backend for PostgresBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let operation = "migrate";
        self.ensure_schema()?;
        let known_max = MIGRATIONS.last().map_or(0, |migration| migration.version);
        // Ok(Err(version)): the schema is newer than this server; nothing was changed.
        type Outcome = Result<Vec<&'static Migration>, i64>;
        let mut run = || -> Result<Outcome, ::postgres::Error> {
            let mut transaction = self.client.transaction()?;
            // Servers starting together on one schema migrate one after the other.
            transaction.execute(
                "SELECT pg_advisory_xact_lock(hashtext('mesher migrate ' || current_schema()))",
                &[],
            )?;
            transaction.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version bigint PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )?;
            let applied: Vec<i64> = transaction
                .query(
                    "SELECT version FROM schema_migrations ORDER BY version",
                    &[],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if let Some(&newest) = applied.last().filter(|&&newest| newest > known_max) {
                return Ok(Err(newest));
            }
            let mut newly_applied = Vec::new();
            for migration in MIGRATIONS {
                if applied.contains(&migration.version) {
                    continue;
                }
                transaction.batch_execute(migration.sql)?;
                transaction.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[&migration.version, &migration.name],
                )?;
                newly_applied.push(migration);
            }
            transaction.commit()?;
            Ok(Ok(newly_applied))
        };
        let newly_applied = match run().map_err(|error| pg_error(operation, error))? {
            Ok(newly_applied) => newly_applied,
            Err(newest) => {
                let cause = format!(
                    "schema version {newest} is newer than this server knows ({known_max})"
                );
                return Err(StoreError::new(
                    BACKEND,
                    operation,
                    StoreErrorKind::Rejected,
                    cause,
                ));
            }
        };
        for migration in newly_applied {
            tracing::info!(
                version = migration.version,
                name = migration.name,
                "applied schema migration"
            );
        }
        Ok(())
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        let mut snapshot = self.directory()?;
        for row in self
            .client
            .query(SELECT_ISSUES, &[])
            .map_err(|error| pg_error("load", error))?
        {
            snapshot.issues.push(issue_row(&row, "load")?);
        }
        snapshot.recent_events = self.recent_events(None, recent_since_us())?;
        Ok(snapshot)
    }

    fn recent_events(
        &mut self,
        project_id: Option<Uuid>,
        since_us: i64,
    ) -> Result<Vec<RecentEvent>, StoreError> {
        let operation = "recent events";
        let projects = match project_id {
            Some(id) => vec![id],
            None => self
                .client
                .query("SELECT id::text FROM projects", &[])
                .map_err(|error| pg_error(operation, error))?
                .iter()
                .map(|row| parse_uuid(row.get(0), operation))
                .collect::<Result<_, _>>()?,
        };
        // One backward scan of the (project_id, received_at) index per project.
        let limit = RECENT_EVENT_IDS_MAX as i64;
        let mut events = Vec::new();
        for project_id in projects {
            let rows = self
                .client
                .query(
                    SELECT_RECENT_EVENTS,
                    &[&project_id.to_string(), &since_us, &limit],
                )
                .map_err(|error| pg_error(operation, error))?;
            for row in rows.iter().rev() {
                events.push(RecentEvent {
                    project_id,
                    id: parse_uuid(row.get(0), operation)?,
                    received_at_us: row.get(1),
                });
            }
        }
        events.sort_by_key(|event| event.received_at_us);
        Ok(events)
    }

    fn directory(&mut self) -> Result<Snapshot, StoreError> {
        let operation = "load";
        let query = |client: &mut Client, sql: &str| {
            client
                .query(sql, &[])
                .map_err(|error| pg_error(operation, error))
        };
        let mut snapshot = Snapshot::default();
        for row in query(&mut self.client, SELECT_PROJECTS)? {
            snapshot.projects.push(ProjectRow {
                id: parse_uuid(row.get(0), operation)?,
                name: row.get(1),
                slug: row.get(2),
                created_at_us: row.get(3),
                rate_limit_per_minute: to_u32(row.get(4), operation)?,
                sample_rate: row.get(5),
                retention_days: to_u32(row.get(6), operation)?,
                number: row.get(7),
            });
        }
        for row in query(&mut self.client, SELECT_KEYS)? {
            let scope_text: &str = row.get(2);
            let scope = Scope::parse(scope_text).ok_or_else(|| {
                let cause = format!("unknown key scope {scope_text:?}");
                StoreError::new(BACKEND, operation, StoreErrorKind::Rejected, cause)
            })?;
            snapshot.keys.push(KeyRow {
                id: parse_uuid(row.get(0), operation)?,
                project_id: parse_uuid(row.get(1), operation)?,
                scope,
                label: row.get(3),
                key_hash: row.get(4),
                revoked: row.get(5),
                created_at_us: row.get(6),
            });
        }
        Ok(snapshot)
    }

    fn project_issues(&mut self, project_id: Uuid) -> Result<Vec<IssueRow>, StoreError> {
        let operation = "project issues";
        self.client
            .query(SELECT_PROJECT_ISSUES, &[&project_id.to_string()])
            .map_err(|error| pg_error(operation, error))?
            .iter()
            .map(|row| issue_row(row, operation))
            .collect()
    }

    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError> {
        let rows = BatchRows::group(batch);
        let statements = self.statements()?;
        let result = write_batch(
            &mut self.client,
            &statements,
            &rows,
            self.last_commit_failed,
            &mut self.copy_buffer,
        );
        self.last_commit_failed = result.is_err();
        // A huge batch must not pin its COPY buffer for the life of the process.
        if self.copy_buffer.capacity() > 4 * COPY_CHUNK_BYTES {
            self.copy_buffer = Vec::new();
        }
        result
    }

    fn has_issue(&mut self, issue_id: Uuid) -> Result<bool, StoreError> {
        self.client
            .query_opt(
                "SELECT 1 FROM issues WHERE id = $1::text::uuid",
                &[&issue_id.to_string()],
            )
            .map(|row| row.is_some())
            .map_err(|error| pg_error("has issue", error))
    }

    fn latest_events(&mut self, issue_id: Uuid, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        let operation = "latest events";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client
            .query(SELECT_LATEST_EVENTS, &[&issue_id.to_string(), &limit])
            .map_err(|error| pg_error(operation, error))?;
        rows.iter()
            .map(|row| {
                Ok(EventRow {
                    id: parse_uuid(row.get(0), operation)?,
                    project_id: parse_uuid(row.get(1), operation)?,
                    issue_id: parse_uuid(row.get(2), operation)?,
                    level: Cow::Owned(row.get(3)),
                    received_at_us: row.get(4),
                    payload: row.get::<_, String>(5).into(),
                })
            })
            .collect()
    }

    fn count_events(&mut self, project_id: Option<Uuid>) -> Result<u64, StoreError> {
        let row = match project_id {
            Some(project_id) => self.client.query_one(
                "SELECT count(*) FROM events WHERE project_id = $1::text::uuid",
                &[&project_id.to_string()],
            ),
            None => self.client.query_one("SELECT count(*) FROM events", &[]),
        };
        let count: i64 = row.map_err(|error| pg_error("count events", error))?.get(0);
        Ok(u64::try_from(count).unwrap_or(0))
    }

    fn next_project_number(&mut self) -> Result<i64, StoreError> {
        self.client
            .query_one("SELECT nextval('project_numbers')", &[])
            .map(|row| row.get(0))
            .map_err(|error| pg_error("next project number", error))
    }

    fn maintain(&mut self, now_us: i64) -> Result<(), StoreError> {
        self.create_partitions(now_us)?;
        self.apply_retention(now_us)
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        self.client
            .simple_query("SELECT 1")
            .map(drop)
            .map_err(|error| pg_error("ping", error))
    }

    fn reconnect(&mut self) -> Result<(), StoreError> {
        let usable = !self.client.is_closed()
            && self
                .client
                .is_valid(Duration::from_millis(VALIDATE_TIMEOUT_MS))
                .is_ok();
        if usable {
            return Ok(());
        }
        self.client = connect(&self.config)?;
        self.statements = None;
        tracing::info!("reconnected to PostgreSQL");
        Ok(())
    }
}

/// One transaction: upserts, then the events by COPY. After a failed commit, a batch whose
/// first event is already stored was committed by that attempt and is not written again.
fn write_batch(
    client: &mut Client,
    statements: &Statements,
    rows: &BatchRows<'_>,
    check_already_committed: bool,
    copy_buffer: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let mut transaction = client
        .transaction()
        .map_err(|error| pg_error("begin", error))?;
    if let (true, Some(first)) = (check_already_committed, rows.events.first()) {
        let params: [&(dyn ToSql + Sync); 3] = [
            &first.issue_id.to_string(),
            &first.received_at_us,
            &first.id.to_string(),
        ];
        let stored: bool = transaction
            .query_one(&statements.event_exists, &params)
            .map_err(|error| pg_error("check earlier commit", error))?
            .get(0);
        if stored {
            tracing::info!("batch was committed before the connection failed; not written twice");
            return Ok(());
        }
    }
    if !rows.projects.is_empty() {
        let projects = &rows.projects;
        let ids: Vec<String> = projects.iter().map(|row| row.id.to_string()).collect();
        let names: Vec<Cow<str>> = projects.iter().map(|row| text(&row.name)).collect();
        let slugs: Vec<Cow<str>> = projects.iter().map(|row| text(&row.slug)).collect();
        let created: Vec<i64> = projects.iter().map(|row| row.created_at_us).collect();
        let rate_limits: Vec<i64> = projects
            .iter()
            .map(|row| i64::from(row.rate_limit_per_minute))
            .collect();
        let sample_rates: Vec<f64> = projects.iter().map(|row| row.sample_rate).collect();
        let retention: Vec<i64> = projects
            .iter()
            .map(|row| i64::from(row.retention_days))
            .collect();
        let numbers: Vec<i64> = projects.iter().map(|row| row.number).collect();
        transaction
            .execute(
                &statements.upsert_projects,
                &[
                    &ids,
                    &names,
                    &slugs,
                    &created,
                    &rate_limits,
                    &sample_rates,
                    &retention,
                    &numbers,
                ],
            )
            .map_err(|error| pg_error("upsert projects", error))?;
    }
    if !rows.keys.is_empty() {
        let keys = &rows.keys;
        let ids: Vec<String> = keys.iter().map(|row| row.id.to_string()).collect();
        let projects: Vec<String> = keys.iter().map(|row| row.project_id.to_string()).collect();
        let scopes: Vec<&str> = keys.iter().map(|row| row.scope.as_str()).collect();
        let labels: Vec<Option<Cow<str>>> = keys
            .iter()
            .map(|row| row.label.as_deref().map(text))
            .collect();
        let hashes: Vec<Cow<str>> = keys.iter().map(|row| text(&row.key_hash)).collect();
        let revoked: Vec<bool> = keys.iter().map(|row| row.revoked).collect();
        let created: Vec<i64> = keys.iter().map(|row| row.created_at_us).collect();
        transaction
            .execute(
                &statements.upsert_keys,
                &[
                    &ids, &projects, &scopes, &labels, &hashes, &revoked, &created,
                ],
            )
            .map_err(|error| pg_error("upsert api keys", error))?;
    }
    if !rows.issues.is_empty() {
        let issues = &rows.issues;
        let ids: Vec<String> = issues.iter().map(|row| row.id.to_string()).collect();
        let projects: Vec<String> = issues
            .iter()
            .map(|row| row.project_id.to_string())
            .collect();
        let fingerprints: Vec<&[u8]> = issues.iter().map(|row| &row.fingerprint[..]).collect();
        let titles: Vec<Cow<str>> = issues.iter().map(|row| text(&row.title)).collect();
        let levels: Vec<Cow<str>> = issues.iter().map(|row| text(&row.level)).collect();
        let statuses: Vec<Cow<str>> = issues.iter().map(|row| text(&row.status)).collect();
        let counts: Vec<i64> = issues
            .iter()
            .map(|row| i64::try_from(row.event_count).unwrap_or(i64::MAX))
            .collect();
        let first_seen: Vec<i64> = issues.iter().map(|row| row.first_seen_us).collect();
        let last_seen: Vec<i64> = issues.iter().map(|row| row.last_seen_us).collect();
        transaction
            .execute(
                &statements.upsert_issues,
                &[
                    &ids,
                    &projects,
                    &fingerprints,
                    &titles,
                    &levels,
                    &statuses,
                    &counts,
                    &first_seen,
                    &last_seen,
                ],
            )
            .map_err(|error| pg_error("upsert issues", error))?;
    }
    if !rows.events.is_empty() {
        copy_events(&mut transaction, &rows.events, copy_buffer)?;
    }
    transaction
        .commit()
        .map_err(|error| pg_error("commit", error))
}

fn copy_events(
    transaction: &mut ::postgres::Transaction<'_>,
    events: &[&EventRow],
    buffer: &mut Vec<u8>,
) -> Result<(), StoreError> {
    let operation = "copy events";
    let mut writer = transaction
        .copy_in(COPY_EVENTS)
        .map_err(|error| pg_error(operation, error))?;
    let io_error = |error: std::io::Error| {
        StoreError::new(BACKEND, operation, StoreErrorKind::Unavailable, error)
    };
    buffer.clear();
    buffer.extend_from_slice(COPY_BINARY_HEADER);
    for event in events {
        encode_event(event, buffer)?;
        if buffer.len() >= COPY_CHUNK_BYTES {
            writer.write_all(buffer).map_err(io_error)?;
            buffer.clear();
        }
    }
    // File trailer: a tuple field count of -1.
    buffer.extend_from_slice(&(-1i16).to_be_bytes());
    writer.write_all(buffer).map_err(io_error)?;
    buffer.clear();
    let copied = writer
        .finish()
        .map_err(|error| pg_error(operation, error))?;
    debug_assert_eq!(copied, events.len() as u64);
    Ok(())
}

/// One tuple of binary COPY: field count, then each field as length and bytes.
fn encode_event(event: &EventRow, buffer: &mut Vec<u8>) -> Result<(), StoreError> {
    buffer.extend_from_slice(&EVENT_COLUMNS.to_be_bytes());
    for id in [event.id, event.project_id, event.issue_id] {
        buffer.extend_from_slice(&16i32.to_be_bytes());
        buffer.extend_from_slice(id.as_bytes());
    }
    encode_text(&event.level, buffer)?;
    buffer.extend_from_slice(&8i32.to_be_bytes());
    let since_postgres_epoch_us = event.received_at_us.saturating_sub(POSTGRES_EPOCH_UNIX_US);
    buffer.extend_from_slice(&since_postgres_epoch_us.to_be_bytes());
    // The payload is JSON text, which cannot hold a raw NUL (JSON escapes it as `\u0000`), so
    // the NUL scan of other text fields is skipped for the largest field of all.
    debug_assert!(!event.payload.contains('\0'));
    encode_field(event.payload.as_bytes(), buffer)
}

fn encode_text(value: &str, buffer: &mut Vec<u8>) -> Result<(), StoreError> {
    encode_field(text(value).as_bytes(), buffer)
}

fn encode_field(value: &[u8], buffer: &mut Vec<u8>) -> Result<(), StoreError> {
    let length = i32::try_from(value.len()).map_err(|_| {
        let cause = format!("text of {} bytes exceeds a COPY field", value.len());
        StoreError::new(BACKEND, "copy events", StoreErrorKind::Rejected, cause)
    })?;
    buffer.extend_from_slice(&length.to_be_bytes());
    buffer.extend_from_slice(value);
    Ok(())
}

/// PostgreSQL text cannot hold NUL (a decoded `\u0000` in a client's string): it becomes U+FFFD
/// instead of failing the whole batch.
fn text(value: &str) -> Cow<'_, str> {
    if value.contains('\0') {
        Cow::Owned(value.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(value)
    }
}

/// A day partition `events_YYYYMMDD` covering one UTC day.
struct DayPartition {
    name: String,
    /// Inclusive lower bound as a timestamptz literal.
    from: String,
    /// Exclusive upper bound.
    to: String,
}

impl DayPartition {
    /// `day` counts days since 1970-01-01; None outside the dates partitions are made for.
    fn new(day: i64) -> Option<DayPartition> {
        let start = civil_date(day)?;
        let end = civil_date(day + 1)?;
        let bound = |(year, month, day): (i32, u8, u8)| {
            format!("{year:04}-{month:02}-{day:02} 00:00:00+00")
        };
        let (year, month, day_of_month) = start;
        Some(DayPartition {
            name: format!("events_{year:04}{month:02}{day_of_month:02}"),
            from: bound(start),
            to: bound(end),
        })
    }

    /// The day (since 1970-01-01) of a partition named `events_YYYYMMDD`.
    fn day_of_name(name: &str) -> Option<i64> {
        let digits = name.strip_prefix("events_")?;
        if digits.len() != 8 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        let year: i32 = digits[0..4].parse().ok()?;
        let month: u8 = digits[4..6].parse().ok()?;
        let day: u8 = digits[6..8].parse().ok()?;
        let month = time::Month::try_from(month).ok()?;
        let date = time::Date::from_calendar_date(year, month, day).ok()?;
        let midnight = date.midnight().assume_utc();
        Some(midnight.unix_timestamp().div_euclid(86_400))
    }
}

/// Year, month and day of `day` days after 1970-01-01, for years 1000..=9999 (four digits keep
/// partition names sortable).
fn civil_date(day: i64) -> Option<(i32, u8, u8)> {
    let seconds = day.checked_mul(86_400)?;
    let date = time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()?
        .date();
    if !(1000..=9999).contains(&date.year()) {
        return None;
    }
    Some((date.year(), u8::from(date.month()), date.day()))
}

/// The first schema of a `search_path` setting, as PostgreSQL reads it: unquoted names are
/// lowercased, quoted ones kept; `$user` is not a schema to create.
fn first_schema(search_path: &str) -> Option<String> {
    let first = search_path.split(',').next()?.trim();
    if let Some(quoted) = first
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        let name = quoted.replace("\"\"", "\"");
        return (!name.is_empty() && name != "$user").then_some(name);
    }
    if first.is_empty() || first == "$user" {
        return None;
    }
    Some(first.to_lowercase())
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn parse_uuid(text: &str, operation: &'static str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text)
        .map_err(|error| StoreError::new(BACKEND, operation, StoreErrorKind::Rejected, error))
}

fn to_u32(value: i64, operation: &'static str) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| {
        let cause = format!("stored value {value} is outside 0..=4294967295");
        StoreError::new(BACKEND, operation, StoreErrorKind::Rejected, cause)
    })
}

/// Sorts a PostgreSQL failure by what the writer must do about it: data and constraint errors
/// fail the same way again; everything else (connection, shutdown, lock, resources) may pass.
fn classify(error: &::postgres::Error) -> StoreErrorKind {
    let Some(code) = error.code() else {
        return StoreErrorKind::Unavailable;
    };
    if *code == SqlState::UNIQUE_VIOLATION {
        return StoreErrorKind::Conflict;
    }
    match code.code().get(..2) {
        // 22: data exception; 23: integrity constraint; 54: program limit (a value too large).
        Some("22" | "23" | "54") => StoreErrorKind::Rejected,
        _ => StoreErrorKind::Unavailable,
    }
}

fn pg_error(operation: &'static str, error: ::postgres::Error) -> StoreError {
    // The driver's Display of a server error omits the detail; the source carries it.
    let cause = match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => error.to_string(),
    };
    StoreError::new(BACKEND, operation, classify(&error), cause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_partitions_cover_one_utc_day_and_round_trip_their_name() {
        // 2024-02-29 is day 19782 since the Unix epoch.
        let partition = DayPartition::new(19_782).unwrap();
        assert_eq!(partition.name, "events_20240229");
        assert_eq!(partition.from, "2024-02-29 00:00:00+00");
        assert_eq!(partition.to, "2024-03-01 00:00:00+00");
        assert_eq!(DayPartition::day_of_name(&partition.name), Some(19_782));
        assert_eq!(DayPartition::day_of_name("events_default"), None);
        assert_eq!(DayPartition::day_of_name("events_20241399"), None);
        assert_eq!(DayPartition::day_of_name("events_2024022"), None);
        assert!(DayPartition::new(i64::MAX).is_none());
        assert!(DayPartition::new(-800_000).is_none());
    }

    #[test]
    fn binary_copy_tuple_layout() {
        let event = EventRow {
            id: Uuid::from_u128(1),
            project_id: Uuid::from_u128(2),
            issue_id: Uuid::from_u128(3),
            level: "error".into(),
            received_at_us: POSTGRES_EPOCH_UNIX_US + 5,
            // JSON text: a NUL in a client's string arrives escaped, and is stored as sent.
            payload: "{\"m\":\"a\\u0000b\"}".to_string().into(),
        };
        let mut buffer = Vec::new();
        encode_event(&event, &mut buffer).unwrap();
        assert_eq!(&buffer[..2], &6i16.to_be_bytes());
        assert_eq!(&buffer[2..6], &16i32.to_be_bytes());
        assert_eq!(&buffer[6..22], Uuid::from_u128(1).as_bytes());
        let level_at = 2 + 3 * 20;
        assert_eq!(&buffer[level_at..level_at + 4], &5i32.to_be_bytes());
        assert_eq!(&buffer[level_at + 4..level_at + 9], b"error");
        let time_at = level_at + 9;
        assert_eq!(&buffer[time_at..time_at + 4], &8i32.to_be_bytes());
        assert_eq!(&buffer[time_at + 4..time_at + 12], &5i64.to_be_bytes());
        let payload = "{\"m\":\"a\\u0000b\"}";
        let payload_at = time_at + 12;
        let length = payload.len() as i32;
        assert_eq!(&buffer[payload_at..payload_at + 4], &length.to_be_bytes());
        assert_eq!(&buffer[payload_at + 4..], payload.as_bytes());
        assert_eq!(COPY_BINARY_HEADER.len(), 19);
    }

    #[test]
    fn first_schema_follows_postgres_identifier_rules() {
        assert_eq!(
            first_schema("Mesher_Test, public").as_deref(),
            Some("mesher_test")
        );
        assert_eq!(
            first_schema("\"My \"\"Schema\"\"\",public").as_deref(),
            Some("My \"Schema\"")
        );
        assert_eq!(first_schema("\"$user\", public"), None);
        assert_eq!(first_schema("$user"), None);
        assert_eq!(first_schema(""), None);
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn timestamp_sql_is_exact_integer_arithmetic() {
        assert_eq!(
            ts_from_us!("$1"),
            "(to_timestamp(0) + ($1 / 1000000) * interval '1 second' + ($1 % 1000000) * \
             interval '1 microsecond')"
        );
    }
}
