//! Services that cannot take a connection: one out of file descriptors
//! (its accept loop backs off instead of spinning, and serves again once
//! descriptors are free), and one that is frozen (a call's deadline bounds
//! the handshake with it).
//!
//! This process serves `echo` and then opens `/dev/null` until `open`
//! fails with `EMFILE` (its descriptor limit lowered first, so that takes
//! few files). A child process (this binary in the client role, started
//! before, when pipes could still be made) then calls `echo`: its
//! connection waits in the listener's backlog while every `accept` of the
//! service fails. Over that time the process's CPU time must stay far below
//! what a spinning loop burns (one core); once the files are closed the
//! child's call must succeed.
//!
//! A frozen instance (a child serving `echo`, stopped with SIGSTOP after
//! it announced itself) must cost a new client's call no more than the
//! call's timeout, where the handshake used to wait its own 5 s; once the
//! child runs again, the next call reaches it.
//!
//! `harness = false`: `main` runs the checks one after the other (or a
//! child's role), as the descriptor limit is the whole process's.

use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use commy_mesh::{CallOptions, Mesh, Request, Response, Status};

mod support;
use support::{builder, runtime};

/// The environment variable naming a child's role and runtime dir.
const ROLE: &str = "COMMY_ACCEPT_TEST_ROLE";
const DIR: &str = "COMMY_ACCEPT_TEST_DIR";

/// How long the service stays out of descriptors with a connection queued.
const EXHAUSTED: Duration = Duration::from_millis(1500);

fn main() -> ExitCode {
    match std::env::var(ROLE).as_deref() {
        Ok("client") => client(),
        Ok("server") => server(),
        Ok(other) => {
            eprintln!("unknown {ROLE}: {other}");
            ExitCode::FAILURE
        }
        Err(_) => {
            out_of_descriptors_the_accept_loop_backs_off_and_recovers();
            println!("ok: out of descriptors, the accept loop backs off and recovers");
            a_frozen_instance_costs_a_call_no_more_than_its_timeout();
            println!("ok: a frozen instance costs a call no more than its timeout");
            a_frozen_instance_is_given_up_for_a_live_one();
            println!("ok: a frozen instance is given up for a live one");
            a_refused_handshake_reaches_the_caller_with_its_reason();
            println!("ok: a refused handshake reaches the caller with its reason");
            idle_services_share_one_accept_thread_that_sleeps();
            println!("ok: idle services share one accept thread that sleeps");
            println!("accept: 5 passed");
            ExitCode::SUCCESS
        }
    }
}

/// Child role: once stdin says `GO`, calls `echo` and prints the answer.
fn client() -> ExitCode {
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let rt = runtime();
    let mesh = rt.block_on(builder(&dir).open()).unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "GO");
    let options = CallOptions::default().timeout(Duration::from_secs(20));
    let answer = rt.block_on(mesh.call_with("echo", &b"still here"[..], options));
    match answer {
        Ok(r) => println!("OK {}", String::from_utf8_lossy(r.payload())),
        Err(e) => println!("ERR {e}"),
    }
    rt.block_on(mesh.close());
    ExitCode::SUCCESS
}

/// An "instance" whose socket closes every connection at once: the
/// caller's error names the instance and why it could not be reached, not
/// just that none could.
fn a_refused_handshake_reaches_the_caller_with_its_reason() {
    use commy_mesh::MeshName;
    use commy_mesh::discovery::{InstanceId, LocalRegistry};
    use commy_mesh::service::ServiceName;
    let dir = private_dir("refusing");
    let registry = LocalRegistry::new(
        commy_shm::RuntimeDir::at(&dir).unwrap(),
        &MeshName::default(),
    )
    .unwrap();
    let id = InstanceId::random();
    let path = registry
        .socket_path(&ServiceName::new("echo").unwrap(), id)
        .unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let rt = runtime();
    let mesh = rt.block_on(builder(&dir).open()).unwrap();
    let e = rt.block_on(mesh.call("echo", &b"x"[..])).unwrap_err();
    assert_eq!(e.code(), commy_mesh::Code::Unavailable, "{e}");
    assert!(
        e.message().contains("1 tried; the last: cannot connect to")
            && e.message().contains(&id.to_string()),
        "{e}"
    );
    rt.block_on(mesh.close());
    let _ = std::fs::remove_dir_all(&dir);
}

