"""Predicted frames beside the real ones for one demonstration episode (the paper's Fig. 4).

The episode's real observations and executed chunks are fed block by block through the KV-cache (teacher
forcing, as in the control loop); after each block the frame de-tokenizer samples the next frame. The PNG has
two rows per camera: the real frames O_1..O_N on top, the predicted ones below.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from par_deploy.reference import TorchPolicy


@torch.no_grad()
def predict_episode_frames(
    policy: TorchPolicy, episode: dict, steps: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Returns real and predicted frames, uint8 ``[N, V, H, W, 3]`` each (the predicted pooled frames are
    shown at full size)."""
    from par_deploy.train.dataset import Episode, episode_blocks

    model, norm = policy.model, policy.normalizer
    ep = Episode(episode["rgb"], norm.normalize_state(episode["state"]), norm.normalize_action(episode["actions"]))
    blocks = episode_blocks(ep, model.cfg, phase=0, start=0, history=model.cfg.max_blocks)
    sampler = model.sampler("ddim", steps)
    g = torch.Generator().manual_seed(seed)
    policy.reset()
    real, pred = [], []
    for n in range(len(blocks["rgb"]) - 1):
        h = policy.block_hidden(blocks["rgb"][n], blocks["state"][n], blocks["actions"][n], n == 0, n)
        h_frames = model.split_block(h)[0]  # [1, K_o, D]
        noise = torch.randn(steps + 1, 1, model.cfg.frame_tokens, model.cfg.frame_token_dim, generator=g)
        pred.append(model.predict_frame(h_frames, sampler, noise)[0].numpy())
        real.append(blocks["rgb"][n + 1])
    return np.stack(real), np.stack(pred)


def frame_grid(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``[N, V, H, W, 3]`` pairs -> one image: for each camera a row of real frames over a row of predictions."""
    rows = []
    for v in range(real.shape[1]):
        rows.append(np.concatenate(list(real[:, v]), axis=1))
        rows.append(np.concatenate(list(pred[:, v]), axis=1))
    return np.concatenate(rows, axis=0)


def render_predictions(
    checkpoint: str | Path, data_dir: str | Path, episode: int, out: str | Path, steps: int = 10, seed: int = 0
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from par_deploy.train.demo_format import list_episodes, load_episode, load_meta

    paths = list_episodes(data_dir)
    if not 0 <= episode < len(paths):
        raise IndexError(f"{data_dir}: episode {episode} out of range (0..{len(paths) - 1})")
    ep = load_episode(paths[episode], load_meta(data_dir))
    real, pred = predict_episode_frames(TorchPolicy.from_pretrained(checkpoint), ep, steps, seed)
    grid = frame_grid(real, pred)
    scale = max(1, 256 // real.shape[2])
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    plt.imsave(str(out), grid)
    return Path(out)
