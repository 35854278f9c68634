//! Outlier ejection and retries: three instances of `flaky` over shared
//! memory, each a mesh handle of its own in one runtime dir, answering
//! their number; one can be told to fail every call with UNAVAILABLE, or
//! two calls of every three, or to stall (answer after a minute).
#![allow(clippy::disallowed_types)] // plain counters in tests, nothing for loom

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use commy_mesh::call::EndpointInfo;
use commy_mesh::policy::Standing;
use commy_mesh::{CallOptions, Mesh, Request, Response, ServiceHandle, Status};

mod support;

/// One instance of `flaky`: its handle, whether it fails (every call, or
/// two of every three), the calls its handler saw.
struct Instance {
    _mesh: Mesh,
    _handle: ServiceHandle,
    failing: Arc<AtomicBool>,
    failing_some: Arc<AtomicBool>,
    stalling: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    /// Stalled handlers dropped before they answered (their caller gave up).
    stalls_cancelled: Arc<AtomicU64>,
}

/// Counts a stalled handler dropped before it answered.
struct CountDrop(Arc<AtomicU64>);

impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

async fn instance(dir: &Path, number: u8) -> Instance {
    let mesh = support::builder(dir).open().await.unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let failing_some = Arc::new(AtomicBool::new(false));
    let stalling = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let stalls_cancelled = Arc::new(AtomicU64::new(0));
    let handle = {
        let (failing, some, calls) = (failing.clone(), failing_some.clone(), calls.clone());
        let (stalling, cancelled) = (stalling.clone(), stalls_cancelled.clone());
        mesh.serve("flaky", move |_req: Request| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            let fail =
                failing.load(Ordering::Relaxed) || (some.load(Ordering::Relaxed) && n % 3 != 2);
            let stall = stalling
                .load(Ordering::Relaxed)
                .then(|| CountDrop(cancelled.clone()));
            async move {
                if let Some(stall) = stall {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    std::mem::forget(stall);
                }
                if fail {
                    Err(Status::unavailable(format!(
                        "instance {number} fails on purpose"
                    )))
                } else {
                    Ok(Response::new(vec![number]))
                }
            }
        })
        .await
        .unwrap()
    };
    Instance {
        _mesh: mesh,
        _handle: handle,
        failing,
        failing_some,
        stalling,
        calls,
        stalls_cancelled,
    }
}

/// `client`'s endpoints of `flaky`, and the one of them ejected (there
/// must be one).
fn the_one_ejected(client: &Mesh) -> (Vec<EndpointInfo>, EndpointInfo) {
    let endpoints = client.endpoints("flaky").unwrap();
    let out: Vec<_> = endpoints
        .iter()
        .filter(|e| matches!(e.standing, Standing::Ejected { .. }))
        .cloned()
        .collect();
    assert_eq!(out.len(), 1, "{endpoints:?}");
    let one = out.into_iter().next().unwrap();
    (endpoints, one)
}

/// Three instances of `flaky` (numbered 0 to 2) in a new runtime dir
/// named after `name`.
async fn three_instances(name: &str) -> (std::path::PathBuf, Vec<Instance>) {
    let dir = support::private_dir(name);
    let mut instances = Vec::new();
    for i in 0..3 {
        instances.push(instance(&dir, i).await);
    }
    (dir, instances)
}

/// A client of `dir` with an ejection of `ejection` and the settings
/// `extra` (key, value).
async fn client(dir: &Path, ejection: &str, extra: &[(&str, &str)]) -> Mesh {
    let mut b = support::builder(dir).setting("ejection_time", ejection);
    for (k, v) in extra {
        b = b.setting(k, *v);
    }
    b.open().await.unwrap()
}

