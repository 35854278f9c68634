//! What picking an instance costs, per pick, in the measuring process
//! alone (the peer only says it is ready): the strategies a pool chooses
//! by (commy-discovery's sans-IO state), over three instances, with the
//! work the pool adds to each candidate (a look at its ejection state and
//! its calls in flight). The size is the hash key's length (Maglev) or,
//! for the others, nominal.
//!
//! Each sample is the mean of [`BATCH`] picks timed together, so the
//! clock's own cost stays out of it.
#![allow(clippy::disallowed_types)] // plain counters in one thread, nothing for loom

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use commy_discovery::{Maglev, Outlier, OutlierConfig, PowerOfTwo, RoundRobin};

use crate::scenario::{BenchError, ChildCtx, Endpoints, Fns, Measurement, Params, ParentCtx};

/// The less loaded of two of three instances (`p2c`).
pub(crate) const P2C: Fns = Fns {
    setup,
    parent: p2c,
    child,
};

/// Each of three instances in turn (`round_robin`).
pub(crate) const ROUND_ROBIN: Fns = Fns {
    setup,
    parent: round_robin,
    child,
};

/// Consistent hashing of a key over three instances (`maglev`).
pub(crate) const MAGLEV: Fns = Fns {
    setup,
    parent: maglev,
    child,
};

/// Picks timed together for one sample.
const BATCH: u64 = 256;

/// The instances picked among.
const INSTANCES: usize = 3;

fn setup(_: &Params) -> Result<Endpoints, BenchError> {
    Ok(Endpoints::default())
}

fn child(ctx: &mut ChildCtx<'_>) -> Result<(), BenchError> {
    ctx.ready()
}

/// What the pool keeps per instance and looks at for each candidate.
struct Candidate {
    in_flight: AtomicU64,
    outlier: Outlier,
}

fn candidates() -> Vec<Candidate> {
    (0..INSTANCES as u64)
        .map(|i| Candidate {
            in_flight: AtomicU64::new(i % 2),
            outlier: Outlier::new(OutlierConfig::default()),
        })
        .collect()
}

/// Whether the candidate may take a call, and its load (as the pool's
/// `choose_in` asks).
fn load(c: &Candidate) -> u64 {
    if c.outlier.is_out() {
        return u64::MAX;
    }
    c.in_flight.load(Ordering::Relaxed)
}

/// `p.warmup + p.iterations` samples of `BATCH` picks by `pick` (given
/// the pick's number), the warm-up ones dropped.
fn measure(p: &Params, mut pick: impl FnMut(u64) -> Option<usize>) -> Measurement {
    let mut samples = Vec::with_capacity(p.iterations as usize);
    let mut n = 0u64;
    for i in 0..p.warmup + p.iterations {
        let t = Instant::now();
        for _ in 0..BATCH {
            black_box(pick(black_box(n)));
            n += 1;
        }
        let ns = t.elapsed().as_nanos() as u64;
        if i >= p.warmup {
            samples.push(ns.div_ceil(BATCH));
        }
    }
    Measurement::RoundTrip(samples)
}

fn p2c(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let (balancer, all) = (PowerOfTwo::new(), candidates());
    Ok(measure(&ctx.params, |_| {
        let i = balancer.pick(all.len(), |i| load(&all[i]))?;
        (!all[i].outlier.is_out()).then_some(i)
    }))
}

fn round_robin(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let (turns, all) = (RoundRobin::new(), candidates());
    Ok(measure(&ctx.params, |_| {
        let i = turns.pick(all.len())?;
        (load(&all[i]) != u64::MAX).then_some(i)
    }))
}

fn maglev(ctx: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
    let all = candidates();
    let names: Vec<String> = (0..INSTANCES).map(|i| format!("{i:032x}")).collect();
    let table = Maglev::new(&names);
    // Keys of the scenario's size, a different one each pick.
    let size = ctx.params.size.max(8);
    let keys: Vec<Vec<u8>> = (0..64u64)
        .map(|k| {
            let mut key = vec![b'k'; size];
            key[..8].copy_from_slice(&k.to_le_bytes());
            key
        })
        .collect();
    Ok(measure(&ctx.params, |n| {
        let i = table.pick(&keys[(n % 64) as usize])?;
        (load(&all[i]) != u64::MAX).then_some(i)
    }))
}
