"""Two bundles of one checkpoint (e.g. fp32 and int8) and their reference, timed interleaved in one process.

``python -m par_deploy.bench.engines BUNDLE_A BUNDLE_B [--reps N] [--json OUT]`` prints the p50 speed-up of B
over A and of each over the PyTorch reference at the same K, per component (transformer step, sampler, control
step) at half the cache, one thread: the int8-vs-fp32 ratio of issue #10 in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from par_deploy.bench.roofline import COMPONENTS
from par_deploy.bench.run import BenchError, _fill, _inputs, _noise, _step_cases
from par_deploy.bench.timing import interleaved, summarize
from par_deploy.errors import ParError
from par_deploy.locate import source_checkpoint


def compare(a: str | Path, b: str | Path, reps: int = 50, warmup: int = 3) -> dict:
    """p50 ms of every case and the speed-ups ``b_over_a``, ``a_over_reference``, ``b_over_reference``."""
    import torch

    from par_deploy import runtime
    from par_deploy.checkpoint import from_pretrained
    from par_deploy.reference import TorchPolicy

    torch.set_num_threads(1)
    ma, mb = runtime.read_manifest(a), runtime.read_manifest(b)
    if ma["checkpoint_hash"] != mb["checkpoint_hash"] or ma["sampler"]["steps"] != mb["sampler"]["steps"]:
        raise BenchError(f"{a} and {b} come from different checkpoints or denoising steps; nothing to compare")
    ckpt = source_checkpoint(Path(a), ma)
    model, norm = from_pretrained(ckpt)
    pol = {"a": runtime.load(a, "onnx", threads=1, checkpoint=ckpt), "b": runtime.load(b, "onnx", threads=1)}
    pol["reference"] = TorchPolicy(model, norm, ma["sampler"]["kind"], pol["a"].denoise_steps)
    rng = np.random.default_rng(0)
    inputs, mid = _inputs(pol["a"].spec, rng), max(0, model.cfg.max_blocks // 2 - 1)
    cases = {}
    for name, p in pol.items():
        _fill(p, mid, inputs)
        cases.update(_step_cases(name, p, mid, inputs, _noise(p, rng)))
    load = os.getloadavg()[0]
    p50 = {k: summarize(v)["p50"] for k, v in interleaved(cases, reps, warmup).items()}

    def over(x: str, y: str) -> dict[str, float]:
        return {c: p50[f"{y}/{c}"] / p50[f"{x}/{c}"] for c in COMPONENTS}

    return {
        "a": {"bundle": str(a), "precision": ma["precision"]},
        "b": {"bundle": str(b), "precision": mb["precision"]},
        "reps": reps,
        "load_avg_1m": [load, os.getloadavg()[0]],
        "p50_ms": p50,
        "b_over_a": over("b", "a"),
        "a_over_reference": over("a", "reference"),
        "b_over_reference": over("b", "reference"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m par_deploy.bench.engines", description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        result = compare(args.a, args.b, args.reps)
    except ParError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key in ("b_over_a", "a_over_reference", "b_over_reference"):
        print(f"{key:18s}", "  ".join(f"{c} {v:.2f}x" for c, v in result[key].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
