//! Taking and probing one lock on one file or device.
//!
//! A lock is one byte: byte 0 of a disk image (the byte virtlockd uses in direct mode, so a
//! lockhook host and a virtlockd host exclude each other), or byte `offset` of a lease file.
//! Bytes 1-99 belong to libvirt (1 is its relabel lock) and 100-104 / 200-204 to QEMU's own image
//! locking; taking any of them would break guest starts, so they are refused here, at the one
//! place every lock passes through.

mod ofd;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a resource is locked. Exclusive needs an fd opened read-write (`F_WRLCK`); shared needs
/// one opened read-only (`F_RDLCK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockMode {
    Shared,
    Exclusive,
}

impl LockMode {
    /// The adverb used in messages: "locked exclusively", "locked shared".
    pub fn adverb(self) -> &'static str {
        match self {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusively",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        }
    }
}

/// What a lock is really on: the inode (or device node) and the byte. Two paths that reach the
/// same file (symlink, hard link, bind mount, pool volume) have the same identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

/// Bytes of a disk image that other parties lock: libvirt (1-99) and QEMU (100-104, 200-204).
pub fn offset_is_reserved(offset: u64) -> bool {
    matches!(offset, 1..=104 | 200..=204)
}

/// The largest offset the kernel accepts for a one-byte lock (`off_t` is signed).
pub const MAX_OFFSET: u64 = (i64::MAX - 1) as u64;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: cannot open")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: is a {kind}, not a disk image or lease file")]
    NotLockable { path: PathBuf, kind: &'static str },
    #[error("{path}: byte {offset} is reserved for libvirt or QEMU and is never locked")]
    ReservedOffset { path: PathBuf, offset: u64 },
    #[error("{path}: lock offset {offset} is too large")]
    OffsetTooLarge { path: PathBuf, offset: u64 },
    #[error("{path} is locked")]
    AlreadyLocked { path: PathBuf, identity: Identity },
    #[error("{path}: cannot lock")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A lock this process holds. Dropping it (closing the last fd to the open file description)
/// releases the lock.
#[derive(Debug)]
pub struct HeldLock {
    pub fd: OwnedFd,
    pub identity: Identity,
    pub mode: LockMode,
    pub block_device: bool,
}

/// How to open a lock target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The file must exist (disk images).
    No,
    /// Create an empty file if missing (lease files).
    IfMissing,
}

fn file_kind(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() || ft.is_block_device() {
        None
    } else if ft.is_dir() {
        Some("directory")
    } else if ft.is_fifo() {
        Some("FIFO")
    } else if ft.is_socket() {
        Some("socket")
    } else if ft.is_char_device() {
        Some("character device")
    } else {
        Some("special file")
    }
}

/// Opens `path` the way `mode` needs and returns the file with its identity.
///
/// `O_NONBLOCK` keeps FIFOs and odd devices from hanging the open (libvirt waits for the hook
/// forever); `O_NOCTTY` keeps a terminal from becoming our controlling tty; `O_CLOEXEC` keeps the
/// fd out of anything we exec. Whatever is not a regular file or block device is refused after
/// the open, by `fstat` of what was actually opened.
pub fn open(path: &Path, mode: LockMode, create: Create, offset: u64) -> Result<(File, Identity, bool), LockError> {
    let mut opts = OpenOptions::new();
    opts.read(true)
        .write(mode == LockMode::Exclusive)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
    if create == Create::IfMissing {
        opts.create(true).mode(0o600);
    }
    let file = opts.open(path).map_err(|source| match source.raw_os_error() {
        Some(libc::EISDIR) => LockError::NotLockable { path: path.to_owned(), kind: "directory" },
        Some(libc::ENXIO) => LockError::NotLockable { path: path.to_owned(), kind: "FIFO or unconnected device" },
        _ => LockError::Open { path: path.to_owned(), source },
    })?;
    let meta = file.metadata().map_err(|source| LockError::Open { path: path.to_owned(), source })?;
    if let Some(kind) = file_kind(meta.file_type()) {
        return Err(LockError::NotLockable { path: path.to_owned(), kind });
    }
    let identity = Identity { dev: meta.dev(), ino: meta.ino(), offset };
    Ok((file, identity, meta.file_type().is_block_device()))
}

