//! The settings of a mesh handle as one serde type, [`Settings`], layered
//! from four sources, each value knowing which one it came from:
//!
//! 1. the defaults;
//! 2. the config file (`$COMMY_CONFIG`, else `config.toml` in the user's
//!    config dir if it exists; TOML, relative paths relative to the file);
//! 3. the environment: `COMMY_<KEY>` for each key (`COMMY_LISTEN`,
//!    `COMMY_MAX_CONCURRENCY`, ...);
//! 4. the values set in code: a Rust builder, or the options a Python or
//!    Node program passes, as a [`Layer`] of keys and values.
//!
//! A later source wins. Adding a setting means adding a field here (and
//! using it where the mesh opens): every source, the bindings' options
//! included, takes it by its key. An unknown key, from any source, is an
//! error naming the key and the source.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `mesh` | `"default"` | the mesh to join |
//! | `runtime_dir` | (see below) | where sockets live; unset: `$COMMY_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/commy`, else `/tmp/commy-<uid>` |
//! | `default_timeout` | `"30s"` | timeout of calls that set none; `"none"` or `0`: wait forever |
//! | `call_spin` | `"50us"` | how long a caller polls for its answer before it sleeps |
//! | `max_concurrency` | `1024` | handlers of one service instance waiting at once |
//! | `subscriber_stall` | `"1s"` | a subscriber whose queue takes nothing for this long is disconnected (publishers wait no longer) |
//! | `listen` | none | `tls://ADDR:PORT`: serve over TLS there (port 0: any) |
//! | `peers` | `[]` | `tls://HOST:PORT` processes whose instances may be called (a list, or one comma-separated string) |
//! | `tls_ca` | none | the CA (PEM) certificates must chain to; none: the per-user dev CA |
//! | `tls_cert`, `tls_key` | none | this process's certificate chain and key (PEM) |
//! | `require_client_cert` | `false` | mTLS: refuse clients without a certificate from the CA |
//! | `transport` | `"auto"` | `auto`, `shm` or `tls` |
//! | `balance` | `[]` | how pools pick an instance: `STRATEGY` for all, `SERVICE=STRATEGY` for one; `p2c` (the default: the less loaded of two), `round_robin`, `maglev` (consistent hashing on the call's hash key) |
//! | `eject_after` | `5` | failures in a row that eject an instance from its pool for a while (`0`: no run ejects; with `eject_success_percent` at `0` too, nothing does) |
//! | `ejection_time` | `"30s"` | how long a first ejection lasts; the n-th lasts n times as long, at most 10 times |
//! | `eject_success_percent` | `50` | an instance of which fewer than this share of calls (in percent) succeeded over 10 s from a failure is ejected (`0`: never) |
//! | `eject_min_calls` | `20` | calls those 10 s must have seen before their success rate ejects |
//! | `max_ejected_percent` | `10` | the most of a pool ejected at once, in percent (one instance always may be) |
//! | `max_pending` | `0` | calls to one service this handle may have waiting at once; one more fails at once with RESOURCE_EXHAUSTED (`0`: no limit) |
//! | `retry_attempts` | `3` | attempts in all of a call that may be retried (`1`: never retry) |
//! | `retry_budget_percent` | `20` | retries may add this share of the requests of the last 10 s, plus 10 a second |
//! | `idempotent` | `[]` | services whose calls may be retried after any failure of the instance, not only one that never reached it |
//! | `hedge` | `[]` | hedged calls: `DELAY` for every service, `SERVICE=DELAY` for one (`0`: not hedged); an idempotent call still unanswered after `DELAY` is sent to a second instance too, and the first answer wins |
//!
//! Durations are strings with a unit (`"250ms"`, `"1.5s"`, `"50us"`,
//! `"2m"`) or numbers of seconds. Environment values are strings of the
//! same forms; an empty variable counts as unset.
//!
//! ```
//! use commy_config::{Layer, Settings, Source};
//!
//! let dir = std::env::temp_dir().join(format!("commy-settings-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let file = dir.join("config.toml");
//! std::fs::write(&file, "mesh = \"shop\"\nmax_concurrency = 64\n").unwrap();
//!
//! let mut code = Layer::new("builder");
//! code.set("max_concurrency", 8);
//! let loaded = Settings::load_from(Some(&file), Some(&[]), &code).unwrap();
//! assert_eq!(loaded.settings().mesh, "shop");
//! assert_eq!(loaded.settings().max_concurrency, 8);
//!
//! let mesh = loaded.explain("mesh").unwrap();
//! assert_eq!(mesh.source, Source::File { path: file.clone(), line: 1 });
//! assert_eq!(loaded.explain("max_concurrency").unwrap().source, Source::Layer("builder".into()));
//! assert_eq!(loaded.explain("call_spin").unwrap().source, Source::Default);
//! assert_eq!(loaded.explain("call_spin").unwrap().value, "\"50us\"");
//!
//! std::fs::write(&file, "lisen = \"tls://127.0.0.1:7443\"\n").unwrap();
//! let err = Settings::load_from(Some(&file), Some(&[]), &Layer::new("builder")).unwrap_err();
//! assert!(err.contains("config.toml") && err.contains("lisen"), "{err}");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::net::{TransportPreference, user_config_dir};

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "COMMY_CONFIG";

