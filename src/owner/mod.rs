//! The owner interface: everything a handler asks of a project's owner, as typed requests and
//! typed replies made of domain types.
//!
//! Every project has one owner shard (`owner_of`), the only one that groups its events, counts
//! its issues, limits its rate and makes its stream messages. A request runs there: as a direct
//! call when the owner is the asking shard, through the owner's mesh queue otherwise. Handlers
//! only call the functions here, so how the owner is reached can change without them.

mod mirror;
mod projects;
mod remote;

use std::rc::Rc;

use uuid::Uuid;

use crate::cluster;
use crate::conn::registry::ConnId;
use crate::ingest::event::Level;
use crate::ingest::Incoming;
use crate::issues::{Cursor, Issue, Status};
use crate::shard::Shard;
use crate::store::{Change, KeyRow, ProjectRow};
use crate::stream::{self, Since};

pub use crate::shard::mesh::ShuttingDown;
pub use crate::shard::DirectoryError;
pub use mirror::received as mirrored;
pub use projects::{disowned, install, issue_rows, Ingested};
pub use remote::serve as serve_remote;

use remote::{Asked, Reply, Request};

/// The owner shard of a project: its state lives there and nowhere else.
pub fn owner_of(project_id: &Uuid, shard_count: usize) -> usize {
    // The low 64 bits are random in both v4 and v7 UUIDs.
    (project_id.as_u64_pair().1 % shard_count as u64) as usize
}

/// The owner's answer to an ingest request.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum IngestReply {
    /// One outcome per event, in order.
    Done(Vec<EventOutcome>),
    RateLimited {
        retry_after_s: u64,
    },
    Overloaded,
    /// The event at `index` would open an issue past `--max-issues-per-project` (`limit`);
    /// nothing of the request was taken.
    IssueLimit {
        index: usize,
        limit: usize,
    },
    /// The owner no longer knows the project (should not happen: projects are never deleted).
    UnknownProject,
    /// Waiting for the storage commit failed (`--ack durable`).
    StorageFailed,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub enum EventOutcome {
    Accepted {
        event_id: Uuid,
        issue_id: Uuid,
    },
    Sampled,
    Discarded,
    /// The project took an event with this id within the dedupe window: not counted again.
    Duplicate {
        event_id: Uuid,
    },
}

#[derive(Clone)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub level: Option<Level>,
    pub limit: usize,
    pub cursor: Option<Cursor>,
}

/// A page of issues, newest `last_seen` first, as the owner holds them.
pub struct IssuePage {
    pub issues: Vec<Issue>,
    pub has_more: bool,
    /// Where the next page starts, when there is one.
    pub next_cursor: Option<Cursor>,
}

/// Why the owner gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerError {
    /// The shard that should have answered is gone: the server is shutting down.
    ShuttingDown,
    /// The project's owner is another node that cannot be reached now (PROTOCOL section 10).
    Unreachable,
}

impl OwnerError {
    pub fn message(self) -> &'static str {
        match self {
            OwnerError::ShuttingDown => "shutting down",
            OwnerError::Unreachable => "project owner unreachable",
        }
    }
}

impl From<ShuttingDown> for OwnerError {
    fn from(_: ShuttingDown) -> OwnerError {
        OwnerError::ShuttingDown
    }
}

/// Runs `work` on shard `to`: directly when it is this one, else through its queue.
async fn on_shard<T: Send + 'static>(
    shard: &Rc<Shard>,
    to: usize,
    work: impl FnOnce(&Rc<Shard>) -> T + Send + 'static,
) -> Result<T, ShuttingDown> {
    if to == shard.index() {
        Ok(work(shard))
    } else {
        shard.mesh().call(to, work).await
    }
}

fn owner_shard(shard: &Shard, project_id: &Uuid) -> usize {
    owner_of(project_id, shard.shard_count())
}

