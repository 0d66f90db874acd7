//! What a guest locks: domain → planned lock requests. Pure: no file is touched here; pool
//! volumes and qcow2 headers are read by `storage` when the plan is resolved.
//!
//! | domain XML                                  | request                              |
//! |---------------------------------------------|--------------------------------------|
//! | writable `file`/`block`/`volume` disk       | the image, exclusive, byte 0         |
//! | `<readonly/>` (and cdrom) / `<shareable/>`  | the image, shared (or none: config)  |
//! | backing chain (XML, else qcow2 header)      | each backing image, shared           |
//! | `<lease>`                                   | byte `offset` of `target path`, excl.|
//! | empty cdrom, `dir`, network, nvme, ...      | nothing (a skip note for the log)    |

use std::fmt;
use std::path::PathBuf;

use crate::config::{Config, SharedPolicy};
use crate::domain::{Backing, Disk, Domain, Source};
use crate::lock::LockMode;

/// What a request is for; shown in messages and in `lockhook status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Role {
    Disk { target: Option<String> },
    Backing { of: Option<String> },
    Lease { key: String, lockspace: Option<String> },
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Disk { target: Some(t) } => write!(f, "disk {t}"),
            Role::Disk { target: None } => f.write_str("disk"),
            Role::Backing { of: Some(t) } => write!(f, "backing image of {t}"),
            Role::Backing { of: None } => f.write_str("backing image"),
            Role::Lease { key, lockspace: Some(ls) } => write!(f, "lease {ls}/{key}"),
            Role::Lease { key, lockspace: None } => write!(f, "lease {key}"),
        }
    }
}

/// Where the lock goes before storage resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    Volume { pool: String, volume: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub target: Target,
    pub mode: LockMode,
    pub offset: u64,
    pub role: Role,
    /// Leases create their file when missing; images must exist.
    pub is_lease: bool,
    /// `startupPolicy='optional'`: a missing image is skipped, as libvirt drops the disk.
    pub optional: bool,
    /// Read the backing chain from the image header once the path is known (qcow2 disk with no
    /// `<backingStore>` in the XML, backing chains enabled).
    pub read_chain: bool,
    /// The image format from `<driver type>`, when given.
    pub format: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub requests: Vec<Planned>,
    /// One line per disk that gets no lock, for the log.
    pub skipped: Vec<String>,
}

fn disk_mode(disk: &Disk, config: &Config) -> Option<LockMode> {
    let policy = if disk.readonly {
        config.readonly
    } else if disk.shareable {
        config.shareable
    } else {
        return Some(LockMode::Exclusive);
    };
    match policy {
        SharedPolicy::Shared => Some(LockMode::Shared),
        SharedPolicy::None => None,
    }
}

fn target_of(source: &Source) -> Result<Target, &'static str> {
    match source {
        Source::File(p) | Source::Block(p) => Ok(Target::Path(p.clone())),
        Source::Volume { pool, volume } => Ok(Target::Volume { pool: pool.clone(), volume: volume.clone() }),
        Source::Network { .. } => Err("network disk (not locked on one host)"),
        Source::Unsupported(_) => Err("disk type lockhook cannot lock"),
        Source::Empty => Err("no source (empty drive)"),
    }
}

fn label(disk: &Disk) -> String {
    disk.target.clone().unwrap_or_else(|| "(no target)".to_owned())
}

fn plan_backing(chain: &[Backing], of: &Option<String>, plan: &mut Plan) {
    for backing in chain {
        match target_of(&backing.source) {
            Ok(target) => plan.requests.push(Planned {
                target,
                mode: LockMode::Shared,
                offset: 0,
                role: Role::Backing { of: of.clone() },
                is_lease: false,
                optional: false,
                read_chain: false,
                format: backing.format.clone(),
            }),
            Err(why) => plan.skipped.push(format!("backing image of {}: {why}", of.as_deref().unwrap_or("?"))),
        }
    }
}

/// Plans the locks for `domain` under `config`.
pub fn plan(domain: &Domain, config: &Config) -> Plan {
    let mut plan = Plan::default();
    for disk in &domain.disks {
        let target = match target_of(&disk.source) {
            Ok(target) => target,
            Err(why) => {
                plan.skipped.push(format!("disk {}: {why}", label(disk)));
                continue;
            }
        };
        match disk_mode(disk, config) {
            Some(mode) => plan.requests.push(Planned {
                target,
                mode,
                offset: 0,
                role: Role::Disk { target: disk.target.clone() },
                is_lease: false,
                optional: disk.optional,
                read_chain: config.backing_chains
                    && disk.backing.is_none()
                    && matches!(disk.format.as_deref(), Some("qcow2")),
                format: disk.format.clone(),
            }),
            None => plan.skipped.push(format!("disk {}: read-only or shareable, not locked by config", label(disk))),
        }
        if config.backing_chains {
            if let Some(chain) = &disk.backing {
                plan_backing(chain, &disk.target, &mut plan);
            }
        }
    }
    for lease in &domain.leases {
        plan.requests.push(Planned {
            target: Target::Path(lease.path.clone()),
            mode: LockMode::Exclusive,
            offset: lease.offset,
            role: Role::Lease { key: lease.key.clone(), lockspace: lease.lockspace.clone() },
            is_lease: true,
            optional: false,
            read_chain: false,
            format: None,
        });
    }
    plan
}
