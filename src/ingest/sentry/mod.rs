//! Sentry-compatible ingest (PROTOCOL 8): what turns a `store` or `envelope` request from an
//! unmodified Sentry SDK into the same `Incoming` events as the native decoder.
//!
//! # Layout
//! - `encoding`: `Content-Encoding` decoding with the decoded size capped while decoding.
//! - `envelope`: the envelope format (items borrowed from the body) and DSN parsing.
//! - `event`: the wire decoder: one Sentry event JSON read into the canonical event, grouped
//!   by the Sentry rule set of `ingest::fingerprint`.
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const PYTHON_EXCEPTION: &str =
        include_str!("../../../tests/fixtures/sentry/python_exception.json");

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn a_gzipped_envelope_becomes_events() {
        let envelope = format!(
            "{{\"event_id\":\"0f3e5ac3e8bb4c1e9c4bd61e3aa8c2a1\",\"dsn\":\"http://k3y@localhost:9000/12\"}}\n\
             {{\"type\":\"event\",\"length\":{}}}\n{PYTHON_EXCEPTION}\n\
             {{\"type\":\"client_report\"}}\n{{\"discarded_events\":[]}}\n",
            PYTHON_EXCEPTION.len()
        );
        let encoding = ContentEncoding::from_header(Some("gzip")).unwrap();
        let body = decode_body(encoding, gzip(envelope.as_bytes()), ENVELOPE_BYTES_MAX).unwrap();
        let parsed = parse_envelope(&body).unwrap();
        let key = parse_dsn(parsed.dsn.as_deref().unwrap()).unwrap();
        assert_eq!((key.public_key, key.project_number), ("k3y", 12));
        let types: Vec<&str> = parsed.items.iter().map(|i| i.item_type.as_ref()).collect();
        assert_eq!(types, ["event", "client_report"]);

        let events: Vec<SentryEvent> = parsed
            .events()
            .map(|item| decode_event_item(item.payload).unwrap())
            .collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_id, parsed.event_id);
        assert_eq!(events[0].incoming.json, PYTHON_EXCEPTION);
        assert_eq!(events[0].incoming.title, "KeyError: 'user_42'");
    }

    #[test]
    fn a_store_body_is_one_event() {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(PYTHON_EXCEPTION.as_bytes()).unwrap();
        let body = decode_body(
            ContentEncoding::Deflate,
            encoder.finish().unwrap(),
            STORE_BYTES_MAX,
        )
        .unwrap();
        let event = decode_store_body(body).unwrap();
        assert_eq!(event.incoming.json, PYTHON_EXCEPTION);
        assert_eq!(event.release.as_deref(), Some("shop@2.4.1"));
        let too_large = vec![b' '; STORE_BYTES_MAX + 1];
        assert_eq!(
            decode_body(ContentEncoding::Gzip, gzip(&too_large), STORE_BYTES_MAX),
            Err(BodyError::TooLarge {
                limit_bytes: STORE_BYTES_MAX
            })
        );
    }
}
