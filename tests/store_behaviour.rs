//! One behaviour suite for both storage backends: each check is written once as a function of a
//! database fixture and run against SQLite (a temporary directory) and PostgreSQL (`DATABASE_URL`,
//! else postgres://postgres@127.0.0.1:5432/test; each test works in its own schema, dropped at the
//! end, so tests run in parallel). An unreachable PostgreSQL fails its tests: run them through
//! `scripts/test-postgres.sh`, which provides a server.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesher::store::{
    open_postgres, open_sqlite, Backend, Change, EventRow, IssueRow, KeyRow, Overloaded,
    ProjectRow, RecentEvent, Scope, Snapshot, Store, StoreError, StoreErrorKind, WriterConfig,
};
use tokio::sync::oneshot;
use uuid::Uuid;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Longest a test waits for an ack or a reply before failing instead of hanging.
const REPLY_TIMEOUT_MS: u64 = 30_000;
const MICROS_PER_DAY: i64 = 86_400_000_000;
/// Received times used by the tests: arbitrary microseconds, deliberately not round.
const BASE_US: i64 = 1_712_345_678_901_234;

/// A database a test owns: `open` gives a new backend on the same data every time.
trait TestDb {
    fn open(&self) -> Box<dyn Backend>;
}

struct SqliteDb {
    dir: PathBuf,
}

impl SqliteDb {
    fn new() -> SqliteDb {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesher-store-test-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            Uuid::new_v4().simple()
        ));
        SqliteDb { dir }
    }
}

impl TestDb for SqliteDb {
    fn open(&self) -> Box<dyn Backend> {
        open_sqlite(&self.dir).expect("open SQLite")
    }
}

impl Drop for SqliteDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct PgDb {
    base_url: String,
    schema: String,
    url: String,
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string())
}

fn admin_client(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|error| {
        panic!(
            "PostgreSQL unreachable at {url}: {error}; set DATABASE_URL or run the tests \
             through scripts/test-postgres.sh"
        )
    })
}

/// `url` with a query parameter appended.
fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

impl PgDb {
    fn new() -> PgDb {
        let db = PgDb::unprepared();
        admin_client(&db.base_url)
            .batch_execute(&format!("CREATE SCHEMA {}", db.schema))
            .expect("create test schema");
        db
    }

    /// Names a schema without creating it.
    fn unprepared() -> PgDb {
        let base_url = database_url();
        let schema = format!("mesher_test_{}", Uuid::new_v4().simple());
        let url = with_param(
            &with_param(&base_url, &format!("options=-csearch_path%3D{schema}")),
            &format!("application_name={schema}"),
        );
        PgDb {
            base_url,
            schema,
            url,
        }
    }

    fn admin(&self) -> postgres::Client {
        admin_client(&self.url)
    }
}

