//! sanlock's answers, typed. Every call of `libsanlock_client` returns 0 (or a count, or an fd)
//! on success and a negative number otherwise: `-errno` from the library or the daemon, or one
//! of sanlock's own codes (`sanlock_rv.h`, -201..-278). [`Code`] gives the ones callers branch on
//! a variant each; [`SanlockError`] adds which operation failed, on what.

use std::path::PathBuf;

use nix::errno::Errno;

use super::abi;
use super::name::Name;

/// A failure code from sanlock. The acquire codes are the daemon's verdict on a lease that is
/// not free; `NotJoined` and `Exists` are `-ENOSPC` and `-EEXIST`, which sanlock uses with a
/// meaning of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Code {
    /// `SANLK_ACQUIRE_IDLIVE` (-243): the lease's owner is a host whose lockspace (delta) lease
    /// is being renewed, so the owner is alive. The answer a busy lease gets.
    #[error("held by another host that is alive (sanlock -243 IDLIVE)")]
    HeldByLiveHost,
    /// `SANLK_ACQUIRE_OWNED` (-244): another host owns the lease and took it (or renewed its
    /// host lease) while this acquire was waiting.
    #[error("owned by another host (sanlock -244 OWNED)")]
    Owned,
    /// `SANLK_ACQUIRE_OTHER` (-245): another host won the paxos ballot for the lease first.
    #[error("another host acquired it first (sanlock -245 OTHER)")]
    Other,
    /// `SANLK_ACQUIRE_SHRETRY` (-246): shared holders changed during a shared acquire; the
    /// daemon gave up rather than wait. Worth one retry.
    #[error("shared holders changed while it was being acquired (sanlock -246 SHRETRY)")]
    SharedRetry,
    /// `SANLK_ACQUIRE_OWNED_RETRY` (-247): with "do not wait", the owner's host lease has not
    /// expired yet; it may in a while (the owner host may be dead).
    #[error("owned by a host whose lease has not expired yet (sanlock -247 OWNED_RETRY)")]
    OwnedRetry,
    /// `SANLK_ACQUIRE_LVER` (-240): the lease's version on disk is not the one asked for: someone
    /// acquired it since.
    #[error("its version changed since it was last seen (sanlock -240 LVER)")]
    LeaseVersion,
    /// `-ENOSPC`: this host has not joined the resource's lockspace (or is leaving it).
    #[error("this host has not joined its lockspace (-ENOSPC)")]
    NotJoined,
    /// `-EEXIST`: on acquire, a client on this host already holds the lease (another client, or
    /// this one); on add_lockspace, the lockspace is already joined.
    #[error("already held or present on this host (-EEXIST)")]
    Exists,
    /// `-EUCLEAN`: an orphan of this lease (a persistent lease whose client died) exists on this
    /// host and the acquire did not ask to adopt it, or asked in the other mode.
    #[error("an orphaned lease of this host is in the way (-EUCLEAN)")]
    Orphan,
    /// `-1`: the library got a short reply (the daemon closed the connection, e.g. it exited);
    /// also what `-EPERM` would look like.
    #[error("the daemon's reply was cut short (-1)")]
    ShortReply,
    /// Another of sanlock's own codes (`sanlock_rv.h`).
    #[error("sanlock error {0} ({text})", text = sanlock_code_text(*.0))]
    Sanlock(i32),
    /// Another `-errno` (`ENOENT`/`ECONNREFUSED` from connecting: the daemon is not running).
    #[error("{0}")]
    Os(Errno),
}

