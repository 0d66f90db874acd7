//! The layers beneath a block device, read from sysfs: what else a guest's writes reach.
//!
//! A guest that writes `/dev/loop0p1` writes bytes of `/dev/loop0` and of the file behind it; one
//! that writes an LVM logical volume writes its physical volumes; a multipath map writes through
//! each of its paths; an md array writes its members. Bytes, not names, must not have two
//! writers, so a guest also locks every layer beneath its device, *shared*: whoever writes a
//! lower layer directly (exclusive) collides with it, while two partitions of one disk, or two LVs
//! of one volume group, only share the layer beneath and do not.
//!
//! sysfs (`/sys/dev/block/MAJ:MIN` links to the device's directory) says, per device:
//! - `partition` present: a partition; the directory above is the whole disk;
//! - `slaves/*`: the devices a device-mapper (LVM, multipath, dm-crypt) or md device is built on;
//! - `loop/backing_file`: the file a loop device reads and writes.
//!
//! The walk is bounded (`MAX_LAYERS`, cycles ignored) and never leaves the sysfs root it is
//! given, so tests run it on a fake tree.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// More layers than this under one device are not followed (real stacks have a handful).
pub const MAX_LAYERS: usize = 64;

pub use crate::target::LayerKind;

/// A block device, as sysfs names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockDev {
    /// The kernel name (`sda`, `dm-3`, `loop0p1`): its node is `/dev/<name>`.
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

/// What a layer is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LayerTarget {
    Block(BlockDev),
    File(PathBuf),
}

/// One layer beneath a device: what it is, how it relates, and the device right above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub target: LayerTarget,
    pub kind: LayerKind,
    /// The kernel name of the device this layer is beneath.
    pub above: String,
}

/// Where the sysfs link `link` leads (`/sys/dev/block/MAJ:MIN`, a `slaves/` entry): one
/// `readlink`, its `..` taken off the link's own directory (a real directory in sysfs, as every
/// directory a device link leads through is), instead of `canonicalize`'s `readlink` of every
/// component. Not a link (a fake tree in tests may have a directory there): `canonicalize`.
pub(super) fn follow(link: &Path) -> Option<PathBuf> {
    let Ok(target) = fs::read_link(link) else { return fs::canonicalize(link).ok() };
    let mut out = if target.is_absolute() { PathBuf::new() } else { link.parent()?.to_owned() };
    for part in target.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.is_dir().then_some(out)
}

pub(super) fn read_trimmed(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The device in sysfs directory `dir` (its name and `dev` numbers).
fn block_at(dir: &Path) -> Option<BlockDev> {
    let (major, minor) = parse_dev(&read_trimmed(&dir.join("dev"))?)?;
    let name = dir.file_name()?.to_str()?.to_owned();
    Some(BlockDev { name, major, minor })
}

/// The block device `major:minor` as sysfs names it; `None` when sysfs does not know it (an
/// anonymous device: NFS, FUSE, tmpfs, btrfs subvolumes).
pub fn device(sys: &Path, major: u32, minor: u32) -> Option<BlockDev> {
    block_at(&follow(&sys.join(format!("dev/block/{major}:{minor}")))?)
}

/// The device numbers of `path` when it is a block device (following symlinks).
fn block_numbers(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| (libc::major(meta.rdev()), libc::minor(meta.rdev())))
}

/// The layers beneath the block device `major:minor`, nearest first, read from `sys` (normally
/// `/sys`). Empty for a device with nothing beneath it (a plain disk) or unknown to sysfs.
pub fn layers(sys: &Path, major: u32, minor: u32) -> Vec<Layer> {
    layers_with(sys, major, minor, &block_numbers)
}

