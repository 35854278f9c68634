//! `commy`: the command-line tool of a Commy mesh on this host.
//!
//! ```text
//! commy [--mesh NAME] [--runtime-dir PATH] <COMMAND>
//!
//! commy services [--json]            list the live instances of every service
//! commy echo-server NAME             serve NAME with an echo handler until SIGINT/SIGTERM
//! commy call NAME DATA [--timeout-ms N] [--hex]
//!                                    call NAME with DATA and print the reply
//! commy bench rtt [--size N] [--count N] [--warmup N] [--service NAME]
//!                                    p50/p99/p99.9 of sequential calls
//! commy bench throughput [--size N] [--count N] [--concurrency N] [--service NAME]
//!                                    calls/s with many calls in flight
//! commy pub TOPIC DATA [--wait-ms N] publish DATA on TOPIC
//! commy sub TOPIC [--count N] [--group GROUP] [--hex]
//!                                    print the messages published on TOPIC
//! commy cert init DIR                create a CA (ca.pem, ca.key) for the TLS transport
//! commy cert issue --ca-dir DIR --out OUT --name spiffe://MESH/SERVICE [--dns NAME].. [--ip IP]..
//!                                    issue an instance certificate (OUT.pem, OUT.key)
//! ```
//!
//! Settings (`listen`, `peers`, `tls_ca`, `default_timeout`, ...) come from
//! the environment (`COMMY_<KEY>`: `COMMY_LISTEN`, `COMMY_PEERS`, ...) or
//! the config file (`$COMMY_CONFIG`, else `~/.config/commy/config.toml`);
//! see the library's `Settings`. Only `echo-server` listens; the other
//! commands never take the listen address.
//!
//! Global options (accepted before or after the command):
//!
//! - `--log-format text|json`: how the library's log lines go to stderr.
//!   Which lines: `$COMMY_LOG`, else `$RUST_LOG` (an `env_logger`-style
//!   filter, e.g. `commy_net=debug`), else warnings and errors only.
//! - `--mesh NAME`: the mesh to join (default `default`); processes only see
//!   services of their own mesh.
//! - `--runtime-dir PATH`: where instance sockets live. Without it the
//!   library's default applies: `$COMMY_RUNTIME_DIR`, else
//!   `$XDG_RUNTIME_DIR/commy`, else `/tmp/commy-<uid>`. The directory must be
//!   private (mode 0700, ours); it is created if missing. A relative path is
//!   taken relative to the current directory.
//!
//! Commands:
//!
//! - `services`: one line per live instance with the columns `SERVICE`,
//!   `INSTANCE`, `PID`, `ENDPOINT` and `HOST`, after a header line. With no
//!   instance only the header is printed (and a note naming the mesh and the
//!   directory scanned goes to stderr), so scripts can always skip the first
//!   line. Subscriptions are not listed.
//!   `--json` prints a JSON array of objects with the keys `service`,
//!   `instance`, `pid`, `endpoint` and `host` instead (`[]` when empty).
//!   With peers configured, their instances follow, with their `tls://`
//!   endpoints and host ids (after waiting up to 3 s for their listings).
//! - `echo-server NAME`: serves `NAME`, answering every request with its own
//!   payload. Once the instance is announced it prints exactly one line,
//!   `serving NAME as <instance id>`, and flushes stdout (when it listens
//!   over TLS, `tls endpoint: tls://ADDR:PORT` goes to stderr). On SIGINT (Ctrl-C)
//!   or SIGTERM it drains (`ServiceHandle::shutdown`): it deregisters, tells
//!   its clients to send no new call (their calls go to other instances),
//!   answers what they sent and exits 0, so a rolling restart fails no call.
//! - `call NAME DATA`: calls `NAME` with the bytes of `DATA` (the argument as
//!   given, not necessarily UTF-8). A reply that is UTF-8 text is printed
//!   followed by a newline; any other reply is written as raw bytes without
//!   a newline. `--hex` prints the reply as lowercase hex and a newline
//!   instead. `--timeout-ms N` gives up after `N` milliseconds (default: the
//!   library's 30 s); the failure is then `DEADLINE_EXCEEDED`.
//! - `bench rtt`: round-trip latency of sequential calls through the mesh API
//!   (`--count` calls after `--warmup` unmeasured ones, `--size`-byte
//!   payloads): min, p50, p99, p99.9, max and mean.
//! - `bench throughput`: `--count` calls spread over `--concurrency` tasks
//!   (64 by default), each with one call in flight: calls/s and payload MB/s.
//!
//!   Without `--service`, `bench` serves an echo service in this process
//!   under a unique name (`commy-bench-<pid>`) and calls it through the mesh
//!   (so through a shared-memory link, like any co-located client); with
//!   `--service NAME` it calls that service instead, which must accept any
//!   payload.
//! - `pub TOPIC DATA`: publishes `DATA` once to every subscriber of `TOPIC`
//!   (also those of TLS peers)
//!   (and one member of each queue group) and prints `published to N
//!   subscribers`. A message nobody hears is dropped, and that is not an
//!   error; with `--wait-ms N` the publish is retried until at least one
//!   subscriber gets it, and fails with `NOT_FOUND` after `N` ms.
//! - `sub TOPIC`: subscribes, prints `subscribed to TOPIC` on stderr once the
//!   subscription is announced, then writes each message to stdout like
//!   `call` writes a reply (UTF-8 text and a newline, other bytes raw, or hex
//!   with `--hex`), flushing after each. It exits 0 after `--count N`
//!   messages, or on SIGINT/SIGTERM. `--group GROUP` joins a queue group.
//!
//! Errors and exit status:
//!
//! - `0`: success.
//! - `1`: the operation failed. A failed call prints the status name and
//!   message on stderr, e.g. `NOT_FOUND: no instance of service 'x' in mesh
//!   'default'`; local failures (the runtime dir is unusable, stdout is
//!   closed, ...) print `error: <what went wrong>`.
//! - `2`: the command line is invalid (unknown option, bad number, invalid
//!   mesh, service or topic name, ...); clap prints the usage problem.
#![forbid(unsafe_code)]

