//! The per-guest holder process and how to reach it.

pub mod bootstrap;
pub mod client;
pub mod fdpass;
pub mod footprint;
pub mod handover;
pub mod hotplug;
mod presence;
pub mod protocol;
pub mod records;
mod serve;
/// For tests elsewhere that stand in for a holder.
#[cfg(test)]
pub(crate) use serve::accept_conn;
pub mod server;
pub mod spare;
pub mod spawn;
mod watch;

pub use serve::CONN_TIMEOUT;
