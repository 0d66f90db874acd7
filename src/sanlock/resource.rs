//! Single leases (sanlock "resources"): a paxos lease area of one align size (1 MiB with
//! 512-byte sectors) at an offset of a disk, formatted once with its lockspace and name, then
//! acquired and released by registered clients (`client.rs`). What `sanlock client init -r`
//! writes and what libvirt's `<lease>` and automatic disk leases point at.

use std::fmt;

use super::abi::{self, Zeroed};
use super::disk::{Disk, Geometry};
use super::error::{self, Code, SanlockError};
use super::foreign::ForeignArray;
use super::name::Name;
use super::Sanlock;

/// A lease: `LOCKSPACE:NAME:PATH:OFFSET` in sanlock's string form. The name must be the one
/// written at that place (`Code::Sanlock(-227)`, LEADER_RESOURCE, otherwise), and the lockspace
/// the one it was written for (-226).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub lockspace: Name,
    pub name: Name,
    pub disk: Disk,
}

impl Lease {
    pub(crate) fn to_c(&self, flags: u32) -> Result<abi::Resource1, SanlockError> {
        let mut res = abi::Resource1::zeroed();
        res.head.lockspace_name = self.lockspace.to_c();
        res.head.name = self.name.to_c();
        res.head.flags = flags;
        res.head.num_disks = 1;
        res.disk = self.disk.to_c()?;
        Ok(res)
    }
}

/// `LOCKSPACE:NAME:PATH:OFFSET`, as `sanlock client` prints it (paths unescaped).
impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}:{}", self.lockspace, self.name, self.disk.path.display(), self.disk.offset)
    }
}

/// Who holds a lease, as its area on disk says (not what any daemon believes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owners {
    /// The lease version: incremented by every exclusive acquire.
    pub lver: u64,
    /// Whether any holder holds it shared.
    pub shared: bool,
    /// The exclusive owner (with its renewal timestamp), then the shared ones; empty when free.
    pub hosts: Vec<Owner>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub host_id: u64,
    /// The owner's generation when it acquired: compare with [`super::Host::generation`] to
    /// tell whether the owner is still the same incarnation of that host.
    pub generation: u64,
    /// For the exclusive owner, its acquire time; 0 for shared owners.
    pub timestamp: u64,
}

impl Sanlock {
    /// Formats the lease `lease` (what `sanlock client init -r` does), for every host of its
    /// lockspace (`max_hosts` 0: the geometry's count). Overwrites whatever was there, even a
    /// held lease: callers make sure it is theirs to write.
    pub fn write_resource(&self, lease: &Lease, geometry: Geometry) -> Result<(), SanlockError> {
        let mut res = lease.to_c(geometry.flags())?;
        // SAFETY: `res` is a sanlk_resource followed by its one sanlk_disk (num_disks = 1), valid
        // for the call. max_hosts and num_hosts 0 are the defaults.
        let rv = unsafe { (self.api.write_resource)(&mut res.head, 0, 0, 0) };
        error::check(rv).map_err(|code| SanlockError::WriteResource {
            resource: lease.name.clone(),
            path: lease.disk.path.clone(),
            code,
        })?;
        Ok(())
    }

    /// Reads who owns `lease` from its area on disk. Works whether or not this host has joined
    /// the lockspace (the daemon only reads).
    pub fn read_resource_owners(&self, lease: &Lease) -> Result<Owners, SanlockError> {
        let mut res = lease.to_c(0)?;
        let mut hosts: *mut abi::Host = std::ptr::null_mut();
        let mut count: i32 = 0;
        // SAFETY: `res` is a sanlk_resource with its one disk, which the daemon's reply
        // overwrites (head only); the out-pointers are valid. On success the library hands over a
        // malloc'd array of `count` hosts.
        let rv = unsafe { (self.api.read_resource_owners)(&mut res.head, 0, &mut hosts, &mut count) };
        // SAFETY: what the library stored in `hosts` is its malloc'd block of `count` hosts (or
        // null), ours from here.
        let hosts = unsafe { ForeignArray::from_raw(self.api, hosts, count) };
        let fail =
            |code| SanlockError::ReadOwners { resource: lease.name.clone(), path: lease.disk.path.clone(), code };
        error::check(rv).map_err(fail)?;
        if hosts.lost() {
            return Err(fail(Code::Os(nix::errno::Errno::ENOMEM)));
        }
        Ok(Owners {
            lver: res.head.lver,
            shared: res.head.flags & abi::RES_SHARED != 0,
            hosts: hosts
                .as_slice()
                .iter()
                .map(|h| Owner { host_id: h.host_id, generation: h.generation, timestamp: h.timestamp })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_struct_and_string_form() {
        let lease = Lease {
            lockspace: Name::fit("__LIBVIRT__DISKS__"),
            name: Name::fit("d41d8cd98f00b204e9800998ecf8427e"),
            disk: Disk::new("/var/lib/libvirt/sanlock/d41d8cd98f00b204e9800998ecf8427e", 0),
        };
        let res = lease.to_c(abi::RES_SHARED).expect("ok");
        assert_eq!(res.head.num_disks, 1);
        assert_eq!(res.head.flags, abi::RES_SHARED);
        assert_eq!(Name::from_c(&res.head.name), Some(lease.name.clone()));
        assert_eq!(Disk::from_c(&res.disk), lease.disk);
        assert_eq!(
            lease.to_string(),
            "__LIBVIRT__DISKS__:d41d8cd98f00b204e9800998ecf8427e:/var/lib/libvirt/sanlock/\
             d41d8cd98f00b204e9800998ecf8427e:0"
        );
    }
}
