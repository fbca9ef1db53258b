//! mesher-load: load generator for the Mesher server and its peers (Nchan, Sockudo, Bugsink).
//!
//! # Layout
//! - `frame`: WebSocket frame reader (server frames) and encoder (masked client frames).
//! - `scan`: substring inspection of stream messages (kind, `sent_us`, level).
//! - `http`: HTTP/1.1 response parser for keep-alive, pipelined publishers.
//! - `pusher`: Pusher HTTP API signing (Sockudo).
//! - `sentry`: gzip Sentry envelopes as sentry-python sends them, routes from a DSN.
//! - `target`: per-server routes: projects/channels, subscribe paths, publish requests.
//! - `subscriber`: stream connections and their read loop.
//! - `publisher`: paced, windowed publishers that count accepted events.
//! - `resume`: subscribers that drop their connection and resume from their last offset.
//! - `mixed`: every ingest path and stream behaviour at once, for soak runs (`scripts/soak.sh`).
//! - `stats`: shared counters, latency histograms, the per-subscriber count check.
//! - `sys`: monotonic clock, server CPU/RSS from /proc, TCP segment counter.
//!
//! Every run is bounded: a setup timeout, the publish duration, a drain limit, and a watchdog
//! thread that exits the process at a hard deadline whatever is stuck.

#![recursion_limit = "256"]

mod frame;
mod http;
mod mixed;
mod publisher;
mod pusher;
mod resume;
mod scan;
mod sentry;
mod stats;
mod subscriber;
mod sys;
mod target;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch, Semaphore};

use publisher::{PubContext, PubOutcome, PubSpec};
use stats::{percentiles_us, Counters, ProjectCounts, ShardedHistogram, SubOutcome};
use subscriber::{SubContext, SubSpec};
use sys::{monotonic_us, ServerProbe, ServerSample};
use target::{Endpoint, PusherApp, Routes, TargetKind};

