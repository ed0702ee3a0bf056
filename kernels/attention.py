"""Block-causal attention of one new block over a static KV-cache.

The cache holds ``S`` slots per layer (``[B, H, S, hd]``); slots ``< start`` are filled, the rest are stale.
A step attends over ``cat(cache, new_block)``: cache slots are visible iff ``slot < start`` (every earlier
block and the text prefix), the new block's own keys follow the constant intra-block rule (paper Fig. 3).
So the mask is a function of the position tensor only, the shapes never change between steps, and the cost
does not grow with history.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cache_step_mask(start: torch.Tensor, cache_len: int, intra: torch.Tensor) -> torch.Tensor:
    """Visibility of ``cat(cache slots, new keys)`` for the queries of the new block.

    start: int64 ``[1]``, first cache slot of the new block; intra: bool ``[Bl, Bl]``.
    Returns bool ``[Bl, cache_len + Bl]`` (True = may attend).
    """
    slots = torch.arange(cache_len, device=intra.device)  # [S]
    past = (slots < start).unsqueeze(0).expand(intra.shape[0], cache_len)  # [Bl, S]
    return torch.cat([past, intra], dim=1)  # [Bl, S + Bl]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Fused attention. q ``[B,H,Tq,hd]``, k/v ``[B,H,Tk,hd]``, mask bool ``[Tq,Tk]`` or None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax attention, the reference ``attention`` is tested against."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
