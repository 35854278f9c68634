"""The asyncio API: calls, async and plain handlers, gather, async for, cancellation."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable, List

import pytest

import commy

from conftest import LONG


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro(), LONG * 2))


def test_async_handlers_and_calls(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:

            @mesh.service("echo")
            async def echo(data: bytes) -> bytes:
                await asyncio.sleep(0)
                return data

            @mesh.service("plain")
            def plain(data: bytes) -> bytes:
                return data[::-1]

            assert await mesh.call("echo", b"hi", timeout=1.0) == b"hi"
            assert await mesh.call("plain", b"abc") == b"cba"
            with pytest.raises(commy.NotFound):
                await mesh.call("nobody", b"")
            with pytest.raises(TypeError):
                await mesh.call("echo", "text")  # type: ignore[arg-type]

    run(main)


def test_an_idempotent_call_goes_around_a_failing_instance(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as failing, commy.AsyncMesh() as working:

            @failing.service("flaky")
            async def fail(data: bytes) -> bytes:
                raise commy.Unavailable("this instance fails on purpose")

            @working.service("flaky")
            async def ok(data: bytes) -> bytes:
                return b"ok"

            async with commy.AsyncMesh(eject_after=0, eject_success_percent=0) as client:
                replies = [await client.call("flaky", b"", idempotent=True) for _ in range(30)]
                assert replies == [b"ok"] * 30
                assert {e["state"] for e in client.endpoints("flaky")} == {"in"}

    run(main)


def test_an_async_handlers_calls_inherit_its_requests_deadline(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as far, commy.AsyncMesh() as near:
            seen: List[Any] = []

            @far.service("slow")
            async def slow(data: bytes, ctx: commy.HandlerContext) -> bytes:
                seen.append(ctx.time_left)
                await asyncio.sleep(2.0)
                return b"late"

            @near.service("relay")
            async def relay(data: bytes) -> bytes:
                # No timeout of its own: the caller's deadline applies.
                return await near.call("slow", data)

            async with commy.AsyncMesh() as client:
                with pytest.raises(commy.DeadlineExceeded):
                    await client.call("relay", b"", timeout=0.4)
            # `slow` was given what was left of the first caller's 0.4 s,
            # not the 30 s default of a call that sets none.
            assert len(seen) == 1 and seen[0] is not None and 0 < seen[0] <= 0.4, seen

    run(main)


def test_gather_of_thousands_of_calls(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:

            @mesh.service("double")
            async def double(data: bytes) -> bytes:
                return data * 2

            n = 5000
            started = time.monotonic()
            replies = await asyncio.gather(*(mesh.call("double", b"%d," % i) for i in range(n)))
            elapsed = time.monotonic() - started
            assert replies == [b"%d,%d," % (i, i) for i in range(n)]
            print(f"{n} calls in {elapsed:.2f} s")

    run(main)


def test_errors_and_the_service_keeps_serving(runtime_dir: str, capfd: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:

            @mesh.service("picky")
            async def picky(data: bytes) -> bytes:
                if data == b"denied":
                    raise commy.PermissionDenied("not for you")
                if data == b"bug":
                    raise ZeroDivisionError("oops")
                return b"fine"

            with pytest.raises(commy.PermissionDenied, match="not for you"):
                await mesh.call("picky", b"denied")
            with pytest.raises(commy.Internal, match="ZeroDivisionError"):
                await mesh.call("picky", b"bug")
            assert await mesh.call("picky", b"ok") == b"fine"

    run(main)
    assert "ZeroDivisionError" in capfd.readouterr().err


def test_a_caller_that_gives_up_cancels_the_async_handler(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:
            cancelled = asyncio.Event()
            started = asyncio.Event()

            @mesh.service("forever")
            async def forever(data: bytes) -> bytes:
                started.set()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
                return data

            with pytest.raises(commy.DeadlineExceeded):
                await mesh.call("forever", b"", timeout=0.2)
            assert started.is_set()
            await asyncio.wait_for(cancelled.wait(), LONG)

            # Cancelling the awaiting task cancels the call, and so the handler.
            started.clear()
            cancelled.clear()
            call = asyncio.ensure_future(mesh.call("forever", b"", timeout=LONG))
            await asyncio.wait_for(started.wait(), LONG)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(cancelled.wait(), LONG)

    run(main)


def test_async_for_and_publish(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:
            sub = mesh.subscribe("ticks")
            deadline = time.monotonic() + LONG
            while await mesh.publish("ticks", b"probe") == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)

            async def consume() -> List[bytes]:
                got: List[bytes] = []
                async for msg in sub:
                    assert msg.topic == "ticks"
                    if msg.data != b"probe":
                        got.append(msg.data)
                    if len(got) == 10:
                        break
                return got

            consumer = asyncio.ensure_future(consume())
            for i in range(10):
                assert await mesh.publish("ticks", b"t%d" % i) == 1
            assert await asyncio.wait_for(consumer, LONG) == [b"t%d" % i for i in range(10)]

            async def drain() -> None:
                async for _ in sub:
                    pass

            waiting = asyncio.ensure_future(drain())
            await asyncio.sleep(0.05)
            sub.close()  # ends a waiting async for
            await asyncio.wait_for(waiting, LONG)

    run(main)


def test_one_way_send_and_regions(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:
            got: "asyncio.Queue[bytes]" = asyncio.Queue()

            @mesh.service("sink")
            async def sink(data: bytes) -> bytes:
                await got.put(data)
                return b""

            await mesh.send("sink", b"one way")
            assert await asyncio.wait_for(got.get(), LONG) == b"one way"
            with mesh.region("shared", size=64) as r:
                r.buffer[:3] = b"abc"
                assert r.read(0, 3) == b"abc"

    run(main)


def test_a_mesh_belongs_to_its_loop(runtime_dir: str) -> None:
    holder: List[commy.AsyncMesh] = []

    async def first() -> None:
        m = commy.AsyncMesh()
        await m.__aenter__()
        holder.append(m)

    async def second() -> None:
        with pytest.raises(commy.FailedPrecondition, match="another event loop"):
            await holder[0].call("x", b"")

    asyncio.run(first())
    asyncio.run(second())


def test_a_closed_async_service_refuses_instead_of_hanging(runtime_dir: str) -> None:
    client = commy.Mesh()

    async def main() -> None:
        mesh = commy.AsyncMesh()
        async with mesh:
            mesh.serve("short-lived", lambda d: d)
            # The client's link to it exists before the close.
            assert await asyncio.to_thread(client.call, "short-lived", b"hi", LONG) == b"hi"

    run(main)
    started = time.monotonic()
    with pytest.raises((commy.NotFound, commy.Unavailable)):
        client.call("short-lived", b"again", timeout=LONG)
    assert time.monotonic() - started < 10
    client.close()


def test_sequential_awaits_with_either_spin_setting(runtime_dir: str) -> None:
    with pytest.raises(commy.InvalidArgument, match="call_spin"):
        commy.AsyncMesh(call_spin=-1.0)

    async def main() -> None:
        async with commy.AsyncMesh() as server, commy.AsyncMesh(call_spin=0.0) as no_spin:
            server.serve("inc", lambda d: bytes([d[0] + 1]))
            for mesh in (server, no_spin):  # adaptive (the default) and never
                b = b"\x00"
                for _ in range(50):
                    b = await mesh.call("inc", b, timeout=LONG)
                assert b == b"\x32"

    run(main)


def test_async_and_plain_handlers_with_a_context_see_their_caller(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:

            def who(context: commy.HandlerContext) -> bytes:
                c = context.caller
                return b"%s %r %r %r" % (c.kind.encode(), c.uid, c.gid, c.pid)

            @mesh.service("whoami-async")
            async def whoami_async(data: bytes, context: commy.HandlerContext) -> bytes:
                await asyncio.sleep(0)
                return who(context)

            @mesh.service("whoami-plain")
            def whoami_plain(data: bytes, context: commy.HandlerContext) -> bytes:
                return who(context)

            me = b"local %d %d %d" % (os.geteuid(), os.getegid(), os.getpid())
            assert await mesh.call("whoami-async", b"", timeout=LONG) == me
            assert await mesh.call("whoami-plain", b"", timeout=LONG) == me

    run(main)


def test_async_wait_for_subscribers(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:
            with pytest.raises(commy.DeadlineExceeded, match="0 of 1 subscribers"):
                await mesh.wait_for_subscribers("counted", timeout=0.05)
            sub = mesh.subscribe("counted")
            assert await mesh.wait_for_subscribers("counted", 1, timeout=LONG) == 1
            assert mesh.subscribers("counted") == 1
            assert sub.try_next() is None
            assert await mesh.publish("counted", b"m") == 1
            assert await sub.next() == commy.Message("counted", b"m")

    run(main)


def test_async_publish_many(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:
            sub = mesh.subscribe("burst")
            assert await mesh.wait_for_subscribers("burst", 1, timeout=LONG) == 1
            assert await mesh.publish_many("burst", [b"b%d" % i for i in range(50)]) == 50
            got = []
            for _ in range(50):
                msg = await sub.next()
                assert msg is not None
                got.append(msg.data)
            assert got == [b"b%d" % i for i in range(50)]

    run(main)


def test_async_publisher(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:
            feed = mesh.publisher("feed")
            assert feed.topic == "feed"
            sub = mesh.subscribe("feed")
            assert await mesh.wait_for_subscribers("feed", 1, timeout=LONG) == 1
            assert await feed.publish(b"first") == 1
            assert await feed.publish_many([b"f%d" % i for i in range(20)]) == 20
            got = []
            for _ in range(21):
                msg = await sub.next()
                assert msg is not None
                got.append(msg.data)
            assert got == [b"first"] + [b"f%d" % i for i in range(20)]
            with pytest.raises(commy.InvalidArgument):
                mesh.publisher("bad topic")

    run(main)


def test_async_next_batch_and_slow_policies(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as mesh:
            sub = mesh.subscribe("batched")
            dropping = mesh.subscribe("batched", queue=4, policy="drop-oldest")
            assert await mesh.wait_for_subscribers("batched", 2, timeout=LONG) == 2
            assert await mesh.publish_many("batched", [b"%d" % i for i in range(300)]) == 600
            got: List[bytes] = []
            while len(got) < 300:
                batch = await sub.next_batch(32)
                assert 1 <= len(batch) <= 32
                got.extend(m.data for m in batch)
            assert got == [b"%d" % i for i in range(300)]
            while dropping.dropped < 300 - 4:
                await asyncio.sleep(0.001)
            kept = await dropping.next_batch(10)
            assert [m.data for m in kept] == [b"%d" % i for i in range(296, 300)]
            assert mesh.dropped_by_subscribers("batched") == 296
            assert dropping.end_reason is None
            sub.close()
            assert await sub.next_batch() == []

    run(main)


def test_async_call_many(runtime_dir: str) -> None:
    async def main() -> None:
        async with commy.AsyncMesh() as server, commy.AsyncMesh() as client:
            server.serve("echo", lambda d: d)
            requests = [b"%d" % i for i in range(500)]
            assert await client.call_many("echo", requests) == requests
            # A service of the same loop: its handler runs while the batch waits.
            assert await server.call_many("echo", requests[:10]) == requests[:10]
            answers = await client.call_many("nobody", [b"a"], timeout=1.0)
            assert isinstance(answers[0], commy.NotFound), answers

    run(main)
