//! Issues API (dashboard key): listing with cursor pagination, one issue, its events, status actions.

use std::rc::Rc;

use serde_json::json;
use uuid::Uuid;

use super::keys::presented_key;
use super::{owner_unavailable, project_for, refusal};
use crate::http::parse::Head;
use crate::http::response::Response;
use crate::ingest::event::Level;
use crate::issues::{rfc3339, Cursor, Issue, Status};
use crate::owner::{self, ListQuery};
use crate::shard::Shard;
use crate::store::Scope;

/// PROTOCOL section 5: page sizes.
const PAGE_LIMIT_DEFAULT: usize = 25;
const PAGE_LIMIT_MAX: usize = 100;
/// How long an events read may wait for storage before the client gets 503.
const STORE_READ_TIMEOUT_MS: u64 = 5_000;

fn limit_param(head: &Head) -> Result<usize, Response> {
    match head.query_param("limit") {
        None => Ok(PAGE_LIMIT_DEFAULT),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=PAGE_LIMIT_MAX).contains(n))
            .ok_or_else(|| {
                Response::error(
                    400,
                    &format!("limit must be a whole number from 1 to {PAGE_LIMIT_MAX}"),
                )
            }),
    }
}

pub async fn list(shard: &Rc<Shard>, head: &Head, project: &str) -> Response {
    let project_id = match project_for(shard, head, project, Scope::Dashboard) {
        Ok(entry) => entry.project_id,
        Err(response) => return response,
    };
    let query = match list_query(head) {
        Ok(query) => query,
        Err(response) => return response,
    };
    let page = match owner::list_issues(shard, project_id, query).await {
        Ok(page) => page,
        Err(error) => return owner_unavailable(error),
    };
    let views: Vec<_> = page.issues.iter().map(|issue| issue.view()).collect();
    Response::of(
        200,
        &json!({
            "data": views,
            "has_more": page.has_more,
            "next_cursor": page.next_cursor.map(|cursor| cursor.encode()),
        }),
    )
}

fn list_query(head: &Head) -> Result<ListQuery, Response> {
    let status = match head.query_param("status").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(Status::parse(&s).ok_or_else(|| {
            Response::error(
                400,
                "status must be unresolved, resolved, archived or discarded",
            )
        })?),
    };
    let level = match head.query_param("level").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(Level::parse(&s).ok_or_else(|| {
            Response::error(400, "level must be fatal, error, warning, info or debug")
        })?),
    };
    let cursor = match head.query_param("cursor").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            Some(Cursor::decode(&s).ok_or_else(|| Response::error(400, "malformed cursor"))?)
        }
    };
    Ok(ListQuery {
        status,
        level,
        limit: limit_param(head)?,
        cursor,
    })
}

/// The issue id from the path and the project of the dashboard key presented. The key is
/// checked first: without a valid one the answer is 401 whatever the path holds.
fn issue_and_project(shard: &Shard, head: &Head, id: &str) -> Result<(Uuid, Uuid), Response> {
    let key = presented_key(head);
    let project_id = shard
        .directory()
        .authorize(key.as_deref(), Scope::Dashboard, None)
        .map_err(refusal)?
        .project_id;
    let issue_id = Uuid::parse_str(id).map_err(|_| Response::error(400, "malformed issue id"))?;
    Ok((issue_id, project_id))
}

/// The project has no such issue: 403 if another project has it, else 404.
async fn missing(shard: &Rc<Shard>, issue_id: Uuid) -> Response {
    let elsewhere = match owner::issue_exists(shard, issue_id).await {
        Ok(true) => Ok(true),
        // One of several nodes owns only some projects: the others' issues are in the store.
        Ok(false) if crate::cluster::is_active() => stored_issue_exists(shard, issue_id).await,
        Ok(false) => Ok(false),
        Err(error) => Err(owner_unavailable(error)),
    };
    match elsewhere {
        Ok(true) => Response::error(403, "forbidden"),
        Ok(false) => Response::not_found(),
        Err(response) => response,
    }
}

async fn stored_issue_exists(shard: &Rc<Shard>, issue_id: Uuid) -> Result<bool, Response> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    shard.store().has_issue(issue_id, reply);
    store_answer(shard, answer, "reading an issue failed").await
}

/// A store read's answer; reads queue behind pending writes, so while storage is down they
/// would wait for it: past `STORE_READ_TIMEOUT_MS` the answer is 503.
async fn store_answer<T>(
    shard: &Rc<Shard>,
    answer: tokio::sync::oneshot::Receiver<Result<T, crate::store::StoreError>>,
    what: &str,
) -> Result<T, Response> {
    shard
        .timeout(STORE_READ_TIMEOUT_MS, answer)
        .await
        .ok_or_else(|| Response::unavailable("storage unavailable"))?
        .map_err(|_| owner_unavailable(crate::owner::OwnerError::ShuttingDown))?
        .map_err(|error| {
            tracing::error!(%error, "{what}");
            Response::unavailable("storage unavailable")
        })
}

async fn issue_of(shard: &Rc<Shard>, project_id: Uuid, issue_id: Uuid) -> Result<Issue, Response> {
    let issue = owner::issue(shard, project_id, issue_id)
        .await
        .map_err(owner_unavailable)?;
    match issue {
        Some(issue) => Ok(issue),
        None => Err(missing(shard, issue_id).await),
    }
}

pub async fn get(shard: &Rc<Shard>, head: &Head, id: &str) -> Response {
    let result = async {
        let (issue_id, project_id) = issue_and_project(shard, head, id)?;
        issue_of(shard, project_id, issue_id).await
    };
    match result.await {
        Ok(issue) => Response::of(200, &issue.view()),
        Err(response) => response,
    }
}

pub async fn events(shard: &Rc<Shard>, head: &Head, id: &str) -> Response {
    let result = async {
        let (issue_id, project_id) = issue_and_project(shard, head, id)?;
        let limit = limit_param(head)?;
        issue_of(shard, project_id, issue_id).await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        shard.store().latest_events(issue_id, limit, reply);
        let rows = store_answer(shard, answer, "reading events failed").await?;
        // Each event's JSON goes out as stored, which is as sent: read back through a JSON
        // library, numbers beyond 64 bits would lose their text.
        let mut body = Vec::with_capacity(rows.iter().map(|r| r.payload.len() + 200).sum());
        body.extend_from_slice(b"{\"data\":[");
        for (index, row) in rows.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            let fields = json!({
                "id": row.id,
                "issue_id": row.issue_id,
                "level": row.level,
                "received_at": rfc3339(row.received_at_us),
            })
            .to_string();
            body.extend_from_slice(fields.strip_suffix('}').unwrap_or(&fields).as_bytes());
            body.extend_from_slice(b",\"data\":");
            body.extend_from_slice(row.payload.as_bytes());
            body.push(b'}');
        }
        body.extend_from_slice(b"]}");
        Ok(Response::json(200, body))
    };
    result.await.unwrap_or_else(|response| response)
}

pub async fn action(shard: &Rc<Shard>, head: &Head, id: &str, action: &str) -> Response {
    let result = async {
        let status = Status::from_action(action).ok_or_else(Response::not_found)?;
        let (issue_id, project_id) = issue_and_project(shard, head, id)?;
        let changed = owner::set_status(shard, project_id, issue_id, status)
            .await
            .map_err(owner_unavailable)?;
        match changed {
            Some(changed) => Ok(Response::of(
                200,
                &json!({ "status": "ok", "affected": changed as u8 }),
            )),
            None => Err(missing(shard, issue_id).await),
        }
    };
    result.await.unwrap_or_else(|response| response)
}
