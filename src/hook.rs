//! The libvirt `qemu` hook contract: argv → event, stdin → domain XML, exit status → verdict.
//!
//! libvirt calls `qemu NAME OP SUBOP EXTRA` with the full domain XML on stdin and waits for the
//! hook to exit. Rules kept here:
//! - nothing is ever written to stdout: for `migrate` and `restore` libvirt takes stdout as
//!   replacement XML;
//! - the hook never calls libvirt (the domain's job is held while the hook runs: deadlock);
//! - `prepare` and `start` may refuse (non-zero aborts the start); `started` and `reconnect`
//!   fail only with cause (a failure kills the running guest); `stopped`/`release` cannot stop
//!   anything, and `release` also follows a refused `prepare`, so it only ever releases the
//!   holder of this guest's UUID, and only when that guest's QEMU is gone;
//! - unknown operations exit 0, so a newer libvirt never blocks a guest.

// A hook call builds at most one HookError before it exits; its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use log::{error, info, warn};

use crate::config::{Config, ConfigError, ReconnectPolicy};
use crate::domain::{Domain, DomainError, Uuid, MAX_XML_BYTES};
use crate::holder::client::{Client, ClientError};
use crate::holder::protocol::Guest;
use crate::holder::spawn::{self, SpawnError};
use crate::lock::Identity;
use crate::lockset::{self, Acquired, Refusal};
use crate::paths::Paths;
use crate::state;
use crate::state::Resource;
use crate::storage::{self, Request, StorageError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Prepare,
    Start,
    Started,
    Stopped,
    Release,
    Migrate,
    Restore,
    Reconnect,
    Attach,
    Other(String),
}

impl Op {
    fn parse(text: &str) -> Op {
        match text {
            "prepare" => Op::Prepare,
            "start" => Op::Start,
            "started" => Op::Started,
            "stopped" => Op::Stopped,
            "release" => Op::Release,
            "migrate" => Op::Migrate,
            "restore" => Op::Restore,
            "reconnect" => Op::Reconnect,
            "attach" => Op::Attach,
            other => Op::Other(other.to_owned()),
        }
    }
}

