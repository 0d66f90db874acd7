//! The holder's control protocol.
//!
//! Transport: a `SOCK_SEQPACKET` Unix socket `<run_dir>/<uuid>.sock` (0600, in a 0700 directory).
//! One datagram is one message: UTF-8 JSON, at most `MAX_FRAME` bytes, plus, for `acquire` only,
//! the lock fds as `SCM_RIGHTS` ancillary data in the same datagram (at most `MAX_FDS`). A
//! client sends one request and reads exactly one response before sending the next.
//!
//! Every frame is `{"v": N, "msg": {"type": ..., ...}}`. Upgrades never stop a running guest's
//! holder, so a new hook meets old holders: each side understands its own version and the one
//! before (`ACCEPTED`), new fields are optional, and a holder answers in the version it was asked
//! in. A client speaks its own version first and, when an older holder answers
//! `error{code: "version"}`, once more in the version before; anything older gets a clear line
//! (stop and start the guest).
//!
//! | request (hook/CLI → holder)            | fds            | response                        |
//! |----------------------------------------|----------------|---------------------------------|
//! | `acquire {guest, resources, pending, incoming, sanlock}` | one per resource, same order | `ok` once the holder owns them (and waits for `pending`) and its state file says so; `granted {pending}` when sanlock leases wait for a migration source; `refused {lines}` when a sanlock lease is busy (nothing of the request kept) |
//! | `set_qemu {pid, start_time}`           | none           | `ok`                            |
//! | `held`                                 | none           | `held {identities, qemu_pid, age, pending, incoming}` |
//! | `release`                              | none           | `ok` after every lock is dropped; then the holder exits |
//! | `release_if_stopped {name, libvirt_run_dir}` | none     | `qemu_runs {pid}` (nothing let go) while the QEMU it knows runs and libvirt's pid file for `name` names it; else as `release`. Holders older than it answer `error{code: "bad_request"}` |
//! | `lock_lost` (the sanlock killpath)     | none           | `ok` once the sanlock leases are let go (the OFD locks stay) |
//! | `claim {uuid}` (to `spare.sock`)       | none           | `ok` once the spare is the holder of `uuid` |
//!
//! Any request may instead get `error {code, message}`. Only a peer with uid 0 or the holder's
//! own uid (checked with `SO_PEERCRED`) may send anything; others get `error{code: "denied"}`.

use serde::{Deserialize, Serialize};

use crate::lock::Identity;
use crate::state::Resource;

/// This build's protocol version. A build for the upgrade test bumps it at compile time
/// (`LOCKHOOK_PROTOCOL_BUMP=1`), so that test runs two protocol versions side by side.
pub const VERSION: u32 = 1 + bump();
/// The versions this build understands: its own and the one before.
pub const ACCEPTED: std::ops::RangeInclusive<u32> = MIN_VERSION..=VERSION;
/// The oldest version this build understands.
pub const MIN_VERSION: u32 = if VERSION > 1 { VERSION - 1 } else { 1 };

const fn bump() -> u32 {
    match option_env!("LOCKHOOK_PROTOCOL_BUMP") {
        Some(v) if !v.is_empty() && v.as_bytes()[0] == b'1' => 1,
        _ => 0,
    }
}

/// The lockhook release this build is (with `LOCKHOOK_VERSION_SUFFIX` appended when it was
/// set at build time): what `status` and the metrics show for each holder.
pub fn release() -> String {
    format!("{}{}", env!("CARGO_PKG_VERSION"), option_env!("LOCKHOOK_VERSION_SUFFIX").unwrap_or(""))
}
/// Largest frame either side sends or accepts; checked before anything is parsed.
pub const MAX_FRAME: usize = 128 * 1024;
/// Most fds in one `acquire` datagram; larger guests are sent in several `acquire`s.
pub const MAX_FDS: usize = 64;

