//! Live-migration hand-over on the destination: waiting for locks the source still holds.
//!
//! libvirt runs the destination's `prepare`/`start`/`started` hooks while the source guest still
//! runs and holds its locks, and the source's `release` only after the destination runs
//! (no hook fires at the switch-over). So the destination holder starts with those resources
//! *pending*: for each, a thread blocks in `F_OFD_SETLKW`, which the kernel (or the shared
//! filesystem's lock manager) grants the moment the source's holder lets go. The thread hands the
//! locked fd to the main loop through a channel and wakes it through a pipe.
//!
//! If the migration fails or is cancelled, libvirt sends `release` to the destination, whose
//! holder exits, and its waiting threads die with it: the source's locks were never touched.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use crate::lock::{HeldLock, LockError};
use crate::lockspace::Lockspace;
use crate::state::Resource;

/// A finished wait: the resource and its lock, or why it could not be taken.
pub type Done = (Resource, Result<HeldLock, LockError>);

pub struct Handover {
    tx: Sender<Done>,
    rx: Receiver<Done>,
    wake_r: OwnedFd,
    wake_w: Arc<OwnedFd>,
}

impl Handover {
    pub fn new() -> nix::Result<Handover> {
        let (wake_r, wake_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        let (tx, rx) = mpsc::channel();
        Ok(Handover { tx, rx, wake_r, wake_w: Arc::new(wake_w) })
    }

    /// The fd to poll: readable when a wait finished.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake_r.as_fd()
    }

    /// Starts waiting for `resource` on a thread of its own. A lockspace lock file is reached
    /// through `lockspace` only (never through a symlink).
    pub fn wait_for(&self, resource: Resource, lockspace: &Lockspace) {
        let (tx, wake) = (self.tx.clone(), Arc::clone(&self.wake_w));
        // Lease files and lockspace lock files exist already (the source holds them), but may be
        // recreated if the source's cleanup raced us (the record says whether they may be).
        let lockspace = lockspace.clone();
        let spawned = std::thread::Builder::new().name("handover".into()).spawn(move || {
            let result = resource.target().take_waiting(&lockspace);
            let _ = tx.send((resource, result));
            let _ = nix::unistd::write(wake.as_fd(), b"x");
        });
        if let Err(e) = spawned {
            log::error!("cannot start a hand-over thread: {e}");
        }
    }

    /// The waits that finished since the last call.
    pub fn finished(&self) -> Vec<Done> {
        let mut drain = [0u8; 64];
        while matches!(nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&self.wake_r), &mut drain), Ok(n) if n > 0) {}
        self.rx.try_iter().collect()
    }
}
