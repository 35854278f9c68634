//! The `commy` binary over TLS: `cert init|issue`, an echo server with
//! production certificates (PEM files named in the environment), a remote
//! client that only has the CA (`services` lists the peer's instance with
//! its tls endpoint and host id; `call` goes over TLS), and config errors.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("commy-cli-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for sub in ["", "server-rt", "client-rt"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            std::fs::set_permissions(d.join(sub), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        Dir(d)
    }

    /// `commy` with the runtime dir `rt` ("server-rt" or "client-rt") below
    /// this dir and `home` below it as the config home.
    fn commy(&self, rt: &str) -> Command {
        commy(&self.0.join(rt), &self.0.join("home"))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn commy(rt: &Path, home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_commy"));
    c.arg("--runtime-dir").arg(rt);
    // Never the user's own dev CA or config file.
    c.env("XDG_CONFIG_HOME", home).env_remove("COMMY_CONFIG");
    for k in [
        "COMMY_LISTEN",
        "COMMY_PEERS",
        "COMMY_TLS_CA",
        "COMMY_TLS_CERT",
        "COMMY_TLS_KEY",
        "COMMY_TRANSPORT",
    ] {
        c.env_remove(k);
    }
    c
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `commy cert init DIR`.
fn cert_init(mut c: Command, dir: &Path) -> Output {
    c.args(["cert", "init"]).arg(dir).output().unwrap()
}

/// `commy cert issue --ca-dir CA --out OUT ARGS...`.
fn cert_issue(mut c: Command, ca: &Path, out: &Path, args: &[&str]) -> Output {
    c.args(["cert", "issue", "--ca-dir"])
        .arg(ca)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

/// The certificate and key that `cert issue --out STEM` wrote.
fn identity<'c>(c: &'c mut Command, stem: &Path) -> &'c mut Command {
    c.env("COMMY_TLS_CERT", stem.with_extension("pem"))
        .env("COMMY_TLS_KEY", stem.with_extension("key"))
}

/// A client of the TLS peer on `port` that trusts the CA in `ca_pem`.
fn tls_client(mut c: Command, port: u16, ca_pem: &Path) -> Command {
    c.env("COMMY_PEERS", format!("tls://127.0.0.1:{port}"))
        .env("COMMY_TLS_CA", ca_pem);
    c
}

fn first_line(r: impl std::io::Read) -> String {
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).unwrap();
    line
}

