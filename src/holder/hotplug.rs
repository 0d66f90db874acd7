//! Keeping a running guest's locks in step with its live definition.
//!
//! libvirt runs no hook for `virsh attach-disk`/`detach-disk`, `change-media`, block-copy pivots
//! or external snapshots, but it rewrites the guest's status file
//! (`<libvirt_run_dir>/qemu/<name>.xml`, atomically) after each. The holder re-reads that file when
//! it changes and brings its locks in line: new images are locked, images no longer used are let
//! go, and an image whose role changed (a snapshot turns the old top image into a backing image)
//! changes mode. A new image someone else holds cannot be refused after the fact; it becomes a
//! `Conflict`, retried on every tick, and the configured policy applies.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use log::{info, warn};

use crate::config::Config;
use crate::domain::Domain;
use crate::lock::{self, Create, HeldLock, Identity, LockError, LockMode};
use crate::lockspace::{Lockspace, Wait};
use crate::paths::Paths;
use crate::state::{Conflict, Resource};
use crate::target::{Creation, Groups, LockTarget, Role};

/// libvirt's status file of one guest, and what it looked like when last read.
pub struct StatusFile {
    /// `None` for a name that is no file name: such a guest has no status file to follow.
    path: Option<PathBuf>,
    seen: Option<(u64, u64, i64, i64, u64)>,
}

impl StatusFile {
    pub fn new(libvirt_run_dir: &Path, name: &str) -> StatusFile {
        StatusFile { path: crate::libvirt::status_xml(libvirt_run_dir, name), seen: None }
    }

