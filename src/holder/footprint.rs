//! Keeping an idle holder small.
//!
//! A host may run hundreds of holders. Each is mostly asleep in `poll`, but the code pages it
//! touched while starting (config and XML parsing, JSON, socket set-up) stay mapped and count in
//! its resident set and PSS, although the idle loop never runs them again. Dropping the page
//! table entries of the executable mappings (`madvise(MADV_DONTNEED)`) gives that back: the pages
//! stay in the page cache, shared, and the few the idle loop needs fault back in on their next
//! use (a minor fault each). The holder does this after every tick, so between ticks an idle
//! holder maps almost none of its code.

use std::fs;

/// The file-backed executable mappings of this process, as (start, length).
fn code_mappings(maps: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // "55d0c8a00000-55d0c8b9c000 r-xp 00052000 fd:00 1234    /usr/local/sbin/lockhook"
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?;
            if perms != "r-xp" || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end - start))
        })
        .collect()
}

/// The executable mappings of this process, read once: they never change while it runs.
pub struct CodePages {
    ranges: Vec<(usize, usize)>,
}

impl Default for CodePages {
    fn default() -> Self {
        CodePages::new()
    }
}

impl CodePages {
    pub fn new() -> CodePages {
        CodePages { ranges: fs::read_to_string("/proc/self/maps").map(|maps| code_mappings(&maps)).unwrap_or_default() }
    }

    /// Unmaps these pages until they are used again (two `madvise` calls per mapping).
    pub fn shed(&self) {
        for &(start, len) in &self.ranges {
            // SAFETY: the range is a whole private, read+execute, file-backed mapping of this
            // process (from /proc/self/maps at start-up; nothing maps or unmaps code later). Such
            // pages are never written (no text relocations in a PIE), so they always equal the
            // file; MADV_DONTNEED only drops their page table entries, and the next instruction
            // fetch maps the same bytes again from the page cache. No Rust object lives there.
            unsafe {
                libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_file_backed_code() {
        let maps = "55d0c8a00000-55d0c8b9c000 r-xp 00052000 fd:00 1234    /usr/local/sbin/lockhook\n\
                    55d0c8b9c000-55d0c8bb0000 r--p 001ee000 fd:00 1234    /usr/local/sbin/lockhook\n\
                    7f00aa000000-7f00aa021000 rw-p 00000000 00:00 0 \n\
                    7ffd1b3e1000-7ffd1b3e3000 r-xp 00000000 00:00 0    [vdso]\n";
        assert_eq!(code_mappings(maps), vec![(0x55d0c8a00000, 0x19c000)]);
    }

    #[test]
    fn shedding_keeps_the_process_working() {
        CodePages::new().shed();
        // Code runs on after its pages were dropped: they fault back in.
        assert_eq!(format!("{}", 6 * 7), "42");
        assert!(!code_mappings(&fs::read_to_string("/proc/self/maps").expect("maps")).is_empty());
    }
}
