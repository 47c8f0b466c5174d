"""Batches: the options of a SubmitJobs call that opens one, and the callbacks of ended batches.

The scripts count how each job of a batch ends (lua/_common.lua, count_in_batch) and list a batch
whose last job has ended in ``batches:done``. Every gateway submits those batches' callbacks on its
placement tick with the idempotency key ``batch:<batch id>``, so a callback is submitted exactly
once however many gateways race on it, then records it on the batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from jobgate.v1 import scheduler_pb2
from protocol.errors import InvalidArgument, JobgateError, Unavailable
from protocol.gateway_calls import GatewayCalls, PreparedJob
from protocol.keys import Keys

from .scheduler import Scheduler
from .validation import Limits, check_later_job, prepare

log = logging.getLogger(__name__)


def prepare_batch_options(
    options: scheduler_pb2.BatchOptions, jobs: Sequence[PreparedJob], limits: Limits, keys: Keys
) -> tuple[str, bytes]:
    """Checks a SubmitJobs call's batch options; returns the new batch's id (naming its jobs'
    shard) and its callback's bytes (b'' without one). Raises InvalidArgument."""
    if len({keys.queue_shard(j.spec.queue) for j in jobs}) > 1:
        raise InvalidArgument("batch: the jobs of a batch must go to queues of one shard (see redis_shards)")
    callback = b""
    if options.HasField("callback"):
        check_later_job(
            options.callback, limits, "batch.callback.", "a callback runs when its batch ends", "batch:<id>"
        )
        callback = options.callback.SerializeToString(deterministic=True)
    return keys.job_id_for(os.urandom(16).hex(), jobs[0].spec.queue), callback


class BatchCallbacks:
    """Submits the callback of every batch whose jobs have all ended; one per gateway."""

    def __init__(self, store: GatewayCalls, limits: Limits, scheduler: Scheduler) -> None:
        self.store = store
        self.limits = limits
        self.scheduler = scheduler

    async def submit_ended(self) -> int:
        """Submits the callbacks waiting; returns how many this gateway submitted or found submitted."""
        done = 0
        for batch_id, callback in await self.store.ended_batches():
            req = scheduler_pb2.SubmitJobRequest.FromString(callback)
            req.idempotency_key = f"batch:{batch_id}"
            try:
                jobs, placed = await self.store.submit([prepare(req, self.limits, "batch.callback.")])
            except Unavailable:
                raise
            except JobgateError as exc:  # its queue over max_queues, say: tried again next tick
                log.warning("batch %s: its callback was refused: %s", batch_id, exc.message)
                continue
            self.scheduler.record(placed)
            await self.store.batch_callback_submitted(batch_id, jobs[0].id)
            done += 1
        return done
