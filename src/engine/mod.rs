//! The sanlock engine (`engine = "sanlock"`): every resource a guest locks is also a sanlock
//! lease on shared storage, held by the guest's holder as a registered sanlock client, so hosts
//! that share block storage but no filesystem lock manager exclude each other.
//!
//! The OFD locks stay exactly as they are (same-host exclusion, `check`, `run`); this engine
//! adds, per guest, the leases below. The hook works out *which* leases ([`specs`]) and sends them
//! with the lock fds in its `acquire`; the holder resolves them to places on storage, acquires
//! them all or none (`leases`), and holds them for the guest's life.
//!
//! | what the guest locks | its sanlock lease |
//! |---|---|
//! | any resource (image, block device by stable id, network disk, data file, firmware store) | lockspace `lockhook`, named by the resource's lockspace key (hashed to fit 48 bytes), allocated in the lease area's resource index |
//! | the guest itself | `guest:<uuid>`, exclusive: one host runs a UUID; a migration destination checks its source by it |
//! | `<lease>` | `<lockspace>:<key>:<target path>:<offset>`, as libvirt's sanlock driver takes it |
//! | a disk, with `libvirt_disk_lease_dir` | `__LIBVIRT__DISKS__:<md5 of the path as written>:<dir>/<md5>:0`, as libvirt's `auto_disk_leases` |
//!
//! Files: `area.rs` (the lease area's layout), `hosts.rs` (its host-name table), `leases.rs`
//! (a holder's leases), `admin.rs` (`lockhook sanlock init|join|status`), `lock_lost.rs` (the
//! killpath).

pub mod admin;
pub mod area;
pub mod hosts;
pub mod leases;
pub mod lock_lost;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Engine};
use crate::domain::{Domain, Source};
use crate::lock::LockMode;
use crate::state::Resource;
use crate::target::{LockTarget, Role};

/// lockhook's lockspace in the lease area.
pub const LOCKSPACE: &str = "lockhook";
/// libvirt's sanlock driver's lockspace for automatic disk leases.
pub const LIBVIRT_LOCKSPACE: &str = "__LIBVIRT__DISKS__";

/// Where a lease is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeaseAt {
    /// In lockhook's lease area, allocated by name from the resource index (`key`: a
    /// resource's lockspace key, or `guest:<uuid>`).
    Key { key: String },
    /// At a fixed place, initialised by whoever made it (`<lease>`; a lease a holder held).
    Fixed { lockspace: String, name: String, path: PathBuf, offset: u64 },
    /// libvirt's automatic disk lease for the disk source `path` exactly as written: a file in
    /// `libvirt_disk_lease_dir`, created and initialised when missing (as libvirt does).
    LibvirtDisk { path: String },
}

/// One sanlock lease a guest needs, in a mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSpec {
    /// What messages call it: the resource's name, `lease LS/KEY`, `guest NAME`.
    pub what: String,
    pub mode: LockMode,
    pub at: LeaseAt,
    /// Where `at` was found before (a dead holder's lease, re-adopted): used as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<Place>,
}

/// A lease's place on storage: `LOCKSPACE:NAME:PATH:OFFSET`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Place {
    pub lockspace: String,
    pub name: String,
    pub path: PathBuf,
    pub offset: u64,
}

/// The key of a guest's own lease.
pub fn guest_key(uuid: &crate::domain::Uuid) -> String {
    format!("guest:{uuid}")
}

/// A resource the OFD side locks (or awaits), as far as its sanlock lease is concerned.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub what: String,
    pub mode: LockMode,
    /// Its lockspace key: the lease's name in lockhook's index.
    pub key: String,
    /// Only `<lease>` roles: the domain's `<lease>` is the sanlock lease itself.
    pub lease_only: bool,
}

fn lease_only<'a>(mut roles: impl Iterator<Item = &'a Role>) -> bool {
    roles.all(|r| matches!(r, Role::Lease { .. }))
}

impl From<&Resource> for Wanted {
    fn from(r: &Resource) -> Wanted {
        Wanted { what: r.name(), mode: r.mode, key: r.key.clone(), lease_only: lease_only(r.roles.iter()) }
    }
}

impl From<&LockTarget> for Wanted {
    fn from(t: &LockTarget) -> Wanted {
        Wanted {
            what: t.label.clone().unwrap_or_else(|| t.path.display().to_string()),
            mode: t.mode,
            key: t.lockspace_key(),
            lease_only: lease_only(std::iter::once(&t.role)),
        }
    }
}

