//! `/etc/lockhook/lockhook.toml`. Every key and its default is documented in
//! `conf/lockhook.toml`; `Config::default()` is the source of truth for the defaults.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config lives unless `--config` or `LOCKHOOK_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/lockhook/lockhook.toml";
/// Environment variable that overrides the config path (tests; libvirt scrubs the environment of
/// hooks, so production hooks always read `DEFAULT_PATH`).
pub const ENV_PATH: &str = "LOCKHOOK_CONFIG";

/// The largest `[sanlock] io_timeout` (seconds).
pub const MAX_IO_TIMEOUT: u32 = 300;

/// What to do with `<readonly/>` or `<shareable/>` disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedPolicy {
    /// Take a shared lock: any number of readers/sharers, but no exclusive writer.
    Shared,
    /// Take no lock at all (virtlockd's behaviour for read-only disks).
    None,
}

/// What to do when a disk's image does not exist at `prepare` (`on_missing`), or when lockhook
/// cannot tell what a disk is (`on_unidentified`: a `scsi`/`mpath` pool volume, an unknown pool
/// type, a missing or broken pool definition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingPolicy {
    /// Refuse the start, naming the disk and why.
    Fail,
    /// Start without a lock on it (logged).
    Skip,
}

/// What a holder does when a disk hot-plugged into its running guest is locked by someone else
/// (libvirt runs no hook for hot-plug, so it cannot be refused; it is noticed afterwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// Log it loudly and show it in `lockhook status`; keep retrying the lock.
    Warn,
    /// As `warn`, and pause the guest through libvirt (`virsh suspend`, from the holder).
    Pause,
}

/// What a `reconnect` hook does when it cannot re-take a running guest's locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectPolicy {
    /// Log loudly and let the guest run (a failing reconnect hook makes libvirt kill the guest).
    Keep,
    /// Fail the hook, so libvirt kills the guest.
    Kill,
}

/// How locks reach other hosts. Both engines take the local OFD locks (same-host exclusion,
/// `check` and `run` work the same); `sanlock` adds a sanlock lease per resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// OFD locks, carried to other hosts by the shared filesystem's lock manager.
    #[default]
    Ofd,
    /// Also a sanlock lease on shared storage per resource (see `engine`).
    Sanlock,
}

/// What the sanlock daemon's killpath does to a guest when this host loses its lockspace lease
/// (storage cut off): the guest must stop writing before other hosts may take its leases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockLost {
    /// SIGKILL the guest's QEMU.
    #[default]
    Kill,
    /// SIGSTOP the guest's QEMU (it writes nothing more; its holder kills it if it is resumed
    /// without its leases).
    Pause,
}

/// `[sanlock]`: the sanlock engine's lease area and this host's place in it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SanlockConfig {
    /// This host in the lockspace, 1..=2000, unique in the fleet (0: not set).
    pub host_id: u64,
    /// The block device or file on shared storage holding lockhook's lockspace, host table and
    /// resource index (`lockhook sanlock init`).
    pub lease_area: Option<PathBuf>,
    /// Seconds; sanlock's lease timing scales with it (join ≈ 2x, failure ≈ 8x).
    pub io_timeout: u32,
    pub on_lock_lost: LockLost,
    /// libvirt's sanlock driver's `disk_lease_dir`: also take the automatic disk lease libvirt
    /// would take (lockspace `__LIBVIRT__DISKS__`), for fleets mixing both.
    pub libvirt_disk_lease_dir: Option<PathBuf>,
}

