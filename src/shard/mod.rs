//! One shard: a thread running its own io_uring reactor, listeners, connections and projects.
//!
//! Everything in `Shard` belongs to its thread (`Rc`, `RefCell`); other shards reach it only
//! through its mesh queue. Borrows of the `RefCell`s are never held across an `.await`.

pub mod mesh;
pub mod owner;
pub mod wheel;

use std::cell::{Cell, RefCell, RefMut};
use std::future::{poll_fn, Future};
use std::os::fd::RawFd;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

use crate::auth::Directory;
use crate::config::Config;
use crate::conn::limits::Limits;
use crate::conn::registry::{ConnId, Registry};
use crate::conn::ring::{Kind, Push, Ring};
use crate::issues::ProjectState;
use crate::metrics::{CloseReason, ConnKind, Metrics, ShardMetrics};
use crate::store::{Ack, Change, EventRow, KeyRow, ProjectRow, Store};
use crate::stream::{deliver_to, Filters, Published};
use crate::ws::codec::{encode_close, CLOSE_GOING_AWAY};
use crate::{IdMap, IdSet};
use mesh::{DirectoryError, Mesh, ShardMsg};
use wheel::{TimerKey, TimerWheel};

/// Resolution of the shard's timer wheel; every timeout and the drain tick round up to it. Fine
/// enough for the shortest drain interval (`DRAIN_INTERVAL_MS_MIN`); an idle shard wakes 100
/// times a second for it, which costs next to nothing.
pub const TICK_MS: u64 = 10;
const _: () = assert!(TICK_MS == crate::config::DRAIN_INTERVAL_MS_MIN);
/// Wheel slots: one revolution covers 2^12 x 10 ms = 41 s, longer timers take extra rounds.
const WHEEL_SLOTS: usize = 4096;
/// How long a client has to answer our close frame before the socket is shut anyway.
pub const CLOSE_GRACE_MS: u64 = 2000;
/// Accept failures (EMFILE and friends) are retried after a pause that doubles from the first
/// to the last.
const ACCEPT_BACKOFF_MS_FIRST: u64 = 10;
const ACCEPT_BACKOFF_MS_LAST: u64 = 1000;
/// Mesh messages handled in one go before the reactor turns to I/O again.
const INBOX_BATCH_MAX: usize = 256;

/// What a timer does when it fires.
#[derive(Debug)]
pub enum Timer {
    /// An HTTP connection's deadline may have passed (see `Shard::set_deadline`).
    Deadline(ConnId),
    /// Time to ping a WebSocket client.
    Ping(ConnId),
    /// The client did not answer the ping.
    Pong(ConnId),
    /// Our close frame went out and the client has not closed its side in time.
    CloseGrace(ConnId),
    /// The periodic drain of waiting stream messages.
    Drain,
    /// A task's `Shard::sleep` is over.
    Wake(oneshot::Sender<()>),
}

/// A WebSocket connection's outgoing side: its ring of waiting frames and its writer's state.
pub struct Socket {
    pub ring: Ring<Bytes>,
    pub wake: Rc<Notify>,
    pub writing: bool,
    /// Set once a close frame is queued: the writer shuts the socket after writing it.
    pub closing: bool,
    pub last_progress_tick: u64,
    /// The kernel's send queue for this socket when the drain tick last looked, while a write
    /// waits; `None` after a write added to it (see `peer_took_bytes`).
    pub send_queue_seen: Option<u32>,
    pub pong_timer: Option<TimerKey>,
    /// The key the session opened with.
    pub key_id: Uuid,
    /// For stream subscribers: the project and filters.
    pub subscription: Option<Subscription>,
}

pub struct Subscription {
    pub project_id: Uuid,
    pub filters: Filters,
    /// The owner's welcome arrived: fan-out reaches this connection from now on.
    pub welcomed: bool,
    /// The welcome `issue_count`, until the writer sends it. Kept out of the ring so that it
    /// goes out first and no later count replaces it.
    pub welcome: Option<Bytes>,
}

impl Socket {
    /// A stream socket waiting for its welcome: nothing may be written before it, since the
    /// first message must be the issue count.
    pub fn held(&self) -> bool {
        self.subscription.as_ref().is_some_and(|s| !s.welcomed)
    }
}

