//! Minimal RFC 6455 frame reader and client frame encoder.
//!
//! The reader keeps one growable buffer per connection and hands out messages as slices of it, so
//! reading a server message costs a header parse and no copy (fragmented messages are the
//! exception: they are joined in a side buffer).

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// Largest message accepted from a server. Benchmark events are a few KiB; anything near this
/// means a broken stream, and the connection is failed instead of buffering without bound.
pub const MESSAGE_BYTES_MAX: usize = 16 << 20;

/// Control frames carry at most 125 bytes of payload (RFC 6455 section 5.5).
const CONTROL_PAYLOAD_MAX: usize = 125;

/// Free space the reader offers to each `read` call; below it the buffer is compacted or grown.
const READ_SPACE_MIN: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    ReservedBits,
    UnknownOpcode(u8),
    BadControlFrame,
    TooLarge(u64),
    UnexpectedContinuation,
    ExpectedContinuation,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "websocket frame error: {self:?}")
    }
}

impl std::error::Error for FrameError {}

/// A parsed frame header.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub header_bytes: usize,
    pub payload_bytes: usize,
}

/// Parses the header at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = buf[0] & 0x0F;
    let is_control = match opcode {
        OPCODE_CONTINUATION | OPCODE_TEXT | OPCODE_BINARY => false,
        OPCODE_CLOSE | OPCODE_PING | OPCODE_PONG => true,
        other => return Err(FrameError::UnknownOpcode(other)),
    };
    let masked = buf[1] & 0x80 != 0;
    let len7 = (buf[1] & 0x7F) as usize;
    let (payload_len, mut header_bytes) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut be = [0u8; 8];
            be.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(be), 10)
        }
        short => (short as u64, 2),
    };
    if is_control && (!fin || payload_len > CONTROL_PAYLOAD_MAX as u64) {
        return Err(FrameError::BadControlFrame);
    }
    if payload_len > MESSAGE_BYTES_MAX as u64 {
        return Err(FrameError::TooLarge(payload_len));
    }
    let mask = if masked {
        if buf.len() < header_bytes + 4 {
            return Ok(None);
        }
        let key = [
            buf[header_bytes],
            buf[header_bytes + 1],
            buf[header_bytes + 2],
            buf[header_bytes + 3],
        ];
        header_bytes += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some(FrameHead {
        fin,
        opcode,
        mask,
        header_bytes,
        payload_bytes: payload_len as usize,
    }))
}

fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

/// A complete message (or control frame) borrowed from the reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The close code, if the peer sent one.
    Close(Option<u16>),
}

/// Buffers bytes read from a socket and yields whole messages.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload of a fragmented message being joined, with its opcode.
    fragments: Vec<u8>,
    fragment_opcode: Option<u8>,
    /// The last message returned was `fragments`, to be cleared on the next call.
    fragments_returned: bool,
}

impl FrameReader {
    pub fn with_capacity(capacity_bytes: usize) -> Self {
        FrameReader {
            buf: vec![0; capacity_bytes.max(READ_SPACE_MIN)],
            start: 0,
            end: 0,
            fragments: Vec::new(),
            fragment_opcode: None,
            fragments_returned: false,
        }
    }

    /// Free space to read into; compacts or grows the buffer when little is left.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < READ_SPACE_MIN {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < READ_SPACE_MIN.max(self.buf.len() / 4) {
                let grown = self.buf.len() * 2;
                self.buf.resize(grown, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of `spare()` as filled.
    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end += n;
    }

    /// Appends bytes already read elsewhere (such as those after the upgrade response).
    pub fn push(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let space = self.spare();
            let n = space.len().min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            self.filled(n);
            rest = &rest[n..];
        }
    }

    pub fn buffered_bytes(&self) -> usize {
        self.end - self.start
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message<'_>>, FrameError> {
        debug_assert!(self.start <= self.end && self.end <= self.buf.len());
        if self.fragments_returned {
            self.fragments.clear();
            self.fragment_opcode = None;
            self.fragments_returned = false;
        }
        loop {
            let head = match parse_head(&self.buf[self.start..self.end])? {
                Some(head) => head,
                None => return Ok(None),
            };
            let frame_bytes = head.header_bytes + head.payload_bytes;
            if self.end - self.start < frame_bytes {
                return Ok(None);
            }
            let payload_start = self.start + head.header_bytes;
            let payload_end = self.start + frame_bytes;
            self.start += frame_bytes;
            if let Some(key) = head.mask {
                apply_mask(&mut self.buf[payload_start..payload_end], key);
            }
            let payload = payload_start..payload_end;
            match head.opcode {
                OPCODE_PING => return Ok(Some(Message::Ping(&self.buf[payload]))),
                OPCODE_PONG => return Ok(Some(Message::Pong)),
                OPCODE_CLOSE => {
                    let body = &self.buf[payload];
                    let code = (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
                    return Ok(Some(Message::Close(code)));
                }
                OPCODE_CONTINUATION => {
                    let opcode = self
                        .fragment_opcode
                        .ok_or(FrameError::UnexpectedContinuation)?;
                    if self.fragments.len() + payload.len() > MESSAGE_BYTES_MAX {
                        return Err(FrameError::TooLarge(
                            (self.fragments.len() + payload.len()) as u64,
                        ));
                    }
                    self.fragments.extend_from_slice(&self.buf[payload]);
                    if head.fin {
                        self.fragments_returned = true;
                        return Ok(Some(data_message(opcode, &self.fragments)));
                    }
                }
                opcode => {
                    if self.fragment_opcode.is_some() {
                        return Err(FrameError::ExpectedContinuation);
                    }
                    if head.fin {
                        return Ok(Some(data_message(opcode, &self.buf[payload])));
                    }
                    self.fragment_opcode = Some(opcode);
                    self.fragments.extend_from_slice(&self.buf[payload]);
                }
            }
        }
    }
}

