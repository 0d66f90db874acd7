//! What a process needs before `main`'s work, without std's runtime start-up (see `main.rs`).

use std::process::ExitCode;

/// Opens `/dev/null` on any of fds 0-2 that is closed and ignores `SIGPIPE`, as std's start-up
/// does.
pub fn init() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd { fd, events: 0, revents: 0 });
    // SAFETY: `fds` is a valid array of three pollfd for the length given; a zero timeout.
    let polled = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) };
    if polled != 0 {
        for pfd in fds {
            let closed = polled < 0 || pfd.revents & libc::POLLNVAL != 0;
            // SAFETY: fcntl(F_GETFD) only asks whether the fd is open.
            if closed && unsafe { libc::fcntl(pfd.fd, libc::F_GETFD) } == -1 {
                // SAFETY: a NUL-terminated path; the fd it returns is the lowest free, `pfd.fd`.
                unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            }
        }
    }
    // SAFETY: SIG_IGN is a valid disposition for SIGPIPE; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// `code` as a process exit status (std has no stable accessor).
pub fn status(code: ExitCode) -> i32 {
    (0..=u8::MAX).find(|&n| ExitCode::from(n) == code).map_or(1, i32::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_keep_their_status() {
        assert_eq!(status(ExitCode::SUCCESS), 0);
        assert_eq!(status(ExitCode::FAILURE), 1);
        for n in [2u8, 75, 255] {
            assert_eq!(status(ExitCode::from(n)), i32::from(n));
        }
    }
}
