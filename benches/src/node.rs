//! Node-to-Node scenarios: the Node SDK (`@commy/node`) against a Node
//! `net` Unix-socket echo, measured by the same client code
//! (`commy-node/bench/bench.js`, which documents both sides).
//!
//! The peer process starts `node bench.js serve ...` and says ready once the
//! Node server does; the measuring process runs `node bench.js rt|tp ...`,
//! which prints its samples (or its count and elapsed time) as JSON. Both
//! Node processes run **unpinned** (on every CPU this harness may use): the
//! SDK does its mesh work on its own threads beside the JavaScript thread,
//! and a Node application is not pinned to one core either. The net echo is
//! run the same way.
//!
//! - Round trip: one call at a time, each timed in the Node client.
//! - Throughput (`-b1000`): 1000 calls kept in flight, each answer starting
//!   the next call; calls answered per second.
//!
//! The addon must be built (`cargo xtask npm`; `cargo xtask bench` does it).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustix::thread::CpuSet;
use serde::Deserialize;

use crate::scenario::{
    BenchError, ChildCtx, Endpoints, Fns, Measurement, Params, ParentCtx, io_err,
};

/// Calls in flight in the throughput scenarios (the scenarios' `batch`).
pub(crate) const IN_FLIGHT: u64 = 1000;

/// Round trip through `mesh.call` between two Node processes.
pub(crate) const COMMY_ROUND_TRIP: Fns = Fns {
    setup,
    parent: |c| rt_parent(c, Transport::Commy),
    child: |c| serve(c, Transport::Commy),
};

/// Round trip through the Node `net` echo.
pub(crate) const NET_ROUND_TRIP: Fns = Fns {
    setup,
    parent: |c| rt_parent(c, Transport::Net),
    child: |c| serve(c, Transport::Net),
};

/// Calls per second with [`IN_FLIGHT`] in flight, through commy.
pub(crate) const COMMY_THROUGHPUT: Fns = Fns {
    setup,
    parent: |c| tp_parent(c, Transport::Commy),
    child: |c| serve(c, Transport::Commy),
};

/// Calls per second with [`IN_FLIGHT`] in flight, through the `net` echo.
pub(crate) const NET_THROUGHPUT: Fns = Fns {
    setup,
    parent: |c| tp_parent(c, Transport::Net),
    child: |c| serve(c, Transport::Net),
};

#[derive(Debug, Clone, Copy)]
enum Transport {
    Commy,
    Net,
}

impl Transport {
    /// The `bench.js` transport name and where its server is, named after
    /// the measuring process.
    fn args(self, measuring_pid: u32) -> [String; 2] {
        match self {
            Transport::Commy => ["commy".into(), format!("bench-node-{measuring_pid}")],
            Transport::Net => [
                "net".into(),
                std::env::temp_dir()
                    .join(format!("commy-bench-node-{measuring_pid}.sock"))
                    .display()
                    .to_string(),
            ],
        }
    }
}

fn setup(_: &Params) -> Result<Endpoints, BenchError> {
    Ok(Endpoints::default())
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../commy-node/bench/bench.js")
}

/// `node bench.js <args>`, started with this thread's CPU affinity lifted
/// (children inherit it) and restored afterwards.
fn spawn_node(args: &[String], stdout: Stdio) -> Result<Child, BenchError> {
    let saved = rustix::thread::sched_getaffinity(None).ok();
    // Every CPU: the kernel keeps those that exist and are allowed.
    let mut all = CpuSet::new();
    for cpu in 0..CpuSet::MAX_CPU {
        all.set(cpu);
    }
    let _ = rustix::thread::sched_setaffinity(None, &all);
    let child = Command::new("node")
        .arg(script())
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn();
    if let Some(set) = saved {
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }
    child.map_err(io_err(format!(
        "starting `node {}` (is Node.js installed?)",
        script().display()
    )))
}

fn serve(ctx: &mut ChildCtx<'_>, t: Transport) -> Result<(), BenchError> {
    let measuring = std::os::unix::process::parent_id();
    let mut args = vec!["serve".to_owned()];
    args.extend(t.args(measuring));
    let mut server = spawn_node(&args, Stdio::piped())?;
    let out = server
        .stdout
        .take()
        .ok_or_else(|| BenchError::Protocol("no stdout from the Node server".into()))?;
    let mut lines = BufReader::new(out).lines();
    match lines.next() {
        Some(Ok(line)) if line.trim() == "ready" => {}
        other => {
            let _ = server.kill();
            return Err(BenchError::Peer(format!(
                "the Node server did not say ready (got {other:?})"
            )));
        }
    }
    ctx.ready()?;
    // The measuring side's client stops the server when it is done.
    let status = server
        .wait()
        .map_err(io_err("waiting for the Node server"))?;
    if status.success() {
        Ok(())
    } else {
        Err(BenchError::Peer(format!(
            "the Node server exited with {status}"
        )))
    }
}

/// Runs the Node client and parses its JSON line.
fn client<T: for<'de> Deserialize<'de>>(
    role: &str,
    t: Transport,
    numbers: &[u64],
) -> Result<T, BenchError> {
    let mut args = vec![role.to_owned()];
    args.extend(t.args(std::process::id()));
    args.extend(numbers.iter().map(u64::to_string));
    let child = spawn_node(&args, Stdio::piped())?;
    let out = child
        .wait_with_output()
        .map_err(io_err("waiting for the Node client"))?;
    if !out.status.success() {
        return Err(BenchError::Protocol(format!(
            "the Node client `node bench.js {}` exited with {}",
            args.join(" "),
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| {
        BenchError::Protocol(format!(
            "the Node client printed {text:?}, not its JSON: {e}"
        ))
    })
}

#[derive(Deserialize)]
struct RoundTrips {
    samples: Vec<u64>,
}

#[derive(Deserialize)]
struct Flood {
    calls: u64,
    bytes: u64,
    elapsed_ns: u64,
}

fn rt_parent(ctx: &mut ParentCtx<'_>, t: Transport) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    let r: RoundTrips = client("rt", t, &[p.size as u64, p.iterations, p.warmup])?;
    Ok(Measurement::RoundTrip(r.samples))
}

fn tp_parent(ctx: &mut ParentCtx<'_>, t: Transport) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    let r: Flood = client("tp", t, &[p.size as u64, p.iterations, p.warmup, p.batch])?;
    Ok(Measurement::Throughput {
        messages: r.calls,
        bytes: r.bytes,
        elapsed: Duration::from_nanos(r.elapsed_ns),
    })
}
