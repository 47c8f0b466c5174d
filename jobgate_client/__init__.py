"""A typed Python client for jobgate: ``Client`` (asyncio) and ``SyncClient`` (blocking).

    from jobgate_client import Client

    async with Client("127.0.0.1:50051") as jobs:
        job = await jobs.submit("echo", {"hello": "world"})
        async for event in jobs.run("sleep", {"seconds": 1}):
            print(event.state, event.result)

States are :class:`JobState` members, failures :class:`JobgateError` subclasses, ``args`` and
results plain JSON values. docs/USAGE.md describes it.
"""

from .aio import Client, Retry, job_request
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    JobgateError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .models import (
    Attempt,
    Batch,
    Event,
    Job,
    JobError,
    JobState,
    Limits,
    Page,
    Progress,
    QueueStats,
    Schedule,
    Worker,
)
from .sync import SyncClient

__all__ = [
    "AlreadyExists",
    "Attempt",
    "Batch",
    "Client",
    "DeadlineExceeded",
    "Event",
    "FailedPrecondition",
    "InvalidArgument",
    "Job",
    "JobError",
    "JobState",
    "JobgateError",
    "Limits",
    "NotFound",
    "Page",
    "PermissionDenied",
    "Progress",
    "QueueStats",
    "ResourceExhausted",
    "Retry",
    "Schedule",
    "SyncClient",
    "Unauthenticated",
    "Unavailable",
    "Worker",
    "job_request",
]
