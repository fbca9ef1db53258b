//! The Sentry wire decoder (PROTOCOL 8 "Reading a Sentry event"): reads a Sentry event from
//! simd-json's tape into the canonical event (`ingest::event::Event`), grouped by the Sentry
//! rule set, and turns it into the same `Incoming` as a native event.
//!
//! Sentry's own ingestion normalises what it cannot use rather than refusing the event, and
//! SDKs do not expect refusals: so a field of an unexpected type counts as missing here. Only a
//! body that is not a JSON object, or an `event_id` that is not an id, is refused.

use std::ops::Deref;

use simd_json::prelude::*;
use simd_json::tape::Value;
use uuid::Uuid;

use crate::ingest::document::{
    json_type, last_field, present, timestamp_us, with_copy, EVENT_DEPTH_MAX,
};
use crate::ingest::event::{
    CustomFingerprint, Event, EventError, Exception, Frame, Frames, Grouping, Level, Raw, Summary,
    Tags,
};
pub use crate::ingest::fingerprint::SENTRY_TITLE_CHARS_MAX as TITLE_CHARS_MAX;
use crate::ingest::validate::validate;
use crate::ingest::Incoming;

use super::envelope::parse_event_id;

/// A Sentry event, ready for its owner shard.
#[derive(Debug)]
pub struct SentryEvent {
    /// `event_id`; `None` when the SDK sent none (the server makes one).
    pub event_id: Option<Uuid>,
    /// `release`, when a non-empty string.
    pub release: Option<String>,
    pub incoming: Incoming,
}

/// A `store` body (already decoded): one event JSON object, kept as sent without a copy.
pub fn decode_store_body(body: Vec<u8>) -> Result<SentryEvent, EventError> {
    let read = read_event(&body)?;
    // SAFETY: simd-json accepted a copy of these very bytes, and it refuses any input that is
    // not UTF-8 as a whole.
    let json = unsafe { String::from_utf8_unchecked(body) };
    Ok(read.into_event(json))
}

/// The payload of an envelope item of type `event`.
pub fn decode_event_item(payload: &[u8]) -> Result<SentryEvent, EventError> {
    let read = read_event(payload)?;
    // SAFETY: as in `decode_store_body`.
    let json = unsafe { std::str::from_utf8_unchecked(payload) }.to_owned();
    Ok(read.into_event(json))
}

/// What an event says, without its JSON.
#[derive(Debug, PartialEq)]
struct Read {
    event_id: Option<Uuid>,
    summary: Summary,
}

impl Deref for Read {
    type Target = Summary;

    fn deref(&self) -> &Summary {
        &self.summary
    }
}

impl Read {
    fn into_event(self, json: String) -> SentryEvent {
        let mut summary = self.summary;
        let release = summary.release.take();
        let mut incoming = Incoming::new(summary, json);
        incoming.event_id = self.event_id;
        SentryEvent {
            event_id: self.event_id,
            release,
            incoming,
        }
    }
}

fn read_event(bytes: &[u8]) -> Result<Read, EventError> {
    with_copy(bytes, EVENT_DEPTH_MAX, |document| {
        let (event_id, event) =
            read_value(document.root(), Raw::Sent(bytes)).map_err(EventError::Invalid)?;
        validate(&event).map_err(EventError::Invalid)?;
        Ok(Read {
            event_id,
            summary: event.summary(),
        })
    })
}

/// The top-level fields of a Sentry event that the server reads, each the last of its name.
#[derive(Clone, Copy, Default)]
struct Fields<'t, 'a> {
    event_id: Option<Value<'t, 'a>>,
    level: Option<Value<'t, 'a>>,
    logentry: Option<Value<'t, 'a>>,
    message: Option<Value<'t, 'a>>,
    exception: Option<Value<'t, 'a>>,
    stacktrace: Option<Value<'t, 'a>>,
    threads: Option<Value<'t, 'a>>,
    fingerprint: Option<Value<'t, 'a>>,
    environment: Option<Value<'t, 'a>>,
    release: Option<Value<'t, 'a>>,
    tags: Option<Value<'t, 'a>>,
    timestamp: Option<Value<'t, 'a>>,
}

