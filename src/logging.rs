//! Two small `log::Log` sinks: stderr for the CLI, and syslog (`/dev/log`) plus an optional
//! file for the hook and the holders.
//!
//! The hook must not log to stderr: when it fails, libvirt appends *all* of its stderr to the
//! error the user sees, and that must be only lockhook's one-line-per-conflict message. Holders
//! have /dev/null as stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::Config;

struct Logger {
    stderr: bool,
    /// Log to `/dev/log`: a socket per message, so a holder keeps no extra fd while idle.
    syslog: bool,
    file: Option<Mutex<File>>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string().replace('\n', " ");
        if self.stderr {
            eprintln!("lockhook: {}: {message}", record.level().as_str().to_lowercase());
        }
        if self.syslog {
            send_syslog(Path::new(DEV_LOG), record.level(), &message);
        }
        if let Some(file) = &self.file {
            if let Ok(mut f) = file.lock() {
                let _ = writeln!(
                    f,
                    "{} lockhook[{}] {}: {message}",
                    crate::clock::now(),
                    std::process::id(),
                    record.level()
                );
            }
        }
    }

    fn flush(&self) {}
}

fn install(logger: Logger, level: LevelFilter) {
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

const DEV_LOG: &str = "/dev/log";

/// Sends one line to the syslog socket at `dev_log` without ever waiting: the socket is
/// non-blocking, so a stalled journald (its receive queue full) costs us the line, not the
/// guest start the hook is deciding on.
fn send_syslog(dev_log: &Path, level: Level, message: &str) {
    let Ok(sock) = UnixDatagram::unbound() else { return };
    if sock.set_nonblocking(true).is_err() || sock.connect(dev_log).is_err() {
        return;
    }
    // facility daemon (3), RFC 3164 framing as journald and rsyslog accept it.
    let severity = match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    };
    let line = format!("<{}>lockhook[{}]: {message}", 3 * 8 + severity, std::process::id());
    // A full queue gives EAGAIN: the line is dropped.
    let _ = sock.send(line.as_bytes());
}

/// Opens the configured log file for appending: never through a symlink, never blocking (a
/// FIFO put there would stall every hook call), and only if it is a regular file.
fn log_file(path: Option<&Path>) -> Option<Mutex<File>> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path?)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    Some(Mutex::new(file))
}

/// CLI: log lines go to stderr.
pub fn init_cli(level: LevelFilter) {
    install(Logger { stderr: true, syslog: false, file: None }, level);
}

/// Hook and holder: syslog when there is one, and the configured log file.
pub fn init_daemon(config: &Config) {
    install(Logger { stderr: false, syslog: true, file: log_file(config.log_file.as_deref()) }, config.level());
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_stalled_syslog_drops_lines_instead_of_blocking() {
        let dir = tempfile::tempdir().expect("dir");
        let dev_log = dir.path().join("log");
        // A journald that never reads: fill its receive queue until a send would block.
        let server = UnixDatagram::bind(&dev_log).expect("bind");
        let filler = UnixDatagram::unbound().expect("socket");
        filler.set_nonblocking(true).expect("nonblocking");
        filler.connect(&dev_log).expect("connect");
        let mut sent = 0;
        while filler.send(&[b'x'; 512]).is_ok() {
            sent += 1;
            assert!(sent < 1_000_000, "the receive queue never filled");
        }
        let started = Instant::now();
        for _ in 0..100 {
            send_syslog(&dev_log, Level::Error, "a line nobody will read");
        }
        assert!(started.elapsed() < Duration::from_secs(2), "logging blocked on a full syslog socket");
        drop(server);
    }

    #[test]
    fn log_file_is_regular_and_never_through_a_symlink_or_fifo() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("lockhook.log");
        assert!(log_file(Some(&file)).is_some());
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).expect("symlink");
        assert!(log_file(Some(&link)).is_none());
        assert!(!dir.path().join("elsewhere").exists());
        let fifo = dir.path().join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        // No reader: a blocking open for writing would hang here.
        assert!(log_file(Some(&fifo)).is_none());
    }
}
