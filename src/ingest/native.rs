//! The native wire decoder (PROTOCOL 4 "Event JSON"): turns a request body or WebSocket frame
//! of Mesher JSON into canonical events (`event::Event`), refusing fields of the wrong type.
//!
//! Bodies are parsed in place with simd-json into its tape (`document`): one flat vector of
//! values in document order whose strings borrow the parsed bytes, read where it lies, with no
//! tree of maps built. A JSON `null` counts as an absent field, as SDKs commonly send `null`
//! for fields they do not set.

use std::ops::Range;

use simd_json::prelude::*;
use simd_json::tape::Value;

use super::document::{
    json_type, last_field, present, timestamp_us, with_document, Document, EVENT_DEPTH_MAX,
};
use super::event::{
    CustomFingerprint, Event, EventError, Exception, Frame, Frames, Grouping, Level, Raw, Summary,
    Tags,
};
use super::validate::validate;

/// Most events one bulk request or frame may carry (PROTOCOL "Endpoints"); more is rejected
/// whole, so a request is always answered in one bounded batch.
pub const BULK_EVENTS_MAX: usize = 100;

/// Parses a body holding exactly one event object (`POST /api/v1/events`).
pub fn parse_event(body: &[u8]) -> Result<Summary, EventError> {
    with_document(body, EVENT_DEPTH_MAX, |document, _| match event_from_value(
        document.root(),
        Raw::Sent(body),
    ) {
        Ok(event) => Ok(event.summary()),
        Err(detail) => Err(EventError::Invalid(detail)),
    })
}

/// Parses a body holding an array of 1..=`BULK_EVENTS_MAX` event objects
/// (`POST /api/v1/events/bulk`, and WebSocket frames holding an array), each with its JSON.
/// One invalid element rejects all, naming its index.
pub fn parse_bulk(body: &[u8]) -> Result<Vec<(Summary, String)>, EventError> {
    with_document(body, EVENT_DEPTH_MAX + 1, |document, elements_as_sent| {
        events_of_array(body, document, elements_as_sent)
    })
}

/// The events of a parsed bulk body, each with its JSON: written anew from the parsed value, or
/// the element's bytes as sent when the body held numbers simd-json could not (see
/// `with_document`).
fn events_of_array(
    body: &[u8],
    document: &Document<'_>,
    elements_as_sent: Option<&[Range<usize>]>,
) -> Result<Vec<(Summary, String)>, EventError> {
    let root = document.root();
    let Some(elements) = root.as_array() else {
        return Err(EventError::Invalid(format!(
            "body must be a JSON array of events, got {}",
            json_type(root)
        )));
    };
    if elements.is_empty() {
        return Err(EventError::Invalid(
            "empty array: at least one event required".to_owned(),
        ));
    }
    if elements.len() > BULK_EVENTS_MAX {
        return Err(EventError::Invalid(format!(
            "{} events in one request, at most {BULK_EVENTS_MAX} allowed",
            elements.len()
        )));
    }
    let mut events = Vec::with_capacity(elements.len());
    for (index, element) in elements.iter().enumerate() {
        let raw = match elements_as_sent {
            Some(spans) => Raw::Sent(&body[spans[index].clone()]),
            None => Raw::Parsed(element),
        };
        let event = event_from_value(element, raw)
            .map_err(|detail| EventError::Invalid(format!("index {index}: {detail}")))?;
        events.push((event.summary(), event.raw.to_json()));
    }
    Ok(events)
}

/// Whether the first non-whitespace byte opens a JSON array.
pub fn body_is_array(body: &[u8]) -> bool {
    body.iter()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|byte| *byte == b'[')
}

/// The top-level fields of an event object the server reads, any type, each the last of its
/// name: JSON readers (JavaScript's among them) keep the last of repeated keys, so the server
/// judges the event as a dashboard will read it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields<'t, 'a> {
    pub message: Option<Value<'t, 'a>>,
    pub exception: Option<Value<'t, 'a>>,
    pub level: Option<Value<'t, 'a>>,
    pub fingerprint: Option<Value<'t, 'a>>,
    pub tags: Option<Value<'t, 'a>>,
    pub environment: Option<Value<'t, 'a>>,
    pub timestamp: Option<Value<'t, 'a>>,
    pub stacktrace: Option<Value<'t, 'a>>,
}

impl<'t, 'a> Fields<'t, 'a> {
    /// One pass over the event's keys; none are found in anything but an object.
    pub fn of(event: Value<'t, 'a>) -> Fields<'t, 'a> {
        let mut fields = Fields::default();
        let Some(object) = event.as_object() else {
            return fields;
        };
        for (name, value) in object.iter() {
            let slot = match name {
                "message" => &mut fields.message,
                "exception" => &mut fields.exception,
                "level" => &mut fields.level,
                "fingerprint" => &mut fields.fingerprint,
                "tags" => &mut fields.tags,
                "environment" => &mut fields.environment,
                "timestamp" => &mut fields.timestamp,
                "stacktrace" => &mut fields.stacktrace,
                _ => continue,
            };
            *slot = Some(value);
        }
        fields
    }
}

/// Reads, checks and validates one event object: the canonical event, or the detail text of an
/// `invalid event` answer.
pub fn event_from_value<'a>(value: Value<'a, 'a>, raw: Raw<'a>) -> Result<Event<'a>, String> {
    if !value.is_object() {
        return Err(format!(
            "event must be a JSON object, got {}",
            json_type(value)
        ));
    }
    let fields = Fields::of(value);
    let (level, timestamp_us) = check_types(&fields)?;
    let event = read(&fields, level, timestamp_us, raw);
    validate(&event)?;
    Ok(event)
}

