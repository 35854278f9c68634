//! Commy's mesh API (commy-mesh): `mesh.call` round trips and pub/sub
//! throughput between two processes on the embedded default.
//!
//! Nothing is passed between the processes but a mesh name: both open the
//! mesh `bench-<pid of the measuring process>` in the default runtime dir
//! and find each other through local discovery, exactly as applications do.
//! The peer serves `echo` (its handler returns the request's payload) and
//! `stop` (ends the peer), or subscribes to the stream topic; it says ready
//! once its services or subscriptions are announced.
//!
//! Round trip: the measuring process times each `mesh.call("echo", bytes)`,
//! the payload being built before the clock starts (as the bare link's
//! scenario writes its message before timing), and compares every reply
//! with the request in the timed span (as the bare link's scenario does).
//!
//! Pub/sub echo: the measuring process times each publish on `bench/ping`
//! until the peer's copy of it comes back on `bench/pong` (the peer
//! publishes what it receives), and compares the two.
//!
//! Calls per second: the measuring process keeps the scenario's batch of
//! `mesh.call("echo")` in flight (that many tasks on its one runtime
//! thread, each calling one after another; 1: sequential calls).
//!
//! Throughput: the measuring process publishes messages on `bench/stream`;
//! the peer has 1 or 4 subscriptions on it, each receiving every message, and
//! publishes on `bench/ack` once all of them have seen the warm-up, then the
//! timed messages. The timed span runs from the first timed publish to that
//! acknowledgement. The `-b32` rows publish 32 messages per `publish_many`.
//! Subscribers take what has come with `next_batch` (lent in place, up to
//! 256 at a time), checking each message's size.

use std::time::Instant;

use bytes::Bytes;
use commy_mesh::{Mesh, Request, Response, Status};

use crate::scenario::{
    BenchError, ChildCtx, Endpoints, Fns, Measurement, Params, ParentCtx, io_err,
};

/// Round trip through `mesh.call`.
pub(crate) const ROUND_TRIP: Fns = Fns {
    setup,
    parent: rt_parent,
    child: rt_child,
};

/// Round trip through `mesh.call` to a service of three instances (the
/// peer serves `echo` from three mesh handles).
pub(crate) const ROUND_TRIP_POOL3: Fns = Fns {
    setup,
    parent: rt_parent,
    child: rt3_child,
};

/// Calls per second of `mesh.call("echo")`, with the scenario's batch of
/// calls in flight (1: one after another).
pub(crate) const CALLS: Fns = Fns {
    setup,
    parent: calls_parent,
    child: rt_child,
};

/// Calls per second of `mesh.call_many("echo")`, the scenario's batch of
/// calls at a time from one task.
pub(crate) const CALLS_MANY: Fns = Fns {
    setup,
    parent: calls_many_parent,
    child: rt_child,
};

/// The serving process's CPU time at a rate of `mesh.call("echo")`.
pub(crate) const CPU: Fns = Fns {
    setup,
    parent: cpu_parent,
    child: rt_child,
};

/// A process serving [`IDLE_SERVICES`] services that nobody calls: its
/// CPU time over the window.
pub(crate) const IDLE: Fns = Fns {
    setup,
    parent: cpu_parent,
    child: idle_child,
};

/// Services of the idle scenario.
pub(crate) const IDLE_SERVICES: usize = 200;

/// A callback call's short deadline kept while the link's reader waits
/// for a longer one (see [`deadline_parent`]).
pub(crate) const CALLBACK_DEADLINE: Fns = Fns {
    setup,
    parent: deadline_parent,
    child: rt_child,
};

/// The short timeout of [`CALLBACK_DEADLINE`]'s timed calls.
pub(crate) const SHORT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(3);

/// Pub/sub echo round trip: a message published on `bench/ping` comes back
/// on `bench/pong`.
pub(crate) const PUBSUB_ECHO: Fns = Fns {
    setup,
    parent: echo_parent,
    child: echo_child,
};

/// Publish throughput to one subscriber, through a [`Publisher`](commy_mesh::Publisher).
pub(crate) const PUBSUB_1: Fns = Fns {
    setup,
    parent: |c| tp_parent(c, 1, Via::Publisher),
    child: |c| tp_child(c, 1),
};

/// Publish throughput to four subscribers, through a [`Publisher`](commy_mesh::Publisher).
pub(crate) const PUBSUB_4: Fns = Fns {
    setup,
    parent: |c| tp_parent(c, 4, Via::Publisher),
    child: |c| tp_child(c, 4),
};

