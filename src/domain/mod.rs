//! The validated view of a libvirt domain: its name, UUID, disks and leases.
//!
//! libvirt passes the full domain XML on the hook's stdin. At `prepare` it is the inactive
//! definition (no detected backing chain, volumes not yet resolved); by `start` libvirt has added
//! the detected `<backingStore>` chain. Either way only the parts below matter to lockhook.
//!
//! Size: about 430 lines of code; the other 210 are its unit tests, kept beside what they test.

mod xml;

use std::fmt;
use std::path::PathBuf;

use quick_xml::events::Event;
use quick_xml::Reader;
use serde::{Deserialize, Serialize};

use self::xml::{RawBackingStore, RawDisk, RawDomain, RawLease, RawOs, RawSource, RawStatus};

/// Domain XML larger than this is refused before parsing (a real one is a few KiB).
pub const MAX_XML_BYTES: usize = 16 << 20;
/// Elements nested deeper than this are refused (a backing chain is one level per image).
pub const MAX_DEPTH: usize = 256;
/// Elements with more attributes than this are refused: libvirt's have a handful, and the XML
/// parser's duplicate-attribute check is quadratic in their number.
pub const MAX_ATTRIBUTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain XML is empty")]
    Empty,
    #[error("domain XML is larger than {MAX_XML_BYTES} bytes")]
    TooLarge,
    #[error("domain XML nests elements deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("domain XML has an element with more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes,
    #[error("domain XML has a <!DOCTYPE> (libvirt never writes one)")]
    DocType,
    #[error("domain XML is not valid UTF-8")]
    NotUtf8,
    #[error("domain XML is malformed: {0}")]
    Malformed(String),
    #[error("domain XML has no <name>")]
    MissingName,
    #[error("domain XML has no <uuid>")]
    MissingUuid,
    #[error("domain XML has an invalid <uuid> {0:?}")]
    InvalidUuid(String),
    #[error("<lease> {index} has no <key>")]
    LeaseMissingKey { index: usize },
    #[error("<lease> {key:?} has no <target path=...>")]
    LeaseMissingTarget { key: String },
    #[error("<lease> {key:?} has an invalid offset {offset:?}")]
    LeaseBadOffset { key: String, offset: String },
}

/// A domain UUID in canonical form (lowercase, dashed). Only a parsed UUID ever becomes part of a
/// path, so `../` and friends cannot reach the filesystem through it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Uuid(String);

