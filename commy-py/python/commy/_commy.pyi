"""Type stubs of commy's native module (private: use the ``commy`` package)."""

from typing import Any, Callable, List, Optional, Tuple, final

__all__ = [
    "Caller",
    "HandlerContext",
    "RawQueue",
    "RawMesh",
    "RawReply",
    "RawService",
    "RawTask",
    "RawRegion",
    "RawSubscription",
    "error_code_names",
    "_at_exit",
    "__version__",
]

__version__: str

def error_code_names() -> List[str]: ...
def _at_exit(patience: float = 5.0) -> None: ...

@final
class Caller:
    """Who sent a request, as its transport vouches for it."""

    def __new__(
        cls,
        kind: str,
        *,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        pid: Optional[int] = None,
        identity: Optional[str] = None,
        addr: Optional[str] = None,
    ) -> "Caller": ...
    @property
    def kind(self) -> str:
        """``"local"`` (over shared memory) or ``"remote"`` (over TLS)."""
    @property
    def uid(self) -> Optional[int]:
        """A local caller's effective user id."""
    @property
    def gid(self) -> Optional[int]:
        """A local caller's effective group id."""
    @property
    def pid(self) -> Optional[int]:
        """A local caller's process id (0 if in another pid namespace)."""
    @property
    def identity(self) -> Optional[str]:
        """A remote caller's SPIFFE ID; None without a client certificate."""
    @property
    def addr(self) -> Optional[str]:
        """A remote caller's address, ``"IP:PORT"``."""
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class HandlerContext:
    """What a handler that takes a second parameter gets with each request."""

    @property
    def caller(self) -> Caller:
        """Who sent the request."""

@final
class RawQueue:
    def __new__(cls) -> "RawQueue": ...
    def fileno(self) -> int: ...
    def drain(self) -> List[Tuple[Any, ...]]: ...
    def close(self) -> None: ...

@final
class RawMesh:
    def __new__(
        cls,
        mesh: Optional[str] = None,
        runtime_dir: Optional[str] = None,
        default_timeout: Optional[float] = None,
        call_spin: Optional[float] = None,
        max_concurrency: Optional[int] = None,
    ) -> "RawMesh": ...
    @property
    def name(self) -> str: ...
    def call(self, service: str, data: Any, timeout: Optional[float] = None) -> bytes: ...
    def send(self, service: str, data: Any) -> None: ...
    def publish(self, topic: str, data: Any) -> int: ...
    def call_async(
        self,
        service: str,
        data: Any,
        timeout: Optional[float],
        queue: RawQueue,
        fut: Any,
        spin: Optional[float] = None,
    ) -> RawTask: ...
    def send_async(self, service: str, data: Any, queue: RawQueue, fut: Any) -> RawTask: ...
    def publish_async(self, topic: str, data: Any, queue: RawQueue, fut: Any) -> RawTask: ...
    def serve(
        self, service: str, handler: Callable[..., Any], context: bool = False
    ) -> RawService: ...
    def serve_queued(
        self, service: str, handler: Callable[[bytes, RawReply], object], queue: RawQueue
    ) -> RawService: ...
    def subscribe(self, topic: str, group: Optional[str] = None) -> RawSubscription: ...
    def region(
        self,
        name: str,
        size: Optional[int] = None,
        policy: Optional[str] = None,
        ttl: Optional[float] = None,
    ) -> RawRegion: ...
    def close(self) -> None: ...
    def close_async(self, queue: RawQueue, fut: Any) -> RawTask: ...

@final
class RawService:
    @property
    def name(self) -> str: ...
    @property
    def instance_id(self) -> str: ...
    @property
    def serving(self) -> bool: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...

@final
class RawReply:
    @property
    def context(self) -> HandlerContext: ...
    def ok(self, data: Any) -> bool: ...
    def error(self, code: str, message: str) -> bool: ...
    def fail(self, exc: BaseException) -> bool: ...
    @property
    def answered(self) -> bool: ...
    @property
    def cancelled(self) -> bool: ...
    def on_cancel(
        self, callback: Callable[[], object], queue: Optional[RawQueue] = None
    ) -> None: ...

@final
class RawTask:
    def cancel(self) -> None: ...
    @property
    def done(self) -> bool: ...

@final
class RawSubscription:
    @property
    def topic(self) -> str: ...
    @property
    def group(self) -> Optional[str]: ...
    @property
    def closed(self) -> bool: ...
    def next(self, timeout: Optional[float] = None) -> Optional[bytes]: ...
    def next_async(self, queue: RawQueue, fut: Any) -> RawTask: ...
    def close(self) -> None: ...

@final
class RawRegion:
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def refcount(self) -> int: ...
    @property
    def path(self) -> str: ...
    def dup_fd(self) -> int: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: Any) -> None: ...
