//! RFC 6455 frames on the server side, apart from any socket: [`Decoder`] turns masked client
//! frames into whole messages (reassembling fragments and enforcing the protocol rules and the
//! size limit), and the `encode_*` functions build unmasked server frames, each in one buffer of
//! exact size so it can be shared by every subscriber. Frame headers are parsed and formatted by
//! `tungstenite`.

use std::fmt;
use std::io::Cursor;

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Largest message a client may send (PROTOCOL.md section 6); a longer one closes with 1009.
pub const MESSAGE_BYTES_MAX: usize = 1 << 20;

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;
/// "Try again later": a stream client too far behind to be fed (it may resume).
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// RFC 6455 section 5.5: control frames carry at most 125 payload bytes.
const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;

/// Longest frame header: 2 bytes, an 8-byte extended length and a 4-byte mask.
const FRAME_HEADER_BYTES_MAX: usize = 14;

/// Header bytes of all frames of one fragmented message. The frames of an unfinished message stay
/// in the caller's buffer until the message completes, so without this bound endless empty
/// fragments would grow that buffer while the message stays empty. 64 KiB allows at least 4681
/// fragments; over it the connection closes with 1009.
const FRAGMENT_HEADERS_BYTES_MAX: usize = 64 * 1024;

/// Why the connection must close, as the close code and reason to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsError {
    pub code: u16,
    pub reason: &'static str,
}

impl WsError {
    const fn protocol(reason: &'static str) -> WsError {
        WsError {
            code: CLOSE_PROTOCOL_ERROR,
            reason,
        }
    }

    const fn invalid_payload(reason: &'static str) -> WsError {
        WsError {
            code: CLOSE_INVALID_PAYLOAD,
            reason,
        }
    }

    const fn too_big() -> WsError {
        WsError {
            code: CLOSE_MESSAGE_TOO_BIG,
            reason: "message too big",
        }
    }
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "websocket close {}: {}", self.code, self.reason)
    }
}

impl std::error::Error for WsError {}

/// A complete message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// The close code and reason, if the client sent any.
    Close(Option<(u16, String)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
}

/// The parts of a validated frame header the decoder needs.
struct FrameLayout {
    opcode: OpCode,
    is_final: bool,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Decodes the frames a client sends into messages.
///
/// Contract: after `Ok(None)` call again with the same buffer start and more bytes appended;
/// after `Ok(Some((message, consumed)))` drop `consumed` bytes from the front. The frames of an
/// unfinished fragmented message are taken into the decoder's message buffer at once but only
/// reported as consumed with the next message returned, so the caller's buffer must be allowed to
/// hold [`Decoder::input_bytes_max`] bytes.
#[derive(Debug)]
pub struct Decoder {
    message_bytes_max: usize,
    /// Kind of the fragmented message being reassembled, if one is open.
    fragmented: Option<DataKind>,
    /// Unmasked payload of the open fragmented message.
    message: Vec<u8>,
    /// Prefix of `message` known to be valid UTF-8 (or a valid start of it), so each text
    /// fragment is checked once when it arrives.
    utf8_checked_len: usize,
    /// Bytes at the start of the caller's buffer already taken into `message`.
    absorbed_len: usize,
    /// Header bytes of the open fragmented message's frames (see FRAGMENT_HEADERS_BYTES_MAX).
    fragment_headers_bytes: usize,
    /// The first error; the connection is closing and every later call returns it again.
    failed: Option<WsError>,
}

impl Decoder {
    pub fn new(message_bytes_max: usize) -> Decoder {
        Decoder {
            message_bytes_max,
            fragmented: None,
            message: Vec::new(),
            utf8_checked_len: 0,
            absorbed_len: 0,
            fragment_headers_bytes: 0,
            failed: None,
        }
    }

    /// Most bytes `decode` may need to see at once before it returns a message or an error: a
    /// full-size message in fragments, plus a control frame between them.
    pub fn input_bytes_max(&self) -> usize {
        self.message_bytes_max
            + FRAGMENT_HEADERS_BYTES_MAX
            + FRAME_HEADER_BYTES_MAX
            + CONTROL_PAYLOAD_BYTES_MAX
    }

