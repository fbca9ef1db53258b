//! The runtime: one shard per core, a thread running its own io_uring reactor, listeners,
//! connections, timer wheel and mesh queue.
//!
//! Everything in `Shard` belongs to its thread (`Rc`, `RefCell`); other shards reach it only
//! through its mesh queue. Borrows of the `RefCell`s are never held across an `.await`. The
//! runtime knows connections, timers, queues, the directory and the store; what it runs for a
//! connection and the state of the layers above are handed to it at start (`Hooks`).

mod connections;
mod directory;
mod drain;
pub mod mesh;
mod timers;
mod turn;
pub mod wheel;

use std::cell::{Cell, Ref, RefCell, RefMut};
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::auth::Directory;
use crate::config::Config;
use crate::conn::limits::Limits;
use crate::conn::registry::Registry;
use crate::metrics::{Metrics, ShardMetrics};
use crate::store::Store;
use mesh::{Mesh, ShardMsg};
use wheel::TimerWheel;

pub use connections::{ConnEntry, Deadline, Socket};
pub use directory::DirectoryError;
pub use timers::{Sleep, Timer, CLOSE_GRACE_MS, TICK_MS};
pub use turn::{IssueRows, StoreTurn};

/// Accept failures (EMFILE and friends) are retried after a pause that doubles from the first
/// to the last.
const ACCEPT_BACKOFF_MS_FIRST: u64 = 10;
const ACCEPT_BACKOFF_MS_LAST: u64 = 1000;
/// Mesh messages handled in one go before the reactor turns to I/O again.
const INBOX_BATCH_MAX: usize = 256;
/// Submission slots of a reactor's ring.
const RING_ENTRIES: u32 = 1024;

pub struct Shard {
    index: usize,
    config: Arc<Config>,
    admin_token: Arc<str>,
    mesh: Rc<Mesh>,
    store: Store,
    metrics: Metrics,
    counters: Arc<ShardMetrics>,
    limits: Arc<Limits>,
    directory: RefCell<Directory>,
    conns: RefCell<Registry<ConnEntry>>,
    wheel: RefCell<TimerWheel<Timer>>,
    draining: Cell<bool>,
    /// What this reactor turn gives the store (see `turn.rs`).
    turn: RefCell<StoreTurn>,
    /// A hand-over of `turn` is asked for and not yet made.
    turn_due: Cell<bool>,
    turn_wanted: Notify,
    issue_rows: IssueRows,
    drained: std::sync::mpsc::Sender<usize>,
    drained_reported: Cell<bool>,
    started: Instant,
}

/// What the runtime runs for each accepted connection.
pub type Serve =
    fn(Rc<Shard>, tokio_uring::net::TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()>>>;

/// What the layers above hand the runtime at start, so that it never names them.
pub struct Hooks {
    pub serve: Serve,
    /// Builds the store rows of issues touched this turn, from their owner's newest state.
    pub issue_rows: IssueRows,
    /// Runs on the shard's thread before it serves anything: sets up the state of the layers
    /// above (the projects this shard owns).
    pub start: mesh::Task,
}

/// Everything a shard thread starts from.
pub struct ShardInit {
    pub index: usize,
    pub hooks: Hooks,
    pub config: Arc<Config>,
    pub admin_token: Arc<str>,
    pub senders: Vec<mpsc::Sender<ShardMsg>>,
    pub inbox: mpsc::Receiver<ShardMsg>,
    pub listeners: Vec<std::net::TcpListener>,
    pub store: Store,
    pub metrics: Metrics,
    pub limits: Arc<Limits>,
    pub directory: Directory,
    /// Told when this shard has no connections left after `Drain`.
    pub drained: std::sync::mpsc::Sender<usize>,
}

impl Shard {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn shard_count(&self) -> usize {
        self.mesh.shard_count()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This shard's counters.
    pub fn counters(&self) -> &ShardMetrics {
        &self.counters
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Projects and keys as this shard knows them; changed only through `publish_directory`.
    pub fn directory(&self) -> Ref<'_, Directory> {
        self.directory.borrow()
    }

    /// Shutdown has begun: no new connections or sessions.
    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Project(row, ack) => {
                self.directory.borrow_mut().apply_project(row);
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
            ShardMsg::Key(row, ack) => {
                self.directory.borrow_mut().apply_key(&row);
                if row.revoked {
                    self.close_sessions_of_key(row.id);
                }
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
            ShardMsg::Run(task) => task(self),
            ShardMsg::Drain => self.begin_drain(),
            ShardMsg::Exit => {}
        }
    }

    fn conns_mut(&self) -> RefMut<'_, Registry<ConnEntry>> {
        self.conns.borrow_mut()
    }
}

/// A reactor thread's tokio-uring runtime, or an operator's explanation of why there is none.
///
/// The ring is set up for cooperative task running where the kernel has it (5.19+): a
/// completion that arrives while the reactor is busy waits for the reactor's next system call
/// instead of interrupting it once per arriving request. An older kernel refuses the flag
/// (EINVAL) and gets the plain ring.
pub fn reactor_runtime() -> Result<tokio_uring::Runtime, String> {
    let mut cooperative = tokio_uring::builder();
    cooperative
        .entries(RING_ENTRIES)
        .uring_builder(tokio_uring::uring_builder().setup_coop_taskrun());
    match tokio_uring::Runtime::new(&cooperative) {
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES))
        }
        result => result,
    }
    .map_err(|error| crate::io_uring_error(&error))
}

