"""Gateway settings: defaults, then ``JOBGATE_*`` environment variables, then command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.settings import check_listen, from_env_vars, read_file, settings_repr, with_flags


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Every gateway setting, with its default. Environment: ``JOBGATE_<FIELD NAME IN CAPITALS>``."""

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    listen: str = "127.0.0.1:50051"
    namespace: str = "jobgate"
    max_payload_bytes: int = 1024 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    max_batch: int = 1000
    max_watch_ids: int = 1000
    stream_buffer: int = 10_000
    max_streams: int = 10_000
    max_queues: int = 1000
    max_kinds: int = 1000
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    min_ping_interval_ms: int = 10_000
    max_ping_strikes: int = 2
    default_timeout_ms: int = 300_000
    ack_timeout_ms: int = 5_000
    tick_ms: int = 500
    reconcile_ms: int = 5_000
    retention_s: int = 86_400
    idempotency_ttl_s: int = 86_400
    redis_timeout_s: float = 5.0
    grace_s: float = 10.0
    metrics_listen: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    auth_tokens: str = field(default="", repr=False)
    auth_tokens_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""

    def __repr__(self) -> str:
        return settings_repr(self)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_tokens or self.auth_tokens_file)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """Defaults overridden by ``JOBGATE_*`` variables. Raises ValueError naming a bad variable."""
        return from_env_vars(cls, os.environ if env is None else env)

    def with_args(self, argv: Sequence[str] | None) -> GatewaySettings:
        """These settings overridden by command-line flags (``--listen``, ``--redis-url``, ...)."""
        return with_flags(self, argv, "python -m gateway", "Run the jobgate gRPC gateway.")

    def validate(self) -> GatewaySettings:
        """Raises ValueError for settings that cannot work."""
        for name in (
            "retention_s",
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
            "reconcile_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_ping_strikes < 0:
            raise ValueError("max_ping_strikes must not be negative (0 = no limit)")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        check_listen("listen", self.listen)
        check_listen("metrics_listen", self.metrics_listen, optional=True)
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
