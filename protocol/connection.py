"""Connections to Redis: the client factory, pub/sub subscriptions and the clock every process shares."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import cache
from typing import Any
from urllib.parse import unquote

import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.driver_info import DriverInfo

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


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


def redis_client(url: str, timeout_s: float) -> Redis:
    """An asyncio Redis client with bounded waits that reconnects by itself.

    ``url`` names one server (``redis://``, ``rediss://``, ``unix://``) or a primary found through
    Redis Sentinel (``redis+sentinel://`` or, with TLS, ``rediss+sentinel://``; see
    :func:`sentinel_options`): that client asks the sentinels for the primary on every new
    connection, so after a failover it reconnects to the promoted replica by itself.
    A command that hits a connection dropped by a Redis restart is retried (up to 3 times, 50-500 ms
    apart) on a fresh connection, so the first request after a restart does not fail for nothing.
    Raises ValueError for a URL it cannot read.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 10,
        "socket_keepalive": True,
        # No CLIENT SETINFO on connect: the minimal ACL user (gateway/acl.py) need not be granted it.
        "driver_info": DriverInfo(name=None, lib_version=None),
        # OSError is not a RedisError, but a dropped socket can surface as one: retry it too.
        "retry": Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.5),
            3,
            supported_errors=CONNECTION_ERRORS,  # type: ignore[arg-type]
        ),
        "retry_on_error": list(CONNECTION_ERRORS),
    }
    if url.partition("://")[0] in SENTINEL_SCHEMES:
        sentinels, service, kwargs, sentinel_kwargs = sentinel_options(url)
        sentinel_kwargs.update({k: v for k, v in options.items() if k.startswith("socket_") or k == "driver_info"})
        manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **options, **kwargs)  # type: ignore[no-untyped-call]
        client: Redis = manager.master_for(service, redis_class=_SentinelClient)
        client.sentinel_manager = manager  # type: ignore[attr-defined]
    else:
        client = Redis.from_url(url, **options)
    pool = client.connection_pool  # connections are made on first use, so this applies to all
    pool.connection_class = _packing_with_hiredis(pool.connection_class)  # type: ignore[arg-type]
    return client


class _SentinelClient(Redis):
    """A client of the primary a Sentinel names; closing it closes the connections to the sentinels too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            await self.sentinel_manager.aclose()


def sentinel_options(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any], dict[str, Any]]:
    """Reads ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?options]``
    (``rediss+sentinel://`` for TLS): the sentinels (port 26379 unless given), the primary's service
    name, the options of connections to the primary, and those of connections to the sentinels.
    The user and password are the primary's; ``sentinel_username`` and ``sentinel_password`` in the
    query are the sentinels' own (Sentinel's ``requirepass``). The other query options (``ssl_ca_certs``,
    ``ssl_certfile``, ...) are redis-py's and apply to both. Raises ValueError naming what is wrong."""
    scheme, _, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    creds, at, hosts = netloc.rpartition("@")
    sentinels = []
    for node in hosts.split(","):
        host, port = _host_port(node, SENTINEL_PORT)
        sentinels.append((host, port))
    parts = [p for p in path.split("/") if p]
    if not 1 <= len(parts) <= 2:
        raise ValueError("redis_url: a Sentinel URL names the primary's service after the hosts: /<service>[/<db>]")
    service = unquote(parts[0])
    base = scheme.partition("+")[0] + "://" + creds + at + "sentinel" + ("/" + parts[1] if len(parts) == 2 else "")
    kwargs: dict[str, Any] = dict(parse_url(base + ("?" + query if query else "")))
    kwargs.pop("host", None)
    tls = kwargs.pop("connection_class", None) is not None  # rediss: redis-py's SSLConnection
    sentinel_kwargs: dict[str, Any] = {}
    for name in ("username", "password"):
        if (value := kwargs.pop("sentinel_" + name, None)) is not None:
            sentinel_kwargs[name] = value
    if tls:
        kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
    return sentinels, service, kwargs, sentinel_kwargs


def _host_port(node: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``. Raises ValueError."""
    if node.startswith("["):
        host, _, after = node[1:].partition("]")
        port = after.removeprefix(":")
    else:
        host, _, port = node.partition(":")
    if not host:
        raise ValueError(f"redis_url: a host is missing in {node!r}")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"redis_url: bad port in {node!r}")
    return unquote(host), int(port) if port else default_port


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
