//! Responses: a status, a JSON body and a few headers, serialized in one buffer.

use std::fmt::Write;

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

    pub fn not_found() -> Response {
        Response::error(404, "not found")
    }

    /// Appends the whole response, head and body, to `out`.
    pub fn write_to(&self, keep_alive: bool, out: &mut Vec<u8>) {
        let mut head = String::with_capacity(128);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str(if keep_alive {
            "\r\n"
        } else {
            "connection: close\r\n\r\n"
        });
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.body);
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
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
    fn head_carries_length_and_close() {
        let mut out = Vec::new();
        Response::json(200, "{}")
            .with_header("retry-after", "3")
            .write_to(false, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("content-length: 2\r\n"));
        assert!(text.contains("retry-after: 3\r\n"));
        assert!(text.ends_with("connection: close\r\n\r\n{}"));
    }
}