impl TestDb for PgDb {
    fn open(&self) -> Box<dyn Backend> {
        open_postgres(&self.url).expect("open PostgreSQL")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.base_url, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn project(slug: &str) -> ProjectRow {
    // Numbers as the database would give them: distinct within the test process.
    static NEXT_NUMBER: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
    ProjectRow {
        id: Uuid::now_v7(),
        number: NEXT_NUMBER.fetch_add(1, Ordering::Relaxed),
        name: format!("Project {slug}"),
        slug: slug.to_string(),
        created_at_us: BASE_US,
        rate_limit_per_minute: 0,
        sample_rate: 1.0,
        retention_days: 90,
    }
}

fn key(project: &ProjectRow, scope: Scope, label: Option<&str>) -> KeyRow {
    KeyRow {
        id: Uuid::now_v7(),
        project_id: project.id,
        scope,
        label: label.map(str::to_string),
        key_hash: format!("{:064x}", Uuid::new_v4().as_u128()),
        revoked: false,
        created_at_us: BASE_US + 1,
    }
}

fn issue(project: &ProjectRow, fingerprint: &str) -> IssueRow {
    IssueRow {
        id: Uuid::now_v7(),
        project_id: project.id,
        fingerprint: mesher::ingest::fingerprint::hash(fingerprint),
        title: format!("Title of {fingerprint}"),
        level: "error".into(),
        status: "unresolved".to_string(),
        event_count: 1,
        first_seen_us: BASE_US,
        last_seen_us: BASE_US,
    }
}

fn event(issue: &IssueRow, received_at_us: i64, payload: &str) -> EventRow {
    EventRow {
        id: Uuid::now_v7(),
        project_id: issue.project_id,
        issue_id: issue.id,
        level: "error".into(),
        received_at_us,
        payload: payload.to_string().into(),
    }
}

fn migrated(db: &dyn TestDb) -> Box<dyn Backend> {
    let mut backend = db.open();
    backend.migrate().expect("migrate");
    backend
}

/// A project and one of its issues, committed.
fn seeded(backend: &mut dyn Backend, slug: &str) -> (ProjectRow, IssueRow) {
    let project = project(slug);
    let issue = issue(&project, &format!("fp-{slug}"));
    backend
        .commit(&[
            Change::Project(project.clone()),
            Change::Issue(issue.clone()),
        ])
        .expect("seed project and issue");
    (project, issue)
}

fn sorted(mut snapshot: Snapshot) -> Snapshot {
    snapshot.projects.sort_by_key(|row| row.id);
    snapshot.keys.sort_by_key(|row| row.id);
    snapshot.issues.sort_by_key(|row| row.id);
    snapshot
}

/// Waits for a oneshot reply, failing the test after `REPLY_TIMEOUT_MS`.
fn wait<T>(mut receiver: oneshot::Receiver<T>) -> T {
    let deadline = Instant::now() + Duration::from_millis(REPLY_TIMEOUT_MS);
    loop {
        match receiver.try_recv() {
            Ok(value) => return value,
            Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(error) => panic!("no reply within {REPLY_TIMEOUT_MS} ms: {error:?}"),
        }
    }
}

fn store_count(store: &Store, project_id: Option<Uuid>) -> u64 {
    let (reply, receiver) = oneshot::channel();
    store.count_events(project_id, reply);
    wait(receiver).expect("count events")
}

/// Writer settings: a flush every `flush_interval_ms` or at `batch_events_max` events, whichever
/// comes first, and at most `queue_events_max` events queued.
fn writer_config(
    flush_interval_ms: u64,
    batch_events_max: usize,
    queue_events_max: usize,
) -> WriterConfig {
    WriterConfig {
        flush_interval_ms,
        batch_events_max,
        queue_events_max,
        ..WriterConfig::default()
    }
}

fn slow_flush() -> WriterConfig {
    writer_config(60_000, 100_000, 1_000_000)
}

// ---------------------------------------------------------------------------------------------
// The suite, written once.

fn migrate_twice_is_idempotent(db: &dyn TestDb) {
    let mut backend = db.open();
    backend.migrate().expect("first migrate");
    backend
        .migrate()
        .expect("second migrate on the same connection");
    let mut again = db.open();
    again.migrate().expect("migrate from a new connection");
    assert_eq!(again.load().unwrap(), Snapshot::default());
    again.ping().expect("ping");
    again.reconnect().expect("reconnect while healthy");
    again.ping().expect("ping after reconnect");
}

fn commit_and_load_round_trip(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let mut shop = project("shop");
    shop.rate_limit_per_minute = u32::MAX;
    shop.sample_rate = 0.25;
    shop.retention_days = 7;
    shop.created_at_us = 253_402_300_799_999_999;
    let blog = project("blog");
    let mut revoked = key(&shop, Scope::Dashboard, None);
    revoked.revoked = true;
    let keys = [
        key(&shop, Scope::Ingest, Some("ci \"quoted\" ü")),
        revoked,
        key(&blog, Scope::Ingest, None),
    ];
    let mut crash = issue(&shop, "TypeError:x\nline two; 'quote' \\ back");
    crash.event_count = u64::from(u32::MAX) * 3;
    crash.status = "archived".to_string();
    crash.level = "fatal".to_string();
    crash.first_seen_us = -12_345_678_901_234_567;
    crash.last_seen_us = BASE_US + 999_999;
    let other = issue(&blog, "msg:hello");
    let mut batch = vec![Change::Project(shop.clone()), Change::Project(blog.clone())];
    batch.extend(keys.iter().cloned().map(Change::Key));
    batch.push(Change::Issue(crash.clone()));
    batch.push(Change::Issue(other.clone()));
    backend.commit(&batch).expect("commit");
    let expected = sorted(Snapshot {
        projects: vec![shop, blog],
        keys: keys.to_vec(),
        issues: vec![crash, other],
        recent_events: Vec::new(),
    });
    assert_eq!(sorted(backend.load().unwrap()), expected);
    assert_eq!(
        sorted(db.open().load().unwrap()),
        expected,
        "seen from a new connection"
    );
}

fn upsert_replaces_the_row(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (mut shop, mut crash) = seeded(backend.as_mut(), "shop");
    let mut ingest = key(&shop, Scope::Ingest, Some("sdk"));
    backend.commit(&[Change::Key(ingest.clone())]).unwrap();

    shop.name = "Shop renamed".to_string();
    shop.sample_rate = 0.5;
    shop.retention_days = 30;
    ingest.revoked = true;
    crash.status = "resolved".to_string();
    crash.event_count = 41;
    crash.last_seen_us = BASE_US + 10;
    let mut latest = crash.clone();
    latest.event_count = 42;
    latest.last_seen_us = BASE_US + 20;
    // The same issue twice in one batch: the last row wins.
    backend
        .commit(&[
            Change::Project(shop.clone()),
            Change::Issue(crash),
            Change::Key(ingest.clone()),
            Change::Issue(latest.clone()),
        ])
        .expect("upserts");
    let snapshot = backend.load().unwrap();
    assert_eq!(snapshot.projects, vec![shop]);
    assert_eq!(snapshot.keys, vec![ingest]);
    assert_eq!(snapshot.issues, vec![latest]);
}

fn duplicate_slug_is_a_conflict(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let shop = project("shop");
    backend.commit(&[Change::Project(shop.clone())]).unwrap();
    let error = backend
        .commit(&[Change::Project(project("shop"))])
        .expect_err("a second project with the same slug");
    assert!(error.is_conflict(), "{error}");
    assert!(!error.is_retryable(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(backend.name()),
        "names the backend: {message}"
    );
    assert!(
        message.contains("upsert projects"),
        "names the operation: {message}"
    );
    assert_eq!(backend.load().unwrap().projects, vec![shop.clone()]);
    // The connection is still usable after the refused transaction.
    backend
        .commit(&[Change::Project(project("shop-2"))])
        .unwrap();
    assert_eq!(backend.load().unwrap().projects.len(), 2);
}

fn latest_events_newest_first_with_limit(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let other = issue(&shop, "other");
    backend.commit(&[Change::Issue(other.clone())]).unwrap();
    let payloads = [
        r#"{"message":"plain"}"#,
        "{\"message\":\"tab\\t newline\\n \\\\ backslash \\\" quote\"}",
        "{\"message\":\"raw\ttab and\nnewline and \\\\N and \\\\. and ünïcödé 🚀\"}",
        r#"{"message":"\u0000 escaped nul stays text","extra":{"a":[1,2,3]}}"#,
        r#"{"message":"newest"}"#,
    ];
    let events: Vec<EventRow> = payloads
        .iter()
        .enumerate()
        .map(|(index, payload)| event(&crash, BASE_US + index as i64 * 1_000_003, payload))
        .collect();
    // Stored out of order and in two batches; the order comes from received_at.
    backend
        .commit(&[
            Change::Event(events[3].clone()),
            Change::Event(events[0].clone()),
        ])
        .unwrap();
    backend
        .commit(&[
            Change::Event(events[4].clone()),
            Change::Event(event(&other, BASE_US + 99_000_000, "{}")),
            Change::Event(events[1].clone()),
            Change::Event(events[2].clone()),
        ])
        .unwrap();
    let latest = backend.latest_events(crash.id, 3).unwrap();
    assert_eq!(
        latest,
        vec![events[4].clone(), events[3].clone(), events[2].clone()]
    );
    let all = backend.latest_events(crash.id, 100).unwrap();
    let expected: Vec<EventRow> = events.iter().rev().cloned().collect();
    assert_eq!(all, expected, "payloads come back byte for byte");
    assert_eq!(backend.latest_events(Uuid::now_v7(), 10).unwrap(), vec![]);
    assert_eq!(backend.count_events(Some(shop.id)).unwrap(), 6);
    assert_eq!(backend.count_events(Some(Uuid::now_v7())).unwrap(), 0);
    assert_eq!(backend.count_events(None).unwrap(), 6);
}

/// The events of the dedupe window, oldest first, of one project or of all; `load` includes
/// them, so a restart (or a takeover) remembers the ids.
fn recent_events_of_the_dedupe_window(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let (_, blog_issue) = seeded(backend.as_mut(), "blog");
    let now = now_us();
    let old = event(&crash, now - 10 * 60 * 1_000_000, "{}");
    let shop_new = event(&crash, now - 2_000_000, "{}");
    let shop_newer = event(&crash, now - 1_000_000, "{}");
    let blog_new = event(&blog_issue, now - 1_500_000, "{}");
    // Stored out of order: the order comes from received_at.
    backend
        .commit(&[
            Change::Event(shop_newer.clone()),
            Change::Event(old),
            Change::Event(blog_new.clone()),
            Change::Event(shop_new.clone()),
        ])
        .unwrap();
    let recent = |event: &EventRow| RecentEvent {
        project_id: event.project_id,
        id: event.id,
        received_at_us: event.received_at_us,
    };
    let since = now - 5 * 60 * 1_000_000;
    assert_eq!(
        backend.recent_events(None, since).unwrap(),
        vec![recent(&shop_new), recent(&blog_new), recent(&shop_newer)]
    );
    assert_eq!(
        backend.recent_events(Some(shop.id), since).unwrap(),
        vec![recent(&shop_new), recent(&shop_newer)]
    );
    assert_eq!(
        backend.recent_events(Some(Uuid::now_v7()), since).unwrap(),
        vec![]
    );
    assert_eq!(
        backend.load().unwrap().recent_events,
        vec![recent(&shop_new), recent(&blog_new), recent(&shop_newer)]
    );
}

fn a_batch_is_one_transaction(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let blog = project("blog");
    let mut renamed = crash.clone();
    renamed.title = "must not stick".to_string();
    let batch = vec![
        Change::Project(blog.clone()),
        Change::Issue(renamed),
        Change::Event(event(&crash, BASE_US, "{}")),
        Change::Event(event(&crash, BASE_US + 1, "{}")),
        Change::Key(key(&blog, Scope::Ingest, None)),
        // Refused: the slug is taken.
        Change::Project(project("shop")),
    ];
    let error = backend
        .commit(&batch)
        .expect_err("the batch holds a refused row");
    assert!(error.is_conflict(), "{error}");
    let snapshot = backend.load().unwrap();
    assert_eq!(snapshot.projects, vec![shop]);
    assert_eq!(snapshot.issues, vec![crash]);
    assert!(snapshot.keys.is_empty());
    assert_eq!(backend.count_events(None).unwrap(), 0);
}

fn store_acks_after_commit(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let config = writer_config(20, 1_000, 10_000);
    let (store, snapshot) = Store::start(db.open(), config).unwrap();
    assert_eq!(snapshot.projects, vec![shop.clone()]);
    let mut receivers = Vec::new();
    for index in 0..10 {
        let (ack, receiver) = oneshot::channel();
        let mut updated = crash.clone();
        updated.event_count = index + 1;
        let changes = vec![
            Change::Issue(updated),
            Change::Event(event(&crash, BASE_US + index as i64, "{}")),
        ];
        store
            .try_submit(changes, Some(ack))
            .expect("queue has room");
        receivers.push(receiver);
    }
    for receiver in receivers {
        wait(receiver).expect("committed");
    }
    // Acked means committed: a separate connection sees every row.
    let mut reader = db.open();
    assert_eq!(reader.count_events(Some(shop.id)).unwrap(), 10);
    assert_eq!(reader.load().unwrap().issues[0].event_count, 10);
    let stats = store.stats();
    assert_eq!(stats.queue_depth_events, 0);
    assert_eq!(stats.events_committed, 10);
    assert_eq!(stats.rows_committed, 20);
    assert!(
        stats.batches_committed >= 1 && stats.batches_committed <= 10,
        "{stats:?}"
    );
    assert_eq!(stats.flush_latency_us_count, stats.batches_committed);
    assert_eq!(stats.batch_rows_sum, 20);
    assert_eq!(stats.commit_failures, 0);
    assert!(store.healthy());
    store.shutdown();
}

/// A real backend with a hook before every commit (which may hold the commit, or fail it as an
/// unreachable database would) and one before every reconnect.
struct Hooked {
    inner: Box<dyn Backend>,
    before_commit: Box<dyn FnMut(&'static str) -> Result<(), StoreError> + Send>,
    before_reconnect: Box<dyn FnMut() + Send>,
}

impl Backend for Hooked {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn migrate(&mut self) -> Result<(), StoreError> {
        self.inner.migrate()
    }
    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }
    fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError> {
        (self.before_commit)(self.inner.name())?;
        self.inner.commit(batch)
    }
    fn has_issue(&mut self, issue_id: Uuid) -> Result<bool, StoreError> {
        self.inner.has_issue(issue_id)
    }
    fn recent_events(
        &mut self,
        project_id: Option<Uuid>,
        since_us: i64,
    ) -> Result<Vec<RecentEvent>, StoreError> {
        self.inner.recent_events(project_id, since_us)
    }
    fn latest_events(&mut self, issue_id: Uuid, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        self.inner.latest_events(issue_id, limit)
    }
    fn count_events(&mut self, project_id: Option<Uuid>) -> Result<u64, StoreError> {
        self.inner.count_events(project_id)
    }
    fn next_project_number(&mut self) -> Result<i64, StoreError> {
        self.inner.next_project_number()
    }
    fn maintain(&mut self, now_us: i64) -> Result<(), StoreError> {
        self.inner.maintain(now_us)
    }
    fn ping(&mut self) -> Result<(), StoreError> {
        self.inner.ping()
    }
    fn reconnect(&mut self) -> Result<(), StoreError> {
        (self.before_reconnect)();
        self.inner.reconnect()
    }
}

fn store_refuses_past_the_queue_bound(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    // Holds every commit until opened, to fill the queue deterministically.
    let open = Arc::new((Mutex::new(false), Condvar::new()));
    let gate = Arc::clone(&open);
    let gated = Hooked {
        inner: db.open(),
        before_commit: Box::new(move |_| {
            let (open, changed) = &*gate;
            let mut guard = open.lock().unwrap();
            while !*guard {
                guard = changed.wait(guard).unwrap();
            }
            Ok(())
        }),
        before_reconnect: Box::new(|| {}),
    };
    let config = writer_config(5, 2, 5);
    let (store, _) = Store::start(Box::new(gated), config).unwrap();
    let submit = |count: usize| {
        let changes = (0..count)
            .map(|_| Change::Event(event(&crash, now_us(), "{}")))
            .collect();
        let (ack, receiver) = oneshot::channel();
        store.try_submit(changes, Some(ack)).map(|()| receiver)
    };
    let mut accepted = vec![submit(2).unwrap(), submit(3).unwrap()];
    assert_eq!(store.stats().queue_depth_events, 5);
    assert_eq!(submit(1).unwrap_err(), Overloaded, "5 queued + 1 > 5");
    assert_eq!(submit(6).unwrap_err(), Overloaded);
    // Changes without events still fit; `submit` queues whatever the depth.
    let (ack, status_change) = oneshot::channel();
    store
        .try_submit(vec![Change::Issue(crash.clone())], Some(ack))
        .unwrap();
    store.submit(vec![Change::Event(event(&crash, now_us(), "{}"))], None);
    assert_eq!(store.stats().queue_depth_events, 6);
    assert!(submit(1).is_err());

    *open.0.lock().unwrap() = true;
    open.1.notify_all();
    for receiver in accepted.drain(..) {
        wait(receiver).expect("committed once the gate opens");
    }
    wait(status_change).expect("committed");
    assert_eq!(store_count(&store, Some(shop.id)), 6);
    assert_eq!(store.stats().queue_depth_events, 0);
    wait(submit(5).expect("room again after the commits")).expect("committed");
    assert_eq!(store_count(&store, Some(shop.id)), 11);
    assert_eq!(store.stats().queue_depth_events, 0);
    store.shutdown();
}

fn store_reads_follow_earlier_submissions(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    // Nothing would be flushed by time or size during the test: reads must flush first.
    let (store, _) = Store::start(db.open(), slow_flush()).unwrap();
    let mut newest = None;
    for index in 0..25 {
        let row = event(&crash, BASE_US + index, &format!("{{\"n\":{index}}}"));
        newest = Some(row.clone());
        store.try_submit(vec![Change::Event(row)], None).unwrap();
    }
    assert_eq!(store.stats().queue_depth_events, 25);
    assert_eq!(store_count(&store, Some(shop.id)), 25);
    assert_eq!(store_count(&store, None), 25);
    store.submit(vec![Change::Event(event(&crash, BASE_US - 1, "{}"))], None);
    let (reply, receiver) = oneshot::channel();
    store.latest_events(crash.id, 2, reply);
    let latest = wait(receiver).unwrap();
    assert_eq!(latest.len(), 2);
    assert_eq!(latest[0], newest.unwrap());
    assert_eq!(store_count(&store, None), 26);
    store.shutdown();
}

fn shutdown_flushes_everything(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let (store, _) = Store::start(db.open(), slow_flush()).unwrap();
    const SUBMITTED: u64 = 1_000;
    let submitters: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let crash = crash.clone();
            std::thread::spawn(move || {
                for _ in 0..SUBMITTED / 4 {
                    let row = event(&crash, now_us(), r#"{"message":"x"}"#);
                    store.try_submit(vec![Change::Event(row)], None).unwrap();
                }
            })
        })
        .collect();
    for submitter in submitters {
        submitter.join().unwrap();
    }
    store.shutdown();
    store.shutdown();
    assert_eq!(db.open().count_events(Some(shop.id)).unwrap(), SUBMITTED);
    assert_eq!(store.stats().events_committed, SUBMITTED);
    assert_eq!(store.stats().queue_depth_events, 0);
    // After shutdown nothing is accepted, and an ack says why.
    let (ack, receiver) = oneshot::channel();
    let refused = store.try_submit(
        vec![Change::Event(event(&crash, now_us(), "{}"))],
        Some(ack),
    );
    assert_eq!(refused, Err(Overloaded));
    assert_eq!(wait(receiver).unwrap_err().kind(), StoreErrorKind::Closed);
    let (reply, receiver) = oneshot::channel();
    store.count_events(None, reply);
    assert_eq!(wait(receiver).unwrap_err().kind(), StoreErrorKind::Closed);
}

fn store_retries_failed_commits_without_loss(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let reconnects = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    // Fails the first 3 commits as an unreachable database would.
    let mut failures = 3;
    let (counted, flagged) = (Arc::clone(&reconnects), Arc::clone(&failing));
    let flaky = Hooked {
        inner: db.open(),
        before_commit: Box::new(move |backend| {
            flagged.store(failures > 0, Ordering::SeqCst);
            if failures == 0 {
                return Ok(());
            }
            failures -= 1;
            Err(StoreError::new(
                backend,
                "commit",
                StoreErrorKind::Unavailable,
                "connection refused",
            ))
        }),
        before_reconnect: Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }),
    };
    let config = writer_config(5, 1_000, 1_000);
    let (store, _) = Store::start(Box::new(flaky), config).unwrap();
    let (ack, receiver) = oneshot::channel();
    store
        .try_submit(
            vec![Change::Event(event(&crash, now_us(), "{}"))],
            Some(ack),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(REPLY_TIMEOUT_MS);
    while store.healthy() {
        assert!(
            Instant::now() < deadline,
            "a failing commit marks the store unhealthy"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Submissions keep queueing during the outage.
    for _ in 0..9 {
        store
            .try_submit(vec![Change::Event(event(&crash, now_us(), "{}"))], None)
            .unwrap();
    }
    let started = Instant::now();
    wait(receiver).expect("committed after the retries");
    // Backoff 100 + 200 + 400 ms before the fourth attempt.
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(store.healthy());
    assert!(!failing.load(Ordering::SeqCst));
    assert_eq!(
        reconnects.load(Ordering::SeqCst),
        3,
        "reconnect before every retry"
    );
    assert_eq!(store_count(&store, Some(shop.id)), 10);
    let stats = store.stats();
    assert_eq!(stats.commit_failures, 3);
    assert_eq!(stats.rows_rejected, 0);
    store.shutdown();
}

fn store_rejects_only_the_refused_submission(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let (store, _) = Store::start(db.open(), slow_flush()).unwrap();
    let mut receivers = Vec::new();
    for slug in ["first", "shop", "last"] {
        let (ack, receiver) = oneshot::channel();
        let changes = vec![
            Change::Project(project(slug)),
            Change::Event(event(&crash, now_us(), "{}")),
        ];
        store.try_submit(changes, Some(ack)).unwrap();
        receivers.push(receiver);
    }
    assert_eq!(store_count(&store, Some(shop.id)), 2);
    let outcomes: Vec<Result<(), StoreError>> = receivers.into_iter().map(wait).collect();
    assert!(outcomes[0].is_ok());
    assert!(outcomes[1].as_ref().unwrap_err().is_conflict());
    assert!(outcomes[2].is_ok());
    assert_eq!(store.stats().rows_rejected, 2);
    assert!(store.healthy(), "a refused row is not an outage");
    store.shutdown();
    let slugs: Vec<String> = db
        .open()
        .load()
        .unwrap()
        .projects
        .into_iter()
        .map(|p| p.slug)
        .collect();
    assert_eq!(slugs.len(), 3);
    assert!(slugs.contains(&"first".to_string()) && slugs.contains(&"last".to_string()));
}

fn retention_deletes_old_events_of_that_project_only(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let now = now_us();
    let mut short = project("short");
    short.retention_days = 1;
    let long = project("long");
    let mut forever = project("forever");
    forever.retention_days = 0;
    let mut batch = Vec::new();
    let mut issues = Vec::new();
    for project in [&short, &long, &forever] {
        let issue = issue(project, "fp");
        batch.push(Change::Project(project.clone()));
        batch.push(Change::Issue(issue.clone()));
        for age_days in [0, 2, 10, 400] {
            batch.push(Change::Event(event(
                &issue,
                now - age_days * MICROS_PER_DAY,
                "{}",
            )));
        }
        issues.push(issue);
    }
    backend.commit(&batch).unwrap();
    backend.maintain(now).expect("maintain");
    assert_eq!(backend.count_events(Some(short.id)).unwrap(), 1);
    assert_eq!(backend.count_events(Some(long.id)).unwrap(), 3);
    assert_eq!(backend.count_events(Some(forever.id)).unwrap(), 4);
    let kept = backend.latest_events(issues[0].id, 10).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].received_at_us, now);
    backend.maintain(now).expect("maintain is repeatable");
    assert_eq!(backend.count_events(None).unwrap(), 8);
}

/// Numbers come from the database, increase, survive a new connection and are never given out
/// twice; one taken twice in rows is refused.
fn project_numbers_are_unique_and_never_reused(db: &dyn TestDb) {
    let mut backend = migrated(db);
    let first = backend.next_project_number().expect("first number");
    let second = backend.next_project_number().expect("second number");
    assert!(first >= 1 && second > first, "{first}, {second}");
    let mut shop = project("numbered-shop");
    shop.number = second;
    backend.commit(&[Change::Project(shop.clone())]).unwrap();
    drop(backend);
    let mut again = migrated(db);
    let third = again.next_project_number().expect("number after reopening");
    assert!(third > second, "{third} after {second}");
    let loaded = again.load().unwrap().projects;
    assert_eq!(
        loaded.iter().find(|p| p.id == shop.id).unwrap().number,
        second
    );
    let mut taken = project("numbered-twice");
    taken.number = second;
    let error = again.commit(&[Change::Project(taken)]).unwrap_err();
    assert!(error.is_conflict(), "{error}");
    // An update of the project keeps its number.
    let mut renamed = shop.clone();
    renamed.name = "Renamed".into();
    again.commit(&[Change::Project(renamed)]).unwrap();
    let loaded = again.load().unwrap().projects;
    assert_eq!(
        loaded.iter().find(|p| p.id == shop.id).unwrap().number,
        second
    );
}

macro_rules! behaviour_suite {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $check() {
                    super::$check(&super::SqliteDb::new());
                }
            )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $check() {
                    super::$check(&super::PgDb::new());
                }
            )*
        }
    };
}

