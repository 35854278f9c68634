//! Cross-process tests of the shared-memory link, with real child processes.
//!
//! Child roles are entry points of this same test binary: the parent
//! re-executes it with `--exact <child test> --nocapture` and the role's
//! parameters in environment variables; without them, the child entry points
//! return at once.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use commy_shm::link::{AcceptError, ConnectError, HandshakeError, RecvError, SendError};
use commy_shm::{LinkConfig, PeerPolicy, RingError, ShmLink, ShmListener, UdsStream};

const ROLE: &str = "COMMY_LINK_TEST_ROLE";
const SOCK: &str = "COMMY_LINK_TEST_SOCK";
const COUNT: &str = "COMMY_LINK_TEST_COUNT";
const SEED: &str = "COMMY_LINK_TEST_SEED";

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("commy-link-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Re-runs this test binary as the child role `role`, filtered to the
/// calling test, whose first line hands the process to its role
/// ([`as_child`]).
fn spawn(role: &str, sock: &Path, extra: &[(&str, String)]) -> Child {
    assert!(self::role().is_none(), "a child role spawns no children");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", &this_test(), "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(SOCK, sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// The name of the test running on this thread (libtest names each test's
/// thread after it).
fn this_test() -> String {
    std::thread::current()
        .name()
        .expect("a test runs on a thread named after it")
        .to_owned()
}

/// Plays this process's child role, if it is one, and says so: a test that
/// needs a child process re-runs itself under its own name with the role
/// set, and hands the child over here first. Each role function returns
/// at once unless it is this process's.
fn as_child() -> bool {
    if role().is_none() {
        return false;
    }
    child_sender();
    child_endless_sender();
    child_scribbler();
    child_other_user();
    true
}

fn env_u64(k: &str) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a over the bytes: the message's checksum.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Message `seq`: [seq][payload of pseudo-random length and bytes][checksum].
/// One in 5000 is large enough to be fragmented.
fn make_message(seq: u64, buf: &mut Vec<u8>) {
    let r = splitmix(seq);
    let len = if r.is_multiple_of(5000) {
        300_000 + (r >> 20) as usize % 700_000
    } else {
        (r >> 8) as usize % 600
    };
    buf.clear();
    buf.extend_from_slice(&seq.to_le_bytes());
    let mut x = r;
    while buf.len() < 8 + len {
        x = splitmix(x);
        buf.extend_from_slice(&x.to_le_bytes()[..(8 + len - buf.len()).min(8)]);
    }
    let c = checksum(buf);
    buf.extend_from_slice(&c.to_le_bytes());
}

fn check_message(expected_seq: u64, m: &[u8]) {
    assert!(
        m.len() >= 16,
        "message {expected_seq} too short: {}",
        m.len()
    );
    let (body, sum) = m.split_at(m.len() - 8);
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap());
    assert_eq!(seq, expected_seq, "lost, duplicated or reordered message");
    assert_eq!(
        checksum(body),
        u64::from_le_bytes(sum.try_into().unwrap()),
        "message {seq} corrupted"
    );
}

/// Child role: connect and send COUNT messages, then close.
fn child_sender() {
    if role().as_deref() != Some("sender") {
        return;
    }
    let mut link = ShmLink::connect(std::env::var(SOCK).unwrap(), LinkConfig::default()).unwrap();
    let n = env_u64(COUNT);
    let mut buf = Vec::new();
    for seq in 0..n {
        make_message(seq, &mut buf);
        link.send(&buf).unwrap();
    }
    // Wait for the receiver's verdict before exiting (orderly close).
    let verdict = link.recv().unwrap().to_vec();
    assert_eq!(verdict, b"ok");
}

#[test]
fn millions_of_random_messages_between_processes() {
    if as_child() {
        return;
    }
    let dir = temp_dir("million");
    let sock = dir.join("l.sock");
    let listener = ShmListener::bind(&sock, LinkConfig::default().ring_capacity(1 << 16)).unwrap();
    const N: u64 = 2_000_000;
    let mut child = spawn("sender", &sock, &[(COUNT, N.to_string())]);
    let mut link = listener.accept().unwrap();
    let mut next = 0u64;
    let mut bytes = 0usize;
    while next < N {
        link.receiver()
            .recv_batch(256, Some(Instant::now() + Duration::from_secs(60)), |m| {
                check_message(next, m);
                bytes += m.len();
                next += 1;
            })
            .unwrap();
    }
    assert!(
        bytes > (N as usize) * 300,
        "sizes were not random enough: {bytes}"
    );
    link.send(b"ok").unwrap();
    assert!(child.wait().unwrap().success());
    // The child closed in order: Closed, not PeerGone.
    let e = link.recv().unwrap_err();
    assert!(
        matches!(
            e,
            RecvError::Ring(RingError::Closed) | RecvError::Ring(RingError::PeerGone)
        ),
        "{e}"
    );
}

/// Child role: send numbered messages as fast as possible until killed.
fn child_endless_sender() {
    if role().as_deref() != Some("endless") {
        return;
    }
    let mut link = ShmLink::connect(std::env::var(SOCK).unwrap(), LinkConfig::default()).unwrap();
    let mut seq = 0u64;
    let mut buf = Vec::new();
    loop {
        make_message(seq, &mut buf);
        if link.send(&buf).is_err() {
            return;
        }
        seq += 1;
    }
}

#[test]
fn kill_9_of_the_producer_delivers_every_committed_message_then_peer_gone() {
    if as_child() {
        return;
    }
    let dir = temp_dir("kill");
    let sock = dir.join("l.sock");
    let listener = ShmListener::bind(&sock, LinkConfig::default().ring_capacity(1 << 16)).unwrap();
    let mut child = spawn("endless", &sock, &[]);
    let mut link = listener.accept().unwrap();
    let mut next = 0u64;
    // Read a while, then leave the ring full of committed messages and kill.
    while next < 50_000 {
        let m = link
            .recv_deadline(Instant::now() + Duration::from_secs(30))
            .unwrap();
        check_message(next, &m);
        next += 1;
    }
    std::thread::sleep(Duration::from_millis(20));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = next;
    let err = loop {
        match link.recv_deadline(Instant::now() + Duration::from_secs(10)) {
            Ok(m) => {
                check_message(next, &m);
                next += 1;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(
        err,
        RecvError::Ring(RingError::PeerGone),
        "after {next} messages"
    );
    assert!(next > killed_at, "the committed backlog was not delivered");
    assert!(!link.is_peer_alive());
    // Sending to the dead peer fails cleanly too.
    assert_eq!(
        link.send(b"x").unwrap_err(),
        SendError::Ring(RingError::PeerGone)
    );
}

/// Child role: a client that keeps sending while a second thread writes
/// random bytes over the whole shared segment (both rings, control blocks
/// and data), as a malicious peer could.
fn child_scribbler() {
    if role().as_deref() != Some("scribbler") {
        return;
    }
    let seed = env_u64(SEED);
    let link = ShmLink::connect(std::env::var(SOCK).unwrap(), LinkConfig::default()).unwrap();
    // Find our mapping of the segment: the memfd we received.
    let fd = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().contains("memfd:commy-segment"))
                .unwrap_or(false)
        })
        .expect("segment fd");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fd.path())
        .unwrap();
    let len = file.metadata().unwrap().len();
    let (mut tx, _rx) = link.split();
    let writer = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let mut x = seed;
        loop {
            x = splitmix(x);
            // Mostly small scribbles near the control blocks, sometimes anywhere.
            let off = if x.is_multiple_of(4) {
                x % len
            } else {
                (x >> 8) % 1024 + 128
            };
            let n = ((x >> 32) % 64 + 1).min(len - off);
            let bytes: Vec<u8> = (0..n).map(|i| splitmix(x ^ i) as u8).collect();
            let _ = file.write_at(&bytes, off);
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    let mut seq = 0u64;
    let mut buf = Vec::new();
    loop {
        make_message(seq, &mut buf);
        if tx
            .send_deadline(&buf, Some(Instant::now() + Duration::from_millis(100)))
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        seq += 1;
        if writer.is_finished() {
            return;
        }
    }
}

#[test]
fn a_peer_scribbling_over_live_shared_memory_yields_errors_only() {
    if as_child() {
        return;
    }
    let dir = temp_dir("scribble");
    let sock = dir.join("l.sock");
    let listener = ShmListener::bind(&sock, LinkConfig::default().ring_capacity(1 << 14)).unwrap();
    let mut corrupt_seen = 0;
    for seed in 1..=8u64 {
        let mut child = spawn("scribbler", &sock, &[(SEED, seed.to_string())]);
        let mut link = listener.accept().unwrap();
        let start = Instant::now();
        let mut received = 0u64;
        let outcome = loop {
            if start.elapsed() > Duration::from_secs(2) {
                break None;
            }
            // Our own sends exercise the producer side against a scribbled head.
            let _ = link
                .sender()
                .send_deadline(b"pong", Some(Instant::now() + Duration::from_millis(1)));
            match link.recv_deadline(Instant::now() + Duration::from_millis(200)) {
                Ok(m) => {
                    // Content may be garbage; lengths are always within bounds.
                    assert!(m.len() <= LinkConfig::default().max_message);
                    received += 1;
                }
                Err(RecvError::TimedOut) => {}
                Err(e) => break Some(e),
            }
        };
        child.kill().unwrap();
        child.wait().unwrap();
        match outcome {
            Some(RecvError::Ring(RingError::Corrupt { .. }))
            | Some(RecvError::Protocol(_))
            | Some(RecvError::TooLarge { .. })
            // The child never closes: a close flag can only be scribbled.
            | Some(RecvError::Ring(RingError::Closed)) => corrupt_seen += 1,
            Some(RecvError::Ring(RingError::PeerGone)) | None => {}
            Some(e) => panic!("unexpected error {e}"),
        }
        // After the child is gone, the link ends with an error, never a hang.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match link.recv_deadline(deadline) {
                Ok(_) => received += 1,
                Err(RecvError::TimedOut) => panic!("link hung after the scribbler died"),
                Err(_) => break,
            }
        }
        eprintln!("seed {seed}: {received} messages, outcome {outcome:?}");
    }
    assert!(
        corrupt_seen > 0,
        "the scribbler never produced a detectable corruption"
    );
}