/// 200 services in one process: one accept thread waits on all their
/// sockets, and while nobody connects it wakes about once a second (to
/// close stopped listeners), not ten times a second per service as a
/// thread per service did; subscriptions, which ask whether a publisher
/// cut them, make it wake no more often. The whole process's threads are counted, by
/// name and by their context switches (a thread wakes once per switch)
/// over two seconds; a call still reaches the last service.
fn idle_services_share_one_accept_thread_that_sleeps() {
    const SERVICES: usize = 200;
    let dir = private_dir("idle");
    let rt = runtime();
    let mesh = rt.block_on(builder(&dir).open()).unwrap();
    let mut handles = Vec::new();
    for i in 0..SERVICES {
        let handle = rt
            .block_on(mesh.serve(&format!("idle-{i}"), |req: Request| async move {
                Ok::<_, Status>(Response::new(req.into_payload()))
            }))
            .unwrap();
        handles.push(handle);
    }
    // Subscriptions nobody publishes to: each asks whether a publisher cut
    // it only when its directory changes.
    let mut subscriptions = Vec::new();
    for i in 0..SERVICES {
        subscriptions.push(rt.block_on(mesh.subscribe(&format!("idle/{i}"))).unwrap());
    }
    let accept_threads = threads()
        .iter()
        .filter(|t| t.name.starts_with("commy-accept"))
        .count();
    assert_eq!(
        accept_threads, 1,
        "one accept thread for {SERVICES} services and {SERVICES} subscriptions"
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = threads();
    std::thread::sleep(Duration::from_secs(2));
    let after = threads();
    // Wake-ups of the process's threads over the window (threads that
    // exist at both ends; the main thread sleeps once).
    let woke: Vec<(String, u64)> = after
        .iter()
        .filter_map(|t| {
            let b = before.iter().find(|b| b.tid == t.tid)?;
            Some((t.name.clone(), t.switches - b.switches))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let total: u64 = woke.iter().map(|(_, n)| n).sum();
    // A sweep a second is 2, the main thread's sleep 1; a thread per
    // service polling ten times a second made 4000, and checking the
    // subscriptions every tenth of a second 20.
    assert!(
        total <= 10,
        "the idle process woke {total} times in 2 s: {woke:?}"
    );
    let echo = rt.block_on(mesh.call(&format!("idle-{}", SERVICES - 1), &b"hi"[..]));
    assert_eq!(&echo.unwrap()[..], b"hi");
    let last = format!("idle/{}", SERVICES - 1);
    assert_eq!(rt.block_on(mesh.publish(&last, &b"hi"[..])).unwrap(), 1);
    let got = rt.block_on(subscriptions[SERVICES - 1].next()).unwrap();
    assert_eq!(&got.payload()[..], b"hi");
    drop(subscriptions);
    drop(handles);
    rt.block_on(mesh.close());
    let _ = std::fs::remove_dir_all(&dir);
}

/// One thread of this process: its id, name and context switches so far.
struct ThreadStat {
    tid: u32,
    name: String,
    switches: u64,
}

/// This process's threads, from /proc.
fn threads() -> Vec<ThreadStat> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let count = |key: &str| field(key).parse::<u64>().unwrap_or(0);
        out.push(ThreadStat {
            tid,
            name: field("Name:"),
            switches: count("voluntary_ctxt_switches:") + count("nonvoluntary_ctxt_switches:"),
        });
    }
    out
}

/// A mesh in `dir` serving `echo`, and the service's handle.
fn serve_echo(rt: &tokio::runtime::Runtime, dir: &Path) -> (Mesh, commy_mesh::ServiceHandle) {
    let mesh = rt.block_on(builder(dir).open()).unwrap();
    let echo = rt
        .block_on(mesh.serve("echo", |req: Request| async move {
            Ok::<_, Status>(Response::new(req.into_payload()))
        }))
        .unwrap();
    (mesh, echo)
}

/// Child role: serves `echo` until stdin closes, after saying `READY`.
fn server() -> ExitCode {
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let rt = runtime();
    let (mesh, _echo) = serve_echo(&rt, &dir);
    println!("READY");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    rt.block_on(mesh.close());
    ExitCode::SUCCESS
}

/// A fresh private (0700) runtime dir.
fn private_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("commy-accept-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// This binary in `role` with the runtime dir `dir`, talking over pipes.
fn spawn(role: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .env(DIR, dir)
        .env("XDG_CONFIG_HOME", dir)
        .env_remove("COMMY_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn a_frozen_instance_costs_a_call_no_more_than_its_timeout() {
    use rustix::process::{Pid, Signal, kill_process};
    let dir = private_dir("frozen");
    let mut child = spawn("server", &dir);
    let mut from_child = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    from_child.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    /// Ends the child however the check ends (a stopped child would
    /// outlive a failed check).
    struct Reap(std::process::Child, Pid);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = kill_process(self.1, Signal::CONT);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let to_child = child.stdin.take();
    let _reap = Reap(child, pid);
    kill_process(pid, Signal::STOP).unwrap();
    let rt = runtime();
    let mesh = rt.block_on(builder(&dir).open()).unwrap();
    let timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let frozen = rt.block_on(mesh.call_with(
        "echo",
        &b"anyone?"[..],
        CallOptions::default().timeout(timeout),
    ));
    let took = started.elapsed();
    let status = frozen.unwrap_err();
    assert_eq!(
        status.code(),
        commy_mesh::Code::DeadlineExceeded,
        "{status}"
    );
    // The handshake's own limit is 5 s; the call's timeout cut it short
    // (the margin is for a loaded machine, far below those 5 s).
    assert!(took < Duration::from_secs(3), "the call took {took:?}");
    kill_process(pid, Signal::CONT).unwrap();
    // The instance is still known: the next call reaches it.
    let options = CallOptions::default().timeout(Duration::from_secs(20));
    let answer = rt.block_on(mesh.call_with("echo", &b"awake"[..], options));
    assert_eq!(&answer.unwrap().payload()[..], b"awake");
    rt.block_on(mesh.close());
    drop(to_child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two instances, one frozen: a new client's first call, with a timeout
/// shorter than the handshake's own 5 s, gives the frozen one up after a
/// second and is answered by the other, whichever it tried first.
fn a_frozen_instance_is_given_up_for_a_live_one() {
    use rustix::process::{Pid, Signal, kill_process};
    let dir = private_dir("frozen-beside");
    /// The children, woken and ended however the check ends.
    struct Reap(Vec<(std::process::Child, Pid)>);
    impl Drop for Reap {
        fn drop(&mut self) {
            for (child, pid) in &mut self.0 {
                let _ = kill_process(*pid, Signal::CONT);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut children = Reap(Vec::new());
    for _ in 0..2 {
        let mut child = spawn("server", &dir);
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY");
        let pid = Pid::from_raw(child.id() as i32).unwrap();
        children.0.push((child, pid));
    }
    let rt = runtime();
    // Each instance frozen in turn: a new client's first pick is the same
    // one every time, so one of the two rounds starts with the frozen one.
    for frozen in 0..2 {
        let pid = children.0[frozen].1;
        kill_process(pid, Signal::STOP).unwrap();
        for i in 0..2 {
            let mesh = rt.block_on(builder(&dir).open()).unwrap();
            let options = CallOptions::default().timeout(Duration::from_secs(3));
            let body = format!("first call {i}");
            let answer = rt.block_on(mesh.call_with("echo", body.clone().into_bytes(), options));
            match answer {
                Ok(r) => assert_eq!(r.payload(), body.as_bytes()),
                Err(e) => panic!("instance {frozen} frozen, client {i}: {e}"),
            }
            rt.block_on(mesh.close());
        }
        kill_process(pid, Signal::CONT).unwrap();
    }
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
}

/// This process's CPU time (user and system), read from an open
/// `/proc/self/stat` (no descriptor needed while they are exhausted).
fn cpu_time(stat: &mut std::fs::File) -> Duration {
    let mut text = String::new();
    stat.rewind().unwrap();
    stat.read_to_string(&mut text).unwrap();
    // Fields after the command name, which ends with the last ')'.
    let rest = &text[text.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = rustix::param::clock_ticks_per_second();
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let dir = private_dir("emfile");
    let rt = runtime();
    let (mesh, _echo) = serve_echo(&rt, &dir);
    let mut child = spawn("client", &dir);
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap());
    let mut stat = std::fs::File::open("/proc/self/stat").unwrap();

    // Few descriptors above those open now, then all of them taken.
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let lowered = rustix::process::Rlimit {
        current: Some(open_now + 64),
        maximum: limit.maximum,
    };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, lowered).unwrap();
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) => break,
            Err(e) => panic!("opening /dev/null failed otherwise: {e}"),
        }
    }
    to_child.write_all(b"GO\n").unwrap();
    to_child.flush().unwrap();
    // The child's connection is queued now, or soon; every accept fails.
    let before = cpu_time(&mut stat);
    std::thread::sleep(EXHAUSTED);
    let spent = cpu_time(&mut stat) - before;
    drop(held);
    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
    // A loop that spins burns about one core: EXHAUSTED of CPU time.
    assert!(
        spent < EXHAUSTED / 5,
        "the service spent {spent:?} of CPU in {EXHAUSTED:?} out of descriptors"
    );
    let mut answer = String::new();
    from_child.read_line(&mut answer).unwrap();
    assert_eq!(answer.trim(), "OK still here", "the child's call");
    assert!(child.wait().unwrap().success());
    rt.block_on(mesh.close());
    let _ = std::fs::remove_dir_all(&dir);
}
