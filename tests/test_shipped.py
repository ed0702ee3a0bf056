"""The shipped checkpoints (one per task that has one; PushCube's is the embedded default) load and act."""

import re
from pathlib import Path

import numpy as np
import pytest

from par_deploy.checkpoint import checkpoint_hash, from_pretrained
from par_deploy.describe import SHIPPED_CHECKPOINT
from par_deploy.locate import shipped_checkpoint, shipped_tasks
from par_deploy.reference import TorchPolicy
from par_deploy.sim.env import TASKS


def test_every_task_has_a_shipped_checkpoint_and_pushcube_is_the_default():
    assert shipped_tasks() == list(TASKS)
    assert Path(SHIPPED_CHECKPOINT).resolve() == shipped_checkpoint("PushCube").resolve()


@pytest.mark.parametrize("task", list(TASKS))
def test_shipped_checkpoint_loads_and_acts(task):
    path = shipped_checkpoint(task)
    model, norm = from_pretrained(path)
    cfg, spec = model.cfg, TASKS[task]
    info = cfg.task_info  # read from the shipped config.json's ``extra`` as it is (no re-save)
    assert info.task == task and info.control_mode == "pd_ee_delta_pos" and info.env_id == spec.env_id
    assert info.max_episode_steps == spec.max_episode_steps and tuple(map(tuple, info.state_keys)) == spec.state_keys
    assert cfg.num_cameras == len(spec.cameras) and cfg.state_dim == spec.state_dim
    assert sum(f.stat().st_size for f in Path(path).iterdir()) < 25e6
    card = (Path(path) / "MODEL_CARD.md").read_text()
    assert re.search(checkpoint_hash(path), card), "the model card names another checkpoint"
    policy = TorchPolicy(model, norm, steps=4)
    policy.reset()
    rng = np.random.default_rng(0)
    chunk = policy.act(
        {
            "rgb": rng.integers(0, 256, (cfg.num_cameras, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
            "state": rng.standard_normal(cfg.state_dim).astype(np.float32),
        }
    )
    assert chunk.shape == (policy.spec.stride, 4) and np.isfinite(chunk).all()
    assert (chunk >= norm.action_min - 1e-6).all() and (chunk <= norm.action_max + 1e-6).all()
