//! Several nodes as one Mesher (PROTOCOL section 10): the NATS bridge between nodes and the
//! PostgreSQL locks that make each project's owner exclusive.
//!
//! Both run on threads of their own, never on a reactor: the NATS client on a small tokio
//! runtime (`bridge`), the lock connection on a blocking thread (`ownership`). Shards reach
//! them through queues, as they reach the store writer, and what arrives from other nodes
//! comes back to the shards as `Run` tasks built by the hooks the layers above hand in
//! (`Inbound`), so this layer never names them.

mod bridge;
mod ownership;

use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::metrics::ClusterMetrics;
use crate::shard::mesh::ShardMsg;
use crate::shard::Shard;
use crate::store::Change;

pub use bridge::Responder;

/// How long a request to another node may take before it is answered 503; an owner that
/// takes longer is as good as gone for the client, which retries.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Requests to other nodes one node may have waiting at once; one more is answered 503 at
/// once, so a slow or unreachable owner cannot pile up this node's memory.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 8_192;

/// What other nodes send this one, handed to the layers above on the project's owner shard.
#[derive(Clone, Copy)]
pub struct Inbound {
    /// The shard of this node that serves a project (its owner shard, or its stream mirror).
    pub shard_of: fn(&Uuid, usize) -> usize,
    /// A request for a project this node owns (or owned when it was sent).
    pub request: fn(&Rc<Shard>, Uuid, Bytes, Responder),
    /// Stream frames the owner of a project published, for this node's subscribers.
    pub frames: fn(&Rc<Shard>, Uuid, Bytes),
    /// This node lost its lock connection: it owns nothing any more.
    pub disowned: fn(&Rc<Shard>),
}

/// Why a request to another node got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteError {
    /// No node serves the project's subject: nobody owns it (or its owner just died).
    NoOwner,
    /// NATS is unreachable from this node.
    Disconnected,
    /// The owner did not answer within `REQUEST_TIMEOUT_MS`.
    TimedOut,
    /// `REQUESTS_IN_FLIGHT_MAX` requests of this node already wait for answers.
    Busy,
}

/// This node's handle on the cluster, cloned into every shard thread.
#[derive(Clone)]
pub struct Cluster {
    node_id: Arc<str>,
    subjects: Arc<Subjects>,
    commands: mpsc::UnboundedSender<bridge::Command>,
    locks: std::sync::mpsc::Sender<ownership::LockCommand>,
    metrics: Arc<ClusterMetrics>,
    in_flight: Arc<AtomicUsize>,
}

/// Subject names, under a prefix unique to the database the nodes share, so that clusters
/// sharing one NATS server never hear each other.
struct Subjects {
    prefix: String,
}

impl Subjects {
    fn owner(&self, project_id: &Uuid) -> String {
        format!("{}.owner.{}", self.prefix, project_id.simple())
    }

    fn stream(&self, project_id: &Uuid) -> String {
        format!("{}.stream.{}", self.prefix, project_id.simple())
    }

    fn directory(&self) -> String {
        format!("{}.directory", self.prefix)
    }
}

/// What starting the cluster side of a node needs.
pub struct ClusterConfig {
    pub nats_url: String,
    pub database_url: String,
    pub node_id: String,
}

thread_local! {
    static CLUSTER: OnceCell<Cluster> = const { OnceCell::new() };
}

impl Cluster {
    /// Connects to PostgreSQL (the lock connection) and NATS, and starts their threads.
    pub fn start(
        config: ClusterConfig,
        shards: Vec<mpsc::Sender<ShardMsg>>,
        inbound: Inbound,
        metrics: Arc<ClusterMetrics>,
    ) -> Result<Cluster, String> {
        let (locks, cluster_id) = ownership::start(&config.database_url, {
            let shards = shards.clone();
            move || {
                for sender in &shards {
                    let _ = sender.blocking_send(ShardMsg::Run(Box::new(inbound.disowned)));
                }
            }
        })?;
        let subjects = Arc::new(Subjects {
            prefix: format!("mesher.{}", cluster_id.simple()),
        });
        metrics.enabled.store(true, Relaxed);
        let commands = bridge::start(bridge::BridgeInit {
            url: config.nats_url,
            database_url: config.database_url.clone(),
            node_id: config.node_id.clone(),
            subjects: subjects.clone(),
            shards,
            inbound,
            metrics: metrics.clone(),
        })?;
        Ok(Cluster {
            node_id: config.node_id.into(),
            subjects,
            commands,
            locks,
            metrics,
            in_flight: Arc::default(),
        })
    }

