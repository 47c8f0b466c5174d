"""The web dashboard: an HTTP server inside the gateway process that serves a single-page app and a
JSON API over the gateway's own gRPC service.

Every API call is a gRPC call to this gateway (through a private unix socket) carrying the
browser's ``Authorization`` header, so a page sees exactly what the browser's token may see, with
the gRPC API's validation and errors. Live updates are server-sent events: the outcomes of a
WatchResults stream (the gateway's hub, not Redis) and an overview (queue stats and workers) that
is read at most once per ``OVERVIEW_TTL_S`` per token, however many browsers show it.

JSON bodies are the proto3 JSON mapping of the RPCs' messages (the field names grpcurl prints).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any, cast

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge

from common.settings import FileStamp, file_stamps
from jobgate.v1 import job_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

S = scheduler_pb2
RPC_TIMEOUT_S = 10.0
OVERVIEW_TTL_S = 2.0  # how long one read of queue stats and workers serves every browser of a token
CERT_CHECK_S = 5.0  # how often the TLS files are checked for a renewal
PING_S = 10.0  # a comment on an event stream this often, so proxies and the browser keep it open
MAX_SCHEDULES = 1000  # schedules one page of the dashboard lists
MAX_PAGE = 200  # jobs per page of a listing
PAGE_CALLS = 10  # ListJobs calls that one page of a listing may take
STATIC = ("index.html", "app.js", "style.css", "favicon.svg")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self';"
        " frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
Metadata = tuple[tuple[str, str], ...]


class ApiError(Exception):
    """An error the API answers with ``status`` and ``{"error": message, "code": code}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @property
    def body(self) -> dict[str, str]:
        """The JSON an answer or an ``error`` event carries."""
        return {"error": self.message, "code": self.code}

    @classmethod
    def of(cls, err: grpc.aio.AioRpcError) -> ApiError:
        return cls(HTTP_STATUS.get(err.code(), 500), err.code().name, err.details() or err.code().name)


def as_json(message: Message) -> dict[str, Any]:
    """A message in the proto3 JSON mapping (camelCase names, enums by name, int64 as strings)."""
    return json_format.MessageToDict(message)


def state_names(values: list[str]) -> list[job_pb2.JobState]:
    """Job states by name (``FAILED`` or ``JOB_STATE_FAILED``). Raises ApiError for an unknown one."""
    out: list[job_pb2.JobState] = []
    for value in values:
        name = value.upper()
        name = name if name.startswith("JOB_STATE_") else "JOB_STATE_" + name
        if name == "JOB_STATE_UNSPECIFIED" or name not in job_pb2.JobState.keys():
            raise ApiError(400, "INVALID_ARGUMENT", f"state: unknown job state {value!r}")
        out.append(cast(job_pb2.JobState, job_pb2.JobState.Value(name)))
    return out


def int_param(request: web.Request, name: str, default: int, most: int) -> int:
    value = request.query.get(name, "")
    if not value:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise ApiError(400, "INVALID_ARGUMENT", f"{name}: a whole number from 1 to {most}")
    return int(value)


class DashboardMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "jobgate_dashboard_requests", "dashboard API requests, by HTTP status", ["status"], registry=registry
        )
        self.streams = Gauge("jobgate_dashboard_event_streams", "open dashboard event streams", registry=registry)