/// What an HTTP connection's deadline ends when it passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// A started request did not complete in time: answer 408 and close.
    Request,
    /// A keep-alive connection sat idle too long.
    Idle,
    /// An answered connection is closing: stop discarding what the client still sends.
    Linger,
}

pub struct ConnEntry {
    pub fd: RawFd,
    pub kind: ConnKind,
    /// A request is partly read or being answered (HTTP), so shutdown lets it finish.
    pub busy: bool,
    /// The wheel timer of this connection: its deadline check (HTTP) or its next ping
    /// (WebSocket).
    pub timer: Option<TimerKey>,
    /// The tick `timer` fires at (HTTP).
    pub timer_tick: u64,
    /// HTTP: what ends the connection, and at which tick, unless it moves on before.
    pub deadline: Option<(Deadline, u64)>,
    /// Why the server ended the connection, when it did.
    pub close_reason: Option<CloseReason>,
    /// It holds a place under `--max-connections`.
    pub admitted: bool,
    pub socket: Option<Socket>,
}

pub struct Shard {
    pub index: usize,
    pub config: Arc<Config>,
    pub admin_token: Arc<str>,
    pub mesh: Rc<Mesh>,
    pub store: Store,
    pub metrics: Metrics,
    pub counters: Arc<ShardMetrics>,
    pub limits: Arc<Limits>,
    pub directory: RefCell<Directory>,
    /// State of the projects this shard owns.
    pub owned: RefCell<IdMap<Uuid, ProjectState>>,
    pub conns: RefCell<Registry<ConnEntry>>,
    /// Welcomed local subscribers of each project.
    pub subscribers: RefCell<IdMap<Uuid, Vec<ConnId>>>,
    pub wheel: RefCell<TimerWheel<Timer>>,
    pub draining: Cell<bool>,
    /// What this reactor turn gives the store, handed over once at the end of the turn
    /// (`store_turn()`).
    store_turn: RefCell<StoreTurn>,
    /// A hand-over of `store_turn` is asked for and not yet made.
    store_turn_due: Cell<bool>,
    store_turn_wanted: Notify,
    drained_reported: Cell<bool>,
    /// Slugs of projects being created (shard 0 only).
    pending_slugs: RefCell<std::collections::HashSet<String>>,
    started: Instant,
}

