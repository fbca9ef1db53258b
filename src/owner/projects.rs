//! The owner side: the only writer of its projects' issue state.
//!
//! Ingest, status changes and subscriptions of a project all run on its owner's thread, in
//! order, so grouping needs no lock and stream messages leave in the order they were made. The
//! state is the shard thread's own (set up by `install` when the shard starts).

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::{DirectoryError, EventOutcome, IngestReply, IssuePage, ListQuery};
use crate::cluster;
use crate::config::AckMode;
use crate::ingest::Incoming;
use crate::issues::{Cursor, Grouped, Issue, ProjectState, Status};
use crate::metrics::Rejection;
use crate::shard::Shard;
use crate::store::{Change, EventRow, KeyRow, Payload, ProjectRow, StoreError};
use crate::stream::{
    self, Attributes, HistoryLimits, ProjectStream, Published, Resumption, Since, Watchers,
};
use crate::ws::codec::CLOSE_SERVICE_RESTART;
use crate::IdMap;

/// How often the owner forgets history past its age bound in projects that are quiet (a busy
/// project's history is trimmed as it grows).
const HISTORY_SWEEP_MS: u64 = 1_000;

/// A project as its owner holds it: its issues, who watches its stream, and the stream's
/// offsets and history.
#[derive(Default)]
struct Project {
    state: ProjectState,
    watchers: Watchers,
    stream: ProjectStream,
}

#[derive(Default)]
struct Owned {
    projects: IdMap<Uuid, Project>,
    /// Projects whose lock this node lost while what it took for them is still on its way to
    /// the store: other nodes are told to wait, so that none takes one over without it.
    handing_over: HashSet<Uuid>,
    /// Slugs of projects being created (shard 0 only).
    pending_slugs: HashSet<String>,
    /// Projects this node is taking over (several nodes), with who waits for the outcome.
    taking: IdMap<Uuid, Vec<oneshot::Sender<bool>>>,
}

thread_local! {
    static OWNED: RefCell<Owned> = RefCell::default();
}

/// Sets up the projects this shard owns, as loaded from the store (each stream starts a new
/// epoch), and the sweep of their histories.
pub fn install(shard: &Rc<Shard>, projects: IdMap<Uuid, ProjectState>) {
    OWNED.with_borrow_mut(|owned| {
        owned.projects = projects
            .into_iter()
            .map(|(id, state)| {
                let project = Project {
                    state,
                    ..Project::default()
                };
                (id, project)
            })
            .collect();
    });
    let shard = shard.clone();
    tokio_uring::spawn(async move {
        loop {
            shard.sleep(HISTORY_SWEEP_MS).await;
            sweep_histories(&shard);
        }
    });
}

/// The history bounds of the server's flags.
fn history_limits(shard: &Shard) -> HistoryLimits {
    let config = shard.config();
    HistoryLimits {
        messages_max: config.stream_history,
        bytes_max: config.stream_history_bytes,
        ttl_ms: config.stream_history_ttl_ms,
    }
}

/// Runs `f` on a project's stream and keeps the shard's history-bytes gauge in step with it.
fn on_stream<T>(
    shard: &Shard,
    stream: &mut ProjectStream,
    f: impl FnOnce(&mut ProjectStream) -> T,
) -> T {
    let before = stream.kept_bytes();
    let result = f(stream);
    let after = stream.kept_bytes();
    let gauge = &shard.counters().stream_history_bytes;
    if after > before {
        gauge.fetch_add((after - before) as u64, Relaxed);
    } else if before > after {
        gauge.fetch_sub((before - after) as u64, Relaxed);
    }
    result
}

fn sweep_histories(shard: &Shard) {
    let (now_ms, limits) = (shard.now_ms(), history_limits(shard));
    OWNED.with_borrow_mut(|owned| {
        for project in owned.projects.values_mut() {
            if project.stream.kept_bytes() > 0 {
                on_stream(shard, &mut project.stream, |stream| {
                    stream.expire(now_ms, &limits)
                });
            }
        }
    });
}

/// The store rows of touched issues, from their newest state (see `shard::IssueRows`).
pub fn issue_rows(touched: &[(Uuid, Uuid)], changes: &mut Vec<Change>) {
    OWNED.with_borrow(|owned| {
        changes.extend(
            touched
                .iter()
                .filter_map(|(project_id, issue_id)| {
                    owned.projects.get(project_id)?.state.issue(issue_id)
                })
                .map(|issue| Change::Issue(issue.row())),
        )
    });
}

