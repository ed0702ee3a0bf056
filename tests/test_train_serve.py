"""Train/serve equivalence: what the deployed policy feeds the model is what training fed it.

Two demonstrations in the ``par-demos`` format (train/demos.py), written here in controller units with
statistics far from the identity (offsets, scales, an action and a state dimension without spread), go
through both paths:

- training: ``EpisodeDataset`` (fits and applies the normaliser) -> ``episode_blocks`` / ``collate`` (block
  layout, chunk grid phase, padding) -> the teacher-forced ``PARModel.losses`` pass (sequence mask, sequence
  RoPE), whose frame-part hidden states and Action-DiT conditions per block are recorded where the two heads
  receive them;
- deployment: the checkpoint saved with the dataset's normaliser, exported to an ONNX bundle and run by the
  runtime, and the PyTorch reference policy, both given the raw observation at each control step and, as the
  previous chunk, the chunk the demonstration executed (``act(..., executed=...)``).

Every block's hidden states and condition must agree. A normalisation, feedback, layout, mask or position
difference between the two paths shows up here; a bug shared by both (a RoPE base, say) needs
tests/test_spec.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from par_deploy import runtime
from par_deploy.checkpoint import save_pretrained
from par_deploy.config import preset
from par_deploy.errors import InputError
from par_deploy.export import export_bundle
from par_deploy.model.par import PARModel
from par_deploy.reference import TorchPolicy
from par_deploy.synthetic import randomize_, synthetic_meta
from par_deploy.train.dataset import EpisodeDataset, collate, episode_blocks

torch.set_num_threads(1)

TOL = 1e-4  # the export parity tolerance for hidden states
EPISODES = ((14, 0), (11, 3))  # (env steps T, chunk-grid phase): a full-length and a padded, shifted episode
INSTRUCTION = "push the square"


def _write_demos(root) -> list[dict[str, np.ndarray]]:
    """Two episodes in controller units: actions with per-dimension offsets and scales and a constant
    (gripper-like) dimension; state with large offsets and a constant dimension."""
    (root / "episodes").mkdir(parents=True)
    meta = synthetic_meta(image_size=16, state_dim=3, action_dim=4, instruction=INSTRUCTION, max_episode_steps=20)
    (root / "meta.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    episodes = []
    for i, (T, _) in enumerate(EPISODES):
        actions = np.stack(
            [rng.uniform(-0.02, 0.05, T), rng.uniform(0.5, 3.0, T), rng.uniform(-0.01, 0.01, T), np.full(T, -1.0)], 1
        ).astype(np.float32)  # [T, A]
        pos = np.cumsum(np.concatenate([[0.0], actions[:, 0]]))  # [T+1]
        state = np.stack([5 + 20 * pos, rng.normal(-2.0, 0.05, T + 1), np.full(T + 1, 0.7)], 1)  # [T+1, S]
        ep = {
            "rgb": rng.integers(0, 256, (T + 1, 1, 16, 16, 3), dtype=np.uint8),
            "state": state.astype(np.float32),
            "actions": actions,
            "success": np.bool_(True),
            "seed": np.int64(i),
        }
        np.savez_compressed(root / "episodes" / f"ep_{i:06d}.npz", **ep)
        episodes.append(ep)
    return episodes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("train_serve")
    raw = _write_demos(work / "demos")
    ds = EpisodeDataset(work / "demos")
    cfg = preset("tiny", **ds.model_fields(), beta_schedule="linear")
    torch.manual_seed(0)
    model = randomize_(PARModel(cfg)).eval()
    ckpt = save_pretrained(model, ds.normalizer, work / "ckpt")
    bundle = export_bundle(ckpt, work / "bundle", backends=("onnx",), denoise_steps=2, progress=False).bundle_dir
    return raw, ds, model, ckpt, bundle


def _training_features(ds: EpisodeDataset, model: PARModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """Frame hidden states ``[K_o, D]`` and Action-DiT condition ``[L, D]`` of every input block of every
    episode, in (episode, block) order, as the teacher-forced training pass hands them to the heads."""
    items = [
        episode_blocks(ep, model.cfg, phase, 0, model.cfg.max_blocks)
        for ep, (_, phase) in zip(ds.episodes, EPISODES, strict=True)
    ]
    batch = collate(items, ds.meta["instruction"])
    seen = {}
    frame_loss, action_loss = model.frame_head.loss, model.action_head.loss

    def frame_spy(h_frames, *args):  # h_frames [valid blocks, K_o, D]
        seen["frames"] = h_frames.detach().numpy()
        return frame_loss(h_frames, *args)

    def action_spy(cond, *args):  # cond [valid blocks, L, D]
        seen["cond"] = cond.detach().numpy()
        return action_loss(cond, *args)

    model.frame_head.loss, model.action_head.loss = frame_spy, action_spy
    try:
        with torch.no_grad():
            model.losses(batch, torch.Generator().manual_seed(0))
    finally:
        del model.frame_head.loss, model.action_head.loss
    return list(zip(seen["frames"], seen["cond"], strict=True))


def _deployment_features(policy, raw: list[dict[str, np.ndarray]], L: int) -> list[tuple[np.ndarray, ...]]:
    """Drive ``policy`` through each demonstration as a controller replaying it: the raw observation every L
    steps from the episode's phase on, and the L actions the demonstration executed since the last call."""
    out = []
    rng = np.random.default_rng(1)
    for ep, (T, phase) in zip(raw, EPISODES, strict=True):
        policy.reset(INSTRUCTION)
        n_blocks = -(-(T - phase) // L)  # blocks with a next observation: the training inputs
        for n in range(n_blocks):
            t = phase + n * L
            executed = None if n == 0 else ep["actions"][t - L : t]  # [L, A], controller units
            noise = rng.standard_normal(policy.noise_shape()).astype(np.float32)
            policy.act({"rgb": ep["rgb"][t], "state": ep["state"][t]}, noise=noise, executed=executed)
            out.append((policy.last_frame_hidden, policy.last_action_cond))
    return out


def test_statistics_are_far_from_the_identity(setup):
    _, ds, _, _, _ = setup
    n = ds.normalizer
    assert np.abs(n.state_mean).max() > 1 and n.state_std[2] == 0 and n.action_min[3] == n.action_max[3]
    assert (np.abs(n.action_max - n.action_min)[:3] < 1).any() and (np.abs(n.action_max - n.action_min) > 2).any()


@pytest.mark.parametrize("backend", ["onnx", "reference"])
def test_deployment_sees_what_training_saw(setup, backend):
    raw, ds, model, ckpt, bundle = setup
    train = _training_features(ds, model)
    policy = runtime.load(bundle, "onnx") if backend == "onnx" else TorchPolicy.from_pretrained(ckpt)
    serve = _deployment_features(policy, raw, model.cfg.chunk_len)
    assert len(serve) == len(train) == 4 + 2
    for i, ((f_train, c_train), (f_serve, c_serve)) in enumerate(zip(train, serve, strict=True)):
        assert np.abs(f_serve - f_train).max() < TOL, f"block {i}: frame hidden states differ"
        assert np.abs(c_serve - c_train).max() < TOL, f"block {i}: Action-DiT condition differs"
    conds = np.stack([c for _, c in train])
    assert np.abs(conds[1:] - conds[:-1]).max() > 100 * TOL  # blocks differ: the comparison is not vacuous


def test_feeding_back_the_returned_chunk_equals_the_default(setup):
    """The default feedback is the returned chunk, treated exactly as an ``executed`` chunk would be."""
    raw, _, _, ckpt, bundle = setup
    policies = [runtime.load(bundle, "onnx", seed=5) for _ in range(2)]
    for p in policies:
        p.reset(INSTRUCTION)
    ep = raw[0]
    returned = None
    for n in range(3):
        obs = {"rgb": ep["rgb"][4 * n], "state": ep["state"][4 * n]}
        chunk = policies[0].act(obs)
        policies[1].act(obs, executed=returned)
        assert np.array_equal(policies[0].last_action_cond, policies[1].last_action_cond), n
        returned = chunk


def test_executed_chunk_is_validated(setup):
    raw, _, _, _, bundle = setup
    policy = runtime.load(bundle, "onnx")
    policy.reset(INSTRUCTION)
    ep = raw[0]
    obs = {"rgb": ep["rgb"][0], "state": ep["state"][0]}
    with pytest.raises(InputError, match="first act"):
        policy.act(obs, executed=ep["actions"][:4])
    assert policy.steps_left == policy.spec.max_blocks  # refused before anything changed
    policy.act(obs)
    for bad, match in (
        (ep["actions"][:3], "shape"),
        (ep["actions"][:4].astype(np.float64), "dtype"),
        (np.full((4, 4), np.inf, np.float32), "NaN or infinite"),
        (ep["actions"][:4].tolist(), "numpy"),
    ):
        with pytest.raises(InputError, match=match):
            policy.act(obs, executed=bad)
    assert policy.steps_left == policy.spec.max_blocks - 1
