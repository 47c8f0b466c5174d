"""Gateway settings: defaults, then ``JOBGATE_*`` environment variables, then command-line flags."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from common import tracing
from common.settings import (
    check_listen,
    check_redis_wait,
    from_env_vars,
    read_file,
    setting,
    settings_repr,
    with_flags,
)
from protocol.keys import Keys

from .validation import Limits, parse_queue_settings

MAX_PROCESSES = 64


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Every gateway setting, with its default and meaning (``--help`` shows both).
    Environment: ``JOBGATE_<FIELD NAME IN CAPITALS>``."""

    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis to use: redis://, rediss:// (TLS), unix://; a primary found through Sentinel,"
        " redis+sentinel://host:port[,host:port...]/<service>[/<db>]; or a Redis Cluster,"
        " redis+cluster://host:port[,host:port...] (rediss+... with TLS); a password in it is never logged",
        repr=False,
    )
    redis_shards: int = setting(
        1,
        "groups the namespace's queues are spread over (1-1024), each under a hash tag of its own: on a Redis"
        " Cluster, different queues then live on different nodes; fixed for the life of a namespace, and the"
        " same in every gateway and worker",
    )
    listen: str = setting("127.0.0.1:50051", "gRPC listen address, host:port (the Docker image sets 0.0.0.0:50051)")
    processes: int = setting(
        1,
        "gateway processes serving listen together (1-64; Linux, SO_REUSEPORT): forked before any server"
        " starts, each on a core of its own; process i serves metrics on metrics_listen's port + i",
    )
    namespace: str = setting(
        "jobgate", "key prefix, 1-32 characters from [A-Za-z0-9_.-]; gateways and workers must share it"
    )
    max_payload_bytes: int = setting(1024 * 1024, "most bytes of args + payload per job")
    max_message_bytes: int = setting(4 * 1024 * 1024, "largest gRPC message received or sent")
    max_batch: int = setting(1000, "most jobs per SubmitJobs")
    max_watch_ids: int = setting(1000, "most job_ids per WatchResults")
    stream_buffer: int = setting(
        10_000,
        "events buffered per stream before it is cut off (completions arrive in bursts: a worker records"
        " the outcomes that end together in one call)",
    )
    max_streams: int = setting(
        10_000, "open RunJob and WatchResults streams this gateway serves at once; more get RESOURCE_EXHAUSTED"
    )
    max_queues: int = setting(
        1000,
        "most queues holding waiting jobs in the namespace; a job for another queue gets RESOURCE_EXHAUSTED"
        " (placement visits each such queue on every pass)",
    )
    max_kinds: int = setting(
        1000, "most kinds with waiting jobs in one queue; a job of another kind gets RESOURCE_EXHAUSTED"
    )
    keepalive_time_ms: int = setting(
        60_000,
        "the gateway pings a connection idle this long, so idle streams stay open through proxies and dead"
        " clients are noticed",
    )
    keepalive_timeout_ms: int = setting(20_000, "a connection whose ping is not answered within this is closed")
    min_ping_interval_ms: int = setting(
        10_000,
        "shortest interval at which a client may ping while no data flows; clients should set their"
        " keepalive time to at least this",
    )
    max_ping_strikes: int = setting(
        2,
        "pings faster than min_ping_interval_ms tolerated before the connection is closed"
        ' (GOAWAY "too many pings"); 0 = no limit',
    )
    default_timeout_ms: int = setting(300_000, "per-attempt time limit of jobs that set none")
    default_max_attempts: int = setting(3, "starts allowed to jobs that set no max_attempts (1-100)")
    retry_initial_backoff_ms: int = setting(
        1_000, "wait before a failed job's second attempt, for jobs whose retry policy sets none"
    )
    retry_max_backoff_ms: int = setting(300_000, "longest wait between attempts, for jobs whose retry policy sets none")
    retry_multiplier: float = setting(2.0, "growth of the wait from one attempt to the next (1-100), likewise")
    ack_timeout_ms: int = setting(5_000, "time a worker has to acknowledge a dispatch before the job is placed again")
    tick_ms: int = setting(500, "interval of the placement pass over every queue and of reaping lost workers")
    reconcile_ms: int = setting(
        5_000,
        "a stream following job_ids re-reads their stored state after this long without an event, then after"
        " twice as long, and so on up to 8 times this (an event starts over); each wait is jittered, the first"
        " between half and one and a half times this",
    )
    retention_s: int = setting(
        86_400,
        "how long a job is kept once it is finished, seconds (positive); stored with each job when it is"
        " submitted (the submitting gateway's value), so it applies whoever finishes the job, worker or gateway",
    )
    dead_retention_s: int = setting(
        604_800,
        "how long a FAILED job (a dead letter: listed by ListFailedJobs, put back by RetryJob) is kept, seconds"
        " (positive); stored with each job like retention_s",
    )
    queue_settings: str = setting(
        "",
        "per-queue defaults, entries separated by ';', each a queue name and name=value pairs among max_attempts,"
        " default_timeout_ms, retry_initial_backoff_ms, retry_max_backoff_ms, retry_multiplier, retention_s and"
        " dead_retention_s (the settings of those names, for that queue), e.g. 'emails max_attempts=10"
        " retry_initial_backoff_ms=5000; reports retention_s=600'",
    )
    idempotency_ttl_s: int = setting(
        86_400,
        "how long an idempotency key is remembered, seconds; the gateway refuses to start when it exceeds"
        " retention_s (a key would outlive its job)",
    )
    redis_timeout_s: float = setting(5.0, "Redis connect and read timeout, seconds")
    redis_wait_replicas: int = setting(
        0,
        "replicas that must confirm a submit or a cancel (Redis WAIT) before it is acknowledged; 0 = the"
        " primary alone (a failover can then lose the last acknowledged writes)",
    )
    redis_wait_timeout_ms: int = setting(
        1000,
        "how long to wait for those replicas; a write they do not confirm in time is answered UNAVAILABLE"
        " (it stands on the primary: retry with the same idempotency key)",
    )
    grace_s: float = setting(
        10.0, "time unary calls in progress get on shutdown, seconds (streams end at once with UNAVAILABLE)"
    )
    metrics_listen: str = setting("", "host:port serving Prometheus metrics at /metrics; empty turns them off")
    dashboard_listen: str = setting(
        "",
        "host:port serving the web dashboard (HTTPS with the TLS settings; the same tokens as gRPC calls);"
        " empty turns it off",
    )
    dashboard_read_only: bool = setting(
        False, "the dashboard shows everything but changes nothing (no cancel, retry, pause, resume, run now)"
    )
    log_level: str = setting("INFO", "log level")
    log_format: str = setting("text", "text or json (one object per line)")
    tracing: bool = setting(
        False,
        "OpenTelemetry spans for submits, carried in each job to its worker (needs jobgate[otel]; exported"
        " with OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    auth_tokens: str = setting(
        "",
        "bearer tokens, entries 'name token [queues]' separated by ';'; never logged",
        repr=False,
    )
    auth_tokens_file: str = setting(
        "",
        "file of token entries, one per line, # comments; with either token setting, every call needs a token",
    )
    tls_cert_file: str = setting("", "PEM certificate chain (leaf first); with tls_key_file, the port serves TLS only")
    tls_key_file: str = setting("", "PEM private key of that certificate")
    tls_client_ca_file: str = setting(
        "",
        "PEM CA certificates; when set, clients must present a certificate they signed (mutual TLS)",
    )

    def __repr__(self) -> str:
        return settings_repr(self)

    def _check_processes(self) -> None:
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise ValueError(f"processes must be from 1 to {MAX_PROCESSES}")
        if self.processes > 1:
            if not hasattr(os, "fork") or not hasattr(socket, "SO_REUSEPORT"):
                raise ValueError("processes above 1 need fork and SO_REUSEPORT (Linux)")
            if self.metrics_listen and int(self.metrics_listen.rpartition(":")[2]) + self.processes > 65536:
                raise ValueError("processes: metrics_listen's port + processes - 1 must be a port (at most 65535)")

    def for_process(self, index: int) -> GatewaySettings:
        """The settings of process ``index`` (from 0) of ``processes``: its own metrics port."""
        if not self.metrics_listen or not index:
            return self
        host, _, port = self.metrics_listen.rpartition(":")
        return replace(self, metrics_listen=f"{host}:{int(port) + index}")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_tokens or self.auth_tokens_file)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)

    def limits(self) -> Limits:
        """The request limits and job defaults these settings give. Raises ValueError for a bad
        ``queue_settings``."""
        limits = Limits(
            max_payload_bytes=self.max_payload_bytes,
            default_timeout_ms=self.default_timeout_ms,
            max_batch=self.max_batch,
            max_watch_ids=self.max_watch_ids,
            retry_initial_backoff_ms=self.retry_initial_backoff_ms,
            retry_max_backoff_ms=self.retry_max_backoff_ms,
            retry_multiplier=self.retry_multiplier,
            max_attempts=self.default_max_attempts,
            retention_s=self.retention_s,
            dead_retention_s=self.dead_retention_s,
        )
        base = limits.defaults()
        return replace(limits, queues=parse_queue_settings(self.queue_settings, base), base=base)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Defaults overridden by ``JOBGATE_*`` variables. Raises ValueError naming a bad variable."""
        return from_env_vars(cls, os.environ if env is None else env)

    def with_args(self, argv: Sequence[str] | None) -> GatewaySettings:
        """These settings overridden by command-line flags (``--listen``, ``--redis-url``, ...)."""
        return with_flags(self, argv, "python -m gateway", "Run the jobgate gRPC gateway.")

    def validate(self) -> GatewaySettings:
        """Raises ValueError for settings that cannot work."""
        Keys(self.namespace, self.redis_shards)  # raises ValueError naming what is wrong
        for name in (
            "retention_s",
            "dead_retention_s",
            "idempotency_ttl_s",
            "max_payload_bytes",
            "max_message_bytes",
            "max_batch",
            "max_watch_ids",
            "stream_buffer",
            "max_streams",
            "max_queues",
            "max_kinds",
            "keepalive_time_ms",
            "keepalive_timeout_ms",
            "min_ping_interval_ms",
            "default_timeout_ms",
            "ack_timeout_ms",
            "tick_ms",
            "retry_initial_backoff_ms",
            "retry_max_backoff_ms",
            "reconcile_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        check_redis_wait(self.redis_wait_replicas, self.redis_wait_timeout_ms)
        self.limits().defaults().check()
        for queue, defaults in self.limits().queues.items():
            if self.idempotency_ttl_s > defaults.retention_s:
                raise ValueError(
                    f"queue_settings[{queue}]: retention_s must not be below idempotency_ttl_s (a key would outlive"
                    " its job)"
                )
        if self.max_ping_strikes < 0:
            raise ValueError("max_ping_strikes must not be negative (0 = no limit)")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if self.tracing and not tracing.available():
            raise ValueError("tracing needs OpenTelemetry: pip install 'jobgate[otel]'")
        check_listen("listen", self.listen)
        check_listen("metrics_listen", self.metrics_listen, optional=True)
        check_listen("dashboard_listen", self.dashboard_listen, optional=True)
        self._check_processes()
        if self.idempotency_ttl_s > self.retention_s:
            raise ValueError("idempotency_ttl_s must not exceed retention_s (a key would outlive its job)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            read_file(name, getattr(self, name))
        from .auth import load_tokens  # imported here: config must not depend on grpc at import time

        load_tokens(self.auth_tokens, self.auth_tokens_file)
        return self
