//! Part 2: the hook alone, called as libvirt calls it (argv `NAME OP SUBOP -`, the domain XML on
//! stdin, program name `qemu` through a symlink, a clean environment plus `LOCKHOOK_CONFIG`),
//! for 1, 16, 64 and 256 disks, interleaved with a bare `exec /bin/true`; the same calls with
//! `engine = "sanlock"` against a private sanlock daemon, in the same rounds, when sanlock is
//! installed (loudly skipped when not).

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::libvirtd::{guest_xml, random_uuid};
use crate::report::{table, Report};
use crate::sanlock_daemon::{self, SanlockDaemon};
use crate::stats::{fit, median, ms, paired_diff, signed_ms, signed_with_ci, signed_with_iqr, summary, with_iqr};
use crate::util;

/// A throw-away lockhook set-up: config, run dir, lockspace and the `qemu` symlink.
pub struct HookEnv {
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub hook: PathBuf,
    /// Set for the hook on top of the clean environment (its holders inherit it).
    pub env: Vec<(&'static str, PathBuf)>,
}

impl HookEnv {
    /// `dir` holds the config and symlink; `run_dir` is where holders keep their files.
    pub fn new(dir: &Path, run_dir: &Path, lockhook: &Path) -> HookEnv {
        HookEnv::with_config(dir, run_dir, lockhook, "")
    }

    /// Like `new`, with `extra` appended to the config.
    pub fn with_config(dir: &Path, run_dir: &Path, lockhook: &Path, extra: &str) -> HookEnv {
        fs::create_dir_all(dir.join("etc")).expect("mkdir etc");
        fs::create_dir_all(dir.join("bin")).expect("mkdir bin");
        let config = dir.join("etc/lockhook.toml");
        fs::write(&config, format!("run_dir = {:?}\nlockspace_dir = {:?}\n{extra}", run_dir, dir.join("lockspace")))
            .expect("write config");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod config");
        let hook = dir.join("bin/qemu");
        let _ = fs::remove_file(&hook);
        std::os::unix::fs::symlink(lockhook, &hook).expect("symlink qemu -> lockhook");
        HookEnv { config, run_dir: run_dir.to_owned(), hook, env: Vec::new() }
    }

    /// `qemu NAME OP SUBOP -` with `xml` on stdin; (wall ms, output).
    pub fn call(&self, name: &str, op: &str, sub: &str, xml: &str) -> (f64, Output) {
        let mut cmd = Command::new(&self.hook);
        util::clean_env(&mut cmd).env("LOCKHOOK_CONFIG", &self.config).args([name, op, sub, "-"]);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        util::timed_with_stdin(&mut cmd, xml.as_bytes())
    }

    /// Like `call`, panicking unless it exits 0 and prints nothing.
    pub fn call_ok(&self, name: &str, op: &str, sub: &str, xml: &str) -> f64 {
        let (t, out) = self.call(name, op, sub, xml);
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "{}",
            util::describe_failure(&format!("hook {name} {op}"), &out)
        );
        t
    }