/// Publish throughput to one subscriber, naming the topic on each
/// `mesh.publish`.
pub(crate) const PUBSUB_1_BY_NAME: Fns = Fns {
    setup,
    parent: |c| tp_parent(c, 1, Via::Name),
    child: |c| tp_child(c, 1),
};

/// How the throughput scenarios publish.
#[derive(Clone, Copy)]
enum Via {
    /// A [`Publisher`](commy_mesh::Publisher) of the topic, made once.
    Publisher,
    /// `mesh.publish` / `mesh.publish_many` with the topic's name.
    Name,
}

const STREAM: &str = "bench/stream";
const PING: &str = "bench/ping";
const PONG: &str = "bench/pong";
const ACK: &str = "bench/ack";

fn setup(_: &Params) -> Result<Endpoints, BenchError> {
    Ok(Endpoints::default())
}

fn mesh_err(what: &str) -> impl FnOnce(Status) -> BenchError + '_ {
    move |s| BenchError::Protocol(format!("mesh {what}: {s}"))
}

/// The mesh both processes join: named after the measuring process.
fn mesh_name(measuring_pid: u32) -> String {
    format!("bench-{measuring_pid}")
}

/// A runtime for one side: the calling thread does all the work (the
/// process is pinned to one core).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting a tokio runtime"))
}

async fn open(measuring_pid: u32) -> Result<Mesh, BenchError> {
    Mesh::builder()
        .mesh(&mesh_name(measuring_pid))
        .open()
        .await
        .map_err(|e| BenchError::Protocol(format!("opening the mesh: {e}")))
}

fn rt_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(std::process::id()).await?;
        let mut msg = vec![0xA5u8; p.size];
        let stamp_len = 8.min(p.size);
        let mut samples = Vec::with_capacity(p.iterations as usize);
        for i in 0..p.warmup + p.iterations {
            msg[..stamp_len].copy_from_slice(&i.to_le_bytes()[..stamp_len]);
            let payload = Bytes::copy_from_slice(&msg);
            let t = Instant::now();
            let reply = mesh.call("echo", payload).await.map_err(mesh_err("call"))?;
            let same = reply[..] == msg[..];
            let ns = t.elapsed().as_nanos() as u64;
            if !same {
                return Err(BenchError::Protocol(format!(
                    "mesh echo of iteration {i} does not match what was sent"
                )));
            }
            if i >= p.warmup {
                samples.push(ns);
            }
        }
        mesh.call("stop", Bytes::new())
            .await
            .map_err(mesh_err("stop"))?;
        mesh.close().await;
        Ok(Measurement::RoundTrip(samples))
    })
}

/// `p.batch` tasks call `echo` one call after another each.
fn calls_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(std::process::id()).await?;
        let echo = {
            let mesh = mesh.clone();
            move |msg: Bytes| {
                let mesh = mesh.clone();
                async move {
                    let reply = mesh.call("echo", msg).await.map_err(mesh_err("call"))?;
                    Ok(reply.len())
                }
            }
        };
        let m = crate::pipeline::pipelined_echo(p, p.batch, echo).await?;
        mesh.call("stop", Bytes::new())
            .await
            .map_err(mesh_err("stop"))?;
        mesh.close().await;
        Ok(m)
    })
}

/// `p.warmup`, then `p.iterations` timed calls of `echo` through
/// `call_many`, `p.batch` per batch; every reply must be as long as its
/// request.
fn calls_many_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(std::process::id()).await?;
        let batch: Vec<Bytes> = (0..p.batch.max(1))
            .map(|_| Bytes::from(vec![0xA5u8; p.size]))
            .collect();
        let calls = async |count: u64| {
            let mut left = count;
            while left > 0 {
                let n = left.min(batch.len() as u64) as usize;
                for answer in mesh
                    .call_many("echo", &batch[..n], Default::default())
                    .await
                {
                    let answer = answer.map_err(mesh_err("call_many"))?;
                    if answer.payload().len() != p.size {
                        return Err(BenchError::Protocol("short echo".into()));
                    }
                }
                left -= n as u64;
            }
            Ok::<_, BenchError>(())
        };
        calls(p.warmup).await?;
        let t = Instant::now();
        calls(p.iterations).await?;
        let elapsed = t.elapsed();
        mesh.call("stop", Bytes::new())
            .await
            .map_err(mesh_err("stop"))?;
        mesh.close().await;
        Ok(Measurement::Throughput {
            messages: p.iterations,
            bytes: p.iterations * p.size as u64,
            elapsed,
        })
    })
}

