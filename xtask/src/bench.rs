//! `cargo xtask bench`: runs the end-to-end harness (`commy-bench`, crate
//! `benches`) in release mode and rewrites `docs/BENCHMARKS.md` from its JSON;
//! with `--baseline REV`, compares REV's harness with the current one
//! ([`baseline`]).

mod baseline;

use std::path::Path;

use serde::Deserialize;

use crate::cmd::{Cmd, CmdError};
use crate::machine::{Machine, utc_now};

/// Where the report is written, relative to the repository root.
pub(crate) const REPORT: &str = "docs/BENCHMARKS.md";

/// The JSON schema version of the harness output this renderer understands.
const SCHEMA: u32 = 1;

/// Options of `cargo xtask bench`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct BenchArgs {
    /// Fewer iterations and runs: a smoke test, not numbers to quote.
    pub(crate) quick: bool,
    /// Runs per scenario (the harness default if `None`).
    pub(crate) runs: Option<u32>,
    /// Only scenarios whose name contains one of these.
    pub(crate) filters: Vec<String>,
    /// Print the markdown instead of writing [`REPORT`].
    pub(crate) print: bool,
    /// Compare with this git revision's harness instead (print only).
    pub(crate) baseline: Option<String>,
}

/// `cargo xtask bench` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BenchError {
    /// Building or running the harness failed.
    #[error(transparent)]
    Harness(#[from] CmdError),
    /// Setting up the Python benchmark failed.
    #[error(transparent)]
    PythonTools(#[from] crate::tools::EnsureError),
    /// The harness printed something that is not the expected JSON.
    #[error("commy-bench printed JSON this xtask cannot read: {0}")]
    BadJson(#[from] serde_json::Error),
    /// The harness speaks another schema version.
    #[error("commy-bench reports schema {found}, this xtask reads schema {SCHEMA}")]
    Schema {
        /// The version found.
        found: u32,
    },
    /// The filters matched no scenario.
    #[error(
        "no benchmark scenario matches {filters:?}; `cargo run -p commy-benches --release -- list` lists them"
    )]
    NothingRan {
        /// The filters given.
        filters: Vec<String>,
    },
    /// Building the Node SDK's addon for the Node scenarios failed.
    #[error("building the Node addon for the node-* scenarios failed: {0}")]
    NodeAddon(crate::npm::NpmError),
    /// `--baseline` names no commit.
    #[error("`{rev}` names no commit of this repository (`git rev-parse --verify`)")]
    BadRevision {
        /// The revision given.
        rev: String,
    },
    /// `--baseline` names a commit older than the harness.
    #[error("`{rev}` has no commy-bench executable in benches/: the harness did not exist yet")]
    NoHarness {
        /// The revision given.
        rev: String,
    },
    /// The baseline's worktree folder is in a state this xtask will not touch.
    #[error("{path} {problem}")]
    Worktree {
        /// The folder.
        path: String,
        /// What is wrong with it, and what to do.
        problem: String,
    },
    /// A git command preparing the baseline failed.
    #[error("preparing the baseline's worktree failed: {0}")]
    Git(CmdError),
    /// A build reported no `commy-bench` executable.
    #[error("`{cmd}` reported no commy-bench executable")]
    NoExecutable {
        /// The build command.
        cmd: String,
    },
    /// `--baseline` with filters that select Node or Python scenarios only.
    #[error(
        "--baseline compares the Rust harness's scenarios only, and the filters select only \
         Node/Python ones ({left_out:?}); run `cargo xtask bench --print` for those"
    )]
    BaselineRustOnly {
        /// The scenarios selected.
        left_out: Vec<String>,
    },
    /// Writing the report failed.
    #[error("writing {path} failed: {source}")]
    Write {
        /// The report path.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The harness's JSON output (`commy-bench run --json`).
#[derive(Debug, Deserialize)]
pub(crate) struct Report {
    schema: u32,
    quick: bool,
    runs: u32,
    filters: Vec<String>,
    pinning: Option<Pinning>,
    timer_overhead_ns: f64,
    results: Vec<Row>,
    /// Whether the Rust harness ran (its method section applies).
    #[serde(default = "yes")]
    harness: bool,
    /// Whether the Python scenarios pinned their processes, if they ran.
    #[serde(default)]
    python_pinned: Option<bool>,
}

fn yes() -> bool {
    true
}

/// The Python benchmark's JSON output (`commy-py/bench/rtt.py --json`).
#[derive(Debug, Deserialize)]
struct PythonReport {
    pinned: bool,
    results: Vec<Row>,
}

/// The CPUs the two processes were pinned to.
#[derive(Debug, Deserialize)]
struct Pinning {
    parent_cpu: usize,
    child_cpu: usize,
    smt_siblings: Option<bool>,
}

/// One scenario's result (medians across runs).
#[derive(Debug, Deserialize)]
struct Row {
    name: String,
    transport: String,
    size: u64,
    wait: String,
    iterations: u64,
    warmup: u64,
    batch: u64,
    #[serde(flatten)]
    stats: Stats,
    vs_uds: Option<f64>,
    vs_floor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stats {
    RoundTrip {
        p50_ns: f64,
        p99_ns: f64,
        p999_ns: f64,
    },
    Throughput {
        msgs_per_s: f64,
        gb_per_s: f64,
    },
    Cpu {
        rate: u64,
        achieved: f64,
        us_per_msg: Option<f64>,
        core_share: f64,
    },
}

/// The Node scenarios' names (benches/src/scenarios.rs): the addon is built
/// first when a filter may select one of them.
const NODE_SCENARIOS: [&str; 4] = [
    "node-net/rt-default/64B",
    "node-commy/rt-default/64B",
    "node-net/tp-default/64B-b1000",
    "node-commy/tp-default/64B-b1000",
];

/// Runs the harness (and the Python SDK's benchmark) and writes (or
/// prints) the report.
///
/// A filter that matches a Python scenario's name (`python/...`) selects
/// Python scenarios only; the others go to the harness.
pub(crate) fn run(root: &Path, args: &BenchArgs) -> Result<(), BenchError> {
    if let Some(rev) = &args.baseline {
        return baseline::run(root, args, rev);
    }
    let python_name = |f: &String| {
        crate::python::BENCH_SCENARIOS
            .iter()
            .any(|name| name.contains(f.as_str()))
    };
    let rust_filters: Vec<String> = args
        .filters
        .iter()
        .filter(|f| !python_name(f))
        .cloned()
        .collect();
    let run_rust = args.filters.is_empty() || !rust_filters.is_empty();
    let run_python = crate::python::BENCH_SCENARIOS.iter().any(|name| {
        args.filters.is_empty() || args.filters.iter().any(|f| name.contains(f.as_str()))
    });

    let run_node = run_rust
        && (rust_filters.is_empty()
            || rust_filters
                .iter()
                .any(|f| NODE_SCENARIOS.iter().any(|n| n.contains(f.as_str()))));
    if run_node {
        crate::npm::run(root).map_err(BenchError::NodeAddon)?;
    }
    let mut report = if run_rust {
        rust_harness(root, args, &rust_filters)?
    } else {
        Report {
            schema: SCHEMA,
            quick: args.quick,
            runs: args.runs.unwrap_or(if args.quick { 3 } else { 5 }),
            filters: args.filters.clone(),
            pinning: None,
            timer_overhead_ns: 0.0,
            results: Vec::new(),
            harness: false,
            python_pinned: None,
        }
    };
    report.filters.clone_from(&args.filters);
    if run_python {
        let py = crate::python::bench(root, args)?;
        let py: PythonReport = serde_json::from_str(&py)?;
        report.python_pinned = Some(py.pinned);
        report.results.extend(py.results);
    }
    if report.results.is_empty() {
        return Err(BenchError::NothingRan {
            filters: args.filters.clone(),
        });
    }
    let md = render(&report, &Machine::detect(root), &utc_now());
    if args.print {
        print!("{md}");
        return Ok(());
    }
    let path = root.join(REPORT);
    std::fs::write(&path, md).map_err(|source| BenchError::Write {
        path: path.display().to_string(),
        source,
    })?;
    println!("xtask bench: wrote {REPORT}");
    Ok(())
}

/// The Rust harness's report.
fn rust_harness(root: &Path, args: &BenchArgs, filters: &[String]) -> Result<Report, BenchError> {
    let mut harness = Cmd::cargo()
        .args([
            "run",
            "--release",
            "--package",
            "commy-benches",
            "--bin",
            "commy-bench",
            "--",
            "run",
            "--json",
        ])
        .args(args.quick.then_some("--quick"));
    if let Some(runs) = args.runs {
        harness = harness.args(["--runs", &runs.to_string()]);
    }
    for f in filters {
        harness = harness.args(["--filter", f]);
    }
    println!("xtask bench: $ {}", harness.display());
    let json = harness.stdout(root)?;
    let report: Report = serde_json::from_str(&json)?;
    if report.schema != SCHEMA {
        return Err(BenchError::Schema {
            found: report.schema,
        });
    }
    Ok(report)
}

/// `850 ns`, `12.3 µs`, `1.25 ms`.
fn fmt_ns(ns: f64) -> String {
    if ns < 10_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// `64 B`, `1 KiB`, `64 KiB`.
fn fmt_size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// `12.3 M`, `456 k`.
fn fmt_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2} M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×"))
}

/// The markdown report.
pub(crate) fn render(report: &Report, machine: &Machine, date: &str) -> String {
    let mut md = String::new();
    let mut w = |s: String| md.push_str(&s);
    w("# Commy benchmarks\n\n".into());
    w("Generated by `cargo xtask bench`; do not edit by hand.\n\n".into());
    if report.quick {
        w(
            "> **Quick run** (`--quick`): few iterations, a smoke test of the pipeline. \
           Do not quote these numbers; run `cargo xtask bench` for real ones.\n\n"
                .into(),
        );
    }
    if !report.filters.is_empty() {
        w(format!(
            "> Only scenarios matching {:?} were run.\n\n",
            report.filters
        ));
    }
    w(format!("- Date: {date}\n"));
    w(format!(
        "- CPU: {} ({} logical CPUs{})\n",
        machine.cpu,
        machine.cores,
        if machine.virtualized {
            ", virtual machine: the `hypervisor` CPU flag is set"
        } else {
            ""
        }
    ));
    w(format!("- Memory: {}\n", machine.memory));
    w(format!("- Kernel: {}\n", machine.kernel));
    w(format!("- Compiler: {}\n\n", machine.rustc));

    if report.harness {
        w("## How the numbers are taken\n\n".into());
        w(
            "Every scenario runs between two processes: the harness re-executes itself as the peer \
           and hands it the transport's file descriptors over a Unix socket (SCM_RIGHTS). "
                .into(),
        );
        match &report.pinning {
            Some(p) => {
                let smt = match p.smt_siblings {
                    Some(true) => " (SMT siblings of one physical core)",
                    Some(false) => " (not SMT siblings, according to sysfs)",
                    None => "",
                };
                w(format!(
                    "The measuring process is pinned to CPU {} and the peer to CPU {}{smt}. ",
                    p.parent_cpu, p.child_cpu
                ));
            }
            None => w("The processes were **not pinned** (fewer than two CPUs available). ".into()),
        }
        w(format!(
            "Each scenario is repeated {} times (runs), in rounds that run every scenario once, so that \
             each scenario's runs are spread over the whole measurement; a table cell is the **median \
             across runs** of that run's statistic, so a noisy run, or a slow spell of the machine during \
             one round, does not move it.\n\n",
            report.runs
        ));
        w(format!(
            "- Round trip: the measuring process sends a message, the peer sends one of the same size \
             back; each iteration is timed with `std::time::Instant` after a warm-up, and p50 / p99 / \
             p99.9 are taken over all iterations of a run. Reading the clock costs about {:.0} ns \
             on this machine and is included in every sample.\n",
            report.timer_overhead_ns
        ));
        w(
            "- Throughput: the measuring process streams messages one way after a warm-up; the clock \
           stops when the peer acknowledges the last one. GB/s counts payload bytes (10^9 bytes).\n"
                .into(),
        );
        w(
            "- Ratios are against baselines measured in the same run: *vs UDS* is how many times \
           faster than the Unix-socket baseline of the same size (higher is better); *× floor* is \
           the round trip in multiples of the spin floor, two processes ping-ponging on two \
           shared-memory counters, which is what the hardware allows (lower is better).\n\n"
                .into(),
        );
    }
    if let Some(pinned) = report.python_pinned {
        w("## Python SDK\n\n".into());
        w(format!(
            "The `python/*` rows come from `commy-py/bench/rtt.py`, run with the release wheel \
             installed: a server process echoes, a client process times sequential 64 B round \
             trips with `time.perf_counter_ns` after a warm-up, both in Python. Through commy \
             the client calls `mesh.call` (`python/commy`) or awaits `AsyncMesh.call` in \
             `asyncio.run` (`python/commy-asyncio`), and the server is `mesh.serve` with a \
             Python function; the baselines are pyzmq REQ/REP over `ipc://` and \
             `multiprocessing.Pipe` (`send_bytes`/`recv_bytes`), measured in the same run. \
             The processes are {}. Each cell is the median across runs.\n\n",
            if pinned {
                "pinned to different CPUs (`--pin`)"
            } else {
                "not pinned (the default: on a machine shared with other work, a pinned commy \
                 link thread that yields its CPU before it sleeps can lose it for a whole \
                 time slice)"
            }
        ));
    }

    if report
        .results
        .iter()
        .any(|r| r.transport.starts_with("node-"))
    {
        w(
            "- Node rows (`node-*`): two Node.js processes, **not pinned** (the SDK works on its own \
           threads beside the JavaScript thread), one serving and one measuring with the same client \
           code for both transports (`commy-node/bench/bench.js`): `node-commy` is `mesh.call` to an \
           async Node handler, `node-net` a Node `net` Unix-socket echo with the same call semantics \
           (framed calls with ids, one promise per call). Their throughput rows keep `batch` calls in \
           flight (each answer starts the next call) and count calls answered per second, after a \
           warm-up of as many calls as are timed: V8 compiles the hot code on background threads \
           during the first few hundred thousand calls, competing with both processes for the CPUs \
           meanwhile. Their *vs UDS* column compares with `node-net`, not with the Rust socket \
           baseline.\n\n"
                .into(),
        );
    }

    let rt: Vec<_> = report
        .results
        .iter()
        .filter_map(|r| match r.stats {
            Stats::RoundTrip {
                p50_ns,
                p99_ns,
                p999_ns,
            } => Some((r, p50_ns, p99_ns, p999_ns)),
            Stats::Throughput { .. } | Stats::Cpu { .. } => None,
        })
        .collect();
    if !rt.is_empty() {
        w("## Round-trip latency\n\n".into());
        w("| scenario | transport | wait | size | p50 | p99 | p99.9 | vs UDS (p50) | × floor (p50) | iterations (+warm-up) |\n".into());
        w("|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n".into());
        for (r, p50, p99, p999) in rt {
            w(format!(
                "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} (+{}) |\n",
                r.name,
                r.transport,
                r.wait,
                fmt_size(r.size),
                fmt_ns(p50),
                fmt_ns(p99),
                fmt_ns(p999),
                fmt_ratio(r.vs_uds),
                fmt_ratio(r.vs_floor),
                r.iterations,
                r.warmup,
            ));
        }
        w("\n".into());
    }

    let tp: Vec<_> = report
        .results
        .iter()
        .filter_map(|r| match r.stats {
            Stats::Throughput {
                msgs_per_s,
                gb_per_s,
            } => Some((r, msgs_per_s, gb_per_s)),
            Stats::RoundTrip { .. } | Stats::Cpu { .. } => None,
        })
        .collect();
    if !tp.is_empty() {
        w("## One-way throughput\n\n".into());
        w("| scenario | transport | wait | size | batch | msgs/s | GB/s | vs UDS | messages (+warm-up) |\n".into());
        w("|---|---|---|---:|---:|---:|---:|---:|---:|\n".into());
        for (r, msgs, gbs) in tp {
            w(format!(
                "| `{}` | {} | {} | {} | {} | {} | {:.2} | {} | {} (+{}) |\n",
                r.name,
                r.transport,
                r.wait,
                fmt_size(r.size),
                r.batch,
                fmt_rate(msgs),
                gbs,
                fmt_ratio(r.vs_uds),
                r.iterations,
                r.warmup,
            ));
        }
        w("\n".into());
    }
    let cpu: Vec<_> = report
        .results
        .iter()
        .filter_map(|r| match r.stats {
            Stats::Cpu {
                rate,
                achieved,
                us_per_msg,
                core_share,
            } => Some((r, rate, achieved, us_per_msg, core_share)),
            Stats::RoundTrip { .. } | Stats::Throughput { .. } => None,
        })
        .collect();
    if !cpu.is_empty() {
        w("## CPU of the serving process\n\n".into());
        w(
            "The serving process's CPU time (all its threads) over a window of calls made at a \
           rate, evenly spaced, by the measuring process (which spins between them on its own \
           core), read from the serving process's own CPU clock before and after the window; \
           the idle row serves 200 services that nobody calls. A transport whose round trip is \
           longer than the spacing makes its calls back to back: *calls/s* is the rate achieved. \
           *vs UDS* is the Unix-socket echo's CPU per call at the same rate over this row's \
           (higher is better).\n\n"
                .into(),
        );
        w("| scenario | transport | wait | calls/s asked | calls/s | CPU per call | share of a core | vs UDS | calls (+warm-up) |\n".into());
        w("|---|---|---|---:|---:|---:|---:|---:|---:|\n".into());
        for (r, rate, achieved, us, share) in cpu {
            w(format!(
                "| `{}` | {} | {} | {} | {} | {} | {:.3} % | {} | {} (+{}) |\n",
                r.name,
                r.transport,
                r.wait,
                if rate == 0 {
                    "idle".to_owned()
                } else {
                    fmt_rate(rate as f64)
                },
                fmt_rate(achieved),
                us.map_or_else(|| "—".to_owned(), |us| format!("{us:.2} µs")),
                share * 100.0,
                fmt_ratio(r.vs_uds),
                r.iterations,
                r.warmup,
            ));
        }
        w("\n".into());
    }
    let targets = check_targets(report);
    if !targets.is_empty() {
        w("## Targets\n\n".into());
        w("Performance goals from the issues, checked against this run's medians.\n\n".into());
        w("| goal | measured | target | met |\n|---|---:|---:|---|\n".into());
        for t in targets {
            w(format!(
                "| {} | {} | {} | {} |\n",
                t.goal,
                t.measured,
                t.target,
                if t.met { "yes" } else { "**no**" }
            ));
        }
        w("\n".into());
    }
    w(
        "Reproduce with `cargo xtask bench` (about the harness and how to add a scenario: \
       [benches/README.md](../benches/README.md)).\n"
            .into(),
    );
    md
}

/// A performance goal, stated on scenario names of the harness.
enum Goal {
    /// `a`'s p50 round trip at most `max` times `b`'s.
    RoundTripRatio {
        a: &'static str,
        b: &'static str,
        max: f64,
    },
    /// At least `min` messages per second.
    MinMsgs { scenario: &'static str, min: f64 },
    /// A p50 round trip of at most `max_ns` nanoseconds.
    MaxP50 { scenario: &'static str, max_ns: f64 },
    /// At least `min` GB/s.
    MinGbps { scenario: &'static str, min: f64 },
    /// `a`'s messages per second at least `min` times `b`'s.
    ThroughputRatio {
        a: &'static str,
        b: &'static str,
        min: f64,
    },
    /// `a`'s deliveries per second (messages times `fan_out`, its
    /// subscribers) at least `min` times `b`'s messages per second.
    DeliveriesRatio {
        a: &'static str,
        fan_out: f64,
        b: &'static str,
        min: f64,
    },
    /// The p99 round trip at most `max` times the p50 of the same run.
    TailRatio { scenario: &'static str, max: f64 },
    /// `a`'s CPU time per call at most `max` times `b`'s.
    CpuPerCallRatio {
        a: &'static str,
        b: &'static str,
        max: f64,
    },
    /// A CPU scenario's share of one core at most `max` (a fraction).
    MaxCoreShare { scenario: &'static str, max: f64 },
}

/// The goals of the issues; rows whose scenarios did not run are skipped.
const GOALS: &[(&str, Goal)] = &[
    (
        "shm busy-poll round trip (64 B) vs the spin floor",
        Goal::RoundTripRatio {
            a: "shm/rt-busy/64B",
            b: "spin-floor/rt-busy/8B",
            max: 2.0,
        },
    ),
    (
        "shm default-wait vs busy-poll round trip (64 B)",
        Goal::RoundTripRatio {
            a: "shm/rt-default/64B",
            b: "shm/rt-busy/64B",
            max: 3.0,
        },
    ),
    (
        "shm default-wait vs busy-poll round trip (1 KiB)",
        Goal::RoundTripRatio {
            a: "shm/rt-default/1KiB",
            b: "shm/rt-busy/1KiB",
            max: 3.0,
        },
    ),
    (
        "shm default-wait vs busy-poll round trip (64 KiB)",
        Goal::RoundTripRatio {
            a: "shm/rt-default/64KiB",
            b: "shm/rt-busy/64KiB",
            max: 3.0,
        },
    ),
    (
        "mesh.call round trip vs the bare shm link (64 B)",
        Goal::RoundTripRatio {
            a: "mesh/rt-default/64B",
            b: "shm/rt-default/64B",
            max: 1.5,
        },
    ),
    (
        "mesh.call round trip vs the bare shm link (4 KiB)",
        Goal::RoundTripRatio {
            a: "mesh/rt-default/4KiB",
            b: "shm/rt-default/4KiB",
            max: 1.5,
        },
    ),
    (
        "a callback call's 3 ms deadline, the link's reader waiting for a later one",
        Goal::MaxP50 {
            scenario: "mesh-deadline-3ms/rt-default/8B",
            max_ns: 6e6,
        },
    ),
    (
        "mesh.call over TLS round trip vs a raw tokio-rustls echo (64 B)",
        Goal::RoundTripRatio {
            a: "mesh-tls/rt/64B",
            b: "rustls/rt/64B",
            max: 1.3,
        },
    ),
    (
        "mesh.call over TLS round trip vs a raw tokio-rustls echo (4 KiB)",
        Goal::RoundTripRatio {
            a: "mesh-tls/rt/4KiB",
            b: "rustls/rt/4KiB",
            max: 1.3,
        },
    ),
    (
        "mesh.call over TLS, 64 B, 256 in flight on one connection",
        Goal::MinMsgs {
            scenario: "mesh-tls/tp/64B",
            min: 500e3,
        },
    ),
    (
        "Node-to-Node round trip (64 B) vs a Node `net` Unix-socket echo",
        Goal::RoundTripRatio {
            a: "node-commy/rt-default/64B",
            b: "node-net/rt-default/64B",
            max: 1.0,
        },
    ),
    (
        "Node-to-Node calls/s with 1000 in flight vs a Node `net` Unix-socket echo",
        Goal::ThroughputRatio {
            a: "node-commy/tp-default/64B-b1000",
            b: "node-net/tp-default/64B-b1000",
            min: 3.0,
        },
    ),
    (
        "Python round trip through commy vs pyzmq REQ/REP ipc:// (64 B)",
        Goal::RoundTripRatio {
            a: "python/commy/64B",
            b: "python/pyzmq-ipc/64B",
            max: 1.0 / 3.0,
        },
    ),
    (
        "shm one-way throughput, 64 B, batched",
        Goal::MinMsgs {
            scenario: "shm/tp-busy/64B-b32",
            min: 20e6,
        },
    ),
    (
        "mesh.call, 64 B, 256 in flight from one runtime thread vs one at a time",
        Goal::ThroughputRatio {
            a: "mesh/tp-default/64B-b256",
            b: "mesh/tp-default/64B",
            min: 3.0,
        },
    ),
    (
        "mesh.call_many, 64 B, 256 per batch from one task vs one call at a time",
        Goal::ThroughputRatio {
            a: "mesh-many/tp-default/64B-b256",
            b: "mesh/tp-default/64B",
            min: 3.0,
        },
    ),
    (
        "pub/sub echo round trip vs mesh.call (64 B)",
        Goal::RoundTripRatio {
            a: "pubsub-echo/rt-default/64B",
            b: "mesh/rt-default/64B",
            max: 1.5,
        },
    ),
    (
        "pub/sub echo round trip, p99 vs p50 (64 B)",
        Goal::TailRatio {
            scenario: "pubsub-echo/rt-default/64B",
            max: 3.0,
        },
    ),
    (
        "pub/sub 1 -> 1, one publish per message (64 B)",
        Goal::MinMsgs {
            scenario: "pubsub-1sub/tp-default/64B",
            min: 5e6,
        },
    ),
    (
        "pub/sub 1 -> 1, publish_many of 32 (64 B)",
        Goal::MinMsgs {
            scenario: "pubsub-1sub/tp-default/64B-b32",
            min: 20e6,
        },
    ),
    (
        "pub/sub 1 -> 4 deliveries/s vs 1 -> 1 msgs/s, one publish per message",
        Goal::DeliveriesRatio {
            a: "pubsub-4sub/tp-default/64B",
            fan_out: 4.0,
            b: "pubsub-1sub/tp-default/64B",
            min: 1.0,
        },
    ),
    (
        "served mesh.call CPU per call vs a Unix-socket echo, 1,000 calls/s",
        Goal::CpuPerCallRatio {
            a: "mesh/cpu-default/64B-r1000",
            b: "uds/cpu/64B-r1000",
            max: 1.0,
        },
    ),
    (
        "served mesh.call CPU per call vs a Unix-socket echo, 10,000 calls/s",
        Goal::CpuPerCallRatio {
            a: "mesh/cpu-default/64B-r10000",
            b: "uds/cpu/64B-r10000",
            max: 1.0,
        },
    ),
    (
        "served mesh.call CPU per call vs a Unix-socket echo, 100,000 calls/s",
        Goal::CpuPerCallRatio {
            a: "mesh/cpu-default/64B-r100000",
            b: "uds/cpu/64B-r100000",
            max: 1.0,
        },
    ),
    (
        "200 idle services in one process, share of a core",
        Goal::MaxCoreShare {
            scenario: "mesh-idle-200svc/cpu-default/64B-r0",
            max: 0.005,
        },
    ),
    (
        "shm one-way throughput, 64 KiB",
        Goal::MinGbps {
            scenario: "shm/tp-busy/64KiB-b32",
            min: 5.0,
        },
    ),
    (
        "picking one of three instances, p2c",
        Goal::MaxP50 {
            scenario: "pick-p2c/rt/16B",
            max_ns: 50.0,
        },
    ),
    (
        "picking one of three instances, round robin",
        Goal::MaxP50 {
            scenario: "pick-round-robin/rt/16B",
            max_ns: 50.0,
        },
    ),
    (
        "picking one of three instances, Maglev on a 16 B key",
        Goal::MaxP50 {
            scenario: "pick-maglev/rt/16B",
            max_ns: 50.0,
        },
    ),
];

/// One goal checked against a run.
struct Checked {
    goal: &'static str,
    measured: String,
    target: String,
    met: bool,
}

fn check_targets(report: &Report) -> Vec<Checked> {
    let row = |name: &str| report.results.iter().find(|r| r.name == name);
    let p50 = |name: &str| match row(name)?.stats {
        Stats::RoundTrip { p50_ns, .. } => Some(p50_ns),
        Stats::Throughput { .. } | Stats::Cpu { .. } => None,
    };
    let p99 = |name: &str| match row(name)?.stats {
        Stats::RoundTrip { p99_ns, .. } => Some(p99_ns),
        Stats::Throughput { .. } | Stats::Cpu { .. } => None,
    };
    let tp = |name: &str| match row(name)?.stats {
        Stats::Throughput {
            msgs_per_s,
            gb_per_s,
        } => Some((msgs_per_s, gb_per_s)),
        Stats::RoundTrip { .. } | Stats::Cpu { .. } => None,
    };
    let cpu = |name: &str| match row(name)?.stats {
        Stats::Cpu {
            us_per_msg,
            core_share,
            ..
        } => Some((us_per_msg, core_share)),
        Stats::RoundTrip { .. } | Stats::Throughput { .. } => None,
    };
    GOALS
        .iter()
        .filter_map(|(goal, g)| {
            let (measured, target, met) = match *g {
                Goal::RoundTripRatio { a, b, max } => {
                    let r = p50(a)? / p50(b)?;
                    let target = if max < 1.0 {
                        format!("≤ {max:.2}×")
                    } else {
                        format!("≤ {max:.1}×")
                    };
                    (format!("{r:.2}×"), target, r <= max)
                }
                Goal::MinMsgs { scenario, min } => {
                    let (m, _) = tp(scenario)?;
                    (
                        format!("{} msgs/s", fmt_rate(m)),
                        format!("≥ {} msgs/s", fmt_rate(min)),
                        m >= min,
                    )
                }
                Goal::MaxP50 { scenario, max_ns } => {
                    let ns = p50(scenario)?;
                    (fmt_ns(ns), format!("≤ {}", fmt_ns(max_ns)), ns <= max_ns)
                }
                Goal::MinGbps { scenario, min } => {
                    let (_, g) = tp(scenario)?;
                    (format!("{g:.2} GB/s"), format!("≥ {min:.1} GB/s"), g >= min)
                }
                Goal::ThroughputRatio { a, b, min } => {
                    let r = tp(a)?.0 / tp(b)?.0;
                    (format!("{r:.2}×"), format!("≥ {min:.1}×"), r >= min)
                }
                Goal::DeliveriesRatio { a, fan_out, b, min } => {
                    let r = tp(a)?.0 * fan_out / tp(b)?.0;
                    (format!("{r:.2}×"), format!("≥ {min:.1}×"), r >= min)
                }
                Goal::TailRatio { scenario, max } => {
                    let r = p99(scenario)? / p50(scenario)?;
                    (format!("{r:.2}×"), format!("≤ {max:.1}×"), r <= max)
                }
                Goal::CpuPerCallRatio { a, b, max } => {
                    let r = cpu(a)?.0? / cpu(b)?.0?;
                    (format!("{r:.2}×"), format!("≤ {max:.1}×"), r <= max)
                }
                Goal::MaxCoreShare { scenario, max } => {
                    let share = cpu(scenario)?.1;
                    (
                        format!("{:.3} %", share * 100.0),
                        format!("≤ {:.1} %", max * 100.0),
                        share <= max,
                    )
                }
            };
            Some(Checked {
                goal,
                measured,
                target,
                met,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_against_the_run() {
        let json = r#"{
          "schema": 1, "quick": false, "runs": 5, "filters": [], "pinning": null,
          "timer_overhead_ns": 20.0,
          "results": [
            {"name": "spin-floor/rt-busy/8B", "transport": "spin-floor", "size": 8, "wait": "busy",
             "iterations": 10, "warmup": 1, "batch": 1, "kind": "round_trip",
             "p50_ns": 100.0, "p99_ns": 1.0, "p999_ns": 1.0, "vs_uds": null, "vs_floor": 1.0},
            {"name": "shm/rt-busy/64B", "transport": "shm", "size": 64, "wait": "busy",
             "iterations": 10, "warmup": 1, "batch": 1, "kind": "round_trip",
             "p50_ns": 250.0, "p99_ns": 1.0, "p999_ns": 1.0, "vs_uds": null, "vs_floor": 2.5},
            {"name": "shm/rt-default/64B", "transport": "shm", "size": 64, "wait": "default",
             "iterations": 10, "warmup": 1, "batch": 1, "kind": "round_trip",
             "p50_ns": 500.0, "p99_ns": 1.0, "p999_ns": 1.0, "vs_uds": null, "vs_floor": 5.0},
            {"name": "shm/tp-busy/64B-b32", "transport": "shm", "size": 64, "wait": "busy",
             "iterations": 10, "warmup": 1, "batch": 32, "kind": "throughput",
             "msgs_per_s": 30e6, "gb_per_s": 1.9, "vs_uds": null, "vs_floor": null}
          ]
        }"#;
        let report: Report = serde_json::from_str(json).unwrap();
        let checked = check_targets(&report);
        // Goals whose scenarios did not run are left out (the Node ones here).
        assert_eq!(checked.len(), 3);
        assert!(!checked[0].met, "2.5x the floor misses the 2x goal");
        assert_eq!(checked[0].measured, "2.50×");
        assert!(checked[1].met, "default at 2x busy meets the 3x goal");
        assert!(checked[2].met);
        let machine = test_machine();
        let md = render(&report, &machine, "today");
        assert!(md.contains("## Targets") && md.contains("**no**"), "{md}");
    }

    #[test]
    fn node_goals_compare_with_the_node_net_echo() {
        let row = |name: &str, transport: &str, stats: &str| {
            format!(
                r#"{{"name": "{name}", "transport": "{transport}", "size": 64, "wait": "default",
                "iterations": 10, "warmup": 1, "batch": 1000, {stats},
                "vs_uds": null, "vs_floor": null}}"#
            )
        };
        let rt = |p50: f64| {
            format!(r#""kind": "round_trip", "p50_ns": {p50}, "p99_ns": 1.0, "p999_ns": 1.0"#)
        };
        let tp = |m: f64| format!(r#""kind": "throughput", "msgs_per_s": {m}, "gb_per_s": 0.01"#);
        let rows = [
            row("node-net/rt-default/64B", "node-net", &rt(60_000.0)),
            row("node-commy/rt-default/64B", "node-commy", &rt(45_000.0)),
            row("node-net/tp-default/64B-b1000", "node-net", &tp(300_000.0)),
            row(
                "node-commy/tp-default/64B-b1000",
                "node-commy",
                &tp(600_000.0),
            ),
        ];
        let report = report_of(&rows);
        let checked = check_targets(&report);
        assert_eq!(checked.len(), 2);
        assert!(checked[0].met, "0.75x the echo meets the 1x goal");
        assert_eq!(checked[0].measured, "0.75×");
        assert!(!checked[1].met, "2x the echo misses the 3x goal");
        assert_eq!(checked[1].measured, "2.00×");
        let machine = test_machine();
        let md = render(&report, &machine, "today");
        assert!(md.contains("Node rows (`node-*`)"), "{md}");
    }

    #[test]
    fn pubsub_goals_count_deliveries_and_the_tail() {
        let row = |name: &str, stats: &str| {
            format!(
                r#"{{"name": "{name}", "transport": "t", "size": 64, "wait": "default",
                "iterations": 10, "warmup": 1, "batch": 1, {stats},
                "vs_uds": null, "vs_floor": null}}"#
            )
        };
        let tp = |m: f64| format!(r#""kind": "throughput", "msgs_per_s": {m}, "gb_per_s": 0.01"#);
        let rows = [
            row(
                "pubsub-echo/rt-default/64B",
                r#""kind": "round_trip", "p50_ns": 1000.0, "p99_ns": 3500.0, "p999_ns": 9.0"#,
            ),
            row("pubsub-1sub/tp-default/64B", &tp(2e6)),
            row("pubsub-4sub/tp-default/64B", &tp(0.6e6)),
        ];
        let report = report_of(&rows);
        let checked = check_targets(&report);
        let goal = |name: &str| checked.iter().find(|c| c.goal.starts_with(name)).unwrap();
        let tail = goal("pub/sub echo round trip, p99");
        assert_eq!((tail.measured.as_str(), tail.met), ("3.50×", false));
        let fan = goal("pub/sub 1 -> 4");
        assert_eq!((fan.measured.as_str(), fan.met), ("1.20×", true));
        assert!(!goal("pub/sub 1 -> 1, one publish").met, "2 M misses 5 M");
    }

    #[test]
    fn cpu_goals_compare_with_the_socket_at_the_same_rate() {
        let row = |name: &str, rate: u64, us: &str, share: f64| {
            format!(
                r#"{{"name": "{name}", "transport": "t", "size": 64, "wait": "default",
                "iterations": 10, "warmup": 1, "batch": {rate}, "kind": "cpu", "rate": {rate},
                "achieved": {rate}, "us_per_msg": {us}, "core_share": {share},
                "vs_uds": null, "vs_floor": null}}"#
            )
        };
        let rows = [
            row("uds/cpu/64B-r1000", 1000, "40.0", 0.04),
            row("mesh/cpu-default/64B-r1000", 1000, "20.0", 0.02),
            row("mesh-idle-200svc/cpu-default/64B-r0", 0, "null", 0.01),
        ];
        let report = report_of(&rows);
        let checked = check_targets(&report);
        let goal = |name: &str| checked.iter().find(|c| c.goal.starts_with(name)).unwrap();
        let per_call = goal("served mesh.call CPU per call vs a Unix-socket echo, 1,000");
        assert_eq!((per_call.measured.as_str(), per_call.met), ("0.50×", true));
        let idle = goal("200 idle services");
        assert_eq!((idle.measured.as_str(), idle.met), ("1.000 %", false));
        let md = render(&report, &test_machine(), "today");
        assert!(md.contains("## CPU of the serving process"), "{md}");
        assert!(
            md.contains("| `mesh-idle-200svc/cpu-default/64B-r0` | t | default | idle |"),
            "{md}"
        );
    }

    /// A report of a run whose results are `rows` (JSON objects).
    fn report_of(rows: &[String]) -> Report {
        let json = format!(
            r#"{{"schema": 1, "quick": false, "runs": 5, "filters": [], "pinning": null,
            "timer_overhead_ns": 20.0, "results": [{}]}}"#,
            rows.join(",")
        );
        serde_json::from_str(&json).unwrap()
    }

    /// The machine the rendering tests describe.
    fn test_machine() -> Machine {
        Machine {
            cpu: "Test CPU".into(),
            cores: 2,
            virtualized: false,
            memory: "1.0 GiB".into(),
            kernel: "6.1.0".into(),
            rustc: "rustc 1.95.0".into(),
        }
    }

    const SAMPLE: &str = r#"{
      "schema": 1, "quick": true, "runs": 3, "filters": [],
      "pinning": {"parent_cpu": 0, "child_cpu": 1, "smt_siblings": false},
      "timer_overhead_ns": 21.0,
      "results": [
        {"name": "uds/rt/64B", "transport": "uds", "about": "x", "size": 64, "wait": "blocking",
         "iterations": 1000, "warmup": 100, "batch": 1, "kind": "round_trip",
         "p50_ns": 9500.0, "p99_ns": 15000.0, "p999_ns": 40000.0, "vs_uds": 1.0, "vs_floor": 47.5},
        {"name": "uds/tp/64KiB", "transport": "uds", "about": "y", "size": 65536, "wait": "blocking",
         "iterations": 500, "warmup": 50, "batch": 1, "kind": "throughput",
         "msgs_per_s": 52000.0, "gb_per_s": 3.41, "vs_uds": 1.0, "vs_floor": null}
      ]
    }"#;

    #[test]
    fn python_rows_render_with_their_method_and_target() {
        let py = r#"{"runs": 5, "quick": false, "pinned": false, "results": [
            {"name": "python/commy/64B", "transport": "commy mesh.call, Python to Python",
             "size": 64, "wait": "default", "iterations": 20000, "warmup": 2000, "batch": 1,
             "kind": "round_trip", "p50_ns": 10000.0, "p99_ns": 20000.0, "p999_ns": 40000.0,
             "vs_uds": null, "vs_floor": null},
            {"name": "python/pyzmq-ipc/64B", "transport": "pyzmq REQ/REP over ipc://",
             "size": 64, "wait": "default", "iterations": 20000, "warmup": 2000, "batch": 1,
             "kind": "round_trip", "p50_ns": 100000.0, "p99_ns": 150000.0, "p999_ns": 200000.0,
             "vs_uds": null, "vs_floor": null}]}"#;
        let py: PythonReport = serde_json::from_str(py).unwrap();
        let report = Report {
            schema: SCHEMA,
            quick: false,
            runs: 5,
            filters: vec!["python".into()],
            pinning: None,
            timer_overhead_ns: 0.0,
            results: py.results,
            harness: false,
            python_pinned: Some(py.pinned),
        };
        let machine = test_machine();
        let md = render(&report, &machine, "2025-01-02 03:04 UTC");
        assert!(md.contains("## Python SDK"), "{md}");
        assert!(!md.contains("## How the numbers are taken"), "{md}");
        assert!(md.contains("not pinned"), "{md}");
        assert!(
            md.contains("| `python/commy/64B` | commy mesh.call, Python to Python |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| Python round trip through commy vs pyzmq REQ/REP ipc:// (64 B) | 0.10× | ≤ 0.33× | yes |"
            ),
            "{md}"
        );
    }

    #[test]
    fn renders_both_tables_from_harness_json() {
        let report: Report = serde_json::from_str(SAMPLE).unwrap();
        let machine = Machine {
            virtualized: true,
            ..test_machine()
        };
        let md = render(&report, &machine, "2025-01-02 03:04 UTC");
        assert!(md.starts_with("# Commy benchmarks\n"));
        assert!(md.contains("**Quick run**"));
        assert!(md.contains("- Date: 2025-01-02 03:04 UTC"));
        assert!(md.contains("- CPU: Test CPU (2 logical CPUs, virtual machine"));
        assert!(md.contains("pinned to CPU 0 and the peer to CPU 1 (not SMT siblings"));
        assert!(md.contains(
            "| `uds/rt/64B` | uds | blocking | 64 B | 9500 ns | 15.0 µs | 40.0 µs | 1.00× | 47.50× | 1000 (+100) |"
        ));
        assert!(md.contains(
            "| `uds/tp/64KiB` | uds | blocking | 64 KiB | 1 | 52.0 k | 3.41 | 1.00× | 500 (+50) |"
        ));
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(fmt_ns(123.4), "123 ns");
        assert_eq!(fmt_ns(12_345.0), "12.3 µs");
        assert_eq!(fmt_ns(999_000.0), "999.0 µs");
        assert_eq!(fmt_ns(12_345_678.0), "12.35 ms");
        assert_eq!(fmt_size(64), "64 B");
        assert_eq!(fmt_size(1024), "1 KiB");
        assert_eq!(fmt_size(1536), "1536 B");
        assert_eq!(fmt_size(4 << 20), "4 MiB");
        assert_eq!(fmt_rate(2_500_000.0), "2.50 M");
        assert_eq!(fmt_ratio(None), "—");
    }
}
