//! `Content-Encoding` of Sentry request bodies (PROTOCOL 8): identity, gzip, deflate (zlib or
//! raw), br and zstd, decoded with a cap on the decoded size that holds while decoding, so a
//! small compressed bomb costs at most the cap in memory and time.

use std::fmt;
use std::io::{self, Read};

/// Bytes the first read of a decoder may fill; the output then doubles up to the cap, so a
/// small body never costs a large buffer and a large one costs a few reallocations.
const FIRST_READ_BYTES: usize = 16 * 1024;

/// Largest zstd window accepted: 8 MiB (window log 23), the most any level up to 19 asks
/// for. zstd allocates the window a frame declares before producing output, so without this
/// bound a few bytes could claim 128 MiB or more; frames declaring more are refused.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// How brotli reads its input; the body is already in memory, so a small buffer suffices.
const BROTLI_INPUT_BUFFER_BYTES: usize = 4096;

/// A body encoding the server can decode.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ContentEncoding {
    Identity,
    Gzip,
    /// zlib-wrapped or raw deflate: clients disagree on what `deflate` means, so both are
    /// accepted, told apart by the zlib header.
    Deflate,
    Brotli,
    Zstd,
}

impl ContentEncoding {
    /// The encoding a `Content-Encoding` header names (no header: identity). Names are
    /// case-insensitive; a list of several encodings is not supported.
    pub fn from_header(value: Option<&str>) -> Result<ContentEncoding, BodyError> {
        let Some(value) = value else {
            return Ok(ContentEncoding::Identity);
        };
        let name = value.trim();
        let known = [
            ("", ContentEncoding::Identity),
            ("identity", ContentEncoding::Identity),
            ("gzip", ContentEncoding::Gzip),
            ("x-gzip", ContentEncoding::Gzip),
            ("deflate", ContentEncoding::Deflate),
            ("br", ContentEncoding::Brotli),
            ("zstd", ContentEncoding::Zstd),
        ];
        known
            .iter()
            .find(|(known_name, _)| name.eq_ignore_ascii_case(known_name))
            .map(|(_, encoding)| *encoding)
            .ok_or_else(|| BodyError::UnsupportedEncoding(name.to_owned()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ContentEncoding::Identity => "identity",
            ContentEncoding::Gzip => "gzip",
            ContentEncoding::Deflate => "deflate",
            ContentEncoding::Brotli => "br",
            ContentEncoding::Zstd => "zstd",
        }
    }
}

/// Why a body could not be decoded; each maps to its own HTTP status.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// 415: a `Content-Encoding` the server does not decode.
    UnsupportedEncoding(String),
    /// 413: the decoded body would exceed `limit_bytes`.
    TooLarge { limit_bytes: usize },
    /// 400: the body is not valid in its encoding (corrupt or truncated).
    Corrupt {
        encoding: ContentEncoding,
        detail: String,
    },
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::UnsupportedEncoding(name) => write!(
                f,
                "unsupported Content-Encoding {name:?}: expected identity, gzip, deflate, br or zstd"
            ),
            BodyError::TooLarge { limit_bytes } => {
                write!(f, "payload too large: over {limit_bytes} bytes decoded")
            }
            BodyError::Corrupt { encoding, detail } => {
                write!(f, "invalid {} body: {detail}", encoding.as_str())
            }
        }
    }
}

impl std::error::Error for BodyError {}

/// Decodes `body` into at most `limit_bytes` bytes. An identity body is returned as is, without
/// a copy.
pub fn decode_body(
    encoding: ContentEncoding,
    body: Vec<u8>,
    limit_bytes: usize,
) -> Result<Vec<u8>, BodyError> {
    let corrupt = |error: io::Error| BodyError::Corrupt {
        encoding,
        detail: error.to_string(),
    };
    let input = body.as_slice();
    match encoding {
        ContentEncoding::Identity if body.len() > limit_bytes => {
            Err(BodyError::TooLarge { limit_bytes })
        }
        ContentEncoding::Identity => Ok(body),
        ContentEncoding::Gzip => match inflate_gzip_whole(input, limit_bytes) {
            Some(decoded) => Ok(decoded),
            None => read_capped(flate2::bufread::GzDecoder::new(input), limit_bytes)
                .map_err(|error| error.into_body_error(encoding)),
        },
        ContentEncoding::Deflate if has_zlib_header(input) => {
            read_capped(flate2::bufread::ZlibDecoder::new(input), limit_bytes)
                .map_err(|error| error.into_body_error(encoding))
        }
        ContentEncoding::Deflate => {
            read_capped(flate2::bufread::DeflateDecoder::new(input), limit_bytes)
                .map_err(|error| error.into_body_error(encoding))
        }
        ContentEncoding::Brotli => read_capped(
            brotli_decompressor::Decompressor::new(input, BROTLI_INPUT_BUFFER_BYTES),
            limit_bytes,
        )
        .map_err(|error| error.into_body_error(encoding)),
        ContentEncoding::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(input).map_err(corrupt)?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(corrupt)?;
            read_capped(decoder, limit_bytes).map_err(|error| error.into_body_error(encoding))
        }
    }
}