/// The settings of a mesh handle (see the [module docs](self) for the keys,
/// their defaults and their sources).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// The mesh to join.
    pub mesh: String,
    /// Where sockets live (`None`: the usual place, see the module docs).
    pub runtime_dir: Option<PathBuf>,
    /// Timeout of calls that set none (`None`: wait forever).
    #[serde(with = "timeout")]
    pub default_timeout: Option<Duration>,
    /// How long a caller polls for its answer before it sleeps.
    #[serde(with = "duration")]
    pub call_spin: Duration,
    /// Handlers of one service instance that may be waiting at once.
    #[serde(deserialize_with = "count")]
    pub max_concurrency: usize,
    /// How long a publisher waits for a subscriber that takes nothing
    /// before it disconnects it as too slow.
    #[serde(with = "duration")]
    pub subscriber_stall: Duration,
    /// Serve over TLS at this `tls://ADDR:PORT`.
    pub listen: Option<String>,
    /// Static peers, `tls://HOST:PORT` each.
    #[serde(deserialize_with = "list")]
    pub peers: Vec<String>,
    /// The CA file (`None`: the per-user dev CA).
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Require client certificates (mTLS).
    #[serde(deserialize_with = "flag")]
    pub require_client_cert: bool,
    /// Which transport calls use.
    #[serde(with = "transport")]
    pub transport: TransportPreference,
    /// How pools pick an instance: `STRATEGY` entries for all services,
    /// `SERVICE=STRATEGY` for one.
    #[serde(deserialize_with = "list")]
    pub balance: Vec<String>,
    /// Failures in a row that eject an instance from its pool (0: no run
    /// ejects).
    #[serde(deserialize_with = "count")]
    pub eject_after: usize,
    /// How long a first ejection lasts.
    #[serde(with = "duration")]
    pub ejection_time: Duration,
    /// The share of calls, in percent, that must succeed over a window of
    /// 10 s opened by a failure, lest the instance be ejected (0: never).
    #[serde(deserialize_with = "count")]
    pub eject_success_percent: usize,
    /// Calls a window must have seen before its success rate ejects.
    #[serde(deserialize_with = "count")]
    pub eject_min_calls: usize,
    /// The most of a pool that may be ejected at once, in percent.
    #[serde(deserialize_with = "count")]
    pub max_ejected_percent: usize,
    /// Calls to one service that may wait for their answers at once (0:
    /// no limit).
    #[serde(deserialize_with = "count")]
    pub max_pending: usize,
    /// Attempts in all of a call that may be retried (1: never retry).
    #[serde(deserialize_with = "count")]
    pub retry_attempts: usize,
    /// Retries may add this share of the recent requests, in percent.
    #[serde(deserialize_with = "count")]
    pub retry_budget_percent: usize,
    /// Services whose calls may be retried after any failure of the
    /// instance.
    #[serde(deserialize_with = "list")]
    pub idempotent: Vec<String>,
    /// Hedged calls: `DELAY` for every service, `SERVICE=DELAY` for one.
    #[serde(deserialize_with = "list")]
    pub hedge: Vec<String>,
}