/// Upgrades in flight at once while subscribers connect: enough to ramp quickly, few enough
/// not to overflow the server's accept backlog.
const HANDSHAKES_IN_FLIGHT: usize = 128;
/// After the last publish, replies still missing this much later count as errors.
const PUBLISH_REPLY_WAIT_S: f64 = 10.0;
/// Deliveries are complete when none arrived for this long after publishing stopped.
const DRAIN_QUIET_S: f64 = 1.0;
/// Drain never lasts longer than this after publishing (or the slow pause) ended.
const DRAIN_MAX_S: f64 = 15.0;
/// Time allowed for subscribers to close and report after the run.
const TEARDOWN_S: f64 = 10.0;
/// Extra margin of the watchdog over the sum of all phase limits.
const WATCHDOG_MARGIN_S: f64 = 15.0;
/// File descriptors kept aside for publishers, admin calls and the runtime.
const SPARE_FDS: u64 = 200;
/// Subscribers' initial read buffer; the reader grows it when a burst needs more.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Idle connections (conns) start with a small read buffer: they mostly wait.
const IDLE_READ_BUFFER_BYTES: usize = 1024;
/// conns: pause between the last upgrade and the first idle sample, so accept bursts settle.
const CONNS_SETTLE: Duration = Duration::from_secs(1);
/// sentry: the server is idle again after this long under `SETTLE_IDLE_SHARE` of a CPU.
const SETTLE_WINDOW: Duration = Duration::from_millis(500);
const SETTLE_IDLE_SHARE: f64 = 0.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// 1 project, 1,000 subscribers, 512 B events as fast as the server takes them.
    Fanout,
    /// 1,000 projects x 10 subscribers, events spread evenly.
    Rooms,
    /// fanout with a fraction of subscribers that stop reading for --slow-secs.
    Slow,
    /// 1,000 subscribers, half filtered to level=error, mixed levels.
    Filters,
    /// HTTP keep-alive publishes on 64 connections, ~1 KiB events, no subscribers.
    Ingest,
    /// 2,000 events/s into 20 projects, 1,000 filtered subscribers.
    E2e,
    /// Idle stream connections: upgrades/s, RSS per connection, idle CPU.
    Conns,
    /// 1,000 subscribers dropping and resuming (`?since=`) at --resume-rate per second under a
    /// steady 200 events/s (Mesher only: the peers have no resume).
    Resume,
    /// Sentry envelopes (one ~4 KB Python exception event each, gzip) on 16 connections, no
    /// subscribers; Mesher or Bugsink. Server CPU is counted until the server is idle again.
    Sentry,
    /// The same events as `sentry`, each as plain JSON to Mesher's own `/api/v1/events`: what
    /// the envelope, its parsing and the gzip inflate cost against the native path (Mesher only).
    #[value(name = "sentry_native")]
    SentryNative,
    /// Soak load (Mesher only): single, bulk, WebSocket and Sentry ingest into 4 projects,
    /// 5,000 stream subscribers (filtered, slow, never reading, reconnecting), issue status
    /// changes; checks delivery accounting, writes accepted event ids and server samples.
    Mixed,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Rooms => "rooms",
            Scenario::Slow => "slow",
            Scenario::Filters => "filters",
            Scenario::Ingest => "ingest",
            Scenario::E2e => "e2e",
            Scenario::Conns => "conns",
            Scenario::Resume => "resume",
            Scenario::Sentry => "sentry",
            Scenario::SentryNative => "sentry_native",
            Scenario::Mixed => "mixed",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "mesher-load",
    about = "Load generator for Mesher and its peers (Nchan, Sockudo, Bugsink)",
    // A later value wins, so scripts can append overrides to a scenario's arguments.
    args_override_self = true
)]
struct Cli {
    scenario: Scenario,
    #[arg(long, value_enum, default_value = "mesher")]
    target: TargetKind,
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Where stream subscribers connect, round-robin (other nodes of one Mesher); default:
    /// `--url`. Events are still posted to `--url`.
    #[arg(long, value_delimiter = ',')]
    stream_url: Vec<String>,
    /// Mesher admin token (creates the benchmark's projects).
    #[arg(long, env = "MESHER_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Stream subscribers (conns: idle connections).
    #[arg(long)]
    subscribers: Option<usize>,
    /// Projects (channels) the subscribers and events are spread over.
    #[arg(long)]
    projects: Option<usize>,
    /// Size of each event's JSON.
    #[arg(long)]
    event_bytes: Option<usize>,
    /// Events per second offered; 0 = as fast as the server answers, --inflight outstanding.
    #[arg(long)]
    rate: Option<f64>,
    /// Publish requests outstanding at once, over all publisher connections.
    #[arg(long)]
    inflight: Option<usize>,
    /// Seconds of publishing (conns: seconds of idle measurement).
    #[arg(long)]
    duration: Option<f64>,
    /// Publisher (ingest) connections.
    #[arg(long)]
    connections: Option<usize>,
    /// Source addresses to bind client sockets to, round-robin (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<IpAddr>,
    /// Server process(es) whose CPU time and RSS are measured (nginx: master,worker).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Print the result as one JSON object on stdout (the markdown row goes to stderr).
    #[arg(long)]
    json: bool,
    /// Share of subscribers that stop reading (slow).
    #[arg(long)]
    slow_fraction: Option<f64>,
    /// How long slow subscribers stop reading after publishing starts.
    #[arg(long)]
    slow_secs: Option<f64>,
    /// Subscribers that drop their connection and resume, per second (resume).
    #[arg(long, default_value_t = 50.0)]
    resume_rate: f64,
    /// sentry: the DSN to send envelopes to (Bugsink); Mesher's comes from project creation.
    #[arg(long)]
    dsn: Option<String>,
    /// sentry: after the last reply, server CPU keeps being counted until the server is idle
    /// (under 5% of a CPU for half a second), for at most this many seconds.
    #[arg(long, default_value_t = 30.0)]
    settle_max: f64,
    /// Seconds allowed for creating projects and connecting subscribers.
    #[arg(long, default_value_t = 120.0)]
    setup_timeout: f64,
    /// mixed: file to write the id of every event the server accepted to, one per line.
    #[arg(long)]
    accepted_ids: Option<std::path::PathBuf>,
    /// mixed: file to append a JSON line of server samples to every 10 s.
    #[arg(long)]
    samples: Option<std::path::PathBuf>,
    #[arg(long, default_value = "bench")]
    app_id: String,
    #[arg(long, default_value = "bench-key")]
    app_key: String,
    #[arg(long, default_value = "bench-secret")]
    app_secret: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilterMode {
    None,
    Half,
    All,
}

#[derive(Clone, Debug)]
struct Plan {
    scenario: Scenario,
    target: TargetKind,
    subscribers: usize,
    projects: usize,
    event_bytes: usize,
    rate: f64,
    inflight: usize,
    connections: usize,
    duration_s: f64,
    slow_fraction: f64,
    slow_secs: f64,
    filter: FilterMode,
    levels: Vec<&'static str>,
}

impl Plan {
    fn from_cli(cli: &Cli) -> Plan {
        use Scenario::*;
        // (subscribers, projects, event bytes, rate, connections, window per connection,
        //  duration, filter)
        let (subscribers, projects, event_bytes, rate, connections, window, duration_s, filter) =
            match cli.scenario {
                Fanout | Slow => (1000, 1, 512, 0.0, 1, 1, 10.0, FilterMode::None),
                Rooms => (10_000, 1000, 512, 0.0, 4, 1, 10.0, FilterMode::None),
                Filters => (1000, 1, 512, 0.0, 1, 1, 10.0, FilterMode::Half),
                Ingest => (0, 1, 1024, 0.0, 64, 1, 10.0, FilterMode::None),
                E2e => (1000, 20, 512, 2000.0, 4, 16, 10.0, FilterMode::All),
                Conns => (18_000, 1, 512, 0.0, 0, 0, 5.0, FilterMode::None),
                Resume => (1000, 1, 512, 200.0, 1, 16, 20.0, FilterMode::None),
                Sentry | SentryNative => (0, 1, 0, 0.0, 16, 1, 10.0, FilterMode::None),
                // Rates and connections of `mixed` are its own (see mixed.rs).
                Mixed => (5000, 4, 0, 0.0, 1, 1, 60.0, FilterMode::None),
            };
        let slow_secs = cli.slow_secs.unwrap_or(60.0);
        let duration_s = cli.duration.unwrap_or(if cli.scenario == Slow {
            slow_secs + 10.0
        } else {
            duration_s
        });
        let levels = match filter {
            FilterMode::None => vec!["error"],
            FilterMode::Half => vec!["error", "warning", "info"],
            FilterMode::All => vec!["error", "warning"],
        };
        let mut connections = cli.connections.unwrap_or(connections);
        let inflight = cli.inflight.unwrap_or(window * connections);
        if matches!(cli.target, TargetKind::Sockudo | TargetKind::Bugsink) && inflight > connections
        {
            // Sockudo (HTTP API) and Bugsink (gunicorn's sync workers) close the connection
            // after every reply, so a pipelined request would be lost: each request in flight
            // needs its own connection.
            connections = inflight;
        }
        Plan {
            scenario: cli.scenario,
            target: cli.target,
            subscribers: cli.subscribers.unwrap_or(subscribers),
            projects: cli.projects.unwrap_or(projects).max(1),
            event_bytes: cli.event_bytes.unwrap_or(event_bytes),
            rate: cli.rate.unwrap_or(rate).max(0.0),
            inflight,
            connections,
            duration_s,
            slow_fraction: if cli.scenario == Slow {
                cli.slow_fraction.unwrap_or(0.1).clamp(0.0, 1.0)
            } else {
                0.0
            },
            slow_secs,
            filter,
            levels,
        }
    }

    fn sub_spec(&self, index: usize) -> SubSpec {
        let filtered = match self.filter {
            FilterMode::None => false,
            FilterMode::Half => index % 2 == 1,
            FilterMode::All => true,
        };
        // Spread slow subscribers evenly: index i is slow when floor(i*f) steps up.
        let f = self.slow_fraction;
        let slow = f > 0.0 && ((index + 1) as f64 * f).floor() > (index as f64 * f).floor();
        SubSpec {
            index,
            project: index % self.projects,
            filtered,
            slow,
        }
    }

