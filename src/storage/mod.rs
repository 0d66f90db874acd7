//! Turns a `resource::Plan` into concrete paths: pool volumes are looked up in libvirt's pool
//! definitions, and qcow2 backing chains the XML does not list yet are read from image headers.
//!
//! Size: about 390 lines of code; the other 140 are its unit tests, kept beside what they test.

// A resolution error ends the hook call that made it (one per call): its size does not matter.
#![allow(clippy::result_large_err)]

pub mod block;
pub mod pool;
pub mod qcow2;
pub mod stack;

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::{Config, MissingPolicy};
use crate::lock::LockMode;
use crate::lockspace::{LockFileKind, Lockspace, LockspaceError};
use crate::resource::{Plan, Planned, Target};
use crate::target::{Creation, LockTarget, Role};

/// A chain deeper than this is refused: libvirt's own limit ("backing chains more than 200
/// layers deep are not supported").
pub const MAX_CHAIN: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{role}")]
    Pool {
        role: Role,
        #[source]
        source: pool::PoolError,
    },
    #[error("{role}: {path}: cannot read the qcow2 header")]
    Header {
        role: Role,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{role}: lockspace_dir {dir} does not exist: create it (install.sh does) or mount the shared storage")]
    NoLockspace { role: Role, dir: PathBuf },
    #[error("{role}: cannot use the lockspace")]
    PrepareLockspace {
        role: Role,
        #[source]
        source: LockspaceError,
    },
    #[error("{role}: {path}: backing chain is longer than {MAX_CHAIN} images or loops")]
    ChainTooLong { role: Role, path: PathBuf },
}

/// Resolves every planned request. Skipped chain links (protocol backing files) are appended
/// to `plan.skipped` for the log, volumes left unlocked by `on_unidentified` to `plan.unlocked`.
pub fn resolve(plan: &mut Plan, config: &Config) -> Result<Vec<LockTarget>, StorageError> {
    let mut out = Vec::with_capacity(plan.requests.len());
    let stores = Stores {
        lockspace: Lockspace::new(&config.lockspace_dir),
        serials: block::Serials::in_run_dir(&crate::paths::Paths::new(&config.run_dir)),
        filesystems: Default::default(),
    };
    let lockspace = &stores.lockspace;
    for planned in &plan.requests {
        let path = match &planned.target {
            Target::LockFile { kind, key, label } => {
                lock_file_request(lockspace, planned, *kind, key, label, &mut out)?;
                continue;
            }
            Target::Path(p) => p.clone(),
            Target::Volume { pool, volume } => {
                let resolved =
                    pool::resolve(pool, volume, &config.libvirt_run_dir, &config.libvirt_config_dir, Path::new(DEV));
                let volume = match resolved {
                    Ok(volume) => volume,
                    Err(source) if source.is_unidentified() && config.on_unidentified == MissingPolicy::Skip => {
                        plan.unlocked
                            .push(format!("{}: {source}; started unlocked (on_unidentified = \"skip\")", planned.role));
                        continue;
                    }
                    Err(source) => return Err(StorageError::Pool { role: planned.role.clone(), source }),
                };
                let (path, network) = volume.into_parts();
                // A volume that is a network disk is the same lock as that disk named directly.
                if let Some(net) = network {
                    let target = crate::resource::network_target(&net.protocol, Some(&net.name), &net.hosts);
                    if let Target::LockFile { kind, key, label } = &target {
                        lock_file_request(lockspace, planned, *kind, key, label, &mut out)?;
                    }
                }
                let Some(path) = path else { continue };
                path
            }
        };
        if planned.role == Role::Memory && std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_char_device()) {
            // A device-DAX nvdimm (`/dev/daxN.M`): a character device is never opened here.
            plan.skipped.push(format!("{}: {} is a character device (device DAX)", planned.role, path.display()));
            continue;
        }
        let meta =
            file_requests(&stores, planned, &path, planned.mode, planned.role.clone(), &mut out, &mut plan.skipped)?;
        if matches!(planned.role, Role::Disk { .. } | Role::Backing { .. } | Role::Mirror { .. } | Role::Command) {
            image_files(&stores, planned, (path, meta), &mut out, &mut plan.skipped)?;
        }
    }
    Ok(out)
}

