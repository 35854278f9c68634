//! commy-ffi against real meshes: handlers answering late or never, the
//! caller giving up, subscriptions closed while waiting, regions through a
//! duplicated descriptor, and the bridges under load.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_ffi::{FfiError, FfiMesh, MeshOptions, OpenPolicy, RegionOptions, block_on, spawn_with};

const LONG: Duration = Duration::from_secs(30);

fn runtime_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("commy-ffi-it-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn open(test: &str) -> FfiMesh {
    let mut options = MeshOptions::default();
    options
        .settings
        .set("runtime_dir", runtime_dir(test).to_str().unwrap());
    FfiMesh::open(options).unwrap()
}

fn wait<T>(fut: impl std::future::Future<Output = T>) -> T {
    block_on(fut, || Ok::<(), ()>(())).unwrap()
}

#[test]
fn a_reply_can_come_later_from_another_thread_and_only_once() {
    let mesh = open("late");
    let (stash_tx, stash_rx) = mpsc::channel();
    let stash_tx = std::sync::Mutex::new(stash_tx);
    let _svc = mesh
        .serve("later", move |req, reply| {
            let _ = stash_tx.lock().unwrap().send((req, reply));
        })
        .unwrap();
    let answerer = std::thread::spawn(move || {
        let (req, reply) = stash_rx.recv_timeout(LONG).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!reply.is_answered());
        let first = reply.ok(Bytes::from(format!("got {}", req.payload().len())));
        let second = reply.clone().ok(Bytes::from_static(b"again"));
        (first, second, reply.is_answered())
    });
    let got = wait(mesh.call("later", Bytes::from_static(b"four"), Some(LONG))).unwrap();
    assert_eq!(&got[..], b"got 4");
    assert_eq!(answerer.join().unwrap(), (true, false, true));
}

#[test]
fn errors_keep_their_code_and_an_unanswered_reply_is_internal() {
    let mesh = open("errors");
    let _denied = mesh
        .serve("denied", |_req, reply| {
            reply.error(FfiError::from_code_name("PERMISSION_DENIED", "not yours"));
        })
        .unwrap();
    let _dropped = mesh.serve("dropped", |_req, _reply| {}).unwrap();
    let e = wait(mesh.call("denied", Bytes::new(), Some(LONG))).unwrap_err();
    assert_eq!(
        (e.code_name(), e.message()),
        ("PERMISSION_DENIED", "not yours")
    );
    let e = wait(mesh.call("dropped", Bytes::new(), Some(LONG))).unwrap_err();
    assert_eq!(e.code_name(), "INTERNAL");
    assert!(e.message().contains("without answering"), "{e}");

    let e = wait(mesh.call("bad name!", Bytes::new(), None)).unwrap_err();
    assert_eq!(e.code_name(), "INVALID_ARGUMENT");
    assert!(e.message().contains("bad name!"), "{e}");
    let e = wait(mesh.call("nobody", Bytes::new(), None)).unwrap_err();
    assert_eq!(e.code_name(), "NOT_FOUND");

    wait(mesh.close());
    let e = wait(mesh.call("denied", Bytes::new(), None)).unwrap_err();
    assert_eq!(e.code_name(), "FAILED_PRECONDITION");
    assert!(mesh.serve("again", |_r, _p| {}).is_err());
}

#[test]
fn the_cancel_hook_runs_when_the_caller_gives_up() {
    let mesh = open("cancel");
    let (cancelled_tx, cancelled_rx) = mpsc::channel();
    let cancelled_tx = std::sync::Mutex::new(cancelled_tx);
    let (keep_tx, keep_rx) = mpsc::channel();
    let keep_tx = std::sync::Mutex::new(keep_tx);
    let _svc = mesh
        .serve("never", move |_req, reply| {
            let tx = cancelled_tx.lock().unwrap().clone();
            reply.on_cancel(move || {
                let _ = tx.send(Instant::now());
            });
            // Keep the reply alive, unanswered.
            let _ = keep_tx.lock().unwrap().send(reply);
        })
        .unwrap();
    let started = Instant::now();
    let e = wait(mesh.call("never", Bytes::new(), Some(Duration::from_millis(100)))).unwrap_err();
    assert_eq!(e.code_name(), "DEADLINE_EXCEEDED");
    assert!(started.elapsed() >= Duration::from_millis(100));
    let at = cancelled_rx
        .recv_timeout(LONG)
        .expect("the cancel hook ran");
    assert!(at >= started);
    let reply = keep_rx.recv_timeout(LONG).unwrap();
    assert!(reply.is_cancelled());
    assert!(!reply.ok(Bytes::from_static(b"too late")));
    // A hook added after the cancellation runs at once.
    let (ran_tx, ran_rx) = mpsc::channel();
    reply.on_cancel(move || {
        let _ = ran_tx.send(());
    });
    assert_eq!(ran_rx.try_recv(), Ok(()));
}

