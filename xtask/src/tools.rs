//! The `ensure_tools` stage: installs what the selected steps declare they
//! need, so that `cargo xtask test` works on a fresh machine.
//!
//! A step declares [`Needs`]: rustup components, Debian packages, Python
//! packages (installed into a venv under `target/`) and npm projects
//! (`npm ci`). Everything is checked first and installed only if missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::cmd::{Cmd, CmdError};

/// Where the Python venv for the test steps lives, relative to the repo root.
pub(crate) const VENV_DIR: &str = "target/venv";

/// What a step needs installed before it can run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Needs {
    /// rustup components, e.g. `rustfmt`, `clippy`.
    pub(crate) rustup_components: Vec<&'static str>,
    /// Debian packages (checked with `dpkg -s`, installed with `apt-get`).
    pub(crate) apt_packages: Vec<&'static str>,
    /// pip requirement specifiers installed into [`VENV_DIR`].
    pub(crate) python_packages: Vec<&'static str>,
    /// Directories (relative to the repo root) holding a `package-lock.json`
    /// in which to run `npm ci`.
    pub(crate) npm_projects: Vec<&'static str>,
}

impl Needs {
    /// Needs only the given rustup components.
    pub(crate) fn components(names: &[&'static str]) -> Self {
        Self {
            rustup_components: names.to_vec(),
            ..Self::default()
        }
    }

    /// The union of several steps' needs, each item once, in a stable order.
    pub(crate) fn merge<'a>(all: impl IntoIterator<Item = &'a Needs>) -> Needs {
        fn union(sets: &mut BTreeSet<&'static str>, items: &[&'static str]) {
            sets.extend(items.iter().copied());
        }
        let (mut comps, mut apt, mut py, mut npm) = Default::default();
        for n in all {
            union(&mut comps, &n.rustup_components);
            union(&mut apt, &n.apt_packages);
            union(&mut py, &n.python_packages);
            union(&mut npm, &n.npm_projects);
        }
        let v = |s: BTreeSet<&'static str>| s.into_iter().collect::<Vec<_>>();
        Needs {
            rustup_components: v(comps),
            apt_packages: v(apt),
            python_packages: v(py),
            npm_projects: v(npm),
        }
    }
}

/// Installing a needed tool failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum EnsureError {
    /// An install command failed.
    #[error("installing {what} failed: {source}")]
    Install {
        /// What was being installed.
        what: String,
        /// The failing command.
        source: CmdError,
    },
    /// `rustup` is not available, so missing components cannot be added.
    #[error(
        "rustup component(s) {missing:?} are missing and `rustup` is not available to add them; install them with your Rust distribution"
    )]
    NoRustup {
        /// The components that are missing.
        missing: Vec<&'static str>,
    },
    /// An npm project directory has no lock file, so `npm ci` cannot run.
    #[error("`npm ci` needs {lock}, which does not exist")]
    NoLockFile {
        /// The expected lock file.
        lock: PathBuf,
    },
}

/// Makes sure everything in `needs` is installed, installing what is missing.
pub(crate) fn ensure_tools(root: &Path, needs: &Needs) -> Result<(), EnsureError> {
    ensure_components(root, &needs.rustup_components)?;
    ensure_apt(root, &needs.apt_packages)?;
    ensure_venv(root, &needs.python_packages)?;
    for dir in &needs.npm_projects {
        ensure_npm(root, dir)?;
    }
    Ok(())
}

fn install(what: impl Into<String>, cmd: Cmd, root: &Path) -> Result<(), EnsureError> {
    let what = what.into();
    println!("xtask: installing {what}: {}", cmd.display());
    cmd.run(root)
        .map_err(|source| EnsureError::Install { what, source })
}

