//! Part 6 (issue 12): a reconnect storm. On the no-hook, the no-op (/bin/true) hook and the
//! lockhook libvirtd of parts 1 and 4, `M/2` and then `M` transient guests (1 disk, 32 MiB, as in part 1) are started, paused
//! (`virsh create --paused`: an idle running guest costs ~0.5 % of a core in its firmware's
//! timers, so a few hundred would saturate two cores; a paused one costs none, and libvirt
//! reconnects to it and runs its `reconnect` hook as for a running one); then libvirtd is
//! SIGKILLed and started again, which runs the `reconnect` hook once per guest, each on its own
//! thread of libvirtd. Timed from the restart: until `virsh` answers, and until every guest is
//! reconnected: `virsh domstats --balloon --list-active` returns, which
//! needs each guest's job, held by libvirt's reconnect of that guest (hook call included) until
//! it is done. For lockhook, the hook calls are also counted as they begin (fanotify on its
//! config file, which each hook call opens once and nothing else opens meanwhile). A guest started here
//! costs ~25 MiB: `M` is capped so that at least `RESERVE_MIB` stay available.

use std::fmt::Write as _;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::libvirt_bench::{Instance, Kind};
use crate::libvirtd::{guest_xml, random_uuid, Libvirtd, URI};
use crate::report::{table, Report};
use crate::stats::{median, ms, signed_ms, summary, with_iqr};
use crate::util::{self, describe_failure};

/// Memory (MiB) left available, at least, when the storm's guests run.
const RESERVE_MIB: u64 = 4096;
/// `virsh create`s at once while the guests are brought up (not timed).
const STARTERS: usize = 4;
/// Time allowed for bringing up the guests of one configuration; fewer guests run after it.
const START_BUDGET: Duration = Duration::from_secs(900);

/// One restart: ms from the `libvirtd -d` until each thing happened.
#[derive(Clone)]
struct Restart {
    /// `libvirtd -d` returned.
    spawned: f64,
    answer: f64,
    all: f64,
    /// The last of the `level` hook calls began (lockhook only).
    hooks: Option<f64>,
    hooks_seen: usize,
    /// Holders that opened lockhook's config meanwhile (started meanwhile), by kind.
    others: std::collections::BTreeMap<String, usize>,
    listed: usize,
    reconnected: usize,
}

struct Level {
    guests: usize,
    restarts: Vec<Restart>,
    /// lockhook's census after the restarts (a dead holder would make every call scan).
    census: Option<String>,
}

struct Outcome {
    kind: Kind,
    levels: Vec<Level>,
    note: Option<String>,
}

fn mem_available_mib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn virsh(lv: &Libvirtd, args: &[&str]) -> std::process::Output {
    let mut argv = vec!["virsh", "-c", URI];
    argv.extend_from_slice(args);
    util::ns_command(lv, &argv).output().expect("run virsh")
}

/// Starts guests `s<from>..s<to-1>` (`STARTERS` at a time) while memory and time allow; returns
/// how many run now (`from` + those started) and why it stopped short, if it did.
fn bring_up(lv: &Libvirtd, dir: &Path, from: usize, to: usize, began: Instant) -> (usize, Option<String>) {
    let next = AtomicUsize::new(from);
    let started = AtomicUsize::new(0);
    let stop: Mutex<Option<String>> = Mutex::new(None);
    thread::scope(|scope| {
        for _ in 0..STARTERS {
            scope.spawn(|| loop {
                if stop.lock().expect("lock").is_some() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= to {
                    return;
                }
                let avail = mem_available_mib();
                let why = if avail < RESERVE_MIB {
                    Some(format!("{avail} MiB available (the storm keeps {RESERVE_MIB} MiB free)"))
                } else if began.elapsed() > START_BUDGET {
                    Some(format!("bringing the guests up took over {} s", START_BUDGET.as_secs()))
                } else {
                    None
                };
                if let Some(why) = why {
                    stop.lock().expect("lock").get_or_insert(why);
                    return;
                }
                let image = dir.join(format!("s{i}.raw"));
                util::sparse_image(&image, 16 << 20);
                let xml = dir.join(format!("s{i}.xml"));
                fs::write(&xml, guest_xml(&format!("s{i}"), &random_uuid(), &util::raw_disk(&image, 0)))
                    .expect("write a storm guest's XML");
                let out = virsh(lv, &["create", "--paused", &xml.display().to_string()]);
                if out.status.success() {
                    started.fetch_add(1, Ordering::SeqCst);
                } else {
                    stop.lock().expect("lock").get_or_insert(describe_failure(&format!("virsh create s{i}"), &out));
                    return;
                }
            });
        }
    });
    let running = from + started.load(Ordering::SeqCst);
    (running, stop.into_inner().expect("lock"))
}

