"""Hostile input: every RPC's fields filled with arbitrary values, names that try to reach other keys,
and a rogue publisher on the relay channels. Nothing crashes, a refused request stores nothing, an
accepted job reads back as it was sent, and no outcome changes."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis as redis_sync
from google.protobuf import json_format, struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from devtools.devstack import Stack
from devtools.servers import free_port
from jobgate.v1 import job_pb2, relay_pb2, scheduler_pb2, scheduler_pb2_grpc
from protocol.keys import Keys

from .helpers import FAST, Client, eventually, request, start_gateway, value, wait_streams_open
from .processes import logged, metrics_env, scrape

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
    # Every accepted example leaves its job waiting (no worker), under names hypothesis invents: the
    # queue and kind counts are limits of their own (test_limits.py), not what is tested here.
    "JOBGATE_MAX_QUEUES": "1000000",
    "JOBGATE_MAX_KINDS": "1000000",
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


SUBMIT_FIELDS = [
    "queue",
    "kind",
    "args",
    "payload",
    "priority",
    "max_attempts",
    "timeout",
    "idempotency_key",
    "run_at",
    "delay",
    "retry",
    "unique_key",
    "labels",
    "depends_on",
    "concurrency_key",
]
DAY_S = 86_400
LABEL_OK = re.compile(r"\A[A-Za-z0-9_.-]{1,63}\Z")
LABEL_VALUE_OK = re.compile(r"\A[A-Za-z0-9_.-]{0,63}\Z")
CONCURRENCY_KEY_OK = re.compile(r"\A[A-Za-z0-9_.:@/+=-]{1,128}\Z")
YEAR_S = 365 * DAY_S
HORIZON_S = int(time.time()) + YEAR_S  # how far ahead run_at may reach (as of this module's start)
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
        unique_key=pick(
            "unique_key",
            st.one_of(st.just(""), st.just(""), st.sampled_from(["u1", "u2"])),
            st.text(min_size=257, max_size=300),
        ),
        concurrency_key=pick(
            "concurrency_key",
            st.one_of(st.just(""), st.sampled_from(["tenant-1", "a@b.c/x+y=z:1"]), st.just("k" * 128)),
            st.one_of(hostile_text, st.just("k" * 129), st.sampled_from(["a b", "{tag}", "é", "x\ny"])),
        ),
    )
    if draw(st.booleans()):
        req.args.CopyFrom(pick("args", _values(unset=False), _values(unset=True)))
    if draw(st.booleans()):
        req.timeout.CopyFrom(pick("timeout", valid_timeouts, durations))
    good_labels = st.dictionaries(st.sampled_from(["gpu", "region", "a.b-c_1"]), st.sampled_from(["", "true", "eu"]))
    label_text = st.one_of(st.sampled_from(["", "a b", "x" * 64, "é", "k=v", "a,b", "|"]), st.text(max_size=70))
    hostile_labels = st.one_of(  # short texts: a big repr of a failing example is an error of its own
        st.dictionaries(label_text, label_text, max_size=3),
        st.dictionaries(st.from_regex(r"\Al[0-9]{1,3}\Z"), st.just("1"), min_size=17, max_size=18),
    )
    req.labels.update(pick("labels", good_labels, hostile_labels))
    no_dependencies = st.just([])  # none of the module's jobs is known to the examples
    some = st.one_of(
        st.lists(st.one_of(hex_ids, st.text(max_size=40)), min_size=1, max_size=3),
        st.lists(hex_ids, min_size=101, max_size=102),
    )
    req.depends_on.extend(pick("depends_on", no_dependencies, some))
    when = draw(st.sampled_from(["", "", "run_at", "delay", "both"]))
    if when in ("run_at", "both"):
        # no example within an hour of the horizon: the oracle's clock is not the gateway's
        # past, or a day or more ahead: no job of the module falls due while another example
        # compares the namespace's keys before and after
        when_s = st.one_of(
            st.integers(0, HORIZON_S - YEAR_S - 3600), st.integers(HORIZON_S - YEAR_S + DAY_S, HORIZON_S - 3600)
        )
        good = st.builds(Timestamp, seconds=when_s, nanos=st.integers(0, 999_999_999))
        hostile_ts = st.builds(Timestamp, seconds=ints64, nanos=ints32).filter(
            lambda t: abs(t.seconds - HORIZON_S) > 3600
        )
        req.run_at.CopyFrom(pick("run_at", good, hostile_ts))
    if when in ("delay", "both"):
        good_delay = st.one_of(  # at once, or a day or more (as run_at above)
            st.just(Duration()),
            st.builds(Duration, seconds=st.integers(DAY_S, YEAR_S - 1), nanos=st.integers(0, 999_999_999)),
        )
        req.delay.CopyFrom(pick("delay", good_delay, durations.filter(_never_due_soon)))
    if draw(st.booleans()):
        backoff = st.builds(Duration, seconds=st.integers(0, DAY_S - 1), nanos=st.integers(0, 999_999_999))
        multiplier = st.one_of(st.just(0.0), st.floats(1, 100))
        req.retry.CopyFrom(
            pick(
                "retry",
                st.builds(job_pb2.RetryPolicy, initial_backoff=backoff, multiplier=multiplier).filter(
                    lambda r: r.initial_backoff.ToMilliseconds() <= 300_000
                ),
                st.builds(
                    job_pb2.RetryPolicy, initial_backoff=durations, max_backoff=durations, multiplier=st.floats()
                ),
            )
        )
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
    over_a_week = t.seconds * 1000 + t.nanos // 1_000_000 > WEEK_S * 1000
    if req.HasField("timeout") and (t.seconds < 0 or t.nanos < 0 or t.nanos > 999_999_999 or over_a_week):
        bad.append("timeout")
    if len(req.idempotency_key) > 256:
        bad.append("idempotency_key")
    if len(req.unique_key) > 256:
        bad.append("unique_key")
    if req.concurrency_key and not CONCURRENCY_KEY_OK.match(req.concurrency_key):
        bad.append("concurrency_key")
    deps = list(req.depends_on)
    if len(deps) > 100 or len(set(deps)) != len(deps) or not all(ID_OK.match(d) for d in deps):
        bad += ["depends_on", *(f"depends_on[{i}]" for i in range(len(deps)))]
    if len(req.labels) > 16 or not all(LABEL_OK.match(n) and LABEL_VALUE_OK.match(v) for n, v in req.labels.items()):
        bad.append("labels")
    bad += _bad_time_fields(req)
    return [prefix + f for f in bad]


def _bad_time_fields(req: scheduler_pb2.SubmitJobRequest) -> list[str]:
    """The malformed ones of run_at, delay and retry."""
    bad = []
    if req.HasField("run_at") and req.HasField("delay"):
        bad.append("run_at")
    elif req.HasField("run_at"):
        t = req.run_at
        if t.seconds < 0 or not 0 <= t.nanos <= 999_999_999 or t.seconds > time.time() + YEAR_S:
            bad.append("run_at")
    elif req.HasField("delay") and _bad_duration(req.delay, YEAR_S):
        bad.append("delay")
    if req.HasField("retry"):
        r = req.retry
        initial, most = 1000, 300_000
        if r.HasField("initial_backoff"):
            if _bad_duration(r.initial_backoff, DAY_S):
                bad.append("retry.initial_backoff")
            initial = r.initial_backoff.seconds * 1000 + r.initial_backoff.nanos // 1_000_000
        if r.HasField("max_backoff"):
            if _bad_duration(r.max_backoff, 7 * DAY_S):
                bad.append("retry.max_backoff")
            most = r.max_backoff.seconds * 1000 + r.max_backoff.nanos // 1_000_000
        if r.multiplier != 0 and not 1 <= r.multiplier <= 100:
            bad.append("retry.multiplier")
        if most < initial:
            bad.append("retry.max_backoff")
    return bad


def _never_due_soon(d: Duration) -> bool:
    """A delay that is refused, zero, or a day or more: nothing falls due during the module."""
    return _bad_duration(d, YEAR_S) or d.seconds >= DAY_S or (d.seconds == 0 and d.nanos == 0)


def _bad_duration(d: Duration, most_s: int) -> bool:
    return (
        d.seconds < 0 or d.nanos < 0 or d.nanos > 999_999_999 or d.seconds * 1000 + d.nanos // 1_000_000 > most_s * 1000
    )


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
        unique_key=req.unique_key,
        labels=req.labels,
        concurrency_key=req.concurrency_key,
    )
    if req.HasField("args"):
        spec.args.CopyFrom(req.args)
    if req.HasField("timeout") and (req.timeout.seconds or req.timeout.nanos):
        spec.timeout.CopyFrom(req.timeout)
    for name in ("run_at", "delay", "retry"):
        if req.HasField(name):
            getattr(spec, name).CopyFrom(getattr(req, name))
    return spec


def spec_bytes(spec: job_pb2.JobSpec) -> bytes:
    return spec.SerializeToString(deterministic=True)


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
        # (queue, key) -> (job id, spec bytes) of accepted jobs: idempotency keys are per queue
        self.idempotent: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.jobs: dict[str, bytes] = {}  # accepted job id -> spec bytes
        self.unique: dict[tuple[str, str], str] = {}  # (queue, unique key) -> the job holding it
        self.metrics_port = 0

    def rpcs(self, method: str) -> float:
        """Calls of ``method`` the gateway's handlers counted, whatever their status."""
        return sum(
            v
            for (name, labels), v in scrape(self.metrics_port).items()
            if name == "jobgate_gateway_rpcs_total" and ("method", method) in labels
        )

    def snapshot(self, keys: Keys | None = None) -> dict[bytes, bytes]:
        """Every key of a namespace (found with SCAN on its prefix) with a dump of its value, but for
        the index of queues and kinds with waiting jobs, which the placement pass prunes on its own
        when a cancel has emptied a queue."""
        k = keys or self.keys
        pruned = (k.queues().encode(), k.queue_kinds("").encode())
        names = sorted(
            n
            for n in self.redis.scan_iter(match=self.glob(k), count=1000)
            if n != pruned[0] and not n.startswith(pruned[1])
        )
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
    metrics_port = free_port()
    stack = Stack(redis_url, ns, env={**FAST, **LIMITS, **metrics_env(metrics_port)})
    client = redis_sync.Redis.from_url(redis_url, socket_timeout=10)
    neighbour = Keys(ns + "-other")
    # Another namespace's keys, which nothing sent to this gateway may touch.
    client.hset(neighbour.job("0" * 32), mapping={"state": "1", "queue": "default"})
    client.zadd(neighbour.pending("default", "echo"), {"0" * 32: 1})
    client.sadd(neighbour.queues(), "default")
    try:
        _, address = stack.start_gateway()
        g = Gateway(stack, address, Keys(ns), neighbour, client)
        g.metrics_port = metrics_port
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
    # Jobs are checked in order; within a job, malformed fields before the payload size.
    for r, p in zip(reqs, prefixes, strict=True):
        if bad := bad_fields(r, p):
            return {INVALID}, bad
        if over_payload(r):
            return {EXHAUSTED}, [p + "payload"]
    if len(reqs) > 1:
        keys = [idem(r) for r in reqs if r.idempotency_key]
        if len(keys) != len(set(keys)):
            return {INVALID}, ["jobs"]
    return expected_from_the_script(g, reqs, prefixes)


