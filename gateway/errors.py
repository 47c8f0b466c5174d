"""Domain errors. Each carries the name of the gRPC status code the service layer returns for it."""

from __future__ import annotations


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


class PermissionDenied(JobgateError):
    """The caller's token does not cover the queue the request touches."""

    code = "PERMISSION_DENIED"
