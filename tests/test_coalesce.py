"""The coalescer of single submits, starts and finishes: calls made together go out together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from protocol.coalesce import Coalescer


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on

    async def send(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail_on in items:
            raise ConnectionError("lost")
        return [i * 10 for i in items]


async def test_a_lone_call_goes_at_once_and_calls_made_meanwhile_go_together_next() -> None:
    rec = Recorder()
    c: Coalescer[int, int] = Coalescer(rec.send, most=3)
    first = asyncio.create_task(c.call(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert rec.batches == [[1]]  # not held back waiting for company
    rest = [asyncio.create_task(c.call(i)) for i in range(2, 7)]
    await asyncio.sleep(0)
    rec.release.set()
    assert await first == 10
    assert [await t for t in rest] == [20, 30, 40, 50, 60]
    assert rec.batches == [[1], [2, 3, 4], [5, 6]]  # at most `most` per batch, in order


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_goes() -> None:
    rec = Recorder(fail_on=2)
    rec.release.set()
    c: Coalescer[int, int] = Coalescer(rec.send)
    results = await asyncio.gather(c.call(1), c.call(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await c.call(3) == 30


async def test_a_caller_that_gave_up_is_left_out_and_closing_cancels_the_waiting() -> None:
    rec = Recorder()
    c: Coalescer[int, int] = Coalescer(rec.send)
    first = asyncio.create_task(c.call(1))
    await asyncio.sleep(0)
    gave_up = asyncio.create_task(c.call(2))
    kept = asyncio.create_task(c.call(3))
    await asyncio.sleep(0)
    gave_up.cancel()
    rec.release.set()
    assert (await first, await kept) == (10, 30)
    assert rec.batches == [[1], [3]]
    rec.release.clear()
    stuck = asyncio.create_task(c.call(4))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await c.aclose()
    with pytest.raises(asyncio.CancelledError):
        await stuck


async def test_big_items_split_batches_by_bytes_and_one_too_big_goes_alone() -> None:
    rec = Recorder()
    c: Coalescer[int, int] = Coalescer(rec.send, size=lambda i: i, most_bytes=10)
    first = asyncio.create_task(c.call(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(c.call(i)) for i in (4, 5, 2, 30, 3)]
    await asyncio.sleep(0)
    rec.release.set()
    await asyncio.gather(first, *rest)
    assert rec.batches == [[1], [4, 5], [2], [30], [3]]


async def test_a_batch_answered_with_the_wrong_number_of_results_fails_its_callers() -> None:
    async def send(items: Sequence[int]) -> list[int]:
        return [1, 2, 3][: len(items) + 1]

    c: Coalescer[int, int] = Coalescer(send)
    with pytest.raises(RuntimeError, match="answered 2 results for 1 items"):
        await asyncio.wait_for(c.call(7), timeout=5)  # never left waiting
    await c.aclose()


async def test_a_caller_that_stops_waiting_leaves_the_coalescer_working() -> None:
    async def send(items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.3)
        return [i * 10 for i in items]

    c: Coalescer[int, int] = Coalescer(send)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await c.call(1)
    assert await asyncio.wait_for(c.call(2), timeout=5) == 20  # after the abandoned batch, answered
    await c.aclose()
