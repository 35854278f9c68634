//! Two hosts: two network namespaces joined by a veth pair, made and torn
//! down here, each with its own host id. A service process in one, a client
//! process in the other, configured through the environment only
//! (`COMMY_LISTEN`, `COMMY_PEERS`, `COMMY_TLS_CA`, `COMMY_HOST_ID`); the
//! mesh picks TLS by itself. Killing the server gives `UNAVAILABLE`; when it
//! comes back, the same client recovers.
//!
//! A second pair: a subscriber that does not listen subscribes over its
//! own connection, and gets what a publisher on the other host publishes.
//!
//! Without the rights to make namespaces the same tests run on 127.0.0.x
//! with distinct host ids, and say so.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use commy_mesh::pubsub::{SlowSubscriber, SubscribeOptions};
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
        child_publisher();
        child_subscriber();
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
    /// Namespaces named after this process and `test` (a letter per test:
    /// the tests of this process may run at once).
    fn create(test: char) -> Result<Hosts, String> {
        let tag = format!("{}{test}", std::process::id() % 100_000);
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

/// Two hosts (namespaces), or two addresses of this host when namespaces
/// cannot be made; the server's place, the client's, and the port the
/// server listens on.
fn two_places(test: char) -> (Result<Hosts, String>, Place, Place, u16) {
    // COMMY_MULTIHOST_NO_NETNS=1 takes the 127.0.0.x path on purpose.
    let hosts = match std::env::var_os("COMMY_MULTIHOST_NO_NETNS") {
        Some(_) => Err("COMMY_MULTIHOST_NO_NETNS is set".to_string()),
        None => Hosts::create(test),
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
    (hosts, server_place, client_place, port)
}

/// The environments of a server on host-a listening at `place:port` and
/// of a client on host-b that knows it as its peer, under `dir`.
fn two_envs(dir: &Path, place: &Place, port: u16) -> [Vec<(&'static str, String)>; 2] {
    let server = vec![
        ("COMMY_HOST_ID", "host-a".to_string()),
        ("COMMY_LISTEN", format!("tls://{}:{port}", place.addr)),
        (
            "COMMY_RUNTIME_DIR",
            private_dir(dir, "a-rt").display().to_string(),
        ),
        ("XDG_CONFIG_HOME", dir.join("a").display().to_string()),
    ];
    let client = vec![
        ("COMMY_HOST_ID", "host-b".to_string()),
        ("COMMY_PEERS", format!("tls://{}:{port}", place.addr)),
        (
            "COMMY_TLS_CA",
            dir.join("a/commy/dev-ca/ca.pem").display().to_string(),
        ),
        (
            "COMMY_RUNTIME_DIR",
            private_dir(dir, "b-rt").display().to_string(),
        ),
        ("XDG_CONFIG_HOME", dir.join("b").display().to_string()),
    ];
    [server, client]
}

/// A line from stdin (blocking, off the runtime's workers); `None` at EOF.
async fn read_line() -> Option<String> {
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim().to_owned()),
        }
    })
    .await
    .unwrap()
}

fn say(line: String) {
    println!("{line}");
    std::io::stdout().flush().unwrap();
}

/// Child role: a listening process that publishes as stdin says:
/// `wait TOPIC` publishes `probe` until someone gets it; `pub TOPIC N`
/// publishes `0` .. `N-1`; `gone TOPIC` publishes `probe` until nobody
/// gets it.
fn child_publisher() {
    if role().as_deref() != Some("publisher") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mesh = Mesh::open(commy_mesh::Config::default()).await.unwrap();
        say(format!("READY {}", mesh.tls_endpoint().unwrap()));
        while let Some(line) = read_line().await {
            let words: Vec<&str> = line.split(' ').collect();
            let topic = words[1];
            let probe_until = |reached: fn(usize) -> bool| {
                let mesh = mesh.clone();
                async move {
                    let end = Instant::now() + Duration::from_secs(30);
                    loop {
                        let n = mesh.publish(topic, &b"probe"[..]).await.unwrap();
                        if reached(n) {
                            return n;
                        }
                        assert!(Instant::now() < end, "{n} subscribers of {topic} still");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            };
            match words[0] {
                "wait" => say(format!("SUBS {}", probe_until(|n| n > 0).await)),
                "gone" => say(format!("GONE {}", probe_until(|n| n == 0).await)),
                "pub" => {
                    let count: usize = words[2].parse().unwrap();
                    let started = Instant::now();
                    for i in 0..count {
                        mesh.publish(topic, i.to_string().into_bytes())
                            .await
                            .unwrap();
                    }
                    say(format!("PUBLISHED in {} ms", started.elapsed().as_millis()));
                }
                other => panic!("unknown command {other}"),
            }
        }
    });
}

