"""Soak: many control steps in one process through the runtime, with the resident set and act() latency sampled
every ``every`` steps (does memory or latency drift over a long episode?).

    python -m par_deploy.bench.soak BUNDLE [--control-steps 10000] [--every 1000] [--json soak.json]

One policy, loaded once and reset once: with a sliding cache (overflow ``"slide"``) the whole run is one
episode; a bundle with overflow ``"error"`` is reset whenever its cache is full (counted, not timed).
Observations cycle through 16 random ones (images uniform, states at the training distribution's scale), noise
comes from the policy's seeded RNG, and the controller's chunk is fed back (no ``executed``). After each window
of ``every`` steps: the process's resident set (VmRSS), the window's act() wall-time p50, p99 and max, and the
p50 and p99 of the calling thread's CPU time per act() (``time.thread_time``; with ``threads=1`` ONNX Runtime
computes on the calling thread). On a shared machine the wall time also counts the time the process waited for
a core; the CPU time does not (it still rises when other processes share the core's caches), so a wall-time
drift without a CPU-time drift is the machine's, not the policy's. With a sliding cache of ``n`` blocks every
``n - n // 2``-th call also re-encodes ``n // 2`` blocks, so those calls set the p99. The summary compares the
last window with the first: RSS growth (MB) and latency ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from par_deploy import runtime
from par_deploy.bench.memory import rss_mb
from par_deploy.bench.timing import summarize
from par_deploy.errors import ConfigError
from par_deploy.files import atomic_write

SCHEMA, SCHEMA_VERSION = "par-soak", 1
HEADER = (
    f"{'steps':>7} {'RSS MB':>8} {'dRSS MB':>8} {'act p50 ms':>11} {'p99 ms':>8} {'max ms':>8} "
    f"{'CPU p50 ms':>11} {'CPU p99 ms':>11}"
)


def _observations(policy, rng: np.random.Generator, n: int = 16) -> list[dict[str, np.ndarray]]:
    s = policy.spec
    return [
        {
            "rgb": rng.integers(0, 256, (s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8),
            "state": policy.normalizer.sample_state(rng),
        }
        for _ in range(n)
    ]


def soak(
    bundle: str | Path,
    control_steps: int = 10_000,
    every: int = 1_000,
    backend: str = "onnx",
    threads: int = 1,
    seed: int = 0,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``control_steps`` control steps; a sample (``step``, ``rss_mb``, wall ``p50_ms``, ``p99_ms``,
    ``max_ms``, CPU ``cpu_p50_ms``, ``cpu_p99_ms``) per window of ``every`` steps (the last window may be
    shorter), each also passed to ``on_sample`` as it is taken."""
    if control_steps < 1 or every < 1:
        raise ConfigError(f"soak: control steps and every must be >= 1, got {control_steps} and {every}")
    policy = runtime.load(bundle, backend, threads=threads)
    observations = _observations(policy, np.random.default_rng(seed))
    load = os.getloadavg()[0]
    loaded_mb = rss_mb()
    policy.reset(seed=seed)
    series: list[dict[str, Any]] = []
    window: list[float] = []
    cpu: list[float] = []
    resets = 0
    for step in range(control_steps):
        if policy.steps_left == 0:  # overflow "error" only
            policy.reset()
            resets += 1
        t, c = time.perf_counter(), time.thread_time()
        policy.act(observations[step % len(observations)])
        window.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
        if len(window) == every or step == control_steps - 1:
            s, sc = summarize(window), summarize(cpu)
            sample = {"step": step + 1, "rss_mb": rss_mb(), "p50_ms": s["p50"], "p99_ms": s["p99"]}
            sample.update(max_ms=max(window) * 1e3, cpu_p50_ms=sc["p50"], cpu_p99_ms=sc["p99"])
            series.append(sample)
            if on_sample is not None:
                on_sample(sample)
            window, cpu = [], []
    first, last = series[0], series[-1]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "bundle": str(bundle),
        "backend": backend,
        "threads": threads,
        "control_steps": control_steps,
        "every": every,
        "max_blocks": policy.spec.max_blocks,
        "overflow": policy.spec.overflow,
        "resets": resets,
        "rss_loaded_mb": loaded_mb,
        "series": series,
        "summary": {
            "rss_growth_mb": last["rss_mb"] - first["rss_mb"],
            "p50_last_over_first": last["p50_ms"] / first["p50_ms"],
            "p99_last_over_first": last["p99_ms"] / first["p99_ms"],
            "cpu_p50_last_over_first": last["cpu_p50_ms"] / first["cpu_p50_ms"],
            "cpu_p99_last_over_first": last["cpu_p99_ms"] / first["cpu_p99_ms"],
        },
        "load_avg_1m": [load, os.getloadavg()[0]],
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
    }


def format_sample(sample: dict[str, Any], first_rss_mb: float) -> str:
    return (
        f"{sample['step']:>7} {sample['rss_mb']:>8.2f} {sample['rss_mb'] - first_rss_mb:>+8.2f} "
        f"{sample['p50_ms']:>11.3f} {sample['p99_ms']:>8.3f} {sample['max_ms']:>8.3f} "
        f"{sample['cpu_p50_ms']:>11.3f} {sample['cpu_p99_ms']:>11.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--control-steps", type=int, default=10_000, help="control steps (default 10000)")
    ap.add_argument("--every", type=int, default=1_000, help="steps per sample (default 1000)")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the run as JSON")
    args = ap.parse_args(argv)
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []

    def show(sample: dict[str, Any]) -> None:
        rows.append(sample)
        print(format_sample(sample, rows[0]["rss_mb"]), flush=True)

    r = soak(args.bundle, args.control_steps, args.every, args.backend, args.threads, args.seed, on_sample=show)
    s = r["summary"]
    print(
        f"{r['control_steps']} control steps, overflow {r['overflow']} (max_blocks {r['max_blocks']}), "
        f"{r['resets']} resets; RSS after load {r['rss_loaded_mb']:.2f} MB; last window vs first: "
        f"RSS {s['rss_growth_mb']:+.2f} MB, p50 x{s['p50_last_over_first']:.2f}, p99 x{s['p99_last_over_first']:.2f}, "
        f"CPU p50 x{s['cpu_p50_last_over_first']:.2f}, CPU p99 x{s['cpu_p99_last_over_first']:.2f}; "
        f"load avg {r['load_avg_1m'][0]:.1f} -> {r['load_avg_1m'][1]:.1f}"
    )
    if args.json:
        atomic_write(args.json, json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
