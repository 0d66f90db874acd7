//! The built binary called as libvirt's hook, with fixture XML and a temp config and run dir.
//! No libvirtd: these check the hook/holder contract at the process level.

use std::path::Path;
use std::time::Duration;

use lockhook::lock::LockMode;

use crate::common::xml::domain as xml;
use crate::common::{lock_state, stderr, wait_until, Setup};

const UUID1: &str = "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab";
const UUID2: &str = "0e4c9a51-7a2f-4b83-9d4e-5f6a7b8c9d0e";

fn file_disk(path: &Path, target: &str, extra: &str) -> String {
    format!("<disk type='file' device='disk'><source file='{}'/><target dev='{target}'/>{extra}</disk>", path.display())
}

/// Whether process `pid` is gone or a zombie (an orphan nobody reaps where PID 1 does not).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
}

fn holder_pid(setup: &Setup, uuid: &str) -> u32 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(setup.run_dir.join(format!("{uuid}.json"))).expect("state file"))
            .expect("state JSON");
    state["holder_pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("holder_pid")
}

/// The parent of `pid`, from /proc/PID/stat (`None` once it is gone).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok())
}

/// The parent of `pid`, a live process.
fn parent_pid(pid: u32) -> u32 {
    parent_of(pid).expect("ppid")
}

/// The processes whose parent is `pid` (a process that exits while /proc is read is left out).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