/// Everything a shard thread starts from.
/// What the runtime runs for each accepted connection; handed to it at start, so the runtime
/// never names the layers above it.
pub type Serve =
    fn(Rc<Shard>, tokio_uring::net::TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()>>>;

pub struct ShardInit {
    pub index: usize,
    pub serve: Serve,
    pub config: Arc<Config>,
    pub admin_token: Arc<str>,
    pub senders: Vec<mpsc::Sender<ShardMsg>>,
    pub inbox: mpsc::Receiver<ShardMsg>,
    pub listeners: Vec<std::net::TcpListener>,
    pub store: Store,
    pub metrics: Metrics,
    pub limits: Arc<Limits>,
    pub directory: Directory,
    pub owned: IdMap<Uuid, ProjectState>,
    /// Told when this shard has no connections left after `Drain`.
    pub drained: std::sync::mpsc::Sender<usize>,
}

impl Shard {
    pub fn shard_count(&self) -> usize {
        self.mesh.shard_count()
    }

    pub fn now_tick(&self) -> u64 {
        self.wheel.borrow().now_tick()
    }

    pub fn ticks(duration_ms: u64) -> u64 {
        duration_ms.div_ceil(TICK_MS).max(1)
    }

    pub fn schedule(&self, after_ms: u64, timer: Timer) -> TimerKey {
        self.schedule_ticks(Self::ticks(after_ms), timer)
    }

    fn schedule_ticks(&self, after_ticks: u64, timer: Timer) -> TimerKey {
        self.wheel.borrow_mut().schedule(after_ticks, timer)
    }

    /// Sets or clears an HTTP connection's deadline, `after_ms` from now. Every request moves
    /// the deadline, so the wheel is not told each time: the connection's one timer stays armed
    /// at or before the deadline and, firing early, re-arms itself for the deadline of the
    /// moment. Only a deadline earlier than the armed timer schedules a new one.
    pub fn set_deadline(&self, id: ConnId, deadline: Option<(Deadline, u64)>) {
        let now = self.now_tick();
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(id) else {
            return;
        };
        entry.deadline = deadline.map(|(what, after_ms)| (what, now + Self::ticks(after_ms)));
        let Some((_, at)) = entry.deadline else {
            return;
        };
        if entry.timer.is_some() && entry.timer_tick <= at {
            return;
        }
        self.cancel(entry.timer.take());
        self.arm_deadline_timer(entry, id, now, at);
    }

    /// Arms the connection's timer to fire at tick `at`.
    fn arm_deadline_timer(&self, entry: &mut ConnEntry, id: ConnId, now: u64, at: u64) {
        entry.timer = Some(self.schedule_ticks(at - now, Timer::Deadline(id)));
        entry.timer_tick = at;
    }

    /// An HTTP connection's timer fired: end the connection if its deadline has passed, else
    /// wait for the deadline as it stands now.
    fn check_deadline(&self, id: ConnId) {
        let now = self.now_tick();
        let passed = {
            let mut conns = self.conns.borrow_mut();
            let Some(entry) = conns.get_mut(id) else {
                return;
            };
            entry.timer = None;
            match entry.deadline {
                None => return,
                Some((what, at)) if at <= now => what,
                Some((_, at)) => {
                    self.arm_deadline_timer(entry, id, now, at);
                    return;
                }
            }
        };
        match passed {
            Deadline::Request => self.interrupt_read(id, CloseReason::RequestTimeout),
            Deadline::Idle => self.force_close(id, CloseReason::IdleTimeout),
            // An answered connection stops discarding what its client still sends; it closes
            // for the reason it already has.
            Deadline::Linger => {
                self.shut(id, libc::SHUT_RD, None);
            }
        }
    }

    /// A future that is ready `after_ms` from now (rounded up to the tick), timed by the wheel
    /// like every other timer of the shard. Dropping it early takes its timer off the wheel.
    pub fn sleep(&self, after_ms: u64) -> Sleep<'_> {
        Sleep::new(&self.wheel, Self::ticks(after_ms))
    }

    /// Runs `future` for at most `after_ms`: None if the time ran out first.
    pub async fn timeout<F: Future>(&self, after_ms: u64, future: F) -> Option<F::Output> {
        until(self.sleep(after_ms), future).await
    }

    pub fn cancel(&self, key: Option<TimerKey>) {
        if let Some(key) = key {
            self.wheel.borrow_mut().cancel(key);
        }
    }

    /// Registers an accepted connection; it holds a place under `--max-connections` until it
    /// is unregistered. Not admitted (false): it is one too many, to be answered 503.
    pub fn register(&self, fd: RawFd) -> (ConnId, bool) {
        self.counters.conns_accepted.fetch_add(1, Relaxed);
        self.counters.opened(ConnKind::Http);
        let admitted = self.limits.connections.try_take(1);
        let id = self.conns.borrow_mut().insert(ConnEntry {
            fd,
            kind: ConnKind::Http,
            busy: false,
            timer: None,
            timer_tick: 0,
            deadline: None,
            close_reason: None,
            admitted,
            socket: None,
        });
        (id, admitted)
    }

    /// Forgets a connection at once: timers, subscription, slab slot.
    pub fn unregister(&self, id: ConnId, default_reason: CloseReason) {
        let Some(entry) = self.conns.borrow_mut().remove(id) else {
            return;
        };
        if entry.admitted {
            self.limits.connections.give_back(1);
        }
        self.cancel(entry.timer);
        if let Some(socket) = &entry.socket {
            self.cancel(socket.pong_timer);
            if let Some(sub) = &socket.subscription {
                if sub.welcomed {
                    let mut subscribers = self.subscribers.borrow_mut();
                    if let Some(list) = subscribers.get_mut(&sub.project_id) {
                        list.retain(|c| *c != id);
                        if list.is_empty() {
                            subscribers.remove(&sub.project_id);
                        }
                    }
                }
                self.counters.stream_subscriptions.fetch_sub(1, Relaxed);
                let owner = mesh::owner_of(&sub.project_id, self.shard_count());
                self.mesh.send(
                    owner,
                    ShardMsg::Unwatch {
                        project_id: sub.project_id,
                        shard: self.index,
                    },
                );
            }
        }
        self.counters
            .closed(entry.kind, entry.close_reason.unwrap_or(default_reason));
        if self.draining.get() && self.conns.borrow().is_empty() {
            self.report_drained();
        }
    }

    /// Ends a connection from the server side: records why and shuts the socket so its tasks
    /// see the end of their pending reads and writes.
    pub fn force_close(&self, id: ConnId, reason: CloseReason) {
        self.shut(id, libc::SHUT_RDWR, Some(reason));
    }

    /// Cuts off a client that cannot keep up. It is counted once: until it is gone it may be
    /// found slow again (a drain tick, a reply that does not fit), and one closing already
    /// decided for another reason is not counted.
    pub fn disconnect_slow(&self, id: ConnId) {
        if self.shut(id, libc::SHUT_RDWR, Some(CloseReason::SlowClient)) {
            self.counters.stream_slow_disconnects.fetch_add(1, Relaxed);
        }
    }

    /// Ends only the read side, so the connection can still write its answer (408).
    pub fn interrupt_read(&self, id: ConnId, reason: CloseReason) {
        self.shut(id, libc::SHUT_RD, Some(reason));
    }

    /// Shuts the socket's `how` side(s), recording `reason` unless one was recorded before;
    /// true if this is the first reason recorded (the first decision to close).
    fn shut(&self, id: ConnId, how: libc::c_int, reason: Option<CloseReason>) -> bool {
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(id) else {
            return false;
        };
        let first = entry.close_reason.is_none() && reason.is_some();
        if entry.close_reason.is_none() {
            entry.close_reason = reason;
        }
        // SAFETY: fd belongs to a live connection (the entry exists); shutdown does not close it.
        unsafe { libc::shutdown(entry.fd, how) };
        first
    }

    /// Queues a frame on a WebSocket connection and wakes its writer; false if the ring refused it.
    /// Once the close frame is queued nothing more may follow it (RFC 6455 section 5.5.1), so a
    /// later frame is discarded.
    pub fn enqueue(&self, id: ConnId, frame: Bytes, kind: Kind) -> bool {
        let mut conns = self.conns.borrow_mut();
        let Some(socket) = conns.get_mut(id).and_then(|e| e.socket.as_mut()) else {
            return false;
        };
        if socket.closing {
            return true;
        }
        match socket.ring.push(frame, kind) {
            Push::Overflow => false,
            outcome => {
                if outcome == Push::DroppedOldest {
                    self.counters.stream_messages_dropped.fetch_add(1, Relaxed);
                }
                socket.wake.notify_one();
                true
            }
        }
    }

    /// Queues a close frame: the writer sends what waits, then the close, then shuts the socket.
    pub fn close_socket(&self, id: ConnId, frame: Bytes, reason: CloseReason) {
        let mut conns = self.conns.borrow_mut();
        let Some(entry) = conns.get_mut(id) else {
            return;
        };
        entry.close_reason.get_or_insert(reason);
        let Some(socket) = entry.socket.as_mut() else {
            return;
        };
        if !socket.closing {
            socket.closing = true;
            if socket.ring.push(frame, Kind::Control) == Push::Overflow {
                // SAFETY: as in `shut`.
                unsafe { libc::shutdown(entry.fd, libc::SHUT_RDWR) };
            }
            socket.wake.notify_one();
        }
    }

    /// Closes a WebSocket with 1001 because the server is going down.
    pub fn close_for_shutdown(&self, id: ConnId) {
        let frame = encode_close(CLOSE_GOING_AWAY, "server shutting down");
        self.close_socket(id, Bytes::from(frame), CloseReason::Shutdown);
    }

    /// Pushes a project's messages into the rings of the matching local subscribers.
    fn deliver(&self, project_id: &Uuid, items: &[Published]) {
        let subscribers = self.subscribers.borrow();
        let Some(list) = subscribers.get(project_id) else {
            return;
        };
        let mut overflowed = Vec::new();
        let mut conns = self.conns.borrow_mut();
        for id in list {
            let Some(socket) = conns.get_mut(*id).and_then(|e| e.socket.as_mut()) else {
                continue;
            };
            let Some(sub) = &socket.subscription else {
                continue;
            };
            if socket.closing {
                // Its close frame is queued: nothing may follow it.
                continue;
            }
            let outcome = deliver_to(&mut socket.ring, &sub.filters, items);
            if outcome.dropped > 0 {
                self.counters
                    .stream_messages_dropped
                    .fetch_add(outcome.dropped, Relaxed);
            }
            if outcome.overflowed {
                overflowed.push(*id);
            }
            let queued = outcome.queued > 0;
            if queued && !socket.writing {
                socket.wake.notify_one();
            }
        }
        drop(conns);
        drop(subscribers);
        for id in overflowed {
            self.disconnect_slow(id);
        }
    }

    fn welcome(&self, id: ConnId, project_id: Uuid, frame: Bytes) {
        {
            let mut conns = self.conns.borrow_mut();
            let Some(socket) = conns.get_mut(id).and_then(|e| e.socket.as_mut()) else {
                return;
            };
            if socket.closing {
                // Its close frame may be out already: nothing may follow it.
                return;
            }
            let Some(sub) = socket.subscription.as_mut() else {
                return;
            };
            sub.welcomed = true;
            sub.welcome = Some(frame);
            // Replies queued meanwhile go out now, behind the welcome.
            socket.wake.notify_one();
        }
        self.subscribers
            .borrow_mut()
            .entry(project_id)
            .or_default()
            .push(id);
    }

    fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Project(row, ack) => {
                if mesh::owner_of(&row.id, self.shard_count()) == self.index {
                    let shards = self.shard_count();
                    self.owned
                        .borrow_mut()
                        .entry(row.id)
                        .or_insert_with(|| ProjectState::new(shards));
                }
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
            ShardMsg::Welcome {
                conn,
                project_id,
                frame,
            } => self.welcome(conn, project_id, frame),
            ShardMsg::Publish { project_id, items } => self.deliver(&project_id, &items),
            ShardMsg::CreateProject {
                project,
                keys,
                reply,
            } => self.create_project(project, keys, reply),
            ShardMsg::Drain => self.begin_drain(),
            ShardMsg::Exit => {}
            other => self.handle_owned(other),
        }
    }

    /// Hands this turn's rows to the store writer: each touched issue's row, built now from its
    /// newest state, then the events in the order they were accepted. `ack` fires after the
    /// commit that holds them (`--ack durable`).
    pub fn flush_store(&self, ack: Option<Ack>) {
        let turn = std::mem::take(&mut *self.store_turn.borrow_mut());
        if turn.events.is_empty() && turn.issues.is_empty() && ack.is_none() {
            return;
        }
        let owned = self.owned.borrow();
        let mut changes: Vec<Change> = turn
            .issues
            .iter()
            .filter_map(|(project_id, issue_id)| owned.get(project_id)?.issue(issue_id))
            .map(|issue| Change::Issue(issue.row()))
            .collect();
        changes.extend(turn.events.into_iter().map(Change::Event));
        self.store.submit(changes, ack);
    }

    /// This turn's rows for the store, to add to. Their hand-over (`flush_store`) is made
    /// once the reactor has run the tasks that are ready now, so that everything one turn
    /// accepts, from connections and mesh messages alike, goes to the store together.
    pub fn store_turn(&self) -> RefMut<'_, StoreTurn> {
        if !self.store_turn_due.replace(true) {
            self.store_turn_wanted.notify_one();
        }
        self.store_turn.borrow_mut()
    }

    /// A revoked key stops working everywhere, open WebSockets included (close 1008).
    fn close_sessions_of_key(&self, key_id: Uuid) {
        let sessions: Vec<ConnId> = self
            .conns
            .borrow()
            .iter()
            .filter(|(_, e)| e.socket.as_ref().is_some_and(|s| s.key_id == key_id))
            .map(|(id, _)| id)
            .collect();
        for id in sessions {
            let frame = encode_close(1008, "key revoked");
            self.close_socket(id, frame.into(), CloseReason::Normal);
        }
    }

    /// Runs on shard 0 only, so a slug is checked and taken in one place.
    fn create_project(
        self: &Rc<Self>,
        project: ProjectRow,
        keys: Vec<KeyRow>,
        reply: mesh::Reply<Result<(), DirectoryError>>,
    ) {
        debug_assert_eq!(self.index, 0);
        if self.directory.borrow().slug_taken(&project.slug)
            || !self.pending_slugs.borrow_mut().insert(project.slug.clone())
        {
            let _ = reply.send(Err(DirectoryError::SlugTaken));
            return;
        }
        let shard = self.clone();
        tokio_uring::spawn(async move {
            let slug = project.slug.clone();
            let mut changes = vec![Change::Project(project)];
            changes.extend(keys.into_iter().map(Change::Key));
            let result = shard.publish_directory(changes).await;
            shard.pending_slugs.borrow_mut().remove(&slug);
            let _ = reply.send(result);
        });
    }

    /// Commits directory changes (projects, keys), then applies them on every shard; Ok once
    /// all have them.
    pub async fn publish_directory(&self, changes: Vec<Change>) -> Result<(), DirectoryError> {
        let (ack, committed) = tokio::sync::oneshot::channel();
        self.store.submit(changes.clone(), Some(ack));
        match committed.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "storing a directory change failed");
                return Err(DirectoryError::StorageUnavailable);
            }
            Err(_) => return Err(DirectoryError::ShuttingDown),
        }
        for change in changes {
            for to in 0..self.shard_count() {
                let applied = match &change {
                    Change::Project(row) => {
                        let row = row.clone();
                        self.mesh
                            .ask(to, |reply| ShardMsg::Project(row, Some(reply)))
                            .await
                    }
                    Change::Key(row) => {
                        let row = row.clone();
                        self.mesh
                            .ask(to, |reply| ShardMsg::Key(row, Some(reply)))
                            .await
                    }
                    Change::Issue(_) | Change::Event(_) => continue,
                };
                applied.map_err(|_| DirectoryError::ShuttingDown)?;
            }
        }
        Ok(())
    }

    /// Shutdown, first step: no new connections; WebSockets get 1001; idle HTTP connections close.
    fn begin_drain(&self) {
        self.draining.set(true);
        let ids = self.conns.borrow().ids();
        for id in ids {
            let (is_socket, busy) = match self.conns.borrow().get(id) {
                Some(entry) => (entry.socket.is_some(), entry.busy),
                None => continue,
            };
            if is_socket {
                self.close_for_shutdown(id);
            } else if !busy {
                self.force_close(id, CloseReason::Shutdown);
            }
        }
        if self.conns.borrow().is_empty() {
            self.report_drained();
        }
    }

    fn report_drained(&self) {
        if self.drained_reported.replace(true) {
            return;
        }
        let _ = DRAINED.with(|d| d.borrow().as_ref().map(|tx| tx.send(self.index)));
    }

    /// One wheel tick: fire due timers; on the drain tick, write what waits and find stalled clients.
    fn on_tick(self: &Rc<Self>, tick: u64) {
        let mut fired = Vec::new();
        self.wheel.borrow_mut().advance(tick, &mut fired);
        for timer in fired {
            match timer {
                Timer::Deadline(id) => self.check_deadline(id),
                Timer::Ping(id) => self.ping(id),
                Timer::Pong(id) => self.force_close(id, CloseReason::PongTimeout),
                Timer::CloseGrace(id) => self.force_close(id, CloseReason::Normal),
                Timer::Drain => self.drain_tick(),
                Timer::Wake(wake) => {
                    let _ = wake.send(());
                }
            }
        }
    }

    fn ping(&self, id: ConnId) {
        if !self.conns.borrow().contains(id) {
            return;
        }
        let pong_key = self.schedule(self.config.pong_timeout_ms, Timer::Pong(id));
        let next_ping = self.schedule(self.config.ping_interval_ms, Timer::Ping(id));
        let old_pong = {
            let mut conns = self.conns.borrow_mut();
            let entry = conns.get_mut(id).expect("checked above");
            entry.timer = Some(next_ping);
            entry
                .socket
                .as_mut()
                .and_then(|socket| socket.pong_timer.replace(pong_key))
        };
        self.cancel(old_pong);
        self.enqueue(id, Bytes::from_static(PING_FRAME), Kind::Control);
    }

    fn drain_tick(&self) {
        let now = self.now_tick();
        let stall_ticks = Self::ticks(self.config.stall_timeout_ms);
        let mut stalled = Vec::new();
        for (id, entry) in self.conns.borrow_mut().iter_mut() {
            let fd = entry.fd;
            let Some(socket) = &mut entry.socket else {
                continue;
            };
            if socket.held() {
                // Nothing may go out yet; it is not the client that is slow.
                continue;
            }
            // A write waits for room in the kernel's buffer, which a slow reader frees a little
            // at a time, long before the write completes: that is progress too.
            if socket.writing
                && now > socket.last_progress_tick
                && peer_took_bytes(fd, &mut socket.send_queue_seen)
            {
                socket.last_progress_tick = now;
            }
            let waiting = socket.writing || !socket.ring.is_empty();
            if waiting && now.saturating_sub(socket.last_progress_tick) >= stall_ticks {
                stalled.push(id);
            } else if !socket.ring.is_empty() && !socket.writing {
                socket.wake.notify_one();
            }
        }
        for id in stalled {
            self.disconnect_slow(id);
        }
        self.schedule(self.config.drain_interval_ms, Timer::Drain);
    }
}

