//! The holder: one small process per running guest that keeps the guest's lock fds open. This
//! room owns its state and its loop: what it waits for, and when it exits (and with it, the
//! locks).
//!
//! After start-up (see `bootstrap`) it serves one connection at a time (see `serve`). It exits
//! after `release`, when the guest's QEMU process ends (libvirtd may be down and never send
//! `release`), or when nothing was handed to it and the hook that started it is gone (killed
//! mid-`prepare`), or `IDLE_EXIT` passed.
//!
//! Between requests it sleeps in `poll` on a few named slots (`Slot`) and, once a `TICK`, heals
//! its files and records (see `presence`) and follows the guest's live definition (see `watch`).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::protocol::Guest;
use super::records::RecordKeeper;
use super::{footprint, handover, hotplug};
use crate::config::Config;
use crate::domain::Uuid;
use crate::paths::Paths;
use crate::state::{self, Resource};

/// A holder that was given nothing this long after its start exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);
/// How often the holder checks its files (and, without pidfd support, its QEMU process).
pub const TICK: Duration = Duration::from_secs(1);
/// While a destination holder waits for a migration source and its QEMU has not shown itself,
/// it looks this often (see `guard_incoming`): well inside the time QEMU waits on `-S`.
const GUARD_POLL: Duration = Duration::from_millis(10);
/// While sanlock leases wait for a migration source, the holder tries them this often (each try
/// is one acquire per lease, answered by the daemon at once: `OWNER_NOWAIT`).
const LEASE_POLL: Duration = Duration::from_millis(100);
/// Up to this many live holders on the host, each gives back its pages after every tick.
const SHED_EVERY_TICK_UP_TO: u32 = 64;
/// Every this many ticks the holder re-publishes owner records someone removed (and gives back
/// the pages its ticks touched, see `footprint`).
const RECORD_REFRESH_TICKS: u64 = 60;

/// How late a timed wait may end, as a share of the wait: a tenth. The kernel ends waits that
/// fall due within each other's slack on one timer interrupt: the idle ticks of a host's
/// thousands of holders (each once a `TICK`, at its own phase) wake the CPU a few dozen times
/// a second instead of once per holder. Events (a request, QEMU's exit) end a wait at once,
/// whatever the slack; only the timeouts move, by at most a tenth.
const SLACK_DIVISOR: u32 = 10;

/// Sets this thread's timer slack for a wait of `timeout` (one `prctl`, only when it changes).
fn set_timer_slack(timeout: Duration) {
    thread_local!(static SLACK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
    // The kernel's default (50 µs) for short waits.
    let slack = u64::try_from((timeout / SLACK_DIVISOR).as_nanos()).unwrap_or(u64::MAX).max(50_000);
    if SLACK.with(|s| s.replace(slack)) != slack {
        // SAFETY: PR_SET_TIMERSLACK takes a number of nanoseconds; no memory is passed.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, slack as libc::c_ulong);
        }
    }
}

/// The guest's QEMU: pid and start time identify it across pid reuse (see `qemu`).
pub(super) struct Qemu {
    pub(super) pid: u32,
    pub(super) start_time: u64,
    pub(super) pidfd: Option<OwnedFd>,
}

pub(crate) struct Holder {
    pub(super) uuid: Uuid,
    pub(super) paths: Paths,
    pub(super) config: Config,
    pub(super) since: String,
    pub(super) host: String,
    /// When this holder started.
    pub(super) started: Instant,
    pub(super) guest: Option<Guest>,
    pub(super) held: Vec<(Resource, OwnedFd)>,
    pub(super) watched: Watched,
    pub(super) hotplug: Hotplug,
    pub(super) migration: Migration,
    pub(super) files: RunFiles,
    pub(super) records: Records,
    /// The sanlock engine's leases (`engine = "sanlock"` only).
    pub(super) leases: Option<crate::engine::leases::Leases>,
    /// Log lines of the request being answered, written once the answer went out.
    pub(super) said_after_reply: Vec<String>,
}

/// The processes the holder watches through pidfds.
pub(super) struct Watched {
    /// The hook that started us (a pidfd), until it has handed something over.
    pub(super) spawner: Option<OwnedFd>,
    pub(super) qemu: Option<Qemu>,
}

/// The guest's live definition (libvirt's status file), watched for hot-plug once QEMU runs.
pub(super) struct Hotplug {
    pub(super) status: Option<hotplug::StatusFile>,
    pub(super) live: Option<crate::domain::Domain>,
    pub(super) conflicts: Vec<state::Conflict>,
}

/// Incoming live migration: what the source still holds, and the threads waiting for it.
pub(super) struct Migration {
    pub(super) pending: Vec<Resource>,
    pub(super) handover: Option<handover::Handover>,
    /// Started for an incoming live migration (the hook consumed a fresh `migrate` marker).
    pub(super) incoming: bool,
    /// The guest's QEMU was seen with `-incoming`.
    pub(super) verified: bool,
}

/// The run-directory files that make this holder reachable and nameable.
pub(super) struct RunFiles {
    /// The single-instance lock; `None` once released.
    pub(super) instance: Option<File>,
    pub(super) listener: OwnedFd,
    /// (dev, inode, size) of the state file as last written, to notice a replaced one cheaply.
    pub(super) state_written: Option<(u64, u64, u64)>,
    /// The census this holder entered before its first state file (see `census`).
    pub(super) census: Option<crate::census::Census>,
    /// The shared locks this holder offers to the host's other guests (see `shares`).
    /// Each with the number of the fd it names (an upgrade replaces a lock's fd: see `hotplug`).
    pub(super) shares: Vec<(crate::lock::Identity, std::os::fd::RawFd)>,
}

