//! Self-healing: re-adopting running guests whose holder is gone (OOM killer, `kill -9`), and
//! letting go of holders and records whose guest is gone.
//!
//! Every hook call first runs `adopt_orphans`, a cheap pass over the run directory (one probe of
//! each holder's instance lock); `lockhook reconcile` (and its systemd timer) runs `reconcile`,
//! which also walks libvirt's status files, so even a guest whose state file was lost is found.

use std::path::Path;

use log::{error, info, warn};

use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::guest::{self, Ctx};
use crate::holder::client::Client;
use crate::holder::protocol::Guest;
use crate::paths::Paths;
use crate::state::{self, GuestState, HolderKind};
use crate::target::LockTarget;

/// What a pass did, one line per action.
#[derive(Debug, Default)]
pub struct Report {
    pub adopted: Vec<String>,
    pub released: Vec<String>,
    pub cleaned: Vec<String>,
    pub failed: Vec<String>,
}

/// What a dead holder held, to take again.
fn targets_of(state: &GuestState) -> Vec<LockTarget> {
    state.resources.iter().flat_map(|r| r.targets()).collect()
}

fn remove_records(paths: &Paths, uuid: &Uuid) {
    let _ = std::fs::remove_file(paths.state(uuid));
    let _ = std::fs::remove_file(paths.socket(uuid));
    // The dead holder's instance lock file too: taken (so no holder of this guest runs), checked
    // to be the file at the path, and removed while locked (see `rundir::lock_instance_file`).
    let lock = paths.instance_lock(uuid);
    if let Ok(held) = crate::rundir::lock_instance_file(&lock) {
        crate::rundir::remove_instance_file(&lock, &held);
    }
}

/// Inodes (on device `dev`) that carry an OFD write lock on byte 0, from one read of
/// `/proc/locks`; `None` when it cannot be read.
fn ofd_locked_inodes(dev: u64) -> Option<std::collections::HashSet<u64>> {
    use crate::lock::proc_locks::{self, Kind};
    let dev = (libc::major(dev), libc::minor(dev));
    Some(
        proc_locks::read()?
            .into_iter()
            .filter(|l| l.kind == Kind::Ofd && l.mode == crate::lock::LockMode::Exclusive && l.start == 0)
            .filter(|l| l.dev == dev)
            .map(|l| l.ino)
            .collect(),
    )
}

/// UUIDs whose holder is dead (its instance lock is free). One directory read and one read of
/// `/proc/locks`, whatever the number of guests: this runs at every hook call.
fn dead_holders(paths: &Paths) -> Vec<Uuid> {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let Ok(dir) = std::fs::read_dir(paths.run_dir()) else { return Vec::new() };
    let mut states = Vec::new();
    let mut lock_inodes = std::collections::HashMap::new();
    for entry in dir.flatten() {
        let path = entry.path();
        if let Some(uuid) = Paths::uuid_of(&path, "json") {
            states.push(uuid);
        } else if let Some(uuid) = Paths::uuid_of(&path, "lock") {
            lock_inodes.insert(uuid, entry.ino());
        }
    }
    if states.is_empty() {
        return states;
    }
    let locked = std::fs::metadata(paths.run_dir()).ok().and_then(|m| ofd_locked_inodes(m.dev()));
    states
        .into_iter()
        .filter(|uuid| match (&locked, lock_inodes.get(uuid)) {
            (Some(locked), Some(ino)) if locked.contains(ino) => false,
            // Not (visibly) locked: confirm with a probe before calling the holder dead.
            _ => !state::holder_alive(paths, uuid),
        })
        .collect()
}

/// Re-takes the locks of every running guest whose holder died, from its state file; removes
/// the records of holders whose guest (or `lockhook run` command) is gone too.
/// A hook call runs it only when the census says a holder died (see `census` and
/// `hook::adopt_orphans_bounded`); `lockhook reconcile` always does (holders of older versions
/// are not counted).
pub(crate) fn adopt_orphans(ctx: &Ctx, skip: Option<&Uuid>) -> Report {
    let mut report = Report::default();
    for uuid in dead_holders(&ctx.paths).into_iter().filter(|u| Some(u) != skip) {
        // Exactly one pass deals with a dead holder: the one that claims its state file, which
        // also retires it from the census.
        let Some(claimed) = crate::census::claim_dead(&ctx.paths, &ctx.paths.state(&uuid)) else { continue };
        let record = state::read(&claimed);
        let _ = std::fs::remove_file(&claimed);
        let Ok(record) = record else {
            remove_records(&ctx.paths, &uuid);
            report.cleaned.push(format!("{uuid}: unreadable state of a dead holder removed"));
            continue;
        };
        let qemu = match (record.kind, record.qemu_pid, record.qemu_start_time) {
            (HolderKind::Guest, Some(pid), Some(start)) if crate::qemu::is_alive(pid, start) => Some((pid, start)),
            _ => None,
        };
        let Some(qemu) = qemu else {
            // Its persistent sanlock leases outlived it as orphans of this host: let them go.
            match crate::engine::leases::release_orphans(&record.sanlock) {
                Ok(0) => {}
                Ok(n) => {
                    report.released.push(format!("{} ({uuid}): {n} orphaned sanlock lease(s) released", record.name))
                }
                Err(e) => {
                    // Put back on record (uncounted now): the reconcile timer's full pass retries.
                    let _ = state::write(&ctx.paths.state(&uuid), &record);
                    report.failed.push(format!("{} ({uuid}): orphaned sanlock leases: {e}", record.name));
                    continue;
                }
            }
            remove_records(&ctx.paths, &uuid);
            report.cleaned.push(format!("{} ({uuid}): holder and guest are gone; record removed", record.name));
            continue;
        };
        let guest = Guest { name: record.name.clone(), uuid: uuid.clone() };
        warn!("guest {} ({uuid}) runs but its holder died; re-taking its locks", record.name);
        // Its sanlock leases are orphans of this host now: the new holder adopts them.
        let leases: Vec<_> = record.sanlock.iter().map(crate::engine::leases::HeldLease::spec).collect();
        match guest::adopt(ctx, &guest, &targets_of(&record), &leases, Some(qemu)) {
            Ok(()) => {
                crate::counters::add(&ctx.paths, crate::counters::Counter::Readoptions, 1);
                report.adopted.push(format!("{} ({uuid}): locks re-taken", record.name))
            }
            Err(e) => {
                let lines = e.lines().join("; ");
                error!("guest {} ({uuid}): could not re-take every lock: {lines}", record.name);
                report.failed.push(format!("{} ({uuid}): {lines}", record.name));
            }
        }
    }
    report
}

