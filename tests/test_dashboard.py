"""The web dashboard against a real gateway, real workers and a real Redis: its JSON API and event
stream (tokens, a token limited to some queues, read-only mode, refusals of cross-site actions, bad
input), and its pages in headless Chromium (tests/node/dashboard.mjs, with playwright-core), which
keep their screenshots (``make screenshots`` writes them to docs/dashboard/)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.devstack import Stack
from devtools.servers import free_port
from jobgate.v1 import scheduler_pb2
from jobgate_client import Client, JobState, job_request

from .helpers import NODE_DIR, eventually

ADMIN, REPORTER = "admin-token-0123456789", "reports-token-0123456789"
TOKENS = f"admin {ADMIN}; reporter {REPORTER} reports"
JSON = {"Content-Type": "application/json"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start(stack: Stack, **env: str) -> tuple[str, str]:
    """A gateway serving the dashboard, and a worker of the default and reports queues; returns the
    gateway's gRPC address and the dashboard's URL."""
    port = free_port()
    _, address = stack.start_gateway(env={"JOBGATE_DASHBOARD_LISTEN": f"127.0.0.1:{port}", **env})
    stack.start_worker("--queues", "default,reports", "--concurrency", "4", env=env)
    return address, f"http://127.0.0.1:{port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, token: str = "") -> tuple[int, Any]:
    async with http.get(url, headers=bearer(token) if token else {}) as r:
        return r.status, await r.json()


async def post(
    http: aiohttp.ClientSession, url: str, token: str = "", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    sent = {**JSON, **(bearer(token) if token else {})} if headers is None else headers
    async with http.post(url, headers=sent, data="{}") as r:
        return r.status, await r.json()


async def test_the_api_shows_and_changes_what_the_token_may_and_nothing_else(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    address, url = start(stack, JOBGATE_AUTH_TOKENS=TOKENS)
    async with Client(address, token=ADMIN) as admin:
        ok = await admin.submit("echo", {"n": 1})
        failed = await admin.submit("fail", {"why": "on purpose"}, max_attempts=1)
        report = await admin.submit("echo", {"n": 2}, queue="reports")
        await admin.wait([ok.id, failed.id, report.id])
        schedule = scheduler_pb2.ScheduleSpec(
            name="hourly-report", cron="@hourly", job=job_request("echo", queue="reports")
        )
        await admin.create_schedule(schedule)
        cleanup = scheduler_pb2.ScheduleSpec(name="cleanup", cron="@daily", job=job_request("echo"))
        await admin.create_schedule(cleanup)  # of the default queue: not the reporter's

    assert await get(http, f"{url}/api/info") == (200, {"auth": True, "readOnly": False})
    for path in ("/api/overview", f"/api/jobs/{ok.id}", "/api/jobs?queue=default", "/api/schedules"):
        status, body = await get(http, url + path)
        assert status == 401 and body["code"] == "UNAUTHENTICATED", (path, body)
    assert (await get(http, f"{url}/api/overview", "wrong-token-0123456789"))[0] == 401

    status, overview = await get(http, f"{url}/api/overview", ADMIN)
    assert status == 200 and {q["queue"] for q in overview["queues"]} == {"default", "reports"}
    default = next(q for q in overview["queues"] if q["queue"] == "default")
    assert default["succeeded"] == "1" and default["failed"] == "1" and default["workers"] == 1
    assert [w["slots"] for w in overview["workers"]] == [4]

    # a token limited to "reports" sees that queue only, on every page
    status, limited = await get(http, f"{url}/api/overview", REPORTER)
    assert status == 200 and [q["queue"] for q in limited["queues"]] == ["reports"]
    assert limited["workers"][0]["queues"] == ["reports"]  # not the names of queues it may not use
    assert (await get(http, f"{url}/api/jobs?queue=default", REPORTER))[0] == 403
    assert (await get(http, f"{url}/api/jobs/{ok.id}", REPORTER))[0] == 403
    assert (await post(http, f"{url}/api/jobs/{failed.id}/retry", REPORTER))[0] == 403
    assert (await post(http, f"{url}/api/queues/default/pause", REPORTER))[0] == 403
    status, page = await get(http, f"{url}/api/jobs?queue=reports", REPORTER)
    assert status == 200 and [j["id"] for j in page["jobs"]] == [report.id]
    status, schedules = await get(http, f"{url}/api/schedules", REPORTER)
    assert status == 200 and [s["spec"]["name"] for s in schedules["schedules"]] == ["hourly-report"]

    # listings and a job's detail, in the gRPC API's JSON
    status, page = await get(http, f"{url}/api/jobs?queue=default&state=FAILED", ADMIN)
    assert status == 200 and [j["id"] for j in page["jobs"]] == [failed.id]
    status, detail = await get(http, f"{url}/api/jobs/{failed.id}", ADMIN)
    job = detail["job"]
    assert job["state"] == "JOB_STATE_FAILED" and job["error"]["code"] == "HANDLER_ERROR"
    assert job["spec"]["args"] == {"why": "on purpose"} and len(job["attempts"]) == 1
    for bad, field in (("state=NOPE", "state"), ("pageSize=0", "pageSize"), ("pageSize=x", "pageSize")):
        status, body = await get(http, f"{url}/api/jobs?queue=default&{bad}", ADMIN)
        assert status == 400 and body["error"].startswith(f"{field}:"), body
    status, body = await get(http, f"{url}/api/jobs?queue=bad%20queue", ADMIN)
    assert status == 400 and body["error"].startswith("queue:")
    assert (await get(http, f"{url}/api/jobs/{'0' * 32}", ADMIN))[0] == 404
    assert (await get(http, f"{url}/api/jobs/not-an-id", ADMIN))[0] == 400
    assert (await get(http, f"{url}/api/nothing-here", ADMIN))[0] == 404

    # actions; one that a page of another site could send is refused and changes nothing
    for headers in ({**bearer(ADMIN)}, {**bearer(ADMIN), "Content-Type": "text/plain"}):
        status, body = await post(http, f"{url}/api/jobs/{failed.id}/retry", headers=headers)
        assert status == 415, body
    status, body = await post(
        http, f"{url}/api/jobs/{failed.id}/retry", headers={**JSON, **bearer(ADMIN), "Origin": "https://evil.example"}
    )
    assert status == 403 and body["code"] == "CROSS_ORIGIN"
    assert (await get(http, f"{url}/api/jobs/{failed.id}", ADMIN))[1]["job"]["state"] == "JOB_STATE_FAILED"
    status, retried = await post(
        http, f"{url}/api/jobs/{failed.id}/retry", headers={**JSON, **bearer(ADMIN), "Origin": url}
    )
    assert status == 200 and retried["job"]["state"] == "JOB_STATE_QUEUED"
    assert (await post(http, f"{url}/api/jobs/{ok.id}/cancel", ADMIN))[0] == 409  # it has finished

    status, _ = await post(http, f"{url}/api/queues/reports/pause", ADMIN)
    assert status == 200
    status, overview = await get(http, f"{url}/api/overview", ADMIN)
    assert next(q for q in overview["queues"] if q["queue"] == "reports").get("paused") is True
    assert (await post(http, f"{url}/api/queues/reports/resume", REPORTER))[0] == 200

    status, triggered = await post(http, f"{url}/api/schedules/hourly-report/trigger", REPORTER)
    assert status == 200 and triggered["job"]["spec"]["queue"] == "reports"
    assert triggered["schedule"]["recentRuns"][0] == {**triggered["schedule"]["recentRuns"][0], "manual": True}
    assert (await post(http, f"{url}/api/schedules/hourly-report/pause", ADMIN))[1]["schedule"]["paused"] is True
    assert (await post(http, f"{url}/api/schedules/nope/pause", ADMIN))[0] == 404
    assert (await post(http, f"{url}/api/schedules/cleanup/trigger", REPORTER))[0] == 403
    assert not (await get(http, f"{url}/api/schedules/cleanup", ADMIN))[1]["schedule"].get("recentRuns")

    async with http.get(f"{url}/") as r:
        page_html = await r.text()
        assert r.status == 200 and "app.js" in page_html
        assert "default-src 'self'" in r.headers["Content-Security-Policy"] and r.headers["X-Frame-Options"] == "DENY"
    async with http.get(f"{url}/static/app.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
    assert (await get(http, f"{url}/static/..%2Fserver.py"))[0] == 404


async def test_read_only_shows_everything_and_changes_nothing(stack: Stack, http: aiohttp.ClientSession) -> None:
    address, url = start(stack, JOBGATE_DASHBOARD_READ_ONLY="true")
    async with Client(address) as client:
        failed = await client.submit("fail", max_attempts=1)
        await client.wait([failed.id])
        assert await get(http, f"{url}/api/info") == (200, {"auth": False, "readOnly": True})
        assert (await get(http, f"{url}/api/jobs/{failed.id}"))[0] == 200
        # a page is full even when the jobs it asks for are older than what one ListJobs call reads
        await client.wait([j.id for j in await client.submit_many(job_request("echo") for _ in range(30))])
        status, page = await get(http, f"{url}/api/jobs?queue=default&state=FAILED&pageSize=1")
        assert status == 200 and [j["id"] for j in page["jobs"]] == [failed.id], page
        for path in (f"jobs/{failed.id}/retry", "queues/default/pause", "schedules/any/trigger"):
            status, body = await post(http, f"{url}/api/{path}")
            assert status == 403 and body["code"] == "READ_ONLY", (path, body)
        assert (await client.get(failed.id)).state == JobState.FAILED
        assert not (await client.queue_stats(["default"]))[0].paused


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """The server-sent events of a response, as (event, data)."""
    name, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


async def test_the_event_stream_pushes_outcomes_progress_and_overviews_and_ends_on_sigterm(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    address, url = start(stack)
    async with Client(address) as client, http.get(f"{url}/api/events") as stream:
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        seen: list[tuple[str, Any]] = []

        async def read() -> None:
            async for event in events(stream):
                seen.append(event)

        reader = asyncio.create_task(read())
        job = await client.submit("echo", {"live": True})
        got = await eventually(lambda: [d for e, d in seen if e == "job" and d["jobId"] == job.id], what="its outcome")
        assert got[0]["state"] == "JOB_STATE_SUCCEEDED" and got[0]["result"] == {"live": True}
        await eventually(lambda: [d for e, d in seen if e == "overview" and d["queues"]], what="an overview")

        # one job: its progress, its outcome, then the end
        counted = await client.submit("count", {"steps": 5, "seconds": 1})
        async with http.get(f"{url}/api/events?job={counted.id}") as one:
            followed = [event async for event in events(one)]
        names = [e for e, _ in followed]
        assert names[-2:] == ["job", "end"] and followed[-2][1]["state"] == "JOB_STATE_SUCCEEDED"
        assert any("progress" in d for e, d in followed if e == "job"), followed
        assert (await get(http, f"{url}/api/events?job={'0' * 32}"))[0] == 404

        # SIGTERM: the open stream ends and the gateway exits cleanly within its grace
        gateway = stack.gateways[0]
        assert gateway.terminate(timeout_s=20) == 0
        await asyncio.wait_for(reader, timeout=10)


def chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


@pytest.mark.slow
async def test_every_page_in_headless_chromium(node: str, stack: Stack, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (make install installs Debian's where apt-get can)")
    address, url = start(stack, JOBGATE_AUTH_TOKENS=TOKENS)
    async with Client(address, token=ADMIN) as client:
        jobs = [await client.submit("echo", {"n": n}, queue="reports" if n % 4 == 0 else "default") for n in range(40)]
        failed = await client.submit("fail", {"why": "the disk is full"}, max_attempts=1)
        waiting = await client.submit("echo", {"later": True}, delay=3600)
        await client.wait([failed.id, *(j.id for j in jobs)])  # 30 succeeded in default: two pages
        schedule = scheduler_pb2.ScheduleSpec(
            name="nightly-report", cron="0 3 * * *", job=job_request("echo", queue="reports")
        )
        await client.create_schedule(schedule)
    shots = Path(os.environ.get("JOBGATE_SCREENSHOTS", "") or tmp_path)
    await asyncio.to_thread(shots.mkdir, parents=True, exist_ok=True)
    done = await asyncio.to_thread(
        subprocess.run,
        [node, str(NODE_DIR / "dashboard.mjs")],
        capture_output=True,
        text=True,
        timeout=180,
        env={
            **os.environ,
            "CHROMIUM": browser,
            "DASHBOARD_URL": url,
            "GATEWAY": address,
            "TOKEN": ADMIN,
            "FAILED_JOB": failed.id,
            "WAITING_JOB": waiting.id,
            "SCHEDULE": "nightly-report",
            "SCREENSHOTS": str(shots),
        },
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    for name in ("overview", "workers", "jobs-failed", "job", "schedules"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
    async with Client(address, token=ADMIN) as client:
        retried = await client.get(failed.id)
        assert len(retried.attempts) == 2  # the page's Retry ran it again
        assert (await client.get(waiting.id)).state == JobState.CANCELLED  # the page's Cancel
        assert (await client.get_schedule("nightly-report")).recent_runs[0].manual  # the page's Run now
