//! Raw serde structs mirroring the parts of libvirt's domain XML that lockhook reads, 1:1 and all
//! optional. Validation happens in `domain::Domain::parse`; unknown elements are ignored.

use serde::de::IgnoredAny;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawDomain {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub devices: Option<RawDevices>,
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
