//! Small helpers shared by the parts: timed commands, `/proc` readers, disk XML, orphan reaping.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::libvirtd::Libvirtd;

/// Milliseconds of a duration, as `f64`.
pub fn to_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The environment libvirt gives a hook (and that we give the daemons' tools): nothing but these.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("HOME", "/root")
}

/// `nsenter` into a fixture's namespaces, built directly (not through `Libvirtd::exec_in_ns`,
/// which polls its child every 5 ms: too coarse for timing).
pub fn ns_command(lv: &Libvirtd, argv: &[&str]) -> Command {
    // `ns_path("/")` is `/proc/<namespace holder pid>/root/`.
    let root = lv.ns_path(Path::new("/"));
    let pid: u32 = root
        .components()
        .nth(2)
        .and_then(|c| c.as_os_str().to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ns_path {}", root.display()));
    let mut cmd = Command::new("nsenter");
    clean_env(&mut cmd)
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .arg(format!("--uts=/proc/{pid}/ns/uts"))
        .arg("--")
        .args(argv)
        .stdin(Stdio::null());
    cmd
}

/// Runs `virsh -c qemu:///system ARGS` in the fixture's namespaces; returns (wall ms, output).
pub fn timed_virsh(lv: &Libvirtd, args: &[&str]) -> (f64, Output) {
    let mut argv = vec!["virsh", "-c", crate::libvirtd::URI];
    argv.extend_from_slice(args);
    let mut cmd = ns_command(lv, &argv);
    let t0 = Instant::now();
    let out = cmd.output().expect("run nsenter virsh");
    (to_ms(t0.elapsed()), out)
}

pub fn describe_failure(what: &str, out: &Output) -> String {
    format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Runs `cmd` the way libvirt runs a hook: `stdin` written to a pipe, stdout and stderr read to
/// EOF, then the exit status. Returns (wall ms, output).
pub fn timed_with_stdin(cmd: &mut Command, stdin: &[u8]) -> (f64, Output) {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn the hook");
    let mut pipe = child.stdin.take().expect("stdin pipe");
    let out = if stdin.len() <= 60 * 1024 {
        // Fits in the pipe buffer: no thread needed. A child that exits without reading gives
        // EPIPE, which libvirt ignores too.
        let _ = pipe.write_all(stdin);
        drop(pipe);
        child.wait_with_output()
    } else {
        let input = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
        let out = child.wait_with_output();
        let _ = writer.join();
        out
    }
    .expect("wait for the hook");
    (to_ms(t0.elapsed()), out)
}

/// A sparse file of `size` bytes.
pub fn sparse_image(path: &Path, size: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir image dir");
    }
    fs::File::create(path).and_then(|f| f.set_len(size)).expect("create sparse image");
}

/// libvirt-style disk target names: vda..vdz, vdaa, vdab, ...
pub fn dev_name(mut i: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + u8::try_from(i % 26).expect("< 26"));
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8(letters).expect("ascii"))
}

/// A raw virtio file disk.
pub fn raw_disk(path: &Path, index: usize) -> String {
    format!(
        "    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
         <target dev='{}' bus='virtio'/></disk>\n",
        path.display(),
        dev_name(index)
    )
}

pub fn disks_xml(paths: &[PathBuf]) -> String {
    paths.iter().enumerate().map(|(i, p)| raw_disk(p, i)).collect()
}

/// `/proc/PID/comm`.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// `/proc/PID/cmdline` as a list of arguments.
pub fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Every pid on the system.
pub fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Memory of one process, KiB: (RSS, PSS, USS = private clean + private dirty).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss: f64,
    pub pss: f64,
    pub uss: f64,
}

pub fn mem(pid: u32) -> Option<Mem> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(Mem { rss: field("Rss:"), pss: field("Pss:"), uss: field("Private_Clean:") + field("Private_Dirty:") })
}

/// `(fd number, readlink target)` for every open fd of `pid`.
pub fn fds(pid: u32) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let fd = e.file_name().to_str()?.parse().ok()?;
                Some((fd, fs::read_link(e.path()).ok()?.display().to_string()))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// One line of `/proc/locks`.
#[derive(Debug, Clone)]
pub struct LockLine {
    /// `POSIX`, `OFDLCK`, `FLOCK`, ...
    pub kind: String,
    /// `READ` or `WRITE`.
    pub access: String,
    /// `-1` for OFD locks.
    pub pid: i64,
    pub ino: u64,
    pub dev: String,
    pub start: u64,
    pub end: String,
    pub raw: String,
}

pub fn proc_locks() -> Vec<LockLine> {
    let text = fs::read_to_string("/proc/locks").unwrap_or_default();
    text.lines()
        .filter(|l| !l.contains("->")) // blocked waiters
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let id: Vec<&str> = f[5].split(':').collect();
            if id.len() != 3 {
                return None;
            }
            Some(LockLine {
                kind: f[1].to_owned(),
                access: f[3].to_owned(),
                pid: f[4].parse().ok()?,
                ino: id[2].parse().ok()?,
                dev: format!("{}:{}", id[0], id[1]),
                start: f[6].parse().ok()?,
                end: f[7].to_owned(),
                raw: l.trim().to_owned(),
            })
        })
        .collect()
}

/// `MAJ:MIN` of a file's device as `/proc/locks` prints it (`%02x:%02x`).
pub fn proc_locks_dev(path: &Path) -> (String, u64) {
    let meta = fs::metadata(path).expect("stat image");
    let dev = meta.dev();
    (format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev)), meta.ino())
}

