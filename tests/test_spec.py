"""Spec tests: the paper's definitions (par-paper.md §4, docs/design-notes.md §1, README "The model") with expected
values computed by hand for a tiny config, never by calling the code under test to produce them.

A bug that changes training and inference alike (a RoPE base, a lost position offset) is invisible to parity
and train/serve tests; these pin the definitions themselves.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from par_deploy import runtime
from par_deploy.config import preset
from par_deploy.errors import InputError
from par_deploy.model.rope import BlockRope, apply_rope
from par_deploy.model.transformer import Attention
from par_deploy.normalize import Normalizer
from par_deploy.runtime.bundle import MANIFEST_FILE, BundleError, open_bundle, sha256_file
from par_deploy.runtime.policy import Policy, PolicySpec

# --- token layout and RoPE ----------------------------------------------------------------------------------
# Tiny config: 16x16 image in 8x8 patches (K_o = 4 frame tokens), one state token, L = 3 actions, 2 text
# tokens, head dim 8 / 2 = 4 (two rotation frequencies), frame base 100, action base 10000.
SPEC = dict(chunk_len=3, dim=8, heads=2, num_text_tokens=2, rope_theta_frame=100.0, rope_theta_action=10000.0)
# inverse frequencies theta^(-2i/hd), i = 0, 1 (RoFormer): frame 100^0, 100^-0.5; action 10000^0, 10000^-0.5
FRAME_FREQ, ACTION_FREQ = (1.0, 0.1), (1.0, 0.01)
# per token of blocks 0, 1, 2: (time position, base); observation tokens (4 frame + 1 state) at block index n,
# action j of block n at n * L + j
F, A = "frame", "action"
BLOCKS = [
    [(0, F)] * 5 + [(0, A), (1, A), (2, A)],
    [(1, F)] * 5 + [(3, A), (4, A), (5, A)],
    [(2, F)] * 5 + [(6, A), (7, A), (8, A)],
]


def _angles(tokens) -> np.ndarray:
    """[T, 2] rotation angles position * inverse frequency; None (text) rotates by 0."""
    freq = {F: FRAME_FREQ, A: ACTION_FREQ}
    return np.array([[0.0, 0.0] if kind is None else [pos * f for f in freq[kind]] for pos, kind in tokens])


def test_block_layout_of_the_tiny_config():
    cfg = preset("tiny", **SPEC)
    assert (cfg.frame_tokens, cfg.obs_tokens, cfg.block_len) == (4, 5, 8)
    assert [cfg.block_slot(n) for n in range(3)] == [2, 10, 18]  # text prefix fills slots 0 and 1


def test_rope_positions_and_bases_of_every_token_type():
    rope = BlockRope(preset("tiny", **SPEC))
    text = [(0, None)] * 2  # text tokens carry learned embeddings: identity rotation
    want = _angles(text + [t for b in BLOCKS for t in b])  # [2 + 3 * 8, 2]
    cos, sin = rope.sequence(3)
    np.testing.assert_allclose(cos.numpy(), np.cos(want), atol=1e-6)
    np.testing.assert_allclose(sin.numpy(), np.sin(want), atol=1e-6)
    for n, block in enumerate(BLOCKS):  # the cached step (what the exported graph computes) uses the same
        cos, sin = rope.block(torch.tensor([n]))
        np.testing.assert_allclose(cos.numpy(), np.cos(_angles(block)), atol=1e-6)
        np.testing.assert_allclose(sin.numpy(), np.sin(_angles(block)), atol=1e-6)


def test_rope_is_a_rotation_whose_scores_depend_on_relative_position_only():
    """RoFormer's defining property: <R(p) q, R(p') k> depends on p - p' only, and norms are kept."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 4, generator=g), torch.randn(1, 1, 1, 4, generator=g)

    def rot(x, pos):
        angle = torch.tensor([[pos * f for f in ACTION_FREQ]])  # [1, 2]
        return apply_rope(x, angle.cos(), angle.sin())

    assert torch.allclose(rot(q, 7).norm(), q.norm(), atol=1e-6)
    score = lambda p, p2: float((rot(q, p) * rot(k, p2)).sum())
    assert abs(score(7, 3) - score(4, 0)) < 1e-5 and abs(score(7, 3) - score(3, 7)) > 1e-3
    # a quarter turn of the first frequency pair by hand: (x0, x2) = (1, 0) -> (0, 1)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    angle = torch.tensor([[np.pi / 2, 0.0]])
    assert torch.allclose(apply_rope(x, angle.cos(), angle.sin()).flatten(), torch.tensor([0.0, 0, 1, 0]), atol=1e-6)


