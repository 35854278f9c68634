//! `cargo xtask npm`: builds the Node SDK's native addon.
//!
//! `@commy/node` lives in `commy-node/`: the Rust crate and the npm package
//! share the folder. The build runs napi-rs's CLI (a pinned dev dependency
//! installed by `npm ci`), which compiles the crate in release mode,
//! strips it, puts `commy.<platform>.node` beside `index.js` and
//! regenerates `binding.js` and `index.d.ts`. Those two are committed; the
//! `node` test step fails if a build changes them.

use std::path::Path;

use crate::cmd::Cmd;
use crate::tools::{EnsureError, Needs, ensure_tools};

/// The npm package's folder, relative to the repository root.
pub(crate) const PACKAGE: &str = "commy-node";

/// The files napi-rs generates and the repository keeps.
pub(crate) const GENERATED: [&str; 2] = ["commy-node/index.d.ts", "commy-node/binding.js"];

/// What building the addon needs installed.
pub(crate) fn needs() -> Needs {
    Needs {
        // Node.js itself (npm comes with it); the image normally has both.
        apt_packages: vec!["nodejs"],
        npm_projects: vec![PACKAGE],
        ..Needs::default()
    }
}

/// The build command (run from the repository root).
pub(crate) fn build() -> Cmd {
    Cmd::new("npm")
        .args(["run", "--silent", "build"])
        .cwd(PACKAGE)
}

/// The same build in the dev profile, for the `node` test step: it reuses
/// the debug build of the workspace the `test` step made, and generates the
/// same `binding.js` and `index.d.ts`.
pub(crate) fn build_debug() -> Cmd {
    Cmd::new("npm")
        .args(["run", "--silent", "build:debug"])
        .cwd(PACKAGE)
}

/// `cargo xtask npm` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum NpmError {
    /// Installing the build's tools failed.
    #[error(transparent)]
    Tools(#[from] EnsureError),
    /// The build failed.
    #[error(transparent)]
    Build(#[from] crate::cmd::CmdError),
}

/// Installs what the build needs, then builds the addon.
pub(crate) fn run(root: &Path) -> Result<(), NpmError> {
    ensure_tools(root, &needs())?;
    let cmd = build();
    println!("xtask npm: $ {}", cmd.display());
    cmd.run(root)?;
    println!("xtask npm: built {PACKAGE}/ (pack it with `npm pack` there)");
    Ok(())
}
