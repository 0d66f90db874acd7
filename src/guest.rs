//! Guest orchestration: what lockhook does to a guest, as operations on it (`prepare`, lock
//! more at `start`, `ensure` a running guest's locks, `adopt` it after its holder died,
//! `release`). The hook (`hook`), self-healing (`reconcile`) and `lockhook reconcile` call these;
//! none of them talks to a holder or the lock set on its own.
//!
//! Invariants kept here:
//! - all or nothing at start: a refused `prepare`/`start` leaves no lock and no lease file it
//!   created (`Acquired::discard`);
//! - our copies of lock fds are dropped only after the holder's ACK (`hand_over`), so no lock is
//!   ever unowned;
//! - a running guest is never refused what it holds: `adopt` takes what is free and reports the
//!   rest, which its holder keeps retrying;
//! - `release` lets go only of the holder of this UUID, and only when its QEMU is gone.

// A guest operation builds at most one GuestError before it returns; its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use log::{error, info, warn};

use crate::config::Config;
use crate::domain::{Domain, Uuid};
use crate::engine::{LeaseSpec, Wanted};
use crate::holder::client::{Client, ClientError, Handed, Held, PendingClaim, CLAIM_TIMEOUT};
use crate::holder::protocol::Guest;
use crate::holder::spawn::{self, SpawnError};
use crate::lock::Identity;
use crate::lockset::{self, Acquired, Refusal};
use crate::migration::NotIncoming;
use crate::paths::Paths;
use crate::state::Resource;
use crate::storage::{self, StorageError};
use crate::target::LockTarget;

/// A holder without QEMU this old belongs to a start that was abandoned (libvirtd died between
/// `prepare` and `started`); a younger one to a start still in progress. `prepare` refuses a
/// second start of a guest whose holder is younger, `reconcile` releases older ones.
pub const START_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything a guest operation needs.
pub struct Ctx {
    pub config: Config,
    pub config_path: PathBuf,
    pub paths: Paths,
}

impl Ctx {
    pub fn new(config: Config, config_path: &Path) -> Ctx {
        Ctx { paths: Paths::new(&config.run_dir), config, config_path: config_path.to_owned() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest {name}")]
    Storage {
        name: String,
        #[source]
        source: StorageError,
    },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("guest {name} ({uuid}) is already running on this host (QEMU pid {pid}); not locking it twice")]
    AlreadyRunning { name: String, uuid: Uuid, pid: u32 },
    #[error("guest {name} ({uuid}) is being started on this host already ({age} s ago); not locking it twice")]
    StartInProgress { name: String, uuid: Uuid, age: u64 },
    #[error(
        "guest {name} ({uuid}) is still running on another host and this is not an incoming migration ({why}); \
         stop it there first"
    )]
    NotIncoming { name: String, uuid: Uuid, why: NotIncoming },
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

impl GuestError {
    /// The lines the user sees: one per refused resource, else the error and its causes.
    pub fn lines(&self) -> Vec<String> {
        match self {
            GuestError::Refused(refusal) => refusal.lines.clone(),
            other => vec![crate::error_chain(other)],
        }
    }
}

pub fn guest(domain: &Domain) -> Guest {
    Guest { name: domain.name.clone(), uuid: domain.uuid.clone() }
}

fn holder_err(guest: &Guest) -> impl Fn(ClientError) -> GuestError + '_ {
    move |source| GuestError::Holder { name: guest.name.clone(), uuid: guest.uuid.clone(), source }
}

/// The requests for `domain`, with skip notes logged.
pub fn requests(ctx: &Ctx, domain: &Domain) -> Result<Vec<LockTarget>, GuestError> {
    let mut plan = crate::resource::plan(domain, &ctx.config);
    let requests = storage::resolve(&mut plan, &ctx.config)
        .map_err(|source| GuestError::Storage { name: domain.name.clone(), source })?;
    for note in &plan.skipped {
        info!("guest {} ({}): {note}; not locked", domain.name, domain.uuid);
    }
    for note in &plan.unlocked {
        warn!("guest {} ({}): {note}", domain.name, domain.uuid);
    }
    Ok(requests)
}

/// Takes every lock of `domain` or none. During a verified incoming migration (`incoming`, see
/// `migration`), a lock the same guest (UUID) holds on another host, as the owner records show,
/// is not a refusal: it comes back as pending, for the holder to take when the source lets go.
fn acquire(
    ctx: &Ctx,
    domain: &Domain,
    held: &HashSet<Identity>,
    incoming: bool,
) -> Result<(Acquired, Vec<Resource>), GuestError> {
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
            Ok(()) => pending.push(Resource::new(&busy.request, busy.roles, busy.request.mode, busy.identity)),
            Err(why) => lines.push(why.to_string()),
        }
    }
    if !lines.is_empty() {
        for line in &lines {
            warn!("guest {} ({}) refused: {line}", domain.name, domain.uuid);
        }
        give_up(&guest(domain), acquired);
        return Err(GuestError::Refused(Refusal { lines }));
    }
    Ok((acquired, pending))
}

