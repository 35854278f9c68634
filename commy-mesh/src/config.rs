//! The settings of a mesh handle: [`Config`] (`Config::default()` is the
//! embedded default: mesh `default`, local discovery, nothing to write
//! first) and the [`MeshBuilder`] that sets them one by one.
//!
//! The settings that have a key (mesh, runtime dir, timeouts, concurrency,
//! network) are one serde type, [`Settings`](commy_config::Settings),
//! layered at open from the defaults, the config file, the environment and
//! what the code set ([`Config::settings`]); each value knows where it came
//! from ([`Mesh::settings`](crate::Mesh::settings)). The rest (link
//! tuning, hooks, policies) are Rust values set here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use commy_config::{Layer, NetConfig, SettingValue, TransportPreference, format_duration};
use commy_core::{Limits, MeshName, ServiceName};
use commy_discovery::Register;
use commy_shm::LinkConfig;

use crate::policy::{CallPolicies, CallPolicy, ServePolicies, ServePolicy};

/// The name of the layer of settings a [`MeshBuilder`] sets, as
/// explanations name it.
const BUILDER: &str = "builder";

/// Settings of a mesh handle. `Config::default()` is the embedded default:
/// mesh `default`, local discovery in the runtime dir, nothing to write first.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The settings set in code, by key (see [`commy_config::Settings`]
    /// for the keys): the last layer over the defaults, the config file and
    /// the environment, resolved when the mesh opens.
    pub settings: Layer,
    /// Shared-memory link settings.
    pub link: LinkConfig,
    /// Frame limits enforced on everything received.
    pub limits: Limits,
    /// Do not listen over TLS unless the code itself said where (ignore
    /// `listen` from the environment and the config file): for one-shot
    /// tools that must not take the port of the real server.
    pub no_listen: bool,
    /// Runs each service link thread's work (see [`ThreadHook`]).
    pub link_thread_hook: Option<ThreadHook>,
    /// The call policy of each called service (see [`crate::policy`]).
    pub call_policy: Option<CallPolicies>,
    /// The serve policy of each served service (see [`crate::policy`]).
    pub serve_policy: Option<ServePolicies>,
    /// Where the instances this handle serves over TLS are announced to
    /// other hosts (see [`Register`]); this host's runtime dir announces
    /// them all by itself.
    pub registrars: Vec<Arc<dyn Register>>,
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
            settings: Layer::new(BUILDER),
            link: LinkConfig::default(),
            limits: Limits::DEFAULT,
            no_listen: false,
            link_thread_hook: None,
            call_policy: None,
            serve_policy: None,
            registrars: Vec::new(),
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
    /// Sets the setting `key` (any key of [`commy_config::Settings`]; an
    /// unknown key or a bad value fails the open, naming it). The typed
    /// methods below set the common ones.
    pub fn setting(mut self, key: &str, value: impl Into<SettingValue>) -> MeshBuilder {
        self.config.settings.set(key, value);
        self
    }

    /// Sets every key `layer` sets, and names their source after it.
    pub fn settings(mut self, layer: &Layer) -> MeshBuilder {
        for (key, value) in layer.iter() {
            self.config.settings.set(key, value.clone());
        }
        self.config.settings.set_name(layer.name());
        self
    }

    /// Names the source of the settings this builder sets, as
    /// [`Mesh::settings`](crate::Mesh::settings) explains them (`builder`
    /// unless set; a binding says `Python options`).
    pub fn settings_source(mut self, name: &str) -> MeshBuilder {
        self.config.settings.set_name(name);
        self
    }

    /// Joins the mesh named `name` instead of `default`.
    pub fn mesh(mut self, name: &str) -> MeshBuilder {
        match MeshName::new(name) {
            Ok(_) => self.config.settings.set("mesh", name),
            Err(e) => self.error = Some(format!("invalid mesh name {name:?}: {e}")),
        }
        self
    }

    /// Uses `dir` as the runtime dir (must be private: mode 0700, ours).
    pub fn runtime_dir(mut self, dir: impl AsRef<Path>) -> MeshBuilder {
        match dir.as_ref().to_str() {
            Some(d) => self.config.settings.set("runtime_dir", d),
            None => {
                self.error = Some(format!(
                    "the runtime dir {} is not valid UTF-8",
                    dir.as_ref().display()
                ));
            }
        }
        self
    }

    /// Sets the shared-memory link settings.
    pub fn link(mut self, link: LinkConfig) -> MeshBuilder {
        self.config.link = link;
        self
    }

    /// Sets how many requests one instance handles at once (at least 1).
    pub fn max_concurrency(self, n: usize) -> MeshBuilder {
        let n = i64::try_from(n.max(1)).unwrap_or(i64::MAX);
        self.setting("max_concurrency", n)
    }

    /// Sets the timeout of calls that set none (`None`: wait forever).
    pub fn default_timeout(self, t: Option<Duration>) -> MeshBuilder {
        match t {
            Some(t) if !t.is_zero() => self.setting("default_timeout", format_duration(t)),
            // The shortest timeout there is: zero would mean none.
            Some(_) => self.setting("default_timeout", "1ns"),
            None => self.setting("default_timeout", "none"),
        }
    }

    /// Sets how long a caller polls for its response before sleeping
    /// (zero: it sleeps at once).
    pub fn call_spin(self, spin: Duration) -> MeshBuilder {
        self.setting("call_spin", format_duration(spin))
    }

    /// Serves this handle's services over TLS at `endpoint`
    /// (`tls://ADDR:PORT`; port 0 picks a free one, which
    /// [`Mesh::tls_endpoint`](crate::Mesh::tls_endpoint) then names).
    pub fn listen(mut self, endpoint: &str) -> MeshBuilder {
        match commy_config::parse_listen(endpoint) {
            Ok(_) => self.config.settings.set("listen", endpoint.trim()),
            Err(e) => self.error = Some(format!("invalid listen endpoint: {e}")),
        }
        self
    }

    /// Adds a static peer (`tls://HOST:PORT`) whose instances may be called.
    pub fn peer(mut self, endpoint: &str) -> MeshBuilder {
        match commy_config::parse_tls(endpoint) {
            Ok(_) => {
                let mut peers = match self.config.settings.get("peers") {
                    Some(SettingValue::List(p)) => p.clone(),
                    _ => Vec::new(),
                };
                peers.push(endpoint.trim().to_owned());
                self.config.settings.set("peers", peers);
            }
            Err(e) => self.error = Some(format!("invalid peer endpoint: {e}")),
        }
        self
    }

    /// Sets which transport calls use (see [`TransportPreference`]).
    pub fn transport(self, t: TransportPreference) -> MeshBuilder {
        self.setting("transport", t.as_str())
    }

    /// Sets the network settings that `net` holds (its unset ones keep
    /// coming from the environment and the config file).
    pub fn net(mut self, net: NetConfig) -> MeshBuilder {
        let layer = &mut self.config.settings;
        if let Some(a) = &net.listen {
            layer.set("listen", format!("tls://{a}"));
        }
        if !net.peers.is_empty() {
            let peers = net.peers.iter().map(|p| format!("tls://{p}")).collect();
            layer.set("peers", SettingValue::List(peers));
        }
        let path = |p: &std::path::PathBuf| p.to_string_lossy().into_owned();
        for (key, value) in [
            ("tls_ca", &net.tls_ca),
            ("tls_cert", &net.tls_cert),
            ("tls_key", &net.tls_key),
        ] {
            if let Some(p) = value {
                layer.set(key, path(p));
            }
        }
        if let Some(r) = net.require_client_cert {
            layer.set("require_client_cert", r);
        }
        self.config.no_listen |= net.no_listen;
        match net.transport {
            Some(t) => self.transport(t),
            None => self,
        }
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

    /// Announces each instance this handle serves over TLS to `registrar`
    /// (with its service, id, `tls://` listen endpoint and host) while it
    /// serves; a registrar that refuses fails the `serve`. Instances are
    /// announced only when the handle listens over TLS.
    pub fn register_with(mut self, registrar: Arc<dyn Register>) -> MeshBuilder {
        self.config.registrars.push(registrar);
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