    /// The live domain, when the file changed since the last call (and parses).
    pub fn changed(&mut self) -> Option<Domain> {
        let path = self.path.as_ref()?;
        let meta = std::fs::metadata(path).ok()?;
        let now = (meta.dev(), meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.size());
        if self.seen == Some(now) {
            return None;
        }
        self.seen = Some(now);
        match std::fs::read(path).map(|b| Domain::parse_status(&b)) {
            Ok(Ok(domain)) => Some(domain),
            Ok(Err(e)) => {
                warn!("{}: {}", path.display(), crate::error_chain(&e));
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
    /// The target, in the strongest mode asked for.
    target: LockTarget,
    roles: Vec<Role>,
    /// A lease file or lockspace lock file that did not exist yet, created and locked while
    /// looking (as a start creates them): the lock, or why it could not be taken.
    taken: Option<Result<HeldLock, LockError>>,
}

/// What the live definition asks for.
struct Wants {
    /// Identities in the definition's order.
    order: Vec<Identity>,
    by_id: HashMap<Identity, Wanted>,
    /// Every path the definition names, found or not: a held lock on one of them is kept even
    /// when its file cannot be looked at right now (a transient error never drops a lock).
    listed: HashSet<PathBuf>,
}

/// The resources `domain` wants, by identity, resolved exactly as a start resolves them. Lease
/// files and lockspace lock files that do not exist yet are created and locked, as a start
/// does; images that do not exist are left out. `None` when the definition cannot be resolved,
/// or a file cannot be looked at: then nothing changes this round.
fn wanted(domain: &Domain, config: &Config) -> Option<Wants> {
    let mut plan = crate::resource::plan(domain, config);
    let requests = match crate::storage::resolve(&mut plan, config) {
        Ok(requests) => requests,
        Err(e) => {
            warn!("guest {} ({}): live definition: {}", domain.name, domain.uuid, crate::error_chain(&e));
            return None;
        }
    };
    for line in &plan.unlocked {
        warn!("guest {} ({}): live definition: {line}", domain.name, domain.uuid);
    }
    let lockspace = Lockspace::new(&config.lockspace_dir);
    let mut groups: Groups<Identity> = Groups::default();
    let mut taken_while_looking = HashMap::new();
    let mut listed = HashSet::new();
    for r in requests {
        listed.insert(r.path.clone());
        let (id, taken) = match r.inode(&lockspace) {
            Ok(Some((dev, ino))) => (Identity { dev, ino, offset: r.offset }, None),
            Ok(None) if r.create != Creation::Never => {
                let taken = r.take(&lockspace);
                let id = match &taken {
                    Ok(held) => held.identity,
                    Err(LockError::AlreadyLocked { identity, .. }) => *identity,
                    Err(e) => {
                        warn!(
                            "guest {} ({}): {}: {}",
                            domain.name,
                            domain.uuid,
                            r.path.display(),
                            crate::error_chain(e)
                        );
                        continue;
                    }
                };
                (id, Some(taken))
            }
            Ok(None) => continue,
            Err(e) => {
                warn!(
                    "guest {} ({}): cannot look at {}: {e}; its locks stay as they are until it can be",
                    domain.name,
                    domain.uuid,
                    r.path.display()
                );
                return None;
            }
        };
        if groups.add(id, r) {
            if let Some(taken) = taken {
                taken_while_looking.insert(id, taken);
            }
        }
    }
    let mut wants = Wants { order: Vec::new(), by_id: HashMap::new(), listed };
    for (id, target, roles) in groups.into_ordered() {
        wants.order.push(id);
        wants.by_id.insert(id, Wanted { target, roles, taken: taken_while_looking.remove(&id) });
    }
    Some(wants)
}

/// Changes the mode of a lock held through `fd`, never leaving the resource unlocked.
/// Downgrading exclusive → shared converts the lock on the same open file. Upgrading needs a
/// read-write open: the file is opened read-write and locked shared beside the lock we hold
/// (shared locks do not conflict), the old open is closed (the new one still holds the shared
/// lock), and the lock is converted in place; a refused conversion leaves it shared, and it is
/// tried again on the next tick.
fn change_mode(lockspace: &Lockspace, res: &mut Resource, fd: &mut OwnedFd, to: LockMode) -> Result<(), LockError> {
    if to == LockMode::Shared {
        let file =
            std::fs::File::from(fd.try_clone().map_err(|source| LockError::Lock { path: res.path.clone(), source })?);
        lock::try_lock_fd(&file, LockMode::Shared, res.identity.offset)
            .map_err(|source| LockError::Lock { path: res.path.clone(), source })?;
        res.mode = LockMode::Shared;
        return Ok(());
    }
    if !lock::is_writable(fd.as_fd()) {
        let offset = res.identity.offset;
        let rw = match res.lock_file {
            Some(kind) => lockspace.acquire_as(kind, &res.key, LockMode::Exclusive, LockMode::Shared, offset, Wait::No),
            None => lock::acquire_as(&res.path, LockMode::Exclusive, LockMode::Shared, offset, Create::No),
        }?;
        if rw.identity != res.identity {
            // Another file under that name now: ours stays as it is (dropping `rw` unlocks it).
            return Err(LockError::Replaced { path: res.path.clone() });
        }
        // Invariant: the new open holds a shared lock before the old one is closed.
        *fd = rw.fd;
    }
    lock::upgrade_fd(fd.as_fd(), res.identity.offset).map_err(|source| {
        if source.kind() == std::io::ErrorKind::WouldBlock {
            LockError::AlreadyLocked { path: res.path.clone(), identity: res.identity }
        } else {
            LockError::Lock { path: res.path.clone(), source }
        }
    })?;
    res.mode = LockMode::Exclusive;
    Ok(())
}

/// Brings `held` in line with `domain`. Returns what changed and the current conflicts: every
/// resource the guest wants and cannot have, and every mode change that was refused.
/// Resources in `pending` (a migration hand-over in progress) are neither taken nor reported.
pub fn sync(
    held: &mut Vec<(Resource, OwnedFd)>,
    pending: &[Identity],
    domain: &Domain,
    config: &Config,
    paths: &Paths,
) -> Change {
    let mut change = Change::default();
    let Some(Wants { order, by_id: mut wanted, listed }) = wanted(domain, config) else { return change };
    wanted.retain(|id, _| !pending.contains(id));
    let guest = format!("{} ({})", domain.name, domain.uuid);
    let lockspace = Lockspace::new(&config.lockspace_dir);
    let conflict = |path: PathBuf, mode: LockMode, key: Option<&str>, err: &LockError| Conflict {
        held_by: match err {
            LockError::AlreadyLocked { path, identity } => crate::owner::find(
                paths,
                &lockspace,
                identity,
                &key.map(str::to_owned).unwrap_or_else(|| crate::lockspace::file_key(path, identity.offset)),
            )
            .phrase(),
            other => crate::error_chain(other),
        },
        path,
        mode,
        since: crate::clock::now(),
    };
    held.retain(|(res, _)| {
        // A file the definition still names but that cannot be found right now keeps its lock.
        let keep = wanted.contains_key(&res.identity) || listed.contains(&res.path);
        if !keep {
            info!("guest {guest}: {} is no longer used; released", res.path.display());
            change.removed += 1;
        }
        keep
    });
    for (res, fd) in held.iter_mut() {
        let Some(w) = wanted.remove(&res.identity) else { continue };
        res.roles = w.roles;
        if w.target.mode != res.mode {
            match change_mode(&lockspace, res, fd, w.target.mode) {
                Ok(()) => {
                    info!("guest {guest}: {} is now locked {}", res.path.display(), res.mode.as_str());
                    change.changed_mode += 1;
                }
                Err(e) => change.conflicts.push(conflict(res.path.clone(), w.target.mode, Some(res.key.as_str()), &e)),
            }
        }
    }
    for id in order {
        let Some(w) = wanted.remove(&id) else { continue };
        let Wanted { target, roles, taken } = w;
        let taken = taken.unwrap_or_else(|| target.take(&lockspace));
        match taken {
            Ok(lock) => {
                info!("guest {guest}: hot-plugged {} locked {}", target.path.display(), target.mode.as_str());
                held.push((Resource::new(&target, roles, lock.mode, lock.identity), lock.fd));
                change.added += 1;
            }
            Err(LockError::Open { .. }) if roles.iter().all(Role::best_effort) => {}
            Err(e) => change.conflicts.push(conflict(target.path.clone(), target.mode, target.key.as_deref(), &e)),
        }
    }
    change
}
