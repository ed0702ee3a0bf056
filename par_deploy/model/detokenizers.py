"""De-tokenizers: hidden states of block ``P_{n-1}`` -> the next frame ``O_n`` and action chunk ``A_n``.

- ``FrameDetokenizer`` (NOVA/MAR): a bidirectional spatial transformer predicts the frame set by set from
  the frame-part hidden states ("indicator features") and the already known tokens; a per-token AdaLN
  diffusion MLP models each token's distribution (``config.frame_mlp``: MAR's ``SimpleMLPAdaLN``, or NOVA's
  ``DiffusionMLP``, ``NovaDiffusionMLP`` here, with NOVA's structure and parameter names). The condition enters
  the spatial transformer by addition (``config.spatial_cond "add"``) or as NOVA's image encoder does it
  (``"prepend"``): the condition tokens are prepended, the first half of the blocks sees only the condition and
  the known tokens (NOVA gathers them, we mask the unknown ones out of the keys: the same function), the
  second half sees everything.
- ``ActionDiT``: DiT blocks over the L action tokens, timestep by adaLN-zero, condition (the action-part
  hidden states) by cross-attention. ``condition`` computes the cross-attention keys/values once per control
  step; ``forward`` is one denoiser call (the unit the export unrolls K times).
- ``DiscreteFrameHead`` / ``DiscreteActionHead``: the PAR-Discrete ablation (MLP regression, MSE loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from par_deploy.config import PARConfig
from par_deploy.kernels.attention import attention
from par_deploy.model.diffusion import SamplerSchedule, TrainSchedule, sample
from par_deploy.model.tokenizers import position_table
from par_deploy.model.transformer import Transformer


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs  # [..., half]
    return torch.cat([args.cos(), args.sin()], dim=-1)  # [..., dim]


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the last dim, averaged with ``weight`` (``pred.shape[:-1]``)."""
    err = (pred - target).pow(2).mean(-1)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------
