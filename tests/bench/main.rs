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
//! * `--parts 1,2,3,4`     which parts to run, default all
//! * `--quick`             a smoke run: 3 / 2 / 10 rounds, 10,50 holders
//! * `--trace-hooks`       part 1 also runs lockhook behind a wrapper that times each hook call
//!
//! The table goes to stdout at the end and to `tests/bench/last-result.md`; progress to stderr.
//! Parts:
//! 1. `virsh start` and `virsh destroy` of a 1-disk and a 16-disk guest on one private libvirtd
//!    per configuration (no hook, no-op sh hook, no-op /bin/true hook, lockhook, virtlockd);
//! 2. the hook alone: `prepare` / `start` / `release` for 1, 16, 64 and 256 disks, and
//!    `exec /bin/true`, with a least-squares fit (fixed cost, cost per disk); the same with
//!    `engine = "sanlock"` on a private sanlock daemon (skipped, loudly, without sanlock);
//! 3. holder footprint: RSS/PSS of one holder, total PSS of 100 and 500, fds per holder;
//! 4. 8 guests started at once, with and without lockhook (and virtlockd).

#[path = "../common/libvirtd.rs"]
mod libvirtd;

mod footprint;
mod hook_alone;
mod libvirt_bench;
mod report;
mod sanlock_daemon;
mod stats;
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
    parts: Vec<u8>,
    trace_hooks: bool,
}

#[allow(clippy::exit)] // a usage error ends the run before anything started
fn usage(msg: &str) -> ! {
    eprintln!(
        "bench: {msg}\nusage: run.sh [--rounds N] [--parallel-rounds N] [--hook-rounds N] [--holders A,B] \
         [--parts 1,2,3,4] [--quick] [--trace-hooks]"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        rounds: 25,
        parallel_rounds: 12,
        hook_rounds: 60,
        holders: vec![100, 500],
        parts: vec![1, 2, 3, 4],
        trace_hooks: false,
    };
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> usize {
        v.and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage(&format!("{what} needs a number > 0")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--rounds" => o.rounds = num(args.next(), "--rounds"),
            "--parallel-rounds" => o.parallel_rounds = num(args.next(), "--parallel-rounds"),
            "--hook-rounds" => o.hook_rounds = num(args.next(), "--hook-rounds"),
            "--holders" => {
                o.holders = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage("--holders needs A,B")))
                    .collect()
            }
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
            "lockhook: {} ({} KiB, sha256 {}), commit {}. Rounds: part 1 {}, part 2 {}, part 4 {}; holders {:?}.",
            lockhook.display(),
            size / 1024,
            &util::sh(&format!("sha256sum {} | cut -c1-12", lockhook.display())),
            std::env::var("LOCKHOOK_BENCH_COMMIT")
                .unwrap_or_else(|_| util::sh(&format!("git -C {} rev-parse --short HEAD", env!("CARGO_MANIFEST_DIR")))),
            opts.rounds,
            opts.hook_rounds,
            opts.parallel_rounds,
            opts.holders
        ),
        "Run by `sudo tests/bench/run.sh`. Medians over interleaved rounds; (p25..p75) shows the spread.".into(),
    ]
}

fn main() {
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

    // Parts 2 and 3 need no libvirt: quick, and done before the daemons run.
    let mut sections = Vec::new();
    if opts.parts.contains(&2) {
        let mut r = Report::default();
        hook_alone::run(work.path(), &lockhook, opts.hook_rounds, &mut r);
        sections.push((2, r));
    }
    if opts.parts.contains(&3) {
        let mut r = Report::default();
        footprint::run(work.path(), &lockhook, &opts.holders, &mut r);
        sections.push((3, r));
    }
    if opts.parts.contains(&1) || opts.parts.contains(&4) {
        let mut kinds: Vec<Kind> = if opts.parts.contains(&1) {
            Kind::ALL.to_vec()
        } else {
            vec![Kind::NoHook, Kind::Lockhook, Kind::Virtlockd]
        };
        if opts.trace_hooks && opts.parts.contains(&1) {
            kinds.push(Kind::LockhookTraced);
        }
        let instances = libvirt_bench::setup(work.path(), &lockhook, &kinds);
        libvirt_bench::warm_up(&instances);
        let mut v = Report::default();
        libvirt_bench::verify(&instances, &mut v);
        let mut serial = None;
        if opts.parts.contains(&1) {
            // Only the timed rounds count in the trace.
            let _ = std::fs::write(libvirt_bench::trace_log(work.path()), "");
            let s = libvirt_bench::run_serial(&instances, opts.rounds);
            let mut r = Report::default();
            libvirt_bench::report_serial(&instances, &s, opts.rounds, &mut r);
            if opts.trace_hooks {
                libvirt_bench::report_trace(work.path(), &mut r);
            }
            sections.push((1, r));
            serial = Some(s);
        }
        let mut par = None;
        if opts.parts.contains(&4) {
            let p = libvirt_bench::run_parallel(&instances, opts.parallel_rounds);
            let mut r = Report::default();
            libvirt_bench::report_parallel(&instances, &p, opts.parallel_rounds, &mut r);
            sections.push((4, r));
            par = Some(p);
        }
        // Raw samples, for a closer look (target/ is not versioned).
        let csv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/last-samples.csv");
        let body = libvirt_bench::samples_csv(&instances, serial.as_ref(), par.as_ref());
        if std::fs::create_dir_all(csv.parent().expect("parent"))
            .and_then(|()| std::fs::write(&csv, format!("part,configuration,disks,round,metric,ms\n{body}")))
            .is_ok()
        {
            report.note(format!("raw samples of parts 1 and 4: {}", csv.display()));
        }
        sections.push((5, v));
        drop(instances);
        util::reap_orphans();
    }
    // Print in part order (1, 2, 3, 4, then the verification).
    sections.sort_by_key(|(k, _)| *k);
    for (_, r) in sections {
        report.sections.extend(r.sections);
        report.targets.extend(r.targets);
        report.notes.extend(r.notes);
    }
    report.note(format!("total bench time {:.0} s", started.elapsed().as_secs_f64()));
    let text = report.render();
    if let Err(e) = std::fs::write(&out_file, &text) {
        eprintln!("bench: cannot write {}: {e}", out_file.display());
    } else {
        eprintln!("bench: written to {}", out_file.display());
    }
    println!("{text}");
}