#[test]
fn a_handler_can_block_on_another_call() {
    let mesh = open("nested");
    let _inner = mesh
        .serve("inner", |req, reply| {
            let mut v = req.payload().to_vec();
            v.reverse();
            reply.ok(v.into());
        })
        .unwrap();
    let m = mesh.clone();
    // Runs on the link thread, which has entered the runtime's context.
    let _outer = mesh
        .serve("outer", move |req, reply| {
            match wait(m.call("inner", req.into_payload(), Some(LONG))) {
                Ok(b) => reply.ok(b),
                Err(e) => reply.error(e),
            };
        })
        .unwrap();
    let got = wait(mesh.call("outer", Bytes::from_static(b"abc"), Some(LONG))).unwrap();
    assert_eq!(&got[..], b"cba");
}

#[test]
fn thousands_of_calls_in_flight_through_spawn_with() {
    let mut options = MeshOptions::default();
    options
        .settings
        .set("runtime_dir", runtime_dir("many").to_str().unwrap());
    options.settings.set("call_spin", "0s");
    let mesh = FfiMesh::open(options).unwrap();
    let _svc = mesh
        .serve("echo", |req, reply| {
            reply.ok(req.into_payload());
        })
        .unwrap();
    let n = 2000;
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let tx = tx.clone();
        let payload = Bytes::from(format!("call {i}"));
        spawn_with(mesh.call("echo", payload, Some(LONG)), move |r| {
            let _ = tx.send((i, r));
        });
    }
    drop(tx);
    let mut seen = vec![false; n];
    for (i, r) in rx.iter() {
        assert_eq!(r.unwrap(), Bytes::from(format!("call {i}")));
        seen[i] = true;
    }
    assert!(seen.iter().all(|s| *s));
}

#[test]
fn one_way_messages_reach_the_handler() {
    let mesh = open("oneway");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let _svc = mesh
        .serve("sink", move |req, _reply| {
            let _ = tx.lock().unwrap().send(req.into_payload());
        })
        .unwrap();
    wait(mesh.send("sink", Bytes::from_static(b"fire"))).unwrap();
    assert_eq!(&rx.recv_timeout(LONG).unwrap()[..], b"fire");
}

