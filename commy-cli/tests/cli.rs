//! The `commy` binary, run as a real process against a private runtime dir.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use commy_mesh::{Mesh, Request, Response, Status};

/// A private (0700) runtime dir, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(name: &str) -> PrivateDir {
        let d = std::env::temp_dir().join(format!("commy-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        PrivateDir(d)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `commy --runtime-dir <dir>` with `args`.
fn commy(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_commy"));
    c.arg("--runtime-dir").arg(dir).args(args);
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    commy(dir, args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `commy` child running in the background; SIGKILLed on drop if still
/// running.
struct Background {
    child: Child,
    /// Its stdout so far, when stdout is not the ready stream.
    stdout: Arc<Mutex<Vec<u8>>>,
    collector: Option<std::thread::JoinHandle<()>>,
}

/// Which stream announces that a background command is ready.
#[derive(Clone, Copy)]
enum ReadyOn {
    Stdout,
    Stderr,
}

impl Background {
    /// Starts `commy args` and returns it with the first line it prints on
    /// `ready` (waiting at most 20 s for it). The rest of the ready stream
    /// is discarded; stdout, if it is not the ready stream, is collected
    /// (see [`Background::stdout`]).
    fn start(dir: &Path, args: &[&str], ready: ReadyOn) -> (Background, String) {
        let mut child = commy(dir, args)
            .stdout(Stdio::piped())
            .stderr(match ready {
                ReadyOn::Stdout => Stdio::inherit(),
                ReadyOn::Stderr => Stdio::piped(),
            })
            .spawn()
            .unwrap();
        let stream: Box<dyn Read + Send> = match ready {
            ReadyOn::Stdout => Box::new(child.stdout.take().unwrap()),
            ReadyOn::Stderr => Box::new(child.stderr.take().unwrap()),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let collector = child.stdout.take().map(|mut out| {
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n @ 1..) = out.read(&mut buf) {
                    stdout.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("commy {args:?} printed nothing within 20 s");
            });
        let bg = Background {
            child,
            stdout,
            collector,
        };
        (bg, line.trim_end().to_owned())
    }

    /// Its stdout so far.
    fn stdout(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    fn signal_term(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Waits (at most 20 s) for the exit; returns the status and stdout
    /// (empty if stdout was the ready stream).
    fn wait(mut self) -> (ExitStatus, Vec<u8>) {
        let until = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < until, "commy did not exit within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(c) = self.collector.take() {
            c.join().unwrap();
        }
        (status, self.stdout())
    }

    /// Sends SIGTERM and waits for the exit.
    fn terminate(self) -> ExitStatus {
        self.signal_term();
        self.wait().0
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `commy echo-server NAME` child and the instance id it announced.
struct EchoServer {
    process: Background,
    instance: String,
}

impl EchoServer {
    /// Starts it and waits for its `serving NAME as <id>` line.
    fn start(dir: &Path, name: &str) -> EchoServer {
        let (process, line) = Background::start(dir, &["echo-server", name], ReadyOn::Stdout);
        let prefix = format!("serving {name} as ");
        let instance = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        assert_eq!(instance.len(), 32, "instance id {instance:?}");
        EchoServer { process, instance }
    }
}

/// Three `echo-server` processes restarted in turn (SIGTERM, then a new
/// one) while four client processes call them without pause: every call
/// of every client succeeds (a client exits non-zero at its first failed
/// call).
#[test]
fn a_rolling_restart_of_echo_servers_fails_no_call() {
    let dir = PrivateDir::new("rolling");
    let mut servers: Vec<EchoServer> = (0..3)
        .map(|_| EchoServer::start(dir.path(), "echo"))
        .collect();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            commy(
                dir.path(),
                &[
                    "bench",
                    "rtt",
                    "--service",
                    "echo",
                    "--warmup",
                    "10",
                    "--count",
                    "6000",
                    "--rate",
                    "2000",
                ],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let old = servers.remove(0);
        assert!(
            old.process.terminate().success(),
            "a server drained and exited 0"
        );
        servers.push(EchoServer::start(dir.path(), "echo"));
        std::thread::sleep(Duration::from_millis(200));
    }
    for client in clients {
        let o = client.wait_with_output().unwrap();
        assert!(o.status.success(), "a client's call failed: {}", stderr(&o));
        assert!(
            stdout(&o).contains("6000 sequential calls"),
            "{}",
            stdout(&o)
        );
    }
    for server in servers {
        assert!(server.process.terminate().success());
    }
}

#[test]
fn echo_server_is_listed_called_and_stops_on_sigterm() {
    let dir = PrivateDir::new("echo");
    let server = EchoServer::start(dir.path(), "echo");

    let o = run(dir.path(), &["call", "echo", "hello, mesh"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "hello, mesh\n");

    let o = run(dir.path(), &["call", "echo", "hi", "--hex"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "6869\n");

    // A reply that is not UTF-8 comes out raw, without a newline.
    let raw = [0xff, 0x80, 0xfe];
    let o = commy(dir.path(), &["call", "echo"])
        .arg(OsStr::from_bytes(&raw))
        .output()
        .unwrap();
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout, raw);

    let o = run(dir.path(), &["services"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["SERVICE", "INSTANCE", "PID", "ENDPOINT", "HOST"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row.len(), 5, "{text}");
    assert_eq!(row[0], "echo");
    assert_eq!(row[1], server.instance);
    assert_eq!(row[2], server.process.pid().to_string());
    let endpoint = format!(
        "shm://{}/default/echo/{}-",
        dir.path().display(),
        server.instance
    );
    assert!(row[3].starts_with(&endpoint), "{} vs {endpoint}", row[3]);
    assert!(!row[4].is_empty());
    // Columns are aligned: each cell of the row starts where its header does.
    for name in ["INSTANCE", "PID", "ENDPOINT", "HOST"] {
        let col = lines[0].find(name).unwrap();
        assert_eq!(lines[1].as_bytes()[col - 1], b' ', "{text}");
        assert_ne!(lines[1].as_bytes()[col], b' ', "{text}");
    }

    let o = run(dir.path(), &["services", "--json"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let json = stdout(&o);
    assert!(json.trim_start().starts_with('['), "{json}");
    assert!(json.trim_end().ends_with(']'), "{json}");
    assert!(json.contains("\"service\": \"echo\""), "{json}");
    assert!(
        json.contains(&format!("\"instance\": \"{}\"", server.instance)),
        "{json}"
    );
    assert!(
        json.contains(&format!("\"pid\": {}", server.process.pid())),
        "{json}"
    );

    // SIGTERM: a clean exit, and the instance is gone from the listing.
    let status = server.process.terminate();
    assert_eq!(status.code(), Some(0), "{status}");
    let o = run(dir.path(), &["services"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
}

#[test]
fn services_of_an_empty_mesh_print_the_header_only() {
    let dir = PrivateDir::new("empty");
    let o = run(dir.path(), &["services"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(
        stdout(&o).split_whitespace().collect::<Vec<_>>(),
        ["SERVICE", "INSTANCE", "PID", "ENDPOINT", "HOST"]
    );
    assert!(stderr(&o).contains("no live instance in mesh 'default'"));

    let o = run(dir.path(), &["services", "--json"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "[]\n");
}

#[test]
fn meshes_are_separate() {
    let dir = PrivateDir::new("meshes");
    let server = EchoServer::start(dir.path(), "echo");
    let o = run(dir.path(), &["--mesh", "other", "call", "echo", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("NOT_FOUND: no instance of service 'echo' in mesh 'other'"),
        "{}",
        stderr(&o)
    );
    let o = run(dir.path(), &["services", "--mesh", "other"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    drop(server);
}

#[test]
fn calling_an_unknown_service_fails_with_not_found() {
    let dir = PrivateDir::new("unknown");
    let o = run(dir.path(), &["call", "nobody-home", "x"]);
    assert_eq!(o.status.code(), Some(1), "stdout: {}", stdout(&o));
    assert!(o.stdout.is_empty());
    assert!(
        stderr(&o).starts_with("NOT_FOUND: no instance of service 'nobody-home'"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = PrivateDir::new("usage");
    for args in [
        &["call", "bad name", "x"][..],
        &["call", "echo"],
        &["call", "echo", "x", "--timeout-ms", "soon"],
        &["call", "echo", "x", "--timeout-ms", "0"],
        &["--mesh", "no/slash", "services"],
        &["bench", "rtt", "--count", "0"],
        &["frobnicate"],
    ] {
        let o = run(dir.path(), args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("error:"), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn an_unusable_runtime_dir_is_reported() {
    let dir = PrivateDir::new("perm");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = run(&open, &["services"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    assert!(stderr(&o).contains("0755"), "{}", stderr(&o));
    let o = run(&open, &["call", "echo", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: cannot open mesh 'default'"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_timeout_is_honoured() {
    let dir = PrivateDir::new("timeout");
    let mesh = Mesh::builder()
        .runtime_dir(dir.path())
        .open()
        .await
        .unwrap();
    let _never = mesh
        .serve("never", |_req: Request| async move {
            std::future::pending::<()>().await;
            Ok::<_, Status>(Response::default())
        })
        .await
        .unwrap();
    let path = dir.path().to_owned();
    let (o, elapsed) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let o = run(&path, &["call", "never", "x", "--timeout-ms", "300"]);
        (o, t.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(1), "stdout: {}", stdout(&o));
    assert!(
        stderr(&o).starts_with("DEADLINE_EXCEEDED: "),
        "{}",
        stderr(&o)
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    // The library's default timeout is 30 s: far more than this.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    mesh.close().await;
}

#[test]
fn every_command_has_help() {
    let dir = PrivateDir::new("help");
    for (args, usage) in [
        (&["--help"][..], "Usage: commy [OPTIONS] <COMMAND>"),
        (&["services", "--help"], "Usage: commy services"),
        (&["echo-server", "--help"], "Usage: commy echo-server"),
        (&["call", "--help"], "Usage: commy call"),
        (&["bench", "--help"], "Usage: commy bench"),
        (&["bench", "rtt", "--help"], "Usage: commy bench rtt"),
        (
            &["bench", "throughput", "--help"],
            "Usage: commy bench throughput",
        ),
        (&["pub", "--help"], "Usage: commy pub"),
        (&["sub", "--help"], "Usage: commy sub"),
    ] {
        let o = run(dir.path(), args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let text = stdout(&o);
        assert!(text.contains(usage), "{args:?}: {text}");
        assert!(text.contains("--runtime-dir"), "{args:?}: {text}");
        assert!(text.contains("--mesh"), "{args:?}: {text}");
    }
    let o = run(dir.path(), &["call", "--help"]);
    assert!(stdout(&o).contains("--timeout-ms"));
    assert!(stdout(&o).contains("--hex"));
}

#[test]
fn bench_rtt_prints_percentiles() {
    let dir = PrivateDir::new("rtt");
    let o = run(
        dir.path(),
        &[
            "bench", "rtt", "--count", "200", "--warmup", "10", "--size", "100",
        ],
    );
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("100-byte payload, 200 sequential calls"),
        "{text}"
    );
    for label in ["min", "p50", "p99", "p99.9", "max", "mean"] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(label))
            .unwrap_or_else(|| panic!("no {label} line in {text}"));
        assert!(
            ["ns", "µs", "ms", "s"].contains(&line.split_whitespace().last().unwrap()),
            "{line}"
        );
    }
    // The in-process service is gone once the bench ends.
    let o = run(dir.path(), &["services"]);
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
}

#[test]
fn bench_against_a_named_service() {
    let dir = PrivateDir::new("named");
    let server = EchoServer::start(dir.path(), "echo");
    let o = run(
        dir.path(),
        &[
            "bench",
            "throughput",
            "--count",
            "500",
            "--concurrency",
            "8",
            "--service",
            "echo",
        ],
    );
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("service 'echo', 64-byte payload, 500 calls over 8 tasks"),
        "{text}"
    );
    let rate: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("calls/s"))
        .unwrap_or_else(|| panic!("no calls/s in {text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(rate > 0.0, "{text}");

    let o = run(
        dir.path(),
        &["bench", "rtt", "--count", "5", "--service", "missing"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("NOT_FOUND: "), "{}", stderr(&o));
    drop(server);
}

#[test]
fn pub_without_subscribers() {
    let dir = PrivateDir::new("pub0");
    let o = run(dir.path(), &["pub", "news/today", "hello"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "published to 0 subscribers\n");

    let t = Instant::now();
    let o = run(
        dir.path(),
        &["pub", "news/today", "hello", "--wait-ms", "200"],
    );
    assert_eq!(o.status.code(), Some(1), "stdout: {}", stdout(&o));
    assert!(
        stderr(&o).starts_with("NOT_FOUND: no subscriber of topic 'news/today' in mesh 'default'"),
        "{}",
        stderr(&o)
    );
    assert!(t.elapsed() >= Duration::from_millis(200));

    let o = run(dir.path(), &["pub", "bad topic", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

fn subscribe(dir: &Path, args: &[&str]) -> Background {
    let (sub, line) = Background::start(dir, args, ReadyOn::Stderr);
    assert!(line.starts_with("subscribed to "), "{line:?}");
    sub
}

#[test]
fn sub_prints_what_pub_publishes() {
    let dir = PrivateDir::new("pubsub");
    let sub = subscribe(dir.path(), &["sub", "news/today", "--count", "3"]);
    let hex = subscribe(dir.path(), &["sub", "news/today", "--count", "1", "--hex"]);
    let o = run(dir.path(), &["pub", "news/today", "one"]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "published to 2 subscribers\n");
    // The hex subscriber has left after one message.
    let (status, out) = hex.wait();
    assert_eq!(status.code(), Some(0));
    assert_eq!(out, b"6f6e65\n");
    for msg in ["two", "three"] {
        let o = run(dir.path(), &["pub", "news/today", msg, "--wait-ms", "5000"]);
        assert!(o.status.success(), "stderr: {}", stderr(&o));
        assert_eq!(stdout(&o), "published to 1 subscriber\n");
    }
    let (status, out) = sub.wait();
    assert_eq!(status.code(), Some(0));
    // Each message came from its own publisher: no order between them.
    let text = String::from_utf8(out).unwrap();
    let mut got: Vec<&str> = text.lines().collect();
    got.sort_unstable();
    assert_eq!(got, ["one", "three", "two"]);
}

#[test]
fn queue_group_members_share_messages_and_stop_on_sigterm() {
    let dir = PrivateDir::new("group");
    let a = subscribe(dir.path(), &["sub", "jobs", "--group", "workers"]);
    let b = subscribe(dir.path(), &["sub", "jobs", "--group", "workers"]);
    // One delivery per group, whatever its size.
    for n in 0..4 {
        let o = run(dir.path(), &["pub", "jobs", &format!("job {n}")]);
        assert!(o.status.success(), "stderr: {}", stderr(&o));
        assert_eq!(stdout(&o), "published to 1 subscriber\n");
    }
    // SIGTERM ends a subscriber at once, so let them print everything first.
    let until = Instant::now() + Duration::from_secs(20);
    while a
        .stdout()
        .iter()
        .chain(&b.stdout())
        .filter(|&&c| c == b'\n')
        .count()
        < 4
    {
        assert!(Instant::now() < until, "the 4 jobs were not all printed");
        std::thread::sleep(Duration::from_millis(10));
    }
    a.signal_term();
    b.signal_term();
    let (sa, outa) = a.wait();
    let (sb, outb) = b.wait();
    assert_eq!((sa.code(), sb.code()), (Some(0), Some(0)));
    let both = String::from_utf8(outa).unwrap() + &String::from_utf8(outb).unwrap();
    let mut got: Vec<&str> = both.lines().collect();
    got.sort_unstable();
    assert_eq!(got, ["job 0", "job 1", "job 2", "job 3"]);
}
