//! [`Endpoint`]: how one instance is reached, and the [`Transport`] scheme table.
//!
//! An endpoint is written as a locator URL:
//!
//! - `shm://<absolute socket path>`, e.g.
//!   `shm:///run/user/1000/commy/default/billing/0123456789abcdef0123456789abcdef.sock`
//!   (note the third `/`: it starts the absolute path);
//! - `tls://<host>:<port>` where host is a DNS name, an IPv4 address or a
//!   bracketed IPv6 address, e.g. `tls://billing.example.com:7443`,
//!   `tls://10.0.0.7:7443`, `tls://[fd00::7]:7443`.
//!
//! [`Transport::ALL`] with [`Transport::scheme`] is the one scheme table:
//! parsing, display and transport selection all read it.
//!
//! ```
//! use commy_core::{Endpoint, Transport};
//!
//! let ep: Endpoint = "tls://[fd00::7]:7443".parse()?;
//! assert_eq!(ep.transport(), Transport::Tls);
//! assert_eq!(ep.to_string(), "tls://[fd00::7]:7443");
//!
//! match &ep {
//!     Endpoint::Shm(shm) => println!("connect to socket {}", shm.path().display()),
//!     Endpoint::Tls(tls) => assert_eq!((tls.host().to_string(), tls.port()), ("fd00::7".into(), 7443)),
//!     _ => unreachable!("a transport added later"),
//! }
//!
//! let shm = Endpoint::shm("/tmp/commy-1000/default/billing/x.sock")?;
//! assert_eq!(shm.to_string(), "shm:///tmp/commy-1000/default/billing/x.sock");
//!
//! let err = "udp://h:1".parse::<Endpoint>().unwrap_err();
//! assert_eq!(err.to_string(), "unknown scheme \"udp\" in endpoint \"udp://h:1\" (known: shm, tls)");
//! # Ok::<(), commy_core::EndpointError>(())
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted shared-memory socket path, in bytes (Linux `PATH_MAX - 1`).
///
/// The kernel's `sockaddr_un` is shorter still (107 bytes on Linux); the shm
/// transport reports that limit when it binds or connects.
pub const MAX_SHM_PATH_LEN: usize = 4095;

/// A transport, identified by its locator scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Transport {
    /// Same-host shared memory, set up over a Unix socket (`shm://`).
    Shm,
    /// TLS 1.3 over TCP (`tls://`).
    Tls,
}

impl Transport {
    /// Every transport; with [`Transport::scheme`] this is the scheme table.
    pub const ALL: [Transport; 2] = [Transport::Shm, Transport::Tls];

    /// The locator scheme, without `://`.
    pub const fn scheme(self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Tls => "tls",
        }
    }

    /// Looks a scheme up in the table (exact, lowercase match).
    pub fn from_scheme(scheme: &str) -> Option<Transport> {
        Transport::ALL.into_iter().find(|t| t.scheme() == scheme)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

/// Comma-separated list of known schemes, for error messages.
fn known_schemes() -> String {
    Transport::ALL.map(Transport::scheme).join(", ")
}

/// Error parsing or building an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The text has no `scheme://` prefix.
    #[error(
        "endpoint {input:?} has no scheme (expected e.g. \"shm:///path.sock\" or \"tls://host:port\")"
    )]
    MissingScheme {
        /// The rejected text.
        input: String,
    },
    /// The scheme is not in the table.
    #[error("unknown scheme {scheme:?} in endpoint {input:?} (known: {known})", known = known_schemes())]
    UnknownScheme {
        /// The scheme found.
        scheme: String,
        /// The rejected text.
        input: String,
    },
    /// The shm socket path is not acceptable.
    #[error("invalid shm socket path {path:?}: {reason}")]
    InvalidShmPath {
        /// The rejected path (lossy UTF-8).
        path: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The TLS host is not a DNS name, IPv4 address or bracketed IPv6 address.
    #[error("invalid host {host:?} in endpoint: {reason}")]
    InvalidHost {
        /// The rejected host text.
        host: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A `tls://` endpoint has no `:port`.
    #[error("endpoint {input:?} has no port (expected \"tls://host:port\")")]
    MissingPort {
        /// The rejected text.
        input: String,
    },
    /// The port is not a decimal number in 1..=65535 without sign or leading zeros.
    #[error(
        "invalid port {port:?} (expected a decimal number from 1 to 65535, with no path after it)"
    )]
    InvalidPort {
        /// The rejected port text.
        port: String,
    },
}

