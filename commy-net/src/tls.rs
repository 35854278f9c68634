//! Certificates and TLS settings: the per-user dev CA, PEM loading for
//! production, rustls configurations (TLS 1.3 only, ALPN `commy/1`, ring)
//! and SPIFFE identities.
//!
//! With no CA configured, [`DevCa::load_or_create`] makes a CA in the user's
//! config dir (`$XDG_CONFIG_HOME/commy/dev-ca`, else `~/.config/commy/dev-ca`)
//! the first time anything needs one; every process of that user then trusts
//! every other one with no configuration. Other hosts are given the CA file
//! (`ca.pem`). Production loads PEM files with [`Credentials::from_pem_files`].
//! There is no mode that skips verifying the server.
//!
//! ```
//! use commy_net::{Credentials, DevCa, Identity, LeafSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("commy-net-tls-doc-{}", std::process::id()));
//! let ca = DevCa::load_or_create(&dir)?;
//! let id = Identity::new("default", "billing")?;
//! let creds = ca.credentials(&LeafSpec::new(id.clone()).dns("localhost"))?;
//! let _server = creds.server_config(false)?;
//! let _client = creds.client_config()?;
//! assert_eq!(id.to_string(), "spiffe://default/billing");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// File name of the dev CA's certificate inside its directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the dev CA's private key inside its directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Errors building or loading certificates and TLS settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read, written or created.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {problem}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("cannot verify client certificates: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Neither `$XDG_CONFIG_HOME` nor `$HOME` is set.
    #[error("no config dir for the dev CA: neither XDG_CONFIG_HOME nor HOME is set")]
    NoConfigDir,
    /// An identity is not of the form `spiffe://<mesh>/<service>`.
    #[error("invalid identity {0:?}: expected spiffe://<mesh>/<service>")]
    Identity(String),
}

/// Who a peer is: the URI SAN `spiffe://<mesh>/<service>` of its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    mesh: String,
    service: String,
}

impl Identity {
    /// An identity for `service` in `mesh` (both non-empty, no `/`).
    pub fn new(mesh: &str, service: &str) -> Result<Identity, TlsError> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        };
        if ok(mesh) && ok(service) {
            Ok(Identity {
                mesh: mesh.to_owned(),
                service: service.to_owned(),
            })
        } else {
            Err(TlsError::Identity(format!("spiffe://{mesh}/{service}")))
        }
    }

    /// Parses `spiffe://<mesh>/<service>`.
    pub fn parse(uri: &str) -> Result<Identity, TlsError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| TlsError::Identity(uri.to_owned()))?;
        let (mesh, service) = rest
            .split_once('/')
            .ok_or_else(|| TlsError::Identity(uri.to_owned()))?;
        Identity::new(mesh, service).map_err(|_| TlsError::Identity(uri.to_owned()))
    }

    /// The mesh part.
    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    /// The service part.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The identity of a peer's end-entity certificate (its first URI SAN
    /// that parses as one), if it has one.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Option<Identity> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let san = parsed.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Identity::parse(uri).ok(),
            _ => None,
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.mesh, self.service)
    }
}

/// What a leaf certificate is for: its identity and the names and
/// addresses a server is reached by.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    identity: Identity,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl LeafSpec {
    /// A leaf for `identity` with no DNS names or addresses yet.
    pub fn new(identity: Identity) -> LeafSpec {
        LeafSpec {
            identity,
            dns: Vec::new(),
            ips: Vec::new(),
        }
    }

    /// A leaf valid for this host: `localhost`, the loopback addresses, the
    /// host name and `extra` addresses (e.g. the address listened on).
    pub fn for_this_host(identity: Identity, extra: &[IpAddr]) -> LeafSpec {
        let mut spec = LeafSpec::new(identity).dns("localhost");
        if let Ok(name) = fs::read_to_string("/proc/sys/kernel/hostname") {
            let name = name.trim();
            if !name.is_empty() && name != "localhost" {
                spec = spec.dns(name);
            }
        }
        spec = spec
            .ip(IpAddr::from([127, 0, 0, 1]))
            .ip(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
        for ip in extra {
            if !ip.is_unspecified() && !spec.ips.contains(ip) {
                spec = spec.ip(*ip);
            }
        }
        spec
    }

    /// Adds a DNS name.
    pub fn dns(mut self, name: &str) -> LeafSpec {
        self.dns.push(name.to_owned());
        self
    }

    /// Adds an IP address.
    pub fn ip(mut self, ip: IpAddr) -> LeafSpec {
        self.ips.push(ip);
        self
    }

    /// The identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// A certificate authority whose key is at hand: the per-user dev CA, or a
/// CA made by `commy cert init`.
pub struct DevCa {
    dir: PathBuf,
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa").field("dir", &self.dir).finish()
    }
}

/// The default dev CA directory: `$XDG_CONFIG_HOME/commy/dev-ca`, else
/// `$HOME/.config/commy/dev-ca`.
pub fn default_dev_ca_dir() -> Result<PathBuf, TlsError> {
    config_dir().map(|d| d.join("dev-ca"))
}

