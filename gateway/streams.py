"""Following one stream's events: what a stream watches (:class:`Watcher`), which streams a gateway
takes (:class:`Admission`), and how the events that arrive, or are re-read from Redis when some may
have been missed, become a stream's batches until the stream is finished or must end
(:class:`Follower`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence

from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.coalesce import Coalescer
from protocol.codec import RUNNING, TERMINAL, Fields, event_from_hash
from protocol.errors import REDIS_ERRORS, NotFound, ResourceExhausted, Unavailable
from protocol.gateway_calls import GatewayCalls

from . import auth
from .handlers import Encoded
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

RECONCILE_BACKOFF = 8  # a quiet stream re-reads after reconcile_s, 2x, 4x, then every 8x
READS_AT_ONCE = 1000  # job ids per call that reads stored jobs for streams
REREAD_GATHER_S = 0.05  # how long a re-read waits for others to go with it
CHECK_STOP_S = 1.0  # the quiet streams' re-reader looks at its stop event at least this often


class EventBuffer:
    """A bounded FIFO of one stream's events with one waiting reader: the part of
    :class:`asyncio.Queue` a watcher uses. A Queue holds three deques from the start (items, getters,
    putters), each with its own 0.5 KB block; one deque and a future made only while waiting cost
    the gateway about 3 KB less per open stream (30 MB at 10,000 streams)."""

    __slots__ = ("_items", "_maxsize", "_waiter")

    def __init__(self, maxsize: int) -> None:
        self._items: deque[job_pb2.JobEvent | None] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self._maxsize

    def put_nowait(self, event: job_pb2.JobEvent | None) -> None:
        """Appends ``event``; raises asyncio.QueueFull when ``maxsize`` are waiting."""
        if self.full():
            raise asyncio.QueueFull
        self._items.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def get_nowait(self) -> job_pb2.JobEvent | None:
        """The oldest event; raises asyncio.QueueEmpty when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> job_pb2.JobEvent | None:
        """The oldest event, once there is one (one reader at a time)."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class Watcher:
    """One stream handler's view of the event flow: filters and a bounded buffer."""

    def __init__(
        self,
        *,
        job_ids: Iterable[str] = (),
        queue: str = "",
        kinds: Iterable[str] = (),
        queues: frozenset[str] | None = None,
        terminal_only: bool = True,
        progress: bool = False,
        buffer: int = 1024,
    ) -> None:
        self.job_ids = frozenset(job_ids)
        if not terminal_only and not self.job_ids:
            raise ValueError("only a watcher of job ids takes progress events")
        self.remaining = set(self.job_ids)  # named jobs not yet delivered as terminal
        self.queue = queue
        self.kinds = frozenset(kinds)
        self.queues = queues  # the queues the caller may see (None: all)
        self.terminal_only = terminal_only
        self.progress = progress and bool(self.job_ids)  # with terminal_only: progress events too
        self.events = EventBuffer(buffer)
        self.overflowed = False
        self.stale = False  # set when events may have been missed: re-read stored state
        self.missed = False  # set when events may have been missed and cannot be re-read (no job ids)
        self.following = False  # a stream follows it (Follower.follow), so quiet re-reads look at it
        self.heard = False  # an event came since the last quiet re-read was planned
        self.quiet_s = 0.0  # the wait before its next quiet re-read, growing while nothing comes

    def matches(self, event: job_pb2.JobEvent) -> bool:
        if self.terminal_only and event.state not in TERMINAL:
            if not (self.progress and event.state == RUNNING and event.HasField("progress")):
                return False
        if self.job_ids and event.job_id not in self.remaining:
            return False
        if self.queue and event.queue != self.queue:
            return False
        if self.queues is not None and event.queue not in self.queues:
            return False
        return not self.kinds or event.kind in self.kinds

    def push(self, event: job_pb2.JobEvent | None) -> None:
        """Queues an event (None = wake up and reconcile). Marks the watcher overflowed when full."""
        try:
            self.events.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True

    def mark_missed(self) -> None:
        """Events may have been missed: a watcher of job ids re-reads their stored state; one without
        (queue and kind filters only) has nothing to re-read, so its stream must say so."""
        if self.job_ids:
            self.stale = True
        else:
            self.missed = True
        self.wake()

    def wake(self) -> None:
        if not self.events.full():
            self.events.put_nowait(None)

    def delivered(self, event: job_pb2.JobEvent) -> bool:
        """Records delivery; returns False when the event must be skipped (duplicate terminal)."""
        if event.state in TERMINAL and self.job_ids:
            if event.job_id not in self.remaining:
                return False
            self.remaining.discard(event.job_id)
        return True

    @property
    def finished(self) -> bool:
        return bool(self.job_ids) and not self.remaining


