//! Event decoding and validation (PROTOCOL "Event JSON"): turns a request body or WebSocket
//! frame into checked events carrying what grouping, filtering and storage need.
//!
//! Bodies are parsed in place with simd-json into a value that borrows its strings from the
//! parsed bytes (no copy of a string without escapes) and keeps every field as sent. A JSON `null` counts as an absent
//! field, as SDKs commonly send `null` for fields they do not set.

use std::fmt;

use simd_json::prelude::*;
use std::borrow::Cow;

use simd_json::{BorrowedValue as Value, Buffers, ErrorType};

use super::fingerprint::fingerprint;

/// Most events one bulk request or frame may carry (PROTOCOL "Endpoints"); more is rejected
/// whole, so a request is always answered in one bounded batch.
pub const BULK_EVENTS_MAX: usize = 100;

/// Deepest nesting of objects and arrays inside one event, the event object being level 1.
/// Real events stay far below it; the bound keeps every recursive walk of the value (drop,
/// encoding, consumers' JSON decoders, which commonly stop at 128) within a small stack.
/// Deeper input is rejected as an invalid event.
pub const EVENT_DEPTH_MAX: usize = 64;

/// Earliest accepted `timestamp`, 0000-01-01T00:00:00Z: RFC 3339 has four-digit years, so every
/// accepted time can be written back as RFC 3339.
const TIMESTAMP_MIN_S: i64 = -62_167_219_200;
/// Latest accepted `timestamp`, 9999-12-31T23:59:59Z, for the same reason.
const TIMESTAMP_MAX_S: i64 = 253_402_300_799;
const MICROS_PER_SECOND: i64 = 1_000_000;

/// Severity of an event; also the severity of the issue it opens.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Fatal,
    Error,
    Warning,
    Info,
    Debug,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Fatal => "fatal",
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// The level named exactly (lowercase) as on the wire.
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "fatal" => Some(Level::Fatal),
            "error" => Some(Level::Error),
            "warning" => Some(Level::Warning),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }
}

/// A validated event with the fields the server acts on extracted from it.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    /// The whole event object as sent, unknown fields included.
    pub value: Value<'a>,
    /// `level`, default `error`.
    pub level: Level,
    /// `environment`, else `tags.environment`; an empty string counts as absent.
    pub environment: Option<String>,
    /// The grouping key (see `fingerprint`).
    pub fingerprint: String,
    /// Issue title: the message, else `type_name: value` of the exception, else `Untitled`.
    pub title: String,
    /// `timestamp` in microseconds since the Unix epoch; `None` when the event has none (the
    /// receive time applies).
    pub timestamp_us: Option<i64>,
}

impl Event<'_> {
    /// Appends the event as compact JSON. Every string is escaped as JSON requires, so the
    /// output is valid JSON whatever the event contains.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let written = Writable::write(&self.value, out);
        // Writing into a Vec cannot fail.
        debug_assert!(written.is_ok());
    }
}

/// Why a body was refused; both become `400 {"error": "<Display>"}`.
#[derive(Debug, PartialEq)]
pub enum EventError {
    /// The body is not JSON.
    Json(String),
    /// The body is JSON but not an acceptable event (or list of events).
    Invalid(String),
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::Json(detail) => write!(f, "invalid JSON: {detail}"),
            EventError::Invalid(detail) => write!(f, "invalid event: {detail}"),
        }
    }
}

impl std::error::Error for EventError {}

/// Parses a body holding exactly one event object (`POST /api/v1/events`).
pub fn parse_event(body: &mut [u8]) -> Result<Event<'_>, EventError> {
    let value = parse_json(body, EVENT_DEPTH_MAX)?;
    event_from_value(value).map_err(EventError::Invalid)
}

/// Parses a body holding an array of 1..=`BULK_EVENTS_MAX` event objects
/// (`POST /api/v1/events/bulk`). One invalid element rejects all, naming its index.
pub fn parse_bulk(body: &mut [u8]) -> Result<Vec<Event<'_>>, EventError> {
    match parse_json(body, EVENT_DEPTH_MAX + 1)? {
        Value::Array(elements) => events_from_array(*elements),
        other => Err(EventError::Invalid(format!(
            "body must be a JSON array of events, got {}",
            json_type(&other)
        ))),
    }
}

