"""The Physical Autoregressive Model (paper §4): read bottom-up.

Shapes: B batch, N blocks (control steps), K_t text tokens, K_o frame tokens, L = chunk_len action tokens,
Bl = block_len = K_o + state token + L, D model width, C frame-token dim, A action dim, S cache slots.

Training (``losses``): one teacher-forced pass over whole episodes. Input blocks P_0..P_{N-1}
(P_0's action part is the learnable BOA block); the hidden states of P_{n-1} predict O_n (frame part ->
frame de-tokenizer) and A_n (action part -> Action-DiT).

Inference: ``new_cache`` -> ``prefill`` (text prefix) -> per control step ``embed_block`` + ``step`` (one block
appended to the static KV-cache) -> ``action_condition`` -> ``sample_actions`` (and optionally
``predict_frame``). ``step_delta`` is the pure function the exporters compile.
"""

from __future__ import annotations

import torch
from torch import nn

from par_deploy.config import PARConfig
from par_deploy.errors import CacheFullError, ConfigError, InputError
from par_deploy.kernels.attention import past_bias
from par_deploy.kernels.cache import write_block_
from par_deploy.model.detokenizers import ActionDiT, DiscreteActionHead, DiscreteFrameHead, FrameDetokenizer
from par_deploy.model.diffusion import SamplerSchedule, TrainSchedule
from par_deploy.model.layout import intra_block_mask, sequence_mask, text_mask
from par_deploy.model.rope import BlockRope
from par_deploy.model.tokenizers import (
    ActionTokenizer,
    StateTokenizer,
    check_rgb,
    make_codec,
    make_frame_embed,
    make_text,
)
from par_deploy.model.transformer import CausalTransformer

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [layers, B, H, S, hd]


