//! The lockspace directory (`lockspace_dir`), shared by the hosts of a fleet.
//!
//! ```text
//! <lockspace>/
//!   owners/<key-hash>/<uuid>.<host>.<nonce>.json  who holds a resource (one record per holder)
//!   network/<key-hash>.lock                        lock files for network disks (nbd, rbd, ...)
//!   block/<key-hash>.lock                          lock files for block devices, by stable identity
//! ```
//!
//! Every host computes the same key for the same resource: `file:<canonical path>@<offset>` for
//! images and leases (all hosts mount shared storage at the same path, as libvirt migration
//! requires), `net:<protocol>://<hosts>/<name>` for network disks, `block:<stable id>` for block
//! devices. Directory and file names use a 64-bit FNV-1a hash of the key; the key itself is in
//! every record, so a hash collision is recognised. Readers take any `*.json` in a key's
//! directory as a record, so the `<nonce>` part (new in record names) is invisible to older hosts.
//!
//! A record is live only while its holder holds an OFD lock on byte 0 of the record file: a
//! crashed host's records lose their locks when the shared filesystem's lock manager recovers
//! (NFSv4: after the lease time; GFS2/OCFS2: after fencing), and whoever finds such a record
//! removes it. Records are written to a fresh temp file, locked, and then renamed to a name no
//! record ever had, so no reader ever sees a live record unlocked, and a record never locked
//! again once its holder let go.
//!
//! # What is trusted, and why
//!
//! Every host's root can write here, so the lockspace is input, not state:
//! - *Trusted:* the path `lockspace_dir` up to its parent (root's config; it names the shared
//!   mount), and the shared filesystem's lock manager (it is the fleet's lock engine).
//! - *Not trusted:* everything at or below `lockspace_dir`, including that directory itself. It
//!   is opened with `O_DIRECTORY|O_NOFOLLOW` and every name below it is resolved one component at
//!   a time relative to a directory fd, never following a symlink (`dir`): a symlink planted for
//!   `owners/<hash>`, `network/<hash>.lock` or a record cannot lead root to read, create, lock or
//!   delete anything elsewhere. Only regular files and directories are used; a FIFO, socket or
//!   device is skipped with a warning and never opened in a way that could block.
//! - *Record contents* are only shown in messages and compared (key, UUID, host); a record
//!   larger than 64 KiB is not read.
//! - *Deleting:* only a stale record, and only once verified by inode under its own lock (see
//!   `remove_stale`); a record whose lock cannot be probed (ENOLCK, EIO) is kept. Lock files and
//!   directories are never removed, except a key's empty record directory by its last holder.
//! - Another host's root can still delete or rewrite anything here (it could as well unmount the
//!   storage): that can hide who holds a resource from a refusal message or defeat a migration's
//!   check, or (by removing a held lock file) let a later start lock a fresh file of the same
//!   name; it never makes this host touch files outside the lockspace, block, or remove a live
//!   record.
//!
//! Size: about 330 lines of code; the other 280 are its unit tests, kept beside what they test.

mod dir;
mod records;

pub use records::{OwnerRecord, Published, Seen};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::dir::{Dir, DirError, Entry};
use crate::lock::{self, LockError, LockMode};

#[derive(Debug, thiserror::Error)]
pub enum LockspaceError {
    #[error("lockspace_dir {path} does not exist: create it (install.sh does) or mount the shared storage")]
    Missing { path: PathBuf },
    #[error("{path} is a {kind}, not a directory (nothing in the lockspace is followed through a symlink)")]
    NotDirectory { path: PathBuf, kind: &'static str },
    #[error("{path}: cannot open the lockspace directory")]
    OpenLockspace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot open directory")]
    OpenDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot create directory")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot list directory")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind}, not a regular file: left alone")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: cannot open owner record")]
    OpenRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot tell whether the owner record is live; kept")]
    ProbeRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot lock owner record")]
    LockRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot create owner record")]
    CreateRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot write owner record")]
    WriteRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot remove stale owner record")]
    RemoveRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LockspaceError {
    /// Whether the lockspace directory does not exist (a host without one has no records).
    pub fn is_missing(&self) -> bool {
        matches!(self, LockspaceError::Missing { .. })
    }
}

