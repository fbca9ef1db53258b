//! Parsing a body with simd-json into its tape, shared by every wire decoder: the document
//! (parsed in place on a per-thread copy, with per-thread working buffers), the refused-body
//! diagnosis and big-number retry (`diagnose`), and small readers of tape values (the last
//! field of a name, JSON type names, `null` as absent, timestamps, compact JSON writing).
//!
//! Nothing here knows a wire format's field names: that is each decoder's business.

use std::ops::Range;

use simd_json::prelude::*;
use simd_json::tape::Value;
use simd_json::{Buffers, ErrorType, Tape, ValueType};

use super::diagnose::{diagnose, widen_numbers};
use super::event::EventError;

/// Deepest nesting of objects and arrays inside one event, the event object being level 1.
/// Real events stay far below it; the bound keeps every recursive walk of the value (drop,
/// encoding, consumers' JSON decoders, which commonly stop at 128) within a small stack.
/// Deeper input is rejected as an invalid event.
pub const EVENT_DEPTH_MAX: usize = 64;

/// Earliest accepted `timestamp`, 0000-01-01T00:00:00Z: RFC 3339 has four-digit years, so every
/// accepted time can be written back as RFC 3339.
pub(crate) const TIMESTAMP_MIN_S: i64 = -62_167_219_200;
/// Latest accepted `timestamp`, 9999-12-31T23:59:59Z, for the same reason.
pub(crate) const TIMESTAMP_MAX_S: i64 = 253_402_300_799;
pub(crate) const MICROS_PER_SECOND: i64 = 1_000_000;

/// Appends a parsed value as compact JSON. Every string is escaped as JSON requires, so the
/// output is valid JSON whatever the value contains.
pub fn write_json(value: Value<'_, '_>, out: &mut Vec<u8>) {
    let written = Writable::write(&value, out);
    // Writing into a Vec cannot fail.
    debug_assert!(written.is_ok());
}

/// The last field of this name in an object (see `Fields`); `None` for anything else.
pub fn last_field<'t, 'a>(object: Value<'t, 'a>, name: &str) -> Option<Value<'t, 'a>> {
    object
        .as_object()?
        .iter()
        .filter(|(key, _)| *key == name)
        .last()
        .map(|(_, value)| value)
}

/// Inputs up to this size parse with working buffers kept per thread; a larger one (a bulk body
/// of megabytes) gets its own, so no thread holds on to megabytes of them.
pub(crate) const REUSED_BUFFERS_INPUT_BYTES_MAX: usize = 64 * 1024;

thread_local! {
    /// simd-json's working buffers by depth limit, reused across parses on this thread: each
    /// parse would otherwise allocate three buffers the size of its input.
    static BUFFERS: std::cell::RefCell<Vec<(usize, Buffers)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tape vectors of at most this many nodes are kept per thread for the next parse.
const REUSED_TAPE_NODES_MAX: usize = 16 * 1024;

thread_local! {
    /// The last parse's tape, empty, so that a parse on this thread grows no fresh one.
    static TAPE: std::cell::Cell<Option<Tape<'static>>> = const { std::cell::Cell::new(None) };
}

thread_local! {
    /// simd-json parses in place, so it works on a copy, kept per thread so that a body costs
    /// no allocation for it (up to the size simd-json's own buffers are kept for); the body
    /// itself stays as sent.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Parses a copy of `bytes` (kept per thread, like `with_document`'s) and hands the document to
/// `read`; a body simd-json refuses is refused as it says, without a second look.
pub(crate) fn with_copy<T>(
    bytes: &[u8],
    depth_max: usize,
    read: impl FnOnce(&Document<'_>) -> Result<T, EventError>,
) -> Result<T, EventError> {
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        scratch.extend_from_slice(bytes);
        let result = Document::parse(scratch, depth_max).and_then(|document| read(&document));
        if scratch.capacity() > REUSED_BUFFERS_INPUT_BYTES_MAX {
            *scratch = Vec::new();
        }
        result
    })
}

/// Parses a copy of `body` and hands the document to `read`, with the byte ranges of the
/// top-level array's elements when the document is not the body's exact parse.
///
/// A body simd-json refuses is scanned again to say clearly what is wrong and where. If it is
/// valid JSON after all, what simd-json refused are numbers beyond 64-bit integers or `f64`
/// (`2^64`, `1e999`, 400 digits): the client's data, accepted. They are stood in for by numbers
/// simd-json reads (the same sign, as far out of range), while the event keeps their text as
/// sent: a single event's JSON is the body itself, and each array element's is its bytes as sent
/// rather than written anew.
pub(crate) fn with_document<T>(
    body: &[u8],
    depth_max: usize,
    read: impl FnOnce(&Document<'_>, Option<&[Range<usize>]>) -> Result<T, EventError>,
) -> Result<T, EventError> {
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        scratch.extend_from_slice(body);
        let mut read = Some(read);
        let mut read_document = |document: &Document<'_>, elements: Option<&[Range<usize>]>| {
            let read = read.take().expect("one document is read");
            read(document, elements)
        };
        let first = match Document::fill(scratch, depth_max) {
            Ok(document) => Ok(read_document(&document, None)),
            Err(error) => Err(error),
        };
        let result = match first {
            Ok(result) => result,
            Err(error) if *error.error() == ErrorType::DepthLimitExceeded => Err(too_deep()),
            Err(error) => match diagnose(body) {
                Err(problem) => Err(EventError::Json(problem)),
                Ok(diagnosis) if diagnosis.wide_numbers.is_empty() => {
                    Err(EventError::Json(describe(&error)))
                }
                Ok(diagnosis) => {
                    scratch.clear();
                    scratch.extend_from_slice(body);
                    widen_numbers(scratch, &diagnosis.wide_numbers);
                    match Document::fill(scratch, depth_max) {
                        Ok(document) => read_document(&document, Some(&diagnosis.elements)),
                        Err(error) => Err(plain_error(&error)),
                    }
                }
            },
        };
        if scratch.capacity() > REUSED_BUFFERS_INPUT_BYTES_MAX {
            *scratch = Vec::new();
        }
        result
    })
}