class PARModel(nn.Module):
    def __init__(self, cfg: PARConfig, load_frozen: bool = True):
        """``load_frozen=False`` skips loading the frozen pretrained parts (VAE, text encoder) that live
        outside the checkpoint: enough for parameter counts and shapes."""
        super().__init__()
        self.cfg = cfg
        self.codec = make_codec(cfg, load_frozen)
        self.text = make_text(cfg, load_frozen)
        self.frame_embed = make_frame_embed(cfg)
        self.state_tok = StateTokenizer(cfg) if cfg.state_dim else None
        self.action_tok = ActionTokenizer(cfg)
        self.boa = nn.Parameter(torch.randn(cfg.chunk_len, cfg.dim) * 0.02)
        executed = (torch.arange(cfg.chunk_len) < cfg.stride).float()[:, None]  # [L, 1]: 1 for executed actions
        self.register_buffer("executed", executed, persistent=False)
        self.transformer = (
            None
            if cfg.variant == "noar"
            else CausalTransformer(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.block_norm, cfg.activation)
        )
        self.rope = BlockRope(cfg)
        self.register_buffer("intra_mask", intra_block_mask(cfg), persistent=False)  # [Bl, Bl]
        discrete = cfg.variant == "discrete"
        self.frame_head = (DiscreteFrameHead(cfg) if discrete else FrameDetokenizer(cfg)) if cfg.frame_head else None
        self.action_head = DiscreteActionHead(cfg) if discrete else ActionDiT(cfg)
        self.train_schedule = TrainSchedule(cfg.beta_schedule, cfg.train_timesteps)

    # ------------------------------------------------------------------------------------------------
    # tokens

    def embed_block(
        self, rgb: torch.Tensor, state: torch.Tensor | None, actions: torch.Tensor, boa: torch.Tensor
    ) -> torch.Tensor:
        """rgb uint8 ``[..., V, H, W, 3]``, state ``[..., S]``, actions ``[..., L, A]``, boa bool ``[...]``
        -> block tokens ``[..., Bl, D]`` (frame tokens; state token; action tokens or BOA). Actions past
        ``config.stride`` (predicted but not executed before this block's observation) are zeroed."""
        lead = rgb.shape[:-4]
        frames = self.codec.encode(rgb.reshape(-1, *rgb.shape[-4:]))  # [*, K_o, C]
        parts = [self.frame_embed(frames).reshape(*lead, self.cfg.frame_tokens, self.cfg.dim)]
        if self.state_tok is not None:
            parts.append(self.state_tok(state))  # [..., 1, D]
        if self.cfg.stride < self.cfg.chunk_len:  # receding horizon: only the executed part is history
            actions = actions * self.executed  # [..., L, A]
        act = torch.where(boa[..., None, None], self.boa, self.action_tok(actions))  # [..., L, D]
        return torch.cat(parts + [act], dim=-2)

    def split_block(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., Bl, D]`` -> frame part ``[..., K_o, D]``, action part ``[..., L, D]``."""
        return h[..., : self.cfg.frame_tokens, :], h[..., self.cfg.obs_tokens :, :]

    def action_condition(self, h_block: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """The Action-DiT's cross-attention condition for one block: its action-part hidden states.

        PAR-NoAR has no transformer, so its condition is the embedded text and the whole embedded block
        (paper §5.3.1: "directly decodes the embedded visual tokens and text tokens").
        """
        if self.cfg.variant == "noar":
            text = text.expand(*h_block.shape[:-2], *text.shape[-2:])
            return torch.cat([text, h_block], dim=-2)
        return self.split_block(h_block)[1]

    # ------------------------------------------------------------------------------------------------
    # training: all blocks in parallel

    def hidden(self, text: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """text ``[B, K_t, D]``, blocks ``[B, N*Bl, D]`` -> hidden ``[B, K_t + N*Bl, D]``."""
        x = torch.cat([text, blocks], dim=1)
        if self.transformer is None:
            return x
        N = blocks.shape[1] // self.cfg.block_len
        mask = sequence_mask(self.cfg, N).to(x.device)  # [T, T]
        rope = tuple(r.to(x.device) for r in self.rope.sequence(N))
        return self.transformer(x, mask, rope)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """``losses`` (``forward`` so that DistributedDataParallel synchronises the gradients)."""
        return self.losses(batch, generator)

    def losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """Teacher-forced diffusion losses over whole episodes.

        batch: ``rgb`` uint8 ``[B, N+1, V, H, W, 3]`` (O_0..O_N), ``state`` ``[B, N+1, S]``, ``actions``
        ``[B, N+1, L, A]`` (index 0 unused; A_n at n), ``boa`` bool ``[B, N+1]`` (blocks whose action part is
        BOA), ``action_valid`` bool ``[B, N+1, L]``, ``block_valid`` bool ``[B, N+1]``, ``instructions`` list.
        Actions and state are already normalised.
        """
        cfg = self.cfg
        if self.frame_head is None:
            raise ConfigError(
                "this is a deployment checkpoint without the frame de-tokenizer (config.frame_head "
                "false): train from the full checkpoint it was made from"
            )
        rgb, actions = batch["rgb"], batch["actions"]
        check_rgb(rgb, cfg, "batch['rgb']")
        B, N = rgb.shape[0], rgb.shape[1] - 1
        if N < 1 or N > cfg.max_blocks:
            raise InputError(f"batch['rgb']: episodes need 2..{cfg.max_blocks + 1} frames, found {N + 1}")
        if tuple(actions.shape) != (B, N + 1, cfg.chunk_len, cfg.action_dim):
            raise InputError(
                f"batch['actions']: expected {(B, N + 1, cfg.chunk_len, cfg.action_dim)}, found {tuple(actions.shape)}"
            )
        state = batch.get("state")
        emb = self.embed_block(rgb[:, :N], None if state is None else state[:, :N], actions[:, :N], batch["boa"][:, :N])
        text = self.text(batch["instructions"])  # [B, K_t, D]
        h = self.hidden(text, emb.flatten(1, 2))
        h_blocks = h[:, cfg.num_text_tokens :].reshape(B, N, cfg.block_len, cfg.dim)
        h_frames, _ = self.split_block(h_blocks)  # [B, N, K_o, D]
        cond = self.action_condition(h_blocks, h[:, None, : cfg.num_text_tokens])  # [B, N, Lc, D]

        valid = batch["block_valid"][:, 1:]  # [B, N]: target block n+1 exists
        target_frames = self.codec.encode_target(rgb[:, 1:].flatten(0, 1)).view(B, N, cfg.target_tokens, -1)
        frame_loss = self.frame_head.loss(h_frames[valid], target_frames[valid], self.train_schedule, generator)
        action_loss = self.action_head.loss(
            cond[valid], actions[:, 1:][valid], batch["action_valid"][:, 1:][valid], self.train_schedule, generator
        )
        loss = cfg.frame_loss_weight * frame_loss + cfg.action_loss_weight * action_loss
        return {"loss": loss, "frame_loss": frame_loss, "action_loss": action_loss}

    # ------------------------------------------------------------------------------------------------
    # inference: one block per control step against a static KV-cache

    def new_cache(self, batch: int = 1, device=None, dtype=torch.float32) -> KVCache:
        shape = self.cfg.cache_shape(batch)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def step_delta(self, x: torch.Tensor, n: torch.Tensor, cache_k, cache_v):
        """Pure step: block tokens x ``[B, Bl, D]`` at block indices n (int64 ``[B]``, one per row, or ``[1]``
        for all rows) over a read-only cache: cache_k/v one ``[B, H, S, hd]`` tensor per layer (or a
        ``[layers, B, H, S, hd]`` tensor).

        Returns hidden ``[B, Bl, D]``, new keys and values ``[layers, B, H, Bl, hd]`` for slots
        ``K_t + n*Bl ..`` of each row. The export unit (docs/design-notes.md §3: the host writes the delta into its
        buffer).
        """
        start = self.cfg.block_slot(n)  # [B]
        bias = past_bias(start, cache_k[0].shape[2])  # [B, 1, 1, S]
        return self.transformer.step(x, self.rope.block(n), self.intra_mask, bias, cache_k, cache_v)

    def prefill(self, text: torch.Tensor, cache: KVCache) -> None:
        """Write the text prefix ``[B, K_t, D]`` into slots 0..K_t-1 of the cache (in place)."""
        if self.transformer is None:
            return
        S = cache[0].shape[3]
        zero = torch.zeros(1, dtype=torch.int64, device=text.device)
        bias = past_bias(zero, S)  # no cache slot is visible to the prefix
        _, k, v = self.transformer.step(text, self.rope.text(), text_mask(self.cfg).to(text.device), bias, *cache)
        for buf, new in zip(cache, (k, v), strict=True):
            for i in range(buf.shape[0]):
                write_block_(buf[i], new[i], zero)

    def step(self, x: torch.Tensor, n: int, cache: KVCache) -> torch.Tensor:
        """Append block ``n`` to the cache (in place) and return its hidden states ``[B, Bl, D]``."""
        if not 0 <= n < self.cfg.max_blocks:
            raise CacheFullError(
                f"block {n} does not fit the static KV-cache of {self.cfg.max_blocks} blocks "
                f"(config.max_blocks); reset the episode or use a checkpoint with a longer cache"
            )
        if self.transformer is None:
            return x
        pos = torch.tensor([n], dtype=torch.int64, device=x.device)
        h, k, v = self.step_delta(x, pos, *cache)
        start = self.cfg.block_slot(pos)
        for buf, new in zip(cache, (k, v), strict=True):
            for i in range(buf.shape[0]):
                write_block_(buf[i], new[i], start)
        return h

    def sampler(self, kind: str | None = None, steps: int | None = None) -> SamplerSchedule:
        return SamplerSchedule(kind or self.cfg.sampler, steps or self.cfg.sample_steps, self.train_schedule)

    def sample_actions(self, cond: torch.Tensor, sampler: SamplerSchedule, noise: torch.Tensor) -> torch.Tensor:
        """cond ``[B, Lc, D]``; noise ``[K+1, B, L, A]`` -> normalised actions ``[B, L, A]``."""
        return self.action_head.sample(cond, sampler, noise)

    def predict_frame(
        self, h_frames: torch.Tensor, sampler: SamplerSchedule, noise: torch.Tensor, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Frame-part hidden ``[B, K_o, D]`` -> predicted next frame, uint8 ``[B, V, H, W, 3]``."""
        if self.frame_head is None:
            raise ConfigError("this deployment checkpoint has no frame de-tokenizer (config.frame_head false)")
        return self.codec.decode(self.frame_head.sample(h_frames, sampler, noise, order))

    # ------------------------------------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, int]:
        """Parameter counts grouped as the paper's Table 1 (see config.py for how NOVA's parts map)."""
        groups = {"causal_transformer": 0, "frame_detokenizer": 0, "action_detokenizer": 0, "action_tokenizer": 0}
        for name, p in self.named_parameters():
            if name.startswith("action_tok."):
                groups["action_tokenizer"] += p.numel()
            elif name.startswith("action_head."):
                groups["action_detokenizer"] += p.numel()
            elif name.startswith("frame_head.mlp."):
                groups["frame_detokenizer"] += p.numel()
            else:
                groups["causal_transformer"] += p.numel()
        groups["total"] = sum(groups.values())
        return groups