    /// Decodes the next message from the start of `buf`: `Ok(None)` needs more bytes; otherwise
    /// the message and how many bytes of `buf` it used. Control frames between the fragments of
    /// a message are returned as they come.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(Message, usize)>, WsError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        assert!(
            buf.len() >= self.absorbed_len,
            "decode needs the same buffer start again after Ok(None)"
        );
        let decoded = self.decode_frames(buf);
        if let Err(error) = decoded {
            self.failed = Some(error);
        }
        self.check_invariants();
        decoded
    }

    fn decode_frames(&mut self, buf: &[u8]) -> Result<Option<(Message, usize)>, WsError> {
        loop {
            let frame_start = self.absorbed_len;
            let Some(frame) = self.parse_header(&buf[frame_start..])? else {
                return Ok(None);
            };
            let payload_start = frame_start + frame.header_len;
            let frame_end = payload_start + frame.payload_len;
            let payload = &buf[payload_start..frame_end];
            match frame.opcode {
                OpCode::Control(control) => {
                    let message = control_message(control, payload, frame.mask)?;
                    self.absorbed_len = 0;
                    return Ok(Some((message, frame_end)));
                }
                OpCode::Data(Data::Text | Data::Binary) if frame.is_final => {
                    debug_assert!(self.fragmented.is_none() && frame_start == 0);
                    let mut bytes = payload.to_vec();
                    unmask(&mut bytes, frame.mask);
                    let message = match frame.opcode {
                        OpCode::Data(Data::Text) => Message::Text(
                            String::from_utf8(bytes)
                                .map_err(|_| WsError::invalid_payload("invalid UTF-8"))?,
                        ),
                        _ => Message::Binary(bytes),
                    };
                    return Ok(Some((message, frame_end)));
                }
                OpCode::Data(data) => {
                    if data != Data::Continue {
                        self.fragmented = Some(match data {
                            Data::Text => DataKind::Text,
                            _ => DataKind::Binary,
                        });
                    }
                    self.fragment_headers_bytes += frame.header_len;
                    let start = self.message.len();
                    self.message.extend_from_slice(payload);
                    unmask(&mut self.message[start..], frame.mask);
                    if frame.is_final {
                        self.absorbed_len = 0;
                        let message = self.finish_fragmented()?;
                        return Ok(Some((message, frame_end)));
                    }
                    if self.fragmented == Some(DataKind::Text) {
                        self.check_utf8_so_far()?;
                    }
                    self.absorbed_len = frame_end;
                }
            }
        }
    }

    /// Parses and checks the frame header at the start of `bytes`; `Ok(None)` until the header
    /// and its whole payload are there. Every limit is decided here, before the payload is read.
    fn parse_header(&self, bytes: &[u8]) -> Result<Option<FrameLayout>, WsError> {
        let mut cursor = Cursor::new(bytes);
        let (header, payload_len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            // The only error a header can have at this point is a reserved opcode.
            Err(_) => return Err(WsError::protocol("unknown opcode")),
        };
        let header_len = cursor.position() as usize;
        debug_assert!(header_len <= FRAME_HEADER_BYTES_MAX);
        if payload_len > i64::MAX as u64 {
            // RFC 6455 section 5.2: the top bit of a 64-bit length must be 0. Such a length is
            // malformed, not merely large.
            return Err(WsError::protocol(
                "64-bit length with the most significant bit set",
            ));
        }
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::protocol("reserved bits set without an extension"));
        }
        let Some(mask) = header.mask else {
            return Err(WsError::protocol("client frame not masked"));
        };
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final {
                    return Err(WsError::protocol("fragmented control frame"));
                }
                if payload_len > CONTROL_PAYLOAD_BYTES_MAX as u64 {
                    return Err(WsError::protocol("control frame too long"));
                }
            }
            OpCode::Data(data) => {
                match (data, self.fragmented) {
                    (Data::Continue, None) => {
                        return Err(WsError::protocol("continuation without a message"))
                    }
                    (Data::Text | Data::Binary, Some(_)) => {
                        return Err(WsError::protocol("new message inside a fragmented one"))
                    }
                    _ => {}
                }
                let room_bytes = (self.message_bytes_max - self.message.len()) as u64;
                if payload_len > room_bytes {
                    return Err(WsError::too_big());
                }
                let fragmented = data == Data::Continue || !header.is_final;
                if fragmented
                    && self.fragment_headers_bytes + header_len > FRAGMENT_HEADERS_BYTES_MAX
                {
                    return Err(WsError::too_big());
                }
            }
        }
        // Fits in usize: bounded by the message or control frame limit above.
        let payload_len = payload_len as usize;
        if bytes.len() - header_len < payload_len {
            return Ok(None);
        }
        Ok(Some(FrameLayout {
            opcode: header.opcode,
            is_final: header.is_final,
            mask,
            header_len,
            payload_len,
        }))
    }

    /// Checks the text received so far; a sequence cut at the end may still be completed by the
    /// next fragment.
    fn check_utf8_so_far(&mut self) -> Result<(), WsError> {
        match std::str::from_utf8(&self.message[self.utf8_checked_len..]) {
            Ok(_) => self.utf8_checked_len = self.message.len(),
            Err(error) if error.error_len().is_none() => {
                self.utf8_checked_len += error.valid_up_to();
            }
            Err(_) => return Err(WsError::invalid_payload("invalid UTF-8")),
        }
        Ok(())
    }

    /// Hands out the reassembled message and resets the decoder for the next one.
    fn finish_fragmented(&mut self) -> Result<Message, WsError> {
        let kind = self
            .fragmented
            .take()
            .expect("a fragmented message is open");
        let bytes = std::mem::take(&mut self.message);
        self.utf8_checked_len = 0;
        self.fragment_headers_bytes = 0;
        match kind {
            // A second full pass over the text, but without unsafe code; fragmented messages
            // are rare.
            DataKind::Text => String::from_utf8(bytes)
                .map(Message::Text)
                .map_err(|_| WsError::invalid_payload("invalid UTF-8")),
            DataKind::Binary => Ok(Message::Binary(bytes)),
        }
    }

    fn check_invariants(&self) {
        debug_assert!(
            self.fragmented.is_some()
                || (self.message.is_empty()
                    && self.absorbed_len == 0
                    && self.fragment_headers_bytes == 0
                    && self.utf8_checked_len == 0)
        );
        debug_assert!(self.message.len() <= self.message_bytes_max);
        debug_assert!(self.utf8_checked_len <= self.message.len());
        debug_assert!(self.fragment_headers_bytes <= FRAGMENT_HEADERS_BYTES_MAX);
        debug_assert!(
            self.absorbed_len <= self.message.len() + self.fragment_headers_bytes,
            "absorbed bytes are exactly fragment headers and payloads"
        );
    }
}

