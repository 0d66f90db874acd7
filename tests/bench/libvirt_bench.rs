//! Parts 1 and 4: `virsh start` / `virsh destroy` through real private libvirtds, one per
//! configuration, all started up front, measured in interleaved rounds; plus a one-time check
//! that virtlockd and lockhook really lock.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::libvirtd::{guest_xml, random_uuid, Libvirtd, LibvirtdOptions};
use crate::report::{table, Report};
use crate::stats::{self, ms, paired_diff, signed_ms, signed_with_ci, signed_with_iqr, summary, with_iqr};
use crate::util::{self, describe_failure, timed_virsh};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NoHook,
    NoopSh,
    NoopTrue,
    Lockhook,
    Virtlockd,
    /// Diagnostic (`--trace-hooks`): lockhook behind a bash wrapper that logs each call's time.
    LockhookTraced,
    /// Its reference (`--trace-hooks`): `/bin/true` behind the same wrapper.
    NoopTraced,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::NoHook, Kind::NoopSh, Kind::NoopTrue, Kind::Lockhook, Kind::Virtlockd];

    pub fn label(self) -> &'static str {
        match self {
            Kind::NoHook => "no hook",
            Kind::NoopSh => "no-op hook (`#!/bin/sh` `exit 0`)",
            Kind::NoopTrue => "no-op hook (/bin/true symlink)",
            Kind::Lockhook => "lockhook",
            Kind::Virtlockd => "virtlockd (lock_manager = \"lockd\")",
            Kind::LockhookTraced => "lockhook behind a timing wrapper (diagnostic)",
            Kind::NoopTraced => "/bin/true behind the same timing wrapper (diagnostic)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Kind::NoHook => "nohook",
            Kind::NoopSh => "noop-sh",
            Kind::NoopTrue => "noop-true",
            Kind::Lockhook => "lockhook",
            Kind::Virtlockd => "virtlockd",
            Kind::LockhookTraced => "lh-traced",
            Kind::NoopTraced => "noop-traced",
        }
    }

    /// Whether part 4 (parallel starts) runs on this configuration.
    fn parallel(self) -> bool {
        // The no-op hook shows what libvirt itself spends running a hook at every start.
        matches!(self, Kind::NoHook | Kind::NoopTrue | Kind::Lockhook | Kind::Virtlockd)
    }
}

/// Disk counts of the serial guests (`g1`, `g16`).
pub const SIZES: [usize; 2] = [1, 16];
/// Guests started at once in part 4.
pub const PARALLEL: usize = 8;
/// Guests started at once in part 4's wide rounds (issue 12).
pub const PARALLEL_WIDE: usize = 32;

pub struct Instance {
    pub kind: Kind,
    pub lv: Libvirtd,
    /// Images of guest `g<N>`, by index in `SIZES`.
    pub images: Vec<Vec<PathBuf>>,
    /// The events log of a traced instance (see `trace_log`).
    pub trace: Option<PathBuf>,
}

