//! Taking and probing one lock on one file or device.
//!
//! A lock is one byte: byte 0 of a disk image (the byte virtlockd uses in direct mode, so a
//! lockhook host and a virtlockd host exclude each other), or byte `offset` of a lease file.
//! Bytes 1-99 belong to libvirt (1 is its relabel lock) and 100-104 / 200-204 to QEMU's own image
//! locking; taking any of them would break guest starts, so they are refused here, at the one
//! place every lock passes through.
//!
//! Size: about 400 lines of code; the other 220 are its unit tests, kept beside what they test.

pub mod fskind;
mod ofd;
pub mod proc_locks;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
    #[error("{path}: is a symbolic link to a missing file; a lease file is never created through a symlink")]
    DanglingSymlink { path: PathBuf },
    #[error(
        "{path}: is a symbolic link; a lease file is never opened through one (on shared storage another host \
         could point it at any file): name the file itself"
    )]
    SymlinkLease { path: PathBuf },
    #[error("{path}: was replaced while being opened")]
    Replaced { path: PathBuf },
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
    /// This call created the file (a missing lease target): `remove_created` may take it back.
    pub created: bool,
}

/// How to open a lock target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The file must exist (disk images).
    No,
    /// Create an empty file if missing (lease files). It is created `O_EXCL|O_NOFOLLOW`: never
    /// through a symlink, and never by following one that dangles.
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

/// A lock target opened for locking.
struct Opened {
    file: File,
    identity: Identity,
    block_device: bool,
    created: bool,
}

/// Flags of every open of a lock target. `O_NONBLOCK` keeps FIFOs and odd devices from hanging
/// the open (libvirt waits for the hook forever); `O_NOCTTY` keeps a terminal from becoming our
/// controlling tty; `O_CLOEXEC` keeps the fd out of anything we exec.
const OPEN_FLAGS: libc::c_int = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// How often a lease target that appears, vanishes or is replaced while we open it is retried.
const RACE_RETRIES: usize = 3;

fn open_error(path: &Path, source: io::Error) -> LockError {
    match source.raw_os_error() {
        Some(libc::EISDIR) => LockError::NotLockable { path: path.to_owned(), kind: "directory" },
        Some(libc::ENXIO) => LockError::NotLockable { path: path.to_owned(), kind: "FIFO or unconnected device" },
        _ => LockError::Open { path: path.to_owned(), source },
    }
}

/// Opens `path` the way `mode` needs and returns the file with its identity (and whether it is
/// a block device).
///
/// Nothing that is not a regular file or block device is ever opened for reading or writing:
/// opening a device can have effects of its own (opening `/dev/watchdog` arms it). So an existing
/// target is first opened `O_PATH` (which opens nothing: no driver `open` runs, FIFOs do not
/// block) and checked by `fstat`; only then is that same inode reopened through
/// `/proc/self/fd/N`, and the result checked again by `fstat`. Symlinks are followed, as QEMU
/// follows them: the domain XML is root's. A missing target (`Create::IfMissing`) is created
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, so root never creates a file where a symlink points.
pub fn open(path: &Path, mode: LockMode, create: Create, offset: u64) -> Result<(File, Identity, bool), LockError> {
    open_target(path, mode, create, offset).map(|o| (o.file, o.identity, o.block_device))
}

