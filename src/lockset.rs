//! Takes every lock a guest needs, or none: the hook's all-or-nothing step.
//!
//! Requests are grouped by what they really lock (inode + byte), so one image listed twice, or
//! as a disk and as a backing image, is one lock in the strongest mode asked for. Every request is
//! tried even after a refusal, so the user sees every conflict at once, one line each.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::config::{Config, MissingPolicy};
use crate::lock::{self, HeldLock, Identity, LockError, LockMode};
use crate::lockspace::Lockspace;
use crate::paths::Paths;
use crate::state::Resource;
use crate::target::{Creation, Groups, LockTarget, Role};

/// Locks taken, with the record of each (same order).
#[derive(Debug, Default)]
pub struct Acquired {
    pub locks: Vec<HeldLock>,
    pub resources: Vec<Resource>,
}

impl Acquired {
    /// Gives up a refused start's locks, removing the lease files this call created (see
    /// `lock::remove_created`) so a refused start leaves nothing behind. Files the lockspace
    /// holds (lock files of network and block disks) are shared keys and stay. Returns the
    /// paths removed.
    pub fn discard(self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for (held, resource) in self.locks.into_iter().zip(&self.resources) {
            if !(held.created && resource.create == Some(Creation::Lease)) {
                continue;
            }
            match lock::remove_created(&resource.path, held) {
                Ok(true) => removed.push(resource.path.clone()),
                Ok(false) => {}
                Err(e) => log::warn!(
                    "{}: cannot remove the lease file created for a refused start: {e}",
                    resource.path.display()
                ),
            }
        }
        removed
    }
}

/// Why the guest may not start: one line per resource (without the `lockhook: ` prefix).
#[derive(Debug, thiserror::Error)]
#[error("{}", lines.join("; "))]
pub struct Refusal {
    pub lines: Vec<String>,
}

/// A lock someone else holds, with what is needed to ask who (and whether to wait for it).
#[derive(Debug, Clone)]
pub struct Busy {
    /// The request (merged over duplicates), with the roles it was asked for.
    pub request: LockTarget,
    pub roles: Vec<Role>,
    pub identity: Identity,
    /// The resource's lockspace key.
    pub key: String,
    /// The refusal line naming the holder.
    pub line: String,
}

/// Locks that could not be taken: held by someone else (`busy`), or failing for another reason
/// (`errors`, one line each).
#[derive(Debug, Default)]
pub struct Failures {
    pub busy: Vec<Busy>,
    pub errors: Vec<String>,
}

impl Failures {
    pub fn is_empty(&self) -> bool {
        self.busy.is_empty() && self.errors.is_empty()
    }

    pub fn lines(&self) -> Vec<String> {
        self.errors.iter().cloned().chain(self.busy.iter().map(|b| b.line.clone())).collect()
    }
}

#[derive(Debug, PartialEq, Eq, Hash, Clone)]
enum Key {
    Inode(u64, u64, u64),
    /// Not there yet (a lease file to create): the path string is all we have.
    Missing(PathBuf, u64),
}

/// Takes the locks for `requests`, skipping identities in `held` (already held by this guest's
/// holder): all of them, or none. `notes` receives one line per request skipped by policy.
pub fn acquire_all(
    requests: &[LockTarget],
    held: &HashSet<Identity>,
    config: &Config,
    paths: &Paths,
    notes: &mut Vec<String>,
) -> Result<Acquired, Refusal> {
    let (acquired, failures) = acquire_available(requests, held, config, paths, notes);
    let lines = failures.lines();
    if lines.is_empty() {
        Ok(acquired)
    } else {
        // Invariant: discarding `acquired` closes every fd taken, so a refusal leaves no lock
        // (and no lease file it created) behind.
        acquired.discard();
        Err(Refusal { lines })
    }
}

