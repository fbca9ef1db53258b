//! Stream subscribers: a hand-made WebSocket client over a tokio TcpStream whose read loop only
//! parses frame headers and scans messages by substring.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::frame::{
    encode_client_frame, FrameReader, Message, OPCODE_CLOSE, OPCODE_PONG, OPCODE_TEXT,
};
use crate::scan::{self, Dialect, Kind};
use crate::stats::{Counters, ShardedHistogram, SubOutcome};
use crate::target::{Routes, TargetKind, FILTER_LEVEL};

/// Upgrade response headers larger than this mean a broken server.
const UPGRADE_RESPONSE_BYTES_MAX: usize = 16 * 1024;
/// One subscriber's connect + upgrade + subscribe must finish within this.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Receive buffer of the slow subscribers: small so the server feels backpressure early.
pub const SLOW_RCVBUF_BYTES: u32 = 4096;
/// Any valid base64 of 16 bytes will do: the client does not check the accept hash.
const WEBSOCKET_KEY: &str = "bWVzaGVyLWxvYWQtMDAwMA==";

/// Opens a TCP connection, optionally from a given source address and with a small receive
/// buffer (set before connecting, so the advertised window stays small).
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf_bytes: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        // Let connect() pick the port per destination, so that more than ~28k sockets can
        // share a source address when the destinations differ.
        let enable: libc::c_int = 1;
        // SAFETY: setsockopt reads `enable` for its size; the fd is the socket we own.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &enable as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    if let Some(bytes) = rcvbuf_bytes {
        socket.set_recv_buffer_size(bytes)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends the upgrade request and reads the response; bytes after it go to `reader`.
pub async fn upgrade(
    stream: &mut TcpStream,
    host: &str,
    path: &str,
    reader: &mut FrameReader,
) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WEBSOCKET_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("upgrade write: {e}"))?;
    let mut response = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(at) = scan::find(&response, b"\r\n\r\n") {
            break at + 4;
        }
        if response.len() > UPGRADE_RESPONSE_BYTES_MAX {
            return Err("upgrade response too large".into());
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("upgrade read: {e}"))?;
        if n == 0 {
            return Err("connection closed during upgrade".into());
        }
        response.extend_from_slice(&chunk[..n]);
    };
    let status_line_end = scan::find(&response, b"\r\n").unwrap_or(head_end);
    let status_line = String::from_utf8_lossy(&response[..status_line_end]).to_string();
    if status_line.split_whitespace().nth(1) != Some("101") {
        let body = String::from_utf8_lossy(&response[head_end..]);
        return Err(format!("upgrade refused: {status_line} {body}"));
    }
    reader.push(&response[head_end..]);
    Ok(())
}

async fn send_text(stream: &mut TcpStream, text: &str) -> Result<(), String> {
    let mut frame = Vec::with_capacity(text.len() + 14);
    encode_client_frame(OPCODE_TEXT, text.as_bytes(), rand::random(), &mut frame);
    stream
        .write_all(&frame)
        .await
        .map_err(|e| format!("write: {e}"))
}

/// Reads until a message of kind `want`; an `error` message fails the setup.
async fn wait_for(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    dialect: Dialect,
    want: Kind,
) -> Result<(), String> {
    loop {
        while let Some(message) = reader.next_message().map_err(|e| e.to_string())? {
            match message {
                Message::Text(text) => {
                    let kind = scan::classify(dialect, text);
                    if kind == want {
                        return Ok(());
                    }
                    if kind == Kind::Error {
                        return Err(format!("server error: {}", String::from_utf8_lossy(text)));
                    }
                }
                Message::Close(code) => return Err(format!("closed during setup ({code:?})")),
                _ => {}
            }
        }
        let n = stream
            .read(reader.spare())
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed during setup".into());
        }
        reader.filled(n);
    }
}

/// How many ready subscribers each project has, by kind (to know the expected deliveries).
pub struct ReadyCounts {
    pub unfiltered: Vec<AtomicU64>,
    pub filtered: Vec<AtomicU64>,
}