fn fd_targets(pid: u32) -> Vec<(u32, String)> {
    let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("holder fd dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(e.path()).ok()?.display().to_string()))
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn prepare_holds_refuses_and_release_frees() {
    let setup = Setup::new("");
    let img = setup.image("images/a b é.img");
    let lease = setup.path("leases/l1");
    std::fs::create_dir_all(lease.parent().expect("parent")).expect("mkdir");
    let vm1 = xml(
        "vm1",
        UUID1,
        &format!(
            "{}<lease><lockspace>ls</lockspace><key>k1</key><target path='{}' offset='1024'/></lease>",
            file_disk(&img, "vda", ""),
            lease.display()
        ),
    );
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert!(out.status.success(), "prepare failed: {}", stderr(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "hook printed: {}", stderr(&out));
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    assert_eq!(lock_state(&lease, 1024), Some(LockMode::Exclusive), "lease file created and locked");

    // The holder: stdio on /dev/null, and nothing but its lock file, socket, images (+ log).
    let pid = holder_pid(&setup, UUID1);
    let fds = fd_targets(pid);
    for fd in 0..3 {
        assert_eq!(fds[fd].1, "/dev/null", "holder fd {fd}: {fds:?}");
    }
    let allowed = |t: &str| {
        t == "/dev/null"
            || t.starts_with("socket:")
            || t.ends_with(&format!("{UUID1}.lock"))
            || t == img.display().to_string()
            || t == lease.display().to_string()
            || t.ends_with("lockhook.log")
            // Owner records in the lockspace: each file carries the lock that keeps it live.
            || (t.contains("/lockspace/owners/") && t.ends_with(".json"))
            // The stable identity of the device holding the test's filesystem, when it is one.
            || (t.contains("/lockspace/block/") && t.ends_with(".lock"))
    };
    // The record thread opens the lockspace directory for a moment after the ACK (it publishes
    // the owner records): wait for it to be done, then nothing else may be open.
    let settled = wait_until(Duration::from_secs(5), || fd_targets(pid).iter().all(|(_, t)| allowed(t)));
    let fds = fd_targets(pid);
    assert!(settled, "unexpected holder fds: {fds:?}");
    assert!(fds.iter().any(|(_, t)| *t == img.display().to_string()), "holder holds the image: {fds:?}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let ppid_line = status.lines().find(|l| l.starts_with("PPid:")).expect("PPid");
    assert!(!ppid_line.ends_with(&format!("\t{}", std::process::id())), "holder is not our child");
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = sid[sid.rfind(')').expect(")") + 2..].split(' ').collect();
    assert_eq!(fields[3], pid.to_string(), "holder leads its own session");

    // A second guest on the same image is refused with one line naming vm1.
    let vm2 = xml("vm2", UUID2, &file_disk(&img, "vdb", ""));
    let out = setup.hook(&["vm2", "prepare", "begin", "-"], &vm2);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    let expected =
        format!("lockhook: {} is locked exclusively by guest vm1 ({UUID1}) on this host since ", img.display());
    assert!(err.starts_with(&expected), "got: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!setup.run_dir.join(format!("{UUID2}.json")).exists(), "no holder for the refused guest");

    // libvirt calls release for the refused guest: vm1 keeps its locks.
    let out = setup.hook(&["vm2", "release", "end", "-"], &vm2);
    assert!(out.status.success());
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));

    // status shows vm1, its resources, modes and since.
    let status = setup.status_json();
    let guests = status["guests"].as_array().expect("guests");
    assert_eq!(guests.len(), 1);
    assert_eq!(guests[0]["name"], "vm1");
    assert_eq!(guests[0]["uuid"], UUID1);
    assert_eq!(guests[0]["holder_alive"], true);
    // The image and the lease (besides the layers beneath them: the device holding the test's
    // filesystem, when it is one).
    let resources: Vec<&serde_json::Value> = guests[0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter(|r| r["roles"].as_array().is_some_and(|roles| roles.iter().all(|x| x["kind"] != "layer")))
        .collect();
    assert_eq!(resources.len(), 2);
    assert_eq!(resources[0]["mode"], "exclusive");
    assert!(resources[0]["since"].as_str().expect("since").ends_with('Z'));
    let text = String::from_utf8(setup.cli(&["status"]).stdout).expect("utf8");
    assert!(text.contains("guest vm1") && text.contains(&img.display().to_string()), "{text}");

    // release frees everything at once, and the holder is gone.
    let out = setup.hook(&["vm1", "release", "end", "destroyed"], &vm1);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lock_state(&img, 0), None);
    assert_eq!(lock_state(&lease, 1024), None);
    assert!(wait_until(Duration::from_secs(5), || exited(pid)));
    let out = setup.hook(&["vm2", "prepare", "begin", "-"], &vm2);
    assert!(out.status.success(), "vm2 may start now: {}", stderr(&out));
    let out = setup.hook(&["vm2", "release", "end", "-"], &vm2);
    assert!(out.status.success());
    assert_eq!(lock_state(&img, 0), None);
}

#[test]
fn release_of_unknown_guest_and_other_events_exit_zero_silently() {
    let setup = Setup::new("");
    let vm = xml("ghost", UUID2, "");
    for args in [
        ["ghost", "release", "end", "-"],
        ["ghost", "stopped", "end", "-"],
        ["ghost", "migrate", "begin", "-"],
        ["ghost", "restore", "begin", "-"],
        ["ghost", "attach", "begin", "-"],
        ["ghost", "some-future-op", "begin", "-"],
    ] {
        let out = setup.hook(&args, &vm);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{args:?} printed something");
    }
    // Release with XML that cannot be parsed is still a no-op.
    let out = setup.hook(&["ghost", "release", "end", "-"], "not xml");
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_input_gets_one_line_and_no_lock() {
    let setup = Setup::new("");
    let img = setup.image("a.img");
    for (what, input) in [
        ("empty", String::new()),
        ("truncated", format!("<domain><name>x</name><uuid>{UUID1}</uuid><devices><disk type='file'>")),
        ("bad uuid", "<domain><name>x</name><uuid>../../etc</uuid></domain>".to_owned()),
        ("no uuid", "<domain><name>x</name></domain>".to_owned()),
    ] {
        let out = setup.hook(&["x", "prepare", "begin", "-"], &input);
        assert_eq!(out.status.code(), Some(1), "{what}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(err.starts_with("lockhook: "), "{what}: {err}");
        assert!(out.stdout.is_empty());
    }
    // A guest whose second disk is missing takes no lock on the first.
    let missing = setup.path("missing.img");
    let vm = xml("vm1", UUID1, &format!("{}{}", file_disk(&img, "vda", ""), file_disk(&missing, "vdb", "")));
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.img"), "{}", stderr(&out));
    assert_eq!(lock_state(&img, 0), None, "all or nothing");
    // Too few arguments: a usage line, non-zero.
    let mut cmd = std::process::Command::new(&setup.hook);
    cmd.env("LOCKHOOK_CONFIG", &setup.config);
    let out = crate::common::run_with_stdin(cmd, b"", Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(stderr(&out).starts_with("lockhook: usage"), "{}", stderr(&out));
}

#[test]
fn readonly_and_shareable_take_shared_locks() {
    let setup = Setup::new("");
    let img = setup.image("shared.raw");
    let ro = |name: &str, uuid: &str, flag: &str| xml(name, uuid, &file_disk(&img, "vda", flag));
    let out = setup.hook(&["r1", "prepare", "begin", "-"], &ro("r1", UUID1, "<readonly/>"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = setup.hook(&["r2", "prepare", "begin", "-"], &ro("r2", UUID2, "<shareable/>"));
    assert!(out.status.success(), "shared + shared: {}", stderr(&out));
    assert_eq!(lock_state(&img, 0), Some(LockMode::Shared));
    let writer = xml("w", "11111111-2222-3333-4444-555555555555", &file_disk(&img, "vda", ""));
    let out = setup.hook(&["w", "prepare", "begin", "-"], &writer);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is locked shared by guest r"), "{}", stderr(&out));
    for (name, uuid, flag) in [("r1", UUID1, "<readonly/>"), ("r2", UUID2, "<shareable/>")] {
        assert!(setup.hook(&[name, "release", "end", "-"], &ro(name, uuid, flag)).status.success());
    }
    assert_eq!(lock_state(&img, 0), None);
}

/// The OFD locks on `path`'s inode, as the kernel lists them (`/proc/locks`).
fn ofd_locks_on(path: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).expect("meta").ino();
    lockhook::lock::proc_locks::read()
        .expect("/proc/locks")
        .iter()
        .filter(|e| e.ino == ino && e.kind == lockhook::lock::proc_locks::Kind::Ofd && e.covers(0))
        .count()
}

/// Issue 12: the guests of a host that lock one file shared hold one lock on it, not one each
/// (the kernel walks a file's lock list on every lock, unlock and close of it). The lock lasts
/// while any of them runs, whichever went first, and whether it went by `release` or by its
/// holder being killed; no writer gets in meanwhile, and nothing is left behind.
#[test]
fn guests_sharing_a_file_share_one_lock_on_it() {
    let setup = Setup::new("");
    let base = setup.image("base.raw");
    let uuid = |i: u32| format!("{i:08x}-1111-4000-8000-000000000000");
    let vm = |i: u32| xml(&format!("s{i}"), &uuid(i), &file_disk(&base, "vda", "<readonly/>"));
    // A holder offers a shared lock as `shares/<dev>-<ino>-<offset>` (written aside, then renamed).
    let entry = {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&base).expect("stat base");
        setup.run_dir.join("shares").join(format!("{:x}-{:x}-0", meta.dev(), meta.ino()))
    };
    for i in 0..4 {
        let out = setup.hook(&[&format!("s{i}"), "prepare", "begin", "-"], &vm(i));
        assert!(out.status.success(), "{}", stderr(&out));
        // The next one borrows the description its predecessors hold once its holder offered
        // it (after its answer to the hook): its entry, not just any file there (another shared
        // lock's entry, or one still being written, is not it).
        let offered = wait_until(Duration::from_secs(5), || entry.exists());
        assert!(offered, "s{i}'s holder offers its shared lock");
    }
    assert_eq!(ofd_locks_on(&base), 1, "4 guests, one lock in the kernel's list");
    let holders: Vec<u32> = (0..4).map(|i| holder_pid(&setup, &uuid(i))).collect();
    let shared_fds = |pid: u32| fd_targets(pid).iter().filter(|(_, t)| Path::new(t) == base).count();
    assert!(holders.iter().all(|&pid| shared_fds(pid) == 1), "every holder keeps its own fd to it");
    let writer = xml("w", UUID1, &file_disk(&base, "vda", ""));
    let refused = |why: &str| {
        let out = setup.hook(&["w", "prepare", "begin", "-"], &writer);
        assert_eq!(out.status.code(), Some(1), "{why}: {}", stderr(&out));
        assert!(stderr(&out).contains("is locked shared by guest s"), "{why}: {}", stderr(&out));
        assert!(setup.hook(&["w", "release", "end", "-"], &writer).status.success());
    };
    refused("all four run");
    // The first (whose fd the others borrowed) goes by `release`, the second by SIGKILL.
    assert!(setup.hook(&["s0", "release", "end", "-"], &vm(0)).status.success());
    assert_eq!(lock_state(&base, 0), Some(LockMode::Shared));
    refused("s0 released");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holders[1] as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill");
    assert!(wait_until(Duration::from_secs(5), || !Path::new(&format!("/proc/{}", holders[1])).exists()));
    assert_eq!(lock_state(&base, 0), Some(LockMode::Shared));
    refused("s1's holder killed");
    // A guest that comes now shares what is left (or offers its own), and the ones that stay
    // still exclude the writer after it went.
    let out = setup.hook(&["s4", "prepare", "begin", "-"], &vm(4));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ofd_locks_on(&base) <= 2, "at most the old description and a new one");
    for i in [1, 2, 3, 4] {
        assert!(setup.hook(&[&format!("s{i}"), "release", "end", "-"], &vm(i)).status.success());
        if i < 4 {
            refused("some still run");
        }
    }
    assert_eq!(lock_state(&base, 0), None, "the last one took the lock with it");
    let left = wait_until(Duration::from_secs(5), || {
        std::fs::read_dir(setup.run_dir.join("shares")).is_ok_and(|d| d.count() == 0)
    });
    assert!(
        left,
        "no offer outlives its guest: {:?}",
        std::fs::read_dir(setup.run_dir.join("shares")).map(|d| d.count())
    );
}

#[test]
fn holder_lets_go_when_its_qemu_dies() {
    let libvirt_run = tempfile::tempdir().expect("libvirt run dir");
    let setup = Setup::new(&format!("libvirt_run_dir = {:?}", libvirt_run.path()));
    let img = setup.image("q.img");
    // A stand-in QEMU: a process whose argv carries `-uuid <uuid>`, named by libvirt's pid file
    // written after it started (as libvirt does).
    let mut qemu = std::process::Command::new("sh")
        // `read` is a builtin: sh forks nothing that would share its argv or outlive it.
        .args(["-c", "read x", "-uuid", UUID1])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn stand-in qemu");
    std::fs::create_dir_all(libvirt_run.path().join("qemu")).expect("mkdir");
    std::fs::write(libvirt_run.path().join("qemu/vm1.pid"), qemu.id().to_string()).expect("pid file");
    let vm = xml("vm1", UUID1, &file_disk(&img, "vda", ""));
    assert!(setup.hook(&["vm1", "prepare", "begin", "-"], &vm).status.success());
    let out = setup.hook(&["vm1", "started", "begin", "-"], &vm);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(setup.status_json()["guests"][0]["qemu_pid"], qemu.id());
    // While QEMU runs, a stray release (e.g. after a refused second start) changes nothing.
    assert!(setup.hook(&["vm1", "release", "end", "-"], &vm).status.success());
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    assert!(setup
        .log()
        .contains(&format!("release of vm1 ({UUID1}) ignored: its QEMU (pid {}) still runs", qemu.id())));
    // The holder still serves: it knows its guest.
    assert_eq!(setup.status_json()["guests"][0]["qemu_pid"], qemu.id());
    qemu.kill().expect("kill qemu");
    qemu.wait().expect("reap");
    assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0).is_none()), "holder released after QEMU died");
    assert!(setup.log().contains("QEMU"), "logged why");
}

/// The pid of the spare holder for `setup`'s config, once it listens (the holders it forks keep
/// `--spare` in their argv, but not `spare.lock`).
fn spare_pid(setup: &Setup) -> Option<u32> {
    let config = setup.config.display().to_string();
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.contains(&b"--spare".as_slice())
            && args.contains(&config.as_bytes())
            && std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(Result::ok)
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.ends_with("spare.lock")))
            })
            && setup.run_dir.join("spare.sock").exists()
    })
}