/// Child role: a process that does not listen, subscribed to `news` (the
/// policy and queue length in SUB_POLICY and SUB_QUEUE, if set) and, as a
/// member of queue group `workers`, to `jobs`; prints each message but
/// the probes.
fn child_subscriber() {
    if role().as_deref() != Some("subscriber") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mesh = Mesh::open(commy_mesh::Config::default()).await.unwrap();
        assert!(
            mesh.tls_endpoint().is_none(),
            "the subscriber does not listen"
        );
        let mut options = SubscribeOptions::default();
        if let Ok(p) = std::env::var("SUB_POLICY") {
            options = options.policy(SlowSubscriber::from_name(&p).unwrap());
        }
        if let Ok(q) = std::env::var("SUB_QUEUE") {
            options = options.queue(q.parse().unwrap());
        }
        let mut news = mesh.subscribe_with("news", None, options).await.unwrap();
        let mut jobs = mesh.subscribe_group("jobs", "workers").await.unwrap();
        say(format!("SUBSCRIBED {}", std::process::id()));
        loop {
            let m = tokio::select! {
                m = news.next() => m,
                m = jobs.next() => m,
            };
            let m = m.expect("the subscriptions last");
            if &m.payload()[..] != b"probe" {
                let text = String::from_utf8_lossy(m.payload()).into_owned();
                say(format!("MSG {} {text}", m.topic()));
            }
        }
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
    let (hosts, server_place, client_place, port) = two_places('c');
    let [server_env, client_env] = two_envs(&dir, &server_place, port);
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

/// A process that does not listen, on another host, subscribes over its
/// own connection (a plain subscriber and a queue group member) and gets
/// every message a publisher on the other host publishes, in order.
/// Killed, its subscriptions are gone; stopped under DropOldest, the
/// publisher never waits and the subscriber, resumed, gets the newest
/// messages in order.
#[test]
fn a_subscriber_that_only_connects_gets_every_message_across_hosts() {
    use rustix::process::{Pid, Signal, kill_process};
    if as_child() {
        return;
    }
    // Short: subscription socket paths under it are long.
    let dir = std::env::temp_dir().join(format!("cmhs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (hosts, server_place, client_place, port) = two_places('s');
    let [server_env, client_env] = two_envs(&dir, &server_place, port);
    let mut publisher = spawn(&server_place, "publisher", &server_env);
    publisher.expect("READY");
    let subscriber = spawn(&client_place, "subscriber", &client_env);
    subscriber.expect("SUBSCRIBED");
    publisher.say("wait news");
    publisher.expect("SUBS");
    publisher.say("wait jobs");
    publisher.expect("SUBS");
    publisher.say("pub news 500");
    publisher.expect("PUBLISHED");
    publisher.say("pub jobs 200");
    publisher.expect("PUBLISHED");
    let (mut news, mut jobs) = (0, 0);
    while news < 500 || jobs < 200 {
        let line = subscriber.expect("MSG ");
        let mut words = line.split(' ').skip(1);
        let (topic, n) = (words.next().unwrap(), words.next().unwrap());
        let next = if topic == "news" {
            &mut news
        } else {
            &mut jobs
        };
        assert_eq!(n, next.to_string(), "{topic}: out of order or lost");
        *next += 1;
    }

    // Killed: both subscriptions are gone from the publisher's host.
    drop(subscriber);
    publisher.say("gone news");
    publisher.expect("GONE");
    publisher.say("gone jobs");
    publisher.expect("GONE");

    // Stopped, with DropOldest and a queue of 16.
    let mut env = client_env.clone();
    env.push(("SUB_POLICY", "drop-oldest".into()));
    env.push(("SUB_QUEUE", "16".into()));
    let slow = spawn(&client_place, "subscriber", &env);
    let pid: i32 = slow
        .expect("SUBSCRIBED")
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let pid = Pid::from_raw(pid).unwrap();
    publisher.say("wait news");
    publisher.expect("SUBS");
    kill_process(pid, Signal::STOP).unwrap();
    publisher.say("pub news 3000");
    let published = publisher.expect("PUBLISHED");
    kill_process(pid, Signal::CONT).unwrap();
    let mut got = Vec::new();
    loop {
        let line = slow.expect("MSG news ");
        let n: usize = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            got.last().is_none_or(|last| *last < n),
            "out of order: {n} after {got:?}"
        );
        got.push(n);
        if n == 2999 {
            break;
        }
    }
    assert!(got.len() < 3000, "nothing was dropped");
    eprintln!(
        "stopped subscriber: {published}, then got {} of 3000",
        got.len()
    );
    drop(slow);
    drop(publisher);
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
}
