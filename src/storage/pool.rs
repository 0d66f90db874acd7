//! Resolves `<disk type='volume'>` to a path from libvirt's pool definitions on disk, because the
//! hook must never ask libvirt (it is waiting for the hook: deadlock).
//!
//! Running pools are described in `<libvirt_run_dir>/storage/<pool>.xml` (a `<poolstate>` around
//! the `<pool>`), persistent ones in `<libvirt_config_dir>/storage/<pool>.xml`. The volume path is
//! `<target><path>/<volume>` for `dir`, `fs` and `netfs` pools, and `/dev/<vg>/<volume>` for
//! `logical` pools; other pool types are refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool {pool:?}: no definition in {searched}")]
    NotFound { pool: String, searched: String },
    #[error("pool {pool:?}: invalid name")]
    BadPoolName { pool: String },
    #[error("pool {pool:?}: volume {volume:?}: invalid name")]
    BadVolumeName { pool: String, volume: String },
    #[error("pool {pool:?}: {path}: {message}")]
    Malformed { pool: String, path: PathBuf, message: String },
    #[error("pool {pool:?}: type {kind:?} is not supported for volume disks")]
    Unsupported { pool: String, kind: String },
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
}

#[derive(Debug, Default, Deserialize)]
struct RawPoolTarget {
    path: Option<String>,
}

pub(crate) fn safe_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

fn parse_pool(pool: &str, path: &Path, text: &str) -> Result<RawPool, PoolError> {
    let malformed = |message: String| PoolError::Malformed { pool: pool.to_owned(), path: path.to_owned(), message };
    // libvirt starts these files with a "do not edit" comment, so look past it.
    if text.contains("<poolstate") {
        let state: RawPoolState = quick_xml::de::from_str(text).map_err(|e| malformed(e.to_string()))?;
        state.pool.ok_or_else(|| malformed("no <pool> in <poolstate>".to_owned()))
    } else {
        quick_xml::de::from_str(text).map_err(|e| malformed(e.to_string()))
    }
}

/// The path of `volume` in `pool`, from the pool XML under the two libvirt directories.
pub fn resolve(pool: &str, volume: &str, run_dir: &Path, config_dir: &Path) -> Result<PathBuf, PoolError> {
    if !safe_component(pool) {
        return Err(PoolError::BadPoolName { pool: pool.to_owned() });
    }
    if !safe_component(volume) {
        return Err(PoolError::BadVolumeName { pool: pool.to_owned(), volume: volume.to_owned() });
    }
    let candidates =
        [run_dir.join("storage").join(format!("{pool}.xml")), config_dir.join("storage").join(format!("{pool}.xml"))];
    let Some((path, text)) = candidates.iter().find_map(|p| std::fs::read_to_string(p).ok().map(|t| (p, t))) else {
        let searched = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ");
        return Err(PoolError::NotFound { pool: pool.to_owned(), searched });
    };
    let raw = parse_pool(pool, path, &text)?;
    let kind = raw.kind.unwrap_or_default();
    let malformed =
        |message: &str| PoolError::Malformed { pool: pool.to_owned(), path: path.clone(), message: message.to_owned() };
    match kind.as_str() {
        "dir" | "fs" | "netfs" => {
            let target = raw.target.and_then(|t| t.path).ok_or_else(|| malformed("no <target><path>"))?;
            Ok(Path::new(target.trim()).join(volume))
        }
        "logical" => {
            let vg = raw.source.and_then(|s| s.name).ok_or_else(|| malformed("no <source><name> (volume group)"))?;
            if !safe_component(vg.trim()) {
                return Err(malformed("invalid volume group name"));
            }
            Ok(Path::new("/dev").join(vg.trim()).join(volume))
        }
        _ => Err(PoolError::Unsupported { pool: pool.to_owned(), kind }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().expect("dir");
        let run = root.path().join("run");
        let etc = root.path().join("etc");
        std::fs::create_dir_all(run.join("storage")).expect("mkdir");
        std::fs::create_dir_all(etc.join("storage")).expect("mkdir");
        (root, run, etc)
    }

    #[test]
    fn dir_pool_from_config_and_state() {
        let (_root, run, etc) = dirs();
        std::fs::write(
            etc.join("storage/images.xml"),
            "<pool type='dir'><name>images</name><target><path>/var/lib/libvirt/images</path></target></pool>",
        )
        .expect("write");
        assert_eq!(
            resolve("images", "a.qcow2", &run, &etc).expect("resolve"),
            PathBuf::from("/var/lib/libvirt/images/a.qcow2")
        );
        std::fs::write(
            run.join("storage/images.xml"),
            "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n<poolstate version='1'><pool type='dir'><name>images</name><target><path>/srv/imgs</path></target></pool></poolstate>",
        )
        .expect("write");
        assert_eq!(resolve("images", "a.qcow2", &run, &etc).expect("resolve"), PathBuf::from("/srv/imgs/a.qcow2"));
    }

    #[test]
    fn logical_pool() {
        let (_root, run, etc) = dirs();
        std::fs::write(etc.join("storage/vg.xml"), "<pool type='logical'><name>vg</name><source><name>vg0</name></source><target><path>/dev/vg0</path></target></pool>").expect("write");
        assert_eq!(resolve("vg", "lv1", &run, &etc).expect("resolve"), PathBuf::from("/dev/vg0/lv1"));
    }

    #[test]
    fn errors() {
        let (_root, run, etc) = dirs();
        assert!(matches!(resolve("nope", "v", &run, &etc), Err(PoolError::NotFound { .. })));
        assert!(matches!(resolve("../x", "v", &run, &etc), Err(PoolError::BadPoolName { .. })));
        std::fs::write(etc.join("storage/p.xml"), "<pool type='rbd'><name>p</name></pool>").expect("write");
        assert!(matches!(resolve("p", "v", &run, &etc), Err(PoolError::Unsupported { .. })));
        assert!(matches!(resolve("p", "../../etc/shadow", &run, &etc), Err(PoolError::BadVolumeName { .. })));
    }
}
