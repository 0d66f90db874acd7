//! Keeping a running guest's locks in step with its live definition.
//!
//! libvirt runs no hook for `virsh attach-disk`/`detach-disk`, `change-media`, block-copy pivots
//! or external snapshots, but it rewrites the guest's status file
//! (`<libvirt_run_dir>/qemu/<name>.xml`, atomically) after each. The holder re-reads that file when
//! it changes and brings its locks in line: new images are locked, images no longer used are let
//! go, and an image whose role changed (a snapshot turns the old top image into a backing image)
//! changes mode. A new image someone else holds cannot be refused after the fact; it becomes a
//! `Conflict`, retried on every tick, and the configured policy applies.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::config::Config;
use crate::domain::Domain;
use crate::lock::{self, Create, Identity, LockError, LockMode};
use crate::lockspace::{LockFileKind, Lockspace, Wait};
use crate::paths::Paths;
use crate::resource::Role;
use crate::state::{Conflict, Resource};

/// libvirt's status file of one guest, and what it looked like when last read.
pub struct StatusFile {
    path: PathBuf,
    seen: Option<(u64, u64, i64, i64, u64)>,
}

impl StatusFile {
    pub fn new(libvirt_run_dir: &Path, name: &str) -> StatusFile {
        StatusFile { path: libvirt_run_dir.join("qemu").join(format!("{name}.xml")), seen: None }
    }

    /// The live domain, when the file changed since the last call (and parses).
    pub fn changed(&mut self) -> Option<Domain> {
        let meta = std::fs::metadata(&self.path).ok()?;
        let now = (meta.dev(), meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.size());
        if self.seen == Some(now) {
            return None;
        }
        self.seen = Some(now);
        match std::fs::read(&self.path).map(|b| Domain::parse_status(&b)) {
            Ok(Ok(domain)) => Some(domain),
            Ok(Err(e)) => {
                warn!("{}: {}", self.path.display(), crate::error_chain(&e));
                None
            }
            Err(_) => None,
        }
    }
}

/// What one sync changed.
#[derive(Debug, Default)]
pub struct Change {
    pub added: usize,
    pub removed: usize,
    pub changed_mode: usize,
    /// Every resource the guest wants and cannot have, as of now.
    pub conflicts: Vec<Conflict>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added == 0 && self.removed == 0 && self.changed_mode == 0
    }
}

struct Wanted {
    path: PathBuf,
    key: Option<String>,
    label: Option<String>,
    mode: LockMode,
    roles: Vec<Role>,
    is_lease: bool,
    lock_file: Option<LockFileKind>,
}

/// The resources `domain` wants, by identity. Images that do not exist are left out.
fn wanted(domain: &Domain, config: &Config) -> Option<(Vec<Identity>, HashMap<Identity, Wanted>)> {
    let mut plan = crate::resource::plan(domain, config);
    let requests = match crate::storage::resolve(&mut plan, config) {
        Ok(requests) => requests,
        Err(e) => {
            warn!("guest {} ({}): live definition: {}", domain.name, domain.uuid, crate::error_chain(&e));
            return None;
        }
    };
    let lockspace = Lockspace::new(&config.lockspace_dir);
    let mut order = Vec::new();
    let mut wanted: HashMap<Identity, Wanted> = HashMap::new();
    for r in requests {
        let Ok(Some((dev, ino))) = r.inode(&lockspace) else { continue };
        let id = Identity { dev, ino, offset: r.offset };
        match wanted.get_mut(&id) {
            Some(w) => {
                w.mode = w.mode.max(r.mode);
                if !w.roles.contains(&r.role) {
                    w.roles.push(r.role);
                }
            }
            None => {
                order.push(id);
                wanted.insert(
                    id,
                    Wanted {
                        path: r.path,
                        key: r.key,
                        label: r.label,
                        mode: r.mode,
                        roles: vec![r.role],
                        is_lease: r.is_lease,
                        lock_file: r.lock_file,
                    },
                );
            }
        }
    }
    Some((order, wanted))
}

