//! `cargo xtask test`: every check CI runs, as a list of named steps.
//!
//! To add a suite, append a [`Step`] to [`steps`]: a name, a one-line
//! description, what it needs installed ([`Needs`]) and the command(s) to run.

use std::path::Path;
use std::time::Instant;

use crate::cmd::Cmd;
use crate::npm;
use crate::tools::{Needs, ensure_tools};

/// One named check.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// Name used by `--step` / `--skip`.
    pub(crate) name: &'static str,
    /// One line for `--list` and `--help`.
    pub(crate) about: &'static str,
    /// Tools installed by the `ensure_tools` stage before any step runs.
    pub(crate) needs: Needs,
    /// Commands run in order; the step fails at the first failing one.
    pub(crate) commands: Vec<Cmd>,
}

/// All steps, in the order they run.
pub(crate) fn steps() -> Vec<Step> {
    vec![
        Step {
            name: "fmt",
            about: "formatting: cargo fmt --all --check",
            needs: Needs::components(&["rustfmt"]),
            commands: vec![Cmd::cargo().args(["fmt", "--all", "--check"])],
        },
        Step {
            name: "clippy",
            about: "lints, warnings are errors: cargo clippy --workspace --all-targets",
            needs: Needs::components(&["clippy"]),
            commands: vec![Cmd::cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])],
        },
        Step {
            name: "test",
            about: "unit, integration and doc tests: cargo test --workspace",
            // `ip netns` for commy-mesh's two-host test (network namespaces).
            needs: Needs {
                apt_packages: vec!["iproute2"],
                ..Needs::default()
            },
            commands: vec![Cmd::cargo().args(["test", "--workspace"])],
        },
        Step {
            name: "fuzz",
            about: "the fuzz crate: its target built and its corpus replayed (no libFuzzer run)",
            // libfuzzer-sys compiles libFuzzer, which is C++.
            needs: Needs {
                apt_packages: vec!["g++"],
                ..Needs::default()
            },
            // `cargo test` builds the crate's binaries (the target, linked
            // with libFuzzer) for its integration tests, then replays.
            commands: vec![
                Cmd::cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]),
                Cmd::cargo().args(["test", "--manifest-path", "fuzz/Cargo.toml"]),
            ],
        },
        Step {
            name: "loom",
            about: "loom model checks of commy-shm's lock-free code (tests named *loom*)",
            needs: Needs::default(),
            commands: vec![
                Cmd::cargo()
                    .args([
                        "test",
                        "-p",
                        "commy-shm",
                        "--lib",
                        "--release",
                        "--target-dir",
                        "target/loom",
                        "--",
                        "loom",
                    ])
                    .env("RUSTFLAGS", "--cfg loom")
                    .env("LOOM_MAX_PREEMPTIONS", "3"),
            ],
        },
        crate::python::step(),
        node_step(),
        Step {
            name: "demo",
            about: "the README's demo, short: cargo xtask demo --quick",
            needs: Needs::default(),
            commands: vec![Cmd::cargo().args(["xtask", "demo", "--quick"])],
        },
    ]
}

/// How long one Python or Node test may take before it fails as hung.
pub(crate) const TEST_TIMEOUT_SECS: u32 = 300;

/// The Node SDK: build the addon (as `cargo xtask npm` does, in the dev
/// profile to reuse the `test` step's build), fail if that changed the
/// committed generated files, type-check the typings, pack and
/// install the package in a fresh folder, and run its `node --test` suite
/// (which uses the commy CLI for interop), and run the Node benchmark
/// scenarios once, briefly (the harness's own test leaves them out).
fn node_step() -> Step {
    let node = |args: &[&str]| Cmd::new("node").args(args).cwd(npm::PACKAGE);
    Step {
        name: "node",
        about: "Node SDK: addon build, generated files unchanged, tsc, npm pack + install, node --test",
        needs: npm::needs(),
        commands: vec![
            Cmd::cargo().args(["build", "-p", "commy-cli", "--bin", "commy"]),
            npm::build_debug(),
            Cmd::new("git")
                .args(["diff", "--exit-code", "--stat", "--"])
                .args(npm::GENERATED),
            node(&["node_modules/typescript/bin/tsc", "-p", "tsconfig.json"]),
            node(&["support/pack-check.js"]),
            node(&[
                "--test",
                &format!("--test-timeout={}", TEST_TIMEOUT_SECS * 1000),
                "test/",
            ])
            .env("COMMY_CLI", "../target/debug/commy"),
            // The Node benchmark scenarios, briefly: the pipeline works.
            Cmd::cargo().args([
                "run",
                "-q",
                "-p",
                "commy-benches",
                "--bin",
                "commy-bench",
                "--",
                "run",
                "--runs",
                "1",
                "--iterations",
                "300",
                "--filter",
                "node-",
            ]),
        ],
    }
}

/// The mesh settings a developer's environment may carry: tests must not
/// pick them up (a `listen` there would make every suite fight over a port).
/// A step's command without the user's mesh settings: the `COMMY_*`
/// variables are removed, and the config dir (where `config.toml` and the
/// dev CA live) is one of the test run's own, under `target/`.
fn isolated(cmd: Cmd, root: &Path) -> Cmd {
    // Every setting has a `COMMY_<KEY>` variable (and a few more tune
    // the bindings): none of the user's reaches the tests.
    std::env::vars_os()
        .map(|(key, _)| key)
        .filter(|key| key.to_string_lossy().starts_with("COMMY_"))
        .fold(cmd, |cmd, key| cmd.env_remove(key))
        .env("XDG_CONFIG_HOME", root.join("target").join("test-config"))
}

