//! Directory fds below `lockspace_dir`: the only place a name in the lockspace is resolved.
//!
//! Another host's root can plant anything in the lockspace: symlinks to `/etc`, FIFOs, sockets,
//! device nodes, directories where files belong. So nothing here ever resolves a path. The
//! lockspace directory itself is opened once per operation with `O_DIRECTORY|O_NOFOLLOW`, and
//! every name below it is one component, opened relative to its parent's fd with `openat2`
//! (`RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS`; plain `openat` with
//! `O_NOFOLLOW` where the kernel has no `openat2`, which for a single component is the same
//! guarantee). Directories are made with `mkdirat` and then opened the same way.
//!
//! Files are looked at with `fstatat(AT_SYMLINK_NOFOLLOW)` before they are opened (so a device
//! node is never opened at all), opened with `O_NONBLOCK|O_NOCTTY` (so a FIFO swapped in after
//! that look cannot block), and checked again with `fstat` of what was actually opened.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// A name that is there but is not what was asked for, or an I/O error.
#[derive(Debug)]
pub enum DirError {
    /// The name is a symlink, FIFO, socket, device, or a directory where a file was expected
    /// (or the other way round). `kind` says which, for messages.
    Unexpected {
        kind: &'static str,
    },
    Io(io::Error),
}

impl From<io::Error> for DirError {
    fn from(e: io::Error) -> DirError {
        DirError::Io(e)
    }
}

impl From<nix::Error> for DirError {
    fn from(e: nix::Error) -> DirError {
        DirError::Io(e.into())
    }
}

impl DirError {
    /// Whether the name does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DirError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }

    /// As an `io::Error`, for callers that report one.
    pub fn into_io(self) -> io::Error {
        match self {
            DirError::Io(e) => e,
            DirError::Unexpected { kind } => {
                io::Error::other(format!("is a {kind}; the lockspace holds only regular files and directories"))
            }
        }
    }
}

/// What a name in a directory is, from `fstatat(AT_SYMLINK_NOFOLLOW)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub dev: u64,
    pub ino: u64,
}

impl Entry {
    pub const FILE: &'static str = "regular file";
    pub const DIR: &'static str = "directory";

    pub fn same_inode(&self, dev: u64, ino: u64) -> bool {
        (self.dev, self.ino) == (dev, ino)
    }
}

/// What `symlink_metadata` describes, in the words of `Entry::kind`.
pub fn kind_of_meta(meta: &std::fs::Metadata) -> &'static str {
    kind_of(meta.mode())
}

fn kind_of(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Entry::FILE,
        SFlag::S_IFDIR => Entry::DIR,
        SFlag::S_IFLNK => "symbolic link",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFCHR => "character device",
        _ => "special file",
    }
}

/// A directory in the lockspace, open as an fd. `path` is only for messages.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Set once `openat2` turned out not to exist (ENOSYS), so it is not tried again.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A single path component: not empty, not `.` or `..`, no `/` and no NUL.
fn component(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a plain file name")));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file name contains NUL"))
}

