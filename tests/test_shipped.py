"""The shipped checkpoint (the embedded default) loads and acts."""

import re
from pathlib import Path

import numpy as np

from par_deploy.checkpoint import checkpoint_hash, from_pretrained
from par_deploy.describe import SHIPPED_CHECKPOINT
from par_deploy.reference import TorchPolicy


def test_shipped_checkpoint_loads_and_acts():
    model, norm = from_pretrained(SHIPPED_CHECKPOINT)
    cfg = model.cfg
    task = cfg.task_info  # read from the shipped config.json's ``extra`` as it is (no re-save)
    assert task.task == "PushCube" and task.control_mode == "pd_ee_delta_pos" and task.env_id == "PushCube-v1"
    assert task.max_episode_steps == 100 and task.state_keys[0] == ("agent/qpos", 9)
    assert sum(f.stat().st_size for f in Path(SHIPPED_CHECKPOINT).iterdir()) < 25e6
    card = (Path(SHIPPED_CHECKPOINT) / "MODEL_CARD.md").read_text()
    assert re.search(checkpoint_hash(SHIPPED_CHECKPOINT), card), "the model card names another checkpoint"
    policy = TorchPolicy(model, norm, steps=4)
    policy.reset()
    rng = np.random.default_rng(0)
    chunk = policy.act(
        {
            "rgb": rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8),
            "state": rng.standard_normal(cfg.state_dim).astype(np.float32),
        }
    )
    assert chunk.shape == (8, 4) and np.isfinite(chunk).all()
    assert (chunk >= norm.action_min - 1e-6).all() and (chunk <= norm.action_max + 1e-6).all()
