//! THE REGISTRATION POINT: every scenario the harness knows is listed in
//! [`scenarios`]. A new transport adds its module (three functions per kind,
//! see [`crate::scenario`]) and a few lines here; see benches/README.md.

use crate::scenario::{Kind, Scenario, Wait};
use crate::{floor, mesh, node, pick, shm_link, tls, uds};

/// Transport name of the Unix-socket baseline (ratios "vs UDS").
pub(crate) const UDS: &str = "uds";
/// Transport name of the spin floor (ratios "× floor").
pub(crate) const FLOOR: &str = "spin-floor";

/// Transport name of commy-shm's link.
pub(crate) const SHM: &str = "shm";
/// Transport name of the mesh API's calls (`mesh.call`).
pub(crate) const MESH: &str = "mesh";
/// `mesh.call` to a service with three instances (the pool's pick, with
/// ejection and the retry budget's deposits, on every call).
pub(crate) const MESH_POOL3: &str = "mesh-3inst";
/// Transport names of picking one of three instances, by each strategy,
/// in one process (no transport: what a pool adds to each call).
pub(crate) const PICK_P2C: &str = "pick-p2c";
/// See [`PICK_P2C`].
pub(crate) const PICK_ROUND_ROBIN: &str = "pick-round-robin";
/// See [`PICK_P2C`].
pub(crate) const PICK_MAGLEV: &str = "pick-maglev";
/// `mesh.call_many`: a batch of calls from one task.
pub(crate) const MESH_MANY: &str = "mesh-many";
/// Transport name of a callback call's 3 ms deadline, kept while the
/// link's reader waits for a longer one.
pub(crate) const MESH_DEADLINE: &str = "mesh-deadline-3ms";
/// Transport names of the mesh's pub/sub with 1 and 4 subscribers.
pub(crate) const PUBSUB_1: &str = "pubsub-1sub";
/// See [`PUBSUB_1`].
pub(crate) const PUBSUB_4: &str = "pubsub-4sub";
/// Transport name of the mesh's pub/sub with 1 subscriber, the topic named
/// on each `mesh.publish` (the others publish through a `Publisher`).
pub(crate) const PUBSUB_1_BY_NAME: &str = "pubsub-1sub-byname";
/// Transport name of the pub/sub echo round trip (publish, and the peer
/// publishes the message back).
pub(crate) const PUBSUB_ECHO: &str = "pubsub-echo";
/// Transport names of the network scenarios: raw TCP and tokio-rustls
/// echoes (baselines), commy-net's link, and `mesh.call` over TLS.
pub(crate) const TCP: &str = "tcp";
/// See [`TCP`].
pub(crate) const RUSTLS: &str = "rustls";
/// See [`TCP`].
pub(crate) const NET_TLS: &str = "net-tls";
/// See [`TCP`].
pub(crate) const MESH_TLS: &str = "mesh-tls";
/// Transport name of the Node SDK's calls between two Node processes.
pub(crate) const NODE_COMMY: &str = "node-commy";
/// Transport name of the Node `net` Unix-socket echo, the baseline of the
/// `node-*` rows.
pub(crate) const NODE_NET: &str = "node-net";
/// The mesh call sizes: the common small message and a page.
pub(crate) const MESH_SIZES: [usize; 2] = [64, 4096];

/// Calls per second of the CPU scenarios.
const CPU_RATES: [u64; 3] = [1_000, 10_000, 100_000];

/// Transport name of a process serving 200 services that nobody calls.
pub(crate) const MESH_IDLE: &str = "mesh-idle-200svc";

/// Calls in flight in the pipelined `mesh.call` scenario.
const MESH_IN_FLIGHT: u64 = 256;

/// Messages per publish in the shm throughput scenarios.
const SHM_BATCH: u64 = 32;

/// Message sizes every transport is measured at.
pub(crate) const SIZES: [usize; 3] = [64, 1024, 64 * 1024];

/// `s`, included in the demo when `demo` holds.
fn demo_if(s: Scenario, demo: bool) -> Scenario {
    if demo { s.in_demo() } else { s }
}

