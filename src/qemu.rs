//! Finding and watching a guest's QEMU process without asking libvirt.
//!
//! A pid alone can be reused, so a QEMU process is identified by pid plus its start time (field 22
//! of `/proc/<pid>/stat`, in clock ticks since boot). A zombie counts as gone.

use std::path::Path;

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

/// The QEMU process of guest `name`/`uuid`: libvirt's pid file `<run>/qemu/<name>.pid` when its
/// process carries `-uuid <uuid>`, else a scan of /proc for that argument.
pub fn find(name: &str, uuid: &Uuid, libvirt_run_dir: &Path) -> Option<(u32, u64)> {
    let from_pidfile = (!name.contains('/'))
        .then(|| std::fs::read_to_string(libvirt_run_dir.join("qemu").join(format!("{name}.pid"))).ok())
        .flatten()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|pid| cmdline_has_uuid(*pid, uuid));
    if let Some(found) = from_pidfile.and_then(|pid| Some((pid, start_time(pid)?))) {
        return Some(found);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| cmdline_has_uuid(*pid, uuid))
        .find_map(|pid| Some((pid, start_time(pid)?)))
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

    #[test]
    fn finds_a_process_by_uuid_argument() {
        let uuid = Uuid::parse("0badc0de-1c2b-4e5f-8a9b-0123456789ab").expect("uuid");
        let mut child = std::process::Command::new("sh")
            // `read` is a builtin: no child process shares sh's argv (with -uuid) even briefly.
            .args(["-c", "read x", "-uuid", uuid.as_str()])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let dir = tempfile::tempdir().expect("dir");
        let found = crate::test_support::wait_until(std::time::Duration::from_secs(5), || {
            find("nope", &uuid, dir.path()).map(|(pid, _)| pid) == Some(child.id())
        });
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(found, "found by its -uuid argument");
    }
}
