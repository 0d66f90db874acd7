//! Raw serde structs mirroring the parts of libvirt's domain XML that lockhook reads, 1:1 and all
//! optional. Validation happens in `domain::Domain::parse`; unknown elements are ignored.

use serde::de::IgnoredAny;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawDomain {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub os: Option<RawOs>,
    pub devices: Option<RawDevices>,
}

/// `<os>`: the firmware images (`<loader>`, `<nvram>`).
#[derive(Debug, Default, Deserialize)]
pub struct RawOs {
    pub loader: Option<RawLoader>,
    pub nvram: Option<RawNvram>,
}

/// `<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>`.
#[derive(Debug, Default, Deserialize)]
pub struct RawLoader {
    #[serde(rename = "@readonly")]
    pub readonly: Option<String>,
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "$text")]
    pub path: Option<String>,
}

/// `<nvram>PATH</nvram>`, or (libvirt 8.5+) `<nvram type='file|block'><source file|dev=.../></nvram>`.
#[derive(Debug, Default, Deserialize)]
pub struct RawNvram {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "$text")]
    pub path: Option<String>,
    pub source: Option<RawSource>,
}

/// libvirt's status file for a running guest (`/run/libvirt/qemu/<name>.xml`): the live
/// definition inside a `<domstatus>` wrapper.
#[derive(Debug, Default, Deserialize)]
pub struct RawStatus {
    pub domain: Option<RawDomain>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDevices {
    #[serde(default, rename = "disk")]
    pub disks: Vec<RawDisk>,
    #[serde(default, rename = "lease")]
    pub leases: Vec<RawLease>,
    /// `<memory model='nvdimm|virtio-pmem'>`: guest memory backed by a file the guest writes.
    #[serde(default, rename = "memory")]
    pub memory: Vec<RawMemory>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMemory {
    #[serde(rename = "@model")]
    pub model: Option<String>,
    pub source: Option<RawMemorySource>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMemorySource {
    pub path: Option<String>,
}

/// `<transient shareBacking='yes'/>`.
#[derive(Debug, Default, Deserialize)]
pub struct RawTransient {
    #[serde(rename = "@shareBacking")]
    pub share_backing: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDisk {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    #[serde(rename = "@device")]
    pub device: Option<String>,
    pub driver: Option<RawFormat>,
    pub source: Option<RawSource>,
    pub target: Option<RawTarget>,
    pub readonly: Option<IgnoredAny>,
    pub shareable: Option<IgnoredAny>,
    pub transient: Option<RawTransient>,
    #[serde(rename = "backingStore")]
    pub backing_store: Option<RawBackingStore>,
    /// The destination of a running block copy (status XML only).
    pub mirror: Option<RawMirror>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMirror {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    /// Older libvirt puts the path in an attribute.
    #[serde(rename = "@file")]
    pub file: Option<String>,
    pub source: Option<RawSource>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawFormat {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTarget {
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSource {
    #[serde(rename = "@file")]
    pub file: Option<String>,
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
    #[serde(rename = "@protocol")]
    pub protocol: Option<String>,
    #[serde(rename = "@name")]
    pub name: Option<String>,
    #[serde(rename = "@pool")]
    pub pool: Option<String>,
    #[serde(rename = "@volume")]
    pub volume: Option<String>,
    #[serde(rename = "@startupPolicy")]
    pub startup_policy: Option<String>,
    #[serde(default, rename = "host")]
    pub hosts: Vec<RawHost>,
    /// libvirt 10.10+: a qcow2 image's external data file.
    #[serde(rename = "dataStore")]
    pub data_store: Option<Box<RawDataStore>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDataStore {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    /// Not a `RawSource`: a data file has no data file of its own, and the types must not nest
    /// (serde would follow hostile nesting down the stack).
    pub source: Option<RawDataSource>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDataSource {
    #[serde(rename = "@file")]
    pub file: Option<String>,
    #[serde(rename = "@dev")]
    pub dev: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHost {
    #[serde(rename = "@name")]
    pub name: Option<String>,
    #[serde(rename = "@port")]
    pub port: Option<String>,
    #[serde(rename = "@transport")]
    pub transport: Option<String>,
    #[serde(rename = "@socket")]
    pub socket: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawBackingStore {
    #[serde(rename = "@type")]
    pub kind: Option<String>,
    pub format: Option<RawFormat>,
    pub source: Option<RawSource>,
    #[serde(rename = "backingStore")]
    pub backing_store: Option<Box<RawBackingStore>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLease {
    pub lockspace: Option<String>,
    pub key: Option<String>,
    pub target: Option<RawLeaseTarget>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLeaseTarget {
    #[serde(rename = "@path")]
    pub path: Option<String>,
    #[serde(rename = "@offset")]
    pub offset: Option<String>,
}
