//! Sentry envelopes (PROTOCOL 8): a header line, then items, each a header line and a payload
//! of `length` bytes or, without `length`, the rest of its line.
//!
//! Parsing borrows the body: items are slices of it, so an envelope costs one small vector of
//! items and no copy of any payload. Headers are tiny JSON objects read with serde_json, which
//! reads borrowed bytes as they are (simd-json would need a mutable copy of each).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use uuid::Uuid;

/// Largest decoded envelope (PROTOCOL 8); the body decoder stops at it (413).
pub const ENVELOPE_BYTES_MAX: usize = 20 * 1024 * 1024;
/// Largest payload of one item (PROTOCOL 8); a larger one refuses the envelope (413), as
/// Sentry does, rather than silently dropping that item.
pub const ITEM_BYTES_MAX: usize = 1024 * 1024;
/// Largest decoded `store` body: one event, like an item.
pub const STORE_BYTES_MAX: usize = ITEM_BYTES_MAX;
/// Most items one envelope may hold. SDKs send a handful; the bound keeps the item list of a
/// 20 MiB envelope of empty items from reaching millions of entries.
pub const ENVELOPE_ITEMS_MAX: usize = 1000;

/// A parsed envelope, borrowing the decoded body.
#[derive(Debug, PartialEq)]
pub struct Envelope<'a> {
    /// The header's `dsn`, which may carry the project key.
    pub dsn: Option<Cow<'a, str>>,
    /// The header's `event_id`.
    pub event_id: Option<Uuid>,
    pub items: Vec<Item<'a>>,
}

/// One item: its `type` and its payload as sent.
#[derive(Debug, PartialEq)]
pub struct Item<'a> {
    pub item_type: Cow<'a, str>,
    pub payload: &'a [u8],
}

impl Item<'_> {
    pub fn is_event(&self) -> bool {
        self.item_type == "event"
    }
}

impl<'a> Envelope<'a> {
    /// The items of type `event`, in order.
    pub fn events(&self) -> impl Iterator<Item = &Item<'a>> {
        self.items.iter().filter(|item| item.is_event())
    }
}

/// Why an envelope was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum EnvelopeError {
    /// 400 `{"error":"invalid envelope: ..."}`.
    Malformed(String),
    /// 413: an item's payload is over `ITEM_BYTES_MAX`, or there are too many items.
    TooLarge(String),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::Malformed(detail) => write!(f, "invalid envelope: {detail}"),
            EnvelopeError::TooLarge(detail) => write!(f, "payload too large: {detail}"),
        }
    }
}

impl std::error::Error for EnvelopeError {}

#[derive(Deserialize)]
struct EnvelopeHeader<'a> {
    #[serde(borrow, default)]
    dsn: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    // Every other field (sdk, sent_at, trace...) is skipped without being built.
}

#[derive(Deserialize)]
struct ItemHeader<'a> {
    #[serde(rename = "type", borrow)]
    item_type: Option<Cow<'a, str>>,
    #[serde(default)]
    length: Option<u64>,
}

/// Parses a decoded envelope body. Blank lines before an item header are skipped and the last
/// newline is optional, as with Sentry's own ingestion.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let (header_line, mut rest) = split_line(body);
    let header: EnvelopeHeader = parse_header(header_line, "envelope header")?;
    let event_id = match header.event_id.as_deref() {
        None => None,
        Some(text) => Some(parse_event_id(text).ok_or_else(|| {
            malformed(format!(
                "envelope header event_id {text:?} is not a UUID (32 hex digits)"
            ))
        })?),
    };

    let mut items = Vec::new();
    loop {
        rest = skip_blank_lines(rest);
        if rest.is_empty() {
            break;
        }
        let index = items.len();
        if index == ENVELOPE_ITEMS_MAX {
            return Err(EnvelopeError::TooLarge(format!(
                "more than {ENVELOPE_ITEMS_MAX} items in one envelope"
            )));
        }
        let (header_line, after_header) = split_line(rest);
        let header: ItemHeader = parse_header(header_line, &format!("item {index} header"))?;
        let item_type = header
            .item_type
            .ok_or_else(|| malformed(format!("item {index} header has no type")))?;
        let (payload, after_payload) = match header.length {
            Some(length) => {
                if length > ITEM_BYTES_MAX as u64 {
                    return Err(item_too_large(index, length));
                }
                let length = length as usize;
                if length > after_header.len() {
                    return Err(malformed(format!(
                        "item {index} length {length} goes beyond the end of the body ({} bytes left)",
                        after_header.len()
                    )));
                }
                let (payload, after) = after_header.split_at(length);
                match after {
                    [] => (payload, after),
                    [b'\n', after @ ..] => (payload, after),
                    _ => {
                        return Err(malformed(format!(
                            "item {index} payload is not followed by a newline after its {length} bytes"
                        )))
                    }
                }
            }
            None => {
                let (payload, after) = split_line(after_header);
                if payload.len() > ITEM_BYTES_MAX {
                    return Err(item_too_large(index, payload.len() as u64));
                }
                (payload, after)
            }
        };
        items.push(Item { item_type, payload });
        rest = after_payload;
    }

    Ok(Envelope {
        dsn: header.dsn,
        event_id,
        items,
    })
}

