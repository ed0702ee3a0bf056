"""Synthetic episodes in the training-batch layout: tests, smoke runs and benchmarks without a simulator.

A coloured square moves across the frame under the actions (so frames depend on actions and a model can
learn both losses), the state is its position, actions are normalised to [-1, 1].
"""

from __future__ import annotations

import torch

from par_deploy.config import PARConfig


def synthetic_batch(cfg: PARConfig, batch: int = 2, blocks: int = 3, seed: int = 0,
                    lengths: list[int] | None = None) -> dict:
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
        "rgb": rgb, "state": state, "actions": actions, "boa": boa, "block_valid": block_valid,
        "action_valid": action_valid, "instructions": [cfg.instructions[0]] * B,
    }
