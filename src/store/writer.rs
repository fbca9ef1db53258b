//! `Store`: the reactors' non-blocking handle, and the writer thread behind it.
//!
//! The handle only counts and queues; the writer thread owns the backend. It groups submissions
//! into batches (one transaction each), fires every submission's ack after the commit that holds
//! it (group commit), and answers reads only after everything submitted before them is
//! committed. A failed commit keeps its batch and is retried with backoff until it succeeds;
//! meanwhile new submissions wait in the queue until its bound makes `try_submit` refuse.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::{
    now_us, recent_since_us, Backend, Change, EventRow, IssueRow, RecentEvent, Snapshot,
    StoreError, StoreErrorKind,
};

/// One project's stored state, for a node taking it over.
#[derive(Debug)]
pub struct ProjectRows {
    pub issues: Vec<IssueRow>,
    pub recent_events: Vec<RecentEvent>,
}

/// First wait after a failed commit; doubled after each further failure.
const RETRY_BACKOFF_INITIAL_MS: u64 = 100;
/// Longest wait between retries, so recovery is noticed within this once the database is back.
const RETRY_BACKOFF_MAX_MS: u64 = 2_000;
/// How long shutdown keeps retrying an unreachable database before it gives up on the rows still
/// queued (and logs how many); without a bound a dead database would hang the exit forever.
const SHUTDOWN_COMMIT_DEADLINE_MS: u64 = 15_000;
/// Housekeeping (partitions ahead, retention) runs this often.
const MAINTAIN_INTERVAL_MS: u64 = 3_600_000;
/// After a failed housekeeping run, the next try comes this much sooner than the hourly one.
const MAINTAIN_RETRY_INTERVAL_MS: u64 = 60_000;
/// A batch also closes at this many changes per allowed event: a submission carries an event
/// and its issue upsert, and a flood of admin or status changes must not grow one transaction
/// without bound.
const BATCH_CHANGES_PER_EVENT_MAX: usize = 4;

/// Default of `WriterConfig::flush_interval_ms` (and of `--flush-interval-ms`).
pub const FLUSH_INTERVAL_MS_DEFAULT: u64 = 50;
/// Default of `WriterConfig::batch_events_max` (and of `--batch-events`). Large, because the
/// writer falls behind mostly when events land in many issues: each transaction rewrites every
/// index page it touches, so the more events share a transaction, the fewer pages are written
/// per event. A writer that keeps up commits every flush interval anyway.
pub const BATCH_EVENTS_DEFAULT: usize = 10_000;
/// Default of `WriterConfig::queue_events_max` (and of `--queue-events`).
pub const QUEUE_EVENTS_DEFAULT: usize = 100_000;
/// Default of `WriterConfig::queue_bytes_max` (and of `--queue-bytes`): the events' JSON
/// waiting for storage. Typical events are a few KiB, so this holds tens of thousands of them;
/// what it stops is megabyte events piling up faster than storage takes them.
pub const QUEUE_BYTES_DEFAULT: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// A submission waits at most this long before its batch is committed.
    pub flush_interval_ms: u64,
    /// A batch is committed as soon as it holds this many events.
    pub batch_events_max: usize,
    /// Events queued and not yet committed beyond which `try_submit` answers `Overloaded`.
    pub queue_events_max: usize,
    /// Bytes of event JSON queued and not yet committed beyond which the same holds.
    pub queue_bytes_max: usize,
}

impl Default for WriterConfig {
    fn default() -> WriterConfig {
        WriterConfig {
            flush_interval_ms: FLUSH_INTERVAL_MS_DEFAULT,
            batch_events_max: BATCH_EVENTS_DEFAULT,
            queue_events_max: QUEUE_EVENTS_DEFAULT,
            queue_bytes_max: QUEUE_BYTES_DEFAULT,
        }
    }
}

/// Fired with the commit's outcome once the submission is in storage (or refused).
pub type Ack = oneshot::Sender<Result<(), StoreError>>;

/// The storage queue is full (or the writer has stopped): nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("storage queue full")
    }
}