impl Code {
    /// The code for a negative return value `rv` of a library call.
    pub fn from_rv(rv: i32) -> Code {
        match rv {
            abi::SANLK_ACQUIRE_IDLIVE => Code::HeldByLiveHost,
            abi::SANLK_ACQUIRE_OWNED => Code::Owned,
            abi::SANLK_ACQUIRE_OTHER => Code::Other,
            abi::SANLK_ACQUIRE_SHRETRY => Code::SharedRetry,
            abi::SANLK_ACQUIRE_OWNED_RETRY => Code::OwnedRetry,
            abi::SANLK_ACQUIRE_LVER => Code::LeaseVersion,
            -1 => Code::ShortReply,
            rv if rv == -libc::ENOSPC => Code::NotJoined,
            rv if rv == -libc::EEXIST => Code::Exists,
            rv if rv == -libc::EUCLEAN => Code::Orphan,
            -299..=-200 => Code::Sanlock(rv),
            rv => Code::Os(Errno::from_raw(rv.saturating_neg())),
        }
    }

    /// Whether another host has the lease: what a refusal reports as "busy". `Exists` (held on
    /// this host) is busy too, but only for an acquire: see [`SanlockError::is_busy`].
    pub fn held_elsewhere(self) -> bool {
        matches!(self, Code::HeldByLiveHost | Code::Owned | Code::Other | Code::OwnedRetry | Code::SharedRetry)
    }
}

/// What sanlock's own codes mean, from `sanlock_rv.h` and where the daemon returns them.
fn sanlock_code_text(rv: i32) -> &'static str {
    match rv {
        -201 => "SANLK_ERROR",
        -202 => "AIO_TIMEOUT: storage did not answer within io_timeout",
        -203 => "WD_ERROR: watchdog (wdmd) failure",
        -214..=-210 => "DBLOCK: paxos ballot block i/o or content error",
        -220 => "LEADER_READ: cannot read the leader record",
        -221 => "LEADER_WRITE: cannot write the leader record",
        -222 => "LEADER_DIFF",
        -223 => "LEADER_MAGIC: no sanlock lease or lockspace at this place (not initialised?)",
        -224 => "LEADER_VERSION: written by an incompatible sanlock",
        -225 => "LEADER_SECTORSIZE: sector size differs from the one written",
        -226 => "LEADER_LOCKSPACE: the lease belongs to another lockspace",
        -227 => "LEADER_RESOURCE: another resource name is written here",
        -228 => "LEADER_NUMHOSTS",
        -229 => "LEADER_CHECKSUM: corrupt leader record",
        -230 => "ADDLS_SIZES: the lockspace's align or sector size does not match",
        -231 => "ADDLS_INVALID_HOSTID: host id outside 1..max_hosts",
        -241 => "ACQUIRE_LOCKSPACE",
        -242 => "ACQUIRE_IDDISK",
        -250 => "RELEASE_LVER",
        -251 => "RELEASE_OWNER: this host does not own the lease",
        -260 => "RENEW_OWNER",
        -261 => "RENEW_DIFF",
        -262 => "HOSTID_BUSY: another host holds this host id",
        -273..=-270 => "REQUEST",
        -274 => "RINDEX_MAGIC: no resource index at this place (not formatted?)",
        -275 => "RINDEX_VERSION",
        -276 => "RINDEX_LOCKSPACE: the index belongs to another lockspace",
        -277 => "RINDEX_OFFSET",
        -278 => "RINDEX_DIFF",
        _ => "unknown",
    }
}

/// Why loading `libsanlock_client.so.1` failed. Cloned out of the process-wide cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load {library} (install sanlock's client library: Debian package libsanlock1): {reason}")]
    Open { library: &'static str, reason: String },
    #[error("{library} has no symbol {symbol} (sanlock older than 3.8?)")]
    MissingSymbol { library: &'static str, symbol: &'static str },
    #[error(
        "{library} loaded glibc {loaded}, but this static binary was built with glibc {linked}: rebuild and \
         reinstall lockhook (install.sh), or build it dynamically linked"
    )]
    LibcMismatch { library: &'static str, linked: String, loaded: String },
}