# Frame de-tokenizer


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class DiffusionMLP(nn.Module):
    """Per-token noise predictor ``eps(x_t | t, z)`` (MAR's SimpleMLPAdaLN)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time = TimestepEmbedder(width)
        self.cond = nn.Linear(cond_dim, width)
        self.inp = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        for m in (self.ada[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.time(t) + self.cond(z)  # [N, W]
        h = self.inp(x)  # [N, W]
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.norm(h), shift, scale))  # [N, C]


class NovaAdaNorm(nn.Module):
    """NOVA's ``AdaLayerNormZero`` (no low-rank projection): ``norm(x) * (1 + s0) + s1`` and the remaining
    statistics, ``s = proj(silu(z))``."""

    def __init__(self, dim: int, num_stats: int):
        super().__init__()
        self.num_stats = num_stats
        self.proj = nn.Linear(dim, num_stats * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        stats = self.proj(F.silu(z)).chunk(self.num_stats, dim=-1)
        return self.norm(x) * (1 + stats[0]) + stats[1], stats[2:]


class Projector(nn.Module):
    """``fc2(silu(fc1(x)))`` (NOVA's names)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class NovaDiffusionBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1 = NovaAdaNorm(width, 3)
        self.proj = Projector(width, width, width)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h, (gate,) = self.norm1(x, z)
        return self.norm2(self.proj(h)) * gate + x


class NovaTimeCond(nn.Module):
    def __init__(self, cond_dim: int, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_proj = Projector(freq_dim, width, width)
        self.condition_proj = Projector(cond_dim, width, width)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.condition_proj(z) + self.timestep_proj(timestep_features(t, self.freq_dim))


class NovaDiffusionMLP(nn.Module):
    """NOVA's ``DiffusionMLP`` (diffnext/models/diffusion_mlp.py) on flattened tokens: ``patch_embed.proj`` is
    NOVA's patch convolution as a linear layer over the ``(C, p, p)`` token, ``head`` predicts the token in the
    same ``(C, p, p)`` order (NOVA's head predicts ``(p, p, C)``: par_deploy.nova reorders its rows)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(token_dim, width)
        self.time_cond_embed = NovaTimeCond(cond_dim, width)
        self.blocks = nn.ModuleList(NovaDiffusionBlock(width) for _ in range(depth))
        self.norm = NovaAdaNorm(width, 2)
        self.head = nn.Linear(width, token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_t ``[N, C]``, t ``[N]``, z ``[N, D]`` -> predicted noise ``[N, C]``."""
        c = self.time_cond_embed(t, z)  # [N, W]
        h = self.patch_embed.proj(x)  # [N, W]
        for blk in self.blocks:
            h = blk(h, c)
        return self.head(self.norm(h, c)[0])


def set_sizes(num_tokens: int, num_sets: int) -> list[int]:
    """Tokens predicted in each set: a cosine schedule (MAR), every set non-empty, summing to num_tokens."""
    num_sets = min(num_sets, num_tokens)
    known = [num_tokens - math.floor(num_tokens * math.cos(math.pi / 2 * s / num_sets)) for s in range(num_sets + 1)]
    sizes, done = [], 0
    for s in range(1, num_sets + 1):
        target = max(known[s], done + 1)
        target = min(target, num_tokens - (num_sets - s))
        sizes.append(target - done)
        done = target
    sizes[-1] += num_tokens - done
    return sizes


class FrameDetokenizer(nn.Module):
    def __init__(self, cfg: PARConfig):
        super().__init__()
        C, D = cfg.frame_token_dim, cfg.dim
        self.cfg = cfg
        self.patch_embed = nn.Linear(C, D)
        self.mask_token = nn.Parameter(torch.zeros(D))
        position_table(self, cfg, cfg.target_tokens, cfg.latent_size // cfg.patch_size)
        self.spatial = Transformer(D, cfg.spatial_depth, cfg.heads, cfg.mlp_ratio, cfg.block_norm, cfg.activation)
        mlp = NovaDiffusionMLP if cfg.frame_mlp == "nova" else DiffusionMLP
        self.mlp = mlp(C, D, cfg.frame_head_width, cfg.frame_head_depth)

    def encode(self, cond: torch.Tensor, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """cond ``[M, K_o, D]`` (indicator features), x ``[M, K, C]``, known bool ``[M, K]`` -> z ``[M, K, D]``
        (K: the predicted tokens, ``config.target_tokens``)."""
        inp = torch.where(known[..., None], self.patch_embed(x), self.mask_token) + self.pos  # [M, K, D]
        if self.cfg.spatial_cond == "add":
            return self.spatial(inp + cond)
        return self._encode_prepend(cond, inp, known)

    def _encode_prepend(self, cond: torch.Tensor, inp: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """NOVA's ``VisionTransformer.forward`` with a condition and known ids: encoder half over [cond; known
        tokens], the unknown tokens put back as they were, decoder half over [cond; all tokens]."""
        Kc = cond.shape[1]
        blocks = self.spatial.blocks
        keys = torch.cat([torch.ones_like(known[:, :1]).expand(-1, Kc), known], dim=1)  # [M, Kc + K]
        x = torch.cat([cond, inp], dim=1)  # [M, Kc + K, D]
        for blk in blocks[: len(blocks) // 2]:
            x, _, _ = blk(x, keys[:, None, None, :])
        x = torch.cat([x[:, :Kc], torch.where(known[..., None], x[:, Kc:], inp)], dim=1)
        for blk in blocks[len(blocks) // 2 :]:
            x, _, _ = blk(x, None)
        return self.spatial.norm(x[:, Kc:])

    def loss(self, cond: torch.Tensor, target: torch.Tensor, schedule: TrainSchedule, generator=None) -> torch.Tensor:
        M, K, C = target.shape
        dev = target.device
        lo = self.cfg.frame_mask_min
        ratio = lo + (1 - lo) * torch.rand(M, 1, generator=generator, device=dev)
        num_masked = (ratio * K).ceil().clamp(1, K)  # [M, 1]
        rank = torch.rand(M, K, generator=generator, device=dev).argsort(-1).argsort(-1)  # random order
        masked = rank < num_masked  # [M, K]
        z = self.encode(cond, target, ~masked)  # [M, K, D]
        rep = self.cfg.diffusion_batch_mul
        z, x0, w = z.repeat(rep, 1, 1), target.repeat(rep, 1, 1), masked.float().repeat(rep, 1)
        t = schedule.sample_t((rep * M, K), generator, dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev)
        eps = self.mlp(schedule.q_sample(x0, t, noise).flatten(0, 1), t.flatten(), z.flatten(0, 1))
        return _diffusion_loss(eps.view_as(x0), noise, w)

    @torch.no_grad()
    def sample(
        self, cond: torch.Tensor, sampler: SamplerSchedule, noise: torch.Tensor, order: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Set-by-set prediction. cond ``[M, K_o, D]``; noise ``[K+1, M, K, C]`` (K = ``target_tokens``);
        order: a permutation of the K tokens."""
        M, K = cond.shape[0], self.cfg.target_tokens
        order = torch.arange(K, device=cond.device) if order is None else order
        x = torch.zeros(M, K, self.cfg.frame_token_dim, device=cond.device)
        known = torch.zeros(M, K, dtype=torch.bool, device=cond.device)
        start = 0
        for size in set_sizes(K, self.cfg.frame_decode_sets):
            ids = order[start : start + size]
            start += size
            z = self.encode(cond, x, known)[:, ids].flatten(0, 1)  # [M*size, D]
            n = noise[:, :, ids].flatten(1, 2)  # [K+1, M*size, C]
            tokens = sample(lambda xt, t, z=z: self.mlp(xt, t, z), sampler, n)
            x[:, ids] = tokens.view(M, size, -1)
            known[:, ids] = True
        return x


class DiscreteFrameHead(nn.Module):
    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.frame_token_dim))

    def loss(self, cond, target, schedule=None, generator=None):
        return F.mse_loss(self.mlp(cond), target)

    @torch.no_grad()
    def sample(self, cond, sampler=None, noise=None, order=None):
        return self.mlp(cond).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------
# Action de-tokenizer


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)  # applied to the condition once per control step
        self.cross_proj = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # [B, H, T, hd]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = x.shape
        return x.transpose(1, 2).reshape(B, T, H * hd)

    def condition(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross_kv(cond).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)  # [B, H, Lc, hd] each

    def forward(self, x: torch.Tensor, c: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2, s3, sc3, g3 = self.ada(c).unsqueeze(1).chunk(9, dim=-1)  # [B, 1, D] each
        q, k, v = self.qkv(modulate(self.norm1(x), s1, sc1)).chunk(3, dim=-1)
        x = x + g1 * self.proj(self._merge(attention(self._heads(q), self._heads(k), self._heads(v), None)))
        q = self._heads(self.cross_q(modulate(self.norm2(x), s2, sc2)))
        x = x + g2 * self.cross_proj(self._merge(attention(q, ck, cv, None)))
        return x + g3 * self.mlp(modulate(self.norm3(x), s3, sc3))


class ActionDiT(nn.Module):
    def __init__(self, cfg: PARConfig):
        super().__init__()
        W = cfg.dit_dim
        self.cfg = cfg
        self.inp = nn.Linear(cfg.action_dim, W)
        self.pos = nn.Parameter(torch.randn(cfg.chunk_len, W) * 0.02)
        self.time = TimestepEmbedder(W)
        self.cond_proj = nn.Linear(cfg.dim, W)
        self.blocks = nn.ModuleList(DiTBlock(W, cfg.dit_heads) for _ in range(cfg.dit_depth))
        self.norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
        self.out = nn.Linear(W, cfg.action_dim)
        for m in (self.ada[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def condition(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond ``[B, Lc, D]`` -> cross-attention keys/values ``[depth, B, H, Lc, hd]`` each."""
        c = self.cond_proj(cond)
        kv = [blk.condition(c) for blk in self.blocks]
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_k: torch.Tensor, cond_v: torch.Tensor) -> torch.Tensor:
        """One denoiser call: x_t ``[B, L, A]``, t ``[B]`` -> predicted noise ``[B, L, A]``."""
        c = self.time(t)  # [B, W]
        h = self.inp(x) + self.pos  # [B, L, W]
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, cond_k[i], cond_v[i])
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        return self.out(modulate(self.norm(h), shift, scale))

    def loss(
        self, cond: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, schedule: TrainSchedule, generator=None
    ) -> torch.Tensor:
        """cond ``[M, Lc, D]``, target ``[M, L, A]``, valid bool ``[M, L]``; t drawn ``diffusion_batch_mul`` times."""
        rep = self.cfg.diffusion_batch_mul
        ck, cv = self.condition(cond)
        ck, cv = ck.repeat(1, rep, 1, 1, 1), cv.repeat(1, rep, 1, 1, 1)
        x0, w = target.repeat(rep, 1, 1), valid.float().repeat(rep, 1)
        t = schedule.sample_t((x0.shape[0],), generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        eps = self(schedule.q_sample(x0, t, noise), t, ck, cv)
        return _diffusion_loss(eps, noise, w)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, sampler: SamplerSchedule, noise: torch.Tensor) -> torch.Tensor:
        ck, cv = self.condition(cond)
        return sample(lambda x, t: self(x, t, ck, cv), sampler, noise)


class DiscreteActionHead(nn.Module):
    def __init__(self, cfg: PARConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.action_dim))

    def loss(self, cond, target, valid, schedule=None, generator=None):
        return _diffusion_loss(self.mlp(cond), target, valid.float())

    @torch.no_grad()
    def sample(self, cond, sampler=None, noise=None):
        return self.mlp(cond).clamp(-1, 1)
