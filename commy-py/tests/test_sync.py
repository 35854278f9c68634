"""The blocking API: calls, errors, handlers, pub/sub, regions, the GIL, Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, List, Set, Type

import pytest

import commy

from conftest import LONG, Child, python_child


def test_call_and_decorator(mesh: commy.Mesh) -> None:
    @mesh.service("echo")
    def echo(data: bytes) -> bytes:
        return data

    svc = mesh.serve("upper", lambda d: d.upper())
    assert svc.name == "upper" and svc.serving
    assert mesh.call("echo", b"hi", timeout=1.0) == b"hi"
    assert mesh.call("upper", bytearray(b"abc")) == b"ABC"
    assert mesh.call("echo", memoryview(b"xyz")[1:]) == b"yz"
    assert mesh.call("echo", b"") == b""
    big = bytes(range(256)) * 4096  # 1 MiB
    assert mesh.call("echo", big, timeout=LONG) == big
    # A handler may return any bytes-like object.
    mesh.serve("ba", lambda d: bytearray(d) + b"!")
    assert mesh.call("ba", b"x") == b"x!"


@pytest.mark.parametrize("cls", list(commy.BY_CODE.values()), ids=lambda c: c.code)
def test_each_status_reaches_the_caller_as_its_class(
    mesh: commy.Mesh, cls: Type[commy.CommyError]
) -> None:
    def fail(data: bytes) -> bytes:
        raise cls(f"failed with {cls.code}")

    mesh.serve("fails", fail)
    with pytest.raises(cls) as info:
        mesh.call("fails", b"")
    err = info.value
    assert isinstance(err, commy.CommyError)
    assert err.code == cls.code
    assert err.message == f"failed with {cls.code}"
    assert str(err) == f"{cls.code}: failed with {cls.code}"


def test_a_handler_exception_is_internal_and_the_service_keeps_serving(
    mesh: commy.Mesh, capfd: pytest.CaptureFixture[str]
) -> None:
    calls = []

    def flaky(data: bytes) -> bytes:
        calls.append(data)
        if data == b"boom":
            raise KeyError("no such thing")
        return b"ok " + data

    mesh.serve("flaky", flaky)
    with pytest.raises(commy.Internal) as info:
        mesh.call("flaky", b"boom")
    assert "KeyError" in info.value.message and "no such thing" in info.value.message
    assert mesh.call("flaky", b"after") == b"ok after"
    # A wrong return type is the handler's bug too.
    wrong: Any = lambda d: 42
    mesh.serve("wrong", wrong)
    with pytest.raises(commy.Internal, match="bytes-like"):
        mesh.call("wrong", b"")
    assert "KeyError" in capfd.readouterr().err  # the traceback, on the service's side
    assert calls == [b"boom", b"after"]


def test_errors_of_the_mesh_itself(mesh: commy.Mesh) -> None:
    with pytest.raises(commy.NotFound, match="nobody"):
        mesh.call("nobody", b"x")
    with pytest.raises(commy.InvalidArgument, match="bad name"):
        mesh.call("bad name!", b"x")
    with pytest.raises(TypeError, match="not str"):
        mesh.call("x", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes-like"):
        mesh.call("x", 12)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        mesh.call("x", b"", timeout=-1)
    with pytest.raises(commy.InvalidArgument):
        mesh.call("x", b"", timeout=float("nan"))

    def slow(data: bytes) -> bytes:
        time.sleep(2.0)
        return data

    mesh.serve("slow", slow)
    started = time.monotonic()
    with pytest.raises(commy.DeadlineExceeded):
        mesh.call("slow", b"", timeout=0.1)
    # The caller gives up at its deadline, not when the handler is done.
    assert time.monotonic() - started < 1.9
    with pytest.raises(TimeoutError):  # DeadlineExceeded is a TimeoutError
        mesh.call("slow", b"", timeout=0.05)


def test_bad_mesh_options_are_refused(runtime_dir: str) -> None:
    with pytest.raises(commy.InvalidArgument, match="mesh name"):
        commy.Mesh("no spaces allowed")
    with pytest.raises(commy.InvalidArgument, match="call_spin"):
        commy.Mesh(call_spin=-1.0)
    with pytest.raises(commy.InvalidArgument, match="max_concurrency"):
        commy.Mesh(max_concurrency=0)
    with pytest.raises(commy.Unavailable, match="runtime"):
        commy.Mesh(runtime_dir="/proc/not-a-runtime-dir")


def test_settings_are_taken_by_key_and_say_where_they_came_from(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMMY_MAX_CONCURRENCY", "7")
    with commy.Mesh(transport="shm", default_timeout=1.5) as m:
        assert m.explain("transport") == ('"shm"', "Python options")
        assert m.explain("default_timeout") == ('"1500ms"', "Python options")
        assert m.explain("max_concurrency") == ("7", "$COMMY_MAX_CONCURRENCY")
        assert m.explain("call_spin") == ('"50us"', "default")
        assert m.explain("colour") is None
    with pytest.raises(commy.InvalidArgument, match="colour.*Python options|Python options.*colour"):
        commy.Mesh(colour="blue")
    with pytest.raises(commy.InvalidArgument, match=r"\$COMMY_TRANSPORT"):
        monkeypatch.setenv("COMMY_TRANSPORT", "pigeon")
        commy.Mesh()
    monkeypatch.delenv("COMMY_TRANSPORT")
    with pytest.raises(TypeError, match="setting peers"):
        commy.Mesh(peers={"a": 1})


def test_idempotent_calls_go_around_a_failing_instance(runtime_dir: str) -> None:
    failing, working = commy.Mesh(), commy.Mesh()

    def fail(data: bytes) -> bytes:
        raise commy.Unavailable("this instance fails on purpose")

    failing.serve("flaky", fail)
    working.serve("flaky", lambda d: b"ok")
    try:
        with commy.Mesh(
            idempotent=["flaky"], eject_after=0, eject_success_percent=0, ejection_time=0.5
        ) as client:
            assert client.explain("idempotent") == ('["flaky"]', "Python options")
            assert client.explain("ejection_time") == ('"500ms"', "Python options")
            # Each call that reaches the failing instance is tried again on
            # the other.
            assert all(client.call("flaky", b"", timeout=LONG) == b"ok" for _ in range(50))
        with commy.Mesh() as plain:
            failures = 0
            for _ in range(50):
                try:
                    plain.call("flaky", b"")
                except commy.Unavailable:
                    failures += 1
            # Not idempotent: at most the five failures that eject it.
            assert 1 <= failures <= 5
            # Marked idempotent per call: retried on the working one.
            assert all(plain.call("flaky", b"", idempotent=True) == b"ok" for _ in range(20))
            states = sorted(e["state"] for e in plain.endpoints("flaky"))
            assert states == (["ejected", "in"] if failures == 5 else ["in", "in"])
            for e in plain.endpoints("flaky"):
                assert e["linked"] and e["in_flight"] == 0 and e["round_trip"] is None
                if e["state"] == "ejected":
                    assert e["failed_calls"] == 5 and e["ejections"] == 1
                    assert 0 < e["ejected_for"] <= 30
    finally:
        failing.close()
        working.close()
    with pytest.raises(commy.InvalidArgument, match="max_ejected_percent"):
        commy.Mesh(max_ejected_percent=101)
    with pytest.raises(commy.InvalidArgument, match="idempotent"):
        commy.Mesh(idempotent=["no spaces"])


def test_hedged_calls_go_around_a_stalling_instance(runtime_dir: str) -> None:
    stalling, working = commy.Mesh(), commy.Mesh()
    stall = threading.Event()

    def maybe_stall(data: bytes) -> bytes:
        if stall.is_set():
            time.sleep(1.0)
        return b"late"

    stalling.serve("slow", maybe_stall)
    working.serve("slow", lambda d: b"ok")
    try:
        with commy.Mesh(idempotent=["slow"], hedge=["slow=5ms"], retry_budget_percent=100) as client:
            assert client.explain("hedge") == ('["slow=5ms"]', "Python options")
            # Linked to both first: a hedge goes to an instance other than
            # the first attempt's once that one is linked.
            seen: Set[bytes] = set()
            while len(seen) < 2:
                seen.add(client.call("slow", b"", timeout=LONG))
            stall.set()
            # A call that went to the stalling instance went to the other
            # 5 ms later, whose answer came first.
            assert [client.call("slow", b"", timeout=LONG) for _ in range(10)] == [b"ok"] * 10
    finally:
        stalling.close()
        working.close()
    with pytest.raises(commy.InvalidArgument, match="hedge"):
        commy.Mesh(hedge=["slow=soon"])


def test_a_handlers_calls_inherit_its_requests_deadline(runtime_dir: str) -> None:
    with commy.Mesh() as far, commy.Mesh() as near, commy.Mesh() as client:
        given: List[Any] = []

        def slow(data: bytes, ctx: commy.HandlerContext) -> bytes:
            given.append(ctx.time_left)
            time.sleep(2.0)
            return b"late"

        far.serve("slow", slow)
        outcome: List[Any] = []

        def relay(data: bytes) -> bytes:
            started = time.monotonic()
            try:
                # No timeout of its own: the caller's deadline applies.
                near.call("slow", data)
                outcome.append(("answered", time.monotonic() - started))
            except commy.DeadlineExceeded:
                outcome.append(("deadline", time.monotonic() - started))
            return b"relayed"

        near.serve("relay", relay)
        with pytest.raises(commy.DeadlineExceeded):
            client.call("relay", b"", timeout=0.4)
        deadline = time.monotonic() + 5
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outcome and outcome[0][0] == "deadline", outcome
        assert outcome[0][1] < 1.5, outcome
        # `slow` was given what was left of the first caller's 0.4 s.
        assert len(given) == 1 and given[0] is not None and 0 < given[0] <= 0.4, given


def test_a_rolling_restart_fails_no_call(runtime_dir: str) -> None:
    servers = [commy.Mesh() for _ in range(3)]
    services = [server.serve("echo", lambda d: d) for server in servers]
    stop = threading.Event()
    answered: List[int] = []
    failures: List[str] = []

    def caller(n: int) -> None:
        with commy.Mesh() as client:
            count = 0
            while not stop.is_set():
                msg = bytes([n, count % 251])
                try:
                    assert client.call("echo", msg) == msg
                    count += 1
                except commy.CommyError as e:
                    failures.append(str(e))
            answered.append(count)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for i in range(3):
            services[i].close()  # drains: no call of a client fails
            services[i] = servers[i].serve("echo", lambda d: d)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        for server in servers:
            server.close()
    assert failures == []
    assert len(answered) == 4 and all(n > 50 for n in answered), answered


def test_a_hash_key_keeps_calls_on_one_instance(runtime_dir: str) -> None:
    servers = [commy.Mesh() for _ in range(3)]
    for i, server in enumerate(servers):
        server.serve("shard", lambda d, i=i: bytes([i]))
    try:
        with commy.Mesh(balance=["shard=maglev"]) as a, commy.Mesh(balance="maglev") as b:
            owners = set()
            for n in range(30):
                key = f"user-{n}"
                first = a.call("shard", b"", hash_key=key)
                assert all(a.call("shard", b"", hash_key=key) == first for _ in range(3))
                # Another handle (another process, another SDK) agrees; a
                # key may be bytes too.
                assert b.call("shard", b"", hash_key=key.encode()) == first
                owners.add(first)
            assert len(owners) == 3
            with pytest.raises(TypeError, match="hash_key"):
                a.call("shard", b"", hash_key=42)  # type: ignore[arg-type]
        with pytest.raises(commy.InvalidArgument, match="unknown strategy"):
            commy.Mesh(balance=["shard=random"])
    finally:
        for server in servers:
            server.close()


def test_a_closed_mesh_refuses(runtime_dir: str) -> None:
    m = commy.Mesh()
    m.serve("svc", lambda d: d)
    m.close()
    assert m.closed
    with pytest.raises(commy.FailedPrecondition, match="closed"):
        m.call("svc", b"")
    m.close()  # twice is fine


def test_one_way_send(mesh: commy.Mesh) -> None:
    got: List[bytes] = []
    done = threading.Event()

    def sink(data: bytes) -> bytes:
        got.append(data)
        done.set()
        return b""

    mesh.serve("sink", sink)
    mesh.send("sink", b"fire and forget")
    assert done.wait(LONG)
    assert got == [b"fire and forget"]


def test_publish_subscribe_and_close_ends_iteration(mesh: commy.Mesh) -> None:
    sub = mesh.subscribe("news/eu")
    assert sub.topic == "news/eu" and sub.group is None
    deadline = time.monotonic() + LONG
    while mesh.publish("news/eu", b"probe") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for i in range(5):
        assert mesh.publish("news/eu", b"item %d" % i) == 1
    received: List[commy.Message] = []

    def consume() -> None:
        for msg in sub:
            if msg.data != b"probe":
                received.append(msg)
            if len(received) == 5:
                break
        # Then wait for the close to end the next iteration.
        assert sub.next() is None

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + LONG
    while len(received) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    sub.close()
    t.join(LONG)
    assert not t.is_alive()
    assert [m.data for m in received] == [b"item %d" % i for i in range(5)]
    assert all(m.topic == "news/eu" for m in received)
    with pytest.raises(commy.DeadlineExceeded):
        mesh.subscribe("quiet").next(timeout=0.05)


def test_queue_group_members_share_messages(mesh: commy.Mesh) -> None:
    a = mesh.subscribe("jobs", group="workers")
    b = mesh.subscribe("jobs", group="workers")
    assert a.group == "workers"
    deadline = time.monotonic() + LONG
    while mesh.publish("jobs", b"probe") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for i in range(20):
        assert mesh.publish("jobs", b"job %d" % i) == 1  # one member of the group
    seen: List[bytes] = []
    deadline = time.monotonic() + LONG
    while len(seen) < 20:
        assert time.monotonic() < deadline, sorted(seen)
        for s in (a, b):
            try:
                m = s.next(timeout=0.05)
            except commy.DeadlineExceeded:
                continue
            assert m is not None
            if m.data != b"probe":
                seen.append(m.data)
    assert sorted(seen) == sorted(b"job %d" % i for i in range(20))
    # Each job went to exactly one member: nothing more arrives.
    for s in (a, b):
        with pytest.raises(commy.DeadlineExceeded):
            while True:
                extra = s.next(timeout=0.2)
                assert extra is not None and extra.data == b"probe", extra


def test_region_buffer_is_the_shared_memory(mesh: commy.Mesh, runtime_dir: str) -> None:
    with mesh.region("state", size=10_000) as r:
        assert r.size == 10_000 and len(r.buffer) == 10_000
        assert not r.buffer.readonly
        r.buffer[0:5] = b"hello"
        # Another handle (another mesh handle, same name) sees the bytes at once.
        with commy.Mesh() as other, other.region("state") as r2:
            assert bytes(r2.buffer[0:5]) == b"hello"
            r2.buffer[100:103] = b"abc"
            assert bytes(r.buffer[100:103]) == b"abc"
            assert r.read(100, 3) == b"abc"
            r2.write(200, b"locked write")
            assert bytes(r.buffer[200:212]) == b"locked write"
            assert r.refcount == 2
        with pytest.raises(commy.AlreadyExists):
            mesh.region("state", size=10_000, create=True)
        with pytest.raises(commy.FailedPrecondition):
            mesh.region("state", size=5, create=False)
        with pytest.raises(commy.InvalidArgument):
            r.read(9_990, 20)
    with pytest.raises(commy.NotFound):
        mesh.region("missing")
    with pytest.raises(commy.InvalidArgument):
        mesh.region("bad/name", size=10)


def test_the_gil_is_released_while_a_call_waits(mesh: commy.Mesh, children: List[Child]) -> None:
    # A slow service in another process: while this thread waits for it,
    # another Python thread of this process must keep running.
    server = python_child(
        "import commy, time\n"
        "with commy.Mesh() as m:\n"
        "    m.serve('slow', lambda d: (time.sleep(0.5), d)[1])\n"
        "    print('ready', flush=True)\n"
        "    m.wait()\n"
    )
    children.append(server)
    server.expect("ready")
    ticks = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        before = ticks[0]
        assert mesh.call("slow", b"zzz", timeout=LONG) == b"zzz"
        progressed = ticks[0] - before
    finally:
        stop.set()
        t.join()
    assert progressed > 1000, progressed


def test_ctrl_c_interrupts_a_blocking_call(runtime_dir: str, children: List[Child]) -> None:
    client = python_child(
        "import commy, signal, threading, time\n"
        # A child started from a background job inherits SIGINT ignored.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "with commy.Mesh() as m:\n"
        "    m.serve('never', lambda d: (time.sleep(60), d)[1])\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        "        print('calling', flush=True)\n"
        "        m.call('never', b'', timeout=60)\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted after %.2f' % (time.monotonic() - t), flush=True)\n"
    )
    children.append(client)
    client.expect("calling")
    time.sleep(0.3)
    client.proc.send_signal(signal.SIGINT)
    line = client.expect("interrupted after")
    assert float(line.split()[-1]) < 10
    # The handler still sleeps; the process exits once it is done with it.
    client.stop(signal.SIGKILL)


def test_wait_returns_when_closed_from_another_thread(runtime_dir: str) -> None:
    m = commy.Mesh()
    assert m.wait(0.01) is False
    threading.Timer(0.1, m.close).start()
    assert m.wait(LONG) is True


def test_many_threads_call_at_once_and_handlers_may_call_services(mesh: commy.Mesh) -> None:
    mesh.serve("inner", lambda d: d[::-1])
    # A handler that itself calls a service (from commy's link thread).
    mesh.serve("outer", lambda d: b"<" + mesh.call("inner", d, timeout=LONG) + b">")
    errors: List[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(200):
                data = b"%d-%d" % (k, i)
                assert mesh.call("outer", data, timeout=LONG) == b"<" + data[::-1] + b">"
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG * 2)
    assert not errors, errors


def test_a_handler_with_a_context_sees_its_caller(mesh: commy.Mesh) -> None:
    contexts: List[commy.HandlerContext] = []

    @mesh.service("whoami")
    def whoami(data: bytes, context: commy.HandlerContext) -> bytes:
        contexts.append(context)
        return data

    # A second parameter with a default is not asked for a context.
    def defaulted(data: bytes, suffix: bytes = b"!") -> bytes:
        return data + suffix

    mesh.serve("defaulted", defaulted)
    assert mesh.call("whoami", b"hi", timeout=LONG) == b"hi"
    assert mesh.call("defaulted", b"hi", timeout=LONG) == b"hi!"
    # Over shared memory, from this very process.
    caller = contexts[0].caller
    assert (caller.kind, caller.uid, caller.gid, caller.pid) == (
        "local",
        os.geteuid(),
        os.getegid(),
        os.getpid(),
    )
    assert caller.identity is None and caller.addr is None
    assert contexts[0].caller is caller  # made once per request
    assert caller == commy.Caller("local", uid=os.geteuid(), gid=os.getegid(), pid=os.getpid())
    assert hash(caller) == hash(commy.Caller("local", uid=os.geteuid(), gid=os.getegid(), pid=os.getpid()))
    assert caller != commy.Caller("remote", identity="spiffe://default/x", addr="10.0.0.1:7443")
    assert repr(caller) == (
        f"commy.Caller(kind='local', uid={os.geteuid()}, gid={os.getegid()}, "
        f"pid={os.getpid()}, identity=None, addr=None)"
    )
    with pytest.raises(AttributeError):
        caller.uid = 0  # type: ignore[misc]


def test_waiting_for_subscribers_and_taking_without_waiting(mesh: commy.Mesh) -> None:
    with pytest.raises(commy.DeadlineExceeded, match="0 of 1 subscribers"):
        mesh.wait_for_subscribers("counted", 1, timeout=0.05)
    sub = mesh.subscribe("counted")
    members = [mesh.subscribe("counted", group="workers") for _ in range(2)]
    assert mesh.wait_for_subscribers("counted", 2, timeout=LONG) == 2
    assert mesh.subscribers("counted") == 2
    assert sub.try_next() is None
    assert mesh.publish("counted", b"m") == 2
    deadline = time.monotonic() + LONG
    msg = sub.try_next()
    while msg is None and time.monotonic() < deadline:
        time.sleep(0.001)
        msg = sub.try_next()
    assert msg == commy.Message("counted", b"m")
    assert sub.try_next() is None
    sub.close()
    assert sub.try_next() is None
    assert all(not m.closed for m in members)


def test_publish_many_keeps_order_and_names_a_bad_item(mesh: commy.Mesh) -> None:
    sub = mesh.subscribe("burst")
    assert mesh.wait_for_subscribers("burst", 1, timeout=LONG) == 1
    assert mesh.publish_many("burst", [b"a", bytearray(b"b"), memoryview(b"c")]) == 3
    assert mesh.publish_many("burst", (b"%d" % i for i in range(100))) == 100
    assert mesh.publish_many("burst", []) == 0
    with pytest.raises(TypeError, match=r"data\[1\] must be bytes-like, not str"):
        mesh.publish_many("burst", [b"x", "y"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a single one"):
        mesh.publish_many("burst", b"abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be an iterable"):
        mesh.publish_many("burst", 42)  # type: ignore[arg-type]
    got = []
    for _ in range(103):
        msg = sub.next(timeout=LONG)
        assert msg is not None
        got.append(msg.data)
    assert got == [b"a", b"b", b"c"] + [b"%d" % i for i in range(100)]
    assert sub.try_next() is None


def test_a_publisher_publishes_on_its_topic_from_several_threads(mesh: commy.Mesh) -> None:
    ticks = mesh.publisher("ticks")
    assert ticks.topic == "ticks" and "ticks" in repr(ticks)
    assert ticks.publish(b"nobody") == 0
    sub = mesh.subscribe("ticks", linger=0.0)
    assert mesh.wait_for_subscribers("ticks", 1, timeout=LONG) == 1
    assert ticks.publish(bytearray(b"1")) == 1
    assert ticks.publish_many([b"2", memoryview(b"3")]) == 2

    def stream(tag: bytes) -> None:
        for i in range(200):
            assert ticks.publish(tag + b"%d" % i) == 1

    threads = [threading.Thread(target=stream, args=(tag,)) for tag in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [m.data for m in sub.next_batch(3, timeout=LONG)]
    while len(got) < 403:
        got.extend(m.data for m in sub.next_batch(64, timeout=LONG))
    assert got[:3] == [b"1", b"2", b"3"]
    for tag in (b"a", b"b"):
        assert [d for d in got[3:] if d[:1] == tag] == [tag + b"%d" % i for i in range(200)]
    with pytest.raises(TypeError, match="must be bytes-like"):
        ticks.publish("text")  # type: ignore[arg-type]
    with pytest.raises(commy.InvalidArgument):
        mesh.publisher("bad topic")


def test_slow_subscriber_policies_count_on_both_sides(mesh: commy.Mesh) -> None:
    dropping = mesh.subscribe("slow", queue=8, policy="drop-oldest")
    ending = mesh.subscribe("slow", queue=4, policy="disconnect")
    assert mesh.wait_for_subscribers("slow", 2, timeout=LONG) == 2
    assert dropping.dropped == 0 and dropping.end_reason is None
    for i in range(100):
        mesh.publish("slow", b"%d" % i)
    # Messages reach the queues on the subscriptions' own threads: with
    # nobody reading, all but the last 8 are dropped.
    received, deadline = 0, time.monotonic() + LONG
    while dropping.dropped < 100 - 8:
        assert time.monotonic() < deadline, dropping.dropped
        time.sleep(0.001)
    while received + dropping.dropped < 100:
        assert time.monotonic() < deadline, (received, dropping.dropped)
        if dropping.try_next() is None:
            time.sleep(0.001)
        else:
            received += 1
    assert (received, dropping.dropped) == (8, 100 - 8)
    assert mesh.dropped_by_subscribers("slow") == dropping.dropped
    assert dropping.end_reason is None
    # Disconnect: the subscription ends once its queue was full, keeping
    # what it held, and says why.
    while ending.end_reason is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert len(list(ending)) == 4
    reason = ending.end_reason
    assert isinstance(reason, commy.ResourceExhausted), reason
    assert "queue of 4 was full" in str(reason)
    assert ending.dropped >= 1
    with pytest.raises(commy.InvalidArgument, match='unknown slow-subscriber policy "fast"'):
        mesh.subscribe("slow", policy="fast")  # type: ignore[arg-type]
    with pytest.raises(commy.InvalidArgument, match="1 to 1048576 messages, not 0"):
        mesh.subscribe("slow", queue=0)
    with pytest.raises(commy.InvalidArgument, match="linger must be at most 100"):
        mesh.subscribe("slow", linger=0.5)
    with pytest.raises(commy.InvalidArgument, match="linger must be a finite number"):
        mesh.subscribe("slow", linger=-1.0)
    with pytest.raises(commy.InvalidArgument, match="invalid topic"):
        mesh.dropped_by_subscribers("bad topic")


def test_next_batch_takes_what_has_come_in_order(mesh: commy.Mesh) -> None:
    sub = mesh.subscribe("batched")
    assert mesh.wait_for_subscribers("batched", 1, timeout=LONG) == 1
    assert mesh.publish_many("batched", (b"%d" % i for i in range(500))) == 500
    got: List[bytes] = []
    while len(got) < 500:
        batch = sub.next_batch(64, timeout=LONG)
        assert 1 <= len(batch) <= 64
        assert all(m.topic == "batched" for m in batch)
        got.extend(m.data for m in batch)
    assert got == [b"%d" % i for i in range(500)]
    with pytest.raises(commy.DeadlineExceeded):
        sub.next_batch(8, timeout=0.01)
    with pytest.raises(ValueError, match="max must be a positive int, not 0"):
        sub.next_batch(0)
    sub.close()
    assert sub.next_batch() == []


def test_call_many_returns_each_reply_or_error_in_order(mesh: commy.Mesh) -> None:
    mesh.serve("echo", lambda d: d)

    def picky(data: bytes) -> bytes:
        if data == b"no":
            raise commy.PermissionDenied("not this one")
        return data.upper()

    mesh.serve("picky", picky)
    requests = [b"%d" % i for i in range(1000)]
    assert mesh.call_many("echo", requests) == requests
    assert mesh.call_many("echo", (bytearray(b"x"), memoryview(b"yz"))) == [b"x", b"yz"]
    assert mesh.call_many("echo", []) == []
    answers = mesh.call_many("picky", [b"a", b"no", b"b"], timeout=LONG)
    assert answers[0] == b"A" and answers[2] == b"B"
    assert isinstance(answers[1], commy.PermissionDenied), answers[1]
    assert "not this one" in str(answers[1])
    with pytest.raises(TypeError, match="not a single one"):
        mesh.call_many("echo", b"abc")  # type: ignore[arg-type]
