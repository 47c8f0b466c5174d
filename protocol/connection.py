"""Connections to Redis: the client factory, pub/sub subscriptions and the clock every process shares."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import cache
from typing import Any, cast
from urllib.parse import unquote

import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.driver_info import DriverInfo

from .errors import CONNECTION_ERRORS

log = logging.getLogger(__name__)


LARGE = 16 * 1024  # an argument this long goes to the socket as it is, never copied into the command
RUN = 64 * 1024  # hiredis packs the arguments between large ones in runs of up to this many bytes
SIZED = (bytes, str)


def pack_command(args: tuple[Any, ...]) -> list[bytes | memoryview]:
    """The RESP encoding of one command, in pieces to write one after another.

    hiredis packs a command into one new buffer; past a few hundred KB that costs far more than the
    copy (fresh pages of a large allocation, measured at 0.6 ms for 1 MB against 2 µs for a
    128 KB one). So a command with large arguments is sent as runs of small ones packed by hiredis
    (each at most ``RUN`` bytes) with the large ones between them as they are. Raises TypeError for
    an argument Redis cannot take.
    """
    sizes = [len(a) if isinstance(a, SIZED) else 0 for a in args]
    if max(sizes) <= LARGE and sum(sizes) <= RUN:
        return [hiredis.pack_command(args)]
    pieces: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
    start = run = 0

    def pack_run(end: int) -> None:
        if end > start:
            packed = hiredis.pack_command(args[start:end])
            pieces.append(memoryview(packed)[len(b"*%d\r\n" % (end - start)) :])

    for i, size in enumerate(sizes):
        if size > LARGE:
            pack_run(i)
            value = args[i].encode() if isinstance(args[i], str) else args[i]
            pieces += (b"$%d\r\n" % len(value), value, b"\r\n")
            start, run = i + 1, 0
        elif (run := run + size) > RUN:
            pack_run(i + 1)
            start, run = i + 1, 0
    pack_run(len(args))
    return pieces


@cache
def _packing_with_hiredis(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with commands packed by :func:`pack_command` (hiredis, in C) instead of redis-py's
    Python packer, which takes several times as long for a batch script call's thousands of
    arguments."""

    class Packed(cls):  # type: ignore[valid-type, misc]
        def pack_command(self, *args: Any) -> list[bytes | memoryview]:
            try:
                if isinstance(args[0], str):  # e.g. "SCRIPT LOAD": the server expects separate words
                    args = (*args[0].encode().split(), *args[1:])
                elif b" " in args[0]:
                    args = (*args[0].split(), *args[1:])
                return pack_command(args)
            except TypeError:  # a value Redis cannot take: redis-py's packer raises its own error
                packed: list[bytes | memoryview] = super().pack_command(*args)
                return packed

    Packed.__name__ = Packed.__qualname__ = f"Hiredis{cls.__name__}"
    return Packed


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
RETRIES = 3  # how often redis_client repeats a command that met a dropped connection
BACKOFF_CAP_S = 0.5
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_PORT = 26379


def redis_client(url: str, timeout_s: float) -> Redis:
    """An asyncio Redis client with bounded waits that reconnects by itself.

    ``url`` names one server (``redis://``, ``rediss://``, ``unix://``), a primary found through
    Redis Sentinel (``redis+sentinel://`` or, with TLS, ``rediss+sentinel://``; see
    :func:`sentinel_options`): that client asks the sentinels for the primary on every new
    connection, so after a failover it reconnects to the promoted replica by itself; or a Redis
    Cluster (``redis+cluster://``, ``rediss+cluster://``; see :func:`cluster_options`), whose
    client sends each command to the node serving its keys and follows the cluster's changes.
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
            ExponentialWithJitterBackoff(base=0.05, cap=BACKOFF_CAP_S),
            RETRIES,
            supported_errors=CONNECTION_ERRORS,  # type: ignore[arg-type, unused-ignore]  # typed differently across redis-py 8.x
        ),
        "retry_on_error": list(CONNECTION_ERRORS),
    }
    scheme = url.partition("://")[0]
    if scheme in CLUSTER_SCHEMES:
        nodes, kwargs = cluster_options(url)
        options.pop("retry_on_error")  # the cluster client retries connection errors itself, on a fresh topology
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options, **kwargs)
        node_options = cluster.nodes_manager.connection_kwargs  # the nodes it finds are made with these
        node_options["connection_class"] = _packing_with_hiredis(node_options["connection_class"])
        # Typed as Redis: the calls jobgate makes (scripts, pipelines of one slot, pub/sub, PUBLISH)
        # have the same shape on both; Calls.durably treats WAIT apart (it must reach the key's node).
        return cast(Redis, cluster)
    if scheme in SENTINEL_SCHEMES:
        sentinels, service, kwargs, sentinel_kwargs = sentinel_options(url)
        sentinel_kwargs.update({k: v for k, v in options.items() if k.startswith("socket_") or k == "driver_info"})
        manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **options, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
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
    sentinels, parts, kwargs, tls = _multi_host(url, SENTINEL_PORT)
    if not 1 <= len(parts) <= 2:
        raise ValueError("redis_url: a Sentinel URL names the primary's service after the hosts: /<service>[/<db>]")
    service = unquote(parts[0])
    if len(parts) == 2:
        kwargs["db"] = _db(parts[1])
    sentinel_kwargs: dict[str, Any] = {}
    for name in ("username", "password"):
        if (value := kwargs.pop("sentinel_" + name, None)) is not None:
            sentinel_kwargs[name] = value
    if tls:
        kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
    return sentinels, service, kwargs, sentinel_kwargs


def cluster_options(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Reads ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0][?options]``
    (``rediss+cluster://`` for TLS): some of the cluster's nodes to learn its layout from (port 6379
    unless given), and the options of connections to its nodes (redis-py's query options, as for
    ``rediss://``). Raises ValueError naming what is wrong (a cluster has only database 0)."""
    nodes, parts, kwargs, tls = _multi_host(url, 6379)
    if len(parts) > 1 or (parts and _db(parts[0]) != 0):
        raise ValueError("redis_url: a Redis Cluster has database 0 only: end the URL with /0 or nothing")
    if tls:
        kwargs["ssl"] = True
    return nodes, kwargs


