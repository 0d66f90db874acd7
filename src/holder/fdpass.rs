//! The only `sendmsg`/`recvmsg`/`SCM_RIGHTS` code: one datagram with its fds; and the only
//! pidfd calls (`pidfd_open`, and `pidfd_getfd`: a copy of another process's fd).
//!
//! Received fds arrive with `MSG_CMSG_CLOEXEC` and leave this module only as `OwnedFd`. A
//! truncated datagram (`MSG_TRUNC`) or truncated ancillary data (`MSG_CTRUNC`: more fds than
//! room) is an error, and whatever fds did arrive are closed by dropping them.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::protocol::MAX_FDS;

/// A pidfd of `pid`, readable once the process exits; `None` where the kernel has no pidfds.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::pid_t::try_from(pid).ok()?, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel returned a fresh descriptor (CLOEXEC by default) that only we own.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A copy of fd `fd` of the process behind `pidfd` (`pidfd_getfd`: the same open file
/// description, close-on-exec here). Needs ptrace access to it (root's own processes).
pub fn copy_fd(pidfd: BorrowedFd<'_>, fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a pidfd, an fd number of that process and flags by value; it
    // returns a new fd or -1; no memory is shared.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    let copy = RawFd::try_from(rc).ok().filter(|fd| *fd >= 0).ok_or_else(std::io::Error::last_os_error)?;
    // SAFETY: the kernel returned a fresh descriptor that only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    #[error("cannot send")]
    Send(#[source] nix::Error),
    #[error("cannot receive")]
    Receive(#[source] nix::Error),
    #[error("message was truncated")]
    Truncated,
    #[error("too many fds in one message (at most {MAX_FDS})")]
    TooManyFds,
}

/// Sends one datagram with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FdPassError> {
    if fds.len() > MAX_FDS {
        return Err(FdPassError::TooManyFds);
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(FdPassError::Send(e)),
        }
    }
}

/// Receives one datagram of at most `max` bytes into a buffer of its own size: its bytes (none
/// at end of stream) and its fds. The length is peeked first (`MSG_PEEK | MSG_TRUNC`, no room
/// for fds, so none are installed): a zeroed buffer of `max` bytes for every message would cost
/// its allocation, and, once the allocator serves it from the heap, a memset of every page.
/// With a non-zero `spin`, waits for the datagram without sleeping for up to that long first
/// (see `peek_len`).
pub fn recv_frame(sock: BorrowedFd<'_>, max: usize, spin: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>), FdPassError> {
    let len = peek_len(sock, spin)?;
    if len == 0 {
        // The end of the stream (or an empty datagram, which the protocol never sends).
        return Ok((Vec::new(), Vec::new()));
    }
    // One byte more than allowed: an oversized datagram is then truncated, and refused.
    let mut buf = vec![0u8; len.min(max.saturating_add(1))];
    let (got, fds) = recv(sock, &mut buf)?;
    if got > max {
        return Err(FdPassError::Truncated);
    }
    buf.truncate(got);
    Ok((buf, fds))
}

/// The length of the next datagram, once there is one. For up to `spin` it polls (yielding the
/// CPU between polls) instead of sleeping: a reply expected within a fraction of a millisecond
/// then costs no sleep and wake-up of this process (its CPU leaving an idle state; in a VM, the
/// host waking the vCPU). After `spin`, or at once with a zero `spin`, it blocks as usual.
fn peek_len(sock: BorrowedFd<'_>, spin: Duration) -> Result<usize, FdPassError> {
    let until = (!spin.is_zero()).then(|| Instant::now() + spin);
    loop {
        let spinning = until.is_some_and(|until| Instant::now() < until);
        let mut flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC;
        if spinning {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        let mut none = [IoSliceMut::new(&mut [])];
        match recvmsg::<()>(sock.as_raw_fd(), &mut none, None, flags) {
            Ok(msg) => return Ok(msg.bytes),
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EAGAIN) if spinning => std::thread::yield_now(),
            Err(e) => return Err(FdPassError::Receive(e)),
        }
    }
}

