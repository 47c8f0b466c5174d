"""PNG charts of a benchmark run (matplotlib, Agg backend), for docs/BENCHMARKS.md.

Bars are medians over the rounds with min-max error bars; sweeps are lines through the medians
with the same error bars. A system without figures for a chart is left out of it.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.results import Results

COLORS = {"jobgate": "#1f6feb", "celery": "#8c8c8c", "rq": "#d97706", "dramatiq": "#16a34a", "arq": "#9333ea"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stats(values: list[float]) -> tuple[float, float, float]:
    """Median and the distances down to the minimum and up to the maximum."""
    mid = statistics.median(values)
    return mid, mid - min(values), max(values) - mid


def _bars(results: Results, measures: dict[str, str], title: str, ylabel: str, path: Path) -> Path | None:
    """Grouped bars: one group per system, one bar per measure."""
    systems = [s for s in results.systems if any(results.values(s, m) for m in measures)]
    if not systems:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    width = 0.8 / len(measures)
    for k, (measure, label) in enumerate(measures.items()):
        xs, mids, lows, highs, colors = [], [], [], [], []
        for i, system in enumerate(systems):
            if values := results.values(system, measure):
                mid, low, high = _stats(values)
                xs.append(i + (k - (len(measures) - 1) / 2) * width)
                mids.append(mid)
                lows.append(low)
                highs.append(high)
                colors.append(COLORS.get(system, "#555555"))
        # One measure: a colour per system, as in the line charts; several: a colour per measure.
        color = colors if len(measures) == 1 else None
        spread = any(lows) or any(highs)  # one sample per system: no error bars
        yerr = [lows, highs] if spread else None
        ax.bar(xs, mids, width * 0.92, yerr=yerr, capsize=3, label=label, color=color)
        for x, mid, high in zip(xs, mids, highs, strict=True):
            ax.annotate(
                _short(mid), (x, mid + high), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7
            )
    ax.set_xticks(range(len(systems)), systems)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.15)
    if len(measures) > 1:
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _lines(
    results: Results, prefix: str, points: list[int], labels: list[str], title: str, xlabel: str, path: Path
) -> Path | None:
    """One line per system through the medians of ``<prefix><point>``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    drawn = 0
    for system in results.systems:
        xs, mids, lows, highs = [], [], [], []
        for x, point in enumerate(points):
            if values := results.values(system, f"{prefix}{point}"):
                mid, low, high = _stats(values)
                xs.append(x)
                mids.append(mid)
                lows.append(low)
                highs.append(high)
        if xs:
            ax.errorbar(
                xs, mids, yerr=[lows, highs], marker="o", capsize=3, label=system, color=COLORS.get(system), lw=1.8
            )
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(points)), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("jobs/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _short(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value >= 10:
        return f"{value:.0f}"
    return f"{value:.2f}"


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw(results: Results, out: Path, workers: list[int], payloads: list[int]) -> dict[str, Path]:
    """Writes the charts into ``out``; returns them by name (a chart without data is not drawn)."""
    charts = {
        "throughput": _bars(
            results,
            {"batched": "batched submission", "unary": "one submit per job, 32 clients"},
            "End-to-end throughput (first submit to last result received)",
            "jobs/s",
            out / "throughput.png",
        ),
        "latency": _bars(
            results,
            {"p50": "p50", "p99": "p99"},
            "Single-job round trip (submit, then wait for its result)",
            "ms",
            out / "latency.png",
        ),
        "workers": _lines(
            results,
            "workers:",
            workers,
            [str(w) for w in workers],
            "Batched throughput by number of worker processes",
            "worker processes",
            out / "workers.png",
        ),
        "payload": _lines(
            results,
            "payload:",
            payloads,
            [_size(p) for p in payloads],
            "Batched throughput by job payload size",
            "payload per job (returned as the result)",
            out / "payload.png",
        ),
        "memory": _bars(
            results,
            {"bytes_per_job": "Redis used_memory per queued job"},
            "Redis memory per queued small job (no worker running)",
            "bytes",
            out / "redis-memory.png",
        ),
    }
    return {name: path for name, path in charts.items() if path is not None}


def _size(n: int) -> str:
    if n >= 1000:
        return f"{n // 1000} KB"
    return f"{n} B"
