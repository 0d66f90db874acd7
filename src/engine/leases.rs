//! A holder's sanlock leases: registered with the daemon on first use, acquired all or none per
//! request, held persistent, released on purpose.
//!
//! Hazards owned here:
//! - **Holder death.** Leases are acquired `SANLK_RES_PERSISTENT`: when the holder dies while
//!   QEMU runs, they stay held by this host as orphans instead of being freed, and the holder
//!   that re-adopts the guest takes them back (`SANLK_ACQUIRE_ORPHAN` on every acquire). The
//!   flip side: a holder that exits must release them itself ([`Leases::release_all`]), and
//!   orphans of a guest that is gone are released by `reconcile` ([`release_orphans`]).
//! - **Never block on another host.** Acquires ask `SANLK_ACQUIRE_OWNER_NOWAIT`: a lease whose
//!   owner's host stopped renewing is a refusal now ("retry after its lease times out"), not a
//!   wait of minutes inside a hook.
//! - **The 8-lease limit** is per call: leases are acquired one per call, so a guest may hold
//!   any number, and a refusal names each busy one.
//! - **The socket has no CLOEXEC** in the library: `Sanlock::register` sets it; the holder
//!   registers from its single thread.
//! - **Fencing.** Right after registering, the killpath is set to `lockhook sanlock lock-lost
//!   ACTION RUN_DIR` (sanlock appends the holder's pid): when the host loses its lockspace lease
//!   the daemon runs it, and it stops the guest's QEMU (see `lock_lost`).

use std::path::PathBuf;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::area::Area;
use super::{hosts, LeaseAt, LeaseSpec, Place};
use crate::config::SanlockConfig;
use crate::lock::LockMode;
use crate::paths::Paths;
use crate::sanlock::{
    AcquireOptions, Client, Code, Disk, Geometry, Lease, LeaseRequest, Name, Owners, Sanlock, SanlockError,
};

/// A lease as a holder holds it (and records it in its state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    pub what: String,
    pub mode: LockMode,
    /// How it was asked for (to tell a request for it again from a new one).
    pub at: LeaseAt,
    pub lockspace: String,
    pub name: String,
    pub path: PathBuf,
    pub offset: u64,
}

impl HeldLease {
    fn new(spec: &LeaseSpec, lease: &Lease) -> HeldLease {
        HeldLease {
            what: spec.what.clone(),
            mode: spec.mode,
            at: spec.at.clone(),
            lockspace: lease.lockspace.to_string(),
            name: lease.name.to_string(),
            path: lease.disk.path.clone(),
            offset: lease.disk.offset,
        }
    }

    pub fn lease(&self) -> Option<Lease> {
        Some(Lease {
            lockspace: Name::new(&self.lockspace).ok()?,
            name: Name::new(&self.name).ok()?,
            disk: Disk::new(&self.path, self.offset),
        })
    }

    /// The same lease asked for again, at the place it was found (re-adoption).
    pub fn spec(&self) -> LeaseSpec {
        LeaseSpec {
            what: self.what.clone(),
            mode: self.mode,
            at: self.at.clone(),
            place: Some(Place {
                lockspace: self.lockspace.clone(),
                name: self.name.clone(),
                path: self.path.clone(),
                offset: self.offset,
            }),
        }
    }

    /// `LOCKSPACE:NAME:PATH:OFFSET`.
    pub fn display(&self) -> String {
        format!("{}:{}:{}:{}", self.lockspace, self.name, self.path.display(), self.offset)
    }
}

/// What an acquire got: how many leases wait for a migration source, and (with `partial`) the
/// refusal lines of those it could not have.
#[derive(Debug, Default)]
pub struct Granted {
    pub pending: usize,
    pub missing: Vec<String>,
}

/// How to acquire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct How {
    /// A verified incoming migration: leases the source holds become pending.
    #[serde(default)]
    pub incoming: bool,
    /// Re-adoption of a running guest whose holder died: its orphans are taken back.
    #[serde(default)]
    pub adopt: bool,
    /// For a guest that runs already: keep what can be had, report the rest.
    #[serde(default)]
    pub partial: bool,
}

/// Names of a guest's manifest lease (`manifest:` + 32 hex digits of SHA-256 over its UUID and
/// exclusive leases).
const MANIFEST: &str = "manifest:";

fn is_manifest(at: &LeaseAt) -> bool {
    matches!(at, LeaseAt::Key { key } if key.starts_with(MANIFEST))
}

/// The guest's own lease or its manifest: not part of the manifest.
fn is_own(at: &LeaseAt) -> bool {
    matches!(at, LeaseAt::Key { key } if key.starts_with("guest:") || key.starts_with(MANIFEST))
}

