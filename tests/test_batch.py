"""Batched engines (``export --batch N``, ``runtime.load_batch``): every row is its own episode and equals a
batch-1 engine run with the same inputs and noise; the manifest records the batch; bad batches are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from par_deploy import runtime
from par_deploy.errors import CacheFullError, ConfigError, InputError
from par_deploy.export import export_bundle
from par_deploy.runtime.bundle import BundleError, open_bundle
from par_deploy.synthetic import randomized_checkpoint

torch.set_num_threads(1)
N = 3


@pytest.fixture(scope="module")
def batched(runtime_bundle, tmp_path_factory):
    """The conftest's tiny bundle (batch 1) and the same checkpoint exported with ``batch=N``."""
    ckpt = runtime_bundle.parent / "ckpt"
    out = tmp_path_factory.mktemp("batch") / "bundle"
    report = export_bundle(ckpt, out, backends=("onnx",), denoise_steps=4, progress=False, batch=N)
    assert report.parity["onnx"]["passed"]  # every row of the batched engine against the PyTorch reference
    return runtime_bundle, out


def _obs(spec, seed):
    rng = np.random.default_rng(seed)
    return {
        "rgb": rng.integers(0, 256, (spec.num_cameras, spec.image_size, spec.image_size, 3), dtype=np.uint8),
        "state": rng.standard_normal(spec.state_dim).astype(np.float32),
    }


def test_rows_equal_separate_batch_1_runs(batched):
    single, bundle = batched
    policy = runtime.load_batch(bundle, threads=1)
    assert policy.batch == N and open_bundle(bundle).manifest["batch"] == N
    instructions = policy.spec.instructions
    singles = [runtime.load(single, threads=1) for _ in range(N)]
    policy.reset(instructions[0])
    for r, p in enumerate(singles):
        p.reset(instructions[r % len(instructions)])
        policy.reset(instructions[r % len(instructions)], row=r)
    rng = np.random.default_rng(0)
    for step in range(4):
        # row 1 sits out step 1 (its episode stays one step behind); row 2 starts a new episode at step 2
        if step == 2:
            policy.reset(instructions[0], row=2)
            singles[2].reset(instructions[0])
        active = [r for r in range(N) if not (step == 1 and r == 1)]
        obs = [_obs(policy.spec, 10 * step + r) if r in active else None for r in range(N)]
        noise = rng.standard_normal(policy.noise_shape()).astype(np.float32)
        chunks = policy.act_batch(obs, noise=noise)
        for r in range(N):
            if r not in active:
                assert chunks[r] is None
                continue
            want = singles[r].act(obs[r], noise=noise[r])
            np.testing.assert_allclose(chunks[r], want, atol=1e-4, rtol=0)
            np.testing.assert_allclose(policy.last_frame_hidden[r], singles[r].last_frame_hidden, atol=1e-4, rtol=0)
    assert policy.steps_left == [p.steps_left for p in singles]
    # a stacked dict: every row acts, one array back
    stacked = {k: np.stack([_obs(policy.spec, r)[k] for r in range(N)]) for k in ("rgb", "state")}
    out = policy.act_batch(stacked)
    assert isinstance(out, np.ndarray) and out.shape == (N, policy.spec.chunk_len, policy.spec.action_dim)


