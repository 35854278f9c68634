//! Results: the JSON document `cargo xtask bench` reads, ratios against the
//! baselines of the same run, and a plain-text table for people.

use serde::Serialize;

use crate::peer::Pinning;
use crate::scenario::{Kind, Wait, size_label};
use crate::scenarios::{FLOOR, NODE_NET, UDS};

/// Version of the JSON layout (xtask checks it).
pub(crate) const SCHEMA: u32 = 1;

/// Everything one harness invocation measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// [`SCHEMA`].
    pub(crate) schema: u32,
    /// Whether this was a `--quick` smoke run.
    pub(crate) quick: bool,
    /// Repetitions of each scenario.
    pub(crate) runs: u32,
    /// Name filters that selected the scenarios (empty = all).
    pub(crate) filters: Vec<String>,
    /// CPUs of the two processes (`None` = not pinned).
    pub(crate) pinning: Option<Pinning>,
    /// Median cost of one clock read, included in every round-trip sample.
    pub(crate) timer_overhead_ns: f64,
    /// One row per scenario.
    pub(crate) results: Vec<Row>,
}

/// One scenario's result: medians across runs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// Scenario name.
    pub(crate) name: String,
    /// Transport name.
    pub(crate) transport: &'static str,
    /// Payload bytes per message.
    pub(crate) size: usize,
    /// How the receiver waits.
    pub(crate) wait: Wait,
    /// Timed iterations / messages per run.
    pub(crate) iterations: u64,
    /// Warm-up iterations / messages per run.
    pub(crate) warmup: u64,
    /// Messages per batch commit.
    pub(crate) batch: u64,
    /// The statistics.
    #[serde(flatten)]
    pub(crate) stats: Stats,
    /// Times faster than the UDS baseline of the same kind and size (for
    /// `node-*` rows: than the Node `net` echo).
    pub(crate) vs_uds: Option<f64>,
    /// Round trip in multiples of the spin floor's.
    pub(crate) vs_floor: Option<f64>,
}

/// Medians across runs of each run's statistics.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Stats {
    /// Round-trip latency percentiles, nanoseconds.
    RoundTrip {
        /// Median of the runs' p50.
        p50_ns: f64,
        /// Median of the runs' p99.
        p99_ns: f64,
        /// Median of the runs' p99.9.
        p999_ns: f64,
    },
    /// One-way throughput.
    Throughput {
        /// Median of the runs' messages per second.
        msgs_per_s: f64,
        /// Median of the runs' payload gigabytes (10^9 B) per second.
        gb_per_s: f64,
    },
    /// The serving process's CPU time at a rate of calls.
    Cpu {
        /// Calls per second asked for (0: idle).
        rate: u64,
        /// Median of the runs' calls per second made (below `rate` when
        /// the transport's round trip is longer than the spacing).
        achieved: f64,
        /// Median of the runs' CPU microseconds per call (none when idle).
        us_per_msg: Option<f64>,
        /// Median of the runs' CPU time over their window: the share of
        /// one core.
        core_share: f64,
    },
}

impl Stats {
    fn kind(&self) -> Kind {
        match self {
            Stats::RoundTrip { .. } => Kind::RoundTrip,
            Stats::Throughput { .. } => Kind::Throughput,
            Stats::Cpu { .. } => Kind::Cpu,
        }
    }
}

