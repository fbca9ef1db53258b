//! Sentry envelopes as sentry-python 2.x sends them without the `brotli` package: one `event`
//! item holding a Python exception event (~4 KB of JSON), the whole envelope gzip-compressed,
//! posted to `/api/NUMBER/envelope/` with `X-Sentry-Auth`, the route taken from a DSN.
//!
//! Compressing every envelope at level 9 would cost the load generator more CPU than the server
//! spends on it, so the fixed part of each event (item header, exception, frames, contexts) is
//! compressed once per template, and the few fields that change per envelope (event id, times)
//! travel as stored deflate blocks before and after it. The body is one valid gzip member that
//! any inflater reads as a whole; its decompressed bytes are what the SDK would send.

use std::io::Write;

use flate2::write::DeflateEncoder;
use flate2::Compression;
use serde_json::json;

/// The SDK the envelopes claim to come from.
pub const SDK_NAME: &str = "sentry.python";
pub const SDK_VERSION: &str = "2.76.0";
/// Distinct exceptions (so distinct issues) the envelopes cycle through.
pub const TEMPLATES: usize = 4;
/// gzip member header: magic, deflate, no flags, no mtime, best compression, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 0xff];
/// A fixed trace id and public key in every envelope header, as one SDK process sends.
const TRACE_ID: &str = "771a43a4192642f0b136d5159a501700";

/// Where and how envelopes of one project are posted, read from its DSN
/// (`http://KEY@HOST/NUMBER`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dsn {
    pub key: String,
    pub host: String,
    pub number: String,
}

impl Dsn {
    pub fn parse(dsn: &str) -> Result<Dsn, String> {
        let bad = || format!("not a DSN (http://KEY@HOST/NUMBER): {dsn}");
        let (_scheme, rest) = dsn.split_once("://").ok_or_else(bad)?;
        let (key, rest) = rest.split_once('@').ok_or_else(bad)?;
        let key = key.split(':').next().unwrap_or("");
        let (host, path) = rest.split_once('/').ok_or_else(bad)?;
        let number = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        if key.is_empty() || host.is_empty() || number.is_empty() {
            return Err(bad());
        }
        Ok(Dsn {
            key: key.to_string(),
            host: host.to_string(),
            number: number.to_string(),
        })
    }

    /// The envelope endpoint of the DSN's project.
    pub fn envelope_path(&self) -> String {
        format!("/api/{}/envelope/", self.number)
    }

    /// The headers sentry-python sends besides Host and Content-Length, each line ending CRLF.
    pub fn headers(&self) -> String {
        format!(
            "User-Agent: {SDK_NAME}/{SDK_VERSION}\r\n\
             X-Sentry-Auth: Sentry sentry_key={}, sentry_version=7, sentry_client={SDK_NAME}/{SDK_VERSION}\r\n\
             Content-Type: application/x-sentry-envelope\r\n\
             Content-Encoding: gzip\r\n",
            self.key
        )
    }
}

/// One exception event with its fixed part compressed.
struct Template {
    /// Item header line and the event JSON up to its per-envelope fields, raw deflate at level
    /// 9, sync-flushed (byte-aligned, not final).
    deflated: Vec<u8>,
    /// The same bytes uncompressed (for the CRC and size of the gzip trailer).
    plain: Vec<u8>,
}

/// Builds gzip-compressed envelopes for one run.
pub struct Envelopes {
    templates: Vec<Template>,
    /// Per-run prefix of every event id (16 hex digits), so that ids never repeat across runs.
    run_prefix: u64,
    public_key: String,
    environment: &'static str,
}

/// The fixed-size tail of each event JSON: its id and time.
fn event_tail(event_id: &str, timestamp: &str) -> String {
    format!("\"event_id\":\"{event_id}\",\"timestamp\":\"{timestamp}\"}}\n")
}

/// RFC 3339 UTC with microseconds, as sentry-python writes `timestamp` and `sent_at`.
pub fn rfc3339_us(unix_us: u64) -> String {
    let secs = unix_us / 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_us % 1_000_000
    )
}

