//! Issue 3 end to end: two simulated hosts (two libvirtds in their own mount and UTS namespaces,
//! each with its own lockhook run directory) sharing an image directory and a lockspace, as hosts
//! share NFS/GFS2 storage. They share one kernel, which arbitrates OFD locks between them the way
//! a coherent cluster filesystem's lock manager does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lockhook::lock::LockMode;

use crate::common::libvirtd::{guest_xml, random_uuid, Libvirtd, LibvirtdOptions};
use crate::common::{lock_state, lockhook_bin, stderr, wait_until, Setup};

/// The shared storage: images and the lockspace.
struct Storage {
    dir: tempfile::TempDir,
}

impl Storage {
    fn new() -> Storage {
        let dir = tempfile::Builder::new().prefix("lockhook-fleet-").tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("images")).expect("mkdir images");
        std::fs::create_dir_all(dir.path().join("lockspace")).expect("mkdir lockspace");
        Storage { dir }
    }

    fn image(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("images").join(name);
        std::fs::File::create(&path).and_then(|f| f.set_len(1 << 20)).expect("create image");
        path
    }

    fn lockspace(&self) -> PathBuf {
        self.dir.path().join("lockspace")
    }
}

struct Host {
    setup: Setup,
    lv: Libvirtd,
}

impl Host {
    fn new(storage: &Storage) -> Host {
        Host::with_lockspace(Some(&storage.lockspace()))
    }

    /// A host with its own lockspace (`None`): a fleet whose lockspace is not shared.
    fn with_lockspace(lockspace: Option<&Path>) -> Host {
        let setup = Setup::with_lockspace("", lockspace);
        let lv = Libvirtd::start(LibvirtdOptions {
            hook_binary: Some(lockhook_bin()),
            extra_mounts: vec![(setup.path("etc"), PathBuf::from("/etc/lockhook"))],
            tcp_port: Some(0),
            ..LibvirtdOptions::default()
        });
        Host { setup, lv }
    }