#[test]
fn a_non_commy_client_is_refused_and_the_listener_keeps_serving() {
    if as_child() {
        return;
    }
    let dir = temp_dir("garbage");
    let sock = dir.join("l.sock");
    let mut cfg = LinkConfig::default();
    cfg.handshake_timeout = Duration::from_millis(300);
    let listener = ShmListener::bind(&sock, cfg.clone()).unwrap();
    let server = std::thread::spawn(move || {
        let mut errors = vec![];
        for _ in 0..3 {
            match listener.accept() {
                Ok(mut link) => {
                    let m = link.recv().unwrap().to_vec();
                    link.send(&m).unwrap();
                    return (errors, true);
                }
                Err(e) => errors.push(e),
            }
        }
        (errors, false)
    });
    // 1. Garbage instead of a hello.
    let raw = UdsStream::connect(&sock).unwrap();
    raw.send_msg(b"GET / HTTP/1.1\r\n\r\n", &[]).unwrap();
    // 2. A client that connects and says nothing (slowloris).
    let _silent = UdsStream::connect(&sock).unwrap();
    // 3. A real client still gets through.
    let mut link = ShmLink::connect(&sock, LinkConfig::default()).unwrap();
    link.send(b"still serving").unwrap();
    assert_eq!(&*link.recv().unwrap(), b"still serving");
    let (errors, served) = server.join().unwrap();
    assert!(served);
    assert_eq!(errors.len(), 2);
    assert!(
        matches!(
            &errors[0],
            AcceptError::Handshake {
                source: HandshakeError::NotCommy { .. },
                ..
            }
        ),
        "{}",
        errors[0]
    );
    assert!(
        matches!(
            &errors[1],
            AcceptError::Handshake {
                source: HandshakeError::Recv(_),
                ..
            }
        ),
        "{}",
        errors[1]
    );
    // The garbage client was told why.
    let mut buf = [0u8; 600];
    let (n, _) = raw
        .recv_msg(&mut buf, 0, Some(Duration::from_secs(5)))
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("not a Commy handshake"));
}