/// `layers`, with `block_of` saying whether a loop device's backing file is itself a block
/// device (a loop over a partition, or over another loop device), whose layers then follow.
fn layers_with(sys: &Path, major: u32, minor: u32, block_of: &dyn Fn(&Path) -> Option<(u32, u32)>) -> Vec<Layer> {
    let Ok(root) = fs::canonicalize(sys) else { return Vec::new() };
    let Some(start) = follow(&root.join(format!("dev/block/{major}:{minor}"))) else { return Vec::new() };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut queue = vec![start];
    while let Some(dir) = queue.pop() {
        if !dir.starts_with(&root) || !seen.insert(dir.clone()) || out.len() >= MAX_LAYERS {
            continue;
        }
        let Some(above) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
        let mut below = Vec::new();
        if dir.join("partition").exists() {
            if let Some(disk) = dir.parent() {
                below.push((disk.to_owned(), LayerKind::Disk));
            }
        }
        if let Ok(slaves) = fs::read_dir(dir.join("slaves")) {
            let mut slaves: Vec<PathBuf> = slaves.filter_map(|e| follow(&e.ok()?.path())).collect();
            slaves.sort();
            below.extend(slaves.into_iter().map(|s| (s, LayerKind::Slave)));
        }
        if let Some(file) = read_trimmed(&dir.join("loop/backing_file")) {
            // The kernel appends " (deleted)" when the file was unlinked: nothing to lock then.
            if !file.ends_with(" (deleted)") {
                let file = PathBuf::from(file);
                match block_of(&file).and_then(|(ma, mi)| follow(&root.join(format!("dev/block/{ma}:{mi}")))) {
                    // A loop over a block device: that device is the layer, and its own follow.
                    Some(lower) => below.push((lower, LayerKind::BackingFile)),
                    None => out.push(Layer {
                        target: LayerTarget::File(file),
                        kind: LayerKind::BackingFile,
                        above: above.clone(),
                    }),
                }
            }
        }
        for (lower, kind) in below {
            if !lower.starts_with(&root) || seen.contains(&lower) {
                continue;
            }
            if let Some(dev) = block_at(&lower) {
                out.push(Layer { target: LayerTarget::Block(dev), kind, above: above.clone() });
                queue.push(lower);
            }
        }
    }
    out.truncate(MAX_LAYERS);
    out
}

