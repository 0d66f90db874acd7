//! The holder: one small process per running guest that keeps the guest's lock fds open.
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
//! Then it serves one connection at a time. It exits after `release`, when the guest's QEMU
//! process ends (libvirtd may be down and never send `release`), or when nothing was handed to
//! it and the hook that started it is gone (killed mid-`prepare`), or `IDLE_EXIT` passed.
//!
//! Once a `TICK` it heals what others may have broken: a deleted socket is bound again, a
//! missing or corrupt state file is rewritten, a deleted instance-lock file is recreated and
//! locked, so the guest stays reachable and nameable.

use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{self, accept4, setsockopt, sockopt, SockFlag};
use nix::sys::time::TimeVal;

use super::protocol::{self, ErrorCode, Guest, Request, Response, MAX_FRAME};
use super::records::RecordKeeper;
use super::{fdpass, footprint, handover, hotplug};
use crate::config::Config;
use crate::domain::Uuid;
use crate::paths::Paths;
use crate::rundir::RunDirError as HolderError;
use crate::rundir::{ensure_run_dir, listen_on, take_instance_lock};
use crate::state::{self, GuestState, Resource};

/// A holder that was given nothing this long after its start exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);
/// How long one connection may stay silent before the holder drops it.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the holder checks its files (and, without pidfd support, its QEMU process).
pub const TICK: Duration = Duration::from_secs(1);
/// While a destination holder waits for a migration source and its QEMU has not shown itself,
/// it looks this often (see `guard_incoming`): well inside the time QEMU waits on `-S`.
const GUARD_POLL: Duration = Duration::from_millis(10);
/// Every this many ticks the holder re-publishes owner records someone removed.
const RECORD_REFRESH_TICKS: u64 = 60;

struct Qemu {
    pid: u32,
    start_time: u64,
    pidfd: Option<OwnedFd>,
}

pub(crate) struct Holder {
    uuid: Uuid,
    paths: Paths,
    config: Config,
    since: String,
    host: String,
    /// When this holder started.
    started: Instant,
    guest: Option<Guest>,
    held: Vec<(Resource, OwnedFd)>,
    watched: Watched,
    hotplug: Hotplug,
    migration: Migration,
    files: RunFiles,
    records: Records,
}

/// The processes the holder watches through pidfds.
struct Watched {
    /// The hook that started us (a pidfd), until it has handed something over.
    spawner: Option<OwnedFd>,
    qemu: Option<Qemu>,
}

/// The guest's live definition (libvirt's status file), watched for hot-plug once QEMU runs.
struct Hotplug {
    status: Option<hotplug::StatusFile>,
    live: Option<crate::domain::Domain>,
    conflicts: Vec<state::Conflict>,
}

/// Incoming live migration: what the source still holds, and the threads waiting for it.
struct Migration {
    pending: Vec<Resource>,
    handover: Option<handover::Handover>,
    /// Started for an incoming live migration (the hook consumed a fresh `migrate` marker).
    incoming: bool,
    /// The guest's QEMU was seen with `-incoming`.
    verified: bool,
}

/// The run-directory files that make this holder reachable and nameable.
struct RunFiles {
    /// The single-instance lock; `None` once released.
    instance: Option<File>,
    listener: OwnedFd,
    /// (dev, inode, size) of the state file as last written, to notice a replaced one cheaply.
    state_written: Option<(u64, u64, u64)>,
}

/// The lockspace, and the thread that publishes owner records in it.
struct Records {
    lockspace: crate::lockspace::Lockspace,
    /// Publishes owner records in the lockspace (started when there is something to publish).
    keeper: Option<RecordKeeper>,
}

/// The fds the loop polls, one slot each; a slot whose fd is absent is not polled.
#[derive(Clone, Copy)]
enum Slot {
    /// The control socket: a connection is waiting.
    Listener,
    /// The guest's QEMU (a pidfd): readable once it exited.
    Qemu,
    /// The hook that started us (a pidfd): readable once it exited.
    Spawner,
    /// The hand-over's wake-up pipe: readable once a wait finished.
    Handover,
}

