"""Sliding cache (config.overflow "slide"): episodes of any length, and what the model sees after a slide is what
training on windows fed it (blocks re-encoded at positions 0, 1, ... with no earlier context)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from par_deploy import runtime
from par_deploy.config import PARConfig, preset
from par_deploy.errors import CacheFullError, ConfigError
from par_deploy.export import export_bundle
from par_deploy.reference import TorchPolicy
from par_deploy.synthetic import randomized_checkpoint

torch.set_num_threads(1)
W = 4  # cache length in blocks


def _obs(spec, rng):
    return {
        "rgb": rng.integers(0, 256, (spec.num_cameras, spec.image_size, spec.image_size, 3), dtype=np.uint8),
        "state": rng.standard_normal(spec.state_dim).astype(np.float32),
    }


@pytest.fixture(scope="module")
def slide_ckpt(tmp_path_factory):
    work = tmp_path_factory.mktemp("window")
    return randomized_checkpoint("tiny", work / "ckpt", scale=0.05, max_blocks=W, overflow="slide")


def test_overflow_is_validated():
    with pytest.raises(ConfigError, match="overflow"):
        preset("tiny", overflow="wrap")
    assert PARConfig.from_dict(preset("tiny", overflow="slide").to_dict()).overflow == "slide"


def test_error_mode_still_stops_at_the_cache_length(tiny_model):
    from par_deploy.normalize import Normalizer

    c = tiny_model.cfg
    policy = TorchPolicy(tiny_model, Normalizer.identity(c.action_dim, c.state_dim))
    policy.reset()
    rng = np.random.default_rng(0)
    for _ in range(c.max_blocks):
        policy.act(_obs(policy.spec, rng))
    assert policy.steps_left == 0
    with pytest.raises(CacheFullError, match="--window"):
        policy.act(_obs(policy.spec, rng))


def test_slide_matches_the_training_view_of_the_window(slide_ckpt):
    """After each slide, a block's hidden states equal a fresh teacher-forced pass over the blocks the cache holds,
    at positions from 0: the same computation `PARModel.losses` runs on a window cut mid-episode."""
    policy = TorchPolicy.from_pretrained(slide_ckpt)
    m, spec = policy.model, policy.spec
    assert policy.steps_left == float("inf")
    policy.reset(seed=0)
    rng = np.random.default_rng(1)
    inputs = []  # (rgb, normalised state, normalised previous chunk, first) per control step
    for step in range(3 * W + 1):
        obs = _obs(spec, rng)
        inputs.append((obs["rgb"], policy.normalizer.normalize_state(obs["state"]), policy.last_chunk, step == 0))
        policy.act(obs)
        n_cached = step + 1 if step < W else W // 2 + (step - W) % (W - W // 2) + 1
        window = inputs[-n_cached:]
        with torch.no_grad():
            x = torch.cat(
                [
                    m.embed_block(
                        torch.from_numpy(r)[None],
                        torch.from_numpy(s)[None],
                        torch.from_numpy(a)[None],
                        torch.tensor([f]),
                    )
                    for r, s, a, f in window
                ],
                dim=1,
            )  # [1, n*Bl, D]
            h = m.hidden(m.text([spec.instructions[0]]), x)[:, -m.cfg.block_len :]  # [1, Bl, D]
            want = m.action_condition(h)[0].numpy()
        np.testing.assert_allclose(policy.last_action_cond, want, atol=2e-5, err_msg=f"step {step}")
        assert window[0][3] == (step < W)  # BOA only while the episode's first block is still cached


def test_engine_matches_reference_over_three_windows(slide_ckpt, tmp_path):
    bundle = export_bundle(
        slide_ckpt, tmp_path / "bundle", backends=("onnx",), denoise_steps=4, progress=False
    ).bundle_dir
    engine = runtime.load(bundle, "onnx", threads=1)
    assert engine.spec.overflow == "slide" and engine.bundle.manifest["cache"]["overflow"] == "slide"
    ref = TorchPolicy.from_pretrained(slide_ckpt, steps=4)
    rng = np.random.default_rng(2)
    for p in (engine, ref):
        p.reset(seed=0)
    for step in range(3 * W + 2):
        obs = _obs(engine.spec, rng)
        noise = rng.standard_normal(engine.noise_shape()).astype(np.float32)
        a, b = engine.act(obs, noise), ref.act(obs, noise)
        np.testing.assert_allclose(a, b, atol=1e-3, err_msg=f"step {step}")
        np.testing.assert_allclose(engine.last_action_cond, ref.last_action_cond, atol=1e-4)
