"""Progress reports: handlers report as often as they like; Redis hears the latest report of each
job at most once per ``progress_interval_ms``, all the worker's reports in one call (per shard)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from jobgate.v1 import job_pb2, relay_pb2
from protocol.codec import events_message
from protocol.connection import now_ms
from protocol.worker_calls import Report, WorkerCalls

log = logging.getLogger(__name__)

MAX_MESSAGE = 256  # characters of a progress message kept
LOG_EVERY_S = 30.0  # how often failing progress writes are logged


def check_progress(fraction: float, message: str) -> tuple[float, str]:
    """The report as recorded: ``fraction`` a number from 0 to 1, ``message`` cut to 256
    characters. Raises ValueError or TypeError for anything else."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"progress fraction must be a number from 0 to 1, got {type(fraction).__name__}")
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError(f"progress fraction must be from 0 to 1, got {fraction!r}")
    if not isinstance(message, str):
        raise TypeError(f"progress message must be a str, got {type(message).__name__}")
    return float(fraction), message[:MAX_MESSAGE]


class ProgressReporter:
    """Keeps the latest report of each running job and sends what changed every ``interval_s``."""

    def __init__(self, calls: WorkerCalls, worker_id: str, interval_s: float, call_s: float) -> None:
        self.calls = calls
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.call_s = call_s  # the longest one write may take
        self._lock = threading.Lock()  # handlers in threads report too
        self._latest: dict[tuple[str, int], tuple[relay_pb2.DispatchJob, float, str, int]] = {}
        self._failed_at = -LOG_EVERY_S

    def report(self, d: relay_pb2.DispatchJob, fraction: float, message: str = "") -> None:
        """Records a report of the placement ``d`` (from any thread); sent with the next write."""
        fraction, message = check_progress(fraction, message)
        with self._lock:
            self._latest[d.job_id, d.lease] = (d, fraction, message, now_ms())

    def forget(self, job_id: str, lease: int) -> None:
        """Drops a report not sent yet (the attempt ended: its outcome says more)."""
        with self._lock:
            self._latest.pop((job_id, lease), None)

    async def run(self) -> None:
        """Sends the reports that came in every ``interval_s``, until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> int:
        """Sends the reports that came in since the last write; returns how many were recorded.
        Progress is best effort: a write Redis refuses is dropped (the next report goes again)."""
        with self._lock:
            latest, self._latest = self._latest, {}
        if not latest:
            return 0
        reports = [self._report(*entry) for entry in latest.values()]
        try:
            async with asyncio.timeout(self.call_s):
                return await self.calls.progress(self.worker_id, reports)
        except Exception as exc:  # noqa: BLE001 - never stops the loop
            if time.monotonic() - self._failed_at >= LOG_EVERY_S:
                self._failed_at = time.monotonic()
                log.warning("progress of %d job(s) not recorded (%s: %s)", len(reports), type(exc).__name__, exc)
            return 0

    def _report(self, d: relay_pb2.DispatchJob, fraction: float, message: str, at: int) -> Report:
        progress = job_pb2.Progress(fraction=fraction, message=message)
        progress.time.FromMilliseconds(at)
        event = job_pb2.JobEvent(
            job_id=d.job_id,
            queue=d.spec.queue,
            kind=d.spec.kind,
            state=job_pb2.JOB_STATE_RUNNING,
            attempt=d.attempt,
            worker_id=self.worker_id,
            progress=progress,
        )
        event.time.FromMilliseconds(now_ms())
        return Report(d.job_id, d.lease, progress.SerializeToString(), events_message([event]))