/// What woke the holder up.
#[derive(Default)]
struct Events {
    listener: bool,
    qemu_gone: bool,
    spawner_gone: bool,
    handover: bool,
}

impl Events {
    fn mark(&mut self, slot: Slot) {
        match slot {
            Slot::Listener => self.listener = true,
            Slot::Qemu => self.qemu_gone = true,
            Slot::Spawner => self.spawner_gone = true,
            Slot::Handover => self.handover = true,
        }
    }
}

/// What the loop does after a request.
pub(crate) enum Next {
    Continue,
    Exit,
}

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

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::pid_t::try_from(pid).ok()?, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel returned a fresh descriptor (CLOEXEC by default) that only we own.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn report(ready: &mut Option<File>, message: &str) {
    if let Some(mut pipe) = ready.take() {
        let _ = std::io::Write::write_all(&mut pipe, format!("E{message}").as_bytes());
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
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            report(&mut ready, &e.to_string());
            return 1;
        }
    };
    crate::logging::init_daemon(&config);
    let mut holder = match Holder::start(&config, uuid, true) {
        Ok(holder) => holder,
        Err(e) => {
            error!("holder for {uuid}: {e}");
            report(&mut ready, &e.to_string());
            return 1;
        }
    };
    if let Some(mut pipe) = ready.take() {
        let _ = std::io::Write::write_all(&mut pipe, protocol_ready());
    }
    holder.serve();
    0
}

/// Accepts a connection, with timeouts set, and says whether its peer may send requests
/// (`SO_PEERCRED`: root or this holder's own uid).
pub(crate) fn accept_conn(listener: &OwnedFd) -> nix::Result<(OwnedFd, bool)> {
    let fd = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new descriptor that only we own.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = TimeVal::new(CONN_TIMEOUT.as_secs() as libc::time_t, 0);
    let _ = setsockopt(&conn, sockopt::ReceiveTimeout, &timeout);
    let _ = setsockopt(&conn, sockopt::SendTimeout, &timeout);
    let allowed = match socket::getsockopt(&conn, sockopt::PeerCredentials) {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(_) => false,
    };
    Ok((conn, allowed))
}

fn protocol_ready() -> &'static [u8] {
    super::spawn::READY
}

