//! Every file lockhook keeps in its run directory, derived from the run directory alone.
//!
//! ```text
//! <run_dir>/                 0700 root
//!   <uuid>.sock              the holder's control socket (0600)
//!   <uuid>.lock              the holder's single-instance lock (an OFD write lock on byte 0)
//!   <uuid>.json              what the holder holds (written atomically by the holder)
//!   shares/<dev>-<ino>-<off> which holder's fd other guests' shared locks share (see `shares`)
//!   serials                  virtio disks' serials read this boot (see `storage::block::Serials`)
//! ```
//! Only a parsed `Uuid` names a file, so nothing from the XML can climb out of the directory.

use std::path::{Path, PathBuf};

use crate::domain::Uuid;

#[derive(Debug, Clone)]
pub struct Paths {
    run_dir: PathBuf,
}

impl Paths {
    pub fn new(run_dir: &Path) -> Paths {
        Paths { run_dir: run_dir.to_owned() }
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn socket(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join(format!("{uuid}.sock"))
    }

    pub fn instance_lock(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join(format!("{uuid}.lock"))
    }

    pub fn serials(&self) -> PathBuf {
        self.run_dir.join("serials")
    }

    pub fn state(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join(format!("{uuid}.json"))
    }

    /// The spare holder's socket and single-instance lock (see `holder::spare`).
    pub fn spare_socket(&self) -> PathBuf {
        self.run_dir.join("spare.sock")
    }

    pub fn spare_lock(&self) -> PathBuf {
        self.run_dir.join("spare.lock")
    }

    /// Where holders say which of their shared locks others may share (see `shares`).
    pub fn shares_dir(&self) -> PathBuf {
        self.run_dir.join("shares")
    }

    /// Marker of an incoming live migration, written by the `migrate` hook.
    pub fn incoming(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join(format!("{uuid}.incoming"))
    }

    /// Written when `prepare` admits pending locks (see `migration::note_admitted`).
    pub fn admitted(&self, uuid: &Uuid) -> PathBuf {
        self.run_dir.join(format!("{uuid}.admitted"))
    }

    /// The UUID a run-directory file belongs to, if its name is `<uuid>.<ext>`.
    pub fn uuid_of(path: &Path, ext: &str) -> Option<Uuid> {
        if path.extension()?.to_str()? != ext {
            return None;
        }
        Uuid::parse(path.file_stem()?.to_str()?).ok()
    }
}