def expected_from_the_script(
    g: Gateway, reqs: list[scheduler_pb2.SubmitJobRequest], prefixes: list[str]
) -> tuple[set[grpc.StatusCode], list[str]]:
    """What the submit script answers requests that passed validation: it checks the jobs in order."""
    held: set[tuple[str, str]] = set(g.unique)
    for r, p in zip(reqs, prefixes, strict=True):
        seen = g.idempotent.get(idem(r))
        if r.idempotency_key and seen and seen[1] != spec_bytes(normalised(r)):
            return {grpc.StatusCode.ALREADY_EXISTS}, [p + "idempotency_key"]
        if r.idempotency_key and seen:
            continue  # a repeat: answered with the original job, no other check
        if r.depends_on:  # well-formed, but none of them exists
            return {INVALID}, [p + "depends_on"]
        if r.unique_key:  # no worker runs here: a unique key, once taken, stays held
            if unique(r) in held:
                return {grpc.StatusCode.ALREADY_EXISTS}, [p + "unique_key"]
            held.add(unique(r))
    return {OK}, []


def unique(r: scheduler_pb2.SubmitJobRequest) -> tuple[str, str]:
    """What a unique key is held under: keys are per queue."""
    return (normalised(r).queue, r.unique_key)


def idem(r: scheduler_pb2.SubmitJobRequest) -> tuple[str, str]:
    """What an idempotency key is remembered under: keys are per queue."""
    return (normalised(r).queue, r.idempotency_key)


