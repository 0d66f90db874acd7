//! Test fixture: a private, throw-away libvirtd + virtlogd + QEMU "host".
//!
//! [`Libvirtd::start`] runs both daemons inside new private mount and UTS
//! namespaces (`unshare --mount --uts --propagation private`), so several
//! instances (even from test processes running in parallel) never see each
//! other and never touch a libvirtd of the real host:
//!
//! * `/etc/libvirt` is a temp copy of the system's top-level config files, with
//!   its own `qemu.conf`, `libvirtd.conf` and `virtlogd.conf` (see
//!   [`BASE_QEMU_CONF`]) and, optionally, `hooks/qemu` pointing at the hook
//!   under test;
//! * `/var/lib/libvirt`, `/var/log/libvirt` and `/var/cache/libvirt` are temp
//!   directories, `/run` is a fresh tmpfs (sockets and pid files are private);
//! * the hostname is `lh-test-<random>`; libvirtd does not listen on TCP.
//!
//! Everything else (notably `/tmp` and the work tree) is shared with the host,
//! so disk images and the hook binary can live anywhere outside the shadowed
//! directories. All processes of an instance are found by their namespaces and
//! killed (by pid) when the [`Libvirtd`] is dropped.
//!
//! Needs root, `unshare`/`nsenter` (util-linux) and the Debian packages
//! `libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86`;
//! see [`missing_requirements`].

#![allow(dead_code)] // Each integration test crate uses a different subset.

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{self, Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// How long [`Libvirtd::start`] / [`Libvirtd::restart_daemon`] wait for the
/// daemon to answer. A cold start probes QEMU's capabilities (~8 s on a
/// 2-core machine, also with four starting at once); a warm one (see
/// [`shared_capabilities_cache`]) answers in ~0.3 s.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Default limit for one command run by [`Libvirtd::exec_in_ns`] or
/// [`Libvirtd::virsh`]: generous, only meant to turn a hang into a failure.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`Drop`] keeps killing the processes of the namespaces.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// The libvirt connection URI used by [`Libvirtd::virsh`].
pub const URI: &str = "qemu:///system";

/// `qemu.conf` settings that make QEMU start in this sandbox.
///
/// Any of these keys also set in [`LibvirtdOptions::extra_qemu_conf`] is
/// dropped from here, so tests can override them.
///
/// `namespaces = [ ]` is not needed for QEMU to start, but keeps QEMU in the
/// fixture's own mount namespace (by default libvirt gives every QEMU a nested
/// one), so its `/run`, `/dev` and mounts are the ones the fixture set up.
pub const BASE_QEMU_CONF: &[(&str, &str)] = &[
    ("user", "\"root\""),
    ("group", "\"root\""),
    ("dynamic_ownership", "0"),
    ("remember_owner", "0"),
    ("security_driver", "\"none\""),
    ("cgroup_controllers", "[ ]"),
    ("namespaces", "[ ]"),
];

/// Shell script run by `unshare` inside the new namespaces.
///
/// Arguments: `$1` the instance directory, `$2` the hostname, `$3` the pid of
/// the test process, `$4` [`WATCHDOG_SCRIPT`], then pairs of (source, target)
/// extra bind mounts. It leaves behind the watchdog, virtlogd and libvirtd.
const SETUP_SCRIPT: &str = r#"
set -eu
T=$1; HOST=$2; OWNER=$3; WATCHDOG=$4; shift 4
mkdir -p /etc/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
mount --bind "$T/etc" /etc/libvirt
mount --bind "$T/lib" /var/lib/libvirt
mount --bind "$T/log" /var/log/libvirt
mount --bind "$T/cache" /var/cache/libvirt
mount -t tmpfs -o mode=0755 lockhook-test-run /run
mkdir -p /run/libvirt /run/lock
while [ "$#" -ge 2 ]; do
    mkdir -p "$2"
    mount --bind "$1" "$2"
    shift 2
done
hostname "$HOST"
sh -c "$WATCHDOG" lockhook-watchdog "$OWNER" </dev/null >/dev/null 2>&1 &
echo "$!" > "$T/pids/holder.pid"
virtlogd -d -p "$T/pids/virtlogd.pid" </dev/null >>"$T/log/daemons.out" 2>&1
L=""; [ -f "$T/listen" ] && L="--listen"
libvirtd -d $L -p "$T/pids/libvirtd.pid" </dev/null >>"$T/log/daemons.out" 2>&1
"#;

/// The namespace "holder": keeps the namespaces alive, is the `nsenter`
/// target for the lifetime of the fixture, and, should the test process
/// (`$1`) die without running [`Drop`] (SIGKILL by a test runner's timeout,
/// `panic = "abort"`), SIGKILLs every process of its UTS namespace (which
/// also holds QEMUs in nested mount namespaces) within about a second.
const WATCHDOG_SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 1; done
me=$(readlink "/proc/$$/ns/uts") || exit 0
[ -n "$me" ] || exit 0
for round in 1 2 3; do
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" != "$$" ] || continue
        if [ "$(readlink "$p/ns/uts" 2>/dev/null)" = "$me" ]; then
            kill -9 "$pid" 2>/dev/null
        fi
    done
    sleep 0.2
done
"#;

/// What to set up besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct LibvirtdOptions {
    /// The hook under test: `<etc>/hooks/qemu` becomes a symlink to it (so
    /// its `argv[0]` basename is `qemu`). Must be visible inside the
    /// namespaces, i.e. not under `/run`, `/etc/libvirt` or `/var/*/libvirt`.
    pub hook_binary: Option<PathBuf>,
    /// Lines appended to `qemu.conf` (keys given here override
    /// [`BASE_QEMU_CONF`]).
    pub extra_qemu_conf: String,
    /// Extra bind mounts `(host source dir, mount target inside the
    /// namespaces)`, done after `/run` is mounted. The target is created with
    /// `mkdir -p` (on the host file system unless it is under `/run`).
    pub extra_mounts: Vec<(PathBuf, PathBuf)>,
    /// Listen on `127.0.0.1:<port>` for `qemu+tcp://` (no auth), for migrations between two
    /// fixtures: `Some(0)` picks a free port (see [`Libvirtd::tcp_port`]).
    pub tcp_port: Option<u16>,
    /// Extra files for libvirt's config directory `(name, contents)`, e.g. `qemu-sanlock.conf`.
    pub extra_etc_files: Vec<(String, String)>,
}

