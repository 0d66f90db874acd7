//! Keeping an idle holder small.
//!
//! A host may run thousands of holders. Each is mostly asleep in `poll`, but what it touched
//! while starting (config and XML parsing, JSON, socket set-up) stays resident and counts in its
//! PSS, although the idle loop never needs it again:
//! - code and read-only data pages of the binary: dropping their page table entries
//!   (`madvise(MADV_DONTNEED)`) gives them back; the pages stay in the page cache, shared, and
//!   the few the idle loop needs fault back in on their next use (a minor fault each);
//! - freed heap memory, which the allocator keeps: `malloc_trim(0)` returns its whole pages;
//! - the main thread's stack below the frame that sleeps: the deep frames of start-up are dead
//!   (below the stack pointer), so their pages are dropped too and read as zeroes when reused.
//!
//! The holder sheds all three right before it sleeps, after every tick: between ticks an idle
//! holder keeps little more than its live heap.

use std::fs;

/// Below the stack pointer, this much stays mapped: the frames of the calls between the
/// shedding and the sleep (`madvise`, `poll`) and a signal handler's frame.
const STACK_KEEP: usize = 16 * 1024;

/// A mapping of this process, as /proc/self/smaps describes it.
struct Mapping {
    start: usize,
    len: usize,
    perms: String,
    path: String,
    /// Anonymous (copy-on-write) KiB in a file mapping: relocated data, never to be dropped.
    anonymous_kib: u64,
    /// Swapped-out KiB: copy-on-write pages too, just not resident now.
    swap_kib: u64,
}

fn mappings(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let kib = |text: &str| text.trim().trim_end_matches("kB").trim().parse().unwrap_or(u64::MAX);
        if let Some(value) = line.strip_prefix("Anonymous:") {
            if let Some(last) = out.last_mut() {
                last.anonymous_kib = kib(value);
            }
            continue;
        }
        if let Some(value) = line.strip_prefix("Swap:") {
            if let Some(last) = out.last_mut() {
                last.swap_kib = kib(value);
            }
            continue;
        }
        // "55d0c8a00000-55d0c8b9c000 r-xp 00052000 fd:00 1234    /usr/local/sbin/lockhook"
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
            continue;
        };
        if end <= start || perms.len() != 4 {
            continue;
        }
        let path = fields.nth(3).unwrap_or("").to_owned();
        out.push(Mapping {
            start,
            len: end - start,
            perms: perms.to_owned(),
            path,
            anonymous_kib: u64::MAX,
            swap_kib: u64::MAX,
        });
    }
    out
}

/// The mappings whose pages always equal their file: private and file-backed, with no
/// copy-on-write page in them, resident or swapped (a mapping whose smaps entry could not be
/// read is left alone): the code (`r-xp`), and read-only data only where it comes before the
/// code of the same file (headers, constants, unwind tables). Read-only data after the code is
/// RELRO, written by the relocations at start-up and then made read-only: never dropped, even
/// when it looks clean.
fn file_pages(maps: &[Mapping]) -> Vec<(usize, usize)> {
    let mut code_seen: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for m in maps {
        if !m.path.starts_with('/') {
            continue;
        }
        let clean = m.anonymous_kib == 0 && m.swap_kib == 0;
        match m.perms.as_str() {
            "r-xp" => {
                code_seen.push(&m.path);
                if clean {
                    out.push((m.start, m.len));
                }
            }
            "r--p" if clean && !code_seen.contains(&m.path.as_str()) => out.push((m.start, m.len)),
            _ => {}
        }
    }
    out
}

/// The main thread's stack mapping (start, end).
fn stack(maps: &[Mapping]) -> Option<(usize, usize)> {
    maps.iter().find(|m| m.path == "[stack]").map(|m| (m.start, m.start + m.len))
}

/// What the holder gives back before it sleeps, found once: the mappings never change while it
/// runs (nothing maps or unmaps files later).
pub struct Footprint {
    files: Vec<(usize, usize)>,
    stack: Option<(usize, usize)>,
}

impl Default for Footprint {
    fn default() -> Self {
        Footprint::new()
    }
}

impl Footprint {
    /// Reads this process's mappings. Call it on the thread that will call `shed` (the main
    /// thread: the only one whose stack is `[stack]`).
    pub fn new() -> Footprint {
        let maps = fs::read_to_string("/proc/self/smaps").map(|s| mappings(&s)).unwrap_or_default();
        Footprint { files: file_pages(&maps), stack: stack(&maps) }
    }

