//! Sentry-compatible ingest (PROTOCOL 8): what turns a `store` or `envelope` request from an
//! unmodified Sentry SDK into the same `Incoming` events as the native decoder.
//!
//! # Layout
//! - `encoding`: `Content-Encoding` decoding with the decoded size capped while decoding.
//! - `envelope`: the envelope format (items borrowed from the body) and DSN parsing.
//! - `event`: reading and grouping one Sentry event JSON.
//!
//! A request flows as: `ContentEncoding::from_header` -> `decode_body` (cap `STORE_BYTES_MAX`
//! or `ENVELOPE_BYTES_MAX`) -> `decode_store_body`, or `parse_envelope` then
//! `decode_event_item` for each `event` item.

pub mod encoding;
pub mod envelope;
pub mod event;

pub use encoding::{decode_body, BodyError, ContentEncoding};
pub use envelope::{
    parse_dsn, parse_envelope, parse_event_id, DsnKey, Envelope, EnvelopeError, Item,
    ENVELOPE_BYTES_MAX, ENVELOPE_ITEMS_MAX, ITEM_BYTES_MAX, STORE_BYTES_MAX,
};
pub use event::{decode_event_item, decode_store_body, SentryEvent};
