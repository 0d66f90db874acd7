//! Finding and watching a guest's QEMU process without asking libvirt.
//!
//! A pid alone can be reused, so a QEMU process is identified by pid plus its start time (field 22
//! of `/proc/<pid>/stat`, in clock ticks since boot). A zombie counts as gone. Which process is a
//! guest's QEMU is only ever taken from libvirt's pid file (see `find`), never from a process's
//! arguments: anyone can start a process that claims `-uuid <uuid>`.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use nix::time::{clock_gettime, ClockId};

use crate::domain::Uuid;

/// (state, start time) from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The start time of a live (not zombie) process.
pub fn start_time(pid: u32) -> Option<u64> {
    match stat(pid)? {
        ('Z' | 'X', _) => None,
        (_, start) => Some(start),
    }
}

/// Whether the process `pid` that started at `start` is still running.
pub fn is_alive(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

fn cmdline_has_uuid(pid: u32, uuid: &Uuid) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-uuid" {
            return args.next().is_some_and(|v| v.eq_ignore_ascii_case(uuid.as_str().as_bytes()));
        }
    }
    false
}

/// How much later than its pid file a QEMU process may seem to have started: the process start
/// time has clock-tick granularity (10 ms), and the wall-clock time of boot is derived from two
/// clocks read one after the other.
const START_TOLERANCE: Duration = Duration::from_secs(2);

/// What libvirt's pid file for a guest says: the pid, when it was written, and by whom.
struct PidFile {
    pid: u32,
    written: SystemTime,
    owner: u32,
}

fn read_pid_file(path: &Path) -> Option<PidFile> {
    // Root's directory, but still: never follow a symlink, never block on a FIFO, read a few
    // bytes of a regular file only.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(32).read_to_string(&mut text).ok()?;
    let pid = text.trim().parse::<u32>().ok().filter(|pid| *pid > 1)?;
    Some(PidFile { pid, written: meta.modified().ok()?, owner: meta.uid() })
}

/// When a process started (`/proc/<pid>/stat` field 22, clock ticks since boot), as wall-clock
/// time, using the current offset between `CLOCK_REALTIME` and `CLOCK_BOOTTIME` (the basis of
/// that field). A wall clock stepped forward since the process started makes it look younger.
pub(crate) fn started_at(start_ticks: u64) -> Option<SystemTime> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let hz = u64::try_from(hz).ok().filter(|hz| *hz > 0)?;
    let boot_elapsed = Duration::from(clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?);
    let now = Duration::from(clock_gettime(ClockId::CLOCK_REALTIME).ok()?);
    let since_boot =
        Duration::from_secs(start_ticks / hz) + Duration::from_secs(start_ticks % hz) / u32::try_from(hz).ok()?;
    let boot = now.checked_sub(boot_elapsed)?;
    Some(SystemTime::UNIX_EPOCH + boot + since_boot)
}

/// The real uid of a process (`Uid:` in `/proc/<pid>/status`).
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// The uid libvirt's DAC security driver runs guest `name` as: `<seclabel model='dac'>` in the
/// status XML `<run>/qemu/<name>.xml`, whose label is `+UID:+GID` (or `user:group`).
fn dac_uid(status_xml: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(status_xml).ok()?;
    // The domain's own seclabels carry `type=`; those of devices (which come first) do not.
    let dac = text.match_indices("<seclabel type=").map(|(at, _)| &text[at..]).find(|tag| {
        let head = &tag[..tag.find('>').unwrap_or(tag.len())];
        head.contains("model='dac'") || head.contains("model=\"dac\"")
    })?;
    let body = &dac[..dac.find("</seclabel>")?];
    let label = &body[body.find("<label>")? + "<label>".len()..];
    let user = label[..label.find("</label>")?].split(':').next()?.trim();
    match user.strip_prefix('+') {
        Some(numeric) => numeric.parse().ok(),
        None => nix::unistd::User::from_name(user).ok()?.map(|u| u.uid.as_raw()),
    }
}

/// The QEMU process of guest `name`/`uuid`, as (pid, start time in ticks).
///
/// Only libvirt's pid file `<run>/qemu/<name>.pid` says which process that is; a process whose
/// arguments merely claim `-uuid <uuid>` could be anyone's. The pid in the file is believed only
/// if that process:
/// - is alive and not a zombie;
/// - started no later than the file was written (libvirt forks QEMU and writes the pid file
///   right after; a process that reused the pid of a dead QEMU started later);
/// - runs as root, as the pid file's owner, or as the uid of the guest's DAC label (libvirt's
///   `user` in qemu.conf, e.g. `qemu`), and carries `-uuid <uuid>` as libvirt passes it.
pub fn find(name: &str, uuid: &Uuid, libvirt_run_dir: &Path) -> Option<(u32, u64)> {
    let file = read_pid_file(&crate::libvirt::pid_file(libvirt_run_dir, name)?)?;
    let start = start_time(file.pid)?;
    if started_at(start)? > file.written + START_TOLERANCE {
        return None;
    }
    let uid = uid_of(file.pid)?;
    if uid != 0 && uid != file.owner && Some(uid) != dac_uid(&crate::libvirt::status_xml(libvirt_run_dir, name)?) {
        return None;
    }
    if !cmdline_has_uuid(file.pid, uuid) {
        return None;
    }
    // Re-read: the process we checked is the one whose start time we return.
    (start_time(file.pid)? == start).then_some((file.pid, start))
}