/// One hook call: `qemu NAME OP SUBOP EXTRA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookEvent {
    pub domain: String,
    pub op: Op,
    pub sub_op: String,
    pub extra: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("usage: qemu NAME OPERATION SUB-OPERATION EXTRA (as libvirt calls it); got {0} argument(s)")]
    Usage(usize),
    #[error("configuration")]
    Config(#[from] ConfigError),
    #[error("cannot read the domain XML from stdin")]
    ReadXml(#[source] std::io::Error),
    #[error("guest {name}")]
    Domain {
        name: String,
        #[source]
        source: DomainError,
    },
    #[error("guest {name}")]
    Storage {
        name: String,
        #[source]
        source: StorageError,
    },
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Lockspace(#[from] crate::lockspace_id::IdError),
    #[error("guest {name} ({uuid}) is already running on this host (QEMU pid {pid}); not locking it twice")]
    AlreadyRunning { name: String, uuid: Uuid, pid: u32 },
    #[error("guest {name} ({uuid}) is being started on this host already ({age} s ago); not locking it twice")]
    StartInProgress { name: String, uuid: Uuid, age: u64 },
    #[error(
        "guest {name} ({uuid}) is still running on another host and this is not an incoming migration ({why}); \
         stop it there first"
    )]
    NotIncoming { name: String, uuid: Uuid, why: String },
    #[error("guest {name}: cannot note its admitted migration hand-over in the run directory")]
    NoteAdmitted {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest {name} ({uuid}): cannot start its lock holder")]
    Spawn {
        name: String,
        uuid: Uuid,
        #[source]
        source: SpawnError,
    },
    #[error("guest {name} ({uuid}): lock holder")]
    Holder {
        name: String,
        uuid: Uuid,
        #[source]
        source: ClientError,
    },
}

impl HookError {
    /// The lines the user sees (libvirt appends them to "Hook script execution failed").
    pub fn lines(&self) -> Vec<String> {
        match self {
            HookError::Refused(refusal) => refusal.lines.clone(),
            other => vec![crate::error_chain(other)],
        }
    }
}

/// Whether this binary was started as libvirt's hook: as `.../hooks/qemu`, or as any file in
/// `.../hooks/qemu.d/` (libvirt runs every executable there, with its path as `argv[0]`).
pub fn invoked_as_hook(argv0: &std::ffi::OsStr) -> bool {
    let path = Path::new(argv0);
    path.file_name().is_some_and(|n| n == "qemu")
        || path.parent().and_then(Path::file_name).is_some_and(|d| d == "qemu.d")
}

impl HookEvent {
    /// Parses the arguments after the program name.
    pub fn parse(args: &[OsString]) -> Result<HookEvent, HookError> {
        if args.len() < 2 {
            return Err(HookError::Usage(args.len()));
        }
        let text = |i: usize| args.get(i).map(|a| a.to_string_lossy().into_owned()).unwrap_or_else(|| "-".to_owned());
        Ok(HookEvent { domain: text(0), op: Op::parse(&text(1)), sub_op: text(2), extra: text(3) })
    }
}

/// Everything a hook call needs.
pub(crate) struct Ctx {
    pub(crate) config: Config,
    pub(crate) config_path: PathBuf,
    pub(crate) paths: Paths,
}

impl Ctx {
    pub(crate) fn new(config: Config, config_path: &Path) -> Ctx {
        Ctx { paths: Paths::new(&config.run_dir), config, config_path: config_path.to_owned() }
    }
}

fn read_xml(stdin: &mut dyn Read) -> Result<Vec<u8>, HookError> {
    let mut buf = Vec::new();
    stdin.take(MAX_XML_BYTES as u64 + 1).read_to_end(&mut buf).map_err(HookError::ReadXml)?;
    Ok(buf)
}

fn parse_domain(event: &HookEvent, stdin: &mut dyn Read) -> Result<Domain, HookError> {
    let bytes = read_xml(stdin)?;
    Domain::parse(&bytes).map_err(|source| HookError::Domain { name: event.domain.clone(), source })
}

/// Runs one hook call.
pub fn run(event: &HookEvent, stdin: &mut dyn Read, config_path: &Path) -> Result<(), HookError> {
    // Operations that lockhook ignores never read the config: a broken config must not stop
    // migrations or restores that lockhook has no part in.
    match event.op {
        Op::Prepare | Op::Start | Op::Started | Op::Release | Op::Reconnect | Op::Migrate | Op::Restore => {}
        Op::Stopped | Op::Attach | Op::Other(_) => return Ok(()),
    }
    let config = Config::load(config_path)?;
    crate::logging::init_daemon(&config);
    let ctx = Ctx::new(config, config_path);
    // Self-healing first: a running guest whose holder died gets its locks back before this
    // call could hand them to someone else.
    adopt_orphans_bounded(&ctx);
    // A lockspace that is not the fleet's (its filesystem not mounted) would keep every lock on
    // this host: refuse what can be refused, say it loudly where refusing would kill a guest.
    let lockspace = match (&event.op, &ctx.config.lockspace_id) {
        (Op::Release | Op::Restore, _) | (_, None) => None,
        (_, Some(id)) => Some(crate::lockspace_id::verify_bounded(&ctx.config.lockspace_dir, id, ADOPT_BOUND)),
    };
    match (&event.op, lockspace) {
        (Op::Prepare | Op::Start | Op::Migrate, Some(Err(e))) => return Err(HookError::Lockspace(e)),
        (Op::Started | Op::Reconnect, Some(Err(e))) => {
            error!("guest {}: locks are NOT shared with other hosts: {}", event.domain, crate::error_chain(&e))
        }
        _ => {}
    }
    match event.op {
        Op::Prepare => prepare(&ctx, &parse_domain(event, stdin)?),
        Op::Start => start(&ctx, &parse_domain(event, stdin)?),
        Op::Started => {
            let domain = parse_domain(event, stdin)?;
            crate::migration::forget_incoming(&ctx.paths, &domain.uuid);
            // A guest waiting for a migration source must be one: refuse (libvirt then stops
            // it) a QEMU that is not incoming, before anything else.
            verify_incoming(&ctx, &domain)?;
            if let Err(e) = ensure(&ctx, &domain) {
                // The guest runs already; failing here would kill it. Say it loudly instead.
                error!(
                    "guest {} ({}): running WITHOUT lockhook's locks: {}",
                    domain.name,
                    domain.uuid,
                    e.lines().join("; ")
                );
            }
            Ok(())
        }
        Op::Reconnect => reconnect(&ctx, &parse_domain(event, stdin)?),
        Op::Migrate => {
            // Destination of an incoming live migration. Note it for `prepare` and `start`, and
            // print nothing: libvirt reads stdout as replacement XML here.
            let domain = parse_domain(event, stdin)?;
            crate::rundir::ensure_run_dir(ctx.paths.run_dir()).ok();
            if let Err(e) = crate::migration::note_incoming(&ctx.paths, &domain.uuid) {
                warn!("guest {} ({}): cannot note the incoming migration: {e}", domain.name, domain.uuid);
            }
            info!("guest {} ({}): incoming live migration", domain.name, domain.uuid);
            Ok(())
        }
        Op::Release => release(&ctx, event, stdin),
        Op::Restore => {
            // A restore's QEMU runs with `-incoming` too: a marker left by a failed migration must
            // not make it pass for one. Print nothing: stdout is XML here.
            if let Ok(domain) = parse_domain(event, stdin) {
                crate::migration::forget_incoming(&ctx.paths, &domain.uuid);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// How long a hook call waits for the re-adoption of other guests (see `adopt_orphans_bounded`).
const ADOPT_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `reconcile::adopt_orphans` on a thread and waits for it at most `ADOPT_BOUND`: the
/// images of *other* guests may sit on storage that does not answer (a dead NFS server), and
/// that must not hang this guest's hook. A pass still running when this call is done dies with
/// the hook process; its fds close, so it leaves no lock behind, and the next call tries again.
fn adopt_orphans_bounded(ctx: &Ctx) {
    let (tx, rx) = std::sync::mpsc::channel();
    let ctx_copy = Ctx::new(ctx.config.clone(), &ctx.config_path);
    let spawned = std::thread::Builder::new().name("adopt".into()).spawn(move || {
        let _ = tx.send(crate::reconcile::adopt_orphans(&ctx_copy));
    });
    if let Err(e) = spawned {
        warn!("cannot start the re-adoption pass: {e}");
        return;
    }
    match rx.recv_timeout(ADOPT_BOUND) {
        Ok(healed) => {
            for line in healed.adopted.iter().chain(&healed.failed) {
                warn!("{line}");
            }
        }
        Err(_) => warn!(
            "re-adopting guests whose holder died takes longer than {} s (their storage does not answer?); \
             going on without waiting",
            ADOPT_BOUND.as_secs()
        ),
    }
}

fn guest(domain: &Domain) -> Guest {
    Guest { name: domain.name.clone(), uuid: domain.uuid.clone() }
}

fn holder_err(guest: &Guest) -> impl Fn(ClientError) -> HookError + '_ {
    move |source| HookError::Holder { name: guest.name.clone(), uuid: guest.uuid.clone(), source }
}

/// The requests for `domain`, with skip notes logged.
fn requests(ctx: &Ctx, domain: &Domain) -> Result<Vec<Request>, HookError> {
    let mut plan = crate::resource::plan(domain, &ctx.config);
    let requests = storage::resolve(&mut plan, &ctx.config)
        .map_err(|source| HookError::Storage { name: domain.name.clone(), source })?;
    for note in &plan.skipped {
        info!("guest {} ({}): {note}; not locked", domain.name, domain.uuid);
    }
    for note in &plan.unlocked {
        warn!("guest {} ({}): {note}", domain.name, domain.uuid);
    }
    Ok(requests)
}

/// A holder without QEMU this old belongs to a start that was abandoned (libvirtd died between
/// `prepare` and `started`); a younger one to a start still in progress.
const STALE_START: std::time::Duration = std::time::Duration::from_secs(60);

/// Takes every lock of `domain` or none. During a verified incoming migration (`incoming`, see
/// `migration`), a lock the same guest (UUID) holds on another host, as the owner records show,
/// is not a refusal: it comes back as pending, for the holder to take when the source lets go.
fn acquire(
    ctx: &Ctx,
    domain: &Domain,
    held: &HashSet<Identity>,
    incoming: bool,
) -> Result<(Acquired, Vec<Resource>), HookError> {
    let requests = requests(ctx, domain)?;
    let mut notes = Vec::new();
    let (acquired, failures) = lockset::acquire_available(&requests, held, &ctx.config, &ctx.paths, &mut notes);
    for note in notes {
        warn!("guest {} ({}): {note}", domain.name, domain.uuid);
    }
    let migrating = incoming && !failures.busy.is_empty();
    let mut lines = failures.errors;
    let mut pending = Vec::new();
    for busy in failures.busy {
        if !migrating {
            lines.push(busy.line);
            continue;
        }
        match crate::migration::verdict(&ctx.config, domain, &busy) {
            Ok(()) => pending.push(Resource {
                path: busy.request.path,
                key: busy.key,
                label: busy.request.label,
                lock_file: busy.request.lock_file,
                mode: busy.request.mode,
                roles: busy.roles,
                identity: busy.identity,
                since: crate::clock::now(),
            }),
            Err(line) => lines.push(line),
        }
    }
    if !lines.is_empty() {
        for line in &lines {
            warn!("guest {} ({}) refused: {line}", domain.name, domain.uuid);
        }
        // Invariant: discarding `acquired` here releases every lock taken above and removes
        // the lease files this call created.
        for path in acquired.discard() {
            info!(
                "guest {} ({}): removed lease file {} created for this refused start",
                domain.name,
                domain.uuid,
                path.display()
            );
        }
        return Err(HookError::Refused(Refusal { lines }));
    }
    Ok((acquired, pending))
}

/// Gives `acquired` to the guest's holder, starting one if there is none.
pub(crate) fn hand_over(
    ctx: &Ctx,
    guest: &Guest,
    client: Option<Client>,
    acquired: Acquired,
    pending: Vec<Resource>,
    incoming: bool,
) -> Result<Client, HookError> {
    let client = match client.or_else(|| Client::claim_spare(&ctx.paths, &guest.uuid)) {
        Some(client) => client,
        None => {
            spawn::spawn(&ctx.config_path, &guest.uuid).map_err(|source| HookError::Spawn {
                name: guest.name.clone(),
                uuid: guest.uuid.clone(),
                source,
            })?;
            Client::connect(&ctx.paths, &guest.uuid)
                .map_err(holder_err(guest))?
                .ok_or_else(|| holder_err(guest)(ClientError::Closed))?
        }
    };
    let fds: Vec<_> = acquired.locks.into_iter().map(|l| l.fd).collect();
    fault_point("before-handover");
    client.acquire(guest, &acquired.resources, &fds, &pending, incoming).map_err(holder_err(guest))?;
    // Invariant: `fds` (our copies) are dropped only now, after the holder's ACK.
    drop(fds);
    ensure_spare(ctx);
    for r in &acquired.resources {
        info!("guest {} ({}): locked {} {}", guest.name, guest.uuid, r.mode.as_str(), r.path.display());
    }
    Ok(client)
}

/// Fault injection for tests: `LOCKHOOK_FAULT=<point>` stalls the hook there for a minute so a
/// test can kill it at that point. libvirt scrubs the environment of hooks, so this never
/// triggers under libvirt.
fn fault_point(point: &str) {
    if std::env::var_os("LOCKHOOK_FAULT").is_some_and(|v| v == point) {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// Starts a spare holder in the background when this host has none, for the next start.
fn ensure_spare(ctx: &Ctx) {
    if !crate::holder::spare::exists(&ctx.paths) {
        if let Err(e) = spawn::spawn_spare(&ctx.config_path) {
            warn!("cannot start a spare holder: {}", crate::error_chain(&e));
        }
    }
}

fn prepare(ctx: &Ctx, domain: &Domain) -> Result<(), HookError> {
    if let Some(client) = Client::connect(&ctx.paths, &domain.uuid).map_err(holder_err(&guest(domain)))? {
        let held = client.held().map_err(holder_err(&guest(domain)))?;
        if let Some(pid) = held.qemu_pid {
            return Err(HookError::AlreadyRunning { name: domain.name.clone(), uuid: domain.uuid.clone(), pid });
        }
        if held.age < STALE_START.as_secs() {
            return Err(HookError::StartInProgress {
                name: domain.name.clone(),
                uuid: domain.uuid.clone(),
                age: held.age,
            });
        }
        // A holder whose guest never got a QEMU: left over from a start that failed after
        // `prepare` without a `release` (libvirtd died). Let it go, then start afresh.
        warn!("guest {} ({}): releasing a stale holder before start", domain.name, domain.uuid);
        client.release().map_err(holder_err(&guest(domain)))?;
    }
    // Consumed here whatever happens next: a marker never outlives the start it announced.
    let incoming = crate::migration::take_incoming(&ctx.paths, &domain.uuid);
    let (acquired, pending) = acquire(ctx, domain, &HashSet::new(), incoming)?;
    note_admitted(ctx, domain, &pending)?;
    if acquired.locks.is_empty() && pending.is_empty() {
        info!("guest {} ({}): nothing to lock", domain.name, domain.uuid);
        return Ok(());
    }
    hand_over(ctx, &guest(domain), None, acquired, pending, incoming).map(drop)
}

/// `start`: lock what `prepare` could not see (the chain libvirt detected, resolved volumes).
fn start(ctx: &Ctx, domain: &Domain) -> Result<(), HookError> {
    let client = Client::connect(&ctx.paths, &domain.uuid).map_err(holder_err(&guest(domain)))?;
    let (held, incoming) = match &client {
        Some(c) => {
            let held = c.held().map_err(holder_err(&guest(domain)))?;
            (held.identities.into_iter().collect(), held.incoming)
        }
        None => (HashSet::new(), false),
    };
    let (acquired, pending) = acquire(ctx, domain, &held, incoming)?;
    note_admitted(ctx, domain, &pending)?;
    if acquired.locks.is_empty() && pending.is_empty() {
        return Ok(());
    }
    hand_over(ctx, &guest(domain), client, acquired, pending, incoming).map(drop)
}

/// Makes sure a live holder holds every lock of a running guest and knows its QEMU. Used by
/// `started` and `reconnect`; re-adopts the guest when its holder is gone.
fn ensure(ctx: &Ctx, domain: &Domain) -> Result<(), HookError> {
    let qemu = crate::qemu::find(&domain.name, &domain.uuid, &ctx.config.libvirt_run_dir);
    ensure_running(ctx, domain, qemu)
}

/// `ensure` for a guest whose QEMU process is already known.
pub(crate) fn ensure_running(ctx: &Ctx, domain: &Domain, qemu: Option<(u32, u64)>) -> Result<(), HookError> {
    adopt(ctx, &guest(domain), &requests(ctx, domain)?, qemu)
}

/// Gives a running guest's holder (started if missing) every lock of `requests` that is free,
/// and tells it the QEMU process. The guest runs already, so this takes what it can: locks
/// someone else took meanwhile come back as a refusal *after* the others are held, and the
/// holder keeps retrying them (see `holder::hotplug`).
pub(crate) fn adopt(ctx: &Ctx, guest: &Guest, requests: &[Request], qemu: Option<(u32, u64)>) -> Result<(), HookError> {
    let client = Client::connect(&ctx.paths, &guest.uuid).map_err(holder_err(guest))?;
    let held = match &client {
        Some(c) => c.held().map_err(holder_err(guest))?,
        None => {
            warn!("guest {} ({}): no holder; re-taking its locks", guest.name, guest.uuid);
            crate::holder::client::Held { identities: Vec::new(), qemu_pid: None, age: 0, pending: 0, incoming: false }
        }
    };
    let mut notes = Vec::new();
    let held_ids = held.identities.iter().copied().collect();
    let (acquired, failures) = lockset::acquire_available(requests, &held_ids, &ctx.config, &ctx.paths, &mut notes);
    let lines = failures.lines();
    for note in notes {
        warn!("guest {} ({}): {note}", guest.name, guest.uuid);
    }
    let client = if acquired.locks.is_empty() {
        client
    } else {
        Some(hand_over(ctx, guest, client, acquired, Vec::new(), false)?)
    };
    match (client, qemu) {
        (Some(client), Some((pid, start_time))) if held.qemu_pid != Some(pid) => {
            client.set_qemu(pid, start_time).map_err(holder_err(guest))?
        }
        (_, None) => warn!("guest {} ({}): QEMU process not found; its holder cannot watch it", guest.name, guest.uuid),
        _ => {}
    }
    if lines.is_empty() {
        Ok(())
    } else {
        Err(HookError::Refused(Refusal { lines }))
    }
}

/// Notes that `pending` locks were admitted for `domain` (see `migration::note_admitted`).
fn note_admitted(ctx: &Ctx, domain: &Domain, pending: &[Resource]) -> Result<(), HookError> {
    if pending.is_empty() {
        return Ok(());
    }
    crate::migration::note_admitted(&ctx.paths, &domain.uuid)
        .map_err(|source| HookError::NoteAdmitted { name: domain.name.clone(), source })
}

/// `started`: a guest whose holder still waits for a migration source must be running as an
/// incoming migration (QEMU with `-incoming`, paused until the switch-over). The holder kills a
/// QEMU that is not as soon as it execs; this is the check of last resort.
fn verify_incoming(ctx: &Ctx, domain: &Domain) -> Result<(), HookError> {
    // Every admission of pending locks is noted (`note_admitted`), and the note outlives a
    // holder that died or gave up: one stat decides, with no holder round trip on a plain start.
    if !crate::migration::admitted(&ctx.paths, &domain.uuid) {
        return Ok(());
    }
    match crate::migration::find_qemu(&domain.name, &domain.uuid, &ctx.config.libvirt_run_dir) {
        Some((_, crate::migration::QemuKind::Incoming)) => {
            crate::migration::forget_admitted(&ctx.paths, &domain.uuid);
            Ok(())
        }
        found => {
            let why = match found {
                Some((pid, _)) => format!("its QEMU (pid {pid}) was not started with -incoming"),
                None => "its QEMU process cannot be found".to_owned(),
            };
            error!("guest {} ({}): waits for locks held by its migration source, but {why}", domain.name, domain.uuid);
            // The holder lets go of what it holds and of every wait.
            if let Some(client) = Client::connect(&ctx.paths, &domain.uuid).map_err(holder_err(&guest(domain)))? {
                client.release().map_err(holder_err(&guest(domain)))?;
            }
            crate::migration::forget_admitted(&ctx.paths, &domain.uuid);
            Err(HookError::NotIncoming { name: domain.name.clone(), uuid: domain.uuid.clone(), why })
        }
    }
}

fn reconnect(ctx: &Ctx, domain: &Domain) -> Result<(), HookError> {
    match ensure(ctx, domain) {
        Ok(()) => Ok(()),
        Err(e) if ctx.config.on_reconnect_failure == ReconnectPolicy::Kill => Err(e),
        Err(e) => {
            error!(
                "guest {} ({}): running WITHOUT lockhook's locks after libvirtd restart: {}",
                domain.name,
                domain.uuid,
                e.lines().join("; ")
            );
            Ok(())
        }
    }
}

/// The UUID to release: from the XML, or, when that cannot be parsed, from the state file of a
/// live holder whose guest has this name.
fn release_target(ctx: &Ctx, event: &HookEvent, stdin: &mut dyn Read) -> Option<Uuid> {
    match parse_domain(event, stdin) {
        Ok(domain) => Some(domain.uuid),
        Err(e) => {
            warn!("release of {}: {}; looking the guest up by name", event.domain, crate::error_chain(&e));
            state::list(&ctx.paths).ok()?.into_iter().find_map(|entry| {
                let s = entry.state.ok()?;
                (entry.alive && s.name == event.domain).then_some(s.uuid)
            })
        }
    }
}

fn release(ctx: &Ctx, event: &HookEvent, stdin: &mut dyn Read) -> Result<(), HookError> {
    let Some(uuid) = release_target(ctx, event, stdin) else { return Ok(()) };
    crate::migration::forget_incoming(&ctx.paths, &uuid);
    crate::migration::forget_admitted(&ctx.paths, &uuid);
    let domain = Domain {
        name: event.domain.clone(),
        uuid: uuid.clone(),
        disks: vec![],
        leases: vec![],
        firmware: vec![],
        memory_files: vec![],
    };
    let Some(client) = Client::connect(&ctx.paths, &uuid).map_err(holder_err(&guest(&domain)))? else {
        return Ok(());
    };
    let held = client.held().map_err(holder_err(&guest(&domain)))?;
    if let Some(pid) = held.qemu_pid {
        if crate::qemu::start_time(pid).is_some()
            && crate::qemu::find(&domain.name, &uuid, &ctx.config.libvirt_run_dir).is_some_and(|(p, _)| p == pid)
        {
            // libvirt calls `release` only after QEMU is gone; a live QEMU means this call is not
            // about the guest this holder protects (e.g. a refused second start).
            warn!("release of {} ({uuid}) ignored: its QEMU (pid {pid}) still runs", domain.name);
            return Ok(());
        }
    }
    client.release().map_err(holder_err(&guest(&domain)))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn hook_names() {
        for yes in ["/etc/libvirt/hooks/qemu", "qemu", "/etc/libvirt/hooks/qemu.d/50-lockhook", "qemu.d/x"] {
            assert!(invoked_as_hook(OsStr::new(yes)), "{yes}");
        }
        for no in ["lockhook", "/usr/local/sbin/lockhook", "/etc/libvirt/hooks/lxc", "qemu-img"] {
            assert!(!invoked_as_hook(OsStr::new(no)), "{no}");
        }
    }

    #[test]
    fn event_parsing() {
        let args: Vec<OsString> = ["vm 1", "release", "end", "from snapshot"].iter().map(OsString::from).collect();
        let event = HookEvent::parse(&args).expect("parse");
        assert_eq!(event.domain, "vm 1");
        assert_eq!(event.op, Op::Release);
        assert_eq!(event.extra, "from snapshot");
        assert_eq!(HookEvent::parse(&args[..2]).expect("two args").sub_op, "-");
        assert!(matches!(HookEvent::parse(&args[..1]), Err(HookError::Usage(1))));
        assert_eq!(Op::parse("frobnicate"), Op::Other("frobnicate".into()));
    }
}
