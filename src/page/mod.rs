//! The live page (PROTOCOL section 11): its HTML, CSS and JavaScript, built into the binary and
//! served as they are, with an ETag and a Content-Security-Policy that lets the page reach only
//! its own origin and WebSocket.

use crate::http::parse::{is_plain_host, Head};
use crate::http::response::Response;

/// One file of the page.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    /// The file's name in the path (`/app.js`); the page itself is at `/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
    /// Changes whenever the file does: a hash of its bytes, taken at build time.
    etag: u64,
}

const fn asset(name: &'static str, content_type: &'static str, body: &'static str) -> Asset {
    Asset {
        name,
        content_type,
        body,
        etag: fnv1a(body.as_bytes()),
    }
}

static ASSETS: [Asset; 3] = [
    asset("", "text/html; charset=utf-8", include_str!("index.html")),
    asset(
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("app.js"),
    ),
    asset(
        "style.css",
        "text/css; charset=utf-8",
        include_str!("style.css"),
    ),
];

/// The page's file named `name` in the path (`/index.html` is the page too).
pub fn asset_named(name: &str) -> Option<&'static Asset> {
    let name = if name == "index.html" { "" } else { name };
    ASSETS.iter().find(|asset| asset.name == name)
}

/// The file, or 304 when the browser holds this version already. Every answer says who may be
/// reached from the page: its own origin, and the stream's WebSocket on the same host.
pub fn respond(head: &Head, asset: &Asset) -> Response {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = head.header("if-none-match").is_some_and(|tags| {
        tags.split(',')
            .any(|tag| tag.trim() == etag || tag.trim() == "*")
    });
    let mut response = if fresh {
        Response::json(304, Vec::new())
    } else {
        Response::json(200, asset.body)
    };
    response.content_type = asset.content_type;
    response
        .with_header("etag", etag)
        .with_header("cache-control", "no-cache")
        .with_header("content-security-policy", policy(head.header("host")))
        .with_header("x-content-type-options", "nosniff")
        .with_header("referrer-policy", "no-referrer")
}

/// Only the page's origin; the WebSocket is named by host, since older browsers do not count
/// `ws:` to the same host as `'self'`. A Host header that is not a plain host[:port] adds nothing.
fn policy(host: Option<&str>) -> String {
    let sockets = host
        .filter(|host| is_plain_host(host))
        .map(|host| format!(" ws://{host} wss://{host}"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'{sockets}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut at = 0;
    while at < bytes.len() {
        hash ^= bytes[at] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        at += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_found_and_differs_in_etag() {
        for asset in &ASSETS {
            assert_eq!(asset_named(asset.name), Some(asset));
        }
        assert_eq!(asset_named("index.html"), asset_named(""));
        assert_eq!(asset_named("secret"), None);
        assert_ne!(ASSETS[0].etag, ASSETS[1].etag);
    }

    #[test]
    fn the_policy_names_the_socket_of_a_plain_host_only() {
        assert!(policy(Some("localhost:8080"))
            .contains("connect-src 'self' ws://localhost:8080 wss://localhost:8080;"));
        assert!(policy(Some("[::1]:80")).contains("ws://[::1]:80"));
        let injected = policy(Some("evil; script-src *"));
        assert!(injected.contains("connect-src 'self';"), "{injected}");
        assert!(!injected.contains("script-src *"));
        assert!(policy(None).contains("connect-src 'self';"));
    }
}
