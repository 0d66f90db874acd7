//! Request handling over a real `SOCK_SEQPACKET` pair: requests encoded by `protocol`, lock fds
//! of temporary files passed by `fdpass`, replies and held state checked, no root needed (the
//! `SO_PEERCRED` half of the peer test makes a peer of another uid only when run as root).

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{connect, socketpair, AddressFamily, SockType, UnixAddr};

use super::*;
use crate::config::Config;
use crate::domain::Uuid;
use crate::lock::{self, Create, HeldLock, LockMode};
use crate::state;
use crate::target::{Creation, Role};

fn uuid() -> Uuid {
    Uuid::parse("f3fa73d4-1c2b-4e5f-8a9b-0123456789ab").expect("uuid")
}

fn guest() -> Guest {
    Guest { name: "vm1".into(), uuid: uuid() }
}

/// A holder of guest `vm1` whose run directory, lockspace and libvirt run directory are in
/// a temporary directory.
/// A test's directory; the census semaphore set of its run directory (created by the holder's
/// first state file) lives in the kernel, and goes with the directory.
struct TestDir(tempfile::TempDir);

impl std::ops::Deref for TestDir {
    type Target = tempfile::TempDir;
    fn deref(&self) -> &tempfile::TempDir {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        crate::census::Census::remove(&crate::paths::Paths::new(&self.0.path().join("run")));
    }
}

fn holder() -> (TestDir, Holder) {
    let dir = TestDir(tempfile::tempdir().expect("tempdir"));
    let config = Config {
        run_dir: dir.path().join("run"),
        lockspace_dir: dir.path().join("lockspace"),
        libvirt_run_dir: dir.path().join("libvirt"),
        ..Config::default()
    };
    let holder = Holder::start(&config, &uuid(), false).expect("start");
    (dir, holder)
}

/// An image locked exclusively the way the hook locks it, and the resource the hook sends.
fn image(dir: &Path, name: &str) -> (PathBuf, HeldLock, Resource) {
    let path = dir.join(name);
    std::fs::write(&path, b"").expect("image");
    let lock = lock::acquire(&path, LockMode::Exclusive, 0, Create::No).expect("lock");
    let resource = Resource {
        path: path.clone(),
        key: String::new(),
        label: None,
        lock_file: None,
        mode: lock.mode,
        roles: vec![Role::Disk { target: Some("vda".into()) }],
        identity: lock.identity,
        since: crate::clock::now(),
        create: Some(Creation::Never),
    };
    (path, lock, resource)
}

fn acquire(resources: Vec<Resource>) -> Request {
    Request::Acquire {
        guest: guest(),
        resources,
        pending: Vec::new(),
        incoming: false,
        sanlock: Vec::new(),
        adopt: false,
    }
}

fn lock_on(path: &Path) -> Option<LockMode> {
    lock::probe(path, 0).expect("probe").0
}

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair")
}

/// Sends one datagram with `fds` and returns the one reply.
fn send(conn: &OwnedFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Response {
    fdpass::send(conn.as_fd(), bytes, fds).expect("send");
    let mut buf = vec![0u8; MAX_FRAME];
    let (len, fds) = fdpass::recv(conn.as_fd(), &mut buf).expect("reply");
    assert!(fds.is_empty(), "a reply carries no fds");
    protocol::decode(&buf[..len]).expect("decode")
}

fn ask(conn: &OwnedFd, request: &Request, fds: &[BorrowedFd<'_>]) -> Response {
    send(conn, &protocol::encode(request).expect("encode"), fds)
}

/// Runs `client` on `theirs` while the holder serves `ours`; returns what the client
/// returned and what the holder's loop would do next.
fn serve<T: Send + 'static>(
    holder: &mut Holder,
    (ours, theirs): (OwnedFd, OwnedFd),
    allowed: bool,
    client: impl FnOnce(&OwnedFd) -> T + Send + 'static,
) -> (T, Next) {
    let client = std::thread::spawn(move || {
        // A holder that stops answering fails the test instead of hanging it.
        setsockopt(&theirs, sockopt::ReceiveTimeout, &TimeVal::new(5, 0)).expect("timeout");
        client(&theirs)
    });
    let next = holder.serve_conn(&ours, allowed);
    (client.join().expect("client"), next)
}

/// `serve` on a fresh pair, admitted the way `accept_conn` admits a connection.
fn talk<T: Send + 'static>(holder: &mut Holder, client: impl FnOnce(&OwnedFd) -> T + Send + 'static) -> (T, Next) {
    let (ours, theirs) = pair();
    let allowed = admit(&ours);
    assert!(allowed, "a peer of our own uid may talk to the holder");
    serve(holder, (ours, theirs), allowed, client)
}