fn open_target(path: &Path, mode: LockMode, create: Create, offset: u64) -> Result<Opened, LockError> {
    let write = mode == LockMode::Exclusive;
    for _ in 0..RACE_RETRIES {
        if create == Create::IfMissing {
            let created = OpenOptions::new()
                .read(true)
                .write(write)
                .create_new(true)
                .mode(0o600)
                .custom_flags(OPEN_FLAGS | libc::O_NOFOLLOW)
                .open(path);
            match created {
                Ok(file) => {
                    let meta = file.metadata().map_err(|source| LockError::Open { path: path.to_owned(), source })?;
                    let identity = Identity { dev: meta.dev(), ino: meta.ino(), offset };
                    return Ok(Opened { file, identity, block_device: false, created: true });
                }
                // Something is there already (maybe a symlink, dangling or not): open it below.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(open_error(path, source)),
            }
        }
        // Step 1: look without opening. A lease target's last component is not followed: only
        // lockhook opens lease files (QEMU never does), they live on shared storage, and a
        // symlink planted there could make us lock any file, here or on no other host.
        let nofollow = if create == Create::IfMissing { libc::O_NOFOLLOW } else { 0 };
        let handle =
            match OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_CLOEXEC | nofollow).open(path) {
                Ok(handle) => handle,
                Err(e) if e.kind() == io::ErrorKind::NotFound && create == Create::IfMissing => {
                    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                        return Err(LockError::DanglingSymlink { path: path.to_owned() });
                    }
                    // It vanished between the two opens: try creating it again.
                    continue;
                }
                Err(source) => return Err(open_error(path, source)),
            };
        let meta = handle.metadata().map_err(|source| LockError::Open { path: path.to_owned(), source })?;
        if meta.file_type().is_symlink() {
            return Err(if std::fs::metadata(path).is_err() {
                LockError::DanglingSymlink { path: path.to_owned() }
            } else {
                LockError::SymlinkLease { path: path.to_owned() }
            });
        }
        if let Some(kind) = file_kind(meta.file_type()) {
            return Err(LockError::NotLockable { path: path.to_owned(), kind });
        }
        // Step 2: open that very inode. Through /proc the path is not resolved again, so a
        // rename or symlink swap in between cannot substitute a device.
        let mut opts = OpenOptions::new();
        opts.read(true).write(write).custom_flags(OPEN_FLAGS);
        let file = match opts.open(format!("/proc/self/fd/{}", handle.as_raw_fd())) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !Path::new("/proc/self/fd").exists() => opts.open(path),
            other => other,
        }
        .map_err(|source| open_error(path, source))?;
        // Step 3: make sure it is what step 1 looked at.
        let got = file.metadata().map_err(|source| LockError::Open { path: path.to_owned(), source })?;
        if (got.dev(), got.ino(), got.rdev()) != (meta.dev(), meta.ino(), meta.rdev())
            || file_kind(got.file_type()).is_some()
        {
            return Err(LockError::Replaced { path: path.to_owned() });
        }
        let identity = Identity { dev: meta.dev(), ino: meta.ino(), offset };
        return Ok(Opened { file, identity, block_device: meta.file_type().is_block_device(), created: false });
    }
    Err(LockError::Replaced { path: path.to_owned() })
}

/// Opens `path` read-only if it is a regular file or block device, checked as `open` checks it
/// (`O_PATH` + `fstat` before any real open, so a device named by an image header is never
/// opened); `Ok(None)` for anything else. For reading image headers.
pub fn open_readable(path: &Path) -> io::Result<Option<File>> {
    match open_target(path, LockMode::Shared, Create::No, 0) {
        Ok(opened) => Ok(Some(opened.file)),
        Err(LockError::NotLockable { .. }) => Ok(None),
        Err(LockError::Open { source, .. }) => Err(source),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// Whether `path` still names the inode of `identity` (a lease file removed by
/// `remove_created` between our open and our lock must not be locked: nobody else would see it).
fn still_named(path: &Path, identity: &Identity) -> bool {
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (identity.dev, identity.ino))
}

/// Removes a lease file `held` created, when its start is refused: only if `path` still names
/// that inode, it is still an empty regular file, and nobody else holds a lock on any byte of
/// it. The last check is a whole-file `F_WRLCK` held while unlinking: whoever opened the file
/// meanwhile either holds a lock (and the file stays), or locks only after the unlink, and then
/// `acquire` sees the name gone and creates the file afresh. Returns whether it was removed;
/// the lock is released either way.
pub fn remove_created(path: &Path, held: HeldLock) -> io::Result<bool> {
    if !held.created {
        return Ok(false);
    }
    let file = File::from(held.fd);
    let empty = |f: &File| f.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
    let same = std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == (held.identity.dev, held.identity.ino));
    if !same || !empty(&file) {
        return Ok(false);
    }
    match ofd::try_lock_whole(file.as_fd()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    }
    if !empty(&file) {
        return Ok(false);
    }
    std::fs::remove_file(path)?;
    Ok(true)
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
    acquire_as(path, mode, mode, offset, create)
}

