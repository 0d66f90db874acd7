//! lockhook's benchmark (issue 5): lockhook against no hook, a no-op hook and virtlockd, measured
//! side by side in one run, in interleaved rounds, reported as medians and ratios.
//!
//! Run it with `sudo tests/bench/run.sh` (builds the release binary, then
//! `cargo bench --bench lockhook`). Options (after `run.sh` or `cargo bench --bench lockhook --`):
//!
//! * `--rounds N`          part 1 rounds (virsh start/destroy), default 25
//! * `--parallel-rounds N` part 4 rounds (8 parallel starts), default 12
//! * `--hook-rounds N`     part 2 rounds (the hook alone), default 60
//! * `--holders A,B`       part 3 holder counts, default 100,500
//! * `--held A,B,..`       part 3b: guests held while the probe is timed, default 0,100,500,1000,2000
//! * `--held-rounds N`     part 3b rounds per count, default 40
//! * `--wide-rounds N`     part 4b rounds (32 parallel starts), default 4
//! * `--churn N`           part 5 transient guests, default 500
//! * `--storm M`           part 6 guests (M/2, then M), default 500
//! * `--storm-restarts N`  part 6 restarts per M, default 3
//! * `--parts 1,2,3,4,5,6` which parts to run, default all
//! * `--quick`             a smoke run: 3 / 2 / 10 rounds, 10,50 holders; 3b 20 rounds (still up to
//!   2000 held: holding them takes seconds); 4b 1 round; 5 100 guests; 6 M = 20, 5 restarts
//! * `--trace-hooks`       part 1 also runs lockhook, and `/bin/true` for reference, behind a
//!   wrapper that times each hook call (1b: lockhook's calls on the start path − the no-op's,
//!   round by round)
//!
//! The table goes to stdout at the end, on top of the earlier runs in `tests/bench/last-result.md`
//! and alone to `target/bench/last-run.md`; progress to stderr.
//! Parts:
//! 1. `virsh start` and `virsh destroy` of a 1-disk and a 16-disk guest on one private libvirtd
//!    per configuration (no hook, no-op sh hook, no-op /bin/true hook, lockhook, virtlockd);
//! 2. the hook alone: `prepare` / `start` / `release` for 1, 16, 64 and 256 disks, and
//!    `exec /bin/true`, with a least-squares fit (fixed cost, cost per disk); the same with
//!    `engine = "sanlock"` on a private sanlock daemon (skipped, loudly, without sanlock);
//! 3. holder footprint: RSS/PSS of one holder, total PSS of 100 and 500, fds per holder;
//!    3b. the hook alone with 0-2000 guests held, with and without the census' shortcut;
//! 4. 8 guests started at once, with and without lockhook (and virtlockd); 4b. 32 at once;
//! 5. leftovers after churn: the run directory after hundreds of guests came and went;
//! 6. a reconnect storm: libvirtd restarted with M/2 and M guests running.

#[path = "../common/libvirtd.rs"]
mod libvirtd;
/// The tests' sanlock daemon fixture (it finds `wait_until` in its parent, as in `tests/common`).
#[path = "../common/sanlock.rs"]
#[allow(dead_code)]
mod sanlock;
use libvirtd::wait_until;

mod census;
mod churn;
mod footprint;
mod hook_alone;
mod libvirt_bench;
mod report;
mod sanlock_daemon;
mod stats;
mod storm;
mod util;

use std::path::{Path, PathBuf};
use std::time::Instant;

use libvirt_bench::Kind;
use report::Report;

struct Opts {
    rounds: usize,
    parallel_rounds: usize,
    hook_rounds: usize,
    holders: Vec<usize>,
    held: Vec<usize>,
    held_rounds: usize,
    wide_rounds: usize,
    churn: usize,
    storm: usize,
    storm_restarts: usize,
    parts: Vec<u8>,
    trace_hooks: bool,
}

