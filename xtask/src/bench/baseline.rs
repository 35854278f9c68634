//! `cargo xtask bench --baseline REV`: the harness of a git revision and the
//! current one, run alternately on this machine, compared scenario by
//! scenario.
//!
//! A change to the hot path has to show a before/after measured on one
//! machine in one sitting. On a shared, noisy machine two separate runs
//! minutes apart differ by more than most changes do, so the two harnesses
//! take turns, a run each (a run does every selected scenario once):
//! baseline run 1, current run 1, baseline run 2, ... A slow spell then
//! reaches both sides, and the medians across runs leave it out.
//!
//! REV is checked out with `git worktree add --detach` into
//! `target/baseline/<first 12 hex digits>` (kept, and reused while it is at
//! that commit) and its harness is built there with the target dir
//! `target/baseline-target`, shared by every revision so that the
//! dependencies are built once. Both executables are copied to
//! `target/baseline/bin/` first, so that a build in the shared checkout
//! cannot swap one of them in the middle of the measurement.
//!
//! Progress goes to stderr and the table alone to stdout, so that it can be
//! redirected into a file.
//!
//! Only the Rust harness's scenarios are compared: the `node-*` ones need the
//! revision's Node addon and the `python/*` ones its wheel.

use std::path::{Path, PathBuf};

use super::{BenchArgs, BenchError, Report, SCHEMA, Stats, fmt_ns, fmt_rate};
use crate::cmd::Cmd;
use crate::machine::{Machine, utc_now};

/// Where the worktrees and the copied executables live, under the
/// repository root.
const BASELINE_DIR: &str = "target/baseline";
/// The target dir of the baseline builds, under the repository root.
const BASELINE_TARGET: &str = "target/baseline-target";
/// The harness's executable name.
const HARNESS: &str = "commy-bench";
/// Hex digits of the commit id naming a worktree.
const SHORT: usize = 12;

/// Builds both harnesses, runs them alternately and prints the comparison.
pub(super) fn run(root: &Path, args: &BenchArgs, rev: &str) -> Result<(), BenchError> {
    let commit = resolve(root, rev)?;
    let short = &commit[..SHORT.min(commit.len())];
    if !has_harness(root, &commit) {
        return Err(BenchError::NoHarness {
            rev: rev.to_owned(),
        });
    }

    // What the current harness is built from, said before it is built.
    let current_tree = describe_current(root);
    let current = build(root, build_cmd())?;
    let current = freeze(root, &current, "current")?;
    let selection = select(&list(root, &current)?, &args.filters);
    if !selection.left_out.is_empty() && !selection.names.is_empty() {
        eprintln!(
            "xtask bench: --baseline compares the Rust harness's scenarios only; left out: {}",
            selection.left_out.join(", ")
        );
    }
    if selection.names.is_empty() {
        return Err(if selection.left_out.is_empty() {
            BenchError::NothingRan {
                filters: args.filters.clone(),
            }
        } else {
            BenchError::BaselineRustOnly {
                left_out: selection.left_out,
            }
        });
    }

    let tree = worktree(root, &commit)?;
    let baseline = build(
        root,
        build_cmd()
            .arg("--target-dir")
            .arg(root.join(BASELINE_TARGET))
            .cwd(&tree),
    )?;
    let baseline = freeze(root, &baseline, short)?;
    let baseline_knows = list(root, &baseline)?;
    let for_baseline: Vec<String> = selection
        .names
        .iter()
        .filter(|n| baseline_knows.contains(n))
        .cloned()
        .collect();

    let runs = args.runs.unwrap_or(if args.quick { 3 } else { 5 });
    let mut baseline_runs = Vec::new();
    let mut current_runs = Vec::new();
    for i in 1..=runs {
        if !for_baseline.is_empty() {
            eprintln!("xtask bench: run {i}/{runs}, baseline {short}");
            baseline_runs.push(run_once(root, &baseline, &for_baseline, args.quick)?);
        }
        eprintln!("xtask bench: run {i}/{runs}, current");
        current_runs.push(run_once(root, &current, &selection.names, args.quick)?);
    }

    let machine = Machine::detect(root);
    let header = Header {
        rev: rev.to_owned(),
        commit: short.to_owned(),
        current: current_tree,
        runs,
        quick: args.quick,
        machine: format!(
            "{} ({} logical CPUs{})",
            machine.cpu,
            machine.cores,
            if machine.virtualized {
                ", virtual machine"
            } else {
                ""
            }
        ),
        date: utc_now(),
    };
    let rows = compare(
        &selection.names,
        &baseline_knows,
        &baseline_runs,
        &current_runs,
    );
    print!("{}", render(&header, &rows));
    Ok(())
}

