"""Worker settings: defaults, then ``JOBGATE_*`` environment variables, then command-line flags."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import tracing
from common.settings import (
    check_listen,
    check_redis_wait,
    from_env_vars,
    setting,
    settings_repr,
    with_flags,
)
from protocol.keys import LABEL_NAME_RE, LABEL_VALUE_RE, QUEUE_RE, WORKER_ID_RE, Keys

MAX_WORKER_LABELS = 32


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "worker"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Every worker setting, with its default and meaning (``--help`` shows both).
    Environment: ``JOBGATE_<FIELD NAME IN CAPITALS>``."""

    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis to use: redis://, rediss:// (TLS), unix://; a primary found through Sentinel,"
        " redis+sentinel://host:port[,host:port...]/<service>[/<db>]; or a Redis Cluster,"
        " redis+cluster://host:port[,host:port...] (rediss+... with TLS); a password in it is never logged",
        repr=False,
    )
    namespace: str = setting("jobgate", "key prefix; must match the gateway's")
    redis_shards: int = setting(1, "groups the namespace's queues are spread over; must match the gateway's")
    app: str = setting("", "module:attr naming the worker.Worker instance to run; empty runs the built-in handlers")
    worker_id: str = setting("", "1-128 characters from [A-Za-z0-9_.-]; empty means <host>-<pid>-<6 hex digits>")
    queues: str = setting("default", "comma-separated queues to take jobs from")
    labels: str = setting(
        "",
        "labels jobs may require, comma-separated name=value pairs (e.g. gpu=true,region=eu; at most 32, names"
        " 1-63 and values 0-63 characters from [A-Za-z0-9_.-])",
    )
    concurrency: int = setting(
        8,
        "slots: jobs run at once (and threads for plain-function handlers); a slot whose plain-function"
        " handler outlived its job stays taken until the thread returns",
    )
    heartbeat_ms: int = setting(1_000, "heartbeat interval (at least 50)")
    heartbeat_ttl_ms: int = setting(
        5_000,
        "registration lifetime without a heartbeat (at least 2 x heartbeat_ms); then the worker counts as lost",
    )
    progress_interval_ms: int = setting(
        500,
        "progress writes: the latest report of each running job goes to Redis at most this often (at least 50),"
        " all of them in one call",
    )
    grace_s: float = setting(30.0, "time running jobs get to finish on shutdown before they are handed back, seconds")
    redis_timeout_s: float = setting(5.0, "Redis connect and read timeout, seconds")
    redis_wait_replicas: int = setting(
        0,
        "replicas that must confirm an outcome or a heartbeat (Redis WAIT) before the worker takes it as"
        " recorded; 0 = the primary alone (a failover can then lose the last recorded outcomes)",
    )
    redis_wait_timeout_ms: int = setting(
        1000, "how long to wait for those replicas; an outcome they do not confirm in time is recorded again"
    )
    health_file: str = setting("", "file touched after every successful heartbeat, for python -m worker.healthcheck")
    metrics_listen: str = setting("", "host:port serving Prometheus metrics at /metrics; empty turns them off")
    log_level: str = setting("INFO", "log level")
    log_format: str = setting("text", "text or json")
    tracing: bool = setting(
        False,
        "OpenTelemetry spans for each attempt, continuing the trace its gateway stored in the job (needs"
        " jobgate[otel]; exported with OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT)",
    )

    def __repr__(self) -> str:
        return settings_repr(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Defaults overridden by ``JOBGATE_*`` variables. Raises ValueError naming a bad variable."""
        settings: WorkerSettings = from_env_vars(cls, os.environ if env is None else env)
        return settings

    def with_args(self, argv: Sequence[str] | None) -> WorkerSettings:
        """These settings overridden by flags (``--app``, ``--concurrency``, ``--queues``, ...)."""
        settings: WorkerSettings = with_flags(self, argv, "python -m worker", "Run a jobgate worker.")
        return settings

    @property
    def label_map(self) -> dict[str, str]:
        """The labels as a mapping (the setting must have been validated)."""
        return dict(pair.strip().split("=", 1) for pair in self.labels.split(",") if pair.strip())

    @property
    def queue_list(self) -> list[str]:
        return [q.strip() for q in self.queues.split(",") if q.strip()]

    def validate(self) -> WorkerSettings:
        """Raises ValueError for settings that cannot work."""
        if not self.queue_list or not all(QUEUE_RE.fullmatch(q) for q in self.queue_list):
            raise ValueError("queues must be a comma-separated list of names from [A-Za-z0-9_.-]")
        pairs = [p.strip() for p in self.labels.split(",") if p.strip()]
        for pair in pairs:
            name, eq, value = pair.partition("=")
            if not eq or not LABEL_NAME_RE.fullmatch(name) or not LABEL_VALUE_RE.fullmatch(value):
                raise ValueError(f"labels: {pair!r} is not name=value (names 1-63, values 0-63 of [A-Za-z0-9_.-])")
        if len(pairs) > MAX_WORKER_LABELS or len({p.split("=", 1)[0] for p in pairs}) != len(pairs):
            raise ValueError(f"labels: at most {MAX_WORKER_LABELS}, each name once")
        if self.worker_id and not WORKER_ID_RE.fullmatch(self.worker_id):
            raise ValueError("worker_id must be 1-128 characters from [A-Za-z0-9_.-]")
        check_redis_wait(self.redis_wait_replicas, self.redis_wait_timeout_ms)
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        keys = Keys(self.namespace, self.redis_shards)  # raises ValueError naming what is wrong
        spanned = len({keys.queue_shard(q) for q in self.queue_list})
        if self.concurrency < spanned:  # each shard's registration is granted a share of the slots
            raise ValueError(
                f"concurrency must be at least {spanned}: the queues fall in {spanned} of the {self.redis_shards}"
                " shards (redis_shards), and each takes at least one slot"
            )
        if self.heartbeat_ms < 50 or self.heartbeat_ttl_ms < 2 * self.heartbeat_ms:
            raise ValueError("heartbeat_ttl_ms must be at least twice heartbeat_ms (>= 50)")
        if self.progress_interval_ms < 50:
            raise ValueError("progress_interval_ms must be at least 50")
        check_listen("metrics_listen", self.metrics_listen, optional=True)
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if self.tracing and not tracing.available():
            raise ValueError("tracing needs OpenTelemetry: pip install 'jobgate[otel]'")
        return self
