//! The guard for tools outside libvirt: `lockhook check` says who uses an image, and
//! `lockhook run PATH... -- COMMAND` holds the locks a guest would take while COMMAND runs, so
//! `qemu-img commit` cannot write an image a guest uses, and no guest can start on an image
//! while `qemu-img` works on it.
//!
//! A `run` registers itself like a holder: an instance lock and a state file (kind `command`) in
//! the run directory, so a refused guest start names the command and its pid.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use serde::Serialize;

use crate::config::Config;
use crate::domain::Uuid;
use crate::lock::{self, LockMode};
use crate::lockspace::Lockspace;
use crate::owner::{self, Owner};
use crate::paths::Paths;
use crate::state::{self, GuestState, HolderKind};
use crate::target::LockTarget;
use crate::target::Role;

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
        /// What is locked, when not the path itself: a layer beneath a block device, its stable
        /// identity in the lockspace, a qcow2 data file or backing image.
        #[serde(skip_serializing_if = "Option::is_none")]
        via: Option<String>,
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

/// Checks each path (byte `offset`, 0 for images) without taking any lock. An image is resolved
/// as `run` (and a guest) would lock it, exclusively: it is in use when anything that would be
/// locked is held in a conflicting mode (the image, a block device's stable identity or the
/// layers beneath it, a data file, a backing image held exclusively).
pub fn check(config: &Config, targets: &[PathBuf], offset: u64) -> Vec<Checked> {
    let paths = Paths::new(&config.run_dir);
    let lockspace = Lockspace::new(&config.lockspace_dir);
    targets
        .iter()
        .map(|path| {
            let state = if offset != 0 {
                probe_path(&paths, &lockspace, path, offset, None)
            } else {
                match crate::storage::resolve_paths(std::slice::from_ref(path), LockMode::Exclusive, config) {
                    Ok(requests) => check_requests(&paths, &lockspace, path, &requests),
                    Err(e) => PathState::Error { error: crate::error_chain(&e) },
                }
            };
            Checked { path: path.clone(), offset, state }
        })
        .collect()
}

/// The state of byte `offset` of `path` itself.
fn probe_path(paths: &Paths, lockspace: &Lockspace, path: &Path, offset: u64, via: Option<String>) -> PathState {
    match lock::probe(path, offset) {
        Ok((Some(mode), identity)) => PathState::Locked {
            mode,
            holder: owner::find(paths, lockspace, &identity, &crate::lockspace::file_key(path, offset)),
            via,
        },
        Ok((None, _)) if offset == 0 && via.is_none() && owner::qemu_has_open(path) => PathState::OpenInQemu,
        Ok((None, _)) => PathState::Free,
        Err(e) => PathState::Error { error: crate::error_chain(&e) },
    }
}

