"""Hostile input: every RPC's fields filled with arbitrary values, names that try to reach other keys,
and a rogue publisher on the relay channels. Nothing crashes, a refused request stores nothing, an
accepted job reads back as it was sent, and no outcome changes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis as redis_sync
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.devstack import Stack
from gateway.keys import Keys
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .conftest import FAST

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# Small limits, so that every limit is reached by the generated requests.
MAX_PAYLOAD = 4096
MAX_MESSAGE = 256 * 1024
MAX_BATCH = 20
MAX_WATCH_IDS = 10
LIMITS = {
    "JOBGATE_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
    "JOBGATE_MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
    "JOBGATE_MAX_BATCH": str(MAX_BATCH),
    "JOBGATE_MAX_WATCH_IDS": str(MAX_WATCH_IDS),
}
WEEK_S = 7 * 24 * 3600

# The documented contract, written out here rather than imported, so the gateway is checked against
# the README and not against itself. \A...\Z: a name is nothing but these characters.
QUEUE_OK = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
KIND_OK = re.compile(r"\A[A-Za-z0-9_.:-]{1,128}\Z")
ID_OK = re.compile(r"\A[0-9a-f]{32}\Z")

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# --- strategies ---------------------------------------------------------------------------
SPECIAL = [
    "*", "?", "[", "]", "{", "}", ":", "\n", "\r\n", "\x00", "\t", " ", "", "default", "echo",
    "*:*", "{*}", "[a-z]*", "\\*", "default:x", "echo:*", "{other}", "{other}:job:*", "../", "../../etc/passwd",
    "queues", "pending:default:echo", "redis.call('FLUSHALL')", "]]; redis.call('DEL', KEYS[1]) --[[",
    "default\n", "echo\n", "0123456789abcdef0123456789abcdef\n", "%s%n", "${jndi:x}",
    "\u202e", "\ufeff", "\U0001f4a5", "é", "\uff41",
]  # fmt: skip
NAME_CHARS = "abcXYZ019_.-:"


class Huge(str):
    """A long run of one character, shown short in hypothesis's reports."""

    __slots__ = ()

    @classmethod
    def of(cls, spec: tuple[str, int]) -> Huge:
        return cls(spec[0] * spec[1])

    def __repr__(self) -> str:
        return f"({self[0]!r} * {len(self)})"


def _hostile_text() -> st.SearchStrategy[str]:
    near_valid = st.text(alphabet=NAME_CHARS, min_size=1, max_size=140)
    return st.one_of(
        st.sampled_from(SPECIAL),
        st.text(max_size=40),  # any code point but surrogates: control characters, NUL, RTL marks
        near_valid,
        st.tuples(near_valid, st.sampled_from(SPECIAL), near_valid).map("".join),
        st.tuples(st.sampled_from("x*é\x00"), st.sampled_from([5_000, 70_000, 400_000])).map(Huge.of),
    )


hostile_text = _hostile_text()
hex_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
ints32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([-(2**31), -1, 0, 1, 3, 100, 101, 255, 256, 2**31 - 1]),
)
ints64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), -1, 0, 1, WEEK_S, WEEK_S + 1, 2**63 - 1])
)
durations = st.builds(Duration, seconds=ints64, nanos=ints32)


