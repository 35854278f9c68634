//! External commands: a small builder around [`std::process::Command`] that
//! remembers what it runs, so every failure names the exact command line.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Running an external command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CmdError {
    /// The program could not be started (not installed, not executable, ...).
    #[error("could not start `{cmd}`: {source} (is `{program}` installed and on PATH?)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The program name.
        program: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{cmd}` failed: {status}")]
    Failed {
        /// The command line.
        cmd: String,
        /// How it exited.
        status: ExitStatus,
    },
    /// The program's standard output was not UTF-8.
    #[error("`{cmd}` printed output that is not UTF-8")]
    NotUtf8 {
        /// The command line.
        cmd: String,
    },
}

/// One external command: program, arguments, extra environment, working dir.
#[derive(Debug, Clone)]
pub(crate) struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// Variables removed from the inherited environment.
    env_remove: Vec<OsString>,
    cwd: Option<PathBuf>,
}

impl Cmd {
    /// A command running `program` (looked up on PATH unless it has a `/`).
    pub(crate) fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            cwd: None,
        }
    }

    /// `cargo` from PATH (the rustup proxy, so `cargo fmt`/`cargo clippy` resolve).
    pub(crate) fn cargo() -> Self {
        Self::new("cargo")
    }

    /// Appends one argument.
    pub(crate) fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for this command only.
    pub(crate) fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Removes `key` from the environment the command inherits.
    pub(crate) fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env_remove.push(key.as_ref().to_owned());
        self
    }

    /// Runs in `dir` (relative paths are taken from the repository root).
    pub(crate) fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// The command line as a shell would show it, environment first.
    pub(crate) fn display(&self) -> String {
        let mut parts: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), quote(&v.to_string_lossy())))
            .collect();
        parts.push(self.program.to_string_lossy().into_owned());
        parts.extend(self.args.iter().map(|a| quote(&a.to_string_lossy())));
        let line = parts.join(" ");
        match &self.cwd {
            Some(dir) => format!("(cd {} && {line})", dir.display()),
            None => line,
        }
    }

    fn command(&self, root: &Path) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.current_dir(match &self.cwd {
            Some(dir) => root.join(dir),
            None => root.to_path_buf(),
        });
        cmd
    }

    fn spawn_error(&self, source: std::io::Error) -> CmdError {
        CmdError::Spawn {
            cmd: self.display(),
            program: self.program.to_string_lossy().into_owned(),
            source,
        }
    }

    /// Runs with inherited stdio from `root`; an unsuccessful exit is an error.
    pub(crate) fn run(&self, root: &Path) -> Result<(), CmdError> {
        let status = self
            .command(root)
            .status()
            .map_err(|e| self.spawn_error(e))?;
        if status.success() {
            Ok(())
        } else {
            Err(CmdError::Failed {
                cmd: self.display(),
                status,
            })
        }
    }

    /// Runs and returns standard output (stderr is passed through).
    pub(crate) fn stdout(&self, root: &Path) -> Result<String, CmdError> {
        let out = self
            .command(root)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        if !out.status.success() {
            return Err(CmdError::Failed {
                cmd: self.display(),
                status: out.status,
            });
        }
        String::from_utf8(out.stdout).map_err(|_| CmdError::NotUtf8 {
            cmd: self.display(),
        })
    }

    /// Runs silently and returns stdout if it exited successfully, `None` if it
    /// could not be started or failed (used for probes like `dpkg -s`).
    pub(crate) fn probe(&self, root: &Path) -> Option<String> {
        let out = self
            .command(root)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if out.status.success() {
            String::from_utf8(out.stdout).ok()
        } else {
            None
        }
    }
}

/// Quotes `s` for display if it contains characters a shell would split on.
fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The repository root (the parent of the xtask crate).
pub(crate) fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_args_and_quotes() {
        let cmd = Cmd::cargo()
            .args(["test", "-p", "commy-shm"])
            .env("RUSTFLAGS", "--cfg loom");
        assert_eq!(
            cmd.display(),
            "RUSTFLAGS='--cfg loom' cargo test -p commy-shm"
        );
        let cmd = Cmd::new("npm").arg("ci").cwd("commy-node");
        assert_eq!(cmd.display(), "(cd commy-node && npm ci)");
    }

    #[test]
    fn run_reports_failure_and_missing_program() {
        let root = repo_root();
        assert!(Cmd::new("true").run(&root).is_ok());
        let err = Cmd::new("false").run(&root).unwrap_err();
        assert!(err.to_string().starts_with("`false` failed"), "{err}");
        let err = Cmd::new("commy-no-such-program").run(&root).unwrap_err();
        assert!(matches!(err, CmdError::Spawn { .. }), "{err}");
        assert_eq!(
            Cmd::new("echo").arg("hi").probe(&root).as_deref(),
            Some("hi\n")
        );
    }

    #[test]
    fn removed_variables_are_not_inherited_and_set_ones_win() {
        let root = repo_root();
        let out = Cmd::new("sh")
            .args(["-c", "echo \"${HOME:-unset}|${COMMY_T:-unset}\""])
            .env_remove("HOME")
            .env("COMMY_T", "set")
            .probe(&root);
        assert_eq!(out.as_deref(), Some("unset|set\n"));
    }
}
