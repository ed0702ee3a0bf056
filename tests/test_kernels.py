import torch

from par_deploy.kernels import attention, attention_reference, cache_step_mask, write_block, write_block_reference
from par_deploy.kernels.attention import cache_attention_eager, cache_attention_graph, past_bias
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


def test_cache_attention_equals_softmax_over_the_concatenation():
    """The step graph's attention (two score matmuls, one softmax, no cache concatenation) and the eager one
    (SDPA) are softmax attention over ``cat(cache, new)`` with ``cache_step_mask``, each row at its own position."""
    g = torch.Generator().manual_seed(1)
    B, H, Bl, S, hd = 3, 2, 5, 16, 8
    q, k, v = (torch.randn(B, H, Bl, hd, generator=g) for _ in range(3))
    ck, cv = torch.randn(B, H, S, hd, generator=g), torch.randn(B, H, S, hd, generator=g)
    intra = torch.ones(Bl, Bl, dtype=torch.bool).tril()
    start = torch.tensor([0, 4, 11])
    outs = [f(q, k, v, ck, cv, past_bias(start, S), intra) for f in (cache_attention_graph, cache_attention_eager)]
    for b, out in ((b, out) for b in range(B) for out in outs):
        mask = cache_step_mask(start[b : b + 1], S, intra)
        kk, vv = torch.cat([ck[b : b + 1], k[b : b + 1]], 2), torch.cat([cv[b : b + 1], v[b : b + 1]], 2)
        want = attention_reference(q[b : b + 1], kk, vv, mask)
        torch.testing.assert_close(out[b : b + 1], want, atol=1e-5, rtol=1e-5)