impl Dir {
    /// Opens the lockspace directory itself. Its last component is not followed if it is a
    /// symlink (ELOOP or ENOTDIR); the path above it is the administrator's config.
    pub fn open_root(path: &Path) -> io::Result<Dir> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Dir { fd: file.into(), path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory, for messages and records.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `openat2(self, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)` with symlinks refused anywhere.
    fn openat(&self, name: &str, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
        let cname = component(name)?;
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // openat2 insists on a zero mode unless a file may be created.
        let mode = if flags & libc::O_CREAT != 0 { mode } else { 0 };
        loop {
            let rc = if NO_OPENAT2.load(Ordering::Relaxed) {
                // SAFETY: `self.fd` is an open directory fd for the call and `cname` is a valid
                // NUL-terminated string; `openat` reads only these.
                unsafe { libc::c_long::from(libc::openat(self.fd.as_raw_fd(), cname.as_ptr(), flags, mode)) }
            } else {
                // SAFETY: `open_how` is plain old data for which all-zero is valid (and what the
                // kernel expects for fields we do not set).
                let mut how: libc::open_how = unsafe { std::mem::zeroed() };
                how.flags = u64::try_from(flags).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                how.mode = u64::from(mode);
                how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
                // SAFETY: openat2(dirfd, path, how, size): `self.fd` is open for the call, `cname`
                // is NUL-terminated, `how` points to an initialised `open_how` of the size passed.
                unsafe {
                    libc::syscall(
                        libc::SYS_openat2,
                        self.fd.as_raw_fd(),
                        cname.as_ptr(),
                        &raw const how,
                        std::mem::size_of::<libc::open_how>(),
                    )
                }
            };
            if rc >= 0 {
                let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::other("openat2 returned no fd"))?;
                // SAFETY: the kernel just returned this fd to us and nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) if !NO_OPENAT2.load(Ordering::Relaxed) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    continue;
                }
                _ => return Err(err),
            }
        }
    }

    /// What `name` is, without following it.
    pub fn stat(&self, name: &str) -> Result<Entry, DirError> {
        component(name)?;
        let st = nix::sys::stat::fstatat(Some(self.fd.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        Ok(Entry { kind: kind_of(st.st_mode), dev: st.st_dev, ino: st.st_ino })
    }

    /// Opens the subdirectory `name` (never through a symlink).
    pub fn open_dir(&self, name: &str) -> Result<Dir, DirError> {
        let entry = self.stat(name)?;
        if entry.kind != Entry::DIR {
            return Err(DirError::Unexpected { kind: entry.kind });
        }
        let fd = self.openat(name, libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(|e| self.refine(name, e))?;
        Ok(Dir { fd, path: self.join(name) })
    }

    /// Creates the subdirectory `name` if missing (`mkdirat`), then opens it as `open_dir` does.
    pub fn create_dir(&self, name: &str) -> Result<Dir, DirError> {
        component(name)?;
        match nix::sys::stat::mkdirat(Some(self.fd.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::Error::EEXIST) => self.open_dir(name),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the regular file `name` with `flags` (`O_RDONLY`, `O_RDWR`, plus `O_CREAT` or
    /// `O_CREAT|O_EXCL`, mode 0644 when created). Anything that is not a regular file is
    /// `Unexpected` and, but for a lost race, not even opened.
    pub fn open_file(&self, name: &str, flags: libc::c_int) -> Result<(File, Entry), DirError> {
        match self.stat(name) {
            Ok(entry) if entry.kind != Entry::FILE => return Err(DirError::Unexpected { kind: entry.kind }),
            Ok(_) => {}
            Err(e) if e.is_not_found() && flags & libc::O_CREAT != 0 => {}
            Err(e) => return Err(e),
        }
        let fd =
            self.openat(name, flags | libc::O_NONBLOCK | libc::O_NOCTTY, 0o644).map_err(|e| self.refine(name, e))?;
        let file = File::from(fd);
        let meta = file.metadata()?;
        let entry = Entry { kind: kind_of(meta.mode()), dev: meta.dev(), ino: meta.ino() };
        if entry.kind != Entry::FILE {
            return Err(DirError::Unexpected { kind: entry.kind });
        }
        Ok((file, entry))
    }

    /// An open error caused by what the name is (a symlink swapped in, a socket) says so.
    fn refine(&self, name: &str, err: io::Error) -> DirError {
        match err.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::ENXIO) | Some(libc::EXDEV) => match self.stat(name) {
                Ok(entry) => DirError::Unexpected { kind: entry.kind },
                Err(_) => DirError::Io(err),
            },
            _ => DirError::Io(err),
        }
    }

    /// The names in this directory, without `.` and `..` (and names that are not UTF-8, which
    /// lockhook never writes).
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut dir = nix::dir::Dir::openat(
            Some(self.fd.as_raw_fd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry?;
            if let Ok(name) = entry.file_name().to_str() {
                if name != "." && name != ".." {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    /// Removes the name `name` if it still refers to the inode `dev`/`ino`: `Ok(false)` when it
    /// is gone or now refers to something else, which is left alone.
    ///
    /// The check and the `unlinkat` are two steps; callers make them safe by holding a lock that
    /// no one who could put another inode under this name can hold at the same time (see
    /// `Lockspace::owners`).
    pub fn unlink_if_same(&self, name: &str, dev: u64, ino: u64) -> io::Result<bool> {
        match self.stat(name) {
            Ok(entry) if entry.kind == Entry::FILE && entry.same_inode(dev, ino) => {}
            Ok(_) => return Ok(false),
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e.into_io()),
        }
        match nix::unistd::unlinkat(Some(self.fd.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(nix::Error::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a name this process just created (a temp file), without checks.
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        component(name)?;
        nix::unistd::unlinkat(Some(self.fd.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir).map_err(Into::into)
    }

    /// Removes the subdirectory `name` if it is empty (`rmdir` never removes anything else).
    pub fn remove_empty_dir(&self, name: &str) -> io::Result<()> {
        component(name)?;
        nix::unistd::unlinkat(Some(self.fd.as_raw_fd()), name, UnlinkatFlags::RemoveDir).map_err(Into::into)
    }

    /// `renameat(self/from, self/to)`.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        component(from)?;
        component(to)?;
        nix::fcntl::renameat(Some(self.fd.as_raw_fd()), from, Some(self.fd.as_raw_fd()), to).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn fifo(path: &Path) {
        nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    }

    #[test]
    fn root_that_is_a_symlink_or_a_file_is_refused() {
        let tmp = tempfile::tempdir().expect("dir");
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        symlink(&real, tmp.path().join("link")).expect("symlink");
        std::fs::write(tmp.path().join("file"), b"x").expect("write");
        Dir::open_root(&real).expect("a directory opens");
        for name in ["link", "file"] {
            let err = Dir::open_root(&tmp.path().join(name)).expect_err(name);
            assert!(matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)), "{name}: {err}");
        }
        assert_eq!(Dir::open_root(&tmp.path().join("missing")).expect_err("missing").kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn symlinks_fifos_and_sockets_are_unexpected_and_never_followed() {
        let tmp = tempfile::tempdir().expect("dir");
        let outside = tempfile::tempdir().expect("outside");
        let root = tmp.path().join("ls");
        std::fs::create_dir(&root).expect("mkdir");
        symlink(outside.path(), root.join("dirlink")).expect("symlink");
        symlink(outside.path().join("target"), root.join("dangling")).expect("symlink");
        fifo(&root.join("fifo"));
        let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).expect("bind");
        let dir = Dir::open_root(&root).expect("root");
        assert!(matches!(dir.open_dir("dirlink"), Err(DirError::Unexpected { kind: "symbolic link" })));
        assert!(matches!(dir.create_dir("dirlink"), Err(DirError::Unexpected { kind: "symbolic link" })));
        for flags in [libc::O_RDONLY, libc::O_RDWR | libc::O_CREAT] {
            assert!(matches!(dir.open_file("dangling", flags), Err(DirError::Unexpected { kind: "symbolic link" })));
            assert!(matches!(dir.open_file("fifo", flags), Err(DirError::Unexpected { kind: "FIFO" })));
            assert!(matches!(dir.open_file("sock", flags), Err(DirError::Unexpected { kind: "socket" })));
        }
        assert!(!outside.path().join("target").exists(), "a dangling symlink is not created through");
        assert!(dir.open_file("../x", libc::O_RDONLY | libc::O_CREAT).is_err());
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn openat_refuses_symlinks_whichever_syscall_is_used() {
        let tmp = tempfile::tempdir().expect("dir");
        let outside = tempfile::tempdir().expect("outside");
        symlink(outside.path().join("t"), tmp.path().join("l")).expect("symlink");
        let dir = Dir::open_root(tmp.path()).expect("root");
        let err = dir.openat("l", libc::O_RDWR | libc::O_CREAT, 0o600).expect_err("symlink");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert!(!outside.path().join("t").exists());
        dir.openat("new", libc::O_RDWR | libc::O_CREAT, 0o600).expect("plain create");
        // Where the kernel has no openat2 (ENOSYS), the fallback gives the same answers. (Both
        // are correct, so switching this process over does not harm other tests.)
        NO_OPENAT2.store(true, Ordering::Relaxed);
        let err = dir.openat("l", libc::O_RDWR | libc::O_CREAT, 0o600).expect_err("symlink, openat");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert!(!outside.path().join("t").exists());
        dir.openat("new2", libc::O_RDWR | libc::O_CREAT, 0o600).expect("plain create, openat");
    }

    #[test]
    fn unlink_if_same_leaves_a_replaced_name_alone() {
        let tmp = tempfile::tempdir().expect("dir");
        let dir = Dir::open_root(tmp.path()).expect("root");
        let (_old, old) = dir.open_file("r.json", libc::O_RDWR | libc::O_CREAT).expect("old");
        // Someone renames a new file over the name between our look and our unlink.
        let (_new, new) = dir.open_file(".tmp", libc::O_RDWR | libc::O_CREAT | libc::O_EXCL).expect("new");
        dir.rename(".tmp", "r.json").expect("rename");
        assert!(!dir.unlink_if_same("r.json", old.dev, old.ino).expect("check"), "not the inode we saw");
        assert!(tmp.path().join("r.json").exists());
        assert!(dir.unlink_if_same("r.json", new.dev, new.ino).expect("check"), "the inode we saw");
        assert!(!tmp.path().join("r.json").exists());
        assert!(!dir.unlink_if_same("r.json", new.dev, new.ino).expect("gone"));
    }

    #[test]
    fn names_lists_without_dots() {
        let tmp = tempfile::tempdir().expect("dir");
        std::fs::write(tmp.path().join("a"), b"").expect("write");
        std::fs::create_dir(tmp.path().join("b")).expect("mkdir");
        let mut names = Dir::open_root(tmp.path()).expect("root").names().expect("names");
        names.sort();
        assert_eq!(names, vec!["a".to_owned(), "b".to_owned()]);
    }
}
