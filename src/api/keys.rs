//! Where a request carries its key (PROTOCOL section 2): headers in Mesher and Sentry style,
//! or the query, which browsers must use for WebSockets.

use std::borrow::Cow;

use crate::http::parse::Head;

/// The key a request presents, from the first place that has one (PROTOCOL section 2);
/// borrowed from the head unless it had to be decoded from the query.
pub fn presented_key(head: &Head) -> Option<Cow<'_, str>> {
    if let Some(value) = head.header("authorization") {
        let value = value.trim();
        // A byte search: ' ' is ASCII, and `split_once` costs more than the rest of this.
        let key = match value.bytes().position(|byte| byte == b' ') {
            Some(space) if value[..space].eq_ignore_ascii_case("bearer") => {
                value[space + 1..].trim()
            }
            _ => value,
        };
        if !key.is_empty() {
            return Some(Cow::Borrowed(key));
        }
    }
    if let Some(value) = head.header("x-sentry-auth") {
        if let Some(key) = sentry_key(value) {
            return Some(Cow::Borrowed(key));
        }
    }
    ["key", "token", "sentry_key"]
        .iter()
        .find_map(|name| head.query_param(name).filter(|v| !v.is_empty()))
        .map(Cow::Owned)
}

/// `KEY` (Mesher style) or `Sentry sentry_key=KEY, sentry_version=7, ...` (Sentry style).
fn sentry_key(value: &str) -> Option<&str> {
    let value = value.trim();
    let Some(rest) = value
        .strip_prefix("Sentry ")
        .or_else(|| value.strip_prefix("sentry "))
    else {
        return (!value.is_empty() && !value.contains(' ')).then_some(value);
    };
    rest.split(',').find_map(|part| {
        let (name, key) = part.trim().split_once('=')?;
        (name.trim() == "sentry_key" && !key.trim().is_empty()).then(|| key.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentry_header_forms() {
        assert_eq!(sentry_key("mshr_abc"), Some("mshr_abc"));
        assert_eq!(
            sentry_key("Sentry sentry_version=7, sentry_key=mshr_abc, sentry_client=x/1"),
            Some("mshr_abc")
        );
        assert_eq!(sentry_key("Sentry sentry_version=7"), None);
        assert_eq!(sentry_key(""), None);
    }
}
