//! Live project streams: the messages, the per-connection filters, and fan-out on one shard.
//!
//! The owner shard encodes each message once as a complete WebSocket frame (`Published`); every
//! shard with subscribers receives the same reference-counted frames and pushes a clone of the
//! handle (not of the bytes) into the ring of each local subscriber whose filters match.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::conn::ring::{Kind, Push, Ring};
use crate::ingest::event::Level;
use crate::issues::IssueView;
use crate::ws::codec::encode_text;

/// One message as every subscriber receives it.
#[derive(Clone, Debug)]
pub struct Published {
    pub frame: Bytes,
    pub kind: Kind,
    /// Set for the messages filters apply to (events and the issue messages they cause).
    pub attributes: Option<Attributes>,
}

/// What filters look at.
#[derive(Clone, Debug)]
pub struct Attributes {
    pub level: Level,
    pub environment: Option<Arc<str>>,
}

impl Published {
    fn unfiltered(payload: &[u8], kind: Kind) -> Published {
        Published {
            frame: Bytes::from(encode_text(payload)),
            kind,
            attributes: None,
        }
    }
}

/// `{"type":"event",...,"data":<the event as sent>}`; `event_json` is already valid JSON.
pub fn event_message(
    event_id: Uuid,
    issue_id: Uuid,
    event_json: &[u8],
    attributes: Attributes,
) -> Published {
    let mut payload = Vec::with_capacity(event_json.len() + 120);
    payload.extend_from_slice(b"{\"type\":\"event\",\"event_id\":\"");
    payload.extend_from_slice(
        event_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    payload.extend_from_slice(b"\",\"issue_id\":\"");
    payload.extend_from_slice(
        issue_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    payload.extend_from_slice(b"\",\"data\":");
    payload.extend_from_slice(event_json);
    payload.push(b'}');
    Published {
        frame: Bytes::from(encode_text(&payload)),
        kind: Kind::Event,
        attributes: Some(attributes),
    }
}

/// `{"type":"issue","action":"created"|"regressed",...}`: sent before the event that caused it.
pub fn issue_opened_message(
    action: &str,
    issue: &IssueView<'_>,
    attributes: Attributes,
) -> Published {
    #[derive(Serialize)]
    struct Message<'a> {
        r#type: &'static str,
        action: &'a str,
        issue_id: Uuid,
        issue: &'a IssueView<'a>,
    }
    let payload = serde_json::to_vec(&Message {
        r#type: "issue",
        action,
        issue_id: issue.id,
        issue,
    })
    .expect("issue messages serialize");
    Published {
        frame: Bytes::from(encode_text(&payload)),
        kind: Kind::Control,
        attributes: Some(attributes),
    }
}

/// `{"type":"issue","action":"resolved"|...,"issue_id":...}`: a status change through the API.
pub fn issue_status_message(action: &str, issue_id: Uuid) -> Published {
    let payload = serde_json::json!({ "type": "issue", "action": action, "issue_id": issue_id });
    Published::unfiltered(payload.to_string().as_bytes(), Kind::Control)
}

pub fn issue_count_message(project_id: Uuid, count: u64) -> Published {
    let payload =
        serde_json::json!({ "type": "issue_count", "project_id": project_id, "count": count });
    Published::unfiltered(payload.to_string().as_bytes(), Kind::Count)
}

pub fn dropped_frame(count: u64) -> Bytes {
    Bytes::from(encode_text(
        format!("{{\"type\":\"dropped\",\"count\":{count}}}").as_bytes(),
    ))
}

pub fn error_frame(message: &str) -> Bytes {
    let payload = serde_json::json!({ "type": "error", "message": message });
    Bytes::from(encode_text(payload.to_string().as_bytes()))
}

/// A subscriber's filters; an empty list matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    levels: Vec<Level>,
    environments: Vec<Arc<str>>,
    /// The filters as the client gave them (normalized), echoed in `filters_updated`.
    shown: serde_json::Map<String, Value>,
}

impl Filters {
    pub fn matches(&self, message: &Published) -> bool {
        let Some(attributes) = &message.attributes else {
            return true;
        };
        (self.levels.is_empty() || self.levels.contains(&attributes.level))
            && (self.environments.is_empty()
                || attributes
                    .environment
                    .as_ref()
                    .is_some_and(|env| self.environments.iter().any(|e| e == env)))
    }