fn with_project<T>(project_id: Uuid, f: impl FnOnce(&mut Project) -> T) -> T {
    OWNED.with_borrow_mut(|owned| f(owned.projects.entry(project_id).or_default()))
}

/// Whether this node lost the project's lock and is still writing what it took for it.
pub(super) fn handing_over(project_id: &Uuid) -> bool {
    OWNED.with_borrow(|owned| owned.handing_over.contains(project_id))
}

/// Whether this shard serves the project as its owner. Alone, a node owns every project (a
/// new one starts empty); one of several owns those whose lock it holds.
pub(super) fn owns(project_id: &Uuid) -> bool {
    !cluster::is_active() || OWNED.with_borrow(|owned| owned.projects.contains_key(project_id))
}

/// Takes the project over, unless another node holds its lock: loads its issues from the
/// store, starts a new epoch (announced to every mirror by an `issue_count` carrying it) and
/// serves other nodes' requests for it. The answer is true once this node owns it.
pub(super) fn take(shard: &Rc<Shard>, project_id: Uuid) -> oneshot::Receiver<bool> {
    let (done, outcome) = oneshot::channel();
    let first = OWNED.with_borrow_mut(|owned| {
        if owned.projects.contains_key(&project_id) {
            let _ = done.send(true);
            return false;
        }
        let waiting = owned.taking.entry(project_id).or_default();
        waiting.push(done);
        waiting.len() == 1
    });
    if first {
        let shard = shard.clone();
        tokio_uring::spawn(async move {
            let taken = take_over(&shard, project_id).await;
            let waiting = OWNED.with_borrow_mut(|owned| owned.taking.remove(&project_id));
            for done in waiting.into_iter().flatten() {
                let _ = done.send(taken);
            }
        });
    }
    outcome
}

async fn take_over(shard: &Rc<Shard>, project_id: Uuid) -> bool {
    let Some(cluster) = cluster::current() else {
        return true;
    };
    if !cluster.try_lock(&project_id).await {
        return false;
    }
    let (reply, rows) = oneshot::channel();
    shard.store().project_issues(project_id, reply);
    let rows = match rows.await {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => {
            tracing::warn!(%project_id, %error, "cannot load a project to take it over");
            cluster.unlock(&project_id);
            return false;
        }
        Err(_) => return false,
    };
    let mut state = ProjectState::default();
    for row in &rows.issues {
        state.restore(Issue::from_row(row));
    }
    // The previous owner's dedupe window: an SDK's retry after the takeover is still one.
    for event in &rows.recent_events {
        state
            .recent_event_ids
            .insert(event.id, event.received_at_us);
    }
    let now_ms = shard.now_ms();
    let limits = history_limits(shard);
    OWNED.with_borrow_mut(|owned| {
        let mut project = Project {
            state,
            watchers: super::mirror::stop(&cluster, project_id),
            stream: ProjectStream::new(),
        };
        let stream = &mut project.stream;
        stream.set_watched(project.watchers.any(), now_ms);
        // The previous owner's mirrors are unknown here until they tell their interest: until
        // then, every message is published.
        stream.set_mirrored_until(now_ms + super::mirror::TAKEOVER_LEASE_MS);
        let announcement = vec![stream::epoch_message(
            project.stream.next_offset(),
            project.stream.epoch(),
            project_id,
            project.state.unresolved_count(),
        )];
        on_stream(shard, &mut project.stream, |stream| {
            stream.keep(&announcement, now_ms, &limits)
        });
        publish(
            shard,
            project_id,
            &project.stream,
            &project.watchers,
            announcement,
        );
        owned.projects.insert(project_id, project);
    });
    cluster.serve_owner(project_id).await;
    cluster.metrics().ownership_taken.fetch_add(1, Relaxed);
    tracing::info!(%project_id, issues = rows.issues.len(), "took the project over");
    true
}