impl Default for SanlockConfig {
    fn default() -> Self {
        SanlockConfig {
            host_id: 0,
            lease_area: None,
            io_timeout: 10,
            on_lock_lost: LockLost::Kill,
            libvirt_disk_lease_dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub engine: Engine,
    pub run_dir: PathBuf,
    pub lockspace_dir: PathBuf,
    /// The identity of the shared lockspace (`lockhook lockspace init`); when set, every hook
    /// call that locks checks that `lockspace_dir` is that lockspace (see `lockspace_id`).
    pub lockspace_id: Option<crate::domain::Uuid>,
    pub readonly: SharedPolicy,
    pub shareable: SharedPolicy,
    pub backing_chains: bool,
    pub on_missing: MissingPolicy,
    pub on_unidentified: MissingPolicy,
    pub on_reconnect_failure: ReconnectPolicy,
    pub on_conflict: ConflictPolicy,
    pub trust_migrations: bool,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub libvirt_config_dir: PathBuf,
    pub libvirt_run_dir: PathBuf,
    pub sanlock: SanlockConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            engine: Engine::Ofd,
            run_dir: "/run/lockhook".into(),
            lockspace_dir: "/var/lib/lockhook".into(),
            lockspace_id: None,
            readonly: SharedPolicy::Shared,
            shareable: SharedPolicy::Shared,
            backing_chains: true,
            on_missing: MissingPolicy::Fail,
            on_unidentified: MissingPolicy::Fail,
            on_reconnect_failure: ReconnectPolicy::Keep,
            on_conflict: ConflictPolicy::Warn,
            trust_migrations: false,
            log_level: "info".into(),
            log_file: None,
            libvirt_config_dir: "/etc/libvirt".into(),
            libvirt_run_dir: "/run/libvirt".into(),
            sanlock: SanlockConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}")]
    Parse { path: PathBuf, source: ParseError },
    #[error("{path}: must be owned by root and not writable by others (owner uid {uid}, mode {mode:o}); refusing it")]
    Insecure { path: PathBuf, uid: u32, mode: u32 },
    #[error("{path}: {key} = {value:?}: {why}")]
    Invalid { path: PathBuf, key: &'static str, value: String, why: &'static str },
}

/// Why a config text does not parse, and where (the line and column of the offending text,
/// when the parser can tell).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", where_.map(|(line, column)| format!("line {line}, column {column}: ")).unwrap_or_default())]
pub struct ParseError {
    pub where_: Option<(usize, usize)>,
    pub message: String,
}

impl ParseError {
    fn new(text: &str, err: &toml::de::Error) -> ParseError {
        let where_ = err.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            (before.matches('\n').count() + 1, before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1)
        });
        let message = err.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        ParseError { where_, message }
    }
}

/// A config file's identity and times (see `Config::stamp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp([u64; 9]);

impl Config {
    /// Parses TOML text. Pure: no file access. Unknown keys are errors naming the key and line.
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        toml::from_str(text).map_err(|e| ParseError::new(text, &e))
    }

    /// Reads the config at `path`; a missing file means all defaults. The file must belong to
    /// root and must not be writable by group or others: it decides which files get locked.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
        };
        // Root's lockhook (the hook, holders) trusts only a root-owned config. A process that is
        // not root may also use a config of its own (it can lock only what it may open anyway):
        // that is how the test suite runs for a contributor without root.
        let euid = nix::unistd::geteuid().as_raw();
        if (meta.uid() != 0 && meta.uid() != euid) || meta.mode() & 0o022 != 0 {
            return Err(ConfigError::Insecure { path: path.to_owned(), uid: meta.uid(), mode: meta.mode() & 0o7777 });
        }
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Config::parse(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.validate(path)?;
        Ok(config)
    }

    /// What `load` would read at `path`, as far as `stat` can tell: equal stamps mean the same
    /// file, unchanged (inode, size, times to the nanosecond, owner, mode). `None` when it
    /// cannot be read.
    pub fn stamp(path: &Path) -> Option<Stamp> {
        let m = fs::metadata(path).ok()?;
        Some(Stamp([
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            m.ctime() as u64,
            m.ctime_nsec() as u64,
            u64::from(m.uid()),
            u64::from(m.mode()),
        ]))
    }

    /// Checks what serde cannot: absolute directories and a known log level.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let dirs: [(&'static str, &Path); 4] = [
            ("run_dir", &self.run_dir),
            ("lockspace_dir", &self.lockspace_dir),
            ("libvirt_config_dir", &self.libvirt_config_dir),
            ("libvirt_run_dir", &self.libvirt_run_dir),
        ];
        for (key, dir) in dirs {
            if !dir.is_absolute() {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    key,
                    value: dir.display().to_string(),
                    why: "must be an absolute path",
                });
            }
        }
        self.validate_sanlock(path)?;
        if self.log_level.parse::<log::LevelFilter>().is_err() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: "log_level",
                value: self.log_level.clone(),
                why: "must be one of off, error, warn, info, debug, trace",
            });
        }
        Ok(())
    }

    fn validate_sanlock(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, value: String, why| ConfigError::Invalid { path: path.to_owned(), key, value, why };
        let s = &self.sanlock;
        for (key, dir) in
            [("sanlock.lease_area", &s.lease_area), ("sanlock.libvirt_disk_lease_dir", &s.libvirt_disk_lease_dir)]
        {
            if let Some(dir) = dir.as_ref().filter(|d| !d.is_absolute()) {
                return Err(invalid(key, dir.display().to_string(), "must be an absolute path"));
            }
        }
        if !(1..=MAX_IO_TIMEOUT).contains(&s.io_timeout) {
            return Err(invalid("sanlock.io_timeout", s.io_timeout.to_string(), "must be 1..=300 seconds"));
        }
        if self.engine == Engine::Sanlock {
            if !(1..=2000).contains(&s.host_id) {
                return Err(invalid(
                    "sanlock.host_id",
                    s.host_id.to_string(),
                    "engine = \"sanlock\" needs this host's id, 1..=2000, unique in the fleet",
                ));
            }
            if s.lease_area.is_none() {
                return Err(invalid("sanlock.lease_area", String::new(), "engine = \"sanlock\" needs the lease area"));
            }
        }
        Ok(())
    }

    pub fn level(&self) -> log::LevelFilter {
        self.log_level.parse().unwrap_or(log::LevelFilter::Info)
    }
}