    /// Filters from a `subscribe` message's `filters` value (missing or null: match all).
    pub fn parse(value: Option<&Value>) -> Result<Filters, String> {
        let mut filters = Filters::default();
        let object = match value {
            None | Some(Value::Null) => return Ok(filters),
            Some(Value::Object(object)) => object,
            Some(_) => return Err("filters must be an object".into()),
        };
        for (name, value) in object {
            let values = filter_values(name, value)?;
            match name.as_str() {
                "level" => {
                    for v in &values {
                        let level = Level::parse(v)
                            .ok_or_else(|| format!("unknown level in filter: {v}"))?;
                        filters.levels.push(level);
                    }
                }
                "environment" => {
                    filters.environments = values.iter().map(|v| Arc::from(v.as_str())).collect()
                }
                other => return Err(format!("unknown filter: {other}")),
            }
            if !values.is_empty() {
                filters.shown.insert(name.clone(), value.clone());
            }
        }
        Ok(filters)
    }

    pub fn shown(&self) -> &serde_json::Map<String, Value> {
        &self.shown
    }
}

/// A filter value: a string or an array of strings; `null` and `""` match everything.
fn filter_values(name: &str, value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(format!(
                    "filter {name} must be a string or an array of strings"
                )),
            })
            .filter(|v| !matches!(v, Ok(s) if s.is_empty()))
            .collect(),
        _ => Err(format!(
            "filter {name} must be a string or an array of strings"
        )),
    }
}

/// What one subscriber's ring did with a batch of published messages.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    pub queued: u64,
    pub dropped: u64,
    /// The ring was full of messages that may not be dropped: the subscriber must go.
    pub overflowed: bool,
}

/// Pushes the messages `filters` lets through into `ring`: one reference count per message,
/// never a copy of the payload.
pub fn deliver_to(ring: &mut Ring<Bytes>, filters: &Filters, items: &[Published]) -> Delivery {
    let mut delivery = Delivery::default();
    for item in items {
        if !filters.matches(item) {
            continue;
        }
        match ring.push(item.frame.clone(), item.kind) {
            Push::Queued => delivery.queued += 1,
            Push::DroppedOldest => {
                delivery.queued += 1;
                delivery.dropped += 1;
            }
            Push::Overflow => {
                delivery.overflowed = true;
                break;
            }
        }
    }
    delivery
}

pub fn filters_updated_frame(filters: &Filters) -> Bytes {
    let payload = serde_json::json!({ "type": "filters_updated", "filters": filters.shown() });
    Bytes::from(encode_text(payload.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(level: Level, environment: Option<&str>) -> Published {
        event_message(
            Uuid::nil(),
            Uuid::nil(),
            b"{}",
            Attributes {
                level,
                environment: environment.map(Arc::from),
            },
        )
    }

    #[test]
    fn filter_forms() {
        let all = Filters::parse(Some(&json!({"level": "", "environment": null}))).unwrap();
        assert!(all.matches(&event(Level::Info, None)));
        let one = Filters::parse(Some(&json!({"level": "error"}))).unwrap();
        assert!(one.matches(&event(Level::Error, None)) && !one.matches(&event(Level::Info, None)));
        let both = Filters::parse(Some(
            &json!({"level": ["error", "fatal"], "environment": "prod"}),
        ))
        .unwrap();
        assert!(both.matches(&event(Level::Fatal, Some("prod"))));
        assert!(!both.matches(&event(Level::Fatal, Some("dev"))));
        assert!(!both.matches(&event(Level::Fatal, None)));
        assert!(both.matches(&issue_count_message(Uuid::nil(), 1)));
    }

    #[test]
    fn bad_filters_are_refused() {
        assert!(Filters::parse(Some(&json!({"level": 3}))).is_err());
        assert!(Filters::parse(Some(&json!({"level": [1]}))).is_err());
        assert!(Filters::parse(Some(&json!({"level": "loud"}))).is_err());
        assert!(Filters::parse(Some(&json!({"colour": "red"}))).is_err());
        assert!(Filters::parse(Some(&json!("error"))).is_err());
    }

    #[test]
    fn event_frame_embeds_the_event_verbatim() {
        let message = event_message(
            Uuid::nil(),
            Uuid::nil(),
            br#"{"message":"x","odd":[1]}"#,
            Attributes {
                level: Level::Error,
                environment: None,
            },
        );
        let header_len = match message.frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let payload = &message.frame[header_len..];
        let value: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(value["data"], json!({"message": "x", "odd": [1]}));
        assert_eq!(value["type"], "event");
    }
}
