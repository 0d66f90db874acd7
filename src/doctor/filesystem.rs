//! What filesystem a directory is on, and the `shared` check: whether locks in the lockspace
//! reach other hosts.
//!
//! Only a filesystem shared between hosts carries fcntl locks to them: NFS, GFS2, OCFS2, CephFS,
//! SMB, and FUSE filesystems that pass locks on (glusterfs does). On a local filesystem the
//! lockspace protects this host only. NFS mounted with `nolock`, `local_lock=all` or
//! `local_lock=posix` keeps fcntl locks on this host although the files are shared, so other
//! hosts do not see them: that is a warning, read from the mount options in
//! `/proc/self/mountinfo`.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Finding, Severity};

pub(super) use crate::lock::fskind::{kind as fs_kind, magic as fs_magic};

/// The mount (point, fs type, mount + super options) that `path` is on, from the text of
/// `/proc/self/mountinfo`: the longest mount point that is a prefix of the canonical path (the
/// last one listed wins when mounts are stacked).
fn mount_of(mountinfo: &str, path: &Path) -> Option<(PathBuf, String, String)> {
    let mut best: Option<(PathBuf, String, String)> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(point), Some(opts), Some(fstype)) = (left.get(4), left.get(5), right.first()) else { continue };
        let point = PathBuf::from(unescape_mount(point));
        if !path.starts_with(&point) {
            continue;
        }
        if best.as_ref().is_some_and(|(b, _, _)| b.as_os_str().len() > point.as_os_str().len()) {
            continue;
        }
        let options = format!("{opts},{}", right.get(2).copied().unwrap_or(""));
        best = Some((point, (*fstype).to_owned(), options));
    }
    best
}

/// Mount points escape space, tab, newline and backslash as `\ooo`.
fn unescape_mount(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether locks in the lockspace reach other hosts.
pub(super) fn check_shared(lockspace: &Path, out: &mut Vec<Finding>) {
    const CHECK: &str = "shared";
    // A missing lockspace would be created in its nearest existing parent: judge that one.
    let Some(dir) = lockspace.ancestors().find(|p| p.is_dir()) else { return };
    let magic = match fs_magic(dir) {
        Ok(magic) => magic,
        Err(e) => {
            out.push(Finding::new(Severity::Info, CHECK, format!("{}: cannot statfs: {e}", dir.display())));
            return;
        }
    };
    let (mut name, shared) = fs_kind(magic);
    let canonical = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mount = fs::read_to_string("/proc/self/mountinfo").ok().and_then(|m| mount_of(&m, &canonical));
    if let Some((_, fstype, _)) = mount.as_ref().filter(|(_, t, _)| t.starts_with("fuse.")) {
        name = fstype.clone(); // fuse.glusterfs, fuse.sshfs, ...
    }
    let shown = lockspace.display();
    if !shared {
        out.push(Finding::new(
            Severity::Info,
            CHECK,
            format!(
                "{shown}: local filesystem ({name}): locks protect this host only; put lockspace_dir on shared \
                 storage for a fleet"
            ),
        ));
        return;
    }
    if let Some((point, _, options)) = &mount {
        let local = options.split(',').find(|o| *o == "nolock" || *o == "local_lock=all" || *o == "local_lock=posix");
        if let Some(option) = local.filter(|_| name == "nfs") {
            out.push(Finding::new(
                Severity::Warn,
                CHECK,
                format!(
                    "{shown}: shared ({name}), but {} is mounted with {option}: fcntl locks stay on this host, so \
                     other hosts do not see them; remount without nolock/local_lock",
                    point.display()
                ),
            ));
            return;
        }
    }
    let caveat = if name.starts_with("fuse") {
        " (if this FUSE filesystem passes locks between hosts, as glusterfs does)"
    } else {
        ""
    };
    out.push(Finding::new(
        Severity::Info,
        CHECK,
        format!("{shown}: shared ({name}): cross-host refusals work{caveat}"),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_names() {
        assert_eq!(fs_kind(0x6969), ("nfs".to_owned(), true));
        assert_eq!(fs_kind(0xff53_4d42), ("cifs".to_owned(), true));
        assert_eq!(fs_kind(0x6573_5546), ("fuse".to_owned(), true));
        assert_eq!(fs_kind(0x00c3_6400), ("cephfs".to_owned(), true));
        assert_eq!(fs_kind(0xef53), ("ext4".to_owned(), false));
        assert_eq!(fs_kind(0x0102_1994), ("tmpfs".to_owned(), false));
        assert_eq!(fs_kind(0x1234), ("type 0x1234".to_owned(), false));
        // The root filesystem has some type, and it fits 32 bits.
        assert!(fs_magic(Path::new("/")).expect("statfs /") <= u64::from(u32::MAX));
    }

    #[test]
    fn mountinfo_parsing() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:40 / /var/lib/lock\\040space rw shared:2 - nfs4 srv:/ls rw,vers=4.2,local_lock=none\n\
                    41 22 0:41 / /var/lib/lockhook rw - nfs srv:/lh rw,vers=3,nolock,local_lock=all\n";
        let (point, fstype, opts) = mount_of(info, Path::new("/var/lib/lockhook/leases")).expect("found");
        assert_eq!(point, PathBuf::from("/var/lib/lockhook"));
        assert_eq!(fstype, "nfs");
        assert!(opts.split(',').any(|o| o == "local_lock=all"), "{opts}");
        let (point, fstype, _) = mount_of(info, Path::new("/var/lib/lock space/x")).expect("found");
        assert_eq!((point, fstype.as_str()), (PathBuf::from("/var/lib/lock space"), "nfs4"));
        let (point, _, _) = mount_of(info, Path::new("/var/lib/lockhookx")).expect("found");
        assert_eq!(point, PathBuf::from("/"));
    }
}
