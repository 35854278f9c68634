//! The binding-author API with real links: services driven from an
//! embedder's thread, requests polled out of a link, answer drivers and
//! token calls (what commy-ffi and the Node binding are built on).
#![allow(clippy::disallowed_types)] // plain counters in tests, nothing for loom

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use commy_mesh::{CallOptions, Code, Mesh, Request, Response, Status};

mod support;
use support::{open, open_bounded, private_dir, serve_test_services};

fn role() -> Option<String> {
    std::env::var("COMMY_MESH_TEST_ROLE").ok()
}

/// A driven service's links are received from by the embedder's thread:
/// requests are handled there (also many in flight, and after the handler
/// answers from another thread), a cancelled call runs the responder's hook,
/// a client that leaves closes its link, and a link the embedder drops
/// leaves its callers with Unavailable until they connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driven_service_runs_on_the_embedders_thread() {
    if role().is_some() {
        return;
    }
    use commy_mesh::embed::{Drive, DrivenLink};
    let dir = private_dir("driven");
    let server = open(&dir).await;
    let (links_tx, links_rx) = std::sync::mpsc::channel::<DrivenLink>();
    let cancelled = Arc::new(AtomicUsize::new(0));
    let c = cancelled.clone();
    let _h = server
        .serve_driven(
            "driven",
            move |req: Request, responder| {
                let here = std::thread::current().name().unwrap_or("").to_owned();
                match &req.payload()[..] {
                    // Answered later, from another thread, unless cancelled.
                    b"later" => {
                        let c = c.clone();
                        responder.on_cancel(move || {
                            c.fetch_add(1, Ordering::SeqCst);
                        });
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(300));
                            responder.respond(Ok(Response::new(&b"late"[..])));
                        });
                    }
                    p => {
                        let mut answer = here.into_bytes();
                        answer.push(b':');
                        answer.extend_from_slice(p);
                        responder.respond(Ok(Response::new(answer)));
                    }
                }
            },
            move |link| links_tx.send(link).unwrap(),
        )
        .await
        .unwrap();
    // The embedder's thread: polls its links, waiting on one while idle.
    let stop = Arc::new(AtomicBool::new(false));
    let drop_links = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let driver = {
        let (stop, drop_links, closed) = (stop.clone(), drop_links.clone(), closed.clone());
        std::thread::Builder::new()
            .name("driver".into())
            .spawn(move || {
                let mut links: Vec<DrivenLink> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    links.extend(links_rx.try_iter());
                    if drop_links.swap(false, Ordering::SeqCst) {
                        links.clear();
                    }
                    let mut idle = true;
                    links.retain_mut(|l| match l.poll(16) {
                        Drive::Closed => {
                            closed.fetch_add(1, Ordering::SeqCst);
                            false
                        }
                        Drive::More => {
                            idle = false;
                            true
                        }
                        Drive::Empty => true,
                    });
                    if idle {
                        match links.first_mut() {
                            Some(l) => {
                                l.wait(Some(Instant::now() + Duration::from_millis(5)));
                            }
                            None => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                }
            })
            .unwrap()
    };
    let client = open(&dir).await;
    assert_eq!(
        &client.call("driven", &b"hi"[..]).await.unwrap()[..],
        b"driver:hi"
    );
    // Many in flight, each with its own answer.
    let calls = (0..200u32).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let p = i.to_le_bytes().to_vec();
            let r = client.call("driven", p.clone()).await.unwrap();
            assert_eq!(&r[..7], b"driver:");
            assert_eq!(&r[7..], &p[..]);
        })
    });
    for c in calls.collect::<Vec<_>>() {
        c.await.unwrap();
    }
    // Answered from another thread.
    assert_eq!(
        &client.call("driven", &b"later"[..]).await.unwrap()[..],
        b"late"
    );
    // A caller that gives up cancels: the hook runs on the driver's thread.
    let e = client
        .call_with(
            "driven",
            &b"later"[..],
            CallOptions::default().timeout(Duration::from_millis(50)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    let t = Instant::now();
    while cancelled.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cancelled.load(Ordering::SeqCst), 1);
    // The embedder drops its links: callers see the instance gone, then
    // connect again.
    drop_links.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let mut unavailable = false;
    loop {
        match client.call("driven", &b"again"[..]).await {
            Ok(r) if unavailable => {
                assert_eq!(&r[..], b"driver:again");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e}");
                unavailable = true;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no reconnection");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A client that leaves closes its link.
    client.close().await;
    drop(client);
    let t = Instant::now();
    while closed.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(closed.load(Ordering::SeqCst) >= 1);
    stop.store(true, Ordering::SeqCst);
    driver.join().unwrap();
    server.close().await;
}

/// Requests polled out of a driven link with `poll_requests` are answered
/// by the poller, from any thread, one at a time or many at once: with a
/// payload, with an error, or `Internal` when dropped unanswered. Each holds
/// a concurrency permit until answered or given up by its caller (a
/// request past the bound goes to the service's handler once a permit is
/// free), and closing the service waits for the ones still held, not for
/// those whose callers gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_polled_from_a_driven_link_are_answered_by_the_poller() {
    if role().is_some() {
        return;
    }
    use commy_mesh::embed::{Drive, DrivenLink, PolledRequest};
    const BOUND: usize = 4;
    let dir = private_dir("polled");
    let server = open_bounded(&dir, BOUND).await;
    let (links_tx, links_rx) = std::sync::mpsc::channel::<DrivenLink>();
    let handle = server
        .serve_driven(
            "polled",
            |req: Request, responder| {
                let mut answer = b"handler:".to_vec();
                answer.extend_from_slice(req.payload());
                responder.respond(Ok(Response::new(answer)));
            },
            move |link| links_tx.send(link).unwrap(),
        )
        .await
        .unwrap();
    // Requests whose payload starts with "hold" wait here for the test.
    type Held = Vec<(PolledRequest, Vec<u8>)>;
    let held = Arc::new(std::sync::Mutex::new(Held::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (stop, held) = (stop.clone(), held.clone());
        std::thread::spawn(move || {
            let mut links: Vec<DrivenLink> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                links.extend(links_rx.try_iter());
                let mut now = Vec::new();
                links.retain_mut(|l| {
                    l.poll_requests(16, |req, payload| now.push((req, payload.to_vec())))
                        != Drive::Closed
                });
                let mut answers = Vec::new();
                let mut answered = Vec::new();
                for (req, payload) in now {
                    if payload.starts_with(b"hold") {
                        held.lock().unwrap().push((req, payload));
                    } else if payload == b"fail" {
                        answers.push((req, Err(Status::not_found("no such thing"))));
                    } else if payload == b"drop" {
                        drop(req);
                    } else {
                        let mut a = b"polled:".to_vec();
                        a.extend_from_slice(&payload);
                        answered.push((req, a));
                    }
                }
                let (reqs, bodies): (Vec<_>, Vec<_>) = answered.into_iter().unzip();
                PolledRequest::answer_all(
                    reqs.into_iter().zip(&bodies).map(|(r, b)| (r, Ok(&b[..]))),
                );
                PolledRequest::answer_all(answers);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let client = open(&dir).await;
    // Many in flight, each with its own answer.
    let calls: Vec<_> = (0..100u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let p = i.to_le_bytes().to_vec();
                let r = client.call("polled", p.clone()).await.unwrap();
                (r, p)
            })
        })
        .collect();
    for c in calls {
        let (r, p) = c.await.unwrap();
        let (prefix, rest) = r.split_at(r.len() - 4);
        assert!(prefix == b"polled:" || prefix == b"handler:", "{r:?}");
        assert_eq!(rest, &p[..]);
    }
    let e = client.call("polled", &b"fail"[..]).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, "no such thing"));
    let e = client.call("polled", &b"drop"[..]).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(e.message().contains("dropped unanswered"), "{e}");
    // Every permit held by a polled request: the next request waits for
    // one, then goes to the handler.
    let holds: Vec<_> = (0..BOUND)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.call("polled", format!("hold {i}")).await })
        })
        .collect();
    let t = Instant::now();
    while held.lock().unwrap().len() < BOUND {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the holds never came"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let past = {
        let client = client.clone();
        tokio::spawn(async move { client.call("polled", &b"past"[..]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!past.is_finished(), "a request past the bound did not wait");
    // Answered from this thread: the permits come back.
    let (first, _) = held.lock().unwrap().remove(0);
    first.answer(Ok(b"held 0"));
    assert_eq!(&past.await.unwrap().unwrap()[..], b"handler:past");
    // The server gives `past`'s permit back just after it answered: a
    // request sent before that would wait for it and go to the handler.
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A held request whose caller gives up gives its permit back.
    let e = client
        .call_with(
            "polled",
            &b"hold late"[..],
            CallOptions::default().timeout(Duration::from_millis(50)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert_eq!(held.lock().unwrap().len(), BOUND);
    let t = Instant::now();
    loop {
        let r = client
            .call_with(
                "polled",
                &b"again"[..],
                CallOptions::default().timeout(Duration::from_millis(200)),
            )
            .await;
        match r {
            Ok(r) => {
                assert_eq!(&r.payload()[..], b"polled:again");
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::DeadlineExceeded, "{e}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the permit never came back"
        );
    }
    // Closing the service waits for the requests still held, but not for
    // the one given up.
    let closing = tokio::spawn(async move { handle.shutdown().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !closing.is_finished(),
        "closing did not wait for held requests"
    );
    let (late, rest): (Held, Held) = held
        .lock()
        .unwrap()
        .drain(..)
        .partition(|(_, p)| p == b"hold late");
    let texts: Vec<_> = (1..BOUND).map(|i| format!("held {i}")).collect();
    PolledRequest::answer_all(
        rest.into_iter()
            .zip(&texts)
            .map(|((r, _), t)| (r, Ok(t.as_bytes()))),
    );
    tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .expect("closing never finished")
        .unwrap();
    // Its answer, given now, goes nowhere.
    for (r, _) in late {
        r.answer(Ok(b"too late"));
    }
    // Each held request got one of the answers (in whatever order they came).
    let mut got = Vec::new();
    for h in holds {
        got.push(String::from_utf8(h.await.unwrap().unwrap().to_vec()).unwrap());
    }
    got.sort();
    let want: Vec<_> = (0..BOUND).map(|i| format!("held {i}")).collect();
    assert_eq!(got, want);
    stop.store(true, Ordering::SeqCst);
    driver.join().unwrap();
    client.close().await;
    server.close().await;
}

/// What the answer driver's test records of each callback call.
type Answered = std::sync::Mutex<Vec<(String, Result<Vec<u8>, Code>)>>;

/// Makes `n` callback calls of `service` at once, each recording its result
/// and the thread its callback ran on into `into`.
fn call_many(
    mesh: &Mesh,
    service: &str,
    n: usize,
    timeout: Option<Duration>,
    into: &Arc<Answered>,
) {
    for i in 0..n {
        let into = into.clone();
        let mut options = CallOptions::default();
        options.timeout = timeout;
        mesh.call_then(service, format!("call {i}"), options, move |r| {
            let here = std::thread::current().name().unwrap_or("").to_owned();
            let r = r
                .map(|resp| resp.into_payload().to_vec())
                .map_err(|s| s.code());
            into.lock().unwrap().push((here, r));
        });
    }
}

/// A server with the test services, `lagging` (answers after 20 ms: calls
/// made meanwhile are in flight together) and `never` (a deferred handler
/// that holds its request until the caller gives up).
async fn serve_late_answers(dir: &Path) -> (Mesh, Vec<commy_mesh::ServiceHandle>) {
    let server = open(dir).await;
    let mut services = serve_test_services(&server).await;
    let lagging = server
        .serve("lagging", |req: Request| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, Status>(Response::new(req.into_payload()))
        })
        .await
        .unwrap();
    let never = server
        .serve_deferred("never", |_req: Request, responder| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                drop(responder);
            });
        })
        .await
        .unwrap();
    services.extend([lagging, never]);
    (server, services)
}

/// A client of [`serve_late_answers`]' services with its links open: a
/// callback call on a service not reached yet would run as a task.
async fn connected_to_late_answers(dir: &Path) -> Mesh {
    let client = open(dir).await;
    client.call("lagging", &b"warm"[..]).await.unwrap();
    client
        .call_with(
            "never",
            &b""[..],
            CallOptions::default().timeout(Duration::from_millis(1)),
        )
        .await
        .unwrap_err();
    client
}

/// Polls `answers` on this thread until `into` holds `n` results (or 10 s
/// pass).
fn poll_until(answers: &mut commy_mesh::embed::AnswerDriver, into: &Answered, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while into.lock().unwrap().len() < n {
        assert!(
            Instant::now() < end,
            "only {} of {n} calls answered",
            into.lock().unwrap().len()
        );
        if !answers.poll(64) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// An answer driver receives the answers to callback calls made while others
/// are in flight (a lone call is left to the link's reader) on its own
/// thread; a driver that stops polling still gets every answer (the links'
/// readers take over after a while); deadlines are kept while the driver
/// has the link; a dropped driver gives the links back; a handle has one
/// driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_driver_receives_on_its_own_thread() {
    if role().is_some() {
        return;
    }
    let dir = private_dir("answers");
    let (server, _services) = serve_late_answers(&dir).await;
    let client = connected_to_late_answers(&dir).await;
    let mut answers = client.drive_answers().unwrap();
    assert_eq!(
        client.drive_answers().unwrap_err().code(),
        Code::FailedPrecondition
    );
    let c = client.clone();
    std::thread::Builder::new()
        .name("answers".into())
        .spawn(move || {
            let client = c;
            // Many in flight, as an event loop keeps them: each poll's
            // answers make room for new calls. The driver receives them
            // here.
            let got = Arc::new(Answered::default());
            let (total, window) = (20_000, 64);
            let mut issued = 0;
            let end = Instant::now() + Duration::from_secs(30);
            while got.lock().unwrap().len() < total {
                assert!(
                    Instant::now() < end,
                    "calls in flight were not all answered"
                );
                let room = window - (issued - got.lock().unwrap().len());
                let n = room.min(total - issued);
                call_many(&client, "echo", n, None, &got);
                issued += n;
                answers.poll(64);
            }
            let got = std::mem::take(&mut *got.lock().unwrap());
            assert!(got.iter().all(|(_, r)| r.is_ok()));
            let here = got.iter().filter(|(t, _)| t == "answers").count();
            assert!(
                here >= total / 10,
                "only {here} of {total} answers were received by the driver"
            );
            eprintln!("{here} of {total} answers received by the driver");

            // The driver stops polling: the reader delivers after a while.
            let got = Arc::new(Answered::default());
            call_many(&client, "lagging", 64, None, &got);
            let end = Instant::now() + Duration::from_secs(10);
            while got.lock().unwrap().len() < 64 {
                assert!(
                    Instant::now() < end,
                    "a driver that does not poll holds answers back"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                got.lock()
                    .unwrap()
                    .iter()
                    .all(|(t, r)| t != "answers" && r.is_ok())
            );

            // A deadline passes while the driver has the link: calls keep
            // coming back meanwhile, so it is not given back.
            let never = Arc::new(Answered::default());
            let t = Instant::now();
            call_many(&client, "echo", 1, None, &never);
            call_many(&client, "never", 1, Some(Duration::from_millis(50)), &never);
            let got = Arc::new(Answered::default());
            let mut issued = 0;
            while never.lock().unwrap().len() < 2 {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "the deadline was not kept"
                );
                let room = 64 - (issued - got.lock().unwrap().len());
                call_many(&client, "echo", room, None, &got);
                issued += room;
                answers.poll(64);
            }
            let waited = t.elapsed();
            assert!(
                waited >= Duration::from_millis(50),
                "failed before its deadline: {waited:?}"
            );
            assert!(
                waited < Duration::from_secs(1),
                "the deadline was kept late: {waited:?}"
            );
            let failed: Vec<_> = never
                .lock()
                .unwrap()
                .iter()
                .filter_map(|(_, r)| r.clone().err())
                .collect();
            assert_eq!(failed, vec![Code::DeadlineExceeded]);
            poll_until(&mut answers, &got, issued);

            // Dropped, the driver gives its links back.
            drop(answers);
            let got = Arc::new(Answered::default());
            call_many(&client, "lagging", 32, None, &got);
            let end = Instant::now() + Duration::from_secs(10);
            while got.lock().unwrap().len() < 32 {
                assert!(Instant::now() < end, "a dropped driver holds answers back");
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                got.lock()
                    .unwrap()
                    .iter()
                    .all(|(t, r)| t != "answers" && r.is_ok())
            );
        })
        .unwrap()
        .join()
        .unwrap();
    client.close().await;
    server.close().await;
}

/// What an [`commy_mesh::embed::AnswerSink`] received: the token, the thread it
/// ran on and the result.
#[derive(Default)]
struct Sunk(std::sync::Mutex<Vec<SunkAnswer>>);

type SunkAnswer = (u64, String, Result<Vec<u8>, Code>);

impl commy_mesh::embed::AnswerSink for Sunk {
    fn answer(&self, token: u64, result: Result<Response, Status>) {
        let here = std::thread::current().name().unwrap_or("").to_owned();
        let r = result
            .map(|resp| resp.into_payload().to_vec())
            .map_err(|s| s.code());
        self.0.lock().unwrap().push((token, here, r));
    }
}

/// Token calls: a handle without an answer sink refuses them; with one, an
/// answer polled with `poll_with` reaches its callback with the payload read
/// in place, and every other outcome (an answer read by the link's reader or
/// taken by a plain `poll`, a deadline passed, a service nobody serves)
/// reaches the sink, each token exactly once. A driver holding its link
/// (`set_hold`) takes answers that come late itself; one without hands the
/// link back and the reader delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_calls_reach_the_poll_callback_or_the_sink() {
    if role().is_some() {
        return;
    }
    let dir = private_dir("tokens");
    let (server, _services) = serve_late_answers(&dir).await;
    let client = connected_to_late_answers(&dir).await;
    // No sink yet.
    let refused = client
        .call_token("echo", &b"x"[..], CallOptions::default(), 1)
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let sink = Arc::new(Sunk::default());
    let mut answers = client.drive_answers_with(sink.clone()).unwrap();
    let c = client.clone();
    std::thread::Builder::new()
        .name("answers".into())
        .spawn(move || {
            let client = c;
            let call = |service: &str, token: u64, timeout: Option<Duration>| {
                let mut options = CallOptions::default();
                options.timeout = timeout;
                client
                    .call_token(service, format!("call {token}"), options, token)
                    .unwrap();
            };
            let take = |sink: &Sunk| std::mem::take(&mut *sink.0.lock().unwrap());

            // Many in flight: each token is answered once, with its own
            // payload, most of them through the callback.
            let mut local: Vec<(u64, Result<Vec<u8>, Code>)> = Vec::new();
            let (total, window) = (5_000u64, 64u64);
            let mut issued = 0u64;
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let done = local.len() as u64 + sink.0.lock().unwrap().len() as u64;
                if done == total {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "only {done} of {total} token calls answered"
                );
                while issued < total && issued - done < window {
                    call("echo", issued, None);
                    issued += 1;
                }
                answers.poll_with(64, |token, r| {
                    local.push((token, r.map(<[u8]>::to_vec).map_err(|s| s.code())));
                });
            }
            let mut all: Vec<_> = take(&sink).into_iter().map(|(t, _, r)| (t, r)).collect();
            let here = local.len();
            all.extend(local);
            all.sort_by_key(|(t, _)| *t);
            assert_eq!(all.len() as u64, total);
            for (i, (token, r)) in all.iter().enumerate() {
                assert_eq!(*token, i as u64, "a token answered twice or never");
                assert_eq!(r.as_deref(), Ok(format!("call {token}").as_bytes()));
            }
            assert!(
                here as u64 >= total / 10,
                "only {here} of {total} answers reached the poll callback"
            );

            // A plain poll hands token answers to the sink, on this thread.
            let (total, mut issued) = (2_000u64, 0u64);
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let done = sink.0.lock().unwrap().len() as u64;
                if done == total {
                    break;
                }
                assert!(Instant::now() < end, "plain polls lost token answers");
                while issued < total && issued - done < window {
                    call("echo", 10_000 + issued, None);
                    issued += 1;
                }
                answers.poll(64);
            }
            let got = take(&sink);
            assert!(
                got.iter()
                    .all(|(t, _, r)| r.as_deref() == Ok(format!("call {t}").as_bytes()))
            );
            let here = got.iter().filter(|(_, here, _)| here == "answers").count();
            assert!(
                here as u64 >= total / 10,
                "only {here} of {total} answers were taken by plain polls"
            );

            // Many calls made at once with `call_tokens`: each answered
            // once with its own payload; those of a service nobody serves
            // fail one by one.
            let payloads: Vec<Vec<u8>> = (0..300u64)
                .map(|t| {
                    let mut p = format!("call {}", 60_000 + t).into_bytes();
                    p.resize(p.len() + (t as usize % 7) * 300, b'.');
                    p
                })
                .collect();
            client
                .call_tokens(
                    "echo",
                    CallOptions::default(),
                    payloads.iter().zip(60_000..).map(|(p, t)| (&p[..], t)),
                )
                .unwrap();
            let mut nobody = CallOptions::default();
            nobody.timeout = Some(Duration::from_millis(50));
            client
                .call_tokens("nobody", nobody, [(&b"a"[..], 70_000), (&b"b"[..], 70_001)])
                .unwrap();
            let mut got: Vec<(u64, Result<Vec<u8>, Code>)> = Vec::new();
            let end = Instant::now() + Duration::from_secs(10);
            while got.len() < payloads.len() + 2 {
                assert!(Instant::now() < end, "batched token calls were lost");
                answers.poll_with(64, |token, r| {
                    got.push((token, r.map(<[u8]>::to_vec).map_err(|s| s.code())));
                });
                got.extend(take(&sink).into_iter().map(|(t, _, r)| (t, r)));
            }
            got.sort_by_key(|(t, _)| *t);
            for ((t, r), p) in got.iter().zip(&payloads) {
                assert_eq!(r.as_deref(), Ok(&p[..]), "token {t}");
            }
            let tokens: Vec<_> = got.iter().map(|(t, _)| *t).collect();
            let want: Vec<_> = (60_000..60_300).chain([70_000, 70_001]).collect();
            assert_eq!(tokens, want, "a batched token answered twice or never");
            assert!(got[300..].iter().all(|(_, r)| r.is_err()));

            // Failures reach the sink: a deadline that passes while the
            // driver has the link, a service nobody serves.
            call("never", 20_000, Some(Duration::from_millis(50)));
            call("nobody", 20_001, Some(Duration::from_millis(50)));
            let mut issued = 0;
            let mut answered = 0;
            let end = Instant::now() + Duration::from_secs(10);
            let failures = |sink: &Sunk| {
                let got = sink.0.lock().unwrap();
                got.iter()
                    .filter(|(t, _, _)| (20_000..30_000).contains(t))
                    .count()
            };
            while failures(&sink) < 2 {
                assert!(
                    Instant::now() < end,
                    "failed token calls never reached the sink"
                );
                while issued - answered < 16 {
                    call("echo", 30_000 + issued, None);
                    issued += 1;
                }
                answers.poll_with(64, |_, r| {
                    assert!(r.is_ok());
                    answered += 1;
                });
            }
            let mut failed = Vec::new();
            loop {
                for (t, _, r) in take(&sink) {
                    if t >= 30_000 {
                        answered += 1;
                    } else {
                        failed.push((t, r.map(drop)));
                    }
                }
                if answered == issued {
                    break;
                }
                assert!(Instant::now() < end, "echo calls were lost");
                answers.poll_with(64, |_, _| answered += 1);
            }
            failed.sort_by_key(|(t, _)| *t);
            assert_eq!(failed.len(), 2);
            assert_eq!(failed[0], (20_000, Err(Code::DeadlineExceeded)));
            assert_eq!(failed[1].0, 20_001);
            assert!(
                failed[1].1.is_err(),
                "a call of a service nobody serves succeeded"
            );

            // Late answers (20 ms): a driver holding its link takes them
            // itself; this thread being held up longer than 2 ms lets the
            // reader take over, so up to three tries.
            answers.set_hold(Duration::from_millis(500));
            let mut tries = 0;
            loop {
                tries += 1;
                for t in 0..8 {
                    call("lagging", 40_000 + t, None);
                }
                let (mut local, mut sunk) = (0, 0);
                let end = Instant::now() + Duration::from_secs(10);
                while local + sunk < 8 {
                    sunk += take(&sink).len();
                    assert!(Instant::now() < end, "late answers were lost");
                    answers.poll_with(64, |_, r| {
                        assert!(r.is_ok());
                        local += 1;
                    });
                    std::thread::sleep(Duration::from_micros(100));
                }
                if local == 8 {
                    break;
                }
                assert!(
                    tries < 3,
                    "a holding driver left late answers to the reader"
                );
            }
            // Without a hold, the link goes back to its reader after two
            // empty polls, and the reader delivers.
            answers.set_hold(Duration::ZERO);
            for t in 0..8 {
                call("lagging", 50_000 + t, None);
            }
            let mut local = 0;
            let end = Instant::now() + Duration::from_secs(10);
            while sink.0.lock().unwrap().len() + local < 8 {
                assert!(Instant::now() < end, "late answers were lost");
                answers.poll_with(64, |_, _| local += 1);
                std::thread::sleep(Duration::from_micros(100));
            }
            let got = take(&sink);
            assert_eq!(local, 0, "a driver without a hold kept a quiet link");
            assert!(
                got.iter()
                    .all(|(_, here, r)| here != "answers" && r.is_ok())
            );
        })
        .unwrap()
        .join()
        .unwrap();
    client.close().await;
    server.close().await;
}
