//! One HTTP/1.1 connection: keep-alive, pipelining, limits, timeouts, and the hand-over to a
//! WebSocket session on upgrade.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use crate::api::routes::{self as router, NoRoute, Route, CONTROL_BODY_BYTES_MAX};
use crate::api::{self, Handled};
use crate::conn::limits::Share;
use crate::conn::registry::ConnId;
use crate::http::parse::{
    parse_head, parse_head_reusing, BodyDecoder, BodyKind, HeadBuffers, HttpError,
};
use crate::http::response::{Persistence, Response};
use crate::metrics::{CloseReason, Rejection, SentryRejection};
use crate::shard::{Deadline, Shard};

/// Bytes asked of the kernel per read; a request head usually fits in one.
const READ_CHUNK_BYTES: usize = 4096;
/// Responses to pipelined requests are gathered into one write up to this size.
const PIPELINE_WRITE_BYTES_MAX: usize = 64 * 1024;
/// After a final error answer, how long what the client still sends is read and discarded...
const LINGER_MS: u64 = 2000;
/// ...and how much of it at most.
const LINGER_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Serves the connection until it closes or becomes a WebSocket.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let (id, admitted) = shard.register(stream.as_raw_fd());
    let stream = Rc::new(stream);
    let end = if admitted {
        serve_requests(&shard, id, &stream).await
    } else {
        shard.counters().conns_refused.fetch_add(1, Relaxed);
        let response = Response::unavailable("too many connections");
        fail(
            &shard,
            id,
            &stream,
            &mut Vec::new(),
            response,
            CloseReason::Refused,
        )
        .await
    };
    match end {
        End::Closed(reason) => shard.unregister(id, reason),
        End::Upgraded(role, key_id, leftover) => {
            // A task of its own, so the HTTP state machine's memory goes with this one.
            tokio_uring::spawn(super::websocket::run(
                shard, id, stream, leftover, role, key_id,
            ));
        }
    }
}

enum End {
    Closed(CloseReason),
    Upgraded(api::Role, uuid::Uuid, Vec<u8>),
}

/// Reads more bytes onto the end of `buf`; Ok(0) at the end of the stream.
pub async fn read_more(
    stream: &TcpStream,
    mut buf: Vec<u8>,
    chunk_bytes: usize,
) -> (std::io::Result<usize>, Vec<u8>) {
    if buf.capacity() - buf.len() < chunk_bytes / 2 {
        buf.reserve(chunk_bytes);
    }
    let len = buf.len();
    let (result, slice) = stream.read(buf.slice(len..)).await;
    (result, slice.into_inner())
}

async fn write(stream: &TcpStream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let (result, mut buf) = stream.write_all(std::mem::take(out)).await;
    buf.clear();
    *out = buf;
    result.is_ok()
}

/// Answers an error and closes: the connection's byte stream can no longer be trusted.
async fn fail(
    shard: &Shard,
    id: ConnId,
    stream: &TcpStream,
    out: &mut Vec<u8>,
    response: Response,
    reason: CloseReason,
) -> End {
    shard.counters().responded(response.status);
    response.write_to(Persistence::Close, out);
    if write(stream, out).await {
        linger(shard, id, stream).await;
    }
    End::Closed(reason)
}

/// Closes without losing the answer just written. Closing a socket with unread bytes makes the
/// kernel send a reset, which can destroy the answer before the client reads it; so the write
/// side is shut (the client sees the answer, then its end) and what the client still sends is
/// read and discarded, for a bounded time and amount, until it closes too.
async fn linger(shard: &Shard, id: ConnId, stream: &TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    shard.set_deadline(id, Some((Deadline::Linger, LINGER_MS)));
    let mut discard: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut discarded = 0;
    while discarded < LINGER_BYTES_MAX {
        let (result, mut returned) = stream.read(discard).await;
        returned.clear();
        discard = returned;
        match result {
            Ok(n) if n > 0 => discarded += n,
            _ => break,
        }
    }
}