/// All scenarios, in report order: baselines first.
pub(crate) fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();

    // Baseline: the hardware floor of a cross-core round trip.
    all.push(
        Scenario::new(FLOOR, Kind::RoundTrip, 8, floor::ROUND_TRIP)
            .wait(Wait::Busy)
            .in_demo(),
    );

    // Baseline: Unix-domain stream sockets, blocking.
    for size in SIZES {
        all.push(demo_if(
            Scenario::new(UDS, Kind::RoundTrip, size, uds::ROUND_TRIP),
            size == 64,
        ));
    }
    // A page-sized round trip for the mesh comparison.
    all.push(Scenario::new(UDS, Kind::RoundTrip, 4096, uds::ROUND_TRIP));
    for size in SIZES {
        all.push(demo_if(
            Scenario::new(UDS, Kind::Throughput, size, uds::THROUGHPUT),
            size == 64,
        ));
    }

    // commy-shm's ring link: round trip and batched throughput, busy-poll
    // and default wait, at every size (and a page for the mesh comparison).
    for size in SIZES {
        all.push(
            Scenario::new(SHM, Kind::RoundTrip, size, shm_link::ROUND_TRIP_BUSY).wait(Wait::Busy),
        );
        all.push(demo_if(
            Scenario::new(SHM, Kind::RoundTrip, size, shm_link::ROUND_TRIP_DEFAULT)
                .wait(Wait::Default),
            size == 64,
        ));
    }
    all.push(
        Scenario::new(SHM, Kind::RoundTrip, 4096, shm_link::ROUND_TRIP_DEFAULT)
            .wait(Wait::Default)
            .in_demo(),
    );
    for size in SIZES {
        all.push(
            Scenario::new(SHM, Kind::Throughput, size, shm_link::THROUGHPUT_BUSY)
                .wait(Wait::Busy)
                .batch(SHM_BATCH),
        );
        all.push(demo_if(
            Scenario::new(SHM, Kind::Throughput, size, shm_link::THROUGHPUT_DEFAULT)
                .wait(Wait::Default)
                .batch(SHM_BATCH),
            size == 64,
        ));
    }

    // The mesh API on top of the link: calls, and pub/sub fan-out.
    for size in MESH_SIZES {
        all.push(
            Scenario::new(MESH, Kind::RoundTrip, size, mesh::ROUND_TRIP)
                .wait(Wait::Default)
                .in_demo(),
        );
    }
    // The same round trip through a pool of three instances.
    all.push(
        Scenario::new(MESH_POOL3, Kind::RoundTrip, 64, mesh::ROUND_TRIP_POOL3).wait(Wait::Default),
    );
    // What picking one of three instances costs, by each strategy.
    for (transport, fns) in [
        (PICK_P2C, pick::P2C),
        (PICK_ROUND_ROBIN, pick::ROUND_ROBIN),
        (PICK_MAGLEV, pick::MAGLEV),
    ] {
        all.push(Scenario::new(transport, Kind::RoundTrip, 16, fns));
    }
    // Calls per second, one after another and 256 in flight from one
    // runtime thread.
    for in_flight in [1, MESH_IN_FLIGHT] {
        all.push(
            Scenario::new(MESH, Kind::Throughput, 64, mesh::CALLS)
                .wait(Wait::Default)
                .batch(in_flight),
        );
    }
    // The same 256 from one task, through `call_many`.
    all.push(
        Scenario::new(MESH_MANY, Kind::Throughput, 64, mesh::CALLS_MANY)
            .wait(Wait::Default)
            .batch(MESH_IN_FLIGHT),
    );
    // What a serving process costs at 1k, 10k and 100k calls a second,
    // beside a Unix-socket echo at the same rates, and idle with 200
    // services.
    for rate in CPU_RATES {
        all.push(Scenario::new(UDS, Kind::Cpu, 64, uds::CPU).rate(rate));
        all.push(
            Scenario::new(MESH, Kind::Cpu, 64, mesh::CPU)
                .wait(Wait::Default)
                .rate(rate),
        );
    }
    all.push(
        Scenario::new(MESH_IDLE, Kind::Cpu, 64, mesh::IDLE)
            .wait(Wait::Default)
            .rate(0),
    );
    // A short deadline kept while the link's reader waits: each iteration
    // takes the 3 ms timeout, so a few hundred suffice.
    all.push(
        Scenario::new(MESH_DEADLINE, Kind::RoundTrip, 8, mesh::CALLBACK_DEADLINE)
            .wait(Wait::Default)
            .iterations_at_most(300),
    );
    all.push(
        Scenario::new(PUBSUB_ECHO, Kind::RoundTrip, 64, mesh::PUBSUB_ECHO)
            .wait(Wait::Default)
            .in_demo(),
    );
    all.push(
        Scenario::new(PUBSUB_1, Kind::Throughput, 64, mesh::PUBSUB_1)
            .wait(Wait::Default)
            .in_demo(),
    );
    all.push(
        Scenario::new(PUBSUB_4, Kind::Throughput, 64, mesh::PUBSUB_4)
            .wait(Wait::Default)
            .in_demo(),
    );
    all.push(
        Scenario::new(
            PUBSUB_1_BY_NAME,
            Kind::Throughput,
            64,
            mesh::PUBSUB_1_BY_NAME,
        )
        .wait(Wait::Default),
    );
    // The same with `publish_many`, 32 messages at a time.
    for (transport, fns) in [(PUBSUB_1, mesh::PUBSUB_1), (PUBSUB_4, mesh::PUBSUB_4)] {
        all.push(
            Scenario::new(transport, Kind::Throughput, 64, fns)
                .wait(Wait::Default)
                .batch(SHM_BATCH),
        );
    }

    // The network: raw TCP and tokio-rustls echoes beside commy-net and
    // mesh.call over TLS, round trips and 64 B pipelined on one connection.
    for size in MESH_SIZES {
        all.push(Scenario::new(TCP, Kind::RoundTrip, size, tls::TCP_RT));
        all.push(Scenario::new(RUSTLS, Kind::RoundTrip, size, tls::RUSTLS_RT));
        all.push(Scenario::new(NET_TLS, Kind::RoundTrip, size, tls::NET_RT));
        all.push(Scenario::new(MESH_TLS, Kind::RoundTrip, size, tls::MESH_RT));
    }
    all.push(Scenario::new(
        NET_TLS,
        Kind::Throughput,
        64,
        tls::NET_PIPELINED,
    ));
    all.push(Scenario::new(
        MESH_TLS,
        Kind::Throughput,
        64,
        tls::MESH_PIPELINED,
    ));
    // The Node SDK between two Node processes, beside a Node `net` echo
    // measured by the same client code (baseline first).
    all.push(
        Scenario::new(NODE_NET, Kind::RoundTrip, 64, node::NET_ROUND_TRIP).wait(Wait::Default),
    );
    all.push(
        Scenario::new(NODE_COMMY, Kind::RoundTrip, 64, node::COMMY_ROUND_TRIP).wait(Wait::Default),
    );
    all.push(
        Scenario::new(NODE_NET, Kind::Throughput, 64, node::NET_THROUGHPUT)
            .wait(Wait::Default)
            .batch(node::IN_FLIGHT)
            .long_warmup(),
    );
    all.push(
        Scenario::new(NODE_COMMY, Kind::Throughput, 64, node::COMMY_THROUGHPUT)
            .wait(Wait::Default)
            .batch(node::IN_FLIGHT)
            .long_warmup(),
    );

    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_baselines_exist() {
        let all = scenarios();
        let mut names: Vec<_> = all.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate scenario names");
        for size in SIZES {
            for kind in [Kind::RoundTrip, Kind::Throughput] {
                assert!(
                    all.iter()
                        .any(|s| s.transport == UDS && s.size == size && s.kind == kind),
                    "no UDS baseline for {kind:?} {size}"
                );
            }
        }
        assert!(all.iter().any(|s| s.transport == FLOOR));
    }
}
