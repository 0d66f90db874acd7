//! Shared test helpers: the built binary, a temp lockhook setup, running the hook as libvirt
//! does, and (in `libvirtd`) a private libvirtd.

pub mod host;
pub mod libvirtd;
pub mod sanlock;
pub mod xml;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub use libvirtd::wait_until;

/// The lockhook binary under test.
pub fn lockhook_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lockhook"))
}

/// A throw-away lockhook installation: config, run dir, lockspace, and a `qemu` symlink to the
/// binary (so `argv[0]` is what libvirt uses).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub hook: PathBuf,
}

impl Setup {
    pub fn new(extra_config: &str) -> Setup {
        Setup::with_lockspace(extra_config, None)
    }

    /// A setup whose lockspace is `lockspace` (shared with another simulated host) instead of its
    /// own.
    pub fn with_lockspace(extra_config: &str, lockspace: Option<&Path>) -> Setup {
        let dir = tempfile::Builder::new().prefix("lockhook-test-").tempdir().expect("temp dir");
        let lockspace = lockspace.map(Path::to_owned).unwrap_or_else(|| dir.path().join("lockspace"));
        std::fs::create_dir_all(&lockspace).expect("mkdir lockspace");
        let run_dir = dir.path().join("run");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).expect("mkdir etc");
        let config = etc.join("lockhook.toml");
        let text = format!(
            "run_dir = {:?}\nlockspace_dir = {:?}\nlog_file = {:?}\nlog_level = \"debug\"\n{extra_config}",
            run_dir,
            lockspace,
            dir.path().join("lockhook.log"),
        );
        std::fs::write(&config, text).expect("write config");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod config");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir bin");
        let hook = bin.join("qemu");
        std::os::unix::fs::symlink(lockhook_bin(), &hook).expect("symlink hook");
        Setup { dir, config, run_dir, hook }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse image file of 1 MiB.
    pub fn image(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir image dir");
        }
        std::fs::File::create(&path).and_then(|f| f.set_len(1 << 20)).expect("create image");
        path
    }

    /// Calls the hook as libvirt does: `qemu ARGS` with `xml` on stdin and both output pipes
    /// captured until EOF. Fails the test if the pipes stay open (a holder that inherited them
    /// would hang libvirt the same way).
    pub fn hook(&self, args: &[&str], xml: &str) -> Output {
        let mut cmd = Command::new(&self.hook);
        cmd.args(args).env("LOCKHOOK_CONFIG", &self.config);
        run_with_stdin(cmd, xml.as_bytes(), Duration::from_secs(20))
    }

    /// Starts the hook as `hook` calls it, stalled at `LOCKHOOK_FAULT=fault` (see `guest::fault_point`),
    /// and returns at once with `xml` written to its stdin (closed) and its output pipes open.
    pub fn start_hook(&self, args: &[&str], xml: &str, fault: &str) -> std::process::Child {
        let mut hook = Command::new(&self.hook)
            .args(args)
            .env("LOCKHOOK_CONFIG", &self.config)
            .env("LOCKHOOK_FAULT", fault)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hook");
        hook.stdin.take().expect("stdin").write_all(xml.as_bytes()).expect("write xml");
        hook
    }

    /// `lockhook --config <ours> ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(lockhook_bin());
        cmd.arg("--config").arg(&self.config).args(args);
        run_with_stdin(cmd, b"", Duration::from_secs(20))
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status --json failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("lockhook.log")).unwrap_or_default()
    }
}

impl Drop for Setup {
    /// Holders (and the spare) started for this setup outlive the hook that started them; a
    /// test that fails halfway leaves some behind. They are found by their `--config` argument.
    fn drop(&mut self) {
        let config = self.config.display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for pid in procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = cmdline.split(|b| *b == 0).any(|arg| arg == config.as_bytes());
            if ours && cmdline.starts_with(b"lockhook\0holder\0") {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        // The run directory's census semaphore set lives in the kernel, not in the directory.
        lockhook::census::Census::remove(&lockhook::paths::Paths::new(&self.run_dir));
    }
}

/// Runs `cmd` with `stdin` fed and stdout/stderr captured until EOF, within `timeout`.
pub fn run_with_stdin(mut cmd: Command, stdin: &[u8], timeout: Duration) -> Output {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut pipe = child.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    // A hook may exit without reading stdin (libvirt ignores EPIPE too).
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for child"),
        Err(_) => panic!("pid {pid}: output pipes still open after {timeout:?} (a child kept them?)"),
    };
    let _ = writer.join();
    out
}

/// Whether someone holds a lock on byte `offset` of `path`, and which.
pub fn lock_state(path: &Path, offset: u64) -> Option<lockhook::lock::LockMode> {
    lockhook::lock::probe(path, offset).expect("probe").0
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `qemu-nbd` server exporting `image` as `export` on the unix socket `socket`, killed on drop.
pub struct Nbd(std::process::Child);

impl Nbd {
    pub fn serve(image: &Path, export: &str, socket: &Path) -> Nbd {
        let nbd = Nbd(Command::new("qemu-nbd")
            .args(["--persistent", "--shared=4", "-f", "raw", "-x", export, "-k"])
            .arg(socket)
            .arg(image)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils)"));
        assert!(wait_until(Duration::from_secs(10), || socket.exists()), "qemu-nbd listens on {}", socket.display());
        nbd
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd`, asserting it succeeds; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device over `target` (a file or a block device) from byte `offset`; detached on drop,
/// so a failing test leaves none behind.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn attach(target: &Path) -> Loop {
        Loop::at(target, 0)
    }

    pub fn at(target: &Path, offset: u64) -> Loop {
        let out = run_ok(Command::new("losetup").args(["-f", "--show", "-o", &offset.to_string()]).arg(target));
        Loop { dev: out.trim().to_owned() }
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

/// A loop device over a new 8 MiB file with two partitions (`partx` makes their nodes without
/// udev); partitions and device removed on drop.
pub struct LoopDisk {
    pub dev: String,
    _loop: Loop,
}

impl LoopDisk {
    pub fn new(file: &Path) -> LoopDisk {
        std::fs::File::create(file).and_then(|f| f.set_len(8 << 20)).expect("create");
        let mut sfdisk = Command::new("sfdisk");
        sfdisk.arg("-q").arg(file).stdin(std::process::Stdio::piped());
        let mut child = sfdisk.spawn().expect("sfdisk (fdisk package)");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"label: dos\n,3M\n,3M\n").expect("write");
        assert!(child.wait().expect("wait").success(), "sfdisk");
        let device = Loop::attach(file);
        let disk = LoopDisk { dev: device.dev.clone(), _loop: device };
        run_ok(Command::new("partx").args(["-a", &disk.dev]));
        assert!(Path::new(&disk.part(1)).exists() && Path::new(&disk.part(2)).exists(), "partition nodes");
        disk
    }

    pub fn part(&self, n: u32) -> String {
        format!("{}p{n}", self.dev)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        // Before the loop device itself goes (the field is dropped after this).
        let _ = Command::new("partx").args(["-d", &self.dev]).output();
    }
}
