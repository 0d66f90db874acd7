//! Part 2: the hook alone, called as libvirt calls it (argv `NAME OP SUBOP -`, the domain XML on
//! stdin, program name `qemu` through a symlink, a clean environment plus `LOCKHOOK_CONFIG`),
//! for 1, 16, 64 and 256 disks, interleaved with a bare `exec /bin/true`.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::libvirtd::{guest_xml, random_uuid};
use crate::report::{table, Report};
use crate::stats::{fit, median, ms, summary, with_iqr};
use crate::util;

/// A throw-away lockhook set-up: config, run dir, lockspace and the `qemu` symlink.
pub struct HookEnv {
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub hook: PathBuf,
}

impl HookEnv {
    /// `dir` holds the config and symlink; `run_dir` is where holders keep their files.
    pub fn new(dir: &Path, run_dir: &Path, lockhook: &Path) -> HookEnv {
        fs::create_dir_all(dir.join("etc")).expect("mkdir etc");
        fs::create_dir_all(dir.join("bin")).expect("mkdir bin");
        let config = dir.join("etc/lockhook.toml");
        fs::write(&config, format!("run_dir = {:?}\nlockspace_dir = {:?}\n", run_dir, dir.join("lockspace")))
            .expect("write config");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod config");
        let hook = dir.join("bin/qemu");
        let _ = fs::remove_file(&hook);
        std::os::unix::fs::symlink(lockhook, &hook).expect("symlink qemu -> lockhook");
        HookEnv { config, run_dir: run_dir.to_owned(), hook }
    }

    /// `qemu NAME OP SUBOP -` with `xml` on stdin; (wall ms, output).
    pub fn call(&self, name: &str, op: &str, sub: &str, xml: &str) -> (f64, Output) {
        let mut cmd = Command::new(&self.hook);
        util::clean_env(&mut cmd).env("LOCKHOOK_CONFIG", &self.config).args([name, op, sub, "-"]);
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

pub fn run(work: &Path, lockhook: &Path, rounds: usize, report: &mut Report) {
    let dir = work.join("hook-alone");
    let shm = tmpfs_dir("lockhook-bench-run-");
    let envs = [
        HookEnv::new(&dir.join("tmpfs"), &shm.path().join("run"), lockhook),
        HookEnv::new(&dir.join("ext4"), &dir.join("ext4/run"), lockhook),
    ];
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
    let items = guests.len() + 1;
    for r in 0..rounds {
        for item in util::rotation(items, r) {
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
            samples[item].prepare.push(env.call_ok(&g.name, "prepare", "begin", &g.xml));
            samples[item].start.push(env.call_ok(&g.name, "start", "begin", &g.xml));
            let pid = env.holder_pid(&g.uuid);
            samples[item].release.push(env.call_ok(&g.name, "release", "end", &g.xml));
            // Not timed: the holder must be gone before this guest's next prepare.
            if let Some(pid) = pid {
                assert!(
                    crate::libvirtd::wait_until(Duration::from_secs(5), || !util::alive(pid)),
                    "holder {pid} outlived release"
                );
            }
        }
        util::reap_orphans();
    }
    eprintln!("bench: part 2 done: {rounds} rounds in {:.1} s", t0.elapsed().as_secs_f64());

    // Report.
    let true_med = median(&true_ms);
    let mut text = format!(
        "## 2. The hook alone, as libvirt calls it ({rounds} interleaved rounds; ms, median (p25..p75))\n\n\
         `qemu NAME OP SUBOP -` (symlink to target/release/lockhook), domain XML on stdin, stdout/stderr read to EOF, \
         clean environment + LOCKHOOK_CONFIG; run_dir on tmpfs (as /run is in production), raw sparse images on \
         {fs_type}. `start` is the second hook libvirt runs (holder exists, nothing new to lock).\n\n"
    );
    let mut rows = Vec::new();
    let mut fits = Vec::new();
    for (what, get) in [
        ("prepare", (|s: &Samples| &s.prepare) as fn(&Samples) -> &Vec<f64>),
        ("start", |s: &Samples| &s.start),
        ("release", |s: &Samples| &s.release),
    ] {
        let main: Vec<usize> = (0..guests.len()).filter(|&i| guests[i].env == 0).collect();
        let points: Vec<(f64, f64)> = main.iter().map(|&i| (guests[i].n as f64, median(get(&samples[i])))).collect();
        let f = fit(&points);
        let mut row = vec![format!("`{what}`")];
        row.extend(main.iter().map(|&i| with_iqr(&summary(get(&samples[i])))));
        row.push(format!("{} ({} net of exec)", ms(f.intercept), ms(f.intercept - true_med)));
        row.push(format!("{:.1} µs", f.slope * 1000.0));
        row.push(format!("{:.3}", f.r2));
        rows.push(row);
        fits.push((what, f, points));
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
    for (i, g) in guests.iter().enumerate().filter(|(_, g)| g.env != 0) {
        let _ = writeln!(
            text,
            "\nFor comparison, {} disk: `prepare` {}, `release` {} (the holder's state file is fsync'ed).",
            g.label,
            with_iqr(&summary(&samples[i].prepare)),
            with_iqr(&summary(&samples[i].release))
        );
    }
    text.push('\n');
    text.push_str(&verify);
    text.push('\n');
    report.section(text);

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
    let (_, f, pts) = &fits[0];
    let s1 = (pts[2].1 - pts[0].1) / (pts[2].0 - pts[0].0);
    let s2 = (pts[3].1 - pts[2].1) / (pts[3].0 - pts[2].0);
    report.target(
        "`prepare` grows linearly in disks",
        format!("{:.1} µs/disk over 1→64, {:.1} µs/disk over 64→256, R² {:.3}", s1 * 1000.0, s2 * 1000.0, f.r2),
        "slope 64→256 ≤ 1.5 × slope 1→64 (+5 µs), R² ≥ 0.95",
        Some(s2 <= 1.5 * s1 + 0.005 && f.r2 >= 0.95),
    );
    drop(shm);
}
