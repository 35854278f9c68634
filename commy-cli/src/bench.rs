//! `commy bench rtt|throughput`: latency and throughput of calls through the
//! mesh API, against an in-process echo service or a named one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use commy_core::ServiceName;
use commy_mesh::{Mesh, Request, Response, ServiceHandle, Status};

use crate::{CliError, Global, write_stdout};

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Round-trip latency of sequential calls: p50, p99, p99.9.
    #[command(
        long_about = "Round-trip latency of sequential calls through the mesh API: --warmup \
                      unmeasured calls, then --count measured ones, one at a time (or started \
                      --rate times a second, a call that is late starting at once). Prints \
                      min, p50, p99, p99.9, max and mean."
    )]
    Rtt {
        #[command(flatten)]
        common: Common,
        /// Unmeasured calls made first.
        #[arg(long, value_name = "N", default_value_t = 1000)]
        warmup: u64,
        /// Start the calls at this many per second, evenly spaced, instead
        /// of back to back (for what a served process costs at a given
        /// rate; this process spins between calls less than 2 ms apart).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        rate: Option<u64>,
    },
    /// Calls per second with many calls in flight.
    #[command(
        long_about = "Calls per second through the mesh API: --count calls spread over \
                      --concurrency tasks, each keeping one call in flight. Prints calls/s and \
                      request payload MB/s."
    )]
    Throughput {
        #[command(flatten)]
        common: Common,
        /// Tasks calling at once (one call in flight each).
        #[arg(long, value_name = "N", default_value_t = 64,
              value_parser = clap::value_parser!(u64).range(1..=4096))]
        concurrency: u64,
    },
}

/// Options shared by the benchmarks.
#[derive(Debug, clap::Args)]
pub(crate) struct Common {
    /// Request payload size in bytes.
    #[arg(long, value_name = "N", default_value_t = 64)]
    size: usize,

    /// Measured calls.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,

    /// Call this service instead of an in-process echo service (it must
    /// accept any payload).
    #[arg(long, value_name = "NAME", value_parser = crate::service_arg)]
    service: Option<ServiceName>,
}

/// The service under test: a named one, or our own echo service.
struct Target {
    name: String,
    /// Our echo service, if we serve it.
    served: Option<ServiceHandle>,
}

impl Target {
    async fn new(mesh: &Mesh, service: Option<ServiceName>) -> Result<Target, CliError> {
        if let Some(s) = service {
            return Ok(Target {
                name: s.to_string(),
                served: None,
            });
        }
        // Pids are unique among the live processes sharing a runtime dir.
        let name = format!("commy-bench-{}", std::process::id());
        let handle = mesh
            .serve(&name, |req: Request| async move {
                Ok::<_, Status>(Response::new(req.into_payload()))
            })
            .await?;
        Ok(Target {
            name,
            served: Some(handle),
        })
    }

    fn describe(&self) -> String {
        match self.served {
            Some(_) => format!("service '{}' (in-process echo)", self.name),
            None => format!("service '{}'", self.name),
        }
    }

    async fn finish(self, mesh: &Mesh) {
        if let Some(h) = self.served {
            h.shutdown().await;
        }
        mesh.close().await;
    }
}

/// Runs a benchmark and prints its summary.
pub(crate) async fn run(global: &Global, cmd: Command) -> Result<(), CliError> {
    let mesh = global.open().await?;
    let common = match &cmd {
        Command::Rtt { common, .. } | Command::Throughput { common, .. } => common,
    };
    let target = Target::new(&mesh, common.service.clone()).await?;
    let payload = Bytes::from(vec![0x5a; common.size]);
    let result = match &cmd {
        Command::Rtt {
            common,
            warmup,
            rate,
        } => rtt(&mesh, &target, &payload, common.count, *warmup, *rate).await,
        Command::Throughput {
            common,
            concurrency,
        } => throughput(&mesh, &target, &payload, common.count, *concurrency).await,
    };
    target.finish(&mesh).await;
    write_stdout(result?.as_bytes())
}