/// This node lost its lock connection, and with it every project: their subscribers here are
/// closed (they reconnect and reach the new owner), their state is dropped. Until the store
/// has what this node took for them, it keeps answering their owner subject, telling other
/// nodes to wait: a node taking one over loads it from the store, and must find it all there.
pub fn disowned(shard: &Rc<Shard>) {
    let Some(cluster) = cluster::current() else {
        return;
    };
    // This turn's rows are built from the projects' state: handed over before it is dropped.
    let (ack, written) = oneshot::channel();
    shard.flush_store(Some(ack));
    let dropped: Vec<(Uuid, Project)> =
        OWNED.with_borrow_mut(|owned| owned.projects.drain().collect());
    let handed: Vec<Uuid> = dropped.iter().map(|(project_id, _)| *project_id).collect();
    OWNED.with_borrow_mut(|owned| owned.handing_over.extend(&handed));
    let handing = cluster.clone();
    tokio_uring::spawn(async move {
        // The writer retries until the database takes the rows (or refuses them for good).
        let _ = written.await;
        for project_id in handed {
            OWNED.with_borrow_mut(|owned| owned.handing_over.remove(&project_id));
            handing.stop_owner(project_id);
        }
    });
    for (project_id, project) in dropped {
        cluster.metrics().ownership_lost.fetch_add(1, Relaxed);
        let mut stream = project.stream;
        on_stream(shard, &mut stream, |stream| stream.forget());
        for to in project.watchers.shards() {
            shard.mesh().run(to, move |shard| {
                stream::close_project(shard, &project_id, CLOSE_SERVICE_RESTART, "owner moved")
            });
        }
    }
}

/// Sends a project's new messages to this node's subscribers and, when other nodes mirror
/// the project, to them.
fn publish(
    shard: &Shard,
    project_id: Uuid,
    stream: &ProjectStream,
    watchers: &Watchers,
    items: Vec<Published>,
) {
    if items.is_empty() {
        return;
    }
    if stream.is_mirrored(shard.now_ms()) {
        cluster::with(|cluster| {
            let batch = stream::encode_batch(stream.epoch(), &items);
            cluster.publish_frames(&project_id, batch);
            let published = &cluster.metrics().published_messages;
            published.fetch_add(items.len() as u64, Relaxed);
        });
    }
    stream::publish(shard, project_id, watchers, items);
}

/// What the owner made of an ingest request.
pub enum Ingested {
    Reply(IngestReply),
    /// `--ack durable`: the events are accepted, and answered once the commit that holds
    /// them is made.
    AfterCommit {
        project_id: Uuid,
        outcomes: Vec<EventOutcome>,
        committed: oneshot::Receiver<Result<(), StoreError>>,
    },
}

impl Ingested {
    /// The answer; awaited on the owner shard.
    pub async fn reply(self) -> IngestReply {
        match self {
            Ingested::Reply(reply) => reply,
            Ingested::AfterCommit {
                project_id,
                outcomes,
                committed,
            } => match committed.await {
                Ok(Ok(())) => IngestReply::Done(outcomes),
                _ => {
                    // Not stored: the SDK's retry must be taken again, not answered as a copy.
                    forget_event_ids(project_id, &outcomes);
                    IngestReply::StorageFailed
                }
            },
        }
    }
}

fn forget_event_ids(project_id: Uuid, outcomes: &[EventOutcome]) {
    OWNED.with_borrow_mut(|owned| {
        let Some(project) = owned.projects.get_mut(&project_id) else {
            return;
        };
        for outcome in outcomes {
            if let EventOutcome::Accepted { event_id, .. } = outcome {
                project.state.recent_event_ids.forget(event_id);
            }
        }
    });
}

