//! `lockhook sanlock init | join | status`: formatting the lease area once per fleet, joining
//! this host at boot, and showing the lockspace.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::area::{self, Area, AreaError};
use super::hosts;
use crate::config::Config;
use crate::sanlock::{Code, Disk, Geometry, LoadError, Membership, Name, Sanlock, SanlockError};

/// A file lease area that does not exist yet is created this big (sparse): room for 1020
/// leases at 1 MiB each.
const NEW_FILE_LEASES: u64 = 1020;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("engine = \"sanlock\" needs [sanlock] lease_area and host_id in the config")]
    NotConfigured,
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("sanlock daemon")]
    Daemon(#[source] SanlockError),
    #[error("lease area {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lease area {path} is in use (mounted, or held open exclusively); not formatting it")]
    InUse { path: PathBuf },
    #[error("lease area {path} already holds lockspace {found}; not overwriting it")]
    Foreign { path: PathBuf, found: String },
    #[error(
        "lease area {path} is {size} bytes: too small for a lockspace, host table, index and one lease ({min} bytes)"
    )]
    TooSmall { path: PathBuf, size: u64, min: u64 },
    #[error(transparent)]
    Area(#[from] AreaError),
    #[error("{what}")]
    Sanlock {
        what: String,
        #[source]
        source: SanlockError,
    },
}