/// Destroys `s0..s<n-1>`, 8 at a time, and waits until libvirt lists none of them.
fn tear_down(lv: &Libvirtd, n: usize) {
    let next = AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let _ = virsh(lv, &["destroy", &format!("s{i}")]);
            });
        }
    });
    let none = crate::libvirtd::wait_until(Duration::from_secs(60), || running_storm_guests(lv) == 0);
    if !none {
        eprintln!("bench: part 6: warning: storm guests still running after destroy");
    }
    util::reap_orphans();
}

/// Storm guests (`s<N>`) that `virsh list --name` shows active; 0 if virsh fails.
fn running_storm_guests(lv: &Libvirtd) -> usize {
    let out = virsh(lv, &["list", "--name"]);
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with('s') && l[1..].parse::<u32>().is_ok()).count()
}

/// Watches opens of one file (fanotify, an inode mark) on a thread: the pid and time (since
/// `t0`) of each process's first open. fanotify, not inotify: inotify merges identical events
/// queued back to back, so two hook calls opening the file at once would count as one; fanotify
/// reports the opener's pid.
struct OpenWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(i32, f64, String)>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl OpenWatch {
    fn start(path: &Path, t0: Arc<Mutex<Instant>>) -> Option<OpenWatch> {
        use std::os::unix::ffi::OsStrExt;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let flags = libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
        // SAFETY: no pointers; returns a new fd or -1.
        let fd = unsafe { libc::fanotify_init(flags, u32::try_from(libc::O_RDONLY | libc::O_LARGEFILE).ok()?) };
        if fd < 0 {
            eprintln!("bench: part 6: fanotify_init: {}", std::io::Error::last_os_error());
            return None;
        }
        // SAFETY: `fd` was just returned by fanotify_init and is owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: `cpath` is a NUL-terminated path valid for the call.
        let rv = unsafe {
            libc::fanotify_mark(fd.as_raw_fd(), libc::FAN_MARK_ADD, libc::FAN_OPEN, libc::AT_FDCWD, cpath.as_ptr())
        };
        if rv < 0 {
            eprintln!("bench: part 6: fanotify_mark {}: {}", path.display(), std::io::Error::last_os_error());
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), seen.clone());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
            while !s.load(Ordering::SeqCst) {
                // SAFETY: reads at most `buf.len()` bytes into `buf`, which lives for the call.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                let Ok(n) = usize::try_from(n) else {
                    thread::sleep(Duration::from_micros(500));
                    continue;
                };
                let at = util::to_ms(t0.lock().expect("lock").elapsed());
                let mut off = 0;
                while off + meta_len <= n {
                    // SAFETY: `off + meta_len <= n` bytes were read; read_unaligned copes with
                    // the buffer's alignment.
                    let m: libc::fanotify_event_metadata =
                        unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                    if m.fd >= 0 {
                        // SAFETY: the event's fd is ours to close, and closed once.
                        unsafe { libc::close(m.fd) };
                    }
                    let mut v = out.lock().expect("lock");
                    if !v.iter().any(|(p, _, _)| *p == m.pid) {
                        v.push((m.pid, at, opener(m.pid)));
                    }
                    let len = usize::try_from(m.event_len).unwrap_or(0);
                    if len < meta_len {
                        break;
                    }
                    off += len;
                }
            }
        });
        Some(OpenWatch { stop, seen, thread: Some(thread) })
    }

    fn clear(&self) {
        self.seen.lock().expect("lock").clear();
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    /// Each opening process's first open: (time, what it was), in order of time.
    fn finish(mut self) -> Vec<(f64, String)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut seen: Vec<(f64, String)> = self.seen.lock().expect("lock").drain(..).map(|(_, t, k)| (t, k)).collect();
        seen.sort_by(|a, b| a.0.total_cmp(&b.0));
        seen
    }
}