/// Whether the kernel's send queue of `fd` shrank since `seen` was taken (the peer acknowledged
/// bytes, so it reads); updates `seen`. While a write waits nothing is added to the queue, so it
/// can only shrink as the peer takes bytes.
fn peer_took_bytes(fd: RawFd, seen: &mut Option<u32>) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: ioctl on the fd of a live connection with a pointer to a live c_int.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } == 0;
    let now = ok.then_some(queued as u32);
    let took = matches!((*seen, now), (Some(before), Some(now)) if now < before);
    *seen = now;
    took
}

/// See [`Shard::sleep`].
pub struct Sleep<'a> {
    wheel: &'a RefCell<TimerWheel<Timer>>,
    key: TimerKey,
    woken: oneshot::Receiver<()>,
}

impl<'a> Sleep<'a> {
    fn new(wheel: &'a RefCell<TimerWheel<Timer>>, after_ticks: u64) -> Self {
        let (wake, woken) = oneshot::channel();
        let key = wheel.borrow_mut().schedule(after_ticks, Timer::Wake(wake));
        Sleep { wheel, key, woken }
    }
}

impl Future for Sleep<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // An error means the wheel dropped the timer, which only happens as the shard ends.
        Pin::new(&mut self.woken).poll(cx).map(|_| ())
    }
}

