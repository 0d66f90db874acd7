//! Reads a qcow2 image's backing file name (and format) from its header, so a chain libvirt has
//! not detected yet (the `prepare` XML has none) can be locked before QEMU opens it.
//!
//! Header layout (big endian, QEMU docs/interop/qcow2.txt): magic `QFI\xfb` at 0, version at 4,
//! backing_file_offset (u64) at 8, backing_file_size (u32) at 16; version 3 has header_length
//! (u32) at 100, version 2 headers are 72 bytes. Header extensions follow the header: type (u32),
//! length (u32), data padded to 8 bytes; type 0xE2792ACA is the backing file format, 0x44415441
//! the external data file name.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// "DATA": the external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_END: u32 = 0;
/// QEMU refuses backing file names longer than this.
const MAX_NAME: u32 = 1023;
/// Header extensions live in the first cluster; never read further than this.
const MAX_HEADER: u64 = 64 * 1024;

/// What the header says about the image below this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The name as written in the header (may be relative, or a protocol string).
    pub name: String,
    /// The backing format from the header extension, when present.
    pub format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Opens an image to read its header: only a regular file or block device, checked before it is
/// opened (a header can name `/dev/watchdog` as its backing file; opening that arms it).
fn open(path: &Path) -> io::Result<Option<File>> {
    crate::lock::open_readable(path)
}

/// What a qcow2 header says about the files QEMU opens besides the image itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The image below this one.
    pub backing: Option<BackingRef>,
    /// The external data file (`qemu-img create -o data_file=...`): where the guest's data
    /// clusters live, written as the image is. Named like a backing file (may be relative).
    pub data_file: Option<String>,
}

/// Reads the backing reference of a qcow2 image; `Ok(None)` when it has none or is not qcow2.
pub fn backing_of(path: &Path) -> io::Result<Option<BackingRef>> {
    Ok(read_header(path)?.and_then(|h| h.backing))
}

/// Reads the parts of a qcow2 header lockhook needs; `Ok(None)` when the file is not qcow2.
pub fn read_header(path: &Path) -> io::Result<Option<Header>> {
    let Some(mut file) = open(path)? else { return Ok(None) };
    let mut header = [0u8; 104];
    let got = read_up_to(&mut file, &mut header)?;
    if got < 72 || &header[..4] != MAGIC {
        return Ok(None);
    }
    let version = be32(&header, 4);
    let name_offset = be64(&header, 8);
    let name_size = be32(&header, 16);
    let header_len = if version >= 3 && got >= 104 { u64::from(be32(&header, 100)) } else { 72 };
    let has_backing = name_offset != 0 && name_size != 0;
    if has_backing && (name_size > MAX_NAME || name_offset > MAX_HEADER) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "qcow2 backing file name out of range"));
    }
    // Extensions end at the end marker, and never run into the backing file name.
    let limit = if has_backing { name_offset } else { MAX_HEADER };
    let ext = read_extensions(&mut file, header_len, limit)?;
    let backing = if has_backing {
        let mut name = vec![0u8; name_size as usize];
        file.seek(SeekFrom::Start(name_offset))?;
        file.read_exact(&mut name)?;
        let name = String::from_utf8(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "qcow2 backing file name is not UTF-8"))?;
        Some(BackingRef { name, format: ext.backing_format })
    } else {
        None
    };
    Ok(Some(Header { backing, data_file: ext.data_file }))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<String>,
}

fn read_extensions(file: &mut File, header_len: u64, limit: u64) -> io::Result<Extensions> {
    let mut found = Extensions::default();
    let mut at = header_len;
    let end = limit.min(MAX_HEADER);
    while at + 8 <= end {
        let mut ext = [0u8; 8];
        file.seek(SeekFrom::Start(at))?;
        if read_up_to(file, &mut ext)? < 8 {
            break;
        }
        let (kind, len) = (be32(&ext, 0), u64::from(be32(&ext, 4)));
        if kind == EXT_END {
            break;
        }
        let wanted = match kind {
            EXT_BACKING_FORMAT if len <= 64 => Some(&mut found.backing_format),
            EXT_DATA_FILE if len <= u64::from(MAX_NAME) => Some(&mut found.data_file),
            _ => None,
        };
        if let Some(slot) = wanted {
            let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
            file.read_exact(&mut data)?;
            let text = String::from_utf8(data)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "qcow2 header extension is not UTF-8"))?;
            *slot = Some(text);
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(found)
}