/// Parses a WebSocket ingest frame: one event object, or an array as for `parse_bulk`.
/// `body_is_array` tells which form a frame had, e.g. to choose the reply's shape.
pub fn parse_frame(body: &mut [u8]) -> Result<Vec<Event<'_>>, EventError> {
    let depth_max = if body_is_array(body) {
        EVENT_DEPTH_MAX + 1
    } else {
        EVENT_DEPTH_MAX
    };
    match parse_json(body, depth_max)? {
        Value::Array(elements) => events_from_array(*elements),
        value @ Value::Object(_) => Ok(vec![event_from_value(value).map_err(EventError::Invalid)?]),
        other => Err(EventError::Invalid(format!(
            "frame must be an event object or an array of events, got {}",
            json_type(&other)
        ))),
    }
}

/// Whether the first non-whitespace byte opens a JSON array.
pub fn body_is_array(body: &[u8]) -> bool {
    body.iter()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|byte| *byte == b'[')
}

/// Validates a decoded event and extracts its fields. The error is the detail text of an
/// `invalid event` answer.
pub fn event_from_value(mut value: Value<'_>) -> Result<Event<'_>, String> {
    merge_duplicate_keys(&mut value);
    let object = match &value {
        Value::Object(object) => object,
        other => {
            return Err(format!(
                "event must be a JSON object, got {}",
                json_type(other)
            ))
        }
    };

    let message = optional_string(object.get("message"), "message")?;
    let exception = match present(object.get("exception")) {
        None => None,
        Some(Value::Object(exception)) => Some(exception),
        Some(other) => {
            return Err(format!(
                "exception must be an object, got {}",
                json_type(other)
            ));
        }
    };
    let exception_type = match exception {
        Some(exception) => optional_string(exception.get("type_name"), "exception.type_name")?,
        None => None,
    };
    let exception_value = match exception {
        Some(exception) => optional_string(exception.get("value"), "exception.value")?,
        None => None,
    };
    if message.is_none_or(str::is_empty) && exception.is_none() {
        return Err("message or exception required".to_owned());
    }

    let level = match present(object.get("level")) {
        None => Level::Error,
        Some(Value::String(name)) => Level::parse(name).ok_or_else(|| {
            format!("unknown level {name:?}: expected fatal, error, warning, info or debug")
        })?,
        Some(other) => return Err(format!("level must be a string, got {}", json_type(other))),
    };

    check_custom_fingerprint(present(object.get("fingerprint")))?;

    let tags = match present(object.get("tags")) {
        None => None,
        Some(Value::Object(tags)) => Some(tags),
        Some(other) => return Err(format!("tags must be an object, got {}", json_type(other))),
    };
    if let Some(tags) = tags {
        for (name, tag) in tags.iter() {
            if !matches!(tag, Value::String(_)) {
                return Err(format!(
                    "tag {name:?} must be a string, got {}",
                    json_type(tag)
                ));
            }
        }
    }
    let tag_environment = match tags {
        Some(tags) => optional_string(tags.get("environment"), "tags.environment")?,
        None => None,
    };
    let environment = optional_string(object.get("environment"), "environment")?
        .filter(|name| !name.is_empty())
        .or(tag_environment.filter(|name| !name.is_empty()))
        .map(str::to_owned);

    let timestamp_us = match present(object.get("timestamp")) {
        None => None,
        Some(timestamp) => Some(timestamp_us(timestamp)?),
    };

    check_stacktrace(present(object.get("stacktrace")))?;

    let title = title(message, exception_type, exception_value);
    let fingerprint = fingerprint(&value);
    Ok(Event {
        value,
        level,
        environment,
        fingerprint,
        title,
        timestamp_us,
    })
}

/// Inputs up to this size parse with working buffers kept per thread; a larger one (a bulk body
/// of megabytes) gets its own, so no thread holds on to megabytes of them.
pub(crate) const REUSED_BUFFERS_INPUT_BYTES_MAX: usize = 64 * 1024;

thread_local! {
    /// simd-json's working buffers by depth limit, reused across parses on this thread: each
    /// parse would otherwise allocate three buffers the size of its input.
    static BUFFERS: std::cell::RefCell<Vec<(usize, Buffers)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn parse_json(body: &mut [u8], depth_max: usize) -> Result<Value<'_>, EventError> {
    if body.len() > REUSED_BUFFERS_INPUT_BYTES_MAX {
        let mut buffers = Buffers::with_max_depth(body.len(), depth_max);
        return parse_with(body, &mut buffers);
    }
    BUFFERS.with(|cell| {
        let mut kept = cell.borrow_mut();
        let found = kept
            .as_slice()
            .iter()
            .position(|(depth, _)| *depth == depth_max);
        let index = found.unwrap_or_else(|| {
            let buffers = Buffers::with_max_depth(REUSED_BUFFERS_INPUT_BYTES_MAX, depth_max);
            kept.push((depth_max, buffers));
            kept.len() - 1
        });
        parse_with(body, &mut kept[index].1)
    })
}

fn parse_with<'a>(body: &'a mut [u8], buffers: &mut Buffers) -> Result<Value<'a>, EventError> {
    simd_json::to_borrowed_value_with_buffers(body, buffers).map_err(|error| {
        if *error.error() == ErrorType::DepthLimitExceeded {
            EventError::Invalid(format!(
                "nested deeper than {EVENT_DEPTH_MAX} levels of objects and arrays"
            ))
        } else {
            EventError::Json(error.to_string())
        }
    })
}