impl std::error::Error for Overloaded {}

/// Counters of the writer, read from atomics (each one is exact, together they are not a
/// single instant's picture).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Events submitted and not yet committed (or refused).
    pub queue_depth_events: u64,
    pub queue_depth_bytes: u64,
    pub batches_committed: u64,
    /// Changes committed, events included.
    pub rows_committed: u64,
    pub events_committed: u64,
    /// Changes the database refused for good (their acks got the error), or given up at
    /// shutdown because the database stayed unreachable.
    pub rows_rejected: u64,
    /// Failed commit attempts, retried ones included.
    pub commit_failures: u64,
    /// Time spent in successful commits; with `flush_latency_us_count` it gives the mean.
    pub flush_latency_us_sum: u64,
    pub flush_latency_us_count: u64,
    /// Changes per committed batch, summed; divided by `batches_committed` it is the mean batch
    /// size.
    pub batch_rows_sum: u64,
}

enum Command {
    Submit {
        changes: Vec<Change>,
        events: usize,
        ack: Option<Ack>,
    },
    LatestEvents {
        issue_id: Uuid,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<EventRow>, StoreError>>,
    },
    CountEvents {
        project_id: Option<Uuid>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    NextProjectNumber {
        reply: oneshot::Sender<Result<i64, StoreError>>,
    },
    ProjectIssues {
        project_id: Uuid,
        reply: oneshot::Sender<Result<ProjectRows, StoreError>>,
    },
    HasIssue {
        issue_id: Uuid,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Run the retention pass after this take's commit instead of at the next hourly one.
    ApplyRetention,
    Shutdown,
}

#[derive(Default)]
struct Shared {
    queue_depth_events: AtomicUsize,
    queue_depth_bytes: AtomicUsize,
    healthy: AtomicBool,
    shutdown_requested: AtomicBool,
    batches_committed: AtomicU64,
    rows_committed: AtomicU64,
    events_committed: AtomicU64,
    rows_rejected: AtomicU64,
    commit_failures: AtomicU64,
    flush_latency_us_sum: AtomicU64,
    flush_latency_us_count: AtomicU64,
    batch_rows_sum: AtomicU64,
}

/// Handle to the writer thread: cheap to clone, safe to share, and its submit and query methods
/// never block.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Arc<Inbox>,
    shared: Arc<Shared>,
    queue_events_max: usize,
    queue_bytes_max: usize,
    backend_name: &'static str,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    /// Migrates and loads on the calling thread, then hands the backend to the writer thread.
    pub fn start(
        mut backend: Box<dyn Backend>,
        config: WriterConfig,
    ) -> Result<(Store, Snapshot), StoreError> {
        assert!(
            config.flush_interval_ms > 0,
            "flush interval must be positive"
        );
        assert!(
            config.batch_events_max > 0,
            "batch must hold at least one event"
        );
        assert!(
            config.queue_events_max > 0,
            "queue must hold at least one event"
        );
        backend.migrate()?;
        let snapshot = backend.load()?;
        let backend_name = backend.name();
        let shared = Arc::new(Shared::default());
        shared.healthy.store(true, Ordering::Release);
        let commands = Arc::new(Inbox::new(config.batch_events_max));
        let writer = Writer {
            backend,
            commands: Arc::clone(&commands),
            shared: Arc::clone(&shared),
            config,
            pending: Pending::default(),
            next_maintain_at: Instant::now(),
        };
        let writer_thread = std::thread::Builder::new()
            .name(format!("mesher-store-{backend_name}"))
            .spawn(move || writer.run())
            .map_err(|error| {
                StoreError::new(
                    backend_name,
                    "start writer thread",
                    StoreErrorKind::Unavailable,
                    error,
                )
            })?;
        let inner = Inner {
            commands,
            shared,
            queue_events_max: config.queue_events_max,
            queue_bytes_max: config.queue_bytes_max,
            backend_name,
            writer_thread: Mutex::new(Some(writer_thread)),
        };
        Ok((
            Store {
                inner: Arc::new(inner),
            },
            snapshot,
        ))
    }

    pub fn backend_name(&self) -> &'static str {
        self.inner.backend_name
    }