/// Runs `local` on the project's owner shard when this node owns the project; otherwise asks
/// the owner on another node with `request` (taking the project over when nobody owns it),
/// and reads its answer with `remote`.
async fn on_owner<T: Send + 'static>(
    shard: &Rc<Shard>,
    project_id: Uuid,
    request: impl FnOnce() -> Request,
    local: impl Fn(&Rc<Shard>) -> T + Clone + Send + 'static,
    remote: impl FnOnce(Reply) -> Option<T>,
) -> Result<T, OwnerError> {
    let to = owner_shard(shard, &project_id);
    let run_local = local.clone();
    let here = on_shard(shard, to, move |shard| {
        projects::owns(&project_id).then(|| run_local(shard))
    })
    .await?;
    if let Some(answer) = here {
        return Ok(answer);
    }
    match remote::ask(shard, to, project_id, &request()).await {
        Asked::Answered(reply) => remote(reply).ok_or(OwnerError::Unreachable),
        Asked::TakenHere => Ok(on_shard(shard, to, local).await?),
        Asked::Unavailable => Err(OwnerError::Unreachable),
    }
}

/// Groups, streams and stores validated events of a project; one outcome per event.
pub async fn ingest(
    shard: &Rc<Shard>,
    project_id: Uuid,
    events: Vec<Incoming>,
    received_us: i64,
) -> Result<IngestReply, OwnerError> {
    let to = owner_shard(shard, &project_id);
    let mut events = events;
    for _ in 0..2 {
        let here = if to == shard.index() {
            if projects::owns(&project_id) {
                return Ok(projects::ingest(shard, project_id, events, received_us)
                    .reply()
                    .await);
            }
            Err(events)
        } else {
            ingest_on(shard, to, project_id, events, received_us).await?
        };
        events = match here {
            Ok(reply) => return Ok(reply),
            Err(events) => events,
        };
        let request = Request::Ingest {
            events,
            received_us,
        };
        match remote::ask(shard, to, project_id, &request).await {
            Asked::Answered(Reply::Ingest(reply)) => return Ok(reply),
            Asked::Answered(_) | Asked::Unavailable => return Err(OwnerError::Unreachable),
            // Owned here now: run it here.
            Asked::TakenHere => {
                let Request::Ingest { events: back, .. } = request else {
                    unreachable!("the request made above")
                };
                events = back;
            }
        }
    }
    Err(OwnerError::Unreachable)
}

/// Runs an ingest on owner shard `to` of this node; the events come back when this node does
/// not own the project.
async fn ingest_on(
    shard: &Rc<Shard>,
    to: usize,
    project_id: Uuid,
    events: Vec<Incoming>,
    received_us: i64,
) -> Result<Result<IngestReply, Vec<Incoming>>, ShuttingDown> {
    shard
        .mesh()
        .ask(to, move |reply| {
            crate::shard::mesh::ShardMsg::Run(Box::new(move |shard| {
                if !projects::owns(&project_id) {
                    let _ = reply.send(Err(events));
                    return;
                }
                match projects::ingest(shard, project_id, events, received_us) {
                    Ingested::Reply(answer) => {
                        let _ = reply.send(Ok(answer));
                    }
                    later => {
                        tokio_uring::spawn(async move {
                            let _ = reply.send(Ok(later.reply().await));
                        });
                    }
                }
            }))
        })
        .await
}

/// Changes an issue's status: None when the project has no such issue, else whether it changed.
pub async fn set_status(
    shard: &Rc<Shard>,
    project_id: Uuid,
    issue_id: Uuid,
    status: Status,
) -> Result<Option<bool>, OwnerError> {
    on_owner(
        shard,
        project_id,
        || Request::SetStatus { issue_id, status },
        move |shard| projects::set_status(shard, project_id, issue_id, status),
        |reply| match reply {
            Reply::SetStatus(changed) => Some(changed),
            _ => None,
        },
    )
    .await
}

/// The issue, if the project has it.
pub async fn issue(
    shard: &Rc<Shard>,
    project_id: Uuid,
    issue_id: Uuid,
) -> Result<Option<Issue>, OwnerError> {
    on_owner(
        shard,
        project_id,
        || Request::Issue { issue_id },
        move |_| projects::issue(project_id, issue_id),
        |reply| match reply {
            Reply::Issue(issue) => Some(issue),
            _ => None,
        },
    )
    .await
}

