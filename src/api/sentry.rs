//! Sentry-compatible ingest (PROTOCOL 8): `POST /api/:number/envelope/` and
//! `POST /api/:number/store/` for unmodified Sentry SDKs, their CORS preflight, and the DSN
//! shown beside a new ingest key.
//!
//! A request is checked from its head as far as the head allows (the project number, a key in
//! a header or the query), then its body is decoded (`ingest::sentry`: Content-Encoding with
//! the decoded size capped while decoding, the envelope, each event) and its events go to the
//! project's owner on the same path as native events (`ingest::ask_owner`): sampling, rate
//! limit, dedupe, discard, storage and streaming. Answers are Sentry's, and every one of them
//! carries the CORS headers browser SDKs need to read it.

use std::borrow::Cow;
use std::rc::Rc;

use uuid::Uuid;

use super::ingest::ask_owner;
use super::keys::presented_key;
use super::routes::Route;
use crate::auth::Refusal;
use crate::http::parse::{is_plain_host, Head};
use crate::http::response::Response;
use crate::ingest::sentry::{
    decode_body, decode_event_item, decode_store_body, parse_dsn, parse_envelope, BodyError,
    ContentEncoding, EnvelopeError, ENVELOPE_BYTES_MAX, STORE_BYTES_MAX,
};
use crate::ingest::Incoming;
use crate::metrics::{Rejection, SentryRejection};
use crate::owner::{EventOutcome, IngestReply};
use crate::shard::Shard;
use crate::store::Scope;

/// Headers a browser SDK sends with its envelopes, allowed by the preflight answer.
const CORS_ALLOW_HEADERS: &str =
    "content-type, x-sentry-auth, authorization, content-encoding, sentry-trace, baggage";
/// Headers of the answer a browser SDK must read to back off.
const CORS_EXPOSE_HEADERS: &str = "x-sentry-rate-limits, retry-after";
/// How long a browser may keep a preflight answer, in seconds: a day, as Sentry's own.
const CORS_MAX_AGE_S: &str = "86400";
/// Host put in a DSN when the request's `Host` header is missing or not a plain host name.
const DSN_HOST_DEFAULT: &str = "localhost";

/// `http://INGEST_KEY@HOST/NUMBER` (PROTOCOL 8), HOST from the request's `Host` header.
pub fn dsn(head: &Head, ingest_key: &str, number: i64) -> String {
    let host = head
        .header("host")
        .map(str::trim)
        .filter(|host| is_plain_host(host))
        .unwrap_or(DSN_HOST_DEFAULT);
    format!("http://{ingest_key}@{host}/{number}")
}

/// Every answer of the Sentry endpoints carries these.
pub fn with_cors(response: Response) -> Response {
    response
        .with_header("access-control-allow-origin", "*")
        .with_header("access-control-expose-headers", CORS_EXPOSE_HEADERS)
}

/// The CORS headers for an answer of a Sentry route; other routes' answers are left as they are.
pub fn decorate(route: &Route<'_>, response: Response) -> Response {
    if route.is_sentry() {
        with_cors(response)
    } else {
        response
    }
}

fn preflight() -> Response {
    with_cors(Response::json(204, Vec::new()))
        .with_header("access-control-allow-methods", "POST, OPTIONS")
        .with_header("access-control-allow-headers", CORS_ALLOW_HEADERS)
        .with_header("access-control-max-age", CORS_MAX_AGE_S)
}

/// A refusal, counted, with what was wrong in its body.
fn refused(shard: &Shard, why: SentryRejection, status: u16, message: &str) -> Response {
    shard.counters().sentry.rejected(why);
    let events_why = match why {
        SentryRejection::Unauthorized | SentryRejection::Forbidden => Some(Rejection::Unauthorized),
        SentryRejection::TooLarge => Some(Rejection::TooLarge),
        SentryRejection::UnsupportedEncoding
        | SentryRejection::CorruptBody
        | SentryRejection::InvalidEnvelope
        | SentryRejection::InvalidEvent => Some(Rejection::Invalid),
        // Counted by the owner, or no event was looked at.
        SentryRejection::UnknownProject
        | SentryRejection::RateLimited
        | SentryRejection::Overloaded => None,
    };
    if let Some(events_why) = events_why {
        shard.counters().rejected(events_why, 1);
    }
    with_cors(Response::error(status, message))
}

