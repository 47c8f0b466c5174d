"""The Watcher on its own: which events a stream handler takes, and what it notes when events
may have been lost (gateway/streams.py)."""

from __future__ import annotations

import pytest

from gateway.handlers import Encoded
from gateway.streams import Watcher, watch_responses
from jobgate.v1 import job_pb2, scheduler_pb2
from protocol.codec import varint

S = job_pb2
A, B, C = "a" * 32, "b" * 32, "c" * 32


def event(
    job_id: str = A, state: int = S.JOB_STATE_SUCCEEDED, queue: str = "default", kind: str = "echo"
) -> job_pb2.JobEvent:
    return job_pb2.JobEvent(job_id=job_id, state=state, queue=queue, kind=kind)  # type: ignore[arg-type]


def queued(w: Watcher) -> list[job_pb2.JobEvent | None]:
    """What the watcher's buffer holds, emptied."""
    out = []
    while not w.events.empty():
        out.append(w.events.get_nowait())
    return out


def test_a_watcher_of_job_ids_takes_the_terminal_events_of_its_jobs_only() -> None:
    w = Watcher(job_ids=[A, B])
    for state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED):
        assert w.matches(event(A, state))
    assert not w.matches(event(C))
    assert not w.matches(event(A, S.JOB_STATE_RUNNING))
    assert not w.matches(event(A, S.JOB_STATE_QUEUED))


def test_a_watcher_of_job_ids_may_take_progress_but_one_without_ids_cannot() -> None:
    w = Watcher(job_ids=[A], terminal_only=False)
    assert [w.matches(event(A, s)) for s in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED)] == [
        True,
        True,
        True,
    ]
    assert not w.matches(event(B, S.JOB_STATE_RUNNING))
    with pytest.raises(ValueError, match="job ids"):
        Watcher(queue="default", terminal_only=False)


def test_queue_and_kind_filters_must_both_hold() -> None:
    w = Watcher(queue="billing", kinds=["invoice", "refund"])
    assert w.matches(event(A, queue="billing", kind="invoice"))
    assert w.matches(event(B, queue="billing", kind="refund"))
    assert not w.matches(event(C, queue="billing", kind="echo"))
    assert not w.matches(event(C, queue="default", kind="invoice"))
    assert not w.matches(event(C, S.JOB_STATE_RUNNING, queue="billing", kind="invoice"))
    anything = Watcher()
    assert anything.matches(event(A, queue="any", kind="thing"))


def test_a_caller_limited_to_queues_sees_only_their_events_whatever_it_asked() -> None:
    w = Watcher(queues=frozenset({"invoices", "refunds"}))
    assert w.matches(event(A, queue="invoices")) and w.matches(event(B, queue="refunds"))
    assert not w.matches(event(C, queue="payroll"))
    by_id = Watcher(job_ids=[A], queues=frozenset({"invoices"}))
    assert not by_id.matches(event(A, queue="payroll"))  # naming the job is not enough
    nothing = Watcher(queues=frozenset())
    assert not nothing.matches(event(A))


def test_a_terminal_event_is_delivered_once_per_job_and_the_watcher_then_finishes() -> None:
    w = Watcher(job_ids=[A, B])
    assert w.delivered(event(A))
    assert not w.delivered(event(A, S.JOB_STATE_FAILED))  # a duplicate (a replay, or the pub/sub copy)
    assert not w.matches(event(A))  # nor is it taken any more
    assert not w.finished
    assert w.delivered(event(B, S.JOB_STATE_CANCELLED))
    assert w.finished
    progress = Watcher(job_ids=[C], terminal_only=False)
    assert progress.delivered(event(C, S.JOB_STATE_RUNNING)) and progress.delivered(event(C, S.JOB_STATE_RUNNING))
    assert not progress.finished  # progress never finishes a job
    broad = Watcher()
    assert broad.delivered(event(A)) and broad.delivered(event(A))  # no ids: nothing to finish
    assert not broad.finished


def test_a_full_buffer_marks_the_watcher_overflowed_and_keeps_what_it_held() -> None:
    w = Watcher(buffer=2)
    first, second = event(A), event(B)
    w.push(first)
    w.push(second)
    assert not w.overflowed
    w.push(event(C))
    assert w.overflowed
    assert queued(w) == [first, second]


def test_missed_events_make_a_watcher_of_ids_reread_and_one_without_ids_say_so() -> None:
    by_id = Watcher(job_ids=[A])
    by_id.mark_missed()
    assert (by_id.stale, by_id.missed) == (True, False)
    assert queued(by_id) == [None]  # woken to re-read the stored state
    broad = Watcher(queue="default")
    broad.mark_missed()
    assert (broad.stale, broad.missed) == (False, True)
    assert queued(broad) == [None]


def test_waking_a_full_watcher_does_not_overflow_it() -> None:
    w = Watcher(job_ids=[A], buffer=1)
    w.push(event(A))
    w.mark_missed()
    assert w.stale and not w.overflowed
    assert queued(w) == [event(A)]


def test_watch_responses_are_encoded_as_protobuf_encodes_them_within_their_limits() -> None:
    """A WatchResults batch is encoded event by event (cheaper for large outputs): the bytes are
    those of WatchResultsResponse(events=...), with at most max_batch events and at most the byte
    limit a response (an event over it alone); with max_batch 1, one response object per event."""
    events = [
        job_pb2.JobEvent(job_id=f"{i:032x}", state=job_pb2.JOB_STATE_SUCCEEDED, output=b"o" * size)
        for i, size in enumerate([0, 10, 200, 20_000, 5, 150_000, 1, 2, 3, 4])
    ]
    batches = list(watch_responses(events, 3, 30_000))
    assert all(isinstance(b, bytes) for b in batches)
    decoded = [scheduler_pb2.WatchResultsResponse.FromString(b) for b in batches]
    assert [len(d.events) for d in decoded] == [3, 2, 1, 3, 1]  # 3 at most; 20 KB + 5 B fit; 150 KB alone
    assert [e for d in decoded for e in d.events] == events
    for b, d in zip(batches, decoded, strict=True):
        assert b == scheduler_pb2.WatchResultsResponse(events=d.events).SerializeToString()
    singles = list(watch_responses(events[:2], 1, 30_000))
    assert singles == [scheduler_pb2.WatchResultsResponse(event=e) for e in events[:2]]
    assert [varint(n) for n in (0, 1, 127, 128, 300, 1 << 21)] == [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80\x01",
        b"\xac\x02",
        b"\x80\x80\x80\x01",
    ]


def test_a_response_encoded_part_by_part_is_what_protobuf_encodes() -> None:
    """SubmitJobs answers its jobs encoded one by one (Encoded): the same bytes as the message."""
    jobs = [
        job_pb2.Job(id=f"{i:032x}", spec=job_pb2.JobSpec(kind="echo", payload=b"p" * n))
        for i, n in enumerate((0, 9, 300))
    ]
    reply = Encoded()
    for job in jobs:
        reply.add(1, job.SerializeToString())
    reply.add(2, ("b" * 200).encode())
    want = scheduler_pb2.SubmitJobsResponse(jobs=jobs, batch_id="b" * 200).SerializeToString()
    assert bytes(reply) == want and reply.size == len(want)
