//! Connection bookkeeping: generation-checked ids and outgoing frame rings.

pub mod registry;
pub mod ring;
