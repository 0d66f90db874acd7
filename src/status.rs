//! `lockhook status`: what every holder on this host holds, from the holders' state files.

use std::io::Write;

use serde::Serialize;

use crate::paths::Paths;
use crate::state::{self, GuestState};

#[derive(Serialize)]
struct JsonEntry<'a> {
    #[serde(flatten)]
    state: &'a GuestState,
    holder_alive: bool,
}

#[derive(Serialize)]
struct JsonBroken {
    uuid: String,
    error: String,
}

/// Writes the status report; `json` selects machine-readable output.
pub fn print(paths: &Paths, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let entries = state::list(paths)?;
    if json {
        let mut guests = Vec::new();
        let mut broken = Vec::new();
        for e in &entries {
            match &e.state {
                Ok(state) => guests.push(JsonEntry { state, holder_alive: e.alive }),
                Err(err) => broken.push(JsonBroken { uuid: e.uuid.to_string(), error: crate::error_chain(err) }),
            }
        }
        let doc = serde_json::json!({ "host": state::hostname(), "guests": guests, "unreadable": broken });
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        return writeln!(out);
    }
    if entries.is_empty() {
        return writeln!(out, "lockhook holds no locks on this host");
    }
    for e in &entries {
        match &e.state {
            Ok(s) => {
                let qemu = s.qemu_pid.map_or_else(|| "not started".to_owned(), |p| p.to_string());
                let what = match s.kind {
                    crate::state::HolderKind::Guest => "guest",
                    crate::state::HolderKind::Command => "command",
                };
                let version = s.holder_version.as_deref().map_or_else(|| "older than 0.2".to_owned(), crate::one_line);
                writeln!(
                    out,
                    "{what} {} ({}) holder pid {} (lockhook {version}) qemu pid {qemu} since {}",
                    crate::one_line(&s.name),
                    s.uuid,
                    s.holder_pid,
                    s.since
                )?;
                if !e.alive {
                    writeln!(out, "  STALE: the holder is gone, so these locks are NOT held")?;
                }
                for p in &s.pending {
                    writeln!(
                        out,
                        "  PENDING   {} {}  (incoming migration: taken when the source host lets go)",
                        p.mode.as_str(),
                        crate::one_line(&p.name())
                    )?;
                }
                for c in &s.conflicts {
                    writeln!(
                        out,
                        "  CONFLICT  {} wanted {} but it {} (since {})",
                        crate::one_line(&c.path.display().to_string()),
                        c.mode.as_str(),
                        crate::one_line(&c.held_by),
                        c.since
                    )?;
                }
                for r in &s.resources {
                    let roles =
                        crate::one_line(&r.roles.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "));
                    let offset =
                        if r.identity.offset == 0 { String::new() } else { format!(" @{}", r.identity.offset) };
                    writeln!(
                        out,
                        "  {:<9} {}{offset}  ({roles}) since {}",
                        r.mode.as_str(),
                        crate::one_line(&r.name()),
                        r.since
                    )?;
                }
                for (l, pending) in
                    s.sanlock.iter().map(|l| (l, "")).chain(
                        s.sanlock_pending.iter().map(|l| (l, "  PENDING: taken when the migration source lets go")),
                    )
                {
                    writeln!(
                        out,
                        "  sanlock   {} {}  ({}){pending}",
                        l.mode.as_str(),
                        crate::one_line(&l.display()),
                        crate::one_line(&l.what)
                    )?;
                }
            }
            Err(err) => writeln!(out, "guest {}: unreadable state: {}", e.uuid, crate::error_chain(err))?,
        }
    }
    Ok(())
}

/// `lockhook status --fleet`: every guest and resource held on every host sharing the
/// lockspace, from the owner records alone (no other host is contacted). Records whose holder is
/// gone are shown as STALE: that host's guest may have crashed with it, or the host itself.
pub fn print_fleet(lockspace: &crate::lockspace::Lockspace, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let seen = lockspace.all_records().map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &serde_json::json!({ "records": seen }))?;
        return writeln!(out);
    }
    if seen.is_empty() {
        return writeln!(out, "no owner records in the lockspace: nothing is held on any host sharing it");
    }
    let mut last: Option<(&str, &str, &crate::domain::Uuid)> = None;
    for s in &seen {
        let r = &s.record;
        if last != Some((r.host.as_str(), r.guest.as_str(), &r.uuid)) {
            let what = if r.command { "command" } else { "guest" };
            writeln!(out, "host {} {what} {} ({})", crate::one_line(&r.host), crate::one_line(&r.guest), r.uuid)?;
            last = Some((r.host.as_str(), r.guest.as_str(), &r.uuid));
        }
        let role = r.role.as_deref().map(|role| format!(" ({})", crate::one_line(role))).unwrap_or_default();
        let stale = if s.live { "" } else { "  STALE: its holder is gone" };
        writeln!(
            out,
            "  {:<9} {}{role}  since {} (holder pid {}){stale}",
            r.mode.as_str(),
            crate::one_line(&r.key),
            r.since,
            r.holder_pid
        )?;
    }
    Ok(())
}
