//! Stream subscribers: a hand-made WebSocket client over a tokio TcpStream whose read loop only
//! parses frame headers and scans messages by substring.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::frame::{
    encode_client_frame, FrameReader, Message, OPCODE_CLOSE, OPCODE_PONG, OPCODE_TEXT,
};
use crate::scan::{self, Dialect, Kind};
use crate::stats::{Counters, ProjectCounts, ShardedHistogram, SubOutcome};
use crate::target::{Routes, TargetKind, FILTER_LEVEL};

/// Upgrade response headers larger than this mean a broken server.
const UPGRADE_RESPONSE_BYTES_MAX: usize = 16 * 1024;
/// One subscriber's connect + upgrade + subscribe must finish within this.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Receive buffer of the slow subscribers: small so the server feels backpressure early.
pub const SLOW_RCVBUF_BYTES: u32 = 4096;
/// Any valid base64 of 16 bytes will do: the client does not check the accept hash.
const WEBSOCKET_KEY: &str = "bWVzaGVyLWxvYWQtMDAwMA==";

/// Stream clients bind explicit ports below the kernel's ephemeral range (32768 and up): once
/// most ephemeral ports are taken, the kernel's own search costs hundreds of µs per connect and
/// the client, not the server, would set the upgrade rate.
const CLIENT_PORT_MIN: u16 = 10_000;
const CLIENT_PORT_MAX: u16 = 32_767;
/// Ports tried per connection before giving up (a port may be held by a listener or by a
/// connection to the same server that is still in TIME_WAIT).
const BIND_ATTEMPTS_MAX: usize = 64;

/// Hands out (source address, port) pairs: addresses round-robin by subscriber, ports in order
/// per address from a random start (so that runs in a row do not reuse the same ports first).
pub struct PortPlan {
    sources: Vec<IpAddr>,
    cursors: Vec<AtomicUsize>,
}

impl PortPlan {
    /// `sources` empty means 127.0.0.1 (only used when the server is on loopback).
    pub fn new(sources: &[IpAddr]) -> Self {
        let sources = if sources.is_empty() {
            vec![IpAddr::from([127, 0, 0, 1])]
        } else {
            sources.to_vec()
        };
        let cursors = sources
            .iter()
            .map(|_| AtomicUsize::new(rand::random::<u16>() as usize))
            .collect();
        PortPlan { sources, cursors }
    }

    fn next(&self, index: usize) -> SocketAddr {
        let which = index % self.sources.len();
        let n = self.cursors[which].fetch_add(1, Ordering::Relaxed);
        let span = (CLIENT_PORT_MAX - CLIENT_PORT_MIN) as usize + 1;
        let port = CLIENT_PORT_MIN + (n % span) as u16;
        SocketAddr::new(self.sources[which], port)
    }
}

fn new_socket(rcvbuf_bytes: Option<u32>) -> std::io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    if let Some(bytes) = rcvbuf_bytes {
        socket.set_recv_buffer_size(bytes)?;
    }
    Ok(socket)
}

/// Opens a stream client's connection from an explicit source port (see `CLIENT_PORT_MIN`),
/// falling back to the kernel's choice when the server is not on loopback and no source
/// addresses were given. A small receive buffer is set before connecting, so that the
/// advertised window stays small.
pub async fn connect_client(
    addr: SocketAddr,
    ports: &PortPlan,
    explicit_sources: bool,
    index: usize,
    rcvbuf_bytes: Option<u32>,
) -> std::io::Result<TcpStream> {
    if !explicit_sources && !addr.ip().is_loopback() {
        return connect(addr, None, rcvbuf_bytes).await;
    }
    let mut last_error = None;
    for _ in 0..BIND_ATTEMPTS_MAX {
        let socket = new_socket(rcvbuf_bytes)?;
        socket.set_reuseaddr(true)?;
        if let Err(e) = socket.bind(ports.next(index)) {
            last_error = Some(e);
            continue;
        }
        match socket.connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                    || e.raw_os_error() == Some(libc::EADDRINUSE) =>
            {
                last_error = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("no client port")))
}