    /// The holder of `uuid`: from its state file, else by its command line.
    pub fn holder_pid(&self, uuid: &str) -> Option<u32> {
        let from_state = fs::read(self.run_dir.join(format!("{uuid}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["holder_pid"].as_u64())
            .and_then(|p| u32::try_from(p).ok());
        from_state.or_else(|| {
            util::all_pids().into_iter().find(|&p| {
                let args = util::cmdline(p);
                args.iter().any(|a| a == "holder") && args.iter().any(|a| a == uuid)
            })
        })
    }
}

/// A directory on tmpfs for run dirs (production's /run is a tmpfs; here /tmp may be a disk).
pub fn tmpfs_dir(prefix: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix(prefix).tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") });
    b.expect("create a tmpfs temp dir")
}

pub const SIZES: [usize; 4] = [1, 16, 64, 256];

struct Guest {
    label: String,
    n: usize,
    name: String,
    uuid: String,
    xml: String,
    env: usize,
}

#[derive(Default, Clone)]
struct Samples {
    prepare: Vec<f64>,
    start: Vec<f64>,
    release: Vec<f64>,
}

/// sanlock's I/O timeout in the bench's lockspace (joining takes about 2x).
const SANLOCK_IO_TIMEOUT: u32 = 2;
/// Where the sanlock engine's `HookEnv` is in `envs` (0: OFD on tmpfs, 1: OFD on the work disk).
const SANLOCK_ENV: usize = 2;
/// Fresh processes timed for std's CPU feature detection (see `util::cpu_probe`).
const CPU_PROBES: usize = 21;

/// The sanlock engine's set-up: a private daemon and a file lease area, formatted and joined.
/// Fields drop in order: holders are stopped (`stop_holders`) before the daemon.
struct SanlockSetup {
    daemon: SanlockDaemon,
    join_s: f64,
    area_fs: String,
}

/// Starts the daemon, writes the sanlock engine's config, runs `lockhook sanlock init` and
/// `lockhook sanlock join`; `Err` says why the sanlock rows cannot run.
fn sanlock_setup(dir: &Path, run_dir: &Path, lockhook: &Path) -> Result<(SanlockSetup, HookEnv), String> {
    if let Some(missing) = sanlock_daemon::missing() {
        return Err(missing);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let daemon_dir = tempfile::Builder::new()
        .prefix("sanlock-")
        .tempdir_in(dir)
        .map_err(|e| format!("temp dir in {}: {e}", dir.display()))?;
    let daemon = SanlockDaemon::try_start(daemon_dir, "lockhook-bench")?;
    let area = dir.join("lease-area");
    let mut env = HookEnv::with_config(
        dir,
        run_dir,
        lockhook,
        &format!(
            "engine = \"sanlock\"\n[sanlock]\nhost_id = 1\nlease_area = {area:?}\nio_timeout = {SANLOCK_IO_TIMEOUT}\n"
        ),
    );
    env.env.push(("SANLOCK_RUN_DIR", daemon.run_dir.clone()));
    let admin = |action: &str| -> Result<(), String> {
        let mut cmd = Command::new(lockhook);
        util::clean_env(&mut cmd).env("LOCKHOOK_CONFIG", &env.config).env("SANLOCK_RUN_DIR", &daemon.run_dir);
        let out = cmd.args(["sanlock", action]).output().map_err(|e| format!("lockhook sanlock {action}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}\nsanlock daemon log:\n{}",
                util::describe_failure(&format!("lockhook sanlock {action}"), &out),
                daemon.log()
            ))
        }
    };
    admin("init")?;
    let t0 = Instant::now();
    admin("join")?;
    let join_s = t0.elapsed().as_secs_f64();
    let area_fs = util::sh(&format!("findmnt -n -o FSTYPE -T {}", dir.display()));
    Ok((SanlockSetup { daemon, join_s, area_fs }, env))
}

/// Stops, by pid, every holder (spares too) still running with this config: SIGTERM, then
/// SIGKILL after 5 s.
pub fn stop_holders(config: &Path) {
    let config = config.display().to_string();
    let pids: Vec<u32> = util::all_pids()
        .into_iter()
        .filter(|&p| {
            let args = util::cmdline(p);
            args.iter().any(|a| a == "holder") && args.contains(&config) && util::alive(p)
        })
        .collect();
    let signal = |pid: u32, sig: Signal| {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    };
    for &pid in &pids {
        signal(pid, Signal::SIGTERM);
    }
    for &pid in &pids {
        if !crate::libvirtd::wait_until(Duration::from_secs(5), || !util::alive(pid)) {
            eprintln!("bench: warning: holder {pid} ignored SIGTERM; killing it");
            signal(pid, Signal::SIGKILL);
        }
    }
    util::reap_orphans();
}

/// The leases `sanlock client status` shows held: (by `pid`, in all).
fn sanlock_leases(daemon: &SanlockDaemon, pid: Option<u32>) -> (usize, usize) {
    let out = daemon.cli().arg("status").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let text = out.unwrap_or_default();
    let leases: Vec<&str> = text.lines().filter(|l| l.starts_with("r ")).collect();
    let by = pid.map_or(0, |p| leases.iter().filter(|l| l.ends_with(&format!(" p {p}"))).count());
    (by, leases.len())
}

/// One read of `/proc/locks`; its wall ms. The kernel takes `file_rwsem` for writing to list the
/// locks, which waits for an RCU grace period unless the previous writer was a few tens of ms
/// ago: a hook call that reads it (reconcile, when this host has guests) long after any other
/// pays that wait.
fn proc_locks_read() -> f64 {
    let t0 = Instant::now();
    let _ = fs::read("/proc/locks");
    util::to_ms(t0.elapsed())
}

/// `/proc/locks` read cold (250 ms after the previous read) and warm (right after one).
fn proc_locks_cold_warm() -> (Vec<f64>, Vec<f64>) {
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(250));
        cold.push(proc_locks_read());
        warm.push(proc_locks_read());
    }
    (cold, warm)
}

pub fn run(work: &Path, lockhook: &Path, rounds: usize, report: &mut Report) {
    let dir = work.join("hook-alone");
    let shm = tmpfs_dir("lockhook-bench-run-");
    let mut envs = vec![
        HookEnv::new(&dir.join("tmpfs"), &shm.path().join("run"), lockhook),
        HookEnv::new(&dir.join("ext4"), &dir.join("ext4/run"), lockhook),
    ];
    let sanlock = match sanlock_setup(&dir.join("sanlock"), &shm.path().join("run-sanlock"), lockhook) {
        Ok((setup, env)) => {
            eprintln!(
                "bench: part 2: sanlock engine: private daemon pid {}, joined in {:.1} s",
                setup.daemon.pid(),
                setup.join_s
            );
            envs.push(env);
            Ok(setup)
        }
        Err(why) => {
            eprintln!(
                "\nbench: ************************************************************\n\
                 bench: SANLOCK ENGINE ROWS SKIPPED: {why}\n\
                 bench: ************************************************************\n"
            );
            Err(why)
        }
    };
    let max = SIZES[SIZES.len() - 1];
    let images: Vec<PathBuf> = (0..max).map(|i| dir.join(format!("img/disk-{i}.raw"))).collect();
    for p in &images {
        util::sparse_image(p, 1 << 20);
    }
    let mut guests: Vec<Guest> = SIZES
        .iter()
        .map(|&n| {
            let (name, uuid) = (format!("h{n}"), random_uuid());
            let xml = guest_xml(&name, &uuid, &util::disks_xml(&images[..n]));
            Guest { label: format!("{n}"), n, name, uuid, xml, env: 0 }
        })
        .collect();
    let fs_type = util::sh(&format!("findmnt -n -o FSTYPE -T {}", dir.display()));
    {
        let uuid = random_uuid();
        let xml = guest_xml("h1e", &uuid, &util::disks_xml(&images[..1]));
        guests.push(Guest { label: format!("1, run_dir on {fs_type}"), n: 1, name: "h1e".into(), uuid, xml, env: 1 });
    }
    if sanlock.is_ok() {
        for &n in &SIZES {
            let (name, uuid) = (format!("s{n}"), random_uuid());
            let xml = guest_xml(&name, &uuid, &util::disks_xml(&images[..n]));
            guests.push(Guest { label: format!("{n}, sanlock engine"), n, name, uuid, xml, env: SANLOCK_ENV });
        }
    }
    let true_xml = guests[0].xml.clone();

    // Verify once that a 64-disk prepare really locks every image, and release frees them.
    let verify = {
        let g = guests.iter().find(|g| g.n == 64).expect("64-disk guest");
        let env = &envs[g.env];
        env.call_ok(&g.name, "prepare", "begin", &g.xml);
        let locked = images[..64]
            .iter()
            .filter(|p| util::locks_on(p).iter().any(|l| l.kind == "OFDLCK" && l.access == "WRITE" && l.start == 0))
            .count();
        let pid = env.holder_pid(&g.uuid);
        env.call_ok(&g.name, "release", "end", &g.xml);
        let gone = crate::libvirtd::wait_until(Duration::from_secs(5), || pid.iter().all(|&p| !util::alive(p)));
        let left = images[..64].iter().filter(|p| util::locks_on(p).iter().any(|l| l.kind == "OFDLCK")).count();
        format!(
            "- hook alone: after `prepare` of 64 disks, {locked}/64 images carry an OFD WRITE lock on byte 0 \
             (holder pid {}); after `release`: {left} locked, holder {}",
            pid.map_or_else(|| "?".into(), |p| p.to_string()),
            if gone { "exited" } else { "STILL RUNNING" }
        )
    };
    let verify_sanlock = match &sanlock {
        Ok(setup) => {
            let g = guests.iter().find(|g| g.n == 64 && g.env == SANLOCK_ENV).expect("64-disk sanlock guest");
            let env = &envs[g.env];
            env.call_ok(&g.name, "prepare", "begin", &g.xml);
            let pid = env.holder_pid(&g.uuid);
            let (held, _) = sanlock_leases(&setup.daemon, pid);
            let ofd = images[..64]
                .iter()
                .filter(|p| util::locks_on(p).iter().any(|l| l.kind == "OFDLCK" && l.access == "WRITE" && l.start == 0))
                .count();
            env.call_ok(&g.name, "release", "end", &g.xml);
            let gone = crate::libvirtd::wait_until(Duration::from_secs(30), || pid.iter().all(|&p| !util::alive(p)));
            let (_, left) = sanlock_leases(&setup.daemon, None);
            format!(
                "\n- sanlock engine: after `prepare` of 64 disks, {ofd}/64 images carry an OFD WRITE lock and the \
                 holder (pid {}) holds {held} sanlock leases (`sanlock client status`); after `release`: {left} leases held, holder {}",
                pid.map_or_else(|| "?".into(), |p| p.to_string()),
                if gone { "exited" } else { "STILL RUNNING" }
            )
        }
        Err(_) => String::new(),
    };
    util::reap_orphans();

    // Warm-up (page cache, dentries, the binary's pages).
    for g in &guests {
        let env = &envs[g.env];
        env.call_ok(&g.name, "prepare", "begin", &g.xml);
        env.call_ok(&g.name, "release", "end", &g.xml);
    }

    let mut samples = vec![Samples::default(); guests.len()];
    let mut true_ms = Vec::new();
    let t0 = Instant::now();
    // Two blocks per round, each in an order rotated by one each round: the OFD calls and
    // `exec /bin/true` (index `guests.len()`), as without the sanlock rows, then the sanlock
    // engine's. Hook calls that follow a long pause run slower (cold caches, a spare holder idle
    // for longer), so a sanlock block's seconds must not come right before a timed OFD call:
    // one untimed OFD `prepare` and `release` precede each OFD block after the first.
    let ofd_block: Vec<usize> =
        (0..guests.len()).filter(|&i| guests[i].env != SANLOCK_ENV).chain([guests.len()]).collect();
    let sanlock_block: Vec<usize> = (0..guests.len()).filter(|&i| guests[i].env == SANLOCK_ENV).collect();
    let wait_gone = |pid: Option<u32>, env: usize| {
        // Not timed: the holder must be gone before this guest's next prepare. A sanlock holder
        // releases its leases, one sanlock call each, before it exits.
        if let Some(pid) = pid {
            let wait = Duration::from_secs(if env == SANLOCK_ENV { 30 } else { 5 });
            assert!(crate::libvirtd::wait_until(wait, || !util::alive(pid)), "holder {pid} outlived release");
        }
    };
    for r in 0..rounds {
        if r > 0 && !sanlock_block.is_empty() {
            let g = &guests[0];
            envs[g.env].call_ok(&g.name, "prepare", "begin", &g.xml);
            let pid = envs[g.env].holder_pid(&g.uuid);
            envs[g.env].call_ok(&g.name, "release", "end", &g.xml);
            wait_gone(pid, g.env);
        }
        let order = util::rotation(ofd_block.len(), r).into_iter().map(|i| ofd_block[i]);
        let order = order.chain(util::rotation(sanlock_block.len(), r).into_iter().map(|i| sanlock_block[i]));
        for item in order.collect::<Vec<_>>() {
            if item == guests.len() {
                let mut cmd = Command::new("/bin/true");
                util::clean_env(&mut cmd).args(["h1", "prepare", "begin", "-"]);
                let (t, out) = util::timed_with_stdin(&mut cmd, true_xml.as_bytes());
                assert!(out.status.success());
                true_ms.push(t);
                continue;
            }
            let g = &guests[item];
            let env = &envs[g.env];
            // Every timed call starts with `/proc/locks` warm (see `proc_locks_read`), as when
            // calls follow each other closely; a sanlock `prepare` takes long enough to cool it.
            let timed = |op: &str, sub: &str| {
                proc_locks_read();
                env.call_ok(&g.name, op, sub, &g.xml)
            };
            samples[item].prepare.push(timed("prepare", "begin"));
            samples[item].start.push(timed("start", "begin"));
            let pid = env.holder_pid(&g.uuid);
            samples[item].release.push(timed("release", "end"));
            wait_gone(pid, g.env);
        }
        util::reap_orphans();
    }
    eprintln!("bench: part 2 done: {rounds} rounds in {:.1} s", t0.elapsed().as_secs_f64());
    let (cold, warm) = proc_locks_cold_warm();

    // Report.
    let true_med = median(&true_ms);
    let mut text = format!(
        "## 2. The hook alone, as libvirt calls it ({rounds} interleaved rounds; ms, median (p25..p75))\n\n\
         `qemu NAME OP SUBOP -` (symlink to target/release/lockhook), domain XML on stdin, stdout/stderr read to EOF, \
         clean environment + LOCKHOOK_CONFIG; run_dir on tmpfs (as /run is in production), raw sparse images on \
         {fs_type}. `start` is the second hook libvirt runs (holder exists, nothing new to lock).\n\n"
    );
    match &sanlock {
        Ok(setup) => {
            let _ = write!(
                text,
                "Rows marked *sanlock engine*: the same calls with `engine = \"sanlock\"` (`[sanlock]` host_id 1, \
                 io_timeout {SANLOCK_IO_TIMEOUT}), in the same rounds (after the OFD calls of each round, which an \
                 untimed OFD `prepare` and `release` then precede), on a private sanlock daemon (no watchdog) and a \
                 file lease area on {}, formatted by `lockhook sanlock init` and joined by `lockhook sanlock join` \
                 ({:.1} s) before the rounds. Their `prepare` acquires, one sanlock call each, a lease per disk and the \
                 guest's own; the bench waits (untimed) for the holder to exit, having released them, after `release`. \
                 *sanlock − ofd* is the per-round difference of the two `prepare`s: what the leases add.\n\n",
                setup.area_fs, setup.join_s
            );
        }
        Err(why) => {
            let _ = write!(text, "**The sanlock engine rows are skipped: {why}.**\n\n");
            report.note(format!("SANLOCK ENGINE ROWS SKIPPED: {why}"));
        }
    }
    let engines: &[(usize, &str)] =
        if sanlock.is_ok() { &[(0, ""), (SANLOCK_ENV, ", sanlock engine")] } else { &[(0, "")] };
    let of_env = |env: usize| -> Vec<usize> { (0..guests.len()).filter(|&i| guests[i].env == env).collect() };
    let mut rows = Vec::new();
    let mut fits = Vec::new();
    for &(env, label) in engines {
        for (what, get) in [
            ("prepare", (|s: &Samples| &s.prepare) as fn(&Samples) -> &Vec<f64>),
            ("start", |s: &Samples| &s.start),
            ("release", |s: &Samples| &s.release),
        ] {
            let main = of_env(env);
            let points: Vec<(f64, f64)> =
                main.iter().map(|&i| (guests[i].n as f64, median(get(&samples[i])))).collect();
            let f = fit(&points);
            let mut row = vec![format!("`{what}`{label}")];
            row.extend(main.iter().map(|&i| with_iqr(&summary(get(&samples[i])))));
            row.push(format!("{} ({} net of exec)", ms(f.intercept), ms(f.intercept - true_med)));
            row.push(format!("{:.1} µs", f.slope * 1000.0));
            row.push(format!("{:.3}", f.r2));
            rows.push(row);
            if env == 0 {
                fits.push((what, f, points));
            }
        }
    }
    let mut added = Vec::new();
    if sanlock.is_ok() {
        let diffs: Vec<Vec<f64>> = of_env(0)
            .iter()
            .zip(of_env(SANLOCK_ENV))
            .map(|(&o, s)| paired_diff(&samples[s].prepare, &samples[o].prepare))
            .collect();
        let points: Vec<(f64, f64)> = SIZES.iter().zip(&diffs).map(|(&n, d)| (n as f64, median(d))).collect();
        let f = fit(&points);
        let mut row = vec!["`prepare`, sanlock − ofd (paired per round)".to_owned()];
        row.extend(diffs.iter().map(|d| signed_with_iqr(&summary(d))));
        row.push(signed_ms(f.intercept));
        row.push(format!("{:.1} µs", f.slope * 1000.0));
        row.push(format!("{:.3}", f.r2));
        rows.push(row);
        added = points;
    }
    let mut true_row = vec!["bare `exec /bin/true` (reference)".to_owned(), with_iqr(&summary(&true_ms))];
    true_row.extend(vec![String::new(); SIZES.len() + 2]);
    rows.push(true_row);
    let head: Vec<String> = std::iter::once("call".to_owned())
        .chain(SIZES.iter().map(|n| format!("{n} disk{}", if *n == 1 { "" } else { "s" })))
        .chain(["fixed cost (fit)".into(), "per disk (fit)".into(), "R²".into()])
        .collect();
    let head_refs: Vec<&str> = head.iter().map(String::as_str).collect();
    text.push_str(&table(&head_refs, &rows));
    for (i, g) in guests.iter().enumerate().filter(|(_, g)| g.env == 1) {
        let _ = writeln!(
            text,
            "\nFor comparison, {} disk: `prepare` {}, `release` {} (the holder's state file is fsync'ed).",
            g.label,
            with_iqr(&summary(&samples[i].prepare)),
            with_iqr(&summary(&samples[i].release))
        );
    }
    let _ = writeln!(
        text,
        "\nEach timed call starts right after a read of `/proc/locks` by the bench, so that the hook's own read \
         (reconcile, when this host has guests: `start`, `release`) finds it warm, as when the calls follow each other \
         within a few ms. Read cold (250 ms after the previous read) it takes {} here, warm {}: listing the locks takes \
         the kernel's `file_rwsem` for writing, which waits for an RCU grace period unless the last writer was recent. \
         A hook call far from any other (most of them, in production) pays that on top of the figures above.",
        with_iqr(&summary(&cold)),
        with_iqr(&summary(&warm))
    );
    // What a hook pays that a bare exec does not, and that no code of lockhook's can avoid.
    let cpu = util::cpu_probe(CPU_PROBES);
    if let Some((detect, cpuid)) = &cpu {
        let _ = writeln!(
            text,
            "\nstd's CPU feature detection (`is_x86_feature_detected!`, run once per process by the first `memchr`: \
             quick-xml's and serde_json's byte searches, so by every hook call that reads the domain XML) takes {} ms \
             in a fresh process here ({CPU_PROBES} processes): one `cpuid` instruction costs {cpuid:.2} µs on this \
             host, which traps it to the hypervisor (on bare metal it costs nanoseconds). `exec /bin/true` pays \
             glibc's own `cpuid`s, as the hook does; this is on top.",
            with_iqr(&summary(detect)),
        );
    }
    text.push('\n');
    text.push_str(&verify);
    text.push_str(&verify_sanlock);
    text.push('\n');
    report.section(text);
    if let Some(&(_, one)) = added.first() {
        let per = fit(&added).slope;
        report.note(format!(
            "sanlock engine (io_timeout {SANLOCK_IO_TIMEOUT}): its `prepare` minus the ofd engine's, per round: {} ms \
             for 1 disk, {} ms for 64 disks ({:.2} ms per disk)",
            signed_ms(one),
            added.iter().find(|p| p.0 == 64.0).map_or_else(|| "n/a".into(), |p| signed_ms(p.1)),
            per
        ));
    }

    // Targets.
    let med = |what: &str, n: usize| -> f64 {
        let i = guests.iter().position(|g| g.n == n && g.env == 0).expect("size");
        median(match what {
            "prepare" => &samples[i].prepare,
            _ => &samples[i].release,
        })
    };
    let p1 = med("prepare", 1);
    report.target("`prepare`, 1 disk", format!("{} ms", ms(p1)), "≤ 2 ms", Some(p1 <= 2.0));
    let p64 = med("prepare", 64);
    report.target("`prepare`, 64 disks", format!("{} ms", ms(p64)), "≤ 15 ms", Some(p64 <= 15.0));
    let (worst_n, worst) =
        SIZES.iter().map(|&n| (n, med("release", n))).fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
    report.target(
        "`release`, every size",
        format!("{} ms (1 disk), worst {} ms ({worst_n} disks)", ms(med("release", 1)), ms(worst)),
        "≤ 2 ms",
        Some(worst <= 2.0),
    );
    // Net of a bare exec, per round (`exec /bin/true` ran in the same round).
    let net = |what: &str, n: usize| -> Vec<f64> {
        let i = guests.iter().position(|g| g.n == n && g.env == 0).expect("size");
        let calls = if what == "prepare" { &samples[i].prepare } else { &samples[i].release };
        paired_diff(calls, &true_ms)
    };
    let detect = cpu.as_ref().map(|(d, _)| median(d));
    for (what, n, limit) in [("prepare", 1, 0.5), ("prepare", 64, 2.0), ("release", 1, 0.3)] {
        let d = net(what, n);
        // Both calls parse XML, so both pay std's CPU feature detection (see part 2).
        let floor = detect.map_or_else(String::new, |x| {
            format!(
                "; of it, std's CPU feature detection {} ms (`cpuid` in this VM): {} ms without",
                ms(x),
                ms(median(&d) - x)
            )
        });
        report.target(
            format!("`{what}` net of a bare exec, {n} disk{} (per round)", if n == 1 { "" } else { "s" }),
            format!("{} ms{floor}", signed_with_ci(&d)),
            &format!("≤ {limit} ms"),
            Some(median(&d) <= limit),
        );
    }
    let (_, f, pts) = &fits[0];
    let s1 = (pts[2].1 - pts[0].1) / (pts[2].0 - pts[0].0);
    let s2 = (pts[3].1 - pts[2].1) / (pts[3].0 - pts[2].0);
    report.target(
        "`prepare` grows linearly in disks",
        format!("{:.1} µs/disk over 1→64, {:.1} µs/disk over 64→256, R² {:.3}", s1 * 1000.0, s2 * 1000.0, f.r2),
        "slope 64→256 ≤ 1.5 × slope 1→64 (+5 µs), R² ≥ 0.95",
        Some(s2 <= 1.5 * s1 + 0.005 && f.r2 >= 0.95),
    );
    if let Ok(setup) = sanlock {
        stop_holders(&envs[SANLOCK_ENV].config);
        drop(setup);
    }
    // The run dirs' semaphore sets would outlive them.
    for env in &envs {
        crate::census::remove(&env.run_dir);
    }
    drop(shm);
}
