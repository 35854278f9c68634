//! `commy call NAME DATA`: one call, the reply on stdout.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

use commy_core::ServiceName;
use commy_mesh::CallOptions;

use crate::{CliError, Global, write_stdout};

/// Options of `commy call`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service to call.
    #[arg(value_name = "NAME", value_parser = crate::service_arg)]
    name: ServiceName,

    /// The request payload: the argument's bytes, as given.
    #[arg(value_name = "DATA")]
    data: OsString,

    /// Give up after this many milliseconds [default: 30000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: Option<u64>,

    /// Print the reply as lowercase hex.
    #[arg(long)]
    hex: bool,
}

/// Makes the call and prints the reply.
pub(crate) async fn run(global: &Global, args: Args) -> Result<(), CliError> {
    let mesh = global.open().await?;
    let mut options = CallOptions::default();
    if let Some(ms) = args.timeout_ms {
        options = options.timeout(Duration::from_millis(ms));
    }
    let reply = mesh
        .call_with(args.name.as_str(), args.data.into_vec(), options)
        .await?
        .into_payload();
    mesh.close().await;
    write_stdout(&render(&reply, args.hex))
}

/// The bytes to print for `reply` (a call's reply or a message): hex and a
/// newline with `hex`, else the bytes themselves, followed by a newline if
/// they are UTF-8 text.
pub(crate) fn render(reply: &[u8], hex: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(reply.len() * 2 + 1);
    if hex {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in reply {
            out.push(DIGITS[usize::from(b >> 4)]);
            out.push(DIGITS[usize::from(b & 0xf)]);
        }
        out.push(b'\n');
    } else {
        out.extend_from_slice(reply);
        if std::str::from_utf8(reply).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn replies_render_as_text_raw_or_hex() {
        assert_eq!(render(b"hi", false), b"hi\n");
        assert_eq!(render(b"", false), b"\n");
        assert_eq!(render(&[0xff, 0x00], false), [0xff, 0x00]);
        assert_eq!(render(&[0xff, 0x00, 0x1a], true), b"ff001a\n");
        assert_eq!(render(b"", true), b"\n");
    }
}
