"""``par-deploy info`` and ``par-deploy demo``: what a model is, and the main job run end to end."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from par_deploy.config import preset as make_preset
from par_deploy.model.par import PARModel

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CHECKPOINT = REPO_ROOT / "checkpoints" / "pushcube-cpu-small"
PAPER_TABLE_1_M = {"causal_transformer": 608.7, "frame_detokenizer": 32.8, "action_detokenizer": 21.1,
                   "action_tokenizer": 0.6, "total": 663.2}


def describe(preset: str = "cpu-small", checkpoint: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    if checkpoint is not None:
        from par_deploy.config import PARConfig

        cfg, title = PARConfig.load(Path(checkpoint) / "config.json"), str(checkpoint)
    else:
        cfg, title = make_preset(preset), f"preset {preset}"
    with torch.device("meta"):
        groups = PARModel(cfg, load_frozen=False).parameter_groups()
    table = Table(title=f"PAR parameters, {title}")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    table.add_column("paper Table 1", justify="right")
    for name, count in groups.items():
        table.add_row(name, f"{count / 1e6:.2f}M", f"{PAPER_TABLE_1_M[name]}M")
    console.print(table)
    console.print(
        f"tokens per block: {cfg.frame_tokens} frame + {cfg.state_tokens} state + {cfg.chunk_len} action; "
        f"text prefix {cfg.num_text_tokens}; cache {cfg.max_blocks} blocks = {cfg.max_seq_len} slots; "
        f"variant {cfg.variant}; codec {cfg.codec}"
    )
    return groups


def _demo_checkpoint(checkpoint: Path | None, console: Console) -> Path:
    """The checkpoint the demo runs: the given one, the shipped one, or (until one is shipped) an untrained
    cpu-small model saved under bundles/ with the PushCube observation layout."""
    if checkpoint is not None:
        return Path(checkpoint)
    if SHIPPED_CHECKPOINT.exists():
        return SHIPPED_CHECKPOINT
    from par_deploy.checkpoint import save_pretrained
    from par_deploy.normalize import Normalizer

    path = REPO_ROOT / "bundles" / "untrained-cpu-small"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = make_preset("cpu-small", state_dim=16, max_blocks=13, extra={"task": "PushCube"})
        save_pretrained(PARModel(cfg), Normalizer.identity(cfg.action_dim, cfg.state_dim), path)
    console.print("[yellow]no trained checkpoint is shipped yet: running an untrained cpu-small model[/]")
    return path


def _demo_bundle(checkpoint: Path, console: Console) -> Path:
    """Export (once) the checkpoint to an ONNX bundle under bundles/; re-export when the checkpoint changed."""
    from par_deploy import runtime
    from par_deploy.export import export_bundle

    bundle = REPO_ROOT / "bundles" / f"{checkpoint.name}-onnx-ddim4"
    try:
        runtime.load(bundle, "onnx", checkpoint=checkpoint)
        return bundle
    except Exception:  # missing, stale or from another checkpoint: export anew
        pass
    console.print(f"exporting {checkpoint} -> {bundle} (ONNX, DDIM 4 steps)")
    report = export_bundle(checkpoint, bundle, backends=("onnx",), denoise_steps=4, sampler="ddim",
                           progress=False, overwrite=True)
    parity = report.parity["onnx"]
    console.print(f"export {report.seconds['total']:.1f} s; parity vs PyTorch: actions "
                  f"{parity['actions_max_abs']:.1e}, hidden {parity['hidden_max_abs']:.1e}")
    return bundle


def run_demo(checkpoint: Path | None = None, steps: int = 0, seed: int = 0, console: Console | None = None) -> dict:
    """The main job: checkpoint -> ONNX engine -> the torch-free runtime drives a ManiSkill episode.

    ``steps`` limits the control steps (0: the task's episode length). Without the simulator the runtime is
    fed random observations instead, and the output says so.
    """
    from par_deploy import runtime
    from par_deploy.threads import free_cores

    torch.set_num_threads(free_cores())
    console = console or Console()
    ckpt = _demo_checkpoint(checkpoint, console)
    policy = runtime.load(_demo_bundle(ckpt, console), "onnx", seed=seed)
    task = policy.bundle.config.extra.get("task", "PushCube")
    s = policy.spec
    env = None
    try:
        from par_deploy.sim import make_env

        env = make_env(task, image_size=s.image_size)
        obs = env.reset(seed=500_000 + seed)
        source = f"ManiSkill {task}, initial state seed {500_000 + seed}"
    except Exception as e:  # the simulator is optional for the demo: say why it is not used
        rng = np.random.default_rng(seed)
        console.print(f"[yellow]simulator unavailable ({type(e).__name__}: {e}); random observations[/]")
        source = "random observations"

        def random_obs():
            return {"rgb": rng.integers(0, 256, (s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8),
                    "state": policy.normalizer.sample_state(rng)}
        obs = random_obs()
    policy.reset()
    limit = steps or s.max_blocks
    latencies, success, env_steps = [], False, 0
    for n in range(min(limit, s.max_blocks)):
        t = time.perf_counter()
        chunk = policy.act(obs)
        latencies.append((time.perf_counter() - t) * 1e3)
        if env is None:
            obs = random_obs()
        else:
            for action in chunk:
                obs, _, terminated, truncated, info = env.step(action)
                env_steps += 1
                success = success or bool(info["success"])
                if terminated or truncated:
                    break
        console.print(f"step {n}: chunk {chunk.shape}, first action {np.round(chunk[0], 3).tolist()}, "
                      f"{latencies[-1]:.1f} ms" + (f", success {success}" if env is not None else ""))
        if env is not None and (success or terminated or truncated):
            break
    if env is not None:
        env.close()
    summary = {"source": source, "control_steps": len(latencies), "env_steps": env_steps, "success": success,
               "act_ms_p50": float(np.median(latencies)), "backend": "onnx", "denoise_steps": policy.denoise_steps}
    console.print(f"[bold]{source}: {len(latencies)} control steps ({env_steps} env steps), success {success}; "
                  f"engine act() p50 {summary['act_ms_p50']:.1f} ms on ONNX Runtime[/]")
    return summary
