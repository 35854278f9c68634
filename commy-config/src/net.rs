//! Network settings of a mesh handle: where to listen for TLS, which peers
//! to ask for remote instances, which certificates to use and which
//! transport calls take. Each setting comes from, in order: the
//! mesh handle's builder (or its config's `net`), the environment, the
//! config file.
//!
//! | key (config file) | environment | meaning |
//! |---|---|---|
//! | `listen = "tls://ADDR:PORT"` | `COMMY_LISTEN` | serve this process's services over TLS there (port 0: one the system picks) |
//! | `peers = ["tls://HOST:PORT", ...]` | `COMMY_PEERS` (comma-separated) | processes whose instances this one may call |
//! | `tls_ca = "PATH"` | `COMMY_TLS_CA` | the CA (PEM) that certificates must chain to; none: the per-user dev CA |
//! | `tls_cert = "PATH"`, `tls_key = "PATH"` | `COMMY_TLS_CERT`, `COMMY_TLS_KEY` | this process's certificate chain and key (PEM) |
//! | `require_client_cert = true` | `COMMY_REQUIRE_CLIENT_CERT=1` | mTLS: refuse clients without a certificate from the CA |
//! | `transport = "auto"` | `COMMY_TRANSPORT` | `auto`, `shm` or `tls` |
//!
//! The config file is `$COMMY_CONFIG`, else `$XDG_CONFIG_HOME/commy/config.toml`
//! (or `~/.config/commy/config.toml`) if it exists. It is TOML; an unknown
//! key is an error naming the file. Relative paths in it are relative to
//! the file's directory.
//!
//! ```
//! use commy_config::{NetConfig, TransportPreference};
//!
//! let dir = std::env::temp_dir().join(format!("commy-netconfig-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let file = dir.join("config.toml");
//! std::fs::write(&file, "listen = \"tls://127.0.0.1:7443\"\npeers = [\"tls://10.0.0.2:7443\"]\n").unwrap();
//! let config = NetConfig::from_file(&file).unwrap();
//! assert_eq!(config.listen.unwrap().to_string(), "127.0.0.1:7443");
//! assert_eq!(config.peers.len(), 1);
//!
//! std::fs::write(&file, "lisen = \"tls://127.0.0.1:7443\"\n").unwrap();
//! let err = NetConfig::from_file(&file).unwrap_err();
//! assert!(err.contains("config.toml") && err.contains("lisen"), "{err}");
//! assert_eq!("tls".parse::<TransportPreference>(), Ok(TransportPreference::Tls));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;

use commy_core::{Endpoint, TlsAddr};

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "COMMY_CONFIG";

/// Which transport calls use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportPreference {
    /// Shared memory for instances on this host whose runtime dir we share,
    /// TLS for the others; if shared memory fails at connect, TLS (counted
    /// in `commy_transport_fallback_total`).
    #[default]
    Auto,
    /// Shared memory only.
    Shm,
    /// TLS only, also to instances on this host.
    Tls,
}

impl FromStr for TransportPreference {
    type Err = String;

    fn from_str(s: &str) -> Result<TransportPreference, String> {
        match s {
            "auto" => Ok(TransportPreference::Auto),
            "shm" => Ok(TransportPreference::Shm),
            "tls" => Ok(TransportPreference::Tls),
            other => Err(format!(
                "unknown transport {other:?} (expected auto, shm or tls)"
            )),
        }
    }
}

/// The network settings (see the module docs for where each comes from).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct NetConfig {
    /// Listen for TLS here (`None`: not at all; port 0, from
    /// [`TlsAddr::any_port`]: at a port the system picks).
    pub listen: Option<TlsAddr>,
    /// Ignore `listen` from the environment and the config file (for
    /// one-shot tools that must not take the port of the real server).
    pub no_listen: bool,
    /// Static peers.
    pub peers: Vec<TlsAddr>,
    /// The CA file; `None`: the per-user dev CA.
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Require client certificates (mTLS).
    pub require_client_cert: Option<bool>,
    /// Which transport calls use.
    pub transport: Option<TransportPreference>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    peers: Option<Vec<String>>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    require_client_cert: Option<bool>,
    transport: Option<String>,
}

/// Parses `tls://HOST:PORT`.
pub fn parse_tls(text: &str) -> Result<TlsAddr, String> {
    match Endpoint::parse(text.trim()) {
        Ok(Endpoint::Tls(a)) => Ok(a),
        Ok(other) => Err(format!(
            "{text:?} is a {} endpoint, expected tls://HOST:PORT",
            other.transport().scheme()
        )),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// Parses a listen address: a `tls://HOST:PORT` endpoint, where port 0
/// asks for a port the system picks.
pub fn parse_listen(text: &str) -> Result<TlsAddr, String> {
    match text.trim().strip_suffix(":0") {
        // The host is parsed as in an endpoint with a real port.
        Some(rest) if rest.starts_with("tls://") => {
            parse_tls(&format!("{rest}:1")).map(|a| TlsAddr::any_port(a.host().clone()))
        }
        _ => parse_tls(text),
    }
}

/// The user's Commy config directory: `$XDG_CONFIG_HOME/commy`, else
/// `~/.config/commy`; `None` when neither variable is set.
pub fn user_config_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".config"),
    };
    Some(base.join("commy"))
}

