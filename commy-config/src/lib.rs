//! Commy's settings: the settings of a mesh handle as one serde type
//! ([`Settings`]) layered from the defaults, the config file, the
//! environment and the values set in code ([`Layer`]), each value knowing
//! where it came from ([`Loaded::explain`]); and the network part of them,
//! typed ([`NetConfig`]).
#![forbid(unsafe_code)]

mod net;
mod settings;

pub use net::{NetConfig, TransportPreference, parse_listen, parse_tls, user_config_dir};
pub use settings::{
    CONFIG_ENV, Explained, KEYS, KeyKind, Layer, Loaded, SettingValue, Settings, Source, env_var,
    format_duration, key_kind, parse_duration,
};
