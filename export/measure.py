"""Latency and export-cost measurements of the deployment paths (``python -m par_deploy.export.measure``).

On a preset with randomised weights, one thread, all variants interleaved in every repeat (so load from other
processes hits them alike; the order rotates), medians of ``repeats`` calls:

- transformer step (embed + step + cache write): eager ``TorchPolicy`` vs ONNX Runtime (dynamo and legacy
  exporter graphs) vs TorchScript;
- whole control step (``act``: step + K=4 sampler) per backend;
- Action-DiT sampler at each K: eager loop vs ONNX Runtime unrolled graph vs ONNX Runtime condition graph +
  denoise-step graph loop;
- export time and size per backend / form.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from par_deploy.bench.timing import interleaved, summarize
from par_deploy.checkpoint import from_pretrained, save_pretrained
from par_deploy.config import preset
from par_deploy.export.bundler import export_bundle, load_policy
from par_deploy.export.parity import synthetic_observations
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.reference import TorchPolicy


def randomized_checkpoint(preset_name: str, out_dir: Path, scale: float = 0.02, seed: int = 0, **overrides) -> Path:
    """Save a ``save_pretrained`` checkpoint of a preset whose every parameter got ``scale`` * N(0, 1) added
    (the zero-initialised output layers otherwise make the untrained heads output 0)."""
    cfg = preset(preset_name, **overrides)
    torch.manual_seed(seed)
    model = PARModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return save_pretrained(model, Normalizer.identity(cfg.action_dim, cfg.state_dim), out_dir)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each function, run interleaved with a rotating order
    (``par_deploy.bench.timing.interleaved``: a variant that always ran right after a heavy one would look a
    few percent slower than it is; measured here: ~5% between two equal ONNX graphs)."""
    return {k: summarize(v)["p50"] for k, v in interleaved(fns, repeats, warmup).items()}


class _Stepper:
    """Calls ``step(obs, n)`` for n = 0, 1, ...; resets the policy when the cache is full (the median ignores
    those few slower calls)."""

    def __init__(self, policy, obs: list[dict[str, np.ndarray]], step: Callable[[dict, int], Any]):
        self.policy, self.obs, self.step, self.n = policy, obs, step, 0
        policy.reset()

    def __call__(self) -> None:
        if self.n == self.policy.spec.max_blocks:
            self.policy.reset()
            self.n = 0
        self.step(self.obs[self.n % len(self.obs)], self.n)
        self.n += 1


def _block_args(policy, o: dict[str, np.ndarray], n: int) -> tuple:
    s = policy.spec
    state = o.get("state", np.zeros(0, np.float32))
    return o["rgb"], state, np.zeros((s.chunk_len, s.action_dim), np.float32), n == 0, n


