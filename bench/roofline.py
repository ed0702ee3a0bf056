"""Roofline of a control step: its FLOPs (counted once on the PyTorch reference) against this machine's sgemm rate.

- ``count_flops``: ``torch.utils.flop_counter.FlopCounterMode`` around the reference policy's transformer step,
  sampler and whole control step (matmuls, attention and convolutions: the work a fused engine cannot skip).
- ``sgemm_cases``: fp32 matmuls at 512^3 and at the step's own shape (block tokens x width x MLP width), timed
  by the benchmark interleaved with the components, so the machine's load hits both alike.
- ``roofline``: achieved GFLOP/s of each case and its fraction of the measured sgemm rate.
"""

from __future__ import annotations

from collections.abc import Callable

SGEMM_PREFIX = "sgemm/"
COMPONENTS = ("transformer_step", "sampler", "control_step")
# the cases whose FLOPs are the ones counted on the reference at the bundle's K with the KV-cache (the training
# schedule's sampler and the cacheless reference do other amounts of work)
SAME_WORK = ("engine", "reference_k")


def count_flops(policy, step: int, inputs: tuple, noise) -> dict[str, float]:
    """GFLOP of each component of ``policy`` (a ``TorchPolicy``) at history ``step``; the cache is rewritten at
    the same slot, so the policy's state afterwards is what a timed ``step_block(step)`` leaves."""
    from torch.utils.flop_counter import FlopCounterMode

    def measured(fn: Callable[[], object]) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    first = step == 0
    transformer = measured(lambda: policy.step_block(*inputs, first, step))
    sampler = measured(lambda: policy.sample(noise))
    return {"transformer_step": transformer, "sampler": sampler, "control_step": transformer + sampler}


def sgemm_shapes(cfg) -> dict[str, tuple[int, int, int]]:
    """``name -> (M, K, N)``: the 512^3 probe and the step's largest matmul (block tokens x dim x MLP width)."""
    return {"512x512x512": (512, 512, 512), "step_shape": (cfg.block_len, cfg.dim, int(cfg.dim * cfg.mlp_ratio))}


def sgemm_cases(cfg, seed: int = 0) -> dict[str, Callable[[], object]]:
    """Timed cases (torch fp32 matmul into a preallocated output, at the process's torch thread count)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cases = {}
    for name, (m, k, n) in sgemm_shapes(cfg).items():
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)  # [M, K], [K, N]
        out = torch.empty(m, n)  # [M, N]
        # repeat small shapes so one sample is ~as long as a 512^3 product (timer resolution, call overhead)
        reps = max(1, round(512**3 / (m * k * n)))
        cases[SGEMM_PREFIX + name] = _matmul(a, b, out, reps)
    return cases


def _matmul(a, b, out, reps: int) -> Callable[[], None]:
    import torch

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b, out=out)

    run.reps = reps  # type: ignore[attr-defined]
    return run


def split_sgemm(comp: dict[str, dict], cases: dict[str, Callable[[], object]], cfg) -> dict[str, dict]:
    """Remove the sgemm timings from ``comp`` (summaries, ms) and return their rates: ``name -> {shape, gflops}``."""
    out = {}
    for name, (m, k, n) in sgemm_shapes(cfg).items():
        stats = comp.pop(SGEMM_PREFIX + name)
        reps = cases[SGEMM_PREFIX + name].reps
        out[name] = {
            "shape_mkn": [m, k, n],
            "ms_per_matmul": stats["p50"] / reps,
            "gflops": 2.0 * m * k * n * reps / (stats["p50"] * 1e6),
        }
    return out


def roofline(
    gflop: dict[str, float], sgemm: dict[str, dict], comp: dict[str, dict], policies: tuple[str, ...] = SAME_WORK
) -> dict:
    """Per timed case ``policy/component`` of ``policies`` (those doing the counted work: the same K, with the
    cache): GFLOP, achieved GFLOP/s at p50 and its fraction of each sgemm rate."""
    cases = {}
    for case, stats in comp.items():
        policy, component = case.rsplit("/", 1)
        if policy not in policies or component not in gflop or stats["p50"] <= 0:
            continue
        rate = gflop[component] / (stats["p50"] / 1e3)
        cases[case] = {
            "gflop": gflop[component],
            "gflops": rate,
            **{f"fraction_of_sgemm_{n}": rate / s["gflops"] for n, s in sgemm.items()},
        }
    return {
        "gflop_per_component": gflop,
        "sgemm": sgemm,
        "cases": cases,
        "counted_on": "PyTorch reference (torch.utils.flop_counter.FlopCounterMode)",
    }


def print_roofline(roof: dict, console) -> None:
    from rich.table import Table

    sg = roof["sgemm"]
    rates = ", ".join(f"{n} {s['gflops']:.0f} GFLOP/s" for n, s in sg.items())
    t = Table(title=f"roofline (p50; sgemm measured in the same run: {rates})")
    t.add_column("case", no_wrap=True)
    for col in ("GFLOP", "GFLOP/s", *(f"% of {n}" for n in sg)):
        t.add_column(col, justify="right")
    for case, r in roof["cases"].items():
        t.add_row(
            case, f"{r['gflop']:.3f}", f"{r['gflops']:.1f}", *(f"{100 * r[f'fraction_of_sgemm_{n}']:.0f}%" for n in sg)
        )
    console.print(t)


def plot_roofline(ax, roof: dict) -> None:
    """Bars: achieved GFLOP/s per component and policy; dashed lines: the measured sgemm rates."""
    import numpy as np

    policies = sorted({c.rsplit("/", 1)[0] for c in roof["cases"]})
    x = np.arange(len(COMPONENTS))
    width = 0.8 / max(1, len(policies))
    for i, p in enumerate(policies):
        ys = [roof["cases"].get(f"{p}/{c}", {}).get("gflops", 0.0) for c in COMPONENTS]
        ax.bar(x + i * width, ys, width, label=p)
    for name, s in roof["sgemm"].items():
        ax.axhline(s["gflops"], linestyle="--", linewidth=1, color="gray")
        ax.annotate(f"sgemm {name}", (x[-1] + 0.8, s["gflops"]), fontsize=7, ha="right", va="bottom")
    ax.set_xticks(x + 0.4 - width / 2, COMPONENTS)
    ax.set_ylabel("achieved GFLOP/s (p50)")
    ax.set_title("roofline")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.8))