/// Like `acquire`, but opens the file as `open` needs (read-write for `Exclusive`) and locks it
/// in `mode`. A shared lock taken through a read-write open can later be upgraded in place
/// (`upgrade_fd`), with no moment unlocked in between.
pub fn acquire_as(
    path: &Path,
    open: LockMode,
    mode: LockMode,
    offset: u64,
    create: Create,
) -> Result<HeldLock, LockError> {
    let is_lease = create == Create::IfMissing;
    let start = check_offset(path, offset, is_lease)?;
    for _ in 0..RACE_RETRIES {
        let Opened { file, identity, block_device, created } = open_target(path, open.max(mode), create, offset)?;
        ofd::try_lock(file.as_fd(), mode, start).map_err(|source| {
            if source.kind() == io::ErrorKind::WouldBlock {
                LockError::AlreadyLocked { path: path.to_owned(), identity }
            } else {
                LockError::Lock { path: path.to_owned(), source }
            }
        })?;
        // Invariant: a lease file may be removed by a refused start (`remove_created`), so a lock
        // counts only if the name still leads to the inode locked.
        if !is_lease || still_named(path, &identity) {
            return Ok(HeldLock { fd: file.into(), identity, mode, block_device, created });
        }
    }
    Err(LockError::Replaced { path: path.to_owned() })
}

/// Like `acquire`, but waits until the lock is free instead of failing (live migration hand-over:
/// the destination waits for the source to let go). Blocks the calling thread.
pub fn acquire_wait(path: &Path, mode: LockMode, offset: u64, create: Create) -> Result<HeldLock, LockError> {
    let is_lease = create == Create::IfMissing;
    let start = check_offset(path, offset, is_lease)?;
    for _ in 0..RACE_RETRIES {
        let Opened { file, identity, block_device, created } = open_target(path, mode, create, offset)?;
        ofd::lock_wait(file.as_fd(), mode, start)
            .map_err(|source| LockError::Lock { path: path.to_owned(), source })?;
        if !is_lease || still_named(path, &identity) {
            return Ok(HeldLock { fd: file.into(), identity, mode, block_device, created });
        }
    }
    Err(LockError::Replaced { path: path.to_owned() })
}

/// Which lock, if any, someone holds on byte `offset` of `path`. Opens read-only and never locks.
pub fn probe(path: &Path, offset: u64) -> Result<(Option<LockMode>, Identity), LockError> {
    let start = check_offset(path, offset, false)?;
    let (file, identity, _) = open(path, LockMode::Shared, Create::No, offset)?;
    let state = ofd::probe(file.as_fd(), start).map_err(|source| LockError::Lock { path: path.to_owned(), source })?;
    Ok((state, identity))
}

/// Upgrades the shared lock held through `fd` (opened read-write: `acquire_as`) to exclusive, in
/// place: on the same open file description the kernel converts the lock atomically, and a
/// refused conversion leaves the shared lock as it was. `AlreadyLocked`-style refusals come back
/// as `io::ErrorKind::WouldBlock`.
pub fn upgrade_fd(fd: BorrowedFd<'_>, offset: u64) -> io::Result<()> {
    ofd::try_lock(fd, LockMode::Exclusive, offset as i64)
}

