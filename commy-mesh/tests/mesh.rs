//! The local mesh with real processes: the test binary re-executes itself
//! as servers and clients (role in an environment variable).
#![allow(clippy::disallowed_types)] // plain counters in tests, nothing for loom

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_mesh::{CallOptions, Code, Mesh, Request, Response, Status};

mod support;
use support::{
    ARG, DIR, open, open_bounded, private_dir, ready_until_stdin_closes, role, serve_test_services,
    spawn_role,
};

/// Plays this process's child role, if it is one (see
/// [`support::run_child`]).
fn as_child() -> bool {
    support::run_child(|| {
        child_server();
        child_client();
    })
}

/// Child role: serve the test services (and `entered`) until killed or
/// its stdin closes.
fn child_server() {
    if role().as_deref() != Some("server") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = PathBuf::from(std::env::var(DIR).unwrap());
        let mesh = open(&dir).await;
        let _handles = serve_test_services(&mesh).await;
        // Says on stdout that a request reached it, then takes 10 s.
        let _entered = mesh
            .serve("entered", |_req: Request| async move {
                println!("ENTERED");
                use std::io::Write;
                std::io::stdout().flush().unwrap();
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok::<_, Status>(Response::default())
            })
            .await
            .unwrap();
        ready_until_stdin_closes().await;
    });
}

/// Child role: make ARG calls to echo, each with a unique payload, and
/// check every response is exactly its own request.
fn child_client() {
    if role().as_deref() != Some("client") {
        return;
    }
    let n: usize = std::env::var(ARG).unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = PathBuf::from(std::env::var(DIR).unwrap());
        let mesh = open(&dir).await;
        let me = std::process::id();
        let mut tasks = Vec::new();
        for t in 0..4 {
            let mesh = mesh.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..n / 4 {
                    let body = format!("{me}:{t}:{i}").into_bytes();
                    let reply = mesh.call("echo", body.clone()).await.unwrap();
                    assert_eq!(&reply[..], &body[..], "a response reached the wrong caller");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!("DONE {n}");
    });
}

fn wait_ready(child: &mut Child) {
    wait_line(child, "READY");
}

