//! Baseline: a Unix-domain stream socketpair with blocking reads and writes,
//! which is what a plain local RPC transport does.
//!
//! Round trip: the parent writes a message (the first 8 bytes carry the
//! iteration number), the peer reads exactly that many bytes and writes them
//! back, the parent reads the echo and checks the number. Throughput: the
//! parent writes every message with its own `write` call (as a transport that
//! sends each message when the application does), the peer reads with a
//! 256 KiB buffer, as a framed stream reader would, and acknowledges with one
//! byte once it has received every byte.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::scenario::{
    BenchError, ChildCtx, Endpoints, Fns, Measurement, Params, ParentCtx, io_err,
};

/// Round-trip functions.
pub(crate) const ROUND_TRIP: Fns = Fns {
    setup,
    parent: rt_parent,
    child: rt_child,
};

/// Throughput functions.
pub(crate) const THROUGHPUT: Fns = Fns {
    setup,
    parent: tp_parent,
    child: tp_child,
};

/// CPU functions: an echo whose CPU time is read at a rate of calls.
pub(crate) const CPU: Fns = Fns {
    setup,
    parent: cpu_parent,
    child: cpu_child,
};

/// Receive buffer of the throughput reader.
const READ_BUF: usize = 256 * 1024;

fn setup(_: &Params) -> Result<Endpoints, BenchError> {
    let (a, b) = UnixStream::pair().map_err(io_err("socketpair(AF_UNIX, SOCK_STREAM)"))?;
    Ok(Endpoints {
        parent: vec![a.into()],
        child: vec![b.into()],
    })
}

fn stamp(msg: &mut [u8], i: u64) {
    let n = msg.len().min(8);
    msg[..n].copy_from_slice(&i.to_le_bytes()[..n]);
}

fn rt_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let [fd] = ctx.take_fds()?;
    let mut sock = UnixStream::from(fd);
    let p = ctx.params;
    let mut msg = vec![0xA5u8; p.size];
    let mut echo = vec![0u8; p.size];
    let mut samples = Vec::with_capacity(p.iterations as usize);
    for i in 0..p.warmup + p.iterations {
        stamp(&mut msg, i);
        let t = Instant::now();
        sock.write_all(&msg).map_err(io_err("uds write"))?;
        sock.read_exact(&mut echo)
            .map_err(io_err("uds read of the echo"))?;
        let ns = t.elapsed().as_nanos() as u64;
        if echo[..8.min(p.size)] != msg[..8.min(p.size)] {
            return Err(BenchError::Protocol(format!(
                "uds echo of iteration {i} does not match what was sent"
            )));
        }
        if i >= p.warmup {
            samples.push(ns);
        }
    }
    Ok(Measurement::RoundTrip(samples))
}

fn rt_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let [fd] = ctx.take_fds()?;
    let mut sock = UnixStream::from(fd);
    let p = ctx.params;
    let mut buf = vec![0u8; p.size];
    ctx.ready()?;
    for _ in 0..p.warmup + p.iterations {
        sock.read_exact(&mut buf).map_err(io_err("uds read"))?;
        sock.write_all(&buf)
            .map_err(io_err("uds write of the echo"))?;
    }
    Ok(())
}

/// Echoes at the scenario's rate; a message that starts with [`CPU_ASK`]
/// asks the peer for its CPU time (8 bytes back).
fn cpu_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let [fd] = ctx.take_fds()?;
    let sock = std::cell::RefCell::new(UnixStream::from(fd));
    let p = ctx.params;
    let msg = vec![0xA5u8; p.size.max(8)];
    let mut ask = msg.clone();
    ask[0] = CPU_ASK;
    let runtime = crate::mesh::runtime()?;
    runtime.block_on(crate::cpu::measure(
        p,
        || {
            let mut s = sock.borrow_mut();
            let mut echo = vec![0u8; msg.len()];
            let r = s
                .write_all(&msg)
                .and_then(|()| s.read_exact(&mut echo))
                .map_err(io_err("uds echo"));
            std::future::ready(r)
        },
        || {
            let mut s = sock.borrow_mut();
            let mut ns = [0u8; 8];
            let r = s
                .write_all(&ask)
                .and_then(|()| s.read_exact(&mut ns))
                .map(|()| std::time::Duration::from_nanos(u64::from_le_bytes(ns)))
                .map_err(io_err("uds cpu request"));
            std::future::ready(r)
        },
    ))
}

/// The first byte of a request for the peer's CPU time.
const CPU_ASK: u8 = b'c';

/// Echoes each message; one that starts with [`CPU_ASK`] gets this
/// process's CPU time instead. Ends when the parent closes its end.
fn cpu_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let [fd] = ctx.take_fds()?;
    let mut sock = UnixStream::from(fd);
    let mut buf = vec![0u8; ctx.params.size.max(8)];
    ctx.ready()?;
    loop {
        match sock.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_err("uds read")(e)),
        }
        if buf[0] == CPU_ASK {
            let ns = u64::try_from(crate::cpu::process_cpu()?.as_nanos()).unwrap_or(u64::MAX);
            sock.write_all(&ns.to_le_bytes())
                .map_err(io_err("uds write of the cpu time"))?;
        } else {
            sock.write_all(&buf)
                .map_err(io_err("uds write of the echo"))?;
        }
    }
}

/// Sends `count` messages, then waits for the one-byte acknowledgement.
fn stream(sock: &mut UnixStream, msg: &[u8], count: u64) -> Result<(), BenchError> {
    for _ in 0..count {
        sock.write_all(msg).map_err(io_err("uds write"))?;
    }
    let mut ack = [0u8; 1];
    sock.read_exact(&mut ack)
        .map_err(io_err("uds read of the acknowledgement"))
}

fn tp_parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let [fd] = ctx.take_fds()?;
    let mut sock = UnixStream::from(fd);
    let p = ctx.params;
    let msg = vec![0xA5u8; p.size];
    stream(&mut sock, &msg, p.warmup)?;
    let t = Instant::now();
    stream(&mut sock, &msg, p.iterations)?;
    let elapsed = t.elapsed();
    Ok(Measurement::Throughput {
        messages: p.iterations,
        bytes: p.iterations * p.size as u64,
        elapsed,
    })
}

/// Reads exactly `total` bytes in large chunks, then acknowledges.
fn drain(sock: &mut UnixStream, buf: &mut [u8], total: u64) -> Result<(), BenchError> {
    let mut left = total;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = sock.read(&mut buf[..want]).map_err(io_err("uds read"))?;
        if n == 0 {
            return Err(BenchError::PeerGone(format!(
                " (uds stream ended with {left} bytes still expected)"
            )));
        }
        left -= n as u64;
    }
    sock.write_all(&[1])
        .map_err(io_err("uds write of the acknowledgement"))
}

fn tp_child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let [fd] = ctx.take_fds()?;
    let mut sock = UnixStream::from(fd);
    let p = ctx.params;
    let mut buf = vec![0u8; READ_BUF];
    ctx.ready()?;
    drain(&mut sock, &mut buf, p.warmup * p.size as u64)?;
    drain(&mut sock, &mut buf, p.iterations * p.size as u64)
}