/// Fills in `vs_uds` and `vs_floor` from the baselines present in `rows`.
pub(crate) fn compute_ratios(rows: &mut [Row]) {
    let find = |transport: &str, kind: Kind, size: Option<usize>| {
        rows.iter()
            .find(|r| {
                r.transport == transport
                    && r.stats.kind() == kind
                    && size.is_none_or(|s| s == r.size)
            })
            .map(|r| r.stats)
    };
    let ratios: Vec<(Option<f64>, Option<f64>)> = rows
        .iter()
        .map(|r| {
            // The Node rows compare with the Node `net` echo, the others
            // with the Rust Unix-socket baseline.
            let baseline = if r.transport.starts_with("node-") {
                NODE_NET
            } else {
                UDS
            };
            let uds = find(baseline, r.stats.kind(), Some(r.size));
            let floor = find(FLOOR, Kind::RoundTrip, None);
            match r.stats {
                Stats::RoundTrip { p50_ns, .. } => (
                    match uds {
                        Some(Stats::RoundTrip { p50_ns: u, .. }) => Some(u / p50_ns),
                        _ => None,
                    },
                    match floor {
                        Some(Stats::RoundTrip { p50_ns: f, .. }) => Some(p50_ns / f),
                        _ => None,
                    },
                ),
                Stats::Throughput { msgs_per_s, .. } => (
                    match uds {
                        Some(Stats::Throughput { msgs_per_s: u, .. }) => Some(msgs_per_s / u),
                        _ => None,
                    },
                    None,
                ),
                // CPU: the Unix-socket baseline at the same rate, per call.
                Stats::Cpu {
                    rate,
                    us_per_msg: Some(us),
                    ..
                } => (
                    rows.iter().find_map(|b| match b.stats {
                        Stats::Cpu {
                            rate: r,
                            us_per_msg: Some(u),
                            ..
                        } if b.transport == baseline && r == rate => Some(u / us),
                        _ => None,
                    }),
                    None,
                ),
                Stats::Cpu { .. } => (None, None),
            }
        })
        .collect();
    for (r, (vs_uds, vs_floor)) in rows.iter_mut().zip(ratios) {
        r.vs_uds = vs_uds.filter(|x| x.is_finite());
        r.vs_floor = vs_floor.filter(|x| x.is_finite());
    }
}

/// `850 ns`, `12.3 µs`.
pub(crate) fn fmt_ns(ns: f64) -> String {
    if ns < 10_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
}

