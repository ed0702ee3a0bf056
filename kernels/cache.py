"""Static KV-cache writes.

A block of ``Bl`` new keys/values goes to slots ``start .. start + Bl - 1`` of a ``[B, H, S, hd]`` buffer.
``index_copy`` with a position *tensor* is the form that traces and exports correctly; slicing with a Python
int taken from the position is baked in as a constant by ``jit.trace`` (docs/design-notes.md §3).
"""

from __future__ import annotations

import torch


def write_block(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Out-of-place write. cache ``[B,H,S,hd]``, new ``[B,H,Bl,hd]``, start int64 ``[1]``."""
    index = start + torch.arange(new.shape[2], device=new.device)  # [Bl]
    return cache.index_copy(2, index, new)


def write_block_(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """In-place variant for eager PyTorch (exporters drop in-place input updates: docs/design-notes.md §3)."""
    index = start + torch.arange(new.shape[2], device=new.device)
    return cache.index_copy_(2, index, new)


def write_block_reference(cache: torch.Tensor, new: torch.Tensor, start: int) -> torch.Tensor:
    out = cache.clone()
    out[:, :, start : start + new.shape[2]] = new
    return out