/// An event id as Sentry sends it: 32 hex digits, with or without the dashes of the UUID form.
pub fn parse_event_id(text: &str) -> Option<Uuid> {
    match text.len() {
        32 | 36 => Uuid::try_parse(text).ok(),
        _ => None,
    }
}

/// The parts of a DSN (`SCHEME://KEY[:SECRET]@HOST[:PORT]/[PATH/]NUMBER`) that name a project.
#[derive(Debug, PartialEq, Eq)]
pub struct DsnKey<'a> {
    pub public_key: &'a str,
    pub project_number: u64,
}

/// The public key and project number of a DSN; `None` when it is not one.
pub fn parse_dsn(dsn: &str) -> Option<DsnKey<'_>> {
    let (_scheme, rest) = dsn.split_once("://")?;
    let (user, location) = rest.split_once('@')?;
    let public_key = user.split(':').next()?;
    // Everything after the host; the number is the last path segment, a trailing slash allowed.
    let (_host, path) = location.split_once('/')?;
    let path = path.split(['?', '#']).next()?;
    let number = path.trim_end_matches('/').rsplit('/').next()?;
    let project_number = number.parse().ok().filter(|number| *number > 0)?;
    if public_key.is_empty() || !number.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(DsnKey {
        public_key,
        project_number,
    })
}

/// The line at the start of `bytes` (without its `\n`) and what follows it.
fn split_line(bytes: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b'\n', bytes) {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[]),
    }
}

