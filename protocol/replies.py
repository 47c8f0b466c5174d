"""Typed replies of the scripts, and the parsers that turn their flat arrays into them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jobgate.v1 import relay_pb2


@dataclass(frozen=True, slots=True)
class Placement:
    """One job placed on one worker (and published) by a placing script."""

    job_id: str
    worker_id: str
    lease: int
    attempt: int
    reached: bool  # False: no subscriber on the worker's channel, so the job went back to its queue


@dataclass(frozen=True, slots=True)
class Placed:
    """What a placing script did: its placements, the queues it placed on (visited) and those of
    them it left jobs waiting in."""

    placements: list[Placement]
    waiting: set[str]
    visited: set[str]


def merge_placed(parts: Sequence[Placed]) -> Placed:
    """What several placing calls (one per shard) did, as one."""
    if len(parts) == 1:
        return parts[0]
    return Placed(
        [p for part in parts for p in part.placements],
        set().union(*(part.waiting for part in parts)),
        set().union(*(part.visited for part in parts)),
    )


@dataclass(frozen=True, slots=True)
class Settled:
    """A job whose state a script changed (requeued, failed or cancelled)."""

    job_id: str
    queue: str
    state: int


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What CancelJob did: ``worker_id``/``lease`` are set when a running worker must be told."""

    queue: str = ""
    worker_id: str = ""
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a heartbeat did: ``again`` when it registered a worker the gateways had evicted (or one
    seen for the first time), and the jobs an earlier process under the same id held, settled."""

    again: bool
    inherited: list[Settled]


@dataclass(frozen=True, slots=True)
class Finished:
    """What a finish_many call did: finish's code per outcome, the placements it dispatched, and the
    jobs it started on the finishing worker's behalf (run them without a start call)."""

    codes: list[int]
    placements: list[Placement]
    taken: list[relay_pb2.DispatchJob] = field(default_factory=list)


def text(value: object) -> str:
    """A Redis reply as text (this client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def placements(flat: Sequence[Any]) -> list[Placement]:
    """Parses the flat placement array of the placing scripts (5 entries each)."""
    return [
        Placement(text(flat[i]), text(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]), flat[i + 4] == 1)
        for i in range(0, len(flat), 5)
    ]


def settled(flat: Sequence[bytes | int]) -> list[Settled]:
    """Parses the {job id, queue, state} triples returned by the reap, leave and heartbeat scripts."""
    out = []
    for i in range(0, len(flat), 3):
        job_id, queue = flat[i], flat[i + 1]
        assert isinstance(job_id, bytes) and isinstance(queue, bytes)
        out.append(Settled(job_id.decode(), queue.decode(), int(flat[i + 2])))
    return out
