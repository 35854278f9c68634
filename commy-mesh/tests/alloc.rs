//! The hot path's allocations, counted: a warm `mesh.call` over shared
//! memory allocates nothing beyond the answer's bytes, and a warm served
//! request likewise (DESIGN.md, "No per-call allocation beyond the answer's
//! bytes").
//!
//! A `#[global_allocator]`, commy-shm's `CountingAllocator` (which wraps
//! the system allocator), counts every `alloc`, `alloc_zeroed` and
//! `realloc` of the whole process, and the bytes they ask for (frees are
//! not counted). Each check runs one side in this
//! process and its peer in a child process (this same binary, role in
//! [`ROLE`]), so the count holds only the measured side: the client's own
//! calls, or the serving side of requests that a child makes. Each check
//! warms up with [`WARM_UP`] calls, then counts [`CALLS`] calls and
//! compares the total with `CALLS * per-call constant + SLACK`.
//!
//! The constants are the numbers of the code before the restructure of
//! commy-mesh (6c3ebcd): they may go down, never up. They were measured on
//! a 2-vCPU Intel Xeon VM, in 5 debug runs, 2 debug runs next
//! to a release build of three crates (load average 5.7) and 3 release
//! runs. Per call, the same for 64 B and 4 KiB payloads, debug and release:
//!
//! | check | allocations per call |
//! |---|---|
//! | client, answered while the caller polls | 1: the answer |
//! | client, the caller sleeps until woken | 1: the answer (its call's place in the pending table holds it until the caller takes it; it was 2, with a tokio oneshot of 104 B) |
//! | client, default `call_spin` (50 µs) | 1 |
//! | served by `serve`, answering at once | 1: the request's payload |
//! | served by `serve_deferred`, answering at once | 2: the payload, the responder's state (64 B) |
//! | `publish` to a subscriber linked already | 0 |
//! | a subscriber's `next`, policy `Block` | 1: the message's payload |
//!
//! The same checks run with empty policies installed (a call policy and a
//! serve policy that admit everything and keep no state, see
//! `commy_mesh::policy`): they must allocate no more.
//!
//! The counts were exact in every run, but for up to 3 allocations more
//! in one run (another thread of the process), and up to 20 fewer when the
//! caller that should sleep was answered while it polled.
//!
//! The target has `harness = false`: `main` runs the checks, prints one line
//! per check and `N passed, M failed`, and exits non-zero on a failure.
//! Children exit when their stdin closes, and are killed and reaped when a
//! check fails.

#![allow(clippy::disallowed_types)] // plain counters in a test, nothing for loom