/// The first of `requests` (for `top`) that someone holds in a mode that conflicts with it.
fn check_requests(paths: &Paths, lockspace: &Lockspace, top: &Path, requests: &[LockTarget]) -> PathState {
    for request in requests {
        let is_top = request.path == top && request.lock_file.is_none();
        let via = (!is_top).then(|| {
            let name = request.label.clone().unwrap_or_else(|| request.path.display().to_string());
            match &request.role {
                Role::Command => name,
                role => format!("{name} ({role})"),
            }
        });
        let found = match (request.lock_file, &request.key) {
            (Some(kind), Some(key)) => match lockspace.probe(kind, key, request.offset) {
                Ok(Some((Some(mode), identity))) => {
                    Some(PathState::Locked { mode, holder: owner::find(paths, lockspace, &identity, key), via })
                }
                Ok(_) => None,
                Err(e) => Some(PathState::Error { error: crate::error_chain(&e) }),
            },
            _ if is_top => Some(probe_path(paths, lockspace, &request.path, request.offset, None)),
            _ => match probe_path(paths, lockspace, &request.path, request.offset, via) {
                // A layer or backing image that cannot be opened is not ours to report.
                PathState::Error { .. } | PathState::Free | PathState::OpenInQemu => None,
                locked => Some(locked),
            },
        };
        match found {
            Some(PathState::Locked { mode, .. }) if request.mode == LockMode::Shared && mode == LockMode::Shared => {}
            Some(PathState::Free) | Some(PathState::OpenInQemu) | None => {}
            Some(state) => return state,
        }
    }
    // Nothing conflicts: say whether a QEMU has the image open.
    probe_path(paths, lockspace, top, 0, None)
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
                PathState::Locked { holder, via: None, .. } => {
                    writeln!(out, "{path}{at}: in use: {}", crate::one_line(&holder.phrase()))?
                }
                PathState::Locked { holder, via: Some(via), .. } => {
                    writeln!(out, "{path}{at}: in use: {} {}", crate::one_line(via), crate::one_line(&holder.phrase()))?
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
    #[error(transparent)]
    Refused(#[from] crate::lockset::Refusal),
    #[error("cannot resolve the images")]
    Resolve(#[source] Box<crate::storage::StorageError>),
    #[error("cannot register in the run directory")]
    Register(#[source] crate::rundir::RunDirError),
    #[error("cannot record the locks")]
    State(#[source] crate::state::StateError),
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
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
    Uuid::random().unwrap_or_else(|_| {
        let n = crate::clock::now_secs() ^ u64::from(std::process::id());
        Uuid::parse(&format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n & 0xffff_ffff_ffff))
            .expect("valid uuid")
    })
}

/// Runs `command` while holding `mode` locks on `targets`. Returns the command's exit status.
/// With `write_backing`, backing images and data files are locked exclusively too.
pub fn run(
    config: &Config,
    mode: LockMode,
    write_backing: bool,
    targets: &[PathBuf],
    command: &[OsString],
) -> Result<ExitStatus, RunError> {
    let paths = Paths::new(&config.run_dir);
    let line = command_line(command);
    let id = new_id();
    crate::rundir::ensure_run_dir(paths.run_dir()).map_err(RunError::Register)?;
    // Removed however `run` ends (a refusal too), while the instance lock is still held.
    let instance = crate::rundir::take_instance_lock(&paths, &id).map_err(RunError::Register)?;
    let _registered = Registered { instance, lock: paths.instance_lock(&id), state: paths.state(&id) };
    let strict = Config { on_missing: crate::config::MissingPolicy::Fail, ..config.clone() };
    // The locks a guest would take on these images: stable identities, layers, data files.
    let mut requests =
        crate::storage::resolve_paths(targets, mode, &strict).map_err(|e| RunError::Resolve(Box::new(e)))?;
    if write_backing {
        for r in &mut requests {
            if matches!(r.role, Role::Backing { .. } | Role::DataFile { .. }) {
                r.mode = LockMode::Exclusive;
            }
        }
    }
    let acquired = crate::lockset::acquire_all(&requests, &Default::default(), &strict, &paths, &mut Vec::new())?;
    let record = GuestState {
        version: state::STATE_VERSION,
        kind: HolderKind::Command,
        name: line.clone(),
        uuid: id.clone(),
        host: state::hostname(),
        holder_pid: std::process::id(),
        holder_version: Some(crate::holder::protocol::release()),
        qemu_pid: None,
        qemu_start_time: None,
        since: crate::clock::now(),
        resources: acquired.resources.clone(),
        conflicts: Vec::new(),
        pending: Vec::new(),
        sanlock: Vec::new(),
        sanlock_pending: Vec::new(),
    };
    let state_path = paths.state(&id);
    state::write(&state_path, &record).map_err(RunError::State)?;
    // Other hosts sharing the lockspace name the command too (records live while this runs).
    let lockspace = Lockspace::new(&config.lockspace_dir);
    let published: Vec<_> = record
        .resources
        .iter()
        .filter(|r| !r.key.is_empty())
        .filter_map(|r| {
            // A command's records name the command, not a role.
            let owner = crate::lockspace::OwnerRecord { role: None, ..r.owner_record(&record.host, &line, &id, true) };
            lockspace.publish(&owner).map_err(|e| log::warn!("{}", crate::error_chain(&e))).ok()
        })
        .collect();
    let result = spawn_and_wait(command, &line);
    for p in published {
        lockspace.unpublish(p);
    }
    // Invariant: the locks (acquired.locks) stay open until the command has exited.
    drop(acquired.locks);
    result
}

/// This `run`'s registration in the run directory (its instance lock and state file), removed
/// when it ends, the lock file while still locked (see `rundir::remove_instance_file`).
struct Registered {
    instance: std::fs::File,
    lock: PathBuf,
    state: PathBuf,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.state);
        crate::rundir::remove_instance_file(&self.lock, &self.instance);
    }
}

fn spawn_and_wait(command: &[OsString], line: &str) -> Result<ExitStatus, RunError> {
    // The command dies with this process (see `supervise`): it never writes without the locks.
    crate::supervise::run_command(command).map_err(|source| RunError::Spawn { command: line.to_owned(), source })
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
