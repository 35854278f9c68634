//! Publish/subscribe with real subscriber processes, queue groups and the
//! slow-subscriber policies.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use commy_mesh::{Mesh, SlowSubscriber, SubscribeOptions};

const ROLE: &str = "COMMY_PUBSUB_TEST_ROLE";
const DIR: &str = "COMMY_PUBSUB_TEST_DIR";
const GROUP: &str = "COMMY_PUBSUB_TEST_GROUP";

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

fn private_dir(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = std::env::temp_dir().join(format!("cps-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

async fn open(dir: &Path) -> Mesh {
    Mesh::builder().runtime_dir(dir).open().await.unwrap()
}

/// Child role: subscribe to "ticks" (in GROUP if set), print READY, then
/// print every sequence number received until 1.5 s pass without a message.
#[test]
#[ignore = "child role, run by the tests of this file"]
fn child_subscriber() {
    if role().as_deref() != Some("sub") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mesh = open(Path::new(&std::env::var(DIR).unwrap())).await;
        let mut sub = match std::env::var(GROUP) {
            Ok(g) => mesh.subscribe_group("ticks", &g).await.unwrap(),
            Err(_) => mesh.subscribe("ticks").await.unwrap(),
        };
        println!("\nREADY");
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1500), sub.next()).await
        {
            if m.payload().len() == 8 {
                got.push(u64::from_le_bytes(m.payload()[..].try_into().unwrap()));
            }
        }
        let list: Vec<String> = got.iter().map(|s| s.to_string()).collect();
        println!("\nGOT {}", list.join(","));
    });
}

fn spawn_sub(dir: &Path, group: Option<&str>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "--ignored",
        "child_subscriber",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, "sub")
    .env(DIR, dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(g) = group {
        cmd.env(GROUP, g);
    }
    cmd.spawn().unwrap()
}

/// Waits for READY; returns the reader for the rest of the output.
fn ready(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "child exited before READY"
        );
        if line.trim() == "READY" {
            return reader;
        }
    }
}

fn got(reader: BufReader<std::process::ChildStdout>, mut child: Child) -> Vec<u64> {
    let mut seqs = None;
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("GOT ") {
            seqs = Some(
                rest.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().unwrap())
                    .collect(),
            );
        } else if line == "GOT" {
            seqs = Some(Vec::new());
        }
    }
    assert!(child.wait().unwrap().success());
    seqs.expect("the child printed no GOT line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_subscribers_each_get_every_message_in_order() {
    if role().is_some() {
        return;
    }
    let dir = private_dir("fanout");
    let mut children: Vec<Child> = (0..4).map(|_| spawn_sub(&dir, None)).collect();
    let readers: Vec<_> = children.iter_mut().map(ready).collect();
    let mesh = open(&dir).await;
    // Probes (not 8 bytes long) until all four subscribers are visible.
    let mut tries = 0;
    while mesh.publish("ticks", &b"probe"[..]).await.unwrap() < 4 {
        tries += 1;
        assert!(tries < 5000, "the subscribers never became visible");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    const N: u64 = 20_000;
    for seq in 0..N {
        assert_eq!(
            mesh.publish("ticks", seq.to_le_bytes().to_vec())
                .await
                .unwrap(),
            4
        );
    }
    let expected: Vec<u64> = (0..N).collect();
    for (reader, child) in readers.into_iter().zip(children) {
        assert_eq!(
            got(reader, child),
            expected,
            "a subscriber missed or reordered messages"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_of_three_handles_each_message_exactly_once() {
    if role().is_some() {
        return;
    }
    let dir = private_dir("group");
    let mut children: Vec<Child> = (0..3).map(|_| spawn_sub(&dir, Some("workers"))).collect();
    let readers: Vec<_> = children.iter_mut().map(ready).collect();
    let mesh = open(&dir).await;
    // Let the publisher's watches see all three members.
    let mut tries = 0;
    while mesh.publish("ticks", &b"probe"[..]).await.unwrap() < 1 {
        tries += 1;
        assert!(tries < 5000, "the group never became visible");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    const N: u64 = 6_000;
    for seq in 0..N {
        assert_eq!(
            mesh.publish("ticks", seq.to_le_bytes().to_vec())
                .await
                .unwrap(),
            1
        );
    }
    let mut all = Vec::new();
    let mut members_used = 0;
    for (reader, child) in readers.into_iter().zip(children) {
        let seqs = got(reader, child);
        // Each member sees its share in publication order.
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "out of order within a member"
        );
        if !seqs.is_empty() {
            members_used += 1;
        }
        all.extend(seqs);
    }
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), N as usize, "a message was handled twice or lost");
    assert_eq!(unique.len(), N as usize);
    assert!(members_used >= 2, "the group did not spread the work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_policies_are_applied_and_counted() {
    if role().is_some() {
        return;
    }
    let dir = private_dir("slow");
    let mesh = open(&dir).await;
    let drop_oldest = mesh
        .subscribe_with(
            "slow/t",
            None,
            SubscribeOptions::default()
                .queue(10)
                .policy(SlowSubscriber::DropOldest),
        )
        .await
        .unwrap();
    let mut disconnect = mesh
        .subscribe_with(
            "slow/t",
            None,
            SubscribeOptions::default()
                .queue(10)
                .policy(SlowSubscriber::Disconnect),
        )
        .await
        .unwrap();
    let mut block = mesh
        .subscribe_with(
            "slow/t",
            None,
            SubscribeOptions::default()
                .queue(10)
                .policy(SlowSubscriber::Block),
        )
        .await
        .unwrap();
    while mesh.publish("slow/t", &b"probe"[..]).await.unwrap() < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The blocking subscriber is drained concurrently; the others are not read.
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while n < 101 {
            block.next().await.unwrap();
            n += 1;
        }
        n
    });
    for i in 0..100u64 {
        mesh.publish("slow/t", i.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    // Block: nothing lost (1 probe + 100; more probes may have been sent
    // before all three were visible, so count at least 101).
    assert_eq!(reader.await.unwrap(), 101);
    // Give the link threads time to hand everything to the queues.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // DropOldest: the queue holds the newest 10; the rest were dropped.
    assert!(
        drop_oldest.dropped() >= 91,
        "dropped {}",
        drop_oldest.dropped()
    );
    // Disconnect: the subscription ended after 10 queued messages.
    assert!(disconnect.dropped() >= 1);
    let mut left = 0;
    while let Some(_m) = disconnect.next().await {
        left += 1;
    }
    assert_eq!(
        left, 10,
        "a disconnected subscription keeps what it had queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_no_subscriber_reaches_nobody_and_bad_topics_are_refused() {
    if role().is_some() {
        return;
    }
    let dir = private_dir("none");
    let mesh = open(&dir).await;
    assert_eq!(mesh.publish("nobody/listens", &b"x"[..]).await.unwrap(), 0);
    let e = mesh.publish("bad topic", &b"x"[..]).await.unwrap_err();
    assert_eq!(e.code(), commy_mesh::Code::InvalidArgument);
    let e = mesh.subscribe_group("t", "bad group").await.unwrap_err();
    assert_eq!(e.code(), commy_mesh::Code::InvalidArgument);
}
