//! The lease area: one block device or file on shared storage that every host of the fleet
//! reaches under the same path, formatted once (`lockhook sanlock init`).
//!
//! Layout, in units of the area's align size (1 MiB for 512-byte sectors, 8 MiB for 4K ones):
//!
//! | offset | what |
//! |---|---|
//! | 0 | lockspace `lockhook`: one delta lease per host id (sanlock's) |
//! | 1 | host table: one sector per host id, the host's name (lockhook's, see `hosts`) |
//! | 2, 3 | resource index and its internal lease (sanlock's) |
//! | 4 + i | lease of index entry i (sanlock's, allocated by name) |
//!
//! The geometry is read back from the lockspace record, so hosts never disagree about it.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::sanlock::{Disk, Geometry, Lockspace, Name, Rindex, Sanlock, SanlockError};

/// A lease area and the geometry written in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Area {
    pub path: PathBuf,
    pub geometry: Geometry,
    /// Bytes per align unit.
    pub align: u64,
    /// Bytes per sector (512 or 4096).
    pub sector: u64,
}

/// Leases of entries past this many are not created: the area ends (see `init`).
pub const FIRST_LEASE_UNIT: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum AreaError {
    #[error("lease area {path}: no lockhook lockspace there (run `lockhook sanlock init` once per fleet)")]
    NotFormatted {
        path: PathBuf,
        #[source]
        source: SanlockError,
    },
    #[error("lease area {path} holds lockspace {found}, not lockhook's")]
    Foreign { path: PathBuf, found: String },
    #[error("lease area {path}: sanlock reports no geometry")]
    NoGeometry { path: PathBuf },
}

impl Area {
    /// The geometry for a new area at `path`: 4K sectors (8 MiB align) on a block device whose
    /// logical sectors are 4K, 512-byte sectors with 1 MiB align otherwise (files too).
    pub fn new_geometry(path: &Path) -> Geometry {
        if logical_sector(path) == Some(4096) {
            Geometry::Sector4kAlign8M
        } else {
            Geometry::Sector512Align1M
        }
    }

    /// The area at `path` as described by the geometry `geometry`.
    pub fn with_geometry(path: &Path, geometry: Geometry) -> Option<Area> {
        let align = geometry.align_size()?;
        let sector = if matches!(geometry, Geometry::Sector512Align1M) { 512 } else { 4096 };
        Some(Area { path: path.to_owned(), geometry, align, sector })
    }

    /// Reads the area's lockspace record: its geometry, and that it is lockhook's.
    pub fn open(sanlock: &Sanlock, path: &Path) -> Result<Area, AreaError> {
        let info = sanlock
            .read_lockspace(&Disk::new(path, 0))
            .map_err(|source| AreaError::NotFormatted { path: path.to_owned(), source })?;
        if info.name != Name::fit(super::LOCKSPACE) {
            return Err(AreaError::Foreign { path: path.to_owned(), found: info.name.to_string() });
        }
        Area::with_geometry(path, info.geometry).ok_or_else(|| AreaError::NoGeometry { path: path.to_owned() })
    }

    /// The lockspace as host `host_id` joins it.
    pub fn lockspace(&self, host_id: u64) -> Lockspace {
        lockspace_at(&self.path, host_id)
    }

    pub fn hosts_offset(&self) -> u64 {
        self.align
    }

    pub fn rindex(&self) -> Rindex {
        Rindex { lockspace: Name::fit(super::LOCKSPACE), disk: Disk::new(&self.path, 2 * self.align) }
    }

    /// How many leases an area of `size` bytes holds (at most 16000, the index's limit).
    pub fn capacity(&self, size: u64) -> u64 {
        (size / self.align).saturating_sub(FIRST_LEASE_UNIT).min(16000)
    }
}

/// lockhook's lockspace at `path` (offset 0) for `host_id`.
pub fn lockspace_at(path: &Path, host_id: u64) -> Lockspace {
    Lockspace { name: Name::fit(super::LOCKSPACE), host_id, disk: Disk::new(path, 0) }
}

/// libvirt's `__LIBVIRT__DISKS__` lockspace in `dir`, for `host_id`.
pub fn libvirt_lockspace(dir: &Path, host_id: u64) -> Lockspace {
    Lockspace {
        name: Name::fit(super::LIBVIRT_LOCKSPACE),
        host_id,
        disk: Disk::new(dir.join(super::LIBVIRT_LOCKSPACE), 0),
    }
}

/// The size of the area: a block device's, or a file's length.
pub fn size(path: &Path) -> std::io::Result<u64> {
    let meta = fs::metadata(path)?;
    if meta.file_type().is_block_device() {
        let file = fs::File::open(path)?;
        use std::io::Seek;
        let mut file = file;
        return file.seek(std::io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// A block device's logical sector size, from sysfs.
fn logical_sector(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let (major, minor) = (nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev()));
    let dev = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    // A partition's queue is its disk's.
    let queue = [dev.join("queue"), dev.parent()?.join("queue")].into_iter().find(|q| q.is_dir())?;
    fs::read_to_string(queue.join("logical_block_size")).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_geometry() {
        let a = Area::with_geometry(Path::new("/x"), Geometry::Sector512Align1M).expect("known");
        assert_eq!((a.align, a.sector, a.hosts_offset(), a.rindex().disk.offset), (1 << 20, 512, 1 << 20, 2 << 20));
        assert_eq!(a.capacity(64 << 20), 60);
        assert_eq!(a.capacity(1 << 20), 0);
        let b = Area::with_geometry(Path::new("/x"), Geometry::Sector4kAlign8M).expect("known");
        assert_eq!((b.align, b.sector, b.rindex().disk.offset), (8 << 20, 4096, 16 << 20));
        assert!(Area::with_geometry(Path::new("/x"), Geometry::Auto).is_none());
    }
}
