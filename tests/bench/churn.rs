//! Part 5 (issue 12): what a host keeps after guests came and went. `n` transient guests (a new
//! UUID and image each) go through `prepare`, `start` and `release` through the hook alone (no
//! QEMU), up to `WINDOW` held at a time; every tenth start is refused (a second guest on an
//! image held by another: its `prepare` must fail, then libvirt's `release` follows), and every
//! tenth guest has its holder SIGKILLed, after which another guest's hook call runs (which
//! re-adopts or cleans it) before the dead guest's `release`. Then everything is released and
//! the run directory listed: what is left must be the host's own files (census, census.lock, counters,
//! an empty shares/, spare.lock, spare.sock, and `serials`, one line per disk the host has), not
//! one per guest, and at most one (spare) holder may hold spare.lock.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::hook_alone::{tmpfs_dir, HookEnv};
use crate::libvirtd::{guest_xml, random_uuid, wait_until};
use crate::report::Report;
use crate::util;

/// Guests held at once while the churn goes on.
const WINDOW: usize = 8;

/// Files a run directory may keep for the host itself, whatever came and went.
const HOST_FILES: [&str; 7] = ["census", "census.lock", "counters", "serials", "shares", "spare.lock", "spare.sock"];

/// Whether `serials` holds only the host's own: after its boot line, one `<diskseq>\t<serial>`
/// line per disk the host has now (each line's `diskseq` is a present block device's), no two
/// alike. A line per guest, or per disk long gone, fails it.
fn serials_bounded(run_dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(run_dir.join("serials")) else { return true };
    let present: std::collections::HashSet<String> = std::fs::read_dir("/sys/dev/block")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("diskseq")).ok())
                .map(|s| s.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    text.lines().skip(1).all(|line| {
        let seq = line.split('\t').next().unwrap_or_default().to_owned();
        present.contains(&seq) && seen.insert(seq)
    })
}

struct Guest {
    name: String,
    uuid: String,
    xml: String,
    image: PathBuf,
}

fn new_guest(dir: &Path, tag: &str, image: Option<&Path>) -> Guest {
    let image = image.map_or_else(
        || {
            let p = dir.join(format!("img/{tag}.raw"));
            util::sparse_image(&p, 1 << 20);
            p
        },
        Path::to_owned,
    );
    let uuid = random_uuid();
    Guest { name: tag.to_owned(), xml: guest_xml(tag, &uuid, &util::raw_disk(&image, 0)), uuid, image }
}

/// Processes (any) with an fd open on `path`.
fn holding(path: &Path) -> Vec<u32> {
    util::all_pids().into_iter().filter(|&p| util::fds(p).iter().any(|(_, t)| Path::new(t) == path)).collect()
}

/// Guest holder processes running with this config (not the spare's two processes, which
/// name themselves `lockhook-spare`).
fn holders(config: &Path) -> Vec<u32> {
    let config = config.display().to_string();
    util::all_pids()
        .into_iter()
        .filter(|&p| {
            let args = util::cmdline(p);
            args.iter().any(|a| a == "holder")
                && args.contains(&config)
                && util::alive(p)
                && util::comm(p) != "lockhook-spare"
        })
        .collect()
}

/// Whether `s` looks like a UUID (8-4-4-4-12 hex digits).
fn uuid_like(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() })
}

