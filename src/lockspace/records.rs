//! Owner records: who holds a resource, as every host can read it (see the module above for
//! the layout and what is trusted). A record is live only while its holder holds an OFD lock on
//! byte 0 of its file; readers remove stale ones, by inode, under their own lock.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use log::warn;
use serde::{Deserialize, Serialize};

use super::dir::{Dir, DirError, Entry};
use super::{hash, subdir, Lockspace, LockspaceError};
use crate::domain::Uuid;
use crate::lock::{self, LockMode};

/// A record larger than this is not read (records are a few hundred bytes).
const MAX_RECORD: u64 = 64 * 1024;

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
    /// What the holder uses it as, when that is not the obvious (a layer beneath its disk, a
    /// data file, firmware...), for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Held by `lockhook run` (`guest` is then the command line, `holder_pid` the `run`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub command: bool,
}

fn safe_host(host: &str) -> String {
    host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

/// A part of a record file name never used before, by this or any host: the pid, the time in
/// nanoseconds and a counter (the file name also carries the host name, unique in a fleet).
fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}-{nanos:x}-{:x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// What a probe of a record's liveness lock says.
#[derive(Debug)]
enum Probe {
    /// Someone holds the lock: the record is live.
    Live,
    /// Nobody does: the record is stale (its holder or its host is gone).
    Stale,
    /// The probe failed (ENOLCK, EIO, a lock manager in recovery): nothing is known, so the
    /// record is neither believed nor removed.
    Failed(io::Error),
}

fn classify(probed: io::Result<Option<LockMode>>) -> Probe {
    match probed {
        Ok(Some(_)) => Probe::Live,
        Ok(None) => Probe::Stale,
        Err(e) => Probe::Failed(e),
    }
}

/// A published owner record. Holding it holds the record's liveness lock: keep it as long as
/// the resource is held; dropping it makes the record stale.
#[derive(Debug)]
pub struct Published {
    file: File,
    key: String,
    /// The record's file name in `owners/<hash>/`, never used for any other record.
    name: String,
    dev: u64,
    ino: u64,
}

impl Lockspace {
    /// The directory of `key`'s owner records, created when `create`; `None` when it does not
    /// exist.
    fn owners_dir(&self, key: &str, create: bool) -> Result<Option<Dir>, LockspaceError> {
        let root = self.root()?;
        let Some(owners) = subdir(&root, "owners", create)? else { return Ok(None) };
        subdir(&owners, &hash(key), create)
    }

    /// Publishes `record`: writes it to a fresh temp file, locks that, then renames it to a name
    /// no record ever had, so a reader never sees a live record unlocked and no name is ever
    /// reused (which is what makes a reader's check-then-unlink of stale records safe).
    pub fn publish(&self, record: &OwnerRecord) -> Result<Published, LockspaceError> {
        let mut attempts = 0;
        loop {
            match self.try_publish(record) {
                // `owners/<hash>` was removed (empty) by an unpublish between our mkdir and our
                // create: make it again.
                Err(LockspaceError::CreateRecord { source, .. })
                    if source.kind() == io::ErrorKind::NotFound && attempts < 3 =>
                {
                    attempts += 1;
                }
                result => return result,
            }
        }
    }

    fn try_publish(&self, record: &OwnerRecord) -> Result<Published, LockspaceError> {
        let dir =
            self.owners_dir(&record.key, true)?.ok_or_else(|| LockspaceError::Missing { path: self.dir.clone() })?;
        let nonce = nonce();
        let name = format!("{}.{}.{nonce}.json", record.uuid, safe_host(&record.host));
        let tmp = format!(".{}.{nonce}.tmp", record.uuid);
        let (mut file, entry) =
            dir.open_file(&tmp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL).map_err(|e| match e {
                DirError::Unexpected { kind } => LockspaceError::NotRegular { path: dir.join(&tmp), kind },
                DirError::Io(source) => LockspaceError::CreateRecord { path: dir.join(&tmp), source },
            })?;
        let written = (|| {
            // Invariant: the record is locked before it gets its `.json` name, so no reader can
            // find it unlocked while its holder lives.
            lock::try_lock_fd(&file, LockMode::Exclusive, 0)
                .map_err(|source| LockspaceError::LockRecord { path: dir.join(&tmp), source })?;
            let json = serde_json::to_vec(record).map_err(io::Error::other);
            json.and_then(|json| file.write_all(&json))
                .map_err(|source| LockspaceError::WriteRecord { path: dir.join(&tmp), source })?;
            dir.rename(&tmp, &name).map_err(|source| LockspaceError::WriteRecord { path: dir.join(&name), source })
        })();
        if let Err(e) = written {
            let _ = dir.unlink(&tmp);
            return Err(e);
        }
        Ok(Published { file, key: record.key.clone(), name, dev: entry.dev, ino: entry.ino })
    }

    /// Whether `published` is still in place (someone may have removed its file).
    pub fn is_published(&self, published: &Published) -> Result<bool, LockspaceError> {
        let Some(dir) = self.owners_dir(&published.key, false)? else { return Ok(false) };
        match dir.stat(&published.name) {
            Ok(entry) => Ok(entry.kind == Entry::FILE && entry.same_inode(published.dev, published.ino)),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(LockspaceError::OpenRecord { path: dir.join(&published.name), source: e.into_io() }),
        }
    }

    /// Withdraws `published` (its name is removed if it still refers to our file), then drops
    /// it, releasing the record's lock.
    pub fn unpublish(&self, published: Published) {
        // Invariant: we still hold the record's lock here, so no reader is removing this inode,
        // and no one else ever renames a record to our name.
        let Ok(Some(dir)) = self.owners_dir(&published.key, false) else { return };
        let _ = dir.unlink_if_same(&published.name, published.dev, published.ino);
        drop(dir);
        if let Ok(root) = self.root() {
            if let Ok(Some(owners)) = subdir(&root, "owners", false) {
                let _ = owners.remove_empty_dir(&hash(&published.key));
            }
        }
        drop(published.file);
    }

    /// The live records for `key`, oldest first. Stale records (nobody holds their lock) are
    /// removed; anything else found there (symlinks, FIFOs, records whose lock cannot be
    /// probed) is left alone with a warning.
    pub fn owners(&self, key: &str) -> Vec<OwnerRecord> {
        match self.read_owners(key) {
            Ok(live) => live,
            Err(e) => {
                if !e.is_missing() {
                    warn!("owner records of {key}: {}", crate::error_chain(&e));
                }
                Vec::new()
            }
        }
    }

    fn read_owners(&self, key: &str) -> Result<Vec<OwnerRecord>, LockspaceError> {
        let Some(dir) = self.owners_dir(key, false)? else { return Ok(Vec::new()) };
        let names = dir.names().map_err(|source| LockspaceError::ReadDir { path: dir.path().to_owned(), source })?;
        let mut live = Vec::new();
        for name in names.iter().filter(|n| n.ends_with(".json") && !n.starts_with('.')) {
            match read_record(&dir, name, key) {
                Ok(Some(record)) => live.push(record),
                Ok(None) => {}
                Err(e) => warn!("{}", crate::error_chain(&e)),
            }
        }
        live.sort_by(|a, b| a.since.cmp(&b.since));
        Ok(live)
    }
}

/// An owner record as the fleet view shows it: live (its holder holds its lock) or stale (its
/// holder is gone; the next reader of that resource removes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seen {
    #[serde(flatten)]
    pub record: OwnerRecord,
    pub live: bool,
}

