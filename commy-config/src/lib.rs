//! Commy's settings. Today: the network settings of a mesh handle
//! ([`NetConfig`]): where to listen for TLS, which peers to ask for remote
//! instances, which certificates to use and which transport calls take,
//! each from the builder, the environment or the config file.
#![forbid(unsafe_code)]

mod net;

pub use net::{
    CONFIG_ENV, NetConfig, TransportPreference, parse_listen, parse_tls, user_config_dir,
};
