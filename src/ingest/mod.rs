//! Event decoding, validation and grouping keys.

pub mod event;
pub mod fingerprint;