/// Calls `echo` at the scenario's rate (or none), reading the peer's CPU
/// clock through its `cpu` service before and after the window.
fn cpu_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(std::process::id()).await?;
        let msg = Bytes::from(vec![0xA5u8; p.size]);
        let m = crate::cpu::measure(
            p,
            || {
                let (mesh, msg) = (&mesh, msg.clone());
                async move {
                    mesh.call("echo", msg).await.map_err(mesh_err("call"))?;
                    Ok(())
                }
            },
            || async {
                let reply = mesh
                    .call("cpu", Bytes::new())
                    .await
                    .map_err(mesh_err("cpu"))?;
                let ns = <[u8; 8]>::try_from(&reply[..])
                    .map_err(|_| BenchError::Protocol("a malformed cpu reply".into()))?;
                Ok(std::time::Duration::from_nanos(u64::from_le_bytes(ns)))
            },
        )
        .await?;
        mesh.call("stop", Bytes::new())
            .await
            .map_err(mesh_err("stop"))?;
        mesh.close().await;
        Ok(m)
    })
}

/// Serves [`IDLE_SERVICES`] services nobody calls, beside the round-trip
/// peer's services.
fn idle_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let parent = std::os::unix::process::parent_id();
    runtime()?.block_on(async {
        let mesh = open(parent).await?;
        let mut idle = Vec::with_capacity(IDLE_SERVICES);
        for i in 0..IDLE_SERVICES {
            idle.push(
                mesh.serve(&format!("idle-{i}"), |req: Request| async move {
                    Ok::<_, Status>(Response::new(req.into_payload()))
                })
                .await
                .map_err(mesh_err("serve"))?,
            );
        }
        serve_echo_until_stopped(mesh, ctx).await
    })
}

/// One call to `hold` (which answers after 60 s) keeps the link's reader
/// waiting on the ring; each timed iteration is a callback call to `hold`
/// with a [`SHORT_TIMEOUT`], made at a varying point of that wait, timed
/// until its callback reports `DEADLINE_EXCEEDED`. A link whose reader
/// only noticed the short deadline at the end of its own wait would show
/// that wait here instead of the timeout.
fn deadline_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(std::process::id()).await?;
        mesh.call("echo", Bytes::new())
            .await
            .map_err(mesh_err("call"))?;
        let long = 60_000u64.to_le_bytes();
        mesh.call_then("hold", long, commy_mesh::CallOptions::default(), |_| {});
        let mut samples = Vec::with_capacity(p.iterations as usize);
        for i in 0..p.warmup + p.iterations {
            tokio::time::sleep(std::time::Duration::from_micros(500 + (i * 1_700) % 5_000)).await;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let options = commy_mesh::CallOptions::default().timeout(SHORT_TIMEOUT);
            let t = Instant::now();
            mesh.call_then("hold", long, options, move |r| {
                let _ = tx.send((r, t.elapsed()));
            });
            let (result, took) = rx
                .await
                .map_err(|_| BenchError::Protocol("a callback call was never answered".into()))?;
            match result {
                Err(e) if e.code() == commy_mesh::Code::DeadlineExceeded => {}
                other => {
                    return Err(BenchError::Protocol(format!(
                        "a call to `hold` with a {SHORT_TIMEOUT:?} timeout ended with {:?}",
                        other.map(|_| "an answer")
                    )));
                }
            }
            if i >= p.warmup {
                samples.push(took.as_nanos() as u64);
            }
        }
        mesh.call("stop", Bytes::new())
            .await
            .map_err(mesh_err("stop"))?;
        mesh.close().await;
        Ok(Measurement::RoundTrip(samples))
    })
}

fn rt_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let parent = std::os::unix::process::parent_id();
    runtime()?.block_on(async { serve_echo_until_stopped(open(parent).await?, ctx).await })
}

/// The round-trip peer with three instances of `echo`: two more mesh
/// handles serve it beside the one that serves the rest.
fn rt3_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let parent = std::os::unix::process::parent_id();
    runtime()?.block_on(async {
        let mut more = Vec::new();
        for _ in 0..2 {
            let mesh = open(parent).await?;
            let echo = mesh
                .serve("echo", |req: Request| async move {
                    Ok::<_, Status>(Response::new(req.into_payload()))
                })
                .await
                .map_err(mesh_err("serve"))?;
            more.push((mesh, echo));
        }
        serve_echo_until_stopped(open(parent).await?, ctx).await?;
        for (mesh, echo) in more {
            drop(echo);
            mesh.close().await;
        }
        Ok(())
    })
}

