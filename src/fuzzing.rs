//! Properties every parser must keep, whatever bytes it is given: the checks the fuzz targets
//! (`fuzz/`, cargo-fuzz on nightly) run on each input, and that `cargo test` runs on every file
//! of the kept corpora, so that an input once found to break a parser stays a test.
//!
//! Each check panics when a property fails; returning is passing. Compiled for tests and with
//! the `fuzzing` feature only.

use std::io::Write;

use crate::http::parse::{parse_head, BodyDecoder, BodyKind, Head, HttpError, HEADER_BYTES_MAX};
use crate::ingest::sentry::encoding::{decode_body, BodyError, ContentEncoding};
use crate::ingest::sentry::envelope::parse_envelope;
use crate::ingest::{decode_bulk, decode_event};
use crate::stream::Subscribe;
use crate::ws::codec::{Decoder, Message};

/// A property check over one input; panics when the property fails.
pub type Check = fn(&[u8]);

/// The fuzz targets, by the name of their corpus folder, with their checks.
pub const TARGETS: &[(&str, Check)] = &[
    ("http_head", http_head),
    ("http_body", http_body),
    ("ws_frames", ws_frames),
    ("native_event", native_event),
    ("subscribe", subscribe),
    ("envelope", envelope),
    ("decompress", decompress),
];

/// A parsed head, written out again, parses to the same head; and no prefix of a complete
/// head is taken for a complete one. Header values that are not UTF-8 (obs-text) are read
/// lossily, each bad byte as U+FFFD (3 bytes), so a head near the limit can grow past it when
/// written out: then it must be refused as too large, nothing else.
pub fn http_head(data: &[u8]) {
    let Ok(Some(head)) = parse_head(data) else {
        return;
    };
    assert!(head.head_len <= data.len());
    let written = write_head(&head);
    let again = parse_head(&written);
    if written.len() > HEADER_BYTES_MAX {
        assert_eq!(
            again,
            Err(HttpError::HeadersTooLarge),
            "a head grown past the limit"
        );
        return;
    }
    let again = again
        .expect("a head written from a parsed one parses")
        .expect("and is complete");
    assert_eq!(again.method, head.method);
    assert_eq!(again.path, head.path);
    assert_eq!(again.query, head.query);
    assert_eq!(again.body, head.body);
    assert_eq!(again.http10, head.http10);
    assert_eq!(
        again.headers.iter().collect::<Vec<_>>(),
        head.headers.iter().collect::<Vec<_>>()
    );
    let cut = head.head_len - 1;
    assert!(
        !matches!(parse_head(&data[..cut]), Ok(Some(_))),
        "a head without its last byte is not complete"
    );
}