/// Calls `flaky` until every one of `n` instances has answered once.
async fn reach_all(client: &Mesh, n: usize) {
    let mut seen = vec![false; n];
    for _ in 0..10_000 {
        if let Ok(reply) = client.call("flaky", Vec::new()).await {
            seen[reply[0] as usize] = true;
        }
        if seen.iter().all(|s| *s) {
            return;
        }
    }
    panic!("not every instance answered: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_instance_is_ejected_and_comes_back_after_its_time() {
    let (dir, instances) = three_instances("resilience-eject").await;
    let client = client(&dir, "500ms", &[]).await;
    reach_all(&client, 3).await;

    // It fails: the calls it takes fail, until its fifth failure in a row
    // ejects it.
    instances[2].failing.store(true, Ordering::Relaxed);
    let before = instances[2].calls.load(Ordering::Relaxed);
    let (mut failed, mut ejected_at) = (0, None);
    for _ in 0..300 {
        if client.call("flaky", Vec::new()).await.is_err() {
            failed += 1;
            if failed == 5 {
                ejected_at = Some(Instant::now());
            }
        }
    }
    let taken = instances[2].calls.load(Ordering::Relaxed) - before;
    assert_eq!(failed, 5, "ejected at its fifth failure");
    assert_eq!(taken, 5, "no call while ejected");
    let ejected_at = ejected_at.unwrap();
    // What the pool says of it.
    let (endpoints, out) = the_one_ejected(&client);
    assert_eq!(endpoints.len(), 3);
    assert_eq!((out.failed_calls, out.ejections), (5, 1));
    assert!(out.linked && out.in_flight == 0);
    let in_pool = |e: &&EndpointInfo| e.standing == Standing::In { failures: 0 };
    assert_eq!(endpoints.iter().filter(in_pool).count(), 2);

    // It recovers: once its ejection is over, trial calls re-admit it.
    instances[2].failing.store(false, Ordering::Relaxed);
    let before = instances[2].calls.load(Ordering::Relaxed);
    let mut back = None;
    while ejected_at.elapsed() < Duration::from_secs(3) {
        let reply = client.call("flaky", Vec::new()).await.unwrap();
        if reply[0] == 2 && back.is_none() {
            back = Some(ejected_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let back = back.expect("the recovered instance took calls again");
    assert!(
        back >= Duration::from_millis(490) && back < Duration::from_millis(1_500),
        "back after {back:?}"
    );
    assert!(
        instances[2].calls.load(Ordering::Relaxed) - before > 100,
        "re-admitted, it takes its share"
    );
    let endpoints = client.endpoints("flaky").unwrap();
    assert!(
        endpoints
            .iter()
            .all(|e| e.standing == Standing::In { failures: 0 })
    );
    assert!(client.endpoints("no spaces").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_failing_too_many_calls_is_ejected_without_a_run_of_five() {
    let (dir, instances) = three_instances("resilience-rate").await;
    let client = client(&dir, "30s", &[]).await;
    reach_all(&client, 3).await;
    // Two of every three of its calls fail: never five in a row, but a
    // third of them succeed (under the default 50 %).
    instances[1].failing_some.store(true, Ordering::Relaxed);
    let before = instances[1].calls.load(Ordering::Relaxed);
    let mut failed = 0;
    for _ in 0..600 {
        failed += usize::from(client.call("flaky", Vec::new()).await.is_err());
    }
    let taken = instances[1].calls.load(Ordering::Relaxed) - before;
    // Ejected by its failure once 20 of its calls were counted (the
    // window opened at its first one, a failure).
    assert!((20..=22).contains(&taken), "it took {taken} calls");
    assert!((13..=15).contains(&failed), "{failed} calls failed");
    let (_, out) = the_one_ejected(&client);
    assert_eq!(out.ejections, 1);

    // Off: the same instance keeps its share, failing two calls in three.
    let off = client_off(&dir).await;
    reach_all(&off, 3).await;
    let before = instances[1].calls.load(Ordering::Relaxed);
    for _ in 0..300 {
        let _ = off.call("flaky", Vec::new()).await;
    }
    assert!(instances[1].calls.load(Ordering::Relaxed) - before > 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_call_goes_around_a_stalling_instance() {
    let (dir, instances) = three_instances("resilience-hedge").await;
    let hedged = [
        ("idempotent", "flaky"),
        ("hedge", "flaky=5ms"),
        ("retry_budget_percent", "100"),
    ];
    let hedging = client(&dir, "30s", &hedged).await;
    reach_all(&hedging, 3).await;
    instances[0].stalling.store(true, Ordering::Relaxed);
    let before = instances[0].calls.load(Ordering::Relaxed);
    // Each call that went to the stalling instance went to another after
    // 5 ms, which answered; the stalled attempt was cancelled.
    for i in 0..100 {
        let reply = hedging.call("flaky", Vec::new()).await;
        let reply = reply.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_ne!(reply[0], 0, "call {i}");
    }
    let stalled = instances[0].calls.load(Ordering::Relaxed) - before;
    assert!(stalled > 0, "no call went to the stalling instance");
    let mut cancelled = 0;
    for _ in 0..500 {
        cancelled = instances[0].stalls_cancelled.load(Ordering::Relaxed);
        if cancelled == stalled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cancelled, stalled, "every stalled attempt was cancelled");

    // Not hedged (not idempotent): a call that goes there waits until
    // its deadline.
    let plain = client(&dir, "30s", &[("hedge", "flaky=5ms")]).await;
    assert!(
        late_calls(&plain).await >= 2,
        "no unhedged call went to the stalling instance"
    );
    // Hedged in general, but not this service (a delay of 0). A new
    // client's first call to an instance is not hedged (it connects):
    // two late calls show that linked ones are not either.
    let off = [("idempotent", "flaky"), ("hedge", "5ms,flaky=0")];
    let not_this = client(&dir, "30s", &off).await;
    assert!(
        late_calls(&not_this).await >= 2,
        "a call of an unhedged service was hedged"
    );
}

/// Of 30 calls of `flaky` with a timeout of 100 ms, those that ran into
/// it (any other failure fails the test).
async fn late_calls(client: &Mesh) -> usize {
    let mut late = 0;
    for _ in 0..30 {
        let options = CallOptions::default().timeout(Duration::from_millis(100));
        match client.call_with("flaky", Vec::new(), options).await {
            Ok(_) => {}
            Err(e) if e.code() == commy_mesh::Code::DeadlineExceeded => late += 1,
            Err(e) => panic!("{e}"),
        }
    }
    late
}

/// A client of `dir` whose pools eject by neither rule.
async fn client_off(dir: &Path) -> Mesh {
    let off = [("eject_after", "0"), ("eject_success_percent", "0")];
    client(dir, "30s", &off).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_are_tried_again_on_another_instance() {
    let (dir, instances) = three_instances("resilience-retry").await;
    // Ejection off: every failure of the failing instance is retried.
    let client = client_off(&dir).await;
    reach_all(&client, 3).await;
    instances[1].failing.store(true, Ordering::Relaxed);
    let before = instances[1].calls.load(Ordering::Relaxed);
    for i in 0..300 {
        let options = CallOptions::default().idempotent(true);
        let reply = client.call_with("flaky", Vec::new(), options).await;
        let reply = reply.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_ne!(reply.payload()[0], 1);
    }
    assert!(
        instances[1].calls.load(Ordering::Relaxed) - before > 10,
        "the failing instance was tried"
    );
    // Not marked idempotent: its failures are the caller's.
    let mut failed = 0;
    for _ in 0..300 {
        failed += usize::from(client.call("flaky", Vec::new()).await.is_err());
    }
    assert!(failed > 10, "{failed} failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_a_service_failing_every_call_stay_within_the_budget() {
    let dir = support::private_dir("resilience-budget");
    let down = instance(&dir, 0).await;
    down.failing.store(true, Ordering::Relaxed);
    let client = client(&dir, "30s", &[("idempotent", "flaky")]).await;
    let requests = 2_000u64;
    for _ in 0..requests {
        let status = client.call("flaky", Vec::new()).await.unwrap_err();
        assert_eq!(status.code(), commy_mesh::Code::Unavailable, "{status}");
    }
    // 20 % of the requests, and the floor of 10 a second over the 10 s
    // window (the test takes well under 10 s).
    let attempts = down.calls.load(Ordering::Relaxed);
    let most = requests + requests / 5 + 100 + 64;
    assert!(
        attempts > requests && attempts <= most,
        "{attempts} attempts for {requests} requests (at most {most})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_sends_a_key_to_one_instance_and_round_robin_takes_turns() {
    let (dir, _instances) = three_instances("resilience-strategies").await;
    let hashing = client(&dir, "30s", &[("balance", "flaky=maglev")]).await;
    let other = client(&dir, "30s", &[("balance", "maglev")]).await;
    reach_all(&hashing, 3).await;
    let mut owners = [0usize; 3];
    for key in 0..60u32 {
        let key = format!("user-{key}");
        let options = || CallOptions::default().hash_key(key.clone());
        let first = hashing
            .call_with("flaky", Vec::new(), options())
            .await
            .unwrap();
        for _ in 0..4 {
            let again = hashing
                .call_with("flaky", Vec::new(), options())
                .await
                .unwrap();
            assert_eq!(again.payload(), first.payload(), "key {key}");
        }
        // Another handle (another process, another SDK) agrees.
        let there = other
            .call_with("flaky", Vec::new(), options())
            .await
            .unwrap();
        assert_eq!(
            there.payload(),
            first.payload(),
            "key {key} from another handle"
        );
        owners[first.payload()[0] as usize] += 1;
    }
    assert!(
        owners.iter().all(|&n| n >= 8),
        "keys spread over all: {owners:?}"
    );

    let turns = client(&dir, "30s", &[("balance", "round_robin")]).await;
    reach_all(&turns, 3).await;
    let mut taken = [0usize; 3];
    for _ in 0..300 {
        taken[turns.call("flaky", Vec::new()).await.unwrap()[0] as usize] += 1;
    }
    assert!(taken.iter().all(|&n| (90..=110).contains(&n)), "{taken:?}");
    let bad = support::builder(&dir)
        .setting("balance", "flaky=random")
        .open()
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("unknown strategy"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_max_pending_fail_at_once() {
    let dir = support::private_dir("resilience-pending");
    let server = support::builder(&dir).open().await.unwrap();
    let _slow = server
        .serve("slow", |_req: Request| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, Status>(Response::new(&b"done"[..]))
        })
        .await
        .unwrap();
    let client = support::builder(&dir)
        .setting("max_pending", 2)
        .open()
        .await
        .unwrap();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.call("slow", Vec::new()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let e = client.call("slow", Vec::new()).await.unwrap_err();
    assert_eq!(e.code(), commy_mesh::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("max_pending"), "{e}");
    assert!(t.elapsed() < Duration::from_millis(100), "failed at once");
    for w in waiting {
        assert_eq!(&w.await.unwrap().unwrap()[..], b"done");
    }
    // Their places are free again.
    assert_eq!(&client.call("slow", Vec::new()).await.unwrap()[..], b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_tls_instance_is_ejected_too() {
    let dir = support::private_dir("resilience-tls");
    let certs = support::certificates(&dir);
    let mut servers = Vec::new();
    let mut failing = Vec::new();
    let mut handles = Vec::new();
    for i in 0..3u8 {
        let mesh = support::tls_server(&dir, &format!("server-{i}"), &certs).await;
        let fails = Arc::new(AtomicBool::new(false));
        let f = fails.clone();
        handles.push(
            mesh.serve("flaky", move |_req: Request| {
                let fail = f.load(Ordering::Relaxed);
                async move {
                    if fail {
                        Err(Status::unavailable(format!(
                            "instance {i} fails on purpose"
                        )))
                    } else {
                        Ok(Response::new(vec![i]))
                    }
                }
            })
            .await
            .unwrap(),
        );
        failing.push(fails);
        servers.push(mesh);
    }
    let meshes: Vec<&Mesh> = servers.iter().collect();
    let client = support::tls_client(&dir, "client", &certs, &meshes).await;
    reach_all(&client, 3).await;
    failing[1].store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for _ in 0..300 {
        if let Err(e) = client.call("flaky", Vec::new()).await {
            failures.push(e.to_string());
        }
    }
    // The failures are named: a failure of another kind says what it was.
    assert_eq!(
        failures.len(),
        5,
        "ejected at its fifth failure: {failures:?}, {:?}",
        client.endpoints("flaky")
    );
    let (endpoints, out) = the_one_ejected(&client);
    assert!(out.endpoint.to_string().starts_with("tls://"), "{:?}", out);
    assert!(
        endpoints.iter().all(|e| e.round_trip.is_some()),
        "{endpoints:?}"
    );
}
