//! Live project streams: the messages, the per-connection filters, the subscribers of each
//! shard (`registry`), fan-out into their rings, and each project's offsets and history of sent
//! frames (`history`) from which a reconnecting client resumes.
//!
//! The owner shard encodes each message once as a complete WebSocket frame (`Published`); every
//! shard with subscribers receives the same reference-counted frames and pushes a clone of the
//! handle (not of the bytes) into the ring of each local subscriber whose filters match. The
//! owner's history keeps further handles to the same frames.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::conn::ring::{Dropped, Kind, Push, Ring};
use crate::ingest::event::Level;
use crate::issues::IssueView;
use crate::ws::codec::{encode_text, encode_text_parts};

mod history;
mod registry;
pub use history::{HistoryLimits, ProjectStream, Resumption};
pub use registry::{
    close_project, join, leave, publish, resumed, set_filters, welcome, Watchers, Welcome,
};

/// One message as every subscriber receives it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Published {
    pub frame: Bytes,
    pub kind: Kind,
    /// The message's place in its project's stream (PROTOCOL.md section 9).
    pub offset: u64,
    /// Set for the messages filters apply to (events and the issue messages they cause).
    pub attributes: Option<Attributes>,
}

/// What filters look at.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attributes {
    pub level: Level,
    pub environment: Option<Arc<str>>,
}

fn text_frame(message: &impl Serialize) -> Bytes {
    let payload = serde_json::to_vec(message).expect("stream messages serialize");
    Bytes::from(encode_text(&payload))
}

/// `{"type":"event","offset":N,...,"data":<the event as sent>}`; `event_json` is already valid
/// JSON. The frame is written in one allocation, the event's JSON verbatim at its end (see
/// `event_json_in`).
pub fn event_message(
    offset: u64,
    event_id: Uuid,
    issue_id: Uuid,
    event_json: &[u8],
    attributes: Attributes,
) -> Published {
    let mut head = Vec::with_capacity(140);
    head.extend_from_slice(b"{\"type\":\"event\",\"offset\":");
    head.extend_from_slice(offset.to_string().as_bytes());
    head.extend_from_slice(b",\"event_id\":\"");
    head.extend_from_slice(
        event_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    head.extend_from_slice(b"\",\"issue_id\":\"");
    head.extend_from_slice(
        issue_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    head.extend_from_slice(b"\",\"data\":");
    Published {
        frame: Bytes::from(encode_text_parts(&[&head, event_json, b"}"])),
        kind: Kind::Event,
        offset,
        attributes: Some(attributes),
    }
}

/// The event's JSON inside an event message's frame (its last bytes but the closing brace):
/// the same bytes, shared, not copied.
pub fn event_json_in(frame: &Bytes, json_len: usize) -> Bytes {
    let end = frame.len() - 1;
    frame.slice(end - json_len..end)
}

/// `{"type":"issue","offset":N,"action":...,"issue_id":...,"issue":{...}}`: the whole issue in
/// its state after the change. `attributes` are the causing event's when an event opened or
/// reopened the issue (then filters apply, and it goes before that event); None for a status
/// change through the API (every subscriber gets it).
pub fn issue_message(
    offset: u64,
    action: &str,
    issue: &IssueView<'_>,
    attributes: Option<Attributes>,
) -> Published {
    #[derive(Serialize)]
    struct Message<'a> {
        r#type: &'static str,
        offset: u64,
        action: &'a str,
        issue_id: Uuid,
        issue: &'a IssueView<'a>,
    }
    Published {
        frame: text_frame(&Message {
            r#type: "issue",
            offset,
            action,
            issue_id: issue.id,
            issue,
        }),
        kind: Kind::Issue(issue.id.as_u128()),
        offset,
        attributes,
    }
}

#[derive(Serialize)]
struct CountMessage<'a> {
    r#type: &'static str,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    project_id: Uuid,
    count: u64,
}

/// `{"type":"issue_count","offset":N,"project_id":...,"count":N}`: the unresolved count changed.
pub fn issue_count_message(offset: u64, project_id: Uuid, count: u64) -> Published {
    Published {
        frame: text_frame(&CountMessage {
            r#type: "issue_count",
            offset,
            epoch: None,
            project_id,
            count,
        }),
        kind: Kind::Count,
        offset,
        attributes: None,
    }
}

/// The first message of a new epoch when a node takes a project over: the unresolved count,
/// carrying the epoch, at offset 1. Subscribers on other nodes learn from it that offsets
/// restarted.
pub fn epoch_message(offset: u64, epoch: &str, project_id: Uuid, count: u64) -> Published {
    Published {
        frame: welcome_frame(epoch, offset, project_id, count),
        kind: Kind::Count,
        offset,
        attributes: None,
    }
}

