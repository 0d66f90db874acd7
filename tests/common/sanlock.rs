//! A private sanlock daemon per simulated host, for tests of the sanlock engine.
//!
//! Each daemon has its own run directory (`SANLOCK_RUN_DIR`: its socket and pid file), its own
//! host name (`-e`), no watchdog (`-w 0`), no mlockall (`-l 0`), no log file or syslog, and logs
//! to a file in its temp dir. It is never the host's own daemon: every command that reaches a
//! daemon here names the run directory of one this fixture started, and it is stopped by its
//! pid.
//!
//! In this sandbox the daemon cannot raise RLIMIT_MEMLOCK and RLIMIT_RTPRIO (no
//! CAP_SYS_RESOURCE) and refuses to start; the fixture builds an `LD_PRELOAD` shim whose
//! `setrlimit` pretends those two succeed. Production hosts need nothing of the kind.
//!
//! `libsanlock_client` reads `SANLOCK_RUN_DIR` once per process, on its first connection, so a
//! test process talks to one daemon through lockhook's API ([`SanlockDaemon::bind_this_process`])
//! and to any other through `sanlock client` commands ([`SanlockDaemon::cli`]). Hence these tests
//! need one process per test: cargo nextest (`tests/run-all.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::wait_until;

const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>
/* Tests and bench only: the sandbox cannot raise these two limits; sanlock insists on trying. */
int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim) {
    if (resource == RLIMIT_MEMLOCK || resource == RLIMIT_RTPRIO)
        return 0;
    int (*real)(__rlimit_resource_t, const struct rlimit *) =
        (int (*)(__rlimit_resource_t, const struct rlimit *))dlsym(RTLD_NEXT, "setrlimit");
    return real(resource, rlim);
}
"#;

/// How long a daemon may take to open its socket, or to exit when told to.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A sanlock daemon this test started, stopped (by pid) on drop. Declare it before any sanlock
/// `Client` of the test: stopping it with `-f 1` SIGKILLs clients still holding leases.
pub struct SanlockDaemon {
    pub dir: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub host_name: String,
    log: PathBuf,
    daemon: Child,
}

impl SanlockDaemon {
    /// Starts a daemon named `host_name` and waits until it answers.
    pub fn start(host_name: &str) -> SanlockDaemon {
        let dir = tempfile::Builder::new().prefix("lockhook-sanlock-").tempdir().expect("temp dir");
        SanlockDaemon::try_start(dir, host_name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a daemon named `host_name` in `dir` and waits until it answers; `Err` says why
    /// not (the benchmark reports it and goes on).
    pub fn try_start(dir: tempfile::TempDir, host_name: &str) -> Result<SanlockDaemon, String> {
        let shim = build_shim(dir.path())?;
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).map_err(|e| format!("mkdir {}: {e}", run_dir.display()))?;
        let log = dir.path().join("daemon.log");
        let file = std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let daemon = Command::new("sanlock")
            .args(["daemon", "-D", "-w", "0", "-l", "0", "-U", "root", "-G", "root", "-L", "-1", "-S", "-1", "-e"])
            .arg(host_name)
            .env("SANLOCK_RUN_DIR", &run_dir)
            .env("LD_PRELOAD", &shim)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("sanlock daemon (Debian package sanlock): {e}"))?;
        let mut this = SanlockDaemon { dir, run_dir, host_name: host_name.to_owned(), log, daemon };
        let mut exited = None;
        let answering = wait_until(START_TIMEOUT, || {
            if let Ok(Some(status)) = this.daemon.try_wait() {
                exited = Some(status);
                return true;
            }
            this.cli().arg("status").output().is_ok_and(|out| out.status.success())
        });
        match (answering, exited) {
            (true, None) => Ok(this),
            (_, Some(status)) => Err(format!("sanlock daemon {host_name} exited at start ({status}):\n{}", this.log())),
            (false, None) => {
                Err(format!("sanlock daemon {host_name} not answering after {START_TIMEOUT:?}:\n{}", this.log()))
            }
        }
    }

    /// `sanlock client` aimed at this daemon (append the action and its options).
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new("sanlock");
        cmd.arg("client").env("SANLOCK_RUN_DIR", &self.run_dir).stdin(Stdio::null());
        cmd
    }

    /// Runs `sanlock client ARGS` against this daemon, asserting success.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().expect("sanlock client");
        assert!(out.status.success(), "sanlock client {args:?} on {}: {}\n{}", self.host_name, show(&out), self.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Points this process's `libsanlock_client` at this daemon. Must come before the process's
    /// first sanlock call, and a process can be bound to one daemon only (the library caches the
    /// directory): a second binding to another daemon panics instead of silently talking to the
    /// first one.
    pub fn bind_this_process(&self) {
        static BOUND: OnceLock<PathBuf> = OnceLock::new();
        let bound = BOUND.get_or_init(|| {
            assert!(
                std::env::var_os("SANLOCK_RUN_DIR").is_none(),
                "SANLOCK_RUN_DIR is already set in the test's environment: refusing to guess which daemon it names"
            );
            std::env::set_var("SANLOCK_RUN_DIR", &self.run_dir);
            self.run_dir.clone()
        });
        assert_eq!(
            bound, &self.run_dir,
            "this test process already talks to another sanlock daemon: run the sanlock tests one per process \
             (cargo nextest run --run-ignored all -E 'test(sanlock)')"
        );
    }

    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for SanlockDaemon {
    /// `shutdown -f 1` (SIGTERM is ignored while it has lockspaces), then SIGKILL by pid if it
    /// has not exited in time.
    fn drop(&mut self) {
        let _ = self.cli().args(["shutdown", "-f", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        // `try_wait` errs once someone else reaped it (the bench reaps orphans): gone either way.
        let exited = wait_until(STOP_TIMEOUT, || !matches!(self.daemon.try_wait(), Ok(None)));
        if !exited {
            eprintln!("warning: sanlock daemon {} (pid {}) ignored shutdown; killing it", self.host_name, self.pid());
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- sanlock daemon {} log ---\n{}", self.host_name, self.log());
        }
    }
}

/// A child process this test started (a `sanlock client command` holding leases), killed by
/// pid on drop.
pub struct Holder(pub Child);

impl Holder {
    /// Kills it and waits until it is gone (the daemon then releases its leases).
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build_shim(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("setrlimit-shim.c");
    let out = dir.join("setrlimit-shim.so");
    std::fs::write(&src, SHIM_C).map_err(|e| format!("write {}: {e}", src.display()))?;
    let built = Command::new("cc").args(["-shared", "-fPIC", "-O1", "-o"]).arg(&out).arg(&src).arg("-ldl").output();
    let built = built.map_err(|e| format!("cc (Debian package gcc): {e}"))?;
    if !built.status.success() {
        return Err(format!("building the setrlimit shim: {}", show(&built)));
    }
    Ok(out)
}

fn show(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
