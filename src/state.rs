//! The holder's state file `<run_dir>/<uuid>.json`: which guest, which QEMU, which locks since
//! when. Written only by the holder, atomically (a fresh `O_EXCL|O_NOFOLLOW` temp file in the run
//! directory, then `rename`), read by `lockhook status` and by refusals that name the holder.
//!
//! A state file is trusted only while its holder holds the single-instance lock `<uuid>.lock`:
//! a holder killed with SIGKILL leaves its file behind, but not its lock.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::Uuid;
use crate::lock::{self, Identity, LockMode};
use crate::paths::Paths;
use crate::target::{Creation, LockTarget, Role};

pub const STATE_VERSION: u32 = 1;

/// One held lock, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// The file locked: the image, the lease file, or a lock file in the lockspace.
    pub path: PathBuf,
    /// The resource's lockspace key (see `lockspace`), under which owner records are kept.
    #[serde(default)]
    pub key: String,
    /// What messages call it when not `path` (a network disk's URL, a device's stable id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Set when `path` is a lock file in the lockspace: it is locked again (mode change,
    /// hand-over, re-adoption) only through `Lockspace::acquire`, never by its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_file: Option<crate::lockspace::LockFileKind>,
    pub mode: LockMode,
    pub roles: Vec<Role>,
    pub identity: Identity,
    pub since: String,
    /// Whether the file may be created when missing (see `target::Creation`); absent in the
    /// state files of holders older than this field, whose resources are read back as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<Creation>,
}

/// Who holds the locks of a state file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HolderKind {
    /// A holder process for a libvirt guest.
    #[default]
    Guest,
    /// `lockhook run ... -- COMMAND`: `name` is the command line, `holder_pid` the wrapper.
    Command,
}

impl Resource {
    /// The record of `target`, locked in `mode` as `identity`, for `roles`.
    pub fn new(target: &LockTarget, roles: Vec<Role>, mode: LockMode, identity: Identity) -> Resource {
        Resource {
            key: target.lockspace_key(),
            label: target.label.clone(),
            lock_file: target.lock_file,
            path: target.path.clone(),
            mode,
            roles,
            identity,
            since: crate::clock::now(),
            create: Some(target.create),
        }
    }

    /// The targets this record stands for, one per role (grouping them again gives this
    /// resource back): what re-adoption and hot-plug take again.
    pub fn targets(&self) -> Vec<LockTarget> {
        if self.roles.is_empty() {
            return vec![self.target()];
        }
        self.roles.iter().map(|role| self.target_as(role.clone())).collect()
    }

    /// The target this record stands for, in its first role: what a hand-over waits for.
    pub fn target(&self) -> LockTarget {
        self.target_as(self.roles.first().cloned().unwrap_or(Role::Disk { target: None }))
    }

    fn target_as(&self, role: Role) -> LockTarget {
        LockTarget {
            path: self.path.clone(),
            mode: self.mode,
            offset: self.identity.offset,
            role,
            create: self.creation(),
            optional: false,
            key: Some(self.key.clone()).filter(|k| !k.is_empty()),
            label: self.label.clone(),
            lock_file: self.lock_file,
        }
    }

    /// Whether its file may be created when missing.
    pub fn creation(&self) -> Creation {
        // State files of older holders did not say; lockspace lock files and leases were the
        // only files ever created.
        self.create.unwrap_or(if self.lock_file.is_some() {
            Creation::LockFile
        } else if self.roles.iter().any(|r| matches!(r, Role::Lease { .. })) {
            Creation::Lease
        } else {
            Creation::Never
        })
    }

    /// The owner record that names this resource's holder to other hosts: guest `guest`
    /// (`uuid`) on `host`, or a `lockhook run` command (`command`), held by this process.
    pub fn owner_record(&self, host: &str, guest: &str, uuid: &Uuid, command: bool) -> crate::lockspace::OwnerRecord {
        crate::lockspace::OwnerRecord {
            command,
            role: self.roles.iter().find(|role| role.worth_saying()).map(ToString::to_string),
            key: self.key.clone(),
            host: host.to_owned(),
            guest: guest.to_owned(),
            uuid: uuid.clone(),
            mode: self.mode,
            since: self.since.clone(),
            holder_pid: std::process::id(),
        }
    }

