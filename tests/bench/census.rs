//! The bench's view of a run directory's census (lockhook's `src/census.rs`: a SysV semaphore
//! pair, `LIVE` and `ENTERED`, whose id is in `<run_dir>/census`): its counters, a way to
//! unbalance it on purpose, so that every hook call scans the run directory and `/proc/locks`
//! as every call did before the census existed, and its removal at the end (semaphore sets
//! outlive their run directory).

use std::path::Path;

const LIVE: u16 = 0;
const ENTERED: u16 = 1;
const MAGIC: &str = "lockhook-census 1";

pub struct CensusSet {
    semid: i32,
    /// The set's creation time as recorded, to tell it from a later set that reused the id.
    ctime: i64,
}

impl CensusSet {
    /// The set named by `<run_dir>/census`, if that file is there and parses.
    pub fn open(run_dir: &Path) -> Option<CensusSet> {
        let text = std::fs::read_to_string(run_dir.join("census")).ok()?;
        let mut words = text.strip_prefix(MAGIC)?.split_whitespace();
        let semid = words.next()?.parse().ok()?;
        let ctime = words.next()?.parse().ok()?;
        Some(CensusSet { semid, ctime })
    }

    /// `(LIVE, ENTERED)`: holders alive, holders entered and not retired.
    pub fn counts(&self) -> Option<(u16, u16)> {
        let mut values = [0u16; 2];
        // SAFETY: GETALL writes `nsems` (2, checked by lockhook when it made the set) unsigned
        // shorts into the array we pass, which lives for the call.
        let rv = unsafe { libc::semctl(self.semid, 0, libc::GETALL, values.as_mut_ptr()) };
        (rv >= 0).then_some((values[LIVE as usize], values[ENTERED as usize]))
    }

    /// Adds `delta` to `ENTERED` (no undo): +1 makes the census say "one holder died" until the
    /// bench takes it back with -1, so every hook call meanwhile runs the re-adoption scan.
    pub fn add_entered(&self, delta: i16) -> bool {
        let mut op = libc::sembuf { sem_num: ENTERED, sem_op: delta, sem_flg: 0 };
        if delta < 0 {
            op.sem_flg = i16::try_from(libc::IPC_NOWAIT).unwrap_or(0);
        }
        // SAFETY: one valid sembuf, living for the call.
        unsafe { libc::semop(self.semid, &mut op, 1) == 0 }
    }
}

/// `LIVE 3, ENTERED 3 (balanced)` or why there is no census.
pub fn describe(run_dir: &Path) -> String {
    match CensusSet::open(run_dir).map(|c| c.counts()) {
        None => "no census file".into(),
        Some(None) => "census file names no readable semaphore set".into(),
        Some(Some((live, entered))) => format!(
            "LIVE {live}, ENTERED {entered} ({})",
            if entered <= live {
                "balanced".to_owned()
            } else {
                format!("{} dead holder(s) unretired", entered - live)
            }
        ),
    }
}

/// Removes the run directory's semaphore set (by its id, from `<run_dir>/census`), once no
/// holder of it runs any more; says so on stderr.
pub fn remove(run_dir: &Path) {
    let Some(c) = CensusSet::open(run_dir) else { return };
    // SAFETY: semid_ds is plain data; zeroes are a valid value for every field.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one semid_ds into the buffer we pass, which lives for the call.
    let rv = unsafe { libc::semctl(c.semid, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) };
    if rv == 0 && ds.sem_ctime == c.ctime {
        // SAFETY: no pointers; removes the set lockhook recorded for this run dir.
        let rv = unsafe { libc::semctl(c.semid, 0, libc::IPC_RMID) };
        if rv == 0 {
            eprintln!("bench: removed semaphore set {} (the census of {})", c.semid, run_dir.display());
            return;
        }
    }
    eprintln!("bench: warning: could not remove semaphore set {} (census of {})", c.semid, run_dir.display());
}