behaviour_suite!(
    migrate_twice_is_idempotent,
    commit_and_load_round_trip,
    upsert_replaces_the_row,
    duplicate_slug_is_a_conflict,
    latest_events_newest_first_with_limit,
    recent_events_of_the_dedupe_window,
    a_batch_is_one_transaction,
    store_acks_after_commit,
    store_refuses_past_the_queue_bound,
    store_reads_follow_earlier_submissions,
    shutdown_flushes_everything,
    store_retries_failed_commits_without_loss,
    store_rejects_only_the_refused_submission,
    retention_deletes_old_events_of_that_project_only,
    project_numbers_are_unique_and_never_reused,
);

// ---------------------------------------------------------------------------------------------
// PostgreSQL only.

/// The partition a stored event sits in.
fn partition_of(client: &mut postgres::Client, event_id: Uuid) -> String {
    client
        .query_one(
            "SELECT c.relname::text FROM events e JOIN pg_class c ON c.oid = e.tableoid
             WHERE e.id = $1::text::uuid",
            &[&event_id.to_string()],
        )
        .unwrap()
        .get(0)
}

fn partition_name(day: i64) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(day * 86_400)
        .unwrap()
        .date();
    format!(
        "events_{:04}{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

#[test]
fn postgres_partitions_ahead_and_default_partition() {
    let db = PgDb::new();
    let mut backend = migrated(&db);
    let now = now_us();
    backend.maintain(now).unwrap();
    let mut admin = db.admin();
    let partitions: Vec<String> = admin
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'events'::regclass ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let today = now.div_euclid(MICROS_PER_DAY);
    let mut expected: Vec<String> = (today..=today + 3).map(partition_name).collect();
    expected.push("events_default".to_string());
    assert_eq!(partitions, expected);
    let in_schema: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename LIKE 'events%'",
            &[&db.schema],
        )
        .unwrap()
        .get(0);
    assert_eq!(in_schema, 6, "tables land in the search_path schema");

    // Kept forever, so housekeeping at a future date below deletes nothing.
    let mut shop = project("shop");
    shop.retention_days = 0;
    let crash = issue(&shop, "fp");
    backend
        .commit(&[Change::Project(shop), Change::Issue(crash.clone())])
        .unwrap();
    let current = event(&crash, now, "{}");
    // 2100-01-01 12:00 UTC and 1990-06-15 UTC: no partition for either.
    let future_day = 47_482;
    let future = event(
        &crash,
        future_day * MICROS_PER_DAY + MICROS_PER_DAY / 2,
        "{}",
    );
    let past = event(&crash, 7_470 * MICROS_PER_DAY, "{}");
    let batch: Vec<Change> = [&current, &future, &past]
        .into_iter()
        .map(|row| Change::Event(row.clone()))
        .collect();
    backend.commit(&batch).unwrap();
    assert_eq!(partition_of(&mut admin, current.id), partition_name(today));
    assert_eq!(partition_of(&mut admin, future.id), "events_default");
    assert_eq!(partition_of(&mut admin, past.id), "events_default");

    // A partition made later takes its day's rows out of the default partition.
    backend.maintain(future_day * MICROS_PER_DAY).unwrap();
    assert_eq!(partition_of(&mut admin, future.id), "events_21000101");
    assert_eq!(partition_of(&mut admin, past.id), "events_default");
    let latest = backend.latest_events(crash.id, 10).unwrap();
    assert_eq!(latest, vec![future, current, past]);
}