/// A running private libvirtd; everything it started dies with it.
#[derive(Debug)]
pub struct Libvirtd {
    /// Instance directory (host view); holds `etc/ lib/ log/ cache/ pids/`.
    dir: TempDir,
    hostname: String,
    /// The watchdog shell that lives in the namespaces for the whole
    /// lifetime ([`WATCHDOG_SCRIPT`]).
    holder_pid: u32,
    /// `readlink /proc/<holder>/ns/mnt`, e.g. `mnt:[4026532177]`.
    mnt_ns: String,
    /// `readlink /proc/<holder>/ns/uts`.
    uts_ns: String,
    /// Open references to both namespaces, closed only after [`Drop`] is done: the kernel reuses
    /// a freed namespace's inode number at once, so without them a fixture still tearing down
    /// would take the next fixture's brand-new namespaces (same `mnt:[N]`) for its own and kill
    /// their processes.
    _ns_refs: Vec<fs::File>,
}

impl Libvirtd {
    /// Starts virtlogd + libvirtd in new private mount+UTS namespaces and
    /// waits (up to [`STARTUP_TIMEOUT`]) until `virsh version` answers.
    ///
    /// Panics (after cleaning up) with the daemon log if anything fails.
    pub fn start(opts: LibvirtdOptions) -> Libvirtd {
        if let Some(missing) = missing_requirements() {
            panic!("cannot start a test libvirtd: {missing}");
        }
        ensure_system_users();

        let dir =
            tempfile::Builder::new().prefix("lockhook-libvirtd-").tempdir().expect("create the instance directory");
        let root = dir.path();
        for sub in ["etc", "lib/qemu", "lib/images", "log", "cache", "pids", "xml"] {
            fs::create_dir_all(root.join(sub)).expect("create instance subdirectory");
        }
        let mut opts = opts;
        if opts.tcp_port == Some(0) {
            opts.tcp_port = Some(free_port());
        }
        write_config(root, &opts);
        seed_capabilities_cache(root);

        let hostname = format!("lh-test-{:08x}", random_u64() & 0xffff_ffff);
        let mut cmd = Command::new("unshare");
        set_daemon_env(&mut cmd);
        cmd.args(["--mount", "--uts", "--propagation", "private", "--"])
            .args(["sh", "-c", SETUP_SCRIPT, "sh"])
            .arg(root)
            .arg(&hostname)
            .arg(process::id().to_string())
            .arg(WATCHDOG_SCRIPT);
        for (source, target) in &opts.extra_mounts {
            assert!(source.is_dir(), "extra mount source {} is not a directory", source.display());
            assert!(target.is_absolute(), "extra mount target {} is not absolute", target.display());
            cmd.arg(source).arg(target);
        }
        let setup_log = root.join("log/setup.out");
        let setup_out = fs::File::create(&setup_log).expect("create setup.out");
        let setup_err = setup_out.try_clone().expect("clone setup.out handle");
        let status =
            cmd.stdin(Stdio::null()).stdout(setup_out).stderr(setup_err).status().expect("run unshare (util-linux)");

        let setup_output = || fs::read_to_string(&setup_log).unwrap_or_default();
        let Some(holder_pid) = read_pid(&root.join("pids/holder.pid")) else {
            // The script failed before starting anything: nothing to clean up.
            panic!("namespace setup failed ({status}): {}", setup_output());
        };
        let (Some(mnt_ns), Some(uts_ns)) = (ns_id(holder_pid, "mnt"), ns_id(holder_pid, "uts")) else {
            panic!("namespace holder {holder_pid} died during setup: {}", setup_output());
        };
        assert!(
            Some(&mnt_ns) != own_ns("mnt").as_ref() && Some(&uts_ns) != own_ns("uts").as_ref(),
            "unshare did not create new namespaces (holder {holder_pid} shares ours)"
        );
        let ns_refs = ["mnt", "uts"]
            .iter()
            .zip([&mnt_ns, &uts_ns])
            .filter_map(|(kind, id)| {
                use std::os::unix::fs::MetadataExt;
                let file = fs::File::open(format!("/proc/{holder_pid}/ns/{kind}")).ok()?;
                let ino = file.metadata().ok()?.ino();
                id.contains(&format!("[{ino}]")).then_some(file)
            })
            .collect::<Vec<_>>();
        assert_eq!(ns_refs.len(), 2, "namespace holder {holder_pid} died during setup: {}", setup_output());
        // From here on, a panic drops `this`, which kills what was started.
        let this = Libvirtd { dir, hostname, holder_pid, mnt_ns, uts_ns, _ns_refs: ns_refs };
        assert!(status.success(), "namespace setup failed ({status}): {}", setup_output());
        this.wait_until_answering();
        save_capabilities_cache(this.dir.path());
        this
    }