#[allow(clippy::exit)] // a usage error ends the run before anything started
fn usage(msg: &str) -> ! {
    eprintln!(
        "bench: {msg}\nusage: run.sh [--rounds N] [--parallel-rounds N] [--hook-rounds N] [--holders A,B] \
         [--held A,B,..] [--held-rounds N] [--wide-rounds N] [--churn N] [--storm M] [--storm-restarts N] \
         [--parts 1,2,3,4,5,6] [--quick] [--trace-hooks]"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        rounds: 25,
        parallel_rounds: 12,
        hook_rounds: 60,
        holders: vec![100, 500],
        held: vec![0, 100, 500, 1000, 2000],
        held_rounds: 40,
        wide_rounds: 4,
        churn: 500,
        storm: 500,
        storm_restarts: 3,
        parts: vec![1, 2, 3, 4, 5, 6],
        trace_hooks: false,
    };
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> usize {
        v.and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage(&format!("{what} needs a number > 0")))
    };
    let list = |v: Option<String>, what: &str| -> Vec<usize> {
        v.unwrap_or_default()
            .split(',')
            .map(|s| s.trim().parse().unwrap_or_else(|_| usage(&format!("{what} needs A,B,.."))))
            .collect()
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--rounds" => o.rounds = num(args.next(), "--rounds"),
            "--parallel-rounds" => o.parallel_rounds = num(args.next(), "--parallel-rounds"),
            "--hook-rounds" => o.hook_rounds = num(args.next(), "--hook-rounds"),
            "--holders" => o.holders = list(args.next(), "--holders"),
            "--held" => o.held = list(args.next(), "--held"),
            "--held-rounds" => o.held_rounds = num(args.next(), "--held-rounds"),
            "--wide-rounds" => o.wide_rounds = num(args.next(), "--wide-rounds"),
            "--churn" => o.churn = num(args.next(), "--churn"),
            "--storm" => o.storm = num(args.next(), "--storm"),
            "--storm-restarts" => o.storm_restarts = num(args.next(), "--storm-restarts"),
            "--parts" => {
                o.parts = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage("--parts needs e.g. 1,3")))
                    .collect()
            }
            "--trace-hooks" => o.trace_hooks = true,
            "--quick" => {
                o.rounds = 3;
                o.parallel_rounds = 2;
                o.hook_rounds = 10;
                o.holders = vec![10, 50];
                o.held_rounds = 20;
                o.wide_rounds = 1;
                o.churn = 100;
                o.storm = 20;
                o.storm_restarts = 5;
            }
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    o
}

fn header(opts: &Opts, lockhook: &Path) -> Vec<String> {
    let size = std::fs::metadata(lockhook).map(|m| m.len()).unwrap_or(0);
    vec![
        "# lockhook benchmark".into(),
        String::new(),
        format!(
            "{} · {} · kernel {} · {} CPUs · {} · {} · {}",
            util::sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
            util::sh("hostname"),
            util::sh("uname -r"),
            util::sh("nproc"),
            if libvirtd::kvm_usable() { "KVM" } else { "TCG (no /dev/kvm)" },
            util::sh("libvirtd --version | head -1"),
            util::sh("qemu-system-x86_64 --version | head -1"),
        ),
        format!(
            "lockhook: {} ({} KiB, sha256 {}), commit {}. Rounds: part 1 {}, part 2 {}, part 4 {} (4b {}); \
             holders {:?}; held {:?} ({} rounds); churn {}; storm M = {} ({} restarts).",
            lockhook.display(),
            size / 1024,
            &util::sh(&format!("sha256sum {} | cut -c1-12", lockhook.display())),
            std::env::var("LOCKHOOK_BENCH_COMMIT")
                .unwrap_or_else(|_| util::sh(&format!("git -C {} rev-parse --short HEAD", env!("CARGO_MANIFEST_DIR")))),
            opts.rounds,
            opts.hook_rounds,
            opts.parallel_rounds,
            opts.wide_rounds,
            opts.holders,
            opts.held,
            opts.held_rounds,
            opts.churn,
            opts.storm,
            opts.storm_restarts
        ),
        "Run by `sudo tests/bench/run.sh`. Medians over interleaved rounds; (p25..p75) shows the spread.".into(),
    ]
}

