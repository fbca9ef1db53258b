//! The route table: method and raw path to a `Route` with its path parameters and body limit.
//!
//! Routing reads the path as sent and decodes each parameter after, so an escaped `/` (`%2F`)
//! stays inside its segment instead of making a path that names another resource.

use std::borrow::Cow;

use crate::http::parse::decode_path;

/// Largest body of management and status requests: they are small JSON objects.
pub const CONTROL_BODY_BYTES_MAX: usize = 64 * 1024;
/// PROTOCOL section 4: one event.
pub const EVENT_BODY_BYTES_MAX: usize = 1024 * 1024;
/// PROTOCOL section 4: a bulk request of up to 100 events.
pub const BULK_BODY_BYTES_MAX: usize = 5 * 1024 * 1024;
/// PROTOCOL section 8: a Sentry body as sent (compressed or not), like a whole envelope.
pub const SENTRY_BODY_BYTES_MAX: usize = crate::ingest::sentry::ENVELOPE_BYTES_MAX;

/// A percent-decoded path segment (borrowed unless it had escapes).
pub type Param<'a> = Cow<'a, str>;

#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Health,
    Metrics,
    CreateProject,
    ListProjects,
    UpdateProject(Param<'a>),
    CreateKey(Param<'a>),
    RevokeKey(Param<'a>),
    Event,
    Bulk,
    IngestSocket,
    ListIssues(Param<'a>),
    GetIssue(Param<'a>),
    IssueEvents(Param<'a>),
    IssueAction(Param<'a>, &'a str),
    Stream(Param<'a>),
    /// A file of the live page.
    Page(&'static crate::page::Asset),
    /// `POST /api/:number/envelope/` (PROTOCOL 8); the parameter is the project number.
    SentryEnvelope(&'a str),
    /// `POST /api/:number/store/`.
    SentryStore(&'a str),
    /// `OPTIONS` on either, a browser's CORS preflight.
    SentryPreflight(&'a str),
}

impl Route<'_> {
    pub fn body_bytes_max(&self) -> usize {
        match self {
            Route::Event => EVENT_BODY_BYTES_MAX,
            Route::Bulk => BULK_BODY_BYTES_MAX,
            // The compressed body; what it decodes to is capped again while decoding.
            Route::SentryEnvelope(_) | Route::SentryStore(_) => SENTRY_BODY_BYTES_MAX,
            _ => CONTROL_BODY_BYTES_MAX,
        }
    }

    /// A route of the Sentry-compatible endpoints, whose every answer carries the CORS headers.
    pub fn is_sentry(&self) -> bool {
        matches!(
            self,
            Route::SentryEnvelope(_) | Route::SentryStore(_) | Route::SentryPreflight(_)
        )
    }
}

/// Why no route matched: 404 for an unknown path, 405 for a known path and another method,
/// 400 for a parameter whose escapes do not decode to UTF-8.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoute {
    NotFound,
    MethodNotAllowed(&'static str),
    BadPath,
}

impl NoRoute {
    /// A Sentry path with another method: its 405 carries the CORS headers too, so a browser
    /// SDK can read it.
    pub fn is_sentry(&self) -> bool {
        *self == NoRoute::MethodNotAllowed(SENTRY_METHODS)
    }
}

/// The methods of the Sentry paths (and only theirs).
const SENTRY_METHODS: &str = "POST, OPTIONS";

/// Segments of the longest route's path (`/api/v1/issues/:id/resolve`).
const SEGMENTS_MAX: usize = 5;

/// Routes a raw (still percent-encoded) path.
pub fn route<'a>(method: &str, path: &'a str) -> Result<Route<'a>, NoRoute> {
    // Split onto the stack: a longer path matches no route.
    // Bytes, not chars: '/' is ASCII, so every cut falls on a char boundary, and a byte loop
    // costs a fraction of `str::split` on paths this short.
    let mut segments = [""; SEGMENTS_MAX];
    let mut count = 0;
    let path = path.trim_start_matches('/');
    let mut start = 0;
    for end in path
        .bytes()
        .enumerate()
        .filter_map(|(at, byte)| (byte == b'/').then_some(at))
        .chain([path.len()])
    {
        *segments.get_mut(count).ok_or(NoRoute::NotFound)? = &path[start..end];
        count += 1;
        start = end + 1;
    }
    let param = |raw: &'a str| decode_path(raw).map_err(|_| NoRoute::BadPath);
    // (allowed methods, route for the request's method)
    let (allow, found): (&'static str, Option<Route<'a>>) = match &segments[..count] {
        [name] if crate::page::asset_named(name).is_some() => {
            let asset = crate::page::asset_named(name).expect("matched above");
            ("GET", get(method, Route::Page(asset)))
        }
        ["health"] => ("GET", get(method, Route::Health)),
        ["metrics"] => ("GET", get(method, Route::Metrics)),
        ["ingest"] => ("GET", get(method, Route::IngestSocket)),
        ["stream", "projects", p] | ["ws", "stream", "projects", p] if !p.is_empty() => {
            ("GET", get(method, Route::Stream(param(p)?)))
        }
        // Sentry SDKs post to `/api/NUMBER/envelope/` (the trailing slash is optional).
        ["api", number, kind @ ("envelope" | "store")]
        | ["api", number, kind @ ("envelope" | "store"), ""]
            if is_project_number(number) =>
        {
            let found = match (method, *kind) {
                ("POST", "envelope") => Some(Route::SentryEnvelope(number)),
                ("POST", _) => Some(Route::SentryStore(number)),
                ("OPTIONS", _) => Some(Route::SentryPreflight(number)),
                _ => None,
            };
            (SENTRY_METHODS, found)
        }
        ["api", "v1", rest @ ..] => match rest {
            ["projects"] => (
                "GET, POST",
                match method {
                    "GET" => Some(Route::ListProjects),
                    "POST" => Some(Route::CreateProject),
                    _ => None,
                },
            ),
            ["projects", p] if !p.is_empty() => (
                "PATCH",
                (method == "PATCH").then_some(Route::UpdateProject(param(p)?)),
            ),
            ["projects", p, "keys"] if !p.is_empty() => {
                ("POST", post(method, Route::CreateKey(param(p)?)))
            }
            ["projects", p, "issues"] if !p.is_empty() => {
                ("GET", get(method, Route::ListIssues(param(p)?)))
            }
            ["keys", k, "revoke"] if !k.is_empty() => {
                ("POST", post(method, Route::RevokeKey(param(k)?)))
            }
            ["events"] => ("POST", post(method, Route::Event)),
            ["events", "bulk"] => ("POST", post(method, Route::Bulk)),
            ["issues", id] if !id.is_empty() => ("GET", get(method, Route::GetIssue(param(id)?))),
            ["issues", id, "events"] if !id.is_empty() => {
                ("GET", get(method, Route::IssueEvents(param(id)?)))
            }
            ["issues", id, action @ ("resolve" | "archive" | "unresolve" | "discard")]
                if !id.is_empty() =>
            {
                ("POST", post(method, Route::IssueAction(param(id)?, action)))
            }
            _ => return Err(NoRoute::NotFound),
        },
        _ => return Err(NoRoute::NotFound),
    };
    found.ok_or(NoRoute::MethodNotAllowed(allow))
}

/// A project number as a path segment: digits only, as Sentry SDKs write it.
fn is_project_number(segment: &str) -> bool {
    !segment.is_empty() && segment.len() <= 18 && segment.bytes().all(|b| b.is_ascii_digit())
}

fn get<'a>(method: &str, route: Route<'a>) -> Option<Route<'a>> {
    (method == "GET" || method == "HEAD").then_some(route)
}

fn post<'a>(method: &str, route: Route<'a>) -> Option<Route<'a>> {
    (method == "POST").then_some(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_with_parameters() {
        assert_eq!(route("GET", "/health"), Ok(Route::Health));
        assert_eq!(
            route("POST", "/api/v1/projects/shop/keys"),
            Ok(Route::CreateKey("shop".into()))
        );
        assert_eq!(
            route("GET", "/ws/stream/projects/shop"),
            Ok(Route::Stream("shop".into()))
        );
        assert_eq!(
            route("POST", "/api/v1/issues/abc/resolve"),
            Ok(Route::IssueAction("abc".into(), "resolve"))
        );
        assert_eq!(route("POST", "/api/v1/events/bulk"), Ok(Route::Bulk));
    }

    #[test]
    fn sentry_routes_with_and_without_the_trailing_slash() {
        assert_eq!(
            route("POST", "/api/12/envelope/"),
            Ok(Route::SentryEnvelope("12"))
        );
        assert_eq!(
            route("POST", "/api/12/envelope"),
            Ok(Route::SentryEnvelope("12"))
        );
        assert_eq!(route("POST", "/api/3/store/"), Ok(Route::SentryStore("3")));
        assert_eq!(
            route("OPTIONS", "/api/3/store"),
            Ok(Route::SentryPreflight("3"))
        );
        assert_eq!(
            route("GET", "/api/3/envelope/"),
            Err(NoRoute::MethodNotAllowed("POST, OPTIONS"))
        );
        assert!(route("GET", "/api/3/store/").unwrap_err().is_sentry());
        assert!(!route("GET", "/api/v1/events").unwrap_err().is_sentry());
        assert_eq!(route("POST", "/api/x3/envelope/"), Err(NoRoute::NotFound));
        assert_eq!(route("POST", "/api//envelope/"), Err(NoRoute::NotFound));
        assert_eq!(route("POST", "/api/3/envelope//"), Err(NoRoute::NotFound));
        assert_eq!(route("POST", "/api/v1/envelope/"), Err(NoRoute::NotFound));
        assert!(route("POST", "/api/3/envelope/").unwrap().is_sentry());
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(route("GET", "/nope"), Err(NoRoute::NotFound));
        assert_eq!(
            route("GET", "/api/v1/issues/abc/explode"),
            Err(NoRoute::NotFound)
        );
        assert_eq!(
            route("GET", "/api/v1/events"),
            Err(NoRoute::MethodNotAllowed("POST"))
        );
        assert_eq!(
            route("DELETE", "/api/v1/projects"),
            Err(NoRoute::MethodNotAllowed("GET, POST"))
        );
        assert_eq!(route("GET", "/stream/projects/"), Err(NoRoute::NotFound));
        assert_eq!(
            route("POST", "/api/v1/issues/abc/resolve/more"),
            Err(NoRoute::NotFound)
        );
        assert_eq!(route("GET", "/a/b/c/d/e/f/g/h"), Err(NoRoute::NotFound));
    }

    #[test]
    fn escaped_slashes_stay_in_their_segment() {
        // `adv%2Fissues` is one project parameter, not the issue list of `adv`.
        assert_eq!(
            route("PATCH", "/api/v1/projects/adv%2Fissues"),
            Ok(Route::UpdateProject("adv/issues".into()))
        );
        assert_eq!(
            route("GET", "/api/v1/projects/adv%2Fissues"),
            Err(NoRoute::MethodNotAllowed("PATCH"))
        );
        assert_eq!(
            route("GET", "/api/v1/projects/sh%6Fp/issues"),
            Ok(Route::ListIssues("shop".into()))
        );
        assert_eq!(route("GET", "/api%2Fv1/projects"), Err(NoRoute::NotFound));
        assert_eq!(route("GET", "/api/v1/issues/%ff"), Err(NoRoute::BadPath));
        assert_eq!(route("GET", "/api/v1/issues/%zz"), Err(NoRoute::BadPath));
    }
}
