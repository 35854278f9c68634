//! The [`Scenario`] abstraction: what a transport provides to be benchmarked.
//!
//! A scenario is three plain functions. `setup` runs in the measuring
//! (parent) process and creates the transport's file descriptors: one list
//! stays in the parent, the other is handed to the peer (child) process over
//! SCM_RIGHTS. Then `child` runs in the peer and `parent` in the measuring
//! process, each on its own pinned core; `parent` returns the
//! [`Measurement`]. The harness does the rest: spawning, pinning, warm-up
//! bookkeeping, repetition, statistics and reporting.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::peer::Control;

/// What a scenario measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// Ping-pong: one message each way per iteration, each iteration timed.
    RoundTrip,
    /// One-way stream of messages from parent to child, timed as a whole.
    Throughput,
    /// The serving (child) process's CPU time while the parent makes calls
    /// at a fixed rate, evenly spaced (or none: the rate 0 measures it
    /// idle), over a window.
    Cpu,
}

/// How the receiving side waits for data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Wait {
    /// Blocking system calls (the kernel wakes the reader).
    Blocking,
    /// Busy polling: the reader spins on a core and never sleeps.
    Busy,
    /// The transport's default strategy (e.g. spin, then yield, then futex).
    Default,
}

impl Wait {
    /// The name used in tables and JSON.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Wait::Blocking => "blocking",
            Wait::Busy => "busy",
            Wait::Default => "default",
        }
    }
}

/// The numbers a run uses; sent to the peer so both sides agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Params {
    /// Message payload size in bytes.
    pub(crate) size: usize,
    /// Timed iterations (round trip) or timed messages (throughput).
    pub(crate) iterations: u64,
    /// Untimed iterations / messages before the timed ones.
    pub(crate) warmup: u64,
    /// Throughput: messages per batch commit (1 = every message on its
    /// own). CPU: messages per second (0: idle).
    pub(crate) batch: u64,
}

/// The transport's descriptors, created by a scenario's `setup`.
#[derive(Debug, Default)]
pub(crate) struct Endpoints {
    /// Kept by the measuring process, in this order.
    pub(crate) parent: Vec<OwnedFd>,
    /// Handed to the peer process, in this order (at most [`MAX_FDS`]).
    pub(crate) child: Vec<OwnedFd>,
}

/// The most descriptors a scenario may hand to its peer.
pub(crate) const MAX_FDS: usize = 16;

/// What the parent function measured in one run.
#[derive(Debug)]
pub(crate) enum Measurement {
    /// Round trip: one duration in nanoseconds per timed iteration.
    RoundTrip(Vec<u64>),
    /// Throughput: messages and payload bytes moved in `elapsed`.
    Throughput {
        /// Messages delivered.
        messages: u64,
        /// Payload bytes delivered.
        bytes: u64,
        /// From the first timed send to the peer's acknowledgement of the last.
        elapsed: Duration,
    },
    /// CPU: the serving process's CPU time over a window of calls.
    Cpu {
        /// Calls made in the window (0 when idle).
        messages: u64,
        /// The serving process's CPU time (all its threads) in the window.
        cpu: Duration,
        /// The window.
        window: Duration,
    },
}

/// A benchmark failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BenchError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// What the OS said.
        source: io::Error,
    },
    /// Creating or attaching a shared-memory segment failed.
    #[error("shared-memory segment: {0}")]
    Segment(#[from] commy_shm::SegmentError),
    /// The peer process reported an error.
    #[error("peer process failed: {0}")]
    Peer(String),
    /// The peer process went away without reporting an error.
    #[error("peer process exited or closed its control socket unexpectedly{0}")]
    PeerGone(String),
    /// The two processes disagree about what was exchanged.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A scenario function received a different number of descriptors.
    #[error("expected {expected} file descriptor(s), got {got}")]
    Fds {
        /// What the function needs.
        expected: usize,
        /// What it was given.
        got: usize,
    },
    /// A scenario failed; names which one.
    #[error("scenario {scenario}: {source}")]
    InScenario {
        /// The scenario name.
        scenario: String,
        /// What went wrong.
        source: Box<BenchError>,
    },
}