/// The running guests libvirt knows about: status files whose QEMU process is alive.
fn running_guests(libvirt_run_dir: &Path) -> Vec<(Domain, (u32, u64))> {
    let Ok(dir) = std::fs::read_dir(crate::libvirt::guests_dir(libvirt_run_dir)) else { return Vec::new() };
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        if path.extension()? != "xml" {
            return None;
        }
        let domain = Domain::parse_status(&std::fs::read(&path).ok()?).ok()?;
        let qemu = crate::qemu::find(&domain.name, &domain.uuid, libvirt_run_dir)?;
        Some((domain, qemu))
    })
    .collect()
}

/// The full pass of `lockhook reconcile`.
pub fn reconcile(config: &Config, config_path: &Path) -> Report {
    let ctx = Ctx::new(config.clone(), config_path);
    let mut report = adopt_orphans(&ctx, None);
    // Offers of shared locks of holders that are gone (killed before they could withdraw them,
    // whether the census saw them die or not).
    crate::shares::sweep(&ctx.paths);
    let running = running_guests(&config.libvirt_run_dir);
    for (domain, qemu) in &running {
        let had_holder = state::holder_alive(&ctx.paths, &domain.uuid);
        match guest::ensure_running(&ctx, domain, Some(*qemu)) {
            Ok(()) if !had_holder => report.adopted.push(format!("{} ({}): locks taken", domain.name, domain.uuid)),
            Ok(()) => {}
            Err(e) => report.failed.push(format!("{} ({}): {}", domain.name, domain.uuid, e.lines().join("; "))),
        }
    }
    // Holders whose guest is gone: QEMU dead (a holder notices that itself, unless it cannot
    // watch it) or never started and unknown to libvirt.
    for entry in state::list(&ctx.paths).unwrap_or_default() {
        let Ok(record) = entry.state else { continue };
        if !entry.alive || record.kind != HolderKind::Guest || running.iter().any(|(d, _)| d.uuid == record.uuid) {
            continue;
        }
        let qemu_alive =
            matches!((record.qemu_pid, record.qemu_start_time), (Some(p), Some(s)) if crate::qemu::is_alive(p, s));
        if qemu_alive || crate::qemu::find(&record.name, &record.uuid, &config.libvirt_run_dir).is_some() {
            continue;
        }
        let Ok(Some(client)) = Client::connect(&ctx.paths, &record.uuid) else { continue };
        // A guest between `prepare` and `started` has a holder and no QEMU yet: leave young
        // holders alone. Their age is the holder's own (monotonic), never the wall clock.
        let young = client.held().map_or(true, |held| held.age < guest::START_GRACE.as_secs());
        if record.qemu_pid.is_none() && young {
            continue;
        }
        match client.release() {
            Ok(()) => {
                info!("guest {} ({}): not running; its holder released", record.name, record.uuid);
                report.released.push(format!("{} ({}): guest not running; locks released", record.name, record.uuid));
            }
            Err(e) => report.failed.push(format!("{} ({}): {}", record.name, record.uuid, crate::error_chain(&e))),
        }
    }
    report
}

impl Report {
    pub fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for (what, lines) in [
            ("adopted", &self.adopted),
            ("released", &self.released),
            ("cleaned", &self.cleaned),
            ("FAILED", &self.failed),
        ] {
            for line in lines {
                writeln!(out, "{what}: {}", crate::one_line(line))?;
            }
        }
        if self.adopted.is_empty() && self.released.is_empty() && self.cleaned.is_empty() && self.failed.is_empty() {
            writeln!(out, "nothing to do: every running guest's locks are held")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::lock::{self, Create, LockMode};

    #[test]
    fn proc_locks_shows_ofd_write_locks_on_byte_0() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let meta = file.as_file().metadata().expect("meta");
        assert!(!ofd_locked_inodes(meta.dev()).expect("/proc/locks").contains(&meta.ino()));
        let held = lock::acquire(file.path(), LockMode::Exclusive, 0, Create::No).expect("lock");
        assert!(ofd_locked_inodes(meta.dev()).expect("/proc/locks").contains(&meta.ino()));
        drop(held);
        assert!(!ofd_locked_inodes(meta.dev()).expect("/proc/locks").contains(&meta.ino()));
    }
}