fn data_message(opcode: u8, payload: &[u8]) -> Message<'_> {
    if opcode == OPCODE_TEXT {
        Message::Text(payload)
    } else {
        Message::Binary(payload)
    }
}

/// Appends one masked client frame (clients must mask, RFC 6455 section 5.3).
pub fn encode_client_frame(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if len <= u16::MAX as usize {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn own(message: Message<'_>) -> Owned {
        match message {
            Message::Text(p) => Owned::Text(p.to_vec()),
            Message::Binary(p) => Owned::Binary(p.to_vec()),
            Message::Ping(p) => Owned::Ping(p.to_vec()),
            Message::Pong => Owned::Pong,
            Message::Close(code) => Owned::Close(code),
        }
    }

    fn drain(reader: &mut FrameReader, out: &mut Vec<Owned>) -> Result<(), FrameError> {
        while let Some(message) = reader.next_message()? {
            out.push(own(message));
        }
        Ok(())
    }

    fn sample_stream() -> (Vec<u8>, Vec<Owned>) {
        let long_text = vec![b'a'; 300];
        let huge_binary: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        wire.extend(server_frame(true, OPCODE_TEXT, b"{\"type\":\"event\"}"));
        wire.extend(server_frame(true, OPCODE_TEXT, b""));
        wire.extend(server_frame(true, OPCODE_TEXT, &long_text));
        wire.extend(server_frame(false, OPCODE_TEXT, b"frag"));
        wire.extend(server_frame(true, OPCODE_PING, b"hi"));
        wire.extend(server_frame(false, OPCODE_CONTINUATION, b"men"));
        wire.extend(server_frame(true, OPCODE_CONTINUATION, b"ted"));
        wire.extend(server_frame(true, OPCODE_BINARY, &huge_binary));
        wire.extend(server_frame(true, OPCODE_PONG, b""));
        wire.extend(server_frame(true, OPCODE_CLOSE, &[0x03, 0xE9, b'x']));
        let expected = vec![
            Owned::Text(b"{\"type\":\"event\"}".to_vec()),
            Owned::Text(Vec::new()),
            Owned::Text(long_text),
            Owned::Ping(b"hi".to_vec()),
            Owned::Text(b"fragmented".to_vec()),
            Owned::Binary(huge_binary),
            Owned::Pong,
            Owned::Close(Some(1001)),
        ];
        (wire, expected)
    }

    #[test]
    fn whole_stream_yields_every_message() {
        let (wire, expected) = sample_stream();
        let mut reader = FrameReader::with_capacity(64);
        reader.push(&wire);
        let mut got = Vec::new();
        drain(&mut reader, &mut got).unwrap();
        assert_eq!(got, expected);
        assert_eq!(reader.buffered_bytes(), 0);
    }

    #[test]
    fn stream_split_at_every_byte_yields_the_same_messages() {
        let (wire, expected) = sample_stream();
        for split in 0..=wire.len() {
            let mut reader = FrameReader::with_capacity(16);
            let mut got = Vec::new();
            reader.push(&wire[..split]);
            drain(&mut reader, &mut got).unwrap();
            reader.push(&wire[split..]);
            drain(&mut reader, &mut got).unwrap();
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn stream_fed_one_byte_at_a_time_through_spare() {
        let (wire, expected) = sample_stream();
        let mut reader = FrameReader::with_capacity(16);
        let mut got = Vec::new();
        for byte in &wire {
            reader.spare()[0] = *byte;
            reader.filled(1);
            drain(&mut reader, &mut got).unwrap();
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn client_frames_round_trip_through_the_reader() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut wire = Vec::new();
            encode_client_frame(OPCODE_TEXT, &payload, [1, 2, 3, 4], &mut wire);
            assert_eq!(wire[1] & 0x80, 0x80, "client frames are masked");
            let mut reader = FrameReader::with_capacity(16);
            reader.push(&wire);
            let got = own(reader.next_message().unwrap().unwrap());
            assert_eq!(got, Owned::Text(payload));
        }
    }

    #[test]
    fn garbage_is_rejected() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (vec![0xF1, 0x00], FrameError::ReservedBits),
            (vec![0x83, 0x00], FrameError::UnknownOpcode(3)),
            (vec![0x09, 0x00], FrameError::BadControlFrame),
            (vec![0x89, 126, 0, 200], FrameError::BadControlFrame),
            (
                vec![0x82, 127, 0, 0, 0, 0, 0x10, 0, 0, 0],
                FrameError::TooLarge(0x1000_0000),
            ),
            (vec![0x80, 0x00], FrameError::UnexpectedContinuation),
        ];
        for (wire, error) in cases {
            let mut reader = FrameReader::with_capacity(16);
            reader.push(&wire);
            assert_eq!(reader.next_message().unwrap_err(), error, "{wire:?}");
        }
        let mut reader = FrameReader::with_capacity(16);
        reader.push(&server_frame(false, OPCODE_TEXT, b"a"));
        reader.push(&server_frame(true, OPCODE_TEXT, b"b"));
        assert_eq!(
            reader.next_message().unwrap_err(),
            FrameError::ExpectedContinuation
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2_000 {
            let mut reader = FrameReader::with_capacity(16);
            let len = (state % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            reader.push(&bytes);
            while let Ok(Some(_)) = reader.next_message() {}
        }
    }
}