/// The event of template `index` without its id and time: a `ZeroDivisionError`-like exception
/// raised three frames deep in a web handler, with the contexts, tags, breadcrumbs and SDK
/// fields sentry-python adds.
fn event_body(index: usize, environment: &str) -> serde_json::Value {
    let (kind, value, function) = [
        ("ZeroDivisionError", "division by zero", "average_basket"),
        ("KeyError", "'customer_id'", "load_customer"),
        (
            "ValueError",
            "invalid literal for int() with base 10: 'abc'",
            "parse_quantity",
        ),
        (
            "AttributeError",
            "'NoneType' object has no attribute 'price'",
            "line_total",
        ),
    ][index % TEMPLATES];
    let frame = |filename: &str, module: &str, function: &str, lineno: u32, in_app: bool| {
        json!({
            "filename": filename,
            "abs_path": format!("/srv/shop/{filename}"),
            "function": function,
            "module": module,
            "lineno": lineno,
            "pre_context": [
                "",
                format!("def {function}(request, order_id):"),
                "    order = Order.objects.get(pk=order_id)",
                "    items = list(order.items.select_related(\"product\"))"
            ],
            "context_line": "    return sum(i.price * i.quantity for i in items) / len(items)",
            "post_context": ["", "", "@login_required"],
            "vars": {
                "request": "<WSGIRequest: GET '/orders/1234/summary'>",
                "order_id": "'1234'",
                "order": "<Order: Order object (1234)>",
                "items": "[]"
            },
            "in_app": in_app
        })
    };
    let frames = vec![
        frame(
            "django/core/handlers/base.py",
            "django.core.handlers.base",
            "_get_response",
            197,
            false,
        ),
        frame(
            "django/contrib/auth/decorators.py",
            "django.contrib.auth.decorators",
            "_wrapper_view",
            23,
            false,
        ),
        frame("shop/views.py", "shop.views", "order_summary", 88, true),
        frame(
            "shop/orders.py",
            "shop.orders",
            function,
            41 + index as u32,
            true,
        ),
    ];
    json!({
        "level": "error",
        "platform": "python",
        "logger": "django.request",
        "server_name": "web-1",
        "release": "shop@2.14.3",
        "environment": environment,
        "transaction": "/orders/{order_id}/summary",
        "transaction_info": {"source": "route"},
        "request": {
            "url": "http://shop.example/orders/1234/summary",
            "method": "GET",
            "query_string": "",
            "headers": {
                "Host": "shop.example",
                "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
                "Accept": "text/html,application/xhtml+xml",
                "Accept-Language": "en-US,en;q=0.5"
            },
            "env": {"SERVER_NAME": "web-1", "SERVER_PORT": "8000"}
        },
        "tags": {"region": "eu-west", "customer_tier": "gold"},
        "user": {"id": "42", "ip_address": "203.0.113.9"},
        "contexts": {
            "runtime": {
                "name": "CPython",
                "version": "3.12.7",
                "build": "3.12.7 (main, Oct  1 2024, 08:52:12) [GCC 12.2.0]"
            },
            "os": {"name": "Linux", "version": "6.1.0-26-amd64"},
            "trace": {
                "trace_id": TRACE_ID,
                "span_id": "a1b2c3d4e5f60718",
                "parent_span_id": null,
                "op": "http.server",
                "status": "internal_error"
            }
        },
        "breadcrumbs": {"values": [
            {"type": "default", "category": "query", "level": "info",
             "message": "SELECT \"shop_order\".\"id\" FROM \"shop_order\" WHERE \"shop_order\".\"id\" = %s",
             "timestamp": "2026-12-06T07:08:09.101112Z"},
            {"type": "http", "category": "httplib", "level": "info",
             "data": {"url": "http://prices.internal/v1/quote", "method": "GET", "status_code": 200},
             "timestamp": "2026-12-06T07:08:09.111213Z"}
        ]},
        "exception": {"values": [{
            "type": kind,
            "value": value,
            "module": null,
            "mechanism": {"type": "django", "handled": false},
            "stacktrace": {"frames": frames}
        }]},
        "extra": {"sys.argv": ["/srv/shop/.venv/bin/gunicorn", "shop.wsgi", "--workers", "4"]},
        "modules": {"django": "5.1.3", "sentry-sdk": SDK_VERSION, "psycopg": "3.2.3",
                    "gunicorn": "23.0.0", "requests": "2.32.3"},
        "sdk": {
            "name": "sentry.python.django",
            "version": SDK_VERSION,
            "packages": [{"name": "pypi:sentry-sdk", "version": SDK_VERSION}],
            "integrations": ["argv", "atexit", "dedupe", "django", "excepthook", "logging",
                             "modules", "stdlib", "threading"]
        }
    })
}

