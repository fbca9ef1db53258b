//! Start-up and shutdown: storage, listeners, shard threads, signals.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;

use crate::auth::Directory;
use crate::cluster::{Cluster, ClusterConfig, Inbound};
use crate::config::Config;
use crate::conn::limits::{Budget, Limits};
use crate::issues::{Issue, ProjectState};
use crate::metrics::Metrics;
use crate::owner::{self, owner_of};
use crate::shard::mesh::{ShardMsg, SHARD_QUEUE_MAX};
use crate::shard::{self, Hooks, ShardInit};
use crate::store::{self, Snapshot, Store, WriterConfig};
use crate::IdMap;

/// Pending connections per listener before the kernel refuses more.
const LISTEN_BACKLOG: i32 = 4096;
/// Files kept free beside connections: storage, listeners, rings, logs.
const FD_RESERVE: usize = 256;
/// How long shutdown waits for in-flight requests and WebSocket close handshakes.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Runs the server until SIGTERM or SIGINT; Ok after a clean shutdown.
pub fn run(config: Config) -> Result<(), String> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        format!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    let admin_token: Arc<str> = admin_token(&config)?.into();
    probe_io_uring()?;
    if config.nats_url.is_some() && config.database_url.is_none() {
        return Err(
            "--nats-url needs --database-url: the nodes share their projects, issues \
                    and events through one PostgreSQL database"
                .into(),
        );
    }

    let backend = match &config.database_url {
        Some(url) => store::open_postgres(url),
        None => store::open_sqlite(&config.data_dir),
    }
    .map_err(|e| format!("cannot open storage: {e}"))?;
    let writer = WriterConfig {
        flush_interval_ms: config.flush_interval_ms,
        batch_events_max: config.batch_events.max(1),
        queue_events_max: config.queue_events.max(1),
        queue_bytes_max: config.queue_bytes.max(1),
    };
    let (store, snapshot) =
        Store::start(backend, writer).map_err(|e| format!("cannot start storage: {e}"))?;

    let shard_count = config.shard_count();
    let listeners = bind_all(&config.listen, shard_count)?;

    let metrics = Metrics::new(shard_count);
    let limits = Arc::new(Limits {
        connections: Budget::new(
            config
                .max_connections
                .unwrap_or_else(default_max_connections),
        ),
        pending_body_bytes: Budget::new(config.max_pending_body_bytes),
    });
    tracing::info!(
        max_connections = limits.connections.limit(),
        max_pending_body_bytes = limits.pending_body_bytes.limit(),
        "limits"
    );
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..shard_count)
        .map(|_| mpsc::channel(SHARD_QUEUE_MAX))
        .unzip();
    let (drained_tx, drained_rx) = std::sync::mpsc::channel();
    let cluster = match (&config.nats_url, &config.database_url) {
        (Some(nats_url), Some(database_url)) => {
            let port = listeners[0]
                .first()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.port());
            let node_id = config
                .node_id
                .clone()
                .unwrap_or_else(|| format!("{}:{}", host_name(), port.unwrap_or(0)));
            let inbound = Inbound {
                shard_of: owner_of,
                request: owner::serve_remote,
                frames: owner::mirrored,
                disowned: owner::disowned,
            };
            let cluster_config = ClusterConfig {
                nats_url: nats_url.clone(),
                database_url: database_url.clone(),
                node_id: node_id.clone(),
            };
            let cluster = Cluster::start(
                cluster_config,
                senders.clone(),
                inbound,
                metrics.cluster.clone(),
            )?;
            eprintln!("mesher node {node_id}: one of several, over NATS at {nats_url}");
            Some(cluster)
        }
        _ => None,
    };
    for address in &listeners[0] {
        let address = address.local_addr().map_err(|e| e.to_string())?;
        tracing::info!("listening on {address}");
        eprintln!("mesher listening on http://{address}");
        eprintln!("mesher live page: http://{address}/");
    }
    // One of several nodes owns only the projects it takes over, loaded then.
    let mut owned = match cluster {
        Some(_) => (0..shard_count).map(|_| IdMap::default()).collect(),
        None => split_state(&snapshot, shard_count),
    };
    let mut threads = Vec::new();
    for ((index, inbox), listeners) in inboxes.into_iter().enumerate().zip(listeners) {
        let projects = std::mem::take(&mut owned[index]);
        let cluster = cluster.clone();
        let init = ShardInit {
            index,
            hooks: Hooks {
                serve: crate::serve::connection,
                issue_rows: owner::issue_rows,
                start: Box::new(move |shard| {
                    if let Some(cluster) = cluster {
                        cluster.install();
                    }
                    owner::install(shard, projects)
                }),
            },
            config: config.clone(),
            admin_token: admin_token.clone(),
            senders: senders.clone(),
            inbox,
            listeners,
            store: store.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            directory: directory(&snapshot),
            drained: drained_tx.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || shard::run(init))
            .map_err(|e| format!("cannot start shard thread: {e}"))?;
        threads.push(thread);
    }
    drop(snapshot);

    wait_for_signal()?;
    tracing::info!("shutting down: draining connections");
    for sender in &senders {
        let _ = sender.blocking_send(ShardMsg::Drain);
    }
    let deadline = std::time::Instant::now() + DRAIN_GRACE;
    let mut drained = 0;
    while drained < shard_count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match drained_rx.recv_timeout(left) {
            Ok(_) => drained += 1,
            Err(_) => {
                tracing::warn!("connections still open after {DRAIN_GRACE:?}; closing anyway");
                break;
            }
        }
    }
    for sender in &senders {
        let _ = sender.blocking_send(ShardMsg::Exit);
    }
    let mut failure = None;
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => failure = Some(error),
            Err(_) => failure = Some("a shard thread panicked".to_string()),
        }
    }
    tracing::info!("flushing storage");
    store.shutdown();
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// The machine's host name, for the default node id.
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most the buffer's length.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_owned(),
        _ => "mesher".to_owned(),
    }
}