use std::io::{BufRead, BufReader, Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use commy_mesh::Caller;
use commy_mesh::policy::{CallPolicy, RequestHead, ServePolicy};
use commy_mesh::service::ServiceName;
use commy_mesh::{CallOptions, Mesh, MeshBuilder, Request, Responder, Response, Status};
use commy_shm::testing::CountingAllocator;

mod support;
use support::{builder, runtime};

/// Counts this process's allocations (`alloc`, `alloc_zeroed`,
/// `realloc`) and the bytes they ask for.
#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator::new();

/// What the allocator counted.
#[derive(Clone, Copy)]
struct Counted {
    allocations: u64,
    bytes: u64,
}

impl Counted {
    /// The counters now.
    fn now() -> Counted {
        Counted {
            allocations: GLOBAL.allocations(),
            bytes: GLOBAL.bytes(),
        }
    }

    /// What was counted from `before` to now.
    fn since(before: Counted) -> Counted {
        let now = Counted::now();
        Counted {
            allocations: now.allocations - before.allocations,
            bytes: now.bytes - before.bytes,
        }
    }
}

/// Calls counted per check.
const CALLS: u64 = 10_000;
/// Calls made before counting, with the same payload size: the link is
/// open and every buffer on the way has grown.
const WARM_UP: u64 = 1_000;
/// Allocations a check may count beyond `CALLS * per call`: room for the
/// process's other threads (tokio's workers and timer, the discovery
/// watcher), which may wake during the count and allocate a few times: one
/// run in ten counted 3, the others none (see the top of the file). 16 is
/// far below `CALLS`, so one allocation more per call, or one every 1000
/// calls, fails.
const SLACK: u64 = 16;

/// Client side, a `mesh.call` answered while its caller polls the link
/// (within [`Config::call_spin`](commy_mesh::Config::call_spin)): the
/// answer's payload.
const CLIENT_CALL_POLLED: u64 = 1;
/// Client side, a `mesh.call` whose caller sleeps until the link's reader
/// thread wakes it: the answer's payload (the answer waits in the call's
/// place in the pending table, `PendingCalls::settle`).
const CLIENT_CALL_WOKEN: u64 = 1;
/// Serving side, a `serve` handler that answers at once: the request's
/// payload (which the echo hands back as its answer).
const SERVED: u64 = 1;
/// Serving side, a `serve_deferred` handler that answers at once: the
/// request's payload and the [`Responder`]'s shared state
/// (`Responder::new`).
const SERVED_DEFERRED: u64 = 2;

/// A publish to one subscriber linked already: nothing.
const PUBLISHED: u64 = 0;
/// A message a subscriber takes from its publisher's ring (policy
/// `Block`): its payload.
const RECEIVED: u64 = 1;
/// A message a subscriber is lent by `next_batch`: nothing.
const LENT: u64 = 0;

/// The topic of the pub/sub checks.
const TOPIC: &str = "alloc/topic";

/// Payload sizes measured.
const SIZES: [usize; 2] = [64, 4096];

/// How long the child's `echo-slow` takes to answer: far longer than a
/// caller with a zero `call_spin` polls (up to 1024 pause instructions
/// before it first reads the clock), so that every such caller sleeps.
const SLOW: Duration = Duration::from_micros(100);

/// The client checks: how the caller gets its answer.
#[derive(Clone, Copy)]
enum ClientCase {
    /// `call_spin` longer than any call takes: the caller polls the link
    /// until its answer comes.
    Polled,
    /// `call_spin` zero and `echo-slow`: the caller sleeps until the
    /// link's reader thread wakes it with the answer.
    Woken,
    /// The default `call_spin` (50 µs) and `echo`: each call is one of the
    /// two above, in a proportion that depends on the machine and its load.
    Default,
}

impl ClientCase {
    /// What the check's line calls it.
    fn describe(self) -> &'static str {
        match self {
            ClientCase::Polled => "answered while the caller polls",
            ClientCase::Woken => "the caller sleeps until woken",
            ClientCase::Default => "default call_spin, either",
        }
    }

    /// The service called.
    fn service(self) -> &'static str {
        match self {
            ClientCase::Polled | ClientCase::Default => "echo",
            ClientCase::Woken => "echo-slow",
        }
    }

    /// The allocations allowed per call, and whether the count is exactly
    /// that (so that a lower one means the constant should go down).
    fn allowed(self) -> (u64, bool) {
        match self {
            ClientCase::Polled => (CLIENT_CALL_POLLED, true),
            ClientCase::Woken => (CLIENT_CALL_WOKEN, true),
            ClientCase::Default => (CLIENT_CALL_WOKEN, false),
        }
    }

    fn builder(self, builder: MeshBuilder) -> MeshBuilder {
        match self {
            ClientCase::Polled => builder.call_spin(Duration::from_secs(1)),
            ClientCase::Woken => builder.call_spin(Duration::ZERO),
            ClientCase::Default => builder,
        }
    }
}

/// The environment variable naming a child's role (`server`, `client`).
const ROLE: &str = "COMMY_ALLOC_TEST_ROLE";
/// The environment variable naming a child's runtime dir.
const DIR: &str = "COMMY_ALLOC_TEST_DIR";

fn main() -> ExitCode {
    match std::env::var(ROLE).as_deref() {
        Ok("server") => child_server(),
        Ok("client") => child_client(),
        Ok("subscriber") => child_subscriber(),
        Ok(other) => {
            eprintln!("unknown {ROLE}: {other}");
            ExitCode::FAILURE
        }
        Err(_) => run_checks(),
    }
}

