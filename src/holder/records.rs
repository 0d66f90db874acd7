//! Publishing a holder's owner records in the lockspace, on a thread of its own.
//!
//! Records name the holder to other hosts; they are not on a guest start's critical path, and on
//! shared storage each costs a few round trips (create, lock, write, rename). The holder's main
//! loop must stay free to answer the hook's next request at once, so it only sends the wanted
//! set here; this thread owns the record files (each carries the lock that keeps its record live).

use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

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
    /// The keys last sent, to send only changes.
    sent: Vec<String>,
}

impl RecordKeeper {
    pub fn start(lockspace: Lockspace) -> RecordKeeper {
        let (tx, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("records".into())
            .spawn(move || {
                let mut published: HashMap<String, (OwnerRecord, Published)> = HashMap::new();
                for command in rx {
                    match command {
                        Command::Sync(wanted) => {
                            let gone: Vec<String> = published
                                .keys()
                                .filter(|key| !wanted.iter().any(|w| w.key == **key))
                                .cloned()
                                .collect();
                            for key in gone {
                                if let Some((_, record)) = published.remove(&key) {
                                    lockspace.unpublish(record);
                                }
                            }
                            for record in wanted {
                                if !published.contains_key(&record.key) {
                                    publish(&lockspace, &mut published, record);
                                }
                            }
                        }
                        Command::Refresh => {
                            let missing: Vec<OwnerRecord> = published
                                .values()
                                // A lockspace that cannot be read now keeps what it has.
                                .filter(|(_, p)| matches!(lockspace.is_published(p), Ok(false)))
                                .map(|(r, _)| r.clone())
                                .collect();
                            for record in missing {
                                published.remove(&record.key);
                                publish(&lockspace, &mut published, record);
                            }
                        }
                    }
                }
                // The channel closed: withdraw everything (closing the files drops the locks).
                for (_, (_, record)) in published.drain() {
                    lockspace.unpublish(record);
                }
            })
            .map_err(|e| warn!("cannot start the owner-record thread: {e}"))
            .ok();
        RecordKeeper { tx: thread.as_ref().map(|_| tx), thread, sent: Vec::new() }
    }

    /// Makes `wanted` the published set (returns at once).
    pub fn sync(&mut self, wanted: Vec<OwnerRecord>) {
        let keys: Vec<String> = wanted.iter().map(|r| r.key.clone()).collect();
        if keys == self.sent {
            return;
        }
        self.sent = keys;
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

fn publish(lockspace: &Lockspace, published: &mut HashMap<String, (OwnerRecord, Published)>, record: OwnerRecord) {
    match lockspace.publish(&record) {
        Ok(done) => {
            published.insert(record.key.clone(), (record, done));
        }
        Err(e) => warn!(
            "guest {} ({}): cannot publish its owner record for {}: {}",
            record.guest,
            record.uuid,
            record.key,
            crate::error_chain(&e)
        ),
    }
}
