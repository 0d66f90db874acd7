//! What a guest locks: domain → planned lock requests. Pure: no file is touched here; pool
//! volumes and qcow2 headers are read by `storage` when the plan is resolved.
//!
//! | domain XML                                  | request                              |
//! |---------------------------------------------|--------------------------------------|
//! | writable `file`/`block`/`volume` disk       | the image, exclusive, byte 0         |
//! | `<readonly/>` (and cdrom) / `<shareable/>`  | the image, shared (or none: config)  |
//! | backing chain (XML, else qcow2 header)      | each backing image, shared           |
//! | `<lease>`                                   | byte `offset` of `target path`, excl.|
//! | `<source><dataStore>` (and qcow2 header)    | the data file, in the disk's mode    |
//! | `<transient shareBacking='yes'/>`           | the image shared; libvirt's overlay `<image>.TRANSIENT-<guest>` exclusive once it exists |
//! | `<os><nvram>` / `<os><loader>`              | the variable store exclusive / the code shared (writable pflash: exclusive) |
//! | `<memory model='nvdimm'/'virtio-pmem'>`     | its backing file, exclusive          |
//! | empty cdrom, `dir`, nvme, vhostuser, ...    | nothing (a skip note for the log)    |
//!
//! The layers beneath a block device (partition → disk, device-mapper/md slaves, loop → file)
//! are added by `storage`, which looks at the device.

use std::path::PathBuf;

use crate::config::{Config, SharedPolicy};
use crate::domain::{Backing, Disk, Domain, FirmwareKind, Source, Transient};
use crate::lock::LockMode;
use crate::target::{Creation, Role};

/// Where the lock goes before storage resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    Volume {
        pool: String,
        volume: String,
    },
    /// A lock file in the lockspace standing for something that cannot be locked in place (a
    /// network disk), named by `key` (the same on every host) and called `label` in messages.
    LockFile {
        kind: crate::lockspace::LockFileKind,
        key: String,
        label: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub target: Target,
    pub mode: LockMode,
    pub offset: u64,
    pub role: Role,
    /// Leases create their file when missing; images must exist.
    pub create: Creation,
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
    /// One line per disk left unlocked although it should have been (lockhook cannot identify
    /// it and `on_unidentified = "skip"`), for the log at warning level. Filled by `storage`.
    pub unlocked: Vec<String>,
}

fn disk_mode(disk: &Disk, config: &Config) -> Option<LockMode> {
    disk_mode_for(disk.readonly, disk.shareable, config)
}

fn disk_mode_for(readonly: bool, shareable: bool, config: &Config) -> Option<LockMode> {
    let policy = if readonly {
        config.readonly
    } else if shareable {
        config.shareable
    } else {
        return Some(LockMode::Exclusive);
    };
    match policy {
        SharedPolicy::Shared => Some(LockMode::Shared),
        SharedPolicy::None => None,
    }
}

fn target_of(source: &Source) -> Result<Target, String> {
    match source {
        Source::File(p) | Source::Block(p) => Ok(Target::Path(p.clone())),
        Source::Volume { pool, volume } => Ok(Target::Volume { pool: pool.clone(), volume: volume.clone() }),
        Source::Network { protocol, name, hosts } => Ok(network_target(protocol, name.as_deref(), hosts)),
        Source::Unsupported(kind) => Err(format!("type '{kind}' has no image lockhook can lock")),
        Source::Empty => Err("no source (empty drive)".to_owned()),
    }
}

/// The well-known port of a network disk protocol, so `host` and `host:10809` are one key.
fn default_port(protocol: &str) -> &'static str {
    match protocol {
        "nbd" => "10809",
        "iscsi" => "3260",
        "rbd" => "6789",
        "gluster" => "24007",
        "http" => "80",
        "https" => "443",
        "ftp" => "21",
        "ftps" => "990",
        "tftp" => "69",
        "ssh" => "22",
        "nfs" => "2049",
        _ => "",
    }
}

/// The lockspace lock file for a network disk (or a pool volume that is one): keyed by
/// `network_label`, the same on every host.
pub fn network_target(protocol: &str, name: Option<&str>, hosts: &[crate::domain::NetworkHost]) -> Target {
    let label = network_label(protocol, name, hosts);
    Target::LockFile { kind: crate::lockspace::LockFileKind::Network, key: format!("net:{label}"), label }
}

/// Protocols whose names are global to a cluster, whichever of its servers a disk lists (or none:
/// Ceph's `ceph.conf` names the monitors): an rbd `pool/image`, a gluster `volume/path` reached
/// through any server of its trusted pool, a sheepdog VDI, a VxHS volume UUID. Their keys leave
/// the servers out, or two guests listing different monitors would not collide. (Two clusters
/// with the same names collide too: a false refusal, never a missed one.)
fn names_are_global(protocol: &str) -> bool {
    matches!(protocol, "rbd" | "gluster" | "sheepdog" | "vxhs")
}

