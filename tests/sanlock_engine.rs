//! Issue 11 end to end: the sanlock engine on two simulated hosts, each a private libvirtd (its
//! own mount and UTS namespaces) with its own sanlock daemon, its own `host_id` and its own
//! private OFD lockspace, sharing one lease area. The hosts see their images under one path but
//! as different files (a different directory is bind-mounted there in each host's namespace), as
//! hosts see one LUN on a SAN with no lock manager between them: only sanlock can stop the second
//! host. Network disks (NBD) and `<lease>` files are reached by both.
//!
//! Each host's daemon runs outside the namespaces; its run directory is bind-mounted on the
//! host's `/run/sanlock`, so the hook, the holders and libvirt's own sanlock driver inside reach
//! it where production puts it. io_timeout is small (see `IO_TIMEOUT`) so that joins and
//! timeouts take seconds, not minutes.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::libvirtd::{guest_xml, random_uuid, Libvirtd, LibvirtdOptions};
use crate::common::sanlock::SanlockDaemon;
use crate::common::{lockhook_bin, wait_until, Nbd, Setup};

/// sanlock's I/O timeout in these tests: a join takes about 2x, a dead host's leases are free
/// after 8x + 60 s. Not smaller: two cores running two libvirtds and QEMUs must not miss a
/// renewal by accident.
const IO_TIMEOUT: u32 = 2;

