//! The owner interface across nodes: requests for a project owned by another node travel
//! over NATS as these messages, and its owner serves them with the same functions as local
//! ones. A request that finds no owner takes the project over (its lock decides who).

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::projects::{self, Ingested};
use super::{IngestReply, IssuePage, ListQuery};
use crate::cluster::{self, RemoteError, Responder};
use crate::ingest::event::Level;
use crate::ingest::Incoming;
use crate::issues::{Cursor, Issue, Status};
use crate::shard::Shard;
use crate::stream::{Resumption, Since};

/// How long a request keeps looking for an owner while the project changes hands (the lock
/// is held, the new owner not yet serving) before it is answered 503.
const OWNER_WAIT_MS: u64 = 3_000;
/// Pause between looks.
const OWNER_RETRY_MS: u64 = 50;

#[derive(Serialize, Deserialize)]
pub enum Request {
    Ingest {
        events: Vec<Incoming>,
        received_us: i64,
    },
    SetStatus {
        issue_id: Uuid,
        status: Status,
    },
    Issue {
        issue_id: Uuid,
    },
    ListIssues {
        status: Option<Status>,
        level: Option<Level>,
        limit: usize,
        cursor: Option<Cursor>,
    },
    /// A subscriber of another node joins: its first message, and what it missed.
    Watch {
        since: Option<Since>,
    },
    Resume {
        since: Since,
    },
    /// A node still mirrors the project (renewed while it has subscribers of it).
    Interest,
}

#[derive(Serialize, Deserialize)]
pub enum Reply {
    Ingest(IngestReply),
    SetStatus(Option<bool>),
    Issue(Option<Issue>),
    Issues {
        issues: Vec<Issue>,
        has_more: bool,
        next_cursor: Option<Cursor>,
    },
    Welcome {
        frame: Bytes,
        last_offset: u64,
        epoch: Arc<str>,
        resumption: Option<Resumption>,
    },
    Resumed(Resumption),
    /// The node no longer owns the project (it lost its lock): ask again.
    NotOwner,
    /// The node lost the project's lock and is writing what it took for it: wait, then ask
    /// again (taking the project over before would miss those rows).
    HandingOver,
    /// Taken note of (an `Interest`).
    Noted,
}

impl Reply {
    pub fn into_page(self) -> Option<IssuePage> {
        match self {
            Reply::Issues {
                issues,
                has_more,
                next_cursor,
            } => Some(IssuePage {
                issues,
                has_more,
                next_cursor,
            }),
            _ => None,
        }
    }
}

impl Request {
    pub fn list(query: &ListQuery) -> Request {
        Request::ListIssues {
            status: query.status,
            level: query.level,
            limit: query.limit,
            cursor: query.cursor,
        }
    }
}

fn encode<T: Serialize>(message: &T) -> Bytes {
    Bytes::from(postcard::to_stdvec(message).expect("owner messages serialize"))
}

/// Where a request for a project that this node does not own ended.
pub enum Asked {
    /// The owner on another node answered.
    Answered(Reply),
    /// Nobody owned the project, and now this node does: serve the request here.
    TakenHere,
    /// No owner could be reached (NATS down, the owner gone and its lock still held, or no
    /// answer in time): 503, the client retries.
    Unavailable,
}

