//! A stable identity for a block device, the same on every host that sees the device: what a
//! lock on the device node (which only this host's kernel sees) cannot give a fleet.
//!
//! In order of preference, from sysfs (`/sys/dev/block/MAJ:MIN`): the device-mapper UUID (LVM
//! logical volumes: `LVM-<vg uuid><lv uuid>`, multipath: `mpath-<wwid>`), the SCSI/NVMe WWID, the
//! serial number, a loop device's backing file; then the `/dev/disk/by-id` names. A device with
//! none of these gets no lockspace lock (logged): its lock stays host-local.
//!
//! A virtio disk's `serial` is the one identity the kernel does not keep: reading it asks the
//! emulated device (60-230 µs here, on every `prepare` of a guest whose images sit on that disk),
//! so this host remembers it (`Serials`) for as long as the disk's `diskseq` stays the same. That
//! is the trust the kernel itself gives every other kind of disk: SCSI WWIDs (VPD pages) and NVMe
//! serials are read once, when the device is found, and kept. A virtio backend that changes a
//! disk's serial under a live device (QEMU cannot: `serial` is fixed when the device is made)
//! is seen only when the disk is added anew.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::stack::read_trimmed;

/// Where the kernel says which boot this is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// A serials file longer than this is started afresh (a host sees few disks in one boot).
const MAX_SERIALS: usize = 4096;

/// The serials of virtio disks read before on this boot, in one file of the run directory
/// (`Paths::serials`): the boot id, then a line `<diskseq>\t<serial>` per disk. The kernel gives
/// every disk it adds, and every new medium, a new `diskseq` in each boot, and a virtio disk's
/// serial cannot change under the same one; a file from another boot (a run directory not on
/// tmpfs) is not believed. Only root can write the run directory.
pub struct Serials {
    file: Option<PathBuf>,
    boot_id: PathBuf,
}

impl Serials {
    pub fn in_run_dir(paths: &crate::paths::Paths) -> Serials {
        Serials { file: Some(paths.serials()), boot_id: PathBuf::from(BOOT_ID) }
    }

    /// Read from the device every time.
    pub fn uncached() -> Serials {
        Serials { file: None, boot_id: PathBuf::from(BOOT_ID) }
    }

    /// The `serial` of the disk whose sysfs directory is `sys`.
    fn serial(&self, sys: &Path) -> Option<String> {
        let attribute = sys.join("serial");
        let read = || read_trimmed(&attribute);
        // Most devices that get here have no serial at all: one `stat` says so.
        if !attribute.exists() {
            return None;
        }
        let Some(file) = &self.file else { return read() };
        let (Some(seq), Some(boot)) = (read_trimmed(&sys.join("diskseq")), read_trimmed(&self.boot_id)) else {
            return read();
        };
        // Written whole and renamed into place, so it ends with a line's end (else: not believed).
        let known = fs::read_to_string(file)
            .ok()
            .filter(|text| text.ends_with('\n') && text.lines().next() == Some(boot.as_str()));
        let remembered = known.as_deref().and_then(|text| {
            text.lines().skip(1).find_map(|line| line.split_once('\t').filter(|(s, _)| *s == seq).map(|(_, v)| v))
        });
        if let Some(serial) = remembered {
            return Some(serial.to_owned());
        }
        let serial = read()?;
        if !serial.contains(['\t', '\n']) {
            let known = known.filter(|text| text.lines().count() <= MAX_SERIALS);
            let mut text = known.unwrap_or_else(|| format!("{boot}\n"));
            text.push_str(&format!("{seq}\t{serial}\n"));
            // Best effort: a serial not remembered is read again next time.
            let _ = crate::rundir::replace_file(file, text.as_bytes(), false);
        }
        Some(serial)
    }
}

/// The stable identity of the block device `path` resolves to; `None` for anything else.
pub fn stable_id(path: &Path, serials: &Serials) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)));
    let id = from_sysfs(&sys, serials).or_else(|| from_by_id(rdev));
    if id.is_none() {
        log::info!("{}: no stable identity (dm uuid, wwid, serial, by-id): its lock is host-local", path.display());
    }
    id
}

