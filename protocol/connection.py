"""Connections to Redis: the client factory, pub/sub subscriptions and the clock every process shares."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import cache
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .errors import CONNECTION_ERRORS

log = logging.getLogger(__name__)


@cache
def _packing_with_hiredis(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with commands packed by hiredis (C) instead of redis-py's Python packer, which
    copies its growing buffer for every argument: a batch script call carries thousands of them."""

    class Packed(cls):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            try:
                if isinstance(args[0], str):  # e.g. "SCRIPT LOAD": the server expects separate words
                    args = (*args[0].encode().split(), *args[1:])
                elif b" " in args[0]:
                    args = (*args[0].split(), *args[1:])
                return [hiredis.pack_command(args)]
            except TypeError:  # a value Redis cannot take: redis-py's packer raises its own error
                packed: list[bytes] = super().pack_command(*args)
                return packed

    Packed.__name__ = Packed.__qualname__ = f"Hiredis{cls.__name__}"
    return Packed


def redis_client(url: str, timeout_s: float) -> Redis:
    """An asyncio Redis client with bounded waits that reconnects by itself.

    A command that hits a connection dropped by a Redis restart is retried (up to 3 times, 50-500 ms
    apart) on a fresh connection, so the first request after a restart does not fail for nothing.
    """
    client = Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=10,
        socket_keepalive=True,
        # No CLIENT SETINFO on connect: the minimal ACL user (gateway/acl.py) need not be granted it.
        lib_name=None,
        lib_version=None,
        # OSError is not a RedisError, but a dropped socket can surface as one: retry it too.
        retry=Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.5),
            3,
            supported_errors=CONNECTION_ERRORS,  # type: ignore[arg-type]
        ),
        retry_on_error=list(CONNECTION_ERRORS),
    )
    pool = client.connection_pool  # connections are made on first use, so this applies to all
    pool.connection_class = _packing_with_hiredis(pool.connection_class)  # type: ignore[arg-type]
    return client


async def bounded(aw: Awaitable[Any], timeout_s: float, what: str) -> None:
    """Awaits a shutdown step for at most ``timeout_s`` (closing connections can wait on a peer,
    for example a TLS shutdown); a step that takes longer is logged and left behind."""
    try:
        await asyncio.wait_for(aw, timeout=timeout_s)
    except TimeoutError:
        log.warning("%s took longer than %.1fs; going on", what, timeout_s)


@asynccontextmanager
async def subscription(
    redis: Redis, channels: Sequence[str], on_reconnect: Callable[[Any], Awaitable[None]]
) -> AsyncIterator[PubSub]:
    """A pub/sub connection subscribed to ``channels``.

    redis-py reconnects a dropped pub/sub connection and subscribes again by itself while it is read;
    ``on_reconnect`` (a bound method: redis-py keeps a weak reference) hears of it, since whatever
    was published in the gap is lost. It is not called for the first connection, nor on closing.
    """
    async with redis.pubsub() as ps:
        await ps.subscribe(*channels)
        connection = ps.connection
        assert connection is not None  # subscribe connected it
        connection.register_connect_callback(on_reconnect)
        try:
            yield ps
        finally:
            connection.deregister_connect_callback(on_reconnect)


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (shared by every process through Redis)."""
    return time.time_ns() // 1_000_000
