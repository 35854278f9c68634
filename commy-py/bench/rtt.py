"""Python-to-Python round trips (64 B) through commy, beside pyzmq REQ/REP
over ipc:// and multiprocessing.Pipe, measured the same way in one run.

Run by ``cargo xtask bench`` (which prints its JSON rows into
docs/BENCHMARKS.md); by hand::

    python commy-py/bench/rtt.py [--quick] [--runs K] [--filter TEXT]... [--json]

Each scenario starts a server process that echoes, waits until it answers,
then times ``iterations`` sequential round trips after ``warmup`` untimed
ones, with ``time.perf_counter_ns`` around each. The processes are not
pinned unless ``--pin`` is given. Each scenario runs ``runs`` times; p50 and
p99 are the medians across runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

SIZE = 64
#: Pin the two processes to different CPUs (--pin); off by default, see --help.
PIN = False


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def percentiles(samples: List[int]) -> Tuple[float, float, float]:
    samples.sort()
    n = len(samples)
    at = lambda q: float(samples[min(n - 1, int(n * q))])  # noqa: E731
    return at(0.5), at(0.99), at(0.999)


def timed(call: Callable[[bytes], bytes], iterations: int, warmup: int) -> List[int]:
    payload = bytes(range(SIZE))
    for _ in range(warmup):
        if call(payload) != payload:
            raise RuntimeError("wrong echo")
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        t = clock()
        reply = call(payload)
        samples.append(clock() - t)
        if reply != payload:
            raise RuntimeError("wrong echo")
    return samples


# --- commy ------------------------------------------------------------------

COMMY_SERVER = """
import commy, os, sys
os.sched_setaffinity(0, {int(sys.argv[1])}) if sys.argv[1] != "-" else None
with commy.Mesh() as mesh:
    mesh.serve("bench-echo", lambda d: d)
    print("ready", flush=True)
    mesh.wait()
