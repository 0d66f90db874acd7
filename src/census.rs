//! The census: an O(1) answer, for every hook call, to "did a holder on this host die without
//! letting go?", so the re-adoption pass (`reconcile::adopt_orphans`) scans the run directory and
//! `/proc/locks` only when one did, not on every start, stop and migration.
//!
//! A SysV semaphore set of two counters per run directory:
//! - `LIVE`: every guest holder adds 1 with `SEM_UNDO`, so the kernel takes it back when the
//!   holder exits, however it exits (SIGKILL, OOM killer, a crash);
//! - `ENTERED`: added 1 in the same atomic `semop`, taken back only by a clean exit (in one
//!   `semop` with `LIVE`'s, whose undo it cancels) or by whoever *retires* a dead holder.
//!
//! So `ENTERED - LIVE` is the number of holders that died and were not dealt with yet, read
//! with one `semctl(GETALL)`: zero means nothing to re-adopt. A holder enters before it writes
//! its first state file, so a dead holder is never uncounted; one that died before writing
//! anything leaves the census unbalanced, which costs scans, never a missed re-adoption. A dead
//! holder is retired exactly once, by whoever claims its state file (an atomic rename). Holders
//! of an older lockhook never enter: the reconcile timer's full pass, which ignores the census,
//! re-adopts them.
//!
//! The set's id is in `<run_dir>/census` with the set's creation time, so an id reused by
//! another set after an `ipcrm` is not taken for ours; a missing, foreign or unreadable census
//! reads as "unknown", and the hook scans. The set is created 0600 by root's holders; the IPC
//! namespace is the host's.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::paths::Paths;

const LIVE: u16 = 0;
const ENTERED: u16 = 1;
const MAGIC: &str = "lockhook-census 1";

/// A run directory's census.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    semid: i32,
}

/// What the census says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Every holder that entered is alive or left cleanly.
    Balanced,
    /// This many holders died and were not retired yet.
    Dead(u32),
}

