//! Publishing a holder's owner records in the lockspace, on a thread of its own.
//!
//! Records name the holder to other hosts; they are not on a guest start's critical path, and on
//! shared storage each costs a few round trips (create, lock, write, rename). The holder's main
//! loop must stay free to answer the hook's next request at once, so it only sends the wanted
//! set here; this thread owns the record files (each carries the lock that keeps its record live).

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use log::warn;

use crate::lockspace::{Lockspace, OwnerRecord, Published};

enum Command {
    /// Publish these records and withdraw every other one.
    Sync(Vec<OwnerRecord>),
    /// Re-publish records whose file someone removed.
    Refresh,
}

pub struct RecordKeeper {
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    /// The records last sent, to send only changes (a new key, or a record whose mode or role
    /// changed: a hot-plug mode change must not go on advertising the old mode).
    sent: Vec<OwnerRecord>,
}

/// How soon a record that could not be published (a lockspace that did not answer) is tried
/// again: a resource without its record cannot be told apart from one nobody names.
const RETRY: Duration = Duration::from_secs(5);

/// The record thread's state: what is published, and what is still to be.
#[derive(Default)]
struct Records {
    published: HashMap<String, (OwnerRecord, Published)>,
    failed: HashMap<String, OwnerRecord>,
}

impl Records {
    fn sync(&mut self, lockspace: &Lockspace, wanted: Vec<OwnerRecord>) {
        let gone: Vec<String> =
            self.published.keys().filter(|key| !wanted.iter().any(|w| w.key == **key)).cloned().collect();
        for key in gone {
            if let Some((_, record)) = self.published.remove(&key) {
                lockspace.unpublish(record);
            }
        }
        self.failed.retain(|key, _| wanted.iter().any(|w| w.key == *key));
        for record in wanted {
            if !self.published.get(&record.key).is_some_and(|(old, _)| *old == record) {
                self.publish(lockspace, record);
            }
        }
    }

    /// Re-publishes records whose file someone removed, and those that failed before.
    fn refresh(&mut self, lockspace: &Lockspace) {
        let missing: Vec<OwnerRecord> = self
            .published
            .values()
            // A lockspace that cannot be read now keeps what it has.
            .filter(|(_, p)| matches!(lockspace.is_published(p), Ok(false)))
            .map(|(r, _)| r.clone())
            .collect();
        for record in missing {
            self.publish(lockspace, record);
        }
        self.retry(lockspace);
    }

    fn retry(&mut self, lockspace: &Lockspace) {
        for (_, record) in std::mem::take(&mut self.failed) {
            self.publish(lockspace, record);
        }
    }

    /// Publishes `record`; a record it replaces (same key) is withdrawn only once the new one
    /// is live, so the resource is never without one.
    fn publish(&mut self, lockspace: &Lockspace, record: OwnerRecord) {
        match lockspace.publish(&record) {
            Ok(done) => {
                if let Some((_, old)) = self.published.insert(record.key.clone(), (record, done)) {
                    lockspace.unpublish(old);
                }
            }
            Err(e) => {
                warn!(
                    "guest {} ({}): cannot publish its owner record for {}: {}; trying again in {} s",
                    record.guest,
                    record.uuid,
                    record.key,
                    crate::error_chain(&e),
                    RETRY.as_secs()
                );
                self.failed.insert(record.key.clone(), record);
            }
        }
    }
}

impl RecordKeeper {
    pub fn start(lockspace: Lockspace) -> RecordKeeper {
        let (tx, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("records".into())
            .spawn(move || {
                let mut records = Records::default();
                loop {
                    let command = if records.failed.is_empty() {
                        rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                    } else {
                        rx.recv_timeout(RETRY)
                    };
                    match command {
                        Ok(Command::Sync(wanted)) => records.sync(&lockspace, wanted),
                        Ok(Command::Refresh) => records.refresh(&lockspace),
                        Err(RecvTimeoutError::Timeout) => records.retry(&lockspace),
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                // The channel closed: withdraw everything (closing the files drops the locks).
                for (_, (_, record)) in records.published.drain() {
                    lockspace.unpublish(record);
                }
            })
            .map_err(|e| warn!("cannot start the owner-record thread: {e}"))
            .ok();
        RecordKeeper { tx: thread.as_ref().map(|_| tx), thread, sent: Vec::new() }
    }

    /// Makes `wanted` the published set (returns at once).
    pub fn sync(&mut self, wanted: Vec<OwnerRecord>) {
        if wanted == self.sent {
            return;
        }
        self.sent.clone_from(&wanted);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Command::Sync(wanted));
        }
    }

    pub fn refresh(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Command::Refresh);
        }
    }

    /// Withdraws every record and waits until that is done.
    pub fn stop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::LockMode;

    fn record(key: &str, mode: LockMode) -> OwnerRecord {
        OwnerRecord {
            role: None,
            command: false,
            key: key.to_owned(),
            host: "kvm-01".to_owned(),
            guest: "vm1".to_owned(),
            uuid: crate::domain::Uuid::parse("f3fa73d4-1c2b-4e5f-8a9b-0123456789ab").expect("uuid"),
            mode,
            since: crate::clock::now(),
            holder_pid: std::process::id(),
        }
    }

    #[test]
    fn a_changed_record_is_republished_and_a_failed_one_retried() {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path().join("ls");
        let lockspace = Lockspace::new(&root);
        let mut records = Records::default();
        // The lockspace is not there yet: the record waits for a retry.
        records.sync(&lockspace, vec![record("file:/i/a@0", LockMode::Shared)]);
        assert_eq!(records.failed.len(), 1);
        std::fs::create_dir(&root).expect("mkdir");
        records.retry(&lockspace);
        assert!(records.failed.is_empty());
        assert_eq!(lockspace.owners("file:/i/a@0").iter().map(|o| o.mode).collect::<Vec<_>>(), [LockMode::Shared]);
        // The mode changed (a hot-plug upgrade): the record says so, and only the new one is left.
        records.sync(&lockspace, vec![record("file:/i/a@0", LockMode::Exclusive)]);
        assert_eq!(lockspace.owners("file:/i/a@0").iter().map(|o| o.mode).collect::<Vec<_>>(), [LockMode::Exclusive]);
        records.sync(&lockspace, Vec::new());
        assert!(lockspace.owners("file:/i/a@0").is_empty());
    }
}
