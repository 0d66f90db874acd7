//! End to end: a real libvirtd and QEMU, started by these tests in private namespaces, with
//! lockhook installed as their `qemu` hook, driven with `virsh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lockhook::lock::LockMode;

use crate::common::host::Host;
use crate::common::xml::{file_disk, raw};
use crate::common::{lock_state, wait_until};

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().expect("run qemu-img (qemu-utils)");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn refusal_line(path: &Path, mode: LockMode, holder: &str, uuid: &str) -> String {
    format!("lockhook: {} is locked {} by guest {holder} ({uuid}) on this host since ", path.display(), mode.adverb())
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn exclusive_refusal_names_the_holder_and_destroy_frees() {
    let host = Host::new();
    let img = host.setup.image("images/a.raw");
    let uuid1 = host.define("vm1", &raw(&img, "vda"));
    host.define("vm2", &raw(&img, "vda"));
    host.start("vm1");
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));

    let err = host.refused("vm2");
    let line = refusal_line(&img, LockMode::Exclusive, "vm1", &uuid1);
    assert!(err.contains(&line), "expected {line:?} in: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    // The release libvirt sends after the refusal leaves vm1's locks alone.
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));

    let status = host.status();
    let vm1 = &status["guests"][0];
    assert_eq!(vm1["name"], "vm1");
    assert_eq!(vm1["uuid"], uuid1.as_str());
    assert_eq!(vm1["qemu_pid"].as_u64().and_then(|p| u32::try_from(p).ok()), host.lv.qemu_pid("vm1"));
    assert_eq!(vm1["resources"][0]["mode"], "exclusive");
    let text = host.setup.cli(&["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("exclusive {}", img.display())));

    // Destroy frees the image by the time virsh returns.
    host.destroy("vm1");
    assert_eq!(lock_state(&img, 0), None);
    assert!(host.guest_names().is_empty());
    host.start("vm2");

    // A crash (QEMU killed under a running libvirtd) frees the image too.
    let qemu = host.lv.qemu_pid("vm2").expect("vm2 qemu");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(qemu).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    assert!(wait_until(Duration::from_secs(10), || host.lv.virsh_ok(&["domstate", "vm2"]).trim() == "shut off"));
    assert_eq!(lock_state(&img, 0), None);
    assert!(host.guest_names().is_empty());
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn readonly_and_shareable_disks_share_but_exclude_writers() {
    let host = Host::new();
    let img = host.setup.image("images/shared.raw");
    // (QEMU itself refuses to mix a read-only user and a share-rw writer of one image, so the
    // two flags are tested on two images.)
    let shared = host.setup.image("images/cluster.raw");
    let uuid_ro1 = host.define("ro1", &file_disk(&img, "raw", "vda", "<readonly/>"));
    host.define("ro2", &file_disk(&img, "raw", "vda", "<readonly/>"));
    host.define("writer", &raw(&img, "vda"));
    host.define("sh1", &file_disk(&shared, "raw", "vda", "<shareable/>"));
    host.define("sh2", &file_disk(&shared, "raw", "vda", "<shareable/>"));
    host.define("writer2", &raw(&shared, "vda"));
    for name in ["ro1", "ro2", "sh1", "sh2"] {
        host.start(name);
    }
    assert_eq!(lock_state(&img, 0), Some(LockMode::Shared));
    assert_eq!(lock_state(&shared, 0), Some(LockMode::Shared));
    let err = host.refused("writer");
    assert!(err.contains(&format!("lockhook: {} is locked shared by guest ro", img.display())), "{err}");
    let err = host.refused("writer2");
    assert!(err.contains(&format!("lockhook: {} is locked shared by guest sh", shared.display())), "{err}");
    host.destroy("ro2");
    let err = host.refused("writer");
    assert!(err.contains(&refusal_line(&img, LockMode::Shared, "ro1", &uuid_ro1)), "{err}");
    host.destroy("ro1");
    host.destroy("sh1");
    host.destroy("sh2");
    host.start("writer");
    host.start("writer2");
    host.destroy("writer");
    host.destroy("writer2");
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn leases_and_path_aliases_collide() {
    let host = Host::new();
    let a = host.setup.image("images/a.raw");
    let b = host.setup.image("images/b.raw");
    let lease = host.setup.path("leases/vm.lease");
    std::fs::create_dir_all(lease.parent().expect("parent")).expect("mkdir");
    let lease_xml = format!(
        "<lease><lockspace>fleet</lockspace><key>vm-key</key><target path='{}' offset='1024'/></lease>",
        lease.display()
    );
    let link = host.setup.path("images/alias-to-a.raw");
    std::os::unix::fs::symlink(&a, &link).expect("symlink");
    let uuid1 = host.define("vm1", &format!("{}{lease_xml}", raw(&a, "vda")));
    host.define("vm2", &format!("{}{lease_xml}", raw(&b, "vda")));
    host.define("vm3", &raw(&link, "vda"));
    host.start("vm1");
    assert!(lease.exists(), "a missing lease file is created");
    assert_eq!(lock_state(&lease, 1024), Some(LockMode::Exclusive));
    let err = host.refused("vm2");
    let lease_line = format!(
        "lockhook: {} (lease fleet/vm-key) is locked exclusively by guest vm1 ({uuid1}) on this host",
        lease.display()
    );
    assert!(err.contains(&lease_line), "{err}");
    let err = host.refused("vm3");
    assert!(err.contains(&refusal_line(&link, LockMode::Exclusive, "vm1", &uuid1)), "{err}");
    host.destroy("vm1");
    assert_eq!(lock_state(&lease, 1024), None);
    host.start("vm2");
    host.start("vm3");
    host.destroy("vm2");
    host.destroy("vm3");
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn backing_chain_is_locked_shared() {
    let host = Host::new();
    let dir = host.setup.path("chain");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let base = dir.join("base.qcow2");
    let (top1, top2) = (dir.join("top1.qcow2"), dir.join("top2.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().expect("utf8"), "16M"]);
    for top in [&top1, &top2] {
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", top.to_str().expect("utf8")]);
    }
    let uuid1 = host.define("vm1", &file_disk(&top1, "qcow2", "vda", ""));
    host.define("vm2", &file_disk(&top2, "qcow2", "vda", ""));
    host.define("writer", &file_disk(&base, "qcow2", "vda", ""));
    host.start("vm1");
    assert_eq!(lock_state(&top1, 0), Some(LockMode::Exclusive));
    assert_eq!(lock_state(&base, 0), Some(LockMode::Shared));
    host.start("vm2");
    let err = host.refused("writer");
    assert!(
        err.contains(&format!("lockhook: {} is locked shared (backing image of vda) by guest vm", base.display())),
        "{err}"
    );
    let status = host.status();
    let vm1 = status["guests"].as_array().expect("guests").iter().find(|g| g["uuid"] == uuid1.as_str()).expect("vm1");
    let roles: Vec<String> =
        vm1["resources"].as_array().expect("resources").iter().map(|r| r["roles"][0]["kind"].to_string()).collect();
    assert!(roles.iter().any(|r| r.contains("backing")), "{roles:?}");
    host.destroy("vm1");
    host.destroy("vm2");
    assert_eq!(lock_state(&base, 0), None);
    host.start("writer");
    host.destroy("writer");
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn block_devices_and_pool_volumes_are_locked_by_identity() {
    let host = Host::new();
    let backing = host.setup.image("loop-backing.raw");
    let dev = crate::common::Loop::attach(&backing);
    let dev_path = PathBuf::from(&dev.dev);
    let link = host.setup.path("disk-by-alias");
    std::os::unix::fs::symlink(&dev_path, &link).expect("symlink");
    let block = |p: &Path| {
        format!("<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{}'/><target dev='vda' bus='virtio'/></disk>", p.display())
    };
    let uuid1 = host.define("blk1", &block(&dev_path));
    host.define("blk2", &block(&link));
    host.start("blk1");
    let err = host.refused("blk2");
    assert!(err.contains(&refusal_line(&link, LockMode::Exclusive, "blk1", &uuid1)), "{err}");
    host.destroy("blk1");
    host.start("blk2");
    host.destroy("blk2");

    // A dir pool: the volume disk and a file disk on the same image collide.
    let pool_dir = host.setup.path("pool");
    std::fs::create_dir_all(&pool_dir).expect("mkdir pool");
    let vol = host.setup.image("pool/vol1.raw");
    host.lv.virsh_ok(&["pool-define-as", "testpool", "dir", "--target", pool_dir.to_str().expect("utf8")]);
    host.lv.virsh_ok(&["pool-start", "testpool"]);
    let uuid_vol = host.define(
        "volguest",
        "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='testpool' volume='vol1.raw'/><target dev='vda' bus='virtio'/></disk>",
    );
    host.define("fileguest", &raw(&vol, "vda"));
    host.start("volguest");
    assert_eq!(lock_state(&vol, 0), Some(LockMode::Exclusive));
    let err = host.refused("fileguest");
    assert!(err.contains(&refusal_line(&vol, LockMode::Exclusive, "volguest", &uuid_vol)), "{err}");
    host.destroy("volguest");
    host.start("fileguest");
    host.destroy("fileguest");
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn pause_keeps_locks_and_save_restore_moves_them() {
    let host = Host::new();
    let img = host.setup.image("images/p.raw");
    let uuid1 = host.define("vm1", &raw(&img, "vda"));
    host.define("vm2", &raw(&img, "vda"));
    host.start("vm1");
    host.lv.virsh_ok(&["suspend", "vm1"]);
    let err = host.refused("vm2");
    assert!(
        err.contains(&refusal_line(&img, LockMode::Exclusive, "vm1", &uuid1)),
        "paused guests keep their locks: {err}"
    );
    host.lv.virsh_ok(&["resume", "vm1"]);

    let saved = host.setup.path("vm1.save");
    host.lv.virsh_ok(&["save", "vm1", saved.to_str().expect("utf8")]);
    assert_eq!(lock_state(&img, 0), None, "a saved guest holds nothing");
    host.lv.virsh_ok(&["restore", saved.to_str().expect("utf8")]);
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    let status = host.status();
    assert_eq!(status["guests"][0]["qemu_pid"].as_u64().and_then(|p| u32::try_from(p).ok()), host.lv.qemu_pid("vm1"));
    host.refused("vm2");
    host.destroy("vm1");
    assert_eq!(lock_state(&img, 0), None);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn libvirtd_restart_keeps_locks_and_dead_qemu_frees_them() {
    let host = Host::new();
    let img = host.setup.image("images/r.raw");
    let uuid1 = host.define("vm1", &raw(&img, "vda"));
    host.define("vm2", &raw(&img, "vda"));
    host.start("vm1");
    let holder =
        host.status()["guests"][0]["holder_pid"].as_u64().and_then(|p| i32::try_from(p).ok()).expect("holder pid");

    // A daemon crash and restart: the same holder keeps the locks.
    host.lv.kill_daemon();
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    host.lv.restart_daemon();
    assert_eq!(host.lv.virsh_ok(&["domstate", "vm1"]).trim(), "running");
    assert_eq!(host.status()["guests"][0]["holder_pid"].as_i64(), Some(i64::from(holder)));
    let err = host.refused("vm2");
    assert!(err.contains(&refusal_line(&img, LockMode::Exclusive, "vm1", &uuid1)), "{err}");

    // The holder is killed, then libvirtd restarts: `reconnect` re-takes the locks.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holder), nix::sys::signal::Signal::SIGKILL).expect("kill holder");
    assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0).is_none()));
    host.lv.kill_daemon();
    host.lv.restart_daemon();
    // `reconnect` runs in libvirtd's reconnect threads, possibly after virsh answers: poll.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let guest = &host.status()["guests"][0];
            guest["holder_alive"] == true && guest["holder_pid"].as_i64() != Some(i64::from(holder))
        }),
        "reconnect re-adopted vm1: {}",
        host.status()
    );
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    // The QEMU pid follows the hand-over in a second request: poll for it too.
    assert!(
        wait_until(Duration::from_secs(5), || {
            host.status()["guests"][0]["qemu_pid"].as_u64().and_then(|p| u32::try_from(p).ok())
                == host.lv.qemu_pid("vm1")
        }),
        "the new holder watches QEMU: {}",
        host.status()
    );

    // QEMU dies while libvirtd is down: the holder lets go by itself within seconds.
    let qemu = host.lv.qemu_pid("vm1").expect("qemu pid");
    host.lv.kill_daemon();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(qemu).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0).is_none()), "lock freed after QEMU died");
    host.lv.restart_daemon();
    assert!(wait_until(Duration::from_secs(10), || host.lv.virsh_ok(&["domstate", "vm1"]).trim() == "shut off"));
    host.start("vm2");
    host.destroy("vm2");
}
