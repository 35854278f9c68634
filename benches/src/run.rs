//! Running scenarios: how many iterations, K repetitions, medians.

use crate::peer::{Pinning, pin_parent, run_once};
use crate::report::{Report, Row, SCHEMA, Stats, compute_ratios, fmt_ns};
use crate::scenario::{BenchError, Kind, Measurement, Params, Scenario};
use crate::stats::{median, percentiles, timer_overhead_ns};

/// How much work each scenario does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// `cargo xtask bench`: the numbers to quote.
    Full,
    /// `--quick`: a smoke test of the pipeline.
    Quick,
    /// `commy-bench demo`: readable numbers in well under 20 seconds.
    Demo,
}

impl Profile {
    /// Repetitions of each scenario unless `--runs` says otherwise.
    pub(crate) fn default_runs(self) -> u32 {
        match self {
            Profile::Full => 5,
            Profile::Quick | Profile::Demo => 3,
        }
    }

    /// Timed iterations (round trip) or messages (throughput) per run.
    pub(crate) fn iterations(self, kind: Kind, size: usize) -> u64 {
        match kind {
            Kind::RoundTrip => {
                let small = size <= 4096;
                match (self, small) {
                    (Profile::Full, true) => 50_000,
                    (Profile::Full, false) => 10_000,
                    (Profile::Demo, true) => 20_000,
                    (Profile::Demo, false) => 5_000,
                    (Profile::Quick, true) => 2_000,
                    (Profile::Quick, false) => 500,
                }
            }
            Kind::Throughput => {
                let (bytes, lo, hi): (u64, u64, u64) = match self {
                    Profile::Full => (256 << 20, 10_000, 500_000),
                    Profile::Demo => (64 << 20, 5_000, 200_000),
                    Profile::Quick => (16 << 20, 1_000, 20_000),
                };
                (bytes / size.max(1) as u64).clamp(lo, hi)
            }
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Work per scenario.
    pub(crate) profile: Profile,
    /// Repetitions per scenario.
    pub(crate) runs: u32,
    /// Overrides the profile's iteration count (warm-up is a tenth of it).
    pub(crate) iterations: Option<u64>,
    /// The name filters used (for the report).
    pub(crate) filters: Vec<String>,
}

impl Plan {
    fn params(&self, s: &Scenario) -> Params {
        let iterations = self
            .iterations
            .unwrap_or_else(|| self.profile.iterations(s.kind, s.size))
            .max(1);
        Params {
            size: s.size,
            iterations,
            warmup: iterations / 10,
            batch: s.batch,
        }
    }
}

/// Runs `selected` `plan.runs` times each and reports medians. Progress goes
/// to stderr.
pub(crate) fn run(selected: &[Scenario], plan: &Plan) -> Result<Report, BenchError> {
    let pinning = pin_parent();
    if pinning.is_none() {
        eprintln!("commy-bench: fewer than two usable CPUs; the processes are not pinned");
    }
    let timer_overhead_ns = timer_overhead_ns();
    let mut results = Vec::with_capacity(selected.len());
    for (i, s) in selected.iter().enumerate() {
        let row = run_scenario(s, plan, pinning).map_err(|e| BenchError::InScenario {
            scenario: s.name.clone(),
            source: Box::new(e),
        })?;
        eprintln!(
            "commy-bench: [{}/{}] {:<24} {}",
            i + 1,
            selected.len(),
            s.name,
            summary(&row.stats)
        );
        results.push(row);
    }
    compute_ratios(&mut results);
    Ok(Report {
        schema: SCHEMA,
        quick: plan.profile == Profile::Quick,
        runs: plan.runs,
        filters: plan.filters.clone(),
        pinning,
        timer_overhead_ns,
        results,
    })
}

fn summary(stats: &Stats) -> String {
    match *stats {
        Stats::RoundTrip {
            p50_ns,
            p99_ns,
            p999_ns,
        } => format!(
            "p50 {}, p99 {}, p99.9 {}",
            fmt_ns(p50_ns),
            fmt_ns(p99_ns),
            fmt_ns(p999_ns)
        ),
        Stats::Throughput {
            msgs_per_s,
            gb_per_s,
        } => format!("{msgs_per_s:.0} msgs/s, {gb_per_s:.2} GB/s"),
    }
}

fn run_scenario(s: &Scenario, plan: &Plan, pinning: Option<Pinning>) -> Result<Row, BenchError> {
    let params = plan.params(s);
    let (mut p50, mut p99, mut p999, mut msgs, mut gbs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.runs.max(1) {
        match (s.kind, run_once(s, params, pinning)?) {
            (Kind::RoundTrip, Measurement::RoundTrip(mut samples)) => {
                if samples.len() as u64 != params.iterations {
                    return Err(BenchError::Protocol(format!(
                        "{} samples for {} iterations",
                        samples.len(),
                        params.iterations
                    )));
                }
                let p = percentiles(&mut samples)
                    .ok_or_else(|| BenchError::Protocol("round trip produced no samples".into()))?;
                p50.push(p.p50);
                p99.push(p.p99);
                p999.push(p.p999);
            }
            (
                Kind::Throughput,
                Measurement::Throughput {
                    messages,
                    bytes,
                    elapsed,
                },
            ) => {
                let secs = elapsed.as_secs_f64();
                if messages == 0 || secs <= 0.0 {
                    return Err(BenchError::Protocol(format!(
                        "throughput run moved {messages} messages in {secs} s"
                    )));
                }
                msgs.push(messages as f64 / secs);
                gbs.push(bytes as f64 / secs / 1e9);
            }
            (kind, _) => {
                return Err(BenchError::Protocol(format!(
                    "a {kind:?} scenario returned a measurement of the other kind"
                )));
            }
        }
    }
    let stats = match s.kind {
        Kind::RoundTrip => Stats::RoundTrip {
            p50_ns: median(&p50),
            p99_ns: median(&p99),
            p999_ns: median(&p999),
        },
        Kind::Throughput => Stats::Throughput {
            msgs_per_s: median(&msgs),
            gb_per_s: median(&gbs),
        },
    };
    Ok(Row {
        name: s.name.clone(),
        transport: s.transport,
        size: s.size,
        wait: s.wait,
        iterations: params.iterations,
        warmup: params.warmup,
        batch: s.batch,
        stats,
        vs_uds: None,
        vs_floor: None,
    })
}
