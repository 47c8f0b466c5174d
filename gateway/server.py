"""Builds the gateway: Redis client, store, scheduler, hub, and the grpc.aio server with health
and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis

from common import tracing
from common.metrics import serve
from dashboard.server import Certificates, Dashboard, DashboardMetrics
from jobgate.v1 import scheduler_pb2, scheduler_pb2_grpc
from protocol.calls import Durability
from protocol.connection import bounded, longest_call_s, redis_client
from protocol.gateway_calls import GatewayCalls
from protocol.keys import Keys
from protocol.schedule_calls import ScheduleCalls

from .auth import Authenticator, AuthInterceptor, load_tokens
from .batches import BatchCallbacks
from .config import GatewaySettings
from .handlers import MalformedRequestInterceptor
from .hub import Hub
from .metrics import GatewayMetrics
from .reflection import CommentedPool
from .scheduler import Scheduler
from .schedules import ScheduleRunner
from .service import SchedulerService
from .tls import CertificateFiles

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


@dataclass
class Gateway:
    """A running gateway: its server and background tasks."""

    settings: GatewaySettings
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    redis: Redis
    hub: Hub
    scheduler: Scheduler
    port: int
    stop_event: asyncio.Event
    tasks: list[asyncio.Task[None]]
    service: SchedulerService
    authenticator: Authenticator | None = None
    metrics_server: Any | None = None
    dashboard: Dashboard | None = None
    private_dir: str = ""  # holds the unix socket the dashboard calls the gateway through

    def reload_tokens(self) -> None:
        """Reads the token settings again (SIGHUP): the file's current entries replace the old ones.
        A file that cannot be read or holds a bad entry changes nothing (logged)."""
        if self.authenticator is None:
            log.warning("tokens not reloaded: authentication is off (turning it on needs a restart)")
            return
        try:
            tokens = load_tokens(self.settings.auth_tokens, self.settings.auth_tokens_file)
        except ValueError as exc:
            log.error("tokens not reloaded, the previous ones stay in force: %s", exc)
            return
        self.authenticator.replace(tokens)
        log.info("tokens reloaded: %d token(s): %s", len(tokens), ", ".join(t.name for t in tokens))

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, then ``server.stop(grace)``, then background tasks and Redis.

        Streams end at once with UNAVAILABLE, so that their clients resume on another gateway now
        rather than be cut with CANCELLED when the grace period is over; unary calls get the grace.
        """
        grace = self.settings.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.dashboard is not None:
            await self.dashboard.stop()
        self.service.close_streams()
        # Let the streams send their status before the server itself stops: a stream still writing
        # when it does can reach its client as CANCELLED instead.
        loop = asyncio.get_running_loop()
        began = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.service.admission.closed.wait(), timeout=grace / 2)
            await asyncio.sleep(min(0.25, grace / 4))  # their final statuses leave the process
        await self.server.stop(max(0.0, grace - (loop.time() - began)))
        self.stop_event.set()
        for task in self.tasks:
            try:
                await asyncio.wait_for(task, timeout=5)
            except (TimeoutError, asyncio.CancelledError):
                pass
        await bounded(self.redis.aclose(), self.settings.redis_timeout_s, "closing Redis connections")
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)


