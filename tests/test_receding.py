"""Receding-horizon control (``config.exec_len``): a chunk of L actions is sampled, its first S are executed and
the next control step re-plans. Training, the reference policy, the exported engine and the episode loop must
agree on what a block holds: the observation S env steps after the previous one and the S executed actions."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from par_deploy import runtime
from par_deploy.config import PARConfig, preset
from par_deploy.errors import ConfigError, InputError
from par_deploy.eval import evaluate
from par_deploy.eval.sources import CheckpointSource
from par_deploy.export import export_bundle
from par_deploy.reference import TorchPolicy
from par_deploy.synthetic import randomized_checkpoint
from par_deploy.train.dataset import Episode, episode_blocks
from tests.test_eval import FakeEnv
from tests.test_window import _obs

torch.set_num_threads(1)
L, S = 4, 2  # chunk length, actions executed per control step


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    work = tmp_path_factory.mktemp("receding")
    return randomized_checkpoint(
        "tiny", work / "ckpt", scale=0.05, chunk_len=L, exec_len=S, state_dim=16, action_dim=4, max_blocks=8
    )


def test_exec_len_is_validated_and_defaults_to_the_whole_chunk():
    assert preset("tiny").stride == preset("tiny").chunk_len
    assert preset("tiny", chunk_len=8, exec_len=3).stride == 3
    for bad in (-1, 9, 2.0):
        with pytest.raises(ConfigError, match="exec_len"):
            preset("tiny", chunk_len=8, exec_len=bad)
    d = preset("tiny", chunk_len=8, exec_len=3).to_dict()
    assert PARConfig.from_dict(d).exec_len == 3
    del d["exec_len"]
    with pytest.raises(ConfigError, match="exec_len"):  # format 3 lists every field
        PARConfig.from_dict(d)
    assert PARConfig.from_dict({**d, "format_version": 2}).exec_len == 0  # format 2 meant the whole chunk


def test_training_blocks_are_stride_apart_and_hold_the_previous_full_chunk():
    cfg = preset("tiny", chunk_len=L, exec_len=S)
    T, phase = 9, 1
    H = cfg.image_size
    ep = Episode(
        np.zeros((T + 1, 1, H, H, 3), np.uint8),
        np.arange(T + 1, dtype=np.float32)[:, None],  # state = env step
        np.arange(T, dtype=np.float32)[:, None].repeat(cfg.action_dim, 1),  # action = env step
    )
    b = episode_blocks(ep, cfg, phase, 0, 10)
    np.testing.assert_array_equal(b["state"][:, 0], [1, 3, 5, 7, 9])  # observations S steps apart
    np.testing.assert_array_equal(b["actions"][1:, :, 0], [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 8, 8]])
    np.testing.assert_array_equal(b["action_valid"][1:].sum(1), [4, 4, 4, 2])  # past the episode: masked
    assert b["boa"].tolist() == [True, False, False, False, False]


def test_a_block_embeds_only_the_executed_actions():
    torch.manual_seed(0)
    from par_deploy.model.par import PARModel

    m = PARModel(preset("tiny", chunk_len=L, exec_len=S)).eval()
    c = m.cfg
    rgb = torch.randint(0, 256, (1, c.num_cameras, c.image_size, c.image_size, 3), dtype=torch.uint8)
    state = torch.randn(1, c.state_dim)
    a = torch.randn(1, L, c.action_dim)
    b = a.clone()
    b[:, S:] = torch.randn(1, L - S, c.action_dim)  # another plan after the executed part
    no_boa = torch.tensor([False])
    with torch.no_grad():
        torch.testing.assert_close(m.embed_block(rgb, state, a, no_boa), m.embed_block(rgb, state, b, no_boa))
        b[:, 0] += 1.0
        assert not torch.allclose(m.embed_block(rgb, state, a, no_boa), m.embed_block(rgb, state, b, no_boa))


def test_policy_returns_the_executed_part_and_takes_it_back(ckpt):
    policy = TorchPolicy.from_pretrained(ckpt, steps=2)
    spec = policy.spec
    assert (spec.chunk_len, spec.exec_len, spec.stride) == (L, S, S)
    rng = np.random.default_rng(0)
    obs = [_obs(spec, rng) for _ in range(3)]
    noise = [rng.standard_normal(policy.noise_shape()).astype(np.float32) for _ in range(3)]
    policy.reset(seed=0)
    first = policy.act(obs[0], noise[0])
    assert first.shape == (S, spec.action_dim) and policy.last_chunk.shape == (L, spec.action_dim)
    np.testing.assert_allclose(policy.normalizer.denormalize_action(policy.last_chunk[:S]), first, atol=1e-6)
    fed_back = policy.act(obs[1], noise[1])
    policy.reset(seed=0)
    policy.act(obs[0], noise[0])
    with pytest.raises(InputError, match=r"executed.*\(2, 4\)"):
        policy.act(obs[1], noise[1], executed=np.zeros((L, 4), np.float32))
    np.testing.assert_allclose(policy.act(obs[1], noise[1], executed=first), fed_back, atol=1e-6)


def test_engine_matches_reference_with_a_receding_horizon(ckpt, tmp_path):
    bundle = export_bundle(ckpt, tmp_path / "bundle", backends=("onnx",), denoise_steps=2, progress=False)
    engine = runtime.load(bundle.bundle_dir, "onnx", threads=1)
    ref = TorchPolicy.from_pretrained(ckpt, steps=2)
    assert engine.spec == ref.spec and engine.spec.stride == S
    rng = np.random.default_rng(1)
    for p in (engine, ref):
        p.reset(seed=0)
    for step in range(5):
        obs = _obs(engine.spec, rng)
        noise = rng.standard_normal(engine.noise_shape()).astype(np.float32)
        a, b = engine.act(obs, noise), ref.act(obs, noise)
        assert a.shape == (S, 4)
        np.testing.assert_allclose(a, b, atol=1e-3, err_msg=f"step {step}")


def test_an_episode_executes_stride_actions_per_control_step(ckpt, tmp_path):
    kw = {"episodes": 1, "workers": 0, "env_factory": functools.partial(FakeEnv, success_from=100), "progress": False}
    res = evaluate("PushCube", CheckpointSource(ckpt), max_steps=11, **kw)
    (record,) = res.main.episodes
    assert record.length == 11 and record.control_steps == 6  # ceil(11 / S)
    (record,) = evaluate("PushCube", CheckpointSource(ckpt), max_steps=17, **kw).main.episodes
    assert record.length == 16 and "CacheFullError" in record.error  # the cache holds 8 blocks x S steps


def test_inference_sees_the_blocks_training_builds(ckpt):
    """Step by step with the demo's executed actions, the policy's Action-DiT condition equals the teacher-forced
    pass over ``episode_blocks`` of that demo (identity normalisation: the two share the numbers)."""
    policy = TorchPolicy.from_pretrained(ckpt, steps=2)
    m, spec = policy.model, policy.spec
    rng = np.random.default_rng(3)
    T, H = 7, spec.image_size
    ep = Episode(
        rng.integers(0, 256, (T + 1, 1, H, H, 3), dtype=np.uint8),
        rng.standard_normal((T + 1, spec.state_dim)).astype(np.float32),
        rng.uniform(-1, 1, (T, spec.action_dim)).astype(np.float32),
    )
    b = episode_blocks(ep, m.cfg, 0, 0, 10)
    N = len(b["rgb"]) - 1  # blocks with a target: ceil(7 / S) = 4
    with torch.no_grad():
        x = m.embed_block(*(torch.from_numpy(b[k][None, :N]) for k in ("rgb", "state", "actions", "boa")))
        h = m.hidden(m.text([spec.instructions[0]]), x.flatten(1, 2))[:, m.cfg.num_text_tokens :]
        want = m.action_condition(h.reshape(1, N, m.cfg.block_len, -1))[0].numpy()  # [N, L, D]
    policy.reset(seed=0)
    for n in range(N):
        executed = None if n == 0 else b["actions"][n, :S]
        policy.act({"rgb": b["rgb"][n], "state": b["state"][n]}, executed=executed)
        np.testing.assert_allclose(policy.last_action_cond, want[n], atol=2e-5, err_msg=f"block {n}")
