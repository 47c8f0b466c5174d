"""Periodic schedules in Redis: their stored state and its changes (the periodic script), on shard 0.

Tick times are computed by the gateway (gateway/schedules.py); what is stored here is the
schedule's spec, whether it is paused, its next tick, and its last runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from .calls import Calls
from .errors import redis_errors
from .replies import text


@dataclass(frozen=True, slots=True)
class StoredSchedule:
    """A schedule's hash and runs."""

    spec: bytes  # jobgate.v1.ScheduleSpec
    paused: bool
    next_ms: int
    created_ms: int
    last_job: str  # the job of its last run that submitted one; '' before
    runs: list[bytes]  # jobgate.v1.ScheduleRun, newest first


class ScheduleCalls(Calls):
    """Create, read, list, advance, pause, resume and delete schedules. Raise Unavailable when
    Redis cannot be reached."""

    def _keys(self, name: str) -> list[str]:
        k = self.keys.at(0)
        return [*k.namespace_keys(), k.schedules(), k.schedules_due(), k.schedule(name), k.schedule_runs(name)]

    async def _periodic(self, op: str, name: str, *args: Any) -> int:
        async with redis_errors():
            return int(await self.durably(self.scripts.periodic, self._keys(name), [op, name, *args]))

    async def create(self, name: str, spec: bytes, first_ms: int, now: int) -> bool:
        """Stores a new schedule due at ``first_ms``; False when the name is taken (nothing changes)."""
        return await self._periodic("create", name, spec, first_ms, now) == 1

    async def advance(self, name: str, tick: int, next_ms: int, job_id: str, run: bytes) -> bool:
        """Records the run of ``tick`` and moves the schedule on to ``next_ms``; False when another
        gateway did, or the schedule was paused or deleted meanwhile (nothing changes)."""
        return await self._periodic("advance", name, tick, next_ms, job_id, run) == 1

    async def record(self, name: str, job_id: str, run: bytes) -> bool:
        """Records a run outside the timing (TriggerSchedule) without moving the next tick; False
        when there is no such schedule."""
        return await self._periodic("record", name, job_id, run) == 1

    async def pause(self, name: str) -> bool:
        """False when there is no such schedule."""
        return await self._periodic("pause", name) == 1

    async def resume(self, name: str, next_ms: int) -> bool:
        """Resumes a paused schedule at ``next_ms`` (a running one is left as it is); False when
        there is no such schedule."""
        return await self._periodic("resume", name, next_ms) == 1

    async def delete(self, name: str) -> bool:
        """False when there is no such schedule."""
        return await self._periodic("delete", name) == 1

    async def get(self, name: str) -> StoredSchedule | None:
        k = self.keys.at(0)
        async with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(k.schedule(name))
                pipe.lrange(k.schedule_runs(name), 0, -1)
                fields, runs = await pipe.execute()
        if not fields or b"spec" not in fields:
            return None
        return StoredSchedule(
            spec=fields[b"spec"],
            paused=fields.get(b"paused") == b"1",
            next_ms=int(fields.get(b"next", 0)),
            created_ms=int(fields.get(b"created", 0)),
            last_job=text(fields.get(b"last_job", b"")),
            runs=list(runs),
        )

    async def names(self, after: str, count: int) -> list[str]:
        """Up to ``count`` schedule names after ``after`` ('' for the first), in name order."""
        start = f"({after}" if after else "-"
        async with redis_errors():
            found = await self.redis.zrangebylex(self.keys.at(0).schedules(), start, "+", start=0, num=count)
        return [text(n) for n in cast(list[bytes], found)]

    async def due(self, now: int, limit: int) -> list[tuple[str, int]]:
        """Schedules whose next tick is at or before ``now``, soonest first, with that tick."""
        async with redis_errors():
            found = await self.redis.zrangebyscore(
                self.keys.at(0).schedules_due(), "-inf", now, start=0, num=limit, withscores=True
            )
        return [(text(n), int(score)) for n, score in cast(list[tuple[bytes, float]], found)]
