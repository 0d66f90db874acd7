//! Incoming live migration: when a lock the same guest holds on another host may be accepted as
//! *pending* (taken by the destination holder the moment the source lets go), and how a plain
//! start is told apart from a real migration.
//!
//! libvirt's hook order on the destination of a live migration is `migrate begin`, `prepare`,
//! `start`, `started` (QEMU runs with `-incoming defer`, paused, its images inactive), and only
//! after the RAM copy does it resume the guest (no hook). The source's `release` comes after
//! that. So the destination must accept the source's locks as pending, but nothing else may:
//! - `migrate begin` writes a marker `<run_dir>/<uuid>.incoming` (the time, in ms);
//! - the `prepare` that follows *consumes* it: only a marker younger than `MARKER_TTL` counts,
//!   and it is removed whatever its age, so a marker left by an offline migration (`virsh
//!   migrate --offline` runs `migrate begin` and nothing else) or by a migration that failed
//!   before `prepare` weakens at most a start made within seconds of it;
//! - that residue is closed by the QEMU process itself: a guest with pending locks must be an
//!   incoming migration, whose QEMU carries `-incoming` on its command line. The holder checks
//!   the QEMU libvirt starts for it as soon as it has exec'd, while QEMU still waits on `-S` for
//!   libvirt's `cont`, and kills it when it is not incoming; `started` checks it again and
//!   fails (libvirt then stops the guest) if the holder had not;
//! - a holder with pending locks whose QEMU never shows up gives up after `PENDING_BOUND`.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use log::warn;

use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::lockset::Busy;
use crate::paths::Paths;

/// How long after `migrate begin` its marker counts (the destination's `prepare` follows it at
/// once, in the same libvirt call).
pub const MARKER_TTL: Duration = Duration::from_secs(5);

/// A destination holder with pending locks and no QEMU gives up this long after its start.
pub const PENDING_BOUND: Duration = Duration::from_secs(60);

/// Milliseconds since boot (`CLOCK_BOOTTIME`): a marker's age must not depend on the wall
/// clock, which an administrator or NTP may step.
fn now_ms() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| u128::try_from(t.tv_sec()).unwrap_or(0) * 1000 + u128::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000)
        .unwrap_or(0)
}

/// `migrate begin`: notes that an incoming migration of `uuid` is being prepared.
pub fn note_incoming(paths: &Paths, uuid: &Uuid) -> std::io::Result<()> {
    let path = paths.incoming(uuid);
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)?;
    std::io::Write::write_all(&mut file, now_ms().to_string().as_bytes())
}

/// `prepare`: whether a fresh marker says this start is an incoming migration. The marker is
/// consumed: a later start never sees it.
pub fn take_incoming(paths: &Paths, uuid: &Uuid) -> bool {
    let path = paths.incoming(uuid);
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
    else {
        return false;
    };
    let _ = std::fs::remove_file(&path);
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut text = String::new();
    if (&mut file).take(32).read_to_string(&mut text).is_err() {
        return false;
    }
    let Ok(written) = text.trim().parse::<u128>() else { return false };
    let now = now_ms();
    written <= now && now - written < MARKER_TTL.as_millis()
}

/// Drops a marker nobody consumed (the migration ended, or a restore begins: its QEMU carries
/// `-incoming` too, and must not be taken for the migration the marker announced).
pub fn forget_incoming(paths: &Paths, uuid: &Uuid) {
    let _ = std::fs::remove_file(paths.incoming(uuid));
}

/// `prepare` admitted pending locks for `uuid`: noted in the run directory, apart from the
/// holder, so `started` insists on an incoming QEMU even when the holder died or gave up.
pub fn note_admitted(paths: &Paths, uuid: &Uuid) -> std::io::Result<()> {
    let path = paths.admitted(uuid);
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map(drop)
}

/// Whether `prepare` admitted pending locks for `uuid` and no `started` has verified them yet.
pub fn admitted(paths: &Paths, uuid: &Uuid) -> bool {
    std::fs::symlink_metadata(paths.admitted(uuid)).is_ok()
}

pub fn forget_admitted(paths: &Paths, uuid: &Uuid) {
    let _ = std::fs::remove_file(paths.admitted(uuid));
}

/// Why a lock found taken during an incoming migration is not the migrating guest's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotTheSource {
    /// Someone else holds it: the refusal line naming the holder.
    #[error("{0}")]
    HeldByOther(String),
    #[error(
        "{name} is locked and no owner record in {} says by whom, so this incoming migration cannot be verified: \
         share lockspace_dir between the hosts (same path on each), or set trust_migrations = true",
        lockspace.display()
    )]
    Unverifiable { name: String, lockspace: std::path::PathBuf },
}

/// During a verified incoming migration: whether a lock found taken is the migrating guest's
/// own (held by the same UUID on another host, as the owner records show).
pub fn verdict(config: &Config, domain: &Domain, busy: &Busy) -> Result<(), NotTheSource> {
    let owners = crate::lockspace::Lockspace::new(&config.lockspace_dir).owners(&busy.key);
    let here = crate::state::hostname();
    if owners.is_empty() {
        if config.trust_migrations {
            warn!(
                "guest {} ({}): trusting that {} is held by the migration source",
                domain.name, domain.uuid, busy.line
            );
            return Ok(());
        }
        let name = busy.request.label.clone().unwrap_or_else(|| busy.request.path.display().to_string());
        return Err(NotTheSource::Unverifiable { name, lockspace: config.lockspace_dir.clone() });
    }
    if owners.iter().all(|o| o.uuid == domain.uuid && o.host != here) {
        Ok(())
    } else {
        Err(NotTheSource::HeldByOther(busy.line.clone()))
    }
}