/// What process `pid` is, from its command line: `holder --spare`, `holder`, `hook OP` (a hook
/// call: `qemu NAME OP SUBOP -`), its program name, or `(gone)`.
fn opener(pid: i32) -> String {
    let args = util::cmdline(pid.unsigned_abs());
    if args.iter().any(|a| a == "holder") {
        return if args.iter().any(|a| a == "--spare") { "holder --spare".into() } else { "holder".into() };
    }
    match args.first().map(|a| Path::new(a).file_name().map(|f| f.to_string_lossy().into_owned())) {
        Some(Some(prog)) if prog == "qemu" && args.len() >= 3 => format!("hook {}", args[2]),
        Some(Some(prog)) => prog,
        _ => "(gone)".into(),
    }
}

/// `libvirtd -d` in the instance's namespaces, as `Libvirtd::restart_daemon` runs it, but
/// without its wait: the caller times its own (`restart_daemon` polls every 50 ms).
fn spawn_libvirtd(lv: &Libvirtd) {
    let root = lv.dir();
    let (pidfile, log) = (root.join("pids/libvirtd.pid"), root.join("log/daemons.out"));
    let listen = if root.join("listen").exists() { "--listen" } else { "" };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut cmd = util::ns_command(
            lv,
            &[
                "sh",
                "-c",
                r#"exec libvirtd -d $3 -p "$1" </dev/null >>"$2" 2>&1"#,
                "sh",
                &pidfile.display().to_string(),
                &log.display().to_string(),
                listen,
            ],
        );
        let out = cmd.output().expect("run libvirtd -d");
        if out.status.success() {
            return;
        }
        // A killed libvirtd can hold its pid file lock a moment longer than it takes to die.
        let text = fs::read_to_string(&log).unwrap_or_default();
        let busy = text.lines().last().is_some_and(|l| l.contains("Unable to obtain pidfile"));
        assert!(busy && Instant::now() < deadline, "libvirtd -d failed ({}): {text}", out.status);
        thread::sleep(Duration::from_millis(20));
    }
}

/// Kills libvirtd, starts it again, and times it (see the module doc).
fn restart(lv: &Libvirtd, guests: usize, config: Option<&Path>) -> Restart {
    let t0 = Arc::new(Mutex::new(Instant::now()));
    let watch = config.and_then(|c| OpenWatch::start(c, t0.clone()));
    // Opens before the kill (a holder's, say) would count: let a moment pass to see none.
    thread::sleep(Duration::from_millis(300));
    let before = watch.as_ref().map_or(0, OpenWatch::count);
    lv.kill_daemon();
    util::reap_orphans();
    let start = Instant::now();
    *t0.lock().expect("lock") = start;
    if let Some(w) = &watch {
        w.clear();
    }
    spawn_libvirtd(lv);
    let spawned = util::to_ms(start.elapsed());
    let answered = crate::libvirtd::wait_until(Duration::from_secs(120), || virsh(lv, &["version"]).status.success());
    assert!(answered, "libvirtd did not answer within 120 s of its restart:\n{}", lv.log_tail());
    let answer = util::to_ms(start.elapsed());
    let out = virsh(lv, &["domstats", "--balloon", "--list-active"]);
    let all = util::to_ms(start.elapsed());
    let reconnected = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("Domain: 's")).count();
    let listed = running_storm_guests(lv);
    let times = watch.map(|w| {
        // Every hook call began before its guest's job ended, so before domstats returned.
        thread::sleep(Duration::from_millis(200));
        w.finish()
    });
    if before > 0 {
        eprintln!("bench: part 6: warning: {before} process(es) opened the config before the kill");
    }
    let (hooks, hooks_seen, others) = match &times {
        Some(t) => {
            // A hook call lives a few ms: by the time its open is read, its command line may be
            // gone or half-replaced (exec). Whatever is not a holder counts as a hook call.
            let holder = |k: &str| k.starts_with("holder");
            let calls: Vec<f64> = t.iter().filter(|(_, k)| !holder(k)).map(|(at, _)| *at).collect();
            let mut others: std::collections::BTreeMap<String, usize> = Default::default();
            for (_, k) in t.iter().filter(|(_, k)| holder(k)) {
                *others.entry(k.clone()).or_default() += 1;
            }
            (calls.get(guests.saturating_sub(1)).copied(), calls.len(), others)
        }
        None => (None, 0, Default::default()),
    };
    if !others.is_empty() {
        eprintln!("bench: part 6: besides {hooks_seen} hook calls, holders opened lockhook's config: {others:?}");
    }
    Restart { spawned, answer, all, hooks, hooks_seen, others, listed, reconnected }
}