/// A validated shared-memory endpoint: the absolute path of the instance's
/// Unix socket.
///
/// The path is UTF-8, absolute, at most [`MAX_SHM_PATH_LEN`] bytes, contains
/// no NUL or other control characters, and no empty, `.` or `..` component,
/// and does not end in `/`. So each socket has exactly one locator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShmAddr {
    path: String,
}

impl ShmAddr {
    /// Validates a socket path.
    pub fn new(path: impl AsRef<Path>) -> Result<ShmAddr, EndpointError> {
        let path = path.as_ref();
        let invalid = |reason| EndpointError::InvalidShmPath {
            path: path.to_string_lossy().into_owned(),
            reason,
        };
        let text = path.to_str().ok_or_else(|| invalid("not valid UTF-8"))?;
        if !text.starts_with('/') {
            return Err(invalid("not an absolute path"));
        }
        if text.len() > MAX_SHM_PATH_LEN {
            return Err(invalid("longer than 4095 bytes"));
        }
        if text.chars().any(char::is_control) {
            return Err(invalid("contains a NUL or control character"));
        }
        if text.len() == 1 || text.ends_with('/') {
            return Err(invalid("ends with '/' (a socket path names a file)"));
        }
        for component in text[1..].split('/') {
            match component {
                "" => return Err(invalid("contains an empty component ('//')")),
                "." | ".." => return Err(invalid("contains a '.' or '..' component")),
                _ => {}
            }
        }
        Ok(ShmAddr {
            path: text.to_owned(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        Path::new(&self.path)
    }

    /// The socket path as text.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The socket path as an owned [`PathBuf`].
    pub fn to_path_buf(&self) -> PathBuf {
        PathBuf::from(&self.path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum HostRepr {
    Domain(Box<str>),
    Ip(IpAddr),
}

/// The host part of a `tls://` endpoint: a DNS name or an IP address.
///
/// DNS names are validated per RFC 1123 (labels of 1-63 letters, digits and
/// `-`, not starting or ending with `-`, at most 253 bytes in total, no
/// trailing dot) and stored in lowercase. Displayed bare (IPv6 without
/// brackets), the form TLS server-name checks want.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host(HostRepr);

impl Host {
    /// Parses a bare host: a DNS name, an IPv4 address, or an IPv6 address
    /// with or without brackets. IPv6 zone ids (`%eth0`) are not supported.
    pub fn parse(text: &str) -> Result<Host, EndpointError> {
        let invalid = |reason| EndpointError::InvalidHost {
            host: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(invalid("empty host"));
        }
        if let Some(inner) = text.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| invalid("'[' without a closing ']'"))?;
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Host(HostRepr::Ip(IpAddr::V6(ip))))
                .map_err(|_| invalid("not a valid IPv6 address (zone ids are not supported)"));
        }
        if text.contains(':') {
            return text
                .parse::<Ipv6Addr>()
                .map(|ip| Host(HostRepr::Ip(IpAddr::V6(ip))))
                .map_err(|_| invalid("contains ':' but is not a valid IPv6 address"));
        }
        let last_label = text.rsplit('.').next().unwrap_or(text);
        if !last_label.is_empty() && last_label.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse::<Ipv4Addr>()
                .map(|ip| Host(HostRepr::Ip(IpAddr::V4(ip))))
                .map_err(|_| {
                    invalid("ends in a numeric label but is not a valid dotted-quad IPv4 address")
                });
        }
        if text.len() > 253 {
            return Err(invalid("DNS name longer than 253 bytes"));
        }
        for label in text.split('.') {
            if label.is_empty() {
                return Err(invalid(
                    "DNS name has an empty label (leading, trailing or doubled '.')",
                ));
            }
            if label.len() > 63 {
                return Err(invalid("DNS label longer than 63 bytes"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(invalid(
                    "DNS name may contain only ASCII letters, digits, '-' and '.'",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("DNS label starts or ends with '-'"));
            }
        }
        Ok(Host(HostRepr::Domain(
            text.to_ascii_lowercase().into_boxed_str(),
        )))
    }

    /// The IP address, if the host is one.
    pub fn as_ip(&self) -> Option<IpAddr> {
        match self.0 {
            HostRepr::Ip(ip) => Some(ip),
            HostRepr::Domain(_) => None,
        }
    }

    /// The (lowercase) DNS name, if the host is one.
    pub fn as_domain(&self) -> Option<&str> {
        match &self.0 {
            HostRepr::Domain(name) => Some(name),
            HostRepr::Ip(_) => None,
        }
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Host {
        Host(HostRepr::Ip(ip))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            HostRepr::Domain(name) => f.write_str(name),
            HostRepr::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl FromStr for Host {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Host, EndpointError> {
        Host::parse(s)
    }
}

/// A validated TLS endpoint: host and port (1..=65535).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsAddr {
    host: Host,
    port: u16,
}

impl TlsAddr {
    /// Builds an address; port 0 is rejected (it cannot be connected to).
    pub fn new(host: Host, port: u16) -> Result<TlsAddr, EndpointError> {
        if port == 0 {
            return Err(EndpointError::InvalidPort { port: "0".into() });
        }
        Ok(TlsAddr { host, port })
    }

    /// An address to listen on at a port the system picks (port 0). It
    /// cannot be connected to: the listener reports the port it got.
    ///
    /// ```
    /// use commy_core::{Host, TlsAddr};
    ///
    /// let any = TlsAddr::any_port(Host::parse("127.0.0.1").unwrap());
    /// assert_eq!(any.port(), 0);
    /// ```
    pub fn any_port(host: Host) -> TlsAddr {
        TlsAddr { host, port: 0 }
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The TCP port (0 only for [`any_port`](TlsAddr::any_port)).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for TlsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.0 {
            HostRepr::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// How one instance is reached. Parsed from and displayed as a locator URL
/// (see the [module docs](self)); serde uses the same string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
#[non_exhaustive]
pub enum Endpoint {
    /// Same-host shared memory via the instance's Unix socket.
    Shm(ShmAddr),
    /// TLS over TCP.
    Tls(TlsAddr),
}

impl Endpoint {
    /// A `shm://` endpoint for the given absolute socket path.
    pub fn shm(path: impl AsRef<Path>) -> Result<Endpoint, EndpointError> {
        ShmAddr::new(path).map(Endpoint::Shm)
    }

    /// A `tls://` endpoint; `host` is parsed with [`Host::parse`].
    pub fn tls(host: &str, port: u16) -> Result<Endpoint, EndpointError> {
        TlsAddr::new(Host::parse(host)?, port).map(Endpoint::Tls)
    }

    /// The transport this endpoint selects.
    pub fn transport(&self) -> Transport {
        match self {
            Endpoint::Shm(_) => Transport::Shm,
            Endpoint::Tls(_) => Transport::Tls,
        }
    }

    /// Parses a locator URL.
    pub fn parse(input: &str) -> Result<Endpoint, EndpointError> {
        let (scheme, rest) =
            input
                .split_once("://")
                .ok_or_else(|| EndpointError::MissingScheme {
                    input: input.to_owned(),
                })?;
        let transport =
            Transport::from_scheme(scheme).ok_or_else(|| EndpointError::UnknownScheme {
                scheme: scheme.to_owned(),
                input: input.to_owned(),
            })?;
        match transport {
            Transport::Shm => Endpoint::shm(rest),
            Transport::Tls => parse_tls(input, rest).map(Endpoint::Tls),
        }
    }
}

fn parse_tls(input: &str, authority: &str) -> Result<TlsAddr, EndpointError> {
    let missing_port = || EndpointError::MissingPort {
        input: input.to_owned(),
    };
    let (host, port) = if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or_else(|| EndpointError::InvalidHost {
                host: authority.to_owned(),
                reason: "'[' without a closing ']'",
            })?;
        let (host, after) = authority.split_at(close + 1);
        if after.is_empty() {
            return Err(missing_port());
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| EndpointError::InvalidHost {
                host: authority.to_owned(),
                reason: "expected ':' and a port after ']'",
            })?;
        (host, port)
    } else {
        let (host, port) = authority.rsplit_once(':').ok_or_else(missing_port)?;
        if host.contains(':') {
            return Err(EndpointError::InvalidHost {
                host: host.to_owned(),
                reason: "IPv6 addresses must be written in brackets, e.g. [::1]:7443",
            });
        }
        (host, port)
    };
    let host = Host::parse(host)?;
    let port = parse_port(port)?;
    TlsAddr::new(host, port)
}

fn parse_port(text: &str) -> Result<u16, EndpointError> {
    let invalid = || EndpointError::InvalidPort {
        port: text.to_owned(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.starts_with('0') {
        return Err(invalid());
    }
    text.parse::<u16>().map_err(|_| invalid())
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.transport().scheme())?;
        match self {
            Endpoint::Shm(shm) => f.write_str(shm.as_str()),
            Endpoint::Tls(tls) => write!(f, "{tls}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(s)
    }
}

impl TryFrom<String> for Endpoint {
    type Error = EndpointError;

    fn try_from(s: String) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(&s)
    }
}

impl From<Endpoint> for String {
    fn from(ep: Endpoint) -> String {
        ep.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_table_round_trips() {
        for t in Transport::ALL {
            assert_eq!(Transport::from_scheme(t.scheme()), Some(t));
        }
        assert_eq!(Transport::from_scheme("SHM"), None);
        assert_eq!(known_schemes(), "shm, tls");
    }

    #[test]
    fn valid_endpoints_round_trip() {
        for text in [
            "shm:///tmp/commy-0/default/billing/0123456789abcdef0123456789abcdef.sock",
            "shm:///a",
            "shm:///run/user/1000/commy/with space/x.sock",
            "tls://example.com:7443",
            "tls://a:1",
            "tls://10.0.0.7:65535",
            "tls://[::1]:7443",
            "tls://[fd00::7]:443",
            "tls://xn--bcher-kva.example:8443",
        ] {
            let ep: Endpoint = text.parse().unwrap();
            assert_eq!(ep.to_string(), text);
            assert_eq!(ep.to_string().parse::<Endpoint>().unwrap(), ep);
        }
    }

    #[test]
    fn parts() {
        let ep: Endpoint = "tls://Billing.Example.COM:7443".parse().unwrap();
        assert_eq!(ep.transport(), Transport::Tls);
        let Endpoint::Tls(tls) = &ep else {
            panic!("not tls")
        };
        assert_eq!(tls.host().as_domain(), Some("billing.example.com"));
        assert_eq!(tls.host().as_ip(), None);
        assert_eq!(tls.port(), 7443);
        assert_eq!(ep.to_string(), "tls://billing.example.com:7443");

        let ep = Endpoint::tls("::1", 80).unwrap();
        assert_eq!(ep.to_string(), "tls://[::1]:80");
        let Endpoint::Tls(tls) = &ep else {
            panic!("not tls")
        };
        assert_eq!(tls.host().as_ip(), Some("::1".parse().unwrap()));
        assert_eq!(tls.host().to_string(), "::1");

        let ep = Endpoint::shm("/tmp/x.sock").unwrap();
        assert_eq!(ep.transport(), Transport::Shm);
        let Endpoint::Shm(shm) = &ep else {
            panic!("not shm")
        };
        assert_eq!(shm.path(), Path::new("/tmp/x.sock"));
        assert_eq!(shm.to_path_buf(), PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn scheme_errors() {
        assert_eq!(
            "/tmp/x.sock".parse::<Endpoint>(),
            Err(EndpointError::MissingScheme {
                input: "/tmp/x.sock".into()
            })
        );
        assert_eq!(
            "quic://h:1".parse::<Endpoint>(),
            Err(EndpointError::UnknownScheme {
                scheme: "quic".into(),
                input: "quic://h:1".into()
            })
        );
    }

    #[test]
    fn shm_path_errors() {
        for (path, reason) in [
            ("relative/x.sock", "not an absolute path"),
            ("", "not an absolute path"),
            ("/", "ends with '/' (a socket path names a file)"),
            ("/tmp/", "ends with '/' (a socket path names a file)"),
            ("/tmp//x", "contains an empty component ('//')"),
            ("/tmp/../x", "contains a '.' or '..' component"),
            ("/tmp/./x", "contains a '.' or '..' component"),
            ("/tmp/.", "contains a '.' or '..' component"),
            ("/tmp/a\0b", "contains a NUL or control character"),
            ("/tmp/a\nb", "contains a NUL or control character"),
        ] {
            assert_eq!(
                Endpoint::parse(&format!("shm://{path}")),
                Err(EndpointError::InvalidShmPath {
                    path: path.into(),
                    reason
                }),
                "{path:?}"
            );
        }
        let long = format!("/{}", "a".repeat(4095));
        assert!(matches!(
            Endpoint::shm(&long),
            Err(EndpointError::InvalidShmPath {
                reason: "longer than 4095 bytes",
                ..
            })
        ));
        // Hidden files and dots inside names are fine.
        assert!(Endpoint::shm("/tmp/.x/a..b").is_ok());
    }

    #[test]
    fn tls_errors() {
        let host_err = |text: &str| match Endpoint::parse(text) {
            Err(EndpointError::InvalidHost { host, reason }) => (host, reason),
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(host_err("tls://:80").1, "empty host");
        assert_eq!(
            host_err("tls://-a.com:80").1,
            "DNS label starts or ends with '-'"
        );
        assert_eq!(
            host_err("tls://a..b:80").1,
            "DNS name has an empty label (leading, trailing or doubled '.')"
        );
        assert_eq!(
            host_err("tls://a.com.:80").1,
            "DNS name has an empty label (leading, trailing or doubled '.')"
        );
        assert_eq!(
            host_err("tls://under_score.com:80").1,
            "DNS name may contain only ASCII letters, digits, '-' and '.'"
        );
        assert_eq!(
            host_err("tls://user@h:80").1,
            "DNS name may contain only ASCII letters, digits, '-' and '.'"
        );
        assert_eq!(
            host_err("tls://1.2.3.256:80").1,
            "ends in a numeric label but is not a valid dotted-quad IPv4 address"
        );
        assert_eq!(
            host_err(&format!("tls://{}.com:80", "a".repeat(64))).1,
            "DNS label longer than 63 bytes"
        );
        assert_eq!(
            host_err(&format!("tls://{}:80", ["abcdefgh"; 30].join("."))).1,
            "DNS name longer than 253 bytes"
        );
        assert_eq!(
            host_err("tls://::1:80"),
            (
                "::1".into(),
                "IPv6 addresses must be written in brackets, e.g. [::1]:7443"
            )
        );
        assert_eq!(host_err("tls://[::1:80").1, "'[' without a closing ']'");
        assert_eq!(
            host_err("tls://[::1]80").1,
            "expected ':' and a port after ']'"
        );
        assert_eq!(
            host_err("tls://[fe80::1%eth0]:80").1,
            "not a valid IPv6 address (zone ids are not supported)"
        );
        assert_eq!(
            host_err("tls://[nope]:80").1,
            "not a valid IPv6 address (zone ids are not supported)"
        );

        for missing in ["tls://host", "tls://[::1]"] {
            assert_eq!(
                Endpoint::parse(missing),
                Err(EndpointError::MissingPort {
                    input: missing.into()
                })
            );
        }
        for port in ["", "0", "080", "+80", "65536", "80/", "80/x", "8a"] {
            assert_eq!(
                Endpoint::parse(&format!("tls://h:{port}")),
                Err(EndpointError::InvalidPort { port: port.into() }),
                "{port:?}"
            );
        }
        assert!(Endpoint::tls("h", 0).is_err());
    }

    #[test]
    fn serde_as_string() {
        let ep: Endpoint = "tls://[::1]:7443".parse().unwrap();
        let json = serde_json::to_string(&ep).unwrap();
        assert_eq!(json, "\"tls://[::1]:7443\"");
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), ep);
        let bytes = postcard::to_allocvec(&ep).unwrap();
        assert_eq!(postcard::from_bytes::<Endpoint>(&bytes).unwrap(), ep);
        let err = serde_json::from_str::<Endpoint>("\"tcp://x:1\"").unwrap_err();
        assert!(err.to_string().contains("unknown scheme"), "{err}");
    }
}