impl Lockspace {
    /// Every owner record of every host, for `lockhook status --fleet`: one directory walk of
    /// `owners/`, nothing removed. A record in a directory not named by its key's hash, one that
    /// does not parse, or one whose lock cannot be probed is left out (with a warning for the
    /// last); non-regular files are skipped as everywhere in the lockspace.
    pub fn all_records(&self) -> Result<Vec<Seen>, LockspaceError> {
        let root = self.root()?;
        let Some(owners) = subdir(&root, "owners", false)? else { return Ok(Vec::new()) };
        let read_dir =
            |dir: &Dir| dir.names().map_err(|source| LockspaceError::ReadDir { path: dir.path().to_owned(), source });
        let mut seen = Vec::new();
        for hashed in read_dir(&owners)? {
            let dir = match subdir(&owners, &hashed, false) {
                Ok(Some(dir)) => dir,
                Ok(None) => continue,
                Err(e) => {
                    warn!("{}", crate::error_chain(&e));
                    continue;
                }
            };
            for name in read_dir(&dir)?.iter().filter(|n| n.ends_with(".json") && !n.starts_with('.')) {
                match peek_record(&dir, name) {
                    Ok(Some(found)) if hash(&found.record.key) == hashed => seen.push(found),
                    Ok(_) => {}
                    Err(e) => warn!("{}", crate::error_chain(&e)),
                }
            }
        }
        seen.sort_by(|a, b| {
            (&a.record.host, &a.record.guest, &a.record.since).cmp(&(&b.record.host, &b.record.guest, &b.record.since))
        });
        Ok(seen)
    }
}

