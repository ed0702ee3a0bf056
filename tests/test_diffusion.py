"""Our schedules and sampler updates against diffusers' schedulers, step by step."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from par_deploy.kernels.sampler import sampler_update, sampler_update_reference
from par_deploy.model.diffusion import SamplerSchedule, TrainSchedule, sample


def diffusers_kwargs(schedule, T):
    return dict(
        num_train_timesteps=T,
        beta_schedule=schedule,
        clip_sample=True,
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )


@pytest.mark.parametrize("schedule", ["squaredcos_cap_v2", "linear"])
def test_train_alphas_match_diffusers(schedule):
    ours = TrainSchedule(schedule, 100).alphas_cumprod
    theirs = DDPMScheduler(**diffusers_kwargs(schedule, 100)).alphas_cumprod
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-6, rtol=0)


def fake_eps(x, t):
    return torch.sin(3 * x + t.float()[:, None, None] / 10)


@pytest.mark.parametrize("kind, steps", [("ddim", 1), ("ddim", 4), ("ddim", 10), ("ddpm", 4), ("ddpm", 10)])
def test_sampler_matches_diffusers(kind, steps):
    T = 100
    train = TrainSchedule("squaredcos_cap_v2", T)
    ours = SamplerSchedule(kind, steps, train)
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    extra = {"set_alpha_to_one": True} if kind == "ddim" else {"variance_type": "fixed_small"}
    ref = cls(**diffusers_kwargs("squaredcos_cap_v2", T), **extra)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()

    shape = (2, 4, 3)
    noise = torch.randn(steps + 1, *shape, generator=torch.Generator().manual_seed(0))
    x = noise[0]
    for k, t in enumerate(ref.timesteps):
        eps = fake_eps(x, t.expand(2))
        if kind == "ddpm":  # diffusers draws its own variance noise: hand it the same draw
            g = torch.Generator().manual_seed(k)
            noise[k + 1] = torch.randn(shape, generator=torch.Generator().manual_seed(k))
            x = ref.step(eps, t, x, generator=g).prev_sample
        else:
            x = ref.step(eps, t, x, use_clipped_model_output=True).prev_sample
    ours_x = sample(fake_eps, ours, noise)
    torch.testing.assert_close(ours_x, x, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_affine_update_equals_textbook_formula(kind):
    train = TrainSchedule("squaredcos_cap_v2", 100)
    sched = SamplerSchedule(kind, 5, train)
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(3, 8, 4, generator=g) for _ in range(3))
    for k, t in enumerate(sched.timesteps.tolist()):
        prev = sched.timesteps[k + 1].item() if k + 1 < sched.steps else -1
        a_t = float(train.alphas_cumprod[t])
        a_prev = float(train.alphas_cumprod[prev]) if prev >= 0 else 1.0
        expected = sampler_update_reference(x, eps, a_t, a_prev, kind, z, is_last=prev < 0)
        torch.testing.assert_close(sampler_update(x, eps, sched.coeffs[k], z), expected, atol=1e-5, rtol=1e-5)


def test_bad_sampler_arguments():
    train = TrainSchedule("linear", 50)
    with pytest.raises(ValueError, match="steps"):
        SamplerSchedule("ddim", 51, train)
    with pytest.raises(ValueError, match="sampler"):
        SamplerSchedule("euler", 4, train)
    with pytest.raises(ValueError, match="draws"):
        sample(fake_eps, SamplerSchedule("ddim", 4, train), torch.zeros(3, 1, 2, 2))


def test_q_sample_statistics():
    train = TrainSchedule("squaredcos_cap_v2", 100)
    x0 = torch.ones(20000, 1)
    t = torch.full((20000,), 50)
    xt = train.q_sample(x0, t, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)))
    a = float(train.alphas_cumprod[50])
    assert abs(xt.mean().item() - a**0.5) < 0.02
    assert abs(xt.var().item() - (1 - a)) < 0.02