/// 64-bit FNV-1a, as 16 hex digits: stable across hosts, builds and versions.
pub fn hash(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The key of an image or lease file: its canonical path and the locked byte.
pub fn file_key(path: &Path, offset: u64) -> String {
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    format!("file:{}@{offset}", canonical.display())
}

/// Which lock files a lockspace lock file is among: `network/` (network disks) or `block/`
/// (block devices, by stable identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockFileKind {
    Network,
    Block,
    /// A `<lease>` under the sanlock engine: sanlock's lease is the cross-host lock, this the
    /// local one (the lease's own file is sanlock's paxos area, shared by every host).
    Lease,
}

impl LockFileKind {
    pub fn dir_name(self) -> &'static str {
        match self {
            LockFileKind::Network => "network",
            LockFileKind::Block => "block",
            LockFileKind::Lease => "lease",
        }
    }
}

impl std::fmt::Display for LockFileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// Whether taking a lock file's lock may wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    No,
    /// `F_OFD_SETLKW`: until the holder lets go (migration hand-over). Blocks the thread.
    Yes,
}

fn lock_file_name(key: &str) -> String {
    format!("{}.lock", hash(key))
}

#[derive(Debug, Clone)]
pub struct Lockspace {
    dir: PathBuf,
}

impl Lockspace {
    pub fn new(dir: &Path) -> Lockspace {
        Lockspace { dir: dir.to_owned() }
    }

    /// The lock file standing for a resource that cannot be locked in place, as a path for
    /// messages and state files. It is only ever opened through `acquire`.
    pub fn lock_file(&self, kind: LockFileKind, key: &str) -> PathBuf {
        self.dir.join(kind.dir_name()).join(lock_file_name(key))
    }

    /// Makes sure the lockspace is a directory and has the directory for `kind`'s lock files.
    pub fn prepare(&self, kind: LockFileKind) -> Result<(), LockspaceError> {
        subdir(&self.root()?, kind.dir_name(), true).map(|_| ())
    }

    /// The device and inode of `kind`'s lock file for `key`; `None` while it does not exist.
    pub fn lock_file_inode(&self, kind: LockFileKind, key: &str) -> io::Result<Option<(u64, u64)>> {
        let dir = match subdir(&self.root().map_err(io::Error::other)?, kind.dir_name(), false) {
            Ok(Some(dir)) => dir,
            Ok(None) => return Ok(None),
            Err(e) => return Err(io::Error::other(e)),
        };
        match dir.stat(&lock_file_name(key)) {
            Ok(entry) if entry.kind == Entry::FILE => Ok(Some((entry.dev, entry.ino))),
            Ok(entry) => Err(DirError::Unexpected { kind: entry.kind }.into_io()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into_io()),
        }
    }

    /// Opens (creating it if missing) `kind`'s lock file for `key` and locks byte `offset` in
    /// `mode`, waiting for it when `wait` says so (a migration hand-over).
    ///
    /// The file is reached through the lockspace's directory fds only, created with
    /// `O_CREAT|O_NOFOLLOW`, and must be a regular file: a symlink planted there is refused, so
    /// nothing outside the lockspace is ever created or opened on its behalf.
    pub fn acquire(
        &self,
        kind: LockFileKind,
        key: &str,
        mode: LockMode,
        offset: u64,
        wait: Wait,
    ) -> Result<lock::HeldLock, LockError> {
        self.acquire_as(kind, key, mode, mode, offset, wait)
    }

