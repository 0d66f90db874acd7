//! The `confinement` check: hooks inherit the confinement of the daemon that runs them, its
//! AppArmor profile or its SELinux domain (`virtd_t`), so that policy must allow executing the
//! lockhook binary and writing the run directory. doctor cannot try that without starting a
//! guest: it says which confinement is active and where to look (the daemon's profile in
//! `/etc/apparmor.d`, or `ausearch -m avc -c lockhook` after a guest start).

use std::fs;
use std::path::Path;

use crate::config::Config;

use super::daemon::DAEMONS;
use super::{Finding, Layout, Severity};

/// The libvirt daemon profiles in the text of `/sys/kernel/security/apparmor/profiles`
/// (`name (mode)` per line), as (profile, mode). Child profiles (`libvirtd//...`) are skipped.
fn apparmor_daemon_profiles(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let (name, mode) = line.trim().rsplit_once(" (")?;
            let mode = mode.strip_suffix(')')?;
            let base = name.rsplit('/').next()?;
            (!name.contains("//") && DAEMONS.contains(&base)).then(|| (name.to_owned(), mode.to_owned()))
        })
        .collect()
}

pub(super) fn check(layout: &Layout, config: &Config, out: &mut Vec<Finding>) {
    const CHECK: &str = "confinement";
    let binary = fs::canonicalize(&layout.binary).unwrap_or_else(|_| layout.binary.clone());
    let (binary, run_dir) = (binary.display(), config.run_dir.display());
    let before = out.len();
    let profiles = Path::new("/sys/kernel/security/apparmor/profiles");
    if profiles.exists() {
        match fs::read_to_string(profiles) {
            Ok(text) => {
                for (profile, mode) in apparmor_daemon_profiles(&text) {
                    let base = profile.rsplit('/').next().unwrap_or(&profile).to_owned();
                    let (severity, what) = match mode.as_str() {
                        "enforce" | "kill" => (Severity::Warn, "make sure"),
                        _ => (Severity::Info, "denials are only logged in this mode; still make sure"),
                    };
                    out.push(Finding::new(
                        severity,
                        CHECK,
                        format!(
                            "{base} is confined by AppArmor ({mode}): hooks inherit it; {what} its profile allows \
                             executing {binary} and writing {run_dir} (see /etc/apparmor.d/usr.sbin.{base} and \
                             /etc/apparmor.d/local/usr.sbin.{base})"
                        ),
                    ));
                }
            }
            Err(e) => out.push(Finding::new(
                Severity::Info,
                CHECK,
                format!("AppArmor is active but {} is unreadable ({e}): confinement not checked", profiles.display()),
            )),
        }
    }
    match fs::read_to_string("/sys/fs/selinux/enforce").map(|t| t.trim().to_owned()).as_deref() {
        Ok("1") => out.push(Finding::new(
            Severity::Warn,
            CHECK,
            format!(
                "SELinux is enforcing: hooks run in libvirtd's domain (virtd_t); make sure the policy allows executing \
                 {binary} and writing {run_dir} (after a guest start: ausearch -m avc -c lockhook)"
            ),
        )),
        Ok("0") => out.push(Finding::new(
            Severity::Info,
            CHECK,
            "SELinux is permissive: denials of the hook are only logged (ausearch -m avc -c lockhook)",
        )),
        _ => {}
    }
    if out.len() == before {
        out.push(Finding::new(Severity::Ok, CHECK, "libvirtd is not confined by AppArmor or SELinux"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apparmor_parsing() {
        let profiles = "/usr/sbin/libvirtd (enforce)\nlibvirtd//qemu_bridge_helper (enforce)\n\
                        virtqemud (complain)\nlibvirt-f3fa73d4 (enforce)\n/usr/bin/man (enforce)\n";
        assert_eq!(
            apparmor_daemon_profiles(profiles),
            vec![
                ("/usr/sbin/libvirtd".to_owned(), "enforce".to_owned()),
                ("virtqemud".to_owned(), "complain".to_owned())
            ]
        );
    }
}