    /// Whether `events` more, of `bytes` of JSON, would fit in the queue now: for a caller that
    /// must decide before it commits to its own state changes (and then submits what they made,
    /// whatever came between).
    pub fn has_room(&self, events: usize, bytes: usize) -> bool {
        let shared = &self.inner.shared;
        let depth_events = shared.queue_depth_events.load(Ordering::Acquire);
        let depth_bytes = shared.queue_depth_bytes.load(Ordering::Acquire);
        depth_events.saturating_add(events) <= self.inner.queue_events_max
            && depth_bytes.saturating_add(bytes) <= self.inner.queue_bytes_max
    }

    /// Queues the changes unless their events would take the queue past `queue_events_max`
    /// or `queue_bytes_max`; then nothing is queued and the caller answers 503.
    pub fn try_submit(&self, changes: Vec<Change>, ack: Option<Ack>) -> Result<(), Overloaded> {
        let load = Load::of(&changes);
        let shared = &self.inner.shared;
        let reserve = |depth: &AtomicUsize, amount: usize, limit: usize| {
            depth
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |before| {
                    let after = before.checked_add(amount)?;
                    (after <= limit).then_some(after)
                })
                .is_ok()
        };
        if !reserve(
            &shared.queue_depth_events,
            load.events,
            self.inner.queue_events_max,
        ) {
            return Err(Overloaded);
        }
        if !reserve(
            &shared.queue_depth_bytes,
            load.bytes,
            self.inner.queue_bytes_max,
        ) {
            shared
                .queue_depth_events
                .fetch_sub(load.events, Ordering::AcqRel);
            return Err(Overloaded);
        }
        self.send_submission(changes, load, ack)
            .map_err(|()| Overloaded)
    }

    /// Queues the changes whatever the queue depth: for the few admin and status changes that
    /// must not be refused.
    pub fn submit(&self, changes: Vec<Change>, ack: Option<Ack>) {
        let load = Load::of(&changes);
        self.inner.shared.add(load);
        if self.send_submission(changes, load, ack).is_err() {
            tracing::error!(
                backend = self.inner.backend_name,
                "change submitted after the store stopped; not written"
            );
        }
    }

    /// Sends a submission whose load is already counted in the depth; when the writer has
    /// stopped, uncounts it and fails the ack.
    fn send_submission(
        &self,
        changes: Vec<Change>,
        load: Load,
        ack: Option<Ack>,
    ) -> Result<(), ()> {
        let command = Command::Submit {
            changes,
            events: load.events,
            ack,
        };
        let Err(command) = self.inner.commands.send(command) else {
            return Ok(());
        };
        self.inner.shared.remove(load);
        if let Command::Submit { ack: Some(ack), .. } = command {
            let _ = ack.send(Err(self.closed_error("submit")));
        }
        Err(())
    }

    /// The newest `limit` events of an issue, answered after everything submitted before it is
    /// committed.
    pub fn latest_events(
        &self,
        issue_id: Uuid,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<EventRow>, StoreError>>,
    ) {
        let command = Command::LatestEvents {
            issue_id,
            limit,
            reply,
        };
        if let Err(Command::LatestEvents { reply, .. }) = self.inner.commands.send(command) {
            let _ = reply.send(Err(self.closed_error("latest events")));
        }
    }

    /// A project's stored issues and the events of its dedupe window (a node taking the
    /// project over), read after everything submitted before it is committed.
    pub fn project_issues(
        &self,
        project_id: Uuid,
        reply: oneshot::Sender<Result<ProjectRows, StoreError>>,
    ) {
        let command = Command::ProjectIssues { project_id, reply };
        if let Err(Command::ProjectIssues { reply, .. }) = self.inner.commands.send(command) {
            let _ = reply.send(Err(self.closed_error("project issues")));
        }
    }

    /// Whether any project has a stored issue with this id, read after everything submitted
    /// before it is committed.
    pub fn has_issue(&self, issue_id: Uuid, reply: oneshot::Sender<Result<bool, StoreError>>) {
        let command = Command::HasIssue { issue_id, reply };
        if let Err(Command::HasIssue { reply, .. }) = self.inner.commands.send(command) {
            let _ = reply.send(Err(self.closed_error("has issue")));
        }
    }

    /// Stored events of one project (or all), counted after everything submitted before it is
    /// committed.
    pub fn count_events(
        &self,
        project_id: Option<Uuid>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    ) {
        let command = Command::CountEvents { project_id, reply };
        if let Err(Command::CountEvents { reply, .. }) = self.inner.commands.send(command) {
            let _ = reply.send(Err(self.closed_error("count events")));
        }
    }

    /// A new project number from the database (`Backend::next_project_number`).
    pub fn next_project_number(&self, reply: oneshot::Sender<Result<i64, StoreError>>) {
        let command = Command::NextProjectNumber { reply };
        if let Err(Command::NextProjectNumber { reply }) = self.inner.commands.send(command) {
            let _ = reply.send(Err(self.closed_error("next project number")));
        }
    }

    /// A project's retention was shortened: its old events go after the next commit rather
    /// than at the next hourly pass.
    pub fn apply_retention(&self) {
        let _ = self.inner.commands.send(Command::ApplyRetention);
    }

    /// False from a failed commit until the next successful one.
    pub fn healthy(&self) -> bool {
        self.inner.shared.healthy.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> StoreStats {
        let shared = &self.inner.shared;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StoreStats {
            queue_depth_events: shared.queue_depth_events.load(Ordering::Relaxed) as u64,
            queue_depth_bytes: shared.queue_depth_bytes.load(Ordering::Relaxed) as u64,
            batches_committed: read(&shared.batches_committed),
            rows_committed: read(&shared.rows_committed),
            events_committed: read(&shared.events_committed),
            rows_rejected: read(&shared.rows_rejected),
            commit_failures: read(&shared.commit_failures),
            flush_latency_us_sum: read(&shared.flush_latency_us_sum),
            flush_latency_us_count: read(&shared.flush_latency_us_count),
            batch_rows_sum: read(&shared.batch_rows_sum),
        }
    }

    /// Commits everything queued, stops the writer thread and waits for it. Blocks; later calls
    /// return at once, and later submissions are refused.
    pub fn shutdown(&self) {
        let writer_thread = match self.inner.writer_thread.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(writer_thread) = writer_thread else {
            return;
        };
        self.inner
            .shared
            .shutdown_requested
            .store(true, Ordering::Release);
        let _ = self.inner.commands.send(Command::Shutdown);
        if writer_thread.join().is_err() {
            tracing::error!(
                backend = self.inner.backend_name,
                "store writer thread panicked"
            );
        }
    }

    fn closed_error(&self, operation: &'static str) -> StoreError {
        StoreError::new(
            self.inner.backend_name,
            operation,
            StoreErrorKind::Closed,
            "the store writer has stopped",
        )
    }
}