    /// Like `acquire`, but opens the file as `open` needs (read-write for `Exclusive`), so a
    /// shared lock can later be upgraded in place (`lock::upgrade_fd`).
    pub fn acquire_as(
        &self,
        kind: LockFileKind,
        key: &str,
        open: LockMode,
        mode: LockMode,
        offset: u64,
        wait: Wait,
    ) -> Result<lock::HeldLock, LockError> {
        let path = self.lock_file(kind, key);
        if offset > lock::MAX_OFFSET {
            return Err(LockError::OffsetTooLarge { path, offset });
        }
        let open_error =
            |source: LockspaceError| LockError::Open { path: path.clone(), source: io::Error::other(source) };
        let dir = subdir(&self.root().map_err(open_error)?, kind.dir_name(), true)
            .map_err(open_error)?
            .ok_or_else(|| open_error(LockspaceError::Missing { path: self.dir.clone() }))?;
        let access = if open.max(mode) == LockMode::Exclusive { libc::O_RDWR } else { libc::O_RDONLY };
        let (file, entry) = dir.open_file(&lock_file_name(key), access | libc::O_CREAT).map_err(|e| match e {
            DirError::Unexpected { kind } => LockError::NotLockable { path: path.clone(), kind },
            DirError::Io(source) => LockError::Open { path: path.clone(), source },
        })?;
        let identity = lock::Identity { dev: entry.dev, ino: entry.ino, offset };
        let locked = match wait {
            Wait::No => lock::try_lock_fd(&file, mode, offset),
            Wait::Yes => lock::lock_wait_fd(&file, mode, offset),
        };
        locked.map_err(|source| {
            if source.kind() == io::ErrorKind::WouldBlock {
                LockError::AlreadyLocked { path: path.clone(), identity }
            } else {
                LockError::Lock { path: path.clone(), source }
            }
        })?;
        Ok(lock::HeldLock { fd: file.into(), identity, mode, block_device: false, created: false })
    }

    /// Which lock, if any, someone holds on byte `offset` of `kind`'s lock file for `key`, and
    /// the file's identity; `Ok(None)` when the lock file does not exist (nobody ever locked it).
    /// Never creates anything and never locks.
    pub fn probe(
        &self,
        kind: LockFileKind,
        key: &str,
        offset: u64,
    ) -> Result<Option<(Option<LockMode>, lock::Identity)>, LockError> {
        let path = self.lock_file(kind, key);
        let open_error =
            |source: LockspaceError| LockError::Open { path: path.clone(), source: io::Error::other(source) };
        let Some(dir) = subdir(&self.root().map_err(open_error)?, kind.dir_name(), false).map_err(open_error)? else {
            return Ok(None);
        };
        let (file, entry) = match dir.open_file(&lock_file_name(key), libc::O_RDONLY) {
            Ok(opened) => opened,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(DirError::Unexpected { kind }) => return Err(LockError::NotLockable { path, kind }),
            Err(DirError::Io(source)) => return Err(LockError::Open { path, source }),
        };
        let state = lock::probe_fd(&file, offset).map_err(|source| LockError::Lock { path: path.clone(), source })?;
        Ok(Some((state, lock::Identity { dev: entry.dev, ino: entry.ino, offset })))
    }

    /// Opens the lockspace directory (not through a symlink).
    fn root(&self) -> Result<Dir, LockspaceError> {
        Dir::open_root(&self.dir).map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT) => LockspaceError::Missing { path: self.dir.clone() },
            Some(libc::ENOTDIR) | Some(libc::ELOOP) => LockspaceError::NotDirectory {
                path: self.dir.clone(),
                kind: fs::symlink_metadata(&self.dir).map_or("special file", |m| dir::kind_of_meta(&m)),
            },
            _ => LockspaceError::OpenLockspace { path: self.dir.clone(), source },
        })
    }
}