/// Reads the child's stdout until a line ends with `what`. Byte by byte:
/// nothing after that line is taken from the pipe.
fn wait_line(child: &mut Child, what: &str) {
    use std::io::Read;
    let out = child.stdout.as_mut().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        assert!(
            out.read(&mut byte).unwrap() > 0,
            "child exited before {what}"
        );
        if byte[0] != b'\n' {
            line.push(byte[0]);
            continue;
        }
        if String::from_utf8_lossy(&line).trim_end().ends_with(what) {
            return;
        }
        line.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_calls_and_statuses() {
    if as_child() {
        return;
    }
    let dir = private_dir("inproc");
    let mesh = open(&dir).await;
    let _h = serve_test_services(&mesh).await;

    assert_eq!(&mesh.call("echo", &b"hi"[..]).await.unwrap()[..], b"hi");
    // Unknown service.
    let e = mesh.call("nobody", &b"x"[..]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    // Invalid name.
    let e = mesh.call("no spaces", &b"x"[..]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // A handler's own error reaches the caller as is.
    let e = mesh.call("fail", &b"denied"[..]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "not for you");
    // A panicking handler gives Internal, and the service keeps serving.
    let e = mesh.call("fail", &b"panic"[..]).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert_eq!(&mesh.call("fail", &b"ok"[..]).await.unwrap()[..], b"fine");
    // Deadlines propagate: the caller gets DeadlineExceeded.
    let t = Instant::now();
    let e = mesh
        .call_with(
            "slow",
            5000u64.to_le_bytes().to_vec(),
            CallOptions::default().timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(t.elapsed() < Duration::from_secs(4));
    // Large payloads (fragmented in the ring) round-trip.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
    assert_eq!(&mesh.call("echo", big.clone()).await.unwrap()[..], &big[..]);
    // Typed calls.
    let reply: Vec<u8> = mesh.call_typed("echo", &vec![1u8, 2, 3]).await.unwrap();
    assert_eq!(reply, vec![1, 2, 3]);
    mesh.close().await;
    let e = mesh.call("echo", &b"x"[..]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

/// Many tasks call at once, some handlers answering at once and some after
/// sleeping: callers that poll the ring complete each other's calls, the
/// reader takes over when nobody polls, and every caller gets its own
/// answer. Run with and without caller polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_each_get_their_own_answer() {
    if as_child() {
        return;
    }
    let dir = private_dir("concurrent");
    let server = open(&dir).await;
    let _h = serve_test_services(&server).await;
    for spin in [Duration::from_micros(50), Duration::ZERO] {
        let client = Mesh::builder()
            .runtime_dir(&dir)
            .call_spin(spin)
            .open()
            .await
            .unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..24u64 {
            let client = client.clone();
            tasks.spawn(async move {
                for i in 0..150u64 {
                    // Every third call sleeps 0-2 ms in its handler.
                    let (service, ms) = if (t + i) % 3 == 0 {
                        ("slow", (i / 3) % 3)
                    } else {
                        ("echo", 0)
                    };
                    let mut payload = ms.to_le_bytes().to_vec();
                    payload.extend_from_slice(&(t << 32 | i).to_le_bytes());
                    let reply = client.call(service, payload.clone()).await.unwrap();
                    assert_eq!(&reply[..], &payload[..], "task {t} call {i}");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        client.close().await;
    }
    server.close().await;
}

/// A handler still running when its caller's deadline passes is cancelled:
/// its future is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_the_deadline_is_cancelled() {
    if as_child() {
        return;
    }
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dir = private_dir("cancel");
    let mesh = open(&dir).await;
    let dropped = Arc::new(AtomicBool::new(false));
    let _hang = {
        let dropped = dropped.clone();
        mesh.serve("hang", move |_req: Request| {
            let guard = SetOnDrop(dropped.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok::<_, Status>(Response::default())
            }
        })
        .await
        .unwrap()
    };
    let e = mesh
        .call_with(
            "hang",
            &b"x"[..],
            CallOptions::default().timeout(Duration::from_millis(50)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    let t = Instant::now();
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the handler was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mesh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_payload_is_refused_with_resource_exhausted() {
    if as_child() {
        return;
    }
    let dir = private_dir("oversize");
    let mesh = Mesh::builder()
        .runtime_dir(&dir)
        .link(commy_shm::LinkConfig::default().max_message(1 << 20))
        .open()
        .await
        .unwrap();
    let _h = serve_test_services(&mesh).await;
    let e = mesh.call("echo", vec![0u8; 2 << 20]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert_eq!(
        &mesh.call("echo", &b"small"[..]).await.unwrap()[..],
        b"small"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_is_refused_and_the_link_stays_up() {
    if as_child() {
        return;
    }
    // A message may be up to max_message (64 MiB): the caller is refused
    // one byte more before anything is sent.
    let dir = private_dir("message-limit");
    let mesh = open(&dir).await;
    let _h = serve_test_services(&mesh).await;
    let limit = commy_core::Limits::DEFAULT_MAX_MESSAGE as usize;
    let e = mesh.call("echo", vec![0u8; limit + 1]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("max_message"), "{e}");
    let e = mesh.send("echo", vec![0u8; limit + 1]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    let reply = mesh.call("echo", vec![7u8; limit]).await.unwrap();
    assert_eq!(reply.len(), limit);
    // A handler's response over the limit: the caller is told, the link
    // stays up.
    let _big = mesh
        .serve("too-big", move |_req: Request| async move {
            Ok::<_, Status>(Response::new(vec![0u8; limit + 1]))
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let e = mesh.call("too-big", &b""[..]).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    }
    assert_eq!(
        &mesh.call("echo", &b"after"[..]).await.unwrap()[..],
        b"after"
    );
    mesh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_gives_unavailable_then_recovers_when_restarted() {
    if as_child() {
        return;
    }
    let dir = private_dir("kill");
    let mut server = spawn_role("server", &dir, "");
    wait_ready(&mut server);
    let mesh = open(&dir).await;
    assert_eq!(
        &mesh.call("echo", &b"before"[..]).await.unwrap()[..],
        b"before"
    );

    // A call in flight (in its handler) when the server dies.
    let in_flight = {
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = mesh.call("entered", &b""[..]).await;
            (r, t.elapsed())
        })
    };
    let mut server = tokio::task::spawn_blocking(move || {
        wait_line(&mut server, "ENTERED");
        server
    })
    .await
    .unwrap();
    // And a callback call on the same link (it holds the link, not a
    // task): it learns of the death too.
    let (tx, callback) = tokio::sync::oneshot::channel();
    mesh.call_then("entered", &b""[..], Default::default(), move |r| {
        let _ = tx.send(r);
    });
    let mut server = tokio::task::spawn_blocking(move || {
        wait_line(&mut server, "ENTERED");
        server
    })
    .await
    .unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    // Noticed: not the handler's answer after 10 s, nor the deadline's
    // DEADLINE_EXCEEDED after 30 s.
    let (r, took) = in_flight.await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::Unavailable, "after {took:?}");
    let r = tokio::time::timeout(Duration::from_secs(8), callback).await;
    let r = r.expect("the callback call was not failed");
    let r = r.expect("the callback was dropped");
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);

    // Nobody serves now.
    let e = mesh.call("echo", &b"x"[..]).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::NotFound | Code::Unavailable),
        "{e}"
    );

    // Restart: the same handle's calls succeed again.
    let mut server = spawn_role("server", &dir, "");
    wait_ready(&mut server);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match mesh.call("echo", &b"after"[..]).await {
            Ok(r) => {
                assert_eq!(&r[..], b"after");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_client_processes_two_instances_every_response_is_its_own() {
    if as_child() {
        return;
    }
    let dir = private_dir("hammer");
    let mut servers: Vec<Child> = (0..2).map(|_| spawn_role("server", &dir, "")).collect();
    for s in &mut servers {
        wait_ready(s);
    }
    let clients: Vec<Child> = (0..16).map(|_| spawn_role("client", &dir, "400")).collect();
    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "a client failed");
        assert!(String::from_utf8_lossy(&out.stdout).contains("DONE 400"));
    }
    // Both instances served: ask for pids until both are seen.
    let mesh = open(&dir).await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..200 {
        let p = mesh.call("pid", &b""[..]).await.unwrap();
        pids.insert(u32::from_le_bytes(p[..4].try_into().unwrap()));
        if pids.len() == 2 {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "calls did not spread over both instances");
    for mut s in servers {
        s.kill().unwrap();
        s.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_commy_process_on_the_socket_does_not_disturb_the_service() {
    if as_child() {
        return;
    }
    let dir = private_dir("garbage");
    let mesh = open(&dir).await;
    let h = serve_test_services(&mesh).await;
    let path = h[0].socket_path().to_owned();
    // Garbage, then a client that says nothing.
    let raw = commy_shm::UdsStream::connect(&path).unwrap();
    raw.send_msg(b"\x00\x01garbage", &[]).unwrap();
    let _silent = commy_shm::UdsStream::connect(&path).unwrap();
    for i in 0..20u8 {
        assert_eq!(&mesh.call("echo", vec![i]).await.unwrap()[..], &[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_are_shared_between_mesh_handles() {
    if as_child() {
        return;
    }
    let dir = private_dir("region");
    let a = open(&dir).await;
    let b = open(&dir).await;
    let ra = a.region("board").size(4096).open_or_create().unwrap();
    let rb = b.region("board").size(4096).open_or_create().unwrap();
    assert_eq!(ra.generation(), rb.generation());
    ra.write_at(0, b"hello").unwrap();
    let mut buf = [0u8; 5];
    rb.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert!(
        a.region("board").size(4096).create().is_err(),
        "create must not succeed twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_sees_the_callers_deadline() {
    if as_child() {
        return;
    }
    let dir = private_dir("deadline-seen");
    let mesh = open(&dir).await;
    // Answers with the time left as the handler sees it, in milliseconds
    // (u64::MAX when there is no deadline).
    let _left = mesh
        .serve("left", |req: Request| async move {
            let left = req
                .deadline()
                .map_or(u64::MAX, |d| d.remaining().as_millis() as u64);
            Ok::<_, Status>(Response::new(left.to_le_bytes().to_vec()))
        })
        .await
        .unwrap();
    let ms = |b: bytes::Bytes| u64::from_le_bytes(b[..8].try_into().unwrap());
    let reply = mesh
        .call_with(
            "left",
            &b""[..],
            CallOptions::default().timeout(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    let left = ms(reply.into_payload());
    assert!((10_000..=20_000).contains(&left), "{left} ms left");
    let unbounded = Mesh::builder()
        .runtime_dir(&dir)
        .default_timeout(None)
        .open()
        .await
        .unwrap();
    let reply = unbounded.call("left", &b""[..]).await.unwrap();
    assert_eq!(ms(reply), u64::MAX, "no deadline was set");
    unbounded.close().await;
    mesh.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_inline_and_waiting_handlers() {
    if as_child() {
        return;
    }
    let dir = private_dir("drain");
    let server = open(&dir).await;
    let blocked = Arc::new(AtomicBool::new(false));
    let waited = Arc::new(AtomicBool::new(false));
    // How many handlers have started.
    let entered = Arc::new(AtomicUsize::new(0));
    // Blocks its link thread (runs inline, never waits)...
    let blocking = {
        let blocked = blocked.clone();
        let entered = entered.clone();
        server
            .serve("blocking", move |_req: Request| {
                entered.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
                blocked.store(true, Ordering::SeqCst);
                async { Ok::<_, Status>(Response::default()) }
            })
            .await
            .unwrap()
    };
    // ...and waits (continues as a task).
    let waiting = {
        let waited = waited.clone();
        let entered = entered.clone();
        server
            .serve("waiting", move |_req: Request| {
                let waited = waited.clone();
                entered.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    waited.store(true, Ordering::SeqCst);
                    Ok::<_, Status>(Response::default())
                }
            })
            .await
            .unwrap()
    };
    let client = open(&dir).await;
    for (n, (name, handle, done)) in [
        ("blocking", blocking, &blocked),
        ("waiting", waiting, &waited),
    ]
    .into_iter()
    .enumerate()
    {
        let call = {
            let client = client.clone();
            tokio::spawn(async move { client.call(name, &b""[..]).await })
        };
        // Shut down once the handler runs (it takes 300 ms).
        while entered.load(Ordering::SeqCst) <= n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        handle.shutdown().await;
        assert!(
            done.load(Ordering::SeqCst),
            "shutdown of {name} returned before its handler finished"
        );
        call.await.unwrap().unwrap();
    }
    client.close().await;
    server.close().await;
}

/// Repeated calls to a single instance take a per-thread shortcut to its
/// link; a second instance appearing, or the first leaving, must still be
/// noticed by those calls.
#[tokio::test(flavor = "current_thread")]
async fn repeated_calls_follow_instances_that_come_and_go() {
    if as_child() {
        return;
    }
    let dir = private_dir("last-called");
    async fn serve_marker(dir: &Path, marker: u8) -> (Mesh, commy_mesh::ServiceHandle) {
        let mesh = open(dir).await;
        let handle = mesh
            .serve("marker", move |_req: Request| async move {
                Ok::<_, Status>(Response::new(vec![marker]))
            })
            .await
            .unwrap();
        (mesh, handle)
    }
    let (a_mesh, a) = serve_marker(&dir, b'a').await;
    let client = open(&dir).await;
    for _ in 0..50 {
        assert_eq!(&client.call("marker", &b""[..]).await.unwrap()[..], b"a");
    }
    let (b_mesh, b) = serve_marker(&dir, b'b').await;
    // Discovery notices the new instance within milliseconds; calls then
    // spread over both.
    let t = Instant::now();
    let mut seen_b = false;
    while !seen_b {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "calls never reached the second instance"
        );
        seen_b = &client.call("marker", &b""[..]).await.unwrap()[..] == b"b";
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut from_a = 0;
    for _ in 0..200 {
        if &client.call("marker", &b""[..]).await.unwrap()[..] == b"a" {
            from_a += 1;
        }
    }
    assert!(
        (20..=180).contains(&from_a),
        "{from_a} of 200 calls went to a"
    );
    // The first instance leaves: once discovery noticed, every call goes to b.
    a.shutdown().await;
    a_mesh.close().await;
    let t = Instant::now();
    loop {
        let replies: Vec<_> = calls_to_marker(&client, 20).await;
        if replies.iter().all(|r| r.as_deref() == Ok(&b"b"[..])) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "calls still fail or reach the instance that left: {replies:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.shutdown().await;
    b_mesh.close().await;
    client.close().await;
}

/// `n` sequential calls to `marker`, with their results.
async fn calls_to_marker(client: &Mesh, n: usize) -> Vec<Result<Vec<u8>, Code>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            client
                .call("marker", &b""[..])
                .await
                .map(|b| b.to_vec())
                .map_err(|e| e.code()),
        );
    }
    out
}

/// Holders of a bounded resource: how many now, and the most at once.
#[derive(Default)]
struct Holders {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Holders {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `max_concurrency` bounds the handlers that wait: an async handler past
/// its first wait, and a deferred handler until it answers. Requests beyond
/// the bound wait for a permit, and every one is answered with its own
/// reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_bounds_waiting_and_deferred_handlers() {
    if as_child() {
        return;
    }
    const BOUND: usize = 3;
    let dir = private_dir("bounded");
    let server = open_bounded(&dir, BOUND).await;
    let waiting = Arc::new(Holders::default());
    let deferred = Arc::new(Holders::default());
    let _waiting = {
        let holders = waiting.clone();
        server
            .serve("waiting", move |req: Request| {
                let holders = holders.clone();
                async move {
                    // The first poll runs on the link's thread without a
                    // permit; from here on the handler holds one.
                    tokio::task::yield_now().await;
                    holders.enter();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    holders.leave();
                    Ok::<_, Status>(Response::new(req.into_payload()))
                }
            })
            .await
            .unwrap()
    };
    let _deferred = {
        let holders = deferred.clone();
        server
            .serve_deferred("deferred", move |req, responder| {
                holders.enter();
                let holders = holders.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(10));
                    holders.leave();
                    responder.ok(req.into_payload());
                });
            })
            .await
            .unwrap()
    };
    let client = open(&dir).await;
    for (name, holders) in [("waiting", &waiting), ("deferred", &deferred)] {
        let calls: Vec<_> = (0..24u32)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let reply = client.call(name, i.to_le_bytes().to_vec()).await.unwrap();
                    assert_eq!(
                        &reply[..],
                        &i.to_le_bytes(),
                        "{name}: call {i} got another's reply"
                    );
                })
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
        let peak = holders.peak.load(Ordering::SeqCst);
        assert!(
            peak <= BOUND,
            "{name}: {peak} handlers at once, bound {BOUND}"
        );
        assert!(
            peak >= 2,
            "{name}: the calls never overlapped (peak {peak})"
        );
        assert_eq!(holders.now.load(Ordering::SeqCst), 0);
    }
    client.close().await;
    server.close().await;
}

/// A deferred handler may answer with a borrowed payload (`ok_copied`),
/// from the link's thread or another one, and only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_handler_answers_with_a_copied_payload() {
    if as_child() {
        return;
    }
    let dir = private_dir("copied");
    let server = open(&dir).await;
    let _now = server
        .serve_deferred("now", |req, responder| {
            let mut answer = req.payload().to_vec();
            answer.reverse();
            assert!(responder.ok_copied(&answer));
        })
        .await
        .unwrap();
    let _later = server
        .serve_deferred("later", |req, responder| {
            std::thread::spawn(move || responder.ok_copied(&req.payload()[..]));
        })
        .await
        .unwrap();
    let client = open(&dir).await;
    let reply = client.call("now", &b"abc"[..]).await.unwrap();
    assert_eq!(&reply[..], b"cba");
    let big = vec![7u8; 200_000];
    let reply = client.call("later", big.clone()).await.unwrap();
    assert_eq!(&reply[..], &big[..]);
    client.close().await;
    server.close().await;
}

/// `Mesh::close` with calls in flight: the serving handle's close waits
/// for its handler and the caller gets the answer; the calling handle's
/// close lets its own call in flight finish; after a close, calls on the
/// handle are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_calls_in_flight_lets_them_finish() {
    if as_child() {
        return;
    }
    /// A service whose handler counts itself in `entered`, then answers
    /// the payload once `release` is notified.
    async fn serve_held(
        mesh: &Mesh,
        name: &str,
        entered: &Arc<AtomicUsize>,
        release: &Arc<tokio::sync::Notify>,
    ) -> commy_mesh::ServiceHandle {
        let (entered, release) = (entered.clone(), release.clone());
        mesh.serve(name, move |req: Request| {
            let (entered, release) = (entered.clone(), release.clone());
            async move {
                let waiting = release.notified();
                entered.fetch_add(1, Ordering::SeqCst);
                waiting.await;
                Ok::<_, Status>(Response::new(req.into_payload()))
            }
        })
        .await
        .unwrap()
    }
    let dir = private_dir("close-in-flight");
    let entered = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let client = open(&dir).await;
    let call = |name: &'static str, body: &'static [u8]| {
        let client = client.clone();
        tokio::spawn(async move { client.call(name, body).await })
    };
    let until_entered = |n: usize, call: &tokio::task::JoinHandle<_>| {
        assert!(!call.is_finished(), "the call ended before its handler ran");
        entered.load(Ordering::SeqCst) >= n
    };

    // The serving handle closes while its handler holds a call.
    let server = open(&dir).await;
    let _h = serve_held(&server, "held", &entered, &release).await;
    let first = call("held", b"one");
    while !until_entered(1, &first) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let closing = {
        let server = server.clone();
        tokio::spawn(async move { server.close().await })
    };
    // Closing has to wait for the handler, which waits for us.
    tokio::task::yield_now().await;
    assert!(
        !closing.is_finished(),
        "close returned with a call in flight"
    );
    release.notify_one();
    closing.await.unwrap();
    assert_eq!(&first.await.unwrap().unwrap()[..], b"one");
    assert_eq!(
        server.call("held", &b"x"[..]).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // The calling handle closes while its call waits for an answer.
    let server = open(&dir).await;
    let _h = serve_held(&server, "held-again", &entered, &release).await;
    let second = call("held-again", b"two");
    while !until_entered(2, &second) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client.close().await;
    assert_eq!(
        client
            .call("held-again", &b"x"[..])
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    release.notify_one();
    assert_eq!(&second.await.unwrap().unwrap()[..], b"two");
    server.close().await;
}

/// A client written from docs/PROTOCOL.md, over shared memory: a Request
/// with END_STREAM in a raw link to the service's socket is answered by a
/// Response with END_STREAM (and a failing one by an Error), and a OneWay
/// with END_STREAM is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_shared_memory_client_sees_end_stream() {
    use commy_core::{Frame, FrameFlags, FrameKind, FrameRef, Limits, StreamId};
    if as_child() {
        return;
    }
    let dir = private_dir("raw-end-stream");
    let server = open(&dir).await;
    let _h = serve_test_services(&server).await;
    let path = echo_socket(&dir);
    let frames = tokio::task::spawn_blocking(move || {
        let mut link =
            commy_shm::ShmLink::connect(&path, commy_shm::LinkConfig::default()).unwrap();
        let ended = |kind, id: u64, metadata: &[u8], body: &[u8]| {
            Frame::new(kind, StreamId(id), metadata.to_vec(), body.to_vec())
                .unwrap()
                .with_flags(FrameFlags::END_STREAM)
                .to_vec()
        };
        link.send(&ended(FrameKind::OneWay, 1, b"", b"note"))
            .unwrap();
        let mut answer = |id: u64, metadata: &[u8], body: &[u8]| {
            link.send(&ended(FrameKind::Request, id, metadata, body))
                .unwrap();
            let far = Instant::now() + Duration::from_secs(20);
            let msg = link.recv_deadline(far).unwrap();
            FrameRef::decode(&msg, &Limits::DEFAULT).unwrap().to_frame()
        };
        // A call, and one whose metadata section is not postcard.
        (answer(3, b"", b"hello"), answer(5, &[0xff], b"x"))
    })
    .await
    .unwrap();
    let (answer, failed) = frames;
    assert_eq!(answer.kind(), FrameKind::Response);
    assert_eq!(answer.header().stream_id, StreamId(3));
    assert!(answer.header().flags.contains(FrameFlags::END_STREAM));
    assert_eq!(&answer.payload()[..], b"hello");
    // An Error ends its stream by itself (section 4.9).
    assert_eq!(failed.kind(), FrameKind::Error);
    assert_eq!(failed.header().stream_id, StreamId(5));
    let status = failed.status().unwrap().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    server.close().await;
}

/// The socket of the first `echo` instance in the runtime dir `dir`.
fn echo_socket(dir: &std::path::Path) -> std::path::PathBuf {
    use commy_mesh::MeshName;
    use commy_mesh::discovery::LocalRegistry;
    let registry = LocalRegistry::new(
        commy_shm::RuntimeDir::at(dir).unwrap(),
        &MeshName::default(),
    )
    .unwrap();
    let echo = registry
        .instances(&commy_mesh::service::ServiceName::new("echo").unwrap())
        .unwrap();
    let commy_core::Endpoint::Shm(addr) = &echo[0].endpoint else {
        panic!("not a shared-memory endpoint: {}", echo[0].endpoint);
    };
    addr.to_path_buf()
}

/// docs/PROTOCOL.md 4.1 over shared memory: a request on a reused, lower
/// or even stream id fails the link (an Error on stream 0, then the end),
/// and is not answered; other links are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_memory_link_that_breaks_stream_order_is_closed() {
    use commy_core::{Frame, FrameKind, FrameRef, Limits, StreamId};
    if as_child() {
        return;
    }
    let dir = private_dir("raw-stream-order");
    let server = open(&dir).await;
    let _h = serve_test_services(&server).await;
    let path = echo_socket(&dir);
    for ids in [[3u64, 3], [5, 1], [1, 2]] {
        let path = path.clone();
        let got = tokio::task::spawn_blocking(move || {
            let mut link =
                commy_shm::ShmLink::connect(&path, commy_shm::LinkConfig::default()).unwrap();
            for id in ids {
                let f = Frame::new(FrameKind::Request, StreamId(id), Vec::new(), b"x".to_vec());
                link.send(&f.unwrap().to_vec()).unwrap();
            }
            let far = Instant::now() + Duration::from_secs(20);
            let mut got = Vec::new();
            while let Ok(msg) = link.recv_deadline(far) {
                got.push(FrameRef::decode(&msg, &Limits::DEFAULT).unwrap().to_frame());
            }
            got
        })
        .await
        .unwrap();
        let answered: Vec<u64> = got
            .iter()
            .filter(|f| f.kind() == FrameKind::Response)
            .map(|f| f.stream_id().0)
            .collect();
        assert_eq!(answered, [ids[0]], "{ids:?}: only the first is answered");
        let error = got
            .iter()
            .find(|f| f.kind() == FrameKind::Error && f.stream_id() == StreamId(0))
            .unwrap_or_else(|| panic!("{ids:?}: no link error in {got:?}"));
        let status = error.status().unwrap().unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
        assert!(status.message().contains("never reused"), "{status}");
    }
    assert_eq!(
        &server.call("echo", &b"still"[..]).await.unwrap()[..],
        b"still"
    );
    server.close().await;
}

/// A handle that closes removes the mesh's directories it leaves empty
/// (its services', its subscriptions', the ones a call looked in, and the
/// mesh's own), and only those: what another handle still uses stays, and
/// that handle goes on serving, subscribing and forming queue groups in
/// directories made again after they were removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_handle_leaves_no_empty_directory() {
    if as_child() {
        return;
    }
    let dir = private_dir("tidy");
    let entries = |dir: &Path| -> Vec<String> {
        let mut all = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                all.push(p.strip_prefix(dir).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        all.sort();
        all
    };
    let echo = |req: Request| async move { Ok::<_, Status>(Response::new(req.into_payload())) };

    // Alone: nothing is left.
    let mesh = open(&dir).await;
    let _svc = mesh.serve("tidy-echo", echo).await.unwrap();
    let _sub = mesh.subscribe("tidy/topic").await.unwrap();
    let _member = mesh.subscribe_group("tidy/topic", "workers").await.unwrap();
    assert_eq!(
        mesh.call("nobody-here", &b"x"[..])
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    mesh.close().await;
    drop((_svc, _sub, _member));
    assert_eq!(entries(&dir), Vec::<String>::new());

    // Beside another handle: its directories stay, and it goes on.
    let stays = open(&dir).await;
    let _kept = stays.serve("kept", echo).await.unwrap();
    let _kept_sub = stays.subscribe("kept/topic").await.unwrap();
    // Its publisher watches the topic registry for queue groups.
    assert_eq!(stays.publish("kept/topic", &b"1"[..]).await.unwrap(), 1);
    let leaves = open(&dir).await;
    let _gone = leaves.serve("gone", echo).await.unwrap();
    leaves.close().await;
    let left = entries(&dir);
    assert!(
        left.iter().any(|e| e.starts_with("default/kept/")),
        "{left:?}"
    );
    assert!(!left.iter().any(|e| e.contains("gone")), "{left:?}");
    // Directories removed meanwhile are made again.
    let again = open(&dir).await;
    again.close().await;
    let _later = stays.serve("later", echo).await.unwrap();
    assert_eq!(&stays.call("later", &b"hi"[..]).await.unwrap()[..], b"hi");
    let mut member = stays.subscribe_group("kept/topic", "late").await.unwrap();
    stays
        .wait_for_subscribers("kept/topic", 2, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(stays.publish("kept/topic", &b"2"[..]).await.unwrap(), 2);
    let got = member.next_timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(&got.unwrap().payload()[..], b"2");
    drop(member);
    stays.close().await;
    drop((_kept, _kept_sub, _later));
    assert_eq!(entries(&dir), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `call_many` puts each call's own result in its place: the first batch
/// before any link is open, batches over the open link (answered within
/// the spin, or by handlers that wait), per-call failures and refusals
/// beside successes, a deadline for the whole batch, and two batches and
/// single calls at once on the same link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_many_gives_each_call_its_own_result_in_order() {
    if as_child() {
        return;
    }
    let dir = private_dir("call-many");
    let mut server = spawn_role("server", &dir, "");
    wait_ready(&mut server);
    let mesh = open(&dir).await;
    let batch = |tag: u64, n: u64| -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from([0u64.to_le_bytes(), (tag << 32 | i).to_le_bytes()].concat()))
            .collect()
    };
    let check = |requests: &[Bytes], answers: Vec<Result<Response, Status>>| {
        assert_eq!(answers.len(), requests.len());
        for (request, answer) in requests.iter().zip(answers) {
            assert_eq!(answer.unwrap().payload(), request, "an answer out of place");
        }
    };
    // No link yet: each call goes its own way.
    let first = batch(0, 50);
    check(
        &first,
        mesh.call_many("echo", &first, Default::default()).await,
    );
    // Over the open link, small and large batches.
    for (tag, n) in [(1, 1), (2, 256), (3, 3000)] {
        let requests = batch(tag, n);
        check(
            &requests,
            mesh.call_many("echo", &requests, Default::default()).await,
        );
    }
    assert!(
        mesh.call_many("echo", &[], Default::default())
            .await
            .is_empty()
    );
    // Handlers that wait 0-3 ms: the link's reader delivers what comes
    // after the spin.
    let waiting: Vec<Bytes> = (0..200u64)
        .map(|i| Bytes::from([(i % 4).to_le_bytes(), i.to_le_bytes()].concat()))
        .collect();
    check(
        &waiting,
        mesh.call_many("slow", &waiting, Default::default()).await,
    );
    // Failures stay with their calls.
    let mixed = vec![
        Bytes::from_static(b"ok"),
        Bytes::from_static(b"denied"),
        Bytes::from_static(b"ok"),
    ];
    let answers = mesh.call_many("fail", &mixed, Default::default()).await;
    assert_eq!(&answers[0].as_ref().unwrap().payload()[..], b"fine");
    assert_eq!(
        answers[1].as_ref().unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(&answers[2].as_ref().unwrap().payload()[..], b"fine");
    let e = &mesh.call_many("nobody", &mixed, Default::default()).await[1];
    assert_eq!(e.as_ref().unwrap_err().code(), Code::NotFound);
    // The deadline holds for the batch: calls not answered by then fail.
    let late: Vec<Bytes> = (0..8u64)
        .map(|i| {
            Bytes::from(
                [
                    (if i % 2 == 0 { 0u64 } else { 2_000 }).to_le_bytes(),
                    i.to_le_bytes(),
                ]
                .concat(),
            )
        })
        .collect();
    let t = Instant::now();
    let answers = mesh
        .call_many(
            "slow",
            &late,
            CallOptions::default().timeout(Duration::from_millis(100)),
        )
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the batch outlived its deadline"
    );
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(r) if i % 2 == 0 => assert_eq!(r.payload(), &late[i]),
            Err(e) if i % 2 == 1 => assert_eq!(e.code(), Code::DeadlineExceeded, "{e}"),
            other => panic!("call {i}: {other:?}"),
        }
    }
    // Two batches and single calls on one link at once.
    let mut tasks = tokio::task::JoinSet::new();
    for tag in 10..14u64 {
        let mesh = mesh.clone();
        tasks.spawn(async move {
            for round in 0..20u64 {
                let requests = batch(tag << 8 | round, 64);
                check(
                    &requests,
                    mesh.call_many("echo", &requests, Default::default()).await,
                );
                let single = Bytes::from(format!("{tag}-{round}"));
                assert_eq!(mesh.call("echo", single.clone()).await.unwrap(), single);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    mesh.close().await;
    drop(server.stdin.take());
    server.wait().unwrap();
}
