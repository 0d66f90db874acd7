//! `/proc/locks`, the kernel's list of every file lock on the host, parsed in one place.
//!
//! ```text
//! 1: POSIX  ADVISORY  WRITE 1234 fd:01:5678 0 EOF
//! 2: OFDLCK ADVISORY  READ  -1 fd:01:5679 100 104
//! 3: -> POSIX  ADVISORY  WRITE 99 fd:01:5678 0 EOF     (a waiter, after the lock it waits for)
//! ```
//! OFD locks show pid -1 (they belong to an open file, not a process), POSIX locks their
//! process. Reading the file takes the kernel's file-lock machinery for the whole host, so it is
//! read at most once per question, never per lock.

use super::LockMode;

/// One granted lock (waiters are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: LockMode,
    /// The locking process, for POSIX and flock locks; `None` for OFD locks.
    pub pid: Option<u32>,
    pub dev: (u32, u32),
    pub ino: u64,
    pub start: u64,
    /// The last byte, `None` for "to the end of the file".
    pub end: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Posix,
    Ofd,
    Flock,
    Other,
}

impl Entry {
    pub fn covers(&self, byte: u64) -> bool {
        self.start <= byte && self.end.is_none_or(|end| end >= byte)
    }
}

/// The granted locks in `text` (the contents of `/proc/locks`); lines it cannot read are
/// skipped.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines().filter_map(parse_line).collect()
}

/// Reads `/proc/locks` once; `None` when it cannot be read.
pub fn read() -> Option<Vec<Entry>> {
    std::fs::read_to_string("/proc/locks").ok().map(|text| parse(&text))
}

fn parse_line(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 || f[1] == "->" {
        return None;
    }
    let kind = match f[1] {
        "POSIX" => Kind::Posix,
        "OFDLCK" => Kind::Ofd,
        "FLOCK" => Kind::Flock,
        _ => Kind::Other,
    };
    let mode = match f[3] {
        "WRITE" => LockMode::Exclusive,
        "READ" => LockMode::Shared,
        _ => return None,
    };
    let pid = f[4].parse::<u32>().ok();
    let mut id = f[5].splitn(3, ':');
    let major = u32::from_str_radix(id.next()?, 16).ok()?;
    let minor = u32::from_str_radix(id.next()?, 16).ok()?;
    let ino = id.next()?.parse().ok()?;
    let start = f[6].parse().ok()?;
    let end = if f[7] == "EOF" { None } else { Some(f[7].parse().ok()?) };
    Some(Entry { kind, mode, pid, dev: (major, minor), ino, start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_waiters_are_left_out() {
        let text = "1: POSIX  ADVISORY  WRITE 1234 fd:01:5678 0 EOF\n\
                    2: OFDLCK ADVISORY  READ  -1 103:1a:5679 100 104\n\
                    3: -> POSIX  ADVISORY  WRITE 99 fd:01:5678 0 EOF\n\
                    4: FLOCK  ADVISORY  WRITE 7 00:2f:12 0 EOF\n\
                    garbage\n";
        let got = parse(text);
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            Entry {
                kind: Kind::Posix,
                mode: LockMode::Exclusive,
                pid: Some(1234),
                dev: (0xfd, 1),
                ino: 5678,
                start: 0,
                end: None
            }
        );
        assert_eq!((got[1].kind, got[1].pid, got[1].dev, got[1].end), (Kind::Ofd, None, (0x103, 0x1a), Some(104)));
        assert!(got[1].covers(100) && got[1].covers(104) && !got[1].covers(105) && !got[1].covers(99));
        assert_eq!(got[2].kind, Kind::Flock);
    }
}
