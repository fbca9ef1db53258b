//! Who watches what: each shard's registry of its stream subscribers and their filters, the
//! owner's count of subscribers per shard, and fan-out from the owner into subscribers' rings.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::{deliver_to, Filters, Published};
use crate::conn::registry::ConnId;
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

    fn shards(&self) -> impl Iterator<Item = usize> + '_ {
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

/// A welcomed subscriber, as fan-out reads it.
struct Subscriber {
    conn: ConnId,
    filters: Filters,
}

struct Session {
    project_id: Uuid,
    /// The filters of a subscriber not welcomed yet; None once it is in `by_project`.
    waiting: Option<Filters>,
}

/// A shard's stream subscribers.
#[derive(Default)]
struct Registry {
    sessions: IdMap<ConnId, Session>,
    /// Welcomed subscribers of each project: fan-out reaches them, reading their filters here
    /// without another lookup.
    by_project: IdMap<Uuid, Vec<Subscriber>>,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::default();
}

/// A stream socket of this shard subscribes to a project, with no filters yet. It gets nothing
/// until its welcome arrives (see `welcome`).
pub fn join(shard: &Shard, conn: ConnId, project_id: Uuid) {
    shard.counters().stream_subscriptions.fetch_add(1, Relaxed);
    REGISTRY.with_borrow_mut(|registry| {
        let session = Session {
            project_id,
            waiting: Some(Filters::default()),
        };
        registry.sessions.insert(conn, session);
    });
}

/// The subscriber's filters from now on; false if it is not subscribed.
pub fn set_filters(conn: ConnId, filters: Filters) -> bool {
    REGISTRY.with_borrow_mut(|registry| {
        let Some(session) = registry.sessions.get_mut(&conn) else {
            return false;
        };
        if let Some(waiting) = &mut session.waiting {
            *waiting = filters;
            return true;
        }
        let subscriber = registry
            .by_project
            .get_mut(&session.project_id)
            .and_then(|list| list.iter_mut().find(|s| s.conn == conn));
        match subscriber {
            Some(subscriber) => {
                subscriber.filters = filters;
                true
            }
            None => false,
        }
    })
}

/// The owner's first message for a subscriber (the unresolved count): it goes out before
/// anything else, and fan-out reaches the subscriber from now on.
pub fn welcome(shard: &Shard, conn: ConnId, project_id: Uuid, frame: Bytes) {
    let waiting =
        REGISTRY.with_borrow(|r| r.sessions.get(&conn).is_some_and(|s| s.waiting.is_some()));
    if waiting && shard.release(conn, frame) {
        REGISTRY.with_borrow_mut(|registry| {
            let Some(filters) = registry
                .sessions
                .get_mut(&conn)
                .and_then(|s| s.waiting.take())
            else {
                return;
            };
            let subscriber = Subscriber { conn, filters };
            registry
                .by_project
                .entry(project_id)
                .or_default()
                .push(subscriber);
        });
    }
}

/// The subscriber's session ended; the project it watched, for the owner to be told.
pub fn leave(shard: &Shard, conn: ConnId) -> Option<Uuid> {
    let project_id = REGISTRY.with_borrow_mut(|registry| {
        let session = registry.sessions.remove(&conn)?;
        let project_id = session.project_id;
        if let Some(list) = registry.by_project.get_mut(&project_id) {
            list.retain(|s| s.conn != conn);
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
        for subscriber in list {
            let Some(delivery) = shard.with_ring(subscriber.conn, |ring| {
                deliver_to(ring, &subscriber.filters, items)
            }) else {
                // Closing: nothing may follow its close frame.
                continue;
            };
            dropped += delivery.dropped;
            if delivery.overflowed {
                overflowed.push(subscriber.conn);
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
        shard.disconnect_slow(conn);
    }
}
