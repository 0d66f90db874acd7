//! Resolves `<disk type='volume'>` from libvirt's pool definitions on disk, because the hook must
//! never ask libvirt (it is waiting for the hook: deadlock).
//!
//! Running pools are described in `<libvirt_run_dir>/storage/<pool>.xml` (a `<poolstate>` around
//! the `<pool>`), persistent ones in `<libvirt_config_dir>/storage/<pool>.xml`. A volume resolves
//! to what the equivalent direct disk would name, so both are one lock:
//!
//! | pool type | XML it needs | volume → |
//! |---|---|---|
//! | `dir`, `fs`, `netfs`, `vstorage` | `<target><path>` | the file `<target path>/<vol>` |
//! | `logical` | `<source><name>` (the VG) | `/dev/<vg>/<vol>` (libvirt ignores the target path) |
//! | `zfs` | `<source><name>` (the zpool) | `/dev/zvol/<zpool>/<vol>` |
//! | `disk` | `<source><device path>` (else `<target><path>`) | the partition `<dir of the resolved device>/<vol>`: the volume name is the basename of the partition node libvirt's parthelper printed (`sdb1`) |
//! | `iscsi` | `<source><host>`, `<source><device path>` (the IQN) | network `iscsi` `IQN/LUN` from the volume name `unit:B:T:LUN`, plus the kernel initiator's `/dev/disk/by-path/ip-HOST:PORT-iscsi-IQN-lun-LUN` when it exists |
//! | `iscsi-direct` | as `iscsi` | network `iscsi` `IQN/LUN` (volume `unit:0:0:LUN`) |
//! | `rbd` | `<source><name>` (the Ceph pool) | network `rbd` `<ceph pool>/<vol>` |
//! | `gluster` | `<source><name>` (the volume), `<source><dir path>` (default `/`) | network `gluster` `<volume><dir><vol>` |
//! | `sheepdog` | - | network `sheepdog` `<vol>` |
//!
//! `scsi` and `mpath` volumes are named after SCSI addresses and device-mapper maps that libvirt
//! alone resolves to paths (it scans sysfs when the pool starts): they are `Unidentified`, as
//! are unknown types and broken or missing definitions; `on_unidentified` decides what then.
//!
//! Size: about 330 lines of code; the other 230 are its unit tests, kept beside what they test.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::NetworkHost;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool {pool:?}, volume {volume:?}: no pool definition in {searched}")]
    NotFound { pool: String, volume: String, searched: String },
    #[error("pool {pool:?}: invalid name")]
    BadPoolName { pool: String },
    #[error("pool {pool:?}, volume {volume:?}: invalid volume name")]
    BadVolumeName { pool: String, volume: String },
    #[error("pool {pool:?}, volume {volume:?}: {path}: {message}")]
    Malformed { pool: String, volume: String, path: PathBuf, message: String },
    #[error("pool {pool:?}, volume {volume:?}: pool type {kind:?} is unknown to lockhook")]
    UnknownType { pool: String, volume: String, kind: String },
    #[error(
        "pool {pool:?}, volume {volume:?}: the paths of {kind} pool volumes are known only to libvirt \
         (it finds them in sysfs when the pool starts), and the hook must not ask libvirt"
    )]
    Unidentifiable { pool: String, volume: String, kind: String },
    #[error("pool {pool:?}, volume {volume:?}: not a {kind} volume name ({expected})")]
    UnknownVolume { pool: String, volume: String, kind: String, expected: &'static str },
}

impl PoolError {
    /// Whether the volume is one lockhook cannot identify (as opposed to a name that is unsafe
    /// to use at all): `on_unidentified` may let such a guest start unlocked.
    pub fn is_unidentified(&self) -> bool {
        !matches!(self, PoolError::BadPoolName { .. } | PoolError::BadVolumeName { .. })
    }
}

/// A network disk a volume stands for, as `<disk type='network'>` would spell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkVolume {
    pub protocol: String,
    pub name: String,
    pub hosts: Vec<NetworkHost>,
}