/// Sequential calls; the summary of their round-trip times.
async fn rtt(
    mesh: &Mesh,
    target: &Target,
    payload: &Bytes,
    count: u64,
    warmup: u64,
    rate: Option<u64>,
) -> Result<String, CliError> {
    let every = rate.map(|r| Duration::from_secs(1) / u32::try_from(r).unwrap_or(u32::MAX));
    let mut next = Instant::now();
    for _ in 0..warmup {
        if let Some(every) = every {
            pace_until(next).await;
            next += every;
        }
        mesh.call(&target.name, payload.clone()).await?;
    }
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let started = Instant::now();
    for _ in 0..count {
        if let Some(every) = every {
            pace_until(next).await;
            next += every;
        }
        let t = Instant::now();
        mesh.call(&target.name, payload.clone()).await?;
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    let mean =
        samples.iter().sum::<Duration>() / u32::try_from(samples.len()).unwrap_or(u32::MAX).max(1);
    let line = |label: &str, d: Duration| format!("  {label:<6} {:>12}\n", human(d));
    let paced = match rate {
        Some(r) => format!(
            " at {r}/s ({:.0}/s achieved)",
            samples.len() as f64 / started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE)
        ),
        None => String::new(),
    };
    let mut out = format!(
        "rtt: {}, {}-byte payload, {} sequential calls{paced} after {} warm-up calls\n",
        target.describe(),
        payload.len(),
        samples.len(),
        warmup
    );
    out += &line("min", samples.first().copied().unwrap_or_default());
    out += &line("p50", percentile(&samples, 0.50));
    out += &line("p99", percentile(&samples, 0.99));
    out += &line("p99.9", percentile(&samples, 0.999));
    out += &line("max", samples.last().copied().unwrap_or_default());
    out += &line("mean", mean);
    Ok(out)
}

/// Waits until `due`: on the runtime's timer while that is more than
/// its resolution (a millisecond) away, then spinning, so that paced
/// calls start evenly spaced rather than in bursts.
async fn pace_until(due: Instant) {
    let timer_resolution = Duration::from_millis(2);
    if let Some(far) = due.checked_sub(timer_resolution)
        && far > Instant::now()
    {
        tokio::time::sleep_until(far.into()).await;
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

/// `count` calls over `concurrency` tasks; the summary of their rate.
async fn throughput(
    mesh: &Mesh,
    target: &Target,
    payload: &Bytes,
    count: u64,
    concurrency: u64,
) -> Result<String, CliError> {
    let tasks = concurrency.min(count);
    // One call first opens the link, so the clock measures calls only.
    mesh.call(&target.name, payload.clone()).await?;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let calls = count / tasks + u64::from(t < count % tasks);
        let (mesh, name, payload) = (mesh.clone(), target.name.clone(), payload.clone());
        set.spawn(async move {
            for _ in 0..calls {
                mesh.call(&name, payload.clone()).await?;
            }
            Ok::<(), Status>(())
        });
    }
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(status)) => return Err(status.into()),
            Err(e) => return Err(CliError::Task(e.to_string())),
        }
    }
    let elapsed = started.elapsed();
    let secs = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let rate = count as f64 / secs;
    let mb = (count as f64 * payload.len() as f64) / secs / 1e6;
    Ok(format!(
        "throughput: {}, {}-byte payload, {} calls over {} tasks\n  \
         elapsed  {:>12}\n  calls/s  {:>12.0}\n  MB/s     {:>12.1} (request payloads)\n",
        target.describe(),
        payload.len(),
        count,
        tasks,
        human(elapsed),
        rate,
        mb
    ))
}

/// Nearest-rank percentile `p` (0..=1) of sorted `samples`.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// A duration with a unit that keeps three significant digits readable.
fn human(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.2} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.3} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&s, 0.5), Duration::from_micros(500));
        assert_eq!(percentile(&s, 0.99), Duration::from_micros(990));
        assert_eq!(percentile(&s, 0.999), Duration::from_micros(999));
        assert_eq!(percentile(&s[..1], 0.999), Duration::from_micros(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn durations_pick_a_unit() {
        assert_eq!(human(Duration::from_nanos(999)), "999 ns");
        assert_eq!(human(Duration::from_nanos(12_345)), "12.35 µs");
        assert_eq!(human(Duration::from_micros(1_500)), "1.50 ms");
        assert_eq!(human(Duration::from_millis(2_500)), "2.500 s");
    }
}