/// Takes every lock of `requests` that is free, for a guest that already runs (re-adoption):
/// returns what it took and one line per resource it could not take.
pub fn acquire_available(
    requests: &[LockTarget],
    held: &HashSet<Identity>,
    config: &Config,
    paths: &Paths,
    notes: &mut Vec<String>,
) -> (Acquired, Failures) {
    let mut failures = Failures::default();
    let mut groups: Groups<Key> = Groups::default();
    let lockspace = Lockspace::new(&config.lockspace_dir);
    for request in requests {
        let key = match request.inode(&lockspace) {
            Ok(Some((dev, ino))) => Key::Inode(dev, ino, request.offset),
            Ok(None) if request.create != Creation::Never => Key::Missing(request.path.clone(), request.offset),
            Ok(None) if request.optional || config.on_missing == MissingPolicy::Skip => {
                notes.push(format!("{} ({}): does not exist; not locked", request.path.display(), request.role));
                continue;
            }
            Ok(None) => {
                failures.errors.push(format!(
                    "{} ({}): {}",
                    request.path.display(),
                    request.role,
                    std::io::Error::from_raw_os_error(libc::ENOENT)
                ));
                continue;
            }
            Err(e) => {
                failures.errors.push(format!("{} ({}): {e}", request.path.display(), request.role));
                continue;
            }
        };
        if let Key::Inode(dev, ino, offset) = key {
            if held.contains(&Identity { dev, ino, offset }) {
                continue;
            }
        }
        groups.add(key, request.clone());
    }
    let mut acquired = Acquired::default();
    for (key, request, roles) in groups.into_ordered() {
        // A shared lock another guest of this host holds is shared with it, not taken again.
        let borrowed = match key {
            Key::Inode(dev, ino, offset) if request.mode == LockMode::Shared && request.create != Creation::Lease => {
                crate::shares::borrow(paths, &Identity { dev, ino, offset })
            }
            _ => None,
        };
        match borrowed.map_or_else(|| request.take(&lockspace), Ok) {
            Ok(held) => {
                acquired.resources.push(Resource::new(&request, roles, held.mode, held.identity));
                acquired.locks.push(held);
            }
            Err(LockError::AlreadyLocked { path, identity }) => {
                let key = request.key.clone().unwrap_or_else(|| crate::lockspace::file_key(&path, request.offset));
                let mut name = request.label.clone().unwrap_or_else(|| path.display().to_string());
                let ours = roles.iter().find(|r| r.worth_saying()).map(ToString::to_string);
                if let Some(role) = &ours {
                    name = format!("{name} ({role})");
                }
                let mut owner = crate::owner::find(paths, &lockspace, &identity, &key);
                if let crate::owner::Owner::Guest { role, .. } = &mut owner {
                    // The same role on both sides goes without saying twice.
                    if *role == ours {
                        *role = None;
                    }
                }
                let line = format!("{name} {}", owner.phrase());
                failures.busy.push(Busy { request, roles, identity, key, line });
            }
            Err(e @ LockError::Open { .. }) if roles.iter().all(Role::best_effort) => {
                notes.push(format!("{} ({}); not locked", crate::error_chain(&e), request.role))
            }
            Err(e) => failures.errors.push(format!("{} ({})", crate::error_chain(&e), request.role)),
        }
    }
    (acquired, failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::Create;

    fn req(path: &std::path::Path, mode: LockMode) -> LockTarget {
        LockTarget {
            path: path.to_owned(),
            mode,
            offset: 0,
            role: Role::Disk { target: Some("vda".into()) },
            create: Creation::Never,
            optional: false,
            key: None,
            label: None,
            lock_file: None,
        }
    }

    #[test]
    fn all_or_nothing_and_dedup() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").expect("write");
        std::fs::write(&b, b"b").expect("write");
        std::os::unix::fs::symlink(&a, dir.path().join("a-link")).expect("symlink");
        let cfg = Config::default();
        let mut notes = vec![];
        // Same image as readonly and writable: one exclusive lock.
        let got = acquire_all(
            &[req(&a, LockMode::Shared), req(&dir.path().join("a-link"), LockMode::Exclusive)],
            &HashSet::new(),
            &cfg,
            &paths,
            &mut notes,
        )
        .expect("lock");
        assert_eq!(got.locks.len(), 1);
        assert_eq!(got.locks[0].mode, LockMode::Exclusive);
        // b is free but a is not: nothing may stay locked.
        let refusal = acquire_all(
            &[req(&b, LockMode::Exclusive), req(&a, LockMode::Exclusive)],
            &HashSet::new(),
            &cfg,
            &paths,
            &mut notes,
        )
        .expect_err("a is held");
        assert_eq!(refusal.lines.len(), 1);
        assert!(refusal.lines[0].starts_with(&format!("{} is locked", a.display())), "{:?}", refusal.lines);
        assert_eq!(lock::probe(&b, 0).expect("probe").0, None);
        // Already held by our own holder: skipped, not refused.
        let held: HashSet<Identity> = got.locks.iter().map(|l| l.identity).collect();
        let again = acquire_all(&[req(&a, LockMode::Exclusive)], &held, &cfg, &paths, &mut notes).expect("skip held");
        assert!(again.locks.is_empty());
    }

    #[test]
    fn missing_images_follow_policy() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        let missing = dir.path().join("missing.img");
        let mut notes = vec![];
        let refusal =
            acquire_all(&[req(&missing, LockMode::Exclusive)], &HashSet::new(), &Config::default(), &paths, &mut notes)
                .expect_err("fail policy");
        assert!(refusal.lines[0].contains("missing.img"), "{:?}", refusal.lines);
        let skip = Config { on_missing: MissingPolicy::Skip, ..Config::default() };
        let got = acquire_all(&[req(&missing, LockMode::Exclusive)], &HashSet::new(), &skip, &paths, &mut notes)
            .expect("skip policy");
        assert!(got.locks.is_empty());
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn lockspace_lock_files_are_taken_through_the_lockspace() {
        use crate::lockspace::LockFileKind;
        let dir = tempfile::tempdir().expect("dir");
        let outside = tempfile::tempdir().expect("outside");
        let paths = Paths::new(dir.path());
        let cfg = Config { lockspace_dir: dir.path().join("ls"), ..Config::default() };
        std::fs::create_dir_all(cfg.lockspace_dir.join("network")).expect("mkdir");
        let ls = Lockspace::new(&cfg.lockspace_dir);
        let net = |key: &str| LockTarget {
            key: Some(key.to_owned()),
            label: Some(key.to_owned()),
            create: Creation::LockFile,
            lock_file: Some(LockFileKind::Network),
            ..req(&ls.lock_file(LockFileKind::Network, key), LockMode::Exclusive)
        };
        let target = outside.path().join("t");
        std::os::unix::fs::symlink(&target, ls.lock_file(LockFileKind::Network, "net:planted")).expect("symlink");
        let mut notes = vec![];
        let refusal = acquire_all(&[net("net:planted")], &HashSet::new(), &cfg, &paths, &mut notes).expect_err("link");
        assert!(refusal.lines[0].contains("symbolic link"), "{:?}", refusal.lines);
        assert!(!target.exists());
        let got = acquire_all(&[net("net:ok")], &HashSet::new(), &cfg, &paths, &mut notes).expect("lock");
        assert_eq!(got.resources[0].lock_file, Some(LockFileKind::Network));
        // Held by this guest already: recognised by inode, not taken twice.
        let held: HashSet<Identity> = got.locks.iter().map(|l| l.identity).collect();
        let again = acquire_all(&[net("net:ok")], &held, &cfg, &paths, &mut notes).expect("skip held");
        assert!(again.locks.is_empty());
    }

    #[test]
    fn a_refusal_removes_the_lease_files_it_created_and_only_those() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        let busy = dir.path().join("busy.img");
        std::fs::write(&busy, b"x").expect("write");
        let _other_guest = lock::acquire(&busy, LockMode::Exclusive, 0, Create::No).expect("lock");
        let lease = |name: &str| LockTarget {
            offset: 1024,
            role: Role::Lease { key: name.into(), lockspace: None },
            create: Creation::Lease,
            ..req(&dir.path().join(name), LockMode::Exclusive)
        };
        std::fs::write(dir.path().join("old.lease"), b"").expect("write");
        let refusal = acquire_all(
            &[lease("new.lease"), lease("old.lease"), req(&busy, LockMode::Exclusive)],
            &HashSet::new(),
            &Config::default(),
            &paths,
            &mut vec![],
        )
        .expect_err("busy image");
        assert_eq!(refusal.lines.len(), 1, "{:?}", refusal.lines);
        assert!(!dir.path().join("new.lease").exists(), "created for the refused start: removed");
        assert!(dir.path().join("old.lease").exists(), "there before: kept");
    }
}
