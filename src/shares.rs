//! One open file description per shared lock on this host, whatever the number of guests.
//!
//! Every guest whose images live on a filesystem on `/dev/vda` holds a shared lock on `/dev/vda`
//! (and on its identity in the lockspace; see `storage`), and guests built on one base image all
//! hold it shared. The kernel keeps a file's locks in one list per inode and walks the whole list
//! on every lock, unlock and close of that file: with one lock per guest, each start and stop on
//! a host running 2000 guests walked 2000 entries several times per shared resource.
//!
//! A shared lock need not be one per guest. An OFD lock belongs to the open file description
//! and lives until the last fd that refers to it is closed, in whatever process. So the holders
//! of a host share one description per shared lock:
//! - a holder that holds a shared lock publishes where: `shares/<dev>-<ino>-<offset>` in the run
//!   directory names its pid and the fd (see `publish`, after the hook's reply);
//! - the next hook that needs that lock duplicates the fd (`pidfd_getfd`) and keeps it only if
//!   it is the file asked for (`fstat`), opened read-only, and its description holds the shared
//!   lock on that very byte (`/proc/self/fdinfo`: the kernel's own word); then hands it to its
//!   own holder (`borrow`);
//! - the lock goes when the last guest that uses it goes.
//!
//! Anything wrong with an entry (missing, its holder gone, its fd closed or reused, another file,
//! no lock, a kernel without `pidfd_getfd`) means only: take a lock of one's own, as before.
//!
//! Invariant: a description that is shared may be shared at any time, so it is opened read-only
//! and is never unlocked or converted, only closed. A read-only fd cannot take a write lock: an
//! upgrade opens a new read-write description (see `holder::hotplug::change_mode`), and a
//! downgraded lock keeps its read-write description, which is never published nor borrowed.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::holder::fdpass;
use crate::lock::{HeldLock, Identity, LockMode};
use crate::paths::Paths;

/// Where the entry for `identity` is.
fn entry_path(paths: &Paths, identity: &Identity) -> PathBuf {
    paths.shares_dir().join(format!("{:x}-{:x}-{:x}", identity.dev, identity.ino, identity.offset))
}

/// An entry's contents: the donor's pid and fd number.
fn parse_entry(text: &str) -> Option<(u32, RawFd)> {
    let (pid, fd) = text.trim().split_once(' ')?;
    let (pid, fd) = (pid.parse().ok()?, fd.parse().ok()?);
    (pid > 0 && fd >= 0).then_some((pid, fd))
}

fn read_entry(path: &Path) -> Option<(u32, RawFd)> {
    parse_entry(&fs::read_to_string(path).ok()?)
}

/// A duplicate of fd `fd` of process `pid` (both from an entry: checked by the caller).
fn duplicate(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
    let pidfd = fdpass::pidfd_open(pid).ok_or_else(io::Error::last_os_error)?;
    fdpass::copy_fd(pidfd.as_fd(), fd)
}

/// Whether an fdinfo text (`/proc/PID/fdinfo/FD`) says: opened read-only, and its description
/// holds a shared OFD lock on exactly byte `offset` of `identity`'s inode. The kernel writes it
/// from what it has in memory: reading it never touches the file's filesystem (a dead NFS server
/// behind an unrelated fd cannot hang us).
fn holds_shared(fdinfo: &str, identity: &Identity) -> bool {
    let read_only = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| libc::c_int::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & libc::O_ACCMODE == libc::O_RDONLY);
    let dev = (libc::major(identity.dev), libc::minor(identity.dev));
    let locks = fdinfo.lines().filter_map(|l| l.strip_prefix("lock:")).collect::<Vec<_>>().join("\n");
    read_only
        && crate::lock::proc_locks::parse(&locks).iter().any(|e| {
            e.kind == crate::lock::proc_locks::Kind::Ofd
                && e.mode == LockMode::Shared
                && (e.dev, e.ino) == (dev, identity.ino)
                && e.start == identity.offset
                && e.end == Some(identity.offset)
        })
}

/// Filesystems whose locks the local kernel grants and knows, so that its list (what fdinfo
/// shows) is the whole truth. On NFS, CIFS, FUSE (GlusterFS), CephFS, GFS2 or OCFS2 the lock is
/// the server's or the cluster's: a lock it lost may still be listed here, and a guest that
/// borrowed it would run without one. There, every guest keeps its own lock, as before.
fn local_locks(fd: BorrowedFd<'_>) -> bool {
    crate::lock::fskind::magic_of_fd(fd).is_ok_and(crate::lock::fskind::grants_locks_here)
}

/// Whether process `pid` is a lockhook holder (its name: see `holder::spare::name_self`). A
/// recycled pid of any other process is never asked for an fd.
fn is_holder(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "lockhook-holder")
}

