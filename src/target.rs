//! One description of a lock target, from plan to state file and back: what to lock (a path and
//! byte, or a lock file in the lockspace), in which mode, for which role, whether it may be
//! created, and under which key other hosts find its owner. `resource` plans targets from the
//! domain, `storage` resolves them to paths, `lockset` takes them, the holder records them in its
//! state file (`state::Resource`), and re-adoption, hot-plug and the guard read them back from
//! there (`state::Resource::targets`): nothing is re-derived on the way.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::lock::{self, HeldLock, LockError, LockMode};
use crate::lockspace::{LockFileKind, Lockspace, Wait};

/// How a layer relates to the device above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// The whole disk a partition is part of.
    Disk,
    /// A device a device-mapper or md device is built on (LVM PV, multipath path, crypt
    /// backing, md member).
    Slave,
    /// The file (or block device) behind a loop device.
    BackingFile,
    /// The block device holding the filesystem an image file lives on.
    Filesystem,
}

impl LayerKind {
    /// "disk of", "component of", "backing file of": how messages name the layer.
    pub fn phrase(self) -> &'static str {
        match self {
            LayerKind::Disk => "disk of",
            LayerKind::Slave => "component of",
            LayerKind::BackingFile => "backing file of",
            LayerKind::Filesystem => "filesystem holding",
        }
    }
}

/// What a request is for; shown in messages and in `lockhook status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Role {
    Disk {
        target: Option<String>,
    },
    Backing {
        of: Option<String>,
    },
    /// The destination of a running block copy of disk `of`.
    Mirror {
        of: Option<String>,
    },
    Lease {
        key: String,
        lockspace: Option<String>,
    },
    /// Locked by `lockhook run` for the command it runs.
    Command,
    /// A layer beneath a block device a guest writes: `kind` of the device `above` (a path),
    /// itself beneath disk `of`.
    Layer {
        layer: LayerKind,
        above: String,
        of: Option<String>,
    },
    /// The external data file of a qcow2 image of disk `of`.
    DataFile {
        of: Option<String>,
    },
    /// The overlay libvirt puts on a `<transient/>` disk `of`.
    Overlay {
        of: Option<String>,
    },
    /// The UEFI variable store (`<nvram>`).
    Nvram,
    /// The firmware code (`<loader>`).
    Loader,
    /// A file backing guest memory (nvdimm, virtio-pmem).
    Memory,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Disk { target: Some(t) } => write!(f, "disk {t}"),
            Role::Disk { target: None } => f.write_str("disk"),
            Role::Backing { of: Some(t) } => write!(f, "backing image of {t}"),
            Role::Backing { of: None } => f.write_str("backing image"),
            Role::Mirror { of: Some(t) } => write!(f, "block copy of {t}"),
            Role::Mirror { of: None } => f.write_str("block copy"),
            Role::Lease { key, lockspace: Some(ls) } => write!(f, "lease {ls}/{key}"),
            Role::Lease { key, lockspace: None } => write!(f, "lease {key}"),
            Role::Command => f.write_str("used by a command"),
            Role::Layer { layer, above, of: Some(t) } => write!(f, "{} {above}, disk {t}", layer.phrase()),
            Role::Layer { layer, above, of: None } => write!(f, "{} {above}", layer.phrase()),
            Role::DataFile { of: Some(t) } => write!(f, "data file of {t}"),
            Role::DataFile { of: None } => f.write_str("data file"),
            Role::Overlay { of: Some(t) } => write!(f, "transient overlay of {t}"),
            Role::Overlay { of: None } => f.write_str("transient overlay"),
            Role::Nvram => f.write_str("UEFI variable store"),
            Role::Loader => f.write_str("firmware"),
            Role::Memory => f.write_str("memory backing file"),
        }
    }
}

impl Role {
    /// The role's kind, as the state file and metrics name it (`disk`, `lease`, `layer`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Disk { .. } => "disk",
            Role::Backing { .. } => "backing",
            Role::Mirror { .. } => "mirror",
            Role::Lease { .. } => "lease",
            Role::Command => "command",
            Role::Layer { .. } => "layer",
            Role::DataFile { .. } => "data_file",
            Role::Overlay { .. } => "overlay",
            Role::Nvram => "nvram",
            Role::Loader => "loader",
            Role::Memory => "memory",
        }
    }

    /// Whether messages should say the role next to the path (it is not the obvious one).
    pub fn worth_saying(&self) -> bool {
        !matches!(self, Role::Disk { .. } | Role::Command)
    }

    /// Locked when it can be opened, skipped (with a note) when it cannot: the device holding an
    /// image's filesystem is a protection beyond the image's own lock, and a host may not let
    /// even root open it (a device cgroup, a sandbox).
    pub fn best_effort(&self) -> bool {
        matches!(self, Role::Layer { layer: LayerKind::Filesystem, .. })
    }
}

/// Whether a missing target is created, and what that means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Creation {
    /// It must exist (disk images, devices, firmware).
    #[default]
    Never,
    /// A `<lease>` target: created `O_CREAT|O_EXCL|O_NOFOLLOW` when missing, and removed again
    /// when the start that created it is refused.
    Lease,
    /// A lock file in the lockspace (a network disk, a block device's stable identity): a key
    /// every host shares, created when missing and never removed.
    LockFile,
}