/// A batch of one project's messages as its owner publishes them to other nodes.
#[derive(Serialize, serde::Deserialize)]
pub struct Batch {
    pub epoch: Arc<str>,
    pub items: Vec<Published>,
}

pub fn encode_batch(epoch: &str, items: &[Published]) -> Bytes {
    #[derive(Serialize)]
    struct BatchRef<'a> {
        epoch: &'a str,
        items: &'a [Published],
    }
    Bytes::from(postcard::to_stdvec(&BatchRef { epoch, items }).expect("stream messages serialize"))
}

pub fn decode_batch(bytes: &[u8]) -> Option<Batch> {
    postcard::from_bytes(bytes).ok()
}

/// A subscriber's first message: the unresolved count, with the project's epoch and the last
/// offset produced (PROTOCOL.md section 9).
pub fn welcome_frame(epoch: &str, last_offset: u64, project_id: Uuid, count: u64) -> Bytes {
    text_frame(&CountMessage {
        r#type: "issue_count",
        offset: last_offset,
        epoch: Some(epoch),
        project_id,
        count,
    })
}

/// `{"type":"resumed",...}`: the reply to a resume (PROTOCOL.md section 9).
pub fn resumed_frame(recovered: bool, replayed: u64, epoch: &str, last_offset: u64) -> Bytes {
    #[derive(Serialize)]
    struct Recovered {
        r#type: &'static str,
        recovered: bool,
        replayed: u64,
        offset: u64,
    }
    #[derive(Serialize)]
    struct NotRecovered<'a> {
        r#type: &'static str,
        recovered: bool,
        epoch: &'a str,
        offset: u64,
    }
    if recovered {
        text_frame(&Recovered {
            r#type: "resumed",
            recovered,
            replayed,
            offset: last_offset,
        })
    } else {
        text_frame(&NotRecovered {
            r#type: "resumed",
            recovered,
            epoch,
            offset: last_offset,
        })
    }
}

pub fn dropped_frame(dropped: Dropped) -> Bytes {
    Bytes::from(encode_text(
        format!(
            "{{\"type\":\"dropped\",\"count\":{},\"from_offset\":{},\"to_offset\":{}}}",
            dropped.count, dropped.from_offset, dropped.to_offset
        )
        .as_bytes(),
    ))
}

pub fn error_frame(message: &str) -> Bytes {
    let payload = serde_json::json!({ "type": "error", "message": message });
    Bytes::from(encode_text(payload.to_string().as_bytes()))
}

/// Where a client resumes: the epoch and the last offset it got (PROTOCOL.md section 9).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Since {
    pub epoch: String,
    pub offset: u64,
}

/// Longest epoch a client may name; ours are 16 characters, so a longer one is certainly not
/// the project's and is refused rather than carried to the owner.
const EPOCH_BYTES_MAX: usize = 64;

impl Since {
    /// `EPOCH:OFFSET` from the upgrade's query.
    pub fn from_query(text: &str) -> Result<Since, String> {
        let refused = || format!("invalid since: expected EPOCH:OFFSET, got {text:?}");
        let (epoch, offset) = text.rsplit_once(':').ok_or_else(refused)?;
        let offset = offset.parse::<u64>().map_err(|_| refused())?;
        Since::checked(epoch, offset).map_err(|_| refused())
    }

    /// `{"epoch":"...","offset":N}` from a `subscribe` message.
    fn from_value(value: &Value) -> Result<Since, String> {
        let refused = || "since must be an object with a string epoch and an integer offset >= 0";
        let object = value.as_object().ok_or_else(refused)?;
        let epoch = object
            .get("epoch")
            .and_then(Value::as_str)
            .ok_or_else(refused)?;
        let offset = object
            .get("offset")
            .and_then(Value::as_u64)
            .ok_or_else(refused)?;
        Since::checked(epoch, offset).map_err(|()| refused().to_string())
    }

    fn checked(epoch: &str, offset: u64) -> Result<Since, ()> {
        if epoch.is_empty() || epoch.len() > EPOCH_BYTES_MAX {
            return Err(());
        }
        Ok(Since {
            epoch: epoch.to_owned(),
            offset,
        })
    }
}

/// A client's `{"type":"subscribe","filters":{...},"since":{...}?}`.
#[derive(Debug)]
pub struct Subscribe {
    pub filters: Filters,
    pub since: Option<Since>,
}

