//! A WebSocket connection after the upgrade: a reader task that decodes client frames and a
//! writer task that sends whatever waits in the connection's ring in one vectored write.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_uring::net::TcpStream;

use super::http::read_more;
use crate::api::{ingest_frame, Role};
use crate::conn::registry::ConnId;
use crate::conn::ring::Kind;
use crate::metrics::{CloseReason, ConnKind, Rejection};
use crate::owner;
use crate::shard::{Shard, Socket, Timer, CLOSE_GRACE_MS};
use crate::stream::{self, dropped_frame, error_frame, filters_updated_frame, Subscribe};
use crate::ws::codec::{
    encode_close, encode_pong, encode_text, Decoder, Message, CLOSE_MESSAGE_TOO_BIG,
    MESSAGE_BYTES_MAX,
};

/// Dashboards send small messages (a subscribe); reads ask for this much at a time so an idle
/// stream holds little memory while its read waits.
const STREAM_READ_CHUNK_BYTES: usize = 256;
/// Kernel send buffer of a stream socket (the kernel doubles it): room for a few hundred
/// frames in flight to a healthy dashboard.
const STREAM_SEND_BUFFER_BYTES: libc::c_int = 128 * 1024;
/// A read buffer grown past this many chunks by one large message is given back once empty.
const BUFFER_KEPT_CHUNKS_MAX: usize = 16;
/// Ingest sockets carry whole events, often a few KiB.
const INGEST_READ_CHUNK_BYTES: usize = 4096;
/// Frames gathered into one vectored write; well under the kernel's 1024 iovec limit.
const WRITE_BATCH_MAX: usize = 256;

pub async fn run(
    shard: Rc<Shard>,
    id: ConnId,
    stream: Rc<TcpStream>,
    leftover: Vec<u8>,
    role: Role,
    key_id: uuid::Uuid,
) {
    let wake = Rc::new(Notify::new());
    let kind = match role {
        Role::Stream { .. } => ConnKind::Stream,
        Role::Ingest { .. } => ConnKind::IngestSocket,
    };
    let is_stream = matches!(role, Role::Stream { .. });
    let capacity = shard.config().stream_buffer as usize;
    let socket = Socket::new(capacity, wake.clone(), key_id, is_stream);
    if !shard.open_socket(id, kind, socket) {
        return;
    }
    shard.start_pings(id);
    if shard.is_draining() {
        // Shutdown began while the 101 was being written, before this was a socket: it gets
        // the 1001 every other socket got.
        shard.close_for_shutdown(id);
    }
    if let Role::Stream { project_id, since } = &role {
        limit_send_buffer(&stream);
        stream::join(&shard, id, *project_id);
        owner::watch(&shard, *project_id, id, since.clone());
    }
    let written = Rc::new(Notify::new());
    let writer = tokio_uring::spawn(write_loop(
        shard.clone(),
        id,
        stream.clone(),
        wake.clone(),
        written.clone(),
    ));
    let mut buf = Vec::with_capacity(read_chunk_bytes(&role).max(leftover.len()));
    buf.extend_from_slice(&leftover);
    drop(leftover);
    let reason = read_loop(&shard, id, &stream, buf, &role, &written).await;
    // Let the writer send what waits (a close frame, maybe) and stop.
    shard.with_socket(id, |socket| {
        socket.closing = true;
        socket.wake.notify_one();
    });
    let _ = writer.await;
    if let Some(project_id) = stream::leave(&shard, id) {
        owner::unwatch(&shard, project_id);
    }
    shard.unregister(id, reason);
}