/// Components from `rustup component list --installed` output that `wanted`
/// still lacks. Installed lines look like `clippy-x86_64-unknown-linux-gnu`.
fn missing_components(installed: &str, wanted: &[&'static str]) -> Vec<&'static str> {
    wanted
        .iter()
        .copied()
        .filter(|name| {
            !installed.lines().map(str::trim).any(|line| {
                line == *name
                    || line
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('-') && is_target_suffix(rest))
            })
        })
        .collect()
}

/// `-x86_64-unknown-linux-gnu`: a target triple suffix (so `rust-src` does not
/// count as `rust`).
fn is_target_suffix(rest: &str) -> bool {
    rest.matches('-').count() >= 3
}

fn ensure_components(root: &Path, wanted: &[&'static str]) -> Result<(), EnsureError> {
    if wanted.is_empty() {
        return Ok(());
    }
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--installed"])
        .probe(root);
    let Some(installed) = installed else {
        // No rustup: trust that the distribution ships them, but check.
        let missing: Vec<_> = wanted
            .iter()
            .copied()
            .filter(|c| {
                let probe = match *c {
                    "rustfmt" => Cmd::cargo().args(["fmt", "--version"]),
                    "clippy" => Cmd::cargo().args(["clippy", "--version"]),
                    _ => return true,
                };
                probe.probe(root).is_none()
            })
            .collect();
        return if missing.is_empty() {
            Ok(())
        } else {
            Err(EnsureError::NoRustup { missing })
        };
    };
    let missing = missing_components(&installed, wanted);
    if missing.is_empty() {
        return Ok(());
    }
    install(
        format!("rustup components {}", missing.join(", ")),
        Cmd::new("rustup").args(["component", "add"]).args(&missing),
        root,
    )
}

/// Whether `dpkg -s` output says the package is installed.
fn dpkg_says_installed(status: &str) -> bool {
    status
        .lines()
        .any(|l| l.starts_with("Status:") && l.ends_with(" installed") && l.contains(" ok "))
}

fn ensure_apt(root: &Path, wanted: &[&'static str]) -> Result<(), EnsureError> {
    let missing: Vec<_> = wanted
        .iter()
        .copied()
        .filter(|p| {
            !Cmd::new("dpkg")
                .args(["-s", p])
                .probe(root)
                .is_some_and(|s| dpkg_says_installed(&s))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Cmd::new("id")
        .arg("-u")
        .probe(root)
        .is_some_and(|s| s.trim() == "0");
    let apt = |args: &[&str]| {
        let cmd = if is_root {
            Cmd::new("apt-get")
        } else {
            Cmd::new("sudo").arg("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive")
    };
    install("the apt package index", apt(&["update"]), root)?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    install(
        format!("apt packages {}", missing.join(", ")),
        apt(&args),
        root,
    )
}

/// The venv's Python interpreter, relative to the repo root.
pub(crate) fn venv_python() -> PathBuf {
    Path::new(VENV_DIR).join("bin").join("python")
}

fn ensure_venv(root: &Path, packages: &[&'static str]) -> Result<(), EnsureError> {
    if packages.is_empty() {
        return Ok(());
    }
    if !root.join(venv_python()).exists() {
        install(
            format!("a Python venv in {VENV_DIR}"),
            Cmd::new("python3").args(["-m", "venv", VENV_DIR]),
            root,
        )?;
    }
    // pip is idempotent: requirements that are already satisfied are skipped.
    install(
        format!("Python packages {}", packages.join(", ")),
        Cmd::new(root.join(venv_python()))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages),
        root,
    )
}

fn ensure_npm(root: &Path, dir: &'static str) -> Result<(), EnsureError> {
    let lock = root.join(dir).join("package-lock.json");
    let Ok(lock_meta) = lock.metadata() else {
        return Err(EnsureError::NoLockFile { lock });
    };
    // npm writes node_modules/.package-lock.json on install: if it is newer
    // than the lock file, the tree is up to date.
    let installed = root.join(dir).join("node_modules/.package-lock.json");
    let fresh = match (installed.metadata(), lock_meta.modified()) {
        (Ok(m), Ok(lock_time)) => m.modified().is_ok_and(|t| t >= lock_time),
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    install(
        format!("npm dependencies of {dir}"),
        Cmd::new("npm").arg("ci").cwd(dir),
        root,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_detection_uses_target_suffix() {
        let installed =
            "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n";
        assert_eq!(
            missing_components(installed, &["clippy", "rustfmt", "rust-src", "rust"]),
            vec!["rustfmt", "rust"]
        );
    }

    #[test]
    fn dpkg_status_parsing() {
        assert!(dpkg_says_installed(
            "Package: dpkg\nStatus: install ok installed\nPriority: required\n"
        ));
        assert!(!dpkg_says_installed(
            "Package: foo\nStatus: deinstall ok config-files\n"
        ));
        // The real dpkg agrees on a package every Debian system has.
        let root = crate::cmd::repo_root();
        if let Some(out) = Cmd::new("dpkg").args(["-s", "dpkg"]).probe(&root) {
            assert!(dpkg_says_installed(&out));
        }
    }

    #[test]
    fn merge_dedups_and_sorts() {
        let a = Needs {
            apt_packages: vec!["python3-venv", "nodejs"],
            ..Needs::components(&["rustfmt"])
        };
        let b = Needs {
            apt_packages: vec!["nodejs"],
            ..Needs::components(&["clippy", "rustfmt"])
        };
        let m = Needs::merge([&a, &b]);
        assert_eq!(m.rustup_components, vec!["clippy", "rustfmt"]);
        assert_eq!(m.apt_packages, vec!["nodejs", "python3-venv"]);
        assert!(m.python_packages.is_empty() && m.npm_projects.is_empty());
    }
}
