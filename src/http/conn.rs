//! One HTTP/1.1 connection: keep-alive, pipelining, limits, timeouts, and the hand-over to a
//! WebSocket session on upgrade.

use std::os::fd::AsRawFd;
use std::rc::Rc;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

use super::parse::{parse_head, parse_head_reusing, BodyDecoder, HeadBuffers, HttpError};
use super::response::Response;
use super::router::{self, NoRoute, CONTROL_BODY_BYTES_MAX};
use crate::api::{self, Handled};
use crate::conn::registry::ConnId;
use crate::metrics::CloseReason;
use crate::shard::{Deadline, Shard};

/// Bytes asked of the kernel per read; a request head usually fits in one.
const READ_CHUNK_BYTES: usize = 4096;
/// Responses to pipelined requests are gathered into one write up to this size.
const PIPELINE_WRITE_BYTES_MAX: usize = 64 * 1024;

/// Serves the connection until it closes or becomes a WebSocket.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let id = shard.register(stream.as_raw_fd());
    let stream = Rc::new(stream);
    match serve_requests(&shard, id, &stream).await {
        End::Closed(reason) => shard.unregister(id, reason),
        End::Upgraded(role, key_id, leftover) => {
            // A task of its own, so the HTTP state machine's memory goes with this one.
            tokio_uring::spawn(crate::ws::session::run(
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

fn set_busy(shard: &Shard, id: ConnId, busy: bool) {
    if let Some(entry) = shard.conns.borrow_mut().get_mut(id) {
        entry.busy = busy;
    }
}

fn close_reason(shard: &Shard, id: ConnId) -> Option<CloseReason> {
    shard.conns.borrow().get(id).and_then(|e| e.close_reason)
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
    stream: &TcpStream,
    out: &mut Vec<u8>,
    response: Response,
    reason: CloseReason,
) -> End {
    shard.counters.responded(response.status);
    response.write_to(false, out);
    write(stream, out).await;
    End::Closed(reason)
}

async fn serve_requests(shard: &Rc<Shard>, id: ConnId, stream: &TcpStream) -> End {
    let request_timeout_ms = shard.config.request_timeout * 1000;
    let keepalive_timeout_ms = shard.config.keepalive_timeout * 1000;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut out: Vec<u8> = Vec::new();
    let mut head_buffers = HeadBuffers::default();
    loop {
        // The head: idle timer while nothing has arrived, request timer from the first byte.
        let mut request_started = false;
        let head = loop {
            if !buf.is_empty() {
                if !request_started {
                    request_started = true;
                    set_busy(shard, id, true);
                    shard.set_deadline(id, Some((Deadline::Request, request_timeout_ms)));
                }
                match parse_head_reusing(&buf, &mut head_buffers) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(error) => return reject(shard, stream, &mut out, &error).await,
                }
            } else {
                if !write(stream, &mut out).await {
                    return End::Closed(CloseReason::IoError);
                }
                if shard.draining.get() {
                    return End::Closed(CloseReason::Shutdown);
                }
                shard.set_deadline(id, Some((Deadline::Idle, keepalive_timeout_ms)));
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
        // The body, with the route's limit decided from the headers alone. It is decoded from
        // where it lies after the head; the buffer is cut once, after it (no move of the body).
        let mut used = head.head_len;
        let route = router::route(&head.method, &head.path);
        let limit = route
            .as_ref()
            .map_or(CONTROL_BODY_BYTES_MAX, |r| r.body_bytes_max());
        let mut decoder = match BodyDecoder::new(&head.body, limit) {
            Ok(decoder) => decoder,
            Err(error) => return reject(shard, stream, &mut out, &error).await,
        };
        if head.expects_continue() && !decoder.is_done() && buf.len() == used {
            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if !write(stream, &mut out).await {
                return End::Closed(CloseReason::IoError);
            }
        }
        loop {
            match decoder.feed(&buf[used..]) {
                Ok(consumed) => used += consumed,
                Err(error) => return reject(shard, stream, &mut out, &error).await,
            }
            buf.drain(..used);
            used = 0;
            if decoder.is_done() {
                break;
            }
            let (result, returned) = read_more(stream, buf, READ_CHUNK_BYTES).await;
            buf = returned;
            match result {
                Ok(n) if n > 0 => {}
                _ => return ended_while_reading(shard, id, stream, &mut out, true).await,
            }
        }
        let body = decoder.take_body();
        shard.set_deadline(id, None);

        let keep_alive = head.keep_alive && !shard.draining.get();
        // 404 and 405 end like any other response, so `Connection: close` holds for them too.
        let handled = match route {
            Ok(route) => api::handle(shard, &head, route, body).await,
            Err(NoRoute::NotFound) => Handled::Respond(Response::not_found()),
            Err(NoRoute::MethodNotAllowed(allow)) => Handled::Respond(
                Response::error(405, "method not allowed").with_header("allow", allow),
            ),
        };
        match handled {
            Handled::Respond(response) => {
                let is_head = head.method == "HEAD";
                let mut response = response;
                if is_head {
                    response.body.clear();
                }
                respond(shard, response, keep_alive, &mut out);
            }
            Handled::Upgrade {
                role,
                accept,
                key_id,
            } => {
                shard.counters.responded(101);
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
        set_busy(shard, id, false);
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

fn respond(shard: &Shard, response: Response, keep_alive: bool, out: &mut Vec<u8>) {
    shard.counters.responded(response.status);
    response.write_to(keep_alive, out);
}

/// A request the parser refused: its status (400, 413, 431) and the connection closes.
async fn reject(shard: &Shard, stream: &TcpStream, out: &mut Vec<u8>, error: &HttpError) -> End {
    let response = Response::error(error.status(), &error.message());
    fail(shard, stream, out, response, CloseReason::BadRequest).await
}

/// The read side ended: a timed-out request gets its 408, anything else just closes.
async fn ended_while_reading(
    shard: &Shard,
    id: ConnId,
    stream: &TcpStream,
    out: &mut Vec<u8>,
    request_started: bool,
) -> End {
    match close_reason(shard, id) {
        Some(CloseReason::RequestTimeout) if request_started => {
            fail(
                shard,
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
