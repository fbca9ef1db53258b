//! Responses: a status, a JSON body and a few headers, serialized in one buffer.

/// What the answer says about the connection after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// `connection: close`, and the server closes.
    Close,
    /// HTTP/1.1: open unless said otherwise, so nothing is written.
    KeepAlive,
    /// HTTP/1.0: closed unless said otherwise, so `connection: keep-alive` is written.
    KeepAliveAnnounced,
}

impl Persistence {
    pub fn new(keep_alive: bool, http10: bool) -> Persistence {
        match (keep_alive, http10) {
            (false, _) => Persistence::Close,
            (true, false) => Persistence::KeepAlive,
            (true, true) => Persistence::KeepAliveAnnounced,
        }
    }
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            body: body.into(),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    /// A JSON body from any serializable value.
    pub fn of<T: serde::Serialize>(status: u16, value: &T) -> Response {
        Response::json(
            status,
            serde_json::to_vec(value).expect("response values serialize"),
        )
    }

    /// `{"error": message}`, escaped so the body stays valid JSON whatever the message holds.
    pub fn error(status: u16, message: &str) -> Response {
        Response::of(status, &serde_json::json!({ "error": message }))
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// `503 {"error": message}` asking the client to come back in a second: the server is
    /// overloaded, shutting down, or its storage is not answering.
    pub fn unavailable(message: &str) -> Response {
        Response::error(503, message).with_header("retry-after", "1")
    }

    pub fn not_found() -> Response {
        Response::error(404, "not found")
    }

    /// Appends the whole response, head and body, to `out`. Written byte by byte rather than
    /// through `fmt`, which costs more than the rest of the head on the ingest path.
    pub fn write_to(&self, persistence: Persistence, out: &mut Vec<u8>) {
        self.write_head_to(persistence, out);
        out.extend_from_slice(&self.body);
    }

    /// Appends the head alone, with the length of the body a GET would get (the answer to HEAD).
    pub fn write_head_to(&self, persistence: Persistence, out: &mut Vec<u8>) {
        match status_line(self.status) {
            Some(line) => out.extend_from_slice(line.as_bytes()),
            None => {
                out.extend_from_slice(format!("HTTP/1.1 {} Unknown\r\n", self.status).as_bytes())
            }
        }
        // A 204 or a 304 has no body, and says nothing of one (RFC 9110 8.6, 15.4.5).
        if self.status != 204 && self.status != 304 {
            let mut length = itoa::Buffer::new();
            for part in [
                "content-type: ",
                self.content_type,
                "\r\ncontent-length: ",
                length.format(self.body.len()),
                "\r\n",
            ] {
                out.extend_from_slice(part.as_bytes());
            }
        }
        for (name, value) in &self.headers {
            for part in [*name, ": ", value, "\r\n"] {
                out.extend_from_slice(part.as_bytes());
            }
        }
        out.extend_from_slice(match persistence {
            Persistence::KeepAlive => b"\r\n".as_slice(),
            Persistence::KeepAliveAnnounced => b"connection: keep-alive\r\n\r\n",
            Persistence::Close => b"connection: close\r\n\r\n",
        });
    }
}

/// The status line of every status this server sends.
fn status_line(status: u16) -> Option<&'static str> {
    Some(match status {
        101 => "HTTP/1.1 101 Switching Protocols\r\n",
        200 => "HTTP/1.1 200 OK\r\n",
        201 => "HTTP/1.1 201 Created\r\n",
        202 => "HTTP/1.1 202 Accepted\r\n",
        204 => "HTTP/1.1 204 No Content\r\n",
        304 => "HTTP/1.1 304 Not Modified\r\n",
        400 => "HTTP/1.1 400 Bad Request\r\n",
        401 => "HTTP/1.1 401 Unauthorized\r\n",
        403 => "HTTP/1.1 403 Forbidden\r\n",
        404 => "HTTP/1.1 404 Not Found\r\n",
        405 => "HTTP/1.1 405 Method Not Allowed\r\n",
        408 => "HTTP/1.1 408 Request Timeout\r\n",
        409 => "HTTP/1.1 409 Conflict\r\n",
        413 => "HTTP/1.1 413 Payload Too Large\r\n",
        415 => "HTTP/1.1 415 Unsupported Media Type\r\n",
        422 => "HTTP/1.1 422 Unprocessable Content\r\n",
        429 => "HTTP/1.1 429 Too Many Requests\r\n",
        431 => "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        500 => "HTTP/1.1 500 Internal Server Error\r\n",
        501 => "HTTP/1.1 501 Not Implemented\r\n",
        503 => "HTTP/1.1 503 Service Unavailable\r\n",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_stay_valid_json() {
        let response = Response::error(400, "bad \"input\" \\ \n \u{1}");
        let parsed: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(parsed["error"], "bad \"input\" \\ \n \u{1}");
    }

    #[test]
    fn status_lines_name_their_own_code() {
        for status in (100..600).filter(|s| status_line(*s).is_some()) {
            let line = status_line(status).unwrap();
            let reason = line
                .strip_prefix(&format!("HTTP/1.1 {status} "))
                .and_then(|rest| rest.strip_suffix("\r\n"))
                .unwrap_or_else(|| panic!("{line:?}"));
            assert!(!reason.is_empty() && !reason.contains(['\r', '\n']));
        }
        let mut out = Vec::new();
        Response::json(299, "{}").write_to(Persistence::KeepAlive, &mut out);
        assert!(out.starts_with(b"HTTP/1.1 299 Unknown\r\n"));
    }

    #[test]
    fn head_carries_length_and_close() {
        let mut out = Vec::new();
        Response::json(200, "{}")
            .with_header("retry-after", "3")
            .write_to(Persistence::Close, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("content-length: 2\r\n"));
        assert!(text.contains("retry-after: 3\r\n"));
        assert!(text.ends_with("connection: close\r\n\r\n{}"));
    }

    #[test]
    fn head_only_keeps_the_length_and_http10_hears_keep_alive() {
        let mut out = Vec::new();
        Response::json(200, "{\"a\":1}").write_head_to(Persistence::KeepAliveAnnounced, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("content-length: 7\r\n"));
        assert!(text.ends_with("connection: keep-alive\r\n\r\n"));
    }
}
