//! The only holder of a registered sanlock connection: [`Client`].
//!
//! `sanlock_register` connects to the daemon and says "this connection is a client"; the daemon
//! records the peer's pid (`SO_PEERCRED`) and from then on every lease acquired on the
//! connection belongs to that client. The daemon releases them when the connection closes: when
//! the [`Client`] is dropped or the process dies, unless a lease was acquired persistent, in which
//! case it becomes an orphan of this host, still held on disk, until a new client adopts it
//! (`adopt_orphans`) or releases it. That is the holder-death story of the sanlock engine.
//!
//! The library creates the socket without CLOEXEC. A child that inherits it keeps the
//! connection, and with it the leases, after this process lets go; libvirt uses that on purpose
//! to pass its registration to QEMU, lockhook does not want it (the holder's children must not
//! hold a guest's leases). So [`Sanlock::register`] sets `FD_CLOEXEC` on the socket before
//! returning it. What it cannot close is the window inside the library, between `socket()` and
//! our `fcntl`, in which a `fork` on another thread would inherit it: register while no other
//! thread forks (the holder registers at start-up, single-threaded). Plain `fork` without exec
//! copies the fd regardless of CLOEXEC; a forked child must close it or exec.
//!
//! The daemon kills a client (SIGTERM, then SIGKILL; or runs its killpath) when the host loses
//! its lockspace lease, so that the client stops using the storage before other hosts take its
//! leases: the registered process is what gets killed. sanlock allows at most 8 leases per
//! acquire or release call (`MAX_RESOURCES`), not per client: since sanlock 3.1 a client may hold
//! more, acquired in batches (the tests hold 16). The "8 per guest" limit known from libvirt is
//! its driver's, which acquires everything in one call. Batches are not all or nothing together:
//! a caller that needs that releases the earlier batches when a later one fails.
//! Calls on one client must not overlap (sanlock: "a threaded client must serialize libsanlock
//! calls that are made using a registered socket"): every method takes `&mut self`.

use std::ffi::{c_char, c_int, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::abi::{self, Zeroed};
use super::error::{self, Code, SanlockError};
use super::foreign::{ForeignArray, ForeignBox};
use super::library::Api;
use super::name::Name;
use super::resource::Lease;
use super::{Disk, Sanlock};
use crate::lock::LockMode;

/// One lease to acquire, in a mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub lease: Lease,
    /// `Shared` is `SANLK_RES_SHARED`: any number of shared holders, no exclusive one.
    pub mode: LockMode,
    /// Acquire only if the lease's version is still this (`Code::LeaseVersion` otherwise): for
    /// taking over a lease someone else released at a known version, as in a migration.
    pub lver: Option<u64>,
}

/// How an acquire behaves; the default is a plain acquire that waits for dead owners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcquireOptions {
    /// `SANLK_RES_PERSISTENT`: if this client dies the leases stay held by this host (orphans)
    /// instead of being released. All holders of a shared lease should agree on this.
    pub persistent: bool,
    /// `SANLK_ACQUIRE_ORPHAN`: take over this host's orphans of these leases (same mode).
    pub adopt_orphans: bool,
    /// `SANLK_ACQUIRE_ORPHAN_ONLY`: take only orphans; a lease that is not one is not acquired
    /// (`Code::Os(ENOENT)`). For releasing a dead client's orphans: adopt, then release.
    pub orphans_only: bool,
    /// `SANLK_ACQUIRE_OWNER_NOWAIT`: when the owner's host has stopped renewing but its lease
    /// has not timed out yet, fail at once (`Code::OwnedRetry`) instead of waiting for it.
    pub no_wait: bool,
    /// A name for the owner, shown by `sanlock client status` (e.g. the guest's name).
    pub owner_name: Option<Name>,
}

/// A lease this client holds, as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub lease: Lease,
    pub mode: LockMode,
    /// The version it was acquired at (sanlock reports none for shared leases).
    pub lver: Option<u64>,
}

/// A registered client connection: leases acquired through it are held until released, until
/// it is dropped, or until this process exits.
pub struct Client {
    fd: OwnedFd,
    api: &'static Api,
}

impl Sanlock {
    /// Registers this process as a sanlock client (see the module doc for CLOEXEC and
    /// inheritance).
    pub fn register(&self) -> Result<Client, SanlockError> {
        // SAFETY: no arguments; returns a new fd or -errno.
        let rv = unsafe { (self.api.register)() };
        let raw = error::check(rv).map_err(SanlockError::Register)?;
        // SAFETY: `raw` is the socket the library just opened for us and returned; nothing else
        // refers to it, so it is ours to own and close.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Invariant: the socket is close-on-exec before anyone outside this function sees it.
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(SanlockError::SetCloexec)?;
        Ok(Client { fd, api: self.api })
    }
}

