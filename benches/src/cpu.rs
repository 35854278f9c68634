//! What a serving process costs: its CPU time (all its threads, those
//! that ended included) while the measuring process makes calls at a fixed
//! rate, evenly spaced, or while it idles.
//!
//! The serving process reads its own CPU clock when asked (a call of the
//! mesh's `cpu` service, or the Unix socket echo's one-byte request) just
//! before and after the window; the measuring process paces its calls by
//! spinning on the clock (it has a core of its own), so that calls come
//! evenly spaced rather than in timer-tick bursts.

use std::time::{Duration, Instant};

use crate::scenario::{BenchError, Measurement, Params};

/// This process's CPU time so far, all threads (those that ended too).
pub(crate) fn process_cpu() -> Result<Duration, BenchError> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let ns = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(Duration::from_nanos(ns))
}

/// The calls' spacing at `rate` per second.
fn spacing(rate: u64) -> Duration {
    Duration::from_nanos(1_000_000_000 / rate.max(1))
}

/// Makes `count` calls of `call` at `rate` per second, evenly spaced.
async fn paced<F, Fut>(rate: u64, count: u64, call: &mut F) -> Result<(), BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
{
    let every = spacing(rate);
    let mut next = Instant::now();
    for _ in 0..count {
        while Instant::now() < next {
            std::hint::spin_loop();
        }
        next += every;
        call().await?;
    }
    Ok(())
}

/// One CPU run: `p.warmup` paced calls, then the serving process's CPU
/// clock (`cpu`), `p.iterations` paced calls (at the rate `p.batch`; idle:
/// `p.iterations` milliseconds without calls), and its CPU clock again.
pub(crate) async fn measure<F, Fut, C, CFut>(
    p: Params,
    mut call: F,
    mut cpu: C,
) -> Result<Measurement, BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
    C: FnMut() -> CFut,
    CFut: std::future::Future<Output = Result<Duration, BenchError>>,
{
    let rate = p.batch;
    if rate > 0 {
        paced(rate, p.warmup, &mut call).await?;
    }
    let before = cpu().await?;
    let t = Instant::now();
    let messages = if rate > 0 {
        paced(rate, p.iterations, &mut call).await?;
        p.iterations
    } else {
        tokio::time::sleep(Duration::from_millis(p.iterations)).await;
        0
    };
    let window = t.elapsed();
    let after = cpu().await?;
    Ok(Measurement::Cpu {
        messages,
        cpu: after.saturating_sub(before),
        window,
    })
}