/// The round-trip peer on its open `mesh`: serves `echo` (the request's
/// payload back), `cpu` (this process's CPU time), `hold` (answers after
/// the u64 milliseconds of its payload) and `stop`, says ready, and closes
/// the mesh once `stop` is called.
pub(crate) async fn serve_echo_until_stopped(
    mesh: Mesh,
    ctx: &mut ChildCtx<'_>,
) -> Result<(), BenchError> {
    let _echo = mesh
        .serve("echo", |req: Request| async move {
            Ok::<_, Status>(Response::new(req.into_payload()))
        })
        .await
        .map_err(mesh_err("serve"))?;
    // Answers after the u64 milliseconds of its payload.
    // This process's CPU time so far, in nanoseconds.
    let _cpu = mesh
        .serve("cpu", |_req: Request| async move {
            let cpu = crate::cpu::process_cpu()
                .map_err(|e| Status::internal(format!("reading the CPU clock: {e}")))?;
            let ns = u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX);
            Ok::<_, Status>(Response::new(Bytes::copy_from_slice(&ns.to_le_bytes())))
        })
        .await
        .map_err(mesh_err("serve"))?;
    let _hold = mesh
        .serve("hold", |req: Request| async move {
            let ms = <[u8; 8]>::try_from(&req.payload()[..]).map_or(0, u64::from_le_bytes);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            Ok::<_, Status>(Response::default())
        })
        .await
        .map_err(mesh_err("serve"))?;
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let _stop = {
        let stop = stop.clone();
        mesh.serve("stop", move |_req: Request| {
            stop.notify_one();
            async { Ok::<_, Status>(Response::default()) }
        })
        .await
        .map_err(mesh_err("serve"))?
    };
    ctx.ready()?;
    stop.notified().await;
    mesh.close().await;
    Ok(())
}

/// Times each message published on [`PING`] until the peer's copy of it
/// comes back on [`PONG`]; an empty message on [`PING`] ends the peer.
fn echo_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(std::process::id()).await?;
        let mut pongs = mesh.subscribe(PONG).await.map_err(mesh_err("subscribe"))?;
        let wait = std::time::Duration::from_secs(30);
        mesh.wait_for_subscribers(PING, 1, wait)
            .await
            .map_err(mesh_err("wait for the peer"))?;
        let mut msg = vec![0xA5u8; p.size.max(8)];
        let mut samples = Vec::with_capacity(p.iterations as usize);
        for i in 0..p.warmup + p.iterations {
            msg[..8].copy_from_slice(&i.to_le_bytes());
            let payload = Bytes::copy_from_slice(&msg);
            let t = Instant::now();
            let delivered = mesh
                .publish(PING, payload)
                .await
                .map_err(mesh_err("publish"))?;
            let back = pongs.next().await;
            let ns = t.elapsed().as_nanos() as u64;
            if delivered != 1 {
                return Err(BenchError::Protocol(format!(
                    "ping {i} reached {delivered} subscribers"
                )));
            }
            if back.is_none_or(|m| m.payload()[..] != msg[..]) {
                return Err(BenchError::Protocol(format!(
                    "the pong of ping {i} does not match it"
                )));
            }
            if i >= p.warmup {
                samples.push(ns);
            }
        }
        mesh.publish(PING, Bytes::new())
            .await
            .map_err(mesh_err("publish"))?;
        mesh.close().await;
        Ok(Measurement::RoundTrip(samples))
    })
}

/// Publishes on [`PONG`] each message that comes on [`PING`], until an
/// empty one.
fn echo_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let parent = std::os::unix::process::parent_id();
    runtime()?.block_on(async {
        let mesh = open(parent).await?;
        let mut pings = mesh.subscribe(PING).await.map_err(mesh_err("subscribe"))?;
        ctx.ready()?;
        while let Some(m) = pings.next().await {
            if m.payload().is_empty() {
                break;
            }
            let payload = m.into_payload();
            // The measuring process subscribed before its first ping; the
            // first pong may have to wait until this process sees it.
            while mesh
                .publish(PONG, payload.clone())
                .await
                .map_err(mesh_err("publish"))?
                == 0
            {
                mesh.wait_for_subscribers(PONG, 1, std::time::Duration::from_secs(30))
                    .await
                    .map_err(mesh_err("wait for the peer"))?;
            }
        }
        mesh.close().await;
        Ok(())
    })
}