#[test]
fn postgres_drops_partitions_past_every_retention() {
    let db = PgDb::new();
    let mut backend = migrated(&db);
    let mut shop = project("shop");
    shop.retention_days = 2;
    let crash = issue(&shop, "fp");
    backend
        .commit(&[Change::Project(shop.clone()), Change::Issue(crash.clone())])
        .unwrap();
    let now = now_us();
    let today = now.div_euclid(MICROS_PER_DAY);
    // Partitions for ten days ago onwards, as if the server had run all along.
    backend.maintain((today - 10) * MICROS_PER_DAY).unwrap();
    backend.maintain((today - 5) * MICROS_PER_DAY).unwrap();
    let old = event(&crash, (today - 10) * MICROS_PER_DAY + 5, "{}");
    let recent = event(&crash, now, "{}");
    backend
        .commit(&[Change::Event(old.clone()), Change::Event(recent.clone())])
        .unwrap();
    backend.maintain(now).unwrap();
    let mut admin = db.admin();
    let exists = |admin: &mut postgres::Client, name: &str| -> bool {
        admin
            .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&name])
            .unwrap()
            .get(0)
    };
    assert!(!exists(&mut admin, &partition_name(today - 10)));
    assert!(
        !exists(&mut admin, &partition_name(today - 3)),
        "whole day before the cutoff"
    );
    assert!(
        exists(&mut admin, &partition_name(today - 2)),
        "holds the cutoff"
    );
    assert!(exists(&mut admin, &partition_name(today)));
    assert_eq!(backend.latest_events(crash.id, 10).unwrap(), vec![recent]);
}

