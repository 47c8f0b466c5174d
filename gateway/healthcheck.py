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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.settings import read_file

from .config import GatewaySettings

# A server bound to every interface is reached through loopback from inside its own container.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "[::1]"}


def local_address(listen: str) -> str:
    """The address a client on the same host dials for a gateway listening on ``listen``."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        return listen
    return f"{_WILDCARD_HOSTS.get(host, host)}:{port}"


def credentials(ca_file: str, cert_file: str, key_file: str) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting ``ca_file`` (with a client certificate for mutual TLS), or None
    for plaintext when no CA is given. Raises ValueError for an unreadable file."""
    if not ca_file:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_file("ca", ca_file),
        private_key=read_file("key", key_file) or None,
        certificate_chain=read_file("cert", cert_file) or None,
    )


def health_status(
    address: str,
    timeout_s: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, str]] = (),
) -> int:
    """The gateway's overall health status (``HealthCheckResponse.ServingStatus``); over TLS when
    ``credentials`` are given."""
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials
        else grpc.insecure_channel(address, options=options)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        status: int = reply.status
        return status


def check(
    address: str,
    timeout_s: float,
    creds: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> str | None:
    """None when the gateway at ``address`` is SERVING, else the reason it is not."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    try:
        status = health_status(address, timeout_s=timeout_s, credentials=creds, options=options)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return f"health check of {address} failed: {code.name if code else exc}"
    if status != health_pb2.HealthCheckResponse.SERVING:
        return f"gateway at {address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
    return None


def cli(argv: Sequence[str] | None = None) -> None:
    env = os.environ
    listen = env.get("JOBGATE_LISTEN", GatewaySettings().listen)
    parser = argparse.ArgumentParser(
        prog="python -m gateway.healthcheck", description="Exit 0 when the gateway's health status is SERVING."
    )
    parser.add_argument("--address", default=local_address(listen), help="host:port (default from JOBGATE_LISTEN)")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="deadline for the call (default 2)")
    # Over TLS (when the gateway has tls_cert_file): by default the gateway's own certificate chain
    # is trusted; under mutual TLS a client certificate must be given as well.
    tls = bool(env.get("JOBGATE_TLS_CERT_FILE"))
    parser.add_argument(
        "--ca-file",
        default=env.get("JOBGATE_HEALTHCHECK_CA_FILE", env.get("JOBGATE_TLS_CERT_FILE", "") if tls else ""),
        help="CA certificates to trust; TLS is used when set (env JOBGATE_HEALTHCHECK_CA_FILE)",
    )
    parser.add_argument("--cert-file", default=env.get("JOBGATE_HEALTHCHECK_CERT_FILE", ""), help="client certificate")
    parser.add_argument("--key-file", default=env.get("JOBGATE_HEALTHCHECK_KEY_FILE", ""), help="client key")
    parser.add_argument(
        "--server-name",
        default=env.get("JOBGATE_HEALTHCHECK_SERVER_NAME", ""),
        help="name to verify in the gateway's certificate instead of the address's host",
    )
    args = parser.parse_args(argv)
    try:
        creds = credentials(args.ca_file, args.cert_file, args.key_file)
    except ValueError as exc:
        sys.exit(f"unhealthy: {exc}")
    reason = check(args.address, args.timeout_s, creds, args.server_name)
    if reason:
        sys.exit(f"unhealthy: {reason}")


if __name__ == "__main__":
    cli()
