import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from par_deploy.checkpoint import checkpoint_hash, from_pretrained, save_pretrained, write_checksums
from par_deploy.config import preset
from par_deploy.errors import CheckpointError
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer


@pytest.fixture
def ckpt(tmp_path, tiny_model):
    cfg = tiny_model.cfg
    rng = np.random.default_rng(0)
    norm = Normalizer.fit(rng.standard_normal((50, cfg.action_dim)), rng.standard_normal((50, cfg.state_dim)))
    return save_pretrained(tiny_model, norm, tmp_path / "ckpt"), tiny_model, norm


def test_round_trip_is_bit_exact(ckpt):
    path, model, norm = ckpt
    loaded, loaded_norm = from_pretrained(path)
    assert loaded.cfg == model.cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    for name in ("action_min", "action_max", "state_mean", "state_std"):
        assert np.array_equal(getattr(norm, name), getattr(loaded_norm, name))
    assert checkpoint_hash(path) == checkpoint_hash(path)


def test_missing_files_are_named(ckpt):
    path = ckpt[0]
    for name in ("config.json", "model.safetensors", "normalization.json"):
        data = (path / name).read_bytes()
        (path / name).unlink()
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            from_pretrained(path)
        (path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        from_pretrained(path / "nope")


def test_truncated_and_corrupt_weights(ckpt):
    path = ckpt[0]
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* truncated"):
        from_pretrained(path)
    write_checksums(path)  # re-sealed: the safetensors reader itself must refuse it
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        from_pretrained(path)
    weights.write_bytes(b"\x00" * 64)
    write_checksums(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(path)


def test_weights_that_do_not_match_the_config(ckpt):
    path = ckpt[0]
    sd = load_file(str(path / "model.safetensors"))
    key = "action_head.out.weight"
    save_file({**sd, key: torch.zeros(3, 3)}, str(path / "model.safetensors"))
    write_checksums(path)  # re-sealed: the structural check, not the checksum, must catch it
    with pytest.raises(CheckpointError, match=rf"{key}.*shape \(3, 3\)"):
        from_pretrained(path)
    del sd[key]
    save_file(sd, str(path / "model.safetensors"))
    write_checksums(path)
    with pytest.raises(CheckpointError, match="missing.*action_head.out.weight"):
        from_pretrained(path)
    sd[key] = torch.full((4, 32), float("nan"))
    save_file(sd, str(path / "model.safetensors"))
    write_checksums(path)
    with pytest.raises(CheckpointError, match="NaN"):
        from_pretrained(path)


def test_config_from_another_model_or_newer_format(ckpt):
    path = ckpt[0]
    preset("tiny", dim=64).save(path / "config.json")
    write_checksums(path)
    with pytest.raises(CheckpointError, match="shape"):
        from_pretrained(path)
    d = json.loads((path / "config.json").read_text())
    d["format_version"] = 99
    (path / "config.json").write_text(json.dumps(d))
    write_checksums(path)
    with pytest.raises(CheckpointError, match="newer"):
        from_pretrained(path)


def test_normalization_that_does_not_match(ckpt):
    path = ckpt[0]
    Normalizer.identity(7, 3).save(path / "normalization.json")
    write_checksums(path)
    with pytest.raises(CheckpointError, match="action_dim=7"):
        from_pretrained(path)
    (path / "normalization.json").write_text("{}")
    write_checksums(path)
    with pytest.raises(CheckpointError, match="normalisation"):
        from_pretrained(path)


def test_normalizer_round_trips_actions():
    rng = np.random.default_rng(0)
    acts = rng.uniform(-0.3, 0.7, (100, 4)).astype(np.float32)
    acts[:, 3] = 1.0  # a constant dimension
    norm = Normalizer.fit(acts, np.zeros((100, 0)))
    scaled = norm.normalize_action(acts)
    assert scaled.min() >= -1 - 1e-6 and scaled.max() <= 1 + 1e-6
    np.testing.assert_allclose(norm.denormalize_action(scaled), acts, atol=1e-6)
    # whatever a policy outputs for a constant dimension, the controller gets the constant
    assert (norm.denormalize_action(np.full((3, 4), 0.7, np.float32))[:, 3] == 1.0).all()


def test_model_requires_no_frozen_weights_for_counting():
    with torch.device("meta"):
        PARModel(preset("paper"), load_frozen=False)


def test_half_precision_storage_round_trip(ckpt, tmp_path):
    path, model, norm = ckpt
    half = save_pretrained(model, norm, tmp_path / "half", dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (path / "model.safetensors").stat().st_size
    loaded, _ = from_pretrained(half)
    for k, v in model.state_dict().items():
        expected = v.half().float() if v.is_floating_point() else v
        assert loaded.state_dict()[k].dtype == v.dtype and torch.equal(loaded.state_dict()[k], expected), k


def test_deployment_checkpoint_acts_like_its_source(ckpt, tmp_path):
    from par_deploy.checkpoint import make_deployment_checkpoint
    from par_deploy.errors import ConfigError
    from par_deploy.reference import TorchPolicy
    from par_deploy.synthetic import synthetic_batch

    path, model, norm = ckpt
    slim_path = make_deployment_checkpoint(path, tmp_path / "slim")
    slim, _ = from_pretrained(slim_path)
    assert slim.frame_head is None and not any(k.startswith("frame_head.") for k in slim.state_dict())
    assert slim.cfg.extra["weights_dtype"] == "float16"
    rounded = save_pretrained(model, norm, tmp_path / "rounded", dtype=torch.float16)
    full = TorchPolicy.from_pretrained(rounded)
    deploy = TorchPolicy.from_pretrained(slim_path)
    assert deploy.predict_frame is None
    full.reset()
    deploy.reset()
    rng = np.random.default_rng(0)
    cfg = model.cfg
    for _ in range(3):
        obs = {
            "rgb": rng.integers(0, 255, (1, 16, 16, 3), dtype=np.uint8),
            "state": rng.standard_normal(cfg.state_dim).astype(np.float32),
        }
        noise = rng.standard_normal(full.noise_shape()).astype(np.float32)
        np.testing.assert_array_equal(full.act(obs, noise), deploy.act(obs, noise))
    with pytest.raises(ConfigError, match="deployment checkpoint"):
        slim.losses(synthetic_batch(cfg, 1, 2))