/// Groups, streams and queues a project's events (this shard owns the project).
pub(super) fn ingest(
    shard: &Shard,
    project_id: Uuid,
    events: Vec<Incoming>,
    received_us: i64,
) -> Ingested {
    let Some(settings) = shard.directory().project_by_id(&project_id).cloned() else {
        return Ingested::Reply(IngestReply::UnknownProject);
    };
    let counters = shard.counters();
    let batch = events.len() as u64;
    let accepted = with_project(project_id, |project| {
        let Project {
            state,
            watchers,
            stream,
        } = project;
        // SDKs send an event again when unsure it arrived: a request whose events all carry
        // ids taken within the dedupe window is answered without counting them again.
        let seen = |state: &mut ProjectState, event: &Incoming| {
            event
                .event_id
                .is_some_and(|id| state.recent_event_ids.contains(&id, received_us))
        };
        if !events.is_empty() && events.iter().all(|event| seen(state, event)) {
            counters.rejected(Rejection::Duplicate, batch);
            let outcomes = events
                .iter()
                .filter_map(|event| event.event_id)
                .map(|event_id| EventOutcome::Duplicate { event_id })
                .collect();
            return Ok(outcomes);
        }
        if let Err(retry_after_s) =
            state.take_rate(settings.rate_limit_per_minute, batch, received_us)
        {
            counters.rejected(Rejection::RateLimited, batch);
            return Err(IngestReply::RateLimited { retry_after_s });
        }
        // Sampled-out and discarded events are answered without storage, so only the rest
        // need room in the queue; when it has none the request is refused whole (503) before
        // any state changes, and gives its share of the rate limit back. Empty when the project
        // samples nothing out and discards nothing.
        let samples = settings.sample_rate < 1.0;
        let skipped: Vec<Option<EventOutcome>> = if samples || state.has_discarded() {
            events
                .iter()
                .map(|event| {
                    if samples && rand::random::<f64>() >= settings.sample_rate {
                        Some(EventOutcome::Sampled)
                    } else if state.is_discarded(&event.fingerprint) {
                        Some(EventOutcome::Discarded)
                    } else {
                        None
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        let stored = |index: usize| skipped.get(index).copied().flatten().is_none();
        let (to_store, bytes_to_store) = events
            .iter()
            .enumerate()
            .filter(|(index, _)| stored(*index))
            .fold((0, 0), |(count, bytes), (_, event)| {
                (count + 1, bytes + event.json.len())
            });
        // Every issue stays in memory, so a project gets at most `--max-issues-per-project`. A
        // request with an event past it is refused whole, like one with an invalid event.
        let issue_limit = shard.config().max_issues_per_project;
        if state.issue_count() + to_store > issue_limit {
            let grouped = events
                .iter()
                .enumerate()
                .filter(|(index, _)| stored(*index))
                .map(|(index, event)| (index, &event.fingerprint));
            if let Some(index) = state.first_past_limit(grouped, issue_limit) {
                state.give_back_rate(settings.rate_limit_per_minute, batch, received_us);
                counters.rejected(Rejection::IssueLimit, batch);
                return Err(IngestReply::IssueLimit {
                    index,
                    limit: issue_limit,
                });
            }
        }
        if to_store > 0 && !shard.store().has_room(to_store, bytes_to_store) {
            state.give_back_rate(settings.rate_limit_per_minute, batch, received_us);
            counters.rejected(Rejection::Overloaded, batch);
            return Err(IngestReply::Overloaded);
        }
        let mut outcomes = Vec::with_capacity(events.len());
        let mut turn = shard.store_turn();
        // Stream messages are built only when someone watches the project or could resume.
        let (now_ms, limits) = (shard.now_ms(), history_limits(shard));
        let builds = stream.builds(now_ms, &limits);
        let mut items = Vec::new();
        let mut skipped_messages = 0;
        for (index, event) in events.into_iter().enumerate() {
            if let Some(outcome) = skipped.get(index).copied().flatten() {
                let reason = match outcome {
                    EventOutcome::Sampled => Rejection::Sampled,
                    _ => Rejection::Discarded,
                };
                counters.rejected(reason, 1);
                if let Some(id) = event.event_id {
                    state.recent_event_ids.insert(id, received_us);
                }
                outcomes.push(outcome);
                continue;
            }
            let event_id = match event.event_id {
                Some(id) => {
                    state.recent_event_ids.insert(id, received_us);
                    id
                }
                None => crate::issues::new_id(),
            };
            let count_before = state.unresolved_count();
            let (grouped, issue) = state.group(
                project_id,
                &event.fingerprint,
                &event.title,
                event.level,
                event.occurred_us(received_us),
            );
            let issue_id = issue.id;
            turn.touch(project_id, issue_id);
            let action = match grouped {
                Grouped::Created => Some("created"),
                Grouped::Regressed => Some("regressed"),
                Grouped::Counted | Grouped::Discarded => None,
            };
            // The store takes the event's JSON from its frame when there is one: held once.
            let mut payload = None;
            if builds {
                let attributes = Attributes {
                    level: event.level,
                    environment: event.environment.as_deref().map(Arc::from),
                };
                if let Some(action) = action {
                    items.push(stream::issue_message(
                        stream.next_offset(),
                        action,
                        &issue.view(),
                        Some(attributes.clone()),
                    ));
                }
                let message = stream::event_message(
                    stream.next_offset(),
                    event_id,
                    issue_id,
                    event.json.as_bytes(),
                    attributes,
                );
                let embedded = stream::event_json_in(&message.frame, event.json.len());
                payload = Some(Payload::shared_or_copied(embedded, &event.json));
                items.push(message);
                if state.unresolved_count() != count_before {
                    items.push(stream::issue_count_message(
                        stream.next_offset(),
                        project_id,
                        state.unresolved_count(),
                    ));
                }
            } else {
                // The offsets these messages would have had are taken all the same.
                let counted = state.unresolved_count() != count_before;
                skipped_messages += 1 + u64::from(action.is_some()) + u64::from(counted);
            }
            turn.event(EventRow {
                id: event_id,
                project_id,
                issue_id,
                level: event.level.as_str().into(),
                received_at_us: received_us,
                payload: payload.unwrap_or_else(|| Payload::from(event.json)),
            });
            outcomes.push(EventOutcome::Accepted { event_id, issue_id });
        }
        drop(turn);
        on_stream(shard, stream, |stream| {
            if skipped_messages > 0 {
                stream.skip(skipped_messages);
            }
            stream.keep(&items, now_ms, &limits);
        });
        publish(shard, project_id, stream, watchers, items);
        Ok(outcomes)
    });
    let outcomes = match accepted {
        Ok(outcomes) => outcomes,
        Err(refused) => return Ingested::Reply(refused),
    };
    let accepted = outcomes
        .iter()
        .filter(|o| matches!(o, EventOutcome::Accepted { .. }))
        .count();
    counters.events_accepted.fetch_add(accepted as u64, Relaxed);
    // Room was checked above; another shard may have filled the queue since, by at most a
    // batch each, which `submit` absorbs rather than lose what was grouped and streamed.
    if accepted > 0 && shard.config().ack == AckMode::Durable {
        let (ack, committed) = oneshot::channel();
        shard.flush_store(Some(ack));
        Ingested::AfterCommit {
            project_id,
            outcomes,
            committed,
        }
    } else {
        Ingested::Reply(IngestReply::Done(outcomes))
    }
}

pub(super) fn set_status(
    shard: &Shard,
    project_id: Uuid,
    issue_id: Uuid,
    status: Status,
) -> Option<bool> {
    OWNED.with_borrow_mut(|owned| {
        let Project {
            state,
            watchers,
            stream,
        } = owned.projects.get_mut(&project_id)?;
        let count_before = state.unresolved_count();
        let (changed, issue) = state.set_status(&issue_id, status)?;
        if !changed {
            return Some(false);
        }
        shard.store_turn().touch(project_id, issue_id);
        let (now_ms, limits) = (shard.now_ms(), history_limits(shard));
        if !stream.builds(now_ms, &limits) {
            let counted = state.unresolved_count() != count_before;
            on_stream(shard, stream, |stream| stream.skip(1 + u64::from(counted)));
            return Some(true);
        }
        let message =
            stream::issue_message(stream.next_offset(), status.as_str(), &issue.view(), None);
        let mut items = vec![message];
        if state.unresolved_count() != count_before {
            items.push(stream::issue_count_message(
                stream.next_offset(),
                project_id,
                state.unresolved_count(),
            ));
        }
        on_stream(shard, stream, |stream| stream.keep(&items, now_ms, &limits));
        publish(shard, project_id, stream, watchers, items);
        Some(true)
    })
}

pub(super) fn issue(project_id: Uuid, issue_id: Uuid) -> Option<Issue> {
    OWNED.with_borrow(|owned| {
        owned
            .projects
            .get(&project_id)?
            .state
            .issue(&issue_id)
            .cloned()
    })
}

pub(super) fn has_issue(issue_id: Uuid) -> bool {
    OWNED.with_borrow(|owned| {
        owned
            .projects
            .values()
            .any(|project| project.state.issue(&issue_id).is_some())
    })
}

pub(super) fn list_issues(project_id: Uuid, query: ListQuery) -> IssuePage {
    OWNED.with_borrow(|owned| {
        let Some(project) = owned.projects.get(&project_id) else {
            return IssuePage {
                issues: Vec::new(),
                has_more: false,
                next_cursor: None,
            };
        };
        let (issues, has_more) =
            project
                .state
                .list(query.status, query.level, query.limit, query.cursor);
        let next_cursor = issues.last().filter(|_| has_more).map(|last| Cursor {
            last_seen_us: last.last_seen_us,
            id: last.id,
        });
        IssuePage {
            issues: issues.into_iter().cloned().collect(),
            has_more,
            next_cursor,
        }
    })
}

/// A subscriber on shard `from` joins: counted, and welcomed with the unresolved count, the
/// epoch and the last offset, and what it missed when it resumes from `since`.
pub(super) fn watch(
    shard: &Shard,
    project_id: Uuid,
    from: usize,
    since: Option<Since>,
) -> stream::Welcome {
    let now_ms = shard.now_ms();
    with_project(project_id, |project| {
        project.watchers.add(from);
        project.stream.set_watched(true, now_ms);
    });
    welcome_remote(shard, project_id, since).0
}

/// A subscriber's welcome without counting it here: the part of `watch` another node's mirror
/// asks for (its subscriber is counted there, its frames reach it through NATS).
pub(super) fn welcome_remote(
    shard: &Shard,
    project_id: Uuid,
    since: Option<Since>,
) -> (stream::Welcome, std::sync::Arc<str>) {
    let (now_ms, limits) = (shard.now_ms(), history_limits(shard));
    with_project(project_id, |project| {
        let stream = &mut project.stream;
        let frame = stream::welcome_frame(
            stream.epoch(),
            stream.last_offset(),
            project_id,
            project.state.unresolved_count(),
        );
        let resumption = since.map(|since| {
            on_stream(shard, stream, |stream| {
                stream.resume(&since, now_ms, &limits)
            })
        });
        let welcome = stream::Welcome {
            frame,
            last_offset: stream.last_offset(),
            resumption,
            live: Vec::new(),
        };
        (welcome, stream.epoch_shared())
    })
}

/// A live subscriber asks for what it missed after `since`.
pub(super) fn resume(shard: &Shard, project_id: Uuid, since: &Since) -> Resumption {
    let (now_ms, limits) = (shard.now_ms(), history_limits(shard));
    with_project(project_id, |project| {
        on_stream(shard, &mut project.stream, |stream| {
            stream.resume(since, now_ms, &limits)
        })
    })
}

pub(super) fn unwatch(shard: &Shard, project_id: Uuid, from: usize) {
    let now_ms = shard.now_ms();
    with_project(project_id, |project| {
        project.watchers.remove(from);
        project.stream.set_watched(project.watchers.any(), now_ms);
    });
}

/// Another node mirrors the project (it asked for a welcome or a resume, or renewed its
/// interest): its messages are published over NATS for the lease that follows.
pub(super) fn mirrored(shard: &Shard, project_id: Uuid) {
    let now_ms = shard.now_ms();
    with_project(project_id, |project| {
        let until_ms = now_ms + super::mirror::INTEREST_LEASE_MS;
        project.stream.set_mirrored_until(until_ms);
    });
}

/// Runs on shard 0 only, so a slug is checked and taken in one place.
pub(super) fn create_project(
    shard: &Rc<Shard>,
    project: ProjectRow,
    keys: Vec<KeyRow>,
    reply: oneshot::Sender<Result<(), DirectoryError>>,
) {
    debug_assert_eq!(shard.index(), 0);
    let taken = shard.directory().slug_taken(&project.slug)
        || !OWNED.with_borrow_mut(|owned| owned.pending_slugs.insert(project.slug.clone()));
    if taken {
        let _ = reply.send(Err(DirectoryError::SlugTaken));
        return;
    }
    let shard = shard.clone();
    tokio_uring::spawn(async move {
        let slug = project.slug.clone();
        let mut changes = vec![Change::Project(project)];
        changes.extend(keys.into_iter().map(Change::Key));
        let result = super::publish_directory(&shard, changes).await;
        OWNED.with_borrow_mut(|owned| owned.pending_slugs.remove(&slug));
        let _ = reply.send(result);
    });
}