    /// What to call it in messages.
    pub fn name(&self) -> String {
        self.label.clone().unwrap_or_else(|| self.path.display().to_string())
    }
}

/// A resource the guest wants but cannot have: a hot-plugged disk another guest holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub path: PathBuf,
    pub mode: LockMode,
    /// Who holds it, as a refusal would say it.
    pub held_by: String,
    pub since: String,
}

/// Everything one holder holds for one guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestState {
    pub version: u32,
    #[serde(default)]
    pub kind: HolderKind,
    pub name: String,
    pub uuid: Uuid,
    pub host: String,
    pub holder_pid: u32,
    /// The lockhook release of the holder (absent in state files of older holders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_version: Option<String>,
    pub qemu_pid: Option<u32>,
    /// With `qemu_pid`, identifies the QEMU process across pid reuse (see `qemu::start_time`).
    #[serde(default)]
    pub qemu_start_time: Option<u64>,
    pub since: String,
    pub resources: Vec<Resource>,
    /// Resources this guest still holds on another host (incoming live migration), taken the
    /// moment the source lets go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Resource>,
    /// Hot-plugged resources that could not be locked (see `on_conflict`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
    /// The sanlock engine's leases this holder holds (see `engine`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sanlock: Vec<crate::engine::leases::HeldLease>,
    /// sanlock leases awaited from a migration source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sanlock_pending: Vec<crate::engine::leases::HeldLease>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot write state")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot read state")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt state file: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// Writes `state` to `path` atomically, its data written out (see `rundir::replace_file`: a
/// symlink planted in the run directory is never followed).
pub fn write(path: &Path, state: &GuestState) -> Result<(), StateError> {
    let err = |source| StateError::Write { path: path.to_owned(), source };
    let mut body = serde_json::to_vec_pretty(state).map_err(|e| err(io::Error::other(e)))?;
    body.push(b'\n');
    crate::rundir::replace_file(path, &body, true).map_err(err)
}

pub fn read(path: &Path) -> Result<GuestState, StateError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| StateError::Read { path: path.to_owned(), source })?;
    serde_json::from_reader(io::BufReader::new(file.take_bounded()))
        .map_err(|e| StateError::Corrupt { path: path.to_owned(), message: e.to_string() })
}

trait TakeBounded {
    fn take_bounded(self) -> io::Take<File>;
}

impl TakeBounded for File {
    /// State files are small; never read more than a few MiB of one.
    fn take_bounded(self) -> io::Take<File> {
        io::Read::take(self, 8 << 20)
    }
}

/// Whether a live holder holds the single-instance lock for `uuid`.
pub fn holder_alive(paths: &Paths, uuid: &Uuid) -> bool {
    match File::open(paths.instance_lock(uuid)) {
        Ok(file) => matches!(lock::probe_fd(&file, 0), Ok(Some(_))),
        Err(_) => false,
    }
}

/// A state file found in the run directory.
#[derive(Debug)]
pub struct Entry {
    pub uuid: Uuid,
    pub state: Result<GuestState, StateError>,
    pub alive: bool,
}

/// Every state file in the run directory, sorted by guest name then UUID.
pub fn list(paths: &Paths) -> io::Result<Vec<Entry>> {
    let dir = match fs::read_dir(paths.run_dir()) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    for item in dir {
        let path = item?.path();
        let Some(uuid) = Paths::uuid_of(&path, "json") else { continue };
        let state = read(&path);
        let alive = holder_alive(paths, &uuid);
        entries.push(Entry { uuid, state, alive });
    }
    entries.sort_by(|a, b| {
        let name = |e: &Entry| e.state.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        name(a).cmp(&name(b)).then_with(|| a.uuid.cmp(&b.uuid))
    });
    Ok(entries)
}