/// Starts one private libvirtd per configuration and defines the guests.
pub fn setup(work: &Path, lockhook: &Path, kinds: &[Kind]) -> Vec<Instance> {
    let noop_sh = work.join("noop-hook.sh");
    fs::write(&noop_sh, "#!/bin/sh\nexit 0\n").expect("write the no-op hook");
    fs::set_permissions(&noop_sh, fs::Permissions::from_mode(0o755)).expect("chmod the no-op hook");
    let etc = work.join("lockhook-etc");
    fs::create_dir_all(&etc).expect("mkdir lockhook-etc");
    // run_dir: the production default. Inside the fixture's namespaces /run is a private tmpfs,
    // as /run is on a real host.
    let conf = etc.join("lockhook.toml");
    fs::write(&conf, format!("run_dir = \"/run/lockhook\"\nlockspace_dir = {:?}\n", work.join("lockspace")))
        .expect("write lockhook.toml");
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).expect("chmod lockhook.toml");

    let mut instances = Vec::new();
    for &kind in kinds {
        let t0 = Instant::now();
        let mut opts = LibvirtdOptions::default();
        match kind {
            Kind::NoHook => {}
            Kind::NoopSh => opts.hook_binary = Some(noop_sh.clone()),
            Kind::NoopTrue => opts.hook_binary = Some(PathBuf::from("/bin/true")),
            Kind::Lockhook => {
                opts.hook_binary = Some(lockhook.to_owned());
                opts.extra_mounts = vec![(etc.clone(), PathBuf::from("/etc/lockhook"))];
            }
            Kind::Virtlockd => opts.extra_qemu_conf = "lock_manager = \"lockd\"\n".into(),
            Kind::LockhookTraced => {
                opts.hook_binary = Some(trace_wrapper(work, kind, lockhook));
                opts.extra_mounts = vec![(etc.clone(), PathBuf::from("/etc/lockhook"))];
            }
            Kind::NoopTraced => opts.hook_binary = Some(trace_wrapper(work, kind, Path::new("/bin/true"))),
        }
        let lv = Libvirtd::start(opts);
        if kind == Kind::Virtlockd {
            start_virtlockd(&lv);
        }
        let dir = work.join(kind.slug());
        let mut images = Vec::new();
        for &n in &SIZES {
            let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("g{n}-{i}.raw"))).collect();
            for p in &paths {
                util::sparse_image(p, 16 << 20);
            }
            lv.define(&guest_xml(&format!("g{n}"), &random_uuid(), &util::disks_xml(&paths)));
            images.push(paths);
        }
        if kind.parallel() {
            for i in 0..PARALLEL_WIDE {
                let p = dir.join(format!("p{i}.raw"));
                util::sparse_image(&p, 16 << 20);
                lv.define(&guest_xml(&format!("p{i}"), &random_uuid(), &util::raw_disk(&p, 0)));
            }
        }
        eprintln!("bench: libvirtd for {:<10} up in {:.1} s", kind.slug(), t0.elapsed().as_secs_f64());
        let trace = TRACED.contains(&kind).then(|| trace_log(work, kind));
        instances.push(Instance { kind, lv, images, trace });
    }
    instances
}

/// The traced configurations (`--trace-hooks`), lockhook first.
pub const TRACED: [Kind; 2] = [Kind::LockhookTraced, Kind::NoopTraced];

/// The events log of traced instance `kind`: `NAME OP T0 T1 RC` per hook call.
pub fn trace_log(work: &Path, kind: Kind) -> PathBuf {
    work.join(format!("trace-{}/events.log", kind.slug()))
}

/// A bash wrapper (hooks/qemu) that runs `target` (through a `qemu` symlink) and appends the
/// call's wall time, taken with `$EPOCHREALTIME` (no fork), to `trace_log`.
fn trace_wrapper(work: &Path, kind: Kind, target: &Path) -> PathBuf {
    let dir = work.join(format!("trace-{}", kind.slug()));
    fs::create_dir_all(dir.join("bin")).expect("mkdir trace/bin");
    let link = dir.join("bin/qemu");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(target, &link).expect("symlink trace/bin/qemu");
    let script = dir.join("hook.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/bash\nt0=$EPOCHREALTIME\n{} \"$@\"\nrc=$?\nt1=$EPOCHREALTIME\n\
             printf '%s %s %s %s %s\\n' \"$1\" \"$2\" \"$t0\" \"$t1\" \"$rc\" >> {}\nexit $rc\n",
            link.display(),
            trace_log(work, kind).display()
        ),
    )
    .expect("write the trace wrapper");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod the trace wrapper");
    script
}

/// The hook calls on a guest's start and destroy paths, in the order libvirt runs them.
const TRACE_OPS: [&str; 5] = ["prepare", "start", "started", "stopped", "release"];

/// The wall ms of each call of `op` for `guest` in a trace log, in order (one per round).
fn traced_calls(log: &str, guest: &str, op: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [name, o, t0, t1, _] if name == guest && o == op => call_ms(t0, t1),
            _ => None,
        })
        .collect()
}

/// A logged call's wall ms, from its `T0 T1` fields (seconds).
fn call_ms(t0: &str, t1: &str) -> Option<f64> {
    Some((t1.parse::<f64>().ok()? - t0.parse::<f64>().ok()?) * 1000.0)
}

