//! The Debian package (`debian/build.sh`, i.e. `cargo deb`), installed, upgraded, removed and
//! purged with this machine's real `dpkg`, inside a throw-away copy of the host.
//!
//! Each [`Sandbox`] is `unshare --mount --propagation private --pid --fork --mount-proc`:
//!
//! * `/etc`, `/usr` and `/var` are overlayfs mounts with the real directory as the read-only lower
//!   layer and an upper layer in the test's temp dir, so dpkg sees the host's real database
//!   (`/var/lib/dpkg`) and files, and everything it and the maintainer scripts write (the package
//!   database, `/usr/sbin/lockhook`, `/etc/lockhook`, `/etc/libvirt/hooks`, the units, man pages,
//!   completions, `/var/lib/lockhook`, `dpkg.log`, man-db's cache) lands in the upper layers. That
//!   covers every path the package touches, also ones that do not exist on the host (nothing is
//!   created on the host as a mount point). Each test also checks that the host's view of those
//!   paths and its dpkg database entry for lockhook are what they were before.
//! * `/run` is an empty tmpfs: `/run/lockhook` is private, and `/run/systemd/system` is absent, so
//!   the maintainer scripts see "no systemd". Where a test wants systemd, it creates that
//!   directory and puts a logging `systemctl` stub first in `PATH`; even a real `systemctl` could
//!   not reach the host's systemd, whose sockets live under the hidden `/run`.
//! * The new PID namespace shows the scripts none of the host's processes, so the postinst's and
//!   prerm's SIGHUP cannot reach a real libvirtd or virtqemud (nor a test libvirtd of another
//!   test): `pgrep` reads the namespace's own `/proc`. (The scripts also signal only daemons in
//!   their own mount namespace, as `install.sh` does.) Where a test wants a daemon, it starts a
//!   fake `libvirtd` in the namespace that records each SIGHUP.
//!
//! The namespace's init reads its stdin, a pipe from the test process: when the [`Sandbox`] is
//! dropped, or the test process dies, it sees EOF and exits, and the kernel kills every process
//! of the PID namespace; the mounts go with the last of them.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::Duration;

use crate::common::{run_with_stdin, wait_until};

/// Run as the namespace's init: `$1` is the test's temp dir.
const SETUP_SCRIPT: &str = r#"
set -eu
T=$1
for d in etc usr var; do
  mkdir -p "$T/upper/$d" "$T/work/$d"
  mount -t overlay "lockhook-deb-$d" -o "lowerdir=/$d,upperdir=$T/upper/$d,workdir=$T/work/$d" "/$d"
done
mount -t tmpfs -o mode=0755 lockhook-deb-run /run
mkdir -p /run/lock /run/lockhook-test/bin
echo ready
exec >/dev/null 2>&1
read -r line || true
"#;

/// A `systemctl` that logs its arguments; `is-active` says "inactive" (so a daemon gets SIGHUP).
const SYSTEMCTL_STUB: &str = "#!/bin/sh\necho \"$*\" >> /run/lockhook-test/systemctl.log\n\
                              case \"$1\" in is-active) exit 3 ;; esac\nexit 0\n";

/// A fake `libvirtd` (its command name is `libvirtd`): records its pid and each SIGHUP.
const LIBVIRTD_STUB: &str = "#!/bin/sh\ntrap 'echo hup >> /run/lockhook-test/libvirtd.hups' HUP\n\
                             echo $$ > /run/lockhook-test/libvirtd.pid\nwhile :; do sleep 0.1; done\n";

const PATH: &str = "/run/lockhook-test/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const TIMEOUT: Duration = Duration::from_secs(120);
const HOOK: &str = "/etc/libvirt/hooks/qemu";
const QEMU_D: &str = "/etc/libvirt/hooks/qemu.d/50-lockhook";
const CONF: &str = "/etc/lockhook/lockhook.toml";

/// What the package installs, and where, as the host sees it (must not change).
const HOST_PATHS: &[&str] = &[
    "/usr/sbin/lockhook",
    CONF,
    HOOK,
    QEMU_D,
    "/usr/lib/systemd/system/lockhook-reconcile.service",
    "/usr/lib/systemd/system/lockhook-reconcile.timer",
    "/usr/lib/systemd/system/lockhook-sanlock-join.service",
    "/usr/share/man/man8/lockhook.8.gz",
    "/usr/share/bash-completion/completions/lockhook",
    "/usr/share/zsh/vendor-completions/_lockhook",
    "/usr/share/fish/vendor_completions.d/lockhook.fish",
    "/usr/share/doc/lockhook",
];

