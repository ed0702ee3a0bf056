"""The deployment runtime: run an exported bundle without the training code.

Importing this package imports numpy only; ``load(bundle, "onnx")`` adds onnxruntime. The TorchScript backend
imports torch and the TensorRT backend tensorrt + cuda-python, each only when selected::

    from par_deploy import runtime
    policy = runtime.load("bundles/pushcube", backend="onnx")
    policy.reset("push the cube to the goal region")
    chunk = policy.act({"rgb": rgb_uint8, "state": state})  # [spec.stride, action_dim], controller units

A bundle exported with ``--batch N`` runs N episodes per engine call: ``runtime.load_batch(bundle)`` returns a
``BatchPolicy`` (``act_batch``, ``reset(row=...)``; see ``par_deploy.runtime.batch_policy``).

Threads: a policy object serialises concurrent ``act``/``reset`` calls with a lock (they share one episode);
separate objects are independent. Input range and non-finite handling: see ``par_deploy.runtime.policy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from par_deploy.runtime.bundle import (
    BACKENDS,
    BackendUnavailable,
    Bundle,
    BundleError,
    open_bundle,
    read_manifest,
    tensorrt_profiles,
)
from par_deploy.runtime.policy import Policy, PolicySpec

if TYPE_CHECKING:
    from par_deploy.runtime.batch_policy import BatchPolicy
    from par_deploy.runtime.bundle_policy import BundlePolicy
    from par_deploy.runtime.onnx_policy import OnnxPolicy
    from par_deploy.runtime.tensorrt_policy import TensorRTPolicy
    from par_deploy.runtime.torchscript_policy import TorchScriptPolicy

_LAZY = {
    "BatchPolicy": "par_deploy.runtime.batch_policy",
    "OnnxBatchPolicy": "par_deploy.runtime.onnx_policy",
    "OnnxPolicy": "par_deploy.runtime.onnx_policy",
    "TorchScriptPolicy": "par_deploy.runtime.torchscript_policy",
    "TensorRTPolicy": "par_deploy.runtime.tensorrt_policy",
    "BundlePolicy": "par_deploy.runtime.bundle_policy",
}

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "BatchPolicy",
    "Bundle",
    "BundleError",
    "BundlePolicy",
    "OnnxBatchPolicy",
    "OnnxPolicy",
    "Policy",
    "PolicySpec",
    "TensorRTPolicy",
    "TorchScriptPolicy",
    "load",
    "load_batch",
    "open_bundle",
    "read_manifest",
    "tensorrt_profiles",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'par_deploy.runtime' has no attribute {name!r}")


def load(
    bundle: str | Path,
    backend: str = "onnx",
    threads: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
) -> BundlePolicy:
    """Verify a bundle (manifest, sha256 of every file the backend uses) and return its policy.

    ``backend``: ``"onnx"`` (ONNX Runtime), ``"torchscript"`` (PyTorch JIT) or ``"tensorrt"`` (CUDA).
    ``threads``: CPU threads (ONNX Runtime: per session, None = 1; TorchScript: ``torch.set_num_threads``
    if given). ``checkpoint``: refuse the bundle unless it was exported from this checkpoint directory.
    Call ``policy.reset(instruction)`` before the first ``act``.
    """
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "tensorrt":  # say that TensorRT/CUDA is missing before looking for engines in the bundle
        from par_deploy.runtime.tensorrt_policy import import_tensorrt

        import_tensorrt()
    verified = open_bundle(bundle, backend, checkpoint)
    verified.require_one_episode()
    if backend == "onnx":
        from par_deploy.runtime.onnx_policy import OnnxPolicy

        return OnnxPolicy(verified, threads=threads, seed=seed)
    if backend == "torchscript":
        from par_deploy.runtime.torchscript_policy import TorchScriptPolicy

        return TorchScriptPolicy(verified, threads=threads, seed=seed)
    from par_deploy.runtime.tensorrt_policy import TensorRTPolicy

    return TensorRTPolicy(verified, seed=seed)


def load_batch(
    bundle: str | Path,
    threads: int | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
) -> BatchPolicy:
    """Verify a bundle and return its ``BatchPolicy`` (ONNX Runtime): ``bundle.batch`` episodes per engine call
    (``par-deploy export --batch N``; a batch-1 bundle gives a one-row ``BatchPolicy``). Row r's noise generator
    is seeded ``seed + r``. Call ``policy.reset(instruction)`` before the first ``act_batch``."""
    from par_deploy.runtime.onnx_policy import OnnxBatchPolicy

    return OnnxBatchPolicy(open_bundle(bundle, "onnx", checkpoint), threads=threads, seed=seed)