/// Every key of [`Settings`], in the order of its fields.
pub const KEYS: [&str; 24] = [
    "mesh",
    "runtime_dir",
    "default_timeout",
    "call_spin",
    "max_concurrency",
    "subscriber_stall",
    "listen",
    "peers",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "require_client_cert",
    "transport",
    "balance",
    "eject_after",
    "ejection_time",
    "eject_success_percent",
    "eject_min_calls",
    "max_ejected_percent",
    "max_pending",
    "retry_attempts",
    "retry_budget_percent",
    "idempotent",
    "hedge",
];

/// What kind of value a key takes: bindings use it to map their own
/// conventions (a Node option `defaultTimeoutMs` in milliseconds) onto the
/// keys without knowing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyKind {
    /// Text: a name, an endpoint, a transport.
    Text,
    /// A file or directory path.
    Path,
    /// A duration.
    Duration,
    /// A whole number.
    Count,
    /// A flag.
    Flag,
    /// A list of texts.
    List,
}

/// The kind of value `key` takes; `None` for an unknown key.
pub fn key_kind(key: &str) -> Option<KeyKind> {
    Some(match key {
        "mesh" | "listen" | "transport" => KeyKind::Text,
        "runtime_dir" | "tls_ca" | "tls_cert" | "tls_key" => KeyKind::Path,
        "default_timeout" | "call_spin" | "subscriber_stall" | "ejection_time" => KeyKind::Duration,
        "max_concurrency"
        | "eject_after"
        | "eject_success_percent"
        | "eject_min_calls"
        | "max_ejected_percent"
        | "max_pending"
        | "retry_attempts"
        | "retry_budget_percent" => KeyKind::Count,
        "require_client_cert" => KeyKind::Flag,
        "peers" | "idempotent" | "balance" | "hedge" => KeyKind::List,
        _ => return None,
    })
}

/// The strategies the `balance` setting names.
pub(crate) const BALANCE_STRATEGIES: [&str; 3] = ["p2c", "round_robin", "maglev"];

/// Keys that hold paths: relative ones in a config file are relative to
/// the file's directory.
const PATH_KEYS: [&str; 4] = ["runtime_dir", "tls_ca", "tls_cert", "tls_key"];

/// Keys the environment does not set through `COMMY_<KEY>` here:
/// `$COMMY_RUNTIME_DIR` is read where the runtime dir is resolved.
const NOT_FROM_ENV: [&str; 1] = ["runtime_dir"];

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mesh: commy_core::DEFAULT_MESH.to_owned(),
            runtime_dir: None,
            default_timeout: Some(Duration::from_secs(30)),
            call_spin: Duration::from_micros(50),
            max_concurrency: 1024,
            subscriber_stall: Duration::from_secs(1),
            listen: None,
            peers: Vec::new(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            require_client_cert: false,
            transport: TransportPreference::Auto,
            balance: Vec::new(),
            eject_after: 5,
            ejection_time: Duration::from_secs(30),
            eject_success_percent: 50,
            eject_min_calls: 20,
            max_ejected_percent: 10,
            max_pending: 0,
            retry_attempts: 3,
            retry_budget_percent: 20,
            idempotent: Vec::new(),
            hedge: Vec::new(),
        }
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The default.
    Default,
    /// The config file, at this line.
    File {
        /// The file.
        path: PathBuf,
        /// The line of the key (1 for the first).
        line: usize,
    },
    /// An environment variable.
    Env(String),
    /// A [`Layer`] set in code, by its name (`builder`, `Python options`).
    Layer(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Env(var) => write!(f, "${var}"),
            Source::Layer(name) => f.write_str(name),
        }
    }
}

/// One setting's value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    /// The key.
    pub key: &'static str,
    /// The value, as JSON-like text (`"30s"`, `64`, `["tls://a:1"]`).
    pub value: String,
    /// Where it came from.
    pub source: Source,
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {} ({})", self.key, self.value, self.source)
    }
}

/// Values set in code for some keys: the last source of the settings. A
/// Rust builder fills one; a binding fills one from the options its
/// program passes (a Python dict, a Node object), key by key, without
/// knowing the keys: a new setting needs no change there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layer {
    name: String,
    values: BTreeMap<String, SettingValue>,
}

/// A value of a [`Layer`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum SettingValue {
    /// Text: names, paths, endpoints, durations with a unit.
    Text(String),
    /// A whole number (a count, a duration in seconds).
    Int(i64),
    /// A number (a duration in seconds).
    Float(f64),
    /// A flag.
    Bool(bool),
    /// A list of texts (peers).
    List(Vec<String>),
}

