//! Answering a holder's requests: one connection at a time, each request one reply (see
//! `protocol`). This room owns the hazard of a reply that says more than is true: an `ok` for
//! `acquire` goes out only once the holder owns the fds and its state file lists them; a peer
//! that is not root (or the holder's own uid, `SO_PEERCRED`) changes nothing.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use log::{error, info, warn};
use nix::sys::socket::{self, accept4, setsockopt, sockopt, SockFlag};
use nix::sys::time::TimeVal;

use super::fdpass;
use super::hotplug;
use super::protocol::{self, ErrorCode, Guest, Request, Response, MAX_FRAME};
use super::server::{Holder, Next, Qemu};
use super::watch::pidfd_open;
use crate::state::Resource;

/// How long one connection may stay silent before the holder drops it.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts a connection, with timeouts set, and says whether its peer may send requests
/// (`SO_PEERCRED`: root or this holder's own uid).
pub(crate) fn accept_conn(listener: &OwnedFd) -> nix::Result<(OwnedFd, bool)> {
    let fd = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new descriptor that only we own.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    let allowed = admit(&conn);
    Ok((conn, allowed))
}

/// Sets the timeouts of a new connection and says whether its peer may send requests.
fn admit(conn: &OwnedFd) -> bool {
    let timeout = TimeVal::new(CONN_TIMEOUT.as_secs() as libc::time_t, 0);
    let _ = setsockopt(conn, sockopt::ReceiveTimeout, &timeout);
    let _ = setsockopt(conn, sockopt::SendTimeout, &timeout);
    match socket::getsockopt(conn, sockopt::PeerCredentials) {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    }
}

impl Holder {
    pub(super) fn accept_one(&mut self) -> Next {
        match accept_conn(&self.files.listener) {
            Ok((conn, allowed)) => self.serve_conn(&conn, allowed),
            Err(e) => {
                warn!("holder for {}: accept failed: {e}", self.uuid);
                Next::Continue
            }
        }
    }

    /// Answers requests on `conn` until the peer closes it.
    pub(crate) fn serve_conn(&mut self, conn: &OwnedFd, allowed: bool) -> Next {
        loop {
            let (frame, fds) = match fdpass::recv_frame(conn.as_fd(), MAX_FRAME, std::time::Duration::ZERO) {
                Ok((frame, _)) if frame.is_empty() => return Next::Continue,
                Ok(got) => got,
                Err(e) => {
                    warn!("holder for {}: dropping a connection: {e}", self.uuid);
                    return Next::Continue;
                }
            };
            // Answered in the version asked in (an older hook after an upgrade of the holder).
            let mut version = protocol::VERSION;
            let (response, next) = if allowed {
                match protocol::decode_versioned::<Request>(&frame) {
                    Ok((v, request)) => {
                        version = v;
                        self.handle(request, fds)
                    }
                    Err(e) => (Response::Error { code: code_of(&e), message: e.to_string() }, Next::Continue),
                }
            } else {
                (
                    Response::Error {
                        code: ErrorCode::Denied,
                        message: "only root may talk to a lockhook holder".into(),
                    },
                    Next::Continue,
                )
            };
            if let Ok(bytes) = protocol::encode_as(version, &response) {
                let _ = fdpass::send(conn.as_fd(), &bytes, &[]);
            }
            let said = std::mem::take(&mut self.said_after_reply);
            crate::logging::in_one_connection(|| said.iter().for_each(|line| info!("{line}")));
            if let Next::Exit = next {
                return Next::Exit;
            }
        }
    }

    fn handle(&mut self, request: Request, fds: Vec<OwnedFd>) -> (Response, Next) {
        match request {
            Request::Claim { .. } => (
                Response::Error { code: ErrorCode::BadRequest, message: "this holder is not a spare".into() },
                Next::Continue,
            ),
            Request::Acquire { guest, resources, pending, incoming, sanlock, adopt } => {
                // A holder's age (`held`, the start grace) counts from its first hand-over: a
                // claimed spare waited while its hook resolved the storage (see `spare`).
                if self.held.is_empty() && self.migration.pending.is_empty() && !self.holds_leases() {
                    self.started = std::time::Instant::now();
                }
                // Invariant: the sanlock leases come first; if one is refused, nothing of this
                // request is kept (dropping `fds` closes our copies) and the hook refuses. A
                // re-adoption keeps what it can have instead.
                let how = crate::engine::leases::How { incoming, adopt, partial: adopt };
                let granted = match self.acquire_leases(&guest, &sanlock, how) {
                    Ok(granted) => granted,
                    Err(response) => return (response, Next::Continue),
                };
                let response = self.acquire(guest, resources, fds);
                if response == Response::Ok {
                    self.migration.incoming |= incoming;
                    self.wait_for(pending);
                    if granted.pending > 0 || !granted.missing.is_empty() {
                        let response = Response::Granted { pending: granted.pending, missing: granted.missing };
                        return (response, Next::Continue);
                    }
                }
                (response, Next::Continue)
            }
            Request::LockLost => {
                let who = self.describe();
                match &mut self.leases {
                    Some(leases) => {
                        error!(
                            "guest {who}: this host lost its sanlock lockspace lease (storage cut off?): the killpath \
                             stopped its QEMU; sanlock leases let go, local locks kept"
                        );
                        leases.lock_lost();
                    }
                    None => warn!("holder for {}: lock_lost without the sanlock engine; ignored", self.uuid),
                }
                if let Err(e) = self.save() {
                    warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
                }
                (Response::Ok, Next::Continue)
            }
            Request::SetQemu { pid, start_time } => (self.set_qemu(pid, start_time), Next::Continue),
            Request::Held => (
                Response::Held {
                    identities: self
                        .held
                        .iter()
                        .map(|(r, _)| r.identity)
                        .chain(self.migration.pending.iter().map(|r| r.identity))
                        .collect(),
                    qemu_pid: self.watched.qemu.as_ref().map(|q| q.pid),
                    age: self.started.elapsed().as_secs(),
                    pending: self.migration.pending.len() + self.leases.as_ref().map_or(0, |l| l.pending.len()),
                    incoming: self.migration.incoming,
                },
                Next::Continue,
            ),
            Request::ReleaseIfStopped { name, libvirt_run_dir } => match self.qemu_runs_as(&name, &libvirt_run_dir) {
                Some(pid) => (Response::QemuRuns { pid }, Next::Continue),
                None => self.handle(Request::Release, fds),
            },
            Request::Release => {
                self.said_after_reply.push(format!("guest {}: released {} lock(s)", self.describe(), self.held.len()));
                self.drop_all();
                (Response::Ok, Next::Exit)
            }
        }
    }

