//! Ingest: from the bytes of a request or frame to events ready for their owner shard.
//!
//! Every event goes through the same pipeline, whatever format it came in:
//!
//! 1. **Wire decoder**: parses the body (`document`, simd-json's tape; `diagnose` explains a
//!    refused body and lets numbers beyond 64 bits through) and reads the event into the
//!    canonical `event::Event`, borrowing from the parsed document. Fields of the wrong type are
//!    the decoder's business: `native` (Mesher JSON, PROTOCOL 4) refuses them, `sentry`
//!    (PROTOCOL 8, with its envelope and body encodings) counts them as missing. A new wire
//!    format is a new decoder beside these two, producing the same canonical event.
//! 2. **Validation** (`validate`): whether the canonical event may be accepted, by the rules of
//!    its format.
//! 3. **Grouping** (`fingerprint`): the grouping key and title over the canonical fields, by the
//!    rule set the event's `grouping` names (native or Sentry).
//!
//! What is left is an owned `event::Summary`, and with the event's JSON an `Incoming`.

mod diagnose;
pub mod document;
pub mod event;
pub mod fingerprint;
pub mod native;
pub mod sentry;
#[cfg(test)]
mod testing;
pub mod validate;

use event::{EventError, Level, Summary};
use native::{body_is_array, parse_bulk, parse_event};

/// An accepted event as its owner shard needs it: the grouping fields and the event's JSON.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Incoming {
    /// The grouping key's hash, made once here on the accepting shard; the key itself is dropped.
    pub fingerprint: fingerprint::FingerprintHash,
    pub title: String,
    pub level: Level,
    pub environment: Option<String>,
    /// `timestamp` in microseconds since the Unix epoch, if the event has one.
    pub timestamp_us: Option<i64>,
    /// The event as sent: the request bytes themselves for a single event, re-encoded for
    /// the elements of an array.
    pub json: String,
    /// The id the client gave the event (Sentry's `event_id`), which the event is stored under
    /// and which dedupes the client's retries; `None`: the owner makes one.
    pub event_id: Option<uuid::Uuid>,
}

/// How far ahead of the receive time an event's `timestamp` may be (clock skew).
const TIMESTAMP_FUTURE_MAX_US: i64 = 60_000_000;
/// How far behind the receive time an event's `timestamp` may be.
const TIMESTAMP_PAST_MAX_US: i64 = 30 * 86_400_000_000;

impl Incoming {
    /// An accepted event's summary with its JSON; the grouping key is hashed here.
    pub(crate) fn new(event: Summary, json: String) -> Incoming {
        Incoming {
            fingerprint: fingerprint::hash(&event.fingerprint),
            title: event.title,
            level: event.level,
            environment: event.environment,
            timestamp_us: event.timestamp_us,
            json,
            event_id: None,
        }
    }

    /// When the event happened: its `timestamp`, or the receive time when it has none or when
    /// the timestamp lies more than a minute ahead or 30 days behind (a client's clock is off),
    /// so that one bad clock cannot pin an issue's first or last sight far in the past or future.
    pub fn occurred_us(&self, received_us: i64) -> i64 {
        match self.timestamp_us {
            Some(at)
                if at <= received_us.saturating_add(TIMESTAMP_FUTURE_MAX_US)
                    && at >= received_us.saturating_sub(TIMESTAMP_PAST_MAX_US) =>
            {
                at
            }
            _ => received_us,
        }
    }
}

/// One event object; its bytes are kept exactly as sent.
pub fn decode_event(body: Vec<u8>) -> Result<Incoming, EventError> {
    let event = parse_event(&body)?;
    // SAFETY: the body was accepted, and both simd-json and the scanner of a refused body
    // (`diagnose`) refuse any input that is not UTF-8 as a whole, not only inside strings.
    let json = unsafe { String::from_utf8_unchecked(body) };
    Ok(Incoming::new(event, json))
}

/// A JSON array of events (bulk); each element's JSON is written anew from the parsed value.
pub fn decode_bulk(body: Vec<u8>) -> Result<Vec<Incoming>, EventError> {
    Ok(parse_bulk(&body)?
        .into_iter()
        .map(|(event, json)| Incoming::new(event, json))
        .collect())
}

/// A WebSocket ingest frame: an object or an array; also says which it was.
pub fn decode_frame(body: Vec<u8>) -> Result<(Vec<Incoming>, bool), EventError> {
    if body_is_array(&body) {
        Ok((decode_bulk(body)?, true))
    } else {
        Ok((vec![decode_event(body)?], false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(timestamp: &str) -> Incoming {
        decode_event(format!(r#"{{"message":"m","timestamp":{timestamp}}}"#).into_bytes()).unwrap()
    }

    #[test]
    fn single_events_keep_their_bytes_as_sent_whatever_came_before() {
        let escaped = br#"{ "message" : "caf\u00e9 \"x\"", "level":"info" }"#;
        let large = format!(r#"{{"message":"big","pad":"{}"}}"#, "y".repeat(100_000));
        assert!(decode_event(b"{\"message\":".to_vec()).is_err());
        assert_eq!(
            decode_event(large.clone().into_bytes()).unwrap().json,
            large
        );
        let event = decode_event(escaped.to_vec()).unwrap();
        assert_eq!(event.json.as_bytes(), escaped);
        assert_eq!(event.title, "café \"x\"");
        let not_utf8 = [&br#"{"message":"a"#[..], &[0xff], br#""}"#].concat();
        assert!(matches!(decode_event(not_utf8), Err(EventError::Json(_))));
    }

    #[test]
    fn frames_hold_an_object_kept_as_sent_or_an_array_written_anew() {
        let (single, was_array) = decode_frame(br#" {"message":"one"} "#.to_vec()).unwrap();
        assert!(!was_array);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].json, r#" {"message":"one"} "#);
        let (many, was_array) =
            decode_frame(br#" [{"message":"a"}, {"message":"b","level":"info"}]"#.to_vec())
                .unwrap();
        assert!(was_array);
        let jsons: Vec<&str> = many.iter().map(|event| event.json.as_str()).collect();
        assert_eq!(
            jsons,
            [r#"{"message":"a"}"#, r#"{"message":"b","level":"info"}"#]
        );
        assert_eq!(many[1].level, Level::Info);

        let refused = |body: &[u8]| decode_frame(body.to_vec()).unwrap_err().to_string();
        assert_eq!(
            refused(br#""text""#),
            "invalid event: event must be a JSON object, got string"
        );
        assert_eq!(
            refused(b"[]"),
            "invalid event: empty array: at least one event required"
        );
        assert_eq!(
            refused(br#"[{"message":"a"},{}]"#),
            "invalid event: index 1: message or exception required"
        );
        let too_many = format!("[{}]", vec![r#"{"message":"x"}"#; 101].join(","));
        assert!(decode_frame(too_many.into_bytes()).is_err());
        assert!(refused(b"{").starts_with("invalid JSON: "));
    }

    #[test]
    fn occurred_is_the_timestamp_within_the_skew_bounds() {
        let received = 1_700_000_000_000_000;
        assert_eq!(at("null").occurred_us(received), received);
        assert_eq!(
            at("1699999000").occurred_us(received),
            1_699_999_000_000_000
        );
        assert_eq!(
            at("1700000060").occurred_us(received),
            1_700_000_060_000_000
        );
        // Over a minute ahead, or more than 30 days behind: the receive time.
        assert_eq!(at("1700000061").occurred_us(received), received);
        assert_eq!(at("1697407999").occurred_us(received), received);
        assert_eq!(
            at("1697408000").occurred_us(received),
            1_697_408_000_000_000
        );
    }
}