/// The config path to use: `--config`, else `$LOCKHOOK_CONFIG`, else the default.
pub fn path_from(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_owned)
        .or_else(|| std::env::var_os(ENV_PATH).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_default() {
        assert_eq!(Config::parse("").expect("empty"), Config::default());
    }

    #[test]
    fn shipped_config_matches_defaults() {
        let text = include_str!("../conf/lockhook.toml");
        assert_eq!(Config::parse(text).expect("conf/lockhook.toml parses"), Config::default());
    }

    #[test]
    fn keys_parse() {
        let c = Config::parse(
            "run_dir = '/tmp/r'\nreadonly = 'none'\nshareable = 'shared'\nbacking_chains = false\non_missing = 'skip'\non_unidentified = 'skip'\n\
             on_reconnect_failure = 'kill'\nlog_file = '/tmp/l'\n",
        )
        .expect("parse");
        assert_eq!(c.run_dir, PathBuf::from("/tmp/r"));
        assert_eq!(c.readonly, SharedPolicy::None);
        assert!(!c.backing_chains);
        assert_eq!(c.on_missing, MissingPolicy::Skip);
        assert_eq!(c.on_unidentified, MissingPolicy::Skip);
        assert_eq!(c.on_reconnect_failure, ReconnectPolicy::Kill);
        assert_eq!(c.log_file, Some(PathBuf::from("/tmp/l")));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::parse("run_dir = '/x'\n\nrun_dri = '/y'\n").expect_err("unknown key");
        assert_eq!(err.where_, Some((3, 1)));
        let text = err.to_string();
        assert!(text.contains("run_dri") && text.starts_with("line 3, column 1: "), "{text}");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn bad_values() {
        assert!(Config::parse("readonly = 'exclusive'").is_err());
        assert!(Config::parse("backing_chains = 'yes'").is_err());
        let c = Config::parse("run_dir = 'relative'").expect("parses");
        assert!(c.validate(Path::new("x")).is_err());
        let c = Config::parse("log_level = 'loud'").expect("parses");
        assert!(c.validate(Path::new("x")).is_err());
    }

    #[test]
    fn sanlock_keys() {
        let c = Config::parse(
            "engine = 'sanlock'\n[sanlock]\nhost_id = 7\nlease_area = '/dev/vg/lh'\nio_timeout = 3\non_lock_lost = 'pause'\n",
        )
        .expect("parse");
        assert_eq!(c.engine, Engine::Sanlock);
        assert_eq!((c.sanlock.host_id, c.sanlock.io_timeout, c.sanlock.on_lock_lost), (7, 3, LockLost::Pause));
        c.validate(Path::new("x")).expect("valid");
        let no_id = Config::parse("engine = 'sanlock'\n[sanlock]\nlease_area = '/x'\n").expect("parse");
        assert!(no_id.validate(Path::new("x")).unwrap_err().to_string().contains("sanlock.host_id"));
        let no_area = Config::parse("engine = 'sanlock'\n[sanlock]\nhost_id = 1\n").expect("parse");
        assert!(no_area.validate(Path::new("x")).unwrap_err().to_string().contains("lease_area"));
        assert!(Config::parse("[sanlock]\nhots_id = 1\n").is_err());
        assert!(Config::parse("engine = 'dlm'").is_err());
    }

    #[test]
    fn load_checks_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.toml");
        assert_eq!(Config::load(&path).expect("missing file"), Config::default());
        fs::write(&path, "log_level = 'debug'\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        // Owned by us: root's, or (not root) our own.
        assert_eq!(Config::load(&path).expect("load").log_level, "debug");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(matches!(Config::load(&path), Err(ConfigError::Insecure { .. })));
    }
}