fn write_head(head: &Head) -> Vec<u8> {
    let mut out = Vec::new();
    let query = if head.query.is_empty() {
        String::new()
    } else {
        format!("?{}", head.query)
    };
    let version = if head.http10 { "1.0" } else { "1.1" };
    write!(
        out,
        "{} {}{query} HTTP/{version}\r\n",
        head.method, head.path
    )
    .unwrap();
    for (name, value) in head.headers.iter() {
        write!(out, "{name}: {value}\r\n").unwrap();
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A chunked body fed whole or split anywhere decodes to the same body or the same error, and
/// never past its limit. The first byte picks the limit and the split.
pub fn http_body(data: &[u8]) {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let limit = 1 + (choice as usize % 16) * 64;
    let whole = feed_body(body, limit, &[body.len()]);
    let at = (choice as usize * 7919) % (body.len() + 1);
    let split = feed_body(body, limit, &[at, body.len()]);
    assert_eq!(whole, split, "split at {at}");
    let bytewise: Vec<usize> = (1..=body.len()).collect();
    assert_eq!(
        whole,
        feed_body(body, limit, &bytewise),
        "fed a byte at a time"
    );
    if let Ok((decoded, _)) = &whole {
        assert!(decoded.len() <= limit);
    }
}

/// Feeds `body[..ends[0]]`, then on to each next end, as reads would deliver them; the body
/// and the bytes used, once done, or the error.
fn feed_body(body: &[u8], limit: usize, ends: &[usize]) -> Result<(Vec<u8>, usize), String> {
    let mut decoder = BodyDecoder::new(&BodyKind::Chunked, limit).map_err(|e| e.message())?;
    let mut used = 0;
    for &end in ends {
        while used < end && !decoder.is_done() {
            used += decoder.feed(&body[used..end]).map_err(|e| e.message())?;
        }
    }
    Ok(if decoder.is_done() {
        (decoder.take_body(), used)
    } else {
        (Vec::new(), usize::MAX)
    })
}

/// The frames decode to the same messages (or the same error) whether the bytes arrive at
/// once or one read at a time; a text message is UTF-8 by construction.
pub fn ws_frames(data: &[u8]) {
    const LIMIT: usize = 4096;
    let at_once = decode_all(data, &[data.len()], LIMIT);
    let bytewise: Vec<usize> = (1..=data.len()).collect();
    assert_eq!(at_once, decode_all(data, &bytewise, LIMIT));
    for message in &at_once.0 {
        if let Message::Text(text) | Message::Close(Some((_, text))) = message {
            assert!(text.len() <= LIMIT);
        }
    }
}

type Decoded = (Vec<Message>, Option<(u16, &'static str)>);

fn decode_all(data: &[u8], ends: &[usize], limit: usize) -> Decoded {
    let mut decoder = Decoder::new(limit);
    let mut messages = Vec::new();
    let mut start = 0;
    for &end in ends {
        loop {
            match decoder.decode(&data[start..end]) {
                Ok(Some((message, used))) => {
                    messages.push(message);
                    start += used;
                }
                Ok(None) => break,
                Err(error) => return (messages, Some((error.code, error.reason))),
            }
        }
    }
    (messages, None)
}

/// An accepted event keeps its bytes and groups the same every time, alone or in a bulk array.
pub fn native_event(data: &[u8]) {
    let Ok(event) = decode_event(data.to_vec()) else {
        return;
    };
    assert_eq!(
        event.json.as_bytes(),
        data,
        "a single event is stored as sent"
    );
    let again = decode_event(data.to_vec()).expect("accepted twice");
    assert_eq!(again.fingerprint, event.fingerprint);
    assert_eq!(again.title, event.title);
    let mut bulk = b"[".to_vec();
    bulk.extend_from_slice(data);
    bulk.push(b']');
    let in_bulk = decode_bulk(bulk).expect("an accepted event is accepted in an array");
    assert_eq!(in_bulk.len(), 1);
    assert_eq!(in_bulk[0].fingerprint, event.fingerprint);
    assert_eq!(in_bulk[0].title, event.title);
    assert_eq!(in_bulk[0].level, event.level);
}

/// An accepted subscribe message, sent back with its filters and resume point as shown, is the
/// same subscription.
pub fn subscribe(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(subscribe) = Subscribe::parse(text) else {
        return;
    };
    let mut echoed =
        serde_json::json!({ "type": "subscribe", "filters": subscribe.filters.shown() });
    if let Some(since) = &subscribe.since {
        echoed["since"] = serde_json::json!({ "epoch": since.epoch, "offset": since.offset });
    }
    let again = Subscribe::parse(&echoed.to_string()).expect("a shown subscription is accepted");
    assert_eq!(again.filters, subscribe.filters);
    assert_eq!(again.since, subscribe.since);
}

/// An accepted envelope, written out again with every item's length, parses to the same items.
pub fn envelope(data: &[u8]) {
    let Ok(envelope) = parse_envelope(data) else {
        return;
    };
    let mut out = b"{}\n".to_vec();
    for item in &envelope.items {
        let header = serde_json::json!({ "type": item.item_type, "length": item.payload.len() });
        out.extend_from_slice(header.to_string().as_bytes());
        out.push(b'\n');
        out.extend_from_slice(item.payload);
        out.push(b'\n');
    }
    let again = parse_envelope(&out).expect("a rewritten envelope parses");
    assert_eq!(again.items, envelope.items);
}

/// Compressed input comes back as it went in, and never more than the limit, however it is
/// made: a bomb stops at the limit. The first byte picks the encoding and the limit.
pub fn decompress(data: &[u8]) {
    let Some((&choice, payload)) = data.split_first() else {
        return;
    };
    let encoding = [
        ContentEncoding::Gzip,
        ContentEncoding::Deflate,
        ContentEncoding::Brotli,
        ContentEncoding::Zstd,
    ][choice as usize % 4];
    let limit = 1 + (choice as usize / 4) * 97;
    // The payload as a body of that encoding, arbitrary bytes included.
    if let Ok(decoded) = decode_body(encoding, payload.to_vec(), limit) {
        assert!(decoded.len() <= limit);
    }
    // The payload compressed, then decoded: all of it, or TooLarge past the limit.
    match decode_body(encoding, compress(encoding, payload), limit) {
        Ok(decoded) => assert_eq!(decoded, payload),
        Err(BodyError::TooLarge { .. }) => assert!(payload.len() > limit),
        Err(error) => panic!("{encoding:?} of {} bytes: {error}", payload.len()),
    }
}

fn compress(encoding: ContentEncoding, payload: &[u8]) -> Vec<u8> {
    match encoding {
        ContentEncoding::Gzip => {
            let mut out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            out.write_all(payload).unwrap();
            out.finish().unwrap()
        }
        ContentEncoding::Deflate => {
            let mut out = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            out.write_all(payload).unwrap();
            out.finish().unwrap()
        }
        ContentEncoding::Zstd => zstd::encode_all(payload, 1).unwrap(),
        ContentEncoding::Brotli | ContentEncoding::Identity => brotli_stored(payload),
    }
}

/// A brotli stream of uncompressed meta-blocks (the decoder only decompresses, so the
/// encoding is written here): WBITS 16, then blocks of at most 65,536 bytes, then the end.
fn brotli_stored(payload: &[u8]) -> Vec<u8> {
    let mut bits = BitWriter::default();
    bits.put(0, 1); // WBITS = 16
    for block in payload.chunks(65_536) {
        bits.put(0, 1); // ISLAST = 0
        bits.put(0, 2); // MNIBBLES = 4
        bits.put((block.len() - 1) as u64, 16); // MLEN - 1
        bits.put(1, 1); // ISUNCOMPRESSED
        bits.align();
        bits.bytes.extend_from_slice(block);
    }
    bits.put(1, 1); // ISLAST
    bits.put(1, 1); // ISLASTEMPTY
    bits.align();
    bits.bytes
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    used: u32,
}

impl BitWriter {
    fn put(&mut self, value: u64, count: u32) {
        for bit in 0..count {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let last = self.bytes.last_mut().unwrap();
            *last |= (((value >> bit) & 1) as u8) << self.used;
            self.used = (self.used + 1) % 8;
        }
    }

    fn align(&mut self) {
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every kept input of every target, through the same checks the fuzzer runs.
    #[test]
    fn every_kept_fuzz_input_passes_its_checks() {
        let corpora = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, check) in TARGETS {
            let folder = corpora.join(target);
            let mut inputs = 0;
            for entry in std::fs::read_dir(&folder).unwrap_or_else(|e| panic!("{folder:?}: {e}")) {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| check(&data));
                assert!(
                    outcome.is_ok(),
                    "{target}: {} fails its checks",
                    path.display()
                );
                inputs += 1;
            }
            assert!(inputs > 0, "{target} keeps no inputs");
        }
    }

    #[test]
    fn a_stored_brotli_stream_decodes_to_its_payload() {
        for payload in [&b""[..], b"x", &[7u8; 70_000]] {
            let decoded = decode_body(ContentEncoding::Brotli, brotli_stored(payload), 1 << 20);
            assert_eq!(decoded.unwrap(), payload);
        }
    }
}
