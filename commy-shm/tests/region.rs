//! Named regions, exercised with real processes: the test binary re-runs
//! itself (`--exact <test>`) with an environment variable naming the child
//! role, so races, crashes (`SIGKILL`) and permission checks involve separate
//! processes, real files and real shared memory.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use commy_shm::{
    REGION_LAYOUT_VERSION, REGION_MAGIC, REGION_NAME_MAX, Region, RegionAccessError,
    RegionHeaderError, RegionNameError, RegionOpenError, RegionOptions, sweep_regions,
    validate_region_name,
};

const ROLE_ENV: &str = "COMMY_REGION_TEST_ROLE";
const DIR_ENV: &str = "COMMY_REGION_TEST_DIR";
const ARG_ENV: &str = "COMMY_REGION_TEST_ARG";
/// Prefix of the lines children report on (libtest prints its own lines too).
const MARK: &str = "@@ ";
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A scratch directory removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!(
            "commy-region-{tag}-{}-{}",
            std::process::id(),
            unix_nanos()
        ));
        fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn opts(&self, name: &str) -> RegionOptions {
        RegionOptions::new(name).dir(&self.0)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What a child process was started to do.
struct Role {
    name: String,
    dir: PathBuf,
    arg: String,
}

impl Role {
    /// The role of this process, if it is a child started by [`spawn`].
    fn current() -> Option<Role> {
        Some(Role {
            name: std::env::var(ROLE_ENV).ok()?,
            dir: PathBuf::from(std::env::var_os(DIR_ENV)?),
            arg: std::env::var(ARG_ENV).unwrap_or_default(),
        })
    }

    fn opts(&self, name: &str) -> RegionOptions {
        RegionOptions::new(name).dir(&self.dir)
    }
}

/// Reports a line to the parent.
fn report(msg: impl std::fmt::Display) {
    println!("{MARK}{msg}");
}

struct Proc {
    child: std::process::Child,
    lines: Receiver<String>,
}

fn spawn(test: &str, role: &str, dir: &Path, arg: &str) -> Proc {
    spawn_with(test, role, dir, arg, |_| {})
}

fn spawn_with(
    test: &str,
    role: &str,
    dir: &Path,
    arg: &str,
    configure: impl FnOnce(&mut Command),
) -> Proc {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE_ENV, role)
        .env(DIR_ENV, dir)
        .env(ARG_ENV, arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    configure(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(msg) = line.strip_prefix(MARK)
                && tx.send(msg.to_owned()).is_err()
            {
                break;
            }
        }
    });
    Proc { child, lines }
}

