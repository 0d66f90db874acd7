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
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::Config;

struct Logger {
    stderr: bool,
    syslog: Option<&'static Syslog>,
    file: Option<Mutex<File>>,
}

/// Where `/dev/log` lines go from. A holder opens a socket per line, so it keeps no extra fd
/// while idle (and a spare forks ready children that must not share one), but one for the
/// lines of one request (`in_one_connection`: a line per resource); the hook lives a few
/// milliseconds and logs a line per locked resource, so it connects once.
struct Syslog {
    dev_log: PathBuf,
    keep: bool,
    /// One lock for the socket and the burst, so that a line another thread logs while a burst
    /// ends either goes out on the kept socket before it is closed or on a socket of its own:
    /// an idle holder never keeps one.
    state: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    socket: Option<UnixDatagram>,
    /// Within `in_one_connection`: the socket is kept until it ends.
    burst: bool,
    /// `/dev/log` could not be reached while keeping a socket: not tried again for every line.
    absent: bool,
}

/// The installed logger's syslog, for `in_one_connection`.
static SYSLOG: OnceLock<Syslog> = OnceLock::new();

impl Syslog {
    fn new(dev_log: PathBuf, keep: bool) -> Syslog {
        Syslog { dev_log, keep, state: Mutex::new(Kept::default()) }
    }

