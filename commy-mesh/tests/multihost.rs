//! Two hosts: two network namespaces joined by a veth pair, made and torn
//! down here, each with its own host id. A service process in one, a client
//! process in the other, configured through the environment only
//! (`COMMY_LISTEN`, `COMMY_PEERS`, `COMMY_TLS_CA`, `COMMY_HOST_ID`); the
//! mesh picks TLS by itself. Killing the server gives `UNAVAILABLE`; when it
//! comes back, the same client recovers.
//!
//! Without the rights to make namespaces the same test runs on 127.0.0.x
//! with distinct host ids, and says so.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use commy_mesh::{Code, Mesh, Request, Response, Status};

mod support;

const ROLE: &str = "COMMY_MULTIHOST_TEST_ROLE";

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Plays this process's child role, if it is one: a test that needs a
/// child re-runs itself under its own name with the role set, and hands
/// the child over here first.
fn as_child() -> bool {
    support::play_role(role().is_some(), || {
        child_server();
        child_client();
    })
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces and a veth pair between them; removed on drop.
struct Hosts {
    ns: [String; 2],
}

const ADDR_A: &str = "10.231.0.1";
const ADDR_B: &str = "10.231.0.2";

impl Hosts {
    fn create() -> Result<Hosts, String> {
        let tag = std::process::id() % 100_000;
        let hosts = Hosts {
            ns: [format!("commy-a-{tag}"), format!("commy-b-{tag}")],
        };
        let (a, b) = (&hosts.ns[0], &hosts.ns[1]);
        let (va, vb) = (format!("cva{tag}"), format!("cvb{tag}"));
        run(&["netns", "add", a])?;
        run(&["netns", "add", b])?;
        run(&[
            "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
        ])?;
        run(&["-n", a, "addr", "add", &format!("{ADDR_A}/24"), "dev", &va])?;
        run(&["-n", b, "addr", "add", &format!("{ADDR_B}/24"), "dev", &vb])?;
        for (ns, dev) in [(a, &va), (b, &vb)] {
            run(&["-n", ns, "link", "set", dev, "up"])?;
            run(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            // Deleting a namespace deletes its end of the veth pair, and so both.
            let _ = run(&["netns", "del", ns]);
        }
    }
}

/// Where each side runs: in a namespace (`ip netns exec`) or on this host.
#[derive(Clone)]
struct Place {
    netns: Option<String>,
    addr: String,
}

/// A child process, killed when dropped, whose stdout lines arrive on a channel.
struct Proc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdin: ChildStdin,
}

impl Proc {
    /// Waits (at most a minute) for a line containing `marker`; returns
    /// the line from the marker on.
    fn expect(&self, marker: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("no line with {marker} from the child: {e}"));
            if let Some(i) = line.find(marker) {
                return line[i..].trim_end().to_owned();
            }
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn reader(out: ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn spawn(place: &Place, role: &str, envs: &[(&str, String)]) -> Proc {
    let exe = std::env::current_exe().unwrap();
    let entry = support::this_test();
    let mut cmd = match &place.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["--exact", &entry, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env_remove("COMMY_CONFIG")
        .env_remove("COMMY_TRANSPORT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let lines = reader(child.stdout.take().unwrap());
    let stdin = child.stdin.take().unwrap();
    Proc {
        child,
        lines,
        stdin,
    }
}

/// Child role: serve `echo` and `slow` with the settings from the environment.
fn child_server() {
    if role().as_deref() != Some("server") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mesh = Mesh::open(commy_mesh::Config::default()).await.unwrap();
        let _echo = mesh
            .serve("echo", |req: Request| async move {
                Ok::<_, Status>(Response::new(req.into_payload()))
            })
            .await
            .unwrap();
        println!("READY {}", mesh.tls_endpoint().unwrap());
        std::io::stdout().flush().unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

/// Child role: the client, driven by the parent through stdin.
fn child_client() {
    if role().as_deref() != Some("client") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mesh = Mesh::open(commy_mesh::Config::default()).await.unwrap();
        let call_until_ok = |what: &'static str| {
            let mesh = mesh.clone();
            async move {
                let end = Instant::now() + Duration::from_secs(30);
                loop {
                    match mesh.call("echo", what.as_bytes().to_vec()).await {
                        Ok(r) => return String::from_utf8(r.to_vec()).unwrap(),
                        Err(e) => {
                            assert!(Instant::now() < end, "no answer: {e}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        };
        let first = call_until_ok("hello").await;
        let hosts: Vec<String> = mesh
            .remote_instances(Duration::from_secs(5))
            .await
            .iter()
            .map(|i| format!("{}@{}", i.service, i.host))
            .collect();
        println!("OK {first} {}", hosts.join(","));
        std::io::stdout().flush().unwrap();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "killed");
        let e = mesh.call("echo", b"nobody".to_vec()).await.unwrap_err();
        println!("FAILED {}", e.code().as_str());
        std::io::stdout().flush().unwrap();
        line.clear();
        std::io::stdin().read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "restarted");
        let again = call_until_ok("again").await;
        println!("RECOVERED {again}");
        std::io::stdout().flush().unwrap();
    });
}

fn private_dir(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

#[test]
fn two_hosts_over_tls_unavailable_then_recovery() {
    if as_child() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("commy-multihost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // COMMY_MULTIHOST_NO_NETNS=1 takes the 127.0.0.x path on purpose.
    let hosts = match std::env::var_os("COMMY_MULTIHOST_NO_NETNS") {
        Some(_) => Err("COMMY_MULTIHOST_NO_NETNS is set".to_string()),
        None => Hosts::create(),
    };
    let (server_place, client_place, port) = match &hosts {
        Ok(h) => {
            eprintln!(
                "two hosts: network namespaces {} ({ADDR_A}) and {} ({ADDR_B})",
                h.ns[0], h.ns[1]
            );
            (
                Place {
                    netns: Some(h.ns[0].clone()),
                    addr: ADDR_A.into(),
                },
                Place {
                    netns: Some(h.ns[1].clone()),
                    addr: ADDR_B.into(),
                },
                7443,
            )
        }
        Err(e) => {
            eprintln!(
                "network namespaces unavailable ({e}): running on 127.0.0.2 (server) and \
                 127.0.0.1 (client) of this host with distinct host ids instead"
            );
            let port = std::net::TcpListener::bind("127.0.0.2:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            (
                Place {
                    netns: None,
                    addr: "127.0.0.2".into(),
                },
                Place {
                    netns: None,
                    addr: "127.0.0.1".into(),
                },
                port,
            )
        }
    };
    let server_env = vec![
        ("COMMY_HOST_ID", "host-a".to_string()),
        (
            "COMMY_LISTEN",
            format!("tls://{}:{port}", server_place.addr),
        ),
        (
            "COMMY_RUNTIME_DIR",
            private_dir(&dir, "a-rt").display().to_string(),
        ),
        ("XDG_CONFIG_HOME", dir.join("a").display().to_string()),
    ];
    let client_env = vec![
        ("COMMY_HOST_ID", "host-b".to_string()),
        ("COMMY_PEERS", format!("tls://{}:{port}", server_place.addr)),
        (
            "COMMY_TLS_CA",
            dir.join("a/commy/dev-ca/ca.pem").display().to_string(),
        ),
        (
            "COMMY_RUNTIME_DIR",
            private_dir(&dir, "b-rt").display().to_string(),
        ),
        ("XDG_CONFIG_HOME", dir.join("b").display().to_string()),
    ];
    let mut server = spawn(&server_place, "server", &server_env);
    let ready = server.expect("READY");
    assert_eq!(ready, format!("READY {}:{port}", server_place.addr));
    let mut client = spawn(&client_place, "client", &client_env);
    let ok = client.expect("OK ");
    assert_eq!(
        ok, "OK hello echo@host-a",
        "the client reached the server's host over TLS"
    );

    server.kill();
    client.say("killed");
    assert_eq!(
        client.expect("FAILED"),
        format!("FAILED {}", Code::Unavailable.as_str())
    );

    let mut server = spawn(&server_place, "server", &server_env);
    server.expect("READY");
    client.say("restarted");
    assert_eq!(client.expect("RECOVERED"), "RECOVERED again");
    assert!(client.child.wait().unwrap().success());
    server.kill();
    let _ = client_place;
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}