def test_attention_depends_on_relative_time_only():
    """RoPE inside the model's attention: shifting every token by the same time changes nothing, moving one
    token does (so queries and keys are both rotated)."""
    torch.manual_seed(0)
    attn, x = Attention(8, 2), torch.randn(1, 3, 8)

    def out(positions):
        angle = torch.tensor([[p * f for f in ACTION_FREQ] for p in positions])  # [3, 2]
        return attn(x, None, (angle.cos(), angle.sin()))[0]

    with torch.no_grad():
        assert torch.allclose(out([0, 3, 4]), out([5, 8, 9]), atol=1e-5)
        assert not torch.allclose(out([0, 3, 4]), out([0, 3, 5]), atol=1e-3)


# --- normalisation and the action output contract -----------------------------------------------------------
# actions min-max to [-1, 1] (dimension 3 has no spread: normalises to 0, maps back to its constant);
# state standardised
NORM = Normalizer([-0.1, 1.0, -2.0, 0.5], [0.3, 5.0, -1.5, 0.5], [0.5, -3.0, 10.0], [0.25, 2.0, 0.0])


class _Scripted(Policy):
    """A backend that returns fixed normalised chunks and records what ``Policy.act`` hands it."""

    denoise_steps = 1

    def __init__(self, chunks):
        super().__init__(PolicySpec(1, 4, 3, 4, 2, 4, ("go",)), NORM)
        self.chunks, self.calls = list(chunks), []

    def _reset(self, instruction):
        pass

    def step_block(self, rgb, state, prev_chunk, first, pos):
        self.calls.append((state.copy(), prev_chunk.copy(), first, pos))

    def sample(self, noise):
        return np.asarray(self.chunks.pop(0), np.float32)


def _obs(state):
    return {"rgb": np.zeros((1, 4, 4, 3), np.uint8), "state": np.asarray(state, np.float32)}


def test_normalisation_of_state_and_actions_by_hand():
    np.testing.assert_allclose(NORM.normalize_state(np.float32([1.0, 1.0, 10.0])), [2.0, 2.0, 0.0])
    np.testing.assert_allclose(
        NORM.normalize_action(np.float32([[-0.1, 1.0, -2.0, 0.5], [0.3, 5.0, -1.5, 0.5], [0.2, 2.0, -1.625, 0.5]])),
        [[-1, -1, -1, 0], [1, 1, 1, 0], [0.5, -0.5, 0.5, 0]],
        atol=1e-6,
    )


def test_statistics_fitted_by_hand():
    """Actions: per-dimension min and max; state: mean and (population) standard deviation."""
    n = Normalizer.fit(np.float32([[1.0, -2.0], [3.0, 6.0], [2.0, 0.0]]), np.float32([[0.0, 5.0], [4.0, 5.0]]))
    np.testing.assert_allclose(n.action_min, [1.0, -2.0])
    np.testing.assert_allclose(n.action_max, [3.0, 6.0])
    np.testing.assert_allclose(n.state_mean, [2.0, 5.0])
    np.testing.assert_allclose(n.state_std, [2.0, 0.0])