/// The outcome of the checks so far.
#[derive(Default)]
struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    /// Checks that the allocations counted over [`CALLS`] calls are at
    /// most `per_call` each (plus [`SLACK`]), and prints the line. `exact`:
    /// the count is expected to be `per_call` each, and a lower one means
    /// the constant should go down.
    fn check(&mut self, what: &str, per_call: u64, exact: bool, counted: Counted) {
        let allowed = CALLS * per_call + SLACK;
        let ok = counted.allocations <= allowed;
        let mut line = format!(
            "{}: {what}: {:.3} allocations/call ({} in {CALLS} calls, {} bytes; \
             allowed {per_call}/call + {SLACK})",
            if ok { "ok" } else { "FAILED" },
            counted.allocations as f64 / CALLS as f64,
            counted.allocations,
            counted.bytes,
        );
        if ok && exact && counted.allocations + CALLS / 2 < CALLS * per_call {
            line.push_str(": fewer than the baseline, lower the constant");
        }
        println!("{line}");
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Runs `scenario`, counting a panic as one failed check.
    fn run(&mut self, name: &str, scenario: impl FnOnce(&mut Report)) {
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| scenario(self))) {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            println!("FAILED: {name}: {msg}");
            self.failed += 1;
        }
    }
}

fn run_checks() -> ExitCode {
    let mut report = Report::default();
    report.run("client side", client_side);
    report.run("pool of three", pool_side);
    report.run("serving side", serving_side);
    report.run("publisher", publisher_side);
    report.run("subscriber", subscriber_side);
    println!("{} passed, {} failed", report.passed, report.failed);
    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A payload of `size` bytes, shared: cloning it allocates nothing.
fn payload(size: usize) -> Bytes {
    let payload = Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>());
    // `Bytes` made from a `Vec` allocates its shared state on its first
    // clone: have that done here, outside any count.
    drop(payload.clone());
    payload
}

/// The client side: this process calls `echo` served by a child, with
/// each [`ClientCase`].
fn client_side(report: &mut Report) {
    let dir = PrivateDir::new();
    let mut server = Peer::spawn("server", &dir.0);
    server.expect("READY");
    let rt = runtime();
    let cases = [ClientCase::Polled, ClientCase::Woken, ClientCase::Default];
    let policies = [false, true];
    for (case, policy) in cases.into_iter().flat_map(|c| policies.map(|p| (c, p))) {
        rt.block_on(async {
            let mut builder = case.builder(builder(&dir.0));
            if policy {
                builder = builder.call_policy(empty_call_policy);
            }
            let mesh = builder.open().await.unwrap();
            let service = case.service();
            for size in SIZES {
                let payload = payload(size);
                for _ in 0..WARM_UP {
                    echo(&mesh, service, &payload).await;
                }
                let before = Counted::now();
                for _ in 0..CALLS {
                    echo(&mesh, service, &payload).await;
                }
                let counted = Counted::since(before);
                let (per_call, exact) = case.allowed();
                let with = if policy { ", empty call policy" } else { "" };
                report.check(
                    &format!(
                        "client: mesh.call {service}, {size} B, {}{with}",
                        case.describe()
                    ),
                    per_call,
                    exact,
                    counted,
                );
            }
            mesh.close().await;
        });
    }
}

/// Calls to a service of three instances: every call goes through the
/// pool's pick (by the default strategy, and by Maglev on a key), its
/// ejection check and the retry budget's count, none of which allocates.
fn pool_side(report: &mut Report) {
    let dir = PrivateDir::new();
    let mut server = Peer::spawn("server", &dir.0);
    server.expect("READY");
    let rt = runtime();
    for strategy in ["p2c", "round_robin", "maglev"] {
        rt.block_on(async {
            let mesh = builder(&dir.0)
                .setting("balance", strategy)
                .open()
                .await
                .unwrap();
            let payload = payload(64);
            let options = || {
                let options = CallOptions::default();
                match strategy {
                    "maglev" => options.hash_key(Bytes::from_static(b"user-42")),
                    _ => options,
                }
            };
            let call = async || {
                let reply = mesh
                    .call_with("echo-pool", payload.clone(), options())
                    .await
                    .unwrap();
                assert!(
                    *reply.payload() == payload,
                    "echo-pool answered something else"
                );
            };
            for _ in 0..WARM_UP {
                call().await;
            }
            let before = Counted::now();
            for _ in 0..CALLS {
                call().await;
            }
            let counted = Counted::since(before);
            let (per_call, _) = ClientCase::Default.allowed();
            report.check(
                &format!("client: mesh.call of a pool of three, {strategy}, 64 B"),
                per_call,
                false,
                counted,
            );
            mesh.close().await;
        });
    }
}