/// The device node of `dev` under `dev_dir` (normally `/dev`, where devtmpfs names every block
/// device by its kernel name), checked to be that very device.
pub fn node(dev_dir: &Path, dev: &BlockDev) -> Option<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if dev.name.contains('/') || dev.name.starts_with('.') {
        return None;
    }
    let path = dev_dir.join(&dev.name);
    let meta = fs::symlink_metadata(&path).ok()?;
    let rdev = meta.rdev();
    (meta.file_type().is_block_device() && libc::major(rdev) == dev.major && libc::minor(rdev) == dev.minor)
        .then_some(path)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake sysfs tree: `devices/<path>` directories with `dev` files, and `dev/block/M:m`
    /// links to them, relative as the kernel's are.
    pub(crate) struct FakeSys {
        pub dir: tempfile::TempDir,
    }

    impl FakeSys {
        pub fn new() -> FakeSys {
            let dir = tempfile::tempdir().expect("dir");
            fs::create_dir_all(dir.path().join("dev/block")).expect("mkdir");
            FakeSys { dir }
        }

        pub fn root(&self) -> &Path {
            self.dir.path()
        }

        /// Adds device `rel` (e.g. `virtual/block/loop0/loop0p1`) numbered `major:minor`.
        pub fn device(&self, rel: &str, major: u32, minor: u32) -> PathBuf {
            let dir = self.dir.path().join("devices").join(rel);
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("dev"), format!("{major}:{minor}\n")).expect("dev");
            let link = self.dir.path().join(format!("dev/block/{major}:{minor}"));
            std::os::unix::fs::symlink(relative(link.parent().expect("dir"), &dir), link).expect("link");
            dir
        }

        pub fn partition(&self, rel: &str, major: u32, minor: u32, number: u32) -> PathBuf {
            let dir = self.device(rel, major, minor);
            fs::write(dir.join("partition"), format!("{number}\n")).expect("partition");
            dir
        }

        pub fn slave(&self, of: &Path, slave: &Path) {
            fs::create_dir_all(of.join("slaves")).expect("mkdir");
            let name = slave.file_name().expect("name");
            std::os::unix::fs::symlink(relative(&of.join("slaves"), slave), of.join("slaves").join(name))
                .expect("slave link");
        }
    }

    /// `to` as a path relative to the directory `from` (`../../devices/...`).
    fn relative(from: &Path, to: &Path) -> PathBuf {
        let common = from.components().zip(to.components()).take_while(|(a, b)| a == b).count();
        let ups = from.components().count() - common;
        let mut out: PathBuf = std::iter::repeat_n("..", ups).collect();
        out.extend(to.components().skip(common));
        out
    }

    #[test]
    fn following_a_device_link_is_canonicalize_on_the_real_sysfs() {
        let mut seen = 0;
        for entry in fs::read_dir("/sys/dev/block").expect("sysfs") {
            let link = entry.expect("entry").path();
            let real = fs::canonicalize(&link).expect("canonicalize");
            assert_eq!(follow(&link).as_ref(), Some(&real), "{}", link.display());
            for slave in fs::read_dir(real.join("slaves")).into_iter().flatten() {
                let slave = slave.expect("slave").path();
                assert_eq!(follow(&slave), fs::canonicalize(&slave).ok(), "{}", slave.display());
            }
            seen += 1;
        }
        assert!(seen > 0, "no block devices in /sys/dev/block");
        assert_eq!(follow(Path::new("/sys/dev/block/4095:1048575")), None);
    }

    fn summary(layers: &[Layer]) -> Vec<String> {
        layers
            .iter()
            .map(|l| match &l.target {
                LayerTarget::Block(d) => format!("{} {} {}", d.name, l.kind.phrase(), l.above),
                LayerTarget::File(p) => format!("{} {} {}", p.display(), l.kind.phrase(), l.above),
            })
            .collect()
    }

    #[test]
    fn partition_disk_and_loop_file() {
        let sys = FakeSys::new();
        let disk = sys.device("virtual/block/loop0", 7, 0);
        fs::create_dir_all(disk.join("loop")).expect("mkdir");
        fs::write(disk.join("loop/backing_file"), "/srv/images/disk.raw\n").expect("backing");
        sys.partition("virtual/block/loop0/loop0p1", 259, 0, 1);
        sys.partition("virtual/block/loop0/loop0p2", 259, 1, 2);
        assert_eq!(
            summary(&layers(sys.root(), 259, 0)),
            ["loop0 disk of loop0p1", "/srv/images/disk.raw backing file of loop0"]
        );
        assert_eq!(summary(&layers(sys.root(), 7, 0)), ["/srv/images/disk.raw backing file of loop0"]);
        assert!(layers(sys.root(), 8, 0).is_empty(), "unknown device");
    }

    #[test]
    fn lvm_on_a_partition_and_multipath_and_md() {
        let sys = FakeSys::new();
        let sdb = sys.device("pci0/host0/block/sdb", 8, 16);
        let sdb1 = sys.partition("pci0/host0/block/sdb/sdb1", 8, 17, 1);
        let _ = sdb;
        // Two LVs of one VG on sdb1.
        let lv1 = sys.device("virtual/block/dm-0", 253, 0);
        let lv2 = sys.device("virtual/block/dm-1", 253, 1);
        sys.slave(&lv1, &sdb1);
        sys.slave(&lv2, &sdb1);
        assert_eq!(summary(&layers(sys.root(), 253, 0)), ["sdb1 component of dm-0", "sdb disk of sdb1"]);
        assert_eq!(summary(&layers(sys.root(), 253, 1)), ["sdb1 component of dm-1", "sdb disk of sdb1"]);
        // A multipath map over two paths, and an LV on top of it.
        let sdc = sys.device("pci0/host1/block/sdc", 8, 32);
        let sdd = sys.device("pci0/host2/block/sdd", 8, 48);
        let mpath = sys.device("virtual/block/dm-2", 253, 2);
        sys.slave(&mpath, &sdc);
        sys.slave(&mpath, &sdd);
        let lv = sys.device("virtual/block/dm-3", 253, 3);
        sys.slave(&lv, &mpath);
        assert_eq!(
            summary(&layers(sys.root(), 253, 3)),
            ["dm-2 component of dm-3", "sdc component of dm-2", "sdd component of dm-2"]
        );
        // md raid1 over two disks.
        let md = sys.device("virtual/block/md0", 9, 0);
        let sde = sys.device("pci0/host3/block/sde", 8, 64);
        let sdf = sys.device("pci0/host3/block/sdf", 8, 80);
        sys.slave(&md, &sde);
        sys.slave(&md, &sdf);
        assert_eq!(summary(&layers(sys.root(), 9, 0)), ["sde component of md0", "sdf component of md0"]);
    }

    #[test]
    fn loops_over_block_devices_are_followed() {
        let sys = FakeSys::new();
        let loop0 = sys.device("virtual/block/loop0", 7, 0);
        fs::create_dir_all(loop0.join("loop")).expect("mkdir");
        fs::write(loop0.join("loop/backing_file"), "/srv/f.raw\n").expect("backing");
        sys.partition("virtual/block/loop0/loop0p1", 259, 0, 1);
        // loop1 over /dev/loop0p1, loop2 over /dev/loop1.
        for (n, of) in [(1, "/dev/loop0p1"), (2, "/dev/loop1")] {
            let dir = sys.device(&format!("virtual/block/loop{n}"), 7, n);
            fs::create_dir_all(dir.join("loop")).expect("mkdir");
            fs::write(dir.join("loop/backing_file"), format!("{of}\n")).expect("backing");
        }
        let block_of = |p: &Path| match p.to_str() {
            Some("/dev/loop0p1") => Some((259, 0)),
            Some("/dev/loop1") => Some((7, 1)),
            _ => None,
        };
        assert_eq!(
            summary(&layers_with(sys.root(), 7, 2, &block_of)),
            [
                "loop1 backing file of loop2",
                "loop0p1 backing file of loop1",
                "loop0 disk of loop0p1",
                "/srv/f.raw backing file of loop0"
            ]
        );
        assert_eq!(device(sys.root(), 259, 0).map(|d| d.name), Some("loop0p1".to_owned()));
        assert_eq!(device(sys.root(), 8, 0), None);
    }

    #[test]
    fn cycles_and_escapes_are_not_followed() {
        let sys = FakeSys::new();
        let a = sys.device("virtual/block/dm-0", 253, 0);
        let b = sys.device("virtual/block/dm-1", 253, 1);
        sys.slave(&a, &b);
        sys.slave(&b, &a);
        assert_eq!(summary(&layers(sys.root(), 253, 0)), ["dm-1 component of dm-0"]);
        // A slave link pointing outside the sysfs root is ignored.
        let outside = tempfile::tempdir().expect("dir");
        fs::write(outside.path().join("dev"), "8:0\n").expect("dev");
        let c = sys.device("virtual/block/dm-2", 253, 2);
        sys.slave(&c, outside.path());
        assert!(layers(sys.root(), 253, 2).is_empty());
    }

    #[test]
    fn nodes_are_checked_by_number() {
        let dev = BlockDev { name: "null".into(), major: 1, minor: 3 };
        assert_eq!(node(Path::new("/dev"), &dev), None, "/dev/null is a character device");
        assert_eq!(node(Path::new("/dev"), &BlockDev { name: "../etc".into(), major: 0, minor: 0 }), None);
    }
}
