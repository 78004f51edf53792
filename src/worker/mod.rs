//! Background work every `idmap serve` replica runs beside the request path: delivering queued Ory
//! writes, sweeping pending users no identity claimed and expired shared session entries, and
//! hearing other replicas' evictions.

pub mod listener;
pub mod outbox;
pub mod pending_sweep;
pub mod session_sweep;