/// Per round (`# R SI` marker lines, written by `run_serial` before each start), the sum of
/// guest `g<SIZES[si]>`'s calls on the start path (`prepare`, `start`, `started`); `NaN` for a
/// round where one of them is missing or failed, so that `paired_diff` leaves it out.
fn start_path(log: &str, si: usize, rounds: usize) -> Vec<f64> {
    let guest = format!("g{}", SIZES[si]);
    let mut sums = vec![f64::NAN; rounds];
    let mut round: Option<usize> = None;
    let mut calls: Vec<(String, f64)> = Vec::new();
    let mut close = |round: Option<usize>, calls: &mut Vec<(String, f64)>| {
        if let Some(r) = round.filter(|&r| r < rounds) {
            let ops: Vec<&str> = calls.iter().map(|(op, _)| op.as_str()).collect();
            if ops == TRACE_OPS[..3] && calls.iter().all(|(_, t)| t.is_finite()) {
                sums[r] = calls.iter().map(|(_, t)| t).sum();
            }
        }
        calls.clear();
    };
    for line in log.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[..] {
            ["#", r, s] => {
                close(round, &mut calls);
                round = (s.parse() == Ok(si)).then(|| r.parse().ok()).flatten();
            }
            [name, op, t0, t1, rc] if name == guest && TRACE_OPS[..3].contains(&op) => {
                let t = if rc == "0" { call_ms(t0, t1).unwrap_or(f64::NAN) } else { f64::NAN };
                calls.push((op.to_owned(), t));
            }
            _ => {}
        }
    }
    close(round, &mut calls);
    sums
}

/// Part 1b: per-call medians from the traced instances' logs, and lockhook's calls on the start
/// path against the same calls of `/bin/true` behind the same wrapper, round by round.
pub fn report_trace(work: &Path, rounds: usize, report: &mut Report) {
    let logs: Vec<(Kind, String)> =
        TRACED.iter().map(|&k| (k, fs::read_to_string(trace_log(work, k)).unwrap_or_default())).collect();
    let mut rows = Vec::new();
    for (kind, log) in &logs {
        for n in SIZES {
            let guest = format!("g{n}");
            let mut row = vec![kind.label().to_owned(), format!("{n} disk(s)")];
            let meds: Vec<f64> = TRACE_OPS
                .iter()
                .map(|op| {
                    let samples = traced_calls(log, &guest, op);
                    let m = stats::median(&samples);
                    row.push(format!("{} (n={})", ms(m), samples.len()));
                    m
                })
                .collect();
            row.push(ms(meds[0] + meds[1] + meds[2]));
            row.push(ms(meds[3] + meds[4]));
            rows.push(row);
        }
    }
    let mut out = String::from(
        "## 1b. Hook calls under libvirt (diagnostic instances: each call timed by a bash wrapper around lockhook, \
         and around `/bin/true` for reference; ms, median)\n\n",
    );
    out.push_str(&table(
        &[
            "hook",
            "guest",
            "prepare",
            "start",
            "started",
            "stopped",
            "release",
            "start path total",
            "destroy path total",
        ],
        &rows,
    ));
    out.push_str(
        "\nlibvirt runs the hook synchronously inside the start job, so what lockhook's calls take beyond the same \
         calls of a no-op is what it adds to a `virsh start` directly (it does not count the holders' work beside \
         the start on this 2-core host). Per round: lockhook's `prepare` + `start` + `started` − the same calls of \
         `/bin/true` behind the same wrapper in the same round (a round where a call is missing or failed is left \
         out):\n\n",
    );
    let [(_, lh), (_, noop)] = &logs[..] else { unreachable!("two traced instances") };
    for (si, n) in SIZES.iter().enumerate() {
        let diffs = paired_diff(&start_path(lh, si, rounds), &start_path(noop, si, rounds));
        let _ = writeln!(out, "- {n} disk(s): {} ms over {} rounds", signed_with_ci(&diffs), diffs.len());
        let (_, hi) = stats::median_ci(&diffs);
        report.target(
            format!("{n} disk(s): lockhook's hook calls on the start path − a no-op's, inside real starts (per round)"),
            signed_with_ci(&diffs),
            "≤ 5 ms, by the CI's upper end",
            hi.is_finite().then_some(hi <= 5.0),
        );
    }
    report.section(out);
}