impl Client {
    /// Acquires every lease of `requests` or none (the daemon releases what it got on a
    /// failure): at most 8 per call. On a busy lease the error's [`SanlockError::is_busy`] is
    /// true; it does not say which of the leases was busy (ask `read_resource_owners`).
    pub fn acquire(&mut self, requests: &[LeaseRequest], options: &AcquireOptions) -> Result<(), SanlockError> {
        if requests.is_empty() {
            return Ok(());
        }
        if requests.len() > abi::MAX_RESOURCES {
            return Err(SanlockError::TooManyLeases { count: requests.len() });
        }
        let mut resources = requests
            .iter()
            .map(|r| {
                let mut flags = 0;
                if r.mode == LockMode::Shared {
                    flags |= abi::RES_SHARED;
                }
                if options.persistent {
                    flags |= abi::RES_PERSISTENT;
                }
                let mut res = r.lease.to_c(flags)?;
                if let Some(lver) = r.lver {
                    res.head.flags |= abi::RES_LVER;
                    res.head.lver = lver;
                }
                Ok(res)
            })
            .collect::<Result<Vec<abi::Resource1>, SanlockError>>()?;
        let mut pointers: Vec<*mut abi::ResourceHead> = resources.iter_mut().map(|r| &mut r.head as *mut _).collect();
        let mut opt = abi::Options::zeroed();
        if let Some(owner) = &options.owner_name {
            opt.owner_name = owner.to_c();
        }
        let mut flags = 0;
        if options.orphans_only {
            flags |= abi::ACQUIRE_ORPHAN_ONLY;
        }
        if options.adopt_orphans {
            flags |= abi::ACQUIRE_ORPHAN;
        }
        if options.no_wait {
            flags |= abi::ACQUIRE_OWNER_NOWAIT;
        }
        let count = c_int::try_from(pointers.len()).unwrap_or(c_int::MAX);
        // SAFETY: the socket is our registered connection (pid -1: "for self"); `pointers` holds
        // `count` pointers to live sanlk_resource structs each followed by its one disk
        // (num_disks = 1), and `opt` is a valid sanlk_options; all outlive the call, which only
        // reads them.
        let rv = unsafe { (self.api.acquire)(self.fd.as_raw_fd(), -1, flags, count, pointers.as_mut_ptr(), &mut opt) };
        error::check(rv)
            .map_err(|code| SanlockError::Acquire { leases: describe(requests.iter().map(|r| &r.lease)), code })?;
        Ok(())
    }

    /// Releases `leases` (at most 8 per call), which this client holds.
    pub fn release(&mut self, leases: &[Lease]) -> Result<(), SanlockError> {
        if leases.is_empty() {
            return Ok(());
        }
        if leases.len() > abi::MAX_RESOURCES {
            return Err(SanlockError::TooManyLeases { count: leases.len() });
        }
        let mut resources = leases.iter().map(|l| l.to_c(0)).collect::<Result<Vec<_>, _>>()?;
        let mut pointers: Vec<*mut abi::ResourceHead> = resources.iter_mut().map(|r| &mut r.head as *mut _).collect();
        let count = c_int::try_from(pointers.len()).unwrap_or(c_int::MAX);
        // SAFETY: as in `acquire`: our registered socket, `count` live resources with one disk.
        let rv = unsafe { (self.api.release)(self.fd.as_raw_fd(), -1, 0, count, pointers.as_mut_ptr()) };
        error::check(rv).map_err(|code| SanlockError::Release { leases: describe(leases.iter()), code })?;
        Ok(())
    }

    /// Releases every lease this client holds.
    pub fn release_all(&mut self) -> Result<(), SanlockError> {
        // SAFETY: our registered socket; with SANLK_REL_ALL the (empty) resource list is ignored.
        let rv = unsafe { (self.api.release)(self.fd.as_raw_fd(), -1, abi::REL_ALL, 0, std::ptr::null_mut()) };
        error::check(rv).map_err(|code| SanlockError::Release { leases: "(all)".to_owned(), code })?;
        Ok(())
    }

