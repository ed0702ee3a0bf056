"""Rotary position embedding over time with distinct frequency settings for frame and action tokens.

Per block token we keep three constants: ``mult`` (1 for observation tokens, the env steps between blocks
``config.stride`` for action tokens: the action rate),
``offset`` (0, or the action index j) and the inverse-frequency row of its kind. The rotation angle of a
token of block ``n`` is ``(n * mult + offset) * inv_freq``; it is computed from the block index *tensor*, so
one exported step graph serves every position.
"""

from __future__ import annotations

import torch
from torch import nn

from par_deploy.config import PARConfig
from par_deploy.model.layout import ACT, block_meta


def inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [hd/2]


class BlockRope(nn.Module):
    def __init__(self, cfg: PARConfig):
        super().__init__()
        hd = cfg.dim // cfg.heads
        meta = block_meta(cfg)
        is_act = meta.kind == ACT
        freq = torch.where(is_act[:, None], inv_freq(cfg.rope_theta_action, hd), inv_freq(cfg.rope_theta_frame, hd))
        self.register_buffer("mult", torch.where(is_act, cfg.stride, 1).float(), persistent=False)  # [Bl]
        self.register_buffer("offset", meta.index.float() * is_act, persistent=False)  # [Bl]
        self.register_buffer("freq", freq, persistent=False)  # [Bl, hd/2]
        self.half = hd // 2
        self.num_text = cfg.num_text_tokens

    def block(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, 1, Bl, hd/2]`` for block indices ``n`` (int64 ``[B]``: one per batch row, each its own
        episode), broadcasting over the heads of ``[B, H, Bl, hd]``."""
        pos = n.to(self.freq.dtype)[:, None] * self.mult + self.offset  # [B, Bl]
        angle = pos[:, None, :, None] * self.freq  # [B, 1, Bl, hd/2]
        return angle.cos(), angle.sin()

    def text(self) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = self.freq.new_zeros(self.num_text, self.half)
        return zeros.cos(), zeros.sin()

    def sequence(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[K_t + N * Bl, hd/2]`` for a whole teacher-forced sequence."""
        blocks = [self.block(torch.tensor([n], device=self.freq.device)) for n in range(num_blocks)]
        parts = [self.text()] + [(c[0, 0], s[0, 0]) for c, s in blocks]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, T, hd]``; cos/sin ``[T, hd/2]`` (or broadcastable to ``[B, H, T, hd/2]``); rotates the two
    halves of each head (GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
