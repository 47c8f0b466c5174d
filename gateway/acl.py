"""The least a Redis ACL user needs to run jobgate's gateways and workers in one namespace.

``python -m gateway.acl --namespace jobgate --user jobgate`` prints an ``ACL SETUSER`` command (or,
with ``--file``, a line for an ``aclfile``): keys and channels limited to the namespace's hash tag,
and only the commands jobgate sends, directly or from its Lua scripts. Nothing that lists other keys
(KEYS, SCAN), changes the server (CONFIG, FLUSHALL, DEBUG, SHUTDOWN) or stops other clients is
granted, nor EVAL. Loading scripts (SCRIPT LOAD, then EVALSHA) is granted because jobgate loads its
own again after Redis restarts; it also lets this user run Lua of its own, but Redis checks every
command inside a script against the same key, channel and command rules, so such a script reaches
nothing more than the user could directly (it can still keep Redis busy while it runs).

With ``--cluster`` the user may also read a Redis Cluster's layout (CLUSTER SLOTS) and the commands'
key positions (COMMAND), which the cluster client asks the nodes for. With ``--sentinel`` it prints
the user the sentinels need instead (when they require a password: ``sentinel_username`` /
``sentinel_password`` in a ``redis+sentinel://`` URL): asking which primary serves a name is all
jobgate does there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from protocol.keys import Keys

COMMANDS = (
    # connection set-up and health checks: authentication, protocol, database
    "auth", "hello", "ping", "select",
    # pub/sub: dispatch, results and worker-status channels
    "publish", "subscribe", "unsubscribe",
    # jobgate's Lua scripts: loaded (again after a Redis restart), then run by digest; WAIT after
    # those that record a submit or an outcome, with redis_wait_replicas; large values written
    # beside a script call, in one MULTI/EXEC with it
    "evalsha", "script|load", "wait", "multi", "exec",
    # what the scripts run, and the gateway's reads (tests/test_redis_security.py checks the scripts')
    "get", "set", "incrby", "del", "exists", "expire", "rename", "pttl", "pexpire",
    "hget", "hmget", "hgetall", "hset", "hdel", "hincrby", "hstrlen", "hexists",
    "sadd", "srem", "smembers", "scard", "sismember",
    "zadd", "zrem", "zrange", "zrangebyscore", "zcard", "zcount",
    # dead letters, retries and schedules: expiry lifted by RetryJob, failed jobs trimmed and listed
    # newest first, a schedule's recent runs, schedules listed by name
    "persist", "zremrangebyscore", "zrevrangebyscore", "zrangebylex", "lpush", "ltrim", "lrange",
)  # fmt: skip


# What the cluster client asks nodes of a Redis Cluster: which node serves which slots, and the
# commands' key positions (COMMAND), so that it can send each command where its keys are; and the
# shard channels every message goes on there.
CLUSTER_COMMANDS = ("cluster|slots", "command", "spublish", "ssubscribe", "sunsubscribe")


def rules(namespace: str, *, cluster: bool = False) -> list[str]:
    """ACL rules (after the user name) for jobgate in ``namespace``, without a password; with
    ``cluster``, for a Redis Cluster. The keys and channels of every shard (``redis_shards``) are
    covered: ``{<namespace>}:*`` for shard 0, ``{<namespace>:*}:*`` for the others."""
    first, others = Keys(namespace).prefix, Keys(namespace, 2).at(1).prefix.replace(":1}", ":*}")
    commands = (*COMMANDS, *CLUSTER_COMMANDS) if cluster else COMMANDS
    return [
        "resetkeys",
        f"~{first}*",
        f"~{others}*",
        "resetchannels",
        f"&{first}*",
        f"&{others}*",
        "-@all",
        *(f"+{c}" for c in commands),
    ]


# What redis-py asks a sentinel: the primaries it watches (SENTINEL MASTERS).
SENTINEL_COMMANDS = ("auth", "hello", "ping", "sentinel|masters")


def sentinel_rules() -> list[str]:
    """ACL rules (after the user name) for the sentinels' user: no keys, no channels."""
    return ["resetkeys", "resetchannels", "-@all", *(f"+{c}" for c in SENTINEL_COMMANDS)]


def setuser(
    namespace: str,
    user: str,
    password: str = "<password>",
    *,
    aclfile: bool = False,
    sentinel: bool = False,
    cluster: bool = False,
) -> str:
    """An ``ACL SETUSER`` command for ``user`` (a ``user`` line for an aclfile with ``aclfile``); with
    ``sentinel``, the user for the sentinels rather than for Redis; with ``cluster``, for the nodes of
    a Redis Cluster (set it on every node)."""
    head = ["user"] if aclfile else ["ACL", "SETUSER"]
    body = sentinel_rules() if sentinel else rules(namespace, cluster=cluster)
    return " ".join([*head, user, "on", f">{password}", *body])


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.acl", description="Print the Redis ACL user jobgate needs for one namespace."
    )
    parser.add_argument("--namespace", default="jobgate", help="jobgate namespace (default jobgate)")
    parser.add_argument("--user", default="jobgate", help="ACL user name (default jobgate)")
    parser.add_argument("--file", action="store_true", help="print an aclfile line instead of an ACL SETUSER command")
    parser.add_argument(
        "--cluster", action="store_true", help="for the nodes of a Redis Cluster (redis+cluster:// URLs)"
    )
    parser.add_argument(
        "--sentinel", action="store_true", help="print the user the sentinels need (redis+sentinel:// URLs) instead"
    )
    args = parser.parse_args(argv)
    try:
        print(setuser(args.namespace, args.user, aclfile=args.file, sentinel=args.sentinel, cluster=args.cluster))
    except ValueError as exc:
        sys.exit(f"acl: {exc}")


if __name__ == "__main__":
    cli()
