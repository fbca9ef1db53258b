//! Live project streams: the messages, the per-connection filters, the subscribers of each
//! shard (`registry`) and fan-out into their rings.
//!
//! The owner shard encodes each message once as a complete WebSocket frame (`Published`); every
//! shard with subscribers receives the same reference-counted frames and pushes a clone of the
//! handle (not of the bytes) into the ring of each local subscriber whose filters match.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::conn::ring::{Kind, Push, Ring};
use crate::ingest::event::Level;
use crate::issues::IssueView;
use crate::ws::codec::encode_text;

mod registry;
pub use registry::{join, leave, publish, set_filters, welcome, Watchers};

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

/// Most values one filter may list; a `subscribe` with more is refused. Matching and the memory
/// a subscriber holds stay small, whatever a client sends.
pub const FILTER_VALUES_MAX: usize = 100;
/// Longest filter value in bytes (environment names are short); a longer one is refused.
pub const FILTER_VALUE_BYTES_MAX: usize = 256;
/// Environment lists longer than this are matched through a hash set instead of a scan.
const ENVIRONMENTS_SCANNED_MAX: usize = 8;

/// A subscriber's filters; an empty list matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    /// Each level at most once, so at most five.
    levels: Vec<Level>,
    environments: Environments,
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
                    .is_some_and(|env| self.environments.contains(env)))
    }

    /// The filters of a client's `{"type":"subscribe","filters":{...}}` message, or what is
    /// wrong with it (sent back as an `error` message).
    pub fn from_subscribe(text: &str) -> Result<Filters, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let object = value
            .as_object()
            .ok_or("expected a JSON object with a type")?;
        match object.get("type").and_then(|t| t.as_str()) {
            Some("subscribe") => Filters::parse(object.get("filters")),
            Some(other) => Err(format!("unknown message type: {other}")),
            None => Err("expected a JSON object with a type".into()),
        }
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
                        if !filters.levels.contains(&level) {
                            filters.levels.push(level);
                        }
                    }
                }
                "environment" => filters.environments = Environments::new(&values),
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

/// The environment names a filter accepts. A short list is scanned; a long one is hashed, so a
/// message costs about the same to match however many names the client gave.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Environments {
    Few(Vec<Arc<str>>),
    Many(HashSet<Arc<str>>),
}

impl Default for Environments {
    fn default() -> Self {
        Environments::Few(Vec::new())
    }
}

impl Environments {
    fn new(values: &[String]) -> Environments {
        // Names come from clients: the standard (SipHash) hasher.
        let unique: HashSet<Arc<str>> = values.iter().map(|v| Arc::from(v.as_str())).collect();
        if unique.len() > ENVIRONMENTS_SCANNED_MAX {
            Environments::Many(unique)
        } else {
            Environments::Few(unique.into_iter().collect())
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Environments::Few(names) => names.is_empty(),
            Environments::Many(names) => names.is_empty(),
        }
    }

    fn contains(&self, environment: &str) -> bool {
        match self {
            Environments::Few(names) => names.iter().any(|name| **name == *environment),
            Environments::Many(names) => names.contains(environment),
        }
    }
}

/// A filter value: a string or an array of strings; `null` and `""` match everything. At most
/// `FILTER_VALUES_MAX` values of at most `FILTER_VALUE_BYTES_MAX` bytes each.
fn filter_values(name: &str, value: &Value) -> Result<Vec<String>, String> {
    if let Value::Array(items) = value {
        if items.len() > FILTER_VALUES_MAX {
            return Err(format!(
                "filter {name} has {} values, at most {FILTER_VALUES_MAX} allowed",
                items.len()
            ));
        }
    }
    let longest = match value {
        Value::String(text) => text.len(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::len)
            .max()
            .unwrap_or(0),
        _ => 0,
    };
    if longest > FILTER_VALUE_BYTES_MAX {
        return Err(format!(
            "filter {name} has a value of {longest} bytes, at most {FILTER_VALUE_BYTES_MAX} allowed"
        ));
    }
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

    #[test]
    fn subscribe_messages_and_what_is_wrong_with_them() {
        let filters =
            Filters::from_subscribe(r#"{"type":"subscribe","filters":{"level":"error"}}"#).unwrap();
        assert!(filters.matches(&event(Level::Error, None)));
        assert!(!filters.matches(&event(Level::Warning, None)));
        for (text, error) in [
            ("{", "invalid JSON"),
            ("[1]", "expected a JSON object with a type"),
            (r#"{"filters":{}}"#, "expected a JSON object with a type"),
            (r#"{"type":"ping"}"#, "unknown message type: ping"),
        ] {
            let refused = Filters::from_subscribe(text).unwrap_err();
            assert!(refused.starts_with(error), "{text}: {refused}");
        }
    }

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
    fn filters_are_bounded_in_values_and_value_length() {
        let names =
            |count: usize| -> Vec<String> { (0..count).map(|i| format!("env{i}")).collect() };
        let most =
            Filters::parse(Some(&json!({ "environment": names(FILTER_VALUES_MAX) }))).unwrap();
        assert!(most.matches(&event(Level::Info, Some("env99"))));
        assert!(most.matches(&event(Level::Info, Some("env0"))));
        assert!(!most.matches(&event(Level::Info, Some("env100"))));
        assert!(!most.matches(&event(Level::Info, None)));
        assert_eq!(
            Filters::parse(Some(
                &json!({ "environment": names(FILTER_VALUES_MAX + 1) })
            )),
            Err("filter environment has 101 values, at most 100 allowed".to_owned())
        );
        let levels = vec!["error"; FILTER_VALUES_MAX + 1];
        assert!(Filters::parse(Some(&json!({ "level": levels }))).is_err());
        let longest = "e".repeat(FILTER_VALUE_BYTES_MAX);
        let long = Filters::parse(Some(&json!({ "environment": [&longest] }))).unwrap();
        assert!(long.matches(&event(Level::Info, Some(&longest))));
        let over = "e".repeat(FILTER_VALUE_BYTES_MAX + 1);
        for value in [json!(over), json!(["prod", over])] {
            assert_eq!(
                Filters::parse(Some(&json!({ "environment": value }))),
                Err("filter environment has a value of 257 bytes, at most 256 allowed".to_owned())
            );
        }
    }

    #[test]
    fn repeated_filter_values_count_once() {
        let filters = Filters::parse(Some(
            &json!({"level": ["error", "error", "info"], "environment": ["a", "b", "a", "c"]}),
        ))
        .unwrap();
        assert_eq!(filters.levels, [Level::Error, Level::Info]);
        let Environments::Few(names) = &filters.environments else {
            panic!("three names are scanned");
        };
        assert_eq!(names.len(), 3);
        assert!(filters.matches(&event(Level::Info, Some("c"))));
        assert!(!filters.matches(&event(Level::Warning, Some("c"))));
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