def measure(
    preset_name: str = "cpu-small",
    repeats: int = 100,
    steps: tuple[int, ...] = (4, 10),
    threads: int = 1,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every measurement; returns ``{"step_ms", "act_ms", "sampler_ms", "export", "table"}``."""
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="par-measure-") if work_dir is None else None
    root = Path(work_dir or tmp.name)
    try:
        ckpt = randomized_checkpoint(preset_name, root / "ckpt")
        model, normalizer = from_pretrained(ckpt)
        obs = synthetic_observations(model, 8)
        exports: dict[str, Any] = {}

        def bundle(name: str, **kw) -> Path:
            rep = export_bundle(ckpt, root / name, progress=False, overwrite=True, **kw)
            exports[name] = {
                "seconds": rep.seconds,
                "bytes": {b: rep.backend_bytes(b) for b in rep.backends},
                "parity": {b: p["actions_max_abs"] for b, p in rep.parity.items()},
            }
            if progress:
                print(rep.summary(), flush=True)
            return rep.bundle_dir

        main = bundle("main", backends=("onnx", "torchscript"), denoise_steps=4, sampler_graph="unrolled")
        legacy = bundle("legacy", backends=("onnx",), denoise_steps=4, sampler_graph="unrolled", onnx_exporter="legacy")
        samplers = {
            (k, form): bundle(f"k{k}_{form}", backends=("onnx",), denoise_steps=k, sampler_graph=form)
            for k in steps
            for form in ("unrolled", "loop")
        }

        ort = load_policy(main, "onnx", threads=threads)
        ort_legacy = load_policy(legacy, "onnx", threads=threads)
        ts = load_policy(main, "torchscript", threads=threads)
        eager = TorchPolicy(model, normalizer, sampler="ddim", steps=4)

        def block(p):
            return lambda o, n: p.step_block(*_block_args(p, o, n))

        step_ms = interleaved_medians(
            {
                "eager": _Stepper(eager, obs, block(eager)),
                "onnx (dynamo)": _Stepper(ort, obs, block(ort)),
                "onnx (legacy)": _Stepper(ort_legacy, obs, block(ort_legacy)),
                "torchscript": _Stepper(ts, obs, block(ts)),
            },
            repeats,
        )
        if progress:
            print("step ms", step_ms, flush=True)

        def act(p):
            def fn(o, n):
                if p.steps_left == 0:
                    p.reset()
                p.act(o)

            return fn

        act_ms = interleaved_medians(
            {
                "eager": _Stepper(eager, obs, act(eager)),
                "onnx": _Stepper(ort, obs, act(ort)),
                "torchscript": _Stepper(ts, obs, act(ts)),
            },
            repeats,
        )
        if progress:
            print("act ms (K=4)", act_ms, flush=True)

        sampler_ms = {}
        rng = np.random.default_rng(0)
        for k in steps:
            loops = {form: load_policy(samplers[(k, form)], "onnx", threads=threads) for form in ("unrolled", "loop")}
            for p in loops.values():
                p.reset()
                p.step_block(*_block_args(p, obs[0], 0))
            cond = torch.from_numpy(loops["unrolled"].last_action_cond)[None]
            schedule = model.sampler("ddim", k)
            noise = rng.standard_normal((k + 1, model.cfg.chunk_len, model.cfg.action_dim)).astype(np.float32)
            noise_t = torch.from_numpy(noise)[:, None]

            def eager_sample(schedule=schedule, noise_t=noise_t, cond=cond):
                with torch.no_grad():
                    model.sample_actions(cond, schedule, noise_t)

            sampler_ms[k] = interleaved_medians(
                {
                    "eager": eager_sample,
                    "onnx unrolled": lambda p=loops["unrolled"], noise=noise: p.sample(noise),
                    "onnx loop": lambda p=loops["loop"], noise=noise: p.sample(noise),
                },
                repeats,
            )
            if progress:
                print(f"sampler ms K={k}", sampler_ms[k], flush=True)
        result = {
            "preset": preset_name,
            "repeats": repeats,
            "threads": threads,
            "step_ms": step_ms,
            "act_ms": act_ms,
            "sampler_ms": {str(k): v for k, v in sampler_ms.items()},
            "export": exports,
        }
        result["table"] = format_table(result)
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_table(r: dict[str, Any]) -> str:
    """Markdown tables of a ``measure`` result."""
    lines = [
        f"preset {r['preset']}, {r['threads']} thread(s), interleaved, median of {r['repeats']}",
        "",
        "| transformer step | ms |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["step_ms"].items()]
    lines += ["", "| control step (act, K=4 unrolled) | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["act_ms"].items()]
    lines += ["", "| K | eager sampler | ONNX unrolled | ONNX condition + step loop |", "|---|---|---|---|"]
    for k, v in r["sampler_ms"].items():
        lines.append(f"| {k} | {v['eager']:.2f} | {v['onnx unrolled']:.2f} | {v['onnx loop']:.2f} |")
    lines += ["", "| bundle | backend | export s | engine MB |", "|---|---|---|---|"]
    for name, e in r["export"].items():
        for b, nbytes in e["bytes"].items():
            lines.append(f"| {name} | {b} | {e['seconds'].get(b, float('nan')):.1f} | {nbytes / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m par_deploy.export.measure", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 10])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    r = measure(a.preset, a.repeats, tuple(a.steps), a.threads)
    print(r["table"])
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
