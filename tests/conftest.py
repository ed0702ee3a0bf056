from pathlib import Path

import numpy as np
import pytest
import torch

from par_deploy.checkpoint import CONFIG_FILE, NORM_FILE, write_checksums
from par_deploy.config import PARConfig, preset
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.synthetic import randomize_

torch.set_num_threads(1)


def skewed_normalizer(action_dim: int, state_dim: int) -> Normalizer:
    """Statistics far from the identity, so that a normalisation bug changes what a model sees: offsets and
    scales that differ per dimension, and one action and one state dimension without spread (like PushCube's
    gripper), which normalise to 0 and map back to their constant."""
    lo = np.resize([-0.1, 1.0, -2.0, 0.5], action_dim)
    spread = np.resize([0.4, 4.0, 0.5, 0.0], action_dim)
    mean, std = np.resize([0.5, -3.0, 10.0], state_dim), np.resize([0.25, 2.0, 0.0], state_dim)
    return Normalizer(lo, lo + spread, mean, std)


def use_skewed_normalizer(ckpt: Path) -> Path:
    """Replace a checkpoint's normalisation statistics by ``skewed_normalizer`` (before exporting it)."""
    cfg = PARConfig.load(Path(ckpt) / CONFIG_FILE)
    skewed_normalizer(cfg.action_dim, cfg.state_dim).save(Path(ckpt) / NORM_FILE)
    write_checksums(ckpt)  # a deliberate edit: re-seal the checkpoint
    return Path(ckpt)


@pytest.fixture(scope="session")
def runtime_bundle(tmp_path_factory) -> Path:
    """An ONNX bundle of a randomised tiny model (two instructions, DDIM K=4, ``skewed_normalizer``); read only."""
    from par_deploy.export import export_bundle
    from par_deploy.synthetic import randomized_checkpoint

    work = tmp_path_factory.mktemp("runtime")
    ckpt = randomized_checkpoint(
        "tiny", work / "ckpt", scale=0.05, beta_schedule="linear", instructions=("push the cube", "pick the cube")
    )
    return export_bundle(
        use_skewed_normalizer(ckpt), work / "bundle", backends=("onnx",), denoise_steps=4, progress=False
    ).bundle_dir


@pytest.fixture
def tiny_cfg():
    return preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return randomize_(PARModel(tiny_cfg)).eval()
