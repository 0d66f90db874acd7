//! What a holder watches while it holds, and what it does when that changes. This room owns the
//! hazard of locks that outlive or miss their guest:
//! - the guest's QEMU, through a pidfd (or, without pidfd support, a liveness check per tick):
//!   once it is gone and no `release` came, the locks go;
//! - the guest's live definition (libvirt's status file), followed once a tick for hot-plug (see
//!   `hotplug`), with the `on_conflict` policy for what cannot be locked (`pause` runs `virsh`);
//! - on a migration destination, the resources its source still holds (see `handover`) and the
//!   guard that kills a QEMU that is not an incoming migration (see `migration`).

use log::{error, info, warn};
use nix::sys::signal::Signal;

use super::handover;
use super::hotplug;
use super::server::{Holder, Next};
use crate::state::{self, Resource};

pub(super) use super::fdpass::pidfd_open;

impl Holder {
    pub(super) fn qemu_exited(&self) -> bool {
        self.watched.qemu.as_ref().is_some_and(|q| q.pidfd.is_none() && !crate::qemu::is_alive(q.pid, q.start_time))
    }

    /// Re-reads the guest's live definition when libvirt changed it (or while a conflict is
    /// pending) and brings the locks in line; see `hotplug`.
    pub(super) fn follow_hotplug(&mut self) {
        let Some(status) = self.hotplug.status.as_mut() else { return };
        let domain = match status.changed() {
            Some(domain) if domain.uuid == self.uuid => {
                self.hotplug.live = Some(domain.clone());
                domain
            }
            Some(_) => return,
            None if !self.hotplug.conflicts.is_empty() => match &self.hotplug.live {
                Some(domain) => domain.clone(),
                None => return,
            },
            None => return,
        };
        let pending: Vec<_> = self.migration.pending.iter().map(|r| r.identity).collect();
        let mut change = hotplug::sync(&mut self.held, &pending, &domain, &self.config, &self.paths);
        let leases_changed = self.sync_leases(&domain, &mut change.conflicts);
        let locks_changed = !change.is_empty() || leases_changed;
        let mut fresh = Vec::new();
        let conflicts: Vec<state::Conflict> = change
            .conflicts
            .into_iter()
            .map(|mut c| {
                match self.hotplug.conflicts.iter().find(|old| old.path == c.path) {
                    Some(old) => c.since = old.since.clone(),
                    None => fresh.push(c.clone()),
                }
                c
            })
            .collect();
        let conflicts_changed = conflicts != self.hotplug.conflicts;
        self.hotplug.conflicts = conflicts;
        for c in &fresh {
            let now = match self.held.iter().find(|(r, _)| r.path == c.path) {
                Some((r, _)) => format!("it stays locked {} for this guest", r.mode.as_str()),
                None => "it is NOT locked for this guest".to_owned(),
            };
            error!(
                "guest {}: CONFLICT: {} wanted {}, but it {}; {now}; retrying (on_conflict = {:?})",
                self.describe(),
                c.path.display(),
                c.mode.as_str(),
                c.held_by,
                self.config.on_conflict
            );
        }
        if !fresh.is_empty() && self.config.on_conflict == crate::config::ConflictPolicy::Pause {
            self.pause_guest();
        }
        if locks_changed || conflicts_changed {
            if let Err(e) = self.save() {
                warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
            }
        }
        if locks_changed {
            self.sync_records();
        }
    }

    /// The sanlock side of hot-plug: leases for what the guest now locks, released for what it
    /// no longer does. A lease that cannot be had is a conflict, retried like any other. Says
    /// whether the held leases changed.
    fn sync_leases(&mut self, domain: &crate::domain::Domain, conflicts: &mut Vec<state::Conflict>) -> bool {
        let Some(leases) = &mut self.leases else { return false };
        if leases.lost {
            return false;
        }
        let wanted: Vec<crate::engine::Wanted> =
            self.held.iter().map(|(r, _)| crate::engine::Wanted::from(r)).collect();
        let specs = crate::engine::specs(&self.config, domain, &wanted);
        let before = leases.held.len();
        let removed = leases.keep_only(&domain.name, &specs);
        let how = crate::engine::leases::How { partial: true, ..Default::default() };
        let missing = match leases.acquire(&domain.name, &specs, how) {
            Ok(granted) => granted.missing,
            Err(lines) => lines,
        };
        for line in missing {
            conflicts.push(state::Conflict {
                path: format!("sanlock lease: {}", line.split(" is locked").next().unwrap_or("?")).into(),
                mode: crate::lock::LockMode::Exclusive,
                held_by: line,
                since: crate::clock::now(),
            });
        }
        removed > 0 || leases.held.len() != before - removed
    }