#[test]
fn closing_a_subscription_ends_a_waiting_next() {
    let mesh = open("subclose");
    let sub = mesh.subscribe("news", None).unwrap();
    let waiting = sub.clone();
    let waiter = std::thread::spawn(move || wait(waiting.next()));
    std::thread::sleep(Duration::from_millis(50));
    sub.close();
    assert!(waiter.join().unwrap().is_none());
    assert!(sub.is_closed());
    // Publishers stop seeing it.
    let deadline = Instant::now() + LONG;
    while wait(mesh.publish("news", Bytes::from_static(b"x"))).unwrap() != 0 {
        assert!(
            Instant::now() < deadline,
            "the closed subscription is still seen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_publisher_is_shared_by_threads_each_in_order() {
    let mesh = open("publisher");
    // Made on a thread outside the runtime, before anyone subscribes: it
    // still sees subscribers come.
    let publisher = mesh.publisher("ticks").unwrap();
    assert_eq!(publisher.topic(), "ticks");
    assert_eq!(
        wait(publisher.publish(Bytes::from_static(b"x"))).unwrap(),
        0
    );
    let sub = mesh.subscribe("ticks", None).unwrap();
    let deadline = Instant::now() + LONG;
    while wait(publisher.publish(Bytes::from_static(b"probe"))).unwrap() != 1 {
        assert!(Instant::now() < deadline, "the subscriber is not seen");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Two threads publish through clones of one publisher: every message
    // arrives once, each thread's in its order.
    let threads: Vec<_> = (0..2u8)
        .map(|t| {
            let publisher = publisher.clone();
            std::thread::spawn(move || {
                for i in 0..100u8 {
                    let burst = vec![Bytes::from(vec![t, i]), Bytes::from(vec![t, i])];
                    assert_eq!(wait(publisher.publish_many(burst)).unwrap(), 2);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut next = [0u8; 2];
    let mut got = 0;
    while got < 400 {
        let m = wait(sub.next()).unwrap();
        if m.payload() == &b"probe"[..] {
            continue;
        }
        let (t, i) = (m.payload()[0] as usize, m.payload()[1]);
        assert_eq!(i, next[t] / 2, "thread {t}'s messages out of order");
        next[t] += 1;
        got += 1;
    }
    let e = match mesh.publisher("bad topic") {
        Err(e) => e,
        Ok(_) => panic!("a bad topic was taken"),
    };
    assert_eq!(e.code(), commy_mesh::Code::InvalidArgument);
}

#[test]
fn queue_groups_deliver_each_message_once() {
    let mesh = open("groups");
    let a = mesh.subscribe("jobs", Some("workers")).unwrap();
    let b = mesh.subscribe("jobs", Some("workers")).unwrap();
    let all = mesh.subscribe("jobs", None).unwrap();
    assert_eq!(a.group(), Some("workers"));
    // Wait until the publisher sees both the group and the plain subscriber.
    let deadline = Instant::now() + LONG;
    while wait(mesh.publish("jobs", Bytes::from_static(b"probe"))).unwrap() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let n = 20;
    for i in 0..n {
        assert_eq!(
            wait(mesh.publish("jobs", Bytes::from(format!("job {i}")))).unwrap(),
            2
        );
    }
    // The plain subscriber sees every message (probes first).
    let mut plain = Vec::new();
    while plain.len() < n {
        let m = wait(all.next()).unwrap();
        if m.payload() != &b"probe"[..] {
            plain.push(m.into_payload());
        }
    }
    assert_eq!(plain[n - 1], Bytes::from(format!("job {}", n - 1)));
    // The group's members share them: n jobs in all, each once.
    let mut jobs = Vec::new();
    let collect = |s: &commy_ffi::FfiSubscription, jobs: &mut Vec<Bytes>| {
        while let Some(m) = block_on(
            async {
                tokio::time::timeout(Duration::from_millis(300), s.next())
                    .await
                    .ok()
                    .flatten()
            },
            || Ok::<(), ()>(()),
        )
        .unwrap()
        {
            if m.payload() != &b"probe"[..] {
                jobs.push(m.into_payload());
            }
        }
    };
    collect(&a, &mut jobs);
    collect(&b, &mut jobs);
    jobs.sort();
    jobs.dedup();
    assert_eq!(jobs.len(), n);
}

#[test]
fn a_region_is_reachable_through_its_descriptor() {
    let mesh = open("region");
    let mut create = RegionOptions::default();
    create.size = Some(10_000);
    create.policy = Some(OpenPolicy::Create);
    let region = mesh.region("shared-state", create.clone()).unwrap();
    assert_eq!(region.len(), 10_000);
    assert!(region.data_offset() >= 4096);
    let e = mesh.region("shared-state", create).unwrap_err();
    assert_eq!(e.code_name(), "ALREADY_EXISTS");

    // The descriptor's file at data_offset is the live data.
    let file = std::fs::File::from(region.dup_fd().unwrap());
    region.write_at(100, b"written by write_at").unwrap();
    let mut buf = [0u8; 19];
    file.read_exact_at(&mut buf, (region.data_offset() + 100) as u64)
        .unwrap();
    assert_eq!(&buf, b"written by write_at");
    file.write_all_at(b"through the fd", (region.data_offset() + 5000) as u64)
        .unwrap();
    assert_eq!(region.read_at(5000, 14).unwrap(), b"through the fd");

    // Another holder, by name, sees the same bytes.
    let other = mesh
        .region("shared-state", RegionOptions::default())
        .unwrap();
    assert_eq!(other.read_at(5000, 14).unwrap(), b"through the fd");
    assert_eq!(other.refcount(), 2);

    let e = region.read_at(9_990, 20).unwrap_err();
    assert_eq!(e.code_name(), "INVALID_ARGUMENT");
    // Refused before anything is allocated or added up.
    for (offset, len) in [(0, usize::MAX), (usize::MAX, 2), (1 << 40, 1 << 40)] {
        let e = region.read_at(offset, len).unwrap_err();
        assert_eq!(e.code_name(), "INVALID_ARGUMENT", "{offset} {len}");
    }
    let mut wrong = RegionOptions::default();
    wrong.size = Some(5);
    wrong.policy = Some(OpenPolicy::Open);
    let e = mesh.region("shared-state", wrong).unwrap_err();
    assert_eq!(e.code_name(), "FAILED_PRECONDITION");
    let e = mesh
        .region("bad/name", RegionOptions::default())
        .unwrap_err();
    assert_eq!(e.code_name(), "INVALID_ARGUMENT");
}

#[test]
fn an_interrupt_abandons_a_call() {
    let mesh = open("interrupt");
    let (keep_tx, keep_rx) = mpsc::channel();
    let keep_tx = std::sync::Mutex::new(keep_tx);
    let _svc = mesh
        .serve("stuck", move |_req, reply| {
            let _ = keep_tx.lock().unwrap().send(reply);
        })
        .unwrap();
    let started = Instant::now();
    let r = block_on(mesh.call("stuck", Bytes::new(), Some(LONG)), || {
        if started.elapsed() > Duration::from_millis(200) {
            Err("interrupted")
        } else {
            Ok(())
        }
    });
    assert_eq!(r.unwrap_err(), "interrupted");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(keep_rx);
}

#[test]
fn a_caller_that_drops_its_call_cancels_the_handler() {
    let mesh = open("dropcall");
    let (cancelled_tx, cancelled_rx) = mpsc::channel();
    let cancelled_tx = std::sync::Mutex::new(cancelled_tx);
    let (keep_tx, keep_rx) = mpsc::channel();
    let keep_tx = std::sync::Mutex::new(keep_tx);
    let _svc = mesh
        .serve("patient", move |_req, reply| {
            let tx = cancelled_tx.lock().unwrap().clone();
            reply.on_cancel(move || {
                let _ = tx.send(());
            });
            let _ = keep_tx.lock().unwrap().send(reply);
        })
        .unwrap();
    // The caller gives up long before its (30 s) deadline.
    let task = spawn_with(mesh.call("patient", Bytes::new(), Some(LONG)), |_| {});
    let reply = keep_rx.recv_timeout(LONG).unwrap();
    task.cancel();
    cancelled_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the handler learned that its caller gave up");
    assert!(reply.is_cancelled());
}

#[test]
fn local_tasks_drive_calls_on_one_loop_thread() {
    let mut options = MeshOptions::default();
    options
        .settings
        .set("runtime_dir", runtime_dir("local").to_str().unwrap());
    options.settings.set("call_spin", "0s");
    let mesh = FfiMesh::open(options).unwrap();
    let _svc = mesh
        .serve("later", |req, reply| {
            // Answer from another thread, so that calls must wait.
            std::thread::spawn(move || {
                reply.ok(req.into_payload());
            });
        })
        .unwrap();
    type Task = commy_ffi::LocalTask<(usize, Result<Bytes, FfiError>)>;
    let (woken_tx, woken_rx) = mpsc::channel::<Task>();
    let woken_tx = std::sync::Mutex::new(woken_tx);
    let schedule = std::sync::Arc::new(move |t: Task| {
        let _ = woken_tx.lock().unwrap().send(t);
    });
    let n = 300;
    let mut done = vec![false; n];
    let mut left = n;
    let mut tasks = Vec::new();
    for (i, seen) in done.iter_mut().enumerate() {
        let call = mesh.call("later", Bytes::from(format!("{i}")), Some(LONG));
        let s = schedule.clone();
        let (task, first) =
            commy_ffi::LocalTask::start(async move { (i, call.await) }, move |t| s(t));
        if let Some((j, r)) = first {
            assert_eq!(r.unwrap(), Bytes::from(format!("{j}")));
            *seen = true;
            left -= 1;
        }
        tasks.push(task);
    }
    // The "event loop": poll what was woken, on this thread only.
    while left > 0 {
        let task = woken_rx.recv_timeout(LONG).expect("a wake-up");
        if let Some((i, r)) = task.poll() {
            assert_eq!(r.unwrap(), Bytes::from(format!("{i}")));
            assert!(!done[i]);
            done[i] = true;
            left -= 1;
        }
    }
    assert!(tasks.iter().all(|t| t.is_finished()));
    // A cancelled task polls to nothing.
    let (task, _) = commy_ffi::LocalTask::start(std::future::pending::<u8>(), |_| {});
    task.cancel();
    assert_eq!(task.poll(), None);
    assert!(task.is_finished());
}

#[test]
fn the_link_thread_hook_wraps_the_threads_that_run_handlers() {
    let (hooked_tx, hooked_rx) = mpsc::channel();
    let hooked_tx = std::sync::Mutex::new(hooked_tx);
    let mut options = MeshOptions::default();
    options
        .settings
        .set("runtime_dir", runtime_dir("hook").to_str().unwrap());
    options.link_thread_hook = Some(commy_ffi::ThreadHook::new(move |work| {
        let _ = hooked_tx.lock().unwrap().send(std::thread::current().id());
        work();
    }));
    let mesh = FfiMesh::open(options).unwrap();
    let (ran_tx, ran_rx) = mpsc::channel();
    let ran_tx = std::sync::Mutex::new(ran_tx);
    let _svc = mesh
        .serve("where", move |req, reply| {
            let _ = ran_tx.lock().unwrap().send(std::thread::current().id());
            reply.ok(req.into_payload());
        })
        .unwrap();
    let got = wait(mesh.call("where", Bytes::from_static(b"x"), Some(LONG))).unwrap();
    assert_eq!(&got[..], b"x");
    let hooked = hooked_rx.recv_timeout(LONG).expect("the hook ran");
    assert_eq!(ran_rx.recv_timeout(LONG).unwrap(), hooked);
}

/// This process's effective uid and gid, from `/proc/self/status` (its
/// `Uid:` and `Gid:` lines: real, effective, saved, filesystem).
fn effective_ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = |key: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    (effective("Uid:"), effective("Gid:"))
}

#[test]
fn handlers_and_driven_links_see_who_called() {
    let mesh = open("caller");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let _svc = mesh
        .serve("whoami", move |req, reply| {
            let _ = tx.lock().unwrap().send(req.caller().clone());
            reply.ok(req.into_payload());
        })
        .unwrap();
    wait(mesh.call("whoami", Bytes::new(), Some(LONG))).unwrap();
    let caller = rx.recv_timeout(LONG).unwrap();
    let (uid, gid) = effective_ids();
    assert_eq!(caller.kind(), "local");
    assert_eq!(
        (caller.uid(), caller.gid(), caller.pid()),
        (Some(uid), Some(gid), Some(std::process::id()))
    );
    assert_eq!((caller.identity(), caller.addr()), (None, None));
    assert!(matches!(caller.caller(), commy_ffi::Caller::Local { .. }));

    // A driven link says who is at its other end, and its handler gets the
    // same caller with each request.
    let (tx, rx) = mpsc::channel();
    let (link_tx, handler_tx) = (std::sync::Mutex::new(tx.clone()), std::sync::Mutex::new(tx));
    let _driven = mesh
        .serve_driven(
            "whoami-driven",
            move |payload, caller, reply| {
                let _ = handler_tx.lock().unwrap().send(("handler", caller));
                reply.ok(payload);
            },
            move |mut link| {
                let _ = link_tx
                    .lock()
                    .unwrap()
                    .send(("link", commy_ffi::FfiCaller::from(link.caller())));
                while link.poll(16) != commy_ffi::Drive::Closed {
                    link.wait(Some(Instant::now() + Duration::from_millis(10)));
                }
            },
        )
        .unwrap();
    wait(mesh.call("whoami-driven", Bytes::new(), Some(LONG))).unwrap();
    let mut seen: Vec<_> = (0..2).map(|_| rx.recv_timeout(LONG).unwrap()).collect();
    seen.sort_by_key(|(from, _)| *from);
    assert_eq!(seen[0].0, "handler");
    assert_eq!(seen[1].0, "link");
    assert_eq!(seen[0].1, caller);
    assert_eq!(seen[1].1, caller);
    wait(mesh.close());
}

#[test]
fn a_caller_over_tls_is_remote_with_its_certificate_identity_if_any() {
    use commy_mesh::{Mesh, NetConfig, Request, Response, Status};
    use commy_net::{DevCa, Identity, LeafSpec, tls::write_pem_file};

    let dir = runtime_dir("tls");
    let ca_dir = dir.join("ca");
    DevCa::create(&ca_dir).unwrap();
    let ca = DevCa::load(&ca_dir).unwrap();
    let issue = |service: &str, spec: fn(Identity) -> LeafSpec| {
        let (cert, key) = ca
            .issue(&spec(Identity::new("default", service).unwrap()))
            .unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{service}.pem")),
            dir.join(format!("{service}.key")),
        );
        write_pem_file(&cert_path, &cert).unwrap();
        write_pem_file(&key_path, &key).unwrap();
        (Some(cert_path), Some(key_path))
    };
    let own_dir = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    };

    // The service answers with what FfiCaller makes of its caller.
    let mut net = NetConfig::default();
    net.tls_ca = Some(ca_dir.join("ca.pem"));
    (net.tls_cert, net.tls_key) = issue("server", |id| {
        LeafSpec::for_this_host(id, &["127.0.0.1".parse().unwrap()])
    });
    let server = wait(
        Mesh::builder()
            .runtime_dir(own_dir("server"))
            .net(net)
            .listen("tls://127.0.0.1:0")
            .open(),
    )
    .unwrap();
    let _whoami = wait(server.serve("whoami", |req: Request| async move {
        let c = commy_ffi::FfiCaller::from(req.caller());
        let addr = c.addr().map(|a| a.ip().to_string());
        let who = format!("{} {:?} {addr:?} {:?}", c.kind(), c.identity(), c.uid());
        Ok::<_, Status>(Response::new(who.into_bytes()))
    }))
    .unwrap();
    let port = server.tls_endpoint().unwrap().port();

    let client = |name: &str, cert: (Option<PathBuf>, Option<PathBuf>)| {
        let mut net = NetConfig::default();
        net.tls_ca = Some(ca_dir.join("ca.pem"));
        (net.tls_cert, net.tls_key) = cert;
        net.no_listen = true;
        let mesh = wait(
            Mesh::builder()
                .runtime_dir(own_dir(name))
                .net(net)
                .peer(&format!("tls://127.0.0.1:{port}"))
                .open(),
        )
        .unwrap();
        let who = wait(mesh.call("whoami", Vec::new())).unwrap();
        wait(mesh.close());
        String::from_utf8(who.to_vec()).unwrap()
    };
    assert_eq!(
        client("anonymous", (None, None)),
        r#"remote None Some("127.0.0.1") None"#
    );
    assert_eq!(
        client("known", issue("caller-test", LeafSpec::new)),
        r#"remote Some("spiffe://default/caller-test") Some("127.0.0.1") None"#
    );
    wait(server.close());
}

/// A binding passes its program's options as a layer of settings by key:
/// any key of the settings, each value then explained with the layer's
/// name; an unknown key or a bad value fails the open naming it.
#[test]
fn options_are_settings_by_key_and_say_where_they_came_from() {
    let mut options = MeshOptions::default();
    options.settings.set_name("test options");
    options
        .settings
        .set("runtime_dir", runtime_dir("settings").to_str().unwrap());
    options.settings.set("max_concurrency", 3);
    options.settings.set("transport", "shm");
    let mesh = FfiMesh::open(options.clone()).unwrap();
    assert_eq!(
        mesh.explain("max_concurrency"),
        Some(("3".to_owned(), "test options".to_owned()))
    );
    assert_eq!(
        mesh.explain("transport"),
        Some(("\"shm\"".to_owned(), "test options".to_owned()))
    );
    assert_eq!(
        mesh.explain("call_spin").map(|e| e.1).as_deref(),
        Some("default")
    );
    assert_eq!(mesh.explain("colour"), None);
    wait(mesh.close());

    let mut unknown = options.clone();
    unknown.settings.set("colour", "blue");
    let e = FfiMesh::open(unknown).unwrap_err();
    assert_eq!(e.code_name(), "INVALID_ARGUMENT");
    assert!(
        e.message().contains("colour") && e.message().contains("test options"),
        "{e}"
    );
    let mut bad = options;
    bad.settings.set("max_concurrency", 0);
    let e = FfiMesh::open(bad).unwrap_err();
    assert_eq!(
        e.message(),
        "max_concurrency (test options): must be at least 1"
    );
}
