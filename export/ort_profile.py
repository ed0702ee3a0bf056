"""Where a bundle's ONNX graphs spend their time: ONNX Runtime's profiler, node counts before/after its optimizer.

``python -m par_deploy.export.ort_profile BUNDLE [--runs N] [--json OUT]`` prints, per graph: the node count
per op type of the file and of the graph ONNX Runtime actually runs (``ORT_ENABLE_ALL`` minus the runtime's
``DISABLED_OPTIMIZERS``, as the runtime loads it), and the kernel time per op type per run (top ops), on random
inputs of the manifest's shapes, one thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from par_deploy.errors import ParError
from par_deploy.runtime.bundle import open_bundle


def node_counts(path: Path) -> dict[str, int]:
    """Nodes per op type of the main graph (``domain::op`` outside ai.onnx), most frequent first."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    c = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph.node
    )
    return dict(c.most_common())


def _feeds(spec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for t in spec.inputs:
        if t.dtype == "uint8":
            feeds[t.name] = rng.integers(0, 256, t.shape, dtype=np.uint8)
        elif t.dtype == "int64":  # positions / step indices: a valid one
            feeds[t.name] = np.ones(t.shape, np.int64)
        elif t.dtype == "bool":
            feeds[t.name] = np.zeros(t.shape, bool)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feeds


def profile_graph(path: Path, spec, runs: int = 50, seed: int = 0) -> dict:
    """Node counts (file / as optimized by ONNX Runtime) and kernel ms per run by op type, one thread."""
    from par_deploy.runtime.onnx_policy import create_session, session_options

    with tempfile.TemporaryDirectory(prefix="par-profile-") as tmp:
        so = session_options(1)
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        so.log_severity_level = 3
        sess = create_session(path, so)
        optimized = node_counts(Path(so.optimized_model_filepath))
        feeds = _feeds(spec, np.random.default_rng(seed))
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]  # microseconds
    total = sum(by_op.values())
    file_counts = node_counts(path)
    return {
        "nodes": sum(file_counts.values()),
        "nodes_by_op": file_counts,
        "optimized_nodes": sum(optimized.values()),
        "optimized_nodes_by_op": optimized,
        "runs": runs,
        "kernel_ms_per_run": total / runs / 1e3,
        "ops_by_time": [
            {"op": op, "ms_per_run": us / runs / 1e3, "share": us / total} for op, us in by_op.most_common()
        ],
    }


def profile_bundle(bundle_dir: str | Path, runs: int = 50) -> dict[str, dict]:
    """``profile_graph`` for every ONNX graph of a bundle (the files the runtime loads)."""
    bundle = open_bundle(bundle_dir, "onnx")
    return {name: profile_graph(bundle.engine_path("onnx", name), spec, runs) for name, spec in bundle.graphs.items()}


def format_profile(result: dict[str, dict], top: int = 10) -> str:
    lines = []
    for name, p in result.items():
        lines.append(
            f"{name}: {p['nodes']} nodes in the file, {p['optimized_nodes']} after ONNX Runtime's "
            f"optimizer; kernels {p['kernel_ms_per_run']:.2f} ms per run ({p['runs']} runs)"
        )
        lines.append("  file:      " + ", ".join(f"{k} {v}" for k, v in list(p["nodes_by_op"].items())[:top]))
        lines.append("  optimized: " + ", ".join(f"{k} {v}" for k, v in list(p["optimized_nodes_by_op"].items())[:top]))
        lines.append(
            "  by time:   "
            + ", ".join(f"{o['op']} {o['ms_per_run']:.2f} ms ({100 * o['share']:.0f}%)" for o in p["ops_by_time"][:top])
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m par_deploy.export.ort_profile", description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--json", default=None, help="also write the profile as JSON")
    a = p.parse_args(argv)
    try:
        result = profile_bundle(a.bundle, a.runs)
    except ParError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_profile(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