    /// Pauses the guest through libvirt. Allowed here (the holder is not a hook, so libvirt is
    /// not waiting for it); the child is not waited for (SIGCHLD is ignored, so it is reaped).
    fn pause_guest(&self) {
        let spawned = std::process::Command::new("virsh")
            .args(["-c", "qemu:///system", "suspend", self.uuid.as_str()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(_) => warn!("guest {}: pausing it (on_conflict = \"pause\")", self.describe()),
            Err(e) => error!("guest {}: cannot run virsh to pause it: {e}", self.describe()),
        }
    }

    /// Starts waiting for resources the same guest still holds on another host (see `handover`).
    pub(super) fn wait_for(&mut self, pending: Vec<Resource>) {
        if pending.is_empty() {
            return;
        }
        if self.migration.handover.is_none() {
            match handover::Handover::new() {
                Ok(h) => self.migration.handover = Some(h),
                Err(e) => {
                    error!("guest {}: cannot wait for the migration hand-over: {e}", self.describe());
                    return;
                }
            }
        }
        let Some(handover) = &self.migration.handover else { return };
        for resource in pending {
            let known = self.held.iter().any(|(r, _)| r.identity == resource.identity)
                || self.migration.pending.iter().any(|r| r.identity == resource.identity);
            if known {
                continue;
            }
            info!("guest {}: waiting for {} to be released by its source host", self.describe(), resource.name());
            handover.wait_for(resource.clone(), &self.records.lockspace);
            self.migration.pending.push(resource);
        }
        if let Err(e) = self.save() {
            warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
        }
    }

    /// Whether this holder must watch for its guest's QEMU: it waits for a migration source and
    /// has not seen an incoming QEMU yet.
    pub(super) fn guarding(&self) -> bool {
        (!self.migration.pending.is_empty() || self.leases_pending())
            && self.watched.qemu.is_none()
            && !self.migration.verified
    }

    /// The guard of a destination holder (see `migration`): the QEMU libvirt starts for this
    /// guest must be an incoming migration (`-incoming`, paused until the switch-over); one that
    /// is not would run the guest while its source still does, so it is killed as soon as it
    /// execs, while it still waits on `-S` for libvirt's `cont`. A guest whose QEMU never comes
    /// is given up after `PENDING_BOUND`.
    pub(super) fn guard_incoming(&mut self) -> Next {
        if self.started.elapsed() >= crate::migration::PENDING_BOUND {
            error!(
                "guest {}: gave up waiting for {} resource(s) held by its migration source: no QEMU came within {} s; \
                 releasing",
                self.describe(),
                self.migration.pending.len(),
                crate::migration::PENDING_BOUND.as_secs()
            );
            return Next::Exit;
        }
        let Some(guest) = &self.guest else { return Next::Continue };
        match crate::migration::find_qemu(&guest.name, &self.uuid, &self.config.libvirt_run_dir) {
            Some((pid, crate::migration::QemuKind::Incoming)) => {
                info!("guest {}: QEMU (pid {pid}) is an incoming migration; waiting for its source", self.describe());
                self.migration.verified = true;
                Next::Continue
            }
            Some((pid, _)) => {
                let mut names: Vec<String> = self.migration.pending.iter().map(Resource::name).collect();
                if let Some(leases) = &self.leases {
                    names.extend(leases.pending.iter().map(|l| l.what.clone()));
                }
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
                error!(
                    "guest {}: its QEMU (pid {pid}) is not an incoming migration, but {} is still held by this guest \
                     on another host: killed it before its CPUs could run",
                    self.describe(),
                    names.join(", ")
                );
                Next::Exit
            }
            None => Next::Continue,
        }
    }

    /// Takes over the locks whose wait finished.
    pub(super) fn take_over(&mut self) {
        let Some(handover) = &self.migration.handover else { return };
        let finished = handover.finished();
        for (resource, result) in finished {
            self.migration.pending.retain(|r| r.identity != resource.identity);
            match result {
                Ok(lock) => {
                    info!(
                        "guest {}: hand-over complete: now holding {} {}",
                        self.describe(),
                        lock.mode.as_str(),
                        resource.name()
                    );
                    let held =
                        Resource { identity: lock.identity, mode: lock.mode, since: crate::clock::now(), ..resource };
                    self.held.push((held, lock.fd));
                }
                Err(e) => error!(
                    "guest {}: hand-over of {} failed: {}",
                    self.describe(),
                    resource.name(),
                    crate::error_chain(&e)
                ),
            }
        }
        if let Err(e) = self.save() {
            warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
        }
        self.sync_records();
    }
}
