//! The `daemon` check: libvirtd and virtqemud look for hooks only when they start and on SIGHUP,
//! so a daemon that started before lockhook was installed, and has not been sent SIGHUP since,
//! does not run it: guests start unlocked without a word. `install.sh` sends SIGHUP and touches
//! `<run_dir>/hup.<pid>` to say so.
//!
//! Only daemons in this process's mount namespace are judged (a test libvirtd in a private
//! namespace is not ours); of any other process nothing is read beyond its namespace link.

use std::fs;
use std::io;
use std::path::Path;

use super::hook::InstalledHook;
use super::{Finding, Severity};

/// The daemons that run qemu hooks: the monolithic one and the modular QEMU driver daemon.
pub(super) const DAEMONS: [&str; 2] = ["libvirtd", "virtqemud"];
/// A hook installed less than this after the daemon's computed start is not reported: the start
/// time is computed as now minus uptime plus the start tick, so a clock step since the hook was
/// stamped, and tick and timestamp granularity, shift it a little.
const CLOCK_SLACK_MS: u64 = 1000;

#[derive(Debug)]
struct Daemon {
    name: String,
    pid: u32,
    started_ms: u64,
}

/// The libvirtd/virtqemud processes in this process's mount namespace. Processes in any other
/// namespace are skipped after reading only their namespace link.
fn running_daemons() -> io::Result<Vec<Daemon>> {
    let own_ns = fs::read_link("/proc/self/ns/mnt")?;
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry.ok().and_then(|e| e.file_name().to_str()?.parse::<u32>().ok()) else { continue };
        if fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().as_ref() != Some(&own_ns) {
            continue;
        }
        let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else { continue };
        let name = comm.trim();
        if !DAEMONS.contains(&name) {
            continue;
        }
        // Wall-clock time of the start: now minus the time since boot plus the start tick.
        let Some(started) = crate::qemu::start_time(pid).and_then(crate::qemu::started_at) else { continue };
        let started_ms = started
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        found.push(Daemon { name: name.to_owned(), pid, started_ms });
    }
    found.sort_by_key(|d| d.pid);
    Ok(found)
}

/// When `install.sh` sent SIGHUP to daemon `pid` (it touches `<run_dir>/hup.<pid>`), in ms.
fn hup_ms(run_dir: &Path, pid: u32) -> Option<u64> {
    let modified = fs::metadata(run_dir.join(format!("hup.{pid}"))).ok()?.modified().ok()?;
    u64::try_from(modified.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()
}

/// Reports, for each daemon, whether it has found the installed hooks.
pub(super) fn check(hooks: &[InstalledHook], run_dir: &Path, out: &mut Vec<Finding>) {
    const CHECK: &str = "daemon";
    let daemons = match running_daemons() {
        Ok(daemons) => daemons,
        Err(e) => {
            out.push(Finding::new(Severity::Info, CHECK, format!("cannot list processes: {e}: daemons not checked")));
            return;
        }
    };
    if daemons.is_empty() {
        out.push(Finding::new(
            Severity::Info,
            CHECK,
            "libvirtd/virtqemud not running (in this mount namespace): it finds the hook when it starts",
        ));
        return;
    }
    // libvirt runs lockhook if any of its entries existed when the daemon (re)scanned its hooks.
    let Some(first) = hooks.iter().min_by_key(|h| h.installed_ms) else {
        for d in &daemons {
            out.push(Finding::new(
                Severity::Info,
                CHECK,
                format!("{} (pid {}) is running; once the hook is installed it needs SIGHUP to find it", d.name, d.pid),
            ));
        }
        return;
    };
    for d in &daemons {
        let since = crate::clock::rfc3339(d.started_ms / 1000);
        if let Some(hup) = hup_ms(run_dir, d.pid).filter(|hup| *hup + CLOCK_SLACK_MS >= first.installed_ms) {
            out.push(Finding::new(
                Severity::Ok,
                CHECK,
                format!(
                    "{} (pid {}) was sent SIGHUP by the installer (install.sh or the package) at {}, after the hook was installed",
                    d.name,
                    d.pid,
                    crate::clock::rfc3339(hup / 1000)
                ),
            ));
        } else if first.installed_ms > d.started_ms + CLOCK_SLACK_MS {
            out.push(Finding::new(
                Severity::Warn,
                CHECK,
                format!(
                    "{name} (pid {pid}) started at {since}, before the hook was installed ({path} at {at}); it finds \
                     hooks only at start or SIGHUP, so unless it was sent SIGHUP since, it does not run lockhook: \
                     `systemctl reload {name}` or `kill -HUP {pid}`",
                    name = d.name,
                    pid = d.pid,
                    path = first.path.display(),
                    at = crate::clock::rfc3339(first.installed_ms / 1000),
                ),
            ));
        } else {
            out.push(Finding::new(
                Severity::Ok,
                CHECK,
                format!("{} (pid {}) started at {since}, after the hook was installed", d.name, d.pid),
            ));
        }
    }
}
