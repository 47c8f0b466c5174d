"""Loads the Lua state transitions in ``protocol/lua`` and registers them on a Redis client.

Each script is sent with the shared prelude ``_common.lua`` in front of it, its body run as a
function followed by the prelude's ``flush_counts`` (which writes the counts the call kept for
GetQueueStats, once per call); ``read_events``, a read that needs none of it, goes alone. ``register_script``
runs them by EVALSHA and falls back to loading them on NOSCRIPT (for example after Redis restarts).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

NAMES = (
    "submit",
    "schedule",
    "start",
    "start_many",
    "finish",
    "finish_many",
    "heartbeat",
    "leave",
    "reap",
    "cancel",
    "read_events",
    "promote",
    "retry",
    "progress",
    "periodic",
    "pause",
    "limits",
)


PUBLISH_LINE = "local PUBLISH = 'PUBLISH'\n"


# Scripts that change nothing and use none of the prelude's helpers: sent alone, so that a call
# does not run the prelude's definitions first (about 10 µs of Redis time a call).
ALONE = frozenset({"read_events"})


@cache
def source(name: str, *, sharded: bool = False) -> str:
    """Full text of one script, prelude included (except for those ``ALONE``); ``sharded`` (a Redis
    Cluster): publishing on shard channels (SPUBLISH), which a cluster keeps on the node that serves
    their slot."""
    lua = resources.files("protocol") / "lua"
    if name in ALONE:
        return (lua / f"{name}.lua").read_text()
    prelude = (lua / "_common.lua").read_text()
    assert PUBLISH_LINE in prelude
    if sharded:
        prelude = prelude.replace(PUBLISH_LINE, "local PUBLISH = 'SPUBLISH'\n")
    # The body runs as a function, so that whatever path it returns by, the counts it kept in the
    # prelude's tables are written once at the end of the call (flush_counts).
    body = (lua / f"{name}.lua").read_text()
    return f"{prelude}\nlocal function body()\n{body}\nend\nlocal reply = body()\nflush_counts()\nreturn reply\n"


@dataclass(frozen=True, slots=True)
class Scripts:
    """The registered scripts, one attribute per state transition."""

    submit: AsyncScript
    schedule: AsyncScript
    start: AsyncScript
    start_many: AsyncScript
    finish: AsyncScript
    finish_many: AsyncScript
    heartbeat: AsyncScript
    leave: AsyncScript
    reap: AsyncScript
    cancel: AsyncScript
    read_events: AsyncScript
    promote: AsyncScript
    retry: AsyncScript
    progress: AsyncScript
    periodic: AsyncScript
    pause: AsyncScript
    limits: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        sharded = isinstance(redis, RedisCluster)
        loaded: dict[str, Any] = {name: redis.register_script(source(name, sharded=sharded)) for name in NAMES}
        return cls(**loaded)
