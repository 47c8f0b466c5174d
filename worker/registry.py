"""Handler registry and the context object handlers receive."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from protocol.keys import KIND_RE


class Fatal(Exception):
    """Raised by a handler: the job fails with code FATAL and is not retried, whatever attempts it
    has left (any other exception, or a timeout, is retried while attempts are left)."""


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler gets: the job's input and identity, and a way to report progress.

    ``args`` is the submitted ``google.protobuf.Value`` as plain Python (dict, list, str, float,
    bool or None; JSON numbers arrive as float). ``payload`` is the submitted bytes.
    """

    id: str
    kind: str
    queue: str
    attempt: int
    args: Any
    payload: bytes
    timeout_s: float
    reporter: Callable[[float, str], None] | None = field(default=None, repr=False, compare=False)
    # The results of the jobs it depends on (JobSpec.depends_on), by id: each one's structured result
    # as plain Python (None when it returned bytes or nothing).
    dependencies: Mapping[str, Any] = field(default_factory=dict)

    def progress(self, fraction: float, message: str = "") -> None:
        """Reports how far the job has come: ``fraction`` from 0 to 1 and a short ``message`` (cut
        to 256 characters). Cheap, and safe from any thread: call it as often as you like; the
        worker writes the latest report of each job at most once per ``progress_interval_ms``.
        Watchers of the job (RunJob, WatchResults with include_progress) get it as a progress event,
        GetJob as the job's ``progress``. Raises ValueError or TypeError for a bad report."""
        if self.reporter is not None:
            self.reporter(fraction, message)


Handler = Callable[[JobContext], Any]
F = TypeVar("F", bound=Handler)


@dataclass(frozen=True, slots=True)
class Registered:
    """A handler and whether it is a coroutine function (else it runs in a thread pool)."""

    fn: Handler
    is_async: bool

    async def call_async(self, ctx: JobContext) -> Any:
        result = self.fn(ctx)
        return await result if inspect.isawaitable(result) else result


class Registry:
    """Maps kinds (handler names) to handlers."""

    def __init__(self) -> None:
        self._handlers: dict[str, Registered] = {}

    def add(self, kind: str, fn: Handler) -> None:
        """Registers ``fn`` for ``kind``. Raises ValueError for a bad or duplicate kind."""
        if not KIND_RE.fullmatch(kind):
            raise ValueError(f"kind {kind!r} must be 1-128 characters from [A-Za-z0-9_.:-]")
        if kind in self._handlers:
            raise ValueError(f"kind {kind!r} already has a handler")
        self._handlers[kind] = Registered(fn, inspect.iscoroutinefunction(fn))

    def decorator(self, kind: str) -> Callable[[F], F]:
        def register(fn: F) -> F:
            self.add(kind, fn)
            return fn

        return register

    def get(self, kind: str) -> Registered | None:
        return self._handlers.get(kind)

    @property
    def kinds(self) -> list[str]:
        return sorted(self._handlers)
