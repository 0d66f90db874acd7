//! lockhook's sanlock API (`lockhook::sanlock`) against real sanlock daemons, each started by
//! the test in a private run directory (`common::sanlock`): two simulated hosts sharing one lease
//! area, and one host on its own for client-side behaviour (orphans, CLOEXEC, limits).
//!
//! The test process talks to host one's daemon through the API and to host two's through
//! `sanlock client`, sanlock's own tool, so each direction of a refusal is checked against an
//! independent implementation. Lockspaces are written with a 3 s io_timeout so that joining takes
//! seconds, not the ≈20 s of the default 10 s.
//!
//! Declare the daemon before any `Client`: dropping the daemon force-stops it, and sanlock
//! SIGKILLs clients that still hold leases in a lockspace when it does (that would be this test
//! process).

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lockhook::lock::LockMode;
use lockhook::sanlock::{
    AcquireOptions, Code, Disk, Geometry, HostState, Lease, LeaseRequest, Lockspace, Membership, Name, Rindex, Sanlock,
    SanlockError, MAX_RESOURCES,
};
use nix::errno::Errno;

use crate::common::sanlock::{Holder, SanlockDaemon};
use crate::common::wait_until;

const IO_TIMEOUT: u32 = 3;
const GEOMETRY: Geometry = Geometry::Sector512Align1M;
const MIB: u64 = 1 << 20;
/// Joining waits for the host id to be seen free for a while: about 2 × io_timeout, more on a
/// busy machine.
const JOIN_TIMEOUT: Duration = Duration::from_secs(90);
/// An acquire of a lease whose owner is alive waits up to one renewal (2 × io_timeout) to see the
/// owner renew; seeing a holder appear or leave on disk takes at most a few renewals.
const LEASE_TIMEOUT: Duration = Duration::from_secs(30);

fn load(daemon: &SanlockDaemon) -> Sanlock {
    daemon.bind_this_process();
    Sanlock::load().expect("libsanlock_client.so.1 (Debian package libsanlock1)")
}

fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path).expect("create").set_len(len).expect("truncate");
}

fn request(lease: &Lease, mode: LockMode) -> LeaseRequest {
    LeaseRequest { lease: lease.clone(), mode, lver: None }
}

fn owner_ids(sl: &Sanlock, lease: &Lease) -> Vec<u64> {
    let mut ids: Vec<u64> =
        sl.read_resource_owners(lease).expect("read owners").hosts.iter().map(|h| h.host_id).collect();
    ids.sort_unstable();
    ids
}

fn lockspace_arg(ls: &Lockspace) -> String {
    format!("{}:{}:{}:{}", ls.name, ls.host_id, ls.disk.path.display(), ls.disk.offset)
}

/// Writes a lockspace named `name` at offset 0 of a fresh 64 MiB area file.
fn new_lockspace(sl: &Sanlock, area: &Path, name: &str) -> Name {
    sparse_file(area, 64 * MIB);
    let name = Name::new(name).expect("name");
    let disk = Disk::new(area, 0);
    let err = sl.read_lockspace(&disk).expect_err("nothing written yet");
    assert_eq!(err.code(), Some(Code::Sanlock(-223)), "an empty area is LEADER_MAGIC: {err}");
    sl.write_lockspace(&name, &disk, GEOMETRY, IO_TIMEOUT).expect("write lockspace");
    let info = sl.read_lockspace(&disk).expect("read lockspace");
    assert_eq!((&info.name, info.io_timeout, info.geometry), (&name, IO_TIMEOUT, GEOMETRY));
    name
}

