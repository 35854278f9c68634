//! Graceful drain: an instance that shuts down tells its clients to go
//! away, answers what they sent before, and closes; calls made meanwhile
//! go to the other instances. A rolling restart under continuous load
//! fails no call.
#![allow(clippy::disallowed_types)] // plain counters in tests, nothing for loom

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use commy_mesh::{Mesh, Request, Response, ServiceHandle, Status};

mod support;

/// An instance of `echo` on a mesh handle of its own, answering after
/// `delay` (so that calls are in progress when it drains).
async fn instance(dir: &Path, delay: Duration) -> (Mesh, ServiceHandle) {
    let mesh = support::builder(dir).open().await.unwrap();
    let handle = mesh
        .serve("echo", move |req: Request| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, Status>(Response::new(req.into_payload()))
        })
        .await
        .unwrap();
    (mesh, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_call() {
    let dir = support::private_dir("drain-rolling");
    let mut instances = Vec::new();
    for i in 0..3 {
        // One answers at once, the others after a moment.
        instances.push(instance(&dir, Duration::from_millis(i)).await);
    }
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(support::builder(&dir).open().await.unwrap());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, ok, failed) = load(clients, &stop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for round in 0..3 {
        let (mesh, handle) = instances.remove(0);
        let before = ok.load(Ordering::Relaxed);
        assert!(
            handle.shutdown_within(Duration::from_secs(5)).await,
            "round {round}: a client did not answer the GoAway"
        );
        mesh.close().await;
        instances.push(instance(&dir, Duration::from_millis(1)).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            ok.load(Ordering::Relaxed) > before + 100,
            "round {round}: calls went on"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} calls answered",
        ok.load(Ordering::Relaxed)
    );
}

/// Calls `echo` from `n` client tasks until `stop`; counts the answers
/// and the failures.
fn load(
    clients: Vec<Mesh>,
    stop: &Arc<AtomicBool>,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = clients
        .into_iter()
        .enumerate()
        .map(|(c, client)| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let msg = [c as u8, (n % 251) as u8];
                    match client.call("echo", msg.to_vec()).await {
                        Ok(reply) if reply[..] == msg[..] => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(reply) => panic!("client {c}: a wrong answer {reply:?}"),
                        Err(e) => {
                            eprintln!("client {c}: call {n} failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                client.close().await;
            })
        })
        .collect();
    (tasks, ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_over_tls_fails_no_call() {
    let dir = support::private_dir("drain-tls");
    let (ca, cert, key) = support::certificates(&dir);
    let mut servers = Vec::new();
    for i in 0..3 {
        let mut net = commy_mesh::NetConfig::default();
        net.tls_ca = Some(ca.clone());
        net.tls_cert = Some(cert.clone());
        net.tls_key = Some(key.clone());
        let mesh = Mesh::builder()
            .runtime_dir(support::own_runtime_dir(&dir, &format!("server-{i}")))
            .net(net)
            .listen("tls://127.0.0.1:0")
            .open()
            .await
            .unwrap();
        let handle = serve_echo(&mesh).await;
        servers.push((mesh, Some(handle)));
    }
    let mut clients = Vec::new();
    for c in 0..4 {
        let mut net = commy_mesh::NetConfig::default();
        net.tls_ca = Some(ca.clone());
        net.no_listen = true;
        let mut b = Mesh::builder()
            .runtime_dir(support::own_runtime_dir(&dir, &format!("client-{c}")))
            .net(net);
        for (s, _) in &servers {
            b = b.peer(&format!(
                "tls://127.0.0.1:{}",
                s.tls_endpoint().unwrap().port()
            ));
        }
        clients.push(b.open().await.unwrap());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, ok, failed) = load(clients, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (round, (mesh, handle)) in servers.iter_mut().enumerate() {
        let before = ok.load(Ordering::Relaxed);
        handle
            .take()
            .unwrap()
            .shutdown_within(Duration::from_secs(5))
            .await;
        *handle = Some(serve_echo(mesh).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            ok.load(Ordering::Relaxed) > before + 50,
            "round {round}: calls went on"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} calls answered",
        ok.load(Ordering::Relaxed)
    );
}

async fn serve_echo(mesh: &Mesh) -> ServiceHandle {
    mesh.serve("echo", |req: Request| async move {
        Ok::<_, Status>(Response::new(req.into_payload()))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_answers_the_drain_at_once() {
    let dir = support::private_dir("drain-idle");
    let (mesh, handle) = instance(&dir, Duration::ZERO).await;
    let client = support::builder(&dir).open().await.unwrap();
    assert_eq!(&client.call("echo", &b"x"[..]).await.unwrap()[..], b"x");
    // The client has a link and makes no call: it learns of the drain
    // from discovery and answers, so the instance stops well before its
    // grace.
    let t = std::time::Instant::now();
    assert!(handle.shutdown_within(Duration::from_secs(10)).await);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    mesh.close().await;
    let e = client.call("echo", &b"x"[..]).await.unwrap_err();
    assert_eq!(e.code(), commy_mesh::Code::NotFound, "{e}");
}
