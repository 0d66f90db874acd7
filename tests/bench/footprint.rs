//! Part 3: what the holders cost: RSS/PSS of one, total PSS of 100 and 500 concurrently held
//! guests (driven through the hook with the fixture's domain XML, 1 disk each, no QEMU), and the
//! fds each holder keeps. Everything is released at the end.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::hook_alone::{tmpfs_dir, HookEnv};
use crate::libvirtd::{guest_xml, random_uuid};
use crate::report::{table, Report};
use crate::stats::{mib, summary, with_iqr};
use crate::util::{self, Mem};

/// How long a holder is left alone before its memory is read (it may trim itself on its tick).
const SETTLE: Duration = Duration::from_secs(3);

struct Held {
    name: String,
    uuid: String,
    xml: String,
    image: PathBuf,
    pid: u32,
}

/// The memory of an idle holder: the sample with the median PSS of 11 taken 100 ms apart (a
/// holder may shed and re-fault code pages on its tick, so one sample depends on the moment).
fn idle_mem(pid: u32) -> Option<Mem> {
    let mut samples: Vec<Mem> = (0..11)
        .filter_map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            util::mem(pid)
        })
        .collect();
    samples.sort_by(|a, b| a.pss.total_cmp(&b.pss));
    samples.get(samples.len() / 2).copied()
}

/// Sums the memory of `pids` (KiB).
fn total(pids: &[u32]) -> (Mem, usize) {
    let mut sum = Mem::default();
    let mut n = 0;
    for m in pids.iter().filter_map(|&p| util::mem(p)) {
        sum.rss += m.rss;
        sum.pss += m.pss;
        sum.uss += m.uss;
        n += 1;
    }
    (sum, n)
}

/// Spare holders (`holder --spare`, started ahead of the next guest) of this configuration that
/// no guest claimed yet (a claimed spare keeps its command line: `guests` are left out).
fn spares(config: &Path, guests: &[Held]) -> Vec<u32> {
    let config = config.display().to_string();
    util::all_pids()
        .into_iter()
        .filter(|p| !guests.iter().any(|h| h.pid == *p))
        .filter(|&p| {
            let args = util::cmdline(p);
            args.iter().any(|a| a == "--spare") && args.contains(&config) && util::alive(p)
        })
        .collect()
}

/// What kind of fd a holder has: `Ok(kind)` if allowed, `Err(pattern)` if not. `locked` holds
/// the (dev, inode) of every file with an OFD lock on it.
fn classify(
    fd: u32,
    target: &str,
    uuid: &str,
    image: &Path,
    locked: &HashSet<(String, u64)>,
) -> Result<String, String> {
    if fd <= 2 && target == "/dev/null" {
        return Ok("stdio (/dev/null)".into());
    }
    if target.starts_with("socket:") {
        return Ok("socket".into());
    }
    if target.ends_with(&format!("{uuid}.lock")) {
        return Ok("instance lock file".into());
    }
    if Path::new(target) == image {
        return Ok("locked image".into());
    }
    let has_lock = Path::new(target).is_file() && locked.contains(&util::proc_locks_dev(Path::new(target)));
    if has_lock {
        // E.g. the lockspace owner record, which carries its own OFD lock.
        return Ok(format!("locked file {}", pattern(target)));
    }
    Err(pattern(target))
}