fn skip_blank_lines(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b'\r' | b'\n', rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

fn parse_header<'a, T: Deserialize<'a>>(line: &'a [u8], what: &str) -> Result<T, EnvelopeError> {
    let trimmed = line.trim_ascii();
    if trimmed.first() != Some(&b'{') {
        return Err(malformed(format!("{what} is not a JSON object")));
    }
    serde_json::from_slice(trimmed).map_err(|error| malformed(format!("{what}: {error}")))
}

fn malformed(detail: String) -> EnvelopeError {
    EnvelopeError::Malformed(detail)
}

fn item_too_large(index: usize, length: u64) -> EnvelopeError {
    EnvelopeError::TooLarge(format!(
        "item {index} has {length} bytes, at most {ITEM_BYTES_MAX} allowed"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(envelope: &Envelope<'_>) -> Vec<(String, String)> {
        envelope
            .items
            .iter()
            .map(|item| {
                (
                    item.item_type.to_string(),
                    String::from_utf8_lossy(item.payload).into_owned(),
                )
            })
            .collect()
    }

    fn refused(body: &[u8]) -> String {
        parse_envelope(body).unwrap_err().to_string()
    }

    /// What sentry-python 2.x sends for an error: an event item with a length, then more.
    const PYTHON_ENVELOPE: &str = concat!(
        r#"{"event_id":"9ec79c33ec9942ab8353589fcb2e04dc","sent_at":"2024-05-06T07:08:09.123456Z","dsn":"http://0a1b2c3d4e5f@127.0.0.1:8080/7","trace":{"trace_id":"771a43a4192642f0b136d5159a501700","environment":"production","public_key":"0a1b2c3d4e5f"}}"#,
        "\n",
        r#"{"type":"event","content_type":"application/json","length":20}"#,
        "\n",
        r#"{"message":"hello"} "#,
        "\n",
        r#"{"type":"client_report"}"#,
        "\n",
        r#"{"timestamp":1715000000.5,"discarded_events":[]}"#,
        "\n",
    );

    #[test]
    fn a_python_envelope_with_lengths_and_without() {
        let envelope = parse_envelope(PYTHON_ENVELOPE.as_bytes()).unwrap();
        assert_eq!(
            envelope.dsn.as_deref(),
            Some("http://0a1b2c3d4e5f@127.0.0.1:8080/7")
        );
        assert_eq!(
            envelope.event_id,
            Some(Uuid::parse_str("9ec79c33-ec99-42ab-8353-589fcb2e04dc").unwrap())
        );
        assert_eq!(
            items(&envelope),
            [
                ("event".into(), r#"{"message":"hello"} "#.into()),
                (
                    "client_report".into(),
                    r#"{"timestamp":1715000000.5,"discarded_events":[]}"#.into()
                )
            ]
        );
        assert_eq!(envelope.events().count(), 1);
        assert_eq!(envelope.items[1].item_type, "client_report");
    }

    #[test]
    fn the_last_newline_is_optional() {
        let without = PYTHON_ENVELOPE.trim_end_matches('\n');
        assert_eq!(
            parse_envelope(without.as_bytes()).unwrap(),
            parse_envelope(PYTHON_ENVELOPE.as_bytes()).unwrap()
        );
        let with_length_at_end = b"{}\n{\"type\":\"event\",\"length\":2}\n{}";
        assert_eq!(
            items(&parse_envelope(with_length_at_end).unwrap()),
            [("event".into(), "{}".into())]
        );
    }

    #[test]
    fn headers_may_be_empty_and_items_absent() {
        for body in ["{}", "{}\n", " {} \n\n", "{}\r\n"] {
            let envelope = parse_envelope(body.as_bytes()).unwrap();
            assert_eq!(envelope.dsn, None);
            assert_eq!(envelope.event_id, None);
            assert!(envelope.items.is_empty(), "{body:?}");
        }
    }

    #[test]
    fn blank_lines_between_items_are_skipped() {
        let body =
            b"{}\n\n{\"type\":\"session\"}\n{\"a\":1}\n\n\r\n{\"type\":\"event\",\"length\":0}\n\n";
        assert_eq!(
            items(&parse_envelope(body).unwrap()),
            [
                ("session".into(), "{\"a\":1}".into()),
                ("event".into(), "".into())
            ]
        );
    }

    #[test]
    fn payloads_with_length_may_hold_newlines_and_any_bytes() {
        let mut body =
            b"{}\n{\"type\":\"attachment\",\"length\":5,\"filename\":\"a.bin\"}\n".to_vec();
        body.extend_from_slice(&[b'\n', 0, 0xff, b'\n', b'x']);
        body.extend_from_slice(b"\n{\"type\":\"event\"}\n{}\n");
        let envelope = parse_envelope(&body).unwrap();
        assert_eq!(envelope.items[0].payload, [b'\n', 0, 0xff, b'\n', b'x']);
        assert_eq!(envelope.items[1].payload, b"{}");
    }

    #[test]
    fn item_without_length_and_empty_payload() {
        let envelope = parse_envelope(b"{}\n{\"type\":\"event\"}\n").unwrap();
        assert_eq!(items(&envelope), [("event".into(), "".into())]);
        let envelope = parse_envelope(b"{}\n{\"type\":\"event\"}").unwrap();
        assert_eq!(items(&envelope), [("event".into(), "".into())]);
    }

    #[test]
    fn unknown_item_types_are_returned() {
        let envelope =
            parse_envelope(b"{}\n{\"type\":\"hologram\",\"length\":2}\nhi\n{\"type\":\"log\"}\n[]")
                .unwrap();
        assert_eq!(envelope.items[0].item_type, "hologram");
        assert_eq!(envelope.items[1].item_type, "log");
        assert_eq!(envelope.events().count(), 0);
    }

    #[test]
    fn escaped_strings_in_headers_are_read() {
        let envelope =
            parse_envelope(b"{\"dsn\":\"http://k\\u0065y@h/3\"}\n{\"type\":\"ev\\u0065nt\"}\n{}")
                .unwrap();
        assert_eq!(envelope.dsn.as_deref(), Some("http://key@h/3"));
        assert!(envelope.items[0].is_event());
    }

    #[test]
    fn malformed_envelopes_say_why() {
        assert_eq!(
            refused(b""),
            "invalid envelope: envelope header is not a JSON object"
        );
        assert_eq!(
            refused(b"[]\n"),
            "invalid envelope: envelope header is not a JSON object"
        );
        assert!(refused(b"{\"dsn\":1}\n").starts_with("invalid envelope: envelope header: "));
        assert!(refused(b"{\n}\n").starts_with("invalid envelope: envelope header: "));
        assert_eq!(
            refused(b"{\"event_id\":\"nope\"}\n"),
            "invalid envelope: envelope header event_id \"nope\" is not a UUID (32 hex digits)"
        );
        assert_eq!(
            refused(b"{}\n{\"length\":2}\n{}\n"),
            "invalid envelope: item 0 header has no type"
        );
        assert_eq!(
            refused(b"{}\n{\"type\":\"event\"}\n{}\nnot json\n"),
            "invalid envelope: item 1 header is not a JSON object"
        );
        assert_eq!(
            refused(b"{}\n{\"type\":\"event\",\"length\":10}\n{}\n"),
            "invalid envelope: item 0 length 10 goes beyond the end of the body (3 bytes left)"
        );
        assert_eq!(
            refused(b"{}\n{\"type\":\"event\",\"length\":1}\n{}\n"),
            "invalid envelope: item 0 payload is not followed by a newline after its 1 bytes"
        );
        assert!(refused(b"{}\n{\"type\":\"event\",\"length\":-1}\n{}\n")
            .starts_with("invalid envelope: item 0 header: "));
        assert!(refused(b"{}\n{\"type\":7}\n{}\n").starts_with("invalid envelope: item 0 header: "));
        assert!(refused(b"{}\n{\"type\":\"event\"} x\n{}\n")
            .starts_with("invalid envelope: item 0 header: "));
    }

    #[test]
    fn item_size_is_bounded() {
        let declared = format!(
            "{{}}\n{{\"type\":\"attachment\",\"length\":{}}}\n",
            ITEM_BYTES_MAX + 1
        );
        assert_eq!(
            parse_envelope(declared.as_bytes()),
            Err(EnvelopeError::TooLarge(format!(
                "item 0 has {} bytes, at most {ITEM_BYTES_MAX} allowed",
                ITEM_BYTES_MAX + 1
            )))
        );
        let mut line = b"{}\n{\"type\":\"event\"}\n".to_vec();
        line.resize(line.len() + ITEM_BYTES_MAX + 1, b'x');
        assert!(matches!(
            parse_envelope(&line),
            Err(EnvelopeError::TooLarge(_))
        ));
        line.pop();
        assert_eq!(
            parse_envelope(&line).unwrap().items[0].payload.len(),
            ITEM_BYTES_MAX
        );
        let many = format!(
            "{{}}\n{}",
            "{\"type\":\"log\",\"length\":0}\n\n".repeat(ENVELOPE_ITEMS_MAX + 1)
        );
        assert!(matches!(
            parse_envelope(many.as_bytes()),
            Err(EnvelopeError::TooLarge(_))
        ));
    }

    #[test]
    fn every_truncation_is_parsed_or_refused_without_panic() {
        let body = PYTHON_ENVELOPE.as_bytes();
        for len in 0..body.len() {
            let _ = parse_envelope(&body[..len]);
        }
        let mut random = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5_000 {
            let mut mutated = body.to_vec();
            for _ in 0..3 {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                let at = (random % mutated.len() as u64) as usize;
                mutated[at] = (random >> 32) as u8;
            }
            if let Ok(envelope) = parse_envelope(&mutated) {
                for item in envelope.items {
                    assert!(item.payload.len() <= mutated.len());
                }
            }
        }
    }

    #[test]
    fn event_ids_with_or_without_dashes() {
        let uuid = Uuid::parse_str("9ec79c33-ec99-42ab-8353-589fcb2e04dc").unwrap();
        assert_eq!(
            parse_event_id("9ec79c33ec9942ab8353589fcb2e04dc"),
            Some(uuid)
        );
        assert_eq!(
            parse_event_id("9EC79C33-EC99-42AB-8353-589FCB2E04DC"),
            Some(uuid)
        );
        assert_eq!(
            parse_event_id("{9ec79c33-ec99-42ab-8353-589fcb2e04dc}"),
            None
        );
        assert_eq!(parse_event_id("9ec79c33ec9942ab8353589fcb2e04d"), None);
        assert_eq!(parse_event_id("9ec79c33ec9942ab8353589fcb2e04dg"), None);
    }

    #[test]
    fn dsn_public_key_and_number() {
        let key = |dsn| parse_dsn(dsn).map(|key| (key.public_key, key.project_number));
        assert_eq!(key("http://abc123@localhost:8080/42"), Some(("abc123", 42)));
        assert_eq!(
            key("https://abc@o1.ingest.example.com/7/"),
            Some(("abc", 7))
        );
        assert_eq!(key("https://abc:secret@host/sub/path/9"), Some(("abc", 9)));
        assert_eq!(key("http://abc@host/9?x=1"), Some(("abc", 9)));
        assert_eq!(key("http://abc@host"), None);
        assert_eq!(key("http://abc@host/"), None);
        assert_eq!(key("http://abc@host/x"), None);
        assert_eq!(key("http://abc@host/0"), None);
        assert_eq!(key("http://abc@host/+5"), None);
        assert_eq!(key("http://@host/5"), None);
        assert_eq!(key("http://host/5"), None);
        assert_eq!(key("abc@host/5"), None);
    }
}
