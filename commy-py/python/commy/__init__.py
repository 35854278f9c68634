"""Commy for Python: a mesh of named services on one host, through shared memory.

Blocking::

    import commy

    with commy.Mesh() as mesh:
        @mesh.service("echo")
        def echo(data: bytes) -> bytes:
            return data

        assert mesh.call("echo", b"hi", timeout=1.0) == b"hi"

asyncio::

    async with commy.AsyncMesh() as mesh:
        @mesh.service("echo")
        async def echo(data: bytes) -> bytes:
            return data

        replies = await asyncio.gather(*(mesh.call("echo", b"x") for _ in range(1000)))

A handler that takes a second parameter gets a :class:`HandlerContext`
with each request; its ``caller`` says who sent it::

    @mesh.service("whoami")
    def whoami(data: bytes, context: commy.HandlerContext) -> bytes:
        return repr(context.caller).encode()

Errors are ``commy.CommyError`` subclasses, one per status code
(``commy.NotFound``, ``commy.Unavailable``, ``commy.DeadlineExceeded``, ...).
Blocking calls release the GIL while they wait and Ctrl-C interrupts them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import inspect
import mmap
import os
import threading
import time
import weakref
from abc import abstractmethod
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    NamedTuple,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from . import _commy
from ._commy import Caller, HandlerContext
from ._errors import (
    BY_CODE,
    Aborted,
    AlreadyExists,
    Cancelled,
    CommyError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__version__: str = _commy.__version__

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncMesh",
    "AsyncPublisher",
    "AsyncSubscription",
    "Caller",
    "Cancelled",
    "CommyError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HandlerContext",
    "Internal",
    "InvalidArgument",
    "Mesh",
    "Message",
    "NotFound",
    "Publisher",
    "PermissionDenied",
    "Region",
    "ResourceExhausted",
    "Service",
    "Subscription",
    "Unauthenticated",
    "Unavailable",
    "BY_CODE",
]

#: What a payload may be: any bytes-like object.
Buffer = Union[bytes, bytearray, memoryview]

SyncHandler = Union[Callable[[bytes], Buffer], Callable[[bytes, HandlerContext], Buffer]]
AsyncHandler = Union[
    Callable[[bytes], Awaitable[Buffer]], Callable[[bytes, HandlerContext], Awaitable[Buffer]]
]
_F = TypeVar("_F", bound=Callable[..., Any])


def _takes_context(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` declares a second positional parameter without a
    default: it is then called as ``handler(data, context)``."""
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return len(required) >= 2


class Message(NamedTuple):
    """A published message as a subscriber receives it."""

    topic: str
    data: bytes


class Service:
    """A service being served; :meth:`stop` or :meth:`close` ends it."""

    def __init__(self, raw: _commy.RawService) -> None:
        self._raw = raw

    @property
    def name(self) -> str:
        """The service name."""
        return self._raw.name

    @property
    def instance_id(self) -> str:
        """The instance id announced for it."""
        return self._raw.instance_id

    @property
    def serving(self) -> bool:
        """Whether it still serves."""
        return self._raw.serving

    def stop(self) -> None:
        """Stops serving at once (handlers in progress finish on their own)."""
        self._raw.stop()

    def close(self) -> None:
        """Drains the instance and stops it: it leaves discovery, its
        clients send their new calls to other instances, and what they sent
        before is answered (see ``ServiceHandle::shutdown`` in Rust)."""
        self._raw.close()

    def __repr__(self) -> str:
        return f"<commy.Service {self.name!r} instance={self.instance_id} serving={self.serving}>"


