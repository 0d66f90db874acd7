//! Lockspaces: the delta-lease area on shared storage through which hosts know each other.
//!
//! A lockspace is written once per fleet (`write_lockspace`: one 512-byte or 4K record per
//! possible host id, `max_hosts` of them), then each host joins it under its own host id
//! (`add_lockspace`, a boot-time step: it blocks for about 2 × io_timeout while the daemon makes
//! sure no other host renews that id) and renews its record every 2 × io_timeout from then on.
//! A host that stops renewing is FAIL after 8 × io_timeout and DEAD (its watchdog fired, its
//! leases free for others) after that plus the watchdog's 60 s. Leases can only be acquired in a
//! lockspace this host has joined.

use std::ffi::c_char;

use super::abi::{self, Zeroed};
use super::disk::{Disk, Geometry};
use super::error::{self, Code, SanlockError};
use super::foreign::ForeignArray;
use super::name::Name;
use super::Sanlock;

/// A lockspace as one host joins it: `NAME:HOST_ID:PATH:OFFSET` in sanlock's string form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lockspace {
    pub name: Name,
    /// This host's id in the lockspace, 1..=max_hosts (2000 for 512-byte sectors and 1 MiB
    /// alignment), unique in the fleet; 0 where an id does not matter (write, read).
    pub host_id: u64,
    pub disk: Disk,
}

impl Lockspace {
    fn to_c(&self, flags: u32) -> Result<abi::Lockspace, SanlockError> {
        let mut ls = abi::Lockspace::zeroed();
        ls.name = self.name.to_c();
        ls.host_id = self.host_id;
        ls.flags = flags;
        ls.host_id_disk = self.disk.to_c()?;
        Ok(ls)
    }
}

/// What a lockspace's first record says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockspaceInfo {
    pub name: Name,
    pub io_timeout: u32,
    pub geometry: Geometry,
}

/// Whether this host is in a lockspace, as its daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Joined,
    /// Being added or removed right now.
    Changing,
    Absent,
}

/// A host of a lockspace, as `sanlock_get_hosts` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub host_id: u64,
    /// Incremented each time the host joins: a lease held under an older generation is not held
    /// by the host's current incarnation.
    pub generation: u64,
    /// The host's last renewal, in its own monotonic seconds (0: the lease is free).
    pub timestamp: u64,
    pub io_timeout: u32,
    pub state: HostState,
}

/// A host's state, judged by this host's daemon from how recently the host's record changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Not watched long enough yet to tell (right after joining).
    Unknown,
    /// Its delta lease is not held.
    Free,
    Live,
    /// Renewals stopped for longer than its fail timeout: it may be killing its clients.
    Fail,
    /// Renewals stopped long enough for its watchdog to have fired: its leases can be taken.
    Dead,
}

impl HostState {
    fn from_flags(flags: u32) -> HostState {
        match flags & abi::HOST_MASK {
            abi::HOST_FREE => HostState::Free,
            abi::HOST_LIVE => HostState::Live,
            abi::HOST_FAIL => HostState::Fail,
            abi::HOST_DEAD => HostState::Dead,
            abi::HOST_UNKNOWN => HostState::Unknown,
            // Anything a newer daemon may add.
            _ => HostState::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Unknown => "unknown",
            HostState::Free => "free",
            HostState::Live => "live",
            HostState::Fail => "fail",
            HostState::Dead => "dead",
        }
    }
}

impl Sanlock {
    /// Formats a lockspace `name` at `disk` (what `sanlock client init -s` does): `max_hosts`
    /// host records for the geometry (2000 for `Sector512Align1M`), each with `io_timeout`
    /// seconds (0: the daemon's default, 10). Overwrites whatever was there, including a
    /// lockspace hosts have joined: callers check first ([`Sanlock::read_lockspace`]).
    pub fn write_lockspace(
        &self,
        name: &Name,
        disk: &Disk,
        geometry: Geometry,
        io_timeout: u32,
    ) -> Result<(), SanlockError> {
        let spec = Lockspace { name: name.clone(), host_id: 0, disk: disk.clone() };
        let mut ls = spec.to_c(geometry.flags())?;
        // SAFETY: `ls` is a valid sanlk_lockspace for the call; max_hosts 0 means "derived from
        // the geometry" (the argument is ignored when ALIGN/SECTOR flags are set).
        let rv = unsafe { (self.api.write_lockspace)(&mut ls, 0, 0, io_timeout) };
        error::check(rv).map_err(|code| SanlockError::WriteLockspace {
            lockspace: name.clone(),
            path: disk.path.clone(),
            code,
        })?;
        Ok(())
    }

    /// Reads the lockspace record at `disk` (host id 1's). `Code::Sanlock(-223)` (LEADER_MAGIC):
    /// there is no lockspace there.
    pub fn read_lockspace(&self, disk: &Disk) -> Result<LockspaceInfo, SanlockError> {
        self.read_host_slot(disk, 1)
    }

    /// Reads the record of host id `host_id` in the lockspace at `disk`: its `io_timeout` is the
    /// one that host last joined with (the one formatted, where no host joined under that id).
    pub fn read_host_slot(&self, disk: &Disk, host_id: u64) -> Result<LockspaceInfo, SanlockError> {
        let mut ls = abi::Lockspace::zeroed();
        ls.host_id = host_id;
        ls.host_id_disk = disk.to_c()?;
        let mut io_timeout = 0u32;
        // SAFETY: `ls` and `io_timeout` are valid for the call; the daemon fills in `ls`.
        let rv = unsafe { (self.api.read_lockspace)(&mut ls, 0, &mut io_timeout) };
        error::check(rv).map_err(|code| SanlockError::ReadLockspace { path: disk.path.clone(), code })?;
        let name = Name::from_c(&ls.name)
            .ok_or(SanlockError::ReadLockspace { path: disk.path.clone(), code: Code::Sanlock(-223) })?;
        Ok(LockspaceInfo { name, io_timeout, geometry: Geometry::from_flags(ls.flags) })
    }

