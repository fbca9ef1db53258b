//! HTTP/1.1: parsing, routing, responses and the connection loop.

pub mod conn;
pub mod parse;
pub mod response;
pub mod router;