/// Options of `cargo xtask test`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TestArgs {
    /// Run only these steps (all if empty).
    pub(crate) only: Vec<String>,
    /// Skip these steps.
    pub(crate) skip: Vec<String>,
    /// List the steps and exit.
    pub(crate) list: bool,
}

/// A step name given on the command line does not exist.
#[derive(Debug, thiserror::Error)]
#[error("no test step named `{name}`; the steps are: {}", known.join(", "))]
pub(crate) struct UnknownStep {
    name: String,
    known: Vec<&'static str>,
}

/// The steps selected by `--step` / `--skip`, in run order.
pub(crate) fn select(all: Vec<Step>, args: &TestArgs) -> Result<Vec<Step>, UnknownStep> {
    let known: Vec<&'static str> = all.iter().map(|s| s.name).collect();
    for name in args.only.iter().chain(&args.skip) {
        if !known.contains(&name.as_str()) {
            return Err(UnknownStep {
                name: name.clone(),
                known,
            });
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|n| n == s.name))
        .filter(|s| !args.skip.iter().any(|n| n == s.name))
        .collect())
}

/// Runs the selected steps; returns the process exit code.
pub(crate) fn run(root: &Path, args: &TestArgs) -> i32 {
    let selected = match select(steps(), args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xtask test: {e}");
            return 2;
        }
    };
    if args.list {
        for s in &selected {
            println!("{:<8} {}", s.name, s.about);
        }
        return 0;
    }
    if selected.is_empty() {
        eprintln!("xtask test: no step selected");
        return 2;
    }

    let started = Instant::now();
    println!("==> ensure_tools");
    if let Err(e) = ensure_tools(root, &Needs::merge(selected.iter().map(|s| &s.needs))) {
        eprintln!("xtask test: ensure_tools failed: {e}");
        println!("xtask test: 0 passed, {} failed", selected.len());
        return 1;
    }

    let mut passed = 0usize;
    for (i, step) in selected.iter().enumerate() {
        println!(
            "==> [{}/{}] {}: {}",
            i + 1,
            selected.len(),
            step.name,
            step.about
        );
        let t = Instant::now();
        let result = step.commands.iter().try_for_each(|cmd| {
            println!("    $ {}", cmd.display());
            isolated(cmd.clone(), root).run(root)
        });
        let secs = t.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                passed += 1;
                println!("==> {} passed ({secs:.1} s)", step.name);
            }
            Err(e) => {
                let not_run: Vec<_> = selected[i + 1..].iter().map(|s| s.name).collect();
                eprintln!(
                    "xtask test: step `{}` FAILED after {secs:.1} s: {e}",
                    step.name
                );
                if !not_run.is_empty() {
                    eprintln!("xtask test: not run: {}", not_run.join(", "));
                }
                println!("xtask test: {passed} passed, 1 failed");
                return 1;
            }
        }
    }
    println!(
        "==> all {} step(s) passed in {:.1} s",
        selected.len(),
        started.elapsed().as_secs_f64()
    );
    println!("xtask test: {passed} passed, 0 failed");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(steps: &[Step]) -> Vec<&'static str> {
        steps.iter().map(|s| s.name).collect()
    }

    #[test]
    fn step_names_are_unique_and_ordered() {
        let all = steps();
        let mut n = names(&all);
        assert_eq!(
            n,
            [
                "fmt", "clippy", "test", "fuzz", "loom", "python", "node", "demo"
            ]
        );
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), all.len());
    }

    #[test]
    fn select_only_and_skip_keep_run_order() {
        let args = TestArgs {
            only: vec!["loom".into(), "fmt".into()],
            ..TestArgs::default()
        };
        assert_eq!(names(&select(steps(), &args).unwrap()), ["fmt", "loom"]);
        let args = TestArgs {
            skip: vec!["loom".into()],
            ..TestArgs::default()
        };
        assert_eq!(
            names(&select(steps(), &args).unwrap()),
            ["fmt", "clippy", "test", "fuzz", "python", "node", "demo"]
        );
    }

    #[test]
    fn unknown_step_is_named_with_the_alternatives() {
        let args = TestArgs {
            skip: vec!["lint".into()],
            ..TestArgs::default()
        };
        let msg = select(steps(), &args).unwrap_err().to_string();
        assert!(
            msg.contains("`lint`")
                && msg.contains("fmt, clippy, test, fuzz, loom, python, node, demo"),
            "{msg}"
        );
    }

    #[test]
    fn loom_step_uses_its_own_target_dir_and_cfg() {
        let loom = steps().into_iter().find(|s| s.name == "loom").unwrap();
        let line = loom.commands[0].display();
        assert!(line.contains("RUSTFLAGS='--cfg loom'"), "{line}");
        assert!(line.contains("LOOM_MAX_PREEMPTIONS=3"), "{line}");
        assert!(line.contains("--target-dir target/loom"), "{line}");
        assert!(line.ends_with("-- loom"), "{line}");
    }
}