macro_rules! setting_value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for SettingValue {
            fn from(x: $t) -> SettingValue {
                SettingValue::$v(x.into())
            }
        }
    )*};
}

setting_value_from!(String => Text, &str => Text, i64 => Int, i32 => Int, u32 => Int, f64 => Float, bool => Bool, Vec<String> => List);

impl Layer {
    /// An empty layer; `name` is the source its values are said to come
    /// from.
    pub fn new(name: impl Into<String>) -> Layer {
        Layer {
            name: name.into(),
            values: BTreeMap::new(),
        }
    }

    /// Sets `key` (checked when the settings are loaded).
    pub fn set(&mut self, key: &str, value: impl Into<SettingValue>) {
        self.values.insert(key.to_owned(), value.into());
    }

    /// Removes `key`.
    pub fn unset(&mut self, key: &str) {
        self.values.remove(key);
    }

    /// The value set for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&SettingValue> {
        self.values.get(key)
    }

    /// The keys set and their values, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SettingValue)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the source.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }
}

/// Settings as loaded, with where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    settings: Settings,
    /// The settings as values, to show them.
    values: Value,
    figment: Figment,
    /// The config file's text, to find the line of a key.
    file: Option<(PathBuf, String)>,
}

impl Loaded {
    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// `key`'s value (as the settings hold it, whatever form its source
    /// gave) and where it came from; `None` for an unknown key.
    pub fn explain(&self, key: &str) -> Option<Explained> {
        let key = *KEYS.iter().find(|k| **k == key)?;
        let value = self
            .values
            .find_ref(key)
            .map_or_else(|| "none".to_owned(), show);
        let source = match self.figment.find_metadata(key) {
            None => Source::Default,
            Some(md) => self.source_of(key, md),
        };
        Some(Explained { key, value, source })
    }

    /// Every setting, explained, in the order of [`KEYS`].
    pub fn explain_all(&self) -> Vec<Explained> {
        KEYS.iter().filter_map(|k| self.explain(k)).collect()
    }

    fn source_of(&self, key: &str, md: &Metadata) -> Source {
        match (&md.source, md.name.as_ref()) {
            (Some(figment::Source::File(path)), _) => Source::File {
                path: path.clone(),
                line: self
                    .file
                    .as_ref()
                    .filter(|(p, _)| p == path)
                    .and_then(|(_, text)| line_of(text, key))
                    .unwrap_or(0),
            },
            (_, DEFAULTS) => Source::Default,
            (_, ENVIRONMENT) => Source::Env(env_var(key)),
            (_, name) => Source::Layer(name.to_owned()),
        }
    }
}

const DEFAULTS: &str = "default";
const ENVIRONMENT: &str = "environment";

/// The environment variable of `key`.
pub fn env_var(key: &str) -> String {
    format!("COMMY_{}", key.to_ascii_uppercase())
}

/// The line (1-based) where a config file's text sets `key` at its top
/// level.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix(key).map(str::trim_start);
            line.is_some_and(|rest| rest.starts_with('='))
        })
        .map(|i| i + 1)
}

/// A figment value as JSON-like text.
fn show(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{:?}", c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match (n.to_u128(), n.to_i128(), n.to_f64()) {
            (Some(u), _, _) => u.to_string(),
            (None, Some(i), _) => i.to_string(),
            (None, None, Some(f)) => f.to_string(),
            (None, None, None) => "?".to_owned(),
        },
        Value::Empty(_, _) => "none".to_owned(),
        Value::Dict(_, d) => {
            let items: Vec<String> = d.iter().map(|(k, v)| format!("{k}: {}", show(v))).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(_, a) => {
            let items: Vec<String> = a.iter().map(show).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// A provider under a name of ours (the defaults, a layer).
struct Named<P> {
    name: String,
    inner: P,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
    }
}

/// The config file's text, parsed as TOML, with the file as its source.
struct ConfigFile<'a> {
    path: &'a Path,
    toml: figment::providers::Data<Toml>,
}

impl Provider for ConfigFile<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named("config file").source(self.path)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.toml.data()
    }
}

