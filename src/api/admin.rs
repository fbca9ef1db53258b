//! Management API (admin token): projects, keys, project settings.
//!
//! A change is committed to the store first, then applied on every shard before the answer
//! goes out, so a key is usable (or revoked) everywhere as soon as the client hears back.

use std::rc::Rc;

use serde_json::{json, Value};
use uuid::Uuid;

use super::keys::presented_key;
use super::routes::Route;
use super::sentry::dsn;
use super::{directory_refusal, json_body, now_us};
use crate::auth::{generate_key, hash_key};
use crate::http::parse::Head;
use crate::http::response::Response;
use crate::owner::{self, DirectoryError};
use crate::shard::Shard;
use crate::store::{Change, KeyRow, ProjectRow, Scope};

/// Longest project name and key label accepted.
const NAME_CHARS_MAX: usize = 200;
/// Projects keep events this many days unless told otherwise.
const RETENTION_DAYS_DEFAULT: u32 = 90;

/// The admin token, else 403 for a valid project key (a key without this scope, PROTOCOL
/// section 2) and 401 for anything else.
pub fn authorize(shard: &Shard, head: &Head) -> Result<(), Response> {
    let presented = presented_key(head).ok_or_else(|| Response::error(401, "unauthorized"))?;
    // Compare digests so the time taken does not depend on how much of the token matched.
    if hash_key(&presented) == hash_key(shard.admin_token()) {
        return Ok(());
    }
    match shard.directory().key(Some(&presented)) {
        Ok(_) => Err(Response::error(403, "forbidden")),
        Err(_) => Err(Response::error(401, "unauthorized")),
    }
}

pub async fn handle(shard: &Rc<Shard>, head: &Head, route: Route<'_>, body: &[u8]) -> Response {
    let result = match route {
        Route::ListProjects => Ok(list_projects(shard)),
        Route::CreateProject => create_project(shard, head, body).await,
        Route::UpdateProject(project) => update_project(shard, &project, body).await,
        Route::CreateKey(project) => create_key(shard, head, &project, body).await,
        Route::RevokeKey(key_id) => revoke_key(shard, &key_id).await,
        _ => unreachable!("only management routes come here"),
    };
    result.unwrap_or_else(|response| response)
}

fn project_json(row: &ProjectRow) -> Value {
    json!({
        "id": row.id,
        "number": row.number,
        "name": row.name,
        "slug": row.slug,
        "created_at": crate::issues::rfc3339(row.created_at_us),
        "rate_limit_per_minute": row.rate_limit_per_minute,
        "sample_rate": row.sample_rate,
        "retention_days": row.retention_days,
    })
}

fn list_projects(shard: &Shard) -> Response {
    let directory = shard.directory();
    let mut projects: Vec<_> = directory.projects().collect();
    projects.sort_by_key(|p| (p.created_at_us, p.id));
    let data: Vec<Value> = projects.iter().map(|p| project_json(p)).collect();
    Response::of(200, &json!({ "data": data }))
}

/// A slug from a name: lowercase ASCII letters and digits joined by single dashes.
pub fn slugify(name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    slug.trim_end_matches('-').to_string()
}

/// A slug from a name, never all digits: those read as a project number (PROTOCOL 3).
fn slug_from_name(name: &str) -> String {
    let slug = slugify(name);
    if !slug.is_empty() && slug.bytes().all(|b| b.is_ascii_digit()) {
        return format!("project-{slug}");
    }
    slug
}

fn valid_slug(slug: &str) -> bool {
    !slug.is_empty()
        && slug.len() <= NAME_CHARS_MAX
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !slug.bytes().all(|b| b.is_ascii_digit())
        && Uuid::parse_str(slug).is_err()
}

fn string_field(
    body: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<String>, Response> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= NAME_CHARS_MAX => {
            Ok(Some(s.trim().to_string()))
        }
        Some(Value::String(_)) => Err(Response::error(
            400,
            &format!("{name} is longer than {NAME_CHARS_MAX} characters"),
        )),
        Some(_) => Err(Response::error(400, &format!("{name} must be a string"))),
    }
}

fn new_key(project_id: Uuid, scope: Scope, label: Option<String>) -> (String, KeyRow) {
    let plain = generate_key(scope);
    let row = KeyRow {
        id: Uuid::now_v7(),
        project_id,
        scope,
        label,
        key_hash: hash_key(&plain),
        revoked: false,
        created_at_us: now_us(),
    };
    (plain, row)
}

