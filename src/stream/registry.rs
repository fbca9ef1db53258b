//! Who watches what: each shard's registry of its stream subscribers and their filters, the
//! owner's count of subscribers per shard, and fan-out from the owner into subscribers' rings.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::{deliver_to, resumed_frame, Filters, Published, Resumption};
use crate::conn::registry::ConnId;
use crate::conn::ring::Kind;
use crate::shard::Shard;
use crate::IdMap;

/// The owner's count of a project's subscribers on each shard; fan-out goes to shards with any.
#[derive(Default)]
pub struct Watchers {
    by_shard: Vec<u32>,
}

impl Watchers {
    pub fn add(&mut self, shard: usize) {
        if self.by_shard.len() <= shard {
            self.by_shard.resize(shard + 1, 0);
        }
        self.by_shard[shard] += 1;
    }

    pub fn remove(&mut self, shard: usize) {
        if let Some(count) = self.by_shard.get_mut(shard) {
            *count = count.saturating_sub(1);
        }
    }

    pub fn any(&self) -> bool {
        self.by_shard.iter().any(|n| *n > 0)
    }

    pub fn shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.by_shard
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(shard, _)| shard)
    }
}

/// Sends a project's new messages to every shard with subscribers of it. Sending only queues,
/// so the owner may call this while it holds the project's state.
pub fn publish(shard: &Shard, project_id: Uuid, watchers: &Watchers, items: Vec<Published>) {
    if items.is_empty() {
        return;
    }
    let items: Arc<[Published]> = items.into();
    for to in watchers.shards() {
        let items = items.clone();
        shard
            .mesh()
            .run(to, move |shard| deliver(shard, &project_id, &items));
    }
}

struct Subscriber {
    project_id: Uuid,
    filters: Filters,
    /// Live fan-out reaches the subscriber with the messages after this offset: its welcome's,
    /// or its last resume's.
    live_from: u64,
}

/// A shard's stream subscribers.
#[derive(Default)]
struct Registry {
    subscribers: IdMap<ConnId, Subscriber>,
    /// Welcomed subscribers of each project: fan-out reaches them.
    by_project: IdMap<Uuid, Vec<ConnId>>,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::default();
}

/// A stream socket of this shard subscribes to a project, with no filters yet. It gets nothing
/// until its welcome arrives (see `welcome`).
pub fn join(shard: &Shard, conn: ConnId, project_id: Uuid) {
    shard.counters().stream_subscriptions.fetch_add(1, Relaxed);
    REGISTRY.with_borrow_mut(|registry| {
        let subscriber = Subscriber {
            project_id,
            filters: Filters::default(),
            live_from: 0,
        };
        registry.subscribers.insert(conn, subscriber);
    });
}

/// The subscriber's filters from now on; false if it is not subscribed.
pub fn set_filters(conn: ConnId, filters: Filters) -> bool {
    REGISTRY.with_borrow_mut(|registry| match registry.subscribers.get_mut(&conn) {
        Some(subscriber) => {
            subscriber.filters = filters;
            true
        }
        None => false,
    })
}

/// What the owner sends a new subscriber, in one step with its joining the fan-out: the first
/// message (the unresolved count with the epoch and the last offset) and, for a connection that
/// resumes at the upgrade, what it missed.
pub struct Welcome {
    pub frame: Bytes,
    pub last_offset: u64,
    pub resumption: Option<Resumption>,
    /// Messages after `last_offset` that fan-out sent before this welcome arrived (a mirror
    /// of another node's stream received them while the owner's answer travelled); they go
    /// out right after it, through the subscriber's filters.
    pub live: Vec<Published>,
}

/// The owner's welcome of a subscriber: its messages go out before anything else, and fan-out
/// reaches it from now on. The owner sent this behind every message it published before, and
/// ahead of every one after (one queue, in order), so replay and live meet without a gap or a
/// duplicate.
pub fn welcome(shard: &Shard, conn: ConnId, project_id: Uuid, welcome: Welcome) {
    let frames = REGISTRY.with_borrow_mut(|registry| {
        let subscriber = registry.subscribers.get_mut(&conn)?;
        subscriber.live_from = welcome.last_offset;
        let mut frames = vec![welcome.frame];
        if let Some(resumption) = &welcome.resumption {
            let replayed = replay_into(&mut frames, &resumption.replay, &subscriber.filters);
            frames.push(resumed_reply(shard, resumption, replayed));
        }
        replay_into(&mut frames, &welcome.live, &subscriber.filters);
        Some(frames)
    });
    if let Some(frames) = frames {
        if shard.release(conn, frames) {
            REGISTRY.with_borrow_mut(|registry| {
                registry
                    .by_project
                    .entry(project_id)
                    .or_default()
                    .push(conn)
            });
        }
    }
}

