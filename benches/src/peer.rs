//! The peer process: spawning it, pinning both processes, and the control
//! channel between them.
//!
//! The harness re-executes itself (`current_exe() __peer`) with its standard
//! input being one end of a `SOCK_SEQPACKET` socketpair: the control channel.
//! The parent sends one message holding the scenario name and [`Params`] as
//! JSON, with the transport's descriptors attached (SCM_RIGHTS), so no
//! descriptor is inherited by accident and adopting one needs no raw fd code.
//! The child answers `R` when it is set up, then `D` when done or `E<message>`
//! on error. Either side sees the other's exit as end-of-file.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::thread::CpuSet;
use serde::{Deserialize, Serialize};

use crate::scenario::{
    BenchError, ChildCtx, Endpoints, MAX_FDS, Measurement, Params, ParentCtx, Scenario, io_err,
};

/// The hidden subcommand that makes the harness binary act as the peer.
pub(crate) const PEER_ARG: &str = "__peer";

/// Largest control message (the JSON spec or an error text).
const MAX_MSG: usize = 64 * 1024;

/// How long the parent waits for the peer's last word after a failure.
const GRACE: Duration = Duration::from_secs(2);

/// A control message: its bytes and the descriptors attached to it.
type Received = (Vec<u8>, Vec<OwnedFd>);

/// One end of the control channel.
#[derive(Debug)]
pub(crate) struct Control {
    sock: OwnedFd,
}

/// What the parent tells the peer.
#[derive(Debug, Serialize, Deserialize)]
struct Spec {
    scenario: String,
    params: Params,
    cpu: Option<usize>,
}