mod bench;
mod call;
mod cert;
mod pubsub;
mod serve;
mod services;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use commy_core::{MeshName, ServiceName, TopicName};
use commy_mesh::discovery::DiscoveryError;
use commy_mesh::{Config, Mesh, OpenError, Status};

/// Exit status of a failed operation.
const EXIT_FAILURE: u8 = 1;

/// The `commy` command line.
#[derive(Debug, Parser)]
#[command(
    name = "commy",
    version,
    about = "Inspect and use a Commy mesh on this host",
    long_about = "Inspect and use a Commy mesh on this host: list services, serve an echo \
                  service, call services, publish and subscribe, and measure latency and throughput.\n\n\
                  Exit status: 0 on success, 1 when the operation fails (the status name and \
                  message go to stderr, e.g. `NOT_FOUND: ...`), 2 for an invalid command line."
)]
struct Cli {
    /// The mesh to join.
    #[arg(long, global = true, value_name = "NAME", default_value = "default")]
    mesh: MeshName,

    /// The runtime dir holding instance sockets [default: $COMMY_RUNTIME_DIR,
    /// else $XDG_RUNTIME_DIR/commy, else /tmp/commy-<uid>].
    #[arg(long, global = true, value_name = "PATH")]
    runtime_dir: Option<PathBuf>,

    /// How log lines are written to stderr: `text` or `json` (one object a
    /// line). Which lines: `$COMMY_LOG`, else `$RUST_LOG`, else `warn`.
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// The environment variable that selects log lines (before `RUST_LOG`).
const LOG_ENV: &str = "COMMY_LOG";

/// Installs the subscriber that writes the library's log lines to stderr,
/// filtered by `$COMMY_LOG`, else `$RUST_LOG`, else `warn`. A filter that
/// does not parse is reported and `warn` used.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let (var, spec) = match std::env::var(LOG_ENV) {
        Ok(v) if !v.trim().is_empty() => (LOG_ENV, v),
        _ => ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_default()),
    };
    let filter = if spec.trim().is_empty() {
        EnvFilter::new("warn")
    } else {
        EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("warning: ignoring ${var}={spec:?}: {e}");
            EnvFilter::new("warn")
        })
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the live instances of every service of the mesh.
    #[command(
        long_about = "List the live instances of every service of the mesh: one line per \
                      instance (service, instance id, pid, endpoint, host) after a header line. \
                      With no instance only the header is printed."
    )]
    Services(services::Args),

    /// Serve NAME with an echo handler until SIGINT or SIGTERM.
    #[command(
        long_about = "Serve NAME with an echo handler (the reply is the request's payload) until \
                      SIGINT (Ctrl-C) or SIGTERM. Prints `serving NAME as <instance id>` once the \
                      instance is announced; on a signal it drains: it deregisters, tells its \
                      clients to send no new call (they go to other instances), answers what they \
                      sent, and exits 0."
    )]
    EchoServer(serve::Args),

    /// Call NAME with DATA and print the reply.
    #[command(
        long_about = "Call NAME with the bytes of DATA and print the reply: UTF-8 text followed \
                      by a newline, other bytes raw (or hex with --hex). On failure the status \
                      name and message go to stderr and the exit status is 1."
    )]
    Call(call::Args),

    /// Measure round-trip latency or throughput of calls through the mesh.
    #[command(subcommand)]
    Bench(bench::Command),

    /// Publish DATA on TOPIC.
    #[command(
        long_about = "Publish DATA on TOPIC: every subscriber gets it, and one member of each \
                      queue group. Prints how many deliveries were made; a message nobody hears \
                      is dropped (not an error unless --wait-ms is given)."
    )]
    Pub(pubsub::PubArgs),

    /// Print the messages published on TOPIC.
    #[command(
        long_about = "Subscribe to TOPIC and print each message (UTF-8 text followed by a newline, \
                      other bytes raw, or hex with --hex). Prints `subscribed to TOPIC` on stderr \
                      once subscribed; exits 0 after --count messages or on SIGINT/SIGTERM."
    )]
    Sub(pubsub::SubArgs),

    /// Make a CA and instance certificates for the TLS transport.
    #[command(subcommand)]
    Cert(cert::Command),
}

