//! Publishers: HTTP/1.1 keep-alive connections, each with a window of pipelined requests and an
//! optional pace, that count which events the server accepted.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::parse_response;
use crate::stats::{new_histogram, Counters, ProjectCounts};
use crate::sys::monotonic_us;
use crate::target::{Routes, FILTER_LEVEL};

/// Pause before reconnecting after a failed connect, so a dead server is not hammered.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Error replies whose bodies are kept for the report.
const ERROR_SAMPLES_MAX: usize = 3;

pub struct PubContext {
    pub routes: Arc<Routes>,
    pub counters: Arc<Counters>,
    /// Accepted events per project, and those of the filtered level.
    pub accepted: Arc<ProjectCounts>,
    pub levels: Vec<&'static str>,
    pub event_bytes: usize,
    pub source_addrs: Vec<IpAddr>,
}

#[derive(Clone, Copy, Debug)]
pub struct PubSpec {
    pub index: usize,
    /// Requests outstanding on this connection at most.
    pub window: usize,
    /// This connection's share of the offered rate; 0 = as fast as replies come back.
    pub rate_per_s: f64,
    /// Offset in (0, 1] of this connection's pace, in events: connections of one run get
    /// evenly spread phases so that together they send `rate * duration` events, not one
    /// extra per connection at the start.
    pub phase: f64,
    pub start_us: u64,
    /// No request is sent after this.
    pub end_us: u64,
    /// Replies still missing at this time count as errors.
    pub reply_deadline_us: u64,
}

#[derive(Debug)]
pub struct PubOutcome {
    pub sent: u64,
    pub accepted: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub statuses: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    /// Request-to-reply latency of every answered request.
    pub reply_latency: Histogram<u64>,
}

struct Pending {
    project: usize,
    filtered_level: bool,
    sent_us: u64,
}

/// Which project and level the event with sequence number `seq` gets: projects round-robin,
/// and each project cycles through the levels.
pub fn event_slot(seq: u64, projects: usize, levels: usize) -> (usize, usize) {
    let projects = projects.max(1) as u64;
    let project = (seq % projects) as usize;
    let level = ((seq / projects) % levels.max(1) as u64) as usize;
    (project, level)
}

/// Events a paced connection has owed after `elapsed_us`.
pub fn events_due(elapsed_us: u64, rate_per_s: f64, phase: f64) -> u64 {
    (elapsed_us as f64 * rate_per_s / 1e6 + phase) as u64
}

/// When the `n`th event of a paced connection is due, in µs after the start.
pub fn due_at_us(n: u64, rate_per_s: f64, phase: f64) -> u64 {
    ((n as f64 - phase).max(0.0) * 1e6 / rate_per_s).ceil() as u64
}

