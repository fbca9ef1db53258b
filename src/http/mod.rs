//! HTTP/1.1 as bytes: request heads and bodies parsed ([`parse`]), responses serialized
//! ([`response`]). Nothing here knows the product's routes or a connection's life.

pub mod parse;
pub mod response;
