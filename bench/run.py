"""``par-deploy bench``: latency, memory and scaling of an engine against the PyTorch reference, in one run.

Measured in one process, interleaved (every round runs each case once, in a rotating order):

- ``engine``: the bundle on ONNX Runtime (its few-step sampler, K baked in at export);
- ``reference_k``: eager PyTorch with the KV-cache, same sampler and K as the bundle;
- ``reference_train``: eager PyTorch with the KV-cache at the checkpoint's training schedule (DDPM, all
  ``train_timesteps`` steps);
- ``naive_k``: eager PyTorch without a KV-cache (the whole history recomputed every step), bundle's K.

For each: the transformer step (one block appended), the action sampler, and the whole control step, at
half the cache's length, interleaved with fp32 matmuls that measure this machine's sgemm rate
(``par_deploy.bench.roofline``: GFLOP per component counted on the reference, achieved GFLOP/s, fraction of
that rate); then the control step as the history grows from 1 block to the cache's maximum
(engine, reference_k, naive_k) and as K varies (engine bundles re-exported per K, reference_k). Peak resident
memory and cold load time come from two fresh processes (``par_deploy.bench.memory``): the engine process
imports the runtime only, the reference process torch and the model.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from par_deploy.bench import roofline
from par_deploy.bench.timing import interleaved, summarize
from par_deploy.errors import ParError
from par_deploy.locate import source_checkpoint, task_bundle

SCHEMA = "par-bench"
SCHEMA_VERSION = 1
TARGETS = {  # issue: bench targets, measured as ratios in one run
    "control_step_speedup_vs_train_schedule": (">=", 20.0),
    "control_step_speedup_vs_same_k": (">=", 2.0),
    "engine_full_cache_over_one_block": ("<=", 1.2),
    "engine_over_reference_peak_memory": ("<=", 0.5),
    "engine_control_step_fraction_of_sgemm": (">=", 0.5),  # issue #10: of the 512^3 one-thread sgemm rate
}


class BenchError(ParError):
    """The bundle or reference cannot be benchmarked (missing, mismatched, unreadable)."""


@dataclass
class BenchOptions:
    reps: int = 30
    warmup: int = 3
    threads: int = 1
    history: tuple[int, ...] = ()  # history lengths (blocks); default: 1, 1/4, 1/2, 3/4 and all of the cache
    ks: tuple[int, ...] = (1, 2, 4, 10)  # plus the bundle's K and the training schedule; () skips the sweep
    memory: bool = True
    progress: bool = True


def _inputs(spec, rng):
    rgb = rng.integers(0, 256, (spec.num_cameras, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    state = rng.standard_normal(spec.state_dim).astype(np.float32)
    prev = rng.uniform(-1, 1, (spec.chunk_len, spec.action_dim)).astype(np.float32)
    return rgb, state, prev


def _fill(policy, blocks: int, inputs) -> None:
    """Reset and append ``blocks`` blocks (so the next step is block ``blocks``)."""
    policy.reset()
    for n in range(blocks):
        policy.step_block(*inputs, n == 0, n)


def _noise(policy, rng):
    return rng.standard_normal(policy.noise_shape()).astype(np.float32)


def _step_cases(name: str, policy, step: int, inputs, noise) -> dict:
    def transformer():
        policy.step_block(*inputs, step == 0, step)

    def sampler():
        policy.sample(noise)

    def control():
        policy.step_block(*inputs, step == 0, step)
        policy.sample(noise)

    return {f"{name}/transformer_step": transformer, f"{name}/sampler": sampler, f"{name}/control_step": control}


def _machine(threads: int) -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _memory(kind: str, path: Path, threads: int, k: int | None = None, sampler: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "par_deploy.bench.memory", kind, str(path), "--threads", str(threads)]
    if k is not None:
        cmd += ["--denoise-steps", str(k), "--sampler", sampler]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
    )
    if proc.returncode != 0:
        raise BenchError(f"memory probe ({kind}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(bundle: str | Path, reference: str | Path | None = None, options: BenchOptions | None = None) -> dict:
    """Measure a bundle against its PyTorch reference; returns the JSON-ready result."""
    import torch

    from par_deploy import runtime
    from par_deploy.checkpoint import from_pretrained
    from par_deploy.reference import TorchPolicy

    opt = options or BenchOptions()
    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise BenchError(f"{bundle}: not a bundle (no manifest.json); run `par-deploy export` first")
    manifest = runtime.read_manifest(bundle)
    ckpt = Path(reference) if reference else source_checkpoint(bundle, manifest)
    if not (ckpt / "config.json").is_file():
        raise BenchError(f"{ckpt}: reference checkpoint not found; pass --reference CKPT")
    torch.set_num_threads(opt.threads)
    t = time.perf_counter()
    engine = runtime.load(bundle, "onnx", threads=opt.threads, checkpoint=ckpt)  # refuses a foreign bundle
    engine_load = time.perf_counter() - t
    t = time.perf_counter()
    model, norm = from_pretrained(ckpt)
    reference_load = time.perf_counter() - t
    cfg, K = model.cfg, engine.denoise_steps
    kind = manifest["sampler"]["kind"] if isinstance(manifest.get("sampler"), dict) else manifest["sampler"]
    policies = {
        "engine": engine,
        "reference_k": TorchPolicy(model, norm, kind, K),
        "reference_train": TorchPolicy(model, norm, "ddpm", cfg.train_timesteps),
        "naive_k": TorchPolicy(model, norm, kind, K, use_cache=False),
    }
    rng = np.random.default_rng(0)
    inputs = _inputs(engine.spec, rng)
    bar = _Bar(opt.progress)

    # 1. components at half the cache
    mid = max(0, cfg.max_blocks // 2 - 1)
    cases = {}
    for name, p in policies.items():
        _fill(p, mid, inputs)
        cases.update(_step_cases(name, p, mid, inputs, _noise(p, rng)))
    sgemm_cases = roofline.sgemm_cases(cfg)  # the machine's matmul rate, timed interleaved with the components
    cases.update(sgemm_cases)
    bar.stage("components", opt.reps)
    comp = {k: summarize(v) for k, v in interleaved(cases, opt.reps, opt.warmup, bar.advance).items()}
    sgemm = roofline.split_sgemm(comp, sgemm_cases, cfg)
    roof = roofline.roofline(
        roofline.count_flops(policies["reference_k"], mid, inputs, _noise(policies["reference_k"], rng)), sgemm, comp
    )

    # 2. history scaling
    max_b = cfg.max_blocks
    hist = sorted(set(opt.history or (1, max(1, max_b // 4), max(1, max_b // 2), max(1, 3 * max_b // 4), max_b)))
    hist_reps = max(5, opt.reps // 3)
    history = {name: {} for name in ("engine", "reference_k", "naive_k")}
    bar.stage("history", hist_reps * len(hist))
    for h in hist:
        cases = {}
        for name in history:
            p = policies[name]
            _fill(p, h - 1, inputs)
            cases[name] = _step_cases(name, p, h - 1, inputs, _noise(p, rng))[f"{name}/control_step"]
        for name, v in interleaved(cases, hist_reps, 1, bar.advance).items():
            history[name][h] = summarize(v)

    # 3. K sweep: engine bundles re-exported per K (onnx only), reference with the same sampler and K
    k_curve = {"engine": {}, "reference_k": {}}
    k_parity = {}
    ks = sorted(set(opt.ks) | {K, cfg.train_timesteps}) if opt.ks else []
    bar.stage("denoise steps", hist_reps * len(ks))
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            if k == K:
                eng = engine
            else:
                eng, k_parity[k] = _export_k(ckpt, Path(tmp) / f"k{k}", k, kind, opt.threads)
            ref = TorchPolicy(model, norm, kind, k)
            for p in (eng, ref):
                _fill(p, mid, inputs)
            cases = {
                "engine": _step_cases("e", eng, mid, inputs, _noise(eng, rng))["e/control_step"],
                "reference_k": _step_cases("r", ref, mid, inputs, _noise(ref, rng))["r/control_step"],
            }
            for name, v in interleaved(cases, hist_reps, 1, bar.advance).items():
                k_curve[name][k] = summarize(v)
    bar.close()

    # 4. memory and cold load, one fresh process each
    memory = {}
    if opt.memory:
        memory["engine"] = _memory("engine", bundle, opt.threads)
        memory["reference"] = _memory("reference", ckpt, opt.threads, K, kind)

    c = {k: v["p50"] for k, v in comp.items()}
    ratios = {
        "control_step_speedup_vs_train_schedule": c["reference_train/control_step"] / c["engine/control_step"],
        "control_step_speedup_vs_same_k": c["reference_k/control_step"] / c["engine/control_step"],
        "transformer_step_speedup": c["reference_k/transformer_step"] / c["engine/transformer_step"],
        "sampler_speedup_same_k": c["reference_k/sampler"] / c["engine/sampler"],
        "engine_full_cache_over_one_block": history["engine"][hist[-1]]["p50"] / history["engine"][hist[0]]["p50"],
        "reference_full_cache_over_one_block": history["reference_k"][hist[-1]]["p50"]
        / history["reference_k"][hist[0]]["p50"],
        "naive_full_cache_over_one_block": history["naive_k"][hist[-1]]["p50"] / history["naive_k"][hist[0]]["p50"],
        "engine_control_step_fraction_of_sgemm": roof["cases"]["engine/control_step"]["fraction_of_sgemm_512x512x512"],
    }
    if memory:
        ratios["engine_over_reference_peak_memory"] = (
            memory["engine"]["peak_rss_mb"] / memory["reference"]["peak_rss_mb"]
        )
    targets = {}
    for name, (op, bound) in TARGETS.items():
        if name in ratios:
            value = ratios[name]
            targets[name] = {
                "value": value,
                "target": f"{op} {bound}",
                "met": value >= bound if op == ">=" else value <= bound,
            }
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "bundle": str(bundle),
        "reference": str(ckpt),
        "config": {
            "preset_dims": {
                "dim": cfg.dim,
                "depth": cfg.depth,
                "block_len": cfg.block_len,
                "max_blocks": cfg.max_blocks,
            },
            "sampler": kind,
            "denoise_steps": K,
            "train_timesteps": cfg.train_timesteps,
            "history_point": mid + 1,
        },
        "options": asdict(opt),
        "machine": _machine(opt.threads),
        "load_s": {"engine": engine_load, "reference": reference_load},
        "components_ms": comp,
        "history_ms": {n: {str(h): s for h, s in v.items()} for n, v in history.items()},
        "k_ms": {n: {str(k): s for k, s in v.items()} for n, v in k_curve.items()},
        "k_sweep_parity": {str(k): v for k, v in k_parity.items()},
        "memory": memory,
        "ratios": ratios,
        "targets": targets,
        "roofline": roof,
    }


def _export_k(ckpt: Path, out: Path, k: int, kind: str, threads: int):
    """A bundle with K denoising steps, for timing. Its parity is recorded, not enforced: with K=1 the single
    x0 estimate at t=T-1 multiplies float differences by 1/sqrt(alpha_bar), so backends may differ by more
    than the deployment tolerance without any export error."""
    from par_deploy import runtime
    from par_deploy.export import export_bundle

    report = export_bundle(
        ckpt, out, backends=("onnx",), denoise_steps=k, sampler=kind, progress=False, require_parity=False
    )
    p = report.parity["onnx"]
    parity = {key: p[key] for key in ("hidden_max_abs", "actions_max_abs", "passed")}
    return runtime.load(out, "onnx", threads=threads), parity


class _Bar:
    def __init__(self, enabled: bool):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.p = Progress(TextColumn("bench {task.description}"), BarColumn(), MofNCompleteColumn())
            self.p.start()
        self.task = None

    def stage(self, name: str, total: int) -> None:
        if self.p:
            self.task = self.p.add_task(name, total=total)

    def advance(self, _round: int = 0) -> None:
        if self.p and self.task is not None:
            self.p.advance(self.task)

    def close(self) -> None:
        if self.p:
            self.p.stop()


def print_report(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg = result["config"]
    t = Table(
        title=f"control step at {cfg['history_point']} blocks of history (ms; {cfg['sampler']} "
        f"K={cfg['denoise_steps']}, train schedule {cfg['train_timesteps']} steps)"
    )
    for col in ("case", "p50", "p90", "p99", "min"):
        t.add_column(col, justify="right" if col != "case" else "left")
    for name, s in result["components_ms"].items():
        t.add_row(name, *(f"{s[k]:.2f}" for k in ("p50", "p90", "p99", "min")))
    console.print(t)
    if "roofline" in result:
        roofline.print_roofline(result["roofline"], console)
    r = Table(title="ratios (one run)")
    r.add_column("ratio")
    r.add_column("value", justify="right")
    r.add_column("target")
    for name, value in result["ratios"].items():
        tgt = result["targets"].get(name)
        mark = "" if not tgt else f"{tgt['target']} {'met' if tgt['met'] else 'MISSED'}"
        r.add_row(name, f"{value:.2f}", mark)
    console.print(r)
    if result["memory"]:
        m = result["memory"]
        console.print(
            f"peak RSS: engine process {m['engine']['peak_rss_mb']:.0f} MB (torch imported: "
            f"{m['engine']['imported_torch']}), reference process {m['reference']['peak_rss_mb']:.0f} MB; "
            f"cold load {m['engine']['load_s']:.2f} s vs {m['reference']['load_s']:.2f} s"
        )


def plot_result(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for name, curve in result["history_ms"].items():
        xs = sorted(int(h) for h in curve)
        a.plot(xs, [curve[str(x)]["p50"] for x in xs], marker="o", label=name)
    a.set_xlabel("history (blocks in the cache)")
    a.set_ylabel("control step p50 (ms)")
    a.set_title("cost vs history")
    a.legend()
    for name, curve in result["k_ms"].items():
        xs = sorted(int(k) for k in curve)
        if xs:
            b.plot(xs, [curve[str(x)]["p50"] for x in xs], marker="o", label=name)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("denoising steps K")
    b.set_ylabel("control step p50 (ms)")
    b.set_title("cost vs K")
    b.legend()
    if "roofline" in result:
        roofline.plot_roofline(c, result["roofline"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(
    engine: Path | None,
    reference: Path | None = None,
    json_out: Path | None = None,
    plot: Path | None = None,
    options: BenchOptions | None = None,
    task: str = "PushCube",
) -> dict:
    """What ``par-deploy bench`` does. Without ``engine``: ``task``'s shipped checkpoint through its bundle
    (``par_deploy.locate.task_bundle``: exported into bundles/<task> when missing or stale)."""
    from rich.console import Console

    if engine is None:
        resolved = task_bundle(task, Console(stderr=True))
        Console().print(f"{task}: {resolved.describe()}")
        engine, reference = resolved.bundle, reference or resolved.checkpoint
    result = bench(engine, reference, options)
    print_report(result)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        plot_result(result, plot)
    return result
