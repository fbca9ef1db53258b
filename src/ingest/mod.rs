//! Event decoding, validation and grouping keys.

pub mod event;
pub mod fingerprint;

use event::{body_is_array, parse_bulk, parse_event, parse_frame, Event, EventError, Level};

/// An accepted event as its owner shard needs it: the grouping fields and the event's JSON.
/// The parsed value is dropped on the accepting shard, where it was made.
#[derive(Debug)]
pub struct Incoming {
    pub fingerprint: String,
    pub title: String,
    pub level: Level,
    pub environment: Option<String>,
    /// The event as sent: the request bytes themselves for a single event, re-encoded for
    /// the elements of an array.
    pub json: Vec<u8>,
}

impl Incoming {
    fn new(event: Event, raw: Option<Vec<u8>>) -> Incoming {
        let json = raw.unwrap_or_else(|| {
            let mut json = Vec::with_capacity(512);
            event.write_json(&mut json);
            json
        });
        Incoming {
            fingerprint: event.fingerprint,
            title: event.title,
            level: event.level,
            environment: event.environment,
            json,
        }
    }
}

/// One event object; its bytes are kept exactly as sent.
pub fn decode_event(body: Vec<u8>) -> Result<Incoming, EventError> {
    // simd-json parses in place, so it works on a copy and the original stays verbatim.
    let mut scratch = body.clone();
    let event = parse_event(&mut scratch)?;
    Ok(Incoming::new(event, Some(body)))
}

/// A JSON array of events (bulk).
pub fn decode_bulk(mut body: Vec<u8>) -> Result<Vec<Incoming>, EventError> {
    Ok(parse_bulk(&mut body)?
        .into_iter()
        .map(|e| Incoming::new(e, None))
        .collect())
}

/// A WebSocket ingest frame: an object or an array; also says which it was.
pub fn decode_frame(body: Vec<u8>) -> Result<(Vec<Incoming>, bool), EventError> {
    if body_is_array(&body) {
        let mut body = body;
        let events = parse_frame(&mut body)?;
        Ok((
            events.into_iter().map(|e| Incoming::new(e, None)).collect(),
            true,
        ))
    } else {
        Ok((vec![decode_event(body)?], false))
    }
}
