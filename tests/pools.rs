//! Issue 10 point 3, through the hook as libvirt calls it: a pool volume and the equivalent
//! direct disk are one lock, and a volume lockhook cannot identify follows `on_unidentified`.
//! The pool definitions are written where libvirt keeps them (`libvirt_config_dir/storage`,
//! `libvirt_run_dir/storage`); no libvirtd runs.

use std::path::Path;
use std::process::Command;

use lockhook::lock::LockMode;

use crate::common::xml::domain as xml;
use crate::common::{lock_state, stderr, Setup};

const UUID1: &str = "5b0c8a8e-2f4e-4d1b-9c3a-7e6f5d4c3b2a";
const UUID2: &str = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a";

/// A setup whose libvirt directories hold `pools` (name, XML): the first as a running pool's
/// state, the rest as persistent definitions.
fn setup_with_pools(extra_config: &str, pools: &[(&str, &str)]) -> Setup {
    let setup = Setup::new("");
    let etc = setup.path("libvirt-etc");
    let run = setup.path("libvirt-run");
    for dir in [&etc, &run] {
        std::fs::create_dir_all(dir.join("storage")).expect("mkdir storage");
    }
    for (i, (name, xml)) in pools.iter().enumerate() {
        let (dir, text) = if i == 0 {
            (&run, format!("<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n<poolstate version='1'>\n{xml}\n</poolstate>\n"))
        } else {
            (&etc, format!("<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n{xml}\n"))
        };
        std::fs::write(dir.join(format!("storage/{name}.xml")), text).expect("write pool");
    }
    let mut config = std::fs::read_to_string(&setup.config).expect("config");
    config.push_str(&format!("libvirt_config_dir = {etc:?}\nlibvirt_run_dir = {run:?}\n{extra_config}"));
    std::fs::write(&setup.config, config).expect("write config");
    setup
}

fn volume_disk(pool: &str, volume: &str) -> String {
    format!("<disk type='volume' device='disk'><source pool='{pool}' volume='{volume}'/><target dev='vda'/></disk>")
}

fn network_disk(protocol: &str, name: &str, hosts: &str) -> String {
    format!(
        "<disk type='network' device='disk'><source protocol='{protocol}' name='{name}'>{hosts}</source>\
         <target dev='vdb'/></disk>"
    )
}

/// `first` starts, `second` is refused with one line naming `first`'s guest, in both orders.
fn collide(setup: &Setup, first: &str, second: &str) {
    for (a, b) in [(first, second), (second, first)] {
        let vm1 = xml("vm1", UUID1, a);
        let vm2 = xml("vm2", UUID2, b);
        let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
        assert!(out.status.success(), "vm1: {}", stderr(&out));
        let out = setup.hook(&["vm2", "prepare", "begin", "-"], &vm2);
        assert_eq!(out.status.code(), Some(1), "vm2 must be refused");
        let err = stderr(&out);
        assert!(err.starts_with("lockhook: ") && err.contains(&format!("by guest vm1 ({UUID1})")), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        for (name, doc) in [("vm2", &vm2), ("vm1", &vm1)] {
            let out = setup.hook(&[name, "release", "end", "destroyed"], doc);
            assert!(out.status.success(), "{name} release: {}", stderr(&out));
        }
    }
}

#[test]
fn rbd_volume_and_direct_rbd_disk_collide() {
    let rbd =
        "<pool type='rbd'>\n  <name>ceph</name>\n  <source>\n    <host name='mon1.example.com' port='6789'/>\n    \
               <host name='mon2.example.com' port='6789'/>\n    <name>libvirt-pool</name>\n    \
               <auth type='ceph' username='libvirt'>\n      <secret uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/>\n    \
               </auth>\n  </source>\n</pool>";
    let setup = setup_with_pools("", &[("ceph", rbd)]);
    // The direct disk lists another monitor than the pool: still the same image.
    let direct = network_disk("rbd", "libvirt-pool/vm-disk", "<host name='mon3.example.com'/>");
    collide(&setup, &volume_disk("ceph", "vm-disk"), &direct);
    // And without any monitor (ceph.conf's).
    collide(&setup, &volume_disk("ceph", "vm-disk"), &network_disk("rbd", "libvirt-pool/vm-disk", ""));
}

#[test]
fn iscsi_volume_and_direct_iscsi_disk_collide() {
    let iscsi = "<pool type='iscsi'>\n  <name>san</name>\n  <source>\n    <host name='192.0.2.10' port='3260'/>\n    \
                 <device path='iqn.2013-06.com.example:storage'/>\n    <initiator>\n      \
                 <iqn name='iqn.2013-06.com.example:host1'/>\n    </initiator>\n  </source>\n  <target>\n    \
                 <path>/dev/disk/by-path</path>\n  </target>\n</pool>";
    let direct_pool = "<pool type='iscsi-direct'><name>direct</name><source><host name='192.0.2.10'/>\
                       <device path='iqn.2013-06.com.example:storage'/><initiator>\
                       <iqn name='iqn.2013-06.com.example:host1'/></initiator></source></pool>";
    let setup = setup_with_pools("", &[("san", iscsi), ("direct", direct_pool)]);
    let direct = network_disk("iscsi", "iqn.2013-06.com.example:storage/2", "<host name='192.0.2.10' port='3260'/>");
    collide(&setup, &volume_disk("san", "unit:0:0:2"), &direct);
    collide(&setup, &volume_disk("direct", "unit:0:0:2"), &volume_disk("san", "unit:0:0:2"));
}

#[test]
#[ignore = "needs root (losetup): tests/run-all.sh runs it"]
fn disk_pool_volume_locks_the_partition_node() {
    let scratch = Setup::new("");
    let file = scratch.image("disk.raw");
    let dev = crate::common::Loop::attach(&file);
    let name = dev.path().file_name().and_then(|n| n.to_str()).expect("loop name").to_owned();
    let pool = format!(
        "<pool type='disk'><name>lp</name><source><device path='{}'/><format type='dos'/></source>\
         <target><path>/dev</path></target></pool>",
        dev.dev
    );
    let setup = setup_with_pools("", &[("lp", &pool)]);
    let vm1 = xml("vm1", UUID1, &volume_disk("lp", &name));
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert!(out.status.success(), "vm1: {}", stderr(&out));
    assert_eq!(lock_state(Path::new(&dev.dev), 0), Some(LockMode::Exclusive), "the volume's node {}", dev.dev);
    // The loop device is the volume itself: the file behind it is written, exclusively.
    assert_eq!(lock_state(&file, 0), Some(LockMode::Exclusive), "the file behind the loop device");
    let block = format!("<disk type='block'><source dev='{}'/><target dev='vdb'/></disk>", dev.dev);
    let out = setup.hook(&["vm2", "prepare", "begin", "-"], &xml("vm2", UUID2, &block));
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains(&format!("{} is locked exclusively by guest vm1", dev.dev)), "{err}");
    let out = setup.hook(&["vm1", "release", "end", "destroyed"], &vm1);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lock_state(Path::new(&dev.dev), 0), None);
}

