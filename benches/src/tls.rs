//! The network transport: `mesh.call` over TLS between two processes,
//! beside what it is built from, measured the same way in the same run:
//!
//! - `tcp`: a raw tokio TCP echo (no TLS, no framing);
//! - `rustls`: a raw tokio-rustls echo (TLS 1.3, ring, same certificates);
//! - `net-tls`: commy-net's client and server (frames, streams, credit);
//! - `mesh-tls`: `mesh.call` to a service the mesh reaches through a TLS
//!   peer (the client has its own runtime dir, so `auto` picks TLS).
//!
//! Round trips time one request and its echo; the pipelined throughput
//! scenarios keep 256 calls in flight on the one connection.
//!
//! `setup` binds a TCP listener on 127.0.0.1 (port 0) and hands it to the
//! peer, which the raw echoes accept on; for commy-net and the mesh, which
//! bind their own, it closes it and passes its port instead. It also makes a CA and a leaf certificate in
//! `/tmp/commy-bench-tls-<pid of the measuring process>`, which both
//! processes load (so the user's dev CA is never touched).

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use commy_mesh::{Mesh, NetConfig, Status};
use commy_net::{Credentials, DevCa, Identity, LeafSpec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::mesh::{runtime, serve_echo_until_stopped};
use crate::pipeline::pipelined_echo;
use crate::scenario::{
    BenchError, ChildCtx, Endpoints, Fns, Measurement, Params, ParentCtx, io_err,
};

/// Calls in flight in the pipelined scenarios.
const PIPELINE: u64 = 256;

/// Raw TCP echo round trip.
pub(crate) const TCP_RT: Fns = Fns {
    setup,
    parent: |c| raw_parent(c, false),
    child: |c| raw_child(c, false),
};

/// Raw tokio-rustls echo round trip.
pub(crate) const RUSTLS_RT: Fns = Fns {
    setup,
    parent: |c| raw_parent(c, true),
    child: |c| raw_child(c, true),
};

/// commy-net client/server round trip.
pub(crate) const NET_RT: Fns = Fns {
    setup: setup_port,
    parent: |c| net_parent(c, false),
    child: net_child,
};

/// commy-net pipelined calls.
pub(crate) const NET_PIPELINED: Fns = Fns {
    setup: setup_port,
    parent: |c| net_parent(c, true),
    child: net_child,
};

/// `mesh.call` over TLS round trip.
pub(crate) const MESH_RT: Fns = Fns {
    setup: setup_port,
    parent: |c| mesh_parent(c, false),
    child: mesh_child,
};

/// `mesh.call` over TLS, pipelined.
pub(crate) const MESH_PIPELINED: Fns = Fns {
    setup: setup_port,
    parent: |c| mesh_parent(c, true),
    child: mesh_child,
};

fn pki_dir(measuring_pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("commy-bench-tls-{measuring_pid}"))
}

fn tls_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Protocol(format!("TLS setup: {e}"))
}

fn setup(_: &Params) -> Result<Endpoints, BenchError> {
    let dir = pki_dir(std::process::id());
    std::fs::create_dir_all(&dir).map_err(io_err("creating the bench PKI dir"))?;
    let ca = DevCa::load_or_create(&dir.join("ca")).map_err(tls_err)?;
    let spec = LeafSpec::new(Identity::new("bench", "echo").map_err(tls_err)?)
        .dns("localhost")
        .ip([127, 0, 0, 1].into());
    let (cert, key) = ca.issue(&spec).map_err(tls_err)?;
    commy_net::tls::write_pem_file(&dir.join("leaf.pem"), &cert).map_err(tls_err)?;
    commy_net::tls::write_pem_file(&dir.join("leaf.key"), &key).map_err(tls_err)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding 127.0.0.1:0"))?;
    let fd = OwnedFd::from(listener);
    let dup = fd.try_clone().map_err(io_err("dup"))?;
    Ok(Endpoints {
        parent: vec![dup],
        child: vec![fd],
    })
}

/// For commy-net and the mesh, which bind their own listener: a free port
/// (bound and closed here), written to `port` in the PKI dir for both sides.
fn setup_port(p: &Params) -> Result<Endpoints, BenchError> {
    let fds = setup(p)?;
    let [fd] = <[OwnedFd; 1]>::try_from(fds.parent)
        .map_err(|_| BenchError::Protocol("no listener".into()))?;
    let port = port_of(fd)?;
    drop(fds.child);
    std::fs::write(pki_dir(std::process::id()).join("port"), port.to_string())
        .map_err(io_err("writing the port"))?;
    Ok(Endpoints::default())
}

/// The port [`setup_port`] chose.
fn chosen_port(measuring_pid: u32) -> Result<u16, BenchError> {
    let text = std::fs::read_to_string(pki_dir(measuring_pid).join("port"))
        .map_err(io_err("reading the port"))?;
    text.trim()
        .parse()
        .map_err(|_| BenchError::Protocol(format!("bad port {text:?}")))
}

