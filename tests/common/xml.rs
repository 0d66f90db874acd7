//! Domain XML pieces the end-to-end tests define guests with.

use std::path::Path;

/// A guest `name` (`uuid`) with `devices`, as the hook reads it.
pub fn domain(name: &str, uuid: &str, devices: &str) -> String {
    format!("<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>{devices}</devices></domain>")
}

/// A file disk of `format` on target `dev`, with `extra` elements (`<readonly/>`, ...).
pub fn file_disk(path: &Path, format: &str, dev: &str, extra: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{}'/>\
         <target dev='{dev}' bus='virtio'/>{extra}</disk>",
        path.display()
    )
}

/// A raw file disk on target `dev`.
pub fn raw(path: &Path, dev: &str) -> String {
    file_disk(path, "raw", dev, "")
}

/// A raw block disk on `vda`.
pub fn block_disk(dev: &str) -> String {
    format!(
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{dev}'/>\
         <target dev='vda' bus='virtio'/></disk>"
    )
}