/// The sanlock side of one holder.
pub struct Leases {
    config: SanlockConfig,
    uuid: crate::domain::Uuid,
    paths: Paths,
    client: Option<Client>,
    area: Option<Area>,
    pub held: Vec<HeldLease>,
    /// Leases the same guest holds on its migration source: taken once released.
    pub pending: Vec<HeldLease>,
    /// The host lost its lockspace: nothing is held any more, nothing is retried.
    pub lost: bool,
    /// The migration source's host id, while leases are pending.
    source: Option<u64>,
    /// Pending leases someone other than the source took meanwhile (logged once each).
    stolen: Vec<HeldLease>,
}

impl Leases {
    pub fn new(config: &SanlockConfig, paths: &Paths, uuid: &crate::domain::Uuid) -> Leases {
        Leases {
            config: config.clone(),
            uuid: uuid.clone(),
            paths: paths.clone(),
            client: None,
            area: None,
            held: Vec::new(),
            pending: Vec::new(),
            lost: false,
            source: None,
            stolen: Vec::new(),
        }
    }

    /// Held (or awaited) already, in this mode or a stronger one.
    fn knows(&self, spec: &LeaseSpec) -> bool {
        self.held
            .iter()
            .chain(&self.pending)
            .any(|h| h.at == spec.at && (h.mode == LockMode::Exclusive || spec.mode == LockMode::Shared))
    }