fn control_message(control: Control, payload: &[u8], mask: [u8; 4]) -> Result<Message, WsError> {
    let mut bytes = payload.to_vec();
    unmask(&mut bytes, mask);
    match control {
        Control::Ping => Ok(Message::Ping(bytes)),
        Control::Pong => Ok(Message::Pong(bytes)),
        Control::Close => close_message(bytes),
        // FrameHeader::parse already refuses reserved opcodes.
        Control::Reserved(_) => Err(WsError::protocol("unknown opcode")),
    }
}

/// RFC 6455 section 5.5.1 and 7.4: empty, or a valid code followed by a UTF-8 reason.
fn close_message(mut payload: Vec<u8>) -> Result<Message, WsError> {
    match payload.len() {
        0 => Ok(Message::Close(None)),
        1 => Err(WsError::protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                return Err(WsError::protocol("invalid close code"));
            }
            payload.drain(..2);
            let reason = String::from_utf8(payload)
                .map_err(|_| WsError::invalid_payload("invalid UTF-8 in close reason"))?;
            Ok(Message::Close(Some((code, reason))))
        }
    }
}

/// XORs the client's mask over a payload, eight bytes at a time (tungstenite keeps its own
/// masking function private).
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    let mask_word = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    let mut words = payload.chunks_exact_mut(8);
    for word in &mut words {
        let masked = u64::from_ne_bytes(word.try_into().expect("chunks of eight bytes"));
        word.copy_from_slice(&(masked ^ mask_word).to_ne_bytes());
    }
    // The tail starts at a multiple of eight, so the mask starts over at its first byte.
    for (index, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[index % 4];
    }
}

/// A complete, unmasked server frame (FIN set) in a buffer of exactly its size.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    encode_frame_parts(opcode, &[payload])
}

fn encode_frame_parts(opcode: OpCode, parts: &[&[u8]]) -> Vec<u8> {
    let payload_len: usize = parts.iter().map(|part| part.len()).sum();
    debug_assert!(
        matches!(opcode, OpCode::Data(_)) || payload_len <= CONTROL_PAYLOAD_BYTES_MAX,
        "control frame payload over 125 bytes"
    );
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    let frame_len = header.len(payload_len as u64) + payload_len;
    let mut frame = Vec::with_capacity(frame_len);
    header
        .format(payload_len as u64, &mut frame)
        .expect("writing to a Vec cannot fail");
    for part in parts {
        frame.extend_from_slice(part);
    }
    debug_assert_eq!(frame.len(), frame_len);
    frame
}

/// A text frame; `payload` must be UTF-8 (it is usually JSON the server built).
pub fn encode_text(payload: &[u8]) -> Vec<u8> {
    debug_assert!(std::str::from_utf8(payload).is_ok());
    encode_frame(OpCode::Data(Data::Text), payload)
}

/// A text frame of the parts in order, written in one allocation; together they must be UTF-8.
pub fn encode_text_parts(parts: &[&[u8]]) -> Vec<u8> {
    encode_frame_parts(OpCode::Data(Data::Text), parts)
}

