"""Robots per second against the batch: one engine call stepping N independent episodes (``export --batch N``).

``par-deploy bench --batch 8`` exports the bundle's checkpoint at batch 2, 4, 8 (same sampler, K, precision;
the bundle itself serves batch 1 when it is a batch-1 bundle) and times, interleaved in one process, one
control step of every row (the batched step graph + the batched sampler, through ``BatchPolicy``'s engine
hooks, as the components stage times ``step_block`` + ``sample``) at half the cache. Robots/s = N / p50.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from par_deploy.bench.timing import interleaved, summarize


def batch_sizes(requested: tuple[int, ...]) -> list[int]:
    """1, the powers of two below the largest request, and the requests: ``(8,)`` -> ``[1, 2, 4, 8]``."""
    top = max(requested)
    sizes = {1, *requested}
    n = 2
    while n < top:
        sizes.add(n)
        n *= 2
    return sorted(sizes)


def _export(ckpt: Path, out: Path, n: int, manifest: dict) -> dict:
    from par_deploy.export import export_bundle

    sampler = manifest["sampler"]
    report = export_bundle(
        ckpt,
        out,
        backends=("onnx",),
        denoise_steps=int(sampler["steps"]),
        sampler=sampler["kind"],
        sampler_graph=sampler["graph"],
        precision=manifest["precision"],
        progress=False,
        batch=n,
    )
    return {"seconds": report.seconds["total"], "parity_passed": report.parity["onnx"]["passed"]}


def _case(policy, mid: int, seed: int):
    """One control step of every row at block ``mid``: the timed callable."""
    s, n = policy.spec, policy.batch
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (n, s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8)
    state = rng.standard_normal((n, s.state_dim)).astype(np.float32)
    policy.reset()
    for _ in range(mid):
        policy.act_batch({"rgb": rgb, "state": state} if s.state_dim else {"rgb": rgb})
    prev = policy.last_chunk
    first, pos = np.zeros(n, bool), np.full(n, mid, np.int64)
    noise = rng.standard_normal((policy.denoise_steps + 1, n, s.chunk_len, s.action_dim)).astype(np.float32)
    rows = list(range(n))
    state_in = policy.normalizer.normalize_state(state) if s.state_dim else state

    def control_step() -> None:
        policy.step_rows(rgb, state_in, prev, first, pos, rows)
        policy.sample_rows(noise)

    return control_step


def batch_sweep(bundle: Path, ckpt: Path, requested: tuple[int, ...], reps: int, threads: int, bar=None) -> dict:
    """Robots/s at each batch size of ``batch_sizes(requested)``; see the module docstring."""
    from par_deploy import runtime

    manifest = runtime.read_manifest(bundle)
    sizes = batch_sizes(requested)
    exports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="par-batch-") as tmp:
        cases = {}
        for n in sizes:
            path = bundle
            if n != int(manifest.get("batch", 1)):
                path = Path(tmp) / f"batch{n}"
                exports[str(n)] = _export(ckpt, path, n, manifest)
            policy = runtime.load_batch(path, threads=threads, checkpoint=ckpt)
            mid = max(0, policy.spec.max_blocks // 2 - 1)
            cases[str(n)] = _case(policy, mid, seed=n)
        if bar is not None:
            bar.stage("batch", reps)
        timed = interleaved(cases, reps, 3, bar.advance if bar is not None else None)
    ms = {n: summarize(v) for n, v in timed.items()}
    robots = {n: int(n) / (ms[n]["p50"] / 1e3) for n in ms}
    return {
        "sizes": sizes,
        "history_point": mid + 1,
        "control_step_ms": ms,
        "per_robot_ms": {n: ms[n]["p50"] / int(n) for n in ms},
        "robots_per_s": robots,
        "robots_per_s_over_batch_1": {n: robots[n] / robots["1"] for n in ms},
        "exports": exports,
    }


def print_batch(result: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"batched engines: one control step of N episodes at {result['history_point']} blocks (p50)")
    for col in ("N", "ms per call", "ms per robot", "robots/s", "vs batch 1"):
        t.add_column(col, justify="right")
    for n in map(str, result["sizes"]):
        t.add_row(
            n,
            f"{result['control_step_ms'][n]['p50']:.2f}",
            f"{result['per_robot_ms'][n]:.2f}",
            f"{result['robots_per_s'][n]:.1f}",
            f"{result['robots_per_s_over_batch_1'][n]:.2f}x",
        )
    console.print(t)


def plot_batch(ax, result: dict) -> None:
    xs = result["sizes"]
    ax.plot(xs, [result["robots_per_s"][str(n)] for n in xs], marker="o", label="engine")
    ax.plot(xs, [result["robots_per_s"]["1"] * n for n in xs], linestyle=":", color="gray", label="linear in N")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch N (episodes per engine call)")
    ax.set_ylabel("robots/s (control steps per second)")
    ax.set_title("throughput vs batch")
    ax.legend()
