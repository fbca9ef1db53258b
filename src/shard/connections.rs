//! The shard's connections: the slab entry of each, its deadline, and for a WebSocket its ring
//! of waiting frames and its writer's state; ending connections from the server side.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use std::rc::Rc;
use tokio::sync::Notify;
use uuid::Uuid;

use super::wheel::TimerKey;
use super::Shard;
use crate::conn::registry::ConnId;
use crate::conn::ring::{Kind, Push, Ring};
use crate::metrics::{CloseReason, ConnKind};
use crate::ws::codec::{
    encode_close, CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION, CLOSE_TRY_AGAIN_LATER,
};

/// A WebSocket connection's outgoing side: its ring of waiting frames and its writer's state.
pub struct Socket {
    pub ring: Ring<Bytes>,
    pub wake: Rc<Notify>,
    pub writing: bool,
    /// The session is ending: nothing more is queued, and the writer stops once what may still
    /// go out (then the close frame) is written.
    pub closing: bool,
    /// The close frame, sent after everything else.
    pub close_frame: Option<Bytes>,
    /// Nothing may be written yet but the close frame (a stream waiting for its first message).
    pub held: bool,
    /// Frames that go out, in order, before everything in the ring: a stream's first message,
    /// and what a resume replays (not subject to the ring's bounds: the owner's history bounds
    /// them).
    pub ahead: VecDeque<Bytes>,
    pub last_progress_tick: u64,
    /// The kernel's send queue for this socket when the drain tick last looked, while a write
    /// waits; `None` after a write added to it (see `peer_took_bytes`).
    pub send_queue_seen: Option<u32>,
    pub pong_timer: Option<TimerKey>,
    /// The key the session opened with.
    pub key_id: Uuid,
}