/// Opens (or, with `create`, makes and opens) the subdirectory `name` of `parent`.
fn subdir(parent: &Dir, name: &str, create: bool) -> Result<Option<Dir>, LockspaceError> {
    let opened = if create { parent.create_dir(name) } else { parent.open_dir(name) };
    match opened {
        Ok(dir) => Ok(Some(dir)),
        Err(e) if e.is_not_found() && !create => Ok(None),
        Err(DirError::Unexpected { kind }) => Err(LockspaceError::NotDirectory { path: parent.join(name), kind }),
        Err(DirError::Io(source)) if create => Err(LockspaceError::CreateDir { path: parent.join(name), source }),
        Err(DirError::Io(source)) => Err(LockspaceError::OpenDir { path: parent.join(name), source }),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::domain::Uuid;

    pub(super) fn record(key: &str, uuid: &str, host: &str) -> OwnerRecord {
        OwnerRecord {
            role: None,
            command: false,
            key: key.to_owned(),
            host: host.to_owned(),
            guest: "vm1".to_owned(),
            uuid: Uuid::parse(uuid).expect("uuid"),
            mode: LockMode::Exclusive,
            since: crate::clock::now(),
            holder_pid: std::process::id(),
        }
    }

    pub(super) fn owners_path(root: &Path, key: &str) -> PathBuf {
        root.join("owners").join(hash(key))
    }

    pub(super) fn count(dir: &Path) -> usize {
        fs::read_dir(dir).map_or(0, |d| d.count())
    }

    /// A record file nobody holds a lock on, as a dead holder leaves it.
    pub(super) fn plant_stale(dir: &Path, name: &str, record: &OwnerRecord) {
        fs::create_dir_all(dir).expect("mkdir");
        fs::write(dir.join(name), serde_json::to_vec(record).expect("json")).expect("write");
    }

    /// Runs `f` on a thread and fails the test if it does not return within five seconds.
    pub(super) fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("returned without blocking")
    }

    #[test]
    fn a_missing_or_non_directory_lockspace_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("dir");
        let rec = record("k", "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab", "kvm-01");
        let missing = Lockspace::new(&dir.path().join("missing"));
        assert!(matches!(missing.publish(&rec), Err(LockspaceError::Missing { .. })));
        assert!(missing.owners("k").is_empty());
        fs::write(dir.path().join("file"), b"").expect("write");
        let file = Lockspace::new(&dir.path().join("file"));
        assert!(matches!(file.publish(&rec), Err(LockspaceError::NotDirectory { kind: "regular file", .. })));
        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).expect("symlink");
        let link = Lockspace::new(&dir.path().join("link"));
        assert!(matches!(link.publish(&rec), Err(LockspaceError::NotDirectory { kind: "symbolic link", .. })));
        assert!(!dir.path().join("owners").exists());
    }

    #[test]
    fn lock_files_are_created_and_locked_in_the_lockspace_only() {
        let dir = tempfile::tempdir().expect("dir");
        let ls = Lockspace::new(dir.path());
        let key = "net:nbd://h/x";
        ls.prepare(LockFileKind::Network).expect("prepare");
        assert_eq!(ls.lock_file_inode(LockFileKind::Network, key).expect("stat"), None);
        let held = ls.acquire(LockFileKind::Network, key, LockMode::Exclusive, 0, Wait::No).expect("lock");
        let path = ls.lock_file(LockFileKind::Network, key);
        assert!(path.is_file());
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!(ls.lock_file_inode(LockFileKind::Network, key).expect("stat"), Some((meta.dev(), meta.ino())));
        assert_eq!((held.identity.dev, held.identity.ino), (meta.dev(), meta.ino()));
        match ls.acquire(LockFileKind::Network, key, LockMode::Shared, 0, Wait::No) {
            Err(LockError::AlreadyLocked { identity, .. }) => assert_eq!(identity, held.identity),
            other => panic!("expected AlreadyLocked, got {other:?}"),
        }
        drop(held);
        let _shared = ls.acquire(LockFileKind::Network, key, LockMode::Shared, 0, Wait::Yes).expect("free again");
        assert_eq!(lock::probe(&path, 0).expect("probe").0, Some(LockMode::Shared));
    }

    #[test]
    fn a_symlinked_lock_file_or_directory_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("dir");
        let outside = tempfile::tempdir().expect("outside");
        let ls = Lockspace::new(dir.path());
        let key = "block:wwn-0x5000";
        fs::create_dir(dir.path().join("block")).expect("mkdir");
        // A dangling link (would create the target) and one to an existing file (would open it).
        let target = outside.path().join("created-by-root");
        std::os::unix::fs::symlink(&target, ls.lock_file(LockFileKind::Block, key)).expect("symlink");
        let existing = outside.path().join("shadow");
        fs::write(&existing, b"secret").expect("write");
        std::os::unix::fs::symlink(&existing, ls.lock_file(LockFileKind::Block, "block:other")).expect("symlink");
        for mode in [LockMode::Shared, LockMode::Exclusive] {
            for (k, wait) in [(key, Wait::No), ("block:other", Wait::Yes)] {
                match ls.acquire(LockFileKind::Block, k, mode, 0, wait) {
                    Err(LockError::NotLockable { kind: "symbolic link", .. }) => {}
                    other => panic!("{k}: expected NotLockable, got {other:?}"),
                }
            }
            assert!(ls.lock_file_inode(LockFileKind::Block, key).is_err());
        }
        assert!(!target.exists(), "nothing created through the link");
        assert_eq!(lock::probe(&existing, 0).expect("probe").0, None);
        assert_eq!(fs::read(&existing).expect("read"), b"secret");
        // A FIFO as a lock file: refused at once.
        nix::unistd::mkfifo(&ls.lock_file(LockFileKind::Block, "block:fifo"), nix::sys::stat::Mode::S_IRWXU)
            .expect("mkfifo");
        let got = within_seconds({
            let ls = ls.clone();
            move || ls.acquire(LockFileKind::Block, "block:fifo", LockMode::Exclusive, 0, Wait::Yes).map(|_| ())
        });
        assert!(matches!(got, Err(LockError::NotLockable { kind: "FIFO", .. })));
        // `network` itself a symlink: neither prepare nor acquire go through it.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("network")).expect("symlink");
        assert!(matches!(ls.prepare(LockFileKind::Network), Err(LockspaceError::NotDirectory { .. })));
        assert!(matches!(
            ls.acquire(LockFileKind::Network, "net:x", LockMode::Exclusive, 0, Wait::No),
            Err(LockError::Open { .. })
        ));
        assert_eq!(count(outside.path()), 1, "nothing created outside");
    }

    /// A small seeded generator (xorshift64*), so a failing tree can be rebuilt from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Everything below `dir`: path, type, size, content and modification time.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, String, u64, Vec<u8>, i64)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).expect("read_dir").flatten() {
                let meta = fs::symlink_metadata(entry.path()).expect("lstat");
                let data = if meta.is_file() { fs::read(entry.path()).expect("read") } else { Vec::new() };
                if meta.is_dir() {
                    stack.push(entry.path());
                }
                let ft = meta.file_type();
                let kind = if ft.is_file() {
                    "file".to_owned()
                } else if ft.is_symlink() {
                    format!("link to {:?}", fs::read_link(entry.path()).expect("readlink"))
                } else {
                    format!("{:o}", meta.mode() & libc::S_IFMT)
                };
                out.push((entry.path(), kind, meta.len(), data, meta.mtime_nsec() + meta.mtime() * 1_000_000_000));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn random_planted_trees_change_nothing_outside_and_never_block() {
        let keys = ["net:nbd://a/x", "net:rbd://b/y", "block:wwn-1", "file:/s/a.qcow2@0"];
        for seed in 1..=48u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let tmp = tempfile::tempdir().expect("dir");
            let root = tmp.path().join("ls");
            let outside = tmp.path().join("outside");
            fs::create_dir_all(outside.join("sub")).expect("mkdir");
            let victim = record(keys[0], "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab", "victim");
            for name in ["a.json", "b.lock", "sub/c.json"] {
                fs::write(outside.join(name), serde_json::to_vec(&victim).expect("json")).expect("write");
            }
            fs::create_dir(&root).expect("mkdir");
            let ls = Lockspace::new(&root);
            // Some live records, published the proper way; they must survive and be listed.
            let live: Vec<(OwnerRecord, Published)> = (0..rng.below(3))
                .map(|i| {
                    let key = keys[usize::try_from(rng.below(4)).expect("small")];
                    let r = record(key, "0e4c9a51-7a2f-4b83-9d4e-5f6a7b8c9d0e", &format!("live{i}"));
                    let p = ls.publish(&r).expect("publish");
                    (r, p)
                })
                .collect();
            // Planted objects in owners/<hash>/ and network/ and block/, and sometimes in place of
            // those directories themselves.
            let mut dirs: Vec<PathBuf> = keys.iter().map(|k| owners_path(&root, k)).collect();
            dirs.extend([root.join("network"), root.join("block")]);
            for d in &dirs {
                if rng.below(6) == 0 && !d.exists() {
                    fs::create_dir_all(d.parent().expect("parent")).expect("mkdir");
                    let to = if rng.below(2) == 0 { outside.clone() } else { outside.join("sub") };
                    std::os::unix::fs::symlink(to, d).expect("symlink dir");
                    continue;
                }
                fs::create_dir_all(d).expect("mkdir");
                for n in 0..rng.below(6) {
                    let name = match (d.starts_with(root.join("owners")), rng.below(3)) {
                        (true, _) => format!("p{n}.json"),
                        (false, 0) => lock_file_name(keys[usize::try_from(rng.below(4)).expect("small")]),
                        (false, _) => format!("p{n}.lock"),
                    };
                    let path = d.join(&name);
                    if fs::symlink_metadata(&path).is_ok() {
                        continue;
                    }
                    match rng.below(8) {
                        0 => fs::write(&path, serde_json::to_vec(&victim).expect("json")).expect("stale file"),
                        1 => fs::create_dir(&path).expect("dir"),
                        2 => std::os::unix::fs::symlink(outside.join("a.json"), &path).expect("link out"),
                        3 => std::os::unix::fs::symlink(outside.join("new.lock"), &path).expect("dangling out"),
                        4 => std::os::unix::fs::symlink(&outside, &path).expect("link out dir"),
                        5 => std::os::unix::fs::symlink(d.join("p0.json"), &path).expect("link in"),
                        6 => nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("fifo"),
                        _ => drop(std::os::unix::net::UnixListener::bind(&path).expect("socket")),
                    }
                }
            }
            let before = snapshot(&outside);
            let ls2 = ls.clone();
            let (listed, taken) = within_seconds(move || {
                let listed: Vec<Vec<OwnerRecord>> = keys.iter().map(|k| ls2.owners(k)).collect();
                let mut taken = Vec::new();
                for kind in [LockFileKind::Network, LockFileKind::Block] {
                    for key in keys {
                        for mode in [LockMode::Shared, LockMode::Exclusive] {
                            taken.push(ls2.acquire(kind, key, mode, 0, Wait::No).map(|h| h.identity));
                        }
                    }
                }
                (listed, taken)
            });
            assert_eq!(snapshot(&outside), before, "seed {seed}: something outside the lockspace changed");
            for (path, ..) in &before {
                if fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
                    assert_eq!(lock::probe(path, 0).expect("probe").0, None, "seed {seed}: {path:?} locked");
                }
            }
            for (r, p) in &live {
                let i = keys.iter().position(|k| *k == r.key).expect("key");
                if ls.is_published(p).unwrap_or(false) {
                    assert!(listed[i].contains(r), "seed {seed}: live record of {} not listed", r.key);
                }
            }
            // Every lock taken is on a regular file inside the lockspace.
            let inside: Vec<(u64, u64)> = snapshot(&root)
                .iter()
                .filter(|(_, kind, ..)| kind == "file")
                .map(|(path, ..)| fs::symlink_metadata(path).map(|m| (m.dev(), m.ino())).expect("lstat"))
                .collect();
            for identity in taken.into_iter().flatten() {
                assert!(inside.contains(&(identity.dev, identity.ino)), "seed {seed}: a lock outside the lockspace");
            }
        }
    }

    #[test]
    fn keys_are_stable() {
        assert_eq!(hash(""), "cbf29ce484222325");
        assert_eq!(hash("a"), "af63dc4c8601ec8c");
        let dir = tempfile::tempdir().expect("dir");
        let img = dir.path().join("img");
        fs::write(&img, b"x").expect("write");
        std::os::unix::fs::symlink(&img, dir.path().join("link")).expect("symlink");
        assert_eq!(file_key(&img, 0), file_key(&dir.path().join("link"), 0));
        assert_ne!(file_key(&img, 0), file_key(&img, 1024));
    }
}
