//! commy-net over real sockets and real TLS: calls, multiplexing, deadlines,
//! cancellation, credit, keepalive, reconnect, GOAWAY, mTLS, and every kind
//! of bad peer (each refused or closed, counted, while others are served).

#![allow(clippy::disallowed_types)] // plain counters in tests, nothing for loom

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use commy_core::{
    Code, Deadline, Frame, FrameFlags, FrameHeader, FrameKind, Limits, Status, StreamId,
};
use commy_net::{
    Client, Credentials, DevCa, Handler, Identity, Inbound, LeafSpec, Reason, Reply, Server,
    Settings,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "commy-net-test-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Pki {
    dir: PathBuf,
    ca: DevCa,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = temp_dir(tag);
        let ca = DevCa::load_or_create(&dir.join("ca")).unwrap();
        Pki { dir, ca }
    }

    fn creds(&self, service: &str) -> Credentials {
        self.ca
            .credentials(&LeafSpec::for_this_host(
                Identity::new("test", service).unwrap(),
                &[],
            ))
            .unwrap()
    }

    fn ca_only(&self) -> Credentials {
        Credentials::from_pem_files(&self.dir.join("ca").join("ca.pem"), None).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Test settings: quick timeouts so bad peers are dealt with fast.
fn quick() -> Settings {
    let mut s = Settings::default();
    // Generous for a loaded 2-core machine, short enough for quick tests.
    s.handshake_timeout = Duration::from_secs(2);
    s.idle_timeout = Duration::from_secs(3);
    s.keepalive_interval = Duration::from_millis(200);
    s.write_timeout = Duration::from_secs(2);
    s.backoff_base = Duration::from_millis(5);
    s.backoff_cap = Duration::from_millis(50);
    s
}

/// The test service: the payload says what to do.
/// `sleep:<ms>` waits; `big:<n>` answers n bytes; `panic`; `fail` answers
/// NOT_FOUND; `who` answers the client's identity; anything else is echoed.
fn service(
    in_flight: Arc<AtomicUsize>,
    max_seen: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
) -> Handler {
    Arc::new(move |req: Inbound| {
        let (in_flight, max_seen, dropped) = (in_flight.clone(), max_seen.clone(), dropped.clone());
        Box::pin(async move {
            struct Track(Arc<AtomicUsize>, Arc<AtomicUsize>, bool);
            impl Drop for Track {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                    if !self.2 {
                        self.1.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max_seen.fetch_max(now, Ordering::SeqCst);
            let mut track = Track(in_flight, dropped, false);
            let text = String::from_utf8_lossy(&req.payload).to_string();
            let out = if let Some(ms) = text.strip_prefix("sleep:") {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                Ok(Reply::new(req.payload.clone()))
            } else if let Some(n) = text.strip_prefix("big:") {
                Ok(Reply::new(vec![7u8; n.parse().unwrap()]))
            } else if let Some(n) = text.strip_prefix("sub:") {
                // A push stream of n messages, then its end; "sub:fail"
                // fails it after one message; "sub:wait" pushes nothing
                // and counts its end in `dropped`.
                let (reply, pusher) = Reply::new("accepted").streaming();
                let ended = track.1.clone();
                let n = n.to_owned();
                tokio::spawn(async move {
                    match n.as_str() {
                        "fail" => {
                            let _ = pusher.push(Bytes::new(), Bytes::from_static(b"one")).await;
                            pusher.fail(Status::not_found("gone")).await;
                        }
                        "wait" => {
                            pusher.closed().await;
                            ended.fetch_add(1, Ordering::SeqCst);
                        }
                        n => {
                            for i in 0..n.parse::<usize>().unwrap() {
                                let md = Bytes::from(vec![1u8; i % 3]);
                                if pusher.push(md, Bytes::from(format!("m{i}"))).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                Ok(reply)
            } else if text == "panic" {
                panic!("the test handler panics on purpose");
            } else if text == "fail" {
                Err(Status::not_found("no such thing"))
            } else if text == "who" {
                Ok(Reply::new(
                    req.peer
                        .identity
                        .as_ref()
                        .map_or("nobody".to_string(), |i| i.to_string()),
                ))
            } else {
                Ok(Reply::new(req.payload.clone()))
            };
            track.2 = true;
            out
        })
    })
}

struct Fixture {
    pki: Pki,
    server: Server,
    in_flight: Arc<AtomicUsize>,
    max_seen: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl Fixture {
    async fn start(tag: &str, settings: Settings, require_client_cert: bool) -> Fixture {
        Fixture::start_with(tag, settings, |creds| {
            creds.server_config(require_client_cert).unwrap()
        })
        .await
    }

    /// A server whose TLS configuration `config` makes from its credentials.
    async fn start_with(
        tag: &str,
        settings: Settings,
        config: impl FnOnce(&Credentials) -> Arc<rustls::ServerConfig>,
    ) -> Fixture {
        let pki = Pki::new(tag);
        let (in_flight, max_seen, dropped) = (Arc::default(), Arc::default(), Arc::default());
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            config(&pki.creds("server")),
            settings,
            service(
                Arc::clone(&in_flight),
                Arc::clone(&max_seen),
                Arc::clone(&dropped),
            ),
        )
        .await
        .unwrap();
        Fixture {
            pki,
            server,
            in_flight,
            max_seen,
            dropped,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn client(&self) -> Client {
        self.client_with(&self.pki.creds("client"), quick())
    }

    fn client_with(&self, creds: &Credentials, settings: Settings) -> Client {
        Client::new(
            "127.0.0.1",
            self.addr().port(),
            creds.client_config().unwrap(),
            settings,
        )
        .unwrap()
    }

    /// A good client is served (the server keeps serving everyone else).
    async fn still_serves(&self) {
        let c = self.client();
        let r = c
            .call(Bytes::new(), Bytes::from_static(b"still here"), in_secs(10))
            .await
            .unwrap();
        assert_eq!(&r.payload[..], b"still here");
    }

    /// A TLS connection with ALPN commy/1 that speaks raw frames.
    async fn raw_tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr()).await.unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(self.pki.creds("raw").client_config().unwrap());
        connector
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }

    async fn wait_for(&self, reason: Reason, n: u64) {
        let stats = self.server.stats().clone();
        wait_until(
            || stats.count(reason) >= n,
            &format!("{} >= {n}", reason.as_str()),
        )
        .await;
    }
}

fn in_secs(s: u64) -> Option<Deadline> {
    Some(Deadline::after(Duration::from_secs(s)))
}

async fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads frames until EOF/error; returns those read.
/// The status of the Error frame on stream 0 among `frames` (a connection
/// error); fails if there is none.
fn connection_error(frames: &[Frame]) -> Status {
    frames
        .iter()
        .find(|f| f.kind() == FrameKind::Error && f.stream_id().0 == 0)
        .expect("an Error frame on stream 0")
        .status()
        .unwrap()
        .unwrap()
}

async fn read_frames<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Vec<Frame> {
    let mut buf = bytes::BytesMut::new();
    let mut frames = Vec::new();
    loop {
        while let Ok(Some(f)) = Frame::decode_from(&mut buf, &Limits::DEFAULT) {
            frames.push(f);
        }
        match tokio::time::timeout(Duration::from_secs(20), r.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return frames,
        }
    }
}

fn request(id: u64, payload: &[u8]) -> Vec<u8> {
    Frame::new(
        FrameKind::Request,
        StreamId(id),
        Vec::new(),
        payload.to_vec(),
    )
    .unwrap()
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_connection_and_get_their_own_answers() {
    let f = Fixture::start("mux", quick(), false).await;
    let c = f.client();
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(format!("call {i}"));
            let r = c
                .call(Bytes::new(), body.clone(), in_secs(20))
                .await
                .unwrap();
            assert_eq!(r.payload, body);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(c.connects(), 1);
    assert_eq!(f.server.stats().accepted(), 1);
    assert_eq!(f.server.stats().requests(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_errors_and_panics() {
    let f = Fixture::start("big", quick(), false).await;
    let c = f.client();
    let big = Bytes::from(vec![0xA5u8; 4 << 20]);
    let r = c
        .call(Bytes::new(), big.clone(), in_secs(20))
        .await
        .unwrap();
    assert_eq!(r.payload, big);
    let r = c
        .call(
            Bytes::new(),
            Bytes::from_static(b"big:3000000"),
            in_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(r.payload.len(), 3_000_000);
    let e = c
        .call(Bytes::new(), Bytes::from_static(b"fail"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, "no such thing"));
    let e = c
        .call(Bytes::new(), Bytes::from_static(b"panic"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    // 40 MiB, over the 16 MiB frame limit, crosses in fragments both ways.
    let huge: Bytes = (0..40u32 << 20)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let r = c
        .call(Bytes::new(), huge.clone(), in_secs(60))
        .await
        .unwrap();
    assert!(r.payload == huge, "40 MiB came back changed");
    let r = c
        .call(
            Bytes::new(),
            Bytes::from(format!("big:{}", 40 << 20)),
            in_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(r.payload.len(), 40 << 20);
    // A request over max_message is refused before it is sent.
    let too_big = Bytes::from(vec![1u8; Limits::DEFAULT_MAX_MESSAGE as usize + 1]);
    let e = c
        .call(Bytes::new(), too_big, in_secs(10))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("max_message"), "{e}");
    // So is an answer over it (the handler's reply does not leave).
    let e = c
        .call(
            Bytes::new(),
            Bytes::from(format!("big:{}", Limits::DEFAULT_MAX_MESSAGE as usize + 1)),
            in_secs(60),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_dropped_calls_cancel_the_handler() {
    let f = Fixture::start("deadline", quick(), false).await;
    let c = f.client();
    let started = std::time::Instant::now();
    let e = c
        .call(
            Bytes::new(),
            Bytes::from_static(b"sleep:10000"),
            Some(Deadline::after(Duration::from_millis(100))),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_until(
        || f.dropped.load(Ordering::SeqCst) == 1,
        "the handler to be cancelled",
    )
    .await;

    // Dropping a call's future cancels it too.
    let call = c.call(Bytes::new(), Bytes::from_static(b"sleep:10000"), None);
    let gave_up = tokio::time::timeout(Duration::from_millis(100), call).await;
    assert!(gave_up.is_err());
    wait_until(
        || f.dropped.load(Ordering::SeqCst) == 2,
        "the dropped call's handler to stop",
    )
    .await;
    wait_until(
        || f.in_flight.load(Ordering::SeqCst) == 0,
        "nothing in flight",
    )
    .await;
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_bounds_the_streams_in_flight() {
    let mut s = quick();
    s.stream_credit = 4;
    let f = Fixture::start("credit", s, false).await;
    let c = f.client();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.call(Bytes::new(), Bytes::from_static(b"sleep:200"), in_secs(30))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        f.max_seen.load(Ordering::SeqCst),
        4,
        "the server never saw more than its credit"
    );
    assert_eq!(f.server.stats().count(Reason::CreditExceeded), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_an_idle_connection() {
    let f = Fixture::start("keepalive", quick(), false).await;
    let c = f.client();
    c.call(Bytes::new(), Bytes::from_static(b"1"), in_secs(5))
        .await
        .unwrap();
    // Longer than the idle timeout: only the pings keep the link.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    c.call(Bytes::new(), Bytes::from_static(b"2"), in_secs(5))
        .await
        .unwrap();
    assert_eq!(c.connects(), 1);
    assert_eq!(f.server.stats().count(Reason::Idle), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_server_comes_back() {
    let f = Fixture::start("reconnect", quick(), false).await;
    let addr = f.addr();
    let c = f.client();
    c.call(Bytes::new(), Bytes::from_static(b"a"), in_secs(5))
        .await
        .unwrap();
    let Fixture { pki, server, .. } = f;
    drop(server);
    wait_until(|| !c.is_connected(), "the client to notice").await;
    let e = c
        .call(Bytes::new(), Bytes::from_static(b"b"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    let server = Server::bind(
        addr,
        pki.creds("server").server_config(false).unwrap(),
        quick(),
        service(Arc::default(), Arc::default(), Arc::default()),
    )
    .await
    .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match c
            .call(Bytes::new(), Bytes::from_static(b"c"), in_secs(5))
            .await
        {
            Ok(r) => {
                assert_eq!(&r.payload[..], b"c");
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable);
                assert!(std::time::Instant::now() < end, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(c.connects(), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_lets_calls_in_flight_finish() {
    let f = Fixture::start("goaway", quick(), false).await;
    let c = f.client();
    c.connect().await.unwrap();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move {
            c.call(Bytes::new(), Bytes::from_static(b"sleep:500"), in_secs(10))
                .await
        })
    };
    wait_until(
        || f.in_flight.load(Ordering::SeqCst) == 1,
        "the slow call to start",
    )
    .await;
    let Fixture {
        server, pki: _pki, ..
    } = f;
    server.shutdown().await;
    let r = slow.await.unwrap().unwrap();
    assert_eq!(&r.payload[..], b"sleep:500");
    let e = c
        .call(Bytes::new(), Bytes::from_static(b"late"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_required_refuses_missing_and_foreign_certificates() {
    let f = Fixture::start("mtls", quick(), true).await;
    // No client certificate.
    let anon = f.client_with(&f.pki.ca_only(), quick());
    let e = anon
        .call(Bytes::new(), Bytes::from_static(b"x"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    f.wait_for(Reason::NoClientCert, 1).await;
    // A certificate from another CA, trusting the right one.
    let other = Pki::new("mtls-other");
    let (cert, key) = other
        .ca
        .issue(&LeafSpec::new(Identity::new("test", "intruder").unwrap()))
        .unwrap();
    std::fs::write(other.dir.join("c.pem"), cert).unwrap();
    std::fs::write(other.dir.join("k.pem"), key).unwrap();
    let foreign = Credentials::from_pem_files(
        &f.pki.dir.join("ca").join("ca.pem"),
        Some((&other.dir.join("c.pem"), &other.dir.join("k.pem"))),
    )
    .unwrap();
    let intruder = f.client_with(&foreign, quick());
    let e = intruder
        .call(Bytes::new(), Bytes::from_static(b"x"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    f.wait_for(Reason::BadClientCert, 1).await;
    // The right certificate: served, and its identity is known.
    let r = f
        .client()
        .call(Bytes::new(), Bytes::from_static(b"who"), in_secs(5))
        .await
        .unwrap();
    assert_eq!(&r.payload[..], b"spiffe://test/client");
}

/// mTLS in a trust domain: a certificate of the right CA for another
/// mesh fails the handshake; one of the mesh is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_in_a_trust_domain_refuses_other_meshes() {
    let f = Fixture::start_with("mtls-domain", quick(), |c| {
        c.mtls_server_config("test").unwrap()
    })
    .await;
    let outsider = f
        .pki
        .ca
        .credentials(&LeafSpec::for_this_host(
            Identity::new("other", "client").unwrap(),
            &[],
        ))
        .unwrap();
    let e = f
        .client_with(&outsider, quick())
        .call(Bytes::new(), Bytes::from_static(b"x"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("AccessDenied"), "{e}");
    f.wait_for(Reason::BadClientCert, 1).await;
    let r = f
        .client()
        .call(Bytes::new(), Bytes::from_static(b"who"), in_secs(5))
        .await
        .unwrap();
    assert_eq!(&r.payload[..], b"spiffe://test/client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_and_pem_files() {
    let f = Fixture::start("pem", quick(), false).await;
    let anon = f.client_with(&f.pki.ca_only(), quick());
    let r = anon
        .call(Bytes::new(), Bytes::from_static(b"who"), in_secs(5))
        .await
        .unwrap();
    assert_eq!(&r.payload[..], b"nobody");
    assert_eq!(
        anon.server_identity().unwrap().to_string(),
        "spiffe://test/server"
    );
    // Production-style: certificate and key from PEM files.
    let (cert, key) = f
        .pki
        .ca
        .issue(&LeafSpec::new(Identity::new("prod", "billing").unwrap()).dns("localhost"))
        .unwrap();
    commy_net::tls::write_pem_file(&f.pki.dir.join("leaf.pem"), &cert).unwrap();
    commy_net::tls::write_pem_file(&f.pki.dir.join("leaf.key"), &key).unwrap();
    let creds = Credentials::from_pem_files(
        &f.pki.dir.join("ca").join("ca.pem"),
        Some((&f.pki.dir.join("leaf.pem"), &f.pki.dir.join("leaf.key"))),
    )
    .unwrap();
    assert_eq!(
        creds.identity().unwrap().to_string(),
        "spiffe://prod/billing"
    );
    let r = f
        .client_with(&creds, quick())
        .call(Bytes::new(), Bytes::from_static(b"who"), in_secs(5))
        .await
        .unwrap();
    assert_eq!(&r.payload[..], b"spiffe://prod/billing");
    // Bad PEM input names the file.
    std::fs::write(f.pki.dir.join("junk.pem"), "not a certificate").unwrap();
    let e = Credentials::from_pem_files(&f.pki.dir.join("junk.pem"), None).unwrap_err();
    assert!(e.to_string().contains("junk.pem"), "{e}");
    // The server is verified: a client trusting another CA refuses it.
    let other = Pki::new("pem-other");
    let c = f.client_with(&other.ca_only(), quick());
    let e = c
        .call(Bytes::new(), Bytes::from_static(b"x"), in_secs(5))
        .await
        .unwrap_err();
    assert!(e.message().contains("certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_tls_is_refused() {
    let f = Fixture::start("garbage", quick(), false).await;
    let mut raw = TcpStream::connect(f.addr()).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
    f.wait_for(Reason::NotTls, 1).await;
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_alpn_is_refused() {
    let f = Fixture::start("alpn", quick(), false).await;
    for (alpn, reason, n) in [
        (Some(b"h2".to_vec()), Reason::Alpn, 1),
        (None, Reason::Alpn, 2),
    ] {
        let mut config = (*f.pki.creds("c").client_config().unwrap()).clone();
        config.alpn_protocols = alpn.into_iter().collect();
        let tcp = TcpStream::connect(f.addr()).await.unwrap();
        let connected = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await;
        // The handshake fails with the alert docs/PROTOCOL.md names, an
        // offer of no protocol at all included.
        let e = connected.map(|_| ()).expect_err("the handshake completed");
        let alert = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .cloned();
        assert_eq!(
            alert,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            )),
            "{e}"
        );
        f.wait_for(reason, n).await;
    }
    f.still_serves().await;
}

/// A connection closed before any hello, and a hello of 64 KiB, are
/// refused and counted, each with its reason; the oversized one gets the
/// `decode_error` alert, read by the client before the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_oversized_hello_is_refused_with_a_reason() {
    let f = Fixture::start("hello", quick(), false).await;
    drop(TcpStream::connect(f.addr()).await.unwrap());
    f.wait_for(Reason::Handshake, 1).await;
    // A 64 KiB ClientHello message (type 1, length 0x010000), in
    // handshake records of 16 KiB.
    let mut raw = TcpStream::connect(f.addr()).await.unwrap();
    let mut message = vec![0x01, 0x01, 0x00, 0x00];
    message.resize(4 + 64 * 1024, 0x42);
    let mut hello = Vec::new();
    for chunk in message.chunks(16 * 1024) {
        hello.extend_from_slice(&[0x16, 0x03, 0x01]);
        hello.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        hello.extend_from_slice(chunk);
    }
    let _ = raw.write_all(&hello).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer)).await;
    // A plaintext fatal decode_error alert.
    assert_eq!(answer, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 50]);
    f.wait_for(Reason::NotTls, 1).await;
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_header_gets_an_error_and_a_close() {
    let f = Fixture::start("oversize", quick(), false).await;
    let mut s = f.raw_tls().await;
    let mut h = FrameHeader::new(FrameKind::Request, StreamId(1));
    h.payload_len = u32::MAX; // 4 GiB declared; nothing follows
    s.write_all(&h.encode()).await.unwrap();
    s.flush().await.unwrap();
    let status = connection_error(&read_frames(&mut s).await);
    assert!(status.message().contains("max_frame"), "{status}");
    f.wait_for(Reason::BadFrame, 1).await;
    f.still_serves().await;
}

/// A request on an even stream id (the server's to open) is a protocol
/// violation: an Error on stream 0 and a close, no answer. (Stream 0 is
/// refused by the frame codec already.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_server_stream_id_is_refused() {
    let f = Fixture::start("even-stream", quick(), false).await;
    for id in [2u64, 4] {
        let mut s = f.raw_tls().await;
        s.write_all(&request(id, b"hello")).await.unwrap();
        s.flush().await.unwrap();
        let frames = read_frames(&mut s).await;
        assert!(
            !frames.iter().any(|f| f.kind() == FrameKind::Response),
            "stream {id} was answered"
        );
        let status = connection_error(&frames);
        assert!(status.message().contains("odd stream ids"), "{status}");
    }
    f.wait_for(Reason::BadFrame, 2).await;
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_closed() {
    let f = Fixture::start("slowloris", quick(), false).await;
    // TCP only, nothing sent.
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(f.addr()).await.unwrap());
    }
    // A TLS client that never sends a frame, nor answers pings.
    let mut mute = f.raw_tls().await;
    // Others are served meanwhile.
    f.still_serves().await;
    f.wait_for(Reason::HandshakeTimeout, 5).await;
    for mut s in silent {
        let mut sink = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "the silent socket was closed"
        );
    }
    let frames = read_frames(&mut mute).await; // ends when the server closes
    assert!(
        frames.iter().any(|f| f.kind() == FrameKind::Ping),
        "the server pinged first"
    );
    f.wait_for(Reason::Idle, 1).await;
    f.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_closed() {
    let f = Fixture::start("noread", quick(), false).await;
    let mut s = f.raw_tls().await;
    // 64 answers of 1 MiB each, never read.
    for id in 0..64u64 {
        s.write_all(&request(2 * id + 1, b"big:1048576"))
            .await
            .unwrap();
    }
    s.flush().await.unwrap();
    f.still_serves().await;
    f.wait_for(Reason::WriteTimeout, 1).await;
    f.still_serves().await;
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_exceeding_its_credit_is_closed() {
    let mut settings = quick();
    settings.stream_credit = 8;
    let f = Fixture::start("overcredit", settings, false).await;
    let mut s = f.raw_tls().await;
    let mut wire = Vec::new();
    for id in 0..9u64 {
        wire.extend(request(2 * id + 1, b"sleep:2000"));
    }
    s.write_all(&wire).await.unwrap();
    s.flush().await.unwrap();
    let frames = read_frames(&mut s).await;
    let credit = frames
        .iter()
        .find(|f| f.kind() == FrameKind::Credit)
        .expect("the initial credit");
    assert_eq!(credit.credit_increment(), Some(8));
    assert_eq!(connection_error(&frames).code(), Code::ResourceExhausted);
    f.wait_for(Reason::CreditExceeded, 1).await;
    f.still_serves().await;
}

/// Four processes (this test re-run with `$COMMY_NET_TEST_CA` set) load or
/// create the CA in one directory at once: they all end up with the same.
#[test]
fn the_dev_ca_is_created_once_by_racing_processes() {
    if let Some(dir) = std::env::var_os("COMMY_NET_TEST_CA") {
        // A racing child: load or create the CA, and print it.
        let ca = DevCa::load_or_create(std::path::Path::new(&dir)).unwrap();
        println!("CA {}", ca.cert_pem().replace('\n', ""));
        return;
    }
    let dir = temp_dir("race-proc");
    let ca_dir = dir.join("dev-ca");
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "the_dev_ca_is_created_once_by_racing_processes",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("COMMY_NET_TEST_CA", &ca_dir)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let pems: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success());
            let text = String::from_utf8(out.stdout).unwrap();
            let i = text.find("CA ").expect("the child printed its CA");
            text[i..].lines().next().unwrap().to_string()
        })
        .collect();
    assert!(
        pems.windows(2).all(|w| w[0] == w[1]),
        "every process got the same CA"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_dev_ca_is_created_once_under_races() {
    let dir = temp_dir("race");
    let ca_dir = dir.join("dev-ca");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let d = ca_dir.clone();
            std::thread::spawn(move || DevCa::load_or_create(&d).unwrap().cert_pem().to_string())
        })
        .collect();
    let pems: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        pems.windows(2).all(|w| w[0] == w[1]),
        "every thread got the same CA"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(ca_dir.join("ca.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary dirs left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A client that follows docs/PROTOCOL.md literally: its requests and
/// one-way messages carry END_STREAM, and it waits on each stream for a
/// Response with END_STREAM (or an Error), never for the connection to
/// close. Calls, errors and one-ways all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_for_end_stream_completes() {
    let f = Fixture::start("end-stream", quick(), false).await;
    let mut s = f.raw_tls().await;
    let ended = |kind, id: u64, body: &[u8]| {
        Frame::new(kind, StreamId(id), Vec::new(), body.to_vec())
            .unwrap()
            .with_flags(FrameFlags::END_STREAM)
            .to_vec()
    };
    let mut buf = bytes::BytesMut::new();
    // Frames until the one that ends stream `id` (others are skipped:
    // credit on stream 0).
    async fn until_end(
        s: &mut (impl tokio::io::AsyncRead + Unpin),
        buf: &mut bytes::BytesMut,
        id: u64,
    ) -> Frame {
        loop {
            while let Some(f) = Frame::decode_from(buf, &Limits::DEFAULT).unwrap() {
                let h = f.header();
                let last = h.flags.contains(FrameFlags::END_STREAM) || h.kind == FrameKind::Error;
                if h.stream_id == StreamId(id) && last {
                    return f;
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(20), s.read_buf(buf))
                .await
                .expect("no frame ended the stream")
                .unwrap();
            assert!(n > 0, "the server closed the connection");
        }
    }
    // A call.
    s.write_all(&ended(FrameKind::Request, 1, b"hello"))
        .await
        .unwrap();
    let answer = until_end(&mut s, &mut buf, 1).await;
    assert_eq!(answer.kind(), FrameKind::Response);
    assert_eq!(&answer.payload()[..], b"hello");
    // A one-way message (never answered), then a failing call.
    s.write_all(&ended(FrameKind::OneWay, 3, b"note"))
        .await
        .unwrap();
    s.write_all(&ended(FrameKind::Request, 5, b"fail"))
        .await
        .unwrap();
    let failed = until_end(&mut s, &mut buf, 5).await;
    assert_eq!(failed.kind(), FrameKind::Error);
    assert_eq!(failed.status().unwrap().unwrap().code(), Code::NotFound);
    // And the connection still serves.
    s.write_all(&ended(FrameKind::Request, 7, b"again"))
        .await
        .unwrap();
    let answer = until_end(&mut s, &mut buf, 7).await;
    assert_eq!(&answer.payload()[..], b"again");
}

/// Frames read off `s` until the one that ends stream `id` (a Response
/// without FRAGMENT, or an Error); the fragments of a fragmented answer
/// are all returned, in order. Frames of other streams are skipped.
async fn answer_frames(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut bytes::BytesMut,
    id: u64,
) -> Vec<Frame> {
    let mut got = Vec::new();
    loop {
        while let Some(f) = Frame::decode_from(buf, &Limits::DEFAULT).unwrap() {
            if f.stream_id() != StreamId(id) {
                continue;
            }
            let h = *f.header();
            got.push(f);
            if h.kind == FrameKind::Error || !h.flags.contains(FrameFlags::FRAGMENT) {
                return got;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read_buf(buf))
            .await
            .expect("no frame ended the stream")
            .unwrap();
        assert!(n > 0, "the server closed the connection");
    }
}

/// A message's frames as docs/PROTOCOL.md section 3.1 builds them, by hand:
/// `sizes` are the payload bytes of each fragment.
fn fragmented(kind: FrameKind, id: u64, payload: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    assert_eq!(sizes.iter().sum::<usize>(), payload.len());
    let mut at = 0;
    sizes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let last = i == sizes.len() - 1;
            let flags = if last {
                FrameFlags::END_STREAM
            } else {
                FrameFlags::FRAGMENT
            };
            let f = Frame::new(kind, StreamId(id), Vec::new(), payload[at..at + n].to_vec())
                .unwrap()
                .with_flags(flags);
            at += n;
            f.to_vec()
        })
        .collect()
}

fn small_frames() -> Settings {
    let mut s = quick();
    s.limits = Limits {
        max_frame: 4096,
        max_message: 20_000,
        ..Limits::DEFAULT
    };
    s
}

/// A fragmented request, built by hand and interleaved with another
/// stream's request, is joined by the server; an answer over the server's
/// frame limit comes back fragmented as section 3.1 says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_messages_are_joined_and_sent_in_fragments() {
    let f = Fixture::start("fragments", small_frames(), false).await;
    let mut s = f.raw_tls().await;
    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    let pieces = fragmented(FrameKind::Request, 1, &body, &[4000, 0, 4000, 2000]);
    for (i, p) in pieces.iter().enumerate() {
        s.write_all(p).await.unwrap();
        if i == 1 {
            s.write_all(&request(3, b"between")).await.unwrap();
        }
    }
    s.flush().await.unwrap();
    // Stream 3 was whole first, and is answered first.
    let mut buf = bytes::BytesMut::new();
    let between = answer_frames(&mut s, &mut buf, 3).await;
    assert_eq!(&between[0].payload()[..], b"between");
    let answer = answer_frames(&mut s, &mut buf, 1).await;
    assert_eq!(answer.len(), 3, "10,000 bytes in frames of at most 4096");
    let mut joined = Vec::new();
    for (i, frame) in answer.iter().enumerate() {
        let h = frame.header();
        let last = i == answer.len() - 1;
        assert_eq!(h.kind, FrameKind::Response);
        assert!(frame.encoded_len() <= 4096);
        assert_eq!(h.flags.contains(FrameFlags::FRAGMENT), !last);
        assert_eq!(h.flags.contains(FrameFlags::END_STREAM), last);
        joined.extend_from_slice(frame.payload());
    }
    assert_eq!(joined, body);
}

/// A fragmented request over the server's max_message fails its stream
/// with RESOURCE_EXHAUSTED, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_fails_only_its_stream() {
    let f = Fixture::start("max-message", small_frames(), false).await;
    let mut s = f.raw_tls().await;
    let body = vec![1u8; 24_000];
    for p in fragmented(FrameKind::Request, 1, &body, &[4000; 6]) {
        s.write_all(&p).await.unwrap();
    }
    s.write_all(&request(3, b"next")).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let failed = answer_frames(&mut s, &mut buf, 1).await;
    let status = failed[0].status().unwrap().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("max_message"), "{status}");
    let next = answer_frames(&mut s, &mut buf, 3).await;
    assert_eq!(&next[0].payload()[..], b"next");
    assert_eq!(f.in_flight.load(Ordering::SeqCst), 0);
}

/// Receiver rules of docs/PROTOCOL.md, each broken by hand: the server
/// answers as the spec says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_rules_are_enforced() {
    let f = Fixture::start("rules", quick(), false).await;
    // A stream id that does not increase (reused, or lower): a connection
    // error, and the request is not run.
    for (first, second) in [(5u64, 5u64), (5, 3)] {
        let mut s = f.raw_tls().await;
        s.write_all(&request(first, b"one")).await.unwrap();
        s.write_all(&request(second, b"two")).await.unwrap();
        s.flush().await.unwrap();
        let frames = read_frames(&mut s).await;
        let answered: Vec<_> = frames
            .iter()
            .filter(|f| f.kind() == FrameKind::Response)
            .map(|f| f.payload().clone())
            .collect();
        assert_eq!(
            answered,
            [Bytes::from_static(b"one")],
            "{first} then {second}"
        );
        let status = connection_error(&frames);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("never reused"), "{status}");
    }
    // A request whose 1 µs deadline passed on the way (or, if the server
    // looked within that microsecond, while its handler sleeps 200 ms):
    // DEADLINE_EXCEEDED. With a handler of 1 ms, the timer's millisecond
    // granularity let the answer win now and then.
    let mut s = f.raw_tls().await;
    let expired = Frame::new(
        FrameKind::Request,
        StreamId(1),
        Vec::new(),
        b"sleep:200".to_vec(),
    )
    .unwrap()
    .with_flags(FrameFlags::END_STREAM)
    .with_deadline_us(1);
    s.write_all(&expired.to_vec()).await.unwrap();
    s.flush().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let answer = answer_frames(&mut s, &mut buf, 1).await;
    let status = answer[0].status().unwrap().unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    // A broken fragment (metadata in a later fragment): a connection error
    // naming it.
    let mut s = f.raw_tls().await;
    let first = Frame::new(FrameKind::Request, StreamId(1), Vec::new(), vec![0u8; 10])
        .unwrap()
        .with_flags(FrameFlags::FRAGMENT);
    let later = Frame::new(FrameKind::Request, StreamId(1), vec![0u8; 4], vec![0u8; 10])
        .unwrap()
        .with_flags(FrameFlags::END_STREAM);
    s.write_all(&first.to_vec()).await.unwrap();
    s.write_all(&later.to_vec()).await.unwrap();
    s.flush().await.unwrap();
    let status = connection_error(&read_frames(&mut s).await);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("bad fragment on stream 1"),
        "{status}"
    );
    f.wait_for(Reason::BadFrame, 3).await;
    f.still_serves().await;
}

/// A push stream (Reply::streaming / Client::subscribe): accepted by a
/// Response that keeps the stream open, then messages in order within the
/// stream credit, more as the client grants it, and its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_streams_follow_their_credit_and_end() {
    let f = Fixture::start("push", quick(), false).await;
    let c = f.client();
    let mut s = c
        .subscribe(Bytes::new(), Bytes::from_static(b"sub:1000"), in_secs(5))
        .await
        .unwrap();
    assert_eq!(&s.accepted().unwrap().payload[..], b"accepted");
    let credit = commy_net::PUSH_CREDIT as usize;
    let mut got = 0;
    while got < credit {
        let m = s.next().await.unwrap().unwrap();
        assert_eq!(m.payload, format!("m{got}"));
        assert_eq!(m.metadata.len(), got % 3);
        got += 1;
    }
    // Without more credit nothing more comes.
    let more = tokio::time::timeout(Duration::from_millis(300), s.next()).await;
    assert!(more.is_err(), "a message beyond the credit: {more:?}");
    // The other calls of the connection are not held up meanwhile.
    f.still_serves().await;
    let r = c
        .call(
            Bytes::new(),
            Bytes::from_static(b"same connection"),
            in_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(&r.payload[..], b"same connection");
    while got < 1000 {
        s.grant(64);
        for _ in 0..64.min(1000 - got) {
            let m = s.next().await.unwrap().unwrap();
            assert_eq!(m.payload, format!("m{got}"));
            got += 1;
        }
    }
    assert!(s.next().await.is_none(), "the stream ends with END_STREAM");

    // A failed stream: its message, then the error, then the end.
    let mut s = c
        .subscribe(Bytes::new(), Bytes::from_static(b"sub:fail"), in_secs(5))
        .await
        .unwrap();
    assert_eq!(&s.next().await.unwrap().unwrap().payload[..], b"one");
    let e = s.next().await.unwrap().unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, "gone"));
    assert!(s.next().await.is_none());

    // A refused one: an Error instead of the accepting Response.
    let e = c
        .subscribe(Bytes::new(), Bytes::from_static(b"fail"), in_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Dropping the stream cancels it at the server.
    let s = c
        .subscribe(Bytes::new(), Bytes::from_static(b"sub:wait"), in_secs(5))
        .await
        .unwrap();
    drop(s);
    wait_until(|| f.dropped.load(Ordering::SeqCst) == 1, "the push to end").await;
}

/// A server that drains ends its push streams at once (a Publish with
/// END_STREAM), instead of waiting for them until its drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_ends_its_push_streams() {
    let mut settings = quick();
    settings.drain_timeout = Duration::from_secs(30);
    let f = Fixture::start("push-drain", settings, false).await;
    let c = f.client();
    let mut s = c
        .subscribe(Bytes::new(), Bytes::from_static(b"sub:wait"), in_secs(5))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let Fixture { server, .. } = f;
    let shutdown = tokio::spawn(server.shutdown());
    assert!(s.next().await.is_none(), "the stream ends");
    shutdown.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
