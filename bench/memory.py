"""Peak resident memory of a process that loads one policy and runs control steps.

``python -m par_deploy.bench.memory engine BUNDLE`` imports only the runtime (numpy + onnxruntime);
``python -m par_deploy.bench.memory reference CKPT --denoise-steps K --sampler S`` the PyTorch reference
(``--control-steps N``: how many policy calls). Prints one JSON line: peak RSS (MB), load time (s), and which
heavy modules the process imported.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np


def _status_mb(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MB (None where there is no procfs)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: that survives exec, so a child started by
    a big process would report its parent's peak."""
    peak = _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak


def rss_mb() -> float:
    """This process's resident set now (VmRSS; needs Linux procfs)."""
    rss = _status_mb("VmRSS")
    if rss is None:
        raise OSError("the current resident set is read from /proc/self/status, which this system lacks")
    return rss


def run(kind: str, path: str, steps: int, k: int | None, sampler: str | None, threads: int) -> dict:
    t = time.perf_counter()
    if kind == "engine":
        from par_deploy import runtime

        policy = runtime.load(path, "onnx", threads=threads)
    else:
        import torch

        from par_deploy.reference import TorchPolicy

        torch.set_num_threads(threads)
        policy = TorchPolicy.from_pretrained(path, sampler=sampler, steps=k)
    load_s = time.perf_counter() - t
    s = policy.spec
    rng = np.random.default_rng(0)
    policy.reset()
    for _ in range(min(steps, s.max_blocks)):
        obs = {
            "rgb": rng.integers(0, 256, (s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8),
            "state": policy.normalizer.sample_state(rng),
        }
        policy.act(obs)
    peak_mb = peak_rss_mb()
    return {
        "kind": kind,
        "peak_rss_mb": peak_mb,
        "load_s": load_s,
        "steps": min(steps, s.max_blocks),
        "imported_torch": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=["engine", "reference"])
    ap.add_argument("path")
    ap.add_argument("--control-steps", type=int, default=8)
    ap.add_argument("--denoise-steps", type=int, default=None)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.kind, a.path, a.control_steps, a.denoise_steps, a.sampler, a.threads)))


if __name__ == "__main__":
    main()
