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


def run_demo(checkpoint: Path | None = None, steps: int = 6, seed: int = 0, console: Console | None = None) -> list:
    """Run an episode-shaped rollout: reset, then ``steps`` control steps, one action chunk each."""
    from par_deploy.normalize import Normalizer
    from par_deploy.reference import TorchPolicy
    from par_deploy.threads import free_cores

    torch.set_num_threads(free_cores())
    console = console or Console()
    checkpoint = checkpoint or (SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.exists() else None)
    if checkpoint is not None:
        policy = TorchPolicy.from_pretrained(checkpoint, seed=seed)
        console.print(f"checkpoint: {checkpoint}")
    else:
        torch.manual_seed(seed)
        model = PARModel(make_preset("cpu-small", state_dim=25)).eval()
        cfg = model.cfg
        policy = TorchPolicy(model, Normalizer.identity(cfg.action_dim, cfg.state_dim), seed=seed)
        console.print("no trained checkpoint shipped yet: running the cpu-small preset with untrained weights")
    s = policy.spec
    rng = np.random.default_rng(seed)
    policy.reset()
    chunks = []
    for n in range(min(steps, s.max_blocks)):
        obs = {"rgb": rng.integers(0, 256, (s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8),
               "state": rng.standard_normal(s.state_dim).astype(np.float32)}
        t = time.perf_counter()
        chunk = policy.act(obs)
        ms = (time.perf_counter() - t) * 1e3
        chunks.append(chunk)
        console.print(f"step {n}: chunk {chunk.shape} first action {np.round(chunk[0], 3).tolist()} ({ms:.1f} ms)")
    console.print(f"{len(chunks)} control steps, {len(chunks) * s.chunk_len} actions, "
                  f"{policy.denoise_steps} denoising steps per chunk (PyTorch reference, random observations)")
    return chunks
