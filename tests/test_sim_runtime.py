"""The torch-free runtime drives a real ManiSkill episode from an exported bundle (simulator marker)."""

import subprocess
import sys

import pytest
import torch

from par_deploy.checkpoint import save_pretrained
from par_deploy.config import preset
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer

pytestmark = pytest.mark.sim

SCRIPT = """
import sys, numpy as np
from par_deploy import runtime
from par_deploy.sim import make_env
policy = runtime.load(sys.argv[1], "onnx")
env = make_env("PushCube", image_size=policy.spec.image_size)
obs = env.reset(seed=500000)
policy.reset()
steps = 0
for _ in range(3):
    chunk = policy.act(obs)
    assert chunk.shape == (policy.spec.chunk_len, 4) and np.isfinite(chunk).all()
    for a in chunk:
        obs, _, term, trunc, info = env.step(a)
        steps += 1
env.close()
# ManiSkill itself imports torch; the runtime must not pull in the model or training code
assert not any(m in sys.modules for m in ("par_deploy.model", "par_deploy.reference", "par_deploy.train"))
print("env steps", steps)
"""


def test_runtime_drives_a_maniskill_episode(tmp_path):
    from par_deploy.export import export_bundle
    from par_deploy.sim import TASKS

    torch.manual_seed(0)
    cfg = preset(
        "tiny",
        image_size=64,
        patch_size=16,
        target_pool=4,
        state_dim=16,
        action_dim=4,
        max_blocks=13,
        instructions=(TASKS["PushCube"].instruction,),
    )
    ckpt = save_pretrained(PARModel(cfg), Normalizer.identity(4, 16), tmp_path / "ckpt")
    export_bundle(ckpt, tmp_path / "bundle", backends=("onnx",), denoise_steps=2, progress=False)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "bundle")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "env steps 12" in proc.stdout