/// `map_err` helper: an I/O error while doing `op`.
pub(crate) fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    move |source| BenchError::Io {
        op: op.into(),
        source,
    }
}

fn take<const N: usize>(fds: &mut Vec<OwnedFd>) -> Result<[OwnedFd; N], BenchError> {
    let got = fds.len();
    <[OwnedFd; N]>::try_from(std::mem::take(fds)).map_err(|_| BenchError::Fds { expected: N, got })
}

/// What the measuring process's function gets.
#[derive(Debug)]
pub(crate) struct ParentCtx<'a> {
    /// The run's parameters.
    pub(crate) params: Params,
    /// The descriptors `setup` put in [`Endpoints::parent`].
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) ctl: &'a Control,
}

impl ParentCtx<'_> {
    /// Takes exactly `N` descriptors: `let [sock] = ctx.take_fds()?;`.
    pub(crate) fn take_fds<const N: usize>(&mut self) -> Result<[OwnedFd; N], BenchError> {
        take(&mut self.fds)
    }

    /// `Err` if the peer has exited or reported an error: call it now and
    /// then (e.g. every 2^14 spins) in loops that would otherwise spin forever.
    pub(crate) fn peer_alive(&self) -> Result<(), BenchError> {
        self.ctl.peer_alive()
    }
}

/// What the peer process's function gets.
#[derive(Debug)]
pub(crate) struct ChildCtx<'a> {
    /// The run's parameters.
    pub(crate) params: Params,
    /// The descriptors `setup` put in [`Endpoints::child`].
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) ctl: &'a Control,
    pub(crate) ready_sent: bool,
}

impl ChildCtx<'_> {
    /// Takes exactly `N` descriptors: `let [sock] = ctx.take_fds()?;`.
    pub(crate) fn take_fds<const N: usize>(&mut self) -> Result<[OwnedFd; N], BenchError> {
        take(&mut self.fds)
    }

    /// Tells the parent that this side is set up; the parent function starts
    /// only then (so process start-up is never timed). If the child function
    /// returns without calling it, the harness sends it afterwards.
    pub(crate) fn ready(&mut self) -> Result<(), BenchError> {
        if !self.ready_sent {
            self.ctl.send_ready()?;
            self.ready_sent = true;
        }
        Ok(())
    }

    /// `Err` if the parent has exited: call it now and then in spin loops.
    pub(crate) fn peer_alive(&self) -> Result<(), BenchError> {
        self.ctl.peer_alive()
    }
}

/// Creates the transport's descriptors (runs in the measuring process).
pub(crate) type SetupFn = fn(&Params) -> Result<Endpoints, BenchError>;
/// Drives the run and measures it (runs in the measuring process).
pub(crate) type ParentFn = fn(&mut ParentCtx<'_>) -> Result<Measurement, BenchError>;
/// The other end (runs in the peer process).
pub(crate) type ChildFn = fn(&mut ChildCtx<'_>) -> Result<(), BenchError>;

/// The three functions a transport provides for one kind of scenario.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fns {
    /// See [`SetupFn`].
    pub(crate) setup: SetupFn,
    /// See [`ParentFn`].
    pub(crate) parent: ParentFn,
    /// See [`ChildFn`].
    pub(crate) child: ChildFn,
}

/// One benchmark: a transport, a message size, a kind, and its functions.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    /// Unique name, `<transport>/<rt|tp|cpu>[-<wait>]/<size>[-b<batch>]`
    /// (`-r<rate>` for CPU), e.g. `uds/rt/64B`, `spin-floor/rt-busy/8B`,
    /// `mesh/cpu-default/64B-r1000`.
    pub(crate) name: String,
    /// Transport name; [`crate::scenarios::UDS`] and [`crate::scenarios::FLOOR`]
    /// are the baselines others are compared against.
    pub(crate) transport: &'static str,
    /// Message payload size in bytes.
    pub(crate) size: usize,
    /// Round trip or throughput.
    pub(crate) kind: Kind,
    /// How the receiver waits.
    pub(crate) wait: Wait,
    /// Throughput: messages per batch commit (1 = none).
    pub(crate) batch: u64,
    /// Whether `commy-bench demo` runs it.
    pub(crate) demo: bool,
    /// Whether it warms up with as many iterations as it times, instead of
    /// a tenth of them (see [`Scenario::long_warmup`]).
    pub(crate) long_warmup: bool,
    /// The most iterations it times, whatever the profile says (see
    /// [`Scenario::iterations_at_most`]).
    pub(crate) max_iterations: Option<u64>,
    /// The transport's functions.
    pub(crate) fns: Fns,
}