class Admission:
    """Which streams this gateway takes: none once it is closing, and at most ``max_streams`` at once."""

    def __init__(self, max_streams: int, metrics: GatewayMetrics) -> None:
        self.max_streams = max_streams
        self.metrics = metrics
        self.open = 0
        self.closing = False
        self.closed = asyncio.Event()  # set once closing and no stream is left

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Holds a place for one stream while the block runs. Raises Unavailable when the gateway is
        shutting down (checked before anything is stored, so a refused RunJob leaves no job),
        ResourceExhausted when ``max_streams`` are open."""
        if self.closing:
            raise Unavailable("the gateway is shutting down; use another gateway")
        if self.open >= self.max_streams:
            raise ResourceExhausted(
                f"this gateway already serves {self.max_streams} streams (max_streams); retry later or elsewhere"
            )
        self.open += 1
        self.metrics.streams.inc()
        try:
            yield
        finally:
            self.open -= 1
            if self.closing and not self.open:
                self.closed.set()
            self.metrics.streams.dec()

    def close(self) -> None:
        """Takes no more streams; open ones notice :attr:`closing` and end."""
        self.closing = True
        if not self.open:
            self.closed.set()


class Follower:
    """Turns a watcher's events into a stream's batches (RunJob, WatchResults)."""

    def __init__(self, store: GatewayCalls, admission: Admission, *, stream_buffer: int, reconcile_s: float) -> None:
        self.store = store
        self.admission = admission
        self.stream_buffer = stream_buffer
        self.reconcile_s = reconcile_s
        # The streams' reads of stored jobs that come together go out together: thousands of streams
        # opened at once (clients coming back after a restart) make one call, not thousands.
        self._reads: Coalescer[Sequence[str], list[Fields]] = Coalescer(
            self._read_many, most=READS_AT_ONCE, size=len, most_bytes=READS_AT_ONCE
        )
        # Re-reads are a safety net, never in a hurry: each call waits REREAD_GATHER_S for more, so
        # the streams woken together to re-read (a subscription re-established; jobs that run() found
        # ended unseen) cost a few calls between them.
        self._rereads: Coalescer[Sequence[str], list[Fields]] = Coalescer(
            self._reread_many, most=READS_AT_ONCE, size=len, most_bytes=READS_AT_ONCE
        )
        # Quiet streams of job ids, by when each next looks at its jobs (see run).
        # (A finished stream's watcher is not kept alive for its place here.)
        self._due: list[tuple[float, int, weakref.ref[Watcher]]] = []
        self._order = itertools.count()
        self._sooner = asyncio.Event()  # a stream was planned before the earliest one

    def _plan(self, watcher: Watcher, spread: float) -> None:
        """Plans ``watcher``'s next quiet re-read in ``quiet_s`` ± ``spread`` of it."""
        at = asyncio.get_running_loop().time() + watcher.quiet_s * random.uniform(1 - spread, 1 + spread)
        if not self._due or at < self._due[0][0]:
            self._sooner.set()
        heapq.heappush(self._due, (at, next(self._order), weakref.ref(watcher)))

    async def run(self, stop: asyncio.Event) -> None:
        """Looks, for the streams that follow job ids and have heard nothing for a while, whether
        one of their jobs has ended unseen (its event lost), until ``stop`` is set: after
        ``reconcile_s`` without an event, then after twice as long, and so on up to
        RECONCILE_BACKOFF times ``reconcile_s`` (an event starts over). The jobs of every stream due
        within REREAD_GATHER_S are read in one call, and only a stream with an ended job is woken
        (to read it whole, as after a lost subscription): a quiet stream costs its task nothing, and
        many of them cost Redis a few calls a second."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            wait = self._due[0][0] - loop.time() if self._due else CHECK_STOP_S
            if wait > 0:
                self._sooner.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._sooner.wait(), timeout=min(wait, CHECK_STOP_S))
                continue
            await asyncio.sleep(REREAD_GATHER_S)  # those due in a moment come along
            await self._look(self._take_due(loop.time() + REREAD_GATHER_S))

    def _take_due(self, by: float) -> list[Watcher]:
        """The followed watchers due by ``by``, up to READS_AT_ONCE job ids between them; a watcher
        that has heard an event since it was planned is planned again from now instead."""
        out: list[Watcher] = []
        ids = 0
        while self._due and self._due[0][0] <= by and ids < READS_AT_ONCE:
            watcher = heapq.heappop(self._due)[2]()
            if watcher is None or not watcher.following or watcher.finished:
                continue
            if watcher.heard:
                watcher.heard = False
                watcher.quiet_s = self.reconcile_s
                self._plan(watcher, 0.25)
                continue
            out.append(watcher)
            ids += len(watcher.remaining)
        return out

    async def _look(self, watchers: list[Watcher]) -> None:
        """Reads the states of ``watchers``' outstanding jobs; wakes, stale, each one with an ended
        job, and plans every one's next look further off. A failed read plans them again as they
        were."""
        ids = [[*w.remaining] for w in watchers]
        try:
            rows = await self._read_many(ids) if watchers else []
        except Exception as exc:  # the re-reads must outlive any failure
            if isinstance(exc, REDIS_ERRORS):
                log.debug("quiet streams' re-read failed (%s); trying again later", exc)
            else:
                log.exception("quiet streams' re-read failed; trying again later")
            for watcher in watchers:
                self._plan(watcher, 0.25)
            return
        for watcher, fields in zip(watchers, rows, strict=True):
            if not watcher.following:
                continue
            if any(int(f.get(b"state", 0)) in TERMINAL for f in fields):
                watcher.stale = True
                watcher.wake()
            watcher.quiet_s = min(watcher.quiet_s * 2, self.reconcile_s * RECONCILE_BACKOFF)
            self._plan(watcher, 0.25)

    async def _reread_many(self, requests: Sequence[Sequence[str]]) -> list[list[Fields]]:
        await asyncio.sleep(REREAD_GATHER_S)
        return await self._read_many(requests)

    async def _read_many(self, requests: Sequence[Sequence[str]]) -> list[list[Fields]]:
        flat = [job_id for ids in requests for job_id in ids]
        rows = await self.store.get_fields(flat)
        out, at = [], 0
        for ids in requests:
            out.append(rows[at : at + len(ids)])
            at += len(ids)
        return out

    async def follow(self, watcher: Watcher, most: int = 1) -> AsyncIterator[list[job_pb2.JobEvent]]:
        """Events for a watcher until it is finished, in lists of what arrived together (up to about
        ``most``, more when stored state is re-read). A watcher of job ids re-reads their stored state
        when events may have been lost: the subscription was re-established, or a quiet re-read
        (``run``) found one of its jobs ended unseen; its first quiet re-read comes anywhere from half
        to one and a half ``reconcile_s`` after it starts, so that streams opened together do not
        re-read together."""
        if watcher.job_ids:
            watcher.following, watcher.quiet_s = True, self.reconcile_s
            self._plan(watcher, 0.5)
        try:
            while not watcher.finished:
                self.check_open(watcher)
                event = await watcher.events.get()
                self.check_open(watcher)
                arrived: list[job_pb2.JobEvent] = []
                while True:
                    if event is None:
                        if watcher.stale and watcher.job_ids:
                            watcher.stale = False
                            arrived.extend(await self.stored_terminal(watcher, missing_is_error=False, reread=True))
                    elif watcher.delivered(event):
                        arrived.append(event)
                        watcher.heard = True
                    if len(arrived) >= most or watcher.events.empty():
                        break
                    event = watcher.events.get_nowait()
                if arrived:
                    yield arrived
        finally:
            watcher.following = False

    def check_open(self, watcher: Watcher) -> None:
        """Raises the status that ends a stream: the gateway is stopping, events may have been
        missed with nothing to re-read, or the client fell too far behind."""
        if self.admission.closing:
            raise Unavailable("the gateway is shutting down; resume on another gateway")
        if watcher.missed:
            raise Unavailable(
                "this gateway's subscription to results was interrupted and events may have been missed;"
                " reconnect (a stream of job_ids re-reads their stored state)"
            )
        if watcher.overflowed:
            raise ResourceExhausted(f"stream fell more than {self.stream_buffer} events behind; reconnect and resume")

    async def stored_terminal(
        self, watcher: Watcher, *, missing_is_error: bool, reread: bool = False
    ) -> list[job_pb2.JobEvent]:
        """Terminal events of the watcher's outstanding jobs, read from Redis (and marked delivered);
        a ``reread`` goes out with the others of the next REREAD_GATHER_S. Raises PermissionDenied
        for a job outside the caller's queues: the first read comes before anything is streamed."""
        ids = sorted(watcher.remaining)
        principal = auth.current()
        out = []
        reads = self._rereads if reread else self._reads
        for jid, fields in zip(ids, await reads.call(ids), strict=True):
            if not fields:
                if missing_is_error:
                    raise NotFound(f"job_ids: no job {jid}")
                continue
            principal.check_job(fields.get(b"queue", b"").decode(), jid, "job_ids")
            event = event_from_hash(jid, fields)
            if event.state not in TERMINAL:
                continue
            if watcher.matches(event) and watcher.delivered(event):
                out.append(event)
            else:  # finished, but outside the queue/kind filter: nothing to wait for
                watcher.remaining.discard(jid)
        return out


EVENTS = scheduler_pb2.WatchResultsResponse.DESCRIPTOR.fields_by_name["events"].number


def watch_responses(
    events: list[job_pb2.JobEvent], max_batch: int, most_bytes: int
) -> Iterator[scheduler_pb2.WatchResultsResponse | bytes]:
    """What a WatchResults stream sends for ``events``: with ``max_batch`` over 1, responses of at
    most that many events and of at most ``most_bytes`` encoded (an event bigger than that goes
    alone), each encoded event by event (:class:`gateway.handlers.Encoded`); else one response per
    event."""
    if max_batch <= 1:
        for event in events:
            yield scheduler_pb2.WatchResultsResponse(event=event)
        return
    batch, count = Encoded(), 0
    for event in events:
        body = event.SerializeToString()
        if count and (count == max_batch or batch.size + len(body) + 8 > most_bytes):
            yield bytes(batch)
            batch, count = Encoded(), 0
        batch.add(EVENTS, body)
        count += 1
    if count:
        yield bytes(batch)