/// `protocol://host:port[,host:port...]/name`, hosts sorted: the same on every host for the same
/// export, whatever order the XML lists the servers in. A unix socket is `unix:<path>`. For
/// cluster-wide namespaces (`names_are_global`) it is `protocol:///name`. An iSCSI name without
/// a LUN is LUN 0, as for libvirt.
pub fn network_label(protocol: &str, name: Option<&str>, hosts: &[crate::domain::NetworkHost]) -> String {
    let name = name.unwrap_or("").trim_start_matches('/');
    if names_are_global(protocol) {
        return format!("{protocol}:///{name}");
    }
    let lun0;
    let name = if protocol == "iscsi" && !name.is_empty() && !name.contains('/') {
        lun0 = format!("{name}/0");
        lun0.as_str()
    } else {
        name
    };
    let mut servers: Vec<String> = hosts
        .iter()
        .map(|h| match (h.transport.as_deref(), h.socket.as_deref()) {
            (Some("unix"), Some(socket)) => format!("unix:{socket}"),
            _ => format!(
                "{}:{}",
                h.name.as_deref().unwrap_or("").to_ascii_lowercase(),
                h.port.as_deref().unwrap_or_else(|| default_port(protocol))
            ),
        })
        .collect();
    servers.sort();
    servers.dedup();
    format!("{protocol}://{}/{name}", servers.join(","))
}

fn plan_data_store(disk: &Disk, data: &Source, mode: Option<LockMode>, plan: &mut Plan) {
    let role = Role::DataFile { of: disk.target.clone() };
    match (target_of(data), mode) {
        (Ok(target), Some(mode)) => plan.requests.push(simple(target, mode, role, false)),
        (Ok(_), None) => plan.skipped.push(format!("{role}: read-only or shareable, not locked by config")),
        (Err(why), _) => plan.skipped.push(format!("{role}: {why}")),
    }
}

/// `<transient shareBacking='yes'/>`: QEMU opens the image read-only (several guests may share
/// it) and writes libvirt's per-guest overlay, which libvirt creates after `prepare`.
fn plan_shared_transient(disk: &Disk, _t: Transient, domain: &Domain, config: &Config, plan: &mut Plan) {
    let base = match transient_parts(disk, &domain.name) {
        Some((overlay, base)) => {
            plan.requests.push(simple(
                Target::Path(overlay),
                LockMode::Exclusive,
                Role::Overlay { of: disk.target.clone() },
                true,
            ));
            base
        }
        None => {
            // Not a file: libvirt's overlay goes elsewhere; the image is still only read.
            plan.skipped.push(format!("disk {}: transient overlay of a non-file image; not locked", label(disk)));
            disk.source.clone()
        }
    };
    let Ok(target) = target_of(&base) else { return };
    plan.requests.push(Planned {
        target,
        mode: LockMode::Shared,
        offset: 0,
        role: Role::Disk { target: disk.target.clone() },
        create: Creation::Never,
        optional: disk.optional,
        read_chain: config.backing_chains && matches!(disk.format.as_deref(), Some("qcow2")),
        format: disk.format.clone(),
    });
    // In the live XML the overlay is the source and the image its first backing entry.
    if config.backing_chains {
        if let Some(chain) = &disk.backing {
            let below: Vec<Backing> = chain.iter().filter(|b| b.source != base).cloned().collect();
            plan_backing(&below, &disk.target, plan);
        }
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
                create: Creation::Never,
                optional: false,
                read_chain: false,
                format: backing.format.clone(),
            }),
            Err(why) => plan.skipped.push(format!("backing image of {}: {why}", of.as_deref().unwrap_or("?"))),
        }
    }
}

/// The overlay libvirt creates for a `<transient shareBacking='yes'/>` disk: `<image>.TRANSIENT-<guest name>`
/// (libvirt's naming), and the image beneath it. In the live XML the disk's source already is
/// the overlay and the image is its `<backingStore>`.
fn transient_parts(disk: &Disk, guest: &str) -> Option<(PathBuf, Source)> {
    let Source::File(path) = &disk.source else { return None };
    let suffix = format!(".TRANSIENT-{guest}");
    match path.to_str().and_then(|p| p.strip_suffix(&suffix)) {
        Some(base) => Some((path.clone(), Source::File(base.into()))),
        None => Some((PathBuf::from(format!("{}{suffix}", path.display())), disk.source.clone())),
    }
}

fn simple(target: Target, mode: LockMode, role: Role, optional: bool) -> Planned {
    Planned { target, mode, offset: 0, role, create: Creation::Never, optional, read_chain: false, format: None }
}