/// One call of `service`, an echo, checked.
async fn echo(mesh: &Mesh, service: &str, payload: &Bytes) {
    let reply = mesh.call(service, payload.clone()).await.unwrap();
    assert!(reply == *payload, "{service} answered something else");
}

/// The serving side: this process serves, a child calls.
fn serving_side(report: &mut Report) {
    let dir = PrivateDir::new();
    let rt = runtime();
    // Dropped last: what drops the mesh after a failed check finds the runtime.
    let _entered = rt.enter();
    let mesh = rt.block_on(builder(&dir.0).open()).unwrap();
    let _services = rt.block_on(async {
        let echo = mesh
            .serve("echo", |req: Request| async move {
                Ok::<_, Status>(Response::new(req.into_payload()))
            })
            .await
            .unwrap();
        let deferred = mesh
            .serve_deferred("echo-deferred", |req: Request, responder: Responder| {
                responder.respond(Ok(Response::new(req.into_payload())));
            })
            .await
            .unwrap();
        (echo, deferred)
    });
    // The same echo in a handle whose services have an empty serve policy.
    let policed = rt
        .block_on(builder(&dir.0).serve_policy(empty_serve_policy).open())
        .unwrap();
    let _admitted = rt
        .block_on(policed.serve("echo-admitted", |req: Request| async move {
            Ok::<_, Status>(Response::new(req.into_payload()))
        }))
        .unwrap();
    let mut client = Peer::spawn("client", &dir.0);
    client.expect("READY");
    for (service, what, per_call) in [
        ("echo", "serve", SERVED),
        ("echo-deferred", "serve_deferred", SERVED_DEFERRED),
        ("echo-admitted", "serve with an empty serve policy", SERVED),
    ] {
        for size in SIZES {
            client.send(&format!("CALL {service} {size} {WARM_UP}\n"));
            client.expect("DONE");
            let command = format!("CALL {service} {size} {CALLS}\n");
            let before = Counted::now();
            client.send(&command);
            client.expect("DONE");
            let counted = Counted::since(before);
            report.check(
                &format!("server: {what} answering at once, {size} B"),
                per_call,
                true,
                counted,
            );
        }
    }
    rt.block_on(policed.close());
    rt.block_on(mesh.close());
}

/// The publisher: this process publishes to a subscriber in a child.
fn publisher_side(report: &mut Report) {
    let dir = PrivateDir::new();
    let mut child = Peer::spawn("subscriber", &dir.0);
    child.expect("READY");
    let rt = runtime();
    rt.block_on(async {
        let mesh = builder(&dir.0).open().await.unwrap();
        mesh.wait_for_subscribers(TOPIC, 1, Duration::from_secs(10))
            .await
            .unwrap();
        for size in SIZES {
            let payload = payload(size);
            let what = |how: &str| format!("publisher: {how} to a linked subscriber, {size} B");
            let counted = publishes(&mut child, size, async || {
                assert_eq!(mesh.publish(TOPIC, payload.clone()).await.unwrap(), 1);
            })
            .await;
            report.check(&what("publish"), PUBLISHED, true, counted);
            // Through a publisher of the topic, from borrowed bytes.
            let mut publisher = mesh.publisher(TOPIC).unwrap();
            let counted = publishes(&mut child, size, async || {
                assert_eq!(publisher.publish(&payload[..]).await.unwrap(), 1);
            })
            .await;
            report.check(&what("Publisher::publish"), PUBLISHED, true, counted);
            // Written in place in the subscriber's ring.
            let counted = publishes(&mut child, size, async || {
                let written = mesh.publish_in_place(TOPIC, size, |buf| {
                    buf.copy_from_slice(&payload);
                    size
                });
                assert_eq!(written.await.unwrap(), 1);
            })
            .await;
            report.check(&what("publish_in_place"), PUBLISHED, true, counted);
        }
        mesh.close().await;
    });
}

/// Publishes [`WARM_UP`] and then [`CALLS`] messages of `size` bytes to
/// the child subscriber, one per `publish_one`, each lot taken by the
/// child before the next; counts the allocations of the second lot.
async fn publishes(child: &mut Peer, size: usize, mut publish_one: impl AsyncFnMut()) -> Counted {
    let mut lot = async |n: u64| {
        child.send(&format!("TAKE {size} {n}\n"));
        for _ in 0..n {
            publish_one().await;
        }
        child.expect("DONE");
    };
    lot(WARM_UP).await;
    let before = Counted::now();
    lot(CALLS).await;
    Counted::since(before)
}