/// The spare's pid, once one runs (within 5 s).
fn started_spare(setup: &Setup) -> u32 {
    assert!(wait_until(Duration::from_secs(5), || spare_pid(setup).is_some()), "a spare");
    spare_pid(setup).expect("spare")
}

/// A spare whose run directory was removed exits, even where the directory was made again and a
/// new spare's socket took the old name before the old spare looked (`rm -rf` and an install
/// within a second): one spare per run directory.
#[test]
fn a_spare_whose_socket_was_replaced_exits() {
    let setup = Setup::new("");
    let a = setup.image("a.img");
    let vm1 = xml("vm1", UUID1, &file_disk(&a, "vda", ""));
    assert!(setup.hook(&["vm1", "prepare", "begin", "-"], &vm1).status.success());
    let old = started_spare(&setup);
    let holder = holder_pid(&setup, UUID1);
    assert!(setup.hook(&["vm1", "release", "end", "-"], &vm1).status.success());
    assert!(wait_until(Duration::from_secs(5), || exited(holder)), "vm1's holder exited");
    // Within the spare's tick (1 s): the directory goes, and a start makes it and a spare anew.
    // (The census set goes first: it would outlive a directory that no longer names it.)
    lockhook::census::Census::remove(&lockhook::paths::Paths::new(&setup.run_dir));
    std::fs::remove_dir_all(&setup.run_dir).expect("rm -rf run dir");
    let b = setup.image("b.img");
    let vm2 = xml("vm2", UUID2, &file_disk(&b, "vda", ""));
    let out = setup.hook(&["vm2", "prepare", "begin", "-"], &vm2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(5), || spare_pid(&setup).is_some_and(|p| p != old)), "a new spare");
    assert!(wait_until(Duration::from_secs(5), || exited(old)), "the old spare {old} exited");
    assert!(setup.hook(&["vm2", "release", "end", "-"], &vm2).status.success());
}