fn from_sysfs(sys: &Path, serials: &Serials) -> Option<String> {
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
        return from_sysfs(&disk, serials).map(|id| format!("{id}-part{n}"));
    }
    for (file, kind) in [("device/wwid", "wwid"), ("wwid", "wwid"), ("device/serial", "serial")] {
        if let Some(value) = read_trimmed(&sys.join(file)) {
            return Some(format!("{kind}:{value}"));
        }
    }
    serials.serial(sys).map(|value| format!("serial:{value}"))
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
        assert_eq!(stable_id(f.path(), &Serials::uncached()), None);
        assert_eq!(stable_id(Path::new("/dev/null"), &Serials::uncached()), None);
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
        assert_eq!(from_sysfs(&part, &Serials::uncached()).as_deref(), Some("loop:/srv/f.raw@0-part1"));
        let sdb = root.path().join("sdb");
        std::fs::create_dir_all(sdb.join("device")).expect("mkdir");
        std::fs::write(sdb.join("device/wwid"), "naa.1\n").expect("write");
        let sdb2 = sdb.join("sdb2");
        std::fs::create_dir_all(&sdb2).expect("mkdir");
        std::fs::write(sdb2.join("partition"), "2\n").expect("write");
        assert_eq!(from_sysfs(&sdb2, &Serials::uncached()).as_deref(), Some("wwid:naa.1-part2"));
    }

    /// A disk's serial is read once per `diskseq` and boot, then remembered; a new disk (another
    /// `diskseq`) or another boot reads it again.
    #[test]
    fn serials_are_remembered_per_disk_and_boot() {
        let root = tempfile::tempdir().expect("dir");
        let disk = root.path().join("vda");
        std::fs::create_dir_all(&disk).expect("mkdir");
        let boot = root.path().join("boot_id");
        let write = |path: &Path, text: &str| std::fs::write(path, text).expect("write");
        write(&boot, "b1\n");
        write(&disk.join("diskseq"), "7\n");
        write(&disk.join("serial"), "disk-one\n");
        let run = root.path().join("run");
        std::fs::create_dir_all(&run).expect("mkdir");
        let paths = crate::paths::Paths::new(&run);
        let serials = Serials { boot_id: boot.clone(), ..Serials::in_run_dir(&paths) };
        assert_eq!(from_sysfs(&disk, &serials).as_deref(), Some("serial:disk-one"));
        assert_eq!(std::fs::read_to_string(paths.serials()).expect("remembered"), "b1\n7\tdisk-one\n");
        // The device is not asked again: what it would say now does not matter.
        write(&disk.join("serial"), "disk-two\n");
        assert_eq!(from_sysfs(&disk, &serials).as_deref(), Some("serial:disk-one"));
        write(&disk.join("diskseq"), "8\n");
        assert_eq!(from_sysfs(&disk, &serials).as_deref(), Some("serial:disk-two"), "another disk");
        write(&disk.join("diskseq"), "7\n");
        write(&boot, "b2\n");
        assert_eq!(from_sysfs(&disk, &serials).as_deref(), Some("serial:disk-two"), "another boot");
        assert_eq!(std::fs::read_to_string(paths.serials()).expect("file"), "b2\n7\tdisk-two\n");
        assert_eq!(std::fs::read_dir(&run).expect("dir").count(), 1, "no temporary file left");
        // A file that does not end with a line's end is not believed (read again, rewritten).
        std::fs::write(paths.serials(), "b2\n7\tdisk-t").expect("cut off");
        assert_eq!(from_sysfs(&disk, &serials).as_deref(), Some("serial:disk-two"));
        assert_eq!(std::fs::read_to_string(paths.serials()).expect("file"), "b2\n7\tdisk-two\n");
        // A serial with a tab in it cannot be a line of the file: read every time, not kept.
        write(&disk.join("diskseq"), "9\n");
        write(&disk.join("serial"), "a\tb\n");
        assert_eq!(from_sysfs(&disk, &serials).as_deref(), Some("serial:a\tb"));
        assert_eq!(std::fs::read_to_string(paths.serials()).expect("file"), "b2\n7\tdisk-two\n");
        // No serial at all: none (the remembered file is not even read).
        std::fs::remove_file(disk.join("serial")).expect("rm");
        assert_eq!(from_sysfs(&disk, &serials), None);
        write(&disk.join("serial"), "disk-two\n");
        // Without a diskseq (an older kernel) the device is asked every time.
        std::fs::remove_file(disk.join("diskseq")).expect("rm");
        write(&disk.join("serial"), "disk-three\n");
        assert_eq!(from_sysfs(&disk, &serials).as_deref(), Some("serial:disk-three"));
    }

    #[test]
    fn sysfs_preference_order() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("dm")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("device")).expect("mkdir");
        std::fs::write(dir.path().join("device/wwid"), "naa.5000c500a1b2c3d4\n").expect("write");
        assert_eq!(from_sysfs(dir.path(), &Serials::uncached()).as_deref(), Some("wwid:naa.5000c500a1b2c3d4"));
        std::fs::write(dir.path().join("dm/uuid"), "LVM-abc\n").expect("write");
        assert_eq!(from_sysfs(dir.path(), &Serials::uncached()).as_deref(), Some("dm:LVM-abc"));
    }
}
