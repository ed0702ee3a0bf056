"""Diffusion schedules. Training and inference are kept apart (MAR's ``DiffLoss`` style):

- ``TrainSchedule``: the DDPM forward process over ``train_timesteps`` (q_sample, sampled timesteps).
- ``SamplerSchedule``: a few-step reverse process (DDIM or DDPM) with ``steps`` chosen at call/export time;
  its per-step constants are plain tensors that an exported graph bakes in.
- ``sample``: the reverse loop, with injectable noise so two backends can be compared exactly.

Betas follow diffusers (``squaredcos_cap_v2`` = ``betas_for_alpha_bar`` cosine, or ``linear``); timesteps
use ``trailing`` spacing, so the first of K steps starts from pure noise (t = T-1). tests/test_diffusion.py
checks both against diffusers' schedulers step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from par_deploy.kernels.sampler import sampler_update


def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999) for i in range(timesteps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}")


class TrainSchedule:
    """DDPM forward process: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``."""

    def __init__(self, schedule: str, timesteps: int):
        self.timesteps = timesteps
        self.alphas_cumprod = torch.cumprod(1 - make_betas(schedule, timesteps), 0)  # float64 [T]

    def sample_t(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        return torch.randint(0, self.timesteps, shape, generator=generator, device=device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)  # t.shape
        a = a.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


class SamplerSchedule:
    """The K-step reverse schedule: ``timesteps [K]`` (int64) and ``coeffs [K, 5]`` (see kernels.sampler)."""

    def __init__(self, kind: str, steps: int, train: TrainSchedule):
        if kind not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {kind!r}; choose 'ddim' or 'ddpm'")
        if not 1 <= steps <= train.timesteps:
            raise ValueError(f"sampler steps must be in [1, {train.timesteps}], got {steps}")
        self.kind, self.steps = kind, steps
        T = train.timesteps
        ts = [round(T - i * T / steps) - 1 for i in range(steps)]  # trailing spacing, descending
        ac = train.alphas_cumprod
        rows = []
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < steps else -1
            a_t = float(ac[t])
            a_prev = float(ac[prev]) if prev >= 0 else 1.0
            if kind == "ddim":
                cx0 = math.sqrt(a_prev) - math.sqrt(1 - a_prev) * math.sqrt(a_t) / math.sqrt(1 - a_t)
                cxt = math.sqrt(1 - a_prev) / math.sqrt(1 - a_t)
                sigma = 0.0
            else:
                alpha = a_t / a_prev
                beta = 1 - alpha
                cx0 = math.sqrt(a_prev) * beta / (1 - a_t)
                cxt = math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)
                sigma = math.sqrt(max((1 - a_prev) / (1 - a_t) * beta, 1e-20)) if prev >= 0 else 0.0
            rows.append([math.sqrt(1 / a_t), math.sqrt(1 / a_t - 1), cx0, cxt, sigma])
        self.timesteps = torch.tensor(ts, dtype=torch.int64)
        self.coeffs = torch.tensor(rows, dtype=torch.float32)

    @property
    def stochastic(self) -> bool:
        return self.kind == "ddpm"

    def noise_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the injectable noise: the initial x_T plus one draw per step."""
        return (self.steps + 1, *sample_shape)


DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t [B]) -> eps


def sample(denoise: DenoiseFn, schedule: SamplerSchedule, noise: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Run the reverse process. ``noise``: ``[K+1, *shape]``; ``noise[0]`` is x_T, ``noise[k+1]`` step k's z."""
    if noise.shape[0] != schedule.steps + 1:
        raise ValueError(f"noise must have {schedule.steps + 1} draws on dim 0, got shape {tuple(noise.shape)}")
    x = noise[0]
    coeffs = schedule.coeffs.to(x.device, x.dtype)
    for k in range(schedule.steps):
        t = schedule.timesteps[k].to(x.device).expand(x.shape[0])  # [B]
        eps = denoise(x, t)
        x = sampler_update(x, eps, coeffs[k], noise[k + 1], clip)
    return x
