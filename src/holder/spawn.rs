//! Starts a holder: fork, then exec `/proc/self/exe holder ...` in the child, and wait for the
//! holder to say it is ready on a pipe.
//!
//! libvirt reads the hook's stdout and stderr until EOF before it considers the hook finished,
//! so a child that kept either pipe would hang `virsh start` for as long as the guest runs. The
//! child therefore points fds 0-2 at /dev/null and starts a new session *before* exec; every
//! other fd this process has is `O_CLOEXEC` (Rust's default, and lockhook opens nothing without
//! it), and the holder closes anything else it finds as its first act.
//!
//! After `fork` only async-signal-safe calls run in the child (dup2, setsid, fcntl, execv,
//! _exit); everything they need is prepared before the fork.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use crate::domain::Uuid;

/// How long the hook waits for a new holder to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// What the holder writes on the ready pipe when it is listening.
pub const READY: &[u8] = b"R";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot prepare the holder's start")]
    Prepare(#[source] std::io::Error),
    #[error("cannot fork the holder")]
    Fork(#[source] nix::Error),
    #[error("holder did not become ready within {0:?}")]
    Timeout(Duration),
    #[error("holder failed to start")]
    Failed(#[source] StartFailure),
}

/// Why a holder could not start, as it reported it on the ready pipe: its error and causes on
/// one line, and the errno of the innermost system error (ENOSPC for a full run directory,
/// EACCES, ...), for callers that branch on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StartFailure {
    pub errno: Option<i32>,
    pub message: String,
}

impl StartFailure {
    /// The failure `err` describes.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> StartFailure {
        let mut errno = None;
        let mut cause = Some(err);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                errno = io.raw_os_error().or(errno);
            } else if let Some(nix) = e.downcast_ref::<nix::Error>() {
                errno = Some(*nix as i32);
            }
            cause = e.source();
        }
        StartFailure { errno, message: crate::error_chain(err) }
    }

    /// `E<errno>:<message>` (no errno: `E:<message>`).
    pub fn encode(&self) -> Vec<u8> {
        format!("E{}:{}", self.errno.map(|e| e.to_string()).unwrap_or_default(), self.message).into_bytes()
    }

    /// What the holder wrote on the ready pipe; `None` for an empty report (it exited).
    pub fn decode(report: &[u8]) -> Option<StartFailure> {
        let text = String::from_utf8_lossy(report.strip_prefix(b"E").unwrap_or(report)).trim().to_owned();
        let (errno, message) = match text.split_once(':') {
            Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => (n.parse().ok(), rest.trim().to_owned()),
            _ => (None, text),
        };
        (!message.is_empty()).then_some(StartFailure { errno, message })
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|e| SpawnError::Prepare(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))
}

/// Starts a holder for `uuid` and waits until it listens. Returns its pid.
pub fn spawn(config_path: &Path, uuid: &Uuid) -> Result<Pid, SpawnError> {
    let (ready_r, ready_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Prepare(e.into()))?;
    let devnull = File::options().read(true).write(true).open("/dev/null").map_err(SpawnError::Prepare)?;
    let exe = cstring(b"/proc/self/exe")?;
    let ready_fd = ready_w.as_raw_fd();
    let args = [
        cstring(b"lockhook")?,
        cstring(b"holder")?,
        cstring(b"--config")?,
        cstring(config_path.as_os_str().as_bytes())?,
        cstring(b"--uuid")?,
        cstring(uuid.as_str().as_bytes())?,
        cstring(b"--ready-fd")?,
        cstring(ready_fd.to_string().as_bytes())?,
    ];
    // SAFETY: the child only calls async-signal-safe functions (see `exec_child`) before exec or
    // _exit; all memory it touches was allocated before the fork.
    match unsafe { fork() }.map_err(SpawnError::Fork)? {
        ForkResult::Child => exec_child(&exe, &args, devnull.as_raw_fd(), ready_fd),
        ForkResult::Parent { child } => {
            drop(ready_w);
            wait_ready(ready_r, child)
        }
    }
}

