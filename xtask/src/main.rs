//! `cargo xtask`: Commy's automation (`test`, `bench`, `demo`, `npm`, `wheel`).
//!
//! Every command installs what it needs itself, so on a fresh machine the
//! README's two commands are all it takes. This crate deliberately does not
//! depend on any other crate of the workspace: it must build and report even
//! while a crate it tests does not compile.
#![forbid(unsafe_code)]

mod bench;
mod cmd;
mod machine;
mod npm;
mod python;
mod test;
mod tools;

use std::process::ExitCode;

use bench::BenchArgs;
use cmd::{Cmd, repo_root};
use test::TestArgs;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  demo     build the benchmark harness in release mode and run its two-process demo
  test     run every check CI runs (fmt, clippy, tests, loom, python, node), installing what they need
  bench    run the end-to-end benchmarks and rewrite docs/BENCHMARKS.md
  npm      build the Node SDK's native addon into commy-node/ (npm package @commy/node)
  wheel    build the Python package's wheel (maturin) into target/wheels/
  help     show this message (`cargo xtask <command> --help` for a command)
";

const TEST_USAGE: &str = "\
usage: cargo xtask test [--step NAME]... [--skip NAME]... [--list]

Runs the test steps in order and stops at the first failure. Before the first
step, the ensure_tools stage installs what the selected steps need (rustup
components, apt packages, a Python venv in target/venv, npm ci).

options:
  --step NAME   run only this step (repeatable)
  --skip NAME   skip this step (repeatable)
  --list        list the (selected) steps and exit
  -h, --help    show this message
";

const BENCH_USAGE: &str = "\
usage: cargo xtask bench [--quick] [--runs K] [--print] [[--filter] FILTER]...
       cargo xtask bench --baseline REV [--quick] [--runs K] [[--filter] FILTER]...

Builds the benches crate in release mode, runs the commy-bench harness and
rewrites docs/BENCHMARKS.md (machine, date, method, tables).