/// A hook that gave up waiting for the spare's answer to its claim (and hung up) starts a holder
/// of its own: a spare that answers later must let go of the guest's name and serve nothing that
/// was queued behind the claim (here: an `acquire` with a locked fd).
#[test]
fn a_claim_its_hook_gave_up_on_is_not_served() {
    use lockhook::holder::{fdpass, protocol};
    use std::os::fd::AsFd;
    let setup = Setup::new("");
    let a = setup.image("a.img");
    let vm1 = xml("vm1", UUID1, &file_disk(&a, "vda", ""));
    assert!(setup.hook(&["vm1", "prepare", "begin", "-"], &vm1).status.success());
    let spare = started_spare(&setup);
    // vm1's holder is the hook's own (there was no spare yet): the spare's one child is ready.
    assert!(wait_until(Duration::from_secs(5), || children_of(spare).len() == 1), "a ready child");
    let ready = children_of(spare)[0];
    // The ready child is stopped while a "hook" claims it, queues its lock and hangs up.
    let stop = |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(ready as i32), sig).expect("signal");
    stop(nix::sys::signal::Signal::SIGSTOP);
    let img = setup.image("b.img");
    let lock = lockhook::lock::acquire(&img, LockMode::Exclusive, 0, lockhook::lock::Create::No).expect("lock");
    let uuid = lockhook::domain::Uuid::parse(UUID2).expect("uuid");
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let addr = nix::sys::socket::UnixAddr::new(&setup.run_dir.join("spare.sock")).expect("addr");
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr).expect("connect");
    let claim =
        protocol::encode_as(protocol::VERSION, &protocol::Request::Claim { uuid: uuid.clone() }).expect("claim");
    fdpass::send(sock.as_fd(), &claim, &[]).expect("send claim");
    let resource: lockhook::state::Resource = serde_json::from_value(serde_json::json!({
        "path": img, "key": format!("file:{}@0", img.display()), "mode": "exclusive",
        "roles": [{"kind": "disk", "target": "vda"}],
        "identity": lock.identity, "since": "2026-01-01T00:00:00Z", "create": "never"
    }))
    .expect("resource");
    let acquire = protocol::Request::Acquire {
        guest: protocol::Guest { name: "vm2".into(), uuid },
        resources: vec![resource],
        pending: vec![],
        incoming: false,
        sanlock: vec![],
        adopt: false,
    };
    let bytes = protocol::encode_as(protocol::VERSION, &acquire).expect("acquire");
    fdpass::send(sock.as_fd(), &bytes, &[lock.fd.as_fd()]).expect("send acquire");
    drop(sock);
    drop(lock);
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive), "the queued fd keeps it locked");
    stop(nix::sys::signal::Signal::SIGCONT);
    assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0).is_none()), "nobody kept the lock");
    assert!(wait_until(Duration::from_secs(5), || !Path::new(&format!("/proc/{ready}")).exists()), "it exited");
    for ext in ["sock", "lock", "json"] {
        assert!(!setup.run_dir.join(format!("{UUID2}.{ext}")).exists(), "no {ext} file left for vm2");
    }
    assert!(setup.log().contains("is gone"), "logged why");
    assert!(setup.hook(&["vm1", "release", "end", "-"], &vm1).status.success());
}

/// `prepare` claims the spare before it resolves and locks the guest's storage (issue 12). A
/// refused start lets the claimed holder go before its hook exits (the `release` that follows
/// finds none); a hook killed after its claim leaves no holder; a claimed holder waits for a hook
/// that takes longer than a connection may stay silent.
#[test]
fn an_early_claim_is_let_go_or_waited_for() {
    use std::process::Command;
    let setup = Setup::new("");
    let (a, b) = (setup.image("a.img"), setup.image("b.img"));
    let vm1 = xml("vm1", UUID1, &file_disk(&a, "vda", ""));
    assert!(setup.hook(&["vm1", "prepare", "begin", "-"], &vm1).status.success());
    let spare = started_spare(&setup);
    let ready = || Some(children_of(spare)).filter(|c| c.len() == 1).map(|c| c[0]);
    let gone = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    let no_files = || ["sock", "lock", "json"].iter().all(|ext| !setup.run_dir.join(format!("{UUID2}.{ext}")).exists());

    // Refused: vm1 holds a.img.
    assert!(wait_until(Duration::from_secs(5), || ready().is_some()), "a ready child");
    let first = ready().expect("ready");
    let refused = xml("vm2", UUID2, &file_disk(&a, "vda", ""));
    let out = setup.hook(&["vm2", "prepare", "begin", "-"], &refused);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(no_files(), "the claimed holder let go of vm2 before the hook exited");
    assert!(wait_until(Duration::from_secs(5), || gone(first)), "and exited");
    let out = setup.hook(&["vm2", "release", "end", "-"], &refused);
    assert!(out.status.success() && out.stderr.is_empty(), "release after the refusal: {}", stderr(&out));

    // Killed after its claim, before its locks were handed over.
    let vm2 = xml("vm2", UUID2, &file_disk(&b, "vda", ""));
    assert!(wait_until(Duration::from_secs(5), || ready().is_some_and(|c| c != first)), "the next ready child");
    let second = ready().expect("ready");
    let mut hook = setup.start_hook(&["vm2", "prepare", "begin", "-"], &vm2, "after-claim");
    assert!(
        wait_until(Duration::from_secs(10), || setup.run_dir.join(format!("{UUID2}.sock")).exists()),
        "the claimed child took vm2's name"
    );
    hook.kill().expect("kill hook");
    hook.wait().expect("reap hook");
    assert!(wait_until(Duration::from_secs(5), || gone(second) && no_files()), "the claimed holder let go and exited");
    assert_eq!(lock_state(&b, 0), None);

    // Stalled past a connection's timeout after its claim: the claimed holder still takes its locks.
    assert!(wait_until(Duration::from_secs(5), || ready().is_some_and(|c| c != second)), "the next ready child");
    let third = ready().expect("ready");
    let stall = lockhook::holder::CONN_TIMEOUT.as_secs() + 2;
    let mut slow = Command::new(&setup.hook);
    slow.args(["vm2", "prepare", "begin", "-"])
        .env("LOCKHOOK_CONFIG", &setup.config)
        .env("LOCKHOOK_FAULT", format!("after-claim:{stall}"));
    let out = crate::common::run_with_stdin(slow, vm2.as_bytes(), Duration::from_secs(stall + 20));
    assert!(out.status.success(), "a slow prepare: {}", stderr(&out));
    assert_eq!(holder_pid(&setup, UUID2), third, "the claimed child is vm2's holder");
    assert_eq!(lock_state(&b, 0), Some(LockMode::Exclusive));
    // Its age (the start grace) counts from the hand-over, not from the claim.
    let again = stderr(&setup.hook(&["vm2", "prepare", "begin", "-"], &vm2));
    assert!(
        ["(0 s ago)", "(1 s ago)"]
            .iter()
            .any(|age| again.contains(&format!("being started on this host already {age}"))),
        "{again}"
    );
    for (name, vm) in [("vm1", &vm1), ("vm2", &vm2)] {
        assert!(setup.hook(&[name, "release", "end", "-"], vm).status.success());
    }
    assert_eq!((lock_state(&a, 0), lock_state(&b, 0)), (None, None));
}