    /// The leases this client holds, as the daemon sees them.
    pub fn inquire(&mut self) -> Result<Vec<Held>, SanlockError> {
        let mut count: c_int = 0;
        let mut state: *mut c_char = std::ptr::null_mut();
        // SAFETY: our registered socket; the out-pointers are valid. The library hands over a
        // malloc'd NUL-terminated state string (or leaves null when nothing is held).
        let rv = unsafe { (self.api.inquire)(self.fd.as_raw_fd(), -1, 0, &mut count, &mut state) };
        // SAFETY: `state` is null or the library's malloc'd string, ours from here.
        let state = unsafe { ForeignBox::from_raw(self.api, state) };
        error::check(rv).map_err(SanlockError::Inquire)?;
        let Some(state) = state else { return Ok(Vec::new()) };
        // sanlock's own parser of its state format ("LS:NAME:PATH:OFFSET:LVER|SH ..."), rather
        // than a second one here that could disagree with it on escapes.
        let mut args: *mut *mut abi::ResourceHead = std::ptr::null_mut();
        let mut parsed: c_int = 0;
        // SAFETY: `state` is a NUL-terminated string we own; the library allocates an array of
        // `parsed` resource pointers, each its own malloc'd struct, all taken over below.
        let rv = unsafe { (self.api.state_to_args)(state.as_ptr(), &mut parsed, &mut args) };
        // SAFETY: `args` is null or the library's malloc'd array of `parsed` pointers.
        let array = unsafe { ForeignArray::from_raw(self.api, args, if rv < 0 { 0 } else { parsed }) };
        // SAFETY: each element is a struct the library malloc'd for us (freed with its own free).
        let owned: Vec<_> =
            array.as_slice().iter().filter_map(|p| unsafe { ForeignBox::from_raw(self.api, *p) }).collect();
        error::check(rv).map_err(SanlockError::Inquire)?;
        owned.iter().map(|res| held(res).ok_or(SanlockError::Inquire(Code::ShortReply))).collect()
    }

    /// The program the daemon runs instead of killing this process when the host loses its
    /// lockspace lease (`program args...`, the daemon splitting `args` at spaces), with this
    /// client's pid appended as the last argument. Set once, before the first acquire. Each at
    /// most 127 bytes.
    pub fn set_killpath(&mut self, program: &Path, args: &str) -> Result<(), SanlockError> {
        let program_bytes = program.as_os_str().as_bytes();
        if program_bytes.len() >= abi::HELPER_PATH_LEN {
            return Err(SanlockError::TooLong { what: "a killpath program", max: abi::HELPER_PATH_LEN - 1 });
        }
        if args.len() >= abi::HELPER_ARGS_LEN {
            return Err(SanlockError::TooLong { what: "killpath arguments", max: abi::HELPER_ARGS_LEN - 1 });
        }
        let invalid = || SanlockError::InvalidPath { path: program.to_owned(), reason: "contains a NUL byte" };
        let program_c = CString::new(program_bytes).map_err(|_| invalid())?;
        let args_c = CString::new(args).map_err(|_| invalid())?;
        let mut args_buf = args_c.into_bytes_with_nul();
        // SAFETY: our registered socket; both strings are NUL-terminated and shorter than the
        // library's buffers; `args` is declared `char *` but only read.
        let rv = unsafe {
            (self.api.killpath)(
                self.fd.as_raw_fd(),
                abi::KILLPATH_PID,
                program_c.as_ptr(),
                args_buf.as_mut_ptr().cast::<c_char>(),
            )
        };
        error::check(rv).map_err(SanlockError::Killpath)?;
        Ok(())
    }
}

/// The registered socket, e.g. to poll for the daemon closing it (the daemon exited).
impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What `sanlock_state_to_args` made of one resource of the state string.
fn held(res: &ForeignBox<abi::ResourceHead>) -> Option<Held> {
    let head = res.get();
    if head.num_disks < 1 {
        return None;
    }
    // SAFETY: the library allocated head + num_disks (>= 1) disks in one block, so the first
    // disk follows the head at offset 128, where `Resource1` has it.
    let disk = unsafe { &(*res.as_ptr().cast::<abi::Resource1>()).disk };
    let shared = head.flags & abi::RES_SHARED != 0;
    Some(Held {
        lease: Lease {
            lockspace: Name::from_c(&head.lockspace_name)?,
            name: Name::from_c(&head.name)?,
            disk: Disk::from_c(disk),
        },
        mode: if shared { LockMode::Shared } else { LockMode::Exclusive },
        lver: (!shared && head.flags & abi::RES_LVER != 0).then_some(head.lver),
    })
}

/// `LS:NAME:PATH:OFFSET, LS:NAME:...` for messages.
fn describe<'a>(leases: impl Iterator<Item = &'a Lease>) -> String {
    leases.map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str) -> Lease {
        Lease { lockspace: Name::fit("ls"), name: Name::fit(name), disk: Disk::new("/dev/x", 2 << 20) }
    }

    #[test]
    fn describe_lists_leases() {
        assert_eq!(describe([lease("a"), lease("b")].iter()), "ls:a:/dev/x:2097152, ls:b:/dev/x:2097152");
    }
}