impl Subscribe {
    /// The message, or what is wrong with it (sent back as an `error` message; nothing of a
    /// refused message takes effect).
    pub fn parse(text: &str) -> Result<Subscribe, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let object = value
            .as_object()
            .ok_or("expected a JSON object with a type")?;
        match object.get("type").and_then(|t| t.as_str()) {
            Some("subscribe") => {}
            Some(other) => return Err(format!("unknown message type: {other}")),
            None => return Err("expected a JSON object with a type".into()),
        }
        let filters = Filters::parse(object.get("filters"))?;
        let since = match object.get("since") {
            None | Some(Value::Null) => None,
            Some(value) => Some(Since::from_value(value)?),
        };
        Ok(Subscribe { filters, since })
    }
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
    /// More distinct issues wait than a client may have: it must go (1013).
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
        match ring.push(item.frame.clone(), item.kind, item.offset) {
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
        let filters = Subscribe::parse(r#"{"type":"subscribe","filters":{"level":"error"}}"#)
            .unwrap()
            .filters;
        assert!(filters.matches(&event(Level::Error, None)));
        assert!(!filters.matches(&event(Level::Warning, None)));
        for (text, error) in [
            ("{", "invalid JSON"),
            ("[1]", "expected a JSON object with a type"),
            (r#"{"filters":{}}"#, "expected a JSON object with a type"),
            (r#"{"type":"ping"}"#, "unknown message type: ping"),
            (r#"{"type":"subscribe","since":"e:1"}"#, "since must be"),
            (
                r#"{"type":"subscribe","since":{"epoch":"e"}}"#,
                "since must be",
            ),
            (
                r#"{"type":"subscribe","since":{"epoch":"e","offset":-1}}"#,
                "since must be",
            ),
            (
                r#"{"type":"subscribe","since":{"epoch":"","offset":1}}"#,
                "since must be",
            ),
            (
                r#"{"type":"subscribe","since":{"epoch":7,"offset":1}}"#,
                "since must be",
            ),
        ] {
            let refused = Subscribe::parse(text).unwrap_err();
            assert!(refused.starts_with(error), "{text}: {refused}");
        }
    }

    fn event(level: Level, environment: Option<&str>) -> Published {
        event_message(
            1,
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
        assert!(both.matches(&issue_count_message(1, Uuid::nil(), 1)));
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
            42,
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
        assert_eq!(value["offset"], 42);
        let json = br#"{"message":"x","odd":[1]}"#;
        assert_eq!(&event_json_in(&message.frame, json.len())[..], json);
    }

    #[test]
    fn since_in_the_query_and_in_subscribe() {
        let since = |epoch: &str, offset| Since {
            epoch: epoch.to_owned(),
            offset,
        };
        assert_eq!(Since::from_query("abc:12"), Ok(since("abc", 12)));
        assert_eq!(Since::from_query("a:b:0"), Ok(since("a:b", 0)));
        for bad in ["", "abc", "abc:", ":1", "abc:-1", "abc:x", "abc:1.5"] {
            assert!(Since::from_query(bad).is_err(), "{bad}");
        }
        let long = format!("{}:1", "e".repeat(EPOCH_BYTES_MAX + 1));
        assert!(Since::from_query(&long).is_err());
        let parsed = Subscribe::parse(
            r#"{"type":"subscribe","filters":null,"since":{"epoch":"abc","offset":3}}"#,
        )
        .unwrap();
        assert_eq!(parsed.since, Some(since("abc", 3)));
        assert_eq!(parsed.filters, Filters::default());
        let plain = Subscribe::parse(r#"{"type":"subscribe","since":null}"#).unwrap();
        assert_eq!(plain.since, None);
    }

    #[test]
    fn messages_carry_offsets_and_the_welcome_its_epoch() {
        let payload = |frame: &Bytes| -> Value { serde_json::from_slice(&frame[2..]).unwrap() };
        let project = Uuid::nil();
        assert_eq!(
            payload(&issue_count_message(7, project, 3).frame),
            json!({"type": "issue_count", "offset": 7, "project_id": project, "count": 3})
        );
        assert_eq!(
            payload(&welcome_frame("ep", 7, project, 3)),
            json!({"type": "issue_count", "offset": 7, "epoch": "ep", "project_id": project, "count": 3})
        );
        assert_eq!(
            payload(&resumed_frame(true, 4, "ep", 9)),
            json!({"type": "resumed", "recovered": true, "replayed": 4, "offset": 9})
        );
        assert_eq!(
            payload(&resumed_frame(false, 0, "ep", 9)),
            json!({"type": "resumed", "recovered": false, "epoch": "ep", "offset": 9})
        );
        let dropped = Dropped {
            count: 2,
            from_offset: 5,
            to_offset: 8,
        };
        assert_eq!(
            payload(&dropped_frame(dropped)),
            json!({"type": "dropped", "count": 2, "from_offset": 5, "to_offset": 8})
        );
    }
}
