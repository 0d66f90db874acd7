//! Talking to a guest's holder. Each method names an intent and accepts exactly one reply;
//! anything else is `ProtocolError::Unexpected`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{self, connect, setsockopt, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeVal;

use super::fdpass::{self, FdPassError};
use super::protocol::{self, ErrorCode, Guest, ProtocolError, Request, Response, MAX_FDS, MAX_FRAME};
use crate::domain::Uuid;
use crate::lock::Identity;
use crate::paths::Paths;
use crate::state::Resource;

/// How long a client waits for the holder's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a hook waits to connect to the spare and for its answer to a claim.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a client polls for a reply before it sleeps (`fdpass::recv_frame`). A holder
/// answers a hook's request in 0.1-0.3 ms; a hook that sleeps meanwhile pays its own wake-up on
/// top (measured here: `prepare` 0.11 ms faster with 300 µs of polling, 0.08 with 100).
const REPLY_SPIN: Duration = Duration::from_micros(300);

/// Cleared once a poll ran out before its reply came (a holder busy with sanlock, or without a
/// CPU to answer on): this process then sleeps at once for every later reply.
static SPIN_PAYS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `REPLY_SPIN` where this process may use more than one CPU (its affinity, and its cgroup's
/// `cpu.max` where one is set), else none: with one CPU, polling would only delay the holder it
/// waits for, and under a quota it would spend the holder's share.
fn reply_spin() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    if !SPIN_PAYS.load(std::sync::atomic::Ordering::Relaxed) {
        return Duration::ZERO;
    }
    *SPIN.get_or_init(|| {
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .map(|set| (0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).count())
            .unwrap_or(1);
        if cpus > 1 && cgroup_cpus().is_none_or(|quota| quota >= 2.0) {
            REPLY_SPIN
        } else {
            Duration::ZERO
        }
    })
}

/// How many CPUs' worth of time this process's own cgroup may use (cgroup v2 `cpu.max`: quota
/// ÷ period), `None` when unlimited or unknown.
fn cgroup_cpus() -> Option<f64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|line| line.strip_prefix("0::"))?.trim();
    cpu_max_cpus(&std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max")).ok()?)
}

/// `cpu.max` ("QUOTA PERIOD", QUOTA `max` when unlimited) as CPUs.
fn cpu_max_cpus(cpu_max: &str) -> Option<f64> {
    let mut fields = cpu_max.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next()?.parse().ok()?;
    (period > 0.0).then_some(quota / period)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: cannot connect to the holder")]
    Connect {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("holder connection")]
    Transport(#[from] FdPassError),
    #[error("holder connection closed before it replied")]
    Closed,
    #[error("holder protocol")]
    Protocol(#[from] ProtocolError),
    #[error("holder refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    /// sanlock leases that could not be had, one line each.
    #[error("{}", .0.join("; "))]
    Leases(Vec<String>),
}

/// What a holder holds, as far as the hook needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub identities: Vec<Identity>,
    pub qemu_pid: Option<u32>,
    /// Seconds since the holder started.
    pub age: u64,
    /// Resources still awaited from a migration source.
    pub pending: usize,
    /// Started for an incoming live migration.
    pub incoming: bool,
}

pub struct Client {
    sock: OwnedFd,
    /// The protocol version this holder speaks: ours, or the one before (an older holder).
    version: std::cell::Cell<u32>,
}

/// What one hand-over gives a holder: `resources[i]` describes `fds[i]`.
#[derive(Clone, Copy)]
pub struct Handed<'a> {
    pub resources: &'a [Resource],
    pub fds: &'a [std::os::fd::BorrowedFd<'a>],
    pub pending: &'a [Resource],
    pub incoming: bool,
    pub sanlock: &'a [crate::engine::LeaseSpec],
    /// Re-adoption of a running guest (see `Request::Acquire`).
    pub adopt: bool,
}

