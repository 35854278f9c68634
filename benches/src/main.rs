//! `commy-bench`: Commy's end-to-end benchmark harness.
//!
//! Every scenario runs between two processes pinned to different cores: the
//! harness re-executes itself as the peer. Round-trip scenarios report
//! p50/p99/p99.9 latency, throughput scenarios messages/s and GB/s, each the
//! median across several runs, with ratios against the baselines measured in
//! the same run (Unix-domain sockets, and the shared-memory spin floor).
//! `cargo xtask bench` runs it and writes docs/BENCHMARKS.md.
#![forbid(unsafe_code)]

mod cpu;
mod floor;
mod mesh;
mod node;
mod peer;
mod pick;
mod pipeline;
mod report;
mod run;
mod scenario;
mod scenarios;
mod shm_link;
mod stats;
mod tls;
mod uds;

use std::process::ExitCode;

use run::{Plan, Profile};
use scenario::Scenario;

const USAGE: &str = "\
usage: commy-bench <command> [options]

commands:
  run      run the benchmarks (all, or those matching --filter)
  demo     a short demo: mesh calls and pub/sub between processes, beside the bare link
  list     list the scenarios

options of `run`:
  --quick            few iterations and runs: a smoke test
  --runs K           repeat each scenario K times (default 5, --quick 3)
  --iterations N     timed iterations/messages per run (default depends on size)
  --filter TEXT      only scenarios whose name contains TEXT (repeatable: any)
  --json             print the results as JSON (what `cargo xtask bench` reads)
  -h, --help         show this message
";

fn selected(all: Vec<Scenario>, filters: &[String]) -> Vec<Scenario> {
    all.into_iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f.as_str())))
        .collect()
}

struct RunArgs {
    plan: Plan,
    json: bool,
}

fn parse_run(args: &[String]) -> Result<Option<RunArgs>, String> {
    let mut quick = false;
    let mut json = false;
    let mut runs = None;
    let mut iterations = None;
    let mut filters = Vec::new();
    let mut it = args.iter();
    let number = |name: &str, v: Option<&String>| {
        v.and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("{name} needs a number >= 1"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => quick = true,
            "--json" => json = true,
            "--runs" => {
                let k = number("--runs", it.next())?;
                runs = Some(u32::try_from(k).map_err(|_| "--runs is too large".to_owned())?);
            }
            "--iterations" => iterations = Some(number("--iterations", it.next())?),
            "--filter" => filters.push(
                it.next()
                    .ok_or_else(|| "--filter needs a text".to_owned())?
                    .clone(),
            ),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let profile = if quick { Profile::Quick } else { Profile::Full };
    Ok(Some(RunArgs {
        plan: Plan {
            profile,
            runs: runs.unwrap_or_else(|| profile.default_runs()),
            iterations,
            filters,
        },
        json,
    }))
}

fn cmd_run(args: &[String]) -> ExitCode {
    let a = match parse_run(args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("commy-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let chosen = selected(scenarios::scenarios(), &a.plan.filters);
    if chosen.is_empty() {
        eprintln!(
            "commy-bench: no scenario matches {:?} (`commy-bench list` lists them)",
            a.plan.filters
        );
        return ExitCode::from(2);
    }
    let report = match run::run(&chosen, &a.plan) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("commy-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("commy-bench: encoding the results as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report::render_text(&report));
    }
    ExitCode::SUCCESS
}

fn cmd_demo(args: &[String]) -> ExitCode {
    let mut quick = false;
    for a in args {
        match a.as_str() {
            "-h" | "--help" => {
                println!(
                    "usage: commy-bench demo [--quick]\n\nMesh calls and a pub/sub stream between \
                     processes, beside the bare link.\n\n  --quick  one short run of each: the \
                     demo works, its numbers are not to quote"
                );
                return ExitCode::SUCCESS;
            }
            "--quick" => quick = true,
            other => {
                eprintln!("commy-bench demo: unexpected argument `{other}`");
                return ExitCode::from(2);
            }
        }
    }
    let chosen: Vec<Scenario> = scenarios::scenarios()
        .into_iter()
        .filter(|s| s.demo)
        .collect();
    println!(
        "Commy demo: for each scenario a service process and a client process, \
         pinned to two cores, find each other on the embedded default mesh \
         (no configuration) and exchange messages: round trips through \
         `mesh.call`, a pub/sub stream to 1 and 4 subscribers, and the same \
         over the bare shared-memory link and a Unix socket for comparison.\n"
    );
    let profile = if quick { Profile::Quick } else { Profile::Demo };
    let plan = Plan {
        profile,
        runs: if quick { 1 } else { profile.default_runs() },
        iterations: None,
        filters: Vec::new(),
    };
    match run::run(&chosen, &plan) {
        Ok(report) => {
            print!("{}", report::render_text(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("commy-bench demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    match command.as_str() {
        peer::PEER_ARG => ExitCode::from(peer::peer_main(&scenarios::scenarios())),
        "run" => cmd_run(rest),
        "demo" => cmd_demo(rest),
        "list" => {
            for s in scenarios::scenarios() {
                println!("{}", s.name);
            }
            ExitCode::SUCCESS
        }
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprint!("commy-bench: unknown command `{other}`\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
