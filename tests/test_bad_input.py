"""Bad input gets a clear status naming the field, and nothing is stored."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from redis.asyncio import Redis

from jobgate.v1 import scheduler_pb2
from protocol.keys import Keys

from .helpers import Client, request, status_of

INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD_ID = "0" * 32


# The `client` fixture's gateway: small limits, and no worker (so nothing but the gateway writes keys).
pytestmark = pytest.mark.gateway(
    env={
        "JOBGATE_MAX_PAYLOAD_BYTES": "1000",
        "JOBGATE_MAX_MESSAGE_BYTES": "65536",
        "JOBGATE_MAX_BATCH": "50",
        "JOBGATE_MAX_WATCH_IDS": "10",
    },
    worker=None,
)


SUBMIT_CASES = [
    (dict(kind=""), INVALID, "kind"),
    (dict(kind="has space"), INVALID, "kind"),
    (dict(kind="k" * 129), INVALID, "kind"),
    (dict(kind="echo", queue="bad queue"), INVALID, "queue"),
    (dict(kind="echo", queue="{tag}*"), INVALID, "queue"),
    (dict(kind="echo", queue="q" * 65), INVALID, "queue"),
    (dict(kind="echo", priority=256), INVALID, "priority"),
    (dict(kind="echo", priority=-1), INVALID, "priority"),
    (dict(kind="echo", max_attempts=101), INVALID, "max_attempts"),
    (dict(kind="echo", max_attempts=-2), INVALID, "max_attempts"),
    (dict(kind="echo", timeout=Duration(seconds=-1)), INVALID, "timeout"),
    (dict(kind="echo", timeout=Duration(seconds=8 * 24 * 3600)), INVALID, "timeout"),
    (dict(kind="echo", idempotency_key="k" * 257), INVALID, "idempotency_key"),
    (dict(kind="echo", concurrency_key="k" * 129), INVALID, "concurrency_key"),
    (dict(kind="echo", concurrency_key="a b"), INVALID, "concurrency_key"),
    (dict(kind="echo", concurrency_key="{tag}"), INVALID, "concurrency_key"),
    (dict(kind="echo", payload=b"x" * 1001), grpc.StatusCode.RESOURCE_EXHAUSTED, "payload"),
    (dict(kind="echo", args=struct_pb2.Value()), INVALID, "args"),
    (
        dict(kind="echo", args=struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value()]))),
        INVALID,
        "args",
    ),
]


@pytest.mark.parametrize(("fields", "code", "field"), SUBMIT_CASES)
async def test_submit_rejects_bad_fields_naming_them_and_stores_nothing(
    client: Client, redis: Redis, keys: Keys, fields: dict[str, Any], code: grpc.StatusCode, field: str
) -> None:
    got, details = await status_of(client.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(**fields)))
    assert (got, field in details) == (code, True), details
    got, details = await status_of(
        client.stub.RunJob(scheduler_pb2.RunJobRequest(job=scheduler_pb2.SubmitJobRequest(**fields)))
    )
    assert (got, f"job.{field}" in details) == (code, True), details
    assert await redis.keys(keys.prefix + "*") == []


async def test_batch_error_names_the_job_index_and_stores_none_of_the_batch(
    client: Client, redis: Redis, keys: Keys
) -> None:
    jobs = [request("echo") for _ in range(5)]
    jobs[3] = request("")
    code, details = await status_of(client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=jobs)))
    assert code == INVALID and "jobs[3].kind" in details
    code, details = await status_of(client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest()))
    assert code == INVALID and "jobs" in details
    too_many = [request("echo") for _ in range(51)]
    code, details = await status_of(client.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=too_many)))
    assert code == INVALID and "at most 50" in details
    assert await redis.keys(keys.prefix + "*") == []


async def test_a_message_over_the_grpc_size_limit_is_refused_before_any_handler(
    client: Client, redis: Redis, keys: Keys
) -> None:
    code, _ = await status_of(client.stub.SubmitJob(request("echo", payload=b"x" * 70_000)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await redis.keys(keys.prefix + "*") == []


@pytest.mark.parametrize(
    ("job_id", "code", "field"),
    [
        ("", INVALID, "id"),
        ("NOT-AN-ID", INVALID, "id"),
        ("*" * 32, INVALID, "id"),
        (GOOD_ID, grpc.StatusCode.NOT_FOUND, GOOD_ID),
    ],
)
async def test_get_and_cancel_name_bad_or_unknown_ids(
    client: Client, job_id: str, code: grpc.StatusCode, field: str
) -> None:
    for call in (
        client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id)),
        client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id)),
    ):
        got, details = await status_of(call)
        assert got == code and field in details, details


@pytest.mark.parametrize(
    ("req", "code", "field"),
    [
        (scheduler_pb2.WatchResultsRequest(job_ids=["nope"]), INVALID, "job_ids[0]"),
        (scheduler_pb2.WatchResultsRequest(job_ids=[GOOD_ID] * 11), INVALID, "job_ids"),
        (scheduler_pb2.WatchResultsRequest(job_ids=[GOOD_ID]), grpc.StatusCode.NOT_FOUND, GOOD_ID),
        (scheduler_pb2.WatchResultsRequest(queue="a b"), INVALID, "queue"),
        (scheduler_pb2.WatchResultsRequest(kinds=["ok", "not ok"]), INVALID, "kinds[1]"),
    ],
)
async def test_watch_rejects_bad_filters_naming_them(
    client: Client, req: scheduler_pb2.WatchResultsRequest, code: grpc.StatusCode, field: str
) -> None:
    got, details = await status_of(client.stub.WatchResults(req, timeout=5))
    assert got == code and field in details, details