fn key_refusal(shard: &Shard, refusal: Refusal) -> Response {
    match refusal {
        Refusal::Unauthorized => refused(shard, SentryRejection::Unauthorized, 401, "unauthorized"),
        Refusal::Forbidden => refused(shard, SentryRejection::Forbidden, 403, "forbidden"),
    }
}

/// The project a number names, else 404.
fn project_id(shard: &Shard, number: &str) -> Result<Uuid, Response> {
    let found = number
        .parse::<i64>()
        .ok()
        .and_then(|number| shard.directory().project_by_number(number).map(|p| p.id));
    found.ok_or_else(|| {
        refused(
            shard,
            SentryRejection::UnknownProject,
            404,
            &format!("unknown project number {number}"),
        )
    })
}

/// Whether `key` is an ingest key of the project: 401 for a missing or unknown key, 403 for
/// another project's or a dashboard key.
fn check_key(shard: &Shard, key: Option<&str>, project_id: Uuid) -> Result<(), Response> {
    shard
        .directory()
        .authorize(key, Scope::Ingest, Some(project_id))
        .map(drop)
        .map_err(|refusal| key_refusal(shard, refusal))
}

/// What the head alone decides, before any body byte is read: an unknown number, and a key
/// given in a header or the query that is not one of the project's. An envelope without such
/// a key is let through: its header's `dsn` may carry one.
pub fn admit(shard: &Shard, head: &Head, route: &Route<'_>) -> Result<(), Response> {
    let (number, envelope) = match route {
        Route::SentryEnvelope(number) => (number, true),
        Route::SentryStore(number) => (number, false),
        _ => return Ok(()),
    };
    let project_id = project_id(shard, number)?;
    let key = presented_key(head);
    if key.is_none() && envelope {
        return Ok(());
    }
    check_key(shard, key.as_deref(), project_id)
}

pub async fn handle(shard: &Rc<Shard>, head: &Head, route: Route<'_>, body: Vec<u8>) -> Response {
    let (number, envelope) = match route {
        Route::SentryPreflight(_) => return preflight(),
        Route::SentryEnvelope(number) => (number, true),
        Route::SentryStore(number) => (number, false),
        _ => unreachable!("only Sentry routes come here"),
    };
    let project_id = match project_id(shard, number) {
        Ok(project_id) => project_id,
        Err(response) => return response,
    };
    let key = presented_key(head);
    if key.is_some() || !envelope {
        if let Err(response) = check_key(shard, key.as_deref(), project_id) {
            return response;
        }
    }
    let limit_bytes = if envelope {
        ENVELOPE_BYTES_MAX
    } else {
        STORE_BYTES_MAX
    };
    let body = match decode(shard, head, body, limit_bytes) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let events = if envelope {
        read_envelope(shard, &body, key.is_none().then_some(project_id))
    } else {
        shard
            .counters()
            .sentry
            .store_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        decode_store_body(body)
            .map(|event| vec![event.incoming])
            .map_err(|error| {
                refused(
                    shard,
                    SentryRejection::InvalidEvent,
                    400,
                    &error.to_string(),
                )
            })
    };
    let events = match events {
        Ok(events) => events,
        Err(response) => return response,
    };
    if events.is_empty() {
        // Sessions, client reports, transactions...: accepted, counted, not stored.
        return with_cors(Response::json(200, "{}"));
    }
    // Sampled-out and discarded events are answered with an id all the same.
    let answer_id = events[0].event_id.unwrap_or_else(Uuid::new_v4);
    match ask_owner(shard, project_id, events).await {
        Ok(reply) => answer(shard, reply, answer_id),
        Err(response) => with_cors(response),
    }
}

