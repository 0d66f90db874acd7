//! The killpath: `lockhook sanlock lock-lost ACTION RUN_DIR HOLDER_PID`, run by the sanlock
//! daemon (never by libvirt, never from a hook) for each registered holder when this host can
//! no longer renew its lockspace lease. Other hosts take the leases once that lease times out,
//! so the guest must have stopped writing by then: the holder is what sanlock would kill, but
//! killing it would not stop QEMU, so this stops QEMU itself.
//!
//! 1. Finds the holder's state file in `RUN_DIR` by its pid, and in it the guest's QEMU (pid
//!    and start time, so a reused pid is never hit).
//! 2. `kill`: SIGKILL; `pause`: SIGSTOP (no libvirt call: libvirtd may itself hang on the lost
//!    storage). Logged.
//! 3. Tells the holder (`lock_lost`), which lets go of its sanlock leases, so the daemon sees the
//!    client give them up and does not escalate to SIGKILL of the holder; the OFD locks stay,
//!    so nothing on this host takes the images of a paused guest.

use std::path::Path;

use log::{error, info, warn};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::LockLost;
use crate::holder::client::Client;
use crate::paths::Paths;

#[derive(Debug, thiserror::Error)]
pub enum LockLostError {
    #[error("no lockhook holder with pid {pid} in {run_dir}")]
    NoHolder { pid: u32, run_dir: String },
    #[error("cannot stop QEMU pid {pid} of guest {guest}")]
    Signal {
        pid: u32,
        guest: String,
        #[source]
        source: nix::Error,
    },
}

/// Stops the QEMU of the guest whose holder is `holder_pid`, then tells the holder. Returns
/// what was done, for the log.
pub fn run(action: LockLost, run_dir: &Path, holder_pid: u32, libvirt_run_dir: &Path) -> Result<String, LockLostError> {
    let paths = Paths::new(run_dir);
    let record = crate::state::list(&paths)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.state.ok())
        .find(|s| s.holder_pid == holder_pid)
        .ok_or_else(|| LockLostError::NoHolder { pid: holder_pid, run_dir: run_dir.display().to_string() })?;
    let guest = format!("{} ({})", record.name, record.uuid);
    let (signal, verb) = match action {
        LockLost::Kill => (Signal::SIGKILL, "killed"),
        LockLost::Pause => (Signal::SIGSTOP, "paused (SIGSTOP)"),
    };
    // Between `prepare` and `started` the holder does not know its QEMU yet: libvirt's pid file
    // does.
    let qemu = match (record.qemu_pid, record.qemu_start_time) {
        (Some(pid), Some(start)) => Some((pid, start)),
        _ => crate::qemu::find(&record.name, &record.uuid, libvirt_run_dir),
    };
    let done = match qemu {
        Some((pid, start)) if crate::qemu::is_alive(pid, start) => {
            let raw = i32::try_from(pid).map_err(|_| LockLostError::Signal {
                pid,
                guest: guest.clone(),
                source: nix::Error::EINVAL,
            })?;
            kill(Pid::from_raw(raw), signal).map_err(|source| LockLostError::Signal {
                pid,
                guest: guest.clone(),
                source,
            })?;
            format!("guest {guest}: this host lost its sanlock lockspace lease; its QEMU (pid {pid}) was {verb}")
        }
        _ => format!("guest {guest}: this host lost its sanlock lockspace lease; no running QEMU to stop"),
    };
    error!("{done}");
    match Client::connect(&paths, &record.uuid) {
        Ok(Some(client)) => match client.lock_lost() {
            Ok(()) => info!("guest {guest}: holder let go of its sanlock leases"),
            Err(e) => warn!("guest {guest}: cannot tell its holder: {}", crate::error_chain(&e)),
        },
        Ok(None) => warn!("guest {guest}: its holder does not answer"),
        Err(e) => warn!("guest {guest}: cannot reach its holder: {}", crate::error_chain(&e)),
    }
    Ok(done)
}
