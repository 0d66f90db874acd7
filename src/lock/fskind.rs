//! What filesystem a file is on, by `statfs` magic, and what that means for its locks: whether
//! they reach other hosts (the lockspace's question, see `doctor`) and whether this host's
//! kernel grants them itself, so that its lock lists are the whole truth (see `shares`).

use std::os::fd::BorrowedFd;
use std::path::Path;

/// A filesystem's magic (`statfs.f_type`), name, whether its locks can reach other hosts, and
/// whether the local kernel grants them (no server or cluster in between).
const FILESYSTEMS: &[(u64, &str, bool, bool)] = &[
    (0x6969, "nfs", true, false),
    (0x0116_1970, "gfs2", true, false),
    (0x7461_636f, "ocfs2", true, false),
    (0x00c3_6400, "cephfs", true, false),
    (0x6573_5546, "fuse", true, false),
    (0xfe53_4d42, "smb2", true, false),
    (0xff53_4d42, "cifs", true, false),
    (0xef53, "ext4", false, true),
    (0x5846_5342, "xfs", false, true),
    (0x9123_683e, "btrfs", false, true),
    (0x2fc1_2fc1, "zfs", false, true),
    (0xf2f5_2010, "f2fs", false, true),
    (0xca45_1a4e, "bcachefs", false, false),
    (0x0102_1994, "tmpfs", false, true),
    (0x8584_58f6, "ramfs", false, false),
    (0x794c_7630, "overlayfs", false, false),
    (0x0102_1997, "9p", false, false),
    (0x6a65_6a63, "virtiofs", false, false),
    (0x4d44, "vfat", false, false),
    (0x2011_bab0, "exfat", false, false),
    (0x5346_544e, "ntfs", false, false),
    (0x7366_746e, "ntfs3", false, false),
];

/// The name of a filesystem type and whether it is shared between hosts (unknown types are
/// named by number and counted as local).
pub fn kind(magic: u64) -> (String, bool) {
    FILESYSTEMS
        .iter()
        .find(|(m, ..)| *m == magic)
        .map_or_else(|| (format!("type 0x{magic:x}"), false), |(_, name, shared, _)| ((*name).to_owned(), *shared))
}

/// Whether this host's kernel grants the locks on this filesystem itself (ext2/3/4, xfs, btrfs,
/// zfs, f2fs, tmpfs and devtmpfs; unknown types: no).
pub fn grants_locks_here(magic: u64) -> bool {
    FILESYSTEMS.iter().any(|(m, _, _, here)| *m == magic && *here)
}

/// The low 32 bits of `f_type`, as the kernel headers spell the magic (it is a signed long on
/// 64-bit glibc).
fn low_bits(raw: libc::__fsword_t) -> u64 {
    (raw as u64) & 0xffff_ffff
}

/// `statfs(path)`'s magic.
pub fn magic(path: &Path) -> nix::Result<u64> {
    Ok(low_bits(nix::sys::statfs::statfs(path)?.filesystem_type().0))
}

/// `fstatfs(fd)`'s magic.
pub fn magic_of_fd(fd: BorrowedFd<'_>) -> nix::Result<u64> {
    Ok(low_bits(nix::sys::statfs::fstatfs(fd)?.filesystem_type().0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_granted_here_only_on_local_filesystems() {
        assert!(grants_locks_here(0xef53) && grants_locks_here(0x0102_1994));
        assert!(!grants_locks_here(0x6969) && !grants_locks_here(0x6573_5546) && !grants_locks_here(0x1234));
        assert_eq!(kind(0x6969), ("nfs".to_owned(), true));
        assert_eq!(kind(0x1234), ("type 0x1234".to_owned(), false));
        let tmp = std::fs::File::open("/dev/shm").expect("tmpfs");
        assert_eq!(magic_of_fd(std::os::fd::AsFd::as_fd(&tmp)).expect("fstatfs"), 0x0102_1994);
        assert_eq!(magic(Path::new("/dev/shm")).expect("statfs"), 0x0102_1994);
    }
}