/// A start that fails before its locks reach a holder lets go of them.
// Invariant: discarding `acquired` releases every lock it holds and removes the lease files
// this call created, so the failed start leaves nothing behind.
fn give_up(guest: &Guest, acquired: Acquired) {
    for path in acquired.discard() {
        info!(
            "guest {} ({}): removed lease file {} created for this failed start",
            guest.name,
            guest.uuid,
            path.display()
        );
    }
}

/// What travels with the locks of a hand-over.
struct With<'a> {
    /// Resources the migration source still holds.
    pending: Vec<Resource>,
    incoming: bool,
    /// The sanlock engine's leases.
    sanlock: &'a [LeaseSpec],
    /// A re-adoption (see `Request::Acquire`).
    adopt: bool,
    /// How a guest without a holder gets one from the spare.
    claim: Claim,
}

/// How `hand_over` claims the spare holder for a guest that has no holder yet.
enum Claim {
    /// Now, once the locks are taken.
    Now,
    /// Sent ahead by `prepare` (`None`: no spare took the connection), so that the spare became
    /// the guest's holder while the storage was resolved and locked (see `Client::begin_claim`).
    Sent(Option<PendingClaim>),
}

/// Gives `acquired` to the guest's holder, starting one if there is none. A holder that cannot
/// be started or reached gets nothing, and the locks are given up (`give_up`); once the request
/// is sent, whether the holder took them is not known for certain, so the lease files stay.
fn hand_over(
    ctx: &Ctx,
    guest: &Guest,
    client: Option<Client>,
    acquired: Acquired,
    with: With<'_>,
) -> Result<(Client, usize, Vec<String>), GuestError> {
    let With { pending, incoming, sanlock, adopt, claim } = with;
    if client.is_none() {
        // A state file here is a dead holder's: retired from the census (see `census`) before
        // the new holder writes its own under the same name.
        if let Some(claimed) = crate::census::claim_dead(&ctx.paths, &ctx.paths.state(&guest.uuid)) {
            let _ = std::fs::remove_file(claimed);
        }
    }
    let client = client.or_else(|| match claim {
        Claim::Now => Client::claim_spare(&ctx.paths, &guest.uuid),
        Claim::Sent(None) => None,
        Claim::Sent(Some(sent)) => sent.finish().or_else(|| {
            // Two starts of this guest at once (libvirt runs none): the other one claimed, and
            // this one took the locks, so that one is refused and lets its holder go at once.
            let _ = holder_gone(ctx, &guest.uuid);
            Client::claim_spare(&ctx.paths, &guest.uuid)
        }),
    });
    let client = match client {
        Some(client) => client,
        None => match start_holder(ctx, guest) {
            Ok(client) => client,
            Err(e) => {
                give_up(guest, acquired);
                return Err(e);
            }
        },
    };
    fault_point("before-handover");
    let fds: Vec<_> = acquired.locks.iter().map(|l| l.fd.as_fd()).collect();
    let handed = Handed { resources: &acquired.resources, fds: &fds, pending: &pending, incoming, sanlock, adopt };
    let result = client.acquire(guest, handed);
    drop(fds);
    let (waiting, missing) = match result {
        Ok(granted) => granted,
        Err(ClientError::Leases(lines)) => {
            for line in &lines {
                warn!("guest {} ({}) refused: {line}", guest.name, guest.uuid);
            }
            give_up(guest, acquired);
            return Err(GuestError::Refused(Refusal { lines }));
        }
        Err(e) => return Err(holder_err(guest)(e)),
    };
    // Invariant: our copies of the fds (in `acquired`) are dropped only now, after the ACK.
    ensure_spare(ctx);
    for r in &acquired.resources {
        info!("guest {} ({}): locked {} {}", guest.name, guest.uuid, r.mode.as_str(), r.path.display());
    }
    drop(acquired);
    Ok((client, waiting, missing))
}

/// Starts a holder for `guest` and connects to it.
fn start_holder(ctx: &Ctx, guest: &Guest) -> Result<Client, GuestError> {
    spawn::spawn(&ctx.config_path, &guest.uuid).map_err(|source| GuestError::Spawn {
        name: guest.name.clone(),
        uuid: guest.uuid.clone(),
        source,
    })?;
    Client::connect(&ctx.paths, &guest.uuid)
        .map_err(holder_err(guest))?
        .ok_or_else(|| holder_err(guest)(ClientError::Closed))
}

