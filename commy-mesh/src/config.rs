//! The settings of a mesh handle: [`Config`] (`Config::default()` is the
//! embedded default: mesh `default`, local discovery, nothing to write
//! first) and the [`MeshBuilder`] that sets them one by one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use commy_config::{NetConfig, TransportPreference};
use commy_core::{Limits, MeshName, ServiceName};
use commy_shm::LinkConfig;

use crate::policy::{CallPolicies, CallPolicy, ServePolicies, ServePolicy};

/// Settings of a mesh handle. `Config::default()` is the embedded default:
/// mesh `default`, local discovery in the runtime dir, nothing to write first.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The mesh's name: processes only see services of the same mesh.
    pub mesh: MeshName,
    /// Where sockets live; `None` = `$COMMY_RUNTIME_DIR`, else
    /// `$XDG_RUNTIME_DIR/commy`, else `/tmp/commy-<uid>`.
    pub runtime_dir: Option<PathBuf>,
    /// Shared-memory link settings.
    pub link: LinkConfig,
    /// Frame limits enforced on everything received.
    pub limits: Limits,
    /// Handlers of one service instance that may be waiting at once, over
    /// both transports together. The rule is the same on shared memory and
    /// TLS: a handler is first polled holding no slot, so one that answers
    /// without waiting takes none (on shared memory it runs on its link's
    /// thread); one that has to wait continues once it holds a slot, and
    /// requests past the bound wait in line for one. A deferred handler
    /// holds its slot until it answers.
    pub max_concurrency: usize,
    /// Timeout of calls that set none.
    pub default_timeout: Option<Duration>,
    /// How long a caller polls the link for its response before it yields
    /// its thread and waits to be woken (zero: never poll). Polling saves
    /// the thread hand-off, which costs more than a whole quick call.
    pub call_spin: Duration,
    /// Network settings: TLS listener, peers, certificates, transport
    /// preference (unset ones come from the environment and config file).
    pub net: NetConfig,
    /// Runs each service link thread's work (see [`ThreadHook`]).
    pub link_thread_hook: Option<ThreadHook>,
    /// The call policy of each called service (see [`crate::policy`]).
    pub call_policy: Option<CallPolicies>,
    /// The serve policy of each served service (see [`crate::policy`]).
    pub serve_policy: Option<ServePolicies>,
}

/// Wraps the work of every thread that serves a link of this mesh's
/// services: the hook is called on that thread with the thread's whole
/// work, which it must run exactly once. A binding uses it to set the
/// thread up once instead of per request (Python: attach the thread to the
/// interpreter once, so each handler call only takes the GIL).
#[derive(Clone)]
pub struct ThreadHook(Arc<HookFn>);

/// A link thread's whole work, as a [`ThreadHook`] receives it.
pub type ThreadWork<'a> = &'a mut (dyn FnMut() + Send);

type HookFn = dyn Fn(ThreadWork<'_>) + Send + Sync;

impl ThreadHook {
    /// A hook that runs `f` around each link thread's work.
    pub fn new(f: impl Fn(ThreadWork<'_>) + Send + Sync + 'static) -> ThreadHook {
        ThreadHook(Arc::new(f))
    }

    pub(crate) fn run(&self, work: ThreadWork<'_>) {
        (self.0)(work)
    }
}

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadHook")
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mesh: MeshName::default(),
            runtime_dir: None,
            link: LinkConfig::default(),
            limits: Limits::DEFAULT,
            max_concurrency: 1024,
            default_timeout: Some(Duration::from_secs(30)),
            call_spin: Duration::from_micros(50),
            net: NetConfig::default(),
            link_thread_hook: None,
            call_policy: None,
            serve_policy: None,
        }
    }
}

/// Builds a [`Mesh`](crate::Mesh) with options.
#[derive(Debug, Clone, Default)]
pub struct MeshBuilder {
    pub(crate) config: Config,
    pub(crate) error: Option<String>,
}

impl MeshBuilder {
    /// Joins the mesh named `name` instead of `default`.
    pub fn mesh(mut self, name: &str) -> MeshBuilder {
        match MeshName::new(name) {
            Ok(n) => self.config.mesh = n,
            Err(e) => self.error = Some(format!("invalid mesh name {name:?}: {e}")),
        }
        self
    }

    /// Uses `dir` as the runtime dir (must be private: mode 0700, ours).
    pub fn runtime_dir(mut self, dir: impl AsRef<Path>) -> MeshBuilder {
        self.config.runtime_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Sets the shared-memory link settings.
    pub fn link(mut self, link: LinkConfig) -> MeshBuilder {
        self.config.link = link;
        self
    }

    /// Sets how many requests one instance handles at once.
    pub fn max_concurrency(mut self, n: usize) -> MeshBuilder {
        self.config.max_concurrency = n.max(1);
        self
    }

    /// Sets the timeout of calls that set none (`None`: wait forever).
    pub fn default_timeout(mut self, t: Option<Duration>) -> MeshBuilder {
        self.config.default_timeout = t;
        self
    }

    /// Sets how long a caller polls for its response before sleeping
    /// (see [`Config::call_spin`]).
    pub fn call_spin(mut self, spin: Duration) -> MeshBuilder {
        self.config.call_spin = spin;
        self
    }

    /// Serves this handle's services over TLS at `endpoint`
    /// (`tls://ADDR:PORT`; port 0 picks a free one, which
    /// [`Mesh::tls_endpoint`](crate::Mesh::tls_endpoint) then names).
    pub fn listen(mut self, endpoint: &str) -> MeshBuilder {
        match commy_config::parse_listen(endpoint) {
            Ok(a) => self.config.net.listen = Some(a),
            Err(e) => self.error = Some(format!("invalid listen endpoint: {e}")),
        }
        self
    }

    /// Adds a static peer (`tls://HOST:PORT`) whose instances may be called.
    pub fn peer(mut self, endpoint: &str) -> MeshBuilder {
        match commy_config::parse_tls(endpoint) {
            Ok(a) => self.config.net.peers.push(a),
            Err(e) => self.error = Some(format!("invalid peer endpoint: {e}")),
        }
        self
    }

    /// Sets which transport calls use (see [`TransportPreference`]).
    pub fn transport(mut self, t: TransportPreference) -> MeshBuilder {
        self.config.net.transport = Some(t);
        self
    }

    /// Sets all network settings at once.
    pub fn net(mut self, net: NetConfig) -> MeshBuilder {
        self.config.net = net;
        self
    }

    /// Wraps the work of every service link thread (see [`ThreadHook`]).
    pub fn link_thread_hook(mut self, hook: ThreadHook) -> MeshBuilder {
        self.config.link_thread_hook = Some(hook);
        self
    }

    /// Gives each called service its call policy (`None`: none), asked
    /// when the handle first calls the service (see [`crate::policy`]).
    pub fn call_policy(
        mut self,
        f: impl Fn(&ServiceName) -> Option<Arc<dyn CallPolicy>> + Send + Sync + 'static,
    ) -> MeshBuilder {
        self.config.call_policy = Some(CallPolicies::new(f));
        self
    }

    /// Gives each served service its serve policy (`None`: none), asked
    /// when the service starts (see [`crate::policy`]).
    pub fn serve_policy(
        mut self,
        f: impl Fn(&ServiceName) -> Option<Arc<dyn ServePolicy>> + Send + Sync + 'static,
    ) -> MeshBuilder {
        self.config.serve_policy = Some(ServePolicies::new(f));
        self
    }
}
