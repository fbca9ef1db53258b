//! Connection bookkeeping: generation-checked ids, outgoing frame rings, and the bounds every
//! shard shares (open connections, pending body bytes).

pub mod limits;
pub mod registry;
pub mod ring;
