//! WebSocket (RFC 6455): the frame codec and the session after an upgrade.

pub mod codec;
pub mod session;