fn check_offset(path: &Path, offset: u64, is_lease: bool) -> Result<i64, LockError> {
    if offset > MAX_OFFSET {
        return Err(LockError::OffsetTooLarge { path: path.to_owned(), offset });
    }
    if is_lease && offset_is_reserved(offset) {
        return Err(LockError::ReservedOffset { path: path.to_owned(), offset });
    }
    Ok(offset as i64)
}

/// Opens `path` and takes a one-byte lock at `offset` without waiting.
///
/// `offset` is 0 for disk images; for leases it comes from the XML and must avoid the bytes
/// libvirt and QEMU use (see the module doc).
pub fn acquire(path: &Path, mode: LockMode, offset: u64, create: Create) -> Result<HeldLock, LockError> {
    let is_lease = create == Create::IfMissing;
    let start = check_offset(path, offset, is_lease)?;
    let (file, identity, block_device) = open(path, mode, create, offset)?;
    ofd::try_lock(file.as_fd(), mode, start).map_err(|source| {
        if source.kind() == io::ErrorKind::WouldBlock {
            LockError::AlreadyLocked { path: path.to_owned(), identity }
        } else {
            LockError::Lock { path: path.to_owned(), source }
        }
    })?;
    Ok(HeldLock { fd: file.into(), identity, mode, block_device })
}

/// Like `acquire`, but waits until the lock is free instead of failing (live migration hand-over:
/// the destination waits for the source to let go). Blocks the calling thread.
pub fn acquire_wait(path: &Path, mode: LockMode, offset: u64, create: Create) -> Result<HeldLock, LockError> {
    let start = check_offset(path, offset, create == Create::IfMissing)?;
    let (file, identity, block_device) = open(path, mode, create, offset)?;
    ofd::lock_wait(file.as_fd(), mode, start).map_err(|source| LockError::Lock { path: path.to_owned(), source })?;
    Ok(HeldLock { fd: file.into(), identity, mode, block_device })
}

/// Which lock, if any, someone holds on byte `offset` of `path`. Opens read-only and never locks.
pub fn probe(path: &Path, offset: u64) -> Result<(Option<LockMode>, Identity), LockError> {
    let start = check_offset(path, offset, false)?;
    let (file, identity, _) = open(path, LockMode::Shared, Create::No, offset)?;
    let state = ofd::probe(file.as_fd(), start).map_err(|source| LockError::Lock { path: path.to_owned(), source })?;
    Ok((state, identity))
}

/// Probes an already open file (used for the holder's own single-instance lock file).
pub fn probe_fd(file: &File, offset: u64) -> io::Result<Option<LockMode>> {
    ofd::probe(file.as_fd(), offset as i64)
}

/// Locks an already open file (the holder's single-instance lock).
pub fn try_lock_fd(file: &File, mode: LockMode, offset: u64) -> io::Result<()> {
    ofd::try_lock(file.as_fd(), mode, offset as i64)
}

/// Locks an already open file, waiting while someone else holds a conflicting lock
/// (`F_OFD_SETLKW`; lockspace lock files during a migration hand-over). Blocks the thread.
pub fn lock_wait_fd(file: &File, mode: LockMode, offset: u64) -> io::Result<()> {
    ofd::lock_wait(file.as_fd(), mode, offset as i64)
}

