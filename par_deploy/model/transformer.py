"""Transformer blocks (timm/NOVA naming: ``blocks.i.norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``),
used causally with RoPE and the block mask (the temporal backbone), or bidirectionally without RoPE (the
spatial set-by-set frame transformer).

Two block styles (``config.block_norm``): ``"pre"`` (``x + attn(norm1(x))``, the CPU presets) and ``"post"``
(``x + norm1(attn(x))``, ``x + norm2(mlp(x))``: NOVA's ``diffnext/models/vision_transformer.py`` Block, which
the paper preset uses so that NOVA's weights compute NOVA's function). The MLP's GELU is tanh-approximated or
exact (``config.activation``; NOVA: exact).

``CausalTransformer.forward`` runs a whole sequence (teacher forcing); ``CausalTransformer.step`` runs one
new block against a static KV-cache and returns the block's hidden states and its new keys/values, which the
caller writes into the cache (the form that exports cleanly: docs/design-notes.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from par_deploy.kernels.attention import attention, cache_attention
from par_deploy.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``past``: a static cache ``(k [B, H, S, hd], v, bias [B, 1, 1, S])``; then ``mask`` is the new
        tokens' own ``[T, T]`` visibility and the cache slots' visibility is the additive ``bias``."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
        if rope is not None:  # queries and keys rotated together: one RoPE per layer in the exported step
            qk = apply_rope(qkv[:2], *rope)  # [2, B, H, T, hd]
            q, k, v = qk[0], qk[1], qkv[2]
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
        if past is not None:
            out = cache_attention(q, k, v, *past, mask)  # [B, H, T, hd]
        else:
            out = attention(q, k, v, mask)  # [B, H, T, hd]
        return self.proj(out.transpose(1, 2).reshape(B, T, D)), k, v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, norm: str = "pre", activation: str = "gelu_tanh"):
        super().__init__()
        self.post_norm = norm == "post"
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), activation)

    def forward(self, x, mask, rope=None, past=None):
        if self.post_norm:  # NOVA: x + norm1(attn(x)), then x + norm2(mlp(x))
            h, k, v = self.attn(x, mask, rope, past)
            x = x + self.norm1(h)
            return x + self.norm2(self.mlp(x)), k, v
        h, k, v = self.attn(self.norm1(x), mask, rope, past)
        x = x + h
        return x + self.mlp(self.norm2(x)), k, v


class Transformer(nn.Module):
    """A stack of blocks with a final norm. Bidirectional (mask None) unless given a mask."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float, norm: str = "pre", activation: str = "gelu_tanh"
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, norm, activation) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        for blk in self.blocks:
            x, _, _ = blk(x, mask, rope)
        return self.norm(x)


class CausalTransformer(Transformer):
    """The temporal backbone (NOVA's video encoder): block-causal mask and RoPE over time."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float, norm: str = "pre", activation: str = "gelu_tanh"
    ):
        super().__init__(dim, depth, heads, mlp_ratio, norm, activation)
        self.heads, self.head_dim = heads, dim // heads

    def step(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        intra: torch.Tensor,
        bias: torch.Tensor,
        cache_k: Sequence[torch.Tensor],
        cache_v: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block against the cache.

        x ``[B, Bl, D]``; cache_k/v: one ``[B, H, S, hd]`` per layer (read only; a ``[layers, ...]`` tensor
        indexes as such); intra bool ``[Bl, Bl]``: the block's own visibility; bias ``[B, 1, 1, S]``: the cache
        slots' (``kernels.attention.past_bias``). Returns hidden ``[B, Bl, D]`` and the block's new keys/values
        ``[layers, B, H, Bl, hd]``.
        """
        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, intra, rope, (cache_k[i], cache_v[i], bias))
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), torch.stack(new_k), torch.stack(new_v)