fn held(response: Response) -> (Vec<lock::Identity>, Option<u32>, usize, bool) {
    match response {
        Response::Held { identities, qemu_pid, pending, incoming, .. } => (identities, qemu_pid, pending, incoming),
        other => panic!("expected held, got {other:?}"),
    }
}

#[test]
fn acquire_holds_the_fds_and_the_state_file_names_them() {
    let (dir, mut holder) = holder();
    let (path, lock, resource) = image(dir.path(), "a.img");
    let (id, request) = (resource.identity, acquire(vec![resource.clone()]));
    let ((first, again, listed), next) = talk(&mut holder, move |conn| {
        let first = ask(conn, &request, &[lock.fd.as_fd()]);
        // The hook keeps its own fd until the ACK; from here only the holder's copy locks.
        drop(lock);
        // The same image again (another `acquire` of this guest): still one lock.
        let reopened = std::fs::File::open(&path).expect("open");
        let again = ask(conn, &request, &[reopened.as_fd()]);
        (first, again, ask(conn, &Request::Held, &[]))
    });
    assert!(matches!(next, Next::Continue));
    assert_eq!((first, again), (Response::Ok, Response::Ok));
    assert_eq!(held(listed), (vec![id], None, 0, false));
    assert_eq!(lock_on(&resource.path), Some(LockMode::Exclusive));
    assert_eq!(holder.held.len(), 1);
    let written = state::read(&holder.paths.state(&uuid())).expect("state file");
    assert_eq!((written.name.as_str(), written.resources), ("vm1", vec![resource]));
    assert_eq!(written.holder_pid, std::process::id());
}

#[test]
fn acquire_refuses_another_guest_and_a_wrong_fd_count_and_closes_what_came() {
    let (dir, mut holder) = holder();
    let (path, lock, resource) = image(dir.path(), "a.img");
    let (_, _, second) = image(dir.path(), "b.img");
    let other = Guest { name: "vm2".into(), uuid: Uuid::parse("0badc0de-1c2b-4e5f-8a9b-0123456789ac").expect("uuid") };
    let wrong_guest = Request::Acquire {
        guest: other,
        resources: vec![resource.clone()],
        pending: Vec::new(),
        incoming: true,
        sanlock: Vec::new(),
        adopt: false,
    };
    let short = acquire(vec![resource, second]);
    let ((refused, counted, listed), _) = talk(&mut holder, move |conn| {
        let refused = ask(conn, &wrong_guest, &[lock.fd.as_fd()]);
        let counted = ask(conn, &short, &[lock.fd.as_fd()]);
        drop(lock);
        (refused, counted, ask(conn, &Request::Held, &[]))
    });
    assert!(matches!(refused, Response::Error { code: ErrorCode::WrongGuest, .. }), "{refused:?}");
    assert!(matches!(counted, Response::Error { code: ErrorCode::FdCount, .. }), "{counted:?}");
    // Nothing held, not even `incoming` from the refused request, and the fds were closed.
    assert_eq!(held(listed), (Vec::new(), None, 0, false));
    assert_eq!(lock_on(&path), None);
    assert!(holder.guest.is_none());
    assert!(!holder.paths.state(&uuid()).exists());
}

#[test]
fn acquire_that_cannot_be_written_down_is_refused_and_let_go() {
    let (dir, mut holder) = holder();
    let (path, lock, resource) = image(dir.path(), "a.img");
    // A directory where the state file goes: the rename that would write it fails.
    std::fs::create_dir(holder.paths.state(&uuid())).expect("directory");
    let request = acquire(vec![resource]);
    let (refused, _) = talk(&mut holder, move |conn| {
        let refused = ask(conn, &request, &[lock.fd.as_fd()]);
        drop(lock);
        refused
    });
    assert!(matches!(refused, Response::Error { code: ErrorCode::Failed, .. }), "{refused:?}");
    assert_eq!(lock_on(&path), None);
    assert!(holder.held.is_empty() && holder.guest.is_none());
}