fn lease_area(config: &Config) -> Result<(PathBuf, u64), AdminError> {
    match (&config.sanlock.lease_area, config.sanlock.host_id) {
        (Some(path), id) if (1..=2000).contains(&id) => Ok((path.clone(), id)),
        _ => Err(AdminError::NotConfigured),
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> AdminError + '_ {
    move |source| AdminError::Io { path: path.to_owned(), source }
}

/// Formats the lease area: lockspace, empty host table, resource index. An area that already
/// holds lockhook's lockspace is left alone (the message says so); one holding anything else
/// that sanlock recognises, or a block device in use, is refused.
pub fn init(config: &Config) -> Result<String, AdminError> {
    let (path, _) = lease_area(config)?;
    let sanlock = Sanlock::load()?;
    sanlock.version().map_err(AdminError::Daemon)?;
    if let Ok(info) = sanlock.read_lockspace(&Disk::new(&path, 0)) {
        if info.name == Name::fit(super::LOCKSPACE) {
            return Ok(format!(
                "lease area {} is formatted already (lockspace {}, io_timeout {}); nothing done",
                path.display(),
                info.name,
                info.io_timeout
            ));
        }
        return Err(AdminError::Foreign { path, found: info.name.to_string() });
    }
    let geometry = Area::new_geometry(&path);
    let area = Area::with_geometry(&path, geometry).expect("explicit geometry");
    prepare_storage(&area)?;
    let size = area::size(&path).map_err(io_err(&path))?;
    let capacity = area.capacity(size);
    if capacity == 0 {
        return Err(AdminError::TooSmall { path, size, min: (area::FIRST_LEASE_UNIT + 1) * area.align });
    }
    let sanlock_err = |what: &str| {
        let what = format!("{what} at {}", path.display());
        move |source| AdminError::Sanlock { what, source }
    };
    let name = Name::fit(super::LOCKSPACE);
    sanlock
        .write_lockspace(&name, &Disk::new(&path, 0), geometry, config.sanlock.io_timeout)
        .map_err(sanlock_err("cannot write the lockspace"))?;
    zero_host_table(&area).map_err(io_err(&path))?;
    let max = u32::try_from(capacity).unwrap_or(16000);
    sanlock.format_rindex(&area.rindex(), geometry, max).map_err(sanlock_err("cannot format the resource index"))?;
    Ok(format!(
        "lease area {} formatted: lockspace {}, {} hosts, room for {capacity} leases of {} KiB; now run `lockhook sanlock join` on every host",
        path.display(),
        super::LOCKSPACE,
        if area.sector == 512 { 2000 } else { 2000.min(area.align / area.sector) },
        area.align / 1024
    ))
}

/// Creates a missing file area (sparse); makes sure a block device is not in use.
fn prepare_storage(area: &Area) -> Result<(), AdminError> {
    let path = &area.path;
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => {
            // O_EXCL on a block device fails with EBUSY while it is mounted or claimed.
            match OpenOptions::new().read(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC).open(path) {
                Ok(_) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(AdminError::InUse { path: path.clone() }),
                Err(e) => Err(io_err(path)(e)),
            }
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(io_err(path))?;
            file.set_len((area::FIRST_LEASE_UNIT + NEW_FILE_LEASES) * area.align).map_err(io_err(path))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

fn zero_host_table(area: &Area) -> io::Result<()> {
    // A table of names left from an earlier format must not name today's hosts.
    hosts::clear_all(area)
}

/// Joins this host to lockhook's lockspace (and libvirt's, with `libvirt_disk_lease_dir`) and
/// records its name in the host table. Blocks while sanlock acquires the host id: about
/// 2 × io_timeout, longer after an unclean shutdown.
pub fn join(config: &Config) -> Result<String, AdminError> {
    let (path, host_id) = lease_area(config)?;
    let sanlock = Sanlock::load()?;
    sanlock.version().map_err(AdminError::Daemon)?;
    let area = Area::open(&sanlock, &path)?;
    let libvirt = config.sanlock.libvirt_disk_lease_dir.clone();
    let io_timeout = config.sanlock.io_timeout;
    // Both joins wait on the same clock: in parallel.
    let libvirt_join = libvirt.map(|dir| std::thread::spawn(move || join_libvirt(sanlock, &dir, host_id, io_timeout)));
    let mut lines = vec![join_one(&sanlock, &area.lockspace(host_id), io_timeout)?];
    let name = crate::state::hostname();
    hosts::write(&area, host_id, &name).map_err(io_err(&path))?;
    if let Some(handle) = libvirt_join {
        lines.push(handle.join().map_err(|_| AdminError::NotConfigured)??);
    }
    lines.push(format!("host table: host_id {host_id} is {name}"));
    Ok(lines.join("\n"))
}

/// Joins `ls` with `io_timeout`, or with at least half the one its slot for this host records:
/// joining waits twice the recorded one, and the new host lease expires after 8 × the one joined
/// with, so a host joining with less than a quarter of the recorded one loses its lease as it
/// gets it and the daemon drops the lockspace at once ("check_our_lease failed"). That happens
/// where libvirt's driver formatted its lockspace (with the daemon's default, 10 s), or where
/// `io_timeout` was lowered after `lockhook sanlock init`. Half, not all of it: each join records
/// what it joined with, so the next joins step down to `io_timeout` (10, 5, 3, 2) instead of
/// keeping the largest for ever. A recorded value beyond what the config allows is capped there.
fn join_one(sanlock: &Sanlock, ls: &crate::sanlock::Lockspace, io_timeout: u32) -> Result<String, AdminError> {
    let what = format!("{}:{}:{}:0", ls.name, ls.host_id, ls.disk.path.display());
    if sanlock.inq_lockspace(ls).map_err(AdminError::Daemon)? == Membership::Joined {
        return Ok(format!("lockspace {what}: joined already"));
    }
    let recorded = match sanlock.read_host_slot(&ls.disk, ls.host_id) {
        Ok(slot) => slot.io_timeout.min(crate::config::MAX_IO_TIMEOUT),
        Err(e) => {
            log::warn!(
                "lockspace {what}: cannot read the io_timeout its slot records ({e}); joining with {io_timeout} s"
            );
            0
        }
    };
    let (io_timeout, why) = match recorded.div_ceil(2) {
        half if half > io_timeout => (
            half,
            format!(
                " with io_timeout {half} s, half the {recorded} s its slot records (io_timeout here: {io_timeout} s)"
            ),
        ),
        _ => (io_timeout, String::new()),
    };
    let started = std::time::Instant::now();
    match sanlock.add_lockspace(ls, io_timeout) {
        Ok(()) => Ok(format!("lockspace {what}: joined in {:.1} s{why}", started.elapsed().as_secs_f64())),
        Err(SanlockError::AddLockspace { code: Code::Exists, .. }) => Ok(format!("lockspace {what}: joined already")),
        Err(source) => Err(AdminError::Sanlock { what: format!("cannot join lockspace {what}"), source }),
    }
}

/// libvirt's `__LIBVIRT__DISKS__` lockspace: created as libvirt's driver creates it when
/// missing (a 0600 file), then joined. It is formatted with the `io_timeout` this host joins
/// with, not the daemon's default (10 s) as libvirt's driver does (see `join_one`: the hosts
/// then join with their own). One libvirt's driver formatted is joined with at least half the
/// io_timeout it records.
fn join_libvirt(sanlock: Sanlock, dir: &Path, host_id: u64, io_timeout: u32) -> Result<String, AdminError> {
    let ls = area::libvirt_lockspace(dir, host_id);
    let path = ls.disk.path.clone();
    let created =
        OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&path);
    match created {
        Ok(_) => {
            sanlock.write_lockspace(&ls.name, &ls.disk, Geometry::Auto, io_timeout).map_err(|source| {
                AdminError::Sanlock { what: format!("cannot format libvirt's lockspace at {}", path.display()), source }
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    join_one(&sanlock, &ls, io_timeout)
}

/// What `lockhook sanlock status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub daemon: Option<String>,
    pub lease_area: PathBuf,
    pub host_id: u64,
    pub joined: Option<String>,
    pub libvirt_lockspace: Option<String>,
    pub hosts: Vec<HostLine>,
    pub leases: Vec<HeldLine>,
}

#[derive(Debug, Serialize)]
pub struct HostLine {
    pub host_id: u64,
    pub name: Option<String>,
    pub state: String,
    pub generation: u64,
    pub this_host: bool,
}

#[derive(Debug, Serialize)]
pub struct HeldLine {
    pub guest: String,
    pub uuid: String,
    pub mode: String,
    pub what: String,
    pub lease: String,
    pub pending: bool,
}

fn membership(sanlock: &Sanlock, ls: &crate::sanlock::Lockspace) -> String {
    match sanlock.inq_lockspace(ls) {
        Ok(Membership::Joined) => "joined".into(),
        Ok(Membership::Changing) => "joining or leaving".into(),
        Ok(Membership::Absent) => "not joined (run `lockhook sanlock join`)".into(),
        Err(e) => crate::error_chain(&e),
    }
}

pub fn status(config: &Config) -> Result<Status, AdminError> {
    let (path, host_id) = lease_area(config)?;
    let mut status = Status {
        daemon: None,
        lease_area: path.clone(),
        host_id,
        joined: None,
        libvirt_lockspace: None,
        hosts: Vec::new(),
        leases: Vec::new(),
    };
    let paths = crate::paths::Paths::new(&config.run_dir);
    for entry in crate::state::list(&paths).unwrap_or_default().into_iter().filter(|e| e.alive) {
        let Ok(state) = entry.state else { continue };
        let held = state.sanlock.iter().map(|h| (h, false)).chain(state.sanlock_pending.iter().map(|h| (h, true)));
        for (lease, pending) in held {
            status.leases.push(HeldLine {
                guest: state.name.clone(),
                uuid: state.uuid.to_string(),
                mode: lease.mode.as_str().into(),
                what: lease.what.clone(),
                lease: lease.display(),
                pending,
            });
        }
    }
    let sanlock = Sanlock::load()?;
    status.daemon = Some(match sanlock.version() {
        Ok(v) => format!("sanlock {v}"),
        Err(e) => return Ok(Status { daemon: Some(format!("not reachable: {}", crate::error_chain(&e))), ..status }),
    });
    let area = Area::open(&sanlock, &path)?;
    status.joined = Some(membership(&sanlock, &area.lockspace(host_id)));
    if let Some(dir) = &config.sanlock.libvirt_disk_lease_dir {
        status.libvirt_lockspace = Some(membership(&sanlock, &area::libvirt_lockspace(dir, host_id)));
    }
    let names = hosts::read_all(&area).unwrap_or_default();
    match sanlock.get_hosts(&Name::fit(super::LOCKSPACE), None) {
        Ok(list) => {
            for h in list {
                status.hosts.push(HostLine {
                    host_id: h.host_id,
                    name: names.get(&h.host_id).cloned(),
                    state: h.state.as_str().into(),
                    generation: h.generation,
                    this_host: h.host_id == host_id,
                });
            }
        }
        Err(_) => {
            // Not joined: the table alone.
            for (id, name) in names {
                status.hosts.push(HostLine {
                    host_id: id,
                    name: Some(name),
                    state: "unknown (not joined)".into(),
                    generation: 0,
                    this_host: id == host_id,
                });
            }
        }
    }
    Ok(status)
}

impl Status {
    pub fn print(&self, out: &mut dyn io::Write) -> io::Result<()> {
        writeln!(out, "daemon: {}", self.daemon.as_deref().unwrap_or("unknown"))?;
        writeln!(
            out,
            "lockspace {} at {} (host_id {}): {}",
            super::LOCKSPACE,
            self.lease_area.display(),
            self.host_id,
            self.joined.as_deref().unwrap_or("unknown")
        )?;
        if let Some(libvirt) = &self.libvirt_lockspace {
            writeln!(out, "lockspace {}: {libvirt}", super::LIBVIRT_LOCKSPACE)?;
        }
        writeln!(out, "hosts:")?;
        for h in &self.hosts {
            let me = if h.this_host { "  (this host)" } else { "" };
            let name = h.name.as_deref().unwrap_or("-");
            writeln!(out, "  {:>4}  {name:<24} {:<8} generation {}{me}", h.host_id, h.state, h.generation)?;
        }
        writeln!(out, "leases held by this host's guests:")?;
        if self.leases.is_empty() {
            writeln!(out, "  none")?;
        }
        for l in &self.leases {
            let pending = if l.pending { "  (awaited from the migration source)" } else { "" };
            writeln!(out, "  {} ({})  {}  {}  {}{pending}", l.guest, l.uuid, l.mode, l.what, l.lease)?;
        }
        Ok(())
    }
}