/// The live holder's record of a lock on `identity`, if any: who holds what on this host.
pub fn find_owner(paths: &Paths, identity: &Identity) -> Option<(GuestState, Resource)> {
    list(paths).ok()?.into_iter().filter(|e| e.alive).find_map(|e| {
        let state = e.state.ok()?;
        let resource = state.resources.iter().find(|r| r.identity == *identity)?.clone();
        Some((state, resource))
    })
}

/// This host's name, for records and messages.
pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(uuid: &Uuid) -> GuestState {
        GuestState {
            version: STATE_VERSION,
            kind: HolderKind::Guest,
            qemu_start_time: Some(3),
            conflicts: vec![],
            pending: vec![],
            sanlock: vec![],
            sanlock_pending: vec![],
            name: "vm 1 é".into(),
            uuid: uuid.clone(),
            host: "h".into(),
            holder_pid: 1,
            holder_version: None,
            qemu_pid: Some(2),
            since: crate::clock::now(),
            resources: vec![Resource {
                path: "/i/a".into(),
                key: "file:/i/a@0".into(),
                label: None,
                lock_file: None,
                mode: LockMode::Exclusive,
                roles: vec![Role::Disk { target: Some("vda".into()) }],
                identity: Identity { dev: 1, ino: 2, offset: 0 },
                since: crate::clock::now(),
                create: Some(Creation::Never),
            }],
        }
    }

    #[test]
    fn a_record_gives_back_its_targets() {
        let lease = Role::Lease { key: "k".into(), lockspace: Some("ls".into()) };
        let disk = Role::Disk { target: Some("vdb".into()) };
        let target = LockTarget {
            offset: 4096,
            create: Creation::Lease,
            ..LockTarget::new("/l/f".into(), LockMode::Exclusive, lease.clone())
        };
        let id = Identity { dev: 1, ino: 9, offset: 4096 };
        let record = Resource::new(&target, vec![lease.clone(), disk.clone()], LockMode::Exclusive, id);
        let back = record.targets();
        assert_eq!(back.len(), 2, "one target per role");
        assert_eq!(back[0], LockTarget { key: Some(target.lockspace_key()), ..target.clone() });
        assert_eq!(back[1].role, disk);
        // A record written by an older holder (no `create`) is read as before: leases and
        // lockspace lock files may be created, images not.
        let mut old: Resource =
            serde_json::from_str(&serde_json::to_string(&record).expect("json").replace(r#","create":"lease""#, ""))
                .expect("old record");
        assert_eq!(old.create, None);
        assert_eq!(old.targets()[0].create, Creation::Lease);
        old.roles = vec![disk];
        assert_eq!(old.targets()[0].create, Creation::Never);
    }

    #[test]
    fn roundtrip_and_symlink_refusal() {
        let dir = tempfile::tempdir().expect("dir");
        let uuid = Uuid::parse("f3fa73d4-1c2b-4e5f-8a9b-0123456789ab").expect("uuid");
        let paths = Paths::new(dir.path());
        let path = paths.state(&uuid);
        write(&path, &sample(&uuid)).expect("write");
        assert_eq!(read(&path).expect("read"), sample_with_since(&read(&path).expect("read"), &uuid));
        fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd", &path).expect("symlink");
        assert!(read(&path).is_err());
        let entries = list(&paths).expect("list");
        assert_eq!(entries.len(), 1);
        assert!(!entries[0].alive);
    }

    fn sample_with_since(read_back: &GuestState, uuid: &Uuid) -> GuestState {
        let mut s = sample(uuid);
        s.since = read_back.since.clone();
        s.resources[0].since = read_back.resources[0].since.clone();
        s
    }

    #[test]
    fn corrupt_state_is_reported() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("x.json");
        fs::write(&path, b"{not json").expect("write");
        assert!(matches!(read(&path), Err(StateError::Corrupt { .. })));
    }
}
