"""OpenTelemetry tracing, optional (``pip install 'jobgate[otel]'``; the ``tracing`` setting).

With tracing on, a gateway continues the trace of each submitting call (its ``traceparent``
metadata) with a ``jobgate submit`` span and stores that span's context in the job
(``JobSpec.trace_context``); the worker that runs the job continues it with a ``jobgate wait`` span
(from the submit to the start) and a ``jobgate run <kind>`` span (the attempt, with its outcome).
So one trace shows the caller, the submit, the wait, the run and the outcome.

Spans go to the process's global tracer provider: one set up by the application, or else one made
here from the standard ``OTEL_*`` variables, exporting with OTLP over HTTP
(``OTEL_EXPORTER_OTLP_ENDPOINT``, default ``http://localhost:4318``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SUBMITTED = "jobgate-submitted-ns"  # the trace_context entry: when the submit began (ns since the epoch)

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # the otel extra is not installed
    trace = None  # type: ignore[assignment]


def available() -> bool:
    """Whether the OpenTelemetry API is installed."""
    return trace is not None


def setup(service_name: str) -> None:
    """Makes spans go somewhere: keeps a tracer provider the application set, or sets one that
    exports with OTLP/HTTP when the exporter is installed. Raises RuntimeError without the API."""
    if trace is None:
        raise RuntimeError("tracing needs OpenTelemetry: pip install 'jobgate[otel]'")
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # the application configured one
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing is on, but the OpenTelemetry SDK or OTLP exporter is missing: spans go nowhere")
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def _tracer() -> Any:
    return trace.get_tracer("jobgate")


@contextmanager
def submit_span(metadata: Any, name: str, attributes: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """A ``jobgate submit`` span, child of the caller's context in gRPC ``metadata``; yields the
    trace context to store in the submitted jobs (JobSpec.trace_context)."""
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    parent = propagate.extract(carrier)
    with _tracer().start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes):
        out: dict[str, str] = {SUBMITTED: str(time.time_ns())}
        propagate.inject(out)
        yield out


@contextmanager
def run_span(carried: Mapping[str, str], kind: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
    """A ``jobgate wait`` span (from the submit to now) and a ``jobgate run <kind>`` span around the
    attempt, both children of the submit span ``carried`` names; yields the run span."""
    parent = propagate.extract(dict(carried))
    tracer = _tracer()
    now_ns = time.time_ns()
    submitted = carried.get(SUBMITTED, "")
    if submitted.isdigit():
        wait = tracer.start_span(
            "jobgate wait", context=parent, start_time=min(int(submitted), now_ns), attributes=attributes
        )
        wait.end(end_time=now_ns)
    token = otel_context.attach(parent)
    try:
        with tracer.start_as_current_span(
            f"jobgate run {kind}", kind=trace.SpanKind.CONSUMER, attributes=attributes, record_exception=False
        ) as span:
            yield span
    finally:
        otel_context.detach(token)


def end_run(span: Any, state: str, error_code: str = "", error_message: str = "") -> None:
    """Records an attempt's outcome on its run span."""
    span.set_attribute("jobgate.outcome", state)
    if error_code:
        span.set_attribute("jobgate.error_code", error_code)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{error_code}: {error_message}"[:256]))


def inject(metadata: MutableMapping[str, str]) -> None:
    """Adds the current trace context to outgoing call metadata (a no-op without the API)."""
    if trace is not None:
        propagate.inject(metadata)