/// Locks in `/proc/locks` on `path`'s inode.
pub fn locks_on(path: &Path) -> Vec<LockLine> {
    let (dev, ino) = proc_locks_dev(path);
    proc_locks().into_iter().filter(|l| l.ino == ino && l.dev == dev).collect()
}

/// Makes this process the reaper of its orphaned descendants (holders whose hook exited,
/// daemonized libvirtds): the sandbox's pid 1 does not reap, so they would stay zombies.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag of this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!("bench: warning: cannot become a child subreaper: {}", std::io::Error::last_os_error());
    }
}

/// Whether a child with this comm is an orphan that nobody but us (its subreaper) waits for:
/// QEMU (libvirt daemonizes guests, and its capability probes of every `qemu-system-*` use
/// `-daemonize`) or a lockhook holder or spare (`lockhook-holder`, `lockhook-spare`; `exe` before
/// they named themselves). None of our own `Command`s is named so.
fn adopted(comm: &str) -> bool {
    comm.starts_with("qemu-system-") || comm.starts_with("lockhook-") || comm == "exe"
}

/// Reaps adopted QEMUs and holders within ~5 ms of their exit, as systemd would on a real host.
///
/// libvirt's `virsh destroy` polls `kill(pid, 0)` every 200 ms until the QEMU pid is gone, so a
/// zombie QEMU blocks it: with this sandbox's pid 1 (which reaps orphans only about once a
/// second) destroy times would measure pid 1, and with us as subreaper and no prompt reaping,
/// destroy would hang ~15 s per guest. Only `adopted` children are reaped here, by
/// pid, so a status `std::process::Child` waits for is never taken.
pub fn spawn_prompt_reaper() {
    std::thread::spawn(|| loop {
        for pid in own_children() {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let comm = &stat[open + 1..close];
            let zombie = stat[close + 1..].trim_start().starts_with('Z');
            if zombie && adopted(comm) {
                let mut status = 0;
                // SAFETY: waits for one specific zombie child of ours; WNOHANG never blocks.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    note_reaped(pid, status);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    });
}

/// pids of this process's children (`/proc/self/task/*/children`: adopted orphans may hang
/// under any of our threads).
fn own_children() -> Vec<i32> {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect()
}

/// Reaps every exited child. Only called when no `Command` of ours is in flight (between
/// measurements, on the main thread), so it never steals a status std is waiting for.
pub fn reap_orphans() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        note_reaped(pid, status);
    }
}

/// Exit statuses of reaped orphans (pid, wait status), newest last, to tell why a holder the
/// bench counted on is gone.
static REAPED: std::sync::Mutex<Vec<(i32, i32)>> = std::sync::Mutex::new(Vec::new());

fn note_reaped(pid: i32, status: i32) {
    if let Ok(mut v) = REAPED.lock() {
        if v.len() >= 100_000 {
            v.drain(..50_000);
        }
        v.push((pid, status));
    }
}

/// How the reaped orphan `pid` ended (its latest exit), if the bench reaped it.
pub fn exit_of(pid: u32) -> Option<String> {
    let pid = i32::try_from(pid).ok()?;
    let v = REAPED.lock().ok()?;
    let &(_, status) = v.iter().rev().find(|(p, _)| *p == pid)?;
    Some(if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    })
}

/// A process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// The order of `n` configurations in round `r`: rotated by one each round, so every
/// configuration runs in every position equally often (no systematic first-in-round cost).
pub fn rotation(n: usize, r: usize) -> Vec<usize> {
    (0..n).map(|i| (i + r) % n).collect()
}

/// Output of a shell command (for the report header), trimmed; empty on failure.
pub fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The variable that makes the bench binary a probe child (see `cpu_probe`).
pub const CPU_PROBE: &str = "LOCKHOOK_BENCH_CPU_PROBE";

/// In a fresh process: the first `is_x86_feature_detected!` (std's CPU feature detection, which
/// the first `memchr` of every process runs: quick-xml's and serde_json's byte searches, so every
/// hook call that reads XML or JSON), then one `cpuid`; both in µs on stdout.
pub fn cpu_probe_child() {
    #[cfg(target_arch = "x86_64")]
    {
        let t = Instant::now();
        std::hint::black_box(std::is_x86_feature_detected!("avx2"));
        let detect = t.elapsed();
        let t = Instant::now();
        const N: u32 = 200;
        for _ in 0..N {
            // Leaf 7, subleaf 0: feature flags, as std_detect reads them.
            std::hint::black_box(std::arch::x86_64::__cpuid_count(7, 0));
        }
        let cpuid = t.elapsed() / N;
        println!("{} {}", detect.as_secs_f64() * 1e6, cpuid.as_secs_f64() * 1e6);
    }
}

/// What std's CPU feature detection costs a fresh process here (ms, one sample per process, so
/// that each pays it once, as a hook call does) and what one `cpuid` costs (µs, median). In a VM
/// `cpuid` traps to the hypervisor: what costs nanoseconds on bare metal costs microseconds.
pub fn cpu_probe(samples: usize) -> Option<(Vec<f64>, f64)> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let me = std::env::current_exe().ok()?;
    let mut detect = Vec::new();
    let mut cpuid = Vec::new();
    for _ in 0..samples {
        let out = Command::new(&me).env(CPU_PROBE, "1").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fields = text.split_whitespace().map(str::parse::<f64>);
        detect.push(fields.next()?.ok()? / 1000.0);
        cpuid.push(fields.next()?.ok()?);
    }
    Some((detect, crate::stats::median(&cpuid)))
}
