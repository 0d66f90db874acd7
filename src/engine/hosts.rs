//! The host table: which host name each sanlock host id belongs to, so that a refusal names
//! the host holding a lease ("host node7 (host_id 3)") and not only its number. sanlock's own
//! records carry no name lockhook can read through the client library.
//!
//! One sector per host id in the area's second align unit; host N writes only sector N - 1 (at
//! `lockhook sanlock join`), with `O_DIRECT | O_DSYNC`, and every read is `O_DIRECT`: the area
//! is a shared block device, and another host's page cache must not answer for it. A sector is
//! `lockhook-host 1\nid=N\nname=NAME\n` padded with NULs. Anything another host can write is
//! input: a sector that does not parse, names another id, or has a name that is not a plain host
//! name reads as no name.

use std::alloc::{self, Layout};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::area::Area;

const MAGIC: &str = "lockhook-host 1\n";
/// Longest host name kept (the kernel's limit is 64).
const MAX_NAME: usize = 64;

/// A zeroed buffer aligned for `O_DIRECT`.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize, align: usize) -> io::Result<Aligned> {
        let layout = Layout::from_size_align(len.max(align), align).map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: `layout` has a non-zero size (at least `align`, which Layout checked is a
        // power of two and non-zero).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Aligned { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` bytes we allocated, zeroed, and own
        // exclusively through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

fn open(path: &Path, write: bool) -> io::Result<File> {
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    if write {
        flags |= libc::O_DSYNC;
    }
    OpenOptions::new().read(true).write(write).custom_flags(flags).open(path)
}

fn usize_of(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::other("size out of range"))
}

/// Writes this host's sector: `host_id`'s name is `name`.
pub fn write(area: &Area, host_id: u64, name: &str) -> io::Result<()> {
    let sector = usize_of(area.sector)?;
    let mut buf = Aligned::new(sector, sector)?;
    let text = format!("{MAGIC}id={host_id}\nname={name}\n");
    if text.len() > sector || !plain(name) {
        return Err(io::Error::other(format!("host name {name:?} cannot be recorded")));
    }
    buf.as_mut()[..text.len()].copy_from_slice(text.as_bytes());
    let offset = area.hosts_offset() + (host_id - 1) * area.sector;
    open(&area.path, true)?.write_all_at(buf.as_mut(), offset)
}

/// Empties the table (at `init`).
pub fn clear_all(area: &Area) -> io::Result<()> {
    let len = usize_of(area.align)?;
    let mut buf = Aligned::new(len, usize_of(area.sector)?)?;
    open(&area.path, true)?.write_all_at(buf.as_mut(), area.hosts_offset())
}

/// Every host id with a recorded name.
pub fn read_all(area: &Area) -> io::Result<BTreeMap<u64, String>> {
    let sector = usize_of(area.sector)?;
    let hosts = usize_of(area.align / area.sector)?.min(2000);
    let mut buf = Aligned::new(sector * hosts, sector)?;
    let file = open(&area.path, false)?;
    let got = read_full(&file, buf.as_mut(), area.hosts_offset())?;
    let mut names = BTreeMap::new();
    for (i, chunk) in buf.as_mut()[..got].chunks(sector).enumerate() {
        let id = i as u64 + 1;
        if let Some(name) = parse(chunk, id) {
            names.insert(id, name);
        }
    }
    Ok(names)
}

/// The recorded name of `host_id`.
pub fn read_one(area: &Area, host_id: u64) -> io::Result<Option<String>> {
    if host_id == 0 || host_id > 2000 {
        return Ok(None);
    }
    let sector = usize_of(area.sector)?;
    let mut buf = Aligned::new(sector, sector)?;
    let file = open(&area.path, false)?;
    let got = read_full(&file, buf.as_mut(), area.hosts_offset() + (host_id - 1) * area.sector)?;
    Ok(parse(&buf.as_mut()[..got], host_id))
}

/// Reads as much of `buf` as the area has at `offset` (a sparse or short file reads as zeros).
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The name in one sector, if it is a well-formed record for `id`.
fn parse(sector: &[u8], id: u64) -> Option<String> {
    let end = sector.iter().position(|b| *b == 0).unwrap_or(sector.len());
    let text = std::str::from_utf8(&sector[..end]).ok()?;
    let rest = text.strip_prefix(MAGIC)?;
    let mut lines = rest.lines();
    let got_id: u64 = lines.next()?.strip_prefix("id=")?.parse().ok()?;
    let name = lines.next()?.strip_prefix("name=")?;
    (got_id == id && plain(name)).then(|| name.to_owned())
}

/// A host name as the kernel allows it, nothing a terminal or a log line could misread.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sanlock::Geometry;

    fn area(dir: &Path) -> Area {
        let path = dir.join("area");
        std::fs::write(&path, b"").expect("create");
        Area::with_geometry(&path, Geometry::Sector512Align1M).expect("geometry")
    }

    #[test]
    fn names_round_trip_and_hostile_sectors_read_as_none() {
        let dir = tempfile::tempdir().expect("dir");
        let area = area(dir.path());
        assert!(read_all(&area).expect("empty area").is_empty());
        if let Err(e) = write(&area, 3, "node-3.example") {
            // tmpfs before Linux 6.6 has no O_DIRECT; the lease area never lives there.
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            return;
        }
        write(&area, 2000, "last").expect("write");
        assert_eq!(read_one(&area, 3).expect("read").as_deref(), Some("node-3.example"));
        let all = read_all(&area).expect("read");
        assert_eq!(all.into_iter().collect::<Vec<_>>(), vec![(3, "node-3.example".into()), (2000, "last".into())]);
        assert!(write(&area, 4, "bad name\n").is_err());
        // Another host's sector naming a different id, or with a control character, is no name.
        let file = std::fs::OpenOptions::new().write(true).open(&area.path).expect("open");
        file.write_all_at(b"lockhook-host 1\nid=9\nname=liar\n", area.hosts_offset() + 4 * 512).expect("plant");
        file.write_all_at(b"lockhook-host 1\nid=6\nname=a\x1bb\n", area.hosts_offset() + 5 * 512).expect("plant");
        assert_eq!(read_one(&area, 5).expect("read"), None);
        assert_eq!(read_one(&area, 6).expect("read"), None);
        assert_eq!(read_one(&area, 0).expect("read"), None);
    }

    #[test]
    fn parse_is_strict() {
        assert_eq!(parse(b"lockhook-host 1\nid=1\nname=a\n\0\0", 1).as_deref(), Some("a"));
        assert_eq!(parse(b"lockhook-host 2\nid=1\nname=a\n", 1), None);
        assert_eq!(parse(b"lockhook-host 1\nid=x\nname=a\n", 1), None);
        assert_eq!(parse(&[0xff; 512], 1), None);
        assert_eq!(parse(&[0; 512], 1), None);
    }
}