impl Proc {
    /// The next reported line; panics if none arrives in time.
    fn next_line(&self) -> String {
        match self.lines.recv_timeout(CHILD_DEADLINE) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!("child reported nothing in time"),
            Err(RecvTimeoutError::Disconnected) => panic!("child exited without reporting"),
        }
    }

    /// Waits for a successful exit and returns the remaining reported lines.
    fn finish(mut self) -> Vec<String> {
        let deadline = Instant::now() + CHILD_DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("child did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "child failed: {status}");
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
        lines
    }

    /// SIGKILL, then reap.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Sleeps until the wall-clock instant `at` (ns since the epoch), so that
/// children started one after another act at the same moment.
fn wait_until(at: u128) {
    loop {
        let now = unix_nanos();
        if now >= at {
            return;
        }
        let left = at - now;
        if left > 2_000_000 {
            std::thread::sleep(Duration::from_nanos((left - 1_000_000) as u64));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Overwrites bytes of a region file, as a misbehaving process would.
fn scribble(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// The byte at absolute data offset `pos` when every word holds `value`.
fn pattern_byte(value: u64, pos: usize) -> u8 {
    value.to_ne_bytes()[pos % 8]
}

/// Checks that `bytes`, read from data offset `offset`, come from a single
/// write of the "every word = counter" pattern; returns the counter.
fn uniform_value(offset: usize, bytes: &[u8]) -> Option<u64> {
    // Find the counter from the first whole word in the slice.
    let first_word = offset.next_multiple_of(8) - offset;
    let value = u64::from_ne_bytes(bytes.get(first_word..first_word + 8)?.try_into().ok()?);
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern_byte(value, offset + i))
        .then_some(value)
}

// ---------------------------------------------------------------------------
// (a) racing create
// ---------------------------------------------------------------------------

#[test]
fn racing_create_has_exactly_one_winner() {
    if let Some(role) = Role::current() {
        wait_until(role.arg.parse().unwrap());
        let res = role
            .opts("race")
            .size(4096)
            .ttl(Duration::from_secs(60))
            .create();
        match res {
            Ok(r) => report(format!("created {}", r.generation())),
            Err(RegionOpenError::AlreadyExists { .. }) => report("exists"),
            Err(e) => report(format!("error {e}")),
        }
        return;
    }
    let dir = TestDir::new("race");
    let start = unix_nanos() + 500_000_000;
    let procs: Vec<Proc> = (0..8)
        .map(|_| {
            spawn(
                "racing_create_has_exactly_one_winner",
                "create",
                dir.path(),
                &start.to_string(),
            )
        })
        .collect();
    let outcomes: Vec<String> = procs.into_iter().flat_map(Proc::finish).collect();
    assert_eq!(outcomes.len(), 8, "{outcomes:?}");
    let winners: Vec<&String> = outcomes
        .iter()
        .filter(|o| o.starts_with("created "))
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert_eq!(
        outcomes.iter().filter(|o| *o == "exists").count(),
        7,
        "{outcomes:?}"
    );
    let r = dir.opts("race").open().unwrap();
    assert_eq!(winners[0], &format!("created {}", r.generation()));
    assert_eq!(r.refcount(), 1, "the winner has exited");

    // The same race between threads of one process.
    let start = unix_nanos() + 100_000_000;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    wait_until(start);
                    dir.opts("thread-race").size(64).create()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, RegionOpenError::AlreadyExists { .. }), "{e}");
        }
    }
    // No temporary files are left behind by the losers.
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".~tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// ---------------------------------------------------------------------------
// (b) racing open_or_create
// ---------------------------------------------------------------------------

#[test]
fn racing_open_or_create_shares_one_region() {
    const N: usize = 8;
    if let Some(role) = Role::current() {
        let (index, start) = role.arg.split_once(':').unwrap();
        let index: usize = index.parse().unwrap();
        wait_until(start.parse().unwrap());
        let r = role.opts("meet").size(N * 8).open_or_create().unwrap();
        report(format!("gen {}", r.generation()));
        r.write_at(index * 8, &(index as u64 + 1).to_ne_bytes())
            .unwrap();
        // Hold the region until every process has written its slot.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = r
                .read(|b| {
                    b.chunks_exact(8)
                        .enumerate()
                        .all(|(i, w)| u64::from_ne_bytes(w.try_into().unwrap()) == i as u64 + 1)
                })
                .unwrap();
            if seen {
                break;
            }
            assert!(Instant::now() < deadline, "not all slots were written");
            std::thread::sleep(Duration::from_millis(2));
        }
        report("saw all");
        return;
    }
    let dir = TestDir::new("meet");
    let start = unix_nanos() + 500_000_000;
    let procs: Vec<Proc> = (0..N)
        .map(|i| {
            spawn(
                "racing_open_or_create_shares_one_region",
                "meet",
                dir.path(),
                &format!("{i}:{start}"),
            )
        })
        .collect();
    let outputs: Vec<Vec<String>> = procs.into_iter().map(Proc::finish).collect();
    let gens: Vec<&String> = outputs.iter().map(|o| &o[0]).collect();
    assert!(gens[0].starts_with("gen "), "{outputs:?}");
    assert!(gens.iter().all(|g| *g == gens[0]), "{gens:?}");
    assert!(outputs.iter().all(|o| o[1] == "saw all"), "{outputs:?}");
    // TTL zero: the last of them removed the file.
    assert!(!dir.path().join("meet").exists());
}

// ---------------------------------------------------------------------------
// (c) seqlock consistency and writer exclusion across processes
// ---------------------------------------------------------------------------

const SEQ_LEN: usize = 64 * 1024;
/// Each reader must see this many snapshots, of this many different writes,
/// so it demonstrably overlapped with the writer.
const SEQ_READS: u64 = 200;
const SEQ_DISTINCT: u64 = 20;

/// Reads until `SEQ_READS` snapshots of `SEQ_DISTINCT` different writes were
/// seen, checking that every snapshot is uniform; returns the read count.
fn check_reads(r: &Region) -> u64 {
    let mut buf = vec![0u8; SEQ_LEN];
    let (mut reads, mut distinct, mut last) = (0u64, 0u64, u64::MAX);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reads < SEQ_READS || distinct < SEQ_DISTINCT {
        assert!(
            Instant::now() < deadline,
            "only {reads} reads of {distinct} writes"
        );
        let value = match reads % 3 {
            0 => {
                r.read_into(&mut buf).unwrap();
                uniform_value(0, &buf)
            }
            1 => r.read(|b| uniform_value(0, b)).unwrap(),
            _ => {
                // An unaligned slice from the middle.
                let part = &mut buf[..SEQ_LEN / 2 + 5];
                r.read_at(1235, part).unwrap();
                uniform_value(1235, part)
            }
        };
        let value = value.unwrap_or_else(|| panic!("torn read after {reads} reads"));
        if value != last {
            distinct += 1;
            last = value;
        }
        reads += 1;
    }
    reads
}