    /// Runs `virsh -c qemu:///system ARGS` inside the namespaces.
    pub fn virsh(&self, args: &[&str]) -> Output {
        let mut command = vec!["virsh", "-c", URI];
        command.extend_from_slice(args);
        self.exec_in_ns(&command)
    }

    /// Like [`virsh`](Self::virsh) but panics (with its stdout and stderr;
    /// the daemon log tail follows from [`Drop`]) unless it succeeds;
    /// returns its stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "`virsh {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        String::from_utf8(out.stdout).expect("virsh printed non-UTF-8 output")
    }

    /// Runs `argv` inside the namespaces (`nsenter --mount --uts`), with
    /// stdin closed, and returns its output. Panics after [`COMMAND_TIMEOUT`].
    pub fn exec_in_ns(&self, argv: &[&str]) -> Output {
        self.exec_in_ns_timeout(argv, COMMAND_TIMEOUT)
    }

    /// Like [`exec_in_ns`](Self::exec_in_ns) with an explicit time limit; the
    /// command is killed and this panics when it is exceeded.
    pub fn exec_in_ns_timeout(&self, argv: &[&str], timeout: Duration) -> Output {
        assert!(!argv.is_empty(), "exec_in_ns needs a command");
        let mut cmd = self.ns_command();
        cmd.args(argv);
        output_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("`{}` in the test namespaces: {e}", argv.join(" ")))
    }

    /// Defines a guest from XML text (via a temp file and `virsh define`).
    pub fn define(&self, xml: &str) {
        let file = tempfile::Builder::new()
            .prefix("domain-")
            .suffix(".xml")
            .tempfile_in(self.dir.path().join("xml"))
            .expect("create domain XML file");
        fs::write(file.path(), xml).expect("write domain XML file");
        let path = file.path().to_str().expect("temp path is UTF-8");
        self.virsh_ok(&["define", path]);
    }

    /// Simulates a daemon crash: SIGKILLs libvirtd only (virtlogd and QEMU
    /// keep running) and waits until it is gone.
    pub fn kill_daemon(&self) {
        let pid = self.libvirtd_pid().expect("kill_daemon: libvirtd is not running");
        self.kill_pids(&[pid]);
        assert!(wait_until(Duration::from_secs(10), || !is_alive(pid)), "libvirtd {pid} survived SIGKILL");
    }

    /// Starts libvirtd again in the same namespaces (e.g. after
    /// [`kill_daemon`](Self::kill_daemon)) and waits until it answers.
    pub fn restart_daemon(&self) {
        let root = self.dir.path();
        let pidfile = root.join("pids/libvirtd.pid");
        let out_log = root.join("log/daemons.out");
        let listen = if root.join("listen").exists() { "--listen" } else { "" };
        // A killed libvirtd can hold its pid file lock a moment longer than it takes to die
        // ("Unable to obtain pidfile"): retry until it is free, within the startup deadline.
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let mut cmd = self.ns_command();
            set_daemon_env(&mut cmd);
            cmd.args(["sh", "-c", r#"exec libvirtd -d $3 -p "$1" </dev/null >>"$2" 2>&1"#, "sh"])
                .arg(&pidfile)
                .arg(&out_log)
                .arg(listen);
            let out = output_with_timeout(cmd, STARTUP_TIMEOUT).expect("run libvirtd -d");
            if out.status.success() {
                break;
            }
            let log = fs::read_to_string(&out_log).unwrap_or_default();
            let pidfile_busy = log.lines().last().is_some_and(|l| l.contains("Unable to obtain pidfile"));
            assert!(pidfile_busy && Instant::now() < deadline, "libvirtd -d failed ({}): {log}", out.status);
            thread::sleep(Duration::from_millis(100));
        }
        self.wait_until_answering();
    }

    /// pid of the running libvirtd of this instance, if any.
    pub fn libvirtd_pid(&self) -> Option<u32> {
        read_pid(&self.dir.path().join("pids/libvirtd.pid"))
            .filter(|&pid| is_alive(pid) && self.owns(pid) && comm(pid).as_deref() == Some("libvirtd"))
    }

    /// pid of the QEMU process of the running guest `name`.
    ///
    /// Reads `/run/libvirt/qemu/NAME.pid` of the namespaces, falling back to a
    /// scan of `/proc` for `-name guest=NAME`; only processes of this
    /// instance's namespaces are returned.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        let pidfile = self.ns_path(Path::new("/run/libvirt/qemu")).join(format!("{name}.pid"));
        if let Some(pid) = read_pid(&pidfile).filter(|&pid| is_alive(pid) && self.owns(pid)) {
            return Some(pid);
        }
        let wanted = format!("guest={name}");
        self.namespace_pids().into_iter().find(|&pid| {
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2).any(|w| {
                w[0] == b"-name" && (w[1] == wanted.as_bytes() || w[1].starts_with(format!("{wanted},").as_bytes()))
            })
        })
    }

    /// The hostname set in the UTS namespace (`lh-test-XXXXXXXX`).
    /// The TCP port libvirtd listens on (see [`LibvirtdOptions::tcp_port`]).
    pub fn tcp_port(&self) -> Option<u16> {
        fs::read_to_string(self.dir.path().join("listen")).ok()?.trim().parse().ok()
    }

    /// `qemu+tcp://127.0.0.1:<port>/system`, for `virsh migrate` from another fixture.
    pub fn tcp_uri(&self) -> String {
        format!("qemu+tcp://127.0.0.1:{}/system", self.tcp_port().expect("started with tcp_port"))
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The instance's mount namespace, as `readlink /proc/PID/ns/mnt` prints
    /// it (e.g. `mnt:[4026532177]`).
    pub fn mnt_ns(&self) -> &str {
        &self.mnt_ns
    }

    /// The instance's UTS namespace (e.g. `uts:[4026532178]`).
    pub fn uts_ns(&self) -> &str {
        &self.uts_ns
    }

    /// The instance directory (host view). It is not shadowed inside the
    /// namespaces, so files under it (e.g. disk images) have the same path
    /// on both sides. Removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Host view of the libvirtd log file (`/var/log/libvirt/libvirtd.log`
    /// inside), which receives warnings and errors.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("log/libvirtd.log")
    }

    /// The last ~50 lines of the libvirtd log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 50)
    }

    /// Host view of the QEMU log of guest `name`
    /// (`/var/log/libvirt/qemu/NAME.log` inside).
    pub fn guest_log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("log/qemu").join(format!("{name}.log"))
    }

    /// Host view of the fixture's `/etc/libvirt` (e.g. to add files to
    /// `hooks/qemu.d/` before [`restart_daemon`](Self::restart_daemon)).
    pub fn etc_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// Host path through which `path` (as seen inside the namespaces) can be
    /// read, via `/proc/<holder>/root`.
    pub fn ns_path(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.holder_pid)).join(relative)
    }

    /// pids of every live process in this instance's mount or UTS namespace
    /// (the UTS one also catches QEMUs that libvirt put in a nested mount
    /// namespace).
    pub fn namespace_pids(&self) -> Vec<u32> {
        let me = process::id();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me && self.owns(pid))
            .collect()
    }

    /// Whether `pid` lives in this instance's mount or UTS namespace.
    fn owns(&self, pid: u32) -> bool {
        ns_id(pid, "mnt").as_deref() == Some(self.mnt_ns.as_str())
            || ns_id(pid, "uts").as_deref() == Some(self.uts_ns.as_str())
    }

    /// `nsenter` into the namespaces, after checking the holder is still ours.
    fn ns_command(&self) -> Command {
        assert!(
            ns_id(self.holder_pid, "mnt").as_deref() == Some(self.mnt_ns.as_str()),
            "the namespace holder (pid {}) of the test libvirtd is gone",
            self.holder_pid
        );
        let mut cmd = Command::new("nsenter");
        cmd.env("PATH", path_with_sbin())
            .env("LC_ALL", "C")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder_pid))
            .arg(format!("--uts=/proc/{}/ns/uts", self.holder_pid))
            .arg("--");
        cmd
    }

    /// Polls `virsh version` until it succeeds; panics if libvirtd dies or
    /// [`STARTUP_TIMEOUT`] passes (then [`Drop`] prints the log tail).
    fn wait_until_answering(&self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut pid_seen = false;
        let mut last_error = String::new();
        loop {
            // libvirtd writes its pid file before its (slow) driver set-up.
            let pid = self.libvirtd_pid();
            pid_seen |= pid.is_some();
            assert!(
                !(pid_seen && pid.is_none()),
                "libvirtd died during startup (log tail below): {last_error}{}",
                fs::read_to_string(self.dir.path().join("log/daemons.out")).unwrap_or_default(),
            );
            let remaining = deadline.saturating_duration_since(Instant::now());
            if pid.is_some() {
                let mut cmd = self.ns_command();
                cmd.args(["virsh", "-c", URI, "version"]);
                match output_with_timeout(cmd, remaining.max(Duration::from_secs(1))) {
                    Ok(out) if out.status.success() => return,
                    Ok(out) => last_error = String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(e) => last_error = e.to_string(),
                }
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not answer within {STARTUP_TIMEOUT:?} (log tail below): {last_error}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs `pids` (which must all be ours; re-checked just before).
    fn kill_pids(&self, pids: &[u32]) {
        let ours: Vec<String> = pids.iter().filter(|&&pid| self.owns(pid)).map(u32::to_string).collect();
        if ours.is_empty() {
            return;
        }
        // A pid may have exited meanwhile: `kill` then fails for it only.
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&ours)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Libvirtd {
    /// Kills (SIGKILL, by pid) every process of the instance's namespaces,
    /// waits until they are gone (at most [`TEARDOWN_TIMEOUT`]), then removes
    /// the instance directory. Prints the log tail if the test is panicking.
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- libvirtd log tail ({}) ---\n{}", self.log_path().display(), self.log_tail());
        }
        // Never act on our own namespaces (start() already refuses them).
        if Some(&self.mnt_ns) == own_ns("mnt").as_ref() || Some(&self.uts_ns) == own_ns("uts").as_ref() {
            return;
        }
        // The census semaphore set of lockhook's run directory in these namespaces (the
        // default, on their private /run) lives in the kernel, not on that tmpfs.
        let run_dir = PathBuf::from(format!("/proc/{}/root/run/lockhook", self.holder_pid));
        lockhook::census::Census::remove(&lockhook::paths::Paths::new(&run_dir));
        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        loop {
            let pids = self.namespace_pids();
            if pids.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!("warning: test libvirtd processes still alive after {TEARDOWN_TIMEOUT:?}: {pids:?}");
                break;
            }
            self.kill_pids(&pids);
            thread::sleep(Duration::from_millis(20));
        }
        // `TempDir` removes the instance directory when the field drops.
    }
}

