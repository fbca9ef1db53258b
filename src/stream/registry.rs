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

struct Subscriber {
    project_id: Uuid,
    filters: Filters,
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

/// The owner's first message for a subscriber (the unresolved count): it goes out before
/// anything else, and fan-out reaches the subscriber from now on.
pub fn welcome(shard: &Shard, conn: ConnId, project_id: Uuid, frame: Bytes) {
    let subscribed = REGISTRY.with_borrow(|r| r.subscribers.contains_key(&conn));
    if subscribed && shard.release(conn, frame) {
        REGISTRY.with_borrow_mut(|registry| {
            registry
                .by_project
                .entry(project_id)
                .or_default()
                .push(conn)
        });
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
        shard.disconnect_slow(conn);
    }
}
