"""What a worker counts, in Prometheus metrics served on ``metrics_listen`` when it is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import process_metrics


class WorkerMetrics:
    """What a worker counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        process_metrics(r, "jobgate_worker")
        self.jobs = Counter(
            "jobgate_worker_jobs", "Jobs finished here, by kind and recorded state", ["kind", "state"], registry=r
        )
        self.duration = Histogram(
            "jobgate_worker_job_duration_seconds", "Handler run time, by kind", ["kind"], registry=r
        )
        self.running = Gauge("jobgate_worker_jobs_running", "Jobs running now", registry=r)
        self.superseded = Counter(
            "jobgate_worker_outcomes_discarded", "Outcomes refused because the attempt had been superseded", registry=r
        )
        self.redis_errors = Counter(
            "jobgate_worker_redis_errors", "Redis calls that failed and were retried", registry=r
        )
        self.placed = Counter(
            "jobgate_worker_jobs_placed",
            "Waiting jobs placed on this worker by its own finish calls, in the slots they freed",
            registry=r,
        )
