//! Balancing between instances over TLS: three servers, each a mesh handle
//! with a runtime dir of its own (so that they are reached over TLS only,
//! on real sockets), listening on 127.0.0.1 with certificates of a dev CA
//! made here; a client that has them as its peers.

use std::time::Duration;

use commy_mesh::{Mesh, Request, Response, Status};

mod support;

/// Three instances of `echo`, the third 5 ms slower than the others: with
/// the peak-EWMA load (the default for TLS peers), the power of two
/// choices sends it under 5 % of 10,000 calls made one after another,
/// where calls in flight (always 0 between sequential calls) would give
/// it a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_tls_instance_gets_few_calls() {
    let dir = support::private_dir("balance-ewma");
    let certs = support::certificates(&dir);
    let mut servers = Vec::new();
    let mut handles = Vec::new();
    for i in 0..3u8 {
        let mesh = support::tls_server(&dir, &format!("server-{i}"), &certs).await;
        handles.push(
            mesh.serve("echo", move |_req: Request| async move {
                if i == 2 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok::<_, Status>(Response::new(vec![i]))
            })
            .await
            .unwrap(),
        );
        servers.push(mesh);
    }
    let servers: Vec<&Mesh> = servers.iter().collect();
    let client = support::tls_client(&dir, "client", &certs, &servers).await;
    // Until every peer has listed its instance, calls go to those known.
    let mut seen = [false; 3];
    for _ in 0..2_000 {
        let reply = client.call("echo", Vec::new()).await.unwrap();
        seen[reply[0] as usize] = true;
        if seen.iter().all(|s| *s) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        seen.iter().all(|s| *s),
        "not every instance was reached: {seen:?}"
    );
    let mut took = [0u32; 3];
    for _ in 0..10_000 {
        let reply = client.call("echo", Vec::new()).await.unwrap();
        took[reply[0] as usize] += 1;
    }
    assert!(took[2] < 500, "the slow instance took {took:?}");
    assert!(
        took[0] > 3_000 && took[1] > 3_000,
        "the fast ones share: {took:?}"
    );
    client.close().await;
    for s in servers {
        s.close().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