def check_accepted(g: Gateway, reqs: list[scheduler_pb2.SubmitJobRequest], ids: list[str]) -> None:
    """Each accepted job reads back with exactly the normalised spec that was sent."""
    for r, job_id in zip(reqs, ids, strict=True):
        want = spec_bytes(normalised(r))
        if idem(r) in g.idempotent:
            assert g.idempotent[idem(r)] == (job_id, want)
        else:
            if r.idempotency_key:
                g.idempotent[idem(r)] = (job_id, want)
            if r.unique_key:
                g.unique[unique(r)] = job_id
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
    allowed, fields = expected_submit(g, reqs, prefixes, size)
    check_reply(g, code, details, allowed, fields)
    if code != OK:
        assert g.snapshot() == before, "a refused submit changed stored keys"
    else:
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
        # No worker: a new job waits in its queue (or for its due time); an idempotent repeat may
        # find it cancelled.
        waiting = (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_SCHEDULED, job_pb2.JOB_STATE_CANCELLED)
        assert event.state in waiting
        return [event.job_id]

    submit_and_check(gateway, [req], ["job."], run.ByteSize(), send)


@SETTINGS
@given(
    job_ids=st.lists(st.one_of(hex_ids, hostile_text), max_size=MAX_WATCH_IDS + 3),
    queue=st.one_of(st.just(""), hostile_text),
    kinds=st.lists(st.one_of(st.just("echo"), hostile_text), max_size=4),
    max_batch=st.one_of(st.integers(0, 1001), st.integers(0, 2**32 - 1)),
)
def test_watch_results_answers_as_documented(
    gateway: Gateway, job_ids: list[str], queue: str, kinds: list[str], max_batch: int
) -> None:
    req = scheduler_pb2.WatchResultsRequest(job_ids=job_ids, queue=queue, kinds=kinds, max_batch=max_batch)
    bad = [f"job_ids[{i}]" for i, j in enumerate(job_ids) if not ID_OK.match(j)]
    bad += ["job_ids"] if len(job_ids) > MAX_WATCH_IDS else []
    bad += ["queue"] if queue and not QUEUE_OK.match(queue) else []
    bad += [f"kinds[{i}]" for i, k in enumerate(kinds) if not KIND_OK.match(k)]
    bad += ["max_batch"] if max_batch > 1000 else []
    before = gateway.snapshot()
    if req.ByteSize() > MAX_MESSAGE:
        code, details, _ = call_status(lambda: list(gateway.stub.WatchResults(req, timeout=10)))
        check_reply(gateway, code, details, {EXHAUSTED}, [])
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
    if len(job_id.encode()) > MAX_MESSAGE:
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