/// Whether QEMU `pid` (started at `start`, when that is known) is guest `name`'s running QEMU,
/// as libvirt's pid file says now: what makes a stray `release` one to ignore.
pub fn runs_as(pid: u32, start: Option<u64>, name: &str, uuid: &Uuid, libvirt_run_dir: &Path) -> bool {
    find(name, uuid, libvirt_run_dir).is_some_and(|(p, s)| p == pid && start.is_none_or(|t| t == s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_zombies_are_not() {
        let me = std::process::id();
        let start = start_time(me).expect("own stat");
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        // Until reaped, the exited child is a zombie: it must count as gone.
        assert!(crate::test_support::wait_until(std::time::Duration::from_secs(5), || start_time(pid).is_none()));
        child.wait().expect("reap");
    }

    const UUID: &str = "0badc0de-1c2b-4e5f-8a9b-0123456789ab";

    /// A process that looks like QEMU by its arguments: `sh -c 'read x' -uuid UUID` (`read` is a
    /// builtin, so no child shares its argv).
    struct FakeQemu(std::process::Child);

    impl FakeQemu {
        fn spawn() -> FakeQemu {
            let child = std::process::Command::new("sh")
                .args(["-c", "read x", "-uuid", UUID])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("spawn sh");
            FakeQemu(child)
        }
    }

    impl Drop for FakeQemu {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn write_pid_file(run: &Path, name: &str, pid: u32, written: SystemTime) {
        std::fs::create_dir_all(run.join("qemu")).expect("mkdir");
        let path = run.join("qemu").join(format!("{name}.pid"));
        std::fs::write(&path, format!("{pid}\n")).expect("write pid file");
        std::fs::File::options().write(true).open(&path).expect("open").set_modified(written).expect("mtime");
    }

    #[test]
    fn a_process_with_the_uuid_argument_but_no_pid_file_is_not_qemu() {
        let uuid = Uuid::parse(UUID).expect("uuid");
        let fake = FakeQemu::spawn();
        let run = tempfile::tempdir().expect("dir");
        assert!(crate::test_support::wait_until(Duration::from_secs(5), || cmdline_has_uuid(fake.0.id(), &uuid)));
        assert_eq!(find("vm", &uuid, run.path()), None);
    }

    #[test]
    fn the_pid_file_names_qemu_only_if_its_process_is_older_than_the_file() {
        let uuid = Uuid::parse(UUID).expect("uuid");
        let fake = FakeQemu::spawn();
        let pid = fake.0.id();
        assert!(crate::test_support::wait_until(Duration::from_secs(5), || cmdline_has_uuid(pid, &uuid)));
        let run = tempfile::tempdir().expect("dir");
        // Written after the process started (as libvirt does): that is QEMU.
        write_pid_file(run.path(), "vm", pid, SystemTime::now());
        assert_eq!(find("vm", &uuid, run.path()), Some((pid, start_time(pid).expect("alive"))));
        // Written an hour before the process started: the pid was reused, QEMU is gone.
        write_pid_file(run.path(), "vm", pid, SystemTime::now() - Duration::from_secs(3600));
        assert_eq!(find("vm", &uuid, run.path()), None);
        // Another guest's UUID, or a name that is not a plain file name: not found.
        write_pid_file(run.path(), "vm", pid, SystemTime::now());
        let other = Uuid::parse("0badc0de-1c2b-4e5f-8a9b-0123456789ac").expect("uuid");
        assert_eq!(find("vm", &other, run.path()), None);
        assert_eq!(find("../qemu/vm", &uuid, run.path()), None);
    }

    #[test]
    fn a_pid_file_naming_a_zombie_or_a_symlink_is_not_qemu() {
        let uuid = Uuid::parse(UUID).expect("uuid");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        assert!(crate::test_support::wait_until(Duration::from_secs(5), || start_time(pid).is_none()));
        let run = tempfile::tempdir().expect("dir");
        write_pid_file(run.path(), "vm", pid, SystemTime::now());
        assert_eq!(find("vm", &uuid, run.path()), None);
        child.wait().expect("reap");
        let fake = FakeQemu::spawn();
        write_pid_file(run.path(), "real", fake.0.id(), SystemTime::now());
        std::os::unix::fs::symlink(run.path().join("qemu/real.pid"), run.path().join("qemu/link.pid")).expect("link");
        assert!(crate::test_support::wait_until(Duration::from_secs(5), || find("real", &uuid, run.path()).is_some()));
        assert_eq!(find("link", &uuid, run.path()), None);
    }

    #[test]
    fn dac_label_names_the_qemu_user() {
        let dir = tempfile::tempdir().expect("dir");
        let xml = dir.path().join("vm.xml");
        std::fs::write(
            &xml,
            "<domstatus><domain><devices><disk><source file='/a'><seclabel model='dac' relabel='yes'>\
             <label>+5:+5</label></seclabel></source></disk></devices>\
             <seclabel type='dynamic' model='selinux' relabel='yes'><label>system_u:x</label></seclabel>\
             <seclabel type='dynamic' model='dac' relabel='yes'><label>+107:+107</label></seclabel>\
             </domain></domstatus>",
        )
        .expect("write");
        assert_eq!(dac_uid(&xml), Some(107));
        std::fs::write(&xml, "<seclabel type='static' model='dac' relabel='yes'><label>root:root</label></seclabel>")
            .expect("write");
        assert_eq!(dac_uid(&xml), Some(0));
    }
}
