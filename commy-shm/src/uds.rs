//! Unix-domain sockets: runtime dir, listener, peer credentials, fd passing.