/// Where the requests' lock files and the identities of devices come from.
struct Stores {
    lockspace: Lockspace,
    serials: block::Serials,
    /// The filesystems (`st_dev`) whose device this call looked at already: many images share one.
    filesystems: std::cell::RefCell<HashSet<u64>>,
}

/// The requests for one file a guest opens, `path`, in `mode` as `role`: the file itself and,
/// - for a block device: its node under `/dev` too (another node for the same device, made with
///   `mknod`, is another inode: the `/dev` one is what everybody locks), its stable identity in
///   the lockspace, and every layer beneath it (see `stack`);
/// - for an image file on a block device's filesystem: that device, shared, with its identity
///   and layers (whoever writes the device writes the image).
///
/// Returns what `stat` said of `path` (following symlinks), `None` when it does not exist.
fn file_requests(
    stores: &Stores,
    planned: &Planned,
    path: &Path,
    mode: LockMode,
    role: Role,
    out: &mut Vec<LockTarget>,
    skipped: &mut Vec<String>,
) -> Result<Option<std::fs::Metadata>, StorageError> {
    out.push(LockTarget { mode, role: role.clone(), ..request(planned, path.to_owned()) });
    // A lease is one byte of its file, locked there and nowhere else.
    if matches!(role, Role::Lease { .. }) {
        return Ok(None);
    }
    let Ok(meta) = std::fs::metadata(path) else { return Ok(None) };
    let sys = Path::new(SYS);
    if meta.file_type().is_block_device() {
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let top = stack::device(sys, major, minor);
        if let Some(node) = top.as_ref().and_then(|dev| stack::node(Path::new(DEV), dev)) {
            let same = std::fs::metadata(&node).is_ok_and(|n| (n.dev(), n.ino()) == (meta.dev(), meta.ino()));
            if !same {
                out.push(LockTarget { mode, role: role.clone(), optional: false, ..request(planned, node) });
            }
        }
        identity_request(stores, planned, path, mode, role, out)?;
        layer_requests(stores, planned, (major, minor), top.map(|d| d.name), mode, out, skipped)?;
    } else if meta.is_file() && !matches!(role, Role::Lease { .. } | Role::Loader) {
        // Many images share one filesystem: its device is resolved once per call.
        if !stores.filesystems.borrow_mut().insert(meta.dev()) {
            return Ok(Some(meta));
        }
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let Some(fs_dev) = stack::device(sys, major, minor) else { return Ok(Some(meta)) };
        let Some(node) = stack::node(Path::new(DEV), &fs_dev) else { return Ok(Some(meta)) };
        let layer = Role::Layer {
            layer: stack::LayerKind::Filesystem,
            above: path.display().to_string(),
            of: disk_of(&planned.role),
        };
        out.push(LockTarget {
            mode: LockMode::Shared,
            role: layer.clone(),
            optional: false,
            ..request(planned, node.clone())
        });
        // Best effort, like the node lock: without a usable lockspace these are only skipped.
        let mut beneath = Vec::new();
        let taken =
            identity_request(stores, planned, &node, LockMode::Shared, layer.clone(), &mut beneath).and_then(|()| {
                let top = Some(fs_dev.name);
                layer_requests(stores, planned, (major, minor), top, LockMode::Shared, &mut beneath, skipped)
            });
        match taken {
            Ok(()) => out.append(&mut beneath),
            Err(e) => skipped.push(format!("{layer}: {}; its identity is not locked", crate::error_chain(&e))),
        }
    }
    Ok(Some(meta))
}