/// Options every command shares.
#[derive(Debug, Clone)]
struct Global {
    mesh: MeshName,
    runtime_dir: Option<PathBuf>,
}

impl Global {
    /// The mesh configuration the options select; `listen`: whether the
    /// TLS listen address (if configured) is taken.
    fn config(&self, listen: bool) -> Config {
        let mut config = Config::default();
        config.settings.set_name("command line");
        config.settings.set("mesh", self.mesh.as_str());
        if let Some(dir) = &self.runtime_dir {
            config
                .settings
                .set("runtime_dir", dir.to_string_lossy().into_owned());
        }
        config.no_listen = !listen;
        config
    }

    /// Opens the mesh the options select, for a one-shot command (it does
    /// not listen over TLS).
    async fn open(&self) -> Result<Mesh, CliError> {
        self.open_with(false).await
    }

    /// Opens the mesh, listening over TLS if configured when `listen`.
    async fn open_with(&self, listen: bool) -> Result<Mesh, CliError> {
        Mesh::open(self.config(listen))
            .await
            .map_err(|source| CliError::Open {
                mesh: self.mesh.clone(),
                source,
            })
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// A mesh operation failed with a status (printed as `CODE: message`).
    #[error("{}: {}", .0.code().as_str(), .0.message())]
    Status(#[from] Status),
    /// The mesh handle could not be opened.
    #[error("error: cannot open mesh '{mesh}': {source}")]
    Open {
        /// The mesh.
        mesh: MeshName,
        /// Why.
        source: OpenError,
    },
    /// Listing the services failed.
    #[error("error: cannot list the services of mesh '{mesh}': {source}")]
    Discovery {
        /// The mesh.
        mesh: MeshName,
        /// Why.
        source: DiscoveryError,
    },
    /// The current directory, needed to resolve a relative runtime dir, is
    /// unknown.
    #[error("error: cannot resolve the relative runtime dir {}: {source}", .path.display())]
    RelativeDir {
        /// The path as given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Writing the output failed.
    #[error("error: cannot write to stdout: {0}")]
    Stdout(io::Error),
    /// Installing the signal handlers failed.
    #[error("error: cannot listen for SIGINT/SIGTERM: {0}")]
    Signal(io::Error),
    /// A subscription ended because the subscriber fell behind.
    #[error(
        "error: the subscription to '{topic}' ended: this subscriber fell behind \
         ({dropped} messages dropped)"
    )]
    SubscriptionEnded {
        /// The topic.
        topic: TopicName,
        /// Messages dropped before it ended.
        dropped: u64,
    },
    /// A benchmark task stopped abnormally.
    #[error("error: a benchmark task failed: {0}")]
    Task(String),
    /// Making a certificate failed.
    #[error("error: {0}")]
    Cert(String),
}

impl CliError {
    /// Whether the error is a reader closing our stdout (`commy services |
    /// head`), which is not worth reporting.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Stdout(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Writes `bytes` to stdout and flushes it.
fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(CliError::Stdout)
}

/// Parses a service name argument (so a bad name is a usage error, exit 2).
fn service_arg(s: &str) -> Result<ServiceName, commy_core::NameError> {
    ServiceName::new(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let global = match global(&cli) {
        Ok(g) => g,
        Err(e) => return report(e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Services(args) => services::run(&global, args).await,
            Command::EchoServer(args) => serve::run(&global, args).await,
            Command::Call(args) => call::run(&global, args).await,
            Command::Bench(cmd) => bench::run(&global, cmd).await,
            Command::Pub(args) => pubsub::publish(&global, args).await,
            Command::Sub(args) => pubsub::subscribe(&global, args).await,
            Command::Cert(cmd) => cert::run(cmd),
        }
    });
    // Service threads of the library may still be winding down; they hold
    // nothing that needs a clean exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e),
    }
}

/// The global options, with a relative runtime dir made absolute.
fn global(cli: &Cli) -> Result<Global, CliError> {
    let runtime_dir = match &cli.runtime_dir {
        Some(p) if p.is_relative() => {
            Some(
                std::path::absolute(p).map_err(|source| CliError::RelativeDir {
                    path: p.clone(),
                    source,
                })?,
            )
        }
        other => other.clone(),
    };
    Ok(Global {
        mesh: cli.mesh.clone(),
        runtime_dir,
    })
}

/// Prints `e` on stderr and returns the failure exit status.
fn report(e: CliError) -> ExitCode {
    if e.is_broken_pipe() {
        return ExitCode::SUCCESS;
    }
    eprintln!("{e}");
    ExitCode::from(EXIT_FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