@st.composite
def schedule_specs(draw: st.DrawFn) -> scheduler_pb2.ScheduleSpec:
    """A CreateSchedule request's schedule: mostly valid, with hostile values drawn for some fields."""
    spec = scheduler_pb2.ScheduleSpec(
        name=draw(st.one_of(st.from_regex(r"\A[A-Za-z0-9_.-]{1,128}\Z"), hostile_text)),
        misfire_policy=draw(st.one_of(st.sampled_from([0, 1, 2]), ints32)),
        overlap_policy=draw(st.one_of(st.sampled_from([0, 1, 2]), ints32)),
    )
    if draw(st.booleans()):
        spec.cron = draw(
            st.one_of(st.sampled_from(["*/5 * * * *", "0 3 * * 1-5", "@daily", "0 0 30 2 *"]), hostile_text)
        )
        spec.time_zone = draw(st.one_of(st.sampled_from(["", "UTC", "Europe/Paris", "Nowhere/Else"]), hostile_text))
    if draw(st.booleans()):
        spec.interval.CopyFrom(draw(st.one_of(st.builds(Duration, seconds=st.integers(1, 3600)), durations)))
    if draw(st.booleans()):
        spec.misfire_grace.CopyFrom(draw(durations))
    if draw(st.booleans()):
        spec.start_at.CopyFrom(draw(st.builds(Timestamp, seconds=ints64, nanos=ints32)))
    if draw(st.integers(0, 9)):
        spec.job.CopyFrom(draw(submit_requests()))
    return spec


@SETTINGS
@given(spec=schedule_specs())
def test_create_schedule_answers_as_documented_and_a_refusal_stores_nothing(
    gateway: Gateway, spec: scheduler_pb2.ScheduleSpec
) -> None:
    before = gateway.snapshot()
    request = scheduler_pb2.CreateScheduleRequest(schedule=spec)
    code, details, reply = call_status(lambda: gateway.stub.CreateSchedule(request, timeout=10))
    allowed = {OK, INVALID, grpc.StatusCode.ALREADY_EXISTS, EXHAUSTED}
    check_reply(gateway, code, details, allowed, [])
    if code != OK:  # the message names the field: schedule.<field>, schedule.job.<field>
        assert details.startswith("schedule.") or "larger than max" in details, details
    if code != OK:
        assert gateway.snapshot() == before, "a refused schedule changed stored keys"
        return
    assert reply.schedule.spec.name == spec.name and reply.schedule.next_fire_times
    delete = scheduler_pb2.DeleteScheduleRequest(name=spec.name)
    assert call_status(lambda: gateway.stub.DeleteSchedule(delete, timeout=10))[0] == OK


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