/// Polls `f` every ~20 ms until it returns true or `timeout` passes; returns
/// whether it became true (it is always called at least once).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal guest that reaches "running" without any bootable disk: 32 MiB,
/// 1 vCPU, machine `pc`, ACPI (needed for disk hot-plug), no graphics, no
/// network, no USB, no balloon; `disks_xml` is inserted into `<devices>`
/// verbatim. Domain type `kvm` if `/dev/kvm` is usable, else `qemu` (TCG).
pub fn guest_xml(name: &str, uuid: &str, disks_xml: &str) -> String {
    let domain_type = if kvm_usable() { "kvm" } else { "qemu" };
    format!(
        "<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks_xml}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
        name = xml_escape(name),
        uuid = xml_escape(uuid),
    )
}

/// A random version-4 UUID string, e.g. for [`guest_xml`].
pub fn random_uuid() -> String {
    let hi = random_u64();
    let lo = random_u64();
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        (hi & 0x0fff) | 0x4000,
        ((lo >> 48) & 0x3fff) | 0x8000,
        lo & 0xffff_ffff_ffff
    )
}

/// Why a test libvirtd cannot run here, or `None` if it can: tests may skip
/// themselves on `Some`.
pub fn missing_requirements() -> Option<String> {
    let uid = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next().map(str::to_owned))
    });
    if uid.as_deref() != Some("0") {
        return Some("not running as root".into());
    }
    let missing: Vec<&str> = ["unshare", "nsenter", "libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"]
        .into_iter()
        .filter(|bin| which(bin).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "missing {} (apt-get install libvirt-daemon libvirt-daemon-driver-qemu \
             libvirt-clients qemu-system-x86 util-linux)",
            missing.join(", ")
        )
    })
}

