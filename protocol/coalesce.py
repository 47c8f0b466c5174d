"""Coalesces concurrent per-job Redis calls into one batched call.

Under load many jobs are submitted, started and finished at once; sending each as its own script
call costs a round trip and the client's per-command overhead every time. A :class:`Coalescer`
gathers the items that callers hand it while one batch is in flight, then sends them together as
the next batch (the gateway's single submits, a worker's starts and finishes). When idle it sends
a lone item at once, so a single job waits no longer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Runs ``send(items)`` for batches of at most ``most`` items, one batch in flight at a time;
    with ``size``, also of at most ``most_bytes`` by that measure (an item bigger than that goes
    alone), so that big items never make one huge call.

    ``send`` returns one result per item, in order. When it raises, every caller of that batch gets
    the exception (and may retry on its own: the batched calls are safe to repeat per item).
    """

    def __init__(
        self,
        send: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        most: int = 256,
        size: Callable[[T], int] | None = None,
        most_bytes: int = 4 << 20,
    ) -> None:
        self._send = send
        self._most = most
        self._size = size
        self._most_bytes = most_bytes
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, item: T) -> R:
        """Queues ``item`` for the next batch and returns its result. A caller that stops waiting
        (cancelled, or its own timeout) leaves the item to be sent or skipped: the batched calls
        are safe to repeat, so it may call again."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def aclose(self) -> None:
        """Stops sending (on shutdown): callers still waiting are cancelled."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    def _take(self) -> int:
        """How many of the waiting items the next batch takes (at least one)."""
        n = min(len(self._waiting), self._most)
        if self._size is None:
            return n
        total = 0
        for i in range(n):
            total += self._size(self._waiting[i][0])
            if total > self._most_bytes and i > 0:
                return i
        return n

    async def _flush(self) -> None:
        live: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                n = self._take()
                batch, self._waiting = self._waiting[:n], self._waiting[n:]
                live = [(item, f) for item, f in batch if not f.done()]  # a cancelled caller gave up
                if not live:
                    continue
                try:
                    results = await self._send([item for item, _ in live])
                except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                    _fail(live, exc)
                    continue
                _answer(live, results)
        finally:
            self._flusher = None
            for _, f in live:  # the batch in flight when the flusher stopped (cancelled): unanswered
                if not f.done():
                    f.cancel()
            for _, f in self._waiting:  # only when cancelled: nobody will send these
                f.cancel()
            if self._waiting:
                self._waiting = []


def _fail(live: Sequence[tuple[object, asyncio.Future[R]]], exc: BaseException) -> None:
    for _, f in live:
        if not f.done():
            f.set_exception(exc)


def _answer(live: Sequence[tuple[object, asyncio.Future[R]]], results: Sequence[R]) -> None:
    """Hands each caller its result; a batch answered with the wrong number of results fails."""
    if len(results) != len(live):
        _fail(live, RuntimeError(f"a batched call answered {len(results)} results for {len(live)} items"))
        return
    for (_, f), result in zip(live, results, strict=True):
        if not f.done():
            f.set_result(result)
