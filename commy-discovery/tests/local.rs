//! Local discovery against real processes, sockets and directories.
//!
//! Instances are real child processes: the tests re-run this test binary with
//! `--exact child_role` and environment variables that tell the
//! child what to do (bind a `ShmListener` at its registry socket path and
//! serve until its stdin closes or it is killed; or print its host id). Each
//! test uses its own runtime directory, given explicitly.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use commy_core::{InstanceId, MeshName, ServiceName};
use commy_discovery::{
    DiscoveryError, HOST_ID_ENV, Instance, InstanceWatch, LocalRegistry, host_id,
};
use commy_shm::{LinkConfig, RuntimeDir, ShmListener, UdsListener};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

/// Switches `child_role` into a role.
const ROLE: &str = "COMMY_DISCOVERY_TEST_ROLE";
/// The runtime dir a serving child uses.
const DIR: &str = "COMMY_DISCOVERY_TEST_DIR";
/// The mesh a serving child uses.
const MESH: &str = "COMMY_DISCOVERY_TEST_MESH";
/// The service a serving child serves.
const SERVICE: &str = "COMMY_DISCOVERY_TEST_SERVICE";

/// How long to wait for anything before failing the test.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

/// The name of the test running on this thread (libtest names each test's
/// thread after it).
fn this_test() -> String {
    std::thread::current()
        .name()
        .expect("a test runs on a thread named after it")
        .to_owned()
}

/// Plays this process's child role, if it is one, and says so: a test that
/// needs a child process re-runs itself under its own name with the role
/// set ([`child_command`]), and every test hands a child over here first.
/// The role runs on a thread of its own, outside any test runtime.
fn as_child() -> bool {
    let Ok(role) = std::env::var(ROLE) else {
        return false;
    };
    if std::thread::spawn(move || child_role(&role))
        .join()
        .is_err()
    {
        panic!("the child role failed");
    }
    true
}

/// What a child process does, by its role.
fn child_role(role: &str) {
    match role {
        "serve" => serve(),
        "host-id" => {
            let host = match host_id() {
                Ok(h) => h.to_string(),
                Err(e) => {
                    println!("HOST error: {e}");
                    println!("REGISTRY -");
                    return;
                }
            };
            println!("HOST {host}");
            let dir = std::env::var_os(DIR).expect("host-id role needs a runtime dir");
            let registry =
                LocalRegistry::new(RuntimeDir::at(dir).unwrap(), &MeshName::default()).unwrap();
            println!("REGISTRY {}", registry.host());
        }
        other => panic!("unknown child role {other:?}"),
    }
}