async fn serve_requests(shard: &Rc<Shard>, id: ConnId, stream: &TcpStream) -> End {
    let request_timeout_ms = shard.config().request_timeout_ms;
    let keepalive_timeout_ms = shard.config().keepalive_timeout_ms;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut out: Vec<u8> = Vec::new();
    let mut head_buffers = HeadBuffers::default();
    // The first request must arrive whole within the request timeout of the accept: a
    // connection that sends nothing is not kept for the keep-alive timeout.
    let mut first_request = true;
    shard.set_deadline(id, Some((Deadline::Request, request_timeout_ms)));
    loop {
        // The head: idle timer while nothing has arrived, request timer from the first byte.
        let mut request_started = false;
        let head = loop {
            if !buf.is_empty() {
                if !request_started {
                    request_started = true;
                    shard.set_busy(id, true);
                    if !first_request {
                        shard.set_deadline(id, Some((Deadline::Request, request_timeout_ms)));
                    }
                }
                match parse_head_reusing(&buf, &mut head_buffers) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(error) => return reject(shard, id, stream, &mut out, &error).await,
                }
            } else {
                if !write(stream, &mut out).await {
                    return End::Closed(CloseReason::IoError);
                }
                if shard.is_draining() {
                    return End::Closed(CloseReason::Shutdown);
                }
                if !first_request {
                    shard.set_deadline(id, Some((Deadline::Idle, keepalive_timeout_ms)));
                }
            }
            let (result, returned) = read_more(stream, buf, READ_CHUNK_BYTES).await;
            buf = returned;
            match result {
                Ok(n) if n > 0 => {}
                _ => {
                    return ended_while_reading(shard, id, stream, &mut out, request_started).await
                }
            }
        };
        first_request = false;
        // The body, with the route's limit decided from the headers alone. It is decoded from
        // where it lies after the head; the buffer is cut once, after it (no move of the body).
        let used = head.head_len;
        let route = router::route(&head.method, &head.path);
        let limit = route
            .as_ref()
            .map_or(CONTROL_BODY_BYTES_MAX, |r| r.body_bytes_max());
        // An ingest request refused here is counted as the handler counts its refusals.
        let sentry = route.as_ref().is_ok_and(Route::is_sentry);
        let carries_events = sentry || matches!(route, Ok(Route::Event | Route::Bulk));
        let count_refusal = |why: Rejection| {
            if carries_events {
                shard.counters().rejected(why, 1);
            }
            match why {
                Rejection::TooLarge if sentry => {
                    shard.counters().sentry.rejected(SentryRejection::TooLarge)
                }
                Rejection::Overloaded if sentry => shard
                    .counters()
                    .sentry
                    .rejected(SentryRejection::Overloaded),
                _ => {}
            }
        };
        // Answers of the Sentry routes carry CORS headers, refusals made here included.
        let decorate = |response: Response| match &route {
            Ok(route) => api::decorate(route, response),
            Err(no_route) if no_route.is_sentry() => api::with_cors(response),
            Err(_) => response,
        };
        let mut decoder = match BodyDecoder::new(&head.body, limit) {
            Ok(decoder) => decoder,
            Err(error) => {
                count_refusal(Rejection::TooLarge);
                let response = decorate(Response::error(error.status(), &error.message()));
                let reason = CloseReason::BadRequest;
                return fail(shard, id, stream, &mut out, response, reason).await;
            }
        };
        // A body still to come is waited for only when the request's key could be accepted.
        if !body_is_here(&head.body, buf.len() - used) {
            if let Err(response) = route
                .as_ref()
                .map_or(Ok(()), |r| api::admit(shard, &head, r))
            {
                if !sentry {
                    // The Sentry admission counts its own refusals, by reason.
                    count_refusal(Rejection::Unauthorized);
                }
                return fail(
                    shard,
                    id,
                    stream,
                    &mut out,
                    response,
                    CloseReason::BadRequest,
                )
                .await;
            }
        }
        if head.expects_continue() && !decoder.is_done() && buf.len() == used {
            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if !write(stream, &mut out).await {
                return End::Closed(CloseReason::IoError);
            }
        }
        match read_body(shard, stream, &mut decoder, &mut buf, used).await {
            Ok(()) => {}
            Err(BodyEnd::Invalid(error)) => {
                if error == HttpError::PayloadTooLarge {
                    count_refusal(Rejection::TooLarge);
                }
                let response = decorate(Response::error(error.status(), &error.message()));
                let reason = CloseReason::BadRequest;
                return fail(shard, id, stream, &mut out, response, reason).await;
            }
            Err(BodyEnd::NoRoom) => {
                count_refusal(Rejection::Overloaded);
                shard.counters().bodies_refused.fetch_add(1, Relaxed);
                let response = decorate(Response::unavailable("overloaded"));
                return fail(shard, id, stream, &mut out, response, CloseReason::Refused).await;
            }
            Err(BodyEnd::StreamEnded) => {
                return ended_while_reading(shard, id, stream, &mut out, true).await
            }
        }
        let body = decoder.take_body();
        shard.set_deadline(id, None);

        let keep_alive = head.keep_alive && !shard.is_draining();
        // 404 and 405 end like any other response, so `Connection: close` holds for them too.
        let handled = match route {
            Ok(route) => api::handle(shard, &head, route, body).await,
            Err(NoRoute::NotFound) => Handled::Respond(Response::not_found()),
            Err(NoRoute::MethodNotAllowed(allow)) => Handled::Respond(decorate(
                Response::error(405, "method not allowed").with_header("allow", allow),
            )),
            Err(NoRoute::BadPath) => {
                Handled::Respond(Response::error(400, "bad request: invalid path escape"))
            }
        };
        match handled {
            Handled::Respond(response) => {
                shard.counters().responded(response.status);
                let persistence = Persistence::new(keep_alive, head.http10);
                if head.method == "HEAD" {
                    response.write_head_to(persistence, &mut out);
                } else {
                    response.write_to(persistence, &mut out);
                }
            }
            Handled::Upgrade {
                role,
                accept,
                key_id,
            } => {
                shard.counters().responded(101);
                out.extend_from_slice(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                );
                if !write(stream, &mut out).await {
                    return End::Closed(CloseReason::IoError);
                }
                return End::Upgraded(role, key_id, buf);
            }
        }
        head_buffers = head.into_buffers();
        shard.set_busy(id, false);
        if !keep_alive {
            write(stream, &mut out).await;
            return End::Closed(CloseReason::Normal);
        }
        // Pipelined requests already here are answered before one write of all their responses.
        let next_ready = !buf.is_empty() && matches!(parse_head(&buf), Ok(Some(_)));
        if (!next_ready || out.len() >= PIPELINE_WRITE_BYTES_MAX) && !write(stream, &mut out).await
        {
            return End::Closed(CloseReason::IoError);
        }
    }
}