/// Lays out rows of cells as an aligned text table (first column left, the
/// rest right-aligned).
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = w - cell.chars().count();
            if i == 0 {
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str("  ");
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// The human-readable form of a report.
pub(crate) fn render_text(report: &Report) -> String {
    let mut out = String::new();
    match report.pinning {
        Some(p) => out.push_str(&format!(
            "two processes pinned to CPUs {} and {}; medians of {} run(s) per scenario\n\n",
            p.parent_cpu, p.child_cpu, report.runs
        )),
        None => out.push_str(&format!(
            "two processes, NOT pinned (fewer than two CPUs); medians of {} run(s)\n\n",
            report.runs
        )),
    }
    let rt: Vec<Vec<String>> = report
        .results
        .iter()
        .filter_map(|r| match r.stats {
            Stats::RoundTrip {
                p50_ns,
                p99_ns,
                p999_ns,
            } => Some(vec![
                r.name.clone(),
                size_label(r.size),
                fmt_ns(p50_ns),
                fmt_ns(p99_ns),
                fmt_ns(p999_ns),
                fmt_ratio(r.vs_uds),
                fmt_ratio(r.vs_floor),
            ]),
            Stats::Throughput { .. } | Stats::Cpu { .. } => None,
        })
        .collect();
    if !rt.is_empty() {
        out.push_str("Round-trip latency\n");
        out.push_str(&table(
            &[
                "scenario", "size", "p50", "p99", "p99.9", "vs UDS", "x floor",
            ],
            &rt,
        ));
        out.push('\n');
    }
    let tp: Vec<Vec<String>> = report
        .results
        .iter()
        .filter_map(|r| match r.stats {
            Stats::Throughput {
                msgs_per_s,
                gb_per_s,
            } => Some(vec![
                r.name.clone(),
                size_label(r.size),
                format!("{:.0}", msgs_per_s),
                format!("{gb_per_s:.2}"),
                fmt_ratio(r.vs_uds),
            ]),
            Stats::RoundTrip { .. } | Stats::Cpu { .. } => None,
        })
        .collect();
    if !tp.is_empty() {
        out.push_str("One-way throughput\n");
        out.push_str(&table(
            &["scenario", "size", "msgs/s", "GB/s", "vs UDS"],
            &tp,
        ));
        out.push('\n');
    }
    let cpu: Vec<Vec<String>> = report
        .results
        .iter()
        .filter_map(|r| match r.stats {
            Stats::Cpu {
                achieved,
                us_per_msg,
                core_share,
                ..
            } => Some(vec![
                r.name.clone(),
                format!("{achieved:.0}"),
                us_per_msg.map_or_else(|| "-".to_owned(), |us| format!("{us:.2} µs")),
                format!("{:.2} %", core_share * 100.0),
                fmt_ratio(r.vs_uds),
            ]),
            Stats::RoundTrip { .. } | Stats::Throughput { .. } => None,
        })
        .collect();
    if !cpu.is_empty() {
        out.push_str("CPU of the serving process\n");
        out.push_str(&table(
            &["scenario", "calls/s", "CPU/call", "of a core", "vs UDS"],
            &cpu,
        ));
        out.push('\n');
    }
    out.push_str(
        "vs UDS: times faster than the Unix-socket baseline of the same size (higher is better)\n\
         x floor: round trip in multiples of the shared-memory spin floor (lower is better)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, transport: &'static str, size: usize, stats: Stats) -> Row {
        Row {
            name: name.into(),
            transport,
            size,
            wait: Wait::Blocking,
            iterations: 10,
            warmup: 1,
            batch: 1,
            stats,
            vs_uds: None,
            vs_floor: None,
        }
    }

    fn rt(p50: f64) -> Stats {
        Stats::RoundTrip {
            p50_ns: p50,
            p99_ns: p50 * 2.0,
            p999_ns: p50 * 3.0,
        }
    }

    #[test]
    fn ratios_use_same_kind_and_size() {
        let tp = |m: f64| Stats::Throughput {
            msgs_per_s: m,
            gb_per_s: 1.0,
        };
        let mut rows = vec![
            row("spin-floor/rt-busy/8B", FLOOR, 8, rt(200.0)),
            row("uds/rt/64B", UDS, 64, rt(10_000.0)),
            row("uds/tp/64B", UDS, 64, tp(1e6)),
            row("x/rt/64B", "x", 64, rt(1_000.0)),
            row("x/tp/64B", "x", 64, tp(5e6)),
            row("x/rt/1KiB", "x", 1024, rt(1_000.0)),
        ];
        compute_ratios(&mut rows);
        assert_eq!(rows[1].vs_uds, Some(1.0));
        assert_eq!(rows[1].vs_floor, Some(50.0));
        assert_eq!(rows[3].vs_uds, Some(10.0));
        assert_eq!(rows[3].vs_floor, Some(5.0));
        assert_eq!(rows[4].vs_uds, Some(5.0));
        assert_eq!(rows[4].vs_floor, None);
        assert_eq!(rows[5].vs_uds, None, "no 1 KiB baseline in this run");
    }

    #[test]
    fn json_shape_is_what_xtask_reads() {
        let r = row("uds/rt/64B", UDS, 64, rt(100.0));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "round_trip");
        assert_eq!(v["wait"], "blocking");
        assert_eq!(v["p50_ns"], 100.0);
        assert!(v["vs_uds"].is_null());
    }

    #[test]
    fn text_table_is_aligned() {
        let report = Report {
            schema: SCHEMA,
            quick: false,
            runs: 3,
            filters: vec![],
            pinning: None,
            timer_overhead_ns: 20.0,
            results: vec![row("uds/rt/64B", UDS, 64, rt(9_500.0))],
        };
        let text = render_text(&report);
        assert!(text.contains("NOT pinned"));
        let lines: Vec<&str> = text.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("scenario"))
            .unwrap();
        assert_eq!(
            lines[header],
            "scenario    size      p50      p99    p99.9  vs UDS  x floor"
        );
        assert_eq!(
            lines[header + 2],
            "uds/rt/64B   64B  9500 ns  19.0 µs  28.5 µs       -        -"
        );
    }
}
