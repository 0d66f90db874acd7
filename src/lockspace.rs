//! The lockspace directory (`lockspace_dir`), shared by the hosts of a fleet.
//!
//! ```text
//! <lockspace>/
//!   owners/<key-hash>/<uuid>.<host>.json   who holds a resource (one record per holder)
//!   network/<key-hash>.lock                 lock files for network disks (nbd, rbd, iscsi, ...)
//!   block/<key-hash>.lock                   lock files for block devices, by stable identity
//! ```
//!
//! Every host computes the same key for the same resource: `file:<canonical path>@<offset>` for
//! images and leases (all hosts mount shared storage at the same path, as libvirt migration
//! requires), `net:<protocol>://<hosts>/<name>` for network disks, `block:<stable id>` for block
//! devices. Directory and file names use a 64-bit FNV-1a hash of the key; the key itself is in
//! every record, so a hash collision is recognised.
//!
//! A record is live only while its holder holds an OFD lock on the record file: a crashed host's
//! records lose their locks when the shared filesystem's lock manager recovers (NFSv4: after the
//! lease time; GFS2/OCFS2: after fencing), and whoever finds such a record removes it. Records are
//! written to a temp file, locked, and then renamed into place, so no reader ever sees a live
//! record unlocked.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::Uuid;
use crate::lock::{self, LockMode};

/// Who holds a resource, as every host can read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The resource key (see the module doc).
    pub key: String,
    pub host: String,
    pub guest: String,
    pub uuid: Uuid,
    pub mode: LockMode,
    pub since: String,
    pub holder_pid: u32,
}

/// 64-bit FNV-1a, as 16 hex digits: stable across hosts, builds and versions.
pub fn hash(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The key of an image or lease file: its canonical path and the locked byte.
pub fn file_key(path: &Path, offset: u64) -> String {
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    format!("file:{}@{offset}", canonical.display())
}

fn safe_host(host: &str) -> String {
    host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

#[derive(Debug, Clone)]
pub struct Lockspace {
    dir: PathBuf,
}

impl Lockspace {
    pub fn new(dir: &Path) -> Lockspace {
        Lockspace { dir: dir.to_owned() }
    }

    fn owners_dir(&self, key: &str) -> PathBuf {
        self.dir.join("owners").join(hash(key))
    }

    fn record_path(&self, key: &str, uuid: &Uuid, host: &str) -> PathBuf {
        self.owners_dir(key).join(format!("{uuid}.{}.json", safe_host(host)))
    }

    /// The lock file standing for a resource that cannot be locked in place (`network`,
    /// `block`).
    pub fn lock_file(&self, kind: &str, key: &str) -> PathBuf {
        self.dir.join(kind).join(format!("{}.lock", hash(key)))
    }

    /// Creates the directory a lock file lives in.
    pub fn prepare_dir(&self, lock_file: &Path) -> io::Result<()> {
        match lock_file.parent() {
            Some(dir) => fs::create_dir_all(dir),
            None => Ok(()),
        }
    }

    /// Publishes `record`. The returned file carries the record's liveness lock: keep it open as
    /// long as the resource is held; dropping it makes the record stale.
    pub fn publish(&self, record: &OwnerRecord) -> io::Result<File> {
        let dir = self.owners_dir(&record.key);
        fs::create_dir_all(&dir)?;
        let path = self.record_path(&record.key, &record.uuid, &record.host);
        let tmp = dir.join(format!(".{}.{}.tmp", record.uuid, std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let written = (|| {
            lock::try_lock_fd(&file, LockMode::Exclusive, 0)?;
            file.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(file)
    }

    /// Whether this holder's record file for `key` is (still) in place.
    pub fn is_published(&self, key: &str, uuid: &Uuid, host: &str) -> bool {
        self.record_path(key, uuid, host).exists()
    }

    /// Removes this holder's record for `key`, if the file at its path is still `ours` (a new
    /// holder of the same guest may have replaced it already). The caller then drops `ours`.
    pub fn unpublish(&self, key: &str, uuid: &Uuid, host: &str, ours: &File) {
        use std::os::unix::fs::MetadataExt;
        let path = self.record_path(key, uuid, host);
        let same = match (fs::symlink_metadata(&path), ours.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_dir(self.owners_dir(key));
        }
    }

    /// The live records for `key`. Stale records (nobody holds their lock) are removed.
    pub fn owners(&self, key: &str) -> Vec<OwnerRecord> {
        let Ok(dir) = fs::read_dir(self.owners_dir(key)) else { return Vec::new() };
        let mut live = Vec::new();
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(file) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path)
            else {
                continue;
            };
            if !matches!(lock::probe_fd(&file, 0), Ok(Some(_))) {
                // Its holder (or its host) is gone.
                let _ = fs::remove_file(&path);
                continue;
            }
            let record: Option<OwnerRecord> = serde_json::from_reader(io::Read::take(&file, 64 * 1024)).ok();
            if let Some(record) = record.filter(|r| r.key == key) {
                live.push(record);
            }
        }
        live.sort_by(|a, b| a.since.cmp(&b.since));
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, uuid: &str, host: &str) -> OwnerRecord {
        OwnerRecord {
            key: key.to_owned(),
            host: host.to_owned(),
            guest: "vm1".to_owned(),
            uuid: Uuid::parse(uuid).expect("uuid"),
            mode: LockMode::Exclusive,
            since: crate::clock::now(),
            holder_pid: std::process::id(),
        }
    }

    #[test]
    fn records_are_live_while_held_and_cleaned_when_stale() {
        let dir = tempfile::tempdir().expect("dir");
        let ls = Lockspace::new(dir.path());
        let key = "file:/shared/a.qcow2@0";
        let a = record(key, "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab", "kvm-01");
        let b = record(key, "0e4c9a51-7a2f-4b83-9d4e-5f6a7b8c9d0e", "kvm/02");
        let held_a = ls.publish(&a).expect("publish a");
        let held_b = ls.publish(&b).expect("publish b");
        assert_eq!(ls.owners(key).len(), 2);
        drop(held_b);
        assert_eq!(ls.owners(key), vec![a.clone()], "b is stale now");
        assert_eq!(fs::read_dir(ls.owners_dir(key)).expect("dir").count(), 1, "stale record removed");
        let replaced = ls.publish(&a).expect("a new holder of the same guest publishes again");
        ls.unpublish(key, &a.uuid, &a.host, &held_a);
        assert_eq!(ls.owners(key), vec![a.clone()], "the old holder does not remove the new record");
        drop(held_a);
        ls.unpublish(key, &a.uuid, &a.host, &replaced);
        drop(replaced);
        assert!(ls.owners(key).is_empty());
        assert!(!ls.owners_dir(key).exists());
    }

    #[test]
    fn keys_are_stable() {
        assert_eq!(hash(""), "cbf29ce484222325");
        assert_eq!(hash("a"), "af63dc4c8601ec8c");
        let dir = tempfile::tempdir().expect("dir");
        let img = dir.path().join("img");
        fs::write(&img, b"x").expect("write");
        std::os::unix::fs::symlink(&img, dir.path().join("link")).expect("symlink");
        assert_eq!(file_key(&img, 0), file_key(&dir.path().join("link"), 0));
        assert_ne!(file_key(&img, 0), file_key(&img, 1024));
    }
}