    /// Leases held shared that `specs` now want exclusive (a disk whose last sharer left, a
    /// hot-plugged role change) are released first, to be acquired again exclusive: sanlock
    /// grants no exclusive lease to a client that holds it shared. If the exclusive acquire then
    /// fails, the caller reports it like any other refusal (hot-plug retries it).
    fn release_upgrades(&mut self, specs: &[&LeaseSpec]) -> Vec<HeldLease> {
        let upgrade = |h: &HeldLease| {
            h.mode == LockMode::Shared && specs.iter().any(|s| s.at == h.at && s.mode == LockMode::Exclusive)
        };
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held).into_iter().partition(|h| upgrade(h));
        self.held = keep;
        for lease in &gone {
            info!("sanlock lease {} ({}) is wanted exclusive now: re-acquiring it", lease.display(), lease.what);
        }
        let failed = self.release(&gone);
        self.held.extend(failed.iter().cloned());
        gone.into_iter().filter(|g| !failed.contains(g)).collect()
    }

    /// Releases the held leases no longer among `specs` (a disk unplugged); returns how many.
    pub fn keep_only(&mut self, guest: &str, specs: &[LeaseSpec]) -> usize {
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| is_manifest(&h.at) || specs.iter().any(|s| s.at == h.at));
        self.held = keep;
        let failed = self.release(&gone);
        for lease in gone.iter().filter(|g| !failed.contains(g)) {
            info!("released sanlock lease {} ({}): no longer used", lease.display(), lease.what);
        }
        self.held.extend(failed);
        if !gone.is_empty() {
            if let Ok(sanlock) = Sanlock::load() {
                self.sync_manifest(&sanlock, guest);
            }
        }
        gone.len()
    }

    /// Acquires every lease of `specs` this holder does not hold yet, or none of them (with
    /// `how.partial`: what it can, reporting the rest). With `how.incoming` (a verified incoming
    /// migration), leases held by the migration source are pending instead of refusals; the
    /// source is the host whose holder of this guest holds exactly these leases (its manifest
    /// lease, see `manifest_name`). Errors are refusal lines.
    pub fn acquire(&mut self, guest: &str, specs: &[LeaseSpec], how: How) -> Result<Granted, Vec<String>> {
        let all = strongest(specs);
        let specs: Vec<&LeaseSpec> = all.iter().filter(|s| !self.knows(s)).collect();
        if specs.is_empty() {
            return Ok(Granted::default());
        }
        let sanlock = Sanlock::load().map_err(|e| vec![format!("sanlock engine: {e}")])?;
        self.ensure_client(&sanlock)?;
        self.check_joined(&sanlock)?;
        let upgraded = self.release_upgrades(&specs);
        let options = AcquireOptions {
            persistent: true,
            // Only a re-adoption takes orphans: they are this guest's, left by its dead holder.
            adopt_orphans: how.adopt,
            no_wait: true,
            owner_name: Some(Name::fit(guest)),
            ..AcquireOptions::default()
        };
        let mut got = Vec::new();
        let mut busy = Vec::new();
        let mut lines = Vec::new();
        for spec in specs {
            let lease = match self.resolve(&sanlock, spec) {
                Ok(lease) => lease,
                Err(line) => {
                    lines.push(line);
                    continue;
                }
            };
            let request = LeaseRequest { lease: lease.clone(), mode: spec.mode, lver: None };
            let client = self.client.as_mut().expect("registered above");
            match client.acquire(std::slice::from_ref(&request), &options) {
                Ok(()) => got.push(HeldLease::new(spec, &lease)),
                Err(e) if e.is_busy() => busy.push(HeldLease::new(spec, &lease)),
                Err(e) => lines.push(self.failure_line(&sanlock, spec, &lease, &e)),
            }
        }
        let mut pending = Vec::new();
        let mut source_manifest = None;
        if !busy.is_empty() {
            let source = if how.incoming { self.migration_source(&sanlock, &all) } else { Err(String::new()) };
            source_manifest = source.as_ref().ok().map(|(_, m)| m.clone());
            for lease in busy {
                let owners = lease.lease().and_then(|l| sanlock.read_resource_owners(&l).ok());
                match (&source, &owners) {
                    (Ok((src, _)), Some(o)) if !o.hosts.is_empty() && o.hosts.iter().all(|h| h.host_id == *src) => {
                        pending.push(lease)
                    }
                    (Err(why), _) if !why.is_empty() => {
                        lines.push(format!("{}: {why}", self.busy_line(&sanlock, &lease, owners.as_ref())))
                    }
                    _ => lines.push(self.busy_line(&sanlock, &lease, owners.as_ref())),
                }
            }
        }
        // The source's manifest names this guest's leases here too: taken over with them.
        if let (false, Some(manifest)) = (pending.is_empty(), source_manifest) {
            if !self.held.iter().chain(&self.pending).any(|h| h.at == manifest.at) {
                pending.push(manifest);
            }
        }
        // A lease released for an exclusive re-acquire that failed comes back shared.
        for lease in upgraded {
            if !got.iter().any(|g| g.at == lease.at) {
                self.reacquire_shared(guest, lease);
            }
        }
        if !lines.is_empty() && !how.partial {
            let failed = self.release(&got);
            // Not released: still ours, so held (and on record) until the holder exits.
            self.held.extend(failed);
            return Err(lines);
        }
        for lease in &got {
            info!("guest {guest}: holding sanlock lease {} ({} {})", lease.display(), lease.mode.as_str(), lease.what);
        }
        for lease in &pending {
            info!(
                "guest {guest}: waiting for sanlock lease {} to be released by its migration source",
                lease.display()
            );
        }
        if !pending.is_empty() {
            self.source = self.source.or(source_of(&sanlock, &pending));
        }
        let granted = Granted { pending: pending.len(), missing: lines };
        self.held.extend(got);
        self.pending.extend(pending);
        self.sync_manifest(&sanlock, guest);
        Ok(granted)
    }

    /// The exclusive leases this guest wants or holds, by how they are asked for: what its
    /// manifest names. Its own lease and the manifest itself are not among them.
    fn manifest_name(&self, wanted: impl Iterator<Item = (LockMode, LeaseAt)>) -> String {
        let mut ids: Vec<String> = wanted
            .filter(|(mode, at)| *mode == LockMode::Exclusive && !is_own(at))
            .map(|(_, at)| match at {
                LeaseAt::Key { key } => format!("key {key}"),
                LeaseAt::Fixed { lockspace, name, path, offset } => {
                    format!("lease {lockspace}:{name}:{}:{offset}", path.display())
                }
                LeaseAt::LibvirtDisk { path } => format!("libvirt {path}"),
            })
            .collect();
        ids.sort();
        ids.dedup();
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(self.uuid.as_str().as_bytes());
        for id in &ids {
            hash.update(b"\n");
            hash.update(id.as_bytes());
        }
        let digest: String = hash.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{MANIFEST}{digest}")
    }

    /// Holds the manifest lease of what is held now (and releases the previous one): a
    /// migration destination recognises this guest's source by it.
    fn sync_manifest(&mut self, sanlock: &Sanlock, guest: &str) {
        let wanted = self.held.iter().chain(&self.pending).map(|h| (h.mode, h.at.clone()));
        let key = self.manifest_name(wanted);
        let at = LeaseAt::Key { key: key.clone() };
        let current: Vec<HeldLease> = self.held.iter().filter(|h| is_manifest(&h.at)).cloned().collect();
        if current.iter().any(|h| h.at == at) || !self.pending.is_empty() {
            return;
        }
        let spec = LeaseSpec { what: format!("guest {guest} (manifest)"), mode: LockMode::Exclusive, at, place: None };
        let options = AcquireOptions { persistent: true, no_wait: true, ..AcquireOptions::default() };
        match self.resolve(sanlock, &spec) {
            Ok(lease) => {
                let request = LeaseRequest { lease: lease.clone(), mode: LockMode::Exclusive, lver: None };
                let client = self.client.as_mut().expect("registered");
                match client.acquire(&[request], &options) {
                    Ok(()) => self.held.push(HeldLease::new(&spec, &lease)),
                    Err(e) => warn!("guest {guest}: cannot hold its manifest lease {key}: {}", crate::error_chain(&e)),
                }
            }
            Err(line) => warn!("guest {guest}: {line}"),
        }
        self.held.retain(|h| !current.contains(h));
        let failed = self.release(&current);
        self.held.extend(failed);
    }

    /// The migration source's host id: the one host holding the manifest lease for exactly the
    /// exclusive leases this destination asks for. Otherwise why not.
    fn migration_source(&self, sanlock: &Sanlock, specs: &[LeaseSpec]) -> Result<(u64, HeldLease), String> {
        let key = self.manifest_name(specs.iter().map(|s| (s.mode, s.at.clone())));
        let not_source = "not held by this guest's migration source (its source holds another set of resources, or \
                          is not on lockhook's sanlock engine)";
        let area = self.area.as_ref().ok_or_else(|| not_source.to_owned())?;
        let rindex = area.rindex();
        let offset = match sanlock.lookup_rindex(&rindex, &Name::fit(&key)) {
            Ok(Some(offset)) => offset,
            Ok(None) => return Err(not_source.to_owned()),
            Err(e) => return Err(format!("cannot read the resource index: {}", crate::error_chain(&e))),
        };
        let lease = Lease {
            lockspace: rindex.lockspace.clone(),
            name: Name::fit(&key),
            disk: Disk::new(&rindex.disk.path, offset),
        };
        let owners = sanlock.read_resource_owners(&lease).map_err(|e| crate::error_chain(&e))?;
        let spec = LeaseSpec {
            what: "this guest's manifest".into(),
            mode: LockMode::Exclusive,
            at: LeaseAt::Key { key: key.clone() },
            place: None,
        };
        match owners.hosts.as_slice() {
            [only] if only.host_id != self.config.host_id => Ok((only.host_id, HeldLease::new(&spec, &lease))),
            _ => Err(not_source.to_owned()),
        }
    }

    /// Acquires `lease` shared again (after a failed upgrade to exclusive).
    fn reacquire_shared(&mut self, guest: &str, mut lease: HeldLease) {
        let Some(l) = lease.lease() else { return };
        lease.mode = LockMode::Shared;
        let options = AcquireOptions { persistent: true, no_wait: true, ..AcquireOptions::default() };
        let client = self.client.as_mut().expect("registered");
        match client.acquire(&[LeaseRequest { lease: l, mode: LockMode::Shared, lver: None }], &options) {
            Ok(()) => self.held.push(lease),
            Err(e) => {
                log::error!(
                    "guest {guest}: sanlock lease {} ({}) lost: the upgrade to exclusive failed and it cannot be held shared again: {}",
                    lease.display(),
                    lease.what,
                    crate::error_chain(&e)
                )
            }
        }
    }

    /// Tries the pending leases once more; returns those now held.
    pub fn take_pending(&mut self, guest: &str) -> Vec<HeldLease> {
        if self.pending.is_empty() || self.lost {
            return Vec::new();
        }
        let Some(client) = self.client.as_mut() else { return Vec::new() };
        let options = AcquireOptions {
            persistent: true,
            adopt_orphans: false,
            no_wait: true,
            owner_name: Some(Name::fit(guest)),
            ..AcquireOptions::default()
        };
        let mut taken = Vec::new();
        let mut still = Vec::new();
        for lease in std::mem::take(&mut self.pending) {
            let Some(l) = lease.lease() else { continue };
            match client.acquire(&[LeaseRequest { lease: l, mode: lease.mode, lver: None }], &options) {
                Ok(()) => taken.push(lease),
                Err(e) if e.is_busy() => still.push(lease),
                Err(e) => {
                    warn!("guest {guest}: sanlock lease {}: {}", lease.display(), crate::error_chain(&e));
                    still.push(lease);
                }
            }
        }
        for lease in &still {
            self.note_stolen(guest, lease);
        }
        self.pending = still;
        for lease in &taken {
            info!("guest {guest}: hand-over complete: now holding sanlock lease {} ({})", lease.display(), lease.what);
        }
        self.held.extend(taken.iter().cloned());
        taken
    }

    /// Logs (once) a pending lease that a host other than the migration source holds now: it
    /// was taken in the moment between the source's release and our next try.
    fn note_stolen(&mut self, guest: &str, lease: &HeldLease) {
        if self.stolen.contains(lease) {
            return;
        }
        let Ok(sanlock) = Sanlock::load() else { return };
        let Some(owners) = lease.lease().and_then(|l| sanlock.read_resource_owners(&l).ok()) else { return };
        let others: Vec<u64> = owners.hosts.iter().map(|o| o.host_id).filter(|id| Some(*id) != self.source).collect();
        if !others.is_empty() {
            log::error!(
                "guest {guest}: CONFLICT: sanlock lease {} ({}) awaited from the migration source is held by sanlock host_id {:?} now; this guest runs WITHOUT it; still trying",
                lease.display(),
                lease.what,
                others
            );
            self.stolen.push(lease.clone());
        }
    }

    /// Releases every lease (persistent ones must be released, or they would outlive us as
    /// orphans) and forgets the pending ones.
    /// Returns the leases that could not be released: when this process exits they become
    /// orphans of this host, which the caller must leave on record for `reconcile`.
    pub fn release_all(&mut self) -> Vec<HeldLease> {
        let held = std::mem::take(&mut self.held);
        let failed = self.release(&held);
        self.pending.clear();
        if !held.is_empty() {
            info!("released {} sanlock lease(s)", held.len() - failed.len());
        }
        failed
    }

    /// The host lost its lockspace lease: the daemon is fencing us. Let go of everything (the
    /// leases are no longer ours to hold; the killpath stopped the guest).
    pub fn lock_lost(&mut self) {
        self.lost = true;
        // What the daemon does not release now it drops with the lockspace.
        let _ = self.release_all();
    }

    /// Releases `leases`; returns those the daemon did not release (still ours).
    fn release(&mut self, leases: &[HeldLease]) -> Vec<HeldLease> {
        let Some(client) = self.client.as_mut() else { return Vec::new() };
        let mut failed = Vec::new();
        for held in leases {
            let Some(lease) = held.lease() else { continue };
            if let Err(e) = client.release(std::slice::from_ref(&lease)) {
                log::error!("cannot release sanlock lease {}: {}", held.display(), crate::error_chain(&e));
                failed.push(held.clone());
            }
        }
        failed
    }

    fn ensure_client(&mut self, sanlock: &Sanlock) -> Result<(), Vec<String>> {
        if self.client.is_some() {
            return Ok(());
        }
        let mut client = sanlock.register().map_err(|e| {
            vec![format!(
                "sanlock daemon not reachable ({}): start it (systemctl start sanlock), then run `lockhook sanlock join`",
                crate::error_chain(&e)
            )]
        })?;
        let action = match self.config.on_lock_lost {
            crate::config::LockLost::Kill => "kill",
            crate::config::LockLost::Pause => "pause",
        };
        let run_dir = self.paths.run_dir().display().to_string();
        // After an upgrade replaced the binary, /proc/self/exe reads "PATH (deleted)": the
        // daemon must run the binary now at PATH.
        let exe = std::env::current_exe().map(|p| {
            let text = p.to_string_lossy();
            text.strip_suffix(" (deleted)").map(PathBuf::from).unwrap_or_else(|| p.clone())
        });
        match exe {
            Ok(exe) if !run_dir.contains(' ') => {
                if let Err(e) = client.set_killpath(&exe, &format!("sanlock lock-lost {action} {run_dir}")) {
                    return Err(vec![format!("sanlock: cannot set the killpath: {}", crate::error_chain(&e))]);
                }
            }
            _ => {
                return Err(vec![format!(
                    "sanlock: no killpath possible (lockhook's path, or run_dir {run_dir:?} has a space)"
                )])
            }
        }
        self.client = Some(client);
        Ok(())
    }

    /// One line, and nothing tried, on a host that has not joined lockhook's lockspace.
    fn check_joined(&mut self, sanlock: &Sanlock) -> Result<(), Vec<String>> {
        let host_id = self.config.host_id;
        let lockspace = self.area(sanlock).map_err(|line| vec![line])?.lockspace(host_id);
        match sanlock.inq_lockspace(&lockspace) {
            Ok(crate::sanlock::Membership::Joined) => Ok(()),
            Ok(_) => Err(vec![format!(
                "this host has not joined sanlock lockspace {} (host_id {host_id}): run `lockhook sanlock join`",
                lockspace.name
            )]),
            Err(e) => Err(vec![format!("sanlock daemon: {}", crate::error_chain(&e))]),
        }
    }

    fn area(&mut self, sanlock: &Sanlock) -> Result<&Area, String> {
        if self.area.is_none() {
            let path = self.config.lease_area.clone().ok_or("sanlock engine: no lease_area configured")?;
            self.area = Some(Area::open(sanlock, &path).map_err(|e| crate::error_chain(&e))?);
        }
        Ok(self.area.as_ref().expect("set above"))
    }

    /// Where the lease for `spec` is: looked up (and created when missing) in lockhook's index,
    /// created for libvirt's disk leases, or where the domain says.
    fn resolve(&mut self, sanlock: &Sanlock, spec: &LeaseSpec) -> Result<Lease, String> {
        if let Some(place) = &spec.place {
            let invalid = |e: crate::sanlock::NameError| format!("{}: sanlock lease name: {e}", spec.what);
            return Ok(Lease {
                lockspace: Name::new(&place.lockspace).map_err(invalid)?,
                name: Name::new(&place.name).map_err(invalid)?,
                disk: Disk::new(&place.path, place.offset),
            });
        }
        match &spec.at {
            LeaseAt::Key { key } => {
                let name = Name::fit(key);
                let rindex = self.area(sanlock)?.rindex();
                let offset = find_or_create(sanlock, &rindex, &name).map_err(|e| {
                    format!("{}: cannot allocate its sanlock lease: {}", spec.what, crate::error_chain(&e))
                })?;
                Ok(Lease { lockspace: rindex.lockspace, name, disk: Disk::new(&rindex.disk.path, offset) })
            }
            LeaseAt::Fixed { lockspace, name, path, offset } => {
                let invalid = |what: &str, e: &dyn std::fmt::Display| format!("{}: sanlock {what}: {e}", spec.what);
                Ok(Lease {
                    lockspace: Name::new(lockspace).map_err(|e| invalid("lockspace name", &e))?,
                    name: Name::new(name).map_err(|e| invalid("resource name", &e))?,
                    disk: Disk::new(path, *offset),
                })
            }
            LeaseAt::LibvirtDisk { path } => {
                let dir = self.config.libvirt_disk_lease_dir.clone().ok_or("libvirt_disk_lease_dir is not set")?;
                let name = super::libvirt_disk_name(path);
                let lease = Lease {
                    lockspace: Name::fit(super::LIBVIRT_LOCKSPACE),
                    name: Name::fit(&name),
                    disk: Disk::new(dir.join(&name), 0),
                };
                ensure_libvirt_lease(sanlock, &lease).map_err(|e| format!("{}: {e}", spec.what))?;
                Ok(lease)
            }
        }
    }

    fn failure_line(&mut self, sanlock: &Sanlock, spec: &LeaseSpec, lease: &Lease, e: &SanlockError) -> String {
        let held = HeldLease::new(spec, lease);
        match e {
            SanlockError::Acquire { code: Code::NotJoined, .. } => format!(
                "{}: this host has not joined sanlock lockspace {} (host_id {}): run `lockhook sanlock join`",
                spec.what, lease.lockspace, self.config.host_id
            ),
            SanlockError::Acquire { code: Code::OwnedRetry, .. } => {
                let owners = sanlock.read_resource_owners(lease).ok();
                format!(
                    "{}, whose host stopped renewing; retry after its lease times out (8 x io_timeout + 60 s)",
                    self.busy_line(sanlock, &held, owners.as_ref())
                )
            }
            SanlockError::Acquire { code: Code::Orphan, .. } => format!(
                "{} is held by this host as an orphan (left by a dead holder{}): `lockhook reconcile` re-adopts its guest or releases it",
                spec.what,
                local_holder(&self.paths, &held).map(|g| format!(" of guest {g}")).unwrap_or_default()
            ),
            other => format!("{}: sanlock lease {lease}: {}", spec.what, crate::error_chain(other)),
        }
    }

    /// `WHAT is locked MODE through sanlock by host NAME (sanlock host_id N)`, or `by guest G on
    /// host ...` when the holder is on this host.
    fn busy_line(&mut self, sanlock: &Sanlock, lease: &HeldLease, owners: Option<&Owners>) -> String {
        let Some(owners) = owners.filter(|o| !o.hosts.is_empty()) else {
            return format!(
                "{} is locked through sanlock ({}), by a host sanlock does not name (its owner record is being written)",
                lease.what,
                lease.display()
            );
        };
        let mode = if owners.shared { LockMode::Shared } else { LockMode::Exclusive };
        let hosts = self.hosts_phrase(sanlock, lease, owners);
        format!("{} is locked {} through sanlock by {hosts}", lease.what, mode.adverb())
    }

    /// `host NAME (sanlock host_id N)` per owner (`guest G on ...` when on this host). A name
    /// comes from the host table, which each host writes for itself.
    fn hosts_phrase(&mut self, sanlock: &Sanlock, lease: &HeldLease, owners: &Owners) -> String {
        let area = self.area(sanlock).ok().cloned();
        let hosts: Vec<String> = owners
            .hosts
            .iter()
            .map(|o| {
                let name = area.as_ref().and_then(|a| hosts::read_one(a, o.host_id).ok().flatten());
                let host = match name {
                    Some(name) => format!("host {name} (sanlock host_id {})", o.host_id),
                    None => format!("sanlock host_id {}", o.host_id),
                };
                match (o.host_id == self.config.host_id).then(|| local_holder(&self.paths, lease)).flatten() {
                    Some(guest) => format!("guest {guest} on {host}"),
                    None => host,
                }
            })
            .collect();
        hosts.join(", ")
    }
}