/// The `COMMY_<KEY>` variables of the keys, each value as text.
struct Environment(Vec<(&'static str, String)>);

impl Environment {
    /// The variables of `vars`, or of the process if `None`.
    fn read(vars: Option<&[(String, String)]>) -> Environment {
        let lookup = |name: &str| -> Option<String> {
            match vars {
                None => std::env::var(name).ok(),
                Some(vars) => vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
            }
        };
        Environment(
            KEYS.iter()
                .filter(|k| !NOT_FROM_ENV.contains(k))
                .filter_map(|k| Some((*k, lookup(&env_var(k))?)))
                .filter(|(_, v)| !v.trim().is_empty())
                .collect(),
        )
    }
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENVIRONMENT)
            .interpolater(|_: &Profile, keys: &[&str]| env_var(&keys.join("_")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict: Dict = self
            .0
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(v.trim().to_owned())))
            .collect();
        Ok(Profile::Default.collect(dict))
    }
}

impl Settings {
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

    /// Loads the settings: the defaults, the config file, this process's
    /// environment, then `code`.
    pub fn load(code: &Layer) -> Result<Loaded, String> {
        Settings::load_from(Settings::config_file()?.as_deref(), None, code)
    }

    /// [`load`](Settings::load) with the config file `file`, and the
    /// environment variables `env` instead of the process's if given.
    pub fn load_from(
        file: Option<&Path>,
        env: Option<&[(String, String)]>,
        code: &Layer,
    ) -> Result<Loaded, String> {
        let defaults = Named {
            name: DEFAULTS.to_owned(),
            inner: Serialized::defaults(Settings::default()),
        };
        let mut figment = Figment::from(defaults);
        let mut text = None;
        if let Some(path) = file {
            let body = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
            // Read once: the lines that explain a value are those parsed.
            figment = figment.merge(ConfigFile {
                path,
                toml: Toml::string(&body),
            });
            text = Some((path.to_owned(), body));
        }
        figment = figment.merge(Environment::read(env));
        figment = figment.merge(Named {
            name: code.name.clone(),
            inner: Serialized::defaults(&code.values),
        });
        let mut settings: Settings = figment.extract().map_err(|e| describe(&e))?;
        let loaded_file = text;
        // Relative paths in the file are relative to its directory.
        if let Some((path, _)) = &loaded_file {
            let base = path.parent().unwrap_or(Path::new("."));
            for key in PATH_KEYS {
                let from_file = figment
                    .find_metadata(key)
                    .is_some_and(|md| md.source == Some(figment::Source::File(path.clone())));
                let value = match key {
                    "runtime_dir" => &mut settings.runtime_dir,
                    "tls_ca" => &mut settings.tls_ca,
                    "tls_cert" => &mut settings.tls_cert,
                    _ => &mut settings.tls_key,
                };
                if let Some(p) = value.as_mut().filter(|p| from_file && p.is_relative()) {
                    *p = base.join(&*p);
                }
            }
        }
        let values = Value::serialize(&settings).map_err(|e| describe(&e))?;
        let loaded = Loaded {
            settings,
            values,
            figment,
            file: loaded_file,
        };
        loaded.check()?;
        Ok(loaded)
    }
}