#[test]
fn postgres_creates_the_search_path_schema() {
    let db = PgDb::unprepared();
    let mut backend = migrated(&db);
    backend.commit(&[Change::Project(project("shop"))]).unwrap();
    let mut admin = admin_client(&db.base_url);
    let projects: i64 = admin
        .query_one(&format!("SELECT count(*) FROM {}.projects", db.schema), &[])
        .unwrap()
        .get(0);
    assert_eq!(projects, 1);
}

/// A schema from before project numbers: its projects are numbered in creation order, and
/// the sequence goes on after them.
#[test]
fn postgres_numbers_the_projects_of_an_older_schema() {
    let db = PgDb::new();
    drop(migrated(&db));
    let mut admin = db.admin();
    admin
        .batch_execute(
            "ALTER TABLE projects DROP COLUMN number;
             DELETE FROM schema_migrations WHERE version = 3;
             INSERT INTO projects (id, name, slug, created_at, rate_limit_per_minute, sample_rate,
                 retention_days)
             VALUES ('00000000-0000-0000-0000-000000000002', 'Newer', 'newer',
                     '2024-02-01T00:00:00Z', 0, 1, 90),
                    ('00000000-0000-0000-0000-000000000001', 'Older', 'older',
                     '2024-01-01T00:00:00Z', 0, 1, 90);",
        )
        .expect("a schema without project numbers");
    let mut backend = migrated(&db);
    let numbers: Vec<(String, i64)> = backend
        .load()
        .unwrap()
        .projects
        .iter()
        .map(|project| (project.slug.clone(), project.number))
        .collect();
    assert_eq!(
        numbers,
        [("older".to_string(), 1), ("newer".to_string(), 2)]
    );
    assert_eq!(backend.next_project_number().unwrap(), 3);
    // Two servers sharing the database never get the same number.
    let mut second = db.open();
    let (a, b) = (
        backend.next_project_number().unwrap(),
        second.next_project_number().unwrap(),
    );
    assert!(a != b && a > 3 && b > 3, "{a}, {b}");
}

