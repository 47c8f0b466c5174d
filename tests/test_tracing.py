"""OpenTelemetry: one trace from the caller through the gateway's submit to the worker's wait and
run, with the outcome. The gateway and the worker run in this process (their real code, against
the test's Redis), so that the SDK's in-memory exporter sees the spans of both."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from devtools.servers import free_port
from gateway.config import GatewaySettings
from gateway.server import start
from jobgate_client import Client, JobState
from worker import Worker
from worker.config import WorkerSettings

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider, exporting to memory (it can be set once per process)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    yield EXPORTER
    provider.shutdown()


async def test_one_trace_shows_the_submit_the_wait_the_run_and_the_outcome(
    spans: InMemorySpanExporter, redis_url: str, namespace: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {"JOBGATE_REDIS_URL": redis_url, "JOBGATE_NAMESPACE": namespace, "JOBGATE_TRACING": "1"}
    gateway = await start(GatewaySettings.from_env({**env, "JOBGATE_LISTEN": address}))
    worker = Worker()
    running = asyncio.ensure_future(worker.run(WorkerSettings.from_env(env)))
    spans.clear()
    try:
        async with Client(address) as client:
            with trace.get_tracer("test").start_as_current_span("caller") as caller:
                ok = await client.submit("echo", {"traced": True})
                bad = await client.submit("fail", {"message": "on purpose"}, max_attempts=1)
            done = await client.wait([ok.id, bad.id])
            untraced = await client.submit("echo")  # outside any span: a trace of its own
            await client.wait([untraced.id])
    finally:
        worker.stop()
        await asyncio.wait_for(running, timeout=30)
        await gateway.stop()
    assert done[ok.id].state is JobState.SUCCEEDED and done[bad.id].state is JobState.FAILED

    def named(name: str, job_id: str) -> ReadableSpan:
        found = [s for s in spans.get_finished_spans() if s.name == name and s.attributes["jobgate.job_id"] == job_id]
        assert len(found) == 1, (name, [s.name for s in spans.get_finished_spans()])
        return found[0]

    trace_id = caller.get_span_context().trace_id
    for job_id, kind, outcome in ((ok.id, "echo", "SUCCEEDED"), (bad.id, "fail", "FAILED")):
        submit, wait, run = (named(n, job_id) for n in ("jobgate submit", "jobgate wait", f"jobgate run {kind}"))
        assert {s.context.trace_id for s in (submit, wait, run)} == {trace_id}  # one trace with the caller's
        assert submit.parent is not None and submit.parent.span_id == caller.get_span_context().span_id
        assert wait.parent is not None and run.parent is not None
        assert wait.parent.span_id == run.parent.span_id == submit.context.span_id
        assert submit.start_time <= wait.start_time < wait.end_time <= run.start_time < run.end_time
        assert run.attributes["jobgate.outcome"] == outcome and run.attributes["jobgate.attempt"] == 1
    failed_run = named("jobgate run fail", bad.id)
    assert failed_run.status.status_code is trace.StatusCode.ERROR and "HANDLER_ERROR" in str(
        failed_run.status.description
    )
    assert named("jobgate submit", untraced.id).context.trace_id != trace_id