impl Loaded {
    /// Checks what the types alone do not; an error names the key and
    /// where its value came from.
    fn check(&self) -> Result<(), String> {
        let s = &self.settings;
        let bad = |key: &str, what: String| {
            let from = self.explain(key).map(|e| e.source.to_string());
            format!("{key} ({}): {what}", from.unwrap_or_default())
        };
        commy_core::MeshName::new(&s.mesh).map_err(|e| bad("mesh", e.to_string()))?;
        if s.max_concurrency == 0 {
            return Err(bad("max_concurrency", "must be at least 1".into()));
        }
        if s.ejection_time.is_zero() {
            return Err(bad("ejection_time", "must be more than zero".into()));
        }
        if s.eject_success_percent > 100 {
            return Err(bad("eject_success_percent", "must be at most 100".into()));
        }
        if s.eject_min_calls == 0 || s.eject_min_calls > usize::from(u16::MAX) {
            return Err(bad(
                "eject_min_calls",
                format!("must be from 1 to {}", u16::MAX),
            ));
        }
        if s.max_ejected_percent > 100 {
            return Err(bad("max_ejected_percent", "must be at most 100".into()));
        }
        if s.retry_attempts == 0 {
            return Err(bad(
                "retry_attempts",
                "must be at least 1 (1: no retries)".into(),
            ));
        }
        if s.retry_attempts > 10 {
            return Err(bad("retry_attempts", "must be at most 10".into()));
        }
        if s.retry_budget_percent > 1000 {
            return Err(bad("retry_budget_percent", "must be at most 1000".into()));
        }
        for entry in &s.balance {
            let strategy = per_service_value(entry).map_err(|e| bad("balance", e))?;
            if !BALANCE_STRATEGIES.contains(&strategy) {
                return Err(bad(
                    "balance",
                    format!(
                        "{entry:?}: unknown strategy {strategy:?} (one of {})",
                        BALANCE_STRATEGIES.join(", ")
                    ),
                ));
            }
        }
        for entry in &s.hedge {
            let delay = per_service_value(entry).map_err(|e| bad("hedge", e))?;
            let delay =
                parse_duration(delay).map_err(|e| bad("hedge", format!("{entry:?}: {e}")))?;
            if delay > Duration::from_secs(3600) {
                return Err(bad(
                    "hedge",
                    format!("{entry:?}: the delay must be at most 1h (0: not hedged)"),
                ));
            }
        }
        for name in &s.idempotent {
            commy_core::ServiceName::new(name).map_err(|e| bad("idempotent", e.to_string()))?;
        }
        if let Some(l) = &s.listen {
            crate::net::parse_listen(l).map_err(|e| bad("listen", e))?;
        }
        for p in &s.peers {
            crate::net::parse_tls(p).map_err(|e| bad("peers", e))?;
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(bad(
                "tls_cert",
                "tls_cert and tls_key must be given together".into(),
            ));
        }
        if s.tls_cert.is_some() && s.tls_ca.is_none() {
            return Err(bad(
                "tls_cert",
                "tls_cert needs tls_ca (the CA that signed it, which peers trust)".into(),
            ));
        }
        Ok(())
    }
}

/// A figment error as one line naming the key and its source.
fn describe(e: &figment::Error) -> String {
    let mut parts = Vec::new();
    for e in e.clone() {
        let key = e.path.join(".");
        let source = match &e.metadata {
            Some(md) => match &md.source {
                Some(figment::Source::File(p)) => format!("config file {}", p.display()),
                _ if md.name == ENVIRONMENT && !key.is_empty() => format!("${}", env_var(&key)),
                _ => md.name.to_string(),
            },
            None => "settings".to_owned(),
        };
        let what = e.kind.to_string();
        parts.push(if key.is_empty() {
            format!("{source}: {what}")
        } else {
            format!("{source}: {key}: {what}")
        });
    }
    parts.join("; ")
}

/// An entry of a list setting of `VALUE` for every service or
/// `SERVICE=VALUE` for one: its value, once the service name is checked
/// (the error names the entry).
fn per_service_value(entry: &str) -> Result<&str, String> {
    match entry.split_once('=') {
        Some((service, value)) => {
            commy_core::ServiceName::new(service.trim()).map_err(|e| format!("{entry:?}: {e}"))?;
            Ok(value.trim())
        }
        None => Ok(entry.trim()),
    }
}

/// Parses a duration: a number of seconds, or a number with a unit (`ns`,
/// `us`, `ms`, `s`, `m`, `h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like \"250ms\", \"1.5s\")"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (ns, us, ms, s, m, h)"
            ));
        }
    };
    Duration::try_from_secs_f64(n * scale).map_err(|e| format!("{text:?}: {e}"))
}

/// A duration as the shortest text with a unit that says it exactly.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    for (unit, per) in [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if ns >= per && ns.is_multiple_of(per) {
            return format!("{}{unit}", ns / per);
        }
    }
    if ns == 0 {
        "0s".to_owned()
    } else {
        format!("{ns}ns")
    }
}

/// Text, a whole number or a number, as settings take them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Loose {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    List(Vec<String>),
}

mod duration {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Loose::deserialize(d)? {
            Loose::Int(n) if n >= 0 => Ok(Duration::from_secs(n as u64)),
            Loose::Float(f) => Duration::try_from_secs_f64(f).map_err(serde::de::Error::custom),
            Loose::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::custom(
                "expected a duration (like \"250ms\", \"1.5s\", or seconds)",
            )),
        }
    }
}