/// The one host holding the first of `pending` (the migration source).
fn source_of(sanlock: &Sanlock, pending: &[HeldLease]) -> Option<u64> {
    let owners = sanlock.read_resource_owners(&pending.first()?.lease()?).ok()?;
    owners.hosts.first().map(|o| o.host_id)
}

/// One spec per lease (`at`), in the strongest mode asked: a client cannot acquire one lease
/// twice.
fn strongest(specs: &[LeaseSpec]) -> Vec<LeaseSpec> {
    let mut out: Vec<LeaseSpec> = Vec::with_capacity(specs.len());
    for spec in specs {
        match out.iter_mut().find(|s| s.at == spec.at) {
            Some(seen) if spec.mode == LockMode::Exclusive => seen.mode = LockMode::Exclusive,
            Some(_) => {}
            None => out.push(spec.clone()),
        }
    }
    out
}

/// The guest on this host whose holder holds `lease`, as its state file says.
fn local_holder(paths: &Paths, lease: &HeldLease) -> Option<String> {
    let entries = crate::state::list(paths).ok()?;
    entries.into_iter().filter(|e| e.alive).find_map(|e| {
        let state = e.state.ok()?;
        state
            .sanlock
            .iter()
            .any(|h| {
                h.lockspace == lease.lockspace
                    && h.name == lease.name
                    && h.path == lease.path
                    && h.offset == lease.offset
            })
            .then(|| format!("{} ({})", state.name, state.uuid))
    })
}

