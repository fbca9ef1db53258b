//! Cheap inspection of stream messages by substring, so that the client spends little CPU per
//! delivery. The same code reads all three targets: a key may appear plain (`"sent_us":12`) or
//! inside a JSON string as Pusher sends its data (`\"sent_us\":12`).

/// Which target's message shapes to expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `{"type":"event",...}` and friends.
    Mesher,
    /// Every message is a published body.
    Raw,
    /// `{"event":"pusher:...",...}` control messages, anything else is a published event.
    Pusher,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Event,
    /// A `dropped` marker and its count.
    Dropped(u64),
    Issue,
    IssueCount,
    FiltersUpdated,
    Error,
    PusherEstablished,
    PusherSubscribed,
    PusherPing,
    Other,
}

/// First position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut from = 0;
    while from <= last_start {
        let at = from + hay[from..=last_start].iter().position(|&b| b == first)?;
        if &hay[at + 1..at + needle.len()] == rest {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Skips the `":` (or `\":`, `": `) that separates a key found by substring from its value.
fn value_after(msg: &[u8], key_end: usize) -> &[u8] {
    let mut at = key_end;
    while at < msg.len() && matches!(msg[at], b'"' | b'\\' | b':' | b' ') {
        at += 1;
    }
    &msg[at..]
}

fn leading_number(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    bytes[..digits].iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// The publisher's monotonic send time carried in the event.
pub fn sent_us(msg: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"sent_us";
    let at = find(msg, KEY)?;
    leading_number(value_after(msg, at + KEY.len()))
}

/// The event's level (`error`, `warning`, ...).
pub fn level(msg: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"level";
    const ESCAPED_KEY: &[u8] = b"\\\"level";
    let key_end = match find(msg, KEY) {
        Some(at) => at + KEY.len(),
        None => find(msg, ESCAPED_KEY)? + ESCAPED_KEY.len(),
    };
    let value = value_after(msg, key_end);
    let len = value
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .unwrap_or(value.len());
    Some(&value[..len])
}

/// The value of Mesher's top-level `type`, read from the start when the server writes it first.
fn mesher_type(msg: &[u8]) -> Option<&[u8]> {
    const PREFIX: &[u8] = b"{\"type\":\"";
    const KEY: &[u8] = b"\"type\":\"";
    let value_start = if msg.starts_with(PREFIX) {
        PREFIX.len()
    } else {
        find(msg, KEY)? + KEY.len()
    };
    let value = &msg[value_start..];
    let len = value.iter().position(|&b| b == b'"')?;
    Some(&value[..len])
}

fn count_field(msg: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"count\"";
    find(msg, KEY)
        .and_then(|at| leading_number(value_after(msg, at + KEY.len())))
        .unwrap_or(0)
}

pub fn classify(dialect: Dialect, msg: &[u8]) -> Kind {
    match dialect {
        Dialect::Raw => Kind::Event,
        Dialect::Mesher => match mesher_type(msg) {
            Some(b"event") => Kind::Event,
            Some(b"dropped") => Kind::Dropped(count_field(msg)),
            Some(b"issue") => Kind::Issue,
            Some(b"issue_count") => Kind::IssueCount,
            Some(b"filters_updated") => Kind::FiltersUpdated,
            Some(b"error") => Kind::Error,
            _ => Kind::Other,
        },
        Dialect::Pusher => {
            const CONTROL: &[u8] = b"\"event\":\"pusher";
            let Some(at) = find(msg, CONTROL) else {
                return Kind::Event;
            };
            let name = &msg[at + b"\"event\":\"".len()..];
            if name.starts_with(b"pusher_internal:subscription_succeeded") {
                Kind::PusherSubscribed
            } else if name.starts_with(b"pusher:connection_established") {
                Kind::PusherEstablished
            } else if name.starts_with(b"pusher:ping") {
                Kind::PusherPing
            } else if name.starts_with(b"pusher:error") {
                Kind::Error
            } else {
                Kind::Other
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESHER_EVENT: &[u8] = br#"{"type":"event","event_id":"e","issue_id":"i","data":{"message":"bench","level":"warning","environment":"bench","sent_us":123456,"pad":"xx"}}"#;
    const PUSHER_EVENT: &[u8] = br#"{"event":"bench","channel":"p1","data":"{\"message\":\"bench\",\"level\":\"error\",\"sent_us\":98,\"pad\":\"x\"}"}"#;

    #[test]
    fn finds_substrings() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"abc", b""), None);
        assert_eq!(find(b"aaab", b"ab"), Some(2));
        assert_eq!(find(b"", b"a"), None);
    }

    #[test]
    fn reads_sent_us_plain_and_escaped() {
        assert_eq!(sent_us(MESHER_EVENT), Some(123456));
        assert_eq!(sent_us(PUSHER_EVENT), Some(98));
        assert_eq!(sent_us(br#"{"sent_us": 7}"#), Some(7));
        assert_eq!(sent_us(br#"{"sent_us":"x"}"#), None);
        assert_eq!(sent_us(br#"{"sent_us":99999999999999999999999}"#), None);
        assert_eq!(sent_us(b"sent_us"), None);
        assert_eq!(sent_us(b"nothing"), None);
    }

    #[test]
    fn reads_level_plain_and_escaped() {
        assert_eq!(level(MESHER_EVENT), Some(&b"warning"[..]));
        assert_eq!(level(PUSHER_EVENT), Some(&b"error"[..]));
        assert_eq!(level(b"{\"message\":\"x\"}"), None);
        assert_eq!(level(b"{\"level"), Some(&b""[..]));
    }

    #[test]
    fn classifies_mesher_messages() {
        let m = Dialect::Mesher;
        assert_eq!(classify(m, MESHER_EVENT), Kind::Event);
        assert_eq!(
            classify(m, br#"{"type":"dropped","count":17}"#),
            Kind::Dropped(17)
        );
        assert_eq!(
            classify(m, br#"{"count":3,"type":"dropped"}"#),
            Kind::Dropped(3)
        );
        assert_eq!(
            classify(m, br#"{"type":"issue_count","project_id":"p","count":1}"#),
            Kind::IssueCount
        );
        assert_eq!(
            classify(m, br#"{"type":"issue","action":"created"}"#),
            Kind::Issue
        );
        assert_eq!(
            classify(m, br#"{"type":"filters_updated","filters":{}}"#),
            Kind::FiltersUpdated
        );
        assert_eq!(
            classify(m, br#"{"type":"error","message":"x"}"#),
            Kind::Error
        );
        assert_eq!(classify(m, br#"{"type":"eventual"}"#), Kind::Other);
        assert_eq!(classify(m, b"garbage"), Kind::Other);
        assert_eq!(classify(m, br#"{"type":"unterminated"#), Kind::Other);
    }

    #[test]
    fn classifies_pusher_and_raw_messages() {
        let p = Dialect::Pusher;
        assert_eq!(classify(p, PUSHER_EVENT), Kind::Event);
        assert_eq!(
            classify(
                p,
                br#"{"event":"pusher:connection_established","data":"{}"}"#
            ),
            Kind::PusherEstablished
        );
        assert_eq!(
            classify(
                p,
                br#"{"event":"pusher_internal:subscription_succeeded","channel":"c"}"#
            ),
            Kind::PusherSubscribed
        );
        assert_eq!(
            classify(p, br#"{"event":"pusher:ping","data":{}}"#),
            Kind::PusherPing
        );
        assert_eq!(
            classify(p, br#"{"event":"pusher:error","data":{}}"#),
            Kind::Error
        );
        assert_eq!(classify(Dialect::Raw, b"anything"), Kind::Event);
    }
}
