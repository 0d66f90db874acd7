//! A small safe API over the sanlock daemon, for the sanlock engine (issue 11): lockspaces,
//! leases held by a registered client, and a resource index that allocates leases by name.
//!
//! # How lockhook talks to the daemon: `dlopen` of `libsanlock_client.so.1`
//! sanlock's only supported client interface is its C library. The socket protocol underneath is
//! internal to sanlock (`sanlock_sock.h` is not installed, not even by libsanlock-dev), so lockhook
//! does not speak it itself: a second implementation could drift from the daemon's.
//! Debian ships the library only as a shared object, and lockhook's installed binary is a static
//! glibc binary (install.sh: a hook and a holder are exec'd on every guest start, and a static
//! binary starts without the dynamic loader). Linking the library would make the binary dynamic
//! and unable to start at all without `libsanlock1`; a cargo feature would confine that to
//! sanlock builds, but on such a host every hook, its OFD part included, would then pay the
//! dynamic loader. A small dynamically linked helper binary would have to *be* the registered
//! client for as long as the guest runs (sanlock knows clients by pid and kills that pid when the
//! host loses its lease), a second process per guest beside the holder. Instead the library is
//! `dlopen`ed on the first sanlock call (`library.rs`), which only the sanlock engine makes:
//! - the OFD engine's hook is unchanged: same static binary, no library needed, nothing loaded;
//! - glibc's static `dlopen` works (Debian 12, glibc 2.36: the integration tests in
//!   `tests/sanlock.rs` pass built as static-pie, `RUSTFLAGS="-C target-feature=+crt-static"
//!   cargo nextest run --target x86_64-unknown-linux-gnu`); its one hazard, a glibc upgraded
//!   after the build, is caught by comparing glibc versions at load time
//!   ([`LoadError::LibcMismatch`]: rebuild, or build dynamically);
//! - the price is paid only by processes that use sanlock: loading takes about 0.5 ms in a
//!   static binary (it maps and initialises a second libc) against 0.04 ms in a dynamic one,
//!   beside acquires that do synchronous I/O on shared storage;
//! - a dynamically linked build runs the same code (one libc, the check passes trivially).
//!
//! # What the daemon does with our connections
//! - A registered client is a connection (`sanlock_register`) that the daemon identifies by the
//!   peer's pid. Its leases are released when the connection closes (persistent ones become
//!   orphans instead). The library creates the socket without `SOCK_CLOEXEC`: a child that
//!   inherits it keeps the connection, and so the leases, alive after we let go (libvirt relies
//!   on exactly that to hand its registration to QEMU). [`Client`] sets `FD_CLOEXEC` right after
//!   registering; see `client.rs` for the remaining window.
//! - Every other call opens a connection of its own for the duration of the call (also without
//!   CLOEXEC: register and join while no other thread forks, as the holder does at start-up).
//! - The daemon's socket is `$SANLOCK_RUN_DIR/sanlock.sock` (default `/run/sanlock`); the library
//!   reads the variable once per process, on its first connection.
//! - Calls block for as long as the daemon works on them: joining a lockspace takes about
//!   2 × io_timeout when the host id is free (≈20 s by default) and longer after an unclean exit;
//!   an acquire may wait for a dead owner's lease to time out unless asked not to.
//!
//! Files: `abi.rs` (the C structs), `library.rs` (loading), `foreign.rs` (library-allocated
//! memory), `name.rs` (48-byte names), `error.rs` (codes), `disk.rs` (places on storage),
//! `client.rs` (registered clients and leases), `lockspace.rs`, `resource.rs` (single leases and
//! their owners), `rindex.rs` (the resource index).

mod abi;
mod client;
mod disk;
mod error;
mod foreign;
mod library;
mod lockspace;
mod name;
mod resource;
mod rindex;

pub use abi::{MAX_RESOURCES, NAME_LEN};
pub use client::{AcquireOptions, Client, Held, LeaseRequest};
pub use disk::{Disk, Geometry};
pub use error::{Code, LoadError, SanlockError};
pub use library::LIBRARY;
pub use lockspace::{Host, HostState, Lockspace, LockspaceInfo, Membership};
pub use name::{Name, NameError};
pub use resource::{Lease, Owner, Owners};
pub use rindex::Rindex;

use library::Api;

/// The sanlock client library, loaded. Cheap to copy; every method is one daemon request on a
/// connection of its own, except [`Sanlock::register`], whose [`Client`] keeps its connection.
#[derive(Clone, Copy)]
pub struct Sanlock {
    api: &'static Api,
}

/// The daemon's version, e.g. 3.8.5, and its socket protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    pub patch: u8,
    pub proto: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// sanlock packs its version as `0xMMmmpp00` (3.8.5 is 0x03080500).
    fn unpack(packed: u32, proto: u32) -> Version {
        let [major, minor, patch, _] = packed.to_be_bytes();
        Version { major, minor, patch, proto }
    }
}

impl Sanlock {
    /// Loads `libsanlock_client.so.1` (once per process; later calls return the same result).
    pub fn load() -> Result<Sanlock, LoadError> {
        library::api().map(|api| Sanlock { api })
    }

    /// The running daemon's version: also the cheapest "is the daemon up" check.
    pub fn version(&self) -> Result<Version, SanlockError> {
        let (mut packed, mut proto) = (0u32, 0u32);
        // SAFETY: both out-pointers are valid u32s for the call's duration.
        let rv = unsafe { (self.api.version)(0, &mut packed, &mut proto) };
        error::check(rv).map_err(SanlockError::Version)?;
        Ok(Version::unpack(packed, proto))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_unpacks() {
        let v = Version::unpack(0x0308_0500, 1);
        assert_eq!((v.major, v.minor, v.patch, v.proto), (3, 8, 5, 1));
        assert_eq!(v.to_string(), "3.8.5");
    }
}