#[test]
fn seqlock_reads_are_never_torn() {
    if let Some(role) = Role::current() {
        let r = role.opts("seq").size(SEQ_LEN).open().unwrap();
        if role.name == "writer" {
            let stop = role.opts("stop").size(1).open().unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut counter = 0u64;
            while stop.read(|b| b[0]).unwrap() == 0 && Instant::now() < deadline {
                counter += 1;
                if counter.is_multiple_of(2) {
                    r.write(|b| {
                        for w in b.chunks_exact_mut(8) {
                            w.copy_from_slice(&counter.to_ne_bytes());
                        }
                    })
                    .unwrap();
                } else {
                    r.write_at(0, &counter.to_ne_bytes().repeat(SEQ_LEN / 8))
                        .unwrap();
                }
            }
            report(format!("wrote {counter}"));
        } else {
            report(format!("read {}", check_reads(&r)));
        }
        return;
    }
    let dir = TestDir::new("seq");
    let r = dir.opts("seq").size(SEQ_LEN).create().unwrap();
    let stop = dir.opts("stop").size(1).create().unwrap();
    let test = "seqlock_reads_are_never_torn";
    let writer = spawn(test, "writer", dir.path(), "");
    let reader = spawn(test, "reader", dir.path(), "");
    let reads = check_reads(&r);
    let child = reader.finish();
    stop.write_at(0, &[1]).unwrap();
    let wrote = writer.finish();
    assert!(reads >= SEQ_READS);
    assert!(child[0].starts_with("read "), "{child:?}");
    assert!(wrote[0].starts_with("wrote "), "{wrote:?}");
    assert_eq!(r.recoveries(), 0);
}

/// Every update below yields inside the critical section; on a loaded
/// machine each yield can cost a whole timeslice, so a waiter may queue
/// behind many updates.
const LOADED_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn writer_lock_excludes_other_processes() {
    const PROCS: u64 = 4;
    const ROUNDS: u64 = 300;
    let increment = |r: &Region| {
        r.write(|b| {
            let n = u64::from_ne_bytes(b[..8].try_into().unwrap());
            // A slow update: without mutual exclusion, increments get lost.
            std::thread::yield_now();
            b[..8].copy_from_slice(&(n + 1).to_ne_bytes());
        })
        .unwrap();
    };
    if let Some(role) = Role::current() {
        let r = role
            .opts("counter")
            .size(8)
            .timeout(LOADED_LOCK_TIMEOUT)
            .open()
            .unwrap();
        wait_until(role.arg.parse().unwrap());
        for _ in 0..ROUNDS {
            increment(&r);
        }
        return;
    }
    let dir = TestDir::new("counter");
    let r = dir
        .opts("counter")
        .size(8)
        .timeout(LOADED_LOCK_TIMEOUT)
        .create()
        .unwrap();
    let start = unix_nanos() + 400_000_000;
    let procs: Vec<Proc> = (0..PROCS)
        .map(|_| {
            spawn(
                "writer_lock_excludes_other_processes",
                "increment",
                dir.path(),
                &start.to_string(),
            )
        })
        .collect();
    wait_until(start);
    for _ in 0..ROUNDS {
        increment(&r);
    }
    for p in procs {
        p.finish();
    }
    let mut total = [0u8; 8];
    r.read_into(&mut total).unwrap();
    assert_eq!(u64::from_ne_bytes(total), (PROCS + 1) * ROUNDS);
}

// ---------------------------------------------------------------------------
// (d) crashed holders: refcount repair and TTL sweep
// ---------------------------------------------------------------------------

