//! Names the holder of a lock: a lockhook guest or `lockhook run` command on this host (from the
//! live holders' state files), another process with a classic POSIX lock (virtlockd, a script:
//! `/proc/locks` shows their pid), a QEMU process (its own image locks on bytes 100-104 and
//! 200-204), or, when none of these tells, says so plainly.

use std::path::Path;

use serde::Serialize;

use crate::lock::{self, Identity, LockMode};
use crate::lockspace::Lockspace;
use crate::paths::Paths;
use crate::state::{self, HolderKind};

/// Who holds a lock, as far as this host can tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    Guest {
        name: String,
        uuid: String,
        host: String,
        mode: LockMode,
        since: String,
        /// What the holder uses the resource as, when worth saying ("disk of /dev/loop0p1").
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<String>,
    },
    Command {
        command: String,
        pid: u32,
        host: String,
        mode: LockMode,
        since: String,
    },
    Process {
        pid: u32,
        comm: String,
        mode: LockMode,
    },
    Unknown,
}

/// Looks up who holds byte `identity.offset` of the file `identity` names, whose lockspace key
/// is `key`: a holder on this host (state files), then any host (owner records), then
/// `/proc/locks`.
pub fn find(paths: &Paths, lockspace: &Lockspace, identity: &Identity, key: &str) -> Owner {
    if let Some((mut holder, resource)) = state::find_owner(paths, identity) {
        // A holder in this host's run directory is on this host, whatever it recorded.
        holder.host = state::hostname();
        return match holder.kind {
            HolderKind::Guest => Owner::Guest {
                role: resource.roles.iter().find(|r| r.worth_saying()).map(ToString::to_string),
                name: holder.name,
                uuid: holder.uuid.to_string(),
                host: holder.host,
                mode: resource.mode,
                since: resource.since,
            },
            HolderKind::Command => Owner::Command {
                command: holder.name,
                pid: holder.holder_pid,
                host: holder.host,
                mode: resource.mode,
                since: resource.since,
            },
        };
    }
    if let Some(record) = lockspace.owners(key).into_iter().next() {
        if record.command {
            return Owner::Command {
                command: record.guest,
                pid: record.holder_pid,
                host: record.host,
                mode: record.mode,
                since: record.since,
            };
        }
        return Owner::Guest {
            role: record.role,
            name: record.guest,
            uuid: record.uuid.to_string(),
            host: record.host,
            mode: record.mode,
            since: record.since,
        };
    }
    match posix_holder(identity) {
        Some((pid, mode, comm)) => Owner::Process { pid, comm, mode },
        None => Owner::Unknown,
    }
}

impl Owner {
    /// "is locked exclusively by guest vm1 (uuid) on this host since ..." (no path, no prefix).
    pub fn phrase(&self) -> String {
        match self {
            Owner::Guest { name, uuid, host, mode, since, role } => {
                let role = role.as_ref().map(|r| format!(" ({r})")).unwrap_or_default();
                format!("is locked {}{role} by guest {name} ({uuid}) {} since {since}", mode.adverb(), on_host(host))
            }
            Owner::Command { command, pid, host, mode, since } => {
                format!(
                    "is locked {} by `lockhook run` (pid {pid}: {command}) {} since {since}",
                    mode.adverb(),
                    on_host(host)
                )
            }
            Owner::Process { pid, comm, mode } => {
                format!("is locked {} by process {pid} ({comm}), not by a lockhook guest", mode.adverb())
            }
            Owner::Unknown => {
                "is locked by a holder lockhook cannot name: no lockhook guest on this host and no owner \
                               record in the lockspace (a virtlockd host, a tool, or a lockspace that is not shared; \
                               see `lslocks`)"
                    .to_owned()
            }
        }
    }
}

/// "on this host" or "on host NAME".
fn on_host(host: &str) -> String {
    if host == state::hostname() {
        "on this host".to_owned()
    } else {
        format!("on host {host}")
    }
}

/// Whether a QEMU process (or qemu-img, qemu-nbd) has the image open: QEMU takes shared OFD
/// locks on bytes 100-104 and 200-204 of every image it opens. Only probed, never locked.
pub fn qemu_has_open(path: &Path) -> bool {
    (100..=104).chain(200..=204).any(|byte| matches!(lock::probe(path, byte), Ok((Some(_), _))))
}

/// Finds a POSIX lock (which, unlike an OFD lock, shows its pid) covering the identity's byte.
fn posix_holder(identity: &Identity) -> Option<(u32, LockMode, String)> {
    use crate::lock::proc_locks::{self, Kind};
    let dev = (libc::major(identity.dev), libc::minor(identity.dev));
    proc_locks::read()?.into_iter().find_map(|l| {
        if l.kind != Kind::Posix || l.dev != dev || l.ino != identity.ino || !l.covers(identity.offset) {
            return None;
        }
        let (pid, mode) = (l.pid?, l.mode);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned());
        Some((pid, mode, comm))
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn names_a_posix_lock_holder() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let meta = file.as_file().metadata().expect("meta");
        #[allow(clippy::cast_possible_truncation)] // F_WRLCK and SEEK_SET are 1 and 0.
        let lock = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 1,
            l_pid: 0,
        };
        // SAFETY: the fd is open for the whole call and `lock` is a valid flock.
        let rc = unsafe { libc::fcntl(file.as_file().as_raw_fd(), libc::F_SETLK, &lock) };
        assert_eq!(rc, 0, "F_SETLK on a writable temp file");
        let id = Identity { dev: meta.dev(), ino: meta.ino(), offset: 0 };
        let (pid, mode, _) = posix_holder(&id).expect("found in /proc/locks");
        assert_eq!(pid, std::process::id());
        assert_eq!(mode, LockMode::Exclusive);
        let dir = tempfile::tempdir().expect("dir");
        let line = find(&Paths::new(dir.path()), &Lockspace::new(dir.path()), &id, "file:x@0").phrase();
        assert!(line.contains(&format!("by process {}", std::process::id())), "{line}");
        assert!(!qemu_has_open(file.path()));
    }
}
