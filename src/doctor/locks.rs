//! The `locks` check: OFD locks must work on every filesystem lockhook locks files on, which are
//! the lockspace, the run directory and the image directories (libvirt's default one and the
//! target of every `dir`, `fs` and `netfs` pool defined in `<libvirt_config_dir>/storage`).
//!
//! This is the one thing doctor writes: in each directory it creates a test file
//! (`O_EXCL|O_NOFOLLOW`, mode 0600, named `.lockhook-doctor.<pid>.<n>`), locks byte 0 exclusively
//! by name as the hook does, checks that a second open sees the lock as another guest's hook
//! would, and removes the file again. An image directory that is not writable here, or where the
//! test file cannot be created, is reported as untested (info); any other failure is an error.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::lock::{self, Create, LockError, LockMode};
use crate::storage::pool;

use super::filesystem::{fs_kind, fs_magic};
use super::{Finding, Layout, Severity, DEFAULT_IMAGES_DIR};

/// Why a test lock in a directory failed.
#[derive(Debug, thiserror::Error)]
enum LockTestError {
    #[error("cannot create a test file {path}")]
    CreateTestFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{path}: locked exclusively, but a second open sees {seen}")]
    NotSeen { path: PathBuf, seen: &'static str },
    #[error("{path}: replaced by another file while being tested")]
    Replaced { path: PathBuf },
}

/// A test file that is removed when dropped.
struct TestFile(PathBuf);

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Creates a fresh file in `dir`, locks byte 0 exclusively and checks that a second open sees
/// the lock: exactly what the hook and a probe from another guest's hook do.
fn try_ofd_lock(dir: &Path) -> Result<(), LockTestError> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".lockhook-doctor.{}.{n}", std::process::id()));
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .and_then(|f| f.metadata())
        .map_err(|source| LockTestError::CreateTestFile { path: path.clone(), source })?;
    let file = TestFile(path);
    // The lock functions open by name, as the hook does: make sure they reached our file.
    let ours = |id: lock::Identity| (id.dev, id.ino) == (created.dev(), created.ino());
    let held = lock::acquire(&file.0, LockMode::Exclusive, 0, Create::No)?;
    let (seen, probed) = lock::probe(&file.0, 0)?;
    let held_id = held.identity;
    drop(held);
    if !ours(held_id) || !ours(probed) {
        return Err(LockTestError::Replaced { path: file.0.clone() });
    }
    match seen {
        Some(LockMode::Exclusive) => Ok(()),
        Some(LockMode::Shared) => Err(LockTestError::NotSeen { path: file.0.clone(), seen: "a shared lock" }),
        None => Err(LockTestError::NotSeen { path: file.0.clone(), seen: "no lock" }),
    }
}

/// Image directories: libvirt's default one and every file-based pool's target.
fn image_dirs(layout: &Layout) -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(DEFAULT_IMAGES_DIR)];
    if let Ok(entries) = fs::read_dir(crate::libvirt::pool_definitions(&layout.libvirt_config_dir)) {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "xml"))
            .collect();
        files.sort();
        // Pool definitions are small; a huge file is not one.
        let read =
            |p: &Path| fs::metadata(p).ok().filter(|m| m.len() <= 1 << 20).and_then(|_| fs::read_to_string(p).ok());
        dirs.extend(files.iter().filter_map(|p| pool::target_dir(&read(p)?)));
    }
    dirs
}

/// Tests OFD locks in the lockspace, the run directory and every image directory, once per
/// directory.
pub(super) fn check(layout: &Layout, config: &Config, out: &mut Vec<Finding>) {
    const CHECK: &str = "locks";
    let mut seen = Vec::new();
    let mut targets: Vec<(&str, PathBuf)> =
        vec![("lockspace", config.lockspace_dir.clone()), ("run dir", config.run_dir.clone())];
    targets.extend(image_dirs(layout).into_iter().map(|d| ("images", d)));
    for (role, dir) in targets {
        if !dir.is_dir() {
            continue; // missing run/lockspace dirs are reported by their own checks
        }
        let canonical = fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
        if seen.contains(&canonical) {
            continue;
        }
        seen.push(canonical);
        let fs_name = fs_magic(&dir).map_or_else(|e| format!("unknown filesystem: {e}"), |m| fs_kind(m).0);
        let shown = format!("{} ({role}, {fs_name})", dir.display());
        let is_images = role == "images";
        if is_images && nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_err() {
            out.push(Finding::new(Severity::Info, CHECK, format!("{shown}: not writable here, OFD locks not tested")));
            continue;
        }
        match try_ofd_lock(&dir) {
            Ok(()) => out.push(Finding::new(Severity::Ok, CHECK, format!("{shown}: OFD locks work"))),
            Err(e @ LockTestError::CreateTestFile { .. }) if is_images => out.push(Finding::new(
                Severity::Info,
                CHECK,
                format!("{shown}: OFD locks not tested: {}", crate::error_chain(&e)),
            )),
            Err(e) => out.push(Finding::new(
                Severity::Error,
                CHECK,
                format!(
                    "{shown}: OFD locks do not work on this {fs_name} filesystem: {}: lockhook cannot lock files \
                     there; use a filesystem with fcntl locking (for NFS: mount without nolock/local_lock)",
                    crate::error_chain(&e)
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ofd_lock_test_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("dir");
        try_ofd_lock(dir.path()).expect("OFD locks work in a temp dir");
        assert_eq!(fs::read_dir(dir.path()).expect("read dir").count(), 0);
        let missing = dir.path().join("missing");
        assert!(matches!(try_ofd_lock(&missing), Err(LockTestError::CreateTestFile { .. })));
    }
}