impl Drop for Sleep<'_> {
    fn drop(&mut self) {
        // A no-op once the timer fired (keys are generation-checked).
        self.wheel.borrow_mut().cancel(self.key);
    }
}

/// `future`'s output, or None if `sleep` ends first.
async fn until<F: Future>(mut sleep: Sleep<'_>, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(&mut sleep).poll(cx).map(|()| None)
    })
    .await
}

/// What one reactor turn gives the store. One submission per turn instead of one per event
/// (each submission may wake the writer), and one row per touched issue however many events it
/// took: rows are full snapshots, so only the newest matters.
#[derive(Default)]
pub struct StoreTurn {
    /// (project, issue) in the order first touched.
    issues: Vec<(Uuid, Uuid)>,
    touched: IdSet<Uuid>,
    events: Vec<EventRow>,
}

impl StoreTurn {
    pub fn touch(&mut self, project_id: Uuid, issue_id: Uuid) {
        if self.touched.insert(issue_id) {
            self.issues.push((project_id, issue_id));
        }
    }

    pub fn event(&mut self, row: EventRow) {
        self.events.push(row);
    }
}

/// A server ping frame with an empty payload.
const PING_FRAME: &[u8] = &[0x89, 0x00];

thread_local! {
    static DRAINED: RefCell<Option<std::sync::mpsc::Sender<usize>>> = const { RefCell::new(None) };
}