/// One lock to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockTarget {
    /// The file locked: an image, a lease file, a device node, or a lock file in the lockspace.
    pub path: PathBuf,
    pub mode: LockMode,
    /// The byte locked (0 for images; a lease's offset).
    pub offset: u64,
    pub role: Role,
    pub create: Creation,
    /// `startupPolicy='optional'`: a missing image is skipped, as libvirt drops the disk.
    pub optional: bool,
    /// The lockspace key, when it is not the file's own (`lockspace::file_key`).
    pub key: Option<String>,
    /// What to call the resource in messages, when not its path (a network disk's URL).
    pub label: Option<String>,
    /// Set when `path` is a lock file in the lockspace (`key` is then set too): it is opened
    /// only through `Lockspace::acquire`, never by its path.
    pub lock_file: Option<LockFileKind>,
}

impl LockTarget {
    /// A target of `role` at `path`, byte 0, that must exist.
    pub fn new(path: PathBuf, mode: LockMode, role: Role) -> LockTarget {
        LockTarget {
            path,
            mode,
            offset: 0,
            role,
            create: Creation::Never,
            optional: false,
            key: None,
            label: None,
            lock_file: None,
        }
    }

    /// The device and inode the target locks; `None` while the file does not exist. A lockspace
    /// lock file is looked up without following symlinks; anything else by its path, following
    /// symlinks as QEMU will.
    pub fn inode(&self, lockspace: &Lockspace) -> std::io::Result<Option<(u64, u64)>> {
        match (self.lock_file, &self.key) {
            (Some(kind), Some(key)) => lockspace.lock_file_inode(kind, key),
            _ => match std::fs::metadata(&self.path) {
                Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// The key under which other hosts find the owner (see `lockspace`).
    pub fn lockspace_key(&self) -> String {
        self.key.clone().unwrap_or_else(|| crate::lockspace::file_key(&self.path, self.offset))
    }

    /// Takes the lock without waiting: a lockspace lock file through the lockspace (never
    /// through a symlink), anything else by its path, created only when `create` says so.
    pub fn take(&self, lockspace: &Lockspace) -> Result<HeldLock, LockError> {
        self.take_with(lockspace, Wait::No)
    }

    /// `take`, waiting as long as it takes (a migration destination waiting for its source).
    pub fn take_waiting(&self, lockspace: &Lockspace) -> Result<HeldLock, LockError> {
        self.take_with(lockspace, Wait::Yes)
    }

    fn take_with(&self, lockspace: &Lockspace, wait: Wait) -> Result<HeldLock, LockError> {
        match (self.lock_file, &self.key) {
            (Some(kind), Some(key)) => lockspace.acquire(kind, key, self.mode, self.offset, wait),
            _ => {
                let create = if self.create == Creation::Never { lock::Create::No } else { lock::Create::IfMissing };
                match wait {
                    Wait::No => lock::acquire(&self.path, self.mode, self.offset, create),
                    Wait::Yes => lock::acquire_wait(&self.path, self.mode, self.offset, create),
                }
            }
        }
    }
}

/// Targets grouped by what they lock (`K`: an identity): the first target of each group in the
/// order first seen, in the strongest mode asked, with every role asked for. Two names for one
/// file are one lock, taken once.
#[derive(Debug)]
pub struct Groups<K> {
    order: Vec<K>,
    by_key: HashMap<K, (LockTarget, Vec<Role>)>,
}

impl<K: Hash + Eq + Clone> Default for Groups<K> {
    fn default() -> Self {
        Groups { order: Vec::new(), by_key: HashMap::new() }
    }
}

impl<K: Hash + Eq + Clone> Groups<K> {
    /// Adds `target` under `key`; true when it starts a new group.
    pub fn add(&mut self, key: K, target: LockTarget) -> bool {
        match self.by_key.get_mut(&key) {
            Some((group, roles)) => {
                group.mode = group.mode.max(target.mode);
                if !roles.contains(&target.role) {
                    roles.push(target.role);
                }
                false
            }
            None => {
                self.order.push(key.clone());
                let roles = vec![target.role.clone()];
                self.by_key.insert(key, (target, roles));
                true
            }
        }
    }

    pub fn get(&self, key: &K) -> Option<&(LockTarget, Vec<Role>)> {
        self.by_key.get(key)
    }

    pub fn keys(&self) -> &[K] {
        &self.order
    }

    /// The groups in the order first seen: key, merged target, roles.
    pub fn into_ordered(mut self) -> Vec<(K, LockTarget, Vec<Role>)> {
        self.order
            .into_iter()
            .filter_map(|key| self.by_key.remove(&key).map(|(target, roles)| (key, target, roles)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_merge_modes_and_roles_in_first_seen_order() {
        let disk = |t: &str| Role::Disk { target: Some(t.to_owned()) };
        let mut groups = Groups::default();
        assert!(groups.add(1, LockTarget::new("/a".into(), LockMode::Shared, disk("vda"))));
        assert!(groups.add(2, LockTarget::new("/b".into(), LockMode::Shared, disk("vdb"))));
        assert!(!groups.add(1, LockTarget::new("/a-link".into(), LockMode::Exclusive, disk("vdc"))));
        assert!(!groups.add(1, LockTarget::new("/a".into(), LockMode::Shared, disk("vda"))));
        let out = groups.into_ordered();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, 1);
        assert_eq!(out[0].1.path, PathBuf::from("/a"), "the first name is kept");
        assert_eq!(out[0].1.mode, LockMode::Exclusive, "the strongest mode wins");
        assert_eq!(out[0].2, vec![disk("vda"), disk("vdc")], "every role, once");
        assert_eq!(out[1].1.path, PathBuf::from("/b"));
    }
}