    /// Windows of the publisher connections: `inflight` spread over them, at least one each.
    fn windows(&self) -> Vec<usize> {
        let n = self.connections;
        (0..n)
            .map(|i| (self.inflight / n + usize::from(i < self.inflight % n)).max(1))
            .collect()
    }
}

/// One publisher per connection, its share of the rate and of the in-flight window, their
/// sends spread evenly over each period, from `start_us` to `end_us`.
fn spawn_publishers(
    plan: &Plan,
    ctx: &Arc<PubContext>,
    start_us: u64,
    end_us: u64,
) -> Vec<tokio::task::JoinHandle<publisher::PubOutcome>> {
    let rate_per_conn = plan.rate / plan.connections as f64;
    plan.windows()
        .into_iter()
        .enumerate()
        .map(|(index, window)| {
            tokio::spawn(publisher::run_publisher(
                ctx.clone(),
                PubSpec {
                    index,
                    window,
                    rate_per_s: rate_per_conn,
                    phase: 1.0 - index as f64 / plan.connections as f64,
                    start_us,
                    end_us,
                    reply_deadline_us: end_us + (PUBLISH_REPLY_WAIT_S * 1e6) as u64,
                },
            ))
        })
        .collect()
}

fn main() {
    let cli = Cli::parse();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Pinned to one CPU, a single-threaded runtime spends less per wake-up.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder.enable_all().build().expect("tokio runtime");
    let json_output = cli.json;
    // The mixed report is not a benchmark row.
    let headed = cli.scenario != Scenario::Mixed;
    match runtime.block_on(run(cli)) {
        Ok(report) => {
            if json_output {
                eprintln!("{}", report.markdown);
                println!("{}", report.json);
            } else {
                if headed {
                    println!("{}", MARKDOWN_HEADER);
                }
                println!("{}", report.markdown);
            }
            // Do not wait for tasks stuck on dead sockets.
            runtime.shutdown_timeout(Duration::from_millis(500));
        }
        Err(e) => {
            eprintln!("mesher-load: {e}");
            runtime.shutdown_timeout(Duration::from_millis(500));
            std::process::exit(1);
        }
    }
}

struct Report {
    json: Value,
    markdown: String,
}

const MARKDOWN_HEADER: &str = "| scenario | target | subs | inflight | sent | deliveries | deliveries/s | server CPU s | per server CPU-s | p50 µs | p99 µs | p99.9 µs | dropped | wrong | missing | RSS MiB | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn markdown_row(v: &Value) -> String {
    let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
    format!(
        "| {} | {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
        v["scenario"].as_str().unwrap_or(""),
        v["target"].as_str().unwrap_or(""),
        n("subscribers"),
        n("inflight"),
        n("sent"),
        n("deliveries"),
        n("deliveries_per_s"),
        n("server_cpu_s"),
        n("deliveries_per_server_cpu_s"),
        n("p50_us"),
        n("p99_us"),
        n("p999_us"),
        n("dropped"),
        n("wrong"),
        n("missing"),
        n("rss_kib") / 1024.0,
        n("errors"),
    )
}

fn spawn_watchdog(limit_s: f64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(limit_s));
        eprintln!("mesher-load: hard deadline of {limit_s:.0}s reached, aborting");
        std::process::exit(3);
    });
}

fn sample(probe: &ServerProbe) -> Option<ServerSample> {
    if !probe.is_set() {
        return None;
    }
    match probe.sample() {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("mesher-load: server sample failed: {e}");
            None
        }
    }
}

