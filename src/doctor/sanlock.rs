//! The `sanlock` check (engine = "sanlock" only): the client library loads, the daemon answers,
//! the lease area holds lockhook's lockspace and index, this host has joined it under its
//! host_id (and libvirt's `__LIBVIRT__DISKS__` with `libvirt_disk_lease_dir`), and the host table
//! names this host. Every finding says what to run. Read-only: lookups only.

use crate::config::{Config, Engine};
use crate::engine::area::{self, Area};
use crate::engine::hosts;
use crate::sanlock::{Membership, Name, Sanlock};

use super::{Finding, Severity};

const CHECK: &str = "sanlock";

pub(super) fn check(config: &Config, out: &mut Vec<Finding>) {
    if config.engine != Engine::Sanlock {
        return;
    }
    let mut push = |severity, message: String| out.push(Finding::new(severity, CHECK, message));
    let (Some(path), host_id) = (config.sanlock.lease_area.clone(), config.sanlock.host_id) else {
        push(Severity::Error, "engine = \"sanlock\" but [sanlock] lease_area is not set".into());
        return;
    };
    let sanlock = match Sanlock::load() {
        Ok(s) => s,
        Err(e) => return push(Severity::Error, e.to_string()),
    };
    match sanlock.version() {
        Ok(v) => push(Severity::Ok, format!("sanlock daemon {v} answers")),
        Err(e) => {
            return push(
                Severity::Error,
                format!(
                    "sanlock daemon does not answer ({}): every start is refused; systemctl start sanlock, then \
                     lockhook sanlock join",
                    crate::error_chain(&e)
                ),
            )
        }
    }
    let area = match Area::open(&sanlock, &path) {
        Ok(a) => a,
        Err(e) => return push(Severity::Error, crate::error_chain(&e)),
    };
    match sanlock.lookup_rindex(&area.rindex(), &Name::fit("lockhook-doctor")) {
        Ok(_) => push(Severity::Ok, format!("lease area {}: lockspace and resource index readable", path.display())),
        Err(e) => {
            push(Severity::Error, format!("lease area {}: resource index: {}", path.display(), crate::error_chain(&e)))
        }
    }
    let joined = |ls: &crate::sanlock::Lockspace| match sanlock.inq_lockspace(ls) {
        Ok(Membership::Joined) => (Severity::Ok, "joined".to_owned()),
        Ok(Membership::Changing) => (Severity::Warn, "joining or leaving right now".to_owned()),
        Ok(Membership::Absent) => {
            (Severity::Error, "not joined: every start is refused; run `lockhook sanlock join`".to_owned())
        }
        Err(e) => (Severity::Error, crate::error_chain(&e)),
    };
    let (severity, state) = joined(&area.lockspace(host_id));
    push(severity, format!("lockspace {} as host_id {host_id}: {state}", crate::engine::LOCKSPACE));
    if let Some(dir) = &config.sanlock.libvirt_disk_lease_dir {
        let (severity, state) = joined(&area::libvirt_lockspace(dir, host_id));
        push(
            severity,
            format!("libvirt's lockspace {} in {}: {state}", crate::engine::LIBVIRT_LOCKSPACE, dir.display()),
        );
    }
    let me = crate::state::hostname();
    match hosts::read_one(&area, host_id) {
        Ok(Some(name)) if name == me => push(Severity::Ok, format!("host table: host_id {host_id} is {me}")),
        Ok(Some(name)) => push(
            Severity::Error,
            format!(
                "host table: host_id {host_id} is recorded for host {name}, not this host ({me}): two hosts with one \
                 host_id cannot both hold leases; give each host its own host_id"
            ),
        ),
        Ok(None) => {
            push(Severity::Warn, format!("host table: host_id {host_id} has no name: run `lockhook sanlock join`"))
        }
        Err(e) => push(Severity::Warn, format!("host table of {}: {e}", path.display())),
    }
}