/// Drops a lock held through `file` without closing it.
pub fn unlock_fd(file: &File, offset: u64) -> io::Result<()> {
    ofd::unlock(file.as_fd(), offset as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(4096).expect("size");
        f
    }

    #[test]
    fn exclusive_excludes_exclusive_and_shared() {
        let f = image();
        let held = acquire(f.path(), LockMode::Exclusive, 0, Create::No).expect("first lock");
        assert!(matches!(acquire(f.path(), LockMode::Exclusive, 0, Create::No), Err(LockError::AlreadyLocked { .. })));
        assert!(matches!(acquire(f.path(), LockMode::Shared, 0, Create::No), Err(LockError::AlreadyLocked { .. })));
        assert_eq!(probe(f.path(), 0).expect("probe").0, Some(LockMode::Exclusive));
        drop(held);
        assert_eq!(probe(f.path(), 0).expect("probe").0, None);
        acquire(f.path(), LockMode::Exclusive, 0, Create::No).expect("free again");
    }

    #[test]
    fn shared_allows_shared_but_not_exclusive() {
        let f = image();
        let _a = acquire(f.path(), LockMode::Shared, 0, Create::No).expect("first reader");
        let _b = acquire(f.path(), LockMode::Shared, 0, Create::No).expect("second reader");
        assert!(matches!(acquire(f.path(), LockMode::Exclusive, 0, Create::No), Err(LockError::AlreadyLocked { .. })));
        assert_eq!(probe(f.path(), 0).expect("probe").0, Some(LockMode::Shared));
    }

    #[test]
    fn different_bytes_do_not_conflict() {
        let f = image();
        let _a = acquire(f.path(), LockMode::Exclusive, 0, Create::IfMissing).expect("byte 0");
        let _b = acquire(f.path(), LockMode::Exclusive, 4096, Create::IfMissing).expect("byte 4096");
        assert_eq!(probe(f.path(), 300).expect("probe").0, None);
    }

    #[test]
    fn symlink_and_hard_link_are_the_same_lock() {
        let dir = tempfile::tempdir().expect("dir");
        let img = dir.path().join("a b é.img");
        std::fs::write(&img, b"x").expect("write");
        std::os::unix::fs::symlink(&img, dir.path().join("link")).expect("symlink");
        std::fs::hard_link(&img, dir.path().join("hard")).expect("hard link");
        let held = acquire(&img, LockMode::Exclusive, 0, Create::No).expect("lock");
        for alias in ["link", "hard"] {
            match acquire(&dir.path().join(alias), LockMode::Shared, 0, Create::No) {
                Err(LockError::AlreadyLocked { identity, .. }) => assert_eq!(identity, held.identity),
                other => panic!("{alias}: expected AlreadyLocked, got {other:?}"),
            }
        }
    }

    #[test]
    fn reserved_and_huge_lease_offsets_are_refused() {
        let f = image();
        for offset in [1, 50, 99, 100, 104, 200, 204] {
            assert!(matches!(
                acquire(f.path(), LockMode::Exclusive, offset, Create::IfMissing),
                Err(LockError::ReservedOffset { .. })
            ));
        }
        assert!(matches!(
            acquire(f.path(), LockMode::Exclusive, u64::MAX, Create::IfMissing),
            Err(LockError::OffsetTooLarge { .. })
        ));
        acquire(f.path(), LockMode::Exclusive, MAX_OFFSET, Create::IfMissing).expect("largest offset");
    }

    #[test]
    fn lease_file_is_created_and_missing_image_is_not() {
        let dir = tempfile::tempdir().expect("dir");
        let lease = dir.path().join("lease");
        acquire(&lease, LockMode::Exclusive, 1024, Create::IfMissing).expect("lease");
        assert!(lease.exists());
        let missing = dir.path().join("missing.img");
        assert!(matches!(acquire(&missing, LockMode::Exclusive, 0, Create::No), Err(LockError::Open { .. })));
        assert!(!missing.exists());
    }

    #[test]
    fn fifos_directories_and_sockets_are_refused_without_hanging() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        for mode in [LockMode::Shared, LockMode::Exclusive] {
            assert!(matches!(acquire(&fifo, mode, 0, Create::No), Err(LockError::NotLockable { .. })));
            assert!(matches!(acquire(dir.path(), mode, 0, Create::No), Err(LockError::NotLockable { .. })));
        }
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(acquire(&sock, LockMode::Shared, 0, Create::No).is_err());
        assert!(matches!(
            acquire(Path::new("/dev/null"), LockMode::Shared, 0, Create::No),
            Err(LockError::NotLockable { kind: "character device", .. })
        ));
    }
}