impl Client {
    /// Connects to the holder of `uuid`. `Ok(None)` when there is none (no socket, or nobody
    /// listening on it: a holder killed with SIGKILL leaves its socket file behind).
    pub fn connect(paths: &Paths, uuid: &Uuid) -> Result<Option<Client>, ClientError> {
        let path = paths.socket(uuid);
        let err = |source| ClientError::Connect { path: path.clone(), source };
        let sock =
            socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
        let addr = UnixAddr::new(&path).map_err(err)?;
        match connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr) {
            Ok(()) => {}
            Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
            Err(e) => return Err(err(e)),
        }
        let timeout = TimeVal::new(REPLY_TIMEOUT.as_secs() as libc::time_t, 0);
        let _ = setsockopt(&sock, sockopt::ReceiveTimeout, &timeout);
        let _ = setsockopt(&sock, sockopt::SendTimeout, &timeout);
        Ok(Some(Client { sock, version: std::cell::Cell::new(protocol::VERSION) }))
    }

    /// Claims this host's spare holder for `uuid` (see `holder::spare`). `None` when there is no
    /// spare, or it could not be claimed: the caller starts a holder itself.
    pub fn claim_spare(paths: &Paths, uuid: &Uuid) -> Option<Client> {
        Client::begin_claim(paths, uuid)?.finish()
    }

    /// Sends a claim of this host's spare holder for `uuid` and returns without its answer
    /// (`PendingClaim::finish` reads it), so that the spare becomes the guest's holder while the
    /// hook resolves and locks the guest's storage. `None` when there is no spare to ask.
    pub fn begin_claim(paths: &Paths, uuid: &Uuid) -> Option<PendingClaim> {
        let sock = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).ok()?;
        let addr = UnixAddr::new(&paths.spare_socket()).ok()?;
        // A spare answers a claim in well under a millisecond, one claim after another: one that
        // does not (stopped, or its queue full) is not waited for long, since the fallback (a
        // holder of our own) costs a few milliseconds. The send timeout bounds `connect` too.
        let claim = TimeVal::new(CLAIM_TIMEOUT.as_secs() as libc::time_t, 0);
        let _ = setsockopt(&sock, sockopt::ReceiveTimeout, &claim);
        let _ = setsockopt(&sock, sockopt::SendTimeout, &claim);
        connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr).ok()?;
        let client = Client { sock, version: std::cell::Cell::new(protocol::VERSION) };
        let request = Request::Claim { uuid: uuid.clone() };
        match client.send(protocol::VERSION, &request, &[]) {
            Ok(()) => Some(PendingClaim { client: Some(client), uuid: uuid.clone() }),
            Err(e) => {
                log::info!("spare holder not claimed for {uuid}: {}", crate::error_chain(&e));
                None
            }
        }
    }

    fn send(&self, v: u32, request: &Request, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<(), ClientError> {
        let bytes = protocol::encode_as(v, request)?;
        fdpass::send(self.sock.as_fd(), &bytes, fds)?;
        Ok(())
    }

    fn receive(&self) -> Result<Response, ClientError> {
        let spin = reply_spin();
        let waited = std::time::Instant::now();
        let (frame, _) = fdpass::recv_frame(self.sock.as_fd(), MAX_FRAME, spin)?;
        if !spin.is_zero() && waited.elapsed() >= spin {
            SPIN_PAYS.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        if frame.is_empty() {
            return Err(ClientError::Closed);
        }
        match protocol::decode::<Response>(&frame)? {
            Response::Error { code, message } => Err(ClientError::Refused { code, message }),
            other => Ok(other),
        }
    }

    fn call(&self, request: &Request, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<Response, ClientError> {
        match self.call_as(self.version.get(), request, fds) {
            // An older holder (the guest started before an upgrade): once more in its version.
            Err(ClientError::Refused { code: ErrorCode::Version, .. })
                if self.version.get() == protocol::VERSION && protocol::MIN_VERSION < protocol::VERSION =>
            {
                self.version.set(protocol::VERSION - 1);
                log::info!("holder speaks protocol version {} (older lockhook): talking it", protocol::VERSION - 1);
                self.call_as(self.version.get(), request, fds)
            }
            Err(ClientError::Refused { code: ErrorCode::Version, message }) => Err(ClientError::Refused {
                code: ErrorCode::Version,
                message: format!(
                    "{message}: this holder is from a lockhook too old for this one; stop and start the guest"
                ),
            }),
            other => other,
        }
    }

    fn call_as(&self, v: u32, request: &Request, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<Response, ClientError> {
        self.send(v, request, fds)?;
        self.receive()
    }

    fn expect_ok(&self, request: &Request, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<(), ClientError> {
        match self.call(request, fds)? {
            Response::Ok => Ok(()),
            other => Err(ProtocolError::Unexpected { expected: "ok", got: format!("{other:?}") }.into()),
        }
    }

    /// Hands locks over. `resources[i]` describes `fds[i]`. Sent in batches of `MAX_FDS`.
    ///
    /// Invariant: the caller keeps its own copies of the fds until this returns `Ok`; if the
    /// holder never ACKs, dropping them releases the locks, so nothing stays locked unowned.
    /// `pending` (no fds) and the sanlock leases travel with the first batch; returns how many
    /// sanlock leases wait for a migration source, and (re-adoption) the lines of those missing.
    pub fn acquire(&self, guest: &Guest, handed: Handed<'_>) -> Result<(usize, Vec<String>), ClientError> {
        let mut pending = handed.pending.to_vec();
        let mut sanlock = handed.sanlock.to_vec();
        let mut waiting = 0;
        let mut missing = Vec::new();
        let mut batches: Vec<(&[Resource], &[std::os::fd::BorrowedFd<'_>])> =
            handed.resources.chunks(MAX_FDS).zip(handed.fds.chunks(MAX_FDS)).collect();
        if batches.is_empty() {
            // Nothing with fds: one request for the rest.
            batches.push((&[], &[]));
        }
        for (res, borrowed) in batches {
            let request = Request::Acquire {
                guest: guest.clone(),
                resources: res.to_vec(),
                pending: std::mem::take(&mut pending),
                incoming: handed.incoming,
                sanlock: std::mem::take(&mut sanlock),
                adopt: handed.adopt,
            };
            let (w, m) = self.expect_granted(&request, borrowed)?;
            waiting += w;
            missing.extend(m);
        }
        Ok((waiting, missing))
    }

    fn expect_granted(
        &self,
        request: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(usize, Vec<String>), ClientError> {
        match self.call(request, fds)? {
            Response::Ok => Ok((0, Vec::new())),
            Response::Granted { pending, missing } => Ok((pending, missing)),
            Response::Refused { lines } => Err(ClientError::Leases(lines)),
            other => Err(ProtocolError::Unexpected { expected: "ok", got: format!("{other:?}") }.into()),
        }
    }

    /// Tells the holder its host lost the sanlock lockspace (the killpath).
    pub fn lock_lost(&self) -> Result<(), ClientError> {
        self.expect_ok(&Request::LockLost, &[])
    }

    pub fn set_qemu(&self, pid: u32, start_time: u64) -> Result<(), ClientError> {
        self.expect_ok(&Request::SetQemu { pid, start_time }, &[])
    }

    pub fn held(&self) -> Result<Held, ClientError> {
        match self.call(&Request::Held, &[])? {
            Response::Held { identities, qemu_pid, age, pending, incoming } => {
                Ok(Held { identities, qemu_pid, age, pending, incoming })
            }
            other => Err(ProtocolError::Unexpected { expected: "held", got: format!("{other:?}") }.into()),
        }
    }

    /// Asks the holder to drop everything and exit; returns once the locks are gone.
    pub fn release(&self) -> Result<(), ClientError> {
        self.expect_ok(&Request::Release, &[])
    }

    /// `release`, unless guest `name`'s QEMU still runs (libvirt's pid file under
    /// `libvirt_run_dir` names it): `Some(pid)` then, and nothing was let go. The holder decides,
    /// in one round trip; a holder older than that request is asked `held`, and `still_runs`
    /// decides on the pid it names.
    pub fn release_if_stopped(
        &self,
        name: &str,
        libvirt_run_dir: &std::path::Path,
        still_runs: impl Fn(u32) -> bool,
    ) -> Result<Option<u32>, ClientError> {
        let request = Request::ReleaseIfStopped { name: name.to_owned(), libvirt_run_dir: libvirt_run_dir.to_owned() };
        match self.call(&request, &[]) {
            Ok(Response::Ok) => Ok(None),
            Ok(Response::QemuRuns { pid }) => Ok(Some(pid)),
            Ok(other) => Err(ProtocolError::Unexpected { expected: "ok", got: format!("{other:?}") }.into()),
            Err(ClientError::Refused { code: ErrorCode::BadRequest, .. }) => {
                if let Some(pid) = self.held()?.qemu_pid.filter(|&pid| still_runs(pid)) {
                    return Ok(Some(pid));
                }
                self.release().map(|()| None)
            }
            Err(e) => Err(e),
        }
    }
}

/// A claim sent to the spare whose answer is not read yet (see `Client::begin_claim`).
///
/// Dropped unfinished (the start was refused before its locks were handed over), it reads the
/// answer and tells the claimed holder to exit, and returns once that holder's socket and files
/// are gone: the `release` libvirt runs next finds no holder for the guest.
pub struct PendingClaim {
    client: Option<Client>,
    uuid: Uuid,
}

impl PendingClaim {
    /// The spare's answer: the guest's holder, or `None` (the caller starts a holder itself).
    /// The claim's own timeout runs from here: the spare answered long ago unless it is stuck.
    pub fn finish(mut self) -> Option<Client> {
        self.answer()
    }

    /// Reads the answer (the first call; `None` after).
    fn answer(&mut self) -> Option<Client> {
        let client = self.client.take()?;
        let claimed = match client.receive() {
            Ok(Response::Ok) => Ok(()),
            Ok(other) => {
                Err(ClientError::from(ProtocolError::Unexpected { expected: "ok", got: format!("{other:?}") }))
            }
            Err(e) => Err(e),
        };
        let timeout = TimeVal::new(REPLY_TIMEOUT.as_secs() as libc::time_t, 0);
        let _ = setsockopt(&client.sock, sockopt::ReceiveTimeout, &timeout);
        let _ = setsockopt(&client.sock, sockopt::SendTimeout, &timeout);
        match claimed {
            Ok(()) => Some(client),
            Err(e) => {
                log::info!("spare holder not claimed for {}: {}", self.uuid, crate::error_chain(&e));
                None
            }
        }
    }
}

impl Drop for PendingClaim {
    fn drop(&mut self) {
        if let Some(client) = self.answer() {
            if let Err(e) = client.release() {
                log::info!("spare holder claimed for {}: not released: {}", self.uuid, crate::error_chain(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in holder for `UUID` in a fresh run directory: `answer` turns each request's frame
    /// (as text) into the reply's frame. The thread ends when the client hangs up and returns the
    /// requests it got.
    fn fake_holder(
        mut answer: impl FnMut(&str) -> Vec<u8> + Send + 'static,
    ) -> (tempfile::TempDir, Client, std::thread::JoinHandle<Vec<String>>) {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        let uuid = Uuid::parse("f3fa73d4-1c2b-4e5f-8a9b-0123456789ab").expect("uuid");
        let listener = crate::rundir::listen_on(&paths.socket(&uuid)).expect("listen");
        let holder = std::thread::spawn(move || {
            let (conn, _) = crate::holder::serve::accept_conn(&listener).expect("accept");
            let mut asked = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME];
            while let Ok((len, _)) = fdpass::recv(conn.as_fd(), &mut buf) {
                if len == 0 {
                    break;
                }
                let request = String::from_utf8_lossy(&buf[..len]).into_owned();
                let _ = fdpass::send(conn.as_fd(), &answer(&request), &[]);
                asked.push(request);
            }
            asked
        });
        let client = Client::connect(&paths, &uuid).expect("connect").expect("listening");
        (dir, client, holder)
    }

    #[test]
    fn a_cgroup_quota_reads_as_cpus() {
        assert_eq!(cpu_max_cpus("max 100000\n"), None);
        assert_eq!(cpu_max_cpus("50000 100000\n"), Some(0.5));
        assert_eq!(cpu_max_cpus("300000 100000"), Some(3.0));
        assert_eq!(cpu_max_cpus(""), None);
    }

    /// A holder too old for this client (it answers every request `error{version}`): one clear
    /// line saying what to do, after at most one retry in the older version.
    #[test]
    fn a_holder_too_old_gets_a_clear_line() {
        let (_dir, client, old) = fake_holder(|_| {
            let refusal =
                Response::Error { code: ErrorCode::Version, message: "protocol version 9 is not supported".into() };
            protocol::encode_as(protocol::MIN_VERSION, &refusal).expect("encode")
        });
        let err = client.held().expect_err("refused");
        let text = crate::error_chain(&err);
        assert!(text.contains("too old for this one; stop and start the guest"), "{text}");
        drop(client);
        let asked = old.join().expect("join").len();
        assert!(asked <= 2, "asked {asked} times");
    }

    /// A holder older than `release_if_stopped` (it answers `bad_request` to it): the hook asks
    /// `held` and decides itself; a QEMU that still runs keeps the locks.
    #[test]
    fn an_older_holder_is_asked_held_before_release() {
        for qemu_runs in [true, false] {
            let (_dir, client, old) = fake_holder(|request| {
                let answer = if request.contains("release_if_stopped") {
                    Response::Error { code: ErrorCode::BadRequest, message: "unknown variant".into() }
                } else if request.contains("\"held\"") {
                    Response::Held { identities: vec![], qemu_pid: Some(4242), age: 1, pending: 0, incoming: false }
                } else {
                    Response::Ok
                };
                protocol::encode(&answer).expect("encode")
            });
            let got = client
                .release_if_stopped("vm1", std::path::Path::new("/run/libvirt"), |pid| pid == 4242 && qemu_runs)
                .expect("answered");
            drop(client);
            let asked: Vec<&str> = old
                .join()
                .expect("join")
                .iter()
                .map(|r| {
                    if r.contains("release_if_stopped") {
                        "release_if_stopped"
                    } else if r.contains("\"held\"") {
                        "held"
                    } else {
                        "release"
                    }
                })
                .collect();
            if qemu_runs {
                assert_eq!(got, Some(4242));
                assert_eq!(asked, ["release_if_stopped", "held"], "nothing released while QEMU runs");
            } else {
                assert_eq!(got, None);
                assert_eq!(asked, ["release_if_stopped", "held", "release"]);
            }
        }
    }
}
