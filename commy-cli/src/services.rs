//! `commy services`: the live instances of every service of the mesh, as an
//! aligned table or as JSON.

use std::fmt::Write as _;

use commy_mesh::discovery::{Instance, LocalRegistry};
use commy_shm::RuntimeDir;

use crate::{CliError, Global, write_stdout};

/// Options of `commy services`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print a JSON array of objects (keys: service, instance, pid, endpoint,
    /// host) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Lists the instances.
pub(crate) async fn run(global: &Global, args: Args) -> Result<(), CliError> {
    let discovery = |source| CliError::Discovery {
        mesh: global.mesh.clone(),
        source,
    };
    let registry = match &global.runtime_dir {
        Some(dir) => {
            let dir = RuntimeDir::at(dir).map_err(|e| discovery(e.into()))?;
            LocalRegistry::new(dir, &global.mesh)
        }
        None => LocalRegistry::open_default(&global.mesh),
    }
    .map_err(discovery)?;
    let mut instances: Vec<Instance> = registry
        .services()
        .map_err(discovery)?
        .into_iter()
        .flat_map(|(_, instances)| instances)
        .collect();
    // With peers configured, their instances too.
    let settings =
        commy_mesh::settings::Settings::load(&global.config(false).settings).map_err(|e| {
            CliError::Open {
                mesh: global.mesh.clone(),
                source: commy_mesh::OpenError::Config(e),
            }
        })?;
    if !settings.settings().peers.is_empty() {
        let mesh = global.open().await?;
        let mut remote = mesh
            .remote_instances(std::time::Duration::from_secs(3))
            .await;
        remote.sort_by(|a, b| {
            (&a.service, a.endpoint.to_string()).cmp(&(&b.service, b.endpoint.to_string()))
        });
        instances.extend(remote);
        mesh.close().await;
    }
    let out = if args.json {
        json(&instances)
    } else {
        table(&instances)
    };
    write_stdout(out.as_bytes())?;
    if instances.is_empty() && !args.json {
        eprintln!(
            "(no live instance in mesh '{}'; looked in {})",
            global.mesh,
            registry.dir().display()
        );
    }
    Ok(())
}

/// The table: a header line, then one line per instance, columns aligned
/// (the last one is not padded).
fn table(instances: &[Instance]) -> String {
    let header = ["SERVICE", "INSTANCE", "PID", "ENDPOINT", "HOST"];
    let rows: Vec<[String; 5]> = instances
        .iter()
        .map(|i| {
            [
                i.service.to_string(),
                i.id.to_string(),
                i.pid.to_string(),
                i.endpoint.to_string(),
                i.host.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        let last = cells.len() - 1;
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

/// A JSON array, one object per line.
fn json(instances: &[Instance]) -> String {
    if instances.is_empty() {
        return "[]\n".to_owned();
    }
    let mut out = String::from("[\n");
    for (n, i) in instances.iter().enumerate() {
        let _ = write!(
            out,
            "  {{\"service\": {}, \"instance\": {}, \"pid\": {}, \"endpoint\": {}, \"host\": {}}}",
            json_string(i.service.as_str()),
            json_string(&i.id.to_string()),
            i.pid,
            json_string(&i.endpoint.to_string()),
            json_string(i.host.as_str()),
        );
        out.push_str(if n + 1 < instances.len() { ",\n" } else { "\n" });
    }
    out.push_str("]\n");
    out
}

/// `s` as a JSON string literal (RFC 8259 escaping).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("plain"), "\"plain\"");
        assert_eq!(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json_string("x\ny\u{1}"), "\"x\\ny\\u0001\"");
        assert_eq!(json_string("é/ü"), "\"é/ü\"");
    }
}
