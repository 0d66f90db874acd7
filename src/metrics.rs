//! `lockhook metrics`: this host's locks in Prometheus' text exposition format, from the
//! holders' state files (what `lockhook status` reads), for a scrape through node_exporter's
//! textfile collector (`--textfile PATH`, written atomically: a temp file renamed over PATH).
//!
//! Gauges, each a snapshot of now: guests by holder state, resources by mode and kind, pending
//! migration hand-overs, hot-plug conflicts, holders by release; and two counters since boot
//! (`counters`): refused starts and re-adoptions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use crate::paths::Paths;
use crate::state::{self, HolderKind};

/// The exposition text for the holders in `paths`' run directory.
pub fn render(paths: &Paths) -> io::Result<String> {
    let entries = state::list(paths)?;
    let mut guests: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut resources: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let (mut pending, mut conflicts, mut unreadable) = (0u64, 0u64, 0u64);
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for entry in &entries {
        let Ok(s) = &entry.state else {
            unreadable += 1;
            continue;
        };
        let kind = match s.kind {
            HolderKind::Guest => "guest",
            HolderKind::Command => "command",
        };
        *guests.entry((kind, if entry.alive { "held" } else { "stale" })).or_default() += 1;
        if !entry.alive {
            continue; // a dead holder's locks are gone: counted as a stale guest only
        }
        let version = s.holder_version.clone().unwrap_or_else(|| "older than 0.2".to_owned());
        *versions.entry(version.chars().filter(|c| !matches!(c, '"' | '\\' | '\n')).collect()).or_default() += 1;
        for r in &s.resources {
            let what = match r.lock_file {
                Some(crate::lockspace::LockFileKind::Network) => "network",
                Some(crate::lockspace::LockFileKind::Block) => "block_identity",
                Some(crate::lockspace::LockFileKind::Lease) => "lease",
                None => r.roles.first().map_or("disk", |role| role.kind()),
            };
            *resources.entry((r.mode.as_str(), what)).or_default() += 1;
        }
        pending += s.pending.len() as u64;
        conflicts += s.conflicts.len() as u64;
    }
    let mut out = String::new();
    family(
        &mut out,
        "lockhook_guests",
        "Guests (and lockhook run commands) with a holder on this host, by whether it is alive.",
    );
    for state in ["held", "stale"] {
        for kind in ["guest", "command"] {
            let n = guests.get(&(kind, state)).copied().unwrap_or(0);
            let _ = writeln!(out, "lockhook_guests{{kind=\"{kind}\",state=\"{state}\"}} {n}");
        }
    }
    family(&mut out, "lockhook_resources", "Resources locked on this host, by lock mode and kind.");
    for ((mode, kind), n) in &resources {
        let _ = writeln!(out, "lockhook_resources{{mode=\"{mode}\",kind=\"{kind}\"}} {n}");
    }
    family(
        &mut out,
        "lockhook_pending_handovers",
        "Resources an incoming migration waits for (held by the source host).",
    );
    let _ = writeln!(out, "lockhook_pending_handovers {pending}");
    family(&mut out, "lockhook_hotplug_conflicts", "Hot-plugged resources a guest wants and someone else holds.");
    let _ = writeln!(out, "lockhook_hotplug_conflicts {conflicts}");
    family(&mut out, "lockhook_unreadable_state_files", "State files in the run directory that cannot be read.");
    let _ = writeln!(out, "lockhook_unreadable_state_files {unreadable}");
    family(&mut out, "lockhook_holders", "Live holders on this host, by the lockhook release they run.");
    for (version, n) in &versions {
        let _ = writeln!(out, "lockhook_holders{{version=\"{version}\"}} {n}");
    }
    for (counter, value) in crate::counters::read(paths) {
        let (name, help) = match counter {
            crate::counters::Counter::Refusals => {
                ("lockhook_refusals_total", "Guest starts refused on this host since boot.")
            }
            crate::counters::Counter::Readoptions => {
                ("lockhook_readoptions_total", "Running guests re-adopted after their holder died, since boot.")
            }
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    Ok(out)
}

fn family(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

/// Writes `text` to `path` atomically (a temp file beside it, renamed over it), world-readable
/// as node_exporter's textfile collector expects.
pub fn write_textfile(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = path.with_file_name(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let written =
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_host_has_every_family_at_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let text = render(&Paths::new(dir.path())).expect("render");
        assert!(text.contains("lockhook_guests{kind=\"guest\",state=\"held\"} 0"), "{text}");
        assert!(text.contains("# TYPE lockhook_resources gauge"));
        assert!(text.contains("lockhook_pending_handovers 0"));
        let file = dir.path().join("lockhook.prom");
        write_textfile(&file, &text).expect("write");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), text);
        write_textfile(&file, "x 1\n").expect("replace");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "x 1\n");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1, "no temp file left");
    }
}
