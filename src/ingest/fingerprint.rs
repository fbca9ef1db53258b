//! Grouping key and title of a canonical event: events with the same key in a project belong
//! to one issue. Two rule sets, chosen by the event's `grouping`: PROTOCOL 4 "Grouping" for
//! native events, PROTOCOL 8 "Grouping a Sentry event" for Sentry events. Both share the
//! custom-key rule, the frame and exception parts and the normalisation.
//!
//! The rules read the canonical fields only, and never fail: what is missing counts as empty.

use sha2::{Digest, Sha256};

use super::event::{
    cut_at_char_boundary, CustomFingerprint, Event, Exception, Grouping, TITLE_BYTES_MAX,
};

/// Separates the parts of an array `fingerprint`.
const CUSTOM_PART_SEPARATOR: char = '\n';
/// Separates the file (or module) from the function inside one stack frame.
const FRAME_FIELD_SEPARATOR: char = '|';
/// Separates consecutive stack frames (and, for Sentry, the exception type from the frames).
const FRAME_SEPARATOR: char = ';';
/// Prefix of the message-only key (rule 4), fixed by the protocol and shared by both rule sets
/// so that the same message groups the same whichever way it came.
const MESSAGE_KEY_PREFIX: &str = "msg:";
/// The title of an event with nothing to name it by.
const UNTITLED: &str = "Untitled";
/// Longest Sentry title, in characters: a title names an issue in a list, and exception
/// values can be whole documents.
pub const SENTRY_TITLE_CHARS_MAX: usize = 200;

/// What the server keeps of a grouping key, in memory and in storage: the first 16 bytes of its
/// SHA-256. Keys come from clients and may be a megabyte long; 128 bits keep an accidental
/// collision out of reach for any number of issues a server can hold.
pub type FingerprintHash = [u8; 16];

pub fn hash(key: &str) -> FingerprintHash {
    let digest = Sha256::digest(key.as_bytes());
    let mut hash = [0; 16];
    hash.copy_from_slice(&digest[..16]);
    hash
}

/// Lowercase, remove every `0x`, trim: memory addresses and case then stop splitting issues.
///
/// `0x` is removed after lowercasing (so `0X` goes too), in one left-to-right pass like
/// `str::replace`, and the result is trimmed last.
pub fn normalise(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_normalised(&mut out, s);
    out
}

/// The grouping key and the title of an event, by its rule set.
pub fn group(event: &Event<'_>) -> (String, String) {
    let title = match event.grouping {
        Grouping::Native => native_title(event),
        Grouping::Sentry => sentry_title(event),
    };
    (key(event), title)
}

/// The grouping key, by the first rule that applies:
/// 1. a custom `fingerprint`: its elements joined with `\n`; for Sentry events each
///    `{{ default }}` element is replaced by the key the following rules give;
///
/// Otherwise rules 2-4 of the event's rule set: `native_key` or `sentry_key`.
pub fn key(event: &Event<'_>) -> String {
    match event.fingerprint {
        Some(custom) => custom_key(custom, event),
        None => default_key(event),
    }
}

fn default_key(event: &Event<'_>) -> String {
    match event.grouping {
        Grouping::Native => native_key(event),
        Grouping::Sentry => sentry_key(event),
    }
}

fn custom_key(custom: CustomFingerprint<'_>, event: &Event<'_>) -> String {
    let placeholders = event.grouping == Grouping::Sentry;
    let mut key = String::new();
    for (index, part) in custom.parts().enumerate() {
        if index > 0 {
            key.push(CUSTOM_PART_SEPARATOR);
        }
        if placeholders && is_default_placeholder(part) {
            key.push_str(&default_key(event));
        } else {
            key.push_str(part);
        }
    }
    key
}

/// `{{ default }}`, spaces inside the braces optional, as Sentry matches it.
fn is_default_placeholder(part: &str) -> bool {
    part.trim()
        .strip_prefix("{{")
        .and_then(|inner| inner.strip_suffix("}}"))
        .is_some_and(|inner| inner.trim() == "default")
}

/// Native rules 2-4 (PROTOCOL 4):
/// 2. a non-empty `stacktrace`: `filename|function_name` per frame joined by `;`, then `:` and
///    the normalised message (line and column never count);
/// 3. an `exception`: `type_name:` + normalised `value`;
/// 4. `msg:` + normalised `message`.
fn native_key(event: &Event<'_>) -> String {
    let message = event.message.unwrap_or("");
    if !event.frames.is_empty() {
        let mut key = String::with_capacity(event.frames.len() * 48 + message.len() + 1);
        for (index, frame) in event.frames.iter().enumerate() {
            if index > 0 {
                key.push(FRAME_SEPARATOR);
            }
            push_frame(&mut key, frame.filename, frame.function);
        }
        key.push(':');
        push_normalised(&mut key, message);
        return key;
    }
    if let Some(exception) = event.exception {
        return exception_key(exception);
    }
    message_key(message, None)
}