/// Starts a *spare* holder (`holder --spare`) and does not wait for it: the next `prepare` on
/// this host claims it instead of paying for a fork and exec on the guest's critical path. Its
/// stdio is /dev/null and it inherits nothing, like any holder.
pub fn spawn_spare(config_path: &Path) -> Result<(), SpawnError> {
    let devnull = File::options().read(true).write(true).open("/dev/null").map_err(SpawnError::Prepare)?;
    let exe = cstring(b"/proc/self/exe")?;
    let args = [
        cstring(b"lockhook")?,
        cstring(b"holder")?,
        cstring(b"--config")?,
        cstring(config_path.as_os_str().as_bytes())?,
        cstring(b"--spare")?,
    ];
    // SAFETY: as in `spawn`: the child only calls async-signal-safe functions before exec.
    match unsafe { fork() }.map_err(SpawnError::Fork)? {
        ForkResult::Child => exec_child(&exe, &args, devnull.as_raw_fd(), -1),
        ForkResult::Parent { .. } => Ok(()),
    }
}

/// The child between fork and exec. Never returns and never runs Rust code that allocates.
fn exec_child(exe: &CString, args: &[CString], devnull: RawFd, ready_fd: RawFd) -> ! {
    let mut argv: [*const libc::c_char; 9] = [std::ptr::null(); 9];
    for (slot, arg) in argv.iter_mut().zip(args) {
        *slot = arg.as_ptr();
    }
    // SAFETY: dup2, setsid, fcntl, execv and _exit are async-signal-safe; every pointer refers to
    // memory prepared before the fork, and argv is NULL-terminated (9 slots, 8 args).
    unsafe {
        for fd in 0..3 {
            if libc::dup2(devnull, fd) < 0 {
                libc::_exit(126);
            }
        }
        libc::setsid();
        // The ready pipe is the one fd the holder must inherit.
        if ready_fd >= 0 {
            libc::fcntl(ready_fd, libc::F_SETFD, 0);
        }
        libc::execv(exe.as_ptr(), argv.as_ptr());
        libc::_exit(127)
    }
}

fn wait_ready(ready_r: OwnedFd, child: Pid) -> Result<Pid, SpawnError> {
    let mut file = File::from(ready_r);
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(READY_TIMEOUT).unwrap_or(PollTimeout::MAX);
    let ready = loop {
        match poll(&mut fds, timeout) {
            Ok(n) => break n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(SpawnError::Prepare(e.into())),
        }
    };
    if ready == 0 {
        return Err(SpawnError::Timeout(READY_TIMEOUT));
    }
    let mut buf = Vec::new();
    let _ = (&mut file).take(4096).read_to_end(&mut buf);
    if buf.starts_with(READY) {
        return Ok(child);
    }
    // The holder exited (EOF) or reported an error: reap it so no zombie stays behind.
    let _ = waitpid(child, Some(WaitPidFlag::WNOHANG));
    Err(SpawnError::Failed(
        StartFailure::decode(&buf)
            .unwrap_or_else(|| StartFailure { errno: None, message: "it exited during start-up".to_owned() }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_keep_their_cause_and_errno() {
        let err = crate::rundir::RunDirError::RunDir {
            path: "/run/lockhook".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let failure = StartFailure::of(&err);
        assert_eq!(failure.errno, Some(libc::ENOSPC));
        assert!(failure.message.starts_with("/run/lockhook: cannot create the run directory: No space"), "{failure}");
        assert_eq!(StartFailure::decode(&failure.encode()), Some(failure));
        let plain = StartFailure { errno: None, message: "config: bad: x".into() };
        assert_eq!(StartFailure::decode(&plain.encode()), Some(plain));
        assert_eq!(StartFailure::decode(b""), None, "an empty report: the holder just exited");
        let nix = StartFailure::of(&crate::holder::client::ClientError::Connect {
            path: "/s".into(),
            source: nix::Error::ECONNREFUSED,
        });
        assert_eq!(nix.errno, Some(libc::ECONNREFUSED));
    }
}
