//! The canonical event: what every wire decoder (`native`, `sentry`) makes of an event, and
//! all that validation and grouping read. It borrows from the parsed document: strings are the
//! document's own, and repeated parts (frames, tags, custom fingerprint elements) are read from
//! the tape when walked, so decoding allocates nothing for them.
//!
//! Also owns the types every other part of the server uses for an event: its `Level`, why one
//! is refused (`EventError`), and the owned `Summary` an accepted event leaves behind.

use std::fmt;

use simd_json::prelude::*;
use simd_json::tape::{Array, Value};

use super::document::write_json;
use super::fingerprint;

/// The wire format the event came in, which names the rule set that validates, groups and
/// titles it (PROTOCOL 4 "Grouping", 8 "Grouping a Sentry event") and the reader of its frames.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Grouping {
    Native,
    Sentry,
}

/// One event, whatever format it came in.
#[derive(Clone, Copy)]
pub struct Event<'a> {
    pub grouping: Grouping,
    /// The message as shown (native `message`; Sentry's formatted message).
    pub message: Option<&'a str>,
    /// The message before its parameters were filled in (Sentry `logentry.message`).
    pub template: Option<&'a str>,
    pub level: Level,
    /// The exception raised, when there is one.
    pub exception: Option<Exception<'a>>,
    /// Where it happened, oldest call first.
    pub frames: Frames<'a>,
    /// The custom grouping key given, when non-empty.
    pub fingerprint: Option<CustomFingerprint<'a>>,
    /// `environment` as sent (see `Event::environment`).
    pub environment: Option<&'a str>,
    pub release: Option<&'a str>,
    pub tags: Tags<'a>,
    /// When it happened, in microseconds since the Unix epoch; `None`: the receive time.
    pub timestamp_us: Option<i64>,
    /// The event's JSON.
    pub raw: Raw<'a>,
}

/// An exception's fields; a decoder may leave any of them out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Exception<'a> {
    pub type_name: Option<&'a str>,
    pub value: Option<&'a str>,
    pub module: Option<&'a str>,
}

/// A stack frame's fields that grouping may read.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Frame<'a> {
    pub filename: Option<&'a str>,
    pub module: Option<&'a str>,
    pub function: Option<&'a str>,
    pub in_app: bool,
}

/// A list of frames as it lies in the document, each read into a `Frame` by the frame reader
/// of the decoder named by `format` (the wire formats name a frame's fields differently). The
/// reader is called directly, not through a pointer, so that it is inlined into grouping.
#[derive(Clone, Copy)]
pub struct Frames<'a> {
    frames: Option<Array<'a, 'a>>,
    format: Grouping,
}

impl<'a> Frames<'a> {
    /// The elements of `frames` (anything but an array counts as none), in `format`.
    pub fn new(frames: Option<Value<'a, 'a>>, format: Grouping) -> Frames<'a> {
        Frames {
            frames: frames.and_then(|frames| frames.as_array()),
            format,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_none_or(|frames| frames.is_empty())
    }

    pub fn len(&self) -> usize {
        self.frames.map_or(0, |frames| frames.len())
    }

    pub fn iter(&self) -> FramesIter<'a> {
        FramesIter {
            frames: self.frames.map(|frames| frames.iter()),
            format: self.format,
        }
    }
}

/// The frames of a `Frames`, each read as it is reached.
pub struct FramesIter<'a> {
    frames: Option<simd_json::tape::array::Iter<'a, 'a>>,
    format: Grouping,
}

impl<'a> Iterator for FramesIter<'a> {
    type Item = Frame<'a>;

    #[inline(always)]
    fn next(&mut self) -> Option<Frame<'a>> {
        let frame = self.frames.as_mut()?.next()?;
        Some(match self.format {
            Grouping::Native => super::native::read_frame(frame),
            Grouping::Sentry => super::sentry::event::read_frame(frame),
        })
    }
}