/// `levels` is what to aim for (`M/2`, `M`); the first configuration may reach fewer (memory,
/// time), and the others then aim for what it reached.
fn storm_one(inst: &Instance, work: &Path, levels: &[usize], restarts: usize, config: Option<&Path>) -> Outcome {
    let dir = work.join(format!("storm-{:?}", inst.kind));
    fs::create_dir_all(&dir).expect("mkdir storm dir");
    let began = Instant::now();
    let mut running = 0;
    let mut note = None;
    let mut out = Vec::new();
    for &level in levels {
        if level <= running && !out.is_empty() {
            continue;
        }
        let (now, why) = bring_up(&inst.lv, &dir, running, level, began);
        running = now;
        if let Some(why) = why {
            note = Some(format!("{} stopped at {running} guests: {why}", inst.kind.label()));
        }
        eprintln!(
            "bench: part 6: {}: {running} guests running ({:.0} s)",
            inst.kind.label(),
            began.elapsed().as_secs_f64()
        );
        // Let the new guests' firmware settle before libvirtd goes down.
        thread::sleep(Duration::from_secs(3));
        let mut rs = Vec::new();
        for _ in 0..restarts {
            let r = restart(&inst.lv, running, config);
            eprintln!(
                "bench: part 6: {} with {running}: `libvirtd -d` returned after {} ms, answers after {} ms, \
                 all reconnected after {} ms{}",
                inst.kind.label(),
                ms(r.spawned),
                ms(r.answer),
                ms(r.all),
                r.hooks.map_or(String::new(), |h| format!(", last hook call began after {} ms", ms(h)))
            );
            rs.push(r);
        }
        let census = config.map(|_| crate::census::describe(&inst.lv.ns_path(Path::new("/run/lockhook"))));
        out.push(Level { guests: running, restarts: rs, census });
        if note.is_some() {
            break;
        }
    }
    tear_down(&inst.lv, running);
    Outcome { kind: inst.kind, levels: out, note }
}

pub fn run(instances: &[Instance], work: &Path, config: &Path, m: usize, restarts: usize, report: &mut Report) {
    let t0 = Instant::now();
    let find = |kind: Kind| instances.iter().find(|i| i.kind == kind);
    let (Some(base), Some(lh)) = (find(Kind::NoHook), find(Kind::Lockhook)) else {
        report.section("## 6. Reconnect storm\n\nnot run: needs the no-hook and lockhook libvirtds".into());
        return;
    };
    let mut levels = vec![(m / 2).max(1), m];
    levels.dedup();
    let first = storm_one(base, work, &levels, restarts, None);
    let reached: Vec<usize> = first.levels.iter().map(|l| l.guests).collect();
    let mut results = vec![first];
    // libvirt's own cost of running a hook per guest (fork + exec from libvirtd, the XML on
    // stdin), apart from what lockhook does.
    if let Some(noop) = find(Kind::NoopTrue) {
        results.push(storm_one(noop, work, &reached, restarts, None));
    }
    results.push(storm_one(lh, work, &reached, restarts, Some(config)));
    eprintln!("bench: part 6 done in {:.0} s", t0.elapsed().as_secs_f64());
    report_storm(&results, m, restarts, config, report);
}

