//! Mirrors: on a node that does not own a project, the project's stream as its owner publishes
//! it over NATS, fanned out to this node's subscribers exactly as local frames are (filters,
//! rings, drop-oldest and offsets unchanged). A mirror lives on the project's shard while the
//! node has subscribers of it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::projects;
use super::remote::{self, Asked, Reply, Request};
use crate::cluster::{self, Cluster};
use crate::conn::registry::ConnId;
use crate::shard::Shard;
use crate::stream::{self, Published, Since, Watchers, Welcome};
use crate::ws::codec::{CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER};
use crate::IdMap;

/// Messages a mirror keeps of what it received, for subscribers whose welcome is on its way
/// from the owner while the messages after it already arrived. A round trip to the owner is
/// milliseconds; this covers it at tens of thousands of messages per second.
const RECENT_MAX: usize = 4096;
/// A mirror tells the owner this often that it still watches the project: the owner
/// publishes the project's messages over NATS only while someone does.
const INTEREST_RENEW_MS: u64 = 10_000;
/// How long the owner counts on a mirror after it last heard of it: a few renewals may be
/// lost before the owner stops publishing (and the mirror, seeing the gap, has its
/// subscribers resume).
pub const INTEREST_LEASE_MS: u64 = 3 * INTEREST_RENEW_MS;
/// A new owner publishes everything for this long: the previous owner's mirrors are unknown to
/// it, and each renews its interest as soon as it sees the new epoch's first message.
pub const TAKEOVER_LEASE_MS: u64 = 5_000;

struct Mirror {
    /// Tells this mirror from a later one of the same project (whose renewals are its own).
    generation: u64,
    watchers: Watchers,
    /// The owner's epoch and the last offset received (or known from a welcome) in it.
    epoch: Option<Arc<str>>,
    last_offset: u64,
    recent: VecDeque<Published>,
}

