"""Across processes: Python clients of a Python service, and interop with the Rust CLI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from typing import List

import pytest

import commy

from conftest import LONG, Child, commy_cli, python_child, wait_for_service

SERVER = """
import os, commy
with commy.Mesh() as m:
    @m.service("whoami")
    def whoami(data: bytes) -> bytes:
        return b"%d:" % os.getpid() + data
    print("ready", os.getpid(), flush=True)
    m.wait()
"""

CLIENT = """
import sys, commy
n = int(sys.argv[1])
with commy.Mesh() as m:
    for i in range(n):
        reply = m.call("whoami", b"%s-%d" % (sys.argv[2].encode(), i), timeout=30)
        assert reply.endswith(b":%s-%d" % (sys.argv[2].encode(), i)), reply
    print("done", reply.split(b":")[0].decode(), flush=True)
"""


def test_a_python_service_with_python_clients_in_other_processes(
    runtime_dir: str, children: List[Child]
) -> None:
    server = python_child(SERVER)
    children.append(server)
    pid = server.expect("ready").split()[1]
    clients = [python_child(CLIENT, "500", f"c{i}") for i in range(3)]
    children.extend(clients)
    for c in clients:
        assert c.expect("done") == f"done {pid}"
        assert c.proc.wait(LONG) == 0
    assert server.stop() in (0, -15)


def test_a_python_client_of_the_rust_echo_server(mesh: commy.Mesh, children: List[Child]) -> None:
    server = Child([commy_cli(), "echo-server", "rust-echo"])
    children.append(server)
    server.expect("serving rust-echo as")
    assert wait_for_service(mesh, "rust-echo", b"from python") == b"from python"
    payload = bytes(range(256)) * 100
    assert mesh.call("rust-echo", payload, timeout=LONG) == payload
    assert server.stop() == 0


def test_a_python_service_called_by_the_rust_cli(mesh: commy.Mesh) -> None:
    mesh.serve("py-upper", lambda d: d.upper())

    def whoami(data: bytes, context: commy.HandlerContext) -> bytes:
        c = context.caller
        return b"%s %r %r" % (c.kind.encode(), c.uid, c.pid)

    mesh.serve("py-whoami", whoami)

    def fails(data: bytes) -> bytes:
        raise commy.Unavailable("come back later")

    mesh.serve("py-fails", fails)
    out = subprocess.run(
        [commy_cli(), "call", "py-upper", "hello from rust", "--timeout-ms", "30000"],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "HELLO FROM RUST\n"
    # The CLI is a local caller of this user, in a process of its own.
    out = subprocess.run(
        [commy_cli(), "call", "py-whoami", "x", "--timeout-ms", "30000"],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert out.returncode == 0, out.stderr
    kind, uid, pid = out.stdout.split()
    assert (kind, int(uid)) == ("local", os.geteuid())
    assert int(pid) not in (0, os.getpid())
    out = subprocess.run(
        [commy_cli(), "call", "py-fails", "x"], capture_output=True, text=True, timeout=LONG
    )
    assert out.returncode == 1
    assert out.stderr.strip() == "UNAVAILABLE: come back later"
    out = subprocess.run(
        [commy_cli(), "call", "py-nobody", "x"], capture_output=True, text=True, timeout=LONG
    )
    assert out.returncode == 1
    assert out.stderr.startswith("NOT_FOUND:")


def test_a_region_shared_with_another_process(mesh: commy.Mesh, children: List[Child]) -> None:
    r = mesh.region("board", size=4096)
    r.buffer[:5] = b"hello"
    child = python_child(
        "import commy\n"
        "with commy.Mesh() as m, m.region('board') as r:\n"
        "    print('saw', bytes(r.buffer[:5]).decode(), flush=True)\n"
        "    r.buffer[5:11] = b' world'\n"
        "    print('wrote', flush=True)\n"
    )
    children.append(child)
    assert child.expect("saw") == "saw hello"
    child.expect("wrote")
    assert child.proc.wait(LONG) == 0
    assert bytes(r.buffer[:11]) == b"hello world"
    r.close()


def test_a_forked_child_opens_its_own_mesh(mesh: commy.Mesh) -> None:
    import os

    mesh.serve("parent-echo", lambda d: b"parent:" + d)
    assert mesh.call("parent-echo", b"x") == b"parent:x"  # the runtime is running
    pid = os.fork()
    if pid == 0:  # the child: commy starts a runtime of its own here
        code = 1
        try:
            with commy.Mesh() as child:
                child.serve("child-echo", lambda d: b"child:" + d)
                ok = child.call("child-echo", b"y", timeout=LONG) == b"child:y"
                ok = ok and child.call("parent-echo", b"z", timeout=LONG) == b"parent:z"
                code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


PUBLISHER = """
import time, commy
with commy.Mesh() as m:
    print("ready", flush=True)
    # Until both subscriptions of the other host are in place here.
    for topic in ("news", "jobs"):
        while m.publish(topic, b"probe") == 0:
            time.sleep(0.01)
    for i in range(200):
        m.publish("news", b"%d" % i)
    for i in range(50):
        m.publish("jobs", b"%d" % i)
    print("published", flush=True)
    m.wait()
"""


def test_a_subscriber_with_no_listener_gets_messages_from_another_host(
    monkeypatch: pytest.MonkeyPatch, children: List[Child]
) -> None:
    # host-a: a publisher that listens over TLS, in a runtime dir of its own.
    a = tempfile.mkdtemp(prefix="cpa-", dir="/tmp")
    os.chmod(a, 0o700)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        COMMY_HOST_ID="host-a",
        COMMY_RUNTIME_DIR=a,
        XDG_CONFIG_HOME=a,
        COMMY_LISTEN=f"tls://127.0.0.1:{port}",
    )
    env.pop("COMMY_PEERS", None)
    b = tempfile.mkdtemp(prefix="cpb-", dir="/tmp")
    os.chmod(b, 0o700)
    try:
        publisher = python_child(PUBLISHER, env=env)
        children.append(publisher)
        publisher.expect("ready")
        # host-b: this process, which only connects.
        monkeypatch.setenv("COMMY_HOST_ID", "host-b")
        monkeypatch.setenv("COMMY_RUNTIME_DIR", b)
        monkeypatch.delenv("COMMY_LISTEN", raising=False)
        with commy.Mesh(
            peers=[f"tls://127.0.0.1:{port}"], tls_ca=f"{a}/commy/dev-ca/ca.pem"
        ) as m:
            news = m.subscribe("news")
            jobs = m.subscribe("jobs", group="workers")
            publisher.expect("published")
            for sub, count in ((news, 200), (jobs, 50)):
                got: List[int] = []
                while len(got) < count:
                    msg = sub.next(timeout=LONG)
                    assert msg is not None
                    if msg.data != b"probe":
                        got.append(int(msg.data))
                assert got == list(range(count)), sub.topic
        assert publisher.stop() in (0, -15)
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)