/// What a submission adds to the queue: its events and their JSON bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Load {
    events: usize,
    bytes: usize,
}

impl Load {
    fn of(changes: &[Change]) -> Load {
        changes
            .iter()
            .fold(Load::default(), |load, change| match change {
                Change::Event(event) => Load {
                    events: load.events + 1,
                    bytes: load.bytes + event.payload.len(),
                },
                _ => load,
            })
    }
}

impl Shared {
    fn add(&self, load: Load) {
        self.queue_depth_events
            .fetch_add(load.events, Ordering::AcqRel);
        self.queue_depth_bytes
            .fetch_add(load.bytes, Ordering::AcqRel);
    }

    fn remove(&self, load: Load) {
        self.queue_depth_events
            .fetch_sub(load.events, Ordering::AcqRel);
        self.queue_depth_bytes
            .fetch_sub(load.bytes, Ordering::AcqRel);
    }
}

/// Submissions gathered for the next transaction.
#[derive(Default)]
struct Pending {
    changes: Vec<Change>,
    parts: Vec<Part>,
    events: usize,
    oldest_at: Option<Instant>,
}

/// One submission inside a pending batch: `changes[previous part's end..end]`.
struct Part {
    end: usize,
    events: usize,
    ack: Option<Ack>,
}

impl Pending {
    fn push(&mut self, changes: Vec<Change>, events: usize, ack: Option<Ack>) {
        if self.parts.is_empty() {
            self.oldest_at = Some(Instant::now());
        }
        // Into the batch's own buffer, which keeps its capacity from one batch to the next:
        // a batch is hundreds of KiB, and a fresh buffer each time is fresh memory each time.
        self.changes.extend(changes);
        self.events += events;
        self.parts.push(Part {
            end: self.changes.len(),
            events,
            ack,
        });
        self.check_invariants();
    }