#[test]
fn postgres_does_not_write_a_committed_batch_twice() {
    let db = PgDb::new();
    let mut backend = migrated(&db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let batch = vec![
        Change::Event(event(&crash, BASE_US, "{}")),
        Change::Event(event(&crash, BASE_US + 1, "{}")),
    ];
    backend.commit(&batch).unwrap();
    // A failed commit leaves the outcome of the one before it in doubt...
    backend
        .commit(&[Change::Project(project("shop"))])
        .expect_err("duplicate slug");
    // ...so a retry of a stored batch is recognised and not written again.
    backend.commit(&batch).unwrap();
    assert_eq!(backend.count_events(Some(shop.id)).unwrap(), 2);
    // Fresh batches are written as usual.
    backend
        .commit(&[Change::Event(event(&crash, BASE_US + 2, "{}"))])
        .unwrap();
    assert_eq!(backend.count_events(Some(shop.id)).unwrap(), 3);
}

#[test]
fn postgres_store_survives_a_killed_connection() {
    let db = PgDb::new();
    let mut backend = migrated(&db);
    let (shop, crash) = seeded(backend.as_mut(), "shop");
    let config = writer_config(5, 1_000, 10_000);
    let (store, _) = Store::start(db.open(), config).unwrap();
    let submit_and_wait = |count: usize| {
        let changes = (0..count)
            .map(|_| Change::Event(event(&crash, now_us(), "{}")))
            .collect();
        let (ack, receiver) = oneshot::channel();
        store.try_submit(changes, Some(ack)).unwrap();
        wait(receiver).expect("committed");
    };
    submit_and_wait(5);
    let mut admin = admin_client(&db.base_url);
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()) terminated",
            &[&db.schema],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the store's connection was found and ended");
    submit_and_wait(5);
    assert_eq!(store_count(&store, Some(shop.id)), 10);
    assert!(store.healthy());
    assert!(store.stats().commit_failures >= 1);
    store.shutdown();
}