#[test]
#[ignore = "needs root and a private sanlock daemon: tests/run-all.sh runs it"]
fn sanlock_two_hosts_exclude_each_other() {
    let one = SanlockDaemon::start("lockhook-host-one");
    let two = SanlockDaemon::start("lockhook-host-two");
    let sl = load(&one);
    let version = sl.version().expect("daemon version");
    assert_eq!(version.major, 3, "sanlock {version}");

    // One lease area both hosts reach: lockspace at 0, resource index at 1 MiB, its leases from
    // 3 MiB; and a lease of its own file, as libvirt's disk leases are.
    let area = one.path("lease-area");
    let ls_name = new_lockspace(&sl, &area, "lockhook-test");
    let lease_file = one.path("disk-lease");
    sparse_file(&lease_file, MIB);
    let standalone =
        Lease { lockspace: ls_name.clone(), name: Name::fit("standalone"), disk: Disk::new(&lease_file, 0) };
    sl.write_resource(&standalone, GEOMETRY).expect("init the lease");
    let owners = sl.read_resource_owners(&standalone).expect("owners of a new lease");
    assert!(owners.hosts.is_empty() && !owners.shared, "{owners:?}");

    // Before joining, an acquire is refused with ENOSPC, and that is not "busy".
    let mut client = sl.register().expect("register");
    let err = client.acquire(&[request(&standalone, LockMode::Exclusive)], &AcquireOptions::default());
    let err = err.expect_err("acquire before joining");
    assert_eq!(err.code(), Some(Code::NotJoined), "{err}");
    assert!(!err.is_busy());

    // Both hosts join at once: host one through the API, host two through sanlock's tool.
    let ls1 = Lockspace { name: ls_name.clone(), host_id: 1, disk: Disk::new(&area, 0) };
    let ls2 = Lockspace { host_id: 2, ..ls1.clone() };
    assert_eq!(sl.inq_lockspace(&ls1).expect("inq"), Membership::Absent);
    let mut join2 = two
        .cli()
        .args(["add_lockspace", "-o", &IO_TIMEOUT.to_string(), "-s", &lockspace_arg(&ls2)])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn add_lockspace");
    let started = Instant::now();
    sl.add_lockspace(&ls1, IO_TIMEOUT).expect("join as host 1");
    eprintln!("host 1 joined in {:.1?}", started.elapsed());
    assert!(wait_until(JOIN_TIMEOUT, || join2.try_wait().expect("wait").is_some()), "host 2 joined");
    assert!(join2.wait().expect("status").success(), "host 2 join:\n{}", two.log());
    assert_eq!(sl.inq_lockspace(&ls1).expect("inq"), Membership::Joined);
    let again = sl.add_lockspace(&ls1, IO_TIMEOUT).expect_err("joining twice");
    assert_eq!(again.code(), Some(Code::Exists), "{again}");

    // The resource index allocates leases by name, one align size each after its two.
    let rindex = Rindex { lockspace: ls_name.clone(), disk: Disk::new(&area, MIB) };
    sl.format_rindex(&rindex, GEOMETRY, 0).expect("format rindex");
    let name_a = Name::fit("vm-a");
    let name_b = Name::fit("block:wwn-0x5000c500a1b2c3d4:a key too long and too colourful to be a name");
    assert!(name_b.is_hashed());
    assert_eq!(sl.lookup_rindex(&rindex, &name_a).expect("lookup"), None);
    let offset_a = sl.create_resource(&rindex, &name_a).expect("create a");
    let offset_b = sl.create_resource(&rindex, &name_b).expect("create b");
    assert_eq!((offset_a, offset_b), (3 * MIB, 4 * MIB));
    assert_eq!(sl.lookup_rindex(&rindex, &name_a).expect("lookup a"), Some(offset_a));
    assert_eq!(sl.lookup_rindex(&rindex, &name_b).expect("lookup b"), Some(offset_b));
    let lease_a = Lease { lockspace: ls_name.clone(), name: name_a.clone(), disk: Disk::new(&area, offset_a) };
    let lease_b = Lease { lockspace: ls_name.clone(), name: name_b, disk: Disk::new(&area, offset_b) };

    // Host one: lease a exclusive and the standalone lease shared, in one acquire.
    let options = AcquireOptions { owner_name: Some(Name::fit("guest-a")), ..AcquireOptions::default() };
    client
        .acquire(&[request(&lease_a, LockMode::Exclusive), request(&standalone, LockMode::Shared)], &options)
        .expect("acquire on host 1");
    let mut held = client.inquire().expect("inquire");
    held.sort_by(|x, y| x.lease.name.cmp(&y.lease.name));
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!((&held[0].lease, held[0].mode), (&standalone, LockMode::Shared));
    assert_eq!((&held[1].lease, held[1].mode), (&lease_a, LockMode::Exclusive));
    assert!(held[1].lver.is_some_and(|v| v >= 1), "{held:?}");
    let owners_a = sl.read_resource_owners(&lease_a).expect("owners of a");
    assert_eq!((owners_a.hosts.iter().map(|h| h.host_id).collect::<Vec<_>>(), owners_a.shared), (vec![1], false));

    // Host two is refused lease a: sanlock's own client reports IDLIVE.
    let out = two.cli().args(["command", "-r", &lease_a.to_string(), "-c", "/bin/true"]).output().expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("-243"), "host 2 must be refused lease a with -243: {text}");

    // Host two takes the standalone lease shared beside host one, and lease b exclusively.
    let mut holder2 = Holder(
        two.cli()
            .args(["command", "-r", &format!("{standalone}:SH"), "-r", &lease_b.to_string(), "-c", "/bin/sleep", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn host 2 holder"),
    );
    let took = wait_until(LEASE_TIMEOUT, || {
        assert!(holder2.0.try_wait().expect("wait").is_none(), "host 2's holder exited:\n{}", two.log());
        owner_ids(&sl, &lease_b) == [2]
    });
    assert!(took, "host 2 holds lease b");
    let owners = sl.read_resource_owners(&standalone).expect("owners of the shared lease");
    assert!(owners.shared, "{owners:?}");
    assert_eq!(owner_ids(&sl, &standalone), [1, 2]);

    // Host one is refused lease b with IDLIVE, typed, and all or nothing: the free lease asked for
    // in the same call is not left held.
    let offset_c = sl.create_resource(&rindex, &Name::fit("vm-c")).expect("create c");
    let lease_c = Lease { lockspace: ls_name.clone(), name: Name::fit("vm-c"), disk: Disk::new(&area, offset_c) };
    let mut other = sl.register().expect("a second client");
    let err = other
        .acquire(&[request(&lease_c, LockMode::Exclusive), request(&lease_b, LockMode::Exclusive)], &options)
        .expect_err("lease b is host 2's");
    assert_eq!(err.code(), Some(Code::HeldByLiveHost), "{err}");
    assert!(err.is_busy());
    assert!(lockhook::error_chain(&err).contains("IDLIVE"), "{}", lockhook::error_chain(&err));
    assert!(owner_ids(&sl, &lease_c).is_empty(), "lease c released after the failed acquire");
    assert!(other.inquire().expect("inquire").is_empty());

    // Exclusive on a lease held shared (here by another client of this host): refused, busy.
    let err = other.acquire(&[request(&standalone, LockMode::Exclusive)], &options).expect_err("held shared");
    assert!(err.is_busy(), "{err}");

    // This host's daemon sees both hosts alive.
    let live = wait_until(LEASE_TIMEOUT, || {
        let hosts = sl.get_hosts(&ls_name, None).expect("get_hosts");
        [1, 2].iter().all(|id| hosts.iter().any(|h| h.host_id == *id && h.state == HostState::Live))
    });
    assert!(live, "hosts 1 and 2 live: {:?}", sl.get_hosts(&ls_name, None));
    let host2 = sl.get_hosts(&ls_name, Some(2)).expect("get host 2");
    assert_eq!(host2.len(), 1, "{host2:?}");
    assert!(host2[0].generation >= 1 && host2[0].timestamp > 0, "{host2:?}");

    // Released: lease a is free on disk and host two may take it.
    client.release(std::slice::from_ref(&lease_a)).expect("release a");
    assert!(owner_ids(&sl, &lease_a).is_empty());
    two.cli_ok(&["command", "-r", &lease_a.to_string(), "-c", "/bin/true"]);

    // A dropped client's leases are released by the daemon (the connection closed).
    drop(client);
    assert!(wait_until(LEASE_TIMEOUT, || owner_ids(&sl, &standalone) == [2]), "only host 2 left on the shared lease");
    holder2.kill();
    assert!(wait_until(LEASE_TIMEOUT, || owner_ids(&sl, &lease_b).is_empty()), "host 2's holder died: lease b free");

    // Deleting from the index.
    sl.delete_resource(&rindex, &name_a).expect("delete a");
    assert_eq!(sl.lookup_rindex(&rindex, &name_a).expect("lookup a"), None);
    let err = sl.delete_resource(&rindex, &name_a).expect_err("delete twice");
    assert_eq!(err.code(), Some(Code::Os(Errno::ENOENT)), "{err}");

    drop(other);
    sl.rem_lockspace(&ls1, true).expect("leave");
    assert_eq!(sl.inq_lockspace(&ls1).expect("inq"), Membership::Absent);
    // Outside the lockspace the index can still be read, but not changed: sanlock says ENOENT
    // (no such lockspace here), not the ENOSPC an acquire gets.
    assert_eq!(sl.lookup_rindex(&rindex, &lease_b.name).expect("lookup after leaving"), Some(offset_b));
    let err = sl.create_resource(&rindex, &Name::fit("vm-d")).expect_err("create outside the lockspace");
    assert_eq!(err.code(), Some(Code::Os(Errno::ENOENT)), "{err}");
    two.cli_ok(&["rem_lockspace", "-s", &lockspace_arg(&ls2)]);
}

#[test]
#[ignore = "needs root and a private sanlock daemon: tests/run-all.sh runs it"]
fn sanlock_client_orphans_limits_and_cloexec() {
    let solo = SanlockDaemon::start("lockhook-solo");
    let sl = load(&solo);
    let area = solo.path("lease-area");
    let ls_name = new_lockspace(&sl, &area, "lockhook-solo");
    let ls = Lockspace { name: ls_name.clone(), host_id: 7, disk: Disk::new(&area, 0) };
    sl.add_lockspace(&ls, IO_TIMEOUT).expect("join");
    let lease = |name: &str, offset: u64| Lease {
        lockspace: ls_name.clone(),
        name: Name::fit(name),
        disk: Disk::new(&area, offset),
    };
    let (a, b) = (lease("a", 2 * MIB), lease("b", 3 * MIB));
    sl.write_resource(&a, GEOMETRY).expect("init a");
    sl.write_resource(&b, GEOMETRY).expect("init b");

    // The registered socket is close-on-exec: a child does not inherit it.
    let mut client = sl.register().expect("register");
    let fd = client.as_fd().as_raw_fd();
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
    assert_ne!(flags & libc::FD_CLOEXEC, 0, "FD_CLOEXEC on the sanlock socket");
    let socket = std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("readlink");
    let child_fds = std::process::Command::new("sh")
        .args(["-c", "for f in /proc/$$/fd/*; do readlink \"$f\"; done"])
        .output()
        .expect("sh");
    let child_fds = String::from_utf8_lossy(&child_fds.stdout);
    assert!(!child_fds.contains(&*socket.to_string_lossy()), "child inherited {}: {child_fds}", socket.display());

    // Limits are checked before asking the daemon.
    let nine: Vec<LeaseRequest> = (0..9).map(|i| request(&lease(&format!("l{i}"), 0), LockMode::Shared)).collect();
    let err = client.acquire(&nine, &AcquireOptions::default()).expect_err("nine leases");
    assert!(matches!(err, SanlockError::TooManyLeases { count: 9 }), "{err}");
    let long = Path::new("/").join("k".repeat(127));
    assert!(matches!(client.set_killpath(&long, ""), Err(SanlockError::TooLong { .. })));
    client.set_killpath(Path::new("/bin/true"), "lockhook-test").expect("killpath");

    // 8 leases per call, but not per client (sanlock >= 3.1): one client holds 16 in two calls.
    let many: Vec<Lease> = (0..16).map(|i| lease(&format!("many-{i}"), (4 + i) * MIB)).collect();
    for l in &many {
        sl.write_resource(l, GEOMETRY).expect("init");
    }
    let mut batches = sl.register().expect("register");
    for chunk in many.chunks(MAX_RESOURCES) {
        let requests: Vec<LeaseRequest> = chunk.iter().map(|l| request(l, LockMode::Exclusive)).collect();
        batches.acquire(&requests, &AcquireOptions::default()).expect("a batch of 8");
    }
    assert_eq!(batches.inquire().expect("inquire").len(), 16);
    assert_eq!(owner_ids(&sl, &many[15]), [7]);
    drop(batches);
    assert!(wait_until(LEASE_TIMEOUT, || owner_ids(&sl, &many[15]).is_empty()), "released with the client");

    // Persistent leases: a second client of this host is refused a (EEXIST, busy) but may share b.
    let persistent = AcquireOptions { persistent: true, ..AcquireOptions::default() };
    client
        .acquire(&[request(&a, LockMode::Exclusive), request(&b, LockMode::Shared)], &persistent)
        .expect("acquire persistent");
    let mut second = sl.register().expect("second client");
    let err = second.acquire(&[request(&a, LockMode::Exclusive)], &persistent).expect_err("a is held");
    assert_eq!(err.code(), Some(Code::Exists), "{err}");
    assert!(err.is_busy());
    second.acquire(&[request(&b, LockMode::Shared)], &persistent).expect("b shared twice on one host");
    second.release(std::slice::from_ref(&b)).expect("release b");

    // Leaving a lockspace in use is refused when asked to spare its users.
    let err = sl.rem_lockspace(&ls, true).expect_err("in use");
    assert_eq!(err.code(), Some(Code::Os(Errno::EBUSY)), "{err}");

    // The client dies: its persistent leases stay held by the host, as orphans (once the daemon
    // has noticed the connection close: until then it is still the dead client's).
    drop(client);
    let mut refusal = None;
    let noticed =
        wait_until(LEASE_TIMEOUT, || match second.acquire(&[request(&a, LockMode::Exclusive)], &persistent) {
            Err(err) if err.code() == Some(Code::Exists) => false,
            other => {
                refusal = Some(other);
                true
            }
        });
    assert!(noticed, "the daemon noticed the client's death");
    let err = refusal.expect("set").expect_err("a is an orphan");
    assert_eq!(err.code(), Some(Code::Orphan), "{err}");
    assert!(!err.is_busy());
    assert_eq!(owner_ids(&sl, &a), [7], "an orphan is still held on disk");
    let adopt = AcquireOptions { adopt_orphans: true, ..persistent.clone() };
    second.acquire(&[request(&a, LockMode::Exclusive)], &adopt).expect("adopt a");
    second.acquire(&[request(&b, LockMode::Shared)], &adopt).expect("adopt b");
    let held = second.inquire().expect("inquire");
    assert_eq!(held.len(), 2, "{held:?}");

    second.release_all().expect("release all");
    assert!(second.inquire().expect("inquire").is_empty());
    assert!(owner_ids(&sl, &a).is_empty() && owner_ids(&sl, &b).is_empty());
    sl.rem_lockspace(&ls, true).expect("leave");
    drop(second);

    // No daemon: connecting fails with an errno, not a sanlock code.
    drop(solo);
    let err = sl.version().expect_err("daemon stopped");
    assert!(
        matches!(err.code(), Some(Code::Os(Errno::ENOENT | Errno::ECONNREFUSED))),
        "{}",
        lockhook::error_chain(&err)
    );
}
