import numpy as np
import pytest
import torch

from par_deploy.config import preset
from par_deploy.errors import CacheFullError, InputError
from par_deploy.model.detokenizers import set_sizes
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.reference import TorchPolicy
from par_deploy.synthetic import randomize_, synthetic_batch


def incremental_vs_full(model, batch, N):
    cfg = model.cfg
    with torch.no_grad():
        b = {k: batch[k][:, :N] for k in ("rgb", "state", "actions", "boa")}
        emb = model.embed_block(b["rgb"], b["state"], b["actions"], b["boa"])
        text = model.text(batch["instructions"])
        full = model.hidden(text, emb.flatten(1, 2))[:, cfg.num_text_tokens :]
        cache = model.new_cache(emb.shape[0])
        model.prefill(text, cache)
        inc = torch.cat([model.step(emb[:, n], n, cache) for n in range(N)], 1)
    return full, inc


@pytest.mark.parametrize(
    "overrides", [{}, {"state_dim": 0}, {"num_cameras": 2}, {"chunk_len": 1}, {"frame_embed": "conv"}]
)
def test_kv_cache_step_equals_full_forward(overrides):
    cfg = preset("tiny", **overrides)
    model = randomize_(PARModel(cfg)).eval()
    N = cfg.max_blocks
    full, inc = incremental_vs_full(model, synthetic_batch(cfg, 2, N), N)
    assert full.abs().max() > 0.1
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


def test_cache_overflow_is_a_clear_error(tiny_model):
    cfg = tiny_model.cfg
    cache = tiny_model.new_cache(1)
    x = torch.zeros(1, cfg.block_len, cfg.dim)
    with pytest.raises(CacheFullError, match="max_blocks"):
        tiny_model.step(x, cfg.max_blocks, cache)


def test_reference_policy_cached_equals_recomputed(tiny_model):
    cfg = tiny_model.cfg
    norm = Normalizer.identity(cfg.action_dim, cfg.state_dim)
    cached, naive = TorchPolicy(tiny_model, norm), TorchPolicy(tiny_model, norm, use_cache=False)
    cached.reset()
    naive.reset()
    rng = np.random.default_rng(0)
    chunks = []
    for _ in range(cfg.max_blocks):
        obs = {
            "rgb": rng.integers(0, 255, (1, 16, 16, 3), dtype=np.uint8),
            "state": rng.standard_normal(cfg.state_dim).astype(np.float32),
        }
        noise = rng.standard_normal(cached.noise_shape()).astype(np.float32)
        a, b = cached.act(obs, noise), naive.act(obs, noise)
        np.testing.assert_allclose(a, b, atol=1e-5)
        chunks.append(a)
    assert np.ptp(np.stack(chunks)) > 0.01  # actions depend on the inputs: the comparison is not trivial
    with pytest.raises(CacheFullError):
        cached.act(obs)


@pytest.mark.parametrize("variant", ["full", "noar", "discrete"])
def test_variants_train_and_act(variant):
    cfg = preset("tiny", variant=variant)
    model = randomize_(PARModel(cfg))
    out = model.losses(synthetic_batch(cfg, 2, 3, lengths=[3, 2]))
    out["loss"].backward()
    assert all(torch.isfinite(out[k]) for k in ("loss", "frame_loss", "action_loss"))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2
    assert (model.transformer is None) == (variant == "noar")
    policy = TorchPolicy(model.eval(), Normalizer.identity(cfg.action_dim, cfg.state_dim))
    policy.reset()
    obs = {"rgb": np.zeros((1, 16, 16, 3), np.uint8), "state": np.zeros(cfg.state_dim, np.float32)}
    chunk = policy.act(obs)
    assert chunk.shape == (cfg.chunk_len, cfg.action_dim) and np.isfinite(chunk).all()


def test_tiny_model_overfits_synthetic_episodes():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = PARModel(cfg)
    batch = synthetic_batch(cfg, 2, 3, seed=1)

    def evaluate():
        with torch.no_grad():
            out = model.losses(batch, torch.Generator().manual_seed(123))
        return float(out["frame_loss"]), float(out["action_loss"])

    f0, a0 = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    for _ in range(600):
        loss = model.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    f1, a1 = evaluate()
    assert f0 / f1 > 10, (f0, f1)
    assert a0 / a1 > 10, (a0, a1)


def test_bad_batches_are_named(tiny_cfg, tiny_model):
    batch = synthetic_batch(tiny_cfg, 1, 2)
    bad = dict(batch, rgb=batch["rgb"].float())
    with pytest.raises(InputError, match=r"batch\['rgb'\].*uint8"):
        tiny_model.losses(bad)
    bad = dict(batch, rgb=batch["rgb"][..., :2])
    with pytest.raises(InputError, match=r"batch\['rgb'\].*shape"):
        tiny_model.losses(bad)
    bad = dict(batch, actions=batch["actions"][..., :2])
    with pytest.raises(InputError, match=r"batch\['actions'\]"):
        tiny_model.losses(bad)


def test_policy_rejects_bad_observations(tiny_model):
    cfg = tiny_model.cfg
    policy = TorchPolicy(tiny_model, Normalizer.identity(cfg.action_dim, cfg.state_dim))
    with pytest.raises(RuntimeError, match="reset"):
        policy.act({})
    policy.reset()
    good = {"rgb": np.zeros((1, 16, 16, 3), np.uint8), "state": np.zeros(cfg.state_dim, np.float32)}
    cases = [
        (dict(good, rgb=np.zeros((1, 16, 16, 3), np.float32)), "dtype uint8"),
        (dict(good, rgb=np.zeros((16, 16, 3), np.uint8)), "shape"),
        (dict(good, state=np.full(cfg.state_dim, np.nan, np.float32)), "NaN"),
        (dict(good, state=np.zeros(cfg.state_dim + 1, np.float32)), "shape"),
        ({"rgb": good["rgb"]}, "state"),
    ]
    for obs, message in cases:
        with pytest.raises(InputError, match=message):
            policy.act(obs)
    with pytest.raises(ValueError, match="unknown instruction"):
        policy.reset("fly to the moon")


def test_predicted_frame_shape_and_set_schedule(tiny_model):
    cfg = tiny_model.cfg
    sampler = tiny_model.sampler("ddim", 3)
    h = torch.randn(2, cfg.frame_tokens, cfg.dim)
    noise = torch.randn(4, 2, cfg.frame_tokens, cfg.frame_token_dim)
    frame = tiny_model.predict_frame(h, sampler, noise)
    assert frame.shape == (2, cfg.num_cameras, cfg.image_size, cfg.image_size, 3) and frame.dtype == torch.uint8
    for k in range(1, 40):
        for s in range(1, 10):
            sizes = set_sizes(k, s)
            assert sum(sizes) == k and min(sizes) >= 1 and len(sizes) == min(k, s)


def test_patch_codec_round_trip():
    cfg = preset("tiny", target_pool=1)
    model = PARModel(cfg)
    rgb = torch.randint(0, 256, (2, 1, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(model.codec.decode(model.codec.encode_target(rgb)), rgb)


def test_reference_policy_predicts_the_next_frame(tiny_model):
    cfg = tiny_model.cfg
    policy = TorchPolicy(tiny_model, Normalizer.identity(cfg.action_dim, cfg.state_dim))
    policy.reset()
    policy.act({"rgb": np.zeros((1, 16, 16, 3), np.uint8), "state": np.zeros(cfg.state_dim, np.float32)})
    frame = policy.predict_frame(steps=2)
    assert frame.shape == (1, 16, 16, 3) and frame.dtype == np.uint8