mod timeout {
    use super::*;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("none"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let d = match Loose::deserialize(d)? {
            Loose::Text(t) if t.trim() == "none" => return Ok(None),
            Loose::Int(n) if n >= 0 => Duration::from_secs(n as u64),
            Loose::Float(f) => Duration::try_from_secs_f64(f).map_err(serde::de::Error::custom)?,
            Loose::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom)?,
            _ => {
                return Err(serde::de::Error::custom(
                    "expected a duration (like \"250ms\", \"1.5s\", or seconds) or \"none\"",
                ));
            }
        };
        // Zero waits forever, as "none".
        Ok((!d.is_zero()).then_some(d))
    }
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let e = || serde::de::Error::custom("expected a whole number, at least 0");
    match Loose::deserialize(d)? {
        Loose::Int(n) => usize::try_from(n).map_err(|_| e()),
        Loose::Text(t) => t.trim().parse().map_err(|_| e()),
        _ => Err(e()),
    }
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Loose::deserialize(d)? {
        Loose::Bool(b) => Ok(b),
        Loose::Int(0) => Ok(false),
        Loose::Int(1) => Ok(true),
        Loose::Text(t) => match t.trim() {
            "1" | "true" | "yes" => Ok(true),
            "0" | "false" | "no" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "expected 1/true or 0/false, got {other:?}"
            ))),
        },
        _ => Err(serde::de::Error::custom("expected 1/true or 0/false")),
    }
}

fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Loose::deserialize(d)? {
        Loose::List(v) => Ok(v),
        Loose::Text(t) => {
            let items: Vec<String> = t.split(',').map(|p| p.trim().to_owned()).collect();
            if items.iter().any(String::is_empty) {
                return Err(serde::de::Error::custom(format!(
                    "{t:?} has an empty entry (a list is entries separated by commas)"
                )));
            }
            Ok(items)
        }
        _ => Err(serde::de::Error::custom("expected a list of texts")),
    }
}

mod transport {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        t: &TransportPreference,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<TransportPreference, D::Error> {
        let text = String::deserialize(d)?;
        text.trim().parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        // A variable nobody sets keeps the process's own out.
        let mut v: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        v.push(("COMMY_SETTINGS_TEST".into(), String::new()));
        v
    }