/// Refuses a field of the wrong type, so that it cannot silently change grouping or filtering;
/// gives the level and timestamp, read on the way.
fn check_types(fields: &Fields<'_, '_>) -> Result<(Level, Option<i64>), String> {
    optional_string(fields.message, "message")?;
    if let Some(exception) = present(fields.exception) {
        if !exception.is_object() {
            return Err(format!(
                "exception must be an object, got {}",
                json_type(exception)
            ));
        }
        optional_string(last_field(exception, "type_name"), "exception.type_name")?;
        optional_string(last_field(exception, "value"), "exception.value")?;
    }

    let level = match present(fields.level) {
        None => Level::Error,
        Some(level) => match level.as_str() {
            Some(name) => Level::parse(name).ok_or_else(|| {
                format!("unknown level {name:?}: expected fatal, error, warning, info or debug")
            })?,
            None => return Err(format!("level must be a string, got {}", json_type(level))),
        },
    };

    check_custom_fingerprint(present(fields.fingerprint))?;

    if let Some(tags) = present(fields.tags) {
        let Some(tags) = tags.as_object() else {
            return Err(format!("tags must be an object, got {}", json_type(tags)));
        };
        for (name, tag) in tags.iter() {
            if tag.as_str().is_none() {
                return Err(format!(
                    "tag {name:?} must be a string, got {}",
                    json_type(tag)
                ));
            }
        }
    }
    optional_string(fields.environment, "environment")?;

    let timestamp_us = match present(fields.timestamp) {
        None => None,
        Some(timestamp) => Some(timestamp_us(timestamp)?),
    };

    check_stacktrace(present(fields.stacktrace))?;
    Ok((level, timestamp_us))
}

/// The canonical event of a native event object, checked or not: a field of the wrong type
/// reads as missing.
pub fn read<'a>(
    fields: &Fields<'a, 'a>,
    level: Level,
    timestamp_us: Option<i64>,
    raw: Raw<'a>,
) -> Event<'a> {
    Event {
        grouping: Grouping::Native,
        message: string(fields.message),
        template: None,
        level,
        exception: fields
            .exception
            .filter(|exception| exception.is_object())
            .map(read_exception),
        frames: Frames::new(fields.stacktrace, Grouping::Native),
        fingerprint: fields.fingerprint.and_then(CustomFingerprint::of),
        environment: string(fields.environment),
        // Native events carry a release only as the `release` tag, by convention.
        release: None,
        tags: Tags::new(fields.tags.filter(|tags| tags.is_object())),
        timestamp_us,
        raw,
    }
}

fn string<'a>(value: Option<Value<'_, 'a>>) -> Option<&'a str> {
    value.and_then(|value| value.into_string())
}

/// `type_name`, `value` and `module_name` in one pass, each the last of its name.
fn read_exception<'a>(exception: Value<'a, 'a>) -> Exception<'a> {
    let mut read = Exception::default();
    for (name, value) in exception
        .as_object()
        .iter()
        .flat_map(|fields| fields.iter())
    {
        let slot = match name {
            "type_name" => &mut read.type_name,
            "value" => &mut read.value,
            "module_name" => &mut read.module,
            _ => continue,
        };
        *slot = value.into_string();
    }
    read
}

/// A frame's `filename`, `function_name` and `in_app` in one pass, each the last of its name.
#[inline(always)]
pub(crate) fn read_frame<'a>(frame: Value<'a, 'a>) -> Frame<'a> {
    let mut read = Frame::default();
    for (name, value) in frame.as_object().iter().flat_map(|fields| fields.iter()) {
        match name {
            "filename" => read.filename = value.into_string(),
            "function_name" => read.function = value.into_string(),
            "in_app" => read.in_app = value.as_bool() == Some(true),
            _ => {}
        }
    }
    read
}

fn optional_string<'a>(
    value: Option<Value<'_, 'a>>,
    name: &str,
) -> Result<Option<&'a str>, String> {
    match present(value) {
        None => Ok(None),
        Some(value) => match value.into_string() {
            Some(text) => Ok(Some(text)),
            None => Err(format!("{name} must be a string, got {}", json_type(value))),
        },
    }
}

fn check_custom_fingerprint(value: Option<Value<'_, '_>>) -> Result<(), String> {
    let Some(value) = value else {
        return Ok(());
    };
    if let Some(key) = value.as_str() {
        return match key.is_empty() {
            true => Err("fingerprint must not be empty".to_owned()),
            false => Ok(()),
        };
    }
    let Some(parts) = value.as_array() else {
        return Err(format!(
            "fingerprint must be a string or an array of strings, got {}",
            json_type(value)
        ));
    };
    if parts.is_empty() {
        return Err("fingerprint array must not be empty".to_owned());
    }
    match parts
        .iter()
        .enumerate()
        .find(|(_, part)| part.as_str().is_none())
    {
        None => Ok(()),
        Some((index, part)) => Err(format!(
            "fingerprint[{index}] must be a string, got {}",
            json_type(part)
        )),
    }
}