/// Child role: connect (as another uid) and report the error.
fn child_other_user() {
    if role().as_deref() != Some("other-user") {
        return;
    }
    match ShmLink::connect(
        std::env::var(SOCK).unwrap(),
        LinkConfig::default().peer_policy(PeerPolicy::Any),
    ) {
        Ok(_) => println!("RESULT connected"),
        Err(e) => println!("RESULT {e}"),
    }
}

#[test]
fn a_peer_of_another_user_is_rejected_by_default() {
    if as_child() {
        return;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run a child under another uid");
        return;
    }
    // A directory the other user may traverse, and a socket it may connect to.
    let dir = std::env::temp_dir().join(format!("commy-link-uid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("l.sock");
    let listener = ShmListener::bind(&sock, LinkConfig::default()).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The test binary must be executable by uid 65534: copy it somewhere it can reach.
    let exe = dir.join("child-bin");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new(&exe)
        .args(["--exact", &this_test(), "--nocapture"])
        .env(ROLE, "other-user")
        .env(SOCK, &sock)
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let err = listener.accept().unwrap_err();
    assert!(matches!(err, AcceptError::PeerRejected(_)), "{err}");
    assert!(err.to_string().contains("uid 65534"), "{err}");
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("RESULT") && out.contains("refused"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn large_messages_fragment_and_oversize_ones_are_refused() {
    if as_child() {
        return;
    }
    let dir = temp_dir("large");
    let sock = dir.join("l.sock");
    let cfg = LinkConfig::default()
        .ring_capacity(1 << 12)
        .max_message(1 << 20);
    let listener = ShmListener::bind(&sock, cfg.clone()).unwrap();
    let t = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        for _ in 0..3 {
            let m = link.recv().unwrap().into_vec();
            link.send(&m).unwrap();
        }
    });
    let mut link = ShmLink::connect(&sock, cfg).unwrap();
    assert_eq!(link.max_record(), 1024 - 8);
    for len in [1016, 1017, 1 << 20] {
        let msg: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        link.send(&msg).unwrap();
        assert_eq!(link.recv().unwrap().into_vec(), msg, "len {len}");
    }
    assert_eq!(
        link.send(&vec![0; (1 << 20) + 1]).unwrap_err(),
        SendError::TooLarge {
            len: (1 << 20) + 1,
            max: 1 << 20
        }
    );
    t.join().unwrap();
}

#[test]
fn connect_errors_name_the_problem() {
    if as_child() {
        return;
    }
    let dir = temp_dir("connect");
    let e = ShmLink::connect(dir.join("nobody.sock"), LinkConfig::default()).unwrap_err();
    assert!(matches!(e, ConnectError::Connect(_)), "{e}");
    assert!(e.to_string().contains("nobody.sock"), "{e}");
    let e = ShmLink::connect(
        dir.join("x.sock"),
        LinkConfig::default().ring_capacity(1000),
    )
    .unwrap_err();
    assert!(e.to_string().contains("power of two"), "{e}");
}

#[test]
fn backpressure_bounds_the_sender() {
    if as_child() {
        return;
    }
    let dir = temp_dir("backpressure");
    let sock = dir.join("l.sock");
    let listener = ShmListener::bind(&sock, LinkConfig::default().ring_capacity(1 << 12)).unwrap();
    let t = std::thread::spawn(move || {
        let link = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        drop(link);
    });
    let mut link = ShmLink::connect(&sock, LinkConfig::default().ring_capacity(1 << 12)).unwrap();
    let mut sent = 0;
    let err = loop {
        match link.send_deadline(&[0; 100], Instant::now() + Duration::from_millis(50)) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err, SendError::TimedOut);
    assert!(sent > 0 && sent <= 4096 / 104, "sent {sent}");
    t.join().unwrap();
}

#[test]
fn wait_watches_without_taking_and_sees_a_vanished_peer() {
    if as_child() {
        return;
    }
    let dir = temp_dir("wait");
    let sock = dir.join("l.sock");
    let listener = ShmListener::bind(&sock, LinkConfig::default()).unwrap();
    let t = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        link.send(b"one").unwrap();
        // Waits for the go-ahead, then goes away.
        let _ = link.recv().unwrap();
    });
    let link = ShmLink::connect(&sock, LinkConfig::default()).unwrap();
    let (mut tx, mut rx) = link.split();
    assert!(rx.wait(Some(Instant::now() + Duration::from_secs(10))));
    // Waiting took nothing: the message is still there, and again after a second wait.
    assert!(rx.wait(None));
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), b"one");
    // Nothing more: the wait ends at its deadline.
    let start = Instant::now();
    assert!(!rx.wait(Some(start + Duration::from_millis(30))));
    assert!(start.elapsed() >= Duration::from_millis(30));
    // An interrupter ends a wait with no deadline.
    let stop = rx.interrupter();
    let interrupting = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        stop.interrupt();
    });
    assert!(!rx.wait(None));
    interrupting.join().unwrap();
    // The peer leaves: the wait reports it, and the receive names it.
    tx.send(b"go").unwrap();
    t.join().unwrap();
    assert!(rx.wait(Some(Instant::now() + Duration::from_secs(10))));
    let err = loop {
        match rx.try_recv() {
            Ok(Some(_)) => panic!("no message was sent"),
            Ok(None) => {}
            Err(e) => break e,
        }
        assert!(rx.wait(Some(Instant::now() + Duration::from_secs(10))));
    };
    assert!(
        matches!(
            err,
            RecvError::Ring(RingError::Closed | RingError::PeerGone)
        ),
        "{err}"
    );
}