struct Sandbox {
    dir: tempfile::TempDir,
    unshare: Child,
    init_stdin: Option<ChildStdin>,
    /// The namespace's init, as the host sees its pid.
    init: u32,
    host_before: String,
}

impl Sandbox {
    /// A private copy of the host; with `systemd`, the scripts see a running systemd (a stub).
    fn new(systemd: bool) -> Sandbox {
        let host_before = host_state();
        let dir = tempfile::Builder::new().prefix("lockhook-deb-").tempdir().expect("temp dir");
        let mut unshare = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--"])
            .args(["sh", "-c", SETUP_SCRIPT, "sh"])
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run unshare (util-linux)");
        let init_stdin = unshare.stdin.take();
        let mut ready = String::new();
        let _ = BufReader::new(unshare.stdout.take().expect("stdout")).read_line(&mut ready);
        if ready.trim() != "ready" {
            let out = unshare.wait_with_output().expect("wait for unshare");
            panic!("namespace setup failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        let children = fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).expect("children");
        let init = children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("the namespace's init");
        let sandbox = Sandbox { dir, unshare, init_stdin, init, host_before };
        for ns in ["mnt", "pid"] {
            let ours = fs::read_link(format!("/proc/self/ns/{ns}")).expect("own ns");
            assert_ne!(fs::read_link(format!("/proc/{init}/ns/{ns}")).expect("ns"), ours, "a new {ns} namespace");
        }
        sandbox.install_file("/run/lockhook-test/bin/systemctl", SYSTEMCTL_STUB, 0o755);
        sandbox.install_file("/run/lockhook-test/bin/libvirtd", LIBVIRTD_STUB, 0o755);
        if systemd {
            sandbox.ok("mkdir -p /run/systemd/system");
        }
        sandbox
    }

    /// `script` run by `sh` in the namespaces, with stdin at EOF.
    fn sh(&self, script: &str) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.init.to_string(), "-m", "-p", "--", "sh", "-c", script])
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LC_ALL", "C")
            .env("MANPAGER", "cat")
            .current_dir("/");
        run_with_stdin(cmd, b"", TIMEOUT)
    }

    /// Like [`sh`](Self::sh), but it must succeed; returns stdout and stderr.
    fn ok(&self, script: &str) -> (String, String) {
        let out = self.sh(script);
        let (stdout, stderr) = texts(&out);
        assert!(out.status.success(), "`{script}` failed ({}):\nstdout: {stdout}\nstderr: {stderr}", out.status);
        (stdout, stderr)
    }

    /// `path` as the namespaces see it, through the init's root (never follow a symlink there: an
    /// absolute target would resolve on the host).
    fn at(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.init))
    }

    fn read_link(&self, path: &str) -> Option<String> {
        fs::read_link(self.at(path)).ok().map(|p| p.display().to_string())
    }

    fn exists(&self, path: &str) -> bool {
        self.at(path).symlink_metadata().is_ok()
    }

    fn read(&self, path: &str) -> String {
        fs::read_to_string(self.at(path)).unwrap_or_else(|e| panic!("read {path} in the sandbox: {e}"))
    }

    fn install_file(&self, path: &str, text: &str, mode: u32) {
        let at = self.at(path);
        fs::create_dir_all(at.parent().expect("parent")).expect("mkdir");
        fs::write(&at, text).expect("write");
        fs::set_permissions(&at, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// The systemctl calls so far, one a line.
    fn systemctl_log(&self) -> String {
        fs::read_to_string(self.at("/run/lockhook-test/systemctl.log")).unwrap_or_default()
    }

    /// Starts the fake libvirtd; returns its pid (in the namespace).
    fn start_libvirtd(&self) -> String {
        self.ok("setsid /run/lockhook-test/bin/libvirtd </dev/null >/dev/null 2>&1 &");
        let pid_file = "/run/lockhook-test/libvirtd.pid";
        assert!(wait_until(Duration::from_secs(5), || self.exists(pid_file)), "the fake libvirtd started");
        let pid = self.read(pid_file).trim().to_owned();
        // Each `sleep` the stub runs is a fork that is called `libvirtd` until it execs: looked
        // at until no such child is between fork and exec; another libvirtd would stay.
        let mut seen = String::new();
        let alone = wait_until(Duration::from_secs(5), || {
            seen = self.ok("pgrep -x libvirtd").0.trim().to_owned();
            seen == pid
        });
        assert!(alone, "the only libvirtd the scripts can see is the fake one ({pid}): {seen:?}");
        pid
    }

    fn hups(&self) -> usize {
        fs::read_to_string(self.at("/run/lockhook-test/libvirtd.hups")).unwrap_or_default().lines().count()
    }

    /// `dpkg ARGS` with stdin at EOF (as from a script); must succeed; returns stderr (where the
    /// maintainer scripts say what they did).
    fn dpkg(&self, args: &str) -> String {
        self.ok(&format!("dpkg {args}")).1
    }

    fn temp(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // EOF for the init: it exits, the kernel kills the rest of its PID namespace.
        drop(self.init_stdin.take());
        if !wait_until(Duration::from_secs(10), || matches!(self.unshare.try_wait(), Ok(Some(_)))) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.init).expect("pid")),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.unshare.wait();
        }
        if !std::thread::panicking() {
            assert_eq!(host_state(), self.host_before, "the host's files and dpkg database are untouched");
        }
    }
}

