//! Cross-shard messaging: one bounded queue into each shard, FIFO per sender and destination.
//!
//! Senders never block the reactor: a message that finds its destination queue full waits in a
//! local backlog that a forwarding task pushes on, in order, as room appears. The runtime names
//! only what it handles itself (the directory, shutdown); the layers above send `Run` tasks.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use super::Shard;
use crate::metrics::ShardMetrics;
use crate::store::{KeyRow, ProjectRow};

/// Messages one shard's queue holds before senders fall back to their backlog; large enough
/// to absorb bursts of fan-out without the backlog path.
pub const SHARD_QUEUE_MAX: usize = 8192;

pub type Reply<T> = oneshot::Sender<T>;

/// Work for another shard, run on its thread in queue order.
pub type Task = Box<dyn FnOnce(&Rc<Shard>) + Send>;

pub enum ShardMsg {
    /// A project created or changed; applied to the shard's directory, then acknowledged.
    Project(ProjectRow, Option<Reply<()>>),
    /// A key created or revoked; applied to the shard's directory, then acknowledged.
    Key(KeyRow, Option<Reply<()>>),
    /// Work of a layer above the runtime (an owner request, a stream delivery).
    Run(Task),
    /// Stop accepting, close WebSockets with 1001, finish in-flight requests.
    Drain,
    /// Every shard is drained: leave the reactor.
    Exit,
}

/// The shard that should have answered is gone: the server is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShuttingDown;

pub struct Mesh {
    senders: Vec<mpsc::Sender<ShardMsg>>,
    backlog: RefCell<Vec<VecDeque<ShardMsg>>>,
    backlog_ready: Rc<Notify>,
    metrics: Arc<ShardMetrics>,
}

impl Mesh {
    pub fn new(senders: Vec<mpsc::Sender<ShardMsg>>, metrics: Arc<ShardMetrics>) -> Mesh {
        let backlog = RefCell::new(senders.iter().map(|_| VecDeque::new()).collect());
        Mesh {
            senders,
            backlog,
            backlog_ready: Rc::new(Notify::new()),
            metrics,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.senders.len()
    }

    /// Queues `msg` for shard `to` without waiting; order per destination is kept.
    pub fn send(&self, to: usize, msg: ShardMsg) {
        let mut backlog = self.backlog.borrow_mut();
        if backlog[to].is_empty() {
            match self.senders[to].try_send(msg) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(msg)) => backlog[to].push_back(msg),
            }
        } else {
            backlog[to].push_back(msg);
        }
        self.metrics.mesh_backlog.fetch_add(1, Relaxed);
        self.backlog_ready.notify_one();
    }

    /// Sends shard `to` the message `ask` makes around a reply channel, and waits for the reply.
    pub async fn ask<T>(
        &self,
        to: usize,
        ask: impl FnOnce(Reply<T>) -> ShardMsg,
    ) -> Result<T, ShuttingDown> {
        let (reply, answer) = oneshot::channel();
        self.send(to, ask(reply));
        answer.await.map_err(|_| ShuttingDown)
    }

    /// Runs `task` on shard `to`, behind what is already queued for it.
    pub fn run(&self, to: usize, task: impl FnOnce(&Rc<Shard>) + Send + 'static) {
        self.send(to, ShardMsg::Run(Box::new(task)));
    }

    /// Runs `work` on shard `to` and waits for what it returns.
    pub async fn call<T: Send + 'static>(
        &self,
        to: usize,
        work: impl FnOnce(&Rc<Shard>) -> T + Send + 'static,
    ) -> Result<T, ShuttingDown> {
        self.ask(to, |reply| {
            ShardMsg::Run(Box::new(move |shard| {
                let _ = reply.send(work(shard));
            }))
        })
        .await
    }

    /// Moves backlogged messages into their queues as room appears; runs for the shard's life.
    pub async fn forward(self: Rc<Self>) {
        loop {
            self.backlog_ready.notified().await;
            for to in 0..self.senders.len() {
                while !self.backlog.borrow()[to].is_empty() {
                    // Reserve before popping so the message stays visibly queued (and later
                    // sends stay behind it) until it has room.
                    let Ok(permit) = self.senders[to].reserve().await else {
                        break;
                    };
                    let Some(msg) = self.backlog.borrow_mut()[to].pop_front() else {
                        break;
                    };
                    self.metrics.mesh_backlog.fetch_sub(1, Relaxed);
                    permit.send(msg);
                }
            }
        }
    }
}