/// The shared lock on `identity`, through the description another holder of this host holds it
/// by; `None` when there is none to be had (the caller then takes a lock of its own).
///
/// The donor's fd is checked from its fdinfo before it is duplicated (never an fd that is not
/// the lock asked for), and the duplicate again (the donor may have closed and reused that fd
/// number in between); only then is the file itself looked at.
pub fn borrow(paths: &Paths, identity: &Identity) -> Option<HeldLock> {
    let (pid, fd) = read_entry(&entry_path(paths, identity))?;
    if !is_holder(pid)
        || !fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).is_ok_and(|t| holds_shared(&t, identity))
    {
        return None;
    }
    let dup = duplicate(pid, fd).ok()?;
    let own = fs::read_to_string(format!("/proc/self/fdinfo/{}", dup.as_raw_fd())).ok()?;
    if !holds_shared(&own, identity) || !local_locks(dup.as_fd()) {
        return None;
    }
    let meta = nix::sys::stat::fstat(dup.as_raw_fd()).ok()?;
    let block_device = meta.st_mode & libc::S_IFMT == libc::S_IFBLK;
    Some(HeldLock { fd: dup, identity: *identity, mode: LockMode::Shared, block_device, created: false })
}

/// Publishes this process's shared locks that no live entry offers yet: `held` is
/// (identity, mode, fd) of each lock. Returns what it published, with the fd numbers named
/// (for `withdraw`). Runs in a holder after it answered the hook: never on a start's critical
/// path.
pub fn publish<'a>(
    paths: &Paths,
    held: impl Iterator<Item = (Identity, LockMode, BorrowedFd<'a>)>,
) -> Vec<(Identity, RawFd)> {
    let mut published = Vec::new();
    for (identity, mode, fd) in held {
        // Only a read-only description may be shared (see the module documentation).
        if mode != LockMode::Shared || crate::lock::is_writable(fd) {
            continue;
        }
        // Someone else's entry that still works stays: one description per lock is the point.
        if borrow(paths, &identity).is_some() {
            continue;
        }
        match write_entry(paths, &identity, fd) {
            Ok(()) => published.push((identity, fd.as_raw_fd())),
            Err(e) => log::debug!("shared lock {identity:?}: cannot publish it: {e}"),
        }
    }
    published
}

