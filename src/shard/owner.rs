//! The owner side of a shard: the only writer of its projects' issue state.
//!
//! Ingest, status changes and subscriptions of a project all run on its owner's thread: as mesh
//! messages, in order, from other shards, and ingest from the owner's own connections directly.
//! So grouping needs no lock and stream messages leave in the order they were made.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::mesh::{EventOutcome, IngestReply, IssuePage, ListQuery, ShardMsg};
use super::Shard;
use crate::config::AckMode;
use crate::ingest::Incoming;
use crate::issues::{Cursor, Grouped, ProjectState, Status};
use crate::metrics::Rejection;
use crate::store::{EventRow, StoreError};
use crate::stream::{self, Attributes, Published};

/// What the owner made of an ingest request.
pub enum Ingested {
    Reply(IngestReply),
    /// `--ack durable`: the events are accepted, and answered once the commit that holds
    /// them is made.
    AfterCommit {
        outcomes: Vec<EventOutcome>,
        committed: oneshot::Receiver<Result<(), StoreError>>,
    },
}

impl Ingested {
    pub async fn reply(self) -> IngestReply {
        match self {
            Ingested::Reply(reply) => reply,
            Ingested::AfterCommit {
                outcomes,
                committed,
            } => match committed.await {
                Ok(Ok(())) => IngestReply::Done(outcomes),
                _ => IngestReply::StorageFailed,
            },
        }
    }
}