/// Receives one datagram into `buf`. Returns its length (0 at end of stream) and its fds.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), FdPassError> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => msg,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(FdPassError::Receive(e)),
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(FdPassError::Receive)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: the kernel just installed this descriptor in our table for this
                    // message; nothing else refers to it, so we are its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err(FdPassError::Truncated);
        }
        return Ok((msg.bytes, fds));
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;
    use crate::lock::{self, Create, LockMode};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair")
    }

    #[test]
    fn lock_survives_the_sender_closing_its_fd() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let (a, b) = pair();
        let held = lock::acquire(file.path(), LockMode::Exclusive, 0, Create::No).expect("lock");
        send(a.as_fd(), b"hello", &[held.fd.as_fd()]).expect("send");
        drop(held);
        let mut buf = [0u8; 64];
        let (n, fds) = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The sender's copy is gone; the receiver's copy still holds the lock.
        assert_eq!(lock::probe(file.path(), 0).expect("probe").0, Some(LockMode::Exclusive));
        drop(fds);
        assert_eq!(lock::probe(file.path(), 0).expect("probe").0, None);
    }

    #[test]
    fn many_fds_and_cloexec() {
        let (a, b) = pair();
        let files: Vec<_> = (0..MAX_FDS).map(|_| tempfile::tempfile().expect("temp")).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        send(a.as_fd(), b"x", &borrowed).expect("send");
        let mut buf = [0u8; 8];
        let (_, fds) = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(fds.len(), MAX_FDS);
        let flags = nix::fcntl::fcntl(fds[0].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        let too_many: Vec<_> = (0..=MAX_FDS).map(|_| files[0].as_fd()).collect();
        assert!(matches!(send(a.as_fd(), b"x", &too_many), Err(FdPassError::TooManyFds)));
    }

    /// A frame is received whole into a buffer of its size, with its fds; one over the limit is
    /// an error that consumes it (the next frame is read normally); the end of the stream is
    /// no bytes. Peeking the length installs no fds.
    #[test]
    fn frames_are_received_at_their_size() {
        let (a, b) = pair();
        let file = tempfile::tempfile().expect("temp");
        send(a.as_fd(), &[1u8; 700], &[file.as_fd()]).expect("send");
        let open_before = std::fs::read_dir("/proc/self/fd").expect("fds").count();
        let (bytes, fds) = recv_frame(b.as_fd(), 1000, Duration::ZERO).expect("recv");
        assert_eq!((bytes.len(), bytes.capacity(), fds.len()), (700, 700, 1));
        assert_eq!(std::fs::read_dir("/proc/self/fd").expect("fds").count(), open_before + 1);
        send(a.as_fd(), &[2u8; 1001], &[]).expect("send");
        send(a.as_fd(), b"next", &[]).expect("send");
        assert!(matches!(recv_frame(b.as_fd(), 1000, Duration::ZERO), Err(FdPassError::Truncated)));
        assert_eq!(recv_frame(b.as_fd(), 1000, Duration::ZERO).expect("next").0, b"next");
        send(a.as_fd(), &[3u8; 1000], &[]).expect("send");
        assert_eq!(recv_frame(b.as_fd(), 1000, Duration::ZERO).expect("at the limit").0.len(), 1000);
        drop(a);
        assert!(recv_frame(b.as_fd(), 1000, Duration::ZERO).expect("eof").0.is_empty());
    }

    /// A spinning receive gets a datagram sent while it spins, and one sent after its spin
    /// (it then blocks); it still fails at the socket's receive timeout.
    #[test]
    fn a_spinning_receive_gets_early_and_late_frames() {
        let (a, b) = pair();
        let spin = Duration::from_millis(20);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            send(a.as_fd(), b"early", &[]).expect("send");
            std::thread::sleep(Duration::from_millis(100));
            send(a.as_fd(), b"late", &[]).expect("send");
            a
        });
        assert_eq!(recv_frame(b.as_fd(), 100, spin).expect("early").0, b"early");
        let started = Instant::now();
        assert_eq!(recv_frame(b.as_fd(), 100, spin).expect("late").0, b"late");
        assert!(started.elapsed() >= Duration::from_millis(50), "the late frame came after the spin");
        let _a = sender.join().expect("sender");
        let timeout = nix::sys::time::TimeVal::new(0, 50_000);
        nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::ReceiveTimeout, &timeout).expect("timeout");
        assert!(matches!(recv_frame(b.as_fd(), 100, spin), Err(FdPassError::Receive(nix::Error::EAGAIN))));
    }

    /// A peer that closes with our request unread resets the connection: a spinning receive
    /// reports that error (the hook then says why), not the end of the stream.
    #[test]
    fn a_reset_is_not_read_as_the_end_of_the_stream() {
        let (holder, hook) = pair();
        send(hook.as_fd(), b"request", &[]).expect("send");
        drop(holder);
        let got = recv_frame(hook.as_fd(), 100, Duration::from_millis(5));
        assert!(matches!(got, Err(FdPassError::Receive(nix::Error::ECONNRESET))), "{got:?}");
    }

    #[test]
    fn truncated_datagram_is_an_error() {
        let (a, b) = pair();
        send(a.as_fd(), &[7u8; 100], &[]).expect("send");
        let mut small = [0u8; 10];
        assert!(matches!(recv(b.as_fd(), &mut small), Err(FdPassError::Truncated)));
        drop(a);
        let mut buf = [0u8; 10];
        assert_eq!(recv(b.as_fd(), &mut buf).expect("eof").0, 0);
    }
}
