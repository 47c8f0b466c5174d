"""What a gateway counts, in Prometheus metrics served on ``metrics_listen`` when it is set.

Each gateway builds one :class:`GatewayMetrics` with a registry of its own and passes it to the
parts that count; nothing is registered at import time. Queue names are
labels: they are validated names chosen by operators, not free-form client input.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from common.metrics import process_metrics


class GatewayMetrics:
    """What a gateway counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        process_metrics(r, "jobgate_gateway")
        self.rpcs = Counter(
            "jobgate_gateway_rpcs", "RPCs handled, by method and status code", ["method", "code"], registry=r
        )
        self.submitted = Counter(
            "jobgate_gateway_jobs_submitted",
            "Jobs accepted by SubmitJob, SubmitJobs and RunJob (idempotent repeats included)",
            registry=r,
        )
        self.placed = Counter("jobgate_gateway_jobs_placed", "Jobs placed on a worker and published to it", registry=r)
        self.dispatch_lost = Counter(
            "jobgate_gateway_dispatches_lost",
            "Dispatches that reached no subscriber (PUBLISH returned 0) and were taken back",
            registry=r,
        )
        self.settled = Counter(
            "jobgate_gateway_jobs_settled",
            "Jobs of lost workers or unacknowledged dispatches, by the state they were moved to",
            ["state"],
            registry=r,
        )
        self.messages = Counter(
            "jobgate_gateway_channel_messages", "Messages received on the result channels", registry=r
        )
        self.dropped = Counter(
            "jobgate_gateway_channel_messages_dropped", "Malformed or unverifiable channel messages dropped", registry=r
        )
        self.schedule_ticks = Counter(
            "jobgate_gateway_schedule_ticks",
            "Schedule ticks this gateway recorded, by outcome: submitted, missed or overlap (skipped by policy),"
            " failed (the job was refused)",
            ["outcome"],
            registry=r,
        )
        self.denied = Counter(
            "jobgate_gateway_requests_denied",
            "Calls refused for a missing or unknown token (UNAUTHENTICATED) or a queue the token does not cover",
            ["code"],
            registry=r,
        )
        self.streams = Gauge("jobgate_gateway_streams_open", "Open RunJob and WatchResults streams", registry=r)
        self.redis_up = Gauge("jobgate_gateway_redis_up", "1 while Redis answers PING", registry=r)
        self.waiting = Gauge("jobgate_queue_jobs_waiting", "Jobs waiting in each queue", ["queue"], registry=r)
        self.workers = Gauge("jobgate_workers_live", "Workers whose heartbeat has not expired", registry=r)
