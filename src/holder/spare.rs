//! The spare holder: an idle holder per host, started in the background by the first
//! `prepare` that finds none, so that guest starts claim it instead of waiting for a fork and
//! exec of a new holder (the largest fixed cost of `prepare`).
//!
//! A spare holds no lock. It is two processes: the *spare* keeps `<run_dir>/spare.lock` (an OFD
//! lock: one spare at a time) and the socket `<run_dir>/spare.sock`, and forks a *ready child*,
//! which answers on that socket. A hook sends `claim {uuid}`: the ready child takes that guest's
//! instance lock and socket, answers `ok`, closes its copies of the spare's fds (its parent sees
//! the pipe between them close and forks the next ready child, once this start is done with the
//! CPUs or at once for a hook already waiting), and from then on is that guest's holder,
//! continuing on the same connection with `acquire`. `prepare` sends its claim
//! before it resolves and locks the guest's storage, so that the claim is done meanwhile: the
//! claimed holder waits for the `acquire` as long as the hook stays connected, exits if the hook
//! hangs up first, and is told `release` by a hook whose start was refused. No fork or exec is on
//! the hook's path (but for a hook that comes within `NEXT_READY_DELAY` of the last claim, as in
//! a burst of starts: it waits for the next ready child's fork), and every holder shares the
//! spare's pages (the binary's relocated data, the heap as it was) until it writes them: a host's
//! holders cost a little private memory each, not a whole process's (see `footprint`).
//!
//! If anything fails, the hook falls back to starting a holder itself. The spare exits when its
//! run directory goes away, on `release` (`install.sh --uninstall`), and when claimed after an
//! upgrade replaced its binary (the hook then starts a holder and a spare of the new one); a
//! ready child dies with its parent.

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use log::{info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::bootstrap::{close_inherited, name_self, protect_self};
use super::fdpass;
use super::footprint::Footprint;
use super::protocol::{self, ErrorCode, Request, Response, MAX_FRAME};
use super::serve::accept_conn;
use super::server::{Holder, Next, TICK};
use crate::config::Config;
use crate::lock;
use crate::paths::Paths;

/// Whether a spare is running for this run directory.
pub fn exists(paths: &Paths) -> bool {
    File::open(paths.spare_lock()).is_ok_and(|f| matches!(lock::probe_fd(&f, 0), Ok(Some(_))))
}

fn reply(conn: &std::os::fd::OwnedFd, response: &Response) {
    if let Ok(bytes) = protocol::encode(response) {
        let _ = fdpass::send(conn.as_fd(), &bytes, &[]);
    }
}

/// Whether the binary this process runs was replaced (an upgrade renamed a new one over it).
fn binary_replaced() -> bool {
    fs::read_link("/proc/self/exe").is_ok_and(|exe| exe.as_os_str().as_encoded_bytes().ends_with(b" (deleted)"))
}

/// The socket file the spare bound. A run directory removed and made again (`rm -rf`, or an
/// uninstall and install) within a tick may hold another spare's socket by the same name by the
/// time this one looks: only the same file (device and inode) means the spare is still reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketFile {
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn at(path: &Path) -> Option<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(path).ok().map(|m| SocketFile { dev: m.dev(), ino: m.ino() })
    }

    fn still_at(self, path: &Path) -> bool {
        SocketFile::at(path) == Some(self)
    }
}

/// What the ready child writes to its parent to make every spare process exit (`release`, or
/// a binary replaced by an upgrade). Closing the pipe without it means: claimed (or died).
const EXIT_ALL: u8 = b'X';

/// Claims that may wait for the ready child at once (guests starting together).
const SPARE_BACKLOG: i32 = 256;