async fn run(cli: Cli) -> Result<Report, String> {
    if cli.scenario == Scenario::Mixed {
        return run_mixed(&cli).await;
    }
    let plan = Plan::from_cli(&cli);
    if plan.scenario == Scenario::Resume && plan.target != TargetKind::Mesher {
        return Err(format!(
            "the resume scenario is Mesher only: {} has no resume",
            plan.target.name()
        ));
    }
    let nofile = sys::raise_nofile_limit();
    let fds_needed = (plan.subscribers + plan.connections) as u64 + SPARE_FDS;
    if nofile < fds_needed {
        return Err(format!(
            "{fds_needed} file descriptors needed but the limit is {nofile}: run several processes"
        ));
    }
    let is_sentry = matches!(plan.scenario, Scenario::Sentry | Scenario::SentryNative);
    let runs_here = match plan.target {
        TargetKind::Mesher => true,
        TargetKind::Bugsink => plan.scenario == Scenario::Sentry,
        TargetKind::Nchan | TargetKind::Sockudo => !is_sentry,
    };
    if !runs_here {
        return Err(format!(
            "{} does not run the {} scenario (sentry: mesher or bugsink)",
            plan.target.name(),
            plan.scenario.name()
        ));
    }
    let watchdog_s = cli.setup_timeout
        + plan.duration_s
        + if is_sentry { cli.settle_max } else { 0.0 }
        + plan.slow_secs * f64::from(u8::from(plan.slow_fraction > 0.0))
        + PUBLISH_REPLY_WAIT_S
        + DRAIN_MAX_S
        + TEARDOWN_S
        + WATCHDOG_MARGIN_S;
    spawn_watchdog(watchdog_s);

    let endpoint = Endpoint::resolve(&cli.url)
        .await
        .map_err(|e| format!("resolve {}: {e}", cli.url))?;
    let run_id = format!(
        "{:x}",
        (sys::unix_time_s() << 20) ^ u64::from(std::process::id())
    );
    let setup = async {
        match plan.target {
            TargetKind::Mesher => {
                let token = cli
                    .admin_token
                    .as_deref()
                    .ok_or("--admin-token is required for mesher")?;
                target::create_mesher_projects(&endpoint, token, &run_id, plan.projects).await
            }
            _ => Ok(Routes::peer_projects(&run_id, plan.projects)),
        }
    };
    let projects = tokio::time::timeout(Duration::from_secs_f64(cli.setup_timeout), setup)
        .await
        .map_err(|_| "project setup timed out".to_string())??;
    let app = PusherApp {
        id: cli.app_id.clone(),
        key: cli.app_key.clone(),
        secret: cli.app_secret.clone(),
    };
    let filtered_channels = plan.filter != FilterMode::None && plan.target != TargetKind::Mesher;
    let dsn = match (is_sentry, &cli.dsn) {
        (false, _) => None,
        (true, Some(dsn)) => Some(dsn.clone()),
        (true, None) if plan.target == TargetKind::Mesher => Some(
            projects[0]
                .dsn
                .clone()
                .ok_or("the project answer carries no dsn")?,
        ),
        (true, None) => return Err("--dsn is required for bugsink".into()),
    };
    let mut routes = Routes::new(plan.target, endpoint, projects, app, filtered_channels);
    if let Some(dsn) = dsn {
        let native = plan.scenario == Scenario::SentryNative;
        routes = routes.with_sentry(sentry::Dsn::parse(&dsn)?, rand::random(), native);
    }
    if !cli.stream_url.is_empty() {
        let mut endpoints = Vec::new();
        for url in &cli.stream_url {
            let endpoint = Endpoint::resolve(url)
                .await
                .map_err(|e| format!("resolve {url}: {e}"))?;
            endpoints.push(endpoint);
        }
        routes = routes.with_stream_endpoints(endpoints);
        // Projects made through `--url` reach the other nodes within 1 s (PROTOCOL 10).
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let routes = Arc::new(routes);
    let probe = ServerProbe::new(cli.server_pid.clone());
    if plan.scenario == Scenario::Conns {
        run_conns(&cli, &plan, routes, &probe).await
    } else if plan.scenario == Scenario::Resume {
        run_resume(&cli, &plan, routes, &probe).await
    } else {
        run_traffic(&cli, &plan, routes, &probe).await
    }
}

struct Subscribers {
    ctx: Arc<SubContext>,
    handles: Vec<tokio::task::JoinHandle<SubOutcome>>,
    stops: Vec<oneshot::Sender<()>>,
    start: watch::Sender<Option<u64>>,
}

fn spawn_subscribers(
    cli: &Cli,
    plan: &Plan,
    routes: Arc<Routes>,
    counters: Arc<Counters>,
    read_buffer_bytes: usize,
) -> Subscribers {
    let (start, start_rx) = watch::channel(None);
    let ctx = Arc::new(SubContext {
        routes,
        counters,
        fast_latency: Arc::new(ShardedHistogram::default()),
        slow_latency: Arc::new(ShardedHistogram::default()),
        ready: Arc::new(ProjectCounts::new(plan.projects)),
        handshakes: Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT)),
        source_addrs: cli.source_addrs.clone(),
        ports: subscriber::PortPlan::new(&cli.source_addrs),
        publishing: std::sync::atomic::AtomicBool::new(false),
        read_buffer_bytes,
        slow_secs: plan.slow_secs,
    });
    let mut stops = Vec::with_capacity(plan.subscribers);
    let handles = (0..plan.subscribers)
        .map(|index| {
            let (stop, stop_rx) = oneshot::channel();
            stops.push(stop);
            tokio::spawn(subscriber::run_subscriber(
                ctx.clone(),
                plan.sub_spec(index),
                stop_rx,
                start_rx.clone(),
            ))
        })
        .collect();
    Subscribers {
        ctx,
        handles,
        stops,
        start,
    }
}

