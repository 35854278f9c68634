//! `commy pub TOPIC DATA` and `commy sub TOPIC`: publish a message, print
//! the messages of a topic.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::{Duration, Instant};

use commy_core::{ServiceName, TopicName};
use commy_mesh::Status;
use tokio::signal::unix::{SignalKind, signal};

use crate::call::render;
use crate::{CliError, Global, write_stdout};

/// How often `pub --wait-ms` looks again for a subscriber.
const RETRY: Duration = Duration::from_millis(10);

/// Options of `commy pub`.
#[derive(Debug, clap::Args)]
pub(crate) struct PubArgs {
    /// The topic (`/`-separated segments, e.g. `prices/eur`).
    #[arg(value_name = "TOPIC", value_parser = topic_arg)]
    topic: TopicName,

    /// The message payload: the argument's bytes, as given.
    #[arg(value_name = "DATA")]
    data: OsString,

    /// Retry for up to this many milliseconds until at least one subscriber
    /// gets the message; fail (NOT_FOUND) if none does.
    #[arg(long, value_name = "N")]
    wait_ms: Option<u64>,
}

/// Options of `commy sub`.
#[derive(Debug, clap::Args)]
pub(crate) struct SubArgs {
    /// The topic (`/`-separated segments, e.g. `prices/eur`).
    #[arg(value_name = "TOPIC", value_parser = topic_arg)]
    topic: TopicName,

    /// Exit after this many messages (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,

    /// Join this queue group: each message goes to one member of the group.
    #[arg(long, value_name = "GROUP", value_parser = crate::service_arg)]
    group: Option<ServiceName>,

    /// Print each message as lowercase hex.
    #[arg(long)]
    hex: bool,
}

/// Parses a topic argument (so a bad topic is a usage error, exit 2).
fn topic_arg(s: &str) -> Result<TopicName, commy_core::NameError> {
    TopicName::new(s)
}

/// Publishes once (or until delivered, with `--wait-ms`); prints how many
/// deliveries were made.
pub(crate) async fn publish(global: &Global, args: PubArgs) -> Result<(), CliError> {
    let mesh = global.open().await?;
    let payload = bytes::Bytes::from(args.data.into_vec());
    let until = args
        .wait_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let delivered = loop {
        let n = mesh.publish(args.topic.as_str(), payload.clone()).await?;
        match until {
            Some(t) if n == 0 && Instant::now() < t => tokio::time::sleep(RETRY).await,
            _ => break n,
        }
    };
    mesh.close().await;
    if let (Some(ms), 0) = (args.wait_ms, delivered) {
        return Err(Status::not_found(format!(
            "no subscriber of topic '{}' in mesh '{}' within {ms} ms",
            args.topic, global.mesh
        ))
        .into());
    }
    let plural = if delivered == 1 { "" } else { "s" };
    write_stdout(format!("published to {delivered} subscriber{plural}\n").as_bytes())
}

/// Prints messages until `--count` of them or a signal.
pub(crate) async fn subscribe(global: &Global, args: SubArgs) -> Result<(), CliError> {
    let mut interrupt = signal(SignalKind::interrupt()).map_err(CliError::Signal)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(CliError::Signal)?;
    let mesh = global.open().await?;
    let topic = args.topic.as_str();
    let mut sub = match &args.group {
        Some(g) => mesh.subscribe_group(topic, g.as_str()).await?,
        None => mesh.subscribe(topic).await?,
    };
    match &args.group {
        Some(g) => eprintln!("subscribed to {topic} in group {g}"),
        None => eprintln!("subscribed to {topic}"),
    }
    let mut seen = 0;
    let result = loop {
        if args.count.is_some_and(|n| seen >= n) {
            break Ok(());
        }
        let next = tokio::select! {
            m = sub.next() => m,
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
        };
        let Some(message) = next else {
            break Err(CliError::SubscriptionEnded {
                topic: args.topic.clone(),
                dropped: sub.dropped(),
            });
        };
        seen += 1;
        if let Err(e) = write_stdout(&render(message.payload(), args.hex)) {
            break Err(e);
        }
    };
    drop(sub);
    mesh.close().await;
    result
}
