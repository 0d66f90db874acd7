//! The guard for tools outside libvirt: `lockhook check` says who uses an image, and
//! `lockhook run PATH... -- COMMAND` holds the locks a guest would take while COMMAND runs, so
//! `qemu-img commit` cannot write an image a guest uses, and no guest can start on an image
//! while `qemu-img` works on it.
//!
//! A `run` registers itself like a holder: an instance lock and a state file (kind `command`) in
//! the run directory, so a refused guest start names the command and its pid.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Serialize;

use crate::config::Config;
use crate::domain::Uuid;
use crate::lock::{self, LockMode};
use crate::owner::{self, Owner};
use crate::paths::Paths;
use crate::resource::Role;
use crate::state::{self, GuestState, HolderKind};
use crate::storage::Request;

/// Exit status of `run` when a lock is taken by someone else (EX_TEMPFAIL: try again later).
pub const EXIT_REFUSED: u8 = 75;

/// What `check` found for one path.
#[derive(Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PathState {
    Free,
    Locked {
        mode: LockMode,
        holder: Owner,
    },
    /// Free of lockhook/virtlockd locks, but a QEMU process (or qemu-img, qemu-nbd) has it open.
    OpenInQemu,
    Error {
        error: String,
    },
}

#[derive(Debug, Serialize)]
pub struct Checked {
    pub path: PathBuf,
    pub offset: u64,
    #[serde(flatten)]
    pub state: PathState,
}

/// Checks each path (byte `offset`, 0 for images) without taking any lock.
pub fn check(paths: &Paths, lockspace: &crate::lockspace::Lockspace, targets: &[PathBuf], offset: u64) -> Vec<Checked> {
    targets
        .iter()
        .map(|path| {
            let state = match lock::probe(path, offset) {
                Ok((Some(mode), identity)) => PathState::Locked {
                    mode,
                    holder: owner::find(paths, lockspace, &identity, &crate::lockspace::file_key(path, offset)),
                },
                Ok((None, _)) if offset == 0 && owner::qemu_has_open(path) => PathState::OpenInQemu,
                Ok((None, _)) => PathState::Free,
                Err(e) => PathState::Error { error: crate::error_chain(&e) },
            };
            Checked { path: path.clone(), offset, state }
        })
        .collect()
}

/// Prints `check` results; returns the exit code: 0 all free, 1 any in use, 2 any error.
pub fn report(results: &[Checked], json: bool, out: &mut dyn Write) -> std::io::Result<u8> {
    if json {
        serde_json::to_writer_pretty(&mut *out, results)?;
        writeln!(out)?;
    } else {
        for r in results {
            let path = crate::one_line(&r.path.display().to_string());
            let at = if r.offset == 0 { String::new() } else { format!(" @{}", r.offset) };
            match &r.state {
                PathState::Free => writeln!(out, "{path}{at}: free")?,
                PathState::Locked { holder, .. } => {
                    writeln!(out, "{path}{at}: in use: {}", crate::one_line(&holder.phrase()))?
                }
                PathState::OpenInQemu => writeln!(
                    out,
                    "{path}{at}: in use: open in a QEMU process (its own image locks), not locked by lockhook"
                )?,
                PathState::Error { error } => writeln!(out, "{path}{at}: error: {}", crate::one_line(error))?,
            }
        }
    }
    let code = results.iter().fold(0u8, |worst, r| {
        worst.max(match r.state {
            PathState::Free => 0,
            PathState::Locked { .. } | PathState::OpenInQemu => 1,
            PathState::Error { .. } => 2,
        })
    });
    Ok(code)
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Refused(#[from] crate::lockset::Refusal),
    #[error("cannot register in the run directory")]
    Register(#[source] crate::holder::server::HolderError),
    #[error("cannot record the locks")]
    State(#[source] crate::state::StateError),
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; it only sends a signal to the child we started.
        unsafe { libc::kill(pid, sig) };
    }
}

fn command_line(command: &[OsString]) -> String {
    let text = command.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let text = crate::one_line(&text);
    if text.chars().count() > 200 {
        format!("{}...", text.chars().take(200).collect::<String>())
    } else {
        text
    }
}

fn new_id() -> Uuid {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    Uuid::parse(&text).unwrap_or_else(|_| {
        let n = crate::clock::now_secs() ^ u64::from(std::process::id());
        Uuid::parse(&format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n & 0xffff_ffff_ffff))
            .expect("valid uuid")
    })
}

/// Runs `command` while holding `mode` locks on `targets`. Returns the command's exit status.
pub fn run(config: &Config, mode: LockMode, targets: &[PathBuf], command: &[OsString]) -> Result<ExitStatus, RunError> {
    let paths = Paths::new(&config.run_dir);
    let line = command_line(command);
    let id = new_id();
    crate::holder::server::ensure_run_dir(paths.run_dir()).map_err(RunError::Register)?;
    let _instance = crate::holder::server::take_instance_lock(&paths, &id).map_err(RunError::Register)?;
    let requests: Vec<Request> = targets
        .iter()
        .map(|path| Request {
            path: path.clone(),
            mode,
            offset: 0,
            role: Role::Command,
            is_lease: false,
            optional: false,
            key: None,
            label: None,
            lock_file: None,
        })
        .collect();
    let strict = Config { on_missing: crate::config::MissingPolicy::Fail, ..config.clone() };
    let acquired = crate::lockset::acquire_all(&requests, &Default::default(), &strict, &paths, &mut Vec::new())?;
    let record = GuestState {
        version: state::STATE_VERSION,
        kind: HolderKind::Command,
        name: line.clone(),
        uuid: id.clone(),
        host: state::hostname(),
        holder_pid: std::process::id(),
        qemu_pid: None,
        qemu_start_time: None,
        since: crate::clock::now(),
        resources: acquired.resources,
        conflicts: Vec::new(),
        pending: Vec::new(),
    };
    let state_path = paths.state(&id);
    state::write(&state_path, &record).map_err(RunError::State)?;
    let result = spawn_and_wait(command, &line);
    // Invariant: the locks (acquired.locks) stay open until the command has exited.
    drop(acquired.locks);
    let _ = std::fs::remove_file(&state_path);
    let _ = std::fs::remove_file(paths.instance_lock(&id));
    result
}

fn spawn_and_wait(command: &[OsString], line: &str) -> Result<ExitStatus, RunError> {
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .spawn()
        .map_err(|source| RunError::Spawn { command: line.to_owned(), source })?;
    CHILD.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
    // While the command runs, this process must not die before it: ^C and ^\ reach the whole
    // foreground group anyway, so they are ignored here; SIGTERM and SIGHUP are passed on.
    // SAFETY: SIG_IGN runs no code; `forward` only calls the async-signal-safe kill(2).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, forward as *const () as libc::sighandler_t);
    }
    let status = loop {
        match child.wait() {
            Ok(status) => break status,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(RunError::Spawn { command: line.to_owned(), source }),
        }
    };
    CHILD.store(0, Ordering::SeqCst);
    Ok(status)
}

/// Maps a finished command's status to this process's exit code (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
        _ => 1,
    }
}