#[test]
fn crashed_holder_is_repaired_and_swept_after_ttl() {
    if let Some(role) = Role::current() {
        let r = if role.arg == "create" {
            role.opts("doomed").size(64).create().unwrap()
        } else {
            role.opts("held").open().unwrap()
        };
        report(format!("holding {}", r.refcount()));
        std::thread::sleep(Duration::from_secs(3600));
        return;
    }
    let test = "crashed_holder_is_repaired_and_swept_after_ttl";
    let dir = TestDir::new("crash");
    let ttl = Duration::from_millis(800);
    let path = dir.path().join("held");

    let creator = dir.opts("held").size(64).ttl(ttl).create().unwrap();
    let child = spawn(test, "hold", dir.path(), "open");
    assert_eq!(child.next_line(), "holding 2");
    drop(creator);
    let r = dir.opts("held").open().unwrap();
    assert_eq!(r.refcount(), 2);
    drop(r);
    child.kill9();

    // The counter still counts the dead child until someone finds itself
    // alone with the file: the sweep does, and dates the release to now.
    let report = sweep_regions(dir.path()).unwrap();
    assert_eq!(report.repaired, ["held"], "{report:?}");
    assert!(report.removed.is_empty(), "{report:?}");
    assert!(path.exists());
    let r = dir.opts("held").open().unwrap();
    assert_eq!(r.refcount(), 1, "repaired count plus us");
    drop(r);
    let report = sweep_regions(dir.path()).unwrap();
    assert!(
        report.removed.is_empty() && report.repaired.is_empty(),
        "{report:?}"
    );
    std::thread::sleep(ttl + Duration::from_millis(200));
    let report = sweep_regions(dir.path()).unwrap();
    assert_eq!(report.removed, ["held"], "{report:?}");
    assert!(!path.exists());
    assert!(matches!(
        dir.opts("held").open(),
        Err(RegionOpenError::NotFound { .. })
    ));

    // TTL zero and the only holder killed: nobody was there to remove the
    // file, so it is still there; the next open treats it as gone.
    let child = spawn(test, "hold", dir.path(), "create");
    assert_eq!(child.next_line(), "holding 1");
    child.kill9();
    assert!(dir.path().join("doomed").exists());
    assert!(matches!(
        dir.opts("doomed").open(),
        Err(RegionOpenError::NotFound { .. })
    ));
    assert!(!dir.path().join("doomed").exists());
}

// ---------------------------------------------------------------------------
// (e) a writer killed while holding the writer lock
// ---------------------------------------------------------------------------