impl<'t, 'a> Fields<'t, 'a> {
    /// One pass over the keys; the tape skips each value's insides (breadcrumbs, contexts,
    /// modules...) in one step.
    fn of(object: simd_json::tape::Object<'t, 'a>) -> Fields<'t, 'a> {
        let mut fields = Fields::default();
        for (name, value) in object.iter() {
            let slot = match name {
                "event_id" => &mut fields.event_id,
                "level" => &mut fields.level,
                "logentry" => &mut fields.logentry,
                "message" => &mut fields.message,
                "exception" => &mut fields.exception,
                "stacktrace" => &mut fields.stacktrace,
                "threads" => &mut fields.threads,
                "fingerprint" => &mut fields.fingerprint,
                "environment" => &mut fields.environment,
                "release" => &mut fields.release,
                "tags" => &mut fields.tags,
                "timestamp" => &mut fields.timestamp,
                _ => continue,
            };
            *slot = present(Some(value));
        }
        fields
    }
}

/// The event's id and canonical event.
fn read_value<'a>(event: Value<'a, 'a>, raw: Raw<'a>) -> Result<(Option<Uuid>, Event<'a>), String> {
    let Some(object) = event.as_object() else {
        return Err(format!(
            "event must be a JSON object, got {}",
            json_type(event)
        ));
    };
    let fields = Fields::of(object);

    let event_id = fields
        .event_id
        .map(|id| {
            id.as_str()
                .and_then(parse_event_id)
                .ok_or_else(|| "event_id must be 32 hex digits, with or without dashes".to_owned())
        })
        .transpose()?;

    let raised = fields.exception.and_then(raised_exception);
    // Frames tell where it happened: the exception's own, else the event's or the crashed
    // thread's.
    let frames = raised
        .and_then(|(_, frames)| frames)
        .or_else(|| fields.stacktrace.and_then(stacktrace_frames))
        .or_else(|| fields.threads.and_then(crashed_thread_frames));

    Ok((
        event_id,
        Event {
            grouping: Grouping::Sentry,
            message: message(&fields),
            template: fields
                .logentry
                .and_then(|logentry| text(last_field(logentry, "message"))),
            level: level(fields.level),
            exception: raised.map(|(exception, _)| exception),
            frames: Frames::new(frames, Grouping::Sentry),
            fingerprint: fields.fingerprint.and_then(CustomFingerprint::of),
            environment: text(fields.environment),
            release: text(fields.release),
            tags: Tags::new(fields.tags),
            timestamp_us: fields
                .timestamp
                .and_then(|timestamp| timestamp_us(timestamp).ok()),
            raw,
        },
    ))
}

/// A non-empty string.
fn text<'a>(value: Option<Value<'_, 'a>>) -> Option<&'a str> {
    value
        .and_then(ValueIntoString::into_string)
        .filter(|text| !text.is_empty())
}

/// `level`, with the names SDKs use for Python's and others' levels; unknown: `error`.
fn level(value: Option<Value<'_, '_>>) -> Level {
    let Some(name) = value.and_then(|value| value.into_string()) else {
        return Level::Error;
    };
    let known = [
        ("fatal", Level::Fatal),
        ("critical", Level::Fatal),
        ("error", Level::Error),
        ("warning", Level::Warning),
        ("warn", Level::Warning),
        ("info", Level::Info),
        ("debug", Level::Debug),
    ];
    known
        .iter()
        .find(|(known_name, _)| name.eq_ignore_ascii_case(known_name))
        .map_or(Level::Error, |(_, level)| *level)
}

