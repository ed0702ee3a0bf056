"""Synthetic episodes and models: tests, smoke runs and benchmarks without a simulator or a trained checkpoint.

Episodes (``synthetic_batch``): a coloured square moves across the frame under the actions (so frames depend on
actions and a model can learn both losses), the state is its position, actions are normalised to [-1, 1].
Models (``randomized_checkpoint``): a preset with every parameter perturbed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from par_deploy.config import PARConfig, preset


def synthetic_batch(
    cfg: PARConfig, batch: int = 2, blocks: int = 3, seed: int = 0, lengths: list[int] | None = None
) -> dict:
    """A batch of ``batch`` episodes with ``blocks`` input blocks (``blocks + 1`` frames).

    ``lengths`` (in blocks, each <= blocks) pads shorter episodes the way the training loader does.
    """
    g = torch.Generator().manual_seed(seed)
    B, N, L, A, H = batch, blocks, cfg.chunk_len, cfg.action_dim, cfg.image_size
    actions = torch.rand(B, N + 1, L, A, generator=g) * 2 - 1
    pos = torch.rand(B, 2, generator=g) * 0.5 + 0.25
    rgb = torch.zeros(B, N + 1, cfg.num_cameras, H, H, 3, dtype=torch.uint8)
    states = []
    side = max(2, H // 4)
    for n in range(N + 1):
        if n > 0:
            pos = (pos + 0.02 * actions[:, n, :, :2].sum(1)).clamp(0.1, 0.9)
        px = (pos * (H - side)).long()
        for b in range(B):
            y, x = int(px[b, 0]), int(px[b, 1])
            rgb[b, n, :, y : y + side, x : x + side, 0] = 220
            rgb[b, n, :, y : y + side, x : x + side, 1] = 40 + 30 * n % 200
        states.append(torch.cat([pos * 2 - 1, torch.zeros(B, max(cfg.state_dim - 2, 0))], 1)[:, : cfg.state_dim])
    state = torch.stack(states, 1)  # [B, N+1, S]
    boa = torch.zeros(B, N + 1, dtype=torch.bool)
    boa[:, 0] = True
    lengths = lengths or [N] * B
    block_valid = torch.arange(N + 1)[None, :] <= torch.tensor(lengths)[:, None]  # [B, N+1]
    action_valid = block_valid[:, :, None].expand(B, N + 1, L).clone()
    return {
        "rgb": rgb,
        "state": state,
        "actions": actions,
        "boa": boa,
        "block_valid": block_valid,
        "action_valid": action_valid,
        "instructions": [cfg.instructions[0]] * B,
    }


def write_synthetic_demos(
    out_dir,
    episodes: int = 4,
    image_size: int = 16,
    action_dim: int = 4,
    state_dim: int = 3,
    min_steps: int = 9,
    max_steps: int = 15,
    seed: int = 0,
    max_episode_steps: int = 16,
):
    """A demonstration directory in the ``par-demos`` format (train/demos.py) without the simulator:
    a square that moves with the actions, for training tests."""
    import json
    from pathlib import Path

    import numpy as np

    out = Path(out_dir)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    meta = synthetic_meta(image_size, state_dim, action_dim, "move the square", max_episode_steps)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    rng = np.random.default_rng(seed)
    side = max(2, image_size // 4)
    for i in range(episodes):
        T = int(rng.integers(min_steps, max_steps + 1))
        actions = rng.uniform(-1, 1, (T, action_dim)).astype(np.float32)
        pos = rng.uniform(0.2, 0.8, 2)
        rgb = np.zeros((T + 1, 1, image_size, image_size, 3), np.uint8)
        state = np.zeros((T + 1, state_dim), np.float32)
        for t in range(T + 1):
            if t:
                pos = np.clip(pos + 0.05 * actions[t - 1, :2], 0.05, 0.95)
            y, x = (pos * (image_size - side)).astype(int)
            rgb[t, 0, y : y + side, x : x + side] = (220, 60, 30)
            state[t, : min(2, state_dim)] = pos[: min(2, state_dim)]
        np.savez_compressed(
            out / "episodes" / f"ep_{i:06d}.npz",
            rgb=rgb,
            state=state,
            actions=actions,
            success=np.bool_(True),
            seed=np.int64(i),
        )
    return out


def synthetic_meta(image_size: int, state_dim: int, action_dim: int, instruction: str, max_episode_steps: int) -> dict:
    """``meta.json`` of a synthetic dataset (one camera, task ``Synthetic``)."""
    from par_deploy.train.demo_format import make_meta

    return make_meta(
        task="Synthetic",
        env_id="Synthetic-v0",
        control_mode="pd_ee_delta_pos",
        image_size=image_size,
        camera_names=["base"],
        state_keys=[("pos", state_dim)],
        action_dim=action_dim,
        instruction=instruction,
        max_episode_steps=max_episode_steps,
    )


def randomize_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add ``scale`` * N(0, 1) to every parameter, in place: the zero-initialised output layers otherwise make an
    untrained de-tokenizer output 0, which would make parity tests pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def randomized_checkpoint(preset_name: str, out_dir: Path, scale: float = 0.02, seed: int = 0, **overrides) -> Path:
    """Save a ``save_pretrained`` checkpoint of a preset (config ``overrides`` applied) with randomised weights
    (``randomize_``) and identity normalisation statistics."""
    from par_deploy.checkpoint import save_pretrained
    from par_deploy.model.par import PARModel
    from par_deploy.normalize import Normalizer

    cfg = preset(preset_name, **overrides)
    torch.manual_seed(seed)
    model = randomize_(PARModel(cfg).eval(), scale, seed)
    return save_pretrained(model, Normalizer.identity(cfg.action_dim, cfg.state_dim), out_dir)