impl Uuid {
    /// A new random (version 4) UUID, from `/dev/urandom`.
    pub fn random() -> std::io::Result<Uuid> {
        use std::io::Read;
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let text = format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
        Uuid::parse(&text).map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Accepts `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` or 32 hex digits (both forms libvirt
    /// accepts) with optional surrounding whitespace.
    pub fn parse(text: &str) -> Result<Uuid, DomainError> {
        let trimmed = text.trim();
        let hex: String = trimmed.chars().filter(|c| *c != '-').collect();
        let dashes_ok = trimmed.len() == 32
            || (trimmed.len() == 36 && [8, 13, 18, 23].iter().all(|&i| trimmed.as_bytes()[i] == b'-'));
        if hex.len() != 32 || !dashes_ok || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(DomainError::InvalidUuid(text.chars().take(64).collect()));
        }
        let hex = hex.to_ascii_lowercase();
        Ok(Uuid(format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Uuid {
    type Error = DomainError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Uuid::parse(&value)
    }
}

impl From<Uuid> for String {
    fn from(value: Uuid) -> Self {
        value.0
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: Uuid,
    pub disks: Vec<Disk>,
    pub leases: Vec<Lease>,
    /// The firmware images QEMU opens: the UEFI code (`<loader>`) and variable store (`<nvram>`).
    pub firmware: Vec<Firmware>,
    /// Files backing guest memory the guest writes (`<memory model='nvdimm|virtio-pmem'>`).
    pub memory_files: Vec<PathBuf>,
}

/// A firmware image in `<os>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub kind: FirmwareKind,
    pub source: Source,
    /// QEMU only reads it (`<loader readonly='yes'>`, a ROM); the variable store is written.
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwareKind {
    Loader,
    Nvram,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `<target dev>`, e.g. `vda`; used in messages only.
    pub target: Option<String>,
    /// `<disk device>`: disk, cdrom, floppy, lun.
    pub device: String,
    pub source: Source,
    /// `<driver type>`: qcow2, raw, ... (None when not given).
    pub format: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    /// `startupPolicy='optional'`: libvirt drops the disk when its source is missing.
    pub optional: bool,
    /// The chain from `<backingStore>`: `None` when the XML says nothing (it must be read from
    /// the image header), `Some(vec![])` for an explicit empty `<backingStore/>`.
    pub backing: Option<Vec<Backing>>,
    /// The destination of a running block copy (`<mirror>`, in libvirt's status XML).
    pub mirror: Option<Source>,
    /// `<source><dataStore>` (libvirt 10.10+): the qcow2 image's external data file.
    pub data_store: Option<Source>,
    /// `<transient/>`: libvirt puts an overlay on the image for the guest's life and discards
    /// it; with `shareBacking='yes'` the image itself is opened read-only and may be shared.
    pub transient: Option<Transient>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transient {
    pub share_backing: bool,
}

/// One image below a disk in its backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub source: Source,
    pub format: Option<String>,
}

/// Where a disk's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Block(PathBuf),
    Volume {
        pool: String,
        volume: String,
    },
    Network {
        protocol: String,
        name: Option<String>,
        hosts: Vec<NetworkHost>,
    },
    /// `type='dir'`, `nvme`, `vhostuser`, ...: nothing lockhook can lock.
    Unsupported(String),
    /// No `<source>` (an empty cdrom drive).
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkHost {
    pub name: Option<String>,
    pub port: Option<String>,
    pub transport: Option<String>,
    pub socket: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub lockspace: Option<String>,
    pub key: String,
    pub path: PathBuf,
    pub offset: u64,
}

impl Domain {
    /// Parses domain XML from the hook's stdin. Bounded: the size is capped before parsing, the
    /// nesting depth in a streaming pre-pass (serde recursion would otherwise follow a hostile
    /// `<backingStore>` chain until the stack overflows), and DTD entities are never expanded
    /// (quick-xml does not implement them; an undefined entity is an error).
    pub fn parse(bytes: &[u8]) -> Result<Domain, DomainError> {
        let (text, depth) = Self::checked_text(bytes)?;
        let raw: RawDomain = deserialize(text, depth)?;
        Domain::from_raw(raw)
    }

    /// Only the UUID: the first `<uuid>` child of the root element, read up to there and no
    /// further (what `release` needs: deserializing every device costs 0.6 ms for 256 disks).
    /// What it reads is checked as `parse` checks it (size, UTF-8, no DTD, depth).
    pub fn parse_uuid(bytes: &[u8]) -> Result<Uuid, DomainError> {
        let text = Self::bounded_text(bytes)?;
        let mut reader = Reader::from_str(text);
        let mut depth = 0usize;
        // The text of the root's `<uuid>` child while inside it.
        let mut uuid: Option<String> = None;
        loop {
            match reader.read_event() {
                Ok(Event::Start(e)) => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(DomainError::TooDeep);
                    }
                    if depth == 2 && e.local_name().as_ref() == b"uuid" {
                        uuid = Some(String::new());
                    } else if uuid.is_some() {
                        return Err(DomainError::Malformed("an element inside <uuid>".to_owned()));
                    }
                }
                Ok(Event::Empty(_)) if uuid.is_some() => {
                    return Err(DomainError::Malformed("an element inside <uuid>".to_owned()));
                }
                Ok(Event::Text(t)) => {
                    if let Some(uuid) = &mut uuid {
                        uuid.push_str(&t.unescape().map_err(|e| DomainError::Malformed(one_line(&e.to_string())))?);
                    }
                }
                Ok(Event::End(_)) => match uuid.take() {
                    Some(text) => return Uuid::parse(&text),
                    None => depth = depth.saturating_sub(1),
                },
                Ok(Event::DocType(_)) => return Err(DomainError::DocType),
                Ok(Event::Eof) => return Err(DomainError::MissingUuid),
                Ok(_) => {}
                Err(e) => return Err(DomainError::Malformed(one_line(&e.to_string()))),
            }
        }
    }

    /// Parses libvirt's status file of a running guest: `<domstatus ...><domain>...</domain>`.
    pub fn parse_status(bytes: &[u8]) -> Result<Domain, DomainError> {
        let (text, depth) = Self::checked_text(bytes)?;
        let raw: RawStatus = deserialize(text, depth)?;
        Domain::from_raw(raw.domain.ok_or(DomainError::Malformed("no <domain> in <domstatus>".to_owned()))?)
    }

    /// The text and its nesting depth, once both are within bounds.
    fn checked_text(bytes: &[u8]) -> Result<(&str, usize), DomainError> {
        let text = Self::bounded_text(bytes)?;
        let depth = check_depth(text)?;
        Ok((text, depth))
    }

    /// The text, once it is within the size bound, UTF-8 and not blank.
    fn bounded_text(bytes: &[u8]) -> Result<&str, DomainError> {
        if bytes.len() > MAX_XML_BYTES {
            return Err(DomainError::TooLarge);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DomainError::NotUtf8)?;
        if text.trim().is_empty() {
            return Err(DomainError::Empty);
        }
        Ok(text)
    }

    fn from_raw(raw: RawDomain) -> Result<Domain, DomainError> {
        let name = raw.name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).ok_or(DomainError::MissingName)?;
        let uuid = Uuid::parse(raw.uuid.as_deref().ok_or(DomainError::MissingUuid)?)?;
        let devices = raw.devices.unwrap_or_default();
        let disks = devices.disks.into_iter().map(disk_from_raw).collect();
        let firmware = firmware_from_raw(raw.os.unwrap_or_default());
        let memory_files = devices
            .memory
            .into_iter()
            .filter(|m| matches!(m.model.as_deref(), Some("nvdimm" | "virtio-pmem")))
            .filter_map(|m| non_empty(m.source?.path.map(|p| p.trim().to_owned())))
            .map(PathBuf::from)
            .collect();
        let leases = devices
            .leases
            .into_iter()
            .enumerate()
            .map(|(index, lease)| lease_from_raw(index, lease))
            .collect::<Result<_, _>>()?;
        Ok(Domain { name, uuid, disks, leases, firmware, memory_files })
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Documents nested deeper than this are deserialized on a thread with `DEEP_STACK` of stack:
/// serde follows a `<backingStore>` chain (up to libvirt's 200 images) by recursion, a few KiB
/// of stack per level in a debug build, more than a test thread's 2 MiB.
const SHALLOW: usize = 32;
const DEEP_STACK: usize = 64 << 20;

fn deserialize<T: for<'de> serde::Deserialize<'de> + Send>(text: &str, depth: usize) -> Result<T, DomainError> {
    let parse =
        |text: &str| quick_xml::de::from_str(text).map_err(|e| DomainError::Malformed(one_line(&e.to_string())));
    if depth <= SHALLOW {
        return parse(text);
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("parse".into())
            .stack_size(DEEP_STACK)
            .spawn_scoped(scope, || parse(text))
            .map_err(|e| DomainError::Malformed(format!("cannot start the parser thread: {e}")))?
            .join()
            .unwrap_or_else(|_| Err(DomainError::Malformed("the XML parser panicked".to_owned())))
    })
}

/// Checks nesting depth and attribute counts; returns the deepest nesting seen.
fn check_depth(text: &str) -> Result<usize, DomainError> {
    let mut reader = Reader::from_str(text);
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let too_many =
        |e: &quick_xml::events::BytesStart<'_>| e.attributes().with_checks(false).nth(MAX_ATTRIBUTES).is_some();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                depth += 1;
                deepest = deepest.max(depth);
                if depth > MAX_DEPTH {
                    return Err(DomainError::TooDeep);
                }
                if too_many(&e) {
                    return Err(DomainError::TooManyAttributes);
                }
            }
            Ok(Event::Empty(e)) if too_many(&e) => return Err(DomainError::TooManyAttributes),
            // DTDs are never expanded, and one inside text trips the parser (quick-xml #964).
            Ok(Event::DocType(_)) => return Err(DomainError::DocType),
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Eof) => return Ok(deepest),
            Ok(_) => {}
            Err(e) => return Err(DomainError::Malformed(one_line(&e.to_string()))),
        }
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

fn source_from_raw(kind: &str, source: Option<RawSource>) -> (Source, bool) {
    let Some(source) = source else { return (Source::Empty, false) };
    let optional = source.startup_policy.as_deref() == Some("optional");
    let parsed = match kind {
        "file" => non_empty(source.file).map(|f| Source::File(f.into())),
        "block" => non_empty(source.dev).map(|d| Source::Block(d.into())),
        "volume" => match (non_empty(source.pool), non_empty(source.volume)) {
            (Some(pool), Some(volume)) => Some(Source::Volume { pool, volume }),
            _ => None,
        },
        "network" => non_empty(source.protocol).map(|protocol| Source::Network {
            protocol,
            name: non_empty(source.name),
            hosts: source
                .hosts
                .into_iter()
                .map(|h| NetworkHost { name: h.name, port: h.port, transport: h.transport, socket: h.socket })
                .collect(),
        }),
        other => Some(Source::Unsupported(other.to_owned())),
    };
    (parsed.unwrap_or(Source::Empty), optional)
}

fn firmware_from_raw(os: RawOs) -> Vec<Firmware> {
    let mut out = Vec::new();
    if let Some(loader) = os.loader {
        if let Some(path) = non_empty(loader.path.map(|p| p.trim().to_owned())) {
            // A ROM, or pflash marked read-only, is only read; pflash without readonly='yes' is
            // written by the guest.
            let readonly = loader.readonly.as_deref() == Some("yes")
                || (loader.readonly.is_none() && loader.kind.as_deref() != Some("pflash"));
            out.push(Firmware { kind: FirmwareKind::Loader, source: Source::File(path.into()), readonly });
        }
    }
    if let Some(nvram) = os.nvram {
        let source = match (nvram.source, non_empty(nvram.path.map(|p| p.trim().to_owned()))) {
            (Some(src), _) => source_from_raw(nvram.kind.as_deref().unwrap_or("file"), Some(src)).0,
            (None, Some(path)) => Source::File(path.into()),
            (None, None) => Source::Empty,
        };
        if source != Source::Empty {
            out.push(Firmware { kind: FirmwareKind::Nvram, source, readonly: false });
        }
    }
    out
}

fn backing_from_raw(raw: Option<RawBackingStore>) -> Option<Vec<Backing>> {
    let mut next = raw?;
    let mut chain = Vec::new();
    loop {
        let kind = next.kind.clone().unwrap_or_else(|| "file".to_owned());
        let (source, _) = source_from_raw(&kind, next.source.take());
        if source == Source::Empty {
            // `<backingStore/>`: the end of the chain.
            return Some(chain);
        }
        chain.push(Backing { source, format: next.format.and_then(|f| f.kind) });
        match next.backing_store {
            Some(deeper) => next = *deeper,
            // A chain written by hand may stop without `<backingStore/>`: it ends here too.
            None => return Some(chain),
        }
    }
}

fn disk_from_raw(mut raw: RawDisk) -> Disk {
    let kind = raw.kind.unwrap_or_else(|| "file".to_owned());
    let device = raw.device.unwrap_or_else(|| "disk".to_owned());
    let data_store = raw.source.as_mut().and_then(|s| s.data_store.take()).and_then(|ds| {
        let source = ds.source?;
        match ds.kind.as_deref().unwrap_or("file") {
            "block" => non_empty(source.dev).map(|d| Source::Block(d.into())),
            _ => non_empty(source.file).map(|f| Source::File(f.into())),
        }
    });
    let (source, optional) = source_from_raw(&kind, raw.source);
    Disk {
        target: raw.target.and_then(|t| t.dev),
        readonly: raw.readonly.is_some() || device == "cdrom",
        device,
        source,
        format: raw.driver.and_then(|d| d.kind),
        shareable: raw.shareable.is_some(),
        optional,
        backing: backing_from_raw(raw.backing_store),
        data_store,
        transient: raw.transient.map(|t| Transient { share_backing: t.share_backing.as_deref() == Some("yes") }),
        mirror: raw.mirror.and_then(|m| {
            let kind = m.kind.unwrap_or_else(|| "file".to_owned());
            match (source_from_raw(&kind, m.source).0, m.file) {
                (Source::Empty, Some(file)) if !file.is_empty() => Some(Source::File(file.into())),
                (Source::Empty, _) => None,
                (source, _) => Some(source),
            }
        }),
    }
}

fn lease_from_raw(index: usize, raw: RawLease) -> Result<Lease, DomainError> {
    let key =
        raw.key.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).ok_or(DomainError::LeaseMissingKey { index })?;
    let target = raw.target.unwrap_or_default();
    let path = non_empty(target.path).ok_or_else(|| DomainError::LeaseMissingTarget { key: key.clone() })?;
    let offset = match target.offset {
        None => 0,
        Some(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| DomainError::LeaseBadOffset { key: key.clone(), offset: text.chars().take(64).collect() })?,
    };
    Ok(Lease { lockspace: non_empty(raw.lockspace.map(|l| l.trim().to_owned())), key, path: path.into(), offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parse_uuid` finds what `parse` finds in every fixture, and stops at the UUID: what
    /// follows it is not read (a broken tail), what precedes it is (checked as `parse` does).
    #[test]
    fn the_uuid_alone_is_the_parsed_one() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/domains");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("fixtures") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "xml") {
                let bytes = std::fs::read(&path).expect("read");
                let full = Domain::parse(&bytes).expect("parse").uuid;
                assert_eq!(Domain::parse_uuid(&bytes).expect("uuid"), full, "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 5);
        let uuid = "6A1B2C3D-0000-4000-8000-000000000001";
        let domain = |inner: &str| format!("<domain type='kvm'><name>g</name>{inner}</domain>");
        let canonical = Uuid::parse(uuid).expect("uuid");
        let ok = |xml: &str| Domain::parse_uuid(xml.as_bytes());
        assert_eq!(ok(&domain(&format!("<uuid> {uuid} </uuid><devices><disk"))).expect("tail"), canonical);
        assert_eq!(
            ok(&domain(&format!(
                "<metadata><uuid>00000000-0000-4000-8000-00000000dead</uuid></metadata><uuid>{uuid}</uuid>"
            )))
            .expect("not the nested one"),
            canonical
        );
        assert!(matches!(ok(&domain("<devices/>")), Err(DomainError::MissingUuid)));
        assert!(matches!(ok(&domain("<uuid>../../etc</uuid>")), Err(DomainError::InvalidUuid(_))));
        assert!(matches!(ok(&domain(&format!("<uuid><b/>{uuid}</uuid>"))), Err(DomainError::Malformed(_))));
        assert!(matches!(ok("<!DOCTYPE d [<!ENTITY x 'y'>]><domain/>"), Err(DomainError::DocType)));
        assert!(matches!(ok("  "), Err(DomainError::Empty)));
        assert!(matches!(Domain::parse_uuid(b"<domain>\xff</domain>"), Err(DomainError::NotUtf8)));
        let deep = format!("<domain>{}<uuid>{uuid}</uuid></domain>", "<a>".repeat(MAX_DEPTH + 1));
        assert!(matches!(ok(&deep), Err(DomainError::TooDeep)));
        let big = vec![b' '; MAX_XML_BYTES + 1];
        assert!(matches!(Domain::parse_uuid(&big), Err(DomainError::TooLarge)));
    }

    const UUID: &str = "f3fa73d4-1c2b-4e5f-8a9b-0123456789ab";

    fn domain(devices: &str) -> String {
        format!("<domain type='kvm'><name>vm1</name><uuid>{UUID}</uuid><devices>{devices}</devices></domain>")
    }

    #[test]
    fn uuid_forms() {
        assert_eq!(Uuid::parse("F3FA73D41C2B4E5F8A9B0123456789AB").expect("undashed").as_str(), UUID);
        assert_eq!(Uuid::parse(&format!(" {UUID}\n")).expect("spaces").as_str(), UUID);
        for bad in [
            "../../etc/passwd",
            "",
            "f3fa73d4-1c2b-4e5f-8a9b-0123456789a",
            "g3fa73d4-1c2b-4e5f-8a9b-0123456789ab",
            "f3fa73d41-c2b-4e5f-8a9b-0123456789ab",
        ] {
            assert!(Uuid::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rejects_bad_documents() {
        assert!(matches!(Domain::parse(b""), Err(DomainError::Empty)));
        assert!(matches!(Domain::parse(b"<domain><name>x</name"), Err(DomainError::Malformed(_))));
        assert!(matches!(Domain::parse(b"\xff\xfe<domain/>"), Err(DomainError::NotUtf8)));
        assert!(matches!(Domain::parse(b"<domain><uuid>x</uuid></domain>"), Err(DomainError::MissingName)));
        assert!(matches!(Domain::parse(b"<domain><name>x</name></domain>"), Err(DomainError::MissingUuid)));
        let deep = format!(
            "<domain><name>x</name><uuid>{UUID}</uuid>{}{}</domain>",
            "<a>".repeat(100_000),
            "</a>".repeat(100_000)
        );
        assert!(matches!(Domain::parse(deep.as_bytes()), Err(DomainError::TooDeep)));
        let big = vec![b' '; MAX_XML_BYTES + 1];
        assert!(matches!(Domain::parse(&big), Err(DomainError::TooLarge)));
    }

    #[test]
    fn fuzzer_findings_are_refused_quickly() {
        // A DOCTYPE inside text made quick-xml 0.37 panic; many attributes made it quadratic.
        let doctype = format!("<domain><name>v<!DOCTYPE t>v</name><uuid>{UUID}</uuid></domain>");
        assert!(matches!(Domain::parse(doctype.as_bytes()), Err(DomainError::DocType)));
        assert!(Domain::parse(b"<><name>v<!DOCTYPEt>v").is_err());
        let attrs: String = (0..10_000).map(|i| format!(" a{i:x}=''")).collect();
        let started = std::time::Instant::now();
        let many = format!("<domain{attrs}><name>x</name><uuid>{UUID}</uuid></domain>");
        assert!(matches!(Domain::parse(many.as_bytes()), Err(DomainError::TooManyAttributes)));
        let empty = format!("<domain><name>x</name><uuid>{UUID}</uuid><devices><disk{attrs}/></devices></domain>");
        assert!(matches!(Domain::parse(empty.as_bytes()), Err(DomainError::TooManyAttributes)));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn entities_are_not_expanded() {
        let xml = format!(
            "<!DOCTYPE domain [<!ENTITY x \"/etc/shadow\">]><domain><name>vm1</name><uuid>{UUID}</uuid><devices>\
             <disk type='file'><source file='&x;'/></disk></devices></domain>"
        );
        assert!(Domain::parse(xml.as_bytes()).is_err());
    }

    #[test]
    fn disks_and_leases() {
        let xml = domain(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a b é.qcow2'/><target dev='vda'/></disk>\
             <lease><lockspace>ls</lockspace><key>k1</key><target path='/leases/l' offset='1024'/></lease>\
             <disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>\
             <disk type='block'><source dev='/dev/loop0'/><shareable/></disk>",
        );
        let d = Domain::parse(xml.as_bytes()).expect("parse");
        assert_eq!(d.name, "vm1");
        assert_eq!(d.disks.len(), 3);
        assert_eq!(d.disks[0].source, Source::File("/img/a b é.qcow2".into()));
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(d.disks[0].backing, None);
        assert_eq!(d.disks[1].source, Source::Empty);
        assert!(d.disks[1].readonly);
        assert!(d.disks[2].shareable);
        assert_eq!(
            d.leases,
            vec![Lease { lockspace: Some("ls".into()), key: "k1".into(), path: "/leases/l".into(), offset: 1024 }]
        );
    }

    #[test]
    fn lease_errors() {
        let bad_offset = domain("<lease><key>k</key><target path='/l' offset='-1'/></lease>");
        assert!(matches!(Domain::parse(bad_offset.as_bytes()), Err(DomainError::LeaseBadOffset { .. })));
        let no_target = domain("<lease><key>k</key></lease>");
        assert!(matches!(Domain::parse(no_target.as_bytes()), Err(DomainError::LeaseMissingTarget { .. })));
        let no_key = domain("<lease><target path='/l'/></lease>");
        assert!(matches!(Domain::parse(no_key.as_bytes()), Err(DomainError::LeaseMissingKey { .. })));
    }

    #[test]
    fn backing_chain_from_xml() {
        let xml = domain(
            "<disk type='file'><source file='/i/top.qcow2'/><backingStore type='file'><format type='qcow2'/>\
             <source file='/i/mid.qcow2'/><backingStore type='block'><format type='raw'/><source dev='/dev/base'/>\
             <backingStore/></backingStore></backingStore><target dev='vda'/></disk>\
             <disk type='file'><source file='/i/flat.raw'/><backingStore/></disk>",
        );
        let d = Domain::parse(xml.as_bytes()).expect("parse");
        let chain = d.disks[0].backing.as_ref().expect("chain");
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].source, Source::File("/i/mid.qcow2".into()));
        assert_eq!(chain[1].source, Source::Block("/dev/base".into()));
        assert_eq!(d.disks[1].backing, Some(vec![]));
    }

    #[test]
    fn chains_as_deep_as_libvirts_parse_on_a_small_stack() {
        // libvirt refuses chains deeper than 200 images; this runs on a 2 MiB test thread.
        let mut chain = String::new();
        for i in 0..200 {
            chain.push_str(&format!("<backingStore type='file'><format type='qcow2'/><source file='/i/{i}'/>"));
        }
        chain.push_str("<backingStore/>");
        chain.push_str(&"</backingStore>".repeat(200));
        let xml = domain(&format!("<disk type='file'><source file='/i/top'/>{chain}<target dev='vda'/></disk>"));
        let d = Domain::parse(xml.as_bytes()).expect("parse");
        assert_eq!(d.disks[0].backing.as_ref().map(Vec::len), Some(200));
    }

    #[test]
    fn status_file() {
        let xml = format!(
            "<!--\nWARNING\n-->\n<domstatus state='running' reason='booted' pid='4242'><taint flag='high-privileges'/>\
             <monitor path='/x' type='unix'/><domain type='kvm' id='1'><name>vm1</name><uuid>{UUID}</uuid><devices>\
             <disk type='file'><source file='/a'/><target dev='vda'/></disk></devices></domain></domstatus>"
        );
        let d = Domain::parse_status(xml.as_bytes()).expect("parse status");
        assert_eq!(d.name, "vm1");
        assert_eq!(d.disks.len(), 1);
        assert!(Domain::parse_status(b"<domstatus/>").is_err());
        let copying = format!(
            "<domstatus><domain><name>vm1</name><uuid>{UUID}</uuid><devices><disk type='file'><source file='/a'/>\
             <mirror type='file' job='copy' ready='yes'><format type='raw'/><source file='/copy'/></mirror>\
             <target dev='vda'/></disk><disk type='file'><source file='/b'/><mirror type='file' file='/old-style'/>\
             </disk></devices></domain></domstatus>"
        );
        let d = Domain::parse_status(copying.as_bytes()).expect("parse mirror");
        assert_eq!(d.disks[0].mirror, Some(Source::File("/copy".into())));
        assert_eq!(d.disks[1].mirror, Some(Source::File("/old-style".into())));
    }

    #[test]
    fn firmware_data_files_transient_and_memory() {
        let xml = format!(
            "<domain type='kvm'><name>vm1</name><uuid>{UUID}</uuid><os><type arch='x86_64'>hvm</type>\
             <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\
             <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/vm1_VARS.fd</nvram>\
             <boot dev='hd'/></os><devices>\
             <disk type='file'><driver type='qcow2'/><source file='/i/a.qcow2'><dataStore type='file'>\
             <format type='raw'/><source file='/i/a.data'/></dataStore></source><target dev='vda'/></disk>\
             <disk type='file'><source file='/i/base.qcow2'/><transient shareBacking='yes'/><target dev='vdb'/></disk>\
             <disk type='file'><source file='/i/t.qcow2'/><transient/><target dev='vdc'/></disk>\
             <memory model='nvdimm'><source><path>/i/nvdimm</path></source><target><size unit='KiB'>512</size></target></memory>\
             <memory model='dimm'><target><size unit='KiB'>512</size></target></memory>\
             </devices></domain>"
        );
        let d = Domain::parse(xml.as_bytes()).expect("parse");
        assert_eq!(
            d.firmware,
            vec![
                Firmware {
                    kind: FirmwareKind::Loader,
                    source: Source::File("/usr/share/OVMF/OVMF_CODE_4M.fd".into()),
                    readonly: true
                },
                Firmware {
                    kind: FirmwareKind::Nvram,
                    source: Source::File("/var/lib/libvirt/qemu/nvram/vm1_VARS.fd".into()),
                    readonly: false
                },
            ]
        );
        assert_eq!(d.disks[0].data_store, Some(Source::File("/i/a.data".into())));
        assert_eq!(d.disks[0].source, Source::File("/i/a.qcow2".into()));
        assert_eq!(d.disks[1].transient, Some(Transient { share_backing: true }));
        assert_eq!(d.disks[2].transient, Some(Transient { share_backing: false }));
        assert_eq!(d.memory_files, vec![PathBuf::from("/i/nvdimm")]);
        let new_style = format!(
            "<domain><name>v</name><uuid>{UUID}</uuid><os><loader type='pflash' readonly='no'>/f/code.fd</loader>\
             <nvram type='block'><source dev='/dev/vg/nvram'/></nvram></os></domain>"
        );
        let d = Domain::parse(new_style.as_bytes()).expect("parse");
        assert!(!d.firmware[0].readonly, "a writable loader");
        assert_eq!(d.firmware[1].source, Source::Block("/dev/vg/nvram".into()));
    }

    #[test]
    fn interleaved_devices() {
        let xml = domain(
            "<disk type='file'><source file='/a'/></disk><interface type='user'/><disk type='file'><source file='/b'/></disk>\
             <lease><key>k</key><target path='/l'/></lease><disk type='file'><source file='/c'/></disk>",
        );
        let d = Domain::parse(xml.as_bytes()).expect("parse");
        assert_eq!(d.disks.len(), 3);
        assert_eq!(d.leases.len(), 1);
    }
}
