//! What the harness-less tests (alloc, accept) share: their runtime and a
//! mesh that uses shared memory only.

use std::path::Path;

use commy_mesh::{Mesh, MeshBuilder, NetConfig, TransportPreference};

/// A runtime of two workers, as the tests' meshes run on.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A mesh in the runtime dir `dir`, shared memory only, listening for
/// nothing whatever the environment says.
pub(crate) fn builder(dir: &Path) -> MeshBuilder {
    let mut net = NetConfig::default();
    net.no_listen = true;
    net.transport = Some(TransportPreference::Shm);
    Mesh::builder().runtime_dir(dir).net(net)
}
