//! Running scenarios: how many iterations, K repetitions, medians.

use crate::peer::{pin_parent, run_once};
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

    /// Timed iterations (round trip), messages (throughput) or calls in
    /// the window (CPU at `rate` calls per second; idle, the window's
    /// milliseconds) per run.
    pub(crate) fn iterations(self, kind: Kind, size: usize, rate: u64) -> u64 {
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
            Kind::Cpu => {
                let window_ms = match self {
                    Profile::Full => 2_000,
                    Profile::Demo => 1_000,
                    Profile::Quick => 250,
                };
                match rate {
                    0 => window_ms,
                    r => window_ms * r / 1_000,
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
    /// Overrides the profile's iteration count (warm-up is a tenth of it, or
    /// all of it for scenarios with a long warm-up).
    pub(crate) iterations: Option<u64>,
    /// The name filters used (for the report).
    pub(crate) filters: Vec<String>,
}

impl Plan {
    fn params(&self, s: &Scenario) -> Params {
        let iterations = self
            .iterations
            .unwrap_or_else(|| self.profile.iterations(s.kind, s.size, s.batch))
            .min(s.max_iterations.unwrap_or(u64::MAX))
            .max(1);
        Params {
            size: s.size,
            iterations,
            warmup: if s.long_warmup {
                iterations
            } else {
                iterations / 10
            },
            batch: s.batch,
        }
    }
}

/// Runs `selected` `plan.runs` times each and reports medians. Progress goes
/// to stderr.
///
/// The runs go round by round, each round running every scenario once: a
/// scenario's runs are spread over the whole measurement, so a slow spell of
/// a shared machine reaches a few runs of every scenario (which the medians
/// leave out), not all runs of the few scenarios that happen to run during
/// it (which would skew their ratios to the baselines).
pub(crate) fn run(selected: &[Scenario], plan: &Plan) -> Result<Report, BenchError> {
    let pinning = pin_parent();
    if pinning.is_none() {
        eprintln!("commy-bench: fewer than two usable CPUs; the processes are not pinned");
    }
    let timer_overhead_ns = timer_overhead_ns();
    let rounds = plan.runs.max(1);
    let mut samples: Vec<Samples> = selected.iter().map(|_| Samples::default()).collect();
    let mut results = Vec::with_capacity(selected.len());
    for round in 1..=rounds {
        for (i, s) in selected.iter().enumerate() {
            let params = plan.params(s);
            run_once(s, params, pinning)
                .and_then(|m| samples[i].add(s.kind, params, m))
                .map_err(|e| BenchError::InScenario {
                    scenario: s.name.clone(),
                    source: Box::new(e),
                })?;
            if round == rounds {
                let row = samples[i].row(s, params);
                eprintln!(
                    "commy-bench: [{}/{}] {:<24} {}",
                    i + 1,
                    selected.len(),
                    s.name,
                    summary(&row.stats)
                );
                results.push(row);
            } else {
                eprintln!(
                    "commy-bench: round {round}/{rounds} [{}/{}] {}",
                    i + 1,
                    selected.len(),
                    s.name
                );
            }
        }
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
        Stats::Cpu {
            achieved,
            us_per_msg,
            core_share,
            ..
        } => match us_per_msg {
            Some(us) => format!(
                "{us:.2} µs CPU per call at {achieved:.0}/s, {:.2} % of a core",
                core_share * 100.0
            ),
            None => format!("idle: {:.3} % of a core", core_share * 100.0),
        },
    }
}

/// One scenario's statistics from each of its runs so far.
#[derive(Default)]
struct Samples {
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    msgs: Vec<f64>,
    gbs: Vec<f64>,
    /// CPU: microseconds per call, and the share of a core.
    cpu_us: Vec<f64>,
    cores: Vec<f64>,
    achieved: Vec<f64>,
}

impl Samples {
    /// Adds one run's measurement.
    fn add(&mut self, kind: Kind, params: Params, m: Measurement) -> Result<(), BenchError> {
        match (kind, m) {
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
                self.p50.push(p.p50);
                self.p99.push(p.p99);
                self.p999.push(p.p999);
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
                self.msgs.push(messages as f64 / secs);
                self.gbs.push(bytes as f64 / secs / 1e9);
            }
            (
                Kind::Cpu,
                Measurement::Cpu {
                    messages,
                    cpu,
                    window,
                },
            ) => {
                let secs = window.as_secs_f64();
                if secs <= 0.0 {
                    return Err(BenchError::Protocol("a CPU run had no window".into()));
                }
                if messages > 0 {
                    self.cpu_us.push(cpu.as_secs_f64() * 1e6 / messages as f64);
                }
                self.cores.push(cpu.as_secs_f64() / secs);
                self.achieved.push(messages as f64 / secs);
            }
            (kind, _) => {
                return Err(BenchError::Protocol(format!(
                    "a {kind:?} scenario returned a measurement of another kind"
                )));
            }
        }
        Ok(())
    }

    /// The scenario's row: the medians of its runs.
    fn row(&self, s: &Scenario, params: Params) -> Row {
        let stats = match s.kind {
            Kind::RoundTrip => Stats::RoundTrip {
                p50_ns: median(&self.p50),
                p99_ns: median(&self.p99),
                p999_ns: median(&self.p999),
            },
            Kind::Throughput => Stats::Throughput {
                msgs_per_s: median(&self.msgs),
                gb_per_s: median(&self.gbs),
            },
            Kind::Cpu => Stats::Cpu {
                rate: s.batch,
                achieved: median(&self.achieved),
                us_per_msg: (!self.cpu_us.is_empty()).then(|| median(&self.cpu_us)),
                core_share: median(&self.cores),
            },
        };
        Row {
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
        }
    }
}