impl Control {
    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), BenchError> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(BenchError::Fds {
                expected: MAX_FDS,
                got: fds.len(),
            });
        }
        let sent = rustix::net::sendmsg(
            &self.sock,
            &[IoSlice::new(bytes)],
            &mut anc,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| io_err("sending on the control socket")(e.into()))?;
        if sent != bytes.len() {
            return Err(BenchError::Protocol(format!(
                "control message truncated ({sent} of {} bytes sent)",
                bytes.len()
            )));
        }
        Ok(())
    }

    /// Receives one message; `Ok(None)` on end-of-file.
    fn recv(&self, flags: RecvFlags) -> Result<Option<Received>, io::Error> {
        let mut buf = vec![0u8; MAX_MSG];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            &self.sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut anc,
            flags | RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(msg.bytes.min(MAX_MSG));
        Ok(Some((buf, fds)))
    }

    pub(crate) fn send_ready(&self) -> Result<(), BenchError> {
        self.send(b"R", &[])
    }

    /// Non-blocking look at the channel: `Err` on end-of-file or an error
    /// report from the other side.
    pub(crate) fn peer_alive(&self) -> Result<(), BenchError> {
        match self.recv(RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            Ok(Some((msg, _))) => match msg.split_first() {
                Some((b'E', text)) => Err(BenchError::Peer(String::from_utf8_lossy(text).into())),
                _ => Ok(()),
            },
            Ok(None) => Err(BenchError::PeerGone(String::new())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(io_err("polling the control socket")(e)),
        }
    }

    /// Blocks for the next status byte from the peer (`R` or `D`).
    fn expect(&self, want: u8, what: &str) -> Result<(), BenchError> {
        match self.recv(RecvFlags::empty()) {
            Ok(Some((msg, _))) => match msg.split_first() {
                Some((b, _)) if *b == want => Ok(()),
                Some((b'E', text)) => Err(BenchError::Peer(String::from_utf8_lossy(text).into())),
                _ => Err(BenchError::Protocol(format!(
                    "unexpected control message {msg:?} while waiting for {what}"
                ))),
            },
            Ok(None) => Err(BenchError::PeerGone(format!(" (while waiting for {what})"))),
            Err(e) => Err(io_err(format!("reading the control socket ({what})"))(e)),
        }
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<(), BenchError> {
    let mut set = CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
        .map_err(|e| io_err(format!("pinning to CPU {cpu} (sched_setaffinity)"))(e.into()))
}

/// Whether `a` and `b` are SMT siblings (from sysfs; `None` if unknown).
fn smt_siblings(a: usize, b: usize) -> Option<bool> {
    let path = format!("/sys/devices/system/cpu/cpu{a}/topology/thread_siblings_list");
    let list = std::fs::read_to_string(path).ok()?;
    Some(parse_cpu_list(list.trim())?.contains(&b))
}

/// Parses a sysfs CPU list like `0-3,8,10-11`.
pub(crate) fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (usize, usize) = (lo.parse().ok()?, hi.parse().ok()?);
                out.extend(lo..=hi);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Which CPUs the two processes run on.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Pinning {
    /// The measuring process.
    pub(crate) parent_cpu: usize,
    /// The peer process.
    pub(crate) child_cpu: usize,
    /// Whether the two are hyper-threads of one core (`None` if unknown).
    pub(crate) smt_siblings: Option<bool>,
}

/// Pins this (the measuring) process to its CPU and picks the peer's;
/// `None` (with a note on stderr) if fewer than two CPUs are usable.
pub(crate) fn pin_parent() -> Option<Pinning> {
    let cpus = allowed_cpus();
    let (&parent_cpu, &child_cpu) = (cpus.first()?, cpus.get(1)?);
    if let Err(e) = pin(parent_cpu) {
        eprintln!("commy-bench: running unpinned: {e}");
        return None;
    }
    Some(Pinning {
        parent_cpu,
        child_cpu,
        smt_siblings: smt_siblings(parent_cpu, child_cpu),
    })
}

/// Runs one repetition of `scenario`: spawns the peer, hands it the child
/// descriptors, waits until it is ready, runs the parent function.
pub(crate) fn run_once(
    scenario: &Scenario,
    params: Params,
    pinning: Option<Pinning>,
) -> Result<Measurement, BenchError> {
    let Endpoints { parent, child } = (scenario.fns.setup)(&params)?;
    let (ctl_parent, ctl_child) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| io_err("socketpair for the control channel")(e.into()))?;
    let exe = std::env::current_exe().map_err(io_err("locating the harness executable"))?;
    let mut peer = Command::new(&exe)
        .arg(PEER_ARG)
        .stdin(Stdio::from(ctl_child))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(io_err(format!(
            "starting the peer process {}",
            exe.display()
        )))?;
    let ctl = Control { sock: ctl_parent };
    let result = drive(scenario, params, pinning, &ctl, parent, child);
    finish(&mut peer, &ctl, result)
}

fn drive(
    scenario: &Scenario,
    params: Params,
    pinning: Option<Pinning>,
    ctl: &Control,
    parent_fds: Vec<OwnedFd>,
    child_fds: Vec<OwnedFd>,
) -> Result<Measurement, BenchError> {
    let spec = Spec {
        scenario: scenario.name.clone(),
        params,
        cpu: pinning.map(|p| p.child_cpu),
    };
    let json = serde_json::to_vec(&spec)
        .map_err(|e| BenchError::Protocol(format!("encoding the peer spec: {e}")))?;
    let borrowed: Vec<BorrowedFd<'_>> = child_fds.iter().map(AsFd::as_fd).collect();
    ctl.send(&json, &borrowed)?;
    drop(child_fds);
    ctl.expect(b'R', "the peer to be ready")?;
    let mut ctx = ParentCtx {
        params,
        fds: parent_fds,
        ctl,
    };
    let m = (scenario.fns.parent)(&mut ctx)?;
    ctl.expect(b'D', "the peer to finish")?;
    Ok(m)
}

/// Reaps the peer. On failure, prefers the peer's own error report (the
/// parent's error is often just the consequence) and kills a stuck peer.
fn finish(
    peer: &mut Child,
    ctl: &Control,
    result: Result<Measurement, BenchError>,
) -> Result<Measurement, BenchError> {
    match result {
        Ok(m) => {
            let status = peer
                .wait()
                .map_err(io_err("waiting for the peer process"))?;
            if status.success() {
                Ok(m)
            } else {
                Err(BenchError::PeerGone(format!(" ({status})")))
            }
        }
        Err(parent_err) => {
            let _ = rustix::net::sockopt::set_socket_timeout(
                &ctl.sock,
                rustix::net::sockopt::Timeout::Recv,
                Some(GRACE),
            );
            let peer_err = match ctl.recv(RecvFlags::empty()) {
                Ok(Some((msg, _))) => match msg.split_first() {
                    Some((b'E', text)) => {
                        Some(BenchError::Peer(String::from_utf8_lossy(text).into()))
                    }
                    _ => None,
                },
                _ => None,
            };
            // The peer may be blocked on a transport the parent abandoned.
            let _ = peer.kill();
            let _ = peer.wait();
            Err(match (parent_err, peer_err) {
                (BenchError::Peer(m), _) => BenchError::Peer(m),
                (_, Some(p)) => p,
                (e, None) => e,
            })
        }
    }
}

/// The peer's `main`: reads the spec, pins, runs the child function.
/// Returns the process exit code.
pub(crate) fn peer_main(scenarios: &[Scenario]) -> u8 {
    let sock = match io::stdin().as_fd().try_clone_to_owned() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("commy-bench peer: no control socket on stdin: {e}");
            return 2;
        }
    };
    let ctl = Control { sock };
    match peer_run(scenarios, &ctl) {
        Ok(()) => 0,
        Err(e) => {
            let msg = format!("E{e}");
            if ctl.send(msg.as_bytes(), &[]).is_err() {
                eprintln!("commy-bench peer: {e}");
            }
            1
        }
    }
}

fn peer_run(scenarios: &[Scenario], ctl: &Control) -> Result<(), BenchError> {
    let (json, fds) = ctl
        .recv(RecvFlags::empty())
        .map_err(io_err("reading the peer spec"))?
        .ok_or_else(|| BenchError::PeerGone(" (before sending the spec)".into()))?;
    let spec: Spec = serde_json::from_slice(&json)
        .map_err(|e| BenchError::Protocol(format!("decoding the peer spec: {e}")))?;
    let scenario = scenarios
        .iter()
        .find(|s| s.name == spec.scenario)
        .ok_or_else(|| BenchError::Protocol(format!("peer knows no scenario {}", spec.scenario)))?;
    if let Some(cpu) = spec.cpu {
        pin(cpu)?;
    }
    let mut ctx = ChildCtx {
        params: spec.params,
        fds,
        ctl,
        ready_sent: false,
    };
    (scenario.fns.child)(&mut ctx)?;
    ctx.ready()?;
    ctl.send(b"D", &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(
            parse_cpu_list("0-2,8,10-11"),
            Some(vec![0, 1, 2, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("x"), None);
    }
}
