//! `lockhook doctor`: checks an installation and says what to fix, one finding per line.
//!
//! Each check has its own submodule, whose header says what it checks and why; `diagnose` runs
//! them in this order:
//!
//! | check | submodule |
//! |---|---|
//! | `privileges`: doctor runs as root | here |
//! | `hook`: libvirt's hook entries lead to this lockhook | `hook` |
//! | `config`: the config loads | `config` |
//! | `daemon`: the running libvirt daemons have found the hook | `daemon` |
//! | `run_dir`, `lockspace`: lockhook's own directories | `dirs` |
//! | `lockspace identity`: the lockspace is the initialised one | `identity` |
//! | `locks`: OFD locks work in the lockspace, run and image directories | `locks` |
//! | `shared`: the lockspace's filesystem reaches other hosts | `filesystem` |
//! | `lock_manager`: libvirt's own lock manager (`qemu.conf`) does not fight lockhook | `lock_manager` |
//! | `confinement`: AppArmor or SELinux | `confinement` |
//! | `sanlock`: the sanlock engine's daemon, lease area and membership | `sanlock` |
//!
//! Read-only except for one thing: to try OFD locks on a filesystem it creates a test file
//! (`O_EXCL|O_NOFOLLOW`, mode 0600, named `.lockhook-doctor.<pid>.<n>`) in the directory and
//! removes it again. It never signals, traces or reads anything of a process in another mount
//! namespace beyond the namespace link itself (a test libvirtd in a private namespace is not ours).

mod config;
mod confinement;
mod daemon;
mod dirs;
mod filesystem;
mod hook;
mod identity;
mod lock_manager;
mod locks;
mod sanlock;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Where `install.sh` puts the binary.
pub const INSTALLED_BINARY: &str = "/usr/local/sbin/lockhook";
/// libvirt's default image directory, tested for OFD locks when it exists.
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/libvirt/images";

/// Severity of one finding; the exit code of `lockhook doctor` is the worst one: Ok→0, Info→0,
/// Warn→1, Error→2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    Info,
    Warn,
    Error,
}

impl Severity {
    /// The column printed in front of each finding (six characters wide with its padding).
    fn label(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Info => "info",
            Severity::Warn => "WARN",
            Severity::Error => "ERROR",
        }
    }
}

/// One result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Which check: `hook`, `daemon`, `config`, `run_dir`, `lockspace`, `lockspace identity`,
    /// `locks`, `shared`, `lock_manager`, `confinement`, `privileges`.
    pub check: &'static str,
    /// One line: what is wrong and how to fix it (or what is fine).
    pub message: String,
}

impl Finding {
    fn new(severity: Severity, check: &'static str, message: impl Into<String>) -> Finding {
        Finding { severity, check, message: message.into() }
    }
}

/// Where to look; `Layout::system(config_path)` gives the real paths, tests build their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub config_path: PathBuf,
    /// hooks dir = `<this>/hooks`, qemu.conf = `<this>/qemu.conf`, pools = `<this>/storage/*.xml`.
    pub libvirt_config_dir: PathBuf,
    /// The running lockhook (`std::env::current_exe()`): the hook must lead to this file.
    pub binary: PathBuf,
}

impl Layout {
    /// The host's layout: `libvirt_config_dir` from the config if it loads, else the default.
    pub fn system(config_path: &Path) -> Layout {
        let libvirt_config_dir =
            Config::load(config_path).map_or_else(|_| Config::default().libvirt_config_dir, |c| c.libvirt_config_dir);
        let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(INSTALLED_BINARY));
        Layout { config_path: config_path.to_owned(), libvirt_config_dir, binary }
    }

    fn hooks_dir(&self) -> PathBuf {
        self.libvirt_config_dir.join("hooks")
    }
}

/// Runs every check.
pub fn diagnose(layout: &Layout) -> Vec<Finding> {
    let mut out = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        out.push(Finding::new(
            Severity::Warn,
            "privileges",
            "not running as root: the config, run directory and lock checks below may fail for that reason alone: \
             run `sudo lockhook doctor`",
        ));
    }
    let hooks = hook::check(layout, &mut out);
    let config = config::check(layout, &mut out);
    daemon::check(&hooks, &config.run_dir, &mut out);
    dirs::check_run_dir(&config.run_dir, &mut out);
    dirs::check_lockspace_dir(&config.lockspace_dir, &mut out);
    identity::check(&config, &mut out);
    locks::check(layout, &config, &mut out);
    filesystem::check_shared(&config.lockspace_dir, &mut out);
    lock_manager::check(layout, &mut out);
    confinement::check(layout, &config, &mut out);
    sanlock::check(&config, &mut out);
    out
}

/// The exit code for these findings: the worst severity (Ok and Info → 0, Warn → 1, Error → 2).
pub fn exit_code(findings: &[Finding]) -> u8 {
    match findings.iter().map(|f| f.severity).max() {
        Some(Severity::Error) => 2,
        Some(Severity::Warn) => 1,
        _ => 0,
    }
}

/// Human-readable report: one line per finding (`ok    hook: ...`, `WARN  ...`, `ERROR ...`),
/// then a summary line.
pub fn print(findings: &[Finding], out: &mut dyn Write) -> io::Result<()> {
    for f in findings {
        writeln!(out, "{:<6}{}: {}", f.severity.label(), f.check, crate::one_line(&f.message))?;
    }
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    let plural = |n: usize, word: &str| if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") };
    let verdict = match exit_code(findings) {
        2 => "lockhook does not protect this host as it should: fix the ERROR lines",
        1 => "lockhook works, but look at the WARN lines",
        _ => "all good",
    };
    writeln!(
        out,
        "summary: {}, {}, {} info, {} ok: {verdict}",
        plural(count(Severity::Error), "error"),
        plural(count(Severity::Warn), "warning"),
        count(Severity::Info),
        count(Severity::Ok),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(severity: Severity) -> Finding {
        Finding::new(severity, "x", "m")
    }

    #[test]
    fn exit_code_is_the_worst_severity() {
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(exit_code(&[finding(Severity::Ok), finding(Severity::Info)]), 0);
        assert_eq!(exit_code(&[finding(Severity::Warn), finding(Severity::Ok)]), 1);
        assert_eq!(exit_code(&[finding(Severity::Info), finding(Severity::Error), finding(Severity::Warn)]), 2);
    }

    #[test]
    fn print_has_one_line_per_finding_and_a_summary() {
        let findings = vec![
            Finding::new(Severity::Ok, "hook", "/etc/libvirt/hooks/qemu -> /usr/local/sbin/lockhook"),
            Finding::new(Severity::Warn, "daemon", "two\nlines"),
            Finding::new(Severity::Error, "lock_manager", "bad"),
        ];
        let mut buf = Vec::new();
        print(&findings, &mut buf).expect("print");
        let text = String::from_utf8(buf).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "ok    hook: /etc/libvirt/hooks/qemu -> /usr/local/sbin/lockhook");
        assert_eq!(lines[1], "WARN  daemon: two\\nlines");
        assert_eq!(lines[2], "ERROR lock_manager: bad");
        assert!(lines[3].starts_with("summary: 1 error, 1 warning, 0 info, 1 ok"), "{text}");
    }
}
