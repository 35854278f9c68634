//! What several test binaries share: a runtime, meshes in a private
//! runtime dir, the usual test services. Each binary uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use commy_mesh::{Mesh, MeshBuilder, NetConfig, Request, Response, Status, TransportPreference};

/// A runtime of two workers, as the tests' meshes run on.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A mesh in the runtime dir `dir`, shared memory only, listening for
/// nothing whatever the environment says.
pub(crate) fn builder(dir: &Path) -> MeshBuilder {
    let mut net = NetConfig::default();
    net.no_listen = true;
    net.transport = Some(TransportPreference::Shm);
    Mesh::builder().runtime_dir(dir).net(net)
}

/// A fresh private (0700) runtime dir for the test `name`.
pub(crate) fn private_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("commy-mesh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// `<dir>/<name>`, a fresh private (0700) runtime dir of its own: a mesh
/// there sees no instance of the others over shared memory.
pub(crate) fn own_runtime_dir(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o700)).unwrap();
    own
}

pub(crate) async fn open(dir: &Path) -> Mesh {
    Mesh::builder().runtime_dir(dir).open().await.unwrap()
}

/// [`open`], with a concurrency bound of `bound` per service.
pub(crate) async fn open_bounded(dir: &Path, bound: usize) -> Mesh {
    Mesh::builder()
        .runtime_dir(dir)
        .max_concurrency(bound)
        .open()
        .await
        .unwrap()
}

/// The services most tests call: `echo`, `pid` (the serving process's
/// id), `slow` (sleeps the u64 ms of its payload), `fail` (panics, or
/// answers PERMISSION_DENIED, as its payload says).
pub(crate) async fn serve_test_services(mesh: &Mesh) -> Vec<commy_mesh::ServiceHandle> {
    let echo = mesh
        .serve("echo", |req: Request| async move {
            Ok::<_, Status>(Response::new(req.into_payload()))
        })
        .await
        .unwrap();
    let pid = mesh
        .serve("pid", |_req: Request| async move {
            Ok::<_, Status>(Response::new(std::process::id().to_le_bytes().to_vec()))
        })
        .await
        .unwrap();
    let slow = mesh
        .serve("slow", |req: Request| async move {
            let ms = u64::from_le_bytes(req.payload()[..8].try_into().unwrap_or([0; 8]));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Status>(Response::new(req.into_payload()))
        })
        .await
        .unwrap();
    let fail = mesh
        .serve("fail", |req: Request| async move {
            match &req.payload()[..] {
                b"panic" => panic!("handler panics on purpose"),
                b"denied" => Err(Status::permission_denied("not for you")),
                _ => Ok(Response::new(&b"fine"[..])),
            }
        })
        .await
        .unwrap();
    vec![echo, pid, slow, fail]
}

/// Environment variables that make a test binary's re-run a child role:
/// which role, its runtime dir (or other path), and an argument.
pub(crate) const ROLE: &str = "COMMY_MESH_TEST_ROLE";
pub(crate) const DIR: &str = "COMMY_MESH_TEST_DIR";
pub(crate) const ARG: &str = "COMMY_MESH_TEST_ARG";

/// The child role this process plays, if it is one.
pub(crate) fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// The name of the test running on this thread (libtest names each test's
/// thread after it).
pub(crate) fn this_test() -> String {
    std::thread::current()
        .name()
        .expect("a test runs on a thread named after it")
        .to_owned()
}

/// Re-runs this test binary as the child role `role`, with `dir` and
/// `arg`: filtered to the calling test, whose first line hands the process
/// to its role ([`run_child`]). Its stdin and stdout are piped.
pub(crate) fn spawn_role(role: &str, dir: &Path, arg: &str) -> std::process::Child {
    spawn_role_with(role, dir, arg, &[])
}

/// [`spawn_role`] with more environment variables (`env`). A config file
/// named by the test's own environment is not passed on.
pub(crate) fn spawn_role_with(
    role: &str,
    dir: &Path,
    arg: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> std::process::Child {
    use std::process::{Command, Stdio};
    assert!(self::role().is_none(), "a child role spawns no children");
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &this_test(), "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(ARG, arg)
        .envs(env.iter().copied())
        .env_remove("COMMY_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Plays this process's child role, if it is one, and says so: the first
/// line of every test that spawns children (the child re-runs that test).
/// `roles` runs each role function, which returns at once unless it is
/// this process's; it runs on a thread of its own, outside the test's
/// runtime, and its panic fails the child.
pub(crate) fn run_child(roles: impl FnOnce() + Send + 'static) -> bool {
    play_role(role().is_some(), roles)
}

/// [`run_child`] for test files with role variables of their own: plays
/// `roles` if `is_child`, and says whether it did.
pub(crate) fn play_role(is_child: bool, roles: impl FnOnce() + Send + 'static) -> bool {
    if !is_child {
        return false;
    }
    if std::thread::spawn(roles).join().is_err() {
        panic!("the child role failed");
    }
    true
}

/// The end of a serving child role: says READY on stdout, then waits
/// until the test closes the child's stdin (or dies).
pub(crate) async fn ready_until_stdin_closes() {
    use std::io::Write;
    println!("READY");
    std::io::stdout().flush().unwrap();
    tokio::task::spawn_blocking(|| std::io::stdin().lines().count())
        .await
        .unwrap();
}

/// The dev CA's certificate, and a server certificate and key for
/// 127.0.0.1, written under `dir`.
pub(crate) fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_dir = dir.join("ca");
    commy_net::DevCa::create(&ca_dir).unwrap();
    let ca = commy_net::DevCa::load(&ca_dir).unwrap();
    let id = commy_net::Identity::new("default", "echo").unwrap();
    let spec = commy_net::LeafSpec::new(id).ip("127.0.0.1".parse().unwrap());
    let (cert, key) = ca.issue(&spec).unwrap();
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    commy_net::tls::write_pem_file(&cert_path, &cert).unwrap();
    commy_net::tls::write_pem_file(&key_path, &key).unwrap();
    (ca_dir.join("ca.pem"), cert_path, key_path)
}

/// The dev CA's certificate and a server's certificate and key
/// ([`certificates`]).
pub(crate) type Certificates = (PathBuf, PathBuf, PathBuf);

/// A mesh handle listening over TLS on 127.0.0.1 (any port) with the
/// server certificate of `certs`, in a runtime dir of its own, `<dir>/<name>`
/// (so it is reached over TLS only).
pub(crate) async fn tls_server(dir: &Path, name: &str, certs: &Certificates) -> Mesh {
    let (ca, cert, key) = certs;
    let mut net = NetConfig::default();
    net.tls_ca = Some(ca.clone());
    net.tls_cert = Some(cert.clone());
    net.tls_key = Some(key.clone());
    Mesh::builder()
        .runtime_dir(own_runtime_dir(dir, name))
        .net(net)
        .listen("tls://127.0.0.1:0")
        .open()
        .await
        .unwrap()
}

/// A mesh handle that listens for nothing and has `servers` as its TLS
/// peers, in a runtime dir of its own, `<dir>/<name>`.
pub(crate) async fn tls_client(
    dir: &Path,
    name: &str,
    certs: &Certificates,
    servers: &[&Mesh],
) -> Mesh {
    let mut net = NetConfig::default();
    net.tls_ca = Some(certs.0.clone());
    net.no_listen = true;
    let mut client = Mesh::builder()
        .runtime_dir(own_runtime_dir(dir, name))
        .net(net);
    for s in servers {
        let port = s.tls_endpoint().expect("listening").port();
        client = client.peer(&format!("tls://127.0.0.1:{port}"));
    }
    client.open().await.unwrap()
}