/// The lock file `key` of `kind` in the lockspace, called `label` in messages.
fn lock_file_request(
    lockspace: &Lockspace,
    planned: &Planned,
    kind: LockFileKind,
    key: &str,
    label: &str,
    out: &mut Vec<LockTarget>,
) -> Result<(), StorageError> {
    prepare(lockspace, kind, planned)?;
    out.push(LockTarget {
        key: Some(key.to_owned()),
        label: Some(label.to_owned()),
        create: Creation::LockFile,
        lock_file: Some(kind),
        ..request(planned, lockspace.lock_file(kind, key))
    });
    Ok(())
}

/// Across hosts a device node lock is host-local: the device's stable identity is locked in the
/// lockspace too. Without a usable lockspace that lock cannot be taken, and skipping it would
/// leave the device unprotected from other hosts without a word: refuse instead.
fn identity_request(
    stores: &Stores,
    planned: &Planned,
    node: &std::path::Path,
    mode: LockMode,
    role: Role,
    out: &mut Vec<LockTarget>,
) -> Result<(), StorageError> {
    let Some(id) = block::stable_id(node, &stores.serials) else { return Ok(()) };
    let key = format!("block:{id}");
    prepare(&stores.lockspace, LockFileKind::Block, planned)?;
    let lock_file = stores.lockspace.lock_file(LockFileKind::Block, &key);
    let label = format!("{} ({id})", node.display());
    out.push(LockTarget {
        key: Some(key),
        label: Some(label),
        create: Creation::LockFile,
        lock_file: Some(LockFileKind::Block),
        mode,
        role,
        optional: false,
        ..request(planned, lock_file)
    });
    Ok(())
}

/// The disk target a request serves, for naming the layers beneath it.
fn disk_of(role: &Role) -> Option<String> {
    match role {
        Role::Disk { target } => target.clone(),
        Role::Backing { of } | Role::Mirror { of } | Role::DataFile { of } | Role::Overlay { of } => of.clone(),
        Role::Layer { of, .. } => of.clone(),
        _ => None,
    }
}

/// Every layer beneath the block device `major:minor` (called `top` by the kernel), shared: its
/// node and stable identity, or the file behind a loop device. The file behind the device
/// itself, when it is a loop device, is locked in the device's own `mode`: two loop devices over
/// one file (another offset, another path to it) are two writers of its bytes.
fn layer_requests(
    stores: &Stores,
    planned: &Planned,
    (major, minor): (u32, u32),
    top: Option<String>,
    mode: LockMode,
    out: &mut Vec<LockTarget>,
    skipped: &mut Vec<String>,
) -> Result<(), StorageError> {
    let of = disk_of(&planned.role);
    for layer in stack::layers(Path::new(SYS), major, minor) {
        let role = Role::Layer { layer: layer.kind, above: format!("/dev/{}", layer.above), of: of.clone() };
        match &layer.target {
            stack::LayerTarget::Block(dev) => match stack::node(std::path::Path::new(DEV), dev) {
                Some(node) => {
                    out.push(LockTarget {
                        mode: LockMode::Shared,
                        role: role.clone(),
                        optional: false,
                        ..request(planned, node.clone())
                    });
                    identity_request(stores, planned, &node, LockMode::Shared, role, out)?;
                }
                None => {
                    skipped.push(format!("{role}: {DEV}/{} (device {}:{}) has no node", dev.name, dev.major, dev.minor))
                }
            },
            stack::LayerTarget::File(file) => {
                let mode = if top.as_deref() == Some(layer.above.as_str()) { mode } else { LockMode::Shared };
                out.push(LockTarget { mode, role, optional: false, ..request(planned, file.clone()) })
            }
        }
    }
    Ok(())
}

/// Where sysfs and the device nodes are.
const SYS: &str = "/sys";
const DEV: &str = "/dev";

