//! Part 3: what the holders cost: RSS/PSS of one, total PSS of 100 and 500 concurrently held
//! guests (driven through the hook with the fixture's domain XML, 1 disk each, no QEMU), and the
//! fds each holder keeps. Everything is released at the end.
//!
//! 3b, the held-guests sweep (issue 12): while the guests pile up, at 0, 100, 500, 1000 and 2000
//! held, a probe guest's hook-alone `prepare` (1 disk) and `release` are timed, in rounds that
//! alternate the normal path (the census says nothing died: no scan) with the path every call
//! took before the census (the bench unbalances the census, so the call scans the run directory
//! and `/proc/locks`); once more at 0 after everything is released, to see the drift. In the same
//! rounds, a second probe runs the same calls against a run directory of its own, which holds no
//! guest: "with none" measured at the same moment, on the host as it is then (the sequential
//! comparison with the first row also counts whatever else changed on the host meanwhile). At
//! the largest count, once more with every held guest's holder SIGSTOPped: their ticks apart.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::census::CensusSet;
use crate::hook_alone::{tmpfs_dir, HookEnv};
use crate::libvirtd::{guest_xml, random_uuid};
use crate::report::{table, Report};
use crate::stats::{median, mib, ms, summary, with_iqr};
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

/// The guest whose hook calls the sweep times (its holder comes and goes each round).
struct Probe {
    name: String,
    uuid: String,
    xml: String,
}

/// The probe's calls, in the sweep table's order (they run prepare, reconnect, release).
const CALLS: [&str; 3] = ["prepare", "release", "reconnect"];

/// A point's samples, `[scan forced][call]`.
type Samples = [[Vec<f64>; 3]; 2];
/// Which samples of a point (wall or CPU).
type Pick = fn(&Point) -> &Samples;

/// One point of the sweep: `held` guests held while the probe ran. Samples are indexed
/// `[scan forced][call]` (`call` as in `CALLS`).
struct Point {
    held: usize,
    label: String,
    /// Wall ms of each call.
    wall: Samples,
    /// CPU ms (user + system) of each hook process, from `getrusage(RUSAGE_CHILDREN)`.
    cpu: Samples,
    /// Total PSS (KiB) of the held guests' holders and spares, and how many processes.
    pss: Option<(f64, usize)>,
    /// A bare `exec /bin/true` in the same rounds (wall ms, CPU ms): what starting any process
    /// costs on the host as it is then.
    exec: [Vec<f64>; 2],
    /// The control probe's calls in the same rounds (a run directory with no guest held):
    /// `[wall, CPU][call]`.
    control: [[Vec<f64>; 3]; 2],
}

/// A probe and the environment it runs in.
struct ProbeIn<'a> {
    env: &'a HookEnv,
    guest: &'a Probe,
}

/// The probe's three calls (`CALLS` order), each as (wall ms, CPU ms); waits for its holder to
/// go after `release`.
fn probe_calls(at: &ProbeIn<'_>) -> [(f64, f64); 3] {
    let call = |op: &str, sub: &str| {
        let c0 = children_cpu_ms();
        let t = at.env.call_ok(&at.guest.name, op, sub, &at.guest.xml);
        (t, children_cpu_ms() - c0)
    };
    let prepare = call("prepare", "begin");
    let pid = at.env.holder_pid(&at.guest.uuid);
    // What libvirtd runs for each guest when it restarts (the holder is alive; there is no QEMU
    // to find, which the call only logs).
    let reconnect = call("reconnect", "begin");
    let release = call("release", "end");
    if let Some(pid) = pid {
        assert!(
            crate::libvirtd::wait_until(Duration::from_secs(5), || !util::alive(pid)),
            "probe holder {pid} outlived release"
        );
    }
    util::reap_orphans();
    [prepare, release, reconnect]
}

/// Untimed rounds before each point's timed ones (the first makes the census at 0 held).
const PROBE_WARMUP: usize = 2;