/// What a guest's process is, as far as incoming migration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuKind {
    /// Not (yet) QEMU for this guest: libvirt forks first and execs QEMU only after labelling.
    NotYet,
    /// QEMU started with `-incoming` (a migration destination, or a restore).
    Incoming,
    /// QEMU started without `-incoming`: it will run the guest as soon as libvirt says `cont`.
    Plain,
}

/// Why a guest whose holder was admitted pending locks is not an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotIncoming {
    #[error("its QEMU (pid {0}) was not started with -incoming")]
    Plain(u32),
    #[error("its QEMU process cannot be found")]
    NoQemu,
}

/// `started`: a guest admitted with pending locks (see `note_admitted`) must be running as an
/// incoming migration (QEMU with `-incoming`, paused until the switch-over). The note outlives
/// a holder that died or gave up, so one stat decides, with no holder round trip on a plain
/// start. The note is consumed either way.
pub fn check_started(paths: &Paths, domain: &Domain, libvirt_run_dir: &Path) -> Result<(), NotIncoming> {
    if !admitted(paths, &domain.uuid) {
        return Ok(());
    }
    let found = find_qemu(&domain.name, &domain.uuid, libvirt_run_dir);
    forget_admitted(paths, &domain.uuid);
    match found {
        Some((_, QemuKind::Incoming)) => Ok(()),
        Some((pid, _)) => Err(NotIncoming::Plain(pid)),
        None => Err(NotIncoming::NoQemu),
    }
}

/// Classifies process `pid` from its command line.
pub fn qemu_kind(pid: u32, uuid: &Uuid) -> QemuKind {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => classify(&cmdline, uuid),
        Err(_) => QemuKind::NotYet,
    }
}

fn classify(cmdline: &[u8], uuid: &Uuid) -> QemuKind {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    // Before exec the forked child still has libvirtd's command line; QEMU's has `-uuid UUID`.
    let is_ours = args.windows(2).any(|w| w[0] == b"-uuid" && w[1].eq_ignore_ascii_case(uuid.as_str().as_bytes()));
    if !is_ours {
        QemuKind::NotYet
    } else if args.iter().any(|a| *a == b"-incoming") {
        QemuKind::Incoming
    } else {
        QemuKind::Plain
    }
}

/// The QEMU libvirt started for guest `name` (see `qemu::find`: libvirt's pid file, the
/// process's start time and owner), once it has exec'd.
pub fn find_qemu(name: &str, uuid: &Uuid, libvirt_run_dir: &Path) -> Option<(u32, QemuKind)> {
    let (pid, _) = crate::qemu::find(name, uuid, libvirt_run_dir)?;
    match qemu_kind(pid, uuid) {
        QemuKind::NotYet => None,
        kind => Some((pid, kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid() -> Uuid {
        Uuid::parse("f3fa73d4-1c2b-4e5f-8a9b-0123456789ab").expect("uuid")
    }

    #[test]
    fn markers_are_consumed_and_expire() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        assert!(!take_incoming(&paths, &uuid()), "no marker");
        note_incoming(&paths, &uuid()).expect("note");
        assert!(take_incoming(&paths, &uuid()), "fresh marker");
        assert!(!take_incoming(&paths, &uuid()), "consumed");
        let old = now_ms() - MARKER_TTL.as_millis() - 1;
        std::fs::write(paths.incoming(&uuid()), old.to_string()).expect("write");
        assert!(!take_incoming(&paths, &uuid()), "expired");
        assert!(!paths.incoming(&uuid()).exists(), "an expired marker is removed too");
        std::fs::write(paths.incoming(&uuid()), (now_ms() + 60_000).to_string()).expect("write");
        assert!(!take_incoming(&paths, &uuid()), "a marker from the future does not count");
        std::fs::write(paths.incoming(&uuid()), "garbage").expect("write");
        assert!(!take_incoming(&paths, &uuid()));
        let target = dir.path().join("target");
        std::fs::write(&target, now_ms().to_string()).expect("write");
        std::os::unix::fs::symlink(&target, paths.incoming(&uuid())).expect("symlink");
        assert!(!take_incoming(&paths, &uuid()), "a symlinked marker does not count");
    }

    #[test]
    fn command_lines_classify() {
        let u = uuid();
        let line = |args: &[&str]| args.iter().flat_map(|a| a.bytes().chain([0])).collect::<Vec<u8>>();
        assert_eq!(classify(&line(&["/usr/sbin/libvirtd", "-d"]), &u), QemuKind::NotYet);
        assert_eq!(classify(&line(&["qemu-system-x86_64", "-uuid", u.as_str(), "-S"]), &u), QemuKind::Plain);
        assert_eq!(
            classify(&line(&["qemu-system-x86_64", "-uuid", u.as_str(), "-incoming", "defer"]), &u),
            QemuKind::Incoming
        );
        let other = "0e4c9a51-7a2f-4b83-9d4e-5f6a7b8c9d0e";
        assert_eq!(classify(&line(&["qemu", "-uuid", other, "-incoming", "defer"]), &u), QemuKind::NotYet);
    }
}