/// Two starts of one guest at once (libvirt runs none), crossed: both find no holder, one claims
/// the spare and stalls, the other takes the locks meanwhile. The claimer is refused and lets its
/// holder go; the other waits for that, then gets a holder: one start wins, with one holder.
#[test]
fn crossed_prepares_of_one_guest_give_one_holder() {
    let setup = Setup::new("");
    let (a, b) = (setup.image("a.img"), setup.image("b.img"));
    let vm1 = xml("vm1", UUID1, &file_disk(&a, "vda", ""));
    assert!(setup.hook(&["vm1", "prepare", "begin", "-"], &vm1).status.success());
    assert!(wait_until(Duration::from_secs(5), || spare_pid(&setup).is_some_and(|s| children_of(s).len() == 1)));
    let vm2 = xml("vm2", UUID2, &file_disk(&b, "vda", ""));
    let start = |fault: &str| setup.start_hook(&["vm2", "prepare", "begin", "-"], &vm2, fault);
    // The locker found no holder and sleeps (1 s) before its claim...
    let locker = start("before-claim:1");
    let asleep =
        || std::fs::read_to_string(format!("/proc/{}/wchan", locker.id())).is_ok_and(|w| w.contains("nanosleep"));
    assert!(wait_until(Duration::from_secs(10), asleep), "the locker stalls before its claim");
    // ...while the claimer claims, then sleeps (2 s) before it locks.
    let claimer = start("after-claim:2");
    assert!(
        wait_until(Duration::from_secs(10), || setup.run_dir.join(format!("{UUID2}.sock")).exists()),
        "the claimer claimed the spare"
    );
    let won = locker.wait_with_output().expect("reap locker");
    assert!(won.status.success(), "the start that took the locks wins: {}", stderr(&won));
    let lost = claimer.wait_with_output().expect("reap claimer");
    assert_eq!(lost.status.code(), Some(1), "the claimer is refused");
    assert_eq!(stderr(&lost).lines().count(), 1, "{}", stderr(&lost));
    let holder = holder_pid(&setup, UUID2);
    assert!(Path::new(&format!("/proc/{holder}")).exists());
    assert_eq!(lock_state(&b, 0), Some(LockMode::Exclusive));
    for (name, vm) in [("vm1", &vm1), ("vm2", &vm2)] {
        assert!(setup.hook(&[name, "release", "end", "-"], vm).status.success());
    }
    assert_eq!((lock_state(&a, 0), lock_state(&b, 0)), (None, None));
}

#[test]
fn the_next_start_claims_the_spare_holder() {
    let setup = Setup::new("");
    let (a, b) = (setup.image("a.img"), setup.image("b.img"));
    let vm1 = xml("vm1", UUID1, &file_disk(&a, "vda", ""));
    let vm2 = xml("vm2", UUID2, &file_disk(&b, "vda", ""));
    assert!(setup.hook(&["vm1", "prepare", "begin", "-"], &vm1).status.success());
    assert!(
        wait_until(Duration::from_secs(5), || spare_pid(&setup).is_some()),
        "a spare is started for the next start"
    );
    let spare = spare_pid(&setup).expect("spare");
    let fds = fd_targets(spare);
    assert!(
        fds.iter().all(|(_, t)| t == "/dev/null"
            || t.starts_with("socket:")
            || t.starts_with("pipe:")
            || t.ends_with("spare.lock")
            || t.ends_with("lockhook.log")),
        "spare fds: {fds:?}"
    );
    assert!(setup.hook(&["vm2", "prepare", "begin", "-"], &vm2).status.success());
    // The spare's ready child became vm2's holder; the spare stays (its pages shared with it).
    let holder = holder_pid(&setup, UUID2);
    assert_ne!(holder, spare, "vm2's holder is a new process");
    assert_eq!(parent_pid(holder), spare, "vm2's holder was forked by the spare");
    assert!(
        wait_until(Duration::from_secs(5), || children_of(spare).len() == 2),
        "the spare forked its next ready child: {:?}",
        children_of(spare)
    );
    assert_eq!(lock_state(&b, 0), Some(LockMode::Exclusive));
    let fds = fd_targets(holder);
    assert!(
        !fds.iter().any(|(_, t)| t.ends_with("spare.lock")),
        "the forked holder kept nothing of the spare: {fds:?}"
    );
    assert!(fds.iter().any(|(_, t)| *t == b.display().to_string()), "{fds:?}");
    assert_eq!(fds.iter().filter(|(_, t)| t.starts_with("socket:")).count(), 1, "only its own socket: {fds:?}");
    assert!(!fd_targets(spare).iter().any(|(_, t)| *t == b.display().to_string()), "the spare holds no lock");
    assert_eq!(spare_pid(&setup), Some(spare), "the spare stays, and stays the only one");
    for (name, vm) in [("vm1", &vm1), ("vm2", &vm2)] {
        assert!(setup.hook(&[name, "release", "end", "-"], vm).status.success());
    }
    assert_eq!(lock_state(&b, 0), None);
    // A spare goes away with its run directory.
    let last = spare_pid(&setup).expect("spare");
    // The census set lives in the kernel: removed first, as `Setup` would, since the directory
    // that names it goes.
    lockhook::census::Census::remove(&lockhook::paths::Paths::new(&setup.run_dir));
    std::fs::remove_dir_all(&setup.run_dir).expect("rm run dir");
    assert!(
        wait_until(Duration::from_secs(5), || !std::path::Path::new(&format!("/proc/{last}/cmdline")).exists()
            || std::fs::read(format!("/proc/{last}/cmdline")).map(|c| c.is_empty()).unwrap_or(true)),
        "spare exits"
    );
}

