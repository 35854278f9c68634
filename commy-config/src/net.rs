//! The network settings of a mesh handle, typed: where to listen for TLS,
//! which peers to ask for remote instances, which certificates to use and
//! which transport calls take. They are made from the [`Settings`]
//! (crate::Settings), which say where each value came from.

use std::path::PathBuf;
use std::str::FromStr;

use commy_core::{Endpoint, TlsAddr};

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

impl TransportPreference {
    /// Its name: `auto`, `shm` or `tls` (what [`FromStr`] parses).
    pub const fn as_str(self) -> &'static str {
        match self {
            TransportPreference::Auto => "auto",
            TransportPreference::Shm => "shm",
            TransportPreference::Tls => "tls",
        }
    }
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
    /// The network part of `settings`, parsed (the settings were checked
    /// when they were loaded; an error here names the key all the same).
    pub fn from_settings(settings: &crate::Settings) -> Result<NetConfig, String> {
        Ok(NetConfig {
            listen: settings
                .listen
                .as_deref()
                .map(parse_listen)
                .transpose()
                .map_err(|e| format!("listen: {e}"))?,
            no_listen: false,
            peers: settings
                .peers
                .iter()
                .map(|p| parse_tls(p))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("peers: {e}"))?,
            tls_ca: settings.tls_ca.clone(),
            tls_cert: settings.tls_cert.clone(),
            tls_key: settings.tls_key.clone(),
            require_client_cert: Some(settings.require_client_cert),
            transport: Some(settings.transport),
        })
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
