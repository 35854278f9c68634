//! What a service that depends on commy-mesh compiles: the library's
//! normal dependency tree holds no command-line parser (the `commy` binary
//! is commy-cli) and no aws-lc (rustls uses the ring provider everywhere).

use std::process::Command;

/// The crates in commy-mesh's normal (non-dev, non-build) dependency tree.
fn normal_dependencies() -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "commy-mesh",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn the_library_compiles_no_cli_parser_and_no_aws_lc() {
    let deps = normal_dependencies();
    assert!(
        deps.iter().any(|d| d == "commy-shm"),
        "the tree was not read: {deps:?}"
    );
    for unwanted in ["clap", "aws-lc-rs", "aws-lc-sys"] {
        assert!(
            !deps.iter().any(|d| d == unwanted),
            "commy-mesh depends on {unwanted}"
        );
    }
}
