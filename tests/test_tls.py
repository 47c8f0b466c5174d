"""TLS and mutual TLS on the gateway's port, with certificates made for each test run."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import trustme

from devtools.devstack import Stack
from devtools.servers import free_port
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

from .helpers import FAST, code_of, eventually, request


@dataclass
class Pki:
    server_ca: trustme.CA
    client_ca: trustme.CA
    dir: Path

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def server_env(self, *, mutual: bool) -> dict[str, str]:
        cert = self.server_ca.issue_cert("localhost", "127.0.0.1")
        env = {
            "JOBGATE_TLS_CERT_FILE": self.write("server.pem", b"".join(p.bytes() for p in cert.cert_chain_pems)),
            "JOBGATE_TLS_KEY_FILE": self.write("server.key", cert.private_key_pem.bytes()),
        }
        if mutual:
            env["JOBGATE_TLS_CLIENT_CA_FILE"] = self.write("client-ca.pem", self.client_ca.cert_pem.bytes())
        return env

    def client_credentials(
        self, *, ca: trustme.CA | None = None, cert_from: trustme.CA | None = None
    ) -> grpc.ChannelCredentials:
        key = chain = None
        if cert_from is not None:
            cert = cert_from.issue_cert("client@example.com")
            key, chain = cert.private_key_pem.bytes(), b"".join(p.bytes() for p in cert.cert_chain_pems)
        return grpc.ssl_channel_credentials((ca or self.server_ca).cert_pem.bytes(), key, chain)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(trustme.CA(), trustme.CA(), tmp_path)


@pytest.fixture
def tls_stack(redis_url: str, namespace: str) -> Iterator[Stack]:
    s = Stack(redis_url, namespace, env=FAST)
    try:
        yield s
    finally:
        s.stop()


async def outcome(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> job_pb2.JobEvent:
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    call = stub.RunJob(scheduler_pb2.RunJobRequest(job=request("echo", {"over": "tls"})), metadata=metadata, timeout=20)
    events = [r.event async for r in call]
    return events[-1]


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """How a ListWorkers call on ``channel`` ends."""
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    return await code_of(stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5))


async def test_tls_serves_clients_that_trust_its_ca_and_no_one_else(tls_stack: Stack, pki: Pki) -> None:
    tls_stack.credentials = pki.client_credentials()
    gateway, address = tls_stack.start_gateway(env=pki.server_env(mutual=False))
    tls_stack.start_worker()
    async with grpc.aio.secure_channel(address, pki.client_credentials()) as channel:
        assert (await outcome(channel)).state == job_pb2.JOB_STATE_SUCCEEDED
    async with grpc.aio.insecure_channel(address) as plaintext:
        assert await refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    stranger = trustme.CA()
    async with grpc.aio.secure_channel(address, pki.client_credentials(ca=stranger)) as wrong_trust:
        assert await refused(wrong_trust) == grpc.StatusCode.UNAVAILABLE
    assert "(port" in gateway.log() and "TLS)" in gateway.log()


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(tls_stack: Stack, pki: Pki) -> None:
    tls_stack.credentials = pki.client_credentials(cert_from=pki.client_ca)
    env = {**pki.server_env(mutual=True), "JOBGATE_AUTH_TOKENS": f"app {'k' * 32}"}
    _, address = tls_stack.start_gateway(env=env)
    tls_stack.start_worker()
    for creds in (pki.client_credentials(), pki.client_credentials(cert_from=trustme.CA())):
        async with grpc.aio.secure_channel(address, creds) as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(address, pki.client_credentials(cert_from=pki.client_ca)) as channel:
        # The certificate gets the client onto the connection; the token still decides what it may do.
        assert await refused(channel) == grpc.StatusCode.UNAUTHENTICATED
        event = await outcome(channel, (("authorization", f"Bearer {'k' * 32}"),))
        assert event.state == job_pb2.JOB_STATE_SUCCEEDED


async def test_the_dashboard_serves_https_with_the_gateways_files_and_follows_their_renewal(
    tls_stack: Stack, pki: Pki
) -> None:
    tls_stack.credentials = pki.client_credentials(cert_from=pki.client_ca)
    port = free_port()
    env = {**pki.server_env(mutual=True), "JOBGATE_DASHBOARD_LISTEN": f"127.0.0.1:{port}"}
    tls_stack.start_gateway(env=env)
    url = f"https://localhost:{port}/api/info"

    def trusting(ca: trustme.CA, client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        if client_cert:
            pki.client_ca.issue_cert("browser@example.com").configure_cert(context)
        return context

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(url, ssl=trusting(pki.server_ca)) as r:
            assert r.status == 200 and (await r.json())["auth"] is False
        with pytest.raises(aiohttp.ClientError):  # no client certificate: mutual TLS
            await http.get(url, ssl=trusting(pki.server_ca, client_cert=False))
        with pytest.raises(aiohttp.ClientError):  # plaintext
            await http.get(f"http://localhost:{port}/api/info")
        renewed = trustme.CA()  # a certificate from another CA replaces the files
        cert = renewed.issue_cert("localhost", "127.0.0.1")
        pki.write("server.pem", b"".join(p.bytes() for p in cert.cert_chain_pems))
        pki.write("server.key", cert.private_key_pem.bytes())

        async def serves_renewed() -> bool:
            try:
                async with http.get(url, ssl=trusting(renewed)) as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(serves_renewed, timeout=20, what="the renewed certificate on the dashboard")


def test_the_container_health_check_speaks_tls(tls_stack: Stack, pki: Pki) -> None:
    tls_stack.credentials = pki.client_credentials()
    env = pki.server_env(mutual=False)
    _, address = tls_stack.start_gateway(env=env)
    run_env = {**os.environ, **env, "JOBGATE_LISTEN": address}
    check = [sys.executable, "-m", "gateway.healthcheck", "--server-name", "localhost"]
    ok = subprocess.run(check, env=run_env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    plain = subprocess.run(
        check, env={**run_env, "JOBGATE_TLS_CERT_FILE": ""}, capture_output=True, text=True, timeout=30
    )
    assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"JOBGATE_TLS_CERT_FILE": "/nonexistent/cert.pem", "JOBGATE_TLS_KEY_FILE": "/nonexistent/key.pem"},
            "cannot read",
        ),
        ({"JOBGATE_TLS_CERT_FILE": "/etc/hostname"}, "go together"),
        ({"JOBGATE_TLS_CLIENT_CA_FILE": "/etc/hostname"}, "needs tls_cert_file"),
    ],
)
def test_the_gateway_refuses_to_start_with_bad_tls_settings(env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and message in result.stderr


async def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(tls_stack: Stack, pki: Pki) -> None:
    tls_stack.credentials = pki.client_credentials()
    env = pki.server_env(mutual=False)
    gateway, address = tls_stack.start_gateway(env=env)
    tls_stack.start_worker()
    old_channel = grpc.aio.secure_channel(address, pki.client_credentials())
    try:
        assert (await outcome(old_channel)).state == job_pb2.JOB_STATE_SUCCEEDED
        # A key that does not match the certificate (a renewal half done) is refused; the old one stays.
        renewed_ca = trustme.CA()
        half = renewed_ca.issue_cert("localhost", "127.0.0.1")
        pki.write("server.pem", b"".join(p.bytes() for p in half.cert_chain_pems))
        async with grpc.aio.secure_channel(address, pki.client_credentials()) as channel:
            assert (await outcome(channel)).state == job_pb2.JOB_STATE_SUCCEEDED
        assert "cannot be used" in gateway.log()
        # The whole renewal: certificate and key from another CA.
        pki.write("server.key", half.private_key_pem.bytes())
        async with grpc.aio.secure_channel(address, pki.client_credentials(ca=renewed_ca)) as channel:
            assert (await outcome(channel)).state == job_pb2.JOB_STATE_SUCCEEDED
        async with grpc.aio.secure_channel(address, pki.client_credentials()) as stale:
            assert await refused(stale) == grpc.StatusCode.UNAVAILABLE  # new connections get the new one
        assert (await outcome(old_channel)).state == job_pb2.JOB_STATE_SUCCEEDED  # an open one carries on
    finally:
        await old_channel.close()