fn main() {
    // A child of this bench, started to time what a fresh process pays (see `util::cpu_probe`).
    if std::env::var_os(util::CPU_PROBE).is_some() {
        util::cpu_probe_child();
        return;
    }
    let opts = parse_args();
    if let Some(missing) = libvirtd::missing_requirements() {
        usage(&format!("cannot run: {missing}"));
    }
    // run.sh copies the `cargo build --release` binary aside (cargo bench re-links
    // target/release/lockhook with the bench profile, and a concurrent build could replace it).
    let lockhook = std::env::var_os("LOCKHOOK_BENCH_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lockhook")), PathBuf::from);
    assert!(lockhook.is_file(), "{} is missing: run `cargo build --release` first", lockhook.display());
    let out_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bench/last-result.md");
    util::become_subreaper();
    util::spawn_prompt_reaper();

    let work = tempfile::Builder::new().prefix("lockhook-bench-").tempdir().expect("create the work directory");
    let started = Instant::now();
    let mut report = Report { header: header(&opts, &lockhook), ..Report::default() };

    // Parts 2, 3 and 5 need no libvirt: quick, and done before the daemons run. Sections are
    // keyed by part (x10; 4b is 41; the verification 90).
    let mut sections = Vec::new();
    if opts.parts.contains(&2) {
        let mut r = Report::default();
        hook_alone::run(work.path(), &lockhook, opts.hook_rounds, &mut r);
        sections.push((20, r));
    }
    if opts.parts.contains(&3) {
        let mut r = Report::default();
        footprint::run(work.path(), &lockhook, &opts.holders, &opts.held, opts.held_rounds, &mut r);
        sections.push((30, r));
    }
    if opts.parts.contains(&5) {
        let mut r = Report::default();
        churn::run(work.path(), &lockhook, opts.churn, &mut r);
        sections.push((50, r));
    }
    if opts.parts.contains(&1) || opts.parts.contains(&4) || opts.parts.contains(&6) {
        let mut kinds: Vec<Kind> = if opts.parts.contains(&1) {
            Kind::ALL.to_vec()
        } else if opts.parts.contains(&4) {
            vec![Kind::NoHook, Kind::NoopTrue, Kind::Lockhook, Kind::Virtlockd]
        } else {
            vec![Kind::NoHook, Kind::Lockhook]
        };
        if opts.parts.contains(&6) && !kinds.contains(&Kind::NoopTrue) {
            kinds.insert(1, Kind::NoopTrue);
        }
        if opts.trace_hooks && opts.parts.contains(&1) {
            kinds.extend(libvirt_bench::TRACED);
        }
        let instances = libvirt_bench::setup(work.path(), &lockhook, &kinds);
        libvirt_bench::warm_up(&instances);
        let mut v = Report::default();
        libvirt_bench::verify(&instances, &mut v);
        let mut serial = None;
        if opts.parts.contains(&1) {
            // Only the timed rounds count in the trace.
            for kind in libvirt_bench::TRACED {
                let _ = std::fs::write(libvirt_bench::trace_log(work.path(), kind), "");
            }
            let s = libvirt_bench::run_serial(&instances, opts.rounds);
            let mut r = Report::default();
            libvirt_bench::report_serial(&instances, &s, opts.rounds, &mut r);
            if opts.trace_hooks {
                libvirt_bench::report_trace(work.path(), opts.rounds, &mut r);
            }
            sections.push((10, r));
            serial = Some(s);
        }
        let mut par = Vec::new();
        if opts.parts.contains(&4) {
            for (key, width, rounds) in [
                (40, libvirt_bench::PARALLEL, opts.parallel_rounds),
                (41, libvirt_bench::PARALLEL_WIDE, opts.wide_rounds),
            ] {
                let p = libvirt_bench::run_parallel(&instances, rounds, width);
                let mut r = Report::default();
                libvirt_bench::report_parallel(&instances, &p, rounds, &mut r);
                sections.push((key, r));
                par.push(p);
            }
        }
        if opts.parts.contains(&6) {
            let mut r = Report::default();
            let config = storm::lockhook_config(work.path());
            storm::run(&instances, work.path(), &config, opts.storm, opts.storm_restarts, &mut r);
            sections.push((60, r));
        }
        // Raw samples, for a closer look (target/ is not versioned).
        let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/last-samples.csv");
        let par: Vec<&libvirt_bench::Parallel> = par.iter().collect();
        let body = libvirt_bench::samples_csv(&instances, serial.as_ref(), &par);
        if std::fs::create_dir_all(csv.parent().expect("parent"))
            .and_then(|()| std::fs::write(&csv, format!("part,configuration,disks,round,metric,ms\n{body}")))
            .is_ok()
        {
            report.note(format!("raw samples of parts 1 and 4: {}", csv.display()));
        }
        sections.push((90, v));
        // The lockhook instances' run dirs (their /run is a tmpfs of their own) hold semaphore
        // sets that would outlive them.
        let run_dirs: Vec<PathBuf> = instances
            .iter()
            .filter(|i| matches!(i.kind, Kind::Lockhook | Kind::LockhookTraced))
            .map(|i| i.lv.ns_path(Path::new("/run/lockhook")))
            .collect();
        for dir in &run_dirs {
            census::remove(dir);
        }
        drop(instances);
        util::reap_orphans();
    }
    // Print in part order (1, 2, 3, 4, 5, 6, then the verification).
    sections.sort_by_key(|(k, _)| *k);
    for (_, r) in sections {
        report.sections.extend(r.sections);
        report.targets.extend(r.targets);
        report.notes.extend(r.notes);
    }
    report.note(format!("total bench time {:.0} s", started.elapsed().as_secs_f64()));
    let text = report.render();
    // This run alone beside the binary, and on top of the earlier runs in `last-result.md`
    // (which keeps them: a short run must not wipe a long one's figures).
    let alone = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/last-run.md");
    if let Some(dir) = alone.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let earlier = std::fs::read_to_string(&out_file).unwrap_or_default();
    let all = if earlier.is_empty() { text.clone() } else { format!("{text}\n{earlier}") };
    for (path, body) in [(&alone, &text), (&out_file, &all)] {
        match std::fs::write(path, body) {
            Err(e) => eprintln!("bench: cannot write {}: {e}", path.display()),
            Ok(()) => eprintln!("bench: written to {}", path.display()),
        }
    }
    println!("{text}");
}