async fn read_loop(
    shard: &Rc<Shard>,
    id: ConnId,
    stream: &TcpStream,
    mut buf: Vec<u8>,
    role: &Role,
    written: &Notify,
) -> CloseReason {
    let mut decoder = Decoder::new(MESSAGE_BYTES_MAX);
    loop {
        let mut start = 0;
        loop {
            // Once the server has decided to close (too slow, stalled, a protocol error, key
            // revoked, shutdown), nothing more from this client is decoded or acted on, however
            // much of its input is already read.
            if let Some(reason) = shard.close_reason(id) {
                return reason;
            }
            match decoder.decode(&buf[start..]) {
                Ok(Some((message, used))) => {
                    start += used;
                    match message {
                        Message::Text(text) => {
                            on_text(shard, id, role, text).await;
                            if let Role::Ingest { .. } = role {
                                answers_go_out(shard, id, written).await;
                            }
                        }
                        Message::Binary(_) => {
                            reply_error(shard, id, role, "binary frames are not supported")
                        }
                        Message::Ping(payload) => {
                            shard.enqueue(id, Bytes::from(encode_pong(&payload)), Kind::Control);
                        }
                        Message::Pong(_) => shard.pong_received(id),
                        Message::Close(code) => {
                            let code = code.map_or(1000, |(code, _)| code);
                            shard.close_socket(
                                id,
                                Bytes::from(encode_close(code, "")),
                                CloseReason::Normal,
                            );
                            return CloseReason::Normal;
                        }
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    if error.code == CLOSE_MESSAGE_TOO_BIG && matches!(role, Role::Ingest { .. }) {
                        // An oversized ingest message is an event refused, like a 413.
                        shard.counters().rejected(Rejection::TooLarge, 1);
                    }
                    // Every decoder error is the peer's protocol fault (1002, 1007, 1009).
                    let reason = CloseReason::ProtocolError;
                    shard.close_socket(
                        id,
                        Bytes::from(encode_close(error.code, error.reason)),
                        reason,
                    );
                    return reason;
                }
            }
        }
        buf.drain(..start);
        if buf.is_empty() && buf.capacity() > BUFFER_KEPT_CHUNKS_MAX * read_chunk_bytes(role) {
            // A large message has passed; an idle connection should not keep its buffer.
            buf = Vec::with_capacity(read_chunk_bytes(role));
        }
        let (result, returned) = read_more(stream, buf, read_chunk_bytes(role)).await;
        buf = returned;
        match result {
            Ok(n) if n > 0 => {}
            Ok(_) => return shard.close_reason(id).unwrap_or(CloseReason::Normal),
            Err(_) => return shard.close_reason(id).unwrap_or(CloseReason::IoError),
        }
    }
}

/// Waits while the answers waiting for an ingest client fill half its ring (which holds only
/// answers and control frames). Frames read in one go are answered back to back, without a
/// pause when the project is owned on this shard; the writer must get to send them, or a client
/// that reads would be cut off as too slow. A client that does not read leaves its frames unread
/// meanwhile, until the stall timeout cuts it off.
async fn answers_go_out(shard: &Shard, id: ConnId, written: &Notify) {
    loop {
        let piled_up = shard
            .with_socket(id, |s| !s.closing && s.ring.len() * 2 >= s.ring.capacity())
            .unwrap_or(false);
        if !piled_up || shard.close_reason(id).is_some() {
            return;
        }
        written.notified().await;
    }
}

/// Wakes the reader (see `answers_go_out`) when the writer stops, whatever the reason.
struct WakeOnDrop(Rc<Notify>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// A stalled subscriber's backlog belongs in its ring, where old events are dropped and counted,
/// not in megabytes of kernel buffer that the kernel would otherwise grow for it (and that
/// deliver stale events first when it reads again).
fn limit_send_buffer(stream: &TcpStream) {
    let bytes: libc::c_int = STREAM_SEND_BUFFER_BYTES;
    // SAFETY: setsockopt on a socket this connection owns, with a pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn read_chunk_bytes(role: &Role) -> usize {
    match role {
        Role::Stream { .. } => STREAM_READ_CHUNK_BYTES,
        Role::Ingest { .. } => INGEST_READ_CHUNK_BYTES,
    }
}

fn reply_error(shard: &Shard, id: ConnId, role: &Role, message: &str) {
    let frame = match role {
        Role::Stream { .. } => error_frame(message),
        Role::Ingest { .. } => Bytes::from(encode_text(
            serde_json::json!({ "error": message })
                .to_string()
                .as_bytes(),
        )),
    };
    reply(shard, id, frame);
}

/// Replies are never dropped; a client that lets a full ring of them pile up is cut off.
fn reply(shard: &Shard, id: ConnId, frame: Bytes) {
    if !shard.enqueue(id, frame, Kind::Control) {
        shard.disconnect_slow(id);
    }
}

async fn on_text(shard: &Rc<Shard>, id: ConnId, role: &Role, text: String) {
    match role {
        Role::Ingest { project_id } => {
            let answer = ingest_frame(shard, *project_id, text.into_bytes()).await;
            reply(shard, id, Bytes::from(encode_text(&answer)));
        }
        Role::Stream { project_id, .. } => match Subscribe::parse(&text) {
            Ok(Subscribe { filters, since }) => {
                let frame = filters_updated_frame(&filters);
                stream::set_filters(id, filters);
                reply(shard, id, frame);
                if let Some(since) = since {
                    owner::resume(shard, *project_id, id, since);
                }
            }
            Err(message) => reply(shard, id, error_frame(&message)),
        },
    }
}

async fn write_loop(
    shard: Rc<Shard>,
    id: ConnId,
    stream: Rc<TcpStream>,
    wake: Rc<Notify>,
    written: Rc<Notify>,
) {
    let _wake_reader = WakeOnDrop(written.clone());
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        let finished = shard.with_socket(id, |socket| {
            if !socket.held {
                // A stream's first message, and what a resume replays, go out before the ring.
                let ahead = socket.ahead.len().min(WRITE_BATCH_MAX);
                batch.extend(socket.ahead.drain(..ahead));
                if socket.ahead.is_empty() {
                    if let Some(dropped) = socket.ring.take_dropped() {
                        batch.push(dropped_frame(dropped));
                    }
                    let room = WRITE_BATCH_MAX.saturating_sub(batch.len()).max(1);
                    socket.ring.drain_into(&mut batch, room);
                }
            }
            // The close frame comes last; a stream still held sends nothing before it.
            let sent_all = socket.ring.is_empty() && socket.ahead.is_empty();
            if socket.closing && (socket.held || sent_all) {
                batch.extend(socket.close_frame.take());
            }
            if batch.is_empty() {
                socket.writing = false;
                socket.last_progress_tick = shard.now_tick();
                socket.closing
            } else {
                if !socket.writing {
                    // The stall clock starts when there is something to take.
                    socket.writing = true;
                    socket.last_progress_tick = shard.now_tick();
                }
                false
            }
        });
        let Some(finished) = finished else {
            return;
        };
        if finished {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            shard.schedule(CLOSE_GRACE_MS, Timer::CloseGrace(id));
            return;
        }
        if batch.is_empty() {
            wake.notified().await;
            continue;
        }
        let frames = batch.len() as u64;
        if !write_frames(&shard, id, &stream, &mut batch).await {
            shard.force_close(id, CloseReason::IoError);
            return;
        }
        shard
            .counters()
            .stream_messages_sent
            .fetch_add(frames, Relaxed);
        written.notify_one();
    }
}

/// The socket took bytes: the stall clock restarts.
fn made_progress(shard: &Shard, id: ConnId) {
    let now = shard.now_tick();
    shard.with_socket(id, |socket| {
        socket.last_progress_tick = now;
        // The write added to the kernel's queue: an earlier reading of it says nothing now.
        socket.send_queue_seen = None;
    });
}

/// Writes every frame, resuming after partial writes; false if the socket failed. Every write
/// that moved bytes counts as progress, so a slow reader is not taken for a stalled one.
async fn write_frames(
    shard: &Shard,
    id: ConnId,
    stream: &TcpStream,
    batch: &mut Vec<Bytes>,
) -> bool {
    let mut pending = std::mem::take(batch);
    while !pending.is_empty() {
        let (result, mut frames) = stream.writev(pending).await;
        let mut written = match result {
            Ok(n) if n > 0 => n,
            _ => return false,
        };
        made_progress(shard, id);
        let done = frames.iter().take_while(|f| {
            let whole = written >= f.len();
            if whole {
                written -= f.len();
            }
            whole
        });
        let done = done.count();
        frames.drain(..done);
        if written > 0 {
            frames[0] = frames[0].slice(written..);
        }
        pending = frames;
    }
    *batch = pending;
    true
}