/// How long after a claim the spare waits before it forks the next ready child, unless a hook
/// connects meanwhile: longer than a `prepare` takes once it has claimed (about 0.5 ms).
const NEXT_READY_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// The spare's main: the parent of the ready child (see the module documentation). It keeps
/// `spare.lock` and the listening socket (shared with the ready child) and never starts a
/// thread, so that it can fork at any time.
pub fn run(config_path: &Path) -> i32 {
    close_inherited(-1);
    protect_self();
    name_self(c"lockhook-spare");
    super::footprint::one_arena();
    // Taken before the load: a change in between makes the first claim read the file again.
    let stamp = Config::stamp(config_path);
    let Ok(config) = Config::load(config_path) else { return 1 };
    crate::logging::init_daemon(&config);
    let paths = Paths::new(&config.run_dir);
    if crate::rundir::ensure_run_dir(paths.run_dir()).is_err() {
        return 1;
    }
    // Another spare runs when this lock is taken.
    let Ok(spare_lock) = crate::rundir::lock_instance_file(&paths.spare_lock()) else { return 0 };
    // Read before the socket appears: whoever finds the socket finds no transient fd open here.
    let footprint = Footprint::new();
    let socket = paths.spare_socket();
    let Ok(listener) = crate::rundir::listen_with_backlog(&socket, SPARE_BACKLOG) else { return 1 };
    let Some(bound) = SocketFile::at(&socket) else { return 1 };
    let me = nix::unistd::getpid();
    loop {
        if !bound.still_at(&socket) {
            return 0; // the run directory (or this socket) was removed; the ready child dies with us
        }
        let Ok((notice, notify)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else { return 1 };
        // SAFETY: this process is single-threaded (it never starts a thread), so the child may
        // run any code: no lock of another thread is held across the fork.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(notice);
                drop(spare_lock);
                return ready(config_path, (&config, stamp), &footprint, (listener, bound), notify, me);
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => drop(notify),
            Err(e) => {
                // Nobody would answer a hook that connects: stop listening, so that it starts a
                // holder itself at once.
                warn!("spare holder: cannot fork: {e}; exiting");
                if bound.still_at(&socket) {
                    let _ = fs::remove_file(&socket);
                }
                return 1;
            }
        }
        // Until the ready child is claimed (or dies, or says that every spare should exit).
        loop {
            footprint.shed();
            let mut fds = [PollFd::new(notice.as_fd(), PollFlags::POLLIN)];
            let woken =
                matches!(poll(&mut fds, PollTimeout::try_from(TICK).unwrap_or(PollTimeout::MAX)), Ok(n) if n > 0);
            if !bound.still_at(&socket) {
                return 0;
            }
            if woken {
                let mut byte = [0u8; 1];
                match nix::unistd::read(notice.as_raw_fd(), &mut byte) {
                    Ok(1) if byte[0] == EXIT_ALL => return 0,
                    Err(nix::Error::EINTR) => continue,
                    _ => break, // claimed or gone: fork the next one
                }
            }
        }
        // The next ready child is forked a little later, unless a hook is waiting already (a
        // burst of starts): the claimed holder and its hook have a CPU each meanwhile. A fork
        // beside them (it copies this process's page tables) delayed their exchange by 0.2 ms.
        let mut waiting = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut waiting, PollTimeout::try_from(NEXT_READY_DELAY).unwrap_or(PollTimeout::MAX));
    }
}

/// Whether the peer of `conn` closed its end (what it sent before may still be queued).
fn hung_up(conn: &OwnedFd) -> bool {
    // A unix stream or seqpacket socket whose peer closed polls as hung up (always reported).
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

/// How long a claimed holder waits for its hook's locks (the hook resolves the guest's storage
/// meanwhile). A hook silent this long is stuck (a hung mount): the holder lets go of the guest's
/// name rather than keep it while nothing is handed over, and that start fails.
pub const AWAIT_LOCKS: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until `conn` has a request to read or its peer hung up (true), or `AWAIT_LOCKS` passed.
fn await_request(conn: &OwnedFd) -> bool {
    let deadline = std::time::Instant::now() + AWAIT_LOCKS;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)) {
            Ok(0) => return false,
            Err(nix::Error::EINTR) => continue,
            _ => return true,
        }
    }
}