#[test]
fn killed_writer_is_recovered() {
    if let Some(role) = Role::current() {
        let r = role.opts("w").open().unwrap();
        let hang = || {
            report("locked");
            std::thread::sleep(Duration::from_secs(3600));
        };
        if role.arg == "in-place" {
            // Dies with the sequence odd: readers must not hang.
            r.write_in_place(|_| hang()).unwrap();
        } else {
            // Dies while preparing an update: the sequence is even.
            r.write(|_| hang()).unwrap();
        }
        return;
    }
    let test = "killed_writer_is_recovered";
    let dir = TestDir::new("writer");
    let r = dir
        .opts("w")
        .size(4096)
        .timeout(Duration::from_millis(300))
        .create()
        .unwrap();
    r.write_at(0, b"before").unwrap();

    let child = spawn(test, "writer", dir.path(), "in-place");
    assert_eq!(child.next_line(), "locked");
    let pid = child.child.id();
    let mut buf = [0u8; 6];
    // A live writer in the middle of a write: bounded waits, clear errors.
    let t = Instant::now();
    match r.read_into(&mut buf) {
        Err(RegionAccessError::Timeout { holder_pid, .. }) => assert_eq!(holder_pid, Some(pid)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        r.write_at(0, b"x"),
        Err(RegionAccessError::Timeout { .. })
    ));
    child.kill9();
    // Dead now: the reader closes the abandoned write and goes on.
    r.read_into(&mut buf).unwrap();
    assert_eq!(&buf, b"before");
    assert_eq!(r.recoveries(), 1);
    r.write_at(0, b"after!").unwrap();
    r.read_into(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");

    let child = spawn(test, "writer", dir.path(), "closure");
    assert_eq!(child.next_line(), "locked");
    // Readers are not blocked by a writer that has not started storing.
    r.read_into(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    assert!(matches!(
        r.write_at(0, b"x"),
        Err(RegionAccessError::Timeout { .. })
    ));
    child.kill9();
    r.write_at(0, b"third!").unwrap();
    assert_eq!(r.recoveries(), 2);
    r.read_into(&mut buf).unwrap();
    assert_eq!(&buf, b"third!");
}

// ---------------------------------------------------------------------------
// (f) corrupt files
// ---------------------------------------------------------------------------

fn corrupt_reason(dir: &TestDir, name: &str) -> RegionHeaderError {
    match dir.opts(name).open() {
        Err(RegionOpenError::Corrupt { source, path }) => {
            assert_eq!(path, dir.path().join(name));
            source
        }
        other => panic!("expected a corrupt-header error, got {other:?}"),
    }
}

#[test]
fn corrupt_headers_are_clear_errors() {
    let dir = TestDir::new("corrupt");
    let keep = Duration::from_secs(60);
    let fresh = |name: &str| {
        let r = dir.opts(name).size(100).ttl(keep).create().unwrap();
        let path = r.path();
        drop(r);
        path
    };

    let path = fresh("garbage");
    scribble(&path, 0, &[0xab; 200]);
    let err = corrupt_reason(&dir, "garbage");
    assert_eq!(
        err,
        RegionHeaderError::BadMagic {
            found: 0xabab_abab_abab_abab
        }
    );
    let msg = dir.opts("garbage").open().unwrap_err().to_string();
    assert!(
        msg.contains("garbage") && msg.contains("bad magic"),
        "{msg}"
    );

    let path = fresh("version");
    scribble(&path, 8, &99u32.to_ne_bytes());
    assert_eq!(
        corrupt_reason(&dir, "version"),
        RegionHeaderError::UnsupportedVersion { found: 99 }
    );

    let path = fresh("hlen");
    scribble(&path, 12, &1000u32.to_ne_bytes());
    assert_eq!(
        corrupt_reason(&dir, "hlen"),
        RegionHeaderError::BadHeaderLen { found: 1000 }
    );

    let path = fresh("dlen");
    scribble(&path, 16, &u64::MAX.to_ne_bytes());
    assert_eq!(
        corrupt_reason(&dir, "dlen"),
        RegionHeaderError::BadDataLen { found: u64::MAX }
    );
    scribble(&path, 16, &5000u64.to_ne_bytes());
    assert!(matches!(
        corrupt_reason(&dir, "dlen"),
        RegionHeaderError::SizeMismatch { data_len: 5000, .. }
    ));

    let path = fresh("short");
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 8)
        .unwrap();
    assert!(matches!(
        corrupt_reason(&dir, "short"),
        RegionHeaderError::SizeMismatch { .. }
    ));
    for small in [100, 0] {
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(small)
            .unwrap();
        assert_eq!(
            corrupt_reason(&dir, "short"),
            RegionHeaderError::TooSmall {
                file_len: small,
                min: 144
            }
        );
    }

    // Not regular files.
    fs::create_dir(dir.path().join("adir")).unwrap();
    assert!(matches!(
        dir.opts("adir").open(),
        Err(RegionOpenError::NotARegularFile { .. })
    ));
    std::os::unix::fs::symlink(dir.path().join("version"), dir.path().join("alink")).unwrap();
    assert!(matches!(
        dir.opts("alink").open(),
        Err(RegionOpenError::NotARegularFile { .. })
    ));

    // A sweep leaves what it does not understand alone and says so.
    let report = sweep_regions(dir.path()).unwrap();
    assert_eq!(
        report.invalid,
        [
            "adir", "alink", "dlen", "garbage", "hlen", "short", "version"
        ],
        "{report:?}"
    );
    assert!(report.removed.is_empty(), "{report:?}");
}

#[test]
fn scribbled_lock_and_sequence_are_recovered() {
    let dir = TestDir::new("scribble");
    let r = dir
        .opts("s")
        .size(24)
        .timeout(Duration::from_secs(2))
        .create()
        .unwrap();
    r.write_at(0, b"consistent").unwrap();
    let path = r.path();
    // A write in progress by a pid that cannot exist.
    scribble(&path, 128, &7u64.to_ne_bytes());
    scribble(&path, 136, &(0x7fff_fff0u64 << 32).to_ne_bytes());
    let mut buf = [0u8; 10];
    r.read_into(&mut buf).unwrap();
    assert_eq!(&buf, b"consistent");
    assert_eq!(r.recoveries(), 1);
    // An odd sequence with the lock free.
    scribble(&path, 128, &9u64.to_ne_bytes());
    scribble(&path, 136, &0u64.to_ne_bytes());
    r.read_into(&mut buf).unwrap();
    assert_eq!(r.recoveries(), 2);
    // Garbage owner with an even sequence: a writer takes the lock over.
    scribble(&path, 136, &u64::MAX.to_ne_bytes());
    r.write_at(0, b"rewritten!").unwrap();
    r.read_into(&mut buf).unwrap();
    assert_eq!(&buf, b"rewritten!");
    assert_eq!(r.recoveries(), 3);
    // A wild reference count neither underflows nor overflows.
    scribble(&path, 64, &u64::MAX.to_ne_bytes());
    let second = dir.opts("s").open().unwrap();
    assert_eq!(second.refcount(), u64::MAX);
    drop(second);
    scribble(&path, 64, &0u64.to_ne_bytes());
    drop(r);
    assert!(!path.exists(), "TTL zero: removed by the last holder");
}

mod garbage {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the first 256 bytes hold, opening yields a region or a
        /// clear error, and a region that opens can be read and written.
        #[test]
        fn arbitrary_headers_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 256),
            keep_magic in any::<bool>(),
            keep_layout in any::<bool>(),
        ) {
            let dir = TestDir::new("prop");
            let r = dir.opts("p").size(4000).ttl(Duration::from_secs(60)).create().unwrap();
            let path = r.path();
            drop(r);
            let original = fs::read(&path).unwrap();
            let mut header = bytes.clone();
            if keep_magic {
                header[..8].copy_from_slice(&REGION_MAGIC.to_ne_bytes());
                header[8..12].copy_from_slice(&REGION_LAYOUT_VERSION.to_ne_bytes());
            }
            if keep_layout {
                header[12..24].copy_from_slice(&original[12..24]);
            }
            scribble(&path, 0, &header);
            match dir.opts("p").timeout(Duration::from_millis(200)).open() {
                Ok(r) => {
                    let mut buf = vec![0u8; r.len()];
                    r.read_into(&mut buf).unwrap();
                    r.write_at(r.len() - 3, b"end").unwrap();
                    r.read(|b| assert_eq!(&b[b.len() - 3..], b"end")).unwrap();
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains(&*path.to_string_lossy()), "{}", msg);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// (g) permissions and ownership
// ---------------------------------------------------------------------------

#[test]
fn permissions_are_enforced_at_open() {
    if let Some(role) = Role::current() {
        match role.opts("private").open() {
            Err(RegionOpenError::PermissionDenied { .. }) => report("private denied"),
            other => report(format!("private {other:?}")),
        }
        match role.opts("shared").open() {
            Err(RegionOpenError::ForeignOwner {
                owner_uid: 0,
                our_uid: 65534,
                ..
            }) => report("shared foreign"),
            other => report(format!("shared {other:?}")),
        }
        let r = role
            .opts("shared")
            .allow_foreign_owner(true)
            .open()
            .unwrap();
        let mut buf = [0u8; 5];
        r.read_into(&mut buf).unwrap();
        report(format!("shared read {}", String::from_utf8_lossy(&buf)));
        match role.opts("mine").size(8).create() {
            Err(RegionOpenError::PermissionDenied { .. }) => report("create denied"),
            other => report(format!("create {other:?}")),
        }
        return;
    }
    let dir = TestDir::new("perm");
    let keep = Duration::from_secs(60);
    let private = dir.opts("private").size(64).ttl(keep).create().unwrap();
    let shared = dir
        .opts("shared")
        .size(64)
        .ttl(keep)
        .mode(0o666)
        .create()
        .unwrap();
    shared.write_at(0, b"hello").unwrap();
    // The mode is applied exactly, whatever the umask.
    let mode = |name: &str| {
        fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("private"), 0o600);
    assert_eq!(mode("shared"), 0o666);
    assert!(matches!(
        dir.opts("bad-mode").size(8).mode(0o400).create(),
        Err(RegionOpenError::InvalidMode { mode: 0o400 })
    ));
    assert!(matches!(
        dir.opts("bad-mode").size(8).mode(0o4600).create(),
        Err(RegionOpenError::InvalidMode { .. })
    ));

    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("permissions_are_enforced_at_open: not root, skipping the other-uid part");
        return;
    }
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let child = spawn_with(
        "permissions_are_enforced_at_open",
        "other-user",
        dir.path(),
        "",
        |cmd| {
            cmd.uid(65534).gid(65534);
        },
    );
    let lines = child.finish();
    assert_eq!(
        lines,
        [
            "private denied",
            "shared foreign",
            "shared read hello",
            "create denied"
        ]
    );
    assert_eq!(shared.refcount(), 1, "the child's hold was released");
    drop((private, shared));
}

// ---------------------------------------------------------------------------
// (h) names
// ---------------------------------------------------------------------------

#[test]
fn names_are_validated() {
    let dir = TestDir::new("names");
    let long = "x".repeat(REGION_NAME_MAX + 1);
    let cases: [(&str, RegionNameError); 7] = [
        ("", RegionNameError::Empty),
        (&long, RegionNameError::TooLong { len: 256, max: 255 }),
        (
            "a/b",
            RegionNameError::InvalidChar {
                name: "a/b".into(),
                ch: '/',
                index: 1,
            },
        ),
        (
            "with space",
            RegionNameError::InvalidChar {
                name: "with space".into(),
                ch: ' ',
                index: 4,
            },
        ),
        (
            "caf\u{e9}",
            RegionNameError::InvalidChar {
                name: "caf\u{e9}".into(),
                ch: '\u{e9}',
                index: 3,
            },
        ),
        (".", RegionNameError::Reserved { name: ".".into() }),
        ("..", RegionNameError::Reserved { name: "..".into() }),
    ];
    for (name, expected) in cases {
        assert_eq!(validate_region_name(name), Err(expected.clone()));
        match dir.opts(name).size(8).open_or_create() {
            Err(RegionOpenError::InvalidName(e)) => assert_eq!(e, expected),
            other => panic!("{name:?}: expected InvalidName, got {other:?}"),
        }
        assert!(dir.opts(name).remove().is_err());
    }
    let msg = validate_region_name("a/b").unwrap_err().to_string();
    assert!(msg.contains("\"a/b\"") && msg.contains("'/'"), "{msg}");
    // Valid edge cases, including the longest name.
    for name in [
        "a".to_owned(),
        "A.b-c_9".to_owned(),
        ".hidden".to_owned(),
        "...".to_owned(),
        "x".repeat(REGION_NAME_MAX),
    ] {
        let r = dir.opts(&name).size(8).create().unwrap();
        assert_eq!(r.name(), name);
        assert!(r.path().exists());
    }
}

// ---------------------------------------------------------------------------
// Lifecycle, sizes, removal, sweeping of temporary files, default directory
// ---------------------------------------------------------------------------

#[test]
fn refcount_and_ttl_zero_lifecycle() {
    let dir = TestDir::new("life");
    let a = dir.opts("l").size(13).create().unwrap();
    let path = a.path();
    assert_eq!(a.len(), 13);
    assert!(!a.is_empty());
    assert_eq!(a.ttl(), Duration::ZERO);
    assert_eq!(a.creator_pid(), std::process::id());
    assert!(a.created() <= SystemTime::now());
    assert_eq!(a.refcount(), 1);
    let b = dir.opts("l").size(13).open().unwrap();
    assert_eq!((a.refcount(), b.generation()), (2, a.generation()));
    // File size: header (a page) plus the data padded to whole words.
    let page = rustix::param::page_size().max(4096) as u64;
    assert_eq!(fs::metadata(&path).unwrap().len(), page + 16);
    drop(a);
    assert_eq!(b.refcount(), 1);
    assert!(path.exists());
    drop(b);
    assert!(!path.exists());
}

#[test]
fn ttl_keeps_a_released_region_until_it_passes() {
    let dir = TestDir::new("ttl");
    let ttl = Duration::from_millis(1000);
    let r = dir.opts("t").size(32).ttl(ttl).create().unwrap();
    r.write_at(3, b"persisted").unwrap();
    let generation = r.generation();
    drop(r);
    // open_or_create finds the released region; its TTL and size are kept.
    let r = dir
        .opts("t")
        .size(32)
        .ttl(Duration::ZERO)
        .open_or_create()
        .unwrap();
    assert_eq!(
        (r.generation(), r.ttl(), r.refcount()),
        (generation, ttl, 1)
    );
    let mut buf = [0u8; 9];
    r.read_at(3, &mut buf).unwrap();
    assert_eq!(&buf, b"persisted");
    drop(r);
    std::thread::sleep(ttl + Duration::from_millis(100));
    assert!(matches!(
        dir.opts("t").open(),
        Err(RegionOpenError::NotFound { .. })
    ));
    assert!(!dir.path().join("t").exists());
    let r = dir.opts("t").size(32).open_or_create().unwrap();
    assert_ne!(r.generation(), generation);
    r.read(|b| assert!(b.iter().all(|&x| x == 0), "a new region is zeroed"))
        .unwrap();
}

#[test]
fn open_create_and_access_errors() {
    let dir = TestDir::new("errors");
    assert!(matches!(
        dir.opts("none").open(),
        Err(RegionOpenError::NotFound { .. })
    ));
    assert!(matches!(
        dir.opts("nosize").create(),
        Err(RegionOpenError::SizeRequired { .. })
    ));
    assert!(matches!(
        dir.opts("zero").size(0).create(),
        Err(RegionOpenError::InvalidSize { requested: 0, .. })
    ));
    let r = dir.opts("e").size(10).create().unwrap();
    assert!(matches!(
        dir.opts("e").size(10).create(),
        Err(RegionOpenError::AlreadyExists { .. })
    ));
    match dir.opts("e").size(11).open() {
        Err(RegionOpenError::SizeMismatch {
            requested: 11,
            actual: 10,
            ..
        }) => {}
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    assert_eq!(r.refcount(), 1, "a failed open leaves the count alone");
    let mut buf = [0u8; 4];
    assert!(matches!(
        r.read_at(7, &mut buf),
        Err(RegionAccessError::OutOfBounds {
            offset: 7,
            len: 4,
            region_len: 10,
            ..
        })
    ));
    assert!(matches!(
        r.write_at(usize::MAX, b"x"),
        Err(RegionAccessError::OutOfBounds { .. })
    ));
    assert!(r.read_into(&mut [0u8; 11]).is_err());
    r.write_at(6, b"tail").unwrap();
    r.read_at(6, &mut buf).unwrap();
    assert_eq!(&buf, b"tail");
    // A panicking update writes nothing and releases the lock.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        r.write(|b| {
            b.fill(0xff);
            panic!("update failed");
        })
    }));
    assert!(caught.is_err());
    r.read_at(6, &mut buf).unwrap();
    assert_eq!(&buf, b"tail");
    let doubled = r
        .write(|b| {
            b[0] = 21;
            b[0] * 2
        })
        .unwrap();
    assert_eq!(doubled, 42);
    assert_eq!(r.read(|b| b[0]).unwrap(), 21);
    let raw = r.as_raw_slice();
    assert_eq!(raw.len(), 10);
    assert_eq!(raw as *mut u8 as usize % 8, 0);
}