/// Issue 9: a destination holder waiting for a migration source whose QEMU never comes (its
/// `release` was lost) gives up after `migration::PENDING_BOUND` and says so; it never takes the
/// source's lock long after the migration failed. The "source" here is this test process: it
/// holds the lease and publishes the same guest's owner record for another host.
#[test]
fn a_pending_holder_without_qemu_gives_up() {
    let setup = Setup::new("");
    let lease = setup.path("leases/pending");
    std::fs::create_dir_all(lease.parent().expect("parent")).expect("mkdir");
    let source = lockhook::lock::acquire(&lease, LockMode::Exclusive, 4096, lockhook::lock::Create::IfMissing)
        .expect("the source's lease");
    let uuid = lockhook::domain::Uuid::parse(UUID1).expect("uuid");
    let key = lockhook::lockspace::file_key(&lease, 4096);
    let record = lockhook::lockspace::OwnerRecord {
        role: None,
        command: false,
        key,
        host: "source-host".into(),
        guest: "vm1".into(),
        uuid: uuid.clone(),
        mode: LockMode::Exclusive,
        since: "2026-12-01T00:00:00Z".into(),
        holder_pid: std::process::id(),
    };
    let _record = lockhook::lockspace::Lockspace::new(&setup.path("lockspace")).publish(&record).expect("record");
    let vm1 =
        xml("vm1", UUID1, &format!("<lease><key>k</key><target path='{}' offset='4096'/></lease>", lease.display()));
    // Without a `migrate` marker the lease is simply taken: refused.
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("by guest vm1 (f3fa73d4-1c2b-4e5f-8a9b-0123456789ab) on host source-host"));
    // With one (as `migrate begin` writes it), it is accepted as pending.
    let out = setup.hook(&["vm1", "migrate", "begin", "-"], &vm1);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", stderr(&out));
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert!(out.status.success(), "pending hand-over: {}", stderr(&out));
    assert!(!setup.run_dir.join(format!("{UUID1}.incoming")).exists(), "prepare consumed the marker");
    let pending = || setup.status_json()["guests"][0]["pending"].as_array().is_some_and(|p| p.len() == 1);
    assert!(pending(), "{}", setup.status_json());
    let pid = holder_pid(&setup, UUID1);
    let bound = lockhook::migration::PENDING_BOUND + Duration::from_secs(10);
    assert!(
        wait_until(bound, || setup.status_json()["guests"].as_array().is_some_and(Vec::is_empty)),
        "the waiting holder gave up: {}",
        setup.status_json()
    );
    assert!(setup.log().contains("gave up waiting for 1 resource(s) held by its migration source"), "{}", setup.log());
    // Its record goes before the process: a wait still blocked in the kernel until then would
    // be granted by a source letting go meanwhile (and let go of again as the process exits).
    assert!(wait_until(Duration::from_secs(10), || exited(pid)), "holder {pid} exited");
    drop(source);
    assert_eq!(lock_state(&lease, 4096), None, "nobody took the lease after the source let go");
}

/// The "source" of a migration for the tests below: this process holds `lease` at 4096 and
/// publishes guest vm1's owner record for it from another host.
struct FakeSource {
    _lock: lockhook::lock::HeldLock,
    _record: lockhook::lockspace::Published,
}

fn fake_source(setup: &Setup, lease: &Path) -> FakeSource {
    std::fs::create_dir_all(lease.parent().expect("parent")).expect("mkdir");
    let lock = lockhook::lock::acquire(lease, LockMode::Exclusive, 4096, lockhook::lock::Create::IfMissing)
        .expect("the source's lease");
    let record = lockhook::lockspace::OwnerRecord {
        role: None,
        command: false,
        key: lockhook::lockspace::file_key(lease, 4096),
        host: "source-host".into(),
        guest: "vm1".into(),
        uuid: lockhook::domain::Uuid::parse(UUID1).expect("uuid"),
        mode: LockMode::Exclusive,
        since: "2026-12-01T00:00:00Z".into(),
        holder_pid: std::process::id(),
    };
    let record = lockhook::lockspace::Lockspace::new(&setup.path("lockspace")).publish(&record).expect("record");
    FakeSource { _lock: lock, _record: record }
}

