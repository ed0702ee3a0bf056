"""Statistics of an evaluation: success rates with intervals, summaries of a run, the engine-vs-reference
comparison.

Intervals (95%): ``ci95`` is Wilson's score interval over rollouts, which treats the rollouts as independent.
In the 25 states x 5 seeds protocol they are not: success is clustered by initial state (most states are
all-or-nothing across their seeds), so two intervals that account for it are reported next to it, both over
the initial states: ``ci95_bootstrap`` (a cluster bootstrap: states resampled with replacement, 10,000
resamples, seed 0, percentile interval) and ``ci95_states`` (Wilson's interval of the mean per-state success
with n = the number of states: exact when states are all-or-nothing, conservative otherwise). With one seed per
state all three describe independent rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from par_deploy.eval.episode import EpisodeRecord

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); ``(nan, nan)`` for ``n == 0``.

    ``successes`` may be fractional (a sum of per-cluster success fractions)."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends (no 1e-17 rounding residue)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval of ``p1 - p2`` from the two Wilson intervals (Newcombe 1998, method 10; independent samples)."""
    if n1 <= 0 or n2 <= 0:
        return (math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def cluster_bootstrap_interval(
    successes: Sequence[int], trials: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile interval (95%) of the pooled rate ``sum(k) / sum(n)`` when whole clusters (initial states, with
    ``successes[c]`` of ``trials[c]`` rollouts each) are resampled with replacement; ``(nan, nan)`` for fewer
    than two clusters. Deterministic: a fixed ``seed``."""
    k, n = np.asarray(successes, np.int64), np.asarray(trials, np.int64)
    if len(k) < 2:
        return (math.nan, math.nan)
    pick = np.random.default_rng(seed).integers(0, len(k), (resamples, len(k)))  # [R, C] cluster indices
    rates = k[pick].sum(1) / n[pick].sum(1)  # [R]
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return (float(lo), float(hi))


def rate(outcomes: Sequence[tuple[int, bool]]) -> dict[str, Any] | None:
    """``(initial state, success)`` pairs -> the rate with its three intervals (see the module docstring)."""
    n = len(outcomes)
    if not n:
        return None
    k = sum(bool(s) for _, s in outcomes)
    by_state: dict[int, list[int]] = {}
    for state, s in outcomes:
        by_state.setdefault(state, []).append(bool(s))
    ks = [sum(v) for v in by_state.values()]
    ns = [len(v) for v in by_state.values()]
    per_state = sum(a / b for a, b in zip(ks, ns, strict=True))
    boot = cluster_bootstrap_interval(ks, ns)
    return {
        "successes": k,
        "n": n,
        "rate": k / n,
        "ci95": list(wilson_interval(k, n)),
        "states": len(ks),
        "ci95_bootstrap": None if math.isnan(boot[0]) else list(boot),
        "ci95_states": list(wilson_interval(min(per_state, len(ks)), len(ks))),
    }


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def _latency(act: Sequence[float]) -> dict[str, Any]:
    if not act:
        return {"calls": 0, "p50": None, "p90": None, "mean": None, "max": None}
    return {
        "calls": len(act),
        "p50": float(np.percentile(act, 50)),
        "p90": float(np.percentile(act, 90)),
        "mean": float(np.mean(act)),
        "max": float(np.max(act)),
    }


def summarize(records: Sequence[EpisodeRecord]) -> dict[str, Any]:
    """The summary of a run's episode records."""
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            kind = "crashed" if r.crashed else r.error.split(":", 1)[0]
            errors[kind] = errors.get(kind, 0) + 1
    measured_end = [(r.state, r.success_at_end) for r in records if r.success_at_end is not None]
    return {
        "episodes": len(records),
        "success_once": rate([(r.state, r.success_once) for r in records]),
        "success_at_end": rate(measured_end),
        "length": _stats([r.length for r in records if not r.crashed]),  # env steps executed
        "success_step": _stats([r.success_step for r in records if r.success_step is not None]),
        "act_ms": _latency([x for r in records for x in r.act_ms]),
        "errors": errors,
        "crashed": sum(r.crashed for r in records),
        "retried": sum(r.attempts > 1 for r in records),
        "episode_seconds": _stats([r.seconds for r in records]),
    }


def _paired_metric(pairs: Sequence[tuple[EpisodeRecord, EpisodeRecord]], metric: str) -> dict[str, Any] | None:
    ps = [(getattr(x, metric), getattr(y, metric)) for x, y in pairs]
    ps = [(bool(a), bool(b)) for a, b in ps if a is not None and b is not None]
    if not ps:
        return None
    k1, k2, n = sum(a for a, _ in ps), sum(b for _, b in ps), len(ps)
    return {
        "a": k1 / n,
        "b": k2 / n,
        "difference": (k1 - k2) / n,
        "ci95_unpaired": list(newcombe_interval(k1, n, k2, n)),
        "only_a": sum(a and not b for a, b in ps),
        "only_b": sum(b and not a for a, b in ps),
    }


def compare_runs(a: Sequence[EpisodeRecord], b: Sequence[EpisodeRecord]) -> dict[str, Any]:
    """``a`` (engine) against ``b`` (reference) on the episodes both recorded (same state and policy seed)."""
    bk = {r.key: r for r in b}
    pairs = [(r, bk[r.key]) for r in a if r.key in bk]
    out: dict[str, Any] = {"paired_episodes": len(pairs)}
    for metric in ("success_once", "success_at_end"):
        out[metric] = _paired_metric(pairs, metric)
    chunks = [(x, y) for x, y in pairs if x.first_chunk is not None and y.first_chunk is not None]
    diffs = [float(np.abs(np.asarray(x.first_chunk) - np.asarray(y.first_chunk)).max()) for x, y in chunks]
    out["first_chunk_max_abs_diff"] = max(diffs) if diffs else None
    out["first_chunk_median_abs_diff"] = float(np.median(diffs)) if diffs else None
    out["first_chunk_compared"] = len(diffs)
    # how many of those episodes started from bit-identical observations
    out["first_obs_identical"] = sum(x.first_obs_sha1 == y.first_obs_sha1 for x, y in chunks)
    return out
