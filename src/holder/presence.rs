//! What makes a holder reachable and nameable: its socket, its instance-lock file and its state
//! file in the run directory, and its owner records in the lockspace. This room owns the hazard
//! of a guest whose locks are held but whom nobody can find or name (a refusal that cannot say
//! who holds an image, a `release` that cannot reach its holder), and the order in which those
//! files come and go.
//!
//! Once a `TICK` it heals what others may have broken: a deleted socket is bound again, a
//! missing or corrupt state file is rewritten, a deleted instance-lock file is recreated and
//! locked, so the guest stays reachable and nameable.

use std::fs;
use std::os::unix::fs::MetadataExt;

use log::warn;

use super::protocol::Guest;
use super::records::RecordKeeper;
use super::server::Holder;
use crate::lock::LockMode;
use crate::rundir::{ensure_run_dir, listen_on, take_instance_lock};
use crate::state::{self, GuestState};

impl Holder {
    /// Restores the files that make this holder reachable and nameable when someone removed or
    /// damaged them (an administrator's `rm -rf /run/lockhook`, a corrupt state file).
    pub(super) fn heal(&mut self) {
        let socket = self.paths.socket(&self.uuid);
        if fs::symlink_metadata(&socket).is_err() {
            let relisten = ensure_run_dir(self.paths.run_dir()).and_then(|()| listen_on(&socket));
            match relisten {
                Ok(listener) => {
                    warn!("holder for {}: {} was removed; listening again", self.uuid, socket.display());
                    self.files.listener = listener;
                }
                Err(e) => warn!("holder for {}: {}", self.uuid, crate::error_chain(&e)),
            }
        }
        let lock_path = self.paths.instance_lock(&self.uuid);
        let ours = self.files.instance.as_ref().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
        let on_disk = fs::metadata(&lock_path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_none() || ours != on_disk {
            match take_instance_lock(&self.paths, &self.uuid) {
                Ok(file) => {
                    warn!("holder for {}: {} was removed or replaced; locked it again", self.uuid, lock_path.display());
                    self.files.instance = Some(file);
                }
                Err(e) => warn!("holder for {}: {}", self.uuid, crate::error_chain(&e)),
            }
        }
        if self.guest.is_some() {
            let state_path = self.paths.state(&self.uuid);
            // A stat a second; the file is parsed only when it is not the one last written.
            let current = fs::metadata(&state_path).ok().map(|m| (m.dev(), m.ino(), m.len()));
            if current.is_none() || current != self.files.state_written {
                // The run directory may have gone with it: the census this holder counts in is
                // named again rather than made anew (see `Census::republish`).
                if let Some(census) = &self.files.census {
                    let _ = census.republish(&self.paths);
                }
                match self.save() {
                    Ok(()) => {
                        warn!("holder for {}: {} was missing or damaged; rewrote it", self.uuid, state_path.display())
                    }
                    Err(e) => warn!("holder for {}: {}", self.uuid, crate::error_chain(&e)),
                }
            }
        }
    }

    pub(super) fn save(&mut self) -> Result<(), state::StateError> {
        let guest = self.guest.clone().unwrap_or(Guest { name: String::new(), uuid: self.uuid.clone() });
        let record = GuestState {
            version: state::STATE_VERSION,
            kind: state::HolderKind::Guest,
            qemu_start_time: self.watched.qemu.as_ref().map(|q| q.start_time),
            conflicts: self.hotplug.conflicts.clone(),
            pending: self.migration.pending.clone(),
            sanlock: self.leases.as_ref().map(|l| l.held.clone()).unwrap_or_default(),
            sanlock_pending: self.leases.as_ref().map(|l| l.pending.clone()).unwrap_or_default(),
            name: guest.name,
            uuid: self.uuid.clone(),
            host: self.host.clone(),
            holder_pid: std::process::id(),
            holder_version: Some(crate::holder::protocol::release()),
            qemu_pid: self.watched.qemu.as_ref().map(|q| q.pid),
            since: self.since.clone(),
            resources: self.held.iter().map(|(r, _)| r.clone()).collect(),
        };
        let path = self.paths.state(&self.uuid);
        // Invariant: counted before there is a state file to find, so a death is never missed.
        if self.files.census.is_none() {
            match crate::census::Census::open_or_create(&self.paths) {
                Ok(census) => match census.enter() {
                    Ok(()) => self.files.census = Some(census),
                    Err(e) => log::warn!("holder for {}: cannot enter the census: {e}", self.uuid),
                },
                Err(e) => log::warn!("holder for {}: no census: {e}", self.uuid),
            }
        }
        state::write(&path, &record)?;
        self.files.state_written = fs::metadata(&path).ok().map(|m| (m.dev(), m.ino(), m.len()));
        Ok(())
    }

    /// Hands the owner records of what is held now to the record thread (see `records`), and
    /// offers the shared locks held now to the host's next guests (see `shares`).
    pub(super) fn sync_records(&mut self) {
        self.sync_shares();
        let Some(guest) = &self.guest else { return };
        let wanted = self
            .held
            .iter()
            .filter(|(r, _)| !r.key.is_empty())
            .map(|(r, _)| r.owner_record(&self.host, &guest.name, &self.uuid, false))
            .collect();
        let lockspace = &self.records.lockspace;
        self.records.keeper.get_or_insert_with(|| RecordKeeper::start(lockspace.clone())).sync(wanted);
    }

    /// Drops every lock, then the files that advertise them, and the instance lock (a new holder
    /// for this guest may start as soon as the hook has its answer). Owner records are withdrawn
    /// by `withdraw_records` after that, and only where a new holder has not replaced them.
    pub(super) fn drop_all(&mut self) {
        // Invariant: the files go first, while the instance lock still keeps a new holder of this
        // guest from creating its own under the same names.
        // Persistent sanlock leases are released on purpose (closing the connection would leave
        // them held as orphans). Any the daemon did not release stay on record in the state file
        // (the dead holder's), for `reconcile` to release as orphans.
        let unreleased = self.leases.as_mut().map(|l| l.release_all()).unwrap_or_default();
        if unreleased.is_empty() {
            let _ = fs::remove_file(self.paths.state(&self.uuid));
            // A clean exit: nothing for the re-adoption pass. (With leases left on record, the
            // kernel's undo at exit makes the census count this holder dead: the next pass
            // releases them.)
            if let Some(census) = self.files.census.take() {
                let _ = census.leave();
                census.drop_if_orphaned(&self.paths);
            }
        } else {
            self.held.clear();
            if let Some(leases) = &mut self.leases {
                leases.held = unreleased;
            }
            if let Err(e) = self.save() {
                log::error!(
                    "holder for {}: cannot record its unreleased sanlock leases: {}",
                    self.uuid,
                    crate::error_chain(&e)
                );
            }
        }
        let _ = fs::remove_file(self.paths.socket(&self.uuid));
        self.held.clear();
        // Invariant: the lock file goes while still locked (see `rundir::lock_instance_file`).
        if let Some(instance) = &self.files.instance {
            crate::rundir::remove_instance_file(&self.paths.instance_lock(&self.uuid), instance);
        }
        self.files.instance = None;
    }

    pub(super) fn exit(&mut self) {
        self.drop_all();
        self.withdraw_records();
    }

    /// Offers this holder's shared locks to the next guests of this host where no other holder
    /// offers them, and withdraws its offers of locks it let go of.
    fn sync_shares(&mut self) {
        use std::os::fd::{AsFd, AsRawFd};
        // An offer stands while the lock it names is held through the very fd it names.
        let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.files.shares).into_iter().partition(|(id, n)| {
            self.held.iter().any(|(r, fd)| r.identity == *id && r.mode == LockMode::Shared && fd.as_raw_fd() == *n)
        });
        crate::shares::withdraw(&self.paths, &gone.iter().map(|(id, _)| *id).collect::<Vec<_>>());
        let offered = self
            .held
            .iter()
            .filter(|(r, _)| !kept.iter().any(|(id, _)| *id == r.identity))
            .map(|(r, fd)| (r.identity, r.mode, fd.as_fd()));
        let published = crate::shares::publish(&self.paths, offered);
        self.files.shares = kept.into_iter().chain(published).collect();
    }

    /// Withdraws every owner record and every offer of a shared lock (the locks are gone), and
    /// waits for the record thread to finish.
    pub(super) fn withdraw_records(&mut self) {
        let offers: Vec<_> = std::mem::take(&mut self.files.shares).into_iter().map(|(id, _)| id).collect();
        crate::shares::withdraw(&self.paths, &offers);
        if let Some(mut records) = self.records.keeper.take() {
            records.stop();
        }
    }
}