/// Opens a TCP connection with the kernel's choice of port, optionally from a given source
/// address (publishers: few connections).
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf_bytes: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = new_socket(rcvbuf_bytes)?;
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

pub struct SubContext {
    pub routes: Arc<Routes>,
    pub counters: Arc<Counters>,
    pub fast_latency: Arc<ShardedHistogram>,
    pub slow_latency: Arc<ShardedHistogram>,
    /// Ready subscribers of each kind per project (to know the expected deliveries).
    pub ready: Arc<ProjectCounts>,
    pub handshakes: Arc<Semaphore>,
    pub source_addrs: Vec<IpAddr>,
    pub ports: PortPlan,
    /// Set when the publishers start; later subscribers do not take part.
    pub publishing: AtomicBool,
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
    let rcvbuf = spec.slow.then_some(SLOW_RCVBUF_BYTES);
    let endpoint = routes.stream_endpoint(spec.index);
    let mut stream = connect_client(
        endpoint.addr,
        &ctx.ports,
        !ctx.source_addrs.is_empty(),
        spec.index,
        rcvbuf,
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let path = routes.subscribe_path(spec.project, spec.filtered);
    upgrade(&mut stream, &endpoint.host, &path, reader).await?;
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
        TargetKind::Nchan | TargetKind::Bugsink => {}
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
    let setup = async {
        let _permit = ctx.handshakes.acquire().await;
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, set_up(&ctx, spec, &mut reader)).await
    };
    let setup = tokio::select! {
        setup = setup => setup,
        _ = &mut stop => Ok(Err("stopped before it was ready".to_string())),
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
    let per_project = if spec.filtered {
        &ctx.ready.filtered
    } else {
        &ctx.ready.unfiltered
    };
    // Counted first, then checked: a subscriber counted before the publishers start was
    // subscribed before the first event, so it is owed every event of its project.
    per_project[spec.project].fetch_add(1, Ordering::SeqCst);
    if ctx.publishing.load(Ordering::SeqCst) {
        per_project[spec.project].fetch_sub(1, Ordering::SeqCst);
        ctx.counters.setup_failed.fetch_add(1, Ordering::Relaxed);
        outcome.ended = Some("subscribed only after publishing started".into());
        return outcome;
    }
    outcome.ready = true;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_plan_spreads_addresses_and_wraps_ports_in_range() {
        let sources: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        let plan = PortPlan::new(&sources);
        let first = plan.next(0);
        assert_eq!(plan.next(1).ip(), sources[1]);
        let span = (CLIENT_PORT_MAX - CLIENT_PORT_MIN) as usize + 1;
        let mut previous = first.port();
        for _ in 0..span + 5 {
            let next = plan.next(2);
            assert_eq!(next.ip(), sources[0]);
            assert!((CLIENT_PORT_MIN..=CLIENT_PORT_MAX).contains(&next.port()));
            let expected = if previous == CLIENT_PORT_MAX {
                CLIENT_PORT_MIN
            } else {
                previous + 1
            };
            assert_eq!(next.port(), expected);
            previous = next.port();
        }
        assert_eq!(
            PortPlan::new(&[]).next(7).ip(),
            IpAddr::from([127, 0, 0, 1])
        );
    }

    #[tokio::test]
    async fn clients_connect_from_planned_ports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plan = PortPlan::new(&[]);
        let accept = tokio::spawn(async move {
            let mut peers = Vec::new();
            for _ in 0..3 {
                peers.push(listener.accept().await.unwrap().1);
            }
            peers
        });
        let mut streams = Vec::new();
        for i in 0..3 {
            streams.push(
                connect_client(addr, &plan, false, i, Some(SLOW_RCVBUF_BYTES))
                    .await
                    .unwrap(),
            );
        }
        for peer in accept.await.unwrap() {
            assert!((CLIENT_PORT_MIN..=CLIENT_PORT_MAX).contains(&peer.port()));
        }
    }
}
