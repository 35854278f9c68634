//! The Python SDK's automation: `cargo xtask wheel` and the `python` test step.

use std::path::Path;

use crate::cmd::{Cmd, CmdError, repo_root};
use crate::test::{Step, TEST_TIMEOUT_SECS};
use crate::tools::{EnsureError, Needs, VENV_DIR, ensure_tools, venv_python};

/// Where `cargo xtask wheel` writes the wheel.
pub(crate) const WHEEL_DIR: &str = "target/wheels";
/// Maturin's own cargo target dir (its builds use other flags than cargo's).
pub(crate) const MATURIN_TARGET: &str = "target/maturin";
/// The venv that gets nothing but the wheel, made anew by each test run.
const FRESH_VENV: &str = "target/venv-wheel";

/// What building and testing the Python SDK installs into `target/venv`
/// (pytest-timeout: a test that hangs fails by its name, not the run).
pub(crate) const PYTHON_NEEDS: &[&str] = &[
    "maturin>=1.9.4,<2",
    "pytest>=8",
    "pytest-timeout>=2.3",
    "mypy>=1.10",
];

fn venv_tool(root: &Path, venv: &str, tool: &str) -> Cmd {
    Cmd::new(root.join(venv).join("bin").join(tool))
}

/// `maturin build --release` of commy-py into [`WHEEL_DIR`].
fn wheel_cmd(root: &Path) -> Cmd {
    venv_tool(root, VENV_DIR, "maturin").args([
        "build",
        "--release",
        "--manifest-path",
        "commy-py/Cargo.toml",
        "--target-dir",
        MATURIN_TARGET,
        "--out",
        WHEEL_DIR,
    ])
}

/// Errors of `cargo xtask wheel`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WheelError {
    /// Maturin could not be installed.
    #[error(transparent)]
    Tools(#[from] EnsureError),
    /// The build failed.
    #[error(transparent)]
    Build(#[from] CmdError),
}

/// `cargo xtask wheel`: installs maturin (into `target/venv`) if needed and
/// builds the abi3 wheel of the `commy` package into `target/wheels/`.
pub(crate) fn wheel(root: &Path) -> Result<(), WheelError> {
    ensure_tools(
        root,
        &Needs {
            python_packages: PYTHON_NEEDS.to_vec(),
            ..Needs::default()
        },
    )?;
    let cmd = wheel_cmd(root);
    println!("xtask wheel: $ {}", cmd.display());
    cmd.run(root)?;
    println!("xtask wheel: the wheel is in {WHEEL_DIR}/");
    Ok(())
}

/// The `python` test step: build the CLI and the wheel; install the wheel
/// alone into a fresh venv and use it; `pip install ./commy-py` from source
/// into the test venv (sharing maturin's target dir, so cargo reuses what
/// the wheel build compiled); pytest; stubtest; mypy --strict.
pub(crate) fn step() -> Step {
    let root = &repo_root();
    let py = || Cmd::new(root.join(venv_python()));
    let fresh_py = venv_tool(root, FRESH_VENV, "python");
    Step {
        name: "python",
        about: "Python SDK: wheel into a fresh venv, pip install ./commy-py, pytest, stubtest, mypy",
        needs: Needs {
            python_packages: PYTHON_NEEDS.to_vec(),
            ..Needs::default()
        },
        commands: vec![
            Cmd::cargo().args(["build", "-p", "commy-cli", "--bin", "commy"]),
            wheel_cmd(root),
            Cmd::new("python3").args(["-m", "venv", "--clear", FRESH_VENV]),
            fresh_py.clone().args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-index",
                "--find-links",
                WHEEL_DIR,
                "commy",
            ]),
            fresh_py.arg(root.join("commy-py/tests/wheel_smoke.py")),
            py().args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--force-reinstall",
                "./commy-py",
            ])
            .env("CARGO_TARGET_DIR", root.join(MATURIN_TARGET)),
            py().args(["-m", "pytest", "-q", "commy-py/tests"])
                .arg(format!("--timeout={TEST_TIMEOUT_SECS}"))
                .env("COMMY_CLI", root.join("target/debug/commy")),
            py().args(["-m", "mypy.stubtest", "commy"]),
            py().args([
                "-m",
                "mypy",
                "--strict",
                "commy-py/python/commy",
                "commy-py/tests",
            ]),
        ],
    }
}

/// The scenarios of `commy-py/bench/rtt.py` (for `cargo xtask bench` filters).
pub(crate) const BENCH_SCENARIOS: &[&str] = &[
    "python/commy/64B",
    "python/commy-asyncio/64B",
    "python/pyzmq-ipc/64B",
    "python/mp-pipe/64B",
];

/// Runs the Python round-trip benchmark against the release wheel (built
/// and installed into `target/venv` first) and returns its JSON.
pub(crate) fn bench(
    root: &Path,
    args: &crate::bench::BenchArgs,
) -> Result<String, crate::bench::BenchError> {
    let mut needs = PYTHON_NEEDS.to_vec();
    needs.push("pyzmq>=25");
    ensure_tools(
        root,
        &Needs {
            python_packages: needs,
            ..Needs::default()
        },
    )?;
    let py = || Cmd::new(root.join(venv_python()));
    for cmd in [
        wheel_cmd(root),
        py().args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--force-reinstall",
            "--no-deps",
            "--no-index",
            "--find-links",
            WHEEL_DIR,
            "commy",
        ]),
    ] {
        println!("xtask bench: $ {}", cmd.display());
        cmd.run(root)?;
    }
    let mut rtt = py().args(["commy-py/bench/rtt.py", "--json"]);
    if args.quick {
        rtt = rtt.arg("--quick");
    }
    if let Some(runs) = args.runs {
        rtt = rtt.args(["--runs", &runs.to_string()]);
    }
    for f in &args.filters {
        rtt = rtt.args(["--filter", f]);
    }
    println!("xtask bench: $ {}", rtt.display());
    Ok(rtt.stdout(root)?)
}