/// The user's commy config dir: `$XDG_CONFIG_HOME/commy`, else
/// `$HOME/.config/commy`.
pub fn config_dir() -> Result<PathBuf, TlsError> {
    commy_config::user_config_dir().ok_or(TlsError::NoConfigDir)
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl DevCa {
    /// Loads the CA in `dir` (`ca.pem` + `ca.key`), creating it first if the
    /// directory does not exist. Creation is race-safe: the CA is written to
    /// a private temporary directory that is then renamed into place, so
    /// concurrent first uses (threads or processes) all end up with the one
    /// CA that won the rename.
    pub fn load_or_create(dir: &Path) -> Result<DevCa, TlsError> {
        if !dir.join(CA_CERT_FILE).exists() {
            DevCa::create(dir)?;
        }
        DevCa::load(dir)
    }

    /// Loads an existing CA from `dir`.
    pub fn load(dir: &Path) -> Result<DevCa, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path)
            .map_err(io_err("cannot read the CA certificate", &cert_path))?;
        let key_pem =
            fs::read_to_string(&key_path).map_err(io_err("cannot read the CA key", &key_path))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: key_path.clone(),
            problem: format!("not a usable private key: {e}"),
        })?;
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::Pem {
                path: cert_path.clone(),
                problem: format!("not a usable CA certificate: {e}"),
            })?;
        Ok(DevCa {
            dir: dir.to_owned(),
            cert_pem,
            issuer,
        })
    }

    /// Creates a new CA in `dir`, which must not exist yet (if another
    /// process created it meanwhile, that one is kept and this returns Ok).
    pub fn create(dir: &Path) -> Result<(), TlsError> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err("cannot create", parent))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Commy dev CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{:x}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("ca"),
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err("cannot create", &tmp))?;
        let written = write_private(&tmp.join(CA_KEY_FILE), key.serialize_pem().as_bytes())
            .and_then(|()| write_private(&tmp.join(CA_CERT_FILE), cert.pem().as_bytes()));
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, dir) {
            Ok(()) => {
                tracing::info!("created a dev CA in {}", dir.display());
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                // Someone else's CA won the race: use theirs.
                if dir.join(CA_CERT_FILE).exists() {
                    Ok(())
                } else {
                    Err(io_err("cannot create the CA dir", dir)(e))
                }
            }
        }
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate and its key (both PEM) for `spec`, valid
    /// as a server and as a client certificate.
    pub fn issue(&self, spec: &LeafSpec) -> Result<(String, String), TlsError> {
        let (cert, key) = self.issue_raw(spec)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issue_raw(&self, spec: &LeafSpec) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
        let mut params = rcgen::CertificateParams::new(spec.dns.clone())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, spec.identity.to_string());
        for ip in &spec.ips {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(*ip));
        }
        let uri = rcgen::string::Ia5String::try_from(spec.identity.to_string())?;
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time_now();
        params.not_before = now - std::time::Duration::from_secs(3600);
        params.not_after = now + std::time::Duration::from_secs(397 * 24 * 3600);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }

    /// Issues an in-memory leaf for `spec` and returns credentials that
    /// trust this CA and present that leaf.
    pub fn credentials(&self, spec: &LeafSpec) -> Result<Credentials, TlsError> {
        let (cert, key) = self.issue_raw(spec)?;
        let ca_path = self.dir.join(CA_CERT_FILE);
        let roots = roots_from_pem(self.cert_pem.as_bytes(), &ca_path)?;
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).map_err(|e| {
            TlsError::Pem {
                path: PathBuf::from("<generated key>"),
                problem: e.to_string(),
            }
        })?;
        Ok(Credentials {
            roots: Arc::new(roots),
            chain: vec![cert.der().clone()],
            key: Some(Arc::new(key)),
        })
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("cannot create", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("cannot write", path))
}

/// Writes a PEM file readable by its owner only (for `commy cert`).
pub fn write_pem_file(path: &Path, pem: &str) -> Result<(), TlsError> {
    let _ = fs::remove_file(path);
    write_private(path, pem.as_bytes())?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_err("cannot chmod", path))
}

fn roots_from_pem(pem: &[u8], path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            problem: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            problem: "no certificate in the file".into(),
        });
    }
    Ok(roots)
}

/// What a process trusts and presents: CA roots, and optionally its own
/// certificate chain and key (needed to serve, and for mTLS as a client).
#[derive(Clone)]
pub struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Option<Arc<PrivateKeyDer<'static>>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .field("identity", &self.identity())
            .finish()
    }
}

