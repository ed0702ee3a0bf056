"""pytest-benchmark suite: control-step latency per preset and backend (`make bench-suite`).

Not part of the default run (marker ``benchmark``). Results are saved as pytest-benchmark JSON under
``.benchmarks/`` so two commits can be compared (``pytest-benchmark compare``).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from par_deploy.bench.run import _fill, _inputs
from par_deploy.checkpoint import save_pretrained
from par_deploy.config import preset
from par_deploy.model.par import PARModel
from par_deploy.normalize import Normalizer
from par_deploy.reference import TorchPolicy

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module", params=["tiny", "cpu-small", "shipped"])
def bundle(request, tmp_path_factory):
    """A bundle (ONNX + TorchScript, DDIM K=4) of an untrained preset, or of the shipped checkpoint."""
    import shutil

    from par_deploy.describe import SHIPPED_CHECKPOINT
    from par_deploy.export import export_bundle

    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "shipped":
        ckpt = Path(shutil.copytree(SHIPPED_CHECKPOINT, root / "ckpt"))
    else:
        cfg = preset(request.param, state_dim=16)
        ckpt = save_pretrained(PARModel(cfg), Normalizer.identity(cfg.action_dim, cfg.state_dim), root / "ckpt")
    export_bundle(ckpt, root / "bundle", backends=("onnx", "torchscript"), denoise_steps=4, progress=False)
    return root


def _policy(bundle, backend):
    from par_deploy import runtime

    if backend == "reference":
        return TorchPolicy.from_pretrained(bundle / "ckpt", sampler="ddim", steps=4)
    if backend == "reference_train":
        return TorchPolicy.from_pretrained(bundle / "ckpt", sampler="ddpm", steps=None)
    return runtime.load(bundle / "bundle", backend, threads=1)


@pytest.mark.parametrize("backend", ["onnx", "torchscript", "reference", "reference_train"])
def test_control_step(benchmark, bundle, backend):
    policy = _policy(bundle, backend)
    if backend == "reference_train":  # the checkpoint's whole training schedule
        policy.schedule = policy.model.sampler("ddpm", policy.model.cfg.train_timesteps)
    rng = np.random.default_rng(0)
    inputs = _inputs(policy.spec, rng)
    step = policy.spec.max_blocks // 2
    _fill(policy, step, inputs)
    noise = rng.standard_normal(policy.noise_shape()).astype(np.float32)
    benchmark.group = f"control step, {bundle.name}"

    def control():
        policy.step_block(*inputs, False, step)
        return policy.sample(noise)

    chunk = benchmark(control)
    assert np.isfinite(chunk).all()