# --- fixed cases --------------------------------------------------------------------------
BIG = "x" * (MAX_MESSAGE + 1)
OVERSIZE = {
    "SubmitJobs": lambda s: s.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[request("echo", payload=BIG.encode())])),
    "RunJob": lambda s: first_event(
        s.RunJob(scheduler_pb2.RunJobRequest(job=request("echo", {"pad": BIG})), timeout=10)
    ),
    "WatchResults": lambda s: list(s.WatchResults(scheduler_pb2.WatchResultsRequest(queue=BIG), timeout=10)),
    "GetJob": lambda s: s.GetJob(scheduler_pb2.GetJobRequest(id=BIG), timeout=10),
    "CancelJob": lambda s: s.CancelJob(scheduler_pb2.CancelJobRequest(id=BIG), timeout=10),
}


@pytest.mark.parametrize("method", sorted(OVERSIZE))
def test_a_message_over_the_grpc_size_limit_is_refused_by_every_rpc_before_its_handler(
    gateway: Gateway, method: str
) -> None:
    """SubmitJob's case is in test_bad_input; here the other RPCs, and proof that no handler ran."""
    before, calls = gateway.snapshot(), gateway.rpcs(method)
    code, details, _ = call_status(lambda: OVERSIZE[method](gateway.stub))
    assert code == EXHAUSTED and "larger than max" in details, details
    assert gateway.rpcs(method) == calls
    assert gateway.snapshot() == before


def test_payload_limit_counts_args_and_payload_together_and_is_inclusive(gateway: Gateway) -> None:
    pad = struct_pb2.Value(string_value="a" * 100)
    at_limit = scheduler_pb2.SubmitJobRequest(kind="echo", args=pad, payload=b"p" * (MAX_PAYLOAD - pad.ByteSize()))
    over = scheduler_pb2.SubmitJobRequest(kind="echo", args=pad, payload=b"p" * (MAX_PAYLOAD - pad.ByteSize() + 1))
    args_only = request("echo", {"pad": "a" * MAX_PAYLOAD})
    before = gateway.snapshot()
    for refused, call, name in [
        (over, lambda r: gateway.stub.SubmitJob(r, timeout=10), "payload"),
        (args_only, lambda r: gateway.stub.SubmitJob(r, timeout=10), "payload"),
        (over, lambda r: gateway.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[at_limit, r]), timeout=10),
         "jobs[1].payload"),
        (over, lambda r: first_event(gateway.stub.RunJob(scheduler_pb2.RunJobRequest(job=r), timeout=10)),
         "job.payload"),
    ]:  # fmt: skip
        code, details, _ = call_status(lambda: call(refused))  # noqa: B023 - called at once
        assert code == EXHAUSTED and details.startswith(name + ":"), details
    assert gateway.snapshot() == before
    job = gateway.stub.SubmitJob(at_limit, timeout=10).job
    assert gateway.stub.GetJob(scheduler_pb2.GetJobRequest(id=job.id), timeout=10).job.spec.payload == at_limit.payload


def test_count_limits_are_inclusive_and_one_more_is_refused(gateway: Gateway) -> None:
    ids = [f"{n:032x}" for n in range(MAX_WATCH_IDS + 1)]
    code, details, _ = call_status(
        lambda: list(gateway.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=ids), timeout=10))
    )
    assert code == INVALID and details.startswith("job_ids:") and str(MAX_WATCH_IDS) in details, details
    code, details, _ = call_status(
        lambda: list(gateway.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=ids[1:]), timeout=10))
    )
    assert code == NOT_FOUND and ids[1] in details, details  # the count passed; the ids are unknown
    jobs = gateway.stub.SubmitJobs(
        scheduler_pb2.SubmitJobsRequest(jobs=[request("echo", {"n": n}) for n in range(MAX_BATCH)]), timeout=20
    ).jobs
    stored = gateway.redis.exists(*[gateway.keys.job(j.id) for j in jobs])
    assert (len(jobs), stored) == (MAX_BATCH, MAX_BATCH)