fn texts(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Which of [`HOST_PATHS`] exist on the host, and what its dpkg database says of lockhook.
fn host_state() -> String {
    let mut state = String::new();
    for path in HOST_PATHS {
        let there = Path::new(path).symlink_metadata().is_ok();
        state.push_str(&format!("{path}: {there}\n"));
    }
    let query = Command::new("dpkg-query").args(["-W", "-f", "${Status} ${Version}", "lockhook"]).output();
    let query = query.expect("dpkg-query");
    state.push_str(&format!("dpkg: {}", String::from_utf8_lossy(&query.stdout)));
    state
}

/// Builds the package with `debian/build.sh`, as the README says, and returns a copy in `dir`.
/// Builds run one at a time: they share target/, and cargo-deb replaces any lockhook package in
/// target/debian with the one it builds (so that is left as a user's build would leave it).
fn build_package(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    fs::create_dir_all(root.join("target")).expect("mkdir target");
    let lock_file = fs::File::create(root.join("target/deb-test.lock")).expect("lock file");
    let _lock =
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).expect("flock");
    let output = Command::new("bash")
        .arg(root.join("debian/build.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("run debian/build.sh");
    let (stdout, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "debian/build.sh failed (cargo-deb is installed by tests/run-all.sh):\n{stdout}\n{stderr}"
    );
    let arch = Command::new("dpkg").arg("--print-architecture").output().expect("dpkg --print-architecture");
    let arch = String::from_utf8_lossy(&arch.stdout).trim().to_owned();
    let built = root.join(format!("target/debian/lockhook_{}-1_{arch}.deb", env!("CARGO_PKG_VERSION")));
    let copy = dir.join(built.file_name().expect("name"));
    fs::copy(&built, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    copy
}

/// `deb` rebuilt as version `version`, with `line` appended to its default config (a new
/// upstream default config, for dpkg's conffile handling, when not empty).
fn repack(deb: &Path, dir: &Path, version: &str, line: &str) -> PathBuf {
    let tree = dir.join(format!("tree-{version}"));
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("dpkg-deb");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control).expect("control");
    let text: Vec<String> = text
        .lines()
        .map(|l| if l.starts_with("Version: ") { format!("Version: {version}") } else { l.to_owned() })
        .collect();
    fs::write(&control, text.join("\n") + "\n").expect("write control");
    let conf = tree.join("etc/lockhook/lockhook.toml");
    let mut text = fs::read_to_string(&conf).expect("conf");
    text.push_str(line);
    fs::write(&conf, text).expect("write conf");
    let out = dir.join(format!("lockhook_{version}_repacked.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-b"]).arg(&tree).arg(&out));
    out
}

fn deb_arg(deb: &Path) -> String {
    deb.display().to_string()
}

/// Everything on stderr is a one-line note of lockhook's maintainer scripts (dpkg itself had
/// nothing to warn about).
fn assert_notes(stderr: &str, from: &str) {
    for line in stderr.lines() {
        assert!(line.starts_with("lockhook: "), "{from}: {line:?} in\n{stderr}");
    }
}

#[test]
#[ignore = "needs root and dpkg: tests/run-all.sh runs it"]
fn a_host_without_a_hook_gets_lockhook_as_its_qemu_hook_until_removed() {
    let sb = Sandbox::new(true);
    let deb = build_package(sb.temp());
    let libvirtd = sb.start_libvirtd();

    let err = sb.dpkg(&format!("-i {}", deb_arg(&deb)));
    assert_notes(&err, "dpkg -i");
    assert!(err.contains("installed hook /etc/libvirt/hooks/qemu -> /usr/sbin/lockhook"), "{err}");
    assert!(err.contains(&format!("sent SIGHUP to libvirtd (pid {libvirtd})")), "{err}");
    assert_eq!(sb.read_link(HOOK).as_deref(), Some("/usr/sbin/lockhook"));
    assert!(!sb.exists(QEMU_D));
    assert!(wait_until(Duration::from_secs(5), || sb.hups() == 1), "libvirtd got one SIGHUP");
    assert!(sb.exists(&format!("/run/lockhook/hup.{libvirtd}")), "told `lockhook doctor` when");
    let conf_text = sb.read(CONF);
    assert_eq!(
        conf_text,
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/lockhook.toml")).expect("conf")
    );
    let (conffiles, _) = sb.ok("cat /var/lib/dpkg/info/lockhook.conffiles");
    assert_eq!(conffiles.trim(), CONF);
    let mode = |p: &str| sb.at(p).metadata().expect("metadata").permissions().mode() & 0o7777;
    assert_eq!(mode("/run/lockhook"), 0o700);
    assert_eq!(mode("/var/lib/lockhook"), 0o755);
    assert_eq!(mode(CONF), 0o644);

    // systemd: the reconcile timer is enabled; the sanlock join is not (engine = "ofd").
    let log = sb.systemctl_log();
    assert!(
        log.lines().any(|l| l == "daemon-reload") && log.lines().any(|l| l == "enable --now lockhook-reconcile.timer"),
        "{log}"
    );
    assert!(!log.contains("sanlock"), "{log}");
    assert!(err.contains("enabled lockhook-reconcile.timer") && !err.contains("sanlock-join"), "{err}");
    let unit = sb.read("/usr/lib/systemd/system/lockhook-reconcile.service");
    assert!(unit.contains("ExecStart=/usr/sbin/lockhook reconcile"), "{unit}");
    let join = sb.read("/usr/lib/systemd/system/lockhook-sanlock-join.service");
    assert!(join.contains("ExecStart=/usr/sbin/lockhook sanlock join") && !join.contains("/usr/local"), "{join}");

    // The binary, its man pages (also found by name) and its completions.
    let (version, _) = sb.ok("lockhook --version");
    assert_eq!(version.trim(), format!("lockhook {}", env!("CARGO_PKG_VERSION")));
    sb.ok("lockhook status");
    for page in ["lockhook", "lockhook-status", "lockhook-check", "lockhook-run", "lockhook-doctor"] {
        let (text, _) = sb.ok(&format!("man -l /usr/share/man/man8/{page}.8.gz"));
        assert!(text.contains("lockhook"), "man -l {page}: {text}");
    }
    let (text, _) = sb.ok("man 8 lockhook-status");
    assert!(text.contains("lockhook status") || text.contains("lockhook-status"), "man 8 lockhook-status: {text}");
    let (complete, _) =
        sb.ok("bash -c 'source /usr/share/bash-completion/completions/lockhook && complete -p lockhook'");
    assert!(complete.contains("-F _lockhook lockhook"), "{complete}");
    for file in ["/usr/share/zsh/vendor-completions/_lockhook", "/usr/share/fish/vendor_completions.d/lockhook.fish"] {
        assert!(sb.read(file).contains("lockhook"), "{file}");
    }

    // Run again, the postinst changes nothing and prints nothing on stdout.
    let (out, err) = sb.ok(&format!("/var/lib/dpkg/info/lockhook.postinst configure {}-1", env!("CARGO_PKG_VERSION")));
    assert_eq!(out, "", "postinst stdout");
    assert_notes(&err, "postinst again");
    assert!(!err.contains("installed"), "{err}");
    assert_eq!(sb.read_link(HOOK).as_deref(), Some("/usr/sbin/lockhook"));
    assert!(!sb.exists(QEMU_D), "no second entry");

    // Remove: the hook goes (libvirt is told), the config and the lockspace stay.
    sb.ok("echo lease > /var/lib/lockhook/lease-data");
    let (out, err) = sb.ok("/var/lib/dpkg/info/lockhook.prerm remove");
    assert_eq!(out, "", "prerm stdout");
    assert!(err.contains("removed /etc/libvirt/hooks/qemu"), "{err}");
    let err = sb.dpkg("-r lockhook");
    assert_notes(&err, "dpkg -r");
    assert!(!err.contains("removed"), "prerm again has nothing to remove: {err}");
    assert!(sb.read_link(HOOK).is_none(), "hook removed");
    assert!(!sb.exists("/usr/sbin/lockhook") && !sb.exists("/usr/share/man/man8/lockhook.8.gz"));
    assert_eq!(sb.read(CONF), conf_text, "config kept");
    assert!(sb.exists("/var/lib/lockhook/lease-data"));
    let log = sb.systemctl_log();
    for unit in ["lockhook-reconcile.timer", "lockhook-reconcile.service", "lockhook-sanlock-join.service"] {
        assert!(log.lines().any(|l| l == format!("disable --now {unit}")), "{unit}: {log}");
    }
    assert!(log.lines().filter(|l| *l == "daemon-reload").count() >= 2, "postrm reloads systemd: {log}");
    assert!(sb.hups() >= 2, "libvirtd was told the hook went");
    let (status, _) = sb.ok("dpkg-query -W -f '${Status}' lockhook");
    assert_eq!(status, "deinstall ok config-files");
    let (out, _) = sb.ok("/var/lib/dpkg/info/lockhook.postrm remove");
    assert_eq!(out, "", "postrm stdout");

    // Purge: the config goes; the lockspace never.
    let err = sb.dpkg("--purge lockhook");
    assert_notes(&err, "dpkg --purge");
    assert!(err.contains("removed /etc/lockhook"), "{err}");
    assert!(!sb.exists("/etc/lockhook"));
    assert!(sb.exists("/var/lib/lockhook/lease-data"), "lockspace kept");
    let out = sb.sh("dpkg-query -W lockhook");
    assert!(!out.status.success(), "purged: {out:?}");
}

#[test]
#[ignore = "needs root and dpkg: tests/run-all.sh runs it"]
fn an_administrators_qemu_hook_stays_and_lockhook_joins_it_in_qemu_d() {
    let sb = Sandbox::new(false);
    let deb = build_package(sb.temp());
    let admin = "#!/bin/sh\n# the administrator's own hook\nexit 0\n";
    sb.install_file(HOOK, admin, 0o755);

    let err = sb.dpkg(&format!("-i {}", deb_arg(&deb)));
    assert_notes(&err, "dpkg -i");
    assert!(
        err.contains("kept the existing /etc/libvirt/hooks/qemu; installed /etc/libvirt/hooks/qemu.d/50-lockhook"),
        "{err}"
    );
    assert!(err.contains("systemd is not running") && err.contains("libvirtd/virtqemud is not running"), "{err}");
    assert_eq!(sb.systemctl_log(), "", "no systemd: no systemctl");
    assert_eq!(sb.read(HOOK), admin, "the administrator's hook is untouched");
    assert!(sb.read_link(HOOK).is_none());
    assert_eq!(sb.read_link(QEMU_D).as_deref(), Some("/usr/sbin/lockhook"));

    let err = sb.dpkg(&format!("-i {}", deb_arg(&deb)));
    assert!(!err.contains("installed /etc"), "a reinstall changes nothing: {err}");
    let (entries, _) = sb.ok("ls -A /etc/libvirt/hooks/qemu.d");
    assert_eq!(entries.trim(), "50-lockhook");

    let err = sb.dpkg("-r lockhook");
    assert!(err.contains("removed /etc/libvirt/hooks/qemu.d/50-lockhook"), "{err}");
    assert!(!sb.exists(QEMU_D));
    assert_eq!(sb.read(HOOK), admin, "the administrator's hook stays");
    sb.dpkg("--purge lockhook");
    assert_eq!(sb.read(HOOK), admin);
}

#[test]
#[ignore = "needs root and dpkg: tests/run-all.sh runs it"]
fn an_install_sh_installation_stays_the_hook() {
    let sb = Sandbox::new(false);
    let deb = build_package(sb.temp());
    sb.ok("mkdir -p /etc/libvirt/hooks && ln -s /usr/local/sbin/lockhook /etc/libvirt/hooks/qemu");

    let err = sb.dpkg(&format!("-i {}", deb_arg(&deb)));
    assert!(err.contains("/etc/libvirt/hooks/qemu -> /usr/local/sbin/lockhook (install.sh?) stays the hook"), "{err}");
    assert_eq!(sb.read_link(HOOK).as_deref(), Some("/usr/local/sbin/lockhook"));
    assert!(!sb.exists(QEMU_D), "never two lockhooks as hooks");
    sb.dpkg("-r lockhook");
    assert_eq!(sb.read_link(HOOK).as_deref(), Some("/usr/local/sbin/lockhook"), "not ours: kept");
}

#[test]
#[ignore = "needs root and dpkg: tests/run-all.sh runs it"]
fn an_upgrade_keeps_the_hook_and_the_administrators_config() {
    let sb = Sandbox::new(true);
    let v1 = build_package(sb.temp());
    let (v2_version, v3_version) =
        (format!("{}-2", env!("CARGO_PKG_VERSION")), format!("{}-3", env!("CARGO_PKG_VERSION")));
    let v2 = repack(&v1, sb.temp(), &v2_version, "");
    let v3 = repack(&v1, sb.temp(), &v3_version, "# a new upstream default\n");
    sb.dpkg(&format!("-i {}", deb_arg(&v1)));
    let libvirtd = sb.start_libvirtd();

    // The administrator switches to the sanlock engine.
    sb.ok(&format!(
        "sed -i -e 's/^engine = \"ofd\"/engine = \"sanlock\"/' -e 's/^# host_id = 1/host_id = 1/' \
         -e 's|^# lease_area = .*|lease_area = \"/dev/vg_san/lockhook\"|' {CONF}"
    ));
    let edited = sb.read(CONF);
    assert!(edited.contains("\nengine = \"sanlock\"") && edited.contains("\nhost_id = 1"), "{edited}");

    // The same package again, then a new version with the same default config.
    for deb in [&v1, &v2] {
        let before = sb.systemctl_log().len();
        let err = sb.dpkg(&format!("-i {}", deb_arg(deb)));
        assert_notes(&err, "dpkg -i");
        assert!(!err.contains("removed"), "an upgrade keeps the hook: {err}");
        assert!(err.contains(&format!("sent SIGHUP to libvirtd (pid {libvirtd})")), "{err}");
        let log = sb.systemctl_log()[before..].to_owned();
        assert!(!log.contains("disable"), "an upgrade keeps the units: {log}");
        assert!(log.lines().any(|l| l == "enable lockhook-sanlock-join.service"), "engine = sanlock: {log}");
        assert_eq!(sb.read_link(HOOK).as_deref(), Some("/usr/sbin/lockhook"));
        assert_eq!(sb.read(CONF), edited, "the administrator's config stays");
    }
    let (version, _) = sb.ok("dpkg-query -W -f '${Version}' lockhook");
    assert_eq!(version, v2_version);

    // A new default config: with --force-confold and no stdin, dpkg keeps the administrator's and
    // puts the new one beside it.
    let err = sb.dpkg(&format!("-i --force-confold {}", deb_arg(&v3)));
    assert!(err.contains("\n ==> Using current old file as you requested.\n"), "{err}");
    let dpkg_says = |l: &&str| l.is_empty() || l.starts_with("Configuration file ") || l.starts_with(" ==> ");
    let ours: String = err.lines().filter(|l| !dpkg_says(l)).map(|l| format!("{l}\n")).collect();
    assert_notes(&ours, "dpkg -i --force-confold");
    assert!(!err.contains("removed"), "{err}");
    assert_eq!(sb.read(CONF), edited, "the administrator's config stays");
    assert!(sb.read(&format!("{CONF}.dpkg-dist")).ends_with("# a new upstream default\n"));
    let (version, _) = sb.ok("dpkg-query -W -f '${Version} ${Status}' lockhook");
    assert_eq!(version, format!("{v3_version} install ok installed"));
    assert_eq!(sb.read_link(HOOK).as_deref(), Some("/usr/sbin/lockhook"));
    sb.ok("lockhook --config /etc/lockhook/lockhook.toml status");
}