/// How often an index operation is retried while another host (or process) updates the index.
const INDEX_TRIES: u32 = 20;
const INDEX_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The offset of `name` in the index, creating its entry when there is none. Creation races
/// between hosts leave two entries; every host uses the first (see `sanlock::rindex`).
pub fn find_or_create(sanlock: &Sanlock, rindex: &crate::sanlock::Rindex, name: &Name) -> Result<u64, SanlockError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let result = match sanlock.lookup_rindex(rindex, name) {
            Ok(Some(offset)) => return Ok(offset),
            Ok(None) => sanlock.create_resource(rindex, name).and_then(|_| {
                sanlock.lookup_rindex(rindex, name)?.ok_or(SanlockError::LookupRindex {
                    name: name.clone(),
                    path: rindex.disk.path.clone(),
                    code: Code::Os(nix::errno::Errno::ENOENT),
                })
            }),
            Err(e) => Err(e),
        };
        match result {
            Ok(offset) => return Ok(offset),
            Err(e) if tries < INDEX_TRIES && retryable(&e) => std::thread::sleep(INDEX_RETRY),
            Err(e) => return Err(e),
        }
    }
}

fn retryable(e: &SanlockError) -> bool {
    let code = match e {
        SanlockError::CreateResource { code, .. } | SanlockError::LookupRindex { code, .. } => *code,
        _ => return false,
    };
    code == Code::Os(nix::errno::Errno::EBUSY) || code.held_elsewhere()
}

