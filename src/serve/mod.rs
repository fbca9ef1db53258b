//! The connection loops: an HTTP/1.1 connection ([`http`]) reads requests, hands each to the
//! handlers and writes their answers; after an upgrade, a WebSocket session ([`websocket`])
//! runs a reader and a writer over the connection's ring. The runtime is handed [`connection`]
//! at start and runs it for every accepted socket.

pub mod http;
pub mod websocket;

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use tokio_uring::net::TcpStream;

use crate::shard::Shard;

/// What the runtime runs for each accepted connection.
pub fn connection(shard: Rc<Shard>, stream: TcpStream) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(http::serve(shard, stream))
}