/// Where the backing name points to, as QEMU would open it: relative names are relative to the
/// directory of the overlay. Protocol names (`nbd:`, `json:`, `http://`...) give `None`.
pub fn resolve_name(overlay: &Path, name: &str) -> Option<PathBuf> {
    let is_protocol = name.starts_with("json:")
        || name.contains("://")
        || (!name.starts_with('/') && name.split_once(':').is_some_and(|(p, _)| !p.contains('/')));
    if is_protocol {
        return None;
    }
    let path = Path::new(name);
    if path.is_absolute() {
        Some(path.to_owned())
    } else {
        Some(overlay.parent().unwrap_or(Path::new("/")).join(path))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal qcow2 v3 header with a backing name and optional format extension.
    pub(crate) fn write_qcow2(path: &Path, backing: Option<(&str, Option<&str>)>) {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        if let Some((name, format)) = backing {
            let mut at = 104usize;
            if let Some(fmt) = format {
                h[at..at + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
                h[at + 4..at + 8].copy_from_slice(&u32::try_from(fmt.len()).expect("short").to_be_bytes());
                h[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
                at += 8 + fmt.len().div_ceil(8) * 8;
            }
            h[at..at + 8].copy_from_slice(&[0; 8]);
            let off = 256usize;
            h[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            h[16..20].copy_from_slice(&u32::try_from(name.len()).expect("short").to_be_bytes());
            h[off..off + name.len()].copy_from_slice(name.as_bytes());
        }
        std::fs::write(path, h).expect("write qcow2");
    }

    #[test]
    fn reads_backing_and_format() {
        let dir = tempfile::tempdir().expect("dir");
        let top = dir.path().join("top.qcow2");
        write_qcow2(&top, Some(("base image.raw", Some("raw"))));
        let r = backing_of(&top).expect("read").expect("has backing");
        assert_eq!(r, BackingRef { name: "base image.raw".into(), format: Some("raw".into()) });
        assert_eq!(resolve_name(&top, &r.name), Some(dir.path().join("base image.raw")));
        let plain = dir.path().join("plain.qcow2");
        write_qcow2(&plain, None);
        assert_eq!(backing_of(&plain).expect("read"), None);
        assert_eq!(read_header(&plain).expect("probe"), Some(Header::default()), "qcow2 without backing");
        let raw = dir.path().join("raw");
        std::fs::write(&raw, b"hello").expect("write");
        assert_eq!(backing_of(&raw).expect("read"), None);
        assert_eq!(read_header(&raw).expect("probe"), None, "not qcow2");
    }

    #[test]
    fn reads_the_external_data_file_written_by_qemu_img() {
        let dir = tempfile::tempdir().expect("dir");
        let img = dir.path().join("img.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "data_file=data file.raw,data_file_raw=on"])
            .arg(&img)
            .arg("1M")
            .current_dir(dir.path())
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let header = read_header(&img).expect("read").expect("qcow2");
        assert_eq!(header.data_file.as_deref(), Some("data file.raw"));
        assert_eq!(header.backing, None);
    }

    #[test]
    fn protocol_names_are_not_paths() {
        let top = Path::new("/i/top.qcow2");
        assert_eq!(resolve_name(top, "nbd://host/x"), None);
        assert_eq!(resolve_name(top, "json:{\"file\":{}}"), None);
        assert_eq!(resolve_name(top, "nbd:unix:/s"), None);
        assert_eq!(resolve_name(top, "/abs/b.qcow2"), Some(PathBuf::from("/abs/b.qcow2")));
        assert_eq!(resolve_name(top, "sub/b:c.qcow2"), Some(PathBuf::from("/i/sub/b:c.qcow2")));
    }
}
