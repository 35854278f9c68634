//! Publish/subscribe with real subscriber processes, queue groups and the
//! slow-subscriber policies.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use commy_mesh::{Mesh, SlowSubscriber, SubscribeOptions};

mod support;

const ROLE: &str = "COMMY_PUBSUB_TEST_ROLE";
const DIR: &str = "COMMY_PUBSUB_TEST_DIR";
const GROUP: &str = "COMMY_PUBSUB_TEST_GROUP";

fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// Plays this process's child role, if it is one: a test that needs a
/// child re-runs itself under its own name with the role set, and hands
/// the child over here first.
fn as_child() -> bool {
    support::play_role(role().is_some(), || {
        child_subscriber();
    })
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
/// print a line per message as it arrives (`S <seq>` for an 8-byte
/// sequence number, `P` for anything else, a probe) until its stdin
/// closes, or the subscription ends (then `ENDED <dropped> <reason>`);
/// then `DONE` after whatever was queued by then.
fn child_subscriber() {
    use std::io::Write;
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
        let print = |m: &commy_mesh::Message| {
            let mut out = std::io::stdout().lock();
            match <[u8; 8]>::try_from(&m.payload()[..]) {
                Ok(seq) => writeln!(out, "S {}", u64::from_le_bytes(seq)).unwrap(),
                Err(_) => writeln!(out, "P").unwrap(),
            }
            out.flush().unwrap();
        };
        println!("\nREADY");
        // The test closes our stdin once it has every message it expects.
        let mut stdin_closed = tokio::task::spawn_blocking(|| std::io::stdin().lines().count());
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(m) => print(&m),
                    None => {
                        let reason = sub.end_reason().map(|r| r.to_string()).unwrap_or_default();
                        println!("ENDED {} {reason}", sub.dropped());
                        break;
                    }
                },
                _ = &mut stdin_closed => break,
            }
        }
        // What is queued already (a zero timeout still polls once).
        while let Ok(Some(m)) = tokio::time::timeout(Duration::ZERO, sub.next()).await {
            print(&m);
        }
        println!("DONE");
    });
}

/// A subscriber process: its stdin (closing it ends the process) and the
/// lines it printed, read on a thread of their own.
struct Sub {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn spawn_sub(dir: &Path, group: Option<&str>) -> Sub {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        &support::this_test(),
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, "sub")
    .env(DIR, dir)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(g) = group {
        cmd.env(GROUP, g);
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let sub = Sub { child, lines };
    sub.until(|line| line == "READY");
    sub
}

/// How long a subscriber may stay silent while the test waits for a line.
const SILENCE: Duration = Duration::from_secs(60);

impl Sub {
    /// Reads lines until `done` says so; each line read is returned.
    fn until(&self, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
        let mut read = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(SILENCE)
                .expect("the subscriber went silent or exited");
            let stop = done(&line);
            read.push(line);
            if stop {
                return read;
            }
        }
    }

    /// Lines read so far without waiting.
    fn ready_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Closes its stdin and returns the sequence numbers of the lines left
    /// up to `DONE`.
    fn finish(mut self) -> Vec<u64> {
        drop(self.child.stdin.take());
        let rest = self.until(|line| line == "DONE");
        assert!(self.child.wait().unwrap().success());
        seqs(&rest)
    }
}