fn check_stacktrace(value: Option<Value<'_, '_>>) -> Result<(), String> {
    let Some(value) = value else {
        return Ok(());
    };
    let Some(frames) = value.as_array() else {
        return Err(format!(
            "stacktrace must be an array, got {}",
            json_type(value)
        ));
    };
    for (index, frame) in frames.iter().enumerate() {
        let Some(fields) = frame.as_object() else {
            return Err(format!(
                "stacktrace[{index}] must be an object, got {}",
                json_type(frame)
            ));
        };
        // These two make the grouping key, so a wrong type must not silently group. Every
        // copy of a repeated name is checked: the last one is read, and the others are as
        // wrong in a dashboard's eyes.
        for (name, field) in fields.iter() {
            if matches!(name, "filename" | "function_name")
                && !field.is_null()
                && field.as_str().is_none()
            {
                return Err(format!(
                    "stacktrace[{index}].{name} must be a string, got {}",
                    json_type(field)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::document::{
        seconds_us, write_json, MICROS_PER_SECOND, TIMESTAMP_MAX_S, TIMESTAMP_MIN_S,
    };
    use crate::ingest::event::{cut_at_char_boundary, TITLE_BYTES_MAX};
    use crate::ingest::fingerprint;
    use crate::ingest::testing::XorShift;

    /// A realistic browser error: 10 frames, tags, breadcrumbs and fields the server does not know.
    const REALISTIC_EVENT: &str = r#"{
  "message": "TypeError: Cannot read properties of undefined (reading 'id') at 0x7f3a",
  "level": "error",
  "exception": {"type_name": "TypeError", "value": "Cannot read properties of undefined (reading 'id')", "module_name": "checkout"},
  "stacktrace": [
    {"filename": "app/checkout.js", "function_name": "submitOrder", "lineno": 120, "colno": 17, "in_app": true},
    {"filename": "app/checkout.js", "function_name": "onClick", "lineno": 88, "colno": 5, "in_app": true},
    {"filename": "app/cart.js", "function_name": "total", "lineno": 41, "colno": 9, "in_app": true},
    {"filename": "lib/react-dom.js", "function_name": "invokeGuardedCallback", "lineno": 4070, "colno": 14},
    {"filename": "lib/react-dom.js", "function_name": "dispatchEvent", "lineno": 4102, "colno": 3},
    {"filename": "lib/react-dom.js", "function_name": "batchedUpdates", "lineno": 3971, "colno": 12},
    {"filename": "lib/scheduler.js", "function_name": "flushWork", "lineno": 212, "colno": 8},
    {"filename": "lib/scheduler.js", "function_name": "workLoop", "lineno": 190, "colno": 22},
    {"filename": "lib/scheduler.js", "function_name": "performWork", "lineno": 155, "colno": 1},
    {"filename": "<anonymous>", "function_name": "", "lineno": 1, "colno": 1}
  ],
  "breadcrumbs": [{"category": "ui.click", "message": "button#pay"}],
  "tags": {"environment": "production", "release": "shop@2.4.1", "browser": "Firefox 128"},
  "extra": {"cart_items": 3, "total": 129.9},
  "user_context": {"id": "u_1842"},
  "sdk_name": "mesher.javascript",
  "sdk_version": "1.8.0",
  "timestamp": "2024-05-06T07:08:09.123456+02:00",
  "custom_field": {"kept": [1, 2.5, true, null, "x"]}
}"#;

    fn parse(json: &str) -> Result<Summary, EventError> {
        parse_event(json.as_bytes())
    }

    fn invalid_detail(json: &str) -> String {
        match parse(json) {
            Err(EventError::Invalid(detail)) => detail,
            other => panic!("expected an invalid event for {json}, got {other:?}"),
        }
    }

    /// The JSON `json` is written as, once parsed (as for an element of a bulk body).
    fn to_json(json: &[u8]) -> Vec<u8> {
        let mut body = json.to_vec();
        let document = Document::parse(&mut body, EVENT_DEPTH_MAX + 1).expect("valid JSON");
        let mut out = Vec::new();
        write_json(document.root(), &mut out);
        out
    }

    fn reparse(json: &[u8]) -> simd_json::OwnedValue {
        simd_json::to_owned_value(&mut json.to_vec()).expect("written JSON parses")
    }

    #[test]
    fn level_names_round_trip_and_are_exact() {
        for level in [
            Level::Fatal,
            Level::Error,
            Level::Warning,
            Level::Info,
            Level::Debug,
        ] {
            assert_eq!(Level::parse(level.as_str()), Some(level));
        }
        for unknown in ["ERROR", "warn", "critical", "", " error"] {
            assert_eq!(Level::parse(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn minimal_event_gets_defaults() {
        let event = parse(r#"{"message":"Boom"}"#).unwrap();
        assert_eq!(event.level, Level::Error);
        assert_eq!(event.environment, None);
        assert_eq!(event.timestamp_us, None);
        assert_eq!(event.title, "Boom");
        assert_eq!(event.fingerprint, "msg:boom");
    }

    #[test]
    fn realistic_event_is_decoded_and_kept_whole() {
        let event = parse(REALISTIC_EVENT).unwrap();
        assert_eq!(event.level, Level::Error);
        assert_eq!(event.environment.as_deref(), Some("production"));
        assert_eq!(event.timestamp_us, Some(1_714_972_089_123_456));
        assert!(event.title.starts_with("TypeError: Cannot read"));
        assert_eq!(
            event.fingerprint,
            "app/checkout.js|submitOrder;app/checkout.js|onClick;app/cart.js|total;\
             lib/react-dom.js|invokeGuardedCallback;lib/react-dom.js|dispatchEvent;\
             lib/react-dom.js|batchedUpdates;lib/scheduler.js|flushWork;lib/scheduler.js|workLoop;\
             lib/scheduler.js|performWork;<anonymous>|:typeerror: cannot read properties of \
             undefined (reading 'id') at 7f3a"
        );
        let written = to_json(REALISTIC_EVENT.as_bytes());
        assert!(!written.contains(&b'\n'), "compact output");
        assert_eq!(reparse(&written), reparse(REALISTIC_EVENT.as_bytes()));
        let custom = std::str::from_utf8(&written).unwrap();
        assert!(custom.contains(r#""custom_field":{"kept":[1,2.5,true,null,"x"]}"#));
    }

    #[test]
    fn event_fingerprint_follows_grouping_rules() {
        let custom = parse(r#"{"message":"m","fingerprint":["a","b"]}"#).unwrap();
        assert_eq!(custom.fingerprint, "a\nb");
        let exception = parse(r#"{"exception":{"type_name":"E","value":"At 0xAB"}}"#).unwrap();
        assert_eq!(exception.fingerprint, "E:at ab");
        let frames = parse(
            r#"{"message":"X","stacktrace":[{"filename":"f","function_name":"g","lineno":3}]}"#,
        )
        .unwrap();
        assert_eq!(frames.fingerprint, "f|g:x");
    }

    #[test]
    fn titles_are_cut_to_1024_bytes_at_a_character_boundary() {
        let title = |json: String| parse(&json).unwrap().title;
        let long = "é".repeat(600);
        let cut = title(format!(r#"{{"message":"a{long}"}}"#));
        assert_eq!(cut.len(), 1023);
        assert_eq!(cut, format!("a{}", "é".repeat(511)));
        let exact = "x".repeat(TITLE_BYTES_MAX);
        assert_eq!(title(format!(r#"{{"message":"{exact}"}}"#)), exact);
        let exception = title(format!(
            r#"{{"exception":{{"type_name":"T","value":"{}"}}}}"#,
            "v".repeat(5000)
        ));
        assert_eq!(exception, format!("T: {}", "v".repeat(TITLE_BYTES_MAX - 3)));
        let long_type = title(format!(
            r#"{{"exception":{{"type_name":"{}","value":"v"}}}}"#,
            "t".repeat(5000)
        ));
        assert_eq!(long_type, "t".repeat(TITLE_BYTES_MAX));
        assert_eq!(cut_at_char_boundary("aé", 2), "a");
    }

    #[test]
    fn title_prefers_message_then_exception_then_untitled() {
        let title = |json: &str| parse(json).unwrap().title;
        assert_eq!(
            title(r#"{"message":"M","exception":{"type_name":"T","value":"V"}}"#),
            "M"
        );
        assert_eq!(
            title(r#"{"message":"","exception":{"type_name":"T","value":"V"}}"#),
            "T: V"
        );
        assert_eq!(title(r#"{"exception":{"type_name":"T"}}"#), "T");
        assert_eq!(title(r#"{"exception":{"type_name":"T","value":""}}"#), "T");
        assert_eq!(title(r#"{"exception":{"value":"V"}}"#), "V");
        assert_eq!(title(r#"{"exception":{}}"#), "Untitled");
        assert_eq!(
            title(r#"{"message":null,"exception":{"type_name":null}}"#),
            "Untitled"
        );
    }

    #[test]
    fn every_validation_error_has_a_clear_detail() {
        let cases: &[(&str, &str)] = &[
            ("[]", "event must be a JSON object, got array"),
            (r#""text""#, "event must be a JSON object, got string"),
            ("42", "event must be a JSON object, got number"),
            ("null", "event must be a JSON object, got null"),
            ("true", "event must be a JSON object, got boolean"),
            ("{}", "message or exception required"),
            (r#"{"message":""}"#, "message or exception required"),
            (
                r#"{"message":null,"exception":null}"#,
                "message or exception required",
            ),
            (r#"{"message":5}"#, "message must be a string, got number"),
            (
                r#"{"message":"m","exception":"E"}"#,
                "exception must be an object, got string",
            ),
            (
                r#"{"exception":[]}"#,
                "exception must be an object, got array",
            ),
            (
                r#"{"exception":{"type_name":1}}"#,
                "exception.type_name must be a string, got number",
            ),
            (
                r#"{"exception":{"value":{}}}"#,
                "exception.value must be a string, got object",
            ),
            (
                r#"{"message":"m","level":"critical"}"#,
                r#"unknown level "critical": expected fatal, error, warning, info or debug"#,
            ),
            (
                r#"{"message":"m","level":"ERROR"}"#,
                r#"unknown level "ERROR": expected fatal, error, warning, info or debug"#,
            ),
            (
                r#"{"message":"m","level":3}"#,
                "level must be a string, got number",
            ),
            (
                r#"{"message":"m","fingerprint":""}"#,
                "fingerprint must not be empty",
            ),
            (
                r#"{"message":"m","fingerprint":[]}"#,
                "fingerprint array must not be empty",
            ),
            (
                r#"{"message":"m","fingerprint":["a",2]}"#,
                "fingerprint[1] must be a string, got number",
            ),
            (
                r#"{"message":"m","fingerprint":{"a":"b"}}"#,
                "fingerprint must be a string or an array of strings, got object",
            ),
            (
                r#"{"message":"m","tags":["a"]}"#,
                "tags must be an object, got array",
            ),
            (
                r#"{"message":"m","tags":{"release":1.5}}"#,
                r#"tag "release" must be a string, got number"#,
            ),
            (
                r#"{"message":"m","tags":{"environment":null}}"#,
                r#"tag "environment" must be a string, got null"#,
            ),
            (
                r#"{"message":"m","environment":true}"#,
                "environment must be a string, got boolean",
            ),
            (
                r#"{"message":"m","timestamp":true}"#,
                "timestamp must be an RFC 3339 string or Unix seconds, got boolean",
            ),
            (
                r#"{"message":"m","timestamp":[1]}"#,
                "timestamp must be an RFC 3339 string or Unix seconds, got array",
            ),
            (
                r#"{"message":"m","timestamp":99999999999999}"#,
                "timestamp out of range (years 0000 to 9999)",
            ),
            (
                r#"{"message":"m","timestamp":-1e12}"#,
                "timestamp out of range (years 0000 to 9999)",
            ),
            (
                r#"{"message":"m","timestamp":18446744073709551615}"#,
                "timestamp out of range (years 0000 to 9999)",
            ),
            (
                r#"{"message":"m","stacktrace":{}}"#,
                "stacktrace must be an array, got object",
            ),
            (
                r#"{"message":"m","stacktrace":[{},"frame"]}"#,
                "stacktrace[1] must be an object, got string",
            ),
            (
                r#"{"message":"m","stacktrace":[{"filename":7}]}"#,
                "stacktrace[0].filename must be a string, got number",
            ),
            (
                r#"{"message":"m","stacktrace":[{"function_name":[]}]}"#,
                "stacktrace[0].function_name must be a string, got array",
            ),
            (
                r#"{"level":"error","message":"m","level":"bogus"}"#,
                r#"unknown level "bogus": expected fatal, error, warning, info or debug"#,
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(invalid_detail(json), *expected, "{json}");
        }
    }

    #[test]
    fn rfc3339_garbage_names_the_problem() {
        for garbage in [
            "yesterday",
            "",
            "2024-13-01T00:00:00Z",
            "2024-05-06 07:08:09",
        ] {
            let json = format!(r#"{{"message":"m","timestamp":"{garbage}"}}"#);
            let detail = invalid_detail(&json);
            assert!(
                detail.starts_with(&format!("timestamp \"{garbage}\" is not RFC 3339: ")),
                "{detail}"
            );
        }
    }

    #[test]
    fn repeated_keys_keep_the_last_value_everywhere() {
        let json = r#"{"message":"first","extra":[{"a":1,"b":2,"a":3}],"message":"last","tags":{"environment":"x","environment":"prod"}}"#;
        let event = parse(json).unwrap();
        assert_eq!(event.title, "last");
        assert_eq!(event.fingerprint, "msg:last");
        assert_eq!(event.environment.as_deref(), Some("prod"));
        // Written as sent, so a reader keeping the last copy reads what was validated.
        assert_eq!(to_json(json.as_bytes()), json.as_bytes());
        assert_eq!(
            invalid_detail(r#"{"message":"m","level":"info","level":7}"#),
            "level must be a string, got number"
        );
        assert!(parse(r#"{"message":"m","level":7,"level":"info"}"#).is_ok());
        let frames = r#"{"message":"m","stacktrace":[{"filename":"a","filename":"b"}]}"#;
        assert_eq!(parse(frames).unwrap().fingerprint, "b|:m");
        assert_eq!(
            parse(r#"{"exception":{"type_name":"A","type_name":"B"}}"#)
                .unwrap()
                .fingerprint,
            "B:"
        );

        // Objects of any size behave the same.
        let mut json = String::from(r#"{"message":"m","extra":{"#);
        for index in 0..40 {
            json.push_str(&format!(r#""k{index}":{index},"#));
        }
        json.push_str(r#""k17":"last"},"message":"final"}"#);
        assert_eq!(parse(&json).unwrap().title, "final");
    }

    #[test]
    fn null_fields_count_as_absent() {
        let event = parse(
            r#"{"message":"m","level":null,"fingerprint":null,"tags":null,"environment":null,
                "timestamp":null,"stacktrace":null,"exception":null}"#,
        )
        .unwrap();
        assert_eq!(event.level, Level::Error);
        assert_eq!(event.environment, None);
        assert_eq!(event.timestamp_us, None);
        assert_eq!(event.fingerprint, "msg:m");
        let frame_nulls =
            parse(r#"{"message":"m","stacktrace":[{"filename":null,"function_name":"f"}]}"#)
                .unwrap();
        assert_eq!(frame_nulls.fingerprint, "|f:m");
    }

    #[test]
    fn every_level_is_accepted() {
        for name in ["fatal", "error", "warning", "info", "debug"] {
            let event = parse(&format!(r#"{{"message":"m","level":"{name}"}}"#)).unwrap();
            assert_eq!(event.level.as_str(), name);
        }
    }

    #[test]
    fn environment_field_wins_over_tag() {
        let environment = |json: &str| parse(json).unwrap().environment;
        assert_eq!(
            environment(
                r#"{"message":"m","environment":"staging","tags":{"environment":"production"}}"#
            ),
            Some("staging".to_owned())
        );
        assert_eq!(
            environment(r#"{"message":"m","tags":{"environment":"production"}}"#),
            Some("production".to_owned())
        );
        assert_eq!(
            environment(r#"{"message":"m","environment":"","tags":{"environment":"production"}}"#),
            Some("production".to_owned())
        );
        assert_eq!(
            environment(r#"{"message":"m","tags":{"environment":""}}"#),
            None
        );
        assert_eq!(
            environment(r#"{"message":"m","tags":{"release":"1"}}"#),
            None
        );
    }

    #[test]
    fn timestamps_in_every_accepted_form() {
        let timestamp = |raw: &str| {
            parse(&format!(r#"{{"message":"m","timestamp":{raw}}}"#))
                .unwrap()
                .timestamp_us
                .unwrap()
        };
        assert_eq!(timestamp(r#""1970-01-01T00:00:00Z""#), 0);
        assert_eq!(
            timestamp(r#""2024-05-06T07:08:09.123456+02:00""#),
            1_714_972_089_123_456
        );
        assert_eq!(
            timestamp(r#""2024-05-06T05:08:09.123456Z""#),
            1_714_972_089_123_456
        );
        assert_eq!(
            timestamp(r#""2024-05-06T00:00:00-05:30""#),
            1_714_973_400_000_000
        );
        // Below a microsecond rounds down, also before 1970.
        assert_eq!(
            timestamp(r#""2024-05-06T05:08:09.1234569Z""#),
            1_714_972_089_123_456
        );
        assert_eq!(timestamp(r#""1969-12-31T23:59:59.9999995Z""#), -1);
        assert_eq!(timestamp("1714972089"), 1_714_972_089_000_000);
        assert_eq!(timestamp("1714972089.25"), 1_714_972_089_250_000);
        assert_eq!(timestamp("1714972089.1234567"), 1_714_972_089_123_457);
        assert_eq!(timestamp("-86400"), -86_400_000_000);
        assert_eq!(timestamp("1.5e9"), 1_500_000_000_000_000);
        assert_eq!(timestamp("0"), 0);
        assert_eq!(
            timestamp(&TIMESTAMP_MAX_S.to_string()),
            TIMESTAMP_MAX_S * MICROS_PER_SECOND
        );
        assert_eq!(
            timestamp(&TIMESTAMP_MIN_S.to_string()),
            TIMESTAMP_MIN_S * MICROS_PER_SECOND
        );
        assert_eq!(
            timestamp(r#""9999-12-31T23:59:59Z""#),
            TIMESTAMP_MAX_S * MICROS_PER_SECOND
        );
        assert_eq!(
            timestamp(r#""0000-01-01T00:00:00Z""#),
            TIMESTAMP_MIN_S * MICROS_PER_SECOND
        );
        for beyond in [TIMESTAMP_MAX_S + 1, TIMESTAMP_MIN_S - 1] {
            let json = format!(r#"{{"message":"m","timestamp":{beyond}}}"#);
            assert_eq!(
                invalid_detail(&json),
                "timestamp out of range (years 0000 to 9999)"
            );
        }
    }

    #[test]
    fn timestamp_bounds_are_the_rfc3339_years() {
        let earliest = time::OffsetDateTime::from_unix_timestamp(TIMESTAMP_MIN_S).unwrap();
        assert_eq!((earliest.year(), earliest.ordinal()), (0, 1));
        assert_eq!(earliest.time(), time::Time::MIDNIGHT);
        let latest = time::OffsetDateTime::from_unix_timestamp(TIMESTAMP_MAX_S).unwrap();
        assert_eq!(
            (latest.year(), latest.month(), latest.day()),
            (9999, time::Month::December, 31)
        );
        assert_eq!(latest.time(), time::Time::from_hms(23, 59, 59).unwrap());
    }

    #[test]
    fn non_finite_timestamp_is_refused() {
        // JSON cannot spell these, and a number too large for an f64 is no JSON number here.
        for seconds in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            assert_eq!(
                seconds_us(seconds).unwrap_err(),
                "timestamp must be a finite number"
            );
        }
        assert!(parse(r#"{"message":"m","timestamp":1e999}"#).is_err());
    }

    #[test]
    fn numbers_beyond_64_bits_are_accepted() {
        let long = format!("7{}", "0".repeat(399));
        let finite_but_long = [
            format!("1{}e-390", "0".repeat(400)),
            format!("0.{}1", "0".repeat(400)),
            format!("1.{}", "5".repeat(400)),
        ];
        let body = format!(
            r#"{{"message":"m","extra":{{"a":18446744073709551616,"b":[-9223372036854775809,1e999],"c":{long}}},"d":-1e999,"e":[{}]}}"#,
            finite_but_long.join(",")
        );
        assert_eq!(parse(&body).unwrap().title, "m");

        let wide_element = r#"{ "message": "w", "n": 18446744073709551616 }"#;
        let events =
            parse_bulk(format!(r#"[{wide_element},{{"message":"x","f":1.5}}]"#).as_bytes())
                .unwrap();
        assert_eq!(events[0].1, wide_element);
        assert_eq!(events[1].1, r#"{"message":"x","f":1.5}"#);
        assert_eq!(events[1].0.title, "x");

        for timestamp in ["1e999", "-1e999", "18446744073709551616", &long] {
            assert_eq!(
                invalid_detail(&format!(r#"{{"message":"m","timestamp":{timestamp}}}"#)),
                "timestamp out of range (years 0000 to 9999)"
            );
        }
        // Other faults are still found in a body with wide numbers.
        assert_eq!(
            invalid_detail(r#"{"message":"m","level":1e999}"#),
            "level must be a string, got number"
        );
        assert_eq!(
            parse_bulk(br#"[{"message":"m","n":1e999},{"n":1e999}]"#).unwrap_err(),
            EventError::Invalid("index 1: message or exception required".to_owned())
        );
        assert!(matches!(
            parse(r#"{"message":"m","n":1e999} x"#),
            Err(EventError::Json(_))
        ));
    }

    #[test]
    fn json_errors_say_what_is_wrong_and_where() {
        let json_error = |body: &str| match parse(body) {
            Err(EventError::Json(detail)) => detail,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(
            json_error(r#"{"message":"m"} x"#),
            "trailing characters at byte 16"
        );
        assert_eq!(
            json_error("NaN"),
            "unexpected character 'N' at byte 0, expected a value"
        );
        assert_eq!(
            parse_bulk(b"[1e999,").unwrap_err(),
            EventError::Json("unexpected end of input at byte 7, expected a value".to_owned())
        );
    }

    #[test]
    fn json_errors_are_told_apart_from_invalid_events() {
        for not_json in [
            "",
            "   ",
            "{",
            r#"{"message":"m"} x"#,
            "{}{}",
            "{'a':1}",
            "nul",
            "[1,]",
        ] {
            match parse(not_json) {
                Err(error @ EventError::Json(_)) => {
                    assert!(error.to_string().starts_with("invalid JSON: "), "{error}");
                }
                other => panic!("{not_json:?} gave {other:?}"),
            }
        }
        let not_utf8 = b"{\"message\":\"\xff\xfe\"}".to_vec();
        assert!(matches!(parse_event(&not_utf8), Err(EventError::Json(_))));
        let raw_control = b"{\"message\":\"a\x01b\"}".to_vec();
        assert!(matches!(
            parse_event(&raw_control),
            Err(EventError::Json(_))
        ));
        assert_eq!(
            EventError::Invalid("message or exception required".to_owned()).to_string(),
            "invalid event: message or exception required"
        );
        assert_eq!(
            EventError::Json("Eof at character 0".to_owned()).to_string(),
            "invalid JSON: Eof at character 0"
        );
    }

    fn nested(depth: usize) -> String {
        // `depth` levels: the event object, then arrays inside `extra`.
        let inner = depth - 1;
        format!(
            r#"{{"message":"m","extra":{}{}}}"#,
            "[".repeat(inner),
            "]".repeat(inner)
        )
    }

    #[test]
    fn nesting_is_bounded() {
        assert!(parse(&nested(EVENT_DEPTH_MAX)).is_ok());
        assert_eq!(
            invalid_detail(&nested(EVENT_DEPTH_MAX + 1)),
            "nested deeper than 64 levels of objects and arrays"
        );
        let bulk_ok = format!("[{}]", nested(EVENT_DEPTH_MAX));
        assert_eq!(parse_bulk(&bulk_ok.into_bytes()).unwrap().len(), 1);
        let frame_ok = format!(" \n[{}]", nested(EVENT_DEPTH_MAX));
        assert_eq!(parse_bulk(&frame_ok.into_bytes()).unwrap().len(), 1);
        let bulk_deep = format!("[{}]", nested(EVENT_DEPTH_MAX + 1));
        assert!(matches!(
            parse_bulk(&bulk_deep.into_bytes()),
            Err(EventError::Invalid(_))
        ));
        // Far deeper than the bound is refused the same way, without exhausting the stack.
        let very_deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            parse_bulk(&very_deep.into_bytes()),
            Err(EventError::Invalid(_))
        ));
    }

    fn bulk_of(events: &[&str]) -> Vec<u8> {
        format!("[{}]", events.join(",")).into_bytes()
    }

    #[test]
    fn bulk_accepts_one_to_the_maximum() {
        let events = parse_bulk(&bulk_of(&[
            r#"{"message":"a"}"#,
            r#"{"exception":{"type_name":"E"},"level":"fatal"}"#,
            REALISTIC_EVENT,
        ]))
        .unwrap();
        let fingerprints: Vec<&str> = events.iter().map(|e| e.0.fingerprint.as_str()).collect();
        assert_eq!(&fingerprints[..2], &["msg:a", "E:"]);
        assert_eq!(events[1].0.level, Level::Fatal);
        assert_eq!(events[2].0.environment.as_deref(), Some("production"));
        assert_eq!(
            events[1].1,
            r#"{"exception":{"type_name":"E"},"level":"fatal"}"#
        );
        assert_eq!(
            reparse(events[2].1.as_bytes()),
            reparse(REALISTIC_EVENT.as_bytes())
        );

        let one = [r#"{"message":"x"}"#];
        assert_eq!(parse_bulk(&bulk_of(&one)).unwrap().len(), 1);
        let full = vec![r#"{"message":"x"}"#; BULK_EVENTS_MAX];
        assert_eq!(parse_bulk(&bulk_of(&full)).unwrap().len(), BULK_EVENTS_MAX);
    }

    #[test]
    fn bulk_limits_and_shape() {
        let too_many = vec![r#"{"message":"x"}"#; BULK_EVENTS_MAX + 1];
        assert_eq!(
            parse_bulk(&bulk_of(&too_many)).unwrap_err().to_string(),
            "invalid event: 101 events in one request, at most 100 allowed"
        );
        assert_eq!(
            parse_bulk(b" [ ] ").unwrap_err().to_string(),
            "invalid event: empty array: at least one event required"
        );
        assert_eq!(
            parse_bulk(br#"{"message":"m"}"#).unwrap_err(),
            EventError::Invalid("body must be a JSON array of events, got object".to_owned())
        );
        assert!(matches!(
            parse_bulk(b"[{\"message\":\"m\"}"),
            Err(EventError::Json(_))
        ));
    }

    #[test]
    fn bulk_names_the_first_invalid_index() {
        let body = [
            r#"{"message":"a"}"#,
            r#"{"message":"b"}"#,
            r#"{"message":"c"}"#,
            r#"{"level":"info"}"#,
            r#"{"message":"e","level":"nope"}"#,
        ];
        assert_eq!(
            parse_bulk(&bulk_of(&body)).unwrap_err().to_string(),
            "invalid event: index 3: message or exception required"
        );
        assert_eq!(
            parse_bulk(&bulk_of(&[r#"{"message":"a"}"#, "7"]))
                .unwrap_err()
                .to_string(),
            "invalid event: index 1: event must be a JSON object, got number"
        );
        assert_eq!(
            parse_bulk(&bulk_of(&[r#"{"message":"a","tags":{"x":1}}"#]))
                .unwrap_err()
                .to_string(),
            r#"invalid event: index 0: tag "x" must be a string, got number"#
        );
    }

    #[test]
    fn body_is_array_looks_past_whitespace_only() {
        assert!(body_is_array(b"[]"));
        assert!(body_is_array(b" \t\r\n[{}]"));
        assert!(!body_is_array(b"{}"));
        assert!(!body_is_array(b"  x["));
        assert!(!body_is_array(b""));
        assert!(!body_is_array(b"   "));
    }

    /// Strings that break naive JSON writers, as keys and values.
    fn hostile_strings() -> Vec<String> {
        let every_control: String = (0u8..0x20).map(char::from).collect();
        let mut strings = vec![
            r#"say "hi""#.to_owned(),
            r"C:\path\to\file".to_owned(),
            r#"\"#.to_owned(),
            r#"\""#.to_owned(),
            every_control.clone(),
            "\u{7f}\u{80}\u{2028}\u{2029}\u{feff}".to_owned(),
            "emoji 🦀 ünïcödé 漢字 \u{10ffff}".to_owned(),
            "</script><script>alert(1)</script>".to_owned(),
            String::new(),
        ];
        // Long strings with an escape at every offset exercise the vectorised writer paths.
        for offset in 0..80 {
            let mut long = "x".repeat(80);
            let special = ['"', '\\', '\n', '\u{1}', '\u{1f}', 'é'][offset % 6];
            long.insert(offset, special);
            strings.push(long);
        }
        strings.push(every_control.repeat(5));
        strings
    }

    fn escape_for_test(text: &str) -> String {
        let mut out = String::new();
        for ch in text.chars() {
            match ch {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                ch if (ch as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", ch as u32)),
                ch => out.push(ch),
            }
        }
        out
    }

    #[test]
    fn write_json_round_trips_hostile_strings() {
        for text in hostile_strings() {
            let escaped = escape_for_test(&text);
            let json = format!(
                r#"{{"message":"m{escaped}","tags":{{"{escaped}":"{escaped}"}},"extra":["{escaped}",{{"k{escaped}":null}}]}}"#
            );
            let event = parse(&json).unwrap_or_else(|error| panic!("{json}: {error}"));
            assert_eq!(event.title, format!("m{text}"));
            let written = to_json(json.as_bytes());
            assert!(
                written.iter().all(|byte| *byte >= 0x20),
                "raw control byte in {}",
                String::from_utf8_lossy(&written)
            );
            assert!(std::str::from_utf8(&written).is_ok());
            assert_eq!(reparse(&written), reparse(json.as_bytes()), "{text:?}");
            // And the written form decodes to the same event again, and is written unchanged.
            assert_eq!(parse_event(&written).unwrap(), event);
            assert_eq!(to_json(&written), written);
        }
    }

    #[test]
    fn write_json_escapes_exactly() {
        let json = r#"{"message":"a\"b\\c\u0001\n\t\u001f/é"}"#.as_bytes();
        assert_eq!(
            String::from_utf8(to_json(json)).unwrap(),
            r#"{"message":"a\"b\\c\u0001\n\t\u001f/é"}"#
        );
        let mut body = json.to_vec();
        let document = Document::parse(&mut body, EVENT_DEPTH_MAX).unwrap();
        let mut out = b"prefix ".to_vec();
        write_json(document.root(), &mut out);
        assert!(out.starts_with(b"prefix {\"message\""), "appends");
    }

    #[test]
    fn every_truncation_of_an_event_is_refused() {
        let whole = REALISTIC_EVENT.as_bytes();
        assert!(parse_event(whole).is_ok());
        for len in 0..whole.len() {
            let prefix = whole[..len].to_vec();
            assert!(parse_event(&prefix).is_err(), "prefix of {len} bytes");
            let mut bulk_prefix = format!("[{}", REALISTIC_EVENT).into_bytes();
            bulk_prefix.truncate(len + 1);
            assert!(parse_bulk(&bulk_prefix).is_err());
        }
    }

    /// Whatever is accepted must also be written as JSON that decodes to the same value and
    /// the same event.
    fn check_never_panics(body: &[u8]) {
        if let Ok(events) = parse_bulk(body) {
            for (event, written) in events {
                assert_eq!(parse(&written), Ok(event));
            }
            assert_eq!(reparse(&to_json(body)), reparse(body));
        }
        if let Ok(event) = parse_event(body) {
            let written = to_json(body);
            assert_eq!(reparse(&written), reparse(body));
            assert_eq!(parse_event(&written), Ok(event));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut random = XorShift(0x2545_f491_4f6c_dd1d);
        // Random bytes.
        for _ in 0..3_000 {
            let len = random.below(64);
            let body: Vec<u8> = (0..len).map(|_| random.next() as u8).collect();
            check_never_panics(&body);
        }
        // JSON-looking token soup, which reaches far deeper into the parser than bytes do.
        let tokens = [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"message\"",
            "\"exception\"",
            "\"level\"",
            "\"error\"",
            "\"stacktrace\"",
            "\"fingerprint\"",
            "\"tags\"",
            "\"timestamp\"",
            "\"filename\"",
            "\"type_name\"",
            "\"x\"",
            "\"\\u0000\"",
            "\"\\ud83e\\udd80\"",
            "1",
            "-0.5",
            "1e308",
            "1e999",
            "null",
            "true",
            " ",
            "\"2024-01-01T00:00:00Z\"",
            "99999999999999999999",
            "\"",
            "\\",
        ];
        for _ in 0..20_000 {
            let count = random.below(24);
            let body: String = (0..count)
                .map(|_| tokens[random.below(tokens.len())])
                .collect();
            check_never_panics(body.as_bytes());
        }
        // Mutations of a valid event: flipped, dropped and duplicated bytes.
        let original = REALISTIC_EVENT.as_bytes();
        for _ in 0..3_000 {
            let mut body = original.to_vec();
            for _ in 0..1 + random.below(4) {
                let at = random.below(body.len());
                match random.below(3) {
                    0 => body[at] = random.next() as u8,
                    1 => {
                        body.remove(at);
                    }
                    _ => body.insert(at, body[at]),
                }
            }
            check_never_panics(&body);
        }
    }

    #[test]
    fn valid_shapes_from_the_soup_round_trip() {
        // A structured generator: random but valid events must always be accepted.
        let mut random = XorShift(0x1234_5678_9abc_def1);
        let texts = ["", "Boom", "0xFF at Addr", " spaced ", "ü\\\"\n"];
        for _ in 0..2_000 {
            let mut fields: Vec<String> = Vec::new();
            let text = |random: &mut XorShift| escape_for_test(texts[random.below(texts.len())]);
            fields.push(format!(r#""message":"x{}""#, text(&mut random)));
            if random.below(2) == 0 {
                fields.push(format!(
                    r#""exception":{{"type_name":"{}","value":"{}"}}"#,
                    text(&mut random),
                    text(&mut random)
                ));
            }
            if random.below(2) == 0 {
                let frames: Vec<String> = (0..random.below(4))
                    .map(|line| {
                        format!(
                            r#"{{"filename":"{}","function_name":"{}","lineno":{line}}}"#,
                            text(&mut random),
                            text(&mut random)
                        )
                    })
                    .collect();
                fields.push(format!(r#""stacktrace":[{}]"#, frames.join(",")));
            }
            if random.below(2) == 0 {
                fields.push(format!(
                    r#""tags":{{"environment":"{}"}}"#,
                    text(&mut random)
                ));
            }
            let json = format!("{{{}}}", fields.join(","));
            let event = parse(&json).unwrap_or_else(|error| panic!("{json}: {error}"));
            let mut body = json.clone().into_bytes();
            let document = Document::parse(&mut body, EVENT_DEPTH_MAX).unwrap();
            let root = document.root();
            let read = read(&Fields::of(root), Level::Error, None, Raw::Parsed(root));
            assert_eq!(event.fingerprint, fingerprint::key(&read));
            assert_eq!(reparse(&to_json(json.as_bytes())), reparse(json.as_bytes()));
        }
    }
}
