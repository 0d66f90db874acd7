//! The per-guest holder process and how to reach it.

pub mod client;
pub mod fdpass;
pub mod footprint;
pub mod handover;
pub mod hotplug;
pub mod protocol;
pub mod records;
pub mod server;
pub mod spare;
pub mod spawn;
