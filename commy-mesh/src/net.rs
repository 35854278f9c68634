//! The mesh over TLS: the lifecycle of this process's listener (serving
//! its services to other hosts, [`serve::tls`](crate::serve::tls)) and its
//! peers (processes whose instances it may call,
//! [`call::tls`](crate::call::tls)).
//!
//! One listener per process serves every service of the handle; a request
//! names its service in the reserved metadata header `commy-service`. Each
//! peer is one commy-net [`Client`](commy_net::Client), so one connection
//! per remote process, multiplexed. Peers are long-polled through the
//! reserved control service `commy.instances` for the instances they serve
//! (docs/PROTOCOL.md, "TLS transport"); the last listing survives a peer
//! outage, so calls to a dead peer fail with `UNAVAILABLE`, not `NOT_FOUND`.
//! The listing also names the process's subscriptions, so publishes reach
//! them through the reserved service `commy.publish`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use commy_config::{NetConfig, TransportPreference};
use commy_core::{HostId, InstanceId, Limits, MeshName, ServiceName, TlsAddr};
use commy_discovery::RoundRobin;
use commy_net::{Credentials, DevCa, Identity, Inbound, LeafSpec};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::watch;

use crate::call::tls::Peers;
use crate::pubsub::Queue;
use crate::serve::dispatch::ServeCtx;
use crate::serve::tls::Router;

/// The network side of a mesh handle.
pub(crate) struct NetState {
    server: Mutex<Option<commy_net::Server>>,
    endpoint: Option<TlsAddr>,
    router: Arc<Router>,
    /// The processes whose instances this handle may call.
    pub(crate) peers: Arc<Peers>,
    pub(crate) preference: TransportPreference,
    closed: Arc<AtomicBool>,
}

/// Errors starting the network side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The certificates cannot be used.
    #[error(transparent)]
    Tls(#[from] commy_net::TlsError),
    /// The listen address cannot be used.
    #[error(transparent)]
    Listen(#[from] commy_net::BindError),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
}

fn program_name() -> String {
    let name = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "commy".into());
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "commy".into()
    } else {
        clean
    }
}

impl NetState {
    pub(crate) async fn start(
        config: &NetConfig,
        mesh: &MeshName,
        host: HostId,
        limits: Limits,
    ) -> Result<Arc<NetState>, NetError> {
        let listen_addr = match &config.listen {
            Some(a) => {
                let text = a.to_string();
                let resolved = tokio::net::lookup_host(text.as_str())
                    .await
                    .ok()
                    .and_then(|mut it| it.next())
                    .ok_or_else(|| {
                        NetError::Config(format!("cannot resolve the listen address {text}"))
                    })?;
                Some(resolved)
            }
            None => None,
        };
        let creds = match &config.tls_ca {
            Some(ca) => {
                let pair = config.tls_cert.as_deref().zip(config.tls_key.as_deref());
                Credentials::from_pem_files(ca, pair)?
            }
            None => {
                let dir = commy_net::tls::default_dev_ca_dir()?;
                let ca = tokio::task::spawn_blocking(move || DevCa::load_or_create(&dir))
                    .await
                    .map_err(|e| NetError::Config(format!("dev CA task failed: {e}")))??;
                let identity = Identity::new(mesh.as_str(), &program_name())?;
                let extra: Vec<_> = listen_addr.iter().map(|a| a.ip()).collect();
                ca.credentials(&LeafSpec::for_this_host(identity, &extra))?
            }
        };
        let mut link = commy_net::Settings::default();
        link.limits = limits;
        let router = Arc::new(Router {
            services: Mutex::new(FxHashMap::default()),
            // A random start, so a restarted process's listing never has
            // the version a watcher knew from its previous life.
            version: watch::channel(
                u64::from_le_bytes(
                    InstanceId::random().to_bytes()[..8]
                        .try_into()
                        .unwrap_or([1; 8]),
                ) >> 1,
            )
            .0,
            host,
            limits,
            rr: RoundRobin::new(),
            plain: Mutex::new(FxHashMap::default()),
            topics: Mutex::new(FxHashMap::default()),
            closing: watch::channel(false).0,
            subscriber: std::sync::OnceLock::new(),
        });
        let (server, endpoint) = match listen_addr {
            Some(addr) => {
                if !creds.has_certificate() {
                    return Err(NetError::Config(
                        "listening over TLS needs a certificate: set tls_cert and tls_key (or no tls_ca, for the dev CA)".into(),
                    ));
                }
                // With mTLS, a client's certificate must also name a
                // service of this mesh (its SPIFFE trust domain).
                let tls = if config.require_client_cert.unwrap_or(false) {
                    creds.mtls_server_config(mesh.as_str())?
                } else {
                    creds.server_config(false)?
                };
                let r = router.clone();
                let handler: commy_net::Handler = Arc::new(move |inbound: Inbound| {
                    let r = r.clone();
                    Box::pin(async move { r.handle(inbound).await })
                });
                let server = commy_net::Server::bind(addr, tls, link.clone(), handler).await?;
                let local = server.local_addr();
                // With port 0 the listener's port is announced, under the
                // host as configured.
                let host = match &config.listen {
                    Some(a) if a.port() != 0 => a.clone(),
                    listen => TlsAddr::new(
                        listen.as_ref().map_or_else(
                            || commy_core::Host::from(local.ip()),
                            |a| a.host().clone(),
                        ),
                        local.port(),
                    )
                    .map_err(|e| NetError::Config(e.to_string()))?,
                };
                tracing::info!("serving over TLS on {local}");
                (Some(server), Some(host))
            }
            None => (None, None),
        };
        let closed = Arc::new(AtomicBool::new(false));
        let client_tls = creds.client_config()?;
        let mut clients = Vec::new();
        for addr in &config.peers {
            let host = addr.host().to_string();
            let client =
                commy_net::Client::new(&host, addr.port(), client_tls.clone(), link.clone())
                    .map_err(|e| NetError::Config(e.to_string()))?;
            clients.push((addr.clone(), client));
        }
        let peers = Arc::new(Peers::start(clients, limits, closed.clone()));
        Ok(Arc::new(NetState {
            server: Mutex::new(server),
            endpoint,
            router,
            peers,
            preference: config.transport.unwrap_or_default(),
            closed,
        }))
    }

