//! Issue 4 end to end: the guard for tools outside libvirt (`check`, `run`), hot-plug, and
//! self-healing holders (`reconcile`), on a real libvirtd.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lockhook::lock::LockMode;

use crate::common::host::Host;
use crate::common::xml::raw;
use crate::common::{lock_state, lockhook_bin, stderr, wait_until};

/// Helpers this file adds to the shared test host.
impl Host {
    /// `lockhook run PATH -- sh -c 'read x'`: holds PATH until a line is written to its stdin.
    fn run_until_told(&self, path: &Path) -> std::process::Child {
        Command::new(lockhook_bin())
            .arg("--config")
            .arg(&self.setup.config)
            .arg("run")
            .arg(path)
            .args(["--", "sh", "-c", "read x"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn lockhook run")
    }

    /// `lockhook ARGS` inside the test host (where libvirt's status files are).
    fn lockhook_in_ns(&self, args: &[&str]) -> std::process::Output {
        let bin = lockhook_bin().display().to_string();
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        self.lv.exec_in_ns(&argv)
    }

    fn holder_pid(&self, uuid: &str) -> Option<i32> {
        let status = self.setup.status_json();
        status["guests"].as_array()?.iter().find(|g| g["uuid"] == uuid && g["holder_alive"] == true)?["holder_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
    }
}

fn kill(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn check_and_run_guard_images_against_guests() {
    let host = Host::new();
    let img = host.setup.image("images/a.raw");
    let free = host.setup.image("images/free.raw");
    let uuid1 = host.define("vm1", &raw(&img, "vda"));
    host.define("vm2", &raw(&img, "vda"));
    host.lv.virsh_ok(&["start", "vm1"]);

    // check: in use (exit 1), free (exit 0), missing (exit 2), JSON.
    let out = host.setup.cli(&["check", img.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("in use: is locked exclusively by guest vm1 ({uuid1}) on this host since")),
        "{text}"
    );
    let out = host.setup.cli(&["check", free.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": free\n"));
    let out = host.setup.cli(&["check", "/nonexistent/x.img"]);
    assert_eq!(out.status.code(), Some(2));
    let out = host.setup.cli(&["check", "--json", img.to_str().expect("utf8"), free.to_str().expect("utf8")]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json[0]["state"], "locked");
    assert_eq!(json[0]["holder"]["kind"], "guest");
    assert_eq!(json[0]["holder"]["uuid"], uuid1.as_str());
    assert_eq!(json[1]["state"], "free");

    // run: refused while the guest runs, with the hook's message.
    let out = host.setup.cli(&["run", img.to_str().expect("utf8"), "--", "true"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with(&format!("lockhook: {} is locked exclusively by guest vm1", img.display())),
        "{}",
        stderr(&out)
    );
    host.lv.virsh_ok(&["destroy", "vm1"]);
    let out = host.setup.cli(&["run", img.to_str().expect("utf8"), "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "the command's status: {}", stderr(&out));

    // A guest cannot start while `run` holds its image.
    let mut running = host.run_until_told(&img);
    assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0) == Some(LockMode::Exclusive)));
    let err = host.refused("vm2");
    assert!(
        err.contains(&format!(
            "lockhook: {} is locked exclusively by `lockhook run` (pid {}: sh -c read x)",
            img.display(),
            running.id()
        )),
        "{err}"
    );
    let out = host.setup.cli(&["check", img.to_str().expect("utf8")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("lockhook run"));
    running.stdin.take().expect("stdin").write_all(b"done\n").expect("finish");
    assert!(running.wait().expect("wait").success());
    assert_eq!(lock_state(&img, 0), None);
    host.lv.virsh_ok(&["start", "vm2"]);
    host.lv.virsh_ok(&["destroy", "vm2"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn hot_plugged_disks_are_locked_and_unplugged_ones_freed() {
    let host = Host::new();
    let boot = host.setup.image("images/boot.raw");
    let extra = host.setup.image("images/extra.raw");
    let iso = host.setup.image("images/media.iso");
    let scsi = "<controller type='scsi' model='virtio-scsi'/>";
    let cdrom = "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sdb' bus='scsi'/><readonly/></disk>";
    let uuid1 = host.define("vm1", &format!("{}{scsi}{cdrom}", raw(&boot, "vda")));
    host.define("wants-extra", &raw(&extra, "vda"));
    host.define("writes-iso", &raw(&iso, "vda"));
    host.lv.virsh_ok(&["start", "vm1"]);

    host.lv.virsh_ok(&["attach-disk", "vm1", extra.to_str().expect("utf8"), "sda", "--targetbus", "scsi", "--live"]);
    assert!(
        wait_until(Duration::from_secs(5), || lock_state(&extra, 0) == Some(LockMode::Exclusive)),
        "attached disk locked"
    );
    let err = host.refused("wants-extra");
    assert!(err.contains(&format!("{} is locked exclusively by guest vm1 ({uuid1})", extra.display())), "{err}");
    let text = String::from_utf8(host.setup.cli(&["status"]).stdout).expect("utf8");
    assert!(text.contains(&extra.display().to_string()), "{text}");

    host.lv.virsh_ok(&["change-media", "vm1", "sdb", iso.to_str().expect("utf8"), "--insert", "--live"]);
    assert!(
        wait_until(Duration::from_secs(5), || lock_state(&iso, 0) == Some(LockMode::Shared)),
        "inserted media locked shared"
    );
    let err = host.refused("writes-iso");
    assert!(err.contains(&format!("{} is locked shared by guest vm1", iso.display())), "{err}");

    host.lv.virsh_ok(&["detach-disk", "vm1", "sda", "--live"]);
    assert!(wait_until(Duration::from_secs(10), || lock_state(&extra, 0).is_none()), "detached disk freed");
    host.lv.virsh_ok(&["change-media", "vm1", "sdb", "--eject", "--live"]);
    assert!(wait_until(Duration::from_secs(10), || lock_state(&iso, 0).is_none()), "ejected media freed");
    assert_eq!(lock_state(&boot, 0), Some(LockMode::Exclusive), "the rest stays locked");
    host.lv.virsh_ok(&["start", "wants-extra"]);

    host.lv.virsh_ok(&["destroy", "wants-extra"]);

    // Hot-plugging an image someone else holds (here a `lockhook run`, which QEMU's own locks do
    // not see): noticed, shown, logged, retried; the warn policy keeps the guest running.
    let mut runner = host.run_until_told(&extra);
    assert!(wait_until(Duration::from_secs(5), || lock_state(&extra, 0).is_some()));
    host.lv.virsh_ok(&["attach-disk", "vm1", extra.to_str().expect("utf8"), "sdc", "--targetbus", "scsi", "--live"]);
    let has_conflict = || {
        host.setup.status_json()["guests"].as_array().is_some_and(|g| {
            g.iter().any(|g| g["name"] == "vm1" && g["conflicts"].as_array().is_some_and(|c| !c.is_empty()))
        })
    };
    assert!(wait_until(Duration::from_secs(5), has_conflict), "conflict recorded: {}", host.setup.status_json());
    let text = String::from_utf8(host.setup.cli(&["status"]).stdout).expect("utf8");
    assert!(text.contains("CONFLICT") && text.contains("lockhook run"), "{text}");
    assert!(host.setup.log().contains("CONFLICT"), "logged loudly");
    assert_eq!(host.lv.virsh_ok(&["domstate", "vm1"]).trim(), "running", "warn policy: keeps running");
    runner.stdin.take().expect("stdin").write_all(b"x\n").expect("finish");
    assert!(runner.wait().expect("wait").success());
    assert!(
        wait_until(Duration::from_secs(5), || lock_state(&extra, 0) == Some(LockMode::Exclusive) && !has_conflict()),
        "taken by vm1 once free"
    );
    host.lv.virsh_ok(&["destroy", "vm1"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn killed_holders_are_readopted_by_the_next_hook_call_and_by_reconcile() {
    let host = Host::new();
    let img = host.setup.image("images/a.raw");
    let other = host.setup.image("images/other.raw");
    let uuid1 = host.define("vm1", &raw(&img, "vda"));
    host.define("vm3", &raw(&other, "vda"));
    host.lv.virsh_ok(&["start", "vm1"]);

    let first = host.holder_pid(&uuid1).expect("holder");
    kill(first);
    assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0).is_none()));
    // Any hook call on this host (here: an unrelated guest's start) re-adopts vm1.
    host.lv.virsh_ok(&["start", "vm3"]);
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive), "re-taken before vm3's start returned");
    let second = host.holder_pid(&uuid1).expect("new holder");
    assert_ne!(first, second);

    kill(second);
    assert!(wait_until(Duration::from_secs(5), || lock_state(&img, 0).is_none()));
    let out = host.lockhook_in_ns(&["reconcile"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("adopted: vm1"), "{text}{}", stderr(&out));
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    let third = host.holder_pid(&uuid1).expect("holder after reconcile");
    // The re-adopted holder watches QEMU again: destroy frees at once.
    assert_eq!(
        host.setup.status_json()["guests"]
            .as_array()
            .expect("g")
            .iter()
            .find(|g| g["uuid"] == uuid1.as_str())
            .expect("vm1")["qemu_pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok()),
        host.lv.qemu_pid("vm1")
    );
    let out = host.lockhook_in_ns(&["reconcile"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"), "{}", String::from_utf8_lossy(&out.stdout));

    // QEMU dies while libvirtd is down and the holder is gone too: reconcile cleans up.
    kill(third);
    host.lv.kill_daemon();
    kill(i32::try_from(host.lv.qemu_pid("vm1").expect("qemu")).expect("pid"));
    assert!(wait_until(Duration::from_secs(5), || host.lv.qemu_pid("vm1").is_none()));
    let out = host.lockhook_in_ns(&["reconcile"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cleaned: vm1"), "{text}");
    assert_eq!(lock_state(&img, 0), None);
    assert!(!host.setup.status_json()["guests"].as_array().expect("g").iter().any(|g| g["uuid"] == uuid1.as_str()));
    host.lv.restart_daemon();
    host.lv.virsh_ok(&["destroy", "vm3"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn pause_policy_pauses_a_guest_whose_hot_plug_conflicts() {
    let host = Host::with_config("on_conflict = \"pause\"\n");
    let boot = host.setup.image("images/boot.raw");
    let extra = host.setup.image("images/extra.raw");
    host.define("vm1", &format!("{}<controller type='scsi' model='virtio-scsi'/>", raw(&boot, "vda")));
    host.lv.virsh_ok(&["start", "vm1"]);
    let mut runner = host.run_until_told(&extra);
    assert!(wait_until(Duration::from_secs(5), || lock_state(&extra, 0).is_some()));
    host.lv.virsh_ok(&["attach-disk", "vm1", extra.to_str().expect("utf8"), "sda", "--targetbus", "scsi", "--live"]);
    assert!(
        wait_until(Duration::from_secs(10), || host.lv.virsh_ok(&["domstate", "vm1"]).trim() == "paused"),
        "paused by its holder: {}",
        host.setup.log()
    );
    runner.stdin.take().expect("stdin").write_all(b"x\n").expect("finish");
    assert!(runner.wait().expect("wait").success());
    assert!(wait_until(Duration::from_secs(5), || lock_state(&extra, 0) == Some(LockMode::Exclusive)));
    host.lv.virsh_ok(&["destroy", "vm1"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn external_snapshot_moves_the_exclusive_lock_to_the_overlay() {
    let host = Host::new();
    let base = host.setup.path("images/base.qcow2");
    std::fs::create_dir_all(base.parent().expect("parent")).expect("mkdir");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        base.display()
    );
    host.define("vm1", &disk);
    host.define("writer", &disk);
    host.lv.virsh_ok(&["start", "vm1"]);
    assert_eq!(lock_state(&base, 0), Some(LockMode::Exclusive));
    let overlay = host.setup.path("images/overlay.qcow2");
    let spec = format!("vda,file={}", overlay.display());
    host.lv.virsh_ok(&["snapshot-create-as", "vm1", "snap1", "--disk-only", "--no-metadata", "--diskspec", &spec]);
    assert!(
        wait_until(Duration::from_secs(5), || lock_state(&overlay, 0) == Some(LockMode::Exclusive)
            && lock_state(&base, 0) == Some(LockMode::Shared)),
        "overlay exclusive, base now shared: {}",
        host.setup.status_json()
    );
    let err = host.refused("writer");
    assert!(err.contains(&format!("{} is locked shared (backing image of vda) by guest vm1", base.display())), "{err}");
    host.lv.virsh_ok(&["destroy", "vm1"]);
    assert_eq!(lock_state(&overlay, 0), None);
    assert_eq!(lock_state(&base, 0), None);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn block_copy_pivot_moves_the_lock_to_the_copy() {
    let host = Host::new();
    let src = host.setup.image("images/src.raw");
    host.define("vm1", &raw(&src, "vda"));
    host.lv.virsh_ok(&["start", "vm1"]);
    let copy = host.setup.path("images/copy.raw");
    // The copy is written from the start of the job: locked while it runs, before any pivot.
    host.lv.virsh_ok(&[
        "blockcopy",
        "vm1",
        "vda",
        copy.to_str().expect("utf8"),
        "--format",
        "raw",
        "--wait",
        "--transient-job",
    ]);
    assert!(
        wait_until(Duration::from_secs(5), || lock_state(&copy, 0) == Some(LockMode::Exclusive)),
        "the copy is locked during the job: {}",
        host.setup.status_json()
    );
    assert_eq!(lock_state(&src, 0), Some(LockMode::Exclusive));
    host.lv.virsh_ok(&["blockjob", "vm1", "vda", "--pivot"]);
    assert!(
        wait_until(Duration::from_secs(5), || lock_state(&copy, 0) == Some(LockMode::Exclusive)
            && lock_state(&src, 0).is_none()),
        "after the pivot the old image is freed: {}",
        host.setup.status_json()
    );
    host.lv.virsh_ok(&["destroy", "vm1"]);
    assert_eq!(lock_state(&copy, 0), None);
}

/// Issue 10: hot-plug locks exactly what a start would. A network disk no guest used before
/// (its lockspace lock file does not exist yet) is locked when hot-plugged, so a second guest
/// on that export is refused.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn hot_plugged_network_disks_never_used_before_are_locked() {
    let host = Host::new();
    let export = host.setup.image("images/export.raw");
    let socket = host.setup.path("nbd.sock");
    let nbd = crate::common::Nbd::serve(&export, "fresh", &socket);
    let disk = format!(
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='fresh'>\
         <host transport='unix' socket='{}'/></source><target dev='vdb' bus='virtio'/></disk>",
        socket.display()
    );
    let uuid1 = host.define("vm1", &raw(&host.setup.image("images/boot.raw"), "vda"));
    host.define("vm2", &disk.replace("vdb", "vda"));
    host.start("vm1");
    let label = format!("nbd://unix:{}/fresh", socket.display());
    assert!(
        !host.setup.status_json().to_string().contains(&label),
        "nothing locked for the export before it is plugged"
    );
    let xml = host.setup.path("nbd-disk.xml");
    std::fs::write(&xml, &disk).expect("write");
    host.lv.virsh_ok(&["attach-device", "vm1", xml.to_str().expect("utf8"), "--live"]);
    assert!(
        wait_until(Duration::from_secs(10), || host.setup.status_json().to_string().contains(&label)),
        "the hot-plugged export is locked: {}",
        host.setup.status_json()
    );
    let err = host.refused("vm2");
    assert!(err.contains(&format!("lockhook: {label} is locked exclusively by guest vm1 ({uuid1})")), "{err}");
    host.destroy("vm1");
    drop(nbd);
}

/// Issue 10: a role change that cannot be made (an active block commit into a base image that
/// someone else reads) is a CONFLICT, shown and retried, and the base never goes unlocked.
#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn a_refused_role_change_is_a_conflict_and_never_unlocks() {
    let host = Host::new();
    let dir = host.setup.path("images");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    let qemu_img = |args: &[&str]| drop(crate::common::run_ok(Command::new("qemu-img").args(args)));
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().expect("utf8"), "16M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().expect("utf8"),
        "-F",
        "qcow2",
        top.to_str().expect("utf8"),
    ]);
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        top.display()
    );
    host.define("vm1", &disk);
    host.start("vm1");
    assert_eq!(lock_state(&base, 0), Some(LockMode::Shared));
    // Another reader of the base (lockhook locks only: QEMU's own locks would stop the commit).
    let mut reader = Command::new(lockhook_bin())
        .arg("--config")
        .arg(&host.setup.config)
        .args(["run", "--shared"])
        .arg(&base)
        .args(["--", "sh", "-c", "read x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn lockhook run");
    assert!(wait_until(Duration::from_secs(5), || {
        host.setup.status_json()["guests"].as_array().is_some_and(|g| g.len() == 2)
    }));
    // Sample the base's lock all along: it must never be free while the guest uses it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, base) = (std::sync::Arc::clone(&stop), base.clone());
        std::thread::spawn(move || {
            let mut free = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                free += usize::from(lock_state(&base, 0).is_none());
                std::thread::sleep(Duration::from_millis(2));
            }
            free
        })
    };
    host.lv.virsh_ok(&["blockcommit", "vm1", "vda", "--active", "--pivot", "--wait"]);
    let conflicted = || {
        let text = String::from_utf8_lossy(&host.setup.cli(&["status"]).stdout).into_owned();
        text.contains("CONFLICT") && text.contains(&base.display().to_string())
    };
    assert!(wait_until(Duration::from_secs(10), conflicted), "a CONFLICT in status: {}", host.setup.status_json());
    assert_eq!(lock_state(&base, 0), Some(LockMode::Shared), "still locked (shared) while the upgrade waits");
    assert!(host.setup.log().contains("CONFLICT"), "logged: {}", host.setup.log());
    // The reader goes away: the next retry takes the base exclusively.
    writeln!(reader.stdin.as_mut().expect("stdin")).expect("tell the reader to finish");
    reader.wait().expect("reader");
    assert!(
        wait_until(Duration::from_secs(10), || lock_state(&base, 0) == Some(LockMode::Exclusive)),
        "the base is now the guest's to write: {}",
        host.setup.status_json()
    );
    assert!(wait_until(Duration::from_secs(10), || !conflicted()), "the conflict is gone");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(sampler.join().expect("sampler"), 0, "the base was seen unlocked");
    host.destroy("vm1");
    assert_eq!(lock_state(&base, 0), None);
}

/// Issue 10: a command under `lockhook run` never goes on writing without the locks: when the
/// `run` process is killed, the command and everything it started are killed with it.
#[test]
#[ignore = "needs root (a PID namespace): tests/run-all.sh runs it"]
fn a_killed_run_takes_its_command_tree_with_it() {
    let setup = crate::common::Setup::new("");
    let img = setup.image("images/tool.raw");
    let pids = setup.path("pids");
    let mut run = Command::new(lockhook_bin())
        .arg("--config")
        .arg(&setup.config)
        .arg("run")
        .arg(&img)
        .arg("--")
        .args(["sh", "-c"])
        .arg(format!("sleep 600 & echo $$ $! > {}; wait", pids.display()))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn lockhook run");
    assert!(wait_until(Duration::from_secs(10), || std::fs::read_to_string(&pids)
        .is_ok_and(|t| t.split_whitespace().count() == 2)));
    assert_eq!(lock_state(&img, 0), Some(LockMode::Exclusive));
    // The pids the shell wrote are its own namespace's; find the real ones by command line.
    let tree: Vec<i32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline == b"sleep\x00600\x00" && {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                status.lines().any(|l| l.starts_with("NSpid:") && l.split_whitespace().count() > 2)
            }
        })
        .collect();
    assert!(!tree.is_empty(), "the command's sleep runs in a PID namespace of its own");
    kill(i32::try_from(run.id()).expect("pid"));
    run.wait().expect("reap run");
    assert!(
        wait_until(Duration::from_secs(10), || tree.iter().all(|pid| !Path::new(&format!("/proc/{pid}")).exists())),
        "the command tree died with `lockhook run`"
    );
    assert_eq!(lock_state(&img, 0), None);
}