def test_act_clips_to_the_trained_range_and_returns_controller_units():
    model_out = [[2.0, -3.0, 0.5, 0.7], [-0.5, 0.25, -1.0, -0.2]]  # normalised, partly out of [-1, 1]
    p = _Scripted([model_out, np.zeros((2, 4)), np.zeros((2, 4))])
    p.reset()
    # clip to [-1, 1], then centre + value * half-range: centre (0.1, 3, -1.75, 0.5), half (0.2, 2, 0.25, 0)
    np.testing.assert_allclose(
        p.act(_obs([1.0, 1.0, 10.0])), [[0.3, 1.0, -1.625, 0.5], [0.0, 3.5, -2.0, 0.5]], atol=1e-6
    )
    state, prev, first, step = p.calls[0]
    np.testing.assert_allclose(state, [2.0, 2.0, 0.0], atol=1e-6)  # (s - mean) / std
    assert first and step == 0
    # the next block's action part is the returned chunk, normalised as training normalises demo actions
    p.act(_obs([0.5, -3.0, 10.0]))
    state, prev, first, step = p.calls[1]
    np.testing.assert_allclose(prev, [[1.0, -1.0, 0.5, 0.0], [-0.5, 0.25, -1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(state, [0.0, 0.0, 0.0], atol=1e-6)
    assert not first and step == 1
    # an executed chunk (controller units) replaces it; out-of-range values are passed on, not clipped
    p.act(_obs([0.5, -3.0, 10.0]), executed=np.float32([[0.1, 3.0, -1.75, 0.5], [0.3, 7.0, -2.0, 0.5]]))
    np.testing.assert_allclose(p.calls[2][1], [[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, -1.0, 0.0]], atol=1e-6)
    with pytest.raises(InputError, match="executed"):
        p.act(_obs([0.5, -3.0, 10.0]), executed=np.zeros((3, 4), np.float32))


def test_engine_actions_stay_in_the_trained_range(runtime_bundle):
    """The ONNX engine's output, whatever its sampler returns, lies in [action_min, action_max] of the bundle
    (tests/conftest.py ``skewed_normalizer``: min (-0.1, 1, -2, 0.5), max (0.3, 5, -1.5, 0.5))."""
    policy = runtime.load(runtime_bundle, "onnx")
    policy.reset()
    s = policy.spec
    policy.sample = lambda noise: np.tile(np.float32([5.0, -5.0, 0.0, 3.0]), (s.chunk_len, 1))
    obs = {
        "rgb": np.zeros((s.num_cameras, s.image_size, s.image_size, 3), np.uint8),
        "state": np.zeros(s.state_dim, np.float32),
    }
    np.testing.assert_allclose(policy.act(obs), np.tile([0.3, 1.0, -1.75, 0.5], (s.chunk_len, 1)), atol=1e-6)


# --- integrity: the whole digest is compared ----------------------------------------------------------------


def _last_char_changed(digest: str) -> str:
    return digest[:-1] + ("0" if digest[-1] != "0" else "1")


def test_sha256_of_a_known_input(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")  # FIPS 180-2 test vector
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("entry", ["engine", "text_prefix", "checkpoint"])
def test_a_digest_differing_in_its_last_character_is_refused(runtime_bundle, tmp_path, entry):
    b = tmp_path / "bundle"
    shutil.copytree(runtime_bundle, b)
    ckpt = runtime_bundle.parent / "ckpt"
    open_bundle(b, "onnx", checkpoint=ckpt)  # intact: accepted
    m = json.loads((b / MANIFEST_FILE).read_text())
    if entry == "engine":
        target, match = m["engines"]["onnx"]["step"], "step.onnx"
        target["sha256"] = _last_char_changed(target["sha256"])
    elif entry == "text_prefix":
        m["text_prefix"]["sha256"] = _last_char_changed(m["text_prefix"]["sha256"])
        match = "text_prefix.npz"
    else:
        m["checkpoint_hash"] = _last_char_changed(m["checkpoint_hash"])
        match = "not from"
    (b / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        open_bundle(b, "onnx", checkpoint=ckpt)
