//! Where a lockspace, lease or resource index lives on shared storage, and its geometry.

use std::ffi::c_char;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::abi;
use super::error::SanlockError;

/// A place on shared storage: a block device or file, and a byte offset in it (a multiple of
/// the area's align size). sanlock opens the path itself (with `O_DIRECT`), in the daemon, as
/// the daemon's user: the path must mean the same file to the daemon as to us.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Disk {
    pub path: PathBuf,
    pub offset: u64,
}

impl Disk {
    pub fn new(path: impl Into<PathBuf>, offset: u64) -> Disk {
        Disk { path: path.into(), offset }
    }

    /// The C struct: the raw path (sanlock's `\:` escapes belong to its string forms only),
    /// NUL-terminated in 1024 bytes.
    pub(crate) fn to_c(&self) -> Result<abi::Disk, SanlockError> {
        let bytes = self.path.as_os_str().as_bytes();
        let invalid = |reason| SanlockError::InvalidPath { path: self.path.clone(), reason };
        if bytes.is_empty() {
            return Err(invalid("empty"));
        }
        if bytes.len() >= abi::PATH_LEN {
            return Err(invalid("longer than 1023 bytes"));
        }
        if bytes.contains(&0) {
            return Err(invalid("contains a NUL byte"));
        }
        let mut disk = <abi::Disk as abi::Zeroed>::zeroed();
        for (dst, src) in disk.path.iter_mut().zip(bytes) {
            *dst = c_char::from_ne_bytes([*src]);
        }
        disk.offset = self.offset;
        Ok(disk)
    }

    /// The disk the daemon described (up to the first NUL of the path).
    pub(crate) fn from_c(disk: &abi::Disk) -> Disk {
        let bytes: Vec<u8> = disk.path.iter().map(|c| c.to_ne_bytes()[0]).take_while(|b| *b != 0).collect();
        Disk { path: PathBuf::from(std::ffi::OsString::from_vec(bytes)), offset: disk.offset }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Sector size and alignment of a lockspace, resource or resource index, which fix how many
/// hosts it serves. A lockspace and the leases of it should share one geometry.
///
/// `Auto` lets the daemon choose: the device's sector size with 1 MiB alignment for 512-byte
/// sectors and 8 MiB for 4K ones; for a *file*, 512-byte sectors with 8 MiB alignment. Set it
/// explicitly for files (`Sector512Align1M` is what lockhook's tests and libvirt's lease files
/// want) and read it back from the lockspace to use the same for its leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Geometry {
    #[default]
    Auto,
    /// 2000 hosts.
    Sector512Align1M,
    /// 250 hosts.
    Sector4kAlign1M,
    /// 500 hosts.
    Sector4kAlign2M,
    /// 1000 hosts.
    Sector4kAlign4M,
    /// 2000 hosts.
    Sector4kAlign8M,
}

impl Geometry {
    /// The `ALIGN* | SECTOR*` flags (the same bits in `SANLK_RES_*`, `SANLK_LSF_*` and
    /// `SANLK_RIF_*`); both or neither must be set.
    pub(crate) fn flags(self) -> u32 {
        match self {
            Geometry::Auto => 0,
            Geometry::Sector512Align1M => abi::SECTOR512 | abi::ALIGN1M,
            Geometry::Sector4kAlign1M => abi::SECTOR4K | abi::ALIGN1M,
            Geometry::Sector4kAlign2M => abi::SECTOR4K | abi::ALIGN2M,
            Geometry::Sector4kAlign4M => abi::SECTOR4K | abi::ALIGN4M,
            Geometry::Sector4kAlign8M => abi::SECTOR4K | abi::ALIGN8M,
        }
    }

    /// The geometry the daemon reported in a struct's flags (`Auto` when it set none).
    pub(crate) fn from_flags(flags: u32) -> Geometry {
        let sector = flags & (abi::SECTOR512 | abi::SECTOR4K);
        let align = flags & (abi::ALIGN1M | abi::ALIGN2M | abi::ALIGN4M | abi::ALIGN8M);
        match (sector, align) {
            (abi::SECTOR512, abi::ALIGN1M) => Geometry::Sector512Align1M,
            (abi::SECTOR4K, abi::ALIGN1M) => Geometry::Sector4kAlign1M,
            (abi::SECTOR4K, abi::ALIGN2M) => Geometry::Sector4kAlign2M,
            (abi::SECTOR4K, abi::ALIGN4M) => Geometry::Sector4kAlign4M,
            (abi::SECTOR4K, abi::ALIGN8M) => Geometry::Sector4kAlign8M,
            _ => Geometry::Auto,
        }
    }

    /// The alignment in bytes, when known: where the next area may start.
    pub fn align_size(self) -> Option<u64> {
        const MIB: u64 = 1 << 20;
        match self {
            Geometry::Auto => None,
            Geometry::Sector512Align1M | Geometry::Sector4kAlign1M => Some(MIB),
            Geometry::Sector4kAlign2M => Some(2 * MIB),
            Geometry::Sector4kAlign4M => Some(4 * MIB),
            Geometry::Sector4kAlign8M => Some(8 * MIB),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_and_copied_raw() {
        let disk = Disk::new("/var/lib/lockhook/a:b c", 1 << 20).to_c().expect("ok");
        assert_eq!(disk.offset, 1 << 20);
        assert_eq!(Disk::from_c(&disk), Disk::new("/var/lib/lockhook/a:b c", 1 << 20));
        let longest = format!("/{}", "p".repeat(1022));
        assert!(Disk::new(&longest, 0).to_c().is_ok());
        let too_long = format!("/{}", "p".repeat(1023));
        assert!(matches!(Disk::new(&too_long, 0).to_c(), Err(SanlockError::InvalidPath { .. })));
        assert!(matches!(Disk::new("", 0).to_c(), Err(SanlockError::InvalidPath { .. })));
        let nul = PathBuf::from(std::ffi::OsString::from_vec(b"/a\0b".to_vec()));
        assert!(matches!(Disk::new(nul, 0).to_c(), Err(SanlockError::InvalidPath { .. })));
    }

    #[test]
    fn geometry_round_trips_through_flags() {
        for g in [
            Geometry::Auto,
            Geometry::Sector512Align1M,
            Geometry::Sector4kAlign1M,
            Geometry::Sector4kAlign2M,
            Geometry::Sector4kAlign4M,
            Geometry::Sector4kAlign8M,
        ] {
            assert_eq!(Geometry::from_flags(g.flags() | abi::RES_SHARED), g);
        }
        assert_eq!(Geometry::Sector512Align1M.flags(), 0x110);
        assert_eq!(Geometry::Sector4kAlign8M.align_size(), Some(8 << 20));
    }
}
