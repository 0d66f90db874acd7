//! A private sanlock daemon for the sanlock engine's rows of part 2: the start-up of
//! `tests/common/sanlock.rs` (own `SANLOCK_RUN_DIR`, no watchdog, an `LD_PRELOAD` shim for the
//! two rlimits the sandbox cannot raise), kept to what the bench needs. Never the host's daemon;
//! stopped by its pid.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::libvirtd::wait_until;

const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>
/* Bench-only: the sandbox cannot raise these two limits; sanlock insists on trying. */
int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim) {
    if (resource == RLIMIT_MEMLOCK || resource == RLIMIT_RTPRIO)
        return 0;
    int (*real)(__rlimit_resource_t, const struct rlimit *) =
        (int (*)(__rlimit_resource_t, const struct rlimit *))dlsym(RTLD_NEXT, "setrlimit");
    return real(resource, rlim);
}
"#;

const TIMEOUT: Duration = Duration::from_secs(15);

/// Why the sanlock rows cannot run here, or `None`.
pub fn missing() -> Option<String> {
    let absent = |cmd: &str| crate::util::sh(&format!("command -v {cmd}")).is_empty().then(|| cmd.to_owned());
    let lib = crate::util::sh("ldconfig -p | grep -c 'libsanlock_client.so.1 '");
    [absent("sanlock"), absent("cc")]
        .into_iter()
        .flatten()
        .chain((lib.trim() == "0" || lib.trim().is_empty()).then(|| "libsanlock_client.so.1".to_owned()))
        .reduce(|a, b| format!("{a}, {b}"))
        .map(|m| format!("{m} not found (Debian packages sanlock, libsanlock1, gcc)"))
}

/// A sanlock daemon this bench started; `shutdown -f 1`, then SIGKILL by pid, on drop.
pub struct SanlockDaemon {
    pub run_dir: PathBuf,
    log: PathBuf,
    daemon: Child,
}

impl SanlockDaemon {
    /// Starts one in `dir` and waits until it answers; `Err` says why not.
    pub fn start(dir: &Path, host_name: &str) -> Result<SanlockDaemon, String> {
        let run_dir = dir.join("run");
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("mkdir {}: {e}", run_dir.display()))?;
        let (src, shim) = (dir.join("setrlimit-shim.c"), dir.join("setrlimit-shim.so"));
        std::fs::write(&src, SHIM_C).map_err(|e| format!("write {}: {e}", src.display()))?;
        let cc = Command::new("cc").args(["-shared", "-fPIC", "-O1", "-o"]).arg(&shim).arg(&src).arg("-ldl").output();
        match cc {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("building the setrlimit shim: {}", String::from_utf8_lossy(&out.stderr))),
            Err(e) => return Err(format!("cc: {e}")),
        }
        let log = dir.join("daemon.log");
        let file = std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let daemon = Command::new("sanlock")
            .args(["daemon", "-D", "-w", "0", "-l", "0", "-U", "root", "-G", "root", "-L", "-1", "-S", "-1", "-e"])
            .arg(host_name)
            .env("SANLOCK_RUN_DIR", &run_dir)
            .env("LD_PRELOAD", &shim)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("sanlock daemon: {e}"))?;
        let mut this = SanlockDaemon { run_dir, log, daemon };
        let mut exited = None;
        let answering = wait_until(TIMEOUT, || {
            if let Ok(Some(status)) = this.daemon.try_wait() {
                exited = Some(status);
                return true;
            }
            this.client().arg("status").output().is_ok_and(|o| o.status.success())
        });
        match (answering, exited) {
            (true, None) => Ok(this),
            (_, Some(status)) => Err(format!("sanlock daemon exited at start ({status}): {}", this.log())),
            (false, None) => Err(format!("sanlock daemon not answering after {TIMEOUT:?}: {}", this.log())),
        }
    }

    /// `sanlock client` aimed at this daemon.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new("sanlock");
        cmd.arg("client").env("SANLOCK_RUN_DIR", &self.run_dir).stdin(Stdio::null());
        cmd
    }

    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SanlockDaemon {
    fn drop(&mut self) {
        let _ = self.client().args(["shutdown", "-f", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        // `try_wait` errs once `reap_orphans` has reaped it: gone either way.
        if !wait_until(TIMEOUT, || !matches!(self.daemon.try_wait(), Ok(None))) {
            eprintln!("bench: warning: sanlock daemon (pid {}) ignored shutdown; killing it", self.daemon.id());
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
    }
}
