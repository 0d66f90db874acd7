//! Integration tests: one crate, modules below.
//!
//! `hook_process` runs the built binary as the hook without libvirt; `e2e` runs a real libvirtd
//! and QEMU in private namespaces (needs root and the libvirt packages: `tests/run-all.sh`
//! installs them). `sanlock` runs lockhook's sanlock API against private sanlock daemons.

#![allow(clippy::tests_outside_test_module)] // an integration test crate is all tests

mod common;
mod deb;
mod doctor;
mod e2e;
mod fleet;
mod guard;
mod hardening;
mod hook_process;
mod install;
mod lease_targets;
mod pools;
mod sanlock;
mod sanlock_engine;
mod storage;
mod upgrade;
