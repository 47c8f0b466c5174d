"""What both sides of the Redis protocol call: the registered scripts, reading the fields a
JobEvent is built from, and publishing the stored state of jobs a script changed."""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from .codec import Fields, event_from_hash, events_message
from .errors import redis_errors
from .keys import Keys
from .replies import Settled
from .scripts import Scripts

# What event_from_hash reads of a job hash.
EVENT_FIELDS = (
    b"state", b"queue", b"kind", b"attempt", b"worker", b"output", b"result", b"err_code", b"err_msg", b"updated",
    b"created",
)  # fmt: skip


class Calls:
    """The scripts registered on one client, for one namespace."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts.register(redis)

    async def get_fields(self, job_ids: Sequence[str]) -> list[Fields]:
        """The stored fields a JobEvent is built from, for many jobs in one round trip (empty dicts
        for missing ones). Not the spec: a completion needs none of its payload."""
        if not job_ids:
            return []
        async with redis_errors():
            rows = await self.scripts.read_events(keys=[self.keys.job(j) for j in job_ids], args=EVENT_FIELDS)
        return [{k: v for k, v in zip(EVENT_FIELDS, row, strict=True) if v is not None} for row in rows]

    async def publish_settled(self, settled: Sequence[Settled]) -> None:
        """Publishes the stored state of jobs a script just changed (for RunJob and watchers)."""
        if not settled:
            return
        ids = [s.job_id for s in settled]
        fields = await self.get_fields(ids)
        events = [event_from_hash(job_id, f) for job_id, f in zip(ids, fields, strict=True) if f]
        if events:
            async with redis_errors():
                await self.redis.publish(self.keys.results_channel(), events_message(events))
