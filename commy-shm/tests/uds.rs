//! Unix-socket layer against real sockets, files and processes.
//!
//! Tests that need another process re-run this test binary with
//! `--exact <test name>` and an environment variable that switches the test
//! function into its child role (connect, then act or sleep until killed).

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use commy_shm::uds::{BindError, ConnectError, RecvError, SendError};
use commy_shm::{
    MAX_FDS_PER_MESSAGE, PeerCred, PeerPolicy, RemoveStaleError, RuntimeDir, RuntimeDirError,
    UdsListener, UdsStream, remove_stale_socket,
};
use rustix::fs::{MemfdFlags, memfd_create};
use rustix::io::{FdFlags, fcntl_getfd};

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        Self::with_mode(name, 0o700)
    }

    fn with_mode(name: &str, mode: u32) -> Self {
        let path = std::env::temp_dir().join(format!("commy-uds-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        DirBuilder::new().mode(mode).create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        Self(path)
    }

    fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped on drop.
struct ChildProc(std::process::Child);

impl ChildProc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Environment variable carrying the socket path to a child.
const CHILD_SOCKET: &str = "COMMY_UDS_TEST_SOCKET";

/// Re-runs this test binary as a child running only test `test`.
fn child_command(exe: &Path, test: &str) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .stdin(Stdio::null());
    cmd
}

fn spawn_child(exe: &Path, test: &str, socket: &Path, uid: Option<u32>) -> ChildProc {
    let mut cmd = child_command(exe, test);
    cmd.env(CHILD_SOCKET, socket).stdout(Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    ChildProc(cmd.spawn().unwrap())
}

/// Child role shared by several tests: connect, say hello, sleep until
/// killed. Returns (so the test runs its parent role) when not a child.
fn connect_and_sleep_if_child() {
    let Some(path) = std::env::var_os(CHILD_SOCKET) else {
        return;
    };
    let stream = UdsStream::connect(&path).expect("child: connect");
    stream.send_msg(b"child ready", &[]).expect("child: send");
    std::thread::sleep(Duration::from_secs(120));
    std::process::exit(0);
}

fn memfd_with(contents: &[u8]) -> File {
    let fd = memfd_create("commy-uds-test", MemfdFlags::CLOEXEC).unwrap();
    let mut file = File::from(fd);
    file.write_all(contents).unwrap();
    file
}

fn read_all_at0(fd: OwnedFd, len: usize) -> Vec<u8> {
    let file = File::from(fd);
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
    fcntl_getfd(fd).unwrap().contains(FdFlags::CLOEXEC)
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn connected(listener: &UdsListener) -> (UdsStream, UdsStream, PeerCred) {
    let client = UdsStream::connect(listener.path()).unwrap();
    let (server, cred) = listener.accept().unwrap();
    (client, server, cred)
}

/// Leaves a stale socket file at `path`: bound, then closed without unlink.
fn make_stale_socket(path: &Path) {
    drop(std::os::unix::net::UnixListener::bind(path).unwrap());
    assert!(fs::symlink_metadata(path).unwrap().file_type().is_socket());
}

fn recv_expect(stream: &UdsStream, expected: &[u8]) {
    let mut buf = [0u8; 256];
    let (n, fds) = stream
        .recv_msg(&mut buf, 0, Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(&buf[..n], expected);
    assert!(fds.is_empty());
}

// ---------------------------------------------------------------------------
// runtime dir
// ---------------------------------------------------------------------------

#[test]
fn runtime_dir_is_created_private_with_parents() {
    let t = TestDir::new("rt-create");
    let target = t.join("a/b/c");
    let rt = RuntimeDir::at(&target).unwrap();
    assert_eq!(rt.path(), target);
    for dir in ["a", "a/b", "a/b/c"] {
        let meta = fs::symlink_metadata(t.join(dir)).unwrap();
        assert!(meta.is_dir(), "{dir}");
        assert_eq!(meta.mode() & 0o777, 0o700, "{dir}");
        assert_eq!(meta.uid(), euid());
    }
    assert_eq!(rt.join("x.sock"), target.join("x.sock"));
    // Opening an existing, correct directory again is fine.
    assert_eq!(RuntimeDir::at(&target).unwrap(), rt);

    let sub = rt.subdir("mesh/service").unwrap();
    let meta = fs::symlink_metadata(sub.path()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o700);
    for bad in ["../escape", "/abs", "a/../b", ""] {
        let err = rt.subdir(bad).unwrap_err();
        assert!(
            matches!(err, RuntimeDirError::InvalidSubdir { .. }),
            "{bad}: {err}"
        );
    }
    assert!(!t.join("a/b/escape").exists());
}

#[test]
fn runtime_dir_rejects_group_or_other_access() {
    let t = TestDir::new("rt-perm");
    for mode in [0o750, 0o740, 0o705, 0o777] {
        let dir = t.join(&format!("d{mode:o}"));
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        let err = RuntimeDir::at(&dir).unwrap_err();
        match &err {
            RuntimeDirError::TooPermissive { path, mode: got } => {
                assert_eq!(path, &dir);
                assert_eq!(*got, mode);
            }
            other => panic!("mode {mode:o}: unexpected {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&dir.display().to_string()), "{text}");
        assert!(text.contains(&format!("{mode:04o}")), "{text}");
        // Never "fixed" behind the user's back.
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, mode);
    }
}

#[test]
fn runtime_dir_rejects_symlink() {
    let t = TestDir::new("rt-symlink");
    let real = t.join("real");
    DirBuilder::new().mode(0o700).create(&real).unwrap();
    let link = t.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = RuntimeDir::at(&link).unwrap_err();
    assert!(
        matches!(err, RuntimeDirError::Symlink { ref path } if path == &link),
        "{err}"
    );
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

#[test]
fn runtime_dir_rejects_foreign_owner() {
    let t = TestDir::new("rt-owner");
    let (dir, owner) = if euid() == 0 {
        let dir = t.join("foreign");
        DirBuilder::new().mode(0o700).create(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(12345), Some(12345)).unwrap();
        (dir, 12345)
    } else {
        // Without root we cannot chown; "/" belongs to root.
        (PathBuf::from("/"), 0)
    };
    let err = RuntimeDir::at(&dir).unwrap_err();
    match &err {
        RuntimeDirError::WrongOwner {
            path,
            owner: got,
            expected,
        } => {
            assert_eq!(path, &dir);
            assert_eq!(*got, owner);
            assert_eq!(*expected, euid());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains(&format!("uid {owner}")), "{err}");
}

#[test]
fn runtime_dir_rejects_non_directory_and_relative_path() {
    let t = TestDir::new("rt-file");
    let file = t.join("file");
    fs::write(&file, b"x").unwrap();
    let err = RuntimeDir::at(&file).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeDirError::NotADirectory {
                kind: "regular file",
                ..
            }
        ),
        "{err}"
    );
    let err = RuntimeDir::at("relative/dir").unwrap_err();
    assert!(matches!(err, RuntimeDirError::NotAbsolute { .. }), "{err}");
}

/// Child role for `runtime_dir_resolve_follows_environment`.
fn print_resolved_if_child() -> bool {
    let Some(mode) = std::env::var_os("COMMY_UDS_TEST_RESOLVE") else {
        return false;
    };
    let result = if mode == "default" {
        RuntimeDir::default_path()
    } else {
        RuntimeDir::resolve().map(|rt| rt.path().to_path_buf())
    };
    match result {
        Ok(path) => println!("RESOLVED={}", path.display()),
        Err(e) => println!("ERROR={e}"),
    }
    true
}

#[test]
fn runtime_dir_resolve_follows_environment() {
    if print_resolved_if_child() {
        return;
    }
    let t = TestDir::new("rt-env");
    let exe = std::env::current_exe().unwrap();
    let run_mode = |mode: &str, commy: Option<&OsStr>, xdg: Option<&OsStr>| -> String {
        let mut cmd = child_command(&exe, "runtime_dir_resolve_follows_environment");
        cmd.env("COMMY_UDS_TEST_RESOLVE", mode)
            .env_remove("COMMY_RUNTIME_DIR")
            .env_remove("XDG_RUNTIME_DIR");
        if let Some(c) = commy {
            cmd.env("COMMY_RUNTIME_DIR", c);
        }
        if let Some(x) = xdg {
            cmd.env("XDG_RUNTIME_DIR", x);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        stdout
            .lines()
            .find_map(|l| {
                l.find("RESOLVED=")
                    .or_else(|| l.find("ERROR="))
                    .map(|i| &l[i..])
            })
            .unwrap_or_else(|| panic!("no result in {stdout}"))
            .to_owned()
    };
    let run = |commy, xdg| run_mode("resolve", commy, xdg);

    let over = t.join("override/deep");
    let xdg = t.join("xdg");
    DirBuilder::new().mode(0o700).create(&xdg).unwrap();

    // The explicit override wins over XDG.
    let line = run(Some(over.as_os_str()), Some(xdg.as_os_str()));
    assert_eq!(line, format!("RESOLVED={}", over.display()));
    assert_eq!(fs::metadata(&over).unwrap().mode() & 0o777, 0o700);

    // Then $XDG_RUNTIME_DIR/commy.
    let line = run(None, Some(xdg.as_os_str()));
    assert_eq!(line, format!("RESOLVED={}", xdg.join("commy").display()));
    assert_eq!(
        fs::metadata(xdg.join("commy")).unwrap().mode() & 0o777,
        0o700
    );

    // A relative override is an error, not silently ignored.
    let line = run(Some(OsStr::new("not/absolute")), Some(xdg.as_os_str()));
    assert!(
        line.starts_with("ERROR=") && line.contains("not/absolute"),
        "{line}"
    );

    // Neither set (or a relative XDG value, which the spec says to ignore):
    // /tmp/commy-<euid>. Only the path is checked, to leave /tmp alone.
    let expected = format!("RESOLVED=/tmp/commy-{}", euid());
    assert_eq!(run_mode("default", None, None), expected);
    assert_eq!(run_mode("default", None, Some(OsStr::new("rel"))), expected);
}

// ---------------------------------------------------------------------------
// listener: binding, stale sockets, cleanup
// ---------------------------------------------------------------------------

#[test]
fn bind_sets_mode_0600_and_drop_removes_the_socket() {
    let t = TestDir::new("bind-mode");
    let path = t.join("s.sock");
    let listener = UdsListener::bind(&path).unwrap();
    assert_eq!(listener.path(), path);
    let meta = fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600);
    // No temporary names left behind.
    let names: Vec<_> = fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![OsStr::new("s.sock")]);
    drop(listener);
    assert!(!path.exists());
}

#[test]
fn stale_socket_is_replaced() {
    let t = TestDir::new("bind-stale");
    let path = t.join("stale.sock");
    make_stale_socket(&path);
    let before = fs::symlink_metadata(&path).unwrap().ino();
    let err = UdsStream::connect(&path).unwrap_err();
    assert!(matches!(err, ConnectError::Refused { .. }), "{err}");

    let listener = UdsListener::bind(&path).unwrap();
    assert_ne!(fs::symlink_metadata(&path).unwrap().ino(), before);
    let (client, server, _) = connected(&listener);
    client.send_msg(b"hi", &[]).unwrap();
    recv_expect(&server, b"hi");
    let names: Vec<_> = fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![OsStr::new("stale.sock")],
        "stale file must be gone"
    );
}

#[test]
fn live_listener_gives_addr_in_use() {
    let t = TestDir::new("bind-live");
    let path = t.join("live.sock");
    let first = UdsListener::bind(&path).unwrap();
    let err = UdsListener::bind(&path).unwrap_err();
    assert!(
        matches!(err, BindError::AddrInUse { path: ref p } if p == &path),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    // The probe connection is visible to the owner; drain it, then the first
    // listener still works.
    while first.try_accept().unwrap().is_some() {}
    let (client, server, _) = connected(&first);
    server.send_msg(b"still here", &[]).unwrap();
    recv_expect(&client, b"still here");

    // A live socket of another type (not ours) is not taken over either.
    let other = t.join("stream.sock");
    let _stream_listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
    let err = UdsListener::bind(&other).unwrap_err();
    assert!(matches!(err, BindError::AddrInUse { .. }), "{err}");
    let err = UdsStream::connect(&other).unwrap_err();
    assert!(matches!(err, ConnectError::WrongSocketType { .. }), "{err}");
}

#[test]
fn non_socket_is_never_deleted() {
    let t = TestDir::new("bind-nonsock");
    let file = t.join("file");
    fs::write(&file, b"precious").unwrap();
    let err = UdsListener::bind(&file).unwrap_err();
    assert!(
        matches!(
            err,
            BindError::NotASocket {
                kind: "regular file",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(fs::read(&file).unwrap(), b"precious");

    let dir = t.join("dir");
    fs::create_dir(&dir).unwrap();
    let err = UdsListener::bind(&dir).unwrap_err();
    assert!(
        matches!(
            err,
            BindError::NotASocket {
                kind: "directory",
                ..
            }
        ),
        "{err}"
    );
    assert!(dir.is_dir());

    // A symlink, even to a stale socket, is not followed or removed.
    let stale = t.join("stale.sock");
    make_stale_socket(&stale);
    let link = t.join("link.sock");
    std::os::unix::fs::symlink(&stale, &link).unwrap();
    let err = UdsListener::bind(&link).unwrap_err();
    assert!(
        matches!(
            err,
            BindError::NotASocket {
                kind: "symbolic link",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    let err = remove_stale_socket(&file).unwrap_err();
    assert!(matches!(err, RemoveStaleError::NotASocket { .. }), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"precious");
    // Nothing else appeared in the directory.
    assert_eq!(fs::read_dir(&t.0).unwrap().count(), 4);
}

#[test]
fn drop_removes_only_its_own_inode() {
    let t = TestDir::new("bind-inode");
    let path = t.join("s.sock");
    let old = UdsListener::bind(&path).unwrap();
    // Someone removes our socket and a new listener takes the path.
    fs::remove_file(&path).unwrap();
    let new = UdsListener::bind(&path).unwrap();
    drop(old);
    assert!(path.exists(), "the newer listener's socket must survive");
    let (client, server, _) = connected(&new);
    client.send_msg(b"to new", &[]).unwrap();
    recv_expect(&server, b"to new");
    drop(new);
    assert!(!path.exists());
}

#[test]
fn concurrent_binders_on_a_stale_path_yield_one_winner() {
    let t = TestDir::new("bind-race");
    let path = t.join("race.sock");
    for round in 0..20 {
        make_stale_socket(&path);
        let barrier = Arc::new(Barrier::new(6));
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (barrier, path) = (barrier.clone(), path.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    UdsListener::bind(&path)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut winners = Vec::new();
        for r in results {
            match r {
                Ok(l) => winners.push(l),
                Err(BindError::AddrInUse { .. }) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}");
        let winner = winners.pop().unwrap();
        let client = UdsStream::connect(&path).unwrap();
        // Skip probe connections made by the losers.
        let mut server = None;
        while let Some((s, _)) = winner.accept_timeout(Duration::from_secs(5)).unwrap() {
            if s.is_peer_alive() {
                server = Some(s);
                break;
            }
        }
        client.send_msg(b"race", &[]).unwrap();
        recv_expect(&server.unwrap(), b"race");
        drop(winner);
        let left: Vec<_> = fs::read_dir(&t.0).unwrap().collect();
        assert!(left.is_empty(), "round {round}: leftovers {left:?}");
    }
}

#[test]
fn remove_stale_socket_removes_only_dead_sockets() {
    let t = TestDir::new("remove-stale");
    let stale = t.join("stale.sock");
    make_stale_socket(&stale);
    assert!(remove_stale_socket(&stale).unwrap());
    assert!(!stale.exists());
    assert!(!remove_stale_socket(&stale).unwrap(), "missing path");

    let live_path = t.join("live.sock");
    let live = UdsListener::bind(&live_path).unwrap();
    assert!(!remove_stale_socket(&live_path).unwrap());
    assert!(live_path.exists());
    drop(live);
    assert_eq!(fs::read_dir(&t.0).unwrap().count(), 0);
}

#[test]
fn path_length_and_missing_paths_are_clear_errors() {
    let t = TestDir::new("paths");
    let long = t.join(&"x".repeat(120));
    let err = UdsListener::bind(&long).unwrap_err();
    assert!(
        matches!(err, BindError::PathTooLong { max: 107, .. }),
        "{err}"
    );
    let err = UdsStream::connect(&long).unwrap_err();
    assert!(matches!(err, ConnectError::PathTooLong { .. }), "{err}");

    let missing = t.join("missing.sock");
    let err = UdsStream::connect(&missing).unwrap_err();
    assert!(matches!(err, ConnectError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing.sock"), "{err}");

    let err = UdsListener::bind(t.join("no/such/dir/s.sock")).unwrap_err();
    assert!(matches!(err, BindError::Io { .. }), "{err}");
}

// ---------------------------------------------------------------------------
// accept / connect timing
// ---------------------------------------------------------------------------

#[test]
fn accept_without_clients_times_out() {
    let t = TestDir::new("accept-timeout");
    let listener = UdsListener::bind(t.join("a.sock")).unwrap();
    assert!(listener.try_accept().unwrap().is_none());
    let start = Instant::now();
    assert!(
        listener
            .accept_timeout(Duration::from_millis(150))
            .unwrap()
            .is_none()
    );
    assert!(start.elapsed() >= Duration::from_millis(140));

    // A client connecting while we wait is accepted promptly.
    let path = listener.path().to_path_buf();
    let connector = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        UdsStream::connect(path).unwrap()
    });
    let start = Instant::now();
    let (server, cred) = listener
        .accept_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(cred.pid, std::process::id());
    let client = connector.join().unwrap();
    client.send_msg(b"x", &[]).unwrap();
    recv_expect(&server, b"x");
}

#[test]
fn connect_timeout_when_backlog_is_full() {
    let t = TestDir::new("connect-timeout");
    let listener = UdsListener::bind_with_backlog(t.join("b.sock"), 0).unwrap();
    // Backlog 0 admits one pending connection; the next one waits.
    let first = UdsStream::connect(listener.path()).unwrap();
    let start = Instant::now();
    let err = UdsStream::connect_timeout(listener.path(), Duration::from_millis(200)).unwrap_err();
    let waited = start.elapsed();
    assert!(matches!(err, ConnectError::TimedOut { .. }), "{err}");
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    // Once the queue drains, connecting with a timeout works, and the
    // timeout does not linger on the connected socket.
    let (_server1, _) = listener.accept().unwrap();
    let second = UdsStream::connect_timeout(listener.path(), Duration::from_secs(5)).unwrap();
    let (server2, _) = listener.accept().unwrap();
    second.send_msg(b"second", &[]).unwrap();
    recv_expect(&server2, b"second");
    drop(first);
}

// ---------------------------------------------------------------------------
// messages and descriptors
// ---------------------------------------------------------------------------

#[test]
fn fds_pass_with_their_contents_and_arrive_cloexec() {
    let t = TestDir::new("fd-pass");
    let listener = UdsListener::bind(t.join("f.sock")).unwrap();
    let (client, server, _) = connected(&listener);

    let a = memfd_with(b"first ring");
    let b = memfd_with(b"second ring, longer");
    server
        .send_msg(b"handshake v1", &[a.as_fd(), b.as_fd()])
        .unwrap();

    let mut buf = [0u8; 64];
    let (n, fds) = client.recv_msg(&mut buf, 2, None).unwrap();
    assert_eq!(&buf[..n], b"handshake v1");
    assert_eq!(fds.len(), 2);
    assert!(fds.iter().all(|fd| is_cloexec(fd.as_fd())));
    let mut fds = fds.into_iter();
    assert_eq!(read_all_at0(fds.next().unwrap(), 10), b"first ring");
    assert_eq!(
        read_all_at0(fds.next().unwrap(), 19),
        b"second ring, longer"
    );

    // Writes through a received descriptor are visible to the sender: it is
    // the same memory, not a copy.
    client.send_msg(b"x", &[a.as_fd()]).unwrap();
    let (_, back) = server
        .recv_msg(&mut buf, 1, Some(Duration::from_secs(5)))
        .unwrap();
    File::from(back.into_iter().next().unwrap())
        .write_all_at(b"FIRST", 0)
        .unwrap();
    let mut check = [0u8; 10];
    a.read_exact_at(&mut check, 0).unwrap();
    assert_eq!(&check, b"FIRST ring");
}

#[test]
fn the_fd_limit_is_respected_both_ways() {
    let (a, b) = UdsStream::pair().unwrap();
    let memfd = memfd_with(b"m");
    let at_limit = vec![memfd.as_fd(); MAX_FDS_PER_MESSAGE];
    a.send_msg(b"max", &at_limit).unwrap();
    let mut buf = [0u8; 8];
    let (_, fds) = b.recv_msg(&mut buf, MAX_FDS_PER_MESSAGE, None).unwrap();
    assert_eq!(fds.len(), MAX_FDS_PER_MESSAGE);

    let over = vec![memfd.as_fd(); MAX_FDS_PER_MESSAGE + 1];
    let err = a.send_msg(b"too many", &over).unwrap_err();
    assert!(
        matches!(
            err,
            SendError::TooManyFds {
                count: 254,
                max: 253
            }
        ),
        "{err}"
    );
    let err = a.send_msg(b"", &[]).unwrap_err();
    assert!(matches!(err, SendError::Empty), "{err}");
}

#[test]
fn more_fds_than_expected_are_closed_and_reported() {
    let (a, b) = UdsStream::pair().unwrap();
    // Send three duplicates of one end of another pair and drop our copy:
    // once the receiver closes them all, the other end sees its peer gone.
    let (watch, sent) = UdsStream::pair().unwrap();
    a.send_msg(b"three", &[sent.as_fd(), sent.as_fd(), sent.as_fd()])
        .unwrap();
    drop(sent);
    assert!(watch.is_peer_alive(), "in flight, the fds keep it open");
    let mut buf = [0u8; 16];
    let err = b.recv_msg(&mut buf, 1, None).unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::TooManyFds {
                received: 3,
                max: 1
            }
        ),
        "{err}"
    );
    assert!(watch.wait_peer_gone(Some(Duration::from_secs(5))).unwrap());

    // The stream is still usable afterwards.
    a.send_msg(b"next", &[]).unwrap();
    let (n, _) = b.recv_msg(&mut buf, 1, None).unwrap();
    assert_eq!(&buf[..n], b"next");
}

#[test]
fn truncated_message_is_an_error_and_its_fds_are_closed() {
    let (a, b) = UdsStream::pair().unwrap();
    let (watch, sent) = UdsStream::pair().unwrap();
    a.send_msg(&[7u8; 100], &[sent.as_fd()]).unwrap();
    drop(sent);
    let mut small = [0u8; 10];
    let err = b.recv_msg(&mut small, 4, None).unwrap_err();
    assert!(
        matches!(
            err,
            RecvError::Truncated {
                len: 100,
                capacity: 10
            }
        ),
        "{err}"
    );
    assert!(watch.wait_peer_gone(Some(Duration::from_secs(5))).unwrap());
    // The truncated record was consumed; the next one arrives intact.
    a.send_msg(b"after", &[]).unwrap();
    let (n, _) = b.recv_msg(&mut small, 0, None).unwrap();
    assert_eq!(&small[..n], b"after");
}

/// Child role for `ancillary_truncation_closes_what_arrived`: with almost no
/// descriptors left, receive a message carrying many.
fn receive_with_few_fds_if_child() -> bool {
    let Some(path) = std::env::var_os("COMMY_UDS_TEST_CTRUNC") else {
        return false;
    };
    let stream = UdsStream::connect(&path).expect("child: connect");
    // Lower the descriptor limit so that only two or three fd numbers stay
    // free (the directory listing's own fd counts as taken but is freed).
    let open: Vec<u64> = fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let (mut limit, mut free) = (0, 0);
    while free < 2 {
        if !open.contains(&limit) {
            free += 1;
        }
        limit += 1;
    }
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .unwrap();
    stream.send_msg(b"ready", &[]).unwrap();
    let mut buf = [0u8; 16];
    match stream.recv_msg(&mut buf, 64, Some(Duration::from_secs(10))) {
        Err(RecvError::AncillaryTruncated { received }) if received < 20 => {
            // What arrived was closed again: two descriptors fit once more.
            let f1 = File::open("/proc/self/status").expect("fd 1 after close");
            let f2 = File::open("/proc/self/status").expect("fd 2 after close");
            drop((f1, f2));
            stream.send_msg(b"ok", &[]).unwrap();
            std::process::exit(0);
        }
        other => {
            eprintln!("child: unexpected {other:?}");
            std::process::exit(3);
        }
    }
}

#[test]
fn ancillary_truncation_closes_what_arrived() {
    if receive_with_few_fds_if_child() {
        return;
    }
    let t = TestDir::new("ctrunc");
    let listener = UdsListener::bind(t.join("c.sock")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = child_command(&exe, "ancillary_truncation_closes_what_arrived")
        .env("COMMY_UDS_TEST_CTRUNC", listener.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (server, _) = listener
        .accept_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    recv_expect(&server, b"ready");
    let memfd = memfd_with(b"m");
    server.send_msg(b"many", &[memfd.as_fd(); 20]).unwrap();
    recv_expect(&server, b"ok");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn recv_timeout_nonblocking_and_eof() {
    let (a, b) = UdsStream::pair().unwrap();
    let mut buf = [0u8; 8];
    let start = Instant::now();
    let err = b
        .recv_msg(&mut buf, 0, Some(Duration::from_millis(100)))
        .unwrap_err();
    assert!(matches!(err, RecvError::TimedOut { .. }), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(90));

    b.set_nonblocking(true).unwrap();
    let err = b.recv_msg(&mut buf, 0, None).unwrap_err();
    assert!(matches!(err, RecvError::WouldBlock), "{err}");
    b.set_nonblocking(false).unwrap();

    drop(a);
    let err = b.recv_msg(&mut buf, 0, None).unwrap_err();
    assert!(matches!(err, RecvError::Closed), "{err}");
    let err = b
        .recv_msg(&mut buf, 0, Some(Duration::from_secs(5)))
        .unwrap_err();
    assert!(matches!(err, RecvError::Closed), "{err}");
    let err = b.send_msg(b"anyone?", &[]).unwrap_err();
    assert!(matches!(err, SendError::Closed), "{err}");
}

// ---------------------------------------------------------------------------
// liveness
// ---------------------------------------------------------------------------

#[test]
fn pending_messages_do_not_hide_a_dead_peer() {
    let (a, b) = UdsStream::pair().unwrap();
    assert!(b.is_peer_alive());
    assert!(!b.wait_peer_gone(Some(Duration::from_millis(50))).unwrap());
    a.send_msg(b"last words", &[]).unwrap();
    assert!(b.is_peer_alive(), "a pending record from a live peer");
    drop(a);
    // Not at once: a child process another test forks meanwhile holds a
    // copy of `a` until it executes its program.
    assert!(b.wait_peer_gone(Some(Duration::from_secs(30))).unwrap());
    assert!(!b.is_peer_alive());
    // The record is still readable, then end-of-file.
    recv_expect(&b, b"last words");
    let mut buf = [0u8; 8];
    assert!(matches!(
        b.recv_msg(&mut buf, 0, None),
        Err(RecvError::Closed)
    ));
}

#[test]
fn shutdown_is_seen_as_peer_gone() {
    let (a, b) = UdsStream::pair().unwrap();
    let waiter = std::thread::spawn(move || {
        let gone = b.wait_peer_gone(None).unwrap();
        (gone, b)
    });
    std::thread::sleep(Duration::from_millis(50));
    a.shutdown().unwrap();
    let (gone, b) = waiter.join().unwrap();
    assert!(gone);
    assert!(!b.is_peer_alive());
    a.shutdown().unwrap(); // idempotent
}

#[test]
fn peer_cred_names_the_child_process() {
    connect_and_sleep_if_child();
    let t = TestDir::new("cred-child");
    let listener = UdsListener::bind(t.join("p.sock")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let child = spawn_child(
        &exe,
        "peer_cred_names_the_child_process",
        listener.path(),
        None,
    );
    let (server, cred) = listener
        .accept_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    recv_expect(&server, b"child ready");
    assert_eq!(cred.pid, child.pid());
    assert_eq!(cred.uid, euid());
    assert_eq!(cred.gid, rustix::process::getegid().as_raw());
    assert_eq!(server.peer_cred().unwrap(), cred);
    PeerPolicy::SameUser.check(&cred).unwrap();
    PeerPolicy::default().check(&cred).unwrap();
}

#[test]
fn policy_rejects_another_uid() {
    connect_and_sleep_if_child();
    if euid() != 0 {
        // Running a child under another uid needs root; the rejection logic
        // itself is covered in the unit tests.
        eprintln!("skipped: needs root to run a child as uid 65534");
        return;
    }
    // A directory the unprivileged child can traverse, with a copy of this
    // test binary it can execute.
    let t = TestDir::with_mode("policy-foreign", 0o755);
    let exe = t.join("child-exe");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let listener = UdsListener::bind(t.join("p.sock")).unwrap();
    fs::set_permissions(listener.path(), fs::Permissions::from_mode(0o666)).unwrap();

    let child = spawn_child(
        &exe,
        "policy_rejects_another_uid",
        listener.path(),
        Some(65534),
    );
    let (server, cred) = listener
        .accept_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    recv_expect(&server, b"child ready");
    assert_eq!(cred.pid, child.pid());
    assert_eq!(cred.uid, 65534);
    assert_eq!(cred.gid, 65534);

    let err = PeerPolicy::SameUser.check(&cred).unwrap_err();
    assert_eq!(err.peer, cred);
    let text = err.to_string();
    assert!(text.contains("uid 65534"), "{text}");
    assert!(text.contains(&child.pid().to_string()), "{text}");
    assert!(PeerPolicy::uids([0]).check(&cred).is_err());
    PeerPolicy::uids([0, 65534]).check(&cred).unwrap();
    PeerPolicy::gids([65534]).check(&cred).unwrap();
    PeerPolicy::Any.check(&cred).unwrap();
}

#[test]
fn killed_peer_is_detected_promptly() {
    connect_and_sleep_if_child();
    let t = TestDir::new("peer-death");
    let listener = UdsListener::bind(t.join("d.sock")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = spawn_child(
        &exe,
        "killed_peer_is_detected_promptly",
        listener.path(),
        None,
    );
    let (server, cred) = listener
        .accept_timeout(Duration::from_secs(20))
        .unwrap()
        .unwrap();
    assert_eq!(cred.pid, child.pid());
    recv_expect(&server, b"child ready");
    assert!(server.is_peer_alive());
    assert!(
        !server
            .wait_peer_gone(Some(Duration::from_millis(100)))
            .unwrap()
    );

    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        let gone = server
            .wait_peer_gone(Some(Duration::from_secs(30)))
            .unwrap();
        (gone, start.elapsed(), server)
    });
    std::thread::sleep(Duration::from_millis(50));
    child.0.kill().unwrap(); // SIGKILL: no chance to say goodbye
    let (gone, waited, server) = waiter.join().unwrap();
    assert!(gone);
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(!server.is_peer_alive());
    let mut buf = [0u8; 8];
    assert!(matches!(
        server.recv_msg(&mut buf, 0, None),
        Err(RecvError::Closed)
    ));
}