    fn refused(&self, name: &str) -> String {
        let out = self.lv.virsh(&["start", name]);
        assert!(!out.status.success(), "{name} should have been refused on {}", self.lv.hostname());
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn guests(&self) -> Vec<serde_json::Value> {
        self.setup.status_json()["guests"].as_array().cloned().unwrap_or_default()
    }

    /// `virsh migrate --live` of `name` from this host to `to`.
    fn migrate(&self, name: &str, to: &Host, extra: &[&str]) -> std::process::Output {
        let uri = to.lv.tcp_uri();
        let mut args = vec!["migrate", "--live", "--unsafe", name, uri.as_str(), "--migrateuri", "tcp://127.0.0.1"];
        args.extend_from_slice(extra);
        self.lv.virsh(&args)
    }
}

/// Resources a guest holds for its own disks and leases, not the layers beneath them (the
/// device holding the test's filesystem, when it is one).
fn own(resources: &[serde_json::Value]) -> usize {
    resources
        .iter()
        .filter(|r| r["roles"].as_array().is_some_and(|roles| roles.iter().all(|x| x["kind"] != "layer")))
        .count()
}

fn raw(path: &Path) -> String {
    crate::common::xml::raw(path, "vda")
}

fn define(host: &Host, name: &str, uuid: &str, devices: &str) {
    host.lv.define(&guest_xml(name, uuid, devices));
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn cross_host_refusals_name_the_host() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let img = storage.image("shared.raw");
    let (uuid1, uuid2) = (random_uuid(), random_uuid());
    define(&a, "vm1", &uuid1, &raw(&img));
    define(&b, "vm2", &uuid2, &raw(&img));
    // The same guest (same UUID) defined on both hosts, as after a bad failover.
    define(&b, "vm1", &uuid1, &raw(&img));
    a.lv.virsh_ok(&["start", "vm1"]);
    let expected = format!(
        "lockhook: {} is locked exclusively by guest vm1 ({uuid1}) on host {} since ",
        img.display(),
        a.lv.hostname()
    );
    let err = b.refused("vm2");
    assert!(err.contains(&expected), "expected {expected:?} in {err}");
    let err = b.refused("vm1");
    assert!(err.contains(&expected), "the same guest on a second host: {err}");
    // `check` on host B names host A too.
    let out = b.setup.cli(&["check", img.to_str().expect("utf8")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("on host {}", a.lv.hostname())));
    a.lv.virsh_ok(&["destroy", "vm1"]);
    b.lv.virsh_ok(&["start", "vm2"]);
    let err = a.refused("vm1");
    assert!(err.contains(&format!("by guest vm2 ({uuid2}) on host {}", b.lv.hostname())), "{err}");
    b.lv.virsh_ok(&["destroy", "vm2"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn live_migration_hands_the_locks_over() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let img = storage.image("mig.raw");
    let lease = storage.dir.path().join("images/mig.lease");
    let uuid = random_uuid();
    let lease_xml = format!(
        "<lease><lockspace>fleet</lockspace><key>mig</key><target path='{}' offset='4096'/></lease>",
        lease.display()
    );
    define(&a, "mig", &uuid, &format!("{}{lease_xml}", raw(&img)));
    a.lv.virsh_ok(&["start", "mig"]);
    let out = a.migrate("mig", &b, &[]);
    assert!(out.status.success(), "migrate: {}{}", String::from_utf8_lossy(&out.stderr), b.lv.log_tail());
    assert_eq!(b.lv.virsh_ok(&["domstate", "mig"]).trim(), "running");
    // The destination's holder took the locks the moment the source let go.
    let settled = || {
        let guests = b.guests();
        guests.len() == 1
            && guests[0]["pending"].as_array().is_none_or(Vec::is_empty)
            && guests[0]["resources"].as_array().is_some_and(|r| own(r) == 2)
    };
    assert!(wait_until(Duration::from_secs(10), settled), "destination holds everything: {:?}", b.guests());
    assert!(a.guests().is_empty(), "no source holder left: {:?}", a.guests());
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    assert_eq!(lock_state(&lease, 4096), Some(LockMode::Exclusive));
    assert!(
        b.setup.log().contains("is an incoming migration; waiting for its source"),
        "the destination holder checked its QEMU: {}",
        b.setup.log()
    );
    assert_eq!(b.guests()[0]["qemu_pid"].as_u64().and_then(|p| u32::try_from(p).ok()), b.lv.qemu_pid("mig"));
    // Refusals now name the destination host.
    define(&a, "other", &random_uuid(), &raw(&img));
    let err = a.refused("other");
    assert!(err.contains(&format!("by guest mig ({uuid}) on host {}", b.lv.hostname())), "{err}");
    b.lv.virsh_ok(&["destroy", "mig"]);
    assert_eq!(lock_state(&img, 0), None);
    assert_eq!(lock_state(&lease, 4096), None);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn migration_onto_an_image_held_by_another_guest_is_refused() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let (x, y) = (storage.image("x.raw"), storage.image("y.raw"));
    let (uuid1, uuid2) = (random_uuid(), random_uuid());
    define(&a, "vm1", &uuid1, &raw(&x));
    define(&b, "vm2", &uuid2, &raw(&y));
    a.lv.virsh_ok(&["start", "vm1"]);
    b.lv.virsh_ok(&["start", "vm2"]);
    // Migrate vm1 with a destination definition pointing at y, which vm2 holds on host B.
    let xml =
        a.lv.virsh_ok(&["dumpxml", "--migratable", "vm1"]).replace(&x.display().to_string(), &y.display().to_string());
    let xml_path = storage.dir.path().join("vm1-dest.xml");
    std::fs::write(&xml_path, xml).expect("write xml");
    let out = a.migrate("vm1", &b, &["--xml", xml_path.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "migration should be refused");
    assert!(
        err.contains(&format!("lockhook: {} is locked exclusively by guest vm2 ({uuid2}) on this host", y.display())),
        "{err}"
    );
    assert_eq!(a.lv.virsh_ok(&["domstate", "vm1"]).trim(), "running");
    assert_eq!(lock_state(&x, 0), Some(LockMode::Exclusive), "the source keeps its locks");
    assert_eq!(a.guests().len(), 1);
    assert!(b.guests().iter().all(|g| g["uuid"] != uuid1.as_str()), "no destination holder left");
    a.lv.virsh_ok(&["destroy", "vm1"]);
    b.lv.virsh_ok(&["destroy", "vm2"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn cancelled_migration_leaves_the_source_locks_alone() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let img = storage.image("slow.raw");
    let uuid = random_uuid();
    define(&a, "slow", &uuid, &raw(&img));
    a.lv.virsh_ok(&["start", "slow"]);
    // 1 MiB/s: the 32 MiB guest takes long enough to abort it mid-way.
    let uri = b.lv.tcp_uri();
    let a_ref = &a;
    std::thread::scope(|scope| {
        let migration = scope.spawn(move || {
            a_ref.lv.virsh(&[
                "migrate",
                "--live",
                "--unsafe",
                "--bandwidth",
                "1",
                "slow",
                &uri,
                "--migrateuri",
                "tcp://127.0.0.1",
            ])
        });
        let pending_on_b = || {
            b.guests()
                .iter()
                .any(|g| g["uuid"] == uuid.as_str() && g["pending"].as_array().is_some_and(|p| !p.is_empty()))
        };
        assert!(
            wait_until(Duration::from_secs(20), pending_on_b),
            "destination waits for the source: {:?}",
            b.guests()
        );
        let text = String::from_utf8(b.setup.cli(&["status"]).stdout).expect("utf8");
        assert!(text.contains("PENDING"), "{text}");
        a.lv.virsh_ok(&["domjobabort", "slow"]);
        let out = migration.join().expect("join");
        assert!(!out.status.success(), "aborted migration reported success");
    });
    assert_eq!(a.lv.virsh_ok(&["domstate", "slow"]).trim(), "running");
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    assert_eq!(a.guests().len(), 1, "the source holder is untouched");
    assert!(
        wait_until(Duration::from_secs(10), || b.guests().is_empty()),
        "the destination's pending holder is gone: {:?}",
        b.guests()
    );
    a.lv.virsh_ok(&["destroy", "slow"]);
    assert_eq!(lock_state(&img, 0), None);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn network_and_block_disks_collide_across_hosts() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let export = storage.image("nbd-export.raw");
    let socket = storage.dir.path().join("nbd.sock");
    let nbd = crate::common::Nbd::serve(&export, "export1", &socket);
    let nbd_disk = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='export1'>\
         <host transport='unix' socket='{}'/></source><target dev='vda' bus='virtio'/></disk>",
        socket.display()
    );
    let uuid1 = random_uuid();
    define(&a, "nbd1", &uuid1, &nbd_disk);
    define(&b, "nbd2", &random_uuid(), &nbd_disk);
    a.lv.virsh_ok(&["start", "nbd1"]);
    let label = format!("nbd://unix:{}/export1", socket.display());
    let err = b.refused("nbd2");
    assert!(
        err.contains(&format!(
            "lockhook: {label} is locked exclusively by guest nbd1 ({uuid1}) on host {}",
            a.lv.hostname()
        )),
        "{err}"
    );
    a.lv.virsh_ok(&["destroy", "nbd1"]);
    b.lv.virsh_ok(&["start", "nbd2"]);
    b.lv.virsh_ok(&["destroy", "nbd2"]);
    drop(nbd);

    // A block device: its node is host-local, so its stable identity is locked in the lockspace.
    let backing = storage.image("loop-backing.raw");
    let device = crate::common::Loop::attach(&backing);
    let dev = device.dev.clone();
    let block = format!("<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{dev}'/><target dev='vda' bus='virtio'/></disk>");
    let uuid3 = random_uuid();
    define(&a, "blk1", &uuid3, &block);
    define(&b, "blk2", &random_uuid(), &block);
    a.lv.virsh_ok(&["start", "blk1"]);
    let err = b.refused("blk2");
    drop(device);
    assert!(
        err.contains(&format!(
            "(loop:{}@0) is locked exclusively by guest blk1 ({uuid3}) on host {}",
            backing.display(),
            a.lv.hostname()
        )),
        "{err}"
    );
    let status = a.setup.status_json().to_string();
    assert!(status.contains(&format!("block:loop:{}@0", backing.display())), "{status}");
    a.lv.virsh_ok(&["destroy", "blk1"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn migration_without_a_shared_lockspace_is_refused_unless_trusted() {
    let storage = Storage::new();
    let a = Host::new(&storage);
    let b = Host::with_lockspace(None);
    let img = storage.image("unshared.raw");
    let uuid = random_uuid();
    define(&a, "vm", &uuid, &raw(&img));
    a.lv.virsh_ok(&["start", "vm"]);
    let out = a.migrate("vm", &b, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must not run unlocked on the destination");
    assert!(
        err.contains(&format!("lockhook: {} is locked and no owner record in", img.display()))
            && err.contains("share lockspace_dir between the hosts")
            && err.contains("trust_migrations = true"),
        "{err}"
    );
    assert_eq!(a.lv.virsh_ok(&["domstate", "vm"]).trim(), "running");
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    assert!(wait_until(Duration::from_secs(5), || b.guests().is_empty()));

    // An administrator who knows better says so.
    let config = std::fs::read_to_string(&b.setup.config).expect("config");
    std::fs::write(&b.setup.config, format!("{config}trust_migrations = true\n")).expect("write config");
    let out = a.migrate("vm", &b, &[]);
    assert!(out.status.success(), "trusted migration: {}", String::from_utf8_lossy(&out.stderr));
    let settled = || {
        b.guests().first().is_some_and(|g| {
            g["pending"].as_array().is_none_or(Vec::is_empty) && g["resources"].as_array().is_some_and(|r| own(r) == 1)
        })
    };
    assert!(wait_until(Duration::from_secs(10), settled), "{:?}", b.guests());
    assert!(a.guests().is_empty());
    b.lv.virsh_ok(&["destroy", "vm"]);
    assert_eq!(lock_state(&img, 0), None);
}

fn lease(path: &Path, offset: u64) -> String {
    format!(
        "<lease><lockspace>fleet</lockspace><key>k</key><target path='{}' offset='{offset}'/></lease>",
        path.display()
    )
}

/// Issue 9: a plain start on host B of a guest that runs on host A, made just after something
/// left a `migrate` marker on B (here: an offline migration, which runs B's `migrate` hook and
/// nothing else). The guest has only a lease, which QEMU's own image locking knows nothing of:
/// lockhook alone must keep B's QEMU from running it. A later start is refused at `prepare`.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn offline_migration_then_start_is_refused() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let lease_file = storage.dir.path().join("images/offline.lease");
    let uuid = random_uuid();
    define(&a, "off", &uuid, &lease(&lease_file, 4096));
    a.lv.virsh_ok(&["start", "off"]);
    let uri = b.lv.tcp_uri();
    let out = a.lv.virsh(&["migrate", "--offline", "--persistent", "off", &uri]);
    assert!(out.status.success(), "offline migration: {}", String::from_utf8_lossy(&out.stderr));
    // At once, while the marker the `migrate` hook left on B is fresh.
    let out = b.lv.virsh(&["start", "off"]);
    assert!(!out.status.success(), "a plain start must not run the guest a second time");
    assert_eq!(b.lv.virsh_ok(&["domstate", "off"]).trim(), "shut off");
    assert!(
        b.setup.log().contains("is not an incoming migration") || stderr(&out).contains("not an incoming migration"),
        "lockhook says why: {}\n{}",
        stderr(&out),
        b.setup.log()
    );
    assert_eq!(lock_state(&lease_file, 4096), Some(LockMode::Exclusive), "host A keeps the lease");
    assert!(wait_until(Duration::from_secs(10), || b.guests().is_empty()), "no holder left on B: {:?}", b.guests());
    // The marker is gone: the next start is refused at `prepare`, naming host A.
    let err = b.refused("off");
    assert!(
        err.contains(&format!(
            "lockhook: {} @4096 (lease fleet/k) is locked exclusively by guest off ({uuid}) on host {}",
            lease_file.display(),
            a.lv.hostname()
        )) || err.contains(&format!("by guest off ({uuid}) on host {}", a.lv.hostname())),
        "{err}"
    );
    assert!(a.guests().len() == 1 && lock_state(&lease_file, 4096) == Some(LockMode::Exclusive));
    a.lv.virsh_ok(&["destroy", "off"]);
}

/// Issue 9: a migration that fails between the destination's `migrate` hook and its `prepare`
/// (here: B has another guest of that name, so libvirt refuses to add the domain) leaves a
/// marker nobody consumes. It must not let a start of the same guest on B through.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn migration_failing_before_prepare_weakens_no_later_start() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let lease_file = storage.dir.path().join("images/early.lease");
    let uuid = random_uuid();
    define(&a, "early", &uuid, &lease(&lease_file, 8192));
    define(&b, "early", &random_uuid(), "");
    a.lv.virsh_ok(&["start", "early"]);
    let out = a.migrate("early", &b, &[]);
    assert!(!out.status.success(), "migration onto a name taken by another guest fails");
    assert!(b.setup.log().contains("incoming live migration"), "B's `migrate` hook ran: {}", b.setup.log());
    // Now B gets the real guest's definition and starts it at once.
    b.lv.virsh_ok(&["undefine", "early"]);
    define(&b, "early", &uuid, &lease(&lease_file, 8192));
    let out = b.lv.virsh(&["start", "early"]);
    assert!(!out.status.success(), "the guest runs on A: {}", stderr(&out));
    assert_eq!(b.lv.virsh_ok(&["domstate", "early"]).trim(), "shut off");
    assert_eq!(a.lv.virsh_ok(&["domstate", "early"]).trim(), "running");
    assert_eq!(lock_state(&lease_file, 8192), Some(LockMode::Exclusive));
    assert!(wait_until(Duration::from_secs(10), || b.guests().is_empty()), "{:?}", b.guests());
    a.lv.virsh_ok(&["destroy", "early"]);
}

/// Issue 9: a fleet's lockspace has an identity (`lockhook lockspace init`, `lockspace_id`): when
/// the shared filesystem is not mounted on a host (here: host B's bind mount of the shared
/// lockspace is taken away, leaving the empty mount point), B refuses starts with one line naming
/// the directory instead of locking on its own, and `doctor` says so.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn an_unmounted_lockspace_is_detected() {
    let storage = Storage::new();
    let a = Host::new(&storage);
    let out = a.setup.cli(&["lockspace", "init"]);
    assert!(out.status.success(), "init: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let id_line = text.lines().find(|l| l.starts_with("lockspace_id = ")).expect("the config line").to_owned();
    let again = a.setup.cli(&["lockspace", "init"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains(&id_line), "a second init prints the same identity");
    // Host B mounts the shared lockspace at its own mount point.
    let mount_point = storage.dir.path().join("mnt-lockspace");
    std::fs::create_dir_all(&mount_point).expect("mkdir mount point");
    let setup = Setup::with_lockspace(&format!("{id_line}\n"), Some(&mount_point));
    let lv = Libvirtd::start(LibvirtdOptions {
        hook_binary: Some(lockhook_bin()),
        extra_mounts: vec![
            (setup.path("etc"), PathBuf::from("/etc/lockhook")),
            (storage.lockspace(), mount_point.clone()),
        ],
        tcp_port: Some(0),
        ..LibvirtdOptions::default()
    });
    let b = Host { setup, lv };
    let img = storage.image("mounted.raw");
    define(&b, "vm", &random_uuid(), &raw(&img));
    b.lv.virsh_ok(&["start", "vm"]);
    b.lv.virsh_ok(&["destroy", "vm"]);
    let out = b.lv.exec_in_ns(&["umount", mount_point.to_str().expect("utf8")]);
    assert!(out.status.success(), "umount: {}", stderr(&out));
    let err = b.refused("vm");
    assert!(
        err.contains(&format!("lockhook: lockspace {} is not the shared lockspace", mount_point.display()))
            && err.contains("is the shared filesystem mounted there?"),
        "{err}"
    );
    assert_eq!(lock_state(&img, 0), None, "nothing locked on the empty mount point");
    let doctor = b.lv.exec_in_ns(&[
        lockhook_bin().to_str().expect("utf8"),
        "--config",
        b.setup.config.to_str().expect("utf8"),
        "doctor",
    ]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(report.contains("is not the shared lockspace"), "doctor: {report}");
    assert_eq!(doctor.status.code(), Some(2), "doctor: {report}");
}

/// Issue 9: objects planted in the shared lockspace by another host are never followed, never
/// block and never make lockhook touch anything outside the lockspace, on real libvirt hosts.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn planted_lockspace_objects_are_harmless() {
    use lockhook::lockspace::{file_key, hash, LockFileKind, Lockspace};
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let ls = storage.lockspace();
    let outside = tempfile::tempdir().expect("outside dir");
    std::fs::write(outside.path().join("precious.json"), b"{}").expect("write");
    let img = storage.image("planted.raw");
    // A symlink planted as the owner-record directory of img, pointing outside the lockspace.
    std::fs::create_dir_all(ls.join("owners")).expect("mkdir owners");
    std::os::unix::fs::symlink(outside.path(), ls.join("owners").join(hash(&file_key(&img, 0)))).expect("symlink");
    let uuid1 = random_uuid();
    define(&a, "vm1", &uuid1, &raw(&img));
    define(&b, "vm2", &random_uuid(), &raw(&img));
    a.lv.virsh_ok(&["start", "vm1"]);
    let err = b.refused("vm2");
    assert!(err.contains(&format!("lockhook: {} is locked", img.display())), "{err}");
    assert!(outside.path().join("precious.json").exists(), "nothing outside the lockspace was deleted");
    assert_eq!(std::fs::read_dir(outside.path()).expect("dir").count(), 1, "nothing was written there either");
    a.lv.virsh_ok(&["destroy", "vm1"]);

    // A FIFO planted as an owner record: a refused start still returns at once.
    let img2 = storage.image("fifo.raw");
    let uuid3 = random_uuid();
    define(&a, "vm3", &uuid3, &raw(&img2));
    define(&b, "vm4", &random_uuid(), &raw(&img2));
    a.lv.virsh_ok(&["start", "vm3"]);
    let dir = ls.join("owners").join(hash(&file_key(&img2, 0)));
    assert!(wait_until(Duration::from_secs(10), || dir.is_dir()), "vm3's record directory");
    nix::unistd::mkfifo(&dir.join("planted.json"), nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let began = std::time::Instant::now();
    let err = b.refused("vm4");
    assert!(began.elapsed() < Duration::from_secs(10), "refusal took {:?}", began.elapsed());
    assert!(err.contains(&format!("by guest vm3 ({uuid3}) on host {}", a.lv.hostname())), "{err}");
    a.lv.virsh_ok(&["destroy", "vm3"]);

    // A symlink planted as a network disk's lock file: never created through, never opened.
    let target = outside.path().join("created-through-a-link");
    let socket = storage.dir.path().join("nowhere.sock");
    let nbd = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'>\
         <host transport='unix' socket='{}'/></source><target dev='vda' bus='virtio'/></disk>",
        socket.display()
    );
    let key = format!("net:nbd://unix:{}/x", socket.display());
    let lock_file = Lockspace::new(&ls).lock_file(LockFileKind::Network, &key);
    std::fs::create_dir_all(lock_file.parent().expect("parent")).expect("mkdir network");
    std::os::unix::fs::symlink(&target, &lock_file).expect("symlink");
    define(&b, "vm5", &random_uuid(), &nbd);
    let err = b.refused("vm5");
    assert!(err.contains("lockhook: ") && err.contains("symbolic link"), "{err}");
    assert!(!target.exists(), "root created a file through a planted symlink");
}

/// Issue 10: `lockhook run` takes a block device's stable identity in the shared lockspace, as a
/// guest does, so a guest on another host is refused even through its own device node (a
/// `mknod` copy: another inode for the same device, as another host sees a shared LUN).
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn run_on_one_host_stops_a_guest_on_another() {
    use std::os::unix::fs::MetadataExt;
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let backing = storage.image("run-loop.raw");
    let device = crate::common::Loop::attach(&backing);
    let dev = device.dev.clone();
    let rdev = std::fs::metadata(&dev).expect("stat").rdev();
    let node = storage.dir.path().join("host-b-node");
    nix::sys::stat::mknod(&node, nix::sys::stat::SFlag::S_IFBLK, nix::sys::stat::Mode::from_bits_truncate(0o600), rdev)
        .expect("mknod");
    let mut tool = Command::new(lockhook_bin())
        .arg("--config")
        .arg(&a.setup.config)
        .args(["run", &dev, "--", "sh", "-c", "read x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("lockhook run");
    assert!(wait_until(Duration::from_secs(5), || lock_state(&PathBuf::from(&dev), 0) == Some(LockMode::Exclusive)));
    let block = format!(
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{}'/><target dev='vda' bus='virtio'/></disk>",
        node.display()
    );
    define(&b, "blk", &random_uuid(), &block);
    let err = b.refused("blk");
    let _ = std::io::Write::write_all(tool.stdin.as_mut().expect("stdin"), b"\n");
    let _ = tool.wait();
    drop(device);
    assert!(
        err.contains(&format!("(loop:{}@0) is locked exclusively by `lockhook run`", backing.display()))
            && err.contains("(pid ")
            && err.contains(": sh -c read x) on host "),
        "{err}"
    );
}

/// Issue 14: `lockhook status --fleet` on one host lists the guests and resources of every host
/// sharing the lockspace, from the owner records alone, and shows a record whose holder is gone
/// as stale.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn status_fleet_lists_every_hosts_guests() {
    let storage = Storage::new();
    let (a, b) = (Host::new(&storage), Host::new(&storage));
    let (img_a, img_b) = (storage.image("fleet-a.raw"), storage.image("fleet-b.raw"));
    let (uuid_a, uuid_b) = (random_uuid(), random_uuid());
    define(&a, "va", &uuid_a, &raw(&img_a));
    define(&b, "vb", &uuid_b, &raw(&img_b));
    a.lv.virsh_ok(&["start", "va"]);
    b.lv.virsh_ok(&["start", "vb"]);
    let fleet = || {
        let out = a.setup.cli(&["status", "--fleet", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["records"]
            .as_array()
            .expect("records")
            .clone()
    };
    let has = |records: &[serde_json::Value], host: &str, guest: &str, uuid: &str, live: bool| {
        records.iter().any(|r| r["host"] == host && r["guest"] == guest && r["uuid"] == uuid && r["live"] == live)
    };
    // Records are published just after each start's reply: poll.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let records = fleet();
            has(&records, a.lv.hostname(), "va", &uuid_a, true) && has(&records, b.lv.hostname(), "vb", &uuid_b, true)
        }),
        "both hosts' guests: {:?}",
        fleet()
    );
    let text = String::from_utf8_lossy(&a.setup.cli(&["status", "--fleet"]).stdout).into_owned();
    assert!(
        text.contains(&format!("host {} guest vb ({uuid_b})", b.lv.hostname()))
            && text.contains(&format!("file:{}@0", img_b.display())),
        "{text}"
    );
    // B's holder dies (its QEMU keeps running): its record is stale, and says so.
    let holder = b.guests().iter().find_map(|g| g["holder_pid"].as_u64()).expect("B's holder pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(holder).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill B's holder");
    assert!(
        wait_until(Duration::from_secs(10), || has(&fleet(), b.lv.hostname(), "vb", &uuid_b, false)),
        "B's record shown stale: {:?}",
        fleet()
    );
    assert!(a.setup.cli(&["status", "--fleet"]).stdout.windows(5).any(|w| w == b"STALE"));
    a.lv.virsh_ok(&["destroy", "va"]);
    b.lv.virsh_ok(&["destroy", "vb"]);
}