INJECTION = [
    ("queue", "*"), ("queue", "default:x"), ("queue", "{other}"), ("queue", "?"), ("queue", "[a-z]"),
    ("queue", "default\x00"), ("queue", "../default"), ("queue", "default\r\nDEL x"),
    ("kind", "*"), ("kind", "echo*"), ("kind", "{other}:job"), ("kind", "echo\x00"), ("kind", "a b"),
    ("kind", "echo?"), ("kind", "[e]cho"), ("kind", "echo\\"),
]  # fmt: skip
BAD_IDS = ["*", "../", "../" + "0" * 29, "*" * 32, "0" * 31 + "*", "{other}", "0" * 31 + "?", "A" * 32, "0" * 33]


@pytest.mark.parametrize(("name", "text"), INJECTION)
def test_names_with_key_or_pattern_characters_are_refused_and_store_nothing(
    gateway: Gateway, name: str, text: str
) -> None:
    fields = {"kind": "echo", name: text}
    before = gateway.snapshot()
    for call, prefix in [
        (lambda: gateway.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(**fields), timeout=10), ""),
        (lambda: gateway.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=[request(), request(**fields)])),
         "jobs[1]."),
        (lambda: first_event(gateway.stub.RunJob(scheduler_pb2.RunJobRequest(job=request(**fields)), timeout=10)),
         "job."),
        (lambda: list(gateway.stub.WatchResults(scheduler_pb2.WatchResultsRequest(
            **({"queue": text} if name == "queue" else {"kinds": [text]})), timeout=10)),
         "" if name == "queue" else "kinds[0]"),
    ]:  # fmt: skip
        code, details, _ = call_status(call)
        field_name = prefix if prefix.startswith("kinds") else prefix + name
        assert code == INVALID and details.startswith(field_name + ":"), details
    assert gateway.snapshot() == before


@pytest.mark.parametrize("job_id", BAD_IDS)
def test_ids_with_path_or_pattern_characters_are_refused(gateway: Gateway, job_id: str) -> None:
    before = gateway.snapshot()
    for call, name in [
        (lambda: gateway.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=10), "id"),
        (lambda: gateway.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id), timeout=10), "id"),
        (lambda: list(gateway.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[job_id]), timeout=10)),
         "job_ids[0]"),
    ]:  # fmt: skip
        code, details, _ = call_status(call)
        assert code == INVALID and details.startswith(name + ":"), details
    assert gateway.snapshot() == before


def test_names_that_look_like_other_keys_stay_inside_their_own_namespace(gateway: Gateway) -> None:
    """Valid names may spell other keys ("queues", "pending:default:echo", another namespace's tag
    without braces): they are only ever parts of this namespace's keys."""
    other = gateway.neighbour.namespace
    everything_before = set(gateway.redis.scan_iter(match="*", count=1000))
    foreign = gateway.snapshot(gateway.neighbour)
    reqs = [
        request("pending:default:echo", queue="queues"),
        request(f"{other}:job:{'0' * 32}", queue="default"),
        request("job:" + "0" * 32, queue=other),
        request("seq", queue="kinds"),
    ]
    jobs = gateway.stub.SubmitJobs(scheduler_pb2.SubmitJobsRequest(jobs=reqs), timeout=10).jobs
    for req, job in zip(reqs, jobs, strict=True):
        stored = gateway.stub.GetJob(scheduler_pb2.GetJobRequest(id=job.id), timeout=10).job
        assert (stored.spec.queue, stored.spec.kind) == (req.queue, req.kind)
    new = set(gateway.redis.scan_iter(match="*", count=1000)) - everything_before
    assert new and all(k.startswith(gateway.keys.prefix.encode()) for k in new), new
    assert gateway.snapshot(gateway.neighbour) == foreign


# --- names with a trailing newline, requests that are not protobuf ---------------------------
def test_names_and_ids_with_a_trailing_newline_are_refused(gateway: Gateway) -> None:
    before = gateway.snapshot()
    outcomes = []
    for req in (request("echo", queue="default\n"), request("echo\n")):
        outcomes.append(call_status(lambda: gateway.stub.SubmitJob(req, timeout=10))[0])  # noqa: B023
    outcomes.append(call_status(lambda: gateway.stub.GetJob(scheduler_pb2.GetJobRequest(id="0" * 32 + "\n")))[0])
    watch = scheduler_pb2.WatchResultsRequest(job_ids=["0" * 32 + "\n"])
    outcomes.append(call_status(lambda: list(gateway.stub.WatchResults(watch, timeout=10)))[0])
    after = gateway.snapshot()
    for name in set(after) - set(before):  # keep the module's namespace clean for the other tests
        gateway.redis.delete(name)
    assert outcomes == [INVALID] * 4 and after == before, outcomes


