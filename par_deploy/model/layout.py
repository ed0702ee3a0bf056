"""Token layout of a PAR sequence and the block-causal mask (paper Fig. 3, docs/design-notes.md §1).

Sequence: ``[text (K_t)] P_0 P_1 ... P_{N-1}``; each block ``P_n = [frame tokens (K_o); state token (0/1);
action tokens (L)]``. Rules, for a query q and a key k:

- text (``config.text_attention``): ``"causal"``, causal among text tokens and text never sees blocks; or
  ``"first_frame"`` (NOVA's ``MaskEmbed.get_attn_mask``: the text prefix is in the same attention group as
  the first frame), text tokens see every text token and the observation tokens of block 0. Every block
  token sees all text.
- earlier blocks: every token sees every token of every earlier block.
- same block: observation (frame + state) tokens see each other (bidirectional) but not their block's
  actions; action token j sees all observation tokens of its block and actions 0..j of its block.
- later blocks: never visible.

Cache slots of this layout: ``PARConfig.block_slot`` (block n starts at ``K_t + n * Bl``).

RoPE positions: text tokens sit at position 0 (identity rotation; they carry learned embeddings);
observation tokens at the block index ``n`` with ``rope_theta_frame``; action token j at ``n * L + j``
(the action rate is L times the frame rate) with ``rope_theta_action``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from par_deploy.config import PARConfig
from par_deploy.errors import ConfigError

TEXT, OBS, ACT = 0, 1, 2


@dataclass(frozen=True)
class TokenMeta:
    kind: torch.Tensor  # int64 [T]: TEXT, OBS or ACT
    block: torch.Tensor  # int64 [T]: block index, -1 for text
    index: torch.Tensor  # int64 [T]: text index, or action index j within its chunk (0 for obs tokens)


def block_meta(cfg: PARConfig, block: int = 0) -> TokenMeta:
    Bl = cfg.block_len
    kind = torch.tensor([OBS] * cfg.obs_tokens + [ACT] * cfg.chunk_len)
    index = torch.tensor([0] * cfg.obs_tokens + list(range(cfg.chunk_len)))
    return TokenMeta(kind, torch.full((Bl,), block), index)


def sequence_meta(cfg: PARConfig, num_blocks: int) -> TokenMeta:
    Kt = cfg.num_text_tokens
    parts = [TokenMeta(torch.full((Kt,), TEXT), torch.full((Kt,), -1), torch.arange(Kt))]
    parts += [block_meta(cfg, n) for n in range(num_blocks)]
    return TokenMeta(*(torch.cat([getattr(p, f) for p in parts]) for f in ("kind", "block", "index")))


def allowed(q: TokenMeta, k: TokenMeta, text_attention: str = "causal") -> torch.Tensor:
    """bool ``[Tq, Tk]``: may query i attend to key j. A direct transcription of the rules above."""
    qk, kk = q.kind[:, None], k.kind[None, :]
    qb, kb = q.block[:, None], k.block[None, :]
    qi, ki = q.index[:, None], k.index[None, :]
    grouped = text_attention == "first_frame"
    text_text = (qk == TEXT) & (kk == TEXT) & ((ki <= qi) | grouped)
    text_first = (qk == TEXT) & (kk == OBS) & (kb == 0) & grouped
    block_text = (qk != TEXT) & (kk == TEXT)
    earlier = (qk != TEXT) & (kk != TEXT) & (kb < qb)
    same = (qk != TEXT) & (kk != TEXT) & (kb == qb)
    same_ok = same & (
        ((qk == OBS) & (kk == OBS)) | ((qk == ACT) & (kk == OBS)) | ((qk == ACT) & (kk == ACT) & (ki <= qi))
    )
    return text_text | text_first | block_text | earlier | same_ok


def sequence_mask(cfg: PARConfig, num_blocks: int) -> torch.Tensor:
    meta = sequence_meta(cfg, num_blocks)
    return allowed(meta, meta, cfg.text_attention)


def intra_block_mask(cfg: PARConfig) -> torch.Tensor:
    meta = block_meta(cfg)
    return allowed(meta, meta, cfg.text_attention)


def text_mask(cfg: PARConfig) -> torch.Tensor:
    """The text prefix's own mask, for writing it into the KV-cache before the first observation."""
    if cfg.text_attention == "first_frame":
        raise ConfigError(
            "config.text_attention 'first_frame' (NOVA) lets the text prefix attend to the first observation, so "
            "its keys/values cannot be cached before that observation exists: the cached control loop supports "
            "text_attention 'causal' only; run this model through PARModel.hidden (teacher-forced sequences)"
        )
    return torch.ones(cfg.num_text_tokens, cfg.num_text_tokens, dtype=torch.bool).tril()