impl NetConfig {
    /// Reads a config file (TOML).
    pub fn from_file(path: &Path) -> Result<NetConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
        let bad = |e: String| format!("config file {}: {e}", path.display());
        let file: FileConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        Ok(NetConfig {
            listen: file
                .listen
                .as_deref()
                .map(parse_listen)
                .transpose()
                .map_err(bad)?,
            peers: file
                .peers
                .unwrap_or_default()
                .iter()
                .map(|p| parse_tls(p))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            tls_ca: file.tls_ca.map(rel),
            tls_cert: file.tls_cert.map(rel),
            tls_key: file.tls_key.map(rel),
            require_client_cert: file.require_client_cert,
            transport: file
                .transport
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(bad)?,
            ..NetConfig::default()
        })
    }

    /// The settings from the environment.
    pub fn from_env() -> Result<NetConfig, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let bad = |k: &str, e: String| format!("${k}: {e}");
        Ok(NetConfig {
            listen: var("COMMY_LISTEN")
                .map(|v| parse_listen(&v))
                .transpose()
                .map_err(|e| bad("COMMY_LISTEN", e))?,
            peers: var("COMMY_PEERS")
                .map(|v| {
                    v.split(',')
                        .filter(|p| !p.trim().is_empty())
                        .map(parse_tls)
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
                .map_err(|e| bad("COMMY_PEERS", e))?
                .unwrap_or_default(),
            tls_ca: var("COMMY_TLS_CA").map(PathBuf::from),
            tls_cert: var("COMMY_TLS_CERT").map(PathBuf::from),
            tls_key: var("COMMY_TLS_KEY").map(PathBuf::from),
            require_client_cert: var("COMMY_REQUIRE_CLIENT_CERT")
                .map(|v| match v.as_str() {
                    "1" | "true" | "yes" => Ok(true),
                    "0" | "false" | "no" => Ok(false),
                    other => Err(format!("expected 1/true or 0/false, got {other:?}")),
                })
                .transpose()
                .map_err(|e| bad("COMMY_REQUIRE_CLIENT_CERT", e))?,
            transport: var("COMMY_TRANSPORT")
                .map(|v| v.parse())
                .transpose()
                .map_err(|e| bad("COMMY_TRANSPORT", e))?,
            ..NetConfig::default()
        })
    }

    /// The config file in use, if any: `$COMMY_CONFIG` (which must exist),
    /// else the user's `config.toml` if it exists.
    pub fn config_file() -> Result<Option<PathBuf>, String> {
        if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(Some(p))
            } else {
                Err(format!(
                    "${CONFIG_ENV} names {}, which is not a file",
                    p.display()
                ))
            };
        }
        Ok(user_config_dir()
            .map(|d| d.join("config.toml"))
            .filter(|p| p.is_file()))
    }

    /// Fills what is unset here from the environment, then the config file.
    pub fn resolve(mut self) -> Result<NetConfig, String> {
        let env = NetConfig::from_env()?;
        let file = match NetConfig::config_file()? {
            Some(p) => NetConfig::from_file(&p)?,
            None => NetConfig::default(),
        };
        for other in [env, file] {
            if !self.no_listen {
                self.listen = self.listen.or(other.listen);
            }
            if self.peers.is_empty() {
                self.peers = other.peers;
            }
            self.tls_ca = self.tls_ca.or(other.tls_ca);
            self.tls_cert = self.tls_cert.or(other.tls_cert);
            self.tls_key = self.tls_key.or(other.tls_key);
            self.require_client_cert = self.require_client_cert.or(other.require_client_cert);
            self.transport = self.transport.or(other.transport);
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key must be given together".into());
        }
        if self.tls_cert.is_some() && self.tls_ca.is_none() {
            return Err("tls_cert needs tls_ca (the CA that signed it, which peers trust)".into());
        }
        Ok(self)
    }

    /// Whether anything needs the network.
    pub fn in_use(&self) -> bool {
        self.listen.is_some()
            || !self.peers.is_empty()
            || self.transport == Some(TransportPreference::Tls)
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_listen, parse_tls};

    #[test]
    fn a_listen_address_may_ask_for_any_port_and_a_peer_may_not() {
        let any = parse_listen("tls://127.0.0.1:0").unwrap();
        assert_eq!(
            (any.host().to_string().as_str(), any.port()),
            ("127.0.0.1", 0)
        );
        let v6 = parse_listen(" tls://[::1]:0 ").unwrap();
        assert_eq!((v6.host().to_string().as_str(), v6.port()), ("::1", 0));
        assert_eq!(parse_listen("tls://localhost:7443").unwrap().port(), 7443);
        for bad in [
            "tls://127.0.0.1:00",
            "tls://:0",
            "shm:///tmp/x:0",
            "127.0.0.1:0",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        let e = parse_tls("tls://127.0.0.1:0").unwrap_err();
        assert!(e.contains("invalid port \"0\""), "{e}");
    }
}
