"""Ops whose fast form depends on the backend, each with a plain-PyTorch reference.

- ``attention``: block-causal attention of one new block over a static KV-cache.
- ``cache``: the cache write (``index_copy`` with a position tensor: traceable and exportable).
- ``sampler``: the few-step diffusion sampler update (DDIM / DDPM in one affine form).
"""

from par_deploy.kernels.attention import attention, attention_reference, cache_step_mask
from par_deploy.kernels.cache import write_block, write_block_reference
from par_deploy.kernels.sampler import sampler_update, sampler_update_reference

__all__ = [
    "attention",
    "attention_reference",
    "cache_step_mask",
    "write_block",
    "write_block_reference",
    "sampler_update",
    "sampler_update_reference",
]