MALFORMED = {
    "SubmitJob": b"\x12\x02\xff\xfe",  # kind: bytes that are not UTF-8
    "GetJob": b"\x0a\x02\xff\xfe",  # id: not UTF-8
    "CancelJob": b"\x0a\x02\xff\xfe",
    "ListWorkers": b"\xff\xff\xff",  # not a protobuf message at all
    "RetryJob": b"\x0a\x02\xff\xfe",
    "PauseQueue": b"\x0a\x02\xff\xfe",  # queue: not UTF-8
    "ResumeQueue": b"\x0a\x02\xff\xfe",
    "GetSchedule": b"\x0a\x02\xff\xfe",  # name: not UTF-8
    "ListFailedJobs": b"\x1a\x02\xff\xfe",  # page_token: not UTF-8
    "ListJobs": b"\x1a\x02\xff\xfe",  # kind: not UTF-8
    "GetQueueStats": b"\x0a\x02\xff\xfe",  # queues[0]: not UTF-8
}


@pytest.mark.parametrize("method", sorted(MALFORMED))
def test_a_request_that_is_not_valid_protobuf_gets_invalid_argument(gateway: Gateway, method: str) -> None:
    call = gateway.channel.unary_unary(f"/jobgate.v1.SchedulerService/{method}")
    code, details, _ = call_status(lambda: call(MALFORMED[method], timeout=10))
    assert gateway.alive()
    assert code == INVALID and "DecodeError" not in details, (code, details)


# --- a rogue publisher on the relay channels --------------------------------------------------
S = job_pb2
FLOOD = 20_000
HUGE = 5 * 1024 * 1024


async def _running_lease(client: Client, redis: Redis, keys: Keys, job_id: str) -> int:
    async def running() -> bool:
        job = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=5)).job
        return job.state == S.JOB_STATE_RUNNING

    await eventually(running, what=f"job {job_id} running")
    return int(await redis.hget(keys.job(job_id), "lease"))


def _dispatch(job_id: str, lease: int, kind: str = "sleep", queue: str = "default") -> bytes:
    spec = job_pb2.JobSpec(kind=kind, queue=queue)
    spec.args.struct_value.fields["seconds"].number_value = 0
    d = relay_pb2.DispatchJob(job_id=job_id, lease=lease, attempt=1, spec=spec, timeout_ms=60_000)
    return relay_pb2.WorkerMessage(dispatch=d).SerializeToString()


def _forged_outcomes(job_id: str) -> list[bytes]:
    succeeded = job_pb2.JobEvent(job_id=job_id, queue="default", kind="sleep", state=S.JOB_STATE_SUCCEEDED)
    json_format.ParseDict({"forged": True}, succeeded.result)
    succeeded.worker_id = "mallory"
    failed = job_pb2.JobEvent(job_id=job_id, queue="default", kind="sleep", state=S.JOB_STATE_FAILED, attempt=9)
    failed.error.code, failed.error.message = "FORGED", "forged"
    cancelled = job_pb2.JobEvent(job_id=job_id, queue="default", state=S.JOB_STATE_CANCELLED)
    one_each = [relay_pb2.JobEvents(events=[e]).SerializeToString() for e in (succeeded, failed, cancelled)]
    return [*one_each, relay_pb2.JobEvents(events=[cancelled, succeeded]).SerializeToString()]


async def _collect(call: Any, into: list[job_pb2.JobEvent]) -> None:
    async for resp in call:
        into.append(resp.event)