fn id_file(paths: &Paths) -> PathBuf {
    paths.run_dir().join("census")
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// `struct semid_ds` as `IPC_STAT` fills it: only its creation (`sem_ctime`) and owner are read.
fn stat(semid: i32) -> io::Result<libc::semid_ds> {
    // SAFETY: semid_ds is plain data; zeroes are a valid value for every field.
    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one semid_ds into the buffer we pass, which lives for the call.
    let rv = unsafe { libc::semctl(semid, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) };
    if rv < 0 {
        return Err(errno());
    }
    Ok(ds)
}

fn semop(semid: i32, ops: &mut [libc::sembuf]) -> io::Result<()> {
    // SAFETY: `ops` is a valid array of `ops.len()` sembufs for the call.
    let rv = unsafe { libc::semop(semid, ops.as_mut_ptr(), ops.len()) };
    if rv < 0 {
        return Err(errno());
    }
    Ok(())
}

fn op(num: u16, delta: i16, flags: i32) -> libc::sembuf {
    libc::sembuf { sem_num: num, sem_op: delta, sem_flg: i16::try_from(flags).unwrap_or(0) }
}

impl Census {
    /// The census of `paths`' run directory, if there is a valid one.
    pub fn open(paths: &Paths) -> Option<Census> {
        let text = fs::read_to_string(id_file(paths)).ok()?;
        let mut words = text.strip_prefix(MAGIC)?.split_whitespace();
        let semid: i32 = words.next()?.parse().ok()?;
        let ctime: i64 = words.next()?.parse().ok()?;
        let ds = stat(semid).ok()?;
        let ours = ds.sem_ctime == ctime && ds.sem_perm.uid == nix::unistd::geteuid().as_raw() && ds.sem_nsems == 2;
        ours.then_some(Census { semid })
    }

    /// The census, created when there is none (by a holder, under the run directory's
    /// `census.lock`, so two holders starting at once make one).
    pub fn open_or_create(paths: &Paths) -> io::Result<Census> {
        if let Some(census) = Census::open(paths) {
            return Ok(census);
        }
        let _guard = lock_census(paths)?;
        if let Some(census) = Census::open(paths) {
            return Ok(census);
        }
        // SAFETY: no pointers; returns a new set's id or -1.
        let semid = unsafe { libc::semget(libc::IPC_PRIVATE, 2, libc::IPC_CREAT | 0o600) };
        if semid < 0 {
            return Err(errno());
        }
        let census = Census { semid };
        #[cfg(test)]
        tests::CREATED.with(|c| c.set(semid));
        // Invariant: a set no file names is removed at once: it would outlive every holder (a
        // full run directory would otherwise leak one kernel set per holder start).
        if let Err(e) = census.publish(paths) {
            // SAFETY: no pointers.
            unsafe { libc::semctl(semid, 0, libc::IPC_RMID) };
            return Err(e);
        }
        Ok(census)
    }

    /// Names this (live) set in the run directory again when the directory has no census (it was
    /// removed and made again, `rm -rf /run/lockhook`): the holders that survived keep counting
    /// in the set they entered, and the next holder does not make a second one (which would
    /// leave this one to no one). A census already there (another set) is left as it is.
    pub fn republish(&self, paths: &Paths) -> io::Result<()> {
        if Census::open(paths).is_some() || stat(self.semid).is_err() {
            return Ok(());
        }
        let _guard = lock_census(paths)?;
        if Census::open(paths).is_some() {
            return Ok(());
        }
        self.publish(paths)
    }

    /// After `leave`: a set the run directory no longer names (made again while holders of the
    /// old one lived, and named by another set first) is removed by the last holder that leaves
    /// it cleanly. No holder enters it any more; one that died in it keeps it (unbalanced).
    pub fn drop_if_orphaned(&self, paths: &Paths) {
        if Census::open(paths) == Some(*self) {
            return;
        }
        if self.count().is_ok_and(|c| c == Count::Balanced) && self.live().is_ok_and(|n| n == 0) {
            // SAFETY: no pointers.
            unsafe { libc::semctl(self.semid, 0, libc::IPC_RMID) };
        }
    }

    /// Writes `<run_dir>/census` naming this set (atomically; no temporary file left behind).
    fn publish(&self, paths: &Paths) -> io::Result<()> {
        let ctime = stat(self.semid)?.sem_ctime;
        crate::rundir::replace_file(&id_file(paths), format!("{MAGIC} {} {ctime}\n", self.semid).as_bytes(), false)
    }

    /// This process is a holder from now on (see the module doc).
    pub fn enter(&self) -> io::Result<()> {
        semop(self.semid, &mut [op(LIVE, 1, libc::SEM_UNDO), op(ENTERED, 1, 0)])
    }

    /// This holder lets go cleanly.
    pub fn leave(&self) -> io::Result<()> {
        semop(self.semid, &mut [op(LIVE, -1, libc::SEM_UNDO | libc::IPC_NOWAIT), op(ENTERED, -1, libc::IPC_NOWAIT)])
    }

    /// A dead holder was dealt with (its state file claimed).
    pub fn retire(&self) -> io::Result<()> {
        semop(self.semid, &mut [op(ENTERED, -1, libc::IPC_NOWAIT)])
    }

    /// Both counters in one read.
    pub fn count(&self) -> io::Result<Count> {
        let mut values = [0u16; 2];
        // SAFETY: GETALL writes `nsems` (2) unsigned shorts into the array we pass.
        let rv = unsafe { libc::semctl(self.semid, 0, libc::GETALL, values.as_mut_ptr()) };
        if rv < 0 {
            return Err(errno());
        }
        let (live, entered) = (values[LIVE as usize], values[ENTERED as usize]);
        Ok(if entered <= live { Count::Balanced } else { Count::Dead(u32::from(entered - live)) })
    }

    /// How many holders are alive (entered, and neither dead nor gone).
    pub fn live(&self) -> io::Result<u32> {
        // SAFETY: GETVAL reads one semaphore's value; no pointers.
        let rv = unsafe { libc::semctl(self.semid, i32::from(LIVE), libc::GETVAL) };
        u32::try_from(rv).map_err(|_| errno())
    }

    /// Removes the set (tests, `install.sh --uninstall`): holders entering later make a new one.
    pub fn remove(paths: &Paths) {
        if let Some(census) = Census::open(paths) {
            // SAFETY: no pointers.
            unsafe { libc::semctl(census.semid, 0, libc::IPC_RMID) };
        }
        let _ = fs::remove_file(id_file(paths));
    }
}

/// `<run_dir>/census.lock`, held while a census is made or named: one set per run directory.
fn lock_census(paths: &Paths) -> io::Result<fs::File> {
    let guard = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(paths.run_dir().join("census.lock"))?;
    crate::lock::lock_wait_fd(&guard, crate::lock::LockMode::Exclusive, 0)?;
    Ok(guard)
}

/// Whether the re-adoption pass may be skipped: the census is there and balanced.
pub fn nothing_died(paths: &Paths) -> bool {
    Census::open(paths).and_then(|c| c.count().ok()) == Some(Count::Balanced)
}

/// Claims a dead holder's state file for the caller (exactly one caller gets it): renamed
/// aside, then read from there, and the holder retired from the census. A file that turns out
/// to be a live holder's (a new holder of the guest wrote it meanwhile) goes back unclaimed.
pub fn claim_dead(paths: &Paths, state: &Path) -> Option<PathBuf> {
    let claimed =
        paths.run_dir().join(format!(".claimed.{}.{}", std::process::id(), state.file_name()?.to_string_lossy()));
    fs::rename(state, &claimed).ok()?;
    // Alive means some holder of this guest holds its instance lock (a zombie's pid, or a pid
    // reused by another process, says nothing).
    let alive = crate::state::read(&claimed).is_ok_and(|s| crate::state::holder_alive(paths, &s.uuid));
    if alive {
        // Alive: put it back unless its holder wrote a newer one meanwhile.
        if rename_noreplace(&claimed, state).is_err() {
            let _ = fs::remove_file(&claimed);
        }
        return None;
    }
    if let Some(census) = Census::open(paths) {
        let _ = census.retire();
    }
    Some(claimed)
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in path"));
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated paths valid for the call.
    let rv =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if rv < 0 {
        return Err(errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_member_unbalances_the_census_until_retired() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        assert!(!nothing_died(&paths), "no census: unknown, so scan");
        let census = Census::open_or_create(&paths).expect("create");
        assert_eq!(Census::open(&paths), Some(census));
        assert!(nothing_died(&paths));
        // A child enters and is killed: the kernel undoes its LIVE, not its ENTERED.
        // SAFETY: the child only calls async-signal-safe semop and pause, then is killed.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let ok = census.enter().is_ok();
                // SAFETY: _exit and pause are async-signal-safe.
                unsafe {
                    if !ok {
                        libc::_exit(1);
                    }
                    loop {
                        libc::pause();
                    }
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let entered = (0..500).any(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    let mut v = [0u16; 2];
                    // SAFETY: GETALL into a 2-element array.
                    unsafe { libc::semctl(census.semid, 0, libc::GETALL, v.as_mut_ptr()) };
                    v[ENTERED as usize] == 1
                });
                assert!(entered, "the child entered");
                assert!(nothing_died(&paths), "alive: balanced");
                assert_eq!(census.live().expect("live"), 1, "one holder alive");
                nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).expect("kill");
                nix::sys::wait::waitpid(child, None).expect("wait");
            }
        }
        assert_eq!(census.count().expect("count"), Count::Dead(1));
        assert_eq!(census.live().expect("live"), 0, "the kernel took the dead one's count back");
        assert!(!nothing_died(&paths));
        census.retire().expect("retire");
        assert!(nothing_died(&paths));
        // A clean member leaves both counters as they were.
        census.enter().expect("enter");
        census.leave().expect("leave");
        assert_eq!(census.count().expect("count"), Count::Balanced);
        // A forged or stale id file is not ours.
        fs::write(id_file(&paths), format!("{MAGIC} {} 1\n", census.semid)).expect("forge");
        assert_eq!(Census::open(&paths), None);
        fs::write(
            id_file(&paths),
            format!("{MAGIC} {} {}\n", census.semid, stat(census.semid).expect("stat").sem_ctime),
        )
        .expect("restore");
        Census::remove(&paths);
        assert_eq!(Census::open(&paths), None);
    }

    thread_local! {
        /// The last set `open_or_create` made on this thread (each test runs on its own).
        pub(super) static CREATED: std::cell::Cell<i32> = const { std::cell::Cell::new(-1) };
    }

    #[test]
    fn a_census_that_cannot_be_named_leaves_no_set_behind() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        // The file cannot be written: a directory stands where the temporary file goes.
        fs::create_dir(dir.path().join(format!(".census.{}", std::process::id()))).expect("mkdir");
        fs::create_dir(id_file(&paths)).expect("a directory where the census goes");
        assert!(Census::open_or_create(&paths).is_err());
        let made = CREATED.with(std::cell::Cell::get);
        assert!(made >= 0, "a set was made");
        assert!(stat(made).is_err(), "and removed again");
    }

    #[test]
    fn a_removed_run_directory_gets_the_surviving_set_named_again() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        let census = Census::open_or_create(&paths).expect("create");
        census.enter().expect("enter");
        // `rm -rf` of the run directory, made again (a holder heals its files).
        fs::remove_dir_all(dir.path()).expect("rm");
        fs::create_dir(dir.path()).expect("mkdir");
        assert_eq!(Census::open(&paths), None);
        census.republish(&paths).expect("republish");
        assert_eq!(Census::open(&paths), Some(census), "the same set, with its holders' counts");
        assert_eq!(census.live().expect("live"), 1);
        assert_eq!(Census::open_or_create(&paths).expect("open"), census, "no second set");
        census.leave().expect("leave");
        census.drop_if_orphaned(&paths);
        assert!(stat(census.semid).is_ok(), "the named set stays");
        // Made again, and another set named first: this one stays unnamed, and goes with the
        // last holder that leaves it.
        census.enter().expect("enter");
        fs::remove_file(id_file(&paths)).expect("rm census");
        let other = Census::open_or_create(&paths).expect("another");
        census.republish(&paths).expect("no-op");
        assert_eq!(Census::open(&paths), Some(other), "a census already there stays");
        census.leave().expect("leave");
        census.drop_if_orphaned(&paths);
        assert!(stat(census.semid).is_err(), "the unnamed set is gone with its last holder");
        Census::remove(&paths);
    }
}