/// Starts `commy echo-server NAME` as `c` says, with its stdout piped, and
/// returns it with the first line it printed.
fn echo_server(mut c: Command, name: &str) -> (Killed, String) {
    let mut child = c
        .args(["echo-server", name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let line = first_line(stdout);
    (child, line)
}

/// Starts `commy echo-server NAME` as `c` says, with `c` set to listen
/// over TLS at port 0 (a port the system picks, so none is chosen here and
/// bound later, when a concurrent test's connection could have taken it).
/// Returns it, the first line it printed, and the address it listens on
/// with its port, read from the endpoint it prints on stderr (which is
/// drained from then on).
fn tls_echo_server(mut c: Command, name: &str) -> (Killed, String, String, u16) {
    c.stderr(Stdio::piped());
    let (mut server, first) = echo_server(c, name);
    let mut err = BufReader::new(server.0.stderr.take().unwrap());
    let mut line = String::new();
    let mut before = String::new();
    let (addr, port) = loop {
        before.push_str(&line);
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the server's stderr ended before it named its TLS endpoint:\n{before}"
        );
        if let Some(addr) = line.trim_end().strip_prefix("tls endpoint: tls://") {
            let port = addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
            break (addr.to_owned(), port.expect("the endpoint names a port"));
        }
    };
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (server, first, addr, port)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn certificates_echo_server_services_and_call_over_tls() {
    let d = Dir::new("e2e");
    let ca = d.0.join("ca");
    let out = ok(cert_init(d.commy("server-rt"), &ca));
    assert!(out.contains("created a CA"), "{out}");
    // A second init refuses to overwrite.
    let again = cert_init(d.commy("server-rt"), &ca);
    assert_eq!(again.status.code(), Some(1));
    let out = ok(cert_issue(
        d.commy("server-rt"),
        &ca,
        &d.0.join("server"),
        &[
            "--name",
            "spiffe://default/echo",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
    ));
    assert!(out.contains("issued spiffe://default/echo"), "{out}");
    let bad = cert_issue(
        d.commy("server-rt"),
        &ca,
        &d.0.join("x"),
        &["--name", "https://not-spiffe"],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("spiffe://"));

    let mut c = d.commy("server-rt");
    c.env("COMMY_LISTEN", "tls://127.0.0.1:0")
        .env("COMMY_TLS_CA", ca.join("ca.pem"))
        .env("COMMY_HOST_ID", "server-host");
    identity(&mut c, &d.0.join("server"));
    let (server, first, addr, port) = tls_echo_server(c, "echo");
    assert!(first.starts_with("serving echo as "), "{first}");
    assert_ne!(port, 0, "{addr}");
    assert_eq!(addr, format!("127.0.0.1:{port}"));

    // A client on "another host": its own runtime dir and host id, only the CA.
    let client = |args: &[&str]| {
        tls_client(d.commy("client-rt"), port, &ca.join("ca.pem"))
            .args(args)
            .env("COMMY_HOST_ID", "client-host")
            .output()
            .unwrap()
    };
    let table = ok(client(&["services"]));
    let row = table
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("echo not listed:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[3], format!("tls://127.0.0.1:{port}"), "{table}");
    assert_eq!(cells[4], "server-host", "{table}");
    assert_eq!(cells[2], server.0.id().to_string(), "{table}");
    let json = ok(client(&["services", "--json"]));
    assert!(
        json.contains(&format!("\"endpoint\": \"tls://127.0.0.1:{port}\"")),
        "{json}"
    );
    assert_eq!(ok(client(&["call", "echo", "over tls"])), "over tls\n");
    let missing = client(&["call", "nobody", "x"]);
    assert_eq!(missing.status.code(), Some(1));
    let why = String::from_utf8_lossy(&missing.stderr);
    assert!(why.starts_with("NOT_FOUND"), "{why}");
    // Another host id in the server's own runtime dir is another host all
    // the same: the server's socket is not listed or reached there, only
    // its TLS endpoint; with no peer, nothing at all.
    let beside = |args: &[&str], peer: bool| {
        let mut c = d.commy("server-rt");
        c.env("COMMY_HOST_ID", "client-host");
        if peer {
            c = tls_client(c, port, &ca.join("ca.pem"));
        }
        c.args(args).output().unwrap()
    };
    let table = ok(beside(&["services"], true));
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("echo ")).collect();
    assert_eq!(rows.len(), 1, "{table}");
    assert!(
        rows[0].contains(&format!(" tls://127.0.0.1:{port} ")),
        "{table}"
    );
    assert!(rows[0].ends_with(" server-host"), "{table}");
    assert_eq!(ok(beside(&["call", "echo", "beside"], true)), "beside\n");
    assert_eq!(ok(beside(&["services", "--json"], false)), "[]\n");
    let alone = beside(&["call", "echo", "x"], false);
    let why = String::from_utf8_lossy(&alone.stderr);
    assert!(why.starts_with("NOT_FOUND"), "{why}");
    // A client trusting another CA refuses the server.
    let other = d.0.join("other-ca");
    ok(cert_init(d.commy("client-rt"), &other));
    let refused = tls_client(d.commy("client-rt"), port, &other.join("ca.pem"))
        .args(["call", "echo", "x", "--timeout-ms", "3000"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    drop(server);

    // mTLS required: a client with only the CA is refused, one with a
    // certificate from the CA is served.
    ok(cert_issue(
        d.commy("client-rt"),
        &ca,
        &d.0.join("client"),
        &["--name", "spiffe://default/caller"],
    ));
    let mut c = d.commy("server-rt");
    c.env("COMMY_LISTEN", "tls://127.0.0.1:0")
        .env("COMMY_TLS_CA", ca.join("ca.pem"))
        .env("COMMY_REQUIRE_CLIENT_CERT", "1");
    identity(&mut c, &d.0.join("server"));
    let (_strict, _, _, port) = tls_echo_server(c, "strict");
    let anonymous = tls_client(d.commy("client-rt"), port, &ca.join("ca.pem"))
        .args(["call", "strict", "x", "--timeout-ms", "3000"])
        .output()
        .unwrap();
    assert_eq!(anonymous.status.code(), Some(1));
    let mut c = tls_client(d.commy("client-rt"), port, &ca.join("ca.pem"));
    identity(&mut c, &d.0.join("client"));
    let with_cert = c
        .args(["call", "strict", "with a certificate"])
        .output()
        .unwrap();
    assert_eq!(ok(with_cert), "with a certificate\n");
}

#[test]
fn config_file_errors_name_the_file_and_settings_are_used() {
    let d = Dir::new("config");
    let home = d.0.join("home");
    let file = d.0.join("commy.toml");
    std::fs::write(&file, "listen = \"tls://127.0.0.1:1\"\npeeers = []\n").unwrap();
    let o = d
        .commy("client-rt")
        .args(["call", "echo", "x"])
        .env("COMMY_CONFIG", &file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("commy.toml") && err.contains("peeers"),
        "{err}"
    );
    // A bad value in the environment is named too.
    let o = d
        .commy("client-rt")
        .args(["call", "echo", "x"])
        .env("COMMY_PEERS", "http://example.invalid:1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("COMMY_PEERS"));
    // Misconfigured values are refused at open, each named.
    for (var, value, named) in [
        ("COMMY_PEERS", ",,", "$COMMY_PEERS"),
        ("COMMY_HOST_ID", "bad host!", "$COMMY_HOST_ID"),
        ("COMMY_HOST_ID", "", "$COMMY_HOST_ID"),
        ("COMMY_MAX_CONCURRENCY", "0", "max_concurrency"),
        ("COMMY_DEFAULT_TIMEOUT", "soon", "$COMMY_DEFAULT_TIMEOUT"),
    ] {
        let o = d
            .commy("client-rt")
            .args(["call", "echo", "x"])
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{var}={value:?}: {err}");
        assert!(err.contains(named), "{var}={value:?}: {err}");
    }
    // An empty runtime dir override (no --runtime-dir) is named too.
    let o = Command::new(env!("CARGO_BIN_EXE_commy"))
        .args(["call", "echo", "x"])
        .env("XDG_CONFIG_HOME", &home)
        .env("COMMY_RUNTIME_DIR", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("$COMMY_RUNTIME_DIR is set but empty"), "{err}");
    // A config file with a listen address and no CA configured: the dev CA
    // is created in the user's config dir, and the server listens.
    std::fs::write(
        &file,
        "listen = \"tls://127.0.0.1:0\"\ntransport = \"auto\"\n",
    )
    .unwrap();
    let mut c = d.commy("server-rt");
    c.env("COMMY_CONFIG", &file);
    let (server, line, _, port) = tls_echo_server(c, "echo");
    assert!(line.starts_with("serving echo"), "{line}");
    assert!(home.join("commy/dev-ca/ca.pem").is_file());
    assert!(home.join("commy/dev-ca/ca.key").is_file());
    // Zero config for the same user: the dev CA is shared.
    let o = d
        .commy("client-rt")
        .args(["call", "echo", "same user"])
        .env("COMMY_PEERS", format!("tls://localhost:{port}"))
        .env("COMMY_TRANSPORT", "tls")
        .output()
        .unwrap();
    assert_eq!(ok(o), "same user\n");
    std::thread::sleep(Duration::from_millis(10));
    drop(server);
}

#[test]
fn an_echo_server_with_connected_peers_stops_promptly_on_sigterm() {
    let d = Dir::new("drain");
    let home = d.0.join("home");
    let mut c = d.commy("server-rt");
    c.env("COMMY_LISTEN", "tls://127.0.0.1:0");
    let (mut server, line, _, port) = tls_echo_server(c, "echo");
    assert!(line.starts_with("serving echo"), "{line}");
    // A peer that stays connected (its listing request waits at the server).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mesh = rt.block_on(async {
        let mut net = commy_mesh::NetConfig::default();
        net.tls_ca = Some(home.join("commy/dev-ca/ca.pem"));
        net.no_listen = true;
        let mesh = commy_mesh::Mesh::builder()
            .runtime_dir(d.0.join("client-rt"))
            .net(net)
            .peer(&format!("tls://127.0.0.1:{port}"))
            .open()
            .await
            .unwrap();
        assert_eq!(&mesh.call("echo", b"hi".to_vec()).await.unwrap()[..], b"hi");
        mesh
    });
    let started = std::time::Instant::now();
    let pid = rustix::process::Pid::from_raw(server.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the drain waited {:?} for the peer's long poll",
        started.elapsed()
    );
    rt.block_on(mesh.close());
}

/// A refused connection writes one log line on the server's stderr naming
/// its reason, as text by default and as JSON with `--log-format json`;
/// a flood of them writes a burst of 10 lines; `COMMY_LOG=off` silences
/// them.
#[test]
fn a_refused_connection_is_logged_with_its_reason() {
    use std::io::Write;
    let d = Dir::new("log");
    for (format, log) in [("text", None), ("json", None), ("text", Some("off"))] {
        let mut c = d.commy("server-rt");
        c.args(["--log-format", format])
            .env("COMMY_LISTEN", "tls://127.0.0.1:0")
            .env_remove("RUST_LOG");
        match log {
            Some(spec) => c.env("COMMY_LOG", spec),
            None => c.env_remove("COMMY_LOG"),
        };
        c.stderr(Stdio::piped());
        let (mut server, _) = echo_server(c, "echo");
        let mut err = BufReader::new(server.0.stderr.take().unwrap());
        let mut line = String::new();
        let port: u16 = loop {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "stderr ended");
            if let Some(addr) = line.trim_end().strip_prefix("tls endpoint: tls://") {
                break addr.rsplit_once(':').unwrap().1.parse().unwrap();
            }
        };
        // Not TLS at all: refused. The text run floods: 30 of them.
        let n = if format == "text" && log.is_none() {
            30
        } else {
            1
        };
        for _ in 0..n {
            let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut tcp, &mut sink);
        }
        // A graceful stop waits for the connections the server took, the
        // refused one included: what it logged is all on its stderr then.
        let pid = rustix::process::Pid::from_raw(server.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        assert!(server.0.wait().unwrap().success());
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        let refused: Vec<&str> = rest.lines().filter(|l| l.contains("refused")).collect();
        match (format, log) {
            (_, Some(_)) => assert!(refused.is_empty(), "{rest}"),
            ("json", _) => {
                assert_eq!(refused.len(), 1, "{rest}");
                assert!(
                    refused[0].starts_with('{') && refused[0].contains("\"level\":\"WARN\""),
                    "{rest}"
                );
                assert!(refused[0].contains("not_tls"), "{rest}");
            }
            _ => {
                // A flood writes a burst of lines, not one a connection.
                assert_eq!(refused.len(), 10, "{rest}");
                assert!(
                    refused[0].contains("WARN") && refused[0].contains("not_tls"),
                    "{rest}"
                );
            }
        }
    }
}
