//! Cross-shard messaging: one bounded queue into each shard, FIFO per sender and destination.
//!
//! Senders never block the reactor: a message that finds its destination queue full waits in a
//! local backlog that a forwarding task pushes on, in order, as room appears.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

use crate::conn::registry::ConnId;
use crate::ingest::event::Level;
use crate::ingest::Incoming;
use crate::issues::{Cursor, Issue, Status};
use crate::metrics::ShardMetrics;
use crate::store::{KeyRow, ProjectRow};
use crate::stream::Published;

/// Messages one shard's queue holds before senders fall back to their backlog; large enough
/// to absorb bursts of fan-out without the backlog path.
pub const SHARD_QUEUE_MAX: usize = 8192;

pub type Reply<T> = oneshot::Sender<T>;

/// The owner's answer to an ingest request.
#[derive(Debug)]
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

#[derive(Debug, Clone, Copy)]
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

/// Why a change of the project and key directory did not take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectoryError {
    /// Another project has the slug.
    SlugTaken,
    /// Storage did not commit the change.
    StorageUnavailable,
    /// The server is shutting down.
    ShuttingDown,
}

pub enum ShardMsg {
    /// A project created or changed; applied to the shard's directory, then acknowledged.
    Project(ProjectRow, Option<Reply<()>>),
    /// A key created or revoked; applied to the shard's directory, then acknowledged.
    Key(KeyRow, Option<Reply<()>>),
    /// Create a project (handled by shard 0, which alone decides whether a slug is free).
    CreateProject {
        project: ProjectRow,
        keys: Vec<KeyRow>,
        reply: Reply<Result<(), DirectoryError>>,
    },
    /// Events of a project this shard owns, already validated by the accepting shard.
    Ingest {
        project_id: Uuid,
        events: Vec<Incoming>,
        received_us: i64,
        reply: Reply<IngestReply>,
    },
    /// Change an issue's status; the answer is None when the project has no such issue.
    SetStatus {
        project_id: Uuid,
        issue_id: Uuid,
        status: Status,
        reply: Reply<Option<bool>>,
    },
    /// The issue, if this project has it.
    GetIssue {
        project_id: Uuid,
        issue_id: Uuid,
        reply: Reply<Option<Issue>>,
    },
    /// Whether any project owned by this shard has the issue (to tell 403 from 404).
    HasIssue { issue_id: Uuid, reply: Reply<bool> },
    ListIssues {
        project_id: Uuid,
        query: ListQuery,
        reply: Reply<IssuePage>,
    },
    /// A subscriber on `shard` joins the project; the owner answers with `Welcome`.
    Watch {
        project_id: Uuid,
        shard: usize,
        conn: ConnId,
    },
    /// A subscriber on `shard` left the project.
    Unwatch { project_id: Uuid, shard: usize },
    /// The first message for a new subscriber; it receives fan-out from here on.
    Welcome {
        conn: ConnId,
        project_id: Uuid,
        frame: Bytes,
    },
    /// Messages of a project for this shard's subscribers, in the order the owner made them.
    Publish {
        project_id: Uuid,
        items: Arc<[Published]>,
    },
    /// Stop accepting, close WebSockets with 1001, finish in-flight requests.
    Drain,
    /// Every shard is drained: leave the reactor.
    Exit,
}

/// The shard that should have answered is gone: the server is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShuttingDown;

/// The owner shard of a project: its state lives there and nowhere else.
pub fn owner_of(project_id: &Uuid, shard_count: usize) -> usize {
    // The low 64 bits are random in both v4 and v7 UUIDs.
    (project_id.as_u64_pair().1 % shard_count as u64) as usize
}

pub struct Mesh {
    senders: Vec<mpsc::Sender<ShardMsg>>,
    backlog: RefCell<Vec<VecDeque<ShardMsg>>>,
    backlog_ready: Rc<Notify>,
    metrics: Arc<ShardMetrics>,
}

impl Mesh {
    pub fn new(senders: Vec<mpsc::Sender<ShardMsg>>, metrics: Arc<ShardMetrics>) -> Mesh {
        let backlog = RefCell::new(senders.iter().map(|_| VecDeque::new()).collect());
        Mesh {
            senders,
            backlog,
            backlog_ready: Rc::new(Notify::new()),
            metrics,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.senders.len()
    }

    /// Queues `msg` for shard `to` without waiting; order per destination is kept.
    pub fn send(&self, to: usize, msg: ShardMsg) {
        let mut backlog = self.backlog.borrow_mut();
        if backlog[to].is_empty() {
            match self.senders[to].try_send(msg) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(msg)) => backlog[to].push_back(msg),
            }
        } else {
            backlog[to].push_back(msg);
        }
        self.metrics.mesh_backlog.fetch_add(1, Relaxed);
        self.backlog_ready.notify_one();
    }

    /// Sends shard `to` the message `ask` makes around a reply channel, and waits for the reply.
    pub async fn ask<T>(
        &self,
        to: usize,
        ask: impl FnOnce(Reply<T>) -> ShardMsg,
    ) -> Result<T, ShuttingDown> {
        let (reply, answer) = oneshot::channel();
        self.send(to, ask(reply));
        answer.await.map_err(|_| ShuttingDown)
    }

    /// Moves backlogged messages into their queues as room appears; runs for the shard's life.
    pub async fn forward(self: Rc<Self>) {
        loop {
            self.backlog_ready.notified().await;
            for to in 0..self.senders.len() {
                while !self.backlog.borrow()[to].is_empty() {
                    // Reserve before popping so the message stays visibly queued (and later
                    // sends stay behind it) until it has room.
                    let Ok(permit) = self.senders[to].reserve().await else {
                        break;
                    };
                    let Some(msg) = self.backlog.borrow_mut()[to].pop_front() else {
                        break;
                    };
                    self.metrics.mesh_backlog.fetch_sub(1, Relaxed);
                    permit.send(msg);
                }
            }
        }
    }
}