impl Envelopes {
    pub fn new(public_key: &str, run_prefix: u64) -> Envelopes {
        let environment = "production";
        let tail_len = event_tail(&"0".repeat(32), &rfc3339_us(0)).len() - 1;
        let templates = (0..TEMPLATES)
            .map(|index| {
                let mut event =
                    serde_json::to_vec(&event_body(index, environment)).expect("event serializes");
                // Open the object again for the per-envelope fields.
                event.pop();
                event.push(b',');
                let header = json!({
                    "type": "event",
                    "content_type": "application/json",
                    "length": event.len() + tail_len
                });
                let mut plain = serde_json::to_vec(&header).expect("header serializes");
                plain.push(b'\n');
                plain.extend_from_slice(&event);
                let mut encoder = DeflateEncoder::new(Vec::new(), Compression::best());
                encoder.write_all(&plain).expect("deflate to memory");
                // A sync flush ends byte-aligned without a final block, so more may follow.
                encoder.flush().expect("deflate to memory");
                let deflated = encoder.get_ref().clone();
                Template { deflated, plain }
            })
            .collect();
        Envelopes {
            templates,
            run_prefix,
            public_key: public_key.to_string(),
            environment,
        }
    }

    /// Appends the gzip body of envelope `seq` (its event id unique in the run), sent at
    /// `unix_us`.
    pub fn push_body(&self, out: &mut Vec<u8>, seq: u64, unix_us: u64) {
        let template = &self.templates[(seq % self.templates.len() as u64) as usize];
        let event_id = format!("{:016x}{:016x}", self.run_prefix, seq);
        let now = rfc3339_us(unix_us);
        let head = format!(
            "{{\"event_id\":\"{event_id}\",\"sent_at\":\"{now}\",\"trace\":{{\"trace_id\":\"{TRACE_ID}\",\"environment\":\"{}\",\"release\":\"shop@2.14.3\",\"public_key\":\"{}\"}}}}\n",
            self.environment, self.public_key
        );
        let tail = event_tail(&event_id, &now);
        let mut crc = crc32fast::Hasher::new();
        out.extend_from_slice(&GZIP_HEADER);
        push_stored_block(out, head.as_bytes(), false);
        crc.update(head.as_bytes());
        out.extend_from_slice(&template.deflated);
        crc.update(&template.plain);
        push_stored_block(out, tail.as_bytes(), true);
        crc.update(tail.as_bytes());
        let size = head.len() + template.plain.len() + tail.len();
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&(size as u32).to_le_bytes());
    }
}

impl Envelopes {
    /// Appends the event of envelope `seq` as plain JSON, the bytes its item would hold: what
    /// the native endpoint takes.
    pub fn push_event_json(&self, out: &mut Vec<u8>, seq: u64, unix_us: u64) {
        let template = &self.templates[(seq % self.templates.len() as u64) as usize];
        let event_id = format!("{:016x}{:016x}", self.run_prefix, seq);
        let item_header_end = template
            .plain
            .iter()
            .position(|byte| *byte == b'\n')
            .map_or(0, |at| at + 1);
        out.extend_from_slice(&template.plain[item_header_end..]);
        let tail = event_tail(&event_id, &rfc3339_us(unix_us));
        out.extend_from_slice(tail.trim_end_matches('\n').as_bytes());
    }
}