/// Fault injection for tests: `LOCKHOOK_FAULT=<point>[:<seconds>]` stalls the hook there (a
/// minute unless told) so a test can kill it at that point, or see it carry on late. libvirt
/// scrubs the environment of hooks, so this never triggers under libvirt.
fn fault_point(point: &str) {
    let Some(fault) = std::env::var_os("LOCKHOOK_FAULT") else { return };
    let fault = fault.to_string_lossy();
    let (name, seconds) = match fault.split_once(':') {
        Some((name, seconds)) => (name, seconds.parse().unwrap_or(60)),
        None => (&*fault, 60),
    };
    if name == point {
        std::thread::sleep(std::time::Duration::from_secs(seconds));
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

pub fn prepare(ctx: &Ctx, domain: &Domain) -> Result<(), GuestError> {
    if let Some(client) = Client::connect(&ctx.paths, &domain.uuid).map_err(holder_err(&guest(domain)))? {
        let held = client.held().map_err(holder_err(&guest(domain)))?;
        if let Some(pid) = held.qemu_pid {
            return Err(GuestError::AlreadyRunning { name: domain.name.clone(), uuid: domain.uuid.clone(), pid });
        }
        if held.age < START_GRACE.as_secs() {
            return Err(GuestError::StartInProgress {
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
    // The spare becomes the guest's holder while this hook resolves and locks its storage (a
    // guest with none claims nothing). A state file is a dead holder's, which `hand_over`
    // retires before the claim: then it waits.
    // A refusal drops the claim, which lets the claimed holder go (see `PendingClaim`).
    let storage = !(domain.disks.is_empty()
        && domain.leases.is_empty()
        && domain.firmware.is_empty()
        && domain.memory_files.is_empty());
    fault_point("before-claim");
    let claim = if !storage || ctx.paths.state(&domain.uuid).exists() {
        Claim::Now
    } else {
        Claim::Sent(Client::begin_claim(&ctx.paths, &domain.uuid))
    };
    fault_point("after-claim");
    let (acquired, pending) = acquire(ctx, domain, &HashSet::new(), incoming)?;
    if let Err(e) = note_admitted(ctx, domain, &pending) {
        give_up(&guest(domain), acquired);
        return Err(e);
    }
    let sanlock = lease_specs(ctx, domain, &acquired, &pending);
    if acquired.locks.is_empty() && pending.is_empty() && sanlock.is_empty() {
        info!("guest {} ({}): nothing to lock", domain.name, domain.uuid);
        return Ok(());
    }
    let (_, waiting, _) = hand_over(
        ctx,
        &guest(domain),
        None,
        acquired,
        With { pending, incoming, sanlock: &sanlock, adopt: false, claim },
    )?;
    note_waiting(ctx, domain, waiting)
}

/// The sanlock engine's leases for what `acquired` and `pending` lock (none for the OFD engine).
fn lease_specs(ctx: &Ctx, domain: &Domain, acquired: &Acquired, pending: &[Resource]) -> Vec<LeaseSpec> {
    let wanted: Vec<Wanted> = acquired.resources.iter().chain(pending).map(Wanted::from).collect();
    crate::engine::specs(&ctx.config, domain, &wanted)
}

/// Notes the admission of sanlock leases that wait for a migration source (as `note_admitted`
/// does for OFD locks), so `started` checks the guest's QEMU is an incoming migration.
fn note_waiting(ctx: &Ctx, domain: &Domain, waiting: usize) -> Result<(), GuestError> {
    if waiting == 0 {
        return Ok(());
    }
    crate::migration::note_admitted(&ctx.paths, &domain.uuid)
        .map_err(|source| GuestError::NoteAdmitted { name: domain.name.clone(), source })
}

/// `start`: lock what `prepare` could not see (the chain libvirt detected, resolved volumes).
pub fn start(ctx: &Ctx, domain: &Domain) -> Result<(), GuestError> {
    let client = Client::connect(&ctx.paths, &domain.uuid).map_err(holder_err(&guest(domain)))?;
    let (held, incoming) = match &client {
        Some(c) => {
            let held = c.held().map_err(holder_err(&guest(domain)))?;
            (held.identities.into_iter().collect(), held.incoming)
        }
        None => (HashSet::new(), false),
    };
    let (acquired, pending) = acquire(ctx, domain, &held, incoming)?;
    if let Err(e) = note_admitted(ctx, domain, &pending) {
        give_up(&guest(domain), acquired);
        return Err(e);
    }
    if acquired.locks.is_empty() && pending.is_empty() {
        return Ok(());
    }
    let sanlock = lease_specs(ctx, domain, &acquired, &pending);
    let (_, waiting, _) = hand_over(
        ctx,
        &guest(domain),
        client,
        acquired,
        With { pending, incoming, sanlock: &sanlock, adopt: false, claim: Claim::Now },
    )?;
    note_waiting(ctx, domain, waiting)
}

/// Makes sure a live holder holds every lock of a running guest and knows its QEMU. Used by
/// `started` and `reconnect`; re-adopts the guest when its holder is gone.
pub fn ensure(ctx: &Ctx, domain: &Domain) -> Result<(), GuestError> {
    let qemu = crate::qemu::find(&domain.name, &domain.uuid, &ctx.config.libvirt_run_dir);
    ensure_running(ctx, domain, qemu)
}

/// `ensure` for a guest whose QEMU process is already known.
pub fn ensure_running(ctx: &Ctx, domain: &Domain, qemu: Option<(u32, u64)>) -> Result<(), GuestError> {
    let requests = requests(ctx, domain)?;
    let wanted: Vec<Wanted> = requests.iter().map(Wanted::from).collect();
    let sanlock = crate::engine::specs(&ctx.config, domain, &wanted);
    adopt(ctx, &guest(domain), &requests, &sanlock, qemu)
}

/// Gives a running guest's holder (started if missing) every lock of `requests` that is free,
/// and tells it the QEMU process. The guest runs already, so this takes what it can: locks
/// someone else took meanwhile come back as a refusal *after* the others are held, and the
/// holder keeps retrying them (see `holder::hotplug`).
pub fn adopt(
    ctx: &Ctx,
    guest: &Guest,
    requests: &[LockTarget],
    sanlock: &[LeaseSpec],
    qemu: Option<(u32, u64)>,
) -> Result<(), GuestError> {
    let client = Client::connect(&ctx.paths, &guest.uuid).map_err(holder_err(guest))?;
    let held = match &client {
        Some(c) => c.held().map_err(holder_err(guest))?,
        None => {
            warn!("guest {} ({}): no holder; re-taking its locks", guest.name, guest.uuid);
            Held { identities: Vec::new(), qemu_pid: None, age: 0, pending: 0, incoming: false }
        }
    };
    let mut notes = Vec::new();
    let held_ids = held.identities.iter().copied().collect();
    let (acquired, failures) = lockset::acquire_available(requests, &held_ids, &ctx.config, &ctx.paths, &mut notes);
    let lines = failures.lines();
    for note in notes {
        warn!("guest {} ({}): {note}", guest.name, guest.uuid);
    }
    // A live holder keeps its sanlock leases; a new one (the old one died) adopts them.
    let mut lines = lines;
    let client = if acquired.locks.is_empty() && (client.is_some() || sanlock.is_empty()) {
        client
    } else {
        // A new holder (the old one died) takes the orphans back and keeps what it can have.
        let (sanlock, adopt) = if client.is_some() { (&[][..], false) } else { (sanlock, true) };
        let (client, _, missing) = hand_over(
            ctx,
            guest,
            client,
            acquired,
            With { pending: Vec::new(), incoming: false, sanlock, adopt, claim: Claim::Now },
        )?;
        lines.extend(missing);
        Some(client)
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
        Err(GuestError::Refused(Refusal { lines }))
    }
}

/// Notes that `pending` locks were admitted for `domain` (see `migration::note_admitted`).
fn note_admitted(ctx: &Ctx, domain: &Domain, pending: &[Resource]) -> Result<(), GuestError> {
    if pending.is_empty() {
        return Ok(());
    }
    crate::migration::note_admitted(&ctx.paths, &domain.uuid)
        .map_err(|source| GuestError::NoteAdmitted { name: domain.name.clone(), source })
}

/// `started`: a guest admitted with pending locks must be an incoming migration (the holder
/// kills a QEMU that is not as soon as it execs; this is the check of last resort, and a
/// failure makes libvirt stop the guest). Then its holder is made to hold every lock and to
/// watch its QEMU; that cannot fail the guest, which runs already.
pub fn started(ctx: &Ctx, domain: &Domain) -> Result<(), GuestError> {
    crate::migration::forget_incoming(&ctx.paths, &domain.uuid);
    if let Err(why) = crate::migration::check_started(&ctx.paths, domain, &ctx.config.libvirt_run_dir) {
        error!("guest {} ({}): waits for locks held by its migration source, but {why}", domain.name, domain.uuid);
        // The holder lets go of what it holds and of every wait.
        if let Some(client) = Client::connect(&ctx.paths, &domain.uuid).map_err(holder_err(&guest(domain)))? {
            client.release().map_err(holder_err(&guest(domain)))?;
        }
        return Err(GuestError::NotIncoming { name: domain.name.clone(), uuid: domain.uuid.clone(), why });
    }
    if let Err(e) = ensure(ctx, domain) {
        error!("guest {} ({}): running WITHOUT lockhook's locks: {}", domain.name, domain.uuid, e.lines().join("; "));
    }
    Ok(())
}

/// `release`: lets go of guest `name` (`uuid`)'s holder, unless that guest's QEMU still runs
/// (libvirt calls `release` only after QEMU is gone, so a live one means this call is not about
/// the guest this holder protects, e.g. a refused second start).
pub fn release(ctx: &Ctx, name: &str, uuid: &Uuid) -> Result<(), GuestError> {
    crate::migration::forget_incoming(&ctx.paths, uuid);
    crate::migration::forget_admitted(&ctx.paths, uuid);
    let guest = Guest { name: name.to_owned(), uuid: uuid.clone() };
    let Some(client) = Client::connect(&ctx.paths, uuid).map_err(holder_err(&guest))? else {
        return Ok(());
    };
    let libvirt_run_dir = &ctx.config.libvirt_run_dir;
    let still_runs = |pid| crate::qemu::runs_as(pid, None, name, uuid, libvirt_run_dir);
    match client.release_if_stopped(name, libvirt_run_dir, still_runs) {
        Ok(Some(pid)) => warn!("release of {name} ({uuid}) ignored: its QEMU (pid {pid}) still runs"),
        Ok(None) => {}
        // The holder went away with the request unanswered (it was exiting: its QEMU gone, its
        // sanlock leases lost): once it is gone, so are its locks, as when it had no socket.
        Err(e) if hung_up(&e) && holder_gone(ctx, uuid) => {
            warn!("release of {name} ({uuid}): its holder exited meanwhile; its locks are gone with it");
        }
        Err(e) => return Err(holder_err(&guest)(e)),
    }
    Ok(())
}

/// Whether the holder closed or reset the connection (rather than answered, or timed out).
fn hung_up(e: &ClientError) -> bool {
    use crate::holder::fdpass::FdPassError;
    matches!(
        e,
        ClientError::Closed
            | ClientError::Transport(
                FdPassError::Receive(nix::Error::ECONNRESET | nix::Error::EPIPE)
                    | FdPassError::Send(nix::Error::ECONNRESET | nix::Error::EPIPE)
            )
    )
}

/// Waits, for up to `CLAIM_TIMEOUT`, until no holder of `uuid` runs (its instance lock goes
/// last, with the process): one that hung up on a `release`, or a crossed start's claimed one.
fn holder_gone(ctx: &Ctx, uuid: &Uuid) -> bool {
    let bound = std::time::Instant::now() + CLAIM_TIMEOUT;
    loop {
        if !crate::state::holder_alive(&ctx.paths, uuid) {
            return true;
        }
        if std::time::Instant::now() >= bound {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder that hangs up on `release` unanswered (it was exiting): the release succeeds
    /// once that holder is gone (its instance lock with it), and fails while one lingers.
    #[test]
    fn a_holder_that_hangs_up_on_release_counts_once_gone() {
        let dir = tempfile::tempdir().expect("dir");
        let config = Config { run_dir: dir.path().to_owned(), ..Config::default() };
        let ctx = Ctx::new(config, Path::new("/nonexistent/lockhook.toml"));
        let uuid = Uuid::parse("f3fa73d4-1c2b-4e5f-8a9b-0123456789ab").expect("uuid");
        for lingers in [false, true] {
            let instance = crate::rundir::lock_instance_file(&ctx.paths.instance_lock(&uuid)).expect("instance");
            let listener = crate::rundir::listen_on(&ctx.paths.socket(&uuid)).expect("listen");
            let (hung_up, hang_up) = std::sync::mpsc::channel::<()>();
            let fake = std::thread::spawn(move || {
                let (conn, _) = crate::holder::accept_conn(&listener).expect("accept");
                // Closed unread: the hook's request is never answered.
                drop(conn);
                drop(listener);
                if lingers {
                    let _ = hang_up.recv();
                }
                drop(instance);
            });
            let result = release(&ctx, "vm", &uuid);
            assert_eq!(result.is_ok(), !lingers, "lingering holder {lingers}: {result:?}");
            drop(hung_up);
            fake.join().expect("fake holder");
            let _ = std::fs::remove_file(ctx.paths.socket(&uuid));
        }
    }
}
