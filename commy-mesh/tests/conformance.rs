//! docs/PROTOCOL.md against a live Commy server over TLS, with frames
//! built by hand from the test vectors (`docs/protocol/vectors.json`),
//! not through commy-net's client: every invalid vector gets the error the
//! vector names, on the stream or the link it names; a link error closes
//! the connection, a stream error leaves it serving. Valid requests from
//! the vectors, fragmented ones included, are answered.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use bytes::BytesMut;
use commy_core::{Frame, FrameFlags, FrameKind, Limits, Status, StreamId};
use commy_mesh::Mesh;
use serde_json::Value;
use support::{DIR, private_dir, ready_until_stdin_closes, role, run_child};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol/vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn frames_of(v: &Value) -> Vec<Vec<u8>> {
    v["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hex(h.as_str().unwrap()))
        .collect()
}

/// Child role: the test services over TLS on a port the system picks,
/// with the dev CA under the test's dir; says the port, then serves until
/// its stdin closes.
fn child_server() {
    if role().as_deref() != Some("server") {
        return;
    }
    let dir = std::path::PathBuf::from(std::env::var(DIR).unwrap());
    support::runtime().block_on(async {
        let mesh = Mesh::builder()
            .runtime_dir(dir.join("rt"))
            .listen("tls://127.0.0.1:0")
            .open()
            .await
            .unwrap();
        let _services = support::serve_test_services(&mesh).await;
        println!("PORT {}", mesh.tls_endpoint().unwrap().port());
        ready_until_stdin_closes().await;
    });
}

/// The server process and its TLS port.
struct Server {
    child: Child,
    _out: BufReader<std::process::ChildStdout>,
    port: u16,
}

impl Server {
    fn start(dir: &Path) -> Server {
        // The dev CA goes under the test's dir.
        let mut child =
            support::spawn_role_with("server", dir, "", &[("XDG_CONFIG_HOME", dir.as_os_str())]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut port = None;
        for line in (&mut out).lines() {
            let line = line.unwrap();
            if let Some(p) = line.split("PORT ").nth(1) {
                port = Some(p.trim().parse().unwrap());
            }
            if line.ends_with("READY") {
                break;
            }
        }
        Server {
            child,
            _out: out,
            port: port.expect("the server said its port"),
        }
    }

    /// A TLS connection (ALPN commy/1, the server verified against the dev
    /// CA) that speaks raw frames.
    async fn connect(&self, dir: &Path) -> TlsStream<TcpStream> {
        let ca = dir.join("commy").join("dev-ca").join("ca.pem");
        let config = commy_net::Credentials::from_pem_files(&ca, None)
            .unwrap()
            .client_config()
            .unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Reads frames until `done` says so (true) or the server closes the
/// connection (false). Bytes read past the last frame taken stay in `buf`.
async fn read_until(
    s: &mut TlsStream<TcpStream>,
    buf: &mut BytesMut,
    got: &mut Vec<Frame>,
    mut done: impl FnMut(&[Frame]) -> bool,
) -> bool {
    loop {
        while let Some(f) = Frame::decode_from(buf, &Limits::DEFAULT).unwrap() {
            got.push(f);
            if done(got) {
                return true;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read_buf(buf))
            .await
            .expect("the server neither answered nor closed")
            .unwrap_or(0);
        if n == 0 {
            return false;
        }
    }
}

fn error_on(frames: &[Frame], stream: u64) -> Option<Status> {
    frames
        .iter()
        .find(|f| f.kind() == FrameKind::Error && f.stream_id() == StreamId(stream))
        .map(|f| f.status().unwrap().unwrap())
}

fn ping(payload: &[u8]) -> Vec<u8> {
    Frame::new(FrameKind::Ping, StreamId(0), Vec::new(), payload.to_vec())
        .unwrap()
        .to_vec()
}

fn ponged(frames: &[Frame], payload: &[u8]) -> bool {
    frames
        .iter()
        .any(|f| f.kind() == FrameKind::Pong && &f.payload()[..] == payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_vector_gets_the_specified_error() {
    if run_child(child_server) {
        return;
    }
    let dir = private_dir("conformance-invalid");
    let server = Server::start(&dir);
    let v = vectors();
    let invalid = v["invalid"].as_array().unwrap();
    let mut checked = 0;
    for vector in invalid {
        let name = vector["name"].as_str().unwrap();
        let code = vector["code"].as_str().unwrap();
        let says = vector["says"].as_str().unwrap();
        let mut s = server.connect(&dir).await;
        for f in frames_of(vector) {
            s.write_all(&f).await.unwrap();
        }
        let (mut got, mut buf) = (Vec::new(), BytesMut::new());
        match vector["scope"].as_str().unwrap() {
            "link" => {
                // An Error on stream 0, then the close.
                s.flush().await.unwrap();
                let open = read_until(&mut s, &mut buf, &mut got, |_| false).await;
                assert!(!open);
                let status =
                    error_on(&got, 0).unwrap_or_else(|| panic!("{name}: no link error in {got:?}"));
                assert_eq!(status.code().as_str(), code, "{name}: {status}");
                assert!(status.message().contains(says), "{name}: {status}");
            }
            "stream" => {
                // An Error on the stream, and the connection still answers
                // a ping.
                let stream = vector["stream_id"].as_u64().unwrap();
                s.write_all(&ping(b"alive")).await.unwrap();
                s.flush().await.unwrap();
                let open = read_until(&mut s, &mut buf, &mut got, |fs| {
                    ponged(fs, b"alive") && error_on(fs, stream).is_some()
                })
                .await;
                assert!(open, "{name}: the server closed the connection: {got:?}");
                let status = error_on(&got, stream).unwrap();
                assert_eq!(status.code().as_str(), code, "{name}: {status}");
                assert!(status.message().contains(says), "{name}: {status}");
            }
            other => panic!("{name}: unknown scope {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, invalid.len());
    println!("{checked} invalid vectors checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_requests_of_the_vectors_are_answered() {
    if run_child(child_server) {
        return;
    }
    let dir = private_dir("conformance-valid");
    let server = Server::start(&dir);
    let v = vectors();
    let named = |list: &str, name: &str| {
        v[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("vector {name}"))
            .clone()
    };
    let request = named("frames", "request-to-a-service");
    let one_way = named("frames", "one-way");
    let fragmented = named("messages", "fragmented-request");
    let mut s = server.connect(&dir).await;
    s.write_all(&hex(request["hex"].as_str().unwrap()))
        .await
        .unwrap();
    s.write_all(&hex(one_way["hex"].as_str().unwrap()))
        .await
        .unwrap();
    for f in frames_of(&fragmented) {
        s.write_all(&f).await.unwrap();
    }
    s.write_all(&ping(b"end")).await.unwrap();
    s.flush().await.unwrap();
    let ended = |fs: &[Frame], id: u64| {
        fs.iter().any(|f| {
            f.stream_id() == StreamId(id) && f.header().flags.contains(FrameFlags::END_STREAM)
        })
    };
    let (mut got, mut buf) = (Vec::new(), BytesMut::new());
    let open = read_until(&mut s, &mut buf, &mut got, |fs| {
        ended(fs, 7) && ended(fs, 15) && ponged(fs, b"end")
    })
    .await;
    assert!(open, "{got:?}");
    let answer = |id: u64| -> Vec<u8> {
        got.iter()
            .filter(|f| f.stream_id() == StreamId(id))
            .inspect(|f| assert_eq!(f.kind(), FrameKind::Response, "{f:?}"))
            .flat_map(|f| f.payload().to_vec())
            .collect()
    };
    let frame = &request["frame"];
    assert_eq!(answer(7), hex(frame["payload_hex"].as_str().unwrap()));
    let message = &fragmented["message"];
    assert_eq!(answer(15), hex(message["payload_hex"].as_str().unwrap()));
    assert!(answer(9).is_empty(), "a one-way is never answered");
}

/// The subscribe exchange of docs/PROTOCOL.md 10.2, by hand: the
/// vectors' subscribe request is accepted by a Response that keeps the
/// stream open; a message published through `commy.publish` on the same
/// connection follows on the stream as a Publish; after a Cancel nothing
/// more comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_subscribes_on_its_own_connection() {
    if run_child(child_server) {
        return;
    }
    /// The spec's FNV-1a 64.
    fn fnv(b: &[u8]) -> u64 {
        b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
        })
    }
    // Short: the subscription's socket path under it is long.
    let dir = private_dir("csub");
    let server = Server::start(&dir);
    let v = vectors();
    let subscribe = v["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "subscribe")
        .unwrap()
        .clone();
    let publish = |id: u64, text: &[u8]| {
        let mut md = commy_core::Metadata::default();
        md.add_header("commy-service", b"commy.publish".to_vec());
        md.add_header("commy-topic", b"news".to_vec());
        md.add_header(
            "commy-topic-key",
            format!("{:012x}", fnv(b"news") >> 16).into_bytes(),
        );
        Frame::new(FrameKind::Request, StreamId(id), md.encode(), text.to_vec())
            .unwrap()
            .with_flags(FrameFlags::END_STREAM)
            .to_vec()
    };
    let mut s = server.connect(&dir).await;
    s.write_all(&hex(subscribe["hex"].as_str().unwrap()))
        .await
        .unwrap();
    s.flush().await.unwrap();
    let on = |fs: &[Frame], id: u64, kind: FrameKind| {
        fs.iter()
            .filter(|f| f.stream_id() == StreamId(id) && f.kind() == kind)
            .count()
    };
    let (mut got, mut buf) = (Vec::new(), BytesMut::new());
    let open = read_until(&mut s, &mut buf, &mut got, |fs| {
        on(fs, 17, FrameKind::Response) == 1
    })
    .await;
    assert!(open, "{got:?}");
    let accepted = got.iter().find(|f| f.stream_id() == StreamId(17)).unwrap();
    assert!(
        !accepted.header().flags.contains(FrameFlags::END_STREAM),
        "the accepting Response keeps the stream open"
    );
    s.write_all(&publish(19, b"first")).await.unwrap();
    s.flush().await.unwrap();
    assert!(
        read_until(&mut s, &mut buf, &mut got, |fs| on(
            fs,
            17,
            FrameKind::Publish
        ) == 1)
        .await
    );
    let message = got
        .iter()
        .find(|f| f.stream_id() == StreamId(17) && f.kind() == FrameKind::Publish)
        .unwrap();
    assert_eq!(&message.payload()[..], b"first");
    // Cancelled: a later message is acknowledged but not pushed.
    let cancel = Frame::new(FrameKind::Cancel, StreamId(17), Vec::new(), Vec::new()).unwrap();
    s.write_all(&cancel.to_vec()).await.unwrap();
    s.write_all(&publish(21, b"second")).await.unwrap();
    s.write_all(&ping(b"after")).await.unwrap();
    s.flush().await.unwrap();
    assert!(
        read_until(&mut s, &mut buf, &mut got, |fs| on(
            fs,
            21,
            FrameKind::Response
        ) == 1
            && ponged(fs, b"after"))
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&ping(b"later")).await.unwrap();
    s.flush().await.unwrap();
    assert!(read_until(&mut s, &mut buf, &mut got, |fs| ponged(fs, b"later")).await);
    assert_eq!(on(&got, 17, FrameKind::Publish), 1, "{got:?}");
}
