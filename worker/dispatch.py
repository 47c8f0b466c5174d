"""A worker's dispatch channel: the subscription, and each message routed to the executor.

The first heartbeat registers the worker (taking nothing) before it subscribes, so every dispatch
it hears was placed on its own registration; the heartbeat that takes it onto placement comes only
once the subscription stands, so nothing is dispatched to a worker that cannot hear it. redis-py
resubscribes a dropped connection by itself, and the gateways hear of it (dispatches in the gap
were taken back by them).
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError

from jobgate.v1 import relay_pb2
from protocol.connection import subscription
from protocol.errors import REDIS_ERRORS
from protocol.worker_calls import WorkerCalls

from .execution import Executor
from .membership import Membership

log = logging.getLogger(__name__)


class DispatchListener:
    """Follows one worker's dispatch channels (one per shard it serves) until cancelled."""

    def __init__(self, calls: WorkerCalls, membership: Membership, executor: Executor) -> None:
        self.calls = calls
        self.membership = membership
        self.executor = executor

    async def listen_loop(self) -> None:
        m = self.membership
        keys = self.calls.keys
        channels = [keys.at(shard).dispatch_channel(m.id) for shard in m.shards]  # one per shard it serves
        while True:
            try:
                if not m.registered:  # registered (taking nothing) before any dispatch can arrive
                    await m.beat()
                async with subscription(self.calls.redis, channels, self._resubscribed) as ps:
                    m.subscribed = True
                    await m.beat()
                    await m.status(relay_pb2.WorkerStatus.CHANGE_JOINED)
                    log.info("subscribed to %s", ", ".join(channels))
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None and isinstance(msg.get("data"), bytes):
                            self.on_message(msg["data"])
            except Exception as exc:  # the subscription must outlive any failure
                if not isinstance(exc, REDIS_ERRORS):
                    log.exception("dispatch handling failed; resubscribing")
                elif m.subscribed:
                    log.warning("dispatch subscription lost (%s); resubscribing", exc)
                m.subscribed = False
                await asyncio.sleep(0.5)
            finally:
                m.subscribed = False

    async def _resubscribed(self, connection: object) -> None:
        """redis-py re-established a dropped dispatch subscription by itself: say so, and let the
        gateways know this worker takes jobs (dispatches in the gap were taken back)."""
        log.warning("dispatch subscription re-established after a dropped connection")
        await self.membership.status(relay_pb2.WorkerStatus.CHANGE_JOINED)

    def on_message(self, data: bytes) -> None:
        msg = relay_pb2.WorkerMessage()
        try:
            msg.ParseFromString(data)
        except DecodeError:
            log.warning("dropped a malformed dispatch message (%d bytes)", len(data))
            return
        body = msg.WhichOneof("body")
        if body == "dispatch":
            self.executor.on_dispatch(msg.dispatch)
        elif body == "dispatches":
            for d in msg.dispatches.jobs:
                self.executor.on_dispatch(d)
        elif body == "cancel":
            self.executor.on_cancel(msg.cancel)
        else:
            log.warning("dropped a dispatch message with no body")