impl Holder {
    /// Takes the instance lock of `uuid` and listens on its socket. With `watch_parent`, the
    /// parent (the hook that spawned us) is watched until it hands something over.
    pub(crate) fn start(config: &Config, uuid: &Uuid, watch_parent: bool) -> Result<Holder, HolderError> {
        let paths = Paths::new(&config.run_dir);
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
            files: RunFiles { instance: Some(instance), listener, state_written: None },
            records: Records { lockspace: crate::lockspace::Lockspace::new(&config.lockspace_dir), keeper: None },
        })
    }

    pub(crate) fn serve(&mut self) {
        let started = Instant::now();
        let mut last_tick = Instant::now();
        let code = footprint::CodePages::new();
        let mut ticks = 0u64;
        loop {
            let idle = self.held.is_empty() && self.migration.pending.is_empty();
            if idle && (started.elapsed() >= IDLE_EXIT || self.watched.spawner.is_none()) {
                info!("holder for {}: nothing was handed over; exiting", self.uuid);
                return self.exit();
            }
            let timeout = if idle {
                TICK.min(IDLE_EXIT.saturating_sub(started.elapsed()))
            } else if self.guarding() {
                GUARD_POLL
            } else {
                TICK
            };
            let events = match self.wait(timeout) {
                Ok(events) => events,
                Err(e) => {
                    error!("holder for {}: poll failed: {e}", self.uuid);
                    std::thread::sleep(TICK);
                    continue;
                }
            };
            if events.qemu_gone || self.qemu_exited() {
                let pid = self.watched.qemu.as_ref().map_or(0, |q| q.pid);
                warn!("guest {}: QEMU (pid {pid}) is gone and no release came; releasing its locks", self.describe());
                return self.exit();
            }
            if events.spawner_gone {
                self.watched.spawner = None;
            }
            if events.handover {
                self.take_over();
            }
            if self.guarding() {
                if let Next::Exit = self.guard_incoming() {
                    return self.exit();
                }
            }
            if events.listener {
                if let Next::Exit = self.accept_one() {
                    // `release` was answered: the locks are gone; tidy up the records.
                    return self.withdraw_records();
                }
                // After the ACK: records are for naming holders, not on the start's critical path.
                self.sync_records();
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                ticks += 1;
                self.heal();
                // Owner records removed by someone else come back, once a minute: the record
                // thread's work would otherwise map code pages again after every tick.
                if ticks % RECORD_REFRESH_TICKS == 0 {
                    if let Some(records) = &self.records.keeper {
                        records.refresh();
                    }
                }
                self.follow_hotplug();
                self.sync_records();
                // Between ticks the holder only sleeps: give back the code pages it touched.
                code.shed();
            }
        }
    }

    fn wait(&self, timeout: Duration) -> nix::Result<Events> {
        let slots = [
            (Slot::Listener, Some(self.files.listener.as_fd())),
            (Slot::Qemu, self.watched.qemu.as_ref().and_then(|q| q.pidfd.as_ref()).map(AsFd::as_fd)),
            (Slot::Spawner, self.watched.spawner.as_ref().map(AsFd::as_fd)),
            (Slot::Handover, self.migration.handover.as_ref().map(handover::Handover::fd)),
        ];
        let (polled, mut fds): (Vec<Slot>, Vec<PollFd<'_>>) =
            slots.into_iter().filter_map(|(slot, fd)| Some((slot, PollFd::new(fd?, PollFlags::POLLIN)))).unzip();
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e),
        }
        let mut events = Events::default();
        for (slot, fd) in polled.into_iter().zip(&fds) {
            if fd.revents().is_some_and(|r| !r.is_empty()) {
                events.mark(slot);
            }
        }
        Ok(events)
    }

    /// Restores the files that make this holder reachable and nameable when someone removed or
    /// damaged them (an administrator's `rm -rf /run/lockhook`, a corrupt state file).
    fn heal(&mut self) {
        let socket = self.paths.socket(&self.uuid);
        if fs::symlink_metadata(&socket).is_err() {
            let relisten = ensure_run_dir(self.paths.run_dir()).and_then(|()| listen_on(&socket));
            match relisten {
                Ok(listener) => {
                    warn!("holder for {}: {} was removed; listening again", self.uuid, socket.display());
                    self.files.listener = listener;
                }
                Err(e) => warn!("holder for {}: {}", self.uuid, crate::error_chain(&e)),
            }
        }
        let lock_path = self.paths.instance_lock(&self.uuid);
        let ours = self.files.instance.as_ref().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
        let on_disk = fs::metadata(&lock_path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_none() || ours != on_disk {
            match take_instance_lock(&self.paths, &self.uuid) {
                Ok(file) => {
                    warn!("holder for {}: {} was removed or replaced; locked it again", self.uuid, lock_path.display());
                    self.files.instance = Some(file);
                }
                Err(e) => warn!("holder for {}: {}", self.uuid, crate::error_chain(&e)),
            }
        }
        if self.guest.is_some() {
            let state_path = self.paths.state(&self.uuid);
            // A stat a second; the file is parsed only when it is not the one last written.
            let current = fs::metadata(&state_path).ok().map(|m| (m.dev(), m.ino(), m.len()));
            if current.is_none() || current != self.files.state_written {
                match self.save() {
                    Ok(()) => {
                        warn!("holder for {}: {} was missing or damaged; rewrote it", self.uuid, state_path.display())
                    }
                    Err(e) => warn!("holder for {}: {}", self.uuid, crate::error_chain(&e)),
                }
            }
        }
    }

    /// Re-reads the guest's live definition when libvirt changed it (or while a conflict is
    /// pending) and brings the locks in line; see `hotplug`.
    fn follow_hotplug(&mut self) {
        let Some(status) = self.hotplug.status.as_mut() else { return };
        let domain = match status.changed() {
            Some(domain) if domain.uuid == self.uuid => {
                self.hotplug.live = Some(domain.clone());
                domain
            }
            Some(_) => return,
            None if !self.hotplug.conflicts.is_empty() => match &self.hotplug.live {
                Some(domain) => domain.clone(),
                None => return,
            },
            None => return,
        };
        let pending: Vec<_> = self.migration.pending.iter().map(|r| r.identity).collect();
        let change = hotplug::sync(&mut self.held, &pending, &domain, &self.config, &self.paths);
        let locks_changed = !change.is_empty();
        let mut fresh = Vec::new();
        let conflicts: Vec<state::Conflict> = change
            .conflicts
            .into_iter()
            .map(|mut c| {
                match self.hotplug.conflicts.iter().find(|old| old.path == c.path) {
                    Some(old) => c.since = old.since.clone(),
                    None => fresh.push(c.clone()),
                }
                c
            })
            .collect();
        let conflicts_changed = conflicts != self.hotplug.conflicts;
        self.hotplug.conflicts = conflicts;
        for c in &fresh {
            let now = match self.held.iter().find(|(r, _)| r.path == c.path) {
                Some((r, _)) => format!("it stays locked {} for this guest", r.mode.as_str()),
                None => "it is NOT locked for this guest".to_owned(),
            };
            error!(
                "guest {}: CONFLICT: {} wanted {}, but it {}; {now}; retrying (on_conflict = {:?})",
                self.describe(),
                c.path.display(),
                c.mode.as_str(),
                c.held_by,
                self.config.on_conflict
            );
        }
        if !fresh.is_empty() && self.config.on_conflict == crate::config::ConflictPolicy::Pause {
            self.pause_guest();
        }
        if locks_changed || conflicts_changed {
            if let Err(e) = self.save() {
                warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
            }
        }
    }

    /// Pauses the guest through libvirt. Allowed here (the holder is not a hook, so libvirt is
    /// not waiting for it); the child is not waited for (SIGCHLD is ignored, so it is reaped).
    fn pause_guest(&self) {
        let spawned = std::process::Command::new("virsh")
            .args(["-c", "qemu:///system", "suspend", self.uuid.as_str()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(_) => warn!("guest {}: pausing it (on_conflict = \"pause\")", self.describe()),
            Err(e) => error!("guest {}: cannot run virsh to pause it: {e}", self.describe()),
        }
    }

    fn qemu_exited(&self) -> bool {
        self.watched.qemu.as_ref().is_some_and(|q| q.pidfd.is_none() && !crate::qemu::is_alive(q.pid, q.start_time))
    }

    fn describe(&self) -> String {
        match &self.guest {
            Some(g) => format!("{} ({})", g.name, g.uuid),
            None => self.uuid.to_string(),
        }
    }

    fn accept_one(&mut self) -> Next {
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
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let (len, fds) = match fdpass::recv(conn.as_fd(), &mut buf) {
                Ok((0, _)) => return Next::Continue,
                Ok(got) => got,
                Err(e) => {
                    warn!("holder for {}: dropping a connection: {e}", self.uuid);
                    return Next::Continue;
                }
            };
            let (response, next) = if allowed {
                match protocol::decode::<Request>(&buf[..len]) {
                    Ok(request) => self.handle(request, fds),
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
            if let Ok(bytes) = protocol::encode(&response) {
                let _ = fdpass::send(conn.as_fd(), &bytes, &[]);
            }
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
            Request::Acquire { guest, resources, pending, incoming } => {
                let response = self.acquire(guest, resources, fds);
                if response == Response::Ok {
                    self.migration.incoming |= incoming;
                    self.wait_for(pending);
                }
                (response, Next::Continue)
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
                    pending: self.migration.pending.len(),
                    incoming: self.migration.incoming,
                },
                Next::Continue,
            ),
            Request::Release => {
                info!("guest {}: released {} lock(s)", self.describe(), self.held.len());
                self.drop_all();
                (Response::Ok, Next::Exit)
            }
        }
    }

    /// Starts waiting for resources the same guest still holds on another host (see `handover`).
    fn wait_for(&mut self, pending: Vec<Resource>) {
        if pending.is_empty() {
            return;
        }
        if self.migration.handover.is_none() {
            match handover::Handover::new() {
                Ok(h) => self.migration.handover = Some(h),
                Err(e) => {
                    error!("guest {}: cannot wait for the migration hand-over: {e}", self.describe());
                    return;
                }
            }
        }
        let Some(handover) = &self.migration.handover else { return };
        for resource in pending {
            let known = self.held.iter().any(|(r, _)| r.identity == resource.identity)
                || self.migration.pending.iter().any(|r| r.identity == resource.identity);
            if known {
                continue;
            }
            info!("guest {}: waiting for {} to be released by its source host", self.describe(), resource.name());
            handover.wait_for(resource.clone(), &self.records.lockspace);
            self.migration.pending.push(resource);
        }
        if let Err(e) = self.save() {
            warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
        }
    }

    /// Whether this holder must watch for its guest's QEMU: it waits for a migration source and
    /// has not seen an incoming QEMU yet.
    fn guarding(&self) -> bool {
        !self.migration.pending.is_empty() && self.watched.qemu.is_none() && !self.migration.verified
    }

    /// The guard of a destination holder (see `migration`): the QEMU libvirt starts for this
    /// guest must be an incoming migration (`-incoming`, paused until the switch-over); one that
    /// is not would run the guest while its source still does, so it is killed as soon as it
    /// execs, while it still waits on `-S` for libvirt's `cont`. A guest whose QEMU never comes
    /// is given up after `PENDING_BOUND`.
    fn guard_incoming(&mut self) -> Next {
        if self.started.elapsed() >= crate::migration::PENDING_BOUND {
            error!(
                "guest {}: gave up waiting for {} resource(s) held by its migration source: no QEMU came within {} s; \
                 releasing",
                self.describe(),
                self.migration.pending.len(),
                crate::migration::PENDING_BOUND.as_secs()
            );
            return Next::Exit;
        }
        let Some(guest) = &self.guest else { return Next::Continue };
        match crate::migration::find_qemu(&guest.name, &self.uuid, &self.config.libvirt_run_dir) {
            Some((pid, crate::migration::QemuKind::Incoming)) => {
                info!("guest {}: QEMU (pid {pid}) is an incoming migration; waiting for its source", self.describe());
                self.migration.verified = true;
                Next::Continue
            }
            Some((pid, _)) => {
                let names: Vec<String> = self.migration.pending.iter().map(Resource::name).collect();
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
                error!(
                    "guest {}: its QEMU (pid {pid}) is not an incoming migration, but {} is still held by this guest \
                     on another host: killed it before its CPUs could run",
                    self.describe(),
                    names.join(", ")
                );
                Next::Exit
            }
            None => Next::Continue,
        }
    }

    /// Takes over the locks whose wait finished.
    fn take_over(&mut self) {
        let Some(handover) = &self.migration.handover else { return };
        let finished = handover.finished();
        for (resource, result) in finished {
            self.migration.pending.retain(|r| r.identity != resource.identity);
            match result {
                Ok(lock) => {
                    info!(
                        "guest {}: hand-over complete: now holding {} {}",
                        self.describe(),
                        lock.mode.as_str(),
                        resource.name()
                    );
                    let held =
                        Resource { identity: lock.identity, mode: lock.mode, since: crate::clock::now(), ..resource };
                    self.held.push((held, lock.fd));
                }
                Err(e) => error!(
                    "guest {}: hand-over of {} failed: {}",
                    self.describe(),
                    resource.name(),
                    crate::error_chain(&e)
                ),
            }
        }
        if let Err(e) = self.save() {
            warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
        }
        self.sync_records();
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
        for (resource, _) in &self.held[before..] {
            info!(
                "guest {} ({}): holding {} {} ({})",
                guest.name,
                guest.uuid,
                resource.mode.as_str(),
                resource.path.display(),
                roles(resource)
            );
        }
        self.watched.spawner = None;
        Response::Ok
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

    fn save(&mut self) -> Result<(), state::StateError> {
        let guest = self.guest.clone().unwrap_or(Guest { name: String::new(), uuid: self.uuid.clone() });
        let record = GuestState {
            version: state::STATE_VERSION,
            kind: state::HolderKind::Guest,
            qemu_start_time: self.watched.qemu.as_ref().map(|q| q.start_time),
            conflicts: self.hotplug.conflicts.clone(),
            pending: self.migration.pending.clone(),
            name: guest.name,
            uuid: self.uuid.clone(),
            host: self.host.clone(),
            holder_pid: std::process::id(),
            qemu_pid: self.watched.qemu.as_ref().map(|q| q.pid),
            since: self.since.clone(),
            resources: self.held.iter().map(|(r, _)| r.clone()).collect(),
        };
        let path = self.paths.state(&self.uuid);
        state::write(&path, &record)?;
        self.files.state_written = fs::metadata(&path).ok().map(|m| (m.dev(), m.ino(), m.len()));
        Ok(())
    }

    /// Hands the owner records of what is held now to the record thread (see `records`).
    fn sync_records(&mut self) {
        let Some(guest) = &self.guest else { return };
        let wanted = self
            .held
            .iter()
            .filter(|(r, _)| !r.key.is_empty())
            .map(|(r, _)| crate::lockspace::OwnerRecord {
                command: false,
                role: r.roles.iter().find(|role| role.worth_saying()).map(ToString::to_string),
                key: r.key.clone(),
                host: self.host.clone(),
                guest: guest.name.clone(),
                uuid: self.uuid.clone(),
                mode: r.mode,
                since: r.since.clone(),
                holder_pid: std::process::id(),
            })
            .collect();
        let lockspace = &self.records.lockspace;
        self.records.keeper.get_or_insert_with(|| RecordKeeper::start(lockspace.clone())).sync(wanted);
    }

    /// Drops every lock, then the files that advertise them, and the instance lock (a new holder
    /// for this guest may start as soon as the hook has its answer). Owner records are withdrawn
    /// by `withdraw_records` after that, and only where a new holder has not replaced them.
    fn drop_all(&mut self) {
        // Invariant: the files go first, while the instance lock still keeps a new holder of this
        // guest from creating its own under the same names.
        let _ = fs::remove_file(self.paths.state(&self.uuid));
        let _ = fs::remove_file(self.paths.socket(&self.uuid));
        self.held.clear();
        // Invariant: the lock file goes while still locked (see `rundir::lock_instance_file`).
        if let Some(instance) = &self.files.instance {
            crate::rundir::remove_instance_file(&self.paths.instance_lock(&self.uuid), instance);
        }
        self.files.instance = None;
    }

    fn exit(&mut self) {
        self.drop_all();
        self.withdraw_records();
    }

    /// Withdraws every owner record and waits for the record thread to finish.
    fn withdraw_records(&mut self) {
        if let Some(mut records) = self.records.keeper.take() {
            records.stop();
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