/// Sentry rules 2-4 (PROTOCOL 8):
/// 2. an exception with frames: `Type;module|function;...`, only the in-app frames when any
///    frame is in-app (line numbers and the exception value never count);
/// 3. an exception without frames: `Type:` + normalised value;
/// 4. `msg:` + the message template (`logentry.message`), else the normalised message.
fn sentry_key(event: &Event<'_>) -> String {
    let Some(exception) = event.exception else {
        return message_key(event.message.unwrap_or(""), event.template);
    };
    if event.frames.is_empty() {
        return exception_key(exception);
    }
    let type_name = exception.type_name.unwrap_or("");
    let any_in_app = event.frames.iter().any(|frame| frame.in_app);
    let mut key = String::with_capacity(type_name.len() + event.frames.len() * 48);
    key.push_str(type_name);
    for frame in event.frames.iter() {
        if any_in_app && !frame.in_app {
            continue;
        }
        key.push(FRAME_SEPARATOR);
        push_frame(&mut key, frame.module.or(frame.filename), frame.function);
    }
    key
}

/// `location|function`, either empty when missing.
fn push_frame(key: &mut String, location: Option<&str>, function: Option<&str>) {
    key.push_str(location.unwrap_or(""));
    key.push(FRAME_FIELD_SEPARATOR);
    key.push_str(function.unwrap_or(""));
}

/// `type:` + normalised value.
fn exception_key(exception: Exception<'_>) -> String {
    let type_name = exception.type_name.unwrap_or("");
    let value = exception.value.unwrap_or("");
    let mut key = String::with_capacity(type_name.len() + 1 + value.len());
    key.push_str(type_name);
    key.push(':');
    push_normalised(&mut key, value);
    key
}

/// `msg:` + the template as sent, else the normalised message.
fn message_key(message: &str, template: Option<&str>) -> String {
    let mut key = String::with_capacity(MESSAGE_KEY_PREFIX.len() + message.len());
    key.push_str(MESSAGE_KEY_PREFIX);
    match template {
        Some(template) => key.push_str(template),
        None => push_normalised(&mut key, message),
    }
    key
}

/// Native title: the message, else `type_name: value` of the exception, else `Untitled`, cut
/// to `TITLE_BYTES_MAX` bytes.
fn native_title(event: &Event<'_>) -> String {
    let exception = event.exception.unwrap_or_default();
    title_of(event.message, exception.type_name, exception.value)
}

fn title_of(
    message: Option<&str>,
    exception_type: Option<&str>,
    exception_value: Option<&str>,
) -> String {
    fn non_empty(text: Option<&str>) -> Option<&str> {
        text.filter(|text| !text.is_empty())
    }
    // Each part is cut before it is copied, so a megabyte message costs no megabyte copy.
    let cut = |text: &str| cut_at_char_boundary(text, TITLE_BYTES_MAX).to_owned();
    match (
        non_empty(message),
        non_empty(exception_type),
        non_empty(exception_value),
    ) {
        (Some(message), _, _) => cut(message),
        (None, Some(type_name), Some(value)) => {
            let type_name = cut(type_name);
            let rest = TITLE_BYTES_MAX.saturating_sub(type_name.len() + 2);
            cut(&format!(
                "{type_name}: {}",
                cut_at_char_boundary(value, rest)
            ))
        }
        (None, Some(type_name), None) => cut(type_name),
        (None, None, Some(value)) => cut(value),
        (None, None, None) => UNTITLED.to_owned(),
    }
}