/// A custom grouping key: a non-empty string, or a non-empty array whose elements are joined.
#[derive(Clone, Copy)]
pub struct CustomFingerprint<'a>(Value<'a, 'a>);

impl<'a> CustomFingerprint<'a> {
    /// `fingerprint` when it is a non-empty string or array.
    pub fn of(value: Value<'a, 'a>) -> Option<CustomFingerprint<'a>> {
        let given = match value.as_array() {
            Some(parts) => !parts.is_empty(),
            None => value.as_str().is_some_and(|key| !key.is_empty()),
        };
        given.then_some(CustomFingerprint(value))
    }

    /// The elements (a lone string is one); an element that is not a string reads as empty.
    pub fn parts(&self) -> impl Iterator<Item = &'a str> {
        let lone = self.0.into_string();
        let parts = self.0.as_array().into_iter().flat_map(|parts| parts.iter());
        lone.into_iter()
            .chain(parts.map(|part| part.into_string().unwrap_or("")))
    }
}

/// Tags as they lie in the document: an object of strings, or a list of `[key, value]` pairs.
#[derive(Clone, Copy, Default)]
pub struct Tags<'a>(Option<Value<'a, 'a>>);

impl<'a> Tags<'a> {
    pub fn new(tags: Option<Value<'a, 'a>>) -> Tags<'a> {
        Tags(tags)
    }

    /// The last tag of this name, when it is a string.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let tags = self.0?;
        if tags.is_object() {
            return super::document::last_field(tags, key).and_then(|value| value.into_string());
        }
        tags.as_array()?
            .iter()
            .filter_map(|pair| {
                let pair = pair.as_array()?;
                if pair.len() == 2 && pair.get(0)?.as_str()? == key {
                    pair.get(1)
                } else {
                    None
                }
            })
            .last()
            .and_then(|value| value.into_string())
    }
}

/// An event's JSON: bytes as sent, or a parsed value to be written anew.
#[derive(Clone, Copy)]
pub enum Raw<'a> {
    Sent(&'a [u8]),
    Parsed(Value<'a, 'a>),
}

impl Raw<'_> {
    /// The JSON as text.
    pub fn to_json(&self) -> String {
        match self {
            Raw::Sent(bytes) => String::from_utf8(bytes.to_vec()).expect("checked UTF-8"),
            Raw::Parsed(value) => {
                let mut json = Vec::with_capacity(512);
                write_json(*value, &mut json);
                String::from_utf8(json).expect("JSON is written from strings")
            }
        }
    }
}

impl<'a> Event<'a> {
    /// `environment`, else the `environment` tag; an empty string counts as absent.
    pub fn environment(&self) -> Option<&'a str> {
        let non_empty = |name: &&str| !name.is_empty();
        self.environment
            .filter(non_empty)
            .or_else(|| self.tags.get("environment").filter(non_empty))
    }

    /// What the server keeps of an accepted event: grouping key and title made by the event's
    /// rule set, and its fields owned.
    pub fn summary(&self) -> Summary {
        let (fingerprint, title) = fingerprint::group(self);
        Summary {
            level: self.level,
            environment: self.environment().map(str::to_owned),
            release: self.release.map(str::to_owned),
            timestamp_us: self.timestamp_us,
            fingerprint,
            title,
        }
    }
}

/// What an accepted event leaves once its document is gone.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub level: Level,
    pub environment: Option<String>,
    pub release: Option<String>,
    pub timestamp_us: Option<i64>,
    /// The grouping key (see `fingerprint`).
    pub fingerprint: String,
    /// The issue title (see `fingerprint::group`).
    pub title: String,
}

/// Severity of an event; also the severity of the issue it opens.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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

/// Longest issue title kept, in bytes: a title is held in memory for the life of its issue and
/// sent in every issue listing, and a client may send a megabyte of message.
pub const TITLE_BYTES_MAX: usize = 1024;

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn cut_at_char_boundary(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
