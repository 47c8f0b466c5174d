"""Domain errors, each carrying the name of the gRPC status code the service layer returns for it,
and the classification of Redis errors (unreachable, or refusing writes only for now)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class JobgateError(Exception):
    """Base class; ``code`` is a ``grpc.StatusCode`` name."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(JobgateError):
    """A request field is malformed; the message names the field."""

    code = "INVALID_ARGUMENT"


class NotFound(JobgateError):
    """A job id that is well formed but not stored (never existed, or past its retention)."""

    code = "NOT_FOUND"


class AlreadyExists(JobgateError):
    """An idempotency key was reused with a different request."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(JobgateError):
    """The job's state does not allow the request (for example cancelling a finished job)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(JobgateError):
    """A size or count limit was exceeded, or a stream fell too far behind."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(JobgateError):
    """Redis cannot be reached; nothing was stored."""

    code = "UNAVAILABLE"


class NotReplicated(Unavailable):
    """A write reached the primary but not as many replicas as the durability setting asks for, in
    time: it stands, but a failover now could lose it. Retrying is safe (submits with an idempotency
    key, outcomes always)."""


class PermissionDenied(JobgateError):
    """The caller's token does not cover the queue the request touches."""

    code = "PERMISSION_DENIED"


# Redis cannot be reached (refused, dropped or timed out): the errors every caller retries or maps to
# UNAVAILABLE.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


# Error replies of a Redis that cannot take writes for now (out of memory, a replica after a
# failover, loading or busy with a script, a cluster whose slot has no primary yet): to a client
# these mean "unavailable, retry". redis-py turns most into classes (a cluster's, with the code
# taken off the message: "The cluster is down"); the rest keep their code at the start of the message.
UNAVAILABLE_REPLIES = (
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    MasterDownError,
    ClusterDownError,
    ClusterError,  # the cluster client's own retries ran out (redirections, failovers)
    SlotNotCoveredError,  # the client's layout has no node for the slot while it learns the new one
)
UNAVAILABLE_CODES = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def cannot_write_now(exc: BaseException) -> bool:
    """Whether an error reply means Redis refuses writes only for now (see UNAVAILABLE_REPLIES)."""
    return isinstance(exc, UNAVAILABLE_REPLIES) or (
        isinstance(exc, ResponseError) and str(exc).startswith(UNAVAILABLE_CODES)
    )


# Redis unreachable, or a call that already said so (Unavailable): what loops that must outlive
# Redis (subscriptions, heartbeats) log as a warning and retry, not as a failure of their own.
REDIS_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, Unavailable)


def transient(exc: BaseException) -> bool:
    """Redis unreachable, or refusing writes only for now (memory freed, failover done, script or
    load finished): a call that meets one is worth repeating."""
    return isinstance(exc, REDIS_ERRORS) or cannot_write_now(exc)


@asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Turns Redis connection and timeout errors, and "cannot write now" replies, into :class:`Unavailable`."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"Redis is unavailable: {type(exc).__name__}") from exc
    except (ResponseError, *UNAVAILABLE_REPLIES) as exc:
        if not cannot_write_now(exc):
            raise
        raise Unavailable(f"Redis cannot take the request now: {type(exc).__name__}") from exc
