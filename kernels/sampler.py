"""One update of a few-step diffusion sampler, in a single affine form shared by DDIM and DDPM.

For a step ``t -> t_prev`` with cumulative alphas ``a_t, a_prev`` and noise prediction ``eps``::

    x0     = clamp(sqrt(1/a_t) * x - sqrt(1/a_t - 1) * eps, -clip, clip)
    x_prev = coef_x0 * x0 + coef_xt * x + sigma * z

DDIM (eta=0, epsilon re-derived from the clipped x0: diffusers with use_clipped_model_output=True):
    coef_x0 = sqrt(a_prev) - sqrt(1 - a_prev) * sqrt(a_t) / sqrt(1 - a_t), coef_xt = sqrt(1 - a_prev) / sqrt(1 - a_t),
    sigma = 0.
DDPM (posterior mean, "fixed_small" variance):
    coef_x0 = sqrt(a_prev) * beta / (1 - a_t), coef_xt = sqrt(alpha) * (1 - a_prev) / (1 - a_t),
    sigma = sqrt((1 - a_prev) / (1 - a_t) * beta) for t > 0 else 0, with alpha = a_t / a_prev, beta = 1 - alpha.
``coeffs`` packs ``[sqrt(1/a_t), sqrt(1/a_t - 1), coef_x0, coef_xt, sigma]`` so an exported graph bakes them in.
"""

from __future__ import annotations

import math

import torch


def sampler_update(
    x: torch.Tensor, eps: torch.Tensor, coeffs: torch.Tensor, z: torch.Tensor, clip: float = 1.0
) -> torch.Tensor:
    x0 = (coeffs[0] * x - coeffs[1] * eps).clamp(-clip, clip)
    return coeffs[2] * x0 + coeffs[3] * x + coeffs[4] * z


def sampler_update_reference(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t: float,
    a_prev: float,
    kind: str,
    z: torch.Tensor,
    is_last: bool,
    clip: float = 1.0,
) -> torch.Tensor:
    """The textbook formulas, written out, that ``sampler_update`` is tested against."""
    x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-clip, clip)
    if kind == "ddim":
        eps_hat = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps_hat
    alpha = a_t / a_prev
    beta = 1 - alpha
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x
    if is_last:
        return mean
    var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    return mean + math.sqrt(var) * z
