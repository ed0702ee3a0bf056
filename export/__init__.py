"""Export a PAR checkpoint to a deployment bundle (ONNX, TorchScript, TensorRT) and load it as a ``Policy``.

    from par_deploy.export import export_bundle, load_policy
    report = export_bundle("checkpoints/pushcube", "bundles/pushcube", backends=("onnx", "torchscript"))
    policy = load_policy("bundles/pushcube", backend="onnx")

The export units are pure functions of tensors (``graphs``): the transformer step over a read-only static
KV-cache (returns the new block's keys/values; the host writes them into its cache) and the few-step
Action-DiT sampler (K steps unrolled in one graph, or a condition graph + a denoise-step graph the runner
calls K times).
The bundle format and the torch-free loader live in ``par_deploy.runtime``.
"""

from par_deploy.export.bundler import ExportReport, export_bundle, load_policy, text_prefix
from par_deploy.export.errors import ExportError
from par_deploy.runtime.bundle import BackendUnavailable, BundleError

__all__ = [
    "BackendUnavailable",
    "BundleError",
    "ExportError",
    "ExportReport",
    "export_bundle",
    "load_policy",
    "text_prefix",
]