/// `cargo build` of the harness in release mode, reporting artifacts as JSON.
fn build_cmd() -> Cmd {
    Cmd::cargo().args([
        "build",
        "--release",
        "--bin",
        HARNESS,
        "--message-format=json-render-diagnostics",
    ])
}

/// The full commit id `rev` names.
fn resolve(root: &Path, rev: &str) -> Result<String, BenchError> {
    Cmd::new("git")
        .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .probe(root)
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() >= SHORT && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| BenchError::BadRevision {
            rev: rev.to_owned(),
        })
}

/// Whether `commit`'s benches crate has the `commy-bench` executable.
fn has_harness(root: &Path, commit: &str) -> bool {
    Cmd::new("git")
        .args(["show", &format!("{commit}:benches/Cargo.toml")])
        .probe(root)
        .is_some_and(|manifest| manifest.contains(&format!("name = \"{HARNESS}\"")))
}

/// A git command run in `dir`.
fn git_in(dir: &Path) -> Cmd {
    Cmd::new("git").arg("-C").arg(dir)
}

/// The worktree of `commit` under [`BASELINE_DIR`]: made, reused, or moved
/// to `commit` if it was left at another one.
fn worktree(root: &Path, commit: &str) -> Result<PathBuf, BenchError> {
    let dir = root
        .join(BASELINE_DIR)
        .join(&commit[..SHORT.min(commit.len())]);
    let problem = |problem: String| BenchError::Worktree {
        path: dir.display().to_string(),
        problem,
    };
    if dir.exists() {
        // Inside the repository, git finds the main worktree from any folder
        // that is not a worktree itself: check that this one is.
        let top = git_in(&dir)
            .args(["rev-parse", "--show-toplevel"])
            .probe(root);
        let is_worktree = dir.join(".git").is_file()
            && top.is_some_and(|t| {
                Path::new(t.trim()).canonicalize().ok() == dir.canonicalize().ok()
            });
        if !is_worktree {
            return Err(problem(
                "exists but is not a git worktree: delete it and run again".to_owned(),
            ));
        }
        let changes = git_in(&dir)
            .args(["status", "--porcelain", "--untracked-files=no"])
            .stdout(root)
            .map_err(BenchError::Git)?;
        if !changes.trim().is_empty() {
            return Err(problem(format!(
                "has local changes: `git worktree remove --force {}` drops it (and them), \
                 then run again",
                dir.display()
            )));
        }
        let head = git_in(&dir)
            .args(["rev-parse", "HEAD"])
            .stdout(root)
            .map_err(BenchError::Git)?;
        if head.trim() == commit {
            eprintln!("xtask bench: reusing the worktree {}", dir.display());
        } else {
            let checkout = git_in(&dir).args(["checkout", "--quiet", "--detach", commit]);
            eprintln!("xtask bench: $ {}", checkout.display());
            checkout.stdout(root).map_err(BenchError::Git)?;
        }
    } else {
        // A worktree deleted without git (`cargo clean`) is still registered.
        Cmd::new("git")
            .args(["worktree", "prune"])
            .stdout(root)
            .map_err(BenchError::Git)?;
        let add = Cmd::new("git")
            .args(["worktree", "add", "--detach"])
            .arg(&dir)
            .arg(commit);
        eprintln!("xtask bench: $ {}", add.display());
        add.stdout(root).map_err(BenchError::Git)?;
    }
    Ok(dir)
}