impl Socket {
    pub fn new(capacity: usize, wake: Rc<Notify>, key_id: Uuid, held: bool) -> Socket {
        Socket {
            ring: Ring::new(capacity),
            wake,
            writing: false,
            closing: false,
            close_frame: None,
            held,
            ahead: VecDeque::new(),
            last_progress_tick: 0,
            send_queue_seen: None,
            pong_timer: None,
            key_id,
        }
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
    pub(super) fd: RawFd,
    pub(super) kind: ConnKind,
    /// A request is partly read or being answered (HTTP), so shutdown lets it finish.
    pub(super) busy: bool,
    /// The wheel timer of this connection: its deadline check (HTTP) or its next ping
    /// (WebSocket).
    pub(super) timer: Option<TimerKey>,
    /// The tick `timer` fires at (HTTP).
    pub(super) timer_tick: u64,
    /// HTTP: what ends the connection, and at which tick, unless it moves on before.
    pub(super) deadline: Option<(Deadline, u64)>,
    /// Why the server ended the connection, when it did.
    pub(super) close_reason: Option<CloseReason>,
    /// It holds a place under `--max-connections`.
    pub(super) admitted: bool,
    pub(super) socket: Option<Socket>,
}

impl Shard {
    /// Registers an accepted connection; it holds a place under `--max-connections` until it
    /// is unregistered. Not admitted (false): it is one too many, to be answered 503.
    pub fn register(&self, fd: RawFd) -> (ConnId, bool) {
        self.counters.conns_accepted.fetch_add(1, Relaxed);
        self.counters.opened(ConnKind::Http);
        let admitted = self.limits.connections.try_take(1);
        let id = self.conns_mut().insert(ConnEntry {
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

    /// Forgets a connection at once: timers, socket, slab slot.
    pub fn unregister(&self, id: ConnId, default_reason: CloseReason) {
        let Some(entry) = self.conns_mut().remove(id) else {
            return;
        };
        if entry.admitted {
            self.limits.connections.give_back(1);
        }
        self.cancel(entry.timer);
        if let Some(socket) = &entry.socket {
            self.cancel(socket.pong_timer);
        }
        self.counters
            .closed(entry.kind, entry.close_reason.unwrap_or(default_reason));
        if self.draining.get() && self.conns.borrow().is_empty() {
            self.report_drained();
        }
    }

    /// Marks whether a request is partly read or being answered (shutdown lets it finish).
    pub fn set_busy(&self, id: ConnId, busy: bool) {
        if let Some(entry) = self.conns_mut().get_mut(id) {
            entry.busy = busy;
        }
    }

    /// Why the server ended the connection, once it has.
    pub fn close_reason(&self, id: ConnId) -> Option<CloseReason> {
        self.conns.borrow().get(id).and_then(|e| e.close_reason)
    }

    /// Makes an upgraded connection a WebSocket of `kind` with `socket` as its outgoing side.
    /// False if the connection is gone.
    pub fn open_socket(&self, id: ConnId, kind: ConnKind, mut socket: Socket) -> bool {
        socket.last_progress_tick = self.now_tick();
        let mut conns = self.conns_mut();
        let Some(entry) = conns.get_mut(id) else {
            return false;
        };
        self.counters.changed_kind(entry.kind, kind);
        entry.kind = kind;
        entry.busy = false;
        entry.socket = Some(socket);
        true
    }

    /// Runs `f` on a WebSocket's outgoing side; None if the connection is gone.
    pub fn with_socket<T>(&self, id: ConnId, f: impl FnOnce(&mut Socket) -> T) -> Option<T> {
        self.conns_mut()
            .get_mut(id)
            .and_then(|e| e.socket.as_mut())
            .map(f)
    }

    /// Ends a connection from the server side: records why and shuts the socket so its tasks
    /// see the end of their pending reads and writes.
    pub fn force_close(&self, id: ConnId, reason: CloseReason) {
        self.shut(id, libc::SHUT_RDWR, Some(reason));
    }

    /// Closes a stream client with 1013 `too slow`: more distinct issues wait for it than a
    /// client may have. What waits is forgotten (the client may resume); the close frame goes
    /// out next, or the stall timeout ends a client that reads nothing. Counted once.
    pub fn close_too_slow(&self, id: ConnId) {
        let mut conns = self.conns_mut();
        let Some(entry) = conns.get_mut(id) else {
            return;
        };
        if entry.close_reason.is_some() {
            return;
        }
        entry.close_reason = Some(CloseReason::SlowClient);
        self.counters.stream_too_slow_closes.fetch_add(1, Relaxed);
        if let Some(socket) = entry.socket.as_mut() {
            socket.ring.clear();
            socket.ahead.clear();
            socket.closing = true;
            socket.close_frame = Some(Bytes::from(encode_close(CLOSE_TRY_AGAIN_LATER, "too slow")));
            socket.wake.notify_one();
        }
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

    /// Stops reading for the reason already recorded (the end of a lingering close).
    pub(super) fn stop_reading(&self, id: ConnId) {
        self.shut(id, libc::SHUT_RD, None);
    }

    /// Shuts the socket's `how` side(s), recording `reason` unless one was recorded before;
    /// true if this is the first reason recorded (the first decision to close).
    fn shut(&self, id: ConnId, how: libc::c_int, reason: Option<CloseReason>) -> bool {
        let mut conns = self.conns_mut();
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

    /// Queues a frame outside any stream's offsets (a reply, a ping) on a WebSocket connection
    /// and wakes its writer; false if the ring refused it.
    /// Once the session is closing nothing more may be queued (RFC 6455 section 5.5.1: nothing
    /// follows the close frame), so a later frame is discarded.
    pub fn enqueue(&self, id: ConnId, frame: Bytes, kind: Kind) -> bool {
        let pushed = self.with_ring(id, |ring| ring.push(frame, kind, 0));
        match pushed {
            Some(Push::Overflow) => false,
            Some(Push::DroppedOldest) => {
                self.counters.stream_messages_dropped.fetch_add(1, Relaxed);
                true
            }
            Some(Push::Queued) | None => true,
        }
    }

    /// Runs `push` on the ring of a WebSocket that is not closing, then wakes its writer if
    /// frames wait; None if the connection is gone or closing.
    pub fn with_ring<T>(&self, id: ConnId, push: impl FnOnce(&mut Ring<Bytes>) -> T) -> Option<T> {
        self.with_socket(id, |socket| {
            if socket.closing {
                return None;
            }
            let pushed = push(&mut socket.ring);
            if !socket.ring.is_empty() && !socket.writing {
                socket.wake.notify_one();
            }
            Some(pushed)
        })
        .flatten()
    }

    /// Releases a held socket with `first` as the frames that go out before all else; false
    /// if it is gone or closing (then nothing more goes out but its close frame).
    pub fn release(&self, id: ConnId, first: Vec<Bytes>) -> bool {
        self.with_socket(id, |socket| {
            if socket.closing {
                return false;
            }
            socket.held = false;
            socket.ahead.extend(first);
            socket.wake.notify_one();
            true
        })
        .unwrap_or(false)
    }

    /// Ends a WebSocket session: the writer sends what may still go out, then `frame`, then
    /// shuts the socket.
    pub fn close_socket(&self, id: ConnId, frame: Bytes, reason: CloseReason) {
        let mut conns = self.conns_mut();
        let Some(entry) = conns.get_mut(id) else {
            return;
        };
        entry.close_reason.get_or_insert(reason);
        if let Some(socket) = entry.socket.as_mut() {
            socket.closing = true;
            socket.close_frame.get_or_insert(frame);
            socket.wake.notify_one();
        }
    }

    /// Closes a WebSocket with 1001 because the server is going down.
    pub fn close_for_shutdown(&self, id: ConnId) {
        let frame = encode_close(CLOSE_GOING_AWAY, "server shutting down");
        self.close_socket(id, Bytes::from(frame), CloseReason::Shutdown);
    }

    /// A revoked key stops working everywhere, open WebSockets included (close 1008).
    pub(super) fn close_sessions_of_key(&self, key_id: Uuid) {
        let sessions: Vec<ConnId> = self
            .conns
            .borrow()
            .iter()
            .filter(|(_, e)| e.socket.as_ref().is_some_and(|s| s.key_id == key_id))
            .map(|(id, _)| id)
            .collect();
        for id in sessions {
            let frame = encode_close(CLOSE_POLICY_VIOLATION, "key revoked");
            self.close_socket(id, frame.into(), CloseReason::Normal);
        }
    }
}