With --baseline REV it compares git revision REV with the working tree
instead, and only prints: REV is checked out with `git worktree add --detach`
into target/baseline/<commit> (kept and reused) and its harness built there
(target dir target/baseline-target, kept between invocations); then the two
harnesses take turns, baseline run 1, current run 1, baseline run 2, ..., each
run doing every selected scenario once, and a markdown table shows per
scenario the median across runs (round trip p50, or msgs/s), the ratio
current/baseline and every run's value. A scenario REV's harness does not
have is shown as such. This mode compares the Rust harness's scenarios only:
the node-* and python/* scenarios are left out, and filters that select
nothing else are an error.

options:
  --quick          few iterations and runs: a smoke test of the pipeline
  --runs K         repeat each scenario K times (the table shows medians)
  --print          print the report instead of writing docs/BENCHMARKS.md
  --baseline REV   compare with git revision REV (commit, tag, branch, HEAD~1)
  --filter FILTER  the same as FILTER
  FILTER           only scenarios whose name contains FILTER (e.g. `uds`, `rt/64B`)
  -h, --help       show this message
";

const NPM_USAGE: &str = "\
usage: cargo xtask npm

Installs the Node package's build tools (npm ci in commy-node/) and builds its
native addon in release mode with napi-rs: commy-node/commy.<platform>.node,
and the generated binding.js and index.d.ts (both committed).
";

const DEMO_USAGE: &str = "\
usage: cargo xtask demo [--quick]

Builds the benchmark harness in release mode and runs `commy-bench demo`: two
processes pinned to different cores exchange messages over the best transport
available, and the round-trip latency and throughput are printed as a table.

  --quick  a debug build and one short run of each scenario: the demo works
           (cargo xtask test runs it); its numbers are not to quote
";

/// A command-line error: message for stderr.
const WHEEL_USAGE: &str = "\
usage: cargo xtask wheel

Builds the abi3 wheel of the `commy` Python package (commy-py) with maturin,
in release mode with its own target dir (target/maturin), into target/wheels/.
Maturin is installed into the venv target/venv first if missing.
";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn is_help(arg: &str) -> bool {
    arg == "-h" || arg == "--help"
}

fn parse_test(args: &[String]) -> Result<Option<TestArgs>, UsageError> {
    let mut out = TestArgs::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            a if is_help(a) => return Ok(None),
            "--list" => out.list = true,
            "--step" | "--skip" => {
                let name = it
                    .next()
                    .ok_or_else(|| UsageError(format!("{arg} needs a step name")))?;
                if arg == "--step" {
                    out.only.push(name.clone());
                } else {
                    out.skip.push(name.clone());
                }
            }
            other => return Err(UsageError(format!("unknown option `{other}` for test"))),
        }
    }
    Ok(Some(out))
}

fn parse_bench(args: &[String]) -> Result<Option<BenchArgs>, UsageError> {
    let mut out = BenchArgs::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            a if is_help(a) => return Ok(None),
            "--quick" => out.quick = true,
            "--print" => out.print = true,
            "--baseline" => {
                let rev = it
                    .next()
                    .filter(|r| !r.starts_with('-'))
                    .ok_or_else(|| UsageError("--baseline needs a git revision".into()))?;
                out.baseline = Some(rev.clone());
            }
            "--filter" => {
                let filter = it
                    .next()
                    .ok_or_else(|| UsageError("--filter needs a text".into()))?;
                out.filters.push(filter.clone());
            }
            "--runs" => {
                let k = it
                    .next()
                    .and_then(|k| k.parse::<u32>().ok())
                    .filter(|k| *k >= 1)
                    .ok_or_else(|| UsageError("--runs needs a number >= 1".into()))?;
                out.runs = Some(k);
            }
            other if other.starts_with('-') => {
                return Err(UsageError(format!("unknown option `{other}` for bench")));
            }
            filter => out.filters.push(filter.to_owned()),
        }
    }
    Ok(Some(out))
}

fn demo(args: &[String]) -> ExitCode {
    if args.iter().any(|a| is_help(a)) {
        print!("{DEMO_USAGE}");
        return ExitCode::SUCCESS;
    }
    let mut quick = false;
    for a in args {
        if a == "--quick" {
            quick = true;
        } else {
            eprintln!("xtask demo: unexpected argument `{a}`\n\n{DEMO_USAGE}");
            return ExitCode::from(2);
        }
    }
    let cmd = Cmd::cargo()
        .arg("run")
        .args((!quick).then_some("--release"))
        .args([
            "--package",
            "commy-benches",
            "--bin",
            "commy-bench",
            "--",
            "demo",
        ])
        .args(quick.then_some("--quick"));
    println!("xtask demo: $ {}", cmd.display());
    match cmd.run(&repo_root()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask demo: {e}");
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
    let root = repo_root();
    match command.as_str() {
        "test" => match parse_test(rest) {
            Ok(Some(a)) => match test::run(&root, &a) {
                0 => ExitCode::SUCCESS,
                code => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            },
            Ok(None) => {
                print!("{TEST_USAGE}\nsteps:\n");
                for s in test::steps() {
                    println!("  {:<8} {}", s.name, s.about);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xtask test: {e}\n\n{TEST_USAGE}");
                ExitCode::from(2)
            }
        },
        "bench" => match parse_bench(rest) {
            Ok(Some(a)) => match bench::run(&root, &a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask bench: {e}");
                    ExitCode::FAILURE
                }
            },
            Ok(None) => {
                print!("{BENCH_USAGE}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xtask bench: {e}\n\n{BENCH_USAGE}");
                ExitCode::from(2)
            }
        },
        "demo" => demo(rest),
        "npm" => {
            if rest.iter().any(|a| is_help(a)) {
                print!("{NPM_USAGE}");
                return ExitCode::SUCCESS;
            }
            if let Some(other) = rest.first() {
                eprintln!("xtask npm: unexpected argument `{other}`\n\n{NPM_USAGE}");
                return ExitCode::from(2);
            }
            match npm::run(&root) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask npm: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        "wheel" => {
            if rest.iter().any(|a| is_help(a)) {
                print!("{WHEEL_USAGE}");
                return ExitCode::SUCCESS;
            }
            if let Some(other) = rest.first() {
                eprintln!("xtask wheel: unexpected argument `{other}`\n\n{WHEEL_USAGE}");
                return ExitCode::from(2);
            }
            match python::wheel(&root) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask wheel: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        c if c == "help" || is_help(c) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprint!("xtask: unknown command `{other}`\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn test_options() {
        let a = parse_test(&strings(&["--step", "fmt", "--skip", "loom", "--list"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            TestArgs {
                only: vec!["fmt".into()],
                skip: vec!["loom".into()],
                list: true
            }
        );
        assert!(parse_test(&strings(&["--help"])).unwrap().is_none());
        assert!(parse_test(&strings(&["--step"])).is_err());
        assert!(parse_test(&strings(&["fmt"])).is_err());
    }

    #[test]
    fn bench_options() {
        let a = parse_bench(&strings(&["--quick", "uds", "--runs", "3", "floor"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            BenchArgs {
                quick: true,
                runs: Some(3),
                filters: vec!["uds".into(), "floor".into()],
                print: false,
                baseline: None,
            }
        );
        let a = parse_bench(&strings(&[
            "--baseline",
            "HEAD~1",
            "--filter",
            "mesh/rt-default",
            "--runs",
            "2",
            "shm",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            a,
            BenchArgs {
                quick: false,
                runs: Some(2),
                filters: vec!["mesh/rt-default".into(), "shm".into()],
                print: false,
                baseline: Some("HEAD~1".into()),
            }
        );
        assert!(parse_bench(&strings(&["--baseline"])).is_err());
        assert!(parse_bench(&strings(&["--baseline", "--quick"])).is_err());
        assert!(parse_bench(&strings(&["--filter"])).is_err());
        assert!(parse_bench(&strings(&["--runs", "0"])).is_err());
        assert!(parse_bench(&strings(&["--fast"])).is_err());
    }
}