/// A path with hex hashes and UUIDs replaced, so one kind of fd is one line.
fn pattern(target: &str) -> String {
    target
        .split('/')
        .map(|part| {
            let hexlen = part.chars().take_while(|c| c.is_ascii_hexdigit() || *c == '-').count();
            if hexlen >= 16 {
                format!("<id>{}", &part[hexlen..])
            } else if part.starts_with("lockhook-bench-") {
                "<bench>".to_owned()
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

pub fn run(work: &Path, lockhook: &Path, counts: &[usize], report: &mut Report) {
    let dir = work.join("holders");
    let shm = tmpfs_dir("lockhook-bench-holders-");
    let env = HookEnv::new(&dir, &shm.path().join("run"), lockhook);
    let max = counts.iter().copied().max().unwrap_or(1);
    let mut held: Vec<Held> = Vec::new();
    let mut prepare_ms = Vec::new();
    let mut one: Option<Mem> = None;
    let mut fresh: Option<Mem> = None;
    let mut one_fds = Vec::new();
    let mut at: Vec<(usize, Mem, usize, Mem, usize)> = Vec::new();
    let mut spare_one = (Mem::default(), 0);
    let t0 = Instant::now();
    for i in 0..max {
        let image = dir.join(format!("img/h{i}.raw"));
        util::sparse_image(&image, 1 << 20);
        let (name, uuid) = (format!("fp{i}"), random_uuid());
        let xml = guest_xml(&name, &uuid, &util::raw_disk(&image, 0));
        prepare_ms.push(env.call_ok(&name, "prepare", "begin", &xml));
        let pid = env.holder_pid(&uuid).unwrap_or_else(|| panic!("no holder for {name}"));
        held.push(Held { name, uuid, xml, image, pid });
        util::reap_orphans();
        if i == 0 {
            fresh = util::mem(pid);
            // Steady state: holders may trim themselves on their periodic tick.
            std::thread::sleep(SETTLE);
            one = idle_mem(pid);
            one_fds = util::fds(pid);
            spare_one = total(&spares(&env.config, &held));
        }
        if counts.contains(&(i + 1)) {
            std::thread::sleep(SETTLE);
            let spare = spares(&env.config, &held);
            let pids: Vec<u32> = held.iter().map(|h| h.pid).chain(spare.iter().copied()).collect();
            let (sum, n) = total(&pids);
            let first = util::mem(held[0].pid).unwrap_or_default();
            at.push((i + 1, sum, n, first, spare.len()));
            eprintln!("bench: part 3: {} holders, total PSS {}", i + 1, mib(sum.pss));
        }
    }

    // fds of every holder, grouped by kind.
    let locked: HashSet<(String, u64)> =
        util::proc_locks().into_iter().filter(|l| l.kind == "OFDLCK").map(|l| (l.dev, l.ino)).collect();
    let mut kinds: Vec<String> = Vec::new();
    let mut bad: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut sockets_max = 0;
    let mut fd_counts = Vec::new();
    for h in &held {
        let fds = util::fds(h.pid);
        fd_counts.push(fds.len() as f64);
        let mut sockets = 0;
        for (fd, target) in &fds {
            match classify(*fd, target, &h.uuid, &h.image, &locked) {
                Ok(kind) => {
                    sockets += usize::from(kind == "socket");
                    if h.pid == held[0].pid {
                        kinds.push(format!("{fd}: {kind}"));
                    }
                }
                Err(p) => *bad.entry(format!("fd -> {p}")).or_default() += 1,
            }
        }
        sockets_max = sockets_max.max(sockets);
    }
    if sockets_max > 1 {
        *bad.entry(format!("{sockets_max} sockets in one holder (expected 1, its listener)")).or_default() += 1;
    }
    let bad: Vec<String> = bad.into_iter().map(|(p, n)| format!("{p} (in {n} holders)")).collect();

    // Release them all.
    let mut release_ms = Vec::new();
    for h in &held {
        release_ms.push(env.call_ok(&h.name, "release", "end", &h.xml));
    }
    let gone = crate::libvirtd::wait_until(Duration::from_secs(10), || held.iter().all(|h| !util::alive(h.pid)));
    util::reap_orphans();
    let inodes: HashSet<u64> = held
        .iter()
        .filter_map(|h| std::fs::metadata(&h.image).ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })
        .collect();
    let left = util::proc_locks().iter().filter(|l| l.kind == "OFDLCK" && inodes.contains(&l.ino)).count();
    eprintln!("bench: part 3 done in {:.1} s", t0.elapsed().as_secs_f64());

    // Report.
    let mut text = String::from(
        "## 3. Holder footprint (1-disk guests held through the hook, no QEMU; KiB from /proc/PID/smaps_rollup)\n\n",
    );
    let mut rows = Vec::new();
    if let Some(m) = fresh {
        rows.push(vec!["one holder, alone, just started".into(), mib(m.rss), mib(m.pss), mib(m.uss), String::new()]);
    }
    if let Some(m) = one {
        rows.push(vec![
            format!("one holder, alone, idle ({} s later; median of 11 samples over 1 s)", SETTLE.as_secs()),
            mib(m.rss),
            mib(m.pss),
            mib(m.uss),
            "the target's figure".into(),
        ]);
    }
    if spare_one.1 > 0 {
        rows.push(vec![
            format!("+ {} spare holder(s) meanwhile", spare_one.1),
            mib(spare_one.0.rss),
            mib(spare_one.0.pss),
            mib(spare_one.0.uss),
            "idle, ready for the next start; shares the binary's pages with the holder".into(),
        ]);
    }
    for (count, sum, n, first, nspare) in &at {
        rows.push(vec![
            format!(
                "{count} holders{}, total ({} s after the last start)",
                if *nspare > 0 { format!(" + {nspare} spare") } else { String::new() },
                SETTLE.as_secs()
            ),
            mib(sum.rss),
            mib(sum.pss),
            mib(sum.uss),
            format!("{} per holder (PSS); first holder now {} PSS", mib(sum.pss / *n as f64), mib(first.pss)),
        ]);
    }
    text.push_str(&table(&["", "RSS", "PSS", "USS (private)", "notes"], &rows));
    let _ = writeln!(
        text,
        "\nOpen fds of one holder ({}): {}.\nAll {} holders (median {} fds each): {}.",
        one_fds.len(),
        kinds.join(", "),
        held.len(),
        crate::stats::median(&fd_counts),
        if bad.is_empty() { "no other fd".to_owned() } else { format!("UNEXPECTED: {}", bad.join("; ")) }
    );
    let _ = writeln!(
        text,
        "\n`prepare` while holders pile up: holders 1-{} {}, holders {}-{} {}; `release` {} (median (p25..p75), ms). \
         After release: {} holder(s) still running, {left} image lock(s) left.",
        prepare_ms.len().min(50),
        with_iqr(&summary(&prepare_ms[..prepare_ms.len().min(50)])),
        prepare_ms.len().saturating_sub(50) + 1,
        prepare_ms.len(),
        with_iqr(&summary(&prepare_ms[prepare_ms.len().saturating_sub(50)..])),
        with_iqr(&summary(&release_ms)),
        if gone { 0 } else { held.iter().filter(|h| util::alive(h.pid)).count() },
    );
    report.section(text);

    if let Some(m) = one {
        report.target("one holder (alone, idle): PSS", mib(m.pss), "≤ 1 MiB", Some(m.pss <= 1024.0));
    } else {
        report.target("one holder: PSS", "n/a", "≤ 1 MiB", None);
    }
    match at.iter().find(|a| a.0 == 500) {
        Some((_, sum, _, _, _)) => {
            report.target("500 holders: total PSS", mib(sum.pss), "≤ 500 MiB", Some(sum.pss <= 500.0 * 1024.0))
        }
        None => report.target("500 holders: total PSS", "not run", "≤ 500 MiB", None),
    }
    report.target(
        "holder fds: only stdio, its socket, its instance lock file, its locks",
        if bad.is_empty() { format!("{} fds: {}", one_fds.len(), kinds.join(", ")) } else { bad.join("; ") },
        "nothing else",
        Some(bad.is_empty()),
    );
    drop(shm);
}