def test_manifest_batch_and_clear_errors(batched):
    single, bundle = batched
    with pytest.raises(BundleError, match="load_batch"):
        runtime.load(bundle)
    assert runtime.load_batch(single).batch == 1  # a batch-1 bundle is a one-row BatchPolicy
    policy = runtime.load_batch(bundle)
    spec = policy.spec
    with pytest.raises(RuntimeError, match="row 0: call reset"):
        policy.act_batch([_obs(spec, 0)] * N)
    policy.reset()
    with pytest.raises(InputError, match=f"expected {N} entries"):
        policy.act_batch([_obs(spec, 0)] * (N - 1))
    stacked = {k: np.stack([v] * (N + 1)) for k, v in _obs(spec, 0).items()}
    with pytest.raises(InputError, match=f"stacked array with {N} rows"):
        policy.act_batch(stacked)
    bad = [_obs(spec, 0), {"rgb": np.zeros((2, 2, 3), np.uint8), "state": _obs(spec, 0)["state"]}, None]
    with pytest.raises(InputError, match=r"row 1: observation\['rgb'\]"):
        policy.act_batch(bad)
    with pytest.raises(InputError, match="every row is None"):
        policy.act_batch([None] * N)
    with pytest.raises(InputError, match="noise"):
        policy.act_batch([_obs(spec, 0)] * N, noise=np.zeros((N, 2), np.float32))
    with pytest.raises(InputError, match="row"):
        policy.reset(row=N)
    assert policy.steps_left == [spec.max_blocks] * N  # nothing ran: every refused call wrote nothing
    for _ in range(spec.max_blocks):
        policy.act_batch([_obs(spec, 0), None, None])
    with pytest.raises(CacheFullError, match="row 0"):
        policy.act_batch([_obs(spec, 0), None, None])
    policy.act_batch([None, _obs(spec, 0), None])  # the other rows go on


def test_export_refuses_bad_batches(batched, tmp_path):
    ckpt = batched[0].parent / "ckpt"
    for kw, match in (
        (dict(batch=0), "batch must be"),
        (dict(batch=2, backends=("onnx", "torchscript")), "onnx backend only"),
    ):
        with pytest.raises(ConfigError, match=match):
            export_bundle(ckpt, tmp_path / "b", progress=False, **kw)


def test_sliding_rows_equal_separate_batch_1_runs(tmp_path):
    """A sliding cache slides per row: rows that sit out slide at a later call than the others, a row reset
    mid-way slides later still, and every row's chunks equal a batch-1 engine's through several slides."""
    ckpt = randomized_checkpoint("tiny", tmp_path / "ckpt", scale=0.05, max_blocks=4, overflow="slide")
    kw = dict(backends=("onnx",), denoise_steps=2, progress=False)
    single = export_bundle(ckpt, tmp_path / "b1", **kw).bundle_dir
    report = export_bundle(ckpt, tmp_path / "bn", batch=N, **kw)
    assert report.parity["onnx"]["passed"]
    policy, singles = runtime.load_batch(report.bundle_dir), [runtime.load(single) for _ in range(N)]
    policy.reset()
    for p in singles:
        p.reset()
    rng = np.random.default_rng(1)
    # max_blocks 4: row 0 slides alone at step 4, rows 0 and 1 together at steps 6, 8, 10, row 2 alone at step 9
    for step in range(11):
        if step == 5:
            policy.reset(row=2)
            singles[2].reset()
        active = [r for r in range(N) if not (r == 1 and step in (2, 3))]
        obs = [_obs(policy.spec, 10 * step + r) if r in active else None for r in range(N)]
        noise = rng.standard_normal(policy.noise_shape()).astype(np.float32)
        chunks = policy.act_batch(obs, noise=noise)
        for r in active:
            np.testing.assert_allclose(chunks[r], singles[r].act(obs[r], noise=noise[r]), atol=1e-4, rtol=0)
    assert [p._pos for p in singles] == [r._pos for r in policy._rows] == [3, 3, 4]
    assert policy.steps_left == [float("inf")] * N


def test_refused_call_uses_no_noise_draws(batched):
    """A call refused for one row (row 1 here) leaves every row's noise generator as it was: the next call samples
    exactly what a policy that never saw the refused call samples."""
    _, bundle = batched
    refused, fresh = runtime.load_batch(bundle, seed=7), runtime.load_batch(bundle, seed=7)
    refused.reset()
    fresh.reset()
    spec = refused.spec
    good = [_obs(spec, r) for r in range(N)]
    bad = [good[0], {"rgb": np.zeros((2, 2, 3), np.uint8), "state": good[1]["state"]}, good[2]]
    with pytest.raises(InputError, match="row 1"):
        refused.act_batch(bad)  # row 0 passed its checks (and drew its noise) before row 1 failed
    np.testing.assert_array_equal(refused.act_batch(good), fresh.act_batch(good))
