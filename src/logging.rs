//! Two small `log::Log` sinks: stderr for the CLI, and syslog (`/dev/log`) plus an optional
//! file for the hook and the holders.
//!
//! The hook must not log to stderr: when it fails, libvirt appends *all* of its stderr to the
//! error the user sees, and that must be only lockhook's one-line-per-conflict message. Holders
//! have /dev/null as stderr.

use std::fs::{File, OpenOptions};
use std::io::Write;
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
        if let Some(sock) = self.syslog.then(syslog).flatten() {
            // facility daemon (3), RFC 3164 framing as journald and rsyslog accept it.
            let severity = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            let line = format!("<{}>lockhook[{}]: {message}", 3 * 8 + severity, std::process::id());
            let _ = sock.send(line.as_bytes());
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

fn syslog() -> Option<UnixDatagram> {
    let sock = UnixDatagram::unbound().ok()?;
    sock.connect("/dev/log").ok()?;
    Some(sock)
}

fn log_file(path: Option<&Path>) -> Option<Mutex<File>> {
    let file = OpenOptions::new().create(true).append(true).custom_flags_nofollow().open(path?).ok()?;
    Some(Mutex::new(file))
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NOFOLLOW | libc::O_CLOEXEC)
    }
}

/// CLI: log lines go to stderr.
pub fn init_cli(level: LevelFilter) {
    install(Logger { stderr: true, syslog: false, file: None }, level);
}

/// Hook and holder: syslog when there is one, and the configured log file.
pub fn init_daemon(config: &Config) {
    install(Logger { stderr: false, syslog: true, file: log_file(config.log_file.as_deref()) }, config.level());
}