/// Whether any project this node owns has the issue (to tell 403 from 404).
pub async fn issue_exists(shard: &Rc<Shard>, issue_id: Uuid) -> Result<bool, OwnerError> {
    for to in 0..shard.shard_count() {
        if on_shard(shard, to, move |_| projects::has_issue(issue_id)).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

pub async fn list_issues(
    shard: &Rc<Shard>,
    project_id: Uuid,
    query: ListQuery,
) -> Result<IssuePage, OwnerError> {
    let request = Request::list(&query);
    on_owner(
        shard,
        project_id,
        || request,
        move |_| projects::list_issues(project_id, query.clone()),
        Reply::into_page,
    )
    .await
}

/// A stream subscriber `conn` of this shard joins the project, resuming from `since` if it
/// named one. Its first messages come from the owner, and fan-out reaches it from then on.
pub fn watch(shard: &Rc<Shard>, project_id: Uuid, conn: ConnId, since: Option<Since>) {
    let to = owner_shard(shard, &project_id);
    let from = shard.index();
    let welcome = move |shard: &Rc<Shard>| {
        if !projects::owns(&project_id) {
            return mirror::watch(shard, project_id, from, conn, since);
        }
        let welcome = projects::watch(shard, project_id, from, since);
        // Through the queue even to this shard: behind what the owner published before.
        shard.mesh().run(from, move |shard| {
            stream::welcome(shard, conn, project_id, welcome)
        });
    };
    if to == shard.index() {
        welcome(shard);
    } else {
        shard.mesh().run(to, welcome);
    }
}

/// A live stream subscriber `conn` of this shard asks for what it missed after `since` (a
/// `subscribe` with `since`). The owner answers in one step with its history and the point
/// where live delivery takes over, behind every message it published before.
pub fn resume(shard: &Rc<Shard>, project_id: Uuid, conn: ConnId, since: Since) {
    let to = owner_shard(shard, &project_id);
    let from = shard.index();
    let resume = move |shard: &Rc<Shard>| {
        if !projects::owns(&project_id) {
            return mirror::resume(shard, project_id, from, conn, since);
        }
        let resumption = projects::resume(shard, project_id, &since);
        shard
            .mesh()
            .run(from, move |shard| stream::resumed(shard, conn, resumption));
    };
    if to == shard.index() {
        resume(shard);
    } else {
        shard.mesh().run(to, resume);
    }
}

/// A stream subscriber of this shard left the project.
pub fn unwatch(shard: &Rc<Shard>, project_id: Uuid) {
    let to = owner_shard(shard, &project_id);
    let from = shard.index();
    let unwatch = move |shard: &Rc<Shard>| {
        if mirror::has(&project_id) {
            mirror::unwatch(project_id, from);
        } else {
            projects::unwatch(shard, project_id, from);
        }
    };
    if to == shard.index() {
        unwatch(shard);
    } else {
        shard.mesh().run(to, unwatch);
    }
}

/// Creates a project and its first keys. Shard 0 alone decides whether a slug is free.
pub async fn create_project(
    shard: &Rc<Shard>,
    project: ProjectRow,
    keys: Vec<KeyRow>,
) -> Result<(), DirectoryError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    on_shard(shard, 0, move |shard| {
        projects::create_project(shard, project, keys, reply)
    })
    .await
    .map_err(|ShuttingDown| DirectoryError::ShuttingDown)?;
    answer.await.unwrap_or(Err(DirectoryError::ShuttingDown))
}

/// Changes projects or keys (settings, a new key, a revocation) everywhere.
pub async fn change_directory(shard: &Shard, changes: Vec<Change>) -> Result<(), DirectoryError> {
    publish_directory(shard, changes).await
}

/// Commits directory changes and applies them on every shard of this node, then tells the
/// other nodes (they apply them without storing them again).
async fn publish_directory(shard: &Shard, changes: Vec<Change>) -> Result<(), DirectoryError> {
    let news = cluster::is_active().then(|| changes.clone());
    shard.publish_directory(changes).await?;
    if let Some(changes) = news {
        cluster::with(|cluster| cluster.publish_directory(&changes));
    }
    Ok(())
}