/// Why a body could not be read whole.
enum BodyEnd {
    /// Its framing is broken or it is over the route's limit.
    Invalid(HttpError),
    /// Pending bodies hold all the bytes they may.
    NoRoom,
    /// The read side ended (the client left, or the request timed out).
    StreamEnded,
}

/// Feeds the decoder from `buf[used..]` and the socket until the body is complete; `buf` is
/// left holding whatever follows it. While the body arrives, what it holds counts against the
/// bytes all pending bodies may hold together; the count is given back on return.
async fn read_body(
    shard: &Shard,
    stream: &TcpStream,
    decoder: &mut BodyDecoder,
    buf: &mut Vec<u8>,
    mut used: usize,
) -> Result<(), BodyEnd> {
    let mut pending = Share::new(&shard.limits().pending_body_bytes);
    loop {
        used += decoder.feed(&buf[used..]).map_err(BodyEnd::Invalid)?;
        buf.drain(..used);
        used = 0;
        if decoder.is_done() {
            return Ok(());
        }
        if !pending.grow_to(decoder.received_bytes()) {
            return Err(BodyEnd::NoRoom);
        }
        let (result, returned) = read_more(stream, std::mem::take(buf), READ_CHUNK_BYTES).await;
        *buf = returned;
        match result {
            Ok(n) if n > 0 => {}
            _ => return Err(BodyEnd::StreamEnded),
        }
    }
}

/// The whole body is already in the buffer (or there is none).
fn body_is_here(kind: &BodyKind, buffered_bytes: usize) -> bool {
    match *kind {
        BodyKind::None => true,
        BodyKind::Length(length) => length <= buffered_bytes as u64,
        BodyKind::Chunked => false,
    }
}

/// A request the parser refused: its status (400, 413, 431) and the connection closes.
async fn reject(
    shard: &Shard,
    id: ConnId,
    stream: &TcpStream,
    out: &mut Vec<u8>,
    error: &HttpError,
) -> End {
    let response = Response::error(error.status(), &error.message());
    fail(shard, id, stream, out, response, CloseReason::BadRequest).await
}

/// The read side ended: a timed-out request gets its 408, anything else just closes.
async fn ended_while_reading(
    shard: &Shard,
    id: ConnId,
    stream: &TcpStream,
    out: &mut Vec<u8>,
    request_started: bool,
) -> End {
    match shard.close_reason(id) {
        Some(CloseReason::RequestTimeout) if request_started => {
            fail(
                shard,
                id,
                stream,
                out,
                Response::error(408, "request timeout"),
                CloseReason::RequestTimeout,
            )
            .await
        }
        Some(reason) => End::Closed(reason),
        None => {
            write(stream, out).await;
            End::Closed(CloseReason::Normal)
        }
    }
}
