"""Round-trip overhead of the policy server against in-process ``act()`` (one client, loopback).

    python -m par_deploy.bench.server BUNDLE [--reps 200] [--json server_overhead.json]

One process holds the in-process runtime policy and the client; ``par-deploy serve`` runs in a child process
(as in deployment). Both get the same observation and noise every control step (their chunks are checked
equal), calls are interleaved with the order rotated per round, and both reset together when the cache is
full (the reset is not timed). Reported: p50/p90 of in-process ``act``, of the client's round trip, of the
server's own time per request (``server_ms``: decode + act + encode) and of the transport
(round trip - server_ms), and the overhead p50(round trip) - p50(in-process).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from par_deploy import runtime
from par_deploy.bench.timing import interleaved, summarize
from par_deploy.client import RemotePolicy
from par_deploy.serve.server import ServerProcess


def server_overhead(bundle: str | Path, reps: int = 200, backend: str = "onnx", seed: int = 0) -> dict[str, Any]:
    local = runtime.load(bundle, backend, threads=1)
    with ServerProcess(bundle, "--backend", backend) as server, RemotePolicy(server.url) as remote:
        rng = np.random.default_rng(seed)
        spec = local.spec
        obs = {
            "rgb": rng.integers(0, 256, (spec.num_cameras, spec.image_size, spec.image_size, 3), np.uint8),
            "state": rng.standard_normal(spec.state_dim).astype(np.float32),
        }
        noise = rng.standard_normal(local.noise_shape()).astype(np.float32)
        chunks: dict[str, np.ndarray] = {}
        server_ms: list[float] = []

        def remote_act() -> None:
            chunks["server"] = remote.act(obs, noise)
            server_ms.append(remote.last_timing["server_ms"])

        def next_round(_: int) -> None:
            if not np.array_equal(chunks["server"], chunks["in_process"]):
                raise AssertionError("the server's chunk differs from the in-process chunk for the same noise")
            if local.steps_left == 0:
                local.reset()
                remote.reset()

        for p in (local, remote):
            p.reset(seed=seed)
        cases = {"in_process": lambda: chunks.__setitem__("in_process", local.act(obs, noise)), "server": remote_act}
        samples = interleaved(cases, reps, warmup=3, on_round=next_round)
    server_ms = server_ms[-reps:]  # drop the warm-up calls
    transport = [rt - s / 1e3 for rt, s in zip(samples["server"], server_ms, strict=True)]
    result = {
        "bundle": str(bundle),
        "backend": backend,
        "reps": reps,
        "max_blocks": spec.max_blocks,
        "in_process_act": summarize(samples["in_process"]),
        "server_round_trip": summarize(samples["server"]),
        "server_time": summarize([s / 1e3 for s in server_ms]),
        "transport": summarize(transport),
    }
    result["overhead_p50_ms"] = result["server_round_trip"]["p50"] - result["in_process_act"]["p50"]
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    r = server_overhead(args.bundle, args.reps, args.backend)
    for key in ("in_process_act", "server_round_trip", "server_time", "transport"):
        s = r[key]
        print(f"{key:18s} p50 {s['p50']:8.3f} ms  p90 {s['p90']:8.3f} ms  (n={s['n']})")
    print(f"overhead (p50 round trip - p50 in-process): {r['overhead_p50_ms']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