/// What a volume resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    /// A file or block device.
    Path(PathBuf),
    /// Storage reached over the network (rbd, gluster, iscsi-direct, ...).
    Network(NetworkVolume),
    /// An iSCSI LUN attached through the kernel initiator: its device node, and the LUN, which
    /// another host (or a guest using libiscsi) reaches without that node.
    Both { path: PathBuf, network: NetworkVolume },
}

impl Volume {
    pub fn into_parts(self) -> (Option<PathBuf>, Option<NetworkVolume>) {
        match self {
            Volume::Path(path) => (Some(path), None),
            Volume::Network(network) => (None, Some(network)),
            Volume::Both { path, network } => (Some(path), Some(network)),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct RawPoolState {
    pool: Option<RawPool>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPool {
    #[serde(rename = "@type")]
    kind: Option<String>,
    source: Option<RawPoolSource>,
    target: Option<RawPoolTarget>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPoolSource {
    name: Option<String>,
    #[serde(default, rename = "host")]
    hosts: Vec<RawPoolHost>,
    #[serde(default, rename = "device")]
    devices: Vec<RawPathAttr>,
    dir: Option<RawPathAttr>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPoolHost {
    #[serde(rename = "@name")]
    name: Option<String>,
    #[serde(rename = "@port")]
    port: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPathAttr {
    #[serde(rename = "@path")]
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPoolTarget {
    path: Option<String>,
}

use crate::libvirt::is_file_name as safe_component;

/// A `/`-separated name (a ZFS dataset) whose every component is safe.
fn safe_components(name: &str) -> bool {
    name.split('/').all(safe_component)
}

fn parse_pool(text: &str) -> Result<RawPool, String> {
    // libvirt starts these files with a "do not edit" comment, so look past it.
    if text.contains("<poolstate") {
        let state: RawPoolState = quick_xml::de::from_str(text).map_err(|e| e.to_string())?;
        state.pool.ok_or_else(|| "no <pool> in <poolstate>".to_owned())
    } else {
        quick_xml::de::from_str(text).map_err(|e| e.to_string())
    }
}

/// The image directory of a persistent `dir`, `fs` or `netfs` pool definition (a `<pool>`, as in
/// `<libvirt_config_dir>/storage`): its `<target><path>`, trimmed, when that is absolute. `None`
/// for other pool types, for a running pool's `<poolstate>`, and for anything that does not
/// parse. `doctor` tests OFD locks there.
pub fn target_dir(text: &str) -> Option<PathBuf> {
    let pool: RawPool = quick_xml::de::from_str(text).ok()?;
    if !matches!(pool.kind.as_deref(), Some("dir" | "fs" | "netfs")) {
        return None;
    }
    let path = PathBuf::from(pool.target?.path?.trim());
    path.is_absolute().then_some(path)
}

/// What `volume` of `pool` is, from the pool XML under the two libvirt directories; `dev` is
/// where device nodes are (`/dev`), for the kernel initiator's iSCSI nodes.
pub fn resolve(pool: &str, volume: &str, run_dir: &Path, config_dir: &Path, dev: &Path) -> Result<Volume, PoolError> {
    let candidates = crate::libvirt::pool_files(run_dir, config_dir, pool)
        .ok_or_else(|| PoolError::BadPoolName { pool: pool.to_owned() })?;
    if !safe_component(volume) {
        return Err(PoolError::BadVolumeName { pool: pool.to_owned(), volume: volume.to_owned() });
    }
    let Some((path, text)) = candidates.iter().find_map(|p| std::fs::read_to_string(p).ok().map(|t| (p, t))) else {
        let searched = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ");
        return Err(PoolError::NotFound { pool: pool.to_owned(), volume: volume.to_owned(), searched });
    };
    let malformed = |message: String| PoolError::Malformed {
        pool: pool.to_owned(),
        volume: volume.to_owned(),
        path: path.clone(),
        message: crate::one_line(&message),
    };
    let raw = parse_pool(&text).map_err(malformed)?;
    let kind = raw.kind.as_deref().map(str::trim).unwrap_or_default().to_owned();
    let source = raw.source.unwrap_or_default();
    let target = raw.target.and_then(|t| t.path).map(|p| p.trim().to_owned()).filter(|p| !p.is_empty());
    let source_name = source.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
    let need = |what: &str| malformed(format!("{kind} pool without {what}"));
    let bad_volume = |expected| PoolError::UnknownVolume {
        pool: pool.to_owned(),
        volume: volume.to_owned(),
        kind: kind.clone(),
        expected,
    };
    match kind.as_str() {
        "dir" | "fs" | "netfs" | "vstorage" => {
            let target = target.ok_or_else(|| need("<target><path>"))?;
            Ok(Volume::Path(Path::new(&target).join(volume)))
        }
        "logical" => {
            let vg = source_name.filter(|n| safe_component(n)).ok_or_else(|| need("a valid <source><name> (VG)"))?;
            Ok(Volume::Path(Path::new("/dev").join(vg).join(volume)))
        }
        "zfs" => {
            let zpool =
                source_name.filter(|n| safe_components(n)).ok_or_else(|| need("a valid <source><name> (zpool)"))?;
            Ok(Volume::Path(Path::new("/dev/zvol").join(zpool).join(volume)))
        }
        "disk" => {
            let device = source.devices.first().and_then(|d| d.path.as_deref()).map(str::trim);
            match (device.and_then(|d| partition_dir(Path::new(d))), target) {
                (Some(dir), _) => Ok(Volume::Path(dir.join(volume))),
                (None, Some(target)) => Ok(Volume::Path(Path::new(&target).join(volume))),
                (None, None) => Err(need("<source><device path> or <target><path>")),
            }
        }
        "iscsi" | "iscsi-direct" => {
            let lun = lun_of(volume).ok_or_else(|| bad_volume("unit:BUS:TARGET:LUN"))?;
            let iqn = source
                .devices
                .first()
                .and_then(|d| d.path.as_deref())
                .map(str::trim)
                .filter(|iqn| !iqn.is_empty() && !iqn.contains('/'))
                .ok_or_else(|| need("a valid <source><device path> (target IQN)"))?;
            let host = source.hosts.first().ok_or_else(|| need("<source><host>"))?;
            let network = NetworkVolume {
                protocol: "iscsi".to_owned(),
                name: format!("{iqn}/{lun}"),
                hosts: vec![network_host(host)],
            };
            if kind == "iscsi-direct" {
                return Ok(Volume::Network(network));
            }
            match iscsi_node(dev, host, iqn, lun) {
                Some(path) => Ok(Volume::Both { path, network }),
                None => Ok(Volume::Network(network)),
            }
        }
        "rbd" => {
            let ceph_pool = source_name.ok_or_else(|| need("<source><name> (Ceph pool)"))?;
            Ok(Volume::Network(NetworkVolume {
                protocol: "rbd".to_owned(),
                name: format!("{ceph_pool}/{volume}"),
                hosts: source.hosts.iter().map(network_host).collect(),
            }))
        }
        "gluster" => {
            let gluster_volume = source_name.ok_or_else(|| need("<source><name> (Gluster volume)"))?;
            let dir = source.dir.and_then(|d| d.path).unwrap_or_default();
            let dir = dir.trim().trim_matches('/');
            let name = if dir.is_empty() {
                format!("{gluster_volume}/{volume}")
            } else {
                format!("{gluster_volume}/{dir}/{volume}")
            };
            Ok(Volume::Network(NetworkVolume {
                protocol: "gluster".to_owned(),
                name,
                hosts: source.hosts.iter().map(network_host).collect(),
            }))
        }
        "sheepdog" => Ok(Volume::Network(NetworkVolume {
            protocol: "sheepdog".to_owned(),
            name: volume.to_owned(),
            hosts: source.hosts.iter().map(network_host).collect(),
        })),
        "scsi" | "mpath" => Err(PoolError::Unidentifiable { pool: pool.to_owned(), volume: volume.to_owned(), kind }),
        _ => Err(PoolError::UnknownType { pool: pool.to_owned(), volume: volume.to_owned(), kind }),
    }
}

/// Where the partitions of a `disk` pool's device are. libvirt names a partition volume after
/// the node its parthelper prints: the device's path with the number appended, resolved through
/// symlinks (`/dev/disk/by-id/wwn-X` → `/dev/sdb` → volume `sdb1`) except for device-mapper
/// devices (`/dev/mapper/mpatha` → `mpathap1`). `None` when the device is not there to resolve.
fn partition_dir(device: &Path) -> Option<PathBuf> {
    let node =
        if device.starts_with("/dev/mapper") { device.to_owned() } else { std::fs::canonicalize(device).ok()? };
    node.parent().filter(|dir| dir.is_absolute()).map(Path::to_owned)
}

fn network_host(host: &RawPoolHost) -> NetworkHost {
    NetworkHost {
        name: host.name.as_ref().map(|n| n.trim().to_owned()),
        port: host.port.as_ref().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()),
        transport: None,
        socket: None,
    }
}

/// The LUN in an iSCSI volume name, `unit:BUS:TARGET:LUN` (libvirt's SCSI address naming).
fn lun_of(volume: &str) -> Option<u32> {
    let rest = volume.strip_prefix("unit:")?;
    let parts: Vec<&str> = rest.split(':').collect();
    let [bus, target, lun] = parts.as_slice() else { return None };
    bus.parse::<u32>().ok()?;
    target.parse::<u32>().ok()?;
    lun.parse().ok()
}

/// The kernel initiator's node for LUN `lun` of target `iqn`: udev's
/// `/dev/disk/by-path/ip-HOST:PORT-iscsi-IQN-lun-LUN`. HOST is the portal address of the session,
/// which is the pool's host when it is an address and may differ when it is a name: any portal
/// reaching the target will do (they are paths to the same LUN), the pool's own first.
fn iscsi_node(dev: &Path, host: &RawPoolHost, iqn: &str, lun: u32) -> Option<PathBuf> {
    let by_path = dev.join("disk/by-path");
    let suffix = format!("-iscsi-{iqn}-lun-{lun}");
    let name = host.name.as_deref().unwrap_or("").trim();
    let port = host.port.as_deref().map(str::trim).filter(|p| !p.is_empty()).unwrap_or("3260");
    let addr = if name.contains(':') { format!("[{name}]") } else { name.to_owned() };
    let own = by_path.join(format!("ip-{addr}:{port}{suffix}"));
    if own.exists() {
        return Some(own);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&by_path)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            (name.starts_with("ip-") && name.ends_with(&suffix)).then(|| by_path.join(name))
        })
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        _root: tempfile::TempDir,
        run: PathBuf,
        etc: PathBuf,
        dev: PathBuf,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().expect("dir");
        let run = root.path().join("run");
        let etc = root.path().join("etc");
        let dev = root.path().join("dev");
        for d in [&run, &etc, &dev] {
            std::fs::create_dir_all(d.join("storage")).expect("mkdir");
        }
        Dirs { _root: root, run, etc, dev }
    }

    impl Dirs {
        /// Writes `pool` both as a persistent definition and, wrapped as libvirt does, as the
        /// running pool's state; checks that both read alike and returns the result.
        fn both(&self, name: &str, pool: &str, volume: &str) -> Result<Volume, PoolError> {
            let config = self.etc.join(format!("storage/{name}.xml"));
            let state = self.run.join(format!("storage/{name}.xml"));
            let _ = std::fs::remove_file(&state);
            std::fs::write(&config, format!("<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n{pool}"))
                .expect("write");
            let from_config = resolve(name, volume, &self.run, &self.etc, &self.dev);
            std::fs::write(
                &state,
                format!(
                    "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n<poolstate version='1'>\n{pool}\n</poolstate>\n"
                ),
            )
            .expect("write");
            let from_state = resolve(name, volume, &self.run, &self.etc, &self.dev);
            match (&from_config, &from_state) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "<pool> and <poolstate> differ"),
                (Err(a), Err(b)) => {
                    assert_eq!(std::mem::discriminant(a), std::mem::discriminant(b), "{a} / {b}")
                }
                (a, b) => panic!("<pool> and <poolstate> differ: {a:?} / {b:?}"),
            }
            from_state
        }
    }

    fn path(p: &str) -> Volume {
        Volume::Path(PathBuf::from(p))
    }

    fn host(name: &str, port: Option<&str>) -> NetworkHost {
        NetworkHost { name: Some(name.into()), port: port.map(Into::into), transport: None, socket: None }
    }

    fn net(protocol: &str, name: &str, hosts: Vec<NetworkHost>) -> Volume {
        Volume::Network(NetworkVolume { protocol: protocol.into(), name: name.into(), hosts })
    }

    #[test]
    fn state_wins_over_config() {
        let d = dirs();
        std::fs::write(
            d.etc.join("storage/images.xml"),
            "<pool type='dir'><name>images</name><target><path>/var/lib/libvirt/images</path></target></pool>",
        )
        .expect("write");
        let got = resolve("images", "a.qcow2", &d.run, &d.etc, &d.dev).expect("resolve");
        assert_eq!(got, path("/var/lib/libvirt/images/a.qcow2"));
        std::fs::write(
            d.run.join("storage/images.xml"),
            "<poolstate version='1'><pool type='dir'><name>images</name><target><path>/srv/imgs</path></target></pool></poolstate>",
        )
        .expect("write");
        assert_eq!(resolve("images", "a.qcow2", &d.run, &d.etc, &d.dev).expect("resolve"), path("/srv/imgs/a.qcow2"));
    }

    #[test]
    fn file_pools() {
        let d = dirs();
        let dir = "<pool type='dir'>\n  <name>default</name>\n  <uuid>3e3fce45-4f53-4fa7-bb32-11f34168b82b</uuid>\n  \
                   <capacity unit='bytes'>0</capacity>\n  <source>\n  </source>\n  <target>\n    \
                   <path>/var/lib/libvirt/images</path>\n    <permissions>\n      <mode>0711</mode>\n      \
                   <owner>0</owner>\n      <group>0</group>\n    </permissions>\n  </target>\n</pool>";
        assert_eq!(d.both("default", dir, "a.qcow2").expect("dir"), path("/var/lib/libvirt/images/a.qcow2"));
        let fs =
            "<pool type='fs'><name>fs</name><source><device path='/dev/vg0/images'/><format type='ext4'/></source>\
                  <target><path>/srv/fs</path></target></pool>";
        assert_eq!(d.both("fs", fs, "b.raw").expect("fs"), path("/srv/fs/b.raw"));
        let netfs = "<pool type='netfs'><name>nfs</name><source><host name='nfs.example.com'/>\
                     <dir path='/exports/images'/><format type='nfs'/></source>\
                     <target><path>/var/lib/libvirt/nfs</path></target></pool>";
        assert_eq!(d.both("nfs", netfs, "c.qcow2").expect("netfs"), path("/var/lib/libvirt/nfs/c.qcow2"));
        let vstorage = "<pool type='vstorage'><name>vs</name><source><name>cluster1</name></source>\
                        <target><path>/mnt/vstorage/cluster1</path></target></pool>";
        assert_eq!(d.both("vs", vstorage, "d.img").expect("vstorage"), path("/mnt/vstorage/cluster1/d.img"));
    }

    #[test]
    fn target_dirs() {
        let dir = "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n<pool type='dir'><name>images</name>\
                   <target><path> /srv/images </path></target></pool>";
        assert_eq!(target_dir(dir), Some(PathBuf::from("/srv/images")));
        assert_eq!(target_dir("<pool type='logical'><target><path>/dev/vg</path></target></pool>"), None);
        assert_eq!(target_dir("<pool type='netfs'><target><path>relative</path></target></pool>"), None);
        assert_eq!(target_dir("<pool type='fs'><target>"), None);
        // A running pool's state is not a definition.
        let state = "<poolstate version='1'><pool type='fs'><target><path>/srv/fs</path></target></pool></poolstate>";
        assert_eq!(target_dir(state), None);
    }

    #[test]
    fn block_pools() {
        let d = dirs();
        let logical = "<pool type='logical'><name>vg</name><source><device path='/dev/sdb1'/><name>vg0</name>\
                       <format type='lvm2'/></source><target><path>/dev/vg0</path></target></pool>";
        assert_eq!(d.both("vg", logical, "lv1").expect("logical"), path("/dev/vg0/lv1"));
        let zfs = "<pool type='zfs'><name>tank</name><source><name>tank</name><device path='/dev/sdc'/></source>\
                   <target><path>/dev/zvol/tank</path></target></pool>";
        assert_eq!(d.both("tank", zfs, "vm1-disk").expect("zfs"), path("/dev/zvol/tank/vm1-disk"));
        let dataset = "<pool type='zfs'><name>ds</name><source><name>tank/vms</name></source></pool>";
        assert_eq!(d.both("ds", dataset, "v").expect("zfs dataset"), path("/dev/zvol/tank/vms/v"));
        // The source device is resolved as libvirt's parthelper does: its partitions are next
        // to the node the link names, not next to the link or in the target path.
        let root = d.run.parent().expect("root").to_owned();
        std::fs::write(root.join("sdb"), "").expect("node");
        std::fs::create_dir_all(root.join("by-id")).expect("mkdir");
        std::os::unix::fs::symlink("../sdb", root.join("by-id/wwn-0x5000c5")).expect("link");
        let disk = format!(
            "<pool type='disk'><name>sdb</name><source><device path='{}'/><format type='gpt'/></source>\
             <target><path>/dev/disk/by-path</path></target></pool>",
            root.join("by-id/wwn-0x5000c5").display()
        );
        assert_eq!(d.both("sdb", &disk, "sdb1").expect("disk"), Volume::Path(root.join("sdb1")));
        let mapper = "<pool type='disk'><name>mp</name><source><device path='/dev/mapper/mpatha'/></source>\
                      <target><path>/dev</path></target></pool>";
        assert_eq!(d.both("mp", mapper, "mpathap1").expect("disk"), path("/dev/mapper/mpathap1"));
        // A device that is not there: the target path (the partition is missing anyway).
        let gone = "<pool type='disk'><name>g</name><source><device path='/nonexistent/sdz'/></source>\
                    <target><path>/dev</path></target></pool>";
        assert_eq!(d.both("g", gone, "sdz1").expect("disk"), path("/dev/sdz1"));
    }

    const ISCSI: &str = "<pool type='iscsi'><name>san</name><source><host name='192.0.2.10' port='3260'/>\
                         <device path='iqn.2013-06.com.example:storage'/><initiator><iqn name='iqn.2013-06.com.example:host1'/>\
                         </initiator></source><target><path>/dev/disk/by-path</path></target></pool>";

    #[test]
    fn iscsi_pools() {
        let d = dirs();
        let lun1 = net("iscsi", "iqn.2013-06.com.example:storage/1", vec![host("192.0.2.10", Some("3260"))]);
        assert_eq!(d.both("san", ISCSI, "unit:0:0:1").expect("iscsi"), lun1);
        // With the kernel initiator logged in, udev's node is locked too.
        let by_path = d.dev.join("disk/by-path");
        std::fs::create_dir_all(&by_path).expect("mkdir");
        let node = by_path.join("ip-192.0.2.10:3260-iscsi-iqn.2013-06.com.example:storage-lun-1");
        std::fs::write(&node, "").expect("node");
        let Volume::Network(network) = lun1 else { unreachable!() };
        assert_eq!(d.both("san", ISCSI, "unit:0:0:1").expect("iscsi"), Volume::Both { path: node, network });
        // A portal reached under another address (the pool names the host): still the LUN.
        let named = ISCSI.replace("192.0.2.10", "san.example.com");
        let Ok(Volume::Both { path, .. }) = d.both("san", &named, "unit:0:0:1") else { panic!("node by suffix") };
        assert!(path.ends_with("ip-192.0.2.10:3260-iscsi-iqn.2013-06.com.example:storage-lun-1"));
        assert!(matches!(d.both("san", ISCSI, "unit:0:0:2"), Ok(Volume::Network(_))), "no node for LUN 2");
        assert!(matches!(d.both("san", ISCSI, "lun1"), Err(PoolError::UnknownVolume { .. })));
        let direct = "<pool type='iscsi-direct'><name>d</name><source><host name='san.example.com'/>\
                      <device path='iqn.2013-06.com.example:storage'/><initiator><iqn name='iqn.2013-06.com.example:h'/>\
                      </initiator></source></pool>";
        assert_eq!(
            d.both("d", direct, "unit:0:0:3").expect("iscsi-direct"),
            net("iscsi", "iqn.2013-06.com.example:storage/3", vec![host("san.example.com", None)])
        );
    }

    #[test]
    fn network_pools() {
        let d = dirs();
        let rbd = "<pool type='rbd'><name>ceph</name><source><name>libvirt-pool</name>\
                   <host name='mon1.example.com' port='6789'/><host name='mon2.example.com'/>\
                   <auth type='ceph' username='libvirt'><secret uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/></auth>\
                   </source></pool>";
        let hosts = vec![host("mon1.example.com", Some("6789")), host("mon2.example.com", None)];
        assert_eq!(d.both("ceph", rbd, "vm1.img").expect("rbd"), net("rbd", "libvirt-pool/vm1.img", hosts));
        let gluster = "<pool type='gluster'><name>gl</name><source><host name='gl1.example.com'/>\
                       <dir path='/vms/'/><name>gv0</name></source></pool>";
        assert_eq!(
            d.both("gl", gluster, "a.qcow2").expect("gluster"),
            net("gluster", "gv0/vms/a.qcow2", vec![host("gl1.example.com", None)])
        );
        let root = "<pool type='gluster'><name>gr</name><source><host name='gl1'/><dir path='/'/><name>gv0</name></source></pool>";
        assert_eq!(d.both("gr", root, "b").expect("gluster"), net("gluster", "gv0/b", vec![host("gl1", None)]));
        let sheep = "<pool type='sheepdog'><name>sd</name><source><name>sd</name><host name='localhost' port='7000'/></source></pool>";
        assert_eq!(
            d.both("sd", sheep, "vdi1").expect("sheepdog"),
            net("sheepdog", "vdi1", vec![host("localhost", Some("7000"))])
        );
    }

    #[test]
    fn unidentified() {
        let d = dirs();
        let scsi = "<pool type='scsi'><name>hba</name><source><adapter type='scsi_host' name='host0'/></source>\
                    <target><path>/dev/disk/by-path</path></target></pool>";
        let err = d.both("hba", scsi, "unit:0:0:0").expect_err("scsi");
        assert!(matches!(err, PoolError::Unidentifiable { .. }) && err.is_unidentified(), "{err}");
        let mpath = "<pool type='mpath'><name>mp</name><target><path>/dev/mapper</path></target></pool>";
        assert!(matches!(d.both("mp", mpath, "dm-0"), Err(PoolError::Unidentifiable { .. })));
        let err = d.both("x", "<pool type='future'><name>x</name></pool>", "v").expect_err("unknown");
        assert!(matches!(err, PoolError::UnknownType { .. }) && err.is_unidentified());
        assert_eq!(err.to_string(), "pool \"x\", volume \"v\": pool type \"future\" is unknown to lockhook");
        let err = d.both("b", "<pool type='dir'><name>b", "v").expect_err("malformed");
        assert!(matches!(err, PoolError::Malformed { .. }) && !err.to_string().contains('\n'), "{err}");
        let err = d.both("r", "<pool type='rbd'><name>r</name></pool>", "v").expect_err("rbd without a pool");
        assert!(matches!(err, PoolError::Malformed { .. }), "{err}");
        let err = d.both("l", "<pool type='logical'><source><name>../etc</name></source></pool>", "v").expect_err("vg");
        assert!(matches!(err, PoolError::Malformed { .. }), "{err}");
        let err = resolve("nope", "v", &d.run, &d.etc, &d.dev).expect_err("missing");
        assert!(matches!(err, PoolError::NotFound { .. }) && err.is_unidentified());
        let err = resolve("../x", "v", &d.run, &d.etc, &d.dev).expect_err("bad pool");
        assert!(matches!(err, PoolError::BadPoolName { .. }) && !err.is_unidentified());
        let err = resolve("nope", "../../etc/shadow", &d.run, &d.etc, &d.dev).expect_err("bad volume");
        assert!(matches!(err, PoolError::BadVolumeName { .. }) && !err.is_unidentified());
    }
}