fn write_entry(paths: &Paths, identity: &Identity, fd: BorrowedFd<'_>) -> io::Result<()> {
    let dir = paths.shares_dir();
    match fs::create_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let pid = std::process::id();
    let tmp = dir.join(format!(".{pid}.tmp"));
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    file.write_all(format!("{pid} {}\n", fd.as_raw_fd()).as_bytes())?;
    drop(file);
    fs::rename(&tmp, entry_path(paths, identity)).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Removes the entries this process published (it is letting its locks go); entries another
/// holder has written since are left alone.
pub fn withdraw(paths: &Paths, published: &[Identity]) {
    let me = std::process::id();
    for identity in published {
        let path = entry_path(paths, identity);
        if read_entry(&path).is_some_and(|(pid, _)| pid == me) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Removes the entries of processes that are gone or are no holders (holders killed before
/// they could withdraw, their pids maybe recycled): run where dead holders are dealt with and
/// by every full `reconcile` pass (its timer), so entries do not pile up with crashed guests.
pub fn sweep(paths: &Paths) -> usize {
    let Ok(dir) = fs::read_dir(paths.shares_dir()) else { return 0 };
    let mut removed = 0;
    for entry in dir.flatten() {
        let path = entry.path();
        let alive = read_entry(&path).is_some_and(|(pid, _)| is_holder(pid));
        if !alive && fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{self, Create};
    use std::os::unix::fs::MetadataExt;

    /// Donors are holders: this test process passes for one.
    fn be_a_holder() {
        fs::write("/proc/self/comm", "lockhook-holder").expect("name this process");
    }

    fn identity(path: &Path, offset: u64) -> Identity {
        let meta = fs::metadata(path).expect("meta");
        Identity { dev: meta.dev(), ino: meta.ino(), offset }
    }

    #[test]
    fn fdinfo_is_read_for_access_mode_the_inode_and_the_exact_byte() {
        let id = Identity { dev: libc::makedev(0xfe, 0), ino: 42, offset: 0 };
        let lock = |mode: &str, ino: u64, start: u64| {
            format!("lock:\t1: OFDLCK ADVISORY  {mode}  -1 fe:00:{ino} {start} {start}\n")
        };
        let ro = "pos:\t0\nflags:\t02100000\nmnt_id:\t30\nino:\t42\n";
        let rw = "pos:\t0\nflags:\t02100002\nmnt_id:\t30\nino:\t42\n";
        assert!(holds_shared(&format!("{ro}{}", lock("READ", 42, 0)), &id));
        assert!(!holds_shared(&format!("{ro}{}", lock("READ", 42, 7)), &id), "another byte");
        assert!(!holds_shared(&format!("{ro}{}", lock("READ", 43, 0)), &id), "another inode");
        assert!(!holds_shared(&format!("{ro}{}", lock("READ", 42, 0)), &Identity { dev: libc::makedev(8, 1), ..id }));
        assert!(!holds_shared(&format!("{ro}{}", lock("WRITE", 42, 0)), &id));
        assert!(
            !holds_shared(&format!("{rw}{}", lock("READ", 42, 0)), &id),
            "read-write descriptions are never shared"
        );
        assert!(!holds_shared(ro, &id), "no lock");
        let posix = "lock:\t1: POSIX  ADVISORY  READ  77 fe:00:42 0 0\n";
        assert!(!holds_shared(&format!("{ro}{posix}"), &id));
        assert_eq!(parse_entry("123 7\n"), Some((123, 7)));
        assert_eq!(parse_entry("0 7"), None);
        assert_eq!(parse_entry("12 x"), None);
        assert_eq!(parse_entry(""), None);
    }

    #[test]
    fn a_published_shared_lock_is_borrowed_and_outlives_its_first_holder() {
        be_a_holder();
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        let image = dir.path().join("base.img");
        fs::write(&image, b"base").expect("write");
        let first = lock::acquire(&image, LockMode::Shared, 0, Create::No).expect("lock");
        let id = first.identity;
        assert!(borrow(&paths, &id).is_none(), "nothing published yet");
        let published = publish(&paths, std::iter::once((id, LockMode::Shared, first.fd.as_fd())));
        assert_eq!(published, vec![(id, first.fd.as_raw_fd())]);
        // A second publisher finds the first one's entry working and leaves it.
        let second = borrow(&paths, &id).expect("borrowed");
        assert!(publish(&paths, std::iter::once((id, LockMode::Shared, second.fd.as_fd()))).is_empty());
        // One description: the kernel lists one lock on the file, not two.
        let count = || {
            lock::proc_locks::read()
                .expect("/proc/locks")
                .iter()
                .filter(|e| e.ino == id.ino && e.kind == lock::proc_locks::Kind::Ofd)
                .count()
        };
        assert_eq!(count(), 1);
        // The first holder goes: the lock stays, held by the second, and no writer gets in.
        withdraw(&paths, &[id]);
        drop(first);
        assert!(borrow(&paths, &id).is_none(), "its entry went with it");
        assert_eq!(lock::probe(&image, 0).expect("probe").0, Some(LockMode::Shared));
        assert!(lock::acquire(&image, LockMode::Exclusive, 0, Create::No).is_err());
        drop(second);
        assert_eq!(lock::probe(&image, 0).expect("probe").0, None, "the last user took the lock with it");
    }

    #[test]
    fn an_entry_that_lies_is_not_borrowed() {
        be_a_holder();
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        fs::write(&a, b"a").expect("write");
        fs::write(&b, b"b").expect("write");
        let held_a = lock::acquire(&a, LockMode::Shared, 0, Create::No).expect("lock");
        let unlocked_b = fs::File::open(&b).expect("open");
        let id_b = identity(&b, 0);
        fs::create_dir(paths.shares_dir()).expect("dir");
        let me = std::process::id();
        // A process that is no holder (pid 1), another file's fd, an fd with no lock, a dead
        // process, garbage.
        for text in [
            format!("1 {}", held_a.fd.as_raw_fd()),
            format!("{me} {}", held_a.fd.as_raw_fd()),
            format!("{me} {}", unlocked_b.as_raw_fd()),
            format!("{} {}", i32::MAX - 1, held_a.fd.as_raw_fd()),
            "not an entry".to_owned(),
        ] {
            fs::write(entry_path(&paths, &id_b), text).expect("write");
            assert!(borrow(&paths, &id_b).is_none());
        }
        // A shared lock on another byte of the right file is not the lock asked for.
        let held_b7 = lock::acquire(&b, LockMode::Shared, 7, Create::No).expect("lock");
        fs::write(entry_path(&paths, &id_b), format!("{me} {}", held_b7.fd.as_raw_fd())).expect("write");
        assert!(borrow(&paths, &id_b).is_none());
        // An entry of a dead process, or of one that is no holder, is swept; a live one stays.
        fs::write(entry_path(&paths, &id_b), format!("{} 3", i32::MAX - 1)).expect("write");
        let id_c = Identity { ino: id_b.ino + 1, ..id_b };
        fs::write(entry_path(&paths, &id_c), "1 3").expect("write");
        let id_a = held_a.identity;
        fs::write(entry_path(&paths, &id_a), format!("{me} {}", held_a.fd.as_raw_fd())).expect("write");
        assert_eq!(sweep(&paths), 2);
        assert!(borrow(&paths, &id_a).is_some());
    }

    #[test]
    fn locks_of_network_filesystems_are_never_shared() {
        let dev_shm = fs::File::open("/dev/shm").expect("tmpfs");
        assert!(local_locks(dev_shm.as_fd()), "tmpfs and devtmpfs locks are the kernel's own");
        let proc = fs::File::open("/proc/self/stat").expect("proc");
        assert!(!local_locks(proc.as_fd()), "anything not known to be local is not");
    }
}