/// Issue 9 review: a restore's QEMU carries `-incoming` too, so a `migrate` marker left by a
/// failed migration must not let a restore of the same guest pass for the migration; and a
/// guest admitted with pending locks is checked at `started` even when its holder is gone.
#[test]
fn restores_and_dead_holders_do_not_pass_for_migrations() {
    let setup = Setup::new("");
    let lease = setup.path("leases/restore");
    let _source = fake_source(&setup, &lease);
    let vm1 =
        xml("vm1", UUID1, &format!("<lease><key>k</key><target path='{}' offset='4096'/></lease>", lease.display()));
    assert!(setup.hook(&["vm1", "migrate", "begin", "-"], &vm1).status.success());
    let out = setup.hook(&["vm1", "restore", "begin", "-"], &vm1);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", stderr(&out));
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert!(!out.status.success(), "a restore is not the migration the marker announced");
    assert!(stderr(&out).contains("on host source-host"), "{}", stderr(&out));
    let _ = setup.hook(&["vm1", "release", "end", "-"], &vm1);

    // Admitted as pending, then the holder dies before QEMU shows up.
    assert!(setup.hook(&["vm1", "migrate", "begin", "-"], &vm1).status.success());
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm1);
    assert!(out.status.success(), "{}", stderr(&out));
    let pid = holder_pid(&setup, UUID1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the holder");
    assert!(wait_until(Duration::from_secs(5), || !std::path::Path::new(&format!("/proc/{pid}")).exists()));
    let out = setup.hook(&["vm1", "started", "begin", "-"], &vm1);
    assert!(!out.status.success(), "started must not let a guest with unverified pending locks run");
    assert!(stderr(&out).contains("is not an incoming migration"), "{}", stderr(&out));
    let _ = setup.hook(&["vm1", "release", "end", "-"], &vm1);
    assert!(!setup.run_dir.join(format!("{UUID1}.admitted")).exists(), "release forgets the admission");
}

/// A file image needs no lockspace: without one (not created yet, not mounted), only what
/// cannot do without it (network disks, block devices) is refused; the device holding the
/// image's filesystem is a best-effort layer and is skipped.
#[test]
fn file_images_start_without_a_lockspace() {
    let setup = Setup::new("");
    std::fs::remove_dir_all(setup.path("lockspace")).expect("remove the lockspace");
    let img = setup.image("images/plain.img");
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &xml("vm1", UUID1, &file_disk(&img, "vda", "")));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    let _ = setup.hook(&["vm1", "release", "end", "-"], &xml("vm1", UUID1, ""));
}

/// Issue 12 (found measuring 1000 guests): a released guest leaves nothing in the run directory,
/// so a host running short-lived guests does not collect a lock file per guest ever started;
/// and the next start of the same guest still gets a holder.
#[test]
fn a_released_guest_leaves_no_files_behind() {
    let setup = Setup::new("");
    let img = setup.image("images/short.img");
    let vm = xml("vm1", UUID1, &file_disk(&img, "vda", ""));
    for round in 0..2 {
        let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm);
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        assert!(setup.run_dir.join(format!("{UUID1}.lock")).exists());
        let out = setup.hook(&["vm1", "release", "end", "-"], &vm);
        assert!(out.status.success());
        assert!(
            wait_until(Duration::from_secs(5), || !setup.run_dir.join(format!("{UUID1}.lock")).exists()),
            "round {round}: the instance lock file is gone"
        );
        assert!(
            !setup.run_dir.join(format!("{UUID1}.json")).exists()
                && !setup.run_dir.join(format!("{UUID1}.sock")).exists()
        );
        assert_eq!(lock_state(&img, 0), None);
    }
}

/// A start whose holder cannot start (here: a directory stands where its socket goes) leaves no
/// lock and no lease file it created, as a refused start does.
#[test]
fn a_holder_that_cannot_start_leaves_no_lease_file() {
    let setup = Setup::new("");
    std::fs::create_dir_all(setup.run_dir.join(format!("{UUID1}.sock/x"))).expect("plant a directory");
    let lease = setup.path("leases/new.lease");
    std::fs::create_dir_all(lease.parent().expect("parent")).expect("mkdir");
    let vm =
        xml("vm1", UUID1, &format!("<lease><key>k</key><target path='{}' offset='4096'/></lease>", lease.display()));
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot start its lock holder") && err.lines().count() == 1, "{err}");
    assert!(!lease.exists(), "the lease file created for the failed start is gone");
}