fn too_deep() -> EventError {
    EventError::Invalid(format!(
        "nested deeper than {EVENT_DEPTH_MAX} levels of objects and arrays"
    ))
}

/// A simd-json error as the detail of an answer, for input the scanner had nothing against.
fn plain_error(error: &simd_json::Error) -> EventError {
    match error.error() {
        ErrorType::DepthLimitExceeded => too_deep(),
        _ => EventError::Json(describe(error)),
    }
}

fn describe(error: &simd_json::Error) -> String {
    match error.error() {
        ErrorType::InvalidNumber | ErrorType::InvalidExponent => {
            format!("unreadable number near byte {}", error.index())
        }
        other => format!("{other:?} near byte {}", error.index()),
    }
}

/// A body parsed with simd-json: the tape of its values in document order, whose strings borrow
/// the body's bytes (unescaped in place). Nothing is allocated per value.
pub struct Document<'a> {
    tape: Tape<'a>,
}

impl<'a> Document<'a> {
    /// Parses `body` in place with objects and arrays nested at most `depth_max` deep. The body
    /// gains simd-json's padding at its end, which saves the parser a padded copy of it.
    pub fn parse(body: &'a mut Vec<u8>, depth_max: usize) -> Result<Document<'a>, EventError> {
        match Document::fill(body, depth_max) {
            Ok(document) => Ok(document),
            Err(error) => Err(plain_error(&error)),
        }
    }

    fn fill(body: &'a mut Vec<u8>, depth_max: usize) -> Result<Document<'a>, simd_json::Error> {
        let len = body.len();
        body.resize(len + simd_json::INPUT_PADDING, b' ');
        let mut tape = TAPE.take().map_or_else(|| Tape(Vec::new()), Tape::reset);
        let parsed = with_buffers(len, depth_max, |buffers| {
            simd_json::fill_tape_padded(body, len, buffers, &mut tape)
        });
        let document = Document { tape };
        parsed.map(|()| document)
    }

    /// The document's top-level value.
    pub fn root(&self) -> Value<'_, 'a> {
        self.tape.as_value()
    }
}

impl Drop for Document<'_> {
    fn drop(&mut self) {
        let tape = std::mem::replace(&mut self.tape, Tape(Vec::new()));
        if tape.0.capacity() <= REUSED_TAPE_NODES_MAX {
            TAPE.set(Some(tape.reset()));
        }
    }
}

/// Runs `parse` with simd-json working buffers for this depth limit: kept per thread up to
/// `REUSED_BUFFERS_INPUT_BYTES_MAX` of input, made for the occasion beyond.
fn with_buffers<T>(len: usize, depth_max: usize, parse: impl FnOnce(&mut Buffers) -> T) -> T {
    if len > REUSED_BUFFERS_INPUT_BYTES_MAX {
        return parse(&mut Buffers::with_max_depth(len, depth_max));
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
        parse(&mut kept[index].1)
    })
}

/// The value unless it is missing or `null`.
pub(crate) fn present<'t, 'a>(value: Option<Value<'t, 'a>>) -> Option<Value<'t, 'a>> {
    value.filter(|value| !value.is_null())
}

/// `timestamp` as RFC 3339 text or Unix seconds (integer or fraction), in microseconds.
pub(crate) fn timestamp_us(value: Value<'_, '_>) -> Result<i64, String> {
    if let Some(text) = value.as_str() {
        let time =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map_err(|error| format!("timestamp {text:?} is not RFC 3339: {error}"))?;
        let micros = time.unix_timestamp_nanos().div_euclid(1_000);
        return i64::try_from(micros).map_err(|_| timestamp_out_of_range());
    }
    if let Some(seconds) = value.as_i64() {
        if !(TIMESTAMP_MIN_S..=TIMESTAMP_MAX_S).contains(&seconds) {
            return Err(timestamp_out_of_range());
        }
        return Ok(seconds * MICROS_PER_SECOND);
    }
    match value.cast_f64() {
        Some(seconds) => seconds_us(seconds),
        None => Err(format!(
            "timestamp must be an RFC 3339 string or Unix seconds, got {}",
            json_type(value)
        )),
    }
}

/// Fractional Unix seconds in microseconds.
pub(crate) fn seconds_us(seconds: f64) -> Result<i64, String> {
    if !seconds.is_finite() {
        return Err("timestamp must be a finite number".to_owned());
    }
    if !(TIMESTAMP_MIN_S as f64..=TIMESTAMP_MAX_S as f64).contains(&seconds) {
        return Err(timestamp_out_of_range());
    }
    // In range, so the product fits an i64 with room to spare.
    Ok((seconds * MICROS_PER_SECOND as f64).round() as i64)
}

fn timestamp_out_of_range() -> String {
    "timestamp out of range (years 0000 to 9999)".to_owned()
}

pub(crate) fn json_type(value: Value<'_, '_>) -> &'static str {
    match value.value_type() {
        ValueType::Null => "null",
        ValueType::Bool => "boolean",
        ValueType::String => "string",
        ValueType::Array => "array",
        ValueType::Object => "object",
        _ => "number",
    }
}