/// Who the holder holds locks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    pub name: String,
    pub uuid: crate::domain::Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Acquire {
        guest: Guest,
        resources: Vec<Resource>,
        /// Resources the same guest still holds on another host (incoming live migration): the
        /// holder takes each the moment it is released. No fds.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pending: Vec<Resource>,
        /// The hook verified an incoming live migration (see `migration`): later `start`s of
        /// this guest may add pending resources too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        incoming: bool,
        /// The sanlock engine's leases for this guest (see `engine`), acquired before the fds
        /// are kept: all of them, or the request is refused.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sanlock: Vec<crate::engine::LeaseSpec>,
        /// Re-adoption of a running guest whose holder died: its orphaned sanlock leases are
        /// taken back, and what cannot be had is reported (`granted {missing}`), not refused.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        adopt: bool,
    },
    SetQemu {
        pid: u32,
        start_time: u64,
    },
    /// To a spare holder: become the holder of `uuid` (then `acquire` follows on the same
    /// connection).
    Claim {
        uuid: crate::domain::Uuid,
    },
    Held,
    Release,
    /// `release`, unless the guest's QEMU still runs: the pid and start time the holder knows,
    /// and libvirt's pid file for `name` under `libvirt_run_dir` (the hook's, freshly read
    /// config) naming that pid (libvirt calls `release` only after QEMU is gone; a live one means
    /// the call is about another start, e.g. a refused second one). Then `qemu_runs`, and
    /// nothing is let go. Holders older than this answer `bad_request`.
    ReleaseIfStopped {
        name: String,
        libvirt_run_dir: std::path::PathBuf,
    },
    /// This host lost its sanlock lockspace lease (sent by the killpath, `engine::lock_lost`).
    LockLost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a valid frame or request.
    BadRequest,
    /// Unknown protocol version.
    Version,
    /// The peer's uid may not talk to this holder.
    Denied,
    /// The request names another guest than the one this holder is for.
    WrongGuest,
    /// The number of fds does not match the resources.
    FdCount,
    /// The holder could not do it (e.g. the state file could not be written).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ok,
    /// `acquire` done; `pending` sanlock leases wait for the migration source.
    Granted {
        pending: usize,
        /// With `adopt`: one line per sanlock lease that could not be had.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        missing: Vec<String>,
    },
    /// `release_if_stopped` let nothing go: the guest's QEMU (`pid`) still runs.
    QemuRuns {
        pid: u32,
    },
    /// `acquire` refused: one line per sanlock lease that could not be had.
    Refused {
        lines: Vec<String>,
    },
    Held {
        identities: Vec<Identity>,
        qemu_pid: Option<u32>,
        /// Seconds since the holder started.
        #[serde(default)]
        age: u64,
        /// Resources still awaited from a migration source.
        #[serde(default)]
        pending: usize,
        /// Whether this holder was started for an incoming live migration.
        #[serde(default)]
        incoming: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Frame<T> {
    v: u32,
    msg: T,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("protocol version {0} is not supported (this build speaks versions {MIN_VERSION} to {VERSION})")]
    Version(u32),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unexpected response: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    encode_as(VERSION, msg)
}

/// `encode` in version `v` (one of `ACCEPTED`).
pub fn encode_as<T: Serialize>(v: u32, msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let bytes = serde_json::to_vec(&Frame { v, msg }).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ProtocolError> {
    decode_versioned(bytes).map(|(_, msg)| msg)
}

/// `decode`, with the frame's version.
pub fn decode_versioned<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<(u32, T), ProtocolError> {
    if bytes.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let version: Version = serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !ACCEPTED.contains(&version.v) {
        return Err(ProtocolError::Version(version.v));
    }
    let frame: Frame<T> = serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    Ok((frame.v, frame.msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        for req in [Request::Held, Request::Release, Request::SetQemu { pid: 7, start_time: 9 }] {
            let bytes = encode(&req).expect("encode");
            assert_eq!(decode::<Request>(&bytes).expect("decode"), req);
        }
        let resp = Response::Error { code: ErrorCode::Denied, message: "no".into() };
        assert_eq!(decode::<Response>(&encode(&resp).expect("encode")).expect("decode"), resp);
    }

    #[test]
    fn rejects_bad_frames() {
        let next = format!(r#"{{"v":{},"msg":{{"type":"held"}}}}"#, VERSION + 1);
        assert!(matches!(decode::<Request>(next.as_bytes()), Err(ProtocolError::Version(_))));
        assert!(matches!(decode::<Request>(br#"{"v":0,"msg":{"type":"held"}}"#), Err(ProtocolError::Version(0))));
        let current = format!(r#"{{"v":{VERSION},"msg":{{"type":"held"}}}}"#);
        assert_eq!(decode_versioned::<Request>(current.as_bytes()).expect("current"), (VERSION, Request::Held));
        assert!(matches!(decode::<Request>(br#"{"v":1,"msg":{"type":"explode"}}"#), Err(ProtocolError::Malformed(_))));
        assert!(matches!(decode::<Request>(b"\xff"), Err(ProtocolError::Malformed(_))));
        assert!(matches!(decode::<Request>(&vec![b' '; MAX_FRAME + 1]), Err(ProtocolError::TooLarge(_))));
        assert!(matches!(decode::<Request>(br#"{"msg":{"type":"held"}}"#), Err(ProtocolError::Malformed(_))));
    }
}