/// Announces an instance and serves until stdin closes, then reports
/// whether anyone connected meanwhile and leaves cleanly.
fn serve() {
    let dir = std::env::var_os(DIR).expect("serve role needs a runtime dir");
    let mesh = MeshName::new(&std::env::var(MESH).unwrap()).unwrap();
    let service = ServiceName::new(&std::env::var(SERVICE).unwrap()).unwrap();
    let registry = LocalRegistry::new(RuntimeDir::at(dir).unwrap(), &mesh).unwrap();
    let path = registry
        .socket_path(&service, InstanceId::random())
        .unwrap();
    let binding_at = now_nanos();
    let listener = ShmListener::bind(&path, LinkConfig::default()).unwrap();
    println!("READY {binding_at} {}", path.display());
    std::io::stdout().flush().unwrap();

    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);

    // A pending connection would mean discovery connected to a live
    // instance, which it must not do.
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let fd = listener.as_fd();
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let probed = poll(&mut fds, Some(&zero)).unwrap() > 0;
    println!("STOPPING {} {probed}", now_nanos());
    std::io::stdout().flush().unwrap();
    drop(listener);
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn from_nanos(nanos: &str) -> SystemTime {
    let nanos: u64 = nanos.parse().unwrap();
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// A private runtime directory (mode 0700), removed on drop.
struct TempRuntime {
    path: PathBuf,
    runtime: RuntimeDir,
}

impl TempRuntime {
    fn new(tag: &str) -> Self {
        // Short, so socket paths stay far below the 107-byte limit.
        let path = PathBuf::from(format!("/tmp/cdisc-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        let runtime = RuntimeDir::at(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        Self { path, runtime }
    }

    fn registry(&self, mesh: &str) -> LocalRegistry {
        LocalRegistry::new(self.runtime.clone(), &MeshName::new(mesh).unwrap()).unwrap()
    }
}

impl Drop for TempRuntime {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn child_command(role: &str) -> Command {
    assert!(
        std::env::var_os(ROLE).is_none(),
        "a child spawns no children"
    );
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([&this_test(), "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stderr(Stdio::inherit());
    cmd
}

/// Lines a child prints, read by a thread.
fn line_reader(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What follows `prefix` on the first line that has it (the test harness
/// prints its own lines too).
fn expect_line(lines: &mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("child printed no {prefix:?} line: {e}"));
        // The harness's "test child_role ... " may precede it on the line.
        if let Some(at) = line.find(prefix) {
            return line[at + prefix.len()..].to_owned();
        }
    }
}

/// A serving child process; killed and reaped on drop.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    path: PathBuf,
    /// Wall-clock time just before the child bound its socket.
    binding_at: SystemTime,
}

impl Server {
    fn spawn(dir: &Path, mesh: &str, service: &str) -> Server {
        let mut child = child_command("serve")
            .env(DIR, dir)
            .env(MESH, mesh)
            .env(SERVICE, service)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let lines = line_reader(&mut child);
        let ready = expect_line(&lines, "READY ");
        let (at, path) = ready.split_once(' ').unwrap();
        Server {
            child,
            stdin,
            lines,
            path: PathBuf::from(path),
            binding_at: from_nanos(at),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn id(&self) -> InstanceId {
        let name = self.path.file_name().unwrap().to_str().unwrap();
        name.split_once('-').unwrap().0.parse().unwrap()
    }

    /// Asks the child to leave cleanly (it drops its listener and exits).
    fn request_stop(&mut self) {
        self.stdin.take();
    }

    /// After [`request_stop`]: waits for the child; returns when it started
    /// unlinking its socket and whether anyone had connected to it.
    fn finish(mut self) -> (SystemTime, bool) {
        let stopping = expect_line(&self.lines, "STOPPING ");
        let (at, probed) = stopping.split_once(' ').unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
        (from_nanos(at), probed.parse().unwrap())
    }

    /// `kill -9`, without reaping (the child stays a zombie until dropped).
    fn kill(&mut self) -> SystemTime {
        let at = SystemTime::now();
        self.child.kill().unwrap();
        at
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a server on another thread, so a watch can be polled meanwhile.
fn spawn_server_in_background(
    dir: &Path,
    mesh: &str,
    service: &str,
) -> std::thread::JoinHandle<Server> {
    let (dir, mesh, service) = (dir.to_path_buf(), mesh.to_owned(), service.to_owned());
    // Named after the test, as the child re-runs it.
    std::thread::Builder::new()
        .name(this_test())
        .spawn(move || Server::spawn(&dir, &mesh, &service))
        .unwrap()
}

/// The watch's next set, failing the test after [`WAIT`].
async fn next_set(watch: &mut InstanceWatch) -> Vec<Instance> {
    tokio::time::timeout(WAIT, watch.changed())
        .await
        .expect("the watch reported nothing")
        .unwrap_or_else(|| panic!("the watch ended: {:?}", watch.error()))
}

/// Prints how long the watch took to report a change. Only printed: the
/// watch is woken by the kernel (inotify, pidfd), with no timer to
/// regress, and a bound on a loaded machine beside other tests would
/// test the machine; [`next_set`] fails a watch that reports nothing.
fn latency(what: &str, from: SystemTime, to: SystemTime) -> Duration {
    // Clamped: the watch can see an unlink before the child reads the clock.
    let latency = to.duration_since(from).unwrap_or_default();
    println!("{what}: {latency:?}");
    latency
}

fn assert_is(instance: &Instance, server: &Server, registry: &LocalRegistry, service: &str) {
    assert_eq!(instance.service, service);
    assert_eq!(instance.id, server.id());
    assert_eq!(instance.pid, server.pid());
    assert_eq!(
        instance.endpoint.to_string(),
        format!("shm://{}", server.path.display())
    );
    assert_eq!(&instance.host, registry.host());
}

/// A pid that belonged to a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// A socket file nobody listens on (as a crashed process leaves it).
fn stale_socket(path: &Path) {
    drop(UnixListener::bind(path).unwrap());
    assert!(fs::symlink_metadata(path).is_ok());
}

/// Sets a file's modification time `ago` into the past.
fn backdate(path: &Path, ago: Duration) {
    let then = SystemTime::now() - ago;
    let since = then.duration_since(UNIX_EPOCH).unwrap();
    let ts = rustix::fs::Timespec {
        tv_sec: since.as_secs() as i64,
        tv_nsec: i64::from(since.subsec_nanos()),
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

// ---------------------------------------------------------------------------
// Watches
// ---------------------------------------------------------------------------

#[tokio::test]
async fn watch_sees_an_instance_appear_and_leave_cleanly() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("clean");
    let registry = rt.registry("default");
    let echo = service("echo");
    // The service directory does not exist yet; the watch creates it.
    assert!(!registry.dir().join("echo").exists());
    let mut watch = registry.watch(&echo).unwrap();
    let dir = registry.dir().join("echo");
    assert_eq!(watch.dir(), dir);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    assert_eq!(next_set(&mut watch).await, []);

    let starting = spawn_server_in_background(&rt.path, "default", "echo");
    let set = next_set(&mut watch).await;
    let seen_at = SystemTime::now();
    let mut server = starting.join().unwrap();
    latency(
        "appear latency (bind -> watch item)",
        server.binding_at,
        seen_at,
    );
    assert_eq!(set.len(), 1, "{set:?}");
    assert_is(&set[0], &server, &registry, "echo");
    assert_eq!(watch.current(), set);
    assert_eq!(registry.instances(&echo).unwrap(), set);

    server.request_stop();
    let set = next_set(&mut watch).await;
    let seen_at = SystemTime::now();
    let path = server.path.clone();
    let (unlinking_at, probed) = server.finish();
    latency(
        "clean-exit latency (unlink -> watch item)",
        unlinking_at,
        seen_at,
    );
    assert_eq!(set, []);
    assert!(watch.current().is_empty());
    assert!(!path.exists());
    assert!(
        !probed,
        "discovery connected to a live instance (watch, instances())"
    );
}

// Multi-threaded, so the watch is also exercised on that scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_a_killed_instance_vanish_and_removes_its_socket() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("kill");
    let registry = rt.registry("default");
    let echo = service("echo");
    let mut victim = Server::spawn(&rt.path, "default", "echo");
    let mut survivor = Server::spawn(&rt.path, "default", "echo");

    let mut watch = registry.watch(&echo).unwrap();
    let set = next_set(&mut watch).await;
    assert_eq!(set.len(), 2, "{set:?}");
    let mut expected = [&victim, &survivor];
    expected.sort_by_key(|s| s.id());
    for (instance, server) in set.iter().zip(expected) {
        assert_is(instance, server, &registry, "echo");
    }

    // SIGKILL leaves the socket file behind; only the pidfd can tell.
    let killed_at = victim.kill();
    let set = next_set(&mut watch).await;
    let seen_at = SystemTime::now();
    latency("kill -9 latency (kill -> watch item)", killed_at, seen_at);
    assert_eq!(set.len(), 1, "{set:?}");
    assert_is(&set[0], &survivor, &registry, "echo");
    assert!(
        !victim.path.exists(),
        "the stale socket {} was not removed",
        victim.path.display()
    );
    drop(victim);

    survivor.request_stop();
    assert_eq!(next_set(&mut watch).await, []);
    let (_, probed) = survivor.finish();
    assert!(!probed, "discovery connected to a live instance");
}

#[tokio::test]
async fn watch_ignores_files_that_are_not_instances() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("junk");
    let registry = rt.registry("default");
    let echo = service("echo");
    let mut watch = registry.watch(&echo).unwrap();
    assert_eq!(next_set(&mut watch).await, []);

    let dir = registry.service_dir(&echo).unwrap();
    let junk = make_junk(&dir);

    // The junk does not change the set, so the next item is the server.
    let starting = spawn_server_in_background(&rt.path, "default", "echo");
    let set = next_set(&mut watch).await;
    let server = starting.join().unwrap();
    assert_eq!(set.len(), 1, "{set:?}");
    assert_is(&set[0], &server, &registry, "echo");
    assert_eq!(registry.instances(&echo).unwrap(), set);
    for path in &junk {
        assert!(
            fs::symlink_metadata(path).is_ok(),
            "{} was removed",
            path.display()
        );
    }
}

/// Files a service directory may contain that are not instances; returns
/// their paths. None of them may be listed, and none may be deleted.
fn make_junk(dir: &Path) -> Vec<PathBuf> {
    let hex = InstanceId::random().to_string();
    let dead = dead_pid();
    let mut paths = Vec::new();
    // Regular files, with and without an instance-like name.
    for name in [
        "README".to_owned(),
        "zz-1.sock".to_owned(),
        format!("{hex}-{dead}.sock"),
        format!("{hex}-{dead}"),
    ] {
        let path = dir.join(name);
        fs::write(&path, b"not a socket").unwrap();
        paths.push(path);
    }
    // Stale sockets with names that are not instance names.
    for name in [
        format!(".{hex}-{dead}.sock"),
        format!("{}-{dead}.sock", hex.to_uppercase().replace('0', "A")),
        format!("{hex}-0.sock"),
        format!("{hex}-0{dead}.sock"),
        format!("{hex}-+{dead}.sock"),
        format!("{}-{dead}.sock", &hex[..31]),
    ] {
        let path = dir.join(name);
        stale_socket(&path);
        paths.push(path);
    }
    // A directory and a symlink with instance names.
    let sub = dir.join(format!("{}-{dead}.sock", InstanceId::random()));
    fs::create_dir(&sub).unwrap();
    paths.push(sub);
    let link = dir.join(format!("{}-{dead}.sock", InstanceId::random()));
    std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
    paths.push(link);
    paths
}

#[tokio::test]
async fn watch_survives_its_directory_being_deleted() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("rmdir");
    let registry = rt.registry("default");
    let echo = service("echo");
    let mut watch = registry.watch(&echo).unwrap();
    assert_eq!(next_set(&mut watch).await, []);

    fs::remove_dir_all(registry.dir()).unwrap();
    let starting = spawn_server_in_background(&rt.path, "default", "echo");
    let set = next_set(&mut watch).await;
    let server = starting.join().unwrap();
    assert_eq!(set.len(), 1, "{set:?}");
    assert_is(&set[0], &server, &registry, "echo");
    assert!(watch.error().is_none());
}

/// Watches can move to spawned tasks; registries to other threads.
const _: () = {
    const fn send<T: Send + 'static>() {}
    send::<InstanceWatch>();
    send::<LocalRegistry>();
    send::<Instance>();
};

#[test]
fn watch_outside_a_runtime_is_an_error() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("nort");
    let registry = rt.registry("default");
    let err = registry.watch(&service("echo")).unwrap_err();
    assert!(matches!(err, DiscoveryError::NoRuntime { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("tokio runtime") && text.contains("echo"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Scans
// ---------------------------------------------------------------------------

#[test]
fn instances_removes_the_sockets_of_dead_processes() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("stale");
    let registry = rt.registry("default");
    let echo = service("echo");

    // A crashed child: killed and reaped, its socket left behind.
    let mut crashed = Server::spawn(&rt.path, "default", "echo");
    crashed.kill();
    crashed.child.wait().unwrap();
    assert!(crashed.path.exists());
    // A socket named after a pid that no longer exists.
    let dir = registry.service_dir(&echo).unwrap();
    let orphan = dir.join(format!("{}-{}.sock", InstanceId::random(), dead_pid()));
    stale_socket(&orphan);
    // And a live one.
    let live = Server::spawn(&rt.path, "default", "echo");

    let found = registry.instances(&echo).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_is(&found[0], &live, &registry, "echo");
    assert!(!crashed.path.exists());
    assert!(!orphan.exists());
    assert!(live.path.exists());
}

#[test]
fn a_socket_older_than_the_process_holding_its_pid_is_stale() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("reuse");
    let registry = rt.registry("default");
    let echo = service("echo");
    let dir = registry.service_dir(&echo).unwrap();
    let me = std::process::id();

    // Our pid, but the socket predates us: its creator died and we reuse
    // the pid. It refuses connections, so it goes.
    let reused = dir.join(format!("{}-{me}.sock", InstanceId::random()));
    stale_socket(&reused);
    backdate(&reused, Duration::from_secs(3600));
    // Same age but someone does listen there (as after a clock step): kept.
    let id = InstanceId::random();
    let listening = UdsListener::bind(dir.join(format!("{id}-{me}.sock"))).unwrap();
    backdate(listening.path(), Duration::from_secs(3600));

    let found = registry.instances(&echo).unwrap();
    assert!(!reused.exists());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].id, found[0].pid), (id, me));
    assert!(listening.path().exists());
}

#[test]
fn remove_stale_deletes_a_socket_nobody_listens_on() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("rmstale");
    let registry = rt.registry("default");
    let echo = service("echo");
    // Our own (live) pid and a fresh socket that nobody listens on: it
    // looks alive to a scan until a client is refused and says so.
    let path = registry.socket_path(&echo, InstanceId::random()).unwrap();
    stale_socket(&path);
    let found = registry.instances(&echo).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    // Another test of this process may fork a child right after the
    // listener was made; until that child execs, it holds a copy of the
    // listening socket, which then looks live. Give it a moment.
    let mut removed = false;
    for _ in 0..50 {
        if registry.remove_stale(&found[0]).unwrap() {
            removed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(removed, "a socket nobody listens on was not removed");
    assert!(!path.exists());
    assert_eq!(registry.instances(&echo).unwrap(), []);

    // A live one is left alone.
    let listener =
        UdsListener::bind(registry.socket_path(&echo, InstanceId::random()).unwrap()).unwrap();
    let found = registry.instances(&echo).unwrap();
    assert!(!registry.remove_stale(&found[0]).unwrap());
    assert!(listener.path().exists());
}

#[test]
fn instances_ignores_files_that_are_not_instances() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("scanjunk");
    let registry = rt.registry("default");
    let echo = service("echo");
    assert_eq!(registry.instances(&echo).unwrap(), []);
    // Scanning does not create the directory.
    assert!(!registry.dir().join("echo").exists());
    let junk = make_junk(&registry.service_dir(&echo).unwrap());
    let server = Server::spawn(&rt.path, "default", "echo");
    let found = registry.instances(&echo).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_is(&found[0], &server, &registry, "echo");
    for path in &junk {
        assert!(
            fs::symlink_metadata(path).is_ok(),
            "{} was removed",
            path.display()
        );
    }
}

#[test]
fn services_lists_the_services_with_instances() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("svcs");
    let registry = rt.registry("default");
    let beta = Server::spawn(&rt.path, "default", "beta");
    let alpha1 = Server::spawn(&rt.path, "default", "alpha");
    let alpha2 = Server::spawn(&rt.path, "default", "alpha");
    // Another mesh in the same runtime dir is not listed.
    let _other = Server::spawn(&rt.path, "other", "gamma");
    // An empty service, and entries that are not services.
    registry.service_dir(&service("empty")).unwrap();
    fs::write(registry.dir().join("notes.txt"), b"x").unwrap();
    fs::create_dir(registry.dir().join(".hidden")).unwrap();
    fs::create_dir(registry.dir().join("bad name")).unwrap();

    let services = registry.services().unwrap();
    let names: Vec<&str> = services.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let mut alphas = [&alpha1, &alpha2];
    alphas.sort_by_key(|s| s.id());
    assert_eq!(services[0].1.len(), 2);
    for (instance, server) in services[0].1.iter().zip(alphas) {
        assert_is(instance, server, &registry, "alpha");
    }
    assert_eq!(services[1].1.len(), 1);
    assert_is(&services[1].1[0], &beta, &registry, "beta");

    let other = rt.registry("other");
    let listed = other.services().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "gamma");
}

#[test]
fn socket_paths_carry_the_id_and_our_pid() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("path");
    let registry = rt.registry("m1");
    assert_eq!(registry.mesh(), "m1");
    assert_eq!(registry.dir(), rt.path.join("m1"));
    let id = InstanceId::random();
    let path = registry.socket_path(&service("echo"), id).unwrap();
    assert_eq!(
        path,
        rt.path
            .join("m1/echo")
            .join(format!("{id}-{}.sock", std::process::id()))
    );
    let dir = fs::metadata(rt.path.join("m1/echo")).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);

    let long = ServiceName::new(&"s".repeat(100)).unwrap();
    let err = registry.socket_path(&long, id).unwrap_err();
    match &err {
        DiscoveryError::SocketPathTooLong { len, max, .. } => {
            assert!(len > max, "{err}");
            assert_eq!(*max, 107);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("107 bytes"), "{err}");
}

#[test]
fn a_runtime_dir_that_others_can_enter_is_refused() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("perm");
    let mesh_dir = rt.path.join("default");
    fs::create_dir(&mesh_dir).unwrap();
    fs::set_permissions(&mesh_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let err = LocalRegistry::new(rt.runtime.clone(), &MeshName::default()).unwrap_err();
    assert!(matches!(err, DiscoveryError::RuntimeDir(_)), "{err}");
    assert!(err.to_string().contains("0755"), "{err}");
}

// ---------------------------------------------------------------------------
// Host id
// ---------------------------------------------------------------------------

/// Runs the host-id role with `COMMY_HOST_ID` set to `value` (or unset);
/// returns what `host_id()` and the registry said.
fn child_host_id(rt: &TempRuntime, value: Option<&str>) -> (String, String) {
    let mut cmd = child_command("host-id");
    cmd.env(DIR, &rt.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    match value {
        Some(v) => cmd.env(HOST_ID_ENV, v),
        None => cmd.env_remove(HOST_ID_ENV),
    };
    let mut child = cmd.spawn().unwrap();
    let lines = line_reader(&mut child);
    let host = expect_line(&lines, "HOST ");
    let registry = expect_line(&lines, "REGISTRY ");
    assert!(child.wait().unwrap().success());
    (host, registry)
}

#[test]
fn host_id_can_be_overridden() {
    if as_child() {
        return;
    }
    let rt = TempRuntime::new("host");
    let (host, registry) = child_host_id(&rt, Some("test-host.b_2"));
    assert_eq!(
        (host.as_str(), registry.as_str()),
        ("test-host.b_2", "test-host.b_2")
    );

    let (machine, registry) = child_host_id(&rt, None);
    assert_eq!(machine, registry);
    assert_ne!(machine, "test-host.b_2");
    assert_eq!(child_host_id(&rt, None).0, machine, "host id is not stable");
    if let Ok(id) = fs::read_to_string("/etc/machine-id") {
        assert!(
            machine.starts_with(id.trim()),
            "{machine} vs machine-id {id}"
        );
    }
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert!(
        machine.ends_with(&boot.trim().replace('-', "")),
        "{machine}"
    );

    // An invalid or empty override is an error naming the variable.
    for bad in ["bad host!", ""] {
        let (host, _) = child_host_id(&rt, Some(bad));
        assert!(
            host.starts_with("error: $COMMY_HOST_ID is") && host.contains(&format!("{bad:?}")),
            "{host}"
        );
    }
}
