//! The `resume` scenario (Mesher only: the peers have no resume): subscribers that keep track
//! of the last offset they got drop their connection, a few per second, and come back with
//! `?since=EPOCH:OFFSET` while events keep arriving at a steady rate. Measures resumes per
//! server CPU-second and the replay latency (from the new connection's start to its `resumed`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Mutex};

use crate::frame::{FrameReader, Message};
use crate::scan;
use crate::stats::new_histogram;
use crate::subscriber::{connect, upgrade};
use crate::sys::monotonic_us;
use crate::target::Routes;

/// Read buffer of a resuming subscriber: a replay arrives in one burst.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// What all resuming subscribers counted.
#[derive(Default)]
pub struct ResumeStats {
    pub ready: AtomicU64,
    pub resumes: AtomicU64,
    pub recovered: AtomicU64,
    pub not_recovered: AtomicU64,
    pub replayed: AtomicU64,
    pub messages: AtomicU64,
    pub errors: AtomicU64,
    pub latency: Mutex<Option<Histogram<u64>>>,
}

impl ResumeStats {
    pub fn new() -> ResumeStats {
        ResumeStats {
            latency: Mutex::new(Some(new_histogram())),
            ..ResumeStats::default()
        }
    }
}

/// The offset a stream message carries (the first `"offset":` in it), if any.
pub fn offset_in(text: &[u8]) -> Option<u64> {
    let at = scan::find(text, b"\"offset\":")? + b"\"offset\":".len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// One subscriber: connects, follows the stream, and on each signal from `drops` drops its
/// connection and resumes from the last offset it got. Ends when `drops` closes.
pub async fn run_resumer(
    routes: Arc<Routes>,
    project: usize,
    mut drops: mpsc::Receiver<()>,
    stats: Arc<ResumeStats>,
) {
    let path = routes.subscribe_path(project, false);
    let mut place: Option<(String, u64)> = None;
    loop {
        let started_us = monotonic_us();
        let target = match &place {
            Some((epoch, offset)) => format!("{path}&since={epoch}:{offset}"),
            None => path.clone(),
        };
        let mut reader = FrameReader::with_capacity(READ_BUFFER_BYTES);
        let mut stream = match connect(routes.endpoint.addr, None, None).await {
            Ok(stream) => stream,
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if upgrade(&mut stream, &routes.endpoint.host, &target, &mut reader)
            .await
            .is_err()
        {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let resuming = place.is_some();
        let mut welcomed = false;
        let mut resumed = !resuming;
        loop {
            // Whatever is buffered first, then the socket or a signal to drop.
            loop {
                let text = match reader.next_message() {
                    Ok(Some(Message::Text(text))) => text.to_vec(),
                    Ok(Some(Message::Close(_))) | Err(_) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                };
                stats.messages.fetch_add(1, Ordering::Relaxed);
                if !welcomed {
                    welcomed = true;
                    let welcome: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
                    if place.is_none() {
                        let epoch = welcome["epoch"].as_str().unwrap_or_default().to_owned();
                        let offset = welcome["offset"].as_u64().unwrap_or(0);
                        place = Some((epoch, offset));
                        stats.ready.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                if !resumed && scan::find(&text, b"\"type\":\"resumed\"").is_some() {
                    resumed = true;
                    let reply: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
                    let latency_us = monotonic_us() - started_us;
                    stats.resumes.fetch_add(1, Ordering::Relaxed);
                    if reply["recovered"] == true {
                        stats.recovered.fetch_add(1, Ordering::Relaxed);
                        let replayed = reply["replayed"].as_u64().unwrap_or(0);
                        stats.replayed.fetch_add(replayed, Ordering::Relaxed);
                    } else {
                        stats.not_recovered.fetch_add(1, Ordering::Relaxed);
                        let epoch = reply["epoch"].as_str().unwrap_or_default().to_owned();
                        let offset = reply["offset"].as_u64().unwrap_or(0);
                        place = Some((epoch, offset));
                    }
                    if let Some(histogram) = stats.latency.lock().await.as_mut() {
                        let _ = histogram.record(latency_us.max(1));
                    }
                    continue;
                }
                if let (Some(offset), Some((_, last))) = (offset_in(&text), place.as_mut()) {
                    *last = (*last).max(offset);
                }
            }
            tokio::select! {
                read = stream.read(reader.spare()) => match read {
                    Ok(n) if n > 0 => reader.filled(n),
                    _ => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
                signal = drops.recv() => match signal {
                    // Drop the connection (no close handshake: a lost network) and resume.
                    Some(()) => break,
                    None => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_read_from_stream_messages() {
        assert_eq!(
            offset_in(br#"{"type":"event","offset":1234,"event_id":"x"}"#),
            Some(1234)
        );
        assert_eq!(offset_in(br#"{"type":"filters_updated"}"#), None);
        assert_eq!(
            offset_in(br#"{"type":"issue","offset":7,"issue":{}}"#),
            Some(7)
        );
    }
}