#[test]
fn set_qemu_takes_only_a_live_process() {
    let (dir, mut holder) = holder();
    let (_, lock, resource) = image(dir.path(), "a.img");
    // The test process plays QEMU: its pid and start time identify a live process.
    let pid = std::process::id();
    let start_time = crate::qemu::start_time(pid).expect("own start time");
    let request = acquire(vec![resource]);
    let ((stale, live, listed), _) = talk(&mut holder, move |conn| {
        assert_eq!(ask(conn, &request, &[lock.fd.as_fd()]), Response::Ok);
        let stale = ask(conn, &Request::SetQemu { pid, start_time: start_time + 1 }, &[]);
        let live = ask(conn, &Request::SetQemu { pid, start_time }, &[]);
        (stale, live, ask(conn, &Request::Held, &[]))
    });
    let not_running = format!("process {pid} is not running");
    assert_eq!(stale, Response::Error { code: ErrorCode::Failed, message: not_running });
    assert_eq!(live, Response::Ok);
    assert_eq!(held(listed).1, Some(pid));
    // From now on the live definition is followed for hot-plug.
    assert!(holder.hotplug.status.is_some());
    let written = state::read(&holder.paths.state(&uuid())).expect("state file");
    assert_eq!((written.qemu_pid, written.qemu_start_time), (Some(pid), Some(start_time)));
}

#[test]
fn release_drops_every_lock_and_every_file_then_exits() {
    let (dir, mut holder) = holder();
    let (path, lock, resource) = image(dir.path(), "a.img");
    let request = acquire(vec![resource]);
    let ((acquired, released), next) = talk(&mut holder, move |conn| {
        let acquired = ask(conn, &request, &[lock.fd.as_fd()]);
        drop(lock);
        (acquired, ask(conn, &Request::Release, &[]))
    });
    assert_eq!((acquired, released), (Response::Ok, Response::Ok));
    assert!(matches!(next, Next::Exit));
    assert_eq!(lock_on(&path), None);
    assert!(holder.held.is_empty() && holder.files.instance.is_none());
    let paths = &holder.paths;
    for gone in [paths.state(&uuid()), paths.socket(&uuid()), paths.instance_lock(&uuid())] {
        assert!(!gone.exists(), "{} is left behind", gone.display());
    }
}