impl Credentials {
    /// Loads the CA roots from `ca` and, if given, a certificate chain and
    /// its private key (PEM files).
    pub fn from_pem_files(
        ca: &Path,
        cert_and_key: Option<(&Path, &Path)>,
    ) -> Result<Credentials, TlsError> {
        let pem = fs::read(ca).map_err(io_err("cannot read the CA file", ca))?;
        let roots = roots_from_pem(&pem, ca)?;
        let (chain, key) = match cert_and_key {
            None => (Vec::new(), None),
            Some((cert, key)) => {
                let bytes =
                    fs::read(cert).map_err(io_err("cannot read the certificate file", cert))?;
                let chain = CertificateDer::pem_slice_iter(&bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| TlsError::Pem {
                        path: cert.to_owned(),
                        problem: e.to_string(),
                    })?;
                if chain.is_empty() {
                    return Err(TlsError::Pem {
                        path: cert.to_owned(),
                        problem: "no certificate in the file".into(),
                    });
                }
                let kb = fs::read(key).map_err(io_err("cannot read the key file", key))?;
                let k = PrivateKeyDer::from_pem_slice(&kb).map_err(|e| TlsError::Pem {
                    path: key.to_owned(),
                    problem: format!("no private key: {e}"),
                })?;
                (chain, Some(Arc::new(k)))
            }
        };
        Ok(Credentials {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// The identity in our own certificate, if we have one.
    pub fn identity(&self) -> Option<Identity> {
        self.chain.first().and_then(Identity::of_certificate)
    }

    /// Whether we have a certificate to present.
    pub fn has_certificate(&self) -> bool {
        self.key.is_some()
    }

    /// A server configuration: TLS 1.3 only, ALPN `commy/1`, our chain;
    /// client certificates are verified against our roots when presented,
    /// and required when `require_client_cert`.
    pub fn server_config(&self, require_client_cert: bool) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(require_client_cert, None)
    }

    /// [`server_config`](Credentials::server_config) for mTLS in the
    /// trust domain `mesh`: client certificates are required, and one must
    /// also carry a SPIFFE ID `spiffe://<mesh>/<service>`. A certificate of
    /// the CA without one, or for another mesh, fails the handshake with
    /// an `access_denied` alert.
    pub fn mtls_server_config(&self, mesh: &str) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_with(true, Some(mesh))
    }

    fn server_config_with(
        &self,
        require_client_cert: bool,
        trust_domain: Option<&str>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let Some(key) = &self.key else {
            return Err(TlsError::Pem {
                path: PathBuf::from("<certificate>"),
                problem: "serving over TLS needs a certificate and key".into(),
            });
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone());
        let verifier = if require_client_cert {
            verifier.build()?
        } else {
            verifier.allow_unauthenticated().build()?
        };
        let verifier: Arc<dyn ClientCertVerifier> = match trust_domain {
            Some(mesh) => Arc::new(InTrustDomain {
                inner: verifier,
                mesh: mesh.to_owned(),
            }),
            None => verifier,
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), key.clone_key())?;
        config.alpn_protocols = vec![commy_core::ALPN.to_vec()];
        Ok(Arc::new(config))
    }

    /// A client configuration: TLS 1.3 only, ALPN `commy/1`, servers
    /// verified against our roots, our certificate presented if we have one.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone());
        let mut config = match &self.key {
            Some(key) => builder.with_client_auth_cert(self.chain.clone(), key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![commy_core::ALPN.to_vec()];
        Ok(Arc::new(config))
    }
}

/// Verifies a client certificate as the CA's verifier does, then requires a
/// SPIFFE ID in the trust domain `mesh`.
#[derive(Debug)]
struct InTrustDomain {
    inner: Arc<dyn ClientCertVerifier>,
    mesh: String,
}

/// Why `cert` (already verified against the roots) is refused in the trust
/// domain `mesh`, if it is.
fn outside_trust_domain(cert: &CertificateDer<'_>, mesh: &str) -> Option<String> {
    match Identity::of_certificate(cert) {
        None => Some(format!(
            "the client certificate carries no SPIFFE ID (spiffe://{mesh}/<service>)"
        )),
        Some(id) if id.mesh() != mesh => Some(format!(
            "the client certificate's SPIFFE ID {id} is not in trust domain {mesh}"
        )),
        Some(_) => None,
    }
}

impl ClientCertVerifier for InTrustDomain {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match outside_trust_domain(end_entity, &self.mesh) {
            None => Ok(verified),
            Some(why) => {
                tracing::debug!("{why}");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with the SPIFFE ID `uri`, if any.
    fn cert(uri: Option<&str>) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        if let Some(uri) = uri {
            let uri = rcgen::string::Ia5String::try_from(uri.to_owned()).unwrap();
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_trust_domain_takes_only_its_own_spiffe_ids() {
        assert_eq!(
            outside_trust_domain(&cert(Some("spiffe://shop/cart")), "shop"),
            None
        );
        let other = outside_trust_domain(&cert(Some("spiffe://bank/vault")), "shop").unwrap();
        assert!(
            other.contains("spiffe://bank/vault") && other.contains("shop"),
            "{other}"
        );
        let none = outside_trust_domain(&cert(None), "shop").unwrap();
        assert!(none.contains("no SPIFFE ID"), "{none}");
        let not_spiffe = outside_trust_domain(&cert(Some("https://shop/cart")), "shop").unwrap();
        assert!(not_spiffe.contains("no SPIFFE ID"), "{not_spiffe}");
    }
}
