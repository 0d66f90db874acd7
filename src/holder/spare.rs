//! The spare holder: one idle holder per host, started in the background by the first
//! `prepare` that finds none, so that guest starts claim it instead of waiting for a fork and
//! exec of a new holder (the largest fixed cost of `prepare`).
//!
//! A spare holds no lock. It keeps `<run_dir>/spare.lock` (an OFD lock: one spare at a time) and
//! listens on `<run_dir>/spare.sock`. A hook sends `claim {uuid}`: the spare forks, and the child
//! takes that guest's instance lock and socket, drops its copies of `spare.*`, answers `ok`, and
//! from then on is that guest's holder, continuing on the same connection with `acquire`; the
//! spare goes back to waiting for the next claim. Every holder forked so one shares the spare's
//! pages (the binary's relocated data, the heap as it was) until it writes them: a host's
//! holders cost a little private memory each, not a whole process's (see `footprint`).
//! If anything fails, the hook falls back to starting a holder itself. A spare exits when its run
//! directory goes away, on `release` (`install.sh --uninstall`), and when claimed after an upgrade
//! replaced its binary (the hook then starts a holder and a spare of the new one).

use std::fs::{self, File};
use std::os::fd::AsFd;
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

/// The forked child of a claimed spare: the holder of `uuid`, serving the claiming hook's
/// connection, then its guest. Returns the process's exit code.
fn become_holder(config_path: &Path, config: &Config, conn: std::os::fd::OwnedFd, uuid: &crate::domain::Uuid) -> i32 {
    // The config may have changed since this spare started.
    let config = Config::load(config_path).unwrap_or(config.clone());
    match Holder::start(&config, uuid, false) {
        Ok(mut holder) => {
            info!("holder {} of {uuid} forked from the spare", std::process::id());
            reply(&conn, &Response::Ok);
            if let Next::Exit = holder.serve_conn(&conn, true) {
                return 0;
            }
            drop(conn);
            holder.serve();
            0
        }
        Err(e) => {
            warn!("spare holder: cannot become the holder of {uuid}: {e}");
            reply(&conn, &Response::Error { code: ErrorCode::Failed, message: e.to_string() });
            1
        }
    }
}

/// The spare's main.
pub fn run(config_path: &Path) -> i32 {
    close_inherited(-1);
    protect_self();
    name_self(c"lockhook-spare");
    super::footprint::one_arena();
    let Ok(config) = Config::load(config_path) else { return 1 };
    crate::logging::init_daemon(&config);
    let paths = Paths::new(&config.run_dir);
    if crate::rundir::ensure_run_dir(paths.run_dir()).is_err() {
        return 1;
    }
    // Another spare runs when this lock is taken.
    let Ok(spare_lock) = crate::rundir::lock_instance_file(&paths.spare_lock()) else { return 0 };
    // Read before the socket appears: whoever finds the socket finds no transient fd open here.
    let code = Footprint::new();
    let socket = paths.spare_socket();
    let Ok(listener) = crate::rundir::listen_on(&socket) else { return 1 };
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let ready = matches!(poll(&mut fds, PollTimeout::try_from(TICK).unwrap_or(PollTimeout::MAX)), Ok(n) if n > 0);
        if fs::symlink_metadata(&socket).is_err() {
            return 0; // the run directory (or this socket) was removed
        }
        if !ready {
            code.shed();
            continue;
        }
        let Ok((conn, allowed)) = accept_conn(&listener) else { continue };
        let request = match fdpass::recv(conn.as_fd(), &mut buf) {
            Ok((len, _)) if len > 0 => protocol::decode::<Request>(&buf[..len]),
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
                    // which the hook starts (and with it, the next spare).
                    let _ = fs::remove_file(&socket);
                    drop(spare_lock);
                    info!("spare holder {}: lockhook was upgraded; exiting", std::process::id());
                    reply(
                        &conn,
                        &Response::Error {
                            code: ErrorCode::Failed,
                            message: "this spare is from a replaced binary".into(),
                        },
                    );
                    return 0;
                }
                // SAFETY: the spare is single-threaded (it never starts a thread), so the child
                // may run any code: no lock of another thread is held across the fork.
                match unsafe { nix::unistd::fork() } {
                    Ok(nix::unistd::ForkResult::Child) => {
                        // Invariant: nothing of the spare stays open in the guest's holder. The
                        // spare keeps its own copies (and with them spare.lock and spare.sock).
                        drop(listener);
                        drop(spare_lock);
                        let _ = nix::unistd::setsid();
                        name_self(c"lockhook-holder");
                        return become_holder(config_path, &config, conn, &uuid);
                    }
                    Ok(nix::unistd::ForkResult::Parent { .. }) => drop(conn),
                    Err(e) => {
                        warn!("spare holder: cannot fork a holder for {uuid}: {e}");
                        reply(&conn, &Response::Error { code: ErrorCode::Failed, message: format!("fork: {e}") });
                    }
                }
                code.shed();
            }
            Ok(Request::Release) => {
                reply(&conn, &Response::Ok);
                let _ = fs::remove_file(&socket);
                return 0;
            }
            Ok(_) => {
                reply(&conn, &Response::Error { code: ErrorCode::BadRequest, message: "this is a spare holder".into() })
            }
            Err(e) => reply(&conn, &Response::Error { code: ErrorCode::BadRequest, message: e.to_string() }),
        }
    }
}