/// Whether QEMU can use KVM here (`/dev/kvm` exists and opens read-write).
pub fn kvm_usable() -> bool {
    fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Writes `etc/` of a new instance: top-level config files copied from the
/// system's `/etc/libvirt` (not its `hooks/`, nor persistent guest, network
/// or storage definitions), our own `qemu.conf`, `libvirtd.conf`,
/// `virtlogd.conf`, and the hook symlink.
fn write_config(root: &Path, opts: &LibvirtdOptions) {
    let etc = root.join("etc");
    if let Ok(entries) = fs::read_dir("/etc/libvirt") {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                fs::copy(entry.path(), etc.join(entry.file_name())).expect("copy a file of /etc/libvirt");
            }
        }
    }

    let overridden: Vec<&str> = opts
        .extra_qemu_conf
        .lines()
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with('#'))
        .collect();
    let mut qemu_conf = String::from("# Written by the lockhook test fixture.\n");
    for (key, value) in BASE_QEMU_CONF {
        if !overridden.contains(key) {
            writeln!(qemu_conf, "{key} = {value}").expect("write to a String");
        }
    }
    qemu_conf.push_str(&opts.extra_qemu_conf);
    qemu_conf.push('\n');
    fs::write(etc.join("qemu.conf"), qemu_conf).expect("write qemu.conf");
    for (name, contents) in &opts.extra_etc_files {
        fs::write(etc.join(name), contents).expect("write an extra libvirt config file");
    }

    // Without a TCP port, no --listen: only the private unix sockets under /run/libvirt.
    let mut libvirtd_conf =
        format!("host_uuid = \"{}\"\nlog_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n", random_uuid());
    if let Some(port) = opts.tcp_port {
        libvirtd_conf.push_str(&format!(
            "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{port}\"\nauth_tcp = \"none\"\n"
        ));
        fs::write(root.join("listen"), port.to_string()).expect("write listen marker");
    }
    fs::write(etc.join("libvirtd.conf"), libvirtd_conf).expect("write libvirtd.conf");
    fs::write(etc.join("virtlogd.conf"), "log_outputs = \"3:file:/var/log/libvirt/virtlogd.log\"\n")
        .expect("write virtlogd.conf");

    if let Some(hook) = &opts.hook_binary {
        let hook = std::path::absolute(hook).expect("make the hook path absolute");
        assert!(hook.is_file(), "hook binary {} does not exist", hook.display());
        let hooks = etc.join("hooks");
        fs::create_dir_all(&hooks).expect("create hooks dir");
        symlink(&hook, hooks.join("qemu")).expect("symlink hooks/qemu to the hook binary");
    }
}