@pytest.mark.slow
async def test_rogue_traffic_on_the_relay_channels_changes_no_outcome(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    """Forged outcomes for a running job, forged dispatches for jobs that do not exist or with a
    wrong lease, 5 MB messages and a flood of garbage: the real outcome stands and is all a watcher
    sees, only stored jobs run, and work goes on afterwards."""
    gateway, address, port = start_gateway(stack)
    worker = stack.start_worker(worker_id="target")
    client = client_for(address)
    parked = (await client.submit("echo", queue="parked")).job.id  # no worker serves "parked"
    job_id = (await client.submit("sleep", {"seconds": 3})).job.id
    lease = await _running_lease(client, redis, keys, job_id)
    watch = client.stub.WatchResults(scheduler_pb2.WatchResultsRequest(job_ids=[job_id]), timeout=60)
    seen: list[job_pb2.JobEvent] = []
    broad = asyncio.create_task(_collect(client.stub.WatchResults(scheduler_pb2.WatchResultsRequest()), seen))

    await wait_streams_open(port, 2)  # both watchers open
    forged = [*_forged_outcomes(job_id), *_forged_outcomes(parked), *_forged_outcomes("e" * 32)]
    dispatches = [
        _dispatch("d" * 32, 1),  # no such job
        _dispatch(job_id, lease + 1000),  # a lease the job never had
        _dispatch(job_id, lease - 1),
        _dispatch(parked, 1, kind="echo", queue="parked"),  # a queued job that was never placed
        _dispatch(parked, 0, kind="echo", queue="parked"),
    ]
    async with redis.pipeline(transaction=False) as pipe:
        for data in forged:
            pipe.publish(keys.results_channel(), data)
        for data in dispatches:
            pipe.publish(keys.dispatch_channel("target"), data)
        await pipe.execute()
    assert (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=5)).job.state == (
        S.JOB_STATE_RUNNING
    ), "the forgeries must reach the gateway while the job runs"
    await redis.publish(keys.results_channel(), b"\xff" * HUGE)
    await redis.publish(keys.dispatch_channel("target"), b"\x0a\xff" + b"\x00" * HUGE)
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(FLOOD):
            pipe.publish(keys.results_channel(), b"\xff" + n.to_bytes(4, "big"))
            if n % 10 == 0:
                pipe.publish(keys.dispatch_channel("target"), b"\xff" + n.to_bytes(4, "big"))
        await pipe.execute()

    [real] = [r.event async for r in watch]
    assert (real.state, value(real.result), real.worker_id, real.error.code) == (
        S.JOB_STATE_SUCCEEDED, {"slept": 3}, "target", "",
    )  # fmt: skip
    stored = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=job_id), timeout=5)).job
    assert (stored.state, value(stored.result), stored.worker_id, stored.error.code) == (
        S.JOB_STATE_SUCCEEDED, {"slept": 3}, "target", "",
    )  # fmt: skip
    still = (await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=parked), timeout=5)).job
    assert (still.state, still.attempt, still.worker_id) == (S.JOB_STATE_QUEUED, 0, "")
    assert not await redis.exists(keys.job("d" * 32), keys.job("e" * 32))

    after = (await client.submit("echo", {"after": "flood"})).job.id
    assert (await client.wait_results([after]))[after].state == S.JOB_STATE_SUCCEEDED
    await eventually(lambda: after in {e.job_id for e in seen}, what="broad watcher")
    broad.cancel()
    assert {e.job_id for e in seen} == {job_id, after}, seen
    assert all(e.state == S.JOB_STATE_SUCCEEDED and e.error.code == "" and e.worker_id == "target" for e in seen)
    assert [value(e.result) for e in seen if e.job_id == job_id] in ([{"slept": 3}], [{"slept": 3}] * 2)

    started = set(re.findall(r"job_id=([0-9a-f]{32}) kind=\S+ attempt=\d+ started", worker.log()))
    assert started == {job_id, after}

    def dropped() -> float:
        return scrape(port)[("jobgate_gateway_channel_messages_dropped_total", ())]

    await eventually(lambda: asyncio.to_thread(lambda: dropped() >= FLOOD + 1), what="garbage counted as dropped")
    assert gateway.alive() and worker.alive()


@pytest.mark.slow
async def test_a_forged_dispatch_does_not_stop_a_running_job_from_being_cancelled(
    stack: Stack, client_for: Callable[[str], Client], redis: Redis, keys: Keys
) -> None:
    _, address = stack.start_gateway()
    worker = stack.start_worker(worker_id="target")
    client = client_for(address)
    job_id = (await client.submit("sleep", {"seconds": 6})).job.id
    lease = await _running_lease(client, redis, keys, job_id)
    await redis.publish(keys.dispatch_channel("target"), _dispatch(job_id, lease + 1000))
    await eventually(lambda: logged(worker, "dispatch refused (stale)"), what="refused")
    await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=job_id), timeout=5)
    event = (await client.wait_results([job_id]))[job_id]
    assert (event.state, event.error.code) == (S.JOB_STATE_CANCELLED, "CANCELLED")