def _multi_host(url: str, default_port: int) -> tuple[list[tuple[str, int]], list[str], dict[str, Any], bool]:
    """The parts of ``scheme://[creds@]host[:port][,host[:port]...][/path][?query]``: the hosts, the
    path's parts, redis-py's connection options from the credentials and the query, and whether the
    scheme asks for TLS (``rediss+...``)."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    nodes = [_host_port(node, default_port) for node in hosts.split(",")]
    base = scheme.partition("+")[0] + "://" + creds + at + "placeholder"
    kwargs: dict[str, Any] = dict(parse_url(base + ("?" + query if query else "")))
    kwargs.pop("host", None)
    tls = kwargs.pop("connection_class", None) is not None  # rediss: redis-py's SSLConnection
    return nodes, [p for p in path.split("/") if p], kwargs, tls


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"redis_url: the database must be a number, got {text!r}")
    return int(text)


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


def longest_call_s(timeout_s: float, wait_ms: int = 0) -> float:
    """The longest one command of a ``redis_client(url, timeout_s)`` can take when Redis answers
    nothing: every try's connect and read time out, with the back-off between tries and a WAIT's
    own timeout on top. A loop that must not stop for good (placement, heartbeats, outcomes)
    abandons a call that takes longer, as a failover can leave a connection waiting on nothing."""
    return (RETRIES + 1) * 2 * timeout_s + RETRIES * BACKOFF_CAP_S + wait_ms / 1000


async def bounded(aw: Awaitable[Any], timeout_s: float, what: str) -> None:
    """Awaits a shutdown step for at most ``timeout_s`` (closing connections can wait on a peer,
    for example a TLS shutdown); a step that takes longer is logged and left behind."""
    try:
        await asyncio.wait_for(aw, timeout=timeout_s)
    except TimeoutError:
        log.warning("%s took longer than %.1fs; going on", what, timeout_s)


class Subscription:
    """The messages of a subscription: on a Redis Cluster its channels are shard channels
    (SSUBSCRIBE), followed on the nodes that serve their slots."""

    def __init__(
        self, pubsub: PubSub, sharded: bool, on_reconnect: Callable[[Any], Awaitable[None]] | None = None
    ) -> None:
        self.pubsub = pubsub
        self.sharded = sharded
        self.on_reconnect = on_reconnect
        self._confirmed: set[Any] = set()  # shard channels whose first subscription Redis confirmed

    async def get_message(self, *, ignore_subscribe_messages: bool = True, timeout: float = 0.0) -> Any:  # noqa: ASYNC109 - redis-py's own poll timeout
        """The next message (a dict with ``channel`` and ``data``), or None after ``timeout`` s."""
        if not self.sharded:
            return await self.pubsub.get_message(ignore_subscribe_messages=ignore_subscribe_messages, timeout=timeout)
        # A shard channel moves with its slot (a failover, a resharding): Redis unsubscribes it and
        # the client subscribes it again on the new node. Messages published in between are lost,
        # which the confirmations tell: any but the first of a channel means a gap.
        cluster_ps = cast(Any, self.pubsub)
        msg = await cluster_ps.get_sharded_message(ignore_subscribe_messages=False, timeout=timeout)
        if msg is None or msg.get("type") not in ("ssubscribe", "sunsubscribe"):
            return msg
        channel = msg.get("channel")
        if msg["type"] == "sunsubscribe" or channel in self._confirmed:
            log.warning("shard channel %r moved or was dropped; messages may have been missed", channel)
            if self.on_reconnect is not None:
                await self.on_reconnect(None)
        self._confirmed.add(channel)
        return None if ignore_subscribe_messages else msg


@asynccontextmanager
async def subscription(
    redis: Redis, channels: Sequence[str], on_reconnect: Callable[[Any], Awaitable[None]]
) -> AsyncIterator[Subscription]:
    """A pub/sub connection subscribed to ``channels`` (on a Redis Cluster, shard channels: one
    connection per node that serves one of them).

    redis-py reconnects a dropped pub/sub connection and subscribes again by itself while it is read;
    ``on_reconnect`` (a bound method: redis-py keeps a weak reference) hears of it, since whatever
    was published in the gap is lost. It is not called for the first connection, nor on closing. On
    a cluster, whose client moves shard channels between nodes by itself, it is called (with None)
    whenever a channel is unsubscribed or subscribed again.
    """
    if isinstance(redis, RedisCluster):
        await redis.initialize()  # a cluster's pub/sub picks its nodes from the layout the client learns first
        async with redis.pubsub() as cps:
            await cps.ssubscribe(*channels)
            yield Subscription(cps, sharded=True, on_reconnect=on_reconnect)
        return
    async with redis.pubsub() as ps:
        await ps.subscribe(*channels)
        connection = ps.connection
        assert connection is not None  # subscribe connected it
        connection.register_connect_callback(on_reconnect)
        try:
            yield Subscription(ps, sharded=False)
        finally:
            connection.deregister_connect_callback(on_reconnect)


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (shared by every process through Redis)."""
    return time.time_ns() // 1_000_000