    fn check_invariants(&self) {
        debug_assert_eq!(
            self.parts.last().map_or(0, |part| part.end),
            self.changes.len()
        );
        debug_assert_eq!(
            self.parts.iter().map(|part| part.events).sum::<usize>(),
            self.events
        );
        debug_assert_eq!(self.parts.is_empty(), self.oldest_at.is_none());
    }
}

/// The writer's queue. A plain submission does not wake the writer, which takes the queue at
/// least once per flush interval anyway: a wake-up per submission would cost the reactor a
/// syscall and the writer a context switch for every few events. Anything someone waits for
/// (an ack, a read, shutdown) rings at once, and so does a full batch of events.
struct Inbox {
    state: Mutex<InboxState>,
    bell: Condvar,
    ring_events: usize,
}

#[derive(Default)]
struct InboxState {
    commands: VecDeque<Command>,
    unrung_events: usize,
    rung: bool,
    closed: bool,
}

impl Inbox {
    fn new(ring_events: usize) -> Inbox {
        Inbox {
            state: Mutex::default(),
            bell: Condvar::new(),
            ring_events,
        }
    }

    /// Queues a command; gives it back when the writer has stopped.
    fn send(&self, command: Command) -> Result<(), Command> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return Err(command);
        }
        let ring = match &command {
            Command::Submit {
                ack: None, events, ..
            } => {
                state.unrung_events += events;
                state.unrung_events >= self.ring_events
            }
            _ => true,
        };
        state.commands.push_back(command);
        if ring && !state.rung {
            state.rung = true;
            drop(state);
            self.bell.notify_one();
        }
        Ok(())
    }

    /// Waits until the bell rings or `timeout` passes, then takes everything queued.
    fn take(&self, timeout: Duration) -> VecDeque<Command> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.rung {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .bell
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.rung = false;
        state.unrung_events = 0;
        std::mem::take(&mut state.commands)
    }

    /// Refuses later commands and takes what is still queued.
    fn close(&self) -> VecDeque<Command> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.closed = true;
        std::mem::take(&mut state.commands)
    }
}

struct Writer {
    backend: Box<dyn Backend>,
    commands: Arc<Inbox>,
    shared: Arc<Shared>,
    config: WriterConfig,
    pending: Pending,
    next_maintain_at: Instant,
}

