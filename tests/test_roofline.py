"""The roofline of ``par-deploy bench``: FLOP counts of the reference components, sgemm rates, fractions."""

import math

import numpy as np
import pytest

from par_deploy.bench import roofline
from par_deploy.bench.timing import interleaved, summarize
from par_deploy.config import preset
from par_deploy.normalize import Normalizer
from par_deploy.reference import TorchPolicy


def _policy(model, k):
    cfg = model.cfg
    return TorchPolicy(model, Normalizer.identity(cfg.action_dim, cfg.state_dim), "ddim", k)


def _inputs(cfg, rng):
    return (
        rng.integers(0, 256, (cfg.num_cameras, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
        rng.standard_normal(cfg.state_dim).astype(np.float32),
        rng.uniform(-1, 1, (cfg.chunk_len, cfg.action_dim)).astype(np.float32),
    )


def test_flops_are_counted_per_component_and_scale_with_k(tiny_model):
    cfg, rng = tiny_model.cfg, np.random.default_rng(0)
    inputs = _inputs(cfg, rng)
    counts = {}
    for k in (2, 4):
        p = _policy(tiny_model, k)
        p.reset(cfg.instructions[0])
        p.step_block(*inputs, True, 0)
        counts[k] = roofline.count_flops(p, 1, inputs, rng.standard_normal(p.noise_shape()).astype(np.float32))
    c2, c4 = counts[2], counts[4]
    assert c2["transformer_step"] > 0 and c2["sampler"] > 0
    assert c2["control_step"] == pytest.approx(c2["transformer_step"] + c2["sampler"])
    assert c4["transformer_step"] == pytest.approx(c2["transformer_step"])  # K does not touch the transformer
    # the K denoiser calls dominate the sampler; the condition (cross-attention K/V) is computed once
    assert 1.5 < c4["sampler"] / c2["sampler"] <= 2.0
    # lower bound from the shapes: every layer's MLP alone is 2 matmuls of [Bl, D] x [D, 4D]
    mlp = cfg.depth * 2 * 2 * cfg.block_len * cfg.dim * int(cfg.dim * cfg.mlp_ratio) / 1e9
    assert c2["transformer_step"] > mlp


def test_sgemm_probe_and_fractions():
    cfg = preset("tiny")
    cases = roofline.sgemm_cases(cfg)
    assert set(cases) == {"sgemm/512x512x512", "sgemm/step_shape"}
    comp = {k: summarize(v) for k, v in interleaved(cases, 3, 1).items()}
    comp["engine/control_step"] = {"p50": 2.0}  # ms
    comp["engine/other"] = {"p50": 1.0}  # not a counted component: skipped
    comp["naive_k/control_step"] = {"p50": 9.0}  # recomputes the history: not the counted work, skipped
    sgemm = roofline.split_sgemm(comp, cases, cfg)
    assert set(comp) == {"engine/control_step", "engine/other", "naive_k/control_step"}  # sgemm timings left
    m, k, n = sgemm["step_shape"]["shape_mkn"]
    assert (m, k, n) == (cfg.block_len, cfg.dim, int(cfg.dim * cfg.mlp_ratio))
    for s in sgemm.values():
        assert math.isfinite(s["gflops"]) and s["gflops"] > 0.1
    roof = roofline.roofline({"transformer_step": 0.1, "sampler": 0.2, "control_step": 0.3}, sgemm, comp)
    r = roof["cases"]["engine/control_step"]
    assert set(roof["cases"]) == {"engine/control_step"}
    assert r["gflops"] == pytest.approx(0.3 / 2e-3)
    assert r["fraction_of_sgemm_512x512x512"] == pytest.approx(r["gflops"] / sgemm["512x512x512"]["gflops"])