    fn begin_burst(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.burst = true;
        }
    }

    fn end_burst(&self) {
        if let Ok(mut state) = self.state.lock() {
            *state = Kept::default();
        }
    }

    fn send(&self, level: Level, message: &str) {
        let line = syslog_line(level, message);
        let Ok(mut state) = self.state.lock() else { return };
        if !self.keep && !state.burst {
            drop(state);
            if let Some(sock) = connect_syslog(&self.dev_log) {
                // A full queue gives EAGAIN: the line is dropped.
                let _ = sock.send(line.as_bytes());
            }
            return;
        }
        if state.absent {
            return;
        }
        // A kept socket whose reader went away (journald restarted) is connected once more.
        for _ in 0..2 {
            if state.socket.is_none() {
                state.socket = connect_syslog(&self.dev_log);
                if state.socket.is_none() {
                    state.absent = true;
                    return;
                }
            }
            match state.socket.as_ref().map(|s| s.send(line.as_bytes())) {
                Some(Err(e)) if e.kind() != std::io::ErrorKind::WouldBlock => state.socket = None,
                _ => return,
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let _logging = Logging::enter();
        let message = record.args().to_string().replace('\n', " ");
        if self.stderr {
            eprintln!("lockhook: {}: {message}", record.level().as_str().to_lowercase());
        }
        if let Some(syslog) = &self.syslog {
            syslog.send(record.level(), &message);
        }
        if let Some(file) = &self.file {
            if let Ok(mut f) = file.lock() {
                let _ = f.write_all(file_line(record.level(), &message).as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// One line of the log file, written with one `write`: the hook, holders and the CLI append to
/// the same file (`O_APPEND`), and a line written piece by piece could interleave with another
/// process's.
fn file_line(level: Level, message: &str) -> String {
    format!("{} lockhook[{}] {level}: {message}\n", crate::clock::now(), std::process::id())
}

fn install(logger: Logger, level: LevelFilter) {
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

const DEV_LOG: &str = "/dev/log";

/// A non-blocking socket connected to the syslog socket at `dev_log`: a stalled journald
/// (its receive queue full) costs us the line, never the guest start the hook is deciding on.
fn connect_syslog(dev_log: &Path) -> Option<UnixDatagram> {
    let sock = UnixDatagram::unbound().ok()?;
    (sock.set_nonblocking(true).is_ok() && sock.connect(dev_log).is_ok()).then_some(sock)
}

/// One line as syslog takes it: facility daemon (3), RFC 3164 framing as journald and rsyslog
/// accept it.
fn syslog_line(level: Level, message: &str) -> String {
    let severity = match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    };
    format!("<{}>lockhook[{}]: {message}", 3 * 8 + severity, std::process::id())
}

/// Runs `log` (a holder's lines after one request) with one syslog socket for all its lines,
/// closed when it returns.
pub fn in_one_connection<R>(log: impl FnOnce() -> R) -> R {
    let Some(syslog) = SYSLOG.get() else { return log() };
    syslog.begin_burst();
    let out = log();
    syslog.end_burst();
    out
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
    install(Logger { stderr: true, syslog: None, file: None }, level);
}

/// Holders (and what sanlock runs): syslog when there is one, a socket per line, and the
/// configured log file.
pub fn init_daemon(config: &Config) {
    init_syslog(config, false);
}

/// The hook: as `init_daemon`, with one syslog socket for all its lines.
pub fn init_hook(config: &Config) {
    init_syslog(config, true);
}

fn init_syslog(config: &Config, keep: bool) {
    let syslog = Some(SYSLOG.get_or_init(|| Syslog::new(PathBuf::from(DEV_LOG), keep)));
    install(Logger { stderr: false, syslog, file: log_file(config.log_file.as_deref()) }, config.level());
    log_panics();
}

thread_local! {
    /// Set while this thread is inside `Logger::log` (which holds its locks).
    static LOGGING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as logging until dropped.
struct Logging;

impl Logging {
    fn enter() -> Logging {
        LOGGING.with(|l| l.set(true));
        Logging
    }
}

impl Drop for Logging {
    fn drop(&mut self) {
        LOGGING.with(|l| l.set(false));
    }
}

/// Logs a panic before the process ends (`panic = "abort"`): a holder's stderr is /dev/null,
/// and a holder that dies lets its guest's locks go, which must not pass unseen. A panic
/// inside the logger itself (its locks held) is left to the default hook alone.
fn log_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !LOGGING.with(std::cell::Cell::get) {
                log::error!("process {} panicked: {info}", std::process::id());
            }
            default(info);
        }));
    });
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
        for keep in [false, true] {
            let syslog = Syslog::new(dev_log.clone(), keep);
            let started = Instant::now();
            for _ in 0..100 {
                syslog.send(Level::Error, "a line nobody will read");
            }
            assert!(started.elapsed() < Duration::from_secs(2), "logging blocked on a full syslog socket");
        }
        drop(server);
    }

    /// The inode of the socket `syslog` keeps, if any.
    fn kept(syslog: &Syslog) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let state = syslog.state.lock().expect("lock");
        let fd = state.socket.as_ref()?.try_clone().expect("dup");
        Some(File::from(std::os::fd::OwnedFd::from(fd)).metadata().expect("fstat").ino())
    }

    /// A syslog socket (`dev_log`, in `dir`) and a `Syslog` for it; `server` reads what comes.
    struct Listening {
        dir: tempfile::TempDir,
        server: UnixDatagram,
        syslog: Syslog,
    }

    fn listening(keep: bool) -> Listening {
        let dir = tempfile::tempdir().expect("dir");
        let server = UnixDatagram::bind(dir.path().join("log")).expect("bind");
        let syslog = Syslog::new(dir.path().join("log"), keep);
        Listening { dir, server, syslog }
    }

    #[test]
    fn the_hook_sends_every_line_on_one_socket_and_reconnects_after_a_syslog_restart() {
        let Listening { dir, server, syslog } = listening(true);
        let mut buf = [0u8; 256];
        let mut sockets = std::collections::HashSet::new();
        for n in 0..3 {
            syslog.send(Level::Info, &format!("line {n}"));
            let len = server.recv(&mut buf).expect("recv");
            assert!(std::str::from_utf8(&buf[..len]).expect("utf8").ends_with(&format!("]: line {n}")));
            sockets.insert(kept(&syslog).expect("a kept socket"));
        }
        assert_eq!(sockets.len(), 1, "one socket for every line");
        // journald restarts: a new socket at the same path.
        drop(server);
        std::fs::remove_file(dir.path().join("log")).expect("rm");
        let server = UnixDatagram::bind(dir.path().join("log")).expect("bind again");
        syslog.send(Level::Warn, "after the restart");
        let len = server.recv(&mut buf).expect("recv after restart");
        assert!(std::str::from_utf8(&buf[..len]).expect("utf8").starts_with("<28>lockhook["));
        assert!(!sockets.contains(&kept(&syslog).expect("kept")), "a new socket after the restart");
    }

    #[test]
    fn a_holder_keeps_a_socket_only_for_the_lines_of_one_request() {
        let Listening { dir: _dir, server, syslog } = listening(false);
        let mut buf = [0u8; 256];
        syslog.send(Level::Info, "alone");
        server.recv(&mut buf).expect("recv");
        assert_eq!(kept(&syslog), None, "a line on its own keeps no socket");
        syslog.begin_burst();
        let mut sockets = std::collections::HashSet::new();
        for line in ["one", "two", "three"] {
            syslog.send(Level::Info, line);
            server.recv(&mut buf).expect("recv");
            sockets.insert(kept(&syslog).expect("kept within a burst"));
        }
        assert_eq!(sockets.len(), 1, "one socket within a burst");
        syslog.end_burst();
        assert_eq!(kept(&syslog), None, "no socket kept after it");
        syslog.send(Level::Info, "after");
        assert_eq!(server.recv(&mut buf).expect("recv"), syslog_line(Level::Info, "after").len());
    }

    #[test]
    fn a_host_without_syslog_is_tried_once_by_the_hook() {
        let dir = tempfile::tempdir().expect("dir");
        let dev_log = dir.path().join("log");
        let syslog = Syslog::new(dev_log.clone(), true);
        syslog.send(Level::Info, "nobody listens");
        assert!(syslog.state.lock().expect("lock").absent);
        // Nor when one appears later within the same (short-lived) hook call.
        let server = UnixDatagram::bind(&dev_log).expect("bind");
        server.set_nonblocking(true).expect("nonblocking");
        syslog.send(Level::Info, "still nobody");
        assert!(server.recv(&mut [0u8; 64]).is_err());
    }

    /// A panic (a holder's, whose stderr nobody reads) reaches the log before the process ends.
    #[test]
    fn a_panic_is_logged() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("lockhook.log");
        install(Logger { stderr: false, syslog: None, file: log_file(Some(&path)) }, LevelFilter::Info);
        log_panics();
        assert!(std::panic::catch_unwind(|| panic!("boom in a holder")).is_err());
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("ERROR: process ") && text.contains("panicked") && text.contains("boom in a holder"),
            "{text}"
        );
        assert!(text.contains("logging.rs"), "names where: {text}");
    }

    /// Loggers of their own (as separate processes have), appending to one file at once: every
    /// line stays whole.
    #[test]
    fn concurrent_writers_never_interleave_a_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("lockhook.log");
        log::set_max_level(LevelFilter::Error);
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let logger = Logger { stderr: false, syslog: None, file: log_file(Some(&path)) };
                    for i in 0..300 {
                        let line = format!("writer {w} line {i} {}", "x".repeat(200));
                        logger.log(&Record::builder().level(Level::Error).args(format_args!("{line}")).build());
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().expect("writer"));
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 8 * 300);
        for line in text.lines() {
            let (head, message) = line.split_once(" ERROR: writer ").expect(line);
            assert!(head.contains(" lockhook[") && !head.contains("writer"), "{line}");
            assert!(message.ends_with(&"x".repeat(200)) && message.matches("line").count() == 1, "{line}");
        }
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