/// A gzip body inflated in one call into a buffer of the size its trailer declares (ISIZE),
/// when that size is within `limit_bytes`: several times faster for the small bodies SDKs
/// send than a streaming inflater, which sets up its window and copies through it. The
/// buffer is never larger than the declared size, so a trailer that lies costs no more than
/// the limit; any failure here (a lying trailer, a second member, corrupt data) returns
/// `None`, and the streaming decoder decides, with its exact errors.
fn inflate_gzip_whole(input: &[u8], limit_bytes: usize) -> Option<Vec<u8>> {
    thread_local! {
        static INFLATER: std::cell::RefCell<libdeflater::Decompressor> =
            std::cell::RefCell::new(libdeflater::Decompressor::new());
    }
    let trailer: [u8; 4] = input.get(input.len().checked_sub(4)?..)?.try_into().ok()?;
    let declared_bytes = u32::from_le_bytes(trailer) as usize;
    if declared_bytes > limit_bytes {
        return None;
    }
    let mut out = vec![0; declared_bytes];
    let written = INFLATER
        .with_borrow_mut(|inflater| inflater.gzip_decompress(input, &mut out))
        .ok()?;
    (written == declared_bytes).then_some(out)
}

/// Whether `input` opens with a zlib header (RFC 1950): deflate method, a window of at most
/// 32 KiB, and the check bits that make the first two bytes a multiple of 31. Raw deflate
/// data rarely passes all three by chance.
fn has_zlib_header(input: &[u8]) -> bool {
    match input {
        [method, flags, ..] => {
            method & 0x0f == 8
                && method >> 4 <= 7
                && (u16::from(*method) << 8 | u16::from(*flags)) % 31 == 0
        }
        _ => false,
    }
}

enum ReadError {
    TooLarge { limit_bytes: usize },
    Io(io::Error),
}

impl ReadError {
    fn into_body_error(self, encoding: ContentEncoding) -> BodyError {
        match self {
            ReadError::TooLarge { limit_bytes } => BodyError::TooLarge { limit_bytes },
            ReadError::Io(error) => BodyError::Corrupt {
                encoding,
                detail: error.to_string(),
            },
        }
    }
}

