//! The serve dispatch, the same on both transports: one test holds a
//! service's only concurrency permit with a waiting handler and calls a
//! handler that answers at once, over shared memory and over TLS. Another
//! checks that a serve policy stands before requests an embedder polls out
//! of a driven link too (the conformance suite covers the handlers).

#![allow(clippy::disallowed_types)] // plain counters in a test, nothing for loom

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use commy_mesh::policy::{RequestHead, ServePolicy};
use commy_mesh::{CallOptions, Caller, Mesh, Metadata, Request, Response, Status};

fn private_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("commy-dispatch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// Both transports serve a request through the same dispatch: a handler
/// that answers at once takes no concurrency permit, one that waits holds
/// one. With the only permit held by a waiting handler, a call whose
/// handler answers at once is still answered, over shared memory and over
/// TLS alike (TLS used to take a permit before calling any handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permit_rule_is_the_same_on_both_transports() {
    let dir = private_dir("permit-rule");
    // A CA of the test's own, and a certificate for the server.
    let ca_dir = dir.join("ca");
    commy_net::DevCa::create(&ca_dir).unwrap();
    let ca = commy_net::DevCa::load(&ca_dir).unwrap();
    let id = commy_net::Identity::new("default", "permit-rule").unwrap();
    let (cert, key) = ca
        .issue(&commy_net::LeafSpec::for_this_host(id, &[]))
        .unwrap();
    commy_net::tls::write_pem_file(&dir.join("server.pem"), &cert).unwrap();
    commy_net::tls::write_pem_file(&dir.join("server.key"), &key).unwrap();
    let own = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    };
    let mut net = commy_mesh::NetConfig::default();
    net.tls_ca = Some(ca_dir.join("ca.pem"));
    net.tls_cert = Some(dir.join("server.pem"));
    net.tls_key = Some(dir.join("server.key"));
    let server = Mesh::builder()
        .runtime_dir(own("server"))
        .net(net)
        .listen("tls://127.0.0.1:0")
        .max_concurrency(1)
        .open()
        .await
        .unwrap();
    // `hold` waits (holding the only permit) until released; `quick`
    // answers at once.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let holding = Arc::new(tokio::sync::Notify::new());
    let _hold = {
        let (release, holding) = (release.clone(), holding.clone());
        server
            .serve("hold", move |_req: Request| {
                let (release, holding) = (release.clone(), holding.clone());
                async move {
                    tokio::task::yield_now().await;
                    holding.notify_one();
                    release.acquire().await.unwrap().forget();
                    Ok::<_, Status>(Response::new(&b"held"[..]))
                }
            })
            .await
            .unwrap()
    };
    let _quick = server
        .serve("quick", |req: Request| async move {
            Ok::<_, Status>(Response::new(req.into_payload()))
        })
        .await
        .unwrap();
    let port = server.tls_endpoint().unwrap().port();
    let over_shm = Mesh::builder()
        .runtime_dir(dir.join("server"))
        .transport(commy_mesh::TransportPreference::Shm)
        .open()
        .await
        .unwrap();
    let mut client_net = commy_mesh::NetConfig::default();
    client_net.tls_ca = Some(ca_dir.join("ca.pem"));
    client_net.no_listen = true;
    let over_tls = Mesh::builder()
        .runtime_dir(own("client"))
        .net(client_net)
        .peer(&format!("tls://127.0.0.1:{port}"))
        .transport(commy_mesh::TransportPreference::Tls)
        .open()
        .await
        .unwrap();
    for (transport, client) in [("shared memory", &over_shm), ("TLS", &over_tls)] {
        let held = {
            let client = client.clone();
            tokio::spawn(async move { client.call("hold", Vec::new()).await })
        };
        if tokio::time::timeout(Duration::from_secs(10), holding.notified())
            .await
            .is_err()
        {
            let outcome = held.await;
            panic!("{transport}: the holding handler never ran: {outcome:?}");
        }
        let quick = client
            .call_with(
                "quick",
                b"now".to_vec(),
                CallOptions::default().timeout(Duration::from_secs(5)),
            )
            .await;
        assert_eq!(
            quick.map(|r| r.into_payload()).as_deref().ok(),
            Some(&b"now"[..]),
            "{transport}: a handler that answers at once waited for a permit"
        );
        release.add_permits(1);
        assert_eq!(&held.await.unwrap().unwrap()[..], b"held", "{transport}");
    }
    over_tls.close().await;
    over_shm.close().await;
    server.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Admits requests with the header `pass`.
struct NeedsPass;

impl ServePolicy for NeedsPass {
    fn admit(&self, _caller: &Caller, head: &RequestHead<'_>) -> Result<(), Status> {
        match head.metadata.header("pass") {
            Some(_) => Ok(()),
            None => Err(Status::permission_denied("no pass")),
        }
    }
}

/// Requests taken out of a driven link by `poll_requests` (the Node
/// binding's path) pass the serve policy first: a refused one is answered
/// with the refusal and never reaches the poller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_policy_stands_before_polled_requests() {
    use commy_mesh::embed::{Drive, DrivenLink, PolledRequest};
    let dir = private_dir("polled-policy");
    let server = Mesh::builder()
        .runtime_dir(&dir)
        .serve_policy(|_| Some(Arc::new(NeedsPass) as Arc<dyn ServePolicy>))
        .open()
        .await
        .unwrap();
    let (links_tx, links_rx) = std::sync::mpsc::channel::<DrivenLink>();
    let _service = server
        .serve_driven(
            "polled",
            |_req: Request, responder| {
                responder.respond(Ok(Response::new(&b"handler"[..])));
            },
            move |link| links_tx.send(link).unwrap(),
        )
        .await
        .unwrap();
    let polled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = {
        let (polled, stop) = (polled.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut links: Vec<DrivenLink> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                links.extend(links_rx.try_iter());
                let mut taken = Vec::new();
                links.retain_mut(|l| {
                    l.poll_requests(16, |req, _payload| taken.push(req)) != Drive::Closed
                });
                polled.fetch_add(taken.len(), std::sync::atomic::Ordering::SeqCst);
                PolledRequest::answer_all(taken.into_iter().map(|r| (r, Ok(&b"polled"[..]))));
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let client = Mesh::builder().runtime_dir(&dir).open().await.unwrap();
    let refused = client.call("polled", Vec::new()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        commy_mesh::Code::PermissionDenied,
        "{refused}"
    );
    assert_eq!(refused.message(), "no pass");
    let mut pass = Metadata::default();
    pass.add_header("pass", b"yes".to_vec());
    let options = CallOptions::default().metadata(pass);
    let admitted = client
        .call_with("polled", Vec::new(), options)
        .await
        .unwrap();
    assert_eq!(&admitted.payload()[..], b"polled");
    assert_eq!(polled.load(std::sync::atomic::Ordering::SeqCst), 1);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    driver.join().unwrap();
    client.close().await;
    server.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
