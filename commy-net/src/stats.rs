//! Counters of what a server refused or closed, readable in-process
//! ([`ServerStats`]) and exported through the `metrics` facade as
//! `commy_net_refused_total{reason}` and `commy_net_closed_total{reason}`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a server refused a connection or closed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The bytes received were not a TLS handshake.
    NotTls,
    /// The client offered no ALPN protocol, or not `commy/1`.
    Alpn,
    /// mTLS is required and the client presented no certificate.
    NoClientCert,
    /// The client's certificate does not chain to our CA (or is invalid).
    BadClientCert,
    /// Another TLS handshake failure.
    Handshake,
    /// The handshake did not finish in time (e.g. a client that sends nothing).
    HandshakeTimeout,
    /// No complete frame (not even a Pong) arrived for the idle timeout.
    Idle,
    /// A frame header broke the protocol or a limit (e.g. oversize frame).
    BadFrame,
    /// The peer opened more streams than its credit.
    CreditExceeded,
    /// Writing to the peer stalled past the write timeout (it stopped reading).
    WriteTimeout,
    /// The connection limit was reached.
    TooManyConnections,
    /// `accept` itself failed (e.g. out of file descriptors); the
    /// connection stays queued until accepting works again.
    AcceptFailed,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 12] = [
        Reason::NotTls,
        Reason::Alpn,
        Reason::NoClientCert,
        Reason::BadClientCert,
        Reason::Handshake,
        Reason::HandshakeTimeout,
        Reason::Idle,
        Reason::BadFrame,
        Reason::CreditExceeded,
        Reason::WriteTimeout,
        Reason::TooManyConnections,
        Reason::AcceptFailed,
    ];

    /// The metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::NotTls => "not_tls",
            Reason::Alpn => "alpn",
            Reason::NoClientCert => "no_client_cert",
            Reason::BadClientCert => "bad_client_cert",
            Reason::Handshake => "handshake",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::Idle => "idle",
            Reason::BadFrame => "bad_frame",
            Reason::CreditExceeded => "credit_exceeded",
            Reason::WriteTimeout => "write_timeout",
            Reason::TooManyConnections => "too_many_connections",
            Reason::AcceptFailed => "accept_failed",
        }
    }

    /// Whether this happens before the connection is accepted (refused) or
    /// after (closed).
    pub const fn is_refusal(self) -> bool {
        matches!(
            self,
            Reason::NotTls
                | Reason::Alpn
                | Reason::NoClientCert
                | Reason::BadClientCert
                | Reason::Handshake
                | Reason::HandshakeTimeout
                | Reason::TooManyConnections
                | Reason::AcceptFailed
        )
    }
}

/// A server's counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    accepted: AtomicU64,
    requests: AtomicU64,
    by_reason: [AtomicU64; Reason::ALL.len()],
}

impl ServerStats {
    /// Connections that completed the handshake.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Streams (requests and one-way messages) received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Connections refused or closed for `reason`.
    pub fn count(&self, reason: Reason) -> u64 {
        self.by_reason[reason as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn accept(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("commy_net_accepted_total").increment(1);
    }

    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, reason: Reason) {
        self.by_reason[reason as usize].fetch_add(1, Ordering::Relaxed);
        let name = if reason.is_refusal() {
            "commy_net_refused_total"
        } else {
            "commy_net_closed_total"
        };
        metrics::counter!(name, "reason" => reason.as_str()).increment(1);
    }
}