/// `virtlockd -d` in the instance's namespaces, then libvirtd restarted so that it starts with
/// virtlockd already listening.
fn start_virtlockd(lv: &Libvirtd) {
    let out = lv.exec_in_ns(&[
        "sh",
        "-c",
        "exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C HOME=/root \
         virtlockd -d </dev/null >>/var/log/libvirt/virtlockd.out 2>&1",
    ]);
    assert!(out.status.success(), "{}", describe_failure("virtlockd -d", &out));
    let sock = lv.ns_path(Path::new("/run/libvirt/virtlockd-sock"));
    assert!(
        crate::libvirtd::wait_until(Duration::from_secs(10), || sock.exists()),
        "virtlockd did not create {}",
        sock.display()
    );
    lv.kill_daemon();
    lv.restart_daemon();
}

fn virsh_ok(lv: &Libvirtd, args: &[&str]) -> f64 {
    let (t, out) = timed_virsh(lv, args);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe_failure(&format!("virsh {}", args.join(" ")), &out),
        lv.log_tail()
    );
    t
}

/// One untimed start/destroy of every guest (first starts are slower: caches, lazy set-up).
pub fn warm_up(instances: &[Instance]) {
    for inst in instances {
        for n in SIZES {
            let g = format!("g{n}");
            virsh_ok(&inst.lv, &["start", &g]);
            virsh_ok(&inst.lv, &["destroy", &g]);
        }
        if inst.kind.parallel() {
            if let Err(e) = parallel_round(&inst.lv, PARALLEL) {
                panic!("warm-up of parallel starts on {}: {e}", inst.kind.slug());
            }
        }
    }
    util::reap_orphans();
}

/// A one-time check (not timed) that each lock manager really locks, as `/proc/locks` shows.
pub fn verify(instances: &[Instance], report: &mut Report) {
    let mut text = String::from("## Verification (once, not timed)\n\n");
    for inst in instances {
        match inst.kind {
            Kind::Virtlockd => {
                let img = &inst.images[0][0];
                virsh_ok(&inst.lv, &["start", "g1"]);
                let vl_pids: Vec<u32> =
                    inst.lv.namespace_pids().into_iter().filter(|&p| util::comm(p) == "virtlockd").collect();
                let locks = util::locks_on(img);
                let hit = locks.iter().find(|l| {
                    l.kind == "POSIX"
                        && l.access == "WRITE"
                        && l.start == 0
                        && u32::try_from(l.pid).is_ok_and(|p| vl_pids.contains(&p))
                });
                let _ = writeln!(
                    text,
                    "- virtlockd: guest g1 running: {} (`/proc/locks`: `{}`); all locks on the image: {}",
                    if hit.is_some() { "OK, a POSIX WRITE lock on byte 0 held by virtlockd" } else { "**NOT LOCKED**" },
                    hit.map_or("-", |l| l.raw.as_str()),
                    describe_locks(&locks)
                );
                if let Some(&pid) = vl_pids.first() {
                    if let Some(m) = util::mem(pid) {
                        let _ = writeln!(
                            text,
                            "- virtlockd daemon footprint with one guest: RSS {}, PSS {} (one daemon for all guests)",
                            stats::mib(m.rss),
                            stats::mib(m.pss)
                        );
                    }
                }
                virsh_ok(&inst.lv, &["destroy", "g1"]);
                let freed = crate::libvirtd::wait_until(Duration::from_secs(5), || {
                    !util::locks_on(img).iter().any(|l| l.kind == "POSIX" && l.start == 0)
                });
                let _ = writeln!(
                    text,
                    "- virtlockd: after destroy the lock is {}",
                    if freed { "gone" } else { "STILL THERE" }
                );
                if hit.is_none() {
                    report.note("virtlockd verification FAILED: its figures do not measure locking");
                }
            }
            Kind::Lockhook => {
                let imgs = &inst.images[1];
                virsh_ok(&inst.lv, &["start", "g16"]);
                let locked = imgs
                    .iter()
                    .filter(|img| {
                        util::locks_on(img).iter().any(|l| l.kind == "OFDLCK" && l.access == "WRITE" && l.start == 0)
                    })
                    .count();
                // The guest's holder: the holder process with the images open (not the spare).
                let holder = inst.lv.namespace_pids().into_iter().find(|&p| {
                    util::comm(p) == "lockhook-holder" && util::fds(p).iter().any(|(_, t)| Path::new(t) == imgs[0])
                });
                let held = holder.map_or(0, |pid| {
                    let fds = util::fds(pid);
                    imgs.iter().filter(|img| fds.iter().any(|(_, t)| Path::new(t) == img.as_path())).count()
                });
                let sample = util::locks_on(&imgs[0]);
                let _ = writeln!(
                    text,
                    "- lockhook: guest g16 running: {locked}/16 images carry an OFD WRITE lock on byte 0; holder pid {} \
                     has {held}/16 images open; locks on image 0: {}",
                    holder.map_or_else(|| "NOT FOUND".to_owned(), |p| p.to_string()),
                    describe_locks(&sample)
                );
                virsh_ok(&inst.lv, &["destroy", "g16"]);
                let freed = crate::libvirtd::wait_until(Duration::from_secs(5), || {
                    imgs.iter().all(|img| !util::locks_on(img).iter().any(|l| l.kind == "OFDLCK" && l.start == 0))
                });
                let gone =
                    crate::libvirtd::wait_until(Duration::from_secs(5), || holder.iter().all(|&p| !util::alive(p)));
                let _ = writeln!(
                    text,
                    "- lockhook: after destroy the locks are {} and the holder is {}",
                    if freed { "gone" } else { "STILL THERE" },
                    if gone { "gone" } else { "STILL RUNNING" }
                );
                if locked != 16 {
                    report.note("lockhook verification FAILED: not every image was locked");
                }
            }
            Kind::NoHook => {
                let img = &inst.images[0][0];
                virsh_ok(&inst.lv, &["start", "g1"]);
                let locks = util::locks_on(img);
                let _ = writeln!(
                    text,
                    "- no hook: guest g1 running: byte 0 {}; locks on the image (QEMU's own): {}",
                    if locks.iter().any(|l| l.start == 0) { "LOCKED (unexpected)" } else { "not locked" },
                    describe_locks(&locks)
                );
                virsh_ok(&inst.lv, &["destroy", "g1"]);
            }
            Kind::NoopSh | Kind::NoopTrue | Kind::LockhookTraced | Kind::NoopTraced => {}
        }
    }
    util::reap_orphans();
    report.section(text);
}