/// The requests for images named directly (`lockhook run`, `lockhook check`), resolved as a
/// guest's disks are: block devices with their stable identities and the layers beneath, qcow2
/// data files, and (with `backing_chains`) the chain read from the headers, shared.
pub fn resolve_paths(targets: &[PathBuf], mode: LockMode, config: &Config) -> Result<Vec<LockTarget>, StorageError> {
    let mut plan = Plan {
        requests: targets
            .iter()
            .map(|path| Planned {
                target: Target::Path(path.clone()),
                mode,
                offset: 0,
                role: Role::Command,
                create: Creation::Never,
                optional: false,
                read_chain: config.backing_chains,
                format: None,
            })
            .collect(),
        skipped: Vec::new(),
        unlocked: Vec::new(),
    };
    resolve(&mut plan, config)
}

/// Makes sure `kind`'s lock files can be taken: the lockspace is a directory (not a symlink) and
/// has its `kind` directory.
fn prepare(lockspace: &Lockspace, kind: LockFileKind, planned: &Planned) -> Result<(), StorageError> {
    lockspace.prepare(kind).map_err(|source| match source {
        LockspaceError::Missing { path } => StorageError::NoLockspace { role: planned.role.clone(), dir: path },
        source => StorageError::PrepareLockspace { role: planned.role.clone(), source },
    })
}

fn request(planned: &Planned, path: PathBuf) -> LockTarget {
    LockTarget {
        path,
        mode: planned.mode,
        offset: planned.offset,
        role: planned.role.clone(),
        create: planned.create,
        optional: planned.optional,
        key: None,
        label: None,
        lock_file: None,
    }
}