/// Reads the record `name` and whether it is live, removing nothing.
fn peek_record(dir: &Dir, name: &str) -> Result<Option<Seen>, LockspaceError> {
    let path = || dir.join(name);
    let (file, _) = match dir.open_file(name, libc::O_RDONLY) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(DirError::Unexpected { kind }) => return Err(LockspaceError::NotRegular { path: path(), kind }),
        Err(DirError::Io(source)) => return Err(LockspaceError::OpenRecord { path: path(), source }),
    };
    let live = match classify(lock::probe_fd(&file, 0)) {
        Probe::Live => true,
        Probe::Stale => false,
        Probe::Failed(source) => return Err(LockspaceError::ProbeRecord { path: path(), source }),
    };
    let mut text = Vec::new();
    (&file)
        .take(MAX_RECORD)
        .read_to_end(&mut text)
        .map_err(|source| LockspaceError::OpenRecord { path: path(), source })?;
    Ok(serde_json::from_slice::<OwnerRecord>(&text).ok().map(|record| Seen { record, live }))
}

/// Reads the record `name`: `Some` when it is live and about `key`, `None` when it is stale
/// (and then removed), gone, or about another key.
fn read_record(dir: &Dir, name: &str, key: &str) -> Result<Option<OwnerRecord>, LockspaceError> {
    let path = || dir.join(name);
    let (file, entry) = match dir.open_file(name, libc::O_RDONLY) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(DirError::Unexpected { kind }) => return Err(LockspaceError::NotRegular { path: path(), kind }),
        Err(DirError::Io(source)) => return Err(LockspaceError::OpenRecord { path: path(), source }),
    };
    match classify(lock::probe_fd(&file, 0)) {
        Probe::Live => {
            let mut text = Vec::new();
            (&file)
                .take(MAX_RECORD)
                .read_to_end(&mut text)
                .map_err(|source| LockspaceError::OpenRecord { path: path(), source })?;
            let record: Option<OwnerRecord> = serde_json::from_slice(&text).ok();
            Ok(record.filter(|r| r.key == key))
        }
        Probe::Stale => {
            drop(file);
            remove_stale(dir, name, entry)?;
            Ok(None)
        }
        Probe::Failed(source) => Err(LockspaceError::ProbeRecord { path: path(), source }),
    }
}