fn events_from_array(elements: Vec<Value<'_>>) -> Result<Vec<Event<'_>>, EventError> {
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
    for (index, element) in elements.into_iter().enumerate() {
        let event = event_from_value(element)
            .map_err(|detail| EventError::Invalid(format!("index {index}: {detail}")))?;
        events.push(event);
    }
    Ok(events)
}

/// The value unless it is missing or `null`.
fn present<'v, 'a>(value: Option<&'v Value<'a>>) -> Option<&'v Value<'a>> {
    value.filter(|value| !value.is_null())
}

fn optional_string<'v>(
    value: Option<&'v Value<'_>>,
    name: &str,
) -> Result<Option<&'v str>, String> {
    match present(value) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("{name} must be a string, got {}", json_type(other))),
    }
}

fn check_custom_fingerprint(value: Option<&Value<'_>>) -> Result<(), String> {
    match value {
        None => Ok(()),
        Some(Value::String(key)) if key.is_empty() => {
            Err("fingerprint must not be empty".to_owned())
        }
        Some(Value::String(_)) => Ok(()),
        Some(Value::Array(parts)) if parts.is_empty() => {
            Err("fingerprint array must not be empty".to_owned())
        }
        Some(Value::Array(parts)) => {
            match parts
                .iter()
                .position(|part| !matches!(part, Value::String(_)))
            {
                None => Ok(()),
                Some(index) => Err(format!(
                    "fingerprint[{index}] must be a string, got {}",
                    json_type(&parts[index])
                )),
            }
        }
        Some(other) => Err(format!(
            "fingerprint must be a string or an array of strings, got {}",
            json_type(other)
        )),
    }
}

