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

use std::ffi::OsString;
use std::io::Read;
use std::path::Path;

use log::{error, info, warn};

use crate::config::{Config, ConfigError, ReconnectPolicy};
use crate::domain::{Domain, DomainError, Uuid, MAX_XML_BYTES};
use crate::guest::{self, Ctx, GuestError};
use crate::state;

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
    #[error(transparent)]
    Lockspace(#[from] crate::lockspace_id::IdError),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl HookError {
    /// The lines the user sees (libvirt appends them to "Hook script execution failed").
    pub fn lines(&self) -> Vec<String> {
        match self {
            HookError::Guest(e) => e.lines(),
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
    crate::logging::init_hook(&config);
    let ctx = Ctx::new(config, config_path);
    if event.op == Op::Release {
        // Only its UUID: a refused start's `release` must work whatever else the XML holds.
        let uuid = read_xml(stdin).and_then(|bytes| {
            Domain::parse_uuid(&bytes).map_err(|source| HookError::Domain { name: event.domain.clone(), source })
        });
        adopt_orphans_bounded(&ctx, None);
        return release(&ctx, event, uuid);
    }
    let parsed = parse_domain(event, stdin);
    // Self-healing first: a running guest whose holder died gets its locks back before this
    // call could hand them to someone else. `started` and `reconnect` re-adopt their own guest
    // themselves: a pass still running past its bound must not take the same locks beside them.
    let own = match (&event.op, &parsed) {
        (Op::Started | Op::Reconnect, Ok(domain)) => Some(domain.uuid.clone()),
        _ => None,
    };
    adopt_orphans_bounded(&ctx, own);
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
        Op::Prepare => Ok(counted(&ctx, guest::prepare(&ctx, &parsed?))?),
        Op::Start => Ok(counted(&ctx, guest::start(&ctx, &parsed?))?),
        Op::Started => Ok(guest::started(&ctx, &parsed?)?),
        Op::Reconnect => reconnect(&ctx, &parsed?),
        Op::Migrate => {
            // Destination of an incoming live migration. Note it for `prepare` and `start`, and
            // print nothing: libvirt reads stdout as replacement XML here.
            let domain = parsed?;
            crate::rundir::ensure_run_dir(ctx.paths.run_dir()).ok();
            if let Err(e) = crate::migration::note_incoming(&ctx.paths, &domain.uuid) {
                warn!("guest {} ({}): cannot note the incoming migration: {e}", domain.name, domain.uuid);
            }
            info!("guest {} ({}): incoming live migration", domain.name, domain.uuid);
            Ok(())
        }
        Op::Restore => {
            // A restore's QEMU runs with `-incoming` too: a marker left by a failed migration must
            // not make it pass for one. Print nothing: stdout is XML here.
            if let Ok(domain) = parsed {
                crate::migration::forget_incoming(&ctx.paths, &domain.uuid);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Counts a refused start (see `counters`).
fn counted(ctx: &Ctx, result: Result<(), guest::GuestError>) -> Result<(), guest::GuestError> {
    if matches!(result, Err(guest::GuestError::Refused(_))) {
        crate::counters::add(&ctx.paths, crate::counters::Counter::Refusals, 1);
    }
    result
}

/// How long a hook call waits for the re-adoption of other guests (see `adopt_orphans_bounded`).
const ADOPT_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `reconcile::adopt_orphans` on a thread and waits for it at most `ADOPT_BOUND`: the
/// images of *other* guests may sit on storage that does not answer (a dead NFS server), and
/// that must not hang this guest's hook. A pass still running when this call is done dies with
/// the hook process; its fds close, so it leaves no lock behind, and the next call tries again.
fn adopt_orphans_bounded(ctx: &Ctx, skip: Option<Uuid>) {
    // The common case, in one `semctl`: no holder died since the last pass.
    if crate::census::nothing_died(&ctx.paths) {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let ctx_copy = Ctx::new(ctx.config.clone(), &ctx.config_path);
    let spawned = std::thread::Builder::new().name("adopt".into()).spawn(move || {
        let report = crate::reconcile::adopt_orphans(&ctx_copy, skip.as_ref());
        // A killed holder could not withdraw its offers of shared locks (see `shares`).
        crate::shares::sweep(&ctx_copy.paths);
        let _ = tx.send(report);
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

/// `reconnect` (libvirtd restarted): the guest runs; failing kills it, which only
/// `on_reconnect_failure = "kill"` asks for.
fn reconnect(ctx: &Ctx, domain: &Domain) -> Result<(), HookError> {
    match guest::ensure(ctx, domain) {
        Ok(()) => Ok(()),
        Err(e) if ctx.config.on_reconnect_failure == ReconnectPolicy::Kill => Err(e.into()),
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
fn release_target(ctx: &Ctx, event: &HookEvent, parsed: Result<Uuid, HookError>) -> Option<Uuid> {
    match parsed {
        Ok(uuid) => Some(uuid),
        Err(e) => {
            warn!("release of {}: {}; looking the guest up by name", event.domain, crate::error_chain(&e));
            state::list(&ctx.paths).ok()?.into_iter().find_map(|entry| {
                let s = entry.state.ok()?;
                (entry.alive && s.name == event.domain).then_some(s.uuid)
            })
        }
    }
}

fn release(ctx: &Ctx, event: &HookEvent, parsed: Result<Uuid, HookError>) -> Result<(), HookError> {
    let Some(uuid) = release_target(ctx, event, parsed) else { return Ok(()) };
    Ok(guest::release(ctx, &event.domain, &uuid)?)
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