/// Removes the stale record `name`, which a probe found unlocked when it was the inode `seen`.
/// Returns whether it removed it.
///
/// Invariant: nothing is removed unless this process holds the record's own lock (byte 0, the
/// liveness lock) through an fd open on the very inode that the name still refers to at the
/// moment of the `unlinkat`:
/// - holding that lock proves no holder holds it, and a holder never locks a record again once
///   it let go (records are published as fresh files), so the record stays stale;
/// - it serialises removers: a second reader cannot take it, and leaves the record to us;
/// - the name cannot meanwhile come to refer to a live record: names are never reused
///   (`publish`), and a file renamed over it by someone else is a different inode, which the
///   check in `unlink_if_same` sees.
fn remove_stale(dir: &Dir, name: &str, seen: Entry) -> Result<bool, LockspaceError> {
    let path = || dir.join(name);
    // A write lock needs a read-write fd; the probe's read-only one cannot take it.
    let (file, entry) = match dir.open_file(name, libc::O_RDWR) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(DirError::Unexpected { kind }) => return Err(LockspaceError::NotRegular { path: path(), kind }),
        Err(DirError::Io(source)) => return Err(LockspaceError::RemoveRecord { path: path(), source }),
    };
    if !entry.same_inode(seen.dev, seen.ino) {
        return Ok(false); // replaced since the probe: the next reader judges the new one
    }
    match lock::try_lock_fd(&file, LockMode::Exclusive, 0) {
        Ok(()) => {}
        // Live after all (a holder cannot re-lock a stale record, so: another reader removing it).
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(source) => return Err(LockspaceError::ProbeRecord { path: path(), source }),
    }
    let removed = dir.unlink_if_same(name, entry.dev, entry.ino);
    // Only now let go of the lock.
    drop(file);
    removed.map_err(|source| LockspaceError::RemoveRecord { path: path(), source })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::lockspace::tests::{count, owners_path, plant_stale, record, within_seconds};

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
        assert!(ls.is_published(&held_b).expect("check"));
        drop(held_b);
        assert_eq!(ls.owners(key), vec![a.clone()], "b is stale now");
        assert_eq!(count(&owners_path(dir.path(), key)), 1, "stale record removed");
        // A new holder of the same guest publishes again, under a name of its own.
        let replaced = ls.publish(&a).expect("a new holder of the same guest publishes again");
        assert_eq!(ls.owners(key), vec![a.clone(), a.clone()]);
        ls.unpublish(held_a);
        assert_eq!(ls.owners(key), vec![a.clone()], "the old holder does not remove the new record");
        assert!(ls.is_published(&replaced).expect("check"));
        ls.unpublish(replaced);
        assert!(ls.owners(key).is_empty());
        assert!(!owners_path(dir.path(), key).exists(), "the empty directory is removed");
    }

    #[test]
    fn a_symlinked_owner_directory_is_not_followed() {
        let dir = tempfile::tempdir().expect("dir");
        let outside = tempfile::tempdir().expect("outside");
        let key = "file:/shared/a.qcow2@0";
        let stale = record(key, "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab", "kvm-01");
        // Unlocked *.json files outside the lockspace, which a reader would take for stale records.
        plant_stale(outside.path(), "precious.json", &stale);
        plant_stale(outside.path(), "other.json", &record("file:/x@0", "0e4c9a51-7a2f-4b83-9d4e-5f6a7b8c9d0e", "h"));
        fs::create_dir(dir.path().join("owners")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), owners_path(dir.path(), key)).expect("symlink");
        let ls = Lockspace::new(dir.path());
        assert!(ls.owners(key).is_empty());
        assert!(matches!(ls.read_owners(key), Err(LockspaceError::NotDirectory { kind: "symbolic link", .. })));
        assert!(matches!(ls.publish(&stale), Err(LockspaceError::NotDirectory { .. })));
        assert_eq!(count(outside.path()), 2, "nothing outside removed or created");
        // The same with `owners` itself a symlink.
        fs::remove_file(owners_path(dir.path(), key)).expect("rm");
        fs::remove_dir(dir.path().join("owners")).expect("rmdir");
        fs::create_dir(outside.path().join(hash(key))).expect("mkdir");
        plant_stale(&outside.path().join(hash(key)), "x.json", &stale);
        std::os::unix::fs::symlink(outside.path(), dir.path().join("owners")).expect("symlink");
        assert!(ls.owners(key).is_empty());
        assert!(ls.publish(&stale).is_err());
        assert!(outside.path().join(hash(key)).join("x.json").exists());
        assert_eq!(count(&outside.path().join(hash(key))), 1);
    }

    #[test]
    fn planted_records_are_left_alone_and_never_block() {
        let dir = tempfile::tempdir().expect("dir");
        let outside = tempfile::tempdir().expect("outside");
        let key = "net:nbd://h/x";
        let d = owners_path(dir.path(), key);
        let rec = record(key, "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab", "kvm-01");
        plant_stale(outside.path(), "target.json", &rec);
        fs::create_dir_all(&d).expect("mkdir");
        nix::unistd::mkfifo(&d.join("fifo.json"), nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
        std::os::unix::fs::symlink(outside.path().join("target.json"), d.join("link.json")).expect("symlink");
        fs::create_dir(d.join("dir.json")).expect("mkdir");
        let _sock = std::os::unix::net::UnixListener::bind(d.join("sock.json")).expect("bind");
        let ls = Lockspace::new(dir.path());
        let live = ls.publish(&rec).expect("publish");
        let got = within_seconds({
            let ls = ls.clone();
            move || ls.owners(key)
        });
        assert_eq!(got, vec![rec.clone()]);
        for name in ["fifo.json", "link.json", "dir.json", "sock.json"] {
            assert!(fs::symlink_metadata(d.join(name)).is_ok(), "{name} is left alone");
        }
        assert!(outside.path().join("target.json").exists());
        drop(live);
    }

    #[test]
    fn a_failed_probe_is_not_stale() {
        assert!(matches!(classify(Ok(Some(LockMode::Shared))), Probe::Live));
        assert!(matches!(classify(Ok(None)), Probe::Stale));
        for errno in [libc::ENOLCK, libc::EIO, libc::EBADF] {
            assert!(matches!(classify(Err(io::Error::from_raw_os_error(errno))), Probe::Failed(_)));
        }
    }

    #[test]
    fn a_record_replaced_after_the_probe_is_not_removed() {
        let dir = tempfile::tempdir().expect("dir");
        let key = "file:/shared/a.qcow2@0";
        let d = owners_path(dir.path(), key);
        let rec = record(key, "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab", "kvm-01");
        plant_stale(&d, "r.json", &rec);
        let dirfd = Dir::open_root(&d).expect("open");
        let seen = dirfd.stat("r.json").expect("stat");
        // Between the probe and the removal, a live record takes the name.
        let (live, _) = dirfd.open_file(".new", libc::O_RDWR | libc::O_CREAT | libc::O_EXCL).expect("create");
        lock::try_lock_fd(&live, LockMode::Exclusive, 0).expect("lock");
        (&live).write_all(&serde_json::to_vec(&rec).expect("json")).expect("write");
        dirfd.rename(".new", "r.json").expect("rename");
        assert!(!remove_stale(&dirfd, "r.json", seen).expect("remove"), "another inode now");
        assert!(d.join("r.json").exists());
        assert_eq!(Lockspace::new(dir.path()).owners(key), vec![rec.clone()]);
        // A stale record another reader is removing (it holds the lock) is left to that reader.
        plant_stale(&d, "s.json", &rec);
        let seen = dirfd.stat("s.json").expect("stat");
        let (other, _) = dirfd.open_file("s.json", libc::O_RDWR).expect("open");
        lock::try_lock_fd(&other, LockMode::Exclusive, 0).expect("the other reader's lock");
        assert!(!remove_stale(&dirfd, "s.json", seen).expect("remove"));
        assert!(d.join("s.json").exists());
        drop(other);
        assert!(remove_stale(&dirfd, "s.json", seen).expect("remove"), "stale and unlocked: removed");
        assert!(!d.join("s.json").exists());
    }

    #[test]
    fn the_fleet_view_shows_live_and_stale_records_and_removes_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let ls = Lockspace::new(dir.path());
        assert!(ls.all_records().expect("empty lockspace").is_empty());
        let a = record("file:/s/a.qcow2@0", "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab", "kvm-01");
        let _held = ls.publish(&a).expect("publish");
        let b = record("net:nbd://s/x", "0e4c9a51-7a2f-4b83-9d4e-5f6a7b8c9d0e", "kvm-02");
        plant_stale(&owners_path(dir.path(), &b.key), "b.kvm-02.json", &b);
        // A record in a directory that is not its key's: left out.
        plant_stale(&owners_path(dir.path(), "file:/elsewhere@0"), "c.json", &a);
        let seen = ls.all_records().expect("records");
        assert_eq!(seen, vec![Seen { record: a, live: true }, Seen { record: b.clone(), live: false }]);
        assert_eq!(count(&owners_path(dir.path(), &b.key)), 1, "the stale record is still there");
    }
}