impl ReadyCounts {
    pub fn new(projects: usize) -> Self {
        ReadyCounts {
            unfiltered: (0..projects).map(|_| AtomicU64::new(0)).collect(),
            filtered: (0..projects).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Deliveries (events + dropped) owed to all ready subscribers.
    pub fn expected(&self, accepted_all: &[u64], accepted_filtered: &[u64]) -> u64 {
        (0..accepted_all.len())
            .map(|p| {
                self.unfiltered[p].load(Ordering::Relaxed) * accepted_all[p]
                    + self.filtered[p].load(Ordering::Relaxed) * accepted_filtered[p]
            })
            .sum()
    }
}

pub struct SubContext {
    pub routes: Arc<Routes>,
    pub counters: Arc<Counters>,
    pub fast_latency: Arc<ShardedHistogram>,
    pub slow_latency: Arc<ShardedHistogram>,
    pub ready: Arc<ReadyCounts>,
    pub handshakes: Arc<Semaphore>,
    pub source_addrs: Vec<IpAddr>,
    pub read_buffer_bytes: usize,
    pub slow_secs: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct SubSpec {
    pub index: usize,
    pub project: usize,
    pub filtered: bool,
    pub slow: bool,
}

async fn set_up(
    ctx: &SubContext,
    spec: SubSpec,
    reader: &mut FrameReader,
) -> Result<TcpStream, String> {
    let routes = &ctx.routes;
    let source = (!ctx.source_addrs.is_empty())
        .then(|| ctx.source_addrs[spec.index % ctx.source_addrs.len()]);
    let rcvbuf = spec.slow.then_some(SLOW_RCVBUF_BYTES);
    let mut stream = connect(routes.endpoint.addr, source, rcvbuf)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let path = routes.subscribe_path(spec.project, spec.filtered);
    upgrade(&mut stream, &routes.endpoint.host, &path, reader).await?;
    let dialect = routes.kind.dialect();
    match routes.kind {
        TargetKind::Mesher => {
            wait_for(&mut stream, reader, dialect, Kind::IssueCount).await?;
            if spec.filtered {
                let subscribe = format!(
                    "{{\"type\":\"subscribe\",\"filters\":{{\"level\":\"{FILTER_LEVEL}\"}}}}"
                );
                send_text(&mut stream, &subscribe).await?;
                wait_for(&mut stream, reader, dialect, Kind::FiltersUpdated).await?;
            }
        }
        TargetKind::Nchan => {}
        TargetKind::Sockudo => {
            wait_for(&mut stream, reader, dialect, Kind::PusherEstablished).await?;
            let channel = routes.peer_channel(spec.project, spec.filtered);
            let subscribe = format!(
                "{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":\"{channel}\"}}}}"
            );
            send_text(&mut stream, &subscribe).await?;
            wait_for(&mut stream, reader, dialect, Kind::PusherSubscribed).await?;
        }
    }
    Ok(stream)
}

/// Runs one subscriber until `stop` fires (or its sender is dropped); `start` carries the
/// publish start time (monotonic µs) that slow subscribers count their pause from. `stop` is a
/// oneshot per subscriber because polling it costs no shared lock in the hot read loop.
pub async fn run_subscriber(
    ctx: Arc<SubContext>,
    spec: SubSpec,
    mut stop: oneshot::Receiver<()>,
    mut start: watch::Receiver<Option<u64>>,
) -> SubOutcome {
    let mut outcome = SubOutcome {
        project: spec.project,
        filtered: spec.filtered,
        slow: spec.slow,
        ..SubOutcome::default()
    };
    let mut reader = FrameReader::with_capacity(ctx.read_buffer_bytes);
    let setup = {
        let _permit = ctx.handshakes.acquire().await;
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, set_up(&ctx, spec, &mut reader)).await
    };
    let mut stream = match setup {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            ctx.counters.setup_failed.fetch_add(1, Ordering::Relaxed);
            outcome.ended = Some(e);
            return outcome;
        }
        Err(_) => {
            ctx.counters.setup_failed.fetch_add(1, Ordering::Relaxed);
            outcome.ended = Some("subscribe timed out".into());
            return outcome;
        }
    };
    outcome.ready = true;
    let per_project = if spec.filtered {
        &ctx.ready.filtered
    } else {
        &ctx.ready.unfiltered
    };
    per_project[spec.project].fetch_add(1, Ordering::Relaxed);
    ctx.counters.ready.fetch_add(1, Ordering::Relaxed);

    if spec.slow {
        // Take nothing until slow_secs after the publishers start.
        let pause = async {
            let Ok(started) = start
                .wait_for(|s| s.is_some())
                .await
                .map(|s| s.unwrap_or(0))
            else {
                return;
            };
            let resume_us = started + (ctx.slow_secs * 1e6) as u64;
            let wait_us = resume_us.saturating_sub(crate::sys::monotonic_us());
            tokio::time::sleep(Duration::from_micros(wait_us)).await;
        };
        tokio::select! {
            _ = pause => {}
            _ = &mut stop => {
                return outcome;
            }
        }
    }
    read_loop(
        &ctx,
        spec,
        &mut stream,
        &mut reader,
        &mut stop,
        &mut outcome,
    )
    .await;
    if outcome.ended.is_some() {
        ctx.counters.ended_early.fetch_add(1, Ordering::Relaxed);
    } else {
        // Polite close; the reply is not awaited.
        let mut close = Vec::new();
        encode_client_frame(
            OPCODE_CLOSE,
            &1000u16.to_be_bytes(),
            rand::random(),
            &mut close,
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&close)).await;
    }
    outcome
}