/// What the hosts share: the lease area, `<lease>` files, the NBD socket, libvirt's lease dir,
/// and the (empty) directory under which each host mounts its own images.
struct Shared {
    dir: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        let dir = tempfile::Builder::new().prefix("lockhook-sanlock-fleet-").tempdir().expect("temp dir");
        for sub in ["mnt", "leases", "libvirt"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        Shared { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn area(&self) -> PathBuf {
        self.path("area")
    }

    /// Where every host sees its images.
    fn mnt(&self) -> PathBuf {
        self.path("mnt")
    }

    /// A `<lease>` in lockhook's lockspace, initialised as an admin would for libvirt.
    fn lease(&self, daemon: &SanlockDaemon, key: &str) -> String {
        let file = self.path("leases").join(key);
        std::fs::File::create(&file).and_then(|f| f.set_len(1 << 20)).expect("create lease file");
        daemon.cli_ok(&["init", "-r", &format!("lockhook:{key}:{}:0", file.display()), "-Z", "512", "-A", "1M"]);
        format!(
            "<lease><lockspace>lockhook</lockspace><key>{key}</key><target path='{}' offset='0'/></lease>",
            file.display()
        )
    }
}

/// One simulated host. Fields drop in order: libvirtd (and every guest and holder in its
/// namespaces), then lockhook's files, then the sanlock daemon.
struct SanHost {
    lv: Libvirtd,
    setup: Setup,
    images: PathBuf,
    daemon: SanlockDaemon,
}

impl SanHost {
    fn start(shared: &Shared, host_id: u64, extra: &str) -> SanHost {
        let daemon = SanlockDaemon::start(&format!("lh-sanlock-{host_id}-{}", &random_uuid()[..8]));
        let images = daemon.path("images");
        std::fs::create_dir_all(&images).expect("mkdir images");
        let setup = Setup::new(&format!(
            "engine = \"sanlock\"\n[sanlock]\nhost_id = {host_id}\nlease_area = {:?}\nio_timeout = {IO_TIMEOUT}\n{extra}",
            shared.area()
        ));
        let lv = Libvirtd::start(LibvirtdOptions {
            hook_binary: Some(lockhook_bin()),
            extra_mounts: vec![
                (setup.path("etc"), PathBuf::from("/etc/lockhook")),
                (daemon.run_dir.clone(), PathBuf::from("/run/sanlock")),
                (images.clone(), shared.mnt()),
            ],
            tcp_port: Some(0),
            ..LibvirtdOptions::default()
        });
        SanHost { lv, setup, images, daemon }
    }

    /// `lockhook ARGS` inside this host's namespaces (its hostname, its /run/sanlock).
    fn lockhook(&self, args: &[&str]) -> Output {
        let bin = lockhook_bin();
        let mut argv = vec![bin.to_str().expect("utf8")];
        argv.extend_from_slice(args);
        self.lv.exec_in_ns_timeout(&argv, Duration::from_secs(120))
    }

    fn lockhook_ok(&self, args: &[&str]) -> String {
        let out = self.lockhook(args);
        assert!(
            out.status.success(),
            "lockhook {args:?} on {}: {}{}\n{}",
            self.lv.hostname(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sanlock_status(&self) -> serde_json::Value {
        serde_json::from_str(&self.lockhook_ok(&["sanlock", "status", "--json"])).expect("sanlock status --json")
    }

    /// The sanlock leases this host's guests hold (`pending` ones apart).
    fn held_leases(&self) -> Vec<serde_json::Value> {
        let status = self.sanlock_status();
        let leases = status["leases"].as_array().cloned().unwrap_or_default();
        leases.into_iter().filter(|l| l["pending"] == false).collect()
    }

    /// The exclusive ones (not the shared lease of the device holding the test's filesystem),
    /// apart from the guest's manifest lease.
    fn exclusive_leases(&self) -> Vec<serde_json::Value> {
        let manifest = |l: &serde_json::Value| l["what"].as_str().is_some_and(|w| w.contains("manifest"));
        self.held_leases().into_iter().filter(|l| l["mode"] == "exclusive" && !manifest(l)).collect()
    }

    /// A 1 MiB image `name` in this host's own image directory, at the path every host uses.
    fn image(&self, name: &str) -> PathBuf {
        std::fs::File::create(self.images.join(name)).and_then(|f| f.set_len(1 << 20)).expect("create image");
        PathBuf::from(name)
    }

    fn define(&self, name: &str, uuid: &str, devices: &str) {
        self.lv.define(&guest_xml(name, uuid, devices));
    }

    fn start_guest(&self, name: &str) {
        self.lv.virsh_ok(&["start", name]);
    }

    /// `virsh start NAME`, expecting lockhook to refuse it; its stderr.
    fn refused(&self, name: &str) -> String {
        let out = self.lv.virsh(&["start", name]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{name} started on {} but should have been refused", self.lv.hostname());
        assert_eq!(self.lv.virsh_ok(&["domstate", name]).trim(), "shut off");
        err
    }

    fn guests(&self) -> Vec<serde_json::Value> {
        self.setup.status_json()["guests"].as_array().cloned().unwrap_or_default()
    }

    fn migrate(&self, name: &str, to: &SanHost) -> Output {
        let uri = to.lv.tcp_uri();
        self.lv.virsh(&["migrate", "--live", "--unsafe", name, uri.as_str(), "--migrateuri", "tcp://127.0.0.1"])
    }
}

fn raw(shared: &Shared, image: &Path, dev: &str) -> String {
    crate::common::xml::raw(&shared.mnt().join(image), dev)
}

/// Two lockhook hosts on one freshly formatted lease area, both joined.
fn two_hosts(shared: &Shared) -> (SanHost, SanHost) {
    let a = SanHost::start(shared, 1, "");
    let b = SanHost::start(shared, 2, "");
    let init = a.lockhook_ok(&["sanlock", "init"]);
    assert!(init.contains("formatted"), "{init}");
    // A second init leaves a formatted area alone.
    assert!(b.lockhook_ok(&["sanlock", "init"]).contains("nothing done"));
    join_all(&[&a, &b]);
    (a, b)
}

fn join_all(hosts: &[&SanHost]) {
    std::thread::scope(|s| {
        for h in hosts {
            s.spawn(|| {
                let out = h.lockhook_ok(&["sanlock", "join"]);
                assert!(out.contains("joined"), "{out}");
            });
        }
    });
}

fn holder_of(host: &SanHost, guest: &str) -> u32 {
    let guests = host.guests();
    let g = guests.iter().find(|g| g["name"] == guest).unwrap_or_else(|| panic!("{guest} in {guests:?}"));
    g["holder_pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("holder_pid")
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn sanlock_refuses_a_second_host_naming_the_host() {
    let shared = Shared::new();
    let (a, b) = two_hosts(&shared);
    // A host that has not joined is told how to join.
    let c = SanHost::start(&shared, 3, "");
    c.image("lonely.raw");
    c.define("lonely", &random_uuid(), &raw(&shared, Path::new("lonely.raw"), "vda"));
    let err = c.refused("lonely");
    assert!(
        err.contains("has not joined sanlock lockspace lockhook (host_id 3): run `lockhook sanlock join`"),
        "{err}"
    );
    assert_eq!(err.matches("lockhook: ").count(), 1, "one line: {err}");
    let doctor = String::from_utf8_lossy(&c.lockhook(&["doctor"]).stdout).into_owned();
    assert!(doctor.contains("ERROR sanlock: lockspace lockhook as host_id 3: not joined"), "{doctor}");
    drop(c);
    let doctor = String::from_utf8_lossy(&a.lockhook(&["doctor"]).stdout).into_owned();
    for line in [
        "ok    sanlock: lockspace lockhook as host_id 1: joined".to_owned(),
        format!("ok    sanlock: host table: host_id 1 is {}", a.lv.hostname()),
    ] {
        assert!(doctor.contains(&line), "{line:?} in {doctor}");
    }

    let image = a.image("vm.raw");
    b.image("vm.raw");
    let nbd_file = shared.path("nbd.raw");
    std::fs::File::create(&nbd_file).and_then(|f| f.set_len(1 << 20)).expect("nbd image");
    let socket = shared.path("nbd.sock");
    let _nbd = Nbd::serve(&nbd_file, "exp", &socket);
    let nbd_disk = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='exp'>\
         <host transport='unix' socket='{}'/></source><target dev='vdb' bus='virtio'/></disk>",
        socket.display()
    );
    let lease = shared.lease(&a.daemon, "vm-lease");
    let devices = format!("{}{nbd_disk}{lease}", raw(&shared, &image, "vda"));
    let (uuid1, uuid2) = (random_uuid(), random_uuid());
    a.define("vm1", &uuid1, &devices);
    b.define("vm2", &uuid2, &devices);
    a.start_guest("vm1");
    // guest lease + image + NBD disk + <lease>
    assert_eq!(a.exclusive_leases().len(), 4, "{:?}", a.sanlock_status());

    let err = b.refused("vm2");
    let by_a = format!("through sanlock by host {} (sanlock host_id 1)", a.lv.hostname());
    let image_line = format!("{} is locked exclusively {by_a}", shared.mnt().join(&image).display());
    assert!(err.contains(&image_line), "expected {image_line:?} in {err}");
    assert!(err.contains(&format!("lease lockhook/vm-lease is locked exclusively {by_a}")), "{err}");
    assert!(err.contains("nbd") && err.matches(&by_a).count() == 3, "image, NBD disk and lease refused: {err}");
    assert!(b.guests().is_empty(), "nothing left on B: {:?}", b.guests());
    assert!(b.held_leases().is_empty());

    // `sanlock status` names both hosts.
    let status = a.sanlock_status();
    let hosts = status["hosts"].as_array().cloned().unwrap_or_default();
    assert!(hosts.iter().any(|h| h["host_id"] == 2 && h["name"] == b.lv.hostname()), "{status}");

    a.lv.virsh_ok(&["destroy", "vm1"]);
    assert!(wait_until(Duration::from_secs(10), || a.held_leases().is_empty()), "A let go");
    b.start_guest("vm2");
    let err = a.refused("vm1");
    assert!(err.contains(&format!("through sanlock by host {} (sanlock host_id 2)", b.lv.hostname())), "{err}");
    b.lv.virsh_ok(&["destroy", "vm2"]);
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn shareable_disks_take_shared_leases() {
    let shared = Shared::new();
    let (a, b) = two_hosts(&shared);
    let image = a.image("quorum.raw");
    b.image("quorum.raw");
    let shareable = crate::common::xml::file_disk(&shared.mnt().join(&image), "raw", "vda", "<shareable/>");
    a.define("s1", &random_uuid(), &shareable);
    b.define("s2", &random_uuid(), &shareable);
    b.define("x", &random_uuid(), &raw(&shared, &image, "vda"));
    a.start_guest("s1");
    b.start_guest("s2");
    assert!(b.held_leases().iter().any(|l| l["mode"] == "shared"), "{:?}", b.sanlock_status());
    b.lv.virsh_ok(&["destroy", "s2"]);
    let err = b.refused("x");
    assert!(
        err.contains(&format!("is locked shared through sanlock by host {} (sanlock host_id 1)", a.lv.hostname())),
        "{err}"
    );
    a.lv.virsh_ok(&["destroy", "s1"]);
    b.start_guest("x");
    b.lv.virsh_ok(&["destroy", "x"]);
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn live_migration_hands_the_leases_over() {
    let shared = Shared::new();
    let (a, b) = two_hosts(&shared);
    let image = a.image("mig.raw");
    b.image("mig.raw");
    let lease = shared.lease(&a.daemon, "mig-lease");
    let uuid = random_uuid();
    a.define("mig", &uuid, &format!("{}{lease}", raw(&shared, &image, "vda")));
    a.start_guest("mig");
    // A migration whose destination definition points the disk at another guest's image on
    // the same source host is refused: the source guest's manifest does not name that image.
    a.image("victim.raw");
    b.image("victim.raw");
    a.define("victim", &random_uuid(), &raw(&shared, Path::new("victim.raw"), "vda"));
    a.start_guest("victim");
    let xml = a.lv.virsh_ok(&["dumpxml", "--migratable", "mig"]).replace("mig.raw", "victim.raw");
    let xml_path = shared.path("mig-dest.xml");
    std::fs::write(&xml_path, xml).expect("write xml");
    let uri = b.lv.tcp_uri();
    let out = a.lv.virsh(&[
        "migrate",
        "--live",
        "--unsafe",
        "mig",
        &uri,
        "--migrateuri",
        "tcp://127.0.0.1",
        "--xml",
        xml_path.to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a migration onto another guest's image was let through");
    assert!(err.contains("victim.raw is locked exclusively through sanlock by host"), "{err}");
    assert!(err.contains("not held by this guest's migration source"), "{err}");
    assert_eq!(a.lv.virsh_ok(&["domstate", "mig"]).trim(), "running");
    a.lv.virsh_ok(&["destroy", "victim"]);
    // A migration that fails (cancelled while RAM is copied at 1 MiB/s) leaves the source's
    // leases alone and nothing on the destination.
    let held_before = a.held_leases();
    let uri = b.lv.tcp_uri();
    let cancelled = std::thread::scope(|s| {
        let migration = s.spawn(|| {
            let args =
                ["migrate", "--live", "--unsafe", "--bandwidth", "1", "mig", &uri, "--migrateuri", "tcp://127.0.0.1"];
            a.lv.virsh(&args)
        });
        let pending_on_b =
            || b.sanlock_status()["leases"].as_array().is_some_and(|l| l.iter().any(|x| x["pending"] == true));
        assert!(wait_until(Duration::from_secs(20), pending_on_b), "B awaits the leases: {:?}", b.sanlock_status());
        a.lv.virsh_ok(&["domjobabort", "mig"]);
        migration.join().expect("migration thread")
    });
    assert!(!cancelled.status.success(), "the cancelled migration reported success");
    assert_eq!(a.lv.virsh_ok(&["domstate", "mig"]).trim(), "running");
    assert_eq!(a.held_leases(), held_before, "the source keeps its leases");
    let b_empty = || b.sanlock_status()["leases"].as_array().is_some_and(Vec::is_empty);
    assert!(wait_until(Duration::from_secs(30), b_empty), "nothing left on B: {:?}", b.sanlock_status());
    let out = a.migrate("mig", &b);
    assert!(out.status.success(), "migrate: {}{}", String::from_utf8_lossy(&out.stderr), b.lv.log_tail());
    assert_eq!(b.lv.virsh_ok(&["domstate", "mig"]).trim(), "running");
    // The destination's holder took every lease once the source let go.
    let settled = || b.exclusive_leases().len() == 3 && a.held_leases().is_empty();
    assert!(wait_until(Duration::from_secs(20), settled), "B: {:?}\nA: {:?}", b.sanlock_status(), a.sanlock_status());
    let log = b.setup.log();
    assert!(log.contains("waiting for sanlock lease"), "the destination waited for its source: {log}");
    assert!(log.contains("is an incoming migration; waiting for its source"), "{log}");
    // A start of another guest on the image on A is refused, naming B.
    a.define("other", &random_uuid(), &raw(&shared, &image, "vda"));
    let err = a.refused("other");
    assert!(err.contains(&format!("through sanlock by host {} (sanlock host_id 2)", b.lv.hostname())), "{err}");
    b.lv.virsh_ok(&["destroy", "mig"]);
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn a_killed_holder_leaves_its_leases_held_until_readopted() {
    let shared = Shared::new();
    let (a, b) = two_hosts(&shared);
    let image = a.image("vm.raw");
    b.image("vm.raw");
    let uuid = random_uuid();
    a.define("vm1", &uuid, &raw(&shared, &image, "vda"));
    b.define("vm2", &random_uuid(), &raw(&shared, &image, "vda"));
    a.start_guest("vm1");
    let holder = holder_of(&a, "vm1");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holder as i32), nix::sys::signal::Signal::SIGKILL).expect("kill");
    assert!(wait_until(Duration::from_secs(10), || !Path::new(&format!("/proc/{holder}")).exists()), "holder died");
    // The guest's QEMU runs on: its persistent leases are orphans of host A, still held.
    let err = b.refused("vm2");
    assert!(err.contains(&format!("through sanlock by host {}", a.lv.hostname())), "{err}");
    // Re-adoption (what every hook call and the reconcile timer do) takes the orphans back.
    let report = a.lockhook_ok(&["reconcile"]);
    assert!(report.contains("vm1"), "{report}");
    let new_holder = holder_of(&a, "vm1");
    assert_ne!(new_holder, holder);
    let leases = a.exclusive_leases();
    assert_eq!(leases.len(), 2, "guest lease and image re-held: {leases:?}");
    let client = a.daemon.cli_ok(&["status"]);
    assert!(client.contains(&format!("p {new_holder}")), "the new holder is sanlock's client now: {client}");
    let err = b.refused("vm2");
    assert!(err.contains(&format!("through sanlock by host {}", a.lv.hostname())), "{err}");
    a.lv.virsh_ok(&["destroy", "vm1"]);
    assert!(wait_until(Duration::from_secs(10), || a.held_leases().is_empty()), "released at destroy");
    b.start_guest("vm2");
    b.lv.virsh_ok(&["destroy", "vm2"]);
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn a_dead_daemons_leases_are_free_only_after_the_timeout() {
    let shared = Shared::new();
    let (a, b) = two_hosts(&shared);
    let image = a.image("vm.raw");
    b.image("vm.raw");
    a.define("vm1", &random_uuid(), &raw(&shared, &image, "vda"));
    b.define("vm2", &random_uuid(), &raw(&shared, &image, "vda"));
    a.start_guest("vm1");
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.daemon.pid() as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill daemon");
    let first = b.refused("vm2");
    assert!(first.contains("vm.raw"), "{first}");
    // Host A stops renewing; B may take the lease once A's host lease has timed out
    // (8 x io_timeout + 60 s without a watchdog's word), not before.
    let mut started = false;
    while killed.elapsed() < Duration::from_secs(240) {
        let out = b.lv.virsh(&["start", "vm2"]);
        if out.status.success() {
            started = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let took = killed.elapsed();
    assert!(started, "B never got the lease: {}", b.setup.log());
    let bound = Duration::from_secs(u64::from(8 * IO_TIMEOUT));
    assert!(took >= bound, "B took A's lease after {took:?}, before A's host lease could time out ({bound:?})");
    b.lv.virsh_ok(&["destroy", "vm2"]);
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn a_host_that_loses_its_lease_area_stops_its_guests() {
    let shared = Shared::new();
    let a = SanHost::start(&shared, 1, "");
    let b = SanHost::start(&shared, 2, "on_lock_lost = \"pause\"\n");
    assert!(a.lockhook_ok(&["sanlock", "init"]).contains("formatted"));
    join_all(&[&a, &b]);
    let image = a.image("vm.raw");
    a.define("vm1", &random_uuid(), &raw(&shared, &image, "vda"));
    b.image("other.raw");
    b.define("vm3", &random_uuid(), &raw(&shared, Path::new("other.raw"), "vda"));
    a.start_guest("vm1");
    b.start_guest("vm3");
    let (qa, qb) = (a.lv.qemu_pid("vm1").expect("QEMU on A"), b.lv.qemu_pid("vm3").expect("QEMU on B"));
    // Both hosts' delta leases are overwritten (their storage gives garbage): neither can renew,
    // and each daemon runs lockhook's killpath for its holders: A's kills its QEMU, B's pauses it.
    let area = std::fs::OpenOptions::new().write(true).open(shared.area()).expect("open area");
    std::os::unix::fs::FileExt::write_all_at(&area, &[0u8; 1024], 0).expect("clobber hosts 1 and 2");
    drop(area);
    let gone = wait_until(Duration::from_secs(120), || !Path::new(&format!("/proc/{qa}")).exists());
    assert!(gone, "QEMU of vm1 still runs:\n{}\n{}", a.setup.log(), a.daemon.log());
    assert!(a.setup.log().contains("lost its sanlock lockspace lease"), "{}", a.setup.log());
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{qb}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T')))
    };
    assert!(wait_until(Duration::from_secs(120), stopped), "QEMU of vm3 is not stopped:\n{}", b.setup.log());
    let log = b.setup.log();
    assert!(log.contains("paused (SIGSTOP)") || log.contains("lost its sanlock lockspace lease"), "{log}");
    // B's holder let go of its sanlock leases and keeps its local locks.
    // (Its state file says so; `sanlock status` cannot read the clobbered area any more.)
    let let_go = || b.guests().iter().all(|g| g["sanlock"].as_array().is_none_or(Vec::is_empty));
    assert!(wait_until(Duration::from_secs(10), let_go), "{:?}", b.guests());
    assert!(b.guests().iter().any(|g| g["resources"].as_array().is_some_and(|r| !r.is_empty())), "local locks kept");
    b.lv.virsh_ok(&["destroy", "vm3"]);
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn libvirts_sanlock_driver_and_lockhook_exclude_each_other() {
    let shared = Shared::new();
    let lease_dir = shared.path("libvirt");
    // Host H: lockhook, also taking libvirt's automatic disk leases.
    let h = SanHost::start(&shared, 1, &format!("libvirt_disk_lease_dir = {lease_dir:?}\n"));
    assert!(h.lockhook_ok(&["sanlock", "init"]).contains("formatted"));
    join_all(&[&h]);
    // The join created libvirt's lockspace with the io_timeout the hosts join with (formatted
    // with the daemon's 10 s, a join with 2 outlasts its own host lease and is dropped): what a
    // host slot nobody joined (3) still says; a joined one says its host's own.
    let leader = read_leader("__LIBVIRT__DISKS__", 3, &lease_dir.join("__LIBVIRT__DISKS__"));
    assert!(leader.lines().any(|l| l.trim() == format!("io_timeout {IO_TIMEOUT}")), "libvirt's lockspace: {leader}");
    // Host L: libvirt's own sanlock driver, no lockhook.
    let l_daemon = SanlockDaemon::start(&format!("lh-libvirt-{}", &random_uuid()[..8]));
    let l_images = l_daemon.path("images");
    std::fs::create_dir_all(&l_images).expect("mkdir");
    let l = Libvirtd::start(LibvirtdOptions {
        extra_qemu_conf: "lock_manager = \"sanlock\"\n".into(),
        extra_etc_files: vec![(
            "qemu-sanlock.conf".into(),
            format!(
                "auto_disk_leases = 1\ndisk_lease_dir = {lease_dir:?}\nhost_id = 2\nuser = \"root\"\ngroup = \"root\"\nio_timeout = {IO_TIMEOUT}\n"
            ),
        )],
        extra_mounts: vec![(l_daemon.run_dir.clone(), PathBuf::from("/run/sanlock")), (l_images.clone(), shared.mnt())],
        ..LibvirtdOptions::default()
    });
    std::fs::File::create(l_images.join("vm.raw")).and_then(|f| f.set_len(1 << 20)).expect("image");
    let image = h.image("vm.raw");
    let devices = raw(&shared, &image, "vda");
    h.define("vmh", &random_uuid(), &devices);
    l.define(&guest_xml("vml", &random_uuid(), &devices));
    // libvirtd joins __LIBVIRT__DISKS__ by itself; wait until it has.
    let joined = wait_until(Duration::from_secs(60), || {
        l_daemon
            .cli()
            .arg("status")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("__LIBVIRT__DISKS__"))
    });
    assert!(joined, "libvirtd joined its lockspace: {}", l_daemon.log());

    // lockhook first: libvirt's driver is refused.
    h.start_guest("vmh");
    assert!(h.held_leases().iter().any(|x| x["lease"].as_str().is_some_and(|s| s.starts_with("__LIBVIRT__DISKS__:"))));
    let out = l.virsh(&["start", "vml"]);
    assert!(!out.status.success(), "libvirt's driver let vml start while lockhook holds the image");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to acquire lock"), "refused by libvirt's sanlock driver: {err}");
    h.lv.virsh_ok(&["destroy", "vmh"]);

    // libvirt's driver first: lockhook is refused, naming libvirt's lease.
    assert!(wait_until(Duration::from_secs(10), || h.held_leases().is_empty()));
    l.virsh_ok(&["start", "vml"]);
    let err = h.refused("vmh");
    assert!(err.contains("(libvirt's disk lease) is locked exclusively through sanlock by sanlock host_id 2"), "{err}");
    l.virsh_ok(&["destroy", "vml"]);
    h.start_guest("vmh");
    h.lv.virsh_ok(&["destroy", "vmh"]);

    // A hand-written <lease> means the same sanlock resource to both (initialised by the admin,
    // with the daemon's defaults, in a lockspace both hosts joined).
    let lease_file = shared.path("leases").join("fleet-lease");
    std::fs::File::create(&lease_file).expect("create lease file");
    h.daemon.cli_ok(&["init", "-r", &format!("__LIBVIRT__DISKS__:fleet-lease:{}:0", lease_file.display())]);
    let lease = format!(
        "<lease><lockspace>__LIBVIRT__DISKS__</lockspace><key>fleet-lease</key><target path='{}' offset='0'/></lease>",
        lease_file.display()
    );
    h.define("lh", &random_uuid(), &lease);
    l.define(&guest_xml("ll", &random_uuid(), &lease));
    l.virsh_ok(&["start", "ll"]);
    let err = h.refused("lh");
    assert!(
        err.contains("lease __LIBVIRT__DISKS__/fleet-lease is locked exclusively through sanlock by sanlock host_id 2"),
        "{err}"
    );
    l.virsh_ok(&["destroy", "ll"]);
    h.start_guest("lh");
    let out = l.virsh(&["start", "ll"]);
    assert!(!out.status.success(), "libvirt's driver let ll take the lease lockhook holds");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to acquire lock"), "{err}");
    h.lv.virsh_ok(&["destroy", "lh"]);
    drop(l);
}

/// `sanlock direct read_leader` of host `host_id`'s slot in the lockspace `name` at `file`.
fn read_leader(name: &str, host_id: u64, file: &Path) -> String {
    let out = Command::new("sanlock")
        .args(["direct", "read_leader", "-s"])
        .arg(format!("{name}:{host_id}:{}:0", file.display()))
        .output()
        .expect("sanlock direct read_leader");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// libvirt's driver formats its lockspace with the daemon's default io_timeout (10 s). A host
/// whose `io_timeout` is less than a quarter of that would lose its host lease as it joins
/// (joining waits 2 × 10 s, the lease lasts 8 × 2 s): `join` takes half the recorded one
/// instead, says so, and stays in the lockspace.
#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn a_lockspace_libvirt_formatted_is_joined_with_its_io_timeout() {
    let shared = Shared::new();
    let lease_dir = shared.path("libvirt");
    let h = SanHost::start(&shared, 1, &format!("libvirt_disk_lease_dir = {lease_dir:?}\n"));
    // As libvirt's driver makes it: a 0600 file, formatted with the daemon's default.
    let file = lease_dir.join("__LIBVIRT__DISKS__");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .expect("create libvirt's lockspace file");
    h.daemon.cli_ok(&["init", "-s", &format!("__LIBVIRT__DISKS__:0:{}:0", file.display())]);
    let records = |seconds: u32| {
        let leader = read_leader("__LIBVIRT__DISKS__", 1, &file);
        leader.lines().any(|l| l.trim() == format!("io_timeout {seconds}"))
    };
    assert!(records(10), "formatted with 10 s");
    assert!(h.lockhook_ok(&["sanlock", "init"]).contains("formatted"));
    let out = h.lockhook_ok(&["sanlock", "join"]);
    assert!(
        out.contains(&format!("with io_timeout 5 s, half the 10 s its slot records (io_timeout here: {IO_TIMEOUT} s)")),
        "{out}"
    );
    // lockhook's own lockspace, formatted with this host's io_timeout, is joined with it.
    assert!(out.lines().any(|l| l.starts_with("lockspace lockhook:1:") && !l.contains("records")), "{out}");
    let joined = || {
        let status = h.daemon.cli_ok(&["status"]);
        status.lines().any(|l| l.starts_with("s __LIBVIRT__DISKS__:1:"))
    };
    // Dropped at once where the lease expired as it was acquired: still there well after.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert!(joined(), "libvirt's lockspace left: {}", h.daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // What it joined with is on record: the next join steps down (3 s, then this host's 2).
    assert!(records(5), "host 1 renews with 5 s");
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn hot_plugged_disks_get_leases_and_unplugged_ones_let_go() {
    let shared = Shared::new();
    let (a, b) = two_hosts(&shared);
    let boot = a.image("boot.raw");
    for name in ["taken.raw", "free.raw"] {
        a.image(name);
        b.image(name);
    }
    let scsi = "<controller type='scsi' model='virtio-scsi'/>";
    a.define("vm1", &random_uuid(), &format!("{}{scsi}", raw(&shared, &boot, "vda")));
    b.define("holder", &random_uuid(), &raw(&shared, Path::new("taken.raw"), "vda"));
    b.start_guest("holder");
    a.start_guest("vm1");
    let attach = |image: &str, target: &str| {
        let path = shared.mnt().join(image);
        a.lv.virsh_ok(&["attach-disk", "vm1", path.to_str().expect("utf8"), target, "--targetbus", "scsi", "--live"]);
    };
    let holds = |image: &str| {
        let path = shared.mnt().join(image).display().to_string();
        a.exclusive_leases().iter().any(|l| l["what"] == path.as_str())
    };
    // A free disk gets its lease within a tick or two.
    attach("free.raw", "sda");
    assert!(wait_until(Duration::from_secs(10), || holds("free.raw")), "{:?}", a.sanlock_status());
    // One another host holds is a CONFLICT, shown and retried; it is never held.
    attach("taken.raw", "sdb");
    let conflict = || {
        a.guests().iter().any(|g| {
            g["conflicts"].as_array().is_some_and(|c| {
                c.iter().any(|x| x["held_by"].as_str().is_some_and(|h| h.contains("through sanlock by host")))
            })
        })
    };
    assert!(wait_until(Duration::from_secs(10), conflict), "{:?}", a.guests());
    assert!(!holds("taken.raw"));
    assert!(a.setup.log().contains("CONFLICT"), "logged loudly");
    // Once the other host lets go, the retry takes it.
    b.lv.virsh_ok(&["destroy", "holder"]);
    assert!(wait_until(Duration::from_secs(15), || holds("taken.raw")), "{:?}", a.sanlock_status());
    // An unplugged disk's lease goes.
    a.lv.virsh_ok(&["detach-disk", "vm1", "sda", "--live"]);
    assert!(wait_until(Duration::from_secs(15), || !holds("free.raw")), "{:?}", a.sanlock_status());
    a.lv.virsh_ok(&["destroy", "vm1"]);
}

/// `sda`, ..., `sdz`, `sdaa`, ...: SCSI target names for `n` disks.
fn scsi_targets(n: usize) -> Vec<String> {
    let letters = |i: usize| {
        let mut name = String::new();
        let mut i = i + 1;
        while i > 0 {
            i -= 1;
            name.insert(0, char::from(b'a' + u8::try_from(i % 26).expect("< 26")));
            i /= 26;
        }
        name
    };
    (0..n).map(|i| format!("sd{}", letters(i))).collect()
}

#[test]
#[ignore = "needs root, a private libvirtd and sanlock daemons: tests/run-all.sh runs it"]
fn a_guest_with_64_disks_holds_64_leases() {
    assert_eq!(scsi_targets(28)[26..], ["sdaa".to_owned(), "sdab".to_owned()]);
    let shared = Shared::new();
    let (a, b) = two_hosts(&shared);
    let mut devices = String::from("<controller type='scsi' model='virtio-scsi'/>");
    for (i, target) in scsi_targets(64).iter().enumerate() {
        let name = format!("d{i}.raw");
        a.image(&name);
        b.image(&name);
        let path = shared.mnt().join(&name);
        devices.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
             <target dev='{target}' bus='scsi'/></disk>",
            path.display()
        ));
    }
    a.define("many", &random_uuid(), &devices);
    b.define("one", &random_uuid(), &raw(&shared, Path::new("d40.raw"), "vda"));
    a.start_guest("many");
    // 64 disks and the guest's own lease: well past sanlock's 8 leases per acquire call.
    assert_eq!(a.exclusive_leases().len(), 65, "{:?}", a.sanlock_status());
    let err = b.refused("one");
    assert!(err.contains("d40.raw is locked exclusively through sanlock by host"), "{err}");
    a.lv.virsh_ok(&["destroy", "many"]);
    assert!(wait_until(Duration::from_secs(20), || a.held_leases().is_empty()), "all 65 released");
    b.start_guest("one");
    b.lv.virsh_ok(&["destroy", "one"]);
}
