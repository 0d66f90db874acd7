//! `lockhook doctor` on a good and a broken installation, built in temp directories (through the
//! library: `diagnose` over a `Layout` of our own, so the host's /etc/libvirt is never read).
//!
//! Needs root: the config and the run directory must belong to root, as on a real host.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use lockhook::doctor::{self, Finding, Layout, Severity};

use crate::common::{lockhook_bin, Setup};

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    (!nix::unistd::geteuid().is_root()).then_some("doctor tests need root (config and run dir owned by root)")
}

/// A temp lockhook setup plus a libvirt config dir `libvirt/` with `hooks/`.
fn setup(run_dir_mode: u32) -> (Setup, PathBuf) {
    let setup = Setup::new("");
    fs::create_dir_all(&setup.run_dir).expect("mkdir run dir");
    fs::set_permissions(&setup.run_dir, fs::Permissions::from_mode(run_dir_mode)).expect("chmod run dir");
    fs::create_dir_all(setup.path("lockspace")).expect("mkdir lockspace");
    let libvirt = setup.path("libvirt");
    fs::create_dir_all(libvirt.join("hooks")).expect("mkdir hooks");
    (setup, libvirt)
}

fn layout(setup: &Setup, libvirt: &Path) -> Layout {
    Layout { config_path: setup.config.clone(), libvirt_config_dir: libvirt.to_owned(), binary: lockhook_bin() }
}

fn report(findings: &[Finding]) -> String {
    let mut out = Vec::new();
    doctor::print(findings, &mut out).expect("print");
    String::from_utf8(out).expect("utf-8 report")
}

/// The findings of `check` at `severity`.
fn of<'a>(findings: &'a [Finding], check: &str, severity: Severity) -> Vec<&'a Finding> {
    findings.iter().filter(|f| f.check == check && f.severity == severity).collect()
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn doctor_on_a_good_install() {
    if let Some(why) = skip_reason() {
        panic!("doctor tests need root (tests/run-all.sh runs as root): {why}");
    }
    let (setup, libvirt) = setup(0o700);
    std::os::unix::fs::symlink(lockhook_bin(), libvirt.join("hooks/qemu")).expect("symlink hook");
    fs::write(libvirt.join("qemu.conf"), "# lock_manager = \"lockd\"\nuser = \"root\"\n").expect("qemu.conf");
    let findings = doctor::diagnose(&layout(&setup, &libvirt));
    let text = report(&findings);

    assert!(findings.iter().all(|f| f.severity != Severity::Error), "{text}");
    // Only what depends on the host (a libvirtd of ours, AppArmor/SELinux) may warn.
    let host_dependent = ["daemon", "confinement"];
    assert!(
        findings.iter().filter(|f| f.severity == Severity::Warn).all(|f| host_dependent.contains(&f.check)),
        "{text}"
    );
    let hook = format!(
        "{} -> {}",
        libvirt.join("hooks/qemu").display(),
        lockhook_bin().canonicalize().expect("bin").display()
    );
    assert!(text.contains(&format!("ok    hook: {hook}\n")), "{text}");
    for check in ["config", "run_dir", "lockspace", "lock_manager"] {
        assert_eq!(of(&findings, check, Severity::Ok).len(), 1, "{check}: {text}");
    }
    // The lockspace and the run dir (both in the same temp dir, so one filesystem test each).
    let locks = of(&findings, "locks", Severity::Ok);
    assert!(locks.iter().any(|f| f.message.contains("OFD locks work")), "{text}");
    assert_eq!(of(&findings, "shared", Severity::Info).len(), 1, "{text}");
    // The lock test files are gone again.
    for dir in [setup.path("lockspace"), setup.run_dir.clone()] {
        assert_eq!(fs::read_dir(&dir).expect("read dir").count(), 0, "{} not empty", dir.display());
    }

    let daemon_ok = of(&findings, "daemon", Severity::Info).len() + of(&findings, "daemon", Severity::Ok).len() > 0;
    let confinement_ok = of(&findings, "confinement", Severity::Warn).is_empty();
    if daemon_ok && confinement_ok {
        assert_eq!(doctor::exit_code(&findings), 0, "{text}");
        assert!(text.trim_end().ends_with("all good"), "{text}");
    } else {
        eprintln!("note: this host makes doctor warn (a libvirtd of ours, or AppArmor/SELinux):\n{text}");
        assert_eq!(doctor::exit_code(&findings), 1, "{text}");
    }
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn doctor_on_a_broken_install() {
    if let Some(why) = skip_reason() {
        panic!("doctor tests need root (tests/run-all.sh runs as root): {why}");
    }
    let (setup, libvirt) = setup(0o755);
    fs::write(libvirt.join("qemu.conf"), "#lock_manager = \"nop\"\n  lock_manager = \"lockd\"   # virtlockd\n")
        .expect("qemu.conf");
    let findings = doctor::diagnose(&layout(&setup, &libvirt));
    let text = report(&findings);

    assert_eq!(doctor::exit_code(&findings), 2, "{text}");
    let hook = of(&findings, "hook", Severity::Error);
    assert!(hook.iter().any(|f| f.message.contains("not installed as a qemu hook: run ./install.sh")), "{text}");
    let lockd = of(&findings, "lock_manager", Severity::Error);
    assert!(
        lockd.iter().any(|f| f.message.contains("lock_manager = \"lockd\"") && f.message.contains("\"nop\"")),
        "{text}"
    );
    let run_dir = of(&findings, "run_dir", Severity::Error);
    assert!(run_dir.iter().any(|f| f.message.contains("mode 0755") && f.message.contains("chmod 0700")), "{text}");
    assert!(text.contains("ERROR hook: "), "{text}");
    assert!(text.lines().last().is_some_and(|l| l.starts_with("summary: 3 errors")), "{text}");

    // A config the hook would refuse is an error too, with its reason.
    fs::set_permissions(&setup.config, fs::Permissions::from_mode(0o666)).expect("chmod config");
    let findings = doctor::diagnose(&layout(&setup, &libvirt));
    let config = of(&findings, "config", Severity::Error);
    assert!(config.iter().any(|f| f.message.contains("must be owned by root")), "{}", report(&findings));
}