/// Runs a harness build and returns the executable it reports.
fn build(root: &Path, cmd: Cmd) -> Result<PathBuf, BenchError> {
    eprintln!("xtask bench: $ {}", cmd.display());
    let messages = cmd.stdout(root)?;
    built_executable(&messages).ok_or_else(|| BenchError::NoExecutable { cmd: cmd.display() })
}

/// The harness executable among cargo's JSON messages (the last reported).
fn built_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == HARNESS)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

/// Copies `exe` to `target/baseline/bin/commy-bench-<label>` (through a
/// rename, so a copy still running elsewhere is not overwritten in place).
fn freeze(root: &Path, exe: &Path, label: &str) -> Result<PathBuf, BenchError> {
    let dir = root.join(BASELINE_DIR).join("bin");
    let dest = dir.join(format!("{HARNESS}-{label}"));
    let tmp = dir.join(format!(".{HARNESS}-{label}.{}", std::process::id()));
    let write_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| BenchError::Write { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
    std::fs::copy(exe, &tmp).map_err(write_err(&tmp))?;
    std::fs::rename(&tmp, &dest).map_err(write_err(&dest))?;
    Ok(dest)
}

/// The scenario names a harness knows (`commy-bench list`).
fn list(root: &Path, harness: &Path) -> Result<Vec<String>, BenchError> {
    let out = Cmd::new(harness).arg("list").stdout(root)?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// One run of `names` (`--runs 1`, each name as a filter) and its report.
fn run_once(
    root: &Path,
    harness: &Path,
    names: &[String],
    quick: bool,
) -> Result<Report, BenchError> {
    let mut cmd = Cmd::new(harness)
        .args(["run", "--json", "--runs", "1"])
        .args(quick.then_some("--quick"));
    for n in names {
        cmd = cmd.args(["--filter", n]);
    }
    eprintln!("xtask bench: $ {}", cmd.display());
    let report: Report = serde_json::from_str(&cmd.stdout(root)?)?;
    if report.schema != SCHEMA {
        return Err(BenchError::Schema {
            found: report.schema,
        });
    }
    Ok(report)
}

/// `HEAD 0123456789ab` and whether tracked files have changes.
fn describe_current(root: &Path) -> String {
    let head = Cmd::new("git")
        .args(["rev-parse", "HEAD"])
        .probe(root)
        .map(|h| h.trim().chars().take(SHORT).collect::<String>())
        .unwrap_or_else(|| "unknown".to_owned());
    let dirty = Cmd::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .probe(root)
        .is_some_and(|s| !s.trim().is_empty());
    if dirty {
        format!("the working tree (HEAD {head} with uncommitted changes)")
    } else {
        format!("the working tree (HEAD {head}, no uncommitted changes)")
    }
}

/// The scenarios a baseline comparison runs.
#[derive(Debug, PartialEq, Eq)]
struct Selection {
    /// The Rust harness's scenarios, in the harness's order.
    names: Vec<String>,
    /// Scenarios the filters select that this mode does not run (Node,
    /// Python).
    left_out: Vec<String>,
}

/// The scenarios of `known` (the current harness's list) whose name contains
/// one of `filters` (all if none), without the Node ones; the Node and
/// Python scenarios selected go to `left_out`.
fn select(known: &[String], filters: &[String]) -> Selection {
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let (left_out, names): (Vec<String>, Vec<String>) = known
        .iter()
        .filter(|n| wanted(n))
        .cloned()
        .partition(|n| n.starts_with("node-"));
    let mut left_out = left_out;
    left_out.extend(
        crate::python::BENCH_SCENARIOS
            .iter()
            .filter(|n| wanted(n))
            .map(|n| (*n).to_owned()),
    );
    Selection { names, left_out }
}

/// The statistic compared for a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// The round trip's p50, in nanoseconds (lower is better).
    P50,
    /// Throughput, messages per second (higher is better).
    MsgsPerS,
    /// CPU time of the serving process per call, in microseconds (lower
    /// is better).
    CpuPerCall,
    /// An idle process's share of a core (lower is better).
    CoreShare,
}

/// A row's measure and value.
fn measure(stats: &Stats) -> (Measure, f64) {
    match *stats {
        Stats::RoundTrip { p50_ns, .. } => (Measure::P50, p50_ns),
        Stats::Throughput { msgs_per_s, .. } => (Measure::MsgsPerS, msgs_per_s),
        Stats::Cpu {
            us_per_msg,
            core_share,
            ..
        } => match us_per_msg {
            Some(us) => (Measure::CpuPerCall, us),
            None => (Measure::CoreShare, core_share),
        },
    }
}

/// One scenario of the comparison: each run's value on both sides.
#[derive(Debug, PartialEq)]
struct Compared {
    name: String,
    /// What the values are; `None` if no current run reported the scenario.
    measure: Option<Measure>,
    /// The baseline's values, run by run; `None` if its harness does not
    /// know the scenario.
    baseline: Option<Vec<f64>>,
    /// The current harness's values, run by run.
    current: Vec<f64>,
}

impl Compared {
    /// Median of the current values over median of the baseline's.
    fn ratio(&self) -> Option<f64> {
        let b = median(self.baseline.as_deref()?)?;
        let c = median(&self.current)?;
        Some(c / b).filter(|r| r.is_finite())
    }
}

/// The median (mean of the middle two for an even count); `None` if empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Pairs each selected scenario's values across the alternated runs. A
/// baseline row measuring something else than the current one (a scenario
/// that changed kind) is left out of its values.
fn compare(
    names: &[String],
    baseline_knows: &[String],
    baseline_runs: &[Report],
    current_runs: &[Report],
) -> Vec<Compared> {
    let values = |runs: &[Report], name: &str| -> Vec<(Measure, f64)> {
        runs.iter()
            .filter_map(|r| r.results.iter().find(|row| row.name == name))
            .map(|row| measure(&row.stats))
            .collect()
    };
    names
        .iter()
        .map(|name| {
            let current = values(current_runs, name);
            let m = current.first().map(|(m, _)| *m);
            let baseline = baseline_knows.contains(name).then(|| {
                values(baseline_runs, name)
                    .into_iter()
                    .filter(|(bm, _)| Some(*bm) == m)
                    .map(|(_, v)| v)
                    .collect()
            });
            Compared {
                name: name.clone(),
                measure: m,
                baseline,
                current: current.into_iter().map(|(_, v)| v).collect(),
            }
        })
        .collect()
}

/// What the table's introduction says.
struct Header {
    /// The revision as given.
    rev: String,
    /// Its commit id, shortened.
    commit: String,
    /// What "current" is.
    current: String,
    runs: u32,
    quick: bool,
    machine: String,
    date: String,
}

/// One value in the unit of its measure.
fn fmt_value(m: Measure, v: f64) -> String {
    match m {
        Measure::P50 => fmt_ns(v),
        Measure::MsgsPerS => format!("{} msgs/s", fmt_rate(v)),
        Measure::CpuPerCall => format!("{v:.2} µs CPU/call"),
        Measure::CoreShare => format!("{:.3} % of a core", v * 100.0),
    }
}

/// The run-by-run values, without units (the median column has them).
fn fmt_runs(m: Measure, values: &[f64]) -> String {
    if values.is_empty() {
        return "—".to_owned();
    }
    let one = |v: f64| match m {
        Measure::P50 => fmt_ns(v),
        Measure::MsgsPerS => fmt_rate(v),
        Measure::CpuPerCall => format!("{v:.2}"),
        Measure::CoreShare => format!("{:.3} %", v * 100.0),
    };
    values
        .iter()
        .map(|v| one(*v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The markdown comparison.
fn render(h: &Header, rows: &[Compared]) -> String {
    let mut md = format!(
        "Baseline `{}` ({}) vs current: {}.\n\n\
         - Machine: {}; {}\n\
         - {} run(s) per side, alternated (baseline run 1, current run 1, baseline run 2, ...), \
         each run doing every scenario once{}\n\n",
        h.rev,
        h.commit,
        h.current,
        h.machine,
        h.date,
        h.runs,
        if h.quick {
            "; **quick** (`--quick`): few iterations, do not quote these numbers"
        } else {
            ""
        },
    );
    md.push_str(
        "| scenario | baseline | current | current / baseline | baseline runs | current runs |\n\
         |---|---:|---:|---:|---|---|\n",
    );
    for r in rows {
        let Some(m) = r.measure else {
            md.push_str(&format!("| `{}` | — | no result | — | — | — |\n", r.name));
            continue;
        };
        let current = median(&r.current).map_or_else(|| "—".to_owned(), |v| fmt_value(m, v));
        let (baseline, baseline_runs) = match &r.baseline {
            None => ("not in the baseline's harness".to_owned(), "—".to_owned()),
            Some(b) => (
                median(b).map_or_else(|| "no result".to_owned(), |v| fmt_value(m, v)),
                fmt_runs(m, b),
            ),
        };
        let ratio = r
            .ratio()
            .map_or_else(|| "—".to_owned(), |x| format!("{x:.2}×"));
        md.push_str(&format!(
            "| `{}` | {baseline} | {current} | {ratio} | {baseline_runs} | {} |\n",
            r.name,
            fmt_runs(m, &r.current)
        ));
    }
    md.push_str(
        "\nRound trips compare the p50 (lower is better: a ratio below 1 is faster), \
         throughput the messages per second (higher is better: a ratio above 1 is faster), \
         CPU rows the serving process's CPU per call or share of a core (lower is better). \
         Baseline and current are the medians across runs of each run's value.\n",
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// One run's harness report with round-trip p50s and throughputs.
    fn report(rt: &[(&str, f64)], tp: &[(&str, f64)]) -> Report {
        let row = |name: &str, stats: String| {
            format!(
                r#"{{"name": "{name}", "transport": "t", "size": 64, "wait": "default",
                "iterations": 10, "warmup": 1, "batch": 1, {stats},
                "vs_uds": null, "vs_floor": null}}"#
            )
        };
        let rows: Vec<String> = rt
            .iter()
            .map(|(n, p50)| {
                row(
                    n,
                    format!(
                        r#""kind": "round_trip", "p50_ns": {p50}, "p99_ns": 1.0, "p999_ns": 1.0"#
                    ),
                )
            })
            .chain(tp.iter().map(|(n, m)| {
                row(
                    n,
                    format!(r#""kind": "throughput", "msgs_per_s": {m}, "gb_per_s": 0.1"#),
                )
            }))
            .collect();
        let json = format!(
            r#"{{"schema": 1, "quick": false, "runs": 1, "filters": [], "pinning": null,
            "timer_overhead_ns": 20.0, "results": [{}]}}"#,
            rows.join(",")
        );
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn selection_leaves_out_node_and_python_scenarios() {
        let known = strings(&[
            "uds/rt/64B",
            "mesh/rt-default/64B",
            "mesh/rt-default/4KiB",
            "mesh-tls/rt/64B",
            "node-commy/rt-default/64B",
        ]);
        let s = select(&known, &strings(&["mesh/rt-default"]));
        assert_eq!(
            s.names,
            strings(&["mesh/rt-default/64B", "mesh/rt-default/4KiB"])
        );
        assert!(s.left_out.is_empty());

        let s = select(&known, &strings(&["rt-default/64B"]));
        assert_eq!(s.names, strings(&["mesh/rt-default/64B"]));
        assert_eq!(s.left_out, strings(&["node-commy/rt-default/64B"]));

        let s = select(&known, &strings(&["python/commy/"]));
        assert!(s.names.is_empty());
        assert_eq!(s.left_out, strings(&["python/commy/64B"]));

        let all = select(&known, &[]);
        assert_eq!(all.names.len(), 4);
        assert_eq!(all.left_out.len(), 1 + crate::python::BENCH_SCENARIOS.len());
    }

    #[test]
    fn medians_take_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn runs_are_paired_by_scenario_name() {
        let baseline = [
            report(&[("a/rt/64B", 1000.0), ("b/rt/64B", 500.0)], &[]),
            report(&[("b/rt/64B", 700.0), ("a/rt/64B", 1200.0)], &[]),
            report(&[("a/rt/64B", 1100.0), ("b/rt/64B", 600.0)], &[]),
        ];
        let current = [
            report(
                &[("a/rt/64B", 900.0), ("b/rt/64B", 600.0)],
                &[("n/tp/64B", 2e6)],
            ),
            report(
                &[("a/rt/64B", 800.0), ("b/rt/64B", 600.0)],
                &[("n/tp/64B", 3e6)],
            ),
            report(
                &[("a/rt/64B", 990.0), ("b/rt/64B", 900.0)],
                &[("n/tp/64B", 1e6)],
            ),
        ];
        let names = strings(&["a/rt/64B", "b/rt/64B", "n/tp/64B"]);
        let rows = compare(
            &names,
            &strings(&["a/rt/64B", "b/rt/64B"]),
            &baseline,
            &current,
        );
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].measure, Some(Measure::P50));
        assert_eq!(rows[0].baseline, Some(vec![1000.0, 1200.0, 1100.0]));
        assert_eq!(rows[0].current, vec![900.0, 800.0, 990.0]);
        assert_eq!(rows[0].ratio(), Some(900.0 / 1100.0));
        assert_eq!(rows[1].baseline, Some(vec![500.0, 700.0, 600.0]));
        assert_eq!(rows[1].ratio(), Some(1.0));
        // Not in the baseline's harness: no values, no ratio.
        assert_eq!(rows[2].measure, Some(Measure::MsgsPerS));
        assert_eq!(rows[2].baseline, None);
        assert_eq!(rows[2].current, vec![2e6, 3e6, 1e6]);
        assert_eq!(rows[2].ratio(), None);
    }

    #[test]
    fn a_scenario_that_changed_kind_is_not_compared() {
        let baseline = [report(&[], &[("x/tp/64B", 1e6)])];
        let current = [report(&[("x/tp/64B", 800.0)], &[])];
        let names = strings(&["x/tp/64B"]);
        let rows = compare(&names, &names, &baseline, &current);
        assert_eq!(rows[0].baseline, Some(vec![]));
        assert_eq!(rows[0].ratio(), None);
    }

    #[test]
    fn table_shows_medians_ratios_runs_and_unknown_scenarios() {
        let header = Header {
            rev: "HEAD~1".into(),
            commit: "0123456789ab".into(),
            current: "the working tree (HEAD ba9876543210, no uncommitted changes)".into(),
            runs: 2,
            quick: true,
            machine: "Test CPU (2 logical CPUs)".into(),
            date: "2025-01-02 03:04 UTC".into(),
        };
        let rows = [
            Compared {
                name: "mesh/rt-default/64B".into(),
                measure: Some(Measure::P50),
                baseline: Some(vec![1000.0, 1200.0]),
                current: vec![880.0, 900.0],
            },
            Compared {
                name: "pubsub-1sub/tp-default/64B".into(),
                measure: Some(Measure::MsgsPerS),
                baseline: Some(vec![1e6, 1.2e6]),
                current: vec![1.5e6, 1.6e6],
            },
            Compared {
                name: "new/rt/64B".into(),
                measure: Some(Measure::P50),
                baseline: None,
                current: vec![12_345.0, 12_000.0],
            },
        ];
        let md = render(&header, &rows);
        assert!(
            md.starts_with("Baseline `HEAD~1` (0123456789ab) vs current: the working tree"),
            "{md}"
        );
        assert!(md.contains("**quick**"), "{md}");
        assert!(
            md.contains(
                "| `mesh/rt-default/64B` | 1100 ns | 890 ns | 0.81× | 1000 ns, 1200 ns | 880 ns, 900 ns |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| `pubsub-1sub/tp-default/64B` | 1.10 M msgs/s | 1.55 M msgs/s | 1.41× | 1.00 M, 1.20 M | 1.50 M, 1.60 M |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| `new/rt/64B` | not in the baseline's harness | 12.2 µs | — | — | 12.3 µs, 12.0 µs |"
            ),
            "{md}"
        );
    }

    #[test]
    fn the_harness_executable_is_found_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"serde","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"commy-bench","kind":["bin"]},"executable":"/t/release/commy-bench","fresh":true}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            built_executable(messages),
            Some(PathBuf::from("/t/release/commy-bench"))
        );
        assert_eq!(built_executable(r#"{"reason":"build-finished"}"#), None);
    }
}