    /// Lets clients subscribe over TLS: `hook` makes their subscriptions
    /// in this process (set once, when the mesh handle exists).
    pub(crate) fn take_subscriptions(&self, hook: crate::serve::tls::SubscribeHook) {
        let _ = self.router.subscriber.set(hook);
    }

    /// The TLS endpoint this process serves on.
    pub(crate) fn endpoint(&self) -> Option<&TlsAddr> {
        self.endpoint.as_ref()
    }

    pub(crate) fn add(&self, service: &ServiceName, id: InstanceId, ctx: Arc<ServeCtx>) {
        if self.endpoint.is_none() {
            return;
        }
        self.router
            .services
            .lock()
            .entry(service.clone())
            .or_default()
            .push((id, ctx));
        self.router.version.send_modify(|v| *v += 1);
    }

    /// Tells the peers watching this process's listing that it changed
    /// (an instance began to drain: it is listed no more).
    pub(crate) fn relist(&self) {
        self.router.version.send_modify(|v| *v += 1);
    }

    pub(crate) fn remove(&self, service: &ServiceName, id: InstanceId) {
        let mut services = self.router.services.lock();
        if let Some(v) = services.get_mut(service) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                services.remove(service);
            }
            drop(services);
            self.router.version.send_modify(|v| *v += 1);
        }
    }

    /// Announces a subscription to peers.
    pub(crate) fn add_subscription(&self, key: &ServiceName, id: InstanceId, queue: Arc<Queue>) {
        self.router
            .topics
            .lock()
            .entry(key.clone())
            .or_default()
            .push((id, queue));
        self.router.version.send_modify(|v| *v += 1);
    }

    /// Withdraws a subscription.
    pub(crate) fn remove_subscription(&self, key: &ServiceName, id: InstanceId) {
        let mut topics = self.router.topics.lock();
        if let Some(v) = topics.get_mut(key) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                topics.remove(key);
            }
            drop(topics);
            self.router.version.send_modify(|v| *v += 1);
        }
    }

    /// Stops serving (GOAWAY drain) and the peer watchers.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Peers' listing requests answer at once from now on instead of
        // holding the drain for their long-poll time.
        self.router.closing.send_replace(true);
        let server = self.server.lock().take();
        if let Some(s) = server {
            s.shutdown().await;
        }
        self.peers.disconnect();
    }
}