/// The leases `domain` needs for `resources` (what the OFD side locked or awaits), or none when
/// the engine is not sanlock. The guest's own lease comes first: a migration destination judges
/// every other busy lease by who holds that one.
pub fn specs(config: &Config, domain: &Domain, resources: &[Wanted]) -> Vec<LeaseSpec> {
    if config.engine != Engine::Sanlock {
        return Vec::new();
    }
    let mut specs = vec![LeaseSpec {
        what: format!("guest {}", domain.name),
        mode: LockMode::Exclusive,
        at: LeaseAt::Key { key: guest_key(&domain.uuid) },
        place: None,
    }];
    for resource in resources {
        // `<lease>` elements are sanlock leases of their own (below), not index entries.
        if resource.lease_only {
            continue;
        }
        specs.push(LeaseSpec {
            what: resource.what.clone(),
            mode: resource.mode,
            at: LeaseAt::Key { key: resource.key.clone() },
            place: None,
        });
    }
    for lease in &domain.leases {
        specs.push(LeaseSpec {
            what: match &lease.lockspace {
                Some(ls) => format!("lease {ls}/{}", lease.key),
                None => format!("lease {}", lease.key),
            },
            mode: LockMode::Exclusive,
            at: LeaseAt::Fixed {
                lockspace: lease.lockspace.clone().unwrap_or_else(|| LOCKSPACE.to_owned()),
                name: lease.key.clone(),
                path: lease.path.clone(),
                offset: lease.offset,
            },
            place: None,
        });
    }
    if config.sanlock.libvirt_disk_lease_dir.is_some() {
        specs.extend(libvirt_disk_specs(config, domain));
    }
    specs
}

/// libvirt's automatic disk leases: one per disk with a file or block source that is not
/// read-only (libvirt's `virDomainLockManagerAddImage` skips read-only disks and everything
/// that is not a local path), shared for shareable disks, named by the source as written.
fn libvirt_disk_specs(config: &Config, domain: &Domain) -> Vec<LeaseSpec> {
    let _ = config;
    let mut specs = Vec::new();
    for disk in &domain.disks {
        let path = match &disk.source {
            Source::File(p) | Source::Block(p) => p,
            _ => continue,
        };
        if disk.readonly {
            continue;
        }
        let Some(path) = path.to_str() else { continue };
        specs.push(LeaseSpec {
            what: format!("{path} (libvirt's disk lease)"),
            mode: if disk.shareable { LockMode::Shared } else { LockMode::Exclusive },
            at: LeaseAt::LibvirtDisk { path: path.to_owned() },
            place: None,
        });
    }
    specs
}

/// The lowercase hex MD5 of `path`: libvirt's resource name for a disk's automatic lease.
pub fn libvirt_disk_name(path: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(path.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_names_are_md5_of_the_path_as_written() {
        // md5("/var/lib/libvirt/images/a.img"), as `printf %s PATH | md5sum` prints it.
        assert_eq!(libvirt_disk_name(""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(libvirt_disk_name("abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_ne!(libvirt_disk_name("/a//b"), libvirt_disk_name("/a/b"));
    }

    fn domain(xml_devices: &str) -> Domain {
        let xml = format!(
            "<domain type='kvm'><name>vm1</name><uuid>6f1d3c2a-1b2c-4d5e-8f90-0a1b2c3d4e5f</uuid><devices>{xml_devices}</devices></domain>"
        );
        Domain::parse(xml.as_bytes()).expect("parse")
    }

    #[test]
    fn ofd_engine_needs_no_leases() {
        let d = domain("");
        assert!(specs(&Config::default(), &d, &[]).is_empty());
    }

    #[test]
    fn sanlock_specs_cover_guest_leases_and_libvirt_disks() {
        let d = domain(
            "<disk type='file' device='disk'><source file='/img//a.img'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><source file='/img/ro.img'/><target dev='vdb'/><readonly/></disk>\
             <disk type='block' device='disk'><source dev='/dev/sdx'/><target dev='vdc'/><shareable/></disk>\
             <lease><lockspace>fleet</lockspace><key>vm1</key><target path='/l/vm1' offset='1048576'/></lease>",
        );
        let mut config = Config { engine: Engine::Sanlock, ..Config::default() };
        config.sanlock.libvirt_disk_lease_dir = Some("/var/lib/libvirt/sanlock".into());
        let specs = specs(&config, &d, &[]);
        assert_eq!(specs[0].at, LeaseAt::Key { key: "guest:6f1d3c2a-1b2c-4d5e-8f90-0a1b2c3d4e5f".into() });
        assert!(specs.contains(&LeaseSpec {
            what: "lease fleet/vm1".into(),
            mode: LockMode::Exclusive,
            at: LeaseAt::Fixed {
                lockspace: "fleet".into(),
                name: "vm1".into(),
                path: "/l/vm1".into(),
                offset: 1 << 20
            },
            place: None,
        }));
        let libvirt: Vec<_> = specs.iter().filter(|s| matches!(s.at, LeaseAt::LibvirtDisk { .. })).collect();
        assert_eq!(libvirt.len(), 2, "{specs:?}");
        assert_eq!(libvirt[0].at, LeaseAt::LibvirtDisk { path: "/img//a.img".into() });
        assert_eq!(
            (libvirt[1].mode, &libvirt[1].at),
            (LockMode::Shared, &LeaseAt::LibvirtDisk { path: "/dev/sdx".into() })
        );
    }
}
