//! The `hook` check: libvirt runs lockhook only from `<libvirt_config_dir>/hooks/qemu` or an entry
//! of `hooks/qemu.d/`, and only when that entry leads (as a symlink or a hard link) to an
//! executable regular file. The entries that lead to this lockhook are returned with the time they
//! were installed, for the daemon check.
//!
//! An existing `hooks/qemu` that is not lockhook is an administrator's own hook: it is left alone
//! (`install.sh` then adds `qemu.d/50-lockhook`). Entries named like lockhook that lead elsewhere
//! are stale or foreign installs and reported.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Finding, Layout, Severity};

/// A hook entry that leads to this lockhook, with the time it was installed (the link's own
/// ctime/mtime, whichever is later, in milliseconds since the epoch).
#[derive(Debug)]
pub(super) struct InstalledHook {
    pub(super) path: PathBuf,
    pub(super) installed_ms: u64,
}

/// libvirt runs a hook only if it is a regular file (after symlinks) with an execute bit
/// (`virFileIsExecutable`).
fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `path` (or what its symlink names) is called like lockhook: then a link that leads
/// elsewhere is a stale or foreign lockhook install, not an administrator's own hook.
fn named_like_lockhook(path: &Path) -> bool {
    let has_name = |p: &Path| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("lockhook"));
    has_name(path) || fs::read_link(path).is_ok_and(|target| has_name(&target))
}

fn link_time_ms(path: &Path) -> u64 {
    fs::symlink_metadata(path).map_or(0, |m| {
        let ms = |secs: i64, nsec: i64| u64::try_from(secs.saturating_mul(1000) + nsec / 1_000_000).unwrap_or(0);
        ms(m.ctime(), m.ctime_nsec()).max(ms(m.mtime(), m.mtime_nsec()))
    })
}

/// Same file: same canonical path, or the same inode (a hard link).
fn same_file(a: &Path, canonical_binary: &Path, binary_id: Option<(u64, u64)>) -> Option<bool> {
    let canonical = fs::canonicalize(a).ok()?;
    let id = fs::metadata(&canonical).ok().map(|m| (m.dev(), m.ino()));
    Some(canonical == canonical_binary || (id.is_some() && id == binary_id))
}

/// Reports every hook entry that is, or looks meant to be, lockhook; returns the ones libvirt
/// runs.
pub(super) fn check(layout: &Layout, out: &mut Vec<Finding>) -> Vec<InstalledHook> {
    const CHECK: &str = "hook";
    let binary = match fs::canonicalize(&layout.binary) {
        Ok(binary) => binary,
        Err(e) => {
            out.push(Finding::new(
                Severity::Error,
                CHECK,
                format!("cannot resolve the lockhook binary {}: {e}", layout.binary.display()),
            ));
            return Vec::new();
        }
    };
    let binary_id = fs::metadata(&binary).ok().map(|m| (m.dev(), m.ino()));
    let main = layout.hooks_dir().join("qemu");
    let qemu_d = layout.hooks_dir().join("qemu.d");
    let mut candidates = vec![main.clone()];
    if let Ok(dir) = fs::read_dir(&qemu_d) {
        let mut entries: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        entries.sort();
        candidates.extend(entries);
    }

    let mut ours = Vec::new();
    let mut reported = false;
    let mut foreign_main = false;
    for path in candidates {
        if fs::symlink_metadata(&path).is_err() {
            continue;
        }
        let shown = match fs::read_link(&path) {
            Ok(target) => format!("{} -> {}", path.display(), target.display()),
            Err(_) => path.display().to_string(),
        };
        match same_file(&path, &binary, binary_id) {
            Some(true) if is_executable(&path) => {
                out.push(Finding::new(Severity::Ok, CHECK, format!("{} -> {}", path.display(), binary.display())));
                ours.push(InstalledHook { installed_ms: link_time_ms(&path), path });
            }
            Some(true) => {
                reported = true;
                out.push(Finding::new(
                    Severity::Error,
                    CHECK,
                    format!(
                        "{shown} leads to lockhook but is not executable, so libvirt skips it: chmod 0755 {}",
                        binary.display()
                    ),
                ));
            }
            None if path == main || named_like_lockhook(&path) => {
                reported = true;
                out.push(Finding::new(
                    Severity::Error,
                    CHECK,
                    format!("{shown} is a dangling symlink, so libvirt runs no lockhook through it: run ./install.sh"),
                ));
            }
            Some(false) if named_like_lockhook(&path) => {
                reported = true;
                out.push(Finding::new(
                    Severity::Error,
                    CHECK,
                    format!(
                        "{shown} points elsewhere, not to this lockhook ({}): run ./install.sh (or run doctor \
                         with the lockhook the hook points to)",
                        binary.display()
                    ),
                ));
            }
            // An administrator's own hook (or one of several in qemu.d): not ours to judge.
            _ => foreign_main |= path == main,
        }
    }
    if ours.is_empty() && !reported {
        let mut message = "lockhook is not installed as a qemu hook: run ./install.sh".to_owned();
        if foreign_main {
            message.push_str(&format!(
                " (it keeps the existing {} and adds {})",
                main.display(),
                qemu_d.join("50-lockhook").display()
            ));
        }
        out.push(Finding::new(Severity::Error, CHECK, message));
    }
    if ours.len() > 1 {
        let paths = ours.iter().map(|h| h.path.display().to_string()).collect::<Vec<_>>().join(" and ");
        out.push(Finding::new(
            Severity::Warn,
            CHECK,
            format!("lockhook is installed twice ({paths}): libvirt runs it twice for every event; remove one"),
        ));
    }
    ours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_checks_link_target_and_execute_bit() {
        let dir = tempfile::tempdir().expect("dir");
        let binary = dir.path().join("lockhook");
        fs::write(&binary, b"#!/bin/sh\n").expect("write");
        fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).expect("chmod");
        let etc = dir.path().join("etc");
        fs::create_dir_all(etc.join("hooks/qemu.d")).expect("mkdir");
        let layout = Layout { config_path: dir.path().join("c.toml"), libvirt_config_dir: etc.clone(), binary };

        let mut out = Vec::new();
        assert!(check(&layout, &mut out).is_empty());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].severity, Severity::Error);
        assert!(out[0].message.contains("not installed as a qemu hook: run ./install.sh"), "{out:?}");

        // An administrator's own hook stays; lockhook in qemu.d.
        fs::write(etc.join("hooks/qemu"), b"#!/bin/sh\n").expect("write");
        std::os::unix::fs::symlink(&layout.binary, etc.join("hooks/qemu.d/50-lockhook")).expect("symlink");
        let mut out = Vec::new();
        assert_eq!(check(&layout, &mut out).len(), 1);
        assert_eq!(out.iter().map(|f| f.severity).collect::<Vec<_>>(), vec![Severity::Ok], "{out:?}");

        // A stale link named like lockhook, and a non-executable binary.
        std::os::unix::fs::symlink("/nonexistent/lockhook", etc.join("hooks/qemu.d/40-lockhook")).expect("symlink");
        fs::set_permissions(&layout.binary, fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut out = Vec::new();
        assert!(check(&layout, &mut out).is_empty());
        assert!(out.iter().all(|f| f.severity == Severity::Error), "{out:?}");
        assert!(out.iter().any(|f| f.message.contains("dangling")), "{out:?}");
        assert!(out.iter().any(|f| f.message.contains("not executable")), "{out:?}");
    }
}
