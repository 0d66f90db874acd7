//! libvirt's own files that lockhook reads, in one place: where they are and the one check a
//! name passes before it becomes part of a path there.
//!
//! ```text
//! <libvirt_run_dir>/qemu/<guest>.xml       a running guest's status XML (replaced atomically)
//! <libvirt_run_dir>/qemu/<guest>.pid       its QEMU's pid file (written right after the fork)
//! <libvirt_run_dir>/storage/<pool>.xml     a running pool (`<poolstate>` around the `<pool>`)
//! <libvirt_config_dir>/storage/<pool>.xml  a persistent pool's definition
//! ```
//! Guest and pool names come from domain XML and hook arguments: anything that is not a plain
//! file name (empty, `.`, `..`, a `/` or a NUL) names no file here (libvirt refuses such names
//! itself, so no real guest or pool is lost).

use std::path::{Path, PathBuf};

/// Whether `name` is one path component (see the module doc).
pub fn is_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// The directory of running guests' status XML and pid files.
pub fn guests_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("qemu")
}

/// Guest `name`'s status XML while it runs.
pub fn status_xml(run_dir: &Path, name: &str) -> Option<PathBuf> {
    is_file_name(name).then(|| guests_dir(run_dir).join(format!("{name}.xml")))
}

/// Guest `name`'s QEMU pid file.
pub fn pid_file(run_dir: &Path, name: &str) -> Option<PathBuf> {
    is_file_name(name).then(|| guests_dir(run_dir).join(format!("{name}.pid")))
}

/// Where pool `pool` is described: the running pool's state first, then its definition.
pub fn pool_files(run_dir: &Path, config_dir: &Path, pool: &str) -> Option<[PathBuf; 2]> {
    let file = format!("{pool}.xml");
    is_file_name(pool).then(|| [run_dir.join("storage").join(&file), pool_definitions(config_dir).join(file)])
}

/// The directory of persistent pool definitions.
pub fn pool_definitions(config_dir: &Path) -> PathBuf {
    config_dir.join("storage")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_file_names_name_no_file() {
        let run = Path::new("/run/libvirt");
        assert_eq!(status_xml(run, "vm 1"), Some(PathBuf::from("/run/libvirt/qemu/vm 1.xml")));
        assert_eq!(pid_file(run, "vm"), Some(PathBuf::from("/run/libvirt/qemu/vm.pid")));
        for bad in ["", ".", "..", "../x", "a/b", "nul\0"] {
            assert_eq!(status_xml(run, bad), None, "{bad:?}");
            assert_eq!(pid_file(run, bad), None, "{bad:?}");
            assert_eq!(pool_files(run, Path::new("/etc/libvirt"), bad), None, "{bad:?}");
        }
        assert_eq!(
            pool_files(run, Path::new("/etc/libvirt"), "images"),
            Some([PathBuf::from("/run/libvirt/storage/images.xml"), PathBuf::from("/etc/libvirt/storage/images.xml")])
        );
    }
}
