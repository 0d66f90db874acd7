//! The only `F_OFD_*` call site.
//!
//! Open file description (OFD) locks belong to the open file, not to the process: they survive
//! `fork`, travel with the fd through `SCM_RIGHTS`, and are released only when the last fd that
//! refers to the open file is closed. That is what lets the hook lock, hand the fd to the holder,
//! and exit without letting go. Classic POSIX locks (`F_SETLK`) would be dropped when the hook
//! exits; `flock` is emulated as a whole-file byte-range lock on NFS and would collide with QEMU's
//! own locks on bytes 100-104 and 200-204.
//!
//! OFD locks and POSIX locks on overlapping bytes conflict with each other, so a lock on byte 0
//! excludes virtlockd (direct mode, POSIX lock on byte 0) and the other way round.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::LockMode;

// The lock type and whence constants are tiny (0-2) and fit `c_short`, the field type.
#[allow(clippy::cast_possible_truncation)]
const RDLCK: libc::c_short = libc::F_RDLCK as libc::c_short;
#[allow(clippy::cast_possible_truncation)]
const WRLCK: libc::c_short = libc::F_WRLCK as libc::c_short;
#[allow(clippy::cast_possible_truncation)]
const UNLCK: libc::c_short = libc::F_UNLCK as libc::c_short;
#[allow(clippy::cast_possible_truncation)]
const SEEK_SET: libc::c_short = libc::SEEK_SET as libc::c_short;

/// Builds the one-byte lock description. `l_pid` must be 0 for OFD locks.
const fn flock_for(l_type: libc::c_short, offset: i64) -> libc::flock {
    libc::flock { l_type, l_whence: SEEK_SET, l_start: offset, l_len: 1, l_pid: 0 }
}

const fn lock_type(mode: LockMode) -> libc::c_short {
    match mode {
        LockMode::Shared => RDLCK,
        LockMode::Exclusive => WRLCK,
    }
}

fn fcntl_lock(fd: BorrowedFd<'_>, cmd: libc::c_int, lock: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: `fd` is a valid open descriptor for the duration of the borrow and `lock` points
        // to a properly initialised `flock` that the kernel may read and (for GETLK) write.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, lock as *mut libc::flock) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Takes the lock without waiting. `EAGAIN`/`EACCES` mean someone else holds a conflicting lock;
/// they come back as `ErrorKind::WouldBlock` so the caller can tell them apart from real errors.
pub fn try_lock(fd: BorrowedFd<'_>, mode: LockMode, offset: i64) -> io::Result<()> {
    let mut lock = flock_for(lock_type(mode), offset);
    fcntl_lock(fd, libc::F_OFD_SETLK, &mut lock).map_err(|err| match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => io::Error::from(io::ErrorKind::WouldBlock),
        _ => err,
    })
}

/// Takes an exclusive lock on the whole file (`l_len` 0: every byte, including past EOF) without
/// waiting: it is granted only if nobody else holds a lock on any byte. Used only before removing
/// a lease file this process created, never on a disk image (bytes 1-204 belong to libvirt and
/// QEMU).
pub fn try_lock_whole(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut lock = libc::flock { l_type: WRLCK, l_whence: SEEK_SET, l_start: 0, l_len: 0, l_pid: 0 };
    fcntl_lock(fd, libc::F_OFD_SETLK, &mut lock).map_err(|err| match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => io::Error::from(io::ErrorKind::WouldBlock),
        _ => err,
    })
}

/// Takes the lock, waiting as long as someone else holds a conflicting one (`F_OFD_SETLKW`):
/// the kernel (or the shared filesystem's lock manager) grants it the moment it is released.
pub fn lock_wait(fd: BorrowedFd<'_>, mode: LockMode, offset: i64) -> io::Result<()> {
    let mut lock = flock_for(lock_type(mode), offset);
    fcntl_lock(fd, libc::F_OFD_SETLKW, &mut lock)
}

// No unlock: a lock ends when the last fd to its open file description closes. A shared lock's
// description may be shared by the holders of several guests (see `shares`); an `F_UNLCK`
// through any of them would drop it for all.

/// Asks the kernel which lock, if any, would stop an exclusive lock on `offset` through `fd`.
/// Locks held through the same open file description never conflict with it, so probe through a
/// fresh `open()` to see every holder. The access mode of `fd` does not matter for `F_OFD_GETLK`.
pub fn probe(fd: BorrowedFd<'_>, offset: i64) -> io::Result<Option<LockMode>> {
    let mut lock = flock_for(WRLCK, offset);
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut lock)?;
    Ok(match lock.l_type {
        UNLCK => None,
        RDLCK => Some(LockMode::Shared),
        _ => Some(LockMode::Exclusive),
    })
}
