"""The exceptions: ``CommyError`` and one subclass per status code."""

from __future__ import annotations

from typing import ClassVar, Dict, Type


class CommyError(Exception):
    """Base of every commy error.

    ``code`` is the stable status code name (``"NOT_FOUND"``, ...) and
    ``message`` the human-readable part. A handler that raises one answers
    the caller with its code; raising the base class answers ``INTERNAL``.
    """

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Cancelled(CommyError):
    """The operation was cancelled, typically by the caller."""

    code = "CANCELLED"


class InvalidArgument(CommyError, ValueError):
    """The caller specified an invalid argument."""

    code = "INVALID_ARGUMENT"


class DeadlineExceeded(CommyError, TimeoutError):
    """The deadline passed before the operation completed."""

    code = "DEADLINE_EXCEEDED"


class NotFound(CommyError):
    """No such service, instance, topic or region."""

    code = "NOT_FOUND"


class AlreadyExists(CommyError):
    """What the caller tried to create exists already."""

    code = "ALREADY_EXISTS"


class PermissionDenied(CommyError):
    """The caller is not allowed to do this."""

    code = "PERMISSION_DENIED"


class ResourceExhausted(CommyError):
    """A resource (queue space, quota, message size limit) is exhausted."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(CommyError):
    """The system is not in the state the operation needs (e.g. closed)."""

    code = "FAILED_PRECONDITION"


class Aborted(CommyError):
    """The operation was aborted, typically by a concurrency conflict."""

    code = "ABORTED"


class Internal(CommyError):
    """An invariant was broken: a bug, or a handler that raised."""

    code = "INTERNAL"


class Unavailable(CommyError):
    """The service is unavailable right now; retrying may succeed."""

    code = "UNAVAILABLE"


class Unauthenticated(CommyError):
    """The request lacks valid credentials."""

    code = "UNAUTHENTICATED"


#: The exception class of each status code name.
BY_CODE: Dict[str, Type[CommyError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        Internal,
        Unavailable,
        Unauthenticated,
    )
}
