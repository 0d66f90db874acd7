//! The lockspace's identity: proof that `lockspace_dir` is the shared lockspace the fleet
//! initialised, not the empty directory beneath an unmounted mount point.
//!
//! When the shared filesystem behind `lockspace_dir` is not mounted, the path still names a
//! directory (the mount point), and locks and records taken there reach no other host: every
//! cross-host protection would be gone without a word. So a fleet initialises its lockspace once
//! (`lockhook lockspace init`), which writes `<lockspace_dir>/lockspace.id` holding a random
//! UUID, and every host's config names that UUID (`lockspace_id`). Every hook call that locks
//! checks the file: an empty mount point has none, another filesystem has another one. The file
//! is read without following symlinks, without blocking (`O_NONBLOCK`, regular files only) and
//! at most `MAX_ID_FILE` bytes: another host can write it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::domain::Uuid;

/// The identity file's name in the lockspace.
pub const ID_FILE: &str = "lockspace.id";
const MAX_ID_FILE: u64 = 256;
/// First word of the identity file, so a stray file of that name is not taken for one.
const MAGIC: &str = "lockhook-lockspace";

#[derive(Debug, thiserror::Error)]
pub enum IdError {
    #[error(
        "lockspace {dir} is not the shared lockspace {expected}: it has no {ID_FILE} (is the shared filesystem \
         mounted there?); mount it, or run `lockhook lockspace init` on it once per fleet"
    )]
    Missing { dir: PathBuf, expected: Uuid },
    #[error(
        "lockspace {dir} is lockspace {found}, not the shared lockspace {expected} named by lockspace_id: \
         another filesystem is mounted there, or lockspace_id is wrong"
    )]
    Mismatch { dir: PathBuf, expected: Uuid, found: Uuid },
    #[error("lockspace {dir}: {ID_FILE} is not a lockspace identity (a regular file \"{MAGIC} UUID\" is expected)")]
    Malformed { dir: PathBuf },
    #[error("lockspace {dir}: cannot read {ID_FILE}")]
    Read {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lockspace {dir} did not answer within {} s (is its filesystem hung?)", .secs)]
    Timeout { dir: PathBuf, secs: u64 },
    #[error("lockspace {dir}: cannot write {ID_FILE}")]
    Write {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn open_id(dir: &Path) -> io::Result<File> {
    // The directory itself is the configured path (root's config: symlinks allowed there); the
    // file below it is another host's input.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(dir.join(ID_FILE))
}

fn parse(text: &str) -> Option<Uuid> {
    let mut words = text.split_whitespace();
    (words.next()? == MAGIC).then_some(())?;
    Uuid::parse(words.next()?).ok()
}

/// The identity of the lockspace at `dir`, or `None` when it has none.
pub fn read(dir: &Path) -> Result<Option<Uuid>, IdError> {
    let file = match open_id(dir) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(IdError::Malformed { dir: dir.to_owned() }),
        Err(source) => return Err(IdError::Read { dir: dir.to_owned(), source }),
    };
    let meta = file.metadata().map_err(|source| IdError::Read { dir: dir.to_owned(), source })?;
    if !meta.is_file() {
        return Err(IdError::Malformed { dir: dir.to_owned() });
    }
    let mut text = String::new();
    file.take(MAX_ID_FILE).read_to_string(&mut text).map_err(|_| IdError::Malformed { dir: dir.to_owned() })?;
    parse(&text).map(Some).ok_or_else(|| IdError::Malformed { dir: dir.to_owned() })
}

/// Checks that the lockspace at `dir` is the one named `expected` (see the module doc).
pub fn verify(dir: &Path, expected: &Uuid) -> Result<(), IdError> {
    match read(dir)? {
        Some(found) if found == *expected => Ok(()),
        Some(found) => Err(IdError::Mismatch { dir: dir.to_owned(), expected: expected.clone(), found }),
        None => Err(IdError::Missing { dir: dir.to_owned(), expected: expected.clone() }),
    }
}

/// `verify` on a thread, waited for at most `bound`: a hung shared filesystem must not hang the
/// hook (the thread, stuck in the kernel, dies with the hook process).
pub fn verify_bounded(dir: &Path, expected: &Uuid, bound: std::time::Duration) -> Result<(), IdError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (dir_copy, id) = (dir.to_owned(), expected.clone());
    let spawned = std::thread::Builder::new().name("lockspace-id".into()).spawn(move || {
        let _ = tx.send(verify(&dir_copy, &id));
    });
    if let Err(source) = spawned {
        return Err(IdError::Read { dir: dir.to_owned(), source });
    }
    rx.recv_timeout(bound).unwrap_or(Err(IdError::Timeout { dir: dir.to_owned(), secs: bound.as_secs() }))
}

/// `lockhook lockspace init`: gives the lockspace at `dir` its identity, or returns the one it
/// has (`false`: it was initialised before; every host runs this and gets the same UUID).
pub fn init(dir: &Path) -> Result<(Uuid, bool), IdError> {
    if let Some(id) = read(dir)? {
        return Ok((id, false));
    }
    let id = Uuid::random().map_err(|source| IdError::Write { dir: dir.to_owned(), source })?;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(ID_FILE))
        .and_then(|mut f| {
            f.write_all(format!("{MAGIC} {id}\n").as_bytes())?;
            f.sync_all()
        });
    match created {
        Ok(()) => Ok((id, true)),
        // Another host initialised it at the same moment: theirs wins.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read(dir)?.map(|id| (id, false)).ok_or_else(|| IdError::Malformed { dir: dir.to_owned() })
        }
        Err(source) => Err(IdError::Write { dir: dir.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_once_then_verify() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(read(dir.path()).expect("read"), None);
        let (id, fresh) = init(dir.path()).expect("init");
        assert!(fresh);
        let (again, fresh) = init(dir.path()).expect("init again");
        assert_eq!((again.clone(), fresh), (id.clone(), false), "a second init keeps the identity");
        verify(dir.path(), &id).expect("verify");
        let other = Uuid::random().expect("uuid");
        assert!(matches!(verify(dir.path(), &other), Err(IdError::Mismatch { .. })));
        let empty = tempfile::tempdir().expect("dir");
        let err = verify(empty.path(), &id).expect_err("an empty mount point");
        assert!(matches!(err, IdError::Missing { .. }));
        assert!(err.to_string().contains("mounted"), "{err}");
    }

    #[test]
    fn planted_identity_files_are_not_trusted() {
        let id = Uuid::random().expect("uuid");
        let dir = tempfile::tempdir().expect("dir");
        let elsewhere = tempfile::tempdir().expect("dir");
        let real = elsewhere.path().join(ID_FILE);
        std::fs::write(&real, format!("{MAGIC} {id}\n")).expect("write");
        std::os::unix::fs::symlink(&real, dir.path().join(ID_FILE)).expect("symlink");
        assert!(matches!(verify(dir.path(), &id), Err(IdError::Malformed { .. })), "symlink");
        std::fs::remove_file(dir.path().join(ID_FILE)).expect("rm");
        nix::unistd::mkfifo(&dir.path().join(ID_FILE), nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("mkfifo");
        assert!(matches!(verify(dir.path(), &id), Err(IdError::Malformed { .. })), "a FIFO never blocks");
        std::fs::remove_file(dir.path().join(ID_FILE)).expect("rm");
        std::fs::write(dir.path().join(ID_FILE), "x".repeat(10_000)).expect("write");
        assert!(matches!(verify(dir.path(), &id), Err(IdError::Malformed { .. })), "garbage");
    }
}