/// The lockspace, and the thread that publishes owner records in it.
pub(super) struct Records {
    pub(super) lockspace: crate::lockspace::Lockspace,
    /// Publishes owner records in the lockspace (started when there is something to publish).
    pub(super) keeper: Option<RecordKeeper>,
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

impl Holder {
    /// The loop until the holder exits. `code` is this process's mappings (see `footprint`):
    /// read at start-up, or inherited from the spare that forked it.
    pub(crate) fn serve(&mut self, code: &footprint::Footprint) {
        let started = Instant::now();
        let mut last_tick = Instant::now();
        // Shed after start-up and after work (a request, a hand-over), and once a minute: not
        // after every idle tick on a host with many holders, which would only fault the same few
        // pages in again each second (thousands of holders would spend a share of a core on it).
        let mut shed_due = true;
        let mut ticks = 0u64;
        loop {
            let idle = self.held.is_empty() && self.migration.pending.is_empty() && !self.holds_leases();
            if idle && (started.elapsed() >= IDLE_EXIT || self.watched.spawner.is_none()) {
                info!("holder for {}: nothing was handed over; exiting", self.uuid);
                return self.exit();
            }
            let timeout = if idle {
                TICK.min(IDLE_EXIT.saturating_sub(started.elapsed()))
            } else if self.guarding() {
                GUARD_POLL
            } else if self.leases_pending() {
                LEASE_POLL
            } else {
                TICK
            };
            let events = match self.wait(timeout, std::mem::take(&mut shed_due).then_some(code)) {
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
                shed_due = true;
            }
            if self.leases_pending() {
                self.take_over_leases();
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
                shed_due = true;
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                ticks += 1;
                self.heal();
                self.enforce_lock_lost();
                // Owner records removed by someone else come back, once a minute: the record
                // thread's work would otherwise map code pages again after every tick.
                if ticks % RECORD_REFRESH_TICKS == 0 {
                    if let Some(records) = &self.records.keeper {
                        records.refresh();
                    }
                    shed_due = true;
                }
                // With few holders on the host, the pages a tick touches are shared by few and
                // count in each one's PSS: give them back after every tick (cheap at that count).
                if self.files.census.as_ref().and_then(|c| c.live().ok()).is_some_and(|n| n <= SHED_EVERY_TICK_UP_TO) {
                    shed_due = true;
                }
                // Records follow every change of the held set where it happens (a request, a
                // hand-over, hot-plug): an idle tick builds none.
                self.follow_hotplug();
            }
        }
    }

    /// Polls the slots. With `shed`, the code pages are given back right before the poll: only
    /// the few the poll's return needs fault back in while the holder sleeps (every line of code
    /// between the shedding and the sleep would map its pages again, and they would stay mapped,
    /// unshared, until the next tick).
    fn wait(&self, timeout: Duration, shed: Option<&footprint::Footprint>) -> nix::Result<Events> {
        let slots = [
            (Slot::Listener, Some(self.files.listener.as_fd())),
            (Slot::Qemu, self.watched.qemu.as_ref().and_then(|q| q.pidfd.as_ref()).map(AsFd::as_fd)),
            (Slot::Spawner, self.watched.spawner.as_ref().map(AsFd::as_fd)),
            (Slot::Handover, self.migration.handover.as_ref().map(handover::Handover::fd)),
        ];
        let (polled, mut fds): (Vec<Slot>, Vec<PollFd<'_>>) =
            slots.into_iter().filter_map(|(slot, fd)| Some((slot, PollFd::new(fd?, PollFlags::POLLIN)))).unzip();
        set_timer_slack(timeout);
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        if let Some(code) = shed {
            code.shed();
        }
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

    /// After the host lost its sanlock lockspace (see `engine::lock_lost`) the guest has no
    /// leases: a QEMU that runs again (someone sent SIGCONT to a paused one) is killed, since
    /// another host may have taken its leases by now.
    fn enforce_lock_lost(&mut self) {
        if !self.leases.as_ref().is_some_and(|l| l.lost) {
            return;
        }
        let Some(qemu) = &self.watched.qemu else { return };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", qemu.pid)).unwrap_or_default();
        let state = stat.rsplit(')').next().and_then(|rest| rest.trim_start().chars().next());
        if matches!(state, Some('T' | 't' | 'Z' | 'X') | None) || !crate::qemu::is_alive(qemu.pid, qemu.start_time) {
            return;
        }
        if let Ok(pid) = i32::try_from(qemu.pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        error!(
            "guest {}: its QEMU (pid {}) runs again after this host lost its sanlock leases: killed it (another host may hold them now)",
            self.describe(),
            qemu.pid
        );
    }

    pub(super) fn holds_leases(&self) -> bool {
        self.leases.as_ref().is_some_and(|l| !l.held.is_empty() || !l.pending.is_empty())
    }

    pub(super) fn leases_pending(&self) -> bool {
        self.leases.as_ref().is_some_and(|l| !l.pending.is_empty())
    }

    /// Takes the sanlock leases the migration source has let go of.
    fn take_over_leases(&mut self) {
        let name = self.guest.as_ref().map(|g| g.name.clone()).unwrap_or_default();
        let Some(leases) = &mut self.leases else { return };
        if !leases.take_pending(&name).is_empty() {
            if let Err(e) = self.save() {
                warn!("holder for {}: {}", self.uuid, crate::error_chain(&e));
            }
        }
    }

    pub(super) fn describe(&self) -> String {
        match &self.guest {
            Some(g) => format!("{} ({})", g.name, g.uuid),
            None => self.uuid.to_string(),
        }
    }
}
