//! `commy cert init|issue`: a CA and instance certificates for the TLS
//! transport (rcgen), as PEM files.

use std::net::IpAddr;
use std::path::PathBuf;

use commy_net::{DevCa, Identity, LeafSpec};

use crate::{CliError, write_stdout};

/// `commy cert` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Create a CA (ca.pem, ca.key) in a new directory.
    Init {
        /// The directory to create (must not exist).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue an instance certificate signed by a CA made with `cert init`.
    Issue {
        /// The CA's directory (ca.pem and ca.key).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Write OUT.pem (certificate) and OUT.key (private key).
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
        /// The identity, `spiffe://<mesh>/<service>`.
        #[arg(long, value_name = "URI")]
        name: String,
        /// A DNS name the instance is reached by (repeatable).
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address the instance is reached by (repeatable).
        #[arg(long, value_name = "IP")]
        ip: Vec<IpAddr>,
    },
}

/// Runs a `commy cert` subcommand.
pub(crate) fn run(cmd: Command) -> Result<(), CliError> {
    match cmd {
        Command::Init { dir } => {
            if dir.exists() {
                return Err(CliError::Cert(format!("{} exists already", dir.display())));
            }
            DevCa::create(&dir).map_err(|e| CliError::Cert(e.to_string()))?;
            let ca = DevCa::load(&dir).map_err(|e| CliError::Cert(e.to_string()))?;
            write_stdout(
                format!(
                    "created a CA in {}: give {} to every host (tls_ca), keep ca.key private\n",
                    dir.display(),
                    ca.dir().join(commy_net::tls::CA_CERT_FILE).display()
                )
                .as_bytes(),
            )
        }
        Command::Issue {
            ca_dir,
            out,
            name,
            dns,
            ip,
        } => {
            let identity = Identity::parse(&name).map_err(|e| CliError::Cert(e.to_string()))?;
            let ca = DevCa::load(&ca_dir).map_err(|e| CliError::Cert(e.to_string()))?;
            let mut spec = LeafSpec::new(identity);
            for d in &dns {
                spec = spec.dns(d);
            }
            for i in ip {
                spec = spec.ip(i);
            }
            let (cert, key) = ca.issue(&spec).map_err(|e| CliError::Cert(e.to_string()))?;
            let cert_path = out.with_extension("pem");
            let key_path = out.with_extension("key");
            commy_net::tls::write_pem_file(&cert_path, &cert)
                .map_err(|e| CliError::Cert(e.to_string()))?;
            commy_net::tls::write_pem_file(&key_path, &key)
                .map_err(|e| CliError::Cert(e.to_string()))?;
            write_stdout(
                format!(
                    "issued {name}: {} and {}\n",
                    cert_path.display(),
                    key_path.display()
                )
                .as_bytes(),
            )
        }
    }
}