    /// Gives the pages back until they are used again.
    #[inline(never)]
    pub fn shed(&self) {
        // The heap and the stack first: the code they run would map its pages again.
        trim_heap();
        self.shed_stack();
        for &(start, len) in &self.files {
            // SAFETY: the range is a whole private, read-only, file-backed mapping of this
            // process without a copy-on-write page (checked in smaps at start-up; a read-only
            // mapping cannot be written later). Its pages always equal the file: MADV_DONTNEED
            // only drops their page table entries, and the next access maps the same bytes again
            // from the page cache. No Rust object is modified.
            unsafe {
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED);
            }
        }
    }

    /// Maps the binary's pages into this process's page tables now (`MADV_POPULATE_READ`), so
    /// that the code a request runs does not fault in page by page while a hook waits: for the
    /// spare's ready child, whose first request is a guest start. The pages are the page
    /// cache's, shared with every holder; an older kernel without it just faults them later.
    pub fn populate(&self) {
        for &(start, len) in &self.files {
            // SAFETY: as in `shed`: a whole private, read-only, file-backed mapping of this
            // process; MADV_POPULATE_READ only fills its page table entries, as reads would.
            unsafe {
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_POPULATE_READ);
            }
        }
    }

    /// Gives back only the heap and the dead stack (not the binary's pages): for a process that
    /// must answer fast.
    pub fn shed_anonymous(&self) {
        trim_heap();
        self.shed_stack();
    }

    /// Drops the main thread's stack pages more than `STACK_KEEP` below this frame.
    #[inline(never)]
    fn shed_stack(&self) {
        let Some((start, end)) = self.stack else { return };
        let here = 0u8;
        let sp = std::ptr::addr_of!(here) as usize;
        if sp < start || sp >= end {
            return; // not on the main thread's stack: do nothing
        }
        let page = 4096;
        let top = (sp.saturating_sub(STACK_KEEP)) & !(page - 1);
        if top <= start {
            return;
        }
        // SAFETY: [start, top) lies in this thread's own stack mapping, at least STACK_KEEP
        // below the current frame: the stack grows down, so no live frame, local or signal
        // frame is there (a handler that ran before this call has returned; one that runs after
        // it writes fresh pages). MADV_DONTNEED on private anonymous memory makes the pages read
        // as zeroes when the stack grows into them again, which is how unused stack starts.
        unsafe {
            libc::madvise(start as *mut libc::c_void, top - start, libc::MADV_DONTNEED);
        }
    }
}

/// Returns the allocator's free pages to the kernel.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory the allocator holds free; it takes the
    // allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One malloc arena for every thread of the holder: a thread's own arena keeps pages of its own
/// (the record thread's), which one holder among thousands does not need.
pub fn one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes a tunable of the allocator, before the threads that would use it
    // exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c8a00000-55d0c8aa0000 r--p 00000000 fd:00 1234    /usr/local/sbin/lockhook
Size:                640 kB
Anonymous:             0 kB
Swap:                  0 kB
55d0c8aa0000-55d0c8b9c000 r-xp 000a0000 fd:00 1234    /usr/local/sbin/lockhook
Size:               1008 kB
Anonymous:             0 kB
Swap:                  0 kB
7f0000000000-7f0000001000 r--p 00002000 fd:00 99    /usr/lib/libx.so
Anonymous:             0 kB
Swap:                  0 kB
55d0c8b9c000-55d0c8bb0000 r--p 0019c000 fd:00 1234    /usr/local/sbin/lockhook
Size:                 80 kB
Anonymous:             0 kB
Swap:                 56 kB
55d0c8bb0000-55d0c8bb4000 rw-p 001b0000 fd:00 1234    /usr/local/sbin/lockhook
Anonymous:            16 kB
7f00aa000000-7f00aa021000 rw-p 00000000 00:00 0 
Anonymous:             8 kB
7ffd1b300000-7ffd1b3e1000 rw-p 00000000 00:00 0                          [stack]
Anonymous:            60 kB
7ffd1b3e1000-7ffd1b3e3000 r-xp 00000000 00:00 0    [vdso]
Anonymous:             0 kB
";

    #[test]
    fn drops_only_file_pages_that_equal_the_file() {
        let maps = mappings(SMAPS);
        // The code and the read-only data before it; never RELRO (after the code: relocated,
        // here swapped out), data, the heap or the vdso. Another file's read-only data, before
        // its own code, is dropped too.
        assert_eq!(
            file_pages(&maps),
            vec![(0x55d0c8a00000, 0xa0000), (0x55d0c8aa0000, 0xfc000), (0x7f0000000000, 0x1000)]
        );
        // RELRO that looks clean (nothing copied, nothing swapped) is still kept: it follows the
        // code.
        let clean_relro = SMAPS.replace("Swap:                 56 kB", "Swap:                  0 kB");
        assert!(!file_pages(&mappings(&clean_relro)).contains(&(0x55d0c8b9c000, 0x14000)));
        assert_eq!(stack(&maps), Some((0x7ffd1b300000, 0x7ffd1b3e1000)));
        // A mapping whose Anonymous line is missing is kept.
        let cut = "55d0c8a00000-55d0c8aa0000 r--p 00000000 fd:00 1234    /usr/local/sbin/lockhook\nAnonymous: 0 kB\n";
        assert!(file_pages(&mappings(cut)).is_empty());
    }

    #[test]
    fn shedding_keeps_the_process_working() {
        let footprint = Footprint::new();
        assert!(!footprint.files.is_empty(), "the test binary's own code is file-backed");
        let before: Vec<u64> = (0..1000).collect();
        footprint.shed();
        // Code, read-only data and the heap are intact after their pages were dropped.
        assert_eq!(format!("{}", 6 * 7), "42");
        assert_eq!(before.iter().sum::<u64>(), 499_500);
        assert_eq!(deep(200), 200);
        footprint.shed();
    }

    /// Uses stack (a frame per level), so that pages below a shed frame are used again.
    #[inline(never)]
    fn deep(n: u64) -> u64 {
        let pad = std::hint::black_box([n; 64]);
        if n == 0 {
            0
        } else {
            deep(n - 1) + pad[63] - n + 1
        }
    }
}
