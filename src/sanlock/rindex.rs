//! The resource index: leases allocated by name in one shared area, so that lockhook needs no
//! file per lease and no shared filesystem.
//!
//! Layout on the area, in align-size units (1 MiB for 512-byte sectors): the index's entries at
//! its offset, the index's own paxos lease (which the daemon takes around every create and
//! delete) right after, then the leases, entry `i` at `offset + (2 + i) × align`. An index holds
//! 4096 entries unless formatted with another `max_resources` (at most 16000 at 1 MiB), so the
//! area must be that big for the leases actually created (a file can be sparse).
//!
//! Races: the daemon serialises index operations per lockspace on one host (`-EBUSY` for a
//! second one while the first runs) and between hosts by the index's paxos lease, taken without
//! waiting (an acquire code such as `Code::HeldByLiveHost` while another host updates the index).
//! Both mean "retry". `create_resource` does not check for an existing entry of the same name, so
//! two hosts creating one name at once both succeed and leave two entries. Lookups (and deletes)
//! always find the first, so every host agrees on that one and the second is a wasted slot:
//! callers look up, create only when absent, then look up again and use the offset found.

use super::abi::{self, Zeroed};
use super::disk::{Disk, Geometry};
use super::error::{self, Code, SanlockError};
use super::name::Name;
use super::Sanlock;

/// `SANLK_RX_NO_LOCKSPACE`: a lookup that does not need this host to be in the lockspace.
const RX_NO_LOCKSPACE: u32 = 0x1;

/// Where a resource index is and which lockspace its leases belong to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rindex {
    pub lockspace: Name,
    pub disk: Disk,
}

impl Rindex {
    fn to_c(&self, geometry: Geometry, max_resources: u32) -> Result<abi::Rindex, SanlockError> {
        let mut rx = abi::Rindex::zeroed();
        rx.flags = geometry.flags();
        rx.max_resources = max_resources;
        rx.lockspace_name = self.lockspace.to_c();
        rx.disk = self.disk.to_c()?;
        Ok(rx)
    }

    fn entry(name: &Name) -> abi::Rentry {
        let mut re = abi::Rentry::zeroed();
        re.name = name.to_c();
        re
    }
}

impl Sanlock {
    /// Formats an empty index and its internal lease (two align sizes at `rindex.disk`).
    /// `max_resources` 0: sanlock's default, 4096. The geometry must be the lockspace's.
    pub fn format_rindex(&self, rindex: &Rindex, geometry: Geometry, max_resources: u32) -> Result<(), SanlockError> {
        let mut rx = rindex.to_c(geometry, max_resources)?;
        // SAFETY: `rx` is a valid sanlk_rindex for the call.
        let rv = unsafe { (self.api.format_rindex)(&mut rx, 0) };
        error::check(rv).map_err(|code| SanlockError::FormatRindex { path: rindex.disk.path.clone(), code })?;
        Ok(())
    }

    /// The offset of the lease named `name`, `None` when the index has no such entry. Reads the
    /// index without needing this host to be in the lockspace.
    pub fn lookup_rindex(&self, rindex: &Rindex, name: &Name) -> Result<Option<u64>, SanlockError> {
        let mut rx = rindex.to_c(Geometry::Auto, 0)?;
        let mut re = Rindex::entry(name);
        // SAFETY: `rx` and `re` are valid for the call; the library writes the found offset into
        // `re`.
        let rv = unsafe { (self.api.lookup_rindex)(&mut rx, RX_NO_LOCKSPACE, &mut re) };
        match error::check(rv) {
            Ok(_) => Ok(Some(re.offset)),
            Err(Code::Os(nix::errno::Errno::ENOENT)) => Ok(None),
            Err(code) => Err(SanlockError::LookupRindex { name: name.clone(), path: rindex.disk.path.clone(), code }),
        }
    }

    /// Allocates a lease named `name` in a free entry, initialises it and records it; returns its
    /// offset. Does not look for an existing `name`. Needs this host to be in the lockspace:
    /// `Code::Os(ENOENT)` otherwise (not the `NotJoined` an acquire gets).
    pub fn create_resource(&self, rindex: &Rindex, name: &Name) -> Result<u64, SanlockError> {
        let mut rx = rindex.to_c(Geometry::Auto, 0)?;
        let mut re = Rindex::entry(name);
        // SAFETY: `rx` and `re` are valid for the call; the library writes the new offset into
        // `re`. max_hosts and num_hosts 0: the geometry's defaults.
        let rv = unsafe { (self.api.create_resource)(&mut rx, 0, &mut re, 0, 0) };
        error::check(rv).map_err(|code| SanlockError::CreateResource {
            name: name.clone(),
            path: rindex.disk.path.clone(),
            code,
        })?;
        Ok(re.offset)
    }

    /// Removes the entry named `name` (the first one) and clears its lease. Needs this host to be
    /// in the lockspace. `Code::Os(ENOENT)`: no such entry, or this host is not in the lockspace
    /// (check with [`Sanlock::inq_lockspace`] to tell them apart).
    pub fn delete_resource(&self, rindex: &Rindex, name: &Name) -> Result<(), SanlockError> {
        let mut rx = rindex.to_c(Geometry::Auto, 0)?;
        let mut re = Rindex::entry(name);
        // SAFETY: `rx` and `re` are valid for the call.
        let rv = unsafe { (self.api.delete_resource)(&mut rx, 0, &mut re) };
        error::check(rv).map_err(|code| SanlockError::DeleteResource {
            name: name.clone(),
            path: rindex.disk.path.clone(),
            code,
        })?;
        Ok(())
    }
}