class Dashboard:
    """The dashboard's HTTP application, calling the gateway at ``target`` (a gRPC address)."""

    def __init__(
        self,
        target: str,
        *,
        read_only: bool = False,
        auth: bool = False,
        metrics: DashboardMetrics | None = None,
    ) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)
        self.read_only = read_only
        self.auth = auth
        self.metrics = metrics or DashboardMetrics()
        self.closing = asyncio.Event()
        self._overviews: dict[str, tuple[float, asyncio.Future[dict[str, Any]]]] = {}
        self.app = web.Application(middlewares=[self._guard])
        self.runner: web.AppRunner | None = None
        self._reloader: asyncio.Task[None] | None = None
        self.port = 0
        r = self.app.router
        r.add_get("/", self._page)
        r.add_get("/static/{name}", self._static)
        r.add_get("/api/info", self._info)
        r.add_get("/api/overview", self._overview)
        r.add_get("/api/events", self._events)
        r.add_get("/api/jobs", self._list_jobs)
        r.add_get("/api/jobs/{id}", self._get_job)
        r.add_post("/api/jobs/{id}/{action:cancel|retry}", self._job_action)
        r.add_post("/api/queues/{queue}/{action:pause|resume}", self._queue_action)
        r.add_get("/api/schedules", self._list_schedules)
        r.add_get("/api/schedules/{name}", self._get_schedule)
        r.add_post("/api/schedules/{name}/{action:pause|resume|trigger}", self._schedule_action)

    # --- lifecycle --------------------------------------------------------------------------
    async def start(
        self, listen: str, tls: Certificates | None = None, grace_s: float = 5.0, reuse_port: bool = False
    ) -> int:
        """Serves on ``host:port`` (HTTPS with ``tls``; sharing the port with the other gateway
        processes with ``reuse_port``); returns the port. Raises OSError when it cannot listen."""
        ssl_context = tls.context if tls is not None else None
        if tls is not None:
            self._reloader = asyncio.create_task(tls.follow(self.closing), name="dashboard-certificates")
        host, _, port = listen.rpartition(":")
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=grace_s)
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, host.strip("[]"), int(port), ssl_context=ssl_context, reuse_port=reuse_port or None
        )
        await site.start()
        addresses = self.runner.addresses
        self.port = int(addresses[0][1]) if addresses else int(port)
        log.info("dashboard on %s://%s:%d/", "https" if ssl_context else "http", host or "0.0.0.0", self.port)
        return self.port

    async def stop(self) -> None:
        """Ends the event streams, stops serving and closes the channel."""
        self.closing.set()
        if self._reloader is not None:
            self._reloader.cancel()
            await asyncio.gather(self._reloader, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()
        await self.channel.close(grace=None)

    # --- plumbing ---------------------------------------------------------------------------
    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Security headers on every answer; refuses state changes that a page of another site
        could have sent, and every state change in read-only mode; maps errors to JSON."""
        try:
            if request.method == "POST":
                self._check_post(request)
            response = await handler(request)
        except ApiError as exc:
            response = web.json_response(exc.body, status=exc.status)
        except grpc.aio.AioRpcError as err:
            mapped = ApiError.of(err)
            response = web.json_response(mapped.body, status=mapped.status)
        except web.HTTPException as http:  # no such route or method
            response = web.json_response(ApiError(http.status, "HTTP", http.reason).body, status=http.status)
        if request.path.startswith("/api/"):
            self.metrics.requests.labels(str(response.status)).inc()
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _check_post(self, request: web.Request) -> None:
        if self.read_only:
            raise ApiError(403, "READ_ONLY", "the dashboard is read-only (dashboard_read_only)")
        # A cross-site form or simple fetch cannot send this content type without a CORS preflight,
        # which is never granted: actions come only from the dashboard's own pages.
        if request.content_type != "application/json":
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "actions take Content-Type: application/json")
        origin = request.headers.get("Origin")
        if origin and origin != f"{request.scheme}://{request.host}":
            raise ApiError(403, "CROSS_ORIGIN", f"origin {origin!r} may not act on this dashboard")

    def _meta(self, request: web.Request) -> Metadata:
        """The browser's Authorization header, passed on to the gRPC call (nothing when auth is off)."""
        auth = request.headers.get("Authorization", "")
        return (("authorization", auth),) if self.auth and auth else ()

    async def _call(self, rpc: Callable[..., Awaitable[Any]], req: Message, meta: Metadata) -> Any:
        return await rpc(req, timeout=RPC_TIMEOUT_S, metadata=meta)

    # --- pages --------------------------------------------------------------------------------
    async def _page(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise ApiError(404, "NOT_FOUND", f"no file {name!r}")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        kinds = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
        return web.Response(body=static_file(name), content_type=kinds[name.rsplit(".", 1)[1]], charset="utf-8")

    # --- reads --------------------------------------------------------------------------------
    async def _info(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"auth": self.auth, "readOnly": self.read_only})

    async def _overview(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.overview(self._meta(request)))

    async def overview(self, meta: Metadata) -> dict[str, Any]:
        """Queue stats and workers as the token sees them; one read per token per OVERVIEW_TTL_S
        (concurrent askers share the read in flight)."""
        key = hashlib.sha256(repr(meta).encode()).hexdigest()
        now = asyncio.get_running_loop().time()
        for k in [k for k, (at, _) in self._overviews.items() if now - at > OVERVIEW_TTL_S]:
            del self._overviews[k]
        if key not in self._overviews:
            self._overviews[key] = (now, asyncio.ensure_future(self._read_overview(meta)))
        _, future = self._overviews[key]
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._overviews.get(key, (0, None))[1] is future:
                del self._overviews[key]  # an error is not kept: the next asker tries again
            raise

    async def _read_overview(self, meta: Metadata) -> dict[str, Any]:
        stats, workers = await asyncio.gather(
            self._call(self.stub.GetQueueStats, S.GetQueueStatsRequest(), meta),
            self._call(self.stub.ListWorkers, S.ListWorkersRequest(), meta),
        )
        return {
            "time": datetime.now(UTC).isoformat(),
            "queues": [as_json(q) for q in stats.queues],
            "workers": [as_json(w) for w in workers.workers],
        }

    async def _list_jobs(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        req = S.ListJobsRequest(
            queue=q.get("queue", "default"),
            kind=q.get("kind", ""),
            page_size=int_param(request, "pageSize", 50, MAX_PAGE),
            page_token=q.get("pageToken", ""),
        )
        req.states.extend(state_names([s for v in q.getall("state", []) for s in v.split(",") if s]))
        # ListJobs reads a bounded stretch of the queue per call, so a narrow filter can give short
        # pages: ask again for what is missing (at most PAGE_CALLS calls), so that a page is full
        # whenever the queue holds enough matching jobs near it.
        meta, wanted = self._meta(request), req.page_size
        reply = await self._call(self.stub.ListJobs, req, meta)
        jobs, calls = list(reply.jobs), 1
        while len(jobs) < wanted and reply.next_page_token and calls < PAGE_CALLS:
            req.page_token, req.page_size = reply.next_page_token, wanted - len(jobs)
            reply = await self._call(self.stub.ListJobs, req, meta)
            jobs += reply.jobs
            calls += 1
        out = S.ListJobsResponse(jobs=jobs, next_page_token=reply.next_page_token)
        return web.json_response(as_json(out))

    async def _get_job(self, request: web.Request) -> web.StreamResponse:
        req = S.GetJobRequest(id=request.match_info["id"])
        return web.json_response(as_json(await self._call(self.stub.GetJob, req, self._meta(request))))

    async def _list_schedules(self, request: web.Request) -> web.StreamResponse:
        out: list[dict[str, Any]] = []
        token, meta = "", self._meta(request)
        while len(out) < MAX_SCHEDULES:
            page = await self._call(self.stub.ListSchedules, S.ListSchedulesRequest(page_token=token), meta)
            out += [as_json(s) for s in page.schedules]
            token = page.next_page_token
            if not token:
                break
        return web.json_response({"schedules": out[:MAX_SCHEDULES], "more": bool(token)})

    async def _get_schedule(self, request: web.Request) -> web.StreamResponse:
        req = S.GetScheduleRequest(name=request.match_info["name"])
        return web.json_response(as_json(await self._call(self.stub.GetSchedule, req, self._meta(request))))

    # --- actions ------------------------------------------------------------------------------
    async def _job_action(self, request: web.Request) -> web.StreamResponse:
        job_id, action = request.match_info["id"], request.match_info["action"]
        meta = self._meta(request)
        if action == "cancel":
            reply = await self._call(self.stub.CancelJob, S.CancelJobRequest(id=job_id), meta)
        else:
            reply = await self._call(self.stub.RetryJob, S.RetryJobRequest(id=job_id), meta)
        log.info("dashboard: %s of job %s", action, job_id)
        return web.json_response(as_json(reply))

    async def _queue_action(self, request: web.Request) -> web.StreamResponse:
        queue, action = request.match_info["queue"], request.match_info["action"]
        meta = self._meta(request)
        if action == "pause":
            reply = await self._call(self.stub.PauseQueue, S.PauseQueueRequest(queue=queue), meta)
        else:
            reply = await self._call(self.stub.ResumeQueue, S.ResumeQueueRequest(queue=queue), meta)
        self._overviews.clear()  # the next overview shows it
        log.info("dashboard: %s of queue %s", action, queue)
        return web.json_response(as_json(reply))

    async def _schedule_action(self, request: web.Request) -> web.StreamResponse:
        name, action = request.match_info["name"], request.match_info["action"]
        meta = self._meta(request)
        reply: Message
        if action == "pause":
            reply = await self._call(self.stub.PauseSchedule, S.PauseScheduleRequest(name=name), meta)
        elif action == "resume":
            reply = await self._call(self.stub.ResumeSchedule, S.ResumeScheduleRequest(name=name), meta)
        else:
            body = await request.json() if request.can_read_body else {}
            request_id = str(body.get("requestId", "")) if isinstance(body, dict) else ""
            req = S.TriggerScheduleRequest(name=name, request_id=request_id)
            reply = await self._call(self.stub.TriggerSchedule, req, meta)
        log.info("dashboard: %s of schedule %s", action, name)
        return web.json_response(as_json(reply))

    # --- live updates -------------------------------------------------------------------------
    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``job`` (an outcome, or with ``?job=<id>`` that job's progress and
        outcome), ``overview`` every OVERVIEW_TTL_S (not with ``?job=``), ``end`` when a followed
        job has ended, ``error`` when the gateway ends the stream. Errors before the first event
        are plain JSON answers with their HTTP status."""
        meta = self._meta(request)
        job_id = request.query.get("job", "")
        if job_id:  # NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED as a status, before streaming
            await self._call(self.stub.GetJob, S.GetJobRequest(id=job_id), meta)
        else:
            await self.overview(meta)
        watch = S.WatchResultsRequest(job_ids=[job_id] if job_id else [], include_progress=bool(job_id), max_batch=100)
        call = self.stub.WatchResults(watch, metadata=meta)
        response = web.StreamResponse(
            headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        self.metrics.streams.inc()
        lock = asyncio.Lock()

        async def write(text: str) -> None:
            async with lock:  # the pumps write whole events, never into each other's
                await response.write(text.encode())

        async def send(event: str, data: Any) -> None:
            await write(f"event: {event}\ndata: {json.dumps(data)}\n\n")

        side = _ping(write) if job_id else self._pump_overview(meta, send)
        tasks = [
            asyncio.create_task(self._pump_events(call, send, bool(job_id))),
            asyncio.create_task(side),
            asyncio.create_task(self.closing.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.streams.dec()
        return response

    async def _pump_events(self, call: Any, send: Callable[[str, Any], Awaitable[None]], one_job: bool) -> None:
        try:
            async for reply in call:
                for event in [*reply.events] or [reply.event]:
                    await send("job", as_json(event))
            if one_job:
                await send("end", {})
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                exc = ApiError.of(err)
                with contextlib.suppress(ConnectionError):
                    await send("error", exc.body)
        except ConnectionError:
            pass  # the browser went away

    async def _pump_overview(self, meta: Metadata, send: Callable[[str, Any], Awaitable[None]]) -> None:
        try:
            while True:
                try:
                    await send("overview", await self.overview(meta))
                except grpc.aio.AioRpcError as err:
                    await send("error", ApiError.of(err).body)
                await asyncio.sleep(OVERVIEW_TTL_S)
        except ConnectionError:
            pass  # the browser went away


async def _ping(write: Callable[[str], Awaitable[None]]) -> None:
    """A comment every PING_S on a stream that has no overviews, so that proxies keep it open."""
    try:
        while True:
            await write(": ping\n\n")
            await asyncio.sleep(PING_S)
    except ConnectionError:
        pass  # the browser went away


@functools.cache
def static_file(name: str) -> bytes:
    """One of the pages' files (read once: they do not change while the gateway runs)."""
    return resources.files("dashboard.static").joinpath(name).read_bytes()


class Certificates:
    """The dashboard's HTTPS context, from the gateway's TLS files; :meth:`follow` loads them again
    into the same context when they change, so new connections get a renewed certificate."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.files = (cert_file, key_file, client_ca_file)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load()
        if client_ca_file:
            self.context.verify_mode = ssl.CERT_REQUIRED
        self._stamp = self._stat()

    def _load(self) -> None:
        cert_file, key_file, client_ca_file = self.files
        self.context.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            self.context.load_verify_locations(client_ca_file)

    def _stat(self) -> tuple[FileStamp, ...]:
        return file_stamps(*self.files)

    async def follow(self, stop: asyncio.Event, every_s: float = CERT_CHECK_S) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every_s)
            stamp = self._stat()
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                # a pair that does not match raises before the context changes
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(*self.files[:2])
                self._load()
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.error("dashboard: TLS files changed but cannot be used (%s); serving the previous ones", exc)
                continue
            log.info("dashboard: TLS files changed: serving the new certificate to new connections")