/// Reads `reader` to its end into a vector that never grows past `limit_bytes + 1`: one byte
/// over the limit proves the body too large, and decoding stops right there. The output grows
/// with what was decoded, never by a size the input declares.
fn read_capped(mut reader: impl Read, limit_bytes: usize) -> Result<Vec<u8>, ReadError> {
    let cap = limit_bytes.saturating_add(1);
    let mut out = Vec::new();
    let mut filled = 0;
    loop {
        if filled == out.len() {
            if filled == cap {
                return Err(ReadError::TooLarge { limit_bytes });
            }
            let grow = out.len().max(FIRST_READ_BYTES).min(cap - out.len());
            out.reserve_exact(grow);
            out.resize(out.len() + grow, 0);
        }
        match reader.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(ReadError::Io(error)),
        }
    }
    out.truncate(filled);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const MIB: usize = 1024 * 1024;
    const GIB: u64 = 1024 * 1024 * 1024;

    /// Feeds `total` zero bytes to `encoder` in chunks, so a bomb is built in little memory.
    fn write_zeros(encoder: &mut (impl Write + ?Sized), total: u64) {
        let chunk = vec![0u8; MIB];
        let mut left = total;
        while left > 0 {
            let len = left.min(chunk.len() as u64) as usize;
            encoder.write_all(&chunk[..len]).unwrap();
            left -= len as u64;
        }
    }

    fn compress(encoding: ContentEncoding, data: &[u8]) -> Vec<u8> {
        compress_with(encoding, |encoder| encoder.write_all(data).unwrap())
    }

    fn compress_with(encoding: ContentEncoding, feed: impl FnOnce(&mut dyn Write)) -> Vec<u8> {
        // The best deflate level: faster ones stop short of deflate's ~1000:1 on zeros.
        use flate2::Compression;
        match encoding {
            ContentEncoding::Identity => {
                let mut out = Vec::new();
                feed(&mut out);
                out
            }
            ContentEncoding::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), Compression::best());
                feed(&mut encoder);
                encoder.finish().unwrap()
            }
            ContentEncoding::Deflate => {
                let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), Compression::best());
                feed(&mut encoder);
                encoder.finish().unwrap()
            }
            ContentEncoding::Brotli => {
                let mut out = Vec::new();
                {
                    let mut encoder = brotli::CompressorWriter::new(&mut out, 64 * 1024, 1, 22);
                    feed(&mut encoder);
                }
                out
            }
            ContentEncoding::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
                feed(&mut encoder);
                encoder.finish().unwrap()
            }
        }
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    const COMPRESSED: [ContentEncoding; 4] = [
        ContentEncoding::Gzip,
        ContentEncoding::Deflate,
        ContentEncoding::Brotli,
        ContentEncoding::Zstd,
    ];

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|n| format!("line {n} of the body {}\n", n % 7).into_bytes())
            .collect()
    }

    #[test]
    fn header_names_map_to_encodings() {
        let parse = |value| ContentEncoding::from_header(value);
        assert_eq!(parse(None), Ok(ContentEncoding::Identity));
        assert_eq!(parse(Some("")), Ok(ContentEncoding::Identity));
        assert_eq!(parse(Some(" GZip ")), Ok(ContentEncoding::Gzip));
        assert_eq!(parse(Some("x-gzip")), Ok(ContentEncoding::Gzip));
        assert_eq!(parse(Some("deflate")), Ok(ContentEncoding::Deflate));
        assert_eq!(parse(Some("br")), Ok(ContentEncoding::Brotli));
        assert_eq!(parse(Some("zstd")), Ok(ContentEncoding::Zstd));
        assert_eq!(parse(Some("identity")), Ok(ContentEncoding::Identity));
        for unknown in ["compress", "gzip, br", "lz4", "brotli"] {
            assert_eq!(
                parse(Some(unknown)),
                Err(BodyError::UnsupportedEncoding(unknown.to_owned()))
            );
        }
        assert!(parse(Some("lz4"))
            .unwrap_err()
            .to_string()
            .starts_with("unsupported Content-Encoding \"lz4\""));
    }

    #[test]
    fn every_encoding_round_trips() {
        let data = sample();
        for encoding in COMPRESSED {
            let body = compress(encoding, &data);
            assert!(body.len() < data.len() / 4, "{encoding:?} compresses");
            assert_eq!(decode_body(encoding, body, data.len()).unwrap(), data);
            let empty = compress(encoding, b"");
            assert_eq!(decode_body(encoding, empty, 0).unwrap(), b"");
        }
        assert_eq!(
            decode_body(ContentEncoding::Identity, data.clone(), data.len()).unwrap(),
            data
        );
        // zstd frames may follow one another; the body is all of them.
        let frames = [
            compress(ContentEncoding::Zstd, b"first "),
            compress(ContentEncoding::Zstd, b"second"),
        ]
        .concat();
        assert_eq!(
            decode_body(ContentEncoding::Zstd, frames, 100).unwrap(),
            b"first second"
        );
        let raw = raw_deflate(&data);
        assert!(!has_zlib_header(&raw));
        assert_eq!(
            decode_body(ContentEncoding::Deflate, raw, data.len()).unwrap(),
            data
        );
    }

    #[test]
    fn the_limit_is_exact() {
        let data = vec![b'x'; 100_000];
        for encoding in COMPRESSED.into_iter().chain([ContentEncoding::Identity]) {
            let body = compress(encoding, &data);
            assert_eq!(
                decode_body(encoding, body.clone(), data.len())
                    .unwrap()
                    .len(),
                data.len()
            );
            assert_eq!(
                decode_body(encoding, body, data.len() - 1),
                Err(BodyError::TooLarge {
                    limit_bytes: data.len() - 1
                }),
                "{encoding:?}"
            );
        }
        assert_eq!(
            BodyError::TooLarge { limit_bytes: 10 }.to_string(),
            "payload too large: over 10 bytes decoded"
        );
    }

    #[test]
    fn a_gibibyte_bomb_stops_at_the_limit() {
        for encoding in COMPRESSED {
            let bomb = match encoding {
                // Raw deflate: the zlib wrapper's checksum makes it several times slower to build,
                // and both share the same inflater.
                ContentEncoding::Deflate => {
                    let mut encoder =
                        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
                    write_zeros(&mut encoder, GIB);
                    encoder.finish().unwrap()
                }
                _ => compress_with(encoding, |encoder| write_zeros(encoder, GIB)),
            };
            // Compressed zeros are tiny: the attack costs the client nothing.
            assert!(bomb.len() < 2 * MIB, "{encoding:?}: {} bytes", bomb.len());
            let started = std::time::Instant::now();
            assert_eq!(
                decode_body(encoding, bomb, MIB),
                Err(BodyError::TooLarge { limit_bytes: MIB }),
                "{encoding:?}"
            );
            // Decoding stops at the limit instead of inflating the whole gibibyte (which would
            // take seconds even in a release build).
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{encoding:?} took {:?}",
                started.elapsed()
            );
        }
    }

    /// The one-call gzip inflater trusts the trailer's size only as far as the buffer it
    /// allocates: a trailer that lies either way ends in the streaming decoder's answer.
    #[test]
    fn a_gzip_trailer_that_lies_changes_no_answer() {
        let with_size = |mut body: Vec<u8>, declared: u32| {
            let at = body.len() - 4;
            body[at..].copy_from_slice(&declared.to_le_bytes());
            body
        };
        let data = b"a sentry event, compressed as sentry-python sends it ".repeat(40);
        let body = compress(ContentEncoding::Gzip, &data);
        assert_eq!(
            decode_body(ContentEncoding::Gzip, body.clone(), MIB).unwrap(),
            data
        );
        for declared in [
            0,
            10,
            data.len() as u32 - 1,
            data.len() as u32 + 1,
            MIB as u32,
        ] {
            let lying = with_size(body.clone(), declared);
            assert!(
                matches!(
                    decode_body(ContentEncoding::Gzip, lying, MIB),
                    Err(BodyError::Corrupt { .. })
                ),
                "declared {declared}"
            );
        }
        // A bomb claiming to be small: the small buffer overflows, and streaming stops it at
        // the limit.
        let bomb = compress_with(ContentEncoding::Gzip, |encoder| {
            write_zeros(encoder, 64 * MIB as u64)
        });
        assert_eq!(
            decode_body(ContentEncoding::Gzip, with_size(bomb, 100), MIB),
            Err(BodyError::TooLarge { limit_bytes: MIB })
        );
    }

    #[test]
    fn output_never_grows_past_the_cap() {
        let data = vec![7u8; 3 * MIB];
        let body = compress(ContentEncoding::Gzip, &data);
        let decoded = read_capped(flate2::read::GzDecoder::new(body.as_slice()), 3 * MIB)
            .ok()
            .unwrap();
        assert_eq!(decoded.len(), 3 * MIB);
        assert!(decoded.capacity() <= 3 * MIB + 1);
    }

    #[test]
    fn corrupt_and_truncated_bodies_are_refused() {
        let data = sample();
        for encoding in COMPRESSED {
            let body = compress(encoding, &data);
            let truncated = body[..body.len() / 2].to_vec();
            assert!(
                matches!(
                    decode_body(encoding, truncated, data.len()),
                    Err(BodyError::Corrupt { .. })
                ),
                "{encoding:?} truncated"
            );
            let mut flipped = body.clone();
            for at in (0..flipped.len()).step_by(7) {
                flipped[at] ^= 0x55;
            }
            assert!(
                matches!(
                    decode_body(encoding, flipped, data.len()),
                    Err(BodyError::Corrupt { .. })
                ),
                "{encoding:?} flipped"
            );
            let garbage = b"this is not compressed at all, just text".to_vec();
            let error = decode_body(encoding, garbage, data.len()).unwrap_err();
            assert!(matches!(error, BodyError::Corrupt { .. }), "{encoding:?}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("invalid {} body: ", encoding.as_str())),
                "{error}"
            );
        }
    }

    #[test]
    fn zstd_frames_claiming_a_huge_window_are_refused() {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.long_distance_matching(true).unwrap();
        encoder.window_log(27).unwrap();
        write_zeros(&mut encoder, 64 * 1024);
        let body = encoder.finish().unwrap();
        // A valid frame, refused only for the window it declares.
        assert_eq!(
            zstd::stream::decode_all(body.as_slice()).unwrap().len(),
            64 * 1024
        );
        assert!(matches!(
            decode_body(ContentEncoding::Zstd, body, MIB),
            Err(BodyError::Corrupt { .. })
        ));
    }

    #[test]
    fn zlib_header_detection() {
        assert!(has_zlib_header(&[0x78, 0x9c]));
        assert!(has_zlib_header(&[0x78, 0x01]));
        assert!(has_zlib_header(&[0x78, 0xda]));
        assert!(!has_zlib_header(&[0x78]));
        assert!(!has_zlib_header(&[0x78, 0x9d]));
        assert!(!has_zlib_header(&[0x89, 0x9c]));
    }
}