    /// Joins `ls` under `ls.host_id`, blocking until the host's delta lease is acquired (about
    /// 2 × io_timeout; `io_timeout` 0: the daemon's default). `Code::Exists`: already joined.
    pub fn add_lockspace(&self, ls: &Lockspace, io_timeout: u32) -> Result<(), SanlockError> {
        let mut raw = ls.to_c(0)?;
        // SAFETY: `raw` is a valid sanlk_lockspace for the call (flags 0: synchronous).
        let rv = unsafe { (self.api.add_lockspace_timeout)(&mut raw, 0, io_timeout) };
        error::check(rv).map_err(|code| SanlockError::AddLockspace {
            lockspace: ls.name.clone(),
            host_id: ls.host_id,
            code,
        })?;
        Ok(())
    }

    /// Whether this host is in `ls`.
    pub fn inq_lockspace(&self, ls: &Lockspace) -> Result<Membership, SanlockError> {
        let mut raw = ls.to_c(0)?;
        // SAFETY: `raw` is a valid sanlk_lockspace for the call.
        let rv = unsafe { (self.api.inq_lockspace)(&mut raw, 0) };
        match error::check(rv) {
            Ok(_) => Ok(Membership::Joined),
            Err(Code::Os(nix::errno::Errno::EINPROGRESS)) => Ok(Membership::Changing),
            Err(Code::Os(nix::errno::Errno::ENOENT)) => Ok(Membership::Absent),
            Err(code) => Err(SanlockError::InqLockspace { lockspace: ls.name.clone(), code }),
        }
    }

    /// Leaves `ls`, releasing the host's delta lease. The daemon kills clients still holding
    /// leases in it, unless `only_if_unused`, which refuses instead (`-EBUSY`).
    pub fn rem_lockspace(&self, ls: &Lockspace, only_if_unused: bool) -> Result<(), SanlockError> {
        let mut raw = ls.to_c(0)?;
        let flags = if only_if_unused { abi::REM_UNUSED } else { 0 };
        // SAFETY: `raw` is a valid sanlk_lockspace for the call.
        let rv = unsafe { (self.api.rem_lockspace)(&mut raw, flags) };
        error::check(rv).map_err(|code| SanlockError::RemLockspace { lockspace: ls.name.clone(), code })?;
        Ok(())
    }

    /// The hosts of `lockspace` this host's daemon has seen alive (all of them for `None`), or
    /// the one `host_id`. Needs this host to be in the lockspace (`Code::NotJoined` otherwise).
    pub fn get_hosts(&self, lockspace: &Name, host_id: Option<u64>) -> Result<Vec<Host>, SanlockError> {
        // The one call that takes the name as a C string: 48 bytes and a NUL.
        let mut ls_name = [0 as c_char; abi::NAME_LEN + 1];
        ls_name[..abi::NAME_LEN].copy_from_slice(&lockspace.to_c());
        let mut hosts: *mut abi::Host = std::ptr::null_mut();
        let mut count: i32 = 0;
        // SAFETY: `ls_name` is NUL-terminated; the out-pointers are valid. On success the
        // library hands over a malloc'd array of `count` hosts (taken over below).
        let rv = unsafe { (self.api.get_hosts)(ls_name.as_ptr(), host_id.unwrap_or(0), &mut hosts, &mut count, 0) };
        // SAFETY: whatever the library stored in `hosts` is its malloc'd block of `count` hosts
        // (null when it stored nothing), owned by us from here.
        let hosts = unsafe { ForeignArray::from_raw(self.api, hosts, count) };
        let fail = |code| SanlockError::GetHosts { lockspace: lockspace.clone(), code };
        error::check(rv).map_err(fail)?;
        if hosts.lost() {
            return Err(fail(Code::Os(nix::errno::Errno::ENOMEM)));
        }
        Ok(hosts
            .as_slice()
            .iter()
            .map(|h| Host {
                host_id: h.host_id,
                generation: h.generation,
                timestamp: h.timestamp,
                io_timeout: h.io_timeout,
                state: HostState::from_flags(h.flags),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_states_from_flags() {
        assert_eq!(HostState::from_flags(abi::HOST_LIVE), HostState::Live);
        assert_eq!(HostState::from_flags(0x100 | abi::HOST_DEAD), HostState::Dead);
        assert_eq!(HostState::from_flags(abi::HOST_FAIL), HostState::Fail);
        assert_eq!(HostState::from_flags(abi::HOST_FREE), HostState::Free);
        assert_eq!(HostState::from_flags(abi::HOST_UNKNOWN), HostState::Unknown);
        assert_eq!(HostState::from_flags(0), HostState::Unknown);
    }

    #[test]
    fn lockspace_struct_carries_every_field() {
        let ls = Lockspace { name: Name::fit("lockhook"), host_id: 7, disk: Disk::new("/dev/vg/lockhook", 0) };
        let raw = ls.to_c(abi::ALIGN1M | abi::SECTOR512).expect("ok");
        assert_eq!(Name::from_c(&raw.name), Some(Name::fit("lockhook")));
        assert_eq!(raw.host_id, 7);
        assert_eq!(raw.flags, 0x110);
        assert_eq!(Disk::from_c(&raw.host_id_disk), ls.disk);
    }
}