/// Whether `fd` was opened for writing (so its lock can be upgraded in place).
pub fn is_writable(fd: BorrowedFd<'_>) -> bool {
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .is_ok_and(|flags| flags & libc::O_ACCMODE == libc::O_RDWR)
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

    #[test]
    fn dangling_symlink_lease_target_is_refused_not_created() {
        let dir = tempfile::tempdir().expect("dir");
        let target = dir.path().join("where-root-would-write");
        let lease = dir.path().join("lease");
        std::os::unix::fs::symlink(&target, &lease).expect("symlink");
        let err = acquire(&lease, LockMode::Exclusive, 1024, Create::IfMissing).expect_err("dangling");
        assert!(matches!(err, LockError::DanglingSymlink { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&format!("{}: ", lease.display())), "{err}");
        assert!(!target.exists(), "nothing created through the symlink");
    }

    #[test]
    fn existing_lease_target_through_a_symlink_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let real = dir.path().join("real.lease");
        std::fs::write(&real, b"").expect("write");
        let link = dir.path().join("link.lease");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = acquire(&link, LockMode::Exclusive, 1024, Create::IfMissing).expect_err("a symlinked lease");
        assert!(matches!(err, LockError::SymlinkLease { .. }), "{err:?}");
        assert_eq!(probe(&real, 1024).expect("probe").0, None, "nothing locked through the link");
        // A symlinked directory above the lease file is the administrator's: followed.
        std::os::unix::fs::symlink(dir.path(), dir.path().join("dir-link")).expect("symlink");
        acquire(&dir.path().join("dir-link/real.lease"), LockMode::Exclusive, 1024, Create::IfMissing)
            .expect("through a symlinked directory");
    }

    #[test]
    fn readable_images_only() {
        let f = image();
        assert!(open_readable(f.path()).expect("regular").is_some());
        assert!(open_readable(Path::new("/dev/null")).expect("char device").is_none());
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        assert!(open_readable(&fifo).expect("fifo").is_none());
    }

    /// The inotify events of `fd`: any open for reading or writing shows as IN_OPEN; an
    /// `O_PATH` open shows nothing.
    fn opened(fd: &nix::sys::inotify::Inotify) -> bool {
        fd.read_events().map(|events| !events.is_empty()).unwrap_or(false)
    }

    #[test]
    fn fifos_and_devices_are_checked_before_any_real_open() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify");
        watch.add_watch(&fifo, AddWatchFlags::IN_ALL_EVENTS).expect("watch");
        for (mode, create) in [
            (LockMode::Exclusive, Create::IfMissing),
            (LockMode::Exclusive, Create::No),
            (LockMode::Shared, Create::No),
        ] {
            let offset = if create == Create::IfMissing { 1024 } else { 0 };
            match acquire(&fifo, mode, offset, create) {
                Err(LockError::NotLockable { kind: "FIFO", .. }) => {}
                other => panic!("{mode:?} {create:?}: expected NotLockable, got {other:?}"),
            }
        }
        // Sanity: the watch does see a real open.
        assert!(!opened(&watch), "the FIFO was opened for I/O before it was checked");
        drop(OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).expect("open fifo"));
        assert!(opened(&watch), "inotify sees real opens");
        for dev in ["/dev/zero", "/dev/null"] {
            assert!(matches!(
                acquire(Path::new(dev), LockMode::Exclusive, 1024, Create::IfMissing),
                Err(LockError::NotLockable { kind: "character device", .. })
            ));
        }
    }

    #[test]
    fn created_lease_file_is_removed_only_when_untouched() {
        let dir = tempfile::tempdir().expect("dir");
        // Created by us, still empty, nobody else locks it: removed.
        let lease = dir.path().join("new.lease");
        let held = acquire(&lease, LockMode::Exclusive, 1024, Create::IfMissing).expect("lease");
        assert!(held.created);
        assert!(remove_created(&lease, held).expect("remove"));
        assert!(!lease.exists());
        // Someone else locks another byte of it meanwhile: it stays.
        let held = acquire(&lease, LockMode::Exclusive, 1024, Create::IfMissing).expect("lease");
        let other = acquire(&lease, LockMode::Exclusive, 4096, Create::IfMissing).expect("other byte");
        assert!(!other.created);
        assert!(!remove_created(&lease, held).expect("remove"));
        assert!(lease.exists());
        assert_eq!(probe(&lease, 1024).expect("probe").0, None, "the lock is released either way");
        drop(other);
        // Not created by us: it stays.
        let held = acquire(&lease, LockMode::Exclusive, 1024, Create::IfMissing).expect("lease");
        assert!(!remove_created(&lease, held).expect("remove"));
        assert!(lease.exists());
        // Created by us but written to since: it stays.
        let written = dir.path().join("written.lease");
        let held = acquire(&written, LockMode::Exclusive, 1024, Create::IfMissing).expect("lease");
        std::fs::write(&written, b"data").expect("write");
        assert!(!remove_created(&written, held).expect("remove"));
        assert!(written.exists());
    }

    #[test]
    fn a_removed_lease_file_is_created_afresh() {
        let dir = tempfile::tempdir().expect("dir");
        let lease = dir.path().join("lease");
        let first = acquire(&lease, LockMode::Exclusive, 1024, Create::IfMissing).expect("lease");
        assert!(remove_created(&lease, first).expect("remove"));
        let again = acquire(&lease, LockMode::Exclusive, 1024, Create::IfMissing).expect("lease again");
        assert!(again.created && still_named(&lease, &again.identity));
    }
}