/// Sends `request` to the project's owner on another node, or takes the project over when
/// none serves it. `to` is the project's shard on this node.
pub async fn ask(shard: &Rc<Shard>, to: usize, project_id: Uuid, request: &Request) -> Asked {
    let Some(cluster) = cluster::current() else {
        return Asked::TakenHere;
    };
    let payload = encode(request);
    let deadline_ms = shard.now_ms() + OWNER_WAIT_MS;
    loop {
        let answer = cluster.request(&project_id, payload.clone()).await;
        let failed = match answer {
            Ok(bytes) => match postcard::from_bytes::<Reply>(&bytes) {
                Ok(Reply::NotOwner) => RemoteError::NoOwner,
                Ok(Reply::HandingOver) if shard.now_ms() < deadline_ms => {
                    shard.sleep(OWNER_RETRY_MS).await;
                    continue;
                }
                Ok(Reply::HandingOver) => RemoteError::TimedOut,
                Ok(reply) => {
                    cluster.metrics().forwarded_answered.fetch_add(1, Relaxed);
                    return Asked::Answered(reply);
                }
                Err(error) => {
                    tracing::error!(%project_id, %error, "undecodable answer from a project's owner");
                    RemoteError::TimedOut
                }
            },
            Err(error) => error,
        };
        let owner_may_be_gone = matches!(failed, RemoteError::NoOwner | RemoteError::Disconnected);
        if owner_may_be_gone && take(shard, to, project_id).await {
            return Asked::TakenHere;
        }
        // Disconnected: the owner is out of reach. Timed out: it is too slow to wait for
        // again. Busy: too many requests wait already. No owner: another node holds the lock
        // and is about to serve; look again.
        if failed != RemoteError::NoOwner || shard.now_ms() >= deadline_ms {
            cluster
                .metrics()
                .forwarded_unavailable
                .fetch_add(1, Relaxed);
            return Asked::Unavailable;
        }
        shard.sleep(OWNER_RETRY_MS).await;
    }
}

/// Takes the project over on its shard `to` of this node; true once this node owns it.
pub async fn take(shard: &Rc<Shard>, to: usize, project_id: Uuid) -> bool {
    let taking = if to == shard.index() {
        projects::take(shard, project_id)
    } else {
        match shard
            .mesh()
            .call(to, move |shard| projects::take(shard, project_id))
            .await
        {
            Ok(taking) => taking,
            Err(_) => return false,
        }
    };
    taking.await.unwrap_or(false)
}

/// Serves another node's request for a project of this shard (the `Inbound.request` hook).
pub fn serve(shard: &Rc<Shard>, project_id: Uuid, payload: Bytes, responder: Responder) {
    let request = match postcard::from_bytes::<Request>(&payload) {
        Ok(request) => request,
        Err(error) => {
            tracing::error!(%project_id, %error, "undecodable request from another node");
            return;
        }
    };
    if let Some(cluster) = cluster::current() {
        cluster.metrics().served.fetch_add(1, Relaxed);
    }
    let answer = |reply: Reply| responder.send(encode(&reply));
    if projects::handing_over(&project_id) {
        return answer(Reply::HandingOver);
    }
    if !projects::owns(&project_id) {
        return answer(Reply::NotOwner);
    }
    match request {
        Request::Ingest {
            events,
            received_us,
        } => match projects::ingest(shard, project_id, events, received_us) {
            Ingested::Reply(reply) => answer(Reply::Ingest(reply)),
            later => {
                tokio_uring::spawn(async move { answer(Reply::Ingest(later.reply().await)) });
            }
        },
        Request::SetStatus { issue_id, status } => answer(Reply::SetStatus(projects::set_status(
            shard, project_id, issue_id, status,
        ))),
        Request::Issue { issue_id } => answer(Reply::Issue(projects::issue(project_id, issue_id))),
        Request::ListIssues {
            status,
            level,
            limit,
            cursor,
        } => {
            let query = ListQuery {
                status,
                level,
                limit,
                cursor,
            };
            let page = projects::list_issues(project_id, query);
            answer(Reply::Issues {
                issues: page.issues,
                has_more: page.has_more,
                next_cursor: page.next_cursor,
            })
        }
        Request::Watch { since } => {
            // Published from before the welcome's offset on, so the mirror misses nothing.
            projects::mirrored(shard, project_id);
            let (welcome, epoch) = projects::welcome_remote(shard, project_id, since);
            answer(Reply::Welcome {
                frame: welcome.frame,
                last_offset: welcome.last_offset,
                epoch,
                resumption: welcome.resumption,
            })
        }
        Request::Resume { since } => {
            projects::mirrored(shard, project_id);
            answer(Reply::Resumed(projects::resume(shard, project_id, &since)))
        }
        Request::Interest => {
            projects::mirrored(shard, project_id);
            answer(Reply::Noted)
        }
    }
}
