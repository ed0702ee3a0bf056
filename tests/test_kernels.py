import torch

from par_deploy.kernels import attention, attention_reference, cache_step_mask, write_block, write_block_reference
from par_deploy.kernels.cache import write_block_


def test_attention_matches_reference_with_block_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k, v = torch.randn(2, 3, 12, 8, generator=g), torch.randn(2, 3, 12, 8, generator=g)
    intra = torch.ones(5, 5, dtype=torch.bool).tril()
    mask = cache_step_mask(torch.tensor([4]), 7, intra)
    assert mask.shape == (5, 12) and mask[:, :4].all() and not mask[:, 4:7].any()
    torch.testing.assert_close(attention(q, k, v, mask), attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_cache_write_matches_slicing():
    cache = torch.randn(1, 2, 20, 4)
    new = torch.randn(1, 2, 6, 4)
    for start in (0, 3, 14):
        expected = write_block_reference(cache, new, start)
        assert torch.equal(write_block(cache, new, torch.tensor([start])), expected)
        buf = cache.clone()
        write_block_(buf, new, torch.tensor([start]))
        assert torch.equal(buf, expected)


def test_cache_write_position_is_not_baked_by_tracing():
    """docs/design-notes.md §3: slicing with a Python int is baked in by jit.trace; the tensor position must not be."""
    cache, new = torch.zeros(1, 1, 10, 2), torch.ones(1, 1, 2, 2)
    traced = torch.jit.trace(write_block, (cache, new, torch.tensor([0])))
    out = traced(cache, new, torch.tensor([5]))
    assert torch.equal(out, write_block_reference(cache, new, 5))