/// libvirt's disk lease file exists and is initialised: created `O_EXCL` 0600 and written as
/// libvirt's driver does when missing; one another host is initialising right now reads as not
/// yet a lease for a moment.
fn ensure_libvirt_lease(sanlock: &Sanlock, lease: &Lease) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = &lease.disk.path;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    match created {
        Ok(_) => sanlock.write_resource(lease, Geometry::Auto).map_err(|e| {
            let _ = std::fs::remove_file(path);
            format!("cannot initialise libvirt's disk lease {}: {}", path.display(), crate::error_chain(&e))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create libvirt's disk lease {}: {e}", path.display())),
    }
}

/// Releases the orphans this host still holds of `leases` (a holder died and its guest is gone
/// too): adopted by a client of our own with `ORPHAN_ONLY`, then released. Leases that are not
/// orphans of this host are left alone.
pub fn release_orphans(leases: &[HeldLease]) -> Result<usize, String> {
    if leases.is_empty() {
        return Ok(0);
    }
    let sanlock = Sanlock::load().map_err(|e| e.to_string())?;
    let mut client = sanlock.register().map_err(|e| crate::error_chain(&e))?;
    let options = AcquireOptions { persistent: true, orphans_only: true, ..AcquireOptions::default() };
    let mut released = 0;
    for held in leases {
        let Some(lease) = held.lease() else { continue };
        let request = LeaseRequest { lease: lease.clone(), mode: held.mode, lver: None };
        match client.acquire(&[request], &options) {
            Ok(()) => {
                client.release(std::slice::from_ref(&lease)).map_err(|e| crate::error_chain(&e))?;
                released += 1;
            }
            // Not an orphan of this host (released already, or never held): nothing to do.
            Err(SanlockError::Acquire { code: Code::Os(nix::errno::Errno::ENOENT), .. }) => {}
            Err(e) if e.is_busy() => {}
            Err(e) => return Err(format!("sanlock lease {}: {}", held.display(), crate::error_chain(&e))),
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str, mode: LockMode) -> LeaseSpec {
        LeaseSpec { what: key.into(), mode, at: LeaseAt::Key { key: key.into() }, place: None }
    }

    #[test]
    fn one_spec_per_lease_in_the_strongest_mode() {
        let got = strongest(&[
            spec("a", LockMode::Shared),
            spec("b", LockMode::Shared),
            spec("a", LockMode::Exclusive),
            spec("b", LockMode::Shared),
        ]);
        assert_eq!(got, vec![spec("a", LockMode::Exclusive), spec("b", LockMode::Shared)]);
    }

    fn leases_for(uuid: &str) -> Leases {
        Leases::new(
            &SanlockConfig::default(),
            &Paths::new(std::path::Path::new("/nonexistent")),
            &crate::domain::Uuid::parse(uuid).expect("uuid"),
        )
    }

    #[test]
    fn the_manifest_names_exactly_the_exclusive_set_of_one_guest() {
        let u1 = "6f1d3c2a-1b2c-4d5e-8f90-0a1b2c3d4e5f";
        let u2 = "7f1d3c2a-1b2c-4d5e-8f90-0a1b2c3d4e5f";
        let ex = |k: &str| (LockMode::Exclusive, LeaseAt::Key { key: k.into() });
        let sh = |k: &str| (LockMode::Shared, LeaseAt::Key { key: k.into() });
        let name = |uuid: &str, set: Vec<(LockMode, LeaseAt)>| leases_for(uuid).manifest_name(set.into_iter());
        let base = name(u1, vec![ex("file:/a@0"), ex("net:nbd://x"), ex(&format!("guest:{u1}"))]);
        assert!(base.starts_with(MANIFEST) && base.len() == MANIFEST.len() + 32, "{base}");
        // Order, duplicates, shared leases, the guest's own lease and a manifest do not count.
        assert_eq!(base, name(u1, vec![ex("net:nbd://x"), sh("block:fs"), ex("file:/a@0"), ex("file:/a@0")]));
        assert_eq!(base, name(u1, vec![ex("net:nbd://x"), ex("file:/a@0"), ex(&format!("{MANIFEST}00"))]));
        // Another image, one image fewer, or another guest: another manifest.
        assert_ne!(base, name(u1, vec![ex("file:/b@0"), ex("net:nbd://x")]));
        assert_ne!(base, name(u1, vec![ex("net:nbd://x")]));
        assert_ne!(base, name(u2, vec![ex("file:/a@0"), ex("net:nbd://x")]));
        let lease = (
            LockMode::Exclusive,
            LeaseAt::Fixed { lockspace: "ls".into(), name: "k".into(), path: "/l".into(), offset: 0 },
        );
        assert_ne!(base, name(u1, vec![ex("file:/a@0"), ex("net:nbd://x"), lease]));
    }

    #[test]
    fn held_shared_is_not_held_exclusive() {
        let mut leases = Leases::new(
            &SanlockConfig::default(),
            &Paths::new(std::path::Path::new("/nonexistent")),
            &crate::domain::Uuid::parse("6f1d3c2a-1b2c-4d5e-8f90-0a1b2c3d4e5f").expect("uuid"),
        );
        let lease = Lease { lockspace: Name::fit("lockhook"), name: Name::fit("a"), disk: Disk::new("/x", 4 << 20) };
        leases.held.push(HeldLease::new(&spec("a", LockMode::Shared), &lease));
        assert!(leases.knows(&spec("a", LockMode::Shared)));
        assert!(!leases.knows(&spec("a", LockMode::Exclusive)));
        assert!(!leases.knows(&spec("b", LockMode::Shared)));
        // A re-adopted lease (same `at`, a known place) is the same lease.
        let again = leases.held[0].spec();
        assert!(leases.knows(&again));
        assert_eq!(again.place.as_ref().map(|p| p.offset), Some(4 << 20));
    }
}