/// Waits for the peer's acknowledgement.
async fn ack(acks: &mut commy_mesh::Subscription) -> Result<(), BenchError> {
    match acks.next().await {
        Some(_) => Ok(()),
        None => Err(BenchError::Protocol(
            "the acknowledgement subscription ended".into(),
        )),
    }
}

/// Publishes `count` messages, each to every subscriber: one `publish`
/// per message, or `batch` messages per `publish_many` when above 1.
async fn publish(
    mesh: &Mesh,
    via: Via,
    msg: &Bytes,
    count: u64,
    subs: usize,
    batch: u64,
) -> Result<(), BenchError> {
    let burst: Vec<Bytes> = (0..batch.max(1)).map(|_| msg.clone()).collect();
    let mut publisher = mesh.publisher(STREAM).map_err(mesh_err("publisher"))?;
    let mut left = count;
    while left > 0 {
        let n = left.min(burst.len() as u64) as usize;
        let delivered = match (via, batch > 1) {
            (Via::Publisher, true) => publisher.publish_many(&burst[..n]).await,
            (Via::Publisher, false) => publisher.publish(&msg[..]).await,
            (Via::Name, true) => mesh.publish_many(STREAM, &burst[..n]).await,
            (Via::Name, false) => mesh.publish(STREAM, msg.clone()).await,
        }
        .map_err(mesh_err("publish"))?;
        if delivered != subs * n {
            return Err(BenchError::Protocol(format!(
                "{n} message(s) made {delivered} deliveries, not {} ({subs} subscribers)",
                subs * n
            )));
        }
        left -= n as u64;
    }
    Ok(())
}

fn tp_parent(ctx: &mut ParentCtx<'_>, subs: usize, via: Via) -> Result<Measurement, BenchError> {
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(std::process::id()).await?;
        let mut acks = mesh.subscribe(ACK).await.map_err(mesh_err("subscribe"))?;
        let msg = Bytes::from(vec![0xA5u8; p.size]);
        publish(&mesh, via, &msg, p.warmup, subs, p.batch).await?;
        ack(&mut acks).await?;
        let t = Instant::now();
        publish(&mesh, via, &msg, p.iterations, subs, p.batch).await?;
        ack(&mut acks).await?;
        let elapsed = t.elapsed();
        mesh.close().await;
        Ok(Measurement::Throughput {
            messages: p.iterations,
            bytes: p.iterations * p.size as u64,
            elapsed,
        })
    })
}

/// Messages a stream subscriber takes at most per `next_batch`.
const RECV_BATCH: u64 = 256;

fn tp_child(ctx: &mut ChildCtx<'_>, subs: usize) -> Result<(), BenchError> {
    let parent = std::os::unix::process::parent_id();
    let p = ctx.params;
    runtime()?.block_on(async {
        let mesh = open(parent).await?;
        let mut subscriptions = Vec::with_capacity(subs);
        for _ in 0..subs {
            subscriptions.push(
                mesh.subscribe(STREAM)
                    .await
                    .map_err(mesh_err("subscribe"))?,
            );
        }
        ctx.ready()?;
        for count in [p.warmup, p.iterations] {
            // Every subscription drains concurrently (a blocked one would
            // hold the publisher back).
            let mut tasks = tokio::task::JoinSet::new();
            for mut sub in subscriptions.drain(..) {
                tasks.spawn(async move {
                    let (mut bad, mut got) = (0u64, 0u64);
                    while got < count {
                        let max = (count - got).min(RECV_BATCH) as usize;
                        let n = sub
                            .next_batch(max, |m| {
                                if m.payload().len() != p.size {
                                    bad += 1;
                                }
                            })
                            .await;
                        if n == 0 {
                            return Err(BenchError::Protocol("a stream subscription ended".into()));
                        }
                        got += n as u64;
                    }
                    if bad > 0 {
                        return Err(BenchError::Protocol(format!(
                            "{bad} messages of the wrong size"
                        )));
                    }
                    Ok(sub)
                });
            }
            while let Some(done) = tasks.join_next().await {
                let sub = done.map_err(|e| {
                    BenchError::Protocol(format!("a subscriber task failed: {e}"))
                })??;
                subscriptions.push(sub);
            }
            // The acknowledgement's subscriber announced itself before the
            // first message was published, so one publish reaches it.
            let delivered = mesh
                .publish(ACK, Bytes::from_static(b"k"))
                .await
                .map_err(mesh_err("publish"))?;
            if delivered != 1 {
                return Err(BenchError::Protocol(format!(
                    "the acknowledgement reached {delivered} subscribers"
                )));
            }
        }
        mesh.close().await;
        Ok(())
    })
}