/// A close frame; the reason is cut (at a character boundary) to fit a control frame.
pub fn encode_close(code: u16, reason: &str) -> Vec<u8> {
    let mut reason_len = reason.len().min(CONTROL_PAYLOAD_BYTES_MAX - 2);
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    encode_frame_parts(
        OpCode::Control(Control::Close),
        &[&code.to_be_bytes(), &reason.as_bytes()[..reason_len]],
    )
}

/// A ping frame; a payload over 125 bytes is a caller's bug and is cut in release builds.
pub fn encode_ping(payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= CONTROL_PAYLOAD_BYTES_MAX);
    let payload = &payload[..payload.len().min(CONTROL_PAYLOAD_BYTES_MAX)];
    encode_frame(OpCode::Control(Control::Ping), payload)
}

/// A pong frame; a payload over 125 bytes is a caller's bug and is cut in release builds.
pub fn encode_pong(payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= CONTROL_PAYLOAD_BYTES_MAX);
    let payload = &payload[..payload.len().min(CONTROL_PAYLOAD_BYTES_MAX)];
    encode_frame(OpCode::Control(Control::Pong), payload)
}

/// Whether a `Sec-WebSocket-Key` is the base64 of 16 bytes (RFC 6455 section 4.2.1): 22
/// base64 characters and `==`, as every such key is written.
pub fn is_valid_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    bytes.len() == 24
        && bytes.ends_with(b"==")
        && bytes[..22]
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/'))
}

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(sec_websocket_key: &str) -> String {
    tungstenite::handshake::derive_accept_key(sec_websocket_key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::Frame;
    use tungstenite::Bytes;

    const CONTINUE: u8 = 0;
    const TEXT: u8 = 1;
    const BINARY: u8 = 2;
    const CLOSE: u8 = 8;
    const PING: u8 = 9;
    const PONG: u8 = 10;
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A frame with every header field chosen, built and masked by tungstenite.
    fn raw_frame(
        opcode: u8,
        is_final: bool,
        payload: &[u8],
        mask: Option<[u8; 4]>,
        rsv: [bool; 3],
    ) -> Vec<u8> {
        let header = FrameHeader {
            is_final,
            rsv1: rsv[0],
            rsv2: rsv[1],
            rsv3: rsv[2],
            opcode: OpCode::from(opcode),
            mask,
        };
        let mut frame = Vec::new();
        Frame::from_payload(header, Bytes::copy_from_slice(payload))
            .format(&mut frame)
            .unwrap();
        frame
    }

    #[test]
    fn keys_must_be_base64_of_16_bytes() {
        assert!(is_valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_valid_key("AAAAAAAAAAAAAAAAAAAAAA=="));
        assert!(is_valid_key("+/+/+/+/+/+/+/+/+/+/+w=="));
        for bad in [
            "",
            "x",
            "not-base64-at-all!!!!!==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZQ===",
            // 17 and 15 bytes
            "dGhlIHNhbXBsZSBub25jZQ1=",
            "dGhlIHNhbXBsZSBub25j",
            "dGhlIHNhbXBsZSBub25j ZQ==",
            "dGhlIHNhbXBsZSBub25jZ===",
        ] {
            assert!(!is_valid_key(bad), "{bad:?}");
        }
    }

    fn client_frame(opcode: u8, is_final: bool, payload: &[u8]) -> Vec<u8> {
        raw_frame(opcode, is_final, payload, Some(MASK), [false; 3])
    }

    fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        client_frame(CLOSE, true, &payload)
    }

    fn protocol_error(reason: &'static str) -> WsError {
        WsError::protocol(reason)
    }

    struct Decoded {
        messages: Vec<Message>,
        error: Option<WsError>,
        pending_len: usize,
    }

    /// Feeds `pieces` in order as a socket would (unconsumed bytes are kept and passed again)
    /// and collects messages until the first error.
    fn decode_pieces(message_bytes_max: usize, pieces: &[&[u8]]) -> Decoded {
        let mut decoder = Decoder::new(message_bytes_max);
        let mut pending = Vec::new();
        let mut messages = Vec::new();
        for piece in pieces {
            pending.extend_from_slice(piece);
            loop {
                match decoder.decode(&pending) {
                    Ok(Some((message, used))) => {
                        assert!(used > 0 && used <= pending.len());
                        pending.drain(..used);
                        messages.push(message);
                    }
                    Ok(None) => {
                        assert!(
                            pending.len() < decoder.input_bytes_max(),
                            "waits for more than input_bytes_max"
                        );
                        break;
                    }
                    Err(error) => {
                        // The decoder stays failed.
                        assert_eq!(decoder.decode(&pending), Err(error));
                        return Decoded {
                            messages,
                            error: Some(error),
                            pending_len: pending.len(),
                        };
                    }
                }
            }
        }
        Decoded {
            messages,
            error: None,
            pending_len: pending.len(),
        }
    }

    /// Decodes `input` whole, split in two at every byte, and byte by byte; every way must give
    /// the same messages and the same error.
    fn assert_decodes_at_every_split(
        input: &[u8],
        expected: &[Message],
        expected_error: Option<WsError>,
    ) {
        let check = |decoded: Decoded, how: &str| {
            assert_eq!(decoded.messages, expected, "{how}");
            assert_eq!(decoded.error, expected_error, "{how}");
            if expected_error.is_none() {
                assert_eq!(decoded.pending_len, 0, "{how}");
            }
        };
        check(decode_pieces(MESSAGE_BYTES_MAX, &[input]), "whole");
        for split in 0..=input.len() {
            let (first, second) = input.split_at(split);
            check(
                decode_pieces(MESSAGE_BYTES_MAX, &[first, second]),
                &format!("split at {split}"),
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        check(decode_pieces(MESSAGE_BYTES_MAX, &bytes), "byte by byte");
    }

    fn decode_one(input: &[u8]) -> Result<Option<(Message, usize)>, WsError> {
        Decoder::new(MESSAGE_BYTES_MAX).decode(input)
    }

    /// Deterministic pseudo-random numbers (xorshift), so garbage tests are repeatable.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| (self.next() >> 24) as u8).collect()
        }
    }

    #[test]
    fn rfc_masked_hello_whole_and_every_prefix() {
        // RFC 6455 section 5.7: a single-frame masked text message "Hello".
        let input = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        for split in 0..input.len() {
            assert_eq!(decode_one(&input[..split]), Ok(None), "prefix {split}");
        }
        assert_eq!(
            decode_one(&input),
            Ok(Some((Message::Text("Hello".into()), input.len())))
        );
        assert_eq!(client_frame(TEXT, true, b"Hello"), input);
    }

    #[test]
    fn round_trips_across_length_encodings() {
        for len in [0, 1, 7, 8, 9, 125, 126, 127, 1000, 65535, 65536, 70001] {
            let text: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let binary: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut cases = vec![
                (
                    client_frame(TEXT, true, text.as_bytes()),
                    Message::Text(text),
                ),
                (
                    client_frame(BINARY, true, &binary),
                    Message::Binary(binary.clone()),
                ),
            ];
            if len <= CONTROL_PAYLOAD_BYTES_MAX {
                cases.push((
                    client_frame(PING, true, &binary),
                    Message::Ping(binary.clone()),
                ));
                cases.push((client_frame(PONG, true, &binary), Message::Pong(binary)));
            }
            for (frame, message) in cases {
                assert_eq!(
                    decode_one(&frame),
                    Ok(Some((message.clone(), frame.len()))),
                    "len {len}"
                );
                // Every prefix up to the end of the longest header, and the one just short.
                for split in (0..frame.len().min(20)).chain([frame.len() - 1]) {
                    if split < frame.len() {
                        assert_eq!(decode_one(&frame[..split]), Ok(None), "len {len}");
                    }
                }
                if len <= 300 {
                    assert_decodes_at_every_split(&frame, &[message], None);
                }
            }
        }
    }

    #[test]
    fn unmask_matches_tungstenite_at_every_length_and_mask() {
        let masks = [[0, 0, 0, 0], [0xff, 0x00, 0xaa, 0x55], [1, 2, 3, 4], MASK];
        for mask in masks {
            for len in 0..40 {
                let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 5) as u8).collect();
                let frame = raw_frame(BINARY, true, &payload, Some(mask), [false; 3]);
                let decoded = decode_one(&frame).unwrap().unwrap().0;
                assert_eq!(decoded, Message::Binary(payload), "mask {mask:?} len {len}");
            }
        }
    }

    #[test]
    fn several_messages_in_one_buffer() {
        let mut input = client_frame(TEXT, true, b"one");
        input.extend(client_frame(BINARY, true, &[1, 2, 3]));
        input.extend(close_frame(1000, b"bye"));
        let expected = [
            Message::Text("one".into()),
            Message::Binary(vec![1, 2, 3]),
            Message::Close(Some((1000, "bye".into()))),
        ];
        assert_decodes_at_every_split(&input, &expected, None);
    }

    #[test]
    fn fragmented_messages_with_interleaved_control_frames() {
        let mut input = client_frame(TEXT, false, "Hé".as_bytes());
        input.extend(client_frame(PING, true, b"p1"));
        input.extend(client_frame(CONTINUE, false, b"llo "));
        input.extend(client_frame(PONG, true, b""));
        input.extend(client_frame(CONTINUE, false, b""));
        input.extend(client_frame(CONTINUE, true, b"world"));
        input.extend(client_frame(BINARY, false, &[0, 1]));
        input.extend(client_frame(CONTINUE, true, &[2, 255]));
        input.extend(client_frame(TEXT, true, b"after"));
        let expected = [
            Message::Ping(b"p1".to_vec()),
            Message::Pong(Vec::new()),
            Message::Text("Héllo world".into()),
            Message::Binary(vec![0, 1, 2, 255]),
            Message::Text("after".into()),
        ];
        assert_decodes_at_every_split(&input, &expected, None);
    }

    #[test]
    fn consumed_counts_cover_fragments_taken_before_a_control_frame() {
        let first = client_frame(TEXT, false, b"ab");
        let ping = client_frame(PING, true, b"x");
        let last = client_frame(CONTINUE, true, b"cd");
        let mut decoder = Decoder::new(MESSAGE_BYTES_MAX);
        assert_eq!(decoder.decode(&first), Ok(None));
        let mut input = [first.clone(), ping.clone(), last.clone()].concat();
        assert_eq!(
            decoder.decode(&input),
            Ok(Some((
                Message::Ping(b"x".to_vec()),
                first.len() + ping.len()
            )))
        );
        input.drain(..first.len() + ping.len());
        assert_eq!(
            decoder.decode(&input),
            Ok(Some((Message::Text("abcd".into()), last.len())))
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted() {
        // "€" is E2 82 AC; cut it after every byte.
        let text = "a€b";
        for cut in 1..text.len() {
            let mut input = client_frame(TEXT, false, &text.as_bytes()[..cut]);
            input.extend(client_frame(CONTINUE, true, &text.as_bytes()[cut..]));
            assert_decodes_at_every_split(&input, &[Message::Text(text.into())], None);
        }
    }

    #[test]
    fn invalid_utf8_closes_with_1007() {
        let invalid = WsError::invalid_payload("invalid UTF-8");
        for bytes in [
            &b"\xff"[..],
            b"ok\xc3",
            b"\xed\xa0\x80",
            b"\xc0\xaf",
            b"\xf4\x90\x80\x80",
        ] {
            assert_eq!(decode_one(&client_frame(TEXT, true, bytes)), Err(invalid));
        }
        // Found in the first fragment, before the message is complete.
        let first = client_frame(TEXT, false, b"ab\xff");
        assert_eq!(decode_one(&first), Err(invalid));
        // A sequence left unfinished by the final fragment.
        let mut input = client_frame(TEXT, false, b"ab\xe2\x82");
        input.extend(client_frame(CONTINUE, true, b""));
        assert_decodes_at_every_split(&input, &[], Some(invalid));
        // A sequence broken by the next fragment.
        let mut input = client_frame(TEXT, false, b"ab\xe2");
        input.extend(client_frame(CONTINUE, false, b"a"));
        assert_decodes_at_every_split(&input, &[], Some(invalid));
        // Binary messages carry any bytes.
        assert_eq!(
            decode_one(&client_frame(BINARY, true, b"\xff"))
                .unwrap()
                .unwrap()
                .0,
            Message::Binary(vec![0xff])
        );
    }

    #[test]
    fn close_payloads() {
        assert_eq!(
            decode_one(&client_frame(CLOSE, true, b""))
                .unwrap()
                .unwrap()
                .0,
            Message::Close(None)
        );
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000,
            4999,
        ] {
            assert_eq!(
                decode_one(&close_frame(code, "done é".as_bytes()))
                    .unwrap()
                    .unwrap()
                    .0,
                Message::Close(Some((code, "done é".into()))),
                "code {code}"
            );
        }
        let invalid_code = protocol_error("invalid close code");
        for code in [
            0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65535,
        ] {
            assert_eq!(
                decode_one(&close_frame(code, b"")),
                Err(invalid_code),
                "code {code}"
            );
        }
        assert_eq!(
            decode_one(&client_frame(CLOSE, true, &[0x03])),
            Err(protocol_error("close payload of one byte"))
        );
        assert_eq!(
            decode_one(&close_frame(1000, b"bad \xff")),
            Err(WsError::invalid_payload("invalid UTF-8 in close reason"))
        );
    }

    #[test]
    fn protocol_errors_close_with_1002() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                raw_frame(TEXT, true, b"hi", None, [false; 3]),
                "client frame not masked",
            ),
            (
                raw_frame(TEXT, true, b"hi", Some(MASK), [true, false, false]),
                "reserved bits set without an extension",
            ),
            (
                raw_frame(TEXT, true, b"hi", Some(MASK), [false, true, false]),
                "reserved bits set without an extension",
            ),
            (
                raw_frame(PING, true, b"", Some(MASK), [false, false, true]),
                "reserved bits set without an extension",
            ),
            (client_frame(PING, false, b"x"), "fragmented control frame"),
            (client_frame(CLOSE, false, b""), "fragmented control frame"),
            (
                client_frame(PING, true, &[0; 126]),
                "control frame too long",
            ),
            (
                client_frame(CONTINUE, true, b"x"),
                "continuation without a message",
            ),
            (
                client_frame(CONTINUE, false, b"x"),
                "continuation without a message",
            ),
            (
                [
                    client_frame(TEXT, false, b"a"),
                    client_frame(TEXT, true, b"b"),
                ]
                .concat(),
                "new message inside a fragmented one",
            ),
            (
                [
                    client_frame(BINARY, false, b"a"),
                    client_frame(TEXT, false, b"b"),
                ]
                .concat(),
                "new message inside a fragmented one",
            ),
            (
                encode_text(b"server frames are unmasked"),
                "client frame not masked",
            ),
        ];
        for (input, reason) in cases {
            assert_decodes_at_every_split(&input, &[], Some(protocol_error(reason)));
        }
        for opcode in (3..=7).chain(11..=15) {
            let input = client_frame(opcode, true, b"x");
            assert_decodes_at_every_split(&input, &[], Some(protocol_error("unknown opcode")));
        }
    }

    #[test]
    fn errors_are_decided_from_the_header_alone() {
        // A 126-byte ping: the 2-byte header and the mask are enough.
        let ping = client_frame(PING, true, &[0; 126]);
        assert_eq!(
            decode_one(&ping[..8]),
            Err(protocol_error("control frame too long"))
        );
        // A frame claiming 2^63 + 1 bytes: the top bit of a 64-bit length must be 0.
        let mut malformed = vec![0x82, 0xff];
        malformed.extend_from_slice(&(1u64 << 63 | 1).to_be_bytes());
        malformed.extend_from_slice(&MASK);
        assert_eq!(
            decode_one(&malformed),
            Err(protocol_error(
                "64-bit length with the most significant bit set"
            ))
        );
        // The largest well-formed length is only too big.
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
        huge.extend_from_slice(&MASK);
        assert_eq!(decode_one(&huge), Err(WsError::too_big()));
        // One byte over the message limit.
        let mut over = vec![0x81, 0xff];
        over.extend_from_slice(&(MESSAGE_BYTES_MAX as u64 + 1).to_be_bytes());
        over.extend_from_slice(&MASK);
        assert_eq!(decode_one(&over), Err(WsError::too_big()));
        assert_eq!(decode_one(&over[..13]), Ok(None));
    }

    #[test]
    fn message_size_limit() {
        let limit_bytes = 16;
        let decode_small = |input: &[u8]| Decoder::new(limit_bytes).decode(input);
        let at_limit = client_frame(BINARY, true, &[1; 16]);
        assert_eq!(
            decode_small(&at_limit),
            Ok(Some((Message::Binary(vec![1; 16]), at_limit.len())))
        );
        let over = client_frame(BINARY, true, &[1; 17]);
        assert_eq!(decode_small(&over[..6]), Err(WsError::too_big()));
        // Across fragments, decided at the header of the fragment that passes the limit.
        let mut fragmented = client_frame(TEXT, false, &[b'a'; 10]);
        fragmented.extend(client_frame(PING, true, b""));
        fragmented.extend(client_frame(CONTINUE, false, &[b'b'; 6]));
        let fragments_len = fragmented.len();
        fragmented.extend(client_frame(CONTINUE, true, b"c"));
        let decoded = decode_pieces(limit_bytes, &[&fragmented[..fragments_len + 6]]);
        assert_eq!(decoded.messages, [Message::Ping(Vec::new())]);
        assert_eq!(decoded.error, Some(WsError::too_big()));
        // The full-size message of the server's limit.
        let full = client_frame(BINARY, true, &vec![9; MESSAGE_BYTES_MAX]);
        assert_eq!(
            decode_one(&full),
            Ok(Some((
                Message::Binary(vec![9; MESSAGE_BYTES_MAX]),
                full.len()
            )))
        );
    }

    #[test]
    fn endless_empty_fragments_are_bounded() {
        // Empty masked frames have 6-byte headers.
        let fragments_max = FRAGMENT_HEADERS_BYTES_MAX / 6;
        let stream = |fragments: usize| -> Vec<u8> {
            let mut input = client_frame(TEXT, false, b"");
            for _ in 2..fragments {
                input.extend(client_frame(CONTINUE, false, b""));
            }
            input.extend(client_frame(CONTINUE, true, b""));
            input
        };
        let at_limit = decode_pieces(16, &[&stream(fragments_max)]);
        assert_eq!(at_limit.messages, [Message::Text(String::new())]);
        assert_eq!(at_limit.error, None);
        let over = decode_pieces(16, &[&stream(fragments_max + 1)]);
        assert_eq!(over.messages, []);
        assert_eq!(over.error, Some(WsError::too_big()));
        assert!(over.pending_len < Decoder::new(16).input_bytes_max());
    }

    #[test]
    fn garbage_never_panics_and_whole_equals_byte_by_byte() {
        let mut noise = Noise(0x2545_f491_4f6c_dd1d);
        let allowed_codes = [
            CLOSE_PROTOCOL_ERROR,
            CLOSE_INVALID_PAYLOAD,
            CLOSE_MESSAGE_TOO_BIG,
        ];
        let mut messages_total = 0;
        let mut rounds_failed = 0;
        for round in 0..1500 {
            let input = if round % 3 == 0 {
                let len = noise.below(200) as usize;
                noise.bytes(len)
            } else {
                // Mostly valid frame sequences with occasional faults reach deeper into the
                // decoder than plain noise.
                let mut input = Vec::new();
                let mut fragmented_open = false;
                for _ in 0..noise.below(8) + 1 {
                    let control = [PING, PONG, CLOSE][noise.below(3) as usize];
                    let (opcode, is_final) = if noise.below(20) == 0 {
                        (noise.below(16) as u8, noise.below(2) == 0)
                    } else if noise.below(10) < 3 {
                        (control, true)
                    } else if fragmented_open {
                        (CONTINUE, noise.below(2) == 0)
                    } else {
                        ([TEXT, BINARY][noise.below(2) as usize], noise.below(5) < 3)
                    };
                    if opcode <= BINARY {
                        fragmented_open = !is_final;
                    }
                    let len = match noise.below(15) {
                        0 => 126 + noise.below(200),
                        _ => noise.below(12),
                    } as usize;
                    let payload = match (opcode, noise.below(4)) {
                        (CLOSE, _) => [&1000u16.to_be_bytes()[..], b"bye"].concat(),
                        (_, 0) => noise.bytes(len),
                        _ => "aé€".repeat(len / 6 + 1).as_bytes()[..len].to_vec(),
                    };
                    let mask = (noise.below(40) != 0).then_some(MASK);
                    let rsv = [noise.below(40) == 0, false, false];
                    input.extend(raw_frame(opcode, is_final, &payload, mask, rsv));
                }
                input
            };
            let whole = decode_pieces(64, &[&input]);
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let byte_by_byte = decode_pieces(64, &bytes);
            assert_eq!(whole.messages, byte_by_byte.messages, "round {round}");
            assert_eq!(whole.error, byte_by_byte.error, "round {round}");
            if let Some(error) = whole.error {
                assert!(allowed_codes.contains(&error.code), "{error:?}");
                rounds_failed += 1;
            }
            messages_total += whole.messages.len();
        }
        // The mix exercises both paths: messages come out and errors are found.
        assert!(messages_total > 1000, "{messages_total} messages");
        assert!(rounds_failed > 500, "{rounds_failed} rounds failed");
    }

    #[test]
    fn encoded_frames_parse_back_with_exact_capacity() {
        for len in [0, 1, 125, 126, 65535, 65536, 70001] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let frame = encode_text(&payload);
            assert_eq!(frame.len(), frame.capacity(), "len {len}");
            let mut cursor = Cursor::new(&frame);
            let (header, payload_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final && header.mask.is_none());
            assert!(!header.rsv1 && !header.rsv2 && !header.rsv3);
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert_eq!(payload_len, len as u64);
            assert_eq!(&frame[cursor.position() as usize..], &payload[..]);
        }
        // RFC 6455 section 5.7 examples.
        assert_eq!(encode_text(b"Hello"), b"\x81\x05Hello");
        assert_eq!(encode_ping(b"Hello"), b"\x89\x05Hello");
        assert_eq!(encode_pong(b"Hello"), b"\x8a\x05Hello");
        let binary = encode_frame(OpCode::Data(Data::Binary), &[0; 256]);
        assert_eq!(&binary[..4], &[0x82, 0x7e, 0x01, 0x00]);
        let binary = encode_frame(OpCode::Data(Data::Binary), &[0; 65536]);
        assert_eq!(&binary[..10], &[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn close_frames() {
        assert_eq!(encode_close(1000, "bye"), b"\x88\x05\x03\xe8bye");
        assert_eq!(encode_close(1009, ""), b"\x88\x02\x03\xf1");
        let long_reason = "é".repeat(100);
        let frame = encode_close(1001, &long_reason);
        assert_eq!(frame.len(), frame.capacity());
        let payload = &frame[2..];
        assert_eq!(frame[1] as usize, payload.len());
        // 123 bytes of reason would split an "é"; the cut keeps whole characters.
        assert_eq!(payload.len(), 2 + 122);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