/// `logentry.formatted`, else `logentry.message`, else `message` (a string, or an object with
/// `formatted` or `message`).
fn message<'a>(fields: &Fields<'_, 'a>) -> Option<&'a str> {
    let from_object = |object: Value<'_, 'a>| {
        text(last_field(object, "formatted")).or_else(|| text(last_field(object, "message")))
    };
    fields
        .logentry
        .and_then(from_object)
        .or_else(|| text(fields.message))
        .or_else(|| fields.message.and_then(from_object))
}

/// The exception that was raised (the last of `exception.values`, or of `exception` as a list)
/// and its frames, when it has any.
fn raised_exception<'a>(
    exception: Value<'a, 'a>,
) -> Option<(Exception<'a>, Option<Value<'a, 'a>>)> {
    let values = if exception.is_array() {
        exception
    } else {
        last_field(exception, "values")?
    };
    let raised = values.as_array()?.iter().filter(Value::is_object).last()?;
    let mut read = Exception::default();
    let mut frames = None;
    for (name, value) in raised.as_object()?.iter() {
        match name {
            "type" => read.type_name = text(Some(value)),
            "value" => read.value = text(Some(value)),
            "module" => read.module = text(Some(value)),
            "stacktrace" => frames = stacktrace_frames(value),
            _ => {}
        }
    }
    Some((read, frames))
}

/// A stack trace's `frames`, when it has any.
fn stacktrace_frames<'t, 'a>(stacktrace: Value<'t, 'a>) -> Option<Value<'t, 'a>> {
    last_field(stacktrace, "frames")
        .filter(|frames| frames.as_array().is_some_and(|f| !f.is_empty()))
}

/// The frames of the first thread marked `crashed` (`threads.values`, or `threads` as a list).
fn crashed_thread_frames<'t, 'a>(threads: Value<'t, 'a>) -> Option<Value<'t, 'a>> {
    let values = if threads.is_array() {
        threads
    } else {
        last_field(threads, "values")?
    };
    let crashed = values.as_array()?.iter().find(|thread| {
        last_field(*thread, "crashed").and_then(|crashed| crashed.as_bool()) == Some(true)
    })?;
    stacktrace_frames(last_field(crashed, "stacktrace")?)
}

