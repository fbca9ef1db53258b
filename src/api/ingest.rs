//! Ingest: `POST /api/v1/events`, `POST /api/v1/events/bulk` and frames of the `/ingest` socket.
//!
//! The accepting shard authenticates, parses and validates; the project's owner shard groups,
//! streams and queues the events and says what became of each.

use std::rc::Rc;

use serde_json::{json, Value};
use uuid::Uuid;

use super::keys::presented_key;
use super::{now_us, owner_unavailable, refusal};
use crate::http::parse::Head;
use crate::http::response::Response;
use crate::ingest::{decode_bulk, decode_event, decode_frame, Incoming};
use crate::metrics::Rejection;
use crate::owner::{self, EventOutcome, IngestReply};
use crate::shard::Shard;
use crate::store::Scope;

pub async fn handle_http(shard: &Rc<Shard>, head: &Head, bulk: bool, body: Vec<u8>) -> Response {
    let key = presented_key(head);
    let authorized = shard
        .directory()
        .authorize(key.as_deref(), Scope::Ingest, None);
    let project_id = match authorized {
        Ok(entry) => entry.project_id,
        Err(refused) => {
            shard.counters().rejected(Rejection::Unauthorized, 1);
            return refusal(refused);
        }
    };
    let events = if bulk {
        decode_bulk(body)
    } else {
        decode_event(body).map(|event| vec![event])
    };
    match events {
        Ok(events) => submit(shard, project_id, events, bulk).await,
        Err(error) => {
            shard.counters().rejected(Rejection::Invalid, 1);
            Response::error(400, &error.to_string())
        }
    }
}

/// One text frame of an ingest socket (an event or an array of events); returns the reply body.
pub async fn ingest_frame(shard: &Rc<Shard>, project_id: Uuid, text: Vec<u8>) -> Vec<u8> {
    match decode_frame(text) {
        Ok((events, is_array)) => submit(shard, project_id, events, is_array).await.body,
        Err(error) => {
            shard.counters().rejected(Rejection::Invalid, 1);
            Response::error(400, &error.to_string()).body
        }
    }
}

async fn submit(
    shard: &Rc<Shard>,
    project_id: Uuid,
    events: Vec<Incoming>,
    bulk: bool,
) -> Response {
    match ask_owner(shard, project_id, events).await {
        Ok(reply) => render(reply, bulk),
        Err(response) => response,
    }
}

/// Hands validated events to the project's owner and waits for what became of them: the one
/// path of every event into a project, whatever wire format it came in.
pub(super) async fn ask_owner(
    shard: &Rc<Shard>,
    project_id: Uuid,
    events: Vec<Incoming>,
) -> Result<IngestReply, Response> {
    owner::ingest(shard, project_id, events, now_us())
        .await
        .map_err(owner_unavailable)
}

fn outcome_json(outcome: &EventOutcome) -> Value {
    match outcome {
        EventOutcome::Accepted { event_id, issue_id } => {
            json!({ "event_id": event_id, "issue_id": issue_id })
        }
        EventOutcome::Sampled => json!({ "status": "sampled" }),
        EventOutcome::Discarded => json!({ "status": "discarded" }),
        EventOutcome::Duplicate { event_id } => {
            json!({ "status": "duplicate", "event_id": event_id })
        }
    }
}

fn render(reply: IngestReply, bulk: bool) -> Response {
    match reply {
        IngestReply::Done(outcomes) if bulk => {
            let results: Vec<Value> = outcomes.iter().map(outcome_json).collect();
            Response::of(202, &json!({ "status": "accepted", "results": results }))
        }
        IngestReply::Done(outcomes) => match outcomes.first() {
            // The hot path's answer, written directly (no `fmt`): ids are plain hex and dashes.
            Some(EventOutcome::Accepted { event_id, issue_id }) => {
                let mut body = Vec::with_capacity(128);
                let mut id = Uuid::encode_buffer();
                body.extend_from_slice(br#"{"status":"accepted","event_id":""#);
                body.extend_from_slice(event_id.hyphenated().encode_lower(&mut id).as_bytes());
                body.extend_from_slice(br#"","issue_id":""#);
                body.extend_from_slice(issue_id.hyphenated().encode_lower(&mut id).as_bytes());
                body.extend_from_slice(br#""}"#);
                Response::json(202, body)
            }
            Some(EventOutcome::Sampled) => Response::json(202, r#"{"status":"sampled"}"#),
            Some(EventOutcome::Discarded) => Response::json(202, r#"{"status":"discarded"}"#),
            Some(outcome @ EventOutcome::Duplicate { .. }) => {
                Response::of(202, &outcome_json(outcome))
            }
            None => Response::error(500, "no outcome for the event"),
        },
        IngestReply::RateLimited { retry_after_s } => Response::error(429, "rate limited")
            .with_header("retry-after", retry_after_s.to_string()),
        IngestReply::Overloaded => Response::unavailable("overloaded"),
        IngestReply::StorageFailed => Response::unavailable("storage unavailable"),
        IngestReply::IssueLimit { index, limit } => {
            let at = if bulk {
                format!("index {index}: ")
            } else {
                String::new()
            };
            Response::error(
                422,
                &format!(
                    "issue limit reached: {at}the project has its maximum of {limit} issues; \
                     events of existing issues are still accepted"
                ),
            )
        }
        IngestReply::UnknownProject => Response::not_found(),
    }
}
