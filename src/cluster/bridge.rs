//! The NATS bridge: one thread with a small tokio runtime and the NATS client. Shards queue
//! commands to it; what arrives for a project goes to that project's shard as a `Run` task,
//! in arrival order per subscription.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{Inbound, RemoteError, Subjects, REQUEST_TIMEOUT_MS};
use crate::metrics::ClusterMetrics;
use crate::shard::mesh::ShardMsg;
use crate::store::{Change, KeyRow, ProjectRow};

/// How often the NATS traffic counters are copied into the metrics.
const STATISTICS_INTERVAL_MS: u64 = 1_000;
/// How long start-up waits for the first NATS connection before refusing to start.
const CONNECT_TIMEOUT_MS: u64 = 5_000;

pub enum Kind {
    /// Requests for a project this node owns.
    Owner,
    /// A project's stream frames, for this node's subscribers.
    Stream,
}

pub enum Command {
    Request {
        subject: String,
        payload: Bytes,
        reply: oneshot::Sender<Result<Bytes, RemoteError>>,
    },
    Publish {
        subject: String,
        payload: Bytes,
    },
    Subscribe {
        subject: String,
        project_id: Uuid,
        kind: Kind,
        ready: oneshot::Sender<()>,
    },
    Unsubscribe {
        subject: String,
    },
}

/// Answers one request from another node (once).
pub struct Responder {
    subject: Option<String>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Responder {
    pub fn send(self, payload: Bytes) {
        if let Some(subject) = self.subject {
            let _ = self.commands.send(Command::Publish { subject, payload });
        }
    }
}

pub struct BridgeInit {
    pub url: String,
    /// Where the directory is read again after NATS comes back (changes sent meanwhile were
    /// lost to this node).
    pub database_url: String,
    pub node_id: String,
    pub subjects: Arc<Subjects>,
    pub shards: Vec<mpsc::Sender<ShardMsg>>,
    pub inbound: Inbound,
    pub metrics: Arc<ClusterMetrics>,
}

/// Directory changes as other nodes receive them, with the node that made them.
#[derive(Serialize, Deserialize)]
struct DirectoryNews {
    from: String,
    projects: Vec<ProjectRow>,
    keys: Vec<KeyRow>,
}

pub fn encode_directory(node_id: &str, changes: &[Change]) -> Bytes {
    let mut news = DirectoryNews {
        from: node_id.to_owned(),
        projects: Vec::new(),
        keys: Vec::new(),
    };
    for change in changes {
        match change {
            Change::Project(row) => news.projects.push(row.clone()),
            Change::Key(row) => news.keys.push(row.clone()),
            Change::Issue(_) | Change::Event(_) => {}
        }
    }
    Bytes::from(postcard::to_stdvec(&news).expect("directory rows serialize"))
}

/// Connects to NATS (refusing to start when it cannot within `CONNECT_TIMEOUT_MS`) and starts
/// the bridge thread.
pub fn start(init: BridgeInit) -> Result<mpsc::UnboundedSender<Command>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the NATS thread: {e}"))?;
    let metrics = init.metrics.clone();
    let catch_up = (init.database_url.clone(), init.shards.clone());
    let options = async_nats::ConnectOptions::new()
        .name(format!("mesher {}", init.node_id))
        .request_timeout(Some(Duration::from_millis(REQUEST_TIMEOUT_MS)))
        .connection_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .max_reconnects(None)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            let (database_url, shards) = catch_up.clone();
            async move {
                let connected = &metrics.nats_connected;
                match event {
                    async_nats::Event::Connected if !connected.swap(true, Relaxed) => {
                        std::thread::spawn(move || reload_directory(&database_url, &shards));
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS connection lost; reconnecting");
                        connected.store(false, Relaxed)
                    }
                    _ => {}
                }
            }
        });
    let url = init.url.clone();
    let client = runtime
        .block_on(options.connect(url.as_str()))
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
    init.metrics.nats_connected.store(true, Relaxed);
    let (commands, queue) = mpsc::unbounded_channel();
    let mut bridge = Bridge {
        client,
        init,
        commands: commands.clone(),
        subscriptions: HashMap::new(),
    };
    // Other nodes' directory changes are heard before this node serves anything.
    runtime.block_on(bridge.listen_directory())?;
    std::thread::Builder::new()
        .name("nats".into())
        .spawn(move || runtime.block_on(bridge.run(queue)))
        .map_err(|e| format!("cannot start the NATS thread: {e}"))?;
    Ok(commands)
}

struct Bridge {
    client: async_nats::Client,
    init: BridgeInit,
    commands: mpsc::UnboundedSender<Command>,
    subscriptions: HashMap<String, tokio::task::JoinHandle<()>>,
}

