//! Holder start-up after exec: from `lockhook holder --config .. --uuid .. --ready-fd N` to a
//! process that owns the guest's instance lock and socket. This room owns the hazard of a
//! holder that keeps something it inherited (libvirtd's pipes, the hook's fds) or can be killed
//! by a stray signal or the OOM killer: losing the holder loses the locks.
//!
//! Start-up order (each step before the next):
//! 1. close every inherited fd but the ready pipe (the child side of `spawn` already put
//!    /dev/null on 0-2 and called `setsid`, so libvirtd's pipes are not held);
//! 2. ignore SIGHUP/SIGINT/SIGPIPE and set `oom_score_adj` to -1000: losing the holder loses the
//!    locks;
//! 3. take the single-instance OFD lock on `<uuid>.lock` (a second holder for one guest fails here);
//! 4. replace any stale socket, bind `<uuid>.sock` with mode 0600;
//! 5. write `R` on the ready pipe and close it.
//!
//! A spare holder (see `spare`) runs steps 1-2 at its own start and steps 3-4 (`Holder::start`)
//! when a hook claims it.

use std::fs::{self, File};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Instant;

use log::{error, warn};
use nix::sys::signal::{signal, SigHandler, Signal};

use super::server::{Holder, Hotplug, Migration, Records, RunFiles, Watched};
use super::watch::pidfd_open;
use crate::config::Config;
use crate::domain::Uuid;
use crate::paths::Paths;
use crate::rundir::RunDirError as HolderError;
use crate::rundir::{ensure_run_dir, listen_on, take_instance_lock};
use crate::state;

/// Closes every fd from 3 up except `keep`.
pub(crate) fn close_inherited(keep: RawFd) {
    let ranges = match u32::try_from(keep) {
        Ok(keep) if keep >= 3 => [(3, keep - 1), (keep + 1, u32::MAX)],
        _ => [(3, u32::MAX), (1, 0)],
    };
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: close_range only closes descriptors; nothing in this process owns fds above 2
        // yet except `keep`, which is outside both ranges.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
        if rc != 0 {
            // Kernels before 5.9: close them one by one from /proc/self/fd.
            let fds: Vec<RawFd> = fs::read_dir("/proc/self/fd")
                .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
                .unwrap_or_default();
            for fd in fds.into_iter().filter(|fd| *fd >= first as RawFd && (*fd as u32) <= last) {
                // SAFETY: see above; closing an fd that is already closed (the read_dir handle)
                // only returns EBADF.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Names this process in `ps`/`top`/`pgrep` (its comm; exec'd through `/proc/self/exe` it would
/// be `exe`): `lockhook-holder` or `lockhook-spare`.
pub(crate) fn name_self(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which `name` is
    // (the kernel truncates longer ones).
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
}

pub(crate) fn protect_self() {
    // SIGCHLD ignored: the holder never waits for a child (virsh, when pausing), so the kernel
    // reaps them.
    for sig in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGPIPE, Signal::SIGCHLD] {
        // SAFETY: installing SIG_IGN runs no handler code, so no async-signal-safety rules apply.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    if let Err(e) = fs::write("/proc/self/oom_score_adj", "-1000") {
        warn!("cannot set oom_score_adj: {e}");
    }
}

/// Tells the spawner why start-up failed: `E<errno>:<error and its causes>` (see
/// `spawn::StartFailure`), the errno of the innermost system error, if any.
fn report(ready: &mut Option<File>, err: &(dyn std::error::Error + 'static)) {
    if let Some(mut pipe) = ready.take() {
        let failure = super::spawn::StartFailure::of(err);
        let _ = std::io::Write::write_all(&mut pipe, &failure.encode());
    }
}

/// The holder's main. `ready_fd` is the write end of the spawner's pipe.
pub fn run(config_path: &Path, uuid: &Uuid, ready_fd: RawFd) -> i32 {
    // SAFETY: F_GETFD only inspects the descriptor table entry.
    let ready_valid = unsafe { libc::fcntl(ready_fd, libc::F_GETFD) } >= 0 && ready_fd > 2;
    close_inherited(if ready_valid { ready_fd } else { -1 });
    let mut ready = ready_valid.then(|| {
        // SAFETY: the fd is open (checked above), was inherited for exactly this purpose, and
        // nothing else in this process refers to it.
        File::from(unsafe { OwnedFd::from_raw_fd(ready_fd) })
    });
    protect_self();
    name_self(c"lockhook-holder");
    super::footprint::one_arena();
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            report(&mut ready, &e);
            return 1;
        }
    };
    crate::logging::init_daemon(&config);
    let mut holder = match Holder::start(&config, uuid, true) {
        Ok(holder) => holder,
        Err(e) => {
            error!("holder for {uuid}: {}", crate::error_chain(&e));
            report(&mut ready, &e);
            return 1;
        }
    };
    if let Some(mut pipe) = ready.take() {
        let _ = std::io::Write::write_all(&mut pipe, protocol_ready());
    }
    holder.serve(&super::footprint::Footprint::new());
    0
}

fn protocol_ready() -> &'static [u8] {
    super::spawn::READY
}

impl Holder {
    /// Takes the instance lock of `uuid` and listens on its socket. With `watch_parent`, the
    /// parent (the hook that spawned us) is watched until it hands something over.
    pub(crate) fn start(config: &Config, uuid: &Uuid, watch_parent: bool) -> Result<Holder, HolderError> {
        let paths = Paths::new(&config.run_dir);
        let paths_for_leases = paths.clone();
        ensure_run_dir(paths.run_dir())?;
        let instance = take_instance_lock(&paths, uuid)?;
        let listener = listen_on(&paths.socket(uuid))?;
        // The spawning hook is our parent until it exits (then we are reparented).
        let parent = nix::unistd::getppid().as_raw();
        let spawner = u32::try_from(parent).ok().filter(|p| *p > 1 && watch_parent).and_then(pidfd_open);
        Ok(Holder {
            uuid: uuid.clone(),
            paths,
            config: config.clone(),
            since: crate::clock::now(),
            host: state::hostname(),
            started: Instant::now(),
            guest: None,
            held: Vec::new(),
            watched: Watched { spawner, qemu: None },
            hotplug: Hotplug { status: None, live: None, conflicts: Vec::new() },
            migration: Migration { pending: Vec::new(), handover: None, incoming: false, verified: false },
            files: RunFiles {
                instance: Some(instance),
                listener,
                state_written: None,
                census: None,
                shares: Vec::new(),
            },
            records: Records { lockspace: crate::lockspace::Lockspace::new(&config.lockspace_dir), keeper: None },
            leases: (config.engine == crate::config::Engine::Sanlock)
                .then(|| crate::engine::leases::Leases::new(&config.sanlock, &paths_for_leases, uuid)),
            said_after_reply: Vec::new(),
        })
    }
}
