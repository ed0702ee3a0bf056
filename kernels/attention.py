"""Block-causal attention of one new block over a static KV-cache.

The cache holds ``S`` slots per layer (``[B, H, S, hd]``); slots ``< start`` are filled, the rest are stale.
A step attends over ``[cache; new block]``: cache slots are visible iff ``slot < start`` (every earlier
block and the text prefix), the new block's own keys follow the constant intra-block rule (paper Fig. 3).
So the mask is a function of the position tensor only, the shapes never change between steps, and the cost
does not grow with history.

``cache_attention`` is the form the step graph runs: two score matmuls (``q @ cache_k^T``, ``q @ k_new^T``), one
softmax over their concatenation (``[Bl, S + Bl]`` scores per head), two value matmuls: the cache itself is never
concatenated with the new keys/values (that copied the whole cache twice per layer per step: 14% of the exported
step's time, issue #10). Measured on one layer of the shipped model in ONNX Runtime, one thread, interleaved:
229 us vs 287 us for SDPA over the concatenated cache; an explicit two-part softmax (no concatenation at all,
more elementwise nodes) 252 us.
Each row of ``start`` is its own episode's position (batched engines).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def past_visible(start: torch.Tensor, cache_len: int) -> torch.Tensor:
    """start int64 ``[B]`` (first cache slot of each row's new block) -> bool ``[B, S]``: visible cache slots."""
    slots = torch.arange(cache_len, device=start.device)  # [S]
    return slots.unsqueeze(0) < start.unsqueeze(1)  # [B, S]


def past_bias(start: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Additive attention bias ``[B, 1, 1, S]`` of the cache slots: 0 where visible, -inf elsewhere."""
    visible = past_visible(start, cache_len)
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=start.device).masked_fill(~visible, float("-inf"))
    return bias[:, None, None, :]


def cache_step_mask(start: torch.Tensor, cache_len: int, intra: torch.Tensor) -> torch.Tensor:
    """Visibility of ``cat(cache slots, new keys)`` for the queries of the new block (one row, ``start [1]``).

    intra: bool ``[Bl, Bl]``. Returns bool ``[Bl, cache_len + Bl]`` (True = may attend).
    """
    past = past_visible(start, cache_len).expand(intra.shape[0], cache_len)  # [Bl, S]
    return torch.cat([past, intra], dim=1)  # [Bl, S + Bl]


def cache_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    bias: torch.Tensor,
    intra: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of the new block over ``[cache; new]``.

    q/k/v ``[B, H, Bl, hd]`` (the new block), cache_k/v ``[B, H, S, hd]`` (read only), bias ``[B, 1, 1, S]``
    (``past_bias``), intra bool ``[Bl, Bl]`` (every row has a True: a query sees itself, so no softmax row is
    all -inf). Returns ``[B, H, Bl, hd]``. Traced or exported: ``cache_attention_graph``; eager PyTorch (the
    reference): ``cache_attention_eager``, its fused SDPA kernel being the faster form there (386 vs 341 us per
    layer of the shipped model, one thread).
    """
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return cache_attention_graph(q, k, v, cache_k, cache_v, bias, intra)
    return cache_attention_eager(q, k, v, cache_k, cache_v, bias, intra)


def cache_attention_graph(q, k, v, cache_k, cache_v, bias, intra) -> torch.Tensor:
    """The exported form: no concatenation of the cache (see the module docstring)."""
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    s_past = torch.matmul(q, cache_k.transpose(-2, -1)) + bias  # [B, H, Bl, S]
    s_new = torch.matmul(q, k.transpose(-2, -1)).masked_fill(~intra, float("-inf"))  # [B, H, Bl, Bl]
    p = torch.softmax(torch.cat([s_past, s_new], dim=-1), dim=-1)  # the scores are small: [B, H, Bl, S + Bl]
    S = cache_k.shape[2]
    return torch.matmul(p[..., :S], cache_v) + torch.matmul(p[..., S:], v)


def cache_attention_eager(q, k, v, cache_k, cache_v, bias, intra) -> torch.Tensor:
    """The eager form: PyTorch's fused SDPA over the concatenated cache, additive mask."""
    new = torch.zeros(intra.shape, dtype=bias.dtype, device=bias.device).masked_fill(~intra, float("-inf"))
    mask = torch.cat([bias.expand(-1, -1, intra.shape[0], -1), new.expand(bias.shape[0], 1, -1, -1)], dim=-1)
    return F.scaled_dot_product_attention(q, torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2), attn_mask=mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Fused attention. q ``[B,H,Tq,hd]``, k/v ``[B,H,Tk,hd]``, mask bool ``[Tq,Tk]`` or None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Plain softmax attention, the reference ``attention`` and ``cache_attention`` are tested against."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