#[test]
fn unknown_pool_type_fails_or_starts_unlocked() {
    let pool = "<pool type='future-san'><name>fs1</name><source><name>x</name></source></pool>";
    let setup = setup_with_pools("", &[("fs1", pool)]);
    let vm1 = xml("vm1", UUID1, &volume_disk("fs1", "v1"));
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert_eq!(out.status.code(), Some(1), "refused under the default \"fail\"");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("pool \"fs1\", volume \"v1\": pool type \"future-san\" is unknown to lockhook"),
        "names pool, volume and why: {err}"
    );
    assert!(!setup.run_dir.join(format!("{UUID1}.json")).exists(), "no holder for the refused guest");
    let out = setup.hook(&["vm1", "release", "end", "failed"], &vm1);
    assert!(out.status.success());

    let setup = setup_with_pools("on_unidentified = \"skip\"\n", &[("fs1", pool)]);
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert!(out.status.success(), "skip starts it: {}", stderr(&out));
    assert!(out.stderr.is_empty() && out.stdout.is_empty(), "silent to libvirt: {}", stderr(&out));
    let log = setup.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("pool \"fs1\", volume \"v1\"") && l.contains("started unlocked")),
        "logged at warn: {log}"
    );
    let out = setup.hook(&["vm1", "release", "end", "destroyed"], &vm1);
    assert!(out.status.success());
}

/// On a real libvirtd: a `disk` pool over a partitioned loop device, started by libvirt (so the
/// hook reads libvirt's own `<poolstate>`), and its partition volume collides with the same
/// partition as a block disk and with the whole disk beneath. Needs root, libvirt and parted
/// (libvirt's disk backend runs it): `tests/run-all.sh` installs them.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn real_libvirt_disk_pool_volume_is_its_partition() {
    use crate::common::host::Host;
    assert!(
        Command::new("parted").arg("--version").output().is_ok(),
        "parted is missing (libvirt's disk pools need it): tests/run-all.sh installs it"
    );
    let host = Host::new();
    let disk = crate::common::LoopDisk::new(&host.setup.path("pooldisk.raw"));
    let vol = Path::new(&disk.part(1)).file_name().and_then(|n| n.to_str()).expect("name").to_owned();
    host.lv.virsh_ok(&[
        "pool-define-as",
        "lp",
        "disk",
        "--source-dev",
        &disk.dev,
        "--source-format",
        "dos",
        "--target",
        "/dev",
    ]);
    host.lv.virsh_ok(&["pool-start", "lp"]);
    let vols = host.lv.virsh_ok(&["vol-list", "lp"]);
    assert!(vols.contains(&vol), "libvirt names the partition {vol}: {vols}");
    let block = |dev: &str| {
        format!("<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{dev}'/><target dev='vda' bus='virtio'/></disk>")
    };
    let uuid = host.define(
        "volg",
        &format!("<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='lp' volume='{vol}'/><target dev='vda' bus='virtio'/></disk>"),
    );
    host.define("partg", &block(&disk.part(1)));
    host.define("wholeg", &block(&disk.dev));
    host.start("volg");
    assert_eq!(lock_state(Path::new(&disk.part(1)), 0), Some(LockMode::Exclusive));
    let err = host.refused("partg");
    assert!(err.contains(&format!("lockhook: {} is locked exclusively by guest volg ({uuid})", disk.part(1))), "{err}");
    let err = host.refused("wholeg");
    assert!(err.contains(&format!("lockhook: {} is locked shared (disk of {}", disk.dev, disk.part(1))), "{err}");
    host.destroy("volg");
    host.start("partg");
    host.destroy("partg");
    host.lv.virsh_ok(&["pool-destroy", "lp"]);
}