/// Where QEMU capability caches are shared between instances (and test
/// processes): libvirt re-probes QEMU (~8 s) on every start with an empty
/// `/var/cache/libvirt/qemu/capabilities`, and validates a cached file (QEMU
/// and libvirt binaries, kernel, microcode, KVM) before using it, so seeding
/// it with a stale file is harmless.
pub fn shared_capabilities_cache() -> PathBuf {
    option_env!("CARGO_TARGET_TMPDIR")
        .map_or_else(std::env::temp_dir, PathBuf::from)
        .join("lockhook-libvirt-qemu-capabilities")
}

/// Copies the shared capability cache into a new instance (best effort).
fn seed_capabilities_cache(root: &Path) {
    let target = root.join("cache/qemu/capabilities");
    let Ok(entries) = fs::read_dir(shared_capabilities_cache()) else {
        return;
    };
    fs::create_dir_all(&target).expect("create capabilities cache dir");
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".xml") {
            let _ = fs::copy(entry.path(), target.join(name));
        }
    }
}

/// Publishes an instance's (now valid) capability cache files to the shared
/// directory, atomically (temp file + rename), best effort.
fn save_capabilities_cache(root: &Path) {
    let shared = shared_capabilities_cache();
    let Ok(entries) = fs::read_dir(root.join("cache/qemu/capabilities")) else {
        return;
    };
    if fs::create_dir_all(&shared).is_err() {
        return;
    }
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(content) = fs::read(entry.path()) else {
            continue;
        };
        if fs::read(shared.join(&name)).is_ok_and(|old| old == content) {
            continue;
        }
        let tmp = shared.join(format!(".{}.{}.tmp", name.to_string_lossy(), random_u64()));
        if fs::write(&tmp, &content).is_ok() && fs::rename(&tmp, shared.join(&name)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

/// Creates the `libvirt-qemu` user/group and the `kvm` group that libvirtd
/// refuses to start without, unless they exist. Safe against parallel test
/// processes (retries while `/etc/passwd` is locked by another one).
fn ensure_system_users() {
    let steps: [(&str, &str, &[&str]); 3] = [
        ("group", "libvirt-qemu", &["groupadd", "-r", "libvirt-qemu"]),
        ("group", "kvm", &["groupadd", "-r", "kvm"]),
        ("passwd", "libvirt-qemu", &["useradd", "-r", "-g", "libvirt-qemu", "-s", "/usr/sbin/nologin", "libvirt-qemu"]),
    ];
    for (db, name, add) in steps {
        let exists =
            || Command::new("getent").args([db, name]).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
        let ok = wait_until(Duration::from_secs(10), || {
            exists() || {
                let _ = Command::new(add[0]).args(&add[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
                exists()
            }
        });
        assert!(ok, "could not create {db} entry {name} with `{}`", add.join(" "));
    }
}

/// Runs `cmd` (stdin closed, stdout/stderr captured) and kills it if it runs
/// longer than `timeout`.
fn output_with_timeout(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    let deadline = Instant::now() + timeout;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let stdout = spawn_reader(child.stdout.take());
    let stderr = spawn_reader(child.stderr.take());
    let status = wait_child(&mut child, deadline)?;
    // A background process may still hold the pipes: do not wait forever.
    let grace = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(grace).map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the command exited but a process it left behind keeps its stdout/stderr open",
            )
        })
    };
    Ok(Output { status, stdout: collect(stdout)?, stderr: collect(stderr)? })
}

