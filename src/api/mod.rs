//! Request handlers: management, ingest (Mesher and Sentry-compatible), issues, stream upgrades,
//! health and metrics.

mod admin;
mod ingest;
mod issues;
mod keys;
pub mod routes;
mod sentry;

use std::rc::Rc;

use uuid::Uuid;

use crate::auth::{KeyEntry, Refusal};
use crate::http::parse::Head;
use crate::http::response::Response;
use crate::now_us;
use crate::owner::DirectoryError;
use crate::shard::Shard;
use crate::store::Scope;
use crate::stream::Since;
use crate::ws::codec::{accept_key, is_valid_key};
use keys::presented_key;
use routes::Route;
use serde_json::json;

/// What a WebSocket connection does once upgraded.
#[derive(Clone, Debug)]
pub enum Role {
    /// A dashboard watching a project's stream; resuming from `since` when the upgrade named
    /// one (`?since=EPOCH:OFFSET`).
    Stream {
        project_id: Uuid,
        since: Option<Since>,
    },
    /// An SDK sending events over a socket.
    Ingest { project_id: Uuid },
}

pub enum Handled {
    Respond(Response),
    /// Answer 101 with this accept key and run the session; `key_id` is the key it opened
    /// with, so revoking that key closes the session.
    Upgrade {
        role: Role,
        accept: String,
        key_id: Uuid,
    },
}

pub async fn handle(shard: &Rc<Shard>, head: &Head, route: Route<'_>, body: Vec<u8>) -> Handled {
    let response = match route {
        Route::Health => health(shard),
        Route::Page(asset) => crate::page::respond(head, asset),
        Route::Metrics => {
            let mut response =
                Response::json(200, shard.metrics().render(shard.store(), shard.limits()));
            response.content_type = "text/plain; version=0.0.4";
            response
        }
        Route::Stream(project) => return upgrade_stream(shard, head, &project),
        Route::IngestSocket => return upgrade_ingest(shard, head),
        Route::CreateProject
        | Route::ListProjects
        | Route::UpdateProject(_)
        | Route::CreateKey(_)
        | Route::RevokeKey(_) => match admin::authorize(shard, head) {
            Err(response) => response,
            Ok(()) => admin::handle(shard, head, route, &body).await,
        },
        Route::Event | Route::Bulk => {
            ingest::handle_http(shard, head, route == Route::Bulk, body).await
        }
        Route::ListIssues(project) => issues::list(shard, head, &project).await,
        Route::GetIssue(id) => issues::get(shard, head, &id).await,
        Route::IssueEvents(id) => issues::events(shard, head, &id).await,
        Route::IssueAction(id, action) => issues::action(shard, head, &id, action).await,
        Route::SentryEnvelope(_) | Route::SentryStore(_) | Route::SentryPreflight(_) => {
            sentry::handle(shard, head, route, body).await
        }
    };
    Handled::Respond(response)
}

/// Checks from the head alone that the request presents a key its route could accept, so the
/// body of a request that is refused anyway is never read (401/403 as the handler would say).
/// Which project the key may touch is left to the handler.
pub fn admit(shard: &Shard, head: &Head, route: &Route<'_>) -> Result<(), Response> {
    let scope = match route {
        Route::Health | Route::Metrics | Route::Page(_) => return Ok(()),
        Route::CreateProject
        | Route::ListProjects
        | Route::UpdateProject(_)
        | Route::CreateKey(_)
        | Route::RevokeKey(_) => return admin::authorize(shard, head),
        Route::Event | Route::Bulk | Route::IngestSocket => Scope::Ingest,
        Route::ListIssues(_)
        | Route::GetIssue(_)
        | Route::IssueEvents(_)
        | Route::IssueAction(..)
        | Route::Stream(_) => Scope::Dashboard,
        Route::SentryEnvelope(_) | Route::SentryStore(_) | Route::SentryPreflight(_) => {
            return sentry::admit(shard, head, route)
        }
    };
    let key = presented_key(head);
    shard
        .directory()
        .authorize(key.as_deref(), scope, None)
        .map(drop)
        .map_err(refusal)
}

