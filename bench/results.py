"""The figures of one benchmark run: samples per system and measure (one per round), and the
failures that left some of them empty."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

MACHINE = "machine"  # the system name under which bench/reference.py's figures are kept
# jobgate's processes whose CPU per batched job a run records ("cpu:<name>", µs; also "cpu:all")
CPU_PROCESSES = ("redis", "gateway", "workers", "client")


@dataclass
class Results:
    systems: list[str]
    # (system, measure) -> one value per round; measures: "batched", "unary" (jobs/s), "p50", "p99"
    # (ms), "workers:<n>", "payload:<bytes>" (jobs/s), "bytes_per_job" (bytes), "rss_idle",
    # "rss_streams" (MB), jobgate's "cpu:<process>" (µs per batched job: CPU_PROCESSES and "all");
    # for MACHINE: "relay_unbatched", "relay_pipelined" (messages/s), "grpc_unary" (calls/s),
    # "grpc_p50", "grpc_p99" (ms).
    samples: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    settings: dict[str, str] = field(default_factory=dict)
    submitters: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # What the run saw besides the systems' own errors, e.g. Redis closing a client.
    notes: list[str] = field(default_factory=list)

    def add(self, system: str, measure: str, value: float) -> None:
        self.samples[(system, measure)].append(value)

    def fail(self, system: str, where: str, error: BaseException | str) -> None:
        self.failures[system].append(f"{where}: {describe(error)}")

    def values(self, system: str, measure: str) -> list[float]:
        return self.samples.get((system, measure), [])

    def median(self, system: str, measure: str) -> float | None:
        values = self.values(system, measure)
        return statistics.median(values) if values else None

    def spread(self, system: str, measure: str, fmt: str = "{:,.0f}") -> str:
        """``median (min-max)`` (with an en dash), the median alone for one sample, ``failed`` or a dash."""
        values = self.values(system, measure)
        if not values:
            return "failed" if self.failures.get(system) else "–"
        mid = fmt.format(statistics.median(values))
        if len(values) == 1:
            return mid
        return f"{mid} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def describe(error: BaseException | str, limit: int = 400) -> str:
    """One line for a failure: a gRPC error's code and details, else the exception's type and text."""
    if isinstance(error, str):
        text = error
    elif callable(code := getattr(error, "code", None)) and callable(details := getattr(error, "details", None)):
        text = f"{type(error).__name__} {getattr(code(), 'name', code())}: {details()}"
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:limit]
