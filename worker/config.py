"""Worker settings: defaults, then ``JOBGATE_*`` environment variables, then command-line flags."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.settings import check_listen, from_env_vars, settings_repr, with_flags
from protocol.keys import QUEUE_RE, WORKER_ID_RE


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "worker"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Every worker setting, with its default. Environment: ``JOBGATE_<FIELD NAME IN CAPITALS>``."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    namespace: str = "jobgate"
    app: str = ""
    worker_id: str = ""
    queues: str = "default"
    concurrency: int = 8
    heartbeat_ms: int = 1_000
    heartbeat_ttl_ms: int = 5_000
    grace_s: float = 30.0
    redis_timeout_s: float = 5.0
    health_file: str = ""
    metrics_listen: str = ""
    log_level: str = "INFO"
    log_format: str = "text"

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
    def queue_list(self) -> list[str]:
        return [q.strip() for q in self.queues.split(",") if q.strip()]

    def validate(self) -> WorkerSettings:
        """Raises ValueError for settings that cannot work."""
        if not self.queue_list or not all(QUEUE_RE.fullmatch(q) for q in self.queue_list):
            raise ValueError("queues must be a comma-separated list of names from [A-Za-z0-9_.-]")
        if self.worker_id and not WORKER_ID_RE.fullmatch(self.worker_id):
            raise ValueError("worker_id must be 1-128 characters from [A-Za-z0-9_.-]")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.heartbeat_ms < 50 or self.heartbeat_ttl_ms < 2 * self.heartbeat_ms:
            raise ValueError("heartbeat_ttl_ms must be at least twice heartbeat_ms (>= 50)")
        check_listen("metrics_listen", self.metrics_listen, optional=True)
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        return self