/// Explains a failed io_uring set-up in terms an operator can act on.
pub fn io_uring_error(error: &std::io::Error) -> String {
    format!(
        "cannot set up io_uring ({error}); mesher needs Linux 5.10 or newer with io_uring allowed: \
         check the kernel version, the sysctl kernel.io_uring_disabled, and any seccomp profile \
         (container runtimes often block io_uring_setup)"
    )
}

/// Raises the open-file limit to its hard limit (each connection is a file) and leaves a reserve
/// of it for everything that is not a connection.
fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024 - FD_RESERVE;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let files = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    files.saturating_sub(FD_RESERVE).max(1)
}

/// Fails fast, before anything else starts, when io_uring is unavailable.
fn probe_io_uring() -> Result<(), String> {
    crate::shard::reactor_runtime().map(drop)
}

fn wait_for_signal() -> Result<(), String> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    signals.forever().next();
    Ok(())
}

/// One SO_REUSEPORT listener per shard and address; the kernel spreads connections over them.
fn bind_all(addresses: &[SocketAddr], shard_count: usize) -> Result<Vec<Vec<TcpListener>>, String> {
    let mut per_shard: Vec<Vec<TcpListener>> = (0..shard_count).map(|_| Vec::new()).collect();
    for address in addresses {
        // Port 0: the first bind picks the port, the other shards join it.
        let first = bind_one(*address)?;
        let actual = first.local_addr().map_err(|e| e.to_string())?;
        per_shard[0].push(first);
        for listeners in per_shard.iter_mut().skip(1) {
            listeners.push(bind_one(actual)?);
        }
    }
    Ok(per_shard)
}

fn bind_one(address: SocketAddr) -> Result<TcpListener, String> {
    let fail = |e: std::io::Error| format!("cannot listen on {address}: {e}");
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.set_reuse_port(true).map_err(fail)?;
    socket.bind(&address.into()).map_err(fail)?;
    socket.listen(LISTEN_BACKLOG).map_err(fail)?;
    Ok(socket.into())
}

fn directory(snapshot: &Snapshot) -> Directory {
    let mut directory = Directory::default();
    for project in &snapshot.projects {
        directory.apply_project(project.clone());
    }
    for key in &snapshot.keys {
        directory.apply_key(key);
    }
    directory
}

/// Each project's restored issue state goes to its owner shard.
fn split_state(snapshot: &Snapshot, shard_count: usize) -> Vec<IdMap<uuid::Uuid, ProjectState>> {
    let mut owned: Vec<IdMap<_, _>> = (0..shard_count).map(|_| IdMap::default()).collect();
    for project in &snapshot.projects {
        owned[owner_of(&project.id, shard_count)].insert(project.id, ProjectState::default());
    }
    for row in &snapshot.issues {
        let shard = owner_of(&row.project_id, shard_count);
        owned[shard]
            .entry(row.project_id)
            .or_default()
            .restore(Issue::from_row(row));
    }
    // Oldest first, so each project keeps the newest when it has more than it remembers.
    for event in &snapshot.recent_events {
        if let Some(state) =
            owned[owner_of(&event.project_id, shard_count)].get_mut(&event.project_id)
        {
            state
                .recent_event_ids
                .insert(event.id, event.received_at_us);
        }
    }
    owned
}

/// The admin token: given, else read from the data directory, else generated and stored there.
fn admin_token(config: &Config) -> Result<String, String> {
    if let Some(token) = config.admin_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(token.clone());
    }
    let path = config.data_dir.join("admin-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token =
        crate::auth::generate_key(store::Scope::Dashboard).replacen("mshd_", "mesh_admin_", 1);
    write_private(&path, &token)
        .map_err(|e| format!("cannot store the admin token in {}: {e}", path.display()))?;
    eprintln!(
        "mesher: generated admin token (stored in {}): {token}",
        path.display()
    );
    Ok(token)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")
}