/// CPU ms (user + system) of every child this process has waited for so far.
fn children_cpu_ms() -> f64 {
    // SAFETY: rusage is plain data; zeroes are a valid value for every field.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the buffer we pass, which lives for the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `rounds` timed rounds of the probe's `prepare`, `reconnect` and `release`, each once as it is
/// and once with the census unbalanced by the bench (in an order alternating by round). The
/// probe's holder is waited for (untimed) after each `release`. Each call's CPU time is the
/// growth of this process's children's CPU over the call: nothing else is reaped meanwhile (the
/// probe's previous holder was, before the round; the other holders stay).
fn probe(main: &ProbeIn<'_>, control: &ProbeIn<'_>, held: usize, label: String, rounds: usize) -> Point {
    let env = main.env;
    let mut point = Point {
        held,
        label,
        wall: Default::default(),
        cpu: Default::default(),
        pss: None,
        exec: Default::default(),
        control: Default::default(),
    };
    for r in 0..rounds + PROBE_WARMUP {
        let c0 = children_cpu_ms();
        let mut bare = std::process::Command::new("/bin/true");
        let (t, out) = util::timed_with_stdin(util::clean_env(&mut bare), main.guest.xml.as_bytes());
        assert!(out.status.success(), "/bin/true failed");
        if r >= PROBE_WARMUP {
            point.exec[0].push(t);
            point.exec[1].push(children_cpu_ms() - c0);
        }
        // The control, the probe as it is and the probe with the scan forced, in each of the six
        // orders in turn: none always follows the same one.
        for slot in ORDERS[r % ORDERS.len()] {
            let scan = match slot {
                Slot::Control => {
                    record_control(&mut point, probe_calls(control), r);
                    continue;
                }
                Slot::AsItIs => false,
                Slot::ScanForced => true,
            };
            let census = if scan { CensusSet::open(&env.run_dir) } else { None };
            let forced = census.as_ref().is_some_and(|c| c.add_entered(1));
            let calls = probe_calls(main);
            if forced {
                let back = census.as_ref().is_some_and(|c| c.add_entered(-1));
                assert!(back, "could not take back the census' forced count");
            }
            if r < PROBE_WARMUP {
                continue;
            }
            let k = usize::from(scan);
            for (i, (t, c)) in calls.into_iter().enumerate() {
                let (t, c) = if scan && !forced { (f64::NAN, f64::NAN) } else { (t, c) };
                point.wall[k][i].push(t);
                point.cpu[k][i].push(c);
            }
        }
    }
    let meds = |v: &[Vec<f64>]| v.iter().map(|x| ms(median(x))).collect::<Vec<_>>().join(" / ");
    eprintln!(
        "bench: part 3b: {held} held: prepare / release / reconnect {} ms (CPU {}), scan forced {} ms (CPU {}); \
         an empty run directory meanwhile {} ms (CPU {})",
        meds(&point.wall[0]),
        meds(&point.cpu[0]),
        meds(&point.wall[1]),
        meds(&point.cpu[1]),
        meds(&point.control[0]),
        meds(&point.control[1]),
    );
    point
}

/// What a sweep round runs (see `probe`).
#[derive(Clone, Copy)]
enum Slot {
    Control,
    AsItIs,
    ScanForced,
}

/// Every order of a round's three slots.
const ORDERS: [[Slot; 3]; 6] = {
    use Slot::{AsItIs as A, Control as C, ScanForced as S};
    [[C, A, S], [A, S, C], [S, C, A], [C, S, A], [S, A, C], [A, C, S]]
};

/// Keeps the control probe's calls of round `r` (not of the warm-up rounds).
fn record_control(point: &mut Point, calls: [(f64, f64); 3], r: usize) {
    if r < PROBE_WARMUP {
        return;
    }
    for (i, (t, c)) in calls.into_iter().enumerate() {
        point.control[0][i].push(t);
        point.control[1][i].push(c);
    }
}

/// Holders stopped with `SIGSTOP` until dropped (also when a probe panics): only live processes
/// that are lockhook holders (`lockhook-holder`), so a reused pid is never signalled.
struct Stopped(Vec<nix::unistd::Pid>);

impl Stopped {
    fn new(pids: impl Iterator<Item = u32>) -> Stopped {
        let pids: Vec<nix::unistd::Pid> = pids
            .filter(|&pid| util::alive(pid) && util::comm(pid).starts_with("lockhook-holder"))
            .filter_map(|pid| i32::try_from(pid).ok().map(nix::unistd::Pid::from_raw))
            .filter(|&pid| nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).is_ok())
            .collect();
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }
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

/// What the fds of the held guests' holders are.
struct FdCheck {
    /// The first holder's fds, `fd: kind`.
    kinds: Vec<String>,
    fd_counts: Vec<f64>,
    /// What no holder should have, still there at a second look: `pattern (in N holders)`.
    bad: Vec<String>,
    /// Holders whose extra fd was gone at the second look, with what it was.
    transient: Vec<String>,
}

/// How long a holder with an unexpected fd is watched for it to go (a connection being served
/// is closed within the holder's connection timeout, `CONN_TIMEOUT` = 5 s, at the latest).
const FD_SETTLE: Duration = Duration::from_secs(6);

/// `h`'s fds now: what is wrong with them, if anything (patterns; extra sockets described),
/// each allowed one as `fd: kind`, and how many there are.
fn fd_problems(h: &Held, locked: &HashSet<(String, u64)>) -> (Vec<String>, Vec<String>, usize) {
    let fds = util::fds(h.pid);
    let mut problems = Vec::new();
    let mut sockets = Vec::new();
    let mut kinds = Vec::new();
    for (fd, target) in &fds {
        match classify(*fd, target, &h.uuid, &h.image, locked) {
            Ok(kind) => {
                if kind == "socket" {
                    sockets.push(target.clone());
                }
                kinds.push(format!("{fd}: {kind}"));
            }
            Err(p) => problems.push(format!("fd -> {p}")),
        }
    }
    if sockets.len() > 1 {
        problems.push(format!(
            "{} sockets in one holder (expected 1, its listener): {}",
            sockets.len(),
            describe_sockets(h.pid, &sockets)
        ));
    }
    (problems, kinds, fds.len())
}

/// `socket:[inode]` targets described from the holder's `/proc/PID/net/unix` (type, state, path).
fn describe_sockets(pid: u32, targets: &[String]) -> String {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    targets
        .iter()
        .map(|t| {
            let ino = t.trim_start_matches("socket:[").trim_end_matches(']');
            let line = table.lines().find(|l| l.split_whitespace().nth(6) == Some(ino));
            let Some(cols) = line.map(|l| l.split_whitespace().collect::<Vec<_>>()) else {
                return format!("{t} (not a unix socket)");
            };
            let kind = match cols.get(4) {
                Some(&"0001") => "stream",
                Some(&"0002") => "datagram",
                Some(&"0005") => "seqpacket",
                _ => "unix",
            };
            let state = match (cols.get(3), cols.get(5)) {
                (Some(&"00010000"), _) => "listening",
                (_, Some(&"03")) => "connected",
                (_, Some(&"01")) => "unconnected",
                _ => "other",
            };
            format!("{kind} {state} {}", cols.get(7).unwrap_or(&"(unbound)"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Looks at every held guest's holder's fds; one that has more than it should is looked at
/// again until it settles (`FD_SETTLE`): only what is still there counts as a leak.
fn check_fds(held: &[Held]) -> FdCheck {
    let locked: HashSet<(String, u64)> =
        util::proc_locks().into_iter().filter(|l| l.kind == "OFDLCK").map(|l| (l.dev, l.ino)).collect();
    let mut kinds = Vec::new();
    let mut fd_counts = Vec::new();
    let mut suspects = Vec::new();
    for (i, h) in held.iter().enumerate() {
        let (problems, its_kinds, n) = fd_problems(h, &locked);
        if i == 0 {
            kinds = its_kinds;
        }
        fd_counts.push(n as f64);
        if !problems.is_empty() {
            suspects.push((h, problems));
        }
    }
    let deadline = std::time::Instant::now() + FD_SETTLE;
    let mut bad: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut transient = Vec::new();
    for (h, first) in suspects {
        let mut now = fd_problems(h, &locked).0;
        while !now.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = fd_problems(h, &locked).0;
        }
        if now.is_empty() {
            transient.push(format!("holder {} (pid {}): {}", h.name, h.pid, first.join("; ")));
        }
        for p in now {
            *bad.entry(p).or_default() += 1;
        }
    }
    let bad = bad.into_iter().map(|(p, n)| format!("{p} (in {n} holders)")).collect();
    FdCheck { kinds, fd_counts, bad, transient }
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

/// `counts`: where the footprint is read; `sweep`: where the probe is timed (0 = before the
/// first guest), `sweep_rounds` rounds each.
pub fn run(work: &Path, lockhook: &Path, counts: &[usize], sweep: &[usize], sweep_rounds: usize, report: &mut Report) {
    let dir = work.join("holders");
    let shm = tmpfs_dir("lockhook-bench-holders-");
    let env = HookEnv::new(&dir, &shm.path().join("run"), lockhook);
    // The control probe's own run directory and images: no guest is ever held there.
    let control_shm = tmpfs_dir("lockhook-bench-control-");
    let control_env = HookEnv::new(&work.join("control"), &control_shm.path().join("run"), lockhook);
    let control_guest = {
        let image = work.join("control/img/probe.raw");
        util::sparse_image(&image, 1 << 20);
        let uuid = random_uuid();
        Probe { name: "control".into(), xml: guest_xml("control", &uuid, &util::raw_disk(&image, 0)), uuid }
    };
    let control = ProbeIn { env: &control_env, guest: &control_guest };
    let max = counts.iter().chain(sweep).copied().max().unwrap_or(1).max(1);
    let probe_guest = {
        let image = dir.join("img/probe.raw");
        util::sparse_image(&image, 1 << 20);
        let uuid = random_uuid();
        Probe { name: "probe".into(), xml: guest_xml("probe", &uuid, &util::raw_disk(&image, 0)), uuid }
    };
    let mut points: Vec<Point> = Vec::new();
    if sweep.contains(&0) {
        points.push(probe(&ProbeIn { env: &env, guest: &probe_guest }, &control, 0, "0".into(), sweep_rounds));
    }
    let mut held: Vec<Held> = Vec::new();
    let mut prepare_ms = Vec::new();
    let mut one: Option<Mem> = None;
    let mut fresh: Option<Mem> = None;
    let mut one_fds = Vec::new();
    let mut at: Vec<(usize, Mem, usize, Mem, usize)> = Vec::new();
    let mut spare_one = (Mem::default(), 0);
    let mut lost: Vec<String> = Vec::new();
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
        if counts.contains(&(i + 1)) || sweep.contains(&(i + 1)) {
            std::thread::sleep(SETTLE);
            let dead: Vec<(usize, u32)> =
                held.iter().enumerate().filter(|(_, h)| !util::alive(h.pid)).map(|(k, h)| (k, h.pid)).collect();
            if let (Some(first), Some(last)) = (dead.first(), dead.last()) {
                util::reap_orphans();
                let how: std::collections::BTreeMap<String, usize> =
                    dead.iter().fold(Default::default(), |mut m, (_, pid)| {
                        *m.entry(util::exit_of(*pid).unwrap_or_else(|| "not reaped by the bench".into()))
                            .or_default() += 1;
                        m
                    });
                let line = format!(
                    "{} of the {} held guests' holders are gone (guests {}..{}): {how:?}",
                    dead.len(),
                    i + 1,
                    first.0,
                    last.0
                );
                eprintln!("bench: part 3: WARNING: {line}");
                lost.push(line);
            }
            let spare = spares(&env.config, &held);
            let pids: Vec<u32> = held.iter().map(|h| h.pid).chain(spare.iter().copied()).collect();
            let (sum, n) = total(&pids);
            let first = util::mem(held[0].pid).unwrap_or_default();
            at.push((i + 1, sum, n, first, spare.len()));
            eprintln!(
                "bench: part 3: {} holders, total PSS {} ({:.0} s)",
                i + 1,
                mib(sum.pss),
                t0.elapsed().as_secs_f64()
            );
            if sweep.contains(&(i + 1)) {
                let main = ProbeIn { env: &env, guest: &probe_guest };
                let mut point = probe(&main, &control, i + 1, (i + 1).to_string(), sweep_rounds);
                point.pss = Some((sum.pss, n));
                points.push(point);
                if i + 1 == max {
                    // The same with every held guest's holder stopped: what their being there
                    // costs the host, apart from what they do (their ticks).
                    let stopped = Stopped::new(held.iter().map(|h| h.pid));
                    let label = format!("{} (their holders SIGSTOPped)", i + 1);
                    points.push(probe(&main, &control, i + 1, label, sweep_rounds));
                    drop(stopped);
                }
            }
        }
    }

    // fds of every holder, grouped by kind.
    let FdCheck { kinds, fd_counts, bad, transient } = check_fds(&held);

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
    if !sweep.is_empty() {
        points.push(probe(
            &ProbeIn { env: &env, guest: &probe_guest },
            &control,
            0,
            format!("0 (again, after releasing all {})", held.len()),
            sweep_rounds,
        ));
    }
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
    if !transient.is_empty() {
        let _ = writeln!(
            text,
            "At the first look {} holder(s) had one more fd, gone at a second look within {} s (a connection \
             or a log line being served, not a leak): {}.",
            transient.len(),
            FD_SETTLE.as_secs(),
            transient.join("; ")
        );
    }
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
    for line in &lost {
        let _ = writeln!(
            text,
            "\n**Holders lost while the guests were held: {line}.** The figures after it count fewer holders."
        );
        report.note(format!("part 3: holders lost: {line}"));
    }
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
    if !points.is_empty() {
        report_sweep(&points, sweep_rounds, report);
    }
    if let Some(m) = one {
        report.target("one idle holder alone: PSS (issue 12)", mib(m.pss), "≤ 0.5 MiB", Some(m.pss <= 512.0));
    }
    match at.iter().find(|a| a.0 == 2000) {
        Some((_, sum, n, _, _)) => report.target(
            "2000 held guests: total PSS of their holders",
            format!("{} ({} per holder)", mib(sum.pss), mib(sum.pss / *n as f64)),
            "≤ 300 MiB",
            Some(sum.pss <= 300.0 * 1024.0),
        ),
        None => report.target(
            "2000 held guests: total PSS of their holders",
            format!("not run (at most {} held in this run)", held.len()),
            "≤ 300 MiB",
            None,
        ),
    }
    // Holders are gone: the run dir's semaphore set would outlive it.
    std::thread::sleep(Duration::from_millis(200));
    crate::census::remove(&env.run_dir);
    crate::census::remove(&control_env.run_dir);
    drop(shm);
    drop(control_shm);
}

/// Section 3b and its targets.
fn report_sweep(points: &[Point], rounds: usize, report: &mut Report) {
    let mut text = format!(
        "## 3b. Hook calls with guests held (the census at work; {rounds} rounds per row; ms, median (p25..p75))\n\n\
         A probe guest (1 disk, its own image) runs `prepare`, `reconnect` (what libvirtd runs for each guest when \
         it restarts, see part 6; its holder is alive, there is no QEMU to find) and `release` through the hook \
         alone (as in part 2, no QEMU) while the part-3 guests are held, each held through the hook's `prepare`. \
         Each round runs them twice, in alternating order: as they are (the census says no holder died, so each \
         call skips the re-adoption scan) and with the census unbalanced by the bench (`ENTERED` + 1 for the \
         duration of the three calls), so that each call scans the run directory and `/proc/locks`, as every hook \
         call did before the census. `/proc/locks` is not warmed before the calls (unlike part 2). The holder of \
         the probe is waited for (untimed) after each `release`. Wall time first; then the hook process's own CPU \
         time (user + system, `getrusage`), which the other processes on this 2-core host do not inflate. The \
         targets are on the wall time of `prepare` and `release`. In the same rounds a control probe runs the same \
         three calls against a run directory of its own where no guest is held (\"empty run dir\"): with none, \
         measured at the same moment; the first row and the last (0 again) compare across time.\n\n"
    );
    let head: Vec<String> = std::iter::once("guests held".to_owned())
        .chain(CALLS.iter().map(|c| format!("`{c}`")))
        .chain(CALLS.iter().map(|c| format!("`{c}`, scan forced")))
        .chain(CALLS.iter().take(2).map(|c| format!("`{c}`, empty run dir")))
        .chain(["bare `exec /bin/true`".to_owned(), "holders' total PSS".to_owned()])
        .collect();
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    for (title, get) in
        [("Wall time", (|p: &Point| &p.wall) as Pick), ("CPU time of the hook process", |p: &Point| &p.cpu)]
    {
        let mut rows = Vec::new();
        for p in points {
            let v = get(p);
            let mut row = vec![p.label.clone()];
            row.extend(v.iter().flatten().map(|x| with_iqr(&summary(x))));
            let k = usize::from(title != "Wall time");
            row.extend(p.control[k].iter().take(2).map(|x| with_iqr(&summary(x))));
            row.push(with_iqr(&summary(&p.exec[k])));
            row.push(p.pss.map_or_else(|| "-".into(), |(kib, n)| format!("{} ({n} processes)", mib(kib))));
            rows.push(row);
        }
        let _ = writeln!(text, "{title}:\n");
        text.push_str(&table(&head, &rows));
        text.push('\n');
    }
    let base = &points[0];
    let top = points.iter().filter(|p| p.pss.is_some()).max_by_key(|p| p.held);
    if let Some(top) = top {
        let ratio = |a: &[f64], b: &[f64]| median(a) / median(b);
        let ratios = |get: Pick, k: usize| {
            (0..3)
                .map(|i| format!("`{}` × {:.2}", CALLS[i], ratio(&get(top)[k][i], &get(base)[k][i])))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (wall, cpu): (Pick, Pick) = (|p| &p.wall, |p| &p.cpu);
        let exec = |k: usize| ratio(&top.exec[k], &base.exec[k]);
        let _ = writeln!(
            text,
            "With {} guests held vs none, wall time: {} as they are; {} with the scan forced; a bare `exec` × {:.2}. \
             CPU time: {}; with the scan forced {}; a bare `exec` × {:.2}.",
            top.held,
            ratios(wall, 0),
            ratios(wall, 1),
            exec(0),
            ratios(cpu, 0),
            ratios(cpu, 1),
            exec(1),
        );
        // What the host's own growth leaves of each call's: the bare exec's added time taken off.
        let net = |i: usize, k: usize| {
            let get = |p: &Point| median(if k == 0 { &p.wall[0][i] } else { &p.cpu[0][i] });
            (get(top) - (median(&top.exec[k]) - median(&base.exec[k]))) / get(base)
        };
        let _ = writeln!(
            text,
            "\nNet of what a bare `exec` gained on the host meanwhile (call at {held} − (exec at {held} − exec at 0), \
             ÷ call at 0): `prepare` × {:.2} wall, × {:.2} CPU; `release` × {:.2} wall, × {:.2} CPU.",
            net(0, 0),
            net(0, 1),
            net(1, 0),
            net(1, 1),
            held = top.held,
        );
        for (i, what) in CALLS.iter().enumerate().take(2) {
            let (a, b) = (&top.wall[0][i], &base.wall[0][i]);
            let r = ratio(a, b);
            report.target(
                format!(
                    "`{what}` (1 disk) with {} guests held ÷ with none{}",
                    top.held,
                    if top.held == 2000 { String::new() } else { " (the target's 2000 were not run)".into() }
                ),
                format!(
                    "{r:.2} ({} vs {} ms; CPU {} vs {} ms; a bare exec × {:.2} wall, × {:.2} CPU)",
                    ms(median(a)),
                    ms(median(b)),
                    ms(median(&top.cpu[0][i])),
                    ms(median(&base.cpu[0][i])),
                    exec(0),
                    exec(1),
                ),
                "within 10 % (≤ 1.10)",
                r.is_finite().then_some(r <= 1.10),
            );
            // The same call in the empty run directory, in the same rounds: the hook's own
            // dependence on the guests of its run directory, whatever the host does meanwhile.
            let (c, cc) = (&top.control[0][i], &top.control[1][i]);
            let paired = ratio(a, c);
            let _ = writeln!(
                text,
                "\n`{what}` with {} held ÷ the same call in an empty run directory, same rounds: × {paired:.2} wall \
                 ({} vs {} ms; per-round difference {} ms), × {:.2} CPU.",
                top.held,
                ms(median(a)),
                ms(median(c)),
                crate::stats::signed_with_ci(&crate::stats::paired_diff(a, c)),
                ratio(&top.cpu[0][i], cc),
            );
            report.target(
                format!(
                    "`{what}` with {} held ÷ the same call in an empty run directory on the same host, same rounds",
                    top.held
                ),
                format!(
                    "{paired:.2} ({} vs {} ms; CPU × {:.2})",
                    ms(median(a)),
                    ms(median(c)),
                    ratio(&top.cpu[0][i], cc)
                ),
                "≤ 1.10",
                paired.is_finite().then_some(paired <= 1.10),
            );
            let n = net(i, 0);
            report.target(
                format!(
                    "`{what}` with {} held ÷ with none, net of a bare exec's own growth (the host's floor)",
                    top.held
                ),
                format!("{n:.2} (CPU {:.2})", net(i, 1)),
                "≤ 1.10",
                n.is_finite().then_some(n <= 1.10),
            );
        }
        if let Some(stopped) = points.iter().find(|p| p.held == top.held && p.pss.is_none() && p.held > 0) {
            for (i, what) in CALLS.iter().enumerate().take(2) {
                let m = |p: &Point| median(&p.wall[0][i]);
                let c = |p: &Point| median(&p.control[0][i]);
                let _ = writeln!(
                    text,
                    "\n`{what}` with the {} holders running vs `SIGSTOP`ped: {} vs {} ms (the empty run directory's: \
                     {} vs {} ms); ÷ the empty run directory's, × {:.2} vs × {:.2}.",
                    top.held,
                    ms(m(top)),
                    ms(m(stopped)),
                    ms(c(top)),
                    ms(c(stopped)),
                    m(top) / c(top),
                    m(stopped) / c(stopped),
                );
            }
        }
    }
    report.section(text);
}
