//! The `run_dir` and `lockspace` checks: the two directories lockhook keeps its own files in.
//!
//! The run directory holds the holder sockets and the guests' state, so it must be a directory
//! of mode 0700 owned by root; the first guest start creates it. The lockspace must be a real
//! directory: lockhook opens it `O_NOFOLLOW`, because on shared storage another host may plant a
//! symlink there, so a symlinked `lockspace_dir` is an error rather than followed.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Finding, Severity};

/// The run directory: holder sockets and guest state.
pub(super) fn check_run_dir(dir: &Path, out: &mut Vec<Finding>) {
    const CHECK: &str = "run_dir";
    let shown = dir.display();
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => out.push(Finding::new(
            Severity::Warn,
            CHECK,
            format!("{shown} does not exist: the first guest start creates it (or: install -d -m 0700 {shown})"),
        )),
        Err(e) => out.push(Finding::new(Severity::Error, CHECK, format!("{shown}: cannot stat: {e}"))),
        Ok(meta) if !meta.is_dir() => out.push(Finding::new(
            Severity::Error,
            CHECK,
            format!("{shown} is not a directory: remove it (the first guest start creates the directory)"),
        )),
        Ok(meta) if meta.uid() != 0 || meta.mode() & 0o7777 != 0o700 => out.push(Finding::new(
            Severity::Error,
            CHECK,
            format!(
                "{shown} is mode {:04o} owned by uid {}: holder sockets and state must be in a 0700 root directory: \
                 chown root:root {shown} && chmod 0700 {shown}",
                meta.mode() & 0o7777,
                meta.uid()
            ),
        )),
        Ok(_) => out.push(Finding::new(Severity::Ok, CHECK, format!("{shown} (0700 root)"))),
    }
}

/// The lockspace directory: owner records and the lock files of network disks and block devices
/// (see `crate::lockspace`).
pub(super) fn check_lockspace_dir(dir: &Path, out: &mut Vec<Finding>) {
    const CHECK: &str = "lockspace";
    let shown = dir.display();
    // Not followed: lockhook opens the lockspace O_NOFOLLOW (another host may plant a symlink).
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => out.push(Finding::new(
            Severity::Warn,
            CHECK,
            format!("{shown} does not exist: create it (install -d -m 0755 {shown}), on shared storage for a fleet"),
        )),
        Ok(meta) if meta.file_type().is_symlink() => out.push(Finding::new(
            Severity::Error,
            CHECK,
            format!("{shown} is a symlink, which lockhook never follows in the lockspace: set lockspace_dir to the real path"),
        )),
        Err(e) => out.push(Finding::new(Severity::Error, CHECK, format!("{shown}: cannot stat: {e}"))),
        Ok(meta) if !meta.is_dir() => out.push(Finding::new(
            Severity::Error,
            CHECK,
            format!("{shown} is not a directory: set lockspace_dir to a directory"),
        )),
        Ok(_) => out.push(Finding::new(Severity::Ok, CHECK, format!("{shown} exists"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlinked_or_missing_lockspace_is_reported() {
        let dir = tempfile::tempdir().expect("dir");
        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).expect("symlink");
        let severity = |p: &Path| {
            let mut out = Vec::new();
            check_lockspace_dir(p, &mut out);
            out[0].severity
        };
        assert_eq!(severity(dir.path()), Severity::Ok);
        assert_eq!(severity(&dir.path().join("link")), Severity::Error);
        assert_eq!(severity(&dir.path().join("missing")), Severity::Warn);
    }
}