fn check_stacktrace(value: Option<&Value<'_>>) -> Result<(), String> {
    let frames = match value {
        None => return Ok(()),
        Some(Value::Array(frames)) => frames,
        Some(other) => {
            return Err(format!(
                "stacktrace must be an array, got {}",
                json_type(other)
            ));
        }
    };
    for (index, frame) in frames.iter().enumerate() {
        let Value::Object(frame) = frame else {
            return Err(format!(
                "stacktrace[{index}] must be an object, got {}",
                json_type(frame)
            ));
        };
        // These two make the grouping key, so a wrong type must not silently group.
        for field in ["filename", "function_name"] {
            if let Some(other) = present(frame.get(field)) {
                if !matches!(other, Value::String(_)) {
                    return Err(format!(
                        "stacktrace[{index}].{field} must be a string, got {}",
                        json_type(other)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `timestamp` as RFC 3339 text or Unix seconds (integer or fraction), in microseconds.
fn timestamp_us(value: &Value<'_>) -> Result<i64, String> {
    let out_of_range = || "timestamp out of range (years 0000 to 9999)".to_owned();
    let seconds_in_range =
        |seconds: f64| (TIMESTAMP_MIN_S as f64..=TIMESTAMP_MAX_S as f64).contains(&seconds);
    if let Value::String(text) = value {
        let time =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map_err(|error| format!("timestamp {text:?} is not RFC 3339: {error}"))?;
        let micros = time.unix_timestamp_nanos().div_euclid(1_000);
        return i64::try_from(micros).map_err(|_| out_of_range());
    }
    if let Some(seconds) = value.as_i64() {
        if !(TIMESTAMP_MIN_S..=TIMESTAMP_MAX_S).contains(&seconds) {
            return Err(out_of_range());
        }
        return Ok(seconds * MICROS_PER_SECOND);
    }
    match value.cast_f64() {
        Some(seconds) if !seconds.is_finite() => {
            Err("timestamp must be a finite number".to_owned())
        }
        Some(seconds) if !seconds_in_range(seconds) => Err(out_of_range()),
        // In range, so the product fits an i64 with room to spare.
        Some(seconds) => Ok((seconds * MICROS_PER_SECOND as f64).round() as i64),
        None => Err(format!(
            "timestamp must be an RFC 3339 string or Unix seconds, got {}",
            json_type(value)
        )),
    }
}

fn title(
    message: Option<&str>,
    exception_type: Option<&str>,
    exception_value: Option<&str>,
) -> String {
    fn non_empty(text: Option<&str>) -> Option<&str> {
        text.filter(|text| !text.is_empty())
    }
    match (
        non_empty(message),
        non_empty(exception_type),
        non_empty(exception_value),
    ) {
        (Some(message), _, _) => message.to_owned(),
        (None, Some(type_name), Some(value)) => format!("{type_name}: {value}"),
        (None, Some(type_name), None) => type_name.to_owned(),
        (None, None, Some(value)) => value.to_owned(),
        (None, None, None) => "Untitled".to_owned(),
    }
}

/// Keeps only the last of repeated keys in every object, the value JavaScript and most JSON
/// readers see. The parser already does so for objects stored hashed (over 32 keys); smaller
/// ones keep every copy, so what was validated could differ from what a dashboard reads.
fn merge_duplicate_keys(value: &mut Value<'_>) {
    match value {
        Value::Array(elements) => elements.iter_mut().for_each(merge_duplicate_keys),
        Value::Object(object) => {
            // Hashed objects cannot hold a key twice; the others hold at most 32 keys, so
            // comparing pairs is cheap.
            let has_duplicate = object.is_vec()
                && object
                    .keys()
                    .enumerate()
                    .any(|(index, key)| object.keys().skip(index + 1).any(|later| later == key));
            if has_duplicate {
                let entries: Vec<(Cow<'_, str>, Value<'_>)> = object.drain().collect();
                for (key, field) in entries {
                    // Replaces the value in place: the key keeps its first position.
                    object.insert(key, field);
                }
            }
            object.values_mut().for_each(merge_duplicate_keys);
        }
        Value::Static(_) | Value::String(_) => {}
    }
}

fn json_type(value: &Value<'_>) -> &'static str {
    match value {
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Static(_) if value.is_null() => "null",
        Value::Static(_) if value.is_bool() => "boolean",
        Value::Static(_) => "number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The test's input bytes, kept for the rest of the test run: parsed values borrow them.
    fn leaked(bytes: &[u8]) -> &'static mut [u8] {
        Box::leak(bytes.to_vec().into_boxed_slice())
    }

    fn parse(json: &str) -> Result<Event<'static>, EventError> {
        parse_event(leaked(json.as_bytes()))
    }

    fn invalid_detail(json: &str) -> String {
        match parse(json) {
            Err(EventError::Invalid(detail)) => detail,
            other => panic!("expected an invalid event for {json}, got {other:?}"),
        }
    }

    fn to_json(event: &Event) -> Vec<u8> {
        let mut out = Vec::new();
        event.write_json(&mut out);
        out
    }

    fn reparse(json: &[u8]) -> simd_json::OwnedValue {
        simd_json::to_owned_value(&mut json.to_vec()).expect("written JSON parses")
    }

    /// Small deterministic generator so failures reproduce.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }
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
        let written = to_json(&event);
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
        let event = parse(
            r#"{"message":"first","extra":[{"a":1,"b":2,"a":3}],"message":"last","tags":{"environment":"x","environment":"prod"}}"#,
        )
        .unwrap();
        assert_eq!(event.title, "last");
        assert_eq!(event.fingerprint, "msg:last");
        assert_eq!(event.environment.as_deref(), Some("prod"));
        assert_eq!(
            String::from_utf8(to_json(&event)).unwrap(),
            r#"{"message":"last","extra":[{"a":3,"b":2}],"tags":{"environment":"prod"}}"#
        );

        // Objects stored hashed behave the same.
        let mut json = String::from(r#"{"message":"m","extra":{"#);
        for index in 0..40 {
            json.push_str(&format!(r#""k{index}":{index},"#));
        }
        json.push_str(r#""k17":"last"}}"#);
        let event = parse(&json).unwrap();
        let extra = &event.value.as_object().unwrap()["extra"];
        assert_eq!(extra.as_object().unwrap().len(), 40);
        assert_eq!(extra.as_object().unwrap()["k17"], "last");
        let written = to_json(&event);
        assert_eq!(written.windows(5).filter(|w| w == b"\"k17\"").count(), 1);
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
        for seconds in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            let mut value = parse(r#"{"message":"m"}"#).unwrap().value;
            if let Value::Object(object) = &mut value {
                object.insert("timestamp".into(), Value::from(seconds));
            }
            assert_eq!(
                event_from_value(value).unwrap_err(),
                "timestamp must be a finite number"
            );
        }
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
        let mut not_utf8 = b"{\"message\":\"\xff\xfe\"}".to_vec();
        assert!(matches!(
            parse_event(&mut not_utf8),
            Err(EventError::Json(_))
        ));
        let mut raw_control = b"{\"message\":\"a\x01b\"}".to_vec();
        assert!(matches!(
            parse_event(&mut raw_control),
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
        assert_eq!(parse_bulk(&mut bulk_ok.into_bytes()).unwrap().len(), 1);
        let frame_ok = format!(" \n[{}]", nested(EVENT_DEPTH_MAX));
        assert_eq!(parse_frame(&mut frame_ok.into_bytes()).unwrap().len(), 1);
        assert!(parse_frame(&mut nested(EVENT_DEPTH_MAX).into_bytes()).is_ok());
        let bulk_deep = format!("[{}]", nested(EVENT_DEPTH_MAX + 1));
        assert!(matches!(
            parse_bulk(&mut bulk_deep.into_bytes()),
            Err(EventError::Invalid(_))
        ));
        let frame_deep = nested(EVENT_DEPTH_MAX + 1);
        assert!(matches!(
            parse_frame(&mut frame_deep.into_bytes()),
            Err(EventError::Invalid(_))
        ));
        // Far deeper than the bound is refused the same way, without exhausting the stack.
        let very_deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            parse_frame(&mut very_deep.into_bytes()),
            Err(EventError::Invalid(_))
        ));
    }

    fn bulk_of(events: &[&str]) -> &'static mut [u8] {
        leaked(format!("[{}]", events.join(",")).as_bytes())
    }

    #[test]
    fn bulk_accepts_one_to_the_maximum() {
        let events = parse_bulk(bulk_of(&[
            r#"{"message":"a"}"#,
            r#"{"exception":{"type_name":"E"},"level":"fatal"}"#,
            REALISTIC_EVENT,
        ]))
        .unwrap();
        let fingerprints: Vec<&str> = events.iter().map(|e| e.fingerprint.as_str()).collect();
        assert_eq!(&fingerprints[..2], &["msg:a", "E:"]);
        assert_eq!(events[1].level, Level::Fatal);
        assert_eq!(events[2].environment.as_deref(), Some("production"));

        let one = [r#"{"message":"x"}"#];
        assert_eq!(parse_bulk(bulk_of(&one)).unwrap().len(), 1);
        let full = vec![r#"{"message":"x"}"#; BULK_EVENTS_MAX];
        assert_eq!(parse_bulk(bulk_of(&full)).unwrap().len(), BULK_EVENTS_MAX);
    }

    #[test]
    fn bulk_limits_and_shape() {
        let too_many = vec![r#"{"message":"x"}"#; BULK_EVENTS_MAX + 1];
        assert_eq!(
            parse_bulk(bulk_of(&too_many)).unwrap_err().to_string(),
            "invalid event: 101 events in one request, at most 100 allowed"
        );
        assert_eq!(
            parse_bulk(&mut b" [ ] ".to_vec()).unwrap_err().to_string(),
            "invalid event: empty array: at least one event required"
        );
        assert_eq!(
            parse_bulk(&mut br#"{"message":"m"}"#.to_vec()).unwrap_err(),
            EventError::Invalid("body must be a JSON array of events, got object".to_owned())
        );
        assert!(matches!(
            parse_bulk(&mut b"[{\"message\":\"m\"}".to_vec()),
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
            parse_bulk(bulk_of(&body)).unwrap_err().to_string(),
            "invalid event: index 3: message or exception required"
        );
        assert_eq!(
            parse_bulk(bulk_of(&[r#"{"message":"a"}"#, "7"]))
                .unwrap_err()
                .to_string(),
            "invalid event: index 1: event must be a JSON object, got number"
        );
        assert_eq!(
            parse_bulk(bulk_of(&[r#"{"message":"a","tags":{"x":1}}"#]))
                .unwrap_err()
                .to_string(),
            r#"invalid event: index 0: tag "x" must be a string, got number"#
        );
    }

    #[test]
    fn frame_takes_an_object_or_an_array() {
        let single = parse_frame(leaked(br#" {"message":"one"} "#)).unwrap();
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].title, "one");
        let many = parse_frame(bulk_of(&[r#"{"message":"a"}"#, r#"{"message":"b"}"#])).unwrap();
        let titles: Vec<&str> = many.iter().map(|event| event.title.as_str()).collect();
        assert_eq!(titles, ["a", "b"]);

        assert_eq!(
            parse_frame(&mut br#""text""#.to_vec()).unwrap_err(),
            EventError::Invalid(
                "frame must be an event object or an array of events, got string".to_owned()
            )
        );
        assert_eq!(
            parse_frame(&mut b"[]".to_vec()).unwrap_err(),
            EventError::Invalid("empty array: at least one event required".to_owned())
        );
        assert_eq!(
            parse_frame(&mut br#"{"level":"info"}"#.to_vec()).unwrap_err(),
            EventError::Invalid("message or exception required".to_owned())
        );
        assert_eq!(
            parse_frame(bulk_of(&[r#"{"message":"a"}"#, "{}"]))
                .unwrap_err()
                .to_string(),
            "invalid event: index 1: message or exception required"
        );
        let too_many = vec![r#"{"message":"x"}"#; BULK_EVENTS_MAX + 1];
        assert!(parse_frame(bulk_of(&too_many)).is_err());
        assert!(matches!(
            parse_frame(&mut b"{".to_vec()),
            Err(EventError::Json(_))
        ));
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
            let written = to_json(&event);
            assert!(
                written.iter().all(|byte| *byte >= 0x20),
                "raw control byte in {}",
                String::from_utf8_lossy(&written)
            );
            assert!(std::str::from_utf8(&written).is_ok());
            assert_eq!(reparse(&written), event.value, "{text:?}");
            // And the written form decodes to an event again, unchanged.
            let again = parse_event(leaked(&written)).unwrap();
            assert_eq!(to_json(&again), written);
        }
    }

    #[test]
    fn write_json_escapes_exactly() {
        let event = parse(r#"{"message":"a\"b\\c\u0001\n\t\u001f/é"}"#).unwrap();
        assert_eq!(
            String::from_utf8(to_json(&event)).unwrap(),
            r#"{"message":"a\"b\\c\u0001\n\t\u001f/é"}"#
        );
        let mut out = b"prefix ".to_vec();
        event.write_json(&mut out);
        assert!(out.starts_with(b"prefix {\"message\""), "appends");
    }

    #[test]
    fn every_truncation_of_an_event_is_refused() {
        let whole = REALISTIC_EVENT.as_bytes();
        assert!(parse_event(&mut whole.to_vec()).is_ok());
        for len in 0..whole.len() {
            let mut prefix = whole[..len].to_vec();
            assert!(parse_event(&mut prefix).is_err(), "prefix of {len} bytes");
            let mut bulk_prefix = format!("[{}", REALISTIC_EVENT).into_bytes();
            bulk_prefix.truncate(len + 1);
            assert!(parse_bulk(&mut bulk_prefix).is_err());
        }
    }

    /// Whatever is accepted must also encode to JSON that decodes to the same value.
    fn check_never_panics(body: &[u8]) {
        for parse in [parse_frame, parse_bulk] {
            if let Ok(events) = parse(&mut body.to_vec()) {
                for event in events {
                    let written = to_json(&event);
                    assert_eq!(reparse(&written), event.value);
                }
            }
        }
        if let Ok(event) = parse_event(&mut body.to_vec()) {
            let written = to_json(&event);
            assert_eq!(reparse(&written), event.value);
            assert_eq!(fingerprint(&event.value), event.fingerprint);
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
            assert_eq!(event.fingerprint, fingerprint(&event.value));
            assert_eq!(reparse(&to_json(&event)), event.value);
        }
    }
}