/// A frame's names in one pass over its fields (which may hold large `vars`): `filename`
/// stands for `abs_path` when missing.
#[inline(always)]
pub(crate) fn read_frame<'a>(frame: Value<'a, 'a>) -> Frame<'a> {
    let (mut filename, mut abs_path) = (None, None);
    let mut read = Frame::default();
    for (name, value) in frame.as_object().iter().flat_map(|fields| fields.iter()) {
        match name {
            "module" => read.module = text(Some(value)),
            "filename" => filename = text(Some(value)),
            "abs_path" => abs_path = text(Some(value)),
            "function" => read.function = text(Some(value)),
            "in_app" => read.in_app = value.as_bool() == Some(true),
            _ => {}
        }
    }
    read.filename = filename.or(abs_path);
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYTHON_EXCEPTION: &str =
        include_str!("../../../tests/fixtures/sentry/python_exception.json");
    const PYTHON_LOGGING: &str = include_str!("../../../tests/fixtures/sentry/python_logging.json");
    const NODE_EXCEPTION: &str = include_str!("../../../tests/fixtures/sentry/node_exception.json");
    const NATIVE_THREADS: &str = include_str!("../../../tests/fixtures/sentry/native_crash.json");

    fn read(json: &str) -> Read {
        read_event(json.as_bytes()).unwrap_or_else(|error| panic!("{error}: {json}"))
    }

    /// `json` with the first `from` replaced by `to`, checking that `from` is there.
    fn edit(json: &str, from: &str, to: &str) -> String {
        assert!(json.contains(from), "{from:?} not in fixture");
        json.replacen(from, to, 1)
    }

    #[test]
    fn python_exception_fixture() {
        let event = read(PYTHON_EXCEPTION);
        assert_eq!(
            event.event_id,
            Some(Uuid::parse_str("0f3e5ac3e8bb4c1e9c4bd61e3aa8c2a1").unwrap())
        );
        assert_eq!(event.level, Level::Error);
        assert_eq!(event.environment.as_deref(), Some("production"));
        assert_eq!(event.release.as_deref(), Some("shop@2.4.1"));
        assert_eq!(event.title, "KeyError: 'user_42'");
        // Only the in-app frames, oldest call first, without line numbers.
        assert_eq!(
            event.fingerprint,
            "KeyError;shop.views|get_cart;shop.cart|load_cart;shop.cart|lookup_user"
        );
        assert_eq!(event.timestamp_us, Some(1_715_000_889_123_456));
    }

    #[test]
    fn same_exception_at_the_same_place_is_one_issue() {
        let first = read(PYTHON_EXCEPTION);
        let again = read(&edit(
            &edit(
                PYTHON_EXCEPTION,
                "0f3e5ac3e8bb4c1e9c4bd61e3aa8c2a1",
                "1a2b3c4d5e6f40718293a4b5c6d7e8f9",
            ),
            "2024-05-06T13:08:09.123456Z",
            "2024-05-07T01:00:00Z",
        ));
        assert_eq!(first.fingerprint, again.fingerprint);
        // Another key, and lines moved by an edit elsewhere in the file: still one issue.
        let other_key = read(&edit(PYTHON_EXCEPTION, "'user_42'", "'user_7'"));
        let moved = read(&edit(PYTHON_EXCEPTION, "\"lineno\": 88", "\"lineno\": 95"));
        assert_eq!(first.fingerprint, other_key.fingerprint);
        assert_eq!(other_key.title, "KeyError: 'user_7'");
        assert_eq!(first.fingerprint, moved.fingerprint);
    }

    #[test]
    fn a_different_type_or_place_is_another_issue() {
        let first = read(PYTHON_EXCEPTION);
        let other_type = read(&edit(PYTHON_EXCEPTION, "\"KeyError\"", "\"IndexError\""));
        assert_ne!(first.fingerprint, other_type.fingerprint);
        let other_function = read(&edit(PYTHON_EXCEPTION, "\"lookup_user\"", "\"find_user\""));
        assert_ne!(first.fingerprint, other_function.fingerprint);
        // Library frames do not count while in-app frames exist.
        let other_library_frame = read(&edit(
            PYTHON_EXCEPTION,
            "\"function\": \"dispatch_request\"",
            "\"function\": \"full_dispatch_request\"",
        ));
        assert_eq!(first.fingerprint, other_library_frame.fingerprint);
    }

    #[test]
    fn without_in_app_frames_every_frame_counts() {
        let json = r#"{"exception":{"values":[{"type":"E","value":"v","stacktrace":{"frames":[
            {"module":"a","function":"f","in_app":false},{"filename":"b.py","function":"g"},
            {"abs_path":"/c.py","function":"h","lineno":3}]}}]}}"#;
        assert_eq!(read(json).fingerprint, "E;a|f;b.py|g;/c.py|h");
    }

    #[test]
    fn the_last_exception_is_the_raised_one() {
        let chained = r#"{"exception":{"values":[
            {"type":"KeyError","value":"'a'","stacktrace":{"frames":[{"module":"m","function":"f","in_app":true}]}},
            {"type":"RuntimeError","value":"wrapped\nsecond line","stacktrace":{"frames":[{"module":"m","function":"g","in_app":true}]}}
        ]}}"#;
        let event = read(chained);
        assert_eq!(event.title, "RuntimeError: wrapped");
        assert_eq!(event.fingerprint, "RuntimeError;m|g");
        // `exception` as a bare list reads the same.
        let list = r#"{"exception":[{"type":"A","value":"x"},{"type":"B","value":"Y 0x1"}]}"#;
        assert_eq!(read(list).fingerprint, "B:y 1");
        assert_eq!(read(list).title, "B: Y 0x1");
    }

    #[test]
    fn exception_without_frames_groups_by_type_and_normalised_value() {
        let event = read(r#"{"exception":{"values":[{"type":"ValueError","value":"Bad 0xFF "}]}}"#);
        assert_eq!(event.fingerprint, "ValueError:bad ff");
        assert_eq!(event.title, "ValueError: Bad 0xFF");
        // Empty frames are no frames.
        let empty =
            r#"{"exception":{"values":[{"type":"E","value":"v","stacktrace":{"frames":[]}}]}}"#;
        assert_eq!(read(empty).fingerprint, "E:v");
    }

    #[test]
    fn node_exception_fixture() {
        let event = read(NODE_EXCEPTION);
        assert_eq!(
            event.title,
            "TypeError: Cannot read properties of undefined (reading 'id')"
        );
        assert_eq!(
            event.fingerprint,
            "TypeError;routes:orders|Object.getOrder;services:orders|loadOrder"
        );
        assert_eq!(event.level, Level::Error);
        assert_eq!(event.environment.as_deref(), Some("staging"));
        assert_eq!(event.release.as_deref(), Some("orders-api@1.8.0"));
        assert_eq!(event.timestamp_us, Some(1_715_000_889_512_000));
        assert_eq!(
            event.event_id,
            Some(Uuid::parse_str("c5b9a0f2d33e4f0d8a61f8e2b7d4a9e1").unwrap())
        );
    }

    #[test]
    fn logging_messages_group_by_template() {
        let event = read(PYTHON_LOGGING);
        assert_eq!(event.title, "user bob not found");
        assert_eq!(event.fingerprint, "msg:user %s not found");
        assert_eq!(event.level, Level::Warning);
        let other_user = read(
            &PYTHON_LOGGING
                .replace("\"bob\"", "\"alice\"")
                .replace("user bob not found", "user alice not found"),
        );
        assert_eq!(other_user.title, "user alice not found");
        assert_eq!(event.fingerprint, other_user.fingerprint);
        let other_template = read(&edit(PYTHON_LOGGING, "user %s not found", "user %s locked"));
        assert_ne!(event.fingerprint, other_template.fingerprint);
    }

    #[test]
    fn message_sources_in_order() {
        let title = |json: &str| read(json).summary.title;
        let key = |json: &str| read(json).summary.fingerprint;
        assert_eq!(
            title(r#"{"logentry":{"message":"t %s","formatted":"t 1"},"message":"m"}"#),
            "t 1"
        );
        assert_eq!(
            title(r#"{"logentry":{"message":"t %s"},"message":"m"}"#),
            "t %s"
        );
        assert_eq!(title(r#"{"message":"Plain\nsecond"}"#), "Plain");
        assert_eq!(title(r#"{"message":{"formatted":"F","message":"M"}}"#), "F");
        assert_eq!(title(r#"{"message":{"message":"M"}}"#), "M");
        assert_eq!(
            key(r#"{"message":"  Disk FULL at 0x1f "}"#),
            "msg:disk full at 1f"
        );
        assert_eq!(
            key(r#"{"message":{"message":"Tmpl %s","formatted":"x"}}"#),
            "msg:x"
        );
        assert_eq!(
            key(r#"{"logentry":{"message":"Tmpl %s","formatted":"x"}}"#),
            "msg:Tmpl %s"
        );
        assert_eq!(key("{}"), "msg:");
        assert_eq!(title("{}"), "Untitled");
        assert_eq!(title(r#"{"message":"","logentry":{}}"#), "Untitled");
    }

    #[test]
    fn titles_prefer_the_exception_and_are_clipped() {
        let title = |json: &str| read(json).summary.title;
        assert_eq!(
            title(r#"{"message":"m","exception":{"values":[{"type":"E","value":"v"}]}}"#),
            "E: v"
        );
        assert_eq!(
            title(r#"{"message":"m","exception":{"values":[{"type":"E"}]}}"#),
            "E"
        );
        assert_eq!(
            title(r#"{"exception":{"values":[{"value":"only value"}]}}"#),
            "only value"
        );
        assert_eq!(title(r#"{"message":"m","exception":{"values":[]}}"#), "m");
        let long = "é".repeat(300);
        let clipped = title(&format!(
            r#"{{"exception":{{"values":[{{"type":"E","value":"{long}"}}]}}}}"#
        ));
        assert_eq!(clipped.chars().count(), TITLE_CHARS_MAX);
        assert!(clipped.starts_with("E: éé"));
        assert_eq!(
            title(&format!(r#"{{"message":"{long}"}}"#)).chars().count(),
            200
        );
    }

    #[test]
    fn custom_fingerprints_with_default() {
        let key = |json: &str| read(json).summary.fingerprint;
        let exception = r#""exception":{"values":[{"type":"E","value":"V"}]}"#;
        assert_eq!(
            key(&format!(
                r#"{{"fingerprint":["checkout","{{{{ default }}}}"],{exception}}}"#
            )),
            "checkout\nE:v"
        );
        assert_eq!(
            key(&format!(
                r#"{{"fingerprint":["{{{{default}}}}","x"],{exception}}}"#
            )),
            "E:v\nx"
        );
        assert_eq!(
            key(r#"{"fingerprint":["db","timeout"],"message":"ignored"}"#),
            "db\ntimeout"
        );
        assert_eq!(
            key(r#"{"fingerprint":"{{ default }}","message":"M"}"#),
            "msg:m"
        );
        assert_eq!(key(r#"{"fingerprint":"solo","message":"M"}"#), "solo");
        assert_eq!(key(r#"{"fingerprint":[],"message":"M"}"#), "msg:m");
        assert_eq!(
            key(r#"{"fingerprint":["a",1,null],"message":"M"}"#),
            "a\n\n"
        );
        // The same default key as without a fingerprint, frames included.
        let with_default = read(&edit(
            PYTHON_EXCEPTION,
            "\"platform\": \"python\"",
            "\"fingerprint\": [\"{{ default }}\", \"eu\"], \"platform\": \"python\"",
        ));
        assert_eq!(
            with_default.fingerprint,
            format!("{}\neu", read(PYTHON_EXCEPTION).fingerprint)
        );
    }

    #[test]
    fn crashed_thread_frames_when_the_exception_has_none() {
        let event = read(NATIVE_THREADS);
        assert_eq!(event.title, "SIGSEGV: Segfault");
        assert_eq!(
            event.fingerprint,
            "SIGSEGV;render.cpp|Renderer::draw;render.cpp|Mesh::upload"
        );
        assert_eq!(event.level, Level::Fatal);
        // The top-level stacktrace counts too, and before the threads.
        let top = r#"{"exception":{"values":[{"type":"E"}]},
            "stacktrace":{"frames":[{"function":"main","filename":"a.c"}]},
            "threads":{"values":[{"crashed":true,"stacktrace":{"frames":[{"function":"t"}]}}]}}"#;
        assert_eq!(read(top).fingerprint, "E;a.c|main");
        // Threads as a list; a thread that did not crash does not count.
        let listed = r#"{"exception":{"values":[{"type":"E","value":"v"}]},
            "threads":[{"crashed":false,"stacktrace":{"frames":[{"function":"x"}]}},
                       {"crashed":true,"stacktrace":{"frames":[{"function":"y","module":"m"}]}}]}"#;
        assert_eq!(read(listed).fingerprint, "E;m|y");
        let none_crashed = r#"{"exception":{"values":[{"type":"E","value":"v"}]},
            "threads":{"values":[{"current":true,"stacktrace":{"frames":[{"function":"x"}]}}]}}"#;
        assert_eq!(read(none_crashed).fingerprint, "E:v");
    }

    #[test]
    fn levels_environment_tags_and_timestamps() {
        let level = |name: &str| read(&format!(r#"{{"level":"{name}"}}"#)).level;
        assert_eq!(level("warn"), Level::Warning);
        assert_eq!(level("critical"), Level::Fatal);
        assert_eq!(level("fatal"), Level::Fatal);
        assert_eq!(level("INFO"), Level::Info);
        assert_eq!(level("debug"), Level::Debug);
        assert_eq!(level("verbose"), Level::Error);
        assert_eq!(read(r#"{"level":3}"#).level, Level::Error);
        assert_eq!(read("{}").level, Level::Error);

        let environment = |json: &str| read(json).summary.environment;
        assert_eq!(
            environment(r#"{"environment":"prod","tags":{"environment":"x"}}"#).as_deref(),
            Some("prod")
        );
        assert_eq!(
            environment(r#"{"tags":{"environment":"qa"}}"#).as_deref(),
            Some("qa")
        );
        assert_eq!(
            environment(r#"{"tags":[["a","b"],["environment","dev"],["bad"]]}"#).as_deref(),
            Some("dev")
        );
        assert_eq!(environment(r#"{"environment":"","tags":7}"#), None);

        let at = |timestamp: &str| read(&format!(r#"{{"timestamp":{timestamp}}}"#)).timestamp_us;
        assert_eq!(at("1715000889.5"), Some(1_715_000_889_500_000));
        assert_eq!(at("1715000889"), Some(1_715_000_889_000_000));
        assert_eq!(
            at(r#""2024-05-06T13:08:09.25+02:00""#),
            Some(1_714_993_689_250_000)
        );
        assert_eq!(at(r#""yesterday""#), None);
        assert_eq!(at("null"), None);
    }

    #[test]
    fn refused_only_when_not_an_object_or_a_bad_id() {
        let refused = |json: &str| read_event(json.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            refused("[]"),
            "invalid event: event must be a JSON object, got array"
        );
        assert!(refused("{").starts_with("invalid JSON: "));
        assert_eq!(
            refused(r#"{"event_id":"xyz"}"#),
            "invalid event: event_id must be 32 hex digits, with or without dashes"
        );
        assert_eq!(
            refused(r#"{"event_id":7}"#),
            "invalid event: event_id must be 32 hex digits, with or without dashes"
        );
        assert_eq!(read(r#"{"event_id":null}"#).event_id, None);
        let dashed = read(r#"{"event_id":"0f3e5ac3-e8bb-4c1e-9c4b-d61e3aa8c2a1"}"#);
        assert_eq!(dashed.event_id, read(PYTHON_EXCEPTION).event_id);
        // Wrong types elsewhere count as missing.
        let odd = read(
            r#"{"message":5,"logentry":"x","exception":{"values":7},"threads":1,"stacktrace":[],
                "fingerprint":{},"release":1,"timestamp":true}"#,
        );
        assert_eq!(
            (odd.title.as_str(), odd.fingerprint.as_str()),
            ("Untitled", "msg:")
        );
    }

    #[test]
    fn json_is_kept_as_sent() {
        let event = decode_event_item(PYTHON_EXCEPTION.as_bytes()).unwrap();
        assert_eq!(event.incoming.json, PYTHON_EXCEPTION);
        assert_eq!(event.incoming.title, "KeyError: 'user_42'");
        let stored = decode_store_body(NODE_EXCEPTION.as_bytes().to_vec()).unwrap();
        assert_eq!(stored.incoming.json, NODE_EXCEPTION);
        assert!(decode_store_body(b"{\"message\":\"\xff\"}".to_vec()).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let original = PYTHON_EXCEPTION.as_bytes();
        let mut random = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        for _ in 0..2_000 {
            let mut body = original.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() % body.len() as u64) as usize;
                body[at] = next() as u8;
            }
            let _ = read_event(&body);
        }
    }
}