impl Writer {
    fn run(mut self) {
        self.maintain();
        let poll = Duration::from_millis(self.config.flush_interval_ms);
        let mut shutdown = false;
        while !shutdown {
            let now = Instant::now();
            let wake_at = (now + poll).min(self.next_maintain_at);
            for command in self.commands.take(wake_at.saturating_duration_since(now)) {
                match command {
                    // What was queued before the request is still written below.
                    Command::Shutdown => shutdown = true,
                    command => self.handle(command),
                }
            }
            // Everything taken is at most one flush interval old, or someone waits for it:
            // commit it now, in one transaction (group commit).
            self.flush();
            if Instant::now() >= self.next_maintain_at {
                self.maintain();
            }
        }
        // Whatever raced with the shutdown request is still written.
        for command in self.commands.close() {
            if !matches!(command, Command::Shutdown) {
                self.handle(command);
            }
        }
        self.flush();
        debug_assert_eq!(self.pending.events, 0);
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit {
                changes,
                events,
                ack,
            } => {
                // Someone waiting for a commit rings the inbox and is committed at the end of
                // this take; here only a batch at its size limit closes early.
                self.pending.push(changes, events, ack);
                let changes_max = self
                    .config
                    .batch_events_max
                    .saturating_mul(BATCH_CHANGES_PER_EVENT_MAX);
                if self.pending.events >= self.config.batch_events_max
                    || self.pending.changes.len() >= changes_max
                {
                    self.flush();
                }
            }
            Command::LatestEvents {
                issue_id,
                limit,
                reply,
            } => {
                self.flush();
                let result = self.query(|backend| backend.latest_events(issue_id, limit));
                let _ = reply.send(result);
            }
            Command::CountEvents { project_id, reply } => {
                self.flush();
                let result = self.query(|backend| backend.count_events(project_id));
                let _ = reply.send(result);
            }
            Command::NextProjectNumber { reply } => {
                let result = self.query(|backend| backend.next_project_number());
                let _ = reply.send(result);
            }
            Command::ProjectIssues { project_id, reply } => {
                self.flush();
                let since_us = recent_since_us();
                let result = self.query(|backend| {
                    Ok(ProjectRows {
                        issues: backend.project_issues(project_id)?,
                        recent_events: backend.recent_events(Some(project_id), since_us)?,
                    })
                });
                let _ = reply.send(result);
            }
            Command::HasIssue { issue_id, reply } => {
                self.flush();
                let result = self.query(|backend| backend.has_issue(issue_id));
                let _ = reply.send(result);
            }
            Command::ApplyRetention => self.next_maintain_at = Instant::now(),
            Command::Shutdown => unreachable!("shutdown is handled by the loop"),
        }
    }

    /// A read, tried a second time on a fresh connection if the first failed to reach the
    /// database.
    fn query<T>(
        &mut self,
        read: impl Fn(&mut dyn Backend) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match read(self.backend.as_mut()) {
            Err(error) if error.is_retryable() => {
                tracing::warn!(%error, "store read failed; reconnecting once");
                self.backend.reconnect()?;
                read(self.backend.as_mut())
            }
            result => result,
        }
    }

    /// Commits the pending batch, retrying until it is written. If the database refuses the
    /// batch's rows for good, each submission is committed on its own so one bad submission
    /// costs only its own rows (its ack gets the error).
    fn flush(&mut self) {
        if self.pending.parts.is_empty() {
            return;
        }
        let Pending {
            mut changes,
            parts,
            events,
            oldest_at: _,
        } = std::mem::take(&mut self.pending);
        let outcome = self.commit_with_retry(&changes, events);
        let split = matches!(&outcome, Err(error) if !error.is_retryable()) && parts.len() > 1;
        if split {
            let mut start = 0;
            for part in parts {
                let part_changes = &changes[start..part.end];
                start = part.end;
                let outcome = self.commit_with_retry(part_changes, part.events);
                self.settle(part_changes.len(), part.ack, outcome);
            }
        } else {
            for part in parts {
                self.settle(0, part.ack, outcome.clone());
            }
            if outcome.is_err() {
                self.settle(changes.len(), None, outcome);
            }
        }
        let load = Load::of(&changes);
        debug_assert_eq!(load.events, events);
        self.shared.remove(load);
        changes.clear();
        self.pending.changes = changes;
    }

    /// Fires an ack and counts `rows` as refused when the outcome is an error.
    fn settle(&self, rows: usize, ack: Option<Ack>, outcome: Result<(), StoreError>) {
        if let Err(error) = &outcome {
            if rows > 0 {
                self.shared
                    .rows_rejected
                    .fetch_add(rows as u64, Ordering::Relaxed);
                tracing::error!(%error, rows, "store refused rows; they are not written");
            }
        }
        if let Some(ack) = ack {
            let _ = ack.send(outcome);
        }
    }

    /// One transaction for `changes`, retried with backoff (and a reconnect before each retry)
    /// while the database is unreachable. Returns an error only when the database refuses the
    /// rows, or at shutdown once the database has stayed unreachable past the deadline.
    fn commit_with_retry(&mut self, changes: &[Change], events: usize) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut backoff_ms = RETRY_BACKOFF_INITIAL_MS;
        let mut shutdown_seen_at: Option<Instant> = None;
        loop {
            let started_at = Instant::now();
            let error = match self.backend.commit(changes) {
                Ok(()) => {
                    self.count_commit(changes.len(), events, started_at.elapsed());
                    return Ok(());
                }
                Err(error) => error,
            };
            self.shared.commit_failures.fetch_add(1, Ordering::Relaxed);
            if !error.is_retryable() {
                return Err(error);
            }
            if self.shared.healthy.swap(false, Ordering::AcqRel) {
                tracing::warn!(%error, "store commit failed; retrying until it succeeds");
            } else {
                tracing::debug!(%error, "store commit failed again");
            }
            if self.shared.shutdown_requested.load(Ordering::Acquire) {
                let seen_at = *shutdown_seen_at.get_or_insert_with(Instant::now);
                if seen_at.elapsed() >= Duration::from_millis(SHUTDOWN_COMMIT_DEADLINE_MS) {
                    tracing::error!(%error, "storage still unreachable at shutdown; giving up");
                    return Err(error);
                }
            }
            std::thread::sleep(Duration::from_millis(backoff_ms));
            backoff_ms = (backoff_ms * 2).min(RETRY_BACKOFF_MAX_MS);
            if let Err(error) = self.backend.reconnect() {
                tracing::debug!(%error, "store reconnect failed");
            }
        }
    }

    fn count_commit(&self, rows: usize, events: usize, latency: Duration) {
        let shared = &self.shared;
        shared.batches_committed.fetch_add(1, Ordering::Relaxed);
        shared
            .rows_committed
            .fetch_add(rows as u64, Ordering::Relaxed);
        shared
            .events_committed
            .fetch_add(events as u64, Ordering::Relaxed);
        shared
            .batch_rows_sum
            .fetch_add(rows as u64, Ordering::Relaxed);
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        shared
            .flush_latency_us_sum
            .fetch_add(latency_us, Ordering::Relaxed);
        shared
            .flush_latency_us_count
            .fetch_add(1, Ordering::Relaxed);
        if !shared.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("store commits succeed again");
        }
    }

    fn maintain(&mut self) {
        let interval_ms = match self.backend.maintain(now_us()) {
            Ok(()) => MAINTAIN_INTERVAL_MS,
            Err(error) => {
                tracing::warn!(%error, "store housekeeping failed; trying again later");
                if error.is_retryable() {
                    let _ = self.backend.reconnect();
                }
                MAINTAIN_RETRY_INTERVAL_MS
            }
        };
        self.next_maintain_at = Instant::now() + Duration::from_millis(interval_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Snapshot;

    /// Records the size of every committed batch; stores nothing else.
    struct Recording {
        batches: Arc<Mutex<Vec<usize>>>,
        events: u64,
    }

    impl Backend for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        fn migrate(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn load(&mut self) -> Result<Snapshot, StoreError> {
            Ok(Snapshot::default())
        }
        fn commit(&mut self, batch: &[Change]) -> Result<(), StoreError> {
            self.events += Load::of(batch).events as u64;
            self.batches.lock().unwrap().push(batch.len());
            Ok(())
        }
        fn has_issue(&mut self, _: Uuid) -> Result<bool, StoreError> {
            Ok(false)
        }
        fn recent_events(
            &mut self,
            _: Option<Uuid>,
            _: i64,
        ) -> Result<Vec<RecentEvent>, StoreError> {
            Ok(Vec::new())
        }
        fn latest_events(&mut self, _: Uuid, _: usize) -> Result<Vec<EventRow>, StoreError> {
            Ok(Vec::new())
        }
        fn count_events(&mut self, _: Option<Uuid>) -> Result<u64, StoreError> {
            Ok(self.events)
        }
        fn next_project_number(&mut self) -> Result<i64, StoreError> {
            Ok(1)
        }
        fn maintain(&mut self, _: i64) -> Result<(), StoreError> {
            Ok(())
        }
        fn ping(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn reconnect(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn recording_store(config: WriterConfig) -> (Store, Arc<Mutex<Vec<usize>>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let backend = Recording {
            batches: Arc::clone(&batches),
            events: 0,
        };
        let (store, _) = Store::start(Box::new(backend), config).unwrap();
        (store, batches)
    }

    fn one_event() -> Vec<Change> {
        vec![Change::Event(EventRow {
            id: Uuid::now_v7(),
            project_id: Uuid::nil(),
            issue_id: Uuid::nil(),
            level: "error".into(),
            received_at_us: 0,
            payload: "{}".to_string().into(),
        })]
    }

    fn wait<T>(mut receiver: oneshot::Receiver<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match receiver.try_recv() {
                Ok(value) => return value,
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(error) => panic!("no reply: {error:?}"),
            }
        }
    }

    #[test]
    fn batches_close_at_the_event_bound_and_reads_flush_the_rest() {
        let config = WriterConfig {
            flush_interval_ms: 60_000,
            batch_events_max: 3,
            queue_events_max: 100,
            ..WriterConfig::default()
        };
        let (store, batches) = recording_store(config);
        for _ in 0..7 {
            store.try_submit(one_event(), None).unwrap();
        }
        let (reply, receiver) = oneshot::channel();
        store.count_events(None, reply);
        assert_eq!(wait(receiver).unwrap(), 7);
        assert_eq!(*batches.lock().unwrap(), [3, 3, 1]);
        let stats = store.stats();
        assert_eq!(stats.batches_committed, 3);
        assert_eq!(stats.batch_rows_sum, 7);
        assert_eq!(stats.queue_depth_events, 0);
        store.shutdown();
    }

    #[test]
    fn a_lone_submission_is_committed_within_the_flush_interval_without_a_wake_up() {
        let config = WriterConfig {
            flush_interval_ms: 30,
            ..WriterConfig::default()
        };
        let (store, batches) = recording_store(config);
        let started = Instant::now();
        store.try_submit(one_event(), None).unwrap();
        // It does not ring the writer's bell: the writer finds it on its own schedule.
        assert!(!store.inner.commands.state.lock().unwrap().rung);
        while batches.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert_eq!(*batches.lock().unwrap(), [1]);
        store.shutdown();
    }

    #[test]
    fn an_awaited_submission_is_committed_without_waiting_for_the_interval() {
        let config = WriterConfig {
            flush_interval_ms: 60_000,
            ..WriterConfig::default()
        };
        let (store, batches) = recording_store(config);
        let (ack, receiver) = oneshot::channel();
        store.try_submit(one_event(), Some(ack)).unwrap();
        wait(receiver).unwrap();
        assert_eq!(*batches.lock().unwrap(), [1]);
        store.shutdown();
    }

    #[test]
    fn an_empty_submission_is_acked_after_everything_before_it() {
        let config = WriterConfig {
            flush_interval_ms: 60_000,
            ..WriterConfig::default()
        };
        let (store, batches) = recording_store(config);
        store.submit(one_event(), None);
        store.submit(one_event(), None);
        let (ack, receiver) = oneshot::channel();
        store.submit(Vec::new(), Some(ack));
        // Awaited and without events: committed at once, with what was waiting before it.
        wait(receiver).unwrap();
        assert_eq!(*batches.lock().unwrap(), [2]);
        store.shutdown();
    }

    #[test]
    fn store_is_a_shareable_handle() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Store>();
    }

    #[test]
    fn pending_tracks_parts_and_events() {
        let mut pending = Pending::default();
        pending.push(one_event(), 1, None);
        pending.push(Vec::new(), 0, None);
        let mut two = one_event();
        two.extend(one_event());
        pending.push(two, 2, None);
        assert_eq!(pending.changes.len(), 3);
        assert_eq!(pending.events, 3);
        let ends: Vec<usize> = pending.parts.iter().map(|part| part.end).collect();
        assert_eq!(ends, [1, 1, 3]);
        assert!(pending.oldest_at.is_some());
    }
}