/// Waits until every subscriber is ready or failed, or the setup timeout; returns the seconds
/// the ramp took.
async fn wait_ready(cli: &Cli, plan: &Plan, counters: &Counters) -> f64 {
    let begin = monotonic_us();
    let deadline = begin + (cli.setup_timeout * 1e6) as u64;
    let mut last_print = begin;
    loop {
        let ready = counters.ready.load(Ordering::Relaxed);
        let failed = counters.setup_failed.load(Ordering::Relaxed);
        let now = monotonic_us();
        if ready + failed >= plan.subscribers || now >= deadline {
            eprintln!(
                "setup: {ready}/{} subscribers ready, {failed} failed, {:.1}s",
                plan.subscribers,
                (now - begin) as f64 / 1e6
            );
            return (now - begin) as f64 / 1e6;
        }
        if now - last_print >= 1_000_000 {
            last_print = now;
            eprintln!("setup: {ready}/{} ready, {failed} failed", plan.subscribers);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn collect_subscribers(subs: Subscribers) -> (Vec<SubOutcome>, usize) {
    for stop in subs.stops {
        let _ = stop.send(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(TEARDOWN_S);
    let mut outcomes = Vec::with_capacity(subs.handles.len());
    let mut lost = 0;
    for handle in subs.handles {
        let abort = handle.abort_handle();
        match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            Ok(Err(_)) => lost += 1,
            Err(_) => {
                abort.abort();
                lost += 1;
            }
        }
    }
    (outcomes, lost)
}

struct Progress {
    begin_us: u64,
    last_us: u64,
    last_sent: u64,
    last_delivered: u64,
    rss_peak_kib: u64,
}

impl Progress {
    fn new(begin_us: u64) -> Self {
        Progress {
            begin_us,
            last_us: begin_us,
            last_sent: 0,
            last_delivered: 0,
            rss_peak_kib: 0,
        }
    }

    /// Prints a line when a second has passed since the last one.
    fn tick(&mut self, counters: &Counters, probe: &ServerProbe) {
        let now = monotonic_us();
        if now - self.last_us < 1_000_000 {
            return;
        }
        let dt = (now - self.last_us) as f64 / 1e6;
        let sent = counters.accepted.load(Ordering::Relaxed);
        let delivered = counters.delivered.load(Ordering::Relaxed);
        let rss = sample(probe).map(|s| s.rss_kib).unwrap_or(0);
        self.rss_peak_kib = self.rss_peak_kib.max(rss);
        eprintln!(
            "[{:6.1}s] sent {sent} ({:.0}/s) delivered {delivered} ({:.0}/s) dropped {} errors {} rss {} MiB",
            (now - self.begin_us) as f64 / 1e6,
            (sent - self.last_sent) as f64 / dt,
            (delivered - self.last_delivered) as f64 / dt,
            counters.dropped.load(Ordering::Relaxed),
            counters.publish_errors.load(Ordering::Relaxed),
            rss / 1024,
        );
        self.last_us = now;
        self.last_sent = sent;
        self.last_delivered = delivered;
    }
}

async fn run_traffic(
    cli: &Cli,
    plan: &Plan,
    routes: Arc<Routes>,
    probe: &ServerProbe,
) -> Result<Report, String> {
    if plan.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let counters = Arc::new(Counters::default());
    let subs = spawn_subscribers(
        cli,
        plan,
        routes.clone(),
        counters.clone(),
        READ_BUFFER_BYTES,
    );
    wait_ready(cli, plan, &counters).await;
    subs.ctx.publishing.store(true, Ordering::SeqCst);
    if plan.subscribers > 0 && counters.ready.load(Ordering::Relaxed) == 0 {
        let (outcomes, _) = collect_subscribers(subs).await;
        let why = outcomes
            .iter()
            .find_map(|o| o.ended.clone())
            .unwrap_or_default();
        return Err(format!("no subscriber could subscribe: {why}"));
    }

    let accepted = Arc::new(ProjectCounts::new(plan.projects));
    let pub_ctx = Arc::new(PubContext {
        routes: routes.clone(),
        counters: counters.clone(),
        accepted: accepted.clone(),
        levels: plan.levels.clone(),
        event_bytes: plan.event_bytes,
        source_addrs: cli.source_addrs.clone(),
    });
    let before = sample(probe);
    let segs_before = sys::tcp_out_segs();
    let client_cpu_before = sys::own_cpu_s();
    let start_us = monotonic_us();
    let _ = subs.start.send(Some(start_us));
    let end_us = start_us + (plan.duration_s * 1e6) as u64;
    let pub_handles = spawn_publishers(plan, &pub_ctx, start_us, end_us);

    let mut progress = Progress::new(start_us);
    while !pub_handles.iter().all(|h| h.is_finished()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        progress.tick(&counters, probe);
    }
    let mut publishers: Vec<PubOutcome> = Vec::new();
    for handle in pub_handles {
        publishers.push(
            handle
                .await
                .map_err(|e| format!("publisher panicked: {e}"))?,
        );
    }
    let publish_end_us = monotonic_us();

    // Drain: until every owed delivery arrived (or was reported dropped), or quiet, or the limit.
    let slow_resume_us = if plan.slow_fraction > 0.0 {
        start_us + (plan.slow_secs * 1e6) as u64
    } else {
        0
    };
    let drain_from_us = publish_end_us.max(slow_resume_us);
    if plan.subscribers > 0 {
        loop {
            let (all, filtered) = accepted.snapshot();
            let owed = subs.ctx.ready.expected(&all, &filtered);
            let got = counters.delivered.load(Ordering::Relaxed)
                + counters.dropped.load(Ordering::Relaxed);
            let now = monotonic_us();
            let last = counters
                .last_delivery_us
                .load(Ordering::Relaxed)
                .max(drain_from_us);
            let past_slow_pause = now >= slow_resume_us;
            if past_slow_pause && got >= owed {
                break;
            }
            if past_slow_pause && now.saturating_sub(last) as f64 > DRAIN_QUIET_S * 1e6 {
                break;
            }
            if now.saturating_sub(drain_from_us) as f64 > DRAIN_MAX_S * 1e6 {
                eprintln!("drain: limit reached with {got} of {owed} deliveries accounted");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            progress.tick(&counters, probe);
        }
    }
    // Work the server does after answering (Bugsink digests in a background worker, Mesher
    // writes to storage) is part of what an envelope costs.
    let settle_s = if matches!(plan.scenario, Scenario::Sentry | Scenario::SentryNative) {
        settle(probe, cli.settle_max).await
    } else {
        None
    };
    let after = sample(probe);
    let segs_after = sys::tcp_out_segs();
    let client_cpu_s = sys::own_cpu_s() - client_cpu_before;
    let last_delivery_us = counters.last_delivery_us.load(Ordering::Relaxed);
    let window_end_us = if plan.subscribers > 0 {
        publish_end_us.max(last_delivery_us)
    } else {
        publish_end_us
    };
    let window_s = (window_end_us - start_us) as f64 / 1e6;
    let fast_latency = subs.ctx.fast_latency.merged();
    let slow_latency = subs.ctx.slow_latency.merged();
    let (outcomes, lost_outcomes) = collect_subscribers(subs).await;

    let (all, filtered) = accepted.snapshot();
    let drops_reported = plan.target == TargetKind::Mesher;
    let check = stats::check(&outcomes, &all, &filtered, drops_reported);
    let slow_ended = outcomes
        .iter()
        .filter(|o| o.slow && o.ready && o.ended.is_some())
        .count();
    let setup_failed = counters.setup_failed.load(Ordering::Relaxed);
    let unstamped: u64 = outcomes.iter().map(|o| o.unstamped).sum();
    let error_messages: u64 = outcomes.iter().map(|o| o.error_messages).sum();
    let first_ended = outcomes
        .iter()
        .find_map(|o| o.ended.clone().filter(|_| !o.slow || !o.ready));

    let mut reply_latency = stats::new_histogram();
    let mut statuses = serde_json::Map::new();
    let mut error_samples = Vec::new();
    let (mut attempted, mut publish_errors, mut reconnects) = (0u64, 0u64, 0u64);
    for p in &publishers {
        reply_latency.add(&p.reply_latency).expect("same bounds");
        attempted += p.sent;
        publish_errors += p.errors;
        reconnects += p.reconnects;
        for (status, count) in &p.statuses {
            let entry = statuses.entry(status.clone()).or_insert(json!(0));
            *entry = json!(entry.as_u64().unwrap_or(0) + count);
        }
        error_samples.extend(p.error_samples.iter().cloned());
    }
    error_samples.truncate(5);
    let sent: u64 = all.iter().sum();

    let is_ingest = matches!(
        plan.scenario,
        Scenario::Ingest | Scenario::Sentry | Scenario::SentryNative
    );
    let deliveries = if is_ingest { sent } else { check.received };
    let latency = if is_ingest {
        &reply_latency
    } else {
        &fast_latency
    };
    let (p50, p99, p999) = percentiles_us(latency);
    let (pub_p50, pub_p99, _) = percentiles_us(&reply_latency);
    let (_, slow_p99, _) = percentiles_us(&slow_latency);
    let server_cpu_s = match (before, after) {
        (Some(b), Some(a)) => Some(a.cpu_s - b.cpu_s),
        _ => None,
    };
    let per_cpu = server_cpu_s
        .filter(|c| *c > 0.0)
        .map(|c| deliveries as f64 / c);
    let segs_per_delivery = match (segs_before, segs_after) {
        (Some(b), Some(a)) if deliveries > 0 => Some((a - b) as f64 / deliveries as f64),
        _ => None,
    };
    let ended_not_slow = check.ended_early as usize - slow_ended;
    let errors = publish_errors + (setup_failed + ended_not_slow + lost_outcomes) as u64;
    let v = json!({
        "scenario": plan.scenario.name(),
        "target": plan.target.name(),
        "duration": round3(window_s),
        "subscribers": plan.subscribers,
        "subscribers_ready": check.subscribers_ready,
        "projects": plan.projects,
        "connections": plan.connections,
        "inflight": plan.inflight,
        "rate_offered": plan.rate,
        "event_bytes": plan.event_bytes,
        "sent": sent,
        "publish_attempted": attempted,
        "deliveries": deliveries,
        "deliveries_per_s": round3(deliveries as f64 / window_s.max(1e-9)),
        "expected": check.expected,
        "dropped": check.dropped,
        "dropped_markers": check.dropped_markers,
        "missing": check.missing,
        "excess": check.excess,
        "wrong": check.wrong,
        "violations": check.violations,
        "first_violation": check.first_violation,
        "server_cpu_s": server_cpu_s.map(round3),
        "deliveries_per_server_cpu_s": per_cpu.map(round3),
        "client_cpu_s": round3(client_cpu_s),
        "p50_us": p50,
        "p99_us": p99,
        "p999_us": p999,
        "publish_p50_us": pub_p50,
        "publish_p99_us": pub_p99,
        "slow_p99_us": slow_p99,
        "slow_ended": slow_ended,
        "settle_s": settle_s.map(|(s, _)| round3(s)),
        "settled": settle_s.map(|(_, idle)| idle),
        "rss_kib": after.map(|s| s.rss_kib),
        "rss_peak_kib": progress.rss_peak_kib.max(after.map(|s| s.rss_kib).unwrap_or(0)),
        "segs_per_delivery": segs_per_delivery.map(round3),
        "errors": errors,
        "publish_errors": publish_errors,
        "publish_reconnects": reconnects,
        "publish_status": statuses,
        "error_samples": error_samples,
        "setup_failed": setup_failed,
        "ended_early": ended_not_slow,
        "first_ended": first_ended,
        "unstamped": unstamped,
        "error_messages": error_messages,
    });
    if check.violations > 0 {
        eprintln!(
            "count check: {} subscribers do not add up; first: {}",
            check.violations,
            check.first_violation.as_deref().unwrap_or("")
        );
    }
    let markdown = markdown_row(&v);
    Ok(Report { json: v, markdown })
}

/// Waits until the server's processes used under `SETTLE_IDLE_SHARE` of a CPU for
/// `SETTLE_WINDOW`, or `max_s` passed; returns the seconds until that quiet window began (or
/// `max_s`) and whether the server did become idle.
async fn settle(probe: &ServerProbe, max_s: f64) -> Option<(f64, bool)> {
    let begin = monotonic_us();
    let mut last = sample(probe)?;
    loop {
        tokio::time::sleep(SETTLE_WINDOW).await;
        let now = sample(probe)?;
        let waited_s = (monotonic_us() - begin) as f64 / 1e6;
        let busy = now.cpu_s - last.cpu_s;
        if busy < SETTLE_IDLE_SHARE * SETTLE_WINDOW.as_secs_f64() {
            return Some(((waited_s - SETTLE_WINDOW.as_secs_f64()).max(0.0), true));
        }
        if waited_s >= max_s {
            eprintln!("settle: the server was still busy {max_s:.0}s after the last reply");
            return Some((waited_s, false));
        }
        last = now;
    }
}

async fn run_conns(
    cli: &Cli,
    plan: &Plan,
    routes: Arc<Routes>,
    probe: &ServerProbe,
) -> Result<Report, String> {
    let counters = Arc::new(Counters::default());
    let baseline = sample(probe);
    let client_cpu_before = sys::own_cpu_s();
    let subs = spawn_subscribers(cli, plan, routes, counters.clone(), IDLE_READ_BUFFER_BYTES);
    let ramp_s = wait_ready(cli, plan, &counters).await;
    let ramped = sample(probe);
    let ready = counters.ready.load(Ordering::Relaxed);
    let failed = counters.setup_failed.load(Ordering::Relaxed);
    tokio::time::sleep(CONNS_SETTLE).await;
    let settled = sample(probe);
    let idle_begin_us = monotonic_us();
    let mut progress = Progress::new(idle_begin_us);
    while monotonic_us() < idle_begin_us + (plan.duration_s * 1e6) as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        progress.tick(&counters, probe);
    }
    let idle_s = (monotonic_us() - idle_begin_us) as f64 / 1e6;
    let after = sample(probe);
    let client_cpu_s = sys::own_cpu_s() - client_cpu_before;
    let (outcomes, lost) = collect_subscribers(subs).await;
    let ended_early = outcomes
        .iter()
        .filter(|o| o.ready && o.ended.is_some())
        .count();
    let first_error = outcomes.iter().find_map(|o| o.ended.clone());
    let rss_per_conn = match (baseline, after) {
        (Some(b), Some(a)) if ready > 0 => {
            Some((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / ready as f64)
        }
        _ => None,
    };
    let idle_cpu_s = match (settled, after) {
        (Some(s), Some(a)) => Some(a.cpu_s - s.cpu_s),
        _ => None,
    };
    let ramp_cpu_s = match (baseline, ramped) {
        (Some(b), Some(r)) => Some(r.cpu_s - b.cpu_s),
        _ => None,
    };
    let v = json!({
        "scenario": plan.scenario.name(),
        "target": plan.target.name(),
        "duration": round3(idle_s),
        "ramp_server_cpu_s": ramp_cpu_s.map(round3),
        "upgrades_per_server_cpu_s": ramp_cpu_s
            .filter(|c| *c > 0.0)
            .map(|c| round3(ready as f64 / c)),
        "subscribers": plan.subscribers,
        "subscribers_ready": ready,
        "inflight": 0,
        "sent": 0,
        "deliveries": ready,
        "deliveries_per_s": round3(ready as f64 / ramp_s.max(1e-9)),
        "upgrades_per_s": round3(ready as f64 / ramp_s.max(1e-9)),
        "ramp_s": round3(ramp_s),
        "rss_kib": after.map(|s| s.rss_kib),
        "rss_baseline_kib": baseline.map(|s| s.rss_kib),
        "rss_per_conn_bytes": rss_per_conn.map(round3),
        "idle_server_cpu_s": idle_cpu_s.map(round3),
        "idle_cpu_pct": idle_cpu_s.map(|c| round3(c / idle_s * 100.0)),
        "client_cpu_s": round3(client_cpu_s),
        "dropped": 0,
        "wrong": 0,
        "missing": 0,
        "errors": failed + ended_early + lost,
        "setup_failed": failed,
        "ended_early": ended_early,
        "first_error": first_error,
    });
    let markdown = format!(
        "| conns | {} | {} | - | - | {} upgrades | {:.0} upgrades/s | ramp {:.2}, idle {:.3} | {:.0} upgrades | - | - | - | - | - | - | {:.1} ({:.0} B/conn) | {} |",
        plan.target.name(),
        plan.subscribers,
        ready,
        ready as f64 / ramp_s.max(1e-9),
        ramp_cpu_s.unwrap_or(0.0),
        idle_cpu_s.unwrap_or(0.0),
        ramp_cpu_s.filter(|c| *c > 0.0).map_or(0.0, |c| ready as f64 / c),
        after.map(|s| s.rss_kib).unwrap_or(0) as f64 / 1024.0,
        rss_per_conn.unwrap_or(0.0),
        failed + ended_early + lost,
    );
    Ok(Report { json: v, markdown })
}

/// The `resume` scenario (see `resume.rs`).
async fn run_resume(
    cli: &Cli,
    plan: &Plan,
    routes: Arc<Routes>,
    probe: &ServerProbe,
) -> Result<Report, String> {
    let stats = Arc::new(resume::ResumeStats::new());
    let mut drops = Vec::with_capacity(plan.subscribers);
    let mut handles = Vec::with_capacity(plan.subscribers);
    for index in 0..plan.subscribers {
        let (drop_tx, drop_rx) = tokio::sync::mpsc::channel(1);
        drops.push(drop_tx);
        handles.push(tokio::spawn(resume::run_resumer(
            routes.clone(),
            index % plan.projects,
            drop_rx,
            stats.clone(),
        )));
        if index % HANDSHAKES_IN_FLIGHT == HANDSHAKES_IN_FLIGHT - 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let setup_until = monotonic_us() + (cli.setup_timeout * 1e6) as u64;
    while (stats.ready.load(Ordering::Relaxed) as usize) < plan.subscribers {
        if monotonic_us() > setup_until {
            return Err(format!(
                "{} of {} subscribers connected",
                stats.ready.load(Ordering::Relaxed),
                plan.subscribers
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counters = Arc::new(Counters::default());
    let pub_ctx = Arc::new(PubContext {
        routes: routes.clone(),
        counters: counters.clone(),
        accepted: Arc::new(ProjectCounts::new(plan.projects)),
        levels: plan.levels.clone(),
        event_bytes: plan.event_bytes,
        source_addrs: cli.source_addrs.clone(),
    });
    let before = sample(probe);
    let start_us = monotonic_us();
    let end_us = start_us + (plan.duration_s * 1e6) as u64;
    let pub_handles = spawn_publishers(plan, &pub_ctx, start_us, end_us);
    // Drop and resume one subscriber after another, round-robin, at the resume rate.
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / cli.resume_rate.max(0.1)));
    let mut asked = 0u64;
    while monotonic_us() < end_us {
        ticker.tick().await;
        if drops[asked as usize % drops.len()].try_send(()).is_ok() {
            asked += 1;
        }
    }
    let settle_until = monotonic_us() + (DRAIN_MAX_S * 1e6) as u64;
    while stats.resumes.load(Ordering::Relaxed) < asked && monotonic_us() < settle_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let window_s = (monotonic_us() - start_us) as f64 / 1e6;
    let after = sample(probe);
    let mut published = 0;
    for handle in pub_handles {
        if let Ok(outcome) = handle.await {
            published += outcome.accepted;
        }
    }
    drop(drops);
    for handle in handles {
        let _ = tokio::time::timeout(Duration::from_secs_f64(TEARDOWN_S), handle).await;
    }
    let resumes = stats.resumes.load(Ordering::Relaxed);
    let server_cpu_s = match (before, after) {
        (Some(b), Some(a)) => Some(a.cpu_s - b.cpu_s),
        _ => None,
    };
    let latency = stats
        .latency
        .lock()
        .await
        .take()
        .unwrap_or_else(stats::new_histogram);
    let (p50, p99, p999) = percentiles_us(&latency);
    let v = json!({
        "scenario": plan.scenario.name(),
        "target": plan.target.name(),
        "duration": round3(window_s),
        "subscribers": plan.subscribers,
        "inflight": plan.inflight,
        "sent": published,
        "deliveries": stats.messages.load(Ordering::Relaxed),
        "resume_rate": cli.resume_rate,
        "resumes_asked": asked,
        "resumes": resumes,
        "recovered": stats.recovered.load(Ordering::Relaxed),
        "not_recovered": stats.not_recovered.load(Ordering::Relaxed),
        "replayed": stats.replayed.load(Ordering::Relaxed),
        "server_cpu_s": server_cpu_s.map(round3),
        "resumes_per_server_cpu_s": server_cpu_s
            .filter(|c| *c > 0.0)
            .map(|c| round3(resumes as f64 / c)),
        "p50_us": p50,
        "p99_us": p99,
        "p999_us": p999,
        "rss_kib": after.map(|s| s.rss_kib),
        "dropped": 0,
        "wrong": 0,
        "missing": asked.saturating_sub(resumes),
        "errors": stats.errors.load(Ordering::Relaxed),
    });
    let markdown = format!(
        "| resume | {} | {} | {} | {} | {} resumes ({} recovered, {} replayed) | {:.0} resumes/s | {} | {} resumes | {} | {} | {} | - | - | {} | {:.1} | {} |",
        plan.target.name(),
        plan.subscribers,
        plan.inflight,
        published,
        resumes,
        v["recovered"],
        v["replayed"],
        resumes as f64 / window_s.max(1e-9),
        server_cpu_s.map_or("-".into(), |c| format!("{c:.2}")),
        v["resumes_per_server_cpu_s"],
        p50,
        p99,
        p999,
        v["missing"],
        after.map_or(0.0, |s| s.rss_kib as f64 / 1024.0),
        v["errors"],
    );
    Ok(Report { json: v, markdown })
}

/// The `mixed` scenario (see `mixed.rs`), bounded by a watchdog like the others.
async fn run_mixed(cli: &Cli) -> Result<Report, String> {
    if cli.target != TargetKind::Mesher {
        return Err("the mixed scenario is Mesher only".into());
    }
    let plan = Plan::from_cli(cli);
    let nofile = sys::raise_nofile_limit();
    let fds_needed = plan.subscribers as u64 + SPARE_FDS;
    if nofile < fds_needed {
        return Err(format!(
            "{fds_needed} file descriptors needed but the limit is {nofile}"
        ));
    }
    // Setup, the run, the drain and teardown inside mixed.rs (10 s + 20 s), and a margin.
    spawn_watchdog(cli.setup_timeout + plan.duration_s + 30.0 + WATCHDOG_MARGIN_S + 30.0);
    let endpoint = Endpoint::resolve(&cli.url)
        .await
        .map_err(|e| format!("resolve {}: {e}", cli.url))?;
    let admin_token = cli
        .admin_token
        .clone()
        .ok_or("--admin-token is required for mixed")?;
    let json = mixed::run(mixed::MixedOptions {
        endpoint,
        admin_token,
        duration_s: plan.duration_s,
        projects: plan.projects,
        subscribers: plan.subscribers,
        server_pid: cli.server_pid.first().copied(),
        accepted_ids: cli.accepted_ids.clone(),
        samples: cli.samples.clone(),
        setup_timeout_s: cli.setup_timeout,
        events_per_s: cli.rate.unwrap_or(mixed::DEFAULT_EVENTS_PER_S),
    })
    .await?;
    let markdown = format!(
        "mixed: {} events accepted; {} subscribers accounted, {} not; {} reconnects",
        json["accepted"], json["accounted"], json["unaccounted"], json["reconnects"]
    );
    Ok(Report { json, markdown })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Plan {
        let mut argv = vec!["mesher-load"];
        argv.extend_from_slice(args);
        Plan::from_cli(&Cli::parse_from(argv))
    }

    #[test]
    fn scenario_defaults_follow_the_benchmark_table() {
        let fanout = plan(&["fanout"]);
        assert_eq!(
            (fanout.subscribers, fanout.projects, fanout.event_bytes),
            (1000, 1, 512)
        );
        let rooms = plan(&["rooms"]);
        assert_eq!((rooms.subscribers, rooms.projects), (10_000, 1000));
        let ingest = plan(&["ingest"]);
        assert_eq!(
            (ingest.subscribers, ingest.connections, ingest.event_bytes),
            (0, 64, 1024)
        );
        let e2e = plan(&["e2e"]);
        assert_eq!(
            (e2e.rate, e2e.projects, e2e.filter),
            (2000.0, 20, FilterMode::All)
        );
        let slow = plan(&["slow", "--slow-secs", "5"]);
        assert_eq!((slow.duration_s, slow.slow_fraction), (15.0, 0.1));
        assert_eq!(plan(&["conns"]).subscribers, 18_000);
    }

    #[test]
    fn slow_and_filtered_subscribers_are_spread_evenly() {
        let slow = plan(&["slow", "--subscribers", "1000"]);
        let count = (0..1000).filter(|&i| slow.sub_spec(i).slow).count();
        assert_eq!(count, 100);
        assert!(!plan(&["fanout"]).sub_spec(9).slow);
        let filters = plan(&["filters"]);
        let filtered = (0..1000).filter(|&i| filters.sub_spec(i).filtered).count();
        assert_eq!(filtered, 500);
        let rooms = plan(&["rooms"]);
        assert_eq!(rooms.sub_spec(1234).project, 234);
    }

    #[test]
    fn later_arguments_override_earlier_ones() {
        let p = plan(&["fanout", "--subscribers", "10", "--subscribers", "20"]);
        assert_eq!(p.subscribers, 20);
    }

    #[test]
    fn sockudo_gets_a_connection_per_request_in_flight() {
        let p = plan(&[
            "ingest",
            "--target",
            "sockudo",
            "--connections",
            "2",
            "--inflight",
            "8",
        ]);
        assert_eq!((p.connections, p.windows()), (8, vec![1; 8]));
    }

    #[test]
    fn windows_spread_inflight_over_connections() {
        let p = plan(&["ingest", "--connections", "4", "--inflight", "10"]);
        assert_eq!(p.windows(), vec![3, 3, 2, 2]);
        let p = plan(&["fanout", "--connections", "3", "--inflight", "1"]);
        assert_eq!(p.windows(), vec![1, 1, 1]);
    }
}