/// The subscriber: this process takes what a child publishes.
fn subscriber_side(report: &mut Report) {
    let dir = PrivateDir::new();
    let rt = runtime();
    rt.block_on(async {
        let mesh = builder(&dir.0).open().await.unwrap();
        let mut sub = mesh.subscribe(TOPIC).await.unwrap();
        let mut child = Peer::spawn("client", &dir.0);
        child.expect("READY");
        for size in SIZES {
            let mut take = async |n: u64| {
                child.send(&format!("PUBLISH {TOPIC} {size} {n}\n"));
                for _ in 0..n {
                    let m = sub.next().await.unwrap();
                    assert_eq!(m.payload().len(), size);
                }
                child.expect("DONE");
            };
            take(WARM_UP).await;
            let before = Counted::now();
            take(CALLS).await;
            let counted = Counted::since(before);
            report.check(
                &format!("subscriber: next, policy Block, {size} B"),
                RECEIVED,
                true,
                counted,
            );
            // Lent out in place: nothing per message.
            let mut lend = async |n: u64| {
                child.send(&format!("PUBLISH {TOPIC} {size} {n}\n"));
                let mut got = 0;
                while got < n {
                    got += sub
                        .next_batch(64, |m| assert_eq!(m.payload().len(), size))
                        .await as u64;
                }
                child.expect("DONE");
            };
            lend(WARM_UP).await;
            let before = Counted::now();
            lend(CALLS).await;
            let counted = Counted::since(before);
            report.check(
                &format!("subscriber: next_batch, policy Block, {size} B"),
                LENT,
                false,
                counted,
            );
        }
        drop(sub);
        mesh.close().await;
    });
}

/// A call policy with every default: admits every instance, records
/// nothing of its own, never retries.
struct EmptyCallPolicy;

impl CallPolicy for EmptyCallPolicy {}

fn empty_call_policy(_: &ServiceName) -> Option<Arc<dyn CallPolicy>> {
    Some(Arc::new(EmptyCallPolicy))
}

/// A serve policy that admits every request.
struct AdmitAll;

impl ServePolicy for AdmitAll {
    fn admit(&self, _: &Caller, _: &RequestHead<'_>) -> Result<(), Status> {
        Ok(())
    }
}

fn empty_serve_policy(_: &ServiceName) -> Option<Arc<dyn ServePolicy>> {
    Some(Arc::new(AdmitAll))
}