/// Plans the locks for `domain` under `config`.
pub fn plan(domain: &Domain, config: &Config) -> Plan {
    let mut plan = Plan::default();
    for disk in &domain.disks {
        if let Some(t) = disk.transient.filter(|t| t.share_backing) {
            plan_shared_transient(disk, t, domain, config, &mut plan);
            continue;
        }
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
                create: Creation::Never,
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
        if let Some(data) = &disk.data_store {
            plan_data_store(disk, data, disk_mode(disk, config), &mut plan);
        }
        if let Some(mirror) = &disk.mirror {
            // QEMU writes the copy's destination from the start of the job: exclusive.
            match target_of(mirror) {
                Ok(target) => plan.requests.push(Planned {
                    target,
                    mode: LockMode::Exclusive,
                    offset: 0,
                    role: Role::Mirror { of: disk.target.clone() },
                    create: Creation::Never,
                    optional: false,
                    read_chain: false,
                    format: None,
                }),
                Err(why) => plan.skipped.push(format!("block copy of {}: {why}", label(disk))),
            }
        }
    }
    for fw in &domain.firmware {
        let (role, mode) = match (fw.kind, fw.readonly) {
            (FirmwareKind::Nvram, _) => (Role::Nvram, Some(LockMode::Exclusive)),
            (FirmwareKind::Loader, true) => (Role::Loader, disk_mode_for(true, false, config)),
            (FirmwareKind::Loader, false) => (Role::Loader, Some(LockMode::Exclusive)),
        };
        match (target_of(&fw.source), mode) {
            // libvirt creates the variable store from its template after `prepare`: it is
            // locked at `start`, once it exists.
            (Ok(target), Some(mode)) => {
                plan.requests.push(simple(target, mode, role.clone(), fw.kind == FirmwareKind::Nvram))
            }
            (Ok(_), None) => plan.skipped.push(format!("{role}: read-only, not locked by config")),
            (Err(why), _) => plan.skipped.push(format!("{role}: {why}")),
        }
    }
    for file in &domain.memory_files {
        // QEMU creates a missing backing file itself: locked once it exists.
        plan.requests.push(simple(Target::Path(file.clone()), LockMode::Exclusive, Role::Memory, true));
    }
    for lease in &domain.leases {
        let role = Role::Lease { key: lease.key.clone(), lockspace: lease.lockspace.clone() };
        // Under the sanlock engine the lease's file is sanlock's paxos area, reached by every
        // host: the cross-host lock is sanlock's lease (see `engine`), the local one a lock file
        // keyed by the lease.
        let (target, offset, create) = if config.engine == crate::config::Engine::Sanlock {
            let ls = lease.lockspace.as_deref().unwrap_or(crate::engine::LOCKSPACE);
            let key = format!("lease:{ls}:{}", lease.key);
            let label = format!("lease {ls}/{}", lease.key);
            (Target::LockFile { kind: crate::lockspace::LockFileKind::Lease, key, label }, 0, Creation::LockFile)
        } else {
            (Target::Path(lease.path.clone()), lease.offset, Creation::Lease)
        };
        plan.requests.push(Planned {
            target,
            mode: LockMode::Exclusive,
            offset,
            role,
            create,
            optional: false,
            read_chain: false,
            format: None,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// One line per planned lock or skip, the format of `tests/fixtures/domains/*.keys`.
    fn render(domain: &Domain, plan: &Plan) -> String {
        let mut out = format!("guest {:?} {}\n", domain.name, domain.uuid);
        for p in &plan.requests {
            let target = match &p.target {
                Target::Path(path) => format!("{:?}", path.display().to_string()),
                Target::Volume { pool, volume } => format!("volume {pool:?}/{volume:?}"),
                Target::LockFile { kind, key, .. } => format!("{kind} {key:?}"),
            };
            let extra = [
                (p.read_chain, " +chain-from-header"),
                (p.optional, " optional"),
                (p.create == Creation::Lease, " create"),
            ]
            .iter()
            .filter_map(|(on, text)| on.then_some(*text))
            .collect::<String>();
            out.push_str(&format!("{} @{} {target} ({}){extra}\n", p.mode.as_str(), p.offset, p.role));
        }
        for s in &plan.skipped {
            out.push_str(&format!("skip {s}\n"));
        }
        out
    }

    /// Every `tests/fixtures/domains/NAME.xml` planned with the default config must match
    /// `NAME.keys`. Set `UPDATE_FIXTURES=1` to rewrite the expectations (then review the diff).
    #[test]
    fn fixtures_plan_as_expected() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/domains");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("fixture dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "xml") {
                continue;
            }
            seen += 1;
            let domain = Domain::parse(&std::fs::read(&path).expect("read"))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let got = render(&domain, &plan(&domain, &Config::default()));
            let keys = path.with_extension("keys");
            if std::env::var_os("UPDATE_FIXTURES").is_some() {
                std::fs::write(&keys, &got).expect("write keys");
            }
            let want = std::fs::read_to_string(&keys).unwrap_or_else(|e| panic!("{}: {e}", keys.display()));
            assert_eq!(got, want, "{}", path.display());
        }
        assert!(seen >= 7, "fixtures found: {seen}");
    }

    #[test]
    fn policies_change_modes() {
        let xml =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/domains/readonly-shareable.xml"))
                .expect("read");
        let domain = Domain::parse(&xml).expect("parse");
        let none = Config { readonly: SharedPolicy::None, shareable: SharedPolicy::None, ..Config::default() };
        assert!(plan(&domain, &none).requests.is_empty());
        let backing = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/domains/backing.xml"))
            .expect("read");
        let domain = Domain::parse(&backing).expect("parse");
        let off = Config { backing_chains: false, ..Config::default() };
        assert!(plan(&domain, &off).requests.iter().all(|r| !matches!(r.role, Role::Backing { .. })));
    }
}