/// A run-directory entry's name with any UUID in it replaced by `<uuid>`.
fn shape(name: &str) -> String {
    let mut out = String::new();
    let mut rest = name;
    while !rest.is_empty() {
        if rest.get(..36).is_some_and(uuid_like) {
            out.push_str("<uuid>");
            rest = &rest[36..];
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

pub fn run(work: &Path, lockhook: &Path, n: usize, report: &mut Report) {
    let dir = work.join("churn");
    let shm = tmpfs_dir("lockhook-bench-churn-");
    let env = HookEnv::new(&dir, &shm.path().join("run"), lockhook);
    let t0 = Instant::now();
    let mut live: VecDeque<Guest> = VecDeque::new();
    let mut images = Vec::new();
    let (mut came, mut refused, mut refused_ok, mut killed, mut cleaned) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut problems: Vec<String> = Vec::new();
    let release = |g: &Guest| env.call_ok(&g.name, "release", "end", &g.xml);
    for i in 0..n {
        let g = new_guest(&dir, &format!("c{i}"), None);
        env.call_ok(&g.name, "prepare", "begin", &g.xml);
        env.call_ok(&g.name, "start", "begin", &g.xml);
        came += 1;
        images.push(g.image.clone());
        live.push_back(g);
        if i % 10 == 3 {
            // A second guest on an image that is held: refused, then released as libvirt does.
            let victim = live.back().expect("just pushed");
            let b = new_guest(&dir, &format!("r{i}"), Some(&victim.image));
            let (_, out) = env.call(&b.name, "prepare", "begin", &b.xml);
            refused += 1;
            came += 1;
            if out.status.success() {
                problems.push(format!("{}: a second guest on {} was NOT refused", b.name, victim.image.display()));
            } else {
                refused_ok += 1;
            }
            release(&b);
        }
        if i % 10 == 7 {
            // A guest whose holder is SIGKILLed, then another guest's hook call.
            let c = new_guest(&dir, &format!("k{i}"), None);
            images.push(c.image.clone());
            env.call_ok(&c.name, "prepare", "begin", &c.xml);
            came += 1;
            match env.holder_pid(&c.uuid).and_then(|p| i32::try_from(p).ok()) {
                Some(pid) => {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    let gone = wait_until(Duration::from_secs(5), || !util::alive(pid.unsigned_abs()));
                    util::reap_orphans();
                    killed += usize::from(gone);
                }
                None => problems.push(format!("{}: no holder to kill", c.name)),
            }
            let d = new_guest(&dir, &format!("d{i}"), None);
            images.push(d.image.clone());
            env.call_ok(&d.name, "prepare", "begin", &d.xml);
            came += 1;
            if !env.run_dir.join(format!("{}.json", c.uuid)).exists() {
                cleaned += 1;
            }
            live.push_back(d);
            release(&c);
        }
        while live.len() > WINDOW {
            release(&live.pop_front().expect("non-empty"));
        }
        if i % 50 == 49 {
            util::reap_orphans();
        }
    }
    for g in live.drain(..) {
        release(&g);
    }
    // Every guest holder gone (the spare stays), and a tick for it to settle.
    let settled = wait_until(Duration::from_secs(10), || holders(&env.config).is_empty());
    std::thread::sleep(Duration::from_millis(1500));
    util::reap_orphans();
    let secs = t0.elapsed().as_secs_f64();

    let list = |dir: &Path, prefix: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| Some(format!("{prefix}{}", e.ok()?.file_name().to_string_lossy()))).collect())
            .unwrap_or_default()
    };
    // `shares/` is the host's too; what is in it belongs to running guests (none are left).
    let mut entries = list(&env.run_dir, "");
    entries.extend(list(&env.run_dir.join("shares"), "shares/"));
    entries.sort();
    let foreign: Vec<String> = entries.iter().filter(|e| !HOST_FILES.contains(&e.as_str())).map(|e| shape(e)).collect();
    let spare_lock = env.run_dir.join("spare.lock");
    let spare_holders = holding(&spare_lock);
    let running = holders(&env.config);
    let inodes: std::collections::HashSet<u64> = images
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })
        .collect();
    let image_locks = util::proc_locks().iter().filter(|l| l.kind == "OFDLCK" && inodes.contains(&l.ino)).count();
    let census = crate::census::describe(&env.run_dir);
    eprintln!("bench: part 5: {came} guests came and went in {secs:.1} s; run dir: {entries:?}");

    let serials_ok = serials_bounded(&env.run_dir);
    if !serials_ok {
        problems.push("`serials` holds a line for a disk the host does not have now, or two for one disk".to_owned());
    }
    let bounded = foreign.is_empty() && entries.len() <= HOST_FILES.len() && serials_ok;
    let mut text = format!(
        "## 5. Leftovers after churn (hook alone, no QEMU; run_dir on tmpfs)\n\n\
         {n} transient guests (a new UUID and image each) through `prepare`, `start`, `release`, at most {WINDOW} \
         held at a time; every tenth start refused (a second guest on a held image: `prepare` fails, then \
         `release`), every tenth guest's holder SIGKILLed, then another guest's `prepare` (which re-adopts or \
         cleans it), then the dead guest's `release`. Then everything released. {came} guests in all, {secs:.1} s.\n\n"
    );
    let _ = writeln!(
        text,
        "- run dir entries after churn ({came} guests came and went): **{}**: {}{}",
        entries.len(),
        if entries.is_empty() {
            "none".to_owned()
        } else {
            entries.iter().map(|e| shape(e)).collect::<Vec<_>>().join(", ")
        },
        if foreign.is_empty() { String::new() } else { format!(" (**not the host's own: {}**)", foreign.join(", ")) }
    );
    let _ = writeln!(
        text,
        "- processes holding `spare.lock`: {} ({}); guest holder processes still running: {}{}",
        spare_holders.len(),
        if spare_holders.len() <= 1 { "at most one spare: OK" } else { "MORE THAN ONE" },
        running.len(),
        if settled { "" } else { " (guest holders did not all exit within 10 s)" }
    );
    let _ = writeln!(
        text,
        "- refused starts: {refused_ok}/{refused} refused; holders SIGKILLed: {killed}, their records gone after the \
         next guest's hook call: {cleaned}; census now: {census}; image locks left: {image_locks}"
    );
    for p in &problems {
        let _ = writeln!(text, "- PROBLEM: {p}");
    }
    report.section(text);
    report.target(
        format!("run dir entries after churn ({came} guests came and went)"),
        format!("{}: {}", entries.len(), entries.iter().map(|e| shape(e)).collect::<Vec<_>>().join(", ")),
        "bounded: only the host's own (census, census.lock, counters, serials (a line per present disk), shares (empty), spare.lock, spare.sock)",
        Some(bounded),
    );
    report.target(
        "processes holding `<run_dir>/spare.lock` after churn",
        spare_holders.len().to_string(),
        "≤ 1",
        Some(spare_holders.len() <= 1),
    );
    let all_refused = refused_ok == refused && problems.is_empty();
    report.target(
        "churn: second guests on held images refused, killed holders' records cleaned, no image lock left",
        format!("{refused_ok}/{refused} refused, {cleaned}/{killed} cleaned, {image_locks} image lock(s) left"),
        "all refused, all cleaned, 0 left",
        Some(all_refused && cleaned == killed && image_locks == 0),
    );
    crate::hook_alone::stop_holders(&env.config);
    crate::census::remove(&env.run_dir);
    drop(shm);
}