#[test]
fn remove_frees_the_name_but_not_the_holders() {
    let dir = TestDir::new("remove");
    let old = dir
        .opts("r")
        .size(8)
        .ttl(Duration::from_secs(60))
        .create()
        .unwrap();
    old.write_at(0, b"old").unwrap();
    assert!(dir.opts("r").remove().unwrap());
    assert!(!dir.opts("r").remove().unwrap(), "already gone");
    let new = dir.opts("r").size(8).create().unwrap();
    assert_ne!(new.generation(), old.generation());
    // The old holder still has its memory; dropping it removes nothing.
    assert_eq!(old.read(|b| b[..3].to_vec()).unwrap(), b"old");
    drop(old);
    assert!(dir.path().join("r").exists());
    assert_eq!(dir.opts("r").open().unwrap().generation(), new.generation());
}

#[test]
fn sweep_removes_only_stale_temporary_files() {
    let dir = TestDir::new("temp");
    let old_time = SystemTime::now() - Duration::from_secs(120);
    let make = |name: &str, old: bool| {
        let f = fs::File::create(dir.path().join(name)).unwrap();
        if old {
            f.set_modified(old_time).unwrap();
        }
        f
    };
    drop(make(".~tmp-1-crashed", true));
    drop(make(".~tmp-2-fresh", false));
    let locked = make(".~tmp-3-alive", true);
    rustix::fs::flock(&locked, rustix::fs::FlockOperation::LockShared).unwrap();
    drop(make("notes.txt~", true));
    let held = dir.opts("held").size(8).create().unwrap();
    let report = sweep_regions(dir.path()).unwrap();
    assert_eq!(report.temp_files_removed, [".~tmp-1-crashed"], "{report:?}");
    assert!(
        report.removed.is_empty() && report.invalid.is_empty(),
        "{report:?}"
    );
    let mut left: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [".~tmp-2-fresh", ".~tmp-3-alive", "held", "notes.txt~"]
    );
    drop(held);
    assert!(sweep_regions(dir.path().join("missing")).is_err());
}