/// Storage, and NATS when the node is one of several (PROTOCOL section 10).
fn health(shard: &Shard) -> Response {
    let word = |up: bool| if up { "ok" } else { "down" };
    let storage = shard.store().healthy();
    let nats = crate::cluster::with(|cluster| cluster.is_connected());
    let healthy = storage && nats != Some(false);
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "storage": word(storage),
    });
    let mut body = body;
    if let Some(nats) = nats {
        body["nats"] = word(nats).into();
    }
    Response::of(if healthy { 200 } else { 503 }, &body)
}

pub fn refusal(refusal: Refusal) -> Response {
    match refusal {
        Refusal::Unauthorized => Response::error(401, "unauthorized"),
        Refusal::Forbidden => Response::error(403, "forbidden"),
    }
}

/// The key a request presents, allowed `scope` on the project it names (UUID or slug):
/// 401 for a missing or unknown key, 404 for an unknown project, 403 for the wrong project or scope.
pub fn project_for(
    shard: &Shard,
    head: &Head,
    project: &str,
    scope: Scope,
) -> Result<KeyEntry, Response> {
    let directory = shard.directory();
    let key = presented_key(head);
    let entry = *directory.key(key.as_deref()).map_err(refusal)?;
    let project_id = directory
        .project(project)
        .map(|p| p.id)
        .ok_or_else(Response::not_found)?;
    entry.permits(scope, Some(project_id)).map_err(refusal)?;
    Ok(entry)
}

fn websocket_accept(head: &Head) -> Result<String, Response> {
    if !head.is_websocket_upgrade() {
        return Err(
            Response::error(400, "websocket upgrade required").with_header("upgrade", "websocket")
        );
    }
    if head.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Response::error(400, "unsupported websocket version")
            .with_header("sec-websocket-version", "13"));
    }
    let key = head
        .header("sec-websocket-key")
        .map(str::trim)
        .unwrap_or("");
    if key.is_empty() {
        return Err(Response::error(400, "missing sec-websocket-key"));
    }
    if !is_valid_key(key) {
        return Err(Response::error(
            400,
            "invalid sec-websocket-key: must be the base64 of 16 bytes",
        ));
    }
    Ok(accept_key(key))
}

/// A stream upgrade: the key and project first (401/403/404), then a malformed `since` (400).
fn upgrade_stream(shard: &Shard, head: &Head, project: &str) -> Handled {
    let entry = match project_for(shard, head, project, Scope::Dashboard) {
        Ok(entry) => entry,
        Err(response) => return Handled::Respond(response),
    };
    let since = match head.query_param("since").filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => match Since::from_query(&text) {
            Ok(since) => Some(since),
            Err(message) => return Handled::Respond(Response::error(400, &message)),
        },
    };
    let role = Role::Stream {
        project_id: entry.project_id,
        since,
    };
    upgraded(head, role, entry)
}

fn upgrade_ingest(shard: &Shard, head: &Head) -> Handled {
    let key = presented_key(head);
    let authorized = shard
        .directory()
        .authorize(key.as_deref(), Scope::Ingest, None);
    match authorized {
        Ok(entry) => upgraded(
            head,
            Role::Ingest {
                project_id: entry.project_id,
            },
            entry,
        ),
        Err(refused) => Handled::Respond(refusal(refused)),
    }
}

/// The 101, for a request whose key was just checked.
fn upgraded(head: &Head, role: Role, key: KeyEntry) -> Handled {
    match websocket_accept(head) {
        Ok(accept) => Handled::Upgrade {
            role,
            accept,
            key_id: key.id,
        },
        Err(response) => Handled::Respond(response),
    }
}

pub use ingest::ingest_frame;
pub use sentry::{decorate, with_cors};

/// Parses a JSON request body of a management or status request.
fn json_body(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, Response> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(Response::error(400, "invalid JSON: expected an object")),
        Err(error) => Err(Response::error(400, &format!("invalid JSON: {error}"))),
    }
}

fn shutting_down() -> Response {
    owner_unavailable(crate::owner::OwnerError::ShuttingDown)
}

/// 503 with Retry-After: the owner could not answer (shutdown, or an unreachable node).
fn owner_unavailable(error: crate::owner::OwnerError) -> Response {
    Response::unavailable(error.message())
}

/// What a directory change that did not take effect answers.
fn directory_refusal(error: DirectoryError) -> Response {
    match error {
        DirectoryError::SlugTaken => Response::error(409, "slug already taken"),
        DirectoryError::StorageUnavailable => Response::unavailable("storage unavailable"),
        DirectoryError::ShuttingDown => shutting_down(),
    }
}
