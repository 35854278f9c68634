//! Commy's shared-memory link (commy-shm `ShmLink`): round trip and one-way
//! throughput, in busy-poll and default (spin, yield, futex) wait modes.
//!
//! `setup` makes a `SOCK_SEQPACKET` socket pair; the peer performs the client
//! side of the link handshake over its end (after `ready()`, so the handshake
//! is never timed) and the parent the server side. Messages are copied into
//! the ring (`send`), the path an application sending a byte slice takes.
//! Throughput batches `batch` messages per publish (`send_batched` + `flush`)
//! and the receiver drains with `recv_batch` (one release per batch),
//! reading every cache line of each payload in place.

use std::time::Instant;

use commy_shm::{LinkConfig, ShmLink, UdsStream, WaitStrategy};

use crate::scenario::{
    BenchError, ChildCtx, Endpoints, Fns, Measurement, Params, ParentCtx, io_err,
};

/// Round trip, busy polling on both sides.
pub(crate) const ROUND_TRIP_BUSY: Fns = Fns {
    setup,
    parent: |c| rt_parent(c, WaitStrategy::BusyPoll),
    child: |c| rt_child(c, WaitStrategy::BusyPoll),
};

/// Round trip, default wait strategy on both sides.
pub(crate) const ROUND_TRIP_DEFAULT: Fns = Fns {
    setup,
    parent: |c| rt_parent(c, WaitStrategy::default()),
    child: |c| rt_child(c, WaitStrategy::default()),
};

/// One-way throughput, busy polling.
pub(crate) const THROUGHPUT_BUSY: Fns = Fns {
    setup,
    parent: |c| tp_parent(c, WaitStrategy::BusyPoll),
    child: |c| tp_child(c, WaitStrategy::BusyPoll),
};

/// One-way throughput, default wait strategy.
pub(crate) const THROUGHPUT_DEFAULT: Fns = Fns {
    setup,
    parent: |c| tp_parent(c, WaitStrategy::default()),
    child: |c| tp_child(c, WaitStrategy::default()),
};

/// Ring size per direction: the link's default.
fn config(wait: WaitStrategy) -> LinkConfig {
    LinkConfig::default().wait(wait)
}

fn setup(_: &Params) -> Result<Endpoints, BenchError> {
    let (a, b) = UdsStream::pair().map_err(io_err("socketpair(AF_UNIX, SOCK_SEQPACKET)"))?;
    Ok(Endpoints {
        parent: vec![a.into()],
        child: vec![b.into()],
    })
}

fn link_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Protocol(format!("shm link: {e}"))
}

fn server(ctx: &mut ParentCtx<'_>, wait: WaitStrategy) -> Result<ShmLink, BenchError> {
    let [fd] = ctx.take_fds()?;
    let sock = UdsStream::try_from(fd).map_err(io_err("adopting the link socket"))?;
    ShmLink::accept_stream(sock, &config(wait)).map_err(link_err)
}

fn client(ctx: &mut ChildCtx<'_>, wait: WaitStrategy) -> Result<ShmLink, BenchError> {
    let [fd] = ctx.take_fds()?;
    let sock = UdsStream::try_from(fd).map_err(io_err("adopting the link socket"))?;
    ctx.ready()?;
    ShmLink::connect_stream(sock, config(wait)).map_err(link_err)
}

fn rt_parent(ctx: &mut ParentCtx<'_>, wait: WaitStrategy) -> Result<Measurement, BenchError> {
    let (mut tx, mut rx) = server(ctx, wait)?.split();
    let p = ctx.params;
    let mut msg = vec![0xA5u8; p.size];
    let mut samples = Vec::with_capacity(p.iterations as usize);
    let stamp_len = 8.min(p.size);
    for i in 0..p.warmup + p.iterations {
        msg[..stamp_len].copy_from_slice(&i.to_le_bytes()[..stamp_len]);
        let t = Instant::now();
        tx.send(&msg).map_err(link_err)?;
        let echo = rx.recv(None).map_err(link_err)?;
        // The whole echo is compared inside the timed span: every line of
        // it is read, as an application uses what it receives.
        let same = *echo == msg[..];
        let ns = t.elapsed().as_nanos() as u64;
        if !same {
            return Err(BenchError::Protocol(format!(
                "shm echo of iteration {i} does not match what was sent"
            )));
        }
        drop(echo);
        if i >= p.warmup {
            samples.push(ns);
        }
    }
    Ok(Measurement::RoundTrip(samples))
}

fn rt_child(ctx: &mut ChildCtx<'_>, wait: WaitStrategy) -> Result<(), BenchError> {
    let (mut tx, mut rx) = client(ctx, wait)?.split();
    let p = ctx.params;
    for _ in 0..p.warmup + p.iterations {
        let m = rx.recv(None).map_err(link_err)?;
        tx.send(&m).map_err(link_err)?;
    }
    Ok(())
}

fn stream(link: &mut ShmLink, msg: &[u8], count: u64, batch: u64) -> Result<(), BenchError> {
    let tx = link.sender();
    let batch = batch.max(1);
    for i in 0..count {
        tx.send_batched(msg).map_err(link_err)?;
        if (i + 1) % batch == 0 {
            tx.flush();
        }
    }
    tx.flush();
    let ack = link.recv().map_err(link_err)?;
    if &*ack != b"k" {
        return Err(BenchError::Protocol("shm: bad acknowledgement".into()));
    }
    Ok(())
}

fn tp_parent(ctx: &mut ParentCtx<'_>, wait: WaitStrategy) -> Result<Measurement, BenchError> {
    let mut link = server(ctx, wait)?;
    let p = ctx.params;
    let msg = vec![0xA5u8; p.size];
    stream(&mut link, &msg, p.warmup, p.batch)?;
    let t = Instant::now();
    stream(&mut link, &msg, p.iterations, p.batch)?;
    let elapsed = t.elapsed();
    Ok(Measurement::Throughput {
        messages: p.iterations,
        bytes: p.iterations * p.size as u64,
        elapsed,
    })
}

fn drain(link: &mut ShmLink, count: u64, size: usize) -> Result<(), BenchError> {
    let mut left = count;
    let mut bad = 0u64;
    let mut sum = 0u8;
    while left > 0 {
        let n = link
            .receiver()
            .recv_batch(usize::try_from(left).unwrap_or(usize::MAX), None, |m| {
                if m.len() != size {
                    bad += 1;
                }
                // Read one byte of every cache line, so every line of the
                // payload really crosses to this core (the data is used in
                // place, zero-copy, but it is used).
                for b in m.iter().step_by(64) {
                    sum = sum.wrapping_add(*b);
                }
            })
            .map_err(link_err)?;
        left -= n as u64;
    }
    std::hint::black_box(sum);
    if bad > 0 {
        return Err(BenchError::Protocol(format!(
            "shm: {bad} messages of the wrong size"
        )));
    }
    link.send(b"k").map_err(link_err)
}

fn tp_child(ctx: &mut ChildCtx<'_>, wait: WaitStrategy) -> Result<(), BenchError> {
    let mut link = client(ctx, wait)?;
    let p = ctx.params;
    drain(&mut link, p.warmup, p.size)?;
    drain(&mut link, p.iterations, p.size)
}