#[test]
fn an_abort_ends_the_link_for_both_sides_whatever_the_memory_says() {
    if as_child() {
        return;
    }
    let dir = temp_dir("abort");
    let sock = dir.join("l.sock");
    let listener = ShmListener::bind(&sock, LinkConfig::default()).unwrap();
    let server = std::thread::spawn(move || {
        let mut link = listener.accept().unwrap();
        // Asleep on an empty ring with no deadline when the client aborts.
        let err = link.recv().map(|_| ()).unwrap_err();
        let sent = link.send(b"late").unwrap_err();
        (err, sent)
    });
    let link = ShmLink::connect(&sock, LinkConfig::default()).unwrap();
    let (tx, mut rx) = link.split();
    let aborter = tx.aborter();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        aborter.abort();
    });
    // Our own wait, with no deadline, ends too: gone, or closed if the
    // server's side ended first and closed its rings.
    let ended =
        |e: &RecvError| matches!(e, RecvError::Ring(RingError::PeerGone | RingError::Closed));
    let mine = rx.recv(None).map(|_| ()).unwrap_err();
    assert!(ended(&mine), "{mine}");
    let (theirs, sent) = server.join().unwrap();
    assert!(ended(&theirs), "{theirs}");
    assert!(matches!(sent, SendError::Ring(_)), "{sent}");
}
