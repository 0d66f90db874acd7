//! A stable identity for a block device, the same on every host that sees the device: what a
//! lock on the device node (which only this host's kernel sees) cannot give a fleet.
//!
//! In order of preference, from sysfs (`/sys/dev/block/MAJ:MIN`): the device-mapper UUID (LVM
//! logical volumes: `LVM-<vg uuid><lv uuid>`, multipath: `mpath-<wwid>`), the SCSI/NVMe WWID, the
//! serial number, a loop device's backing file; then the `/dev/disk/by-id` names. A device with
//! none of these gets no lockspace lock (logged): its lock stays host-local.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::stack::read_trimmed;

/// The stable identity of the block device `path` resolves to; `None` for anything else.
pub fn stable_id(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)));
    let id = from_sysfs(&sys).or_else(|| from_by_id(rdev));
    if id.is_none() {
        log::info!("{}: no stable identity (dm uuid, wwid, serial, by-id): its lock is host-local", path.display());
    }
    id
}

fn from_sysfs(sys: &Path) -> Option<String> {
    if let Some(uuid) = read_trimmed(&sys.join("dm/uuid")) {
        return Some(format!("dm:{uuid}"));
    }
    if let Some(file) = read_trimmed(&sys.join("loop/backing_file")) {
        let offset = read_trimmed(&sys.join("loop/offset")).unwrap_or_else(|| "0".to_owned());
        return Some(format!("loop:{file}@{offset}"));
    }
    // A partition: the whole disk's identity (whatever kind: wwid, serial, a loop device's file,
    // a device-mapper UUID) plus the partition number.
    if let Some(n) = read_trimmed(&sys.join("partition")) {
        let disk = super::stack::follow(sys)?.parent()?.to_owned();
        if disk.join("partition").exists() {
            return None;
        }
        return from_sysfs(&disk).map(|id| format!("{id}-part{n}"));
    }
    for (file, kind) in [("device/wwid", "wwid"), ("wwid", "wwid"), ("device/serial", "serial"), ("serial", "serial")] {
        if let Some(value) = read_trimmed(&sys.join(file)) {
            return Some(format!("{kind}:{value}"));
        }
    }
    None
}

fn from_by_id(rdev: u64) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir("/dev/disk/by-id")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            (fs::metadata(e.path()).ok()?.rdev() == rdev).then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names.into_iter().next().map(|n| format!("by-id:{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_have_no_block_identity() {
        let f = tempfile::NamedTempFile::new().expect("temp");
        assert_eq!(stable_id(f.path()), None);
        assert_eq!(stable_id(Path::new("/dev/null")), None);
    }

    #[test]
    fn partitions_take_their_disks_identity_whatever_its_kind() {
        let root = tempfile::tempdir().expect("dir");
        let disk = root.path().join("loop0");
        std::fs::create_dir_all(disk.join("loop")).expect("mkdir");
        std::fs::write(disk.join("loop/backing_file"), "/srv/f.raw\n").expect("write");
        let part = disk.join("loop0p1");
        std::fs::create_dir_all(&part).expect("mkdir");
        std::fs::write(part.join("partition"), "1\n").expect("write");
        assert_eq!(from_sysfs(&part).as_deref(), Some("loop:/srv/f.raw@0-part1"));
        let sdb = root.path().join("sdb");
        std::fs::create_dir_all(sdb.join("device")).expect("mkdir");
        std::fs::write(sdb.join("device/wwid"), "naa.1\n").expect("write");
        let sdb2 = sdb.join("sdb2");
        std::fs::create_dir_all(&sdb2).expect("mkdir");
        std::fs::write(sdb2.join("partition"), "2\n").expect("write");
        assert_eq!(from_sysfs(&sdb2).as_deref(), Some("wwid:naa.1-part2"));
    }

    #[test]
    fn sysfs_preference_order() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("dm")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("device")).expect("mkdir");
        std::fs::write(dir.path().join("device/wwid"), "naa.5000c500a1b2c3d4\n").expect("write");
        assert_eq!(from_sysfs(dir.path()).as_deref(), Some("wwid:naa.5000c500a1b2c3d4"));
        std::fs::write(dir.path().join("dm/uuid"), "LVM-abc\n").expect("write");
        assert_eq!(from_sysfs(dir.path()).as_deref(), Some("dm:LVM-abc"));
    }
}