/// A fresh private (0700) runtime dir, removed on drop. Short: sockets live
/// in it (Unix socket paths are limited to 107 bytes).
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> PrivateDir {
        use std::os::unix::fs::PermissionsExt;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("ca{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        PrivateDir(d)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process of this binary in a role, talking in lines on its stdin
/// and stdout. Dropping it closes its stdin (it exits), kills and reaps it.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

impl Peer {
    fn spawn(role: &str, dir: &Path) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, role)
            .env(DIR, dir)
            // Nothing from the environment or a config file: shared memory
            // in `dir` only.
            .env("XDG_CONFIG_HOME", dir)
            .env_remove("COMMY_CONFIG")
            .env_remove("COMMY_LISTEN")
            .env_remove("COMMY_PEERS")
            .env_remove("COMMY_TRANSPORT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Peer {
            stdin: child.stdin.take(),
            stdout: child.stdout.take().unwrap(),
            child,
        }
    }

    /// Writes `line` (which ends with a newline); allocates nothing.
    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the child's next line and checks it is `expected`.
    /// Allocates nothing unless the line is another one.
    fn expect(&mut self, expected: &str) {
        let mut line = [0u8; 256];
        let mut len = 0;
        loop {
            let mut byte = [0u8];
            match self.stdout.read(&mut byte) {
                Ok(0) => panic!("the child exited while {expected} was awaited"),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if len < line.len() => {
                    line[len] = byte[0];
                    len += 1;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("cannot read from the child: {e}"),
            }
        }
        let line = &line[..len];
        assert!(
            line == expected.as_bytes(),
            "the child said {:?} instead of {expected}",
            String::from_utf8_lossy(line)
        );
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until stdin is closed (the test is over, or gone).
fn wait_for_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn say(word: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{word}");
    let _ = out.flush();
}

/// Child role: serves `echo`, and `echo-slow` (which answers after
/// [`SLOW`]), in the runtime dir until stdin closes.
fn child_server() -> ExitCode {
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let rt = runtime();
    let mesh = rt.block_on(builder(&dir).open()).unwrap();
    let _echo = rt
        .block_on(mesh.serve("echo", |req: Request| async move {
            Ok::<_, Status>(Response::new(req.into_payload()))
        }))
        .unwrap();
    let _slow = rt
        .block_on(mesh.serve("echo-slow", |req: Request| async move {
            // Holds up its link's thread, which serves only this caller.
            std::thread::sleep(SLOW);
            Ok::<_, Status>(Response::new(req.into_payload()))
        }))
        .unwrap();
    // Three instances of `echo-pool`, in handles of their own.
    let pool: Vec<_> = (0..3)
        .map(|_| {
            rt.block_on(async {
                let mesh = builder(&dir).open().await.unwrap();
                let echo = mesh
                    .serve("echo-pool", |req: Request| async move {
                        Ok::<_, Status>(Response::new(req.into_payload()))
                    })
                    .await
                    .unwrap();
                (mesh, echo)
            })
        })
        .collect();
    say("READY");
    wait_for_eof();
    for (mesh, echo) in pool {
        drop(echo);
        rt.block_on(mesh.close());
    }
    rt.block_on(mesh.close());
    ExitCode::SUCCESS
}

/// Child role: subscribes to [`TOPIC`], says `READY`, and on each line
/// `TAKE <size> <n>` of stdin takes `n` messages of `size` bytes, then
/// says `DONE`; exits when stdin closes.
fn child_subscriber() -> ExitCode {
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let rt = runtime();
    let mesh = rt.block_on(builder(&dir).open()).unwrap();
    let mut sub = rt.block_on(mesh.subscribe(TOPIC)).unwrap();
    say("READY");
    for line in BufReader::new(std::io::stdin()).lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["TAKE", size, n] = words[..] else {
            eprintln!("alloc subscriber: unknown command {line:?}");
            return ExitCode::FAILURE;
        };
        let (size, n): (usize, u64) = (size.parse().unwrap(), n.parse().unwrap());
        let took = rt.block_on(async {
            for _ in 0..n {
                match sub.next().await {
                    Some(m) if m.payload().len() == size => {}
                    _ => return false,
                }
            }
            true
        });
        say(if took { "DONE" } else { "FAILED" });
    }
    drop(sub);
    rt.block_on(mesh.close());
    ExitCode::SUCCESS
}

/// Child role: on each line `CALL <service> <size> <n>` of stdin, makes
/// `n` calls of `service` with a payload of `size` bytes, checks each
/// answer, then says `DONE`; on `PUBLISH <topic> <size> <n>`, waits for a
/// subscriber of `topic` and publishes `n` messages of `size` bytes to it;
/// exits when stdin closes.
fn child_client() -> ExitCode {
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let rt = runtime();
    let mesh = rt.block_on(builder(&dir).open()).unwrap();
    say("READY");
    for line in BufReader::new(std::io::stdin()).lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let (verb, service, size, n) = match words[..] {
            [verb @ ("CALL" | "PUBLISH"), service, size, n] => (verb, service, size, n),
            _ => {
                eprintln!("alloc client: unknown command {line:?}");
                return ExitCode::FAILURE;
            }
        };
        let (size, n): (usize, u64) = (size.parse().unwrap(), n.parse().unwrap());
        let payload = payload(size);
        let result = rt.block_on(async {
            if verb == "PUBLISH" {
                mesh.wait_for_subscribers(service, 1, Duration::from_secs(10))
                    .await?;
                for _ in 0..n {
                    if mesh.publish(service, payload.clone()).await? != 1 {
                        return Err(Status::internal("the publish reached nobody"));
                    }
                }
                return Ok(());
            }
            for _ in 0..n {
                let reply = mesh.call(service, payload.clone()).await?;
                if reply != payload {
                    return Err(Status::internal("the answer is not the request"));
                }
            }
            Ok::<_, Status>(())
        });
        match result {
            Ok(()) => say("DONE"),
            Err(e) => {
                eprintln!("alloc client: calling {service}: {e}");
                say("FAILED");
            }
        }
    }
    rt.block_on(mesh.close());
    ExitCode::SUCCESS
}
