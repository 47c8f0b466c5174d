"""The blocking client: :class:`SyncClient`, the asyncio :class:`Client` run on a private event loop
in a background thread, for code that is not async."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from jobgate.v1 import scheduler_pb2

from .aio import Client
from .models import Batch, Event, Job, JobState, Limits, Page, QueueStats, Schedule, Worker

T = TypeVar("T")


class SyncClient:
    """The methods of :class:`Client`, blocking; ``run`` and ``watch`` return plain iterators. Takes
    the same arguments. Close it (or use ``with``) to stop its thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jobgate-client", daemon=True)
        self._thread.start()

        async def make() -> Client:
            return Client(*args, **kwargs)

        self.aio = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, kind: str, args: Any = None, **options: Any) -> Job:
        return self._run(self.aio.submit(kind, args, **options))

    def submit_many(self, requests: Iterable[scheduler_pb2.SubmitJobRequest]) -> list[Job]:
        return self._run(self.aio.submit_many(requests))

    def get(self, job_id: str) -> Job:
        return self._run(self.aio.get(job_id))

    def cancel(self, job_id: str) -> Job:
        return self._run(self.aio.cancel(job_id))

    def retry_job(self, job_id: str) -> Job:
        return self._run(self.aio.retry_job(job_id))

    def run(self, kind: str, args: Any = None, **options: Any) -> Iterator[Event]:
        return self._iterate(self.aio.run(kind, args, **options))

    def watch(self, job_ids: Iterable[str] = (), **filters: Any) -> Iterator[Event]:
        return self._iterate(self.aio.watch(job_ids, **filters))

    def wait(self, job_ids: Iterable[str]) -> dict[str, Event]:
        return self._run(self.aio.wait(job_ids))

    def list_jobs(self, queue: str = "default", **options: Any) -> Page:
        return self._run(self.aio.list_jobs(queue, **options))

    def iter_jobs(self, queue: str = "default", *, states: Iterable[JobState] = (), **options: Any) -> Iterator[Job]:
        return self._iterate(self.aio.iter_jobs(queue, states=states, **options))

    def failed_jobs(self, queue: str = "default", **options: Any) -> Page:
        return self._run(self.aio.failed_jobs(queue, **options))

    def queue_stats(self, queues: Iterable[str] = ()) -> list[QueueStats]:
        return self._run(self.aio.queue_stats(queues))

    def workers(self) -> list[Worker]:
        return self._run(self.aio.workers())

    def pause(self, queue: str = "default") -> bool:
        return self._run(self.aio.pause(queue))

    def resume(self, queue: str = "default") -> bool:
        return self._run(self.aio.resume(queue))

    def set_limits(self, queue: str, limits: Limits) -> Limits:
        return self._run(self.aio.set_limits(queue, limits))

    def get_batch(self, batch_id: str) -> Batch:
        return self._run(self.aio.get_batch(batch_id))

    def create_schedule(self, spec: scheduler_pb2.ScheduleSpec) -> Schedule:
        return self._run(self.aio.create_schedule(spec))

    def get_schedule(self, name: str) -> Schedule:
        return self._run(self.aio.get_schedule(name))

    def schedules(self) -> list[Schedule]:
        return self._run(self.aio.schedules())

    def pause_schedule(self, name: str) -> Schedule:
        return self._run(self.aio.pause_schedule(name))

    def resume_schedule(self, name: str) -> Schedule:
        return self._run(self.aio.resume_schedule(name))

    def trigger_schedule(self, name: str, request_id: str = "") -> Job:
        return self._run(self.aio.trigger_schedule(name, request_id))

    def delete_schedule(self, name: str) -> None:
        self._run(self.aio.delete_schedule(name))
