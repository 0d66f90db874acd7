//! Keeping `lockhook run`'s command from outliving its locks.
//!
//! `lockhook run PATH -- COMMAND` holds the locks while COMMAND writes. If `run` itself is
//! killed (SIGKILL, the OOM killer), its locks go with it, and COMMAND must not go on writing
//! unlocked. So COMMAND runs in a PID namespace of its own, under a tiny init (this binary again,
//! `lockhook run-init`), which the kernel kills when `run` dies (`PR_SET_PDEATHSIG`); when the
//! init of a PID namespace dies, the kernel kills every process in it, so COMMAND and anything
//! it started stop with it. Without the privilege to make a PID namespace, COMMAND itself gets
//! the parent-death signal (its own children are then not covered; `run` warns).
//!
//! The init is told whether `run` is still alive by a pipe: `run` holds the write end, so a
//! hang-up means it died before the parent-death signal was armed.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};

/// The child whose signals are passed on (the init, or in the init the command).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; it only sends a signal to the child we started.
        unsafe { libc::kill(pid, sig) };
    }
}

/// While the child runs this process must not die before it: ^C and ^\ reach the whole
/// foreground group anyway, so they are ignored here; SIGTERM and SIGHUP are passed on.
fn forward_signals(child: u32) {
    CHILD.store(i32::try_from(child).unwrap_or(0), Ordering::SeqCst);
    // SAFETY: SIG_IGN runs no code; `forward` only calls the async-signal-safe kill(2).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, forward as *const () as libc::sighandler_t);
    }
}

/// Arms the parent-death signal in a forked child, then makes sure the parent did not die
/// before that (`alive` is the read end of a pipe whose write end only the parent holds).
///
/// # Safety
/// Runs between fork and exec: only async-signal-safe calls.
unsafe fn die_with_parent(alive: RawFd, parent_end: RawFd) -> std::io::Result<()> {
    // Our own copy of the write end would keep the pipe from ever hanging up.
    // SAFETY: close is async-signal-safe; `parent_end` is this child's copy of the write end.
    unsafe { libc::close(parent_end) };
    // SAFETY: prctl is async-signal-safe and only sets this process's parent-death signal.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut pfd = libc::pollfd { fd: alive, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll is async-signal-safe and touches only the pollfd on this stack.
    if unsafe { libc::poll(&mut pfd, 1, 0) } != 0 {
        // Hung up (the parent is gone) or readable (it never writes): do not run.
        return Err(std::io::Error::other("lockhook run died before its command started"));
    }
    Ok(())
}

/// `lockhook run`: runs `command` as described in the module doc and waits for it.
pub fn run_command(command: &[OsString]) -> std::io::Result<ExitStatus> {
    let (alive_r, alive_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    // SAFETY: unshare(CLONE_NEWPID) changes only the PID namespace future children are born
    // in; this process stays where it is and shares no memory with anything.
    let isolated = unsafe { libc::unshare(libc::CLONE_NEWPID) } == 0;
    let mut cmd = if isolated {
        let mut init = Command::new("/proc/self/exe");
        init.arg("run-init").arg("--alive-fd").arg(alive_r.as_raw_fd().to_string()).arg("--").args(command);
        init
    } else {
        log::warn!(
            "cannot make a PID namespace for the command (not root?): if `lockhook run` is killed, processes the \
             command started may go on without the locks"
        );
        let mut direct = Command::new(&command[0]);
        direct.args(&command[1..]);
        direct
    };
    let alive = alive_r.as_raw_fd();
    let parent_end = alive_w.as_raw_fd();
    // The init needs the read end across exec.
    let keep = isolated.then_some(alive);
    // SAFETY: the closure only makes async-signal-safe calls (fcntl, prctl, poll).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            die_with_parent(alive, parent_end)
        });
    }
    let mut child = cmd.spawn()?;
    drop(alive_r);
    forward_signals(child.id());
    let status = loop {
        match child.wait() {
            Ok(status) => break status,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    CHILD.store(0, Ordering::SeqCst);
    // Invariant: the write end stays open until the child is gone.
    drop(alive_w);
    Ok(status)
}

/// `lockhook run-init`: PID 1 of the command's namespace. Starts the command, passes SIGTERM and
/// SIGHUP on, reaps orphans, and exits with the command's status (128 + signal if it was
/// killed). Returns the exit code.
pub fn init(alive_fd: RawFd, command: &[OsString]) -> i32 {
    // SAFETY: the fd was inherited for this purpose and nothing else here refers to it.
    let alive = unsafe { OwnedFd::from_raw_fd(alive_fd) };
    let _ = nix::fcntl::fcntl(alive.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    let Some(program) = command.first() else { return 2 };
    let child = match Command::new(program).args(&command[1..]).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("lockhook: cannot run {}: {e}", program.to_string_lossy());
            return 127;
        }
    };
    let pid = child.id();
    forward_signals(pid);
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only the status int on our stack.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return 1;
        }
        if u32::try_from(reaped).ok() == Some(pid) {
            return if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
        }
    }
}