fn creds(measuring_pid: u32) -> Result<Credentials, BenchError> {
    let dir = pki_dir(measuring_pid);
    Credentials::from_pem_files(
        &dir.join("ca").join("ca.pem"),
        Some((&dir.join("leaf.pem"), &dir.join("leaf.key"))),
    )
    .map_err(tls_err)
}

fn port_of(fd: OwnedFd) -> Result<u16, BenchError> {
    let l = TcpListener::from(fd);
    Ok(l.local_addr().map_err(io_err("local_addr"))?.port())
}

fn net_err(what: &str) -> impl FnOnce(Status) -> BenchError + '_ {
    move |s| BenchError::Protocol(format!("{what}: {s}"))
}

// ---------------------------------------------------------------------------
// Raw echoes
// ---------------------------------------------------------------------------

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, size: usize) {
    let mut buf = vec![0u8; size];
    while s.read_exact(&mut buf).await.is_ok() {
        if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

fn raw_child(ctx: &mut ChildCtx<'_>, tls: bool) -> Result<(), BenchError> {
    let [fd] = ctx.take_fds()?;
    let size = ctx.params.size;
    let parent = std::os::unix::process::parent_id();
    let listener = TcpListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(io_err("set_nonblocking"))?;
    let acceptor = tls
        .then(|| creds(parent).and_then(|c| c.server_config(false).map_err(tls_err)))
        .transpose()?
        .map(tokio_rustls::TlsAcceptor::from);
    ctx.ready()?;
    runtime()?.block_on(async {
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io_err("tokio listener"))?;
        let (sock, _) = listener.accept().await.map_err(io_err("accept"))?;
        sock.set_nodelay(true).map_err(io_err("nodelay"))?;
        match acceptor {
            Some(a) => echo(a.accept(sock).await.map_err(io_err("TLS accept"))?, size).await,
            None => echo(sock, size).await,
        }
        Ok(())
    })
}

async fn time_echo<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    p: Params,
) -> Result<Vec<u64>, BenchError> {
    let mut msg = vec![0xA5u8; p.size];
    let mut back = vec![0u8; p.size];
    let stamp = 8.min(p.size);
    let mut samples = Vec::with_capacity(p.iterations as usize);
    for i in 0..p.warmup + p.iterations {
        msg[..stamp].copy_from_slice(&i.to_le_bytes()[..stamp]);
        let t = Instant::now();
        s.write_all(&msg).await.map_err(io_err("write"))?;
        s.flush().await.map_err(io_err("flush"))?;
        s.read_exact(&mut back).await.map_err(io_err("read"))?;
        let same = back == msg;
        let ns = t.elapsed().as_nanos() as u64;
        if !same {
            return Err(BenchError::Protocol(format!("echo {i} does not match")));
        }
        if i >= p.warmup {
            samples.push(ns);
        }
    }
    Ok(samples)
}

fn raw_parent(ctx: &mut ParentCtx<'_>, tls: bool) -> Result<Measurement, BenchError> {
    let [fd] = ctx.take_fds()?;
    let port = port_of(fd)?;
    let p = ctx.params;
    let connector = tls
        .then(|| creds(std::process::id()).and_then(|c| c.client_config().map_err(tls_err)))
        .transpose()?
        .map(tokio_rustls::TlsConnector::from);
    let samples = runtime()?.block_on(async {
        let sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(io_err("connect"))?;
        sock.set_nodelay(true).map_err(io_err("nodelay"))?;
        match connector {
            Some(c) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").map_err(tls_err)?;
                let s = c.connect(name, sock).await.map_err(io_err("TLS connect"))?;
                time_echo(s, p).await
            }
            None => time_echo(sock, p).await,
        }
    })?;
    let _ = std::fs::remove_dir_all(pki_dir(std::process::id()));
    Ok(Measurement::RoundTrip(samples))
}

// ---------------------------------------------------------------------------
// commy-net
// ---------------------------------------------------------------------------

fn net_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let parent = std::os::unix::process::parent_id();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], chosen_port(parent)?));
    let tls = creds(parent)?.server_config(false).map_err(tls_err)?;
    runtime()?.block_on(async {
        let stop = Arc::new(tokio::sync::Notify::new());
        let s = stop.clone();
        let handler: commy_net::Handler = Arc::new(move |req: commy_net::Inbound| {
            if req.payload.is_empty() {
                s.notify_one();
            }
            Box::pin(async move { Ok(commy_net::Reply::new(req.payload)) })
        });
        let server = commy_net::Server::bind(addr, tls, commy_net::Settings::default(), handler)
            .await
            .map_err(|e| BenchError::Protocol(e.to_string()))?;
        ctx.ready()?;
        stop.notified().await;
        server.shutdown().await;
        Ok(())
    })
}