def _batch_max(n: int) -> int:
    """A batch's largest size, checked."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"max must be a positive int, not {n!r}")
    return n


class _SubscriptionBase:
    """What the blocking and the asyncio subscriptions share."""

    def __init__(self, raw: _commy.RawSubscription) -> None:
        self._raw = raw

    @property
    def topic(self) -> str:
        """The topic."""
        return self._raw.topic

    @property
    def group(self) -> Optional[str]:
        """The queue group, if any."""
        return self._raw.group

    @property
    def closed(self) -> bool:
        """Whether it was closed."""
        return self._raw.closed

    @property
    def dropped(self) -> int:
        """Messages dropped because this subscriber fell behind: discarded
        under ``"drop-oldest"``, refused under ``"disconnect"``, or lost when
        a publisher disconnected it for taking nothing for the stall time."""
        return self._raw.dropped

    @property
    def end_reason(self) -> Optional[CommyError]:
        """Why the mesh ended this subscription (a :class:`ResourceExhausted`:
        its queue was full under ``"disconnect"``, or it took nothing for the
        stall time), or ``None`` while it lasts or when it was closed."""
        return self._raw.end_reason

    def close(self) -> None:
        """Ends the subscription; a waiting :meth:`next` returns ``None``."""
        self._raw.close()

    def try_next(self) -> Optional[Message]:
        """A queued message, without waiting; ``None`` when none is queued
        (or the subscription is closed)."""
        data = self._raw.try_next()
        return None if data is None else Message(self._raw.topic, data)


class Subscription(_SubscriptionBase):
    """Messages of one topic: iterate it, or call :meth:`next`.

    Iteration ends when the subscription is closed (from any thread).
    """

    def next(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, or ``None`` once closed.

        Raises :class:`DeadlineExceeded` if ``timeout`` seconds pass first.
        """
        data = self._raw.next(timeout)
        return None if data is None else Message(self._raw.topic, data)

    def next_batch(self, max: int = 64, timeout: Optional[float] = None) -> List[Message]:
        """The next message and up to ``max - 1`` more that have come
        already, in order: one crossing into the mesh for the lot, the
        cheapest way to take a fast stream. An empty list once closed.

        Raises :class:`DeadlineExceeded` if ``timeout`` seconds pass before
        the first.
        """
        topic = self._raw.topic
        return [Message(topic, data) for data in self._raw.next_batch(_batch_max(max), timeout)]

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.next()
            if msg is None:
                return
            yield msg

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Publisher:
    """A publisher of one topic, made by :meth:`Mesh.publisher`.

    Each message goes where :meth:`Mesh.publish` sends it. The topic is
    checked and its subscribers' links found once, not on every publish,
    which makes a stream of single publishes cheaper. One publisher may be
    used from several threads: their publishes take turns.
    """

    def __init__(self, raw: _commy.RawPublisher) -> None:
        self._raw = raw

    @property
    def topic(self) -> str:
        """The topic it publishes on."""
        return self._raw.topic

    def publish(self, data: Buffer) -> int:
        """Publishes ``data``; returns how many subscribers got it."""
        return self._raw.publish(data)

    def publish_many(self, data: Iterable[Buffer]) -> int:
        """Publishes each item of ``data`` in order (see
        :meth:`Mesh.publish_many`); returns the deliveries made."""
        return self._raw.publish_many(data)

    def __repr__(self) -> str:
        return f"<commy.Publisher {self.topic!r}>"


