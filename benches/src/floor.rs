//! Baseline: the spin floor. Two processes ping-pong by spinning on two
//! 64-bit counters in one shared-memory segment, 128 bytes apart (separate
//! cache lines, and separate adjacent-line prefetch pairs). Nothing can do a
//! cross-core round trip faster on this machine: it is the cost of moving two
//! cache lines between the cores, plus one clock read per sample.
//!
//! The parent stores the iteration number `i` into `ping` and spins until
//! `pong == i`; the peer spins until `ping` changes and copies it to `pong`.
//! `u64::MAX` in `ping` tells the peer to stop.

use std::sync::atomic::Ordering;
use std::time::Instant;

use commy_shm::Segment;

use crate::scenario::{
    BenchError, ChildCtx, Endpoints, Fns, Measurement, Params, ParentCtx, io_err,
};

/// Round-trip functions.
pub(crate) const ROUND_TRIP: Fns = Fns {
    setup,
    parent,
    child,
};

/// Word index of the parent's counter.
const PING: usize = 0;
/// Word index of the peer's counter: 16 words = 128 bytes after `PING`.
const PONG: usize = 16;
/// The value of `ping` that ends the run.
const STOP: u64 = u64::MAX;
/// Spins between two liveness checks of the other process.
const CHECK_EVERY: u32 = 1 << 16;

fn setup(_: &Params) -> Result<Endpoints, BenchError> {
    let seg = Segment::create(4096)?;
    let dup = || {
        seg.as_fd()
            .try_clone_to_owned()
            .map_err(io_err("duplicating the segment descriptor"))
    };
    Ok(Endpoints {
        parent: vec![dup()?],
        child: vec![dup()?],
    })
}

fn attach(fd: std::os::fd::OwnedFd) -> Result<Segment, BenchError> {
    let seg = Segment::attach(fd)?;
    if seg.words().len() <= PONG {
        return Err(BenchError::Protocol(format!(
            "segment data area is {} bytes, the spin floor needs {}",
            seg.data_len(),
            (PONG + 1) * 8
        )));
    }
    Ok(seg)
}

fn parent(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let [fd] = ctx.take_fds()?;
    let seg = attach(fd)?;
    let (ping, pong) = (&seg.words()[PING], &seg.words()[PONG]);
    let p = ctx.params;
    let mut samples = Vec::with_capacity(p.iterations as usize);
    for i in 1..=p.warmup + p.iterations {
        let t = Instant::now();
        // SYNC: pairs with the Acquire load of `ping` in `child`.
        ping.store(i, Ordering::Release);
        let mut spins = 0u32;
        // SYNC: pairs with the Release store of `pong` in `child`.
        while pong.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
            spins += 1;
            if spins == CHECK_EVERY {
                spins = 0;
                ctx.peer_alive()?;
            }
        }
        let ns = t.elapsed().as_nanos() as u64;
        if i > p.warmup {
            samples.push(ns);
        }
    }
    ping.store(STOP, Ordering::Release);
    Ok(Measurement::RoundTrip(samples))
}

fn child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    let [fd] = ctx.take_fds()?;
    let seg = attach(fd)?;
    let (ping, pong) = (&seg.words()[PING], &seg.words()[PONG]);
    ctx.ready()?;
    let mut last = 0;
    loop {
        let mut spins = 0u32;
        let v = loop {
            // SYNC: pairs with the Release store of `ping` in `parent`.
            let v = ping.load(Ordering::Acquire);
            if v != last {
                break v;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins == CHECK_EVERY {
                spins = 0;
                ctx.peer_alive()?;
            }
        };
        if v == STOP {
            return Ok(());
        }
        // SYNC: pairs with the Acquire load of `pong` in `parent`.
        pong.store(v, Ordering::Release);
        last = v;
    }
}
