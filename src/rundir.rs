//! The run directory (`run_dir`, see `paths`): creating it, the single-instance lock files,
//! replacing its files atomically, and listening on a holder's socket. Used by holders, the spare holder, the hook and `lockhook run`.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::sys::socket::{self, bind, listen, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use crate::domain::Uuid;
use crate::lock::{self, LockMode};
use crate::paths::Paths;

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{path}: cannot create the run directory")]
    RunDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot open the instance lock")]
    InstanceLock {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another holder already runs for guest {0}")]
    AlreadyRunning(Uuid),
    #[error("{path}: cannot listen")]
    Listen {
        path: std::path::PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Replaces `path` (a file of the run directory, root's alone) with `bytes`, atomically: a
/// temporary file beside it, made with `O_EXCL|O_NOFOLLOW` (a symlink planted there is never
/// followed) under a name no other writer uses (this process and a count: threads of one process
/// may write at once), then renamed over it; `sync` writes the data out first. A step that fails
/// leaves no temporary file behind.
pub fn replace_file(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let tmp = path.with_file_name(format!(".{}.tmp.{}.{n}", name.to_string_lossy(), std::process::id()));
    // Left by a dead process whose pid this one reuses.
    let _ = fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            if sync {
                file.sync_data()?;
            }
            Ok(())
        })
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

pub fn ensure_run_dir(dir: &Path) -> Result<(), RunDirError> {
    let err = |source| RunDirError::RunDir { path: dir.to_owned(), source };
    fs::create_dir_all(dir).map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Opens (creating, never following a symlink) a single-instance lock file in the run directory
/// and takes its exclusive OFD lock without waiting.
///
/// A holder removes its lock file (while it still holds the lock) when it lets go, so a host
/// running many short-lived guests does not collect one file per guest ever started. So the lock
/// counts only if, once taken, the path still names the file locked; otherwise the file was
/// removed meanwhile, and a fresh one is made.
pub fn lock_instance_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    for _ in 0..3 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        lock::try_lock_fd(&file, LockMode::Exclusive, 0)?;
        let ours = file.metadata()?;
        if fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino())) {
            return Ok(file);
        }
    }
    Err(std::io::Error::other(format!("{}: removed each time it was locked", path.display())))
}

/// Removes the lock file `held` (locked through `lock_instance_file`) while still holding it,
/// if `path` still names it.
pub fn remove_instance_file(path: &Path, held: &File) {
    use std::os::unix::fs::MetadataExt;
    let same = match (fs::symlink_metadata(path), held.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    };
    if same {
        let _ = fs::remove_file(path);
    }
}

pub fn take_instance_lock(paths: &Paths, uuid: &Uuid) -> Result<File, RunDirError> {
    let path = paths.instance_lock(uuid);
    match lock_instance_file(&path) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(RunDirError::AlreadyRunning(uuid.clone())),
        Err(source) => Err(RunDirError::InstanceLock { path, source }),
    }
}

pub fn listen_on(path: &Path) -> Result<OwnedFd, RunDirError> {
    listen_with_backlog(path, 16)
}

/// `listen_on` with room for `backlog` waiting connections (the spare's socket: one per guest
/// starting at once).
pub fn listen_with_backlog(path: &Path, backlog: i32) -> Result<OwnedFd, RunDirError> {
    let err = |source| RunDirError::Listen { path: path.to_owned(), source };
    // Only a holder holding the instance lock gets here, so a socket file left at this path
    // belongs to a dead holder of this guest.
    let _ = fs::remove_file(path);
    let sock = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
    let addr = UnixAddr::new(path).map_err(err)?;
    // Bind with a umask that leaves the socket 0600 from its first moment.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = bind(sock.as_raw_fd(), &addr);
    nix::sys::stat::umask(old);
    bound.map_err(err)?;
    listen(&sock, Backlog::new(backlog).map_err(err)?).map_err(err)?;
    Ok(sock)
}
