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
    rolling_restart("drain-rolling", Calls::Async).await;
}

/// Callback calls hold no task: a link the pool lets go while one is in
/// flight (its instance drains) is kept until it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_callback_call() {
    rolling_restart("drain-callbacks", Calls::Callback).await;
}

/// Restarts each of three instances of `echo` in turn while four clients
/// make calls of kind `calls` without pause; no call may fail.
async fn rolling_restart(name: &str, calls: Calls) {
    let dir = support::private_dir(name);
    let mut instances = Vec::new();
    for i in 0..3 {
        // One answers at once, the others after a moment.
        instances.push(instance(&dir, Duration::from_millis(i)).await);
    }
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(support::builder(&dir).open().await.unwrap());
    }
    let load = load(clients, calls);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for round in 0..3 {
        let (mesh, handle) = instances.remove(0);
        let before = load.answered();
        assert!(
            handle.shutdown_within(Duration::from_secs(5)).await,
            "round {round}: a client did not answer the GoAway"
        );
        mesh.close().await;
        instances.push(instance(&dir, Duration::from_millis(1)).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            load.answered() > before + 100,
            "round {round}: calls went on"
        );
    }
    load.no_call_failed().await;
}

/// Calls of `echo` made without pause by client tasks, counted.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Load {
    /// Answers so far.
    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients and checks that no call failed.
    async fn no_call_failed(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let answered = self.ok.load(Ordering::Relaxed);
        assert_eq!(
            self.failed.load(Ordering::Relaxed),
            0,
            "{answered} calls answered"
        );
    }
}

/// How the load's clients call.
#[derive(Clone, Copy)]
enum Calls {
    /// `Mesh::call`, awaited.
    Async,
    /// `Mesh::call_then`, its callback's answer awaited (an answer that
    /// never comes fails the call after 10 s).
    Callback,
}

impl Calls {
    async fn call(self, client: &Mesh, msg: &[u8]) -> Result<bytes::Bytes, Status> {
        match self {
            Calls::Async => client.call("echo", msg.to_vec()).await,
            Calls::Callback => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                client.call_then("echo", msg, Default::default(), move |r| {
                    let _ = tx.send(r.map(Response::into_payload));
                });
                match tokio::time::timeout(Duration::from_secs(10), rx).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(_)) => Err(Status::internal("the callback was dropped, never called")),
                    Err(_) => Err(Status::internal("no answer within 10 s")),
                }
            }
        }
    }
}

/// Calls `echo` from each of `clients` in a task of its own until stopped.
fn load(clients: Vec<Mesh>, calls: Calls) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
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
                    match calls.call(&client, &msg).await {
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
    Load {
        stop,
        tasks,
        ok,
        failed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_over_tls_fails_no_call() {
    let dir = support::private_dir("drain-tls");
    let certs = support::certificates(&dir);
    let mut servers = Vec::new();
    for i in 0..3 {
        let mesh = support::tls_server(&dir, &format!("server-{i}"), &certs).await;
        let handle = serve_echo(&mesh).await;
        servers.push((mesh, Some(handle)));
    }
    let meshes: Vec<&Mesh> = servers.iter().map(|(m, _)| m).collect();
    let mut clients = Vec::new();
    for c in 0..4 {
        clients.push(support::tls_client(&dir, &format!("client-{c}"), &certs, &meshes).await);
    }
    let load = load(clients, Calls::Async);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (round, (mesh, handle)) in servers.iter_mut().enumerate() {
        let before = load.answered();
        handle
            .take()
            .unwrap()
            .shutdown_within(Duration::from_secs(5))
            .await;
        *handle = Some(serve_echo(mesh).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            load.answered() > before + 50,
            "round {round}: calls went on"
        );
    }
    load.no_call_failed().await;
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