#[test]
fn default_directory_comes_from_the_environment() {
    if let Some(role) = Role::current() {
        let dir = commy_shm::default_region_dir().unwrap();
        report(dir.display());
        let r = RegionOptions::new("dflt")
            .size(8)
            .ttl(Duration::from_secs(60))
            .create()
            .unwrap();
        report(r.path().display());
        drop(r);
        report(Region::remove("dflt").unwrap());
        report(role.arg);
        return;
    }
    let dir = TestDir::new("default");
    let runtime = dir.path().join("rt");
    let child = spawn_with(
        "default_directory_comes_from_the_environment",
        "default",
        dir.path(),
        "done",
        |cmd| {
            cmd.env("COMMY_RUNTIME_DIR", &runtime);
        },
    );
    let lines = child.finish();
    let regions = runtime.join("regions");
    assert_eq!(
        lines,
        [
            regions.display().to_string(),
            regions.join("dflt").display().to_string(),
            "true".to_owned(),
            "done".to_owned(),
        ]
    );
    let mode = fs::metadata(&regions).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(!regions.join("dflt").exists());
}

#[test]
fn a_forked_copy_is_not_a_hold_of_its_own() {
    let dir = TestDir::new("fork");
    let r = dir.opts("f").size(8).create().unwrap();
    let path = r.path();
    // SAFETY: the child only drops its copy of the region (getpid, munmap,
    // close and free, all fork-safe in glibc) and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(r);
        // SAFETY: `_exit` ends the child without running the parent's
        // atexit handlers or unwinding into the test harness.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child we just forked; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    // The child's drop neither released our hold nor removed the file.
    assert!(path.exists());
    assert_eq!(r.refcount(), 1);
    let other = dir.opts("f").open().unwrap();
    assert_eq!(other.refcount(), 2);
    drop((r, other));
    assert!(!path.exists());
}