/// The files QEMU opens for a qcow2 image besides the image: its external data file (in the
/// image's mode) and, when the plan says to read it (`read_chain`), the backing chain from the
/// headers, each link shared with its own data file. `top` is the image's path and what `stat`
/// said of it just before.
fn image_files(
    stores: &Stores,
    top: &Planned,
    (top_path, top_meta): (PathBuf, Option<std::fs::Metadata>),
    out: &mut Vec<LockTarget>,
    skipped: &mut Vec<String>,
) -> Result<(), StorageError> {
    let of = disk_of(&top.role);
    let role = if top.read_chain { Role::Backing { of: of.clone() } } else { top.role.clone() };
    let mut seen = HashSet::new();
    let mut current = top_path;
    let mut format = top.format.clone();
    let mut mode = top.mode;
    let mut known = top_meta;
    loop {
        // A missing top image is reported when it is locked; here there is just nothing to read.
        let Some(meta) = known.take().or_else(|| std::fs::metadata(&current).ok()) else { return Ok(()) };
        if !seen.insert((meta.dev(), meta.ino())) || seen.len() > MAX_CHAIN {
            return Err(StorageError::ChainTooLong { role, path: current });
        }
        let header_err = |source| StorageError::Header { role: role.clone(), path: current.clone(), source };
        if format.as_deref().is_some_and(|f| f != "qcow2") {
            return Ok(());
        }
        // Format qcow2 or unknown (not in the header extension): the header says, as QEMU's probe
        // would (one open: `read_header` is `None` for anything without the qcow2 magic).
        let Some(header) = qcow2::read_header(&current).map_err(header_err)? else { return Ok(()) };
        if let Some(name) = &header.data_file {
            match qcow2::resolve_name(&current, name) {
                Some(data) => {
                    let role = Role::DataFile { of: of.clone() };
                    // QEMU 7.2 opens a relative data file name relative to its own working
                    // directory (`/` under libvirt), newer libvirt relative to the image: both.
                    if !Path::new(name).is_absolute() {
                        let from_root = Path::new("/").join(name);
                        if from_root != data && from_root.exists() {
                            file_requests(stores, top, &from_root, mode, role.clone(), out, skipped)?;
                        }
                    }
                    file_requests(stores, top, &data, mode, role, out, skipped)?;
                }
                None => skipped.push(format!("data file of {}: {name:?} is not a local file", current.display())),
            }
        }
        if !top.read_chain {
            return Ok(());
        }
        let Some(backing) = header.backing else { return Ok(()) };
        let Some(next) = qcow2::resolve_name(&current, &backing.name) else {
            skipped.push(format!("{role}: {:?} is not a local file", backing.name));
            return Ok(());
        };
        known = file_requests(stores, top, &next, LockMode::Shared, role.clone(), out, skipped)?;
        current = next;
        format = backing.format;
        mode = LockMode::Shared;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Domain;

    /// A config whose lockspace, run directory and libvirt run directory are under `dir`:
    /// resolving touches nothing of the host's (a filesystem's identity goes to the lockspace,
    /// a disk's serial to the run directory).
    fn config_in(dir: &Path) -> Config {
        Config {
            lockspace_dir: dir.join("lockspace"),
            run_dir: dir.join("run"),
            libvirt_run_dir: dir.join("libvirt"),
            ..Config::default()
        }
    }

    #[test]
    fn chain_from_headers() {
        let dir = tempfile::tempdir().expect("dir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, b"raw").expect("write");
        let mid = dir.path().join("mid.qcow2");
        qcow2::tests::write_qcow2(&mid, Some(("base.raw", Some("raw"))));
        let top = dir.path().join("top.qcow2");
        qcow2::tests::write_qcow2(&top, Some((mid.to_str().expect("utf8"), None)));
        let xml = format!(
            "<domain><name>v</name><uuid>f3fa73d4-1c2b-4e5f-8a9b-0123456789ab</uuid><devices><disk type='file'>\
             <driver type='qcow2'/><source file='{}'/><target dev='vda'/></disk></devices></domain>",
            top.display()
        );
        let domain = Domain::parse(xml.as_bytes()).expect("parse");
        let config = config_in(dir.path());
        let mut plan = crate::resource::plan(&domain, &config);
        let reqs = resolve(&mut plan, &config).expect("resolve");
        // The filesystem the temp dir is on may be a block device: its layer is beside the point.
        let got: Vec<_> =
            reqs.iter().filter(|r| !matches!(r.role, Role::Layer { .. })).map(|r| (r.path.clone(), r.mode)).collect();
        assert_eq!(got, vec![(top, LockMode::Exclusive), (mid, LockMode::Shared), (base, LockMode::Shared)]);
    }

    #[test]
    fn images_on_one_filesystem_lock_its_device_once() {
        // The checkout's own filesystem: a block device's on the machines this runs on. Its
        // identity's lock file and the disk serials go to a lockspace and run directory of the
        // test's own.
        let dir = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).expect("dir");
        let fs_dev = std::fs::metadata(dir.path()).expect("stat").dev();
        let device = stack::device(Path::new(SYS), libc::major(fs_dev), libc::minor(fs_dev));
        assert!(
            device.is_some(),
            "{} is not on a block device's filesystem: run this where it is",
            dir.path().display()
        );
        std::fs::create_dir_all(dir.path().join("lockspace")).expect("mkdir");
        let config = config_in(dir.path());
        let layers_for = |images: u8| {
            let disks: String = (0..images)
                .map(|i| {
                    let img = dir.path().join(format!("{i}.raw"));
                    std::fs::write(&img, b"raw").expect("write");
                    format!(
                        "<disk type='file'><driver type='raw'/><source file='{}'/><target dev='vd{}'/></disk>",
                        img.display(),
                        char::from(b'a' + i)
                    )
                })
                .collect();
            let xml = format!(
                "<domain><name>v</name><uuid>f3fa73d4-1c2b-4e5f-8a9b-0123456789ab</uuid><devices>{disks}</devices></domain>"
            );
            let domain = Domain::parse(xml.as_bytes()).expect("parse");
            let mut plan = crate::resource::plan(&domain, &config);
            let reqs = resolve(&mut plan, &config).expect("resolve");
            assert_eq!(reqs.iter().filter(|r| matches!(r.role, Role::Disk { .. })).count(), usize::from(images));
            reqs.iter()
                .filter(|r| matches!(r.role, Role::Layer { layer: stack::LayerKind::Filesystem, .. }))
                .map(|r| (r.path.clone(), r.mode))
                .collect::<Vec<(PathBuf, LockMode)>>()
        };
        let one = layers_for(1);
        let node = one.iter().find(|(path, _)| std::fs::metadata(path).is_ok_and(|m| m.rdev() == fs_dev));
        assert!(matches!(node, Some((_, LockMode::Shared))), "the filesystem's device node, shared: {one:?}");
        assert_eq!(one.iter().filter(|(path, _)| path.starts_with("/dev")).count(), 1, "{one:?}");
        assert_eq!(layers_for(3), one, "the same requests for the filesystem whatever the images on it");
    }

    /// The lockspace keys `devices` resolve to, with `storage/<pool>.xml` files from `pools`.
    fn keys_of(devices: &str, pools: &[(&str, &str)]) -> Vec<String> {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("etc/storage")).expect("mkdir");
        for (name, xml) in pools {
            std::fs::write(dir.path().join(format!("etc/storage/{name}.xml")), xml).expect("write");
        }
        std::fs::create_dir_all(dir.path().join("lockspace")).expect("mkdir");
        let config = Config {
            libvirt_config_dir: dir.path().join("etc"),
            libvirt_run_dir: dir.path().join("run"),
            lockspace_dir: dir.path().join("lockspace"),
            ..Config::default()
        };
        let xml = format!(
            "<domain><name>v</name><uuid>f3fa73d4-1c2b-4e5f-8a9b-0123456789ab</uuid><devices>{devices}</devices></domain>"
        );
        let domain = Domain::parse(xml.as_bytes()).expect("parse");
        let mut plan = crate::resource::plan(&domain, &config);
        resolve(&mut plan, &config).expect("resolve").into_iter().filter_map(|r| r.key).collect()
    }

    fn volume_disk(pool: &str, volume: &str) -> String {
        format!("<disk type='volume'><source pool='{pool}' volume='{volume}'/><target dev='vda'/></disk>")
    }

    fn network_disk(protocol: &str, name: &str, hosts: &str) -> String {
        format!(
            "<disk type='network'><source protocol='{protocol}' name='{name}'>{hosts}</source><target dev='vda'/></disk>"
        )
    }

    #[test]
    fn network_volumes_are_their_direct_disks() {
        let rbd = "<pool type='rbd'><name>ceph</name><source><name>rbd</name><host name='mon1' port='6789'/>\
                   <host name='mon2'/></source></pool>";
        let volume = keys_of(&volume_disk("ceph", "vm1"), &[("ceph", rbd)]);
        assert_eq!(volume, vec!["net:rbd:///rbd/vm1".to_owned()]);
        // Other monitors, or none at all (ceph.conf): the same image, the same lock.
        assert_eq!(keys_of(&network_disk("rbd", "rbd/vm1", "<host name='mon3'/>"), &[]), volume);
        assert_eq!(keys_of(&network_disk("rbd", "rbd/vm1", ""), &[]), volume);

        let gluster = "<pool type='gluster'><name>gl</name><source><host name='gl1'/><dir path='/vms'/>\
                       <name>gv0</name></source></pool>";
        let volume = keys_of(&volume_disk("gl", "a.qcow2"), &[("gl", gluster)]);
        assert_eq!(volume, vec!["net:gluster:///gv0/vms/a.qcow2".to_owned()]);
        let direct = keys_of(&network_disk("gluster", "gv0/vms/a.qcow2", "<host name='gl2' port='24007'/>"), &[]);
        assert_eq!(direct, volume);

        let iscsi = "<pool type='iscsi'><name>san</name><source><host name='SAN.example.com'/>\
                     <device path='iqn.2013-06.com.example:t1'/></source><target><path>/dev/disk/by-path</path>\
                     </target></pool>";
        let volume = keys_of(&volume_disk("san", "unit:0:0:1"), &[("san", iscsi)]);
        assert_eq!(volume, vec!["net:iscsi://san.example.com:3260/iqn.2013-06.com.example:t1/1".to_owned()]);
        let host = "<host name='san.example.com' port='3260'/>";
        assert_eq!(keys_of(&network_disk("iscsi", "iqn.2013-06.com.example:t1/1", host), &[]), volume);
        // An iSCSI target is named by its portal: another server is another LUN.
        let other = keys_of(&network_disk("iscsi", "iqn.2013-06.com.example:t1/1", "<host name='b'/>"), &[]);
        assert_ne!(other, volume);
        // No LUN is LUN 0.
        let lun0 = keys_of(&volume_disk("san", "unit:0:0:0"), &[("san", iscsi)]);
        assert_eq!(keys_of(&network_disk("iscsi", "iqn.2013-06.com.example:t1", host), &[]), lun0);
    }

    #[test]
    fn unidentified_volumes_follow_the_policy() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("etc/storage")).expect("mkdir");
        std::fs::write(dir.path().join("etc/storage/hba.xml"), "<pool type='scsi'><name>hba</name></pool>")
            .expect("write");
        let xml = format!(
            "<domain><name>v</name><uuid>f3fa73d4-1c2b-4e5f-8a9b-0123456789ab</uuid><devices>{}{}</devices></domain>",
            volume_disk("hba", "unit:0:0:1"),
            volume_disk("gone", "v")
        );
        let domain = Domain::parse(xml.as_bytes()).expect("parse");
        let fail = Config { libvirt_config_dir: dir.path().join("etc"), ..Config::default() };
        let err = resolve(&mut crate::resource::plan(&domain, &fail), &fail).expect_err("fail");
        let line = crate::error_chain(&err);
        assert!(line.contains("disk vda: pool \"hba\", volume \"unit:0:0:1\": the paths of scsi pool"), "{line}");
        let skip = Config { on_unidentified: MissingPolicy::Skip, ..fail };
        let mut plan = crate::resource::plan(&domain, &skip);
        assert!(resolve(&mut plan, &skip).expect("skip").is_empty());
        assert_eq!(plan.unlocked.len(), 2, "{:?}", plan.unlocked);
        assert!(plan.unlocked[1].contains("pool \"gone\", volume \"v\": no pool definition"), "{:?}", plan.unlocked);
        // A name that is unsafe to use is refused whatever the policy.
        let bad = Domain::parse(
            b"<domain><name>v</name><uuid>f3fa73d4-1c2b-4e5f-8a9b-0123456789ab</uuid><devices>\
              <disk type='volume'><source pool='../x' volume='v'/><target dev='vda'/></disk></devices></domain>",
        )
        .expect("parse");
        assert!(resolve(&mut crate::resource::plan(&bad, &skip), &skip).is_err());
    }

    #[test]
    fn looping_chain_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let a = dir.path().join("a.qcow2");
        let b = dir.path().join("b.qcow2");
        qcow2::tests::write_qcow2(&a, Some(("b.qcow2", Some("qcow2"))));
        qcow2::tests::write_qcow2(&b, Some(("a.qcow2", Some("qcow2"))));
        let planned = Planned {
            target: Target::Path(a.clone()),
            mode: LockMode::Exclusive,
            offset: 0,
            role: Role::Disk { target: Some("vda".into()) },
            create: Creation::Never,
            optional: false,
            read_chain: true,
            format: Some("qcow2".into()),
        };
        let mut plan = Plan { requests: vec![planned], ..Plan::default() };
        assert!(matches!(resolve(&mut plan, &Config::default()), Err(StorageError::ChainTooLong { .. })));
    }
}
