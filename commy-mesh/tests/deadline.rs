//! Deadline propagation along a chain of three services: the client calls
//! `a` over shared memory with a deadline; `a`'s handler calls `b` at a
//! TLS peer, whose handler calls `c` over shared memory there, each with
//! no deadline of its own. Every hop inherits the first one's, and `c`'s
//! handler is cancelled when it passes.
#![allow(clippy::disallowed_types)] // plain flags in a test, nothing for loom

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use commy_mesh::service::inherited_deadline;
use commy_mesh::{Code, Request, Response, Status};

mod support;

/// Sets its flag when dropped: `c`'s handler future was cancelled.
struct Dropped(Arc<AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_set_at_the_first_hop_reaches_the_third_and_cancels_it() {
    let dir = support::private_dir("deadline-chain");
    let certs = support::certificates(&dir);

    // At the peer: `b` calls `c`, which waits far longer than the
    // deadline and says what deadline it was given.
    let peer = support::tls_server(&dir, "there", &certs).await;
    let c_cancelled = Arc::new(AtomicBool::new(false));
    let c_left = Arc::new(parking_lot::Mutex::new(None::<Duration>));
    let _c = {
        let (cancelled, left) = (c_cancelled.clone(), c_left.clone());
        peer.serve("c", move |req: Request| {
            *left.lock() = req.deadline().map(|d| d.remaining());
            let guard = Dropped(cancelled.clone());
            async move {
                tokio::time::sleep(Duration::from_secs(20)).await;
                drop(guard);
                Ok::<_, Status>(Response::new(&b"too late"[..]))
            }
        })
        .await
        .unwrap()
    };
    let b_inherited = Arc::new(parking_lot::Mutex::new(None::<Duration>));
    let _b = {
        let (peer2, inherited) = (peer.clone(), b_inherited.clone());
        peer.serve("b", move |_req: Request| {
            let (peer, inherited) = (peer2.clone(), inherited.clone());
            async move {
                *inherited.lock() = inherited_deadline().map(|d| d.remaining());
                peer.call("c", Vec::new()).await.map(Response::new)
            }
        })
        .await
        .unwrap()
    };

    // Here: `a` calls `b` at the peer over TLS.
    let mesh = support::tls_client(&dir, "here", &certs, &[&peer]).await;
    let _a = {
        let mesh2 = mesh.clone();
        mesh.serve("a", move |_req: Request| {
            let mesh = mesh2.clone();
            async move { mesh.call("b", Vec::new()).await.map(Response::new) }
        })
        .await
        .unwrap()
    };
    let here = dir.join("here");
    let client = support::builder(&here).open().await.unwrap();
    let deadline = Duration::from_millis(400);
    let started = Instant::now();
    let e = client
        .call_with(
            "a",
            Vec::new(),
            commy_mesh::CallOptions::default().timeout(deadline),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    let b_left = b_inherited.lock().expect("b inherited a deadline");
    let c_left = c_left.lock().expect("c was given a deadline");
    assert!(
        b_left <= deadline && c_left <= deadline,
        "b {b_left:?}, c {c_left:?}"
    );
    // Not the 30 s default of a call that sets none.
    assert!(c_left > Duration::from_millis(100), "c {c_left:?}");
    let t = Instant::now();
    while !c_cancelled.load(Ordering::SeqCst) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "c's handler was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        started.elapsed() < deadline + Duration::from_secs(2),
        "cancelled {:?} after the first call",
        started.elapsed()
    );
}