impl Bridge {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Command>) {
        tokio::spawn(count_traffic(
            self.client.clone(),
            self.init.metrics.clone(),
        ));
        while let Some(command) = queue.recv().await {
            match command {
                Command::Request {
                    subject,
                    payload,
                    reply,
                } => {
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let answer = client.request(subject, payload).await;
                        let _ = reply.send(answer.map(|m| m.payload).map_err(remote_error));
                    });
                }
                // Publishing only queues in the client: done in order, here.
                Command::Publish { subject, payload } => {
                    let _ = self.client.publish(subject, payload).await;
                }
                Command::Subscribe {
                    subject,
                    project_id,
                    kind,
                    ready,
                } => {
                    if self.subscriptions.contains_key(&subject) {
                        let _ = ready.send(());
                        continue;
                    }
                    match self.client.subscribe(subject.clone()).await {
                        Ok(subscriber) => {
                            // Once flushed, the server knows the subscription.
                            let _ = self.client.flush().await;
                            let task = tokio::spawn(forward(
                                subscriber,
                                project_id,
                                kind,
                                self.init.shards.clone(),
                                self.init.inbound,
                                self.commands.clone(),
                            ));
                            self.subscriptions.insert(subject, task);
                        }
                        Err(error) => tracing::warn!(%subject, %error, "NATS subscribe failed"),
                    }
                    let _ = ready.send(());
                }
                Command::Unsubscribe { subject } => {
                    // Dropping the subscriber (with its task) unsubscribes.
                    if let Some(task) = self.subscriptions.remove(&subject) {
                        task.abort();
                    }
                }
            }
        }
    }

    /// Applies other nodes' directory changes on every shard of this one.
    async fn listen_directory(&mut self) -> Result<(), String> {
        let subject = self.init.subjects.directory();
        let mut subscriber = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| format!("cannot subscribe to {subject} on NATS: {e}"))?;
        let _ = self.client.flush().await;
        let shards = self.init.shards.clone();
        let node_id = self.init.node_id.clone();
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                let Ok(news) = postcard::from_bytes::<DirectoryNews>(&message.payload) else {
                    tracing::warn!("undecodable directory change from NATS ignored");
                    continue;
                };
                if news.from == node_id {
                    continue;
                }
                for sender in &shards {
                    for row in &news.projects {
                        let _ = sender.send(ShardMsg::Project(row.clone(), None)).await;
                    }
                    for row in &news.keys {
                        let _ = sender.send(ShardMsg::Key(row.clone(), None)).await;
                    }
                }
            }
        });
        Ok(())
    }
}

/// Hands each message of one subscription to the project's shard, in order.
async fn forward(
    mut subscriber: async_nats::Subscriber,
    project_id: Uuid,
    kind: Kind,
    shards: Vec<mpsc::Sender<ShardMsg>>,
    inbound: Inbound,
    commands: mpsc::UnboundedSender<Command>,
) {
    let to = (inbound.shard_of)(&project_id, shards.len());
    while let Some(message) = subscriber.next().await {
        let payload = message.payload;
        let task: crate::shard::mesh::Task = match kind {
            Kind::Owner => {
                let responder = Responder {
                    subject: message.reply.map(|s| s.to_string()),
                    commands: commands.clone(),
                };
                Box::new(move |shard| (inbound.request)(shard, project_id, payload, responder))
            }
            Kind::Stream => Box::new(move |shard| (inbound.frames)(shard, project_id, payload)),
        };
        if shards[to].send(ShardMsg::Run(task)).await.is_err() {
            return;
        }
    }
}

/// Reads projects and keys from the database and applies them on every shard: what other
/// nodes changed while NATS was out of reach.
fn reload_directory(database_url: &str, shards: &[mpsc::Sender<ShardMsg>]) {
    let directory =
        crate::store::open_postgres(database_url).and_then(|mut backend| backend.directory());
    let snapshot = match directory {
        Ok(snapshot) => snapshot,
        Err(error) => {
            tracing::error!(%error, "cannot read the directory again after NATS came back");
            return;
        }
    };
    for sender in shards {
        for row in &snapshot.projects {
            let _ = sender.blocking_send(ShardMsg::Project(row.clone(), None));
        }
        for row in &snapshot.keys {
            let _ = sender.blocking_send(ShardMsg::Key(row.clone(), None));
        }
    }
    tracing::info!(
        projects = snapshot.projects.len(),
        keys = snapshot.keys.len(),
        "directory read again after NATS came back"
    );
}

fn remote_error(error: async_nats::RequestError) -> RemoteError {
    match error.kind() {
        async_nats::RequestErrorKind::NoResponders => RemoteError::NoOwner,
        async_nats::RequestErrorKind::TimedOut => RemoteError::TimedOut,
        _ => RemoteError::Disconnected,
    }
}

async fn count_traffic(client: async_nats::Client, metrics: Arc<ClusterMetrics>) {
    let mut interval = tokio::time::interval(Duration::from_millis(STATISTICS_INTERVAL_MS));
    loop {
        interval.tick().await;
        let statistics = client.statistics();
        metrics
            .nats_in_bytes
            .store(statistics.in_bytes.load(Relaxed), Relaxed);
        metrics
            .nats_out_bytes
            .store(statistics.out_bytes.load(Relaxed), Relaxed);
    }
}
