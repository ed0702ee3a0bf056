"""The torch-free runtime: ONNX Runtime policy buffers, resets, validation, memory, imports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from par_deploy import runtime
from par_deploy.errors import ActionError, InputError
from par_deploy.runtime.bundle import BundleError, open_bundle

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle(runtime_bundle):
    return runtime_bundle  # tests/conftest.py: tiny, two instructions, non-identity normaliser


def _obs(policy, seed=0):
    s = policy.spec
    rng = np.random.default_rng(seed)
    return {
        "rgb": rng.integers(0, 256, (s.num_cameras, s.image_size, s.image_size, 3), dtype=np.uint8),
        "state": rng.standard_normal(s.state_dim).astype(np.float32),
    }


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_load_returns_onnx_policy_with_zero_copy_bindings(bundle):
    policy = runtime.load(bundle, "onnx", threads=1)
    assert isinstance(policy, runtime.OnnxPolicy) and policy.denoise_steps == 4
    for name in ("cache_k", "cache_v", "new_k", "action_cond", "noise", "actions"):
        assert policy._values[name].data_ptr() == policy.buffers[name].ctypes.data  # OrtValue wraps the buffer
    assert policy.buffers["action_cond"] is not None and "cond" not in policy.buffers  # sampler reads step output


def test_act_writes_the_delta_into_the_cache_and_reset_restores_the_prefix(bundle):
    policy = runtime.load(bundle, "onnx")
    kt, bl = policy.text_slots, policy.block_len
    ids = {k: v.ctypes.data for k, v in policy.buffers.items()}
    for instruction in policy.spec.instructions:
        policy.reset(instruction)
        pk, pv = policy.prefix(instruction)
        ck, cv = policy.buffers["cache_k"], policy.buffers["cache_v"]
        assert np.array_equal(ck[:, :, :, :kt], pk) and np.array_equal(cv[:, :, :, :kt], pv)
        assert not ck[:, :, :, kt:].any()
        for step in range(3):
            policy.act(_obs(policy, step))
            s = kt + step * bl
            assert np.array_equal(ck[:, :, :, s : s + bl], policy.buffers["new_k"])
            assert np.array_equal(cv[:, :, :, s : s + bl], policy.buffers["new_v"])
        assert not ck[:, :, :, kt + 3 * bl :].any()
    assert {k: v.ctypes.data for k, v in policy.buffers.items()} == ids  # no buffer was reallocated
    p0, p1 = (policy.prefix(i)[0] for i in policy.spec.instructions)
    assert not np.allclose(p0, p1)  # instructions have their own prefixes


def test_same_seed_same_actions_and_noise_matters(bundle):
    a, b = runtime.load(bundle, seed=7), runtime.load(bundle, seed=7)
    a.reset()
    b.reset()
    obs = _obs(a)
    x, y = a.act(obs), b.act(obs)
    assert np.array_equal(x, y) and x.shape == (a.spec.chunk_len, a.spec.action_dim) and x.dtype == np.float32
    a.reset(seed=1)
    assert not np.array_equal(a.act(obs), x)
    noise = np.zeros(a.noise_shape(), np.float32)
    a.reset()
    b.reset()
    assert np.array_equal(a.act(obs, noise=noise), b.act(obs, noise=noise))


def test_observation_validation_and_non_finite_actions(bundle):
    policy = runtime.load(bundle)
    with pytest.raises(RuntimeError, match="reset"):
        policy.act(_obs(policy))
    policy.reset()
    bad = _obs(policy)
    bad["rgb"] = bad["rgb"].astype(np.float32)
    with pytest.raises(InputError, match="uint8"):
        policy.act(bad)
    bad = _obs(policy)
    bad["state"] = np.full(policy.spec.state_dim, np.nan, np.float32)
    with pytest.raises(InputError, match="NaN"):
        policy.act(bad)
    with pytest.raises(ValueError, match="unknown instruction"):
        policy.reset("fly to the moon")
    policy.sample = lambda noise: np.full((policy.spec.chunk_len, policy.spec.action_dim), np.nan, np.float32)
    with pytest.raises(ActionError, match="non-finite"):
        policy.act(_obs(policy))


def test_rss_stays_flat_over_10000_act_calls_across_resets(bundle):
    policy = runtime.load(bundle)
    obs = [_obs(policy, i) for i in range(4)]
    instructions = policy.spec.instructions

    def run(n, offset=0):
        for i in range(n):
            if policy.steps_left == 0 or i == 0:
                policy.reset(instructions[(i + offset) % len(instructions)])
            policy.act(obs[i % len(obs)])

    run(500)  # warm-up: allocator pools, ORT arenas
    before = _rss_bytes()
    run(10_000, offset=1)
    growth = _rss_bytes() - before
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 10,000 act() calls"


def test_runtime_import_and_onnx_run_need_no_torch(bundle):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import par_deploy.runtime as rt
        # checkpoint=: the bundle's source checkpoint checked by its sha256 (par_deploy.files.checkpoint_hash)
        policy = rt.load({str(bundle)!r}, "onnx", threads=1, checkpoint={str(bundle.parent / "ckpt")!r})
        policy.reset("pick the cube")
        s = policy.spec
        for i in range(3):
            obs = {{"rgb": np.zeros((s.num_cameras, s.image_size, s.image_size, 3), np.uint8),
                    "state": np.zeros(s.state_dim, np.float32)}}
            assert np.isfinite(policy.act(obs)).all()
        banned = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "par_deploy.model",
                  "par_deploy.train", "par_deploy.export", "par_deploy.reference", "par_deploy.checkpoint"))]
        assert not banned, banned
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_bundle_errors_name_the_problem(bundle, tmp_path):
    with pytest.raises(BundleError, match="config.json: missing checkpoint file"):
        runtime.load(bundle, checkpoint=tmp_path)  # not a checkpoint: which checkpoint it is cannot be told
    with pytest.raises(BundleError, match="not a bundle directory"):
        runtime.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="missing bundle manifest"):
        runtime.load(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        runtime.read_manifest(tmp_path / "empty")
    b = open_bundle(bundle)  # no backend: manifest + text prefix only
    assert b.spec.instructions == ("push the cube", "pick the cube")
