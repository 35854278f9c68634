//! `commy echo-server NAME`: serves an echo service until SIGINT or SIGTERM.

use commy_core::ServiceName;
use commy_mesh::{Request, Response, Status};
use tokio::signal::unix::{SignalKind, signal};

use crate::{CliError, Global, write_stdout};

/// Options of `commy echo-server`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service to serve.
    #[arg(value_name = "NAME", value_parser = crate::service_arg)]
    name: ServiceName,
}

/// Serves until a signal, then deregisters and drains.
pub(crate) async fn run(global: &Global, args: Args) -> Result<(), CliError> {
    // Listen for the signals before announcing anything, so a signal sent as
    // soon as the "serving" line is read already finds our handlers.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(CliError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(CliError::Signal)?;
    let mesh = global.open_with(true).await?;
    let handle = mesh
        .serve(args.name.as_str(), |req: Request| async move {
            Ok::<_, Status>(Response::new(req.into_payload()))
        })
        .await?;
    write_stdout(format!("serving {} as {}\n", args.name, handle.instance_id()).as_bytes())?;
    if let Some(tls) = mesh.tls_endpoint() {
        eprintln!("tls endpoint: tls://{tls}");
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    handle.shutdown().await;
    mesh.close().await;
    Ok(())
}
