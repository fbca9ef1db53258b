//! Validation of a canonical event: what an event must hold to be accepted, whatever format it
//! came in, by the rules of its format. Field types are the decoders' concern (a native event
//! with a number for `message` is refused while being read); this step judges what was read.

use super::event::{Event, Grouping};

/// Whether the event may be accepted; the error is the detail of an `invalid event` answer.
///
/// - Native (PROTOCOL 4): a non-empty `message` or an `exception` is required.
/// - Sentry (PROTOCOL 8): every event that could be read is accepted, as Sentry's own ingestion
///   does; SDKs do not expect refusals.
pub fn validate(event: &Event<'_>) -> Result<(), String> {
    match event.grouping {
        Grouping::Native
            if event.message.is_none_or(str::is_empty) && event.exception.is_none() =>
        {
            Err("message or exception required".to_owned())
        }
        Grouping::Native | Grouping::Sentry => Ok(()),
    }
}