    /// The pid of the guest's QEMU, when it is alive (the same process: its start time) and
    /// libvirt's pid file for `name` under `libvirt_run_dir` names it.
    fn qemu_runs_as(&self, name: &str, libvirt_run_dir: &std::path::Path) -> Option<u32> {
        let qemu = self.watched.qemu.as_ref()?;
        crate::qemu::runs_as(qemu.pid, Some(qemu.start_time), name, &self.uuid, libvirt_run_dir).then_some(qemu.pid)
    }

    fn acquire(&mut self, guest: Guest, resources: Vec<Resource>, fds: Vec<OwnedFd>) -> Response {
        if guest.uuid != self.uuid {
            return Response::Error {
                code: ErrorCode::WrongGuest,
                message: format!("this holder is for {}, not {}", self.uuid, guest.uuid),
            };
        }
        if fds.len() != resources.len() {
            // Dropping `fds` closes what arrived.
            return Response::Error {
                code: ErrorCode::FdCount,
                message: format!("{} resources but {} fds", resources.len(), fds.len()),
            };
        }
        let before = self.held.len();
        let previous_guest = self.guest.replace(guest.clone());
        for (resource, fd) in resources.into_iter().zip(fds) {
            if !self.held.iter().any(|(r, _)| r.identity == resource.identity) {
                self.held.push((resource, fd));
            }
        }
        // Invariant: the ACK goes out only after the state file lists the new locks, so a
        // refusal on this host can name this guest as soon as the hook returns. If the state
        // cannot be written (full disk), the new locks are dropped again and the hook refuses.
        if let Err(e) = self.save() {
            self.held.truncate(before);
            self.guest = previous_guest;
            return Response::Error { code: ErrorCode::Failed, message: crate::error_chain(&e) };
        }
        // Said after the answer: a log line (a syslog send each) is not worth the hook's wait.
        for (resource, _) in &self.held[before..] {
            self.said_after_reply.push(format!(
                "guest {} ({}): holding {} {} ({})",
                guest.name,
                guest.uuid,
                resource.mode.as_str(),
                resource.path.display(),
                roles(resource)
            ));
        }
        self.watched.spawner = None;
        Response::Ok
    }

    /// Acquires the sanlock leases of an `acquire`, all or none; the number waiting for a
    /// migration source, or the response refusing the request.
    fn acquire_leases(
        &mut self,
        guest: &Guest,
        specs: &[crate::engine::LeaseSpec],
        how: crate::engine::leases::How,
    ) -> Result<crate::engine::leases::Granted, Response> {
        if specs.is_empty() {
            return Ok(crate::engine::leases::Granted::default());
        }
        if guest.uuid != self.uuid {
            return Err(Response::Error {
                code: ErrorCode::WrongGuest,
                message: format!("this holder is for {}, not {}", self.uuid, guest.uuid),
            });
        }
        let Some(leases) = &mut self.leases else {
            return Err(Response::Error {
                code: ErrorCode::Failed,
                message: "this holder was started without the sanlock engine (engine changed?); stop the guest and start it again".into(),
            });
        };
        match leases.acquire(&guest.name, specs, how) {
            Ok(granted) => {
                if !granted.missing.is_empty() {
                    if let Err(e) = self.save() {
                        warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
                    }
                }
                Ok(granted)
            }
            // A running guest keeps its local locks whatever sanlock says.
            Err(lines) if how.partial => Ok(crate::engine::leases::Granted { pending: 0, missing: lines }),
            Err(lines) => Err(Response::Refused { lines }),
        }
    }

    fn set_qemu(&mut self, pid: u32, start_time: u64) -> Response {
        if !crate::qemu::is_alive(pid, start_time) {
            return Response::Error { code: ErrorCode::Failed, message: format!("process {pid} is not running") };
        }
        self.watched.qemu = Some(Qemu { pid, start_time, pidfd: pidfd_open(pid) });
        if let Some(guest) = &self.guest {
            // The first tick compares the live definition with what the hook locked: normally
            // equal; after a re-adoption it finds what someone else took meanwhile.
            self.hotplug.status = Some(hotplug::StatusFile::new(&self.config.libvirt_run_dir, &guest.name));
        }
        match self.save() {
            Ok(()) => Response::Ok,
            Err(e) => Response::Error { code: ErrorCode::Failed, message: e.to_string() },
        }
    }
}

fn roles(resource: &Resource) -> String {
    resource.roles.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn code_of(e: &protocol::ProtocolError) -> ErrorCode {
    match e {
        protocol::ProtocolError::Version(_) => ErrorCode::Version,
        _ => ErrorCode::BadRequest,
    }
}

#[cfg(test)]
mod tests;