fn describe_locks(locks: &[util::LockLine]) -> String {
    if locks.is_empty() {
        return "none".into();
    }
    locks
        .iter()
        .map(|l| format!("{} {} pid {} bytes {}-{}", l.kind, l.access, l.pid, l.start, l.end))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Samples of part 1, per instance and size: (start ms, destroy ms) per round, NaN if failed.
pub struct Serial {
    pub start: Vec<Vec<Vec<f64>>>,
    pub destroy: Vec<Vec<Vec<f64>>>,
    pub failures: Vec<String>,
}

/// Part 1: `rounds` rounds; in each, for each size, every configuration once (rotated order).
pub fn run_serial(instances: &[Instance], rounds: usize) -> Serial {
    let n = instances.len();
    let mut s = Serial {
        start: vec![vec![Vec::new(); SIZES.len()]; n],
        destroy: vec![vec![Vec::new(); SIZES.len()]; n],
        failures: Vec::new(),
    };
    let t0 = Instant::now();
    for r in 0..rounds {
        for (si, size) in SIZES.iter().enumerate() {
            let guest = format!("g{size}");
            // Rotated by one each round, and reversed every other round, so that no configuration
            // always follows the same one (the traced pair sits side by side in the list).
            let mut order = util::rotation(n, r + si);
            if r % 2 == 1 {
                order.reverse();
            }
            for idx in order {
                let lv = &instances[idx].lv;
                if let Some(log) = &instances[idx].trace {
                    // The calls after this line belong to round `r`, guest size `si`.
                    let mark = fs::OpenOptions::new().append(true).open(log);
                    let _ =
                        mark.and_then(|mut f| std::io::Write::write_all(&mut f, format!("# {r} {si}\n").as_bytes()));
                }
                let (ts, out) = timed_virsh(lv, &["start", &guest]);
                if !out.status.success() {
                    s.failures.push(format!("{} {}", instances[idx].kind.slug(), describe_failure("start", &out)));
                    let _ = timed_virsh(lv, &["destroy", &guest]);
                    s.start[idx][si].push(f64::NAN);
                    s.destroy[idx][si].push(f64::NAN);
                    continue;
                }
                let (td, out) = timed_virsh(lv, &["destroy", &guest]);
                if !out.status.success() {
                    s.failures.push(format!("{} {}", instances[idx].kind.slug(), describe_failure("destroy", &out)));
                }
                s.start[idx][si].push(ts);
                s.destroy[idx][si].push(if out.status.success() { td } else { f64::NAN });
            }
        }
        util::reap_orphans();
        eprintln!("bench: part 1 round {}/{rounds} done ({:.0} s)", r + 1, t0.elapsed().as_secs_f64());
    }
    s
}

/// Starts `p0..p<width-1>` at once, then destroys them at once. Returns the two wall times (ms).
fn parallel_round(lv: &Libvirtd, width: usize) -> Result<(f64, f64), String> {
    let run_all = |verb: &str| -> (f64, Vec<std::process::Output>) {
        let t0 = Instant::now();
        let outs = thread::scope(|scope| {
            let handles: Vec<_> = (0..width)
                .map(|i| {
                    let guest = format!("p{i}");
                    scope.spawn(move || {
                        util::ns_command(lv, &["virsh", "-c", crate::libvirtd::URI, verb, &guest])
                            .output()
                            .expect("run virsh")
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("virsh thread")).collect::<Vec<_>>()
        });
        (util::to_ms(t0.elapsed()), outs)
    };
    let (start, outs) = run_all("start");
    let failed: Vec<String> =
        outs.iter().filter(|o| !o.status.success()).map(|o| describe_failure("parallel start", o)).collect();
    let (destroy, douts) = run_all("destroy");
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    if let Some(o) = douts.iter().find(|o| !o.status.success()) {
        return Err(describe_failure("parallel destroy", o));
    }
    Ok((start, destroy))
}

/// Samples of part 4 per participating instance index: (start wall, destroy wall) per round.
pub struct Parallel {
    /// Guests started at once.
    pub width: usize,
    pub idx: Vec<usize>,
    pub start: Vec<Vec<f64>>,
    pub destroy: Vec<Vec<f64>>,
    pub failures: Vec<String>,
}

pub fn run_parallel(instances: &[Instance], rounds: usize, width: usize) -> Parallel {
    let idx: Vec<usize> = (0..instances.len()).filter(|&i| instances[i].kind.parallel()).collect();
    let mut p = Parallel {
        width,
        start: vec![Vec::new(); idx.len()],
        destroy: vec![Vec::new(); idx.len()],
        idx: idx.clone(),
        failures: Vec::new(),
    };
    let t0 = Instant::now();
    for r in 0..rounds {
        for k in util::rotation(idx.len(), r) {
            let inst = &instances[idx[k]];
            match parallel_round(&inst.lv, width) {
                Ok((s, d)) => {
                    p.start[k].push(s);
                    p.destroy[k].push(d);
                }
                Err(e) => {
                    p.failures.push(format!("{}: {e}", inst.kind.slug()));
                    p.start[k].push(f64::NAN);
                    p.destroy[k].push(f64::NAN);
                    // Leave no guest running for the next round.
                    for i in 0..width {
                        let _ = timed_virsh(&inst.lv, &["destroy", &format!("p{i}")]);
                    }
                }
            }
            util::reap_orphans();
        }
        eprintln!(
            "bench: part 4 ({width} at once) round {}/{rounds} done ({:.0} s)",
            r + 1,
            t0.elapsed().as_secs_f64()
        );
    }
    p
}

fn position(instances: &[Instance], kind: Kind) -> Option<usize> {
    instances.iter().position(|i| i.kind == kind)
}

/// Raw samples of parts 1 and 4 as CSV lines `part,configuration,disks,round,metric,ms`.
pub fn samples_csv(instances: &[Instance], s: Option<&Serial>, par: &[&Parallel]) -> String {
    let mut out = String::new();
    if let Some(s) = s {
        for (idx, inst) in instances.iter().enumerate() {
            for (si, size) in SIZES.iter().enumerate() {
                for (metric, v) in [("start", &s.start[idx][si]), ("destroy", &s.destroy[idx][si])] {
                    for (r, x) in v.iter().enumerate() {
                        let _ = writeln!(out, "1,{},{size},{r},{metric},{x:.3}", inst.kind.slug());
                    }
                }
            }
        }
    }
    for p in par {
        let (start, destroy) = (format!("start{}", p.width), format!("destroy{}", p.width));
        for (k, &i) in p.idx.iter().enumerate() {
            for (metric, v) in [(&start, &p.start[k]), (&destroy, &p.destroy[k])] {
                for (r, x) in v.iter().enumerate() {
                    let _ = writeln!(out, "4,{},1,{r},{metric},{x:.3}", instances[i].kind.slug());
                }
            }
        }
    }
    out
}

pub fn report_serial(instances: &[Instance], s: &Serial, rounds: usize, report: &mut Report) {
    let base = position(instances, Kind::NoHook);
    let mut text = format!(
        "## 1. `virsh start` / `virsh destroy` on a private libvirtd ({rounds} interleaved rounds; ms, median (p25..p75))\n\n\
         Each round runs every configuration once per guest size, in an order rotated by one each round and reversed every other round. \
         \"added\" = median over rounds of (this configuration − no hook) in the same round. \
         Wall time of `nsenter … virsh -c qemu:///system start|destroy GUEST` (includes virsh's own start-up, \
         the same for every configuration).\n\n"
    );
    for (si, size) in SIZES.iter().enumerate() {
        let _ = writeln!(text, "### {size}-disk guest\n");
        let mut rows = Vec::new();
        for (idx, inst) in instances.iter().enumerate() {
            let st = summary(&s.start[idx][si]);
            let de = summary(&s.destroy[idx][si]);
            let (added_s, added_d) = match base {
                Some(b) if b != idx => (
                    signed_with_iqr(&summary(&paired_diff(&s.start[idx][si], &s.start[b][si]))),
                    signed_with_iqr(&summary(&paired_diff(&s.destroy[idx][si], &s.destroy[b][si]))),
                ),
                _ => ("-".into(), "-".into()),
            };
            rows.push(vec![inst.kind.label().to_owned(), with_iqr(&st), added_s, with_iqr(&de), added_d]);
        }
        text.push_str(&table(&["configuration", "start", "added start", "destroy", "added destroy"], &rows));
        text.push('\n');

        let (Some(b), Some(lh)) = (base, position(instances, Kind::Lockhook)) else { continue };
        let lh_diffs = paired_diff(&s.start[lh][si], &s.start[b][si]);
        let lh_added = stats::median(&lh_diffs);
        if let Some(vl) = position(instances, Kind::Virtlockd) {
            let vl_diffs = paired_diff(&s.start[vl][si], &s.start[b][si]);
            let vl_added = stats::median(&vl_diffs);
            let ratio = if vl_added > 0.0 {
                format!("{:.2}", lh_added / vl_added)
            } else {
                "n/a (virtlockd adds ≤ 0)".into()
            };
            let direct = paired_diff(&s.start[lh][si], &s.start[vl][si]);
            let _ = writeln!(
                text,
                "- {size} disk(s): added start: lockhook {} ms, virtlockd {} ms: ratio {ratio}; \
                 per-round lockhook − virtlockd: {} ms",
                signed_with_ci(&lh_diffs),
                signed_with_ci(&vl_diffs),
                signed_with_ci(&direct)
            );
            report.target(
                format!("{size} disk(s): lockhook's added `virsh start` ≤ virtlockd's (ratio ≤ 1.0)"),
                format!(
                    "{} vs {} ms (ratio {ratio}); lockhook − virtlockd {}",
                    signed_ms(lh_added),
                    signed_ms(vl_added),
                    signed_with_ci(&direct)
                ),
                "ratio ≤ 1.0",
                (lh_added.is_finite() && vl_added.is_finite()).then_some(lh_added <= vl_added),
            );
            let (lo, hi) = stats::median_ci(&direct);
            report.within_noise(lo <= 0.0 && hi >= 0.0);
        }
        if let Some(noop) = position(instances, Kind::NoopSh) {
            let diffs = paired_diff(&s.start[lh][si], &s.start[noop][si]);
            let over = summary(&diffs);
            let _ = writeln!(
                text,
                "- {size} disk(s): lockhook start − no-op (sh) hook start: {} ms",
                signed_with_ci(&diffs)
            );
            report.target(
                format!("{size} disk(s): lockhook's `virsh start` over the no-op hook"),
                signed_with_ci(&diffs),
                "≤ 10 ms",
                over.median.is_finite().then_some(over.median <= 10.0),
            );
            let (lo, hi) = stats::median_ci(&diffs);
            report.within_noise(lo <= 10.0 && hi >= 10.0);
        }
        if let (Some(noop), Some(t)) = (position(instances, Kind::NoopSh), position(instances, Kind::NoopTrue)) {
            let d = stats::median(&paired_diff(&s.start[t][si], &s.start[noop][si]));
            let _ = writeln!(text, "- {size} disk(s): /bin/true hook − sh hook (start): {} ms", signed_ms(d));
        }
        text.push('\n');
    }
    if !s.failures.is_empty() {
        let _ = writeln!(text, "Failed runs (left out): {}", s.failures.len());
        for f in s.failures.iter().take(5) {
            let _ = writeln!(text, "- {f}");
        }
    }
    report.section(text);
}

/// Part 4's section for `p.width` guests at once (`4` for 8, `4b` for the wide rounds, whose
/// lockhook-vs-virtlockd comparison is a target).
pub fn report_parallel(instances: &[Instance], p: &Parallel, rounds: usize, report: &mut Report) {
    let n = p.width;
    let mut text = format!(
        "## 4{}. {n} guests (1 disk each) started at once: {n} concurrent `virsh start`, wall time until \
         all returned (= all running); {rounds} interleaved round{}, ms\n\n",
        if n == PARALLEL { "" } else { "b" },
        if rounds == 1 { "" } else { "s" }
    );
    let base = p.idx.iter().position(|&i| instances[i].kind == Kind::NoHook);
    let mut rows = Vec::new();
    for (k, &i) in p.idx.iter().enumerate() {
        let added = match base {
            Some(b) if b != k => signed_with_iqr(&summary(&paired_diff(&p.start[k], &p.start[b]))),
            _ => "-".into(),
        };
        rows.push(vec![
            instances[i].kind.label().to_owned(),
            with_iqr(&summary(&p.start[k])),
            added,
            with_iqr(&summary(&p.destroy[k])),
        ]);
    }
    let (starts, destroys) = (format!("{n} starts, wall"), format!("{n} destroys, wall"));
    text.push_str(&table(&["configuration", &starts, "added vs no hook", &destroys], &rows));
    let added_of = |kind: Kind| {
        let k = p.idx.iter().position(|&i| instances[i].kind == kind)?;
        Some(stats::median(&paired_diff(&p.start[k], &p.start[base?])))
    };
    if let Some(added) = added_of(Kind::Lockhook) {
        let _ = writeln!(
            text,
            "\nlockhook adds {} ms to {n} parallel starts ({} ms per guest if fully serialized).",
            signed_ms(added),
            ms(added / n as f64)
        );
    }
    let (lh, noop) = (added_of(Kind::Lockhook), added_of(Kind::NoopTrue));
    if let (Some(lh), Some(noop)) = (lh, noop) {
        let _ = writeln!(
            text,
            "A no-op hook (/bin/true) adds {} ms: libvirt's own cost of running a hook; lockhook adds {} ms beyond it.",
            signed_ms(noop),
            signed_ms(lh - noop)
        );
    }
    if n != PARALLEL {
        let (lh, vl) = (added_of(Kind::Lockhook), added_of(Kind::Virtlockd));
        report.target(
            format!("{n} parallel starts: lockhook's added wall time ≤ virtlockd's"),
            format!(
                "{} vs {} ms ({rounds} round{})",
                lh.map_or_else(|| "n/a".into(), signed_ms),
                vl.map_or_else(|| "n/a".into(), signed_ms),
                if rounds == 1 { "" } else { "s" }
            ),
            "lockhook ≤ virtlockd",
            match (lh, vl) {
                (Some(a), Some(b)) if a.is_finite() && b.is_finite() => Some(a <= b),
                _ => None,
            },
        );
    }
    if !p.failures.is_empty() {
        let _ = writeln!(text, "\nFailed rounds (left out): {}", p.failures.len());
        for f in p.failures.iter().take(5) {
            let _ = writeln!(text, "- {f}");
        }
    }
    report.section(text);
}
