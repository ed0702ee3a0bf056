"""Timing helpers: interleaved repetitions (machine drift hits every case alike) and percentile summaries."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def summarize(samples_s: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p90, p99, min, mean, and the number of samples."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "min": float(ms.min()),
        "mean": float(ms.mean()),
        "n": int(ms.size),
    }


def interleaved(
    cases: dict[str, Callable[[], object]], reps: int, warmup: int = 3, on_round: Callable[[int], None] | None = None
) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``reps`` rounds of one call each, rotating the order per round."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            cases[name]()
            samples[name].append(time.perf_counter() - t)
        if on_round:
            on_round(r)
    return samples