fn net_parent(ctx: &mut ParentCtx<'_>, pipeline: bool) -> Result<Measurement, BenchError> {
    let port = chosen_port(std::process::id())?;
    let p = ctx.params;
    let tls = creds(std::process::id())?
        .client_config()
        .map_err(tls_err)?;
    let client = commy_net::Client::new("127.0.0.1", port, tls, commy_net::Settings::default())
        .map_err(|e| BenchError::Protocol(e.to_string()))?;
    let m = runtime()?.block_on(async {
        let result = if pipeline {
            let client = client.clone();
            pipelined_echo(p, PIPELINE, move |msg| {
                let client = client.clone();
                async move {
                    let r = client
                        .call(Bytes::new(), msg, None)
                        .await
                        .map_err(net_err("call"))?;
                    Ok(r.payload.len())
                }
            })
            .await?
        } else {
            let msg = Bytes::from(vec![0xA5u8; p.size]);
            let mut samples = Vec::with_capacity(p.iterations as usize);
            for i in 0..p.warmup + p.iterations {
                let t = Instant::now();
                let r = client
                    .call(Bytes::new(), msg.clone(), None)
                    .await
                    .map_err(net_err("call"))?;
                let same = r.payload == msg;
                let ns = t.elapsed().as_nanos() as u64;
                if !same {
                    return Err(BenchError::Protocol("echo does not match".into()));
                }
                if i >= p.warmup {
                    samples.push(ns);
                }
            }
            Measurement::RoundTrip(samples)
        };
        client
            .call(Bytes::new(), Bytes::new(), None)
            .await
            .map_err(net_err("stop"))?;
        Ok::<_, BenchError>(result)
    })?;
    let _ = std::fs::remove_dir_all(pki_dir(std::process::id()));
    Ok(m)
}

// ---------------------------------------------------------------------------
// The mesh over TLS
// ---------------------------------------------------------------------------

fn private_rt(measuring_pid: u32, side: &str) -> Result<PathBuf, BenchError> {
    use std::os::unix::fs::PermissionsExt;
    let d = pki_dir(measuring_pid).join(side);
    std::fs::create_dir_all(&d).map_err(io_err("creating a runtime dir"))?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod"))?;
    Ok(d)
}

fn net_config(measuring_pid: u32) -> NetConfig {
    let dir = pki_dir(measuring_pid);
    let mut net = NetConfig::default();
    net.tls_ca = Some(dir.join("ca").join("ca.pem"));
    net.tls_cert = Some(dir.join("leaf.pem"));
    net.tls_key = Some(dir.join("leaf.key"));
    net
}

fn mesh_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let parent = std::os::unix::process::parent_id();
    let port = chosen_port(parent)?;
    let rt_dir = private_rt(parent, "server-rt")?;
    runtime()?.block_on(async {
        let mesh = Mesh::builder()
            .runtime_dir(&rt_dir)
            .net(net_config(parent))
            .listen(&format!("tls://127.0.0.1:{port}"))
            .open()
            .await
            .map_err(|e| BenchError::Protocol(format!("opening the mesh: {e}")))?;
        serve_echo_until_stopped(mesh, ctx).await
    })
}

fn mesh_parent(ctx: &mut ParentCtx<'_>, pipeline: bool) -> Result<Measurement, BenchError> {
    let port = chosen_port(std::process::id())?;
    let p = ctx.params;
    let me = std::process::id();
    let rt_dir = private_rt(me, "client-rt")?;
    let m = runtime()?.block_on(async {
        let mut net = net_config(me);
        net.no_listen = true;
        let mesh = Mesh::builder()
            .runtime_dir(&rt_dir)
            .net(net)
            .peer(&format!("tls://127.0.0.1:{port}"))
            .open()
            .await
            .map_err(|e| BenchError::Protocol(format!("opening the mesh: {e}")))?;
        let result = if pipeline {
            let mesh = mesh.clone();
            pipelined_echo(p, PIPELINE, move |msg| {
                let mesh = mesh.clone();
                async move { Ok(mesh.call("echo", msg).await.map_err(net_err("call"))?.len()) }
            })
            .await?
        } else {
            let mut raw = vec![0xA5u8; p.size];
            let stamp = 8.min(p.size);
            let mut samples = Vec::with_capacity(p.iterations as usize);
            for i in 0..p.warmup + p.iterations {
                raw[..stamp].copy_from_slice(&i.to_le_bytes()[..stamp]);
                let payload = Bytes::copy_from_slice(&raw);
                let t = Instant::now();
                let r = mesh.call("echo", payload).await.map_err(net_err("call"))?;
                let same = r[..] == raw[..];
                let ns = t.elapsed().as_nanos() as u64;
                if !same {
                    return Err(BenchError::Protocol("mesh echo does not match".into()));
                }
                if i >= p.warmup {
                    samples.push(ns);
                }
            }
            Measurement::RoundTrip(samples)
        };
        mesh.call("stop", Bytes::new())
            .await
            .map_err(net_err("stop"))?;
        mesh.close().await;
        Ok::<_, BenchError>(result)
    })?;
    let _ = std::fs::remove_dir_all(pki_dir(me));
    Ok(m)
}
