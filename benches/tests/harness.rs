//! End-to-end tests of the `commy-bench` binary: real peer processes, real
//! sockets and shared memory, the JSON that `cargo xtask bench` reads.
#![forbid(unsafe_code)]

use std::process::Command;

use serde_json::Value;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_commy-bench"))
}

fn names() -> Vec<String> {
    let out = bench().arg("list").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn list_names_the_baselines() {
    let names = names();
    for want in [
        "spin-floor/rt-busy/8B",
        "uds/rt/64B",
        "uds/rt/1KiB",
        "uds/rt/64KiB",
        "uds/tp/64B",
        "uds/tp/1KiB",
        "uds/tp/64KiB",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

/// The scenarios of the Rust transports; the Node ones (`node-*`) need
/// Node.js and the built addon, and run in the `node` step of `cargo xtask
/// test` instead.
const RUST_TRANSPORTS: [&str; 14] = [
    "spin-floor/",
    "uds/",
    "shm/",
    "mesh/",
    "mesh-3inst/",
    "pick-",
    "mesh-many/",
    "mesh-idle-200svc/",
    "mesh-deadline-3ms/",
    "pubsub-",
    "tcp/",
    "rustls/",
    "net-tls/",
    "mesh-tls/",
];

/// One test runs every scenario of the Rust transports (so two spinning
/// processes at most run at a time) with few iterations, and checks the
/// JSON report.
#[test]
fn run_json_reports_every_scenario_with_sane_numbers() {
    let mut cmd = bench();
    cmd.args(["run", "--json", "--runs", "2", "--iterations", "300"]);
    for t in RUST_TRANSPORTS {
        cmd.args(["--filter", t]);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "commy-bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["schema"], 1);
    assert_eq!(report["runs"], 2);
    assert!(report["timer_overhead_ns"].as_f64().unwrap() >= 0.0);
    let results = report["results"].as_array().unwrap();
    let rust = names()
        .into_iter()
        .filter(|n| RUST_TRANSPORTS.iter().any(|t| n.contains(t)))
        .count();
    assert_eq!(results.len(), rust);
    assert!(
        rust + 4 == names().len(),
        "every scenario is Rust or one of the 4 Node ones"
    );

    let p50 = |name: &str| {
        results.iter().find(|r| r["name"] == name).unwrap()["p50_ns"]
            .as_f64()
            .unwrap()
    };
    for r in results {
        assert_eq!(r["iterations"], 300, "{r}");
        assert_eq!(r["warmup"], 30, "{r}");
        match r["kind"].as_str().unwrap() {
            "round_trip" => {
                let (a, b, c) = (
                    r["p50_ns"].as_f64().unwrap(),
                    r["p99_ns"].as_f64().unwrap(),
                    r["p999_ns"].as_f64().unwrap(),
                );
                assert!(0.0 < a && a <= b && b <= c, "{r}");
                assert!(r["vs_floor"].as_f64().unwrap() > 0.0, "{r}");
            }
            "throughput" => {
                let (msgs, gbs) = (
                    r["msgs_per_s"].as_f64().unwrap(),
                    r["gb_per_s"].as_f64().unwrap(),
                );
                let size = r["size"].as_f64().unwrap();
                assert!(msgs > 0.0, "{r}");
                let implied = msgs * size / 1e9;
                assert!((gbs - implied).abs() <= implied * 0.05, "{r}");
            }
            "cpu" => {
                let share = r["core_share"].as_f64().unwrap();
                assert!(share >= 0.0, "{r}");
                if r["rate"] == 0 {
                    assert!(r["us_per_msg"].is_null(), "{r}");
                } else {
                    assert!(r["us_per_msg"].as_f64().unwrap() > 0.0, "{r}");
                    assert!(r["achieved"].as_f64().unwrap() > 0.0, "{r}");
                }
                continue;
            }
            other => panic!("unknown kind {other}"),
        }
        if r["transport"] == "uds" {
            assert_eq!(r["vs_uds"], 1.0, "{r}");
        }
    }
    // The ratios are this run's medians divided, whatever the machine's
    // load made of them (which is faster is for benchmarks to show, not for
    // a test beside others).
    let uds = results.iter().find(|r| r["name"] == "uds/rt/64B").unwrap();
    let ratio = p50("uds/rt/64B") / p50("spin-floor/rt-busy/8B");
    let reported = uds["vs_floor"].as_f64().unwrap();
    assert!(
        (reported - ratio).abs() <= ratio * 0.01,
        "{reported} vs {ratio}"
    );
}

#[test]
fn unknown_filter_is_an_error_naming_it() {
    let out = bench()
        .args(["run", "--filter", "no-such-transport"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-transport"), "{stderr}");
}

#[test]
fn peer_without_a_control_socket_fails_cleanly() {
    let out = bench()
        .arg("__peer")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("peer spec"), "{stderr}");
}
