"""``python -m gateway.healthcheck``: exit 0 when the gateway's gRPC health service says SERVING.

Calls ``grpc.health.v1.Health/Check`` for the overall service (``""``). Meant for container
health checks; the gateway reports NOT_SERVING from the moment it starts shutting down.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2

from .config import GatewaySettings
from .devstack import health_status

# A server bound to every interface is reached through loopback from inside its own container.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "[::1]"}


def local_address(listen: str) -> str:
    """The address a client on the same host dials for a gateway listening on ``listen``."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        return listen
    return f"{_WILDCARD_HOSTS.get(host, host)}:{port}"


def check(address: str, timeout_s: float) -> str | None:
    """None when the gateway at ``address`` is SERVING, else the reason it is not."""
    try:
        status = health_status(address, timeout_s=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return f"health check of {address} failed: {code.name if code else exc}"
    if status != health_pb2.HealthCheckResponse.SERVING:
        return f"gateway at {address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
    return None


def cli(argv: Sequence[str] | None = None) -> None:
    listen = os.environ.get("JOBGATE_LISTEN", GatewaySettings().listen)
    parser = argparse.ArgumentParser(
        prog="python -m gateway.healthcheck", description="Exit 0 when the gateway's health status is SERVING."
    )
    parser.add_argument("--address", default=local_address(listen), help="host:port (default from JOBGATE_LISTEN)")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="deadline for the call (default 2)")
    args = parser.parse_args(argv)
    reason = check(args.address, args.timeout_s)
    if reason:
        sys.exit(f"unhealthy: {reason}")


if __name__ == "__main__":
    cli()