async fn read_loop(
    ctx: &SubContext,
    spec: SubSpec,
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    stop: &mut oneshot::Receiver<()>,
    outcome: &mut SubOutcome,
) {
    let dialect = ctx.routes.kind.dialect();
    let latency = if spec.slow {
        &ctx.slow_latency
    } else {
        &ctx.fast_latency
    };
    let mut latencies_us: Vec<u64> = Vec::with_capacity(256);
    let mut replies: Vec<u8> = Vec::new();
    // Bytes left over from setup may already hold messages.
    let mut have_bytes = reader.buffered_bytes() > 0;
    loop {
        if !have_bytes {
            let read = tokio::select! {
                biased;
                _ = &mut *stop => return,
                read = stream.read(reader.spare()) => read,
            };
            match read {
                Ok(0) => {
                    outcome.ended = Some("closed by server".into());
                    return;
                }
                Ok(n) => reader.filled(n),
                Err(e) => {
                    outcome.ended = Some(format!("read: {e}"));
                    return;
                }
            }
        }
        have_bytes = false;
        let now_us = crate::sys::monotonic_us();
        let (mut events, mut dropped) = (0u64, 0u64);
        latencies_us.clear();
        loop {
            let message = match reader.next_message() {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    outcome.ended = Some(e.to_string());
                    break;
                }
            };
            match message {
                Message::Text(text) => match scan::classify(dialect, text) {
                    Kind::Event => {
                        events += 1;
                        match scan::sent_us(text) {
                            Some(sent) => latencies_us.push(now_us.saturating_sub(sent)),
                            None => outcome.unstamped += 1,
                        }
                        if spec.filtered && scan::level(text) != Some(FILTER_LEVEL.as_bytes()) {
                            outcome.wrong += 1;
                        }
                    }
                    Kind::Dropped(count) => {
                        dropped += count;
                        outcome.dropped_markers += 1;
                    }
                    Kind::Issue => outcome.issues += 1,
                    Kind::Error => outcome.error_messages += 1,
                    Kind::PusherPing => encode_client_frame(
                        OPCODE_TEXT,
                        b"{\"event\":\"pusher:pong\",\"data\":{}}",
                        rand::random(),
                        &mut replies,
                    ),
                    _ => {}
                },
                Message::Ping(payload) => {
                    encode_client_frame(OPCODE_PONG, payload, rand::random(), &mut replies)
                }
                Message::Close(code) => {
                    outcome.ended = Some(format!("close frame {code:?}"));
                    break;
                }
                Message::Binary(_) | Message::Pong => {}
            }
        }
        outcome.events += events;
        outcome.dropped += dropped;
        ctx.counters.add_deliveries(events, dropped, now_us);
        latency.record_batch(spec.index, &latencies_us);
        if outcome.ended.is_some() {
            return;
        }
        if !replies.is_empty() {
            if let Err(e) = stream.write_all(&replies).await {
                outcome.ended = Some(format!("write: {e}"));
                return;
            }
            replies.clear();
        }
    }
}
