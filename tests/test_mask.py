"""The block-causal mask, checked pair by pair against the paper's rules written out independently."""

import itertools

import pytest
import torch

from par_deploy.config import preset
from par_deploy.errors import ConfigError
from par_deploy.kernels.attention import cache_step_mask
from par_deploy.model.layout import intra_block_mask, sequence_mask, text_mask


def tokens(cfg, blocks):
    """(kind, block, index) per token, built by hand from the layout description."""
    out = [("text", -1, i) for i in range(cfg.num_text_tokens)]
    for n in range(blocks):
        out += [("frame", n, i) for i in range(cfg.frame_tokens)]
        out += [("state", n, 0)] * cfg.state_tokens
        out += [("action", n, j) for j in range(cfg.chunk_len)]
    return out


def rule(q, k, text_attention="causal"):
    (qk, qb, qi), (kk, kb, ki) = q, k
    if qk == "text" and text_attention == "first_frame":
        # NOVA (MaskEmbed.get_attn_mask): the text prefix is one attention group with the first frame
        return kk == "text" or (kk in ("frame", "state") and kb == 0)
    if qk == "text":
        return kk == "text" and ki <= qi
    if kk == "text":
        return True
    if kb < qb:
        return True
    if kb > qb:
        return False
    if qk in ("frame", "state"):
        return kk in ("frame", "state")  # observation tokens never see their block's actions
    return kk in ("frame", "state") or ki <= qi  # actions: own observation + earlier actions of the chunk


def test_mask_enumerates_paper_rules():
    cfg = preset("tiny", num_text_tokens=3, chunk_len=3)
    blocks = 3
    toks = tokens(cfg, blocks)
    mask = sequence_mask(cfg, blocks)
    assert mask.shape == (len(toks), len(toks))
    for (i, q), (j, k) in itertools.product(enumerate(toks), enumerate(toks)):
        assert bool(mask[i, j]) == rule(q, k), (q, k)


def test_mask_with_text_grouped_with_the_first_frame():
    cfg = preset("tiny", num_text_tokens=3, chunk_len=3, text_attention="first_frame")
    toks = tokens(cfg, 3)
    mask = sequence_mask(cfg, 3)
    expected = torch.tensor([[rule(q, k, "first_frame") for k in toks] for q in toks])
    assert torch.equal(mask, expected)
    with pytest.raises(ConfigError, match="first observation"):
        text_mask(cfg)  # the text's keys depend on O_0: they cannot be cached before it


def test_mask_without_state_token():
    cfg = preset("tiny", state_dim=0)
    toks = tokens(cfg, 2)
    mask = sequence_mask(cfg, 2)
    expected = torch.tensor([[rule(q, k) for k in toks] for q in toks])
    assert torch.equal(mask, expected)


def test_cache_step_mask_equals_rows_of_the_full_mask():
    cfg = preset("tiny")
    N, Bl = 4, cfg.block_len
    full = sequence_mask(cfg, N)
    S = cfg.max_seq_len
    for n in range(N):
        start = cfg.block_slot(n)
        step = cache_step_mask(torch.tensor([start]), S, intra_block_mask(cfg))  # [Bl, S + Bl]
        rows = full[start : start + Bl]
        assert torch.equal(step[:, :start], rows[:, :start])  # history
        assert not step[:, start:S].any()  # stale slots never visible
        assert torch.equal(step[:, S:], rows[:, start : start + Bl])  # the new block itself
