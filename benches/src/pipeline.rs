//! Calls kept in flight: `in_flight` tasks on the measuring process's
//! runtime, each making its share of the calls one after another, so that
//! as many are outstanding at any time.

use std::time::Instant;

use bytes::Bytes;

use crate::scenario::{BenchError, Measurement, Params};

/// Runs `count` calls of `one` with `in_flight` of them in flight (as
/// many tasks, each making its share one call after another).
pub(crate) async fn pipelined<F, Fut>(count: u64, in_flight: u64, one: F) -> Result<(), BenchError>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    let in_flight = in_flight.max(1);
    for w in 0..in_flight {
        let n = count / in_flight + u64::from(w < count % in_flight);
        let one = one.clone();
        tasks.spawn(async move {
            for _ in 0..n {
                one().await?;
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| BenchError::Protocol(format!("a caller task failed: {e}")))??;
    }
    Ok(())
}

/// The pipelined throughput of `echo`, which sends its payload and returns
/// the length of the reply: `p.warmup` calls, then `p.iterations` timed
/// ones, `in_flight` at a time; every reply must be as long as the request.
pub(crate) async fn pipelined_echo<F, Fut>(
    p: Params,
    in_flight: u64,
    echo: F,
) -> Result<Measurement, BenchError>
where
    F: Fn(Bytes) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<usize, BenchError>> + Send + 'static,
{
    let msg = Bytes::from(vec![0xA5u8; p.size]);
    let call = move || {
        let (echo, msg) = (echo.clone(), msg.clone());
        async move {
            if echo(msg.clone()).await? != msg.len() {
                return Err(BenchError::Protocol("short echo".into()));
            }
            Ok(())
        }
    };
    pipelined(p.warmup, in_flight, call.clone()).await?;
    let t = Instant::now();
    pipelined(p.iterations, in_flight, call).await?;
    Ok(Measurement::Throughput {
        messages: p.iterations,
        bytes: p.iterations * p.size as u64,
        elapsed: t.elapsed(),
    })
}