/// The ready child: answers on the spare's socket until a hook claims it, then is that guest's
/// holder. It dies with its parent until then (`PR_SET_PDEATHSIG`).
fn ready(
    config_path: &Path,
    (config, stamp): (&Config, Option<crate::config::Stamp>),
    footprint: &Footprint,
    (listener, bound): (OwnedFd, SocketFile),
    notify: OwnedFd,
    parent: nix::unistd::Pid,
) -> i32 {
    set_parent_death_signal(libc::SIGKILL);
    if nix::unistd::getppid() != parent {
        return 0; // the parent is already gone
    }
    let socket = Paths::new(&config.run_dir).spare_socket();
    // Ready to answer: the code of a claim mapped now, not faulted in while a hook waits. A hook
    // already waiting (a burst of starts, each claim forking the next ready child) is answered
    // first: mapping the whole binary in would hold up every claim queued behind it.
    let mut waiting = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    if !matches!(poll(&mut waiting, PollTimeout::ZERO), Ok(n) if n > 0) {
        footprint.populate();
    }
    // Every spare process exits: the parent on our word, before the hook hears back (so the hook
    // that starts a holder itself also starts a new spare).
    let exit_all = |notify: &OwnedFd| {
        // Our reply goes out after the parent exited: do not die with it.
        set_parent_death_signal(0);
        // (Not another spare's, where the run directory was made again.)
        if bound.still_at(&socket) {
            let _ = fs::remove_file(&socket);
        }
        let parent_fd = u32::try_from(parent.as_raw()).ok().and_then(super::watch::pidfd_open);
        let _ = nix::unistd::write(notify, &[EXIT_ALL]);
        if let Some(fd) = parent_fd {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(1000u16));
        }
    };
    loop {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let woken = matches!(poll(&mut fds, PollTimeout::try_from(TICK).unwrap_or(PollTimeout::MAX)), Ok(n) if n > 0);
        if !bound.still_at(&socket) {
            return 0; // the run directory (or this socket) was removed
        }
        if !woken {
            footprint.shed_anonymous();
            continue;
        }
        let Ok((conn, allowed)) = accept_conn(&listener) else { continue };
        let request = match fdpass::recv_frame(conn.as_fd(), MAX_FRAME, std::time::Duration::ZERO) {
            Ok((frame, _)) if !frame.is_empty() => protocol::decode::<Request>(&frame),
            _ => continue,
        };
        if !allowed {
            reply(
                &conn,
                &Response::Error { code: ErrorCode::Denied, message: "only root may talk to a lockhook holder".into() },
            );
            continue;
        }
        match request {
            Ok(Request::Claim { uuid }) => {
                if binary_replaced() {
                    // An upgrade replaced lockhook: the guest gets a holder of the new binary,
                    // which the hook starts (and with it, a new spare).
                    info!("spare holder {}: lockhook was upgraded; exiting", std::process::id());
                    exit_all(&notify);
                    let message = "this spare is from a replaced binary".into();
                    reply(&conn, &Response::Error { code: ErrorCode::Failed, message });
                    return 0;
                }
                // From here on this process outlives the spare, whatever happens to it.
                set_parent_death_signal(0);
                // The config may have changed since the spare started (one `stat` says whether).
                let config = match Config::stamp(config_path) {
                    now @ Some(_) if now == stamp => config.clone(),
                    _ => Config::load(config_path).unwrap_or(config.clone()),
                };
                match Holder::start(&config, &uuid, false) {
                    Ok(mut holder) => {
                        // Invariant: nothing of the spare stays open in the guest's holder.
                        // Closing `notify` tells the spare to make a new ready child: only once
                        // the hook has its answer, which would otherwise wait while the woken
                        // spare takes this CPU (0.12 ms measured here, for a `setsid`).
                        drop(listener);
                        let _ = nix::unistd::setsid();
                        name_self(c"lockhook-holder");
                        reply(&conn, &Response::Ok);
                        drop(notify);
                        // A hook that gave up waiting for this answer (see `CLAIM_TIMEOUT`) hung
                        // up and starts a holder itself: this one lets go of the guest's name at
                        // once, and serves nothing that may be queued behind the claim.
                        if hung_up(&conn) {
                            holder.exit();
                            warn!("spare holder {}: the hook that claimed it for {uuid} is gone", std::process::id());
                            return 0;
                        }
                        info!("spare holder {} is now the holder of {uuid}", std::process::id());
                        // The hook claims before it resolves the guest's storage (see
                        // `Client::begin_claim`), which may take longer than a connection may
                        // stay silent: its request is awaited while it stays connected, up to
                        // `AWAIT_LOCKS`.
                        if !await_request(&conn) {
                            holder.exit();
                            warn!(
                                "spare holder {}: the hook that claimed it for {uuid} sent nothing in {} s",
                                std::process::id(),
                                AWAIT_LOCKS.as_secs()
                            );
                            return 0;
                        }
                        if let Next::Exit = holder.serve_conn(&conn, allowed) {
                            return 0;
                        }
                        drop(conn);
                        // As after any request (see `Holder::serve`): off the hook's critical path.
                        holder.sync_records();
                        holder.serve(footprint);
                        return 0;
                    }
                    Err(e) => {
                        // The hook starts a holder itself. This child exits rather than wait for
                        // the next claim (its parent may have gone meanwhile, and with it the
                        // death signal): the spare forks a fresh one.
                        warn!("spare holder: cannot become the holder of {uuid}: {e}");
                        reply(&conn, &Response::Error { code: ErrorCode::Failed, message: e.to_string() });
                        return 1;
                    }
                }
            }
            Ok(Request::Release) => {
                exit_all(&notify);
                reply(&conn, &Response::Ok);
                return 0;
            }
            Ok(_) => {
                reply(&conn, &Response::Error { code: ErrorCode::BadRequest, message: "this is a spare holder".into() })
            }
            Err(e) => reply(&conn, &Response::Error { code: ErrorCode::BadRequest, message: e.to_string() }),
        }
    }
}

/// The signal this process gets when its parent exits (0: none).
fn set_parent_death_signal(signal: libc::c_int) {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong);
    }
}