thread_local! {
    static MIRRORS: RefCell<IdMap<Uuid, Mirror>> = RefCell::default();
    static GENERATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A subscriber `conn` on shard `from` joins a project owned by another node (this runs on the
/// project's shard): the owner sends its welcome, the mirror its messages from then on.
pub fn watch(shard: &Rc<Shard>, project_id: Uuid, from: usize, conn: ConnId, since: Option<Since>) {
    let started = MIRRORS.with_borrow_mut(|mirrors| {
        let mut started = None;
        let mirror = mirrors.entry(project_id).or_insert_with(|| {
            let generation = GENERATIONS.replace(GENERATIONS.get() + 1);
            started = Some(generation);
            Mirror {
                generation,
                watchers: Watchers::default(),
                epoch: None,
                last_offset: 0,
                recent: VecDeque::new(),
            }
        });
        mirror.watchers.add(from);
        started
    });
    if let Some(generation) = started {
        renew_interest(shard.clone(), project_id, generation);
    }
    let shard = shard.clone();
    tokio_uring::spawn(async move {
        let Some(cluster) = cluster::current() else {
            return;
        };
        // Subscribed before asking: every message after the owner's answer reaches the mirror.
        cluster.mirror(project_id).await;
        let request = Request::Watch {
            since: since.clone(),
        };
        match remote::ask(&shard, shard.index(), project_id, &request).await {
            Asked::Answered(Reply::Welcome {
                frame,
                last_offset,
                epoch,
                resumption,
            }) => {
                let live = caught_up(project_id, &epoch, last_offset);
                let welcome = Welcome {
                    frame,
                    last_offset,
                    resumption,
                    live,
                };
                shard.mesh().run(from, move |shard| {
                    stream::welcome(shard, conn, project_id, welcome)
                });
            }
            // This node took the project over: the mirror's subscribers (this one included)
            // became the owner's.
            Asked::TakenHere => {
                let (welcome, _) = projects::welcome_remote(&shard, project_id, since);
                shard.mesh().run(from, move |shard| {
                    stream::welcome(shard, conn, project_id, welcome)
                });
            }
            Asked::Answered(_) | Asked::Unavailable => {
                unwatch(project_id, from);
                shard.mesh().run(from, move |shard| {
                    let frame = crate::ws::codec::encode_close(
                        CLOSE_TRY_AGAIN_LATER,
                        "project owner unavailable",
                    );
                    shard.close_socket(conn, frame.into(), crate::metrics::CloseReason::Normal);
                });
            }
        }
    });
}

/// While the mirror lives, tells the project's owner (whoever it is by then) that this node
/// still watches. A renewal lost is followed by the next, well within the lease.
fn renew_interest(shard: Rc<Shard>, project_id: Uuid, generation: u64) {
    tokio_uring::spawn(async move {
        loop {
            shard.sleep(INTEREST_RENEW_MS).await;
            let alive = MIRRORS.with_borrow(|mirrors| {
                mirrors
                    .get(&project_id)
                    .is_some_and(|mirror| mirror.generation == generation)
            });
            if !alive {
                return;
            }
            tell_interest(&shard, project_id).await;
        }
    });
}

/// Tells the project's owner that this node mirrors it; a lost one is followed by the next,
/// well within the lease.
async fn tell_interest(shard: &Rc<Shard>, project_id: Uuid) {
    let _ = remote::ask(shard, shard.index(), project_id, &Request::Interest).await;
}

/// The messages after `last_offset` of `epoch` that the mirror already fanned out, for a
/// subscriber welcomed at `last_offset`. The first welcome also fixes where the mirror is.
fn caught_up(project_id: Uuid, epoch: &Arc<str>, last_offset: u64) -> Vec<Published> {
    MIRRORS.with_borrow_mut(|mirrors| {
        let Some(mirror) = mirrors.get_mut(&project_id) else {
            return Vec::new();
        };
        if mirror.epoch.is_none() {
            mirror.epoch = Some(epoch.clone());
            mirror.last_offset = last_offset;
        }
        if mirror.epoch.as_ref() != Some(epoch) {
            return Vec::new();
        }
        mirror
            .recent
            .iter()
            .filter(|message| message.offset > last_offset)
            .cloned()
            .collect()
    })
}

/// A subscriber on shard `from` asks again for what it missed (a `subscribe` with `since`).
pub fn resume(shard: &Rc<Shard>, project_id: Uuid, from: usize, conn: ConnId, since: Since) {
    let shard = shard.clone();
    tokio_uring::spawn(async move {
        let request = Request::Resume { since };
        if let Asked::Answered(Reply::Resumed(resumption)) =
            remote::ask(&shard, shard.index(), project_id, &request).await
        {
            shard
                .mesh()
                .run(from, move |shard| stream::resumed(shard, conn, resumption));
        }
    });
}

/// Whether this shard mirrors the project.
pub fn has(project_id: &Uuid) -> bool {
    MIRRORS.with_borrow(|mirrors| mirrors.contains_key(project_id))
}

/// A subscriber on shard `from` left; the last one ends the mirror.
pub fn unwatch(project_id: Uuid, from: usize) {
    let ended = MIRRORS.with_borrow_mut(|mirrors| {
        let mirror = mirrors.get_mut(&project_id)?;
        mirror.watchers.remove(from);
        if mirror.watchers.any() {
            return None;
        }
        mirrors.remove(&project_id)
    });
    if ended.is_some() {
        cluster::with(|cluster| cluster.stop_mirror(project_id));
    }
}

/// This node took the project over: the mirror ends, and its subscribers become the owner's.
pub fn stop(cluster: &Cluster, project_id: Uuid) -> Watchers {
    match MIRRORS.with_borrow_mut(|mirrors| mirrors.remove(&project_id)) {
        Some(mirror) => {
            cluster.stop_mirror(project_id);
            mirror.watchers
        }
        None => Watchers::default(),
    }
}

/// Messages the owner of a project published (the `Inbound.frames` hook): fanned out to this
/// node's subscribers. Messages NATS lost (a reconnect, a slow consumer) leave a gap no
/// subscriber here may silently skip: they are closed with 1012 and resume from the owner's
/// history.
pub fn received(shard: &Rc<Shard>, project_id: Uuid, payload: Bytes) {
    let Some(batch) = stream::decode_batch(&payload) else {
        tracing::error!(%project_id, "undecodable stream messages from another node");
        return;
    };
    cluster::with(|cluster| {
        let received = batch.items.len() as u64;
        cluster
            .metrics()
            .mirrored_messages
            .fetch_add(received, Relaxed);
    });
    let gap = MIRRORS.with_borrow_mut(|mirrors| {
        let mirror = mirrors.get_mut(&project_id)?;
        let mut items = batch.items;
        if mirror.epoch.as_ref() == Some(&batch.epoch) {
            // Already covered by a welcome or received: not again.
            items.retain(|message| message.offset > mirror.last_offset);
            let first = items.first()?.offset;
            if mirror.last_offset > 0 && first != mirror.last_offset + 1 {
                return Some(mirror.watchers.shards().collect::<Vec<_>>());
            }
        } else {
            // A new owner (a new epoch): offsets start again, and the owner learns of this
            // mirror before the lease that follows its takeover ends.
            if mirror.epoch.is_some() {
                // Its beginning lost, or a late batch of the previous owner: a gap all the same.
                if items.first()?.offset != 1 {
                    return Some(mirror.watchers.shards().collect::<Vec<_>>());
                }
                let shard = shard.clone();
                tokio_uring::spawn(async move { tell_interest(&shard, project_id).await });
            }
            mirror.epoch = Some(batch.epoch.clone());
            mirror.recent.clear();
        }
        let last = items.last()?.offset;
        mirror.last_offset = last;
        mirror.recent.extend(items.iter().cloned());
        while mirror.recent.len() > RECENT_MAX {
            mirror.recent.pop_front();
        }
        stream::publish(shard, project_id, &mirror.watchers, items);
        None
    });
    if let Some(shards) = gap {
        cluster::with(|cluster| {
            cluster.metrics().mirror_gaps.fetch_add(1, Relaxed);
            cluster.stop_mirror(project_id);
        });
        MIRRORS.with_borrow_mut(|mirrors| mirrors.remove(&project_id));
        tracing::warn!(%project_id, "messages from the project's owner were lost; its subscribers here resume");
        for to in shards {
            shard.mesh().run(to, move |shard| {
                stream::close_project(
                    shard,
                    &project_id,
                    CLOSE_SERVICE_RESTART,
                    "stream interrupted; resume",
                )
            });
        }
    }
}