/// The sequence numbers among `lines`.
fn seqs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("S ").map(|s| s.parse().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_subscribers_each_get_every_message_in_order() {
    if as_child() {
        return;
    }
    let dir = private_dir("fanout");
    let subs: Vec<Sub> = (0..4).map(|_| spawn_sub(&dir, None)).collect();
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
    let last = format!("S {}", N - 1);
    for sub in subs {
        let mut got = seqs(&sub.until(|line| line == last));
        got.extend(sub.finish());
        assert_eq!(got, expected, "a subscriber missed or reordered messages");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_of_three_handles_each_message_exactly_once() {
    if as_child() {
        return;
    }
    let dir = private_dir("group");
    let subs: Vec<Sub> = (0..3).map(|_| spawn_sub(&dir, Some("workers"))).collect();
    let mesh = open(&dir).await;
    // Probes until every member has had one: the publisher sees all three.
    let mut probed = [false; 3];
    let mut tries = 0;
    while !probed.iter().all(|&p| p) {
        tries += 1;
        assert!(tries < 5000, "the group's members never all became visible");
        mesh.publish("ticks", &b"probe"[..]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        for (sub, probed) in subs.iter().zip(&mut probed) {
            *probed |= sub.ready_lines().iter().any(|l| l == "P");
        }
    }
    const N: u64 = 6_000;
    for seq in 0..N {
        assert_eq!(
            mesh.publish("ticks", seq.to_le_bytes().to_vec())
                .await
                .unwrap(),
            1
        );
    }
    // Read until the members have N messages between them, then stop them
    // (what they still had queued comes with DONE).
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); 3];
    let t = std::time::Instant::now();
    while got.iter().map(Vec::len).sum::<usize>() < N as usize {
        assert!(
            t.elapsed() < SILENCE,
            "the group handled {} of {N}",
            got.iter().map(Vec::len).sum::<usize>()
        );
        for (sub, got) in subs.iter().zip(&mut got) {
            got.extend(seqs(&sub.ready_lines()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut all = Vec::new();
    let mut members_used = 0;
    for (sub, mut seqs) in subs.into_iter().zip(got) {
        seqs.extend(sub.finish());
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
async fn publish_many_reaches_each_subscriber_in_order_and_each_group_once() {
    if as_child() {
        return;
    }
    let dir = private_dir("many");
    let plain: Vec<Sub> = (0..2).map(|_| spawn_sub(&dir, None)).collect();
    let group: Vec<Sub> = (0..2).map(|_| spawn_sub(&dir, Some("workers"))).collect();
    let mesh = open(&dir).await;
    // Two plain subscribers and one group.
    mesh.wait_for_subscribers("ticks", 3, SILENCE)
        .await
        .unwrap();
    const N: u64 = 20_000;
    let mut seq = 0;
    let mut batch = 0;
    while seq < N {
        // Batches of 1 to 97 messages, and single publishes between them.
        batch = (batch * 7 + 13) % 97 + 1;
        let end = (seq + batch).min(N);
        let payloads: Vec<Bytes> = (seq..end)
            .map(|s| Bytes::copy_from_slice(&s.to_le_bytes()))
            .collect();
        let delivered = if payloads.len().is_multiple_of(5) {
            let mut n = 0;
            for p in &payloads {
                n += mesh.publish("ticks", p.clone()).await.unwrap();
            }
            n
        } else {
            mesh.publish_many("ticks", &payloads).await.unwrap()
        };
        assert_eq!(delivered, payloads.len() * 3, "messages {seq}..{end}");
        seq = end;
    }
    assert_eq!(mesh.publish_many("ticks", &[]).await.unwrap(), 0);
    let expected: Vec<u64> = (0..N).collect();
    let last = format!("S {}", N - 1);
    for sub in plain {
        let mut got = seqs(&sub.until(|line| line == last));
        got.extend(sub.finish());
        assert_eq!(got, expected, "a subscriber missed or reordered messages");
    }
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); 2];
    let t = std::time::Instant::now();
    while got.iter().map(Vec::len).sum::<usize>() < N as usize {
        assert!(t.elapsed() < SILENCE, "the group did not handle them all");
        for (sub, got) in group.iter().zip(&mut got) {
            got.extend(seqs(&sub.ready_lines()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut all = Vec::new();
    for (sub, mut seqs) in group.into_iter().zip(got) {
        seqs.extend(sub.finish());
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "out of order within a member"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, expected, "the group lost or repeated a message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_policies_are_applied_and_counted() {
    if as_child() {
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
    // The link threads hand what is left to the queues: wait for the
    // counts the policies must reach.
    let t = std::time::Instant::now();
    while drop_oldest.dropped() < 91 || disconnect.dropped() < 1 {
        assert!(
            t.elapsed() < SILENCE,
            "dropped {} and {}",
            drop_oldest.dropped(),
            disconnect.dropped()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
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
    if as_child() {
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

/// `wait_for_subscribers` counts what a publish would reach (plain
/// subscribers, one per queue group), `try_next` takes without waiting,
/// `next_timeout` waits at most its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_subscribers_and_taking_without_waiting() {
    use commy_mesh::Code;
    if as_child() {
        return;
    }
    let dir = private_dir("wait-subs");
    let mesh = open(&dir).await;
    let e = mesh
        .wait_for_subscribers("counted", 1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(e.message().contains("0 of 1 subscribers"), "{e}");
    let mut plain = mesh.subscribe("counted").await.unwrap();
    let _a = mesh.subscribe_group("counted", "workers").await.unwrap();
    let _b = mesh.subscribe_group("counted", "workers").await.unwrap();
    let _other = mesh.subscribe("not-counted").await.unwrap();
    let n = mesh
        .wait_for_subscribers("counted", 2, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(n, 2, "one plain subscriber and one queue group");
    assert_eq!(mesh.subscribers("counted").await.unwrap(), 2);
    assert_eq!(mesh.publish("counted", &b"m"[..]).await.unwrap(), 2);

    let e = mesh.subscribers("bad topic").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // The message is there, or arrives within the timeout.
    let m = mesh_message(&mut plain).await;
    assert_eq!(&m.payload()[..], b"m");
    assert!(plain.try_next().is_none(), "nothing else is queued");
    assert!(!plain.is_ended());
    let e = plain
        .next_timeout(Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    mesh.publish("counted", &b"n"[..]).await.unwrap();
    let m = plain.next_timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(&m.unwrap().payload()[..], b"n");
    drop(plain);
    let n = mesh.subscribers("counted").await.unwrap();
    assert!(n <= 2, "{n}");
}

/// The first message of `sub`, taken with `try_next` as soon as it is
/// there.
async fn mesh_message(sub: &mut commy_mesh::Subscription) -> commy_mesh::Message {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(m) = sub.try_next() {
            return m;
        }
        assert!(std::time::Instant::now() < end, "no message");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Block is backpressure while a subscriber makes progress: one stopped
/// (SIGSTOP) before the publisher first reached it is disconnected by the
/// publisher after the stall time, no publish waits much longer than that,
/// the other subscribers get every message in order, publishes stop
/// counting it, and the stopped one, once resumed, sees its subscription
/// end with the loss counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_stopped_before_it_was_reached_is_disconnected() {
    if as_child() {
        return;
    }
    stalled_subscriber("stall-early", 0).await;
}

/// The same, stopped mid-stream: once resumed it gets what reached it
/// before, in order with no gap, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_stopped_mid_stream_is_disconnected() {
    if as_child() {
        return;
    }
    stalled_subscriber("stall-mid", 100).await;
}

/// `count` subscriptions to "ticks" in this process, each read by a task
/// until it has `n` messages: the sequence numbers each got, in order.
async fn keeping_up(mesh: &Mesh, count: usize, n: u64) -> Vec<tokio::task::JoinHandle<Vec<u64>>> {
    let mut readers = Vec::new();
    for _ in 0..count {
        let mut sub = mesh.subscribe("ticks").await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while (got.len() as u64) < n {
                let m = sub.next().await.expect("the subscription lasts");
                got.push(u64::from_le_bytes(m.payload()[..8].try_into().unwrap()));
            }
            got
        }));
    }
    readers
}

/// A subscriber process killed with SIGKILL mid-stream, beside two that
/// keep up (reading their publishers' rings directly, policy `Block`):
/// the publisher goes on without an error, counting the dead one no more
/// once it noticed, and the others get every message in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_killed_mid_stream_costs_the_others_nothing() {
    if as_child() {
        return;
    }
    use rustix::process::{Pid, Signal, kill_process};
    const N: u64 = 20_000;
    const KILLED_AT: u64 = 1_000;
    let dir = private_dir("killed");
    let mesh = open(&dir).await;
    let mut victim = spawn_sub(&dir, None);
    let pid = Pid::from_raw(victim.child.id() as i32).unwrap();
    let readers = keeping_up(&mesh, 2, N).await;
    mesh.wait_for_subscribers("ticks", 3, SILENCE)
        .await
        .unwrap();
    let mut counts = Vec::new();
    for i in 0..N {
        if i == KILLED_AT {
            victim.until(|l| l == format!("S {}", KILLED_AT - 1));
            kill_process(pid, Signal::KILL).unwrap();
            victim.child.wait().unwrap();
        }
        counts.push(
            mesh.publish("ticks", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
        );
    }
    assert!(counts[..KILLED_AT as usize].iter().all(|n| *n == 3));
    assert!(
        counts[KILLED_AT as usize..]
            .iter()
            .all(|n| *n == 2 || *n == 3)
    );
    assert_eq!(
        *counts.last().unwrap(),
        2,
        "the dead subscriber is still counted"
    );
    for r in readers {
        assert_eq!(r.await.unwrap(), (0..N).collect::<Vec<_>>());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A subscriber process stopped after `before` messages, while 40,000
/// are published to it and two subscribers that keep up.
async fn stalled_subscriber(name: &str, before: u64) {
    use rustix::process::{Pid, Signal, kill_process};
    const N: u64 = 40_000;
    let dir = private_dir(name);
    let mesh = Mesh::builder()
        .runtime_dir(&dir)
        .setting("subscriber_stall", "500ms")
        .open()
        .await
        .unwrap();
    let stopped = spawn_sub(&dir, None);
    let pid = Pid::from_raw(stopped.child.id() as i32).unwrap();
    let readers = keeping_up(&mesh, 2, N).await;
    mesh.wait_for_subscribers("ticks", 3, Duration::from_secs(20))
        .await
        .unwrap();
    for i in 0..before {
        assert_eq!(
            mesh.publish("ticks", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
            3
        );
    }
    if before > 0 {
        stopped.until(|l| l == format!("S {}", before - 1));
    }
    kill_process(pid, Signal::STOP).unwrap();
    let mut longest = Duration::ZERO;
    let mut counts = Vec::new();
    for i in before..N {
        let t = std::time::Instant::now();
        counts.push(
            mesh.publish("ticks", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
        );
        longest = longest.max(t.elapsed());
    }
    kill_process(pid, Signal::CONT).unwrap();
    eprintln!("longest publish: {longest:?}");
    // The old behaviour: 5 s per publish that met the stopped subscriber.
    assert!(
        longest < Duration::from_secs(2),
        "a publish waited {longest:?}"
    );
    let cut = counts
        .iter()
        .position(|n| *n == 2)
        .expect("it was disconnected");
    assert!(
        counts[..cut].iter().all(|n| *n == 3),
        "{:?}",
        &counts[..cut]
    );
    assert!(
        counts[cut..].iter().all(|n| *n == 2),
        "counted after its disconnect"
    );
    for r in readers {
        assert_eq!(r.await.unwrap(), (0..N).collect::<Vec<_>>());
    }
    // Resumed: what reached it, in order with no gap, then the end.
    let lines = stopped.until(|l| l.starts_with("ENDED"));
    let got = seqs(&lines);
    assert_eq!(got, (before..before + got.len() as u64).collect::<Vec<_>>());
    assert!(before + (got.len() as u64) < N);
    let ended = lines.last().unwrap();
    let dropped: u64 = ended.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(dropped >= 1, "{ended}");
    assert!(ended.contains("stall time"), "{ended}");
    eprintln!("stopped subscriber: {} messages, then {ended}", got.len());
    stopped.finish();
}

/// A queue group member stopped before any publisher linked to it: a
/// pick that meets it is given the stall time, the member is cut, and the
/// message goes to another member; later messages never wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_member_stopped_before_it_was_reached_is_disconnected() {
    use rustix::process::{Pid, Signal, kill_process};
    if as_child() {
        return;
    }
    const N: u64 = 2_000;
    let dir = private_dir("stall-group");
    let mesh = Mesh::builder()
        .runtime_dir(&dir)
        .setting("subscriber_stall", "500ms")
        .open()
        .await
        .unwrap();
    let stopped = spawn_sub(&dir, Some("workers"));
    kill_process(
        Pid::from_raw(stopped.child.id() as i32).unwrap(),
        Signal::STOP,
    )
    .unwrap();
    let mut live = mesh.subscribe_group("ticks", "workers").await.unwrap();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while (got.len() as u64) < N {
            let m = live.next().await.expect("the subscription lasts");
            if let Ok(seq) = <[u8; 8]>::try_from(&m.payload()[..]) {
                got.push(u64::from_le_bytes(seq));
            }
        }
        got
    });
    let mut longest = Duration::ZERO;
    for i in 0..N {
        let t = std::time::Instant::now();
        let n = mesh
            .publish("ticks", i.to_le_bytes().to_vec())
            .await
            .unwrap();
        longest = longest.max(t.elapsed());
        assert_eq!(n, 1, "message {i} reached the group");
    }
    kill_process(
        Pid::from_raw(stopped.child.id() as i32).unwrap(),
        Signal::CONT,
    )
    .unwrap();
    eprintln!("longest publish: {longest:?}");
    assert!(
        longest < Duration::from_secs(3),
        "a publish waited {longest:?}"
    );
    assert_eq!(reader.await.unwrap(), (0..N).collect::<Vec<_>>());
    let lines = stopped.until(|l| l.starts_with("ENDED"));
    assert!(seqs(&lines).is_empty(), "{lines:?}");
    stopped.finish();
}

/// A queue group member stopped mid-stream (SIGSTOP), beside one that
/// keeps up: the pick that finds its ring full waits the stall time at
/// most, cuts it, and hands the message to the other member; every message
/// is handled exactly once, by one member or the other, and the stopped
/// one, resumed, takes what reached it and sees its subscription end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_member_stopped_mid_stream_is_disconnected() {
    use rustix::process::{Pid, Signal, kill_process};
    if as_child() {
        return;
    }
    const N: u64 = 40_000;
    const STOPPED_AT: u64 = 2_000;
    let dir = private_dir("stall-group-mid");
    let mesh = Mesh::builder()
        .runtime_dir(&dir)
        .setting("subscriber_stall", "500ms")
        .open()
        .await
        .unwrap();
    let stopped = spawn_sub(&dir, Some("workers"));
    let pid = Pid::from_raw(stopped.child.id() as i32).unwrap();
    let mut live = mesh.subscribe_group("ticks", "workers").await.unwrap();
    mesh.wait_for_subscribers("ticks", 1, SILENCE)
        .await
        .unwrap();
    // The live member reads until it has what the stopped one did not get
    // (known once that one is done).
    let (set_target, target) = tokio::sync::watch::channel(u64::MAX);
    let reader = tokio::spawn({
        async move {
            let mut got = Vec::new();
            let mut quiet = Duration::ZERO;
            while (got.len() as u64) < *target.borrow() {
                match live.next_timeout(Duration::from_millis(100)).await {
                    Ok(Some(m)) => {
                        got.push(u64::from_le_bytes(m.payload()[..8].try_into().unwrap()));
                        quiet = Duration::ZERO;
                    }
                    // Once the target is known, a long silence means that
                    // the rest is not coming: the check below names it.
                    _ if *target.borrow() != u64::MAX && quiet > SILENCE / 6 => {
                        break;
                    }
                    _ => quiet += Duration::from_millis(100),
                }
            }
            got
        }
    });
    let mut longest = Duration::ZERO;
    let mut theirs = Vec::new();
    for i in 0..N {
        if i == STOPPED_AT {
            // Both members have taken messages by now.
            theirs = seqs(&stopped.until(|l| l.starts_with("S ")));
            kill_process(pid, Signal::STOP).unwrap();
        }
        let t = std::time::Instant::now();
        let n = mesh
            .publish("ticks", i.to_le_bytes().to_vec())
            .await
            .unwrap();
        longest = longest.max(t.elapsed());
        assert_eq!(n, 1, "message {i} reached the group once");
    }
    kill_process(pid, Signal::CONT).unwrap();
    eprintln!("longest publish: {longest:?}");
    assert!(
        longest < Duration::from_secs(2),
        "a publish waited {longest:?}"
    );
    let lines = stopped.until(|l| l.starts_with("ENDED"));
    let ended = lines.last().unwrap().clone();
    assert!(ended.contains("stall time"), "{ended}");
    // The group lost nothing: the member's count says so.
    assert!(ended.starts_with("ENDED 0 "), "{ended}");
    assert!(ended.contains("another member of group workers"), "{ended}");
    theirs.extend(seqs(&lines));
    theirs.extend(stopped.finish());
    assert!(
        theirs.windows(2).all(|w| w[0] < w[1]),
        "out of order within the stopped member"
    );
    set_target.send_replace(N - theirs.len() as u64);
    let ours = reader.await.unwrap();
    assert!(ours.windows(2).all(|w| w[0] < w[1]), "out of order");
    let mut all: Vec<u64> = theirs.iter().chain(&ours).copied().collect();
    all.sort_unstable();
    let twice: Vec<u64> = all
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    all.dedup();
    let lost: Vec<u64> = (0..N).filter(|i| all.binary_search(i).is_err()).collect();
    assert!(
        lost.is_empty() && twice.is_empty(),
        "lost {lost:?}, handled twice {twice:?}"
    );
    eprintln!(
        "stopped member: {} messages, then {ended}; live member: {}",
        theirs.len(),
        ours.len()
    );
}

/// Under `DropOldest` both sides see the loss: two publishers overrun a
/// subscriber's queue of 16; what it received and what it dropped add up
/// to what was published, and what each publisher is told its subscribers
/// dropped adds up to the subscriber's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_counts_agree_on_both_sides() {
    if as_child() {
        return;
    }
    const N: u64 = 500;
    let dir = private_dir("drop-counts");
    let (a, b, subscriber) = (open(&dir).await, open(&dir).await, open(&dir).await);
    let mut sub = subscriber
        .subscribe_with(
            "counted/drops",
            None,
            SubscribeOptions::default()
                .queue(16)
                .policy(SlowSubscriber::DropOldest),
        )
        .await
        .unwrap();
    for publisher in [&a, &b] {
        publisher
            .wait_for_subscribers("counted/drops", 1, SILENCE)
            .await
            .unwrap();
        assert_eq!(
            publisher.dropped_by_subscribers("counted/drops").unwrap(),
            0
        );
    }
    for i in 0..N {
        assert_eq!(
            a.publish("counted/drops", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
            1
        );
    }
    for i in N..2 * N {
        assert_eq!(
            b.publish("counted/drops", i.to_le_bytes().to_vec())
                .await
                .unwrap(),
            1
        );
    }
    // The link threads move what is in the rings into the queue: with
    // nobody reading, all but the last 16 are dropped.
    let t = std::time::Instant::now();
    while sub.dropped() < 2 * N - 16 {
        assert!(t.elapsed() < SILENCE, "{} dropped", sub.dropped());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut received = 0;
    while received + sub.dropped() < 2 * N {
        assert!(
            t.elapsed() < SILENCE,
            "{received} received, {} dropped",
            sub.dropped()
        );
        match sub.try_next() {
            Some(_) => received += 1,
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    assert_eq!((received, sub.dropped()), (16, 2 * N - 16));
    let (by_a, by_b) = (
        a.dropped_by_subscribers("counted/drops").unwrap(),
        b.dropped_by_subscribers("counted/drops").unwrap(),
    );
    assert_eq!(by_a + by_b, sub.dropped(), "a: {by_a}, b: {by_b}");
    assert!(by_a > 0 && by_b > 0, "a: {by_a}, b: {by_b}");
    assert_eq!(a.dropped_by_subscribers("other/topic").unwrap(), 0);
    let e = a.dropped_by_subscribers("bad topic").unwrap_err();
    assert_eq!(e.code(), commy_mesh::Code::InvalidArgument);
}

/// `next_batch` lends messages out in place, in order, up to its maximum
/// at a time, under every policy; `try_next_batch` does not wait; an ended
/// subscription's batch is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_batch_lends_messages_in_order_under_every_policy() {
    if as_child() {
        return;
    }
    const N: u64 = 5_000;
    let dir = private_dir("batch");
    let mesh = open(&dir).await;
    let mut subs = Vec::new();
    for policy in [
        SlowSubscriber::Block,
        SlowSubscriber::DropOldest,
        SlowSubscriber::Disconnect,
    ] {
        let options = SubscribeOptions::default().queue(N as usize).policy(policy);
        subs.push(mesh.subscribe_with("batched", None, options).await.unwrap());
    }
    mesh.wait_for_subscribers("batched", 3, SILENCE)
        .await
        .unwrap();
    for sub in &mut subs {
        assert_eq!(
            sub.try_next_batch(16, |_| panic!("nothing was published")),
            0
        );
    }
    let all: Vec<Bytes> = (0..N)
        .map(|i| Bytes::from(i.to_le_bytes().to_vec()))
        .collect();
    for chunk in all.chunks(97) {
        assert_eq!(
            mesh.publish_many("batched", chunk).await.unwrap(),
            3 * chunk.len()
        );
    }
    for sub in &mut subs {
        let mut got = Vec::new();
        let mut most = 0;
        while (got.len() as u64) < N {
            let n = sub
                .next_batch(16, |m| {
                    assert_eq!(m.topic().as_str(), "batched");
                    assert!(m.metadata().is_empty());
                    got.push(u64::from_le_bytes(m.payload().try_into().unwrap()));
                })
                .await;
            assert!((1..=16).contains(&n), "a batch of {n}");
            most = most.max(n);
        }
        assert_eq!(got, (0..N).collect::<Vec<_>>());
        assert_eq!(most, 16, "batches stay small when messages wait");
        assert_eq!(sub.try_next_batch(16, |_| panic!("all were taken")), 0);
    }
    // An owned copy outlives the batch.
    mesh.publish("batched", Bytes::from_static(b"kept"))
        .await
        .unwrap();
    let mut kept = None;
    subs[0].next_batch(1, |m| kept = Some(m.to_message())).await;
    assert_eq!(&kept.unwrap().payload()[..], b"kept");
}

/// `publish_in_place` builds each message in the first subscriber's ring:
/// every plain subscriber gets every message, in order, with the length
/// the writer returned, and a queue group one copy of each; a message
/// larger than a ring record, or one to a subscriber not linked yet, goes
/// through an ordinary buffer with the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_in_place_reaches_every_subscriber_in_order() {
    if as_child() {
        return;
    }
    const N: usize = 2_000;
    const BIG: usize = N / 2;
    fn size(i: usize) -> usize {
        if i == BIG { 3 << 20 } else { i % 300 }
    }
    fn body(i: usize) -> Vec<u8> {
        (0..size(i)).map(|k| (i + k) as u8).collect()
    }
    let dir = private_dir("in-place");
    let mesh = open(&dir).await;
    let mut readers = Vec::new();
    for group in [None, None, Some("workers")] {
        let mut sub = match group {
            Some(g) => mesh.subscribe_group("built", g).await.unwrap(),
            None => mesh.subscribe("built").await.unwrap(),
        };
        readers.push(tokio::spawn(async move {
            for i in 0..N {
                let m = sub.next().await.unwrap();
                assert_eq!(m.payload().len(), size(i), "message {i}");
                assert!(m.payload()[..] == body(i)[..], "message {i}");
            }
            sub
        }));
    }
    mesh.wait_for_subscribers("built", 3, SILENCE)
        .await
        .unwrap();
    for i in 0..N {
        let delivered = mesh
            .publish_in_place("built", size(i) + 16, |buf| {
                assert!(buf.iter().all(|b| *b == 0), "the buffer comes zeroed");
                buf[..size(i)].copy_from_slice(&body(i));
                size(i)
            })
            .await
            .unwrap();
        assert_eq!(delivered, 3, "message {i}");
    }
    let mut subs = Vec::new();
    for r in readers {
        subs.push(r.await.unwrap());
    }
    // A length past the buffer is cut to it.
    mesh.publish_in_place("built", 4, |buf| {
        buf.fill(1);
        100
    })
    .await
    .unwrap();
    assert_eq!(&subs[0].next().await.unwrap().payload()[..], &[1, 1, 1, 1]);
    // A subscriber this publisher has not linked to yet: the buffer's way.
    let mut late = mesh.subscribe("built").await.unwrap();
    mesh.wait_for_subscribers("built", 4, SILENCE)
        .await
        .unwrap();
    let n = mesh
        .publish_in_place("built", 3, |buf| {
            buf.copy_from_slice(b"new");
            3
        })
        .await
        .unwrap();
    assert_eq!(n, 4);
    assert_eq!(&late.next().await.unwrap().payload()[..], b"new");
    assert_eq!(
        mesh.publish_in_place("nobody/here", 8, |_| 8)
            .await
            .unwrap(),
        0
    );
}

/// A `Publisher` goes where `mesh.publish` goes while subscribers come and
/// go: the links it keeps are found again when the topic's subscribers
/// change, queue groups take one copy, and a closed mesh or a bad topic
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_follows_subscribers_as_they_come_and_go() {
    use commy_mesh::Code;
    if as_child() {
        return;
    }
    let dir = private_dir("publisher");
    let mesh = open(&dir).await;
    let mut feed = mesh.publisher("feed").unwrap();
    assert_eq!(feed.topic().as_str(), "feed");
    assert_eq!(feed.publish(b"nobody").await.unwrap(), 0);
    let payload = |m: commy_mesh::Message| m.into_payload();
    let mut a = mesh.subscribe("feed").await.unwrap();
    mesh.wait_for_subscribers("feed", 1, SILENCE).await.unwrap();
    assert_eq!(feed.publish(b"1").await.unwrap(), 1);
    assert_eq!(payload(a.next().await.unwrap()), &b"1"[..]);
    // A queue group member: one copy per message for the group.
    let mut worker = mesh.subscribe_group("feed", "workers").await.unwrap();
    mesh.wait_for_subscribers("feed", 2, SILENCE).await.unwrap();
    assert_eq!(feed.publish_many(&[b"2", b"3"]).await.unwrap(), 4);
    for want in [b"2", b"3"] {
        assert_eq!(payload(a.next().await.unwrap()), &want[..]);
        assert_eq!(payload(worker.next().await.unwrap()), &want[..]);
    }
    // A subscriber that comes after the publisher found its links.
    let mut b = mesh.subscribe("feed").await.unwrap();
    mesh.wait_for_subscribers("feed", 3, SILENCE).await.unwrap();
    assert_eq!(feed.publish(vec![4u8]).await.unwrap(), 3);
    assert_eq!(payload(a.next().await.unwrap()), &[4u8][..]);
    assert_eq!(payload(b.next().await.unwrap()), &[4u8][..]);
    assert_eq!(payload(worker.next().await.unwrap()), &[4u8][..]);
    // One that leaves is no longer counted.
    drop(a);
    let gone = tokio::time::timeout(SILENCE, async {
        loop {
            if feed.publish(b"probe").await.unwrap() == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    gone.await
        .expect("the publisher still counts a subscriber that left");
    // A clone publishes on the same topic with links of its own.
    let mut other = feed.clone();
    assert_eq!(other.publish(b"5").await.unwrap(), 2);
    for sub in [&mut b, &mut worker] {
        loop {
            let m = payload(sub.next().await.unwrap());
            if m != b"probe"[..] {
                assert_eq!(m, &b"5"[..]);
                break;
            }
        }
    }
    let e = mesh.publisher("bad topic").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    mesh.close().await;
    let e = feed.publish(b"late").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

/// A dense stream reaches a subscriber that lingers (the default) and one
/// that never does, every message in order: the wait only gathers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dense_stream_arrives_whole_with_and_without_lingering() {
    if as_child() {
        return;
    }
    const N: u64 = 200_000;
    let dir = private_dir("linger");
    let mesh = open(&dir).await;
    let mut readers = Vec::new();
    for linger in [None, Some(Duration::ZERO), Some(Duration::from_micros(20))] {
        let options = match linger {
            Some(l) => SubscribeOptions::default().linger(l),
            None => SubscribeOptions::default(),
        };
        let mut sub = mesh.subscribe_with("dense", None, options).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut next = 0u64;
            while next < N {
                sub.next_batch(256, |m| {
                    let seq = u64::from_le_bytes(m.payload().try_into().unwrap());
                    assert_eq!(seq, next, "linger {linger:?}: out of order");
                    next += 1;
                })
                .await;
            }
        }));
    }
    mesh.wait_for_subscribers("dense", 3, SILENCE)
        .await
        .unwrap();
    let mut publisher = mesh.publisher("dense").unwrap();
    for i in 0..N {
        assert_eq!(publisher.publish(i.to_le_bytes()).await.unwrap(), 3);
    }
    for r in readers {
        r.await.unwrap();
    }
}
