"""The errors a jobgate call raises: one class per gRPC status the gateway answers with."""

from __future__ import annotations

import grpc


class JobgateError(Exception):
    """A call failed. ``code`` is the gRPC status, ``details`` the gateway's message (it starts with
    the field at fault for INVALID_ARGUMENT, e.g. ``"kind: must be 1-128 characters"``)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(JobgateError):
    """A field is malformed (``details`` names it); nothing was stored."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(JobgateError):
    """No such job, batch or schedule (or it is past its retention)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(JobgateError):
    """An idempotency key used for another request, a unique key held, a schedule name taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(JobgateError):
    """The job is not in a state the call applies to (cancel a finished job, retry a running one)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(JobgateError):
    """The token may not use that queue."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(JobgateError):
    """No token, or one the gateway does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(JobgateError):
    """Over a limit: a payload, a batch, the streams a gateway serves, a watcher that fell behind."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(JobgateError):
    """No gateway answered, or the gateway could not reach Redis, after every retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(JobgateError):
    """The call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[JobgateError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
    )
}


def from_rpc_error(error: grpc.RpcError) -> JobgateError:
    """The JobgateError for a failed gRPC call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, JobgateError)
    return cls(details) if cls is not JobgateError else JobgateError(details, code)
