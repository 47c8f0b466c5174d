"""Gateways and workers against a Redis that demands TLS and an ACL user with the minimal rules of
``python -m gateway.acl``: every path (submit, place, run, fail, cancel, lose a worker, drain)
works, and Redis logs no denied command, key or channel."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import trustme
from google.protobuf.duration_pb2 import Duration

import protocol
from devtools.devstack import Stack
from devtools.servers import find_redis_server, free_port, wait_for
from gateway.acl import COMMANDS, setuser
from jobgate.v1 import job_pb2, scheduler_pb2

from .helpers import FAST, NPM_TIMEOUT_S, Client, NodeWorker, eventually, request, value

pytestmark = pytest.mark.slow
NAMESPACE = "secure"
PASSWORD = "p@ss:w/rd%&?#="  # the URL must quote it


@dataclass
class SecureRedis:
    port: int
    ca_file: str
    admin: redis.Redis

    def url(self, user: str, password: str) -> str:
        return f"rediss://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"


@pytest.fixture
def secure_redis(tmp_path: Path) -> Iterator[SecureRedis]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "redis.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "users.acl").write_text(
        "user default off\n"
        "user admin on >admin-secret ~* &* +@all\n"
        f"{setuser(NAMESPACE, 'jobgate', PASSWORD, aclfile=True)}\n"
    )
    port = free_port()
    binary = find_redis_server()
    assert binary, "no redis-server"
    proc = subprocess.Popen(
        [
            binary,
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(tmp_path / "redis.pem"),
            "--tls-key-file", str(tmp_path / "redis.pem"),
            "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
            "--tls-auth-clients", "no",
            "--aclfile", str(tmp_path / "users.acl"),
            "--dir", str(tmp_path),
            "--save", "",
            "--enable-debug-command", "yes",  # so that the ACL is what refuses DEBUG
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    admin = redis.Redis(
        host="127.0.0.1",
        port=port,
        username="admin",
        password="admin-secret",
        ssl=True,
        ssl_ca_certs=str(tmp_path / "ca.pem"),
    )
    try:
        wait_for(admin.ping, 10, "redis-server with TLS")
        yield SecureRedis(port, str(tmp_path / "ca.pem"), admin)
    finally:
        admin.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def secure_stack(secure_redis: SecureRedis) -> Iterator[Stack]:
    s = Stack(secure_redis.url("jobgate", PASSWORD), NAMESPACE, env=FAST)
    try:
        yield s
    finally:
        s.stop()


def denials(admin: redis.Redis) -> list[dict[str, object]]:
    return [{k: v for k, v in entry.items() if k in ("reason", "object", "context")} for entry in admin.acl_log()]


async def test_everything_works_over_tls_as_the_minimal_acl_user(
    secure_redis: SecureRedis, secure_stack: Stack, client_for: Callable[[str], Client]
) -> None:
    gateway, address = secure_stack.start_gateway()
    doomed = secure_stack.start_worker("--concurrency", "4", worker_id="doomed")
    client = client_for(address)
    ids = [j.id for j in (await client.stub.SubmitJobs(
        scheduler_pb2.SubmitJobsRequest(jobs=[request("echo", {"n": n}) for n in range(20)]), timeout=10
    )).jobs]  # fmt: skip
    failing = (await client.submit("fail", {"message": "no"}, max_attempts=1)).job.id
    events = await client.wait_results([*ids, failing])
    assert [events[i].state for i in ids] == [job_pb2.JOB_STATE_SUCCEEDED] * 20
    assert events[failing].state == job_pb2.JOB_STATE_FAILED
    # Values over 4 KiB are written beside their script calls and kept apart, with commands of their own.
    large = [request("echo", {"text": "r" * 6000}), request("echo", payload=b"o" * 6000)]
    large_ids = [j.id for j in (await client.stub.SubmitJobs(
        scheduler_pb2.SubmitJobsRequest(jobs=large), timeout=10
    )).jobs]  # fmt: skip
    done = await client.wait_results(large_ids)
    assert value(done[large_ids[0]].result) == {"text": "r" * 6000} and done[large_ids[1]].output == b"o" * 6000

    # Dead letters, a retry, a paused queue and a schedule use commands of their own.
    listed = await client.stub.ListFailedJobs(scheduler_pb2.ListFailedJobsRequest(), timeout=5)
    assert [j.id for j in listed.jobs] == [failing]
    await client.stub.RetryJob(scheduler_pb2.RetryJobRequest(id=failing), timeout=5)
    assert (await client.wait_results([failing]))[failing].state == job_pb2.JOB_STATE_FAILED
    await client.stub.PauseQueue(scheduler_pb2.PauseQueueRequest(), timeout=5)
    await client.stub.ResumeQueue(scheduler_pb2.ResumeQueueRequest(), timeout=5)
    spec = scheduler_pb2.ScheduleSpec(name="s", interval=Duration(seconds=1), job=request("echo"))
    await client.stub.CreateSchedule(scheduler_pb2.CreateScheduleRequest(schedule=spec), timeout=5)

    async def ticked() -> bool:
        got = await client.stub.GetSchedule(scheduler_pb2.GetScheduleRequest(name="s"), timeout=5)
        return len(got.schedule.recent_runs) >= 1

    await eventually(ticked, what="a schedule's first tick")
    assert [s.spec.name for s in (await client.stub.ListSchedules(scheduler_pb2.ListSchedulesRequest())).schedules]
    triggered = await client.stub.TriggerSchedule(scheduler_pb2.TriggerScheduleRequest(name="s"), timeout=5)
    assert triggered.schedule.recent_runs[0].manual
    await client.stub.DeleteSchedule(scheduler_pb2.DeleteScheduleRequest(name="s"), timeout=5)

    # Cancel a running job, then lose a worker mid-job: the job moves to another worker.
    cancelled = (await client.submit("sleep", {"seconds": 30})).job.id
    orphan = (await client.submit("sleep", {"seconds": 1})).job.id

    async def both_running() -> bool:
        jobs = [(await client.stub.GetJob(scheduler_pb2.GetJobRequest(id=i))).job for i in (cancelled, orphan)]
        return all(j.state == job_pb2.JOB_STATE_RUNNING for j in jobs)

    await eventually(both_running, what="two jobs running")
    await client.stub.CancelJob(scheduler_pb2.CancelJobRequest(id=cancelled), timeout=5)
    assert (await client.wait_results([cancelled]))[cancelled].state == job_pb2.JOB_STATE_CANCELLED
    doomed.kill()
    survivor = secure_stack.start_worker(worker_id="survivor")
    event = (await client.wait_results([orphan]))[orphan]
    assert (event.state, event.worker_id) == (job_pb2.JOB_STATE_SUCCEEDED, "survivor")
    workers = await client.stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
    assert [w.id for w in workers.workers] == ["survivor"]
    code = survivor.terminate()
    assert code == 0, survivor.log()
    assert gateway.terminate() == 0, gateway.log()

    assert denials(secure_redis.admin) == []


def test_the_minimal_acl_user_cannot_reach_beyond_its_namespace(secure_redis: SecureRedis) -> None:
    user = redis.Redis.from_url(secure_redis.url("jobgate", PASSWORD))
    try:
        assert user.ping()
        user.set("{secure}:probe", "1")  # its own namespace
        refused = [
            lambda: user.get("{other}:job:1"),
            lambda: user.publish("{other}:results", b"x"),
            lambda: user.keys("*"),
            lambda: list(user.scan_iter()),
            lambda: user.flushall(),
            lambda: user.config_get("*"),
            lambda: user.eval("return 1", 0),
            lambda: user.execute_command("DEBUG", "SLEEP", "0"),
            lambda: user.execute_command("SHUTDOWN"),
        ]
        for call in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
    finally:
        user.close()
    assert {d["reason"] for d in denials(secure_redis.admin)} <= {"command", "key", "channel"}
    assert len(denials(secure_redis.admin)) == len(refused)


def test_the_rules_security_md_prints_are_those_the_acl_command_prints() -> None:
    """SECURITY.md shows the least ACL user for the namespace `jobgate`: it must be what
    ``python -m gateway.acl --namespace jobgate --user jobgate`` prints (it wraps the one line)."""
    doc = (Path(__file__).parent.parent / "docs" / "SECURITY.md").read_text()
    block = doc.split("ACL SETUSER jobgate on ><password>", 1)[1].split("```", 1)[0]
    assert "ACL SETUSER jobgate on ><password> " + " ".join(block.split()) == setuser("jobgate", "jobgate")


def test_acl_cli_prints_rules_for_a_namespace() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.acl", "--namespace", "prod", "--user", "jg"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.startswith("ACL SETUSER jg on >") and "~{prod}:* " in out and "&{prod}:* " in out
    bad = subprocess.run(
        [sys.executable, "-m", "gateway.acl", "--namespace", "no spaces"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0 and "namespace" in bad.stderr


def test_the_acl_grants_every_command_the_lua_scripts_run() -> None:
    """Redis checks commands run inside scripts against the user's rules: a command a script
    starts using must be granted, or every call of that script fails for the ACL user."""
    lua = "".join(p.read_text() for p in (Path(protocol.__file__).parent / "lua").glob("*.lua"))
    used = {name.lower() for name in re.findall(r"redis\.p?call\('([A-Za-z]+)'", lua)}
    assert used and used <= set(COMMANDS), sorted(used - set(COMMANDS))


@pytest.mark.timeout(NPM_TIMEOUT_S + 60)
async def test_the_node_worker_runs_jobs_over_tls_as_the_minimal_acl_user(
    secure_redis: SecureRedis,
    secure_stack: Stack,
    client_for: Callable[[str], Client],
    node: str,
    tmp_path: Path,
) -> None:
    """A worker written from docs/PROTOCOL.md needs no more than the ACL grants."""
    _, address = secure_stack.start_gateway()
    worker = NodeWorker(
        node,
        secure_redis.url("jobgate", PASSWORD),
        NAMESPACE,
        "node-secure",
        tmp_path,
        extra_env={"NODE_EXTRA_CA_CERTS": secure_redis.ca_file},
    )
    try:
        client = client_for(address)
        ok = (await client.submit("node.upper", {"text": "over tls"})).job.id
        failing = (await client.submit("node.fail", {}, max_attempts=1)).job.id
        events = await client.wait_results([ok, failing], timeout=60)
        assert events[ok].state == job_pb2.JOB_STATE_SUCCEEDED, worker.log()
        assert events[failing].state == job_pb2.JOB_STATE_FAILED, worker.log()
    finally:
        worker.kill()
    assert denials(secure_redis.admin) == [], worker.log()
