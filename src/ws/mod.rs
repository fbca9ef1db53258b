//! WebSocket (RFC 6455) as bytes: the opening handshake's key, client frames decoded and server
//! frames encoded. Nothing here knows what the messages mean.

pub mod codec;