/// Sentry title: `Type: value` for an exception, else the message; its first line, at most
/// `SENTRY_TITLE_CHARS_MAX` characters; `Untitled` when there is neither.
fn sentry_title(event: &Event<'_>) -> String {
    let exception = event.exception.unwrap_or_default();
    let full = match (exception.type_name, exception.value, event.message) {
        (Some(type_name), Some(value), _) => {
            let mut title = String::with_capacity(type_name.len() + 2 + value.len());
            title.push_str(type_name);
            title.push_str(": ");
            title.push_str(first_line(value));
            return clip(title);
        }
        (Some(type_name), None, _) => type_name,
        (None, Some(value), _) => value,
        (None, None, Some(message)) => message,
        (None, None, None) => UNTITLED,
    };
    clip(first_line(full).to_owned())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// At most `SENTRY_TITLE_CHARS_MAX` characters, trailing whitespace removed; `Untitled` if
/// nothing is left.
fn clip(mut title: String) -> String {
    if let Some((end, _)) = title.char_indices().nth(SENTRY_TITLE_CHARS_MAX) {
        title.truncate(end);
    }
    title.truncate(title.trim_end().len());
    if title.is_empty() {
        return UNTITLED.to_owned();
    }
    title
}

/// Appends `normalise(s)` to `out` without an intermediate string in the common ASCII case.
pub(crate) fn push_normalised(out: &mut String, s: &str) {
    let start = out.len();
    if s.is_ascii() {
        // Copied and lowercased in bulk; "0x" is rare, so it is removed only when present.
        out.push_str(s);
        out[start..].make_ascii_lowercase();
        if out.as_bytes()[start..].windows(2).any(|pair| pair == b"0x") {
            let removed = out[start..].replace("0x", "");
            out.truncate(start);
            out.push_str(&removed);
        }
    } else {
        // Full Unicode lowercasing (context-dependent, e.g. final sigma) needs the whole string.
        let lower = s.to_lowercase();
        let mut rest = lower.as_str();
        while let Some(position) = rest.find("0x") {
            out.push_str(&rest[..position]);
            rest = &rest[position + 2..];
        }
        out.push_str(rest);
    }

    let kept_len = out[start..].trim_end().len();
    out.truncate(start + kept_len);
    let leading_len = kept_len - out[start..].trim_start().len();
    out.drain(start..start + leading_len);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::{Level, Raw};
    use crate::ingest::native::{self, Fields};
    use crate::ingest::testing::XorShift;

    #[test]
    fn hash_is_the_first_16_bytes_of_sha256() {
        assert_eq!(
            hex::encode(hash("msg:boom")),
            hex::encode(&Sha256::digest(b"msg:boom")[..16])
        );
        assert_eq!(hex::encode(hash("")), "e3b0c44298fc1c149afbf4c8996fb924");
        assert_ne!(hash("msg:a"), hash("msg:b"));
    }

    /// The native event in `json`, read unchecked from a tape kept for the rest of the test run.
    fn parse(json: &str) -> Event<'static> {
        let bytes = Box::leak(Box::new(json.as_bytes().to_vec()));
        let tape = Box::leak(Box::new(
            simd_json::to_tape(bytes).expect("test JSON is valid"),
        ));
        let root = tape.as_value();
        native::read(&Fields::of(root), Level::Error, None, Raw::Parsed(root))
    }

    fn fingerprint(event: &Event<'_>) -> String {
        key(event)
    }

    fn reference_normalise(s: &str) -> String {
        s.to_lowercase().replace("0x", "").trim().to_owned()
    }

    #[test]
    fn normalise_lowercases_removes_hex_prefix_and_trims() {
        assert_eq!(
            normalise("  Segfault at 0xDEADBEEF \n"),
            "segfault at deadbeef"
        );
        assert_eq!(normalise("0X1F and 0x2a"), "1f and 2a");
        assert_eq!(normalise("00x"), "0");
        assert_eq!(normalise("0xx"), "x");
        assert_eq!(normalise(" 0x "), "");
        assert_eq!(normalise("0x 1"), "1");
        assert_eq!(normalise(""), "");
        assert_eq!(normalise("ÄÖÜ 0XFF\u{3000}"), "äöü ff");
        assert_eq!(normalise("ΣΑΣ"), "σας");
    }

    #[test]
    fn normalise_matches_its_definition_on_random_text() {
        let alphabet: Vec<char> = "0xX 0Xa\t\nÄσΣİ\u{3000}1\u{2028}".chars().collect();
        let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (random.next() % 12) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(random.next() % alphabet.len() as u64) as usize])
                .collect();
            assert_eq!(normalise(&text), reference_normalise(&text), "{text:?}");
        }
    }

    #[test]
    fn push_normalised_keeps_what_came_before() {
        let mut key = String::from(" a:");
        push_normalised(&mut key, "  B 0x1 ");
        assert_eq!(key, " a:b 1");
    }

    #[test]
    fn rule_1_custom_string_wins_over_everything() {
        let event = parse(
            r#"{"fingerprint":"Checkout-Timeout","message":"m","exception":{"type_name":"E"},
                "stacktrace":[{"filename":"a.js","function_name":"f"}]}"#,
        );
        assert_eq!(fingerprint(&event), "Checkout-Timeout");
    }

    #[test]
    fn rule_1_custom_array_is_joined_with_newlines() {
        let event = parse(r#"{"fingerprint":["db","Timeout","x"],"message":"m"}"#);
        assert_eq!(fingerprint(&event), "db\nTimeout\nx");
        let single = parse(r#"{"fingerprint":["only"],"message":"m"}"#);
        assert_eq!(fingerprint(&single), "only");
    }

    #[test]
    fn rule_1_skipped_when_custom_key_is_empty() {
        let event = parse(r#"{"fingerprint":[],"message":"Boom"}"#);
        assert_eq!(fingerprint(&event), "msg:boom");
        let event = parse(r#"{"fingerprint":"","message":"Boom"}"#);
        assert_eq!(fingerprint(&event), "msg:boom");
    }

    #[test]
    fn rule_2_frames_in_order_then_normalised_message() {
        let event = parse(
            r#"{"message":" Null at 0xFF ","exception":{"type_name":"E","value":"v"},
                "stacktrace":[
                  {"filename":"app.js","function_name":"main","lineno":10,"colno":2},
                  {"filename":"lib.js","function_name":"helper","context_line":"x()"},
                  {"function_name":"anon"},
                  {"filename":"tail.js"},
                  {}
                ]}"#,
        );
        assert_eq!(
            fingerprint(&event),
            "app.js|main;lib.js|helper;|anon;tail.js|;|:null at ff"
        );
    }

    #[test]
    fn rule_2_without_message_ends_with_colon() {
        let event = parse(
            r#"{"exception":{"type_name":"E"},"stacktrace":[{"filename":"a","function_name":"b"}]}"#,
        );
        assert_eq!(fingerprint(&event), "a|b:");
    }

    #[test]
    fn rule_2_ignores_line_and_column_numbers() {
        let first = parse(
            r#"{"message":"x","stacktrace":[{"filename":"a.py","function_name":"f","lineno":1,"colno":1,"in_app":true}]}"#,
        );
        let moved = parse(
            r#"{"message":"x","stacktrace":[{"filename":"a.py","function_name":"f","lineno":907,"colno":33,"in_app":false}]}"#,
        );
        assert_eq!(fingerprint(&first), fingerprint(&moved));
        let other_function = parse(
            r#"{"message":"x","stacktrace":[{"filename":"a.py","function_name":"g","lineno":1,"colno":1}]}"#,
        );
        assert_ne!(fingerprint(&first), fingerprint(&other_function));
    }

    #[test]
    fn rule_2_frame_order_matters() {
        let forward = parse(
            r#"{"message":"x","stacktrace":[{"filename":"a","function_name":"f"},{"filename":"b","function_name":"g"}]}"#,
        );
        let reversed = parse(
            r#"{"message":"x","stacktrace":[{"filename":"b","function_name":"g"},{"filename":"a","function_name":"f"}]}"#,
        );
        assert_ne!(fingerprint(&forward), fingerprint(&reversed));
    }

    #[test]
    fn rule_2_skipped_for_empty_stacktrace() {
        let event = parse(r#"{"message":"Boom","stacktrace":[]}"#);
        assert_eq!(fingerprint(&event), "msg:boom");
    }

    #[test]
    fn rule_3_exception_type_and_normalised_value() {
        let event = parse(
            r#"{"message":"ignored","exception":{"type_name":"TypeError","value":"Cannot read 0x1F of UNDEFINED","module_name":"m"}}"#,
        );
        assert_eq!(fingerprint(&event), "TypeError:cannot read 1f of undefined");
        let bare = parse(r#"{"exception":{}}"#);
        assert_eq!(fingerprint(&bare), ":");
    }

    #[test]
    fn rule_3_groups_addresses_and_case() {
        let first = parse(r#"{"exception":{"type_name":"Segv","value":"fault at 0x7FFE12"}}"#);
        let second = parse(r#"{"exception":{"type_name":"Segv","value":"FAULT AT 7ffe12  "}}"#);
        assert_eq!(fingerprint(&first), fingerprint(&second));
        // The type name is kept as sent: different types stay apart.
        let other_type = parse(r#"{"exception":{"type_name":"segv","value":"fault at 7ffe12"}}"#);
        assert_ne!(fingerprint(&first), fingerprint(&other_type));
    }

    #[test]
    fn rule_4_message_only() {
        let event = parse(r#"{"message":"  Payment FAILED for 0xABC  "}"#);
        assert_eq!(fingerprint(&event), "msg:payment failed for abc");
        let same = parse(r#"{"message":"payment failed for abc"}"#);
        assert_eq!(fingerprint(&event), fingerprint(&same));
    }

    #[test]
    fn wrong_types_count_as_missing() {
        let event = parse(
            r#"{"fingerprint":7,"message":5,"stacktrace":[3,{"filename":1,"function_name":"f"}],"exception":"x"}"#,
        );
        assert_eq!(fingerprint(&event), "|;|f:");
        assert_eq!(fingerprint(&parse("[1,2]")), "msg:");
        assert_eq!(
            fingerprint(&parse(r#"{"fingerprint":["a",1,null]}"#)),
            "a\n\n"
        );
    }
}