    /// Makes this handle the current shard thread's (the shard's start hook calls it).
    pub fn install(self) {
        CLUSTER.with(|cell| {
            let _ = cell.set(self);
        });
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.metrics.nats_connected.load(Relaxed)
    }

    fn command(&self, command: bridge::Command) {
        // The bridge lives as long as the process; a send fails only during exit.
        let _ = self.commands.send(command);
    }

    /// Asks the owner of `project_id`, wherever it is, and waits for its answer.
    pub async fn request(&self, project_id: &Uuid, payload: Bytes) -> Result<Bytes, RemoteError> {
        if !self.is_connected() {
            return Err(RemoteError::Disconnected);
        }
        // Counted until answered or given up (the guard also covers a dropped request).
        struct InFlight<'a>(&'a AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        let _in_flight = InFlight(&self.in_flight);
        if self.in_flight.fetch_add(1, Relaxed) >= REQUESTS_IN_FLIGHT_MAX {
            return Err(RemoteError::Busy);
        }
        let (reply, answer) = oneshot::channel();
        self.command(bridge::Command::Request {
            subject: self.subjects.owner(project_id),
            payload,
            reply,
        });
        answer.await.unwrap_or(Err(RemoteError::Disconnected))
    }

    /// Publishes a project's stream frames for the nodes that mirror its stream.
    pub fn publish_frames(&self, project_id: &Uuid, payload: Bytes) {
        self.command(bridge::Command::Publish {
            subject: self.subjects.stream(project_id),
            payload,
        });
    }

    /// Tells the other nodes about directory changes this node committed.
    pub fn publish_directory(&self, changes: &[Change]) {
        let payload = bridge::encode_directory(&self.node_id, changes);
        self.command(bridge::Command::Publish {
            subject: self.subjects.directory(),
            payload,
        });
    }

    /// Takes the project's lock if no node holds it: true when this node now owns it.
    pub async fn try_lock(&self, project_id: &Uuid) -> bool {
        let (reply, answer) = oneshot::channel();
        let command = ownership::LockCommand::Try {
            key: ownership::lock_key(project_id),
            reply,
        };
        if self.locks.send(command).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Gives the project's lock back (this node stops owning it).
    pub fn unlock(&self, project_id: &Uuid) {
        let key = ownership::lock_key(project_id);
        let _ = self.locks.send(ownership::LockCommand::Release { key });
    }

    /// Serves requests for the project from other nodes (this node owns it); Ok once NATS
    /// knows, so that no request can find the project without an owner afterwards.
    pub async fn serve_owner(&self, project_id: Uuid) {
        let subject = self.subjects.owner(&project_id);
        self.subscribe(subject, project_id, bridge::Kind::Owner)
            .await;
    }

    /// Subscribes the bridge to `subject`; returns once the NATS server knows.
    async fn subscribe(&self, subject: String, project_id: Uuid, kind: bridge::Kind) {
        let (ready, subscribed) = oneshot::channel();
        self.command(bridge::Command::Subscribe {
            subject,
            project_id,
            kind,
            ready,
        });
        let _ = subscribed.await;
    }

    /// Stops serving the project's requests.
    pub fn stop_owner(&self, project_id: Uuid) {
        self.command(bridge::Command::Unsubscribe {
            subject: self.subjects.owner(&project_id),
        });
    }

    /// Receives the project's stream frames from its owner; Ok once NATS knows.
    pub async fn mirror(&self, project_id: Uuid) {
        let subject = self.subjects.stream(&project_id);
        self.subscribe(subject, project_id, bridge::Kind::Stream)
            .await;
    }

    pub fn stop_mirror(&self, project_id: Uuid) {
        self.command(bridge::Command::Unsubscribe {
            subject: self.subjects.stream(&project_id),
        });
    }
}

/// The current shard thread's cluster handle; None when the node runs alone.
pub fn with<T>(f: impl FnOnce(&Cluster) -> T) -> Option<T> {
    CLUSTER.with(|cell| cell.get().map(f))
}

/// Whether this node is one of several.
pub fn is_active() -> bool {
    CLUSTER.with(|cell| cell.get().is_some())
}

/// The current shard thread's cluster handle, cloned (for use across awaits).
pub fn current() -> Option<Cluster> {
    with(Cluster::clone)
}