/// `64B`, `1KiB`, `64KiB`: the size part of scenario names.
pub(crate) fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

impl Scenario {
    /// A scenario of `transport` with blocking waits and no batching, named
    /// `<transport>/<rt|tp>/<size>`.
    pub(crate) fn new(transport: &'static str, kind: Kind, size: usize, fns: Fns) -> Self {
        let mut s = Scenario {
            name: String::new(),
            transport,
            size,
            kind,
            wait: Wait::Blocking,
            batch: 1,
            demo: false,
            long_warmup: false,
            max_iterations: None,
            fns,
        };
        s.rename();
        s
    }

    fn rename(&mut self) {
        let k = match self.kind {
            Kind::RoundTrip => "rt",
            Kind::Throughput => "tp",
            Kind::Cpu => "cpu",
        };
        let w = match self.wait {
            Wait::Blocking => String::new(),
            w => format!("-{}", w.as_str()),
        };
        let b = if self.kind == Kind::Cpu {
            format!("-r{}", self.batch)
        } else if self.batch > 1 {
            format!("-b{}", self.batch)
        } else {
            String::new()
        };
        self.name = format!("{}/{k}{w}/{}{b}", self.transport, size_label(self.size));
    }

    /// Sets the wait mode (named in the scenario name unless blocking).
    pub(crate) fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self.rename();
        self
    }

    /// Sets the throughput batch size (named as `-b<N>` when above 1).
    #[allow(dead_code, reason = "for the shm link's batched throughput scenarios")]
    pub(crate) fn batch(mut self, batch: u64) -> Self {
        self.batch = batch.max(1);
        self.rename();
        self
    }

    /// Sets a CPU scenario's rate, calls per second (0: idle; named as
    /// `-r<N>`).
    pub(crate) fn rate(mut self, rate: u64) -> Self {
        self.batch = rate;
        self.rename();
        self
    }

    /// Warms up with as many iterations as are timed: for processes whose
    /// runtime compiles their code while they run (Node), on background
    /// threads that compete with the measured ones for the CPUs until it
    /// is done.
    pub(crate) fn long_warmup(mut self) -> Self {
        self.long_warmup = true;
        self
    }

    /// Times at most `n` iterations: for scenarios whose iteration takes
    /// milliseconds by design (a deadline passing), not microseconds.
    pub(crate) fn iterations_at_most(mut self, n: u64) -> Self {
        self.max_iterations = Some(n);
        self
    }

    /// Includes the scenario in `commy-bench demo`.
    pub(crate) fn in_demo(mut self) -> Self {
        self.demo = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(_: &Params) -> Result<Endpoints, BenchError> {
        Ok(Endpoints::default())
    }
    fn parent(_: &mut ParentCtx<'_>) -> Result<Measurement, BenchError> {
        Ok(Measurement::RoundTrip(vec![1]))
    }
    fn child(_: &mut ChildCtx<'_>) -> Result<(), BenchError> {
        Ok(())
    }
    const FNS: Fns = Fns {
        setup,
        parent,
        child,
    };

    #[test]
    fn names() {
        assert_eq!(
            Scenario::new("uds", Kind::RoundTrip, 64, FNS).name,
            "uds/rt/64B"
        );
        let s = Scenario::new("shm", Kind::Throughput, 65536, FNS)
            .wait(Wait::Busy)
            .batch(32);
        assert_eq!(s.name, "shm/tp-busy/64KiB-b32");
        assert_eq!(size_label(1536), "1536B");
    }
}