"""


def server_cpu() -> str:
    if not PIN:
        return "-"
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        return str(sorted(os.sched_getaffinity(0))[1])
    return "-"


def run_commy(iterations: int, warmup: int) -> List[int]:
    import commy

    rt = tempfile.mkdtemp(prefix="cpyb-", dir="/tmp")
    os.chmod(rt, 0o700)
    env = dict(os.environ, COMMY_RUNTIME_DIR=rt)
    server = subprocess.Popen(
        [sys.executable, "-c", COMMY_SERVER, server_cpu()], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("ready")
        os.environ["COMMY_RUNTIME_DIR"] = rt
        with commy.Mesh() as mesh:
            deadline = time.monotonic() + 30
            while True:
                try:
                    mesh.call("bench-echo", b"", timeout=30)
                    break
                except commy.NotFound:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            return timed(lambda b: mesh.call("bench-echo", b, timeout=30), iterations, warmup)
    finally:
        server.terminate()
        server.wait(30)


def run_commy_asyncio(iterations: int, warmup: int) -> List[int]:
    import asyncio

    import commy

    rt = tempfile.mkdtemp(prefix="cpyb-", dir="/tmp")
    os.chmod(rt, 0o700)
    env = dict(os.environ, COMMY_RUNTIME_DIR=rt)
    server = subprocess.Popen(
        [sys.executable, "-c", COMMY_SERVER, server_cpu()], stdout=subprocess.PIPE, text=True, env=env
    )

    async def client() -> List[int]:
        async with commy.AsyncMesh() as mesh:
            deadline = time.monotonic() + 30
            while True:
                try:
                    await mesh.call("bench-echo", b"", timeout=30)
                    break
                except commy.NotFound:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.01)
            payload = bytes(range(SIZE))
            for _ in range(warmup):
                await mesh.call("bench-echo", payload, timeout=30)
            samples = []
            clock = time.perf_counter_ns
            for _ in range(iterations):
                t = clock()
                reply = await mesh.call("bench-echo", payload, timeout=30)
                samples.append(clock() - t)
                if reply != payload:
                    raise RuntimeError("wrong echo")
            return samples

    try:
        assert server.stdout is not None and server.stdout.readline().startswith("ready")
        os.environ["COMMY_RUNTIME_DIR"] = rt
        return asyncio.run(client())
    finally:
        server.terminate()
        server.wait(30)


# --- pyzmq ------------------------------------------------------------------

ZMQ_SERVER = """
import os, sys, zmq
os.sched_setaffinity(0, {int(sys.argv[2])}) if sys.argv[2] != "-" else None
ctx = zmq.Context()
s = ctx.socket(zmq.REP)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    s.send(s.recv())
"""


def run_zmq(iterations: int, warmup: int) -> List[int]:
    import zmq

    d = tempfile.mkdtemp(prefix="cpyz-", dir="/tmp")
    addr = f"ipc://{d}/echo"
    server = subprocess.Popen(
        [sys.executable, "-c", ZMQ_SERVER, addr, server_cpu()], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().startswith("ready")
        ctx = zmq.Context()
        s = ctx.socket(zmq.REQ)
        s.connect(addr)

        def call(b: bytes) -> bytes:
            s.send(b)
            reply: bytes = s.recv()
            return reply

        try:
            return timed(call, iterations, warmup)
        finally:
            s.close(linger=0)
            ctx.term()
    finally:
        server.terminate()
        server.wait(30)


# --- multiprocessing.Pipe ---------------------------------------------------


def pipe_server(conn: Any, cpu: str) -> None:
    if cpu != "-":
        os.sched_setaffinity(0, {int(cpu)})
    try:
        while True:
            conn.send_bytes(conn.recv_bytes())
    except EOFError:
        pass


def run_pipe(iterations: int, warmup: int) -> List[int]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(target=pipe_server, args=(theirs, server_cpu()), daemon=True)
    server.start()
    theirs.close()

    def call(b: bytes) -> bytes:
        ours.send_bytes(b)
        reply: bytes = ours.recv_bytes()
        return reply

    try:
        return timed(call, iterations, warmup)
    finally:
        ours.close()
        server.join(30)


SCENARIOS: Dict[str, Tuple[str, Callable[[int, int], List[int]]]] = {
    "python/commy/64B": ("commy mesh.call, Python to Python", run_commy),
    "python/commy-asyncio/64B": ("commy await mesh.call (AsyncMesh), Python to Python", run_commy_asyncio),
    "python/pyzmq-ipc/64B": ("pyzmq REQ/REP over ipc://", run_zmq),
    "python/mp-pipe/64B": ("multiprocessing.Pipe", run_pipe),
}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few iterations and runs (a smoke test)")
    ap.add_argument("--runs", type=int, default=None, help="runs per scenario (5; --quick 3)")
    ap.add_argument("--filter", action="append", default=[], help="only scenarios whose name contains this")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin client and server to different CPUs (on a machine shared with other work this "
        "can starve commy's waiting link thread, which yields its CPU before it sleeps)",
    )
    args = ap.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    iterations, warmup = (2_000, 500) if args.quick else (20_000, 2_000)
    global PIN
    PIN = args.pin
    if PIN:
        pin(0)
    rows = []
    for name, (transport, fn) in SCENARIOS.items():
        if args.filter and not any(f in name for f in args.filter):
            continue
        p50s, p99s, p999s = [], [], []
        for _ in range(runs):
            p50, p99, p999 = percentiles(fn(iterations, warmup))
            p50s.append(p50)
            p99s.append(p99)
            p999s.append(p999)
        rows.append(
            {
                "name": name,
                "transport": transport,
                "size": SIZE,
                "wait": "default",
                "iterations": iterations,
                "warmup": warmup,
                "batch": 1,
                "kind": "round_trip",
                "p50_ns": statistics.median(p50s),
                "p99_ns": statistics.median(p99s),
                "p999_ns": statistics.median(p999s),
                "vs_uds": None,
                "vs_floor": None,
            }
        )
        if not args.json:
            print(f"{name:24} p50 {rows[-1]['p50_ns'] / 1000:8.1f} us  p99 {rows[-1]['p99_ns'] / 1000:8.1f} us", flush=True)
    if args.json:
        print(json.dumps({"runs": runs, "quick": args.quick, "pinned": PIN, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