/// The body as sent, decoded by its `Content-Encoding` into at most `limit_bytes`.
fn decode(
    shard: &Shard,
    head: &Head,
    body: Vec<u8>,
    limit_bytes: usize,
) -> Result<Vec<u8>, Response> {
    let decoded =
        ContentEncoding::from_header(head.header("content-encoding")).and_then(|encoding| {
            let decoded = decode_body(encoding, body, limit_bytes)?;
            shard
                .counters()
                .sentry
                .body(encoding.as_str(), decoded.len());
            Ok(decoded)
        });
    decoded.map_err(|error| {
        let (why, status) = match &error {
            BodyError::UnsupportedEncoding(_) => (SentryRejection::UnsupportedEncoding, 415),
            BodyError::TooLarge { .. } => (SentryRejection::TooLarge, 413),
            BodyError::Corrupt { .. } => (SentryRejection::CorruptBody, 400),
        };
        refused(shard, why, status, &error.to_string())
    })
}

/// The envelope's events, each item counted by type. `key_from_dsn`: no key came with the
/// request, so the envelope header's `dsn` must hold one of this project's ingest keys.
fn read_envelope(
    shard: &Shard,
    body: &[u8],
    key_from_dsn: Option<Uuid>,
) -> Result<Vec<Incoming>, Response> {
    let envelope = parse_envelope(body).map_err(|error| match error {
        EnvelopeError::Malformed(_) => refused(
            shard,
            SentryRejection::InvalidEnvelope,
            400,
            &error.to_string(),
        ),
        EnvelopeError::TooLarge(_) => {
            refused(shard, SentryRejection::TooLarge, 413, &error.to_string())
        }
    })?;
    if let Some(project_id) = key_from_dsn {
        let key = envelope
            .dsn
            .as_deref()
            .and_then(parse_dsn)
            .map(|dsn| Cow::Borrowed(dsn.public_key));
        check_key(shard, key.as_deref(), project_id)?;
    }
    shard
        .counters()
        .sentry
        .envelopes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sentry = &shard.counters().sentry;
    for item in &envelope.items {
        sentry.item(&item.item_type);
    }
    let mut events = Vec::new();
    for item in envelope.events() {
        let mut event = decode_event_item(item.payload).map_err(|error| {
            refused(
                shard,
                SentryRejection::InvalidEvent,
                400,
                &error.to_string(),
            )
        })?;
        // The header's id names the envelope's event when the event names none itself.
        if event.incoming.event_id.is_none() {
            event.incoming.event_id = envelope.event_id;
        }
        events.push(event.incoming);
    }
    Ok(events)
}

/// Sentry's answer to what the owner made of the events.
fn answer(shard: &Shard, reply: IngestReply, answer_id: Uuid) -> Response {
    let response = match reply {
        IngestReply::Done(outcomes) => {
            let id = match outcomes.first() {
                Some(EventOutcome::Accepted { event_id, .. })
                | Some(EventOutcome::Duplicate { event_id }) => *event_id,
                _ => answer_id,
            };
            let mut body = Vec::with_capacity(48);
            let mut hex = Uuid::encode_buffer();
            body.extend_from_slice(br#"{"id":""#);
            body.extend_from_slice(id.simple().encode_lower(&mut hex).as_bytes());
            body.extend_from_slice(br#""}"#);
            Response::json(200, body)
        }
        IngestReply::RateLimited { retry_after_s } => {
            shard
                .counters()
                .sentry
                .rejected(SentryRejection::RateLimited);
            // `SECONDS:CATEGORIES:SCOPE`: no categories means all of them.
            Response::error(429, "rate limited")
                .with_header("retry-after", retry_after_s.to_string())
                .with_header("x-sentry-rate-limits", format!("{retry_after_s}::project"))
        }
        IngestReply::Overloaded => {
            shard
                .counters()
                .sentry
                .rejected(SentryRejection::Overloaded);
            Response::unavailable("overloaded")
        }
        IngestReply::StorageFailed => {
            shard
                .counters()
                .sentry
                .rejected(SentryRejection::Overloaded);
            Response::unavailable("storage unavailable")
        }
        IngestReply::IssueLimit { limit, .. } => Response::error(
            422,
            &format!(
                "issue limit reached: the project has its maximum of {limit} issues; \
                 events of existing issues are still accepted"
            ),
        ),
        IngestReply::UnknownProject => Response::not_found(),
    };
    with_cors(response)
}