/// Runs one shard to completion on the current thread.
pub fn run(init: ShardInit) -> Result<(), String> {
    let runtime = reactor_runtime()?;
    runtime.block_on(async move {
        let counters = init.metrics.shards[init.index].clone();
        let shard = Rc::new(Shard {
            index: init.index,
            config: init.config.clone(),
            admin_token: init.admin_token,
            mesh: Rc::new(Mesh::new(init.senders, counters.clone())),
            store: init.store,
            metrics: init.metrics,
            counters,
            limits: init.limits,
            directory: RefCell::new(init.directory),
            conns: RefCell::new(Registry::new()),
            wheel: RefCell::new(timers::new_wheel()),
            draining: Cell::new(false),
            turn: RefCell::new(StoreTurn::default()),
            turn_due: Cell::new(false),
            turn_wanted: Notify::new(),
            issue_rows: init.hooks.issue_rows,
            drained: init.drained,
            drained_reported: Cell::new(false),
            started: Instant::now(),
        });
        (init.hooks.start)(&shard);
        let serve = init.hooks.serve;
        let mut accept_tasks = Vec::new();
        for listener in init.listeners {
            let listener = tokio_uring::net::TcpListener::from_std(listener);
            accept_tasks.push(tokio_uring::spawn(accept_loop(
                shard.clone(),
                listener,
                serve,
            )));
        }
        tokio_uring::spawn(shard.mesh.clone().forward());
        tokio_uring::spawn(tick_loop(shard.clone()));
        tokio_uring::spawn(turn_loop(shard.clone()));
        shard.schedule(shard.config.drain_interval_ms, Timer::Drain);
        let mut inbox = init.inbox;
        while let Some(msg) = inbox.recv().await {
            let mut next = Some(msg);
            let mut handled = 0;
            while let Some(msg) = next.take() {
                match msg {
                    ShardMsg::Exit => {
                        shard.flush_store(None);
                        return;
                    }
                    ShardMsg::Drain => {
                        for task in &accept_tasks {
                            task.abort();
                        }
                        shard.handle(ShardMsg::Drain);
                    }
                    msg => shard.handle(msg),
                }
                handled += 1;
                if handled < INBOX_BATCH_MAX {
                    next = inbox.try_recv().ok();
                }
            }
        }
    });
    Ok(())
}

async fn accept_loop(shard: Rc<Shard>, listener: tokio_uring::net::TcpListener, serve: Serve) {
    let mut backoff_ms = ACCEPT_BACKOFF_MS_FIRST;
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                backoff_ms = ACCEPT_BACKOFF_MS_FIRST;
                if shard.draining.get() {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                tokio_uring::spawn(serve(shard.clone(), stream));
            }
            Err(error) => {
                // EMFILE and friends: wait for connections to close instead of spinning.
                tracing::warn!(shard = shard.index, %error, "accept failed; retrying in {backoff_ms} ms");
                shard.sleep(backoff_ms).await;
                backoff_ms = (backoff_ms * 2).min(ACCEPT_BACKOFF_MS_LAST);
            }
        }
    }
}

/// Makes the hand-overs `store_turn()` asks for: woken behind the tasks already ready, it
/// runs when they have had their turn.
async fn turn_loop(shard: Rc<Shard>) {
    loop {
        shard.turn_wanted.notified().await;
        shard.turn_due.set(false);
        shard.flush_store(None);
    }
}

/// Advances the wheel every tick and records how late the tick ran (the loop lag).
async fn tick_loop(shard: Rc<Shard>) {
    let period = Duration::from_millis(TICK_MS);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let scheduled = interval.tick().await;
        let lag_us = scheduled.elapsed().as_micros() as u64;
        shard.counters.loop_lag_us.store(lag_us, Relaxed);
        shard.counters.loop_lag_max_us.fetch_max(lag_us, Relaxed);
        let tick = (shard.started.elapsed().as_millis() as u64) / TICK_MS;
        if tick > shard.now_tick() {
            shard.on_tick(tick);
        }
    }
}
