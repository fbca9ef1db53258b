//! HTTP/1.1 response parsing for keep-alive (and pipelined) publishers and admin calls.

/// Response headers larger than this mean a broken peer.
const HEADERS_BYTES_MAX: usize = 64 * 1024;
/// Headers per response the parser accepts.
const HEADERS_COUNT_MAX: usize = 48;
/// Response bodies larger than this mean a broken peer (replies here are a few hundred bytes).
const BODY_BYTES_MAX: usize = 8 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum HttpError {
    Malformed(String),
    TooLarge,
    NoLength,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Malformed(why) => write!(f, "malformed HTTP response: {why}"),
            HttpError::TooLarge => write!(f, "HTTP response too large"),
            HttpError::NoLength => write!(f, "HTTP response without length"),
        }
    }
}

impl std::error::Error for HttpError {}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Parses one response from the start of `buf`: `Ok(None)` when incomplete, else the response
/// and the bytes it took.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_COUNT_MAX];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_bytes = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > HEADERS_BYTES_MAX {
                Err(HttpError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let status = parsed.code.unwrap_or(0);
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = parsed.version == Some(0);
    for header in parsed.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse()
                .map_err(|_| HttpError::Malformed(format!("content-length {value:?}")))?;
            content_length = Some(length);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if header.name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                close = true;
            } else if value.contains("keep-alive") {
                close = false;
            }
        }
    }
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    let rest = &buf[head_bytes..];
    let (body, body_bytes) = if bodiless {
        (Vec::new(), 0)
    } else if chunked {
        match parse_chunked(rest)? {
            Some(done) => done,
            None => return Ok(None),
        }
    } else if let Some(length) = content_length {
        if length > BODY_BYTES_MAX {
            return Err(HttpError::TooLarge);
        }
        if rest.len() < length {
            return Ok(None);
        }
        (rest[..length].to_vec(), length)
    } else {
        return Err(HttpError::NoLength);
    };
    Ok(Some((
        Response {
            status,
            body,
            close,
        },
        head_bytes + body_bytes,
    )))
}

/// Decodes a chunked body: `Ok(None)` when incomplete, else the body and the bytes it took.
fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_len) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + line_len])
            .map_err(|_| HttpError::Malformed("chunk size".into()))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed(format!("chunk size {size_text:?}")))?;
        at += line_len + 2;
        if size == 0 {
            // Trailers, each ending in CRLF, then an empty line.
            loop {
                let Some(line_len) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += line_len + 2;
                if line_len == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if body.len() + size > BODY_BYTES_MAX {
            return Err(HttpError::TooLarge);
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(HttpError::Malformed("chunk without CRLF".into()));
        }
        at += size + 2;
    }
}

/// Appends a POST request with a JSON body.
pub fn push_post(out: &mut Vec<u8>, host: &str, target: &str, headers: &str, body: &[u8]) {
    push_post_with(
        out,
        host,
        target,
        headers,
        b"Content-Type: application/json\r\n",
        body,
    );
}

/// Appends a POST request whose `headers` (each line ending CRLF) say what the body is.
pub fn push_post_raw(out: &mut Vec<u8>, host: &str, target: &str, headers: &str, body: &[u8]) {
    push_post_with(out, host, target, headers, b"", body);
}

fn push_post_with(
    out: &mut Vec<u8>,
    host: &str,
    target: &str,
    headers: &str,
    content_type: &[u8],
    body: &[u8],
) {
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(headers.as_bytes());
    out.extend_from_slice(content_type);
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<Response>) {
        let mut wire = Vec::new();
        wire.extend_from_slice(
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 21\r\nContent-Type: application/json\r\n\r\n{\"status\":\"accepted\"}",
        );
        wire.extend_from_slice(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;x=y\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nTrailer: t\r\n\r\n",
        );
        wire.extend_from_slice(b"HTTP/1.1 204 No Content\r\n\r\n");
        wire.extend_from_slice(
            b"HTTP/1.1 429 Too Many\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        );
        let expected = vec![
            Response {
                status: 202,
                body: b"{\"status\":\"accepted\"}".to_vec(),
                close: false,
            },
            Response {
                status: 200,
                body: b"{\"a\":1}".to_vec(),
                close: false,
            },
            Response {
                status: 204,
                body: Vec::new(),
                close: false,
            },
            Response {
                status: 429,
                body: b"{}".to_vec(),
                close: true,
            },
        ];
        (wire, expected)
    }

    fn parse_all(mut buf: &[u8], out: &mut Vec<Response>) -> usize {
        let mut used = 0;
        while let Some((response, n)) = parse_response(buf).unwrap() {
            out.push(response);
            buf = &buf[n..];
            used += n;
        }
        used
    }

    #[test]
    fn pipelined_responses_parse_whole() {
        let (wire, expected) = sample();
        let mut got = Vec::new();
        assert_eq!(parse_all(&wire, &mut got), wire.len());
        assert_eq!(got, expected);
    }

    #[test]
    fn pipelined_responses_parse_split_at_every_byte() {
        let (wire, expected) = sample();
        for split in 0..=wire.len() {
            let mut got = Vec::new();
            let mut pending = wire[..split].to_vec();
            let used = parse_all(&pending, &mut got);
            pending.drain(..used);
            pending.extend_from_slice(&wire[split..]);
            let used = parse_all(&pending, &mut got);
            assert_eq!(used, pending.len(), "split at {split}");
            assert_eq!(got, expected, "split at {split}");
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(matches!(
            parse_response(b"NOT HTTP AT ALL\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n"),
            Err(HttpError::NoLength)
        );
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(parse_response(&vec![b'a'; HEADERS_BYTES_MAX + 1][..]).is_err());
        let mut long_head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long_head.resize(HEADERS_BYTES_MAX + 1, b'x');
        assert_eq!(parse_response(&long_head), Err(HttpError::TooLarge));
    }

    #[test]
    fn post_request_is_well_formed() {
        let mut out = Vec::new();
        push_post(
            &mut out,
            "h:1",
            "/p?x=1",
            "Authorization: Bearer k\r\n",
            b"{}",
        );
        assert_eq!(
            out,
            b"POST /p?x=1 HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }
}