#[test]
fn malformed_requests_get_an_error_and_the_connection_goes_on() {
    let (dir, mut holder) = holder();
    let (path, lock, _) = image(dir.path(), "a.img");
    let ((replies, listed), next) = talk(&mut holder, move |conn| {
        let replies = [
            send(conn, b"{", &[lock.fd.as_fd()]),
            send(conn, br#"{"v":2,"msg":{"type":"held"}}"#, &[]),
            send(conn, br#"{"v":1,"msg":{"type":"explode"}}"#, &[]),
            ask(conn, &Request::Claim { uuid: uuid() }, &[]),
        ];
        drop(lock);
        (replies, ask(conn, &Request::Held, &[]))
    });
    let codes: Vec<_> = replies
        .iter()
        .map(|r| match r {
            Response::Error { code, .. } => *code,
            other => panic!("expected an error, got {other:?}"),
        })
        .collect();
    assert_eq!(codes, [ErrorCode::BadRequest, ErrorCode::Version, ErrorCode::BadRequest, ErrorCode::BadRequest]);
    assert_eq!(
        replies[3],
        Response::Error { code: ErrorCode::BadRequest, message: "this holder is not a spare".into() }
    );
    assert_eq!(held(listed), (Vec::new(), None, 0, false));
    assert!(matches!(next, Next::Continue));
    // The fd that came with the malformed frame was closed.
    assert_eq!(lock_on(&path), None);
}

#[test]
fn a_peer_of_another_uid_may_change_nothing() {
    let (dir, mut holder) = holder();
    let (path, lock, resource) = image(dir.path(), "a.img");
    let (conn, allowed) = if nix::unistd::geteuid().is_root() {
        let conn = std::thread::spawn(|| {
            // SAFETY: the raw syscall sets the effective uid of this thread only (glibc's
            // setresuid would set it for every thread of the test process); the real and
            // saved uids stay, and the thread ends right after making the pair.
            let rc = unsafe {
                libc::syscall(libc::SYS_setresuid, -1 as libc::c_long, 65534 as libc::c_long, -1 as libc::c_long)
            };
            assert_eq!(rc, 0, "setresuid");
            pair()
        })
        .join()
        .expect("thread");
        // SO_PEERCRED names the uid that made the pair: nobody, not root.
        let allowed = admit(&conn.0);
        assert!(!allowed, "uid 65534 may not talk to a holder of uid 0");
        (conn, allowed)
    } else {
        eprintln!("skipped the SO_PEERCRED half: making a peer of another uid needs root");
        (pair(), false)
    };
    let request = acquire(vec![resource]);
    let (replies, next) = serve(&mut holder, conn, allowed, move |conn| {
        let replies = [ask(conn, &request, &[lock.fd.as_fd()]), ask(conn, &Request::Release, &[])];
        drop(lock);
        replies
    });
    let denied = Response::Error { code: ErrorCode::Denied, message: "only root may talk to a lockhook holder".into() };
    assert_eq!(replies, [denied.clone(), denied]);
    assert!(matches!(next, Next::Continue));
    assert_eq!(lock_on(&path), None);
    assert!(holder.held.is_empty() && holder.files.instance.is_some() && holder.paths.socket(&uuid()).exists());
}

#[test]
fn pending_resources_are_taken_when_the_migration_source_lets_go() {
    let (dir, mut holder) = holder();
    // `source` plays the migration source's holder, which still holds the image.
    let (path, source, resource) = image(dir.path(), "a.img");
    let id = resource.identity;
    let request = Request::Acquire {
        guest: guest(),
        resources: Vec::new(),
        pending: vec![resource.clone()],
        incoming: true,
        sanlock: Vec::new(),
        adopt: false,
    };
    let ((first, again, listed), _) = talk(&mut holder, move |conn| {
        (ask(conn, &request, &[]), ask(conn, &request, &[]), ask(conn, &Request::Held, &[]))
    });
    assert_eq!((first, again), (Response::Ok, Response::Ok));
    // A pending resource counts as this guest's (once, however often it is announced).
    assert_eq!(held(listed), (vec![id], None, 1, true));
    let written = state::read(&holder.paths.state(&uuid())).expect("state file");
    assert_eq!((written.resources, written.pending), (Vec::new(), vec![resource]));
    assert!(holder.guarding(), "no incoming QEMU was seen yet");

    drop(source);
    let handover = holder.migration.handover.as_ref().expect("a hand-over waits");
    let mut fds = [PollFd::new(handover.fd(), PollFlags::POLLIN)];
    let five_seconds = PollTimeout::try_from(Duration::from_secs(5)).expect("timeout");
    assert_eq!(poll(&mut fds, five_seconds), Ok(1), "the hand-over wakes the loop");
    holder.take_over();
    assert!(holder.migration.pending.is_empty() && !holder.guarding());
    assert_eq!(holder.held.iter().map(|(r, _)| r.identity).collect::<Vec<_>>(), vec![id]);
    assert_eq!(lock_on(&path), Some(LockMode::Exclusive));
    let written = state::read(&holder.paths.state(&uuid())).expect("state file");
    assert_eq!((written.resources.len(), written.pending.len()), (1, 0));
}

#[test]
fn accept_one_serves_a_client_of_the_socket() {
    let (_dir, mut holder) = holder();
    let socket = holder.paths.socket(&uuid());
    let client = std::thread::spawn(move || {
        let conn =
            socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        connect(conn.as_raw_fd(), &UnixAddr::new(&socket).expect("address")).expect("connect");
        ask(&conn, &Request::Held, &[])
    });
    assert!(matches!(holder.accept_one(), Next::Continue));
    assert_eq!(held(client.join().expect("client")), (Vec::new(), None, 0, false));
}
