"""How jobgate's long-running processes (gateways, workers) set Python's cyclic garbage collector."""

from __future__ import annotations

import gc

YOUNG = 50_000  # allocations between collections of the youngest generation (Python's default: 700)


def tune() -> None:
    """Collects the youngest generation every YOUNG allocations, and takes what exists at start-up
    (modules, settings) out of the collector's way (``gc.freeze``).

    Under load the objects of a batch of jobs live a few milliseconds. Collected every 700
    allocations, they outlive several collections, reach the oldest generation and make full
    collections frequent, and each full collection scans every long-lived object: with 10,000 open
    streams a gateway spent about 60% more CPU per job (docs/CURVES.md). At 50,000 they die young;
    only cyclic garbage waits longer to be freed (reference counting frees the rest at once).
    """
    gc.freeze()
    gc.set_threshold(YOUNG, 10, 10)