/// The owner's answer to a live subscriber's `subscribe` with `since`, sent behind every message
/// it published before serving it. When it recovers, what waits unsent in the subscriber's ring
/// is set aside (replies keep their order) and the kept messages after the client's offset go
/// out instead, through its current filters, except those this connection was already handed
/// since it went live; then `resumed`, then live messages. When it does not, `resumed` follows
/// what already waits.
pub fn resumed(shard: &Shard, conn: ConnId, resumption: Resumption) {
    let queued = REGISTRY.with_borrow_mut(|registry| {
        let subscriber = registry.subscribers.get_mut(&conn)?;
        let live_from = std::mem::replace(&mut subscriber.live_from, resumption.last_offset);
        if !resumption.recovered {
            let frame = resumed_reply(shard, &resumption, 0);
            return Some(shard.enqueue(conn, frame, Kind::Control));
        }
        let filters = &subscriber.filters;
        shard.with_socket(conn, |socket| {
            if socket.closing {
                return true;
            }
            // Handed to the writer since the connection went live: the client has them.
            let taken_through = socket.ring.taken_through();
            let handed = |offset: u64| offset > live_from && offset <= taken_through;
            socket.ring.take_controls_into(&mut socket.ahead);
            let mut frames = Vec::new();
            let unsent: Vec<&Published> = resumption
                .replay
                .iter()
                .filter(|message| !handed(message.offset))
                .collect();
            let replayed = replay_into(&mut frames, unsent, filters);
            frames.push(resumed_reply(shard, &resumption, replayed));
            socket.ahead.extend(frames);
            socket.wake.notify_one();
            true
        })
    });
    if queued == Some(false) {
        shard.disconnect_slow(conn);
    }
}

/// Appends the frames of the replayed messages that pass `filters`; how many.
fn replay_into<'a>(
    frames: &mut Vec<Bytes>,
    replay: impl IntoIterator<Item = &'a Published>,
    filters: &Filters,
) -> u64 {
    let before = frames.len();
    frames.extend(
        replay
            .into_iter()
            .filter(|message| filters.matches(message))
            .map(|message| message.frame.clone()),
    );
    (frames.len() - before) as u64
}

/// The `resumed` reply, counted by outcome.
fn resumed_reply(shard: &Shard, resumption: &Resumption, replayed: u64) -> Bytes {
    let counters = shard.counters();
    if resumption.recovered {
        counters.stream_resumes_recovered.fetch_add(1, Relaxed);
        counters
            .stream_replayed_messages
            .fetch_add(replayed, Relaxed);
    } else {
        counters.stream_resumes_not_recovered.fetch_add(1, Relaxed);
    }
    resumed_frame(
        resumption.recovered,
        replayed,
        &resumption.epoch,
        resumption.last_offset,
    )
}

/// Closes this shard's subscribers of a project with `code` (their stream cannot go on here;
/// they reconnect and resume).
pub fn close_project(shard: &Shard, project_id: &Uuid, code: u16, reason: &str) {
    let conns = REGISTRY.with_borrow(|registry| {
        registry
            .by_project
            .get(project_id)
            .cloned()
            .unwrap_or_default()
    });
    for conn in conns {
        let frame = crate::ws::codec::encode_close(code, reason);
        shard.close_socket(conn, frame.into(), crate::metrics::CloseReason::Normal);
    }
}

/// The subscriber's session ended; the project it watched, for the owner to be told.
pub fn leave(shard: &Shard, conn: ConnId) -> Option<Uuid> {
    let project_id = REGISTRY.with_borrow_mut(|registry| {
        let subscriber = registry.subscribers.remove(&conn)?;
        let project_id = subscriber.project_id;
        if let Some(list) = registry.by_project.get_mut(&project_id) {
            list.retain(|c| *c != conn);
            if list.is_empty() {
                registry.by_project.remove(&project_id);
            }
        }
        Some(project_id)
    })?;
    shard.counters().stream_subscriptions.fetch_sub(1, Relaxed);
    Some(project_id)
}

/// Pushes a project's messages into the rings of the matching local subscribers.
fn deliver(shard: &Rc<Shard>, project_id: &Uuid, items: &[Published]) {
    let mut overflowed = Vec::new();
    let mut dropped = 0;
    REGISTRY.with_borrow(|registry| {
        let Some(list) = registry.by_project.get(project_id) else {
            return;
        };
        for conn in list {
            let Some(subscriber) = registry.subscribers.get(conn) else {
                continue;
            };
            let Some(delivery) =
                shard.with_ring(*conn, |ring| deliver_to(ring, &subscriber.filters, items))
            else {
                // Closing: nothing may follow its close frame.
                continue;
            };
            dropped += delivery.dropped;
            if delivery.overflowed {
                overflowed.push(*conn);
            }
        }
    });
    if dropped > 0 {
        shard
            .counters()
            .stream_messages_dropped
            .fetch_add(dropped, Relaxed);
    }
    for conn in overflowed {
        shard.close_too_slow(conn);
    }
}