/// A stored (uncompressed) deflate block starting on a byte boundary.
fn push_stored_block(out: &mut Vec<u8>, data: &[u8], last: bool) {
    let len = u16::try_from(data.len()).expect("stored block under 64 KiB");
    out.push(u8::from(last));
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(body: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut plain)
            .expect("valid gzip");
        plain
    }

    #[test]
    fn the_native_body_is_the_event_the_envelope_carries() {
        let envelopes = Envelopes::new("k3y", 7);
        let mut body = Vec::new();
        envelopes.push_body(&mut body, 3, 1_700_000_000_000_000);
        let envelope = inflate(&body);
        let payload = envelope.splitn(3, |byte| *byte == b'\n').nth(2).unwrap();
        let payload = payload.strip_suffix(b"\n").unwrap_or(payload);
        let mut json = Vec::new();
        envelopes.push_event_json(&mut json, 3, 1_700_000_000_000_000);
        assert_eq!(payload, &json[..]);
        let event: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(event["event_id"], "00000000000000070000000000000003");
    }

    #[test]
    fn envelope_is_one_gzip_member_holding_one_event_item() {
        let envelopes = Envelopes::new("k3y", 0xabcdef);
        for seq in [0u64, 1, 7, 123_456] {
            let mut body = Vec::new();
            envelopes.push_body(&mut body, seq, 1_796_540_889_123_456);
            let plain = inflate(&body);
            let text = std::str::from_utf8(&plain).unwrap();
            let mut lines = text.splitn(3, '\n');
            let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
            let item: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
            let rest = lines.next().unwrap();
            let length = item["length"].as_u64().unwrap() as usize;
            assert_eq!(item["type"], "event");
            assert_eq!(&rest[length..], "\n", "length covers the payload");
            let event: serde_json::Value = serde_json::from_str(&rest[..length]).unwrap();
            let id = format!("{:016x}{:016x}", 0xabcdef, seq);
            assert_eq!(header["event_id"], id.as_str());
            assert_eq!(event["event_id"], id.as_str());
            assert_eq!(event["timestamp"], "2026-12-06T07:08:09.123456Z");
            assert_eq!(header["sent_at"], event["timestamp"]);
            assert!((3000..=5000).contains(&length), "event of {length} bytes");
            assert!(
                body.len() < plain.len() / 2,
                "compressed {} of {}",
                body.len(),
                plain.len()
            );
            let values = &event["exception"]["values"];
            assert_eq!(
                values[0]["stacktrace"]["frames"].as_array().unwrap().len(),
                4
            );
        }
    }

    #[test]
    fn dsn_gives_path_key_and_auth_header() {
        let dsn = Dsn::parse("http://ef4f52f2@127.0.0.1:18084/7").unwrap();
        assert_eq!(dsn.key, "ef4f52f2");
        assert_eq!(dsn.host, "127.0.0.1:18084");
        assert_eq!(dsn.envelope_path(), "/api/7/envelope/");
        assert!(dsn.headers().contains(
            "X-Sentry-Auth: Sentry sentry_key=ef4f52f2, sentry_version=7, sentry_client=sentry.python/2.76.0\r\n"
        ));
        assert_eq!(
            Dsn::parse("https://pub:secret@h/sub/path/12/")
                .unwrap()
                .number,
            "12"
        );
        assert!(Dsn::parse("http://h/1").is_err());
        assert!(Dsn::parse("nonsense").is_err());
    }

    #[test]
    fn times_are_rfc3339_with_microseconds() {
        assert_eq!(rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_us(951_782_400_000_001),
            "2000-02-29T00:00:00.000001Z"
        );
        assert_eq!(
            rfc3339_us(1_796_540_889_123_456),
            "2026-12-06T07:08:09.123456Z"
        );
    }
}
