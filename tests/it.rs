//! Integration tests: one crate, modules below.
//!
//! `hook_process` runs the built binary as the hook without libvirt; `e2e` runs a real libvirtd
//! and QEMU in private namespaces (needs root and the libvirt packages: `tests/run-all.sh`
//! installs them).

mod common;
mod e2e;
mod hook_process;