/// Issue 14: `lockhook metrics` is valid Prometheus text exposition (checked with the Python
/// client's parser) and counts what the holders hold; `--textfile` writes the same atomically.
#[test]
#[ignore = "needs python3-prometheus-client (its parser): tests/run-all.sh installs it"]
fn metrics_parse_and_count_what_is_held() {
    let setup = Setup::new("");
    let img = setup.image("images/m.img");
    let lease = setup.path("leases/m.lease");
    std::fs::create_dir_all(lease.parent().expect("parent")).expect("mkdir");
    let devices = format!(
        "{}<lease><key>k</key><target path='{}' offset='4096'/></lease>",
        file_disk(&img, "vda", "<readonly/>"),
        lease.display()
    );
    let vm = xml("vm1", UUID1, &devices);
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm);
    assert!(out.status.success(), "{}", stderr(&out));
    // A refused start is counted (since boot: the run directory's counters).
    let other =
        xml("vm2", UUID2, &format!("<lease><key>k</key><target path='{}' offset='4096'/></lease>", lease.display()));
    let out = setup.hook(&["vm2", "prepare", "begin", "-"], &other);
    assert!(!out.status.success(), "vm2 refused");
    let out = setup.hook(&["vm2", "release", "end", "-"], &other);
    assert!(out.status.success());
    let parse = |text: &[u8]| {
        let mut child = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as p\n\
                 for f in p(sys.stdin.read()):\n    for s in f.samples:\n        \
                 print(s.name + ','.join(k + '=' + v for k, v in sorted(s.labels.items())), int(s.value))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), text).expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "the parser refused it: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    };
    let out = setup.cli(&["metrics"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let samples = parse(&out.stdout);
    for want in [
        "lockhook_guestskind=guest,state=held 1",
        "lockhook_resourceskind=disk,mode=shared 1",
        "lockhook_resourceskind=lease,mode=exclusive 1",
        "lockhook_pending_handovers 0",
        &format!("lockhook_holdersversion={} 1", env!("CARGO_PKG_VERSION")),
        "lockhook_refusals_total 1",
        "lockhook_readoptions_total 0",
    ] {
        assert!(samples.lines().any(|l| l == want), "{want} in:\n{samples}");
    }
    let file = setup.path("textfile/lockhook.prom");
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    let out = setup.cli(&["metrics", "--textfile", file.to_str().expect("utf8")]);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", stderr(&out));
    assert_eq!(parse(&std::fs::read(&file).expect("textfile")), samples);
    let out = setup.hook(&["vm1", "release", "end", "-"], &vm);
    assert!(out.status.success());
}

/// Issue 12: after any number of guests come and go (transient guests with new UUIDs, refused
/// starts, holders killed), the run directory holds only per-host files, the census is
/// balanced again (so hook calls skip the re-adoption scan), and at most one spare runs.
#[test]
fn churn_leaves_only_per_host_files_and_a_balanced_census() {
    let setup = Setup::new("");
    let paths = lockhook::paths::Paths::new(&setup.run_dir);
    let held = setup.image("images/held.img");
    let keeper = xml("keeper", UUID2, &file_disk(&held, "vda", ""));
    let out = setup.hook(&["keeper", "prepare", "begin", "-"], &keeper);
    assert!(out.status.success(), "{}", stderr(&out));
    let uuid = |i: u32| format!("{i:08x}-0000-4000-8000-000000000000");
    for i in 0..24u32 {
        let name = format!("t{i}");
        let img = setup.image(&format!("images/t{i}.img"));
        // Every third guest wants the held image too: refused, then released as libvirt does.
        let disks = if i % 3 == 0 {
            format!("{}{}", file_disk(&img, "vda", ""), file_disk(&held, "vdb", ""))
        } else {
            file_disk(&img, "vda", "")
        };
        let vm = xml(&name, &uuid(i), &disks);
        let out = setup.hook(&[&name, "prepare", "begin", "-"], &vm);
        assert_eq!(out.status.success(), i % 3 != 0, "t{i}: {}", stderr(&out));
        if i % 4 == 1 && i % 3 != 0 {
            // A holder killed before its guest ran: the next hook call finds it dead.
            let pid = holder_pid(&setup, &uuid(i));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
                .expect("kill");
            assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0).is_none()), "t{i}'s holder died");
            assert!(!lockhook::census::nothing_died(&paths), "the census saw t{i}'s holder die");
        }
        let out = setup.hook(&[&name, "release", "end", "-"], &vm);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = setup.hook(&["keeper", "release", "end", "-"], &keeper);
    assert!(out.status.success());
    // One more hook call deals with whatever died last.
    let out = setup.hook(&["keeper", "release", "end", "-"], &keeper);
    assert!(out.status.success());
    // `shares` holds the offers of shared locks of running guests (none are left running).
    let per_host = ["census", "census.lock", "counters", "serials", "shares", "spare.lock", "spare.sock"];
    let left = || {
        let list = |dir: &std::path::Path, prefix: &str| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.filter_map(|e| Some(format!("{prefix}{}", e.ok()?.file_name().into_string().ok()?))).collect()
                })
                .unwrap_or_default()
        };
        let mut names = list(&setup.run_dir, "");
        names.extend(list(&setup.run_dir.join("shares"), "shares/"));
        names.sort();
        names
    };
    let settled = wait_until(Duration::from_secs(10), || left().iter().all(|n| per_host.contains(&n.as_str())));
    assert!(settled, "left in the run dir after 24 guests came and went: {:?}", left());
    assert!(lockhook::census::nothing_died(&paths), "the census is balanced again");
    let spares = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == setup.run_dir.join("spare.lock")))
            })
        })
        .count();
    assert!(spares <= 1, "{spares} spares hold spare.lock");
}

/// Whether `pid` ignores SIGPIPE (`SigIgn` in /proc/PID/status).
fn ignores_sigpipe(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let mask = status.lines().find_map(|l| l.strip_prefix("SigIgn:")).expect("SigIgn line").trim();
    u64::from_str_radix(mask, 16).expect("hex mask") & (1 << (libc::SIGPIPE - 1)) != 0
}

/// lockhook starts without std's runtime start-up (`main.rs`): what of it matters is kept. A
/// hook started with stdout and stderr closed gets /dev/null there, not the first file it opens
/// (here its log file, which `eprintln!` would then write into), and hooks and holders ignore
/// SIGPIPE.
#[test]
fn processes_start_with_open_stdio_and_sigpipe_ignored() {
    let setup = Setup::new("");
    let img = setup.image("images/pipe.img");
    let vm = xml("vm1", UUID1, &file_disk(&img, "vda", ""));
    let out = setup.hook(&["vm1", "prepare", "begin", "-"], &vm);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ignores_sigpipe(holder_pid(&setup, UUID1)), "the holder ignores SIGPIPE");
    let other = setup.path("vm2.xml");
    std::fs::write(&other, xml("vm2", UUID2, &file_disk(&setup.image("images/pipe2.img"), "vda", ""))).expect("xml");
    let mut hook = std::process::Command::new("sh")
        .args(["-c", r#"exec "$0" vm2 prepare begin - <"$1" >&- 2>&-"#])
        .arg(&setup.hook)
        .arg(&other)
        .env("LOCKHOOK_CONFIG", &setup.config)
        .env("LOCKHOOK_FAULT", "before-claim")
        .spawn()
        .expect("spawn the hook");
    let pid = hook.id();
    let log = setup.path("lockhook.log");
    let has_open = |target: &Path| fd_targets(pid).iter().any(|(_, t)| Path::new(t) == target);
    // Stalled before its claim, with its log file open (it logs from the start).
    assert!(wait_until(Duration::from_secs(5), || has_open(&log)), "the hook opened its log file");
    let fds = fd_targets(pid);
    for fd in [1, 2] {
        let target = fds.iter().find(|(n, _)| *n == fd).map(|(_, t)| t.as_str());
        assert_eq!(target, Some("/dev/null"), "fd {fd} of a hook started with it closed: {fds:?}");
    }
    assert!(ignores_sigpipe(pid), "the hook ignores SIGPIPE");
    hook.kill().expect("kill the stalled hook");
    hook.wait().expect("reap");
    let out = setup.hook(&["vm1", "release", "end", "-"], &vm);
    assert!(out.status.success(), "{}", stderr(&out));
}