    #[test]
    fn later_sources_win_and_each_value_says_where_it_came_from() {
        let dir = std::env::temp_dir().join(format!("commy-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(
            &file,
            "# the shop\nmesh = \"shop\"\n\ntls_ca = \"ca.pem\"\npeers = [\"tls://10.0.0.2:7443\"]\ncall_spin = \"10us\"\n",
        )
        .unwrap();
        let mut code = Layer::new("Python options");
        code.set("call_spin", 0.0);
        let loaded = Settings::load_from(
            Some(&file),
            Some(&env(&[
                ("COMMY_PEERS", "tls://a:1, tls://b:2"),
                ("COMMY_DEFAULT_TIMEOUT", "250ms"),
            ])),
            &code,
        )
        .unwrap();
        let s = loaded.settings();
        assert_eq!(s.mesh, "shop");
        assert_eq!(s.tls_ca.as_deref(), Some(dir.join("ca.pem").as_path()));
        assert_eq!(s.peers, ["tls://a:1", "tls://b:2"]);
        assert_eq!(s.default_timeout, Some(Duration::from_millis(250)));
        assert_eq!(s.call_spin, Duration::ZERO);
        let at = |line| Source::File {
            path: file.clone(),
            line,
        };
        assert_eq!(loaded.explain("mesh").unwrap().source, at(2));
        assert_eq!(loaded.explain("tls_ca").unwrap().source, at(4));
        assert_eq!(
            loaded.explain("peers").unwrap().to_string(),
            "peers = [\"tls://a:1\", \"tls://b:2\"] ($COMMY_PEERS)"
        );
        assert_eq!(
            loaded.explain("call_spin").unwrap().source,
            Source::Layer("Python options".into())
        );
        assert_eq!(
            loaded.explain("max_concurrency").unwrap().source,
            Source::Default
        );
        assert_eq!(loaded.explain("max_concurrency").unwrap().value, "1024");
        assert!(loaded.explain("nope").is_none());
        for key in KEYS {
            assert!(key_kind(key).is_some(), "{key} has no kind");
        }
        assert_eq!(loaded.explain_all().len(), KEYS.len());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_values_are_refused_naming_the_key_and_the_source() {
        let no_file = None;
        let refuse = |env_pairs: &[(&str, &str)], code: &Layer| {
            Settings::load_from(no_file, Some(&env(env_pairs)), code).unwrap_err()
        };
        let e = refuse(&[("COMMY_MAX_CONCURRENCY", "lots")], &Layer::new("builder"));
        assert!(
            e.contains("$COMMY_MAX_CONCURRENCY") && e.contains("whole number"),
            "{e}"
        );
        let e = refuse(
            &[("COMMY_TRANSPORT", "carrier-pigeon")],
            &Layer::new("builder"),
        );
        assert!(
            e.contains("$COMMY_TRANSPORT") && e.contains("carrier-pigeon"),
            "{e}"
        );
        let mut code = Layer::new("Node options");
        code.set("max_concurency", 3);
        let e = refuse(&[], &code);
        assert!(
            e.contains("Node options") && e.contains("max_concurency"),
            "{e}"
        );
        let mut code = Layer::new("builder");
        code.set("listen", "tls://nowhere");
        let e = refuse(&[], &code);
        assert!(e.starts_with("listen (builder): "), "{e}");
        let mut code = Layer::new("builder");
        code.set("max_concurrency", 0);
        let e = refuse(&[], &code);
        assert_eq!(e, "max_concurrency (builder): must be at least 1");
        let e = refuse(&[("COMMY_PEERS", ",,")], &Layer::new("builder"));
        assert!(
            e.contains("$COMMY_PEERS") && e.contains("empty entry"),
            "{e}"
        );
        let e = refuse(&[("COMMY_DEFAULT_TIMEOUT", "soon")], &Layer::new("builder"));
        assert!(
            e.contains("$COMMY_DEFAULT_TIMEOUT") && e.contains("soon"),
            "{e}"
        );
        for (hedge, why) in [
            ("echo=soon", "not a duration"),
            ("no spaces=5ms", "\"no spaces=5ms\""),
            ("2h", "at most 1h"),
        ] {
            let e = refuse(&[("COMMY_HEDGE", hedge)], &Layer::new("builder"));
            assert!(
                e.starts_with("hedge ($COMMY_HEDGE): ") && e.contains(why),
                "{e}"
            );
        }
        let e = refuse(&[("COMMY_EJECT_SUCCESS_PERCENT", "101")], &Layer::new("b"));
        assert!(
            e.contains("eject_success_percent") && e.contains("at most 100"),
            "{e}"
        );
        let e = refuse(&[("COMMY_EJECT_MIN_CALLS", "0")], &Layer::new("b"));
        assert!(e.contains("eject_min_calls") && e.contains("from 1"), "{e}");
        let s = Settings::load_from(
            None,
            Some(&env(&[("COMMY_HEDGE", "5ms, echo=20ms")])),
            &Layer::new("builder"),
        )
        .unwrap();
        assert_eq!(s.settings().hedge, ["5ms", "echo=20ms"]);
        let mut code = Layer::new("builder");
        code.set("hedge", vec!["5ms".to_owned(), "echo=0".to_owned()]);
        let s = Settings::load_from(None, Some(&[]), &code).unwrap();
        assert_eq!(s.settings().hedge, ["5ms", "echo=0"]);
    }

    #[test]
    fn durations_take_units_seconds_and_none() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration(" 50us "), Ok(Duration::from_micros(50)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        for d in [
            Duration::from_secs(30),
            Duration::from_micros(50),
            Duration::from_nanos(7),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        let mut code = Layer::new("builder");
        code.set("default_timeout", "none");
        let s = Settings::load_from(None, Some(&[]), &code).unwrap();
        assert_eq!(s.settings().default_timeout, None);
        code.set("default_timeout", 0);
        let s = Settings::load_from(None, Some(&[]), &code).unwrap();
        assert_eq!(s.settings().default_timeout, None);
        assert_eq!(s.explain("default_timeout").unwrap().value, "\"none\"");
    }
}
