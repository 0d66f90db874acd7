//! End to end: `<lease>` targets are created safely (issue 9 point 4). A missing target is never
//! created through a symlink, a target that is a device is refused without being opened, and a
//! target created for a start that is then refused is removed again.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use lockhook::lock::LockMode;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::common::host::Host;
use crate::common::lock_state;
use crate::common::xml::raw;

fn lease(target: &Path) -> String {
    format!(
        "<lease><lockspace>fleet</lockspace><key>vm-key</key><target path='{}' offset='1024'/></lease>",
        target.display()
    )
}

/// The lines lockhook printed in a refusal (virsh shows the hook's stderr).
fn lockhook_lines(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.contains("lockhook:")).collect()
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn dangling_symlink_target_is_refused_and_not_created() {
    let host = Host::new();
    let img = host.setup.image("images/a.raw");
    let pointee = host.setup.path("elsewhere/created-by-root");
    std::fs::create_dir_all(pointee.parent().expect("parent")).expect("mkdir");
    let link = host.setup.path("leases/vm.lease");
    std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
    std::os::unix::fs::symlink(&pointee, &link).expect("symlink");
    host.define("vm1", &format!("{}{}", raw(&img, "vda"), lease(&link)));
    let err = host.refused("vm1");
    let lines = lockhook_lines(&err);
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains(&format!("{}: is a symbolic link to a missing file", link.display())), "{err}");
    assert!(!pointee.exists(), "the symlink's target was created");
    assert_eq!(lock_state(&img, 0), None, "the refused start left a lock behind");
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn character_device_target_is_refused() {
    let host = Host::new();
    let img = host.setup.image("images/a.raw");
    // A stand-in for /dev/watchdog: a node of our own with /dev/null's numbers (1:3), so even a
    // wrong open would arm nothing.
    let dev = host.setup.path("leases/watchdog");
    std::fs::create_dir_all(dev.parent().expect("parent")).expect("mkdir");
    nix::sys::stat::mknod(
        &dev,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod (needs root)");
    // Any open for I/O of the node shows as an inotify event; lockhook's O_PATH look does not.
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify");
    watch.add_watch(&dev, AddWatchFlags::IN_OPEN | AddWatchFlags::IN_CLOSE).expect("watch");
    host.define("vm1", &format!("{}{}", raw(&img, "vda"), lease(&dev)));
    let err = host.refused("vm1");
    let events = watch.read_events().unwrap_or_default();
    assert!(events.is_empty(), "the device was opened: {events:?}");
    let lines = lockhook_lines(&err);
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains(&format!("{}: is a character device", dev.display())), "{err}");
    assert!(std::fs::symlink_metadata(&dev).expect("still there").file_type().is_char_device());
    assert_eq!(lock_state(&img, 0), None, "the refused start left a lock behind");
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn lease_target_created_for_a_refused_start_is_removed() {
    let host = Host::new();
    let img = host.setup.image("images/a.raw");
    let other = host.setup.image("images/b.raw");
    let target = host.setup.path("leases/vm2.lease");
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    host.define("vm1", &raw(&img, "vda"));
    host.define("vm2", &format!("{}{}{}", raw(&other, "vda"), raw(&img, "vdb"), lease(&target)));
    host.start("vm1");
    let err = host.refused("vm2");
    assert!(err.contains(&format!("{} is locked exclusively by guest vm1", img.display())), "{err}");
    assert!(!target.exists(), "the lease file created for the refused start stayed behind");
    assert_eq!(lock_state(&other, 0), None, "the refused start left a lock behind");
    // Once vm1 is gone, vm2 starts and its lease file is created and held.
    host.destroy("vm1");
    host.start("vm2");
    assert!(target.exists());
    assert_eq!(lock_state(&target, 1024), Some(LockMode::Exclusive));
    host.destroy("vm2");
    // A lease file that existed before a refused start stays.
    host.start("vm1");
    host.refused("vm2");
    assert!(target.exists(), "a lease file the start did not create was removed");
    host.destroy("vm1");
}
