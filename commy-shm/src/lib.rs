//! Commy's shared-memory transport.
//!
//! This is the only crate of Commy that contains `unsafe` code; every block
//! carries a `// SAFETY:` comment. Everything read from shared memory is
//! treated as untrusted input: a peer that scribbles over a segment turns the
//! link into an error, never into undefined behaviour, a panic or a hang.

mod region;
pub mod ring;
mod segment;
mod sync;
mod uds;
mod wait;

pub use ring::{Consumer, Producer, RingError};
pub use segment::{
    SEGMENT_HEADER_LEN, SEGMENT_LAYOUT_VERSION, SEGMENT_MAGIC, SEGMENT_MAX_DATA_LEN, Segment,
    SegmentError,
};
pub use region::{};
pub use wait::WaitStrategy;
pub use uds::{
    AcceptError, BindError, ConnectError, MAX_FDS_PER_MESSAGE, MAX_SOCKET_PATH_LEN, PeerCred,
    PeerPolicy, PeerRejected, RUNTIME_DIR_ENV, RecvError, RemoveStaleError, RuntimeDir,
    RuntimeDirError, SendError, UdsListener, UdsStream, remove_stale_socket,
};
