//! Counters since boot, for `lockhook metrics`: refused starts and re-adoptions on this host.
//! Kept in `<run_dir>/counters` (a tmpfs: it starts at zero with the host), one `name value`
//! line each, updated under an OFD lock of the file by the hook calls and passes that count:
//! only on the paths that refuse or re-adopt, never on a start that goes through.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;

use crate::lock::LockMode;
use crate::paths::Paths;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Guest starts (`prepare`/`start`) lockhook refused.
    Refusals,
    /// Running guests whose holder died, re-adopted by a new holder.
    Readoptions,
}

impl Counter {
    pub fn name(self) -> &'static str {
        match self {
            Counter::Refusals => "refusals",
            Counter::Readoptions => "readoptions",
        }
    }
}

const ALL: [Counter; 2] = [Counter::Refusals, Counter::Readoptions];

fn open(paths: &Paths) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(paths.run_dir().join("counters"))
}

fn parse(text: &str) -> [u64; 2] {
    let mut values = [0u64; 2];
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(value)) = (words.next(), words.next()) else { continue };
        if let (Some(i), Ok(v)) = (ALL.iter().position(|c| c.name() == name), value.parse()) {
            values[i] = v;
        }
    }
    values
}

/// Adds `n` to `counter`. Best effort: a failure is logged, never in a caller's way.
pub fn add(paths: &Paths, counter: Counter, n: u64) {
    if n == 0 {
        return;
    }
    let result = (|| -> io::Result<()> {
        let mut file = open(paths)?;
        crate::lock::lock_wait_fd(&file, LockMode::Exclusive, 0)?;
        let mut text = String::new();
        Read::by_ref(&mut file).take(4096).read_to_string(&mut text)?;
        let mut values = parse(&text);
        let i = ALL.iter().position(|c| *c == counter).unwrap_or(0);
        values[i] = values[i].saturating_add(n);
        let body: String = ALL.iter().zip(values).map(|(c, v)| format!("{} {v}\n", c.name())).collect();
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(body.as_bytes())
    })();
    if let Err(e) = result {
        log::warn!("cannot count {}: {e}", counter.name());
    }
}

/// Every counter's value (zero when never counted).
pub fn read(paths: &Paths) -> Vec<(Counter, u64)> {
    let text = std::fs::read_to_string(paths.run_dir().join("counters")).unwrap_or_default();
    ALL.iter().copied().zip(parse(&text)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_junk_reads_as_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let paths = Paths::new(dir.path());
        assert_eq!(read(&paths), vec![(Counter::Refusals, 0), (Counter::Readoptions, 0)]);
        add(&paths, Counter::Refusals, 2);
        add(&paths, Counter::Refusals, 1);
        add(&paths, Counter::Readoptions, 1);
        assert_eq!(read(&paths), vec![(Counter::Refusals, 3), (Counter::Readoptions, 1)]);
        std::fs::write(dir.path().join("counters"), "refusals x\nother 9\n").expect("junk");
        assert_eq!(read(&paths), vec![(Counter::Refusals, 0), (Counter::Readoptions, 0)]);
    }
}