/// Submission slots of a reactor's ring.
const RING_ENTRIES: u32 = 1024;

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
    DRAINED.with(|d| *d.borrow_mut() = Some(init.drained.clone()));
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
            owned: RefCell::new(init.owned),
            conns: RefCell::new(Registry::new()),
            subscribers: RefCell::default(),
            wheel: RefCell::new(TimerWheel::new(WHEEL_SLOTS)),
            draining: Cell::new(false),
            store_turn: RefCell::new(StoreTurn::default()),
            store_turn_due: Cell::new(false),
            store_turn_wanted: Notify::new(),
            drained_reported: Cell::new(false),
            pending_slugs: RefCell::new(Default::default()),
            started: Instant::now(),
        });
        let mut accept_tasks = Vec::new();
        for listener in init.listeners {
            let listener = tokio_uring::net::TcpListener::from_std(listener);
            accept_tasks.push(tokio_uring::spawn(accept_loop(
                shard.clone(),
                listener,
                init.serve,
            )));
        }
        tokio_uring::spawn(shard.mesh.clone().forward());
        tokio_uring::spawn(tick_loop(shard.clone()));
        tokio_uring::spawn(store_turn_loop(shard.clone()));
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
async fn store_turn_loop(shard: Rc<Shard>) {
    loop {
        shard.store_turn_wanted.notified().await;
        shard.store_turn_due.set(false);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DRAIN_INTERVAL_MS_MAX, DRAIN_INTERVAL_MS_MIN};
    use std::task::Waker;

    /// Moves the wheel to `tick` and ends the sleeps due, as `on_tick` does.
    fn advance(wheel: &RefCell<TimerWheel<Timer>>, tick: u64) {
        let mut fired = Vec::new();
        wheel.borrow_mut().advance(tick, &mut fired);
        for timer in fired {
            if let Timer::Wake(wake) = timer {
                let _ = wake.send(());
            }
        }
    }

    #[test]
    fn every_drain_interval_is_kept_to_within_a_tick() {
        // `--drain-interval-ms` has always accepted 10: the tick has to stay that fine.
        assert_eq!(DRAIN_INTERVAL_MS_MIN, 10);
        assert_eq!(
            Shard::ticks(DRAIN_INTERVAL_MS_MIN) * TICK_MS,
            DRAIN_INTERVAL_MS_MIN
        );
        for interval_ms in DRAIN_INTERVAL_MS_MIN..=DRAIN_INTERVAL_MS_MAX {
            let period_ms = Shard::ticks(interval_ms) * TICK_MS;
            assert!(
                (interval_ms..interval_ms + TICK_MS).contains(&period_ms),
                "a {interval_ms} ms interval drains every {period_ms} ms"
            );
        }
    }

    #[test]
    fn the_shortest_drain_interval_drains_at_that_rate() {
        // As `drain_tick` does: each drain schedules the next one interval later.
        let mut wheel = TimerWheel::new(WHEEL_SLOTS);
        wheel.schedule(Shard::ticks(DRAIN_INTERVAL_MS_MIN), Timer::Drain);
        let mut drains = 0;
        for tick in 1..=1000 / TICK_MS {
            let mut fired = Vec::new();
            wheel.advance(tick, &mut fired);
            for timer in fired {
                assert!(matches!(timer, Timer::Drain));
                drains += 1;
                wheel.schedule(Shard::ticks(DRAIN_INTERVAL_MS_MIN), Timer::Drain);
            }
        }
        assert_eq!(drains, 1000 / DRAIN_INTERVAL_MS_MIN);
    }

    #[test]
    fn a_sleep_ends_at_its_tick_and_leaves_the_wheel_when_dropped() {
        let wheel = RefCell::new(TimerWheel::new(WHEEL_SLOTS));
        let mut cx = Context::from_waker(Waker::noop());
        let mut sleep = Sleep::new(&wheel, 3);
        advance(&wheel, 2);
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_pending());
        advance(&wheel, 3);
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_ready());
        drop(sleep);

        let abandoned = Sleep::new(&wheel, 3);
        assert_eq!(wheel.borrow().len(), 1);
        drop(abandoned);
        assert!(wheel.borrow().is_empty());
    }

    #[test]
    fn until_gives_the_output_or_none_once_the_sleep_ends() {
        let wheel = RefCell::new(TimerWheel::new(WHEEL_SLOTS));
        let mut cx = Context::from_waker(Waker::noop());
        let answered = pin!(until(Sleep::new(&wheel, 5), std::future::ready(7)));
        assert_eq!(answered.poll(&mut cx), Poll::Ready(Some(7)));
        assert!(wheel.borrow().is_empty(), "the answer cancels the timer");

        let mut unanswered = pin!(until(Sleep::new(&wheel, 5), std::future::pending::<u32>()));
        assert!(unanswered.as_mut().poll(&mut cx).is_pending());
        advance(&wheel, 4);
        assert!(unanswered.as_mut().poll(&mut cx).is_pending());
        advance(&wheel, 5);
        assert_eq!(unanswered.as_mut().poll(&mut cx), Poll::Ready(None));
    }
}