pub async fn run_publisher(ctx: Arc<PubContext>, spec: PubSpec) -> PubOutcome {
    let mut out = PubOutcome {
        sent: 0,
        accepted: 0,
        errors: 0,
        reconnects: 0,
        statuses: BTreeMap::new(),
        error_samples: Vec::new(),
        reply_latency: new_histogram(),
    };
    let source = (!ctx.source_addrs.is_empty())
        .then(|| ctx.source_addrs[spec.index % ctx.source_addrs.len()]);
    let projects = ctx.routes.projects.len();
    let mut requests: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut scratch: Vec<u8> = Vec::with_capacity(ctx.event_bytes + 256);
    let mut replies: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut pending: VecDeque<Pending> = VecDeque::with_capacity(spec.window);
    let mut issued: u64 = 0;
    let mut stream: Option<TcpStream> = None;

    loop {
        let now = monotonic_us();
        let publishing = now < spec.end_us;
        if !publishing && pending.is_empty() {
            break;
        }
        if now >= spec.reply_deadline_us {
            fail_pending(&ctx, &mut out, &mut pending, "no reply before the deadline");
            break;
        }
        if stream.is_none() {
            match crate::subscriber::connect(ctx.routes.endpoint.addr, source, None).await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    note_error(&ctx, &mut out, format!("connect: {e}"));
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            }
            replies.clear();
        }
        let conn = stream.as_mut().expect("connected above");

        // Fill the window with what is due.
        let due = if spec.rate_per_s > 0.0 {
            events_due(now - spec.start_us, spec.rate_per_s, spec.phase)
        } else {
            u64::MAX
        };
        while publishing && pending.len() < spec.window && issued < due {
            let seq = ctx.counters.next_seq.fetch_add(1, Ordering::Relaxed);
            let (project, level) = event_slot(seq, projects, ctx.levels.len());
            let level = ctx.levels[level];
            let sent_us = monotonic_us();
            ctx.routes.push_publish(
                &mut requests,
                &mut scratch,
                seq,
                project,
                level,
                sent_us,
                ctx.event_bytes,
            );
            pending.push_back(Pending {
                project,
                filtered_level: level == FILTER_LEVEL,
                sent_us,
            });
            issued += 1;
            out.sent += 1;
        }
        if !requests.is_empty() {
            let written = conn.write_all(&requests).await;
            requests.clear();
            if let Err(e) = written {
                fail_pending(&ctx, &mut out, &mut pending, &format!("write: {e}"));
                stream = None;
                out.reconnects += 1;
                continue;
            }
        }

        // Wait for replies, or until the next event is due.
        let wake_us = if !publishing {
            spec.reply_deadline_us
        } else if spec.rate_per_s > 0.0 && pending.len() < spec.window {
            let next_due = spec.start_us + due_at_us(issued + 1, spec.rate_per_s, spec.phase);
            next_due.min(spec.end_us)
        } else {
            spec.end_us
        };
        let sleep = tokio::time::sleep(Duration::from_micros(
            wake_us.saturating_sub(monotonic_us()),
        ));
        if pending.is_empty() {
            sleep.await;
            continue;
        }
        let read = tokio::select! {
            read = conn.read(&mut chunk) => read,
            _ = sleep => continue,
        };
        let n = match read {
            Ok(0) => {
                fail_pending(&ctx, &mut out, &mut pending, "closed by server");
                stream = None;
                out.reconnects += 1;
                continue;
            }
            Ok(n) => n,
            Err(e) => {
                fail_pending(&ctx, &mut out, &mut pending, &format!("read: {e}"));
                stream = None;
                out.reconnects += 1;
                continue;
            }
        };
        replies.extend_from_slice(&chunk[..n]);
        let reply_us = monotonic_us();
        let mut used = 0;
        let mut close = false;
        loop {
            match parse_response(&replies[used..]) {
                Ok(Some((response, taken))) => {
                    used += taken;
                    let Some(request) = pending.pop_front() else {
                        note_error(&ctx, &mut out, "reply without a request".into());
                        close = true;
                        break;
                    };
                    out.reply_latency
                        .saturating_record(reply_us.saturating_sub(request.sent_us).max(1));
                    *out.statuses.entry(response.status.to_string()).or_default() += 1;
                    if ctx.routes.accepted(response.status, &response.body) {
                        out.accepted += 1;
                        ctx.accepted.unfiltered[request.project].fetch_add(1, Ordering::Relaxed);
                        if request.filtered_level {
                            ctx.accepted.filtered[request.project].fetch_add(1, Ordering::Relaxed);
                        }
                        ctx.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        note_error(
                            &ctx,
                            &mut out,
                            format!(
                                "{} {}",
                                response.status,
                                String::from_utf8_lossy(&response.body)
                            ),
                        );
                    }
                    if response.close {
                        close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    note_error(&ctx, &mut out, e.to_string());
                    close = true;
                    break;
                }
            }
        }
        replies.drain(..used);
        if close {
            fail_pending(
                &ctx,
                &mut out,
                &mut pending,
                "connection closed with requests in flight",
            );
            stream = None;
            out.reconnects += 1;
        }
    }
    out
}

fn note_error(ctx: &PubContext, out: &mut PubOutcome, what: String) {
    out.errors += 1;
    ctx.counters.publish_errors.fetch_add(1, Ordering::Relaxed);
    if out.error_samples.len() < ERROR_SAMPLES_MAX {
        out.error_samples.push(what);
    }
}

/// Requests whose outcome cannot be known count as errors (never as accepted).
fn fail_pending(
    ctx: &PubContext,
    out: &mut PubOutcome,
    pending: &mut VecDeque<Pending>,
    why: &str,
) {
    if pending.is_empty() {
        return;
    }
    let lost = pending.len() as u64;
    pending.clear();
    out.errors += lost - 1;
    ctx.counters
        .publish_errors
        .fetch_add(lost - 1, Ordering::Relaxed);
    note_error(ctx, out, format!("{lost} requests without reply: {why}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_slots_spread_projects_and_cycle_levels_per_project() {
        let slots: Vec<(usize, usize)> = (0..8).map(|seq| event_slot(seq, 2, 3)).collect();
        assert_eq!(
            slots,
            vec![
                (0, 0),
                (1, 0),
                (0, 1),
                (1, 1),
                (0, 2),
                (1, 2),
                (0, 0),
                (1, 0)
            ]
        );
        assert_eq!(event_slot(5, 0, 0), (0, 0));
    }

    #[test]
    fn paced_connections_together_send_the_offered_rate() {
        let connections = 64;
        let rate_per_conn = 500.0 / connections as f64;
        let total: u64 = (0..connections)
            .map(|i| {
                events_due(
                    2_000_000,
                    rate_per_conn,
                    1.0 - i as f64 / connections as f64,
                )
            })
            .sum();
        assert!((1000..=1001).contains(&total), "{total}");
        // The first connection sends at once, the others later.
        assert_eq!(events_due(0, rate_per_conn, 1.0), 1);
        assert_eq!(events_due(0, rate_per_conn, 0.5), 0);
    }

    #[test]
    fn due_time_is_when_the_count_steps_up() {
        for phase in [1.0, 0.75, 0.1] {
            for n in 1..50u64 {
                let at = due_at_us(n, 300.0, phase);
                assert!(events_due(at, 300.0, phase) >= n, "n {n} phase {phase}");
                if at > 0 {
                    assert!(events_due(at - 1, 300.0, phase) < n, "n {n} phase {phase}");
                }
            }
        }
    }
}