class Region:
    """A named shared-memory region of the mesh.

    :attr:`buffer` is a writable ``memoryview`` over the shared memory
    itself (an ``mmap`` of the region's file): what one process writes,
    every holder sees, without copies. Such accesses are plain memory
    accesses; coordinate writers yourself, or use :meth:`read` and
    :meth:`write`, which go through the region's writer lock and seqlock
    (consistent snapshots).
    """

    def __init__(self, raw: _commy.RawRegion) -> None:
        self._raw = raw
        fd = raw.dup_fd()
        try:
            self._mmap: Optional[mmap.mmap] = mmap.mmap(
                fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        start = raw.data_offset
        self._view: Optional[memoryview] = memoryview(self._mmap)[start : start + raw.size]

    @property
    def name(self) -> str:
        """The region's name."""
        return self._raw.name

    @property
    def size(self) -> int:
        """Size of the data in bytes."""
        return self._raw.size

    @property
    def refcount(self) -> int:
        """How many holders have it open."""
        return self._raw.refcount

    @property
    def buffer(self) -> memoryview:
        """A writable view of the shared bytes (no copy)."""
        if self._view is None:
            raise FailedPrecondition(f"region {self.name!r} is closed")
        return self._view

    def read(self, offset: int = 0, length: Optional[int] = None) -> bytes:
        """A consistent copy of ``length`` bytes at ``offset`` (all by default)."""
        if length is None:
            length = self.size - offset
        return self._raw.read(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        """Writes ``data`` at ``offset``; readers see all of it or none."""
        self._raw.write(offset, data)

    def close(self) -> None:
        """Unmaps the region (views derived from :attr:`buffer` must be released first)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<commy.Region {self.name!r} size={self.size}>"


# Meshes still open at exit: their services are stopped before the
# interpreter goes away, so that no request enters it while it finalizes.
_open_meshes: "weakref.WeakSet[Union[Mesh, AsyncMesh]]" = weakref.WeakSet()

_Sub = TypeVar("_Sub", bound=_SubscriptionBase)


@atexit.register
def _at_exit() -> None:
    for mesh in list(_open_meshes):
        mesh._stop_serving()
    _commy._at_exit()


class _Base:
    def __init__(
        self,
        mesh: Optional[str],
        runtime_dir: Optional[Union[str, "os.PathLike[str]"]],
        default_timeout: Optional[float],
        call_spin: Optional[float],
        max_concurrency: Optional[int],
        settings: "dict[str, Any]",
    ) -> None:
        # Every setting by its key: the named ones and any other.
        self._raw = _commy.RawMesh(
            dict(
                settings,
                mesh=mesh,
                runtime_dir=runtime_dir,
                default_timeout=default_timeout,
                call_spin=call_spin,
                max_concurrency=max_concurrency,
            )
        )
        self._services: "list[Service]" = []
        self._subscriptions: "weakref.WeakSet[_SubscriptionBase]" = weakref.WeakSet()
        self._closed = False
        self._lock = threading.Lock()
        _open_meshes.add(self)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        """The mesh's name."""
        return self._raw.name

    def explain(self, key: str) -> Optional[Tuple[str, str]]:
        """The value of setting ``key`` this mesh opened with, and where it
        came from: ``("64", "Python options")``, ``('"50us"', "default")``,
        a config file and line, or a ``$COMMY_<KEY>`` variable. ``None``
        for an unknown key."""
        return self._raw.explain(key)

    def endpoints(self, service: str) -> List[Dict[str, Any]]:
        """Every instance of ``service`` this handle knows, as its pool sees
        it: a dict each, with ``instance``, ``endpoint``, ``linked``,
        ``state`` (``"in"``, ``"ejected"`` or ``"half-open"``),
        ``failures_in_a_row``, ``ejected_for`` (seconds, while ejected),
        ``ejections``, ``in_flight``, ``failed_calls`` and ``round_trip``
        (seconds, over TLS)."""
        return self._raw.endpoints(service)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def region(
        self,
        name: str,
        size: Optional[int] = None,
        *,
        create: Optional[bool] = None,
        ttl: Optional[float] = None,
    ) -> Region:
        """Opens the mesh's shared region ``name``.

        With ``size``, it is created if missing (``create=True``: it must
        not exist; ``create=False``: it must exist, with that size).
        Without ``size``, it must exist. ``ttl``: seconds it outlives its
        last holder.
        """
        policy = None if create is None else ("create" if create else "open")
        return Region(self._raw.region(name, size, policy, ttl))

    @abstractmethod
    def serve(self, service: str, handler: Any) -> Service:
        """Serves ``service`` with ``handler`` (see the subclasses)."""

    def service(self, service: str) -> Callable[[_F], _F]:
        """Decorator form of :meth:`serve`."""

        def register(handler: _F) -> _F:
            self.serve(service, handler)
            return handler

        return register

    def _track(self, sub: _Sub) -> _Sub:
        self._subscriptions.add(sub)
        return sub

    def _close_subscriptions(self) -> None:
        for sub in list(self._subscriptions):
            sub.close()

    def _keep(self, raw: _commy.RawService) -> Service:
        service = Service(raw)
        with self._lock:
            self._services.append(service)
        return service

    def _stop_serving(self) -> None:
        with self._lock:
            services, self._services = self._services, []
        for s in services:
            s.stop()
        self._close_subscriptions()

    def _begin_close(self) -> bool:
        """Marks the mesh closed and ends its subscriptions; ``False`` if it
        was closed already (then there is nothing more to do)."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        _open_meshes.discard(self)  # type: ignore[arg-type]
        self._close_subscriptions()
        return True


class Mesh(_Base):
    """A blocking handle on the mesh; use it as a context manager.

    ``mesh``: the mesh's name (``"default"``); ``runtime_dir``: where its
    sockets live (``$COMMY_RUNTIME_DIR``, ``$XDG_RUNTIME_DIR/commy`` or
    ``/tmp/commy-<uid>``); ``default_timeout``: seconds for calls that give
    none (30; 0 waits forever); ``call_spin``: seconds a caller polls for its
    answer before it sleeps (50 µs); ``max_concurrency``: handlers of one
    service waiting at once (1024). Any other setting is taken by its key
    (``listen="tls://0.0.0.0:7443"``, ``peers=[...]``, ``transport="shm"``;
    durations in seconds); unset ones come from ``$COMMY_<KEY>`` and the
    config file, and :meth:`explain` says where each value came from.

    Handlers run on commy's threads, one link at a time, with the GIL.
    """

    def __init__(
        self,
        mesh: Optional[str] = None,
        *,
        runtime_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        default_timeout: Optional[float] = None,
        call_spin: Optional[float] = None,
        max_concurrency: Optional[int] = None,
        **settings: Any,
    ) -> None:
        super().__init__(
            mesh, runtime_dir, default_timeout, call_spin, max_concurrency, settings
        )
        self._closed_event = threading.Event()

    def call(
        self,
        service: str,
        data: Buffer,
        timeout: Optional[float] = None,
        *,
        idempotent: bool = False,
        hash_key: Optional[Union[str, Buffer]] = None,
    ) -> bytes:
        """Calls ``service`` with ``data`` and returns its reply.

        ``timeout`` in seconds (the mesh's default if ``None``). Raises a
        :class:`CommyError` subclass: :class:`NotFound` if nobody serves it,
        :class:`DeadlineExceeded` after the timeout, the handler's status
        if it failed. ``idempotent``: the call may be made more than once,
        so a failure of the instance that took it is tried again on
        another (within the retry budget and the timeout), as the calls of
        the services the ``idempotent`` setting names are; a call that
        never reached an instance is tried again either way. ``hash_key``:
        for a service balanced by consistent hashing (``balance=
        ["SERVICE=maglev"]``), calls with the same key go to the same
        instance, from every process and SDK.
        """
        return self._raw.call(service, data, timeout, idempotent, hash_key)

    def call_many(
        self, service: str, data: Iterable[Buffer], timeout: Optional[float] = None
    ) -> List[Union[bytes, CommyError]]:
        """Calls ``service`` once with each item of ``data``, all in flight
        at once, and returns each call's reply, or its error (a
        :class:`CommyError`, returned in its place, not raised), in order.

        Over shared memory the requests are written back to back and the
        replies taken in batches, in one crossing into the mesh: many
        times cheaper than as many :meth:`call`\ s. ``timeout`` holds for
        the whole batch.
        """
        return self._raw.call_many(service, data, timeout)

    def send(self, service: str, data: Buffer) -> None:
        """Sends a one-way message to one instance of ``service``."""
        self._raw.send(service, data)

    def publish(self, topic: str, data: Buffer) -> int:
        """Publishes ``data`` on ``topic``; returns how many subscribers got it."""
        return self._raw.publish(topic, data)

    def publish_many(self, topic: str, data: Iterable[Buffer]) -> int:
        """Publishes each item of ``data`` on ``topic``, in order, as
        :meth:`publish` does one: each subscriber gets them all in this
        order. To subscribers on this host they are written back to back
        and made visible at once, which makes a burst cheap. Returns the
        deliveries made, summed over the messages."""
        return self._raw.publish_many(topic, data)

    def publisher(self, topic: str) -> Publisher:
        """A publisher of ``topic`` (see :class:`Publisher`); raises
        :class:`InvalidArgument` for a bad topic name."""
        return Publisher(self._raw.publisher(topic))

    def dropped_by_subscribers(self, topic: str) -> int:
        """Messages this handle published on ``topic`` that subscribers on
        this host discarded unread because they fell behind under the
        ``"drop-oldest"`` policy: the publisher's side of their
        :attr:`Subscription.dropped`. Each discarded copy counts once;
        subscribers at TLS peers are not counted."""
        return self._raw.dropped_by_subscribers(topic)

    def subscribers(self, topic: str) -> int:
        """How many subscribers a publish on ``topic`` would reach now (one
        per queue group)."""
        return self._raw.subscribers(topic)

    def wait_for_subscribers(self, topic: str, n: int = 1, timeout: float = 30.0) -> int:
        """Waits until a publish on ``topic`` would reach ``n`` subscribers;
        returns how many it would. Raises :class:`DeadlineExceeded` after
        ``timeout`` seconds."""
        return self._raw.wait_for_subscribers(topic, n, timeout)

    def serve(self, service: str, handler: SyncHandler) -> Service:
        """Serves ``service``: ``handler(data) -> bytes`` answers each request.

        A handler that declares a second parameter (without a default) is
        called as ``handler(data, context)``, ``context`` a
        :class:`HandlerContext` (``context.caller``: who sent the request).
        A :class:`CommyError` it raises answers with its code; any other
        exception answers :class:`Internal` (its traceback is printed here)
        and the service keeps serving.
        """
        if inspect.iscoroutinefunction(handler):
            raise InvalidArgument("Mesh.serve takes a plain function; use AsyncMesh for async handlers")
        return self._keep(self._raw.serve(service, handler, _takes_context(handler)))

    def subscribe(
        self,
        topic: str,
        group: Optional[str] = None,
        *,
        queue: Optional[int] = None,
        policy: Optional[Literal["block", "drop-oldest", "disconnect"]] = None,
        linger: Optional[float] = None,
    ) -> Subscription:
        """Subscribes to ``topic``; with ``group``, as a member of that queue
        group (each message goes to one member).

        ``policy`` says what happens when this subscriber falls behind:
        ``"block"`` (the default) makes publishers wait, and disconnects
        it if it takes nothing for the stall time; ``"drop-oldest"``
        discards the oldest of the ``queue`` messages held (1024 unless
        set); ``"disconnect"`` ends the subscription once they are full.
        Losses show in :attr:`Subscription.dropped`.

        ``linger`` (seconds, 1e-6 unless set, at most 1e-4, 0: never) is
        how long a ``"block"`` subscriber that keeps up with a dense stream
        (messages less than half a microsecond apart) waits after it sees
        a message, to take what comes meanwhile with it: reading right
        behind a fast publisher slows the publisher more than the wait
        costs. Request-reply traffic and sparse streams never wait."""
        raw = self._raw.subscribe(topic, group, queue, policy, linger)
        return self._track(Subscription(raw))

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the mesh is closed (or ``timeout`` passes); returns
        whether it was closed. Ctrl-C interrupts it: a service's main loop."""
        return self._closed_event.wait(timeout)

    def close(self) -> None:
        """Stops serving (waits for handlers in progress), ends subscriptions
        and drops links. Later operations raise :class:`FailedPrecondition`."""
        if not self._begin_close():
            return
        self._raw.close()
        self._closed_event.set()

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<commy.Mesh {self.name!r}{' closed' if self._closed else ''}>"


class _LoopBridge:
    """Where commy's threads hand results and requests to one event loop:
    a native queue whose descriptor the loop watches."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue = _commy.RawQueue()
        loop.add_reader(self.queue.fileno(), self._drain)

    def _drain(self) -> None:
        # Woken operations are polled (and their futures settled) inside
        # drain(); what comes back are requests and callbacks.
        for event in self.queue.drain():
            if event[0] == 1:
                event[1](event[2], event[3])
            else:
                event[1]()

    def run(self, start: Callable[..., _commy.RawTask], *args: Any, **kwargs: Any) -> "asyncio.Future[Any]":
        """Starts a commy operation whose outcome settles an asyncio future;
        cancelling the future cancels the operation."""
        if asyncio.get_running_loop() is not self.loop:
            raise FailedPrecondition("this AsyncMesh belongs to another event loop")
        fut: "asyncio.Future[Any]" = self.loop.create_future()
        task = start(*args, self.queue, fut, **kwargs)

        def cancel_task(f: "asyncio.Future[Any]") -> None:
            if f.cancelled():
                task.cancel()

        fut.add_done_callback(cancel_task)
        return fut

    def close(self) -> None:
        self.queue.close()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.queue.fileno())


class AsyncSubscription(_SubscriptionBase):
    """Messages of one topic for asyncio: ``async for msg in sub``."""

    def __init__(self, raw: _commy.RawSubscription, bridge: _LoopBridge) -> None:
        super().__init__(raw)
        self._bridge = bridge

    async def next(self) -> Optional[Message]:
        """The next message, or ``None`` once closed."""
        data = await self._bridge.run(self._raw.next_async)
        return None if data is None else Message(self._raw.topic, data)

    async def next_batch(self, max: int = 64) -> List[Message]:
        """The next message and up to ``max - 1`` more that have come (see
        :meth:`Subscription.next_batch`); an empty list once closed."""
        batch: List[bytes] = await self._bridge.run(self._raw.next_batch_async, _batch_max(max))
        topic = self._raw.topic
        return [Message(topic, data) for data in batch]

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            msg = await self.next()
            if msg is None:
                return
            yield msg

    async def __aenter__(self) -> "AsyncSubscription":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


#: How long an AsyncMesh call polls for its answer on the loop's thread
#: when it is the only call in flight (then the loop has nothing else to do).
_LONE_SPIN = 50e-6

#: The deadline (``time.monotonic()``) of the request an AsyncMesh handler's
#: task handles: its calls are due by it at the latest.
_INHERITED: "contextvars.ContextVar[Optional[float]]" = contextvars.ContextVar(
    "commy_inherited_deadline", default=None
)


def _inherit(timeout: Optional[float]) -> Optional[float]:
    """``timeout``, shortened to what is left of the deadline of the request
    whose handler makes the call, if any."""
    at = _INHERITED.get()
    if at is None:
        return timeout
    left = max(at - time.monotonic(), 1e-6)
    if timeout is None or timeout <= 0 or timeout > left:
        return left
    return timeout


class AsyncPublisher:
    """A publisher of one topic for asyncio, made by
    :meth:`AsyncMesh.publisher` (see :class:`Publisher`)."""

    def __init__(self, raw: _commy.RawPublisher, bridge: _LoopBridge) -> None:
        self._raw = raw
        self._bridge = bridge

    @property
    def topic(self) -> str:
        """The topic it publishes on."""
        return self._raw.topic

    async def publish(self, data: Buffer) -> int:
        """Publishes ``data``; returns how many subscribers got it."""
        delivered: int = await self._bridge.run(self._raw.publish_async, data)
        return delivered

    async def publish_many(self, data: Iterable[Buffer]) -> int:
        """Publishes each item of ``data`` in order (see
        :meth:`Mesh.publish_many`); returns the deliveries made."""
        delivered: int = await self._bridge.run(self._raw.publish_many_async, data)
        return delivered

    def __repr__(self) -> str:
        return f"<commy.AsyncPublisher {self.topic!r}>"


class AsyncMesh(_Base):
    """An asyncio handle on the mesh: ``async with commy.AsyncMesh() as mesh``.

    Takes the options of :class:`Mesh`. ``call_spin``: by default a call
    polls for its answer on the loop's thread for up to 50 µs only when it
    is the only call in flight and not to a service this mesh serves itself
    (whose handler needs the loop), and not at all otherwise; a number
    (seconds) applies to every call. Handlers, plain or ``async``, run on the event
    loop that opened the mesh.
    """

    def __init__(
        self,
        mesh: Optional[str] = None,
        *,
        runtime_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        default_timeout: Optional[float] = None,
        call_spin: Optional[float] = None,
        max_concurrency: Optional[int] = None,
        **settings: Any,
    ) -> None:
        super().__init__(mesh, runtime_dir, default_timeout, 0.0, max_concurrency, settings)
        if call_spin is not None and not call_spin >= 0:
            raise InvalidArgument(f"call_spin must be a number of seconds >= 0, not {call_spin}")
        self._call_spin = call_spin
        self._in_flight = 0
        # Services this mesh serves: their handlers run on this very loop,
        # so a call to one of them must not hold the loop up polling.
        self._own: "set[str]" = set()
        self._bridge_: Optional[_LoopBridge] = None
        self._tasks: "set[asyncio.Task[Any]]" = set()

    @property
    def _bridge(self) -> _LoopBridge:
        if self._bridge_ is None:
            self._bridge_ = _LoopBridge(asyncio.get_running_loop())
        return self._bridge_

    async def call(
        self,
        service: str,
        data: Buffer,
        timeout: Optional[float] = None,
        *,
        idempotent: bool = False,
        hash_key: Optional[Union[str, Buffer]] = None,
    ) -> bytes:
        """Calls ``service`` (see :meth:`Mesh.call`). Cancelling the awaiting
        task cancels the call."""
        spin = self._call_spin
        if spin is None:
            spin = _LONE_SPIN if self._in_flight == 0 and service not in self._own else 0.0
        self._in_flight += 1
        try:
            result: bytes = await self._bridge.run(
                self._raw.call_async,
                service,
                data,
                _inherit(timeout),
                spin=spin,
                idempotent=idempotent,
                hash_key=hash_key,
            )
        finally:
            self._in_flight -= 1
        return result

    async def call_many(
        self, service: str, data: Iterable[Buffer], timeout: Optional[float] = None
    ) -> List[Union[bytes, CommyError]]:
        """Calls ``service`` once with each item of ``data``, all in flight
        at once (see :meth:`Mesh.call_many`): each call's reply or error, in
        order. Cancelling the awaiting task cancels the calls."""
        spin = self._call_spin
        if spin is None:
            spin = _LONE_SPIN if self._in_flight == 0 and service not in self._own else 0.0
        self._in_flight += 1
        try:
            answers: List[Union[bytes, CommyError]] = await self._bridge.run(
                self._raw.call_many_async, service, data, timeout, spin=spin
            )
        finally:
            self._in_flight -= 1
        return answers

    async def send(self, service: str, data: Buffer) -> None:
        """Sends a one-way message to one instance of ``service``."""
        await self._bridge.run(self._raw.send_async, service, data)

    async def publish(self, topic: str, data: Buffer) -> int:
        """Publishes ``data`` on ``topic``; returns how many subscribers got it."""
        delivered: int = await self._bridge.run(self._raw.publish_async, topic, data)
        return delivered

    async def publish_many(self, topic: str, data: Iterable[Buffer]) -> int:
        """Publishes each item of ``data`` on ``topic``, in order (see
        :meth:`Mesh.publish_many`); returns the deliveries made."""
        delivered: int = await self._bridge.run(self._raw.publish_many_async, topic, data)
        return delivered

    def publisher(self, topic: str) -> "AsyncPublisher":
        """A publisher of ``topic`` for asyncio (see :class:`Publisher`);
        raises :class:`InvalidArgument` for a bad topic name."""
        return AsyncPublisher(self._raw.publisher(topic), self._bridge)

    def dropped_by_subscribers(self, topic: str) -> int:
        """Messages this handle published on ``topic`` that subscribers on
        this host discarded unread (see :meth:`Mesh.dropped_by_subscribers`)."""
        return self._raw.dropped_by_subscribers(topic)

    def subscribers(self, topic: str) -> int:
        """How many subscribers a publish on ``topic`` would reach now (see
        :meth:`Mesh.subscribers`)."""
        return self._raw.subscribers(topic)

    async def wait_for_subscribers(self, topic: str, n: int = 1, timeout: float = 30.0) -> int:
        """Waits until a publish on ``topic`` would reach ``n`` subscribers
        (see :meth:`Mesh.wait_for_subscribers`)."""
        count: int = await self._bridge.run(
            self._raw.wait_for_subscribers_async, topic, n, timeout
        )
        return count

    def serve(self, service: str, handler: Union[AsyncHandler, SyncHandler]) -> Service:
        """Serves ``service`` with ``handler(data)``, a coroutine function or a
        plain function, run on this event loop. A second parameter and errors
        as in :meth:`Mesh.serve`; a caller that gives up cancels the
        handler's task."""
        bridge = self._bridge
        loop = bridge.loop
        tasks = self._tasks
        with_context = _takes_context(handler)
        call: Callable[..., Any] = handler

        def finish(reply: _commy.RawReply, task: "asyncio.Task[Any]") -> None:
            tasks.discard(task)
            if task.cancelled():
                if not reply.answered:
                    reply.error("CANCELLED", "the handler's task was cancelled")
                return
            exc = task.exception()
            if exc is not None:
                reply.fail(exc)
            else:
                reply.ok(task.result())

        def dispatch(data: bytes, reply: _commy.RawReply) -> None:
            left = reply.time_left
            # The handler's task copies this context: its calls inherit
            # the request's deadline.
            inherited = _INHERITED.set(None if left is None else time.monotonic() + left)
            try:
                start(data, reply)
            finally:
                _INHERITED.reset(inherited)

        def start(data: bytes, reply: _commy.RawReply) -> None:
            try:
                result = call(data, reply.context) if with_context else call(data)
            except Exception as exc:  # becomes the caller's error
                reply.fail(exc)
                return
            if not inspect.isawaitable(result):
                reply.ok(result)
                return
            task = loop.create_task(_awaited(result))
            tasks.add(task)
            task.add_done_callback(functools.partial(finish, reply))
            reply.on_cancel(task.cancel, bridge.queue)

        served = self._keep(self._raw.serve_queued(service, dispatch, bridge.queue))
        self._own.add(service)
        return served

    def subscribe(
        self,
        topic: str,
        group: Optional[str] = None,
        *,
        queue: Optional[int] = None,
        policy: Optional[Literal["block", "drop-oldest", "disconnect"]] = None,
        linger: Optional[float] = None,
    ) -> AsyncSubscription:
        """Subscribes to ``topic`` (see :meth:`Mesh.subscribe`)."""
        raw = self._raw.subscribe(topic, group, queue, policy, linger)
        return self._track(AsyncSubscription(raw, self._bridge))

    async def close(self) -> None:
        """Stops serving (waits for handlers in progress), ends subscriptions
        and drops links."""
        if not self._begin_close():
            return
        bridge = self._bridge
        await bridge.run(self._raw.close_async)
        bridge.close()

    async def __aenter__(self) -> "AsyncMesh":
        self._bridge  # binds the mesh to this loop
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<commy.AsyncMesh {self.name!r}{' closed' if self._closed else ''}>"


async def _awaited(result: Awaitable[Any]) -> Any:
    return await result