async def start(settings: GatewaySettings) -> Gateway:
    """Starts the gateway and returns it; the server is listening when this returns."""
    if settings.tracing:
        tracing.setup("jobgate-gateway")
    keys = Keys(settings.namespace, settings.redis_shards)
    redis = redis_client(settings.redis_url, settings.redis_timeout_s)
    store = GatewayCalls(
        redis,
        keys,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        max_queues=settings.max_queues,
        max_kinds=settings.max_kinds,
        ack_timeout_ms=settings.ack_timeout_ms,
        durability=Durability(settings.redis_wait_replicas, settings.redis_wait_timeout_ms),
    )
    metrics = GatewayMetrics()
    scheduler = Scheduler(
        store,
        tick_s=settings.tick_ms / 1000,
        step_s=longest_call_s(settings.redis_timeout_s, settings.redis_wait_timeout_ms),
        metrics=metrics,
    )
    hub = Hub(
        redis,
        keys,
        store,
        on_slot_freed=scheduler.slot_freed,
        on_worker_change=scheduler.kick_all,
        on_due=scheduler.due_at,
        metrics=metrics,
    )
    limits = settings.limits()
    schedules = ScheduleCalls(redis, keys, store.durability)
    scheduler.every_tick += [
        ScheduleRunner(schedules, store, limits, scheduler, metrics).fire_due,
        BatchCallbacks(store, limits, scheduler).submit_ended,
    ]
    service = SchedulerService(
        store,
        scheduler,
        hub,
        limits,
        stream_buffer=settings.stream_buffer,
        reconcile_s=settings.reconcile_ms / 1000,
        max_streams=settings.max_streams,
        max_message_bytes=settings.max_message_bytes,
        metrics=metrics,
        schedules=schedules,
        tracing=settings.tracing,
    )

    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # The gateway pings idle connections (so long-idle WatchResults streams stay up through
        # proxies and dead clients are noticed) and refuses clients that ping more often than
        # min_ping_interval_ms: after max_ping_strikes such pings it closes the connection.
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
        # Calls that arrive faster than the event loop takes them wait in gRPC's core, which by
        # default cancels them beyond 1,000 waiting (3,000 at once): thousands of streams opened
        # together (clients reconnecting after a restart) would be cut with CANCELLED. max_streams
        # already bounds the streams; unary calls the gateway takes as fast as they come.
        ("grpc.server.max_pending_requests", max(1000, settings.max_streams)),
        ("grpc.server.max_pending_requests_hard_limit", max(3000, 3 * settings.max_streams)),
    ]
    if settings.processes > 1:  # several processes on one address: the kernel spreads connections over them
        options.append(("grpc.so_reuseport", 1))
    interceptors: list[grpc.aio.ServerInterceptor] = []
    authenticator = None
    if settings.auth_enabled:
        tokens = load_tokens(settings.auth_tokens, settings.auth_tokens_file)
        denied = metrics.denied.labels("UNAUTHENTICATED")
        authenticator = Authenticator(tokens)
        interceptors.append(AuthInterceptor(authenticator, on_denied=lambda method: denied.inc()))
        log.info("authentication on: %d token(s): %s", len(tokens), ", ".join(t.name for t in tokens))
    interceptors.append(MalformedRequestInterceptor())  # after authentication: strangers' bytes are never parsed
    server = grpc.aio.server(options=options, interceptors=interceptors)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
        pool=CommentedPool(),
    )
    port = (
        server.add_secure_port(settings.listen, CertificateFiles(settings).credentials())
        if settings.tls_enabled
        else server.add_insecure_port(settings.listen)
    )
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    private_dir = tempfile.mkdtemp(prefix="jobgate-gateway-") if settings.dashboard_listen else ""  # mode 0700
    private_target = f"unix:{private_dir}/grpc.sock"  # the dashboard's way in
    if private_dir and not server.add_insecure_port(private_target):
        raise OSError(f"cannot listen on a unix socket in {private_dir}")
    await server.start()
    metrics_server = serve(settings.metrics_listen, metrics.registry) if settings.metrics_listen else None
    dashboard = None
    if settings.dashboard_listen:
        dashboard = Dashboard(
            private_target,
            read_only=settings.dashboard_read_only,
            auth=settings.auth_enabled,
            metrics=DashboardMetrics(metrics.registry),
        )
        tls = (
            Certificates(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            if settings.tls_enabled
            else None
        )
        try:
            await dashboard.start(
                settings.dashboard_listen, tls, grace_s=settings.grace_s, reuse_port=settings.processes > 1
            )
        except OSError:
            await dashboard.stop()
            await server.stop(0)
            shutil.rmtree(private_dir, ignore_errors=True)
            raise

    stop_event = asyncio.Event()
    tasks = [
        asyncio.create_task(hub.run(stop_event), name="hub"),
        asyncio.create_task(service.follower.run(stop_event), name="quiet streams"),
        asyncio.create_task(scheduler.run(stop_event), name="scheduler"),
        asyncio.create_task(_health_loop(redis, health_servicer, metrics, stop_event), name="health"),
    ]
    log.info(
        "gateway listening on %s (port %d, %s)",
        settings.listen,
        port,
        ("mutual TLS" if settings.tls_client_ca_file else "TLS") if settings.tls_enabled else "plaintext",
    )
    return Gateway(
        settings,
        server,
        health_servicer,
        redis,
        hub,
        scheduler,
        port,
        stop_event,
        tasks,
        service,
        authenticator,
        metrics_server,
        dashboard,
        private_dir,
    )


async def _health_loop(
    redis: Redis, servicer: health.aio.HealthServicer, metrics: GatewayMetrics, stop: asyncio.Event
) -> None:
    """SERVING while Redis answers PING, NOT_SERVING while it does not."""
    serving: bool | None = None
    while not stop.is_set():
        try:
            ok = bool(await asyncio.wait_for(redis.ping(), timeout=2))
        except Exception:  # noqa: BLE001 - any failure means "not serving"
            ok = False
        metrics.redis_up.set(1 if ok else 0)
        if ok != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await servicer.set(name, status)
            if serving is not None:
                (log.info if ok else log.warning)("Redis is %s", "reachable" if ok else "unreachable")
            serving = ok
        try:
            await asyncio.wait_for(stop.wait(), timeout=1)
        except TimeoutError:
            pass