/// Reads a pipe to its end on a thread; the result arrives on the channel.
fn spawn_reader(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// Waits for `child`, killing it at `deadline`.
fn wait_child(child: &mut Child, deadline: Instant) -> io::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(io::ErrorKind::TimedOut, "command timed out and was killed"));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// `readlink /proc/PID/ns/KIND`, e.g. `mnt:[4026532177]` (None for gone or
/// zombie processes).
fn ns_id(pid: u32, kind: &str) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok().map(|p| p.to_string_lossy().into_owned())
}

/// The test process's own namespace `kind`.
fn own_ns(kind: &str) -> Option<String> {
    ns_id(process::id(), kind)
}

/// Whether `pid` exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// The command name of `pid` (`/proc/PID/comm`).
fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_owned())
}

/// Reads a pid file (None if missing, empty or not a number).
fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last `n` lines of a text file ("" if unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Gives the daemons (and so QEMU and the hook, which inherit a few variables
/// such as `LD_LIBRARY_PATH`) a clean environment instead of cargo's.
fn set_daemon_env(cmd: &mut Command) {
    cmd.env_clear().env("PATH", path_with_sbin()).env("HOME", "/root").env("LC_ALL", "C");
}

/// `$PATH` plus the sbin directories (where `libvirtd` lives), which a
/// non-login environment may lack.
fn path_with_sbin() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(PathBuf::from(extra));
        }
    }
    std::env::join_paths(dirs).expect("PATH entries contain no ':'")
}

/// Looks `bin` up in [`path_with_sbin`].
fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&path_with_sbin()).map(|dir| dir.join(bin)).find(|p| p.is_file())
}

/// Escapes text for XML content and attribute values.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// 64 random-enough bits from std's randomly keyed hasher (not for crypto).
fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(process::id());
    hasher.finish()
}

/// A TCP port on 127.0.0.1 that nothing uses right now, below the kernel's ephemeral range
/// (32768 and up) and libvirt's migration ports (49152 and up): a port from those ranges may be
/// taken by an outgoing connection or a QEMU migration before libvirtd binds it (seen: "Unable to
/// bind to port: Address already in use").
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20000 + u16::try_from(random_u64() % 10000).expect("below 10000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in 20000..30000");
}