def _values(*, unset: bool) -> st.SearchStrategy[struct_pb2.Value]:
    """Values nested up to 20 leaves deep; with ``unset``, some Values have no kind set (refused)."""
    leaves = st.one_of(
        st.builds(lambda: struct_pb2.Value()) if unset else st.nothing(),
        st.builds(lambda: struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        st.builds(lambda n: struct_pb2.Value(number_value=n), st.floats()),  # NaN and infinities too
        st.builds(lambda s: struct_pb2.Value(string_value=s), hostile_text),
        st.builds(lambda b: struct_pb2.Value(bool_value=b), st.booleans()),
        st.builds(lambda: struct_pb2.Value(struct_value=struct_pb2.Struct())),
        st.builds(lambda: struct_pb2.Value(list_value=struct_pb2.ListValue())),
    )

    def nest(children: st.SearchStrategy[struct_pb2.Value]) -> st.SearchStrategy[struct_pb2.Value]:
        def as_list(items: list[struct_pb2.Value]) -> struct_pb2.Value:
            return struct_pb2.Value(list_value=struct_pb2.ListValue(values=items))

        def as_struct(items: dict[str, struct_pb2.Value]) -> struct_pb2.Value:
            v = struct_pb2.Value(struct_value=struct_pb2.Struct())
            for k, child in items.items():
                v.struct_value.fields[k].CopyFrom(child)
            return v

        return st.one_of(
            st.lists(children, max_size=6).map(as_list),
            st.dictionaries(st.text(max_size=12), children, max_size=6).map(as_struct),
        )

    return st.recursive(leaves, nest, max_leaves=20)


SUBMIT_FIELDS = ["queue", "kind", "args", "payload", "priority", "max_attempts", "timeout", "idempotency_key"]
valid_queues = st.one_of(st.just(""), st.just("default"), st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z"))
valid_kinds = st.one_of(st.just("echo"), st.from_regex(r"\A[A-Za-z0-9_.:-]{1,128}\Z"))
valid_timeouts = st.builds(
    Duration, seconds=st.one_of(st.just(WEEK_S), st.integers(0, WEEK_S)), nanos=st.integers(0, 999_999_999)
)


@st.composite
def submit_requests(draw: st.DrawFn) -> scheduler_pb2.SubmitJobRequest:
    """A request whose fields are valid except for a few (usually one or none) drawn from hostile values."""
    hostile = draw(st.sets(st.sampled_from(SUBMIT_FIELDS), max_size=3))

    def pick(name: str, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(bad if name in hostile else good)

    req = scheduler_pb2.SubmitJobRequest(
        queue=pick("queue", valid_queues, hostile_text),
        kind=pick("kind", valid_kinds, hostile_text),
        payload=pick("payload", st.binary(max_size=64), st.binary(min_size=4000, max_size=5000)),
        priority=pick("priority", st.one_of(st.sampled_from([0, 255]), st.integers(0, 255)), ints32),
        max_attempts=pick("max_attempts", st.one_of(st.sampled_from([0, 1, 100]), st.integers(0, 100)), ints32),
        idempotency_key=pick(
            "idempotency_key",
            st.one_of(st.just(""), st.sampled_from(["k1", "k2"]), st.text(min_size=256, max_size=256)),
            st.one_of(hostile_text, st.text(min_size=257, max_size=300)),
        ),
    )
    if draw(st.booleans()):
        req.args.CopyFrom(pick("args", _values(unset=False), _values(unset=True)))
    if draw(st.booleans()):
        req.timeout.CopyFrom(pick("timeout", valid_timeouts, durations))
    return req


# --- the oracle: what the README says each request gets -----------------------------------
def _has_unset_value(v: struct_pb2.Value) -> bool:
    kind = v.WhichOneof("kind")
    if kind is None:
        return True
    if kind == "struct_value":
        return any(_has_unset_value(c) for c in v.struct_value.fields.values())
    if kind == "list_value":
        return any(_has_unset_value(c) for c in v.list_value.values)
    return False


def bad_fields(req: scheduler_pb2.SubmitJobRequest, prefix: str = "") -> list[str]:
    """The fields of one submit request that the README says are malformed (INVALID_ARGUMENT)."""
    bad = []
    if req.queue and not QUEUE_OK.match(req.queue):
        bad.append("queue")
    if not KIND_OK.match(req.kind):
        bad.append("kind")
    if req.HasField("args") and _has_unset_value(req.args):
        bad.append("args")
    if not 0 <= req.priority <= 255:
        bad.append("priority")
    if not 0 <= req.max_attempts <= 100:
        bad.append("max_attempts")
    t = req.timeout
    if req.HasField("timeout") and (t.seconds < 0 or t.nanos < 0 or t.seconds > WEEK_S):
        bad.append("timeout")
    if len(req.idempotency_key) > 256:
        bad.append("idempotency_key")
    return [prefix + f for f in bad]


def over_payload(req: scheduler_pb2.SubmitJobRequest) -> bool:
    return len(req.payload) + (req.args.ByteSize() if req.HasField("args") else 0) > MAX_PAYLOAD


def normalised(req: scheduler_pb2.SubmitJobRequest) -> job_pb2.JobSpec:
    """The spec a stored job must read back with: defaults applied, everything else as sent."""
    spec = job_pb2.JobSpec(
        queue=req.queue or "default",
        kind=req.kind,
        payload=req.payload,
        priority=req.priority,
        max_attempts=req.max_attempts or 3,
        idempotency_key=req.idempotency_key,
    )
    if req.HasField("args"):
        spec.args.CopyFrom(req.args)
    if req.HasField("timeout") and (req.timeout.seconds or req.timeout.nanos):
        spec.timeout.CopyFrom(req.timeout)
    return spec


def spec_bytes(spec: job_pb2.JobSpec) -> bytes:
    return spec.SerializeToString(deterministic=True)


def name_trouble(text: str) -> bool:
    """A name that is valid but for a trailing newline: the known bug pinned by
    test_names_and_ids_with_a_trailing_newline_are_refused. Such inputs still get every safety check
    (status, liveness, nothing stored on refusal), but not the exact-status one. Drop this once fixed."""
    head = text[:-1]
    return text.endswith("\n") and bool(QUEUE_OK.match(head) or KIND_OK.match(head) or ID_OK.match(head))


# --- one gateway for the module -----------------------------------------------------------
class Gateway:
    """One gateway process (no workers) in a namespace of its own, with sync clients."""

    def __init__(self, stack: Stack, address: str, keys: Keys, neighbour: Keys, redis: redis_sync.Redis) -> None:
        self.stack = stack
        self.address = address
        self.keys = keys
        self.neighbour = neighbour
        self.redis = redis
        self.channel = grpc.insecure_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)
        self.idempotent: dict[str, tuple[str, bytes]] = {}  # key -> (job id, spec bytes) of accepted jobs
        self.jobs: dict[str, bytes] = {}  # accepted job id -> spec bytes

    def snapshot(self, keys: Keys | None = None) -> dict[bytes, bytes]:
        """Every key of a namespace (found with SCAN on its prefix) with a dump of its value."""
        names = sorted(self.redis.scan_iter(match=self.glob(keys or self.keys), count=1000))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.dump(name)
        return dict(zip(names, pipe.execute(), strict=True))

    @staticmethod
    def glob(keys: Keys) -> str:
        return keys.prefix.replace("{", "\\{").replace("}", "\\}") + "*"

    def __repr__(self) -> str:
        return f"Gateway({self.address}, namespace={self.keys.namespace!r})"

    def alive(self) -> bool:
        return self.stack.gateways[0].alive()


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[Gateway]:
    ns = "h" + uuid.uuid4().hex[:12]
    stack = Stack(redis_url, ns, env={**FAST, **LIMITS})
    client = redis_sync.Redis.from_url(redis_url, socket_timeout=10)
    neighbour = Keys(ns + "-other")
    # Another namespace's keys, which nothing sent to this gateway may touch.
    client.hset(neighbour.job("0" * 32), mapping={"state": "1", "queue": "default"})
    client.zadd(neighbour.pending("default", "echo"), {"0" * 32: 1})
    client.sadd(neighbour.queues(), "default")
    try:
        _, address = stack.start_gateway()
        g = Gateway(stack, address, Keys(ns), neighbour, client)
        before = g.snapshot(neighbour)
        yield g
        assert g.snapshot(neighbour) == before, "another namespace's keys changed"
        assert g.alive()
        g.channel.close()
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        for keys in (Keys(ns), neighbour):
            for name in client.scan_iter(match=Gateway.glob(keys), count=1000):
                client.delete(name)
        client.close()


def call_status(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return OK, "", fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def first_event(stream: Any) -> Any:
    try:
        return next(stream)
    finally:
        stream.cancel()


def check_reply(
    g: Gateway, code: grpc.StatusCode, details: str, allowed: set[grpc.StatusCode], fields: list[str]
) -> None:
    assert code in allowed, (code, details)
    if code in (INVALID, EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS) and fields:
        assert any(details.startswith(f + ":") for f in fields), (fields, details)
    assert "internal error" not in details
    assert g.alive()


def expected_submit(
    g: Gateway, reqs: list[scheduler_pb2.SubmitJobRequest], prefixes: list[str], size: int
) -> tuple[set[grpc.StatusCode], list[str]]:
    """The status a submit of ``reqs`` (a message of ``size`` bytes) must get, and the fields its
    message may name."""
    if size > MAX_MESSAGE:
        return {EXHAUSTED}, []
    bad = [f for r, p in zip(reqs, prefixes, strict=True) for f in bad_fields(r, p)]
    if bad:
        return {INVALID}, bad
    if len(reqs) > 1:
        keys = [r.idempotency_key for r in reqs if r.idempotency_key]
        if len(keys) != len(set(keys)):
            return {INVALID}, ["jobs"]
    big = [p + "payload" for r, p in zip(reqs, prefixes, strict=True) if over_payload(r)]
    if big:
        return {EXHAUSTED}, big
    for r in reqs:
        seen = g.idempotent.get(r.idempotency_key)
        if r.idempotency_key and seen and seen[1] != spec_bytes(normalised(r)):
            return {grpc.StatusCode.ALREADY_EXISTS}, ["idempotency_key"]  # no index: the store names it
    return {OK}, []


def check_accepted(g: Gateway, reqs: list[scheduler_pb2.SubmitJobRequest], ids: list[str]) -> None:
    """Each accepted job reads back with exactly the normalised spec that was sent."""
    for r, job_id in zip(reqs, ids, strict=True):
        want = spec_bytes(normalised(r))
        if r.idempotency_key in g.idempotent:
            assert g.idempotent[r.idempotency_key] == (job_id, want)
        elif r.idempotency_key:
            g.idempotent[r.idempotency_key] = (job_id, want)
        stored = g.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=10).job
        assert spec_bytes(stored.spec) == want, (stored.spec, r)
        g.jobs[job_id] = want


def submit_and_check(
    g: Gateway,
    reqs: list[scheduler_pb2.SubmitJobRequest],
    prefixes: list[str],
    size: int,
    send: Callable[[], list[str]],
) -> None:
    before = g.snapshot()
    code, details, ids = call_status(send)
    known_bug = any(name_trouble(t) for r in reqs for t in (r.queue, r.kind))
    if known_bug:
        check_reply(g, code, details, {OK, INVALID, EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}, [])
    else:
        allowed, fields = expected_submit(g, reqs, prefixes, size)
        check_reply(g, code, details, allowed, fields)
    if code != OK:
        assert g.snapshot() == before, "a refused submit changed stored keys"
    elif not known_bug:
        check_accepted(g, reqs, ids)


# --- properties ---------------------------------------------------------------------------
@SETTINGS
@given(req=submit_requests())
def test_submit_job_answers_as_documented_and_a_refusal_stores_nothing(
    gateway: Gateway, req: scheduler_pb2.SubmitJobRequest
) -> None:
    submit_and_check(gateway, [req], [""], req.ByteSize(), lambda: [gateway.stub.SubmitJob(req, timeout=10).job.id])


@SETTINGS
@given(reqs=st.lists(submit_requests(), min_size=0, max_size=MAX_BATCH + 3))
def test_submit_jobs_answers_as_documented_and_a_refusal_stores_none_of_the_batch(
    gateway: Gateway, reqs: list[scheduler_pb2.SubmitJobRequest]
) -> None:
    batch = scheduler_pb2.SubmitJobsRequest(jobs=reqs)

    def send() -> list[str]:
        return [j.id for j in gateway.stub.SubmitJobs(batch, timeout=20).jobs]

    if not reqs or len(reqs) > MAX_BATCH:
        before = gateway.snapshot()
        code, details, _ = call_status(send)
        allowed = {EXHAUSTED} if batch.ByteSize() > MAX_MESSAGE else {INVALID}
        check_reply(gateway, code, details, allowed, ["jobs"])
        assert gateway.snapshot() == before
        return
    submit_and_check(gateway, reqs, [f"jobs[{i}]." for i in range(len(reqs))], batch.ByteSize(), send)


@SETTINGS
@given(req=submit_requests())
def test_run_job_answers_as_documented_and_a_refusal_stores_nothing(
    gateway: Gateway, req: scheduler_pb2.SubmitJobRequest
) -> None:
    run = scheduler_pb2.RunJobRequest(job=req)

    def send() -> list[str]:
        event = first_event(gateway.stub.RunJob(run, timeout=10)).event
        # No worker: a new job waits in its queue; an idempotent repeat may find it cancelled.
        assert event.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_CANCELLED)
        return [event.job_id]

    submit_and_check(gateway, [req], ["job."], run.ByteSize(), send)


@SETTINGS
@given(
    job_ids=st.lists(st.one_of(hex_ids, hostile_text), max_size=MAX_WATCH_IDS + 3),
    queue=st.one_of(st.just(""), hostile_text),
    kinds=st.lists(st.one_of(st.just("echo"), hostile_text), max_size=4),
)
def test_watch_results_answers_as_documented(
    gateway: Gateway, job_ids: list[str], queue: str, kinds: list[str]
) -> None:
    req = scheduler_pb2.WatchResultsRequest(job_ids=job_ids, queue=queue, kinds=kinds)
    bad = [f"job_ids[{i}]" for i, j in enumerate(job_ids) if not ID_OK.match(j)]
    bad += ["job_ids"] if len(job_ids) > MAX_WATCH_IDS else []
    bad += ["queue"] if queue and not QUEUE_OK.match(queue) else []
    bad += [f"kinds[{i}]" for i, k in enumerate(kinds) if not KIND_OK.match(k)]
    before = gateway.snapshot()
    if req.ByteSize() > MAX_MESSAGE:
        code, details, _ = call_status(lambda: list(gateway.stub.WatchResults(req, timeout=10)))
        check_reply(gateway, code, details, {EXHAUSTED}, [])
    elif any(name_trouble(t) for t in [*job_ids, queue, *kinds]):  # the known bug: only the safety checks
        code, details, _ = call_status(lambda: list(gateway.stub.WatchResults(req, timeout=0.5)))
        check_reply(gateway, code, details, {INVALID, NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED}, [])
    elif bad:
        code, details, _ = call_status(lambda: list(gateway.stub.WatchResults(req, timeout=10)))
        check_reply(gateway, code, details, {INVALID}, bad)
    elif job_ids:
        code, details, _ = call_status(lambda: list(gateway.stub.WatchResults(req, timeout=10)))
        check_reply(gateway, code, details, {NOT_FOUND}, [])
        assert any(j in details for j in job_ids), details
    else:  # a valid filter without ids: the stream stays open until the deadline
        code, details, _ = call_status(lambda: list(gateway.stub.WatchResults(req, timeout=0.3)))
        check_reply(gateway, code, details, {grpc.StatusCode.DEADLINE_EXCEEDED}, [])
    assert gateway.snapshot() == before


@SETTINGS
@given(
    job_id=st.one_of(hex_ids, hostile_text, st.integers(0, 10**6)),
    cancel=st.booleans(),
)
def test_get_job_and_cancel_job_answer_as_documented(gateway: Gateway, job_id: str | int, cancel: bool) -> None:
    if isinstance(job_id, int):  # one of the jobs accepted so far, if any
        job_id = sorted(gateway.jobs)[job_id % len(gateway.jobs)] if gateway.jobs else "f" * 32
    foreign, own = gateway.snapshot(gateway.neighbour), gateway.snapshot()
    if cancel:
        code, details, reply = call_status(
            lambda: gateway.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id), timeout=10)
        )
        allowed = {OK, grpc.StatusCode.FAILED_PRECONDITION} if job_id in gateway.jobs else {NOT_FOUND}
    else:
        code, details, reply = call_status(
            lambda: gateway.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=10)
        )
        allowed = {OK} if job_id in gateway.jobs else {NOT_FOUND}
    if name_trouble(job_id):
        allowed = {INVALID, NOT_FOUND}  # the known bug: only the safety checks
    elif len(job_id.encode()) > MAX_MESSAGE:
        allowed = {EXHAUSTED}
    elif not ID_OK.match(job_id):
        allowed = {INVALID}
    check_reply(gateway, code, details, allowed, [] if allowed == {EXHAUSTED} else ["id"])
    if code == OK:
        assert reply.job.id == job_id and spec_bytes(reply.job.spec) == gateway.jobs[job_id]
        assert not cancel or reply.job.state == job_pb2.JOB_STATE_CANCELLED
    if not (cancel and code == OK):
        assert gateway.snapshot() == own
    assert gateway.snapshot(gateway.neighbour) == foreign


@SETTINGS
@given(junk=st.binary(max_size=200))
def test_list_workers_ignores_unknown_fields(gateway: Gateway, junk: bytes) -> None:
    """ListWorkersRequest has no fields: whatever well-formed fields a newer client sends are ignored."""
    fields = b"".join(b"\x0a" + bytes([min(len(part), 127)]) + part[:127] for part in (junk, junk[::-1]))
    call = gateway.channel.unary_unary(
        "/jobgate.v1.SchedulerService/ListWorkers",
        response_deserializer=scheduler_pb2.ListWorkersResponse.FromString,
    )
    code, details, reply = call_status(lambda: call(fields, timeout=10))
    check_reply(gateway, code, details, {OK}, [])
    assert list(reply.workers) == []  # this gateway has no workers