/// A failed sanlock operation: which one, on what, and sanlock's [`Code`].
#[derive(Debug, thiserror::Error)]
pub enum SanlockError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{path}: cannot be a sanlock disk path: {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },
    #[error("{what} is too long for sanlock (at most {max} bytes)")]
    TooLong { what: &'static str, max: usize },
    #[error("{count} leases in one call: a sanlock client acquires at most 8 at a time")]
    TooManyLeases { count: usize },
    #[error("cannot ask the sanlock daemon its version")]
    Version(#[source] Code),
    #[error("cannot register with the sanlock daemon")]
    Register(#[source] Code),
    #[error("cannot make the sanlock client socket close-on-exec")]
    SetCloexec(#[source] Errno),
    #[error("cannot set the killpath of this sanlock client")]
    Killpath(#[source] Code),
    #[error("cannot acquire sanlock lease {leases}")]
    Acquire {
        leases: String,
        #[source]
        code: Code,
    },
    #[error("cannot release sanlock lease {leases}")]
    Release {
        leases: String,
        #[source]
        code: Code,
    },
    #[error("cannot ask the sanlock daemon which leases this client holds")]
    Inquire(#[source] Code),
    #[error("{path}: cannot write sanlock lockspace {lockspace}")]
    WriteLockspace {
        lockspace: Name,
        path: PathBuf,
        #[source]
        code: Code,
    },
    #[error("{path}: cannot read a sanlock lockspace")]
    ReadLockspace {
        path: PathBuf,
        #[source]
        code: Code,
    },
    #[error("cannot join sanlock lockspace {lockspace} as host {host_id}")]
    AddLockspace {
        lockspace: Name,
        host_id: u64,
        #[source]
        code: Code,
    },
    #[error("cannot leave sanlock lockspace {lockspace}")]
    RemLockspace {
        lockspace: Name,
        #[source]
        code: Code,
    },
    #[error("cannot ask whether this host is in sanlock lockspace {lockspace}")]
    InqLockspace {
        lockspace: Name,
        #[source]
        code: Code,
    },
    #[error("cannot list the hosts of sanlock lockspace {lockspace}")]
    GetHosts {
        lockspace: Name,
        #[source]
        code: Code,
    },
    #[error("{path}: cannot write sanlock resource {resource}")]
    WriteResource {
        resource: Name,
        path: PathBuf,
        #[source]
        code: Code,
    },
    #[error("{path}: cannot read the owners of sanlock resource {resource}")]
    ReadOwners {
        resource: Name,
        path: PathBuf,
        #[source]
        code: Code,
    },
    #[error("{path}: cannot format a sanlock resource index")]
    FormatRindex {
        path: PathBuf,
        #[source]
        code: Code,
    },
    #[error("{path}: cannot look up {name} in the sanlock resource index")]
    LookupRindex {
        name: Name,
        path: PathBuf,
        #[source]
        code: Code,
    },
    #[error("{path}: cannot create sanlock resource {name} in the resource index")]
    CreateResource {
        name: Name,
        path: PathBuf,
        #[source]
        code: Code,
    },
    #[error("{path}: cannot delete sanlock resource {name} from the resource index")]
    DeleteResource {
        name: Name,
        path: PathBuf,
        #[source]
        code: Code,
    },
}

impl SanlockError {
    /// sanlock's code, when the daemon or library answered one.
    pub fn code(&self) -> Option<Code> {
        use SanlockError as E;
        match self {
            E::Load(_) | E::InvalidPath { .. } | E::TooLong { .. } | E::TooManyLeases { .. } | E::SetCloexec(_) => None,
            E::Version(code) | E::Register(code) | E::Killpath(code) | E::Inquire(code) => Some(*code),
            E::Acquire { code, .. }
            | E::Release { code, .. }
            | E::WriteLockspace { code, .. }
            | E::ReadLockspace { code, .. }
            | E::AddLockspace { code, .. }
            | E::RemLockspace { code, .. }
            | E::InqLockspace { code, .. }
            | E::GetHosts { code, .. }
            | E::WriteResource { code, .. }
            | E::ReadOwners { code, .. }
            | E::FormatRindex { code, .. }
            | E::LookupRindex { code, .. }
            | E::CreateResource { code, .. }
            | E::DeleteResource { code, .. } => Some(*code),
        }
    }

    /// Whether an acquire failed because someone else holds a lease (on another host, or
    /// another client of this host): the refusal case, as opposed to an error.
    pub fn is_busy(&self) -> bool {
        match self {
            // EAGAIN: an exclusive acquire of a lease others hold shared.
            SanlockError::Acquire { code, .. } => {
                code.held_elsewhere() || *code == Code::Exists || *code == Code::Os(Errno::EAGAIN)
            }
            _ => false,
        }
    }
}

/// `Ok(rv)` for a non-negative return value, the [`Code`] for a negative one.
pub(crate) fn check(rv: i32) -> Result<i32, Code> {
    if rv < 0 {
        Err(Code::from_rv(rv))
    } else {
        Ok(rv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_variants() {
        assert_eq!(Code::from_rv(-243), Code::HeldByLiveHost);
        assert_eq!(Code::from_rv(-244), Code::Owned);
        assert_eq!(Code::from_rv(-245), Code::Other);
        assert_eq!(Code::from_rv(-246), Code::SharedRetry);
        assert_eq!(Code::from_rv(-247), Code::OwnedRetry);
        assert_eq!(Code::from_rv(-240), Code::LeaseVersion);
        assert_eq!(Code::from_rv(-libc::ENOSPC), Code::NotJoined);
        assert_eq!(Code::from_rv(-libc::EEXIST), Code::Exists);
        assert_eq!(Code::from_rv(-libc::EUCLEAN), Code::Orphan);
        assert_eq!(Code::from_rv(-1), Code::ShortReply);
        assert_eq!(Code::from_rv(-223), Code::Sanlock(-223));
        assert_eq!(Code::from_rv(-libc::ECONNREFUSED), Code::Os(Errno::ECONNREFUSED));
        assert_eq!(Code::from_rv(i32::MIN), Code::Os(Errno::from_raw(i32::MAX)));
        assert_eq!(check(3), Ok(3));
        assert_eq!(check(0), Ok(0));
        assert_eq!(check(-243), Err(Code::HeldByLiveHost));
    }

    #[test]
    fn messages_name_the_code() {
        assert_eq!(Code::HeldByLiveHost.to_string(), "held by another host that is alive (sanlock -243 IDLIVE)");
        assert!(Code::Sanlock(-223).to_string().starts_with("sanlock error -223 (LEADER_MAGIC"));
        assert_eq!(Code::Sanlock(-299).to_string(), "sanlock error -299 (unknown)");
        let err = SanlockError::Acquire { leases: "LS:disk".into(), code: Code::HeldByLiveHost };
        assert_eq!(
            crate::error_chain(&err),
            "cannot acquire sanlock lease LS:disk: held by another host that is alive (sanlock -243 IDLIVE)"
        );
    }

    #[test]
    fn busy_is_an_acquire_verdict() {
        let acquire = |code| SanlockError::Acquire { leases: String::new(), code };
        for code in [Code::HeldByLiveHost, Code::Owned, Code::Other, Code::OwnedRetry, Code::SharedRetry, Code::Exists]
        {
            assert!(acquire(code).is_busy(), "{code:?}");
        }
        for code in [Code::NotJoined, Code::Orphan, Code::LeaseVersion, Code::Os(Errno::EIO)] {
            assert!(!acquire(code).is_busy(), "{code:?}");
        }
        let join = SanlockError::AddLockspace { lockspace: Name::fit("ls"), host_id: 1, code: Code::Exists };
        assert!(!join.is_busy());
        assert_eq!(join.code(), Some(Code::Exists));
    }
}