/// Changes the mode of a lock held through `fd` (opened read-write when it was exclusive).
/// Downgrading exclusive → shared is atomic on the same open file; upgrading needs a read-write
/// open, so the old lock is dropped and the new one taken, and on failure the shared lock is
/// taken back.
fn change_mode(lockspace: &Lockspace, res: &mut Resource, fd: &mut OwnedFd, to: LockMode) -> Result<(), LockError> {
    if to == LockMode::Shared {
        let file =
            std::fs::File::from(fd.try_clone().map_err(|source| LockError::Lock { path: res.path.clone(), source })?);
        lock::try_lock_fd(&file, LockMode::Shared, res.identity.offset)
            .map_err(|source| LockError::Lock { path: res.path.clone(), source })?;
        res.mode = LockMode::Shared;
        return Ok(());
    }
    let take = |mode| match res.lock_file {
        Some(kind) => lockspace.acquire(kind, &res.key, mode, res.identity.offset, Wait::No),
        None => lock::acquire(&res.path, mode, res.identity.offset, Create::No),
    };
    let old = std::mem::replace(fd, placeholder()?);
    drop(old);
    match take(LockMode::Exclusive) {
        Ok(held) => {
            *fd = held.fd;
            res.mode = LockMode::Exclusive;
            Ok(())
        }
        Err(e) => {
            if let Ok(back) = take(LockMode::Shared) {
                *fd = back.fd;
            }
            Err(e)
        }
    }
}

/// A harmless fd to stand in while a lock is being replaced.
fn placeholder() -> Result<OwnedFd, LockError> {
    std::fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|source| LockError::Open { path: "/dev/null".into(), source })
}

/// Brings `held` in line with `domain`. Returns what changed and the current conflicts.
/// Resources in `pending` (a migration hand-over in progress) are neither taken nor reported.
pub fn sync(
    held: &mut Vec<(Resource, OwnedFd)>,
    pending: &[Identity],
    domain: &Domain,
    config: &Config,
    paths: &Paths,
) -> Change {
    let mut change = Change::default();
    let Some((order, mut wanted)) = wanted(domain, config) else { return change };
    wanted.retain(|id, _| !pending.contains(id));
    let guest = format!("{} ({})", domain.name, domain.uuid);
    let lockspace = Lockspace::new(&config.lockspace_dir);
    held.retain(|(res, _)| {
        let keep = wanted.contains_key(&res.identity);
        if !keep {
            info!("guest {guest}: {} is no longer used; released", res.path.display());
            change.removed += 1;
        }
        keep
    });
    for (res, fd) in held.iter_mut() {
        let Some(w) = wanted.remove(&res.identity) else { continue };
        res.roles = w.roles;
        if w.mode != res.mode {
            match change_mode(&lockspace, res, fd, w.mode) {
                Ok(()) => {
                    info!("guest {guest}: {} is now locked {}", res.path.display(), res.mode.as_str());
                    change.changed_mode += 1;
                }
                Err(e) => warn!("guest {guest}: {}", crate::error_chain(&e)),
            }
        }
    }
    for id in order {
        let Some(w) = wanted.remove(&id) else { continue };
        let taken = match (w.lock_file, &w.key) {
            (Some(kind), Some(key)) => lockspace.acquire(kind, key, w.mode, id.offset, Wait::No),
            _ => lock::acquire(&w.path, w.mode, id.offset, if w.is_lease { Create::IfMissing } else { Create::No }),
        };
        match taken {
            Ok(lock) => {
                info!("guest {guest}: hot-plugged {} locked {}", w.path.display(), w.mode.as_str());
                let key = w.key.unwrap_or_else(|| crate::lockspace::file_key(&w.path, id.offset));
                let res = Resource {
                    key,
                    label: w.label,
                    lock_file: w.lock_file,
                    path: w.path,
                    mode: lock.mode,
                    roles: w.roles,
                    identity: lock.identity,
                    since: crate::clock::now(),
                };
                held.push((res, lock.fd));
                change.added += 1;
            }
            Err(LockError::AlreadyLocked { path, identity }) => change.conflicts.push(Conflict {
                held_by: crate::owner::find(
                    paths,
                    &lockspace,
                    &identity,
                    &w.key.unwrap_or_else(|| crate::lockspace::file_key(&path, id.offset)),
                )
                .phrase(),
                path,
                mode: w.mode,
                since: crate::clock::now(),
            }),
            Err(e) => warn!("guest {guest}: hot-plugged {}: {}", w.path.display(), crate::error_chain(&e)),
        }
    }
    change
}