async fn create_project(shard: &Rc<Shard>, head: &Head, body: &[u8]) -> Result<Response, Response> {
    let body = json_body(body)?;
    let name = string_field(&body, "name")?.filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| Response::error(400, "name is required"))?;
    let slug = match string_field(&body, "slug")? {
        Some(slug) if !slug.is_empty() => slug,
        _ => slug_from_name(&name),
    };
    if !valid_slug(&slug) {
        return Err(Response::error(
            400,
            "slug must be lowercase letters, digits and dashes, not all digits (that is a \
             project number), and not a UUID",
        ));
    }
    if shard.directory().slug_taken(&slug) {
        return Err(directory_refusal(DirectoryError::SlugTaken));
    }
    let number = next_project_number(shard).await?;
    let project = ProjectRow {
        id: Uuid::now_v7(),
        number,
        name,
        slug,
        created_at_us: now_us(),
        rate_limit_per_minute: 0,
        sample_rate: 1.0,
        retention_days: RETENTION_DAYS_DEFAULT,
    };
    let (ingest_key, ingest_row) = new_key(project.id, Scope::Ingest, Some("default".into()));
    let (dashboard_key, dashboard_row) =
        new_key(project.id, Scope::Dashboard, Some("default".into()));
    let shown = project_json(&project);
    // Shard 0 decides slug uniqueness, so two shards can never both take a slug.
    let keys = vec![ingest_row, dashboard_row];
    owner::create_project(shard, project, keys)
        .await
        .map_err(directory_refusal)?;
    let mut shown = shown;
    shown["dsn"] = json!(dsn(head, &ingest_key, number));
    shown["ingest_key"] = json!(ingest_key);
    shown["dashboard_key"] = json!(dashboard_key);
    Ok(Response::of(201, &shown))
}

/// A number from the database for a new project.
async fn next_project_number(shard: &Shard) -> Result<i64, Response> {
    let (reply, number) = tokio::sync::oneshot::channel();
    shard.store().next_project_number(reply);
    match number.await {
        Ok(Ok(number)) => Ok(number),
        Ok(Err(error)) => {
            tracing::error!(%error, "taking a project number failed");
            Err(directory_refusal(DirectoryError::StorageUnavailable))
        }
        Err(_) => Err(directory_refusal(DirectoryError::ShuttingDown)),
    }
}

async fn update_project(
    shard: &Rc<Shard>,
    project: &str,
    body: &[u8],
) -> Result<Response, Response> {
    let body = json_body(body)?;
    let mut row = {
        let directory = shard.directory();
        directory
            .project(project)
            .map(|p| (**p).clone())
            .ok_or_else(Response::not_found)?
    };
    let retention_before = row.retention_days;
    for (name, value) in &body {
        match name.as_str() {
            "rate_limit_per_minute" => {
                row.rate_limit_per_minute = value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        Response::error(
                            400,
                            "rate_limit_per_minute must be a whole number >= 0 (0: no limit)",
                        )
                    })?
            }
            "sample_rate" => {
                row.sample_rate = value
                    .as_f64()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        Response::error(400, "sample_rate must be a number from 0 to 1")
                    })?
            }
            "retention_days" => {
                row.retention_days = value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        Response::error(400, "retention_days must be a whole number >= 1")
                    })?
            }
            "name" => {
                row.name = string_field(&body, "name")?
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| Response::error(400, "name must be a non-empty string"))?
            }
            other => return Err(Response::error(400, &format!("unknown field: {other}"))),
        }
    }
    let shown = project_json(&row);
    let retention_shortened = row.retention_days < retention_before;
    owner::change_directory(shard, vec![Change::Project(row)])
        .await
        .map_err(directory_refusal)?;
    if retention_shortened {
        shard.store().apply_retention();
    }
    Ok(Response::of(200, &shown))
}

async fn create_key(
    shard: &Rc<Shard>,
    head: &Head,
    project: &str,
    body: &[u8],
) -> Result<Response, Response> {
    let body = json_body(body)?;
    let (project_id, number) = shard
        .directory()
        .project(project)
        .map(|p| (p.id, p.number))
        .ok_or_else(Response::not_found)?;
    let scope = match body.get("scope").and_then(Value::as_str) {
        Some("ingest") => Scope::Ingest,
        Some("dashboard") => Scope::Dashboard,
        _ => {
            return Err(Response::error(
                400,
                "scope must be \"ingest\" or \"dashboard\"",
            ))
        }
    };
    let label = string_field(&body, "label")?;
    let (plain, row) = new_key(project_id, scope, label.clone());
    let id = row.id;
    owner::change_directory(shard, vec![Change::Key(row)])
        .await
        .map_err(directory_refusal)?;
    let mut shown = json!({ "id": id, "key": plain, "scope": scope.as_str(), "label": label });
    if scope == Scope::Ingest {
        // The plain key is shown only now, so the DSN that holds it is too.
        shown["dsn"] = json!(dsn(head, &plain, number));
    }
    Ok(Response::of(201, &shown))
}

async fn revoke_key(shard: &Rc<Shard>, key_id: &str) -> Result<Response, Response> {
    let id = Uuid::parse_str(key_id).map_err(|_| Response::error(400, "malformed key id"))?;
    let row = shard
        .directory()
        .key_row(&id)
        .ok_or_else(Response::not_found)?;
    let row = KeyRow {
        revoked: true,
        ..row
    };
    owner::change_directory(shard, vec![Change::Key(row)])
        .await
        .map_err(directory_refusal)?;
    Ok(Response::json(200, r#"{"status":"ok"}"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_from_names() {
        assert_eq!(slugify("My Shop!"), "my-shop");
        assert_eq!(slugify("  --Déjà vu 2--"), "d-j-vu-2");
        assert!(valid_slug("shop-2"));
        assert!(!valid_slug("Shop"));
        assert!(!valid_slug(""));
        assert!(!valid_slug("0195b7a0-0000-7000-8000-000000000000"));
        assert!(!valid_slug("2024"));
        assert!(valid_slug("2024-shop"));
        assert_eq!(slug_from_name("2024"), "project-2024");
        assert_eq!(slug_from_name("Shop 2024"), "shop-2024");
    }
}