impl Shard {
    pub(super) fn handle_owned(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Ingest {
                project_id,
                events,
                received_us,
                reply,
            } => match self.ingest(project_id, events, received_us) {
                Ingested::Reply(answer) => {
                    let _ = reply.send(answer);
                }
                later @ Ingested::AfterCommit { .. } => {
                    tokio_uring::spawn(async move {
                        let _ = reply.send(later.reply().await);
                    });
                }
            },
            ShardMsg::SetStatus {
                project_id,
                issue_id,
                status,
                reply,
            } => {
                let _ = reply.send(self.set_status(project_id, issue_id, status));
            }
            ShardMsg::GetIssue {
                project_id,
                issue_id,
                reply,
            } => {
                let owned = self.owned.borrow();
                let issue = owned
                    .get(&project_id)
                    .and_then(|state| state.issue(&issue_id));
                let _ = reply.send(issue.cloned());
            }
            ShardMsg::HasIssue { issue_id, reply } => {
                let _ = reply.send(
                    self.owned
                        .borrow()
                        .values()
                        .any(|state| state.issue(&issue_id).is_some()),
                );
            }
            ShardMsg::ListIssues {
                project_id,
                query,
                reply,
            } => {
                let _ = reply.send(self.list_issues(project_id, query));
            }
            ShardMsg::Watch {
                project_id,
                shard,
                conn,
            } => {
                let count = self.with_state(project_id, |state| {
                    state.subscribers_by_shard[shard] += 1;
                    state.unresolved_count()
                });
                let frame = stream::issue_count_message(project_id, count).frame;
                self.mesh.send(
                    shard,
                    ShardMsg::Welcome {
                        conn,
                        project_id,
                        frame,
                    },
                );
            }
            ShardMsg::Unwatch { project_id, shard } => {
                self.with_state(project_id, |state| {
                    state.subscribers_by_shard[shard] =
                        state.subscribers_by_shard[shard].saturating_sub(1)
                });
            }
            _ => unreachable!("shard-wide messages are handled in Shard::handle"),
        }
    }

    fn with_state<T>(&self, project_id: Uuid, f: impl FnOnce(&mut ProjectState) -> T) -> T {
        let shards = self.shard_count();
        let mut owned = self.owned.borrow_mut();
        f(owned
            .entry(project_id)
            .or_insert_with(|| ProjectState::new(shards)))
    }

    /// Sends a project's new messages to every shard with subscribers of it. Sending only
    /// queues, so this may run while the project's state is borrowed.
    fn fan_out(&self, project_id: Uuid, subscribers_by_shard: &[u32], items: Vec<Published>) {
        if items.is_empty() {
            return;
        }
        let items: Arc<[Published]> = items.into();
        for (shard, subscribers) in subscribers_by_shard.iter().enumerate() {
            if *subscribers > 0 {
                self.mesh.send(
                    shard,
                    ShardMsg::Publish {
                        project_id,
                        items: items.clone(),
                    },
                );
            }
        }
    }

    /// Groups, streams and queues a project's events (this shard owns the project).
    pub fn ingest(&self, project_id: Uuid, events: Vec<Incoming>, received_us: i64) -> Ingested {
        let Some(project) = self.directory.borrow().project_by_id(&project_id).cloned() else {
            return Ingested::Reply(IngestReply::UnknownProject);
        };
        let batch = events.len() as u64;
        let shards = self.shard_count();
        let mut owned = self.owned.borrow_mut();
        let state = owned
            .entry(project_id)
            .or_insert_with(|| ProjectState::new(shards));
        // SDKs send an event again when unsure it arrived: a request whose events all carry
        // ids taken within the dedupe window is answered without counting them again.
        let seen = |state: &mut ProjectState, event: &Incoming| {
            event
                .event_id
                .is_some_and(|id| state.recent_event_ids.contains(&id, received_us))
        };
        if !events.is_empty() && events.iter().all(|event| seen(state, event)) {
            self.counters.rejected(Rejection::Duplicate, batch);
            let outcomes = events
                .iter()
                .filter_map(|event| event.event_id)
                .map(|event_id| EventOutcome::Duplicate { event_id })
                .collect();
            return Ingested::Reply(IngestReply::Done(outcomes));
        }
        if let Err(retry_after_s) =
            state.take_rate(project.rate_limit_per_minute, batch, received_us)
        {
            self.counters.rejected(Rejection::RateLimited, batch);
            return Ingested::Reply(IngestReply::RateLimited { retry_after_s });
        }
        // Sampled-out and discarded events are answered without storage, so only the rest
        // need room in the queue; when it has none the request is refused whole (503) before
        // any state changes, and gives its share of the rate limit back. Empty when the project
        // samples nothing out and discards nothing.
        let samples = project.sample_rate < 1.0;
        let skipped: Vec<Option<EventOutcome>> = if samples || state.has_discarded() {
            events
                .iter()
                .map(|event| {
                    if samples && rand::random::<f64>() >= project.sample_rate {
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
        let issue_limit = self.config.max_issues_per_project;
        if state.issue_count() + to_store > issue_limit {
            let grouped = events
                .iter()
                .enumerate()
                .filter(|(index, _)| stored(*index))
                .map(|(index, event)| (index, &event.fingerprint));
            if let Some(index) = state.first_past_limit(grouped, issue_limit) {
                state.give_back_rate(project.rate_limit_per_minute, batch, received_us);
                self.counters.rejected(Rejection::IssueLimit, batch);
                return Ingested::Reply(IngestReply::IssueLimit {
                    index,
                    limit: issue_limit,
                });
            }
        }
        if to_store > 0 && !self.store.has_room(to_store, bytes_to_store) {
            state.give_back_rate(project.rate_limit_per_minute, batch, received_us);
            self.counters.rejected(Rejection::Overloaded, batch);
            return Ingested::Reply(IngestReply::Overloaded);
        }
        let mut outcomes = Vec::with_capacity(events.len());
        let mut turn = self.store_turn();
        // Stream messages are built only when someone watches the project.
        let watched = state.subscribers_by_shard.iter().any(|n| *n > 0);
        let mut items = Vec::new();
        for (index, event) in events.into_iter().enumerate() {
            if let Some(outcome) = skipped.get(index).copied().flatten() {
                let reason = match outcome {
                    EventOutcome::Sampled => Rejection::Sampled,
                    _ => Rejection::Discarded,
                };
                self.counters.rejected(reason, 1);
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
            if watched {
                let attributes = Attributes {
                    level: event.level,
                    environment: event.environment.as_deref().map(Arc::from),
                };
                let action = match grouped {
                    Grouped::Created => Some("created"),
                    Grouped::Regressed => Some("regressed"),
                    Grouped::Counted | Grouped::Discarded => None,
                };
                if let Some(action) = action {
                    items.push(stream::issue_opened_message(
                        action,
                        &issue.view(),
                        attributes.clone(),
                    ));
                }
                items.push(stream::event_message(
                    event_id,
                    issue_id,
                    event.json.as_bytes(),
                    attributes,
                ));
                if state.unresolved_count() != count_before {
                    items.push(stream::issue_count_message(
                        project_id,
                        state.unresolved_count(),
                    ));
                }
            }
            turn.event(EventRow {
                id: event_id,
                project_id,
                issue_id,
                level: event.level.as_str().into(),
                received_at_us: received_us,
                payload: event.json,
            });
            outcomes.push(EventOutcome::Accepted { event_id, issue_id });
        }
        drop(turn);
        let accepted = outcomes
            .iter()
            .filter(|o| matches!(o, EventOutcome::Accepted { .. }))
            .count();
        self.counters
            .events_accepted
            .fetch_add(accepted as u64, Relaxed);
        self.fan_out(project_id, &state.subscribers_by_shard, items);
        drop(owned);
        // Room was checked above; another shard may have filled the queue since, by at most a
        // batch each, which `submit` absorbs rather than lose what was grouped and streamed.
        if accepted > 0 && self.config.ack == AckMode::Durable {
            let (ack, committed) = tokio::sync::oneshot::channel();
            self.flush_store(Some(ack));
            Ingested::AfterCommit {
                outcomes,
                committed,
            }
        } else {
            Ingested::Reply(IngestReply::Done(outcomes))
        }
    }

    fn set_status(&self, project_id: Uuid, issue_id: Uuid, status: Status) -> Option<bool> {
        let mut owned = self.owned.borrow_mut();
        let state = owned.get_mut(&project_id)?;
        let count_before = state.unresolved_count();
        let (changed, _) = state.set_status(&issue_id, status)?;
        if !changed {
            return Some(false);
        }
        self.store_turn().touch(project_id, issue_id);
        let mut items = vec![stream::issue_status_message(status.as_str(), issue_id)];
        if state.unresolved_count() != count_before {
            items.push(stream::issue_count_message(
                project_id,
                state.unresolved_count(),
            ));
        }
        self.fan_out(project_id, &state.subscribers_by_shard, items);
        Some(true)
    }

    fn list_issues(&self, project_id: Uuid, query: ListQuery) -> IssuePage {
        let owned = self.owned.borrow();
        let Some(state) = owned.get(&project_id) else {
            return IssuePage {
                issues: Vec::new(),
                has_more: false,
                next_cursor: None,
            };
        };
        let (issues, has_more) = state.list(query.status, query.level, query.limit, query.cursor);
        let next_cursor = issues.last().filter(|_| has_more).map(|last| Cursor {
            last_seen_us: last.last_seen_us,
            id: last.id,
        });
        IssuePage {
            issues: issues.into_iter().cloned().collect(),
            has_more,
            next_cursor,
        }
    }
}