/// The best (lowest) "all reconnected" of a level's restarts: a restart of libvirtd here takes
/// either ~0.1 s or ~1.3 s more whatever the guests and the hook (its first `virsh version`
/// answers after ~65 or ~1250 ms, in every configuration, even with 2 guests), so the median of
/// a few restarts can land on either; the best is the restart without that stall.
fn best_all(l: &Level) -> f64 {
    l.restarts.iter().map(|r| r.all).fold(f64::INFINITY, f64::min)
}

fn med_all(l: &Level) -> f64 {
    median(&l.restarts.iter().map(|r| r.all).collect::<Vec<_>>())
}

fn report_storm(results: &[Outcome], m: usize, restarts: usize, config: &Path, report: &mut Report) {
    let top = results[0].levels.last().map_or(0, |l| l.guests);
    let labels: Vec<&str> = results.iter().map(|r| r.kind.label()).collect();
    let mut text = format!(
        "## 6. Reconnect storm: libvirtd SIGKILLed and restarted with M guests (paused) up (M = {top}{}; \
         {restarts} restart(s) per row; ms from `libvirtd -d`, median (p25..p75))\n\n\
         Transient 1-disk guests of 32 MiB ({}), started paused (`virsh create --paused`: an idle running guest \
         costs ~0.5 % of a core, so hundreds would saturate this host; libvirt reconnects to a paused guest and \
         runs its `reconnect` hook as for a running one), on the libvirtds of parts 1 and 4 ({}), M/2 first, \
         then M, one configuration after the other (2 × M guests at once would not fit). *answers*: `virsh \
         version` answers again (polled every 20 ms). *all reconnected*: `virsh domstats --balloon \
         --list-active` returned, which waits for each guest's job, held by libvirt's reconnect of that guest \
         (hook call included). *hook calls*: for lockhook, when the M-th `reconnect` call began (fanotify on {}, \
         which each hook call opens once; distinct openers counted). The no-op hook shows what libvirt itself \
         spends running a hook per guest. *added* compares the best restart of each row (a restart here stalls \
         ~1.2 s at random, in every configuration, with as few as 2 guests: its first `virsh version` answers \
         after ~65 or ~1250 ms), the medians follow.\n\n",
        if top == m { String::new() } else { format!(", asked for {m}") },
        if crate::libvirtd::kvm_usable() { "KVM" } else { "TCG" },
        labels.join(", "),
        config.display()
    );
    let mut rows = Vec::new();
    let base = &results[0];
    // (kind, guests, added vs no hook)
    let mut added_at: Vec<(Kind, usize, f64)> = Vec::new();
    for (li, level) in base.levels.iter().enumerate() {
        for res in results {
            let Some(l) = res.levels.get(li) else { continue };
            let col = |f: fn(&Restart) -> f64| with_iqr(&summary(&l.restarts.iter().map(f).collect::<Vec<_>>()));
            let added = if res.kind == Kind::NoHook {
                "-".to_owned()
            } else {
                let a = best_all(l) - best_all(level);
                added_at.push((res.kind, l.guests, a));
                format!(
                    "{} ({} per guest); medians: {}",
                    signed_ms(a),
                    signed_ms(a / l.guests as f64),
                    signed_ms(med_all(l) - med_all(level))
                )
            };
            let hooks = if res.kind == Kind::Lockhook {
                let seen: Vec<usize> = l.restarts.iter().map(|r| r.hooks_seen).collect();
                let h: Vec<f64> = l.restarts.iter().map(|r| r.hooks.unwrap_or(f64::NAN)).collect();
                let others: Vec<String> = l
                    .restarts
                    .iter()
                    .filter(|r| !r.others.is_empty())
                    .map(|r| r.others.iter().map(|(k, n)| format!("{n} × {k}")).collect::<Vec<_>>().join(", "))
                    .collect();
                format!(
                    "{} ({} calls seen per restart{})",
                    with_iqr(&summary(&h)),
                    join(&seen),
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!("; **holders started meanwhile: {}**", others.join("; "))
                    }
                )
            } else {
                "-".to_owned()
            };
            let check: Vec<String> = l.restarts.iter().map(|r| format!("{}/{}", r.reconnected, r.listed)).collect();
            rows.push(vec![
                l.guests.to_string(),
                res.kind.label().to_owned(),
                col(|r| r.answer),
                format!("{}; best {}", col(|r| r.all), ms(best_all(l))),
                hooks,
                added,
                check.join(", "),
            ]);
        }
    }
    text.push_str(&table(
        &[
            "M",
            "configuration",
            "answers",
            "all reconnected",
            "lockhook's M-th hook call began",
            "added vs no hook (all reconnected, best restart vs best)",
            "reconnected/listed per restart",
        ],
        &rows,
    ));
    for res in results {
        for l in &res.levels {
            if let Some(c) = &l.census {
                let _ = writeln!(text, "\nlockhook's census after the restarts with {} guests: {c}.", l.guests);
            }
        }
    }
    let of = |kind: Kind| added_at.iter().filter(|a| a.0 == kind).map(|a| (a.1, a.2)).collect::<Vec<_>>();
    let (lh, noop) = (of(Kind::Lockhook), of(Kind::NoopTrue));
    for (&(n, a), &(_, b)) in lh.iter().zip(&noop) {
        let _ = writeln!(
            text,
            "\nM = {n}: lockhook − no-op hook: {} ms ({} ms per guest): what lockhook's calls cost beyond libvirt \
             running a hook.",
            signed_ms(a - b),
            signed_ms((a - b) / n as f64)
        );
    }
    if let [(m1, a1), (m2, a2)] = lh[..] {
        let _ = writeln!(
            text,
            "\nlockhook added per guest: {} ms at M = {m1}, {} ms at M = {m2} (the same per-guest cost means linear \
             growth; quadratic would double it). Added at {m2} ÷ added at {m1}: {:.2} (linear: {:.1}, quadratic: \
             {:.1}).",
            ms(a1 / m1 as f64),
            ms(a2 / m2 as f64),
            a2 / a1,
            m2 as f64 / m1 as f64,
            (m2 as f64 / m1 as f64).powi(2)
        );
        // libvirt's own running of a hook per guest, for comparison: the no-op hook's growth.
        let noop_growth = match noop[..] {
            [(n1, b1), (n2, b2)] if (n1, n2) == (m1, m2) && b1 > 0.0 => {
                format!("; a no-op hook adds {} and {} ms: ratio {:.2}", signed_ms(b1), signed_ms(b2), b2 / b1)
            }
            [(_, b1), (_, b2)] => format!("; a no-op hook adds {} and {} ms", signed_ms(b1), signed_ms(b2)),
            _ => String::new(),
        };
        report.note(format!(
            "reconnect storm: lockhook adds {} ms at M = {m1} and {} ms at M = {m2} to a libvirtd restart \
             (ratio {:.2}; linear {:.1}, quadratic {:.1}){noop_growth}",
            signed_ms(a1),
            signed_ms(a2),
            a2 / a1,
            m2 as f64 / m1 as f64,
            (m2 as f64 / m1 as f64).powi(2)
        ));
    }
    for res in results {
        if let Some(n) = &res.note {
            let _ = writeln!(text, "\nNote: {n}.");
            report.note(format!("reconnect storm: {n}"));
        }
    }
    if top < m {
        report.note(format!("reconnect storm: M = {top} (asked for {m})"));
    }
    report.section(text);
}

fn join(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join("/")
}

/// The lockhook config the libvirt instances use (host path; see `libvirt_bench::setup`).
pub fn lockhook_config(work: &Path) -> PathBuf {
    work.join("lockhook-etc/lockhook.toml")
}
